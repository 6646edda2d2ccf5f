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
    /// Starts a new `ft-arbiter` (`--init`: empty state) on a fresh port.
    pub fn start(state_dir: &Path) -> ArbiterProc {
        Self::start_new_on(&format!("127.0.0.1:{}", free_port()), state_dir)
    }

    /// Starts a new `ft-arbiter` (`--init`) on `addr`.
    pub fn start_new_on(addr: &str, state_dir: &Path) -> ArbiterProc {
        Self::spawn(addr, state_dir, true)
    }

    /// Restarts `ft-arbiter` on `addr` with the state in `state_dir` (no `--init`).
    pub fn start_on(addr: &str, state_dir: &Path) -> ArbiterProc {
        Self::spawn(addr, state_dir, false)
    }

    /// Starts `ft-arbiter` on `addr` and waits (bounded) until it accepts connections.
    fn spawn(addr: &str, state_dir: &Path, init: bool) -> ArbiterProc {
        let child = Command::new(env!("CARGO_BIN_EXE_ft-arbiter"))
            .args(["--listen", addr])
            .arg("--state-dir")
            .arg(state_dir)
            .args(init.then_some("--init"))
            // Loopback only, inside the test process's own host.
            .arg("--insecure")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("cannot start ft-arbiter");
        let mut p = ArbiterProc {
            addr: addr.to_string(),
            state_dir: state_dir.to_path_buf(),
            child: Some(child),
        };
        let t0 = Instant::now();
        while std::net::TcpStream::connect(addr).is_err() {
            if let Some(c) = p.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                panic!("ft-arbiter on {addr} exited at startup ({status}); see its stderr above");
            }
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

use ft_fence::{Arbiter, FenceError, TasOutcome};

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

/// Pairing (see `Arbiter::pair`), the same for every backend (`a`, `b`, `c` are three
/// clients of one arbiter, acting as nodes "node-a", "node-b", "node-c"):
/// * an unpaired owner's valid lease blocks everyone, the paired follower's included
///   until it is named;
/// * only the owner at the current epoch can pair, and only another node;
/// * the named follower, and nobody else, takes over at that epoch at once (the lease is
///   still valid), and the old owner is then fenced;
/// * an owner going solo (a new epoch by test-and-set) races its follower's take-over:
///   exactly one wins, every round, and the winner's epoch is unpaired;
/// * a follower that followed an older epoch loses.
pub async fn pairing_scenario(
    a: Arc<dyn Arbiter>,
    b: Arc<dyn Arbiter>,
    c: Arc<dyn Arbiter>,
    vm: &str,
    rounds: usize,
) {
    let e1 = a
        .test_and_set(vm, "node-a", 0)
        .await
        .unwrap()
        .won()
        .expect("first owner")
        .epoch;
    // Not paired yet: the lease holds.
    assert!(matches!(
        b.test_and_set(vm, "node-b", e1).await.unwrap(),
        TasOutcome::Held { .. }
    ));
    // Only the owner at the current epoch pairs, and not with itself.
    assert!(matches!(
        b.pair(vm, "node-b", e1, "node-c").await,
        Err(FenceError::Fenced { .. })
    ));
    assert!(matches!(
        a.pair(vm, "node-a", e1 + 1, "node-b").await,
        Err(FenceError::Fenced { .. })
    ));
    assert!(matches!(
        a.pair(vm, "node-a", e1, "node-a").await,
        Err(FenceError::InvalidName { .. })
    ));
    a.pair(vm, "node-a", e1, "node-b").await.unwrap();
    // Somebody else than the follower is still held off.
    assert!(matches!(
        c.test_and_set(vm, "node-c", e1).await.unwrap(),
        TasOutcome::Held { .. }
    ));
    // The follower takes over at once, while A's lease is valid.
    let info = b.read(vm).await.unwrap();
    assert!(info.lease_remaining > Duration::ZERO, "{info:?}");
    let e2 = b
        .test_and_set(vm, "node-b", e1)
        .await
        .unwrap()
        .won()
        .expect("the paired follower takes over")
        .epoch;
    assert_eq!(e2, e1 + 1);
    assert!(matches!(
        a.renew(vm, "node-a", e1).await,
        Err(FenceError::Fenced { .. })
    ));
    // A followed epoch e1: it is stale now, and its old pairing is gone.
    assert!(
        a.test_and_set(vm, "node-a", e1)
            .await
            .unwrap()
            .won()
            .is_none()
    );
    // Rounds: the owner pairs the other node, then the owner going solo races the
    // follower taking over.
    let (mut owner, mut follower) = ((b.clone(), "node-b"), (a.clone(), "node-a"));
    let mut epoch = e2;
    for round in 0..rounds {
        owner.0.pair(vm, owner.1, epoch, follower.1).await.unwrap();
        let (ro, rf) = tokio::join!(
            owner.0.test_and_set(vm, owner.1, epoch),
            follower.0.test_and_set(vm, follower.1, epoch)
        );
        let (ro, rf) = (ro.unwrap(), rf.unwrap());
        let won = match (ro.won(), rf.won()) {
            (Some(g), None) => {
                // The owner went solo: the new epoch is unpaired, the follower is out.
                assert!(
                    follower
                        .0
                        .test_and_set(vm, follower.1, g.epoch)
                        .await
                        .unwrap()
                        .won()
                        .is_none(),
                    "round {round}: a solo owner's epoch must not be taken over"
                );
                g
            }
            (None, Some(g)) => {
                std::mem::swap(&mut owner, &mut follower);
                g
            }
            (x, y) => panic!("round {round}: winners {x:?} / {y:?}: {ro:?} {rf:?}"),
        };
        assert_eq!(won.epoch, epoch + 1, "round {round}");
        epoch = won.epoch;
    }
}
