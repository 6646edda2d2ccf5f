//! End-to-end tests of the data plane on the namespace testbed: real kernel, real XDP/tc,
//! real daemons (`ftd`) on two hosts. Run as root after `cargo build --bins`.
use std::{net::Ipv4Addr, time::Duration};

use ft_common::{siphash::SipKey, wire::*};
use ft_testbed::{
    Appliance, ApplianceOptions, Capture, RawSock, Testbed, TestbedOptions, UdpClient, blast,
    names::*, parse_udp, udp_frame,
};
use zerocopy::IntoBytes;

const T: Duration = Duration::from_secs(2);

/// These tests measure delivery under paced load on a 2-core machine: run them one at a
/// time so that one test's 100k-frame burst does not starve another's backup.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn standin_state(vm_ns: &str) -> String {
    let c = UdpClient::new(vm_ns, ([127, 0, 0, 1], STANDIN_PORT).into()).unwrap();
    c.request("STATE", T)
        .unwrap()
        .expect("stand-in answers STATE on loopback")
}

fn setup(o: ApplianceOptions) -> (Testbed, Appliance, UdpClient) {
    let tb = Testbed::new(TestbedOptions {
        quiet_standins: true,
        ..Default::default()
    })
    .unwrap();
    let app = Appliance::start(&tb, &o).unwrap();
    let c = tb.vm_client().unwrap();
    // Warm up: ARP for the VM resolved, one request through the whole path.
    assert_eq!(
        c.request("PING", T).unwrap().as_deref(),
        Some("PONG"),
        "warm-up request"
    );
    (tb, app, c)
}

/// A logging-link frame as the backup's daemon makes it: the backup's kinds (ack, nack,
/// VMNACK, LEAVE) carry their tag under `key` (the testbed's channel key, or another one
/// to forge).
fn ft_frame(
    key: &SipKey,
    src: [u8; 6],
    dst: [u8; 6],
    kind: u8,
    session: u64,
    epoch: u64,
    seq: u64,
) -> Vec<u8> {
    let mut ft = FtHdr::new(kind, session, epoch, seq);
    // The key it is under (wire v4: receivers check with the key a frame names).
    ft.key_id = key_id(key);
    ft.key_adv = ft.key_id;
    let tagged = kind_is_tagged(kind);
    if tagged {
        ft.len.set(TAG_LEN as u16);
    }
    let hdr = LogHdr {
        eth: EthHdr::ft(dst, src),
        ft,
    };
    let mut v = hdr.as_bytes().to_vec();
    if tagged {
        v.extend_from_slice(&frame_tag(key, &ft).to_be_bytes());
    }
    v.resize(v.len().max(60), 0);
    v
}

/// The testbed's channel key (both hosts' `[channel] key_file`).
fn testbed_key(tb: &Testbed) -> SipKey {
    SipKey::from_bytes(&ft_testbed::appliance::channel_key(tb).unwrap())
}

#[test]
fn request_reply_replicated_to_backup() {
    let _serial = serial();
    let (tb, app, c) = setup(ApplianceOptions::default());
    assert_eq!(c.request("SET k 41", T).unwrap().as_deref(), Some("OK"));
    assert_eq!(c.request("INCR k", T).unwrap().as_deref(), Some("42"));
    assert_eq!(c.request("GET k", T).unwrap().as_deref(), Some("42"));
    // The backup's replica received the same inputs in the same order.
    assert!(Appliance::wait_until(T, || standin_state(&tb.a.vm_ns)
        == standin_state(&tb.b.vm_ns)));
    assert!(app.counter('a', "log_duplicated_frames_total").unwrap() >= 4);
    assert!(app.counter('a', "output_released_frames_total").unwrap() >= 4);
    assert!(app.counter('b', "log_received_frames_total").unwrap() >= 4);
    assert!(
        app.counter('b', "vm_output_suppressed").unwrap() >= 4,
        "backup replica replied, suppressed"
    );
}

/// The output rule: while no ack can come back (the logging link is down), the reply
/// stays held in the primary's kernel and is not seen on the client network; it is
/// released as soon as the link is back (the log frame is repaired, then acked).
#[test]
fn reply_held_until_backup_acks() {
    let _serial = serial();
    let (tb, app, c) = setup(ApplianceOptions::default());
    let cap = Capture::start(&tb.client_ns, BRIDGE).unwrap();
    tb.set_log_link_down(true).unwrap();
    c.send("INCR held").unwrap();
    let during = c.recv(Duration::from_millis(700)).unwrap();
    assert!(
        during.is_none(),
        "reply escaped before the backup acked: {during:?}"
    );
    assert!(
        app.held('a').unwrap() >= 1,
        "reply should sit in the hold ring"
    );
    let seen_during = cap.stop();
    let vm_frames = seen_during
        .iter()
        .filter(|(_, f)| f[6..12] == VM_MAC)
        .count();
    assert_eq!(
        vm_frames, 0,
        "no frame from the VM may reach the client network while unacked"
    );

    let t0 = std::time::Instant::now();
    tb.set_log_link_down(false).unwrap();
    let (reply, _) = c.recv(T).unwrap().expect("reply released once acks resume");
    assert_eq!(reply, "1");
    assert!(
        t0.elapsed() < Duration::from_secs(1),
        "released promptly: {:?}",
        t0.elapsed()
    );
    assert_eq!(app.held('a').unwrap(), 0);
}

