//! `ft-vmm`: run the guest in free, record (primary) or replay (backup) mode.
//!
//! Examples:
//!   ft-vmm run --mode record --log /tmp/vm.log --tap ftap0 --guest-ip 10.0.0.2/24
//!   ft-vmm run --mode replay --log /tmp/vm.log            # verify a recording
//!   ft-vmm run --mode replay --log /tmp/vm.log --go-live-at-end --tap ftap0
//!   ft-vmm log-dump /tmp/vm.log
//! Signals: SIGINT/SIGTERM stop (a recording gets its END entry); SIGUSR1 = go live.
use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use ft_vmm::net::{NetBackend, Tap, in_netns};
use ft_vmm::vmlog::{LogSource, ReadSource, Recv, WriteSink, format};
use ft_vmm::vmm::ServiceConfig;
use ft_vmm::{Control, Mode, Vmm, VmmConfig};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "ft-vmm",
    about = "Record/replay KVM VMM for the fault-tolerance appliance"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum CliMode {
    Free,
    Record,
    Replay,
}

// Parsed once at start-up; the size difference between variants does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Cmd {
    /// Boot the guest and run it.
    Run {
        #[arg(long, value_enum, default_value = "free")]
        mode: CliMode,
        /// Log file: written in record mode, read in replay mode.
        #[arg(long)]
        log: Option<PathBuf>,
        /// TAP device for the NIC (opened at start; in replay only when going live).
        #[arg(long)]
        tap: Option<String>,
        /// Open the tap inside this network namespace (/var/run/netns/NAME).
        #[arg(long)]
        netns: Option<String>,
        /// Guest address with prefix length.
        #[arg(long, default_value = "10.0.0.2/24")]
        guest_ip: String,
        #[arg(long, default_value = "02:00:00:00:00:02")]
        mac: String,
        #[arg(long, default_value_t = 6379)]
        port: u16,
        /// Record: checkpoint hash entry every N exits (0 = off).
        #[arg(long, default_value_t = 1000)]
        checkpoint_interval: u64,
        /// Replay: go live when the log ends.
        #[arg(long)]
        go_live_at_end: bool,
        /// Replay: go live after this many seconds (as if the primary failed).
        #[arg(long)]
        go_live_after: Option<f64>,
        /// Stop after this many exits.
        #[arg(long)]
        max_exits: Option<u64>,
        /// Inbound frames carry the data plane's LogHdr (log by sequence number).
        #[arg(long)]
        tagged_input: bool,
        /// Guest ELF (default: the embedded guest).
        #[arg(long)]
        guest: Option<PathBuf>,
        /// Write a snapshot here at the end of the run.
        #[arg(long)]
        snapshot: Option<PathBuf>,
        /// Pin the vCPU thread to this host CPU (same index on primary and backup).
        #[arg(long)]
        pin_cpu: Option<usize>,
        /// Guest RAM in MiB (64 to 3072, a multiple of 2).
        #[arg(long, default_value_t = 256)]
        ram_mib: u64,
        /// Service: most concurrent clients (0 = derived from the RAM size).
        #[arg(long, default_value_t = 0)]
        maxclients: u32,
        /// Service: bytes of memory before write commands get OOM errors (0 = derived).
        #[arg(long, default_value_t = 0)]
        maxmemory: u64,
        /// Service: close clients idle for this many seconds (0 = never).
        #[arg(long, default_value_t = 0)]
        timeout: u32,
        /// Service: TCP keep-alive interval in seconds (0 = off).
        #[arg(long, default_value_t = 60)]
        tcp_keepalive: u32,
        #[arg(long)]
        quiet: bool,
    },
    /// Print the entries of a log file.
    LogDump { file: PathBuf },
}

static STOP: AtomicBool = AtomicBool::new(false);
static GO_LIVE: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}
extern "C" fn on_go_live(_: libc::c_int) {
    GO_LIVE.store(true, Ordering::SeqCst);
}

