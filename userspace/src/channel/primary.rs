//! Primary: heartbeats on the logging channel (they carry the highest sequence assigned,
//! so the backup notices a lost tail frame and nacks it), and backup-liveness tracking
//! from the time of the last valid ack (stamped by XDP).
use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering::Relaxed},
    },
    time::Duration,
};

use ft_common::{maps::ROLE_PRIMARY, wire::KIND_HEARTBEAT};
use tracing::{info, warn};

use super::{
    auth::ChannelKey,
    frames::{control_frame, hdr},
    status::ChannelStatus,
};
use crate::{dataplane::DataPlane, netif::RawSocket};

pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid timespec pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

pub struct PrimaryParams {
    pub peer_mac: [u8; 6],
    /// The channel key (heartbeats are not tagged; kept for the frame builder).
    pub key: ChannelKey,
    pub session: u64,
    pub heartbeat: Duration,
    pub peer_timeout: Duration,
}

/// Runs until `stop` is set.
pub fn run(
    dp: Arc<DataPlane>,
    p: PrimaryParams,
    status: Arc<ChannelStatus>,
    stop: Arc<AtomicBool>,
) {
    let iface = dp.nics.logging.clone();
    let out = match RawSocket::open(&iface) {
        Ok(s) => s,
        Err(e) => {
            warn!("primary heartbeats disabled: {e}");
            return;
        }
    };
    info!(iface = %iface.name, "primary: heartbeats every {:?}", p.heartbeat);
    let started = monotonic_ns();
    while !stop.load(Relaxed) {
        std::thread::sleep(p.heartbeat);
        let epoch = status.epoch.load(Relaxed);
        let seq = dp.seq_state();
        if epoch == 0 {
            continue; // not live yet
        }
        // Only a live, paired primary announces its log (not once solo or halted).
        if dp.node_state().map_or(true, |n| n.role != ROLE_PRIMARY) {
            continue;
        }
        let f = control_frame(
            &p.key,
            iface.mac,
            p.peer_mac,
            hdr(
                KIND_HEARTBEAT,
                p.session,
                epoch,
                seq.last_seq,
                dp.chan_state().vm_last,
            ),
        );
        match out.send(&f) {
            Ok(()) => ChannelStatus::inc(&status.heartbeats_sent),
            Err(_) => ChannelStatus::inc(&status.send_errors),
        }
        let last = if seq.last_peer_ns == 0 {
            started
        } else {
            seq.last_peer_ns
        };
        let alive = monotonic_ns().saturating_sub(last) < p.peer_timeout.as_nanos() as u64;
        if status.peer_alive.swap(alive, Relaxed) && !alive {
            ChannelStatus::inc(&status.peer_down_events);
            warn!(
                "backup silent on the logging channel (no ack for {:?}): reported down; \
                   output stays held",
                p.peer_timeout
            );
        }
    }
}
