//! Fencing on the real testbed: the primary goes live only after winning test-and-set at
//! the arbiter, and the kernel stops its client output when the lease runs out, even
//! when the daemon hangs (no userspace action involved).
use std::time::{Duration, Instant};

use ft_testbed::{
    Appliance, ApplianceOptions, Testbed, TestbedOptions, embedded_fence, start_arbiter,
};

const T: Duration = Duration::from_secs(2);
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The node's role from `ftd status`; an unreachable daemon or a status without a role
/// is an error, never a role.
fn role(app: &Appliance, host: char) -> anyhow::Result<String> {
    let s = app.status(host)?;
    s["role"]
        .as_str()
        .map(String::from)
        .ok_or_else(|| anyhow::anyhow!("status of host {host} has no role: {s}"))
}

fn fenced_options(lease_ms: u64) -> ApplianceOptions {
    ApplianceOptions {
        fence: embedded_fence(lease_ms, lease_ms / 5),
        ..Default::default()
    }
}

#[test]
fn expired_lease_stops_output_in_kernel_even_if_daemon_hangs() {
    let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let tb = Testbed::new(TestbedOptions {
        quiet_standins: true,
        ..Default::default()
    })
    .unwrap();
    let _arb = start_arbiter(&tb).unwrap();
    let app = Appliance::start(&tb, &fenced_options(1000)).unwrap();
    assert!(
        Appliance::wait_until(Duration::from_secs(10), || role(&app, 'a').unwrap()
            == "primary"),
        "A never went live"
    );
    let c = tb.vm_client().unwrap();
    assert_eq!(c.request("INCR n", T).unwrap().as_deref(), Some("1"));
    let epoch_a = app.status('a').unwrap()["epoch"].as_u64().unwrap();
    assert!(Appliance::wait_until(
        T,
        || app.status('b').unwrap()["epoch"].as_u64() == Some(epoch_a)
    ));

    // The primary's daemon hangs: nobody renews its lease. The backup keeps acking, so
    // the only thing that can stop the output is the kernel's lease check.
    let hung_at = Instant::now();
    app.pause('a').unwrap();
    // Still within the lease: output flows without any userspace on the primary.
    assert_eq!(
        c.request("INCR n", Duration::from_millis(300))
            .unwrap()
            .as_deref(),
        Some("2")
    );
    let remaining = Duration::from_millis(1100).saturating_sub(hung_at.elapsed());
    std::thread::sleep(remaining);
    assert_eq!(
        c.request("INCR n", Duration::from_millis(700)).unwrap(),
        None,
        "output after the lease expired"
    );

    // Wake the daemon: it finds its lease lapsed without a refusal from the arbiter, so
    // it suspends and retakes its own epoch by test-and-set; winning proves nobody else
    // went live (this backup runs no VMM: it never takes over), and it serves on alone
    // in the next epoch.
    app.resume('a').unwrap();
    // The counters show that the kernel refused the release while the daemon hung.
    assert!(
        app.counter('a', "release_blocked_no_lease_total").unwrap() >= 1,
        "kernel lease check not hit"
    );
    assert!(
        Appliance::wait_until(Duration::from_secs(10), || app
            .status('a')
            .is_ok_and(|s| s["role"] == "solo" && s["epoch"].as_u64() > Some(epoch_a))),
        "A did not retake its epoch: {:#}",
        app.status('a').unwrap()
    );
    let path: Vec<String> = app.status('a').unwrap()["role_history"]["transitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["to"].as_str().unwrap().to_string())
        .collect();
    assert!(
        path.ends_with(&["suspended".to_string(), "solo".to_string()]),
        "{path:?}"
    );
    assert!(Appliance::wait_until(Duration::from_secs(5), || {
        c.request("PING", Duration::from_millis(300))
            .unwrap()
            .as_deref()
            == Some("PONG")
    }));
}

#[test]
fn arbiter_unreachable_nobody_goes_live_until_it_returns() {
    let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let tb = Testbed::new(TestbedOptions {
        quiet_standins: true,
        ..Default::default()
    })
    .unwrap();
    let app = Appliance::start(&tb, &fenced_options(1000)).unwrap();
    let c = tb.vm_client().unwrap();
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(
        role(&app, 'a').unwrap(),
        "standby",
        "went live without the arbiter"
    );
    assert_eq!(
        c.request("PING", Duration::from_millis(500)).unwrap(),
        None,
        "served without a lease"
    );
    assert!(
        app.counter('a', "standby").unwrap() >= 1,
        "client frames dropped while not live"
    );
    let log = app.guard('a').log_contents();
    assert!(
        log.contains("not going live") && log.contains("10.77.0.2:7700"),
        "error should name the arbiter:\n{log}"
    );

    let _arb = start_arbiter(&tb).unwrap();
    assert!(
        Appliance::wait_until(Duration::from_secs(10), || role(&app, 'a').unwrap()
            == "primary"),
        "A did not go live"
    );
    assert!(Appliance::wait_until(Duration::from_secs(5), || {
        c.request("PING", Duration::from_millis(300))
            .unwrap()
            .as_deref()
            == Some("PONG")
    }));
}
