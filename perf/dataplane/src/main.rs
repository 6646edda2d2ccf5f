//! `ft-perf-dataplane`: side-by-side benchmark of the appliance's kernel data plane on
//! the namespace testbed (run as root, after `cargo build --release --bins` into one
//! target dir so that `ftd` and `ft-standin` sit next to this binary).
//!
//! Phase 1 (output-rule latency): client UDP PING/PONG round trips through the appliance
//! with the output gate on and off (alternating rounds, daemons restarted between rounds
//! on the same testbed), plus a raw AF_PACKET ping-pong over the logging link (EtherType
//! 0x88b6, echoed in host B's namespace) measured in the same rounds.
//!
//! Phase 2 (logging-channel throughput): a full-speed burst of frames for the VM from
//! the client namespace; log frames arriving at host B's log0 are counted, once with the
//! XDP duplication path and once with a userspace AF_PACKET forwarder on host A.
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    os::fd::{AsRawFd, OwnedFd, RawFd},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use clap::Parser;
use ft_common::wire::{ETHERTYPE_FT, EthHdr, FtHdr, KIND_LOG, LOG_OVERHEAD, LogHdr};
use ft_testbed::{
    Appliance, ApplianceOptions, RawSock, Testbed, TestbedOptions, blast, fmt_mac, names::*,
    netns::open_netns, try_run_in_ns, udp_frame,
};
use zerocopy::IntoBytes;

/// EtherType of the raw logging-link ping-pong (IEEE local experimental 2).
const ETHERTYPE_PING: u16 = 0x88b6;
/// Per-request timeout (a lost request counts as a timeout, not as a sample).
const REQ_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Parser, Debug)]
#[command(about = "FT data-plane benchmark: output-rule latency and logging-channel throughput")]
struct Args {
    /// Round trips per gate setting per round (and raw-link pings per round).
    #[arg(long, default_value_t = 5000)]
    requests: usize,
    /// Latency rounds; each round measures gate-on and gate-off (order alternates).
    #[arg(long, default_value_t = 4)]
    rounds: usize,
    /// Frames in each throughput burst.
    #[arg(long, default_value_t = 300_000)]
    burst_frames: usize,
    /// Size of each burst frame in bytes (Ethernet header included, no FCS).
    #[arg(long, default_value_t = 128)]
    frame_size: usize,
    /// Throughput rounds (each measures every path once; order alternates).
    #[arg(long, default_value_t = 2)]
    tput_rounds: usize,
    /// Throughput paths to measure (comma-separated subset of
    /// xdp-backup,xdp-nobackup,userspace,userspace-vm).
    #[arg(long, default_value = "xdp-backup,xdp-nobackup,userspace,userspace-vm")]
    tput_paths: String,
    /// XDP attach mode of the daemons: driver (native, default) or skb (generic).
    #[arg(long, default_value = "driver", value_parser = ["driver", "skb"])]
    xdp_mode: String,
    /// Skip phase 1 (latency).
    #[arg(long)]
    skip_latency: bool,
    /// Skip phase 2 (throughput).
    #[arg(long)]
    skip_throughput: bool,
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.frame_size < 64 || args.frame_size > 1514 {
        bail!("--frame-size must be within 64..=1514");
    }
    if args.requests == 0 || args.rounds == 0 || args.burst_frames == 0 {
        bail!("--requests, --rounds and --burst-frames must be > 0");
    }
    // SAFETY: plain getuid().
    if unsafe { libc::geteuid() } != 0 {
        bail!("must run as root (creates network namespaces, loads XDP programs)");
    }
    let t_start = Instant::now();
    print_header();
    let tb = Testbed::new(TestbedOptions {
        quiet_standins: true,
        ..Default::default()
    })
    .context("building testbed")?;
    // Pin the VM's MAC to host A's bridge port so bursts are not flooded to B/arbiter
    // (the bridge would learn it from A's first released reply anyway).
    ft_testbed::netns::ns_exec(
        &tb.client_ns,
        "bridge",
        &[
            "fdb",
            "replace",
            &fmt_mac(&VM_MAC),
            "dev",
            BR_PORT_A,
            "master",
            "static",
        ],
    )
    .context("bridge fdb replace")?;
    println!("testbed: {} (logs in {})", tb.prefix, tb.tmp_dir.display());
    if !args.skip_latency {
        latency_phase(&tb, &args)?;
    }
    if !args.skip_throughput {
        throughput_phase(&tb, &args)?;
    }
    println!("\ntotal runtime: {:.1} s", t_start.elapsed().as_secs_f64());
    Ok(())
}

fn print_header() {
    let cmd: Vec<String> = std::env::args().collect();
    println!("== ft-perf-dataplane ==");
    println!("command: {}", cmd.join(" "));
    let nproc = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':').map(|(_, v)| v.trim().to_string()))
        .unwrap_or_else(|| "?".into());
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "machine: nproc={nproc} kernel={} cpu=\"{cpu}\" loadavg={}",
        kernel.trim(),
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!(
        "ftd: {}",
        ft_testbed::ftd_bin()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|e| format!("NOT FOUND ({e})"))
    );
}

// ------------------------------------------------------------------------------------
// Small socket helpers.
// ------------------------------------------------------------------------------------

