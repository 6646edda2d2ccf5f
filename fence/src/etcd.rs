//! Backend `etcd`: the arbiter is an etcd cluster (redundant: it keeps working while a
//! majority of members is up).
//!
//! Keys per VM (`prefix` defaults to `/ft-fence/`):
//! * `{prefix}{vm}/epoch` — persistent, decimal epoch; only ever rewritten to a larger
//!   value, so epochs are never reused (etcd itself is durable and replicated).
//! * `{prefix}{vm}/owner` — `"{epoch} {node}"`, attached to an etcd lease whose TTL is
//!   the lease length rounded up to whole seconds. The key exists exactly while the
//!   owner's lease is valid: etcd deletes it when the lease expires.
//! * `{prefix}{vm}/follower` — `"{epoch} {node}"`: the owner's paired follower, written
//!   by `pair` (a transaction on the owner key's value) and attached to the owner's
//!   lease, so it lapses with it; a new epoch deletes it.
//!
//! `test_and_set` reads the keys, decides, and commits with one transaction whose
//! compares pin the `mod_revision` (or absence) of the epoch and owner keys as read, so
//! any concurrent change makes the transaction fail and the decision is retaken on fresh
//! data.
//!
//! Security ([`EtcdTls`], [`EtcdArbiter::with_user`]; `fence.etcd_ca_file`,
//! `etcd_cert_file`/`etcd_key_file`, `etcd_user`/`etcd_password_file`): TLS to the
//! members (their certificates must be signed by the CA and name the endpoint's host),
//! optionally with a client certificate (members run with `--client-cert-auth`), and
//! etcd authentication (a user whose role grants readwrite on the key prefix). A member
//! that fails TLS or refuses the credentials is an error like an unreachable one
//! ([`FenceError::EtcdTls`], [`FenceError::EtcdAuth`]): nobody goes live through it.
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, GetOptions, Identity, PutOptions,
    TlsOptions, Txn, TxnOp,
};
use tokio::sync::Mutex;
use tokio::time::timeout;

use crate::arbiter::{
    Arbiter, BoxFuture, LeaseGrant, OwnerInfo, TasOutcome, validate_follower, validate_name,
};
use crate::error::FenceError;

/// Default key prefix.
pub const DEFAULT_PREFIX: &str = "/ft-fence/";

/// TLS towards the etcd members: the CA that signed their certificates (PEM) and, for
/// members started with `--client-cert-auth`, this node's client certificate and key.
#[derive(Clone)]
pub struct EtcdTls {
    ca_pem: Vec<u8>,
    identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl EtcdTls {
    /// Trust the members whose certificates `ca_pem` signed.
    pub fn new(ca_pem: Vec<u8>) -> Self {
        Self {
            ca_pem,
            identity: None,
        }
    }

    /// Present this client certificate (PEM) with its private key (PEM): mutual TLS.
    pub fn with_identity(mut self, cert_pem: Vec<u8>, key_pem: Vec<u8>) -> Self {
        self.identity = Some((cert_pem, key_pem));
        self
    }

    fn options(&self) -> TlsOptions {
        let o = TlsOptions::new().ca_certificate(Certificate::from_pem(&self.ca_pem));
        match &self.identity {
            Some((c, k)) => o.identity(Identity::from_pem(c, k)),
            None => o,
        }
    }
}

impl std::fmt::Debug for EtcdTls {
    // Never prints key material.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdTls")
            .field("client_certificate", &self.identity.is_some())
            .finish_non_exhaustive()
    }
}

/// Client of an etcd cluster implementing [`Arbiter`].
pub struct EtcdArbiter {
    endpoints: Vec<String>,
    prefix: String,
    lease: Duration,
    request_timeout: Duration,
    tls: Option<EtcdTls>,
    /// etcd authentication: (user, password).
    user: Option<(String, String)>,
    /// One client per endpoint (connected lazily); requests go to `current` and fail
    /// over to the next endpoint on an etcd/transport error.
    clients: Vec<Mutex<Option<Client>>>,
    /// Per endpoint: some request on it succeeded (see `unanswered_hint`).
    answered: Vec<AtomicBool>,
    current: AtomicUsize,
}

#[derive(Clone, Debug)]
struct Owner {
    node: String,
    epoch: u64,
    lease_id: i64,
    mod_revision: i64,
}

