//! Tests of the testbed fixture itself (no data plane loaded). Run as root:
//! `CARGO_TARGET_DIR=/work/target-testbed cargo test -p ft-testbed`

use ft_testbed::names::*;
use ft_testbed::netns::list_netns;
use ft_testbed::packet::ethertype;
use ft_testbed::*;
use std::net::SocketAddr;
use std::time::Duration;

const T: Duration = Duration::from_secs(2);

fn no_standins() -> TestbedOptions {
    TestbedOptions {
        start_standins: false,
        ..Default::default()
    }
}

/// Request with a few retries (first packets may wait for ARP).
fn req(c: &UdpClient, msg: &str) -> String {
    for _ in 0..3 {
        if let Some(r) = c.request(msg, T).expect("request") {
            return r;
        }
    }
    panic!("no reply to {msg:?} from {}", c.target());
}

#[test]
fn topology_is_present() {
    let tb = Testbed::new(no_standins()).unwrap();
    let all = list_netns().unwrap();
    for ns in [
        &tb.client_ns,
        &tb.arbiter_ns,
        &tb.wire_ns,
        &tb.a.ns,
        &tb.b.ns,
        &tb.a.vm_ns,
        &tb.b.vm_ns,
    ] {
        assert!(all.contains(ns), "{ns} missing");
        assert!(ns.starts_with(&tb.prefix));
    }
    assert_eq!(mac(&tb.a.vm_ns, VM_IF).unwrap(), VM_MAC);
    assert_eq!(mac(&tb.b.vm_ns, VM_IF).unwrap(), VM_MAC);
    for h in [&tb.a, &tb.b] {
        assert_ne!(h.cli_mac, [0; 6]);
        assert_ne!(h.log_mac, [0; 6]);
        assert_eq!(h.cli_ifindex, ifindex(&h.ns, CLI_IF).unwrap());
        let link = ip(&h.ns, &["-d", "link", "show", LOG_IF]).unwrap();
        assert!(
            link.contains("mtu 2000") && link.contains("numrxqueues 1"),
            "{link}"
        );
        let addr = ip(&h.ns, &["-4", "addr", "show"]).unwrap();
        assert!(addr.contains(&format!("{}/24", h.cli_ip)), "{addr}");
        assert!(addr.contains(&format!("{}/24", h.log_ip)), "{addr}");
        let vaddr = ip(&h.vm_ns, &["addr", "show", VM_IF]).unwrap();
        assert!(
            vaddr.contains("10.77.0.100/24") && !vaddr.contains("inet6"),
            "{vaddr}"
        );
        let k = ns_exec(&h.vm_ns, "ethtool", &["-k", VM_IF]).unwrap();
        assert!(
            k.contains("tx-checksumming: off") && k.contains("generic-receive-offload: on"),
            "{k}"
        );
    }
    let br = ip(&tb.client_ns, &["link", "show", "master", BRIDGE]).unwrap();
    for p in [BR_PORT_A, BR_PORT_B, BR_PORT_R] {
        assert!(br.contains(&format!("{p}@")), "{br}");
    }
    assert!(tb.wire_rules().unwrap().contains("hook forward"));
    assert!(
        ft_testbed::ip(&tb.wire_ns, &["link", "show", "la"])
            .unwrap()
            .contains("master wbr")
    );
}

#[test]
fn bridge_forwards_client_to_arbiter() {
    let tb = Testbed::new(no_standins()).unwrap();
    let target: SocketAddr = (ARBITER_IP, 9000).into();
    let _echo = spawn_udp_echo(&tb.arbiter_ns, target, Duration::from_secs(10)).unwrap();
    let c = UdpClient::new(&tb.client_ns, target).unwrap();
    assert_eq!(req(&c, "hello"), "hello");
    let (r, rtt) = c.request_timed("again", T).unwrap().expect("reply");
    assert_eq!(r, "again");
    assert!(rtt < T);
    // Host A also reaches the arbiter through the bridge.
    let ca = UdpClient::new(&tb.a.ns, target).unwrap();
    assert_eq!(req(&ca, "from-a"), "from-a");
}

fn log_frames(tb: &Testbed, n: u32, tag: u8) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| {
            let mut p = vec![tag];
            p.extend_from_slice(&i.to_be_bytes());
            p.resize(60, 0);
            eth_frame(tb.a.log_mac, tb.b.log_mac, LOG_ETHERTYPE, &p)
        })
        .collect()
}

fn seqs(frames: &[(u64, Vec<u8>)], tag: u8) -> Vec<u32> {
    frames
        .iter()
        .filter(|(_, f)| ethertype(f) == Some(LOG_ETHERTYPE) && f[14] == tag)
        .map(|(_, f)| u32::from_be_bytes(f[15..19].try_into().unwrap()))
        .collect()
}

