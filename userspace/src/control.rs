//! `ftd status`: a Unix socket answering one JSON document per connection.
use std::{collections::BTreeMap, path::Path, sync::Arc, sync::atomic::Ordering::Relaxed};

use ft_common::maps::COUNTER_INFO;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

use crate::{metrics::lease_remaining_s, role::NodeRole, shared::Shared, vm::VmPhase};

pub fn status_json(sh: &Shared) -> Value {
    let dp = &sh.dp;
    let mut drops = BTreeMap::new();
    let mut counters = BTreeMap::new();
    if let Ok(c) = dp.counters() {
        for (idx, family, reason) in COUNTER_INFO {
            let v = c.get(*idx as usize).copied().unwrap_or(0);
            if reason.is_empty() {
                counters.insert(family.trim_start_matches("ft_").to_string(), v);
            } else {
                drops.insert(reason.to_string(), v);
            }
        }
    }
    let seq = dp.seq_state();
    let chan = dp.chan_state();
    let ctl = dp.hold_ctl().ok();
    let node = dp.node_state().ok();
    let s = &sh.status;
    let role = sh.roles.current();
    let keys = {
        let h = sh.keys.held();
        json!({
            "newest": h.newest.id,
            "older": h.older.as_ref().map(|(k, _)| k.id),
            "send": h.send,
            "peer_newest": dp.keys.peer_newest(),
            "rotation": *s.key_rotation.lock().unwrap(),
        })
    };
    let peer = sh.roles.peer();
    json!({
        "node": sh.node_name,
        "pid": std::process::id(),
        "role": role.name(),
        "role_detail": role.detail(),
        "halted": matches!(role, NodeRole::Halted { .. }),
        "epoch": role.epoch(),
        "lease_remaining_s": node.map(|n| {
            let r = lease_remaining_s(n.lease_deadline_ns);
            if r.is_finite() { json!(r) } else { json!("static") }
        }),
        "interfaces": {
            "client": dp.nics.client.name, "logging": dp.nics.logging.name, "vm": dp.nics.vm.name,
        },
        "session": format!("{:#018x}", s.session.load(Relaxed)),
        "peer_session": format!("{:#018x}", s.peer_session.load(Relaxed)),
        "keys": keys,
        "log": {
            "last_seq": seq.last_seq, "acked": seq.acked, "delivered": chan.delivered,
            "vm_last": chan.vm_last, "vm_acked": seq.vm_acked,
        },
        "held_frames": ctl.map(|c| c.tail.wrapping_sub(c.head)),
        "peer_alive": peer.map(|p| p.alive),
        "peer_silent_ms": peer.map(|p| p.silent_for.as_secs_f64() * 1e3),
        "peer_down_events": s.peer_down_events.load(Relaxed),
        "backup_left": *s.backup_left.lock().unwrap(),
        "channel": {
            "acks_sent": s.acks_sent.load(Relaxed),
            "nacks_sent": s.nacks_sent.load(Relaxed),
            "heartbeats_sent": s.heartbeats_sent.load(Relaxed),
            "frames_to_vm": s.frames_to_vm.load(Relaxed),
            "buffered": s.buffered.load(Relaxed),
            "high": s.high.load(Relaxed),
            "delivery_failed": s.delivery_failed.load(Relaxed),
            "vm_delivered": s.vm_delivered.load(Relaxed),
            "vm_high": s.vm_high.load(Relaxed),
            "stopped_acking": s.stop_acking.load(Relaxed),
        },
        "vm": sh.vm.as_ref().map(|v| v.json()),
        "switchover_refused": switchover_refusal(sh),
        "role_history": sh.roles.json(),
        "previous_exit": sh.previous_exit,
        "counters": counters,
        "drops": drops,
    })
}

