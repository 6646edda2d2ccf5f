//! Shared helpers of the integration tests: real `ft-arbiter` processes and etcd members,
//! killed by Drop guards (also on panic).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ft_fence::testkit::{EtcdCluster, free_port};

/// Hard bound for any single test (each test also bounds its loops).
pub const TEST_BUDGET: Duration = Duration::from_secs(60);

/// A running `ft-arbiter` process.
pub struct ArbiterProc {
    pub addr: String,
    pub state_dir: PathBuf,
    child: Option<Child>,
}

impl ArbiterProc {
    /// Starts `ft-arbiter` on a fresh port.
    pub fn start(state_dir: &Path) -> ArbiterProc {
        Self::start_on(&format!("127.0.0.1:{}", free_port()), state_dir)
    }

    /// Starts `ft-arbiter` on `addr` and waits (bounded) until it accepts connections.
    pub fn start_on(addr: &str, state_dir: &Path) -> ArbiterProc {
        let child = Command::new(env!("CARGO_BIN_EXE_ft-arbiter"))
            .args(["--listen", addr])
            .arg("--state-dir")
            .arg(state_dir)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("cannot start ft-arbiter");
        let p = ArbiterProc {
            addr: addr.to_string(),
            state_dir: state_dir.to_path_buf(),
            child: Some(child),
        };
        let t0 = Instant::now();
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "ft-arbiter did not listen on {addr} within 10 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        p
    }

    /// SIGKILL, no chance to flush anything.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for ArbiterProc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Starts an etcd cluster of `n` members in `dir`; panics with a clear message if the
/// etcd binary is missing or the members do not come up (never skips).
pub fn etcd(n: usize, dir: &Path) -> EtcdCluster {
    match EtcdCluster::start(n, dir, Duration::from_secs(20)) {
        Ok(c) => c,
        Err(e) => panic!("etcd test cannot run: {e}"),
    }
}

/// Runs `f` until it returns Some or `limit` passes (checked every `step`).
pub async fn eventually<T, F, Fut>(limit: Duration, step: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let t0 = Instant::now();
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if t0.elapsed() > limit {
            return None;
        }
        tokio::time::sleep(step).await;
    }
}

use std::sync::Arc;

use ft_fence::{Arbiter, TasOutcome};

/// Two nodes race `test_and_set` for `rounds` rounds (both with the epoch they just read).
/// Asserts exactly one winner per round and strictly increasing epochs; the winner
/// releases so the next round is open again. Returns the last epoch.
pub async fn race_rounds(a: Arc<dyn Arbiter>, b: Arc<dyn Arbiter>, vm: &str, rounds: usize) -> u64 {
    let mut last = a.read(vm).await.expect("read").epoch;
    let mut wins = [0usize; 2];
    for round in 0..rounds {
        let (ea, eb) = tokio::join!(a.read(vm), b.read(vm));
        let (ea, eb) = (ea.expect("read a").epoch, eb.expect("read b").epoch);
        assert_eq!(
            ea, last,
            "round {round}: a sees epoch {ea}, expected {last}"
        );
        assert_eq!(
            eb, last,
            "round {round}: b sees epoch {eb}, expected {last}"
        );
        let (ra, rb) = tokio::join!(
            a.test_and_set(vm, "node-a", ea),
            b.test_and_set(vm, "node-b", eb)
        );
        let (ra, rb) = (ra.expect("tas a"), rb.expect("tas b"));
        let (winner, grant, loser) = match (&ra, &rb) {
            (TasOutcome::Won(g), other) => ("node-a", *g, other.clone()),
            (other, TasOutcome::Won(g)) => ("node-b", *g, other.clone()),
            _ => panic!("round {round}: nobody won: {ra:?} / {rb:?}"),
        };
        assert!(
            ra.won().is_none() || rb.won().is_none(),
            "round {round}: TWO winners: {ra:?} / {rb:?}"
        );
        assert_eq!(
            grant.epoch,
            last + 1,
            "round {round}: epoch must be last + 1"
        );
        assert!(grant.epoch > last);
        match loser {
            TasOutcome::Held { owner, epoch, .. } => {
                assert_eq!(owner, winner, "round {round}");
                assert_eq!(epoch, grant.epoch, "round {round}");
            }
            TasOutcome::Stale { epoch, .. } => assert!(epoch >= grant.epoch, "round {round}"),
            TasOutcome::Won(_) => unreachable!(),
        }
        let info = a.read(vm).await.expect("read");
        assert_eq!(info.owner.as_deref(), Some(winner));
        assert_eq!(info.epoch, grant.epoch);
        let w = if winner == "node-a" { &a } else { &b };
        w.release(vm, winner, grant.epoch).await.expect("release");
        wins[usize::from(winner == "node-b")] += 1;
        last = grant.epoch;
    }
    eprintln!(
        "race over {rounds} rounds: node-a won {}, node-b won {}",
        wins[0], wins[1]
    );
    last
}
