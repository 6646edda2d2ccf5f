//! VMM benchmarks. Needs root and /dev/kvm; runs in network namespaces of its own.
//!
//!   ft-perf-vmm service   the guest's service vs Debian's redis-server, side by side
//!   ft-perf-vmm record    free vs record mode (cost of logging), log volume, replay
//!   ft-perf-vmm appliance FT on vs FT off through ftd on the testbed, logging-link cost
//!   ft-perf-vmm reprotect live state transfers of a loaded 1 GiB guest: pause, time, bytes
use anyhow::Result;
use clap::{Parser, Subcommand};

mod appliance;
mod bench;
mod netns;
mod record;
mod reprotect;
mod service;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
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
    match Cli::parse().cmd {
        Cmd::Service(a) => service::run(&a),
        Cmd::Record(a) => record::run(&a),
        Cmd::Appliance(a) => appliance::run(&a),
        Cmd::Reprotect(a) => reprotect::run(&a),
    }
}
