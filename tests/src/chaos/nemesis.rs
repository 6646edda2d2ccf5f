//! The nemesis: a fault schedule drawn from a seed, faults applied to the testbed and
//! healed, and the wait for re-protection between faults.
use std::{
    fmt,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use ft_fence::testkit::EtcdCluster;
use rand::{Rng, SeedableRng, rngs::StdRng};
use serde_json::Value;

use crate::{Appliance, Impairment, Testbed, names::*};

/// The kinds of fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FaultKind {
    /// SIGKILL of a host's ftd (its VMM with it).
    KillFtd,
    /// A host loses power: both its NICs go dark and its ftd dies at the same instant.
    PowerCut,
    /// SIGSTOP of a host's ftd for the hold time, then SIGCONT.
    Pause,
    /// The logging link drops everything, both ways.
    LogPartition,
    /// One host's client NIC is cut off the client network.
    ClientPartition,
    /// Random loss and reordering on the logging link, both ways.
    LogLossReorder,
    /// An etcd member is killed, and restarted at the heal.
    EtcdMemberKill,
    /// Neither host reaches the arbiter (etcd).
    ArbiterUnreachable,
    /// A host's ftd killed and started again at once from its config and arguments, as
    /// a service manager does (`Restart=on-failure`): it must never boot a fresh VM.
    RestartFtd,
    /// The backup's ftd throttled to a few percent of a CPU (cgroup): a slow host, not
    /// a dead one; its primary must wait for it.
    ThrottleBackup,
    /// The backup's ftd killed and started again; it joins the primary (now alone) by
    /// state transfer and is killed right after the cut.
    KillJoinerAfterCut,
    /// The backup's ftd killed; once the primary runs alone, the arbiter is unreachable
    /// for longer than the lease: the primary suspends and must retake its epoch.
    ArbiterOutageWhileSolo,
}

pub const ALL_KINDS: [FaultKind; 12] = [
    FaultKind::KillFtd,
    FaultKind::PowerCut,
    FaultKind::Pause,
    FaultKind::LogPartition,
    FaultKind::ClientPartition,
    FaultKind::LogLossReorder,
    FaultKind::EtcdMemberKill,
    FaultKind::ArbiterUnreachable,
    FaultKind::RestartFtd,
    FaultKind::ThrottleBackup,
    FaultKind::KillJoinerAfterCut,
    FaultKind::ArbiterOutageWhileSolo,
];

impl FaultKind {
    /// Faults of one class are never combined (one host fault at a time: the appliance
    /// survives the failure of one host, not of both).
    fn class(self) -> u8 {
        match self {
            FaultKind::KillFtd
            | FaultKind::PowerCut
            | FaultKind::Pause
            | FaultKind::ClientPartition
            | FaultKind::RestartFtd
            | FaultKind::ThrottleBackup => 0,
            FaultKind::LogPartition | FaultKind::LogLossReorder => 1,
            FaultKind::EtcdMemberKill | FaultKind::ArbiterUnreachable => 2,
            // A host fault and an arbiter fault at once.
            FaultKind::ArbiterOutageWhileSolo => 3,
            // Needs the primary to go solo (the arbiter) and a join (the logging link).
            FaultKind::KillJoinerAfterCut => 4,
        }
    }

    /// Whether two faults may be drawn for one step: never two of a class; an arbiter
    /// outage while solo is a host fault and an arbiter fault already (only a logging
    /// link fault goes with it); killing a joiner needs the arbiter and the logging link
    /// (nothing goes with it). (Seen: a joiner to kill while the arbiter was cut off,
    /// and the primary could not go solo for the join.)
    fn combines_with(self, other: FaultKind) -> bool {
        let ok = |a: u8, b: u8| match a {
            3 => b == 1,
            4 => false,
            _ => true,
        };
        let (a, b) = (self.class(), other.class());
        a != b && ok(a, b) && ok(b, a)
    }

    /// The kind named `name` (as [`FaultKind::name`] spells it).
    pub fn from_name(name: &str) -> Option<FaultKind> {
        ALL_KINDS.into_iter().find(|k| k.name() == name)
    }

