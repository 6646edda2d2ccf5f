//! The appliance's kernel data plane. See ARCHITECTURE.md for the packet path, the log
//! path and the map owners. Programs:
//!
//! | program            | hook                         | role(s)            |
//! |--------------------|------------------------------|--------------------|
//! | `ft_client_rx`     | XDP, client NIC              | all                |
//! | `ft_strip`         | XDP in DEVMAP (VM side copy) | primary            |
//! | `ft_log_rx`        | XDP, logging NIC             | all                |
//! | `ft_log_tc`        | tc ingress, logging NIC      | primary (release)  |
//! | `ft_vm_tc`         | tc ingress, VM-side NIC      | all (hold/suppress)|
//! | `ft_release_more`  | tail call from the releasers | primary/solo       |
//! | `ft_client_egress` | tc egress, client NIC        | all (fence guard)  |
#![no_std]
#![no_main]
// BPF has atomics but no `core::sync::atomic` types on this target (atomic-cas=false in
// the target spec): use the intrinsics, which lower to BPF_ATOMIC instructions.
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod hold;
mod mac;
mod probe;
mod shared;

use aya_ebpf::{
    bindings::{BPF_F_BROADCAST, TC_ACT_OK, TC_ACT_SHOT, xdp_action},
    helpers::generated as h,
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use aya_log_ebpf::warn;
use ft_common::{maps::*, wire::*};

use shared::*;

// ------------------------------------------------------------------------------------
// Client NIC ingress: duplicate frames for the VM into the log (primary), deliver to the
// VM only (solo), or drop them (backup/standby: the backup's VM is fed from the log).
// ------------------------------------------------------------------------------------

#[xdp]
pub fn ft_client_rx(ctx: XdpContext) -> u32 {
    match try_client_rx(&ctx) {
        Ok(a) | Err(a) => a,
    }
}

fn try_client_rx(ctx: &XdpContext) -> Result<u32, u32> {
    let cfg = config().ok_or(xdp_action::XDP_PASS)?;
    let node = node().ok_or(xdp_action::XDP_PASS)?;
    let data = ctx.data();
    let end = ctx.data_end();
    if data + ETH_HLEN > end {
        return Ok(xdp_action::XDP_PASS);
    }
    let ethertype = read_be16(data + 12);
    if ethertype == ETHERTYPE_FT {
        // Log frames and acks never come from the client network.
        count(C_DROP_CLIENT_FT);
        return Ok(xdp_action::XDP_DROP);
    }
    if !frame_is_for_vm(data, end, ethertype, cfg) {
        return Ok(xdp_action::XDP_PASS);
    }
    count(C_CLIENT_RX_VM);
    match node.role {
        ROLE_PRIMARY => duplicate(ctx, cfg, node),
        ROLE_SOLO => {
            count(C_SOLO_DELIVERED);
            // SAFETY: plain helper call; an invalid ifindex makes it return XDP_ABORTED.
            Ok(unsafe { h::bpf_redirect(cfg.vm_ifindex, 0) } as u32)
        }
        ROLE_BACKUP => {
            count(C_DROP_BACKUP_CLIENT_IN);
            Ok(xdp_action::XDP_DROP)
        }
        _ => {
            count(C_DROP_STANDBY);
            Ok(xdp_action::XDP_DROP)
        }
    }
}

/// Unicast to the VM's MAC, or an ARP request for the VM's IPv4 address.
#[inline(always)]
fn frame_is_for_vm(data: usize, end: usize, ethertype: u16, cfg: &Config) -> bool {
    if mac_eq(data, &cfg.vm_mac) {
        return true;
    }
    if ethertype != ETHERTYPE_ARP || data + ETH_HLEN + 28 > end {
        return false;
    }
    // ARP target protocol address at offset 24 of the ARP header.
    let tpa = data + ETH_HLEN + 24;
    // SAFETY: bounds checked above (data + 42 <= end).
    unsafe {
        *(tpa as *const u8) == cfg.vm_ipv4[0]
            && *((tpa + 1) as *const u8) == cfg.vm_ipv4[1]
            && *((tpa + 2) as *const u8) == cfg.vm_ipv4[2]
            && *((tpa + 3) as *const u8) == cfg.vm_ipv4[3]
    }
}

/// Primary: assign the next sequence number, keep a copy for retransmission, prepend the
/// log header and broadcast the frame to the VM side (header stripped by `ft_strip`) and
/// to the logging NIC.
#[inline(always)]
fn duplicate(ctx: &XdpContext, cfg: &Config, node: &NodeState) -> Result<u32, u32> {
    let seq = seq_state().ok_or(xdp_action::XDP_DROP)?;
    let len = xdp_len(ctx);
    if len > MAX_FRAME as u32 {
        count(C_DROP_OVERSIZE);
        return Ok(xdp_action::XDP_DROP);
    }
    // Back-pressure: never let more entries be in flight than the store keeps.
    // SAFETY: `seq` points into a live map value; fields are 8-byte aligned.
    let (last, acked) = unsafe { (load64(&(*seq).last_seq), load64(&(*seq).acked)) };
    if last.wrapping_sub(acked) >= cfg.window {
        count(C_DROP_WINDOW_FULL);
        return Ok(xdp_action::XDP_DROP);
    }
    // SAFETY: as above.
    let s = unsafe { fetch_add64(&mut (*seq).last_seq, 1) } + 1;
    let mut ft = FtHdr::new(KIND_LOG, cfg.session, node.epoch, s);
    ft.len.set(len as u16);
    // The entry's MAC, over its header and the client frame (still at the packet's
    // start); kept with the entry for a repair. (Cannot fail: `len` bytes are there.)
    // Without a key (the daemon sets one before it attaches) the entry goes out with
    // MAC 0, which the backup drops as bad_mac: never silently unauthenticated.
    let tag = match send_key() {
        Some((slot, id, adv)) => {
            (ft.key_id, ft.key_adv) = (id, adv);
            mac::packet_mac(ctx, slot, &mac_header_words(&ft), 0, len as usize).unwrap_or(0)
        }
        None => 0,
    };
    ft.aux.set(tag);
    store_retx(
        ctx,
        cfg,
        s,
        len,
        tag,
        ft.key_id as u32 | (ft.key_adv as u32) << 8,
    );

    // SAFETY: helper call on our own context.
    if unsafe { h::bpf_xdp_adjust_head(ctx.ctx, -(LOG_OVERHEAD as i32)) } != 0 {
        // No headroom: the VM still gets the frame; the backup repairs `s` by NACK.
        count(C_DROP_RETX_ERR);
        // SAFETY: plain helper call.
        return Ok(unsafe { h::bpf_redirect(cfg.vm_ifindex, 0) } as u32);
    }
    let data = ctx.data();
    if data + LOG_OVERHEAD > ctx.data_end() {
        return Ok(xdp_action::XDP_DROP);
    }
    let hdr = LogHdr {
        eth: EthHdr::ft(cfg.peer_log_mac, cfg.own_log_mac),
        ft,
    };
    // SAFETY: LOG_OVERHEAD bytes are in bounds (checked above); LogHdr is Unaligned.
    unsafe { core::ptr::write_unaligned(data as *mut LogHdr, hdr) };
    count(C_DUP_FRAMES);
    count_n(C_DUP_BYTES, len as u64);
    Ok(FANOUT
        .redirect(0, BPF_F_BROADCAST as u64)
        .unwrap_or(xdp_action::XDP_ABORTED))
}

/// Frame length (computing it from packet pointers trips the verifier's 32-bit rules).
#[inline(always)]
fn xdp_len(ctx: &XdpContext) -> u32 {
    // SAFETY: helper call on our own context.
    let n = unsafe { h::bpf_xdp_get_buff_len(ctx.ctx) } as u64;
    // Masked in 64 bits so the verifier knows the upper half is zero.
    (n & 0xffff) as u32
}

#[inline(always)]
fn store_retx(ctx: &XdpContext, cfg: &Config, s: u64, len: u32, tag: u64, key_ids: u32) {
    let Some(slot) = RETX.get_ptr_mut((s & cfg.retx_mask) as u32) else {
        return;
    };
    let n = len & 0x7ff;
    if n == 0 || n > SLOT_DATA as u32 {
        return;
    }
    // SAFETY: `slot` is a live map value of RETX; `n` <= SLOT_DATA bytes fit in `data`.
    unsafe {
        (*slot).seq = 0;
        if h::bpf_xdp_load_bytes(ctx.ctx, 0, (*slot).data.as_mut_ptr() as *mut _, n) == 0 {
            (*slot).len = n;
            (*slot).tag = tag;
            (*slot).key_ids = key_ids;
            store64(&mut (*slot).seq, s);
        }
    }
}

/// Devmap program for the VM-side copy: remove the log header again.
#[xdp(map = "devmap")]
pub fn ft_strip(ctx: XdpContext) -> u32 {
    // SAFETY: helper call on our own context.
    if unsafe { h::bpf_xdp_adjust_head(ctx.ctx, LOG_OVERHEAD as i32) } != 0 {
        return xdp_action::XDP_DROP;
    }
    xdp_action::XDP_PASS
}

// ------------------------------------------------------------------------------------
// Logging NIC ingress: acks and nacks (primary), log frames and heartbeats (backup).
// ------------------------------------------------------------------------------------

#[xdp]
pub fn ft_log_rx(ctx: XdpContext) -> u32 {
    match try_log_rx(&ctx) {
        Ok(a) | Err(a) => a,
    }
}

fn try_log_rx(ctx: &XdpContext) -> Result<u32, u32> {
    let cfg = config().ok_or(xdp_action::XDP_PASS)?;
    let node = node().ok_or(xdp_action::XDP_PASS)?;
    let data = ctx.data();
    let end = ctx.data_end();
    if data + ETH_HLEN > end || read_be16(data + 12) != ETHERTYPE_FT {
        return Ok(xdp_action::XDP_PASS);
    }
    if data + LOG_OVERHEAD > end {
        return drop(C_DROP_MALFORMED);
    }
    // SAFETY: LOG_OVERHEAD bytes are in bounds; LogHdr is Unaligned.
    let hdr = unsafe { &*(data as *const LogHdr) };
    if hdr.ft.magic != FT_MAGIC || hdr.ft.version != FT_VERSION {
        return drop(C_DROP_MALFORMED);
    }
    if !mac_eq(data + 6, &cfg.peer_log_mac) || !mac_eq(data, &cfg.own_log_mac) {
        if rare(C_DROP_BAD_PEER) {
            warn!(
                ctx,
                "logging link: frame from unexpected source {:mac} dropped", hdr.eth.src
            );
        }
        return drop(C_DROP_BAD_PEER);
    }
    if hdr.ft.epoch.get() != node.epoch {
        if rare(C_DROP_BAD_EPOCH) {
            warn!(
                ctx,
                "logging link: frame of epoch {} dropped (ours is {})",
                hdr.ft.epoch.get(),
                node.epoch
            );
        }
        return drop(C_DROP_BAD_EPOCH);
    }
    let kind = hdr.ft.kind;
    let fseq = hdr.ft.seq.get();
    let session = hdr.ft.session.get();
    let st = seq_state().ok_or(xdp_action::XDP_DROP)?;
    let ch = chan().ok_or(xdp_action::XDP_DROP)?;
    match node.role {
        ROLE_PRIMARY | ROLE_SOLO => {
            // Only answers to this run's log count (a restarted primary must not take
            // acks meant for its previous run).
            if session != cfg.session {
                if rare(C_DROP_BAD_SESSION) {
                    warn!(ctx, "logging link: frame of another session dropped");
                }
                return drop(C_DROP_BAD_SESSION);
            }
            // The backup's frames carry a tag (SipHash of the header under the channel
            // key): nothing about an ack, nack, VMNACK or LEAVE is believed before it
            // verifies. A forger on the link can copy the peer's MAC, the epoch, the
            // session and a plausible sequence, but not the tag.
            if kind_is_tagged(kind) && !tag_ok(data, end, &hdr.ft) {
                return bad_mac(ctx, kind);
            }
            match kind {
                KIND_ACK if node.role == ROLE_PRIMARY => {
                    on_ack(ctx, st, ch, fseq, hdr.ft.aux.get())
                }
                KIND_NACK if node.role == ROLE_PRIMARY => on_nack(ctx, cfg, node, st, fseq),
                // For the daemon (its retransmission store, its role controller).
                KIND_VMNACK => {
                    count(C_VMNACK_RX);
                    Ok(xdp_action::XDP_PASS)
                }
                KIND_LEAVE => {
                    count(C_LEAVE_RX);
                    Ok(xdp_action::XDP_PASS)
                }
                _ => drop(C_DROP_UNEXPECTED_KIND),
            }
        }
        ROLE_BACKUP => {
            // SAFETY: live map value, aligned field written by the daemon only.
            let peer = unsafe { load64(&(*ch).peer_session) };
            if peer != 0 && session != peer {
                if rare(C_DROP_BAD_SESSION) {
                    warn!(
                        ctx,
                        "logging link: frame of another primary session dropped"
                    );
                }
                return drop(C_DROP_BAD_SESSION);
            }
            let ka = kack().ok_or(xdp_action::XDP_DROP)?;
            let len = hdr.ft.len.get();
            match kind {
                KIND_LOG => {
                    if !payload_len_ok(len, data, end) {
                        return drop(C_DROP_MALFORMED);
                    }
                    if !log_mac_ok(ctx, &hdr.ft) {
                        return bad_mac(ctx, kind);
                    }
                    // SAFETY: live map values, aligned fields (`delivered` is written by
                    // the daemon; `input` raised atomically by both).
                    let (delivered, kin) =
                        unsafe { (load64(&(*ch).delivered), load64(&(*ka).input)) };
                    let held = delivered.max(kin & !KACK_STOP);
                    if fseq <= held {
                        return drop(C_DROP_DUP);
                    }
                    // Relative to what is buffered, not to what the daemon took from the
                    // ring: the primary's window moves with XDP's acks while the daemon
                    // may lag (or be stopped) with the frames safe in the ring.
                    if fseq - held > cfg.window + RETX_MARGIN {
                        return drop(C_DROP_SEQ_WINDOW);
                    }
                    buffer(ctx, len)?;
                    count(C_LOG_RX);
                    if hdr.ft.flags & FLAG_RETRANSMIT != 0 {
                        count(C_LOG_RX_RETRANSMIT);
                    }
                    // SAFETY: live map value, aligned fields.
                    let (f, t) = unsafe { (&mut (*ka).input, &mut (*ka).input_tx_ns) };
                    kernel_ack(ctx, cfg, node, ch, ka, f, t, fseq)
                }
                KIND_VMLOG => {
                    if !payload_len_ok(len, data, end) {
                        return drop(C_DROP_MALFORMED);
                    }
                    if !log_mac_ok(ctx, &hdr.ft) {
                        return bad_mac(ctx, kind);
                    }
                    heard_primary(st);
                    // SAFETY: live map value, aligned field raised atomically by both.
                    if fseq <= unsafe { load64(&(*ka).vm) } & !KACK_STOP {
                        return drop(C_DROP_DUP);
                    }
                    buffer(ctx, len)?;
                    count(C_VMLOG_RX);
                    // SAFETY: live map value, aligned fields.
                    let (f, t) = unsafe { (&mut (*ka).vm, &mut (*ka).vm_tx_ns) };
                    kernel_ack(ctx, cfg, node, ch, ka, f, t, fseq)
                }
                KIND_HEARTBEAT => {
                    // A heartbeat carries only its tag. One without the right tag is not
                    // a frame the primary's daemon made: it must not count as received
                    // nor stamp the primary alive (`last_peer_ns`).
                    if !tag_ok(data, end, &hdr.ft) {
                        return bad_mac(ctx, kind);
                    }
                    heard_primary(st);
                    // The whole frame, tag included: the daemon's parser sees what was sent.
                    buffer(ctx, TAG_LEN as u16)?;
                    count(C_HEARTBEAT_RX);
                    // A heartbeat flushes the acks XDP deferred (batching) without the
                    // daemon: every `heartbeat_ms` at the latest, even if it is stalled.
                    let Some(session) = kack_session(cfg, ch) else {
                        return Ok(xdp_action::XDP_DROP);
                    };
                    // SAFETY: live map value, aligned fields raised atomically by both.
                    let (input, vm) = unsafe { (load64(&(*ka).input), load64(&(*ka).vm)) };
                    if (input | vm) & KACK_STOP != 0 {
                        return Ok(xdp_action::XDP_DROP);
                    }
                    send_ack(ctx, cfg, node, session, input, vm)
                }
                _ => drop(C_DROP_UNEXPECTED_KIND),
            }
        }
        _ => drop(C_DROP_NOT_REPLICATING),
    }
}

/// A LOG or VMLOG frame's `len` is one the primary makes and the backup daemon's parser
/// (`wire::parse_log_frame`) accepts: at most `MAX_FRAME` and within the frame (the
/// caller checked that the `LOG_OVERHEAD` header bytes are in it).
#[inline(always)]
fn payload_len_ok(len: u16, data: usize, end: usize) -> bool {
    let len = len as usize;
    len <= MAX_FRAME && len <= end - data - LOG_OVERHEAD
}

/// The frame at `data` carries the right tag for its header: `len` = TAG_LEN and the
/// payload's first 8 bytes are `frame_tag(key, ft)`.
#[inline(always)]
fn tag_ok(data: usize, end: usize, ft: &FtHdr) -> bool {
    if ft.len.get() as usize != TAG_LEN || data + TAGGED_HLEN > end {
        return false;
    }
    // SAFETY: TAGGED_HLEN bytes are in bounds (checked above); TaggedHdr is Unaligned.
    let tag = unsafe { (*(data as *const TaggedHdr)).tag.get() };
    let Some(slot) = key_by_id(ft.key_id) else {
        return false;
    };
    let ok = tag == frame_tag(&slot_sip(slot), ft);
    if ok {
        heard_key_adv(ft.key_adv);
    }
    ok
}

/// A `LOG` or `VMLOG` frame (its `len` checked) carries the right MAC in `aux`.
#[inline(always)]
fn log_mac_ok(ctx: &XdpContext, ft: &FtHdr) -> bool {
    let Some(slot) = key_by_id(ft.key_id) else {
        return false;
    };
    let ok = mac::packet_mac(
        ctx,
        slot,
        &mac_header_words(ft),
        LOG_OVERHEAD,
        ft.len.get() as usize,
    ) == Some(ft.aux.get());
    if ok {
        heard_key_adv(ft.key_adv);
    }
    ok
}

/// A frame whose tag or MAC does not verify: dropped and counted, never believed.
#[inline(always)]
fn bad_mac(ctx: &XdpContext, kind: u8) -> Result<u32, u32> {
    if rare(C_DROP_BAD_MAC) {
        warn!(
            ctx,
            "logging link: frame (kind {}) with a wrong or missing tag dropped: forged, or the peer's channel.key_file differs",
            kind
        );
    }
    drop(C_DROP_BAD_MAC)
}

#[inline(always)]
fn drop(counter: u32) -> Result<u32, u32> {
    count(counter);
    Ok(xdp_action::XDP_DROP)
}

/// Backup: copy the log frame (headers and `len` payload bytes, checked in bounds by the
/// caller) into `LOG_RING` for the daemon: from here on it is buffered for replay. A full
/// ring drops the frame (counted); the daemon asks for it again when it sees the gap.
#[inline(always)]
fn buffer(ctx: &XdpContext, len: u16) -> Result<(), u32> {
    let n = LOG_OVERHEAD as u32 + len as u32;
    let ok = if n <= LOG_REC_SMALL as u32 {
        copy_to_ring::<LOG_REC_SMALL>(ctx, n)
    } else {
        copy_to_ring::<LOG_REC_LARGE>(ctx, n)
    };
    if !ok {
        return Err(drop(C_DROP_LOG_RING_FULL).unwrap_or(xdp_action::XDP_DROP));
    }
    Ok(())
}

/// Backup: the primary's daemon was heard (a heartbeat or a VMM-stream frame, valid so
/// far): `SEQ.last_peer_ns`, the one timestamp the daemon's liveness reads. Stamped
/// whether or not the frame fits the ring: a backup whose replay is behind (its ring
/// full) still hears a live primary. Input log frames never stamp it: the primary's XDP
/// duplicates client frames while its daemon and VM are frozen.
#[inline(always)]
fn heard_primary(st: *mut SeqState) {
    // SAFETY: live map value; plain store of a timestamp (readers load it atomically).
    unsafe { store64(&mut (*st).last_peer_ns, h::bpf_ktime_get_ns()) };
}

/// Reserves a `LogRec<N>`, copies the first `n` bytes of the frame into it and submits
/// it (the daemon is woken if it waits). False if the ring is full or the copy failed.
#[inline(always)]
fn copy_to_ring<const N: usize>(ctx: &XdpContext, n: u32) -> bool {
    // Through the stack, so that LLVM cannot drop the `n == 0` check it proves redundant
    // (`n` >= LOG_OVERHEAD) and the verifier, which does not track that, sees both bounds.
    let mut v = 0u64;
    // SAFETY: a local variable.
    unsafe { core::ptr::write_volatile(&mut v, n as u64) };
    // SAFETY: as above.
    let n = unsafe { core::ptr::read_volatile(&v) };
    if n == 0 || n > N as u64 {
        return false;
    }
    let n = n as u32;
    let Some(mut rec) = LOG_RING.reserve::<LogRec<N>>(0) else {
        return false;
    };
    let p = rec.as_mut_ptr();
    // SAFETY: `p` is the reserved record (N + 8 bytes, ours until submit/discard);
    // `1 <= n <= N`, so the copy stays inside `frame`; the caller checked that `n` bytes
    // are inside the packet.
    let copied = unsafe {
        (*p).len = n;
        (*p)._pad = 0;
        h::bpf_xdp_load_bytes(ctx.ctx, 0, (*p).frame.as_mut_ptr() as *mut _, n)
    };
    if copied != 0 {
        rec.discard(0);
        return false;
    }
    rec.submit(0);
    true
}

/// Backup: frame `fseq` of a stream is in `LOG_RING`. If it is the next in order (`*field`
/// was `fseq - 1`, not stopped) and the primary's session is known, raise the stream's
/// cumulative ack and turn this frame into that ack (both streams, tagged), sent back
/// out of the logging NIC (XDP_TX): the output rule's round trip stays in the kernel.
/// Otherwise the frame is done here (the daemon acks what it puts in order itself).
/// Batching: within `kack_interval_ns` of this stream's last ack sent, the ack is raised
/// but not sent (the daemon's next ack, one per wake-up, carries it).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn kernel_ack(
    ctx: &XdpContext,
    cfg: &Config,
    node: &NodeState,
    ch: *const ChanState,
    ka: *mut KernelAck,
    field: *mut u64,
    tx_ns: *mut u64,
    fseq: u64,
) -> Result<u32, u32> {
    let Some(session) = kack_session(cfg, ch) else {
        return Ok(xdp_action::XDP_DROP);
    };
    // SAFETY: `field` is an aligned u64 of the live KACK value. The record was submitted
    // before this compare-and-swap (a full barrier), so whoever reads the raised value
    // finds the frame in the ring. A stopped field (KACK_STOP set) never equals fseq - 1.
    if unsafe { cmpxchg64(field, fseq - 1, fseq) } != fseq - 1 {
        return Ok(xdp_action::XDP_DROP);
    }
    // SAFETY: plain helper call; `tx_ns` is an aligned field of the live KACK value
    // written by XDP only (two CPUs racing here may both send: harmless, acks are
    // cumulative).
    let now = unsafe { h::bpf_ktime_get_ns() };
    if now.wrapping_sub(unsafe { load64(tx_ns) }) < cfg.kack_interval_ns {
        count(C_KACK_DEFERRED);
        return Ok(xdp_action::XDP_DROP);
    }
    // SAFETY: as above.
    unsafe { store64(tx_ns, now) };
    // SAFETY: live map value, aligned fields raised atomically by both writers.
    let (input, vm) = unsafe { (load64(&(*ka).input), load64(&(*ka).vm)) };
    send_ack(ctx, cfg, node, session, input, vm)
}

