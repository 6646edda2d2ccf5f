//! AF_PACKET raw sockets bound to an interface inside a namespace, background captures
//! and a fast frame blaster.

use crate::netns::try_run_in_ns;
use anyhow::{Context, Result, bail};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const ETH_P_ALL: u16 = 0x0003;
const MAX_FRAME: usize = 65_536 + 64;

/// CLOCK_MONOTONIC now, in ns (the clock of the kernel's stamps: `bpf_ktime_get_ns()`).
pub use ftd::liveness::monotonic_ns;

fn setsockopt_int(fd: RawFd, level: i32, opt: i32, val: i32) -> std::io::Result<()> {
    // SAFETY: pointer/len describe a valid c_int.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            opt,
            &val as *const i32 as *const libc::c_void,
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// AF_PACKET/SOCK_RAW socket (all EtherTypes) bound to one interface of one namespace.
/// Opened on a thread inside the namespace; afterwards usable from any thread.
#[derive(Debug)]
pub struct RawSock {
    fd: OwnedFd,
    ifindex: u32,
    /// If true, [`RawSock::recv`] also returns frames this host sent (PACKET_OUTGOING).
    pub include_outgoing: bool,
    ns: String,
    ifname: String,
}

/// Opens an AF_PACKET raw socket in `ns`, bound to `ifname`, receiving frames of
/// EtherType `proto` (`0x0003` = all, `0` = none: send only), with the given forced
/// receive/send buffer sizes. It is created with protocol 0 so nothing from other
/// interfaces is queued before the bind. Returns (fd, ifindex in `ns`).
pub fn open_packet_socket(
    ns: &str,
    ifname: &str,
    proto: u16,
    rcvbuf: i32,
    sndbuf: i32,
) -> Result<(OwnedFd, u32)> {
    let name = std::ffi::CString::new(ifname)?;
    try_run_in_ns(ns, || -> Result<(OwnedFd, u32)> {
        // SAFETY: valid C string.
        let idx = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if idx == 0 {
            bail!("no interface {ifname} in netns {ns}");
        }
        // SAFETY: plain socket() call; result checked.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("socket(AF_PACKET)");
        }
        // SAFETY: fd freshly created and owned here.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        setsockopt_int(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            rcvbuf,
        )
        .context("SO_RCVBUFFORCE")?;
        setsockopt_int(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUFFORCE,
            sndbuf,
        )
        .context("SO_SNDBUFFORCE")?;
        // SAFETY: sockaddr_ll is POD; zero is valid.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto.to_be();
        sll.sll_ifindex = idx as i32;
        // SAFETY: pointer/len describe a valid sockaddr_ll.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &sll as *const libc::sockaddr_ll as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error()).context("bind(AF_PACKET)");
        }
        Ok((fd, idx))
    })?
}

impl RawSock {
    /// Opens a raw socket on `ifname` in `ns` with a 64 MiB receive buffer.
    pub fn open(ns: &str, ifname: &str) -> Result<RawSock> {
        Self::open_with_rcvbuf(ns, ifname, 64 << 20)
    }

    /// Opens a raw socket with the given SO_RCVBUFFORCE size (bytes).
    pub fn open_with_rcvbuf(ns: &str, ifname: &str, rcvbuf: i32) -> Result<RawSock> {
        let (fd, ifindex) = open_packet_socket(ns, ifname, ETH_P_ALL, rcvbuf, 16 << 20)?;
        Ok(RawSock {
            fd,
            ifindex,
            include_outgoing: false,
            ns: ns.to_string(),
            ifname: ifname.to_string(),
        })
    }

    /// Interface index (inside its namespace).
    pub fn ifindex(&self) -> u32 {
        self.ifindex
    }

