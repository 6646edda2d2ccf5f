//! The VMM run loop: modes, record/replay of every non-deterministic input, divergence
//! checks, go-live and snapshots.
//!
//! # Delivery points
//! The guest is a ring-3 program that touches devices by MMIO, so it exits to the VMM at
//! points that depend only on its own execution. `exits` counts those guest-caused exits
//! (signals/EINTR are not counted). Every input reaches the guest while the vCPU is
//! stopped at an exit: the value of an MMIO read, frames copied into the RX ring, and
//! interrupts injected (KVM_INTERRUPT) for the next entry. So "exit number N" is an exact
//! delivery point; the guest RIP is logged with it as a cross-check.
//!
//! Per exit N the order is fixed, in record and replay alike:
//! 1. the exit's own value (CLOCK / ENTROPY read), then
//! 2. RX frames delivered, then a CHECKPOINT (every `checkpoint_interval` exits), then
//! 3. at the top of the loop: END (if stopping) or IRQ injection, then KVM_RUN.
//!
//! In replay, the VMM waits for the log to contain an entry *after* the current point
//! before resuming the guest, so it never runs ahead of what the primary has logged, and
//! it delivers nothing that is not in the log.
use crate::abi::*;
use crate::devices::{Clock, Console, Nic, Timer, entropy};
use crate::error::{Error, Result};
use crate::hash::{FNV_OFFSET, fnv1a, hash_words};
use crate::image;
use crate::net::NetBackend;
use crate::vmlog::{FrameStore, LogEntry, LogSink, LogSource, Recv};
use crate::vstate::vcpu::{Vcpu, regs_hash};
use crate::vstate::vm::Vm;
use ft_common::vmlog::*;
use ft_common::wire::{ETHERTYPE_FT, FT_MAGIC, LogHdr};
use kvm_ioctls::VcpuExit;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use zerocopy::FromBytes;

/// Operating mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// No log; inputs from the host, output to the network.
    Free,
    /// Primary: like `Free`, and every input is appended to the log sink.
    Record,
    /// Backup: inputs only from the log source, output computed but suppressed.
    Replay,
}

/// Static configuration of a VMM.
#[derive(Clone, Debug)]
pub struct VmmConfig {
    pub mode: Mode,
    pub mac: [u8; 6],
    pub ip: [u8; 4],
    pub prefix_len: u8,
    pub gateway: [u8; 4],
    pub port: u16,
    /// Record: emit a CHECKPOINT entry every this many exits (0: never).
    pub checkpoint_interval: u64,
    /// `run` returns [`RunOutcome::ExitLimit`] once this many exits have happened.
    pub max_exits: Option<u64>,
    /// Inbound frames carry the data plane's 46-byte `LogHdr` (log by sequence number).
    pub tagged_input: bool,
    /// Keep a copy of every output frame (tests).
    pub capture_tx: bool,
    pub console_echo: bool,
    /// Replay: when the log ends, go live instead of stopping (END) or failing (truncated).
    pub go_live_at_end: bool,
    /// Replay: when the log ends, wait for a go-live (or stop) request instead of
    /// stopping (END) or failing (truncated). For a backup fed by a live stream.
    pub wait_for_go_live: bool,
    /// Pin the vCPU thread (the thread calling `run`) to this host CPU. Use the same
    /// index on primary and backup hosts.
    pub pin_cpu: Option<usize>,
}

impl Default for VmmConfig {
    fn default() -> Self {
        VmmConfig {
            mode: Mode::Free,
            mac: [0x02, 0x00, 0x00, 0x00, 0x00, 0x02],
            ip: [10, 0, 0, 2],
            prefix_len: 24,
            gateway: [0; 4],
            port: 6379,
            checkpoint_interval: 1000,
            max_exits: None,
            tagged_input: false,
            capture_tx: false,
            console_echo: false,
            go_live_at_end: false,
            wait_for_go_live: false,
            pin_cpu: None,
        }
    }
}

impl VmmConfig {
    fn boot_info(&self) -> BootInfo {
        BootInfo {
            magic: BOOT_MAGIC,
            mac: self.mac,
            prefix_len: self.prefix_len,
            _pad: 0,
            ip: self.ip,
            gateway: self.gateway,
            port: self.port,
            _pad2: [0; 6],
            heap_base: HEAP_BASE,
            heap_end: HEAP_END,
        }
    }
}

/// Asynchronous requests to a running VMM (from any thread, a signal handler's helper
/// thread, or the daemon's control plane).
pub struct Control {
    stop: AtomicBool,
    go_live: AtomicBool,
    wake: OwnedFd,
    vcpu: Arc<VcpuThread>,
}

/// The thread inside `Vmm::run`, for signal kicks. `pthread_kill` is only called with
/// `lock` held and `tid` non-zero, and `Vmm::run` clears `tid` under the same lock before
/// it returns, so a kick can never reach another thread that reused the pthread id (a
/// stray EINTR in another VMM's run loop).
struct VcpuThread {
    lock: std::sync::Mutex<()>,
    /// pthread id of the thread inside `Vmm::run`, 0 if none.
    tid: std::sync::atomic::AtomicU64,
}

