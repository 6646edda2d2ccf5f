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
//!
//! # Device model in replay
//! The backup runs the same device model as the primary: guest writes to the timer and
//! NIC registers, a logged timer interrupt disarms the timer (as the primary's injection
//! did), delivered frames make a NIC interrupt pending when the guest enabled it and a
//! logged NIC interrupt clears it. So the device state ([`DeviceState`]) is equal on both
//! at every exit, part of every checkpoint hash, and what a backup continues with when it
//! goes live.
use crate::abi::*;
use crate::devices::{Clock, Console, Nic, Timer};
use crate::error::{Error, Result};
use crate::hash::{FNV_OFFSET, hash_words};
use crate::image;
use crate::net::NetBackend;
use crate::vmlog::{FrameStore, LogEntry, LogSink, LogSource};
use crate::vstate::cpuid;
use crate::vstate::vcpu::Vcpu;
use crate::vstate::vm::Vm;
use ft_common::vmlog::{EV_END, kind_name};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod config;
mod control;
mod exits;
mod frames;
mod inputs;
mod live;
mod log;
mod state;

pub use config::{ServiceConfig, VmmConfig};
pub use control::{Control, ExitWork, KICK_SIGNAL};
use control::{install_kick_handler, pin_current_thread};
use exits::Exit;
pub use live::LiveStats;
pub use state::DeviceState;

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
    /// Replay: the exit of the last checkpoint (or END) verified equal.
    pub last_verified_exit: u64,
    pub log_entries: u64,
    pub log_bytes: u64,
    pub entries_consumed: u64,
    /// Replay: frame references whose frame was not in the store yet (the VMM waited).
    pub frame_waits: u64,
}

/// Result of a run.
#[derive(Clone, Debug)]
pub struct RunReport {
    pub outcome: RunOutcome,
    pub exits: u64,
    /// Hash of registers, all of RAM (full recomputation), device accesses and device
    /// state at the end.
    pub state_hash: u64,
    pub regs_hash: u64,
    pub mem_hash: u64,
    pub tx_frames: u64,
    pub tx_hash: u64,
    pub rx_frames: u64,
    pub went_live_at_exit: Option<u64>,
    /// Device model state at the end.
    pub device: DeviceState,
    pub stats: Stats,
    pub elapsed: Duration,
}

/// Opens a network backend later (at go-live).
pub type NetFactory = Box<dyn FnOnce() -> Result<Box<dyn NetBackend>> + Send>;

/// Marks a write in `Vmm::dev_hash` (register offsets are < `MMIO_SIZE`).
const DEV_WRITE: u64 = 1 << 63;

/// `pending_irqs`: a NIC interrupt is due (frames delivered with `REG_NIC_IRQ` on, not
/// injected yet). A due timer interrupt is not a pending bit: the timer stays armed until
/// its interrupt is injected (see `inject_stage`).
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
    /// Frames taken from the backend at a transfer's cut, delivered before any newer one:
    /// with a key, logged by reference to the copy the new replica got in the transfer;
    /// without, delivered as if just received (tagged frames of the new log).
    pub(crate) precut: std::collections::VecDeque<(Option<crate::vmlog::FrameKey>, Vec<u8>)>,
    /// Counters shared with other threads while running (optional).
    live: Option<Arc<LiveStats>>,
}

impl Vmm {
    /// Creates a VM, loads `guest_elf` (validated) and sets up long mode.
    pub fn new(cfg: VmmConfig, guest_elf: &[u8], control: Arc<Control>) -> Result<Vmm> {
        cfg.validate()?;
        let mut vm = Vm::new(cfg.ram_size as usize)?;
        let img = image::load(guest_elf, &mut vm.ram)?;
        let boot = cfg.boot_info();
        vm.setup_system_tables(&img, &boot)?;
        let vcpu = Vcpu::new(&vm.kvm, &vm.fd)?;
        vcpu.setup_long_mode(img.header.entry)?;
        // Start dirty tracking from the loaded state.
        let _ = vm.take_dirty_log()?;
        vm.ram.rehash_all();
        let config_hash = cfg.config_hash(guest_elf);
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
            precut: Default::default(),
            live: None,
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

    /// Counters that other threads may read while the VMM runs.
    pub fn set_live_stats(&mut self, live: Arc<LiveStats>) {
        self.live = Some(live);
    }

    pub fn set_sink(&mut self, sink: Box<dyn LogSink>) {
        self.sink = Some(sink);
    }

    pub fn set_source(&mut self, source: Box<dyn LogSource>) {
        self.source = Some(source);
    }

    /// Replay: where RX_FRAME_REF entries find their frames, by (epoch, sequence); the
    /// VMM waits for missing ones and evicts what it delivered (see `vmlog::frames`).
    /// Record (tests, tooling): frames received in tagged mode are put there too.
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

    /// The vCPU's CPUID table as KVM holds it (the fixed model, [`cpuid::MODEL`]).
    pub fn cpuid(&self) -> Result<Vec<cpuid::Leaf>> {
        self.vcpu.cpuid()
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
}

impl Vmm {
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
            device: self.device_state(),
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
                    self.stats.last_verified_exit = self.exits;
                    self.publish_live();
                    if let Some(l) = self.live.as_ref() {
                        l.end_verified
                            .store(true, std::sync::atomic::Ordering::Relaxed);
                    }
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
            // Work queued for a guest exit (a transfer's stop phase): the vCPU is stopped
            // here exactly as between two runs.
            if at_exit && let Some(work) = self.control.take_exit_work() {
                work(self);
            }
            // A pause (the daemon's lease lapsed): wait here, at a guest exit, until
            // resumed or stopped.
            if at_exit && self.control.pause_requested() {
                self.wait_while_paused()?;
                continue;
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
