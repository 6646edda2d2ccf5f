//! RESP key-value service on smoltcp (PING, ECHO, GET, SET, DEL, INCR, EXISTS, DBSIZE;
//! CONFIG GET answers with an empty value; anything else gets a RESP error).
use crate::abi::BootInfo;
use crate::dev::{self, Nic};
use alloc::collections::BTreeMap;
use alloc::vec;
use alloc::vec::Vec;
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::socket::tcp;
use smoltcp::time::{Duration, Instant};
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpCidr, Ipv4Address};

const SOCKETS: usize = 24;
const BUF: usize = 16 * 1024;
/// Longest idle period requested from the VMM when smoltcp has no timer pending.
const MAX_IDLE: Duration = Duration::from_millis(200);
/// Requests larger than this close the connection (protects the heap).
const MAX_INBUF: usize = 1 << 20;

struct Conn {
    handle: SocketHandle,
    inbuf: Vec<u8>,
    outbuf: Vec<u8>,
}

fn now() -> Instant {
    Instant::from_micros((dev::clock_ns() / 1000) as i64)
}

pub fn serve(boot: &BootInfo) -> ! {
    let mut nic = Nic { tx_pending: false };
    let mut config = Config::new(HardwareAddress::Ethernet(EthernetAddress(boot.mac)));
    config.random_seed = dev::entropy();
    let mut iface = Interface::new(config, &mut nic, now());
    let ip = Ipv4Address::from_octets(boot.ip);
    iface.update_ip_addrs(|a| {
        let _ = a.push(IpCidr::new(ip.into(), boot.prefix_len));
    });
    if boot.gateway != [0; 4] {
        let _ = iface
            .routes_mut()
            .add_default_ipv4_route(Ipv4Address::from_octets(boot.gateway));
    }
    let mut sockets = SocketSet::new(vec![]);
    let mut conns: Vec<Conn> = (0..SOCKETS)
        .map(|_| {
            let mut s = tcp::Socket::new(
                tcp::SocketBuffer::new(vec![0; BUF]),
                tcp::SocketBuffer::new(vec![0; BUF]),
            );
            // Replies are small and request/response: Nagle + the client's delayed ACK
            // would add 40 ms stalls.
            s.set_nagle_enabled(false);
            Conn {
                handle: sockets.add(s),
                inbuf: Vec::new(),
                outbuf: Vec::new(),
            }
        })
        .collect();
    let mut store = Store::default();
    loop {
        let t = now();
        iface.poll(t, &mut nic, &mut sockets);
        let mut progress = false;
        for c in conns.iter_mut() {
            progress |= service_conn(c, &mut sockets, &mut store, boot.port);
        }
        if progress {
            // Push the replies out now.
            iface.poll(t, &mut nic, &mut sockets);
        }
        nic.flush();
        if progress || nic.rx_available() {
            continue;
        }
        let delay = iface
            .poll_delay(t, &sockets)
            .unwrap_or(MAX_IDLE)
            .min(MAX_IDLE);
        if delay > Duration::ZERO {
            dev::set_timer((t + delay).total_micros() as u64 * 1000);
            dev::idle();
        }
    }
}

/// Returns true if something was consumed or produced.
fn service_conn(c: &mut Conn, sockets: &mut SocketSet, store: &mut Store, port: u16) -> bool {
    let s = sockets.get_mut::<tcp::Socket>(c.handle);
    if !s.is_open() {
        c.inbuf.clear();
        c.outbuf.clear();
        let _ = s.listen(port);
        return false;
    }
    let mut progress = false;
    if s.can_recv() {
        let _ = s.recv(|d| {
            c.inbuf.extend_from_slice(d);
            (d.len(), ())
        });
        progress = true;
        let mut consumed = 0;
        loop {
            match parse(&c.inbuf[consumed..]) {
                Parse::Done(args, n) => {
                    consumed += n;
                    store.exec(&args, &mut c.outbuf);
                }
                Parse::Incomplete => break,
                Parse::Error => {
                    c.outbuf.extend_from_slice(b"-ERR Protocol error\r\n");
                    consumed = c.inbuf.len();
                    s.close();
                    break;
                }
            }
        }
        c.inbuf.drain(..consumed);
        if c.inbuf.len() > MAX_INBUF {
            s.abort();
        }
    }
    if !c.outbuf.is_empty()
        && s.can_send()
        && let Ok(n) = s.send_slice(&c.outbuf)
    {
        c.outbuf.drain(..n);
        progress |= n > 0;
    }
    if s.state() == tcp::State::CloseWait && c.outbuf.is_empty() {
        s.close();
    }
    progress
}

enum Parse {
    Done(Vec<Vec<u8>>, usize),
    Incomplete,
    Error,
}

fn find_crlf(b: &[u8]) -> Option<usize> {
    b.windows(2).position(|w| w == b"\r\n")
}

