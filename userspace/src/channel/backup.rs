//! Backup: receive of log frames (XDP `ft_log_rx` copies every validated frame into the
//! BPF ring buffer `LOG_RING` and acks in-order frames itself), in-order delivery to the
//! VM side, and the acks and nacks XDP does not send.
//!
//! Why a ring buffer and not AF_XDP: an entry may be acked only once it is buffered for
//! replay, and XDP cannot know whether a frame it redirects to an AF_XDP socket reaches
//! the socket's ring (a full ring drops it after the program returned). A record XDP
//! reserved and submitted in `LOG_RING` is buffered when the program continues, so XDP
//! can turn the frame into the ack at once (`XDP_TX`) and the output rule's round trip
//! never waits for this thread. The price is one copy of each frame in XDP.
use std::{
    os::fd::AsRawFd,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use ft_common::{maps::LOG_REC_HDR, wire::*};
use tracing::{debug, info, warn};

use super::{
    frames::{control_frame, hdr},
    keys::ChannelKeys,
    reorder::{Outcome, Reorder},
    status::ChannelStatus,
};
use crate::{dataplane::DataPlane, netif::RawSocket, role::Roles};

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("the log ring (LOG_RING) was already taken by another receive loop: a bug, report it")]
    RingTaken,
    #[error(
        "opening the ack socket on logging NIC {iface} failed ({error}); the daemon needs root"
    )]
    Socket {
        iface: String,
        error: crate::netif::NetifError,
    },
}

/// Where in-order input frames go: the replaying VMM's frame store, or an external VM.
pub trait InputSink: Send {
    /// `log_frame` is the whole log frame (headers + client frame), in sequence order.
    /// An error means the frame is not held: the ack stops before it for good.
    fn deliver(&mut self, seq: u64, log_frame: &[u8]) -> std::io::Result<()>;
}

/// Where in-order VMLOG frames go: the replaying VMM (none for an external VM).
pub trait VmFeed: Send {
    /// The entries of VMLOG frame `seq` (whole entries back to back), in sequence order,
    /// without waiting for the replay. An error means they are not buffered for replay
    /// (the VMM stopped, or the frame is malformed): the VMM-stream ack stops before this
    /// frame for good.
    fn deliver(&mut self, seq: u64, entries: &[u8]) -> Result<(), String>;
    /// Moves what waits in front of the replay on, as far as it has room (called every
    /// round of the loop, also when nothing arrived).
    fn pump(&mut self) -> Result<(), String>;
    /// The replay is behind: take nothing more from the kernel's ring for now (the
    /// ring fills and the backup's XDP stops acking: back-pressure on the primary).
    fn backlogged(&self) -> bool;
}

/// Stand-in VM / plain NIC: send the frame out of the VM-side interface (with the log
/// header when the VM reads tagged input).
pub struct RawSink {
    pub sock: RawSocket,
    pub tagged: bool,
}

impl InputSink for RawSink {
    fn deliver(&mut self, _seq: u64, log_frame: &[u8]) -> std::io::Result<()> {
        let frame = if self.tagged {
            log_frame
        } else {
            &log_frame[LOG_OVERHEAD.min(log_frame.len())..]
        };
        // A full device queue is transient: wait for it rather than lose an entry (a lost
        // input would make the replica diverge). Bounded: ~50 ms, then report the error.
        let mut tries = 0;
        loop {
            match self.sock.send(frame) {
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) && tries < 1000 => {
                    tries += 1;
                    std::thread::sleep(Duration::from_micros(50));
                }
                r => return r,
            }
        }
    }
}

/// Where the backup's two streams begin: sequence 1 for a log that starts with the VM's
/// boot; after a join by state transfer, the positions of the cut. Set once by whoever
/// knows (the VMM thread); the receive loop waits for it before it delivers anything.
#[derive(Default)]
pub struct StreamStart {
    pos: std::sync::Mutex<Option<(u64, u64)>>,
}

