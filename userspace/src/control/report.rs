//! What `ftd status` prints: the summary for an operator and the health verdict for
//! monitoring (`--check`, and the exit status of every `ftd status`). Pure functions of
//! the status document ([`super::status_json`]).
use serde_json::Value;

/// The verdict of `ftd status --check`, with the exit status monitoring systems read
/// (the Nagios plugin convention, which Icinga, Zabbix agents and Sensu also follow).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// The pair is protected: this node runs its part and its peer follows.
    Ok = 0,
    /// The VM runs, but a single failure would lose it or stop it (unprotected, the
    /// peer silent, a join still running, the arbiter not answering).
    Warning = 1,
    /// This node is halted, fenced, or its replica diverged: act now.
    Critical = 2,
    /// The daemon could not be asked.
    Unknown = 3,
}

impl Level {
    pub fn name(self) -> &'static str {
        match self {
            Level::Ok => "OK",
            Level::Warning => "WARNING",
            Level::Critical => "CRITICAL",
            Level::Unknown => "UNKNOWN",
        }
    }
    pub fn exit_code(self) -> i32 {
        self as i32
    }
}

/// How healthy the node and its pair are, and why (empty reasons: OK).
pub fn health(v: &Value) -> (Level, Vec<String>) {
    let mut out: Vec<(Level, String)> = Vec::new();
    let detail = v["role_detail"].as_str().unwrap_or("-");
    let peer_alive = v["peer_alive"].as_bool();
    match v["role"].as_str() {
        Some("halted") => out.push((Level::Critical, format!("halted: {detail}"))),
        Some("suspended") => out.push((Level::Critical, format!("output fenced: {detail}"))),
        Some("standby") => out.push((Level::Warning, format!("not in the pair yet: {detail}"))),
        Some("solo") => out.push((
            Level::Warning,
            "unprotected: the VM runs here without a backup".into(),
        )),
        Some("primary") if peer_alive != Some(true) => out.push((
            Level::Warning,
            "unprotected: the backup is silent on the logging link".into(),
        )),
        Some("backup") if peer_alive != Some(true) => out.push((
            Level::Warning,
            "the primary is silent on the logging link (this node takes over when it is declared dead)".into(),
        )),
        Some("primary") | Some("backup") => {}
        other => out.push((
            Level::Unknown,
            format!("the daemon reports no known role ({other:?})"),
        )),
    }
    let vm = &v["vm"];
    if let Some(d) = vm["divergence"].as_object() {
        out.push((
            Level::Critical,
            format!(
                "the replicas diverged after exit {}",
                d.get("verified_equal_at_exit").unwrap_or(&Value::Null)
            ),
        ));
    }
    let phase = vm["phase"].as_str().unwrap_or("");
    match phase.split(':').next().unwrap_or("") {
        "joining" => out.push((
            Level::Warning,
            "re-protection running: the backup is not in sync yet".into(),
        )),
        "diverged" if !vm["divergence"].is_object() => {
            out.push((Level::Critical, "the replicas diverged".into()))
        }
        "failed" => out.push((
            Level::Critical,
            format!(
                "the VM failed: {}",
                vm["error"].as_str().unwrap_or("see ftd's log")
            ),
        )),
        _ => {}
    }
    // A paired node whose VM is not doing its part protects nothing.
    let idle = matches!(
        (v["role"].as_str(), phase),
        (
            Some("primary"),
            "not started" | "paused" | "stopped" | "replaying" | "live"
        ) | (
            Some("backup"),
            "not started" | "paused" | "stopped" | "recording"
        )
    );
    if vm.is_object() && idle {
        out.push((
            Level::Warning,
            format!(
                "the VM is {phase} on this {}",
                v["role"].as_str().unwrap_or("node")
            ),
        ));
    }
    let w = &v["role_history"]["waiting_for_arbiter"];
    if w.is_object() {
        out.push((
            Level::Warning,
            format!(
                "blocked {:.0} s on the arbiter: {}",
                w["for_s"].as_f64().unwrap_or(0.0),
                w["error"].as_str().unwrap_or("-")
            ),
        ));
    }
    if let Some(e) = v["arbiter"]["error"].as_str() {
        out.push((Level::Warning, format!("the arbiter does not answer: {e}")));
    }
    let level = out.iter().map(|(l, _)| *l).max().unwrap_or(Level::Ok);
    (level, out.into_iter().map(|(_, r)| r).collect())
}

