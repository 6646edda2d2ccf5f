//! Clients of the protected VM for fault tests: each on one persistent connection runs
//! INCR ctr and SET k<id> <n> back to back, recording what it saw; and the checks on
//! the history: INCR values unique and increasing in real-time order, the same
//! connections alive throughout, no acknowledged write lost.
use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::{Appliance, Testbed, resp};

/// One INCR as a client saw it.
#[derive(Clone, Copy, Debug)]
pub struct Incr {
    pub sent: Instant,
    pub received: Instant,
    pub value: i64,
}

#[derive(Debug, Default)]
pub struct ClientLog {
    pub incrs: Vec<Incr>,
    /// The last SET the service acknowledged (its value).
    pub last_set: Option<u64>,
}

/// Clients running on their connections until `finish`.
pub struct Clients {
    stop: Arc<AtomicBool>,
    ops: Arc<AtomicU64>,
    /// Operations per client.
    each: Arc<Vec<AtomicU64>>,
    handles: Vec<JoinHandle<Result<ClientLog>>>,
}

impl Clients {
    /// `n` clients, each connected now (from the client namespace); `timeout` bounds
    /// every reply.
    pub fn start(tb: &Testbed, n: usize, timeout: Duration) -> Clients {
        let stop = Arc::new(AtomicBool::new(false));
        let ops = Arc::new(AtomicU64::new(0));
        let each: Arc<Vec<AtomicU64>> = Arc::new((0..n).map(|_| AtomicU64::new(0)).collect());
        let handles = (0..n)
            .map(|id| {
                let conn = resp::connect(tb, timeout);
                let (stop, ops, each) = (stop.clone(), ops.clone(), each.clone());
                std::thread::spawn(move || run(conn?, id, &stop, &ops, &each[id]))
            })
            .collect();
        Clients {
            stop,
            ops,
            each,
            handles,
        }
    }

    /// Operations completed so far by each client.
    pub fn each_ops(&self) -> Vec<u64> {
        self.each
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect()
    }

    /// Waits until every client completed more operations than in `before` (a client
    /// whose request waited out a fault may be in TCP's retransmission back-off for
    /// seconds); false after `timeout`.
    pub fn wait_each_beyond(&self, before: &[u64], timeout: Duration) -> bool {
        Appliance::wait_until(timeout, || {
            self.each_ops().iter().zip(before).all(|(now, b)| now > b)
        })
    }

    /// Waits (60 s at most) until every client completed two more operations than now:
    /// at least one of them was sent from now on, whatever the others did meanwhile.
    pub fn wait_each_goes_on(&self) -> bool {
        let before: Vec<u64> = self.each_ops().iter().map(|n| n + 1).collect();
        self.wait_each_beyond(&before, Duration::from_secs(60))
    }

    /// Operations (INCR + SET pairs) completed so far, over all clients.
    pub fn ops(&self) -> u64 {
        self.ops.load(Ordering::Relaxed)
    }

    /// Waits until `ops()` reaches `n` (false after `timeout`).
    pub fn wait_ops(&self, n: u64, timeout: Duration) -> bool {
        Appliance::wait_until(timeout, || self.ops() >= n)
    }

    /// Stops the clients; panics if one of them failed (its connection did not survive).
    pub fn finish(self) -> Vec<ClientLog> {
        self.stop.store(true, Ordering::Relaxed);
        self.handles
            .into_iter()
            .enumerate()
            .map(|(i, h)| match h.join().unwrap() {
                Ok(l) => l,
                Err(e) => panic!("client {i} failed (its connection did not survive): {e:#}"),
            })
            .collect()
    }
}

fn run(
    mut c: std::net::TcpStream,
    id: usize,
    stop: &AtomicBool,
    ops: &AtomicU64,
    mine: &AtomicU64,
) -> Result<ClientLog> {
    let mut log = ClientLog::default();
    let key = format!("k{id}");
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let sent = Instant::now();
        let r = resp::call(&mut c, &[b"INCR", b"ctr"])
            .with_context(|| format!("client {id}: INCR after {} operations", log.incrs.len()))?;
        log.incrs.push(Incr {
            sent,
            received: Instant::now(),
            value: resp::int_reply(&r)?,
        });
        n += 1;
        let v = n.to_string();
        let r = resp::call(&mut c, &[b"SET", key.as_bytes(), v.as_bytes()])
            .with_context(|| format!("client {id}: SET"))?;
        if r != b"+OK\r\n" {
            bail!(
                "client {id}: SET answered {:?}",
                String::from_utf8_lossy(&r)
            );
        }
        log.last_set = Some(n);
        ops.fetch_add(1, Ordering::Relaxed);
        mine.fetch_add(1, Ordering::Relaxed);
    }
    Ok(log)
}

/// Unique INCR values, increasing in real-time order (a reply received before a
/// request was sent is smaller).
pub fn check_linearizable(all: &[Incr]) {
    let mut values: Vec<i64> = all.iter().map(|i| i.value).collect();
    values.sort_unstable();
    let n = values.len();
    values.dedup();
    assert_eq!(values.len(), n, "an INCR value was handed out twice");
    let mut by_recv: Vec<Incr> = all.to_vec();
    by_recv.sort_by_key(|i| i.received);
    let mut prefix_max = Vec::with_capacity(n);
    let mut m = i64::MIN;
    for i in &by_recv {
        m = m.max(i.value);
        prefix_max.push(m);
    }
    for op in all {
        // Every reply received before this request was sent must be smaller.
        let k = by_recv.partition_point(|i| i.received < op.sent);
        if k > 0 {
            assert!(
                prefix_max[k - 1] < op.value,
                "INCR {} was sent after a reply of {} had arrived",
                op.value,
                prefix_max[k - 1]
            );
        }
    }
}

/// The whole check of a run: linearizable INCRs, every client active after `since`,
/// every client's last acknowledged SET there, and the counter past every value seen.
pub fn check_history(tb: &Testbed, logs: &[ClientLog], since: Instant) {
    let all: Vec<Incr> = logs.iter().flat_map(|l| l.incrs.iter().copied()).collect();
    check_linearizable(&all);
    for (i, l) in logs.iter().enumerate() {
        assert!(
            l.incrs.iter().any(|x| x.sent > since),
            "client {i} made no request after the fault"
        );
    }
    let mut c = resp::connect(tb, Duration::from_secs(15)).unwrap();
    for (i, l) in logs.iter().enumerate() {
        let want = l
            .last_set
            .map(|n| format!("${}\r\n{n}\r\n", n.to_string().len()));
        let got = resp::call(&mut c, &[b"GET", format!("k{i}").as_bytes()]).unwrap();
        assert_eq!(
            Some(String::from_utf8_lossy(&got).to_string()),
            want,
            "client {i}'s last acknowledged SET"
        );
    }
    let max = all.iter().map(|i| i.value).max().unwrap();
    let ctr = resp::int_reply(&resp::call(&mut c, &[b"INCR", b"ctr"]).unwrap()).unwrap();
    assert!(
        ctr > max,
        "INCR after the run gave {ctr}, the clients saw up to {max}"
    );
}
