//! Values and indices of the BPF maps. Who writes what is documented in ARCHITECTURE.md
//! ("Maps and their owners"); in short: userspace writes `CONFIG` once at start, `NODE`
//! on role/epoch/lease changes and every field of `CHAN`; the kernel programs own every
//! field of `SEQ`, and `HOLD_CTL`, `HOLD` and `RETX`; `COUNTERS`/`HOLD_HIST` are written
//! by the kernel and read by userspace; `LOG_RING` is written by XDP and drained by the
//! daemon. Only `KACK` has two writers, and both only raise its fields atomically (see
//! [`KernelAck`]).
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::wire::SLOT_DATA;

// ---- roles (NodeState.role) ----
/// Attached but not serving: client frames for the VM dropped, VM output dropped.
pub const ROLE_STANDBY: u32 = 0;
/// Live, replicating: inbound frames duplicated to the backup, output held until acked.
pub const ROLE_PRIMARY: u32 = 1;
/// Not live: consumes the log, VM output suppressed, never emits on the client NIC.
pub const ROLE_BACKUP: u32 = 2;
/// Live without a backup: inbound frames go to the VM only, output released at once
/// (still in order behind anything held, still only under a valid lease).
pub const ROLE_SOLO: u32 = 3;

pub fn role_name(role: u32) -> &'static str {
    match role {
        ROLE_STANDBY => "standby",
        ROLE_PRIMARY => "primary",
        ROLE_BACKUP => "backup",
        ROLE_SOLO => "solo",
        _ => "invalid",
    }
}

// ---- Config.flags ----
/// Hold VM output until the backup acked its dependencies (the output rule). Cleared
/// only by the benchmark's "gate disabled" baseline.
pub const CFG_HOLD_OUTPUT: u32 = 1;
/// Deliver inbound frames to the VM side with the log header kept (a VMM reads the
/// sequence number); otherwise the header is stripped (plain stand-in VM).
pub const CFG_VM_TAGGED_INPUT: u32 = 2;
/// Backup: XDP acks in-order log frames itself (`XDP_TX`). Off in generic (skb) XDP mode:
/// there the ack reuses the received skb, whose checksum metadata (a client frame's
/// `CHECKSUM_PARTIAL` offsets, on veth) would travel on to the primary and break the
/// ack as the carrier of released output. Then the daemon acks everything.
pub const CFG_KERNEL_ACKS: u32 = 4;

/// Static configuration, written once by the daemon before attaching (map `CONFIG`, 1 entry).
/// (`Debug` leaves out the tag key.)
#[repr(C)]
#[derive(Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct Config {
    /// `RETX` entries - 1 (entries is a power of two).
    pub retx_mask: u64,
    /// `HOLD` entries - 1 (entries is a power of two).
    pub hold_mask: u64,
    /// Most log entries allowed in flight (assigned, not yet acked). Less than the
    /// `RETX` entries by a margin that covers concurrent CPUs, so an unacked entry is
    /// never overwritten.
    pub window: u64,
    pub flags: u32,
    pub client_ifindex: u32,
    pub log_ifindex: u32,
    pub vm_ifindex: u32,
    /// The protected VM's IPv4 address (network order), for ARP requests.
    pub vm_ipv4: [u8; 4],
    pub vm_mac: [u8; 6],
    pub own_log_mac: [u8; 6],
    pub peer_log_mac: [u8; 6],
    pub _pad: [u8; 2],
    /// This daemon run's session number (random, non-zero): carried by every frame this
    /// node sends as primary; acks of another session are dropped.
    pub session: u64,
    /// Backup: least time between two acks XDP sends for one stream (ns). A frame that
    /// arrives sooner is acked in `KACK` but not sent: the daemon's next ack (one per
    /// wake-up) carries it, or XDP's next ack after the interval. Bounds the ack rate
    /// under load (batching) while an isolated frame is acked at once.
    pub kack_interval_ns: u64,
}

