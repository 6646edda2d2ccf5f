//! Logging-link frame format.
//!
//! Every frame on the logging link is
//!
//! ```text
//! | EthHdr (14) | FtHdr (40) | payload (FtHdr.len bytes) |
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
//!   replay. Payload: the tag.
//! - `NACK`: backup -> primary, "resend input frame `seq`". Payload: the tag, then zero
//!   padding to a full log frame: the primary's XDP checks the tag and rewrites the
//!   frame in place into the stored frame (`FLAG_RETRANSMIT`), which overwrites the tag.
//! - `VMNACK`: backup -> primary, "resend VMLOG frame `seq`" (answered by the daemon).
//!   Payload: the tag.
//! - `HEARTBEAT`: primary -> backup every heartbeat period while replicating; `seq` =
//!   highest input sequence assigned, `aux` = highest VMLOG sequence sent, so the
//!   backup notices lost tail frames of either stream. Payload: the tag.
//! - `LEAVE`: backup -> primary: "I stopped following this log" (it diverged or shuts
//!   down); `aux` = a reason code. Payload: the tag.
//!
//! The backup's XDP drops a `LOG` or `VMLOG` frame whose `len` is above [`MAX_FRAME`] or
//! runs past the frame's end as malformed
//! (`ft_drops_total{reason="malformed"}`): such a frame never counts as received, never
//! stamps the primary alive and never reaches the daemon (whose parser,
//! [`parse_log_frame`], would refuse the first two anyway).
//!
//! `session` is a random number the primary's daemon draws at start: every frame it
//! sends carries it, the backup echoes it in acks and nacks, and the primary's XDP
//! drops acks of another session — a restarted primary (same epoch, new session) can
//! never have its output released by acks meant for its previous run.
//!
//! ## Authentication (version 4)
//!
//! Every frame on the logging link is authenticated under the 16-byte channel key
//! (`[channel] key_file`, the same file on both hosts), with SipHash-2-4
//! ([`crate::siphash`]) as the MAC, and checked in XDP on the receiving side before
//! anything else looks at its contents: a frame with a wrong or missing tag is dropped
//! and counted (`ft_drops_total{reason="bad_mac"}`), never buffered, acked, repaired or
//! counted as a sign of life.
//!
//! - **The primary's log frames** (`LOG`, `VMLOG`) carry their MAC in `aux` (unused by
//!   these kinds otherwise): [`payload_mac`], SipHash-2-4 over the 40-byte header as sent
//!   but with `aux` = 0 and [`FLAG_RETRANSMIT`] cleared (a repaired entry carries the MAC
//!   it was first sent with) and a keyed universal hash (NH, twice) of the payload: the
//!   whole client frame, or the VMM entries ([`MacKey`] argues it). A forger can
//!   neither make an entry nor change one.
//! - **Control frames** (`ACK`, `NACK`, `VMNACK`, `LEAVE` from the backup, `HEARTBEAT`
//!   from the primary) have `len` = [`TAG_LEN`] and carry an 8-byte **tag** as their
//!   payload (big-endian, like every field; [`TaggedHdr`]): SipHash-2-4 over the whole
//!   40-byte `FtHdr` as it is on the wire ([`frame_tag`]): magic, version, kind, flags,
//!   len, key_id, key_adv, session, epoch, seq and aux. The daemon checks VMNACK and
//!   LEAVE tags again. A NACK's padding is not covered (meaningless).
//! - **Keys.** Every frame names the key its tag or MAC is under (`key_id`, [`key_id`]
//!   of the key) and the newest key its sender holds (`key_adv`); receivers check with
//!   the key named, so during a rotation both keys are accepted
//!   (`ft_common::maps::KeyRing`, `userspace/src/channel/keys.rs`).
//!
//! **Replays.** The MAC covers session, epoch and sequence. A replayed log entry of this
//! session is a duplicate (dropped); one of another run has another session (a backup
//! follows one session, which its join answer names) or another epoch (every live start
//! takes a new one). Acks are cumulative and only move forward, so an old ack cannot
//! release more than the backup confirmed; a replayed NACK or VMNACK costs one
//! retransmission; a LEAVE is sent only when the backup stops following, after which
//! the primary moves to a new epoch; a replayed heartbeat of this session only says
//! the log went as far as it did then.
//!
//! Not covered: the Ethernet header (source and destination are checked against the
//! configuration but are not secret). Nothing is encrypted: the log frames carry the
//! clients' traffic as it is (see ARCHITECTURE.md).
use zerocopy::byteorder::network_endian::{U16, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::siphash::{Sip24, SipKey, siphash24_words};

/// IEEE 802 "local experimental" EtherType 1, used for all logging-link frames.
pub const ETHERTYPE_FT: u16 = 0x88B5;
pub const ETHERTYPE_IPV4: u16 = 0x0800;
pub const ETHERTYPE_ARP: u16 = 0x0806;

pub const FT_MAGIC: u8 = 0xF7;
/// 4: every frame is authenticated (see the module docs); 3 authenticated only the
/// backup's frames.
pub const FT_VERSION: u8 = 4;

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

impl EthHdr {
    /// The Ethernet header of a logging-link frame from `src` to `dst`.
    #[inline(always)]
    pub fn ft(dst: [u8; 6], src: [u8; 6]) -> EthHdr {
        EthHdr {
            dst,
            src,
            ethertype: U16::new(ETHERTYPE_FT),
        }
    }
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
    /// The id of the channel key this frame's tag or MAC is under ([`key_id`]; 0 only
    /// in frames that carry neither). Receivers check with the key of that id, so both
    /// keys of a rotation are accepted while both are held (`ft_common::maps::KeyRing`).
    pub key_id: u8,
    /// The id of the newest channel key the sender holds: a receiver switches its own
    /// frames to its newest key once the peer says it holds it too.
    pub key_adv: u8,
    /// The primary daemon's run (see the module docs); echoed by the backup.
    pub session: U64,
    /// Fencing epoch of the sender (frames of another epoch are dropped).
    pub epoch: U64,
    /// LOG/VMLOG: the frame's sequence in its stream; ACK: cumulative input ack;
    /// NACK/VMNACK: the missing frame; HEARTBEAT: highest input sequence assigned.
    pub seq: U64,
    /// LOG/VMLOG: the frame's MAC ([`payload_mac`]); ACK: cumulative VMM-stream ack;
    /// HEARTBEAT: highest VMLOG sequence sent; LEAVE: reason. Otherwise 0.
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
            key_id: 0,
            key_adv: 0,
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

/// Bytes of the tag the backup's frames carry as their payload.
pub const TAG_LEN: usize = 8;

/// The control kinds: each carries a tag of its header as its payload (the log kinds
/// carry a MAC of header and payload in `aux`).
#[inline(always)]
pub fn kind_is_tagged(kind: u8) -> bool {
    matches!(
        kind,
        KIND_ACK | KIND_NACK | KIND_VMNACK | KIND_LEAVE | KIND_HEARTBEAT
    )
}

/// The header words a log frame's MAC covers: `h` as sent, but with `aux` (where the MAC
/// goes) zero and [`FLAG_RETRANSMIT`] cleared (a repaired entry keeps its MAC).
#[inline(always)]
pub fn mac_header_words(h: &FtHdr) -> [u64; 5] {
    let mut m = *h;
    m.aux = U64::new(0);
    m.flags &= !FLAG_RETRANSMIT;
    tag_words(&m)
}

/// Payload words a log frame's MAC hashes: the payload in little-endian 8-byte words,
/// the last one zero-padded (`len` is in the header, so the padding is unambiguous).
pub const NH_WORDS: usize = MAX_FRAME.div_ceil(8);
/// Words of a [`MacKey`]'s NH key: one per payload word, and one more for the second,
/// shifted pass.
pub const NH_KEY_WORDS: usize = NH_WORDS + 1;
/// First word of the messages that derive the NH key (its low byte is not `FT_MAGIC`:
/// no tag ever covers such a message).
const NH_LABEL: u64 = 0x7965_6b2d_686e_2d00;

/// The key of the log frames' MAC: the channel's SipHash key and an NH key derived from
/// it ([`MacKey::derive`]).
///
/// The MAC ([`payload_mac`]) is hash-then-PRF: NH, a universal hash, compresses the
/// payload to two 64-bit sums (two passes, the second with the key shifted by one word:
/// "Toeplitz" NH as in UMAC, so two payloads of one length collide with probability at
/// most 2^-64), and SipHash-2-4 under the channel key covers the header words and those
/// sums. A forger who changes the payload must make both sums collide without knowing
/// the NH key (it never leaves the two hosts; every value anyone sees is a SipHash
/// output), and the header (session, epoch, sequence) differs for every frame. Per
/// payload word NH costs two 32-bit additions and one multiplication per pass, a few
/// times less than SipHash's compression rounds.
#[derive(Clone, PartialEq, Eq)]
pub struct MacKey {
    pub sip: SipKey,
    pub nh: [u64; NH_KEY_WORDS],
}

impl core::fmt::Debug for MacKey {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("MacKey(..)")
    }
}

impl MacKey {
    /// The NH key is SipHash-2-4 under the channel key in counter mode over messages no
    /// tag or MAC ever covers (5 words that start with [`NH_LABEL`]).
    pub fn derive(sip: &SipKey) -> MacKey {
        let mut nh = [0u64; NH_KEY_WORDS];
        for (i, k) in nh.iter_mut().enumerate() {
            *k = siphash24_words(sip, &[NH_LABEL, i as u64, 0, 0, 0]);
        }
        MacKey { sip: *sip, nh }
    }
}

/// One payload word into both NH sums, with the key words `k` (this word's) and `k_next`
/// (the next one's: the shifted pass).
#[inline(always)]
pub fn nh_word(acc: &mut [u64; 2], m: u64, k: u64, k_next: u64) {
    let pass = |k: u64| {
        let a = (m as u32).wrapping_add(k as u32) as u64;
        let b = ((m >> 32) as u32).wrapping_add((k >> 32) as u32) as u64;
        a.wrapping_mul(b)
    };
    acc[0] = acc[0].wrapping_add(pass(k));
    acc[1] = acc[1].wrapping_add(pass(k_next));
}

/// The MAC from the header words and the payload's NH sums: SipHash-2-4 of 7 words.
#[inline(always)]
pub fn mac_finish(sip: &SipKey, hdr: &[u64; 5], acc: &[u64; 2]) -> u64 {
    // Incrementally (no 7-word array on the eBPF stack).
    let mut s = Sip24::new(sip);
    for w in hdr {
        s.write_word(*w);
    }
    s.write_word(acc[0]);
    s.write_word(acc[1]);
    s.finish(7 * 8, 0)
}

/// The MAC of a `LOG` or `VMLOG` frame with header `h` and `payload` (userspace; the
/// eBPF programs hash the same words from the packet, `ebpf/programs/src/mac.rs`).
/// `payload` is at most [`MAX_FRAME`] bytes (longer ones are never sent or accepted;
/// here the words past it are not hashed).
pub fn payload_mac(key: &MacKey, h: &FtHdr, payload: &[u8]) -> u64 {
    let mut acc = [0u64; 2];
    for (i, w) in payload.chunks(8).take(NH_WORDS).enumerate() {
        let mut b = [0u8; 8];
        b[..w.len()].copy_from_slice(w);
        nh_word(&mut acc, u64::from_le_bytes(b), key.nh[i], key.nh[i + 1]);
    }
    mac_finish(&key.sip, &mac_header_words(h), &acc)
}

/// Userspace: `payload` carries the right MAC for a log frame with header `h`.
pub fn payload_mac_valid(key: &MacKey, h: &FtHdr, payload: &[u8]) -> bool {
    h.aux.get() == payload_mac(key, h, payload)
}

/// Headers and tag of a frame from the backup (`ACK`, `NACK`, `VMNACK`, `LEAVE`).
#[repr(C)]
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned,
)]
pub struct TaggedHdr {
    pub eth: EthHdr,
    pub ft: FtHdr,
    /// [`frame_tag`] of `ft` (with `ft.len` = [`TAG_LEN`]).
    pub tag: U64,
}