/// The primary's session an ack from XDP names, if XDP may ack at all: kernel acks are
/// on (`CFG_KERNEL_ACKS`) and the daemon has chosen the primary run it follows.
#[inline(always)]
fn kack_session(cfg: &Config, ch: *const ChanState) -> Option<u64> {
    // SAFETY: live map value, aligned field written by the daemon.
    let session = unsafe { load64(&(*ch).peer_session) };
    (session != 0 && cfg.flags & CFG_KERNEL_ACKS != 0).then_some(session)
}

/// Rewrites the frame in place into the tagged cumulative ack (`input`, `vm`; a stop bit
/// cleared) of both streams and sends it back out of the logging NIC (`XDP_TX`).
#[inline(always)]
fn send_ack(
    ctx: &XdpContext,
    cfg: &Config,
    node: &NodeState,
    session: u64,
    input: u64,
    vm: u64,
) -> Result<u32, u32> {
    let cur = xdp_len(ctx) as i32;
    // SAFETY: helper call on our own context; shrinks the frame to an ack's size.
    if unsafe { h::bpf_xdp_adjust_tail(ctx.ctx, TAGGED_HLEN as i32 - cur) } != 0 {
        return drop(C_DROP_RETX_ERR);
    }
    let data = ctx.data();
    if data + TAGGED_HLEN > ctx.data_end() {
        return drop(C_DROP_RETX_ERR);
    }
    let mut ft = FtHdr::new(KIND_ACK, session, node.epoch, input & !KACK_STOP);
    ft.aux.set(vm & !KACK_STOP);
    ft.len.set(TAG_LEN as u16);
    let Some((slot, id, adv)) = send_key() else {
        return drop(C_DROP_RETX_ERR);
    };
    (ft.key_id, ft.key_adv) = (id, adv);
    let ack = TaggedHdr {
        eth: EthHdr::ft(cfg.peer_log_mac, cfg.own_log_mac),
        ft,
        tag: frame_tag(&slot_sip(slot), &ft).into(),
    };
    // SAFETY: TAGGED_HLEN bytes are in bounds (checked above); TaggedHdr is Unaligned.
    unsafe { core::ptr::write_unaligned(data as *mut TaggedHdr, ack) };
    count(C_KACK_SENT);
    Ok(xdp_action::XDP_TX)
}

