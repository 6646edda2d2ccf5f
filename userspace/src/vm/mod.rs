//! The protected VM inside the daemon: the VMM (`ft-vmm`) on a dedicated vCPU thread,
//! recording on the primary into the logging channel, replaying on the backup from it.
//!
//! - `tap`: the VM's NIC, a TAP that ftd creates before the data plane attaches to it.
//! - `sink`: primary, the VMM's log sink: VMLOG frames, repair store, back-pressure, and
//!   `CHAN.vm_last` for the output rule.
//! - `feed`: backup, input frames into the VMM's frame store and VMLOG entries into its
//!   log source.
//! - `join`: re-protection, a backup joining a primary that runs alone by live state
//!   transfer.
pub mod feed;
pub mod join;
pub mod sink;
pub mod tap;

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::Context as _;
use ft_vmm::{
    Control, Mode, RunReport, Vmm,
    vmlog::{FrameStore, MemFrameStore},
};
use serde_json::{Value, json};
use tracing::{error, info};

use crate::{
    channel::status::ChannelStatus, config::Config, dataplane::DataPlane, netif::RawSocket,
    role::Roles,
};

/// Where the backup found its replica different from the primary.
#[derive(Clone, Debug)]
pub struct Divergence {
    /// The exit at which the difference was found.
    pub exit: u64,
    /// The last exit at which the state was verified equal: the first diverging exit is
    /// in `(verified, exit]`.
    pub verified: u64,
    pub what: String,
}

/// What the VMM is doing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmPhase {
    /// Not started (the node has not decided its role yet, or waits).
    NotStarted,
    /// Backup: getting the VM from the live node (the detail says how far).
    Joining(String),
    /// Primary: recording, its log going to the backup.
    Recording,
    /// Solo node: running free, nothing recorded.
    RunningUnprotected,
    /// Backup: replaying the primary's log.
    Replaying,
    /// Backup that took over: running free.
    Live,
    /// Suspended (the lease lapsed): the guest stands still at a guest exit.
    Paused,
    Stopped,
    Failed,
    Diverged,
}

impl VmPhase {
    /// Every phase's name, as metrics spell them.
    pub const NAMES: [&'static str; 10] = [
        "not started",
        "joining",
        "recording",
        "running unprotected",
        "replaying",
        "live",
        "paused",
        "stopped",
        "failed",
        "diverged",
    ];

    /// The phase's name, without its detail.
    pub fn name(&self) -> &'static str {
        match self {
            VmPhase::NotStarted => "not started",
            VmPhase::Joining(_) => "joining",
            VmPhase::Recording => "recording",
            VmPhase::RunningUnprotected => "running unprotected",
            VmPhase::Replaying => "replaying",
            VmPhase::Live => "live",
            VmPhase::Paused => "paused",
            VmPhase::Stopped => "stopped",
            VmPhase::Failed => "failed",
            VmPhase::Diverged => "diverged",
        }
    }

    /// Running the guest with its output to clients (when the node is live).
    pub fn runs_free_or_records(&self) -> bool {
        matches!(
            self,
            VmPhase::Recording | VmPhase::RunningUnprotected | VmPhase::Live
        )
    }
}

impl std::fmt::Display for VmPhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VmPhase::Joining(d) => write!(f, "joining: {d}"),
            p => f.write_str(p.name()),
        }
    }
}

/// A join refused by the live node for a reason a restart does not change (another
/// guest or VM configuration, another protocol version, the key): the operator must act.
#[derive(Clone, Debug)]
pub struct Refusal(pub String);

