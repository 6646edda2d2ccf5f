//! A host on the logging link that does not hold the channel key (the testbed's forger:
//! a third port on the wire's bridge) tries what issue 20's review found it could do,
//! while clients write. Every attempt fails, is counted (`ft_drops_total{reason=
//! "bad_mac"}` on the host it was aimed at, or the transfer's authentication), and after
//! a failover under attack no acknowledged write is lost.
//!
//! The forger is stronger than a passive one: it reads the primary's session, epoch
//! and sequence numbers from the primary's status, so its frames are right in every
//! field but the MAC or tag.
use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use ft_common::wire::{EthHdr, FtHdr, KIND_HEARTBEAT, KIND_LOG, KIND_VMLOG, LogHdr, TAG_LEN};
use ft_testbed::{
    Appliance, ApplianceOptions, ChildGuard, RawSock, Testbed, TestbedOptions, VmOptions,
    fenced_pair,
    names::FORGER_IF,
    workload::{Clients, check_history},
};
use zerocopy::IntoBytes;

const T: Duration = Duration::from_secs(20);
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn testbed() -> Testbed {
    Testbed::new(TestbedOptions {
        start_standins: false,
        forger: true,
        ..Default::default()
    })
    .unwrap()
}

/// A fenced pair running the VMM, replicating, re-protection on.
fn pair(tb: &Testbed) -> (ChildGuard, Appliance) {
    fenced_pair(tb, VmOptions::vmm(), 2000, T).unwrap()
}

/// xorshift64*: the forger's MACs, tags and payload bytes.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// What the forger puts in its frames: the real header fields of the run it attacks.
#[derive(Clone, Copy, Debug)]
struct Target {
    src: [u8; 6],
    dst: [u8; 6],
    session: u64,
    epoch: u64,
    /// Next input-stream and VMM-stream sequence numbers of the primary.
    seq: u64,
    vm_seq: u64,
}

/// A frame right in every field but its MAC (LOG, VMLOG) or tag (HEARTBEAT).
fn forged(t: &Target, kind: u8, seq: u64, rng: &mut Rng) -> Vec<u8> {
    let mut ft = FtHdr::new(kind, t.session, t.epoch, seq);
    let payload: Vec<u8> = if kind == KIND_HEARTBEAT {
        ft.len.set(TAG_LEN as u16);
        rng.next().to_be_bytes().to_vec()
    } else {
        let n = 64 + (rng.next() % 400) as usize;
        ft.len.set(n as u16);
        ft.aux.set(rng.next());
        (0..n).map(|_| rng.next() as u8).collect()
    };
    let hdr = LogHdr {
        eth: EthHdr::ft(t.dst, t.src),
        ft,
    };
    let mut v = hdr.as_bytes().to_vec();
    v.extend_from_slice(&payload);
    if v.len() < 60 {
        v.resize(60, 0);
    }
    v
}

/// The forger's loop: every millisecond, reads where the primary is (`target`) and sends
/// a LOG and a VMLOG frame at each of the next 4 sequence numbers ahead of it, and a
/// heartbeat, until stopped or 60 s passed. Returns how many frames it sent.
struct Forger {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    h: Option<JoinHandle<u64>>,
}

impl Forger {
    fn start(tb: &Testbed, target: impl Fn() -> Option<Target> + Send + 'static) -> Forger {
        let sock = RawSock::open(&tb.forger_ns, FORGER_IF).unwrap();
        let (stop, sent) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicU64::new(0)),
        );
        let (st, se) = (stop.clone(), sent.clone());
        let h = std::thread::spawn(move || {
            let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
            let end = Instant::now() + Duration::from_secs(60);
            while !st.load(Relaxed) && Instant::now() < end {
                if let Some(t) = target() {
                    let mut frames = vec![forged(&t, KIND_HEARTBEAT, 1, &mut rng)];
                    for k in 0..4 {
                        frames.push(forged(&t, KIND_LOG, t.seq + k, &mut rng));
                        frames.push(forged(&t, KIND_VMLOG, t.vm_seq + k, &mut rng));
                    }
                    for f in &frames {
                        sock.send(f).unwrap();
                        se.fetch_add(1, Relaxed);
                    }
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            se.load(Relaxed)
        });
        Forger {
            stop,
            sent,
            h: Some(h),
        }
    }

    fn sent(&self) -> u64 {
        self.sent.load(Relaxed)
    }

    fn stop(mut self) -> u64 {
        self.stop.store(true, Relaxed);
        self.h.take().unwrap().join().unwrap()
    }
}

impl Drop for Forger {
    fn drop(&mut self) {
        self.stop.store(true, Relaxed);
    }
}

