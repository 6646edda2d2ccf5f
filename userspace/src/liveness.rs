//! Peer liveness, computed in one place: whether the peer is heard on the logging link,
//! and for how long it has been silent. The role supervisor (take-over, going solo),
//! `ftd status`, the metrics and the switchover refusal all read it here, so they
//! cannot disagree.
//!
//! One timestamp, `SEQ.last_peer_ns`, stamped by XDP (`ft_log_rx`) on CLOCK_MONOTONIC,
//! so no userspace thread needs to run for a peer to count as heard:
//! - a live primary hears its backup through the backup's valid acks (kernel acks and
//!   the daemon's keep-alives alike);
//! - a backup hears its primary's *daemon*: heartbeats and VMM-stream frames, even when
//!   they do not fit its full ring (a backup whose replay is behind still hears a live
//!   primary). Input log frames do not count: the primary's XDP goes on duplicating
//!   client frames while its daemon and VM are frozen.
//!
//! A peer never heard counts as silent from when the watch began ([`Liveness::watch`]).
use std::{
    sync::atomic::{AtomicU64, Ordering::Relaxed},
    time::Duration,
};

use ft_common::maps::SeqState;

/// CLOCK_MONOTONIC now, in nanoseconds (the clock of XDP's `last_peer_ns` stamps).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists, so the
    // call only writes `ts`.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Which peer this node watches, by its current role.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Watching {
    /// A live, paired primary watches its backup's acks.
    Backup,
    /// A backup watches its primary's daemon.
    Primary,
}

/// What is known of the peer now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Peer {
    pub watching: Watching,
    /// Heard at least once since the watch began.
    pub heard: bool,
    /// Since the last sign of life (or since the watch began, if never heard).
    pub silent_for: Duration,
    /// `silent_for` is below the peer timeout.
    pub alive: bool,
}

#[derive(Debug)]
pub struct Liveness {
    timeout: Duration,
    /// When the current watch began.
    since_ns: AtomicU64,
}

impl Liveness {
    pub fn new(peer_timeout: Duration) -> Liveness {
        Liveness {
            timeout: peer_timeout,
            since_ns: AtomicU64::new(monotonic_ns()),
        }
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// A new watch begins (a new role, a new backup): signs of life from before it no
    /// longer count, and a peer not heard since is silent from now on.
    pub fn watch(&self) {
        self.since_ns.store(monotonic_ns(), Relaxed);
    }

    /// The peer as `watching` sees it, from the kernel's `SEQ.last_peer_ns`.
    pub fn peer(&self, watching: Watching, seq: &SeqState) -> Peer {
        self.judge(watching, seq.last_peer_ns, monotonic_ns())
    }

    /// The verdict for a peer last heard at `last_ns` (0: never), at `now_ns`.
    fn judge(&self, watching: Watching, last_ns: u64, now_ns: u64) -> Peer {
        let since = self.since_ns.load(Relaxed);
        let heard = last_ns > since;
        let from = if heard { last_ns } else { since };
        let silent_for = Duration::from_nanos(now_ns.saturating_sub(from));
        Peer {
            watching,
            heard,
            silent_for,
            alive: silent_for < self.timeout,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silence_counts_from_the_last_sign_of_life_or_the_watch() {
        let l = Liveness::new(Duration::from_millis(50));
        l.since_ns.store(1_000_000_000, Relaxed);
        let ms = |m: u64| m * 1_000_000;
        // Never heard: silent since the watch began.
        let p = l.judge(Watching::Backup, 0, 1_000_000_000 + ms(49));
        assert!(!p.heard && p.alive);
        let p = l.judge(Watching::Backup, 0, 1_000_000_000 + ms(50));
        assert!(!p.heard && !p.alive && p.silent_for == Duration::from_millis(50));
        // Heard after the watch began: silent since then.
        let p = l.judge(
            Watching::Primary,
            1_000_000_000 + ms(30),
            1_000_000_000 + ms(70),
        );
        assert!(p.heard && p.alive && p.silent_for == Duration::from_millis(40));
        // A sign of life from before the watch (a previous peer's) does not count.
        let p = l.judge(Watching::Backup, 999_000_000, 1_000_000_000 + ms(60));
        assert!(!p.heard && !p.alive);
    }
}