/// Primary: a cumulative ack of both streams. Never beyond what was sent; advances
/// `acked` and `vm_acked` monotonically. The frame is passed on to `ft_log_tc`, which
/// releases held output.
#[inline(always)]
fn on_ack(
    ctx: &XdpContext,
    st: *mut SeqState,
    ch: *const ChanState,
    ack: u64,
    vm_ack: u64,
) -> Result<u32, u32> {
    // SAFETY: live map values, aligned fields (`vm_last` is written by the daemon).
    let (last, vm_last) = unsafe { (load64(&(*st).last_seq), load64(&(*ch).vm_last)) };
    if ack > last || vm_ack > vm_last {
        if rare(C_DROP_ACK_BEYOND) {
            warn!(
                ctx,
                "logging link: ack {}/{} beyond what was sent ({}/{}) dropped",
                ack,
                vm_ack,
                last,
                vm_last
            );
        }
        return drop(C_DROP_ACK_BEYOND);
    }
    // SAFETY: as above (`acked` and `vm_acked` are kernel-owned).
    let advanced = unsafe { advance(&mut (*st).acked, ack) | advance(&mut (*st).vm_acked, vm_ack) };
    count(if advanced { C_ACK_RX } else { C_ACK_STALE });
    // SAFETY: as above.
    unsafe { store64(&mut (*st).last_peer_ns, h::bpf_ktime_get_ns()) };
    Ok(xdp_action::XDP_PASS)
}

