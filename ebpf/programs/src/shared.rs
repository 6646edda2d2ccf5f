//! Maps and small helpers shared by all programs.
use core::intrinsics::{AtomicOrdering::SeqCst, atomic_cxchg, atomic_xadd, atomic_xchg};

use aya_ebpf::{
    bindings::BPF_F_MMAPABLE,
    helpers::generated as h,
    macros::map,
    maps::{Array, DevMapHash, PerCpuArray, ProgramArray, RingBuf},
};
use ft_common::{maps::*, siphash::SipKey};

/// Static configuration (userspace writes once before attaching).
#[map]
pub static CONFIG: Array<Config> = Array::with_max_entries(1, 0);
/// Role, epoch and lease deadline (userspace writes; kernel reads).
#[map]
pub static NODE: Array<NodeState> = Array::with_max_entries(1, 0);
/// Sequence state: every field kernel-owned (atomics); userspace maps it read-only.
#[map]
pub static SEQ: Array<SeqState> = Array::with_max_entries(1, BPF_F_MMAPABLE);
/// Channel state: every field written by the daemon (through its mapping); read here.
#[map]
pub static CHAN: Array<ChanState> = Array::with_max_entries(1, BPF_F_MMAPABLE);
/// Hold ring control block and slots (kernel-owned). Sizes are set by the loader.
#[map]
pub static HOLD_CTL: Array<HoldCtl> = Array::with_max_entries(1, 0);
#[map]
pub static HOLD: Array<HoldSlot> = Array::with_max_entries(1024, 0);
/// Retransmission store indexed by `seq & retx_mask` (kernel-owned).
#[map]
pub static RETX: Array<RetxSlot> = Array::with_max_entries(4096, 0);
/// Per-CPU counters (indices in ft_common::maps::C_*).
#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);
/// Per-CPU hold-time histogram (log2 microsecond buckets).
#[map]
pub static HOLD_HIST: PerCpuArray<u64> = PerCpuArray::with_max_entries(HIST_ENTRIES, 0);
/// Broadcast group of the primary's duplication: the VM-side NIC (with `ft_strip`
/// unless the VM reads tagged input) and the logging NIC. Filled by userspace.
#[map]
pub static FANOUT: DevMapHash = DevMapHash::with_max_entries(4, 0);
/// Slot 0: `ft_release_more`, where a releaser that filled all its passes continues.
#[map]
pub static RELEASE_MORE: ProgramArray = ProgramArray::with_max_entries(1, 0);
/// Backup: every log frame received (LOG, VMLOG, HEARTBEAT), copied by `ft_log_rx` for
/// the daemon to drain: the log buffered for replay.
#[map]
pub static LOG_RING: RingBuf = RingBuf::with_byte_size(LOG_RING_BYTES, 0);
/// Backup: how far each stream is buffered, raised by `ft_log_rx` and by the daemon
/// (`KernelAck`).
#[map]
pub static KACK: Array<KernelAck> = Array::with_max_entries(1, BPF_F_MMAPABLE);

/// The channel keys (`KeyRing`: the daemon owns the slots, XDP `peer_newest`).
#[map]
pub static KEYS: Array<KeyRing> = Array::with_max_entries(1, BPF_F_MMAPABLE);

/// The slot of the key whose id is `id` (never the empty id 0).
#[inline(always)]
pub fn key_by_id(id: u8) -> Option<*const KeySlot> {
    let r = KEYS.get_ptr(0)?;
    if id == 0 {
        return None;
    }
    let mut i = 0;
    while i < 2 {
        // SAFETY: live map value; aligned u64 field written by the daemon (see `KeyRing`
        // for the order of its writes: an id is stored after its key words).
        let slot = unsafe { &raw const (*r).slots[i] };
        if unsafe { load64(&raw const (*slot).id) } == id as u64 {
            return Some(slot);
        }
        i += 1;
    }
    None
}

/// The SipHash key of a slot.
#[inline(always)]
pub fn slot_sip(slot: *const KeySlot) -> SipKey {
    // SAFETY: `slot` points into the live KEYS value (from `key_by_id`/`send_key`);
    // aligned u64 fields written by the daemon.
    unsafe {
        SipKey {
            k0: load64(&raw const (*slot).k0),
            k1: load64(&raw const (*slot).k1),
        }
    }
}

/// The slot of the key this node makes frames under, its id, and the newest id it
/// holds (the frames' `key_id`, `key_adv`).
#[inline(always)]
pub fn send_key() -> Option<(*const KeySlot, u8, u8)> {
    let r = KEYS.get_ptr(0)?;
    // SAFETY: live map value, aligned fields written by the daemon.
    let (send, newest) = unsafe { (load64(&raw const (*r).send), load64(&raw const (*r).newest)) };
    let slot = unsafe { &raw const (*r).slots[(send & 1) as usize] };
    // SAFETY: as above.
    let id = unsafe { load64(&raw const (*slot).id) };
    (id != 0).then_some((slot, id as u8, newest as u8))
}

/// Records the newest key id the peer holds (from a frame that verified).
#[inline(always)]
pub fn heard_key_adv(adv: u8) {
    if let Some(r) = KEYS.get_ptr_mut(0) {
        // SAFETY: live map value; XDP is this field's only writer (racing CPUs write
        // the same peer's adverts: any of them is right).
        unsafe { store64(&raw mut (*r).peer_newest, adv as u64) };
    }
}

