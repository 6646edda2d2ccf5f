//! The output rule: a multi-producer ring of held VM output frames (`HOLD`), released in
//! ring order once the backup's cumulative ack covers each frame's dependency.
//!
//! Producers (`ft_vm_tc`, any CPU) reserve a ring index with compare-and-swap on `tail`,
//! copy the frame into the slot and publish it by setting `ready = index + 1`.
//! Releasers (`ft_vm_tc` after enqueueing, `ft_log_tc` on every ack) take a try-lock;
//! the holder emits frames from `head` while they are published and covered by the ack,
//! using its own skb as the carrier (`bpf_clone_redirect` to the client NIC's egress, so
//! the fence guard and the qdisc still apply). A releaser that finds the lock busy sets
//! `kick`; the holder re-checks after unlocking, so no release is lost.
use aya_ebpf::{helpers::generated as h, programs::TcContext};
use ft_common::{maps::*, wire::*};

use crate::shared::*;

/// Most frames one release call emits (bounded loop for the verifier). Every ack and
/// every new output frame triggers another call.
const BURST: u32 = 64;
/// Extra rounds a lock holder makes when someone kicked it meanwhile.
const ROUNDS: u32 = 3;

/// Copies the VM's frame into the next ring slot. Err(action) when it cannot be held.
#[inline(always)]
pub fn enqueue(ctx: &TcContext, cfg: &Config) -> Result<(), i32> {
    const SHOT: i32 = aya_ebpf::bindings::TC_ACT_SHOT as i32;
    let len = ctx.len() & 0xfff;
    if len < ETH_HLEN as u32 || len > MAX_FRAME as u32 {
        count(C_DROP_OVERSIZE);
        return Err(SHOT);
    }
    let st = seq_state().ok_or(SHOT)?;
    let ctl = HOLD_CTL.get_ptr_mut(0).ok_or(SHOT)?;
    // The frame depends on every log entry assigned so far: anything the VM could have
    // seen before producing it. (Conservative and exact enough: a few microseconds.)
    // SAFETY: live map value, aligned field.
    let dep = unsafe { load64(&(*st).last_seq) };
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
    for _ in 0..ROUNDS {
        // SAFETY: live map value, aligned fields.
        if unsafe { cmpxchg32(&mut (*ctl).lock, 0, 1) } != 0 {
            // SAFETY: as above.
            unsafe { xchg32(&mut (*ctl).kick, 1) };
            count(C_RELEASE_BUSY);
            return;
        }
        // SAFETY: as above.
        unsafe { xchg32(&mut (*ctl).kick, 0) };
        // SAFETY: as above.
        let acked = if gate {
            unsafe { load64(&(*st).acked) }
        } else {
            u64::MAX
        };
        release_locked(ctx, cfg, node, ctl, acked);
        // SAFETY: as above. Unlock, then look for a kick that arrived meanwhile.
        unsafe { xchg32(&mut (*ctl).lock, 0) };
        // SAFETY: as above.
        if unsafe { core::ptr::read_volatile(&(*ctl).kick) } == 0 {
            return;
        }
    }
}

/// Called with the lock held; must return (never bail out early past the unlock).
#[inline(always)]
fn release_locked(ctx: &TcContext, cfg: &Config, node: &NodeState, ctl: *mut HoldCtl, acked: u64) {
    let skb = ctx.skb.skb;
    for _ in 0..BURST {
        // SAFETY: live map value, aligned fields.
        let (hd, t) = unsafe { (load64(&(*ctl).head), load64(&(*ctl).tail)) };
        if hd == t {
            return;
        }
        let Some(slot) = HOLD.get_ptr((hd & cfg.hold_mask) as u32) else {
            return;
        };
        // SAFETY: live map value.
        let (ready, dep) = unsafe { (load64(&(*slot).ready), (*slot).dep) };
        if ready != hd + 1 || dep > acked || !lease_valid(node) {
            return;
        }
        // SAFETY: live map value.
        let (len, enq) = unsafe { ((*slot).len & 0xfff, (*slot).enq_ns) };
        if len >= ETH_HLEN as u32 && len <= MAX_FRAME as u32 {
            // SAFETY: helper calls on our own skb; `len` bytes of the slot are readable.
            let ok = unsafe {
                h::bpf_skb_change_tail(skb, len, 0) == 0
                    && h::bpf_skb_store_bytes(skb, 0, (*slot).data.as_ptr() as *const _, len, 0)
                        == 0
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
    }
}

#[inline(always)]
fn hist(ns: u64) {
    let mut us = ns / 1000;
    let mut b: u32 = 0;
    for _ in 0..(HIST_BUCKETS - 1) {
        if us == 0 {
            break;
        }
        us >>= 1;
        b += 1;
    }
    count_hist(b);
}

#[inline(always)]
fn count_hist(b: u32) {
    if let Some(p) = HOLD_HIST.get_ptr_mut(b) {
        // SAFETY: per-CPU slot.
        unsafe { *p += 1 };
    }
}
