//! Re-protection through ftd: after a failover the survivor runs the VM alone; the dead
//! host's ftd, restarted as backup, joins it by live state transfer over the logging
//! link and replays from the cut; then the survivor is killed and the joined host takes
//! over. Clients on persistent connections run INCR and SET throughout.
use std::time::{Duration, Instant};

use ft_testbed::{
    Appliance, ApplianceOptions, ChildGuard, Testbed, TestbedOptions, VmEmitters, VmOptions,
    embedded_fence, start_arbiter,
    workload::{Clients, check_history},
};
use serde_json::Value;

const T: Duration = Duration::from_secs(20);
const CLIENTS: usize = 8;
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn pair(vm: VmOptions) -> (Testbed, ChildGuard, Appliance) {
    let tb = Testbed::new(TestbedOptions {
        start_standins: false,
        ..Default::default()
    })
    .unwrap();
    let arb = start_arbiter(&tb).unwrap();
    let app = Appliance::start(
        &tb,
        &ApplianceOptions {
            vm,
            fence: embedded_fence(2000, 400),
            join: true,
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
    (tb, arb, app)
}

fn other(h: char) -> char {
    if h == 'a' { 'b' } else { 'a' }
}

/// `joiner` replays the log of `primary`, which is paired again: the join is done.
fn rejoined(app: &Appliance, primary: char, joiner: char) -> bool {
    let (Ok(p), Ok(j)) = (app.status(primary), app.status(joiner)) else {
        return false;
    };
    p["role"] == "primary"
        && j["role"] == "backup"
        && j["vm"]["phase"] == "replaying"
        && j["vm"]["checkpoints_verified"].as_u64().unwrap_or(0) > 0
}

/// Failover after failover, three times: kill the live host, the other takes over,
/// restart the dead one as backup, it joins by state transfer and verifies
/// checkpoints, and it is the one that takes over at the next kill.
#[test]
fn failover_after_failover_with_rejoins() {
    let _s = serial();
    let (tb, _arb, mut app) = pair(VmOptions::vmm());
    let emitters = VmEmitters::start(&tb).unwrap();
    let clients = Clients::start(&tb, CLIENTS, T);
    assert!(clients.wait_ops(300, T), "clients made no progress");
    let t0 = Instant::now();
    let mut live = 'a';
    let mut epochs = vec![app.status('a').unwrap()["epoch"].as_u64().unwrap()];
    for round in 1..=3 {
        let dead = live;
        live = other(dead);
        app.guard(dead).kill().unwrap();
        assert!(
            Appliance::wait_until(T, || app.live_after_take_over(live)),
            "round {round}: {live} did not take over: {:#}",
            app.status(live).unwrap_or_default()
        );
        let at = clients.ops();
        assert!(
            clients.wait_ops(at + 300, T),
            "round {round}: clients stalled after the take-over"
        );
        app.restart_as_backup(&tb, dead).unwrap();
        let ok = Appliance::wait_until(T, || rejoined(&app, live, dead));
        if !ok {
            eprintln!(
                "{live} running: {}, exit: {:?}",
                app.guard(live).is_running(),
                app.guard(live).wait_exit(Duration::from_millis(10))
            );
        }
        assert!(
            ok,
            "round {round}: {dead} did not rejoin:\n{live}: {:#}\n{dead}: {:#}",
            app.status(live).unwrap_or_default(),
            app.status(dead).unwrap_or_default()
        );
        let st = app.status(live).unwrap();
        eprintln!(
            "round {round}: {dead} rejoined {live}: {:#}",
            st["vm"]["join"]
        );
        assert_eq!(st["vm"]["join"]["phase"], "done", "{st:#}");
        epochs.push(st["epoch"].as_u64().unwrap());
        let at = clients.ops();
        assert!(
            clients.wait_ops(at + 300, T),
            "round {round}: clients stalled after the join"
        );
        // The new backup keeps verifying the primary's checkpoints.
        let v0 = app.status(dead).unwrap()["vm"]["checkpoints_verified"]
            .as_u64()
            .unwrap();
        assert!(
            Appliance::wait_until(T, || app
                .status(dead)
                .is_ok_and(|s| s["vm"]["checkpoints_verified"].as_u64().unwrap_or(0) > v0)),
            "round {round}: the joined backup verifies nothing more"
        );
        assert_eq!(
            app.status(dead).unwrap()["vm"]["divergence"],
            Value::Null,
            "round {round}"
        );
    }
    let logs = clients.finish();
    check_history(&tb, &logs, t0);
    eprintln!("epochs: {epochs:?}");
    assert!(epochs.windows(2).all(|w| w[1] > w[0]), "{epochs:?}");
    let out = emitters.stop().unwrap();
    let runs = out.runs();
    eprintln!(
        "emitters in order {runs:?}; {} TCP segments sent again",
        out.tcp_duplicates().len()
    );
    assert_eq!(
        runs,
        ['a', 'b', 'a', 'b'],
        "one host at a time, each in turn"
    );
}
