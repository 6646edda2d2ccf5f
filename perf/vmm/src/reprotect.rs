//! Re-protection by live state transfer: a loaded guest (1 GiB of RAM, hundreds of MiB
//! of keys) sends its state to a new replica VMM, again and again, while clients write
//! on persistent connections. Per join: the guest's pause (the stop phase), the whole
//! transfer's time, bytes and rounds; over the run: the clients' latency during the
//! transfers against the same clients with no transfer (equal windows in between).
//!
//! The replica runs in this process and receives over a UNIX socket pair, so the figures
//! are the VMM's own cost (memory copying, dirty tracking, the stop phase), without a
//! network link; it replays the new log for a while (which checks it), then stops, and
//! the source abandons the log and runs free again for the next join.
use crate::netns::NetNs;
use crate::results::{Made, ReprotectResults};
use anyhow::{Context, Result, bail};
use ft_perf_plot::joins::{Join, JoinReport};
use ft_testbed::load::SetLoad;
use ft_vmm::net::{Tap, in_netns};
use ft_vmm::transfer::TransferOptions;
use ft_vmm::vmlog::channel;
use ft_vmm::{Control, Mode, RunReport, Vmm, VmmConfig};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

#[derive(clap::Args)]
pub struct ReprotectArgs {
    /// Joins (transfers) to measure.
    #[arg(long, default_value_t = 10)]
    joins: u32,
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 1024)]
    ram_mib: u64,
    /// Keys loaded before the joins (values of `value_bytes`).
    #[arg(long, default_value_t = 100_000)]
    keys: u32,
    #[arg(long, default_value_t = 4000)]
    value_bytes: u32,
    /// Client connections writing throughout.
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// How long each replica replays the new log before it is stopped.
    #[arg(long, default_value_t = 1000)]
    follow_ms: u64,
    /// CPU of the guest's vCPU.
    #[arg(long, default_value_t = 1)]
    vcpu_cpu: usize,
}