#[test]
fn wire_forwards_with_deterministic_loss() {
    let tb = Testbed::new(no_standins()).unwrap();
    let tx = RawSock::open(&tb.a.ns, LOG_IF).unwrap();

    // Lossless.
    let cap = Capture::start(&tb.b.ns, LOG_IF).unwrap();
    for f in log_frames(&tb, 20, 1) {
        tx.send(&f).unwrap();
    }
    cap.wait_for(20, T);
    let got = seqs(&cap.stop(), 1);
    assert_eq!(got, (0..20).collect::<Vec<_>>());

    // Every 4th dropped (A->B only).
    tb.set_log_loss(Some(4)).unwrap();
    let cap = Capture::start(&tb.b.ns, LOG_IF).unwrap();
    for f in log_frames(&tb, 20, 2) {
        tx.send(&f).unwrap();
    }
    cap.wait_for(15, T);
    let got = cap.stop_when_quiet(Duration::from_millis(100), T).unwrap();
    let expect: Vec<u32> = (0..20).filter(|i| (i + 1) % 4 != 0).collect();
    assert_eq!(seqs(&got.frames, 2), expect);

    // B->A: the same loss (acks and nacks are lost too).
    let txb = RawSock::open(&tb.b.ns, LOG_IF).unwrap();
    let rxa = RawSock::open(&tb.a.ns, LOG_IF).unwrap();
    let back = eth_frame(tb.b.log_mac, tb.a.log_mac, LOG_ETHERTYPE, &[3; 46]);
    for _ in 0..8 {
        txb.send(&back).unwrap();
    }
    let mut n = 0;
    while let Some(f) = rxa.recv(Duration::from_millis(300)).unwrap() {
        if f == back {
            n += 1;
        }
    }
    assert_eq!(n, 6, "every 4th of 8 frames B->A dropped");

    // Link down: nothing passes; back up: passes again.
    tb.set_log_loss(None).unwrap();
    tb.set_log_link_down(true).unwrap();
    let cap = Capture::start(&tb.b.ns, LOG_IF).unwrap();
    for f in log_frames(&tb, 10, 4) {
        tx.send(&f).unwrap();
    }
    std::thread::sleep(Duration::from_millis(100));
    assert!(seqs(&cap.stop(), 4).is_empty());
    tb.set_log_link_down(false).unwrap();

    // Blast 50k frames through the wire and capture all of them.
    let frames = log_frames(&tb, 50_000, 5);
    let cap = Capture::start(&tb.b.ns, LOG_IF).unwrap();
    let t_blast = monotonic_ns();
    let st = blast(&tb.a.ns, LOG_IF, &frames, None).unwrap();
    assert_eq!(st.sent, 50_000);
    cap.wait_for(50_000, Duration::from_secs(10));
    let res = cap.stop_when_quiet(Duration::from_millis(100), T).unwrap();
    let got = seqs(&res.frames, 5);
    eprintln!(
        "blast: {} frames in {:?}, captured {} (kernel drops {})",
        st.sent,
        st.elapsed,
        got.len(),
        res.kernel_drops
    );
    assert_eq!(got.len(), 50_000, "kernel drops {}", res.kernel_drops);
    // Kernel timestamps, on the CLOCK_MONOTONIC scale (not strictly ordered under load).
    let now = monotonic_ns();
    assert!(
        res.frames
            .iter()
            .all(|(t, _)| *t + 1_000_000 >= t_blast && *t <= now)
    );

    // Paced blast: 2000 frames at 20k fps takes ~100 ms.
    let st = blast(&tb.a.ns, LOG_IF, &frames[..2000], Some(20_000)).unwrap();
    assert!(st.elapsed >= Duration::from_millis(90), "{:?}", st.elapsed);
}

fn vm_via_vmh(tb: &Testbed, h: &Host) -> UdpClient {
    ip(&h.ns, &["addr", "add", "10.77.0.50/32", "dev", VMH_IF]).unwrap();
    ip(
        &h.ns,
        &[
            "route",
            "add",
            "10.77.0.100/32",
            "dev",
            VMH_IF,
            "src",
            "10.77.0.50",
        ],
    )
    .unwrap();
    let _ = tb;
    UdpClient::bind(
        &h.ns,
        "10.77.0.50:0".parse().unwrap(),
        (VM_IP, STANDIN_PORT).into(),
    )
    .unwrap()
}

