//! Automatic failover with the VMM inside ftd, fenced by the embedded arbiter. Clients on
//! persistent connections run INCR and SET throughout; after the fault the same
//! connections go on, no acknowledged write is lost, and INCR replies are unique and
//! increase in real-time order (a reply received before a request was sent is smaller).
use std::{
    io::Write,
    time::{Duration, Instant},
};

use ft_testbed::{
    Appliance, ApplianceOptions, ChildGuard, Emissions, Testbed, TestbedOptions, VmEmitters,
    VmOptions, embedded_fence, etcd_fence, etcd_leader, monotonic_ns,
    names::{ARB_IF, CLI_IF, VM_IP, VM_PORT},
    netns::net_counter,
    ns_exec, resp, start_arbiter, start_etcd,
    workload::{Clients, check_history},
};
use serde_json::Value;

const T: Duration = Duration::from_secs(15);
const CLIENTS: usize = 8;
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// The testbed, its arbiter and the pair (dropped in reverse: the pair first).
fn pair() -> (Testbed, ChildGuard, Appliance) {
    let tb = testbed();
    let arb = start_arbiter(&tb).unwrap();
    let app = setup(&tb, embedded_fence(2000, 400));
    (tb, arb, app)
}

fn testbed() -> Testbed {
    Testbed::new(TestbedOptions {
        start_standins: false,
        ..Default::default()
    })
    .unwrap()
}

/// The pair fenced by `fence`, both VMMs up, host A live.
fn setup(tb: &Testbed, fence: String) -> Appliance {
    Appliance::start_replicating(
        tb,
        &ApplianceOptions {
            vm: VmOptions::vmm(),
            fence,
            ..Default::default()
        },
        T,
    )
    .unwrap()
}

