//! The live roles: PRIMARY (paired) and SOLO. The supervisor renews the lease, watches
//! the backup while paired and goes solo in a new epoch when it fails, pairs a backup
//! that joined by state transfer, and suspends when the lease lapses while the arbiter
//! does not answer (then retakes its own epoch).
use std::time::{Duration, Instant};

use ft_common::maps::{ChanState, SeqState};
use ft_fence::LeaseState;
use tracing::{error, info, warn};

use super::{
    FailoverReport, NodeRole,
    fencing::{Lease, Tas},
    supervisor::{Next, PairRequest, Supervisor, TICK},
    unix_ms,
};
use crate::{liveness::Peer, vm::VmPhase};

/// How long a new primary waits for its backup's first ack before it goes on alone (the
/// backup may still be learning the epoch, or restoring a joined state).
pub(super) const FIRST_ACK_GRACE: Duration = Duration::from_secs(3);

/// Why the primary gives up on its backup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct BackupFailed {
    pub why: String,
    /// How long the failure took to show (silence, or no progress).
    pub detect: Duration,
}

/// Primary: judges the backup. Pure logic (the supervisor feeds it the kernel's
/// counters and the liveness verdict every tick).
///
/// - A backup that LEAVEs, or falls silent for `peer_timeout` (no valid ack at all,
///   kernel acks and keep-alives alike), has failed.
/// - One that is heard but whose acks do not advance while entries are outstanding is
///   slow, not dead: its replay holds the log it has not replayed, and the windows make
///   this primary wait for it (vCPU back-pressure; client frames wait in TCP). It has
///   failed only after `stall_limit` without any progress (a wedged backup that keeps
///   sending keep-alives must not hold the output forever).
/// - Before its first ack it may still be starting: it has `FIRST_ACK_GRACE`.
pub(super) struct BackupWatch {
    stall_limit: Duration,
    last_acks: (u64, u64),
    last_progress: Instant,
}

impl BackupWatch {
    pub(super) fn new(stall_limit: Duration, now: Instant) -> BackupWatch {
        BackupWatch {
            stall_limit,
            last_acks: (0, 0),
            last_progress: now,
        }
    }

    pub(super) fn judge(
        &mut self,
        peer: Peer,
        timeout: Duration,
        seq: &SeqState,
        chan: &ChanState,
        left: Option<String>,
        now: Instant,
    ) -> Option<BackupFailed> {
        if let Some(why) = left {
            return Some(BackupFailed {
                why: format!("the backup left the log ({why})"),
                detect: Duration::ZERO,
            });
        }
        if !peer.heard {
            let limit = timeout.max(FIRST_ACK_GRACE);
            return (peer.silent_for >= limit).then(|| BackupFailed {
                why: format!(
                    "the backup sent no ack in {} ms",
                    peer.silent_for.as_millis()
                ),
                detect: peer.silent_for,
            });
        }
        if !peer.alive {
            return Some(BackupFailed {
                why: format!(
                    "the backup is silent on the logging channel for {} ms",
                    peer.silent_for.as_millis()
                ),
                detect: peer.silent_for,
            });
        }
        let acks = (seq.acked, seq.vm_acked);
        let outstanding = seq.last_seq > seq.acked || chan.vm_last > seq.vm_acked;
        if acks != self.last_acks || !outstanding {
            self.last_acks = acks;
            self.last_progress = now;
        }
        let stalled = now.duration_since(self.last_progress);
        (outstanding && stalled >= self.stall_limit).then(|| BackupFailed {
            why: format!(
                "the backup is heard but made no progress for {} ms (acked {}/{} of {}/{}; \
                 channel.backup_stall_ms = {})",
                stalled.as_millis(),
                seq.acked,
                seq.vm_acked,
                seq.last_seq,
                chan.vm_last,
                self.stall_limit.as_millis()
            ),
            detect: stalled,
        })
    }
}

