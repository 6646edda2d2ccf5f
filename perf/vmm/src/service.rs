//! The guest's service against Debian's redis-server, side by side in one run: the
//! same redis-benchmark from the same client namespace, each server one virtual link
//! away, each server on CPU 1 and the client on CPU 0, alternating rounds.
use crate::bench::{Row, parse_csv, spread};
use crate::netns::NetNs;
use crate::results::{Made, ServiceConfig, ServiceResults};
use anyhow::{Context, Result, bail};
use ft_vmm::net::{Tap, in_netns};
use ft_vmm::{Control, Mode, RunReport, Vmm, VmmConfig};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(clap::Args)]
pub struct ServiceArgs {
    /// Alternating rounds (guest, redis-server) per configuration.
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// Requests per test without pipelining (pipelined tests send 10x as many).
    #[arg(long, default_value_t = 100_000)]
    requests: u32,
    /// Client counts to run.
    #[arg(long, value_delimiter = ',', default_value = "50,1000")]
    clients: Vec<u32>,
    /// CPU of the servers (guest vCPU, redis-server); the client runs on the other one.
    #[arg(long, default_value_t = 1)]
    server_cpu: usize,
}

struct Redis(Child);

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_ping(ns: &NetNs, host: &str) -> Result<()> {
    let t = Instant::now();
    loop {
        if ns
            .run(&["redis-cli", "-h", host, "PING"])
            .is_ok_and(|o| o.contains("PONG"))
        {
            return Ok(());
        }
        if t.elapsed() > Duration::from_secs(20) {
            bail!("{host} does not answer PING");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One redis-benchmark run; the client pinned to `cpu`, with enough file descriptors
/// for 1,000 connections.
fn benchmark(
    ns: &NetNs,
    host: &str,
    cpu: usize,
    clients: u32,
    n: u32,
    pipe: u32,
) -> Result<Vec<Row>> {
    let cmd = format!(
        "ulimit -n $(ulimit -Hn); exec taskset -c {cpu} redis-benchmark -h {host} -c {clients} -n {n} -P {pipe} -t set,get,incr --csv"
    );
    let out = ns.run(&["bash", "-c", &cmd])?;
    let rows = parse_csv(&out);
    if rows.len() != 3 {
        bail!("redis-benchmark against {host}: unexpected output {out}");
    }
    Ok(rows)
}

pub fn run(a: &ServiceArgs, out: Option<&Path>) -> Result<()> {
    let mut ns = NetNs::new("svc")?;
    ns.add_server()?;
    let client_cpu = 1 - a.server_cpu.min(1);
    let srv = ns.server.clone().expect("server namespace");
    let server_cpu = a.server_cpu.to_string();
    let _redis = Redis(
        Command::new("ip")
            .args(["netns", "exec", &srv, "bash", "-c"])
            .arg(format!(
                "ulimit -n $(ulimit -Hn); exec taskset -c {server_cpu} redis-server --bind 10.0.1.2 --port 6379 --save '' --appendonly no --protected-mode no --databases 1 --maxclients 10000"
            ))
            .stdout(Stdio::null())
            .spawn()
            .context("starting redis-server (scripts/bootstrap.sh installs it)")?,
    );
    let tap = in_netns(&ns.name, || Tap::open("ftap0"))?;
    let control = Control::new();
    let c = control.clone();
    let cfg = VmmConfig {
        mode: Mode::Free,
        pin_cpu: Some(a.server_cpu),
        ..Default::default()
    };
    let limits = cfg.service_limits()?;
    let vm = std::thread::spawn(move || -> ft_vmm::error::Result<RunReport> {
        let mut vmm = Vmm::new(cfg, ft_vmm::GUEST_ELF, c)?;
        vmm.set_net(Box::new(tap));
        vmm.run()
    });
    wait_ping(&ns, "10.0.0.2")?;
    wait_ping(&ns, "10.0.1.2")?;
    println!(
        "guest service vs redis-server 7.0: redis-benchmark -t set,get,incr, {} alternating rounds; servers on CPU {}, client on CPU {client_cpu}; guest: 1 vCPU, {} MiB RAM, maxclients {}",
        a.rounds,
        a.server_cpu,
        ft_vmm::abi::RAM_DEFAULT >> 20,
        limits.maxclients
    );
    // (clients, pipeline) -> per server -> per test -> rows over rounds
    let mut configs = Vec::new();
    for &c in &a.clients {
        configs.push((c, 1u32, a.requests));
        configs.push((c, 16u32, a.requests * 10));
    }
    let t0 = Instant::now();
    let mut results: Vec<ServiceConfig> = Vec::new();
    for &(clients, pipe, n) in &configs {
        let (mut g, mut r) = (Vec::new(), Vec::new());
        for _ in 0..a.rounds {
            g.push(benchmark(&ns, "10.0.0.2", client_cpu, clients, n, pipe)?);
            r.push(benchmark(&ns, "10.0.1.2", client_cpu, clients, n, pipe)?);
        }
        results.push(ServiceConfig {
            clients,
            pipeline: pipe,
            guest: g,
            redis: r,
        });
    }
    let tap = tap_response_times(&ns, client_cpu, a.requests)?;
    control.request_stop();
    let report = vm
        .join()
        .map_err(|_| anyhow::anyhow!("VMM thread panicked"))??;
    println!(
        "({} s; guest made {} exits, {} of them idle reads)",
        t0.elapsed().as_secs(),
        report.exits,
        report.stats.idles
    );
    println!();
    println!(
        "{:<7} {:>2} {:<5} | {:>22} {:>22} {:>6} | {:>13} {:>13} | {:>13} {:>13} | {:>15} {:>15}",
        "clients",
        "-P",
        "test",
        "guest req/s (range)",
        "redis req/s (range)",
        "ratio",
        "p50 ms g/r",
        "",
        "p99 ms g/r",
        "",
        "max ms g (all)",
        "max ms r (all)"
    );
    for ServiceConfig {
        clients,
        pipeline: pipe,
        guest: g,
        redis: r,
    } in &results
    {
        for (ti, test) in ["SET", "GET", "INCR"].iter().enumerate() {
            let col = |runs: &Vec<Vec<Row>>, f: fn(&Row) -> f64| -> Vec<f64> {
                runs.iter().map(|rows| f(&rows[ti])).collect()
            };
            let (gr, gmin, gmax) = spread(&col(g, |x| x.rps));
            let (rr, rmin, rmax) = spread(&col(r, |x| x.rps));
            let (g50, _, _) = spread(&col(g, |x| x.p50_ms));
            let (r50, _, _) = spread(&col(r, |x| x.p50_ms));
            let (g99, _, _) = spread(&col(g, |x| x.p99_ms));
            let (r99, _, _) = spread(&col(r, |x| x.p99_ms));
            let fmt_max = |v: Vec<f64>| {
                v.iter()
                    .map(|x| format!("{x:.1}"))
                    .collect::<Vec<_>>()
                    .join("/")
            };
            println!(
                "{:<7} {:>2} {:<5} | {:>8.0} ({:>6.0}-{:>6.0}) {:>8.0} ({:>6.0}-{:>6.0}) {:>6.2} | {:>6.3} {:>6.3} | {:>6.3} {:>6.3} | {:>15} {:>15}",
                clients,
                pipe,
                test,
                gr,
                gmin,
                gmax,
                rr,
                rmin,
                rmax,
                gr / rr,
                g50,
                r50,
                g99,
                r99,
                fmt_max(col(g, |x| x.max_ms)),
                fmt_max(col(r, |x| x.max_ms))
            );
        }
    }
    println!(
        "(req/s, p50 and p99: median of the rounds; ratio = guest / redis-server medians; max: every round)"
    );
    println!();
    println!(
        "guest response time seen on its tap (request frame in -> reply frame out), 50 clients, SET+GET+INCR, {} requests matched: p50 {:.3} ms, p99 {:.3} ms, p99.9 {:.3} ms, max {:.3} ms",
        tap.len(),
        tap.value_at_quantile(0.5) as f64 / 1e3,
        tap.value_at_quantile(0.99) as f64 / 1e3,
        tap.value_at_quantile(0.999) as f64 / 1e3,
        tap.max() as f64 / 1e3
    );
    println!("(what the VM and the VMM add, without the client's own scheduling delays)");
    crate::results::save(out, |all| {
        all.service = Some(ServiceResults {
            made: Made::now(),
            rounds: a.rounds,
            configs: results,
            exits: report.exits,
            idle_reads: report.stats.idles,
            tap: ft_perf_plot::Distribution::from_histogram_us(&tap),
        })
    })
}

/// One 50-client run with a capture on the guest's tap: for each request frame, the
/// time until the reply frame on the same connection (microseconds).
fn tap_response_times(ns: &NetNs, cpu: usize, n: u32) -> Result<hdrhistogram::Histogram<u64>> {
    let pcap = std::env::temp_dir().join(format!("ftperf-tap-{}.pcap", std::process::id()));
    let pcap_s = pcap.to_string_lossy().into_owned();
    let mut dump = Command::new("ip")
        .args([
            "netns", "exec", &ns.name, "tcpdump", "-i", "ftap0", "-nn", "-s", "100",
        ])
        .args(["-w", &pcap_s, "tcp port 6379"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("tcpdump")?;
    std::thread::sleep(Duration::from_millis(500));
    benchmark(ns, "10.0.0.2", cpu, 50, n, 1)?;
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: kill(2) of our own child with SIGINT (tcpdump flushes and exits).
    unsafe { libc::kill(dump.id() as i32, libc::SIGINT) };
    dump.wait()?;
    let text = Command::new("tcpdump")
        .args(["-r", &pcap_s, "-nn", "-tt"])
        .stderr(Stdio::null())
        .output()?;
    let _ = std::fs::remove_file(&pcap);
    let mut h = ft_perf_plot::stats::histogram_us();
    let mut pending = std::collections::HashMap::new();
    for line in String::from_utf8_lossy(&text.stdout).lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 5 || line.contains("length 0") {
            continue;
        }
        let Ok(t) = f[0].parse::<f64>() else { continue };
        let (src, dst) = (f[2], f[4].trim_end_matches(':'));
        if dst.ends_with(".6379") {
            pending.entry(src.to_string()).or_insert(t);
        } else if src.ends_with(".6379")
            && let Some(t0) = pending.remove(dst)
        {
            h.record(((t - t0) * 1e6).max(1.0) as u64)?;
        }
    }
    // tcpdump may miss a few frames under load; most requests must be there.
    if h.len() < 3 * n as u64 * 9 / 10 {
        bail!("the capture saw only {} of {} requests", h.len(), 3 * n);
    }
    Ok(h)
}
