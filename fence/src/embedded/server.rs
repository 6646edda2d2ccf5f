//! The embedded arbiter server: one process, state in one durable file.
use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering, Ordering::Relaxed};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Mutex, Semaphore};
use tokio::task::JoinSet;
use tokio::time::timeout;

use super::proto::Signed as _;
use super::proto::{self, ErrorCode, MAX_FRAME, Op, PROTO_VERSION, Reply, Request, Response};
use crate::arbiter::{validate_follower, validate_name};
use crate::error::ServeError;

/// Name of the state file inside the state directory.
pub const STATE_FILE: &str = "arbiter-state.json";
const LOCK_FILE: &str = "arbiter.lock";
const STATE_VERSION: u32 = 1;

/// Server limits and timeouts.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// A connection with no new request for this long is closed.
    pub idle_timeout: Duration,
    /// Time allowed to receive the rest of a frame once its length arrived, and to
    /// write a reply.
    pub io_timeout: Duration,
    pub max_connections: usize,
    pub min_lease_ms: u64,
    pub max_lease_ms: u64,
    /// Most VMs / nodes remembered (bounds state size against misbehaving clients).
    pub max_vms: usize,
    pub max_nodes: usize,
    /// First start: create a new, empty state. Without it a missing state file is an
    /// error (a lost file must not silently restart the epochs at 0); with it an
    /// existing state file is.
    pub init: bool,
    /// Shared secret: every request must carry its MAC (else it is refused and the
    /// connection closed), and every reply carries one. None: no authentication.
    pub secret: Option<Vec<u8>>,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            idle_timeout: Duration::from_secs(60),
            io_timeout: Duration::from_secs(5),
            max_connections: 256,
            min_lease_ms: 50,
            max_lease_ms: 600_000,
            max_vms: 1024,
            max_nodes: 1024,
            init: false,
            secret: None,
        }
    }
}

/// Serve the arbiter protocol on `listener` with state in `state_dir` (created if
/// missing, locked with `flock` so two arbiters never share it). Returns only on a
/// startup error (unusable/locked directory, corrupt state); otherwise runs until the
/// future is dropped, which closes every connection. State changes are durable before
/// they are answered, so dropping (or killing the process) at any point is safe.
pub async fn serve(listener: TcpListener, state_dir: impl AsRef<Path>) -> Result<(), ServeError> {
    serve_with(listener, state_dir, ServerOptions::default()).await
}

/// [`serve`] with explicit limits.
pub async fn serve_with(
    listener: TcpListener,
    state_dir: impl AsRef<Path>,
    opts: ServerOptions,
) -> Result<(), ServeError> {
    serve_with_metrics(listener, state_dir, opts, None).await
}

/// [`serve_with`], and GET /metrics (Prometheus) on `metrics` if given
/// (`ft-arbiter --metrics-listen`).
pub async fn serve_with_metrics(
    listener: TcpListener,
    state_dir: impl AsRef<Path>,
    opts: ServerOptions,
    metrics: Option<TcpListener>,
) -> Result<(), ServeError> {
    let store = Store::open(state_dir.as_ref())?;
    let core = store.load(opts.init)?;
    if opts.init {
        // The new, empty state is durable at once: the next start needs no --init.
        store.persist(&core.snapshot()).await?;
        tracing::info!(state_dir = %store.dir.display(), "new arbiter state created (--init)");
    }
    tracing::info!(
        state_dir = %store.dir.display(),
        vms = core.vms.len(),
        "arbiter state loaded; leases held before the restart stay valid for a full lease length"
    );
    let shared = Arc::new(Shared {
        core: Mutex::new(core),
        store,
        opts: opts.clone(),
        stats: Default::default(),
    });
    if let Some(l) = metrics {
        tokio::spawn(super::metrics::serve(l, shared.clone()));
    }
    let slots = Arc::new(Semaphore::new(opts.max_connections));
    let mut conns = JoinSet::new();
    loop {
        while conns.try_join_next().is_some() {}
        let (sock, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends are transient; back off briefly.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            shared.stats.connections_refused.fetch_add(1, Relaxed);
            tracing::warn!(%peer, "too many connections; closing new one");
            drop(sock);
            continue;
        };
        let _ = sock.set_nodelay(true);
        let shared = shared.clone();
        conns.spawn(async move {
            if let Err(why) = connection(sock, &shared).await {
                tracing::debug!(%peer, why, "connection closed");
            }
            drop(permit);
        });
    }
}

