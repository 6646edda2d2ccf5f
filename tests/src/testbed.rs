//! The FT testbed: client network (bridge), hosts A/B, VM stand-ins, lossy logging wire,
//! arbiter — each in its own network namespace.

use crate::child::ChildGuard;
use crate::netns::{self, ip, list_netns, netns_pids, ns_exec, run_cmd, run_cmd_stdin, sysctl};
use anyhow::{Context, Result, bail};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// Interface and address constants.
pub mod names {
    use std::net::Ipv4Addr;
    /// Bridge in the client namespace.
    pub const BRIDGE: &str = "br0";
    /// Client-facing NIC of a host.
    pub const CLI_IF: &str = "cli0";
    /// Logging NIC of a host.
    pub const LOG_IF: &str = "log0";
    /// Host side of the veth into the VM stand-in namespace.
    pub const VMH_IF: &str = "vmh";
    /// The VMM's TAP (created by ftd in the host namespace when it runs the VMM).
    pub const VM_TAP: &str = "vmtap";
    /// TCP port of the VMM guest's service.
    pub const VM_PORT: u16 = 6379;
    /// NIC of a VM stand-in.
    pub const VM_IF: &str = "eth0";
    /// NIC of the arbiter.
    pub const ARB_IF: &str = "eth0";
    /// Bridge port (client ns) peered with host A's cli0.
    pub const BR_PORT_A: &str = "pa";
    /// Bridge port (client ns) peered with host B's cli0.
    pub const BR_PORT_B: &str = "pb";
    /// Bridge port (client ns) peered with the arbiter's eth0.
    pub const BR_PORT_R: &str = "pr";
    /// Wire-ns veth peered with host A's log0.
    pub const WIRE_A: &str = "la";
    /// Wire-ns veth peered with host B's log0.
    pub const WIRE_B: &str = "lb";
    /// nftables table (bridge family) in the wire namespace.
    pub const WIRE_TABLE: &str = "wire";
    /// Bridge joining `la` and `lb` in the wire namespace.
    pub const WIRE_BRIDGE: &str = "wbr";
    /// Wire-ns veth peered with the forger's `FORGER_IF` (a third host on the logging
    /// link, [`crate::TestbedOptions::forger`]).
    pub const WIRE_F: &str = "lf";
    /// The forger's NIC on the logging wire.
    pub const FORGER_IF: &str = "fg0";

    pub const CLIENT_NET_PREFIX: u8 = 24;
    /// Client host address (on br0).
    pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
    /// Arbiter address.
    pub const ARBITER_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
    /// Host A / B client-NIC addresses.
    pub const HOST_A_CLI_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 11);
    pub const HOST_B_CLI_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 12);
    /// Host A / B logging-NIC addresses (10.78.0.0/24).
    pub const HOST_A_LOG_IP: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 1);
    pub const HOST_B_LOG_IP: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 2);
    /// The replicated VM's address and MAC (same on both stand-ins).
    pub const VM_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 100);
    pub const VM_MAC: [u8; 6] = [0x02, 0xf7, 0x00, 0x00, 0x00, 0x64];
    /// UDP port of the stand-in key-value service.
    pub const STANDIN_PORT: u16 = 7000;
    /// EtherType of the FT logging protocol (what `set_log_loss` drops).
    pub const LOG_ETHERTYPE: u16 = 0x88b5;
    /// MTU of log0 / la / lb.
    pub const LOG_MTU: u32 = 2000;
}
use names::*;

/// Options for [`Testbed::new`].
#[derive(Debug, Clone)]
pub struct TestbedOptions {
    /// Start `ft-standin` in both VM namespaces (default true).
    pub start_standins: bool,
    /// Pass `--quiet` to the stand-ins (default false: they log every request).
    pub quiet_standins: bool,
    /// Turn TX checksum offload off on every interface that originates traffic (br0,
    /// arbiter eth0, hosts' cli0/log0/vmh) so all frames carry complete checksums
    /// (default true). The VM stand-ins' eth0 always has it off.
    pub full_checksums: bool,
    /// Keep the temp dir (logs) even on success (default: env FT_KEEP_LOGS is set).
    pub keep_logs: bool,
    /// Path of the `ft-standin` binary (default: see [`standin_bin`]).
    pub standin_bin: Option<PathBuf>,
    /// A third host on the logging wire (namespace [`Testbed::forger_ns`], NIC
    /// `FORGER_IF`): it can send any frame to either host, with any source MAC (its
    /// bridge port does not learn, so a forged source never draws A's or B's traffic
    /// away). Default false.
    pub forger: bool,
}