/// Runs the clients, injects `fault` once they are busy, waits for `recovered`, lets
/// them go on, and checks what they saw. Returns the VM's output on the client network
/// over the whole run, attributed to the host that emitted it; at no instant did both
/// hosts emit (the emitting host changed at most once).
fn under_load(
    tb: &Testbed,
    app: &Appliance,
    fault: impl FnOnce(),
    recovered: impl Fn() -> bool,
) -> Emissions {
    let emitters = VmEmitters::start(tb).unwrap();
    let clients = Clients::start(tb, CLIENTS, T);
    assert!(
        clients.wait_ops(500, T),
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
    // Every client goes on after the fault (one whose request waited out the fault may
    // be in TCP's retransmission back-off for a while).
    assert!(
        clients.wait_each_goes_on(),
        "a client stalled after recovery ({:?}):\nA: {:#}\nB: {:#}",
        clients.each_ops(),
        app.status('a').unwrap_or_default(),
        app.status('b').unwrap_or_default()
    );
    let logs = clients.finish();
    check_history(tb, &logs, t_fault);
    let out = emitters.stop().unwrap();
    let runs = out.runs();
    let dups = out.tcp_duplicates();
    eprintln!(
        "VM frames on the client network: {} via A, {} via B, emitters in order {runs:?}; \
         {} TCP segments sent again ({} by B)",
        out.count('a'),
        out.count('b'),
        dups.len(),
        dups.iter().filter(|(h, _)| *h == 'b').count()
    );
    assert!(
        runs.len() <= 2,
        "both hosts emitted the VM's traffic at the same time: {runs:?}"
    );
    out
}

#[test]
fn the_backup_takes_over_when_the_primary_dies() {
    let _s = serial();
    let (tb, _arb, app) = pair();
    let epoch = app.status('a').unwrap()["epoch"].as_u64().unwrap();
    // A protected pair, as monitoring sees it (`ftd status --check`: exit status 0).
    let line = status_cmd(&app, 'a', &["--check"], 0);
    assert!(
        line.starts_with(&format!("FT OK - node host-a: primary, epoch {epoch}")),
        "{line}"
    );
    let line = status_cmd(&app, 'b', &["--check"], 0);
    assert!(line.starts_with("FT OK - node host-b: backup"), "{line}");
    // Both nodes, as the primary sees them, and the arbiter's record.
    let text = status_text(&app, 'a', 0);
    assert!(
        text.contains("backup host-b: alive")
            && text.contains(&format!("owned by host-a at epoch {epoch}")),
        "{text}"
    );
    let text = status_text(&app, 'b', 0);
    assert!(text.contains("primary host-a: alive"), "{text}");
    let out = under_load(
        &tb,
        &app,
        || app.guard('a').kill().unwrap(),
        || app.live_after_take_over('b'),
    );
    assert_eq!(out.runs(), ['a', 'b']);
    // B announced the VM's addresses: broadcast gratuitous ARP (sender = target = the
    // VM's IP) from the VM's MAC, through B's port.
    let garp = out
        .frames
        .iter()
        .filter(|e| {
            let f = &e.frame;
            e.host == 'b'
                && f.len() >= 42
                && f[..6] == [0xff; 6]
                && f[12..14] == [0x08, 0x06]
                && f[28..32] == VM_IP.octets()
                && f[38..42] == VM_IP.octets()
        })
        .count();
    assert!(garp >= 1, "no gratuitous ARP from B");
    let st = app.status('b').unwrap();
    eprintln!("after the take-over: {:#}", st["role_history"]);
    assert_eq!(st["epoch"].as_u64().unwrap(), epoch + 1, "{st:#}");
    let f = &st["role_history"]["last_failover"];
    assert!(f["what"].as_str().unwrap().contains("took over"), "{f:#}");
    assert!(f["total_ms"].as_f64().unwrap() > 0.0, "{f:#}");
    // No waiting for the old primary's lease (2 s): it paired this backup.
    assert!(f["test_and_set_ms"].as_f64().unwrap() < 1000.0, "{f:#}");
    // What an operator sees: `ftd status` and the metrics.
    // Unprotected now: a warning (exit status 1), and the arbiter's record names B.
    let text = status_text(&app, 'b', 1);
    assert!(
        text.starts_with(&format!("node host-b: SOLO, epoch {}", epoch + 1))
            && text.contains("last failover: took over")
            && text.contains(&format!("owned by host-b at epoch {}", epoch + 1))
            && text.contains("FT WARNING - node host-b: solo")
            && text.contains("unprotected"),
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
    let out = under_load(
        &tb,
        &app,
        || app.guard('b').kill().unwrap(),
        || app.status('a').is_ok_and(|s| s["role"] == "solo"),
    );
    assert_eq!(out.runs(), ['a']);
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
/// at the old one); exactly one wins and serves, the other halts, stops its VM (its
/// daemon then exits: fail-stop) and emits nothing on the client network from then on.
/// Which one wins is a race.
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
    // Seen while the loser still answers: a halted node's daemon exits once its VM
    // stopped.
    let seen = std::cell::Cell::new(None);
    let out = under_load(
        &tb,
        &app,
        || tb.set_log_link_down(true).unwrap(),
        || {
            seen.set(live_and_halted());
            seen.get().is_some()
        },
    );
    let (winner, loser) = seen.get().expect("one live, one halted");
    assert_eq!(out.runs().last(), Some(&winner), "{:?}", out.runs());
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
    // The loser stopped its VM; a daemon configured as primary then exits, one
    // configured as backup stays up, halted. Either way it is never live again.
    if app
        .guard(loser)
        .wait_exit(Duration::from_secs(3))
        .unwrap()
        .is_none()
    {
        let st = app.status(loser).unwrap();
        assert!(
            st["halted"] == true && st["role"] == "standby",
            "the loser is neither halted nor gone: {st:#}"
        );
    }
}

/// The primary frozen (SIGSTOP) for longer than the timeout, shorter than its lease (8 s
/// here, however slow the machine: the paired backup takes over without waiting for
/// it): the backup takes over. Resumed (SIGCONT) with its lease still valid, the old
/// primary finds itself fenced (it can release nothing without acks, and its
/// test-and-set for a new epoch is stale) and halts; it stops its VM, and its daemon
/// exits. At most the output of the guest exit it was frozen in leaves it after the
/// take-over: that output depends only on entries the backup acked before it took
/// over, so the backup computes the same frames (duplicate output at cut-over,
/// harmless); nothing else.
#[test]
fn a_frozen_primary_resumes_fenced_and_never_emits_again() {
    let _s = serial();
    let tb = testbed();
    let _arb = start_arbiter(&tb).unwrap();
    let app = setup(&tb, embedded_fence(8000, 1600));
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
    // From here on B acks nothing: A can release only what B acked before.
    let a_tx0 = tb.tx_packets(&tb.a.ns, CLI_IF).unwrap();
    // Frames arriving at the client bridge from each host's port, attributed by port.
    let emitters = VmEmitters::start(&tb).unwrap();
    app.resume('a').unwrap();
    let frozen = t_freeze.elapsed();
    assert!(
        frozen < Duration::from_millis(7000),
        "froze {frozen:?}: past the lease"
    );
    // Halted (its daemon then exits: it may be gone before a status query sees it).
    assert!(
        Appliance::wait_until(T, || app.status('a').is_ok_and(|s| s["halted"] == true)
            || !app.guard('a').is_running()),
        "the resumed primary did not halt: {:#}",
        app.status('a').unwrap_or_default()
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
    let out = emitters.stop().unwrap();
    let (via_a, via_b) = (out.count('a'), out.count('b'));
    // The capture sees the VM's traffic (through B); through A at most the output of
    // one guest exit for the one client (a reply and an ACK), whose dependencies B
    // acked before it took over.
    assert!(via_b >= 198, "only {via_b} VM frames through host B's port");
    assert!(via_a <= 2, "the fenced primary emitted {via_a} VM frames");
    // Halted, it stopped its VM (fail-stop), and its daemon exited with status 1.
    let exited = app.guard('a').wait_exit(T).unwrap();
    assert!(
        exited.is_some_and(|e| e.code() == Some(1)),
        "the halted primary's daemon did not exit halted: {exited:?}"
    );
    let log = app.guard('a').log_contents();
    assert!(log.contains("halted: stopping the VM"), "{log}");
}

/// The primary frozen while client frames keep arriving: its XDP goes on duplicating
/// them to the backup (and clients retransmit into a frozen VM), so the logging link is
/// never quiet. The backup must still see that the primary's daemon and VM are gone —
/// no heartbeats, no VMM log — and take over. (Before the fix, any frame on the link
/// counted as a sign of life, and a steady client stream kept the VM down for as long
/// as the primary stayed frozen.)
#[test]
fn a_frozen_primary_is_detected_while_client_frames_keep_arriving() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let _s = serial();
    let (tb, _arb, app) = pair();
    let mut c = resp::connect(&tb, T).unwrap();
    assert_eq!(resp::call(&mut c, &[b"PING"]).unwrap(), b"+PONG\r\n");
    let high = |h: char| app.status(h).unwrap()["channel"]["high"].as_u64().unwrap();
    let h0 = high('b');
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        // A datagram to the VM every 2 ms, until the backup took over (or T passed).
        let flood = s.spawn(|| {
            ft_testbed::run_in_ns(&tb.client_ns, || {
                let u = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) && n < 20_000 {
                    u.send_to(b"are you there", (VM_IP, 9)).unwrap();
                    n += 1;
                    std::thread::sleep(Duration::from_millis(2));
                }
                n
            })
        });
        std::thread::sleep(Duration::from_millis(100));
        app.pause('a').unwrap();
        let took_over = Appliance::wait_until(T, || app.live_after_take_over('b'));
        let during = high('b') - h0;
        stop.store(true, Ordering::Relaxed);
        let sent = flood.join().unwrap();
        assert!(
            took_over,
            "no take-over while client frames kept arriving ({sent} sent): {:#}",
            app.status('b').unwrap()
        );
        // The condition under test arose: the frozen primary's XDP kept logging them.
        assert!(
            during > 100,
            "only {during} input frames reached the backup: the link was quiet"
        );
    });
    app.resume('a').unwrap();
    let r = resp::call(&mut c, &[b"PING"]).unwrap();
    assert_eq!(r, b"+PONG\r\n", "the same connection, answered by B");
}

