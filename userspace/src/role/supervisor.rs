//! The role supervisor: one async task that owns the node's role from start to exit. It
//! decides how the node starts ([`super::start`]), starts and stops each role's workers
//! on transitions, and runs the role's loop (`backup.rs`: follow and take over;
//! `primary.rs`: serve, go solo, suspend). Everything it decides is keyed on the current
//! [`NodeRole`], which only it changes.
//!
//! Workers, by role:
//! - BACKUP: the replaying VM (its thread first joins the live node), the receive loop
//!   of the log (`channel::backup`);
//! - PRIMARY / SOLO: the recording (or free-running) VM, heartbeats while paired
//!   (`channel::heartbeat`), the VMM stream's repair and the backup's LEAVE
//!   (`channel::vmrepair`);
//! - after a take-over the backup's receive loop stops, and the live role's heartbeats
//!   and repair start (a backup may join);
//! - the join service (`vm::join::server`) runs on every VMM node with `join_listen`
//!   and answers by the current role.
//!
//! HALTED stops the VM (fail-stop), tells the primary a backup left, and ends the task
//! with [`Exit::Halted`]: the daemon exits with a failure, and a service manager that
//! restarts it (`Restart=on-failure`) gets a node that joins the live VM.
use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering::Relaxed},
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::Context as _;
use ft_fence::Arbiter;
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use super::{
    NodeRole, Roles,
    fencing::Lease,
    start::{self, Bootstrap, Start},
};
use crate::{
    channel::{backup as backup_channel, heartbeat, status::ChannelStatus},
    config::{Config, Role, VmKind},
    dataplane::DataPlane,
    liveness::Liveness,
    netif::RawSocket,
    vm::{VmState, join},
};

pub(super) const TICK: Duration = Duration::from_millis(5);
/// How often a node that waits (to start, or while joining) asks the arbiter.
pub(super) const FOLLOW_POLL: Duration = Duration::from_millis(50);

/// How the supervisor (and so the daemon) ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// Asked to stop (SIGTERM): a graceful stop.
    Stopped,
    /// `ftd switchover`: the paired primary stopped gracefully (its backup has the whole
    /// log and takes over at once); the caller starts ftd again, which joins it.
    Switchover,
    /// Halted (fail-stop): the VM is stopped on this node; a restart joins the live one.
    Halted(String),
    /// Refused to start (an unsafe `--bootstrap --force`, a configuration the peer
    /// refuses): a restart would do the same; the operator must act.
    Refused(String),
}

/// The join's cut asks the supervisor to pair (SOLO -> PRIMARY at that guest exit);
/// the answer is the epoch, or why not.
pub struct PairRequest {
    pub joiner: String,
    /// The epoch the joiner asked at (and the new log's frames carry): the node pairs
    /// only while it runs alone in exactly this epoch.
    pub epoch: u64,
    pub exit: u64,
    /// After this the cut no longer waits: a request handled later is refused (the
    /// transfer was undone).
    pub deadline: std::time::Instant,
    pub reply: std::sync::mpsc::SyncSender<Result<u64, String>>,
}

/// The supervisor's next step.
pub(super) enum Next {
    Live {
        epoch: u64,
        lease: Lease,
    },
    Suspend {
        epoch: u64,
        why: String,
    },
    Halt(String),
    /// Stop for good and say why: the peer refused this node for a reason a restart does
    /// not change (another configuration); the VM is stopped first.
    Refuse(String),
    Stop,
    /// A planned handover (checked again by the supervisor: the node is the paired
    /// primary of a following backup, its VM recording).
    Switchover,
}

/// A worker thread and its own stop flag.
struct Worker {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<()>,
}

impl Worker {
    fn spawn(
        name: &str,
        f: impl FnOnce(Arc<AtomicBool>) + Send + 'static,
    ) -> anyhow::Result<Worker> {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let handle = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || f(s))
            .with_context(|| format!("starting thread {name}"))?;
        Ok(Worker { stop, handle })
    }
}

#[derive(Default)]
struct Workers {
    vcpu: Option<JoinHandle<()>>,
    backup_rx: Option<Worker>,
    heartbeat: Option<Worker>,
    vmlog_repair: Option<Worker>,
    join_server: Option<JoinHandle<()>>,
}

