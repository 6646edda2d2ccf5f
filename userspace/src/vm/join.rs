//! Re-protection: a backup joins a primary that runs the VM alone (SOLO), by live state
//! transfer over TCP on the logging link (`channel.join_listen` / `channel.join_peer`).
//!
//! 1. The joining backup knows the live epoch (from the arbiter). The primary greets
//!    every connection with a challenge (16 random bytes); the backup says hello: its
//!    node, epoch, VM configuration hash, a challenge of its own, and an HMAC-SHA256
//!    under the channel key (`[channel] key_file`) of the primary's challenge and its
//!    hello. A hello whose MAC does not verify is refused and counted
//!    (`join_auth_failures`): only a host with the key gets the VM's memory. Otherwise
//!    the primary answers `transfer` (it runs alone, the epoch and configuration match),
//!    `follow-from-boot` (it has not run the VM without a backup: the log starts with
//!    the VM's boot, follow it as usual), `retry` (it still counts on another backup) or
//!    `refused` with the reason (stale epoch, another guest or configuration, halted),
//!    with an HMAC of the backup's challenge and the answer: the backup takes state only
//!    from a primary with the key. (Not protected: the state stream after the answer is
//!    neither encrypted nor MACed; see ARCHITECTURE.md.)
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
    channel::{
        auth::{ChannelKey, fill_random, hex},
        status::ChannelStatus,
    },
    config::Config,
    dataplane::DataPlane,
    netif::RawSocket,
    role::Roles,
};

/// 2: challenge-response under the channel key.
const JOIN_VERSION: u32 = 2;
/// Longest hello or reply line.
const MAX_LINE: u64 = 4096;
/// Random bytes of a challenge.
const NONCE_LEN: usize = 16;
/// Labels of the two MACs (so that one can never pass for the other).
const HELLO_MAC: &str = "ft-join-hello";
const REPLY_MAC: &str = "ft-join-reply";

/// The primary's first line on every connection.
#[derive(Serialize, Deserialize, Debug)]
pub struct Challenge {
    pub version: u32,
    /// Hex, NONCE_LEN fresh random bytes.
    pub nonce: String,
}

#[derive(Serialize, Deserialize, Debug)]
pub struct Hello {
    pub version: u32,
    pub node: String,
    pub epoch: u64,
    pub config_hash: u64,
    /// The joiner's challenge to the primary (hex): the reply's MAC covers it.
    #[serde(default)]
    pub nonce: String,
    /// HMAC-SHA256 (hex) under the channel key of the primary's challenge and this
    /// hello ([`Hello::mac`]).
    #[serde(default)]
    pub mac: String,
}

impl Hello {
    /// This hello with its MAC in answer to `challenge` (the primary's nonce).
    pub fn signed(mut self, key: &ChannelKey, challenge: &str) -> Hello {
        self.mac = self.compute_mac(key, challenge);
        self
    }

    /// The MAC of this hello in answer to `challenge`.
    fn compute_mac(&self, key: &ChannelKey, challenge: &str) -> String {
        let parts = self.mac_parts(challenge);
        key.mac_hex(HELLO_MAC, &parts.each_ref().map(|p| p.as_slice()))
    }

    fn mac_valid(&self, key: &ChannelKey, challenge: &str) -> bool {
        let parts = self.mac_parts(challenge);
        key.verify_hex(
            HELLO_MAC,
            &parts.each_ref().map(|p| p.as_slice()),
            &self.mac,
        )
    }

    fn mac_parts(&self, challenge: &str) -> [Vec<u8>; 6] {
        [
            challenge.as_bytes().to_vec(),
            self.version.to_be_bytes().to_vec(),
            self.node.as_bytes().to_vec(),
            self.epoch.to_be_bytes().to_vec(),
            self.config_hash.to_be_bytes().to_vec(),
            self.nonce.as_bytes().to_vec(),
        ]
    }
}

fn new_nonce() -> String {
    let mut n = [0u8; NONCE_LEN];
    fill_random(&mut n);
    hex(&n)
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
    /// HMAC-SHA256 (hex) of the joiner's challenge, the primary's and the answer; empty
    /// when the hello was not authenticated (a refusal).
    #[serde(default)]
    pub mac: String,
}

