//! Counters of a running VMM that other threads read while it runs (the daemon's status
//! and metrics): plain relaxed atomics, published by the vCPU thread at every exit.
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};

#[derive(Debug, Default)]
pub struct LiveStats {
    pub exits: AtomicU64,
    pub log_entries: AtomicU64,
    pub entries_consumed: AtomicU64,
    pub checkpoints: AtomicU64,
    pub checkpoints_verified: AtomicU64,
    pub tx_frames: AtomicU64,
    pub rx_frames: AtomicU64,
    /// FNV-1a over every output frame so far (equal on primary and backup at the same
    /// exit: the backup computes the output it suppresses).
    pub tx_hash: AtomicU64,
    /// Replay: the END entry was reached and the final state verified.
    pub end_verified: AtomicBool,
    pub frame_waits: AtomicU64,
    /// Replay: the (epoch, sequence) of the last input frame the replica consumed (0, 0
    /// = none). Frames after it were never seen by the primary's guest.
    pub last_frame_epoch: AtomicU64,
    pub last_frame_seq: AtomicU64,
    /// The VMM went live (replay ended, it runs free with its NIC attached); set with
    /// Release after the NIC is attached, so a reader that sees it (Acquire) may feed
    /// the NIC.
    pub went_live: AtomicBool,
    /// Output frames computed up to go-live (replay; what the primary may have released).
    pub tx_frames_at_live: AtomicU64,
}

impl super::Vmm {
    /// Publishes the counters (called at every exit; a few relaxed stores).
    pub(super) fn publish_live(&self) {
        let Some(l) = self.live.as_ref() else {
            return;
        };
        let s = &self.stats;
        l.exits.store(self.exits, Relaxed);
        l.log_entries.store(s.log_entries, Relaxed);
        l.entries_consumed.store(s.entries_consumed, Relaxed);
        l.checkpoints.store(s.checkpoints, Relaxed);
        l.checkpoints_verified
            .store(s.checkpoints_verified, Relaxed);
        l.tx_frames.store(self.nic.tx_frames, Relaxed);
        l.rx_frames.store(self.nic.rx_frames, Relaxed);
        l.tx_hash.store(self.nic.tx_hash, Relaxed);
        l.frame_waits.store(s.frame_waits, Relaxed);
    }
}
