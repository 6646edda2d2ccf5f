//! How a node starts: boot the guest image, follow a live node as its backup, or wait.
//! Pure logic over what the arbiter says (the supervisor does the asking).
//!
//! The arbiter records a VM's life: its epoch is 0 until a node first went live, and
//! only grows. So epoch > 0 means a VM of this pair has lived, and its state is on
//! whatever node runs it now, or nowhere. A node boots the image only on the pair's
//! very first start (epoch 0), or when the operator says the old VM is lost
//! (`ftd run --bootstrap --force`); every other start follows the live node (and joins
//! it by state transfer) or waits for one. A restarted daemon therefore never boots a
//! fresh VM over a live one's state, whatever its configured role.
use std::time::Duration;

use ft_fence::OwnerInfo;

use crate::config::Role;

/// What the operator asked for on the command line.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Bootstrap {
    /// Nothing: the configured role decides.
    #[default]
    No,
    /// `--bootstrap`: this is the pair's first start; boot the image if no VM of this
    /// pair has ever run (else as `auto`).
    First,
    /// `--bootstrap --force`: the old VM is lost (no node holds it); boot a fresh one
    /// even though the arbiter records an earlier one. Never while a node holds a lease.
    Force,
}

/// The decision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Start {
    /// Boot the guest image and go live by test-and-set at `expected_epoch`.
    Boot { expected_epoch: u64 },
    /// A node runs the VM live at `epoch`: follow it as a backup (join it).
    Follow { epoch: u64 },
    /// Nobody runs the VM now: wait and ask again; the text says for what and what an
    /// operator can do.
    Wait(String),
    /// The command line asks for something unsafe: do not start (the text says why).
    Refuse(String),
}

/// Decides how `node` (configured `role`) starts, given the arbiter's record of the VM
/// (`None`: `[fence] backend = "none"`, no arbiter: the configured role decides, with
/// `channel.epoch`).
pub fn decide(
    role: Role,
    bootstrap: Bootstrap,
    node: &str,
    info: Option<&OwnerInfo>,
    static_epoch: u64,
) -> Start {
    let Some(info) = info else {
        return match role {
            Role::Primary | Role::Solo => Start::Boot { expected_epoch: 0 },
            Role::Backup | Role::Auto => Start::Follow {
                epoch: static_epoch,
            },
        };
    };
    let first_start = info.epoch == 0;
    if first_start {
        if bootstrap != Bootstrap::No || matches!(role, Role::Primary | Role::Solo) {
            return Start::Boot { expected_epoch: 0 };
        }
        return Start::Wait(
            "no VM of this pair has run yet (epoch 0 at the arbiter): the pair's first start \
             boots on one node, `ftd run --bootstrap` (or [node] role = \"primary\" there); \
             this node then follows it"
                .into(),
        );
    }
    let live_elsewhere = info
        .owner
        .as_deref()
        .is_some_and(|o| o != node && info.lease_remaining > Duration::ZERO);
    if live_elsewhere {
        let owner = info.owner.as_deref().unwrap_or("?");
        if bootstrap == Bootstrap::Force {
            return Start::Refuse(format!(
                "--bootstrap --force: the VM lives on {owner} (epoch {}, lease held): a fresh \
                 VM is never booted over a live one; start without --bootstrap and this node \
                 joins it",
                info.epoch
            ));
        }
        if role == Role::Solo {
            return Start::Refuse(format!(
                "role = \"solo\", but the VM lives on {owner} (epoch {}): a solo node runs the \
                 VM alone and cannot join it; stop it there first, or run this node as \
                 role = \"auto\" to protect it",
                info.epoch
            ));
        }
        return Start::Follow { epoch: info.epoch };
    }
    if bootstrap == Bootstrap::Force {
        return Start::Boot {
            expected_epoch: info.epoch,
        };
    }
    let last = match info.owner.as_deref() {
        Some(o) if o == node => "this node, before it restarted".to_string(),
        Some(o) => format!("{o}, whose lease has lapsed"),
        None => "nobody (released)".to_string(),
    };
    Start::Wait(format!(
        "the VM of epoch {} is not live on any node (last owner: {last}): waiting for the \
         peer to run it and for a live node to join. If no node holds the VM any more (both \
         hosts lost it), `ftd run --bootstrap --force` boots a fresh one: everything the old \
         VM held is lost",
        info.epoch
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(epoch: u64, owner: Option<&str>, lease_ms: u64) -> OwnerInfo {
        OwnerInfo {
            owner: owner.map(String::from),
            epoch,
            lease_remaining: Duration::from_millis(lease_ms),
        }
    }

    fn d(role: Role, b: Bootstrap, i: OwnerInfo) -> Start {
        decide(role, b, "a", Some(&i), 1)
    }

    #[test]
    fn only_the_first_start_of_a_pair_boots() {
        let first = info(0, None, 0);
        assert_eq!(
            d(Role::Primary, Bootstrap::No, first.clone()),
            Start::Boot { expected_epoch: 0 }
        );
        assert_eq!(
            d(Role::Auto, Bootstrap::First, first.clone()),
            Start::Boot { expected_epoch: 0 }
        );
        assert!(
            matches!(d(Role::Auto, Bootstrap::No, first.clone()), Start::Wait(w) if w.contains("--bootstrap"))
        );
        assert!(matches!(
            d(Role::Backup, Bootstrap::No, first),
            Start::Wait(_)
        ));
    }

    #[test]
    fn a_restart_never_boots_over_a_vm_that_lived() {
        // The scenario of issue 18: A (configured primary) restarted while its own lease
        // from before the restart is still valid at the arbiter, B paired: wait for B.
        for role in [Role::Primary, Role::Auto, Role::Backup] {
            for b in [Bootstrap::No, Bootstrap::First] {
                let s = d(role, b, info(7, Some("a"), 1500));
                assert!(
                    matches!(&s, Start::Wait(w) if w.contains("epoch 7") && w.contains("before it restarted")),
                    "{role:?} {b:?}: {s:?}"
                );
                // The lease lapsed, nobody took over: still wait (never boot).
                let s = d(role, b, info(7, Some("b"), 0));
                assert!(
                    matches!(&s, Start::Wait(w) if w.contains("--force")),
                    "{s:?}"
                );
                // Another node is live: follow it.
                assert_eq!(
                    d(role, b, info(8, Some("b"), 1500)),
                    Start::Follow { epoch: 8 }
                );
            }
        }
    }

    #[test]
    fn force_boots_only_when_no_node_holds_a_lease() {
        assert_eq!(
            d(Role::Auto, Bootstrap::Force, info(7, Some("b"), 0)),
            Start::Boot { expected_epoch: 7 }
        );
        assert!(matches!(
            d(Role::Auto, Bootstrap::Force, info(7, Some("b"), 900)),
            Start::Refuse(r) if r.contains("lives on b")
        ));
    }

    #[test]
    fn a_solo_node_never_joins() {
        assert!(matches!(
            d(Role::Solo, Bootstrap::No, info(3, Some("b"), 900)),
            Start::Refuse(_)
        ));
        assert_eq!(
            d(Role::Solo, Bootstrap::No, info(0, None, 0)),
            Start::Boot { expected_epoch: 0 }
        );
    }

    #[test]
    fn without_an_arbiter_the_configured_role_decides() {
        assert_eq!(
            decide(Role::Primary, Bootstrap::No, "a", None, 5),
            Start::Boot { expected_epoch: 0 }
        );
        assert_eq!(
            decide(Role::Backup, Bootstrap::No, "a", None, 5),
            Start::Follow { epoch: 5 }
        );
    }
}