/// The primary alone cut off from the arbiter (its clients and the backup still reach
/// it): its lease lapses and it suspends: output fenced, VM paused, heartbeats stopped,
/// test-and-set at its own epoch retried. A fenced VM that went on running and logging
/// would look alive to the backup, which would never take over, and nobody would serve
/// (found by the chaos suite: a client-link partition of the primary, whose arbiter is
/// on the client network). The backup takes over, on the clients' same connection. When
/// the arbiter is back, the suspended node learns it lost (stale epoch), halts, and its
/// daemon exits with a failure (a restart joins the new primary).
#[test]
fn a_primary_that_loses_its_lease_stops_its_vm_and_the_backup_takes_over() {
    let _s = serial();
    let (tb, _arb, app) = pair();
    let mut c = resp::connect(&tb, T).unwrap();
    for i in 1..=100 {
        let r = resp::call(&mut c, &[b"INCR", b"n"]).unwrap();
        assert_eq!(resp::int_reply(&r).unwrap(), i);
    }
    let arbiter = ft_testbed::names::ARBITER_IP.to_string();
    for args in [
        vec!["add", "table", "inet", "cut"],
        vec![
            "add",
            "chain",
            "inet",
            "cut",
            "out",
            "{ type filter hook output priority 0 ; }",
        ],
        vec![
            "add", "rule", "inet", "cut", "out", "ip", "daddr", &arbiter, "drop",
        ],
    ] {
        ns_exec(&tb.a.ns, "nft", &args).unwrap();
    }
    assert!(
        Appliance::wait_until(T, || app
            .status('a')
            .is_ok_and(|s| s["role"] == "suspended" && s["vm"]["phase"] == "paused")),
        "A kept its lease without the arbiter: {:#}",
        app.status('a').unwrap()
    );
    assert!(
        Appliance::wait_until(T, || app.live_after_take_over('b')),
        "B did not take over from the suspended primary: {:#}",
        app.status('b').unwrap()
    );
    for i in 101..=200 {
        let r = resp::call(&mut c, &[b"INCR", b"n"]).unwrap();
        assert_eq!(resp::int_reply(&r).unwrap(), i);
    }
    // The arbiter back: A finds another node went live at its epoch, halts and exits.
    ns_exec(&tb.a.ns, "nft", &["delete", "table", "inet", "cut"]).unwrap();
    let exit = app.guard('a').wait_exit(T).unwrap();
    assert!(
        exit.is_some_and(|e| e.code() == Some(1)),
        "A did not exit halted: {exit:?}\n{}",
        app.guard('a').log_contents()
    );
    assert!(
        app.guard('a')
            .log_contents()
            .contains("another node went live meanwhile"),
        "{}",
        app.guard('a').log_contents()
    );
}