impl VcpuThread {
    /// Sends the kick signal if a thread is inside `Vmm::run`; false if none is.
    fn kick(&self) -> bool {
        let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let tid = self.tid.load(Ordering::SeqCst);
        if tid == 0 {
            return false;
        }
        // SAFETY: `tid` is the pthread id of a thread that is inside `Vmm::run` (it clears
        // `tid` under `lock`, which we hold, before leaving), so the thread is alive; the
        // handler is a no-op.
        unsafe { libc::pthread_kill(tid as libc::pthread_t, KICK_SIGNAL) };
        true
    }

    fn set(&self, tid: u64) {
        let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        self.tid.store(tid, Ordering::SeqCst);
    }
}

/// Signal used to kick the vCPU thread out of KVM_RUN (a guest spinning without exits
/// never returns to the VMM otherwise). Its handler does nothing.
pub const KICK_SIGNAL: libc::c_int = libc::SIGUSR2;

extern "C" fn on_kick(_: libc::c_int) {}

fn install_kick_handler() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: installs a handler that does nothing (async-signal-safe); no SA_RESTART
        // so KVM_RUN returns EINTR.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_kick as *const () as usize;
            sa.sa_flags = 0;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(KICK_SIGNAL, &sa, std::ptr::null_mut());
        }
    });
}

impl Control {
    pub fn new() -> Arc<Control> {
        // SAFETY: eventfd(2) with valid flags; the result is checked before use.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        assert!(
            fd >= 0,
            "eventfd failed: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: `fd` is a fresh descriptor owned by nobody else.
        let wake = unsafe { OwnedFd::from_raw_fd(fd) };
        Arc::new(Control {
            stop: AtomicBool::new(false),
            go_live: AtomicBool::new(false),
            wake,
            vcpu: Arc::new(VcpuThread {
                lock: std::sync::Mutex::new(()),
                tid: std::sync::atomic::AtomicU64::new(0),
            }),
        })
    }