impl Default for TestbedOptions {
    fn default() -> Self {
        TestbedOptions {
            start_standins: true,
            quiet_standins: false,
            full_checksums: true,
            keep_logs: std::env::var_os("FT_KEEP_LOGS").is_some(),
            standin_bin: None,
            forger: false,
        }
    }
}

/// One FT host (A or B) and its VM stand-in.
#[derive(Debug, Clone)]
pub struct Host {
    /// "a" or "b".
    pub label: &'static str,
    /// Host namespace (holds cli0, log0, vmh).
    pub ns: String,
    /// VM stand-in namespace (holds eth0 = VM_MAC / VM_IP).
    pub vm_ns: String,
    pub cli_ip: Ipv4Addr,
    pub log_ip: Ipv4Addr,
    pub cli_mac: [u8; 6],
    pub log_mac: [u8; 6],
    pub vmh_mac: [u8; 6],
    /// ifindexes inside `ns`.
    pub cli_ifindex: u32,
    pub log_ifindex: u32,
    pub vmh_ifindex: u32,
    /// MAC of the bridge port (client ns) facing this host's cli0.
    pub br_port_mac: [u8; 6],
    /// MAC of the wire veth (wire ns) facing this host's log0.
    pub wire_mac: [u8; 6],
}

#[derive(Debug, Default, Clone, Copy)]
struct WireState {
    loss_every_nth: Option<u32>,
    down: bool,
    /// Drop VMLOG frames (the VMM stream) going A→B.
    block_vmlog: bool,
    /// Overwrite two bytes of the value of the first CLOCK entry of one VMLOG frame A→B.
    corrupt_vmlog: bool,
    /// Overwrite four bytes of one state-transfer segment (TCP from port 7480).
    corrupt_transfer: bool,
    /// Random loss and reordering of every frame on the wire, both directions.
    impairment: Option<Impairment>,
}

/// Random impairment of the logging wire, in both directions: `loss_pct` % of frames
/// dropped, `reorder_pct` % sent through a slow queue (an HTB class of 2 Mbit/s on the
/// wire port towards the receiving host), so that later frames overtake them. The
/// kernel here has no netem; the random choice is nftables' `numgen random`, the delay
/// is HTB's, selected by `skb->priority`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Impairment {
    pub loss_pct: u8,
    pub reorder_pct: u8,
}

static COUNTER: AtomicU32 = AtomicU32::new(0);
/// Serialises `ip netns add/del` within the process (first-use mount races in iproute2).
static NS_LOCK: Mutex<()> = Mutex::new(());

/// A complete testbed. Everything is torn down on drop.
pub struct Testbed {
    /// Name prefix `ft<pid>x<n>`; every namespace name starts with it.
    pub prefix: String,
    /// Client network + client host (bridge br0, 10.77.0.1).
    pub client_ns: String,
    /// Arbiter (eth0, 10.77.0.2).
    pub arbiter_ns: String,
    /// Logging wire between A.log0 and B.log0 (veths la, lb on a bridge; nftables bridge filter).
    pub wire_ns: String,
    /// The forger on the logging wire (empty unless [`TestbedOptions::forger`]).
    pub forger_ns: String,
    pub a: Host,
    pub b: Host,
    /// MAC of br0 (the client host's MAC).
    pub client_mac: [u8; 6],
    /// MAC of the arbiter's eth0.
    pub arbiter_mac: [u8; 6],
    /// Stand-in processes (if started).
    pub standin_a: Option<ChildGuard>,
    pub standin_b: Option<ChildGuard>,
    /// Per-testbed temp dir (child logs).
    pub tmp_dir: PathBuf,
    opts: TestbedOptions,
    namespaces: Vec<String>,
    wire: Mutex<WireState>,
    log_seq: AtomicU32,
    /// `ft_pass` attached to the wire's veth ends (see [`attach_wire_pass`]).
    _wire_xdp: Option<aya::Ebpf>,
}

impl std::fmt::Debug for Testbed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Testbed")
            .field("prefix", &self.prefix)
            .field("tmp_dir", &self.tmp_dir)
            .field("a", &self.a)
            .field("b", &self.b)
            .finish_non_exhaustive()
    }
}

