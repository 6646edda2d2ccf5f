//! `ft-arbiter --listen ADDR --state-dir DIR (--secret-file F | --insecure)`: the
//! embedded split-brain arbiter.
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use tracing_subscriber::EnvFilter;

/// Embedded split-brain arbiter for the FT pair. Run it on a third host; state changes
/// are fsynced to --state-dir before they are answered.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Address to listen on: one address of this host that both nodes reach, e.g.
    /// 10.0.0.3:7700 (not 0.0.0.0: the arbiter decides who may run the VM).
    #[arg(long)]
    listen: String,
    /// Directory for the durable state (local disk; never shared by two arbiters).
    #[arg(long)]
    state_dir: PathBuf,
    /// First start only: create a new, empty state in --state-dir (refused if a state
    /// file exists). Without it a missing state file is an error, so a lost file can
    /// never silently restart the epochs.
    #[arg(long)]
    init: bool,
    /// A file holding the shared secret (at least 16 bytes): clients must authenticate
    /// every request with it (the nodes' fence.secret_file), and replies are too.
    #[arg(long, required_unless_present = "insecure")]
    secret_file: Option<PathBuf>,
    /// Serve without a secret: any host that reaches the arbiter can then take or refuse
    /// the VM's lease. Only for an isolated test network (the nodes need
    /// `fence.insecure = true`).
    #[arg(long, conflicts_with = "secret_file")]
    insecure: bool,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        // Colours only on a terminal: the journal (and any log file) gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = Args::parse();
    let secret = match &args.secret_file {
        Some(p) => Some(ft_fence::config::read_secret(p).map_err(anyhow::Error::msg)?),
        None => {
            tracing::warn!(
                "--insecure: requests are not authenticated; any host that reaches {} can take or refuse the VM's lease",
                args.listen
            );
            None
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(&args.listen)
            .await
            .with_context(|| format!("cannot listen on {}", args.listen))?;
        tracing::info!(listen = %listener.local_addr()?, state_dir = %args.state_dir.display(), "ft-arbiter up");
        tokio::select! {
            r = ft_fence::serve_with(
                listener,
                &args.state_dir,
                ft_fence::ServerOptions {
                    init: args.init,
                    secret,
                    ..Default::default()
                },
            ) => r.map_err(anyhow::Error::from),
            _ = tokio::signal::ctrl_c() => { tracing::info!("interrupted"); Ok(()) }
        }
    })
}