/// Acks from the kernel: with the backup's daemon frozen (SIGSTOP, every thread), its XDP
/// still buffers each log frame in the ring and acks it, so the reply is released at
/// once; the daemon, resumed, drains the ring and delivers the frame. With
/// `kernel_acks = false` (the daemon sends every ack) the same reply stays held until
/// the daemon runs again: the comparison shows the acks really come from the kernel.
#[test]
fn replies_released_while_the_backups_daemon_is_frozen_only_with_kernel_acks() {
    let _serial = serial();
    for kernel_acks in [true, false] {
        let (tb, app, c) = setup(ApplianceOptions {
            kernel_acks,
            ..Default::default()
        });
        assert_eq!(c.request("INCR k", T).unwrap().as_deref(), Some("1"));
        app.pause('b').unwrap();
        c.send("INCR k").unwrap();
        let during = c.recv(Duration::from_millis(700)).unwrap();
        if kernel_acks {
            let (reply, _) = during.expect("released by the backup's kernel ack");
            assert_eq!(reply, "2");
        } else {
            assert!(
                during.is_none(),
                "released without the daemon's ack: {during:?}"
            );
            assert!(app.held('a').unwrap() >= 1);
        }
        app.resume('b').unwrap();
        if !kernel_acks {
            let (reply, _) = c.recv(T).unwrap().expect("released once the daemon acks");
            assert_eq!(reply, "2");
        }
        // The backup's replica got the frame from the ring.
        assert!(Appliance::wait_until(T, || standin_state(&tb.a.vm_ns)
            == standin_state(&tb.b.vm_ns)));
        let sent = app.counter('b', "kernel_acks_sent_total").unwrap();
        if kernel_acks {
            assert!(sent >= 1, "no kernel ack counted");
        } else {
            assert_eq!(sent, 0);
        }
    }
}

fn burst_frames(n: u32) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| {
            udp_frame(
                [2, 0, 0, 0, 0, 1],
                VM_MAC,
                Ipv4Addr::new(10, 77, 0, 1),
                VM_IP,
                40000,
                9, // discard: no listener, so the VM sends no reply per frame
                &i.to_be_bytes(),
            )
        })
        .collect()
}

/// Sequence numbers (payload) of burst frames seen in a capture, in capture order.
fn burst_ids(frames: &[(u64, Vec<u8>)]) -> Vec<u32> {
    frames
        .iter()
        .filter_map(|(_, f)| parse_udp(f))
        .filter(|(_, _, sport, dport, p)| *sport == 40000 && *dport == 9 && p.len() == 4)
        .map(|(_, _, _, _, p)| u32::from_be_bytes(p.try_into().unwrap()))
        .collect()
}

fn burst_test(loss_every: Option<u32>) {
    const N: u32 = 100_000;
    let (tb, app, c) = setup(ApplianceOptions::default());
    tb.set_log_loss(loss_every).unwrap();
    let cap_b = Capture::start(&tb.b.vm_ns, VM_IF).unwrap();
    let cap_a = Capture::start(&tb.a.vm_ns, VM_IF).unwrap();
    let frames = burst_frames(N);
    // Paced, and in chunks that wait while the backup lags (like a client's flow control),
    // so that a slow or loaded machine never reaches the primary's back-pressure; the
    // back-pressure drops are asserted zero below.
    for chunk in frames.chunks(5000) {
        let caught_up = Appliance::wait_until(Duration::from_secs(20), || {
            let s = app.status('a').unwrap();
            let (last, acked) = (
                s["log"]["last_seq"].as_u64().unwrap(),
                s["log"]["acked"].as_u64().unwrap(),
            );
            last - acked < 4000
        });
        assert!(
            caught_up,
            "backup never caught up\nprimary: {:#}\nbackup: {:#}",
            app.status('a').unwrap(),
            app.status('b').unwrap()
        );
        blast(&tb.client_ns, BRIDGE, chunk, Some(30_000)).unwrap();
    }
    assert!(
        cap_b.wait_for(N as u64, Duration::from_secs(60)) >= N as u64,
        "backup replica got {} of {N}\nprimary: {:#}\nbackup: {:#}",
        cap_b.count(),
        app.status('a').unwrap(),
        app.status('b').unwrap()
    );
    cap_a.wait_for(N as u64, Duration::from_secs(10));
    let got_b = burst_ids(&cap_b.stop());
    let got_a = burst_ids(&cap_a.stop());
    assert_eq!(
        app.counter('a', "log_window_full").unwrap(),
        0,
        "no back-pressure drops at this pace"
    );
    let want: Vec<u32> = (0..N).collect();
    assert_eq!(got_a.len(), N as usize, "primary's VM got every frame");
    assert!(
        got_b == want,
        "backup: every frame exactly once, in order (got {} frames)",
        got_b.len()
    );
    if let Some(every) = loss_every {
        let retx = app.counter('a', "log_retransmitted_frames_total").unwrap();
        assert!(
            retx >= (N / every) as u64,
            "gaps repaired by retransmission: {retx}"
        );
        assert!(app.counter('b', "log_received_retransmits_total").unwrap() > 0);
    }
    // Acked output still flows, in order, over the lossy link.
    for i in 1..=20u32 {
        assert_eq!(
            c.request("INCR after", T).unwrap(),
            Some(i.to_string()),
            "reply {i}"
        );
    }
    assert!(Appliance::wait_until(T, || standin_state(&tb.a.vm_ns)
        == standin_state(&tb.b.vm_ns)));
}

