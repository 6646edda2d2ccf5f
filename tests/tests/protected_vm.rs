//! The protected VM inside the appliance: ftd runs the VMM on both hosts (recording on
//! the primary, replaying on the backup from the logging channel). Stock redis tools talk
//! to it from the client network through the data plane.
use std::{
    io::{Read, Write},
    net::TcpStream,
    time::Duration,
};

use ft_guest_service::compat::multibulk;
use ft_testbed::{
    Appliance, ApplianceOptions, Testbed, TestbedOptions, VmOptions, names::*, ns_exec, resp,
};
use serde_json::Value;

const T: Duration = Duration::from_secs(10);
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn vm_of(app: &Appliance, host: char) -> Value {
    app.status(host).unwrap()["vm"].clone()
}

fn vm_u64(app: &Appliance, host: char, field: &str) -> u64 {
    vm_of(app, host)[field]
        .as_u64()
        .unwrap_or_else(|| panic!("host {host}: vm.{field} missing: {:#}", vm_of(app, host)))
}

/// The testbed with ftd running the VMM on both hosts, both VMMs up, the guest answering.
fn setup(o: ApplianceOptions) -> (Testbed, Appliance) {
    let tb = Testbed::new(TestbedOptions {
        start_standins: false,
        ..Default::default()
    })
    .unwrap();
    let app = Appliance::start_replicating(
        &tb,
        &ApplianceOptions {
            vm: VmOptions::vmm(),
            ..o
        },
        T,
    )
    .unwrap();
    assert_eq!(redis(&tb, &["PING"]), "PONG");
    (tb, app)
}

/// One redis-cli command from the client namespace.
fn redis(tb: &Testbed, args: &[&str]) -> String {
    resp::redis_cli(tb, args).unwrap()
}

fn benchmark(tb: &Testbed, clients: u32, n: u32) -> String {
    let cmd = format!(
        "ulimit -n $(ulimit -Hn); timeout 120 redis-benchmark -h {VM_IP} -c {clients} -n {n} -t set,get,incr -q"
    );
    let out = ns_exec(&tb.client_ns, "bash", &["-c", &cmd]).unwrap();
    assert_eq!(
        out.matches("requests per second").count(),
        3,
        "redis-benchmark output: {out}"
    );
    out
}

/// Sends PINGs (they change no state) on one connection until the primary's VMM has
/// made `n` checkpoints: every run reaches them, whatever the machine's speed (bounded:
/// 60 s, then the primary is reported stuck).
fn drive_until_checkpoints(tb: &Testbed, app: &Appliance, n: u64) {
    let mut c = connect(tb);
    let ok = Appliance::wait_until(Duration::from_secs(60), || {
        for _ in 0..50 {
            assert_eq!(call(&mut c, &[b"PING"]), b"+PONG\r\n");
        }
        vm_u64(app, 'a', "checkpoints") >= n
    });
    assert!(
        ok,
        "the primary made fewer than {n} checkpoints: {:#}",
        vm_of(app, 'a')
    );
}

/// Waits until the backup has replayed all output the primary's VM produced so far and
/// verified every checkpoint the primary made (the clients must be quiet: an idle guest
/// produces no output, so both sides' counts settle).
fn wait_caught_up(app: &Appliance) -> (Value, Value) {
    let mut last = (Value::Null, Value::Null);
    let ok = Appliance::wait_until(T, || {
        let (a, b) = (vm_of(app, 'a'), vm_of(app, 'b'));
        let done = a["tx_frames"].as_u64().is_some()
            && a["tx_frames"] == b["tx_frames"]
            && a["checkpoints"].as_u64().is_some()
            && a["checkpoints"] == b["checkpoints_verified"];
        last = (a, b);
        done
    });
    assert!(
        ok,
        "backup did not catch up:\nA: {:#}\nB: {:#}",
        last.0, last.1
    );
    last
}

