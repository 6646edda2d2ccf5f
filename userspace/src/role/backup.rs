//! The BACKUP role: follow the live primary's epoch (while joining, follow it when it
//! moves on), and take over when the primary falls silent or its log ended.
use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use ft_fence::TasOutcome;
use ft_vmm::vmlog::FrameKey;
use tracing::{info, warn};

use super::{
    FailoverReport, NodeRole,
    fencing::{Lease, Tas},
    supervisor::{FOLLOW_POLL, Next, Supervisor, TICK},
    unix_ms,
};
use crate::{
    netif::RawSocket,
    vm::{VmPhase, VmState},
};

/// A take-over gives up only when nothing moves for this long: the receive loop takes
/// no more of the log XDP acked, the feed hands nothing more to the replay, the replay
/// consumes nothing. A backup that replays slower than its primary recorded may hold
/// many seconds of work; it takes over with all of it, however long that takes.
pub(super) fn drain_stall(peer_timeout: Duration) -> Duration {
    (peer_timeout * 20).max(Duration::from_secs(10))
}

impl Supervisor {
    /// Following the primary of `epoch` until it must take over, halt or stop.
    pub(super) async fn follow(&mut self, mut epoch: u64) -> Next {
        let retry = self.cfg.fence.renew_interval();
        let mut last_check = Instant::now();
        let mut tick = tokio::time::interval(TICK);
        // The primary is watched from when the replay starts: before it (a join's
        // transfer takes seconds while the live node runs alone and sends nothing) its
        // silence says nothing.
        let mut watching = false;
        loop {
            tick.tick().await;
            if self.stopping() {
                return Next::Stop;
            }
            if self
                .status
                .delivery_failed
                .load(std::sync::atomic::Ordering::Relaxed)
            {
                // A replica that stopped (a divergence, a failed replay) stops taking
                // entries too: its own error, recorded before its feed closed, is the
                // cause to name.
                if let Some(why) = self.vm.as_ref().and_then(|v| v.error()) {
                    return Next::Halt(format!("this backup's replica stopped ({why})"));
                }
                return Next::Halt(
                    "this backup could not hand an acked log entry on (see the log above): it \
                     confirms nothing more and can never take over"
                        .into(),
                );
            }
            if let Some(why) = self.vm_ended() {
                if let Some(r) = self.vm.as_ref().and_then(|v| v.refused()) {
                    return Next::Refuse(r.0);
                }
                return Next::Halt(format!("this backup's replica stopped ({why})"));
            }
            if let Some(why) = self.worker_died() {
                return Next::Halt(why);
            }
            let joining = self
                .vm
                .as_ref()
                .is_some_and(|v| matches!(v.phase(), VmPhase::Joining(_)));
            if let Some(arb) = self.arb.clone()
                && last_check.elapsed() >= if joining { FOLLOW_POLL } else { retry }
            {
                last_check = Instant::now();
                match arb.read(&self.cfg.fence.vm).await {
                    Ok(info) if info.epoch != epoch => {
                        let live_elsewhere = info.owner.as_deref().is_some_and(|o| {
                            o != self.cfg.fence.node && !info.lease_remaining.is_zero()
                        });
                        if !joining {
                            return Next::Halt(format!(
                                "the live primary moved to epoch {} (owner {:?}) without this \
                                 replica, which follows epoch {epoch} and is stale",
                                info.epoch, info.owner
                            ));
                        }
                        if live_elsewhere {
                            // No state yet: join the node that runs the VM now.
                            let why = format!(
                                "the live node moved to epoch {} ({}): the join follows it",
                                info.epoch,
                                info.owner.as_deref().unwrap_or("?")
                            );
                            epoch = info.epoch;
                            if let Err(e) = self.roles.set(NodeRole::Backup { epoch }, 0, &why) {
                                return Next::Halt(format!("cannot write the epoch: {e}"));
                            }
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        warn!("backup: arbiter unreachable ({e}); still following epoch {epoch}")
                    }
                }
            }
            let Some(vm) = self.vm.clone() else {
                self.observe_peer();
                continue;
            };
            if !watching && vm.phase() == VmPhase::Replaying {
                watching = true;
                self.liveness.watch();
            }
            if !watching {
                continue;
            }
            self.observe_peer();
            let primary_known = self
                .status
                .peer_session
                .load(std::sync::atomic::Ordering::Relaxed)
                != 0;
            // A primary that stopped gracefully (a switchover, or ftd stopped) logged
            // END: once the replica verified it, nothing more can come, so there is no
            // need to wait for the silence.
            let ended = vm
                .live
                .end_verified
                .load(std::sync::atomic::Ordering::Relaxed);
            let silent = self.roles.peer().is_some_and(|p| !p.alive);
            if primary_known && (silent || ended) && vm.phase() == VmPhase::Replaying {
                return self.take_over(vm, epoch).await;
            }
        }
    }

    /// Backup whose primary fell silent: stop acking, win test-and-set at the epoch it
    /// followed, replay everything buffered, go live, hand the live VM the input the
    /// primary's guest never consumed, announce the VM's addresses; then serve alone.
    async fn take_over(&mut self, vm: Arc<VmState>, followed: u64) -> Next {
        let ended = vm
            .live
            .end_verified
            .load(std::sync::atomic::Ordering::Relaxed);
        let detect = if ended {
            Duration::ZERO
        } else {
            self.liveness.timeout()
        };
        let cause = if ended {
            "stopped its VM (its log ended, END verified)".to_string()
        } else {
            format!("was silent for {} ms", detect.as_millis())
        };
        let t0 = Instant::now();
        // First: the primary can release nothing more (it needs these acks). `acked` is
        // the last ack anybody sent, XDP included; all of it must be replayed before
        // going live.
        let acked = crate::channel::backup::stop_confirming(&self.dp, &self.status);
        warn!("the primary {cause}: taking over");
        let held_since = Instant::now();
        let held_limit = self
            .arb
            .as_ref()
            .map_or(Duration::ZERO, |a| a.lease_len().saturating_mul(2));
        let (epoch, deadline) = match self.arb.clone() {
            Some(arb) => loop {
                if self.stopping() {
                    return Next::Stop;
                }
                match self
                    .test_and_set(
                        &arb,
                        followed,
                        "cannot take over yet (nobody goes live)",
                        || false,
                    )
                    .await
                {
                    Tas::Won(e, deadline) => break (e, deadline),
                    Tas::Lost(TasOutcome::Held {
                        lease_remaining,
                        epoch,
                        ..
                    }) if epoch == followed && held_since.elapsed() < held_limit => {
                        // Not paired (the primary could not reach the arbiter when it went
                        // live): wait for its lease to lapse. A primary still alive takes a
                        // new epoch meanwhile, and this backup then loses (Stale); one that
                        // keeps renewing its lease for two lease lengths is alive too.
                        warn!(
                            "the silent primary was not paired with this backup: waiting {} ms for its lease",
                            lease_remaining.as_millis()
                        );
                        tokio::time::sleep(lease_remaining.min(self.cfg.fence.renew_interval()))
                            .await;
                    }
                    Tas::Lost(other) => {
                        return Next::Halt(format!(
                            "the primary fell silent but this backup lost test-and-set ({other:?})"
                        ));
                    }
                    Tas::Stopped => return Next::Stop,
                }
            },
            None => (followed + 1, u64::MAX),
        };
        let tas = t0.elapsed();
        let reason = format!("took over: the primary of epoch {followed} {cause}");
        if let Err(e) = self.roles.set(NodeRole::Solo { epoch }, deadline, &reason) {
            return Next::Halt(format!("cannot switch the data plane to solo: {e}"));
        }
        let mut lease = Lease::new();
        lease.start(self, epoch, deadline);
        // Replay everything buffered (the log ends where it is now), then go live.
        let t_drain = Instant::now();
        if let Err(why) = self.drain_and_go_live(&vm, acked).await {
            return Next::Halt(why);
        }
        vm.set_phase(VmPhase::Live);
        let drain = t_drain.elapsed();
        // The backup's receive loop is done (the log is closed): it ends before the input
        // it held is handed to the live VM.
        self.stop_backup_workers().await;
        let t_ann = Instant::now();
        let unreferenced = deliver_unconsumed_input(self, &vm);
        announce(self);
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
        self.roles.set_last_failover(report);
        vm.ran_alone();
        // A backup may join this node now.
        if let Err(e) = self.start_joinable_workers() {
            warn!("this node cannot serve a joining backup: {e:#}");
        }
        // Repeat the announcement a few times (a lost gratuitous ARP only delays a
        // switch).
        {
            let (dp, mac, ip) = (
                self.dp.clone(),
                self.cfg.vm.mac.0,
                self.cfg.vm.ipv4.octets(),
            );
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                for _ in 0..3 {
                    send_garp(&dp, mac, ip);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            });
        }
        Next::Live { epoch, lease }
    }

