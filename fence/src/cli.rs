//! The `ft-arbiter` command line's definition (clap): the binary parses it, and `cargo
//! xtask package` renders it as a man page and shell completions.
use std::path::PathBuf;

use clap::Parser;

/// Embedded split-brain arbiter for the FT pair. Run it on a third host; state changes
/// are fsynced to --state-dir before they are answered.
#[derive(Parser, Debug)]
#[command(version)]
pub struct Args {
    /// Address to listen on: one address of this host that both nodes reach, e.g.
    /// 10.0.0.3:7700 (not 0.0.0.0: the arbiter decides who may run the VM).
    #[arg(long)]
    pub listen: String,
    /// Directory for the durable state (local disk; never shared by two arbiters).
    #[arg(long)]
    pub state_dir: PathBuf,
    /// First start only: create a new, empty state in --state-dir (refused if a state
    /// file exists). Without it a missing state file is an error, so a lost file can
    /// never silently restart the epochs.
    #[arg(long)]
    pub init: bool,
    /// A file holding the shared secret (at least 16 bytes): clients must authenticate
    /// every request with it (the nodes' fence.secret_file), and replies are too.
    #[arg(long, required_unless_present = "insecure")]
    pub secret_file: Option<PathBuf>,
    /// Serve without a secret: any host that reaches the arbiter can then take or refuse
    /// the VM's lease. Only for an isolated test network (the nodes need
    /// `fence.insecure = true`).
    #[arg(long, conflicts_with = "secret_file")]
    pub insecure: bool,
    /// Serve Prometheus metrics at http://ADDR/metrics (requests by operation and
    /// answer, refused requests, state writes, each VM's epoch, owner and lease).
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<String>,
}
