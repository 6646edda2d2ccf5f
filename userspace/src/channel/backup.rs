//! Backup: AF_XDP receive of log frames (XDP `ft_log_rx` redirects validated frames into
//! the socket's queue), in-order delivery to the VM side, cumulative acks and nacks.
//!
//! Why AF_XDP: the frames already sit in a kernel buffer after XDP; AF_XDP moves them to
//! userspace through shared rings with no per-frame syscall and no skb allocation, and
//! (on NICs that support it) with zero copy. A BPF ring buffer would copy every frame a
//! second time and cap records at a fixed size; AF_PACKET would allocate an skb per frame
//! and see frames only after XDP passed them to the stack.
use std::{
    num::NonZeroU32,
    os::fd::AsRawFd,
    ptr::NonNull,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use ft_common::wire::*;
use tracing::{debug, info, warn};
use xdpilone::{IfInfo, Socket, SocketConfig, Umem, UmemConfig};

use super::{
    auth::ChannelKey,
    frames::{control_frame, hdr},
    reorder::{Outcome, Reorder},
    status::ChannelStatus,
};
use crate::{dataplane::DataPlane, netif::RawSocket};

const FRAME_SIZE: usize = 4096;
const NUM_FRAMES: usize = 4096;
const RING: u32 = 2048;
const BATCH: u32 = 256;

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error(
        "logging NIC {0} has {1} receive queues; the backup reads queue 0 only. Give the \
             logging NIC a single queue: ethtool -L {0} combined 1"
    )]
    Queues(String, usize),
    #[error(
        "AF_XDP socket on {iface}: {what} failed (errno {errno}). The kernel needs \
             CONFIG_XDP_SOCKETS and the daemon needs root"
    )]
    Xsk {
        iface: String,
        what: &'static str,
        errno: String,
    },
    #[error("mapping {0} bytes for the AF_XDP UMEM failed: {1}")]
    Mmap(usize, std::io::Error),
    #[error(transparent)]
    DataPlane(#[from] crate::dataplane::DataPlaneError),
}

/// Where in-order input frames go: the replaying VMM's frame store, or an external VM.
pub trait InputSink: Send {
    /// `log_frame` is the whole log frame (headers + client frame), in sequence order.
    /// An error means the frame is not held: the ack stops before it for good.
    fn deliver(&mut self, seq: u64, log_frame: &[u8]) -> std::io::Result<()>;
}

/// Where in-order VMLOG frames go: the replaying VMM (none for an external VM).
pub trait VmFeed: Send {
    /// The entries of VMLOG frame `seq` (whole entries back to back), in sequence order.
    /// An error means they are not buffered for replay (the VMM stopped, or the frame is
    /// malformed): the VMM-stream ack stops before this frame for good.
    fn deliver(&mut self, seq: u64, entries: &[u8]) -> Result<(), String>;
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
    pub key: ChannelKey,
    pub heartbeat: Duration,
    pub peer_timeout: Duration,
    pub nack_retry: Duration,
    pub nack_burst: usize,
    pub max_pending: u64,
    /// Where the streams begin (frames that arrive before it is known wait in the
    /// socket's ring, or are dropped and asked for again).
    pub start: Arc<StreamStart>,
}

struct Mmap {
    ptr: NonNull<u8>,
    len: usize,
}

