//! Re-protection: a backup joins a primary that runs the VM alone (SOLO), by live state
//! transfer over TCP on the logging link (`channel.join_listen` / `channel.join_peer`).
//!
//! 1. The joining backup knows the live epoch (from the arbiter) and says hello: its
//!    node, epoch and VM configuration hash. The primary answers `transfer` (it runs
//!    alone, the epoch and configuration match), `follow-from-boot` (it has not run the
//!    VM without a backup: the log starts with the VM's boot, follow it as usual),
//!    `retry` (it still counts on another backup) or `refused` with the reason (stale
//!    epoch, another guest or configuration, halted).
//! 2. On `transfer` the VMM's state streams over (pre-copy while the VM runs, then the
//!    stop at a guest exit; `ft_vmm::transfer`). At the cut, on the vCPU thread, the
//!    primary's hook switches the data plane to PRIMARY: from that exit on, input is
//!    duplicated and logged, and output waits for the new backup's acks; its first ack
//!    names the cut's positions (it got the state that includes everything logged
//!    before), which releases what was held for the old backup. The hook's answer (`CutInfo`: where both streams start, epoch, session)
//!    ends the stream.
//! 3. The backup restores the state, starts its channel at those positions and replays.
//!    The primary's role controller pairs it at the arbiter (same epoch) and watches
//!    its progress as for any backup, with a grace period for the first ack.
//!
//! A transfer that fails before the cut changes nothing on the primary. One that fails
//! after it (the backup died while restoring, the link broke) leaves the primary waiting
//! for acks that will not come: its role controller sees no progress and goes solo in a
//! new epoch, as when a backup dies; the half-joined backup then follows a stale epoch
//! and can never take over.
use std::{
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use ft_common::maps::{NodeState, ROLE_PRIMARY, ROLE_SOLO, ROLE_STANDBY};
use ft_vmm::transfer::{CutHook, Progress, TransferOptions};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tracing::{info, warn};

use super::{VmState, sink};
use crate::{
    channel::status::ChannelStatus, config::Config, dataplane::DataPlane, netif::RawSocket,
    role::Roles,
};

const JOIN_VERSION: u32 = 1;
/// Longest hello or reply line.
const MAX_LINE: u64 = 4096;

#[derive(Serialize, Deserialize, Debug)]
pub struct Hello {
    pub version: u32,
    pub node: String,
    pub epoch: u64,
    pub config_hash: u64,
}

#[derive(Serialize, Deserialize, Debug, PartialEq, Eq, Clone, Copy)]
#[serde(rename_all = "kebab-case")]
pub enum Answer {
    Transfer,
    FollowFromBoot,
    Retry,
    Refused,
}

#[derive(Serialize, Deserialize, Debug)]
pub struct Reply {
    pub answer: Answer,
    pub reason: String,
}

/// The joining backup's last word: it holds the whole state.
#[derive(Serialize, Deserialize, Debug)]
pub struct Confirm {
    pub received: bool,
}

/// How long the primary waits for `Confirm` after the stop phase (the backup only reads
/// the rest of the stream and the machine state by then).
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(2);

/// What the primary's hook says at the cut.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct CutInfo {
    /// First input-stream sequence of the new log.
    pub input_start: u64,
    /// First VMM-stream sequence of the new log.
    pub vm_start: u64,
    pub epoch: u64,
    /// The primary's session (its log frames carry it; acks must name it).
    pub session: u64,
}

fn read_line(r: &mut BufReader<TcpStream>) -> std::io::Result<String> {
    let mut s = String::new();
    let n = std::io::Read::take(&mut *r, MAX_LINE).read_line(&mut s)?;
    if n == 0 || !s.ends_with('\n') {
        return Err(std::io::Error::other(
            "the peer closed the join connection or sent an over-long line",
        ));
    }
    Ok(s)
}

