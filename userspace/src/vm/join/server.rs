//! The live node's join service: accepts one joining backup at a time on
//! `channel.join_listen`, answers by `policy`, and on `transfer` streams the running VM's
//! state. At the cut (on the vCPU thread, at the guest exit where the new log starts) it
//! asks the role supervisor to pair: the node becomes PRIMARY from that exit on (input
//! is numbered and duplicated, output waits for the new backup's acks), and the cut's
//! positions end the stream.
//!
//! A transfer that fails before the cut changes nothing. One that fails after it (the
//! backup died while restoring, the link broke) leaves the primary waiting for acks that
//! will not come: the supervisor sees the backup fail and goes solo in a new epoch; the
//! half-joined backup then follows a stale epoch and can never take over.
use std::{
    io::BufReader,
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering::Relaxed},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use ft_vmm::transfer::{CutHook, Progress, TransferOptions};
use serde_json::json;
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::{
    policy::{self, NodeView},
    protocol::{
        Answer, Answered, BadRequest, CONFIRM_TIMEOUT, Confirm, CutInfo, Hello, read_line,
        serve_handshake,
    },
    secure,
};
use crate::{
    channel::status::ChannelStatus,
    config::Config,
    dataplane::DataPlane,
    netif::RawSocket,
    role::{PairRequest, Roles},
    vm::{VmPhase, VmState, sink},
};

enum HandleError {
    /// Not a join request that can be answered (malformed, over-long, a dead connection).
    BadRequest(String),
    /// A join that failed.
    Failed(String),
}

impl From<BadRequest> for HandleError {
    fn from(BadRequest(e): BadRequest) -> Self {
        HandleError::BadRequest(e)
    }
}

/// How long the cut waits for the supervisor's answer (it runs on the tokio runtime;
/// the guest stands still at the cut meanwhile).
const PAIR_TIMEOUT: Duration = Duration::from_secs(1);

/// The live node's side: accepts one joining backup at a time.
pub struct JoinServer {
    pub cfg: Config,
    pub dp: Arc<DataPlane>,
    pub status: Arc<ChannelStatus>,
    pub roles: Arc<Roles>,
    pub vm: Arc<VmState>,
    /// The cut's request to the role supervisor to pair.
    pub pair: mpsc::UnboundedSender<PairRequest>,
    /// The daemon stops (also the new log's sink waits end on it).
    pub stop: Arc<AtomicBool>,
    pub vm_stop: Arc<AtomicBool>,
}

impl JoinServer {
    pub fn spawn(self) -> anyhow::Result<JoinHandle<()>> {
        let addr: SocketAddr = self.cfg.channel.join_listen.parse()?;
        let listener = TcpListener::bind(addr).map_err(|e| {
            anyhow::anyhow!(
                "cannot listen for joining backups on {addr} (channel.join_listen): {e}; it must be an address of this host's logging NIC"
            )
        })?;
        listener.set_nonblocking(true)?;
        info!(%addr, "accepting joining backups");
        Ok(std::thread::Builder::new()
            .name("ft-join".into())
            .spawn(move || self.run(listener))?)
    }

