//! VMM record/replay log entries (written by `ft-vmm` in record mode, consumed in replay).
//!
//! A log is a stream of entries, each
//!
//! ```text
//! | EntryHdr (40) | payload (EntryHdr.len bytes) |
//! ```
//!
//! Multi-byte fields are big-endian and unaligned (same conventions as [`crate::wire`]), so
//! an entry can be carried as the payload of a logging-link `LOG` frame unchanged.
//!
//! Every entry is keyed by its *delivery point*: `exit` = number of guest-caused VM exits
//! (MMIO/port I/O) completed before the event, plus the guest `rip` at that exit as a
//! cross-check. All events happen while the vCPU is stopped at an exit, so `exit` alone
//! is exact; a different `rip` on replay means divergence.
//!
//! Within one exit, entries appear in the order the VMM applies them: the exit's own value
//! (CLOCK/ENTROPY), then RX frames, then a checkpoint, then `END` or an interrupt.
//! Nothing is ever logged at a point that is not a guest-caused exit (e.g. after KVM_RUN
//! returned EINTR from a signal kick): such points depend on host timing.
//!
//! Kinds:
//! - `HEADER` (first entry): `value` = configuration hash (guest image, RAM size, NIC
//!   config, service settings, vCPU model), `aux` = [`VMLOG_VERSION`]; payload =
//!   [`VMLOG_MAGIC`].
//! - `CLOCK`: `value` = ns returned by the clock register read at this exit.
//! - `ENTROPY`: `value` = 64 bits returned by the entropy register read at this exit.
//! - `RX_FRAME`: payload = the frame placed into the guest's RX ring at this exit.
//! - `RX_FRAME_REF`: like `RX_FRAME` but the bytes are not copied: `value` = the data
//!   plane's log sequence number (`FtHdr.seq`) of the frame, payload = its fencing epoch
//!   (`FtHdr.epoch`, 8 bytes big-endian), `arg` = frame length, `aux` = FNV-1a hash of the
//!   frame. Replay looks the frame up by (epoch, sequence).
//! - `IRQ`: `arg` = vector injected before the guest resumes from this exit.
//! - `CHECKPOINT`: `value` = hash of vCPU registers, guest memory, every device access
//!   the guest made so far (register, value) and the device model's state (timer
//!   deadline, pending interrupts, NIC settings, counters and output hash, last clock
//!   value), after this exit's events were applied; `aux` = number of TX frames so far;
//!   replay recomputes and compares.
//! - `END`: the recording stopped cleanly after this exit; `value` = final state hash,
//!   `aux` = TX frames in total. A log without `END` is truncated (or still growing).
//!
//! Payload lengths are fixed by the kind (`HEADER` 8, `RX_FRAME_REF` 8, `RX_FRAME` up to
//! [`VMLOG_MAX_PAYLOAD`], all others 0): a complete entry with another length is corrupt.
//! A stream that ends inside an entry (a writer that died mid-write) ends before it.
use zerocopy::byteorder::network_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

pub const VMLOG_MAGIC: [u8; 8] = *b"FTVMLOG1";
/// 2: checkpoint/END hashes include the guest's device accesses.
/// 3: `RX_FRAME_REF` carries the frame's epoch; checkpoint/END hashes include the device
///    model's state; the configuration hash includes the vCPU model (CPUID table).
pub const VMLOG_VERSION: u64 = 3;

pub const EV_HEADER: u8 = 1;
pub const EV_CLOCK: u8 = 2;
pub const EV_ENTROPY: u8 = 3;
pub const EV_RX_FRAME: u8 = 4;
pub const EV_RX_FRAME_REF: u8 = 5;
pub const EV_IRQ: u8 = 6;
pub const EV_CHECKPOINT: u8 = 7;
pub const EV_END: u8 = 8;

/// Largest payload of one entry (an Ethernet frame).
pub const VMLOG_MAX_PAYLOAD: usize = 2048;

/// Payload of an `RX_FRAME_REF` entry: the frame's epoch (u64, big-endian).
pub const RX_FRAME_REF_PAYLOAD: usize = 8;

/// Header of every log entry.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned,
)]
pub struct EntryHdr {
    /// One of the `EV_*` kinds.
    pub kind: u8,
    pub flags: u8,
    /// Payload bytes following this header.
    pub len: U16,
    /// Kind-specific small value (IRQ vector, referenced frame length).
    pub arg: U32,
    /// Delivery point: guest-caused exits completed before this event.
    pub exit: U64,
    /// Guest RIP at the delivery point (cross-check).
    pub rip: U64,
    /// Kind-specific value (clock ns, entropy, sequence number, hash).
    pub value: U64,
    /// Kind-specific auxiliary value.
    pub aux: U64,
}

/// Bytes of [`EntryHdr`].
pub const ENTRY_HLEN: usize = core::mem::size_of::<EntryHdr>();

impl EntryHdr {
    pub fn new(kind: u8, exit: u64, rip: u64, value: u64) -> Self {
        EntryHdr {
            kind,
            flags: 0,
            len: U16::new(0),
            arg: U32::new(0),
            exit: U64::new(exit),
            rip: U64::new(rip),
            value: U64::new(value),
            aux: U64::new(0),
        }
    }
}

/// Human-readable name of an entry kind (for error messages).
pub fn kind_name(kind: u8) -> &'static str {
    match kind {
        EV_HEADER => "header",
        EV_CLOCK => "clock",
        EV_ENTROPY => "entropy",
        EV_RX_FRAME => "rx-frame",
        EV_RX_FRAME_REF => "rx-frame-ref",
        EV_IRQ => "irq",
        EV_CHECKPOINT => "checkpoint",
        EV_END => "end",
        _ => "unknown",
    }
}

/// FNV-1a over `data`, continuing from `h` (start with [`FNV_OFFSET`]).
pub fn fnv1a(data: &[u8], mut h: u64) -> u64 {
    for &b in data {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

pub const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_is_40_bytes_and_roundtrips() {
        assert_eq!(ENTRY_HLEN, 40);
        let mut h = EntryHdr::new(EV_CLOCK, 7, 0x1234, 99);
        h.len = U16::new(3);
        let b = h.as_bytes();
        let back = EntryHdr::read_from_bytes(b).unwrap();
        assert_eq!(back, h);
        assert_eq!(back.exit.get(), 7);
    }
}
