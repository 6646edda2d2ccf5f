//! Embedded arbiter: real `ft-arbiter` processes and sockets.
mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{ArbiterProc, TEST_BUDGET, eventually, pairing_scenario, race_rounds};
use ft_fence::embedded::proto::{self, MAX_FRAME, Op, Reply, Request, Response};
use ft_fence::testkit::free_port;
use ft_fence::{
    Arbiter, EmbeddedArbiter, FenceError, LeaseKeeper, LeaseState, LeaseTiming, MonoInstant,
    TasOutcome, monotonic_now_ns,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

const TIMEOUT: Duration = Duration::from_secs(2);

fn secure_client(addr: &str, secret: &[u8]) -> Arc<dyn Arbiter> {
    Arc::new(
        EmbeddedArbiter::new(addr, Duration::from_millis(1000), TIMEOUT)
            .with_secret(secret.to_vec()),
    )
}

fn client(addr: &str, lease_ms: u64) -> Arc<dyn Arbiter> {
    Arc::new(EmbeddedArbiter::new(
        addr,
        Duration::from_millis(lease_ms),
        TIMEOUT,
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_race_exactly_one_winner() {
    let dir = tempfile::tempdir().unwrap();
    let arb = ArbiterProc::start(dir.path());
    timeout(TEST_BUDGET, async {
        let a = client(&arb.addr, 3000);
        let b = client(&arb.addr, 3000);
        let last = race_rounds(a, b, "vm-race", 200).await;
        assert_eq!(last, 200);
    })
    .await
    .expect("test budget exceeded");
}

/// The owner's paired follower takes over at once; an owner going solo races it. The
/// pairing is durable: it survives an arbiter crash (SIGKILL) and restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paired_follower_takes_over_at_once_and_races_a_solo_owner() {
    let dir = tempfile::tempdir().unwrap();
    let mut arb = ArbiterProc::start(dir.path());
    timeout(TEST_BUDGET, async {
        let c = |addr: &str| client(addr, 3000);
        pairing_scenario(c(&arb.addr), c(&arb.addr), c(&arb.addr), "vm-pair", 50).await;
        // Durable: pair, crash the arbiter, restart it; the follower still takes over.
        let a = c(&arb.addr);
        let e = a
            .test_and_set("vm-d", "node-a", 0)
            .await
            .unwrap()
            .won()
            .unwrap()
            .epoch;
        a.pair("vm-d", "node-a", e, "node-b").await.unwrap();
        let addr = arb.addr.clone();
        arb.kill();
        arb = ArbiterProc::start_on(&addr, dir.path());
        let b = c(&arb.addr);
        let g = b.test_and_set("vm-d", "node-b", e).await.unwrap();
        assert_eq!(g.won().map(|g| g.epoch), Some(e + 1), "{g:?}");
    })
    .await
    .expect("test budget exceeded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_blocks_until_expiry_then_loser_takes_over_and_old_owner_is_fenced() {
    let dir = tempfile::tempdir().unwrap();
    let arb = ArbiterProc::start(dir.path());
    timeout(TEST_BUDGET, async {
        let a = client(&arb.addr, 400);
        let b = client(&arb.addr, 400);
        let g = a.test_and_set("vm", "a", 0).await.unwrap().won().unwrap();
        assert_eq!(g.epoch, 1);
        match b.test_and_set("vm", "b", 1).await.unwrap() {
            TasOutcome::Held {
                owner,
                epoch,
                lease_remaining,
            } => {
                assert_eq!((owner.as_str(), epoch), ("a", 1));
                assert!(
                    lease_remaining > Duration::ZERO
                        && lease_remaining <= Duration::from_millis(400)
                );
            }
            o => panic!("expected Held, got {o:?}"),
        }
        // Wrong expected epoch is Stale even for the owner itself.
        assert!(matches!(
            a.test_and_set("vm", "a", 0).await.unwrap(),
            TasOutcome::Stale { epoch: 1, .. }
        ));
        // Owner may re-take (bump epoch).
        let g2 = a.test_and_set("vm", "a", 1).await.unwrap().won().unwrap();
        assert_eq!(g2.epoch, 2);
        assert!(a.renew("vm", "a", 1).await.unwrap_err().is_fenced());
        a.renew("vm", "a", 2).await.unwrap();
        let t0 = Instant::now();
        let won = eventually(Duration::from_secs(3), Duration::from_millis(25), || {
            let b = b.clone();
            async move { b.test_and_set("vm", "b", 2).await.unwrap().won() }
        })
        .await
        .expect("b never won after a's lease expired");
        assert_eq!(won.epoch, 3);
        assert!(
            t0.elapsed() >= Duration::from_millis(300),
            "took over before the lease expired"
        );
        let e = a.renew("vm", "a", 2).await.unwrap_err();
        assert!(e.is_fenced(), "{e}");
        assert!(e.to_string().contains("stop serving"), "{e}");
        assert!(a.release("vm", "a", 2).await.unwrap_err().is_fenced());
    })
    .await
    .expect("test budget exceeded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_and_restart_remembers_winner_and_never_reuses_epochs() {
    let dir = tempfile::tempdir().unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let mut arb = ArbiterProc::start_new_on(&addr, dir.path());
    timeout(TEST_BUDGET, async {
        let a = client(&addr, 1000);
        let b = client(&addr, 1000);
        // Hammer the arbiter from two tasks while it is killed.
        let max_seen = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut tasks = Vec::new();
        for (node, cl) in [("a", a.clone()), ("b", b.clone())] {
            let (max_seen, stop) = (max_seen.clone(), stop.clone());
            tasks.push(tokio::spawn(async move {
                let mut wins = Vec::new();
                for _ in 0..10_000 {
                    if stop.load(std::sync::atomic::Ordering::Relaxed) {
                        break;
                    }
                    let Ok(info) = cl.read("vm").await else {
                        continue;
                    };
                    if let Ok(TasOutcome::Won(g)) = cl.test_and_set("vm", node, info.epoch).await {
                        max_seen.fetch_max(g.epoch, std::sync::atomic::Ordering::SeqCst);
                        wins.push(g.epoch);
                        let _ = cl.release("vm", node, g.epoch).await;
                    }
                }
                wins
            }));
        }
        tokio::time::sleep(Duration::from_millis(400)).await;
        arb.kill();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.unwrap());
        }
        let max = max_seen.load(std::sync::atomic::Ordering::SeqCst);
        assert!(max > 0, "no wins before the crash");
        all.sort_unstable();
        let n = all.len();
        all.dedup();
        assert_eq!(all.len(), n, "an epoch was granted twice before the crash");

        // While down: nobody can win, and the error says so.
        let e = b.test_and_set("vm", "b", max).await.unwrap_err();
        assert!(matches!(e, FenceError::Unreachable { .. }), "{e}");

        // Now a wins and the arbiter is killed right after answering.
        let _arb2 = ArbiterProc::start_on(&addr, dir.path());
        let info = a.read("vm").await.unwrap();
        assert!(
            info.epoch >= max,
            "epoch went back from {max} to {}",
            info.epoch
        );
        // Any lease that was held is honoured for a full lease after restart.
        let g = eventually(Duration::from_secs(5), Duration::from_millis(50), || {
            let a = a.clone();
            async move {
                let e = a.read("vm").await.ok()?.epoch;
                a.test_and_set("vm", "a", e).await.ok()?.won()
            }
        })
        .await
        .expect("a could not win after restart");
        assert!(g.epoch > max);
        drop(_arb2);
        let arb3 = ArbiterProc::start_on(&addr, dir.path());
        let info = b.read("vm").await.unwrap();
        assert_eq!(
            info.owner.as_deref(),
            Some("a"),
            "winner forgotten across a crash"
        );
        assert_eq!(info.epoch, g.epoch);
        assert!(
            info.lease_remaining > Duration::from_millis(300),
            "restart must re-grant a full lease: {info:?}"
        );
        match b.test_and_set("vm", "b", g.epoch).await.unwrap() {
            TasOutcome::Held { owner, .. } => assert_eq!(owner, "a"),
            o => panic!("b must not win while a's (restarted) lease runs: {o:?}"),
        }
        // a can still renew its lease at the same epoch after the restart.
        a.renew("vm", "a", g.epoch).await.unwrap();
        drop(arb3);
    })
    .await
    .expect("test budget exceeded");
}

#[tokio::test]
async fn in_process_server_abort_and_restart_keeps_state() {
    let dir = tempfile::tempdir().unwrap();
    timeout(TEST_BUDGET, async {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let path = dir.path().to_path_buf();
        let new = ft_fence::ServerOptions {
            init: true,
            ..Default::default()
        };
        let srv = tokio::spawn(async move { ft_fence::serve_with(l, path, new).await });
        let a = client(&addr, 200);
        let g = a.test_and_set("vm", "a", 0).await.unwrap().won().unwrap();
        a.release("vm", "a", g.epoch).await.unwrap();
        srv.abort();
        let _ = srv.await;
        // A second server on the same directory while the first is gone: allowed (lock
        // released with the task); the state is there.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr2 = l.local_addr().unwrap().to_string();
        let path = dir.path().to_path_buf();
        let srv2 = tokio::spawn(async move { ft_fence::serve(l, path).await });
        let b = client(&addr2, 200);
        let info = b.read("vm").await.unwrap();
        assert_eq!((info.owner, info.epoch), (None, 1));
        assert_eq!(
            b.test_and_set("vm", "b", 1)
                .await
                .unwrap()
                .won()
                .unwrap()
                .epoch,
            2
        );
        // Two live servers on one directory are refused.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let e = ft_fence::serve(l, dir.path()).await.unwrap_err();
        assert!(
            e.to_string()
                .contains("locked by another running ft-arbiter"),
            "{e}"
        );
        srv2.abort();
    })
    .await
    .expect("test budget exceeded");
}

#[tokio::test]
async fn unreachable_arbiter_means_nobody_goes_live() {
    timeout(TEST_BUDGET, async {
        // Nothing listens on this port.
        let addr = format!("127.0.0.1:{}", free_port());
        let a = client(&addr, 3000);
        let e = a.test_and_set("vm", "a", 0).await.unwrap_err();
        assert!(matches!(e, FenceError::Unreachable { .. }), "{e:?}");
        let msg = e.to_string();
        assert!(
            msg.contains(&addr) && msg.contains("connection refused"),
            "{msg}"
        );
        assert!(
            msg.contains("will not go live until it can reach the arbiter"),
            "{msg}"
        );

        // A listener that accepts but never answers: bounded by the request timeout.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let hold = tokio::spawn(async move {
            let mut socks = Vec::new();
            while let Ok((s, _)) = l.accept().await {
                socks.push(s);
            }
        });
        let a = Arc::new(EmbeddedArbiter::new(
            &addr,
            Duration::from_secs(3),
            Duration::from_millis(300),
        ));
        let t0 = Instant::now();
        let e = a.test_and_set("vm", "a", 0).await.unwrap_err();
        assert!(matches!(e, FenceError::Timeout { .. }), "{e:?}");
        assert!(t0.elapsed() < Duration::from_secs(2));
        assert!(e.to_string().contains("will not go live"), "{e}");
        hold.abort();
    })
    .await
    .expect("test budget exceeded");
}

/// Raw protocol client for the bad-input test.
struct Raw(TcpStream);

impl Raw {
    async fn connect(addr: &str) -> Raw {
        Raw(TcpStream::connect(addr).await.unwrap())
    }
    async fn send_raw(&mut self, bytes: &[u8]) {
        self.0.write_all(bytes).await.unwrap();
    }
    async fn send_body(&mut self, body: &[u8]) {
        let mut f = (body.len() as u32).to_be_bytes().to_vec();
        f.extend_from_slice(body);
        self.send_raw(&f).await;
    }
    async fn recv(&mut self) -> Option<Response> {
        let f = timeout(Duration::from_secs(3), proto::read_frame(&mut self.0))
            .await
            .expect("no reply within 3 s")
            .ok()?;
        Some(serde_json::from_slice(&f).expect("reply is valid JSON"))
    }
    async fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(
            timeout(Duration::from_secs(3), self.0.read(&mut b)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }
    async fn call(&mut self, req: &Request) -> Reply {
        self.send_body(&proto::encode(req)).await;
        self.recv().await.expect("reply").reply
    }
}

fn req(id: u64, node: &str, op: Op) -> Request {
    Request {
        v: 1,
        id,
        node: node.into(),
        vm: "vm".into(),
        op,
        mac: None,
    }
}

fn tas(id: u64, node: &str, expected_epoch: u64) -> Request {
    req(
        id,
        node,
        Op::TestAndSet {
            expected_epoch,
            lease_ms: 60_000,
        },
    )
}

fn is_error(r: &Reply, code: proto::ErrorCode) -> bool {
    matches!(r, Reply::Error { code: c, .. } if *c == code)
}

#[tokio::test]
async fn bad_input_gets_errors_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let arb = ArbiterProc::start(dir.path());
    let addr = arb.addr.clone();
    timeout(TEST_BUDGET, async {
        let reader = client(&addr, 3000);
        let state = || async {
            let i = reader.read("vm").await.unwrap();
            (i.owner, i.epoch)
        };
        let file = || std::fs::read(dir.path().join(ft_fence::embedded::STATE_FILE)).ok();

        // Establish some state: node a owns epoch 1.
        let mut c = Raw::connect(&addr).await;
        assert!(matches!(
            c.call(&tas(100, "a", 0)).await,
            Reply::Won { epoch: 1, .. }
        ));
        let before = (Some("a".to_string()), 1);
        let file_before = file();
        assert!(file_before.is_some());

        // Garbage body: error reply, connection closed.
        let mut g = Raw::connect(&addr).await;
        g.send_body(b"\x00\xffnot json at all").await;
        assert!(is_error(
            &g.recv().await.unwrap().reply,
            proto::ErrorCode::BadRequest
        ));
        assert!(g.closed().await);

        // Oversized and zero lengths: error, closed, body never read.
        for len in [MAX_FRAME as u32 + 1, u32::MAX, 0] {
            let mut o = Raw::connect(&addr).await;
            o.send_raw(&len.to_be_bytes()).await;
            assert!(is_error(
                &o.recv().await.unwrap().reply,
                proto::ErrorCode::FrameTooLarge
            ));
            assert!(o.closed().await);
        }

        // Truncated frame (length says 200, 20 bytes sent, then EOF): no reply, no change.
        let mut t = Raw::connect(&addr).await;
        let body = proto::encode(&tas(101, "b", 1));
        let mut f = 200u32.to_be_bytes().to_vec();
        f.extend_from_slice(&body[..20]);
        t.send_raw(&f).await;
        t.0.shutdown().await.unwrap();
        assert!(t.recv().await.is_none());

        // A complete request cut in the middle of a valid TAS for b: nothing applied.
        let mut t2 = Raw::connect(&addr).await;
        let body = proto::encode(&req(102, "b", Op::Release { epoch: 1 }));
        let mut f = (body.len() as u32).to_be_bytes().to_vec();
        f.extend_from_slice(&body[..body.len() - 3]);
        t2.send_raw(&f).await;
        drop(t2);

        // Unknown op, unknown field, wrong version, bad names, bad lease: error replies,
        // the connection stays usable for the ones that parse.
        let mut u = Raw::connect(&addr).await;
        u.send_body(br#"{"v":1,"id":103,"node":"b","vm":"vm","op":"format_disk"}"#)
            .await;
        assert!(is_error(
            &u.recv().await.unwrap().reply,
            proto::ErrorCode::BadRequest
        ));
        let mut u = Raw::connect(&addr).await;
        u.send_body(br#"{"v":1,"id":103,"node":"b","vm":"vm","op":"read","force":true}"#)
            .await;
        assert!(is_error(
            &u.recv().await.unwrap().reply,
            proto::ErrorCode::BadRequest
        ));
        let mut u = Raw::connect(&addr).await;
        let mut r = tas(104, "b", 1);
        r.v = 2;
        assert!(is_error(
            &u.call(&r).await,
            proto::ErrorCode::UnsupportedVersion
        ));
        let mut r = tas(105, "b/../x", 1);
        r.vm = "vm".into();
        assert!(is_error(
            &u.call(&r).await,
            proto::ErrorCode::InvalidArgument
        ));
        let r = req(
            106,
            "b",
            Op::TestAndSet {
                expected_epoch: 1,
                lease_ms: 0,
            },
        );
        assert!(is_error(
            &u.call(&r).await,
            proto::ErrorCode::InvalidArgument
        ));
        // Released by someone who is not the owner: fenced, nothing changes.
        assert!(matches!(
            u.call(&req(107, "b", Op::Release { epoch: 1 })).await,
            Reply::Fenced { .. }
        ));

        assert_eq!(state().await, before);
        assert_eq!(file(), file_before, "state file changed by bad input");

        // Replays: the same request again gets the same answer and is not re-applied.
        let mut c2 = Raw::connect(&addr).await;
        let rel = req(200, "a", Op::Release { epoch: 1 });
        assert!(matches!(c2.call(&rel).await, Reply::Released { epoch: 1 }));
        assert_eq!(state().await, (None, 1));
        let take = tas(201, "a", 1);
        let first = c2.call(&take).await;
        assert!(matches!(first, Reply::Won { epoch: 2, .. }), "{first:?}");
        assert_eq!(
            c2.call(&take).await,
            first,
            "replay must return the cached reply"
        );
        assert_eq!(
            state().await,
            (Some("a".to_string()), 2),
            "replayed TAS applied twice"
        );
        // Older ids (a replay of the earlier release) are refused; state unchanged.
        assert!(is_error(
            &c2.call(&rel).await,
            proto::ErrorCode::StaleRequestId
        ));
        assert!(is_error(
            &c2.call(&tas(100, "a", 0)).await,
            proto::ErrorCode::StaleRequestId
        ));
        assert_eq!(state().await, (Some("a".to_string()), 2));
        // Even with a fresh id, a replayed TAS with the old expected epoch is only Stale.
        assert!(matches!(
            c2.call(&tas(202, "a", 1)).await,
            Reply::Stale { epoch: 2, .. }
        ));
        assert_eq!(state().await, (Some("a".to_string()), 2));

        // A slow client holding half a frame does not block anybody else.
        let mut slow = Raw::connect(&addr).await;
        slow.send_raw(&[0, 0]).await;
        let t0 = Instant::now();
        assert_eq!(state().await, (Some("a".to_string()), 2));
        assert!(t0.elapsed() < Duration::from_secs(1));
        drop(slow);
    })
    .await
    .expect("test budget exceeded");
    drop(arb);
}

/// A grant that arrives with less time left than the renewal interval (a test-and-set
/// retried after its first reply was lost returns the lease it had already taken) is
/// renewed before it lapses, not declared lost untried. (Found by the chaos suite: a
/// backup that took over while the arbiter was cut off halted at once with "no
/// renewal attempted yet".)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_keeper_renews_a_grant_that_arrives_nearly_expired() {
    let dir = tempfile::tempdir().unwrap();
    let arb = ArbiterProc::start(dir.path());
    timeout(TEST_BUDGET, async {
        let a: Arc<dyn Arbiter> = Arc::new(EmbeddedArbiter::new(
            &arb.addr,
            Duration::from_millis(3000),
            Duration::from_millis(200),
        ));
        let g = a.test_and_set("vm", "a", 0).await.unwrap().won().unwrap();
        // Installed deadline 300 ms away; the interval alone would first renew at 1 s.
        let nearly = monotonic_now_ns() + 300_000_000;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let timing = LeaseTiming {
            renew_interval: Duration::from_millis(1000),
            request_timeout: Duration::from_millis(200),
            drift_margin: Duration::from_millis(20),
        };
        let _k = LeaseKeeper::spawn(a, "vm", "a", g.epoch, nearly, timing, move |s| {
            let _ = tx.send(s);
        });
        match timeout(Duration::from_secs(3), rx.recv())
            .await
            .unwrap()
            .unwrap()
        {
            LeaseState::Valid {
                deadline_monotonic_ns,
                ..
            } => assert!(deadline_monotonic_ns > nearly),
            s => panic!("the nearly expired grant was not renewed: {s:?}"),
        }
    })
    .await
    .expect("test budget exceeded");
    drop(arb);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_keeper_renews_and_never_extends_after_arbiter_loss() {
    let dir = tempfile::tempdir().unwrap();
    let mut arb = ArbiterProc::start(dir.path());
    timeout(TEST_BUDGET, async {
        let lease = Duration::from_millis(600);
        let drift = Duration::from_millis(50);
        let a: Arc<dyn Arbiter> = Arc::new(EmbeddedArbiter::new(
            &arb.addr,
            lease,
            Duration::from_millis(100),
        ));
        let sent = MonoInstant::now();
        let g = a.test_and_set("vm", "a", 0).await.unwrap().won().unwrap();
        let first = g.deadline_monotonic_ns(sent, drift);
        assert!(first > monotonic_now_ns() && first <= sent.0 + 550_000_000);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let timing = LeaseTiming {
            renew_interval: Duration::from_millis(120),
            request_timeout: Duration::from_millis(100),
            drift_margin: drift,
        };
        let keeper = LeaseKeeper::spawn(a.clone(), "vm", "a", g.epoch, first, timing, move |s| {
            let _ = tx.send((monotonic_now_ns(), s));
        });
        let mut last_deadline = first;
        for _ in 0..4 {
            let (at, s) = timeout(Duration::from_secs(2), rx.recv())
                .await
                .unwrap()
                .unwrap();
            match s {
                LeaseState::Valid {
                    epoch,
                    deadline_monotonic_ns,
                } => {
                    assert_eq!(epoch, 1);
                    assert!(deadline_monotonic_ns > last_deadline);
                    assert!(deadline_monotonic_ns <= at + 550_000_000);
                    last_deadline = deadline_monotonic_ns;
                }
                s => panic!("unexpected {s:?}"),
            }
        }
        let killed_at = monotonic_now_ns();
        arb.kill();
        let mut lost_at = None;
        for _ in 0..10 {
            let (at, s) = timeout(Duration::from_secs(3), rx.recv())
                .await
                .unwrap()
                .unwrap();
            match s {
                LeaseState::Valid {
                    deadline_monotonic_ns,
                    ..
                } => {
                    // A renewal sent before the kill may still land; never one sent after.
                    assert!(deadline_monotonic_ns <= killed_at + 550_000_000);
                    last_deadline = deadline_monotonic_ns;
                }
                LeaseState::Lost { reason, fenced } => {
                    assert!(!fenced, "{reason}");
                    assert!(
                        reason.contains("expired without a successful renewal"),
                        "{reason}"
                    );
                    lost_at = Some(at);
                    break;
                }
            }
        }
        let lost_at = lost_at.expect("keeper never reported Lost");
        assert!(
            lost_at >= last_deadline,
            "Lost reported before the deadline passed"
        );
        assert!(
            lost_at < last_deadline + 1_000_000_000,
            "Lost reported late"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(keeper.is_finished());
    })
    .await
    .expect("test budget exceeded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_keeper_reports_fenced_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let arb = ArbiterProc::start(dir.path());
    timeout(TEST_BUDGET, async {
        let a = client(&arb.addr, 5000);
        let g = a.test_and_set("vm", "a", 0).await.unwrap().won().unwrap();
        // Someone re-takes with the same node name at a higher epoch (e.g. a restarted
        // daemon): the keeper of epoch 1 must learn it is fenced.
        let g2 = a.test_and_set("vm", "a", 1).await.unwrap().won().unwrap();
        assert_eq!(g2.epoch, 2);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let timing = LeaseTiming {
            renew_interval: Duration::from_millis(50),
            request_timeout: Duration::from_millis(500),
            drift_margin: Duration::from_millis(100),
        };
        let _k = LeaseKeeper::spawn(a, "vm", "a", g.epoch, u64::MAX - 1, timing, move |s| {
            let _ = tx.send(s);
        });
        match timeout(Duration::from_secs(2), rx.recv())
            .await
            .unwrap()
            .unwrap()
        {
            LeaseState::Lost { reason, fenced } => {
                assert!(fenced && reason.contains("fenced"), "{reason}")
            }
            s => panic!("expected Lost, got {s:?}"),
        }
    })
    .await
    .expect("test budget exceeded");
}

#[tokio::test]
async fn try_acquire_goes_live_once_and_computes_deadline_from_send_time() {
    let dir = tempfile::tempdir().unwrap();
    let arb = ArbiterProc::start(dir.path());
    timeout(TEST_BUDGET, async {
        let a = client(&arb.addr, 2000);
        let b = client(&arb.addr, 2000);
        let drift = Duration::from_millis(100);
        let before = monotonic_now_ns();
        let got = ft_fence::try_acquire(a.as_ref(), "vm", "a", drift)
            .await
            .unwrap();
        let after = monotonic_now_ns();
        let ft_fence::Acquire::Live {
            grant,
            deadline_monotonic_ns,
        } = got
        else {
            panic!("a should go live: {got:?}")
        };
        assert_eq!(grant.epoch, 1);
        assert!(deadline_monotonic_ns >= before + 1_900_000_000);
        assert!(deadline_monotonic_ns <= after + 1_900_000_000);
        match ft_fence::try_acquire(b.as_ref(), "vm", "b", drift)
            .await
            .unwrap()
        {
            ft_fence::Acquire::NotLive(TasOutcome::Held { owner, epoch, .. }) => {
                assert_eq!((owner.as_str(), epoch), ("a", 1))
            }
            o => panic!("b must not go live: {o:?}"),
        }
        // A restarted daemon on the owner node re-takes with a higher epoch.
        let again = ft_fence::try_acquire(a.as_ref(), "vm", "a", drift)
            .await
            .unwrap();
        assert!(matches!(again, ft_fence::Acquire::Live { grant, .. } if grant.epoch == 2));
    })
    .await
    .expect("test budget exceeded");
}

#[tokio::test]
async fn corrupt_state_file_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join(ft_fence::embedded::STATE_FILE),
        b"{\"version\":1,\"vms\":",
    )
    .unwrap();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let e = timeout(Duration::from_secs(5), ft_fence::serve(l, dir.path()))
        .await
        .expect("serve must fail at once")
        .unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("corrupt") && msg.contains("reuse epochs"),
        "{msg}"
    );
}

#[tokio::test]
async fn stalled_and_idle_connections_are_closed_by_the_server() {
    let dir = tempfile::tempdir().unwrap();
    timeout(TEST_BUDGET, async {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let opts = ft_fence::embedded::ServerOptions {
            idle_timeout: Duration::from_millis(500),
            io_timeout: Duration::from_millis(200),
            init: true,
            ..Default::default()
        };
        let path = dir.path().to_path_buf();
        let srv = tokio::spawn(async move { ft_fence::serve_with(l, path, opts).await });
        // Length prefix says 100 bytes, only 5 arrive: closed after io_timeout.
        let mut stalled = Raw::connect(&addr).await;
        stalled
            .send_raw(&[0, 0, 0, 100, b'{', b'"', b'v', b'"', b':'])
            .await;
        let t0 = Instant::now();
        assert!(stalled.closed().await);
        assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
        // Idle connection: closed after idle_timeout.
        let mut idle = Raw::connect(&addr).await;
        let t0 = Instant::now();
        assert!(idle.closed().await);
        assert!(t0.elapsed() >= Duration::from_millis(400));
        // The server still works.
        let a = client(&addr, 1000);
        assert_eq!(a.read("vm").await.unwrap().epoch, 0);
        srv.abort();
    })
    .await
    .expect("test budget exceeded");
}

/// A missing state file is an error unless a first start is asked for (`--init`), and
/// `--init` never overwrites a state: a lost file must not restart the epochs at 0.
#[tokio::test]
async fn a_missing_state_file_needs_init_and_init_never_overwrites() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_ft-arbiter"))
            .args(["--listen", &format!("127.0.0.1:{}", free_port())])
            .arg("--state-dir")
            .arg(dir.path())
            .arg("--insecure")
            .args(args)
            .env("RUST_LOG", "warn")
            .output()
            .unwrap()
    };
    let out = run(&[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("no arbiter state file") && err.contains("--init"),
        "{err}"
    );
    // A first start creates the state durably at once, before any request.
    let arb = ArbiterProc::start(dir.path());
    let state = dir.path().join(ft_fence::embedded::STATE_FILE);
    assert!(state.is_file(), "--init did not write the state at start");
    timeout(TEST_BUDGET, async {
        let a = client(&arb.addr, 1000);
        assert_eq!(
            a.test_and_set("vm", "a", 0)
                .await
                .unwrap()
                .won()
                .unwrap()
                .epoch,
            1
        );
    })
    .await
    .expect("test budget exceeded");
    drop(arb);
    let out = run(&["--init"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("exists") && err.contains("without --init"),
        "{err}"
    );
    // The state is intact: a restart without --init knows epoch 1.
    let arb = ArbiterProc::start_on(&format!("127.0.0.1:{}", free_port()), dir.path());
    timeout(TEST_BUDGET, async {
        assert_eq!(client(&arb.addr, 1000).read("vm").await.unwrap().epoch, 1);
    })
    .await
    .expect("test budget exceeded");
}

/// With a shared secret the arbiter answers only requests that carry its MAC: none, a
/// wrong secret, or a signed request altered on the way are refused (and the connection
/// closed) before anything changes; replies carry the MAC too, so a client with the
/// secret refuses an arbiter without it.
#[tokio::test]
async fn a_shared_secret_keeps_other_clients_out() {
    use ft_fence::embedded::proto::Signed;
    let dir = tempfile::tempdir().unwrap();
    let dir2 = tempfile::tempdir().unwrap();
    timeout(TEST_BUDGET, async {
        let key = b"0123456789abcdef-the-secret".to_vec();
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let opts = ft_fence::ServerOptions {
            init: true,
            secret: Some(key.clone()),
            ..Default::default()
        };
        let path = dir.path().to_path_buf();
        let srv = tokio::spawn(async move { ft_fence::serve_with(l, path, opts).await });
        let no_secret = client(&addr, 1000);
        let e = no_secret.test_and_set("vm", "a", 0).await.unwrap_err();
        assert!(e.to_string().contains("Unauthenticated"), "{e}");
        let wrong = secure_client(&addr, b"another secret of 16+ bytes");
        let e = wrong.test_and_set("vm", "a", 0).await.unwrap_err();
        assert!(e.to_string().contains("Unauthenticated"), "{e}");
        // A signed request whose op is changed after signing.
        let mut r = tas(1, "a", 0);
        r.sign(&key);
        r.op = Op::Release { epoch: 5 };
        let mut raw = Raw::connect(&addr).await;
        let reply = raw.call(&r).await;
        assert!(
            matches!(
                reply,
                Reply::Error {
                    code: proto::ErrorCode::Unauthenticated,
                    ..
                }
            ),
            "{reply:?}"
        );
        assert!(raw.closed().await);
        // Nothing changed; the right secret works, and its replies verify.
        let good = secure_client(&addr, &key);
        let info = good.read("vm").await.unwrap();
        assert_eq!((info.owner, info.epoch), (None, 0));
        let g = good
            .test_and_set("vm", "a", 0)
            .await
            .unwrap()
            .won()
            .unwrap();
        assert_eq!(g.epoch, 1);
        // An arbiter without the secret: its (unsigned) replies are refused.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr2 = l.local_addr().unwrap().to_string();
        let path2 = dir2.path().to_path_buf();
        let open = ft_fence::ServerOptions {
            init: true,
            ..Default::default()
        };
        let srv2 = tokio::spawn(async move { ft_fence::serve_with(l, path2, open).await });
        let e = secure_client(&addr2, &key)
            .test_and_set("vm", "a", 0)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("no valid MAC"), "{e}");
        srv.abort();
        srv2.abort();
    })
    .await
    .expect("test budget exceeded");
}

/// `ft-arbiter` never serves unauthenticated by accident: without `--secret-file` it
/// refuses to start unless told `--insecure`, and the two together are refused too. It
/// exits before it binds anything.
#[test]
fn the_arbiter_refuses_to_start_without_a_secret_unless_told_insecure() {
    let dir = tempfile::tempdir().unwrap();
    // Bounded: an arbiter that does start would serve for ever; it is killed after 10 s
    // and the test fails.
    let run = |extra: &[&str]| {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_ft-arbiter"))
            .args(["--listen", "127.0.0.1:1", "--state-dir"])
            .arg(dir.path())
            .args(["--init"])
            .args(extra)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let t0 = std::time::Instant::now();
        while child.try_wait().unwrap().is_none() {
            if t0.elapsed() > Duration::from_secs(10) {
                let _ = child.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        child.wait_with_output().unwrap()
    };
    let out = run(&[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started without a secret: {err}");
    assert!(
        err.contains("--secret-file") && err.contains("required"),
        "{err}"
    );
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "a shared secret of enough bytes\n").unwrap();
    let out = run(&["--insecure", "--secret-file", secret.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("cannot be used with"), "{err}");
    // Nothing was created.
    assert!(std::fs::read_dir(dir.path()).unwrap().count() == 1);
}

/// `ft-arbiter --metrics-listen`: requests by operation and answer, refused requests,
/// durable writes, and each VM's epoch, owner, follower and lease, as Prometheus reads
/// them (parsed with prometheus-parse).
#[tokio::test]
async fn the_metrics_show_requests_and_each_vms_record() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    timeout(TEST_BUDGET, async {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let m = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (addr, maddr) = (l.local_addr().unwrap().to_string(), m.local_addr().unwrap());
        let opts = ft_fence::ServerOptions {
            init: true,
            secret: Some(b"0123456789abcdef".to_vec()),
            ..Default::default()
        };
        let path = dir.path().to_path_buf();
        let srv = tokio::spawn(ft_fence::serve_with_metrics(l, path, opts, Some(m)));
        let a = secure_client(&addr, b"0123456789abcdef");
        let g = a.test_and_set("vm1", "a", 0).await.unwrap().won().unwrap();
        a.pair("vm1", "a", g.epoch, "b").await.unwrap();
        a.renew("vm1", "a", g.epoch).await.unwrap();
        let b = secure_client(&addr, b"0123456789abcdef");
        assert!(b.test_and_set("vm1", "c", 0).await.unwrap().won().is_none());
        // Another secret: refused as unauthenticated.
        let forger = secure_client(&addr, b"fedcba9876543210");
        assert!(forger.read("vm1").await.is_err());

        let mut c = tokio::net::TcpStream::connect(maddr).await.unwrap();
        c.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut text = String::new();
        c.read_to_string(&mut text).await.unwrap();
        let body = text.split("\r\n\r\n").nth(1).unwrap();
        let scrape =
            prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).unwrap();
        let value = |name: &str, labels: &[(&str, &str)]| -> f64 {
            let s = scrape
                .samples
                .iter()
                .find(|s| {
                    s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v))
                })
                .unwrap_or_else(|| panic!("no {name}{labels:?} in:\n{body}"));
            match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => panic!("{name}: {:?}", s.value),
            }
        };
        let req = |op, answer| {
            value(
                "ft_arbiter_requests_total",
                &[("op", op), ("answer", answer)],
            )
        };
        assert_eq!(req("test_and_set", "won"), 1.0);
        assert_eq!(req("test_and_set", "held"), 1.0);
        assert_eq!(req("pair", "paired"), 1.0);
        assert_eq!(req("renew", "renewed"), 1.0);
        assert_eq!(value("ft_arbiter_unauthenticated_requests_total", &[]), 1.0);
        assert!(value("ft_arbiter_state_writes_total", &[]) >= 2.0);
        assert_eq!(
            value("ft_arbiter_vm_epoch", &[("vm", "vm1")]),
            g.epoch as f64
        );
        assert_eq!(
            value("ft_arbiter_vm_owner", &[("vm", "vm1"), ("node", "a")]),
            1.0
        );
        assert_eq!(
            value("ft_arbiter_vm_follower", &[("vm", "vm1"), ("node", "b")]),
            1.0
        );
        let left = value("ft_arbiter_vm_lease_remaining_seconds", &[("vm", "vm1")]);
        assert!(left > 0.0, "{left}");
        srv.abort();
    })
    .await
    .expect("test budget exceeded");
}