/// Raises `*p` to `v` if it is lower (compare-and-swap, bounded retries). True if raised.
///
/// # Safety
/// `p` points to an aligned u64 of a live map value.
#[inline(always)]
unsafe fn advance(p: *mut u64, v: u64) -> bool {
    for _ in 0..8 {
        // SAFETY: guaranteed by the caller.
        let cur = unsafe { load64(p) };
        if v <= cur {
            return false;
        }
        // SAFETY: as above.
        if unsafe { cmpxchg64(p, cur, v) } == cur {
            return true;
        }
    }
    false
}

/// Primary: the backup misses entry `want`. Rewrite the nack frame in place into the
/// stored log frame and send it back out of the logging NIC (XDP_TX): repair without
/// leaving the kernel. The backup pads nacks to a full log frame, so this only shrinks
/// the frame (growing depends on driver tailroom and may fail; that is counted).
#[inline(always)]
fn on_nack(
    ctx: &XdpContext,
    cfg: &Config,
    node: &NodeState,
    st: *mut SeqState,
    want: u64,
) -> Result<u32, u32> {
    count(C_NACK_RX);
    // SAFETY: live map value, aligned fields.
    let (last, acked) = unsafe { (load64(&(*st).last_seq), load64(&(*st).acked)) };
    if want == 0 || want > last || want <= acked {
        return drop(C_DROP_NACK_INVALID);
    }
    let slot = RETX
        .get_ptr((want & cfg.retx_mask) as u32)
        .ok_or(xdp_action::XDP_DROP)?;
    // SAFETY: live map value.
    let (sseq, slen, tag, key_ids) = unsafe {
        (
            load64(&(*slot).seq),
            (*slot).len,
            (*slot).tag,
            (*slot).key_ids,
        )
    };
    let n = slen & 0x7ff;
    if sseq != want || n == 0 || n > SLOT_DATA as u32 {
        if rare(C_DROP_RETX_MISS) {
            warn!(
                ctx,
                "nack for entry {} not in the retransmission store", want
            );
        }
        return drop(C_DROP_RETX_MISS);
    }
    let cur = xdp_len(ctx) as i32;
    let delta = (LOG_OVERHEAD as i32 + n as i32) - cur;
    // SAFETY: helper calls on our own context; `n` bytes are readable from the slot.
    unsafe {
        if h::bpf_xdp_adjust_tail(ctx.ctx, delta) != 0 {
            return drop(C_DROP_RETX_ERR);
        }
        if h::bpf_xdp_store_bytes(
            ctx.ctx,
            LOG_OVERHEAD as u32,
            (*slot).data.as_ptr() as *mut _,
            n,
        ) != 0
        {
            return drop(C_DROP_RETX_ERR);
        }
    }
    let data = ctx.data();
    if data + LOG_OVERHEAD > ctx.data_end() {
        return drop(C_DROP_RETX_ERR);
    }
    let mut ft = FtHdr::new(KIND_LOG, cfg.session, node.epoch, want);
    ft.flags = FLAG_RETRANSMIT;
    ft.len.set(n as u16);
    // The MAC it was first sent with (it does not cover FLAG_RETRANSMIT), and the key
    // ids it covers.
    (ft.key_id, ft.key_adv) = (key_ids as u8, (key_ids >> 8) as u8);
    ft.aux.set(tag);
    let hdr = LogHdr {
        eth: EthHdr::ft(cfg.peer_log_mac, cfg.own_log_mac),
        ft,
    };
    // SAFETY: in bounds (checked above); LogHdr is Unaligned.
    unsafe { core::ptr::write_unaligned(data as *mut LogHdr, hdr) };
    count(C_RETX_SENT);
    Ok(xdp_action::XDP_TX)
}

