//! The log frames' MAC in the kernel (wire format version 4, `ft_common::wire`): NH of
//! the payload's words (two passes, `wire::nh_word`) under the key slot's NH key, then
//! SipHash-2-4 under its SipHash key of the frame's header words (as
//! `wire::mac_header_words` gives them: `aux` zero, `FLAG_RETRANSMIT` cleared) and the two
//! NH sums (`wire::mac_finish`). The primary's XDP computes it for every input frame it
//! logs (and keeps it for a repair); the backup's XDP checks it on every `LOG` and
//! `VMLOG` frame before it buffers, acks or counts anything of it. `wire::MacKey` argues
//! the construction; userspace computes the same value with `wire::payload_mac`.
//!
//! The payload is read from the packet, word by word, each read bounds-checked against
//! the packet's end, and the key words from the map value: a loop of at most
//! `MAX_WORDS` iterations the verifier follows; the tail (fewer than 8 bytes, zero
//! padded) through `bpf_xdp_load_bytes`. Nothing is copied first, so a frame that does
//! not fit the backup's ring is still authenticated (and its sender still heard).
use aya_ebpf::programs::XdpContext;
use ft_common::{
    maps::KeySlot,
    wire::{MAX_FRAME, NH_KEY_WORDS, mac_finish, nh_word},
};

use crate::shared::{load64, slot_sip};

/// Most whole 8-byte words a payload of at most `MAX_FRAME` bytes has.
const MAX_WORDS: usize = MAX_FRAME / 8;

/// NH key word `i` of `slot` (0 past the key: never reached for payloads the caller
/// checked).
#[inline(always)]
fn nh_key(slot: *const KeySlot, i: usize) -> u64 {
    if i >= NH_KEY_WORDS {
        return 0;
    }
    // SAFETY: `slot` points into the live KEYS value; `i` is within `nh` (checked).
    unsafe { load64(&raw const (*slot).nh[i]) }
}

/// The MAC of the `len` payload bytes at packet offset `off` under header words `hdr`
/// and key `slot`; None if the packet ends before them. The caller checked
/// `len <= MAX_FRAME`.
#[inline(always)]
pub fn packet_mac(
    ctx: &XdpContext,
    slot: *const KeySlot,
    hdr: &[u64; 5],
    off: usize,
    len: usize,
) -> Option<u64> {
    let (data, end) = (ctx.data(), ctx.data_end());
    let mut acc = [0u64; 2];
    let len = len & 0x7ff;
    if len > MAX_FRAME {
        return None;
    }
    let words = len >> 3;
    let mut i = 0usize;
    while i < MAX_WORDS {
        if i >= words {
            break;
        }
        let p = data + off + (i << 3);
        if p + 8 > end {
            return None;
        }
        // SAFETY: the 8 bytes at `p` are inside the packet (checked just above); an
        // unaligned read of packet memory is allowed (no strict alignment on XDP).
        let m = unsafe { core::ptr::read_unaligned(p as *const u64) };
        nh_word(&mut acc, m, nh_key(slot, i), nh_key(slot, i + 1));
        i += 1;
    }
    // The last `len % 8` bytes, zero padded, through the helper (its length a bounded
    // scalar 1..=7).
    let rem = (len & 7) as u32;
    if rem > 0 {
        let mut tail = [0u8; 8];
        let at = (off + (words << 3)) as u32;
        // SAFETY: helper call on our own context, into a local buffer of 8 >= rem bytes.
        let r = unsafe {
            aya_ebpf::helpers::generated::bpf_xdp_load_bytes(
                ctx.ctx,
                at,
                tail.as_mut_ptr() as *mut _,
                rem,
            )
        };
        if r != 0 {
            return None;
        }
        let w = words & 0xff;
        nh_word(
            &mut acc,
            u64::from_le_bytes(tail),
            nh_key(slot, w),
            nh_key(slot, w + 1),
        );
    }
    Some(mac_finish(&slot_sip(slot), hdr, &acc))
}