fn parse_int(b: &[u8]) -> Option<i64> {
    let s = core::str::from_utf8(b).ok()?;
    s.parse().ok()
}

/// Parses one command: a RESP array of bulk strings, or an inline command line.
fn parse(b: &[u8]) -> Parse {
    if b.is_empty() {
        return Parse::Incomplete;
    }
    if b[0] != b'*' {
        let Some(e) = find_crlf(b) else {
            return Parse::Incomplete;
        };
        let args = b[..e]
            .split(|&c| c == b' ')
            .filter(|a| !a.is_empty())
            .map(|a| a.to_vec())
            .collect();
        return Parse::Done(args, e + 2);
    }
    let Some(e) = find_crlf(b) else {
        return Parse::Incomplete;
    };
    let Some(n) = parse_int(&b[1..e]) else {
        return Parse::Error;
    };
    if !(0..=1024 * 1024).contains(&n) {
        return Parse::Error;
    }
    let mut pos = e + 2;
    let mut args = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let rest = &b[pos..];
        if rest.is_empty() {
            return Parse::Incomplete;
        }
        if rest[0] != b'$' {
            return Parse::Error;
        }
        let Some(e) = find_crlf(rest) else {
            return Parse::Incomplete;
        };
        let Some(len) = parse_int(&rest[1..e]) else {
            return Parse::Error;
        };
        if !(0..=512 * 1024 * 1024).contains(&len) {
            return Parse::Error;
        }
        let start = pos + e + 2;
        let end = start + len as usize;
        if b.len() < end + 2 {
            return Parse::Incomplete;
        }
        args.push(b[start..end].to_vec());
        pos = end + 2;
    }
    Parse::Done(args, pos)
}

#[derive(Default)]
struct Store {
    map: BTreeMap<Vec<u8>, Vec<u8>>,
}

fn bulk(out: &mut Vec<u8>, v: &[u8]) {
    int_line(out, b'$', v.len() as i64);
    out.extend_from_slice(v);
    out.extend_from_slice(b"\r\n");
}

fn int_line(out: &mut Vec<u8>, prefix: u8, v: i64) {
    use core::fmt::Write;
    let mut s = dev::LineBuf::new();
    let _ = write!(s, "{}", v);
    out.push(prefix);
    out.extend_from_slice(s.as_bytes());
    out.extend_from_slice(b"\r\n");
}

impl Store {
    fn exec(&mut self, args: &[Vec<u8>], out: &mut Vec<u8>) {
        let Some(cmd) = args.first() else { return };
        let cmd = cmd.to_ascii_uppercase();
        match (cmd.as_slice(), args.len()) {
            (b"PING", 1) => out.extend_from_slice(b"+PONG\r\n"),
            (b"PING", 2) | (b"ECHO", 2) => bulk(out, &args[1]),
            (b"GET", 2) => match self.map.get(&args[1]) {
                Some(v) => bulk(out, v),
                None => out.extend_from_slice(b"$-1\r\n"),
            },
            (b"SET", n) if n >= 3 => {
                self.map.insert(args[1].clone(), args[2].clone());
                out.extend_from_slice(b"+OK\r\n");
            }
            (b"DEL", n) if n >= 2 => {
                let c = args[1..]
                    .iter()
                    .filter(|k| self.map.remove(*k).is_some())
                    .count();
                int_line(out, b':', c as i64);
            }
            (b"EXISTS", n) if n >= 2 => {
                let c = args[1..]
                    .iter()
                    .filter(|k| self.map.contains_key(*k))
                    .count();
                int_line(out, b':', c as i64);
            }
            (b"INCR", 2) => {
                let cur = match self.map.get(&args[1]) {
                    None => Some(0),
                    Some(v) => parse_int(v),
                };
                match cur.and_then(|c| c.checked_add(1)) {
                    Some(v) => {
                        let mut s = dev::LineBuf::new();
                        use core::fmt::Write;
                        let _ = write!(s, "{}", v);
                        self.map.insert(args[1].clone(), s.as_bytes().to_vec());
                        int_line(out, b':', v);
                    }
                    None => {
                        out.extend_from_slice(b"-ERR value is not an integer or out of range\r\n")
                    }
                }
            }
            (b"DBSIZE", 1) => int_line(out, b':', self.map.len() as i64),
            (b"CONFIG", 3) if args[1].eq_ignore_ascii_case(b"GET") => {
                out.extend_from_slice(b"*2\r\n");
                bulk(out, &args[2]);
                let v: &[u8] = if args[2].eq_ignore_ascii_case(b"appendonly") {
                    b"no"
                } else {
                    b""
                };
                bulk(out, v);
            }
            _ => {
                out.extend_from_slice(b"-ERR unknown command '");
                out.extend(cmd.iter().filter(|c| c.is_ascii_graphic()).take(32));
                out.extend_from_slice(b"'\r\n");
            }
        }
    }
}
