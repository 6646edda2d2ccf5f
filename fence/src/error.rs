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
