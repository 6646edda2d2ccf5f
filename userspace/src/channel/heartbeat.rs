//! The paired primary's heartbeats on the logging link: every `heartbeat_ms` while this
//! node is a paired primary, a HEARTBEAT frame that carries the highest input sequence
//! assigned and the highest VMM-stream sequence sent, so the backup notices a lost tail
//! frame (and nacks it) and hears that the primary's daemon is alive. Nothing is sent in
//! any other role (a solo, suspended or halted node has no backup to tell; a frozen or
//! suspended primary's silence is what lets its backup take over).
use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering::Relaxed},
    },
    time::Duration,
};

use ft_common::wire::KIND_HEARTBEAT;
use tracing::{info, warn};

use super::{
    frames::{control_frame, hdr},
    keys::ChannelKeys,
    status::ChannelStatus,
};
use crate::{
    dataplane::DataPlane,
    netif::RawSocket,
    role::{NodeRole, Roles},
};

pub struct HeartbeatParams {
    pub peer_mac: [u8; 6],
    /// The channel keys (heartbeats are tagged: a forged one is no sign of life).
    pub keys: Arc<ChannelKeys>,
    /// This run's session (the backup follows one session).
    pub session: u64,
    pub period: Duration,
}

/// Sends heartbeats while the node is a paired primary, until `stop` is set.
pub fn run(
    dp: Arc<DataPlane>,
    p: HeartbeatParams,
    roles: Arc<Roles>,
    status: Arc<ChannelStatus>,
    stop: Arc<AtomicBool>,
) {
    let iface = dp.nics.logging.clone();
    let out = match RawSocket::open(&iface) {
        Ok(s) => s,
        Err(e) => {
            warn!("heartbeats disabled: {e}");
            return;
        }
    };
    info!(iface = %iface.name, "heartbeats every {:?} while paired", p.period);
    while !stop.load(Relaxed) {
        std::thread::sleep(p.period);
        let NodeRole::Primary { epoch } = roles.current() else {
            continue;
        };
        let seq = dp.seq_state();
        let f = control_frame(
            &p.keys,
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
    }
}
