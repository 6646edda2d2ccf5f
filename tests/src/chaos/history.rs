//! The chaos suite's clients and the history they record.
//!
//! Each client keeps one connection to the VM's service and reconnects when it breaks.
//! It runs GET, SET and INCR on a few keys that rotate (keys live for [`KEY_OPS`]
//! operations, so that every key's history stays short enough for an exact
//! linearizability check, as Jepsen's `independent` does), and INCR on one counter
//! `ctr` whose replies must be unique. Every call is recorded with its invocation and
//! return times (CLOCK_MONOTONIC, ns since the run began). A call whose outcome is not
//! known (time-out, reset, closed connection) is recorded as unknown: it may or may not
//! have taken effect, and the checker treats it so. The client then abandons that
//! connection with a reset (SO_LINGER 0: nothing of it is sent again) and carries on
//! under a new logical thread.
use std::{
    io::{BufWriter, Write},
    net::{SocketAddr, TcpStream},
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use rand::{Rng, SeedableRng, rngs::StdRng};
use serde::{Deserialize, Serialize};

use crate::{names::*, resp, run_in_ns};

/// Operations a rotating key takes before the clients move on to the next ones.
pub const KEY_OPS: u64 = 150;
/// Rotating keys in use at a time.
pub const KEYS_AT_ONCE: u64 = 3;
/// The counter only ever INCRed.
pub const COUNTER_KEY: &str = "ctr";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    Get,
    Set(i64),
    Incr,
}

/// What a completed call returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Ret {
    /// GET: the value, or none.
    Value(Option<i64>),
    /// SET: OK.
    Ok,
    /// INCR: the new value.
    Int(i64),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    Ok(Ret),
    /// The service answered with an error: the call did not take effect.
    Failed(String),
    /// No answer: it may or may not have taken effect.
    Unknown(String),
}

/// One call as a client saw it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Call {
    pub client: usize,
    /// Logical thread: a client starts a new one after every unknown outcome (the old
    /// one's call stays pending forever).
    pub thread: u64,
    pub key: String,
    pub op: Op,
    pub invoked_ns: u64,
    /// When the outcome was known (for unknown ones: when the client gave up).
    pub returned_ns: u64,
    pub outcome: Outcome,
}

/// The clients, running until [`Clients::finish`].
pub struct Clients {
    stop: Arc<AtomicBool>,
    pace_ns: Arc<AtomicU64>,
    ok: Arc<AtomicU64>,
    last_ok_ns: Arc<AtomicU64>,
    handles: Vec<JoinHandle<Vec<Call>>>,
}

/// Shared run clock: ns since the run began.
#[derive(Clone, Copy, Debug)]
pub struct Clock(pub Instant);

impl Clock {
    pub fn ns(&self) -> u64 {
        self.0.elapsed().as_nanos() as u64
    }
}

impl Clients {
    /// Clients numbered `ids` in `client_ns`, their rotating keys named
    /// `<key_prefix><generation>.<slot>`, their operation mix drawn from `seed`; `timeout`
    /// bounds every call and connection attempt. `rate` (calls per second over all
    /// clients, 0 = as fast as they can) paces them: each client starts a call at most
    /// every `clients / rate` seconds, so that a long run's history stays checkable.
    pub fn start(
        client_ns: &str,
        ids: std::ops::Range<usize>,
        key_prefix: &'static str,
        seed: u64,
        timeout: Duration,
        clock: Clock,
        rate: u64,
    ) -> Self {
        let pace_ns = Arc::new(AtomicU64::new(
            (ids.len() as u64 * 1_000_000_000)
                .checked_div(rate)
                .unwrap_or(0),
        ));
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let started = Arc::new(AtomicU64::new(0));
        let last_ok_ns = Arc::new(AtomicU64::new(0));
        let handles = ids
            .map(|id| {
                let c = Client {
                    id,
                    key_prefix,
                    pace_ns: pace_ns.clone(),
                    ns: client_ns.to_string(),
                    rng: StdRng::seed_from_u64(seed ^ (id as u64).wrapping_mul(0x9e37_79b9)),
                    timeout,
                    clock,
                    stop: stop.clone(),
                    ok: ok.clone(),
                    started: started.clone(),
                    last_ok_ns: last_ok_ns.clone(),
                };
                std::thread::Builder::new()
                    .name(format!("chaos-client-{id}"))
                    .spawn(move || c.run())
                    .expect("spawning a client thread")
            })
            .collect();
        Clients {
            stop,
            pace_ns,
            ok,
            last_ok_ns,
            handles,
        }
    }

