//! The node's role: one supervisor ([`supervisor`]) decides it, [`Roles`] holds it. The
//! current role is a [`NodeRole`], published on a `tokio::sync::watch`; `Roles` is the
//! only writer of the kernel's `NODE` map (role, epoch, lease deadline), which it derives
//! from the role, so the kernel and the daemon can never disagree. Every decision reads
//! the *current* role, never the configured one: `[node] role` only says how a node
//! starts ([`start`]).
//!
//! ```text
//!  start:    STANDBY --first start of the pair (epoch 0) or --bootstrap: win test-and-set--> PRIMARY | SOLO
//!            STANDBY --a live node runs the VM: follow it--> BACKUP (joining, then replaying)
//!            STANDBY --the VM lives nowhere now: wait (status says for what)--> STANDBY
//!  backup:   BACKUP --primary silent or its log ended: test-and-set at the followed epoch--> SOLO (live)
//!            BACKUP (joining) --the live node moved to a new epoch--> BACKUP (that epoch)
//!            BACKUP --replica failed, test-and-set lost, epoch moved on--> HALTED
//!  live:     PRIMARY --backup failed, slow past backup_stall_ms, or left: new epoch--> SOLO
//!            SOLO --a backup joined (the state transfer's cut)--> PRIMARY
//!            PRIMARY | SOLO --lease lapsed, arbiter not answering--> SUSPENDED
//!            SUSPENDED --won test-and-set at its own epoch--> SOLO
//!            PRIMARY | SOLO | SUSPENDED --fenced, test-and-set lost, the VM stopped--> HALTED
//! ```
//!
//! HALTED is final for the process: the VM is stopped (fail-stop), a backup tells its
//! primary it left, and the daemon exits with a failure, so a supervisor (systemd's
//! `Restart=on-failure`) starts it again; it then joins the live node as a backup. A
//! restarted node never boots the guest over a VM that lives: the arbiter's epoch says a
//! VM of this pair has lived ([`start`]).
//!
//! Fencing: a node is live only after winning test-and-set; the grant's epoch becomes the
//! channel epoch and the lease a CLOCK_BOOTTIME deadline in `NODE` that the kernel checks
//! on the output path. A lease keeper renews it (a new one for every epoch). A renewal
//! the arbiter refuses (fenced) halts the node. A lease that lapses because the arbiter
//! does not answer suspends it instead: output is already fenced by the kernel, the VM
//! pauses, heartbeats stop (a paired backup may take over), and the node retries
//! test-and-set at its own epoch; winning proves nobody else went live, so it resumes
//! alone in the new epoch.
mod backup;
mod fencing;
mod primary;
pub mod start;
pub mod supervisor;

use std::{
    collections::VecDeque,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::SystemTime,
};

use ft_common::maps::{NodeState, ROLE_BACKUP, ROLE_PRIMARY, ROLE_SOLO, ROLE_STANDBY};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::watch;
use tracing::{error, info};

pub use supervisor::{Exit, PairRequest, Supervisor};

use crate::{
    dataplane::{DataPlane, DataPlaneError},
    liveness::{Liveness, Peer, Watching},
};

/// What this node is now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodeRole {
    /// Not live and following nobody: deciding how to start, or waiting (for a first
    /// start, or for the peer to take a VM over); `waiting` says for what.
    Standby { waiting: String },
    /// Following the live primary of `epoch`: joining it, or replaying its log.
    Backup { epoch: u64 },
    /// Live and paired: output waits for the backup's acks.
    Primary { epoch: u64 },
    /// Live and alone: output leaves under the lease only.
    Solo { epoch: u64 },
    /// Was live; its lease lapsed while the arbiter did not answer. Output is fenced,
    /// the VM paused; test-and-set at `epoch` is retried.
    Suspended { epoch: u64, why: String },
    /// Fail-stop: never live again in this process.
    Halted { epoch: u64, reason: String },
}

impl NodeRole {
    /// Every role's name, as status and metrics spell them.
    pub const NAMES: [&'static str; 6] = [
        "standby",
        "backup",
        "primary",
        "solo",
        "suspended",
        "halted",
    ];

    pub fn name(&self) -> &'static str {
        match self {
            NodeRole::Standby { .. } => "standby",
            NodeRole::Backup { .. } => "backup",
            NodeRole::Primary { .. } => "primary",
            NodeRole::Solo { .. } => "solo",
            NodeRole::Suspended { .. } => "suspended",
            NodeRole::Halted { .. } => "halted",
        }
    }

    /// The channel epoch (0 while standby: no epoch, nothing is sent or accepted).
    pub fn epoch(&self) -> u64 {
        match self {
            NodeRole::Standby { .. } => 0,
            NodeRole::Backup { epoch }
            | NodeRole::Primary { epoch }
            | NodeRole::Solo { epoch }
            | NodeRole::Suspended { epoch, .. }
            | NodeRole::Halted { epoch, .. } => *epoch,
        }
    }

    /// Live: runs the VM with its output going to clients (under the lease).
    pub fn is_live(&self) -> bool {
        matches!(self, NodeRole::Primary { .. } | NodeRole::Solo { .. })
    }

    /// What the state is about (the wait, the suspension, the halt), if anything.
    pub fn detail(&self) -> Option<&str> {
        match self {
            NodeRole::Standby { waiting } => Some(waiting),
            NodeRole::Suspended { why, .. } => Some(why),
            NodeRole::Halted { reason, .. } => Some(reason),
            _ => None,
        }
    }

    /// The peer this role watches, if any.
    pub fn watching(&self) -> Option<Watching> {
        match self {
            NodeRole::Primary { .. } => Some(Watching::Backup),
            NodeRole::Backup { .. } => Some(Watching::Primary),
            _ => None,
        }
    }

    /// The kernel's view of this role with lease deadline `deadline_ns` (only a live
    /// role keeps one: every other role is fenced).
    fn kernel(&self, deadline_ns: u64) -> NodeState {
        let role = match self {
            NodeRole::Backup { .. } => ROLE_BACKUP,
            NodeRole::Primary { .. } => ROLE_PRIMARY,
            NodeRole::Solo { .. } => ROLE_SOLO,
            NodeRole::Standby { .. } | NodeRole::Suspended { .. } | NodeRole::Halted { .. } => {
                ROLE_STANDBY
            }
        };
        NodeState {
            epoch: self.epoch(),
            lease_deadline_ns: if self.is_live() { deadline_ns } else { 0 },
            role,
            _pad: 0,
        }
    }
}

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