pub(super) struct Shared {
    core: Mutex<Core>,
    store: Store,
    opts: ServerOptions,
    pub(super) stats: super::metrics::Stats,
}

impl Shared {
    /// Every VM's record as the metrics show it, at `now`.
    pub(super) async fn vm_view(&self, now: Instant) -> Vec<super::metrics::VmView> {
        let core = self.core.lock().await;
        core.vms
            .iter()
            .map(|(vm, r)| super::metrics::VmView {
                vm: vm.clone(),
                epoch: r.epoch,
                owner: r.owner.clone(),
                follower: r.follower.clone(),
                lease_remaining_s: r.remaining(now).as_secs_f64(),
            })
            .collect()
    }
}

async fn connection(mut sock: TcpStream, sh: &Shared) -> Result<(), &'static str> {
    let opts = &sh.opts;
    loop {
        let len = match timeout(opts.idle_timeout, sock.read_u32()).await {
            Err(_) => return Err("idle timeout"),
            Ok(Err(_)) => return Err("closed by peer"),
            Ok(Ok(l)) => l,
        };
        if len == 0 || len as usize > MAX_FRAME {
            sh.stats.bad_requests.fetch_add(1, Relaxed);
            let msg = format!("frame length {len} outside 1..={MAX_FRAME}; closing connection");
            reply(&mut sock, opts, 0, error(ErrorCode::FrameTooLarge, msg)).await?;
            return Err("bad frame length");
        }
        let mut body = vec![0u8; len as usize];
        match timeout(opts.io_timeout, sock.read_exact(&mut body)).await {
            Err(_) => return Err("truncated frame (timeout)"),
            Ok(Err(_)) => return Err("truncated frame (eof)"),
            Ok(Ok(_)) => {}
        }
        let mut req: Request = match serde_json::from_slice(&body) {
            Ok(r) => r,
            Err(e) => {
                sh.stats.bad_requests.fetch_add(1, Relaxed);
                let msg = format!("not a valid v{PROTO_VERSION} request ({e}); closing connection");
                reply(&mut sock, opts, 0, error(ErrorCode::BadRequest, msg)).await?;
                return Err("bad request");
            }
        };
        if let Some(key) = &opts.secret
            && !req.verify(key)
        {
            sh.stats.unauthenticated.fetch_add(1, Relaxed);
            let msg = "the request carries no valid MAC of this arbiter's shared secret: give the node the same fence.secret_file as the arbiter's --secret-file; closing connection".to_string();
            reply(
                &mut sock,
                opts,
                req.id,
                error(ErrorCode::Unauthenticated, msg),
            )
            .await?;
            return Err("unauthenticated request");
        }
        let (id, op) = (req.id, req.op.clone());
        let answer = handle(sh, req).await;
        sh.stats.count(&op, &answer);
        reply(&mut sock, opts, id, answer).await?;
    }
}

async fn reply(
    sock: &mut TcpStream,
    opts: &ServerOptions,
    id: u64,
    reply: Reply,
) -> Result<(), &'static str> {
    let mut resp = Response {
        v: PROTO_VERSION,
        id,
        reply,
        mac: None,
    };
    if let Some(key) = &opts.secret {
        resp.sign(key);
    }
    let body = proto::encode(&resp);
    match timeout(opts.io_timeout, proto::write_frame(sock, &body)).await {
        Ok(Ok(())) => Ok(()),
        _ => Err("reply write failed"),
    }
}

fn error(code: ErrorCode, message: String) -> Reply {
    Reply::Error { code, message }
}

