//! The output rule: a multi-producer ring of held VM output frames (`HOLD`), released in
//! ring order once the backup's cumulative ack covers each frame's dependency.
//!
//! Producers (`ft_vm_tc`, any CPU) reserve a ring index with compare-and-swap on `tail`,
//! copy the frame into the slot and publish it by setting `ready = index + 1`.
//! Releasers (`ft_vm_tc` after enqueueing, `ft_log_tc` on every ack) take a try-lock;
//! the holder emits frames from `head` while they are published and covered by both
//! acks (input and VMM streams), using its own skb as the carrier (`bpf_clone_redirect`
//! to the client NIC's egress, so the fence guard and the qdisc still apply).
//!
//! No lost wake-up: a releaser sets `kick` *before* it tries the lock; the holder clears
//! `kick` when it takes the lock and looks at it again after unlocking. A kick set
//! before the holder's clear is covered by the holder's scan (which starts after the
//! clear); one set after it is seen by the holder's re-check, or, if it comes after
//! that, its releaser's own lock attempt comes after the unlock and succeeds.
//!
//! One trigger drains the ring: a holder goes round again while its last pass was full
//! (`BURST` frames), up to `ROUNDS` passes, and then continues in `ft_release_more` by
//! tail call (same skb), up to the kernel's tail-call limit: `HOLD_RELEASE_MAX` frames.
//! The loader refuses a larger ring, so a frame whose ack has arrived never waits for a
//! later trigger.
use aya_ebpf::{helpers::generated as h, programs::TcContext};
use ft_common::{maps::*, wire::*};

use crate::shared::*;

/// Frames one pass emits (bounded loop for the verifier).
const BURST: u32 = HOLD_RELEASE_BURST;
/// Passes per trigger (another pass when kicked or when the last one was full).
const ROUNDS: u32 = HOLD_RELEASE_ROUNDS;

/// Copies the VM's frame into the next ring slot. Err(action) when it cannot be held.
#[inline(always)]
pub fn enqueue(ctx: &TcContext, cfg: &Config) -> Result<(), i32> {
    const SHOT: i32 = aya_ebpf::bindings::TC_ACT_SHOT as i32;
    // A frame longer than a slot is dropped and counted, never held truncated.
    let raw = ctx.len();
    if raw < ETH_HLEN as u32 || raw > MAX_FRAME as u32 {
        count(C_DROP_OVERSIZE);
        return Err(SHOT);
    }
    // (No-op for the lengths allowed above; tells the verifier the copy is bounded.)
    let len = raw & 0x7ff;
    let st = seq_state().ok_or(SHOT)?;
    let ch = chan().ok_or(SHOT)?;
    let ctl = HOLD_CTL.get_ptr_mut(0).ok_or(SHOT)?;
    // The frame depends on every log entry of both streams so far: anything the VM
    // could have seen before producing it. Conservative (a frame assigned microseconds
    // ago but not yet delivered counts too) and exact where it matters: the VMM stores
    // `vm_last` before it writes the output frame to the VM NIC.
    // SAFETY: live map values, aligned fields (`vm_last` is written by the daemon).
    let (dep, dep_vm) = unsafe { (load64(&(*st).last_seq), load64(&(*ch).vm_last)) };
    let mut idx = u64::MAX;
    for _ in 0..8 {
        // SAFETY: live map value, aligned fields.
        let (t, hd) = unsafe { (load64(&(*ctl).tail), load64(&(*ctl).head)) };
        if t.wrapping_sub(hd) > cfg.hold_mask {
            count(C_DROP_HOLD_FULL);
            return Err(SHOT);
        }
        // SAFETY: as above.
        if unsafe { cmpxchg64(&mut (*ctl).tail, t, t + 1) } == t {
            idx = t;
            break;
        }
    }
    if idx == u64::MAX {
        count(C_DROP_HOLD_CONTENTION);
        return Err(SHOT);
    }
    let Some(slot) = HOLD.get_ptr_mut((idx & cfg.hold_mask) as u32) else {
        return Err(SHOT);
    };
    // SAFETY: `slot` is a live HOLD value reserved for `idx` by the CAS above (the ring
    // is never more than hold_mask + 1 ahead of head, so no releaser reads it until it
    // is published); `len` <= MAX_FRAME <= SLOT_DATA.
    unsafe {
        (*slot).dep = dep;
        (*slot).dep_vm = dep_vm;
        (*slot).enq_ns = h::bpf_ktime_get_ns();
        let ok = h::bpf_skb_load_bytes(
            ctx.skb.skb as *const _,
            0,
            (*slot).data.as_mut_ptr() as *mut _,
            len,
        ) == 0;
        // A frame we failed to copy is published with length 0 and skipped on release
        // (it must still be published, or the ring would stall behind it).
        (*slot).len = if ok { len } else { 0 };
        xchg64(&mut (*slot).ready, idx + 1);
    }
    count(C_HOLD_ENQ);
    Ok(())
}