/// A's run as the forger sees it (from A's status), aimed at B.
fn target_of_a(tb: &Testbed, sock: std::path::PathBuf) -> impl Fn() -> Option<Target> + use<> {
    let (src, dst) = (tb.a.log_mac, tb.b.log_mac);
    move || {
        let s = ft_testbed::appliance::query(&sock).ok()?;
        let hex = s["session"].as_str()?.trim_start_matches("0x");
        Some(Target {
            src,
            dst,
            session: u64::from_str_radix(hex, 16).ok()?,
            epoch: s["epoch"].as_u64()?,
            seq: s["log"]["last_seq"].as_u64()? + 1,
            vm_seq: s["log"]["vm_last"].as_u64()? + 1,
        })
    }
}

/// Forged LOG and VMLOG frames ahead of the primary's and forged heartbeats, while
/// clients write: the backup's XDP drops every one (`bad_mac`), acks none (the primary
/// never sees an ack beyond what it sent), and the primary's real frames are buffered
/// and acked as before. Then the primary dies with the forger still sending its
/// heartbeats: the backup takes over anyway (forged heartbeats are no sign of life),
/// and no acknowledged write is lost.
#[test]
fn forged_log_frames_and_heartbeats_are_dropped_and_a_failover_under_them_loses_nothing() {
    let _s = serial();
    let tb = testbed();
    let (_arb, app) = pair(&tb);
    let clients = Clients::start(&tb, 4, T);
    assert!(clients.wait_ops(200, T), "clients made no progress");
    let bad0 = app.counter('b', "bad_mac").unwrap();
    let beyond0 = app.counter('a', "ack_beyond_sent").unwrap();
    let forger = Forger::start(&tb, target_of_a(&tb, app.sock_a.clone()));
    // Attacked for a while (at least 2,000 forged frames), with the clients going on.
    assert!(
        Appliance::wait_until(T, || forger.sent() >= 2000),
        "the forger sent only {} frames",
        forger.sent()
    );
    let at = clients.ops();
    assert!(
        clients.wait_ops(at + 200, T),
        "clients stalled under attack"
    );
    // Every forged frame that reached B was dropped as bad_mac: the forger sends in
    // bursts of 9 frames, and the bridge and veths drop nothing at this rate.
    let sent = forger.sent();
    assert!(
        Appliance::wait_until(T, || app.counter('b', "bad_mac").unwrap() - bad0 >= sent),
        "B dropped {} forged frames as bad_mac, the forger sent at least {sent}",
        app.counter('b', "bad_mac").unwrap() - bad0
    );
    assert_eq!(
        app.counter('a', "ack_beyond_sent").unwrap(),
        beyond0,
        "B acked a forged frame ahead of A's log"
    );
    let sb = app.status('b').unwrap();
    assert_eq!(sb["role"], "backup", "{sb:#}");
    assert_eq!(sb["vm"]["divergence"], serde_json::Value::Null, "{sb:#}");
    // The primary dies; the forger keeps sending heartbeats in its name (with the last
    // session, epoch and sequences it read).
    let last = target_of_a(&tb, app.sock_a.clone())().unwrap();
    forger.stop();
    let forger = Forger::start(&tb, move || Some(last));
    let t_kill = Instant::now();
    app.guard('a').kill().unwrap();
    assert!(
        Appliance::wait_until(T, || app.live_after_take_over('b')),
        "B did not take over under forged heartbeats: {:#}",
        app.status('b').unwrap_or_default()
    );
    let sent_after = forger.stop();
    assert!(sent_after > 0);
    assert!(app.counter('b', "bad_mac").unwrap() - bad0 > sent);
    let at = clients.ops();
    assert!(
        clients.wait_ops(at + 200, T),
        "clients stalled after the take-over"
    );
    assert!(clients.wait_each_goes_on(), "a client stalled");
    let logs = clients.finish();
    check_history(&tb, &logs, t_kill);
}