impl Supervisor {
    /// A live node (PRIMARY or SOLO at `epoch`, its lease kept by `lease`) until it must
    /// suspend, halt or stop.
    pub(super) async fn serve(&mut self, mut epoch: u64, mut lease: Lease) -> Next {
        let stall = std::time::Duration::from_millis(self.cfg.channel.backup_stall_ms);
        let mut watch = BackupWatch::new(stall, Instant::now());
        let mut joins_seen = self.vm.as_ref().map_or(0, |v| v.joined());
        let mut tick = tokio::time::interval(TICK);
        loop {
            tokio::select! {
                Some((e, st)) = lease.rx.recv() => {
                    if e != epoch {
                        continue; // an older epoch's keeper (replaced)
                    }
                    match st {
                        // The keeper's callback moved the kernel's deadline already.
                        LeaseState::Valid { .. } => {}
                        LeaseState::Lost { reason, fenced: true } => {
                            return Next::Halt(format!("lease lost: {reason}"));
                        }
                        LeaseState::Lost { reason, fenced: false } => {
                            return Next::Suspend { epoch, why: reason };
                        }
                    }
                }
                Some(req) = self.pair_rx.recv() => {
                    self.pair_at_cut(req);
                    watch = BackupWatch::new(stall, Instant::now());
                }
                _ = tick.tick() => {
                    if self.stopping() {
                        return Next::Stop;
                    }
                    if let Some(why) = self.vm_ended() {
                        return Next::Halt(format!("the protected VM stopped ({why})"));
                    }
                    if let Some(why) = self.worker_died() {
                        return Next::Halt(why);
                    }
                    if self.switchover_now() {
                        return Next::Switchover;
                    }
                    let Some(vm) = self.vm.clone() else { continue };
                    let joins = vm.joined();
                    if joins != joins_seen {
                        joins_seen = joins;
                        self.pair_joined().await;
                    }
                    self.observe_peer();
                    let NodeRole::Primary { .. } = self.roles.current() else {
                        continue;
                    };
                    let (Some(peer), seq, chan) = (self.roles.peer(), self.dp.seq_state(), self.dp.chan_state()) else {
                        continue;
                    };
                    let left = vm.leave.lock().unwrap().take();
                    let Some(failed) = watch.judge(peer, self.liveness.timeout(), &seq, &chan, left, Instant::now()) else {
                        continue;
                    };
                    match self.go_solo(epoch, &failed).await {
                        Ok((e, deadline)) => {
                            epoch = e;
                            lease.start(self, e, deadline);
                        }
                        Err(next) => return next,
                    }
                }
            }
        }
    }

    /// The join service's cut, on the vCPU thread at the guest exit where the new log
    /// starts: a SOLO node becomes PRIMARY (same epoch and lease) with the joining
    /// backup, from this exit on. Anything else is refused (the transfer is undone).
    fn pair_at_cut(&mut self, req: PairRequest) {
        if Instant::now() >= req.deadline {
            let _ = req.reply.send(Err("the cut gave up waiting".into()));
            return;
        }
        if let Err(e) = self.start_joinable_workers() {
            let _ = req.reply.send(Err(format!(
                "cannot start the paired primary's workers: {e:#}"
            )));
            return;
        }
        let answer = match self.roles.current() {
            NodeRole::Solo { epoch } if epoch == req.epoch => {
                // A LEAVE or failed join of an earlier backup is no reason to drop this one.
                if let Some(vm) = &self.vm {
                    vm.leave.lock().unwrap().take();
                }
                let deadline = self.dp.node_state().map_or(0, |n| n.lease_deadline_ns);
                self.roles
                    .set(
                        NodeRole::Primary { epoch },
                        deadline,
                        &format!(
                            "{} joined by state transfer: the log starts at exit {}",
                            req.joiner, req.exit
                        ),
                    )
                    .map(|()| epoch)
                    .map_err(|e| e.to_string())
            }
            other => Err(format!(
                "this node no longer runs alone in epoch {} (it is {} at epoch {})",
                req.epoch,
                other.name(),
                other.epoch()
            )),
        };
        let _ = req.reply.send(answer);
    }