    /// Raw fd (owned by this struct).
    pub fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Sends one complete Ethernet frame (retries briefly on ENOBUFS/EAGAIN, ≤ 1 s).
    pub fn send(&self, frame: &[u8]) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(1);
        loop {
            // SAFETY: buffer pointer/len valid for the call.
            let n = unsafe {
                libc::send(
                    self.fd.as_raw_fd(),
                    frame.as_ptr() as *const libc::c_void,
                    frame.len(),
                    0,
                )
            };
            if n >= 0 {
                return Ok(());
            }
            let e = std::io::Error::last_os_error();
            let retry = matches!(e.raw_os_error(), Some(libc::ENOBUFS) | Some(libc::EAGAIN));
            if !retry || Instant::now() > deadline {
                return Err(e).with_context(|| format!("send on {}/{}", self.ns, self.ifname));
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// Receives one frame, waiting at most `timeout`. Outgoing frames are skipped unless
    /// `include_outgoing`. Returns None on timeout.
    pub fn recv(&self, timeout: Duration) -> Result<Option<Vec<u8>>> {
        Ok(self.recv_with_type(timeout)?.map(|(_, f)| f))
    }

    /// Like [`RawSock::recv`] but also returns the `sll_pkttype` (PACKET_HOST=0,
    /// PACKET_BROADCAST=1, PACKET_MULTICAST=2, PACKET_OTHERHOST=3, PACKET_OUTGOING=4).
    pub fn recv_with_type(&self, timeout: Duration) -> Result<Option<(u8, Vec<u8>)>> {
        let deadline = Instant::now() + timeout;
        let mut buf = vec![0u8; MAX_FRAME];
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            let ms = (deadline - now).as_millis().clamp(1, i32::MAX as u128) as i32;
            if !poll_in(self.fd.as_raw_fd(), ms)? {
                continue;
            }
            match recv_one(self.fd.as_raw_fd(), &mut buf)? {
                Some((len, pkttype)) => {
                    if pkttype == libc::PACKET_OUTGOING && !self.include_outgoing {
                        continue;
                    }
                    return Ok(Some((pkttype, buf[..len].to_vec())));
                }
                None => continue,
            }
        }
    }

    /// Discards all queued frames (bounded to 1M frames).
    pub fn drain(&self) -> Result<usize> {
        let mut buf = vec![0u8; MAX_FRAME];
        let mut n = 0;
        while n < 1_000_000 {
            match recv_one(self.fd.as_raw_fd(), &mut buf)? {
                Some(_) => n += 1,
                None => break,
            }
        }
        Ok(n)
    }

    /// Kernel drop counter since the last call (PACKET_STATISTICS; resets on read).
    pub fn stats(&self) -> Result<(u32, u32)> {
        packet_stats(self.fd.as_raw_fd())
    }

    /// Starts a background capture on this socket (consumes it).
    pub fn into_capture(self) -> Capture {
        Capture::from_sock(self)
    }
}

fn packet_stats(fd: RawFd) -> Result<(u32, u32)> {
    let mut st = libc::tpacket_stats {
        tp_packets: 0,
        tp_drops: 0,
    };
    let mut len = std::mem::size_of::<libc::tpacket_stats>() as libc::socklen_t;
    // SAFETY: pointer/len describe a valid tpacket_stats.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_PACKET,
            libc::PACKET_STATISTICS,
            &mut st as *mut libc::tpacket_stats as *mut libc::c_void,
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("PACKET_STATISTICS");
    }
    Ok((st.tp_packets, st.tp_drops))
}

/// poll(POLLIN) with a timeout in ms; true if readable.
fn poll_in(fd: RawFd, ms: i32) -> Result<bool> {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let rc = unsafe { libc::poll(&mut p, 1, ms) };
    if rc < 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EINTR) {
            return Ok(false);
        }
        return Err(e).context("poll");
    }
    Ok(rc > 0)
}

