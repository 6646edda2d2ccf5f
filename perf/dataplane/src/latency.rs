//! Phase 1: the output rule's latency against the logging link's floor.
//!
//! Rounds of three kinds, in an order that rotates from round to round, on one testbed:
//! - **gate on**: the appliance with the output rule (daemons started for the round);
//!   client UDP PING/PONG round trips, then raw userspace ping-pongs over the logging link
//!   (AF_PACKET on A, an AF_PACKET echo thread on B);
//! - **gate off**: the same with `hold_output = false`;
//! - **daemon acks**: gate on with `kernel_acks = false`: the backup's daemon sends every
//!   ack (how the appliance acked before the acks moved into XDP), for comparison;
//! - **floor**: no daemon; the probe programs measure the logging link's
//!   kernel-to-kernel round trip (see `probe.rs`).
use std::{
    os::fd::AsRawFd,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use aya::programs::XdpMode;
use ft_common::{probe::ETHERTYPE_PROBE, wire::LOG_OVERHEAD};
use ft_testbed::{Appliance, ApplianceOptions, Testbed, names::*};
use serde::{Deserialize, Serialize};

use crate::{
    Args,
    probe::{FloorRound, ProbeKit, ProbeSetup, floor_round_trips},
    stats::{Series, Summary},
    sys::{packet_sock, poll_in, recv_nb, send_frame},
};

/// Per-request timeout (a lost request counts as a timeout, not as a sample).
const REQ_TIMEOUT: Duration = Duration::from_secs(1);
/// Size of the raw link frames and probes: the log frame that carries one PING request
/// (log header + a minimum Ethernet frame).
pub const LINK_FRAME_LEN: usize = LOG_OVERHEAD + 46;
/// The goals for the output rule's added latency, as multiples of the floor.
pub const GOAL_P50: f64 = 1.2;
pub const GOAL_P99: f64 = 2.0;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RoundKind {
    GateOn,
    GateOff,
    Floor,
    DaemonAcks,
}

impl RoundKind {
    fn label(self) -> &'static str {
        match self {
            RoundKind::GateOn => "gate on",
            RoundKind::GateOff => "gate off",
            RoundKind::Floor => "floor",
            RoundKind::DaemonAcks => "daemon acks",
        }
    }
}

/// One round of one kind: its own p50/p99, to show the spread between rounds.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RoundRow {
    pub round: usize,
    pub kind: RoundKind,
    pub n: u64,
    pub timeouts: u64,
    pub p50_us: f64,
    pub p99_us: f64,
    /// Gate rounds: the raw userspace ping-pong's p50 in the same round.
    pub raw_p50_us: Option<f64>,
    pub secs: f64,
}

/// The output rule's added latency (gate on − gate off) against the floor.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Added {
    pub p50_us: f64,
    pub p99_us: f64,
    pub floor_p50_us: f64,
    pub floor_p99_us: f64,
    pub ratio_p50: f64,
    pub ratio_p99: f64,
    pub goal_p50: f64,
    pub goal_p99: f64,
    /// ratio <= goal; `None` when the added latency came out negative (gate off slower
    /// than gate on: the noise is larger than the effect, nothing to conclude).
    pub meets_p50: Option<bool>,
    pub meets_p99: Option<bool>,
    /// The same difference within each round (gate-on and gate-off rounds of one round
    /// index run back to back), to show how much of it is noise.
    pub per_round_p50_us: Vec<f64>,
    pub per_round_p99_us: Vec<f64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LatencyResults {
    pub rounds: usize,
    pub requests: usize,
    pub link_frame_len: usize,
    pub xdp_mode: String,
    pub gate_on: Summary,
    pub gate_off: Summary,
    /// Gate on with the backup's daemon sending every ack (`kernel_acks = false`).
    #[serde(default)]
    pub gate_on_daemon_acks: Option<Summary>,
    /// Its added latency (minus gate off) at p50 and p99, in µs.
    #[serde(default)]
    pub added_daemon_acks_us: Option<(f64, f64)>,
    /// Kernel-to-kernel round trip on the logging link (tc egress on A to XDP on A).
    pub floor: Summary,
    /// The same probes as their sender saw them (AF_PACKET send to receive on A).
    pub floor_user: Summary,
    /// Raw AF_PACKET ping-pong, userspace on both hosts, during the gate rounds.
    pub raw_user: Summary,
    pub added: Added,
    pub per_round: Vec<RoundRow>,
    pub floor_probes: FloorRound,
    /// The primary's `ft_output_hold_seconds` per bucket (upper bound in µs, count),
    /// summed over the gate-on rounds / gate-off rounds.
    pub hold_hist_on: Vec<(String, u64)>,
    pub hold_hist_off: Vec<(String, u64)>,
    pub held_max: u64,
    /// The buckets holding the gate-on hold time's p50 and p99 ("[lo, hi)" µs): the
    /// kernel's own view of the delay the output rule adds to a reply.
    pub hold_on_p50_bucket_us: Option<String>,
    pub hold_on_p99_bucket_us: Option<String>,
}

