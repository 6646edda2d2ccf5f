//! Re-protection through ftd: after a failover the survivor runs the VM alone; the dead
//! host's ftd, restarted as backup, joins it by live state transfer over the logging
//! link and replays from the cut; then the survivor is killed and the joined host takes
//! over. Clients on persistent connections run INCR and SET throughout.
use std::time::{Duration, Instant};

use ft_testbed::{
    Appliance, ChildGuard, Testbed, TestbedOptions, VmEmitters, VmOptions, fenced_pair,
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
    let (arb, app) = fenced_pair(&tb, vm, 2000, T).unwrap();
    (tb, arb, app)
}

/// A pair of 1 GiB guests with the client bridge captured and clients busy.
fn busy_pair_1gib() -> (Testbed, ChildGuard, Appliance, VmEmitters, Clients, Instant) {
    let (tb, arb, app) = pair(VmOptions::Vmm {
        ram_mib: 1024,
        extra: String::new(),
    });
    let emitters = VmEmitters::start(&tb).unwrap();
    let clients = Clients::start(&tb, CLIENTS, T);
    assert!(clients.wait_ops(300, T), "clients made no progress");
    (tb, arb, app, emitters, clients, Instant::now())
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

/// Failover after failover, three times (1 GiB guests): kill the live host, the other takes over,
/// restart the dead one as backup, it joins by state transfer and verifies
/// checkpoints, and it is the one that takes over at the next kill.
#[test]
fn failover_after_failover_with_rejoins() {
    let _s = serial();
    let (tb, _arb, mut app, emitters, clients, t0) = busy_pair_1gib();
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
    assert!(clients.wait_each_goes_on(), "clients stalled");
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

/// Rewrites one line of a host's config (`key = ...`).
fn set_config(app: &Appliance, host: char, key: &str, value: &str) {
    let path = if host == 'a' {
        &app.config_a
    } else {
        &app.config_b
    };
    let text = std::fs::read_to_string(path).unwrap();
    let prefix = format!("{key} = ");
    assert!(
        text.lines().any(|l| l.starts_with(&prefix)),
        "no {key} in {path:?}"
    );
    let text: Vec<String> = text
        .lines()
        .map(|l| {
            if l.starts_with(&prefix) {
                format!("{prefix}{value}")
            } else {
                l.to_string()
            }
        })
        .collect();
    std::fs::write(path, text.join("\n")).unwrap();
}

/// A 1 GiB guest holding ~350 MiB of keys. The backup dies and the primary goes solo
/// (its streams are far from sequence 1). A backup configured with another RAM size is
/// refused by name; one killed during pre-copy leaves the primary solo and serving;
/// the next join succeeds; then the primary dies and the joined backup takes over.
#[test]
fn a_backup_rejoins_a_solo_primary_after_a_refused_and_an_interrupted_join() {
    let _s = serial();
    let (tb, _arb, mut app, emitters, clients, t0) = busy_pair_1gib();
    let epoch = app.status('a').unwrap()["epoch"].as_u64().unwrap();
    app.guard('b').kill().unwrap();
    assert!(
        Appliance::wait_until(T, || app.status('a').is_ok_and(|s| s["role"] == "solo")),
        "A did not go solo"
    );
    // Real data, written while alone: ~100,000 keys of 3,000 bytes.
    let out = ft_testbed::load::fill_keys(&tb, 100_000, 4000).unwrap();
    eprintln!("fill: {out}");
    let keys: u64 = ft_testbed::resp::redis_cli(&tb, &["DBSIZE"])
        .unwrap()
        .parse()
        .unwrap();
    assert!(keys > 80_000, "{keys} keys");

    // 1. Another RAM size: refused, by name; A serves on alone.
    set_config(&app, 'b', "ram_mib", "512");
    app.restart_as_backup(&tb, 'b').unwrap();
    assert!(
        Appliance::wait_until(T, || app.status('b').is_ok_and(|s| s["vm"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("another guest image or VM configuration")))),
        "B was not refused: {:#}",
        app.status('b').unwrap_or_default()
    );
    assert_eq!(app.status('a').unwrap()["role"], "solo");
    app.guard('b').kill().unwrap();
    set_config(&app, 'b', "ram_mib", "1024");
    let at = clients.ops();
    assert!(
        clients.wait_ops(at + 200, T),
        "clients stalled after the refusal"
    );

    // 2. Killed during pre-copy: A stays solo and serving.
    app.restart_as_backup(&tb, 'b').unwrap();
    assert!(
        Appliance::wait_until(T, || app.status('a').is_ok_and(|s| {
            s["vm"]["join"]["phase"]
                .as_str()
                .is_some_and(|p| p.starts_with("pre-copy"))
        })),
        "no pre-copy seen: {:#}",
        app.status('a').unwrap_or_default()["vm"]["join"]
    );
    app.guard('b').kill().unwrap();
    assert!(
        Appliance::wait_until(T, || app
            .status('a')
            .is_ok_and(|s| s["vm"]["join"]["phase"] == "failed")),
        "{:#}",
        app.status('a').unwrap_or_default()["vm"]["join"]
    );
    let st = app.status('a').unwrap();
    eprintln!("interrupted: {:#}", st["vm"]["join"]);
    assert_eq!(st["role"], "solo", "{st:#}");
    let at = clients.ops();
    assert!(
        clients.wait_ops(at + 200, T),
        "clients stalled after the interrupted join"
    );

    // 3. The next join succeeds; an operator follows it with `ftd status --follow-join`.
    let follow = {
        let sock = app.sock_a.clone();
        std::thread::spawn(move || {
            std::process::Command::new(ft_testbed::ftd_bin().unwrap())
                .args([
                    "status",
                    "--follow-join",
                    "--socket",
                    sock.to_str().unwrap(),
                ])
                .output()
                .unwrap()
        })
    };
    app.restart_as_backup(&tb, 'b').unwrap();
    assert!(
        Appliance::wait_until(Duration::from_secs(60), || rejoined(&app, 'a', 'b')),
        "B did not rejoin:\nA: {:#}\nB: {:#}",
        app.status('a').unwrap_or_default(),
        app.status('b').unwrap_or_default()
    );
    let st = app.status('a').unwrap();
    eprintln!("joined: {:#}", st["vm"]["join"]);
    let out = follow.join().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(text.contains("joined with host-b"), "{text}");
    let m = app.metrics('a').unwrap();
    assert!(m.contains("ft_joins_total 1\n"), "{m}");
    assert!(m.contains("ft_join_last_pause_seconds "), "{m}");
    assert!(
        st["vm"]["join"]["bytes"].as_u64().unwrap() > 200 << 20,
        "{st:#}"
    );
    let at = clients.ops();
    assert!(
        clients.wait_ops(at + 300, T),
        "clients stalled after the join"
    );

    // 4. The primary dies; the joined backup takes over.
    app.guard('a').kill().unwrap();
    assert!(
        Appliance::wait_until(T, || app.live_after_take_over('b')),
        "B did not take over: {:#}",
        app.status('b').unwrap_or_default()
    );
    assert!(
        clients.wait_each_goes_on(),
        "clients stalled after the take-over"
    );
    let logs = clients.finish();
    check_history(&tb, &logs, t0);
    let keys_after: u64 = ft_testbed::resp::redis_cli(&tb, &["DBSIZE"])
        .unwrap()
        .parse()
        .unwrap();
    assert!(keys_after >= keys, "{keys_after} keys after, {keys} before");
    let st = app.status('b').unwrap();
    assert!(st["epoch"].as_u64().unwrap() > epoch, "{st:#}");
    assert_eq!(emitters.stop().unwrap().runs(), ['a', 'b']);
}

/// Planned switchover under load: `ftd switchover` on the primary hands the VM to the
/// backup (it gets the whole log and goes live), then the old primary's ftd starts again
/// as backup and joins. The clients lose nothing and see one short gap.
#[test]
fn switchover_under_load_moves_the_live_role_and_loses_nothing() {
    let _s = serial();
    let (tb, _arb, app) = pair(VmOptions::vmm());
    let emitters = VmEmitters::start(&tb).unwrap();
    let clients = Clients::start(&tb, CLIENTS, T);
    assert!(clients.wait_ops(300, T), "clients made no progress");
    let t0 = Instant::now();
    let out = std::process::Command::new(ft_testbed::ftd_bin().unwrap())
        .args(["switchover", "--socket", app.sock_a.to_str().unwrap()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "ftd switchover failed: {out:?}");
    assert!(text.contains("this node is the backup, in sync"), "{text}");
    let (a, b) = (app.status('a').unwrap(), app.status('b').unwrap());
    assert_eq!(b["role"], "primary", "{b:#}");
    assert_eq!(a["role"], "backup", "{a:#}");
    // The same daemon process, started again in place.
    assert!(app.guard('a').is_running());
    assert!(
        clients.wait_each_goes_on(),
        "clients stalled after the switchover"
    );
    let logs = clients.finish();
    // One short gap: the longest time any client waited for a reply.
    let gap = logs
        .iter()
        .flat_map(|l| l.incrs.windows(2).map(|w| w[1].received - w[0].received))
        .max()
        .unwrap();
    eprintln!("longest client gap: {gap:?}");
    // A planned handover: B took over on the END it verified, not on the primary's
    // silence (no failure detection, no lease wait). (How long clients waited depends on
    // the machine and on TCP's retransmission back-off: perf/reprotect measures it.)
    let f = &b["role_history"]["last_failover"];
    assert!(
        f["what"]
            .as_str()
            .is_some_and(|w| w.contains("END verified")),
        "{f:#}"
    );
    assert_eq!(f["detect_ms"].as_f64(), Some(0.0), "{f:#}");
    assert!(gap < Duration::from_secs(15), "gap {gap:?}");
    check_history(&tb, &logs, t0);
    assert_eq!(emitters.stop().unwrap().runs(), ['a', 'b']);
    // Nothing is refused twice: a switchover on the new backup is refused with a reason.
    let out = std::process::Command::new(ft_testbed::ftd_bin().unwrap())
        .args(["switchover", "--socket", app.sock_a.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("run `ftd switchover` on the paired primary"),
        "{out:?}"
    );
}

/// `ftd standby` (maintenance of a host): on the paired primary it hands the VM to the
/// backup and the daemon stops with status 0 (a service manager leaves it stopped); the
/// clients lose nothing. On the node that now runs the VM alone it is refused, with the
/// reason; started again, the stopped host rejoins, and standby on the backup just stops
/// it.
#[test]
fn standby_hands_the_vm_over_and_stops_and_is_refused_where_it_would_stop_the_vm() {
    let _s = serial();
    let (tb, _arb, mut app) = pair(VmOptions::vmm());
    let clients = Clients::start(&tb, CLIENTS, T);
    assert!(clients.wait_ops(300, T), "clients made no progress");
    let t0 = Instant::now();
    let ftd = ft_testbed::ftd_bin().unwrap();
    let standby = |sock: &std::path::Path| {
        std::process::Command::new(&ftd)
            .args(["standby", "--socket"])
            .arg(sock)
            .output()
            .unwrap()
    };
    let out = standby(&app.sock_a);
    assert!(out.status.success(), "ftd standby: {out:?}");
    let st = app.guard('a').wait_exit(T).unwrap();
    assert_eq!(st.and_then(|s| s.code()), Some(0), "A's exit: {st:?}");
    let b = app.status('b').unwrap();
    assert_eq!(b["role"], "solo", "{b:#}");
    let f = &b["role_history"]["last_failover"];
    assert!(
        f["what"]
            .as_str()
            .is_some_and(|w| w.contains("END verified")),
        "a handover, not a failure detection: {f:#}"
    );
    // B runs the VM alone: standby there would stop the VM.
    let out = standby(&app.sock_b);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("runs the VM alone"),
        "{out:?}"
    );
    assert!(app.guard('b').is_running());
    assert!(clients.wait_each_goes_on(), "clients stalled after standby");
    // Started again, A rejoins; standby on the backup stops it at once.
    app.restart_as_backup(&tb, 'a').unwrap();
    assert!(
        Appliance::wait_until(Duration::from_secs(60), || rejoined(&app, 'b', 'a')),
        "A did not rejoin: {:#}",
        app.status('a').unwrap_or_default()
    );
    let out = standby(&app.sock_a);
    assert!(out.status.success(), "ftd standby on the backup: {out:?}");
    let st = app.guard('a').wait_exit(T).unwrap();
    assert_eq!(st.and_then(|s| s.code()), Some(0), "A's exit: {st:?}");
    assert!(app.guard('b').is_running());
    let logs = clients.finish();
    check_history(&tb, &logs, t0);
}

/// The join service answers what it is sent, and nothing else: every connection gets a
/// challenge; a hello signed with the channel key for another epoch is asked to retry
/// (it must read the live epoch again), one for another guest is refused with the
/// reason; one that does not prove the key (no MAC, or a MAC made for
/// another challenge) is refused as unauthenticated without a reason, and counted;
/// garbage closes the connection; and the primary serves on alone, unharmed.
#[test]
fn the_join_service_refuses_stale_foreign_and_malformed_hellos() {
    use std::io::{BufRead, BufReader, Write};
    let _s = serial();
    let (tb, _arb, app) = pair(VmOptions::vmm());
    app.guard('b').kill().unwrap();
    assert!(
        Appliance::wait_until(T, || app.status('a').is_ok_and(|s| s["role"] == "solo")),
        "A did not go solo"
    );
    let st = app.status('a').unwrap();
    let epoch = st["epoch"].as_u64().unwrap();
    let addr = format!(
        "{}:{}",
        ft_testbed::names::HOST_A_LOG_IP,
        ft_testbed::appliance::JOIN_PORT
    );
    // From host B's namespace, where a joining backup would ask: the challenge, then the
    // answer to the line `line(challenge nonce)`.
    let ask = |line: &(dyn Fn(&str) -> Vec<u8> + Sync)| -> String {
        ft_testbed::try_run_in_ns(&tb.b.ns, || {
            let mut s = std::net::TcpStream::connect(&addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut challenge = String::new();
            r.read_line(&mut challenge).unwrap();
            let challenge: ftd::vm::join::protocol::Challenge = serde_json::from_str(&challenge)
                .unwrap_or_else(|e| panic!("challenge {challenge:?}: {e}"));
            s.write_all(&line(&challenge.nonce)).unwrap();
            let mut out = String::new();
            let _ = r.read_line(&mut out);
            out
        })
        .unwrap()
    };
    let key = ftd::channel::auth::ChannelKey::load(
        &ft_testbed::appliance::channel_key_file(&tb).unwrap(),
    )
    .unwrap();
    let config_hash = st["vm"]["config_hash"].as_u64().unwrap();
    let hello = |epoch: u64, config_hash: u64| ftd::vm::join::protocol::Hello {
        version: ftd::vm::join::protocol::JOIN_VERSION,
        node: "joiner".into(),
        epoch,
        config_hash,
        nonce: "00".into(),
        mac: String::new(),
    };
    let line = |h: ftd::vm::join::protocol::Hello| {
        let mut v = serde_json::to_vec(&h).unwrap();
        v.push(b'\n');
        v
    };
    // With the key: another epoch is told to read the live epoch again (a joiner keeps
    // asking until it follows this node's epoch), another guest is refused by reason.
    let r = ask(&|nonce| line(hello(epoch - 1, config_hash).signed(&key, nonce)));
    assert!(
        r.contains("retry") && r.contains("read the live epoch again"),
        "{r}"
    );
    let r = ask(&|nonce| line(hello(epoch, config_hash ^ 1).signed(&key, nonce)));
    assert!(
        r.contains("refused") && r.contains("another guest image or VM configuration"),
        "{r}"
    );
    // Without it (no MAC, or one made for another challenge): refused, told nothing.
    let stale = hello(epoch, config_hash).signed(&key, "an earlier challenge");
    let stale = line(stale);
    for h in [line(hello(epoch, config_hash)), stale] {
        let r = ask(&|_| h.clone());
        assert!(
            r.contains("refused") && r.contains("not authenticated"),
            "{r}"
        );
        assert!(
            !r.contains("epoch") && !r.contains("hash"),
            "told an intruder: {r}"
        );
    }
    assert_eq!(
        ask(&|_| b"GET / HTTP/1.0\r\n\r\n".to_vec()),
        "",
        "garbage gets no answer"
    );
    assert_eq!(
        ask(&|_| vec![b'x'; 8192]),
        "",
        "an endless line gets no answer"
    );
    // Counted once the service is done with the connection (just after it closed it).
    assert!(
        Appliance::wait_until(T, || app.status('a').is_ok_and(
            |s| s["vm"]["join_bad_requests"] == 2 && s["vm"]["join_auth_failures"] == 2
        )),
        "{:#}",
        app.status('a').unwrap()
    );
    let st = app.status('a').unwrap();
    assert_eq!(st["role"], "solo", "{st:#}");
    assert_eq!(st["epoch"].as_u64().unwrap(), epoch);
    assert_eq!(
        st["vm"]["join"],
        Value::Null,
        "no join was attempted: {st:#}"
    );
    let mut c = ft_testbed::resp::connect(&tb, T).unwrap();
    assert_eq!(
        ft_testbed::resp::call(&mut c, &[b"PING"]).unwrap(),
        b"+PONG\r\n"
    );
}
