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

/// What the daemon knows about its VMM (for status, metrics and the role controller).
#[derive(Default)]
pub struct VmState {
    /// "starting", "waiting for the primary to go live", "recording", "replaying",
    /// "stopped", "failed", "diverged".
    pub phase: Mutex<String>,
    /// Why the VMM stopped, if it did.
    pub error: Mutex<Option<String>>,
    /// A divergence the backup found.
    pub divergence: Mutex<Option<Divergence>>,
    pub report: Mutex<Option<RunReport>>,
    pub stats: Arc<sink::VmLogStats>,
    pub live: Arc<ft_vmm::LiveStats>,
    pub control: Mutex<Option<Arc<Control>>>,
    /// Primary: the backup left; the recording VMM's entries are discarded.
    pub solo: Arc<AtomicBool>,
    /// Primary: a second handle on the VM's TAP, to kick the output ring's release pass.
    pub kick: Mutex<Option<ft_vmm::net::Tap>>,
    /// Backup: VMM entries the channel buffered for replay.
    pub entries_received: Arc<AtomicU64>,
    /// Backup: the replay feed's end (dropping it ends the log at go-live).
    pub feed: Arc<Mutex<Option<ft_vmm::vmlog::ChannelSink>>>,
    /// Backup: the replica's store of input frames.
    pub frames: Mutex<Option<MemFrameStore>>,
    /// Primary: the backup said it left (LEAVE), and why; taken by the role controller.
    pub leave: Mutex<Option<String>>,
    /// The running VMM's state-transfer handle (a backup joining this node).
    pub transfer: Mutex<Option<ft_vmm::transfer::TransferSource>>,
    /// The VMM's configuration hash (guest image, RAM, service settings, CPU model).
    pub config_hash: AtomicU64,
    /// Backups that joined this node by state transfer (the role controller pairs each).
    pub joined: AtomicU64,
    /// The last (or running) join, for status.
    pub join: Mutex<Option<Value>>,
    pub last_join_pause_ns: AtomicU64,
    /// Connections to the join service that were not a join request (dropped).
    pub join_bad_requests: AtomicU64,
    /// Join hellos refused because their MAC did not verify under the channel key (a
    /// host without the key, or another key_file).
    pub join_auth_failures: AtomicU64,
    /// This node ran the VM without a backup at some point (so its log no longer starts
    /// with the VM's boot).
    pub ran_alone: AtomicBool,
    /// Primary: VMLOG frames kept for VMNACK repair (shared with the repair thread).
    pub log_store: Arc<sink::VmLogStore>,
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
}

impl VmState {
    /// Keeps the VMM's transfer handle and configuration hash (for joining backups).
    fn offer_transfer(&self, vmm: &Vmm) {
        *self.transfer.lock().unwrap() = Some(vmm.transfer_source());
        self.config_hash.store(vmm.config_hash(), Relaxed);
    }

    pub(crate) fn set_phase(&self, p: &str) {
        *self.phase.lock().unwrap() = p.into();
    }