/// gate on − gate off of `f` for every round index that has both.
fn per_round_added(rows: &[RoundRow], f: impl Fn(&RoundRow) -> f64) -> Vec<f64> {
    let max_round = rows.iter().map(|r| r.round).max().unwrap_or(0);
    (0..=max_round)
        .filter_map(|i| {
            let get = |k| rows.iter().find(|r| r.round == i && r.kind == k).map(&f);
            Some(get(RoundKind::GateOn)? - get(RoundKind::GateOff)?)
        })
        .collect()
}

/// The bucket of a per-bucket histogram (upper bounds in µs) that holds quantile `q`.
fn hist_bucket(h: &[(String, u64)], q: f64) -> Option<String> {
    let total: u64 = h.iter().map(|(_, n)| n).sum();
    if total == 0 {
        return None;
    }
    let rank = ((q * total as f64).ceil() as u64).max(1);
    let (mut cum, mut lower) = (0u64, "0".to_string());
    for (le, n) in h {
        cum += n;
        if cum >= rank {
            return Some(format!("[{lower}, {le})"));
        }
        lower = le.clone();
    }
    None
}

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
                    out.record_ns(t0.elapsed().as_nanos() as u64);
                    break;
                }
                Ok(_) if t0.elapsed() <= REQ_TIMEOUT => {}
                Ok(_) | Err(_) => {
                    out.timeouts += 1;
                    break;
                }
            }
        }
    }
    Ok(())
}

/// Echo loop in host B's namespace: swaps the MACs of every raw link frame on log0 and
/// sends it back. Runs until `stop` or `lifetime`.
pub fn spawn_link_echo(
    tb: &Testbed,
    stop: Arc<AtomicBool>,
    lifetime: Duration,
) -> Result<JoinHandle<u64>> {
    let (fd, _) = packet_sock(&tb.b.ns, LOG_IF, ETHERTYPE_PROBE)?;
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

/// `n` raw ping-pongs from host A's log0 to host B's echo thread and back. The frames
/// carry no probe magic, so the probe programs (if any) leave them alone.
pub fn link_round_trips(tb: &Testbed, n: usize, budget: Duration, out: &mut Series) -> Result<()> {
    let (fd, _) = packet_sock(&tb.a.ns, LOG_IF, ETHERTYPE_PROBE)?;
    let fd = fd.as_raw_fd();
    let mut frame = vec![0u8; LINK_FRAME_LEN];
    frame[0..6].copy_from_slice(&tb.b.log_mac);
    frame[6..12].copy_from_slice(&tb.a.log_mac);
    frame[12..14].copy_from_slice(&ETHERTYPE_PROBE.to_be_bytes());
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
                out.record_ns(t0.elapsed().as_nanos() as u64);
                break;
            }
        }
        if !got {
            out.timeouts += 1;
        }
    }
    Ok(())
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

/// Appliance options shared by every run (defaults plus --xdp-mode).
pub fn base_opts(args: &Args) -> ApplianceOptions {
    ApplianceOptions {
        xdp_mode: if args.xdp_mode == "skb" {
            "skb"
        } else {
            "driver"
        },
        ..Default::default()
    }
}

