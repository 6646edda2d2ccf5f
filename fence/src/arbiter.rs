//! The `Arbiter` trait, its result types and the lease-timing helpers.
use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::time::Duration;

use crate::error::FenceError;

/// Boxed future returned by [`Arbiter`] methods (keeps the trait object-safe so the
/// daemon can hold a `Box<dyn Arbiter>` / `Arc<dyn Arbiter>` picked from config).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A lease granted by the arbiter: this node owns the VM at `epoch` for `lease`
/// measured from some instant after the request was sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseGrant {
    /// Fencing token: strictly higher than every epoch granted before for this VM.
    pub epoch: u64,
    /// Lease length. `Duration::MAX` = static lease (backend `none`), never expires.
    pub lease: Duration,
}

impl LeaseGrant {
    /// CLOCK_MONOTONIC deadline (ns, comparable with `bpf_ktime_get_ns()`) until which
    /// this node may act as owner: `sent + lease - drift_margin`, where `sent` is the
    /// instant taken BEFORE the request was sent. The arbiter starts its own timer when
    /// it handles the request (later), so the node's view always expires first as long
    /// as the clocks' rate difference over one lease stays below `drift_margin`.
    /// Returns `u64::MAX` for a static lease and `sent` (already expired) if the margin
    /// eats the whole lease.
    pub fn deadline_monotonic_ns(&self, sent: MonoInstant, drift_margin: Duration) -> u64 {
        if self.lease == Duration::MAX {
            return u64::MAX;
        }
        let usable = self.lease.saturating_sub(drift_margin);
        let usable_ns = u64::try_from(usable.as_nanos()).unwrap_or(u64::MAX);
        sent.0.saturating_add(usable_ns).min(u64::MAX - 1)
    }
}

/// Result of [`Arbiter::test_and_set`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TasOutcome {
    /// This node is now the live owner.
    Won(LeaseGrant),
    /// Another node holds a valid lease: do not go live.
    Held {
        owner: String,
        epoch: u64,
        lease_remaining: Duration,
    },
    /// The current epoch is not the one the caller expected (someone took over in the
    /// meantime, or the caller's view is old): re-read and decide again.
    Stale { owner: Option<String>, epoch: u64 },
}

impl TasOutcome {
    pub fn won(&self) -> Option<LeaseGrant> {
        match self {
            TasOutcome::Won(g) => Some(*g),
            _ => None,
        }
    }
}

/// Result of [`Arbiter::read`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OwnerInfo {
    /// Last owner (None = never owned or released). Still reported after its lease
    /// expired; check `lease_remaining`.
    pub owner: Option<String>,
    /// Current epoch (0 = nobody ever owned this VM).
    pub epoch: u64,
    /// Zero if there is no valid lease.
    pub lease_remaining: Duration,
}

/// Split-brain arbiter: per-VM test-and-set with fencing epochs and leases.
///
/// Safety contract every backend keeps:
/// * `test_and_set` never succeeds while another node's lease is valid on the arbiter,
///   except for the follower that this owner [`paired`](Arbiter::pair) at the current
///   epoch: a paired owner cannot emit output without its follower's acks, and the
///   follower stops acking before it asks (so it need not wait for the lease to lapse);
/// * every success returns an epoch strictly higher than any epoch granted before for
///   that VM, across arbiter restarts;
/// * `renew` extends the lease only for the current owner at the current epoch;
/// * any error means "not granted / not extended".
pub trait Arbiter: Send + Sync {
    /// Become owner of `vm` with a new epoch if `expected_epoch` is the current epoch and
    /// no other node holds a valid lease (0 = "nobody ever owned it"), or that node paired
    /// this one at `expected_epoch`. A win clears the follower: the new epoch is unpaired.
    fn test_and_set<'a>(
        &'a self,
        vm: &'a str,
        node: &'a str,
        expected_epoch: u64,
    ) -> BoxFuture<'a, Result<TasOutcome, FenceError>>;

    /// The owner `node` at `epoch` names `follower` as its paired backup: the node whose
    /// acks its output needs. That follower may then take over at `epoch` without
    /// waiting for this lease to lapse. An owner that will emit without a follower's
    /// acks (solo) must first take a new epoch with `test_and_set`, which unpairs.
    /// `FenceError::Fenced` if `node` is not the owner at `epoch`.
    fn pair<'a>(
        &'a self,
        vm: &'a str,
        node: &'a str,
        epoch: u64,
        follower: &'a str,
    ) -> BoxFuture<'a, Result<(), FenceError>>;

    /// Extend the lease of `node` at `epoch`; `FenceError::Fenced` if it is no longer owner.
    fn renew<'a>(
        &'a self,
        vm: &'a str,
        node: &'a str,
        epoch: u64,
    ) -> BoxFuture<'a, Result<LeaseGrant, FenceError>>;

    /// Give up ownership voluntarily (the epoch is kept; the next owner gets epoch + 1).
    /// Idempotent; `Fenced` if someone else took over since.
    fn release<'a>(
        &'a self,
        vm: &'a str,
        node: &'a str,
        epoch: u64,
    ) -> BoxFuture<'a, Result<(), FenceError>>;

    /// Current owner, epoch and remaining lease.
    fn read<'a>(&'a self, vm: &'a str) -> BoxFuture<'a, Result<OwnerInfo, FenceError>>;

    /// Lease length this client asks for (what [`LeaseGrant::lease`] will be).
    fn lease_len(&self) -> Duration;

    /// Human-readable description (backend and addresses), for logs.
    fn describe(&self) -> String;
}