    pub fn name(self) -> &'static str {
        match self {
            FaultKind::KillFtd => "kill-ftd",
            FaultKind::PowerCut => "power-cut",
            FaultKind::Pause => "pause",
            FaultKind::LogPartition => "log-partition",
            FaultKind::ClientPartition => "client-partition",
            FaultKind::LogLossReorder => "log-loss-reorder",
            FaultKind::EtcdMemberKill => "etcd-member-kill",
            FaultKind::ArbiterUnreachable => "arbiter-unreachable",
            FaultKind::RestartFtd => "restart-ftd",
            FaultKind::ThrottleBackup => "throttle-backup",
            FaultKind::KillJoinerAfterCut => "kill-joiner-after-cut",
            FaultKind::ArbiterOutageWhileSolo => "arbiter-outage-while-solo",
        }
    }
}

/// Which host a host fault hits, named by its role when the fault starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    Primary,
    Backup,
}

#[derive(Clone, Copy, Debug)]
pub struct Fault {
    pub kind: FaultKind,
    pub target: Target,
    /// etcd member (EtcdMemberKill).
    pub member: usize,
    pub impairment: Impairment,
    /// Percent of one CPU the throttled backup gets (ThrottleBackup).
    pub cpu_pct: u32,
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            FaultKind::KillFtd
            | FaultKind::PowerCut
            | FaultKind::Pause
            | FaultKind::ClientPartition
            | FaultKind::RestartFtd => {
                write!(f, "{} of the {:?}", self.kind.name(), self.target)
            }
            FaultKind::ThrottleBackup => {
                write!(f, "{} to {}% of a CPU", self.kind.name(), self.cpu_pct)
            }
            FaultKind::EtcdMemberKill => write!(f, "{} m{}", self.kind.name(), self.member),
            FaultKind::LogLossReorder => write!(
                f,
                "{} ({}% loss, {}% reordered)",
                self.kind.name(),
                self.impairment.loss_pct,
                self.impairment.reorder_pct
            ),
            _ => f.write_str(self.kind.name()),
        }
    }
}

/// One step of the schedule: one or two faults at once, held for `hold`.
#[derive(Clone, Debug)]
pub struct Step {
    pub faults: Vec<Fault>,
    pub hold: Duration,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let fs: Vec<String> = self.faults.iter().map(|x| x.to_string()).collect();
        write!(f, "{} for {} ms", fs.join(" + "), self.hold.as_millis())
    }
}

/// The fault schedule of a seed: `steps` steps, each one fault (two, one time in
/// three, of different classes), held 0.3–3 s, drawn from `kinds`. The same seed and
/// kinds give the same schedule.
pub fn schedule(seed: u64, steps: usize, etcd_members: usize, kinds: &[FaultKind]) -> Vec<Step> {
    let mut rng = StdRng::seed_from_u64(seed);
    let fault = |rng: &mut StdRng, kind: FaultKind| Fault {
        kind,
        target: if rng.random_bool(0.5) {
            Target::Primary
        } else {
            Target::Backup
        },
        member: rng.random_range(0..etcd_members.max(1)),
        impairment: Impairment {
            loss_pct: rng.random_range(5..=30),
            reorder_pct: rng.random_range(10..=40),
        },
        cpu_pct: rng.random_range(5..=30),
    };
    (0..steps)
        .map(|_| {
            let first = kinds[rng.random_range(0..kinds.len())];
            let mut faults = vec![fault(&mut rng, first)];
            let others: Vec<FaultKind> = kinds
                .iter()
                .copied()
                .filter(|k| first.combines_with(*k))
                .collect();
            if rng.random_bool(1.0 / 3.0) && !others.is_empty() {
                let second = others[rng.random_range(0..others.len())];
                faults.push(fault(&mut rng, second));
            }
            Step {
                faults,
                hold: Duration::from_millis(rng.random_range(300..=3000)),
            }
        })
        .collect()
}

/// What an applied fault left to undo.
#[derive(Clone, Copy, Debug)]
enum Undo {
    Resume(char),
    LinksUp(char),
    ClientLinkUp(char),
    LogLinkUp,
    NoImpairment,
    RestartMember(usize),
    ArbiterUp,
    Unthrottle,
    Nothing,
}

/// Drives the testbed's faults.
pub struct Nemesis<'a> {
    pub tb: &'a Testbed,
    pub app: &'a mut Appliance,
    pub etcd: &'a mut EtcdCluster,
    /// The arbiter's lease (an outage while solo lasts at least this plus 1 s).
    pub lease: Duration,
    undo: Vec<Undo>,
    throttle: Option<crate::CpuThrottle>,
}

