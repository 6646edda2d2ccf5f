//! Restarts that never lose the VM (issue 18): a restarted daemon joins the live VM
//! instead of booting a fresh one over it; a node alone survives an arbiter outage
//! longer than its lease; a slow backup slows its primary (it is not dropped) and takes
//! over with everything it acked; a joiner killed right after the cut joins when it is
//! started again; a halted node exits, and started again with the same config, joins.
//! Clients on persistent connections run INCR and SET throughout; after each fault the
//! same connections go on, and no acknowledged write is lost.
use std::time::{Duration, Instant};

use ft_testbed::{
    Appliance, ChildGuard, CpuThrottle, Testbed, TestbedOptions, VmEmitters, VmOptions,
    fenced_pair,
    names::{ARBITER_IP, VM_IP},
    ns_exec,
    workload::{Clients, check_history},
};
use serde_json::Value;

const T: Duration = Duration::from_secs(20);
const CLIENTS: usize = 6;
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// The testbed, its arbiter (lease 2 s) and the pair: A started as primary (the pair's
/// first start boots there), B as backup; both serve joins.
fn pair() -> (Testbed, ChildGuard, Appliance) {
    pair_with_lease(2000)
}

fn pair_with_lease(lease_ms: u64) -> (Testbed, ChildGuard, Appliance) {
    let tb = Testbed::new(TestbedOptions {
        start_standins: false,
        ..Default::default()
    })
    .unwrap();
    let (arb, app) = fenced_pair(&tb, VmOptions::vmm(), lease_ms, T).unwrap();
    (tb, arb, app)
}

/// `joiner` replays the log of `primary`, which is paired again, and has verified a
/// checkpoint: the VM is protected.
fn rejoined(app: &Appliance, primary: char, joiner: char) -> bool {
    let (Ok(p), Ok(j)) = (app.status(primary), app.status(joiner)) else {
        return false;
    };
    p["role"] == "primary"
        && j["role"] == "backup"
        && j["vm"]["phase"] == "replaying"
        && j["vm"]["checkpoints_verified"].as_u64().unwrap_or(0) > 0
}

fn statuses(app: &Appliance) -> String {
    format!(
        "A: {:#}\nB: {:#}",
        app.status('a').unwrap_or_default(),
        app.status('b').unwrap_or_default()
    )
}

/// The roles `host` went through, in order (its role history).
fn path(app: &Appliance, host: char) -> Vec<String> {
    app.status(host).unwrap()["role_history"]["transitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["to"].as_str().unwrap().to_string())
        .collect()
}

/// Issue 18, item 1: A primary, B backup, clients writing. B's daemon frozen, A's killed
/// and started again from its original config (role = "primary"): A must not boot a
/// fresh guest (its lease from before the restart is still valid at the arbiter, and
/// B holds the VM). B, resumed, takes over; A waits, then joins it by state transfer.
/// The clients' connections go on through B and see no write lost (a fresh guest would
/// reset them and start INCR at 1).
#[test]
fn a_restarted_primary_joins_the_live_vm_instead_of_booting_a_fresh_one() {
    let _s = serial();
    let (tb, _arb, mut app) = pair();
    let emitters = VmEmitters::start(&tb).unwrap();
    let clients = Clients::start(&tb, CLIENTS, T);
    assert!(clients.wait_ops(300, T), "clients made no progress");
    let epoch = app.status('a').unwrap()["epoch"].as_u64().unwrap();
    app.pause('b').unwrap();
    let t_fault = Instant::now();
    app.guard('a').kill().unwrap();
    app.restart(&tb, 'a', &[]).unwrap();
    // A restarted: it waits (the VM of this epoch lives on the paired B) and says so.
    assert!(
        Appliance::wait_until(T, || app.status('a').is_ok_and(|s| s["role"] == "standby"
            && s["role_detail"]
                .as_str()
                .is_some_and(|d| d.contains("before it restarted")))),
        "{}",
        statuses(&app)
    );
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        app.role('a').as_deref(),
        Some("standby"),
        "A went live over B's VM: {}",
        statuses(&app)
    );
    app.resume('b').unwrap();
    assert!(
        Appliance::wait_until(T, || app.live_after_take_over('b')),
        "B did not take over: {}",
        statuses(&app)
    );
    assert!(
        Appliance::wait_until(Duration::from_secs(60), || rejoined(&app, 'b', 'a')),
        "A did not join B: {}",
        statuses(&app)
    );
    let log = app.guard('a').log_contents();
    assert!(
        log.contains("configured primary, but a VM of this pair lives"),
        "{log}"
    );
    assert!(
        clients.wait_each_goes_on(),
        "clients stalled after the join"
    );
    let logs = clients.finish();
    check_history(&tb, &logs, t_fault);
    let st = app.status('b').unwrap();
    assert_eq!(st["epoch"].as_u64().unwrap(), epoch + 1, "{st:#}");
    // A never emitted the VM's traffic after its restart: A, then B.
    let out = emitters.stop().unwrap();
    assert_eq!(out.runs(), ['a', 'b'], "emitters");
}