/// The one line of `ftd status --check`: `FT OK - node a: primary, epoch 3, backup in sync`.
pub fn check_line(v: &Value) -> (Level, String) {
    let (level, reasons) = health(v);
    let what = if reasons.is_empty() {
        match v["role"].as_str() {
            Some("primary") => "the backup follows".to_string(),
            _ => "following the primary".to_string(),
        }
    } else {
        reasons.join("; ")
    };
    (
        level,
        format!(
            "FT {} - node {}: {}, epoch {}: {what}",
            level.name(),
            v["node"].as_str().unwrap_or("-"),
            v["role"].as_str().unwrap_or("-"),
            v["epoch"]
        ),
    )
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
                "primary{}: {peer}; log received: input {} of {}, VMM {} of {}",
                peer_name(v),
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
                "backup{}: {peer}{}; unacked: input {}, VMM {}; held output frames: {}",
                peer_name(v),
                v["backup_left"]
                    .as_str()
                    .map_or(String::new(), |w| format!(" (left: {w})")),
                lag(&log["last_seq"], &log["acked"]),
                lag(&log["vm_last"], &log["vm_acked"]),
                s(&v["held_frames"])
            );
        }
    }
    let a = &v["arbiter"];
    if a.is_object() {
        let backend = s(&a["backend"]);
        match a["error"].as_str() {
            Some(e) => {
                let _ = writeln!(o, "arbiter ({backend}): NOT ANSWERING: {e}");
            }
            None if a["epoch"].is_u64() => {
                let _ = writeln!(
                    o,
                    "arbiter ({backend}): vm {} owned by {} at epoch {}, lease {:.1} s left",
                    s(&a["vm"]),
                    s(&a["owner"]),
                    s(&a["epoch"]),
                    a["lease_remaining_s"].as_f64().unwrap_or(0.0)
                );
            }
            None => {
                let _ = writeln!(o, "arbiter: none (static lease, no split-brain protection)");
            }
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

/// " host-b" when the status names the peer.
fn peer_name(v: &Value) -> String {
    v["peer_name"]
        .as_str()
        .map_or(String::new(), |n| format!(" {n}"))
}

/// One line about the running or last join (state transfer to or from the peer).
pub(super) fn join_line(j: &Value) -> String {
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

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn node(role: &str, peer_alive: Option<bool>) -> Value {
        json!({"node": "a", "role": role, "epoch": 3, "peer_alive": peer_alive,
               "vm": {"phase": "recording"}, "role_history": {}})
    }

    #[test]
    fn a_protected_pair_is_ok() {
        assert_eq!(health(&node("primary", Some(true))), (Level::Ok, vec![]));
        let mut b = node("backup", Some(true));
        b["vm"]["phase"] = json!("replaying");
        assert_eq!(health(&b).0, Level::Ok);
        let (l, line) = check_line(&node("primary", Some(true)));
        assert_eq!(l, Level::Ok);
        assert!(
            line.starts_with("FT OK - node a: primary, epoch 3"),
            "{line}"
        );
    }

    #[test]
    fn unprotected_is_a_warning() {
        assert_eq!(health(&node("solo", None)).0, Level::Warning);
        assert_eq!(health(&node("primary", Some(false))).0, Level::Warning);
        assert_eq!(health(&node("backup", Some(false))).0, Level::Warning);
        assert_eq!(health(&node("standby", None)).0, Level::Warning);
        let mut j = node("backup", Some(true));
        j["vm"]["phase"] = json!("joining: memory round 2");
        assert_eq!(health(&j).0, Level::Warning);
        let mut s = node("primary", Some(true));
        s["vm"]["phase"] = json!("stopped");
        assert_eq!(health(&s).0, Level::Warning);
        let mut s = node("backup", Some(true));
        s["vm"]["phase"] = json!("not started");
        assert_eq!(health(&s).0, Level::Warning);
        let mut a = node("primary", Some(true));
        a["arbiter"] = json!({"backend": "etcd", "error": "connection refused"});
        let (l, why) = health(&a);
        assert_eq!(l, Level::Warning);
        assert!(why[0].contains("connection refused"), "{why:?}");
    }

    #[test]
    fn halted_fenced_and_diverged_are_critical() {
        let mut h = node("halted", None);
        h["role_detail"] = json!("fenced by epoch 4");
        let (l, why) = health(&h);
        assert_eq!(l, Level::Critical);
        assert_eq!(why, vec!["halted: fenced by epoch 4".to_string()]);
        assert_eq!(health(&node("suspended", None)).0, Level::Critical);
        let mut d = node("backup", Some(true));
        d["vm"] = json!({"phase": "diverged", "divergence": {"verified_equal_at_exit": 77}});
        let (l, why) = health(&d);
        assert_eq!(l, Level::Critical);
        assert!(why[0].contains("77"), "{why:?}");
        // The worst reason decides, and every reason is said.
        let mut both = node("solo", None);
        both["vm"] = json!({"phase": "failed", "error": "guest triple fault"});
        let (l, why) = health(&both);
        assert_eq!((l, why.len()), (Level::Critical, 2));
        assert_eq!(Level::Critical.exit_code(), 2);
    }
}
