//! The control socket (`api.control_socket`): typed requests ([`protocol`]) for
//! `ftd status` and `ftd switchover`, served here; the client side ([`client`]) and what
//! the status command prints ([`report`]).
use std::{
    collections::BTreeMap,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use ft_common::maps::COUNTER_INFO;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tracing::{info, warn};

pub mod client;
pub mod protocol;
pub mod report;

use protocol::{MAX_REQUEST, Request, Response};

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
        "peer_name": (!sh.peer_name.is_empty()).then_some(&sh.peer_name),
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

/// What the control socket serves and may ask of the daemon.
pub struct Control {
    pub sh: Arc<Shared>,
    /// Set on an accepted `ftd switchover`; the role supervisor takes it.
    pub switchover: Arc<AtomicBool>,
    /// Set on an accepted `ftd standby`: the daemon stops after it (instead of starting
    /// again after a switchover).
    pub standby: Arc<AtomicBool>,
    /// Asks the daemon to stop (a backup's `ftd standby`), as SIGTERM does.
    pub stop: Arc<tokio::sync::Notify>,
    /// Connections whose request was not understood (answered with an error).
    pub bad_requests: AtomicU64,
}

/// Binds the control socket at `path` (its directory made, a stale socket replaced).
pub fn bind(path: &Path) -> std::io::Result<tokio::net::UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let _ = std::fs::remove_file(path);
    tokio::net::UnixListener::bind(path)
}

/// Serves the control socket until the listener fails. A client that sends nothing
/// within 2 s, or a line that is not a request, gets an error answer; nothing it sends
/// reaches the daemon's state.
pub async fn serve(listener: tokio::net::UnixListener, ctl: Arc<Control>) -> std::io::Result<()> {
    loop {
        let conn = match listener.accept().await {
            Ok((c, _)) => c,
            Err(e) => {
                // EMFILE and friends pass: the socket must outlive them.
                warn!("control socket: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let ctl = ctl.clone();
        tokio::spawn(async move {
            let (rd, mut wr) = conn.into_split();
            let mut rd = tokio::io::BufReader::new(rd).take(MAX_REQUEST as u64 + 1);
            let mut line = Vec::new();
            let read =
                tokio::time::timeout(Duration::from_secs(2), rd.read_until(b'\n', &mut line));
            let answer = match read.await {
                Ok(Ok(_)) => match protocol::parse(line.trim_ascii()) {
                    Ok(req) => answer(&ctl, req).await,
                    Err(e) => {
                        ctl.bad_requests.fetch_add(1, Relaxed);
                        Response::Error {
                            error: e.to_string(),
                        }
                    }
                },
                Ok(Err(e)) => {
                    ctl.bad_requests.fetch_add(1, Relaxed);
                    Response::Error {
                        error: format!("reading the request: {e}"),
                    }
                }
                Err(_) => {
                    ctl.bad_requests.fetch_add(1, Relaxed);
                    Response::Error {
                        error: "no request within 2 s".into(),
                    }
                }
            };
            let body = serde_json::to_vec_pretty(&answer).unwrap_or_default();
            let _ = wr.write_all(&body).await;
        });
    }
}

async fn answer(ctl: &Control, req: Request) -> Response {
    let sh = &ctl.sh;
    match req {
        Request::Status => {
            let mut status = status_json(sh);
            status["control_bad_requests"] = json!(ctl.bad_requests.load(Relaxed));
            Response::Status { status }
        }
        Request::Arbiter => Response::Arbiter {
            arbiter: arbiter_json(sh).await,
        },
        Request::Standby => standby(ctl),
        Request::Switchover => match switchover_refusal(sh) {
            Some(why) => {
                warn!("switchover refused: {why}");
                Response::Refused { why }
            }
            None => {
                info!("switchover: handing the VM to the backup (graceful stop), then rejoining");
                // The supervisor checks again, on the role it has then. A switchover
                // rejoins, whatever an earlier standby that did not happen asked.
                ctl.standby.store(false, Relaxed);
                ctl.switchover.store(true, Relaxed);
                Response::Accepted {
                    what: "switchover: the VM goes to the backup; this node then rejoins as its backup".into(),
                }
            }
        },
    }
}

/// `ftd standby`, decided on the current role.
fn standby(ctl: &Control) -> Response {
    let sh = &ctl.sh;
    let role = sh.roles.current();
    let refused = |why: String| {
        warn!("standby refused: {why}");
        Response::Refused { why }
    };
    match role {
        NodeRole::Primary { .. } => match switchover_refusal(sh) {
            Some(why) => refused(format!("{why} (standby hands the VM to the backup first)")),
            None => {
                info!("standby: handing the VM to the backup (graceful stop), then stopping");
                ctl.standby.store(true, Relaxed);
                ctl.switchover.store(true, Relaxed);
                Response::Accepted {
                    what: "standby: the VM goes to the backup, then this node's ftd stops".into(),
                }
            }
        },
        NodeRole::Backup { .. } => {
            info!("standby: leaving the pair and stopping");
            ctl.standby.store(true, Relaxed);
            ctl.stop.notify_one();
            Response::Accepted {
                what: "standby: this node leaves the pair and its ftd stops; the primary runs unprotected until it is started again".into(),
            }
        }
        NodeRole::Solo { .. } => refused(
            "this node runs the VM alone: standby would stop the VM; start a backup first (or `systemctl stop ftd` to stop the VM)".into(),
        ),
        other => refused(format!(
            "this node is {}, not in the pair: `systemctl stop ftd` stops it",
            other.name()
        )),
    }
}

/// What the arbiter records for this pair's VM, read now (at most 2 s).
async fn arbiter_json(sh: &Shared) -> Value {
    let Some(arb) = sh.arbiter.as_ref() else {
        return json!({"backend": "none", "error": null});
    };
    let describe = arb.describe();
    match tokio::time::timeout(Duration::from_secs(2), arb.read(&sh.vm_id)).await {
        Ok(Ok(o)) => json!({
            "backend": describe,
            "vm": sh.vm_id,
            "owner": o.owner,
            "epoch": o.epoch,
            "lease_remaining_s": o.lease_remaining.as_secs_f64(),
        }),
        Ok(Err(e)) => json!({"backend": describe, "vm": sh.vm_id, "error": e.to_string()}),
        Err(_) => json!({"backend": describe, "vm": sh.vm_id, "error": "no answer within 2 s"}),
    }
}
