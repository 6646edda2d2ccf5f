//! The node's role controller: the one component that writes the `NODE` map (role, epoch,
//! lease deadline) and changes the node's role, while the daemon and the VM keep
//! running. Every transition is logged with its reason and kept for `ftd status`.
//!
//! ```text
//! primary: STANDBY --win test-and-set, pair the peer--> PRIMARY (paired)
//!          PRIMARY --backup failed or left; new epoch by test-and-set--> SOLO
//!          PRIMARY | SOLO --lease lost, or test-and-set lost--> HALTED
//!          SOLO --a backup joined (state transfer's cut, `vm::join`); pair it--> PRIMARY
//! backup:  BACKUP --primary silent; test-and-set at the epoch it followed--> SOLO (live)
//!          BACKUP --replica failed, test-and-set lost, epoch moved on--> HALTED
//! solo:    STANDBY --win test-and-set--> SOLO
//! ```
//!
//! Fencing: a primary is live only after winning test-and-set; the grant's epoch becomes
//! the channel epoch and the lease a CLOCK_BOOTTIME deadline in `NODE` that the kernel
//! checks on the output path. A `LeaseKeeper` renews it (a new one for every new epoch);
//! a failed renewal changes nothing, so the deadline runs out by itself, and a lost lease
//! halts the node for good.
//!
//! Failover (VMM mode): the backup takes over when the primary's log falls silent for
//! `peer_timeout_ms`, without waiting for the primary's lease: the primary paired it at
//! the arbiter, and a paired primary cannot emit without this backup's acks, which stop
//! first. The primary goes solo when the backup stops making progress (its acks do not
//! advance while entries are outstanding, or fall silent) or leaves; it takes a new epoch
//! first, which unpairs, so exactly one of the two wins when both try.
mod backup;
mod primary;