/// Bytes of [`TaggedHdr`].
pub const TAGGED_HLEN: usize = LOG_OVERHEAD + TAG_LEN;

/// The message a tag covers: the 40 bytes of `h` as they are on the wire, as the five
/// little-endian words SipHash reads them as. Fixed size, so the eBPF programs can hash
/// it in a straight line.
#[inline(always)]
pub fn tag_words(h: &FtHdr) -> [u64; 5] {
    let len = h.len.to_bytes();
    [
        u64::from_le_bytes([
            h.magic, h.version, h.kind, h.flags, len[0], len[1], h.key_id, h.key_adv,
        ]),
        u64::from_le_bytes(h.session.to_bytes()),
        u64::from_le_bytes(h.epoch.to_bytes()),
        u64::from_le_bytes(h.seq.to_bytes()),
        u64::from_le_bytes(h.aux.to_bytes()),
    ]
}

/// The tag of a frame with header `h`: SipHash-2-4 of the header bytes.
#[inline(always)]
pub fn frame_tag(key: &SipKey, h: &FtHdr) -> u64 {
    siphash24_words(key, &tag_words(h))
}

/// The id of a channel key: 1..=255, from a SipHash of a fixed message under it (the
/// key stays secret; two keys share an id with probability 1/255, and `ftd keygen
/// --rotate` draws again until the new key's id differs from the old one's).
pub fn key_id(key: &SipKey) -> u8 {
    (siphash24_words(key, &[0x6b65_792d_6964_2d31, 0, 0, 0, 0]) % 255) as u8 + 1
}

