//! What the live node tells a joining backup: pure logic over the node's current role
//! and its VM (the server asks, `protocol` carries the answer).
//!
//! - `transfer`: the node runs the VM alone (SOLO) at the joiner's epoch, with the same
//!   guest and VM configuration, and the VM runs: the joiner gets its state.
//! - `follow-from-boot`: the node is a primary whose log starts with the VM's boot and
//!   no backup has acked it yet: follow the log as usual.
//! - `retry`: not now, but a restart will not change it: the node still counts on
//!   another backup (it goes solo when that one stops making progress), it is not live
//!   yet or any more (standby, suspended, halted: a restart of it comes back), or the
//!   joiner follows another epoch (it reads the live epoch again before it asks again).
//! - `refused`: never, until an operator changes something: another guest image or VM
//!   configuration, another protocol version (checked by `protocol`).
use super::protocol::{Answer, Hello};
use crate::{role::NodeRole, vm::VmPhase};

/// What the live node knows when a hello arrives.
pub struct NodeView {
    pub role: NodeRole,
    pub phase: VmPhase,
    pub config_hash: u64,
    /// Backups that joined this node so far.
    pub joined: u64,
    /// This node ran the VM without a backup at some point (its log does not start at
    /// the VM's boot any more).
    pub ran_alone: bool,
    /// A backup has acked this node's log (since it went live).
    pub acked_by_a_backup: bool,
}

pub fn decide(hello: &Hello, n: &NodeView) -> (Answer, String) {
    let retry = |why: String| (Answer::Retry, why);
    match &n.role {
        NodeRole::Standby { .. } => retry("this node is not live: it waits to start".into()),
        NodeRole::Backup { .. } => retry("this node is a backup itself".into()),
        NodeRole::Suspended { .. } => {
            retry("this node is suspended (its lease lapsed; it retakes the VM when the arbiter answers)".into())
        }
        NodeRole::Halted { .. } => retry("this node halted (a restart of it joins the live node)".into()),
        NodeRole::Primary { .. } if n.joined == 0 && !n.ran_alone && !n.acked_by_a_backup => (
            Answer::FollowFromBoot,
            "this primary logs from the VM's boot and no backup has acked it yet".into(),
        ),
        NodeRole::Primary { .. } => retry(
            "this primary still counts on its backup (it goes solo when that one stops making progress)"
                .into(),
        ),
        NodeRole::Solo { epoch } if *epoch != hello.epoch => retry(format!(
            "the joining backup follows epoch {}, this node runs epoch {epoch}: it must read the live epoch again",
            hello.epoch
        )),
        NodeRole::Solo { .. } if hello.config_hash != n.config_hash => (
            Answer::Refused,
            format!(
                "another guest image or VM configuration: the joining backup's configuration hash is {:#x}, this node's {:#x}; use the same vm.image and [vm] settings on both hosts",
                hello.config_hash, n.config_hash
            ),
        ),
        NodeRole::Solo { .. } if !n.phase.runs_free_or_records() => {
            retry(format!("the VM is not running ({})", n.phase))
        }
        NodeRole::Solo { .. } => (Answer::Transfer, String::new()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(epoch: u64) -> Hello {
        Hello {
            version: 2,
            node: "b".into(),
            epoch,
            config_hash: 7,
            nonce: String::new(),
            mac: String::new(),
        }
    }

    fn view(role: NodeRole) -> NodeView {
        NodeView {
            role,
            phase: VmPhase::Live,
            config_hash: 7,
            joined: 0,
            ran_alone: true,
            acked_by_a_backup: false,
        }
    }

    #[test]
    fn a_solo_node_transfers_to_a_joiner_of_its_epoch() {
        let (a, _) = decide(&hello(4), &view(NodeRole::Solo { epoch: 4 }));
        assert_eq!(a, Answer::Transfer);
    }

    #[test]
    fn a_joiner_of_another_epoch_is_asked_to_retry_not_refused() {
        // Issue 18: a joiner that restarted right after a cut read epoch 4; the live
        // node has gone solo in epoch 5 since. It must read the epoch again and join.
        let (a, why) = decide(&hello(4), &view(NodeRole::Solo { epoch: 5 }));
        assert_eq!(a, Answer::Retry, "{why}");
        assert!(why.contains("read the live epoch again"), "{why}");
    }

    #[test]
    fn only_another_configuration_is_refused() {
        let mut h = hello(4);
        h.config_hash = 8;
        let (a, why) = decide(&h, &view(NodeRole::Solo { epoch: 4 }));
        assert_eq!(a, Answer::Refused);
        assert!(why.contains("configuration hash"), "{why}");
        for role in [
            NodeRole::Standby {
                waiting: "x".into(),
            },
            NodeRole::Halted {
                epoch: 4,
                reason: "x".into(),
            },
            NodeRole::Suspended {
                epoch: 4,
                why: "x".into(),
            },
            NodeRole::Primary { epoch: 4 },
        ] {
            let (a, why) = decide(&hello(4), &view(role.clone()));
            assert_eq!(a, Answer::Retry, "{role:?}: {why}");
        }
    }

    #[test]
    fn a_primary_from_boot_lets_its_first_backup_follow_from_boot() {
        let mut v = view(NodeRole::Primary { epoch: 1 });
        v.ran_alone = false;
        assert_eq!(decide(&hello(1), &v).0, Answer::FollowFromBoot);
        v.acked_by_a_backup = true;
        assert_eq!(decide(&hello(1), &v).0, Answer::Retry);
    }
}