use std::{
    collections::VecDeque,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use ft_common::maps::{NodeState, ROLE_STANDBY, role_name};
use ft_fence::{Arbiter, LeaseKeeper, LeaseState, MonoInstant, TasOutcome};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use crate::{
    channel::status::ChannelStatus,
    config::{Config, Role},
    dataplane::{DataPlane, DataPlaneError},
    vm::VmState,
};

const TICK: Duration = Duration::from_millis(5);
/// How long a new primary waits for its backup's first ack before it goes on alone.
const FIRST_ACK_GRACE: Duration = Duration::from_secs(3);
/// How often a backup asks the arbiter while it waits for a live primary.
const FOLLOW_POLL: Duration = Duration::from_millis(50);
const HISTORY: usize = 32;

/// One change of the node's role or epoch.
#[derive(Clone, Debug, Serialize)]
pub struct Transition {
    pub at_unix_ms: u64,
    pub from: &'static str,
    pub to: &'static str,
    pub epoch: u64,
    pub reason: String,
}

/// How the last failover went, phase by phase (milliseconds).
#[derive(Clone, Debug, Default, Serialize)]
pub struct FailoverReport {
    pub what: String,
    pub at_unix_ms: u64,
    /// Silence (or lack of progress) that triggered it.
    pub detect_ms: f64,
    pub test_and_set_ms: f64,
    /// Backup: replaying the buffered log to its end and going live.
    pub drain_ms: f64,
    /// Backup: frames delivered that the primary's guest never consumed, then the
    /// gratuitous ARP.
    pub announce_ms: f64,
    pub unreferenced_frames: u64,
    pub total_ms: f64,
}

/// The owner of the `NODE` map.
pub struct Roles {
    dp: Arc<DataPlane>,
    status: Arc<ChannelStatus>,
    history: Mutex<VecDeque<Transition>>,
    changes: AtomicU64,
    last_failover: Mutex<Option<FailoverReport>>,
    /// A test-and-set this node needs but the arbiter does not answer: what waits, the
    /// arbiter's last error, and since when (CLOCK_MONOTONIC via `Instant`).
    arbiter_wait: Mutex<Option<ArbiterWait>>,
}

/// An arbiter call the node is blocked on (shown by `ftd status`, counted in metrics).
#[derive(Clone, Debug)]
pub struct ArbiterWait {
    pub what: String,
    pub error: String,
    pub since: std::time::Instant,
}

/// Wall-clock milliseconds since the Unix epoch (for the times operators read).
pub(crate) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Roles {
    pub fn new(dp: Arc<DataPlane>, status: Arc<ChannelStatus>) -> Arc<Roles> {
        Arc::new(Roles {
            dp,
            status,
            history: Mutex::new(VecDeque::new()),
            changes: AtomicU64::new(0),
            last_failover: Mutex::new(None),
            arbiter_wait: Mutex::new(None),
        })
    }

    fn label(&self, n: &NodeState) -> &'static str {
        if self.status.halted.load(Ordering::Relaxed) {
            "halted"
        } else {
            role_name(n.role)
        }
    }

    /// Writes the node state to the kernel (deadline cleared before role/epoch change,
    /// set last: see `DataPlane::set_node_state`) and records the transition.
    pub fn set(&self, next: NodeState, reason: &str) -> Result<(), DataPlaneError> {
        let prev = self.dp.node_state().ok();
        let from = prev.as_ref().map_or("starting", |p| role_name(p.role));
        self.dp.set_node_state(next)?;
        self.status.epoch.store(next.epoch, Ordering::Relaxed);
        let to = self.label(&next);
        if prev.is_none_or(|p| p.role != next.role || p.epoch != next.epoch) || to == "halted" {
            info!(from, to, epoch = next.epoch, reason, "role change");
            self.changes.fetch_add(1, Ordering::Relaxed);
            let mut h = self.history.lock().unwrap();
            if h.len() == HISTORY {
                h.pop_front();
            }
            h.push_back(Transition {
                at_unix_ms: unix_ms(),
                from,
                to,
                epoch: next.epoch,
                reason: reason.to_string(),
            });
        }
        Ok(())
    }

    /// Halts the node: not live, no lease, and `halted` (nothing is ever emitted again).
    pub fn halt(&self, reason: &str) {
        error!("{reason}: this node halts (fail-stop) and emits nothing until restarted");
        self.status.halted.store(true, Ordering::Relaxed);
        let epoch = self.status.epoch.load(Ordering::Relaxed);
        if let Err(e) = self.set(
            NodeState {
                epoch,
                lease_deadline_ns: 0,
                role: ROLE_STANDBY,
                _pad: 0,
            },
            reason,
        ) {
            error!("cannot write the halted state to the kernel: {e}");
        }
    }

    /// Role or epoch changes since the start.
    pub fn changes(&self) -> u64 {
        self.changes.load(Ordering::Relaxed)
    }

    pub fn halted(&self) -> bool {
        self.status.halted.load(Ordering::Relaxed)
    }

    pub fn last_failover(&self) -> Option<FailoverReport> {
        self.last_failover.lock().unwrap().clone()
    }

    /// The arbiter call the node is blocked on, if any.
    pub fn arbiter_wait(&self) -> Option<ArbiterWait> {
        self.arbiter_wait.lock().unwrap().clone()
    }

    fn set_arbiter_wait(&self, w: Option<ArbiterWait>) {
        *self.arbiter_wait.lock().unwrap() = w;
    }

    pub fn transitions(&self) -> Vec<Transition> {
        self.history.lock().unwrap().iter().cloned().collect()
    }

    pub fn json(&self) -> Value {
        json!({
            "transitions": self.transitions(),
            "last_failover": *self.last_failover.lock().unwrap(),
            "waiting_for_arbiter": self.arbiter_wait().map(|w| json!({
                "what": w.what,
                "error": w.error,
                "for_s": w.since.elapsed().as_secs_f64(),
            })),
        })
    }
}

/// What the controller works with.
pub struct Ctx {
    pub cfg: Config,
    pub dp: Arc<DataPlane>,
    pub status: Arc<ChannelStatus>,
    pub roles: Arc<Roles>,
    /// The VMM (failover is automatic only when ftd runs the VM).
    pub vm: Option<Arc<VmState>>,
    /// None: `[fence] backend = "none"` (static lease; epochs counted locally).
    pub arb: Option<Arc<dyn Arbiter>>,
    pub stop: Arc<AtomicBool>,
}