/// Result of [`try_acquire`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Acquire {
    /// This node is the live owner: write `epoch` and `deadline_monotonic_ns` to the
    /// kernel's `NodeState` (deadline last), then start a [`crate::LeaseKeeper`].
    Live {
        grant: LeaseGrant,
        deadline_monotonic_ns: u64,
    },
    /// Not live (`Held` or `Stale`); stay standby/backup and retry later.
    NotLive(TasOutcome),
}

/// The daemon's "may I go live?" step: reads the current epoch, then test-and-sets with
/// it, taking the CLOCK_MONOTONIC send instant just before the test-and-set leaves so the
/// returned deadline is `t_send + lease - drift_margin`. An error means "not live".
pub async fn try_acquire(
    arbiter: &dyn Arbiter,
    vm: &str,
    node: &str,
    drift_margin: Duration,
) -> Result<Acquire, FenceError> {
    let info = arbiter.read(vm).await?;
    if let Some(owner) = &info.owner
        && owner != node
        && info.lease_remaining > Duration::ZERO
    {
        return Ok(Acquire::NotLive(TasOutcome::Held {
            owner: owner.clone(),
            epoch: info.epoch,
            lease_remaining: info.lease_remaining,
        }));
    }
    let sent = MonoInstant::now();
    Ok(match arbiter.test_and_set(vm, node, info.epoch).await? {
        TasOutcome::Won(grant) => Acquire::Live {
            grant,
            deadline_monotonic_ns: grant.deadline_monotonic_ns(sent, drift_margin),
        },
        other => Acquire::NotLive(other),
    })
}

/// An instant of CLOCK_BOOTTIME, in nanoseconds (the clock of `bpf_ktime_get_boot_ns()`,
/// which the kernel's lease check uses). Unlike CLOCK_MONOTONIC it keeps counting while
/// the host is suspended or frozen, so a node that resumes after its lease ran out in
/// real time does not emit on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct MonoInstant(pub u64);

impl MonoInstant {
    pub fn now() -> Self {
        MonoInstant(monotonic_now_ns())
    }
}

/// CLOCK_BOOTTIME now, in nanoseconds (see [`MonoInstant`]).
pub fn monotonic_now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_BOOTTIME is always supported on
    // Linux >= 2.6.39, so clock_gettime only writes `ts` and returns 0.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_BOOTTIME) failed");
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// Longest VM or node name.
pub const MAX_NAME_LEN: usize = 128;

/// Names are `[A-Za-z0-9._:-]{1,128}` (they end up in etcd keys, state files and logs).
pub fn validate_name(what: &'static str, value: &str) -> Result<(), FenceError> {
    let why = if value.is_empty() {
        "must not be empty"
    } else if value.len() > MAX_NAME_LEN {
        "longer than 128 bytes"
    } else if !value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
    {
        "only letters, digits, '.', '_', ':' and '-' are allowed"
    } else {
        return Ok(());
    };
    Err(FenceError::InvalidName {
        what,
        value: value.chars().take(MAX_NAME_LEN + 8).collect(),
        why,
    })
}

/// A follower name is a node name, and not the owner's own.
pub(crate) fn validate_follower(owner: &str, follower: &str) -> Result<(), FenceError> {
    validate_name("follower name", follower)?;
    if follower == owner {
        return Err(FenceError::InvalidName {
            what: "follower name",
            value: follower.to_string(),
            why: "an owner cannot be its own follower",
        });
    }
    Ok(())
}

/// Backend `none`: a static, never-expiring lease held in memory. Only for single-host
/// demos: there is no second opinion, so two hosts using it can both go live.
#[derive(Debug, Default)]
pub struct StaticArbiter {
    state: Mutex<std::collections::HashMap<String, StaticVm>>,
}

#[derive(Clone, Debug, Default)]
struct StaticVm {
    owner: Option<String>,
    epoch: u64,
    follower: Option<String>,
}

impl StaticVm {
    fn fenced(&self, vm: &str, node: &str, epoch: u64) -> FenceError {
        FenceError::Fenced {
            vm: vm.to_string(),
            node: node.to_string(),
            epoch,
            current_owner: self.owner.clone(),
            current_epoch: self.epoch,
        }
    }
}

impl StaticArbiter {
    pub fn new() -> Self {
        Self::default()
    }
}

