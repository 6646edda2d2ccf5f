//! Split-brain protection at run time (issue: test-and-set fencing).
//!
//! Primary: not live until it wins test-and-set at the arbiter. The grant's epoch becomes
//! the channel epoch; the lease becomes a CLOCK_MONOTONIC deadline in the `NODE` map that
//! the kernel checks on the output path. A `LeaseKeeper` renews it; a failed renewal
//! changes nothing, so the kernel deadline simply runs out. When the lease is lost the
//! node halts its output for good (fail-stop) — it must be recreated as a backup.
//!
//! Backup: learns the live primary's epoch from the arbiter (log frames and acks of any
//! other epoch are dropped in XDP), and stops if the epoch changes under it (its replica
//! would be of another primary's run).
use std::{
    sync::{Arc, atomic::Ordering::Relaxed},
    time::Duration,
};

use ft_common::maps::{NodeState, ROLE_BACKUP, ROLE_PRIMARY, ROLE_SOLO, ROLE_STANDBY};
use ft_fence::{Acquire, Arbiter, LeaseKeeper, LeaseState};
use tracing::{error, info, warn};

use crate::{
    channel::status::ChannelStatus,
    config::{Config, Role},
    dataplane::DataPlane,
};

pub async fn run(
    cfg: Config,
    dp: Arc<DataPlane>,
    status: Arc<ChannelStatus>,
    arb: Arc<dyn Arbiter>,
) {
    // Retry not-yet-live steps and re-check the arbiter at the renewal cadence.
    let retry = cfg.fence.renew_interval();
    match cfg.node.role {
        Role::Primary | Role::Solo => primary(&cfg, dp, status, arb, retry).await,
        Role::Backup => backup(&cfg, dp, status, arb, retry).await,
    }
}

async fn primary(
    cfg: &Config,
    dp: Arc<DataPlane>,
    status: Arc<ChannelStatus>,
    arb: Arc<dyn Arbiter>,
    retry: Duration,
) {
    let f = &cfg.fence;
    let (grant, deadline) = loop {
        match ft_fence::try_acquire(&*arb, &f.vm, &f.node, f.drift_margin()).await {
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
            Err(e) => warn!("not going live: {e}"),
        }
        tokio::time::sleep(retry).await;
    };
    let node = NodeState {
        epoch: grant.epoch,
        lease_deadline_ns: deadline,
        role: if cfg.node.role == Role::Solo {
            ROLE_SOLO
        } else {
            ROLE_PRIMARY
        },
        _pad: 0,
    };
    if let Err(e) = dp.set_node_state(node) {
        error!("cannot write the lease to the kernel: {e}; staying not live");
        return;
    }
    status.epoch.store(grant.epoch, Relaxed);
    info!(epoch = grant.epoch, lease = ?grant.lease, role = ?cfg.node.role, "won test-and-set: live");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let _keeper = LeaseKeeper::spawn(
        arb.clone(),
        &f.vm,
        &f.node,
        grant.epoch,
        deadline,
        f.timing(),
        move |st| {
            let _ = tx.send(st);
        },
    );
    while let Some(st) = rx.recv().await {
        match st {
            LeaseState::Valid {
                deadline_monotonic_ns,
                ..
            } => {
                if let Err(e) = dp.set_lease_deadline(deadline_monotonic_ns) {
                    warn!("lease renewed but the kernel deadline could not be extended: {e}");
                }
            }
            LeaseState::Lost { reason } => {
                error!(
                    "lease lost ({reason}): this node no longer emits client traffic and stays \
                     halted (fail-stop). Restart it as a backup once another node is live."
                );
                status.halted.store(true, Relaxed);
                let _ = dp.set_node_state(NodeState {
                    epoch: grant.epoch,
                    lease_deadline_ns: 0,
                    role: ROLE_STANDBY,
                    _pad: 0,
                });
                return;
            }
        }
    }
}

async fn backup(
    cfg: &Config,
    dp: Arc<DataPlane>,
    status: Arc<ChannelStatus>,
    arb: Arc<dyn Arbiter>,
    retry: Duration,
) {
    let f = &cfg.fence;
    let epoch = loop {
        match arb.read(&f.vm).await {
            Ok(info) if info.epoch > 0 && info.owner.as_deref().is_some_and(|o| o != f.node) => {
                break info.epoch;
            }
            Ok(info) => {
                info!(owner = ?info.owner, "backup: waiting for a live primary at the arbiter")
            }
            Err(e) => warn!("backup: cannot read the live primary's epoch: {e}"),
        }
        tokio::time::sleep(retry).await;
    };
    let node = NodeState {
        epoch,
        lease_deadline_ns: 0,
        role: ROLE_BACKUP,
        _pad: 0,
    };
    if let Err(e) = dp.set_node_state(node) {
        error!("cannot write the epoch to the kernel: {e}");
        return;
    }
    status.epoch.store(epoch, Relaxed);
    info!(epoch, "backup: following the primary of epoch {epoch}");
    loop {
        tokio::time::sleep(retry).await;
        match arb.read(&f.vm).await {
            Ok(info) if info.epoch != epoch => {
                error!(
                    old = epoch, new = info.epoch, owner = ?info.owner,
                    "the live primary changed epoch: this replica follows another run and is \
                     stale; stopping the channel (recreate this backup by state transfer)"
                );
                status.halted.store(true, Relaxed);
                status.epoch.store(0, Relaxed);
                let _ = dp.set_node_state(NodeState {
                    epoch: 0,
                    lease_deadline_ns: 0,
                    role: ROLE_STANDBY,
                    _pad: 0,
                });
                return;
            }
            Ok(_) => {}
            Err(e) => warn!("backup: arbiter unreachable ({e}); still following epoch {epoch}"),
        }
    }
}