/// Issue 18, item 2: B's daemon killed, A runs alone; the arbiter unreachable for longer
/// than the lease. A suspends (output fenced, VM paused) instead of halting, retries
/// test-and-set at its own epoch, and resumes in the next epoch when the arbiter is
/// back: the same client connections go on and nothing acknowledged is lost.
#[test]
fn a_node_alone_survives_an_arbiter_outage_longer_than_its_lease() {
    let _s = serial();
    let (tb, _arb, app) = pair();
    let clients = Clients::start(&tb, CLIENTS, Duration::from_secs(30));
    assert!(clients.wait_ops(300, T), "clients made no progress");
    app.guard('b').kill().unwrap();
    assert!(
        Appliance::wait_until(T, || app.role('a').as_deref() == Some("solo")),
        "A did not go solo: {}",
        statuses(&app)
    );
    let epoch = app.status('a').unwrap()["epoch"].as_u64().unwrap();
    let t_fault = Instant::now();
    let cut = cut_off_from_the_arbiter(&tb, &tb.a.ns);
    // The lease (2 s) lapses: A suspends, its VM paused.
    assert!(
        Appliance::wait_until(T, || app
            .status('a')
            .is_ok_and(|s| s["role"] == "suspended" && s["vm"]["phase"] == "paused")),
        "A did not suspend: {}",
        statuses(&app)
    );
    // Lease + 1 s in all, then the arbiter is back.
    std::thread::sleep(Duration::from_millis(3000).saturating_sub(t_fault.elapsed()));
    let ops = clients.ops();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(clients.ops(), ops, "clients were served while suspended");
    drop(cut);
    assert!(
        Appliance::wait_until(T, || app.status('a').is_ok_and(|s| s["role"] == "solo"
            && s["epoch"].as_u64() > Some(epoch)
            && s["vm"]["phase"] == "recording")),
        "A did not resume: {}",
        statuses(&app)
    );
    assert!(
        path(&app, 'a').ends_with(&["suspended".into(), "solo".into()]),
        "{:?}",
        path(&app, 'a')
    );
    assert!(
        clients.wait_each_goes_on(),
        "clients stalled after the outage"
    );
    let logs = clients.finish();
    check_history(&tb, &logs, t_fault);
}

