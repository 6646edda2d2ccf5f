//! The log frames' MAC in the kernel (wire format version 4, `ft_common::wire`):
//! SipHash-2-4 under the channel key over the frame's header words, as
//! `wire::mac_header_words` gives them (`aux` zero, `FLAG_RETRANSMIT` cleared), then the
//! payload bytes. The primary's XDP computes it for every input frame it logs (and keeps
//! it for a repair); the backup's XDP checks it on every `LOG` and `VMLOG` frame before
//! it buffers, acks or counts anything of it.
//!
//! The payload is read from the packet, word by word, each read bounds-checked against
//! the packet's end: a loop of at most `MAX_WORDS` iterations the verifier follows; the
//! tail (fewer than 8 bytes) through `bpf_xdp_load_bytes`. Nothing is copied first, so a frame that
//! does not fit the backup's ring is still authenticated (and its sender still heard).
//! Userspace computes the same value with `wire::payload_mac`.
use aya_ebpf::programs::XdpContext;
use ft_common::{
    siphash::{Sip24, SipKey},
    wire::{FT_HLEN, MAX_FRAME},
};

/// Most whole 8-byte words a payload of at most `MAX_FRAME` bytes has.
const MAX_WORDS: usize = MAX_FRAME / 8;

/// The MAC of the `len` payload bytes at packet offset `off` under header words `hdr`;
/// None if the packet ends before them. The caller checked `len <= MAX_FRAME`.
#[inline(always)]
pub fn packet_mac(
    ctx: &XdpContext,
    key: &SipKey,
    hdr: &[u64; 5],
    off: usize,
    len: usize,
) -> Option<u64> {
    let (data, end) = (ctx.data(), ctx.data_end());
    let mut s = Sip24::new(key);
    for w in hdr {
        s.write_word(*w);
    }
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
        s.write_word(unsafe { core::ptr::read_unaligned(p as *const u64) });
        i += 1;
    }
    // The last `len % 8` bytes, through the helper (its length a bounded scalar 1..=7).
    let rem = (len & 7) as u32;
    let mut tail = [0u8; 8];
    if rem > 0 {
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
    }
    Some(s.finish(FT_HLEN + len, u64::from_le_bytes(tail)))
}
