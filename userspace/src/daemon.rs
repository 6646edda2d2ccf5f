//! `ftd run`: load the data plane, run the logging channel for this node's role, serve
//! metrics and status, and tear everything down on SIGINT/SIGTERM.
use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering::Relaxed},
    },
    time::Duration,
};

use anyhow::Context as _;
use ft_common::maps::{NodeState, ROLE_BACKUP, ROLE_STANDBY};
use ft_fence::Backend;
use tracing::{error, info, warn};

use crate::{
    channel::{backup, primary, status::ChannelStatus},
    config::{Config, Role},
    dataplane::{DataPlane, initial_node_state},
    netif::RawSocket,
};

/// State shared by the channel threads, the metrics endpoint and the control socket.
pub struct Shared {
    pub dp: Arc<DataPlane>,
    pub status: Arc<ChannelStatus>,
    pub node_name: String,
}

/// A random, non-zero session number for this run (see ft_common::wire).
fn new_session() -> u64 {
    loop {
        let mut b = [0u8; 8];
        // SAFETY: getrandom(2) writes at most 8 bytes into the local buffer.
        let n = unsafe { libc::getrandom(b.as_mut_ptr() as *mut libc::c_void, 8, 0) };
        let v = u64::from_ne_bytes(b);
        if n == 8 && v != 0 {
            return v;
        }
    }
}

pub async fn run(cfg: Config) -> anyhow::Result<()> {
    let arbiter = match cfg.fence.backend {
        Some(Backend::None) | None => {
            warn!(
                "[fence] backend = \"none\": static lease, no split-brain protection (demo only)"
            );
            None
        }
        Some(_) => Some(
            cfg.fence
                .build_arbiter()
                .context("building the arbiter client")?,
        ),
    };
    let mut node = initial_node_state(&cfg);
    if arbiter.is_some() {
        // Not live and no epoch until the arbiter says so.
        node = NodeState {
            epoch: 0,
            lease_deadline_ns: 0,
            role: if cfg.node.role == Role::Primary {
                ROLE_STANDBY
            } else {
                ROLE_BACKUP
            },
            _pad: 0,
        };
    }
    let session = new_session();
    let dp = Arc::new(DataPlane::start(&cfg, node, session).context("starting the data plane")?);
    if let Some(logger) = dp.take_logger() {
        tokio::spawn(drive_ebpf_logger(logger));
    }
    let status = Arc::new(ChannelStatus::default());
    status.session.store(session, Relaxed);
    status.peer_alive.store(true, Relaxed);
    status.epoch.store(node.epoch, Relaxed);
    if let Some(arb) = arbiter {
        tokio::spawn(crate::fencing::run(
            cfg.clone(),
            dp.clone(),
            status.clone(),
            arb,
        ));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let sh = Arc::new(Shared {
        dp: dp.clone(),
        status: status.clone(),
        node_name: cfg.node.name.clone(),
    });
    let ch = &cfg.channel;

    let worker = {
        let (dp, status, stop) = (dp.clone(), status.clone(), stop.clone());
        match cfg.node.role {
            Role::Primary => {
                let p = primary::PrimaryParams {
                    peer_mac: cfg.interfaces.peer_log_mac.0,
                    session,
                    heartbeat: Duration::from_millis(ch.heartbeat_ms),
                    peer_timeout: Duration::from_millis(ch.peer_timeout_ms),
                };
                std::thread::Builder::new()
                    .name("ft-primary".into())
                    .spawn(move || {
                        primary::run(dp, p, status, stop);
                        Ok(())
                    })?
            }
            Role::Backup => {
                let p = backup::BackupParams {
                    own_mac: dp.nics.logging.mac,
                    peer_mac: cfg.interfaces.peer_log_mac.0,
                    heartbeat: Duration::from_millis(ch.heartbeat_ms),
                    peer_timeout: Duration::from_millis(ch.peer_timeout_ms),
                    nack_retry: Duration::from_millis(ch.nack_retry_ms),
                    nack_burst: ch.nack_burst as usize,
                    max_pending: cfg.window() + ft_common::maps::RETX_MARGIN,
                    tagged_input: cfg.vm.tagged_input,
                };
                let sink = Box::new(backup::RawSink(RawSocket::open(&dp.nics.vm)?));
                std::thread::Builder::new()
                    .name("ft-backup-rx".into())
                    .spawn(move || {
                        backup::run(dp, p, sink, status, stop).map_err(anyhow::Error::from)
                    })?
            }
        }
    };

    if !cfg.api.metrics_listen.is_empty() {
        let listener = tokio::net::TcpListener::bind(&cfg.api.metrics_listen)
            .await
            .with_context(|| format!("binding metrics endpoint {}", cfg.api.metrics_listen))?;
        info!("metrics on http://{}/metrics", cfg.api.metrics_listen);
        tokio::spawn(crate::metrics::serve(listener, sh.clone()));
    }
    let ctl_path = cfg.api.control_socket.clone();
    {
        let sh = sh.clone();
        let p = ctl_path.clone();
        tokio::spawn(async move {
            if let Err(e) = crate::control::serve(&p, sh).await {
                error!("control socket {}: {e}", p.display());
            }
        });
    }
    info!(node = %cfg.node.name, "ftd running");

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let worker_done = async {
        while !worker.is_finished() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => info!("SIGINT: shutting down"),
        _ = term.recv() => info!("SIGTERM: shutting down"),
        _ = worker_done => error!("channel worker stopped"),
    }
    stop.store(true, Relaxed);
    let res = worker
        .join()
        .map_err(|_| anyhow::anyhow!("channel worker panicked"))?;
    let _ = std::fs::remove_file(&ctl_path);
    res.context("logging channel")
}

/// Forwards aya-log records from the programs into tracing (through the `log` facade).
async fn drive_ebpf_logger(logger: crate::dataplane::EbpfLogger) {
    // SAFETY: the logger owns its ring-buffer fd and stays alive inside the AsyncFd for
    // as long as the registration exists.
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
    };
    let mut fd = match registered {
        Ok(fd) => fd,
        Err(e) => {
            warn!("cannot poll the eBPF log ring: {e}");
            return;
        }
    };
    loop {
        let Ok(mut guard) = fd.readable_mut().await else {
            return;
        };
        guard.get_inner_mut().flush();
        guard.clear_ready();
    }
}