impl core::fmt::Debug for Config {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Config")
            .field("retx_mask", &self.retx_mask)
            .field("hold_mask", &self.hold_mask)
            .field("window", &self.window)
            .field("flags", &self.flags)
            .field("client_ifindex", &self.client_ifindex)
            .field("log_ifindex", &self.log_ifindex)
            .field("vm_ifindex", &self.vm_ifindex)
            .field("vm_ipv4", &self.vm_ipv4)
            .field("vm_mac", &self.vm_mac)
            .field("own_log_mac", &self.own_log_mac)
            .field("peer_log_mac", &self.peer_log_mac)
            .field("session", &self.session)
            .field("kack_interval_ns", &self.kack_interval_ns)
            .finish_non_exhaustive()
    }
}

/// One channel key (map `KEYS`, in a [`KeyRing`]). `id` 0: the slot is empty.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct KeySlot {
    /// The SipHash key (`k0`, `k1`): tags, and the MAC's last step.
    pub k0: u64,
    pub k1: u64,
    /// `ft_common::wire::key_id` of the key; 0 = empty.
    pub id: u64,
    /// The NH key of the log frames' MAC (`wire::MacKey::derive`).
    pub nh: [u64; crate::wire::NH_KEY_WORDS],
}

impl Default for KeySlot {
    fn default() -> Self {
        zerocopy::FromZeros::new_zeroed()
    }
}

impl core::fmt::Debug for KeySlot {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("KeySlot")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl KeySlot {
    /// The slot of key `k` with id `id`.
    pub fn new(k: &crate::wire::MacKey, id: u8) -> KeySlot {
        KeySlot {
            k0: k.sip.k0,
            k1: k.sip.k1,
            id: id as u64,
            nh: k.nh,
        }
    }
}

/// The channel keys the logging link's tags and MACs are under (map `KEYS`, 1 entry,
/// mmapable): at most two, so that a key rotation needs no downtime (see
/// `userspace/src/channel/keys.rs`).
/// - The daemon owns `slots`, `send` and `newest`. It fills an empty slot (key words
///   first, `id` last) and empties one (`id` first) only while no frame names it: a
///   slot is emptied once both hosts send under the newer key, and filled before its id
///   is used or advertised. A program that reads a slot the daemon is changing at that
///   moment drops one frame as `bad_mac` (it is repaired), never accepts a wrong one.
/// - `ft_log_rx` (XDP) owns `peer_newest`: the `key_adv` of the peer's last frame whose
///   tag or MAC verified.
///
/// Programs check a received frame with the slot whose `id` is the frame's `key_id`, and
/// make frames (LOG duplicates, kernel acks) under slot `send`, advertising `newest`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct KeyRing {
    pub slots: [KeySlot; 2],
    /// Index of the slot this node's frames are made under.
    pub send: u64,
    /// The id of the newest key this node holds (its frames' `key_adv`).
    pub newest: u64,
    /// The newest key id the peer says it holds (written by XDP).
    pub peer_newest: u64,
}

impl Default for KeyRing {
    fn default() -> Self {
        zerocopy::FromZeros::new_zeroed()
    }
}

impl KeyRing {
    /// One key (`id` its `wire::key_id`), sent under and advertised.
    pub fn single(k: &crate::wire::MacKey, id: u8) -> KeyRing {
        KeyRing {
            slots: [KeySlot::new(k, id), KeySlot::default()],
            send: 0,
            newest: id as u64,
            peer_newest: 0,
        }
    }
}

/// Dynamic node state (map `NODE`, 1 entry), written by the daemon only. Changed in an
/// order that keeps every intermediate state safe: the deadline is cleared before the
/// epoch or role changes, and set last.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct NodeState {
    /// Fencing epoch (token from the arbiter). Log frames and acks carry it.
    pub epoch: u64,
    /// `bpf_ktime_get_boot_ns()` (CLOCK_BOOTTIME) until which this node may emit client
    /// traffic. 0 = no lease. `u64::MAX` = static lease (no arbiter configured).
    pub lease_deadline_ns: u64,
    pub role: u32,
    pub _pad: u32,
}