/// AF_PACKET socket in `ns` on `ifname` receiving only EtherType `proto` (0: receive
/// nothing, send only), 8 MiB buffers. Returns (fd, ifindex).
fn packet_sock(ns: &str, ifname: &str, proto: u16) -> Result<(OwnedFd, i32)> {
    let (fd, idx) = ft_testbed::raw::open_packet_socket(ns, ifname, proto, 8 << 20, 8 << 20)?;
    Ok((fd, idx as i32))
}

/// poll(POLLIN) with a timeout in ms; true if readable.
fn poll_in(fd: RawFd, ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let rc = unsafe { libc::poll(&mut p, 1, ms) };
    rc > 0
}

/// Non-blocking receive; Some((len, pkttype)).
fn recv_nb(fd: RawFd, buf: &mut [u8]) -> Option<(usize, u8)> {
    ft_testbed::raw::recv_one(fd, buf).ok().flatten()
}

/// send() on a bound packet socket, retrying briefly on ENOBUFS/EAGAIN. True if sent.
fn send_frame(fd: RawFd, frame: &[u8]) -> bool {
    for _ in 0..1000 {
        // SAFETY: buffer pointer/len valid for the call.
        let n = unsafe { libc::send(fd, frame.as_ptr() as *const libc::c_void, frame.len(), 0) };
        if n >= 0 {
            return true;
        }
        let e = std::io::Error::last_os_error().raw_os_error();
        if !matches!(
            e,
            Some(libc::ENOBUFS) | Some(libc::EAGAIN) | Some(libc::EINTR)
        ) {
            return false;
        }
        std::thread::sleep(Duration::from_micros(50));
    }
    false
}

/// Spawns `f` on a new thread that first enters network namespace `ns`.
fn spawn_in_ns<T: Send + 'static>(
    ns: &str,
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<JoinHandle<T>> {
    let fd = open_netns(ns)?;
    let ns_s = ns.to_string();
    Ok(std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            // SAFETY: setns on a valid, owned netns fd; affects only this fresh thread.
            let rc = unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns({ns_s}): {}", std::io::Error::last_os_error());
            drop(fd);
            f()
        })?)
}

/// (rx_packets, rx_dropped, tx_packets, tx_dropped) of `ifname` in the calling thread's
/// network namespace (/proc/thread-self/net/dev).
fn netdev_stats(ifname: &str) -> Option<(u64, u64, u64, u64)> {
    let text = std::fs::read_to_string("/proc/thread-self/net/dev").ok()?;
    for line in text.lines() {
        let Some((name, rest)) = line.split_once(':') else {
            continue;
        };
        if name.trim() != ifname {
            continue;
        }
        let v: Vec<u64> = rest
            .split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect();
        if v.len() >= 12 {
            return Some((v[1], v[3], v[9], v[11]));
        }
    }
    None
}

/// Same, for an interface in another namespace.
fn netdev_stats_in(ns: &str, ifname: &str) -> (u64, u64, u64, u64) {
    let ifname = ifname.to_string();
    try_run_in_ns(ns, move || netdev_stats(&ifname))
        .ok()
        .flatten()
        .unwrap_or_default()
}

/// `ethtool -S` counters of an interface (empty on failure).
fn ethtool_stats(ns: &str, ifname: &str) -> std::collections::BTreeMap<String, u64> {
    let out = ft_testbed::ns_exec(ns, "ethtool", &["-S", ifname]).unwrap_or_default();
    out.lines()
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(':')?;
            Some((k.trim().to_string(), v.trim().parse().ok()?))
        })
        .collect()
}

/// The interfaces on the burst path whose `ethtool -S` deltas are reported.
fn path_ifaces(tb: &Testbed) -> Vec<(String, String, &'static str)> {
    vec![
        (tb.a.ns.clone(), "A".into(), CLI_IF),
        (tb.a.ns.clone(), "A".into(), LOG_IF),
        (tb.wire_ns.clone(), "wire".into(), WIRE_A),
        (tb.wire_ns.clone(), "wire".into(), WIRE_B),
        (tb.b.ns.clone(), "B".into(), LOG_IF),
    ]
}

type EthSnap = Vec<std::collections::BTreeMap<String, u64>>;

fn ethtool_snap(tb: &Testbed) -> EthSnap {
    path_ifaces(tb)
        .iter()
        .map(|(ns, _, i)| ethtool_stats(ns, i))
        .collect()
}

/// Non-zero deltas of drop/error/xdp counters between two snapshots.
fn ethtool_delta(tb: &Testbed, before: &EthSnap, after: &EthSnap) -> Vec<String> {
    let mut out = Vec::new();
    for ((_, host, ifname), (b, a)) in path_ifaces(tb).iter().zip(before.iter().zip(after)) {
        let mut parts = Vec::new();
        for (k, v) in a {
            let d = v.saturating_sub(b.get(k).copied().unwrap_or(0));
            let interesting = k.contains("drop") || k.contains("err") || k.contains("xdp");
            if d > 0 && interesting && !k.contains("bytes") {
                parts.push(format!("{k}=+{d}"));
            }
        }
        if !parts.is_empty() {
            out.push(format!("ethtool {host}/{ifname}: {}", parts.join(" ")));
        }
    }
    out
}

// ------------------------------------------------------------------------------------
// Statistics.
// ------------------------------------------------------------------------------------

/// Nearest-rank percentile of sorted samples (ns), in µs.
fn pct_us(sorted: &[u64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1] as f64 / 1000.0
}

