//! The arbiters the appliance's tests fence with, in the testbed's arbiter namespace
//! (10.77.0.2, reached over the client bridge): the embedded `ft-arbiter`, or an etcd
//! cluster whose members run there on separate ports.
use std::{net::SocketAddr, time::Duration};

use anyhow::{Context, Result, anyhow, bail};
use ft_fence::testkit::{EtcdCluster, Placement};

use crate::{Appliance, ChildGuard, Testbed, appliance::workspace_bin, names::ARBITER_IP};

/// Address of the embedded arbiter started by [`start_arbiter`].
pub const ARBITER_ADDR: &str = "10.77.0.2:7700";

/// Starts `ft-arbiter` in the testbed's arbiter namespace (state in the temp dir).
pub fn start_arbiter(tb: &Testbed) -> Result<ChildGuard> {
    start_arbiter_bin(tb, &workspace_bin("ft-arbiter", "FT_ARBITER_BIN")?)
}

/// [`start_arbiter`] with another `ft-arbiter` binary (the installed package's).
pub fn start_arbiter_bin(tb: &Testbed, bin: &std::path::Path) -> Result<ChildGuard> {
    let dir = tb.tmp_dir.join("arbiter-state");
    std::fs::create_dir_all(&dir)?;
    let g = tb.spawn(
        &tb.arbiter_ns,
        bin,
        [
            "--listen",
            ARBITER_ADDR,
            "--state-dir",
            dir.to_str().unwrap(),
            "--init",
            "--secret-file",
            arbiter_secret()?.to_str().unwrap(),
        ],
    )?;
    let ok = Appliance::wait_until(Duration::from_secs(10), || {
        crate::netns::try_run_in_ns(&tb.client_ns, || {
            std::net::TcpStream::connect_timeout(
                &ARBITER_ADDR.parse().unwrap(),
                Duration::from_millis(200),
            )
            .is_ok()
        })
        .unwrap_or(false)
    });
    if !ok {
        bail!("ft-arbiter did not come up:\n{}", g.log_contents());
    }
    Ok(g)
}

/// The shared secret of the testbeds' embedded arbiters: one fixed file in the system's
/// temp dir (written if missing; every testbed uses the same secret).
pub fn arbiter_secret() -> Result<std::path::PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let p = std::env::temp_dir().join("ft-testbed-arbiter.secret");
    if !p.exists() {
        let tmp = p.with_extension(format!("{}.tmp", std::process::id()));
        std::fs::write(&tmp, "ft-testbed shared arbiter secret\n")?;
        std::fs::rename(&tmp, &p)?;
    }
    // Readable by its owner only, as a deployment's (`ftd preflight` checks it).
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600))?;
    Ok(p)
}

/// `[fence]` body for the embedded arbiter started by [`start_arbiter`] (authenticated
/// with [`arbiter_secret`]).
pub fn embedded_fence(lease_ms: u64, renew_ms: u64) -> String {
    let secret = arbiter_secret().expect("writing the testbed's arbiter secret");
    format!(
        "backend = \"embedded\"\narbiters = [\"{ARBITER_ADDR}\"]\nlease_ms = {lease_ms}\n\
         renew_interval_ms = {renew_ms}\nrequest_timeout_ms = {}\ndrift_margin_ms = 20\n\
         secret_file = \"{}\"",
        (renew_ms / 2).max(10),
        secret.display()
    )
}

/// The embedded arbiter ([`start_arbiter`], lease `lease_ms`, renewed every fifth of
/// it) and a pair running `vm`, both serving joins, replicating within `timeout`.
pub fn fenced_pair(
    tb: &Testbed,
    vm: crate::VmOptions,
    lease_ms: u64,
    timeout: Duration,
) -> Result<(ChildGuard, Appliance)> {
    let arb = start_arbiter(tb)?;
    let app = Appliance::start_replicating(
        tb,
        &crate::ApplianceOptions {
            vm,
            fence: embedded_fence(lease_ms, lease_ms / 5),
            join: true,
            ..Default::default()
        },
        timeout,
    )?;
    Ok((arb, app))
}

/// An etcd cluster of `n` members in the arbiter namespace (10.77.0.2, one client and one
/// peer port each), data in the testbed's temp dir; killed when dropped.
pub fn start_etcd(tb: &Testbed, n: usize) -> Result<EtcdCluster> {
    let ns = tb.arbiter_ns.clone();
    let probe = move |a: SocketAddr| {
        crate::netns::try_run_in_ns(&ns, || ft_fence::testkit::health_ok(a)).unwrap_or(false)
    };
    EtcdCluster::start_placed(
        n,
        &tb.tmp_dir.join("etcd"),
        Duration::from_secs(30),
        &Placement {
            ip: ARBITER_IP.into(),
            command_prefix: ["ip", "netns", "exec", tb.arbiter_ns.as_str()]
                .map(String::from)
                .to_vec(),
            probe: &probe,
        },
    )
    .map_err(|e| anyhow!(e))
    .context("etcd cluster in the arbiter namespace")
}

/// `[fence]` body for the etcd cluster started by [`start_etcd`].
pub fn etcd_fence(cluster: &EtcdCluster, lease_ms: u64, renew_ms: u64) -> String {
    let eps: Vec<String> = cluster
        .endpoints()
        .iter()
        .map(|e| format!("\"{e}\""))
        .collect();
    format!(
        "backend = \"etcd\"\narbiters = [{}]\nlease_ms = {lease_ms}\n\
         renew_interval_ms = {renew_ms}\nrequest_timeout_ms = {}\ndrift_margin_ms = 20",
        eps.join(", "),
        (renew_ms / 2).max(10)
    )
}

/// Index of the cluster's current leader (asked from the arbiter namespace), bounded by
/// `timeout`; an error when no running member names itself leader in time.
pub fn etcd_leader(tb: &Testbed, cluster: &EtcdCluster, timeout: Duration) -> Result<usize> {
    let mut found = None;
    Appliance::wait_until(timeout, || {
        found = cluster.members.iter().position(|m| {
            m.is_running()
                && crate::netns::try_run_in_ns(&tb.arbiter_ns, || {
                    ft_fence::testkit::is_leader(m.client_addr())
                })
                .ok()
                .flatten()
                    == Some(true)
        });
        found.is_some()
    });
    found.ok_or_else(|| anyhow!("no etcd member is leader after {timeout:?}"))
}
