//! Wire and map types of the benchmark-only probe programs (`ft-ebpf`'s `probe.rs`).
//!
//! The probes measure the logging link's kernel-to-kernel round trip (perf/dataplane's
//! "link floor"): host A's userspace sends a [`ProbeFrame`] out of its logging NIC; tc
//! egress on that NIC (`ft_probe_stamp`) writes `t_depart` = `bpf_ktime_get_ns()` as
//! the frame leaves; host B's XDP (`ft_probe_reflect`) swaps the MAC addresses, sets
//! [`PROBE_REFLECTED`] and sends it back with `XDP_TX`; host A's XDP (`ft_probe_rx`)
//! writes `rtt_ns` = now − `t_depart`, sets [`PROBE_MEASURED`] and passes the frame up to
//! the sender's packet socket. Both timestamps come from A's clock, so the result is the
//! kernel-to-kernel round trip: no userspace wake-up or syscall is inside it.
//!
//! Multi-byte fields are big-endian and unaligned, like the logging link's own frames.
use zerocopy::byteorder::network_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// EtherType of probe frames (IEEE 802 local experimental EtherType 2). `ft_log_rx`
/// passes every frame that is not [`crate::wire::ETHERTYPE_FT`], so probes never touch
/// the appliance's state.
pub const ETHERTYPE_PROBE: u16 = 0x88B6;
/// `ProbeFrame.magic`: "FTPB".
pub const PROBE_MAGIC: u32 = 0x4654_5042;

/// `ProbeFrame.flags`: tc egress on A stamped `t_depart`.
pub const PROBE_STAMPED: u32 = 1;
/// `ProbeFrame.flags`: B's XDP reflected the frame.
pub const PROBE_REFLECTED: u32 = 2;
/// `ProbeFrame.flags`: A's XDP wrote `rtt_ns`.
pub const PROBE_MEASURED: u32 = 4;

/// A probe frame (no padding: 14 + 4 + 4 + 8 + 8 + 8 = 46 bytes; the sender may pad the
/// frame beyond it to any length).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
pub struct ProbeFrame {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    /// [`ETHERTYPE_PROBE`].
    pub ethertype: U16,
    /// [`PROBE_MAGIC`].
    pub magic: U32,
    /// `PROBE_*` bits, set by the programs on the way.
    pub flags: U32,
    /// The sender's number for this probe (echoed unchanged).
    pub seq: U64,
    /// A's `bpf_ktime_get_ns()` in tc egress (CLOCK_MONOTONIC, ns).
    pub t_depart: U64,
    /// A's XDP: `bpf_ktime_get_ns()` on return − `t_depart` (ns).
    pub rtt_ns: U64,
}

/// Length of [`ProbeFrame`] on the wire.
pub const PROBE_LEN: usize = core::mem::size_of::<ProbeFrame>();

/// Byte offsets of the fields the programs write (they use them with
/// `bpf_skb_store_bytes` or direct packet access).
pub const OFF_MAGIC: usize = 14;
pub const OFF_FLAGS: usize = 18;
pub const OFF_SEQ: usize = 22;
pub const OFF_T_DEPART: usize = 30;
pub const OFF_RTT: usize = 38;

// Indices into the per-CPU counter map `PROBE_STATS` (kept tiny: ftd creates every map
// of the object when it loads, although it never attaches the probe programs).
/// tc egress stamped a probe.
pub const PS_STAMPED: u32 = 0;
/// B's XDP reflected a probe.
pub const PS_REFLECTED: u32 = 1;
/// A's XDP measured a reflected probe.
pub const PS_MEASURED: u32 = 2;
/// A's XDP saw a reflected probe without a stamp (the stamp program is not attached):
/// passed up unmeasured.
pub const PS_UNSTAMPED: u32 = 3;
pub const PROBE_STATS_SLOTS: u32 = 4;

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::offset_of;

    #[test]
    fn layout() {
        assert_eq!(PROBE_LEN, 46);
        assert_eq!(offset_of!(ProbeFrame, magic), OFF_MAGIC);
        assert_eq!(offset_of!(ProbeFrame, flags), OFF_FLAGS);
        assert_eq!(offset_of!(ProbeFrame, seq), OFF_SEQ);
        assert_eq!(offset_of!(ProbeFrame, t_depart), OFF_T_DEPART);
        assert_eq!(offset_of!(ProbeFrame, rtt_ns), OFF_RTT);
    }
}
