//! Error types. Every message says what happened and what the operator should do.
use std::time::Duration;

use thiserror::Error;

/// Errors of arbiter operations (client side). Any of these from `test_and_set` means
/// this node did NOT become owner; from `renew` it means the lease was NOT extended.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum FenceError {
    #[error(
        "arbiter {addr} unreachable ({cause}); this node will not go live until it can reach the arbiter"
    )]
    Unreachable { addr: String, cause: String },

    #[error(
        "arbiter {addr} did not answer within {} ms; this node will not go live (nor keep a lease) until the arbiter answers in time: check the network path and the arbiter's load, or raise fence.request_timeout_ms",
        after.as_millis()
    )]
    Timeout { addr: String, after: Duration },

    #[error(
        "node {node} is fenced for vm {vm}: it held epoch {epoch} but the arbiter now records {} at epoch {current_epoch}; it must stop serving at once and rejoin as backup",
        owner_text(current_owner)
    )]
    Fenced {
        vm: String,
        node: String,
        epoch: u64,
        current_owner: Option<String>,
        current_epoch: u64,
    },

    #[error(
        "arbiter {addr} sent a malformed reply ({detail}); check that the arbiter and this node run the same ft-fence version"
    )]
    Protocol { addr: String, detail: String },

    #[error("arbiter {addr} rejected the request: {detail}")]
    Rejected { addr: String, detail: String },

    #[error(
        "etcd cluster [{endpoints}] failed: {detail}; this node will not go live (nor keep a lease) until a quorum of the etcd members is reachable"
    )]
    Etcd { endpoints: String, detail: String },

    /// A TLS handshake or certificate check failed (`tls`), or, without TLS, a member
    /// closed plain connections before it ever answered, as a member that serves https
    /// only does.
    #[error("{}", tls_text(endpoints, *tls, detail))]
    EtcdTls {
        endpoints: String,
        /// Whether this node speaks TLS to etcd (fence.etcd_ca_file set).
        tls: bool,
        detail: String,
    },

    #[error(
        "the etcd cluster [{endpoints}] refused {}: {detail}; this node will not go live (nor keep a lease) until etcd accepts it: {}",
        user.as_deref().map_or("this node (no fence.etcd_user set)".to_string(), |u| format!("etcd user {u:?}")),
        auth_hint(user.is_some())
    )]
    EtcdAuth {
        endpoints: String,
        user: Option<String>,
        detail: String,
    },

    #[error("invalid {what} {value:?}: {why}")]
    InvalidName {
        what: &'static str,
        value: String,
        why: &'static str,
    },
}

fn owner_text(owner: &Option<String>) -> String {
    match owner {
        Some(o) => format!("owner {o}"),
        None => "no owner".to_string(),
    }
}

fn tls_text(endpoints: &str, tls: bool, detail: &str) -> String {
    if tls {
        format!(
            "TLS with the etcd cluster [{endpoints}] failed: {detail}; this node will not go live (nor keep a lease) until TLS works: check that fence.etcd_ca_file is the CA that signed the members' certificates, that those certificates name the host written in fence.arbiters, and, for members started with --client-cert-auth, that fence.etcd_cert_file/etcd_key_file hold a client certificate signed by the members' --trusted-ca-file"
        )
    } else {
        format!(
            "the etcd cluster [{endpoints}] closed plain-http connections before answering any request ({detail}), as members that serve TLS only do; this node will not go live (nor keep a lease) until it can talk to etcd: if the members serve https, set fence.etcd_ca_file (and fence.etcd_cert_file/etcd_key_file if they require client certificates); otherwise check that a quorum of them is up"
        )
    }
}

fn auth_hint(user: bool) -> &'static str {
    if user {
        "check fence.etcd_user and the password in fence.etcd_password_file, and that the user's role grants readwrite on fence.etcd_prefix"
    } else {
        "etcd authentication is enabled on the cluster: set fence.etcd_user and fence.etcd_password_file (a user whose role grants readwrite on fence.etcd_prefix)"
    }
}

impl FenceError {
    /// True when the arbiter positively said this node no longer owns the VM (as
    /// opposed to "could not ask"). Both mean "do not serve", but only this one is final.
    pub fn is_fenced(&self) -> bool {
        matches!(self, FenceError::Fenced { .. })
    }
}

/// Errors of the embedded arbiter server (startup and storage).
#[derive(Debug, Error)]
pub enum ServeError {
    #[error(
        "arbiter state file {path} is unreadable or corrupt ({cause}); refusing to start because starting empty would reuse epochs: restore the file from a backup, or (only with both FT nodes stopped) move it away to start over"
    )]
    CorruptState { path: String, cause: String },

    #[error(
        "arbiter state directory {path} unusable ({cause}); create it (writable, on a local disk) and retry"
    )]
    StateDir { path: String, cause: String },

    #[error(
        "arbiter state directory {path} is locked by another running ft-arbiter; two arbiters must never share one state directory"
    )]
    Locked { path: String },

    #[error(
        "cannot persist arbiter state to {path}: {cause}; state changes are refused until storage works"
    )]
    Storage { path: String, cause: String },

    #[error(
        "no arbiter state file at {path}: if this is the arbiter's first start, start it once with --init; if the state was lost, the epochs granted before are unknown and starting empty could grant one again: restore the file from a backup, or (only with every FT node stopped) start with --init and give the protected VM a new name"
    )]
    NoState { path: String },

    #[error(
        "--init asked for a new, empty arbiter state, but {path} exists (epochs were granted): start without --init to keep it"
    )]
    InitWithState { path: String },

    #[error("arbiter listener failed: {0}")]
    Io(#[from] std::io::Error),
}