pub fn start_appliance(tb: &Testbed, o: &ApplianceOptions) -> Result<Appliance> {
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

pub fn stop_appliance(app: Appliance) {
    for g in [&app.a, &app.b].into_iter().flatten() {
        let _ = g.kill();
    }
    drop(app);
    // Let the kernel detach the programs (link fds closed with the process).
    std::thread::sleep(Duration::from_millis(100));
}

#[derive(Default)]
struct Acc {
    on: Series,
    off: Series,
    daemon: Series,
    raw: Series,
    floor: Series,
    floor_user: Series,
    floor_probes: FloorRound,
    hist_on: Vec<(String, u64)>,
    hist_off: Vec<(String, u64)>,
    held_max: u64,
    rows: Vec<RoundRow>,
}

fn gate_round(tb: &Testbed, args: &Args, r: usize, kind: RoundKind, acc: &mut Acc) -> Result<()> {
    let budget = Duration::from_secs(12);
    let gate = kind != RoundKind::GateOff;
    let o = ApplianceOptions {
        hold_output: gate,
        kernel_acks: kind != RoundKind::DaemonAcks,
        ..base_opts(args)
    };
    let t0 = Instant::now();
    let app = start_appliance(tb, &o)?;
    let stop = Arc::new(AtomicBool::new(false));
    let echo = spawn_link_echo(tb, stop.clone(), Duration::from_secs(60))?;
    let mut s = Series::default();
    udp_round_trips(tb, args.requests, budget, &mut s)?;
    let mut raw = Series::default();
    link_round_trips(tb, args.requests, budget, &mut raw)?;
    stop.store(true, Ordering::Relaxed);
    let _ = echo.join();
    let h = parse_hold_hist(&app.metrics('a').unwrap_or_default());
    let st = app.status('a').unwrap_or_default();
    acc.held_max = acc.held_max.max(st["held_frames"].as_u64().unwrap_or(0));
    let row = RoundRow {
        round: r,
        kind,
        n: s.len(),
        timeouts: s.timeouts,
        p50_us: s.quantile_us(0.5).context("client round trips")?,
        p99_us: s.quantile_us(0.99)?,
        raw_p50_us: raw.quantile_us(0.5).ok(),
        secs: t0.elapsed().as_secs_f64(),
    };
    println!(
        "  round {r} {:<8}: udp n={} p50={:.1}us p99={:.1}us timeouts={} | raw n={} p50={} \
         timeouts={} | released={} acks_rx={} ({:.1}s)",
        kind.label(),
        row.n,
        row.p50_us,
        row.p99_us,
        row.timeouts,
        raw.len(),
        row.raw_p50_us.map_or("-".into(), |v| format!("{v:.1}us")),
        raw.timeouts,
        st["counters"]["output_released_frames_total"],
        st["counters"]["acks_received_total"],
        row.secs
    );
    stop_appliance(app);
    match kind {
        RoundKind::GateOn => {
            acc.on.merge(&s);
            add_hist(&mut acc.hist_on, h);
        }
        RoundKind::GateOff => {
            acc.off.merge(&s);
            add_hist(&mut acc.hist_off, h);
        }
        _ => acc.daemon.merge(&s),
    }
    acc.raw.merge(&raw);
    acc.rows.push(row);
    Ok(())
}

fn floor_round(tb: &Testbed, args: &Args, r: usize, acc: &mut Acc) -> Result<()> {
    let t0 = Instant::now();
    let setup = ProbeSetup {
        mode: if args.xdp_mode == "skb" {
            XdpMode::Skb
        } else {
            XdpMode::Driver
        },
        reflector: !args.self_check_no_reflector,
    };
    let kit = ProbeKit::attach(tb, setup)?;
    let mut floor = Series::default();
    let mut user = Series::default();
    let fr = floor_round_trips(
        tb,
        &kit,
        args.requests,
        LINK_FRAME_LEN,
        Duration::from_secs(12),
        &mut floor,
        &mut user,
    )?;
    drop(kit);
    let row = RoundRow {
        round: r,
        kind: RoundKind::Floor,
        n: floor.len(),
        timeouts: floor.timeouts,
        p50_us: floor.quantile_us(0.5).context("link floor")?,
        p99_us: floor.quantile_us(0.99)?,
        raw_p50_us: None,
        secs: t0.elapsed().as_secs_f64(),
    };
    println!(
        "  round {r} {:<8}: kernel n={} p50={:.1}us p99={:.1}us lost={} | sender saw p50={:.1}us \
         | kernel: stamped={} reflected={} measured={} ({:.1}s)",
        "floor",
        row.n,
        row.p50_us,
        row.p99_us,
        row.timeouts,
        user.quantile_us(0.5)?,
        fr.kernel.stamped,
        fr.kernel.reflected,
        fr.kernel.measured,
        row.secs
    );
    acc.floor.merge(&floor);
    acc.floor_user.merge(&user);
    acc.floor_probes.add(&fr);
    acc.rows.push(row);
    // Let the detached hooks settle before the next daemon attaches.
    std::thread::sleep(Duration::from_millis(50));
    Ok(())
}

pub fn latency_phase(tb: &Testbed, args: &Args) -> Result<LatencyResults> {
    println!(
        "\n== Phase 1: output-rule latency ({} rounds x {} requests per kind: gate on, gate \
         off, link floor; order rotates) ==",
        args.rounds, args.requests
    );
    let mut acc = Acc::default();
    let kinds = [
        RoundKind::GateOn,
        RoundKind::GateOff,
        RoundKind::Floor,
        RoundKind::DaemonAcks,
    ];
    for r in 0..args.rounds {
        for k in 0..kinds.len() {
            match kinds[(k + r) % kinds.len()] {
                RoundKind::Floor => floor_round(tb, args, r, &mut acc)?,
                kind => gate_round(tb, args, r, kind, &mut acc)?,
            }
        }
    }
    let gate_on = acc.on.summary("client UDP, gate on (output rule)")?;
    let gate_off = acc.off.summary("client UDP, gate off")?;
    let daemon = acc
        .daemon
        .summary("client UDP, gate on, acks from the backup's daemon")?;
    let floor = acc
        .floor
        .summary("log link, kernel to kernel (tc egress -> XDP)")?;
    let floor_user = acc
        .floor_user
        .summary("log link, XDP reflector, seen by the AF_PACKET sender")?;
    let raw_user = acc
        .raw
        .summary("log link, AF_PACKET ping-pong (userspace both ends)")?;
    let added = {
        let p50_us = gate_on.p50_us - gate_off.p50_us;
        let p99_us = gate_on.p99_us - gate_off.p99_us;
        let (ratio_p50, ratio_p99) = (p50_us / floor.p50_us, p99_us / floor.p99_us);
        Added {
            p50_us,
            p99_us,
            floor_p50_us: floor.p50_us,
            floor_p99_us: floor.p99_us,
            ratio_p50,
            ratio_p99,
            goal_p50: GOAL_P50,
            goal_p99: GOAL_P99,
            meets_p50: (p50_us >= 0.0).then_some(ratio_p50 <= GOAL_P50),
            meets_p99: (p99_us >= 0.0).then_some(ratio_p99 <= GOAL_P99),
            per_round_p50_us: per_round_added(&acc.rows, |r| r.p50_us),
            per_round_p99_us: per_round_added(&acc.rows, |r| r.p99_us),
        }
    };
    Ok(LatencyResults {
        rounds: args.rounds,
        requests: args.requests,
        link_frame_len: LINK_FRAME_LEN,
        xdp_mode: args.xdp_mode.clone(),
        added_daemon_acks_us: Some((
            daemon.p50_us - gate_off.p50_us,
            daemon.p99_us - gate_off.p99_us,
        )),
        gate_on_daemon_acks: Some(daemon),
        gate_on,
        gate_off,
        floor,
        floor_user,
        raw_user,
        added,
        per_round: acc.rows,
        floor_probes: acc.floor_probes,
        hold_on_p50_bucket_us: hist_bucket(&acc.hist_on, 0.5),
        hold_on_p99_bucket_us: hist_bucket(&acc.hist_on, 0.99),
        hold_hist_on: acc.hist_on,
        hold_hist_off: acc.hist_off,
        held_max: acc.held_max,
    })
}
