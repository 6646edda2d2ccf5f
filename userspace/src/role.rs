//! The node's role controller: the one component that writes the `NODE` map (role, epoch,
//! lease deadline) and changes the node's role, while the daemon and the VM keep
//! running. Every transition is logged with its reason and kept for `ftd status`.
//!
//! ```text
//! primary: STANDBY --win test-and-set, pair the peer--> PRIMARY (paired)
//!          PRIMARY --backup failed or left; new epoch by test-and-set--> SOLO
//!          PRIMARY | SOLO --lease lost, or test-and-set lost--> HALTED
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
use std::{
    collections::VecDeque,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use ft_common::maps::{NodeState, ROLE_BACKUP, ROLE_PRIMARY, ROLE_SOLO, ROLE_STANDBY, role_name};
use ft_fence::{Acquire, Arbiter, LeaseKeeper, LeaseState, MonoInstant, TasOutcome};
use ft_vmm::vmlog::FrameKey;
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

use crate::{
    channel::status::ChannelStatus,
    config::{Config, Role},
    dataplane::{DataPlane, DataPlaneError},
    netif::RawSocket,
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
}

fn unix_ms() -> u64 {
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

    pub fn transitions(&self) -> Vec<Transition> {
        self.history.lock().unwrap().iter().cloned().collect()
    }

    pub fn json(&self) -> Value {
        json!({
            "transitions": self.transitions(),
            "last_failover": *self.last_failover.lock().unwrap(),
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
        Role::Primary | Role::Solo => primary(c).await,
        Role::Backup => backup(c).await,
    }
}

fn stopping(c: &Ctx) -> bool {
    c.stop.load(Ordering::Relaxed)
}

async fn primary(c: Ctx) {
    let live_role = if c.cfg.node.role == Role::Solo {
        ROLE_SOLO
    } else {
        ROLE_PRIMARY
    };
    let f = &c.cfg.fence;
    let retry = f.renew_interval();
    let mut lease = Lease::new();
    let mut epoch = c.cfg.channel.epoch;
    if let Some(arb) = &c.arb {
        let (grant, deadline) = loop {
            match ft_fence::try_acquire(&**arb, &f.vm, &f.node, f.drift_margin()).await {
                Ok(Acquire::Live {
                    grant,
                    deadline_monotonic_ns,
                }) => break (grant, deadline_monotonic_ns),
                Ok(Acquire::NotLive(outcome)) => {
                    warn!(
                        ?outcome,
                        "test-and-set lost: another node is live; this node stays not live"
                    )
                }
                Err(e) => warn!("not going live: {e}"),
            }
            if stopping(&c) {
                return;
            }
            tokio::time::sleep(retry).await;
        };
        epoch = grant.epoch;
        let node = NodeState {
            epoch,
            lease_deadline_ns: deadline,
            role: live_role,
            _pad: 0,
        };
        if let Err(e) = c.roles.set(node, "won test-and-set") {
            error!("cannot write the lease to the kernel: {e}; staying not live");
            return;
        }
        if live_role == ROLE_PRIMARY {
            // Paired, the backup may take over without waiting for this lease: this
            // node's output needs its acks. Unpaired (the arbiter unreachable just now),
            // it would wait for the lease to lapse: slower, never unsafe.
            match arb.pair(&f.vm, &f.node, epoch, &f.peer).await {
                Ok(()) => info!(epoch, peer = %f.peer, "paired the backup at the arbiter"),
                Err(e) => warn!(
                    "could not pair {} at the arbiter ({e}): a take-over would wait for this lease",
                    f.peer
                ),
            }
        }
        lease.start(&c, epoch, deadline);
    }
    let mut watch = BackupWatch::new(&c);
    let mut tick = tokio::time::interval(TICK);
    loop {
        tokio::select! {
            Some((e, st)) = lease.rx.recv() => {
                if e == epoch && !on_lease(&c, st) {
                    return;
                }
            }
            _ = tick.tick() => {
                if stopping(&c) || c.status.halted.load(Ordering::Relaxed) {
                    return;
                }
                let Some(vm) = c.vm.as_ref() else { continue };
                let Ok(node) = c.dp.node_state() else { continue };
                if node.role != ROLE_PRIMARY {
                    continue;
                }
                let Some((why, detect)) = watch.failed(&c.dp, vm) else { continue };
                match go_solo(&c, vm, epoch, &why, detect).await {
                    Some((e, deadline)) => {
                        epoch = e;
                        lease.start(&c, e, deadline);
                    }
                    None => return,
                }
            }
        }
    }
}

/// Primary: notices when the backup stops making progress. Acks that do not advance
/// while entries are outstanding count, however many stale keep-alives arrive; so does
/// silence (no ack at all) and a LEAVE.
struct BackupWatch {
    timeout: Duration,
    last_acks: (u64, u64),
    last_progress: Instant,
    started_ns: u64,
}

impl BackupWatch {
    fn new(c: &Ctx) -> BackupWatch {
        BackupWatch {
            timeout: Duration::from_millis(c.cfg.channel.peer_timeout_ms),
            last_acks: (0, 0),
            last_progress: Instant::now(),
            started_ns: crate::channel::primary::monotonic_ns(),
        }
    }

    /// Why the backup is considered failed, and for how long it has been.
    fn failed(&mut self, dp: &DataPlane, vm: &VmState) -> Option<(String, Duration)> {
        if let Some(why) = vm.leave.lock().unwrap().take() {
            return Some((format!("the backup left the log ({why})"), Duration::ZERO));
        }
        let (seq, chan) = (dp.seq_state(), dp.chan_state());
        let acks = (seq.acked, seq.vm_acked);
        let outstanding = seq.last_seq > seq.acked || chan.vm_last > seq.vm_acked;
        let now = Instant::now();
        if acks != self.last_acks || !outstanding {
            self.last_acks = acks;
            self.last_progress = now;
        }
        let stalled = now.duration_since(self.last_progress);
        if outstanding && stalled >= self.timeout {
            return Some((
                format!(
                    "the backup made no progress for {} ms (acked {}/{} of {}/{})",
                    stalled.as_millis(),
                    seq.acked,
                    seq.vm_acked,
                    seq.last_seq,
                    chan.vm_last
                ),
                stalled,
            ));
        }
        // Before the backup's first ack it may still be starting (learning the epoch
        // from the arbiter): it gets a grace period, then this node goes on alone.
        let (last, limit) = if seq.last_peer_ns == 0 {
            (self.started_ns, self.timeout.max(FIRST_ACK_GRACE))
        } else {
            (seq.last_peer_ns, self.timeout)
        };
        let silent =
            Duration::from_nanos(crate::channel::primary::monotonic_ns().saturating_sub(last));
        if silent >= limit {
            return Some((
                format!(
                    "the backup is silent on the logging channel for {} ms",
                    silent.as_millis()
                ),
                silent,
            ));
        }
        None
    }
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
    loop {
        match arb.test_and_set(&f.vm, &f.node, expected).await {
            Ok(TasOutcome::Won(g)) => {
                return Tas::Won(g.epoch, g.deadline_monotonic_ns(first, f.drift_margin()));
            }
            Ok(TasOutcome::Stale {
                owner: Some(o),
                epoch,
            }) if retried && o == f.node && epoch == expected + 1 => {
                info!(
                    epoch,
                    "an earlier test-and-set whose answer was lost had won"
                );
                let g = ft_fence::LeaseGrant {
                    epoch,
                    lease: arb.lease_len(),
                };
                return Tas::Won(epoch, g.deadline_monotonic_ns(first, f.drift_margin()));
            }
            Ok(other) => return Tas::Lost(other),
            Err(e) => {
                warn!("{waiting}: {e}");
                if stopping(c) {
                    return Tas::Stopped;
                }
                retried = true;
                tokio::time::sleep(f.renew_interval() / 4).await;
            }
        }
    }
}

/// Primary whose backup failed: a new epoch (which unpairs) before any output leaves
/// without acks, then SOLO. None if the node halted instead (another node won).
async fn go_solo(
    c: &Ctx,
    vm: &VmState,
    epoch: u64,
    why: &str,
    detect: Duration,
) -> Option<(u64, u64)> {
    let t0 = Instant::now();
    warn!("{why}: going solo");
    let (new_epoch, deadline) = match &c.arb {
        Some(arb) => {
            match test_and_set(c, arb, epoch, "cannot go solo yet (output stays held)").await {
                Tas::Won(e, deadline) => (e, deadline),
                Tas::Lost(other) => {
                    c.roles.halt(&format!(
                        "{why}, but test-and-set for a new epoch was lost ({other:?}): the backup took over"
                    ));
                    return None;
                }
                Tas::Stopped => return None,
            }
        }
        None => (epoch + 1, u64::MAX),
    };
    let tas = t0.elapsed();
    vm.solo.store(true, Ordering::Relaxed);
    *c.status.backup_left.lock().unwrap() = Some(why.to_string());
    let node = NodeState {
        epoch: new_epoch,
        lease_deadline_ns: deadline,
        role: ROLE_SOLO,
        _pad: 0,
    };
    if let Err(e) = c.roles.set(node, why) {
        c.roles
            .halt(&format!("cannot switch the data plane to solo: {e}"));
        return None;
    }
    if let Err(e) = vm.kick_release(c.cfg.vm.mac.0) {
        warn!("could not kick the output ring ({e}): held frames leave with the next output");
    }
    *c.roles.last_failover.lock().unwrap() = Some(FailoverReport {
        what: format!("primary went solo: {why}"),
        at_unix_ms: unix_ms(),
        detect_ms: detect.as_secs_f64() * 1e3,
        test_and_set_ms: tas.as_secs_f64() * 1e3,
        total_ms: (detect + t0.elapsed()).as_secs_f64() * 1e3,
        ..Default::default()
    });
    Some((new_epoch, deadline))
}

async fn backup(c: Ctx) {
    let f = &c.cfg.fence;
    let retry = f.renew_interval();
    let mut epoch = c.cfg.channel.epoch;
    if let Some(arb) = &c.arb {
        epoch = loop {
            match arb.read(&f.vm).await {
                Ok(info)
                    if info.epoch > 0 && info.owner.as_deref().is_some_and(|o| o != f.node) =>
                {
                    break info.epoch;
                }
                Ok(info) => {
                    debug!(owner = ?info.owner, "backup: waiting for a live primary at the arbiter")
                }
                Err(e) => warn!("backup: cannot read the live primary's epoch: {e}"),
            }
            if stopping(&c) {
                return;
            }
            tokio::time::sleep(FOLLOW_POLL).await;
        };
    }
    let node = NodeState {
        epoch,
        lease_deadline_ns: 0,
        role: ROLE_BACKUP,
        _pad: 0,
    };
    if let Err(e) = c
        .roles
        .set(node, &format!("following the primary of epoch {epoch}"))
    {
        error!("cannot write the epoch to the kernel: {e}");
        return;
    }
    let mut last_check = Instant::now();
    let mut tick = tokio::time::interval(TICK);
    loop {
        tick.tick().await;
        if stopping(&c) || c.status.halted.load(Ordering::Relaxed) {
            return;
        }
        if let Some(arb) = &c.arb
            && last_check.elapsed() >= retry
        {
            last_check = Instant::now();
            match arb.read(&f.vm).await {
                Ok(info) if info.epoch != epoch => {
                    c.roles.halt(&format!(
                        "the live primary moved to epoch {} (owner {:?}) without this replica, which \
                         follows epoch {epoch} and is stale (recreate it by state transfer)",
                        info.epoch, info.owner
                    ));
                    return;
                }
                Ok(_) => {}
                Err(e) => warn!("backup: arbiter unreachable ({e}); still following epoch {epoch}"),
            }
        }
        let Some(vm) = c.vm.clone() else { continue };
        let primary_known = c.status.peer_session.load(Ordering::Relaxed) != 0;
        if primary_known
            && !c.status.peer_alive.load(Ordering::Relaxed)
            && *vm.phase.lock().unwrap() == "replaying"
        {
            take_over(c, vm, epoch).await;
            return;
        }
    }
}

/// Backup whose primary fell silent: stop acking, win test-and-set at the epoch it
/// followed, replay everything buffered, go live, hand the live VM the input the
/// primary's guest never consumed, announce the VM's addresses; then serve solo.
async fn take_over(c: Ctx, vm: Arc<VmState>, followed: u64) {
    let detect = Duration::from_millis(c.cfg.channel.peer_timeout_ms);
    let t0 = Instant::now();
    // First: the primary can release nothing more (it needs these acks).
    c.status.stop_acking.store(true, Ordering::Relaxed);
    warn!(
        "the primary is silent for {} ms: taking over",
        detect.as_millis()
    );
    let f = &c.cfg.fence;
    let (epoch, deadline) = match &c.arb {
        Some(arb) => loop {
            match test_and_set(&c, arb, followed, "cannot take over yet (nobody goes live)").await {
                Tas::Won(e, deadline) => break (e, deadline),
                Tas::Lost(TasOutcome::Held {
                    lease_remaining,
                    epoch,
                    ..
                }) if epoch == followed => {
                    // Not paired (the primary could not reach the arbiter when it went
                    // live): wait for its lease to lapse. A primary still alive takes a
                    // new epoch meanwhile, and this backup then loses (Stale).
                    warn!(
                        "the silent primary was not paired with this backup: waiting {} ms for its lease",
                        lease_remaining.as_millis()
                    );
                    tokio::time::sleep(lease_remaining.min(f.renew_interval())).await;
                }
                Tas::Lost(other) => {
                    c.roles.halt(&format!(
                        "the primary fell silent but this backup lost test-and-set ({other:?})"
                    ));
                    return;
                }
                Tas::Stopped => return,
            }
        },
        None => (followed + 1, u64::MAX),
    };
    let tas = t0.elapsed();
    let reason = format!(
        "took over: the primary of epoch {followed} was silent for {} ms",
        detect.as_millis()
    );
    let node = NodeState {
        epoch,
        lease_deadline_ns: deadline,
        role: ROLE_SOLO,
        _pad: 0,
    };
    if let Err(e) = c.roles.set(node, &reason) {
        c.roles
            .halt(&format!("cannot switch the data plane to solo: {e}"));
        return;
    }
    let mut lease = Lease::new();
    lease.start(&c, epoch, deadline);
    // Replay everything buffered (the log ends where it is now), then go live.
    let t_drain = Instant::now();
    drop(vm.feed.lock().unwrap().take());
    if let Some(ctl) = vm.control.lock().unwrap().as_ref() {
        ctl.request_go_live();
    }
    let live = loop {
        if vm.live.went_live.load(Ordering::Acquire) {
            break true;
        }
        let phase = vm.phase.lock().unwrap().clone();
        if phase != "replaying" || stopping(&c) {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    };
    if !live {
        c.roles.halt(&format!(
            "the replica could not go live ({})",
            vm.error.lock().unwrap().clone().unwrap_or_default()
        ));
        return;
    }
    vm.set_phase("live");
    let drain = t_drain.elapsed();
    let t_ann = Instant::now();
    let unreferenced = deliver_unconsumed_input(&c, &vm);
    announce(&c);
    let announce_ms = t_ann.elapsed();
    let report = FailoverReport {
        what: reason.clone(),
        at_unix_ms: unix_ms(),
        detect_ms: detect.as_secs_f64() * 1e3,
        test_and_set_ms: tas.as_secs_f64() * 1e3,
        drain_ms: drain.as_secs_f64() * 1e3,
        announce_ms: announce_ms.as_secs_f64() * 1e3,
        unreferenced_frames: unreferenced,
        total_ms: (detect + t0.elapsed()).as_secs_f64() * 1e3,
    };
    info!(?report, "live after take-over");
    *c.roles.last_failover.lock().unwrap() = Some(report);
    // Serve solo while the lease holds; repeat the announcement a few times.
    let mut announce_left = 3;
    let mut next_announce = Instant::now() + Duration::from_millis(50);
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    loop {
        tokio::select! {
            Some((e, st)) = lease.rx.recv() => {
                if e == epoch && !on_lease(&c, st) {
                    return;
                }
            }
            _ = tick.tick() => {
                if stopping(&c) {
                    return;
                }
                if announce_left > 0 && Instant::now() >= next_announce {
                    announce(&c);
                    announce_left -= 1;
                    next_announce = Instant::now() + Duration::from_millis(200);
                }
            }
        }
    }
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

/// Input frames the backup holds beyond the last one the replica consumed: the
/// primary's guest never saw them (never answered them), so the live VM gets them now,
/// in order, through its NIC.
fn deliver_unconsumed_input(c: &Ctx, vm: &VmState) -> u64 {
    let Some(frames) = vm.frames.lock().unwrap().clone() else {
        return 0;
    };
    let after = FrameKey {
        epoch: vm.live.last_frame_epoch.load(Ordering::Relaxed),
        seq: vm.live.last_frame_seq.load(Ordering::Relaxed),
    };
    let pending = frames.take_after(after);
    if pending.is_empty() {
        return 0;
    }
    let sock = match RawSocket::open(&c.dp.nics.vm) {
        Ok(s) => s,
        Err(e) => {
            warn!(
                "cannot hand {} unconsumed input frames to the VM: {e}",
                pending.len()
            );
            return 0;
        }
    };
    let mut n = 0;
    for (_, f) in &pending {
        if sock.send(f).is_ok() {
            n += 1;
        }
    }
    info!(
        n,
        "handed the input the primary's guest never consumed to the live VM"
    );
    n
}

/// Gratuitous ARP for the VM's address from its MAC on the client NIC: switches learn
/// the VM's new port, neighbours refresh their entry.
fn announce(c: &Ctx) {
    let (mac, ip) = (c.cfg.vm.mac.0, c.cfg.vm.ipv4.octets());
    let mut f = [0u8; 60];
    f[..6].fill(0xff);
    f[6..12].copy_from_slice(&mac);
    f[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    f[14..22].copy_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]); // Ethernet/IPv4, request
    f[22..28].copy_from_slice(&mac);
    f[28..32].copy_from_slice(&ip);
    f[38..42].copy_from_slice(&ip);
    match RawSocket::open(&c.dp.nics.client) {
        Ok(s) => {
            if let Err(e) = s.send(&f) {
                warn!("gratuitous ARP not sent: {e}");
            }
        }
        Err(e) => warn!("gratuitous ARP not sent: {e}"),
    }
}