fn install_signals(control: std::sync::Arc<Control>) {
    // SAFETY: the handlers only store to atomics (async-signal-safe).
    unsafe {
        libc::signal(libc::SIGINT, on_stop as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_stop as *const () as libc::sighandler_t);
        libc::signal(libc::SIGUSR1, on_go_live as *const () as libc::sighandler_t);
    }
    std::thread::spawn(move || {
        loop {
            if STOP.load(Ordering::SeqCst) {
                control.request_stop();
            }
            if GO_LIVE.swap(false, Ordering::SeqCst) {
                control.request_go_live();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    });
}

fn parse_ip(s: &str) -> Result<([u8; 4], u8)> {
    let (ip, prefix) = s.split_once('/').unwrap_or((s, "24"));
    let ip: std::net::Ipv4Addr = ip.parse().with_context(|| format!("bad --guest-ip {s}"))?;
    let prefix: u8 = prefix
        .parse()
        .with_context(|| format!("bad prefix in {s}"))?;
    if prefix > 32 {
        bail!("prefix length {prefix} > 32");
    }
    Ok((ip.octets(), prefix))
}

fn parse_mac(s: &str) -> Result<[u8; 6]> {
    let v: Vec<u8> = s
        .split(':')
        .map(|p| u8::from_str_radix(p, 16))
        .collect::<std::result::Result<_, _>>()
        .with_context(|| format!("bad --mac {s}"))?;
    v.try_into()
        .map_err(|_| anyhow::anyhow!("--mac needs 6 bytes"))
}

fn open_tap(name: String, netns: Option<String>) -> ft_vmm::error::Result<Box<dyn NetBackend>> {
    let tap = match netns {
        Some(ns) => in_netns(&ns, move || Tap::open(&name))?,
        None => Tap::open(&name)?,
    };
    Ok(Box::new(tap))
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::LogDump { file } => {
            let mut src = ReadSource::open(&file)?;
            while let Recv::Entry(e) = src.recv(Duration::from_secs(1))? {
                let epoch = e
                    .frame_key()
                    .filter(|_| e.kind() == format::EV_RX_FRAME_REF)
                    .map(|k| format!(" epoch={}", k.epoch))
                    .unwrap_or_default();
                println!(
                    "exit={:<10} {:<12} rip={:#010x} value={:#018x} aux={:#x} arg={} len={}{epoch}",
                    e.exit(),
                    format::kind_name(e.kind()),
                    e.hdr.rip.get(),
                    e.value(),
                    e.hdr.aux.get(),
                    e.hdr.arg.get(),
                    e.payload.len()
                );
            }
            if src.torn_bytes() > 0 {
                println!(
                    "(the log ends with an incomplete entry of {} bytes: the writer stopped mid-entry)",
                    src.torn_bytes()
                );
            }
            Ok(())
        }
        Cmd::Run {
            mode,
            log,
            tap,
            netns,
            guest_ip,
            mac,
            port,
            checkpoint_interval,
            go_live_at_end,
            go_live_after,
            max_exits,
            tagged_input,
            guest,
            snapshot,
            pin_cpu,
            ram_mib,
            maxclients,
            maxmemory,
            timeout,
            tcp_keepalive,
            quiet,
        } => {
            let (ip, prefix_len) = parse_ip(&guest_ip)?;
            let mode = match mode {
                CliMode::Free => Mode::Free,
                CliMode::Record => Mode::Record,
                CliMode::Replay => Mode::Replay,
            };
            let cfg = VmmConfig {
                mode,
                mac: parse_mac(&mac)?,
                ip,
                prefix_len,
                port,
                checkpoint_interval,
                max_exits,
                tagged_input,
                go_live_at_end,
                console_echo: !quiet,
                pin_cpu,
                ram_size: ram_mib << 20,
                service: ServiceConfig {
                    maxclients,
                    maxmemory,
                    timeout_s: timeout,
                    tcp_keepalive_s: tcp_keepalive,
                    hz: 0,
                },
                ..Default::default()
            };
            let elf = match &guest {
                Some(p) => std::fs::read(p)
                    .with_context(|| format!("reading guest image {}", p.display()))?,
                None => ft_vmm::GUEST_ELF.to_vec(),
            };
            let control = Control::new();
            install_signals(control.clone());
            let mut vmm = Vmm::new(cfg, &elf, control.clone())?;
            match mode {
                Mode::Record => {
                    let p = log.context("--mode record needs --log FILE")?;
                    vmm.set_sink(Box::new(WriteSink::create(&p)?));
                }
                Mode::Replay => {
                    let p = log.context("--mode replay needs --log FILE")?;
                    vmm.set_source(Box::new(ReadSource::open(&p)?));
                }
                Mode::Free => {}
            }
            if let Some(name) = tap {
                if mode == Mode::Replay {
                    vmm.set_net_on_live(Box::new(move || open_tap(name, netns)));
                } else {
                    vmm.set_net(open_tap(name, netns)?);
                }
            }
            if let Some(secs) = go_live_after {
                let c = control.clone();
                std::thread::spawn(move || {
                    std::thread::sleep(Duration::from_secs_f64(secs));
                    c.request_go_live();
                });
            }
            let report = vmm.run()?;
            if let Some(p) = snapshot {
                let mut f = std::io::BufWriter::new(std::fs::File::create(&p)?);
                vmm.snapshot(&mut f)?;
            }
            println!("{report:#?}");
            Ok(())
        }
    }
}