/// A power cut of the primary's host: its client and logging links go down and its
/// processes freeze at the same instant (nothing of it runs or sends again). The backup
/// notices the silence and takes over; the clients' connections go on through it.
#[test]
fn a_power_cut_of_the_primary_fails_over() {
    let _s = serial();
    let (tb, _arb, app) = pair();
    let epoch = app.status('a').unwrap()["epoch"].as_u64().unwrap();
    let out = under_load(
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
    assert_eq!(out.runs(), ['a', 'b']);
    let st = app.status('b').unwrap();
    assert_eq!(st["epoch"].as_u64().unwrap(), epoch + 1, "{st:#}");
    assert_eq!(st["vm"]["divergence"], Value::Null);
}

/// `ftd status` (the operator's summary) of host `h`, which must exit with `code` (0
/// protected, 1 warning, 2 critical: the Nagios convention).
fn status_text(app: &Appliance, h: char, code: i32) -> String {
    status_cmd(app, h, &[], code)
}

/// `ftd status ARGS` of host `h`: its output, once it exited with `code`.
fn status_cmd(app: &Appliance, h: char, args: &[&str], code: i32) -> String {
    let sock = if h == 'a' { &app.sock_a } else { &app.sock_b };
    let out = std::process::Command::new(ft_testbed::ftd_bin().unwrap())
        .args(["status", "--socket", sock.to_str().unwrap()])
        .args(args)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(code),
        "ftd status {args:?}: {out:?}"
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `ftd preflight` on the live primary: the arbiter answers it with the pair's record
/// (this node, its epoch) and the peer's config agrees; with the arbiter cut off, the
/// same preflight fails and says what to check.
#[test]
fn preflight_asks_the_arbiter_with_the_nodes_credentials() {
    let _s = serial();
    let (tb, _arb, app) = pair();
    let epoch = app.status('a').unwrap()["epoch"].as_u64().unwrap();
    let ftd = ft_testbed::ftd_bin().unwrap();
    let preflight = || {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &tb.a.ns])
            .arg(&ftd)
            .args(["preflight", "--config"])
            .arg(&app.config_a)
            .arg("--peer-config")
            .arg(&app.config_b)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (code, out) = preflight();
    eprintln!("{out}");
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains(&format!("owned by host-a at epoch {epoch}")),
        "{out}"
    );
    tb.set_link(&tb.arbiter_ns, ARB_IF, false).unwrap();
    let (code, out) = preflight();
    tb.set_link(&tb.arbiter_ns, ARB_IF, true).unwrap();
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("FAIL  arbiter") && out.contains("fix: check"),
        "{out}"
    );
}