#[derive(Default)]
struct Series {
    samples: Vec<u64>,
    timeouts: u64,
}

impl Series {
    fn pcts(&self) -> [f64; 4] {
        let mut s = self.samples.clone();
        s.sort_unstable();
        [
            pct_us(&s, 0.5),
            pct_us(&s, 0.99),
            pct_us(&s, 0.999),
            s.last().map(|&x| x as f64 / 1000.0).unwrap_or(f64::NAN),
        ]
    }
    fn mean_us(&self) -> f64 {
        if self.samples.is_empty() {
            return f64::NAN;
        }
        self.samples.iter().sum::<u64>() as f64 / self.samples.len() as f64 / 1000.0
    }
}

// ------------------------------------------------------------------------------------
// Phase 1: latency.
// ------------------------------------------------------------------------------------

/// `n` PING/PONG round trips, one outstanding at a time, bounded by `budget`.
fn udp_round_trips(tb: &Testbed, n: usize, budget: Duration, out: &mut Series) -> Result<()> {
    let c = tb.vm_client()?;
    let sock = c.socket();
    let target = c.target();
    sock.set_read_timeout(Some(REQ_TIMEOUT))?;
    let mut buf = [0u8; 256];
    let end = Instant::now() + budget;
    for _ in 0..n {
        if Instant::now() > end {
            break;
        }
        let t0 = Instant::now();
        sock.send_to(b"PING", target)?;
        loop {
            match sock.recv_from(&mut buf) {
                Ok((len, from)) if from == target && &buf[..len] == b"PONG" => {
                    out.samples.push(t0.elapsed().as_nanos() as u64);
                    break;
                }
                Ok(_) => {
                    if t0.elapsed() > REQ_TIMEOUT {
                        out.timeouts += 1;
                        break;
                    }
                }
                Err(_) => {
                    out.timeouts += 1;
                    break;
                }
            }
        }
    }
    Ok(())
}

/// Echo loop in host B's namespace: swaps the MACs of every 0x88b6 frame on log0 and
/// sends it back. Runs until `stop` or `lifetime`.
fn spawn_link_echo(
    tb: &Testbed,
    stop: Arc<AtomicBool>,
    lifetime: Duration,
) -> Result<JoinHandle<u64>> {
    let (fd, _) = packet_sock(&tb.b.ns, LOG_IF, ETHERTYPE_PING)?;
    Ok(std::thread::Builder::new()
        .name("link-echo".into())
        .spawn(move || {
            let end = Instant::now() + lifetime;
            let mut buf = vec![0u8; 4096];
            let mut echoed = 0u64;
            while !stop.load(Ordering::Relaxed) && Instant::now() < end {
                if !poll_in(fd.as_raw_fd(), 20) {
                    continue;
                }
                while let Some((len, pkttype)) = recv_nb(fd.as_raw_fd(), &mut buf) {
                    if pkttype == libc::PACKET_OUTGOING || len < 14 {
                        continue;
                    }
                    let mut mac = [0u8; 6];
                    mac.copy_from_slice(&buf[0..6]);
                    buf.copy_within(6..12, 0);
                    buf[6..12].copy_from_slice(&mac);
                    if send_frame(fd.as_raw_fd(), &buf[..len]) {
                        echoed += 1;
                    }
                }
            }
            echoed
        })?)
}

/// `n` raw ping-pongs from host A's log0 to host B's echo and back.
fn link_round_trips(tb: &Testbed, n: usize, budget: Duration, out: &mut Series) -> Result<()> {
    let (fd, _) = packet_sock(&tb.a.ns, LOG_IF, ETHERTYPE_PING)?;
    let fd = fd.as_raw_fd();
    // Same size as the log frame that carries one PING request (46 + 46 bytes).
    let mut frame = vec![0u8; LOG_OVERHEAD + 46];
    frame[0..6].copy_from_slice(&tb.b.log_mac);
    frame[6..12].copy_from_slice(&tb.a.log_mac);
    frame[12..14].copy_from_slice(&ETHERTYPE_PING.to_be_bytes());
    let mut buf = vec![0u8; 4096];
    let end = Instant::now() + budget;
    for i in 0..n as u64 {
        if Instant::now() > end {
            break;
        }
        frame[14..22].copy_from_slice(&i.to_be_bytes());
        let t0 = Instant::now();
        if !send_frame(fd, &frame) {
            out.timeouts += 1;
            continue;
        }
        let mut got = false;
        while t0.elapsed() < REQ_TIMEOUT {
            let left = REQ_TIMEOUT.saturating_sub(t0.elapsed()).as_millis().max(1) as i32;
            if !poll_in(fd, left) {
                continue;
            }
            while let Some((len, pkttype)) = recv_nb(fd, &mut buf) {
                if pkttype != libc::PACKET_OUTGOING && len >= 22 && buf[14..22] == i.to_be_bytes() {
                    got = true;
                }
            }
            if got {
                out.samples.push(t0.elapsed().as_nanos() as u64);
                break;
            }
        }
        if !got {
            out.timeouts += 1;
        }
    }
    Ok(())
}

/// GET /metrics from the daemon in `ns` (127.0.0.1:9477).
fn fetch_metrics(ns: &str) -> Result<String> {
    let stream = try_run_in_ns(ns, || {
        TcpStream::connect_timeout(
            &SocketAddr::from(([127, 0, 0, 1], 9477)),
            Duration::from_secs(1),
        )
    })??;
    let mut s = stream;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    Ok(body)
}

