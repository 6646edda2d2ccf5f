//! The service loop: smoltcp over the paravirtual NIC, the connections, and the RESP
//! service (`ft-guest-service`).
//!
//! One device exit per loop iteration: the idle read sends the queued output, waits for
//! input (or returns at once when there is work) and returns the device clock that the
//! whole iteration uses. Received frames are processed one at a time so listening
//! sockets are replenished between SYNs; sockets are created per connection and freed
//! when it ends, so memory follows the number of clients (bounded by `maxclients`).
//! Housekeeping (idle and vanished clients, rate sampling) runs on the timer interrupt,
//! `hz` times a second.
use crate::abi::BootInfo;
use crate::dev::{self, Nic};
use alloc::vec;
use alloc::vec::Vec;
use ft_guest_service::limits::{OUTPUT_SOFT_LIMIT, REJECT_SLOTS, SOCKET_RX, SOCKET_TX};
use ft_guest_service::{Client, CloseReason, Limits, MemInfo, Server, Settings};
use smoltcp::iface::{Config, Interface, PollIngressSingleResult, SocketHandle, SocketSet};
use smoltcp::socket::tcp;
use smoltcp::time::{Duration, Instant};
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpCidr, IpEndpoint, Ipv4Address};

/// Listening sockets kept ready (refilled after every received frame).
const LISTEN_POOL: usize = 2;
/// Frames processed per loop iteration before connections are served.
const RX_BUDGET: usize = 256;
/// How long a closing connection may take to finish (FIN handshake) before it is reset:
/// a vanished peer never answers.
const LINGER_MS: u64 = 2_000;
/// A handshake not completed in this time is dropped (a SYN from a vanished client).
const HANDSHAKE_MS: u64 = 10_000;

struct Heap;

impl MemInfo for Heap {
    fn used(&self) -> usize {
        crate::heap_used()
    }
}

struct Conn {
    handle: SocketHandle,
    client: Client,
    /// Set once `close`/`abort` was called: the deadline (ms) for it to finish.
    closing: Option<u64>,
    counted: bool,
}

fn ts(ns: u64) -> Instant {
    Instant::from_micros((ns / 1000) as i64)
}

fn new_socket(l: &Limits) -> tcp::Socket<'static> {
    let mut s = tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0; SOCKET_RX]),
        tcp::SocketBuffer::new(vec![0; SOCKET_TX]),
    );
    // Replies are small request/response exchanges: Nagle plus the client's delayed ACK
    // would add 40 ms stalls.
    s.set_nagle_enabled(false);
    if l.keepalive_ms > 0 {
        s.set_keep_alive(Some(Duration::from_millis(l.keepalive_ms)));
        // A peer that answers no probe for two intervals is gone.
        s.set_timeout(Some(Duration::from_millis(2 * l.keepalive_ms)));
    }
    s
}

struct Service {
    iface: Interface,
    nic: Nic,
    sockets: SocketSet<'static>,
    listeners: Vec<SocketHandle>,
    conns: Vec<Conn>,
    server: Server,
    port: u16,
    next_id: u64,
}

