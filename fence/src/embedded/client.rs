//! Client of the embedded arbiter, implementing [`Arbiter`].
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::net::TcpStream;
use tokio::sync::Mutex;
use tokio::time::{Instant, timeout_at};

use super::proto::Signed as _;
use super::proto::{self, ErrorCode, FrameError, Op, PROTO_VERSION, Reply, Request, Response};
use crate::arbiter::{
    Arbiter, BoxFuture, LeaseGrant, OwnerInfo, TasOutcome, validate_follower, validate_name,
};
use crate::error::FenceError;

/// Client of one embedded arbiter (`ft-arbiter`). One request in flight at a time; the
/// TCP connection is kept and re-opened on failure.
pub struct EmbeddedArbiter {
    addr: String,
    lease: Duration,
    request_timeout: Duration,
    conn: Mutex<Option<TcpStream>>,
    next_id: AtomicU64,
    /// Shared secret: requests carry its MAC, replies must.
    secret: Option<Vec<u8>>,
}

impl EmbeddedArbiter {
    /// `addr` is `host:port`. Nothing is connected until the first request.
    pub fn new(addr: impl Into<String>, lease: Duration, request_timeout: Duration) -> Self {
        // Request ids must grow across restarts of this node: start from wall-clock ns.
        // If the clock stepped back, the arbiter answers StaleRequestId with the last id
        // it saw and the client jumps past it (see `call`).
        let start = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        Self {
            addr: addr.into(),
            lease,
            request_timeout,
            conn: Mutex::new(None),
            next_id: AtomicU64::new(start.max(1)),
            secret: None,
        }
    }

    /// Authenticates every request with `secret` (the arbiter's `--secret-file`) and
    /// accepts only replies authenticated with it.
    pub fn with_secret(mut self, secret: Vec<u8>) -> Self {
        self.secret = Some(secret);
        self
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    fn lease_ms(&self) -> u64 {
        u64::try_from(self.lease.as_millis()).unwrap_or(u64::MAX)
    }

    /// Sends `op` and returns the reply, within the request timeout. A request is
    /// retried once on a fresh connection with the SAME id (the arbiter answers a
    /// repeated id from its reply cache, so it is never applied twice).
    async fn call(&self, vm: &str, node: &str, op: Op) -> Result<Reply, FenceError> {
        validate_name("vm name", vm)?;
        validate_name("node name", node)?;
        let deadline = Instant::now() + self.request_timeout;
        let mut guard = match timeout_at(deadline, self.conn.lock()).await {
            Ok(g) => g,
            Err(_) => return Err(self.timeout_err()),
        };
        let mut resynced = false;
        let mut id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut req = Request {
                v: PROTO_VERSION,
                id,
                node: node.to_string(),
                vm: vm.to_string(),
                op: op.clone(),
                mac: None,
            };
            if let Some(key) = &self.secret {
                req.sign(key);
            }
            let body = proto::encode(&req);
            let reused = guard.is_some();
            let res = match timeout_at(deadline, self.exchange(&mut guard, &body)).await {
                Ok(r) => r,
                Err(_) => {
                    // Cancelled mid-exchange: the stream may hold half a frame.
                    *guard = None;
                    return Err(self.timeout_err());
                }
            };
            let mut resp = match res {
                Ok(r) => r,
                Err(e) => {
                    *guard = None;
                    // A kept connection may have died with an arbiter restart: retry once.
                    if reused && attempt < 3 {
                        continue;
                    }
                    return Err(e);
                }
            };
            if let Some(key) = &self.secret
                && !resp.verify(key)
            {
                *guard = None;
                return Err(FenceError::Protocol {
                    addr: self.addr.clone(),
                    detail: format!(
                        "the reply carries no valid MAC of the shared secret ({:?}): the arbiter runs without --secret-file or with another secret",
                        resp.reply
                    ),
                });
            }
            if resp.v != PROTO_VERSION || resp.id != id {
                *guard = None;
                return Err(FenceError::Protocol {
                    addr: self.addr.clone(),
                    detail: format!("reply v{} id {} to request id {id}", resp.v, resp.id),
                });
            }
            match resp.reply {
                Reply::Error {
                    code: ErrorCode::StaleRequestId,
                    message,
                } if !resynced => {
                    // Our id counter is behind what the arbiter saw from this node (clock
                    // stepped back, or a second client with the same node name). Jump past.
                    let last: u64 = message.parse().unwrap_or(0);
                    let next = last.saturating_add(1).max(id + 1);
                    self.next_id.fetch_max(next + 1, Ordering::Relaxed);
                    id = next;
                    resynced = true;
                }
                Reply::Error { code, message } => {
                    return Err(FenceError::Rejected {
                        addr: self.addr.clone(),
                        detail: format!("{code:?}: {message}"),
                    });
                }
                r => return Ok(r),
            }
        }
    }

