//! `ft-arbiter --listen ADDR --state-dir DIR (--secret-file F | --insecure)`: the
//! embedded split-brain arbiter.
use anyhow::Context;
use clap::Parser;
use ft_fence::cli::Args;
use tracing_subscriber::EnvFilter;

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
        let metrics = match &args.metrics_listen {
            Some(addr) => {
                let l = tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("cannot serve metrics on {addr}"))?;
                tracing::info!("metrics on http://{addr}/metrics");
                Some(l)
            }
            None => None,
        };
        tokio::select! {
            r = ft_fence::serve_with_metrics(
                listener,
                &args.state_dir,
                ft_fence::ServerOptions {
                    init: args.init,
                    secret,
                    ..Default::default()
                },
                metrics,
            ) => r.map_err(anyhow::Error::from),
            _ = tokio::signal::ctrl_c() => { tracing::info!("interrupted"); Ok(()) }
        }
    })
}