/// Locates the `ft-standin` binary: env `FT_STANDIN_BIN`, else next to the current
/// executable or its parent directory (cargo puts test binaries in `target/<profile>/deps`
/// and bins in `target/<profile>`). Build it with `cargo build -p ft-testbed --bins`
/// (cargo does so automatically for ft-testbed's own integration tests).
pub fn standin_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("FT_STANDIN_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    let mut dir = exe.parent();
    for _ in 0..3 {
        let Some(d) = dir else { break };
        let cand = d.join("ft-standin");
        if cand.is_file() {
            return Ok(cand);
        }
        dir = d.parent();
    }
    bail!(
        "ft-standin binary not found near {} — run `cargo build -p ft-testbed --bins` \
         (same profile/target dir) or set FT_STANDIN_BIN",
        exe.display()
    )
}

fn pid_alive(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Parses `ft<pid>x<n>...` → pid.
fn owner_pid(ns: &str) -> Option<i32> {
    let rest = ns.strip_prefix("ft")?;
    let end = rest.find('x')?;
    let (pid, tail) = rest.split_at(end);
    if pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let tail = &tail[1..];
    if tail.is_empty() || !tail.as_bytes()[0].is_ascii_digit() {
        return None;
    }
    pid.parse().ok()
}

fn delete_ns(ns: &str) {
    for pid in netns_pids(ns) {
        // SAFETY: plain kill(); pids are processes inside a namespace we own.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    let _g = NS_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let _ = run_cmd("ip", &["netns", "del", ns]);
}

/// Removes namespaces `ft<pid>x<n>*` whose pid no longer exists (left by killed test
/// processes). Returns the names removed.
pub fn cleanup_stale() -> Vec<String> {
    let me = std::process::id() as i32;
    let mut removed = Vec::new();
    for ns in list_netns().unwrap_or_default() {
        if let Some(pid) = owner_pid(&ns)
            && pid != me
            && !pid_alive(pid)
        {
            delete_ns(&ns);
            removed.push(ns);
        }
    }
    removed
}

impl Testbed {
    /// Builds a testbed with [`TestbedOptions::default`].
    pub fn new_default() -> Result<Testbed> {
        Self::new(TestbedOptions::default())
    }

    /// Builds the full topology (see crate docs). Cleans stale namespaces first.
    pub fn new(opts: TestbedOptions) -> Result<Testbed> {
        cleanup_stale();
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("ft{}x{}", std::process::id(), n);
        // Names from a previous process with our (recycled) pid are stale.
        for ns in list_netns().unwrap_or_default() {
            if ns.starts_with(&prefix) && ns.len() <= prefix.len() + 2 {
                delete_ns(&ns);
            }
        }
        let tmp_dir = std::env::temp_dir().join(format!("ft-testbed-{prefix}"));
        let _ = std::fs::remove_dir_all(&tmp_dir);
        std::fs::create_dir_all(&tmp_dir)
            .with_context(|| format!("mkdir {}", tmp_dir.display()))?;
        let host = |label: &'static str, cli_ip, log_ip| Host {
            label,
            ns: format!("{prefix}{label}"),
            vm_ns: format!("{prefix}v{label}"),
            cli_ip,
            log_ip,
            cli_mac: [0; 6],
            log_mac: [0; 6],
            vmh_mac: [0; 6],
            cli_ifindex: 0,
            log_ifindex: 0,
            vmh_ifindex: 0,
            br_port_mac: [0; 6],
            wire_mac: [0; 6],
        };
        let mut tb = Testbed {
            client_ns: format!("{prefix}c"),
            arbiter_ns: format!("{prefix}r"),
            wire_ns: format!("{prefix}w"),
            forger_ns: if opts.forger {
                format!("{prefix}f")
            } else {
                String::new()
            },
            a: host("a", HOST_A_CLI_IP, HOST_A_LOG_IP),
            b: host("b", HOST_B_CLI_IP, HOST_B_LOG_IP),
            prefix,
            client_mac: [0; 6],
            arbiter_mac: [0; 6],
            standin_a: None,
            standin_b: None,
            tmp_dir,
            opts,
            namespaces: Vec::new(),
            wire: Mutex::new(WireState::default()),
            log_seq: AtomicU32::new(0),
            _wire_xdp: None,
        };
        // On error, `tb` is dropped here and tears down whatever was built.
        tb.build()
            .with_context(|| format!("building testbed {}", tb.prefix))?;
        Ok(tb)
    }

    fn add_ns(&mut self, ns: &str) -> Result<()> {
        {
            let _g = NS_LOCK.lock().unwrap_or_else(|e| e.into_inner());
            run_cmd("ip", &["netns", "add", ns])?;
        }
        self.namespaces.push(ns.to_string());
        sysctl(ns, "net.ipv6.conf.all.disable_ipv6", "1")?;
        sysctl(ns, "net.ipv6.conf.default.disable_ipv6", "1")?;
        ip(ns, &["link", "set", "lo", "up"])?;
        Ok(())
    }

    fn build(&mut self) -> Result<()> {
        let (c, r, w) = (
            self.client_ns.clone(),
            self.arbiter_ns.clone(),
            self.wire_ns.clone(),
        );
        let (a, b) = (self.a.clone(), self.b.clone());
        for ns in [&c, &a.ns, &b.ns, &a.vm_ns, &b.vm_ns, &w, &r] {
            self.add_ns(ns)?;
        }
        let q = ["numtxqueues", "1", "numrxqueues", "1"];
        let veth = |ns: &str,
                    name: &str,
                    peer_ns: &str,
                    peer: &str,
                    extra: &[&str],
                    peer_extra: &[&str]| {
            let mut args: Vec<&str> = vec!["link", "add", name];
            args.extend(q);
            args.extend(extra);
            args.extend(["type", "veth", "peer", "name", peer, "netns", peer_ns]);
            args.extend(q);
            args.extend(peer_extra);
            ip(ns, &args)
        };
        let mtu = LOG_MTU.to_string();
        let vm_mac = netns::fmt_mac(&VM_MAC);
        // Client network.
        ip(
            &c,
            &[
                "link",
                "add",
                BRIDGE,
                "type",
                "bridge",
                "stp_state",
                "0",
                "forward_delay",
                "0",
                "mcast_snooping",
                "0",
            ],
        )?;
        for (h, port) in [(&a, BR_PORT_A), (&b, BR_PORT_B)] {
            veth(&h.ns, CLI_IF, &c, port, &[], &[])?;
            veth(&h.ns, VMH_IF, &h.vm_ns, VM_IF, &[], &["address", &vm_mac])?;
        }
        veth(&r, ARB_IF, &c, BR_PORT_R, &[], &[])?;
        veth(&a.ns, LOG_IF, &w, WIRE_A, &["mtu", &mtu], &["mtu", &mtu])?;
        veth(&b.ns, LOG_IF, &w, WIRE_B, &["mtu", &mtu], &["mtu", &mtu])?;
        for port in [BR_PORT_A, BR_PORT_B, BR_PORT_R] {
            ip(&c, &["link", "set", port, "master", BRIDGE])?;
        }
        // Addresses.
        let pfx = |ip: Ipv4Addr| format!("{ip}/{CLIENT_NET_PREFIX}");
        ip(&c, &["addr", "add", &pfx(CLIENT_IP), "dev", BRIDGE])?;
        ip(&r, &["addr", "add", &pfx(ARBITER_IP), "dev", ARB_IF])?;
        for h in [&a, &b] {
            ip(&h.ns, &["addr", "add", &pfx(h.cli_ip), "dev", CLI_IF])?;
            ip(&h.ns, &["addr", "add", &pfx(h.log_ip), "dev", LOG_IF])?;
            ip(&h.vm_ns, &["addr", "add", &pfx(VM_IP), "dev", VM_IF])?;
        }
        // Offloads: complete checksums from the VMs, GRO (NAPI) on every veth that may
        // receive XDP-redirected frames.
        let full = self.opts.full_checksums;
        for h in [&a, &b] {
            ns_exec(
                &h.vm_ns,
                "ethtool",
                &["-K", VM_IF, "tx", "off", "gro", "on"],
            )?;
            if full {
                for ifn in [CLI_IF, LOG_IF, VMH_IF] {
                    ns_exec(&h.ns, "ethtool", &["-K", ifn, "tx", "off"])?;
                }
            }
        }
        for port in [BR_PORT_A, BR_PORT_B, BR_PORT_R] {
            ns_exec(&c, "ethtool", &["-K", port, "gro", "on"])?;
        }
        for l in [WIRE_A, WIRE_B] {
            ns_exec(&w, "ethtool", &["-K", l, "gro", "on"])?;
        }
        if full {
            ns_exec(&c, "ethtool", &["-K", BRIDGE, "tx", "off"])?;
            ns_exec(&r, "ethtool", &["-K", ARB_IF, "tx", "off"])?;
        }
        // Up.
        for (ns, ifs) in [
            (&c, &[BRIDGE, BR_PORT_A, BR_PORT_B, BR_PORT_R][..]),
            (&r, &[ARB_IF][..]),
            (&w, &[WIRE_A, WIRE_B][..]),
            (&a.ns, &[CLI_IF, LOG_IF, VMH_IF][..]),
            (&b.ns, &[CLI_IF, LOG_IF, VMH_IF][..]),
            (&a.vm_ns, &[VM_IF][..]),
            (&b.vm_ns, &[VM_IF][..]),
        ] {
            for i in ifs {
                ip(ns, &["link", "set", i, "up"])?;
            }
        }
        // The wire is a bridge (like a cable through a switch): forwarded frames reach
        // the far NIC as fresh receives. (nftables `fwd`/tc mirred would mark them as
        // redirected, and generic-mode XDP skips redirected skbs.)
        ip(
            &w,
            &[
                "link",
                "add",
                WIRE_BRIDGE,
                "type",
                "bridge",
                "stp_state",
                "0",
                "forward_delay",
                "0",
            ],
        )?;
        for l in [WIRE_A, WIRE_B] {
            ip(&w, &["link", "set", l, "master", WIRE_BRIDGE])?;
        }
        ip(&w, &["link", "set", WIRE_BRIDGE, "up"])?;
        if self.opts.forger {
            let f = self.forger_ns.clone();
            self.add_ns(&f)?;
            veth(&f, FORGER_IF, &w, WIRE_F, &["mtu", &mtu], &["mtu", &mtu])?;
            ip(&w, &["link", "set", WIRE_F, "master", WIRE_BRIDGE])?;
            // A forged source MAC must not move A's or B's MAC to this port (that would
            // be another attack: cutting the link, which the tests do by other means).
            run_cmd(
                "ip",
                &[
                    "netns", "exec", &w, "bridge", "link", "set", "dev", WIRE_F, "learning", "off",
                ],
            )?;
            ip(&w, &["link", "set", WIRE_F, "up"])?;
            ip(&f, &["link", "set", FORGER_IF, "up"])?;
        }
        self._wire_xdp = Some(attach_wire_pass(&w)?);
        self.apply_wire()?;
        // Read back MACs / ifindexes.
        self.client_mac = netns::mac(&c, BRIDGE)?;
        self.arbiter_mac = netns::mac(&r, ARB_IF)?;
        for (h, port, wif) in [
            (&mut self.a, BR_PORT_A, WIRE_A),
            (&mut self.b, BR_PORT_B, WIRE_B),
        ] {
            h.cli_mac = netns::mac(&h.ns, CLI_IF)?;
            h.log_mac = netns::mac(&h.ns, LOG_IF)?;
            h.vmh_mac = netns::mac(&h.ns, VMH_IF)?;
            h.cli_ifindex = netns::ifindex(&h.ns, CLI_IF)?;
            h.log_ifindex = netns::ifindex(&h.ns, LOG_IF)?;
            h.vmh_ifindex = netns::ifindex(&h.ns, VMH_IF)?;
            h.br_port_mac = netns::mac(&c, port)?;
            h.wire_mac = netns::mac(&w, wif)?;
        }
        if self.opts.start_standins {
            let bin = match &self.opts.standin_bin {
                Some(p) => p.clone(),
                None => standin_bin()?,
            };
            let mut args: Vec<String> = vec!["--port".into(), STANDIN_PORT.to_string()];
            if self.opts.quiet_standins {
                args.push("--quiet".into());
            }
            let sa = self.spawn(&a.vm_ns, &bin, &args)?;
            let sb = self.spawn(&b.vm_ns, &bin, &args)?;
            for s in [&sa, &sb] {
                if !s.wait_for_log("listening", Duration::from_secs(5)) {
                    bail!("ft-standin did not start: {}", s.log_contents());
                }
            }
            self.standin_a = Some(sa);
            self.standin_b = Some(sb);
        }
        Ok(())
    }

    /// nftables ruleset of the wire namespace for the current state (atomic replace):
    /// bridge-family filter on the wire bridge's forward path.
    fn wire_ruleset(&self, st: WireState) -> String {
        let drop_all = if st.down { "drop\n" } else { "" };
        // Loss in both directions (log frames A→B, acks and nacks B→A), each with its
        // own counter.
        let loss = match st.loss_every_nth {
            Some(n) if n > 0 => [WIRE_A, WIRE_B]
                .iter()
                .map(|w| {
                    format!(
                        "iifname \"{w}\" ether type 0x{LOG_ETHERTYPE:04x} numgen inc mod {n} == {} counter drop comment \"loss-{w}\"\n",
                        n - 1
                    )
                })
                .collect(),
            _ => String::new(),
        };
        // FtHdr.kind is the third byte after the Ethernet header; 5 = VMLOG.
        let vmlog = if st.block_vmlog {
            format!("iifname \"{WIRE_A}\" ether type 0x{LOG_ETHERTYPE:04x} @nh,16,8 5 drop\n")
        } else {
            String::new()
        };
        // A VMLOG frame whose first entry (at byte 40 after the Ethernet header) is a
        // CLOCK entry (kind 2): bytes 3-4 of its value (entry offset 24, big-endian) get
        // 0x5a5a, once (a time jump of seconds to minutes that the guest keeps in memory).
        let corrupt = if st.corrupt_vmlog {
            format!(
                "iifname \"{WIRE_A}\" ether type 0x{LOG_ETHERTYPE:04x} @nh,16,8 5 @nh,320,8 2 \
                 limit rate 1/hour burst 1 packets @nh,536,16 set 0x5a5a counter comment \"corrupt\"\n"
            )
        } else {
            String::new()
        };
        let corrupt_transfer = if st.corrupt_transfer {
            "tcp sport 7480 meta length > 1400 limit rate 1/hour burst 1 packets \
             @th,800,32 set 0x5a5a5a5a counter comment \"corrupt-transfer\"\n"
                .to_string()
        } else {
            String::new()
        };
        // Random loss and reordering of everything on the wire (log, acks, the join's
        // TCP), each direction with its own counters. Priority 1:20 is the slow HTB
        // class that `set_log_impairment` puts on both wire ports.
        let impair = match st.impairment {
            Some(i) => [WIRE_A, WIRE_B]
                .iter()
                .map(|w| {
                    format!(
                        "iifname \"{w}\" numgen random mod 100 < {} counter drop comment \"rloss-{w}\"\n\
                         iifname \"{w}\" numgen random mod 100 < {} meta priority set 1:20 counter comment \"reorder-{w}\"\n",
                        i.loss_pct, i.reorder_pct
                    )
                })
                .collect(),
            None => String::new(),
        };
        format!(
            "table bridge {WIRE_TABLE}\ndelete table bridge {WIRE_TABLE}\n\
             table bridge {WIRE_TABLE} {{\n\
             chain forward {{ type filter hook forward priority 0; policy accept;\n{drop_all}{vmlog}{corrupt}{corrupt_transfer}{loss}{impair}}}\n}}\n"
        )
    }

    fn apply_wire(&self) -> Result<()> {
        let st = *self.wire.lock().unwrap_or_else(|e| e.into_inner());
        let rules = self.wire_ruleset(st);
        run_cmd_stdin(
            "ip",
            &["netns", "exec", &self.wire_ns, "nft", "-f", "-"],
            Some(&rules),
        )
        .context("loading wire nftables ruleset (is nftables installed?)")?;
        Ok(())
    }

    /// Drops every Nth logging-link frame (EtherType 0x88b5) in each direction — log
    /// frames A→B and acks/nacks B→A, each direction counted on its own from this call
    /// (frames N, 2N, 3N…; the counters restart on every call). `None` = no loss.
    pub fn set_log_loss(&self, every_nth: Option<u32>) -> Result<()> {
        if every_nth == Some(0) {
            bail!("every_nth must be >= 1");
        }
        self.wire
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .loss_every_nth = every_nth;
        self.apply_wire()
    }

    /// Drops the VMM stream's frames (VMLOG) going A→B while `blocked`; input frames,
    /// acks and everything else pass.
    pub fn set_vmlog_blocked(&self, blocked: bool) -> Result<()> {
        self.wire
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .block_vmlog = blocked;
        self.apply_wire()
    }

    /// Overwrites four bytes of one state-transfer segment (TCP from port 7480, either
    /// host, at least 1,400 bytes long, 100 bytes into the TCP header: in the payload),
    /// once per call; the TCP checksum is fixed up, so only the transfer's own
    /// authentication can tell.
    pub fn corrupt_one_transfer_segment(&self) -> Result<()> {
        self.wire
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .corrupt_transfer = true;
        self.apply_wire()
    }

    /// Corrupts one VMM log entry on its way A→B (once per call): the value of the first
    /// CLOCK entry of the next VMLOG frame that starts with one. The frame stays well
    /// formed; only the backup's replay can tell.
    pub fn corrupt_one_vmlog_entry(&self) -> Result<()> {
        self.wire
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .corrupt_vmlog = true;
        self.apply_wire()
    }

    /// Frames the wire's rule `comment` matched so far (the loss rules are
    /// `loss-la` for A→B and `loss-lb` for B→A; the corruption rule is `corrupt`).
    pub fn wire_rule_packets(&self, comment: &str) -> Result<u64> {
        let out = ns_exec(
            &self.wire_ns,
            "nft",
            &["list", "table", "bridge", WIRE_TABLE],
        )?;
        let line = out
            .lines()
            .find(|l| l.contains(&format!("comment \"{comment}\"")))
            .with_context(|| format!("no wire rule {comment:?}: {out}"))?;
        let n = line
            .split_once("counter packets ")
            .and_then(|(_, r)| r.split_whitespace().next())
            .with_context(|| format!("no packet counter in {line:?}"))?;
        n.parse()
            .with_context(|| format!("packet counter {n:?} in {line:?}"))
    }

    /// Random loss and reordering on the logging wire in both directions (see
    /// [`Impairment`]); `None` removes it.
    pub fn set_log_impairment(&self, imp: Option<Impairment>) -> Result<()> {
        if let Some(i) = imp
            && (i.loss_pct > 100 || i.reorder_pct > 100)
        {
            bail!("impairment percentages must be at most 100: {i:?}");
        }
        for w in [WIRE_A, WIRE_B] {
            // The queues stay installed; without the nft rules every frame takes the
            // default (fast) class.
            if imp.is_some() {
                let tc = |args: &str| -> Result<()> {
                    let v: Vec<&str> = args.split_whitespace().collect();
                    crate::ns_exec(&self.wire_ns, "tc", &v).map(drop)
                };
                // Fresh each time (HTB cannot `replace` itself): remove what an earlier
                // call installed, if anything.
                let _ = tc(&format!("qdisc del dev {w} root"));
                tc(&format!("qdisc add dev {w} root handle 1: htb default 10"))?;
                tc(&format!(
                    "class add dev {w} parent 1: classid 1:10 htb rate 10gbit"
                ))?;
                tc(&format!(
                    "class add dev {w} parent 1: classid 1:20 htb rate 2mbit ceil 2mbit"
                ))?;
            }
        }
        self.wire
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .impairment = imp;
        self.apply_wire()
    }

    /// Drops all frames on the logging wire in both directions while `down`.
    pub fn set_log_link_down(&self, down: bool) -> Result<()> {
        self.wire.lock().unwrap_or_else(|e| e.into_inner()).down = down;
        self.apply_wire()
    }

    /// Current wire nftables ruleset (`nft list ruleset` in the wire ns), for debugging.
    pub fn wire_rules(&self) -> Result<String> {
        ns_exec(&self.wire_ns, "nft", &["list", "ruleset"])
    }

    /// Brings the client link of host A or B down/up (`ip link set cli0 down|up` on the
    /// host side) — e.g. to isolate a host from the client network.
    pub fn set_link(&self, ns: &str, ifname: &str, up: bool) -> Result<()> {
        ip(ns, &["link", "set", ifname, if up { "up" } else { "down" }])?;
        Ok(())
    }

    /// Packets `ifname` in `ns` has transmitted (`ip -s link`), as an error if the
    /// interface or its statistics cannot be read.
    pub fn tx_packets(&self, ns: &str, ifname: &str) -> Result<u64> {
        link_stat(ns, ifname, "tx", "packets")
    }

    /// Bytes `ifname` in `ns` has received and transmitted (`ip -s link`).
    pub fn link_bytes(&self, ns: &str, ifname: &str) -> Result<(u64, u64)> {
        Ok((
            link_stat(ns, ifname, "rx", "bytes")?,
            link_stat(ns, ifname, "tx", "bytes")?,
        ))
    }

    /// Spawns `program args...` inside `ns` via `ip netns exec`; stdout+stderr go to
    /// `<tmp_dir>/<program-basename>-<n>.log`. Killed when the guard drops, and in any
    /// case when the testbed drops.
    pub fn spawn<I, S>(&self, ns: &str, program: impl AsRef<Path>, args: I) -> Result<ChildGuard>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let program = program.as_ref();
        let base = program
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "child".into());
        let n = self.log_seq.fetch_add(1, Ordering::Relaxed);
        let log = self.tmp_dir.join(format!("{base}-{n}-{ns}.log"));
        ChildGuard::spawn(ns, program, args, &log)
    }

    /// A [`crate::UdpClient`] in the client namespace aimed at the VM's service
    /// (10.77.0.100:7000).
    pub fn vm_client(&self) -> Result<crate::UdpClient> {
        crate::UdpClient::new(&self.client_ns, (VM_IP, STANDIN_PORT).into())
    }

    /// Human-readable summary (namespaces, MACs, IPs).
    pub fn describe(&self) -> String {
        let m = netns::fmt_mac;
        let mut s = format!(
            "testbed {}\n  client  ns={} br0={} {}\n  arbiter ns={} eth0={} {}\n  wire    ns={} (la<->lb bridged, nft table bridge {WIRE_TABLE})\n",
            self.prefix,
            self.client_ns,
            m(&self.client_mac),
            CLIENT_IP,
            self.arbiter_ns,
            m(&self.arbiter_mac),
            ARBITER_IP,
            self.wire_ns,
        );
        for h in [&self.a, &self.b] {
            s += &format!(
                "  host {}  ns={} cli0={} {} (ifindex {}) log0={} {} (ifindex {}) vmh={} (ifindex {})\n         vm ns={} eth0={} {}\n",
                h.label,
                h.ns,
                m(&h.cli_mac),
                h.cli_ip,
                h.cli_ifindex,
                m(&h.log_mac),
                h.log_ip,
                h.log_ifindex,
                m(&h.vmh_mac),
                h.vmh_ifindex,
                h.vm_ns,
                m(&VM_MAC),
                VM_IP,
            );
        }
        s += &format!("  logs    {}\n", self.tmp_dir.display());
        s
    }

    /// All namespace names of this testbed.
    pub fn namespaces(&self) -> &[String] {
        &self.namespaces
    }

    /// Options this testbed was built with.
    pub fn options(&self) -> &TestbedOptions {
        &self.opts
    }
}

