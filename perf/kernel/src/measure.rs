//! Per-frame cost of each data-plane program under `BPF_PROG_RUN` (no live frames).
//!
//! Every sample checks the counters the programs keep, so a run that took another path
//! than the one named (a wrong configuration, a frame the program drops) is an error, not
//! a cheap-looking number. The backup's log receive is checked only loosely (nothing
//! dropped and counted, never `XDP_ABORTED`): its action is reported, whatever it is.
use std::collections::BTreeMap;

use anyhow::{Context, Result, bail, ensure};
use ft_common::maps::*;
use ftd::dataplane::testrun::{self, TestNode, TestPlane};

use crate::report::{Cell, Method, Row, Stats};

#[derive(Clone, Debug)]
pub struct Opts {
    pub samples: usize,
    pub repeat: u32,
    pub calls: u32,
    pub release_n: u32,
    pub sizes: Vec<u32>,
}

/// ftd's default `channel.kernel_ack_interval_us`, in ns.
const KACK_INTERVAL_DEFAULT_NS: u64 = 200_000;

pub struct Bench<'a> {
    pub plane: &'a mut TestPlane,
    /// The primary as configured for these runs (interfaces set by the caller).
    pub primary: TestNode,
    pub opts: Opts,
    pub overhead_ns: f64,
}

/// Counter deltas between two snapshots.
fn delta(before: &[u64], after: &[u64]) -> Vec<u64> {
    after
        .iter()
        .zip(before)
        .map(|(a, b)| a.wrapping_sub(*b))
        .collect()
}

fn counter_name(i: u32) -> String {
    COUNTER_INFO
        .iter()
        .find(|(c, _, _)| *c == i)
        .map_or(format!("counter {i}"), |(_, m, l)| {
            if l.is_empty() {
                m.to_string()
            } else {
                format!("{m}{{reason=\"{l}\"}}")
            }
        })
}

/// No `ft_drops_total` counter moved unless listed in `expect`, and every counter in
/// `expect` moved by exactly its amount.
fn check(what: &str, d: &[u64], expect: &[(u32, u64)]) -> Result<()> {
    let listed = |i: &u32| expect.iter().any(|(c, _)| c == i);
    for (i, metric, _) in COUNTER_INFO {
        let got = d[*i as usize];
        if *metric == "ft_drops_total" && got != 0 && !listed(i) {
            bail!(
                "{what}: {got} frames dropped as {}: the run did not take the path measured \
                 (wrong test configuration or frame?)",
                counter_name(*i)
            );
        }
    }
    for (i, n) in expect {
        let got = d[*i as usize];
        if got != *n {
            bail!(
                "{what}: {} moved by {got}, expected {n}: the run did not take the path measured",
                counter_name(*i)
            );
        }
    }
    Ok(())
}

/// "TX 100%" or "DROP 97% / TX 3%".
fn actions(xdp: bool, tally: &BTreeMap<u32, u64>) -> String {
    let total: u64 = tally.values().sum();
    let mut v: Vec<_> = tally.iter().collect();
    v.sort_by(|a, b| b.1.cmp(a.1));
    v.iter()
        .map(|(a, n)| {
            format!(
                "{} {:.0}%",
                testrun::action_name(xdp, **a),
                **n as f64 * 100.0 / total.max(1) as f64
            )
        })
        .collect::<Vec<_>>()
        .join(" / ")
}

