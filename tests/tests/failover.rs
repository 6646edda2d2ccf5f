//! Automatic failover with the VMM inside ftd, fenced by the embedded arbiter. Clients on
//! persistent connections run INCR and SET throughout; after the fault the same
//! connections go on, no acknowledged write is lost, and INCR replies are unique and
//! increase in real-time order (a reply received before a request was sent is smaller).
use std::{
    io::Write,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use ft_testbed::{
    Appliance, ApplianceOptions, Capture, ChildGuard, Testbed, TestbedOptions, VmOptions,
    embedded_fence,
    names::{BR_PORT_A, BR_PORT_B, CLI_IF, VM_MAC},
    resp, start_arbiter,
};
use serde_json::Value;

const T: Duration = Duration::from_secs(15);
const CLIENTS: usize = 8;
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// One INCR as a client saw it.
#[derive(Clone, Copy, Debug)]
struct Incr {
    sent: Instant,
    received: Instant,
    value: i64,
}

#[derive(Debug, Default)]
struct ClientLog {
    incrs: Vec<Incr>,
    /// The last SET the service acknowledged (its value).
    last_set: Option<u64>,
}

/// A client on one persistent connection: INCR ctr, SET k<id> <n>, until `stop`.
fn client(
    tb: &Testbed,
    id: usize,
    stop: Arc<AtomicBool>,
    ops: Arc<AtomicU64>,
) -> JoinHandle<Result<ClientLog>> {
    let conn = resp::connect(tb, T);
    std::thread::spawn(move || {
        let mut c = conn?;
        let mut log = ClientLog::default();
        let key = format!("k{id}");
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let sent = Instant::now();
            let r = resp::call(&mut c, &[b"INCR", b"ctr"]).with_context(|| {
                format!("client {id}: INCR after {} operations", log.incrs.len())
            })?;
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
        }
        Ok(log)
    })
}