    async fn exchange(
        &self,
        conn: &mut Option<TcpStream>,
        body: &[u8],
    ) -> Result<Response, FenceError> {
        if conn.is_none() {
            let s = TcpStream::connect(&self.addr)
                .await
                .map_err(|e| self.unreachable(&e))?;
            let _ = s.set_nodelay(true);
            *conn = Some(s);
        }
        let s = conn.as_mut().expect("connected above");
        proto::write_frame(s, body)
            .await
            .map_err(|e| self.unreachable(&e))?;
        let frame = proto::read_frame(s).await.map_err(|e| match e {
            FrameError::Io(e) => self.unreachable(&e),
            FrameError::BadLength(l) => FenceError::Protocol {
                addr: self.addr.clone(),
                detail: format!("reply frame length {l}"),
            },
        })?;
        serde_json::from_slice(&frame).map_err(|e| FenceError::Protocol {
            addr: self.addr.clone(),
            detail: e.to_string(),
        })
    }

    fn unreachable(&self, e: &std::io::Error) -> FenceError {
        let cause = match e.kind() {
            std::io::ErrorKind::ConnectionRefused => "connection refused".to_string(),
            std::io::ErrorKind::UnexpectedEof => "connection closed by the arbiter".to_string(),
            _ => e.to_string(),
        };
        FenceError::Unreachable {
            addr: self.addr.clone(),
            cause,
        }
    }

    fn timeout_err(&self) -> FenceError {
        FenceError::Timeout {
            addr: self.addr.clone(),
            after: self.request_timeout,
        }
    }

    /// `Fenced` as the error it is, anything else as unexpected.
    fn refused(&self, vm: &str, node: &str, epoch: u64, r: Reply) -> FenceError {
        match r {
            Reply::Fenced {
                owner,
                epoch: current,
            } => FenceError::Fenced {
                vm: vm.to_string(),
                node: node.to_string(),
                epoch,
                current_owner: owner,
                current_epoch: current,
            },
            r => self.unexpected(r),
        }
    }

    fn unexpected(&self, r: Reply) -> FenceError {
        FenceError::Protocol {
            addr: self.addr.clone(),
            detail: format!("unexpected reply {r:?}"),
        }
    }
}

impl Arbiter for EmbeddedArbiter {
    fn test_and_set<'a>(
        &'a self,
        vm: &'a str,
        node: &'a str,
        expected_epoch: u64,
    ) -> BoxFuture<'a, Result<TasOutcome, FenceError>> {
        Box::pin(async move {
            let op = Op::TestAndSet {
                expected_epoch,
                lease_ms: self.lease_ms(),
            };
            match self.call(vm, node, op).await? {
                Reply::Won { epoch, lease_ms } => Ok(TasOutcome::Won(LeaseGrant {
                    epoch,
                    lease: Duration::from_millis(lease_ms).min(self.lease),
                })),
                Reply::Held {
                    owner,
                    epoch,
                    remaining_ms,
                } => Ok(TasOutcome::Held {
                    owner,
                    epoch,
                    lease_remaining: Duration::from_millis(remaining_ms),
                }),
                Reply::Stale { owner, epoch } => Ok(TasOutcome::Stale { owner, epoch }),
                r => Err(self.unexpected(r)),
            }
        })
    }

    fn pair<'a>(
        &'a self,
        vm: &'a str,
        node: &'a str,
        epoch: u64,
        follower: &'a str,
    ) -> BoxFuture<'a, Result<(), FenceError>> {
        Box::pin(async move {
            validate_follower(node, follower)?;
            let op = Op::Pair {
                epoch,
                follower: follower.to_string(),
            };
            match self.call(vm, node, op).await? {
                Reply::Paired {
                    epoch: e,
                    follower: f,
                } if e == epoch && f == follower => Ok(()),
                r => Err(self.refused(vm, node, epoch, r)),
            }
        })
    }

    fn renew<'a>(
        &'a self,
        vm: &'a str,
        node: &'a str,
        epoch: u64,
    ) -> BoxFuture<'a, Result<LeaseGrant, FenceError>> {
        Box::pin(async move {
            let op = Op::Renew {
                epoch,
                lease_ms: self.lease_ms(),
            };
            match self.call(vm, node, op).await? {
                Reply::Renewed { epoch: e, lease_ms } if e == epoch => Ok(LeaseGrant {
                    epoch,
                    lease: Duration::from_millis(lease_ms).min(self.lease),
                }),
                r => Err(self.refused(vm, node, epoch, r)),
            }
        })
    }

    fn release<'a>(
        &'a self,
        vm: &'a str,
        node: &'a str,
        epoch: u64,
    ) -> BoxFuture<'a, Result<(), FenceError>> {
        Box::pin(async move {
            match self.call(vm, node, Op::Release { epoch }).await? {
                Reply::Released { .. } => Ok(()),
                r => Err(self.refused(vm, node, epoch, r)),
            }
        })
    }

    fn read<'a>(&'a self, vm: &'a str) -> BoxFuture<'a, Result<OwnerInfo, FenceError>> {
        Box::pin(async move {
            // Reads carry a fixed node name; they change nothing and skip id checks.
            match self.call(vm, "reader", Op::Read).await? {
                Reply::State {
                    owner,
                    epoch,
                    remaining_ms,
                } => Ok(OwnerInfo {
                    owner,
                    epoch,
                    lease_remaining: Duration::from_millis(remaining_ms),
                }),
                r => Err(self.unexpected(r)),
            }
        })
    }

    fn lease_len(&self) -> Duration {
        self.lease
    }

    fn describe(&self) -> String {
        format!("embedded arbiter at {}", self.addr)
    }
}