#[test]
fn burst_100k_reaches_backup_exactly_once_in_order() {
    let _serial = serial();
    burst_test(None);
}

#[test]
fn burst_100k_over_lossy_log_link_is_repaired() {
    let _serial = serial();
    burst_test(Some(50));
}

/// Every bad input of the list, injected while a reply is held: each is dropped
/// and counted, and none releases the reply.
#[test]
fn bad_acks_and_frames_never_release_output() {
    let _serial = serial();
    // The backup's daemon sends every ack, so pausing it holds the reply.
    let (tb, app, c) = setup(ApplianceOptions {
        kernel_acks: false,
        ..Default::default()
    });
    app.pause('b').unwrap();
    c.send("INCR guarded").unwrap();
    assert!(Appliance::wait_until(T, || app.held('a').unwrap() >= 1));
    let st = app.status('a').unwrap();
    let last = st["log"]["last_seq"].as_u64().unwrap();
    let (a_log, b_log) = (tb.a.log_mac, tb.b.log_mac);
    let ses = app.session('a').unwrap();
    let wire = RawSock::open(&tb.wire_ns, WIRE_A).unwrap(); // faces host A's logging NIC
    let client = RawSock::open(&tb.client_ns, BRIDGE).unwrap();
    // Every frame below has the right tag: each is dropped for its own reason.
    let key = testbed_key(&tb);
    let ft_frame =
        |src, dst, kind, session, epoch, seq| ft_frame(&key, src, dst, kind, session, epoch, seq);

    let mut truncated = ft_frame(b_log, a_log, KIND_ACK, ses, 1, last);
    truncated.truncate(ETH_HLEN + 10);
    let mut bad_magic = ft_frame(b_log, a_log, KIND_ACK, ses, 1, last);
    bad_magic[ETH_HLEN] = 0;
    let cases: Vec<(&str, &RawSock, Vec<u8>, &str)> = vec![
        (
            "ack from the client NIC",
            &client,
            ft_frame(b_log, tb.a.cli_mac, KIND_ACK, ses, 1, last),
            "ft_frame_on_client_nic",
        ),
        (
            "ack from a wrong peer MAC",
            &wire,
            ft_frame([2, 9, 9, 9, 9, 9], a_log, KIND_ACK, ses, 1, last),
            "wrong_peer_mac",
        ),
        (
            "ack to a wrong destination",
            &wire,
            ft_frame(b_log, [2, 8, 8, 8, 8, 8], KIND_ACK, ses, 1, last),
            "wrong_peer_mac",
        ),
        (
            "ack of an old epoch",
            &wire,
            ft_frame(b_log, a_log, KIND_ACK, ses, 0, last),
            "wrong_epoch",
        ),
        (
            "ack of a future epoch",
            &wire,
            ft_frame(b_log, a_log, KIND_ACK, ses, 2, last),
            "wrong_epoch",
        ),
        (
            "ack of another primary session (an earlier run)",
            &wire,
            ft_frame(b_log, a_log, KIND_ACK, ses ^ 1, 1, last),
            "wrong_session",
        ),
        (
            "ack beyond what was sent",
            &wire,
            ft_frame(b_log, a_log, KIND_ACK, ses, 1, last + 1000),
            "ack_beyond_sent",
        ),
        ("truncated header", &wire, truncated, "malformed"),
        ("bad magic", &wire, bad_magic, "malformed"),
        (
            "nack beyond what was sent",
            &wire,
            ft_frame(b_log, a_log, KIND_NACK, ses, 1, last + 5),
            "nack_invalid",
        ),
        (
            "log frame sent to the primary",
            &wire,
            ft_frame(b_log, a_log, KIND_LOG, ses, 1, last + 1),
            "unexpected_kind",
        ),
    ];
    for (what, sock, frame, reason) in cases {
        let before = app.counter('a', reason).unwrap();
        sock.send(&frame).unwrap();
        assert!(
            Appliance::wait_until(T, || app.counter('a', reason).unwrap() > before),
            "{what}: not counted as {reason}"
        );
        assert!(
            c.recv(Duration::from_millis(100)).unwrap().is_none(),
            "{what} released output"
        );
        assert!(app.held('a').unwrap() >= 1, "{what}: reply no longer held");
    }
    assert!(
        app.status('a').unwrap()["log"]["acked"].as_u64().unwrap() < last,
        "no bad ack advanced the cumulative ack"
    );
    app.resume('b').unwrap();
    assert_eq!(
        c.recv(T).unwrap().map(|r| r.0).as_deref(),
        Some("1"),
        "released by the real ack"
    );
    // The kernel's rare-event warnings (aya-log) reach the daemon's log.
    let log = app.guard('a').log_contents();
    for w in [
        "beyond what was sent",
        "unexpected source",
        "of epoch 0 dropped",
    ] {
        assert!(
            log.contains(w),
            "missing eBPF warning {w:?} in ftd's log:\n{log}"
        );
    }
}