#[test]
fn redis_tools_through_the_appliance_and_the_replica_matches() {
    let _s = serial();
    let (tb, app) = setup(ApplianceOptions::default());
    let b_tx_before = tb.tx_packets(&tb.b.ns, CLI_IF).unwrap();
    assert_eq!(redis(&tb, &["SET", "k", "v"]), "OK");
    assert_eq!(redis(&tb, &["GET", "k"]), "v");
    assert_eq!(redis(&tb, &["INCR", "n"]), "1");
    benchmark(&tb, 50, 20_000);
    benchmark(&tb, 1000, 20_000);
    assert_eq!(redis(&tb, &["INCR", "n"]), "2");
    // Checkpoints come every 1,000 guest exits, and how many exits 40,000 requests take
    // depends on how many the guest serves per exit (4,082 exits on one fresh machine):
    // keep the guest busy until the primary made 5, however fast it is.
    drive_until_checkpoints(&tb, &app, 5);
    let (a, b) = wait_caught_up(&app);
    eprintln!("primary VM: {a:#}\nbackup VM: {b:#}");
    // The backup's VM computed exactly the output the primary's released (and its own
    // went nowhere), and its state matched at every checkpoint.
    assert!(a["tx_frames"].as_u64().unwrap() > 100_000, "{a:#}");
    assert_eq!(a["tx_hash"], b["tx_hash"], "output differs");
    assert!(a["tx_hash"].as_str().is_some());
    // Every checkpoint the primary made (at least the 5 driven above) was verified.
    assert!(a["checkpoints"].as_u64().unwrap() >= 5, "{a:#}");
    assert_eq!(a["checkpoints"], b["checkpoints_verified"], "{b:#}");
    assert_eq!(b["divergence"], Value::Null);
    assert_eq!(b["phase"], "replaying");
    // Backup output suppressed: its client NIC sent (almost) nothing while the VM
    // answered >100,000 requests (a few host frames — ARP, IPv6 ND — are allowed).
    let b_tx = tb.tx_packets(&tb.b.ns, CLI_IF).unwrap() - b_tx_before;
    assert!(b_tx < 50, "backup's client NIC transmitted {b_tx} frames");
    let a_tx = tb.tx_packets(&tb.a.ns, CLI_IF).unwrap();
    assert!(
        a_tx > 100_000,
        "primary's client NIC transmitted {a_tx} frames"
    );
}

