//! A RESP client for tests of the protected VM's service: persistent TCP connections
//! from the client namespace, one command at a time, whole replies.
use std::{
    io::{Read, Write},
    net::TcpStream,
    time::Duration,
};

use anyhow::{Context, Result, bail};
use ft_guest_service::compat::{multibulk, reply_len};

use crate::{Testbed, names::*, run_in_ns};

/// A connection to the VM's service, opened in the client namespace (the socket stays
/// there). Reads time out after `timeout`.
pub fn connect(tb: &Testbed, timeout: Duration) -> Result<TcpStream> {
    let c = run_in_ns(&tb.client_ns, || TcpStream::connect((VM_IP, VM_PORT)))
        .context("connecting to the VM's service")?;
    c.set_read_timeout(Some(timeout))?;
    c.set_nodelay(true)?;
    Ok(c)
}

/// Sends one command and reads its complete reply.
pub fn call(c: &mut TcpStream, args: &[&[u8]]) -> Result<Vec<u8>> {
    c.write_all(&multibulk(args))?;
    read_reply(c)
}

/// Reads exactly one complete reply (an error if more arrives, or the peer closes).
pub fn read_reply(c: &mut TcpStream) -> Result<Vec<u8>> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(n) = reply_len(&got) {
            if n != got.len() {
                bail!("more than one reply: {:?}", String::from_utf8_lossy(&got));
            }
            return Ok(got);
        }
        let n = c.read(&mut buf).context("reading a reply")?;
        if n == 0 {
            bail!("the connection was closed");
        }
        got.extend_from_slice(&buf[..n]);
    }
}

/// The integer of a `:N` reply.
pub fn int_reply(r: &[u8]) -> Result<i64> {
    let s = std::str::from_utf8(r)?;
    s.strip_prefix(':')
        .and_then(|v| v.trim_end().parse().ok())
        .with_context(|| format!("not an integer reply: {s:?}"))
}

/// One `redis-cli` command against the VM's service from the client namespace (bounded
/// to 20 s), its output trimmed.
pub fn redis_cli(tb: &Testbed, args: &[&str]) -> Result<String> {
    let ip = VM_IP.to_string();
    let mut v = vec!["20", "redis-cli", "-h", &ip];
    v.extend_from_slice(args);
    Ok(crate::ns_exec(&tb.client_ns, "timeout", &v)?
        .trim()
        .to_string())
}