/// Issue 18, item 3: B's daemon throttled to a fraction of a CPU under pipelined load
/// (redis-benchmark -P 16), until its log ring fills: B is slow, not dead, so A waits
/// for it (its output waits for acks that come at B's pace) instead of going solo. Then A is killed:
/// B takes over with every write it acknowledged, however long its replay of the
/// backlog takes (a bound on the total drain time would halt it).
#[test]
fn a_slow_backup_slows_the_primary_and_takes_over_with_everything() {
    let _s = serial();
    let (tb, _arb, app) = pair();
    let clients = Clients::start(&tb, CLIENTS, Duration::from_secs(60));
    assert!(clients.wait_ops(300, T), "clients made no progress");
    let ip = VM_IP.to_string();
    let load = tb
        .spawn(
            &tb.client_ns,
            "redis-benchmark",
            [
                "-h",
                &ip,
                "-c",
                "20",
                "-P",
                "16",
                "-n",
                "100000000",
                "-t",
                "set,incr",
                "-q",
            ],
        )
        .unwrap();
    let epoch = app.status('a').unwrap()["epoch"].as_u64().unwrap();
    let throttle = CpuThrottle::new("ft-slow-backup", app.guard('b').pid(), 5, 100_000).unwrap();
    // The condition under test: B's replay falls behind until its log ring fills (its
    // XDP drops what does not fit and stops acking it): A's output then waits for acks
    // that come at B's replay speed (and a primary whose guest runs ahead by a whole
    // VMM window stalls its vCPU).
    let ring_full = Appliance::wait_until(Duration::from_secs(60), || {
        app.counter('b', "log_ring_full").unwrap() > 0
    });
    assert!(ring_full, "B's log ring never filled: {}", statuses(&app));
    // A waits for the slow backup: still the paired primary in the same epoch.
    let t_slow = Instant::now();
    while t_slow.elapsed() < Duration::from_secs(3) {
        let s = app.status('a').unwrap();
        assert!(
            s["role"] == "primary" && s["epoch"].as_u64() == Some(epoch),
            "A dropped its slow backup: {s:#}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        throttle.throttled_periods().unwrap() > 0,
        "B was never throttled"
    );
    let mut vm_b = Value::Null;
    let behind = Appliance::wait_until(T, || {
        vm_b = app.status('b').unwrap()["vm"].clone();
        vm_b["entries_received"].as_u64() > vm_b["entries_replayed"].as_u64()
    });
    assert!(behind, "B is not behind: {vm_b:#}");
    eprintln!(
        "B behind: {} bytes in front of the replay queue, {} entries received, {} replayed",
        vm_b["replay_backlog_bytes"], vm_b["entries_received"], vm_b["entries_replayed"]
    );
    let t_fault = Instant::now();
    drop(load);
    app.guard('a').kill().unwrap();
    assert!(
        Appliance::wait_until(Duration::from_secs(120), || app.live_after_take_over('b')),
        "B did not take over: {}",
        statuses(&app)
    );
    let f = app.status('b').unwrap()["role_history"]["last_failover"].clone();
    eprintln!("take-over with the backlog: {f:#}");
    drop(throttle);
    assert!(
        clients.wait_each_goes_on(),
        "a client stalled after the take-over: {:?}",
        clients.each_ops()
    );
    let logs = clients.finish();
    check_history(&tb, &logs, t_fault);
}

/// Issue 18, item 4: B joins A (alone) and is killed right after the cut. A now counts
/// on the half-joined backup: it answers the restarted B `retry`, and goes solo in a new
/// epoch when that backup makes no progress. B, started again once, must then ask at
/// the new epoch (read again from the arbiter) and join. (A joiner that kept the epoch
/// it read first was refused as stale and never joined.) To be sure B asks while A is
/// still paired, A cannot reach the arbiter until B was told to retry (A's lease, 10 s,
/// outlasts B's restart; A's output stays held meanwhile).
#[test]
fn a_joiner_killed_right_after_the_cut_joins_when_started_again() {
    let _s = serial();
    let (tb, _arb, mut app) = pair_with_lease(10_000);
    let clients = Clients::start(&tb, CLIENTS, Duration::from_secs(60));
    assert!(clients.wait_ops(300, T), "clients made no progress");
    app.guard('b').kill().unwrap();
    assert!(
        Appliance::wait_until(T, || app.role('a').as_deref() == Some("solo")),
        "A did not go solo: {}",
        statuses(&app)
    );
    let epoch = app.status('a').unwrap()["epoch"].as_u64().unwrap();
    let t_fault = Instant::now();
    app.restart(&tb, 'b', &[]).unwrap();
    // The cut: A pairs with the joiner (PRIMARY again).
    assert!(
        Appliance::wait_until(T, || app.role('a').as_deref() == Some("primary")),
        "no cut: {}",
        statuses(&app)
    );
    app.guard('b').kill().unwrap();
    let cut = cut_off_from_the_arbiter(&tb, &tb.a.ns);
    app.restart(&tb, 'b', &[]).unwrap();
    assert!(
        Appliance::wait_until(T, || app.status('b').is_ok_and(|s| s["vm"]["phase"]
            .as_str()
            .is_some_and(|p| p.contains("asks to retry")))),
        "B was not asked to retry: {}",
        statuses(&app)
    );
    drop(cut);
    assert!(
        Appliance::wait_until(Duration::from_secs(60), || rejoined(&app, 'a', 'b')),
        "B did not join after one restart: {}",
        statuses(&app)
    );
    let st = app.status('a').unwrap();
    assert!(st["epoch"].as_u64().unwrap() > epoch, "{st:#}");
    assert!(
        clients.wait_each_goes_on(),
        "a client stalled after the join"
    );
    let logs = clients.finish();
    check_history(&tb, &logs, t_fault);
}

/// Drops everything `ns` sends to the arbiter until dropped.
struct ArbiterCut(String);

fn cut_off_from_the_arbiter(_tb: &Testbed, ns: &str) -> ArbiterCut {
    let arbiter = ARBITER_IP.to_string();
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
        ns_exec(ns, "nft", &args).unwrap();
    }
    ArbiterCut(ns.to_string())
}