/// What the daemon knows about its VMM (for status, metrics and the role supervisor).
pub struct VmState {
    phase: Mutex<VmPhase>,
    /// The phase a pause interrupted (restored at the resume).
    before_pause: Mutex<Option<VmPhase>>,
    /// Why the VMM stopped, if it did.
    error: Mutex<Option<String>>,
    /// The live node refused this joiner for good (see [`Refusal`]).
    refused: Mutex<Option<Refusal>>,
    /// A divergence the backup found.
    divergence: Mutex<Option<Divergence>>,
    pub report: Mutex<Option<RunReport>>,
    pub stats: Arc<sink::VmLogStats>,
    pub live: Arc<ft_vmm::LiveStats>,
    control: Mutex<Option<Arc<Control>>>,
    /// A second handle on the VM's TAP, to kick the output ring's release pass.
    kick: Mutex<Option<ft_vmm::net::Tap>>,
    /// Backup: VMM entries the channel buffered for replay.
    pub entries_received: Arc<AtomicU64>,
    /// Backup: closes the replay feed (the receive loop owns it) at go-live.
    feed_close: Arc<feed::FeedClose>,
    /// Backup: the replica's store of input frames.
    frames: Mutex<Option<MemFrameStore>>,
    /// Primary: the backup said it left (LEAVE), and why; taken by the role supervisor.
    pub leave: Mutex<Option<String>>,
    /// The running VMM's state-transfer handle (a backup joining this node).
    pub transfer: Mutex<Option<ft_vmm::transfer::TransferSource>>,
    /// The VMM's configuration hash (guest image, RAM, service settings, CPU model).
    pub config_hash: AtomicU64,
    /// Backups that joined this node by state transfer (the supervisor pairs each).
    joined: AtomicU64,
    /// The last (or running) join, for status.
    pub join: Mutex<Option<Value>>,
    last_join_pause_ns: AtomicU64,
    last_join_epoch: AtomicU64,
    /// Connections to the join service that were not a join request (dropped).
    pub join_bad_requests: AtomicU64,
    /// Join hellos refused because their MAC did not verify under the channel key (a
    /// host without the key, or another key_file).
    pub join_auth_failures: AtomicU64,
    /// This node ran the VM without a backup at some point (so its log no longer starts
    /// with the VM's boot).
    ran_alone: AtomicBool,
    /// Primary: VMLOG frames kept for VMNACK repair (shared with the repair thread).
    pub log_store: Arc<sink::VmLogStore>,
}

impl Default for VmState {
    fn default() -> Self {
        VmState {
            phase: Mutex::new(VmPhase::NotStarted),
            before_pause: Mutex::new(None),
            error: Mutex::new(None),
            refused: Mutex::new(None),
            divergence: Mutex::new(None),
            report: Mutex::new(None),
            stats: Default::default(),
            live: Default::default(),
            control: Mutex::new(None),
            kick: Mutex::new(None),
            entries_received: Default::default(),
            feed_close: Default::default(),
            frames: Mutex::new(None),
            leave: Mutex::new(None),
            transfer: Mutex::new(None),
            config_hash: AtomicU64::new(0),
            joined: AtomicU64::new(0),
            join: Mutex::new(None),
            last_join_pause_ns: AtomicU64::new(0),
            last_join_epoch: AtomicU64::new(0),
            join_bad_requests: AtomicU64::new(0),
            join_auth_failures: AtomicU64::new(0),
            ran_alone: AtomicBool::new(false),
            log_store: Default::default(),
        }
    }
}

impl VmState {
    /// Writes a kick frame into the VM's TAP: the data plane runs a release pass on it
    /// (and emits nothing of it).
    pub fn kick_release(&self, vm_mac: [u8; 6]) -> anyhow::Result<()> {
        use ft_vmm::net::NetBackend;
        let mut g = self.kick.lock().unwrap();
        let tap = g.as_mut().context("no TAP handle to kick")?;
        let mut f = [0u8; 60];
        f[..6].fill(0xff);
        f[6..12].copy_from_slice(&vm_mac);
        f[12..14].copy_from_slice(&ft_common::wire::ETHERTYPE_FT.to_be_bytes());
        tap.send(&f)?;
        Ok(())
    }

    /// Keeps the VMM's transfer handle and configuration hash (for joining backups).
    fn offer_transfer(&self, vmm: &Vmm) {
        *self.transfer.lock().unwrap() = Some(vmm.transfer_source());
        self.config_hash.store(vmm.config_hash(), Relaxed);
    }

    pub fn phase(&self) -> VmPhase {
        self.phase.lock().unwrap().clone()
    }

    pub fn set_phase(&self, p: VmPhase) {
        *self.phase.lock().unwrap() = p;
    }

    /// The suspension began (the guest pauses) or ended (it goes on as before).
    pub(crate) fn set_suspended(&self, on: bool) {
        let mut phase = self.phase.lock().unwrap();
        let mut before = self.before_pause.lock().unwrap();
        if on {
            if *phase != VmPhase::Paused {
                *before = Some(phase.clone());
                *phase = VmPhase::Paused;
            }
        } else if *phase == VmPhase::Paused
            && let Some(p) = before.take()
        {
            *phase = p;
        }
    }

    pub fn error(&self) -> Option<String> {
        self.error.lock().unwrap().clone()
    }

    pub fn divergence(&self) -> Option<Divergence> {
        self.divergence.lock().unwrap().clone()
    }