    /// A backup joined by state transfer: pair it at the arbiter (so a take-over need not
    /// wait for this node's lease: from the cut on it emits nothing without that
    /// backup's acks). Not paired (the arbiter unreachable just now), a take-over waits
    /// for the lease: slower, never unsafe.
    async fn pair_joined(&self) {
        let Some(vm) = &self.vm else { return };
        let epoch = vm.last_join_epoch();
        // Only the backup this node's output waits for now: one whose join belongs to an
        // epoch this node has left must never be the follower of a later one.
        if self.roles.current() != (NodeRole::Primary { epoch }) {
            warn!(
                epoch,
                "a backup joined at epoch {epoch}, but this node has moved on: not paired"
            );
            return;
        }
        *self.status.backup_left.lock().unwrap() = None;
        info!(
            epoch,
            pause_ms = vm.last_join_pause_ms(),
            "a backup joined by state transfer"
        );
        self.pair_peer(epoch, "the joined backup").await;
    }

    /// Names the peer as this owner's paired follower at the arbiter.
    pub(super) async fn pair_peer(&self, epoch: u64, what: &str) {
        let Some(arb) = &self.arb else { return };
        let f = &self.cfg.fence;
        match arb.pair(&f.vm, &f.node, epoch, &f.peer).await {
            Ok(()) => info!(epoch, peer = %f.peer, "paired {what} at the arbiter"),
            Err(e) => warn!(
                "could not pair {} at the arbiter ({e}): a take-over would wait for this lease",
                f.peer
            ),
        }
    }

    /// Primary whose backup failed: a new epoch (which unpairs) before any output leaves
    /// without acks, then SOLO. While the arbiter does not answer, output stays held;
    /// if the lease lapses meanwhile, the node suspends (and retakes its epoch).
    async fn go_solo(&self, epoch: u64, failed: &BackupFailed) -> Result<(u64, u64), Next> {
        let t0 = Instant::now();
        warn!("{}: going solo", failed.why);
        let (new_epoch, deadline) = match &self.arb {
            Some(arb) => {
                let lapsed = || {
                    self.dp
                        .node_state()
                        .is_ok_and(|n| n.lease_deadline_ns <= ft_fence::monotonic_now_ns())
                };
                match self
                    .test_and_set(arb, epoch, "cannot go solo yet (output stays held)", lapsed)
                    .await
                {
                    Tas::Won(e, deadline) => (e, deadline),
                    Tas::Lost(other) => {
                        return Err(Next::Halt(format!(
                            "{}, but test-and-set for a new epoch was lost ({other:?}): the backup took over",
                            failed.why
                        )));
                    }
                    Tas::Stopped if self.stopping() => return Err(Next::Stop),
                    Tas::Stopped => {
                        return Err(Next::Suspend {
                            epoch,
                            why: format!(
                                "{}, and the lease lapsed while the arbiter did not answer",
                                failed.why
                            ),
                        });
                    }
                }
            }
            None => (epoch + 1, u64::MAX),
        };
        let tas = t0.elapsed();
        self.become_solo(new_epoch, deadline, &failed.why)?;
        self.roles.set_last_failover(FailoverReport {
            what: format!("primary went solo: {}", failed.why),
            at_unix_ms: unix_ms(),
            detect_ms: failed.detect.as_secs_f64() * 1e3,
            test_and_set_ms: tas.as_secs_f64() * 1e3,
            total_ms: (failed.detect + t0.elapsed()).as_secs_f64() * 1e3,
            ..Default::default()
        });
        Ok((new_epoch, deadline))
    }

    /// SOLO at `epoch` with `deadline`: the VMM's entries are discarded from now on
    /// (nobody replays them), and a kick releases what was held for acks that will not
    /// come.
    fn become_solo(&self, epoch: u64, deadline: u64, why: &str) -> Result<(), Next> {
        if let Some(vm) = &self.vm {
            vm.ran_alone();
            // Whatever a backup said before is about a pairing that is over.
            vm.leave.lock().unwrap().take();
        }
        *self.status.backup_left.lock().unwrap() = Some(why.to_string());
        if let Err(e) = self.roles.set(NodeRole::Solo { epoch }, deadline, why) {
            return Err(Next::Halt(format!(
                "cannot switch the data plane to solo: {e}"
            )));
        }
        if let Some(vm) = &self.vm
            && let Err(e) = vm.kick_release(self.cfg.vm.mac.0)
        {
            warn!("could not kick the output ring ({e}): held frames leave with the next output");
        }
        Ok(())
    }