/// Primary: an ack that `ft_log_rx` validated and passed up. Use it as the carrier that
/// releases held output frames, then consume it. Other frames `ft_log_rx` passed up
/// (VMNACK, LEAVE) go on to the daemon.
#[classifier]
pub fn ft_log_tc(ctx: TcContext) -> i32 {
    let Some(node) = node() else {
        return TC_ACT_OK as i32;
    };
    if node.role != ROLE_PRIMARY && node.role != ROLE_SOLO {
        return TC_ACT_OK as i32;
    }
    let Ok(et) = ctx.load::<[u8; 2]>(12) else {
        return TC_ACT_OK as i32;
    };
    if u16::from_be_bytes(et) != ETHERTYPE_FT {
        return TC_ACT_OK as i32;
    }
    if let Ok(KIND_ACK) = ctx.load::<u8>(ETH_HLEN + 2) {
        hold::release(&ctx);
        return TC_ACT_SHOT as i32;
    }
    // VMNACK and LEAVE (validated by ft_log_rx): on to the daemon's packet socket.
    TC_ACT_OK as i32
}

// ------------------------------------------------------------------------------------
// VM-side NIC ingress (frames the VM emits): hold them until acked (primary/solo), or
// suppress them (backup/standby).
// ------------------------------------------------------------------------------------

