//! Load for benchmarks of the protected VM: SET clients that time every request, and
//! the report of a series of joins (re-protection) against windows without one.
use std::{
    io::{Read, Write},
    net::TcpStream,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use hdrhistogram::Histogram;

use crate::{Testbed, names::VM_IP, ns_exec};

/// Request latencies, by when they started: (start, latency).
pub type Samples = Arc<Mutex<Vec<(Instant, Duration)>>>;

/// Clients that SET 100-byte values on their own connections until `finish`.
pub struct SetLoad {
    stop: Arc<AtomicBool>,
    handles: Vec<JoinHandle<Result<()>>>,
    pub samples: Samples,
}

impl SetLoad {
    /// One client per connection (already connected to the VM's service).
    pub fn start(conns: Vec<TcpStream>) -> SetLoad {
        let stop = Arc::new(AtomicBool::new(false));
        let samples: Samples = Arc::default();
        let handles = conns
            .into_iter()
            .enumerate()
            .map(|(id, c)| {
                let (stop, samples) = (stop.clone(), samples.clone());
                std::thread::spawn(move || set_loop(c, id, &stop, &samples))
            })
            .collect();
        SetLoad {
            stop,
            handles,
            samples,
        }
    }

    /// Stops the clients; an error if one failed.
    pub fn finish(self) -> Result<Samples> {
        self.stop.store(true, Ordering::Relaxed);
        for h in self.handles {
            h.join()
                .map_err(|_| anyhow::anyhow!("a SET client panicked"))??;
        }
        Ok(self.samples)
    }
}

fn set_loop(mut c: TcpStream, id: usize, stop: &AtomicBool, samples: &Samples) -> Result<()> {
    c.set_nodelay(true)?;
    c.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut buf = [0u8; 64];
    let mut local = Vec::new();
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let key = format!("c{id}:{}", i % 1000);
        let req = format!(
            "*3\r\n$3\r\nSET\r\n${}\r\n{key}\r\n$100\r\n{:0>100}\r\n",
            key.len(),
            i
        );
        let t = Instant::now();
        c.write_all(req.as_bytes())?;
        let n = c.read(&mut buf)?;
        if &buf[..n] != b"+OK\r\n" {
            bail!(
                "client {id}: SET answered {:?}",
                String::from_utf8_lossy(&buf[..n])
            );
        }
        local.push((t, t.elapsed()));
        i += 1;
    }
    samples.lock().unwrap().extend(local);
    Ok(())
}

/// `keys` keys of `value_bytes` through the appliance (redis-benchmark, pipelined; random
/// keys, so most of the key space).
pub fn fill_keys(tb: &Testbed, keys: u32, value_bytes: u32) -> Result<String> {
    let out = ns_exec(
        &tb.client_ns,
        "redis-benchmark",
        &[
            "-h",
            &VM_IP.to_string(),
            "-c",
            "8",
            "-P",
            "16",
            "-t",
            "set",
            "-q",
            "-n",
            &(keys * 2).to_string(),
            "-r",
            &keys.to_string(),
            "-d",
            &value_bytes.to_string(),
        ],
    )?;
    // -q rewrites its progress line with \r: the last one is the result.
    Ok(out.rsplit('\r').next().unwrap_or("").trim().to_string())
}

/// One join: the guest's pause, the transfer's time and bytes, and when it ran.
pub struct JoinSample {
    pub pause: Duration,
    pub total: Duration,
    pub bytes: u64,
    /// The client-latency window it counts for: from its start to a while after its cut.
    pub window: (Instant, Instant),
}

/// Prints the series: pause and time percentiles, bytes, and the clients' latency in the
/// joins' windows against `quiet` windows (no transfer).
pub fn print_join_report(
    title: &str,
    joins: &[JoinSample],
    quiet: &[(Instant, Instant)],
    samples: &Samples,
    window_note: &str,
) -> Result<()> {
    let mut pause = Histogram::<u64>::new(3)?;
    let mut total = Histogram::<u64>::new(3)?;
    for j in joins {
        pause.record(j.pause.as_micros() as u64)?;
        total.record(j.total.as_micros() as u64)?;
    }
    let windows: Vec<(Instant, Instant)> = joins.iter().map(|j| j.window).collect();
    let (mut during, mut without) = (Histogram::<u64>::new(3)?, Histogram::<u64>::new(3)?);
    let overlaps = |w: &[(Instant, Instant)], t: Instant, d: Duration| {
        w.iter().any(|&(s, e)| t < e && t + d > s)
    };
    for &(t, d) in samples.lock().unwrap().iter() {
        let us = d.as_micros() as u64;
        if overlaps(&windows, t, d) {
            during.record(us)?;
        } else if overlaps(quiet, t, d) {
            without.record(us)?;
        }
    }
    let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1e3;
    let mib: Vec<u64> = joins.iter().map(|j| j.bytes >> 20).collect();
    println!();
    println!("{title}:");
    println!(
        "  pause (stop phase): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        ms(&pause, 0.5),
        ms(&pause, 0.99),
        pause.max() as f64 / 1e3
    );
    println!(
        "  transfer: p50 {:.0} ms, max {:.0} ms; {}-{} MiB per join",
        ms(&total, 0.5),
        total.max() as f64 / 1e3,
        mib.iter().min().unwrap_or(&0),
        mib.iter().max().unwrap_or(&0)
    );
    for (what, h) in [
        (format!("during transfers ({window_note})"), &during),
        ("without a transfer (equal windows)".to_string(), &without),
    ] {
        println!(
            "  client SET latency {what}: p50 {:.3} ms, p99 {:.3} ms, max {:.2} ms ({} requests)",
            ms(h, 0.5),
            ms(h, 0.99),
            h.max() as f64 / 1e3,
            h.len()
        );
    }
    Ok(())
}