impl StreamStart {
    pub fn set(&self, input: u64, vm: u64) {
        *self.pos.lock().unwrap_or_else(|e| e.into_inner()) = Some((input, vm));
    }

    /// The start, once set; None if `stop` came first.
    fn wait(&self, stop: &AtomicBool) -> Option<(u64, u64)> {
        loop {
            if let Some(p) = *self.pos.lock().unwrap_or_else(|e| e.into_inner()) {
                return Some(p);
            }
            if stop.load(Relaxed) {
                return None;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

pub struct BackupParams {
    pub own_mac: [u8; 6],
    pub peer_mac: [u8; 6],
    /// Tags the acks and nacks (the primary's XDP drops frames without the right tag).
    pub keys: Arc<ChannelKeys>,
    pub heartbeat: Duration,
    pub nack_retry: Duration,
    pub nack_burst: usize,
    pub max_pending: u64,
    /// Where the streams begin (frames that arrive before it is known wait in the
    /// socket's ring, or are dropped and asked for again).
    pub start: Arc<StreamStart>,
}

/// Runs the backup receive loop on the calling thread until `stop` is set.
///
/// XDP (`ft_log_rx`) copies every valid log frame into `LOG_RING` and acks the frames
/// that arrive in order itself; this loop drains the ring, puts both streams in order
/// (repairs gaps with NACK/VMNACK), hands them on, raises the kernel's acks to what it
/// holds in order and sends a cumulative ack once per wake-up when it moved (covering
/// acks XDP deferred and repaired gaps) and as a keep-alive. It never waits for the
/// replay: when the replay is behind it stops draining the ring (back-pressure) and goes
/// on sending keep-alives, so its primary sees a slow backup, not a dead one.
#[allow(clippy::too_many_arguments)]
pub fn run(
    dp: Arc<DataPlane>,
    params: BackupParams,
    mut sink: Box<dyn InputSink>,
    mut feed: Option<Box<dyn VmFeed>>,
    status: Arc<ChannelStatus>,
    roles: Arc<Roles>,
    stop: Arc<AtomicBool>,
) -> Result<(), BackupError> {
    let iface = dp.nics.logging.clone();
    let mut ring = dp.take_log_ring().ok_or(BackupError::RingTaken)?;
    let out = RawSocket::open(&iface).map_err(|e| BackupError::Socket {
        iface: iface.name.clone(),
        error: e,
    })?;
    info!(iface = %iface.name, "backup: receiving the log from XDP's ring buffer; XDP acks in-order frames");

    let Some((input0, vm0)) = params.start.wait(&stop) else {
        return Ok(());
    };
    if input0 > 1 {
        info!(
            input0,
            vm0, "backup: the log starts at the cut of a state transfer"
        );
    }
    dp.kack_start(input0 - 1, vm0 - 1);
    let mut rx_state = RxState {
        input: Reorder::new(input0, params.max_pending),
        vm: Reorder::new(vm0, params.max_pending),
        input_ack: input0 - 1,
        vm_ack: vm0 - 1,
        input_failed: false,
        vm_failed: false,
    };
    let mut last_ack_sent = ((0u64, 0u64), Instant::now() - params.heartbeat);
    let poll_ms = params.heartbeat.as_millis().clamp(1, 100) as i32;
    let send = |frame: &[u8], counter: &std::sync::atomic::AtomicU64| match out.send(frame) {
        Ok(()) => ChannelStatus::inc(counter),
        Err(e) => {
            ChannelStatus::inc(&status.send_errors);
            debug!("logging-link send failed: {e}");
        }
    };
    while !stop.load(Relaxed) {
        if let Some(f) = feed.as_mut()
            && let Err(e) = f.pump()
        {
            rx_state.fail_vm(&status, &e);
        }
        if feed.as_ref().is_some_and(|f| f.backlogged()) {
            // The replay is behind: leave the frames in the ring (it fills, XDP stops
            // acking and the primary waits), and come back soon to move the backlog on.
            std::thread::sleep(Duration::from_millis(1));
        } else {
            let mut pfd = libc::pollfd {
                fd: ring.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd for the duration of the call.
            unsafe { libc::poll(&mut pfd, 1, poll_ms) };
        }
        let now = Instant::now();
        let before = rx_state.input_ack;
        for _ in 0..DRAIN_MAX {
            if feed.as_ref().is_some_and(|f| f.backlogged()) {
                break;
            }
            let Some(item) = ring.next() else { break };
            let Some(frame) = record_frame(&item) else {
                continue; // cannot happen: XDP writes len <= the record's size
            };
            handle_frame(frame, &dp, &mut rx_state, sink.as_mut(), &mut feed, &status);
        }
        let epoch = roles.epoch();
        if epoch == 0 {
            continue; // epoch not known yet (XDP drops log frames until it is)
        }
        let held = (rx_state.input_ack, rx_state.vm_ack);
        if held.0 != before {
            dp.set_delivered(held.0);
        }
        let session = status.peer_session.load(Relaxed);
        status.delivered.store(held.0, Relaxed);
        status.vm_delivered.store(held.1, Relaxed);
        status.high.store(rx_state.input.high(), Relaxed);
        status.vm_high.store(rx_state.vm.high(), Relaxed);
        status.buffered.store(
            (rx_state.input.buffered() + rx_state.vm.buffered()) as u64,
            Relaxed,
        );
        if (rx_state.input_failed || rx_state.vm_failed)
            && !status.delivery_failed.swap(true, Relaxed)
        {
            // XDP may have acked frames after the one that failed: this replica can no
            // longer stand for what was acked, so it must never go live.
            stop_confirming(&dp, &status);
            warn!(
                "backup: a delivery failed: this replica stops confirming the log and can no longer take over"
            );
        }
        if status.stop_acking.load(Relaxed) {
            // This replica failed or takes over; `stop_confirming` stopped XDP's acks.
            continue;
        }
        if session == 0 {
            continue; // no primary run heard yet: an ack would name no session
        }
        // Raise the kernel's acks to what is held in order here (after a repaired gap XDP
        // resumes from there). The ack to send covers both; the daemon sends one when it
        // moved since the last one it sent (once per wake-up: it carries the acks XDP
        // deferred) and as a keep-alive.
        let (k_in, k_vm) = dp.kack_raise(held.0, held.1);
        let acked = (held.0.max(k_in), held.1.max(k_vm));
        if acked != last_ack_sent.0 || now.duration_since(last_ack_sent.1) >= params.heartbeat {
            let f = control_frame(
                &params.keys,
                params.own_mac,
                params.peer_mac,
                hdr(KIND_ACK, session, epoch, acked.0, acked.1),
            );
            send(&f, &status.acks_sent);
            last_ack_sent = (acked, now);
        }
        let nacks = rx_state
            .input
            .nacks(now, params.nack_retry, params.nack_burst)
            .into_iter()
            .map(|s| (KIND_NACK, s));
        let vm_nacks = rx_state
            .vm
            .nacks(now, params.nack_retry, params.nack_burst)
            .into_iter()
            .map(|s| (KIND_VMNACK, s));
        for (kind, s) in nacks.chain(vm_nacks) {
            let f = control_frame(
                &params.keys,
                params.own_mac,
                params.peer_mac,
                hdr(kind, session, epoch, s, 0),
            );
            send(&f, &status.nacks_sent);
        }
    }
    Ok(())
}

/// Records drained per wake-up at most (the loop then acks, nacks and checks liveness
/// before it drains more).
const DRAIN_MAX: usize = 4096;

/// The log frame in a `LOG_RING` record (`LogRec`: `len`, padding, frame bytes).
fn record_frame(rec: &[u8]) -> Option<&[u8]> {
    let len = u32::from_ne_bytes(rec.get(..4)?.try_into().ok()?) as usize;
    rec.get(LOG_REC_HDR..LOG_REC_HDR + len)
}

/// This replica confirms nothing more, for good (it takes over, or it failed): the
/// daemon's acks stop and XDP's too. Returns the last acks anybody sent: every frame up
/// to them is in the ring or already held, so draining the ring delivers all of it.
pub fn stop_confirming(dp: &DataPlane, status: &ChannelStatus) -> (u64, u64) {
    status.stop_acking.store(true, Relaxed);
    dp.kack_stop()
}

/// Receive state of both streams. An ack never covers a frame that was not delivered:
/// once a delivery fails the stream's ack stays where it was.
struct RxState {
    input: Reorder,
    vm: Reorder,
    input_ack: u64,
    vm_ack: u64,
    input_failed: bool,
    vm_failed: bool,
}

impl RxState {
    /// The VMM stream can no longer be handed on (the replay is gone).
    fn fail_vm(&mut self, status: &ChannelStatus, why: &str) {
        if !self.vm_failed {
            self.vm_failed = true;
            ChannelStatus::inc(&status.vm_deliver_errors);
            warn!("the replay feed failed ({why}): VMM-stream acks stop here");
        }
    }
}

fn handle_frame(
    frame: &[u8],
    dp: &DataPlane,
    st: &mut RxState,
    sink: &mut dyn InputSink,
    feed: &mut Option<Box<dyn VmFeed>>,
    status: &ChannelStatus,
) {
    // XDP validated peer, epoch and header; parse defensively anyway.
    let Ok((hdr, payload)) = parse_log_frame(frame) else {
        return;
    };
    // The first frame tells which primary run we follow; from then on XDP drops frames
    // of any other session.
    let session = hdr.ft.session.get();
    if status.peer_session.load(Relaxed) == 0 && session != 0 {
        status.peer_session.store(session, Relaxed);
        dp.set_peer_session(session);
        info!("following the primary's session {session:#018x}");
    }
    let seq = hdr.ft.seq.get();
    let outcome = match hdr.ft.kind {
        KIND_HEARTBEAT => {
            st.input.on_heartbeat(seq);
            st.vm.on_heartbeat(hdr.ft.aux.get());
            return;
        }
        KIND_LOG => {
            let (ack, failed) = (&mut st.input_ack, &mut st.input_failed);
            let mut deliver = |s: u64, f: &[u8]| {
                if *failed {
                    return;
                }
                match sink.deliver(s, f) {
                    Ok(()) => {
                        *ack = s;
                        ChannelStatus::inc(&status.frames_to_vm);
                    }
                    Err(e) => {
                        *failed = true;
                        ChannelStatus::inc(&status.vm_deliver_errors);
                        warn!("input frame {s} could not be delivered ({e}): acks stop here");
                    }
                }
            };
            st.input
                .on_log(seq, &frame[..LOG_OVERHEAD + payload.len()], &mut deliver)
        }
        KIND_VMLOG => {
            let Some(feed) = feed else {
                return; // an external VM replays nothing
            };
            let (ack, failed) = (&mut st.vm_ack, &mut st.vm_failed);
            let mut deliver = |s: u64, entries: &[u8]| {
                if *failed {
                    return;
                }
                match feed.deliver(s, entries) {
                    Ok(()) => *ack = s,
                    Err(e) => {
                        *failed = true;
                        ChannelStatus::inc(&status.vm_deliver_errors);
                        warn!(
                            "VMLOG frame {s} could not be buffered for replay ({e}): acks stop here"
                        );
                    }
                }
            };
            st.vm.on_log(seq, payload, &mut deliver)
        }
        _ => return,
    };
    match outcome {
        Outcome::Duplicate => ChannelStatus::inc(&status.duplicates),
        Outcome::TooFar => ChannelStatus::inc(&status.too_far),
        _ => {}
    }
}