/// The arbiter unreachable when the primary dies: the backup notices, stops acking and
/// asks the arbiter, which does not answer, so it does not go live, and it says why
/// (status, `ftd status`, metrics). Once the arbiter is back the take-over completes and
/// the clients' connections go on.
#[test]
fn with_the_arbiter_unreachable_nobody_goes_live_until_it_is_back() {
    let _s = serial();
    let (tb, _arb, app) = pair();
    let epoch = app.status('a').unwrap()["epoch"].as_u64().unwrap();
    let mut back_at_ns = 0;
    let out = under_load(
        &tb,
        &app,
        || {
            tb.set_link(&tb.arbiter_ns, ARB_IF, false).unwrap();
            app.guard('a').kill().unwrap();
            // B reaches its test-and-set and stays blocked there for a second by its own
            // account (positive evidence that it got that far and went no further).
            let blocked = Appliance::wait_until(T, || {
                app.status('b').is_ok_and(|s| {
                    s["role_history"]["waiting_for_arbiter"]["for_s"]
                        .as_f64()
                        .is_some_and(|t| t >= 1.0)
                })
            });
            let st = app.status('b').unwrap();
            assert!(blocked, "B never blocked on the arbiter: {st:#}");
            assert_eq!(st["role"], "backup", "{st:#}");
            assert_eq!(app.vm_phase('b').as_deref(), Some("replaying"));
            let w = &st["role_history"]["waiting_for_arbiter"];
            assert!(
                w["what"].as_str().unwrap().contains("cannot take over"),
                "{w:#}"
            );
            assert!(!w["error"].as_str().unwrap().is_empty(), "{w:#}");
            let text = status_text(&app, 'b', 1);
            assert!(
                text.contains("BLOCKED") && text.contains("NOT ANSWERING"),
                "{text}"
            );
            let m = app.metrics('b').unwrap();
            let blocked_s: f64 = m
                .lines()
                .find_map(|l| l.strip_prefix("ft_arbiter_blocked_seconds "))
                .expect("ft_arbiter_blocked_seconds in the metrics")
                .parse()
                .unwrap();
            assert!(blocked_s >= 1.0, "{m}");
            back_at_ns = monotonic_ns();
            tb.set_link(&tb.arbiter_ns, ARB_IF, true).unwrap();
        },
        || app.live_after_take_over('b'),
    );
    assert_eq!(out.runs(), ['a', 'b']);
    // Nothing of the VM's came from B before the arbiter was back.
    let first_b = out.first_from('b').unwrap();
    assert!(
        first_b > back_at_ns,
        "B emitted {} ms before the arbiter was reachable",
        (back_at_ns - first_b) as f64 / 1e6
    );
    let st = app.status('b').unwrap();
    assert_eq!(st["epoch"].as_u64().unwrap(), epoch + 1, "{st:#}");
    assert_eq!(st["role_history"]["waiting_for_arbiter"], Value::Null);
}