#[derive(Clone, Debug, Default)]
struct Snapshot {
    epoch: u64,
    /// mod_revision of the epoch key (0 = absent).
    epoch_rev: i64,
    owner: Option<Owner>,
    /// (epoch, node) of the owner's paired follower (key attached to the owner's lease).
    follower: Option<(u64, String)>,
}

impl EtcdArbiter {
    /// `endpoints` like `127.0.0.1:2379` or `http://10.0.0.3:2379`. Nothing is connected
    /// until the first request.
    pub fn new(
        endpoints: Vec<String>,
        prefix: impl Into<String>,
        lease: Duration,
        request_timeout: Duration,
    ) -> Self {
        let clients = endpoints.iter().map(|_| Mutex::new(None)).collect();
        let answered = endpoints.iter().map(|_| AtomicBool::new(false)).collect();
        Self {
            endpoints,
            prefix: prefix.into(),
            lease,
            request_timeout,
            tls: None,
            user: None,
            clients,
            answered,
            current: AtomicUsize::new(0),
        }
    }

    /// Reaches the members over TLS (endpoints `https://host:port` or `host:port`).
    pub fn with_tls(mut self, tls: EtcdTls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Authenticates as etcd user `user` (its role must grant readwrite on the prefix).
    pub fn with_user(mut self, user: impl Into<String>, password: impl Into<String>) -> Self {
        self.user = Some((user.into(), password.into()));
        self
    }

    fn eps(&self) -> String {
        self.endpoints.join(",")
    }

    fn err(&self, e: impl std::fmt::Display) -> FenceError {
        FenceError::Etcd {
            endpoints: self.eps(),
            detail: e.to_string(),
        }
    }

    /// An error of the etcd client, told apart: refused credentials or permissions
    /// ([`FenceError::EtcdAuth`]), a failed TLS handshake or certificate check
    /// ([`FenceError::EtcdTls`]), anything else ([`FenceError::Etcd`]).
    fn etcd_err(&self, e: etcd_client::Error) -> FenceError {
        let detail = error_chain(&e);
        match classify(&e, &detail, self.tls.is_some()) {
            Kind::Auth => FenceError::EtcdAuth {
                endpoints: self.eps(),
                user: self.user.as_ref().map(|(u, _)| u.clone()),
                detail,
            },
            Kind::Tls => FenceError::EtcdTls {
                endpoints: self.eps(),
                tls: self.tls.is_some(),
                detail,
            },
            Kind::Other => FenceError::Etcd {
                endpoints: self.eps(),
                detail,
            },
        }
    }

    fn timeout_err(&self) -> FenceError {
        FenceError::Timeout {
            addr: format!("etcd [{}]", self.eps()),
            after: self.request_timeout,
        }
    }

    /// Runs `f` under the request timeout.
    async fn bounded<T>(
        &self,
        f: impl Future<Output = Result<T, FenceError>>,
    ) -> Result<T, FenceError> {
        timeout(self.request_timeout, f)
            .await
            .unwrap_or_else(|_| Err(self.timeout_err()))
    }

    async fn client_at(&self, idx: usize) -> Result<Client, FenceError> {
        let mut g = self.clients[idx].lock().await;
        if let Some(c) = g.as_ref() {
            return Ok(c.clone());
        }
        // Per-RPC timeout: half the request budget, so one failover always fits.
        let rpc_timeout = (self.request_timeout / 2).max(Duration::from_millis(50));
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(rpc_timeout)
            .with_timeout(rpc_timeout)
            .with_keep_alive(Duration::from_secs(2), self.request_timeout)
            .with_require_leader(true);
        if let Some(tls) = &self.tls {
            opts = opts.with_tls(tls.options());
        }
        if let Some((user, password)) = &self.user {
            // Authenticates at connect; a token lost with a member's restart is renewed.
            opts = opts
                .with_user(user.clone(), password.clone())
                .with_auto_token_refresh(true);
        }
        let c = Client::connect([&self.endpoints[idx]], Some(opts))
            .await
            .map_err(|e| {
                let mut e = self.etcd_err(e);
                if let FenceError::Etcd { detail, .. }
                | FenceError::EtcdTls { detail, .. }
                | FenceError::EtcdAuth { detail, .. } = &mut e
                {
                    *detail = format!("connect to {}: {detail}", self.endpoints[idx]);
                }
                e
            })?;
        *g = Some(c.clone());
        Ok(c)
    }

    /// A connection broken before the member ever answered is, with TLS, what a member
    /// that refuses our client certificate does (TLS 1.3 reports it after the handshake,
    /// often as a bare close), and without TLS what a member that serves https only
    /// does to a plain client: say so ([`FenceError::EtcdTls`]).
    fn unanswered_hint(&self, e: FenceError) -> FenceError {
        // Matched without case, spaces and underscores ("broken pipe", "BrokenPipe").
        const BROKEN: [&str; 6] = [
            "connectionclosed",
            "brokenpipe",
            "connectionreset",
            "unexpectedeof",
            "framewithinvalidsize",
            "h2protocolerror",
        ];
        match e {
            FenceError::Etcd { endpoints, detail } => {
                let squashed: String = detail
                    .chars()
                    .filter(|c| !matches!(c, ' ' | '_'))
                    .collect::<String>()
                    .to_ascii_lowercase();
                if BROKEN.iter().any(|w| squashed.contains(w)) {
                    FenceError::EtcdTls {
                        endpoints,
                        tls: self.tls.is_some(),
                        detail,
                    }
                } else {
                    FenceError::Etcd { endpoints, detail }
                }
            }
            e => e,
        }
    }

    /// Runs one attempt of an operation on the current endpoint; on an etcd error
    /// (member down, no leader, transport) moves to the next endpoint and retries, at
    /// most twice around the list. Attempts must be safe to repeat.
    async fn with_failover<'a, T>(
        &'a self,
        mut attempt: impl FnMut(Client) -> BoxFuture<'a, Result<T, FenceError>>,
    ) -> Result<T, FenceError> {
        if self.endpoints.is_empty() {
            return Err(self.err("no endpoints configured"));
        }
        let n = self.endpoints.len();
        let mut last = None;
        for i in 0..2 * n {
            let idx = self.current.load(Ordering::Relaxed) % n;
            let res = match self.client_at(idx).await {
                Ok(c) => attempt(c).await,
                Err(e) => Err(e),
            };
            let res = match res {
                Ok(v) => {
                    self.answered[idx].store(true, Ordering::Relaxed);
                    Ok(v)
                }
                Err(e) if !self.answered[idx].load(Ordering::Relaxed) => {
                    Err(self.unanswered_hint(e))
                }
                Err(e) => Err(e),
            };
            match res {
                Err(
                    e @ (FenceError::Etcd { .. }
                    | FenceError::EtcdTls { .. }
                    | FenceError::EtcdAuth { .. }),
                ) => {
                    tracing::debug!(endpoint = %self.endpoints[idx], error = %e, "etcd attempt failed; trying next member");
                    last = Some(e);
                    let _ = self.current.compare_exchange(
                        idx,
                        (idx + 1) % n,
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                    );
                    if i + 1 >= n {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
                other => return other,
            }
        }
        Err(last.expect("at least one attempt"))
    }

    fn key_prefix(&self, vm: &str) -> String {
        format!("{}{vm}/", self.prefix)
    }
    fn epoch_key(&self, vm: &str) -> String {
        format!("{}{vm}/epoch", self.prefix)
    }
    fn owner_key(&self, vm: &str) -> String {
        format!("{}{vm}/owner", self.prefix)
    }
    fn follower_key(&self, vm: &str) -> String {
        format!("{}{vm}/follower", self.prefix)
    }

    fn ttl_secs(&self) -> i64 {
        let ms = self.lease.as_millis().max(1);
        i64::try_from(ms.div_ceil(1000)).unwrap_or(i64::MAX)
    }

    async fn snapshot(&self, c: &mut Client, vm: &str) -> Result<Snapshot, FenceError> {
        let resp = c
            .get(self.key_prefix(vm), Some(GetOptions::new().with_prefix()))
            .await
            .map_err(|e| self.etcd_err(e))?;
        let mut s = Snapshot::default();
        for kv in resp.kvs() {
            let key = kv.key();
            let val = std::str::from_utf8(kv.value()).map_err(|e| self.err(e))?;
            if key == self.epoch_key(vm).as_bytes() {
                s.epoch = val
                    .parse()
                    .map_err(|_| self.err(format!("corrupt epoch value {val:?}")))?;
                s.epoch_rev = kv.mod_revision();
            } else if key == self.follower_key(vm).as_bytes() {
                let (e, n) = val
                    .split_once(' ')
                    .ok_or_else(|| self.err(format!("corrupt follower value {val:?}")))?;
                let e = e
                    .parse()
                    .map_err(|_| self.err(format!("corrupt follower value {val:?}")))?;
                s.follower = Some((e, n.to_string()));
            } else if key == self.owner_key(vm).as_bytes() {
                let (e, n) = val
                    .split_once(' ')
                    .ok_or_else(|| self.err(format!("corrupt owner value {val:?}")))?;
                s.owner = Some(Owner {
                    node: n.to_string(),
                    epoch: e
                        .parse()
                        .map_err(|_| self.err(format!("corrupt owner value {val:?}")))?,
                    lease_id: kv.lease(),
                    mod_revision: kv.mod_revision(),
                });
            }
        }
        Ok(s)
    }

    async fn remaining(&self, c: &mut Client, lease_id: i64) -> Duration {
        match c.lease_time_to_live(lease_id, None).await {
            Ok(r) if r.ttl() > 0 => Duration::from_secs(r.ttl() as u64),
            // Expiring right now; report a small non-zero remainder (the key still exists).
            _ => Duration::from_millis(1),
        }
    }

    /// One attempt of test-and-set. `ours` lists the etcd leases granted by earlier
    /// attempts of the same call, to recognise a commit whose reply was lost.
    async fn tas_once(
        &self,
        mut c: Client,
        vm: &str,
        node: &str,
        expected_epoch: u64,
        ours: Arc<StdMutex<Vec<i64>>>,
    ) -> Result<TasOutcome, FenceError> {
        let is_ours = |id: i64| ours.lock().unwrap_or_else(|e| e.into_inner()).contains(&id);
        async {
            for _ in 0..4 {
                let s = self.snapshot(&mut c, vm).await?;
                if let Some(o) = &s.owner {
                    if o.node == node && is_ours(o.lease_id) {
                        // An earlier attempt of this call committed (reply was lost).
                        return Ok(self.won(o.epoch));
                    }
                    // The owner's paired follower may take over at that epoch while the
                    // owner's lease is valid (the owner cannot emit without its acks).
                    let paired = s.follower.as_ref().is_some_and(|(e, f)| {
                        *e == s.epoch && *e == o.epoch && f == node && expected_epoch == s.epoch
                    });
                    if o.node != node && !paired {
                        let lease_remaining = self.remaining(&mut c, o.lease_id).await;
                        return Ok(TasOutcome::Held {
                            owner: o.node.clone(),
                            epoch: s.epoch,
                            lease_remaining,
                        });
                    }
                }
                if s.epoch != expected_epoch {
                    return Ok(TasOutcome::Stale {
                        owner: s.owner.map(|o| o.node),
                        epoch: s.epoch,
                    });
                }
                let lease = c
                    .lease_grant(self.ttl_secs(), None)
                    .await
                    .map_err(|e| self.etcd_err(e))?;
                ours.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(lease.id());
                let new_epoch = s.epoch + 1;
                let (ek, ok) = (self.epoch_key(vm), self.owner_key(vm));
                let epoch_cmp = if s.epoch_rev == 0 {
                    Compare::version(ek.clone(), CompareOp::Equal, 0)
                } else {
                    Compare::mod_revision(ek.clone(), CompareOp::Equal, s.epoch_rev)
                };
                let owner_cmp = match &s.owner {
                    None => Compare::version(ok.clone(), CompareOp::Equal, 0),
                    Some(o) => Compare::mod_revision(ok.clone(), CompareOp::Equal, o.mod_revision),
                };
                // A new epoch is unpaired.
                let txn = Txn::new().when([epoch_cmp, owner_cmp]).and_then([
                    TxnOp::put(ek, new_epoch.to_string(), None),
                    TxnOp::put(
                        ok,
                        format!("{new_epoch} {node}"),
                        Some(PutOptions::new().with_lease(lease.id())),
                    ),
                    TxnOp::delete(self.follower_key(vm), None),
                ]);
                let r = c.txn(txn).await.map_err(|e| self.etcd_err(e))?;
                if r.succeeded() {
                    if let Some(o) = s.owner.as_ref().filter(|o| o.node == node) {
                        // Our own previous lease (re-take); drop it, best effort. (A
                        // previous owner we took over from keeps its lease until it
                        // lapses: nothing is attached to it any more.)
                        let _ = c.lease_revoke(o.lease_id).await;
                    }
                    return Ok(self.won(new_epoch));
                }
                let _ = c.lease_revoke(lease.id()).await;
            }
            // Persistent contention: report what is there now.
            let s = self.snapshot(&mut c, vm).await?;
            Ok(match s.owner {
                Some(o) if o.node != node => TasOutcome::Held {
                    lease_remaining: self.remaining(&mut c, o.lease_id).await,
                    owner: o.node,
                    epoch: s.epoch,
                },
                o => TasOutcome::Stale {
                    owner: o.map(|o| o.node),
                    epoch: s.epoch,
                },
            })
        }
        .await
    }

    fn won(&self, epoch: u64) -> TasOutcome {
        TasOutcome::Won(LeaseGrant {
            epoch,
            lease: self.lease,
        })
    }

    fn fenced(&self, vm: &str, node: &str, epoch: u64, s: Snapshot) -> FenceError {
        FenceError::Fenced {
            vm: vm.to_string(),
            node: node.to_string(),
            epoch,
            current_owner: s.owner.map(|o| o.node),
            current_epoch: s.epoch,
        }
    }

    async fn renew_inner(
        &self,
        mut c: Client,
        vm: &str,
        node: &str,
        epoch: u64,
    ) -> Result<LeaseGrant, FenceError> {
        let s = self.snapshot(&mut c, vm).await?;
        let lease_id = match &s.owner {
            Some(o) if o.node == node && o.epoch == epoch => o.lease_id,
            _ => return Err(self.fenced(vm, node, epoch, s)),
        };
        let (mut keeper, mut stream) = c
            .lease_keep_alive(lease_id)
            .await
            .map_err(|e| self.etcd_err(e))?;
        // The request queued while the stream opens is not reliably delivered (seen with
        // etcd 3.4): send one explicitly and take the first answer (either is a renewal
        // sent after `t_send`).
        keeper.keep_alive().await.map_err(|e| self.etcd_err(e))?;
        let resp = stream.message().await.map_err(|e| self.etcd_err(e))?;
        match resp {
            Some(r) if r.ttl() > 0 => Ok(LeaseGrant {
                epoch,
                lease: self.lease.min(Duration::from_secs(r.ttl() as u64)),
            }),
            // TTL 0: the lease expired before the keep-alive arrived (the owner key is
            // gone with it), so this node is no longer owner.
            Some(_) => {
                let s = self.snapshot(&mut c, vm).await.unwrap_or_default();
                Err(self.fenced(vm, node, epoch, s))
            }
            None => Err(self.err("keep-alive stream closed without an answer")),
        }
    }

    async fn pair_inner(
        &self,
        mut c: Client,
        vm: &str,
        node: &str,
        epoch: u64,
        follower: &str,
    ) -> Result<(), FenceError> {
        let s = self.snapshot(&mut c, vm).await?;
        let lease_id = match &s.owner {
            Some(o) if o.node == node && o.epoch == epoch => o.lease_id,
            _ => return Err(self.fenced(vm, node, epoch, s)),
        };
        // Attached to the owner's lease: it lapses with it.
        let txn = Txn::new()
            .when([Compare::value(
                self.owner_key(vm),
                CompareOp::Equal,
                format!("{epoch} {node}"),
            )])
            .and_then([TxnOp::put(
                self.follower_key(vm),
                format!("{epoch} {follower}"),
                Some(PutOptions::new().with_lease(lease_id)),
            )]);
        let r = c.txn(txn).await.map_err(|e| self.etcd_err(e))?;
        if r.succeeded() {
            return Ok(());
        }
        let s = self.snapshot(&mut c, vm).await?;
        Err(self.fenced(vm, node, epoch, s))
    }

    async fn release_inner(
        &self,
        mut c: Client,
        vm: &str,
        node: &str,
        epoch: u64,
    ) -> Result<(), FenceError> {
        let ok = self.owner_key(vm);
        let txn = Txn::new()
            .when([Compare::value(
                ok.clone(),
                CompareOp::Equal,
                format!("{epoch} {node}"),
            )])
            .and_then([TxnOp::delete(ok, None)]);
        // Lease id must be read before the delete to revoke it afterwards.
        let s = self.snapshot(&mut c, vm).await?;
        let r = c.txn(txn).await.map_err(|e| self.etcd_err(e))?;
        if r.succeeded() {
            if let Some(o) = s.owner.filter(|o| o.node == node && o.epoch == epoch) {
                let _ = c.lease_revoke(o.lease_id).await;
            }
            return Ok(());
        }
        let s = self.snapshot(&mut c, vm).await?;
        if s.owner.is_none() && s.epoch == epoch {
            return Ok(()); // already released
        }
        Err(self.fenced(vm, node, epoch, s))
    }

    async fn read_inner(&self, mut c: Client, vm: &str) -> Result<OwnerInfo, FenceError> {
        let s = self.snapshot(&mut c, vm).await?;
        let lease_remaining = match &s.owner {
            Some(o) => self.remaining(&mut c, o.lease_id).await,
            None => Duration::ZERO,
        };
        Ok(OwnerInfo {
            owner: s.owner.map(|o| o.node),
            epoch: s.epoch,
            lease_remaining,
        })
    }
}

impl Arbiter for EtcdArbiter {
    fn test_and_set<'a>(
        &'a self,
        vm: &'a str,
        node: &'a str,
        expected_epoch: u64,
    ) -> BoxFuture<'a, Result<TasOutcome, FenceError>> {
        Box::pin(async move {
            validate_name("vm name", vm)?;
            validate_name("node name", node)?;
            let ours = Arc::new(StdMutex::new(Vec::new()));
            self.bounded(self.with_failover(|c| {
                Box::pin(self.tas_once(c, vm, node, expected_epoch, ours.clone()))
            }))
            .await
        })
    }