/// Emits every held frame that the output rule allows, in order.
#[inline(always)]
pub fn release(ctx: &TcContext) {
    let (Some(cfg), Some(node), Some(st), Some(ctl)) =
        (config(), node(), seq_state(), HOLD_CTL.get_ptr_mut(0))
    else {
        return;
    };
    if !lease_valid(node) {
        count(C_FENCED_HOLD);
        return;
    }
    let gate = node.role == ROLE_PRIMARY && cfg.flags & CFG_HOLD_OUTPUT != 0;
    // Announce the need first (see the module docs).
    // SAFETY: live map value, aligned fields.
    unsafe { xchg32(&mut (*ctl).kick, 1) };
    const _: () = assert!(ROUNDS == 3, "the rounds are unrolled 3 times");
    macro_rules! round {
        () => {
            // SAFETY: as above.
            if unsafe { cmpxchg32(&mut (*ctl).lock, 0, 1) } != 0 {
                count(C_RELEASE_BUSY);
                return;
            }
            // SAFETY: as above.
            unsafe { xchg32(&mut (*ctl).kick, 0) };
            let acks = if gate {
                // SAFETY: as above (kernel-owned fields).
                unsafe { (load64(&(*st).acked), load64(&(*st).vm_acked)) }
            } else {
                (u64::MAX, u64::MAX)
            };
            let n = release_locked(ctx, ctl, acks.0, acks.1);
            // SAFETY: as above. Unlock, then look for a kick that arrived meanwhile.
            unsafe { xchg32(&mut (*ctl).lock, 0) };
            // SAFETY: as above.
            if n < BURST && unsafe { core::ptr::read_volatile(&(*ctl).kick) } == 0 {
                return;
            }
        };
    }
    round!();
    round!();
    round!();
    // Still frames to go after the last full pass: continue in a fresh program run.
    // SAFETY: tail call with our own context into a map slot the loader filled with
    // `ft_release_more`; on failure (no slot, tail-call limit) it returns and the rest
    // waits for the next trigger, which cannot happen for a ring of HOLD_RELEASE_MAX.
    unsafe { RELEASE_MORE.tail_call(ctx, 0) };
}

/// Repeats a statement 64 times (the release pass, unrolled by hand: a loop whose
/// counter the verifier cannot prove it tracks is refused as "infinite", and whether LLVM
/// unrolls it depends on the inlining context).
macro_rules! x4 { ($($t:tt)*) => { $($t)* $($t)* $($t)* $($t)* }; }
macro_rules! x64 { ($($t:tt)*) => { x4! { x4! { x4! { $($t)* } } } }; }
const _: () = assert!(BURST == 64, "the pass is unrolled 64 times");

/// Called with the lock held; must return (never bail out early past the unlock).
/// Returns the number of ring slots it advanced over (at most `BURST`). A BPF
/// subprogram (not inlined), so the three rounds share one copy of the unrolled pass and
/// the program stays within the verifier's jump range.
#[inline(never)]
fn release_locked(ctx: &TcContext, ctl: *mut HoldCtl, acked: u64, vm_acked: u64) -> u32 {
    let (Some(cfg), Some(node)) = (config(), node()) else {
        return 0;
    };
    let acks = (acked, vm_acked);
    let mut n = 0;
    x64! {
        if !release_one(ctx, cfg, node, ctl, acks) {
            return n;
        }
        n += 1;
    }
    n
}

/// Emits the frame at `head` if it is published and covered; true if `head` advanced.
#[inline(always)]
fn release_one(
    ctx: &TcContext,
    cfg: &Config,
    node: &NodeState,
    ctl: *mut HoldCtl,
    (acked, vm_acked): (u64, u64),
) -> bool {
    let skb = ctx.skb.skb;
    // SAFETY: live map value, aligned fields.
    let (hd, t) = unsafe { (load64(&(*ctl).head), load64(&(*ctl).tail)) };
    if hd == t {
        return false;
    }
    let Some(slot) = HOLD.get_ptr((hd & cfg.hold_mask) as u32) else {
        return false;
    };
    // SAFETY: live map value.
    let (ready, dep, dep_vm) = unsafe { (load64(&(*slot).ready), (*slot).dep, (*slot).dep_vm) };
    if ready != hd + 1 || dep > acked || dep_vm > vm_acked || !lease_valid(node) {
        return false;
    }
    // SAFETY: live map value.
    let (len, enq) = unsafe { ((*slot).len & 0xfff, (*slot).enq_ns) };
    if len >= ETH_HLEN as u32 && len <= MAX_FRAME as u32 {
        // SAFETY: helper calls on our own skb; `len` bytes of the slot are readable.
        let ok = unsafe {
            h::bpf_skb_change_tail(skb, len, 0) == 0
                && h::bpf_skb_store_bytes(skb, 0, (*slot).data.as_ptr() as *const _, len, 0) == 0
                && h::bpf_clone_redirect(skb, cfg.client_ifindex, 0) == 0
        };
        if ok {
            count(C_HOLD_RELEASED);
            // SAFETY: plain helper call.
            hist(unsafe { h::bpf_ktime_get_ns() }.saturating_sub(enq));
        } else {
            count(C_RELEASE_ERR);
        }
    } else {
        count(C_RELEASE_ERR);
    }
    // SAFETY: live map value; only the lock holder moves head.
    unsafe { xchg64(&mut (*ctl).head, hd + 1) };
    true
}

/// Hold-time histogram: bucket = bit length of the microseconds (no loop), and the sum
/// of the hold times in `HIST_SUM_SLOT`.
#[inline(always)]
fn hist(ns: u64) {
    let us = ns / 1000;
    let bits = 64 - us.leading_zeros();
    count_hist(bits.min(HIST_BUCKETS - 1));
    if let Some(p) = HOLD_HIST.get_ptr_mut(HIST_SUM_SLOT) {
        // SAFETY: per-CPU slot; only this CPU writes it (readers sum all CPUs' copies).
        unsafe { *p = (*p).wrapping_add(ns) };
    }
}

#[inline(always)]
fn count_hist(b: u32) {
    if let Some(p) = HOLD_HIST.get_ptr_mut(b) {
        // SAFETY: per-CPU slot.
        unsafe { *p += 1 };
    }
}
