//! Free vs record mode of the guest's service (the cost of logging), log volume per
//! request, replay speed.
use crate::bench::{Row, parse_csv};

use crate::netns::NetNs;
use crate::results::{Made, ModeRows, RecordResults};
use anyhow::{Result, bail};
use ft_common::vmlog::{EV_CHECKPOINT, EV_CLOCK, EntryHdr};
use ft_vmm::net::{Tap, in_netns};
use ft_vmm::vmlog::{LogEntry, LogSink, LogSource, Recv, WriteSink, channel};
use ft_vmm::{Control, Mode, RunReport, Vmm, VmmConfig};
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(clap::Args)]
pub struct RecordArgs {
    /// Requests per redis-benchmark test.
    #[arg(long, default_value_t = 20000)]
    requests: u32,
    #[arg(long, default_value_t = 10)]
    clients: u32,
    /// Pipeline depth of the second run.
    #[arg(long, default_value_t = 16)]
    pipeline: u32,
}

type Args = RecordArgs;

/// A sink that counts and forwards to a channel sink, timing `append`.
struct TimedSink<S: LogSink> {
    inner: S,
    stats: Arc<Mutex<(u64, Duration)>>,
}

impl<S: LogSink> LogSink for TimedSink<S> {
    fn append(&mut self, hdr: &EntryHdr, payload: &[u8]) -> ft_vmm::error::Result<()> {
        let t = Instant::now();
        let r = self.inner.append(hdr, payload);
        let mut s = self.stats.lock().expect("stats");
        s.0 += 1;
        s.1 += t.elapsed();
        r
    }
    fn flush(&mut self) -> ft_vmm::error::Result<()> {
        self.inner.flush()
    }
}

struct ModeResult {
    rows: Vec<Row>,
    report: RunReport,
    requests: u64,
    entries: Vec<LogEntry>,
    append: (u64, Duration),
}