    pub fn json(&self) -> Value {
        let live = &self.live;
        json!({
            "phase": *self.phase.lock().unwrap(),
            "error": *self.error.lock().unwrap(),
            "divergence": self.divergence.lock().unwrap().as_ref().map(|d| json!({
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
            "solo": self.solo.load(Relaxed),
            "entries_discarded_solo": self.stats.discarded.load(Relaxed),
            "joins": self.joined.load(Relaxed),
            "join_bad_requests": self.join_bad_requests.load(Relaxed),
            "join_auth_failures": self.join_auth_failures.load(Relaxed),
            "config_hash": self.config_hash.load(Relaxed),
            "control_frames_bad_tag": self.stats.bad_tags.load(Relaxed),
            "join": *self.join.lock().unwrap(),
        })
    }
}

fn guest_image(cfg: &Config) -> anyhow::Result<Vec<u8>> {
    if cfg.vm.image.as_os_str().is_empty() {
        return Ok(ft_vmm::GUEST_ELF.to_vec());
    }
    std::fs::read(&cfg.vm.image).with_context(|| format!("reading vm.image {:?}", cfg.vm.image))
}

/// Primary: the recording VMM. It starts once the node is live (an epoch is set: log
/// frames carry it) and runs until `stop`; its output goes to the TAP, its log to the
/// backup. A node configured solo (`state.solo` set before the start) runs the VMM in
/// free mode instead: nothing is recorded.
#[allow(clippy::too_many_arguments)]
pub fn start_primary(
    cfg: &Config,
    dp: Arc<DataPlane>,
    status: Arc<ChannelStatus>,
    tap: ft_vmm::net::Tap,
    session: u64,
    state: Arc<VmState>,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<JoinHandle<()>> {
    let store = state.log_store.clone();
    let image = guest_image(cfg)?;
    let mut vcfg = cfg.vm.vmm_config();
    let unprotected = state.solo.load(Relaxed);
    vcfg.mode = if unprotected {
        Mode::Free
    } else {
        Mode::Record
    };
    let window = cfg.channel.vmlog_window;
    *state.kick.lock().unwrap() = Some(tap.try_clone()?);
    let sock = RawSocket::open(&dp.nics.logging)?;
    let (src, dst) = (dp.nics.logging.mac, cfg.interfaces.peer_log_mac.0);
    let h = std::thread::Builder::new()
        .name("ft-vcpu".into())
        .spawn(move || {
            state.set_phase("waiting for the primary to go live");
            while status.epoch.load(Relaxed) == 0 {
                if stop.load(Relaxed) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            let control = Control::new();
            *state.control.lock().unwrap() = Some(control.clone());
            let sink = sink::ChannelSink {
                dp: dp.clone(),
                sock,
                src,
                dst,
                session,
                epoch: Arc::new(std::sync::atomic::AtomicU64::new(
                    status.epoch.load(Relaxed),
                )),
                window,
                store,
                stats: state.stats.clone(),
                stop: stop.clone(),
                solo: state.solo.clone(),
                buf: Vec::with_capacity(ft_common::wire::MAX_FRAME),
                next_seq: 1,
            };
            let run = (|| -> ft_vmm::error::Result<RunReport> {
                let mut vmm = Vmm::new(vcfg, &image, control.clone())?;
                state.offer_transfer(&vmm);
                vmm.set_live_stats(state.live.clone());
                vmm.set_net(Box::new(tap));
                if unprotected {
                    state.set_phase("running unprotected");
                    info!("VMM: running unprotected (solo: nothing is recorded)");
                } else {
                    vmm.set_sink(Box::new(sink));
                    state.set_phase("recording");
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
/// With `channel.join_peer` set, the VMM thread first asks the primary (once the live
/// epoch is known): it either follows the log from the VM's boot, or receives the
/// running VM's state and replays from the cut; `start` tells the channel where the two
/// streams begin.
pub fn start_backup(
    cfg: &Config,
    dp: Arc<DataPlane>,
    status: Arc<ChannelStatus>,
    state: Arc<VmState>,
    tap: ft_vmm::net::Tap,
    start: Arc<crate::channel::backup::StreamStart>,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<(JoinHandle<()>, feed::FrameStoreSink, feed::VmmFeed)> {
    let image = guest_image(cfg)?;
    let mut vcfg = cfg.vm.vmm_config();
    vcfg.mode = Mode::Replay;
    vcfg.wait_for_go_live = true;
    // Up to ~64 MiB of entries queued for replay before the channel waits.
    let (chan_sink, chan_source) = ft_vmm::vmlog::channel(2048);
    let frames: Arc<MemFrameStore> = Arc::new(MemFrameStore::default());
    *state.frames.lock().unwrap() = Some((*frames).clone());
    let store: Arc<dyn FrameStore> = frames.clone();
    let input = feed::FrameStoreSink(store.clone());
    let control = Control::new();
    *state.control.lock().unwrap() = Some(control.clone());
    *state.feed.lock().unwrap() = Some(chan_sink);
    *state.kick.lock().unwrap() = Some(tap.try_clone()?);
    let feed = feed::VmmFeed {
        sink: state.feed.clone(),
        entries: state.entries_received.clone(),
    };
    let cfg2 = cfg.clone();
    let h = std::thread::Builder::new()
        .name("ft-vcpu".into())
        .spawn(move || {
            let run = (|| -> ft_vmm::error::Result<RunReport> {
                let mut vmm = if cfg2.channel.join_peer.is_empty() {
                    start.set(1, 1);
                    Vmm::new(vcfg, &image, control.clone())?
                } else {
                    state.set_phase("joining: waiting for the live epoch");
                    while status.epoch.load(Relaxed) == 0 {
                        if stop.load(Relaxed) {
                            return Err(ft_vmm::Error::Stopped);
                        }
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    let epoch = status.epoch.load(Relaxed);
                    match join::join(
                        &cfg2,
                        vcfg.clone(),
                        &image,
                        control.clone(),
                        store.clone(),
                        epoch,
                        &state,
                        &stop,
                    )
                    .map_err(ft_vmm::Error::Transfer)?
                    {
                        join::Joined::FromBoot => {
                            start.set(1, 1);
                            Vmm::new(vcfg, &image, control.clone())?
                        }
                        join::Joined::Transfer { vmm, cut } => {
                            // Log frames of this run only, from the cut on.
                            status.peer_session.store(cut.session, Relaxed);
                            dp.set_peer_session(cut.session);
                            dp.set_delivered(cut.input_start - 1);
                            start.set(cut.input_start, cut.vm_start);
                            *vmm
                        }
                    }
                };
                state.offer_transfer(&vmm);
                vmm.set_live_stats(state.live.clone());
                vmm.set_source(Box::new(chan_source));
                vmm.set_frame_store(store);
                vmm.set_net_on_live(Box::new(move || Ok(Box::new(tap) as Box<_>)));
                state.set_phase("replaying");
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
            state.set_phase("stopped");
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
            state.set_phase("diverged");
            *state.divergence.lock().unwrap() = Some(Divergence {
                exit,
                verified,
                what: what.clone(),
            });
            *state.error.lock().unwrap() = Some(format!(
                "divergence at exit {exit} (verified equal at exit {verified}): {what}"
            ));
        }
        Err(e) => {
            error!("VMM stopped with an error: {e}");
            state.set_phase("failed");
            *state.error.lock().unwrap() = Some(e.to_string());
        }
    }
}