impl Bench<'_> {
    fn counters(&self) -> Result<Vec<u64>> {
        Ok(self.plane.counters()?)
    }

    fn configure(&mut self, n: &TestNode) -> Result<()> {
        self.plane.configure(n).context("configuring the node")
    }

    /// Runs `prog` once per frame that `frame(i)` builds, `calls` times; the mean of the
    /// kernel's durations less the timer overhead, and the actions' tally.
    fn per_call(
        &mut self,
        prog: &str,
        calls: u32,
        mut frame: impl FnMut(&mut TestPlane, u32) -> Result<Vec<u8>>,
        tally: &mut BTreeMap<u32, u64>,
    ) -> Result<f64> {
        let mut sum = 0u64;
        for i in 0..calls {
            let f = frame(self.plane, i)?;
            let r = self.plane.run(prog, &f, 1)?;
            ensure!(
                r.action != testrun::XDP_ABORTED || !self.plane.is_xdp(prog)?,
                "{prog} returned XDP_ABORTED"
            );
            *tally.entry(r.action).or_default() += 1;
            sum += r.duration_ns;
        }
        Ok(sum as f64 / calls as f64 - self.overhead_ns)
    }

    /// The timer overhead of a `repeat = 1` run: `ft_pass` per call less `ft_pass` with
    /// `repeat`. Sets and returns it.
    pub fn calibrate(&mut self) -> Result<f64> {
        self.plane.load_program("ft_pass")?;
        let f = self.primary.client_frame(64);
        let mut v = Vec::new();
        for _ in 0..self.opts.samples {
            let mut tally = BTreeMap::new();
            self.overhead_ns = 0.0;
            let one =
                self.per_call("ft_pass", self.opts.calls, |_, _| Ok(f.clone()), &mut tally)?;
            let many = self.plane.run("ft_pass", &f, self.opts.repeat)?.duration_ns as f64;
            v.push(one - many);
        }
        self.overhead_ns = Stats::of(v).median.max(0.0);
        Ok(self.overhead_ns)
    }

    /// `ft_client_rx` on the primary: sequence number, RETX copy, log header, broadcast.
    pub fn duplication(&mut self) -> Result<Row> {
        let mut n = self.primary.clone();
        n.window = Some(u64::MAX);
        self.configure(&n)?;
        let mut cells = Vec::new();
        for &size in &self.opts.sizes.clone() {
            let f = n.client_frame(size as usize);
            let mut tally = BTreeMap::new();
            let mut v = Vec::new();
            for _ in 0..self.opts.samples {
                let before = self.counters()?;
                let calls = self.opts.calls;
                v.push(self.per_call("ft_client_rx", calls, |_, _| Ok(f.clone()), &mut tally)?);
                let d = delta(&before, &self.counters()?);
                let c = calls as u64;
                check(
                    "ft_client_rx (primary)",
                    &d,
                    &[(C_CLIENT_RX_VM, c), (C_DUP_FRAMES, c)],
                )?;
            }
            ensure!(
                tally.keys().eq([testrun::XDP_REDIRECT].iter()),
                "ft_client_rx (primary) returned {tally:?}, not only XDP_REDIRECT"
            );
            cells.push(Cell {
                size,
                frame_len: f.len() as u32,
                stats: Stats::of(v),
                actions: actions(true, &tally),
            });
        }
        Ok(Row {
            id: "duplication".into(),
            program: "ft_client_rx".into(),
            path: "primary, client frame for the VM".into(),
            method: Method::PerCall,
            includes: "the role/VM checks, the window check, the sequence number (atomic add), \
                       the copy into RETX, the 54-byte log header (bpf_xdp_adjust_head) and \
                       bpf_redirect_map(FANOUT, BPF_F_BROADCAST)"
                .into(),
            excludes: "the redirect itself: a test run without live frames returns \
                       XDP_REDIRECT and transmits nothing (no devmap copies, no ft_strip, no \
                       veth/NIC transmit; see the live-frame table)"
                .into(),
            cells,
        })
    }

    /// `ft_log_rx` on the backup with LOG or VMLOG frames in sequence, whatever it does
    /// with them (today: copy into LOG_RING, kernel ack by XDP_TX or deferred).
    pub fn backup_log_rx(&mut self, kind: u8, interval_ns: u64) -> Result<Row> {
        let mut n = TestNode::new(ROLE_BACKUP);
        n.kack_interval_ns = interval_ns;
        let vm = kind == ft_common::wire::KIND_VMLOG;
        let mut cells = Vec::new();
        for &size in &self.opts.sizes.clone() {
            let mut tally = BTreeMap::new();
            let mut v = Vec::new();
            let mut len = 0;
            for _ in 0..self.opts.samples {
                self.configure(&n)?;
                self.plane.drain_log_ring();
                let before = self.counters()?;
                let node = n.clone();
                let cost = self.per_call(
                    "ft_log_rx",
                    self.opts.calls,
                    |p, i| {
                        let s = i as u64 + 1;
                        // The daemon drains the ring and records what it holds in order.
                        if i % 1000 == 999 {
                            p.drain_log_ring();
                            if !vm {
                                p.set_chan(ChanState {
                                    delivered: s - 1,
                                    peer_session: node.session,
                                    ..Default::default()
                                })?;
                            }
                        }
                        Ok(if vm {
                            node.vmlog_frame(s, size as usize)
                        } else {
                            node.log_frame(s, size as usize)
                        })
                    },
                    &mut tally,
                )?;
                v.push(cost);
                let d = delta(&before, &self.counters()?);
                check("ft_log_rx (backup)", &d, &[])?;
                len = if vm {
                    n.vmlog_frame(1, size as usize)
                } else {
                    n.log_frame(1, size as usize)
                }
                .len();
            }
            self.plane.drain_log_ring();
            cells.push(Cell {
                size,
                frame_len: len as u32,
                stats: Stats::of(v),
                actions: actions(true, &tally),
            });
        }
        let what = if vm { "VMLOG" } else { "LOG" };
        let acks = if interval_ns == 0 {
            "kernel acks unthrottled (kernel_ack_interval_us = 0: every in-order frame acked)"
                .to_string()
        } else {
            format!(
                "kernel_ack_interval_us = {} (ftd's default)",
                interval_ns / 1000
            )
        };
        Ok(Row {
            id: format!("backup_{}_{}", what.to_lowercase(), interval_ns / 1000),
            program: "ft_log_rx".into(),
            path: format!("backup, {what} frames in sequence, {acks}"),
            method: Method::PerCall,
            includes: format!(
                "whatever the object does with an in-order {what} frame (today: header, peer, \
                 epoch, session, duplicate and window checks, the copy into the LOG_RING ring \
                 buffer, the KACK compare-and-swap and, when an ack is due, the rewrite into \
                 the tagged ack with SipHash and XDP_TX){}",
                if vm {
                    "; payload = size bytes of VMM entries"
                } else {
                    "; frame = log header + client frame"
                }
            ),
            excludes: "transmitting the ack (XDP_TX under a test run sends nothing) and the \
                       daemon draining the ring (done between calls, untimed)"
                .into(),
            cells,
        })
    }

    /// `ft_log_rx` on the primary with a tagged ACK that advances both acks.
    pub fn ack_rx(&mut self) -> Result<Row> {
        let n = self.primary.clone();
        self.configure(&n)?;
        let far = 1u64 << 40;
        self.plane.set_seq(SeqState {
            last_seq: far,
            ..Default::default()
        })?;
        self.plane.set_chan(ChanState {
            vm_last: far,
            ..Default::default()
        })?;
        let mut tally = BTreeMap::new();
        let mut v = Vec::new();
        let mut next = 1u64;
        for _ in 0..self.opts.samples {
            let before = self.counters()?;
            let calls = self.opts.calls;
            let node = n.clone();
            v.push(self.per_call(
                "ft_log_rx",
                calls,
                |_, i| Ok(node.ack_frame(next + i as u64, next + i as u64)),
                &mut tally,
            )?);
            next += calls as u64;
            let d = delta(&before, &self.counters()?);
            check(
                "ft_log_rx (primary, ack)",
                &d,
                &[(C_ACK_RX, calls as u64), (C_ACK_STALE, 0)],
            )?;
        }
        ensure!(
            tally.keys().eq([testrun::XDP_PASS].iter()),
            "ft_log_rx (primary, ack) returned {tally:?}, not only XDP_PASS"
        );
        Ok(Row {
            id: "ack_rx".into(),
            program: "ft_log_rx".into(),
            path: "primary, tagged ACK that advances both acks".into(),
            method: Method::PerCall,
            includes: "the header, peer, epoch and session checks, the SipHash-2-4 tag check, \
                       the compare-and-swap of SEQ.acked and SEQ.vm_acked, the peer timestamp"
                .into(),
            excludes: "passing the ack up to tc (next row)".into(),
            cells: vec![Cell {
                size: 0,
                frame_len: n.ack_frame(1, 1).len() as u32,
                stats: Stats::of(v),
                actions: actions(true, &tally),
            }],
        })
    }

    /// `ft_log_tc` on an ack with nothing to release: the release carrier's own cost.
    pub fn ack_carrier(&mut self) -> Result<Row> {
        let n = self.primary.clone();
        self.configure(&n)?;
        let f = n.ack_frame(1, 1);
        let mut tally = BTreeMap::new();
        let mut v = Vec::new();
        for _ in 0..self.opts.samples {
            let before = self.counters()?;
            let r = self.plane.run("ft_log_tc", &f, self.opts.repeat)?;
            *tally.entry(r.action).or_default() += 1;
            v.push(r.duration_ns as f64);
            check(
                "ft_log_tc (ack, nothing held)",
                &delta(&before, &self.counters()?),
                &[(C_HOLD_RELEASED, 0)],
            )?;
        }
        ensure!(
            tally.keys().eq([testrun::TC_ACT_SHOT].iter()),
            "ft_log_tc (ack) returned {tally:?}, not only TC_ACT_SHOT"
        );
        Ok(Row {
            id: "ack_carrier".into(),
            program: "ft_log_tc".into(),
            path: "primary, the ack (release carrier), nothing held".into(),
            method: Method::Repeat,
            includes: "the ack check and one release pass that finds the ring empty (kick, \
                       try-lock, unlock)"
                .into(),
            excludes: "releasing frames (next rows); the stack's skb allocation before tc".into(),
            cells: vec![Cell {
                size: 0,
                frame_len: f.len() as u32,
                stats: Stats::of(v),
                actions: actions(false, &tally),
            }],
        })
    }

    /// Primary state in which every held frame waits: input dependency 1, acked 0.
    fn hold_behind(&mut self) -> Result<()> {
        self.plane.set_state(
            SeqState {
                last_seq: 1,
                ..Default::default()
            },
            ChanState::default(),
            HoldCtl::default(),
        )?;
        Ok(())
    }

    /// `ft_vm_tc` on the primary: a VM output frame copied into the hold ring.
    pub fn hold_enqueue(&mut self) -> Result<Row> {
        let n = self.primary.clone();
        self.configure(&n)?;
        let chunk = self.plane.hold_slots;
        let mut cells = Vec::new();
        for &size in &self.opts.sizes.clone() {
            let f = n.vm_frame(size as usize);
            let mut tally = BTreeMap::new();
            let mut v = Vec::new();
            for _ in 0..self.opts.samples {
                // Runs of at most a ring's worth until `repeat` frames are held.
                let (mut frames, mut ns) = (0u64, 0f64);
                while frames < self.opts.repeat as u64 {
                    self.hold_behind()?;
                    let before = self.counters()?;
                    let r = self.plane.run("ft_vm_tc", &f, chunk)?;
                    *tally.entry(r.action).or_default() += 1;
                    let d = delta(&before, &self.counters()?);
                    check(
                        "ft_vm_tc (primary)",
                        &d,
                        &[(C_HOLD_ENQ, chunk as u64), (C_HOLD_RELEASED, 0)],
                    )?;
                    frames += chunk as u64;
                    ns += r.duration_ns as f64 * chunk as f64;
                }
                v.push(ns / frames as f64);
            }
            ensure!(
                tally.keys().eq([testrun::TC_ACT_SHOT].iter()),
                "ft_vm_tc returned {tally:?}, not only TC_ACT_SHOT"
            );
            cells.push(Cell {
                size,
                frame_len: f.len() as u32,
                stats: Stats::of(v),
                actions: actions(false, &tally),
            });
        }
        Ok(Row {
            id: "hold_enqueue".into(),
            program: "ft_vm_tc".into(),
            path: "primary, VM output frame held (acks behind)".into(),
            method: Method::Repeat,
            includes: format!(
                "reserving a HOLD slot (compare-and-swap), copying the frame in \
                 (bpf_skb_load_bytes), publishing it, and the release pass that follows every \
                 enqueue and finds nothing covered; runs of {chunk} (the ring's size), ring \
                 emptied between runs"
            ),
            excludes: "the stack's skb allocation before tc; releasing".into(),
            cells,
        })
    }

    /// `ft_log_tc` releasing `release_n` held frames with one ack; cost per frame.
    pub fn release(&mut self) -> Result<Row> {
        let n = self.primary.clone();
        self.configure(&n)?;
        let held = self.opts.release_n;
        ensure!(
            held <= self.plane.hold_slots,
            "release_n {held} > hold ring {}",
            self.plane.hold_slots
        );
        let ack = n.ack_frame(1, 0);
        let runs = (self.opts.repeat / held).clamp(1, 8);
        let mut cells = Vec::new();
        for &size in &self.opts.sizes.clone() {
            let f = n.vm_frame(size as usize);
            let mut tally = BTreeMap::new();
            let mut v = Vec::new();
            for _ in 0..self.opts.samples {
                let mut ns = 0f64;
                for _ in 0..runs {
                    self.hold_behind()?;
                    self.plane.run("ft_vm_tc", &f, held)?;
                    // What ft_log_rx does with a valid ack: both acks cover every frame.
                    self.plane.set_seq(SeqState {
                        last_seq: 1,
                        acked: 1,
                        ..Default::default()
                    })?;
                    let before = self.counters()?;
                    let r = self.plane.run("ft_log_tc", &ack, 1)?;
                    *tally.entry(r.action).or_default() += 1;
                    let d = delta(&before, &self.counters()?);
                    check(
                        "ft_log_tc (release)",
                        &d,
                        &[(C_HOLD_RELEASED, held as u64), (C_RELEASE_ERR, 0)],
                    )?;
                    let ctl = self.plane.hold_state()?;
                    ensure!(
                        ctl.head == held as u64,
                        "release: head {} after releasing, want {held}",
                        ctl.head
                    );
                    ns += (r.duration_ns as f64 - self.overhead_ns) / held as f64;
                }
                v.push(ns / runs as f64);
            }
            cells.push(Cell {
                size,
                frame_len: f.len() as u32,
                stats: Stats::of(v),
                actions: actions(false, &tally),
            });
        }
        Ok(Row {
            id: "release".into(),
            program: "ft_log_tc".into(),
            path: format!("primary, one ack releasing {held} held frames (per frame)"),
            method: Method::PerReleased,
            includes: format!(
                "per frame: the output-rule and lease checks, bpf_skb_change_tail and \
                 bpf_skb_store_bytes of the held frame into the ack's skb, bpf_clone_redirect \
                 to the client NIC's egress (the fence guard ft_client_egress on its tc egress, \
                 the device's xmit), the hold-time histogram; the {held} frames take {} \
                 program runs (tail calls to ft_release_more)",
                held.div_ceil(HOLD_RELEASE_BURST * HOLD_RELEASE_ROUNDS)
            ),
            excludes: "a NIC driver's transmit and DMA: the client NIC here is an empty Linux \
                       bridge, whose xmit frees the frame (no port)"
                .into(),
            cells,
        })
    }
}

/// ftd's default kernel-ack interval (for the caller's row list).
pub fn default_kack_interval_ns() -> u64 {
    KACK_INTERVAL_DEFAULT_NS
}
