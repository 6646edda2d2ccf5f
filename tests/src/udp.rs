//! UDP request/response client living in a namespace.

use crate::netns::try_run_in_ns;
use anyhow::{Context, Result};
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

/// A UDP socket created inside a namespace, talking to one target address.
#[derive(Debug)]
pub struct UdpClient {
    sock: UdpSocket,
    target: SocketAddr,
}

impl UdpClient {
    /// Binds `0.0.0.0:0` inside `ns` and sends to `target`.
    pub fn new(ns: &str, target: SocketAddr) -> Result<UdpClient> {
        Self::bind(ns, "0.0.0.0:0".parse().expect("addr"), target)
    }

    /// Binds `local` inside `ns` and sends to `target`.
    pub fn bind(ns: &str, local: SocketAddr, target: SocketAddr) -> Result<UdpClient> {
        let sock = try_run_in_ns(ns, || UdpSocket::bind(local))?
            .with_context(|| format!("bind {local} in {ns}"))?;
        Ok(UdpClient { sock, target })
    }

    /// Local address of the socket.
    pub fn local_addr(&self) -> Result<SocketAddr> {
        Ok(self.sock.local_addr()?)
    }

    /// Target address.
    pub fn target(&self) -> SocketAddr {
        self.target
    }

    /// The underlying socket (e.g. to send without waiting).
    pub fn socket(&self) -> &UdpSocket {
        &self.sock
    }

    /// Sends `msg` and waits up to `timeout` for one reply from the target.
    /// Stale replies queued before the send are discarded first. Ok(None) on timeout.
    pub fn request(&self, msg: &str, timeout: Duration) -> Result<Option<String>> {
        Ok(self.request_timed(msg, timeout)?.map(|(s, _)| s))
    }

    /// Like [`UdpClient::request`] but also returns the round-trip time.
    pub fn request_timed(
        &self,
        msg: &str,
        timeout: Duration,
    ) -> Result<Option<(String, Duration)>> {
        self.drain()?;
        let start = Instant::now();
        self.sock
            .send_to(msg.as_bytes(), self.target)
            .with_context(|| format!("send to {}", self.target))?;
        let mut buf = vec![0u8; 65_536];
        loop {
            let left = match timeout.checked_sub(start.elapsed()) {
                Some(l) if !l.is_zero() => l,
                _ => return Ok(None),
            };
            self.sock.set_read_timeout(Some(left))?;
            match self.sock.recv_from(&mut buf) {
                Ok((n, from)) => {
                    if from != self.target {
                        continue;
                    }
                    let rtt = start.elapsed();
                    return Ok(Some((String::from_utf8_lossy(&buf[..n]).into_owned(), rtt)));
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Ok(None);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e).context("recv_from"),
            }
        }
    }

    /// Sends without waiting for a reply.
    pub fn send(&self, msg: &str) -> Result<()> {
        self.sock.send_to(msg.as_bytes(), self.target)?;
        Ok(())
    }

    /// Receives one datagram from anyone, up to `timeout`.
    pub fn recv(&self, timeout: Duration) -> Result<Option<(String, SocketAddr)>> {
        self.sock
            .set_read_timeout(Some(timeout.max(Duration::from_micros(1))))?;
        let mut buf = vec![0u8; 65_536];
        match self.sock.recv_from(&mut buf) {
            Ok((n, from)) => Ok(Some((
                String::from_utf8_lossy(&buf[..n]).into_owned(),
                from,
            ))),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(e).context("recv_from"),
        }
    }

    /// Discards queued datagrams (at most 100k).
    pub fn drain(&self) -> Result<usize> {
        self.sock.set_nonblocking(true)?;
        let mut buf = [0u8; 2048];
        let mut n = 0;
        while n < 100_000 {
            match self.sock.recv_from(&mut buf) {
                Ok(_) => n += 1,
                Err(_) => break,
            }
        }
        self.sock.set_nonblocking(false)?;
        Ok(n)
    }
}

/// Runs a UDP echo server on `bind` inside `ns` on a background thread for at most
/// `lifetime`; replies with the received bytes. Returns once the socket is bound.
pub fn spawn_udp_echo(
    ns: &str,
    bind: SocketAddr,
    lifetime: Duration,
) -> Result<std::thread::JoinHandle<usize>> {
    let sock = try_run_in_ns(ns, || UdpSocket::bind(bind))?
        .with_context(|| format!("bind {bind} in {ns}"))?;
    Ok(std::thread::spawn(move || {
        let end = Instant::now() + lifetime;
        let mut buf = vec![0u8; 65_536];
        let mut served = 0;
        while let Some(left) = end.checked_duration_since(Instant::now()) {
            if left.is_zero() || sock.set_read_timeout(Some(left)).is_err() {
                break;
            }
            if let Ok((n, from)) = sock.recv_from(&mut buf) {
                let _ = sock.send_to(&buf[..n], from);
                served += 1;
            }
        }
        served
    }))
}