/// Userspace: `payload` (of a frame parsed by [`parse_log_frame`]) is the right tag for
/// `h`.
pub fn tag_valid(key: &SipKey, h: &FtHdr, payload: &[u8]) -> bool {
    h.len.get() as usize == TAG_LEN
        && payload.len() == TAG_LEN
        && payload == frame_tag(key, h).to_be_bytes()
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
        assert_eq!(core::mem::size_of::<TaggedHdr>(), TAGGED_HLEN);
        const { assert!(SLOT_DATA >= MAX_FRAME) };
    }

    #[test]
    fn parse_roundtrip_and_rejects() {
        let mut buf = [0u8; LOG_OVERHEAD + 4];
        let mut ft = FtHdr::new(KIND_LOG, 0x5e55, 7, 42);
        ft.len = U16::new(4);
        let hdr = LogHdr {
            eth: EthHdr::ft([1; 6], [2; 6]),
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

    fn key() -> SipKey {
        SipKey::from_bytes(&[7; 16])
    }

    fn ack() -> FtHdr {
        let mut h = FtHdr::new(KIND_ACK, 0x5e55, 7, 42);
        h.aux.set(9);
        h.len.set(TAG_LEN as u16);
        h
    }

    #[test]
    fn the_tag_covers_the_header_bytes_as_sent() {
        let h = ack();
        // The words are the wire bytes, so a receiver hashes exactly what it got.
        assert_eq!(
            frame_tag(&key(), &h),
            crate::siphash::siphash24(&key(), h.as_bytes())
        );
        // Every bit of every header byte changes the tag.
        let t = frame_tag(&key(), &h);
        for i in 0..FT_HLEN {
            for bit in 0..8 {
                let mut b = h;
                b.as_mut_bytes()[i] ^= 1 << bit;
                assert_ne!(frame_tag(&key(), &b), t, "byte {i} bit {bit}");
            }
        }
        let other = SipKey::from_bytes(&[8; 16]);
        assert_ne!(frame_tag(&other, &h), t);
    }

    #[test]
    fn tag_valid_checks_tag_and_length() {
        let h = ack();
        let tag = frame_tag(&key(), &h).to_be_bytes();
        assert!(tag_valid(&key(), &h, &tag));
        assert!(!tag_valid(&SipKey::from_bytes(&[8; 16]), &h, &tag));
        assert!(!tag_valid(&key(), &h, &tag[..4]));
        let mut bad = tag;
        bad[7] ^= 1;
        assert!(!tag_valid(&key(), &h, &bad));
        // An untagged frame (len 0) is never valid.
        let mut untagged = h;
        untagged.len.set(0);
        assert!(!tag_valid(&key(), &untagged, &[]));
        assert!(kind_is_tagged(KIND_ACK) && kind_is_tagged(KIND_LEAVE));
        assert!(kind_is_tagged(KIND_HEARTBEAT));
        assert!(!kind_is_tagged(KIND_LOG) && !kind_is_tagged(KIND_VMLOG));
    }

    #[test]
    fn a_log_frames_mac_covers_header_and_payload_but_not_the_retransmit_flag() {
        extern crate std;
        let mk = |k: &SipKey| MacKey::derive(k);
        let key = mk(&key());
        let mut h = FtHdr::new(KIND_LOG, 0x5e55, 7, 42);
        let payload: std::vec::Vec<u8> = (0..61u8).collect();
        h.len.set(payload.len() as u16);
        let mac = payload_mac(&key, &h, &payload);
        // It is SipHash-2-4 of the masked header words and the two NH sums of the
        // zero-padded payload words (NH written out here independently).
        let mut padded = payload.clone();
        padded.resize(64, 0);
        let (mut s0, mut s1) = (0u64, 0u64);
        for (i, w) in padded.chunks(8).enumerate() {
            let m = u64::from_le_bytes(w.try_into().unwrap());
            for (acc, k) in [(&mut s0, key.nh[i]), (&mut s1, key.nh[i + 1])] {
                let lo = (m & 0xffff_ffff).wrapping_add(k & 0xffff_ffff) & 0xffff_ffff;
                let hi = (m >> 32).wrapping_add(k >> 32) & 0xffff_ffff;
                *acc = acc.wrapping_add(lo.wrapping_mul(hi));
            }
        }
        let mut m = h;
        m.aux.set(0);
        let mut msg = std::vec::Vec::new();
        msg.extend_from_slice(m.as_bytes());
        msg.extend_from_slice(&s0.to_le_bytes());
        msg.extend_from_slice(&s1.to_le_bytes());
        assert_eq!(mac, crate::siphash::siphash24(&key.sip, &msg));
        // The NH key depends on the channel key and differs word by word.
        assert_ne!(key.nh[0], key.nh[1]);
        assert_ne!(key.nh, mk(&SipKey::from_bytes(&[8; 16])).nh);
        h.aux.set(mac);
        assert!(payload_mac_valid(&key, &h, &payload));
        // A repaired entry (FLAG_RETRANSMIT) keeps its MAC.
        let mut r = h;
        r.flags |= FLAG_RETRANSMIT;
        assert!(payload_mac_valid(&key, &r, &payload));
        // Any other header bit, any payload bit, another key: another MAC.
        for i in 0..FT_HLEN - 8 {
            for bit in 0..8 {
                let mut b = h;
                b.as_mut_bytes()[i] ^= 1 << bit;
                if i == 3 && bit == 0 {
                    continue; // FLAG_RETRANSMIT
                }
                assert!(!payload_mac_valid(&key, &b, &payload), "byte {i} bit {bit}");
            }
        }
        for i in 0..payload.len() {
            for bit in 0..8 {
                let mut p = payload.clone();
                p[i] ^= 1 << bit;
                assert!(
                    !payload_mac_valid(&key, &h, &p),
                    "payload byte {i} bit {bit}"
                );
            }
        }
        // Two words swapped, a word moved: NH is keyed per position.
        let mut swapped = payload.clone();
        swapped[..16].rotate_left(8);
        assert!(!payload_mac_valid(&key, &h, &swapped));
        assert!(!payload_mac_valid(&key, &h, &payload[..60]));
        assert!(!payload_mac_valid(
            &mk(&SipKey::from_bytes(&[8; 16])),
            &h,
            &payload
        ));
        // The largest payload uses every NH key word.
        let big = [0xa5u8; MAX_FRAME];
        let mut hb = h;
        hb.len.set(MAX_FRAME as u16);
        let m1 = payload_mac(&key, &hb, &big);
        let mut big2 = big;
        big2[MAX_FRAME - 1] ^= 1;
        assert_ne!(m1, payload_mac(&key, &hb, &big2));
    }
}
