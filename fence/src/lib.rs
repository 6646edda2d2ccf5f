//! Split-brain arbitration for the FT pair (issue 4).
//!
//! When primary and backup lose each other, both may try to go live. Like VM-FT's
//! test-and-set on the shared disk, each node asks an **arbiter** to atomically make it
//! the owner of the VM ([`Arbiter::test_and_set`]). Exactly one succeeds and gets a
//! **fencing epoch** (strictly higher than every earlier one, never reused) plus a
//! **lease**; the other learns who holds it and stays down. The owner keeps the lease
//! with [`LeaseKeeper`]; the kernel data plane only emits client traffic while
//! `bpf_ktime_get_boot_ns() < lease_deadline_ns`.
//!
//! # Safety argument
//! * The arbiter refuses `test_and_set` while another node's lease is valid *on the
//!   arbiter's clock*, and requires the caller's expected epoch to equal the current
//!   one, so two concurrent callers with the same view cannot both win.
//! * The node's deadline is `t_send + lease - drift_margin` on CLOCK_BOOTTIME
//!   ([`LeaseGrant::deadline_monotonic_ns`]), where `t_send` is taken before the request
//!   leaves. The arbiter starts its timer when it handles the request, i.e. later, so the
//!   node's lease ends before the arbiter's as long as the clocks' rate difference over
//!   one lease stays below `drift_margin`. Hence the old owner has stopped emitting before
//!   a new owner can be granted.
//! * **Pairing.** The one exception to "never while another lease is valid": an owner
//!   that names its backup with [`Arbiter::pair`] lets that follower take over at the
//!   current epoch at once. While paired, the owner's output waits for the follower's
//!   acks (the output rule), and the follower stops acking before it asks; so the owner
//!   can emit nothing more, lease or not. An owner that would emit without acks (solo)
//!   must first take a new epoch by `test_and_set`, which unpairs: it then races the
//!   follower's take-over at the old epoch, and exactly one of them wins.
//! * A failed or late renewal never extends the deadline; an unreachable arbiter means
//!   nobody goes live (errors say so).
//! * Epochs are fencing tokens: log frames and acks carry them, so a stale primary's
//!   frames are refused by a backup that has seen a higher epoch.
//!
//! # Backends
//! * `embedded` ([`embedded`]): one `ft-arbiter` process. Durability: every state change
//!   is written to a temp file, fsynced, renamed over the state file and the directory
//!   fsynced BEFORE the reply, so a restart never forgets a winner or reuses an epoch.
//!   Lease timers are in memory (monotonic); after a restart every lease recorded as held
//!   is treated as valid for a full lease length from the restart. Renewals are not
//!   written to disk (a restart re-grants a full lease anyway). The embedded arbiter is a
//!   single point of failure for *going live* (never for safety); the redundant
//!   deployment is the `etcd` backend.
//! * `etcd` ([`etcd`]): a 3- or 5-member etcd cluster; see that module for the keys,
//!   the compare-and-swap transaction, and TLS (mutual) and etcd authentication
//!   (`fence.etcd_ca_file`, `etcd_cert_file`/`etcd_key_file`, `etcd_user`/
//!   `etcd_password_file`).
//! * `none`: a static lease for single-host demos (must be configured explicitly).
//!
//! # Embedded wire protocol
//! TCP, frames of a `u32` big-endian length (1..=4096) followed by a JSON body:
//! request `{"v":1,"id":N,"node":"a","vm":"web","op":{"test_and_set":{"expected_epoch":0,"lease_ms":3000}}}`
//! (ops `test_and_set`, `renew {epoch, lease_ms}`, `release {epoch}`,
//! `pair {epoch, follower}`, `"read"`), reply
//! `{"v":1,"id":N,"reply":{...}}`. Unknown fields/ops, wrong versions, bad names or lease
//! lengths get an `error` reply and change nothing; bad lengths (0 or > 4096) and
//! unparseable bodies get an error reply and the connection is closed; truncated frames
//! time out (5 s) and close the connection; idle connections close after 60 s.
//!
//! Replays: request ids increase per node. The arbiter keeps, per node, the last id
//! (persisted with every state change) and its reply (memory): the same id again gets
//! the cached reply without re-applying (safe client retries), an older id is refused
//! (`stale_request_id`). Independently every op is idempotent by epoch: a replayed
//! `test_and_set` finds the epoch moved and gets `stale`; `renew`/`release` only act on
//! the exact `(node, epoch)` that is current.
//!
//! # Using it from the daemon
//! Build one client per node with [`FenceConfig::build_arbiter`] and share the `Arc`
//! (the embedded client numbers its requests; two clients with the same node name work
//! but cost extra round trips). Go live with [`try_acquire`]; on `Live`, write epoch and
//! deadline to the kernel and start a [`LeaseKeeper`] whose callback writes each new
//! deadline (`Valid`) or clears it (`Lost`).
//!
//! # Operational notes
//! * Never delete the etcd prefix or the embedded state file while a node may be live:
//!   epochs would restart at 0.
//! * The node side uses CLOCK_BOOTTIME (kernel: `bpf_ktime_get_boot_ns()`), which keeps
//!   counting while a host is suspended or frozen: a node resuming after its lease ran
//!   out in real time does not emit on it. The arbiter measures leases on its own
//!   monotonic clock, which can only make it hold a lease longer (the safe side).
#![deny(unsafe_op_in_unsafe_fn)]

mod arbiter;
pub mod cli;
pub mod config;
pub mod embedded;
pub mod error;
pub mod etcd;
mod keeper;
pub mod testkit;

pub use arbiter::{
    Acquire, Arbiter, BoxFuture, LeaseGrant, MAX_NAME_LEN, MonoInstant, OwnerInfo, StaticArbiter,
    TasOutcome, monotonic_now_ns, try_acquire, validate_name,
};
pub use config::{Backend, ConfigError, EtcdAccessError, FenceConfig};
pub use embedded::{EmbeddedArbiter, ServerOptions, serve, serve_with, serve_with_metrics};
pub use error::{FenceError, ServeError};
pub use etcd::{EtcdArbiter, EtcdTls};
pub use keeper::{LeaseKeeper, LeaseState, LeaseTiming};