#[classifier]
pub fn ft_vm_tc(ctx: TcContext) -> i32 {
    match try_vm_tc(&ctx) {
        Ok(a) | Err(a) => a,
    }
}

fn try_vm_tc(ctx: &TcContext) -> Result<i32, i32> {
    let node = node().ok_or(TC_ACT_SHOT as i32)?;
    if node.role != ROLE_PRIMARY && node.role != ROLE_SOLO {
        count(C_VM_OUT_SUPPRESSED);
        return Ok(TC_ACT_SHOT as i32);
    }
    let cfg = config().ok_or(TC_ACT_SHOT as i32)?;
    // A logging-link frame on the VM NIC is the daemon's kick (after a role change, e.g.
    // to Solo, it drains the ring without waiting for the VM's next output): run a
    // release pass, emit nothing of it. (A VM that sends one only triggers a pass that
    // follows the same rule.)
    if let Ok(et) = ctx.load::<[u8; 2]>(12)
        && u16::from_be_bytes(et) == ETHERTYPE_FT
    {
        count(C_RELEASE_KICK);
        hold::release(ctx);
        return Ok(TC_ACT_SHOT as i32);
    }
    hold::enqueue(ctx, cfg)?;
    hold::release(ctx);
    Ok(TC_ACT_SHOT as i32)
}