/// Loads ftd's eBPF object (maps at their smallest) and attaches its `ft_pass` program in
/// native mode to both veth ends of the logging wire in namespace `w`, so that frames
/// the hosts send with `XDP_TX` (NACK repairs, kernel acks) cross the wire at once, as on
/// a physical link (the program's doc says why a veth needs it). The links live as long
/// as the returned object (and the namespace).
fn attach_wire_pass(w: &str) -> Result<aya::Ebpf> {
    netns::try_run_in_ns(w, || -> Result<aya::Ebpf> {
        let mut ebpf = aya::EbpfLoader::new()
            .map_max_entries("RETX", 1024)
            .map_max_entries("HOLD", 64)
            .map_max_entries("LOG_RING", 4096)
            .load(ftd::dataplane::EBPF_OBJECT)
            .context("loading ftd's eBPF object for the wire")?;
        let prog: &mut aya::programs::Xdp = ebpf
            .program_mut("ft_pass")
            .context("ft_pass not in the object")?
            .try_into()?;
        prog.load().context("loading ft_pass")?;
        for l in [WIRE_A, WIRE_B] {
            prog.attach(l, aya::programs::xdp::XdpMode::Driver)
                .with_context(|| format!("attaching ft_pass to the wire's {l}"))?;
        }
        Ok(ebpf)
    })?
}