/// Non-blocking recvfrom; Some((len, pkttype)) or None if nothing queued.
pub fn recv_one(fd: RawFd, buf: &mut [u8]) -> Result<Option<(usize, u8)>> {
    // SAFETY: sockaddr_ll is POD; zero is valid.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    let mut sl = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
    // SAFETY: buffer and address pointers/lengths valid for the call.
    let n = unsafe {
        libc::recvfrom(
            fd,
            buf.as_mut_ptr() as *mut libc::c_void,
            buf.len(),
            libc::MSG_DONTWAIT,
            &mut sll as *mut libc::sockaddr_ll as *mut libc::sockaddr,
            &mut sl,
        )
    };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(None),
            _ => Err(e).context("recvfrom(AF_PACKET)"),
        };
    }
    Ok(Some((n as usize, sll.sll_pkttype)))
}

/// Result of a capture.
#[derive(Debug, Default, Clone)]
pub struct CaptureResult {
    /// (receive time in CLOCK_MONOTONIC ns, frame bytes), in receive order. The time is
    /// the kernel's SO_TIMESTAMPNS stamp (taken when the frame reached the socket layer,
    /// so a backlog in the capture thread does not skew it) converted from
    /// CLOCK_REALTIME using the offset measured at capture start; it is comparable with
    /// [`monotonic_ns`] / `Instant` within a few µs.
    pub frames: Vec<(u64, Vec<u8>)>,
    /// Frames the kernel dropped because the socket buffer was full (if > 0 the capture
    /// is incomplete).
    pub kernel_drops: u64,
}

/// Background capture of all frames on one interface (incoming; outgoing too if the
/// socket had `include_outgoing`). Stop with [`Capture::stop`]; dropping also stops it.
pub struct Capture {
    stop: Arc<AtomicBool>,
    count: Arc<AtomicU64>,
    handle: Option<JoinHandle<Result<CaptureResult>>>,
}

impl Capture {
    /// Opens a raw socket on `ns`/`ifname` and starts capturing incoming frames.
    /// When this returns the socket is bound, so frames sent afterwards are captured.
    pub fn start(ns: &str, ifname: &str) -> Result<Capture> {
        Ok(Capture::from_sock(RawSock::open(ns, ifname)?))
    }

    /// Like [`Capture::start`] but also records frames sent from the interface.
    pub fn start_with_outgoing(ns: &str, ifname: &str) -> Result<Capture> {
        let mut s = RawSock::open(ns, ifname)?;
        s.include_outgoing = true;
        Ok(Capture::from_sock(s))
    }

    /// Starts capturing on an already-open socket.
    pub fn from_sock(sock: RawSock) -> Capture {
        let stop = Arc::new(AtomicBool::new(false));
        let count = Arc::new(AtomicU64::new(0));
        let (st, ct) = (stop.clone(), count.clone());
        let handle = std::thread::Builder::new()
            .name(format!("capture-{}", sock.ifname))
            .spawn(move || capture_loop(sock, st, ct))
            .expect("spawn capture thread");
        Capture {
            stop,
            count,
            handle: Some(handle),
        }
    }

    /// Stops the capture (after draining what is already queued) and returns the frames.
    /// Panics if the capture failed: an empty result must mean "nothing seen", never
    /// "could not look".
    pub fn stop(self) -> Vec<(u64, Vec<u8>)> {
        match self.stop_with_stats() {
            Ok(r) => r.frames,
            Err(e) => panic!("packet capture failed: {e:#}"),
        }
    }

    /// Stops and returns frames plus kernel drop count.
    pub fn stop_with_stats(mut self) -> Result<CaptureResult> {
        self.stop.store(true, Ordering::Release);
        match self.handle.take().map(|h| h.join()) {
            Some(Ok(r)) => r,
            Some(Err(_)) => bail!("capture thread panicked"),
            None => bail!("capture already stopped"),
        }
    }

