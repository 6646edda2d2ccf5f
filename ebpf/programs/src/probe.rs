//! Benchmark-only programs (perf/dataplane): the kernel-to-kernel round trip on the
//! logging link. Never attached by ftd.
//!
//! | program            | hook                          | host                    |
//! |--------------------|-------------------------------|-------------------------|
//! | `ft_probe_stamp`   | tc egress, logging NIC        | A (sender)              |
//! | `ft_probe_reflect` | XDP, logging NIC              | B (reflector)           |
//! | `ft_probe_rx`      | XDP, logging NIC              | A (sender)              |
//!
//! The frame format and the protocol are in `ft_common::probe`. Frames of any other
//! EtherType pass untouched, so the programs are harmless on a link that also carries
//! other traffic. Both XDP programs need the logging NIC's XDP hook, which `ft_log_rx`
//! holds while ftd runs: the benchmark measures with them between its appliance rounds.
use aya_ebpf::{
    bindings::{TC_ACT_OK, xdp_action},
    helpers::generated as h,
    macros::{classifier, map, xdp},
    maps::PerCpuArray,
    programs::{TcContext, XdpContext},
};
use ft_common::probe::*;

/// Per-CPU event counts (`ft_common::probe::PS_*`), read by the benchmark to tell a
/// probe that was lost from one that crossed a hook without its program.
#[map]
pub static PROBE_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(PROBE_STATS_SLOTS, 0);

#[inline(always)]
fn stat(idx: u32) {
    if let Some(p) = PROBE_STATS.get_ptr_mut(idx) {
        // SAFETY: per-CPU slot: no other writer while this program runs on this CPU.
        unsafe { *p += 1 };
    }
}

/// The probe frame at the start of an XDP buffer, if the frame is one.
#[inline(always)]
fn xdp_probe(ctx: &XdpContext) -> Option<*mut ProbeFrame> {
    let data = ctx.data();
    if data + PROBE_LEN > ctx.data_end() {
        return None;
    }
    let p = data as *mut ProbeFrame;
    // SAFETY: PROBE_LEN bytes at `data` are inside the packet (checked above) and
    // ProbeFrame is Unaligned (every field is bytes or a byte-order wrapper).
    let f = unsafe { &*p };
    (f.ethertype.get() == ETHERTYPE_PROBE && f.magic.get() == PROBE_MAGIC).then_some(p)
}

/// Host A, tc egress on the logging NIC: stamps the departure time into outgoing probes.
#[classifier]
pub fn ft_probe_stamp(ctx: TcContext) -> i32 {
    match try_probe_stamp(&ctx) {
        Ok(a) | Err(a) => a,
    }
}

fn try_probe_stamp(ctx: &TcContext) -> Result<i32, i32> {
    const PASS: i32 = TC_ACT_OK as i32;
    let f: ProbeFrame = ctx.load(0).map_err(|_| PASS)?;
    if f.ethertype.get() != ETHERTYPE_PROBE || f.magic.get() != PROBE_MAGIC {
        return Ok(PASS);
    }
    if f.flags.get() & PROBE_REFLECTED != 0 {
        return Ok(PASS);
    }
    // Taken last, right before the frame is handed to the driver's xmit.
    // SAFETY: plain helper call.
    let now = unsafe { h::bpf_ktime_get_ns() };
    ctx.store(OFF_T_DEPART, &now.to_be_bytes(), 0)
        .map_err(|_| PASS)?;
    ctx.store(OFF_FLAGS, &(f.flags.get() | PROBE_STAMPED).to_be_bytes(), 0)
        .map_err(|_| PASS)?;
    stat(PS_STAMPED);
    Ok(PASS)
}

/// Host B, XDP on the logging NIC: sends probes straight back (MACs swapped).
#[xdp]
pub fn ft_probe_reflect(ctx: XdpContext) -> u32 {
    match try_probe_reflect(&ctx) {
        Ok(a) | Err(a) => a,
    }
}

fn try_probe_reflect(ctx: &XdpContext) -> Result<u32, u32> {
    let p = xdp_probe(ctx).ok_or(xdp_action::XDP_PASS)?;
    // SAFETY: `p` is a bounds-checked probe frame inside the packet (xdp_probe); this
    // program is the only code touching the buffer until it returns.
    let f = unsafe { &mut *p };
    if f.flags.get() & PROBE_REFLECTED != 0 {
        return Ok(xdp_action::XDP_PASS);
    }
    core::mem::swap(&mut f.dst, &mut f.src);
    f.flags.set(f.flags.get() | PROBE_REFLECTED);
    stat(PS_REFLECTED);
    Ok(xdp_action::XDP_TX)
}

/// Host A, XDP on the logging NIC: completes the round trip of a reflected probe and
/// passes it up to the sender's packet socket.
#[xdp]
pub fn ft_probe_rx(ctx: XdpContext) -> u32 {
    match try_probe_rx(&ctx) {
        Ok(a) | Err(a) => a,
    }
}

fn try_probe_rx(ctx: &XdpContext) -> Result<u32, u32> {
    // SAFETY: plain helper call; read first, before any other work on the frame.
    let now = unsafe { h::bpf_ktime_get_ns() };
    let p = xdp_probe(ctx).ok_or(xdp_action::XDP_PASS)?;
    // SAFETY: as in try_probe_reflect.
    let f = unsafe { &mut *p };
    let flags = f.flags.get();
    if flags & PROBE_REFLECTED == 0 {
        return Ok(xdp_action::XDP_PASS);
    }
    if flags & PROBE_STAMPED == 0 {
        stat(PS_UNSTAMPED);
        return Ok(xdp_action::XDP_PASS);
    }
    f.rtt_ns.set(now.wrapping_sub(f.t_depart.get()));
    f.flags.set(flags | PROBE_MEASURED);
    stat(PS_MEASURED);
    Ok(xdp_action::XDP_PASS)
}