/// Name used in map definitions (both sides).
pub type Lease = NodeState;

/// Sequence state (map `SEQ`, 1 entry, mmapable): every field is written by the kernel
/// programs only (with atomics); userspace reads it through a read-only mapping.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct SeqState {
    /// Primary: highest input sequence assigned to an inbound frame (0 = none yet).
    pub last_seq: u64,
    /// Primary: highest cumulative input-stream ack received from the backup.
    pub acked: u64,
    /// Primary: highest cumulative VMM-stream ack received from the backup.
    pub vm_acked: u64,
    /// `bpf_ktime_get_ns()` when the peer was last heard: the last valid ack (primary),
    /// the last heartbeat or VMM-stream frame from the primary's daemon, whether or not
    /// it fit the ring (backup). Input log frames do not count. Read by the daemon's
    /// `liveness`.
    pub last_peer_ns: u64,
}

/// Channel state written by the daemon (map `CHAN`, 1 entry, mmapable): every field is
/// written by userspace only (atomic stores into the mapping), the kernel only reads.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct ChanState {
    /// Backup: highest contiguous input sequence the daemon has stored (XDP drops
    /// duplicates at or below it early).
    pub delivered: u64,
    /// Primary: highest VMLOG sequence handed to the logging link. Stored before the
    /// VMM's output frames that depend on those entries reach the VM NIC, so the output
    /// rule (`HoldSlot::dep_vm`) covers them.
    pub vm_last: u64,
    /// Backup: the primary's session it follows (0 = not known yet: accept any).
    pub peer_session: u64,
    pub _pad: u64,
}

/// Backup: the cumulative acks of both streams as far as the log is buffered for replay
/// (map `KACK`, 1 entry, mmapable). The one map value with two writers, both only ever
/// raising a field with an atomic read-modify-write on the same word:
/// - `ft_log_rx` (XDP) raises a field from `s - 1` to `s` (compare-and-swap) after it
///   copied frame `s` into `LOG_RING`, and then sends the ack itself: the in-order fast
///   path, with no userspace on it;
/// - the daemon raises it to what it holds in order (atomic max), after it repaired a
///   gap, and sets [`KACK_STOP`] in both fields (atomic or) when this replica must
///   confirm nothing more (take-over, failure): the value it gets back is the last ack
///   anybody sent, and every frame up to it is in `LOG_RING` or already in the daemon,
///   because XDP submits a frame's record before its compare-and-swap.
///
/// A field starts as `KACK_STOP` (nothing acked by the kernel) until the daemon knows
/// where the stream starts and stores its position.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct KernelAck {
    /// Every input frame up to it is buffered for replay.
    pub input: u64,
    /// Every VMLOG frame up to it is buffered for replay.
    pub vm: u64,
    /// `bpf_ktime_get_ns()` of XDP's last ack sent for an input frame (written by XDP
    /// only).
    pub input_tx_ns: u64,
    /// The same for a VMLOG frame.
    pub vm_tx_ns: u64,
}

/// Set in a [`KernelAck`] sequence field: XDP acks nothing more of that stream.
pub const KACK_STOP: u64 = 1 << 63;

/// Bytes of `LOG_RING`, the backup's BPF ring buffer of received log frames (power of
/// two, a multiple of the page size). Holds what the daemon has not drained yet: at
/// least 5,000 full-size frames.
pub const LOG_RING_BYTES: u32 = 8 << 20;
/// Frame bytes of a small `LOG_RING` record: heartbeats, acks-sized frames and log
/// frames of client frames up to 194 bytes.
pub const LOG_REC_SMALL: usize = 248;
/// Frame bytes of a large record: any valid log frame (`LOG_OVERHEAD + MAX_FRAME`).
pub const LOG_REC_LARGE: usize = 1576;