pub fn serve(boot: &BootInfo) -> ! {
    let settings = Settings {
        maxclients: boot.maxclients,
        maxmemory: boot.maxmemory,
        timeout_s: boot.timeout_s,
        tcp_keepalive_s: boot.tcp_keepalive_s,
        hz: boot.hz,
    };
    let limits = match Limits::derive(boot.heap_end, boot.heap_end - boot.heap_base, &settings) {
        Ok(l) => l,
        Err(e) => {
            let mut b = dev::LineBuf::new();
            use core::fmt::Write;
            let _ = write!(b, "ft-guest: unusable settings: {e}");
            dev::console(b.as_bytes());
            dev::poweroff(4);
        }
    };
    let seed = dev::entropy();
    let mut now = dev::clock_ns();
    let mut nic = Nic;
    let mut config = Config::new(HardwareAddress::Ethernet(EthernetAddress(boot.mac)));
    config.random_seed = seed;
    let mut iface = Interface::new(config, &mut nic, ts(now));
    let ip = Ipv4Address::from_octets(boot.ip);
    iface.update_ip_addrs(|a| {
        let _ = a.push(IpCidr::new(ip.into(), boot.prefix_len));
    });
    if boot.gateway != [0; 4] {
        let _ = iface
            .routes_mut()
            .add_default_ipv4_route(Ipv4Address::from_octets(boot.gateway));
    }
    let tick_ns = 1_000_000_000 / limits.hz as u64;
    let mut svc = Service {
        iface,
        nic,
        sockets: SocketSet::new(vec![]),
        listeners: Vec::new(),
        conns: Vec::new(),
        server: Server::new(limits, boot.port, seed, now / 1_000_000),
        port: boot.port,
        next_id: 1,
    };
    svc.refill_listeners();
    let mut ticks_seen = crate::timer_ticks();
    dev::set_timer(now + tick_ns);
    loop {
        let now_ms = now / 1_000_000;
        let frames = svc.ingress(now);
        let mut busy = svc.serve_clients(now_ms);
        svc.iface
            .poll_egress(ts(now), &mut svc.nic, &mut svc.sockets);
        busy |= svc.server.background(now_ms);
        let ticks = crate::timer_ticks();
        if ticks != ticks_seen {
            ticks_seen = ticks;
            svc.cron(now_ms);
            dev::set_timer(now + tick_ns);
        }
        svc.drop_closed();
        let deadline = if busy || frames == RX_BUDGET || svc.nic.rx_available() {
            0
        } else {
            let net = svc
                .iface
                .poll_at(ts(now), &svc.sockets)
                .map_or(u64::MAX, |t| t.total_micros().max(0) as u64 * 1000);
            let expiry = svc
                .server
                .keys
                .next_expiry()
                .map_or(u64::MAX, |ms| ms.saturating_mul(1_000_000));
            net.min(expiry)
        };
        now = dev::idle(deadline);
    }
}

impl Service {
    /// Keeps `LISTEN_POOL` sockets listening while there is room for more connections.
    fn refill_listeners(&mut self) {
        let cap = self.server.limits.maxclients + REJECT_SLOTS;
        while self.listeners.len() < LISTEN_POOL && self.conns.len() + self.listeners.len() < cap {
            let mut s = new_socket(&self.server.limits);
            if s.listen(self.port).is_err() {
                break;
            }
            self.listeners.push(self.sockets.add(s));
        }
    }

    /// Processes received frames one at a time; a listener that took a SYN becomes a
    /// connection and is replaced at once. Returns the number of frames.
    fn ingress(&mut self, now: u64) -> usize {
        let mut n = 0;
        while n < RX_BUDGET {
            let r = self
                .iface
                .poll_ingress_single(ts(now), &mut self.nic, &mut self.sockets);
            if r == PollIngressSingleResult::None {
                break;
            }
            n += 1;
            self.accept(now / 1_000_000);
        }
        n
    }

    fn accept(&mut self, now_ms: u64) {
        let mut i = 0;
        while i < self.listeners.len() {
            let h = self.listeners[i];
            let s = self.sockets.get::<tcp::Socket>(h);
            if s.is_listening() {
                i += 1;
                continue;
            }
            self.listeners.swap_remove(i);
            let (addr, port) = match s.remote_endpoint() {
                Some(IpEndpoint { addr, port }) => {
                    let smoltcp::wire::IpAddress::Ipv4(a) = addr;
                    (a.octets(), port)
                }
                None => ([0; 4], 0),
            };
            let id = self.next_id;
            self.next_id += 1;
            let mut client = Client::new(id, addr, port, now_ms);
            let counted = self.server.connected_clients < self.server.limits.maxclients;
            if counted {
                self.server.client_opened();
            } else {
                // Like Redis: accept, say why, close.
                self.server.stats.rejected_connections += 1;
                client.reject(b"ERR max number of clients reached");
            }
            self.conns.push(Conn {
                handle: h,
                client,
                closing: None,
                counted,
            });
        }
        self.refill_listeners();
    }