impl Drop for ArbiterCut {
    fn drop(&mut self) {
        let _ = ns_exec(&self.0, "nft", &["delete", "table", "inet", "cut"]);
    }
}

/// Issue 18, items 1 and 5: a node acts on its current role, never its configured one,
/// and a halted node exits so that a restart with the same config joins the live VM.
/// A (configured primary) dies, B (configured backup) takes over; A, started again,
/// joins B. B is frozen past the peer timeout: A takes over. B, resumed, finds itself
/// fenced: it halts, stops its VM and its daemon exits with status 1 (it does not wait
/// for a SIGTERM as a configured backup once did). Started again with its config, B
/// joins A. After `ftd switchover` on A, a restart of A from its config joins B.
#[test]
fn a_halted_node_exits_and_a_restart_with_its_config_joins_the_live_vm() {
    let _s = serial();
    let (tb, _arb, mut app) = pair();
    let clients = Clients::start(&tb, CLIENTS, T);
    assert!(clients.wait_ops(300, T), "clients made no progress");
    let t0 = Instant::now();
    app.guard('a').kill().unwrap();
    assert!(
        Appliance::wait_until(T, || app.live_after_take_over('b')),
        "B did not take over: {}",
        statuses(&app)
    );
    app.restart(&tb, 'a', &[]).unwrap();
    assert!(
        Appliance::wait_until(Duration::from_secs(60), || rejoined(&app, 'b', 'a')),
        "A did not join B: {}",
        statuses(&app)
    );
    // B, live after its take-over (configured backup), frozen: A takes over.
    app.pause('b').unwrap();
    assert!(
        Appliance::wait_until(T, || app.live_after_take_over('a')),
        "A did not take over: {}",
        statuses(&app)
    );
    app.resume('b').unwrap();
    let exit = app.guard('b').wait_exit(T).unwrap();
    assert!(
        exit.is_some_and(|e| e.code() == Some(1)),
        "B did not exit halted: {exit:?}\n{}",
        app.guard('b').log_contents()
    );
    assert!(
        app.guard('b').log_contents().contains("halted"),
        "{}",
        app.guard('b').log_contents()
    );
    app.restart(&tb, 'b', &[]).unwrap();
    assert!(
        Appliance::wait_until(Duration::from_secs(60), || rejoined(&app, 'a', 'b')),
        "B did not join A: {}",
        statuses(&app)
    );
    // A planned switchover on A, then `systemctl restart ftd` on A: it joins B.
    let out = std::process::Command::new(ft_testbed::ftd_bin().unwrap())
        .args(["switchover", "--socket", app.sock_a.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "ftd switchover failed: {out:?}");
    assert!(
        Appliance::wait_until(T, || rejoined(&app, 'b', 'a')),
        "{}",
        statuses(&app)
    );
    // (The switchover started ftd again by exec: the same process.)
    app.guard('a').kill().unwrap();
    app.restart(&tb, 'a', &[]).unwrap();
    assert!(
        Appliance::wait_until(Duration::from_secs(60), || rejoined(&app, 'b', 'a')),
        "A did not join B after its restart: {}",
        statuses(&app)
    );
    assert!(clients.wait_each_goes_on(), "clients stalled");
    let logs = clients.finish();
    check_history(&tb, &logs, t0);
    assert_eq!(app.status('b').unwrap()["vm"]["divergence"], Value::Null);
}