#[inline(always)]
pub fn config() -> Option<&'static Config> {
    CONFIG.get(0)
}

#[inline(always)]
pub fn node() -> Option<&'static NodeState> {
    NODE.get(0)
}

#[inline(always)]
pub fn seq_state() -> Option<*mut SeqState> {
    SEQ.get_ptr_mut(0)
}

#[inline(always)]
pub fn kack() -> Option<*mut KernelAck> {
    KACK.get_ptr_mut(0)
}

/// The daemon's channel state (read only here: the daemon owns every field).
#[inline(always)]
pub fn chan() -> Option<*const ChanState> {
    CHAN.get_ptr(0)
}

#[inline(always)]
pub fn count(idx: u32) {
    count_n(idx, 1);
}

#[inline(always)]
pub fn count_n(idx: u32, n: u64) {
    if let Some(p) = COUNTERS.get_ptr_mut(idx) {
        // SAFETY: per-CPU slot: no other writer while this program runs on this CPU.
        unsafe { *p += n };
    }
}

/// True for the 1st, 2nd, 4th, 8th, ... event of a kind on this CPU: rare events are
/// logged, floods of them only logarithmically (the counter says how many).
#[inline(always)]
pub fn rare(idx: u32) -> bool {
    match COUNTERS.get(idx) {
        Some(v) => {
            let n = *v + 1;
            n & (n - 1) == 0
        }
        None => false,
    }
}

/// The node may emit client traffic: the lease deadline is in the future. The deadline
/// is on CLOCK_BOOTTIME, which keeps counting while the host is suspended or frozen.
#[inline(always)]
pub fn lease_valid(node: &NodeState) -> bool {
    // SAFETY: plain helper call.
    let now = unsafe { h::bpf_ktime_get_boot_ns() };
    // SAFETY: aligned field of a live map value; read once.
    let deadline = unsafe { core::ptr::read_volatile(&node.lease_deadline_ns) };
    now < deadline
}

/// Reads a big-endian u16 at `addr` (caller checked bounds).
#[inline(always)]
pub fn read_be16(addr: usize) -> u16 {
    // SAFETY: the caller checked that 2 bytes at `addr` are inside the packet.
    unsafe { u16::from_be_bytes([*(addr as *const u8), *((addr + 1) as *const u8)]) }
}

/// Compares 6 bytes of packet data at `addr` (caller checked bounds) with `mac`.
#[inline(always)]
pub fn mac_eq(addr: usize, mac: &[u8; 6]) -> bool {
    let p = addr as *const u8;
    // SAFETY: the caller checked that 6 bytes at `addr` are inside the packet.
    unsafe {
        *p == mac[0]
            && *p.add(1) == mac[1]
            && *p.add(2) == mac[2]
            && *p.add(3) == mac[3]
            && *p.add(4) == mac[4]
            && *p.add(5) == mac[5]
    }
}

#[inline(always)]
pub fn mac6_eq(a: &[u8; 6], b: &[u8; 6]) -> bool {
    a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3] && a[4] == b[4] && a[5] == b[5]
}

/// # Safety
/// `p` points to an 8-byte aligned u64 inside a live map value.
#[inline(always)]
pub unsafe fn load64(p: *const u64) -> u64 {
    // SAFETY: guaranteed by the caller.
    unsafe { core::ptr::read_volatile(p) }
}

/// # Safety
/// As [`load64`].
#[inline(always)]
pub unsafe fn store64(p: *mut u64, v: u64) {
    // SAFETY: guaranteed by the caller.
    unsafe { core::ptr::write_volatile(p, v) }
}

/// Atomic exchange (full barrier): used to publish.
/// # Safety
/// As [`load64`].
#[inline(always)]
pub unsafe fn xchg64(p: *mut u64, v: u64) -> u64 {
    // SAFETY: guaranteed by the caller; the intrinsic is the BPF atomic xchg.
    unsafe { atomic_xchg::<u64, { SeqCst }>(p, v) }
}

/// # Safety
/// As [`load64`].
#[inline(always)]
pub unsafe fn fetch_add64(p: *mut u64, v: u64) -> u64 {
    // SAFETY: guaranteed by the caller.
    unsafe { atomic_xadd::<u64, u64, { SeqCst }>(p, v) }
}

/// Returns the previous value (== `old` on success).
/// # Safety
/// As [`load64`].
#[inline(always)]
pub unsafe fn cmpxchg64(p: *mut u64, old: u64, new: u64) -> u64 {
    // SAFETY: guaranteed by the caller.
    unsafe { atomic_cxchg::<u64, { SeqCst }, { SeqCst }>(p, old, new).0 }
}

/// # Safety
/// `p` points to a 4-byte aligned u32 inside a live map value.
#[inline(always)]
pub unsafe fn cmpxchg32(p: *mut u32, old: u32, new: u32) -> u32 {
    // SAFETY: guaranteed by the caller.
    unsafe { atomic_cxchg::<u32, { SeqCst }, { SeqCst }>(p, old, new).0 }
}

/// # Safety
/// As [`cmpxchg32`].
#[inline(always)]
pub unsafe fn xchg32(p: *mut u32, v: u32) -> u32 {
    // SAFETY: guaranteed by the caller.
    unsafe { atomic_xchg::<u32, { SeqCst }>(p, v) }
}
