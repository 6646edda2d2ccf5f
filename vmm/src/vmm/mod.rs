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
use crate::devices::{Clock, Console, Nic, Timer};
use crate::error::{Error, Result};
use crate::hash::{FNV_OFFSET, hash_words};
use crate::image;
use crate::net::NetBackend;
use crate::vmlog::{FrameStore, LogEntry, LogSink, LogSource};
use crate::vstate::vcpu::Vcpu;
use crate::vstate::vm::Vm;
use ft_common::vmlog::{EV_END, kind_name};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod control;
mod exits;
mod inputs;
mod log;

pub use control::{Control, KICK_SIGNAL};
use control::{install_kick_handler, pin_current_thread};
use exits::Exit;

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
    /// Guest RAM in bytes: [`RAM_MIN`]..=[`RAM_MAX`], a multiple of [`RAM_ALIGN`].
    pub ram_size: u64,
    /// Settings of the guest's service, passed in `BootInfo` (part of the config hash).
    pub service: ServiceConfig,
}

/// Settings of the guest's RESP service. Zero means "the guest's default" (derived from
/// its heap size where it depends on memory).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceConfig {
    pub maxclients: u32,
    pub maxmemory: u64,
    /// Close clients idle for this many seconds (0 = never).
    pub timeout_s: u32,
    /// TCP keep-alive interval in seconds (0 = off).
    pub tcp_keepalive_s: u32,
    /// Housekeeping ticks per second (0 = 10).
    pub hz: u32,
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
            ram_size: RAM_DEFAULT,
            service: ServiceConfig {
                tcp_keepalive_s: 60,
                ..Default::default()
            },
        }
    }
}

impl VmmConfig {
    /// Checks the settings the guest cannot use; the message says what to change.
    pub fn validate(&self) -> Result<()> {
        let r = self.ram_size;
        if !(RAM_MIN..=RAM_MAX).contains(&r) || !r.is_multiple_of(RAM_ALIGN) {
            return Err(Error::Config(format!(
                "guest RAM of {r} bytes is not usable: give {} MiB to {} MiB in steps of {} MiB",
                RAM_MIN >> 20,
                RAM_MAX >> 20,
                RAM_ALIGN >> 20
            )));
        }
        self.service_limits()?;
        if self.service.hz > 500 {
            return Err(Error::Config(format!(
                "service hz {} is too high: use 1 to 500 (0 = 10)",
                self.service.hz
            )));
        }
        Ok(())
    }

    /// The service's effective limits with this RAM size and these settings (what the
    /// guest derives at boot), or why the guest could not use them.
    pub fn service_limits(&self) -> Result<ft_guest_service::Limits> {
        let s = ft_guest_service::Settings {
            maxclients: self.service.maxclients,
            maxmemory: self.service.maxmemory,
            timeout_s: self.service.timeout_s,
            tcp_keepalive_s: self.service.tcp_keepalive_s,
            hz: self.service.hz,
        };
        ft_guest_service::Limits::derive(self.ram_size, self.ram_size - HEAP_BASE, &s)
            .map_err(|e| Error::Config(e.to_string()))
    }

    pub(crate) fn boot_info(&self) -> BootInfo {
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
            heap_end: self.ram_size,
            maxclients: self.service.maxclients,
            timeout_s: self.service.timeout_s,
            tcp_keepalive_s: self.service.tcp_keepalive_s,
            hz: self.service.hz,
            maxmemory: self.service.maxmemory,
        }
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
        // Everything the guest is booted with: the image, and the boot info (RAM size,
        // network identity, service settings).
        let config_hash = hash_words(
            &[
                img.hash,
                crate::hash::hash_bytes(boot.as_bytes(), GUEST_ABI_VERSION as u64),
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
