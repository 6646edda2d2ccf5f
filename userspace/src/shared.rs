//! What the daemon's parts share with its status and metrics endpoints: the data plane,
//! the channel's counters, the VM's state and the role (read-only for them; the role
//! supervisor changes it).
use std::sync::Arc;

use crate::{channel::status::ChannelStatus, dataplane::DataPlane, role::Roles, vm::VmState};

pub struct Shared {
    pub dp: Arc<DataPlane>,
    pub status: Arc<ChannelStatus>,
    pub node_name: String,
    /// The VMM's state, when ftd runs the VM.
    pub vm: Option<Arc<VmState>>,
    /// The node's role and its history.
    pub roles: Arc<Roles>,
    /// How the previous run of this daemon ended (`daemon::last_exit_path`), if known.
    pub previous_exit: Option<serde_json::Value>,
    /// The channel keys (status shows their ids, never the keys).
    pub keys: Arc<crate::channel::keys::ChannelKeys>,
    /// The arbiter client (None: `[fence] backend = "none"`), for `ftd status`'s view
    /// of the record; the role supervisor has its own handle and makes every decision.
    pub arbiter: Option<Arc<dyn ft_fence::Arbiter>>,
    /// The pair's VM id at the arbiter (`fence.vm`).
    pub vm_id: String,
    /// The peer's node name (`fence.peer`; empty if not configured).
    pub peer_name: String,
}