/// Everything the supervisor works with.
pub struct Supervisor {
    pub cfg: Config,
    pub bootstrap: Bootstrap,
    pub dp: Arc<DataPlane>,
    pub status: Arc<ChannelStatus>,
    pub roles: Arc<Roles>,
    pub liveness: Arc<Liveness>,
    /// The VMM's state, when ftd runs the VM (`kind = "vmm"`: failover is automatic
    /// only then).
    pub vm: Option<Arc<VmState>>,
    /// None: `[fence] backend = "none"` (static lease; epochs counted locally).
    pub arb: Option<Arc<dyn Arbiter>>,
    /// This run's session (the log frames this node sends as primary carry it).
    pub session: u64,
    /// The VM's NIC (a TAP, `kind = "vmm"`), until a VM takes it.
    pub tap: Option<ft_vmm::net::Tap>,
    /// Set by the daemon: stop gracefully.
    pub stop_requested: Arc<AtomicBool>,
    /// Set by the daemon on `ftd switchover`: hand the VM over if this node can (checked
    /// here, on the current role), else refuse and go on.
    pub switchover: Arc<AtomicBool>,
    /// The VMM stops (a recording one logs END first).
    pub vm_stop: Arc<AtomicBool>,
    /// Set last, at the end of a stop: the join service's thread ends.
    pub threads_stop: Arc<AtomicBool>,
    pub pair_rx: mpsc::UnboundedReceiver<PairRequest>,
    pub pair_tx: mpsc::UnboundedSender<PairRequest>,
    workers: Workers,
    peer_was_alive: Option<bool>,
    /// The first test-and-set this process sent at an epoch, while unanswered.
    pub(super) tas_sent: std::sync::Mutex<Option<(u64, ft_fence::MonoInstant)>>,
}