/// Ack forgery on the logging link: a host there can copy the backup's MAC address, the
/// epoch, the primary's session and a plausible sequence, but not the tag (SipHash under
/// the channel key, checked in XDP). Acks and nacks with a wrong tag, no tag, or the tag
/// of another header are dropped and counted as `bad_mac` and release nothing; the very
/// same ack with the right tag releases the held reply while the real backup is still
/// paused, so it is the tag that made the difference.
#[test]
fn forged_acks_without_the_key_never_release_output() {
    let _serial = serial();
    // The backup's daemon sends every ack, so pausing it holds the reply.
    let (tb, app, c) = setup(ApplianceOptions {
        kernel_acks: false,
        ..Default::default()
    });
    app.pause('b').unwrap();
    c.send("INCR forged").unwrap();
    assert!(Appliance::wait_until(T, || app.held('a').unwrap() >= 1));
    let st = app.status('a').unwrap();
    let last = st["log"]["last_seq"].as_u64().unwrap();
    let acked = st["log"]["acked"].as_u64().unwrap();
    assert!(
        acked < last,
        "the reply's input is not acked yet ({acked}/{last})"
    );
    let (a_log, b_log) = (tb.a.log_mac, tb.b.log_mac);
    let ses = app.session('a').unwrap();
    let epoch = st["epoch"].as_u64().unwrap();
    let wire = RawSock::open(&tb.wire_ns, WIRE_A).unwrap(); // faces host A's logging NIC
    let key = testbed_key(&tb);
    let mut guess = ft_testbed::appliance::channel_key(&tb).unwrap();
    guess[15] ^= 1; // one bit off
    let wrong_key = SipKey::from_bytes(&guess);

    let good_ack = ft_frame(&key, b_log, a_log, KIND_ACK, ses, epoch, last);
    // An ack of the old format: len 0, no tag.
    let mut untagged = good_ack.clone();
    untagged[ETH_HLEN + 4..ETH_HLEN + 6].copy_from_slice(&0u16.to_be_bytes());
    untagged[LOG_OVERHEAD..TAGGED_HLEN].fill(0);
    let mut flipped = good_ack.clone();
    flipped[TAGGED_HLEN - 1] ^= 0x80;
    // A genuine tag, of an older ack: moved onto a higher sequence.
    let older = ft_frame(&key, b_log, a_log, KIND_ACK, ses, epoch, acked);
    let mut replayed = good_ack.clone();
    replayed[LOG_OVERHEAD..TAGGED_HLEN].copy_from_slice(&older[LOG_OVERHEAD..TAGGED_HLEN]);
    let cases = [
        (
            "ack tagged under another key",
            ft_frame(&wrong_key, b_log, a_log, KIND_ACK, ses, epoch, last),
        ),
        ("ack without a tag", untagged),
        ("ack with a flipped tag bit", flipped),
        ("ack with an older ack's tag", replayed),
        (
            "nack tagged under another key",
            ft_frame(&wrong_key, b_log, a_log, KIND_NACK, ses, epoch, last),
        ),
    ];
    let retransmits = app.counter('a', "log_retransmitted_frames_total").unwrap();
    for (what, frame) in cases {
        let before = app.counter('a', "bad_mac").unwrap();
        wire.send(&frame).unwrap();
        assert!(
            Appliance::wait_until(T, || app.counter('a', "bad_mac").unwrap() > before),
            "{what}: not counted as bad_mac"
        );
        assert!(
            c.recv(Duration::from_millis(100)).unwrap().is_none(),
            "{what} released output"
        );
        assert!(app.held('a').unwrap() >= 1, "{what}: reply no longer held");
        assert_eq!(
            app.status('a').unwrap()["log"]["acked"].as_u64().unwrap(),
            acked,
            "{what} moved the cumulative ack"
        );
    }
    assert_eq!(
        app.counter('a', "log_retransmitted_frames_total").unwrap(),
        retransmits,
        "a forged nack was answered"
    );
    // The same ack with the right tag: released, although the backup is still paused.
    wire.send(&good_ack).unwrap();
    assert_eq!(
        c.recv(T).unwrap().map(|r| r.0).as_deref(),
        Some("1"),
        "the correctly tagged ack released the reply"
    );
    assert_eq!(
        app.status('a').unwrap()["log"]["acked"].as_u64().unwrap(),
        last
    );
    app.resume('b').unwrap();
    let log = app.guard('a').log_contents();
    assert!(
        log.contains("wrong or missing tag"),
        "missing eBPF warning in ftd's log:\n{log}"
    );
}

