//! The logging link's kernel-to-kernel floor: probe programs (ebpf/programs/src/probe.rs)
//! attached while no daemon runs, and the probe sender in host A's namespace.
//!
//! Why between the appliance rounds and not chained behind ftd: both XDP programs need
//! the logging NICs' XDP hook, which `ft_log_rx` holds while ftd runs. Chaining (a
//! dispatcher or tail calls into `ft_log_rx`) would change the program under test; the
//! benchmark already restarts the daemons for every round, so a third kind of round
//! (no daemon, probes attached) measures the floor on the same testbed, interleaved with
//! the gate-on and gate-off rounds.
use std::{
    os::fd::AsRawFd,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::PerCpuArray,
    programs::{SchedClassifier, TcAttachType, Xdp, XdpMode},
};
use ft_common::probe::*;
use ft_testbed::{Testbed, names::*, try_run_in_ns};
use serde::{Deserialize, Serialize};
use zerocopy::{FromBytes, IntoBytes};

use crate::{
    stats::Series,
    sys::{packet_sock, poll_in, recv_nb, send_frame},
};

/// How long one probe may take before it counts as lost.
const PROBE_TIMEOUT: Duration = Duration::from_millis(200);

/// Which probe programs to attach. `reflector: false` is the benchmark's self-check:
/// without B's reflector no probe can come back, and the run must fail.
#[derive(Clone, Copy, Debug)]
pub struct ProbeSetup {
    pub mode: XdpMode,
    pub reflector: bool,
}

/// The probe programs attached on both hosts; dropping it detaches them (the links live
/// in the `Ebpf` object).
pub struct ProbeKit {
    ebpf: Ebpf,
}

/// The kernel's per-event counts (`ft_common::probe::PS_*`), summed over CPUs.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct ProbeStats {
    pub stamped: u64,
    pub reflected: u64,
    pub measured: u64,
    pub unstamped: u64,
}

impl ProbeStats {
    fn add(&mut self, o: &ProbeStats) {
        self.stamped += o.stamped;
        self.reflected += o.reflected;
        self.measured += o.measured;
        self.unstamped += o.unstamped;
    }
}

impl ProbeKit {
    /// Loads ftd's eBPF object (maps at their smallest: only the probe programs run) and
    /// attaches the stamp (tc egress) and receive (XDP) programs to host A's logging NIC
    /// and the reflector (XDP) to host B's. Fails if a hook is taken (a daemon still
    /// running).
    pub fn attach(tb: &Testbed, setup: ProbeSetup) -> Result<ProbeKit> {
        let mut ebpf = EbpfLoader::new()
            .map_max_entries("RETX", 1024)
            .map_max_entries("HOLD", 64)
            .map_max_entries("LOG_RING", 4096)
            .load(ftd::dataplane::EBPF_OBJECT)
            .context("loading ftd's eBPF object for the probes")?;
        for name in ["ft_probe_rx", "ft_probe_reflect"] {
            xdp(&mut ebpf, name)?
                .load()
                .with_context(|| format!("loading {name}"))?;
        }
        tc(&mut ebpf, "ft_probe_stamp")?
            .load()
            .context("loading ft_probe_stamp")?;

        // bpf_link_create resolves the ifindex in the caller's namespace: attach from
        // a thread inside each host's namespace.
        let (a, b) = (tb.a.ns.as_str(), tb.b.ns.as_str());
        // The daemons of the previous round may still be detaching (their link fds close
        // when the process is reaped): retry briefly.
        retry(|| attach_xdp(&mut ebpf, "ft_probe_rx", a, setup.mode))?;
        if setup.reflector {
            retry(|| attach_xdp(&mut ebpf, "ft_probe_reflect", b, setup.mode))?;
        }
        let prog = tc(&mut ebpf, "ft_probe_stamp")?;
        try_run_in_ns(&tb.a.ns, || prog.attach(LOG_IF, TcAttachType::Egress))?
            .context("attaching ft_probe_stamp to A's log0 (tc egress)")?;
        Ok(ProbeKit { ebpf })
    }

    pub fn stats(&self) -> Result<ProbeStats> {
        let map: PerCpuArray<_, u64> = PerCpuArray::try_from(
            self.ebpf
                .map("PROBE_STATS")
                .context("PROBE_STATS not in the object")?,
        )?;
        let get = |i: u32| -> Result<u64> { Ok(map.get(&i, 0)?.iter().sum()) };
        Ok(ProbeStats {
            stamped: get(PS_STAMPED)?,
            reflected: get(PS_REFLECTED)?,
            measured: get(PS_MEASURED)?,
            unstamped: get(PS_UNSTAMPED)?,
        })
    }
}

/// `ip -d link show log0` in `ns`, for an attach error.
fn link_state(ns: &str) -> String {
    let out = ft_testbed::ns_exec(ns, "ip", &["-d", "link", "show", LOG_IF])
        .unwrap_or_else(|e| format!("(ip link failed: {e})"));
    format!("{LOG_IF} in {ns}: {}", out.trim())
}

/// Attaches XDP program `name` to log0 in namespace `ns`.
fn attach_xdp(ebpf: &mut Ebpf, name: &str, ns: &str, mode: XdpMode) -> Result<()> {
    let prog = xdp(ebpf, name)?;
    try_run_in_ns(ns, || prog.attach(LOG_IF, mode))?
        .with_context(|| format!("attaching {name} to log0 in {ns}"))
        .with_context(|| link_state(ns))?;
    Ok(())
}

