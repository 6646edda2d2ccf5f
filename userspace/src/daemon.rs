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
    config::{Config, Role, VmKind},
    dataplane::{DataPlane, initial_node_state},
    netif::RawSocket,
    role::Roles,
    vm::VmState,
};

/// State shared by the channel threads, the metrics endpoint and the control socket.
pub struct Shared {
    pub dp: Arc<DataPlane>,
    pub status: Arc<ChannelStatus>,
    pub node_name: String,
    /// The VMM's state, when ftd runs the VM.
    pub vm: Option<Arc<VmState>>,
    /// The node's role and its history.
    pub roles: Arc<Roles>,
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

/// How `run` ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// SIGINT/SIGTERM, or the channel ended.
    Stopped,
    /// `ftd switchover`: this primary handed the VM to its in-sync backup (graceful stop:
    /// the backup has the whole log and takes over); the caller starts ftd again as a
    /// backup, which joins the new primary.
    Switchover,
}

pub async fn run(cfg: Config) -> anyhow::Result<Exit> {
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
            role: if cfg.node.role != Role::Backup {
                ROLE_STANDBY
            } else {
                ROLE_BACKUP
            },
            _pad: 0,
        };
    }
    let session = new_session();
    // The VMM's NIC exists before the data plane attaches to it.
    let mut tap = match cfg.vm.kind {
        VmKind::Vmm => Some(
            crate::vm::tap::create(&cfg.interfaces.vm, cfg.vm.tap_mtu)
                .context("creating the VM's TAP")?,
        ),
        VmKind::External => None,
    };
    let dp = Arc::new(DataPlane::start(&cfg, node, session).context("starting the data plane")?);
    if let Some(logger) = dp.take_logger() {
        tokio::spawn(drive_ebpf_logger(logger));
    }
    let status = Arc::new(ChannelStatus::default());
    status.session.store(session, Relaxed);
    status.peer_alive.store(true, Relaxed);
    status.epoch.store(node.epoch, Relaxed);
    let roles = Roles::new(dp.clone(), status.clone());
    let stop = Arc::new(AtomicBool::new(false));
    // The VMM stops first (on the primary: its END entry still travels the channel,
    // which keeps running until the backup acked it, or a bound passed).
    let vm_stop = Arc::new(AtomicBool::new(false));
    let vm = Arc::new(VmState::default());
    let vm_opt = (cfg.vm.kind == VmKind::Vmm).then(|| vm.clone());
    tokio::spawn(crate::role::run(crate::role::Ctx {
        cfg: cfg.clone(),
        dp: dp.clone(),
        status: status.clone(),
        roles: roles.clone(),
        vm: vm_opt.clone(),
        arb: arbiter,
        stop: stop.clone(),
    }));
    let sh = Arc::new(Shared {
        dp: dp.clone(),
        status: status.clone(),
        node_name: cfg.node.name.clone(),
        vm: vm_opt,
        roles: roles.clone(),
    });
    let ch = &cfg.channel;
    let mut vcpu = None;

    let worker = {
        let (dp, status, stop) = (dp.clone(), status.clone(), stop.clone());
        match cfg.node.role {
            Role::Primary => {
                let p = primary::PrimaryParams {
                    peer_mac: cfg.interfaces.peer_log_mac.0,
                    key: ch.key.clone(),
                    session,
                    heartbeat: Duration::from_millis(ch.heartbeat_ms),
                    peer_timeout: Duration::from_millis(ch.peer_timeout_ms),
                };
                if let Some(tap) = tap.take() {
                    vcpu = Some(crate::vm::start_primary(
                        &cfg,
                        dp.clone(),
                        status.clone(),
                        tap,
                        session,
                        vm.clone(),
                        vm_stop.clone(),
                    )?);
                    spawn_vmlog_repair(&dp, &vm, &ch.key, &stop)?;
                }
                std::thread::Builder::new()
                    .name("ft-primary".into())
                    .spawn(move || {
                        primary::run(dp, p, status, stop);
                        Ok(())
                    })
                    .map(Some)?
            }
            Role::Solo => {
                // No backup: no log to send, no channel to run.
                vm.solo.store(true, Relaxed);
                *status.backup_left.lock().unwrap() = Some("configured solo".into());
                if let Some(tap) = tap.take() {
                    vcpu = Some(crate::vm::start_primary(
                        &cfg,
                        dp.clone(),
                        status.clone(),
                        tap,
                        session,
                        vm.clone(),
                        vm_stop.clone(),
                    )?);
                    spawn_vmlog_repair(&dp, &vm, &ch.key, &stop)?;
                }
                None
            }
            Role::Backup => {
                let start = Arc::new(backup::StreamStart::default());
                let p = backup::BackupParams {
                    own_mac: dp.nics.logging.mac,
                    peer_mac: cfg.interfaces.peer_log_mac.0,
                    key: ch.key.clone(),
                    heartbeat: Duration::from_millis(ch.heartbeat_ms),
                    peer_timeout: Duration::from_millis(ch.peer_timeout_ms),
                    nack_retry: Duration::from_millis(ch.nack_retry_ms),
                    nack_burst: ch.nack_burst as usize,
                    max_pending: cfg.window() + ft_common::maps::RETX_MARGIN,
                    start: start.clone(),
                };
                let (sink, feed): (Box<dyn backup::InputSink>, Option<Box<dyn backup::VmFeed>>) =
                    match tap.take() {
                        // The backup's VM reads nothing from its TAP while it replays.
                        Some(tap) => {
                            let (h, input, feed) = crate::vm::start_backup(
                                &cfg,
                                dp.clone(),
                                status.clone(),
                                vm.clone(),
                                tap,
                                start,
                                vm_stop.clone(),
                            )?;
                            vcpu = Some(h);
                            // Once live after a take-over, this node may have a backup
                            // join it: it then sends heartbeats and repairs its VMM
                            // stream like any primary (both idle until then).
                            spawn_vmlog_repair(&dp, &vm, &ch.key, &stop)?;
                            let hb = primary::PrimaryParams {
                                peer_mac: cfg.interfaces.peer_log_mac.0,
                                key: ch.key.clone(),
                                session,
                                heartbeat: Duration::from_millis(ch.heartbeat_ms),
                                peer_timeout: Duration::from_millis(ch.peer_timeout_ms),
                            };
                            let (dp2, st2, stop2) = (dp.clone(), status.clone(), stop.clone());
                            std::thread::Builder::new()
                                .name("ft-heartbeat".into())
                                .spawn(move || primary::run(dp2, hb, st2, stop2))?;
                            (Box::new(input), Some(Box::new(feed)))
                        }
                        None => {
                            start.set(1, 1);
                            (
                                Box::new(backup::RawSink {
                                    sock: RawSocket::open(&dp.nics.vm)?,
                                    tagged: cfg.vm.tagged(),
                                }),
                                None,
                            )
                        }
                    };
                std::thread::Builder::new()
                    .name("ft-backup-rx".into())
                    .spawn(move || {
                        backup::run(dp, p, sink, feed, status, stop).map_err(anyhow::Error::from)
                    })
                    .map(Some)?
            }
        }
    };

    if cfg.vm.kind == VmKind::Vmm && !cfg.channel.join_listen.is_empty() {
        crate::vm::join::JoinServer {
            cfg: cfg.clone(),
            dp: dp.clone(),
            status: status.clone(),
            roles: roles.clone(),
            vm: vm.clone(),
            stop: stop.clone(),
            vm_stop: vm_stop.clone(),
        }
        .spawn()?;
    }
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
    let mut usr1 = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1())?;
    let mut failure = None;
    let mut exit = Exit::Stopped;
    {
        // (A solo node runs no channel: this never completes.)
        let worker_done = async {
            while worker.as_ref().is_none_or(|w| !w.is_finished()) {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        tokio::pin!(worker_done);
        let vm_done = async {
            loop {
                if vcpu.as_ref().is_some_and(|h| h.is_finished()) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::pin!(vm_done);
        // A node that halts (lease lost, test-and-set lost, replica failed) is fenced
        // by the kernel, but its VM would keep running and logging: its backup would
        // keep seeing a live primary and never take over. Fail-stop: stop the VM (a
        // recording VMM logs END first, so a backup that verifies it takes over at
        // once); the daemon then reacts to its VM stopping, below.
        let halted = async {
            while !roles.halted() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::pin!(halted);
        let mut halt_handled = false;
        loop {
            tokio::select! {
                _ = &mut halted, if !halt_handled => {
                    halt_handled = true;
                    if let Some(c) = vm.control.lock().unwrap().clone() {
                        warn!("halted: stopping the VM (fail-stop)");
                        c.request_stop();
                    }
                    continue;
                }
                _ = tokio::signal::ctrl_c() => info!("SIGINT: shutting down"),
                _ = term.recv() => info!("SIGTERM: shutting down"),
                _ = usr1.recv() => {
                    match crate::control::switchover_refusal(&sh) {
                        Some(why) => {
                            warn!("switchover refused: {why}");
                            continue;
                        }
                        None => {
                            info!("switchover: handing the VM to the backup (graceful stop), then rejoining as backup");
                            exit = Exit::Switchover;
                        }
                    }
                }
                _ = &mut worker_done => error!("channel worker stopped"),
                _ = &mut vm_done => {
                    let why = vm.error.lock().unwrap().clone().unwrap_or_else(|| "the VM stopped".into());
                    match cfg.node.role {
                        Role::Primary | Role::Solo => {
                            // Fail-stop: without its VM this node has nothing to protect; exiting
                            // detaches the data plane and lets the backup take over.
                            error!("the protected VM stopped ({why}): exiting");
                            failure = Some(why);
                        }
                        Role::Backup => {
                            declare_failed(&cfg, &dp, &status, &roles, &vm);
                            tokio::select! {
                                _ = tokio::signal::ctrl_c() => info!("SIGINT: shutting down"),
                                _ = term.recv() => info!("SIGTERM: shutting down"),
                            }
                        }
                    }
                }
            }
            break;
        }
    }
    vm_stop.store(true, Relaxed);
    if let Some(h) = vcpu {
        let _ = h.join();
        let primary_now = dp
            .node_state()
            .is_ok_and(|n| n.role == ft_common::maps::ROLE_PRIMARY);
        if (cfg.node.role == Role::Primary || primary_now) && failure.is_none() {
            let bound = Duration::from_millis(ch.peer_timeout_ms).max(Duration::from_secs(1));
            wait_for_last_ack(&dp, &vm, bound).await;
        }
    }
    stop.store(true, Relaxed);
    let res = match worker {
        Some(w) => w
            .join()
            .map_err(|_| anyhow::anyhow!("channel worker panicked"))?,
        None => Ok(()),
    };
    let _ = std::fs::remove_file(&ctl_path);
    if let Some(why) = failure {
        anyhow::bail!("the protected VM stopped: {why}");
    }
    res.context("logging channel")?;
    Ok(exit)
}

/// The thread that answers the backup's VMNACKs from the VMM stream's store and passes
/// its LEAVE to the role controller (which goes solo in a new epoch).
fn spawn_vmlog_repair(
    dp: &DataPlane,
    vm: &Arc<VmState>,
    key: &crate::channel::auth::ChannelKey,
    stop: &Arc<AtomicBool>,
) -> anyhow::Result<()> {
    let (iface, store, stats, stop2) = (
        dp.nics.logging.clone(),
        vm.log_store.clone(),
        vm.stats.clone(),
        stop.clone(),
    );
    let vm2 = vm.clone();
    let key = key.clone();
    std::thread::Builder::new()
        .name("ft-vmlog-repair".into())
        .spawn(move || {
            let on_leave = Box::new(move |reason: u64| {
                *vm2.leave.lock().unwrap() = Some(leave_reason(reason).into());
            });
            if let Err(e) =
                crate::channel::vmrepair::run(&iface, &key, store, stats, on_leave, stop2)
            {
                error!("VMLOG repair stopped: {e}");
            }
        })?;
    Ok(())
}

/// Graceful stop of the primary: its VMM has stopped and logged END; the channel keeps
/// running (heartbeats announce the last frame, VMNACKs are answered) until the backup
/// acked every VMM entry, so it holds the complete log, or `bound` passes (a backup that
/// is gone or solo mode: nothing to wait for).
async fn wait_for_last_ack(dp: &DataPlane, vm: &VmState, bound: Duration) {
    if vm.solo.load(Relaxed) {
        return;
    }
    let t0 = std::time::Instant::now();
    loop {
        let (last, acked) = (dp.chan_state().vm_last, dp.seq_state().vm_acked);
        if acked >= last {
            info!(last, "the backup acknowledged the whole VMM log");
            return;
        }
        if t0.elapsed() >= bound {
            warn!(
                last,
                acked, "stopping before the backup acknowledged the end of the VMM log"
            );
            return;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Backup whose replica failed (diverged, or its VMM stopped): it must never go live.
/// It stops confirming the log, tells the primary it left, and stays halted (not live,
/// emitting nothing) until an operator replaces it.
fn declare_failed(
    cfg: &Config,
    dp: &DataPlane,
    status: &ChannelStatus,
    roles: &Roles,
    vm: &VmState,
) {
    let reason = if vm.divergence.lock().unwrap().is_some() {
        ft_common::wire::LEAVE_DIVERGED
    } else {
        ft_common::wire::LEAVE_SHUTDOWN
    };
    crate::channel::backup::stop_confirming(dp, status);
    roles.halt(&format!(
        "this backup's replica failed ({}): it stops acking the log; it must be recreated \
         from the primary",
        vm.error.lock().unwrap().clone().unwrap_or_default()
    ));
    let epoch = status.epoch.load(Relaxed);
    if let Ok(sock) = RawSocket::open(&dp.nics.logging) {
        let f = crate::channel::frames::control_frame(
            &cfg.channel.key,
            dp.nics.logging.mac,
            cfg.interfaces.peer_log_mac.0,
            crate::channel::frames::hdr(
                ft_common::wire::KIND_LEAVE,
                status.peer_session.load(Relaxed),
                epoch,
                0,
                reason,
            ),
        );
        // A few times: a lost LEAVE only delays the primary's reaction (it also sees the
        // acks stop).
        for _ in 0..3 {
            let _ = sock.send(&f);
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

/// Why a backup left, from its LEAVE frame.
fn leave_reason(reason: u64) -> &'static str {
    match reason {
        ft_common::wire::LEAVE_DIVERGED => "its replica diverged",
        ft_common::wire::LEAVE_SHUTDOWN => "its VMM stopped",
        ft_common::wire::LEAVE_STALE_SESSION => "it follows another run",
        _ => "unknown reason",
    }
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
