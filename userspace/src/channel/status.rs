//! Live channel status shared between the channel threads, metrics and `ftd status`.
//! (The node's role and epoch are the role supervisor's, `role::Roles`; the peer's
//! liveness is `liveness`'s.)
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};

#[derive(Default, Debug)]
pub struct ChannelStatus {
    /// Primary: this run's session. Backup: the primary session followed (0 = none yet).
    pub session: AtomicU64,
    pub peer_session: AtomicU64,
    /// Where a channel-key rotation stands (`channel::keys::Rotation::name`).
    pub key_rotation: std::sync::Mutex<&'static str>,
    /// Backup: highest entry delivered in order (= cumulative ack).
    pub delivered: AtomicU64,
    /// Backup: highest entry known to exist.
    pub high: AtomicU64,
    /// Backup: the same for the VMM stream (VMLOG frames buffered for replay / known).
    pub vm_delivered: AtomicU64,
    pub vm_high: AtomicU64,
    /// Backup: set when this replica failed (diverged, its VMM stopped, a delivery
    /// failed) or takes over: no acks, no nacks from now on. Set only through
    /// `channel::backup::stop_confirming`, which stops XDP's acks with it.
    pub stop_acking: AtomicBool,
    pub buffered: AtomicU64,
    pub acks_sent: AtomicU64,
    pub nacks_sent: AtomicU64,
    pub heartbeats_sent: AtomicU64,
    pub frames_to_vm: AtomicU64,
    pub vm_deliver_errors: AtomicU64,
    pub send_errors: AtomicU64,
    pub duplicates: AtomicU64,
    pub too_far: AtomicU64,
    /// Backup: an in-order frame could not be handed on (to the VM or the replaying
    /// VMM). XDP may have acked later frames already, so this replica confirms nothing
    /// more and must never go live.
    pub delivery_failed: AtomicBool,
    /// Times the watched peer fell silent (counted by the role supervisor; whether it is
    /// alive now is `liveness`'s).
    pub peer_down_events: AtomicU64,
    /// Primary: why the backup left the log (then this node runs solo).
    pub backup_left: std::sync::Mutex<Option<String>>,
}

impl ChannelStatus {
    pub fn inc(c: &AtomicU64) {
        c.fetch_add(1, Relaxed);
    }
}
