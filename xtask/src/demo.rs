//! `cargo xtask demo`: the appliance on the namespace testbed, protecting the VMM's
//! guest service. Stock `redis-cli` and `redis-benchmark` in the client namespace talk to
//! the protected VM through host A (primary, recording); host B's VMM replays the log live
//! with its output suppressed. Then it shows the output rule at work, loss repaired on the
//! logging link, and what the channel, the output gate and the backup's replay did; then a
//! failover, and re-protection: the dead host rejoins by live state transfer.
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use ft_testbed::{
    Appliance, ApplianceOptions, Testbed, TestbedOptions, VmOptions, embedded_fence, names::*,
    ns_exec, start_arbiter,
};

const T: Duration = Duration::from_secs(15);

pub fn run() -> Result<()> {
    println!("== testbed: two hosts (client NIC + logging NIC each), a client, an arbiter");
    let tb = Testbed::new(TestbedOptions {
        start_standins: false,
        ..Default::default()
    })?;
    print!("{}", tb.describe());
    let _arb = start_arbiter(&tb)?;
    println!(
        "== ft-arbiter up at {}; starting ftd on both hosts with role = \"auto\", host A with \
         --bootstrap (the pair's first start boots the VM there; host B waits, then joins), \
         each running the VMM (256 MiB guest, Redis-protocol service on {VM_IP}:{VM_PORT})",
        ft_testbed::ARBITER_ADDR
    );
    let mut app = Appliance::start(
        &tb,
        &ApplianceOptions {
            fence: embedded_fence(2000, 400),
            vm: VmOptions::vmm(),
            join: true,
            auto: true,
            ..Default::default()
        },
    )?;
    if !app.wait_replicating(T) {
        bail!(
            "the VMMs did not come up:\nA: {}\nB: {}\nhost A's log:\n{}",
            app.status('a')?,
            app.status('b')?,
            app.guard('a').log_contents()
        );
    }
    let st = app.status('a')?;
    println!(
        "host A won test-and-set: live as primary, epoch {}; its VMM records, host B's replays",
        st["epoch"]
    );

    println!("== redis-cli in the client namespace, through the appliance");
    for args in [
        &["PING"][..],
        &["SET", "greeting", "hello from the protected VM"],
        &["GET", "greeting"],
        &["INCR", "visits"],
        &["SET", "session", "token", "EX", "60"],
        &["TTL", "session"],
        &["DBSIZE"],
    ] {
        println!(
            "   redis-cli {:<42} -> {}",
            args.join(" "),
            redis(&tb, args)?
        );
    }
    let info = redis(&tb, &["INFO", "memory"])?;
    for l in info.lines().filter(|l| l.starts_with("used_memory:")) {
        println!("   INFO memory: {l}");
    }

    let cmd = format!("redis-benchmark -h {VM_IP} -c 50 -n 50000 -t set,get,incr -q");
    println!("== {cmd}");
    for l in benchmark(&tb, &cmd)?
        .lines()
        .filter(|l| l.contains("per second"))
    {
        println!("   {}", l.trim());
    }

    println!("== the output rule: host B's daemon paused (SIGSTOP), so nothing is acked");
    app.pause('b')?;
    let client_ns = tb.client_ns.clone();
    let t0 = Instant::now();
    let incr = std::thread::spawn(move || {
        let ip = VM_IP.to_string();
        let r = ns_exec(
            &client_ns,
            "timeout",
            &["20", "redis-cli", "-h", &ip, "INCR", "visits"],
        );
        (r, t0.elapsed())
    });
    Appliance::wait_until(Duration::from_secs(3), || app.held('a').unwrap_or(0) > 0);
    // (Shorter than peer_timeout_ms: a backup silent for longer is declared failed and
    // the primary goes solo.)
    std::thread::sleep(Duration::from_millis(300));
    println!(
        "   redis-cli INCR visits sent; after {:?} it has no reply, {} reply frame(s) held in host A's kernel",
        t0.elapsed(),
        app.held('a')?
    );
    let t_resume = Instant::now();
    app.resume('b')?;
    let (reply, total) = incr.join().expect("redis-cli thread");
    println!(
        "   host B resumed: reply {:?} released {:?} later ({total:?} after the request)",
        reply?.trim(),
        t_resume.elapsed()
    );

    println!(
        "== loss: every 25th frame on the logging link dropped, both directions (log frames \
         and VMM entries A->B; acks and NACKs B->A)"
    );
    tb.set_log_loss(Some(25))?;
    let cmd = format!("redis-benchmark -h {VM_IP} -c 50 -n 20000 -t set,incr -q");
    let out = benchmark(&tb, &cmd);
    let lost = (
        tb.wire_rule_packets("loss-la"),
        tb.wire_rule_packets("loss-lb"),
    );
    tb.set_log_loss(None)?;
    for l in out?.lines().filter(|l| l.contains("per second")) {
        println!("   {}", l.trim());
    }
    println!(
        "   frames dropped on the wire: {} A->B, {} B->A; GET greeting -> {}",
        lost.0?,
        lost.1?,
        redis(&tb, &["GET", "greeting"])?
    );

    // The clients are quiet: the backup catches up with everything the primary did.
    let caught_up = Appliance::wait_until(T, || {
        let (Ok(a), Ok(b)) = (app.status('a'), app.status('b')) else {
            return false;
        };
        a["vm"]["tx_frames"] == b["vm"]["tx_frames"]
            && a["vm"]["checkpoints"] == b["vm"]["checkpoints_verified"]
    });
    let (a, b) = (app.status('a')?, app.status('b')?);
    let metrics = app.metrics('a')?;

    println!("== logging channel (host A -> host B)");
    let (la, va) = (&a["log"], &a["vm"]);
    println!(
        "   input frames logged by XDP: {} (acked {}), repaired in the kernel: {}",
        la["last_seq"],
        la["acked"],
        app.counter('a', "log_retransmitted_frames_total")?
    );
    println!(
        "   VMM entries: {} in {} VMLOG frames ({} KiB; acked up to frame {}), retransmitted on VMNACK: {}, vCPU waits for a full window: {}",
        va["vmlog_entries"],
        va["vmlog_frames"],
        va["vmlog_bytes"].as_u64().unwrap_or(0) / 1024,
        la["vm_acked"],
        va["vmlog_retransmits"],
        va["window_stalls"]
    );
    println!("== output gate (host A)");
    println!(
        "   frames released by the output rule: {}, held now: {}; hold time {}",
        va["tx_frames"],
        app.held('a')?,
        hold_quantiles(&metrics)?
    );
    println!("== backup's replay (host B)");
    let vb = &b["vm"];
    let behind = vb["entries_received"].as_u64().unwrap_or(0) as i64
        - vb["entries_replayed"].as_u64().unwrap_or(0) as i64;
    println!(
        "   VMM entries received {}, replayed {} ({} behind){}",
        vb["entries_received"],
        vb["entries_replayed"],
        behind,
        if caught_up { "" } else { " -- NOT caught up" }
    );
    println!(
        "   checkpoints: primary made {}, backup verified {}; divergence: {}",
        va["checkpoints"], vb["checkpoints_verified"], vb["divergence"]
    );
    println!(
        "   output: primary released {} frames (hash {}), backup computed {} (hash {}) and \
         suppressed them (its client NIC sent {} frames since the start: the host's own ARP \
         and IPv6 traffic)",
        va["tx_frames"],
        va["tx_hash"],
        vb["tx_frames"],
        vb["tx_hash"],
        tb.tx_packets(&tb.b.ns, CLI_IF)?
    );
    if !caught_up || va["tx_hash"] != vb["tx_hash"] {
        bail!("the backup does not match the primary:\nA: {a:#}\nB: {b:#}");
    }

    println!("== failover: host A's ftd killed (SIGKILL) with a client connection open");
    let mut conn = ft_testbed::resp::connect(&tb, Duration::from_secs(15))?;
    let before = ft_testbed::resp::call(&mut conn, &[b"INCR", b"visits"])?;
    app.guard('a').kill()?;
    let t0 = Instant::now();
    let after = ft_testbed::resp::call(&mut conn, &[b"INCR", b"visits"])?;
    println!(
        "   the same connection: INCR visits -> {} before, {} after ({:?} later)",
        String::from_utf8_lossy(&before).trim(),
        String::from_utf8_lossy(&after).trim(),
        t0.elapsed()
    );
    let sb = app.status('b')?;
    println!(
        "   host B: role {}, epoch {}; how it took over (ms): {}",
        sb["role"], sb["epoch"], sb["role_history"]["last_failover"]
    );
    println!(
        "   redis-cli GET greeting -> {}",
        redis(&tb, &["GET", "greeting"])?
    );
    println!(
        "== re-protection: host A's ftd started again exactly as before (its config, \
         --bootstrap and all, as systemd's Restart=on-failure would): a VM of this pair \
         lives on host B, so it never boots one; it joins host B by live state transfer \
         over the logging link"
    );
    app.restart_configured(&tb, 'a')?;
    let joined = Appliance::wait_until(T, || {
        app.status('b').is_ok_and(|s| s["role"] == "primary")
            && app.status('a').is_ok_and(|s| {
                s["vm"]["phase"] == "replaying"
                    && s["vm"]["checkpoints_verified"].as_u64().unwrap_or(0) > 0
            })
    });
    if !joined {
        bail!(
            "host A did not rejoin:\nA: {}\nB: {}",
            app.status('a')?,
            app.status('b')?
        );
    }
    let j = &app.status('b')?["vm"]["join"];
    println!(
        "   host B is primary again, paired with host A: {} MiB sent, the guest paused {:.1} ms \
         at exit {}, where the new log starts; host A verifies its checkpoints",
        j["bytes"].as_u64().unwrap_or(0) >> 20,
        j["pause_ms"].as_f64().unwrap_or(0.0),
        j["cut_exit"]
    );
    let after2 = ft_testbed::resp::call(&mut conn, &[b"INCR", b"visits"])?;
    println!(
        "   the same client connection: INCR visits -> {}",
        String::from_utf8_lossy(&after2).trim()
    );
    println!("== done; tearing the testbed down");
    Ok(())
}