fn retry<T>(mut f: impl FnMut() -> Result<T>) -> Result<T> {
    let mut last = None;
    for _ in 0..20 {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) => last = Some(e),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(last.expect("at least one attempt"))
}

fn xdp<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut Xdp> {
    Ok(ebpf
        .program_mut(name)
        .with_context(|| format!("{name} not in ftd's eBPF object"))?
        .try_into()?)
}

fn tc<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut SchedClassifier> {
    Ok(ebpf
        .program_mut(name)
        .with_context(|| format!("{name} not in ftd's eBPF object"))?
        .try_into()?)
}

/// One floor round's outcome, besides the samples.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct FloorRound {
    pub sent: u64,
    pub measured: u64,
    /// Came back without a kernel measurement (stamp program not in the path).
    pub unmeasured: u64,
    pub timeouts: u64,
    pub kernel: ProbeStats,
}

impl FloorRound {
    pub fn add(&mut self, o: &FloorRound) {
        self.sent += o.sent;
        self.measured += o.measured;
        self.unmeasured += o.unmeasured;
        self.timeouts += o.timeouts;
        self.kernel.add(&o.kernel);
    }
}

/// Sends `n` probes from host A's logging NIC, one outstanding at a time, each
/// `frame_len` bytes. Records the kernel-to-kernel round trip of each into `floor` and
/// the round trip its sender saw (send() to recv(), through the same reflector) into
/// `user`. An error if the probes do not come back measured: a broken floor never turns
/// into a zero or an empty percentile.
pub fn floor_round_trips(
    tb: &Testbed,
    kit: &ProbeKit,
    n: usize,
    frame_len: usize,
    budget: Duration,
    floor: &mut Series,
    user: &mut Series,
) -> Result<FloorRound> {
    let (fd, _) = packet_sock(&tb.a.ns, LOG_IF, ETHERTYPE_PROBE)?;
    let fd = fd.as_raw_fd();
    let mut frame = vec![0u8; frame_len.max(PROBE_LEN)];
    let mut hdr = ProbeFrame {
        dst: tb.b.log_mac,
        src: tb.a.log_mac,
        ethertype: ETHERTYPE_PROBE.into(),
        magic: PROBE_MAGIC.into(),
        ..Default::default()
    };
    let mut buf = vec![0u8; 4096];
    let mut r = FloorRound::default();
    let before = kit.stats()?;
    let end = Instant::now() + budget;
    for i in 0..n as u64 {
        if Instant::now() > end {
            break;
        }
        // Nothing came back at all: the path is broken, do not wait out the budget.
        if r.sent >= 20 && r.measured + r.unmeasured == 0 {
            break;
        }
        hdr.seq = i.into();
        frame[..PROBE_LEN].copy_from_slice(hdr.as_bytes());
        r.sent += 1;
        let t0 = Instant::now();
        if !send_frame(fd, &frame) {
            r.timeouts += 1;
            continue;
        }
        let mut got = None;
        while got.is_none() && t0.elapsed() < PROBE_TIMEOUT {
            let left = PROBE_TIMEOUT
                .saturating_sub(t0.elapsed())
                .as_millis()
                .max(1) as i32;
            if !poll_in(fd, left) {
                continue;
            }
            while let Some((len, pkttype)) = recv_nb(fd, &mut buf) {
                if pkttype == libc::PACKET_OUTGOING {
                    continue;
                }
                let Ok((f, _)) = ProbeFrame::read_from_prefix(&buf[..len]) else {
                    continue;
                };
                if f.seq.get() == i && f.flags.get() & PROBE_REFLECTED != 0 {
                    got = Some((f, t0.elapsed()));
                }
            }
        }
        match got {
            Some((f, dt)) if f.flags.get() & PROBE_MEASURED != 0 => {
                r.measured += 1;
                floor.record_ns(f.rtt_ns.get());
                user.record_ns(dt.as_nanos() as u64);
            }
            Some(_) => r.unmeasured += 1,
            None => r.timeouts += 1,
        }
    }
    floor.timeouts += r.timeouts;
    user.timeouts += r.timeouts;
    let after = kit.stats()?;
    r.kernel = ProbeStats {
        stamped: after.stamped - before.stamped,
        reflected: after.reflected - before.reflected,
        measured: after.measured - before.measured,
        unstamped: after.unstamped - before.unstamped,
    };
    // A probe lost now and then is the link's business (counted); most of them lost, or
    // any that came back unmeasured, means the floor is not being measured.
    if r.measured == 0 || r.measured * 10 < r.sent * 9 || r.unmeasured > 0 {
        bail!(
            "link floor not measured: {} probes sent, {} measured, {} came back unmeasured, \
             {} lost; kernel: stamped (A tc egress) {}, reflected (B XDP) {}, measured \
             (A XDP) {}, reflected but unstamped {}. Is the reflector attached on B, and \
             the wire passing XDP_TX frames?",
            r.sent,
            r.measured,
            r.unmeasured,
            r.timeouts,
            r.kernel.stamped,
            r.kernel.reflected,
            r.kernel.measured,
            r.kernel.unstamped
        );
    }
    Ok(r)
}
