//! The duplication path with live frames: `ft_client_rx` run by `BPF_PROG_RUN` with
//! `BPF_F_TEST_XDP_LIVE_FRAMES`, so its broadcast redirect really copies each frame into
//! the two devmap targets (veths in this process's private namespace) and transmits it.
//!
//! A veth transmits XDP frames only if its peer runs an XDP program (otherwise they
//! vanish, PLATFORM.md): the peers run `ft_client_rx` of a second instance of the same
//! object configured as a backup, which drops both kinds of frame and counts them — so
//! the counters say how many copies arrived on each side.
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use aya::programs::{Xdp, XdpMode};
use ft_common::maps::*;
use ftd::dataplane::testrun::{TestNode, TestPlane};

use crate::{
    env,
    report::{LiveCell, Stats},
};

/// The interfaces of the live-frame runs (and the release sink).
pub struct Wires {
    pub client: u32,
    pub vm: u32,
    pub log: u32,
    pub sink: u32,
}

pub const CLIENT: &str = "ftk-cli";
pub const VM: &str = "ftk-vm";
pub const VM_PEER: &str = "ftk-vmp";
pub const LOG: &str = "ftk-log";
pub const LOG_PEER: &str = "ftk-logp";
pub const SINK: &str = "ftk-sink";

/// Creates the namespace's interfaces: the client NIC frames arrive on, the VM side and
/// the logging NIC (veth pairs, the logging one with ftd's minimum log MTU), and the
/// release sink (an empty bridge: its xmit frees every frame).
pub fn wires() -> Result<Wires> {
    env::veth(CLIENT, "ftk-clip", 1500)?;
    // The VM side needs room for the log header too: a devmap broadcast checks each
    // target's MTU against the frame *before* its devmap program (ft_strip) runs, so with
    // MTU 1500 a client frame over 1464 bytes never reaches the VM side.
    env::veth(VM, VM_PEER, 2000)?;
    env::veth(LOG, LOG_PEER, 2000)?;
    env::ip(&["link", "add", SINK, "type", "bridge"])?;
    env::ip(&["link", "set", SINK, "up"])?;
    Ok(Wires {
        client: env::ifindex(CLIENT)?,
        vm: env::ifindex(VM)?,
        log: env::ifindex(LOG)?,
        sink: env::ifindex(SINK)?,
    })
}

/// The receiving ends: `ft_client_rx` of a backup-configured instance on both peers.
pub fn receivers(object: &[u8]) -> Result<TestPlane> {
    let mut d = TestPlane::load(object, 1024, 256).context("loading the receivers' instance")?;
    d.configure(&TestNode::new(ROLE_BACKUP))?;
    let p: &mut Xdp = d
        .ebpf_mut()
        .program_mut("ft_client_rx")
        .context("ft_client_rx")?
        .try_into()?;
    for dev in [VM_PEER, LOG_PEER] {
        p.attach(dev, XdpMode::Driver)
            .with_context(|| format!("attaching the receivers' XDP to {dev} (native)"))?;
    }
    Ok(d)
}

pub struct LiveOpts {
    pub samples: usize,
    pub repeat: u32,
    pub batch: u32,
    pub sizes: Vec<u32>,
}

/// Live-frame runs of `ft_client_rx` on `plane` (a primary whose FANOUT holds the VM
/// side and the logging NIC), frames arriving on `w.client`.
pub fn run(
    plane: &mut TestPlane,
    recv: &TestPlane,
    node: &TestNode,
    w: &Wires,
    o: &LiveOpts,
    cpu: usize,
) -> Result<Vec<LiveCell>> {
    let mut n = node.clone();
    n.window = Some(u64::MAX);
    plane.configure(&n)?;
    plane.set_fanout(w.vm, w.log, true)?;
    let mut cells = Vec::new();
    for &size in &o.sizes {
        let f = n.client_frame(size as usize);
        // Warm-up: page pool, veth rings, caches.
        plane.run_live("ft_client_rx", &f, o.repeat.min(10_000), w.client, o.batch)?;
        std::thread::sleep(Duration::from_millis(20));
        let (mut mpps, mut wall, mut nsf, mut cpu_mpps) = (vec![], vec![], vec![], vec![]);
        let mut ksoft = 0u64;
        let (mut got_vm, mut got_log, mut sent) = (0u64, 0u64, 0u64);
        for _ in 0..o.samples {
            let p0 = plane.counters()?;
            let r0 = recv.counters()?;
            let k = env::ksoftirqd_ns(cpu);
            let (t, c) = (Instant::now(), env::thread_cpu_ns());
            let ns = plane.run_live("ft_client_rx", &f, o.repeat, w.client, o.batch)?;
            let (el, used) = (t.elapsed(), env::thread_cpu_ns() - c);
            ksoft += env::ksoftirqd_ns(cpu).zip(k).map_or(0, |(b, a)| b - a);
            // Let the receivers' NAPI finish what the last batch scheduled.
            std::thread::sleep(Duration::from_millis(20));
            let p1 = plane.counters()?;
            let r1 = recv.counters()?;
            let d = |a: &[u64], b: &[u64], i: u32| b[i as usize] - a[i as usize];
            let dup = d(&p0, &p1, C_DUP_FRAMES);
            ensure!(
                dup == o.repeat as u64,
                "live frames, {size} B: ft_client_rx duplicated {dup} of {} frames (drops: window {}, \
                 oversize {}, retx {}): not the path measured",
                o.repeat,
                d(&p0, &p1, C_DROP_WINDOW_FULL),
                d(&p0, &p1, C_DROP_OVERSIZE),
                d(&p0, &p1, C_DROP_RETX_ERR)
            );
            ensure!(ns > 0, "live frames: the kernel reported a duration of 0");
            sent += dup;
            got_vm += d(&r0, &r1, C_DROP_BACKUP_CLIENT_IN);
            got_log += d(&r0, &r1, C_DROP_CLIENT_FT);
            nsf.push(ns as f64);
            mpps.push(1e3 / ns as f64);
            wall.push(o.repeat as f64 / el.as_secs_f64() / 1e6);
            cpu_mpps.push(o.repeat as f64 * 1e3 / used.max(1) as f64);
        }
        ensure!(
            got_vm > 0 && got_log > 0,
            "live frames, {size} B: the VM side received {got_vm} and the logging side \
             {got_log} of {sent} copies: frames vanished (XDP on the peer veths? MTU?)"
        );
        cells.push(LiveCell {
            size,
            mpps: Stats::of(mpps),
            wall_mpps: Stats::of(wall),
            cpu_mpps: Stats::of(cpu_mpps),
            ksoftirqd_ms: ksoft as f64 / 1e6,
            ns_per_frame: Stats::of(nsf),
            delivered_vm: got_vm as f64 / sent as f64,
            delivered_log: got_log as f64 / sent as f64,
        });
    }
    Ok(cells)
}