    /// Waits until no new frame arrived for `quiet` (bounded by `max`), then stops.
    pub fn stop_when_quiet(self, quiet: Duration, max: Duration) -> Result<CaptureResult> {
        let start = Instant::now();
        let mut last = self.count();
        let mut last_change = Instant::now();
        while start.elapsed() < max && last_change.elapsed() < quiet {
            std::thread::sleep(Duration::from_millis(5));
            let c = self.count();
            if c != last {
                last = c;
                last_change = Instant::now();
            }
        }
        self.stop_with_stats()
    }

    /// Number of frames recorded so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Waits until at least `n` frames were recorded or `timeout` passed; returns the count.
    pub fn wait_for(&self, n: u64, timeout: Duration) -> u64 {
        let deadline = Instant::now() + timeout;
        loop {
            let c = self.count();
            if c >= n || Instant::now() >= deadline {
                return c;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn realtime_ns() -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut ts) };
    ts.tv_sec as i128 * 1_000_000_000 + ts.tv_nsec as i128
}

/// Non-blocking recvmsg returning (len, pkttype, kernel SO_TIMESTAMPNS realtime ns).
fn recv_one_ts(fd: RawFd, buf: &mut [u8]) -> Result<Option<(usize, u8, Option<i128>)>> {
    // SAFETY: sockaddr_ll is POD; zero is valid.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    let mut cbuf = [0u64; 16];
    // SAFETY: msghdr is POD; zero is valid.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = &mut sll as *mut libc::sockaddr_ll as *mut libc::c_void;
    msg.msg_namelen = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = std::mem::size_of_val(&cbuf);
    // SAFETY: msg points to valid name, iovec and control buffers alive for the call.
    let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_DONTWAIT) };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(None),
            _ => Err(e).context("recvmsg(AF_PACKET)"),
        };
    }
    let mut ts = None;
    // SAFETY: iterating the control messages the kernel wrote into `msg`'s buffer with
    // the libc CMSG_* helpers; the buffer outlives the loop.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_TIMESTAMPNS {
                let t: libc::timespec =
                    std::ptr::read_unaligned(libc::CMSG_DATA(c) as *const libc::timespec);
                ts = Some(t.tv_sec as i128 * 1_000_000_000 + t.tv_nsec as i128);
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    Ok(Some((n as usize, sll.sll_pkttype, ts)))
}

fn capture_loop(
    sock: RawSock,
    stop: Arc<AtomicBool>,
    count: Arc<AtomicU64>,
) -> Result<CaptureResult> {
    const BURST: usize = 4096;
    let fd = sock.fd.as_raw_fd();
    // Kernel receive timestamps (CLOCK_REALTIME) mapped onto CLOCK_MONOTONIC.
    let kernel_ts = setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_TIMESTAMPNS, 1).is_ok();
    let offset = realtime_ns() - monotonic_ns() as i128;
    let mut buf = vec![0u8; MAX_FRAME];
    let mut out = CaptureResult::default();
    let _ = packet_stats(fd); // reset counters
    let mut stop_seen: Option<Instant> = None;
    loop {
        if stop_seen.is_none() && stop.load(Ordering::Acquire) {
            stop_seen = Some(Instant::now());
        }
        // Drain what is queued (bursts, so a stop request is noticed).
        let mut got = 0usize;
        while let Some((len, pkttype, ts)) = recv_one_ts(fd, &mut buf)? {
            got += 1;
            if pkttype != libc::PACKET_OUTGOING || sock.include_outgoing {
                let t = match ts {
                    Some(rt) if kernel_ts => (rt - offset).max(0) as u64,
                    _ => monotonic_ns(),
                };
                out.frames.push((t, buf[..len].to_vec()));
                count.fetch_add(1, Ordering::Relaxed);
            }
            if got >= BURST {
                break;
            }
        }
        match stop_seen {
            // After stop: finish draining, but give up after 1 s of continuous traffic.
            Some(t) if got < BURST || t.elapsed() > Duration::from_secs(1) => break,
            Some(_) => continue,
            None if got >= BURST => continue,
            None => {
                poll_in(fd, 20)?;
            }
        }
    }
    if let Ok((_, drops)) = packet_stats(fd) {
        out.kernel_drops = u64::from(drops);
    }
    Ok(out)
}

