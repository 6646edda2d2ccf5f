//! Results (what `results.json` holds), summary statistics and the markdown table.
use serde::{Deserialize, Serialize};

/// The goal for the duplication path on one core, and 10 GbE line rate at
/// 1500-byte frames (1538 bytes on the wire with preamble, FCS and gap).
pub const GOAL_MPPS: f64 = 1.0;
pub const LINE_RATE_10G_1500_MPPS: f64 = 0.82;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Results {
    pub meta: Meta,
    /// Per-frame cost of each program (BPF_PROG_RUN, no live frames).
    pub rows: Vec<Row>,
    /// The duplication path with live frames, one core.
    pub live: Vec<LiveCell>,
    pub goal_mpps: f64,
    pub line_rate_10g_1500_mpps: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Meta {
    pub date_utc: String,
    pub command: String,
    pub kernel: String,
    pub cpu_model: String,
    pub nproc: usize,
    /// The CPU every measurement ran on (sched_setaffinity).
    pub pinned_cpu: usize,
    pub samples: usize,
    /// `repeat` of the repeat-method rows (per sample).
    pub repeat: u32,
    /// Calls per sample of the per-call rows.
    pub calls: u32,
    pub live_repeat: u32,
    pub live_batch: u32,
    pub live_samples: usize,
    /// What one `repeat = 1` test run adds to the program's own time (the kernel's timer
    /// reads): subtracted from the per-call rows.
    pub timer_overhead_ns: f64,
}

/// How a row was measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// One test run with `repeat` = N on the same frame: the kernel's mean per run.
    Repeat,
    /// Programs that rewrite their frame or must see a new sequence number each time:
    /// one test run (`repeat` = 1) per frame, mean of the kernel's durations less the
    /// timer overhead.
    PerCall,
    /// One run releases N held frames: its duration / N.
    PerReleased,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Row {
    pub id: String,
    pub program: String,
    /// The node's role and the frame.
    pub path: String,
    pub method: Method,
    pub includes: String,
    pub excludes: String,
    pub cells: Vec<Cell>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Cell {
    /// Client (or VM output) frame bytes, Ethernet header included; 0: size-independent.
    pub size: u32,
    /// Bytes of the frame handed to the program.
    pub frame_len: u32,
    pub stats: Stats,
    /// What the program returned, with its share of the runs, e.g. "TX 100%".
    pub actions: String,
}

/// Summary of a cell's samples (ns per frame, or frames/s).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Stats {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub samples: Vec<f64>,
}

impl Stats {
    pub fn of(samples: Vec<f64>) -> Stats {
        let mut s = samples.clone();
        s.sort_by(f64::total_cmp);
        let n = s.len();
        let median = match n {
            0 => f64::NAN,
            _ if n % 2 == 1 => s[n / 2],
            _ => (s[n / 2 - 1] + s[n / 2]) / 2.0,
        };
        Stats {
            median,
            min: s.first().copied().unwrap_or(f64::NAN),
            max: s.last().copied().unwrap_or(f64::NAN),
            samples,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LiveCell {
    pub size: u32,
    /// Frames/s from the kernel's duration per frame (10^6).
    pub mpps: Stats,
    /// Frames/s from the wall clock around each syscall (10^6): includes time the CPU
    /// gave to other processes.
    pub wall_mpps: Stats,
    /// Frames/s from the measuring thread's CPU time (10^6).
    pub cpu_mpps: Stats,
    /// Time ksoftirqd ran on the pinned CPU during the runs of this size (work deferred
    /// out of the measured thread; not in the other figures).
    pub ksoftirqd_ms: f64,
    pub ns_per_frame: Stats,
    /// Share of the frames that the receiving veth ends saw (VM side, logging side).
    pub delivered_vm: f64,
    pub delivered_log: f64,
}

fn ns(s: &Stats) -> String {
    format!("{:.0} ({:.0}–{:.0})", s.median, s.min, s.max)
}

pub fn markdown(r: &Results) -> String {
    let m = &r.meta;
    let mut o = String::new();
    o += &format!(
        "## Per-frame cost of the data-plane programs (BPF_PROG_RUN)\n\n\
         {} UTC, kernel {}, {} ({} CPUs), pinned to CPU {}. ns per frame: median of {} \
         samples (min–max). Per-call rows have the timer overhead ({:.0} ns) subtracted.\n\n",
        m.date_utc, m.kernel, m.cpu_model, m.nproc, m.pinned_cpu, m.samples, m.timer_overhead_ns
    );
    o += "| program | path | method | 64 B | 512 B | 1500 B | returned |\n";
    o += "|---|---|---|---|---|---|---|\n";
    for row in &r.rows {
        let cell = |size: u32| {
            row.cells
                .iter()
                .find(|c| c.size == size)
                .map_or("–".to_string(), |c| ns(&c.stats))
        };
        let (a, b, c) = if row.cells.len() == 1 && row.cells[0].size == 0 {
            (
                format!(
                    "{} ({} B frame, any size)",
                    ns(&row.cells[0].stats),
                    row.cells[0].frame_len
                ),
                "–".into(),
                "–".into(),
            )
        } else {
            (cell(64), cell(512), cell(1500))
        };
        let mut actions: Vec<&str> = row.cells.iter().map(|c| c.actions.as_str()).collect();
        actions.dedup();
        o += &format!(
            "| `{}` | {} | {} | {a} | {b} | {c} | {} |\n",
            row.program,
            row.path,
            match row.method {
                Method::Repeat => "repeat",
                Method::PerCall => "per call",
                Method::PerReleased => "per released frame",
            },
            actions.join(" / ")
        );
    }
    o += "\nWhat each row includes and excludes:\n\n";
    for row in &r.rows {
        o += &format!(
            "- `{}` {}: includes {}; excludes {}.\n",
            row.program, row.path, row.includes, row.excludes
        );
    }
    if !r.live.is_empty() {
        o += &format!(
            "\n## Duplication with live frames (`ft_client_rx`, BPF_F_TEST_XDP_LIVE_FRAMES), one core\n\n\
             {} frames per run, batch {}, {} runs per size; Mpps median (min–max). Goal: ≥ {:.2} Mpps \
             at 1500 B on one core; 10 GbE line rate at 1500 B is {:.2} Mpps.\n\n",
            m.live_repeat, m.live_batch, m.live_samples, r.goal_mpps, r.line_rate_10g_1500_mpps
        );
        o += "| client frame | Mpps (kernel time) | Mpps (thread CPU time) | Mpps (wall clock, shared CPU) | ns/frame | delivered VM / log | ksoftirqd | vs goal |\n";
        o += "|---|---|---|---|---|---|---|---|\n";
        for c in &r.live {
            o += &format!(
                "| {} B | {:.2} ({:.2}–{:.2}) | {:.2} ({:.2}–{:.2}) | {:.2} ({:.2}–{:.2}) | {:.0} | {:.1}% / {:.1}% | {:.1} ms | {} |\n",
                c.size,
                c.mpps.median,
                c.mpps.min,
                c.mpps.max,
                c.cpu_mpps.median,
                c.cpu_mpps.min,
                c.cpu_mpps.max,
                c.wall_mpps.median,
                c.wall_mpps.min,
                c.wall_mpps.max,
                c.ns_per_frame.median,
                c.delivered_vm * 100.0,
                c.delivered_log * 100.0,
                c.ksoftirqd_ms,
                if c.mpps.median >= r.goal_mpps {
                    "meets"
                } else {
                    "below"
                },
            );
        }
        o += "\nLive frames include the whole duplication on this core: `ft_client_rx`, the \
              devmap broadcast (a copy per target), `ft_strip` on the VM copy, both veth \
              transmits and the receiving veth ends' XDP (`ft_client_rx` of a second, backup-\
              configured instance of the object, which drops them). Excludes a physical NIC's \
              DMA and the VM/backup beyond the veth. The kernel time is the time inside the \
              test-run loop with the thread on the CPU (the timer stops while it is \
              preempted); the thread's CPU time is a cross-check of it; the wall clock also counts \
              the time other processes had the CPU. ksoftirqd: receive work deferred out of \
              the loop (not in the figures; ~0 means all of it ran inline and is counted). The VM side \
              is the external stand-in's (the copy stripped by `ft_strip`); its veth has MTU \
              2000, because a broadcast checks each target's MTU against the frame *before* \
              its devmap program strips the log header: at MTU 1500 a client frame over \
              1464 B never reaches the VM side.\n";
    }
    o
}
