//! Wire and map types shared by the eBPF programs (`ft-ebpf`), the daemon (`ftd`), the
//! VMM and the tests. Every type that crosses the kernel/user boundary or the logging link
//! is defined here exactly once, `#[repr(C)]`, with zerocopy derives so that userspace can
//! parse it without `unsafe`.
//!
//! - [`wire`]: frames on the logging link (log entries, acks, nacks, heartbeats).
//! - [`maps`]: values of the BPF maps (config, sequence state, lease, hold ring,
//!   retransmission store) and the counter/histogram indices.
//! - [`siphash`]: SipHash-2-4, the keyed MAC of the backup's frames (checked in XDP).
#![no_std]

pub mod maps;
pub mod probe;
pub mod siphash;
pub mod vmlog;
pub mod wire;

#[cfg(feature = "user")]
mod pod {
    use crate::maps::*;
    // SAFETY: every type below is #[repr(C)], has no padding (checked by zerocopy's
    // IntoBytes derive) and is valid for any bit pattern (FromBytes derive).
    unsafe impl aya::Pod for Config {}
    // SAFETY: see above.
    unsafe impl aya::Pod for SeqState {}
    // SAFETY: see above.
    unsafe impl aya::Pod for NodeState {}
    // SAFETY: see above.
    unsafe impl aya::Pod for HoldCtl {}
    // SAFETY: see above.
    unsafe impl aya::Pod for HoldSlot {}
    // SAFETY: see above.
    unsafe impl aya::Pod for RetxSlot {}
    // SAFETY: ChanState is #[repr(C)] (four u64 fields), has no padding (checked by
    // zerocopy's IntoBytes derive) and every bit pattern is a valid value (FromBytes
    // derive), so aya may copy it to and from map bytes as is.
    unsafe impl aya::Pod for ChanState {}
    // SAFETY: KernelAck is #[repr(C)] (two u64 fields), has no padding (IntoBytes derive)
    // and every bit pattern is a valid value (FromBytes derive).
    unsafe impl aya::Pod for KernelAck {}
    // SAFETY: KeyRing is #[repr(C)] of u64 fields and KeySlots (three u64 each), has no
    // padding (IntoBytes derive) and every bit pattern is a valid value (FromBytes).
    unsafe impl aya::Pod for KeyRing {}
}