impl Reply {
    fn mac_parts(&self, hello_nonce: &str, challenge: &str) -> [Vec<u8>; 4] {
        [
            hello_nonce.as_bytes().to_vec(),
            challenge.as_bytes().to_vec(),
            serde_json::to_vec(&self.answer).unwrap_or_default(),
            self.reason.as_bytes().to_vec(),
        ]
    }

    fn sign(mut self, key: &ChannelKey, hello_nonce: &str, challenge: &str) -> Reply {
        let parts = self.mac_parts(hello_nonce, challenge);
        self.mac = key.mac_hex(REPLY_MAC, &parts.each_ref().map(|p| p.as_slice()));
        self
    }

    fn mac_valid(&self, key: &ChannelKey, hello_nonce: &str, challenge: &str) -> bool {
        let parts = self.mac_parts(hello_nonce, challenge);
        key.verify_hex(
            REPLY_MAC,
            &parts.each_ref().map(|p| p.as_slice()),
            &self.mac,
        )
    }
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

fn read_line(r: &mut impl BufRead) -> std::io::Result<String> {
    let mut s = String::new();
    let n = std::io::Read::take(&mut *r, MAX_LINE).read_line(&mut s)?;
    if n == 0 || !s.ends_with('\n') {
        return Err(std::io::Error::other(
            "the peer closed the join connection or sent an over-long line",
        ));
    }
    Ok(s)
}

fn send_line(w: &mut impl Write, v: &impl Serialize) -> std::io::Result<()> {
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
            return version_refusal(hello.version);
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
        let Some((hello, answer, reason)) =
            serve_handshake(&self.cfg.channel.key, &mut w, &mut r, |h| self.decide(h))?
        else {
            self.vm.join_auth_failures.fetch_add(1, Relaxed);
            warn!(%peer, "join service: refused a hello that is not authenticated (no channel key)");
            return Ok(());
        };
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

/// Why a hello without the right MAC is refused.
const UNAUTHENTICATED: &str = "the join request is not authenticated: the joining host does \
     not hold this node's channel key (both hosts need the same [channel] key_file)";

/// The primary's half of the handshake: its challenge, the backup's hello, the answer
/// (`decide`, for an authenticated hello of this version), MACed under `key`. None: the
/// hello did not prove the key; it was refused (to be counted).
fn serve_handshake(
    key: &ChannelKey,
    w: &mut impl Write,
    r: &mut impl BufRead,
    decide: impl FnOnce(&Hello) -> (Answer, String),
) -> Result<Option<(Hello, Answer, String)>, HandleError> {
    let bad = |e: String| HandleError::BadRequest(e);
    let challenge = new_nonce();
    send_line(
        w,
        &Challenge {
            version: JOIN_VERSION,
            nonce: challenge.clone(),
        },
    )
    .map_err(|e| bad(e.to_string()))?;
    let line = read_line(r).map_err(|e| bad(e.to_string()))?;
    let hello: Hello =
        serde_json::from_str(&line).map_err(|e| bad(format!("not a join hello: {e}")))?;
    let (answer, reason) = if hello.version != JOIN_VERSION {
        version_refusal(hello.version)
    } else if !hello.mac_valid(key, &challenge) {
        // Nothing about this node is told to a host without the key, nothing is sent.
        let reply = Reply {
            answer: Answer::Refused,
            reason: UNAUTHENTICATED.into(),
            mac: String::new(),
        };
        send_line(w, &reply).map_err(|e| bad(e.to_string()))?;
        return Ok(None);
    } else {
        decide(&hello)
    };
    let reply = Reply {
        answer,
        reason: reason.clone(),
        mac: String::new(),
    }
    .sign(key, &hello.nonce, &challenge);
    send_line(w, &reply).map_err(|e| bad(e.to_string()))?;
    Ok(Some((hello, answer, reason)))
}

/// What the joining backup's handshake got.
enum Asked {
    /// The primary's authenticated answer.
    Reply(Reply),
    /// The connection broke before an answer: ask again.
    Retry(String),
}

/// The joining backup's half of the handshake: reads the primary's challenge, says
/// hello with its MAC, and returns the answer if the primary proved the key too. A
/// refusal is reported as an error whether or not it is authenticated (it only stops
/// the join).
fn ask(
    key: &ChannelKey,
    w: &mut impl Write,
    r: &mut impl BufRead,
    node: &str,
    epoch: u64,
    config_hash: u64,
) -> Result<Asked, String> {
    let challenge: Challenge = match read_line(r).map(|l| serde_json::from_str(&l)) {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            return Err(format!(
                "the primary's join greeting is malformed ({e}): run the same ft version on both hosts"
            ));
        }
        Err(e) => return Ok(Asked::Retry(e.to_string())),
    };
    if challenge.version != JOIN_VERSION {
        return Err(format!(
            "the primary speaks join protocol version {}, this node {JOIN_VERSION}: run the same ft version on both hosts",
            challenge.version
        ));
    }
    let mut hello = Hello {
        version: JOIN_VERSION,
        node: node.into(),
        epoch,
        config_hash,
        nonce: new_nonce(),
        mac: String::new(),
    };
    hello.mac = hello.compute_mac(key, &challenge.nonce);
    send_line(w, &hello).map_err(|e| format!("join hello: {e}"))?;
    let reply: Reply = match read_line(r).map(|l| serde_json::from_str(&l)) {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return Err(format!("the primary's join answer is malformed: {e}")),
        Err(e) => return Ok(Asked::Retry(e.to_string())),
    };
    if reply.answer == Answer::Refused {
        return Err(format!("the primary refused the join: {}", reply.reason));
    }
    if !reply.mac_valid(key, &hello.nonce, &challenge.nonce) {
        return Err(
            "the primary's join answer is not authenticated: it does not hold this node's \
             channel key (both hosts need the same [channel] key_file); not taking state from it"
                .into(),
        );
    }
    Ok(Asked::Reply(reply))
}

fn version_refusal(version: u32) -> (Answer, String) {
    (
        Answer::Refused,
        format!(
            "join protocol version {version} (this primary speaks {JOIN_VERSION}): run the same ft version on both hosts"
        ),
    )
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
        let reply = match ask(
            &cfg.channel.key,
            &mut w,
            &mut r,
            &cfg.node.name,
            epoch,
            config_hash,
        )? {
            Asked::Reply(reply) => reply,
            Asked::Retry(e) => {
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

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixStream;

    use super::*;

    fn key(b: u8) -> ChannelKey {
        ChannelKey::from_bytes([b; 16])
    }

    /// What the primary's handshake got: the authenticated hello and answer, None when
    /// refused as unauthenticated, or the bad request.
    type Served = Result<Option<(Hello, Answer, String)>, String>;

    /// Runs the primary's handshake on one end of a socket pair (answering `transfer`)
    /// and `client` on the other; returns what both got.
    fn handshake<T: Send + 'static>(
        primary_key: ChannelKey,
        client: impl FnOnce(&mut UnixStream, &mut BufReader<UnixStream>) -> T + Send + 'static,
    ) -> (Served, T) {
        let (a, b) = UnixStream::pair().unwrap();
        let c = std::thread::spawn(move || {
            let mut w = b.try_clone().unwrap();
            let mut r = BufReader::new(b);
            client(&mut w, &mut r)
        });
        let mut w = a.try_clone().unwrap();
        let mut r = BufReader::new(a);
        let served = serve_handshake(&primary_key, &mut w, &mut r, |h| {
            assert_eq!(h.node, "host-b");
            (Answer::Transfer, String::new())
        })
        .map_err(|e| match e {
            HandleError::BadRequest(e) | HandleError::Failed(e) => e,
        });
        drop((w, r));
        (served, c.join().unwrap())
    }

    fn ask_as(
        k: ChannelKey,
    ) -> impl FnOnce(&mut UnixStream, &mut BufReader<UnixStream>) -> Result<Asked, String> {
        move |w, r| ask(&k, w, r, "host-b", 7, 0x1234)
    }

    #[test]
    fn a_backup_with_the_key_is_answered_and_checks_the_answer() {
        let (served, asked) = handshake(key(1), ask_as(key(1)));
        let (hello, answer, _) = served.unwrap().expect("authenticated");
        assert_eq!((hello.epoch, hello.config_hash), (7, 0x1234));
        assert_eq!(answer, Answer::Transfer);
        match asked.unwrap() {
            Asked::Reply(r) => assert_eq!(r.answer, Answer::Transfer),
            Asked::Retry(e) => panic!("retry: {e}"),
        }
    }

    #[test]
    fn a_hello_without_the_key_is_refused_before_anything_is_decided() {
        // Another key.
        let (served, asked) = handshake(key(1), ask_as(key(2)));
        assert!(served.unwrap().is_none(), "refused as unauthenticated");
        let e = asked.err().expect("the joiner sees the refusal");
        assert!(
            e.contains("not authenticated") && e.contains("key_file"),
            "{e}"
        );
        // No MAC at all (the version-1 hello of an intruder, with this version).
        let (served, reply) = handshake(key(1), |w, r| {
            let _challenge = read_line(r).unwrap();
            w.write_all(b"{\"version\":2,\"node\":\"host-b\",\"epoch\":7,\"config_hash\":4660}\n")
                .unwrap();
            read_line(r).unwrap()
        });
        assert!(served.unwrap().is_none());
        assert!(
            reply.contains("refused") && reply.contains("not authenticated"),
            "{reply}"
        );
        // A MAC made for another challenge (a replayed hello).
        let (served, _) = handshake(key(1), |w, r| {
            let _challenge = read_line(r).unwrap();
            let mut h = Hello {
                version: JOIN_VERSION,
                node: "host-b".into(),
                epoch: 7,
                config_hash: 0x1234,
                nonce: new_nonce(),
                mac: String::new(),
            };
            h.mac = h.compute_mac(&key(1), "an earlier challenge");
            send_line(w, &h).unwrap();
            read_line(r)
        });
        assert!(served.unwrap().is_none(), "a replayed hello is refused");
    }

    #[test]
    fn an_old_version_is_refused_by_name_and_garbage_is_a_bad_request() {
        let (served, reply) = handshake(key(1), |w, r| {
            let _challenge = read_line(r).unwrap();
            w.write_all(b"{\"version\":1,\"node\":\"x\",\"epoch\":7,\"config_hash\":1}\n")
                .unwrap();
            read_line(r).unwrap()
        });
        let (_, answer, reason) = served.unwrap().expect("answered");
        assert_eq!(answer, Answer::Refused);
        assert!(reason.contains("join protocol version 1"), "{reason}");
        assert!(reply.contains("join protocol version 1"), "{reply}");
        let (served, _) = handshake(key(1), |w, r| {
            let _challenge = read_line(r).unwrap();
            w.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
        });
        assert!(served.unwrap_err().contains("not a join hello"));
    }

    #[test]
    fn a_joiner_takes_no_state_from_a_primary_without_the_key() {
        // A fake primary: answers `transfer` with a MAC under another key.
        let (a, b) = UnixStream::pair().unwrap();
        let fake = std::thread::spawn(move || {
            let mut w = a.try_clone().unwrap();
            let mut r = BufReader::new(a);
            let challenge = new_nonce();
            send_line(
                &mut w,
                &Challenge {
                    version: JOIN_VERSION,
                    nonce: challenge.clone(),
                },
            )
            .unwrap();
            let hello: Hello = serde_json::from_str(&read_line(&mut r).unwrap()).unwrap();
            let reply = Reply {
                answer: Answer::Transfer,
                reason: String::new(),
                mac: String::new(),
            }
            .sign(&key(9), &hello.nonce, &challenge);
            send_line(&mut w, &reply).unwrap();
        });
        let mut w = b.try_clone().unwrap();
        let mut r = BufReader::new(b);
        let e = ask(&key(1), &mut w, &mut r, "host-b", 7, 1)
            .err()
            .expect("refused to take state");
        assert!(e.contains("not authenticated"), "{e}");
        fake.join().unwrap();
    }
}