pub fn run(a: &ReprotectArgs, out: Option<&Path>) -> Result<()> {
    let ns = NetNs::new("reprotect")?;
    let tap = in_netns(&ns.name, || Tap::open("ftap0"))?;
    let cfg = |mode| VmmConfig {
        mode,
        ram_size: a.ram_mib << 20,
        ..Default::default()
    };
    let mut scfg = cfg(Mode::Free);
    scfg.pin_cpu = Some(a.vcpu_cpu);
    let control = Control::new();
    let (tx, rx) = std::sync::mpsc::channel();
    let c = control.clone();
    let vm = std::thread::spawn(move || -> ft_vmm::error::Result<RunReport> {
        let mut vmm = Vmm::new(scfg, ft_vmm::GUEST_ELF, c)?;
        vmm.set_net(Box::new(tap));
        let _ = tx.send(vmm.transfer_source());
        vmm.run()
    });
    let src = rx
        .recv_timeout(Duration::from_secs(30))
        .context("the VMM did not start")?;
    let t = Instant::now();
    while !ns
        .run(&["redis-cli", "-h", "10.0.0.2", "PING"])
        .is_ok_and(|o| o.contains("PONG"))
    {
        if t.elapsed() > Duration::from_secs(20) {
            bail!("the guest does not answer PING");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // Real data: `keys` keys of `value_bytes` (random keys: most of the key space).
    ns.run(&[
        "redis-benchmark",
        "-h",
        "10.0.0.2",
        "-c",
        "20",
        "-P",
        "16",
        "-t",
        "set",
        "-q",
        "-n",
        &(a.keys * 3).to_string(),
        "-r",
        &a.keys.to_string(),
        "-d",
        &a.value_bytes.to_string(),
    ])?;
    let info = ns.run(&["redis-cli", "-h", "10.0.0.2", "INFO", "memory"])?;
    let used = info
        .lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .context("INFO memory has no used_memory")?;
    let dbsize = ns.run(&["redis-cli", "-h", "10.0.0.2", "DBSIZE"])?;
    println!(
        "guest: {} MiB RAM, {} keys, used_memory {} MiB; {} clients SET 100-byte values on persistent connections throughout",
        a.ram_mib,
        dbsize.trim(),
        used >> 20,
        a.clients
    );
    let mut conns = Vec::new();
    for _ in 0..a.clients {
        conns.push(in_netns(&ns.name, || {
            TcpStream::connect(("10.0.0.2", 6379)).map_err(ft_vmm::Error::from)
        })?);
    }
    let load = SetLoad::start(conns);
    std::thread::sleep(Duration::from_millis(500));
    let mut joins: Vec<Join> = Vec::new();
    let mut windows: Vec<(Instant, Instant)> = Vec::new();
    let mut quiet: Vec<(Instant, Instant)> = Vec::new();
    for j in 0..a.joins {
        let (w, mut r) = UnixStream::pair()?;
        let rcfg = cfg(Mode::Replay);
        let receiver = std::thread::spawn(move || {
            Vmm::receive(
                rcfg,
                ft_vmm::GUEST_ELF,
                Control::new(),
                &mut r,
                None,
                &mut |_| {},
            )
        });
        let (sink, log) = channel(1 << 16);
        let t0 = Instant::now();
        let rep = src
            .send(
                Box::new(w),
                Box::new(sink),
                None,
                &TransferOptions::default(),
                &mut |_| {},
            )
            .with_context(|| format!("join {j}"))?;
        let t1 = Instant::now();
        let (mut replica, _) = receiver
            .join()
            .map_err(|_| anyhow::anyhow!("receiver panicked"))??;
        let rc = replica.control().clone();
        let follower = std::thread::spawn(move || {
            replica.set_source(Box::new(log));
            replica.run()
        });
        std::thread::sleep(Duration::from_millis(a.follow_ms));
        rc.request_stop();
        let rr = follower
            .join()
            .map_err(|_| anyhow::anyhow!("replica panicked"))?
            .with_context(|| format!("join {j}: the replica's replay"))?;
        if !src.abandon() {
            bail!("join {j}: could not end the log");
        }
        println!(
            "join {j}: pause {:.2} ms, total {:.0} ms, {} MiB in {} rounds (converged: {}), {} pages in the stop phase; replica replayed {} exits, {} checkpoints verified",
            rep.pause.as_secs_f64() * 1e3,
            rep.total.as_secs_f64() * 1e3,
            rep.bytes_sent >> 20,
            rep.rounds,
            rep.converged,
            rep.stop_pages,
            rr.exits - rep.cut_exit,
            rr.stats.checkpoints_verified
        );
        joins.push(Join {
            pause_ms: rep.pause.as_secs_f64() * 1e3,
            total_ms: rep.total.as_secs_f64() * 1e3,
            bytes: rep.bytes_sent,
            rounds: Some(rep.rounds as u64),
            stop_pages: Some(rep.stop_pages),
            pause_parts_ms: serde_json::Value::Null,
        });
        windows.push((t0, t1));
        // A window of the same length with no transfer, for the baseline.
        std::thread::sleep(Duration::from_millis(200));
        let q0 = Instant::now();
        std::thread::sleep(t1 - t0);
        quiet.push((q0, Instant::now()));
        std::thread::sleep(Duration::from_millis(200));
    }
    let samples = load.finish()?;
    control.request_stop();
    vm.join()
        .map_err(|_| anyhow::anyhow!("VMM thread panicked"))??;
    let samples = samples.lock().unwrap();
    let report = JoinReport::new(
        &format!("{} joins of a {} MiB guest under load", a.joins, a.ram_mib),
        "from the start to the end of each",
        joins,
        &windows,
        &quiet,
        &samples,
    )?;
    report.print();
    crate::results::save(out, |all| {
        all.reprotect = Some(ReprotectResults {
            made: Made::now(),
            ram_mib: a.ram_mib,
            used_memory_mib: used >> 20,
            clients: a.clients,
            report,
        })
    })
}