/// Per-bucket (non-cumulative) hold-time histogram: (upper bound "le" in µs or +Inf, n).
fn parse_hold_hist(metrics: &str) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    let mut prev = 0u64;
    for line in metrics.lines() {
        let Some(rest) = line.strip_prefix("ft_output_hold_seconds_bucket{le=\"") else {
            continue;
        };
        let Some((le, v)) = rest.split_once("\"}") else {
            continue;
        };
        let cum: u64 = v.trim().parse().unwrap_or(0);
        let label = match le.parse::<f64>() {
            Ok(s) => format!("{}", (s * 1e6).round() as u64),
            Err(_) => "+Inf".into(),
        };
        out.push((label, cum.saturating_sub(prev)));
        prev = cum;
    }
    out
}

fn add_hist(acc: &mut Vec<(String, u64)>, h: Vec<(String, u64)>) {
    if acc.is_empty() {
        *acc = h;
        return;
    }
    for (a, (_, n)) in acc.iter_mut().zip(h) {
        a.1 += n;
    }
}

fn print_hist(title: &str, h: &[(String, u64)]) {
    let total: u64 = h.iter().map(|(_, n)| n).sum();
    println!("  {title} (n={total})");
    if total == 0 {
        return;
    }
    let max = h.iter().map(|(_, n)| *n).max().unwrap_or(1).max(1);
    let mut lower = "0".to_string();
    for (le, n) in h {
        if *n > 0 {
            let bar = "#".repeat(((*n * 40).div_ceil(max)) as usize);
            println!(
                "    [{lower:>6}, {le:>6}) us {n:>8} {:>6.2}% {bar}",
                *n as f64 * 100.0 / total as f64
            );
        }
        lower = le.clone();
    }
}

/// Appliance options shared by every run (defaults plus --xdp-mode).
fn base_opts(args: &Args) -> ApplianceOptions {
    ApplianceOptions {
        xdp_mode: if args.xdp_mode == "skb" {
            "skb"
        } else {
            "driver"
        },
        ..Default::default()
    }
}

fn start_appliance(tb: &Testbed, o: &ApplianceOptions) -> Result<Appliance> {
    let app = Appliance::start(tb, o)?;
    // Warm-up: the whole path (and ARP) works before measuring.
    let c = tb.vm_client()?;
    let mut ok = false;
    for _ in 0..20 {
        if c.request("PING", Duration::from_millis(500))?.as_deref() == Some("PONG") {
            ok = true;
            break;
        }
    }
    if !ok {
        bail!(
            "appliance does not answer PING after start\nprimary: {:#}",
            app.status('a').unwrap_or_default()
        );
    }
    Ok(app)
}

fn stop_appliance(app: Appliance) {
    for g in [&app.a, &app.b].into_iter().flatten() {
        let _ = g.kill();
    }
    drop(app);
    // Let the kernel detach the programs (link fds closed with the process).
    std::thread::sleep(Duration::from_millis(100));
}

