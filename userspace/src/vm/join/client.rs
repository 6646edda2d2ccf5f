//! The joining backup's side: asks the live node (`channel.join_peer`) until it answers,
//! then follows the log from the VM's boot or receives the running VM's state. The
//! epoch it says it follows is read from the role supervisor at every attempt: while the
//! backup has no state, the supervisor follows the live node's epoch as it moves (a
//! joiner told `retry` after the live node went solo in a new epoch asks again at that
//! epoch, and joins).
use std::{
    io::{BufReader, Write},
    net::{SocketAddr, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use ft_vmm::transfer::Progress;
use serde_json::json;
use tracing::{info, warn};

use super::{
    protocol::{Answer, Asked, Confirm, CutInfo, ask, send_line},
    secure,
    server::progress_json,
};
use crate::{
    config::Config,
    role::Roles,
    vm::{VmPhase, VmState},
};

/// What a joining backup got.
pub enum Joined {
    /// Follow the log from the VM's boot, as always: the frames of `session` only (the
    /// live node named it in its authenticated answer).
    FromBoot { session: u64 },
    /// The state at the cut, and where the log starts.
    Transfer { vmm: Box<ft_vmm::Vmm>, cut: CutInfo },
}

/// Why a join ended without a VM.
#[derive(Debug)]
pub enum JoinError {
    /// The live node refused for a reason a restart does not change (another guest or
    /// VM configuration, another protocol version, no channel key): the operator must
    /// act.
    Refused(String),
    /// The daemon stops, or the transfer broke (a restart tries again).
    Failed(String),
}

/// Asks until the live node answers `transfer` or `follow-from-boot` (`retry` and a
/// broken connection are asked again). `vcfg` must be in replay mode.
#[allow(clippy::too_many_arguments)]
pub fn join(
    cfg: &Config,
    vcfg: ft_vmm::VmmConfig,
    image: &[u8],
    control: Arc<ft_vmm::Control>,
    store: Arc<dyn ft_vmm::vmlog::FrameStore>,
    roles: &Roles,
    vm: &VmState,
    stop: &AtomicBool,
) -> Result<Joined, JoinError> {
    let peer: SocketAddr = cfg
        .channel
        .join_peer
        .parse()
        .map_err(|e| JoinError::Refused(format!("channel.join_peer: {e}")))?;
    let config_hash = vcfg.config_hash(image);
    let mut waited_since = None;
    let mut attempt = 0usize;
    let pause = Duration::from_millis(200);
    loop {
        if stop.load(Relaxed) {
            return Err(JoinError::Failed("ftd is stopping".into()));
        }
        let s = match TcpStream::connect_timeout(&peer, Duration::from_secs(1)) {
            Ok(s) => s,
            Err(e) => {
                let since = *waited_since.get_or_insert_with(Instant::now);
                vm.set_phase(VmPhase::Joining(format!(
                    "the live node's join service ({peer}) does not answer"
                )));
                if since.elapsed() > Duration::from_secs(2) {
                    warn!(%peer, "join: {e}; retrying");
                    waited_since = Some(Instant::now());
                }
                std::thread::sleep(pause);
                continue;
            }
        };
        let _ = s.set_nodelay(true);
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(|e| JoinError::Failed(e.to_string()))?;
        let mut w = s
            .try_clone()
            .map_err(|e| JoinError::Failed(e.to_string()))?;
        let mut r = BufReader::new(s);
        // The epoch the supervisor follows now (it moves with the live node while this
        // backup has no state).
        let epoch = roles.epoch();
        // During a key rotation the live node may hold only one of this node's keys:
        // each attempt proves another one.
        let keys = cfg.channel.keys.all();
        let key = keys[attempt % keys.len()].clone();
        attempt += 1;
        let (reply, binding) = match ask(&key, &mut w, &mut r, &cfg.node.name, epoch, config_hash)
            .map_err(JoinError::Refused)?
        {
            Asked::Reply(reply, binding) => (reply, binding),
            Asked::Retry(e) => {
                warn!(%peer, "join: {e}; retrying");
                std::thread::sleep(pause);
                continue;
            }
        };
        match reply.answer {
            Answer::FollowFromBoot => {
                info!(
                    reason = %reply.reason,
                    session = format_args!("{:#018x}", reply.session),
                    "join: following the log from the VM's boot"
                );
                return Ok(Joined::FromBoot {
                    session: reply.session,
                });
            }
            Answer::Retry => {
                vm.set_phase(VmPhase::Joining(format!(
                    "the live node asks to retry ({})",
                    reply.reason
                )));
                std::thread::sleep(pause);
            }
            Answer::Refused => {
                return Err(JoinError::Refused(format!(
                    "the live node refused the join: {}",
                    reply.reason
                )));
            }
            Answer::Transfer => {
                let started = crate::role::unix_ms();
                vm.set_phase(VmPhase::Joining("receiving the VM's state".into()));
                info!(%peer, epoch, "join: receiving the VM's state");
                let mut secure = secure::initiate(&key, &binding, w, r)
                    .map_err(|e| JoinError::Failed(e.to_string()))?;
                let (vmm, rep) = ft_vmm::Vmm::receive(
                    vcfg,
                    image,
                    control,
                    &mut secure.reader,
                    Some(store),
                    &mut |p: &Progress| {
                        *vm.join.lock().unwrap() = Some(progress_json("primary", started, p));
                    },
                )
                .map_err(|e| JoinError::Failed(e.to_string()))?;
                let cut: CutInfo = serde_json::from_slice(&rep.cut_info).map_err(|e| {
                    JoinError::Failed(format!("the primary's cut information is malformed: {e}"))
                })?;
                // The state is of the epoch it was asked at, and the one this node still
                // follows: a live node that moved on during the transfer (it gave up on
                // this joiner and went solo in a new epoch) logs in an epoch this
                // replica's state is not part of.
                let now = roles.epoch();
                if cut.session != reply.session {
                    return Err(JoinError::Failed(format!(
                        "the cut names session {:#018x}, the live node's answer {:#018x}: \
                         not following either",
                        cut.session, reply.session
                    )));
                }
                if cut.epoch != epoch || now != epoch {
                    return Err(JoinError::Failed(format!(
                        "the live node moved on during the transfer (asked at epoch {epoch}, \
                         cut at epoch {}, the live epoch is now {now}): this state is stale",
                        cut.epoch
                    )));
                }
                send_line(&mut secure.writer, &Confirm { received: true })
                    .and_then(|()| secure.writer.flush())
                    .map_err(|e| {
                        JoinError::Failed(format!("cannot confirm the state to the primary: {e}"))
                    })?;
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
