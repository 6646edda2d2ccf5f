//! The supervisor's arbiter calls: test-and-set retried while the arbiter does not
//! answer, and the lease keeper of the current epoch.
use std::sync::Arc;

use ft_fence::{Arbiter, LeaseKeeper, LeaseState, MonoInstant, TasOutcome};
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::{ArbiterWait, supervisor::Supervisor};

/// How a test-and-set ended.
pub(super) enum Tas {
    /// (epoch, kernel deadline)
    Won(u64, u64),
    Lost(TasOutcome),
    /// The daemon stops (or `give_up` said so) before the arbiter answered.
    Stopped,
}

impl Supervisor {
    /// `test_and_set` at `expected`, retried while the arbiter does not answer
    /// (`waiting` says what that means; status shows it) until it answers, the daemon
    /// stops, or `give_up()` is true. An attempt whose answer was lost may have
    /// committed: the arbiter then shows the next epoch as this node's, which counts as
    /// won. A deadline counts from the send instant of the attempt that won.
    pub(super) async fn test_and_set(
        &self,
        arb: &Arc<dyn Arbiter>,
        expected: u64,
        waiting: &str,
        mut give_up: impl FnMut() -> bool,
    ) -> Tas {
        let f = &self.cfg.fence;
        // The first test-and-set at `expected` this process sent, in this call or an
        // earlier one (a call given up while the arbiter was unreachable may have
        // committed: its answer was lost).
        let first = {
            let mut g = self.tas_sent.lock().unwrap();
            match *g {
                Some((e, t)) if e == expected => t,
                _ => {
                    let t = MonoInstant::now();
                    *g = Some((expected, t));
                    t
                }
            }
        };
        let since = std::time::Instant::now();
        let r = loop {
            let sent = MonoInstant::now();
            match arb.test_and_set(&f.vm, &f.node, expected).await {
                // The lease began when the arbiter handled this request: after it was
                // sent. (Counting from the first attempt, a win after retries while the
                // arbiter was unreachable arrived with its lease already over.)
                Ok(TasOutcome::Won(g)) => {
                    break Tas::Won(g.epoch, g.deadline_monotonic_ns(sent, f.drift_margin()));
                }
                Ok(TasOutcome::Stale {
                    owner: Some(o),
                    epoch,
                }) if o == f.node && epoch == expected + 1 => {
                    // This node owns the next epoch: only a test-and-set of this process
                    // at `expected` can have won it (any earlier holder of this node's
                    // name held an epoch below the one this process held or asked at).
                    // Which attempt won is unknown: its lease counts from the first (the
                    // lease keeper renews it at once if little is left).
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
                    self.roles.set_arbiter_wait(Some(ArbiterWait {
                        what: waiting.to_string(),
                        error: e.to_string(),
                        since,
                    }));
                    if self.stopping() || give_up() {
                        break Tas::Stopped;
                    }
                    tokio::time::sleep(f.renew_interval() / 4).await;
                }
            }
        };
        self.roles.set_arbiter_wait(None);
        if !matches!(r, Tas::Stopped) {
            // Answered: a later call at the same epoch is a new attempt.
            *self.tas_sent.lock().unwrap() = None;
        }
        r
    }
}

/// The lease of the current epoch (renewed by a keeper; a new epoch gets a new keeper,
/// which aborts the previous one: the old lease must not fence this node when its
/// renewals are refused).
pub(super) struct Lease {
    keeper: Option<LeaseKeeper>,
    tx: mpsc::UnboundedSender<(u64, LeaseState)>,
    pub(super) rx: mpsc::UnboundedReceiver<(u64, LeaseState)>,
}

impl Lease {
    pub(super) fn new() -> Lease {
        let (tx, rx) = mpsc::unbounded_channel();
        Lease {
            keeper: None,
            tx,
            rx,
        }
    }

    /// Renews `epoch`'s lease (installed with `deadline`) from now on. A renewal reaches
    /// the kernel at once (whatever the supervisor awaits meanwhile: a take-over's drain
    /// can take seconds), if the node is still live in `epoch`; a lost lease goes to the
    /// supervisor.
    pub(super) fn start(&mut self, sv: &Supervisor, epoch: u64, deadline: u64) {
        let Some(arb) = &sv.arb else { return };
        let f = &sv.cfg.fence;
        let tx = self.tx.clone();
        let roles = sv.roles.clone();
        self.keeper = Some(LeaseKeeper::spawn(
            arb.clone(),
            &f.vm,
            &f.node,
            epoch,
            deadline,
            f.timing(),
            move |st| {
                if let LeaseState::Valid {
                    deadline_monotonic_ns,
                    ..
                } = st
                    && let Err(e) = roles.renewed(epoch, deadline_monotonic_ns)
                {
                    warn!("lease renewed but the kernel deadline could not be extended: {e}");
                }
                let _ = tx.send((epoch, st));
            },
        ));
    }
}
