//! `LeaseKeeper`: renews the owner's lease in the background.
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep_until, timeout};

use crate::arbiter::{Arbiter, MonoInstant, monotonic_now_ns};

/// Renewal timing (see [`crate::FenceConfig::timing`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseTiming {
    pub renew_interval: Duration,
    pub request_timeout: Duration,
    pub drift_margin: Duration,
}

/// What the keeper reports to its callback.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeaseState {
    /// Renewed: the node may act as owner until `deadline_monotonic_ns`
    /// (CLOCK_MONOTONIC, i.e. `bpf_ktime_get_ns()`), computed from the send instant.
    Valid {
        epoch: u64,
        deadline_monotonic_ns: u64,
    },
    /// Final for this keeper: the lease is gone. `fenced`: the arbiter refused the
    /// renewal (another node owns the VM or the epoch moved on: never live again at this
    /// epoch). Otherwise the deadline passed without a successful renewal (the arbiter
    /// did not answer): nobody else may have gone live, which a test-and-set at the same
    /// epoch can prove. The keeper task has ended.
    Lost { reason: String, fenced: bool },
}

/// Background task renewing one lease. Aborted when dropped.
pub struct LeaseKeeper {
    handle: JoinHandle<()>,
}

impl LeaseKeeper {
    /// Starts renewing `(vm, node, epoch)` every `timing.renew_interval`, first renewal
    /// one interval from now. `initial_deadline_ns` is the deadline already installed
    /// (from the test-and-set grant). After every successful renewal the callback gets
    /// `Valid` with the new deadline. A failed or timed-out renewal does NOT call the
    /// callback (the installed deadline stays and lapses on its own) and is retried
    /// every quarter interval; `Lost` is reported once when the arbiter says the node is
    /// fenced or when the installed deadline passes, and the task ends.
    pub fn spawn<F>(
        arbiter: Arc<dyn Arbiter>,
        vm: impl Into<String>,
        node: impl Into<String>,
        epoch: u64,
        initial_deadline_ns: u64,
        timing: LeaseTiming,
        mut callback: F,
    ) -> LeaseKeeper
    where
        F: FnMut(LeaseState) + Send + 'static,
    {
        let (vm, node) = (vm.into(), node.into());
        let handle = tokio::spawn(async move {
            let mut deadline = initial_deadline_ns;
            let mut next_at = Instant::now() + timing.renew_interval;
            let retry = (timing.renew_interval / 4).max(Duration::from_millis(5));
            let mut last_err = String::from("no renewal attempted yet");
            loop {
                // Renew at the interval, and in any case early enough that one request
                // can complete before the deadline: a grant can arrive with little time
                // left (a test-and-set retried after its first reply was lost returns
                // the lease it had already taken), and the keeper must try to renew it
                // rather than let it lapse untried.
                let renew_by = deadline.saturating_sub(timing.request_timeout.as_nanos() as u64);
                let wake = if monotonic_now_ns() < renew_by {
                    next_at.min(instant_of(renew_by))
                } else {
                    next_at.min(instant_of(deadline))
                };
                sleep_until(wake).await;
                let sent = MonoInstant::now();
                if deadline != u64::MAX && sent.0 >= deadline {
                    callback(LeaseState::Lost {
                        reason: format!(
                            "lease for vm {vm} epoch {epoch} expired without a successful renewal (last error: {last_err})"
                        ),
                        fenced: false,
                    });
                    return;
                }
                let started = Instant::now();
                match timeout(timing.request_timeout, arbiter.renew(&vm, &node, epoch)).await {
                    Ok(Ok(grant)) => {
                        deadline = grant.deadline_monotonic_ns(sent, timing.drift_margin);
                        callback(LeaseState::Valid {
                            epoch,
                            deadline_monotonic_ns: deadline,
                        });
                        next_at = started + timing.renew_interval;
                    }
                    Ok(Err(e)) if e.is_fenced() => {
                        callback(LeaseState::Lost {
                            reason: e.to_string(),
                            fenced: true,
                        });
                        return;
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(%vm, epoch, error = %e, "lease renewal failed; retrying");
                        last_err = e.to_string();
                        next_at = Instant::now() + retry;
                    }
                    Err(_) => {
                        last_err = format!(
                            "{} did not answer within {} ms",
                            arbiter.describe(),
                            timing.request_timeout.as_millis()
                        );
                        tracing::warn!(%vm, epoch, error = %last_err, "lease renewal timed out; retrying");
                        next_at = Instant::now() + retry;
                    }
                }
            }
        });
        LeaseKeeper { handle }
    }

    /// True once the task ended (after reporting `Lost`).
    pub fn is_finished(&self) -> bool {
        self.handle.is_finished()
    }

    /// Stops renewing (the installed deadline then lapses on its own).
    pub fn stop(self) {
        self.handle.abort();
    }
}

impl Drop for LeaseKeeper {
    fn drop(&mut self) {
        self.handle.abort();
    }
}

/// Tokio instant at which CLOCK_MONOTONIC reaches `deadline_ns` (far future for MAX).
fn instant_of(deadline_ns: u64) -> Instant {
    let now = monotonic_now_ns();
    let ahead = Duration::from_nanos(deadline_ns.saturating_sub(now));
    let cap = Duration::from_secs(86_400 * 365);
    Instant::now() + ahead.min(cap)
}