pub fn other(h: char) -> char {
    if h == 'a' { 'b' } else { 'a' }
}

impl<'a> Nemesis<'a> {
    pub fn new(
        tb: &'a Testbed,
        app: &'a mut Appliance,
        etcd: &'a mut EtcdCluster,
        lease: Duration,
    ) -> Self {
        Nemesis {
            tb,
            app,
            etcd,
            lease,
            undo: Vec::new(),
            throttle: None,
        }
    }

    /// How long `step` must hold: an arbiter outage while solo outlasts the lease.
    pub fn hold(&self, step: &Step) -> Duration {
        if step
            .faults
            .iter()
            .any(|f| f.kind == FaultKind::ArbiterOutageWhileSolo)
        {
            step.hold.max(self.lease + Duration::from_secs(1))
        } else {
            step.hold
        }
    }

    /// Waits (bounded) until `h` runs the VM alone.
    fn wait_solo(&self, h: char, what: &str) -> Result<()> {
        if !Appliance::wait_until(Duration::from_secs(30), || {
            self.status(h).is_some_and(|s| s["role"] == "solo")
        }) {
            bail!(
                "{what}: host {h} did not run alone within 30 s: {:#}",
                self.status(h).unwrap_or_default()
            );
        }
        Ok(())
    }

    fn ns(&self, h: char) -> &str {
        if h == 'a' {
            &self.tb.a.ns
        } else {
            &self.tb.b.ns
        }
    }

    /// Applies a step's faults; `primary` is the current primary.
    pub fn apply(&mut self, step: &Step, primary: char) -> Result<()> {
        for f in &step.faults {
            let host = match f.target {
                Target::Primary => primary,
                Target::Backup => other(primary),
            };
            let undo = match f.kind {
                FaultKind::KillFtd => {
                    self.app.guard(host).kill()?;
                    Undo::Nothing
                }
                FaultKind::PowerCut => {
                    let ns = self.ns(host).to_string();
                    self.tb.set_link(&ns, CLI_IF, false)?;
                    self.tb.set_link(&ns, LOG_IF, false)?;
                    self.app.guard(host).kill()?;
                    Undo::LinksUp(host)
                }
                FaultKind::Pause => {
                    self.app.pause(host)?;
                    Undo::Resume(host)
                }
                FaultKind::ClientPartition => {
                    // The host's NIC, as when its cable is pulled: the bridge port
                    // stays up (its capture goes on) and loses carrier.
                    let ns = self.ns(host).to_string();
                    self.tb.set_link(&ns, CLI_IF, false)?;
                    Undo::ClientLinkUp(host)
                }
                FaultKind::LogPartition => {
                    self.tb.set_log_link_down(true)?;
                    Undo::LogLinkUp
                }
                FaultKind::LogLossReorder => {
                    self.tb.set_log_impairment(Some(f.impairment))?;
                    Undo::NoImpairment
                }
                FaultKind::EtcdMemberKill => {
                    self.etcd.members[f.member].kill();
                    Undo::RestartMember(f.member)
                }
                FaultKind::ArbiterUnreachable => {
                    self.tb.set_link(&self.tb.client_ns, BR_PORT_R, false)?;
                    Undo::ArbiterUp
                }
                FaultKind::RestartFtd => {
                    self.app.guard(host).kill()?;
                    self.app
                        .restart_configured(self.tb, host)
                        .with_context(|| format!("restarting host {host}'s ftd"))?;
                    Undo::Nothing
                }
                FaultKind::ThrottleBackup => {
                    let b = other(primary);
                    self.throttle = Some(crate::CpuThrottle::new(
                        "ft-chaos-throttle",
                        self.app.guard(b).pid(),
                        f.cpu_pct,
                        100_000,
                    )?);
                    Undo::Unthrottle
                }
                FaultKind::KillJoinerAfterCut => {
                    let b = other(primary);
                    self.app.guard(b).kill()?;
                    self.wait_solo(primary, "kill-joiner-after-cut")?;
                    self.app.restart_configured(self.tb, b)?;
                    // The cut: the live node pairs with the joiner.
                    if !Appliance::wait_until(Duration::from_secs(60), || {
                        self.status(primary).is_some_and(|s| s["role"] == "primary")
                    }) {
                        bail!(
                            "kill-joiner-after-cut: no cut within 60 s: {:#}",
                            self.status(primary).unwrap_or_default()
                        );
                    }
                    self.app.guard(b).kill()?;
                    Undo::Nothing
                }
                FaultKind::ArbiterOutageWhileSolo => {
                    self.app.guard(other(primary)).kill()?;
                    self.wait_solo(primary, "arbiter-outage-while-solo")?;
                    self.tb.set_link(&self.tb.client_ns, BR_PORT_R, false)?;
                    Undo::ArbiterUp
                }
            };
            self.undo.push(undo);
        }
        Ok(())
    }