fn send_line(w: &mut TcpStream, v: &impl Serialize) -> std::io::Result<()> {
    let mut b = serde_json::to_vec(v).map_err(std::io::Error::other)?;
    b.push(b'\n');
    w.write_all(&b)
}

enum HandleError {
    /// Not a join request that can be answered (malformed, over-long, a dead connection).
    BadRequest(String),
    /// A join that failed.
    Failed(String),
}

/// The primary's side: accepts one joining backup at a time.
pub struct JoinServer {
    pub cfg: Config,
    pub dp: Arc<DataPlane>,
    pub status: Arc<ChannelStatus>,
    pub roles: Arc<Roles>,
    pub vm: Arc<VmState>,
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
        if hello.version != JOIN_VERSION {
            return (
                Answer::Refused,
                format!(
                    "join protocol version {} (this primary speaks {JOIN_VERSION}): run the same ft version on both hosts",
                    hello.version
                ),
            );
        }
        if self.status.halted.load(Relaxed) {
            return (Answer::Refused, "this node halted".into());
        }
        let Ok(node) = self.dp.node_state() else {
            return (Answer::Retry, "the data plane is not readable".into());
        };
        let phase = self.vm.phase.lock().unwrap().clone();
        match node.role {
            ROLE_STANDBY => (
                Answer::FollowFromBoot,
                "this node is not live yet: its VM boots with the log".into(),
            ),
            ROLE_PRIMARY
                if self.vm.joined.load(Relaxed) == 0
                    && !self.vm.ran_alone.load(Relaxed)
                    && self.dp.seq_state().last_peer_ns == 0 =>
            {
                (
                    Answer::FollowFromBoot,
                    "this primary logs from the VM's boot and no backup has acked it yet".into(),
                )
            }
            ROLE_PRIMARY => (
                Answer::Retry,
                "this primary still counts on its backup (it goes solo when that one stops making progress)".into(),
            ),
            ROLE_SOLO if node.epoch != hello.epoch => (
                Answer::Refused,
                format!(
                    "stale epoch: the joining backup follows epoch {}, this primary runs epoch {}; it must read the epoch from the arbiter again",
                    hello.epoch, node.epoch
                ),
            ),
            ROLE_SOLO if hello.config_hash != self.vm.config_hash.load(Relaxed) => (
                Answer::Refused,
                format!(
                    "another guest image or VM configuration: the joining backup's configuration hash is {:#x}, this primary's {:#x}; use the same vm.image and [vm] settings on both hosts",
                    hello.config_hash,
                    self.vm.config_hash.load(Relaxed)
                ),
            ),
            ROLE_SOLO if phase != "live" && phase != "recording" && phase != "running unprotected" => (
                Answer::Retry,
                format!("the VM is not running ({phase})"),
            ),
            ROLE_SOLO => (Answer::Transfer, String::new()),
            r => (Answer::Refused, format!("unexpected role {r}")),
        }
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
        let line = read_line(&mut r).map_err(|e| bad(e.to_string()))?;
        let hello: Hello =
            serde_json::from_str(&line).map_err(|e| bad(format!("not a join hello: {e}")))?;
        let (answer, reason) = self.decide(&hello);
        send_line(
            &mut w,
            &Reply {
                answer,
                reason: reason.clone(),
            },
        )
        .map_err(|e| bad(e.to_string()))?;
        self.transfer(hello, answer, reason, w, r, peer, started)
            .map_err(HandleError::Failed)
    }

    /// After the answer: nothing more, or the state transfer.
    #[allow(clippy::too_many_arguments)]
    fn transfer(
        &self,
        hello: Hello,
        answer: Answer,
        reason: String,
        w: TcpStream,
        mut r: BufReader<TcpStream>,
        peer: SocketAddr,
        started: u64,
    ) -> Result<(), String> {
        if answer != Answer::Transfer {
            info!(%peer, node = %hello.node, ?answer, %reason, "join request answered");
            return Ok(());
        }
        let src = self
            .vm
            .transfer
            .lock()
            .unwrap()
            .clone()
            .ok_or("the VMM offers no state transfer")?;
        let node = self.dp.node_state().map_err(|e| e.to_string())?;
        let next_seq = self.dp.chan_state().vm_last + 1;
        let new_sink = sink::ChannelSink {
            dp: self.dp.clone(),
            sock: RawSocket::open(&self.dp.nics.logging).map_err(|e| e.to_string())?,
            src: self.dp.nics.logging.mac,
            dst: self.cfg.interfaces.peer_log_mac.0,
            session: self.status.session.load(Relaxed),
            epoch: Arc::new(AtomicU64::new(node.epoch)),
            window: self.cfg.channel.vmlog_window,
            store: self.vm.log_store.clone(),
            stats: self.vm.stats.clone(),
            stop: self.vm_stop.clone(),
            solo: self.vm.solo.clone(),
            buf: Vec::with_capacity(ft_common::wire::MAX_FRAME),
            next_seq,
        };
        let cut_ran = Arc::new(AtomicBool::new(false));
        let hook: CutHook = {
            let (dp, roles, vm, status) = (
                self.dp.clone(),
                self.roles.clone(),
                self.vm.clone(),
                self.status.clone(),
            );
            let (ran, joiner) = (cut_ran.clone(), hello.node.clone());
            Box::new(move |vmm: &mut ft_vmm::Vmm| {
                let terr = |m: String| ft_vmm::Error::Transfer(m);
                let node = dp.node_state().map_err(|e| terr(e.to_string()))?;
                if node.role != ROLE_SOLO || status.halted.load(Relaxed) {
                    return Err(terr("this node no longer runs alone".into()));
                }
                let (seq, chan) = (dp.seq_state(), dp.chan_state());
                if chan.vm_last + 1 != next_seq {
                    return Err(terr(format!(
                        "the VMM stream moved on ({} != {next_seq})",
                        chan.vm_last + 1
                    )));
                }
                // The new backup's first ack names the cut's positions (it got the state
                // that includes everything logged so far); XDP moves `acked` there.
                vm.solo.store(false, Relaxed);
                ran.store(true, Relaxed);
                roles
                    .set(
                        NodeState {
                            role: ROLE_PRIMARY,
                            ..node
                        },
                        &format!(
                            "{joiner} joined by state transfer: the log starts at exit {}",
                            vmm.exits()
                        ),
                    )
                    .map_err(|e| terr(e.to_string()))?;
                let cut = CutInfo {
                    input_start: seq.last_seq + 1,
                    vm_start: next_seq,
                    epoch: node.epoch,
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
            let _ = r.get_ref().set_read_timeout(Some(CONFIRM_TIMEOUT));
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
                self.vm
                    .last_join_pause_ns
                    .store(rep.pause.as_nanos() as u64, Relaxed);
                self.vm.joined.fetch_add(1, Relaxed);
                Ok(())
            }
            Err(e) => {
                if cut_ran.load(Relaxed) {
                    // Output now waits for a backup that may never ack: the role
                    // controller goes solo in a new epoch (the half-joined backup then
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

fn progress_json(peer: &str, started: u64, p: &Progress) -> serde_json::Value {
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

/// What a joining backup got.
pub enum Joined {
    /// Follow the log from the VM's boot, as always.
    FromBoot,
    /// The state at the cut, and where the log starts.
    Transfer { vmm: Box<ft_vmm::Vmm>, cut: CutInfo },
}

/// The backup's side: asks `channel.join_peer` until the primary answers, then either
/// follows the log from boot or receives the state. `epoch` is the live epoch the
/// backup follows (known from the arbiter); `vcfg` must be in replay mode.
#[allow(clippy::too_many_arguments)]
pub fn join(
    cfg: &Config,
    vcfg: ft_vmm::VmmConfig,
    image: &[u8],
    control: Arc<ft_vmm::Control>,
    store: Arc<dyn ft_vmm::vmlog::FrameStore>,
    epoch: u64,
    vm: &VmState,
    stop: &AtomicBool,
) -> Result<Joined, String> {
    let peer: SocketAddr = cfg
        .channel
        .join_peer
        .parse()
        .map_err(|e| format!("channel.join_peer: {e}"))?;
    let config_hash = vcfg.config_hash(image);
    let mut waited_since = None;
    loop {
        if stop.load(Relaxed) {
            return Err("ftd is stopping".into());
        }
        let s = match TcpStream::connect_timeout(&peer, Duration::from_secs(1)) {
            Ok(s) => s,
            Err(e) => {
                let since = *waited_since.get_or_insert_with(Instant::now);
                vm.set_phase("joining: the primary's join service does not answer");
                if since.elapsed() > Duration::from_secs(2) {
                    warn!(%peer, "join: {e}; retrying");
                    waited_since = Some(Instant::now());
                }
                std::thread::sleep(Duration::from_millis(200));
                continue;
            }
        };
        let _ = s.set_nodelay(true);
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(|e| e.to_string())?;
        let mut w = s.try_clone().map_err(|e| e.to_string())?;
        let mut r = BufReader::new(s);
        send_line(
            &mut w,
            &Hello {
                version: JOIN_VERSION,
                node: cfg.node.name.clone(),
                epoch,
                config_hash,
            },
        )
        .map_err(|e| format!("join hello to {peer}: {e}"))?;
        let reply: Reply = match read_line(&mut r).map(|l| serde_json::from_str(&l)) {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => return Err(format!("the primary's join answer is malformed: {e}")),
            Err(e) => {
                warn!(%peer, "join: {e}; retrying");
                std::thread::sleep(Duration::from_millis(200));
                continue;
            }
        };
        match reply.answer {
            Answer::FollowFromBoot => {
                info!(reason = %reply.reason, "join: following the log from the VM's boot");
                return Ok(Joined::FromBoot);
            }
            Answer::Retry => {
                vm.set_phase(&format!(
                    "joining: the primary asks to retry ({})",
                    reply.reason
                ));
                std::thread::sleep(Duration::from_millis(200));
            }
            Answer::Refused => {
                return Err(format!("the primary refused the join: {}", reply.reason));
            }
            Answer::Transfer => {
                let started = crate::role::unix_ms();
                vm.set_phase("joining: receiving the VM's state");
                info!(%peer, "join: receiving the VM's state");
                let (vmm, rep) = ft_vmm::Vmm::receive(
                    vcfg,
                    image,
                    control,
                    &mut r,
                    Some(store),
                    &mut |p: &Progress| {
                        *vm.join.lock().unwrap() = Some(progress_json("primary", started, p));
                    },
                )
                .map_err(|e| e.to_string())?;
                let cut: CutInfo = serde_json::from_slice(&rep.cut_info)
                    .map_err(|e| format!("the primary's cut information is malformed: {e}"))?;
                send_line(&mut w, &Confirm { received: true })
                    .map_err(|e| format!("cannot confirm the state to the primary: {e}"))?;
                info!(
                    ?cut,
                    cut_exit = rep.cut_exit,
                    mib = rep.bytes_sent >> 20,
                    "join: state received; replaying from the cut"
                );
                *vm.join.lock().unwrap() = Some(json!({
                    "peer": "primary", "phase": "done", "bytes": rep.bytes_sent,
                    "started_unix_ms": started, "total_ms": rep.total.as_secs_f64() * 1e3,
                    "cut_exit": rep.cut_exit, "frames_at_cut": rep.precut_frames,
                    "input_start": cut.input_start, "vm_start": cut.vm_start,
                }));
                return Ok(Joined::Transfer {
                    vmm: Box::new(vmm),
                    cut,
                });
            }
        }
    }
}