fn latency_phase(tb: &Testbed, args: &Args) -> Result<()> {
    println!(
        "\n== Phase 1: output-rule latency ({} rounds x {} requests per gate setting; \
         raw link pings in every half-round) ==",
        args.rounds, args.requests
    );
    let mut on = Series::default();
    let mut off = Series::default();
    let mut raw_on = Series::default();
    let mut raw_off = Series::default();
    let mut hist_on = Vec::new();
    let mut hist_off = Vec::new();
    let mut held_max = 0u64;
    let budget = Duration::from_secs(12);
    for r in 0..args.rounds {
        let order = if r % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        for gate in order {
            let o = ApplianceOptions {
                hold_output: gate,
                ..base_opts(args)
            };
            let t0 = Instant::now();
            let app = start_appliance(tb, &o)?;
            let stop = Arc::new(AtomicBool::new(false));
            let echo = spawn_link_echo(tb, stop.clone(), Duration::from_secs(60))?;
            let (s, raw) = if gate {
                (&mut on, &mut raw_on)
            } else {
                (&mut off, &mut raw_off)
            };
            let (n0, t0s) = (s.samples.len(), s.timeouts);
            udp_round_trips(tb, args.requests, budget, s)?;
            let (rn0, rt0) = (raw.samples.len(), raw.timeouts);
            link_round_trips(tb, args.requests, budget, raw)?;
            stop.store(true, Ordering::Relaxed);
            let _ = echo.join();
            let m = fetch_metrics(&tb.a.ns).unwrap_or_default();
            let h = parse_hold_hist(&m);
            let st = app.status('a').unwrap_or_default();
            held_max = held_max.max(st["held_frames"].as_u64().unwrap_or(0));
            if gate {
                add_hist(&mut hist_on, h);
            } else {
                add_hist(&mut hist_off, h);
            }
            let mut tail = s.samples[n0..].to_vec();
            tail.sort_unstable();
            let mut rtail = raw.samples[rn0..].to_vec();
            rtail.sort_unstable();
            println!(
                "  round {r} gate={:<3}: udp n={} p50={:.1}us p99={:.1}us timeouts={} | raw n={} p50={:.1}us timeouts={} | released={} acks_rx={} ({:.1}s)",
                if gate { "on" } else { "off" },
                tail.len(),
                pct_us(&tail, 0.5),
                pct_us(&tail, 0.99),
                s.timeouts - t0s,
                rtail.len(),
                pct_us(&rtail, 0.5),
                raw.timeouts - rt0,
                st["counters"]["output_released_frames_total"],
                st["counters"]["acks_received_total"],
                t0.elapsed().as_secs_f64()
            );
            stop_appliance(app);
        }
    }
    let mut raw_all = Series::default();
    raw_all.samples.extend(&raw_on.samples);
    raw_all.samples.extend(&raw_off.samples);
    raw_all.timeouts = raw_on.timeouts + raw_off.timeouts;

    println!(
        "\n  {:<38} {:>7} {:>9} {:>9} {:>9} {:>9} {:>9} {:>8}",
        "round trip (us)", "n", "mean", "p50", "p99", "p99.9", "max", "timeouts"
    );
    let row = |name: &str, s: &Series| {
        let p = s.pcts();
        println!(
            "  {:<38} {:>7} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>8}",
            name,
            s.samples.len(),
            s.mean_us(),
            p[0],
            p[1],
            p[2],
            p[3],
            s.timeouts
        );
    };
    row("client UDP, gate ON (output rule)", &on);
    row("client UDP, gate OFF (hold_output=false)", &off);
    row("raw log link A<->B (0x88b6), all", &raw_all);
    row("raw log link, during gate-ON rounds", &raw_on);
    row("raw log link, during gate-OFF rounds", &raw_off);
    let (pon, poff, praw) = (on.pcts(), off.pcts(), raw_all.pcts());
    println!(
        "\n  {:<38} {:>9} {:>9} {:>9}",
        "ratio", "p50", "p99", "p99.9"
    );
    println!(
        "  {:<38} {:>9.2} {:>9.2} {:>9.2}",
        "gate-on / gate-off",
        pon[0] / poff[0],
        pon[1] / poff[1],
        pon[2] / poff[2]
    );
    println!(
        "  {:<38} {:>9.2} {:>9.2} {:>9.2}",
        "(gate-on - gate-off) / raw link RTT",
        (pon[0] - poff[0]) / praw[0],
        (pon[1] - poff[1]) / praw[1],
        (pon[2] - poff[2]) / praw[2]
    );
    println!(
        "  {:<38} {:>9.1} {:>9.1} {:>9.1}",
        "gate-on - gate-off (us)",
        pon[0] - poff[0],
        pon[1] - poff[1],
        pon[2] - poff[2]
    );
    println!("\n  primary hold-time histogram (ft_output_hold_seconds, summed over rounds):");
    print_hist("gate ON", &hist_on);
    print_hist("gate OFF", &hist_off);
    println!("  max held_frames seen at end of a round: {held_max}");
    Ok(())
}

// ------------------------------------------------------------------------------------
// Phase 2: throughput.
// ------------------------------------------------------------------------------------

fn burst(n: usize, size: usize) -> Vec<Vec<u8>> {
    let payload_len = size.saturating_sub(42).max(4);
    (0..n as u32)
        .map(|i| {
            let mut p = vec![0u8; payload_len];
            p[..4].copy_from_slice(&i.to_be_bytes());
            udp_frame(
                [2, 0, 0, 0, 0, 1],
                VM_MAC,
                CLIENT_IP,
                VM_IP,
                40000,
                9, // discard: no listener, the VM sends no reply per frame
                &p,
            )
        })
        .collect()
}

/// Samples rx_packets of `ifname` in `ns` every ms until `stop` (bounded by `lifetime`).
/// Publishes the count since start in `live` and returns every change as (time, count).
fn spawn_rx_watch(
    ns: &str,
    ifname: &str,
    stop: Arc<AtomicBool>,
    live: Arc<AtomicU64>,
    lifetime: Duration,
) -> Result<JoinHandle<Vec<(Instant, u64)>>> {
    let ifname = ifname.to_string();
    spawn_in_ns(ns, "rx-watch", move || {
        let end = Instant::now() + lifetime;
        let c0 = netdev_stats(&ifname).map(|s| s.0).unwrap_or(0);
        let mut last = c0;
        let mut changes = vec![(Instant::now(), 0)];
        while !stop.load(Ordering::Relaxed) && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(1));
            let c = netdev_stats(&ifname).map(|s| s.0).unwrap_or(last);
            if c != last {
                last = c;
                changes.push((Instant::now(), c - c0));
                live.store(c - c0, Ordering::Relaxed);
            }
        }
        changes
    })
}

struct TputResult {
    name: String,
    sent: usize,
    offered_fps: f64,
    arrived_a: u64,
    at_b: u64,
    b_fps: f64,
    extra: Vec<String>,
}

