//! results.json of `ft-perf-vmm`: one section per subcommand, so the four subcommands
//! can write into one directory (`--out DIR` replaces its own section) and `--replot
//! DIR` draws whatever sections the file has.
use crate::bench::Row;
use anyhow::{Context, Result};
use ft_perf_plot::{Distribution, joins::JoinReport};
use serde::{Deserialize, Serialize};
use std::path::Path;

pub const BENCHMARK: &str = "vmm";

#[derive(Default, Serialize, Deserialize)]
pub struct VmmResults {
    pub service: Option<ServiceResults>,
    pub record: Option<RecordResults>,
    pub appliance: Option<ApplianceResults>,
    pub reprotect: Option<ReprotectResults>,
}

/// When and how a section was measured.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Made {
    pub command: Vec<String>,
    pub unix_time: u64,
}

impl Made {
    pub fn now() -> Made {
        Made {
            command: ft_perf_plot::results::command_line(),
            unix_time: ft_perf_plot::results::unix_time(),
        }
    }
}

/// One (clients, pipeline) configuration: per round, rows SET, GET, INCR.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ServiceConfig {
    pub clients: u32,
    pub pipeline: u32,
    pub guest: Vec<Vec<Row>>,
    pub redis: Vec<Vec<Row>>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ServiceResults {
    pub made: Made,
    pub rounds: u32,
    pub configs: Vec<ServiceConfig>,
    pub exits: u64,
    pub idle_reads: u64,
    /// Request frame in -> reply frame out on the guest's tap, 50 clients.
    pub tap: Distribution,
}

/// One mode of the guest (free, record to a file, record to a channel): its rows.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ModeRows {
    pub mode: String,
    pub rows: Vec<Row>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RecordResults {
    pub made: Made,
    pub clients: u32,
    pub requests: u32,
    pub modes: Vec<ModeRows>,
    pub log_entries_per_request: f64,
    pub log_bytes_per_request: f64,
    pub append_ns_per_entry: f64,
    pub replay_entries_per_s: f64,
    pub replay_identical: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ApplianceResults {
    pub made: Made,
    pub clients: u32,
    pub requests: u32,
    pub pipeline: Vec<u32>,
    /// Per round: per pipeline depth, rows SET, GET, INCR.
    pub off: Vec<Vec<(u32, Vec<Row>)>>,
    pub on: Vec<Vec<(u32, Vec<Row>)>>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReprotectResults {
    pub made: Made,
    pub ram_mib: u64,
    pub used_memory_mib: u64,
    pub clients: usize,
    pub report: JoinReport,
}

/// Replaces one section of DIR/results.json (a file of no or another format starts
/// afresh only if absent), writes it and draws that section.
pub fn save(dir: Option<&Path>, update: impl FnOnce(&mut VmmResults)) -> Result<()> {
    let Some(dir) = dir else { return Ok(()) };
    let mut all = if ft_perf_plot::results::results_path(dir).exists() {
        ft_perf_plot::read_results(dir, BENCHMARK)
            .context("--out: the directory's results.json cannot be extended")?
    } else {
        VmmResults::default()
    };
    let mut only = VmmResults::default();
    update(&mut only);
    macro_rules! take {
        ($($f:ident),*) => {$(if only.$f.is_some() { all.$f = only.$f.take(); })*};
    }
    take!(service, record, appliance, reprotect);
    let path = ft_perf_plot::write_results(dir, BENCHMARK, &all)?;
    println!("wrote {}", path.display());
    crate::plots::draw(dir, &all, false)
}
