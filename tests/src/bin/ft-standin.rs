//! Deterministic UDP key-value responder standing in for the replicated VM.
//!
//! Requests (one per datagram, trailing CR/LF ignored):
//! `SET k v` → `OK`, `GET k` → value or `NIL`, `INCR k` → new integer, `ECHO x` → `x`,
//! `PING` → `PONG`, `STATE` → 16-hex-digit FNV-1a digest of the whole store (stable:
//! keys in sorted order), anything else → `ERR ...`. Replies go to the sender. State
//! changes only through requests, so replicas fed the same requests in the same order
//! end in the same state.
//!
//! Usage: `ft-standin [--port 7000] [--bind 0.0.0.0] [--quiet]`

use std::collections::BTreeMap;
use std::io::Write;
use std::net::UdpSocket;

fn digest(store: &BTreeMap<String, String>) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (k, v) in store {
        for b in k.bytes().chain([0u8]).chain(v.bytes()).chain([b'\n']) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    format!("{h:016x}")
}

fn handle(store: &mut BTreeMap<String, String>, req: &str) -> String {
    let req = req.trim_end_matches(['\r', '\n']);
    let (cmd, rest) = match req.split_once(' ') {
        Some((c, r)) => (c, Some(r)),
        None => (req, None),
    };
    match (cmd, rest) {
        ("PING", None) => "PONG".into(),
        ("ECHO", Some(x)) => x.into(),
        ("ECHO", None) => String::new(),
        ("STATE", None) => digest(store),
        ("GET", Some(k)) if !k.is_empty() && !k.contains(' ') => {
            store.get(k).cloned().unwrap_or_else(|| "NIL".into())
        }
        ("SET", Some(kv)) => match kv.split_once(' ') {
            Some((k, v)) if !k.is_empty() => {
                store.insert(k.into(), v.into());
                "OK".into()
            }
            _ => "ERR usage: SET key value".into(),
        },
        ("INCR", Some(k)) if !k.is_empty() && !k.contains(' ') => {
            let cur = match store.get(k) {
                None => 0i64,
                Some(v) => match v.parse::<i64>() {
                    Ok(n) => n,
                    Err(_) => return "ERR value is not an integer".into(),
                },
            };
            match cur.checked_add(1) {
                Some(n) => {
                    store.insert(k.into(), n.to_string());
                    n.to_string()
                }
                None => "ERR overflow".into(),
            }
        }
        _ => format!(
            "ERR unknown command: {}",
            cmd.chars().take(32).collect::<String>()
        ),
    }
}

fn main() {
    let mut port: u16 = 7000;
    let mut bind = String::from("0.0.0.0");
    let mut quiet = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--port" => port = args.next().and_then(|p| p.parse().ok()).expect("--port N"),
            "--bind" => bind = args.next().expect("--bind ADDR"),
            "--quiet" => quiet = true,
            "-h" | "--help" => {
                println!("usage: ft-standin [--port 7000] [--bind 0.0.0.0] [--quiet]");
                return;
            }
            other => {
                eprintln!("ft-standin: unknown argument {other}");
                std::process::exit(2);
            }
        }
    }
    let sock = UdpSocket::bind((bind.as_str(), port)).unwrap_or_else(|e| {
        eprintln!("ft-standin: bind {bind}:{port}: {e}");
        std::process::exit(1)
    });
    let mut out = std::io::LineWriter::new(std::io::stdout());
    let _ = writeln!(out, "ft-standin listening on {bind}:{port}");
    let mut store = BTreeMap::new();
    let mut buf = vec![0u8; 65_536];
    let mut seq: u64 = 0;
    loop {
        let (n, from) = match sock.recv_from(&mut buf) {
            Ok(v) => v,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                eprintln!("ft-standin: recv: {e}");
                std::process::exit(1)
            }
        };
        let resp = match std::str::from_utf8(&buf[..n]) {
            Ok(req) => handle(&mut store, req),
            Err(_) => "ERR request is not UTF-8".into(),
        };
        let _ = sock.send_to(resp.as_bytes(), from);
        seq += 1;
        if !quiet {
            let req = String::from_utf8_lossy(&buf[..n]);
            let _ = writeln!(out, "{seq} {from} {:?} -> {resp:?}", req.trim_end());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands() {
        let mut s = BTreeMap::new();
        let d0 = handle(&mut s, "STATE");
        assert_eq!(handle(&mut s, "PING"), "PONG");
        assert_eq!(handle(&mut s, "GET x"), "NIL");
        assert_eq!(handle(&mut s, "SET x hello world\n"), "OK");
        assert_eq!(handle(&mut s, "GET x"), "hello world");
        assert_eq!(handle(&mut s, "INCR n"), "1");
        assert_eq!(handle(&mut s, "INCR n"), "2");
        assert!(handle(&mut s, "INCR x").starts_with("ERR"));
        assert_eq!(handle(&mut s, "ECHO a b"), "a b");
        assert!(handle(&mut s, "FOO").starts_with("ERR"));
        let d1 = handle(&mut s, "STATE");
        assert_ne!(d0, d1);
        assert_eq!(d1.len(), 16);
        let mut t = BTreeMap::new();
        handle(&mut t, "INCR n");
        handle(&mut t, "SET x hello world");
        handle(&mut t, "INCR n");
        assert_eq!(handle(&mut t, "STATE"), d1);
    }
}