/// Unique INCR values, increasing in real-time order.
fn check_linearizable(all: &[Incr]) {
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

/// The testbed, its arbiter and the pair (dropped in reverse: the pair first).
fn pair() -> (Testbed, ChildGuard, Appliance) {
    let tb = Testbed::new(TestbedOptions {
        start_standins: false,
        ..Default::default()
    })
    .unwrap();
    let arb = start_arbiter(&tb).unwrap();
    let app = setup(&tb);
    (tb, arb, app)
}

/// The pair with the embedded arbiter, both VMMs up, host A live.
fn setup(tb: &Testbed) -> Appliance {
    let app = Appliance::start(
        tb,
        &ApplianceOptions {
            vm: VmOptions::vmm(),
            fence: embedded_fence(2000, 400),
            ..Default::default()
        },
    )
    .unwrap();
    assert!(
        app.wait_replicating(T),
        "not up:\nA: {:#}\nB: {:#}",
        app.status('a').unwrap(),
        app.status('b').unwrap()
    );
    app
}

/// Runs the clients, injects `fault` once they are busy, waits for `recovered`, lets
/// them go on, and checks what they saw. Returns the survivor's status.
fn under_load(tb: &Testbed, app: &Appliance, fault: impl FnOnce(), recovered: impl Fn() -> bool) {
    let stop = Arc::new(AtomicBool::new(false));
    let ops = Arc::new(AtomicU64::new(0));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| client(tb, i, stop.clone(), ops.clone()))
        .collect();
    assert!(
        Appliance::wait_until(T, || ops.load(Ordering::Relaxed) >= 500),
        "clients made no progress before the fault"
    );
    let t_fault = Instant::now();
    fault();
    let ok = Appliance::wait_until(T, &recovered);
    assert!(
        ok,
        "no recovery:\nA: {:#}\nB: {:#}",
        app.status('a').unwrap_or_default(),
        app.status('b').unwrap_or_default()
    );
    // The clients go on after the fault.
    let at = ops.load(Ordering::Relaxed);
    assert!(
        Appliance::wait_until(T, || ops.load(Ordering::Relaxed) >= at + 1000),
        "clients stalled after recovery:\nA: {:#}\nB: {:#}",
        app.status('a').unwrap_or_default(),
        app.status('b').unwrap_or_default()
    );
    stop.store(true, Ordering::Relaxed);
    let mut logs = Vec::new();
    for (i, h) in clients.into_iter().enumerate() {
        match h.join().unwrap() {
            Ok(l) => logs.push(l),
            Err(e) => panic!("client {i} failed (its connection did not survive): {e:#}"),
        }
    }
    let all: Vec<Incr> = logs.iter().flat_map(|l| l.incrs.iter().copied()).collect();
    check_linearizable(&all);
    for (i, l) in logs.iter().enumerate() {
        assert!(
            l.incrs.iter().any(|x| x.sent > t_fault),
            "client {i} made no request after the fault"
        );
    }
    // No acknowledged write is lost.
    let mut c = resp::connect(tb, T).unwrap();
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

#[test]
fn the_backup_takes_over_when_the_primary_dies() {
    let _s = serial();
    let (tb, _arb, app) = pair();
    let epoch = app.status('a').unwrap()["epoch"].as_u64().unwrap();
    under_load(
        &tb,
        &app,
        || app.guard('a').kill().unwrap(),
        || app.live_after_take_over('b'),
    );
    let st = app.status('b').unwrap();
    eprintln!("after the take-over: {:#}", st["role_history"]);
    assert_eq!(st["epoch"].as_u64().unwrap(), epoch + 1, "{st:#}");
    let f = &st["role_history"]["last_failover"];
    assert!(f["what"].as_str().unwrap().contains("took over"), "{f:#}");
    assert!(f["total_ms"].as_f64().unwrap() > 0.0, "{f:#}");
    // No waiting for the old primary's lease (2 s): it paired this backup.
    assert!(f["test_and_set_ms"].as_f64().unwrap() < 1000.0, "{f:#}");
    // What an operator sees: `ftd status` and the metrics.
    let out = std::process::Command::new(ft_testbed::ftd_bin().unwrap())
        .args(["status", "--socket", app.sock_b.to_str().unwrap()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with(&format!("node host-b: SOLO, epoch {}", epoch + 1))
            && text.contains("last failover: took over"),
        "{text}"
    );
    let m = app.metrics('b').unwrap();
    assert!(m.contains("ft_role{role=\"solo\"} 1"), "{m}");
    assert!(
        m.contains("ft_failover_last_phase_seconds{phase=\"total\"}"),
        "{m}"
    );
    assert_eq!(st["vm"]["divergence"], Value::Null);
}

#[test]
fn the_primary_goes_solo_when_the_backup_dies() {
    let _s = serial();
    let (tb, _arb, app) = pair();
    let epoch = app.status('a').unwrap()["epoch"].as_u64().unwrap();
    under_load(
        &tb,
        &app,
        || app.guard('b').kill().unwrap(),
        || app.status('a').is_ok_and(|s| s["role"] == "solo"),
    );
    let st = app.status('a').unwrap();
    eprintln!("after going solo: {:#}", st["role_history"]);
    // A new epoch before any output left without acks (which unpairs the dead backup).
    assert_eq!(st["epoch"].as_u64().unwrap(), epoch + 1, "{st:#}");
    assert_eq!(st["held_frames"], 0, "{st:#}");
    let f = &st["role_history"]["last_failover"];
    assert!(f["what"].as_str().unwrap().contains("solo"), "{f:#}");
}

/// The logging link cut in both directions while both hosts live: both notice the
/// silence and go to the arbiter (the primary for a new epoch, the backup to take over
/// at the old one); exactly one wins and serves, the other halts and emits nothing on
/// the client network from then on.
#[test]
fn a_cut_logging_link_leaves_exactly_one_host_live() {
    let _s = serial();
    let (tb, _arb, app) = pair();
    let live_and_halted = || -> Option<(char, char)> {
        let (a, b) = (app.status('a').ok()?, app.status('b').ok()?);
        match (a["role"].as_str()?, b["role"].as_str()?) {
            ("solo", _) if b["halted"] == true => Some(('a', 'b')),
            (_, "solo") if a["halted"] == true => Some(('b', 'a')),
            _ => None,
        }
    };
    under_load(
        &tb,
        &app,
        || tb.set_log_link_down(true).unwrap(),
        || live_and_halted().is_some(),
    );
    let (winner, loser) = live_and_halted().expect("still one live, one halted");
    let ns = |h: char| if h == 'a' { &tb.a.ns } else { &tb.b.ns };
    eprintln!(
        "host {winner} won: {:#}",
        app.status(winner).unwrap()["role_history"]
    );
    // From now on only the winner emits: 300 more requests, the loser's client NIC
    // stays (nearly) silent (a host's own ARP at most).
    let (w0, l0) = (
        tb.tx_packets(ns(winner), CLI_IF).unwrap(),
        tb.tx_packets(ns(loser), CLI_IF).unwrap(),
    );
    let mut c = resp::connect(&tb, T).unwrap();
    for _ in 0..300 {
        resp::call(&mut c, &[b"INCR", b"after"]).unwrap();
    }
    let (w1, l1) = (
        tb.tx_packets(ns(winner), CLI_IF).unwrap(),
        tb.tx_packets(ns(loser), CLI_IF).unwrap(),
    );
    assert!(w1 - w0 >= 300, "the winner sent {} frames", w1 - w0);
    assert!(l1 - l0 < 5, "the halted host sent {} frames", l1 - l0);
    assert_eq!(app.status(loser).unwrap()["role"], "standby");
}

/// The primary frozen (SIGSTOP) for longer than the timeout, shorter than its lease:
/// the backup takes over. Resumed (SIGCONT) with its lease still valid, the old primary
/// finds itself fenced (it can release nothing without acks, and its test-and-set for
/// a new epoch is stale) and halts, without emitting on the client network again.
#[test]
fn a_frozen_primary_resumes_fenced_and_never_emits_again() {
    let _s = serial();
    let (tb, _arb, app) = pair();
    let mut c = resp::connect(&tb, T).unwrap();
    for _ in 0..100 {
        resp::call(&mut c, &[b"INCR", b"n"]).unwrap();
    }
    c.write_all(&ft_guest_service::compat::multibulk(&[b"INCR", b"n"]))
        .unwrap();
    app.pause('a').unwrap();
    let t_freeze = Instant::now();
    assert!(
        Appliance::wait_until(T, || app.live_after_take_over('b')),
        "no take-over: {:#}",
        app.status('b').unwrap()
    );
    // From here on B acks nothing: whatever A releases now broke the output rule.
    let a_tx0 = tb.tx_packets(&tb.a.ns, CLI_IF).unwrap();
    // Frames arriving at the client bridge from each host's port, attributed by port.
    let (cap_a, cap_b) = (
        Capture::start(&tb.client_ns, BR_PORT_A).unwrap(),
        Capture::start(&tb.client_ns, BR_PORT_B).unwrap(),
    );
    app.resume('a').unwrap();
    let frozen = t_freeze.elapsed();
    assert!(
        frozen < Duration::from_millis(1500),
        "froze {frozen:?}: past the lease"
    );
    assert!(
        Appliance::wait_until(T, || app.status('a').is_ok_and(|s| s["halted"] == true)),
        "the resumed primary did not halt: {:#}",
        app.status('a').unwrap()
    );
    // The request sent before the freeze is answered by B, on the same connection.
    assert_eq!(
        resp::int_reply(&resp::read_reply(&mut c).unwrap()).unwrap(),
        101
    );
    for i in 102..300 {
        let r = resp::call(&mut c, &[b"INCR", b"n"]).unwrap();
        assert_eq!(resp::int_reply(&r).unwrap(), i);
    }
    let a_sent = tb.tx_packets(&tb.a.ns, CLI_IF).unwrap() - a_tx0;
    assert!(
        a_sent < 5,
        "the fenced primary sent {a_sent} frames after B took over"
    );
    let from_vm = |frames: Vec<(u64, Vec<u8>)>| {
        frames
            .iter()
            .filter(|(_, f)| f.len() >= 12 && f[6..12] == VM_MAC)
            .count()
    };
    let (via_a, via_b) = (from_vm(cap_a.stop()), from_vm(cap_b.stop()));
    // The capture sees the VM's traffic (through B), and none of it comes through A.
    assert!(via_b >= 198, "only {via_b} VM frames through host B's port");
    assert_eq!(via_a, 0, "the fenced primary emitted {via_a} VM frames");
    let sa = app.status('a').unwrap();
    assert_eq!(sa["role"], "standby", "{sa:#}");
    eprintln!("{}", sa["role_history"]);
}

/// A power cut of the primary's host: its client and logging links go down and its
/// processes freeze at the same instant (nothing of it runs or sends again). The backup
/// notices the silence and takes over; the clients' connections go on through it.
#[test]
fn a_power_cut_of_the_primary_fails_over() {
    let _s = serial();
    let (tb, _arb, app) = pair();
    let epoch = app.status('a').unwrap()["epoch"].as_u64().unwrap();
    under_load(
        &tb,
        &app,
        || {
            std::thread::scope(|s| {
                s.spawn(|| app.pause('a').unwrap());
                s.spawn(|| tb.set_link(&tb.a.ns, CLI_IF, false).unwrap());
                s.spawn(|| {
                    tb.set_link(&tb.a.ns, ft_testbed::names::LOG_IF, false)
                        .unwrap()
                });
            });
        },
        || app.live_after_take_over('b'),
    );
    let st = app.status('b').unwrap();
    assert_eq!(st["epoch"].as_u64().unwrap(), epoch + 1, "{st:#}");
    assert_eq!(st["vm"]["divergence"], Value::Null);
}
