//! Phase 2: logging-channel throughput. A full-speed burst of frames for the VM from the
//! client namespace; log frames arriving at host B's log0 are counted, with the XDP
//! duplication path (with and without a backup daemon) and with a userspace AF_PACKET
//! forwarder on host A (with and without a copy to the VM).
use std::{
    os::fd::AsRawFd,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::Result;
use ft_common::{
    siphash::SipKey,
    wire::{EthHdr, FtHdr, KIND_LOG, LOG_OVERHEAD, LogHdr, MacKey, payload_mac},
};
use ft_testbed::{Appliance, ApplianceOptions, RawSock, Testbed, blast, names::*, udp_frame};
use serde::{Deserialize, Serialize};
use zerocopy::IntoBytes;

use crate::{
    Args,
    latency::{base_opts, link_round_trips, spawn_link_echo, start_appliance, stop_appliance},
    stats::Series,
    sys::*,
};

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

/// One burst over one path.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TputResult {
    pub name: String,
    pub sent: usize,
    /// Frames per second the client namespace offered.
    pub offered_fps: f64,
    /// Frames that arrived at host A's client NIC.
    pub arrived_a: u64,
    /// Log frames that arrived at host B's log0 (heartbeats included).
    pub at_b: u64,
    pub b_fps: f64,
    /// Diagnostics (drops, counters, repair trace).
    pub extra: Vec<String>,
}

/// Every burst of one path and their means.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PathResult {
    /// `--tput-paths` key.
    pub key: String,
    pub name: String,
    pub runs: Vec<TputResult>,
    pub mean_offered_fps: f64,
    pub mean_b_fps: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ThroughputResults {
    pub rounds: usize,
    pub burst_frames: usize,
    pub frame_size: usize,
    pub paths: Vec<PathResult>,
}

const PATH_KEYS: [&str; 4] = ["xdp-backup", "xdp-nobackup", "userspace", "userspace-vm"];

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
                    ping.len()
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
/// for the VM from cli0 and sends each, with a log header prepended, out of log0. The
/// header carries the frame's MAC, as the XDP path's does (wire v4), so both pay for it.
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
    let mac_key = MacKey::derive(&SipKey::from_bytes(&[0x5a; 16]));
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
                    ft.aux.set(payload_mac(
                        &mac_key,
                        &ft,
                        &buf[LOG_OVERHEAD..LOG_OVERHEAD + len],
                    ));
                    let hdr = LogHdr {
                        eth: EthHdr::ft(dst, src),
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

pub fn throughput_phase(tb: &Testbed, args: &Args) -> Result<ThroughputResults> {
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
            let key = PATH_KEYS[k];
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
    let mean = |rs: &[TputResult], f: fn(&TputResult) -> f64| {
        rs.iter().map(f).sum::<f64>() / rs.len().max(1) as f64
    };
    let paths: Vec<PathResult> = results
        .into_iter()
        .enumerate()
        .filter(|(_, rs)| !rs.is_empty())
        .map(|(k, runs)| PathResult {
            key: PATH_KEYS[k].into(),
            name: names[k].clone(),
            mean_offered_fps: mean(&runs, |r| r.offered_fps),
            mean_b_fps: mean(&runs, |r| r.b_fps),
            runs,
        })
        .collect();
    print_throughput(&paths);
    Ok(ThroughputResults {
        rounds: args.tput_rounds,
        burst_frames: args.burst_frames,
        frame_size: args.frame_size,
        paths,
    })
}

fn print_throughput(paths: &[PathResult]) {
    println!(
        "\n  {:<44} {:>6} {:>8} {:>12} {:>10} {:>10} {:>12}",
        "path (per run)", "round", "sent", "offered f/s", "at A cli0", "at B log0", "B log0 f/s"
    );
    for p in paths {
        for (round, r) in p.runs.iter().enumerate() {
            println!(
                "  {:<44} {:>6} {:>8} {:>12.0} {:>10} {:>10} {:>12.0}",
                p.name, round, r.sent, r.offered_fps, r.arrived_a, r.at_b, r.b_fps
            );
        }
    }
    println!(
        "\n  {:<44} {:>12} {:>12} {:>14}",
        "path (mean over rounds)", "offered f/s", "B log0 f/s", "vs userspace"
    );
    let us = paths
        .iter()
        .find(|p| p.key == "userspace")
        .map(|p| p.mean_b_fps);
    for p in paths {
        println!(
            "  {:<44} {:>12.0} {:>12.0} {:>14}",
            p.name,
            p.mean_offered_fps,
            p.mean_b_fps,
            us.map_or("-".into(), |u| format!("{:.2}", p.mean_b_fps / u))
        );
    }
    println!();
    for p in paths {
        for (round, r) in p.runs.iter().enumerate() {
            println!("  {} (round {round}):", r.name);
            for e in &r.extra {
                println!("    {e}");
            }
        }
    }
}