    /// Runs `f` with the clients unpaced (to measure throughput), then paces them again.
    pub fn unpaced<T>(&self, f: impl FnOnce() -> T) -> T {
        let pace = self.pace_ns.swap(0, Ordering::Relaxed);
        let r = f();
        self.pace_ns.store(pace, Ordering::Relaxed);
        r
    }

    /// Calls completed with an answer so far.
    pub fn ok(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    /// Run-clock time of the latest answered call.
    pub fn last_ok_ns(&self) -> u64 {
        self.last_ok_ns.load(Ordering::Relaxed)
    }

    /// Stops the clients (each finishes its call in flight, bounded by the timeout)
    /// and returns every call.
    pub fn finish(self) -> Vec<Call> {
        self.stop.store(true, Ordering::Relaxed);
        let mut calls: Vec<Call> = self
            .handles
            .into_iter()
            .flat_map(|h| h.join().expect("a client thread panicked"))
            .collect();
        calls.sort_by_key(|c| c.invoked_ns);
        calls
    }
}

struct Client {
    id: usize,
    key_prefix: &'static str,
    pace_ns: Arc<AtomicU64>,
    ns: String,
    rng: StdRng,
    timeout: Duration,
    clock: Clock,
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    started: Arc<AtomicU64>,
    last_ok_ns: Arc<AtomicU64>,
}

impl Client {
    fn run(mut self) -> Vec<Call> {
        let mut calls = Vec::new();
        let mut generation = 0u64;
        let mut conn: Option<TcpStream> = None;
        let mut set_counter = 0i64;
        let mut next = Instant::now();
        while !self.stop.load(Ordering::Relaxed) {
            let pace = Duration::from_nanos(self.pace_ns.load(Ordering::Relaxed));
            let now = Instant::now();
            if pace.is_zero() || next + pace < now {
                next = now; // unpaced, or behind: no catching up in a burst
            } else if next > now {
                std::thread::sleep(next - now);
            }
            next += pace;
            let c = match conn.as_mut() {
                Some(c) => c,
                None => match connect(&self.ns, self.timeout) {
                    Ok(c) => conn.insert(c),
                    Err(_) => {
                        // Not a call: nothing was sent.
                        std::thread::sleep(Duration::from_millis(20));
                        continue;
                    }
                },
            };
            let n = self.started.fetch_add(1, Ordering::Relaxed);
            let (key, op) = match self.rng.random_range(0..4u8) {
                0 => (COUNTER_KEY.to_string(), Op::Incr),
                k => {
                    let gen_ = n / KEY_OPS;
                    let slot = self.rng.random_range(0..KEYS_AT_ONCE);
                    let key = format!("{}{gen_}.{slot}", self.key_prefix);
                    let op = match k {
                        1 => Op::Get,
                        2 => {
                            set_counter += 1;
                            // Distinct values: which SET a GET saw is never ambiguous.
                            Op::Set(self.id as i64 * 1_000_000_000 + set_counter)
                        }
                        _ => Op::Incr,
                    };
                    (key, op)
                }
            };
            let invoked_ns = self.clock.ns();
            let outcome = call(c, &key, op);
            let returned_ns = self.clock.ns();
            let unknown = matches!(outcome, Outcome::Unknown(_));
            if matches!(outcome, Outcome::Ok(_)) {
                self.ok.fetch_add(1, Ordering::Relaxed);
                self.last_ok_ns.fetch_max(returned_ns, Ordering::Relaxed);
            }
            calls.push(Call {
                client: self.id,
                thread: self.id as u64 * 1_000_000 + generation,
                key,
                op,
                invoked_ns,
                returned_ns,
                outcome,
            });
            if unknown {
                generation += 1;
                if let Some(c) = conn.take() {
                    abort(c);
                }
            }
        }
        calls
    }
}

fn connect(ns: &str, timeout: Duration) -> Result<TcpStream> {
    let addr = SocketAddr::from((VM_IP, VM_PORT));
    let c = run_in_ns(ns, || TcpStream::connect_timeout(&addr, timeout))?;
    c.set_read_timeout(Some(timeout))?;
    c.set_write_timeout(Some(timeout))?;
    c.set_nodelay(true)?;
    Ok(c)
}

/// Closes with a reset: the kernel drops what it had not sent, so no byte of an
/// abandoned call can reach the service later.
fn abort(c: TcpStream) {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: `c` owns a valid socket descriptor for the duration of the call, and
    // `l` is a properly initialised `struct linger` whose size is passed.
    unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&c),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&l as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
    drop(c);
}