    /// Replays everything this backup confirmed and goes live. First the receive loop
    /// takes what XDP acked from the ring (it is there: XDP submits a record before it
    /// raises the ack), the feed hands the last entries to the replay and closes it, and
    /// the VMM replays to the end and goes live. Bounded by progress, never by total
    /// time: it fails only when nothing moves for `drain_stall` (or the replica fails).
    async fn drain_and_go_live(&self, vm: &VmState, acked: (u64, u64)) -> Result<(), String> {
        use std::sync::atomic::Ordering::Relaxed;
        let stall_limit = drain_stall(self.liveness.timeout());
        let position = || {
            (
                self.status.delivered.load(Relaxed),
                self.status.vm_delivered.load(Relaxed),
                vm.live.entries_consumed.load(Relaxed),
                vm.live.exits.load(Relaxed),
            )
        };
        let mut last = position();
        let mut moved = Instant::now();
        let mut step = 0; // 0: drain the ring, 1: close the feed, 2: go live
        loop {
            let held = (
                self.status.delivered.load(Relaxed),
                self.status.vm_delivered.load(Relaxed),
            );
            if step == 0 && held.0 >= acked.0 && held.1 >= acked.1 {
                vm.feed_close().request();
                step = 1;
            }
            if step == 1 && vm.feed_close().closed() {
                if let Some(ctl) = vm.control() {
                    ctl.request_go_live();
                }
                step = 2;
            }
            if step == 2 && vm.live.went_live.load(std::sync::atomic::Ordering::Acquire) {
                return Ok(());
            }
            if let Some(why) = self.vm_ended() {
                return Err(format!("the replica could not go live ({why})"));
            }
            if step == 0 && self.status.delivery_failed.load(Relaxed) {
                return Err(format!(
                    "the replica holds the log only up to {held:?} of the {acked:?} (input, \
                     VMM) entries it acked, and a delivery failed: it cannot go live"
                ));
            }
            if self.stopping() {
                return Err("ftd is stopping".into());
            }
            let now = position();
            if now != last {
                last = now;
                moved = Instant::now();
            } else if moved.elapsed() >= stall_limit {
                return Err(format!(
                    "the take-over made no progress for {} s (step {step}: held {held:?} of \
                     {acked:?} acked; replayed {} entries): it cannot go live",
                    stall_limit.as_secs(),
                    now.2
                ));
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}

/// Input frames the backup holds beyond the last one the replica consumed: the
/// primary's guest never saw them (never answered them), so the live VM gets them now,
/// in order, through its NIC.
fn deliver_unconsumed_input(sv: &Supervisor, vm: &VmState) -> u64 {
    use std::sync::atomic::Ordering::Relaxed;
    let Some(frames) = vm.frames() else {
        return 0;
    };
    let after = FrameKey {
        epoch: vm.live.last_frame_epoch.load(Relaxed),
        seq: vm.live.last_frame_seq.load(Relaxed),
    };
    let pending = frames.take_after(after);
    if pending.is_empty() {
        return 0;
    }
    let sock = match RawSocket::open(&sv.dp.nics.vm) {
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

fn announce(sv: &Supervisor) {
    send_garp(&sv.dp, sv.cfg.vm.mac.0, sv.cfg.vm.ipv4.octets());
}

/// Gratuitous ARP for the VM's address from its MAC on the client NIC: switches learn
/// the VM's new port, neighbours refresh their entry.
fn send_garp(dp: &crate::dataplane::DataPlane, mac: [u8; 6], ip: [u8; 4]) {
    let mut f = [0u8; 60];
    f[..6].fill(0xff);
    f[6..12].copy_from_slice(&mac);
    f[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    f[14..22].copy_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]); // Ethernet/IPv4, request
    f[22..28].copy_from_slice(&mac);
    f[28..32].copy_from_slice(&ip);
    f[38..42].copy_from_slice(&ip);
    match RawSocket::open(&dp.nics.client) {
        Ok(s) => {
            if let Err(e) = s.send(&f) {
                warn!("gratuitous ARP not sent: {e}");
            }
        }
        Err(e) => warn!("gratuitous ARP not sent: {e}"),
    }
}