impl Drop for Mmap {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` came from a successful mmap and are unmapped once.
        unsafe { libc::munmap(self.ptr.as_ptr() as *mut _, self.len) };
    }
}

fn rx_queues(iface: &str) -> usize {
    std::fs::read_dir(format!("/sys/class/net/{iface}/queues"))
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().starts_with("rx-"))
                .count()
        })
        .unwrap_or(1)
}

/// Runs the backup receive loop on the calling thread until `stop` is set.
pub fn run(
    dp: Arc<DataPlane>,
    params: BackupParams,
    mut sink: Box<dyn InputSink>,
    mut feed: Option<Box<dyn VmFeed>>,
    status: Arc<ChannelStatus>,
    stop: Arc<AtomicBool>,
) -> Result<(), BackupError> {
    let iface = dp.nics.logging.clone();
    let nq = rx_queues(&iface.name);
    if nq > 1 {
        return Err(BackupError::Queues(iface.name.clone(), nq));
    }
    let xerr = |what: &'static str| {
        let name = iface.name.clone();
        move |e: xdpilone::Errno| BackupError::Xsk {
            iface: name,
            what,
            errno: e.to_string(),
        }
    };
    let len = FRAME_SIZE * NUM_FRAMES;
    // SAFETY: anonymous private mapping; checked for MAP_FAILED below.
    let area = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
            -1,
            0,
        )
    };
    if area == libc::MAP_FAILED {
        return Err(BackupError::Mmap(len, std::io::Error::last_os_error()));
    }
    let map = Mmap {
        ptr: NonNull::new(area as *mut u8).expect("mmap returned null"),
        len,
    };
    let region = NonNull::slice_from_raw_parts(map.ptr, len);
    let cfg = UmemConfig {
        fill_size: RING,
        complete_size: RING,
        frame_size: FRAME_SIZE as u32,
        headroom: 0,
        flags: 0,
    };
    // SAFETY: `region` is a valid mapping that outlives the UMEM (`map` is dropped after
    // every ring and socket at the end of this function).
    let umem = unsafe { Umem::new(cfg, region) }.map_err(xerr("UMEM registration"))?;
    let mut info = IfInfo::invalid();
    let cname = std::ffi::CString::new(iface.name.clone()).expect("interface name has no NUL");
    info.from_name(&cname).map_err(xerr("interface lookup"))?;
    info.set_queue(0);
    let sock = Socket::with_shared(&info, &umem).map_err(xerr("socket"))?;
    let mut device = umem.fq_cq(&sock).map_err(xerr("fill/completion rings"))?;
    let rxtx = umem
        .rx_tx(
            &sock,
            &SocketConfig {
                rx_size: NonZeroU32::new(RING),
                tx_size: None,
                bind_flags: 0,
            },
        )
        .map_err(xerr("rx ring"))?;
    umem.bind(&rxtx).map_err(xerr("bind"))?;
    let mut rx = rxtx.map_rx().map_err(xerr("rx ring mmap"))?;
    dp.register_xsk(0, RawFdRef(rxtx.as_raw_fd()))?;
    {
        let mut w = device.fill(RING);
        w.insert((0..RING as u64).map(|i| i * FRAME_SIZE as u64));
        w.commit();
    }
    let mut free: Vec<u64> = (RING as u64..NUM_FRAMES as u64)
        .map(|i| i * FRAME_SIZE as u64)
        .collect();
    let out = RawSocket::open(&iface).map_err(|e| BackupError::Xsk {
        iface: iface.name.clone(),
        what: "ack socket",
        errno: e.to_string(),
    })?;
    info!(iface = %iface.name, "backup: receiving the log over AF_XDP");

    let Some((input0, vm0)) = params.start.wait(&stop) else {
        return Ok(());
    };
    if input0 > 1 {
        info!(
            input0,
            vm0, "backup: the log starts at the cut of a state transfer"
        );
    }
    let mut rx_state = RxState {
        input: Reorder::new(input0, params.max_pending),
        vm: Reorder::new(vm0, params.max_pending),
        input_ack: input0 - 1,
        vm_ack: vm0 - 1,
        input_failed: false,
        vm_failed: false,
    };
    let mut last_ack_sent = ((0u64, 0u64), Instant::now() - params.heartbeat);
    let mut last_rx = Instant::now();
    let mut last_stats = Instant::now();
    let mut recycled: Vec<u64> = Vec::with_capacity(BATCH as usize);
    let poll_ms = params.heartbeat.as_millis().clamp(1, 100) as i32;
    let send = |frame: &[u8], counter: &std::sync::atomic::AtomicU64| match out.send(frame) {
        Ok(()) => ChannelStatus::inc(counter),
        Err(e) => {
            ChannelStatus::inc(&status.send_errors);
            debug!("logging-link send failed: {e}");
        }
    };
    while !stop.load(Relaxed) {
        let mut pfd = libc::pollfd {
            fd: rxtx.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        unsafe { libc::poll(&mut pfd, 1, poll_ms) };
        let now = Instant::now();
        let before = rx_state.input_ack;
        {
            let mut r = rx.receive(BATCH);
            while let Some(desc) = r.read() {
                let off = desc.addr as usize;
                let n = (desc.len as usize).min(FRAME_SIZE);
                if off + n <= len {
                    // SAFETY: the descriptor lies inside our UMEM (checked) and the kernel
                    // has handed this frame to us until we put it back on the fill ring.
                    let frame = unsafe { std::slice::from_raw_parts(map.ptr.as_ptr().add(off), n) };
                    if from_primary_daemon(frame) {
                        last_rx = now;
                    }
                    handle_frame(frame, &dp, &mut rx_state, sink.as_mut(), &mut feed, &status);
                }
                recycled.push(desc.addr & !(FRAME_SIZE as u64 - 1));
            }
            r.release();
        }
        free.append(&mut recycled);
        if !free.is_empty() {
            let mut w = device.fill(free.len() as u32);
            let k = w.insert(free.iter().copied());
            w.commit();
            free.drain(..k as usize);
        }
        let epoch = status.epoch.load(Relaxed);
        if epoch == 0 {
            continue; // epoch not known yet (XDP drops log frames until it is)
        }
        let acked = (rx_state.input_ack, rx_state.vm_ack);
        if acked.0 != before {
            dp.set_delivered(acked.0);
        }
        let session = status.peer_session.load(Relaxed);
        status.delivered.store(acked.0, Relaxed);
        status.vm_delivered.store(acked.1, Relaxed);
        status.high.store(rx_state.input.high(), Relaxed);
        status.vm_high.store(rx_state.vm.high(), Relaxed);
        status.buffered.store(
            (rx_state.input.buffered() + rx_state.vm.buffered()) as u64,
            Relaxed,
        );
        if status.stop_acking.load(Relaxed) {
            continue; // this replica failed: it must not confirm anything any more
        }
        if session == 0 {
            continue; // no primary run heard yet: an ack would name no session
        }
        // Cumulative ack of both streams on progress, and as a keep-alive.
        if acked != last_ack_sent.0 || now.duration_since(last_ack_sent.1) >= params.heartbeat {
            let f = control_frame(
                &params.key,
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
                &params.key,
                params.own_mac,
                params.peer_mac,
                hdr(kind, session, epoch, s, 0),
            );
            send(&f, &status.nacks_sent);
        }
        if now.duration_since(last_stats) >= Duration::from_millis(100) {
            last_stats = now;
            if let Ok(st) = rxtx.statistics_v2() {
                status.xsk_rx_dropped.store(st.rx_dropped, Relaxed);
                status.xsk_rx_ring_full.store(st.rx_ring_full, Relaxed);
                status
                    .xsk_fill_ring_empty
                    .store(st.rx_fill_ring_empty_descs, Relaxed);
            }
        }
        let alive = now.duration_since(last_rx) < params.peer_timeout;
        if status.peer_alive.swap(alive, Relaxed) && !alive {
            ChannelStatus::inc(&status.peer_down_events);
            warn!(
                silence_ms = now.duration_since(last_rx).as_millis() as u64,
                "primary silent on the logging channel: reported down"
            );
        }
    }
    drop(rx);
    drop(rxtx);
    drop(device);
    drop(sock);
    drop(umem);
    drop(map);
    Ok(())
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

/// Frames only the primary's daemon sends: heartbeats and the VMM stream. The
/// primary's XDP goes on duplicating client frames (LOG, and their retransmissions)
/// while its daemon and VM are frozen, and clients retransmit into a frozen VM, so
/// those frames do not show that the primary is alive.
fn from_primary_daemon(frame: &[u8]) -> bool {
    matches!(parse_log_frame(frame), Ok((h, _)) if matches!(h.ft.kind, KIND_HEARTBEAT | KIND_VMLOG))
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

struct RawFdRef(i32);
impl AsRawFd for RawFdRef {
    fn as_raw_fd(&self) -> i32 {
        self.0
    }
}