/// The lease of the current epoch (renewed by a keeper; a new epoch gets a new keeper).
struct Lease {
    keeper: Option<LeaseKeeper>,
    tx: mpsc::UnboundedSender<(u64, LeaseState)>,
    rx: mpsc::UnboundedReceiver<(u64, LeaseState)>,
}

impl Lease {
    fn new() -> Lease {
        let (tx, rx) = mpsc::unbounded_channel();
        Lease {
            keeper: None,
            tx,
            rx,
        }
    }

    fn start(&mut self, c: &Ctx, epoch: u64, deadline: u64) {
        let Some(arb) = &c.arb else { return };
        let f = &c.cfg.fence;
        let tx = self.tx.clone();
        // Replacing the keeper aborts the previous one (a new epoch: the old lease must
        // not fence this node when its renewals are refused).
        self.keeper = Some(LeaseKeeper::spawn(
            arb.clone(),
            &f.vm,
            &f.node,
            epoch,
            deadline,
            f.timing(),
            move |st| {
                let _ = tx.send((epoch, st));
            },
        ));
    }
}

pub async fn run(c: Ctx) {
    match c.cfg.node.role {
        Role::Primary | Role::Solo => primary::primary(c).await,
        Role::Backup => backup::backup(c).await,
    }
}

fn stopping(c: &Ctx) -> bool {
    c.stop.load(Ordering::Relaxed)
}

enum Tas {
    /// (epoch, kernel deadline)
    Won(u64, u64),
    Lost(TasOutcome),
    Stopped,
}

/// `test_and_set` at `expected`, retried while the arbiter does not answer (`waiting`
/// says what that means). An attempt whose answer was lost may have committed: the
/// arbiter then shows the next epoch as this node's, which counts as won. Deadlines
/// count from the first attempt's send instant (the earliest a grant can date from).
async fn test_and_set(c: &Ctx, arb: &Arc<dyn Arbiter>, expected: u64, waiting: &str) -> Tas {
    let f = &c.cfg.fence;
    let first = MonoInstant::now();
    let mut retried = false;
    let since = std::time::Instant::now();
    let r = loop {
        let sent = MonoInstant::now();
        match arb.test_and_set(&f.vm, &f.node, expected).await {
            // The lease began when the arbiter handled this request: after it was sent.
            // (Counting from the first attempt, a win after retries while the arbiter
            // was unreachable arrived with its lease already over, and the node halted.)
            Ok(TasOutcome::Won(g)) => {
                break Tas::Won(g.epoch, g.deadline_monotonic_ns(sent, f.drift_margin()));
            }
            Ok(TasOutcome::Stale {
                owner: Some(o),
                epoch,
            }) if retried && o == f.node && epoch == expected + 1 => {
                // Which earlier attempt won is unknown: its lease counts from the first
                // (the lease keeper renews it at once if little is left).
                info!(
                    epoch,
                    "an earlier test-and-set whose answer was lost had won"
                );
                let g = ft_fence::LeaseGrant {
                    epoch,
                    lease: arb.lease_len(),
                };
                break Tas::Won(epoch, g.deadline_monotonic_ns(first, f.drift_margin()));
            }
            Ok(other) => break Tas::Lost(other),
            Err(e) => {
                warn!("{waiting}: {e}");
                c.roles.set_arbiter_wait(Some(ArbiterWait {
                    what: waiting.to_string(),
                    error: e.to_string(),
                    since,
                }));
                if stopping(c) {
                    break Tas::Stopped;
                }
                retried = true;
                tokio::time::sleep(f.renew_interval() / 4).await;
            }
        }
    };
    c.roles.set_arbiter_wait(None);
    r
}

/// A renewal extends the kernel's deadline; a lost lease halts the node (false).
fn on_lease(c: &Ctx, st: LeaseState) -> bool {
    match st {
        LeaseState::Valid {
            deadline_monotonic_ns,
            ..
        } => {
            if let Err(e) = c.dp.set_lease_deadline(deadline_monotonic_ns) {
                warn!("lease renewed but the kernel deadline could not be extended: {e}");
            }
            true
        }
        LeaseState::Lost { reason } => {
            c.roles.halt(&format!("lease lost ({reason})"));
            false
        }
    }
}