    /// The replica was found different from the primary: it stopped for good.
    pub(crate) fn diverged(&self, d: Divergence) {
        self.set_phase(VmPhase::Diverged);
        *self.error.lock().unwrap() = Some(format!(
            "divergence at exit {} (verified equal at exit {}): {}",
            d.exit, d.verified, d.what
        ));
        *self.divergence.lock().unwrap() = Some(d);
    }

    pub fn refused(&self) -> Option<Refusal> {
        self.refused.lock().unwrap().clone()
    }

    pub(crate) fn set_refused(&self, r: Refusal) {
        *self.refused.lock().unwrap() = Some(r);
    }

    /// The running VMM's control handle (pause, stop, go live), once it runs.
    pub fn control(&self) -> Option<Arc<Control>> {
        self.control.lock().unwrap().clone()
    }

    /// Backup: the replica's input frames.
    pub fn frames(&self) -> Option<MemFrameStore> {
        self.frames.lock().unwrap().clone()
    }

    pub fn feed_close(&self) -> &feed::FeedClose {
        &self.feed_close
    }

    /// Backups that joined this node so far.
    pub fn joined(&self) -> u64 {
        self.joined.load(Relaxed)
    }

    /// A backup joined at `epoch` (the role supervisor pairs it if the node is still
    /// the primary of that epoch).
    pub fn count_join(&self, epoch: u64, pause: Duration) {
        self.last_join_pause_ns
            .store(pause.as_nanos() as u64, Relaxed);
        self.last_join_epoch.store(epoch, Relaxed);
        self.joined.fetch_add(1, Relaxed);
    }

    pub fn last_join_epoch(&self) -> u64 {
        self.last_join_epoch.load(Relaxed)
    }

    pub fn last_join_pause_ms(&self) -> f64 {
        self.last_join_pause_ns.load(Relaxed) as f64 / 1e6
    }

    /// This node runs (or ran) the VM without a backup: its log no longer starts with
    /// the VM's boot.
    pub(crate) fn ran_alone(&self) {
        self.ran_alone.store(true, Relaxed);
    }

    pub fn has_run_alone(&self) -> bool {
        self.ran_alone.load(Relaxed)
    }

    pub fn json(&self) -> Value {
        let live = &self.live;
        json!({
            "phase": self.phase().to_string(),
            "error": self.error(),
            "refused": self.refused().map(|r| r.0),
            "divergence": self.divergence().map(|d| json!({
                "exit": d.exit, "verified_equal_at_exit": d.verified, "what": d.what,
            })),
            "exits": live.exits.load(Relaxed),
            "log_entries": live.log_entries.load(Relaxed),
            "entries_received": self.entries_received.load(Relaxed),
            "entries_replayed": live.entries_consumed.load(Relaxed),
            "checkpoints": live.checkpoints.load(Relaxed),
            "checkpoints_verified": live.checkpoints_verified.load(Relaxed),
            "tx_frames": live.tx_frames.load(Relaxed),
            "went_live": live.went_live.load(Relaxed),
            "tx_frames_at_live": live.tx_frames_at_live.load(Relaxed),
            "tx_hash": format!("{:#018x}", live.tx_hash.load(Relaxed)),
            "end_verified": live.end_verified.load(Relaxed),
            "frame_waits": live.frame_waits.load(Relaxed),
            "rx_frames": live.rx_frames.load(Relaxed),
            "vmlog_frames": self.stats.frames.load(Relaxed),
            "vmlog_bytes": self.stats.bytes.load(Relaxed),
            "vmlog_entries": self.stats.entries.load(Relaxed),
            "vmlog_retransmits": self.stats.retransmits.load(Relaxed),
            "vmlog_send_errors": self.stats.send_errors.load(Relaxed),
            "window_stalls": self.stats.stalls.load(Relaxed),
            "window_stalled_now": self.stats.stalled.load(Relaxed),
            "window_stall_ms": self.stats.stall_ns.load(Relaxed) as f64 / 1e6,
            "entries_discarded_solo": self.stats.discarded.load(Relaxed),
            "replay_backlog_bytes": self.feed_close.backlog_bytes(),
            "joins": self.joined(),
            "join_bad_requests": self.join_bad_requests.load(Relaxed),
            "join_auth_failures": self.join_auth_failures.load(Relaxed),
            "config_hash": self.config_hash.load(Relaxed),
            "control_frames_bad_tag": self.stats.bad_tags.load(Relaxed),
            "join": *self.join.lock().unwrap(),
        })
    }
}