/// Blasts `frames` from the client namespace and counts frames arriving at host B's log0.
fn measure_burst(tb: &Testbed, frames: &[Vec<u8>], name: &str) -> Result<TputResult> {
    let stop = Arc::new(AtomicBool::new(false));
    let live = Arc::new(AtomicU64::new(0));
    let a0 = netdev_stats_in(&tb.a.ns, CLI_IF);
    let watch = spawn_rx_watch(
        &tb.b.ns,
        LOG_IF,
        stop.clone(),
        live.clone(),
        Duration::from_secs(60),
    )?;
    std::thread::sleep(Duration::from_millis(20));
    let eth0 = ethtool_snap(tb);
    let t0 = Instant::now();
    let bs = blast(&tb.client_ns, BRIDGE, frames, None)?;
    // Done when B's counter gains fewer than 100 frames in 300 ms (the primary's
    // heartbeats keep it ticking at ~200/s, so "no change at all" never happens).
    let mut checkpoint = live.load(Ordering::Relaxed);
    let mut t_progress = Instant::now();
    let end = Instant::now() + Duration::from_secs(20);
    while Instant::now() < end && t_progress.elapsed() < Duration::from_millis(300) {
        std::thread::sleep(Duration::from_millis(5));
        let c = live.load(Ordering::Relaxed);
        if c >= checkpoint + 100 {
            checkpoint = c;
            t_progress = Instant::now();
        }
    }
    stop.store(true, Ordering::Relaxed);
    let changes = watch
        .join()
        .map_err(|_| anyhow::anyhow!("rx watch panicked"))?;
    let a1 = netdev_stats_in(&tb.a.ns, CLI_IF);
    let eth1 = ethtool_snap(tb);
    // The burst ended when the count first reached the last checkpoint.
    let (t_last, at_b) = changes
        .iter()
        .find(|(_, c)| *c >= checkpoint)
        .copied()
        .unwrap_or((t0, 0));
    let total_b = changes.last().map(|c| c.1).unwrap_or(0);
    let secs = t_last.saturating_duration_since(t0).as_secs_f64().max(1e-6);
    Ok(TputResult {
        name: name.into(),
        sent: bs.sent,
        offered_fps: bs.sent as f64 / bs.elapsed.as_secs_f64().max(1e-9),
        arrived_a: a1.0 - a0.0,
        at_b,
        b_fps: at_b as f64 / secs,
        extra: vec![format!(
            "host A cli0 rx_dropped +{}; B log0: {at_b} frames in {:.3}s after blast start \
             ({total_b} incl. the quiet tail)",
            a1.1 - a0.1,
            secs
        )]
        .into_iter()
        .chain(ethtool_delta(tb, &eth0, &eth1))
        .collect(),
    })
}

fn xdp_run(
    tb: &Testbed,
    frames: &[Vec<u8>],
    o: &ApplianceOptions,
    name: &str,
) -> Result<TputResult> {
    let app = start_appliance(tb, o)?;
    let keys_a = [
        "log_duplicated_frames_total",
        "client_rx_vm_frames_total",
        "log_retransmitted_frames_total",
        "nacks_received_total",
    ];
    let drops_a = ["log_window_full", "retransmit_error", "nack_not_in_store"];
    let keys_b = [
        "log_received_frames_total",
        "log_received_retransmits_total",
    ];
    let drops_b = [
        "no_afxdp_socket",
        "duplicate_log",
        "log_seq_out_of_window",
        "client_frame_on_backup",
    ];
    let snap = |host: char, keys: &[&str]| -> Vec<u64> {
        let st = app.status(host).unwrap_or_default();
        keys.iter()
            .map(|k| {
                st["counters"][*k]
                    .as_u64()
                    .or_else(|| st["drops"][*k].as_u64())
                    .unwrap_or(0)
            })
            .collect()
    };
    let all_a: Vec<&str> = keys_a.iter().chain(drops_a.iter()).copied().collect();
    let all_b: Vec<&str> = keys_b.iter().chain(drops_b.iter()).copied().collect();
    let a0 = snap('a', &all_a);
    let b0 = if o.start_backup {
        snap('b', &all_b)
    } else {
        vec![0; all_b.len()]
    };
    let mut r = measure_burst(tb, frames, name)?;
    let a1 = snap('a', &all_a);
    let mut s = String::from("primary:");
    for (i, k) in all_a.iter().enumerate() {
        s += &format!(" {k}=+{}", a1[i] - a0[i]);
    }
    r.extra.push(s);
    if o.start_backup {
        let b1 = snap('b', &all_b);
        let mut s = String::from("backup:");
        for (i, k) in all_b.iter().enumerate() {
            s += &format!(" {k}=+{}", b1[i] - b0[i]);
        }
        r.extra.push(s);
        let st = app.status('a').unwrap_or_default();
        r.extra.push(format!(
            "primary log state when B went quiet: {}",
            st["log"]
        ));
        // Does the backup catch up (acked == last_seq) once the burst is over? If not,
        // trace the repair loop once a second (bounded).
        let t = Instant::now();
        let mut caught_up = false;
        for step in 0..10 {
            let e0 = ethtool_snap(tb);
            caught_up = Appliance::wait_until(Duration::from_secs(1), || {
                let st = app.status('a').unwrap_or_default();
                st["log"]["acked"] == st["log"]["last_seq"]
            });
            if caught_up {
                break;
            }
            let (sa, sb) = (
                app.status('a').unwrap_or_default(),
                app.status('b').unwrap_or_default(),
            );
            r.extra.push(format!(
                "  stalled t+{}s: A acked={} last_seq={} nacks_rx={} retx_sent={} nack_invalid={} \
                 retx_miss={} retx_err={} | B delivered={} nacks_sent={} log_rx={} retx_rx={} \
                 dup={} out_of_window={} buffered={} high={}",
                step + 1,
                sa["log"]["acked"],
                sa["log"]["last_seq"],
                sa["counters"]["nacks_received_total"],
                sa["counters"]["log_retransmitted_frames_total"],
                sa["drops"]["nack_invalid"],
                sa["drops"]["nack_not_in_store"],
                sa["drops"]["retransmit_error"],
                sb["log"]["delivered"],
                sb["channel"]["nacks_sent"],
                sb["counters"]["log_received_frames_total"],
                sb["counters"]["log_received_retransmits_total"],
                sb["drops"]["duplicate_log"],
                sb["drops"]["log_seq_out_of_window"],
                sb["channel"]["buffered"],
                sb["channel"]["high"],
            ));
            if step == 0 {
                // Is the logging link itself still usable (non-0x88b5 raw ping A->B->A)?
                let stop = Arc::new(AtomicBool::new(false));
                let mut ping = Series::default();
                if let Ok(echo) = spawn_link_echo(tb, stop.clone(), Duration::from_secs(10)) {
                    let _ = link_round_trips(tb, 5, Duration::from_secs(6), &mut ping);
                    stop.store(true, Ordering::Relaxed);
                    let _ = echo.join();
                }
                r.extra.push(format!(
                    "    raw 0x88b6 ping A->B->A during the stall: {} of 5 answered",
                    ping.samples.len()
                ));
                for (ns, who, ifn) in [
                    (&tb.a.ns, "A", LOG_IF),
                    (&tb.wire_ns, "wire", WIRE_A),
                    (&tb.wire_ns, "wire", WIRE_B),
                ] {
                    let e = ethtool_stats(ns, ifn);
                    let nz: Vec<String> = e
                        .iter()
                        .filter(|(k, v)| **v > 0 && !k.contains("bytes"))
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect();
                    r.extra.push(format!(
                        "    ethtool {who}/{ifn} (cumulative): {}",
                        nz.join(" ")
                    ));
                    let ipl = ft_testbed::ns_exec(ns, "ip", &["-s", "-d", "link", "show", ifn])
                        .unwrap_or_default();
                    for l in ipl.lines() {
                        r.extra.push(format!("      {}", l.trim()));
                    }
                }
            }
            if step < 2 {
                let nz = |v: &serde_json::Value| -> String {
                    v.as_object()
                        .map(|m| {
                            m.iter()
                                .filter(|(_, x)| x.as_u64().unwrap_or(0) > 0)
                                .map(|(k, x)| format!("{k}={x}"))
                                .collect::<Vec<_>>()
                                .join(" ")
                        })
                        .unwrap_or_default()
                };
                r.extra
                    .push(format!("    A drops (cumulative): {}", nz(&sa["drops"])));
                r.extra
                    .push(format!("    B drops (cumulative): {}", nz(&sb["drops"])));
                for l in ethtool_delta(tb, &e0, &ethtool_snap(tb)) {
                    r.extra.push(format!("    during this second: {l}"));
                }
            }
        }
        let st = app.status('a').unwrap_or_default();
        r.extra.push(format!(
            "backup caught up: {caught_up} after {:.2}s; primary log {}",
            t.elapsed().as_secs_f64(),
            st["log"],
        ));
    }
    stop_appliance(app);
    Ok(r)
}