/// Continuation of a release that filled all its passes (tail call from `ft_vm_tc`,
/// `ft_log_tc` or itself, same skb as carrier).
#[classifier]
pub fn ft_release_more(ctx: TcContext) -> i32 {
    hold::release(&ctx);
    TC_ACT_SHOT as i32
}

// ------------------------------------------------------------------------------------
// Client NIC egress: the fence guard. Nothing sourced from the VM's MAC leaves unless this
// node is live and holds a valid lease — independent of userspace.
// ------------------------------------------------------------------------------------

#[classifier]
pub fn ft_client_egress(ctx: TcContext) -> i32 {
    let (Some(cfg), Some(node)) = (config(), node()) else {
        return TC_ACT_OK as i32;
    };
    let Ok(src) = ctx.load::<[u8; 6]>(6) else {
        return TC_ACT_OK as i32;
    };
    if !mac6_eq(&src, &cfg.vm_mac) {
        return TC_ACT_OK as i32;
    }
    if (node.role == ROLE_PRIMARY || node.role == ROLE_SOLO) && lease_valid(node) {
        return TC_ACT_OK as i32;
    }
    count(C_DROP_FENCED_EGRESS);
    TC_ACT_SHOT as i32
}

// ------------------------------------------------------------------------------------
// Test infrastructure: the testbed's wire.
// ------------------------------------------------------------------------------------

/// Passes every frame. Never attached by ftd: the namespace testbed attaches it to the
/// veth ends of its logging "wire". On this kernel a veth flushes frames that an XDP
/// program sent into it (`XDP_TX` on the far end, e.g. the backup's kernel acks) only if
/// the receiving veth runs an XDP program itself: with GRO alone they waited in its ring
/// until some other frame arrived, and were lost once it was full. A physical NIC sends
/// `XDP_TX` frames from its own TX ring and needs nothing of the kind.
#[xdp]
pub fn ft_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