/// The guest image the VM boots or joins with, checked against `vm.image_sha256` now
/// (the file may have changed since the config was loaded).
pub fn guest_image(cfg: &Config) -> anyhow::Result<Vec<u8>> {
    Ok(cfg.vm.checked_image_bytes()?)
}

/// The live node's VMM, started once the node won test-and-set (its epoch is set: log
/// frames carry it): recording (its output to the TAP, its log to the backup), or, for
/// a node that runs `unprotected` (role solo), free-running with nothing recorded. Runs
/// until `stop`.
#[allow(clippy::too_many_arguments)]
pub fn start_primary(
    cfg: &Config,
    dp: Arc<DataPlane>,
    roles: Arc<Roles>,
    tap: ft_vmm::net::Tap,
    session: u64,
    state: Arc<VmState>,
    unprotected: bool,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<JoinHandle<()>> {
    let store = state.log_store.clone();
    let image = guest_image(cfg)?;
    let mut vcfg = cfg.vm.vmm_config();
    vcfg.mode = if unprotected {
        Mode::Free
    } else {
        Mode::Record
    };
    let window = cfg.channel.vmlog_window;
    let keys = cfg.channel.keys.clone();
    *state.kick.lock().unwrap() = Some(tap.try_clone()?);
    let sock = RawSocket::open(&dp.nics.logging)?;
    let (src, dst) = (dp.nics.logging.mac, cfg.interfaces.peer_log_mac.0);
    let epoch = roles.epoch();
    anyhow::ensure!(epoch != 0, "the VM records only on a live node (no epoch)");
    let control = Control::new();
    *state.control.lock().unwrap() = Some(control.clone());
    let h = std::thread::Builder::new()
        .name("ft-vcpu".into())
        .spawn(move || {
            let sink = sink::ChannelSink {
                dp: dp.clone(),
                sock,
                src,
                dst,
                session,
                keys,
                epoch,
                window,
                store,
                stats: state.stats.clone(),
                stop: stop.clone(),
                roles,
                buf: Vec::with_capacity(ft_common::wire::MAX_FRAME),
                fault: crate::fault::CorruptClock::from_env(),
                next_seq: 1,
            };
            let run = (|| -> ft_vmm::error::Result<RunReport> {
                let mut vmm = Vmm::new(vcfg, &image, control.clone())?;
                state.offer_transfer(&vmm);
                vmm.set_live_stats(state.live.clone());
                vmm.set_net(Box::new(tap));
                if unprotected {
                    state.set_phase(VmPhase::RunningUnprotected);
                    info!("VMM: running unprotected (solo: nothing is recorded)");
                } else {
                    vmm.set_sink(Box::new(sink));
                    state.set_phase(VmPhase::Recording);
                    info!("VMM: recording (primary)");
                }
                let stopper = spawn_stopper(stop.clone(), control.clone());
                let r = vmm.run();
                stopper.store(true, Relaxed);
                r
            })();
            finish(&state, run);
        })?;
    Ok(h)
}

/// Backup: the replaying VMM, fed by the logging channel (`feed`). Returns the thread and
/// the channel's two ends for the receive loop. `tap` becomes the VM's NIC when it goes
/// live.
///
/// With `channel.join_peer` set, the VMM thread first asks the live node (at the epoch
/// the role supervisor follows, read again at every attempt): it either follows the log
/// from the VM's boot, or receives the running VM's state and replays from the cut;
/// `start` tells the channel where the two streams begin.
#[allow(clippy::too_many_arguments)]
pub fn start_backup(
    cfg: &Config,
    dp: Arc<DataPlane>,
    status: Arc<ChannelStatus>,
    roles: Arc<Roles>,
    state: Arc<VmState>,
    tap: ft_vmm::net::Tap,
    start: Arc<crate::channel::backup::StreamStart>,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<(JoinHandle<()>, feed::FrameStoreSink, feed::VmmFeed)> {
    let image = guest_image(cfg)?;
    let mut vcfg = cfg.vm.vmm_config();
    vcfg.mode = Mode::Replay;
    vcfg.wait_for_go_live = true;
    // Up to 2048 VMLOG frames (~3 MiB) queued for replay; beyond it the receive loop
    // takes no more from the kernel's ring (see `feed`).
    let (chan_sink, chan_source) = ft_vmm::vmlog::channel(feed::REPLAY_QUEUE_FRAMES);
    // Input is put in sequence order, once: a referenced frame below one already put
    // never comes (the replay fails and says so instead of waiting for ever).
    let frames = MemFrameStore::in_order();
    *state.frames.lock().unwrap() = Some(frames.clone());
    let store: Arc<dyn FrameStore> = Arc::new(frames.clone());
    let input = feed::FrameStoreSink(store.clone());
    let control = Control::new();
    *state.control.lock().unwrap() = Some(control.clone());
    *state.kick.lock().unwrap() = Some(tap.try_clone()?);
    let feed = feed::VmmFeed::new(
        chan_sink,
        state.entries_received.clone(),
        state.feed_close.clone(),
        frames.clone(),
    );
    let cfg2 = cfg.clone();
    let h = std::thread::Builder::new()
        .name("ft-vcpu".into())
        .spawn(move || {
            let run = (|| -> ft_vmm::error::Result<RunReport> {
                let mut vmm = if cfg2.channel.join_peer.is_empty() {
                    start.set(1, 1);
                    Vmm::new(vcfg, &image, control.clone())?
                } else {
                    let joined = join::client::join(
                        &cfg2,
                        vcfg.clone(),
                        &image,
                        control.clone(),
                        store.clone(),
                        &roles,
                        &state,
                        &stop,
                    );
                    match joined {
                        Ok(join::client::Joined::FromBoot { session }) => {
                            // Log frames of the live node's run only (a replay of an
                            // earlier run's frames cannot capture this backup).
                            status.peer_session.store(session, Relaxed);
                            dp.set_peer_session(session);
                            start.set(1, 1);
                            Vmm::new(vcfg, &image, control.clone())?
                        }
                        Ok(join::client::Joined::Transfer { vmm, cut }) => {
                            // Log frames of this run only, from the cut on.
                            status.peer_session.store(cut.session, Relaxed);
                            dp.set_peer_session(cut.session);
                            dp.set_delivered(cut.input_start - 1);
                            start.set(cut.input_start, cut.vm_start);
                            *vmm
                        }
                        Err(join::client::JoinError::Refused(r)) => {
                            state.set_refused(Refusal(r.clone()));
                            return Err(ft_vmm::Error::Transfer(r));
                        }
                        Err(join::client::JoinError::Failed(e)) => {
                            return Err(ft_vmm::Error::Transfer(e));
                        }
                    }
                };
                state.offer_transfer(&vmm);
                vmm.set_live_stats(state.live.clone());
                vmm.set_source(Box::new(chan_source));
                vmm.set_frame_store(store);
                vmm.set_net_on_live(Box::new(move || Ok(Box::new(tap) as Box<_>)));
                state.set_phase(VmPhase::Replaying);
                info!("VMM: replaying the primary's log (backup)");
                let stopper = spawn_stopper(stop.clone(), control.clone());
                let r = vmm.run();
                stopper.store(true, Relaxed);
                r
            })();
            frames.close();
            finish(&state, run);
        })?;
    Ok((h, input, feed))
}

/// Asks the VMM to stop when the daemon stops (until `done` is set).
fn spawn_stopper(stop: Arc<AtomicBool>, control: Arc<Control>) -> Arc<AtomicBool> {
    let done = Arc::new(AtomicBool::new(false));
    let d = done.clone();
    std::thread::spawn(move || {
        while !d.load(Relaxed) {
            if stop.load(Relaxed) {
                control.request_stop();
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    done
}

fn finish(state: &VmState, run: ft_vmm::error::Result<RunReport>) {
    match run {
        Ok(r) => {
            info!(outcome = ?r.outcome, exits = r.exits, "VMM stopped");
            state.set_phase(VmPhase::Stopped);
            *state.report.lock().unwrap() = Some(r);
        }
        Err(ft_vmm::Error::Divergence {
            exit,
            rip,
            verified,
            what,
        }) => {
            error!(
                exit,
                verified,
                rip = format!("{rip:#x}"),
                "DIVERGENCE: the backup's VM no longer mirrors the primary's ({what}); its \
                 state was last verified equal at exit {verified}, so the first diverging \
                 exit is after {verified} and at most {exit}; this replica must never go \
                 live: it stops following the log"
            );
            state.diverged(Divergence {
                exit,
                verified,
                what,
            });
        }
        Err(e) => {
            error!("VMM stopped with an error: {e}");
            state.set_phase(VmPhase::Failed);
            *state.error.lock().unwrap() = Some(e.to_string());
        }
    }
}
