//! Re-protection: a backup joins a node that runs the VM alone (SOLO) by live state
//! transfer over TCP on the logging link (`channel.join_listen` / `channel.join_peer`).
//!
//! - `protocol`: the messages and the handshake (both sides prove the channel key);
//! - `policy`: what the live node answers, from its current role and VM;
//! - `server`: the live node's service, the transfer and its cut (where the role
//!   supervisor pairs the new backup);
//! - `client`: the joining backup, which asks until it gets the VM.
//!
//! The joining backup knows the live epoch from the arbiter. On `transfer` the VMM's
//! state streams over (pre-copy while the VM runs, then the stop at a guest exit;
//! `ft_vmm::transfer`). At the cut the live node becomes PRIMARY: from that exit on,
//! input is duplicated and logged and output waits for the new backup's acks. The backup
//! restores the state, starts its channel at the cut's positions and replays; the
//! primary's role supervisor pairs it at the arbiter (same epoch) and watches its
//! progress as for any backup, with a grace period for the first ack.
pub mod client;
pub mod policy;
pub mod protocol;
pub mod secure;
pub mod server;