/// Userspace baseline: no daemon; a forwarder thread in host A's namespace reads frames
/// for the VM from cli0 and sends each, with a log header prepended, out of log0.
fn userspace_run(tb: &Testbed, frames: &[Vec<u8>], also_vm: bool) -> Result<TputResult> {
    let rx = Arc::new(RawSock::open(&tb.a.ns, CLI_IF)?);
    let _ = rx.stats(); // reset the kernel's drop counter
    let rx2 = rx.clone();
    let (tx, _) = packet_sock(&tb.a.ns, LOG_IF, 0)?;
    // Optional second copy to the VM (what the XDP path's devmap broadcast also does).
    let vm_tx = if also_vm {
        Some(packet_sock(&tb.a.ns, VMH_IF, 0)?.0)
    } else {
        None
    };
    let stop = Arc::new(AtomicBool::new(false));
    let fwd_stop = stop.clone();
    let (dst, src) = (tb.b.log_mac, tb.a.log_mac);
    let fwd = std::thread::Builder::new()
        .name("us-forwarder".into())
        .spawn(move || -> (u64, u64) {
            let end = Instant::now() + Duration::from_secs(60);
            let mut buf = vec![0u8; LOG_OVERHEAD + 65_536];
            let (mut seq, mut send_fail) = (0u64, 0u64);
            let fd = rx2.as_raw_fd();
            while !fwd_stop.load(Ordering::Relaxed) && Instant::now() < end {
                if !poll_in(fd, 20) {
                    continue;
                }
                for _ in 0..4096 {
                    let Some((len, pkttype)) = recv_nb(fd, &mut buf[LOG_OVERHEAD..]) else {
                        break;
                    };
                    if pkttype == libc::PACKET_OUTGOING
                        || len < 14
                        || buf[LOG_OVERHEAD..LOG_OVERHEAD + 6] != VM_MAC
                    {
                        continue;
                    }
                    if let Some(v) = &vm_tx
                        && !send_frame(v.as_raw_fd(), &buf[LOG_OVERHEAD..LOG_OVERHEAD + len])
                    {
                        send_fail += 1;
                    }
                    seq += 1;
                    let mut ft = FtHdr::new(KIND_LOG, 0, 1, seq);
                    ft.len.set(len as u16);
                    let hdr = LogHdr {
                        eth: EthHdr {
                            dst,
                            src,
                            ethertype: ETHERTYPE_FT.into(),
                        },
                        ft,
                    };
                    buf[..LOG_OVERHEAD].copy_from_slice(hdr.as_bytes());
                    if !send_frame(tx.as_raw_fd(), &buf[..LOG_OVERHEAD + len]) {
                        send_fail += 1;
                    }
                }
            }
            (seq, send_fail)
        })?;
    let name = if also_vm {
        "userspace forwarder + copy to VM"
    } else {
        "userspace AF_PACKET forwarder"
    };
    let mut r = measure_burst(tb, frames, name)?;
    stop.store(true, Ordering::Relaxed);
    let (fwd_n, fail) = fwd
        .join()
        .map_err(|_| anyhow::anyhow!("forwarder panicked"))?;
    let (_, rx_drops) = rx.stats().unwrap_or_default();
    r.extra.push(format!(
        "forwarder: forwarded={fwd_n} send_failures={fail} cli0 socket drops (rcvbuf full)={rx_drops}"
    ));
    Ok(r)
}