    /// SUSPENDED: the lease lapsed while the arbiter did not answer. Output is already
    /// fenced by the kernel; the VM pauses (it would only make output nobody sees and
    /// let its clients' timers run), heartbeats stop (a paired backup may take over: it
    /// is the node that can still reach the arbiter, perhaps), and test-and-set at this
    /// node's own epoch is retried. Winning proves nobody else went live meanwhile: the
    /// node resumes alone in the new epoch. Losing means another node took the VM: halt.
    pub(super) async fn suspended(&mut self, epoch: u64, why: String) -> Next {
        warn!("suspended: {why}; the VM pauses, test-and-set at epoch {epoch} is retried");
        if let Err(e) = self.roles.set(
            NodeRole::Suspended {
                epoch,
                why: why.clone(),
            },
            0,
            &why,
        ) {
            return Next::Halt(format!("cannot fence the data plane: {e}"));
        }
        let control = self.vm.as_ref().and_then(|v| v.control());
        if let Some(c) = &control {
            c.pause();
        }
        if let Some(vm) = &self.vm {
            vm.set_suspended(true);
        }
        let Some(arb) = self.arb.clone() else {
            return Next::Halt(format!("{why} (no arbiter to ask again)"));
        };
        let t0 = Instant::now();
        // Retried while the arbiter does not answer (status shows it), or until the VM
        // stops (nothing left to resume).
        let vm_stopped = || {
            self.vm
                .as_ref()
                .is_some_and(|v| matches!(v.phase(), VmPhase::Stopped | VmPhase::Failed))
        };
        let (new_epoch, deadline) = match self
            .test_and_set(
                &arb,
                epoch,
                "suspended: lease lapsed, retaking this node's epoch",
                vm_stopped,
            )
            .await
        {
            Tas::Won(e, deadline) => (e, deadline),
            Tas::Lost(other) => {
                return Next::Halt(format!(
                    "suspended at epoch {epoch} and another node went live meanwhile ({other:?})"
                ));
            }
            Tas::Stopped if self.stopping() => return Next::Stop,
            Tas::Stopped => {
                return Next::Halt(format!(
                    "the protected VM stopped while suspended ({})",
                    self.vm_ended().unwrap_or_default()
                ));
            }
        };
        let reason = format!(
            "retook the VM after {:.1} s suspended: won test-and-set at epoch {epoch} (nobody else went live)",
            t0.elapsed().as_secs_f64()
        );
        if let Err(next) = self.become_solo(new_epoch, deadline, &reason) {
            return next;
        }
        if let Some(vm) = &self.vm {
            vm.set_suspended(false);
        }
        if let Some(c) = &control {
            c.resume();
        }
        info!(epoch = new_epoch, "{reason}; the VM goes on");
        let mut lease = Lease::new();
        lease.start(self, new_epoch, deadline);
        Next::Live {
            epoch: new_epoch,
            lease,
        }
    }