impl Drop for Testbed {
    fn drop(&mut self) {
        let panicking = std::thread::panicking();
        self.standin_a.take();
        self.standin_b.take();
        for ns in self.namespaces.iter().rev() {
            delete_ns(ns);
        }
        if panicking || self.opts.keep_logs {
            eprintln!(
                "ft-testbed {}: logs kept in {}",
                self.prefix,
                self.tmp_dir.display()
            );
            if panicking && let Ok(rd) = std::fs::read_dir(&self.tmp_dir) {
                for e in rd.flatten() {
                    let text = std::fs::read_to_string(e.path()).unwrap_or_default();
                    let tail: Vec<&str> = text.lines().rev().take(20).collect();
                    eprintln!("--- {} (last {} lines) ---", e.path().display(), tail.len());
                    for l in tail.iter().rev() {
                        eprintln!("{l}");
                    }
                }
            }
        } else {
            let _ = std::fs::remove_dir_all(&self.tmp_dir);
        }
    }
}

/// One counter of `ip -s link` (`dir`: rx/tx, `what`: packets/bytes/dropped...).
fn link_stat(ns: &str, ifname: &str, dir: &str, what: &str) -> Result<u64> {
    let out = ns_exec(ns, "ip", &["-j", "-s", "link", "show", "dev", ifname])?;
    let v: serde_json::Value =
        serde_json::from_str(&out).with_context(|| format!("ip -j -s link: {out}"))?;
    v[0]["stats64"][dir][what]
        .as_u64()
        .with_context(|| format!("no {dir} {what} count for {ifname} in {ns}: {out}"))
}