/// Why this node cannot hand its VM over now (None: it can): it must be the live,
/// paired primary with a following backup, and its VM must be recording. The daemon
/// checks it on `ftd switchover`'s signal; status carries it, so the command tells the
/// operator why before it asks.
pub fn switchover_refusal(sh: &Shared) -> Option<String> {
    let Some(vm) = sh.vm.as_ref() else {
        return Some("ftd does not run the VM here (vm.kind = \"external\")".into());
    };
    let role = sh.roles.current();
    if !matches!(role, NodeRole::Primary { .. }) {
        return Some(format!(
            "this node is {}, not the paired primary: run `ftd switchover` on the paired primary",
            role.name()
        ));
    }
    if !sh.roles.peer().is_some_and(|p| p.alive) {
        return Some("the backup is not following: nothing to hand over to".into());
    }
    let phase = vm.phase();
    if phase != VmPhase::Recording {
        return Some(format!("the VM is {phase}: nothing to hand over"));
    }
    None
}

pub async fn serve(path: &Path, sh: Arc<Shared>) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let _ = std::fs::remove_file(path);
    let listener = tokio::net::UnixListener::bind(path)?;
    loop {
        let (mut conn, _) = listener.accept().await?;
        let body = serde_json::to_vec_pretty(&status_json(&sh)).unwrap_or_default();
        tokio::spawn(async move {
            let _ = conn.write_all(&body).await;
        });
    }
}

/// Client side of `ftd status`.
pub fn query(path: &Path) -> anyhow::Result<Value> {
    use std::io::Read;
    let mut s = std::os::unix::net::UnixStream::connect(path).map_err(|e| {
        anyhow::anyhow!(
            "cannot reach ftd at {} ({e}); is the daemon running with this control_socket?",
            path.display()
        )
    })?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    Ok(serde_json::from_slice(&buf)?)
}