fn redis(tb: &Testbed, args: &[&str]) -> Result<String> {
    ft_testbed::resp::redis_cli(tb, args)
}

fn benchmark(tb: &Testbed, cmd: &str) -> Result<String> {
    // redis-benchmark -q rewrites its progress line with \r; keep the final lines.
    let out = ns_exec(
        &tb.client_ns,
        "bash",
        &["-c", &format!("timeout 120 {cmd}")],
    )?;
    let out: String = out
        .lines()
        .map(|l| l.rsplit('\r').next().unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n");
    if out.matches("per second").count() < 2 || out.contains("rror") {
        bail!("redis-benchmark failed: {out}");
    }
    Ok(out)
}

/// p50 / p99 / max bucket of the primary's hold-time histogram (upper bucket bounds).
fn hold_quantiles(metrics: &str) -> Result<String> {
    let mut buckets: Vec<(f64, u64)> = Vec::new();
    for l in metrics.lines() {
        let Some(rest) = l.strip_prefix("ft_output_hold_seconds_bucket{le=\"") else {
            continue;
        };
        let (le, cum) = rest.split_once("\"} ").context("hold bucket line")?;
        let le = if le == "+Inf" {
            f64::INFINITY
        } else {
            le.parse()?
        };
        buckets.push((le, cum.trim().parse()?));
    }
    let total = buckets
        .last()
        .map(|b| b.1)
        .context("no hold-time histogram")?;
    if total == 0 {
        return Ok("(nothing held)".into());
    }
    let q = |p: f64| -> String {
        let want = (p * total as f64).ceil() as u64;
        let le = buckets
            .iter()
            .find(|b| b.1 >= want)
            .map(|b| b.0)
            .unwrap_or(f64::INFINITY);
        format!("<= {:.0} us", le * 1e6)
    };
    Ok(format!("p50 {}, p99 {}", q(0.5), q(0.99)))
}