    fn run(self, listener: TcpListener) {
        while !self.stop.load(Relaxed) {
            match listener.accept() {
                Ok((s, peer)) => {
                    let started = crate::role::unix_ms();
                    match self.handle(s, peer, started) {
                        Ok(()) => {}
                        // Not a joining backup (or a broken one): counted, not recorded as
                        // a join.
                        Err(HandleError::BadRequest(e)) => {
                            self.vm.join_bad_requests.fetch_add(1, Relaxed);
                            warn!(%peer, "join service: dropped a bad request: {e}");
                        }
                        Err(HandleError::Failed(e)) => {
                            warn!(%peer, "join: {e}");
                            *self.vm.join.lock().unwrap() = Some(json!({
                                "peer": peer.to_string(), "phase": "failed", "error": e,
                                "started_unix_ms": started,
                            }));
                        }
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => {
                    warn!("join listener: {e}");
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
    }

    /// What to tell a joining backup that says `hello`.
    fn decide(&self, hello: &Hello) -> (Answer, String) {
        policy::decide(
            hello,
            &NodeView {
                role: self.roles.current(),
                phase: self.vm.phase(),
                config_hash: self.vm.config_hash.load(Relaxed),
                joined: self.vm.joined(),
                ran_alone: self.vm.has_run_alone(),
                acked_by_a_backup: self.dp.seq_state().last_peer_ns != 0,
            },
        )
    }

    fn handle(&self, s: TcpStream, peer: SocketAddr, started: u64) -> Result<(), HandleError> {
        let bad = |e: String| HandleError::BadRequest(e);
        s.set_nonblocking(false).map_err(|e| bad(e.to_string()))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| bad(e.to_string()))?;
        s.set_write_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| bad(e.to_string()))?;
        let _ = s.set_nodelay(true);
        let mut w = s.try_clone().map_err(|e| bad(e.to_string()))?;
        let mut r = BufReader::new(s);
        let session = self.status.session.load(Relaxed);
        let keys = self.cfg.channel.keys.all();
        let Some(answered) = serve_handshake(&keys, session, &mut w, &mut r, |h| self.decide(h))
            .map_err(HandleError::from)?
        else {
            self.vm.join_auth_failures.fetch_add(1, Relaxed);
            warn!(%peer, "join service: refused a hello that is not authenticated (no channel key)");
            return Ok(());
        };
        self.transfer(answered, w, r, peer, started)
            .map_err(HandleError::Failed)
    }

    /// After the answer: nothing more, or the state transfer (inside the Noise session
    /// bound to this handshake).
    fn transfer(
        &self,
        answered: Answered,
        w: TcpStream,
        r: BufReader<TcpStream>,
        peer: SocketAddr,
        started: u64,
    ) -> Result<(), String> {
        let Answered {
            hello,
            answer,
            reason,
            binding,
            key,
        } = answered;
        if answer != Answer::Transfer {
            info!(%peer, node = %hello.node, ?answer, %reason, "join request answered");
            return Ok(());
        }
        let tcp = w.try_clone().map_err(|e| e.to_string())?;
        let session = secure::respond(&key, &binding, w, r).map_err(|e| {
            self.vm.join_auth_failures.fetch_add(1, Relaxed);
            e.to_string()
        })?;
        let (w, mut r) = (session.writer, BufReader::new(session.reader));
        let src = self
            .vm
            .transfer
            .lock()
            .unwrap()
            .clone()
            .ok_or("the VMM offers no state transfer")?;
        // The joiner's epoch: the policy answered `transfer` only while this node ran
        // alone in it, and the cut pairs only while it still does.
        let epoch = hello.epoch;
        let next_seq = self.dp.chan_state().vm_last + 1;
        let new_sink = sink::ChannelSink {
            dp: self.dp.clone(),
            sock: RawSocket::open(&self.dp.nics.logging).map_err(|e| e.to_string())?,
            src: self.dp.nics.logging.mac,
            dst: self.cfg.interfaces.peer_log_mac.0,
            session: self.status.session.load(Relaxed),
            keys: self.cfg.channel.keys.clone(),
            epoch,
            window: self.cfg.channel.vmlog_window,
            store: self.vm.log_store.clone(),
            stats: self.vm.stats.clone(),
            stop: self.vm_stop.clone(),
            roles: self.roles.clone(),
            buf: Vec::with_capacity(ft_common::wire::MAX_FRAME),
            fault: crate::fault::CorruptClock::from_env(),
            next_seq,
        };
        let cut_ran = Arc::new(AtomicBool::new(false));
        let hook: CutHook = {
            let (dp, pair, status, vm) = (
                self.dp.clone(),
                self.pair.clone(),
                self.status.clone(),
                self.vm.clone(),
            );
            let (ran, joiner) = (cut_ran.clone(), hello.node.clone());
            Box::new(move |vmm: &mut ft_vmm::Vmm| {
                let terr = |m: String| ft_vmm::Error::Transfer(m);
                let (seq, chan) = (dp.seq_state(), dp.chan_state());
                if chan.vm_last + 1 != next_seq {
                    return Err(terr(format!(
                        "the VMM stream moved on ({} != {next_seq})",
                        chan.vm_last + 1
                    )));
                }
                // The role supervisor pairs (SOLO -> PRIMARY at this exit): from here on
                // input is numbered and duplicated, and the new backup's first ack names
                // the cut's positions (it got the state that includes everything logged
                // so far); XDP moves `acked` there.
                let (tx, rx) = std::sync::mpsc::sync_channel(1);
                pair.send(PairRequest {
                    joiner: joiner.clone(),
                    epoch,
                    exit: vmm.exits(),
                    deadline: Instant::now() + PAIR_TIMEOUT,
                    reply: tx,
                })
                .map_err(|_| terr("the role supervisor is gone".into()))?;
                // A little past the deadline: an answer decided before it is never lost.
                let epoch = match rx.recv_timeout(PAIR_TIMEOUT + Duration::from_millis(500)) {
                    Ok(Ok(epoch)) => epoch,
                    Ok(Err(why)) => return Err(terr(why)),
                    Err(_) => {
                        return Err(terr(format!(
                            "the role supervisor did not pair within {PAIR_TIMEOUT:?}"
                        )));
                    }
                };
                ran.store(true, Relaxed);
                // From this exit on the VMM records (it ran free, or recorded for
                // nobody): a new log for the new backup.
                vm.set_phase(VmPhase::Recording);
                let cut = CutInfo {
                    input_start: seq.last_seq + 1,
                    vm_start: next_seq,
                    epoch,
                    session: status.session.load(Relaxed),
                };
                serde_json::to_vec(&cut).map_err(|e| terr(e.to_string()))
            })
        };
        info!(%peer, node = %hello.node, "a backup joins: transferring the VM's state");
        let t0 = Instant::now();
        let vm = self.vm.clone();
        let who = hello.node.clone();
        let res = src.send(
            Box::new(w),
            Box::new(new_sink),
            Some(hook),
            &TransferOptions::default(),
            &mut |p: &Progress| {
                *vm.join.lock().unwrap() = Some(progress_json(&who, started, p));
            },
        );
        // The backup confirms it holds the whole state (a link cut after the stop phase
        // is noticed here, at once, instead of by the missing first ack).
        let res = res.and_then(|rep| {
            let _ = tcp.set_read_timeout(Some(CONFIRM_TIMEOUT));
            match read_line(&mut r).map(|l| serde_json::from_str::<Confirm>(&l)) {
                Ok(Ok(Confirm { received: true })) => Ok(rep),
                other => Err(ft_vmm::Error::Transfer(format!(
                    "the backup did not confirm the state ({other:?})"
                ))),
            }
        });
        match res {
            Ok(rep) => {
                info!(
                    node = %hello.node,
                    pause_ms = rep.pause.as_secs_f64() * 1e3,
                    total_ms = rep.total.as_secs_f64() * 1e3,
                    mib = rep.bytes_sent >> 20,
                    rounds = rep.rounds,
                    cut_exit = rep.cut_exit,
                    "state transferred: the new backup replays from the cut"
                );
                *self.vm.join.lock().unwrap() = Some(json!({
                    "peer": hello.node, "phase": "done",
                    "pause_ms": rep.pause.as_secs_f64() * 1e3,
                    "total_ms": rep.total.as_secs_f64() * 1e3,
                    "bytes": rep.bytes_sent, "rounds": rep.rounds,
                    "cut_exit": rep.cut_exit, "frames_at_cut": rep.precut_frames,
                    "stop_pages": rep.stop_pages,
                    "stop_wait_ms": rep.stop_wait.as_secs_f64() * 1e3,
                    "pause_parts_ms": rep.pause_parts.iter()
                        .map(|(k, d)| (k.to_string(), json!(d.as_secs_f64() * 1e3)))
                        .collect::<serde_json::Map<_, _>>(),
                    "at_unix_ms": crate::role::unix_ms(), "started_unix_ms": started,
                }));
                self.vm.count_join(epoch, rep.pause);
                Ok(())
            }
            Err(e) => {
                if cut_ran.load(Relaxed) {
                    // Output now waits for a backup that may never ack: the role
                    // supervisor goes solo in a new epoch (the half-joined backup then
                    // follows a stale one).
                    *self.vm.leave.lock().unwrap() = Some(format!(
                        "the joining backup did not complete the transfer ({e})"
                    ));
                }
                Err(format!(
                    "transfer to {} failed after {:?}: {e}",
                    hello.node,
                    t0.elapsed()
                ))
            }
        }
    }
}

pub(super) fn progress_json(peer: &str, started: u64, p: &Progress) -> serde_json::Value {
    json!({
        "peer": peer,
        "started_unix_ms": started,
        "phase": if p.round == u32::MAX { "stopping".to_string() } else { format!("pre-copy round {}", p.round) },
        "bytes_sent": p.bytes_sent,
        "pages_sent": p.pages_sent,
        "ram_pages": p.ram_pages,
        "dirty_pages_last_round": p.last_dirty_pages,
        "dirty_pages_per_s": p.dirty_rate,
        "elapsed_s": p.elapsed.as_secs_f64(),
        "remaining_s": p.remaining.as_secs_f64(),
    })
}