/// Result of [`blast`].
#[derive(Debug, Clone, Copy)]
pub struct BlastStats {
    pub sent: usize,
    pub elapsed: Duration,
}

/// Sends `frames` out of `ns`/`ifname` as fast as possible (sendmmsg batches of 256), or
/// paced at `pace` frames per second. Retries on ENOBUFS/EAGAIN; fails if no progress
/// for 5 s.
pub fn blast<F: AsRef<[u8]> + Sync>(
    ns: &str,
    ifname: &str,
    frames: &[F],
    pace: Option<u64>,
) -> Result<BlastStats> {
    let sock = RawSock::open_with_rcvbuf(ns, ifname, 1 << 16)?;
    blast_on(&sock, frames, pace)
}

/// Like [`blast`] on an already-open socket.
pub fn blast_on<F: AsRef<[u8]>>(
    sock: &RawSock,
    frames: &[F],
    pace: Option<u64>,
) -> Result<BlastStats> {
    const BATCH: usize = 256;
    let fd = sock.fd.as_raw_fd();
    let start = Instant::now();
    let mut i = 0usize;
    let mut last_progress = Instant::now();
    while i < frames.len() {
        let batch_end = match pace {
            Some(fps) if fps > 0 => {
                // Frame k is due at start + k/fps.
                let due =
                    start + Duration::from_nanos((i as u128 * 1_000_000_000 / fps as u128) as u64);
                let now = Instant::now();
                if due > now {
                    let wait = due - now;
                    if wait > Duration::from_micros(200) {
                        std::thread::sleep(wait - Duration::from_micros(100));
                    }
                    while Instant::now() < due {
                        std::hint::spin_loop();
                    }
                }
                // Send every frame already due (at least one).
                let elapsed_ns = start.elapsed().as_nanos();
                let due_count = (elapsed_ns * fps as u128 / 1_000_000_000) as usize + 1;
                due_count.clamp(i + 1, (i + BATCH).min(frames.len()))
            }
            _ => (i + BATCH).min(frames.len()),
        };
        let chunk = &frames[i..batch_end];
        let mut iovs: Vec<libc::iovec> = chunk
            .iter()
            .map(|f| libc::iovec {
                iov_base: f.as_ref().as_ptr() as *mut libc::c_void,
                iov_len: f.as_ref().len(),
            })
            .collect();
        let mut msgs: Vec<libc::mmsghdr> = iovs
            .iter_mut()
            .map(|iov| {
                // SAFETY: mmsghdr is POD; zero is valid.
                let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
                m.msg_hdr.msg_iov = iov;
                m.msg_hdr.msg_iovlen = 1;
                m
            })
            .collect();
        // SAFETY: msgs points to msgs.len() initialised mmsghdr whose iovecs point into
        // `frames`, all alive for the duration of the call.
        let n = unsafe { libc::sendmmsg(fd, msgs.as_mut_ptr(), msgs.len() as u32, 0) };
        if n > 0 {
            i += n as usize;
            last_progress = Instant::now();
            continue;
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ENOBUFS) | Some(libc::EAGAIN) | Some(libc::EINTR) => {
                if last_progress.elapsed() > Duration::from_secs(5) {
                    return Err(e).context(format!("blast stalled after {i} frames"));
                }
                std::thread::sleep(Duration::from_micros(100));
            }
            _ if n == 0 => {
                if last_progress.elapsed() > Duration::from_secs(5) {
                    bail!("blast stalled after {i} frames");
                }
            }
            _ => return Err(e).context(format!("sendmmsg after {i} frames")),
        }
    }
    Ok(BlastStats {
        sent: i,
        elapsed: start.elapsed(),
    })
}
