//! The guest's service against Debian's redis-server, side by side in one run: the
//! same redis-benchmark from the same client namespace, each server one virtual link
//! away, each server on CPU 1 and the client on CPU 0, alternating rounds.
use crate::bench::{Row, parse_csv, spread};
use crate::netns::NetNs;
use anyhow::{Context, Result, bail};
use ft_vmm::net::{Tap, in_netns};
use ft_vmm::{Control, Mode, RunReport, Vmm, VmmConfig};
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

/// (clients, pipeline depth), then for the guest and for redis-server: one row per test
/// (SET, GET, INCR) per round.
type Config = ((u32, u32), Vec<Vec<Row>>, Vec<Vec<Row>>);

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

pub fn run(a: &ServiceArgs) -> Result<()> {
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
    let mut results: Vec<Config> = Vec::new();
    for &(clients, pipe, n) in &configs {
        let (mut g, mut r) = (Vec::new(), Vec::new());
        for _ in 0..a.rounds {
            g.push(benchmark(&ns, "10.0.0.2", client_cpu, clients, n, pipe)?);
            r.push(benchmark(&ns, "10.0.1.2", client_cpu, clients, n, pipe)?);
        }
        results.push(((clients, pipe), g, r));
    }
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
    for ((clients, pipe), g, r) in &results {
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
    Ok(())
}