    /// Boots the guest: wins test-and-set at `expected` (first start, or a forced one),
    /// goes live (PRIMARY, or SOLO for a solo node), pairs the peer, and starts the
    /// recording VM with the live role's workers.
    pub(super) async fn boot(&mut self, expected: u64) -> Result<Next, Option<String>> {
        let unprotected = self.cfg.node.role == crate::config::Role::Solo;
        let (epoch, deadline) = match self.arb.clone() {
            Some(arb) => match self
                .test_and_set(
                    &arb,
                    expected,
                    "not going live: the arbiter does not answer",
                    || false,
                )
                .await
            {
                Tas::Won(e, d) => (e, d),
                // Another node went live first: decide again (it will be followed).
                Tas::Lost(other) => {
                    info!(?other, "test-and-set to boot lost: another node went live");
                    return Err(None);
                }
                Tas::Stopped => return Ok(Next::Stop),
            },
            None => (self.cfg.channel.epoch, u64::MAX),
        };
        let role = if unprotected {
            NodeRole::Solo { epoch }
        } else {
            NodeRole::Primary { epoch }
        };
        let why = if expected == 0 {
            "won test-and-set: the pair's first start boots the VM".to_string()
        } else {
            format!(
                "won test-and-set at epoch {expected}: a fresh VM (--bootstrap --force; the VM of epoch {expected} is lost)"
            )
        };
        if self.stopping() {
            // Nothing was booted; the arbiter records the epoch as lived all the same (a
            // start after this one needs --bootstrap --force).
            return Ok(Next::Stop);
        }
        if let Err(e) = self.roles.set(role, deadline, &why) {
            error!("cannot write the lease to the kernel: {e}");
            return Err(Some(format!("cannot write the lease to the kernel: {e}")));
        }
        if !unprotected {
            // Paired, the backup may take over without waiting for this lease: this
            // node's output needs its acks. Unpaired (the arbiter unreachable just now),
            // it would wait for the lease to lapse: slower, never unsafe.
            self.pair_peer(epoch, "the backup").await;
        }
        if let Err(e) = self.start_live_workers(unprotected) {
            return Ok(Next::Halt(format!("cannot start the VM: {e:#}")));
        }
        if unprotected && let Some(vm) = &self.vm {
            vm.ran_alone();
        }
        let mut lease = Lease::new();
        lease.start(self, epoch, deadline);
        Ok(Next::Live { epoch, lease })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::liveness::Watching;

    fn peer(heard: bool, silent_ms: u64, timeout_ms: u64) -> Peer {
        Peer {
            watching: Watching::Backup,
            heard,
            silent_for: Duration::from_millis(silent_ms),
            alive: silent_ms < timeout_ms,
        }
    }

    fn seq(last: u64, acked: u64) -> SeqState {
        SeqState {
            last_seq: last,
            acked,
            ..Default::default()
        }
    }

    #[test]
    fn a_slow_backup_that_is_heard_is_waited_for_up_to_the_stall_limit() {
        let t0 = Instant::now();
        let ms = |m| t0 + Duration::from_millis(m);
        let timeout = Duration::from_millis(50);
        let mut w = BackupWatch::new(Duration::from_millis(5000), t0);
        let chan = ChanState::default();
        // Acks move: progress.
        assert_eq!(
            w.judge(
                peer(true, 1, 50),
                timeout,
                &seq(100, 10),
                &chan,
                None,
                ms(0)
            ),
            None
        );
        // Stuck at 10 with entries outstanding, but heard (keep-alives): slow, not dead,
        // for much longer than the peer timeout.
        for t in [100, 1000, 4999] {
            assert_eq!(
                w.judge(
                    peer(true, 2, 50),
                    timeout,
                    &seq(200, 10),
                    &chan,
                    None,
                    ms(t)
                ),
                None,
                "at {t} ms"
            );
        }
        let f = w
            .judge(
                peer(true, 2, 50),
                timeout,
                &seq(200, 10),
                &chan,
                None,
                ms(5000),
            )
            .expect("past the stall limit");
        assert!(f.why.contains("no progress"), "{}", f.why);
        // Progress again resets it.
        let mut w = BackupWatch::new(Duration::from_millis(5000), t0);
        w.judge(
            peer(true, 1, 50),
            timeout,
            &seq(200, 10),
            &chan,
            None,
            ms(0),
        );
        assert_eq!(
            w.judge(
                peer(true, 1, 50),
                timeout,
                &seq(200, 11),
                &chan,
                None,
                ms(4000)
            ),
            None
        );
        assert_eq!(
            w.judge(
                peer(true, 1, 50),
                timeout,
                &seq(200, 11),
                &chan,
                None,
                ms(8999)
            ),
            None
        );
    }

    #[test]
    fn silence_or_leave_fails_the_backup_at_once() {
        let t0 = Instant::now();
        let timeout = Duration::from_millis(50);
        let mut w = BackupWatch::new(Duration::from_millis(5000), t0);
        let chan = ChanState::default();
        let f = w
            .judge(peer(true, 50, 50), timeout, &seq(1, 1), &chan, None, t0)
            .expect("silent");
        assert!(f.why.contains("silent"));
        let f = w
            .judge(
                peer(true, 0, 50),
                timeout,
                &seq(1, 1),
                &chan,
                Some("its replica diverged".into()),
                t0,
            )
            .expect("left");
        assert!(f.why.contains("diverged"));
        // Not heard yet: the first-ack grace.
        assert_eq!(
            w.judge(peer(false, 2999, 50), timeout, &seq(1, 0), &chan, None, t0),
            None
        );
        assert!(
            w.judge(peer(false, 3000, 50), timeout, &seq(1, 0), &chan, None, t0)
                .is_some()
        );
    }
}