fn throughput_phase(tb: &Testbed, args: &Args) -> Result<()> {
    println!(
        "\n== Phase 2: logging-channel throughput ({} rounds x {} frames of {} bytes, full speed \
         from the client ns; order alternates) ==",
        args.tput_rounds, args.burst_frames, args.frame_size
    );
    println!(
        "  counted at host B's log0 (rx_packets, /proc/net/dev in B's netns) for every path; \
         includes the primary's ~200/s heartbeats.\n  \
         XDP paths: 'backup running' = the real appliance (default 16384-slot window: \
         back-pressure and NACK repair included);\n  \
         'no backup daemon' = duplication cost alone (window > burst, so nothing is dropped \
         for lack of acks; hold_output=false).\n  \
         The XDP path also delivers every frame to the primary's VM (devmap broadcast); the \
         plain userspace forwarder only copies to log0, '+ copy to VM' also sends it to vmh."
    );
    let frames = burst(args.burst_frames, args.frame_size);
    let big_retx = (args.burst_frames as u64 + 512)
        .next_power_of_two()
        .clamp(1024, 1 << 20) as u32;
    let names = [
        "XDP, backup running (retx_slots=16384)".to_string(),
        format!("XDP, no backup daemon (retx_slots={big_retx})"),
        "userspace AF_PACKET forwarder".to_string(),
        "userspace forwarder + copy to VM".to_string(),
    ];
    let mut results: Vec<Vec<TputResult>> = vec![Vec::new(), Vec::new(), Vec::new(), Vec::new()];
    for round in 0..args.tput_rounds {
        let order: [usize; 4] = if round % 2 == 0 {
            [0, 1, 2, 3]
        } else {
            [3, 2, 1, 0]
        };
        for k in order {
            let key = ["xdp-backup", "xdp-nobackup", "userspace", "userspace-vm"][k];
            if !args.tput_paths.split(',').any(|p| p.trim() == key) {
                continue;
            }
            let r = match k {
                0 => xdp_run(tb, &frames, &base_opts(args), &names[0])?,
                1 => xdp_run(
                    tb,
                    &frames,
                    &ApplianceOptions {
                        start_backup: false,
                        retx_slots: big_retx,
                        // Nothing would ever ack the output (or the warm-up PING)
                        // without a backup.
                        hold_output: false,
                        ..base_opts(args)
                    },
                    &names[1],
                )?,
                2 => userspace_run(tb, &frames, false)?,
                _ => userspace_run(tb, &frames, true)?,
            };
            println!(
                "  round {round}: {:<44} offered {:>8.0} f/s, B log0 {:>8.0} f/s ({} frames)",
                r.name, r.offered_fps, r.b_fps, r.at_b
            );
            results[k].push(r);
        }
    }
    println!(
        "\n  {:<44} {:>6} {:>8} {:>12} {:>10} {:>10} {:>12}",
        "path (per run)", "round", "sent", "offered f/s", "at A cli0", "at B log0", "B log0 f/s"
    );
    for (k, rs) in results.iter().enumerate() {
        for (round, r) in rs.iter().enumerate() {
            println!(
                "  {:<44} {:>6} {:>8} {:>12.0} {:>10} {:>10} {:>12.0}",
                names[k], round, r.sent, r.offered_fps, r.arrived_a, r.at_b, r.b_fps
            );
        }
    }
    let mean = |rs: &[TputResult], f: fn(&TputResult) -> f64| {
        rs.iter().map(f).sum::<f64>() / rs.len().max(1) as f64
    };
    println!(
        "\n  {:<44} {:>12} {:>12} {:>14}",
        "path (mean over rounds)", "offered f/s", "B log0 f/s", "vs userspace"
    );
    let us = mean(&results[2], |r| r.b_fps);
    for (k, rs) in results.iter().enumerate() {
        if rs.is_empty() {
            continue;
        }
        let b = mean(rs, |r| r.b_fps);
        println!(
            "  {:<44} {:>12.0} {:>12.0} {:>14.2}",
            names[k],
            mean(rs, |r| r.offered_fps),
            b,
            b / us
        );
    }
    println!();
    for rs in &results {
        for (round, r) in rs.iter().enumerate() {
            println!("  {} (round {round}):", r.name);
            for e in &r.extra {
                println!("    {e}");
            }
        }
    }
    Ok(())
}