fn bench_mode(ns: &NetNs, mode: Mode, to_file: bool, a: &Args) -> Result<ModeResult> {
    let cfg = VmmConfig {
        mode,
        checkpoint_interval: 1000,
        ..Default::default()
    };
    let nsname = ns.name.clone();
    let tap = in_netns(&nsname, || Tap::open("ftap0"))?;
    let control = Control::new();
    let (sink, mut source) = channel(1 << 20);
    let stats = Arc::new(Mutex::new((0u64, Duration::ZERO)));
    let st = stats.clone();
    // Collect the log on another thread (the backup's role).
    let collector = std::thread::spawn(move || {
        let mut v = Vec::new();
        while let Ok(r) = source.recv(Duration::from_millis(100)) {
            match r {
                Recv::Entry(e) => v.push(e),
                Recv::Empty => {}
                Recv::End => break,
            }
        }
        v
    });
    let c = control.clone();
    let logpath = std::env::temp_dir().join(format!("ftperf-vmm-run-{}.log", std::process::id()));
    let logpath2 = logpath.clone();
    let vm = std::thread::spawn(move || -> ft_vmm::error::Result<RunReport> {
        let mut vmm = Vmm::new(cfg, ft_vmm::GUEST_ELF, c)?;
        vmm.set_net(Box::new(tap));
        if mode == Mode::Record && to_file {
            drop(sink);
            let file = WriteSink::create(&logpath2)?;
            vmm.set_sink(Box::new(TimedSink {
                inner: file,
                stats: st,
            }));
        } else if mode == Mode::Record {
            vmm.set_sink(Box::new(TimedSink {
                inner: sink,
                stats: st,
            }));
        } else {
            drop(sink);
        }
        vmm.run()
    });
    let t = Instant::now();
    loop {
        let o = Command::new("ip")
            .args([
                "netns",
                "exec",
                &ns.name,
                "redis-cli",
                "-h",
                "10.0.0.2",
                "PING",
            ])
            .output()?;
        if String::from_utf8_lossy(&o.stdout).contains("PONG") {
            break;
        }
        if t.elapsed() > Duration::from_secs(20) {
            control.request_stop();
            bail!("guest not ready");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let (n, c) = (a.requests.to_string(), a.clients.to_string());
    let mut rows = Vec::new();
    let out = ns.run(&[
        "redis-benchmark",
        "-h",
        "10.0.0.2",
        "-c",
        &c,
        "-n",
        &n,
        "-t",
        "set,get,incr",
        "--csv",
    ])?;
    rows.extend(parse_csv(&out));
    let p = a.pipeline.to_string();
    let out = ns.run(&[
        "redis-benchmark",
        "-h",
        "10.0.0.2",
        "-c",
        &c,
        "-n",
        &n,
        "-P",
        &p,
        "-t",
        "set,get",
        "--csv",
    ])?;
    for mut r in parse_csv(&out) {
        r.test = format!("{} -P{}", r.test, a.pipeline);
        rows.push(r);
    }
    control.request_stop();
    let report = vm
        .join()
        .map_err(|_| anyhow::anyhow!("vmm thread panicked"))??;
    let entries = collector
        .join()
        .map_err(|_| anyhow::anyhow!("collector panicked"))?;
    let append = *stats.lock().expect("stats");
    Ok(ModeResult {
        rows,
        report,
        requests: 5 * a.requests as u64,
        entries,
        append,
    })
}

fn micro_sink_cost() -> Result<(f64, f64)> {
    let n = 200_000u64;
    let path = std::env::temp_dir().join(format!("ftperf-vmm-{}.log", std::process::id()));
    let mut s = WriteSink::create(&path)?;
    let t = Instant::now();
    for i in 0..n {
        s.append(&EntryHdr::new(EV_CLOCK, i, 0x200000, i * 1000), &[])?;
    }
    s.flush()?;
    let file_ns = t.elapsed().as_nanos() as f64 / n as f64;
    let _ = std::fs::remove_file(&path);
    let (mut sink, mut src) = channel(1 << 20);
    let t = Instant::now();
    for i in 0..n {
        sink.append(&EntryHdr::new(EV_CLOCK, i, 0x200000, i * 1000), &[])?;
    }
    sink.flush()?;
    let chan_ns = t.elapsed().as_nanos() as f64 / n as f64;
    drop(sink);
    while let Recv::Entry(_) = src.recv(Duration::ZERO)? {}
    Ok((file_ns, chan_ns))
}

pub fn run(a: &Args, out: Option<&Path>) -> Result<()> {
    let ns = NetNs::new("rec")?;
    println!(
        "ft-vmm benchmark: redis-benchmark -c {} -n {} (guest RESP server, 1 vCPU)",
        a.clients, a.requests
    );
    let free = bench_mode(&ns, Mode::Free, false, a)?;
    let recf = bench_mode(&ns, Mode::Record, true, a)?;
    let rec = bench_mode(&ns, Mode::Record, false, a)?;
    println!();
    println!(
        "{:<14} {:>9} {:>9} {:>9} | {:>7} {:>7} {:>7} | {:>7} {:>7} {:>7} | {:>7} {:>7} {:>7}",
        "test",
        "free",
        "rec-file",
        "rec-chan",
        "avg F",
        "avg RF",
        "avg RC",
        "p50 F",
        "p50 RF",
        "p50 RC",
        "p99 F",
        "p99 RF",
        "p99 RC"
    );
    println!(
        "{:<14} {:>29} | {:>23} | {:>23} | {:>23}",
        "", "requests/s", "avg latency ms", "p50 ms", "p99 ms"
    );
    for ((f, x), r) in free.rows.iter().zip(recf.rows.iter()).zip(rec.rows.iter()) {
        println!(
            "{:<14} {:>9.0} {:>9.0} {:>9.0} | {:>7.3} {:>7.3} {:>7.3} | {:>7.3} {:>7.3} {:>7.3} | {:>7.3} {:>7.3} {:>7.3}",
            f.test,
            f.rps,
            x.rps,
            r.rps,
            f.avg_ms,
            x.avg_ms,
            r.avg_ms,
            f.p50_ms,
            x.p50_ms,
            r.p50_ms,
            f.p99_ms,
            x.p99_ms,
            r.p99_ms
        );
    }
    println!(
        "(F = free, RF = record to a file sink, RC = record to an in-process channel drained by a collector thread)"
    );
    let (nf, tf) = recf.append;
    println!(
        "in-run LogSink::append (file): {:.0} ns/entry over {nf} entries",
        tf.as_nanos() as f64 / nf.max(1) as f64
    );
    let rr = &rec.report;
    let bytes: usize = rec.entries.iter().map(|e| e.wire_len()).sum();
    println!();
    println!(
        "record run: {} exits, {} log entries, {} log bytes, {} requests",
        rr.exits,
        rec.entries.len(),
        bytes,
        rec.requests
    );
    let mut kinds = std::collections::BTreeMap::new();
    for e in &rec.entries {
        let k = kinds
            .entry(ft_common::vmlog::kind_name(e.kind()))
            .or_insert((0u64, 0u64));
        k.0 += 1;
        k.1 += e.wire_len() as u64;
    }
    println!(
        "{:<14} {:>10} {:>12} {:>10}",
        "entry kind", "entries", "bytes", "bytes/req"
    );
    for (k, (n, b)) in &kinds {
        println!(
            "{:<14} {:>10} {:>12} {:>10.1}",
            k,
            n,
            b,
            *b as f64 / rec.requests as f64
        );
    }
    println!(
        "log volume per request: {:.2} entries, {:.1} bytes",
        rec.entries.len() as f64 / rec.requests as f64,
        bytes as f64 / rec.requests as f64
    );
    let (napp, tapp) = rec.append;
    println!(
        "in-run LogSink::append (channel): {:.0} ns/entry over {napp} entries",
        tapp.as_nanos() as f64 / napp.max(1) as f64
    );
    let (file_ns, chan_ns) = micro_sink_cost()?;
    println!(
        "micro: file sink {file_ns:.0} ns/entry, channel sink {chan_ns:.0} ns/entry (40-byte entries)"
    );
    println!(
        "guest exits: free {} ({:.1} us/exit wall), record {} ({:.1} us/exit wall)",
        free.report.exits,
        free.report.elapsed.as_secs_f64() * 1e6 / free.report.exits.max(1) as f64,
        rr.exits,
        rr.elapsed.as_secs_f64() * 1e6 / rr.exits.max(1) as f64
    );
    let ckpts = rec
        .entries
        .iter()
        .filter(|e| e.kind() == EV_CHECKPOINT)
        .count();
    // Replay speed and checkpoint verification.
    let entries = rec.entries.clone();
    let t = Instant::now();
    let mut vmm = Vmm::new(
        VmmConfig {
            mode: Mode::Replay,
            ..Default::default()
        },
        ft_vmm::GUEST_ELF,
        Control::new(),
    )?;
    vmm.set_source(Box::new(ft_vmm::vmlog::VecSource::new(entries)));
    let r = vmm.run()?;
    let dt = t.elapsed();
    println!(
        "replay: {:?} in {:.3}s ({:.0} entries/s), {} checks verified ({ckpts} checkpoints + END), state {}",
        r.outcome,
        dt.as_secs_f64(),
        rec.entries.len() as f64 / dt.as_secs_f64(),
        r.stats.checkpoints_verified,
        if r.state_hash == rr.state_hash {
            "identical"
        } else {
            "DIFFERENT"
        }
    );
    let mode = |name: &str, m: &ModeResult| ModeRows {
        mode: name.to_string(),
        rows: m.rows.clone(),
    };
    crate::results::save(out, |all| {
        all.record = Some(RecordResults {
            made: Made::now(),
            clients: a.clients,
            requests: a.requests,
            modes: vec![
                mode("free", &free),
                mode("record (file sink)", &recf),
                mode("record (channel)", &rec),
            ],
            log_entries_per_request: rec.entries.len() as f64 / rec.requests as f64,
            log_bytes_per_request: bytes as f64 / rec.requests as f64,
            append_ns_per_entry: tf.as_nanos() as f64 / nf.max(1) as f64,
            replay_entries_per_s: rec.entries.len() as f64 / dt.as_secs_f64(),
            replay_identical: r.state_hash == rr.state_hash,
        })
    })
}