    /// Reads requests, runs them and queues replies for every connection that has
    /// something to do. Returns true if a connection has work left that needs no new input.
    fn serve_clients(&mut self, now_ms: u64) -> bool {
        let mut busy = false;
        for conn in self.conns.iter_mut() {
            let s = self.sockets.get_mut::<tcp::Socket>(conn.handle);
            let c = &mut conn.client;
            if conn.closing.is_some() {
                // Closing after a reply: what the client still sends is discarded, so
                // its window stays open and its own FIN (queued behind that data)
                // arrives; the connection then ends at once instead of lingering.
                while s.can_recv() && s.recv(|b| (b.len(), ())).is_ok() {}
                continue;
            }
            if !s.can_recv() && c.output_len() == 0 && c.query_len() == 0 && c.close.is_none() {
                if !s.may_recv() && s.state() == tcp::State::CloseWait {
                    // The client closed its side and everything was answered.
                    s.close();
                    conn.closing = Some(now_ms + LINGER_MS);
                }
                continue;
            }
            for round in 0..4 {
                let mut progress = false;
                let room = c.input_room(&self.server.limits);
                if room > 0 && s.can_recv() {
                    let got = s
                        .recv(|buf| {
                            let n = buf.len().min(room);
                            c.feed(&buf[..n]);
                            (n, n)
                        })
                        .unwrap_or(0);
                    self.server.stats.total_net_input_bytes += got as u64;
                    progress |= got > 0;
                }
                progress |= self.server.process(c, now_ms, &Heap);
                let out = c.pending_output();
                if !out.is_empty() && s.can_send() {
                    let n = s.send_slice(out).unwrap_or(0);
                    c.output_sent(n);
                    self.server.stats.total_net_output_bytes += n as u64;
                    progress |= n > 0;
                }
                if !progress {
                    break;
                }
                // Still progressing after the last round: come back without waiting.
                busy |= round == 3;
            }
            // The client closed its side and every complete request was run (the output
            // is not holding the rest back): what is left can never complete.
            if c.close.is_none()
                && s.state() == tcp::State::CloseWait
                && !s.can_recv()
                && c.output_len() <= OUTPUT_SOFT_LIMIT
            {
                c.close = Some(CloseReason::AfterReply);
            }
            match c.close {
                Some(CloseReason::AfterReply) if c.output_len() == 0 => {
                    s.close();
                    conn.closing = Some(now_ms + LINGER_MS);
                }
                Some(CloseReason::QueryBufferLimit) | Some(CloseReason::OutputLimit) => {
                    s.abort();
                    conn.closing = Some(now_ms);
                }
                _ => {}
            }
            self.server.account(c);
        }
        if self.server.clients_memory as u64 > self.server.limits.maxmemory_clients {
            self.evict_biggest(now_ms);
        }
        busy
    }

    /// `maxmemory-clients`: disconnects the client holding the most buffer memory.
    fn evict_biggest(&mut self, now_ms: u64) {
        if let Some(conn) = self
            .conns
            .iter_mut()
            .filter(|c| c.closing.is_none())
            .max_by_key(|c| c.client.memory())
        {
            self.sockets.get_mut::<tcp::Socket>(conn.handle).abort();
            conn.closing = Some(now_ms);
            self.server.stats.evicted_clients += 1;
        }
    }

    /// Idle clients past `timeout`, closings past their linger time.
    fn cron(&mut self, now_ms: u64) {
        self.server.cron(now_ms, &Heap);
        let timeout = self.server.limits.timeout_ms;
        for conn in self.conns.iter_mut() {
            let s = self.sockets.get_mut::<tcp::Socket>(conn.handle);
            match conn.closing {
                Some(deadline) if now_ms >= deadline => s.abort(),
                None if s.state() == tcp::State::SynReceived
                    && now_ms.saturating_sub(conn.client.created_ms) > HANDSHAKE_MS =>
                {
                    s.abort();
                    conn.closing = Some(now_ms);
                }
                None if timeout > 0
                    && now_ms.saturating_sub(conn.client.last_interaction_ms) > timeout =>
                {
                    s.close();
                    conn.closing = Some(now_ms + LINGER_MS);
                }
                _ => {}
            }
        }
        self.server.sockets = self.sockets.iter().count();
    }

    /// Frees the sockets of finished connections (after the egress poll, so an abort's
    /// reset was sent).
    fn drop_closed(&mut self) {
        let mut i = 0;
        while i < self.conns.len() {
            let s = self.sockets.get::<tcp::Socket>(self.conns[i].handle);
            // TIME-WAIT needs no buffers (a late FIN gets a reset, harmlessly); a
            // handshake reset by the peer returns the socket to LISTEN.
            let done = matches!(
                s.state(),
                tcp::State::Closed | tcp::State::TimeWait | tcp::State::Listen
            );
            if !done {
                i += 1;
                continue;
            }
            let conn = self.conns.swap_remove(i);
            self.sockets.remove(conn.handle);
            if conn.counted {
                self.server.client_closed(&conn.client);
            } else {
                self.server.clients_memory -= conn.client.accounted_memory();
            }
        }
        self.refill_listeners();
    }
}
