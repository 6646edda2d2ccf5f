//! Logging-link frame format.
//!
//! Every frame on the logging link is
//!
//! ```text
//! | EthHdr (14) | FtHdr (32) | payload (FtHdr.len bytes) |
//! ```
//!
//! with `EthHdr.ethertype == ETHERTYPE_FT`. All multi-byte fields are big-endian and
//! unaligned (packet data is only 2-byte aligned after the Ethernet header).
//!
//! The log has two streams, each with its own sequence numbers (1, 2, ...; 0 is never
//! used), retransmission store and cumulative ack (why two: ARCHITECTURE.md):
//! - the **input stream**: inbound client frames, sequenced, stored and sent by XDP on
//!   the primary (`LOG`), repaired in the kernel (`NACK`);
//! - the **VMM stream**: the primary VMM's entries (clock values, entropy, interrupt
//!   delivery points, references to input frames, checkpoints), batched by the daemon
//!   into `VMLOG` frames, stored and repaired (`VMNACK`) by the daemon.
//!
//! Kinds:
//! - `LOG`: one input frame; `seq` = its input sequence.
//! - `VMLOG`: a batch of whole VMM log entries (`ft_common::vmlog` format, back to back);
//!   `seq` = the frame's VMM-stream sequence.
//! - `ACK`: backup -> primary, cumulative for both streams: `seq` = every input frame up
//!   to it is held by the backup, `aux` = every VMLOG frame up to it is buffered for
//!   replay. No payload.
//! - `NACK`: backup -> primary, "resend input frame `seq`". Padded to a full log frame:
//!   the primary's XDP rewrites it in place into the stored frame (`FLAG_RETRANSMIT`).
//! - `VMNACK`: backup -> primary, "resend VMLOG frame `seq`" (answered by the daemon).
//! - `HEARTBEAT`: primary -> backup every heartbeat period while replicating; `seq` =
//!   highest input sequence assigned, `aux` = highest VMLOG sequence sent, so the
//!   backup notices lost tail frames of either stream.
//! - `LEAVE`: backup -> primary: "I stopped following this log" (it diverged or shuts
//!   down); `aux` = a reason code.
//!
//! `session` is a random number the primary's daemon draws at start: every frame it
//! sends carries it, the backup echoes it in acks and nacks, and the primary's XDP
//! drops acks of another session — a restarted primary (same epoch, new session) can
//! never have its output released by acks meant for its previous run.
use zerocopy::byteorder::network_endian::{U16, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// IEEE 802 "local experimental" EtherType 1, used for all logging-link frames.
pub const ETHERTYPE_FT: u16 = 0x88B5;
pub const ETHERTYPE_IPV4: u16 = 0x0800;
pub const ETHERTYPE_ARP: u16 = 0x0806;

pub const FT_MAGIC: u8 = 0xF7;
pub const FT_VERSION: u8 = 2;

pub const KIND_LOG: u8 = 1;
pub const KIND_ACK: u8 = 2;
pub const KIND_NACK: u8 = 3;
pub const KIND_HEARTBEAT: u8 = 4;
pub const KIND_VMLOG: u8 = 5;
pub const KIND_VMNACK: u8 = 6;
pub const KIND_LEAVE: u8 = 7;

/// `LEAVE` reasons (`aux`).
pub const LEAVE_DIVERGED: u64 = 1;
pub const LEAVE_SHUTDOWN: u64 = 2;
pub const LEAVE_STALE_SESSION: u64 = 3;

/// Set on `LOG` frames sent again in answer to a `NACK`.
pub const FLAG_RETRANSMIT: u8 = 1;

/// Largest client frame carried (Ethernet header + 1500 bytes MTU + one VLAN tag).
pub const MAX_FRAME: usize = 1518;
/// Bytes of a map slot's frame buffer (MAX_FRAME rounded up).
pub const SLOT_DATA: usize = 1536;

pub const ETH_HLEN: usize = 14;
pub const FT_HLEN: usize = 40;
/// Bytes prepended to a client frame to make a log frame.
pub const LOG_OVERHEAD: usize = ETH_HLEN + FT_HLEN;
/// Minimum MTU of the logging NIC (its MTU excludes the Ethernet header).
pub const MIN_LOG_MTU: usize = MAX_FRAME + LOG_OVERHEAD - ETH_HLEN;

#[repr(C)]
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned,
)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    pub ethertype: U16,
}

