//! The backup's side: follow the primary's epoch, take over when it falls silent.
use std::{
    sync::Arc,
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use ft_common::maps::{NodeState, ROLE_BACKUP, ROLE_SOLO};
use ft_fence::TasOutcome;
use ft_vmm::vmlog::FrameKey;
use tracing::{debug, error, info, warn};

use super::{Ctx, FOLLOW_POLL, FailoverReport, Lease, TICK, Tas, stopping, test_and_set, unix_ms};
use crate::{netif::RawSocket, vm::VmState};

pub(super) async fn backup(c: Ctx) {
    let f = &c.cfg.fence;
    let retry = f.renew_interval();
    let mut epoch = c.cfg.channel.epoch;
    if let Some(arb) = &c.arb {
        epoch = loop {
            match arb.read(&f.vm).await {
                Ok(info)
                    if info.epoch > 0 && info.owner.as_deref().is_some_and(|o| o != f.node) =>
                {
                    break info.epoch;
                }
                Ok(info) => {
                    debug!(owner = ?info.owner, "backup: waiting for a live primary at the arbiter")
                }
                Err(e) => warn!("backup: cannot read the live primary's epoch: {e}"),
            }
            if stopping(&c) {
                return;
            }
            tokio::time::sleep(FOLLOW_POLL).await;
        };
    }
    let node = NodeState {
        epoch,
        lease_deadline_ns: 0,
        role: ROLE_BACKUP,
        _pad: 0,
    };
    if let Err(e) = c
        .roles
        .set(node, &format!("following the primary of epoch {epoch}"))
    {
        error!("cannot write the epoch to the kernel: {e}");
        return;
    }
    let mut last_check = Instant::now();
    let mut tick = tokio::time::interval(TICK);
    loop {
        tick.tick().await;
        if stopping(&c) || c.status.halted.load(Ordering::Relaxed) {
            return;
        }
        if c.status.delivery_failed.load(Ordering::Relaxed) {
            c.roles.halt(
                "this backup could not hand an acked log entry on (see the log above): it \
                 confirms nothing more and can never take over; recreate it by state transfer",
            );
            return;
        }
        if let Some(arb) = &c.arb
            && last_check.elapsed() >= retry
        {
            last_check = Instant::now();
            match arb.read(&f.vm).await {
                Ok(info) if info.epoch != epoch => {
                    c.roles.halt(&format!(
                        "the live primary moved to epoch {} (owner {:?}) without this replica, which \
                         follows epoch {epoch} and is stale (recreate it by state transfer)",
                        info.epoch, info.owner
                    ));
                    return;
                }
                Ok(_) => {}
                Err(e) => warn!("backup: arbiter unreachable ({e}); still following epoch {epoch}"),
            }
        }
        let Some(vm) = c.vm.clone() else { continue };
        let primary_known = c.status.peer_session.load(Ordering::Relaxed) != 0;
        // A primary that stopped gracefully (a switchover, or ftd stopped) logged END:
        // once the replica verified it, nothing more can come, so no need to wait for
        // the silence.
        let ended = vm.live.end_verified.load(Ordering::Relaxed);
        if primary_known
            && (!c.status.peer_alive.load(Ordering::Relaxed) || ended)
            && *vm.phase.lock().unwrap() == "replaying"
        {
            take_over(c, vm, epoch).await;
            return;
        }
    }
}

/// Waits until the receive loop holds both streams up to `acked` (bounded: the ring
/// holds at most a few thousand frames); the position it reached otherwise.
async fn drained(c: &Ctx, acked: (u64, u64)) -> Result<(), (u64, u64)> {
    let held = || {
        (
            c.status.delivered.load(Ordering::Relaxed),
            c.status.vm_delivered.load(Ordering::Relaxed),
        )
    };
    let t0 = Instant::now();
    while t0.elapsed() < DRAIN_TIMEOUT {
        let h = held();
        if h.0 >= acked.0 && h.1 >= acked.1 {
            return Ok(());
        }
        if c.status.delivery_failed.load(Ordering::Relaxed) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Err(held())
}

/// How long a take-over waits for the receive loop to drain the ring XDP acked from.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Backup whose primary fell silent: stop acking, win test-and-set at the epoch it
/// followed, replay everything buffered, go live, hand the live VM the input the
/// primary's guest never consumed, announce the VM's addresses; then serve solo.
async fn take_over(c: Ctx, vm: Arc<VmState>, followed: u64) {
    // The primary stopped its VM gracefully (END verified), or fell silent.
    let ended = vm.live.end_verified.load(Ordering::Relaxed);
    let detect = if ended {
        Duration::ZERO
    } else {
        Duration::from_millis(c.cfg.channel.peer_timeout_ms)
    };
    let cause = if ended {
        "stopped its VM (its log ended, END verified)".to_string()
    } else {
        format!("was silent for {} ms", detect.as_millis())
    };
    let t0 = Instant::now();
    // First: the primary can release nothing more (it needs these acks). `acked` is the
    // last ack anybody sent, XDP included; all of it must be replayed before going live.
    let acked = crate::channel::backup::stop_confirming(&c.dp, &c.status);
    warn!("the primary {cause}: taking over");
    let f = &c.cfg.fence;
    let (epoch, deadline) = match &c.arb {
        Some(arb) => loop {
            match test_and_set(&c, arb, followed, "cannot take over yet (nobody goes live)").await {
                Tas::Won(e, deadline) => break (e, deadline),
                Tas::Lost(TasOutcome::Held {
                    lease_remaining,
                    epoch,
                    ..
                }) if epoch == followed => {
                    // Not paired (the primary could not reach the arbiter when it went
                    // live): wait for its lease to lapse. A primary still alive takes a
                    // new epoch meanwhile, and this backup then loses (Stale).
                    warn!(
                        "the silent primary was not paired with this backup: waiting {} ms for its lease",
                        lease_remaining.as_millis()
                    );
                    tokio::time::sleep(lease_remaining.min(f.renew_interval())).await;
                }
                Tas::Lost(other) => {
                    c.roles.halt(&format!(
                        "the primary fell silent but this backup lost test-and-set ({other:?})"
                    ));
                    return;
                }
                Tas::Stopped => return,
            }
        },
        None => (followed + 1, u64::MAX),
    };
    let tas = t0.elapsed();
    let reason = format!("took over: the primary of epoch {followed} {cause}");
    let node = NodeState {
        epoch,
        lease_deadline_ns: deadline,
        role: ROLE_SOLO,
        _pad: 0,
    };
    if let Err(e) = c.roles.set(node, &reason) {
        c.roles
            .halt(&format!("cannot switch the data plane to solo: {e}"));
        return;
    }
    let mut lease = Lease::new();
    lease.start(&c, epoch, deadline);
    // Replay everything buffered (the log ends where it is now), then go live. First
    // the receive loop drains what XDP acked into the ring (it is there: XDP submits a
    // record before it raises the ack), so the replica replays all it confirmed.
    let t_drain = Instant::now();
    if let Err(held) = drained(&c, acked).await {
        c.roles.halt(&format!(
            "the replica holds the log only up to {held:?} of the {acked:?} (input, VMM) \
             entries it acked: it cannot go live"
        ));
        return;
    }
    drop(vm.feed.lock().unwrap().take());
    if let Some(ctl) = vm.control.lock().unwrap().as_ref() {
        ctl.request_go_live();
    }
    let live = loop {
        if vm.live.went_live.load(Ordering::Acquire) {
            break true;
        }
        let phase = vm.phase.lock().unwrap().clone();
        if phase != "replaying" || stopping(&c) {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    };
    if !live {
        c.roles.halt(&format!(
            "the replica could not go live ({})",
            vm.error.lock().unwrap().clone().unwrap_or_default()
        ));
        return;
    }
    vm.set_phase("live");
    let drain = t_drain.elapsed();
    let t_ann = Instant::now();
    let unreferenced = deliver_unconsumed_input(&c, &vm);
    announce(&c.dp, &c.cfg);
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
    *c.roles.last_failover.lock().unwrap() = Some(report);
    vm.ran_alone.store(true, Ordering::Relaxed);
    // Repeat the announcement a few times (a lost gratuitous ARP only delays a switch).
    {
        let (dp, cfg) = (c.dp.clone(), c.cfg.clone());
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            for _ in 0..3 {
                announce(&dp, &cfg);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
    }
    // Serve alone under the lease; a backup may join by state transfer.
    super::primary::serve(c, epoch, lease).await;
}

/// Input frames the backup holds beyond the last one the replica consumed: the
/// primary's guest never saw them (never answered them), so the live VM gets them now,
/// in order, through its NIC.
fn deliver_unconsumed_input(c: &Ctx, vm: &VmState) -> u64 {
    let Some(frames) = vm.frames.lock().unwrap().clone() else {
        return 0;
    };
    let after = FrameKey {
        epoch: vm.live.last_frame_epoch.load(Ordering::Relaxed),
        seq: vm.live.last_frame_seq.load(Ordering::Relaxed),
    };
    let pending = frames.take_after(after);
    if pending.is_empty() {
        return 0;
    }
    let sock = match RawSocket::open(&c.dp.nics.vm) {
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

/// Gratuitous ARP for the VM's address from its MAC on the client NIC: switches learn
/// the VM's new port, neighbours refresh their entry.
fn announce(dp: &crate::dataplane::DataPlane, cfg: &crate::config::Config) {
    let (mac, ip) = (cfg.vm.mac.0, cfg.vm.ipv4.octets());
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
