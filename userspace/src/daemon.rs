//! `ftd run`: load the data plane, start the role supervisor (which decides how this node
//! starts and runs its role's workers), serve metrics and status, and stop on
//! SIGINT/SIGTERM or `ftd switchover` (a request on the control socket).
use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering::Relaxed},
    },
    time::Duration,
};

use anyhow::Context as _;
use ft_common::maps::{NodeState, ROLE_STANDBY};
use ft_fence::Backend;
use tracing::{error, info, warn};

use crate::{
    channel::status::ChannelStatus,
    config::{Config, VmKind},
    dataplane::DataPlane,
    liveness::Liveness,
    role::{Roles, Supervisor, start::Bootstrap},
    shared::Shared,
    vm::VmState,
};

/// A random, non-zero session number for this run (see ft_common::wire).
fn new_session() -> u64 {
    loop {
        let mut b = [0u8; 8];
        crate::channel::auth::fill_random(&mut b);
        let v = u64::from_ne_bytes(b);
        if v != 0 {
            return v;
        }
    }
}

pub use crate::role::Exit;

pub async fn run(cfg: Config, bootstrap: Bootstrap) -> anyhow::Result<Exit> {
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
    let session = new_session();
    // The VMM's NIC exists before the data plane attaches to it.
    let tap = match cfg.vm.kind {
        VmKind::Vmm => Some(
            crate::vm::tap::create(&cfg.interfaces.vm, cfg.vm.tap_mtu)
                .context("creating the VM's TAP")?,
        ),
        VmKind::External => None,
    };
    // Not live and following nobody until the role supervisor decides.
    let standby = NodeState {
        epoch: 0,
        lease_deadline_ns: 0,
        role: ROLE_STANDBY,
        _pad: 0,
    };
    let dp = Arc::new(DataPlane::start(&cfg, standby, session).context("starting the data plane")?);
    if let Some(logger) = dp.take_logger() {
        tokio::spawn(drive_ebpf_logger(logger));
    }
    let status = Arc::new(ChannelStatus::default());
    status.session.store(session, Relaxed);
    let liveness = Arc::new(Liveness::new(Duration::from_millis(
        cfg.channel.peer_timeout_ms,
    )));
    let roles = Roles::new(dp.clone(), liveness.clone());
    let vm = (cfg.vm.kind == VmKind::Vmm).then(|| Arc::new(VmState::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let supervisor = Supervisor::new(
        cfg.clone(),
        bootstrap,
        dp.clone(),
        status.clone(),
        roles.clone(),
        liveness,
        vm.clone(),
        arbiter.clone(),
        session,
        tap,
        stop.clone(),
    );
    let switchover = supervisor.switchover.clone();
    let standby = Arc::new(AtomicBool::new(false));
    let stop_request = Arc::new(tokio::sync::Notify::new());
    let mut node = tokio::spawn(supervisor.run());
    let sh = Arc::new(Shared {
        dp: dp.clone(),
        status: status.clone(),
        node_name: cfg.node.name.clone(),
        vm,
        roles: roles.clone(),
        previous_exit: previous_exit(&cfg.api.control_socket),
        keys: cfg.channel.keys.clone(),
        // A client of its own: `ftd status` polls must never wait behind, or delay, the
        // lease renewals on the supervisor's connection.
        arbiter: arbiter
            .as_ref()
            .and_then(|_| cfg.fence.build_arbiter().ok()),
        vm_id: cfg.fence.vm.clone(),
        peer_name: cfg.fence.peer.clone(),
    });
    let (reload_keys, reload_rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(crate::channel::keys::run(
        cfg.channel.key_file.clone(),
        cfg.channel.key_overlap(),
        cfg.channel.keys.clone(),
        dp.clone(),
        status.clone(),
        reload_rx,
    ));
    if !cfg.api.metrics_listen.is_empty() {
        let listener = tokio::net::TcpListener::bind(&cfg.api.metrics_listen)
            .await
            .with_context(|| format!("binding metrics endpoint {}", cfg.api.metrics_listen))?;
        info!("metrics on http://{}/metrics", cfg.api.metrics_listen);
        tokio::spawn(crate::metrics::serve(listener, sh.clone()));
    }
    let ctl_path = cfg.api.control_socket.clone();
    {
        let ctl = Arc::new(crate::control::Control {
            sh: sh.clone(),
            switchover,
            standby: standby.clone(),
            stop: stop_request.clone(),
            bad_requests: Default::default(),
        });
        let p = ctl_path.clone();
        let listener = crate::control::bind(&p)
            .with_context(|| format!("binding api.control_socket {}", p.display()))?;
        tokio::spawn(async move {
            if let Err(e) = crate::control::serve(listener, ctl).await {
                error!("control socket {}: {e}", p.display());
            }
        });
    }
    info!(node = %cfg.node.name, "ftd running");
    // systemd (Type=notify): started once the data plane is attached and the control
    // socket answers; then the role and health as the unit's status line.
    notify(&[sd_notify::NotifyState::Ready]);
    tokio::spawn(notify_status(sh.clone()));
    tokio::spawn(async {
        loop {
            tokio::time::sleep(Duration::from_secs(10)).await;
            crate::logging::report_suppressed();
        }
    });

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    let ended = loop {
        tokio::select! {
            r = &mut node => break r,
            _ = tokio::signal::ctrl_c() => info!("SIGINT: shutting down"),
            _ = term.recv() => info!("SIGTERM: shutting down"),
            _ = stop_request.notified() => info!("standby: shutting down"),
            _ = hup.recv() => {
                info!("SIGHUP: reading the channel keys again (key rotation)");
                let _ = reload_keys.send(());
                continue;
            }
        }
        notify(&[sd_notify::NotifyState::Stopping]);
        stop.store(true, Relaxed);
    };
    let _ = std::fs::remove_file(&ctl_path);
    let mut exit = ended.context("the role supervisor panicked")?;
    if standby.load(Relaxed) && matches!(exit, Exit::Switchover) {
        info!("standby: the VM was handed over; stopping (start ftd again to rejoin)");
        exit = Exit::Stopped;
    }
    record_exit(&ctl_path, &exit, &roles);
    Ok(exit)
}

/// Tells the service manager (systemd's `NOTIFY_SOCKET`; nothing without one).
fn notify(state: &[sd_notify::NotifyState]) {
    if let Err(e) = sd_notify::notify(false, state) {
        warn!("cannot notify the service manager: {e}");
    }
}

/// Keeps the unit's status line (`systemctl status ftd`) at this node's health:
/// `FT OK - node host-a: primary, epoch 3: the backup follows`, sent when it changes.
async fn notify_status(sh: Arc<Shared>) {
    let mut last = String::new();
    loop {
        let (_, line) = crate::control::report::check_line(&crate::control::status_json(&sh));
        if line != last {
            notify(&[sd_notify::NotifyState::Status(&line)]);
            last = line;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Where the last run's end is recorded: beside the control socket.
pub fn last_exit_path(control_socket: &std::path::Path) -> std::path::PathBuf {
    control_socket.with_extension("last-exit.json")
}

/// Records how this run ended (the next run shows it in `ftd status`: a node that
/// halted and was started again by its service manager says why it halted).
fn record_exit(ctl_path: &std::path::Path, exit: &Exit, roles: &Roles) {
    let (how, why) = match exit {
        Exit::Stopped => ("stopped", None),
        Exit::Switchover => ("switchover", None),
        Exit::Halted(w) => ("halted", Some(w.as_str())),
        Exit::Refused(w) => ("refused", Some(w.as_str())),
    };
    let v = serde_json::json!({
        "how": how,
        "why": why,
        "at_unix_ms": crate::role::unix_ms(),
        "pid": std::process::id(),
        "transitions": roles.transitions(),
    });
    let path = last_exit_path(ctl_path);
    if let Err(e) = std::fs::write(&path, serde_json::to_vec_pretty(&v).unwrap_or_default()) {
        warn!(
            "cannot record how this run ended in {}: {e}",
            path.display()
        );
    }
}

/// How the previous run ended, if it left a record.
fn previous_exit(ctl_path: &std::path::Path) -> Option<serde_json::Value> {
    let b = std::fs::read(last_exit_path(ctl_path)).ok()?;
    serde_json::from_slice(&b).ok()
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