/// A `LOG_RING` record: the log frame exactly as received (`len` bytes of `frame`).
/// XDP reserves the smallest size that fits; the daemon reads `len` and the frame.
#[repr(C)]
#[derive(Clone, Copy, FromBytes, Immutable, KnownLayout)]
pub struct LogRec<const N: usize> {
    pub len: u32,
    pub _pad: u32,
    pub frame: [u8; N],
}

/// Bytes of a `LogRec` before the frame.
pub const LOG_REC_HDR: usize = 8;

/// Control block of the hold ring (map `HOLD_CTL`, 1 entry).
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct HoldCtl {
    /// Next ring index to release (only advanced by the lock holder).
    pub head: u64,
    /// Next ring index to reserve (advanced by producers with compare-and-swap).
    pub tail: u64,
    /// Release try-lock: 0 free, 1 held.
    pub lock: u32,
    /// Set by a releaser that found the lock busy; the holder re-checks before leaving.
    pub kick: u32,
}

/// One held output frame (map `HOLD`, `hold_mask + 1` entries).
#[repr(C)]
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct HoldSlot {
    /// Ring index + 1 once the frame is completely written (publish flag).
    pub ready: u64,
    /// Input sequence this frame depends on: released once `SeqState.acked >= dep`.
    pub dep: u64,
    /// VMM-stream sequence it depends on: and once `SeqState.vm_acked >= dep_vm`.
    pub dep_vm: u64,
    /// `bpf_ktime_get_ns()` when the frame was held.
    pub enq_ns: u64,
    pub len: u32,
    pub _pad: u32,
    pub data: [u8; SLOT_DATA],
}

/// One log entry kept for retransmission (map `RETX`, `retx_mask + 1` entries).
#[repr(C)]
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct RetxSlot {
    pub seq: u64,
    pub len: u32,
    /// `key_id | key_adv << 8` of the header the entry was first sent with (its MAC
    /// covers them): a repair sends them again.
    pub key_ids: u32,
    /// The entry's MAC as first sent (`wire::payload_mac`): a repair sends it again.
    pub tag: u64,
    pub data: [u8; SLOT_DATA],
}

/// Held frames one release pass emits and passes per program run (the verifier needs
/// these loops small enough to unroll). When the last pass was full the releaser
/// continues in `ft_release_more` by tail call (up to the kernel's 33 tail calls), so
/// one trigger (an ack, a new output frame) can release [`HOLD_RELEASE_MAX`] frames; the
/// hold ring may not be larger, so a frame whose ack has arrived never waits for a
/// later trigger.
pub const HOLD_RELEASE_BURST: u32 = 64;
pub const HOLD_RELEASE_ROUNDS: u32 = 3;
pub const HOLD_RELEASE_MAX: u32 = HOLD_RELEASE_BURST * HOLD_RELEASE_ROUNDS * 33;

/// Entries kept free in `RETX` beyond `Config.window` (covers CPUs racing between the
/// window check and the sequence increment).
pub const RETX_MARGIN: u64 = 512;

// ---- hold-time histogram (map `HOLD_HIST`, per-CPU array) ----
/// Bucket `i` counts hold times in `[2^(i-1), 2^i)` microseconds; bucket 0 is `< 1 us`;
/// the last bucket is open-ended.
pub const HIST_BUCKETS: u32 = 28;
/// The entry of `HOLD_HIST` after the buckets: the sum of the hold times counted, in
/// nanoseconds (the histogram's `_sum`; per CPU like the buckets, summed by the reader).
pub const HIST_SUM_SLOT: u32 = HIST_BUCKETS;
/// Entries of `HOLD_HIST`: the buckets and the sum.
pub const HIST_ENTRIES: u32 = HIST_BUCKETS + 1;