/// The status for an operator, in the manner of `pcs status` / `drbdadm status`: this
/// node's role, epoch and lease, the peer and how far behind it is, held output, the VM,
/// and the last failover with its phases.
pub fn summary(v: &Value) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    let s = |x: &Value| -> String {
        match x {
            Value::String(s) => s.clone(),
            Value::Null => "-".into(),
            other => other.to_string(),
        }
    };
    let role = s(&v["role"]).to_uppercase();
    let detail = v["role_detail"].as_str();
    let lease = match &v["lease_remaining_s"] {
        Value::Number(n) => format!("{:.1} s left", n.as_f64().unwrap_or(0.0)),
        other => s(other),
    };
    let _ = writeln!(
        o,
        "node {}: {role}, epoch {}, lease {lease}",
        s(&v["node"]),
        s(&v["epoch"])
    );
    match (v["role"].as_str(), detail) {
        (Some("halted"), Some(d)) => {
            let _ = writeln!(
                o,
                "  halted: {d}\n  (it emits nothing; its daemon exits, and a restart joins the live node)"
            );
        }
        (Some("suspended"), Some(d)) => {
            let _ = writeln!(
                o,
                "  suspended: {d}\n  (output fenced, the VM paused; it resumes when it wins test-and-set at its epoch)"
            );
        }
        (Some("standby"), Some(d)) => {
            let _ = writeln!(o, "  waiting: {d}");
        }
        _ => {}
    }
    let log = &v["log"];
    let peer = match v["peer_alive"].as_bool() {
        Some(true) => "alive",
        Some(false) => "SILENT",
        None => "-",
    };
    match v["role"].as_str() {
        Some("backup") => {
            let _ = writeln!(
                o,
                "primary: {peer}; log received: input {} of {}, VMM {} of {}",
                s(&v["log"]["delivered"]),
                s(&v["channel"]["high"]),
                s(&v["channel"]["vm_delivered"]),
                s(&v["channel"]["vm_high"])
            );
        }
        _ => {
            let lag = |last: &Value, acked: &Value| {
                last.as_u64()
                    .zip(acked.as_u64())
                    .map_or("-".into(), |(l, a)| l.saturating_sub(a).to_string())
            };
            let _ = writeln!(
                o,
                "backup: {peer}{}; unacked: input {}, VMM {}; held output frames: {}",
                v["backup_left"]
                    .as_str()
                    .map_or(String::new(), |w| format!(" (left: {w})")),
                lag(&log["last_seq"], &log["acked"]),
                lag(&log["vm_last"], &log["vm_acked"]),
                s(&v["held_frames"])
            );
        }
    }
    let vm = &v["vm"];
    if vm.is_object() {
        let _ = write!(
            o,
            "vm: {}, {} exits, checkpoints made {} / verified {}",
            s(&vm["phase"]),
            s(&vm["exits"]),
            s(&vm["checkpoints"]),
            s(&vm["checkpoints_verified"])
        );
        if let Some(d) = vm["divergence"].as_object() {
            let _ = write!(
                o,
                "; DIVERGED after exit {} (at most {})",
                s(&d["verified_equal_at_exit"]),
                s(&d["exit"])
            );
        }
        let _ = writeln!(o);
    }
    let j = &vm["join"];
    if j.is_object() {
        let _ = writeln!(o, "re-protection: {}", join_line(j));
    }
    let w = &v["role_history"]["waiting_for_arbiter"];
    if w.is_object() {
        let _ = writeln!(
            o,
            "BLOCKED {:.1} s on the arbiter: {} ({})",
            w["for_s"].as_f64().unwrap_or(0.0),
            s(&w["what"]),
            s(&w["error"])
        );
    }
    let f = &v["role_history"]["last_failover"];
    if f.is_object() {
        let ms = |k: &str| f[k].as_f64().unwrap_or(0.0);
        let _ = writeln!(
            o,
            "last failover: {} (detect {:.0} ms, test-and-set {:.1} ms, drain {:.1} ms, announce {:.1} ms; total {:.0} ms)",
            s(&f["what"]),
            ms("detect_ms"),
            ms("test_and_set_ms"),
            ms("drain_ms"),
            ms("announce_ms"),
            ms("total_ms")
        );
    }
    let p = &v["previous_exit"];
    if matches!(p["how"].as_str(), Some("halted") | Some("refused")) {
        let _ = writeln!(
            o,
            "previous run {} (pid {}): {}",
            s(&p["how"]),
            s(&p["pid"]),
            s(&p["why"])
        );
    }
    if let Some(t) = v["role_history"]["transitions"].as_array() {
        for t in t.iter().rev().take(3).rev() {
            let _ = writeln!(
                o,
                "  {} -> {} (epoch {}): {}",
                s(&t["from"]),
                s(&t["to"]),
                s(&t["epoch"]),
                s(&t["reason"])
            );
        }
    }
    o
}

/// One line about the running or last join (state transfer to or from the peer).
fn join_line(j: &Value) -> String {
    let mib = |k: &str| j[k].as_u64().unwrap_or(0) as f64 / (1u64 << 20) as f64;
    let phase = j["phase"].as_str().unwrap_or("-");
    let peer = j["peer"].as_str().unwrap_or("-");
    match phase {
        "done" => format!(
            "joined with {peer}: {:.0} MiB{}, {:.0} ms in all (log from exit {})",
            mib("bytes"),
            j["pause_ms"]
                .as_f64()
                .map_or(String::new(), |p| format!(", the guest paused {p:.1} ms")),
            j["total_ms"].as_f64().unwrap_or(0.0),
            j["cut_exit"]
        ),
        "failed" => format!(
            "the last join failed: {}",
            j["error"].as_str().unwrap_or("-")
        ),
        _ => format!(
            "transferring with {peer}: {phase}, {:.0} MiB sent, {} pages written in the last round ({:.0} pages/s), about {:.1} s left",
            mib("bytes_sent"),
            j["dirty_pages_last_round"],
            j["dirty_pages_per_s"].as_f64().unwrap_or(0.0),
            j["remaining_s"].as_f64().unwrap_or(0.0)
        ),
    }
}