/// Handles one parsed request. State changes are persisted (fsync) before the reply.
async fn handle(sh: &Shared, req: Request) -> Reply {
    let opts = &sh.opts;
    if req.v != PROTO_VERSION {
        return error(
            ErrorCode::UnsupportedVersion,
            format!(
                "protocol version {} not supported (this arbiter speaks {PROTO_VERSION}); upgrade the older side",
                req.v
            ),
        );
    }
    if let Err(e) = validate_name("vm name", &req.vm).and(validate_name("node name", &req.node)) {
        return error(ErrorCode::InvalidArgument, e.to_string());
    }
    if let Op::Pair { follower, .. } = &req.op
        && let Err(e) = validate_follower(&req.node, follower)
    {
        return error(ErrorCode::InvalidArgument, e.to_string());
    }
    let lease_ms = match req.op {
        Op::TestAndSet { lease_ms, .. } | Op::Renew { lease_ms, .. } => Some(lease_ms),
        _ => None,
    };
    if let Some(l) = lease_ms
        && !(opts.min_lease_ms..=opts.max_lease_ms).contains(&l)
    {
        return error(
            ErrorCode::InvalidArgument,
            format!(
                "lease_ms {l} outside {}..={}",
                opts.min_lease_ms, opts.max_lease_ms
            ),
        );
    }

    let mut core = sh.core.lock().await;
    let now = Instant::now();
    if req.op == Op::Read {
        return match core.vms.get(&req.vm) {
            Some(r) => Reply::State {
                owner: r.owner.clone(),
                epoch: r.epoch,
                remaining_ms: ms(r.remaining(now)),
            },
            None => Reply::State {
                owner: None,
                epoch: 0,
                remaining_ms: 0,
            },
        };
    }

    // At-most-once: the same id again gets the cached answer; an older id is refused.
    if let Some((id, cached)) = core.replies.get(&req.node)
        && *id == req.id
    {
        return cached.clone();
    }
    if let Some(&last) = core.last_request.get(&req.node)
        && req.id <= last
    {
        return error(ErrorCode::StaleRequestId, last.to_string());
    }
    if !core.vms.contains_key(&req.vm) && core.vms.len() >= opts.max_vms {
        return error(
            ErrorCode::Capacity,
            format!("more than {} VMs", opts.max_vms),
        );
    }
    if !core.last_request.contains_key(&req.node) && core.last_request.len() >= opts.max_nodes {
        return error(
            ErrorCode::Capacity,
            format!("more than {} nodes", opts.max_nodes),
        );
    }

    let cur = core.vms.get(&req.vm).cloned().unwrap_or_default();
    let valid = cur.remaining(now) > Duration::ZERO;
    let mut next = cur.clone();
    let answer = match req.op {
        Op::Read => unreachable!("handled above"),
        Op::TestAndSet {
            expected_epoch,
            lease_ms,
        } => match &cur.owner {
            // The owner's paired follower may take over at that epoch while the lease is
            // valid (the owner cannot emit without its acks).
            Some(o)
                if valid
                    && *o != req.node
                    && !(cur.follower.as_deref() == Some(req.node.as_str())
                        && cur.epoch == expected_epoch) =>
            {
                Reply::Held {
                    owner: o.clone(),
                    epoch: cur.epoch,
                    remaining_ms: ms(cur.remaining(now)).max(1),
                }
            }
            _ if cur.epoch != expected_epoch => Reply::Stale {
                owner: cur.owner.clone(),
                epoch: cur.epoch,
            },
            _ if cur.epoch == u64::MAX => error(
                ErrorCode::Capacity,
                "epoch space exhausted for this VM; use a new VM name".to_string(),
            ),
            _ => {
                next.epoch = cur.epoch + 1;
                next.owner = Some(req.node.clone());
                next.follower = None;
                next.lease_ms = lease_ms;
                Reply::Won {
                    epoch: next.epoch,
                    lease_ms,
                }
            }
        },
        Op::Renew { epoch, lease_ms } => {
            if cur.owner.as_deref() == Some(req.node.as_str()) && cur.epoch == epoch && valid {
                next.lease_ms = lease_ms;
                Reply::Renewed { epoch, lease_ms }
            } else {
                Reply::Fenced {
                    owner: cur.owner.clone(),
                    epoch: cur.epoch,
                }
            }
        }
        Op::Pair { epoch, follower } => {
            if cur.owner.as_deref() == Some(req.node.as_str()) && cur.epoch == epoch && valid {
                next.follower = Some(follower.clone());
                Reply::Paired { epoch, follower }
            } else {
                Reply::Fenced {
                    owner: cur.owner.clone(),
                    epoch: cur.epoch,
                }
            }
        }
        Op::Release { epoch } => {
            if cur.epoch == epoch
                && (cur.owner.is_none() || cur.owner.as_deref() == Some(req.node.as_str()))
            {
                next.owner = None;
                next.follower = None;
                next.expires = None;
                Reply::Released { epoch }
            } else {
                Reply::Fenced {
                    owner: cur.owner.clone(),
                    epoch: cur.epoch,
                }
            }
        }
    };

    let durable_change = next.epoch != cur.epoch
        || next.owner != cur.owner
        || next.follower != cur.follower
        || next.lease_ms > cur.lease_ms;
    if durable_change {
        let mut snapshot = core.snapshot();
        snapshot.vms.insert(req.vm.clone(), next.persisted());
        snapshot.last_request.insert(req.node.clone(), req.id);
        let t0 = Instant::now();
        let persisted = sh.store.persist(&snapshot).await;
        if persisted.is_ok() {
            sh.stats.persists.fetch_add(1, Relaxed);
            sh.stats
                .persist_ns
                .fetch_add(t0.elapsed().as_nanos() as u64, Relaxed);
        }
        if let Err(e) = persisted {
            tracing::error!(error = %e, "state not persisted; request refused");
            return error(ErrorCode::Storage, e.to_string());
        }
    }
    // Lease timers start after the state is durable (later = more conservative).
    if matches!(answer, Reply::Won { .. } | Reply::Renewed { .. }) {
        next.expires = Some(Instant::now() + Duration::from_millis(next.lease_ms));
    }
    core.vms.insert(req.vm.clone(), next);
    core.last_request.insert(req.node.clone(), req.id);
    core.replies.insert(req.node, (req.id, answer.clone()));
    answer
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[derive(Clone, Debug, Default)]
struct VmRec {
    epoch: u64,
    owner: Option<String>,
    /// The owner's paired follower at `epoch` (may take over while the lease is valid).
    follower: Option<String>,
    lease_ms: u64,
    /// Server-monotonic lease expiry; None = no valid lease.
    expires: Option<Instant>,
}

impl VmRec {
    fn remaining(&self, now: Instant) -> Duration {
        match (&self.owner, self.expires) {
            (Some(_), Some(e)) => e.saturating_duration_since(now),
            _ => Duration::ZERO,
        }
    }
    fn persisted(&self) -> PersistedVm {
        PersistedVm {
            epoch: self.epoch,
            owner: self.owner.clone(),
            follower: self.follower.clone(),
            lease_ms: self.lease_ms,
        }
    }
}

#[derive(Default)]
struct Core {
    vms: BTreeMap<String, VmRec>,
    last_request: BTreeMap<String, u64>,
    /// Last answer per node, for retried requests (memory only).
    replies: HashMap<String, (u64, Reply)>,
}

impl Core {
    fn snapshot(&self) -> PersistedState {
        PersistedState {
            version: STATE_VERSION,
            vms: self
                .vms
                .iter()
                .map(|(k, v)| (k.clone(), v.persisted()))
                .collect(),
            last_request: self.last_request.clone(),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PersistedVm {
    epoch: u64,
    owner: Option<String>,
    /// Absent in state files written before pairing existed (= unpaired).
    #[serde(default)]
    follower: Option<String>,
    lease_ms: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PersistedState {
    version: u32,
    vms: BTreeMap<String, PersistedVm>,
    last_request: BTreeMap<String, u64>,
}

struct Store {
    dir: PathBuf,
    /// Held (flock) for the server's lifetime.
    _lock: File,
    tmp_seq: AtomicU64,
}

impl Store {
    fn open(dir: &Path) -> Result<Store, ServeError> {
        let sd = |e: std::io::Error| ServeError::StateDir {
            path: dir.display().to_string(),
            cause: e.to_string(),
        };
        fs::create_dir_all(dir).map_err(sd)?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(LOCK_FILE))
            .map_err(sd)?;
        // SAFETY: flock on a file descriptor we own and keep open (in `_lock`) for as
        // long as the lock must be held; no memory is passed.
        let rc = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            return Err(ServeError::Locked {
                path: dir.display().to_string(),
            });
        }
        // Leftovers of writes interrupted by a crash; the state file itself is intact
        // because it is only ever replaced by rename.
        if let Ok(rd) = fs::read_dir(dir) {
            for ent in rd.flatten() {
                if ent.file_name().to_string_lossy().starts_with(".tmp-") {
                    let _ = fs::remove_file(ent.path());
                }
            }
        }
        Ok(Store {
            dir: dir.to_path_buf(),
            _lock: lock,
            tmp_seq: AtomicU64::new(0),
        })
    }

    fn load(&self, init: bool) -> Result<Core, ServeError> {
        let path = self.dir.join(STATE_FILE);
        let bytes = match fs::read(&path) {
            Ok(_) if init => {
                return Err(ServeError::InitWithState {
                    path: path.display().to_string(),
                });
            }
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && init => {
                return Ok(Core::default());
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ServeError::NoState {
                    path: path.display().to_string(),
                });
            }
            Err(e) => {
                return Err(ServeError::CorruptState {
                    path: path.display().to_string(),
                    cause: e.to_string(),
                });
            }
        };
        let corrupt = |cause: String| ServeError::CorruptState {
            path: path.display().to_string(),
            cause,
        };
        let st: PersistedState =
            serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
        if st.version != STATE_VERSION {
            return Err(corrupt(format!("unknown state version {}", st.version)));
        }
        let now = Instant::now();
        let vms = st
            .vms
            .into_iter()
            .map(|(k, v)| {
                // Conservative: a lease that may have existed before the crash is valid
                // for a full lease length from now.
                let expires = v
                    .owner
                    .as_ref()
                    .map(|_| now + Duration::from_millis(v.lease_ms));
                (
                    k,
                    VmRec {
                        epoch: v.epoch,
                        owner: v.owner,
                        follower: v.follower,
                        lease_ms: v.lease_ms,
                        expires,
                    },
                )
            })
            .collect();
        Ok(Core {
            vms,
            last_request: st.last_request,
            replies: HashMap::new(),
        })
    }

    /// Durably replaces the state file: write temp, fsync, rename, fsync directory.
    async fn persist(&self, st: &PersistedState) -> Result<(), ServeError> {
        let bytes = serde_json::to_vec_pretty(st).expect("state serializes");
        let dir = self.dir.clone();
        let tmp = dir.join(format!(
            ".tmp-{}-{}",
            std::process::id(),
            self.tmp_seq.fetch_add(1, Ordering::Relaxed)
        ));
        let res = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            let r = (|| {
                let mut f = File::create(&tmp)?;
                f.write_all(&bytes)?;
                f.sync_all()?;
                drop(f);
                fs::rename(&tmp, dir.join(STATE_FILE))?;
                File::open(&dir)?.sync_all()
            })();
            if r.is_err() {
                let _ = fs::remove_file(&tmp);
            }
            r
        })
        .await;
        let res = res.unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
        res.map_err(|e| ServeError::Storage {
            path: self.dir.join(STATE_FILE).display().to_string(),
            cause: e.to_string(),
        })
    }
}