/// The node's role and its history; the only writer of the kernel's `NODE` map. Only
/// the supervisor changes the role (`set` is private to this module); everyone else
/// reads it ([`Roles::current`], [`Roles::subscribe`]).
pub struct Roles {
    dp: Arc<DataPlane>,
    liveness: Arc<Liveness>,
    role: watch::Sender<NodeRole>,
    /// Held while the role or the lease deadline is written (one writer at a time).
    write: Mutex<()>,
    history: Mutex<VecDeque<Transition>>,
    changes: AtomicU64,
    last_failover: Mutex<Option<FailoverReport>>,
    /// A test-and-set this node needs but the arbiter does not answer: what waits, the
    /// arbiter's last error, and since when.
    arbiter_wait: Mutex<Option<ArbiterWait>>,
}

impl Roles {
    pub fn new(dp: Arc<DataPlane>, liveness: Arc<Liveness>) -> Arc<Roles> {
        Arc::new(Roles {
            dp,
            liveness,
            role: watch::Sender::new(NodeRole::Standby {
                waiting: "starting".into(),
            }),
            write: Mutex::new(()),
            history: Mutex::new(VecDeque::new()),
            changes: AtomicU64::new(0),
            last_failover: Mutex::new(None),
            arbiter_wait: Mutex::new(None),
        })
    }

    /// The role now.
    pub fn current(&self) -> NodeRole {
        self.role.borrow().clone()
    }

    /// Role changes as they happen.
    pub fn subscribe(&self) -> watch::Receiver<NodeRole> {
        self.role.subscribe()
    }

    /// The channel epoch now (0 while standby).
    pub fn epoch(&self) -> u64 {
        self.role.borrow().epoch()
    }

    pub fn halted(&self) -> bool {
        matches!(*self.role.borrow(), NodeRole::Halted { .. })
    }

    /// The peer this node watches in its current role, as [`Liveness`] sees it.
    pub fn peer(&self) -> Option<Peer> {
        let w = self.role.borrow().watching()?;
        Some(self.liveness.peer(w, &self.dp.seq_state()))
    }

    /// Writes the role to the kernel (deadline cleared before role/epoch change, set
    /// last: see `DataPlane::set_node_state`), publishes it and records the transition.
    fn set(&self, next: NodeRole, deadline_ns: u64, reason: &str) -> Result<(), DataPlaneError> {
        let _w = self.write.lock().unwrap();
        let prev = self.current();
        self.dp.set_node_state(next.kernel(deadline_ns))?;
        if prev.watching() != next.watching() || prev.epoch() != next.epoch() {
            self.liveness.watch();
        }
        let (from, to, epoch) = (prev.name(), next.name(), next.epoch());
        let changed =
            std::mem::discriminant(&prev) != std::mem::discriminant(&next) || prev.epoch() != epoch;
        self.role.send_replace(next);
        if changed {
            info!(from, to, epoch, reason, "role change");
            self.changes.fetch_add(1, Ordering::Relaxed);
            let mut h = self.history.lock().unwrap();
            if h.len() == HISTORY {
                h.pop_front();
            }
            h.push_back(Transition {
                at_unix_ms: unix_ms(),
                from,
                to,
                epoch,
                reason: reason.to_string(),
            });
        }
        Ok(())
    }

    /// A renewed lease of `epoch`: the kernel's deadline moves, if the node is still
    /// live in that epoch (under the same lock as role changes: a renewal of an epoch
    /// the node has just left never extends the next one's deadline).
    fn renewed(&self, epoch: u64, deadline_ns: u64) -> Result<(), DataPlaneError> {
        let _w = self.write.lock().unwrap();
        let r = self.role.borrow();
        if r.is_live() && r.epoch() == epoch {
            self.dp.set_lease_deadline(deadline_ns)?;
        }
        Ok(())
    }

    /// Halts the node: not live, no lease, for good.
    fn halt(&self, reason: &str) {
        error!("{reason}: this node halts (fail-stop) and emits nothing more");
        let epoch = self.epoch();
        if let Err(e) = self.set(
            NodeRole::Halted {
                epoch,
                reason: reason.to_string(),
            },
            0,
            reason,
        ) {
            error!("cannot write the halted state to the kernel: {e}");
        }
    }

    /// Role or epoch changes since the start.
    pub fn changes(&self) -> u64 {
        self.changes.load(Ordering::Relaxed)
    }

    pub fn last_failover(&self) -> Option<FailoverReport> {
        self.last_failover.lock().unwrap().clone()
    }

    fn set_last_failover(&self, r: FailoverReport) {
        *self.last_failover.lock().unwrap() = Some(r);
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