/// Upper bound (exclusive), in microseconds, of histogram bucket `i` (None for the last).
pub fn hist_upper_us(i: u32) -> Option<u64> {
    if i + 1 >= HIST_BUCKETS {
        None
    } else {
        Some(1u64 << i)
    }
}

// ---- counters (map `COUNTERS`, per-CPU array) ----
macro_rules! counters {
    ($($(#[$doc:meta])* $name:ident = $idx:expr, $metric:expr, $label:expr;)*) => {
        $( $(#[$doc])* pub const $name: u32 = $idx; )*
        /// `(index, metric family, reason label or "")` for every counter.
        pub const COUNTER_INFO: &[(u32, &str, &str)] = &[ $( ($idx, $metric, $label), )* ];
    };
}

counters! {
    /// Client frames addressed to the VM seen on the client NIC.
    C_CLIENT_RX_VM = 0, "ft_client_rx_vm_frames_total", "";
    /// Log frames made by duplication (primary).
    C_DUP_FRAMES = 1, "ft_log_duplicated_frames_total", "";
    C_DUP_BYTES = 2, "ft_log_duplicated_bytes_total", "";
    /// Frames delivered to the VM without a log (solo).
    C_SOLO_DELIVERED = 3, "ft_solo_delivered_frames_total", "";
    /// Valid log frames handed to the backup daemon.
    C_LOG_RX = 4, "ft_log_received_frames_total", "";
    C_LOG_RX_RETRANSMIT = 5, "ft_log_received_retransmits_total", "";
    C_HEARTBEAT_RX = 6, "ft_heartbeats_received_total", "";
    C_ACK_RX = 7, "ft_acks_received_total", "";
    C_NACK_RX = 8, "ft_nacks_received_total", "";
    C_RETX_SENT = 9, "ft_log_retransmitted_frames_total", "";
    C_HOLD_ENQ = 10, "ft_output_held_frames_total", "";
    C_HOLD_RELEASED = 11, "ft_output_released_frames_total", "";
    /// Acks that did not advance the cumulative ack (reordered or repeated; harmless).
    C_ACK_STALE = 12, "ft_acks_stale_total", "";
    /// Release attempts that found another CPU releasing.
    C_RELEASE_BUSY = 13, "ft_release_lock_busy_total", "";
    C_DROP_WINDOW_FULL = 20, "ft_drops_total", "log_window_full";
    C_DROP_CLIENT_FT = 21, "ft_drops_total", "ft_frame_on_client_nic";
    C_DROP_BACKUP_CLIENT_IN = 22, "ft_drops_total", "client_frame_on_backup";
    C_DROP_OVERSIZE = 23, "ft_drops_total", "oversize";
    C_DROP_DUP = 24, "ft_drops_total", "duplicate_log";
    C_DROP_SEQ_WINDOW = 25, "ft_drops_total", "log_seq_out_of_window";
    /// Backup: `LOG_RING` full (the daemon is not draining it): the frame is not
    /// buffered, not acked, and asked for again once the daemon notices the gap.
    C_DROP_LOG_RING_FULL = 26, "ft_drops_total", "log_ring_full";
    C_DROP_RETX_MISS = 27, "ft_drops_total", "nack_not_in_store";
    C_DROP_MALFORMED = 28, "ft_drops_total", "malformed";
    C_DROP_BAD_PEER = 29, "ft_drops_total", "wrong_peer_mac";
    C_DROP_BAD_EPOCH = 30, "ft_drops_total", "wrong_epoch";
    C_DROP_ACK_BEYOND = 31, "ft_drops_total", "ack_beyond_sent";
    C_DROP_NACK_INVALID = 32, "ft_drops_total", "nack_invalid";
    C_DROP_UNEXPECTED_KIND = 33, "ft_drops_total", "unexpected_kind";
    C_DROP_NOT_REPLICATING = 34, "ft_drops_total", "not_replicating";
    C_DROP_HOLD_FULL = 35, "ft_drops_total", "hold_full";
    C_DROP_HOLD_CONTENTION = 36, "ft_drops_total", "hold_contention";
    C_VM_OUT_SUPPRESSED = 37, "ft_drops_total", "vm_output_suppressed";
    C_FENCED_HOLD = 38, "ft_release_blocked_no_lease_total", "";
    C_DROP_FENCED_EGRESS = 39, "ft_drops_total", "fenced_egress";
    C_RELEASE_ERR = 40, "ft_drops_total", "release_error";
    C_DROP_STANDBY = 41, "ft_drops_total", "standby";
    C_DROP_RETX_ERR = 42, "ft_drops_total", "retransmit_error";
    C_DROP_BAD_SESSION = 43, "ft_drops_total", "wrong_session";
    /// A frame from the backup (ack, nack, VMNACK, LEAVE) without the right tag: forged,
    /// or the peer has another `channel.key_file`.
    C_DROP_BAD_MAC = 44, "ft_drops_total", "bad_mac";
    /// VMLOG frames handed to the backup daemon.
    C_VMLOG_RX = 14, "ft_vmlog_received_frames_total", "";
    /// VMNACK and LEAVE frames passed to the primary daemon.
    C_VMNACK_RX = 15, "ft_vmnacks_received_total", "";
    C_LEAVE_RX = 16, "ft_leave_received_total", "";
    /// Release passes the daemon triggered with a kick frame on the VM NIC (role change).
    C_RELEASE_KICK = 17, "ft_release_kicks_total", "";
    /// Backup: acks XDP sent itself (`XDP_TX`), an in-order frame buffered in `LOG_RING`.
    C_KACK_SENT = 18, "ft_kernel_acks_sent_total", "";
    /// Backup: in-order frames XDP acked in `KACK` but did not send an ack for (another
    /// was sent less than `kack_interval_ns` ago); the daemon's next ack carries them.
    C_KACK_DEFERRED = 19, "ft_kernel_acks_deferred_total", "";
}

/// Entries of the `COUNTERS` map.
pub const COUNTER_SLOTS: u32 = 48;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_indices_unique_and_in_range() {
        for (i, (a, _, _)) in COUNTER_INFO.iter().enumerate() {
            assert!(*a < COUNTER_SLOTS);
            for (b, _, _) in &COUNTER_INFO[i + 1..] {
                assert_ne!(a, b, "duplicate counter index");
            }
        }
    }

    #[test]
    fn layouts_have_expected_sizes() {
        assert_eq!(core::mem::size_of::<Config>(), 80);
        assert_eq!(
            core::mem::size_of::<KeyRing>(),
            2 * (24 + 8 * crate::wire::NH_KEY_WORDS) + 24
        );
        assert_eq!(core::mem::size_of::<SeqState>(), 32);
        assert_eq!(core::mem::size_of::<ChanState>(), 32);
        assert_eq!(core::mem::size_of::<KernelAck>(), 32);
        assert_eq!(
            core::mem::size_of::<LogRec<LOG_REC_SMALL>>(),
            LOG_REC_HDR + LOG_REC_SMALL
        );
        const { assert!(LOG_REC_LARGE >= crate::wire::LOG_OVERHEAD + crate::wire::MAX_FRAME) };
        const { assert!(LOG_REC_SMALL.is_multiple_of(8) && LOG_REC_LARGE.is_multiple_of(8)) };
        assert_eq!(core::mem::size_of::<NodeState>(), 24);
        assert_eq!(core::mem::size_of::<HoldSlot>(), 40 + SLOT_DATA);
        assert_eq!(core::mem::size_of::<RetxSlot>(), 24 + SLOT_DATA);
    }

    #[test]
    fn histogram_bounds() {
        assert_eq!(hist_upper_us(0), Some(1));
        assert_eq!(hist_upper_us(10), Some(1024));
        assert_eq!(hist_upper_us(HIST_BUCKETS - 1), None);
    }
}
