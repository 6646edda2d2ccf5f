//! Arbiter latency benchmark: test_and_set and renew, p50/p99, embedded vs etcd.
//!
//! Starts its own embedded arbiter (in-process, state in a temp dir, fsync per state
//! change) and a single-member etcd on loopback, runs a bounded number of iterations
//! per operation and prints a table.
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use ft_fence::testkit::EtcdCluster;
use ft_fence::{Arbiter, EmbeddedArbiter, EtcdArbiter, TasOutcome};

#[derive(Parser, Debug)]
#[command(about = "test_and_set / renew latency of the fence backends")]
struct Args {
    /// Iterations per operation and backend (1..=20000).
    #[arg(long, default_value_t = 500)]
    iterations: usize,
    /// Lease length requested (ms).
    #[arg(long, default_value_t = 3000)]
    lease_ms: u64,
    /// Skip the etcd backend.
    #[arg(long)]
    no_etcd: bool,
}

struct Row {
    backend: &'static str,
    op: &'static str,
    samples: Vec<Duration>,
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn us(d: Duration) -> String {
    format!("{:.0}", d.as_secs_f64() * 1e6)
}

/// Measures won test_and_set (each followed by an unmeasured release), test_and_set
/// that finds the VM held, and renew.
async fn bench(
    backend: &'static str,
    a: Arc<dyn Arbiter>,
    b: Arc<dyn Arbiter>,
    n: usize,
) -> Result<Vec<Row>> {
    let vm = "bench-vm";
    let mut epoch = a.read(vm).await?.epoch;
    // Warm-up (connections, first allocation of keys/files).
    for _ in 0..5.min(n) {
        let g = a
            .test_and_set(vm, "a", epoch)
            .await?
            .won()
            .context("warm-up TAS lost")?;
        a.release(vm, "a", g.epoch).await?;
        epoch = g.epoch;
    }
    let mut won = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let o = a.test_and_set(vm, "a", epoch).await?;
        won.push(t.elapsed());
        let Some(g) = o.won() else {
            bail!("{backend}: uncontended TAS did not win: {o:?}")
        };
        a.release(vm, "a", g.epoch).await?;
        epoch = g.epoch;
    }
    let g = a
        .test_and_set(vm, "a", epoch)
        .await?
        .won()
        .context("TAS lost")?;
    let mut held = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let o = b.test_and_set(vm, "b", g.epoch).await?;
        held.push(t.elapsed());
        if !matches!(o, TasOutcome::Held { .. }) {
            bail!("{backend}: expected Held, got {o:?}");
        }
    }
    let mut renew = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        a.renew(vm, "a", g.epoch).await?;
        renew.push(t.elapsed());
    }
    a.release(vm, "a", g.epoch).await?;
    Ok(vec![
        Row {
            backend,
            op: "test_and_set (won)",
            samples: won,
        },
        Row {
            backend,
            op: "test_and_set (held)",
            samples: held,
        },
        Row {
            backend,
            op: "renew",
            samples: renew,
        },
    ])
}

fn main() -> Result<()> {
    let args = Args::parse();
    if !(1..=20_000).contains(&args.iterations) {
        bail!("--iterations must be within 1..=20000");
    }
    let lease = Duration::from_millis(args.lease_ms);
    let timeout = Duration::from_secs(2);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let dir = tempfile::tempdir()?;
    let mut rows = Vec::new();
    rt.block_on(async {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = l.local_addr()?.to_string();
        let state = dir.path().join("arbiter");
        let new = ft_fence::ServerOptions {
            init: true,
            ..Default::default()
        };
        let srv = tokio::spawn(async move { ft_fence::serve_with(l, state, new).await });
        let a: Arc<dyn Arbiter> = Arc::new(EmbeddedArbiter::new(&addr, lease, timeout));
        let b: Arc<dyn Arbiter> = Arc::new(EmbeddedArbiter::new(&addr, lease, timeout));
        rows.extend(bench("embedded", a, b, args.iterations).await?);
        srv.abort();
        if !args.no_etcd {
            let cluster = EtcdCluster::start(1, &dir.path().join("etcd"), Duration::from_secs(20))
                .map_err(anyhow::Error::msg)?;
            let eps = cluster.endpoints();
            let a: Arc<dyn Arbiter> =
                Arc::new(EtcdArbiter::new(eps.clone(), "/bench/", lease, timeout));
            let b: Arc<dyn Arbiter> = Arc::new(EtcdArbiter::new(eps, "/bench/", lease, timeout));
            rows.extend(bench("etcd", a, b, args.iterations).await?);
            drop(cluster);
        }
        anyhow::Ok(())
    })?;

    println!(
        "fence arbiter latency, loopback, {} iterations per row, lease {} ms (microseconds)",
        args.iterations, args.lease_ms
    );
    println!(
        "{:<10} {:<22} {:>8} {:>8} {:>8} {:>8}",
        "backend", "operation", "p50", "p99", "max", "mean"
    );
    for r in &mut rows {
        r.samples.sort_unstable();
        let mean = r.samples.iter().sum::<Duration>() / r.samples.len() as u32;
        println!(
            "{:<10} {:<22} {:>8} {:>8} {:>8} {:>8}",
            r.backend,
            r.op,
            us(pct(&r.samples, 0.50)),
            us(pct(&r.samples, 0.99)),
            us(*r.samples.last().expect("non-empty")),
            us(mean)
        );
    }
    println!(
        "embedded test_and_set (won) includes the fsync of the state file and its directory; etcd (single member) includes lease grant + txn (etcd fsyncs its WAL)."
    );
    Ok(())
}