#[repr(C)]
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned,
)]
pub struct FtHdr {
    pub magic: u8,
    pub version: u8,
    pub kind: u8,
    pub flags: u8,
    /// Payload bytes following this header.
    pub len: U16,
    pub reserved: U16,
    /// The primary daemon's run (see the module docs); echoed by the backup.
    pub session: U64,
    /// Fencing epoch of the sender (frames of another epoch are dropped).
    pub epoch: U64,
    /// LOG/VMLOG: the frame's sequence in its stream; ACK: cumulative input ack;
    /// NACK/VMNACK: the missing frame; HEARTBEAT: highest input sequence assigned.
    pub seq: U64,
    /// ACK: cumulative VMM-stream ack; HEARTBEAT: highest VMLOG sequence sent; LEAVE:
    /// reason. Otherwise 0.
    pub aux: U64,
}

impl FtHdr {
    pub fn new(kind: u8, session: u64, epoch: u64, seq: u64) -> Self {
        FtHdr {
            magic: FT_MAGIC,
            version: FT_VERSION,
            kind,
            flags: 0,
            len: U16::new(0),
            reserved: U16::new(0),
            session: U64::new(session),
            epoch: U64::new(epoch),
            seq: U64::new(seq),
            aux: U64::new(0),
        }
    }
}

/// Outer headers of every logging-link frame.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned,
)]
pub struct LogHdr {
    pub eth: EthHdr,
    pub ft: FtHdr,
}

/// Why a parsed logging-link frame is not acceptable (userspace parser).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParseError {
    Truncated,
    NotFt,
    BadMagic,
    BadLength,
}

/// Parses the outer headers and returns them with the payload (userspace side; the eBPF
/// programs do the same checks with explicit bounds checks).
pub fn parse_log_frame(frame: &[u8]) -> Result<(&LogHdr, &[u8]), ParseError> {
    let (hdr, rest) = LogHdr::ref_from_prefix(frame).map_err(|_| ParseError::Truncated)?;
    if hdr.eth.ethertype.get() != ETHERTYPE_FT {
        return Err(ParseError::NotFt);
    }
    if hdr.ft.magic != FT_MAGIC || hdr.ft.version != FT_VERSION {
        return Err(ParseError::BadMagic);
    }
    let len = hdr.ft.len.get() as usize;
    if len > rest.len() || len > MAX_FRAME {
        return Err(ParseError::BadLength);
    }
    Ok((hdr, &rest[..len]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_match_constants() {
        assert_eq!(core::mem::size_of::<EthHdr>(), ETH_HLEN);
        assert_eq!(core::mem::size_of::<FtHdr>(), FT_HLEN);
        assert_eq!(core::mem::size_of::<LogHdr>(), LOG_OVERHEAD);
        const { assert!(SLOT_DATA >= MAX_FRAME) };
    }

    #[test]
    fn parse_roundtrip_and_rejects() {
        let mut buf = [0u8; LOG_OVERHEAD + 4];
        let mut ft = FtHdr::new(KIND_LOG, 0x5e55, 7, 42);
        ft.len = U16::new(4);
        let hdr = LogHdr {
            eth: EthHdr {
                dst: [1; 6],
                src: [2; 6],
                ethertype: U16::new(ETHERTYPE_FT),
            },
            ft,
        };
        buf[..LOG_OVERHEAD].copy_from_slice(hdr.as_bytes());
        buf[LOG_OVERHEAD..].copy_from_slice(b"abcd");
        let (h, p) = parse_log_frame(&buf).unwrap();
        assert_eq!(h.ft.seq.get(), 42);
        assert_eq!(h.ft.epoch.get(), 7);
        assert_eq!(h.ft.session.get(), 0x5e55);
        assert_eq!(p, b"abcd");
        assert_eq!(parse_log_frame(&buf[..20]), Err(ParseError::Truncated));
        assert_eq!(
            parse_log_frame(&buf[..LOG_OVERHEAD + 2]),
            Err(ParseError::BadLength)
        );
        let mut bad = buf;
        bad[ETH_HLEN] = 0;
        assert_eq!(parse_log_frame(&bad), Err(ParseError::BadMagic));
        let mut bad = buf;
        bad[12] = 0x08;
        bad[13] = 0x00;
        assert_eq!(parse_log_frame(&bad), Err(ParseError::NotFt));
    }
}
