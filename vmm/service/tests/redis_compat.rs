//! The service's replies against Debian's redis-server 7.0: every case of
//! `ft_guest_service::compat` is sent to both, and the replies must be byte-identical.
//! Runs the service in-process (no VM), so it is fast and pinpoints reply differences;
//! `vmm/tests/service.rs` runs the same cases against the guest in a VM.
use ft_guest_service::compat::{CASES, Cmp, RAW, reply_len, sorted_elements};
use ft_guest_service::{Client, Limits, MemInfo, Server, Settings};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const RAM: u64 = 256 << 20;
const HEAP: u64 = RAM - 0x130_0000;

struct Redis(Child, u16);

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn limits() -> Limits {
    Limits::derive(RAM, HEAP, &Settings::default()).unwrap()
}

/// A redis-server on loopback; `slot` keeps the tests of this file apart.
fn start_redis(slot: u16) -> Redis {
    let port = 20000 + (std::process::id() % 10000) as u16 * 2 + slot;
    let child = Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--databases",
            "1",
            "--proto-max-bulk-len",
            &limits().proto_max_bulk_len.to_string(),
        ])
        .stdout(Stdio::null())
        .spawn()
        .expect("redis-server must be installed (scripts/bootstrap.sh installs it)");
    let r = Redis(child, port);
    let t = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "redis-server did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    r
}

fn multibulk(args: &[&str]) -> Vec<u8> {
    let a: Vec<&[u8]> = args.iter().map(|x| x.as_bytes()).collect();
    ft_guest_service::compat::multibulk(&a)
}

fn read_reply(s: &mut TcpStream, buf: &mut Vec<u8>) -> Vec<u8> {
    let mut tmp = [0u8; 65536];
    loop {
        if let Some(n) = reply_len(buf) {
            return buf.drain(..n).collect();
        }
        let n = s.read(&mut tmp).expect("read reply");
        assert!(n > 0, "connection closed while waiting for a reply");
        buf.extend_from_slice(&tmp[..n]);
    }
}

struct Heap;
impl MemInfo for Heap {
    fn used(&self) -> usize {
        1 << 20
    }
}

/// Feeds `bytes` to a fresh client of `srv` and returns what it replied and whether it
/// asked to close.
fn ours(srv: &mut Server, c: &mut Client, bytes: &[u8], now_ms: u64) -> Vec<u8> {
    c.feed(bytes);
    srv.process(c, now_ms, &Heap);
    let out = c.pending_output().to_vec();
    let n = out.len();
    c.output_sent(n);
    out
}

#[test]
fn replies_match_redis_7() {
    let redis = start_redis(0);
    let mut s = TcpStream::connect(("127.0.0.1", redis.1)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut srv = Server::new(limits(), 6379, 1, 0);
    let mut c = Client::new(1, [127, 0, 0, 1], 1, 0);
    let mut buf = Vec::new();
    let mut mismatches = Vec::new();
    // COMMAND INFO of every command (containers list fewer subcommands than Redis).
    let info: Vec<Vec<&str>> = ft_guest_service::commands::COMMANDS
        .iter()
        .filter(|c| c.subcommands.is_empty())
        .map(|c| vec!["COMMAND", "INFO", c.name])
        .collect();
    // (before CASES, which end with QUIT)
    let all = info
        .into_iter()
        .map(|a| (a, Cmp::Exact))
        .chain(CASES.iter().map(|(a, c)| (a.to_vec(), *c)));
    for (args, cmp) in all {
        let args = &args[..];
        let req = multibulk(args);
        s.write_all(&req).unwrap();
        let theirs = read_reply(&mut s, &mut buf);
        let mine = ours(&mut srv, &mut c, &req, 1000);
        let same = match cmp {
            Cmp::Exact => mine == theirs,
            Cmp::Unordered => sorted_elements(&mine) == sorted_elements(&theirs),
        };
        if !same {
            mismatches.push(format!(
                "{args:?}\n  redis: {:?}\n  ours:  {:?}",
                String::from_utf8_lossy(&theirs),
                String::from_utf8_lossy(&mine)
            ));
        }
    }
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
}

#[test]
fn raw_requests_match_redis_7() {
    let redis = start_redis(1);
    let mut mismatches = Vec::new();
    for raw in RAW {
        let mut s = TcpStream::connect(("127.0.0.1", redis.1)).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        s.write_all(raw).unwrap();
        let mut theirs = Vec::new();
        let mut tmp = [0u8; 4096];
        let closed = loop {
            match s.read(&mut tmp) {
                Ok(0) => break true,
                Ok(n) => theirs.extend_from_slice(&tmp[..n]),
                Err(_) => break false,
            }
        };
        let mut srv = Server::new(limits(), 6379, 1, 0);
        let mut c = Client::new(1, [127, 0, 0, 1], 1, 0);
        let mine = ours(&mut srv, &mut c, raw, 1000);
        let my_close = c.close.is_some();
        if mine != theirs || my_close != closed {
            mismatches.push(format!(
                "{:?}\n  redis: {:?} closed={closed}\n  ours:  {:?} closed={my_close}",
                String::from_utf8_lossy(raw),
                String::from_utf8_lossy(&theirs),
                String::from_utf8_lossy(&mine)
            ));
        }
    }
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
}

/// redis-cli 7 asks `COMMAND DOCS` at start (for `help` and hints) and falls back to an
/// old built-in table if the reply is an error: the reply must be a well-formed map with
/// a summary for every command.
#[test]
fn command_docs_is_a_map_that_redis_cli_can_use() {
    let mut srv = Server::new(limits(), 6379, 1, 0);
    let mut c = Client::new(1, [127, 0, 0, 1], 1, 0);
    let r = ours(&mut srv, &mut c, &multibulk(&["COMMAND", "DOCS"]), 0);
    assert_eq!(reply_len(&r), Some(r.len()), "one complete reply");
    let text = String::from_utf8_lossy(&r);
    let n = ft_guest_service::commands::COMMANDS.len();
    assert!(text.starts_with(&format!("*{}\r\n", 2 * n)), "{text}");
    assert!(text.matches("$7\r\nsummary\r\n").count() >= n);
    for name in ["set", "get", "expire", "info", "config"] {
        assert!(
            text.contains(&format!("${}\r\n{name}\r\n", name.len())),
            "{name}"
        );
    }
    // And a subset by name, unknown names left out.
    let r = ours(
        &mut srv,
        &mut c,
        &multibulk(&["COMMAND", "DOCS", "get", "nosuch"]),
        0,
    );
    assert!(
        r.starts_with(b"*2\r\n$3\r\nget\r\n*8\r\n$7\r\nsummary\r\n"),
        "{:?}",
        String::from_utf8_lossy(&r)
    );
}
