//! The `ftd` command line: `run`, `status`, `check-config`.
use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "ftd",
    version,
    about = "Primary/backup fault-tolerance daemon (VMware-FT style)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Load the data plane and run this node until SIGINT/SIGTERM.
    Run {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Print the status of a running daemon: a summary, or everything as JSON.
    Status {
        /// The daemon's api.control_socket.
        #[arg(long, default_value = "/run/ftd/ftd.sock")]
        socket: PathBuf,
        /// The whole status as JSON (for scripts).
        #[arg(long)]
        json: bool,
        /// Show a progress bar of the running join (re-protection by state transfer)
        /// until it ends (at most 10 minutes).
        #[arg(long, conflicts_with = "json")]
        follow_join: bool,
    },
    /// Validate a config file and print what is wrong with it.
    CheckConfig { file: PathBuf },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let _ = tracing_log::LogTracer::init();
    match cli.cmd {
        Cmd::Run { config } => {
            let cfg = ftd::config::Config::load(&config)?;
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            rt.block_on(ftd::daemon::run(cfg))
        }
        Cmd::Status {
            socket,
            follow_join: true,
            ..
        } => ftd::control::follow_join(&socket, std::time::Duration::from_secs(600)),
        Cmd::Status { socket, json, .. } => {
            let v = ftd::control::query(&socket)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print!("{}", ftd::control::summary(&v));
            }
            Ok(())
        }
        Cmd::CheckConfig { file } => {
            let cfg = ftd::config::Config::load(&file)?;
            println!(
                "{}: ok (node {}, role {:?})",
                file.display(),
                cfg.node.name,
                cfg.node.role
            );
            Ok(())
        }
    }
}