/// A full hold ring drops new output (counted) and never releases early; what it held is
/// released in order once acks resume.
#[test]
fn full_hold_ring_drops_new_output_never_releases_early() {
    let _serial = serial();
    // The backup's daemon sends every ack, so pausing it holds the output.
    let (_tb, app, c) = setup(ApplianceOptions {
        hold_slots: 64,
        kernel_acks: false,
        ..Default::default()
    });
    app.pause('b').unwrap();
    for i in 0..200 {
        c.send(&format!("ECHO m{i}")).unwrap();
        // A veth accepts at most 256 XDP-redirected frames per NAPI round: pace so that
        // the VM side gets all of them.
        std::thread::sleep(Duration::from_micros(500));
    }
    let full = Appliance::wait_until(T, || app.counter('a', "hold_full").unwrap() >= 100);
    assert!(
        full,
        "hold_full not counted: {:#}",
        app.status('a').unwrap()
    );
    assert!(
        c.recv(Duration::from_millis(300)).unwrap().is_none(),
        "nothing released while unacked"
    );
    assert!(app.held('a').unwrap() <= 64);
    app.resume('b').unwrap();
    let mut got = vec![];
    while let Some((r, _)) = c.recv(Duration::from_millis(500)).unwrap() {
        got.push(r);
    }
    let want: Vec<String> = (0..got.len()).map(|i| format!("m{i}")).collect();
    assert!(
        !got.is_empty() && got.len() <= 64,
        "held replies released: {}",
        got.len()
    );
    assert_eq!(got, want, "released in order, the oldest first");
}

/// The backup never emits on its client NIC: its replica's replies are suppressed, and
/// even a frame that userspace pushes out of the client NIC with the VM's MAC is dropped
/// by the kernel guard.
#[test]
fn backup_never_emits_on_client_nic() {
    let _serial = serial();
    let (tb, app, c) = setup(ApplianceOptions::default());
    let cap = Capture::start(&tb.client_ns, BR_PORT_B).unwrap();
    for i in 0..20 {
        assert_eq!(
            c.request(&format!("ECHO {i}"), T).unwrap(),
            Some(i.to_string())
        );
    }
    let rogue = udp_frame(
        VM_MAC,
        [2, 0, 0, 0, 0, 1],
        VM_IP,
        Ipv4Addr::new(10, 77, 0, 1),
        7000,
        40000,
        b"rogue",
    );
    let before = app.counter('b', "fenced_egress").unwrap();
    // The guard drops it in tc egress; the sender sees that as ENOBUFS (NET_XMIT_DROP).
    let _ = RawSock::open(&tb.b.ns, CLI_IF).unwrap().send(&rogue);
    assert!(Appliance::wait_until(T, || app
        .counter('b', "fenced_egress")
        .unwrap()
        > before));
    std::thread::sleep(Duration::from_millis(200));
    let from_vm = cap
        .stop()
        .iter()
        .filter(|(_, f)| f[6..12] == VM_MAC)
        .count();
    assert_eq!(
        from_vm, 0,
        "frames with the VM's MAC left the backup's client NIC"
    );
    assert!(app.counter('b', "vm_output_suppressed").unwrap() >= 20);
}

/// The same path with generic (skb-mode) XDP, for NICs without native XDP support.
#[test]
fn request_reply_with_generic_xdp() {
    let _serial = serial();
    let tb = Testbed::new(TestbedOptions {
        quiet_standins: true,
        ..Default::default()
    })
    .unwrap();
    let app = Appliance::start(
        &tb,
        &ApplianceOptions {
            xdp_mode: "skb",
            ..Default::default()
        },
    )
    .unwrap();
    let c = tb.vm_client().unwrap();
    let r = c.request("PING", T).unwrap();
    if r.is_none() {
        panic!(
            "no reply in skb mode\nA: {:#}\nB: {:#}",
            app.status('a').unwrap(),
            app.status('b').unwrap()
        );
    }
    assert_eq!(c.request("INCR g", T).unwrap().as_deref(), Some("1"));
    assert!(Appliance::wait_until(T, || standin_state(&tb.a.vm_ns)
        == standin_state(&tb.b.vm_ns)));
}

fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    // One write (a request split over segments is fine for the server, but this is
    // the simple client); Connection: close so that read_to_string ends.
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes())
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// The Prometheus endpoint and the CLI of a running daemon.
#[test]
fn metrics_endpoint_and_cli() {
    let _serial = serial();
    let (tb, app, c) = setup(ApplianceOptions::default());
    for i in 0..10 {
        assert_eq!(
            c.request(&format!("ECHO {i}"), T).unwrap(),
            Some(i.to_string())
        );
    }
    let m = ft_testbed::run_in_ns(&tb.a.ns, || http_get("127.0.0.1:9477", "/metrics"));
    assert!(m.starts_with("HTTP/1.1 200 OK"), "{m}");
    let value = |name: &str| -> u64 {
        m.lines()
            .find_map(|l| {
                l.strip_prefix(name)
                    .and_then(|r| r.trim().parse::<f64>().ok())
            })
            .unwrap_or_else(|| panic!("metric {name} missing:\n{m}")) as u64
    };
    assert!(value("ft_log_duplicated_frames_total ") >= 11);
    assert!(value("ft_acks_received_total ") >= 1);
    assert!(value("ft_output_released_frames_total ") >= 11);
    assert_eq!(value("ft_output_held_frames "), 0);
    assert!(value("ft_output_hold_seconds_count ") >= 11);
    assert!(value("ft_output_hold_seconds_bucket{le=\"+Inf\"} ") >= 11);
    let _ = value("ft_drops_total{reason=\"hold_full\"} ");
    assert!(m.contains("# TYPE ft_output_hold_seconds histogram"));
    // `_sum` is the kernel's own sum of the hold times: between what the buckets' lower
    // and upper bounds allow for the counts in them (a request waits at least a
    // kernel-to-kernel round trip, so it is not 0).
    let fval = |l: &str| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap();
    let sum = fval(
        m.lines()
            .find(|l| l.starts_with("ft_output_hold_seconds_sum "))
            .unwrap(),
    );
    let (mut lo, mut hi, mut below, mut prev_le) = (0.0, 0.0, 0.0, 0.0);
    for l in m
        .lines()
        .filter(|l| l.starts_with("ft_output_hold_seconds_bucket{"))
    {
        let le = l.split('"').nth(1).unwrap();
        let cum = fval(l);
        let n = cum - below;
        lo += n * prev_le;
        hi += if le == "+Inf" {
            f64::INFINITY
        } else {
            n * le.parse::<f64>().unwrap()
        };
        below = cum;
        prev_le = le.parse::<f64>().unwrap_or(f64::INFINITY);
    }
    assert!(
        sum > 0.0 && lo <= sum && sum <= hi,
        "sum {sum} not in [{lo}, {hi}]:\n{m}"
    );
    let m404 = ft_testbed::run_in_ns(&tb.a.ns, || http_get("127.0.0.1:9477", "/nope"));
    assert!(m404.starts_with("HTTP/1.1 404"));
    let mb = ft_testbed::run_in_ns(&tb.b.ns, || http_get("127.0.0.1:9477", "/metrics"));
    let mb = mb
        .lines()
        .find(|l| l.starts_with("ft_log_received_frames_total "))
        .unwrap()
        .to_string();
    assert!(
        mb.split(' ').nth(1).unwrap().parse::<u64>().unwrap() >= 11,
        "{mb}"
    );

    // `ftd status` and `ftd check-config` from the command line.
    let ftd = ft_testbed::ftd_bin().unwrap();
    let out = std::process::Command::new(&ftd)
        .args(["status", "--json", "--socket", app.sock_a.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success());
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(st["role"], "primary");
    // The operator's summary by default.
    let out = std::process::Command::new(&ftd)
        .args(["status", "--socket", app.sock_a.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("node host-a: PRIMARY, epoch 1") && text.contains("held output frames"),
        "{text}"
    );
    let out = std::process::Command::new(&ftd)
        .args(["check-config", app.config_a.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bad = tb.tmp_dir.join("bad.toml");
    let text = std::fs::read_to_string(&app.config_a)
        .unwrap()
        .replace("retx_slots = 16384", "retx_slots = 1000");
    std::fs::write(&bad, text).unwrap();
    let out = std::process::Command::new(&ftd)
        .args(["check-config", bad.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("power of two"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The control socket answers what it does not understand with an error, and goes on:
    // a line that is not a request, another protocol version, and silence.
    let raw = |req: &[u8]| -> String {
        use std::io::{Read, Write};
        let mut s = std::os::unix::net::UnixStream::connect(&app.sock_a).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(req).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    };
    let bad = [
        raw(b"GET / HTTP/1.1\r\n\r\n"),
        raw(b"{\"v\":9,\"request\":\"status\"}\n"),
        raw(b""),
    ];
    assert!(
        bad[0].contains("\"answer\": \"error\"") && bad[0].contains("not a control request"),
        "{}",
        bad[0]
    );
    assert!(bad[1].contains("version 9"), "{}", bad[1]);
    assert!(bad[2].contains("no request within 2 s"), "{}", bad[2]);
    assert_eq!(app.status('a').unwrap()["control_bad_requests"], 3);
    let out = std::process::Command::new(&ftd)
        .args(["status", "--socket", "/nonexistent.sock"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "UNKNOWN: {out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("is the daemon running"));
}

/// systemd's `Type=notify`: `READY=1` comes once the data plane is attached and the
/// control socket answers (so `systemctl start ftd` returns when `ftd status` works), and
/// the unit's status line follows the node's health.
#[test]
fn the_service_manager_is_told_ready_once_the_data_plane_is_attached() {
    let _serial = serial();
    let tb = Testbed::new(TestbedOptions {
        quiet_standins: true,
        ..Default::default()
    })
    .unwrap();
    let path = tb.tmp_dir.join("notify.sock");
    let _ = std::fs::remove_file(&path);
    let notify = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let (ns, sock) = (tb.a.ns.clone(), tb.tmp_dir.join("ftd-a.sock"));
    // Watches the notify socket from before the start: what holds when READY=1 arrives.
    let watcher = std::thread::spawn(move || {
        let mut at_ready = None;
        let mut statuses = Vec::new();
        let end = std::time::Instant::now() + Duration::from_secs(30);
        let mut buf = [0u8; 4096];
        while std::time::Instant::now() < end {
            let Ok(n) = notify.recv(&mut buf) else {
                continue;
            };
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            for line in msg.lines() {
                if line == "READY=1" && at_ready.is_none() {
                    let xdp = ft_testbed::netns::ip(&ns, &["link", "show", "dev", CLI_IF]);
                    let answers = ftd::control::client::query(&sock).map(|v| v["node"].clone());
                    at_ready = Some((xdp, answers.map_err(|e| e.to_string())));
                }
                if let Some(st) = line.strip_prefix("STATUS=") {
                    statuses.push(st.to_string());
                }
            }
            if at_ready.is_some() && statuses.iter().any(|s| s.starts_with("FT OK")) {
                break;
            }
        }
        (at_ready, statuses)
    });
    let app = Appliance::start(
        &tb,
        &ApplianceOptions {
            env_a: vec![
                ("NOTIFY_SOCKET".into(), path.display().to_string()),
                // And logs as JSON, one object a line (for a log shipper).
                ("FTD_LOG_FORMAT".into(), "json".into()),
            ],
            ..Default::default()
        },
    )
    .unwrap();
    let (at_ready, statuses) = watcher.join().unwrap();
    let (xdp, answers) = at_ready.expect("no READY=1 within 30 s");
    let xdp = xdp.unwrap();
    assert!(
        xdp.contains("xdp"),
        "READY=1 before XDP was attached: {xdp}"
    );
    assert_eq!(
        answers,
        Ok(serde_json::json!("host-a")),
        "status at READY=1"
    );
    assert!(
        statuses
            .iter()
            .any(|s| s.starts_with("FT OK - node host-a: primary")),
        "{statuses:?}"
    );
    let log = app.guard('a').log_contents();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert!(
        lines
            .iter()
            .any(|v| v["level"] == "INFO" && v["fields"]["message"] == "ftd running"),
        "{log}"
    );
    // The VM's MAC is in the client NIC's unicast filter while ftd runs (a physical NIC
    // would drop the VM's frames before XDP otherwise), and gone once it died.
    let uc = format!("{} self permanent", ft_testbed::netns::fmt_mac(&VM_MAC));
    let fdb = || {
        ft_testbed::netns::run_cmd("bridge", &["-n", &tb.a.ns, "fdb", "show", "dev", CLI_IF])
            .unwrap()
    };
    assert!(fdb().contains(&uc), "{}", fdb());
    app.guard('a').kill().unwrap();
    assert!(!fdb().contains(&uc), "{}", fdb());
}

/// `ftd preflight` on a host of the testbed: every check passes (the arbiter "none" and
/// an empty join_peer are warnings), both hosts' configs agree; a config with a missing
/// client NIC and its own MAC as the peer's fails with the fixes, and so does the host
/// check the unit runs before every start.
#[test]
fn preflight_checks_the_host_and_says_how_to_fix_it() {
    let _serial = serial();
    let (tb, app, _c) = setup(ApplianceOptions::default());
    let ftd = ft_testbed::ftd_bin().unwrap();
    let run = |args: &[&str]| {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &tb.a.ns])
            .arg(&ftd)
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (a, b) = (
        app.config_a.to_str().unwrap(),
        app.config_b.to_str().unwrap(),
    );
    let (code, out) = run(&["preflight", "--config", a, "--peer-config", b]);
    eprintln!("{out}");
    assert_eq!(code, Some(0), "{out}");
    for want in [
        &format!("ok    client NIC {CLI_IF}: up, carrier (veth)")[..],
        &format!("ok    logging NIC {LOG_IF} MTU: ")[..],
        "ok    client NIC cli0 XDP: native: basic, redirect",
        "ok    VM configuration hash",
        "ok    channel key on both hosts: the same key",
        "WARN  arbiter: none",
        "ready (",
    ] {
        assert!(out.contains(want), "{want:?} missing:\n{out}");
    }
    // A broken config: the client NIC does not exist, the peer's MAC is our own.
    let own_mac = ft_testbed::netns::fmt_mac(&ft_testbed::mac(&tb.a.ns, LOG_IF).unwrap());
    let text = std::fs::read_to_string(&app.config_a).unwrap();
    let peer_mac = text
        .lines()
        .find(|l| l.starts_with("peer_log_mac"))
        .unwrap()
        .to_string();
    let bad = text
        .replace(&format!("client = \"{CLI_IF}\""), "client = \"nosuch0\"")
        .replace(&peer_mac, &format!("peer_log_mac = \"{own_mac}\""));
    let bad_path = tb.tmp_dir.join("bad-host.toml");
    std::fs::write(&bad_path, bad).unwrap();
    let bad_path = bad_path.to_str().unwrap();
    for args in [
        &["preflight", "--config", bad_path][..],
        &["check-config", "--host", bad_path],
    ] {
        let (code, out) = run(args);
        assert_eq!(code, Some(1), "{args:?}: {out}");
        for want in [
            "FAIL  client NIC nosuch0: no such interface",
            "fix: name the NIC in [interfaces]",
            "FAIL  interfaces.peer_log_mac: is this host's own logging NIC's MAC",
            "failed",
        ] {
            assert!(out.contains(want), "{args:?}: {want:?} missing:\n{out}");
        }
    }
}

/// VM output longer than a hold slot is dropped and counted, never held and released
/// cut short. (The length used to be masked to 12 bits: a 4,196-byte frame was held as a
/// 100-byte one.) A normal frame sent after it is the marker: once it is released, the
/// oversize one, being ahead of it in the ring, would have been released already.
#[test]
fn oversize_vm_output_is_dropped_not_truncated() {
    let _serial = serial();
    let (tb, app, _c) = setup(ApplianceOptions::default());
    for (ns, ifname) in [(&tb.a.vm_ns, VM_IF), (&tb.a.ns, VMH_IF)] {
        ft_testbed::netns::ip(ns, &["link", "set", "dev", ifname, "mtu", "9000"]).unwrap();
    }
    let cap = Capture::start(&tb.client_ns, BR_PORT_A).unwrap();
    let vm = RawSock::open(&tb.a.vm_ns, VM_IF).unwrap();
    let client_mac = [2, 0, 0, 0, 0, 1];
    let mut big = udp_frame(
        VM_MAC,
        client_mac,
        VM_IP,
        Ipv4Addr::new(10, 77, 0, 1),
        7000,
        40000,
        &vec![b'x'; 4096 + 100 - 42],
    );
    assert_eq!(big.len(), 4096 + 100);
    big[42..48].copy_from_slice(b"BIGBIG");
    let before = app.counter('a', "oversize").unwrap();
    vm.send(&big).unwrap();
    assert!(Appliance::wait_until(T, || app
        .counter('a', "oversize")
        .unwrap()
        > before));
    let marker = udp_frame(
        VM_MAC,
        client_mac,
        VM_IP,
        Ipv4Addr::new(10, 77, 0, 1),
        7000,
        40000,
        b"MARKER",
    );
    vm.send(&marker).unwrap();
    assert!(
        cap.wait_for(1, T) >= 1,
        "the marker frame was never released: {:#}",
        app.status('a').unwrap()
    );
    let frames: Vec<Vec<u8>> = cap
        .stop()
        .into_iter()
        .map(|(_, f)| f)
        .filter(|f| f[6..12] == VM_MAC)
        .collect();
    assert!(
        frames.iter().any(|f| f.windows(6).any(|w| w == b"MARKER")),
        "marker missing"
    );
    assert!(
        !frames.iter().any(|f| f.windows(6).any(|w| w == b"BIGBIG")),
        "a part of the oversize frame left the appliance"
    );
}