#[test]
fn standins_reachable_and_deterministic() {
    let tb = Testbed::new(TestbedOptions::default()).unwrap();
    let ca = vm_via_vmh(&tb, &tb.a);
    let cb = vm_via_vmh(&tb, &tb.b);
    let script = [
        "SET k v1",
        "INCR n",
        "INCR n",
        "SET x hello world",
        "GET x",
        "GET nope",
        "ECHO hi",
        "BOGUS",
    ];
    let expect = ["OK", "1", "2", "OK", "hello world", "NIL", "hi"];
    assert_eq!(req(&ca, "PING"), "PONG");
    assert_eq!(req(&cb, "PING"), "PONG");
    let empty = req(&ca, "STATE");
    for (i, m) in script.iter().enumerate() {
        let ra = req(&ca, m);
        let rb = req(&cb, m);
        assert_eq!(ra, rb);
        match expect.get(i) {
            Some(e) => assert_eq!(&ra, e),
            None => assert!(ra.starts_with("ERR"), "{ra}"),
        }
    }
    let (sa, sb) = (req(&ca, "STATE"), req(&cb, "STATE"));
    assert_eq!(sa, sb);
    assert_ne!(sa, empty);
    req(&cb, "INCR n");
    assert_ne!(req(&cb, "STATE"), sa);
    // Replies come from the VM address/MAC.
    let cap = Capture::start(&tb.a.ns, VMH_IF).unwrap();
    assert_eq!(req(&ca, "PING"), "PONG");
    let frames = cap
        .stop_when_quiet(Duration::from_millis(50), T)
        .unwrap()
        .frames;
    let reply = frames
        .iter()
        .find_map(|(_, f)| {
            parse_udp(f)
                .filter(|u| u.2 == STANDIN_PORT)
                .map(|_| f.clone())
        })
        .expect("reply frame");
    assert_eq!(&reply[6..12], &VM_MAC);
    assert!(udp_checksums_ok(&reply), "VM must emit complete checksums");
    // Stand-in logs, pause/resume.
    let s = tb.standin_a.as_ref().unwrap();
    assert!(s.log_contents().contains("SET k v1"));
    s.pause().unwrap();
    assert_eq!(
        ca.request("PING", Duration::from_millis(200)).unwrap(),
        None
    );
    s.resume().unwrap();
    assert_eq!(req(&ca, "PING"), "PONG");
    s.kill().unwrap();
    assert!(s.wait_exit(T).unwrap().is_some());
}

#[test]
fn teardown_even_after_panic_and_stale_cleanup() {
    let names = std::sync::Mutex::new(Vec::new());
    let tmp = std::sync::Mutex::new(None);
    let r = std::panic::catch_unwind(|| {
        let tb = Testbed::new(TestbedOptions::default()).unwrap();
        names
            .lock()
            .unwrap()
            .extend(tb.namespaces().iter().cloned());
        *tmp.lock().unwrap() = Some(tb.tmp_dir.clone());
        let child = tb.spawn(&tb.client_ns, "sleep", ["30"]).unwrap();
        assert!(child.is_running());
        panic!("intentional panic inside a testbed (expected in test output)");
    });
    assert!(r.is_err());
    let names = names.into_inner().unwrap();
    assert_eq!(names.len(), 7);
    let all = list_netns().unwrap();
    for n in &names {
        assert!(!all.contains(n), "{n} left behind");
    }
    // Logs are kept after a panic (on purpose); this panic was intentional, so clean up.
    let tmp = tmp.into_inner().unwrap().expect("tmp dir");
    assert!(tmp.exists());
    let _ = std::fs::remove_dir_all(&tmp);
    // A namespace named after a dead pid is removed by cleanup_stale / Testbed::new.
    let stale = "ft999999999x0c";
    let _ = ft_testbed::netns::run_cmd("ip", &["netns", "add", stale]);
    cleanup_stale();
    assert!(!list_netns().unwrap().iter().any(|n| n == stale));
}

/// Stress: 200k frames A.log0 -> B.log0 captured completely.
/// `cargo test -p ft-testbed --release -- --ignored stress`
#[test]
#[ignore]
fn stress_blast_200k() {
    let tb = Testbed::new(no_standins()).unwrap();
    let frames = log_frames(&tb, 200_000, 6);
    let cap = Capture::start(&tb.b.ns, LOG_IF).unwrap();
    let t0 = monotonic_ns();
    let st = blast(&tb.a.ns, LOG_IF, &frames, None).unwrap();
    cap.wait_for(200_000, Duration::from_secs(20));
    let res = cap
        .stop_when_quiet(Duration::from_millis(200), Duration::from_secs(5))
        .unwrap();
    let got = seqs(&res.frames, 6);
    eprintln!(
        "stress: sent {} in {:?}, captured {} (kernel drops {}), first ts +{} us",
        st.sent,
        st.elapsed,
        got.len(),
        res.kernel_drops,
        (res.frames[0].0.saturating_sub(t0)) / 1000
    );
    assert_eq!(got, (0..200_000).collect::<Vec<_>>());
}
