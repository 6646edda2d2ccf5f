//! The primary's side: go live, pair the backup, watch its progress, go solo.
use std::{
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use ft_common::maps::{NodeState, ROLE_PRIMARY, ROLE_SOLO};
use ft_fence::Acquire;
use tracing::{error, info, warn};

use super::{
    Ctx, FIRST_ACK_GRACE, FailoverReport, Lease, TICK, Tas, on_lease, stopping, test_and_set,
    unix_ms,
};
use crate::{config::Role, dataplane::DataPlane, vm::VmState};

pub(super) async fn primary(c: Ctx) {
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
        let since = std::time::Instant::now();
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
                Err(e) => {
                    warn!("not going live: {e}");
                    c.roles.set_arbiter_wait(Some(super::ArbiterWait {
                        what: "not going live".into(),
                        error: e.to_string(),
                        since,
                    }));
                }
            }
            if stopping(&c) {
                return;
            }
            tokio::time::sleep(retry).await;
        };
        c.roles.set_arbiter_wait(None);
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
    if live_role == ROLE_SOLO
        && let Some(vm) = c.vm.as_ref()
    {
        vm.ran_alone.store(true, Ordering::Relaxed);
    }
    serve(c, epoch, lease).await
}

/// A live node, paired or alone: renews its lease; while paired, watches the backup and
/// goes solo in a new epoch when it fails; when a backup joins by state transfer (the
/// join service switched the node to PRIMARY at the cut), pairs it at the arbiter and
/// watches it from then on.
pub(super) async fn serve(c: Ctx, mut epoch: u64, mut lease: Lease) {
    let mut watch = BackupWatch::new(&c);
    let mut paired = true;
    let mut joins_seen =
        c.vm.as_ref()
            .map_or(0, |v| v.joined.load(Ordering::Relaxed));
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
                let joins = vm.joined.load(Ordering::Relaxed);
                if joins != joins_seen {
                    joins_seen = joins;
                    joined(&c, vm, epoch).await;
                }
                let Ok(node) = c.dp.node_state() else { continue };
                if node.role != ROLE_PRIMARY {
                    paired = false;
                    continue;
                }
                if !paired {
                    // Paired again (a join's cut): watch the new backup from now on.
                    paired = true;
                    watch = BackupWatch::new(&c);
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

/// A backup joined by state transfer: pair it at the arbiter (so a take-over need not
/// wait for this node's lease: from the cut on it emits nothing without that backup's
/// acks). Not paired (the arbiter unreachable just now), a take-over waits for the
/// lease: slower, never unsafe.
async fn joined(c: &Ctx, vm: &VmState, epoch: u64) {
    *c.status.backup_left.lock().unwrap() = None;
    let pause = vm.last_join_pause_ns.load(Ordering::Relaxed) as f64 / 1e6;
    info!(epoch, pause_ms = pause, "a backup joined by state transfer");
    if let Some(arb) = &c.arb {
        let f = &c.cfg.fence;
        match arb.pair(&f.vm, &f.node, epoch, &f.peer).await {
            Ok(()) => info!(epoch, peer = %f.peer, "paired the joined backup at the arbiter"),
            Err(e) => warn!(
                "could not pair {} at the arbiter ({e}): a take-over would wait for this lease",
                f.peer
            ),
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
    /// Watches from now: acks stamped before now (a previous backup's) do not count.
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
        // Before this backup's first ack it may still be starting (learning the epoch,
        // or restoring the state of a join): only silence counts, after a grace period,
        // then this node goes on alone.
        if seq.last_peer_ns <= self.started_ns {
            let silent = Duration::from_nanos(
                crate::channel::primary::monotonic_ns().saturating_sub(self.started_ns),
            );
            let limit = self.timeout.max(FIRST_ACK_GRACE);
            if silent >= limit {
                return Some((
                    format!("the backup sent no ack in {} ms", silent.as_millis()),
                    silent,
                ));
            }
            return None;
        }
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
        let silent = Duration::from_nanos(
            crate::channel::primary::monotonic_ns().saturating_sub(seq.last_peer_ns),
        );
        if silent >= self.timeout {
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
    vm.ran_alone.store(true, Ordering::Relaxed);
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
