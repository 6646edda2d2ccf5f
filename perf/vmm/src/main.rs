//! VMM benchmarks. Needs root and /dev/kvm; runs in network namespaces of its own.
//!
//!   ft-perf-vmm service   the guest's service vs Debian's redis-server, side by side
//!   ft-perf-vmm record    free vs record mode (cost of logging), log volume, replay
//!   ft-perf-vmm appliance FT on vs FT off through ftd on the testbed, logging-link cost
//!   ft-perf-vmm reprotect live state transfers of a loaded 1 GiB guest: pause, time, bytes
//!
//! `--out DIR` (any subcommand) puts its results into DIR/results.json (one section per
//! subcommand, so all four can share a directory) and draws its SVG plots there;
//! `--replot DIR` draws them again from DIR/results.json without measuring (no root
//! needed): every section without a subcommand, that subcommand's section with one.
use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use std::path::PathBuf;

mod appliance;
mod bench;
mod netns;
mod plots;
mod record;
mod reprotect;
mod results;
mod service;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    /// Write results.json (this subcommand's section) and SVG plots into this directory.
    #[arg(long, global = true)]
    out: Option<PathBuf>,
    /// Only draw the plots again from DIR/results.json (no measuring).
    #[arg(long, global = true, value_name = "DIR", conflicts_with = "out")]
    replot: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Cmd {
    /// The guest's service vs redis-server: 50 and 1,000 clients, with and without -P 16.
    Service(service::ServiceArgs),
    /// Free vs record mode of the guest, log volume per request, replay speed.
    Record(record::RecordArgs),
    /// FT on (primary + replaying backup) vs FT off (solo) through ftd on the testbed.
    Appliance(appliance::ApplianceArgs),
    /// Live state transfers of a loaded guest into new replicas while clients write.
    Reprotect(reprotect::ReprotectArgs),
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    if let Some(dir) = &cli.replot {
        let mut all: results::VmmResults = ft_perf_plot::read_results(dir, results::BENCHMARK)?;
        let name = match &cli.cmd {
            None => None,
            Some(Cmd::Service(_)) => Some("service"),
            Some(Cmd::Record(_)) => Some("record"),
            Some(Cmd::Appliance(_)) => Some("appliance"),
            Some(Cmd::Reprotect(_)) => Some("reprotect"),
        };
        if let Some(n) = name {
            // Only that subcommand's section.
            if n != "service" {
                all.service = None;
            }
            if n != "record" {
                all.record = None;
            }
            if n != "appliance" {
                all.appliance = None;
            }
            if n != "reprotect" {
                all.reprotect = None;
            }
        }
        return plots::draw(dir, &all, true)
            .with_context(|| format!("replotting {}", dir.display()));
    }
    let out = cli.out.as_deref();
    match cli.cmd {
        None => {
            anyhow::bail!("a subcommand (service, record, appliance, reprotect) or --replot DIR")
        }
        Some(Cmd::Service(a)) => service::run(&a, out),
        Some(Cmd::Record(a)) => record::run(&a, out),
        Some(Cmd::Appliance(a)) => appliance::run(&a, out),
        Some(Cmd::Reprotect(a)) => reprotect::run(&a, out),
    }
}