    /// Undoes every applied fault (a killed ftd stays dead: [`Nemesis::reprotect`]
    /// restarts it).
    pub fn heal(&mut self) -> Result<()> {
        for u in std::mem::take(&mut self.undo).into_iter().rev() {
            match u {
                Undo::Resume(h) => self.app.resume(h)?,
                Undo::LinksUp(h) => {
                    let ns = self.ns(h).to_string();
                    self.tb.set_link(&ns, CLI_IF, true)?;
                    self.tb.set_link(&ns, LOG_IF, true)?;
                }
                Undo::ClientLinkUp(h) => {
                    let ns = self.ns(h).to_string();
                    self.tb.set_link(&ns, CLI_IF, true)?;
                }
                Undo::LogLinkUp => self.tb.set_log_link_down(false)?,
                Undo::NoImpairment => self.tb.set_log_impairment(None)?,
                Undo::RestartMember(m) => {
                    self.etcd.members[m].restart().map_err(anyhow::Error::msg)?
                }
                Undo::ArbiterUp => self.tb.set_link(&self.tb.client_ns, BR_PORT_R, true)?,
                Undo::Unthrottle => drop(self.throttle.take()),
                Undo::Nothing => {}
            }
        }
        Ok(())
    }

    /// Status of host `h`, None if its ftd is dead or does not answer.
    pub fn status(&self, h: char) -> Option<Value> {
        let g = if h == 'a' { &self.app.a } else { &self.app.b };
        if !g.as_ref().is_some_and(|g| g.is_running()) {
            return None;
        }
        self.app.status(h).ok()
    }

    /// The host running the VM as primary or alone (not halted), if exactly one does.
    /// Both can say so for a moment after a partition heals: the one that was cut off
    /// learns that the other took a newer epoch at its next arbiter call, and halts
    /// (its kernel fences its output meanwhile).
    pub fn live(&self) -> Option<char> {
        let live: Vec<char> = ['a', 'b']
            .into_iter()
            .filter(|&h| {
                self.status(h).is_some_and(|s| {
                    (s["role"] == "primary" || s["role"] == "solo")
                        && s["halted"] != true
                        && (s["vm"]["phase"] == "recording" || s["vm"]["phase"] == "live")
                })
            })
            .collect();
        match live[..] {
            [h] => Some(h),
            _ => None,
        }
    }

    /// `p` is a paired primary and the other host a backup replaying its log, with
    /// checkpoints verified: the VM is protected.
    pub fn protected_by(&self, p: char) -> bool {
        let (Some(ps), Some(bs)) = (self.status(p), self.status(other(p))) else {
            return false;
        };
        ps["role"] == "primary"
            && ps["halted"] != true
            && ps["peer_alive"] == true
            && bs["role"] == "backup"
            && bs["halted"] != true
            && bs["channel"]["stopped_acking"] != true
            && bs["peer_alive"] == true
            && bs["vm"]["phase"] == "replaying"
            && bs["vm"]["checkpoints_verified"].as_u64().unwrap_or(0) > 0
    }

    /// A divergence either host reports, as text.
    pub fn divergence(&self) -> Option<String> {
        ['a', 'b'].into_iter().find_map(|h| {
            let s = self.status(h)?;
            (!s["vm"]["divergence"].is_null())
                .then(|| format!("host {h}: {}", s["vm"]["divergence"]))
        })
    }