    fn renew<'a>(
        &'a self,
        vm: &'a str,
        node: &'a str,
        epoch: u64,
    ) -> BoxFuture<'a, Result<LeaseGrant, FenceError>> {
        Box::pin(async move {
            validate_name("vm name", vm)?;
            validate_name("node name", node)?;
            self.bounded(self.with_failover(|c| Box::pin(self.renew_inner(c, vm, node, epoch))))
                .await
        })
    }

    fn release<'a>(
        &'a self,
        vm: &'a str,
        node: &'a str,
        epoch: u64,
    ) -> BoxFuture<'a, Result<(), FenceError>> {
        Box::pin(async move {
            validate_name("vm name", vm)?;
            validate_name("node name", node)?;
            self.bounded(self.with_failover(|c| Box::pin(self.release_inner(c, vm, node, epoch))))
                .await
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
            validate_name("vm name", vm)?;
            validate_name("node name", node)?;
            validate_follower(node, follower)?;
            self.bounded(
                self.with_failover(|c| Box::pin(self.pair_inner(c, vm, node, epoch, follower))),
            )
            .await
        })
    }

    fn read<'a>(&'a self, vm: &'a str) -> BoxFuture<'a, Result<OwnerInfo, FenceError>> {
        Box::pin(async move {
            validate_name("vm name", vm)?;
            self.bounded(self.with_failover(|c| Box::pin(self.read_inner(c, vm))))
                .await
        })
    }

    fn lease_len(&self) -> Duration {
        self.lease
    }

    fn describe(&self) -> String {
        let tls = match &self.tls {
            Some(t) if t.identity.is_some() => ", TLS with a client certificate",
            Some(_) => ", TLS",
            None => "",
        };
        let user = match &self.user {
            Some((u, _)) => format!(", etcd user {u}"),
            None => String::new(),
        };
        format!(
            "etcd cluster [{}] prefix {}{tls}{user}",
            self.eps(),
            self.prefix
        )
    }
}

/// The error and its sources, joined (tonic and hyper put the cause in the sources).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        let t = s.to_string();
        if !out.contains(&t) {
            out.push_str(": ");
            out.push_str(&t);
        }
        src = s.source();
    }
    out
}

enum Kind {
    Auth,
    Tls,
    Other,
}

fn classify(e: &etcd_client::Error, chain: &str, tls: bool) -> Kind {
    if let etcd_client::Error::GRpcStatus(st) = e {
        // gRPC codes PERMISSION_DENIED and UNAUTHENTICATED.
        const PERMISSION_DENIED: i32 = 7;
        const UNAUTHENTICATED: i32 = 16;
        let m = st.message();
        if matches!(i32::from(st.code()), PERMISSION_DENIED | UNAUTHENTICATED)
            || m.contains("authentication failed")
            || m.contains("user name is empty")
            || m.contains("permission denied")
            || m.contains("invalid auth token")
        {
            return Kind::Auth;
        }
    }
    let c = chain.to_ascii_lowercase();
    const TLS_WORDS: [&str; 6] = ["certificate", "tls", "handshake", "alert", "x509", "ssl"];
    if tls && TLS_WORDS.iter().any(|w| c.contains(w)) {
        return Kind::Tls;
    }
    Kind::Other
}