/// `ftd status --follow-join`: a progress bar of the node's running join (state transfer
/// to or from its peer) until it ends or `limit` passes.
pub fn follow_join(socket: &Path, limit: std::time::Duration) -> anyhow::Result<()> {
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} {msg} [{bar:30}] {bytes} ({bytes_per_sec})",
        )?
        .progress_chars("=> "),
    );
    let t0 = std::time::Instant::now();
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    loop {
        let v = query(socket)?;
        let j = &v["vm"]["join"];
        let mut phase = j["phase"].as_str().unwrap_or("");
        // A join that ended before we looked is not the one to follow.
        let old = j["started_unix_ms"].as_u64().is_some_and(|s| s < since);
        if old && (phase == "done" || phase == "failed") {
            phase = "";
        }
        match phase {
            "done" | "failed" => {
                bar.finish_and_clear();
                println!("{}", join_line(j));
                return Ok(());
            }
            "" => bar.set_message("waiting for a join".to_string()),
            _ => {
                let sent = j["bytes_sent"].as_u64().unwrap_or(0);
                let total = j["ram_pages"].as_u64().unwrap_or(0) * 4096;
                bar.set_length(total.max(sent));
                bar.set_position(sent);
                bar.set_message(format!(
                    "{phase}, {} pages dirty last round, ~{:.1} s left",
                    j["dirty_pages_last_round"],
                    j["remaining_s"].as_f64().unwrap_or(0.0)
                ));
            }
        }
        if t0.elapsed() > limit {
            bar.abandon();
            anyhow::bail!("no join ended within {limit:?}");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// `ftd switchover`, on the primary: checks it can hand over (paired, the backup
/// following, the VM recording), asks the daemon (SIGUSR1), and follows it until it runs
/// again as a backup in sync with the new primary.
pub fn switchover(socket: &Path) -> anyhow::Result<()> {
    let v = query(socket)?;
    if let Some(why) = v["switchover_refused"].as_str() {
        anyhow::bail!("{why}");
    }
    let pid = v["pid"]
        .as_i64()
        .ok_or_else(|| anyhow::anyhow!("the daemon did not report its pid"))?;
    // SAFETY: kill(2) with a pid the daemon reported and a signal it handles.
    if unsafe { libc::kill(pid as libc::pid_t, libc::SIGUSR1) } != 0 {
        anyhow::bail!(
            "cannot signal ftd (pid {pid}): {}",
            std::io::Error::last_os_error()
        );
    }
    println!("switchover: the VM goes to the backup; this node then rejoins as backup");
    let t0 = std::time::Instant::now();
    let mut said_backup = false;
    loop {
        std::thread::sleep(std::time::Duration::from_millis(100));
        if t0.elapsed() > std::time::Duration::from_secs(120) {
            anyhow::bail!("this node did not rejoin as backup within 2 minutes: see ftd's log");
        }
        // The daemon restarts in between: the socket is gone for a moment.
        let Ok(v) = query(socket) else { continue };
        if v["role"] == "primary" && t0.elapsed() > std::time::Duration::from_secs(5) {
            anyhow::bail!("the daemon is still primary: it refused (see its log)");
        }
        if v["role"] == "backup" && !said_backup {
            said_backup = true;
            println!("switchover: running as backup, joining the new primary");
        }
        let vm = &v["vm"];
        if v["role"] == "backup"
            && vm["phase"] == "replaying"
            && vm["checkpoints_verified"].as_u64().unwrap_or(0) > 0
        {
            println!(
                "switchover: done in {:.1} s; this node is the backup, in sync ({})",
                t0.elapsed().as_secs_f64(),
                join_line(&vm["join"])
            );
            return Ok(());
        }
        if v["halted"] == true {
            anyhow::bail!(
                "this node halted as backup: {}",
                vm["error"].as_str().unwrap_or("see ftd's log")
            );
        }
    }
}
