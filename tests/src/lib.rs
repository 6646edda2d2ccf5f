//! Test fixtures for the FT appliance: network namespaces wired like the real
//! deployment, a deterministic VM stand-in service, and raw-frame / UDP helpers.
//!
//! Topology built by [`Testbed::new`] (namespace names `ft<pid>x<n><suffix>`):
//!
//! ```text
//!  client ns "<p>c": br0 10.77.0.1/24 ── pa ── cli0 (10.77.0.11) host A "<p>a" ── vmh ── eth0 VM "<p>va"
//!                         (bridge)    ── pb ── cli0 (10.77.0.12) host B "<p>b" ── vmh ── eth0 VM "<p>vb"
//!                                     ── pr ── eth0 (10.77.0.2) arbiter "<p>r"
//!  host A log0 (10.78.0.1, mtu 2000) ── la ═ wire ns "<p>w" (bridge wbr + nft bridge filter) ═ lb ── log0 host B (10.78.0.2)
//!  VM eth0 on both sides: 02:f7:00:00:00:64 / 10.77.0.100/24, runs `ft-standin` on UDP 7000.
//! ```
//!
//! Usage from another crate: `[dev-dependencies] ft-testbed = { path = "../tests" }`,
//! run as root, and build the stand-in first (`cargo build -p ft-testbed --bins`, same
//! profile and target dir; or set `FT_STANDIN_BIN`) — cargo only builds it automatically
//! for ft-testbed's own tests.
//!
//! ```no_run
//! use ft_testbed::{Testbed, TestbedOptions, names::*};
//! let tb = Testbed::new(TestbedOptions::default())?;
//! // load the data plane on tb.a.ns / tb.b.ns (cli0, log0, vmh) ...
//! let c = tb.vm_client()?; // UDP from the client ns to 10.77.0.100:7000
//! let reply = c.request("PING", std::time::Duration::from_secs(1))?;
//! tb.set_log_loss(Some(10))?; // drop every 10th 0x88b5 frame A->B
//! # Ok::<(), anyhow::Error>(())
//! ```
//!
//! Host A's cli0 and vmh are NOT bridged: only the data plane under test connects them.
//! All setup/teardown commands are scoped to the testbed's own namespaces.

pub mod appliance;
pub mod arbiter;
pub mod attribution;
pub mod chaos;
pub mod child;
pub mod load;
pub mod netns;
pub mod packet;
pub mod raw;
pub mod resp;
pub mod testbed;
pub mod throttle;
pub mod udp;
pub mod workload;

pub use appliance::{Appliance, ApplianceOptions, VmOptions, ftd_bin};
pub use arbiter::{
    ARBITER_ADDR, embedded_fence, etcd_fence, etcd_leader, fenced_pair, start_arbiter,
    start_arbiter_bin, start_etcd,
};
pub use attribution::{Emission, Emissions, VmEmitters};
pub use child::ChildGuard;
pub use netns::{fmt_mac, ifindex, ip, mac, ns_exec, run_in_ns, try_run_in_ns};
pub use packet::{TcpSeg, eth_frame, parse_tcp, parse_udp, udp_checksums_ok, udp_frame};
pub use raw::{BlastStats, Capture, CaptureResult, RawSock, blast, blast_on, monotonic_ns};
pub use testbed::{Host, Impairment, Testbed, TestbedOptions, cleanup_stale, names, standin_bin};
pub use throttle::CpuThrottle;
pub use udp::{UdpClient, spawn_udp_echo};