    /// The live host once the roles settled: exactly one host runs the VM, and the
    /// other does not claim it (a backup that is taking over is SOLO before its VM went
    /// live: it must not be mistaken for a stale backup and restarted).
    fn settled(&self) -> Option<char> {
        let l = self.live()?;
        let claims = self.status(other(l)).is_some_and(|s| {
            s["halted"] != true && (s["role"] == "solo" || s["role"] == "primary")
        });
        (!claims).then_some(l)
    }

    /// After a heal: waits until the roles settled, then for the VM to be protected
    /// again. The other host's ftd is started again from its config (it joins) when it
    /// is dead or halted, or when it stays a backup that does not follow the live host for 5 s (a
    /// backup that was cut off may be about to halt, or catching up). Returns the primary
    /// and how many ftd were restarted. Bounded by `timeout`.
    pub fn reprotect(&mut self, timeout: Duration) -> Result<(char, usize)> {
        let end = Instant::now() + timeout;
        let mut restarted = 0;
        // (live host, since when its peer has been a backup that does not follow it)
        let mut stale_since: Option<(char, Instant)> = None;
        // Restarts made for the current live host.
        let mut restarts: (char, usize) = (' ', 0);
        // The other host's checkpoints verified when first seen (by its pid): protection
        // needs one more, verified after the heal (right after a heal both hosts can
        // still look paired while they are in the middle of a failover).
        let mut verified_at_heal: Option<(u64, u64)> = None;
        while Instant::now() < end {
            let Some(live) = self.settled() else {
                stale_since = None;
                std::thread::sleep(Duration::from_millis(20));
                continue;
            };
            let o = other(live);
            if self.protected_by(live) {
                let st = self.status(o).unwrap_or_default();
                let (pid, v) = (
                    st["pid"].as_u64().unwrap_or(0),
                    st["vm"]["checkpoints_verified"].as_u64().unwrap_or(0),
                );
                match verified_at_heal {
                    Some((p, v0)) if p == pid && v > v0 => return Ok((live, restarted)),
                    Some((p, _)) if p == pid => {}
                    _ => verified_at_heal = Some((pid, v)),
                }
            }
            let dead_or_halted = self.status(o).is_none_or(|s| s["halted"] == true);
            let since = match stale_since {
                Some((l, t)) if l == live => t,
                _ => {
                    stale_since = Some((live, Instant::now()));
                    Instant::now()
                }
            };
            if restarts.0 != live {
                restarts = (live, 0);
            }
            // A restarted backup then joins, which takes a while: it is restarted again
            // only if it dies or halts (at most 3 times); failing that, the wait ends in
            // the time-out below.
            // A backup that stopped acking is taking over (or blocked at the arbiter
            // doing so): never restarted while it is not halted.
            let taking_over = self
                .status(o)
                .is_some_and(|s| s["channel"]["stopped_acking"] == true);
            let stale = restarts.1 == 0 && !taking_over && since.elapsed() > Duration::from_secs(5);
            if restarts.1 < 3 && (dead_or_halted || stale) {
                // As a service manager would: its config and arguments (host A keeps its
                // --bootstrap: ignored once a VM of the pair has lived).
                self.app.guard(o).kill()?;
                self.app
                    .restart_configured(self.tb, o)
                    .with_context(|| format!("restarting host {o}'s ftd"))?;
                restarted += 1;
                restarts.1 += 1;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!(
            "not protected again within {timeout:?}:\nA: {:#}\nB: {:#}",
            self.status('a').unwrap_or_default(),
            self.status('b').unwrap_or_default()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_combine_only_faults_that_can_happen_together() {
        for seed in 0..20 {
            for step in schedule(seed, 500, 3, &ALL_KINDS) {
                let kinds: Vec<FaultKind> = step.faults.iter().map(|f| f.kind).collect();
                if let [a, b] = kinds[..] {
                    assert_ne!(a.class(), b.class(), "{step}");
                    assert!(
                        !kinds.contains(&FaultKind::KillJoinerAfterCut),
                        "kill-joiner-after-cut with another fault: {step}"
                    );
                    if kinds.contains(&FaultKind::ArbiterOutageWhileSolo) {
                        let other = if a == FaultKind::ArbiterOutageWhileSolo {
                            b
                        } else {
                            a
                        };
                        assert_eq!(other.class(), 1, "{step}");
                    }
                }
            }
        }
    }
}