impl Arbiter for StaticArbiter {
    fn test_and_set<'a>(
        &'a self,
        vm: &'a str,
        node: &'a str,
        expected_epoch: u64,
    ) -> BoxFuture<'a, Result<TasOutcome, FenceError>> {
        Box::pin(async move {
            validate_name("vm name", vm)?;
            validate_name("node name", node)?;
            let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            let e = st.entry(vm.to_string()).or_default();
            let paired = e.follower.as_deref() == Some(node) && e.epoch == expected_epoch;
            if let Some(o) = &e.owner
                && o != node
                && !paired
            {
                return Ok(TasOutcome::Held {
                    owner: o.clone(),
                    epoch: e.epoch,
                    lease_remaining: Duration::MAX,
                });
            }
            if e.epoch != expected_epoch {
                return Ok(TasOutcome::Stale {
                    owner: e.owner.clone(),
                    epoch: e.epoch,
                });
            }
            e.owner = Some(node.to_string());
            e.epoch = e.epoch.saturating_add(1);
            e.follower = None;
            Ok(TasOutcome::Won(LeaseGrant {
                epoch: e.epoch,
                lease: Duration::MAX,
            }))
        })
    }

    fn pair<'a>(
        &'a self,
        vm: &'a str,
        node: &'a str,
        epoch: u64,
        follower: &'a str,
    ) -> BoxFuture<'a, Result<(), FenceError>> {
        Box::pin(async move {
            validate_follower(node, follower)?;
            let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            let e = st.entry(vm.to_string()).or_default();
            if e.owner.as_deref() == Some(node) && e.epoch == epoch {
                e.follower = Some(follower.to_string());
                Ok(())
            } else {
                Err(e.fenced(vm, node, epoch))
            }
        })
    }

    fn renew<'a>(
        &'a self,
        vm: &'a str,
        node: &'a str,
        epoch: u64,
    ) -> BoxFuture<'a, Result<LeaseGrant, FenceError>> {
        Box::pin(async move {
            let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            let e = st.get(vm).cloned().unwrap_or_default();
            if e.owner.as_deref() == Some(node) && e.epoch == epoch {
                Ok(LeaseGrant {
                    epoch,
                    lease: Duration::MAX,
                })
            } else {
                Err(e.fenced(vm, node, epoch))
            }
        })
    }

    fn release<'a>(
        &'a self,
        vm: &'a str,
        node: &'a str,
        epoch: u64,
    ) -> BoxFuture<'a, Result<(), FenceError>> {
        Box::pin(async move {
            let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            let e = st.entry(vm.to_string()).or_default();
            match &e.owner {
                Some(o) if o == node && e.epoch == epoch => {
                    e.owner = None;
                    e.follower = None;
                    Ok(())
                }
                None if e.epoch == epoch => Ok(()),
                _ => Err(e.fenced(vm, node, epoch)),
            }
        })
    }

    fn read<'a>(&'a self, vm: &'a str) -> BoxFuture<'a, Result<OwnerInfo, FenceError>> {
        Box::pin(async move {
            let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            let StaticVm { owner, epoch, .. } = st.get(vm).cloned().unwrap_or_default();
            let lease_remaining = if owner.is_some() {
                Duration::MAX
            } else {
                Duration::ZERO
            };
            Ok(OwnerInfo {
                owner,
                epoch,
                lease_remaining,
            })
        })
    }

    fn lease_len(&self) -> Duration {
        Duration::MAX
    }

    fn describe(&self) -> String {
        "static lease (backend \"none\", single-host demo only)".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadline_is_sent_plus_lease_minus_margin() {
        let g = LeaseGrant {
            epoch: 3,
            lease: Duration::from_millis(3000),
        };
        let sent = MonoInstant(1_000_000_000);
        assert_eq!(
            g.deadline_monotonic_ns(sent, Duration::from_millis(100)),
            1_000_000_000 + 2_900_000_000
        );
        // Margin larger than the lease: already expired, never in the future.
        assert_eq!(
            g.deadline_monotonic_ns(sent, Duration::from_secs(10)),
            1_000_000_000
        );
        let s = LeaseGrant {
            epoch: 1,
            lease: Duration::MAX,
        };
        assert_eq!(s.deadline_monotonic_ns(sent, Duration::ZERO), u64::MAX);
    }

    #[test]
    fn monotonic_clock_advances() {
        let a = monotonic_now_ns();
        let b = monotonic_now_ns();
        assert!(a > 0 && b >= a);
    }

    #[test]
    fn names() {
        assert!(validate_name("vm", "vm-1.a_b:c").is_ok());
        assert!(validate_name("vm", "").is_err());
        assert!(validate_name("vm", "a/b").is_err());
        assert!(validate_name("vm", &"x".repeat(129)).is_err());
    }

    #[tokio::test]
    async fn static_arbiter_rules() {
        let a = StaticArbiter::new();
        let g = a.test_and_set("vm", "n1", 0).await.unwrap().won().unwrap();
        assert_eq!(g.epoch, 1);
        assert!(matches!(
            a.test_and_set("vm", "n2", 1).await.unwrap(),
            TasOutcome::Held { .. }
        ));
        a.renew("vm", "n1", 1).await.unwrap();
        a.release("vm", "n1", 1).await.unwrap();
        let g2 = a.test_and_set("vm", "n2", 1).await.unwrap().won().unwrap();
        assert_eq!(g2.epoch, 2);
        assert!(a.renew("vm", "n1", 1).await.unwrap_err().is_fenced());
    }
}