/// Fenced by a 3-member etcd cluster: the primary is killed and the etcd leader with
/// it, so the backup's test-and-set meets a leader election. It takes over once the
/// cluster has a new leader, and keeps its lease on the two members left.
#[test]
fn on_etcd_the_backup_takes_over_while_the_etcd_leader_dies() {
    let _s = serial();
    let tb = testbed();
    let mut etcd = start_etcd(&tb, 3).unwrap();
    let app = setup(&tb, etcd_fence(&etcd, 2000, 400));
    let epoch = app.status('a').unwrap()["epoch"].as_u64().unwrap();
    let leader = etcd_leader(&tb, &etcd, T).unwrap();
    let out = under_load(
        &tb,
        &app,
        || {
            app.guard('a').kill().unwrap();
            etcd.members[leader].kill();
        },
        || app.live_after_take_over('b'),
    );
    assert_eq!(out.runs(), ['a', 'b']);
    let new_leader = etcd_leader(&tb, &etcd, T).unwrap();
    assert_ne!(new_leader, leader);
    let st = app.status('b').unwrap();
    eprintln!("{:#}", st["role_history"]);
    assert_eq!(st["epoch"].as_u64().unwrap(), epoch + 1, "{st:#}");
    // Renewed on the members left: still live past the first lease's 2 s.
    let t_live = Instant::now();
    assert!(
        Appliance::wait_until(T, || t_live.elapsed() > Duration::from_millis(2500)
            && app
                .status('b')
                .is_ok_and(|s| s["lease_remaining_s"].as_f64().is_some_and(|l| l > 0.5))),
        "{:#}",
        app.status('b').unwrap()
    );
    assert_eq!(app.status('b').unwrap()["role"], "solo");
}

/// Duplicate output at cut-over is harmless. The client's pure ACKs to the VM are
/// dropped (nftables in the client namespace), so the primary's guest never learns that
/// its last reply arrived; the primary dies; the backup replays to the same state, goes
/// live and sends that reply again. The client's TCP has it already: it drops the copy
/// (counted as a D-SACK it sent) and the connection goes on.
#[test]
fn output_sent_again_at_cut_over_is_dropped_by_the_client() {
    let _s = serial();
    let (tb, _arb, app) = pair();
    let mut c = resp::connect(&tb, T).unwrap();
    let incr = |c: &mut std::net::TcpStream| {
        resp::int_reply(&resp::call(c, &[b"INCR", b"n"]).unwrap()).unwrap()
    };
    for i in 1..=50 {
        assert_eq!(incr(&mut c), i);
    }
    let emitters = VmEmitters::start(&tb).unwrap();
    let rule = format!(
        "add table ip ftdup\n\
         add chain ip ftdup out {{ type filter hook output priority 0; policy accept; }}\n\
         add rule ip ftdup out ip daddr {VM_IP} tcp dport {VM_PORT} tcp flags == ack counter drop\n"
    );
    let rule_file = tb.tmp_dir.join("drop-acks.nft");
    std::fs::write(&rule_file, rule).unwrap();
    ns_exec(&tb.client_ns, "nft", &["-f", rule_file.to_str().unwrap()]).unwrap();
    assert_eq!(incr(&mut c), 51);
    app.guard('a').kill().unwrap();
    let dsacks = net_counter(&tb.client_ns, "TcpExt", "TCPDSACKOldSent").unwrap();
    assert!(
        Appliance::wait_until(T, || app.live_after_take_over('b')),
        "no take-over: {:#}",
        app.status('b').unwrap()
    );
    // The client receives the reply again, from B, and drops it.
    assert!(
        Appliance::wait_until(T, || net_counter(
            &tb.client_ns,
            "TcpExt",
            "TCPDSACKOldSent"
        )
        .unwrap()
            > dsacks),
        "the client never received old data again"
    );
    let dropped_acks = ns_exec(&tb.client_ns, "nft", &["list", "table", "ip", "ftdup"]).unwrap();
    assert!(
        !dropped_acks.contains("counter packets 0 "),
        "{dropped_acks}"
    );
    ns_exec(&tb.client_ns, "nft", &["delete", "table", "ip", "ftdup"]).unwrap();
    for i in 52..=150 {
        assert_eq!(incr(&mut c), i, "on the same connection after the cut-over");
    }
    let out = emitters.stop().unwrap();
    assert_eq!(out.runs(), ['a', 'b']);
    let dups = out.tcp_duplicates();
    assert!(
        dups.iter().any(|(h, _)| *h == 'b'),
        "B sent nothing the client had seen from A: {dups:?}"
    );
}