impl Supervisor {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cfg: Config,
        bootstrap: Bootstrap,
        dp: Arc<DataPlane>,
        status: Arc<ChannelStatus>,
        roles: Arc<Roles>,
        liveness: Arc<Liveness>,
        vm: Option<Arc<VmState>>,
        arb: Option<Arc<dyn Arbiter>>,
        session: u64,
        tap: Option<ft_vmm::net::Tap>,
        stop_requested: Arc<AtomicBool>,
    ) -> Supervisor {
        let (pair_tx, pair_rx) = mpsc::unbounded_channel();
        Supervisor {
            cfg,
            bootstrap,
            dp,
            status,
            roles,
            liveness,
            vm,
            arb,
            session,
            tap,
            stop_requested,
            switchover: Arc::new(AtomicBool::new(false)),
            vm_stop: Arc::new(AtomicBool::new(false)),
            threads_stop: Arc::new(AtomicBool::new(false)),
            pair_rx,
            pair_tx,
            workers: Workers::default(),
            peer_was_alive: None,
            tas_sent: std::sync::Mutex::new(None),
        }
    }

    pub(super) fn stopping(&self) -> bool {
        self.stop_requested.load(Relaxed)
    }

    /// Runs the node until it stops, halts, or refuses to start.
    pub async fn run(mut self) -> Exit {
        if let Err(e) = self.start_join_server() {
            return self.halt(format!("cannot serve joins: {e:#}")).await;
        }
        let mut arbiter_since = None;
        let mut next = loop {
            if self.stopping() {
                break Next::Stop;
            }
            let decided = self.decide_start().await;
            if decided.is_ok() {
                arbiter_since = None;
                self.roles.set_arbiter_wait(None);
            }
            match decided {
                Ok(Start::Boot { expected_epoch }) => match self.boot(expected_epoch).await {
                    Ok(n) => break n,
                    Err(None) => continue, // another node won: decide again
                    Err(Some(why)) => break Next::Halt(why),
                },
                Ok(Start::Follow { epoch }) => break self.start_following(epoch).await,
                Ok(Start::Wait(why)) => {
                    self.standby(&why);
                    tokio::time::sleep(FOLLOW_POLL * 4).await;
                }
                Ok(Start::Refuse(why)) => {
                    error!("not starting: {why}");
                    self.stop_threads().await;
                    return Exit::Refused(why);
                }
                Err(e) => {
                    let what = "not going live: the arbiter does not answer";
                    self.roles.set_arbiter_wait(Some(super::ArbiterWait {
                        what: what.into(),
                        error: e.to_string(),
                        since: arbiter_since
                            .get_or_insert_with(std::time::Instant::now)
                            .to_owned(),
                    }));
                    self.standby(&format!("{what} ({e})"));
                    tokio::time::sleep(FOLLOW_POLL * 4).await;
                }
            }
        };
        loop {
            next = match next {
                Next::Live { epoch, lease } => self.serve(epoch, lease).await,
                Next::Suspend { epoch, why } => self.suspended(epoch, why).await,
                Next::Halt(reason) => return self.halt(reason).await,
                Next::Refuse(why) => {
                    error!("{why}: fix the configuration, then start ftd again");
                    let _ = self.halt(why.clone()).await;
                    return Exit::Refused(why);
                }
                Next::Stop => return self.graceful_stop().await,
                Next::Switchover => {
                    return match self.graceful_stop().await {
                        Exit::Stopped => Exit::Switchover,
                        other => other,
                    };
                }
            };
        }
    }

    /// A switchover asked for now, if this node can hand its VM over (the daemon
    /// checked too, on the signal; the role may have changed since): the paired primary
    /// of a backup that is heard, its VM recording.
    pub(super) fn switchover_now(&self) -> bool {
        if !self.switchover.swap(false, Relaxed) {
            return false;
        }
        let paired = matches!(self.roles.current(), NodeRole::Primary { .. });
        let heard = self.roles.peer().is_some_and(|p| p.alive);
        let recording = self
            .vm
            .as_ref()
            .is_some_and(|v| v.phase() == crate::vm::VmPhase::Recording);
        if paired && heard && recording {
            return true;
        }
        warn!(
            paired,
            backup_heard = heard,
            recording,
            "switchover refused: this node is no longer the paired primary of a following backup"
        );
        false
    }

    /// Why a worker of the current role ended on its own (it ends only when asked to,
    /// or on an error it logged).
    pub(super) fn worker_died(&self) -> Option<String> {
        let dead = |w: &Option<Worker>| {
            w.as_ref()
                .is_some_and(|w| w.handle.is_finished() && !w.stop.load(Relaxed))
        };
        if dead(&self.workers.backup_rx) {
            return Some("the log's receive loop stopped (see the log above)".into());
        }
        if dead(&self.workers.heartbeat) {
            return Some("the heartbeat thread stopped (see the log above)".into());
        }
        if dead(&self.workers.vmlog_repair) {
            return Some("the VMM stream's repair thread stopped (see the log above)".into());
        }
        None
    }

    /// Asks the arbiter (if any) and decides how to start.
    async fn decide_start(&self) -> Result<Start, ft_fence::FenceError> {
        let info = match &self.arb {
            Some(arb) => Some(arb.read(&self.cfg.fence.vm).await?),
            None => None,
        };
        let d = start::decide(
            self.cfg.node.role,
            self.bootstrap,
            &self.cfg.fence.node,
            info.as_ref(),
            self.cfg.channel.epoch,
        );
        if let (Start::Follow { epoch }, Some(info)) = (&d, &info) {
            if self.cfg.node.role == Role::Primary {
                warn!(
                    epoch,
                    owner = ?info.owner,
                    "configured primary, but a VM of this pair lives (epoch {epoch}): this \
                     node joins it as its backup (as role = \"auto\")"
                );
            }
            if self.bootstrap != Bootstrap::No {
                warn!(
                    epoch,
                    "--bootstrap ignored: a VM of this pair lives (epoch {epoch}); this node joins it"
                );
            }
        }
        Ok(d)
    }

    /// STANDBY, waiting (said once per new reason).
    fn standby(&self, why: &str) {
        if let NodeRole::Standby { waiting } = self.roles.current()
            && waiting == why
        {
            return;
        }
        info!("waiting: {why}");
        if let Err(e) = self.roles.set(
            NodeRole::Standby {
                waiting: why.to_string(),
            },
            0,
            why,
        ) {
            warn!("cannot write the standby state: {e}");
        }
    }

    /// BACKUP of the live node at `epoch`: the replaying VM (which joins it) and the
    /// receive loop, then the follow loop until take-over, halt or stop.
    async fn start_following(&mut self, epoch: u64) -> Next {
        if let Err(e) = self.roles.set(
            NodeRole::Backup { epoch },
            0,
            &format!("following the live node of epoch {epoch}"),
        ) {
            return Next::Halt(format!("cannot write the epoch to the kernel: {e}"));
        }
        if let Err(e) = self.start_backup_workers() {
            return Next::Halt(format!("cannot start the backup: {e:#}"));
        }
        self.follow(epoch).await
    }

    fn start_backup_workers(&mut self) -> anyhow::Result<()> {
        let ch = &self.cfg.channel;
        let start = Arc::new(backup_channel::StreamStart::default());
        let p = backup_channel::BackupParams {
            own_mac: self.dp.nics.logging.mac,
            peer_mac: self.cfg.interfaces.peer_log_mac.0,
            keys: ch.keys.clone(),
            heartbeat: Duration::from_millis(ch.heartbeat_ms),
            nack_retry: Duration::from_millis(ch.nack_retry_ms),
            nack_burst: ch.nack_burst as usize,
            max_pending: self.cfg.window() + ft_common::maps::RETX_MARGIN,
            start: start.clone(),
        };
        type Sinks = (
            Box<dyn backup_channel::InputSink>,
            Option<Box<dyn backup_channel::VmFeed>>,
        );
        let (sink, feed): Sinks = match (self.tap.take(), self.vm.clone()) {
            (Some(tap), Some(vm)) => {
                let (h, input, feed) = crate::vm::start_backup(
                    &self.cfg,
                    self.dp.clone(),
                    self.status.clone(),
                    self.roles.clone(),
                    vm,
                    tap,
                    start,
                    self.vm_stop.clone(),
                )?;
                self.workers.vcpu = Some(h);
                (Box::new(input), Some(Box::new(feed)))
            }
            _ => {
                start.set(1, 1);
                (
                    Box::new(backup_channel::RawSink {
                        sock: RawSocket::open(&self.dp.nics.vm)?,
                        tagged: self.cfg.vm.tagged(),
                    }),
                    None,
                )
            }
        };
        let (dp, status, roles) = (self.dp.clone(), self.status.clone(), self.roles.clone());
        self.workers.backup_rx = Some(Worker::spawn("ft-backup-rx", move |stop| {
            if let Err(e) = backup_channel::run(dp, p, sink, feed, status, roles, stop) {
                error!("backup receive loop: {e}");
            }
        })?);
        Ok(())
    }

    /// The backup's receive loop ends (within one poll; bounded wait).
    pub(super) async fn stop_backup_workers(&mut self) {
        let Some(w) = self.workers.backup_rx.take() else {
            return;
        };
        w.stop.store(true, Relaxed);
        let joined = tokio::task::spawn_blocking(move || {
            let _ = w.handle.join();
        });
        if tokio::time::timeout(Duration::from_secs(2), joined)
            .await
            .is_err()
        {
            warn!("the backup's receive loop did not stop within 2 s");
        }
    }

    /// The live role's workers: the VM (recording, or free-running when unprotected)
    /// and, for a node that may have a backup, heartbeats and the VMM stream's repair.
    pub(super) fn start_live_workers(&mut self, unprotected: bool) -> anyhow::Result<()> {
        if let (Some(tap), Some(vm)) = (self.tap.take(), self.vm.clone()) {
            self.workers.vcpu = Some(crate::vm::start_primary(
                &self.cfg,
                self.dp.clone(),
                self.roles.clone(),
                tap,
                self.session,
                vm,
                unprotected,
                self.vm_stop.clone(),
            )?);
        }
        if !unprotected {
            self.start_joinable_workers()?;
        }
        Ok(())
    }

    /// Heartbeats (sent while paired) and the VMM stream's repair with the backup's
    /// LEAVE: what a live node needs once a backup follows it.
    pub(super) fn start_joinable_workers(&mut self) -> anyhow::Result<()> {
        let ch = &self.cfg.channel;
        if self.workers.heartbeat.is_none() {
            let p = heartbeat::HeartbeatParams {
                peer_mac: self.cfg.interfaces.peer_log_mac.0,
                keys: ch.keys.clone(),
                session: self.session,
                period: Duration::from_millis(ch.heartbeat_ms),
            };
            let (dp, roles, status) = (self.dp.clone(), self.roles.clone(), self.status.clone());
            self.workers.heartbeat = Some(Worker::spawn("ft-heartbeat", move |stop| {
                heartbeat::run(dp, p, roles, status, stop)
            })?);
        }
        if self.workers.vmlog_repair.is_none()
            && let Some(vm) = self.vm.clone()
        {
            let (iface, keys) = (self.dp.nics.logging.clone(), ch.keys.clone());
            self.workers.vmlog_repair = Some(Worker::spawn("ft-vmlog-repair", move |stop| {
                let (store, stats) = (vm.log_store.clone(), vm.stats.clone());
                let on_leave = Box::new(move |reason: u64| {
                    *vm.leave.lock().unwrap() = Some(leave_reason(reason).into());
                });
                if let Err(e) =
                    crate::channel::vmrepair::run(&iface, &keys, store, stats, on_leave, stop)
                {
                    error!("VMLOG repair stopped: {e}");
                }
            })?);
        }
        Ok(())
    }

    /// The join service: a node with `channel.join_listen` serves joining backups while
    /// it runs the VM alone.
    fn start_join_server(&mut self) -> anyhow::Result<()> {
        let Some(vm) = self.vm.clone() else {
            return Ok(());
        };
        if self.cfg.vm.kind != VmKind::Vmm || self.cfg.channel.join_listen.is_empty() {
            return Ok(());
        }
        self.workers.join_server = Some(
            join::server::JoinServer {
                cfg: self.cfg.clone(),
                dp: self.dp.clone(),
                status: self.status.clone(),
                roles: self.roles.clone(),
                vm,
                pair: self.pair_tx.clone(),
                stop: self.threads_stop.clone(),
                vm_stop: self.vm_stop.clone(),
            }
            .spawn()?,
        );
        Ok(())
    }

    /// Why the VM thread ended, if it did (it never ends on its own while the daemon
    /// runs: a stop is asked for only by `halt` and `graceful_stop`).
    pub(super) fn vm_ended(&self) -> Option<String> {
        let h = self.workers.vcpu.as_ref()?;
        if !h.is_finished() {
            return None;
        }
        let vm = self.vm.as_ref()?;
        Some(vm.error().unwrap_or_else(|| "the VMM stopped".into()))
    }

    /// Counts the moments the watched peer falls silent (status, metrics).
    pub(super) fn observe_peer(&mut self) {
        let alive = self.roles.peer().map(|p| p.alive);
        if self.peer_was_alive == Some(true) && alive == Some(false) {
            ChannelStatus::inc(&self.status.peer_down_events);
            warn!(
                timeout_ms = self.liveness.timeout().as_millis() as u64,
                "the peer is silent on the logging channel: reported down"
            );
        }
        self.peer_was_alive = alive;
    }

    /// HALTED: fenced for good. A backup stops confirming the log and tells its primary
    /// it left; the VM stops (fail-stop: a fenced VM that went on running and logging
    /// would look alive to its backup, which would then never take over; a recording
    /// VMM logs END first, so a backup that verifies it takes over at once).
    async fn halt(&mut self, reason: String) -> Exit {
        let was = self.roles.current();
        if matches!(was, NodeRole::Backup { .. }) {
            backup_channel::stop_confirming(&self.dp, &self.status);
        }
        self.roles.halt(&reason);
        if let NodeRole::Backup { epoch } = was {
            self.send_leave(epoch);
        }
        if let Some(c) = self.vm.as_ref().and_then(|v| v.control()) {
            warn!("halted: stopping the VM (fail-stop)");
            c.resume();
            c.request_stop();
        }
        self.vm_stop.store(true, Relaxed);
        self.join_vcpu(Duration::from_secs(5)).await;
        self.stop_threads().await;
        Exit::Halted(reason)
    }

    /// A backup that leaves tells its primary why (a few times: a lost LEAVE only delays
    /// the primary's reaction, which also sees the acks stop).
    fn send_leave(&self, epoch: u64) {
        let reason = if self.vm.as_ref().is_some_and(|v| v.divergence().is_some()) {
            ft_common::wire::LEAVE_DIVERGED
        } else {
            ft_common::wire::LEAVE_SHUTDOWN
        };
        if let Ok(sock) = RawSocket::open(&self.dp.nics.logging) {
            let f = crate::channel::frames::control_frame(
                &self.cfg.channel.keys,
                self.dp.nics.logging.mac,
                self.cfg.interfaces.peer_log_mac.0,
                crate::channel::frames::hdr(
                    ft_common::wire::KIND_LEAVE,
                    self.status.peer_session.load(Relaxed),
                    epoch,
                    0,
                    reason,
                ),
            );
            for _ in 0..3 {
                let _ = sock.send(&f);
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }

    /// SIGTERM or a switchover: the VMM stops first (a recording one logs END); a paired
    /// primary keeps the channel up until the backup acked the whole log (at most 1 s,
    /// or `peer_timeout_ms` if longer), so the backup takes over at once with all of it.
    async fn graceful_stop(&mut self) -> Exit {
        if let Some(c) = self.vm.as_ref().and_then(|v| v.control()) {
            c.resume();
        }
        self.vm_stop.store(true, Relaxed);
        self.join_vcpu(Duration::from_secs(10)).await;
        if let (NodeRole::Primary { .. }, Some(_)) = (self.roles.current(), &self.vm) {
            let bound = self.liveness.timeout().max(Duration::from_secs(1));
            self.wait_for_last_ack(bound).await;
        }
        self.stop_threads().await;
        Exit::Stopped
    }

    /// Waits (bounded) until the backup acked every VMM entry, so it holds the complete
    /// log.
    async fn wait_for_last_ack(&self, bound: Duration) {
        let t0 = std::time::Instant::now();
        loop {
            let (last, acked) = (self.dp.chan_state().vm_last, self.dp.seq_state().vm_acked);
            if acked >= last {
                info!(last, "the backup acknowledged the whole VMM log");
                return;
            }
            if t0.elapsed() >= bound {
                warn!(
                    last,
                    acked, "stopping before the backup acknowledged the end of the VMM log"
                );
                return;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    async fn join_vcpu(&mut self, bound: Duration) {
        let Some(h) = self.workers.vcpu.take() else {
            return;
        };
        let joined = tokio::task::spawn_blocking(move || {
            let _ = h.join();
        });
        if tokio::time::timeout(bound, joined).await.is_err() {
            warn!("the VM thread did not stop within {bound:?}");
        }
    }

    /// Every worker thread ends (each within one poll of its loop).
    async fn stop_threads(&mut self) {
        self.threads_stop.store(true, Relaxed);
        let ws = [
            self.workers.backup_rx.take(),
            self.workers.heartbeat.take(),
            self.workers.vmlog_repair.take(),
        ];
        let mut handles: Vec<JoinHandle<()>> = Vec::new();
        for w in ws.into_iter().flatten() {
            w.stop.store(true, Relaxed);
            handles.push(w.handle);
        }
        handles.extend(self.workers.join_server.take());
        let joined = tokio::task::spawn_blocking(move || {
            for h in handles {
                let _ = h.join();
            }
        });
        if tokio::time::timeout(Duration::from_secs(5), joined)
            .await
            .is_err()
        {
            warn!("a worker thread did not stop within 5 s");
        }
    }
}

/// Why a backup left, from its LEAVE frame.
fn leave_reason(reason: u64) -> &'static str {
    match reason {
        ft_common::wire::LEAVE_DIVERGED => "its replica diverged",
        ft_common::wire::LEAVE_SHUTDOWN => "its VMM stopped",
        ft_common::wire::LEAVE_STALE_SESSION => "it follows another run",
        _ => "unknown reason",
    }
}
