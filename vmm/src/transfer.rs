//! Live state transfer: a running VMM's state copied into a new VMM (a new backup) while
//! the guest keeps running, then a short stop at a guest exit, where the source starts a
//! new log that the new VMM replays from exactly that point.
//!
//! 1. **Pre-copy.** A [`TransferSource`] (taken from the VMM before it runs) copies guest
//!    RAM from another thread while the vCPU runs: first every page that is not zero,
//!    then, round by round, the pages written since the previous round (KVM dirty log
//!    plus the VMM's own writes, [`crate::vstate::dirty`]). Rounds stop when the pages
//!    written during a round fit the stop budget, or after `max_rounds`.
//! 2. **Stop.** The vCPU thread, at its next guest exit (the top of the run loop: the same
//!    point a snapshot is taken between runs), sends the pages written since the last
//!    round and the machine state without RAM (vCPU, devices, log position), then starts
//!    a new log with a header at that exit and runs on recording. Only this step pauses
//!    the guest.
//! 3. **Receive.** [`Vmm::receive`] builds the new VMM from the stream; it then replays
//!    the new log, whose header must be for the exit it was restored at.
//!
//! A transfer that fails at any point (the receiver gone, the link cut) changes nothing
//! on the source: the guest runs on as before, and a new transfer can start.
//!
//! Frames in flight at the cut: whatever the NIC backend holds when the vCPU stops is
//! taken then and delivered before anything newer. In tagged mode (the appliance) the
//! frames that carry no log header arrived before the new log's input stream existed:
//! they travel in the stream (`FRAMES`), the replica stores them under
//! [`PRECUT_EPOCH`], and the new log references them like any input frame.
//!
//! Stream (little-endian u64s): magic `FTVMXFER`, version, configuration hash, RAM size;
//! then records: `PAGES` (round, count, count x (page number, 4 KiB)), `ZERO` (count,
//! count x page number: pages that are all zero now), `STATE` (the machine state),
//! `FRAMES` (count, count x (sequence, length, bytes)), `CUT_INFO` (length, bytes: what
//! the caller's hook said at the cut) and `DONE` (the exit of the cut).
use crate::error::{Error, Result};
use crate::vmlog::{FrameKey, FrameStore, LogSink};
use crate::vmm::{Control, Vmm, VmmConfig};
use crate::vstate::dirty::DirtyLog;
use crate::vstate::memory::PAGE_SIZE;
use std::io::{BufWriter, Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const XFER_MAGIC: [u8; 8] = *b"FTVMXFER";
const XFER_VERSION: u64 = 1;
const TAG_PAGES: u64 = 1;
const TAG_ZERO: u64 = 2;
const TAG_STATE: u64 = 3;
const TAG_DONE: u64 = 4;
const TAG_FRAMES: u64 = 5;
const TAG_CUT_INFO: u64 = 6;
/// Frame-store epoch of the frames that travel with the state (see `FRAMES`): 0, below
/// every log epoch, because they are delivered before any frame of the new log (so a
/// take-over's "input after the last frame consumed" never skips a newer frame).
pub const PRECUT_EPOCH: u64 = 0;
/// Largest `CUT_INFO` record.
const MAX_CUT_INFO: u64 = 64 * 1024;
/// Pages per `PAGES` record.
const BATCH: usize = 256;

/// How a transfer runs.
#[derive(Clone, Debug)]
pub struct TransferOptions {
    /// Pre-copy rounds after the first full pass, at most.
    pub max_rounds: u32,
    /// Go to the stop phase once a round finds at most this many pages written.
    pub stop_pages: usize,
    /// How long the source waits for the vCPU to reach an exit and finish the stop phase.
    pub stop_timeout: Duration,
}

impl Default for TransferOptions {
    fn default() -> Self {
        TransferOptions {
            max_rounds: 30,
            // 1 MiB: about 1 ms on 10 GbE.
            stop_pages: 256,
            stop_timeout: Duration::from_secs(10),
        }
    }
}

/// Where a transfer is (for progress bars, status and metrics).
#[derive(Clone, Debug, Default)]
pub struct Progress {
    /// 0: the first full pass; then the pre-copy rounds; `u32::MAX` in the stop phase.
    pub round: u32,
    pub bytes_sent: u64,
    pub pages_sent: u64,
    /// Pages of guest RAM.
    pub ram_pages: u64,
    /// Pages written during the last round, and how fast (pages per second).
    pub last_dirty_pages: u64,
    pub dirty_rate: f64,
    pub elapsed: Duration,
    /// Estimate of the time left (the current round's pages at the rate so far).
    pub remaining: Duration,
}

/// How a finished transfer went.
#[derive(Clone, Debug, Default)]
pub struct TransferReport {
    pub rounds: u32,
    pub pages_sent: u64,
    pub zero_pages: u64,
    pub bytes_sent: u64,
    /// Pages sent in the stop phase.
    pub stop_pages: u64,
    /// The guest's pause: from the vCPU stopping at the exit to it running on.
    pub pause: Duration,
    /// Pre-copy, then the wait for an exit, then the pause.
    pub total: Duration,
    /// The exit at which the new log starts.
    pub cut_exit: u64,
    /// Whether the rounds converged (else `max_rounds` ended them).
    pub converged: bool,
    /// Frames in flight at the cut that travelled with the state.
    pub precut_frames: u64,
    /// Where the pause went: the hook, the last pages, the machine state (and frames,
    /// flushed to the receiver), the new log's start.
    pub pause_parts: Vec<(&'static str, Duration)>,
    /// From asking the vCPU to stop to the stop phase starting (the guest runs on).
    pub stop_wait: Duration,
    /// What the source's hook said at the cut (receiver side).
    pub cut_info: Vec<u8>,
}

/// Runs on the vCPU thread at the cut, before the state is written, with the VMM stopped
/// there; its bytes reach the receiver (`TransferReport::cut_info`). The appliance
/// switches its data plane to logging here. An error aborts the transfer.
pub type CutHook = Box<dyn FnOnce(&mut Vmm) -> Result<Vec<u8>> + Send>;

/// A handle to a VMM's memory and dirty log for a transfer from another thread.
#[derive(Clone)]
pub struct TransferSource {
    mem: GuestMemoryMmap<()>,
    dirty: Arc<DirtyLog>,
    control: Arc<Control>,
    ram_size: u64,
    config_hash: u64,
}

impl Vmm {
    /// A handle for live transfers of this VMM's state (take it before `run`).
    pub fn transfer_source(&self) -> TransferSource {
        TransferSource {
            mem: self.vm().ram.mmap().clone(),
            dirty: self.vm().dirty.clone(),
            control: self.control().clone(),
            ram_size: self.config().ram_size,
            config_hash: self.config_hash(),
        }
    }

    /// Builds a VMM from a transfer stream (see the module docs). `cfg` must describe the
    /// same guest and RAM size as the source; the result is positioned at the source's
    /// cut, ready to replay the log started there (`cfg.mode` should be `Replay`).
    /// Frames that travelled with the state are put into `store` (which becomes the
    /// VMM's frame store) under [`PRECUT_EPOCH`].
    pub fn receive(
        cfg: VmmConfig,
        guest_elf: &[u8],
        control: Arc<Control>,
        r: &mut dyn Read,
        store: Option<Arc<dyn FrameStore>>,
        progress: &mut dyn FnMut(&Progress),
    ) -> Result<(Vmm, TransferReport)> {
        let t0 = Instant::now();
        let mut vmm = Vmm::new(cfg, guest_elf, control)?;
        let mut r = CountingReader { inner: r, n: 0 };
        let mut magic = [0u8; 8];
        read_exact(&mut r, &mut magic)?;
        if magic != XFER_MAGIC {
            return Err(Error::Transfer(
                "the peer did not send a VM state transfer (bad magic): is it an ft daemon of the same version?".into(),
            ));
        }
        let version = r64(&mut r)?;
        if version != XFER_VERSION {
            return Err(Error::Transfer(format!(
                "transfer format version {version}, this VMM reads {XFER_VERSION}: run the same ft version on both hosts"
            )));
        }
        let (hash, size) = (r64(&mut r)?, r64(&mut r)?);
        if hash != vmm.config_hash() {
            return Err(Error::Transfer(format!(
                "the source runs another guest or VM configuration (configuration hash {hash:#x}, ours {:#x}): use the same guest image and [vm] settings on both hosts",
                vmm.config_hash()
            )));
        }
        if size != vmm.config().ram_size {
            return Err(Error::Transfer(format!(
                "the source has {size} bytes of guest RAM, this VMM {}: configure the same vm.ram_mib",
                vmm.config().ram_size
            )));
        }
        // The image load wrote pages; the source sends every page that is not zero.
        vmm.vm_mut().ram.zero_all()?;
        let pages = size / PAGE_SIZE as u64;
        let mut rep = TransferReport::default();
        let mut page = vec![0u8; PAGE_SIZE];
        let mut state = None;
        loop {
            match r64(&mut r)? {
                TAG_PAGES => {
                    let round = r64(&mut r)?;
                    let n = r64(&mut r)?;
                    if n > BATCH as u64 {
                        return Err(Error::Transfer(format!("page batch of {n}")));
                    }
                    for _ in 0..n {
                        let p = r64(&mut r)?;
                        if p >= pages {
                            return Err(Error::Transfer(format!("page {p} beyond guest RAM")));
                        }
                        read_exact(&mut r, &mut page)?;
                        vmm.vm_mut().ram.write(p * PAGE_SIZE as u64, &page)?;
                    }
                    rep.pages_sent += n;
                    rep.rounds = round as u32;
                    progress(&Progress {
                        round: round as u32,
                        bytes_sent: r.n,
                        pages_sent: rep.pages_sent,
                        ram_pages: pages,
                        elapsed: t0.elapsed(),
                        ..Default::default()
                    });
                }
                TAG_ZERO => {
                    let n = r64(&mut r)?;
                    if n > pages {
                        return Err(Error::Transfer(format!("{n} zero pages")));
                    }
                    page.fill(0);
                    for _ in 0..n {
                        let p = r64(&mut r)?;
                        if p >= pages {
                            return Err(Error::Transfer(format!("page {p} beyond guest RAM")));
                        }
                        vmm.vm_mut().ram.write(p * PAGE_SIZE as u64, &page)?;
                    }
                    rep.zero_pages += n;
                }
                TAG_STATE => {
                    // The stop phase: the source's vCPU is paused until this is read.
                    progress(&Progress {
                        round: u32::MAX,
                        bytes_sent: r.n,
                        pages_sent: rep.pages_sent,
                        ram_pages: pages,
                        elapsed: t0.elapsed(),
                        ..Default::default()
                    });
                    state = Some(Vmm::read_state(&mut r)?);
                }
                TAG_FRAMES => {
                    let n = r64(&mut r)?;
                    if n > 1 << 16 {
                        return Err(Error::Transfer(format!("{n} frames at the cut")));
                    }
                    for _ in 0..n {
                        let seq = r64(&mut r)?;
                        let len = r64(&mut r)?;
                        if len > 65536 {
                            return Err(Error::Transfer(format!("a frame of {len} bytes")));
                        }
                        let mut f = vec![0u8; len as usize];
                        read_exact(&mut r, &mut f)?;
                        let Some(s) = store.as_ref() else {
                            return Err(Error::Transfer(
                                "frames came with the state but the replica has no frame store"
                                    .into(),
                            ));
                        };
                        s.put(
                            FrameKey {
                                epoch: PRECUT_EPOCH,
                                seq,
                            },
                            &f,
                        );
                    }
                    rep.precut_frames = n;
                }
                TAG_CUT_INFO => {
                    let n = r64(&mut r)?;
                    if n > MAX_CUT_INFO {
                        return Err(Error::Transfer(format!("cut info of {n} bytes")));
                    }
                    rep.cut_info = vec![0u8; n as usize];
                    read_exact(&mut r, &mut rep.cut_info)?;
                }
                TAG_DONE => {
                    rep.cut_exit = r64(&mut r)?;
                    break;
                }
                t => return Err(Error::Transfer(format!("unknown record {t}"))),
            }
        }
        let Some(state) = state else {
            return Err(Error::Transfer(
                "the stream ended without the machine state".into(),
            ));
        };
        // Page hashes are rebuilt at the first checkpoint, not here: the source's output
        // waits for this replica's first ack, which comes once this returns.
        vmm.apply_state(state, true)?;
        if let Some(s) = store {
            vmm.set_frame_store(s);
        }
        if vmm.exits() != rep.cut_exit {
            return Err(Error::Transfer(format!(
                "state is at exit {}, the cut at exit {}",
                vmm.exits(),
                rep.cut_exit
            )));
        }
        // The log the source started at the cut begins with its header.
        vmm.log_started = false;
        rep.bytes_sent = r.n;
        rep.total = t0.elapsed();
        Ok((vmm, rep))
    }
}

/// What the vCPU thread hands back after the stop phase.
struct StopResult {
    result: Result<(u64, u64, u64)>,
    pause: Duration,
    parts: Vec<(&'static str, Duration)>,
    started: Instant,
}

impl TransferSource {
    /// Transfers the running VMM's state into `w` (see the module docs). On success the
    /// VMM records into `sink` from the cut on; on error it runs on unchanged (if the
    /// error came after `at_cut` ran, undoing what the hook did is the caller's part).
    pub fn send(
        &self,
        w: Box<dyn Write + Send>,
        sink: Box<dyn LogSink>,
        at_cut: Option<CutHook>,
        opts: &TransferOptions,
        progress: &mut dyn FnMut(&Progress),
    ) -> Result<TransferReport> {
        self.send_inner(w, sink, at_cut, opts, progress)
            .map_err(|e| match e {
                Error::LogIo(io) => Error::Transfer(format!(
                    "the receiver is gone ({io}); the VM runs on as before: retry the join"
                )),
                e => e,
            })
    }

    fn send_inner(
        &self,
        w: Box<dyn Write + Send>,
        sink: Box<dyn LogSink>,
        at_cut: Option<CutHook>,
        opts: &TransferOptions,
        progress: &mut dyn FnMut(&Progress),
    ) -> Result<TransferReport> {
        let t0 = Instant::now();
        let pages = self.ram_size / PAGE_SIZE as u64;
        let mut w = CountingWriter {
            inner: BufWriter::with_capacity(1 << 20, w),
            n: 0,
        };
        let mut rep = TransferReport::default();
        w.write_all(&XFER_MAGIC)?;
        for v in [XFER_VERSION, self.config_hash, self.ram_size] {
            w64(&mut w, v)?;
        }
        // Everything written from here on is sent again in a later round.
        self.dirty.take_written()?;
        let all: Vec<u64> = (0..pages).collect();
        let mut prog = Progress {
            ram_pages: pages,
            ..Default::default()
        };
        self.send_pages(&mut w, 0, &all, false, &mut rep, &mut |sent, bytes| {
            prog.pages_sent = sent;
            prog.bytes_sent = bytes;
            prog.elapsed = t0.elapsed();
            progress(&prog);
        })?;
        prog.pages_sent = rep.pages_sent;
        prog.bytes_sent = w.n;
        prog.elapsed = t0.elapsed();
        progress(&prog);
        let mut round_start = Instant::now();
        for round in 1..=opts.max_rounds {
            let dirty = self.dirty.take_written()?;
            let dt = round_start.elapsed().as_secs_f64().max(1e-6);
            round_start = Instant::now();
            prog.round = round;
            prog.last_dirty_pages = dirty.len() as u64;
            prog.dirty_rate = dirty.len() as f64 / dt;
            rep.rounds = round;
            let converged = dirty.len() <= opts.stop_pages;
            self.send_pages(&mut w, round as u64, &dirty, true, &mut rep, &mut |_, _| {})?;
            let rate = w.n as f64 / t0.elapsed().as_secs_f64().max(1e-6);
            prog.pages_sent = rep.pages_sent;
            prog.bytes_sent = w.n;
            prog.elapsed = t0.elapsed();
            prog.remaining = Duration::from_secs_f64(
                (prog.last_dirty_pages * PAGE_SIZE as u64) as f64 / rate.max(1.0),
            );
            progress(&prog);
            if converged {
                rep.converged = true;
                break;
            }
        }
        w.flush()?;
        prog.round = u32::MAX;
        progress(&prog);
        // The stop phase, on the vCPU thread at its next exit.
        let (tx, rx) = std::sync::mpsc::channel::<(StopResult, CountingWriter)>();
        let mut w = Some(w);
        let mut sink = Some(sink);
        let mut at_cut = Some(at_cut);
        let stop_asked = Instant::now();
        let queued = self
            .control
            .run_at_next_exit(Box::new(move |vmm: &mut Vmm| {
                // The guest is paused for as long as this runs: do not let ordinary
                // threads (the receiver on this host, clients) preempt it in between.
                let _rt = RealtimeSection::enter();
                let t = Instant::now();
                let mut w = w.take().expect("stop phase runs once");
                let mut parts = Vec::new();
                let result = stop_phase(
                    vmm,
                    &mut w,
                    sink.take().expect("once"),
                    at_cut.take().expect("once"),
                    &mut parts,
                );
                let r = StopResult {
                    result,
                    pause: t.elapsed(),
                    parts,
                    started: t,
                };
                let _ = tx.send((r, w));
            }));
        if !queued {
            return Err(Error::Transfer(
                "another transfer is already stopping this VM".into(),
            ));
        }
        let (r, w) = match rx.recv_timeout(opts.stop_timeout) {
            Ok(x) => x,
            Err(_) => {
                // Withdraw the request if the vCPU has not taken it (it then never runs).
                self.control.cancel_exit_work();
                return Err(Error::Transfer(format!(
                    "the vCPU did not reach a guest exit within {:?} (or the VMM stopped)",
                    opts.stop_timeout
                )));
            }
        };
        rep.stop_wait = r.started.saturating_duration_since(stop_asked);
        rep.pause_parts = r.parts;
        let (stop_pages, cut_exit, precut) = r.result?;
        rep.precut_frames = precut;
        rep.stop_pages = stop_pages;
        rep.pages_sent += stop_pages;
        rep.cut_exit = cut_exit;
        rep.pause = r.pause;
        rep.bytes_sent = w.n;
        rep.total = t0.elapsed();
        Ok(rep)
    }

    /// After a transfer whose receiver never confirmed (it died, or the link broke in
    /// the stop phase): the VMM stops recording at its next exit and runs free again, as
    /// before the transfer. Returns false if other exit work is queued.
    pub fn abandon(&self) -> bool {
        self.control
            .run_at_next_exit(Box::new(|vmm: &mut Vmm| vmm.stop_recording()))
    }

    /// Sends `list` (page numbers): zero pages by number only (`with_zero`; in the first
    /// pass the receiver's RAM is zero already), the others with their contents, read
    /// while the vCPU may be writing them (a page written meanwhile is marked again and
    /// sent in the next round).
    /// `each_batch(pages sent, bytes sent)` after every batch (progress of a long pass).
    fn send_pages(
        &self,
        w: &mut CountingWriter,
        round: u64,
        list: &[u64],
        with_zero: bool,
        rep: &mut TransferReport,
        each_batch: &mut dyn FnMut(u64, u64),
    ) -> Result<()> {
        let mut buf = vec![0u8; BATCH * PAGE_SIZE];
        let mut zero = Vec::new();
        for chunk in list.chunks(BATCH) {
            let mut nonzero = Vec::with_capacity(chunk.len());
            for (i, &p) in chunk.iter().enumerate() {
                let dst = &mut buf[i * PAGE_SIZE..(i + 1) * PAGE_SIZE];
                // vm-memory copies guest memory with volatile accesses, which is how
                // memory that the vCPU writes concurrently may be read.
                self.mem
                    .read_slice(dst, GuestAddress(p * PAGE_SIZE as u64))
                    .map_err(|e| Error::Memory(format!("reading page {p}: {e}")))?;
                if dst.iter().all(|&b| b == 0) {
                    zero.push(p);
                } else {
                    nonzero.push(i);
                }
            }
            if !nonzero.is_empty() {
                w64(w, TAG_PAGES)?;
                w64(w, round)?;
                w64(w, nonzero.len() as u64)?;
                for &i in &nonzero {
                    w64(w, chunk[i])?;
                    w.write_all(&buf[i * PAGE_SIZE..(i + 1) * PAGE_SIZE])?;
                }
                rep.pages_sent += nonzero.len() as u64;
            }
            each_batch(rep.pages_sent, w.n);
        }
        if with_zero && !zero.is_empty() {
            w64(w, TAG_ZERO)?;
            w64(w, zero.len() as u64)?;
            for &p in &zero {
                w64(w, p)?;
            }
            rep.zero_pages += zero.len() as u64;
        }
        Ok(())
    }
}

/// On the vCPU thread, stopped at an exit: the caller's hook, the frames in flight, the
/// last written pages, the machine state, then the new log. Returns (pages sent, cut
/// exit, frames that travelled).
fn stop_phase(
    vmm: &mut Vmm,
    w: &mut CountingWriter,
    sink: Box<dyn LogSink>,
    at_cut: Option<CutHook>,
    parts: &mut Vec<(&'static str, Duration)>,
) -> Result<(u64, u64, u64)> {
    let mut t = Instant::now();
    let mut lap = |name: &'static str, parts: &mut Vec<(&'static str, Duration)>| {
        parts.push((name, t.elapsed()));
        t = Instant::now();
    };
    let cut = vmm.exits();
    let info = match at_cut {
        Some(h) => Some(h(vmm)?),
        None => None,
    };
    lap("hook", parts);
    // After the hook: from here on the backend's frames belong to the new log.
    let precut = vmm.take_precut_frames(PRECUT_EPOCH)?;
    let dirty = vmm.vm().dirty.take_written()?;
    let mut n = 0;
    for chunk in dirty.chunks(BATCH) {
        w64(w, TAG_PAGES)?;
        w64(w, u64::from(u32::MAX))?;
        w64(w, chunk.len() as u64)?;
        for &p in chunk {
            let page = vmm.vm().ram.slice(p * PAGE_SIZE as u64, PAGE_SIZE)?;
            w64(w, p)?;
            w.write_all(page)?;
        }
        n += chunk.len() as u64;
    }
    lap("pages", parts);
    w64(w, TAG_STATE)?;
    vmm.write_state(w)?;
    if !precut.is_empty() {
        w64(w, TAG_FRAMES)?;
        w64(w, precut.len() as u64)?;
        for (k, f) in &precut {
            w64(w, k.seq)?;
            w64(w, f.len() as u64)?;
            w.write_all(f)?;
        }
    }
    if let Some(info) = info {
        w64(w, TAG_CUT_INFO)?;
        w64(w, info.len() as u64)?;
        w.write_all(&info)?;
    }
    w64(w, TAG_DONE)?;
    w64(w, cut)?;
    w.flush()?;
    lap("state+flush", parts);
    // Everything the receiver needs is out: from here on the log carries the rest.
    vmm.start_new_log(sink)?;
    lap("new log", parts);
    Ok((n, cut, precut.len() as u64))
}

/// The calling thread under SCHED_FIFO (priority 1) until dropped, then back to its
/// previous policy. Without the privilege (CAP_SYS_NICE) it changes nothing.
struct RealtimeSection {
    prev: Option<(libc::c_int, libc::sched_param)>,
}

impl RealtimeSection {
    fn enter() -> RealtimeSection {
        // SAFETY: sched_getscheduler/getparam/setscheduler on the calling thread (pid 0)
        // with a valid, initialised sched_param.
        unsafe {
            let policy = libc::sched_getscheduler(0);
            let mut param: libc::sched_param = std::mem::zeroed();
            if policy < 0 || libc::sched_getparam(0, &mut param) != 0 {
                return RealtimeSection { prev: None };
            }
            let fifo = libc::sched_param { sched_priority: 1 };
            if libc::sched_setscheduler(0, libc::SCHED_FIFO, &fifo) != 0 {
                return RealtimeSection { prev: None };
            }
            RealtimeSection {
                prev: Some((policy, param)),
            }
        }
    }
}

impl Drop for RealtimeSection {
    fn drop(&mut self) {
        if let Some((policy, param)) = self.prev {
            // SAFETY: restores the calling thread's own earlier policy and parameters.
            unsafe { libc::sched_setscheduler(0, policy, &param) };
        }
    }
}

struct CountingWriter {
    inner: BufWriter<Box<dyn Write + Send>>,
    n: u64,
}

impl Write for CountingWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let k = self.inner.write(buf)?;
        self.n += k as u64;
        Ok(k)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

struct CountingReader<'a> {
    inner: &'a mut dyn Read,
    n: u64,
}

impl Read for CountingReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let k = self.inner.read(buf)?;
        self.n += k as u64;
        Ok(k)
    }
}

fn w64(w: &mut dyn Write, v: u64) -> Result<()> {
    w.write_all(&v.to_le_bytes())?;
    Ok(())
}

fn read_exact(r: &mut dyn Read, buf: &mut [u8]) -> Result<()> {
    r.read_exact(buf).map_err(|e| {
        Error::Transfer(format!(
            "the transfer stream ended early ({e}): the source stopped or the link broke; retry the join"
        ))
    })
}

fn r64(r: &mut dyn Read) -> Result<u64> {
    let mut b = [0u8; 8];
    read_exact(r, &mut b)?;
    Ok(u64::from_le_bytes(b))
}