/// A forger speaks first to a backup that has not heard its primary yet: forged log
/// frames and heartbeats of a session of its own, epoch and MACs right but for the
/// MAC. The backup follows none of it (it never names that session), and once the
/// primary starts it follows the primary's session and replicates.
#[test]
fn a_backup_follows_no_forger_that_speaks_first() {
    let _s = serial();
    let tb = testbed();
    let forged_session = 0x0f0f_0f0f_0f0f_0f0f;
    let fake = Target {
        src: tb.a.log_mac,
        dst: tb.b.log_mac,
        session: forged_session,
        epoch: 1,
        seq: 1,
        vm_seq: 1,
    };
    let forger = Forger::start(&tb, move || Some(fake));
    assert!(Appliance::wait_until(T, || forger.sent() >= 500));
    // Unfenced pair (static epoch 1, both hosts), without re-protection: the backup
    // takes the session of the first frame it accepts.
    let app = Appliance::start_replicating(
        &tb,
        &ApplianceOptions {
            vm: VmOptions::vmm(),
            ..Default::default()
        },
        T,
    )
    .unwrap_or_else(|e| panic!("not replicating with a forger on the link: {e:#}"));
    let sb = app.status('b').unwrap();
    assert_eq!(
        sb["peer_session"],
        app.status('a').unwrap()["session"],
        "B follows another session than A's: {sb:#}"
    );
    assert!(app.counter('b', "bad_mac").unwrap() >= 500);
    assert_eq!(
        ft_testbed::resp::redis_cli(&tb, &["SET", "k", "v"]).unwrap(),
        "OK"
    );
    forger.stop();
    // B replays A's log: it took A's input frames to its VM and replayed A's entries.
    assert!(
        Appliance::wait_until(T, || app.status('b').is_ok_and(|s| {
            s["channel"]["frames_to_vm"].as_u64().unwrap_or(0) > 0
                && s["vm"]["entries_replayed"].as_u64().unwrap_or(0) > 0
                && s["vm"]["divergence"].is_null()
        })),
        "{:#}",
        app.status('b').unwrap()
    );
}

/// The state transfer altered after the handshake (four bytes of one segment of the
/// stream, TCP checksum fixed up): the joining backup's authenticated decryption fails,
/// it takes nothing, says why and exits; the primary runs on alone and serving. The
/// next join succeeds, and a failover to the joined backup loses no acknowledged write.
#[test]
fn an_altered_state_transfer_is_refused_and_the_next_join_succeeds() {
    let _s = serial();
    let tb = testbed();
    let (_arb, mut app) = pair(&tb);
    let clients = Clients::start(&tb, 4, T);
    assert!(clients.wait_ops(200, T), "clients made no progress");
    app.guard('b').kill().unwrap();
    assert!(
        Appliance::wait_until(T, || app.status('a').is_ok_and(|s| s["role"] == "solo")),
        "A did not go solo"
    );
    tb.corrupt_one_transfer_segment().unwrap();
    app.restart_as_backup(&tb, 'b').unwrap();
    let exit = app.guard('b').wait_exit(Duration::from_secs(60)).unwrap();
    let log = app.guard('b').log_contents();
    assert_eq!(
        tb.wire_rule_packets("corrupt-transfer").unwrap(),
        1,
        "{log}"
    );
    assert!(
        exit.is_some_and(|e| e.code() == Some(1)),
        "the joiner did not fail on the altered transfer: {exit:?}\n{log}"
    );
    assert!(
        log.contains("does not authenticate") && log.contains("altered on the way"),
        "{log}"
    );
    let sa = app.status('a').unwrap();
    assert_eq!(sa["role"], "solo", "{sa:#}");
    let at = clients.ops();
    assert!(
        clients.wait_ops(at + 200, T),
        "clients stalled after the refused transfer"
    );
    // The next join (the wire alters only one segment) succeeds.
    app.restart_as_backup(&tb, 'b').unwrap();
    assert!(
        Appliance::wait_until(Duration::from_secs(60), || {
            let (Ok(a), Ok(b)) = (app.status('a'), app.status('b')) else {
                return false;
            };
            a["role"] == "primary"
                && b["vm"]["phase"] == "replaying"
                && b["vm"]["checkpoints_verified"].as_u64().unwrap_or(0) > 0
        }),
        "B did not join:\nA: {:#}\nB: {:#}",
        app.status('a').unwrap_or_default(),
        app.status('b').unwrap_or_default()
    );
    let t_kill = Instant::now();
    app.guard('a').kill().unwrap();
    assert!(
        Appliance::wait_until(T, || app.live_after_take_over('b')),
        "B did not take over: {:#}",
        app.status('b').unwrap_or_default()
    );
    assert!(clients.wait_each_goes_on(), "a client stalled");
    let logs = clients.finish();
    check_history(&tb, &logs, t_kill);
}

/// The forger holds a key: a heartbeat in A's name tagged under `key`, made as A's
/// daemon makes one (`channel::frames::control_frame`).
fn heartbeat_under(t: &Target, key: &ftd::channel::auth::ChannelKey) -> Vec<u8> {
    ftd::channel::frames::control_frame(
        &ftd::channel::keys::ChannelKeys::single(key.clone()),
        t.src,
        t.dst,
        ftd::channel::frames::hdr(
            KIND_HEARTBEAT,
            t.session,
            t.epoch,
            t.seq.saturating_sub(1),
            t.vm_seq.saturating_sub(1),
        ),
    )
}