/// Name, state and kernel wait channel of every thread of `pid` (for stall reports).
fn threads(pid: i32) -> String {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return format!("(no /proc/{pid})");
    };
    tasks
        .filter_map(|t| t.ok())
        .map(|t| {
            let p = t.path();
            let rd = |f: &str| std::fs::read_to_string(p.join(f)).unwrap_or_default();
            let stat = rd("stat");
            let state = stat
                .rsplit_once(')')
                .map(|(_, r)| r.trim_start().chars().next().unwrap_or('?'))
                .unwrap_or('?');
            format!("{}[{state} {}]", rd("comm").trim(), rd("wchan").trim())
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn connect(tb: &Testbed) -> TcpStream {
    resp::connect(tb, Duration::from_secs(10)).unwrap()
}

fn call(c: &mut TcpStream, args: &[&[u8]]) -> Vec<u8> {
    resp::call(c, args).unwrap()
}

fn read_reply(c: &mut TcpStream) -> Vec<u8> {
    resp::read_reply(c).unwrap()
}

fn log_field(app: &Appliance, host: char, f: &str) -> u64 {
    let s = app.status(host).unwrap();
    s["log"][f]
        .as_u64()
        .unwrap_or_else(|| panic!("host {host}: log.{f} missing: {:#}", s["log"]))
}

/// The output rule covers the VMM's entries, not only input frames: with the VMM stream
/// blocked on the wire, a reply the guest produced stays held although the backup has
/// acked every input frame; it leaves once the VMM entries get through (repaired after
/// the heartbeats announce them).
#[test]
fn a_reply_waits_for_the_vmm_entries_it_depends_on() {
    let _s = serial();
    let (tb, app) = setup(ApplianceOptions::default());
    let mut c = connect(&tb);
    assert_eq!(call(&mut c, &[b"PING"]), b"+PONG\r\n");
    // Everything sent so far is acked and nothing is held.
    assert!(Appliance::wait_until(T, || app.held('a').unwrap() == 0
        && log_field(&app, 'a', "vm_acked")
            == log_field(&app, 'a', "vm_last")));
    tb.set_vmlog_blocked(true).unwrap();
    let tx0 = vm_u64(&app, 'a', "tx_frames");
    c.write_all(&multibulk(&[b"INCR", b"x"])).unwrap();
    // The guest answered (its TX count moved) and the reply is in the ring.
    assert!(
        Appliance::wait_until(T, || vm_u64(&app, 'a', "tx_frames") > tx0
            && app.held('a').unwrap() >= 1),
        "no held reply: {:#}",
        app.status('a').unwrap()
    );
    // Every input frame is acked; the VMM entries are not.
    assert!(
        Appliance::wait_until(T, || log_field(&app, 'a', "acked")
            == log_field(&app, 'a', "last_seq")),
        "input not acked: {:#}",
        app.status('a').unwrap()["log"]
    );
    let (vm_last, vm_acked) = (
        log_field(&app, 'a', "vm_last"),
        log_field(&app, 'a', "vm_acked"),
    );
    assert!(vm_acked < vm_last, "VMM stream acked while blocked");
    // Still held, the client has nothing (the reply is in the ring, counted above).
    assert!(app.held('a').unwrap() >= 1);
    c.set_nonblocking(true).unwrap();
    let mut b = [0u8; 64];
    let r = c.read(&mut b);
    assert!(
        matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the client got {r:?} while the reply's VMM entries were unacknowledged"
    );
    c.set_nonblocking(false).unwrap();
    tb.set_vmlog_blocked(false).unwrap();
    assert_eq!(read_reply(&mut c), b":1\r\n");
    assert!(Appliance::wait_until(T, || app.held('a').unwrap() == 0));
    assert!(vm_of(&app, 'a')["vmlog_retransmits"].as_u64().unwrap() > 0);
    wait_caught_up(&app);
}

/// Loss on the logging wire in both directions (log and VMLOG frames A→B; acks, NACKs
/// and VMNACKs B→A): repaired, the replicas stay identical, clients see no error.
#[test]
fn loss_in_both_directions_keeps_the_replicas_identical() {
    let _s = serial();
    let (tb, app) = setup(ApplianceOptions::default());
    tb.set_log_loss(Some(25)).unwrap();
    let out = benchmark(&tb, 50, 20_000);
    assert!(!out.contains("rror"), "client errors: {out}");
    assert_eq!(redis(&tb, &["SET", "after", "loss"]), "OK");
    let (lost_ab, lost_ba) = (
        tb.wire_rule_packets("loss-la").unwrap(),
        tb.wire_rule_packets("loss-lb").unwrap(),
    );
    assert!(
        lost_ab > 100 && lost_ba > 100,
        "loss A→B {lost_ab}, B→A {lost_ba}"
    );
    tb.set_log_loss(None).unwrap();
    assert_eq!(redis(&tb, &["GET", "after"]), "loss");
    let (a, b) = wait_caught_up(&app);
    assert_eq!(a["tx_hash"], b["tx_hash"], "output differs");
    assert_eq!(b["divergence"], Value::Null);
    // Both streams were repaired.
    assert!(a["vmlog_retransmits"].as_u64().unwrap() > 0, "{a:#}");
    assert!(app.counter('a', "log_retransmitted_frames_total").unwrap() > 0);
}

/// The VMM's entries are never dropped at a full window: the vCPU stalls until the
/// backup acks, and then everything arrives.
#[test]
fn a_full_vmm_window_stalls_the_vcpu_and_loses_nothing() {
    let _s = serial();
    const WINDOW: u64 = 16;
    let (tb, app) = setup(ApplianceOptions {
        channel_extra: format!("vmlog_window = {WINDOW}"),
        ..Default::default()
    });
    // Connected before the VMM stream is blocked (a handshake's SYN-ACK is output too).
    let mut conns: Vec<TcpStream> = (0..48).map(|_| connect(&tb)).collect();
    for c in conns.iter_mut() {
        assert_eq!(call(c, &[b"PING"]), b"+PONG\r\n");
    }
    tb.set_vmlog_blocked(true).unwrap();
    // One request per connection, each its own exit with output, each output flushing
    // the entries before it into a VMLOG frame: more frames than the window holds.
    let mut sent = 0;
    let stalled = Appliance::wait_until(T, || {
        if sent < conns.len() {
            let k = format!("k{sent}");
            conns[sent]
                .write_all(&multibulk(&[b"SET", k.as_bytes(), b"v"]))
                .unwrap();
            sent += 1;
        }
        vm_of(&app, 'a')["window_stalled_now"] == true
    });
    let a = vm_of(&app, 'a');
    assert!(stalled, "the vCPU never waited for the window: {a:#}");
    assert_eq!(
        a["vmlog_frames"].as_u64().unwrap() - log_field(&app, 'a', "vm_acked"),
        WINDOW,
        "{a:#}"
    );
    // Stalled: the vCPU makes no exit while it waits (so no more requests are served).
    let exits = a["exits"].as_u64().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(vm_u64(&app, 'a', "exits"), exits);
    assert_eq!(vm_of(&app, 'a')["window_stalled_now"], true);
    tb.set_vmlog_blocked(false).unwrap();
    for c in conns.iter_mut().take(sent) {
        assert_eq!(read_reply(c), b"+OK\r\n");
    }
    for (i, c) in conns.iter_mut().enumerate().skip(sent) {
        let k = format!("k{i}");
        assert_eq!(call(c, &[b"SET", k.as_bytes(), b"v"]), b"+OK\r\n");
    }
    let mut c = connect(&tb);
    assert_eq!(call(&mut c, &[b"DBSIZE"]), b":48\r\n");
    let (a, b) = wait_caught_up(&app);
    assert!(a["window_stalls"].as_u64().unwrap() >= 1, "{a:#}");
    assert_eq!(a["tx_hash"], b["tx_hash"]);
    // Nothing lost: every entry the primary logged reached the backup (compared until
    // equal: the idle guest's timer may log a few more meanwhile).
    assert!(
        Appliance::wait_until(T, || vm_of(&app, 'a')["vmlog_entries"]
            == vm_of(&app, 'b')["entries_received"]),
        "entries lost: {a:#} {b:#}"
    );
}

/// The primary dies (SIGKILL) while requests are in flight: the backup notices the
/// silence, replays everything it holds without an error or a divergence, and goes live.
/// Every reply a client could have seen was computed by the backup too (the output rule:
/// a released frame's entries were acked, so they were replayed).
#[test]
fn primary_crash_under_load_leaves_a_consistent_backup() {
    crash_under_load(false);
}

/// The same with the backup's daemon frozen (SIGSTOP) for 300 ms before the primary
/// dies. The backup's XDP goes on buffering the log in its ring and acking it, so the
/// primary goes on releasing replies (checked: acks from the kernel need no userspace);
/// the backup, resumed, drains the ring before it goes live and still computes every
/// reply the clients could have seen. (With the output rule off, thousands of released
/// replies are missing on the backup.)
#[test]
fn a_crash_while_the_backup_lags_loses_no_released_output() {
    crash_under_load(true);
}

fn crash_under_load(freeze_backup: bool) {
    let _s = serial();
    let (tb, app) = setup(ApplianceOptions::default());
    let a_tx0 = tb.tx_packets(&tb.a.ns, CLI_IF).unwrap();
    let b_tx0 = vm_u64(&app, 'b', "tx_frames");
    let ip = VM_IP.to_string();
    let _load = tb
        .spawn(
            &tb.client_ns,
            "redis-benchmark",
            [
                "-h", &ip, "-c", "50", "-n", "10000000", "-t", "set,incr", "-q",
            ],
        )
        .unwrap();
    // The condition under test, however fast the machine: the backup verified a few
    // checkpoints and the primary released more than 10,000 frames under the load.
    assert!(
        Appliance::wait_until(Duration::from_secs(60), || {
            vm_u64(&app, 'b', "checkpoints_verified") >= 3
                && tb.tx_packets(&tb.a.ns, CLI_IF).unwrap() - a_tx0 > 10_000
        }),
        "{:#}",
        vm_of(&app, 'b')
    );
    // Under load right now: the primary's VM is making progress when it dies.
    let e0 = vm_u64(&app, 'a', "exits");
    let busy = Appliance::wait_until(T, || vm_u64(&app, 'a', "exits") > e0 + 100);
    assert!(
        busy,
        "the primary stalled under load:\n{:#}\nthreads: {}",
        app.status('a').unwrap(),
        threads(app.guard('a').pid())
    );
    let before = vm_of(&app, 'a');
    if freeze_backup {
        app.pause('b').unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let frozen_tx = tb.tx_packets(&tb.a.ns, CLI_IF).unwrap();
        // With acks from the backup's daemon nothing more is released from here on; with
        // XDP's acks replies flow until the backup's log ring is full (thousands of
        // frames), however fast this machine is.
        let mut released = 0;
        let flowing = Appliance::wait_until(Duration::from_secs(2), || {
            released = tb.tx_packets(&tb.a.ns, CLI_IF).unwrap() - frozen_tx;
            released > 100
        });
        // ...while A is still the paired primary: a primary that went solo (it finds a
        // backup without acks failed after peer_timeout_ms) releases without acks.
        let sa = app.status('a').unwrap();
        assert!(
            flowing && sa["role"] == "primary",
            "{released} frames released with the backup's daemon frozen, A {}: \
             the acks need the backup's userspace\n{sa:#}",
            sa["role"]
        );
    }
    app.guard('a').kill().unwrap();
    if freeze_backup {
        app.resume('b').unwrap();
    }
    // The backup notices the silence, replays everything it holds and goes live.
    // The controller marks the phase "live" once the VMM went live and the VM's
    // pending input and announcement are out.
    let live = Appliance::wait_until(T, || app.live_after_take_over('b'));
    let sb = app.status('b').unwrap();
    let b = sb["vm"].clone();
    assert!(live, "the backup did not take over: {sb:#}");
    assert_eq!(b["phase"], "live", "{b:#}");
    assert_eq!(b["error"], Value::Null, "{b:#}");
    assert_eq!(b["divergence"], Value::Null, "{b:#}");
    assert!(sb["epoch"].as_u64().unwrap() > 1, "{sb:#}");
    assert_eq!(b["entries_received"], b["entries_replayed"], "{b:#}");
    // Frames host A put on the client network (the VM's replies, plus at most a few of
    // the host's own, e.g. ARP) after the start: the backup computed those, except the
    // output of the primary's last exit. That exit's frames depend only on entries
    // before it (acked: the output rule), but the backup replays an exit only once it
    // has the exit's own entries (the IDLE read's clock value, logged after the output
    // was sent), so it computes them when it goes live. One guest loop iteration sends
    // at most a reply and an ACK per client: 2 x 50 frames.
    let released = tb.tx_packets(&tb.a.ns, CLI_IF).unwrap() - a_tx0;
    let computed = b["tx_frames_at_live"].as_u64().unwrap() - b_tx0;
    assert!(released > 10_000, "only {released} frames released");
    assert!(
        computed + 100 >= released,
        "the primary released {released} frames, the backup computed only {computed}: \
         {before:#} {b:#}"
    );
}

/// A VMM entry changed on the logging wire (a CLOCK value): the MAC no longer matches,
/// so the backup's XDP drops the frame before it buffers or acks it (`bad_mac`), the
/// primary repairs it from its store, and the replica stays identical.
#[test]
fn an_entry_changed_on_the_wire_is_dropped_by_its_mac_and_repaired() {
    let _s = serial();
    let (tb, app) = setup(ApplianceOptions::default());
    let mut c = connect(&tb);
    assert_eq!(call(&mut c, &[b"SET", b"k", b"1"]), b"+OK\r\n");
    let bad0 = app.counter('b', "bad_mac").unwrap();
    tb.corrupt_one_vmlog_entry().unwrap();
    let mut n = 0u64;
    let changed = Appliance::wait_until(Duration::from_secs(30), || {
        n += 1;
        assert_eq!(
            call(&mut c, &[b"INCR", b"n"]),
            format!(":{n}\r\n").into_bytes()
        );
        tb.wire_rule_packets("corrupt").unwrap() == 1
    });
    assert!(
        changed,
        "no VMLOG frame led by a CLOCK entry crossed the wire"
    );
    // The dropped frame is repaired (VMNACK) and replayed: two more checkpoints (the
    // corrupted clock value would have made the first of them differ), then the
    // backup has computed the same output and verified every checkpoint.
    drop(c);
    drive_until_checkpoints(&tb, &app, vm_u64(&app, 'a', "checkpoints") + 2);
    let (a, b) = wait_caught_up(&app);
    assert!(app.counter('b', "bad_mac").unwrap() > bad0);
    assert_eq!(a["tx_hash"], b["tx_hash"], "output differs");
    assert_eq!(b["divergence"], Value::Null, "{b:#}");
    assert_eq!(b["phase"], "replaying", "{b:#}");
    assert_eq!(app.status('a').unwrap()["role"], "primary");
}

/// A VMM entry that differs from what the primary's VM consumed (injected before the
/// frame is tagged: a non-determinism bug or a memory error, which no MAC can see): the
/// backup's replay finds the difference at its next checkpoint, reports where, stops
/// acking and leaves; the primary goes on alone, and serves on.
#[test]
fn a_diverging_entry_is_detected_and_the_primary_keeps_serving() {
    let _s = serial();
    let trigger = std::env::temp_dir().join(format!("ft-fault-{}", std::process::id()));
    let _ = std::fs::remove_file(&trigger);
    let (tb, app) = setup(ApplianceOptions {
        env_a: vec![(
            ftd::fault::CORRUPT_VMLOG_CLOCK.into(),
            trigger.display().to_string(),
        )],
        ..Default::default()
    });
    let mut c = connect(&tb);
    assert_eq!(call(&mut c, &[b"SET", b"k", b"1"]), b"+OK\r\n");
    std::fs::write(&trigger, b"").unwrap();
    // Traffic until the fault fired and the backup noticed.
    let mut n = 0u64;
    let found = Appliance::wait_until(Duration::from_secs(30), || {
        n += 1;
        assert_eq!(
            call(&mut c, &[b"INCR", b"n"]),
            format!(":{n}\r\n").into_bytes()
        );
        vm_of(&app, 'b')["phase"] == "diverged"
    });
    let b = vm_of(&app, 'b');
    assert!(
        found,
        "no divergence (fault fired: {}): {b:#}",
        !trigger.exists()
    );
    let d = &b["divergence"];
    let (exit, verified) = (
        d["exit"].as_u64().unwrap(),
        d["verified_equal_at_exit"].as_u64().unwrap(),
    );
    assert!(verified < exit, "{d:#}");
    // The daemon declares the replica failed once its VMM thread has ended: it stops
    // acking, halts, leaves, and exits with a failure (a service manager starts it
    // again, and it joins by state transfer); it records why for the next run.
    let exit_status = app.guard('b').wait_exit(T).unwrap();
    let log = app.guard('b').log_contents();
    assert!(
        exit_status.is_some_and(|e| e.code() == Some(1)),
        "the diverged backup did not halt and exit: {exit_status:?}\n{log}"
    );
    assert!(log.contains("DIVERGENCE"), "not in the backup's log: {log}");
    // Its log is plain text when stderr is not a terminal (a file here, the journal
    // under systemd): no colour escape sequences.
    assert!(!log.contains('\u{1b}'), "colour codes in a log file: {log}");
    let last: Value =
        serde_json::from_slice(&std::fs::read(ftd::daemon::last_exit_path(&app.sock_b)).unwrap())
            .unwrap();
    assert_eq!(last["how"], "halted", "{last:#}");
    assert!(
        last["why"]
            .as_str()
            .unwrap()
            .contains(&format!("divergence at exit {exit}")),
        "{last:#}"
    );
    // The primary heard the backup leave and runs solo: same connection, same data.
    assert!(
        Appliance::wait_until(T, || app.status('a').unwrap()["role"] == "solo"),
        "{:#}",
        app.status('a').unwrap()
    );
    assert!(app.counter('a', "leave_received_total").unwrap() >= 1);
    for _ in 0..100 {
        n += 1;
        assert_eq!(
            call(&mut c, &[b"INCR", b"n"]),
            format!(":{n}\r\n").into_bytes()
        );
    }
    assert_eq!(call(&mut c, &[b"GET", b"k"]), b"$1\r\n1\r\n");
    assert_eq!(app.held('a').unwrap(), 0);
    assert!(vm_of(&app, 'a')["entries_discarded_solo"].as_u64().unwrap() > 0);
}

/// A graceful stop of the primary (SIGTERM) hands the backup the complete log: the VMM
/// logs END, and the daemon keeps its channel up (heartbeats, VMNACK repair) until the
/// backup acked it. The END frame is held on the wire at first, so it arrives only by
/// repair, after the VMM has already stopped.
#[test]
fn a_graceful_primary_stop_hands_the_backup_the_whole_log() {
    let _s = serial();
    let (tb, app) = setup(ApplianceOptions::default());
    assert_eq!(redis(&tb, &["SET", "k", "v"]), "OK");
    assert_eq!(redis(&tb, &["INCR", "n"]), "1");
    tb.set_vmlog_blocked(true).unwrap();
    let ga = app.guard('a');
    ga.send_signal(libc::SIGTERM).unwrap();
    // The primary's VMM stopped (END logged and sent into the blocked wire), or the
    // daemon is already gone (it did not wait: the assertion below fails).
    assert!(Appliance::wait_until(T, || !ga.is_running()
        || app
            .status('a')
            .map(|s| s["vm"]["phase"] == "stopped")
            .unwrap_or(false)));
    tb.set_vmlog_blocked(false).unwrap();
    let st = ga.wait_exit(T).unwrap().expect("primary did not exit");
    assert!(st.success(), "primary exited with {st}");
    assert!(
        Appliance::wait_until(T, || vm_of(&app, 'b')["end_verified"] == true),
        "the backup never got the end of the log: {:#}",
        vm_of(&app, 'b')
    );
    let b = vm_of(&app, 'b');
    assert_eq!(b["divergence"], Value::Null);
    assert!(
        ga.log_contents()
            .contains("the backup acknowledged the whole VMM log"),
        "{}",
        ga.log_contents()
    );
}

/// `role = "solo"`: the VM runs on one host, unprotected (nothing recorded, nothing on
/// the logging link, output not held), and serves the same clients.
#[test]
fn a_solo_node_serves_unprotected_and_logs_nothing() {
    let _s = serial();
    let tb = Testbed::new(TestbedOptions {
        start_standins: false,
        ..Default::default()
    })
    .unwrap();
    let app = Appliance::start(
        &tb,
        &ApplianceOptions {
            vm: VmOptions::vmm(),
            solo: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(
        Appliance::wait_until(T, || app
            .status('a')
            .map(|s| s["vm"]["phase"] == "running unprotected")
            .unwrap_or(false)),
        "{:#}",
        app.status('a').unwrap()
    );
    let log_tx0 = tb.tx_packets(&tb.a.ns, LOG_IF).unwrap();
    assert_eq!(redis(&tb, &["SET", "k", "v"]), "OK");
    benchmark(&tb, 50, 5_000);
    assert_eq!(redis(&tb, &["GET", "k"]), "v");
    let s = app.status('a').unwrap();
    assert_eq!(s["role"], "solo", "{s:#}");
    assert_eq!(s["log"]["last_seq"], 0, "input was logged: {s:#}");
    assert_eq!(s["vm"]["vmlog_frames"], 0, "VMM entries were sent: {s:#}");
    assert_eq!(
        s["vm"]["log_entries"], 0,
        "VMM entries were recorded: {s:#}"
    );
    assert_eq!(app.held('a').unwrap(), 0);
    // The logging NIC stayed (nearly) silent: no log frames, no heartbeats.
    let log_tx = tb.tx_packets(&tb.a.ns, LOG_IF).unwrap() - log_tx0;
    assert!(log_tx < 10, "the logging NIC sent {log_tx} frames");
    assert!(app.counter('a', "solo_delivered_frames_total").unwrap() > 15_000);
}

/// The join service gives the VM's memory only to a host that holds the channel key: a
/// hello from the logging link with the live epoch and the right configuration hash but
/// no MAC under the key is refused and counted (`join_auth_failures`), and nothing is
/// transferred; the pair keeps replicating. (A joiner with the key is answered: every
/// re-protection test joins that way.)
#[test]
fn a_join_hello_without_the_channel_key_is_refused_and_counted() {
    use std::io::BufRead;
    let _s = serial();
    let tb = Testbed::new(TestbedOptions {
        start_standins: false,
        ..Default::default()
    })
    .unwrap();
    let _arb = ft_testbed::start_arbiter(&tb).unwrap();
    let app = Appliance::start(
        &tb,
        &ApplianceOptions {
            vm: VmOptions::vmm(),
            fence: ft_testbed::embedded_fence(2000, 400),
            join: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(app.wait_replicating(T), "{:#}", app.status('a').unwrap());
    let st = app.status('a').unwrap();
    let epoch = st["epoch"].as_u64().unwrap();
    let addr = format!(
        "{}:{}",
        ft_testbed::names::HOST_A_LOG_IP,
        ft_testbed::appliance::JOIN_PORT
    );
    // From host B's namespace, where a joining backup would connect: read the challenge,
    // answer with a hello that cannot prove the key.
    let ask = |mac: &str| -> (String, String) {
        ft_testbed::try_run_in_ns(&tb.b.ns, || {
            let s = TcpStream::connect(&addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut w = s.try_clone().unwrap();
            let mut r = std::io::BufReader::new(s);
            let mut challenge = String::new();
            r.read_line(&mut challenge).unwrap();
            let hello = format!(
                "{{\"version\":{},\"node\":\"intruder\",\"epoch\":{epoch},\"config_hash\":{},\
                 \"nonce\":\"00112233445566778899aabbccddeeff\",\"mac\":\"{mac}\"}}\n",
                ftd::vm::join::protocol::JOIN_VERSION,
                st["vm"]["config_hash"].as_u64().unwrap()
            );
            w.write_all(hello.as_bytes()).unwrap();
            let mut reply = String::new();
            let _ = r.read_line(&mut reply);
            (challenge, reply)
        })
        .unwrap()
    };
    let (challenge, reply) = ask("");
    assert!(
        challenge.contains("\"nonce\""),
        "no challenge: {challenge:?}"
    );
    assert!(
        reply.contains("refused") && reply.contains("not authenticated"),
        "{reply}"
    );
    let (_, reply) = ask(&"ab".repeat(32)); // a MAC of the right size, not under the key
    assert!(reply.contains("not authenticated"), "{reply}");
    assert!(
        Appliance::wait_until(T, || app
            .status('a')
            .is_ok_and(|s| s["vm"]["join_auth_failures"] == 2)),
        "{:#}",
        app.status('a').unwrap()
    );
    let st = app.status('a').unwrap();
    assert_eq!(
        st["vm"]["join"],
        Value::Null,
        "no join was attempted: {st:#}"
    );
    assert_eq!(st["vm"]["join_bad_requests"], 0, "{st:#}");
    assert!(
        app.metrics('a')
            .unwrap()
            .contains("ft_join_auth_failures_total 2")
    );
    // The pair is untouched: still primary and backup, the guest answers.
    assert_eq!(st["role"], "primary", "{st:#}");
    assert_eq!(redis(&tb, &["PING"]), "PONG");
    assert!(app.wait_replicating(T));
}
