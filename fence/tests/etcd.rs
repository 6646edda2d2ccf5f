//! etcd backend against real etcd processes (single member and a 3-member cluster).
//! These tests FAIL (never skip) when the etcd binary is missing.
mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{TEST_BUDGET, etcd, eventually, pairing_scenario, race_rounds};
use ft_fence::testkit::free_port;
use ft_fence::{Arbiter, EtcdArbiter, FenceError, TasOutcome};
use tokio::time::timeout;

fn client(endpoints: Vec<String>, lease: Duration) -> Arc<dyn Arbiter> {
    Arc::new(EtcdArbiter::new(
        endpoints,
        "/ft-fence-test/",
        lease,
        Duration::from_secs(3),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_race_exactly_one_winner() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = etcd(1, dir.path());
    timeout(TEST_BUDGET, async {
        let a = client(cluster.endpoints(), Duration::from_secs(3));
        let b = client(cluster.endpoints(), Duration::from_secs(3));
        let last = race_rounds(a, b, "vm-race", 60).await;
        assert_eq!(last, 60);
    })
    .await
    .expect("test budget exceeded");
}

/// The owner's paired follower takes over at once; an owner going solo races it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paired_follower_takes_over_at_once_and_races_a_solo_owner() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = etcd(1, dir.path());
    timeout(TEST_BUDGET, async {
        let c = || client(cluster.endpoints(), Duration::from_secs(3));
        pairing_scenario(c(), c(), c(), "vm-pair", 30).await;
    })
    .await
    .expect("test budget exceeded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_blocks_until_expiry_and_old_owner_is_fenced() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = etcd(1, dir.path());
    timeout(TEST_BUDGET, async {
        let lease = Duration::from_secs(1);
        let a = client(cluster.endpoints(), lease);
        let b = client(cluster.endpoints(), lease);
        let g = a.test_and_set("vm", "a", 0).await.unwrap().won().unwrap();
        assert_eq!(g.epoch, 1);
        match b.test_and_set("vm", "b", 1).await.unwrap() {
            TasOutcome::Held {
                owner,
                epoch,
                lease_remaining,
            } => {
                assert_eq!((owner.as_str(), epoch), ("a", 1));
                assert!(lease_remaining > Duration::ZERO);
            }
            o => panic!("expected Held, got {o:?}"),
        }
        assert!(matches!(
            b.test_and_set("vm", "b", 0).await.unwrap(),
            TasOutcome::Held { .. } | TasOutcome::Stale { .. }
        ));
        assert!(matches!(
            a.test_and_set("vm", "a", 0).await.unwrap(),
            TasOutcome::Stale { epoch: 1, .. }
        ));
        // Renew keeps it; the old epoch is fenced after a self re-take.
        a.renew("vm", "a", 1).await.unwrap();
        let g2 = a.test_and_set("vm", "a", 1).await.unwrap().won().unwrap();
        assert_eq!(g2.epoch, 2);
        assert!(a.renew("vm", "a", 1).await.unwrap_err().is_fenced());
        a.renew("vm", "a", 2).await.unwrap();
        let t0 = Instant::now();
        let won = eventually(Duration::from_secs(10), Duration::from_millis(100), || {
            let b = b.clone();
            async move { b.test_and_set("vm", "b", 2).await.unwrap().won() }
        })
        .await
        .expect("b never won after a's lease expired");
        assert_eq!(won.epoch, 3);
        assert!(
            t0.elapsed() >= Duration::from_millis(900),
            "took over before the lease expired"
        );
        let e = a.renew("vm", "a", 2).await.unwrap_err();
        assert!(e.is_fenced(), "{e}");
        let info = a.read("vm").await.unwrap();
        assert_eq!((info.owner.as_deref(), info.epoch), (Some("b"), 3));
        b.release("vm", "b", 3).await.unwrap();
        b.release("vm", "b", 3).await.unwrap(); // idempotent
        let info = a.read("vm").await.unwrap();
        assert_eq!((info.owner, info.epoch), (None, 3));
    })
    .await
    .expect("test budget exceeded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_member_cluster_keeps_fencing_with_one_member_killed() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = etcd(3, dir.path());
    timeout(TEST_BUDGET, async {
        let lease = Duration::from_secs(2);
        let eps = cluster.endpoints();
        let a = client(eps.clone(), lease);
        let b = client(eps.clone(), lease);
        let g = a.test_and_set("vm", "a", 0).await.unwrap().won().unwrap();
        race_rounds(a.clone(), b.clone(), "vm-race3", 5).await;

        // Kill the leader (the hardest single failure: needs an election).
        let leader = leader_index(&eps).await;
        eprintln!("killing leader {}", cluster.members[leader].name);
        cluster.members[leader].kill();
        let dead = eps[leader].clone();
        let live: Vec<String> = eps.iter().filter(|e| **e != dead).cloned().collect();
        let killed = Instant::now();

        // With 2 of 3 left: renew keeps working (allow time for a leader election).
        eventually(Duration::from_secs(10), Duration::from_millis(100), || {
            let a = a.clone();
            async move { a.renew("vm", "a", g.epoch).await.ok() }
        })
        .await
        .expect("renew never succeeded with 2 of 3 members");
        eprintln!("renew ok {:?} after the kill", killed.elapsed());
        // Fencing still holds: b cannot take a's VM.
        match b.test_and_set("vm", "b", g.epoch).await.unwrap() {
            TasOutcome::Held { owner, .. } => assert_eq!(owner, "a"),
            o => panic!("b must not win while a holds the lease: {o:?}"),
        }
        // Hand-off and exactly-one-winner races still work.
        a.release("vm", "a", g.epoch).await.unwrap();
        let g2 = b
            .test_and_set("vm", "b", g.epoch)
            .await
            .unwrap()
            .won()
            .unwrap();
        assert_eq!(g2.epoch, g.epoch + 1);
        b.release("vm", "b", g2.epoch).await.unwrap();
        let last = race_rounds(a.clone(), b.clone(), "vm-race3", 10).await;
        assert_eq!(last, 15);

        // Clients that only know the dead member and one live one still work.
        let c = client(vec![dead.clone(), live[0].clone()], lease);
        let info = eventually(Duration::from_secs(10), Duration::from_millis(100), || {
            let c = c.clone();
            async move { c.read("vm").await.ok() }
        })
        .await
        .expect("client with a dead endpoint in its list never succeeded");
        assert_eq!(info.epoch, g2.epoch);

        // Kill a second member: no quorum, so nobody can go live, and the error says so.
        let second = cluster
            .members
            .iter()
            .position(|m| m.endpoint() == live[0])
            .unwrap();
        cluster.members[second].kill();
        let e = b.test_and_set("vm", "b", g2.epoch).await.unwrap_err();
        assert!(
            matches!(e, FenceError::Etcd { .. } | FenceError::Timeout { .. }),
            "{e:?}"
        );
        assert!(e.to_string().contains("will not go live"), "{e}");
    })
    .await
    .expect("test budget exceeded");
}

#[tokio::test]
async fn unreachable_etcd_means_nobody_goes_live() {
    // Fail loudly if etcd is missing, like the other etcd tests.
    ft_fence::testkit::etcd_binary().unwrap_or_else(|e| panic!("{e}"));
    timeout(TEST_BUDGET, async {
        let ep = format!("127.0.0.1:{}", free_port());
        let a = Arc::new(EtcdArbiter::new(
            vec![ep.clone()],
            "/ft-fence-test/",
            Duration::from_secs(3),
            Duration::from_millis(500),
        ));
        let t0 = Instant::now();
        let e = a.test_and_set("vm", "a", 0).await.unwrap_err();
        assert!(t0.elapsed() < Duration::from_secs(3));
        assert!(
            matches!(e, FenceError::Etcd { .. } | FenceError::Timeout { .. }),
            "{e:?}"
        );
        let msg = e.to_string();
        assert!(
            msg.contains(&ep) && msg.contains("will not go live"),
            "{msg}"
        );
    })
    .await
    .expect("test budget exceeded");
}

/// Index (in `eps`) of the current raft leader.
async fn leader_index(eps: &[String]) -> usize {
    for _ in 0..50 {
        for (i, ep) in eps.iter().enumerate() {
            let Ok(mut c) = etcd_client::Client::connect([ep], None).await else {
                continue;
            };
            if let Ok(Ok(st)) = timeout(Duration::from_secs(1), c.status()).await
                && st.leader() != 0
                && st.header().map(|h| h.member_id()) == Some(st.leader())
            {
                return i;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no etcd leader found");
}