/// Key rotation without downtime, while clients write: `ftd keygen --rotate` (the
/// testbed's hosts share the key file, as if it were copied), then SIGHUP to A and later
/// to B. A advertises the new key but sends under the old one until B holds it too;
/// then both send under the new key, and the old one is still accepted within the
/// overlap. Ending the overlap (the `.prev` file removed, SIGHUP) makes both refuse the
/// old key. No frame is lost to the rotation: the pair stays paired and no client
/// stalls.
#[test]
fn the_channel_key_is_rotated_without_downtime() {
    let _s = serial();
    let tb = testbed();
    let (_arb, app) = pair(&tb);
    let clients = Clients::start(&tb, 4, T);
    assert!(clients.wait_ops(200, T), "clients made no progress");
    let t0 = Instant::now();
    let key_file = ft_testbed::appliance::channel_key_file(&tb).unwrap();
    let old = ftd::channel::auth::ChannelKey::load(&key_file).unwrap();
    let old_id = ft_common::wire::key_id(&old.sip()) as u64;
    let keys = |h: char| app.status(h).unwrap()["keys"].clone();
    assert_eq!(keys('a')["send"], old_id);
    let out = std::process::Command::new(ft_testbed::ftd_bin().unwrap())
        .args(["keygen", "--rotate"])
        .arg(&key_file)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let new = ftd::channel::auth::ChannelKey::load(&key_file).unwrap();
    let new_id = ft_common::wire::key_id(&new.sip()) as u64;
    assert_ne!(old_id, new_id);
    let downs0 = app.status('b').unwrap()["peer_down_events"].clone();
    // A first: it holds both and advertises the new key, but B does not hold it yet.
    app.guard('a').send_signal(libc::SIGHUP).unwrap();
    assert!(
        Appliance::wait_until(T, || keys('a')["newest"] == new_id),
        "{:#}",
        keys('a')
    );
    let at = clients.ops();
    assert!(clients.wait_ops(at + 100, T), "clients stalled");
    let ka = keys('a');
    assert_eq!(ka["send"], old_id, "A sends under a key B lacks: {ka:#}");
    assert_eq!(ka["rotation"], "in-progress", "{ka:#}");
    // Then B: each sees the other hold the new key and switches to it.
    app.guard('b').send_signal(libc::SIGHUP).unwrap();
    assert!(
        Appliance::wait_until(T, || keys('a')["send"] == new_id
            && keys('b')["send"] == new_id),
        "A {:#} B {:#}",
        keys('a'),
        keys('b')
    );
    let at = clients.ops();
    assert!(clients.wait_ops(at + 100, T), "clients stalled");
    // Within the overlap the old key is still accepted (a heartbeat under it).
    let target = target_of_a(&tb, app.sock_a.clone())().unwrap();
    let forger = RawSock::open(&tb.forger_ns, FORGER_IF).unwrap();
    let bad0 = app.counter('b', "bad_mac").unwrap();
    for _ in 0..20 {
        forger.send(&heartbeat_under(&target, &old)).unwrap();
    }
    assert_eq!(
        app.counter('b', "bad_mac").unwrap(),
        bad0,
        "B refused heartbeats under the old key within the overlap: B {:#}",
        keys('b'),
    );
    // The overlap ends early: both forget the old key; it is refused from now on.
    std::fs::remove_file(ftd::channel::keys::prev_path(&key_file)).unwrap();
    for h in ['a', 'b'] {
        app.guard(h).send_signal(libc::SIGHUP).unwrap();
    }
    assert!(
        Appliance::wait_until(T, || keys('a')["older"].is_null()
            && keys('b')["older"].is_null()),
        "A {:#} B {:#}",
        keys('a'),
        keys('b')
    );
    for _ in 0..20 {
        forger.send(&heartbeat_under(&target, &old)).unwrap();
    }
    assert!(
        Appliance::wait_until(T, || app.counter('b', "bad_mac").unwrap() == bad0 + 20),
        "B refused {} heartbeats under the old key, 20 were sent",
        app.counter('b', "bad_mac").unwrap() - bad0
    );
    assert_eq!(keys('b')["rotation"], "none");
    // Nobody noticed: still paired, no silence, clients on their connections.
    assert_eq!(app.status('a').unwrap()["role"], "primary");
    assert_eq!(app.status('b').unwrap()["role"], "backup");
    assert_eq!(app.status('b').unwrap()["peer_down_events"], downs0);
    assert!(clients.wait_each_goes_on(), "a client stalled");
    let logs = clients.finish();
    check_history(&tb, &logs, t0);
}