    /// Stops the VMM at the next exit (a recording VMM writes END first).
    pub fn request_stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.kick();
        // Interrupt KVM_RUN too, repeatedly until the run loop has returned (a single
        // signal could land just before the thread enters KVM_RUN).
        let vcpu = self.vcpu.clone();
        if vcpu.kick() {
            std::thread::spawn(move || {
                for _ in 0..1000 {
                    std::thread::sleep(Duration::from_millis(10));
                    if !vcpu.kick() {
                        break;
                    }
                }
            });
        }
    }

    /// Replay: consume every entry already buffered, then continue as a free-running
    /// primary with output enabled, without restarting the guest.
    pub fn request_go_live(&self) {
        self.go_live.store(true, Ordering::SeqCst);
        self.kick();
    }

    pub fn stop_requested(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    pub fn go_live_requested(&self) -> bool {
        self.go_live.load(Ordering::SeqCst)
    }

    fn kick(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live local to our eventfd.
        unsafe {
            libc::write(
                self.wake.as_raw_fd(),
                &one as *const u64 as *const libc::c_void,
                8,
            )
        };
    }

    fn drain(&self) {
        let mut v: u64 = 0;
        // SAFETY: reads 8 bytes into a live local from our non-blocking eventfd.
        unsafe {
            libc::read(
                self.wake.as_raw_fd(),
                &mut v as *mut u64 as *mut libc::c_void,
                8,
            )
        };
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunOutcome {
    /// Stopped on request (record: END written).
    Stopped,
    /// `max_exits` reached; `run` may be called again.
    ExitLimit,
    /// The guest powered off with this code.
    PowerOff(u64),
    /// Replay reached the END entry and verified the final state.
    ReplayComplete,
}

/// Counters of one VMM.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    pub clock_reads: u64,
    pub entropy_reads: u64,
    pub idles: u64,
    pub doorbells: u64,
    pub irqs_injected: u64,
    pub timer_irqs: u64,
    pub nic_irqs: u64,
    pub checkpoints: u64,
    pub checkpoints_verified: u64,
    pub log_entries: u64,
    pub log_bytes: u64,
    pub entries_consumed: u64,
}

/// Result of a run.
#[derive(Clone, Debug)]
pub struct RunReport {
    pub outcome: RunOutcome,
    pub exits: u64,
    /// Hash of registers and all of RAM at the end (full recomputation).
    pub state_hash: u64,
    pub regs_hash: u64,
    pub mem_hash: u64,
    pub tx_frames: u64,
    pub tx_hash: u64,
    pub rx_frames: u64,
    pub went_live_at_exit: Option<u64>,
    pub stats: Stats,
    pub elapsed: Duration,
}

/// Opens a network backend later (at go-live).
pub type NetFactory = Box<dyn FnOnce() -> Result<Box<dyn NetBackend>> + Send>;

/// Marks a write in `Vmm::dev_hash` (register offsets are < `MMIO_SIZE`).
const DEV_WRITE: u64 = 1 << 63;

const PENDING_TIMER: u32 = 1;
const PENDING_NIC: u32 = 2;

/// One VM with its vCPU, devices and log endpoints.
pub struct Vmm {
    vcpu: Vcpu,
    vm: Vm,
    cfg: VmmConfig,
    mode: Mode,
    pub(crate) clock: Clock,
    pub(crate) timer: Timer,
    pub(crate) nic: Nic,
    console: Console,
    net: Option<Box<dyn NetBackend>>,
    net_on_live: Option<NetFactory>,
    sink: Option<Box<dyn LogSink>>,
    source: Option<Box<dyn LogSource>>,
    peeked: Option<LogEntry>,
    frames: Option<Arc<dyn FrameStore>>,
    control: Arc<Control>,
    pub(crate) exits: u64,
    /// Running hash of every device access the guest made (register, value): the guest's
    /// device-visible behaviour (e.g. the timer deadlines it computes from clock values),
    /// part of the checkpoint/END state so a backup whose guest wrote other values to its
    /// devices is a divergence even if its RAM and registers happen to agree.
    pub(crate) dev_hash: u64,
    pub(crate) pending_irqs: u32,
    pub(crate) stats: Stats,
    config_hash: u64,
    pub(crate) log_started: bool,
    went_live_at: Option<u64>,
    rxbuf: Vec<u8>,
}

fn pin_current_thread(cpu: usize) -> Result<()> {
    // SAFETY: cpu_set_t is plain data; CPU_SET and sched_setaffinity(0 = this thread)
    // only read/write the local set.
    let r = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if r != 0 {
        return Err(Error::Config(format!(
            "cannot pin the vCPU thread to CPU {cpu}: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}

fn exc_name(v: u64) -> &'static str {
    const N: [&str; 21] = [
        "#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM", "#DF", "CSO", "#TS", "#NP", "#SS",
        "#GP", "#PF", "?", "#MF", "#AC", "#MC", "#XM", "#VE",
    ];
    N.get(v as usize).copied().unwrap_or("exception")
}

fn has_error_code(v: u64) -> bool {
    matches!(v, 8 | 10..=14 | 17 | 21 | 29 | 30)
}

enum Exit {
    MmioRead { addr: u64, len: usize },
    MmioWrite { addr: u64, len: usize, value: u64 },
    Io { port: u16, write: bool },
    Interrupted,
}

impl Vmm {
    /// Creates a VM, loads `guest_elf` (validated) and sets up long mode.
    pub fn new(cfg: VmmConfig, guest_elf: &[u8], control: Arc<Control>) -> Result<Vmm> {
        let mut vm = Vm::new(RAM_SIZE as usize)?;
        let img = image::load(guest_elf, &mut vm.ram)?;
        vm.setup_system_tables(&img, &cfg.boot_info())?;
        let vcpu = Vcpu::new(&vm.kvm, &vm.fd)?;
        vcpu.setup_long_mode(img.header.entry)?;
        // Start dirty tracking from the loaded state.
        let _ = vm.take_dirty_log()?;
        vm.ram.rehash_all();
        let config_hash = hash_words(
            &[
                img.hash,
                RAM_SIZE,
                u64::from_le_bytes([
                    cfg.mac[0], cfg.mac[1], cfg.mac[2], cfg.mac[3], cfg.mac[4], cfg.mac[5], 0, 0,
                ]),
                u32::from_be_bytes(cfg.ip) as u64,
                u32::from_be_bytes(cfg.gateway) as u64,
                cfg.prefix_len as u64,
                cfg.port as u64,
                GUEST_ABI_VERSION as u64,
            ],
            0,
        );
        let nic = Nic {
            capture: cfg.capture_tx.then(Vec::new),
            ..Default::default()
        };
        let console = Console {
            echo: cfg.console_echo,
            ..Default::default()
        };
        Ok(Vmm {
            vcpu,
            vm,
            mode: cfg.mode,
            cfg,
            clock: Clock::new(),
            timer: Timer::default(),
            nic,
            console,
            net: None,
            net_on_live: None,
            sink: None,
            source: None,
            peeked: None,
            frames: None,
            control,
            exits: 0,
            dev_hash: FNV_OFFSET,
            pending_irqs: 0,
            stats: Stats::default(),
            config_hash,
            log_started: false,
            went_live_at: None,
            rxbuf: vec![0u8; 65536],
        })
    }

    /// Attaches the NIC backend (free/record mode).
    pub fn set_net(&mut self, net: Box<dyn NetBackend>) {
        self.net = Some(net);
    }

    /// Replay: the backend to open when going live (the tap is usually still held by the
    /// primary while replaying).
    pub fn set_net_on_live(&mut self, f: NetFactory) {
        self.net_on_live = Some(f);
    }

    pub fn set_sink(&mut self, sink: Box<dyn LogSink>) {
        self.sink = Some(sink);
    }

    pub fn set_source(&mut self, source: Box<dyn LogSource>) {
        self.source = Some(source);
    }

    pub fn set_frame_store(&mut self, store: Arc<dyn FrameStore>) {
        self.frames = Some(store);
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    pub fn exits(&self) -> u64 {
        self.exits
    }

    pub fn config_hash(&self) -> u64 {
        self.config_hash
    }

    pub fn config(&self) -> &VmmConfig {
        &self.cfg
    }

    pub fn set_max_exits(&mut self, m: Option<u64>) {
        self.cfg.max_exits = m;
    }

    pub fn console_lines(&self) -> &[String] {
        &self.console.lines
    }

    /// Output frames captured so far (with `capture_tx`).
    pub fn captured_tx(&self) -> Option<&[Vec<u8>]> {
        self.nic.capture.as_deref()
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    pub fn control(&self) -> &Arc<Control> {
        &self.control
    }

    pub(crate) fn vm(&self) -> &Vm {
        &self.vm
    }

    pub(crate) fn vm_mut(&mut self) -> &mut Vm {
        &mut self.vm
    }

    pub(crate) fn vcpu(&self) -> &Vcpu {
        &self.vcpu
    }

    pub(crate) fn vcpu_mut(&mut self) -> &mut Vcpu {
        &mut self.vcpu
    }

    // ---------------------------------------------------------------- log plumbing

    fn log(
        &mut self,
        kind: u8,
        rip: u64,
        value: u64,
        aux: u64,
        arg: u32,
        payload: &[u8],
    ) -> Result<()> {
        if self.mode != Mode::Record {
            return Ok(());
        }
        let Some(sink) = self.sink.as_mut() else {
            return Ok(());
        };
        let mut h = EntryHdr::new(kind, self.exits, rip, value);
        h.aux.set(aux);
        h.arg.set(arg);
        sink.append(&h, payload)?;
        self.stats.log_entries += 1;
        self.stats.log_bytes += (ENTRY_HLEN + payload.len()) as u64;
        Ok(())
    }

    fn flush_log(&mut self) -> Result<()> {
        if let Some(s) = self.sink.as_mut() {
            s.flush()?;
        }
        Ok(())
    }

    /// Next entry of the log (blocking), or `None` if the VMM went live instead.
    fn peek(&mut self) -> Result<Option<&LogEntry>> {
        if self.mode != Mode::Replay {
            return Ok(None);
        }
        if self.peeked.is_none() {
            let Some(src) = self.source.as_mut() else {
                return Err(Error::Config("replay mode needs a log source".into()));
            };
            loop {
                let go_live = self.control.go_live_requested();
                let timeout = if go_live {
                    Duration::ZERO
                } else {
                    Duration::from_millis(20)
                };
                match src.recv(timeout)? {
                    Recv::Entry(e) => {
                        self.peeked = Some(e);
                        break;
                    }
                    Recv::Empty if go_live => {
                        self.go_live()?;
                        return Ok(None);
                    }
                    Recv::Empty => {
                        if self.control.stop_requested() {
                            return Err(Error::Stopped);
                        }
                    }
                    Recv::End => {
                        if go_live || self.cfg.go_live_at_end || self.wait_for_go_live_request()? {
                            self.go_live()?;
                            return Ok(None);
                        }
                        return Err(Error::LogTruncated {
                            after_exit: self.exits,
                        });
                    }
                }
            }
        }
        Ok(self.peeked.as_ref())
    }

    /// Consumes the next entry if it is for the current exit and of one of `kinds`.
    fn take_if(&mut self, kinds: &[u8]) -> Result<Option<LogEntry>> {
        let exits = self.exits;
        let Some(e) = self.peek()? else {
            return Ok(None);
        };
        if e.exit() < exits {
            let what = format!(
                "log has a {} entry for exit {} that the guest never reached in that form",
                kind_name(e.kind()),
                e.exit()
            );
            return Err(self.divergence(what));
        }
        if e.exit() == exits && kinds.contains(&e.kind()) {
            self.stats.entries_consumed += 1;
            return Ok(self.peeked.take());
        }
        Ok(None)
    }

    fn divergence(&self, what: String) -> Error {
        Error::Divergence {
            exit: self.exits,
            rip: self.vcpu.exit_rip(),
            what,
        }
    }

    fn check_rip(&self, e: &LogEntry, rip: u64) -> Result<()> {
        if e.hdr.rip.get() != rip {
            return Err(self.divergence(format!(
                "{} entry was logged at rip {:#x}, the backup is at rip {rip:#x}",
                kind_name(e.kind()),
                e.hdr.rip.get()
            )));
        }
        Ok(())
    }

    fn start_log(&mut self) -> Result<()> {
        if self.log_started {
            return Ok(());
        }
        self.log_started = true;
        match self.mode {
            Mode::Record => {
                let (h, v) = (self.config_hash, VMLOG_VERSION);
                self.log(EV_HEADER, 0, h, v, 0, &VMLOG_MAGIC)?;
                self.flush_log()?;
            }
            Mode::Replay => {
                let Some(e) = self.take_if(&[EV_HEADER])? else {
                    return Err(Error::LogCorrupt {
                        offset: 0,
                        what: "log does not start with a header entry".into(),
                    });
                };
                if e.payload != VMLOG_MAGIC || e.hdr.aux.get() != VMLOG_VERSION {
                    return Err(Error::LogCorrupt {
                        offset: 0,
                        what: "bad log magic or version".into(),
                    });
                }
                if e.value() != self.config_hash {
                    return Err(Error::LogConfigMismatch {
                        log: e.value(),
                        ours: self.config_hash,
                    });
                }
            }
            Mode::Free => {}
        }
        Ok(())
    }

    /// With `wait_for_go_live`: blocks until go-live (true) or stop (Err(Stopped)).
    fn wait_for_go_live_request(&mut self) -> Result<bool> {
        if !self.cfg.wait_for_go_live {
            return Ok(false);
        }
        self.flush_log()?;
        loop {
            if self.control.go_live_requested() {
                return Ok(true);
            }
            if self.control.stop_requested() {
                return Err(Error::Stopped);
            }
            let mut fds = [libc::pollfd {
                fd: self.control.wake.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            }];
            // SAFETY: poll(2) on one initialised pollfd we own.
            unsafe { libc::poll(fds.as_mut_ptr(), 1, 50) };
            self.control.drain();
        }
    }

    fn go_live(&mut self) -> Result<()> {
        self.mode = Mode::Free;
        self.peeked = None;
        self.source = None;
        self.clock.resync();
        self.went_live_at = Some(self.exits);
        if self.net.is_none()
            && let Some(f) = self.net_on_live.take()
        {
            self.net = Some(f()?);
        }
        if self.cfg.console_echo {
            eprintln!("ft-vmm: went live at exit {}", self.exits);
        }
        Ok(())
    }

    // ---------------------------------------------------------------- state hashes

    /// (combined, regs, mem) hash of the current state; `full` rehashes all of RAM.
    pub fn state_hash(&mut self, full: bool) -> Result<(u64, u64, u64)> {
        let dirty = self.vm.take_dirty_log()?;
        self.vm.ram.update_hashes(&dirty);
        let mem = if full {
            self.vm.ram.full_hash()
        } else {
            self.vm.ram.memory_hash()
        };
        let regs = regs_hash(&self.vcpu.regs()?);
        Ok((hash_words(&[regs, mem, self.dev_hash], 0xc4ec), regs, mem))
    }

    fn checkpoint_stage(&mut self) -> Result<()> {
        match self.mode {
            Mode::Replay => {
                while let Some(e) = self.take_if(&[EV_CHECKPOINT])? {
                    let (h, _, _) = self.state_hash(false)?;
                    if h != e.value() || self.nic.tx_frames != e.hdr.aux.get() {
                        return Err(self.divergence(format!(
                            "checkpoint mismatch: primary state {:#x} / {} output frames, backup state {h:#x} / {} output frames",
                            e.value(),
                            e.hdr.aux.get(),
                            self.nic.tx_frames
                        )));
                    }
                    self.stats.checkpoints_verified += 1;
                }
            }
            Mode::Record => {
                let k = self.cfg.checkpoint_interval;
                if k > 0 && self.exits.is_multiple_of(k) {
                    let (h, _, _) = self.state_hash(false)?;
                    let rip = self.vcpu.exit_rip();
                    let tx = self.nic.tx_frames;
                    self.log(EV_CHECKPOINT, rip, h, tx, 0, &[])?;
                    self.stats.checkpoints += 1;
                }
            }
            Mode::Free => {}
        }
        Ok(())
    }

    // ---------------------------------------------------------------- inputs

    /// Value of a clock/entropy read at the current exit.
    fn input_value(&mut self, kind: u8, rip: u64) -> Result<u64> {
        if self.mode == Mode::Replay {
            if let Some(e) = self.take_if(&[kind])? {
                self.check_rip(&e, rip)?;
                if kind == EV_CLOCK {
                    self.clock.observe(e.value());
                }
                return Ok(e.value());
            }
            if self.mode == Mode::Replay {
                let next = self
                    .peeked
                    .as_ref()
                    .map(|e| format!("{} entry at exit {}", kind_name(e.kind()), e.exit()))
                    .unwrap_or_default();
                return Err(self.divergence(format!(
                    "guest read the {} but the log has {next}",
                    kind_name(kind)
                )));
            }
        }
        let v = if kind == EV_CLOCK {
            self.clock.read_live()
        } else {
            entropy::host_random()
        };
        self.log(kind, rip, v, 0, 0, &[])?;
        Ok(v)
    }

    /// Polls the backend and the timer (free/record). Returns true if anything was queued.
    fn poll_inputs(&mut self) -> Result<bool> {
        let mut any = false;
        if self.net.is_some() {
            let mut free = self.nic.rx_free(&self.vm.ram)?;
            let mut n = 0;
            while free > 0 {
                let Some(len) = self.net.as_mut().expect("checked").recv(&mut self.rxbuf)? else {
                    break;
                };
                let buf = std::mem::take(&mut self.rxbuf);
                let r = self.deliver_live(&buf[..len]);
                self.rxbuf = buf;
                r?;
                n += 1;
                free -= 1;
            }
            if n > 0 {
                self.pending_irqs |= PENDING_NIC;
                any = true;
            }
        }
        if self.timer.take_expired(self.clock.host_now()) {
            self.pending_irqs |= PENDING_TIMER;
            any = true;
        }
        Ok(any)
    }

    fn deliver_live(&mut self, buf: &[u8]) -> Result<()> {
        let rip = self.vcpu.exit_rip();
        if self.cfg.tagged_input
            && let Ok((hdr, rest)) = LogHdr::ref_from_prefix(buf)
            && hdr.eth.ethertype.get() == ETHERTYPE_FT
            && hdr.ft.magic == FT_MAGIC
        {
            let len = (hdr.ft.len.get() as usize).min(rest.len());
            let frame = &rest[..len];
            let seq = hdr.ft.seq.get();
            if let Some(s) = self.frames.as_ref() {
                s.put(seq, frame);
            }
            self.nic.deliver(&mut self.vm.ram, frame)?;
            let h = fnv1a(frame, FNV_OFFSET);
            return self.log(EV_RX_FRAME_REF, rip, seq, h, frame.len() as u32, &[]);
        }
        self.nic.deliver(&mut self.vm.ram, buf)?;
        self.log(EV_RX_FRAME, rip, 0, 0, 0, buf)
    }

    /// Delivers logged frames for this exit (replay).
    fn replay_frames(&mut self) -> Result<()> {
        while let Some(e) = self.take_if(&[EV_RX_FRAME, EV_RX_FRAME_REF])? {
            if self.nic.rx_free(&self.vm.ram)? == 0 {
                return Err(
                    self.divergence("log delivers a frame but the backup's RX ring is full".into())
                );
            }
            if e.kind() == EV_RX_FRAME {
                self.nic.deliver(&mut self.vm.ram, &e.payload)?;
            } else {
                let seq = e.value();
                let store = self.frames.as_ref().ok_or(Error::FrameMissing { seq })?;
                let frame = store.get(seq).ok_or(Error::FrameMissing { seq })?;
                if frame.len() != e.hdr.arg.get() as usize
                    || fnv1a(&frame, FNV_OFFSET) != e.hdr.aux.get()
                {
                    return Err(self.divergence(format!(
                        "frame {seq} from the frame store does not match the logged length/hash"
                    )));
                }
                self.nic.deliver(&mut self.vm.ram, &frame)?;
            }
        }
        Ok(())
    }

    /// Idle exit (free/record): block until a frame, the timer, or a control request.
    fn wait_for_input(&mut self) -> Result<()> {
        self.flush_log()?;
        loop {
            if self.poll_inputs()? || self.pending_irqs != 0 {
                return Ok(());
            }
            if self.control.stop_requested()
                || (self.timer.deadline.is_none() && self.net.is_none())
            {
                return Ok(());
            }
            let timeout_ms = match self.timer.deadline {
                Some(d) => {
                    (d.saturating_sub(self.clock.host_now()).div_ceil(1_000_000)).min(100) as i32
                }
                None => 100,
            };
            let mut fds = [
                libc::pollfd {
                    fd: self.control.wake.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.net.as_ref().and_then(|n| n.poll_fd()).unwrap_or(-1),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: poll(2) on an array of two initialised pollfd structs we own.
            unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout_ms) };
            if fds[0].revents != 0 {
                self.control.drain();
            }
        }
    }

    fn inject_stage(&mut self) -> Result<()> {
        if self.mode == Mode::Replay {
            while let Some(e) = self.take_if(&[EV_IRQ])? {
                if !self.vcpu.can_inject() {
                    return Err(self.divergence(
                        "log injects an interrupt but the backup's guest cannot take one".into(),
                    ));
                }
                self.check_rip(&e, self.vcpu.exit_rip())?;
                self.vcpu.inject(e.hdr.arg.get())?;
                self.count_irq(e.hdr.arg.get());
            }
            if self.mode == Mode::Replay {
                return Ok(());
            }
        }
        if self.pending_irqs != 0 && self.exits > 0 && self.vcpu.can_inject() {
            // One interrupt per entry (KVM_INTERRUPT holds one); the timer first.
            let (bit, vector) = if self.pending_irqs & PENDING_TIMER != 0 {
                (PENDING_TIMER, TIMER_VECTOR)
            } else {
                (PENDING_NIC, NIC_VECTOR)
            };
            self.pending_irqs &= !bit;
            self.vcpu.inject(vector)?;
            self.count_irq(vector);
            let rip = self.vcpu.exit_rip();
            self.log(EV_IRQ, rip, 0, 0, vector, &[])?;
        }
        Ok(())
    }

    fn count_irq(&mut self, vector: u32) {
        self.stats.irqs_injected += 1;
        if vector == TIMER_VECTOR {
            self.stats.timer_irqs += 1;
        } else {
            self.stats.nic_irqs += 1;
        }
    }

    // ---------------------------------------------------------------- exits

    fn run_vcpu(&mut self) -> Result<Exit> {
        self.vcpu.clear_exit_override();
        match self.vcpu.fd.run() {
            Ok(VcpuExit::MmioRead(addr, data)) => Ok(Exit::MmioRead {
                addr,
                len: data.len(),
            }),
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                let mut v = [0u8; 8];
                let n = data.len().min(8);
                v[..n].copy_from_slice(&data[..n]);
                Ok(Exit::MmioWrite {
                    addr,
                    len: data.len(),
                    value: u64::from_le_bytes(v),
                })
            }
            Ok(VcpuExit::IoIn(port, _)) => Ok(Exit::Io { port, write: false }),
            Ok(VcpuExit::IoOut(port, _)) => Ok(Exit::Io { port, write: true }),
            Ok(VcpuExit::Hlt) => Err(Error::GuestHalted {
                rip: self.vcpu.exit_rip(),
            }),
            Ok(VcpuExit::Shutdown) => Err(Error::TripleFault {
                rip: self.vcpu.regs().map(|r| r.rip).unwrap_or(0),
            }),
            Ok(VcpuExit::FailEntry(reason, _)) => Err(Error::VcpuFailed(format!(
                "KVM_EXIT_FAIL_ENTRY, hardware reason {reason:#x}"
            ))),
            Ok(VcpuExit::InternalError) => Err(Error::VcpuFailed(
                "KVM_EXIT_INTERNAL_ERROR (emulation failure)".into(),
            )),
            Ok(other) => Err(Error::VcpuFailed(format!("unexpected exit {other:?}"))),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                Ok(Exit::Interrupted)
            }
            Err(e) => Err(Error::KvmIoctl {
                op: "KVM_RUN",
                err: e,
            }),
        }
    }

    fn set_mmio_read_value(&mut self, v: u64, len: usize) {
        let run = self.vcpu.fd.get_kvm_run();
        // SAFETY: the last exit was KVM_EXIT_MMIO (read), so the `mmio` member of the
        // union is the active one; `len` <= 8 = size of its data array.
        unsafe {
            let mmio = &mut run.__bindgen_anon_1.mmio;
            mmio.data[..len].copy_from_slice(&v.to_le_bytes()[..len]);
        }
    }

    fn fault(&mut self, vector: u64) -> Error {
        let regs = self.vcpu.regs().ok();
        let rsp = regs.map(|r| r.rsp).unwrap_or(0);
        let (err, rip) = if has_error_code(vector) {
            (
                self.vm.ram.read_u64(rsp).unwrap_or(0),
                self.vm.ram.read_u64(rsp + 8).unwrap_or(0),
            )
        } else {
            (0, self.vm.ram.read_u64(rsp).unwrap_or(0))
        };
        let cr2 = self.vcpu.sregs().map(|s| s.cr2).unwrap_or(0);
        Error::GuestFault {
            vector,
            name: exc_name(vector),
            rip,
            error_code: err,
            cr2,
        }
    }

    /// Handles one guest-caused exit; returns `Some(outcome)` to end the run.
    fn handle(&mut self, exit: Exit) -> Result<Option<RunOutcome>> {
        self.exits += 1;
        let rip = self.vcpu.exit_rip();
        let mut idle = false;
        match exit {
            Exit::Interrupted => unreachable!("not counted"),
            Exit::Io { port, write } => {
                return Err(Error::BadDeviceAccess {
                    what: if write {
                        "port I/O write"
                    } else {
                        "port I/O read"
                    },
                    addr: port as u64,
                    len: 0,
                    rip,
                });
            }
            Exit::MmioRead { addr, len } => {
                let off = addr.wrapping_sub(MMIO_BASE);
                if len != 8 || off >= MMIO_SIZE {
                    return Err(Error::BadDeviceAccess {
                        what: "MMIO read",
                        addr,
                        len,
                        rip,
                    });
                }
                let v = match off {
                    REG_CLOCK_NS => {
                        self.stats.clock_reads += 1;
                        self.input_value(EV_CLOCK, rip)?
                    }
                    REG_ENTROPY => {
                        self.stats.entropy_reads += 1;
                        self.input_value(EV_ENTROPY, rip)?
                    }
                    _ => {
                        return Err(Error::BadDeviceAccess {
                            what: "MMIO read of a write-only/unknown register",
                            addr,
                            len,
                            rip,
                        });
                    }
                };
                self.dev_hash = hash_words(&[off, v], self.dev_hash);
                self.set_mmio_read_value(v, len);
            }
            Exit::MmioWrite { addr, len, value } => {
                let off = addr.wrapping_sub(MMIO_BASE);
                if off == REG_FAULT {
                    return Err(self.fault(value & 0xff));
                }
                if len != 8 || off >= MMIO_SIZE {
                    return Err(Error::BadDeviceAccess {
                        what: "MMIO write",
                        addr,
                        len,
                        rip,
                    });
                }
                self.dev_hash = hash_words(&[off | DEV_WRITE, value], self.dev_hash);
                match off {
                    REG_TIMER_DEADLINE => self.timer.write(value),
                    REG_IDLE => {
                        self.stats.idles += 1;
                        idle = true;
                    }
                    REG_NIC_DOORBELL => {
                        self.stats.doorbells += 1;
                        let output = self.mode != Mode::Replay;
                        let Vmm { nic, vm, net, .. } = self;
                        nic.drain_tx(&mut vm.ram, |f| match net.as_mut() {
                            Some(n) if output => n.send(f),
                            _ => Ok(()),
                        })?;
                    }
                    REG_CONSOLE => self.console.write(&self.vm.ram, value)?,
                    REG_POWEROFF => {
                        if value == 0 {
                            return Ok(Some(RunOutcome::PowerOff(0)));
                        }
                        return Err(Error::GuestPanic {
                            code: value,
                            message: self.console.lines.last().cloned().unwrap_or_default(),
                        });
                    }
                    _ => {
                        return Err(Error::BadDeviceAccess {
                            what: "MMIO write to a read-only/unknown register",
                            addr,
                            len,
                            rip,
                        });
                    }
                }
            }
        }
        // Inputs delivered at this exit.
        if self.mode == Mode::Replay {
            self.replay_frames()?;
        }
        // A recording that is stopping delivers nothing more: its END follows at this exit.
        if self.mode != Mode::Replay && !self.control.stop_requested() {
            self.poll_inputs()?;
            if idle && self.pending_irqs == 0 {
                self.wait_for_input()?;
            }
        }
        self.checkpoint_stage()?;
        Ok(None)
    }

    /// Ends a recording: END entry with the final state hash, flush.
    fn finish_record(&mut self) -> Result<()> {
        if self.mode == Mode::Record {
            let (h, _, _) = self.state_hash(true)?;
            let rip = self.vcpu.exit_rip();
            let tx = self.nic.tx_frames;
            self.log(EV_END, rip, h, tx, 0, &[])?;
        }
        self.flush_log()
    }

    /// Runs the guest until stopped, powered off, the exit limit, or the end of replay.
    pub fn run(&mut self) -> Result<RunReport> {
        let t0 = Instant::now();
        install_kick_handler();
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() } as u64;
        self.control.vcpu.set(me);
        let r = self.run_inner();
        self.control.vcpu.set(0);
        let outcome = match r {
            Ok(o) => o,
            Err(Error::Stopped) => RunOutcome::Stopped,
            Err(e) => {
                let _ = self.flush_log();
                return Err(e);
            }
        };
        let (state_hash, regs_hash, mem_hash) = self.state_hash(true)?;
        Ok(RunReport {
            outcome,
            exits: self.exits,
            state_hash,
            regs_hash,
            mem_hash,
            tx_frames: self.nic.tx_frames,
            tx_hash: self.nic.tx_hash,
            rx_frames: self.nic.rx_frames,
            went_live_at_exit: self.went_live_at,
            stats: self.stats.clone(),
            elapsed: t0.elapsed(),
        })
    }

    fn run_inner(&mut self) -> Result<RunOutcome> {
        if let Some(cpu) = self.cfg.pin_cpu {
            pin_current_thread(cpu)?;
        }
        self.start_log()?;
        // False while the vCPU is not stopped at a guest-caused exit: KVM_RUN returned
        // EINTR after a signal kick, possibly after running guest code, at a point that
        // depends on host timing. Nothing may be delivered, injected or logged there: a
        // pending interrupt waits for the guest's next exit.
        let mut at_exit = true;
        let mut stop_deadline: Option<Instant> = None;
        loop {
            // Stage A: end of run.
            if self.mode == Mode::Replay {
                if self.control.stop_requested() {
                    return Ok(RunOutcome::Stopped);
                }
                if let Some(e) = self.take_if(&[EV_END])? {
                    let (h, _, _) = self.state_hash(true)?;
                    if h != e.value() || self.nic.tx_frames != e.hdr.aux.get() {
                        return Err(self.divergence(format!(
                            "final state differs: primary {:#x} / {} output frames, backup {h:#x} / {} output frames",
                            e.value(),
                            e.hdr.aux.get(),
                            self.nic.tx_frames
                        )));
                    }
                    self.stats.checkpoints_verified += 1;
                    if self.cfg.go_live_at_end
                        || self.control.go_live_requested()
                        || self.wait_for_go_live_request()?
                    {
                        self.go_live()?;
                    } else {
                        return Ok(RunOutcome::ReplayComplete);
                    }
                }
            } else if self.control.stop_requested() {
                if at_exit || self.mode != Mode::Record {
                    self.finish_record()?;
                    return Ok(RunOutcome::Stopped);
                }
                // A recording interrupted mid-guest: its END (the final state) must be at
                // a guest exit the backup reaches too, so run on to the next exit (the
                // kicks keep interrupting, the guest progresses between them). A guest
                // that makes no exit at all ends without END (a truncated log).
                let deadline =
                    *stop_deadline.get_or_insert_with(|| Instant::now() + Duration::from_secs(2));
                if Instant::now() >= deadline {
                    self.flush_log()?;
                    return Ok(RunOutcome::Stopped);
                }
            }
            if let Some(max) = self.cfg.max_exits
                && self.exits >= max
            {
                self.flush_log()?;
                return Ok(RunOutcome::ExitLimit);
            }
            // Stage B: interrupts for this exit.
            if at_exit {
                self.inject_stage()?;
            }
            // Stage C: nothing of this exit may be left in the log.
            if self.mode == Mode::Replay {
                let exits = self.exits;
                if let Some(e) = self.peek()?
                    && e.exit() <= exits
                {
                    let what = format!(
                        "log has an unconsumed {} entry for exit {} (value {:#x})",
                        kind_name(e.kind()),
                        e.exit(),
                        e.value()
                    );
                    return Err(self.divergence(what));
                }
            }
            let exit = self.run_vcpu()?;
            at_exit = !matches!(exit, Exit::Interrupted);
            if !at_exit {
                continue;
            }
            if let Some(o) = self.handle(exit)? {
                self.finish_record()?;
                return Ok(o);
            }
        }
    }
}