fn call(c: &mut TcpStream, key: &str, op: Op) -> Outcome {
    let k = key.as_bytes();
    let v;
    let args: Vec<&[u8]> = match op {
        Op::Get => vec![b"GET", k],
        Op::Set(x) => {
            v = x.to_string();
            vec![b"SET", k, v.as_bytes()]
        }
        Op::Incr => vec![b"INCR", k],
    };
    let reply = match resp::call(c, &args) {
        Ok(r) => r,
        Err(e) => return Outcome::Unknown(format!("{e:#}")),
    };
    match parse(op, &reply) {
        Ok(r) => Outcome::Ok(r),
        Err(e) if reply.starts_with(b"-") => Outcome::Failed(format!("{e:#}")),
        // An answer we cannot read: we do not know what it did.
        Err(e) => Outcome::Unknown(format!("{e:#}")),
    }
}

fn parse(op: Op, r: &[u8]) -> Result<Ret> {
    let text = || String::from_utf8_lossy(r).to_string();
    match op {
        Op::Incr => Ok(Ret::Int(resp::int_reply(r)?)),
        Op::Set(_) if r == b"+OK\r\n" => Ok(Ret::Ok),
        Op::Get if r == b"$-1\r\n" => Ok(Ret::Value(None)),
        Op::Get => {
            let s = std::str::from_utf8(r)?;
            let body = s
                .split_once("\r\n")
                .map(|(_, b)| b.trim_end())
                .with_context(|| format!("not a bulk reply: {:?}", text()))?;
            Ok(Ret::Value(Some(body.parse().with_context(|| {
                format!("GET answered a non-integer {:?}", text())
            })?)))
        }
        Op::Set(_) => anyhow::bail!("SET answered {:?}", text()),
    }
}

/// Reads every rotating key once, from one fresh connection, after the clients
/// stopped: these calls close every key's history, so a write lost at the end shows.
pub fn final_reads(client_ns: &str, calls: &[Call], clock: Clock) -> Result<Vec<Call>> {
    let mut keys: Vec<&str> = calls
        .iter()
        .map(|c| c.key.as_str())
        .filter(|k| *k != COUNTER_KEY)
        .collect();
    keys.sort_unstable();
    keys.dedup();
    let mut c = connect(client_ns, Duration::from_secs(10)).context("final reads: connect")?;
    let mut out = Vec::with_capacity(keys.len());
    for (i, k) in keys.into_iter().enumerate() {
        let invoked_ns = clock.ns();
        let outcome = call(&mut c, k, Op::Get);
        if !matches!(outcome, Outcome::Ok(_)) {
            anyhow::bail!("final read of {k}: {outcome:?}");
        }
        out.push(Call {
            client: usize::MAX,
            thread: u64::MAX - i as u64,
            key: k.to_string(),
            op: Op::Get,
            invoked_ns,
            returned_ns: clock.ns(),
            outcome,
        });
    }
    Ok(out)
}

/// Writes the history as JSON lines.
pub fn write_history(path: &Path, calls: &[Call]) -> Result<()> {
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d)?;
    }
    let f = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut w = BufWriter::new(f);
    for c in calls {
        serde_json::to_writer(&mut w, c)?;
        w.write_all(b"\n")?;
    }
    w.flush()?;
    Ok(())
}

/// Reads a history written by [`write_history`].
pub fn read_history(path: &Path) -> Result<Vec<Call>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .enumerate()
        .map(|(i, l)| serde_json::from_str(l).with_context(|| format!("line {}", i + 1)))
        .collect()
}
