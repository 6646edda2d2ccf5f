//! Which host put the VM's traffic on the client network, and when: a capture on each
//! host's port of the client bridge (frames arriving from that host, kernel-stamped),
//! merged by time. Frames whose source MAC is the VM's are the VM's output, whoever
//! sends them; their port says which host did.
use anyhow::{Result, bail};

use crate::{
    Capture, Testbed,
    names::{BR_PORT_A, BR_PORT_B, VM_MAC},
    packet::{TcpSeg, parse_tcp},
};

/// Captures running on both hosts' bridge ports.
pub struct VmEmitters {
    a: Capture,
    b: Capture,
}

/// One frame of the VM's, as the client bridge received it.
#[derive(Clone, Debug)]
pub struct Emission {
    /// Kernel receive stamp, CLOCK_MONOTONIC ns (comparable across both captures).
    pub at_ns: u64,
    /// 'a' or 'b': the host whose port it came in on.
    pub host: char,
    pub frame: Vec<u8>,
}

/// The VM's output over a stretch of time, in receive order.
pub struct Emissions {
    pub frames: Vec<Emission>,
}

impl VmEmitters {
    /// Starts both captures; frames sent after this returns are seen.
    pub fn start(tb: &Testbed) -> Result<VmEmitters> {
        Ok(VmEmitters {
            a: Capture::start(&tb.client_ns, BR_PORT_A)?,
            b: Capture::start(&tb.client_ns, BR_PORT_B)?,
        })
    }

    /// Stops both captures. An error if either failed or the kernel dropped frames (an
    /// incomplete capture cannot prove that a host stayed silent).
    pub fn stop(self) -> Result<Emissions> {
        let mut frames = Vec::new();
        for (host, cap) in [('a', self.a), ('b', self.b)] {
            let r = cap.stop_with_stats()?;
            if r.kernel_drops > 0 {
                bail!(
                    "the capture on host {host}'s bridge port dropped {} frames",
                    r.kernel_drops
                );
            }
            frames.extend(
                r.frames
                    .into_iter()
                    .filter(|(_, f)| f.len() >= 14 && f[6..12] == VM_MAC)
                    .map(|(at_ns, frame)| Emission { at_ns, host, frame }),
            );
        }
        frames.sort_by_key(|e| e.at_ns);
        Ok(Emissions { frames })
    }
}

impl Emissions {
    /// Frames that came through `host`'s port.
    pub fn count(&self, host: char) -> usize {
        self.frames.iter().filter(|e| e.host == host).count()
    }

    /// The emitting hosts in time order, one entry per uninterrupted run: `['a', 'b']`
    /// means host A alone, then host B alone. Two hosts emitting at the same time show
    /// up as alternation (`['a', 'b', 'a', ...]`).
    pub fn runs(&self) -> Vec<char> {
        let mut r: Vec<char> = Vec::new();
        for e in &self.frames {
            if r.last() != Some(&e.host) {
                r.push(e.host);
            }
        }
        r
    }

    /// Monotonic time of the first frame through `host`'s port.
    pub fn first_from(&self, host: char) -> Option<u64> {
        self.frames.iter().find(|e| e.host == host).map(|e| e.at_ns)
    }

    /// TCP segments of the VM carrying bytes the client had already been sent on that
    /// connection (every payload byte at or below the highest sequence seen before), with
    /// the host that sent them again. Sequence numbers are compared relative to the
    /// connection's first segment seen, so wrap-around within 2 GiB is handled.
    pub fn tcp_duplicates(&self) -> Vec<(char, TcpSeg)> {
        let mut high: std::collections::HashMap<(u32, u16), (u32, u32)> = Default::default();
        let mut dups = Vec::new();
        for e in &self.frames {
            let Some(s) = parse_tcp(&e.frame) else {
                continue;
            };
            if s.payload_len == 0 {
                continue;
            }
            let key = (u32::from(s.dst_ip), s.dport);
            let (base, end) = *high.entry(key).or_insert((s.seq, 0));
            let start = s.seq.wrapping_sub(base);
            let stop = start.wrapping_add(s.payload_len);
            if stop <= end {
                dups.push((e.host, s));
            } else {
                high.insert(key, (base, stop));
            }
        }
        dups
    }
}
