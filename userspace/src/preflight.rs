//! `ftd preflight` and `ftd check-config --host`: everything a host must have before
//! `ftd run` can work there, checked at once, each finding with its fix.
//!
//! The host's checks ([`host`]) read the kernel's view of this host: the NICs (present,
//! up, carrier, MTU, driver, the XDP features their driver declares), `/dev/kvm`, the key
//! files' modes. The network's ([`network`]) ask the arbiter for the pair's record and
//! probe the peer over the logging link. [`compare`] holds two hosts' configs against
//! each other. Each returns [`Finding`]s; only a [`Verdict::Fail`] stops a start.
use std::{
    fmt,
    net::{SocketAddr, TcpStream},
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::Path,
    time::Duration,
};

use ft_common::wire::MIN_LOG_MTU;

use crate::{
    config::{Config, VmKind, XdpAttachMode},
    netif::Interface,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Verdict {
    Ok,
    /// Works, but not as well as it should, or cannot be told from here.
    Warn,
    /// `ftd run` would fail, or run unsafely.
    Fail,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    pub what: String,
    pub verdict: Verdict,
    pub detail: String,
    /// What to do about it (for a warning or a failure).
    pub fix: Option<String>,
}

impl Finding {
    fn ok(what: impl Into<String>, detail: impl Into<String>) -> Self {
        Self {
            what: what.into(),
            verdict: Verdict::Ok,
            detail: detail.into(),
            fix: None,
        }
    }
    fn warn(what: impl Into<String>, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        Self {
            what: what.into(),
            verdict: Verdict::Warn,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }
    fn fail(what: impl Into<String>, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        Self {
            what: what.into(),
            verdict: Verdict::Fail,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v = match self.verdict {
            Verdict::Ok => "ok  ",
            Verdict::Warn => "WARN",
            Verdict::Fail => "FAIL",
        };
        write!(f, "{v}  {}: {}", self.what, self.detail)?;
        if let Some(fix) = &self.fix {
            write!(f, "\n        fix: {fix}")?;
        }
        Ok(())
    }
}

/// The worst verdict of `findings` (Ok when empty).
pub fn worst(findings: &[Finding]) -> Verdict {
    findings
        .iter()
        .map(|f| f.verdict)
        .max()
        .unwrap_or(Verdict::Ok)
}

/// What the kernel says about one NIC.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NicFacts {
    pub exists: bool,
    pub up: bool,
    pub carrier: bool,
    pub mtu: u32,
    pub mac: [u8; 6],
    pub driver: Option<String>,
    /// `NETDEV_A_DEV_XDP_FEATURES` (Linux >= 6.3); None: the kernel does not say.
    pub xdp_features: Option<u64>,
}

/// The XDP features the data plane uses (`NETDEV_XDP_ACT_*`).
pub const XDP_BASIC: u64 = 1 << 0;
pub const XDP_REDIRECT: u64 = 1 << 1;
pub const XDP_NDO_XMIT: u64 = 1 << 2;

impl NicFacts {
    pub fn read(name: &str) -> NicFacts {
        let Ok(iface) = Interface::lookup(name) else {
            return NicFacts::default();
        };
        let flags = crate::netif::flags(name).unwrap_or(0);
        NicFacts {
            exists: true,
            up: flags & libc::IFF_UP as u32 != 0,
            carrier: flags & libc::IFF_RUNNING as u32 != 0,
            mtu: iface.mtu,
            mac: iface.mac,
            driver: crate::netif::driver(name).ok(),
            xdp_features: crate::netif::xdp_features(iface.ifindex).ok().flatten(),
        }
    }
}

fn xdp_names(f: u64) -> String {
    let names: Vec<&str> = [
        (XDP_BASIC, "basic"),
        (XDP_REDIRECT, "redirect"),
        (XDP_NDO_XMIT, "ndo-xmit"),
        (1 << 3, "xsk-zerocopy"),
        (1 << 4, "hw-offload"),
        (1 << 5, "rx-sg"),
        (1 << 6, "ndo-xmit-sg"),
    ]
    .iter()
    .filter(|(b, _)| f & b != 0)
    .map(|(_, n)| *n)
    .collect();
    if names.is_empty() {
        "none".into()
    } else {
        names.join(", ")
    }
}

/// One NIC's findings. `role`: "client NIC" or "logging NIC"; `needs`: the XDP features
/// its programs use in driver mode.
pub fn nic(
    role: &str,
    name: &str,
    n: &NicFacts,
    min_mtu: Option<u32>,
    mode: XdpAttachMode,
    needs: u64,
) -> Vec<Finding> {
    let what = format!("{role} {name}");
    if !n.exists {
        return vec![Finding::fail(
            what,
            "no such interface in this network namespace",
            format!("name the NIC in [interfaces] (`ip -br link` lists them), or create {name}"),
        )];
    }
    let mut out = Vec::new();
    let driver = n.driver.as_deref().unwrap_or("unknown driver");
    match (n.up, n.carrier) {
        (false, _) => out.push(Finding::fail(
            &what,
            format!("down ({driver})"),
            format!("ip link set dev {name} up (and in the host's network configuration)"),
        )),
        (true, false) => out.push(Finding::warn(
            &what,
            format!("up, no carrier ({driver})"),
            "check the cable and the switch port",
        )),
        (true, true) => out.push(Finding::ok(&what, format!("up, carrier ({driver})"))),
    }
    if let Some(min) = min_mtu {
        if n.mtu < min {
            out.push(Finding::fail(
                format!("{what} MTU"),
                format!(
                    "{} < {min}: a client frame with its log header does not fit",
                    n.mtu
                ),
                format!(
                    "ip link set dev {name} mtu {} on both hosts (and the switch, if any)",
                    min.max(2000)
                ),
            ));
        } else {
            out.push(Finding::ok(
                format!("{what} MTU"),
                format!("{} >= {min}", n.mtu),
            ));
        }
    }
    let xdp = format!("{what} XDP");
    match (mode, n.xdp_features) {
        (XdpAttachMode::Skb, _) => out.push(Finding::ok(
            xdp,
            "generic mode (xdp_mode = \"skb\"): works on any driver; the backup's daemon acks instead of its XDP",
        )),
        (XdpAttachMode::Driver, None) => out.push(Finding::warn(
            xdp,
            format!("this kernel does not report what {driver} supports"),
            "if `ftd run` cannot attach, set [interfaces] xdp_mode = \"skb\"",
        )),
        // ndo-xmit (being the target of a redirect) is reported by some drivers (veth,
        // virtio-net) only while an XDP program is attached: before ftd runs, its absence
        // is a warning; basic and redirect are not.
        (XdpAttachMode::Driver, Some(f)) if f & needs & !XDP_NDO_XMIT != needs & !XDP_NDO_XMIT => {
            out.push(Finding::fail(
                xdp,
                format!(
                    "{driver} offers {} but the data plane needs {}",
                    xdp_names(f),
                    xdp_names(needs)
                ),
                "use a NIC whose driver runs XDP natively, or set [interfaces] xdp_mode = \"skb\" (slower; acks from userspace)",
            ))
        }
        (XdpAttachMode::Driver, Some(f)) if f & needs != needs => out.push(Finding::warn(
            xdp,
            format!(
                "{driver} offers {}, not ndo-xmit (some drivers report it only once an XDP program is attached)",
                xdp_names(f)
            ),
            "run preflight again while ftd runs; if it is still missing, redirected log frames are dropped: set [interfaces] xdp_mode = \"skb\"",
        )),
        (XdpAttachMode::Driver, Some(f)) => {
            out.push(Finding::ok(xdp, format!("native: {}", xdp_names(f))))
        }
    }
    out
}

/// The checks of this host alone (no network): what `check-config --host` runs before
/// every start.
pub fn host(cfg: &Config) -> Vec<Finding> {
    let mut out = Vec::new();
    let ifs = &cfg.interfaces;
    let client = NicFacts::read(&ifs.client);
    let logging = NicFacts::read(&ifs.logging);
    // Client NIC: frames for the VM arrive here (basic), go to the logging NIC
    // (redirect). Logging NIC: acks and log frames arrive (basic), kernel acks leave
    // (XDP_TX), and duplicated client frames are redirected to it (ndo-xmit).
    out.extend(nic(
        "client NIC",
        &ifs.client,
        &client,
        None,
        ifs.xdp_mode,
        XDP_BASIC | XDP_REDIRECT,
    ));
    out.extend(nic(
        "logging NIC",
        &ifs.logging,
        &logging,
        Some(MIN_LOG_MTU as u32),
        ifs.xdp_mode,
        XDP_BASIC | XDP_NDO_XMIT,
    ));
    if logging.exists && logging.mac == ifs.peer_log_mac.0 {
        out.push(Finding::fail(
            "interfaces.peer_log_mac",
            "is this host's own logging NIC's MAC",
            "set it to the PEER's logging NIC MAC (`ip link show` on the other host)",
        ));
    }
    if client.exists && logging.exists && ifs.client == ifs.logging {
        out.push(Finding::fail(
            "interfaces",
            "the client and logging NICs are the same",
            "the logging link needs its own NIC, cabled to the peer",
        ));
    }
    match cfg.vm.kind {
        VmKind::Vmm => {
            let vm = NicFacts::read(&ifs.vm);
            let tun = Path::new("/sys/class/net").join(&ifs.vm).join("tun_flags");
            if vm.exists && !tun.exists() {
                out.push(Finding::fail(
                    format!("VM NIC {}", ifs.vm),
                    "exists and is not a TAP: ftd creates the VM's TAP under this name",
                    "name a free interface in [interfaces] vm",
                ));
            } else {
                out.push(Finding::ok(
                    format!("VM NIC {}", ifs.vm),
                    "ftd creates it (a TAP) at start",
                ));
            }
            out.push(kvm());
        }
        VmKind::External => {
            let vm = NicFacts::read(&ifs.vm);
            out.extend(nic("VM NIC", &ifs.vm, &vm, None, XdpAttachMode::Skb, 0));
        }
    }
    out.push(Finding::ok(
        "VM MAC on the client NIC",
        format!(
            "{} is added to {}'s unicast filter while ftd runs",
            cfg.vm.mac, ifs.client
        ),
    ));
    let key = &cfg.channel.key_file;
    out.push(secret_file("channel key", key, Some(16)));
    let prev = crate::channel::keys::prev_path(key);
    if prev.exists() {
        out.push(secret_file("previous channel key", &prev, Some(16)));
    }
    if !cfg.fence.secret_file.is_empty() {
        out.push(secret_file(
            "arbiter secret",
            Path::new(&cfg.fence.secret_file),
            None,
        ));
    }
    out
}

fn kvm() -> Finding {
    use std::os::fd::AsRawFd;
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(f) => {
            // KVM_GET_API_VERSION = _IO(0xAE, 0x00).
            // SAFETY: an ioctl without argument on the fd we just opened.
            let v = unsafe { libc::ioctl(f.as_raw_fd(), 0xAE00) };
            if v == 12 {
                Finding::ok("/dev/kvm", "KVM API 12")
            } else {
                Finding::fail(
                    "/dev/kvm",
                    format!("KVM API version {v}, not 12"),
                    "run a kernel with a standard KVM",
                )
            }
        }
        Err(e) => Finding::fail(
            "/dev/kvm",
            e.to_string(),
            "enable virtualization in the firmware and load kvm_intel or kvm_amd (`modprobe kvm_intel`)",
        ),
    }
}

/// A file holding a secret: present, of the right size, readable by its owner only.
fn secret_file(what: &str, path: &Path, len: Option<u64>) -> Finding {
    let what = format!("{what} {}", path.display());
    let m = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) => {
            return Finding::fail(
                what,
                e.to_string(),
                "make it with `ftd keygen` on one host and copy it to the other (mode 0600)",
            );
        }
    };
    if let Some(len) = len
        && m.len() != len
    {
        return Finding::fail(
            what,
            format!("{} bytes, not {len}", m.len()),
            "make a new one with `ftd keygen` and copy it to both hosts",
        );
    }
    let mode = m.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Finding::fail(
            what,
            format!("mode {mode:o}: other users may read it"),
            format!("chmod 600 {}", path.display()),
        );
    }
    if m.uid() != 0 {
        return Finding::warn(
            what,
            format!("owned by uid {}, not root", m.uid()),
            format!("chown root: {}", path.display()),
        );
    }
    Finding::ok(what, format!("mode {mode:o}"))
}

/// The checks that need the network: the arbiter answers this node with the pair's
/// record, and the peer's host is reachable over the logging link.
pub async fn network(cfg: &Config) -> Vec<Finding> {
    let mut out = Vec::new();
    match cfg.fence.backend {
        Some(ft_fence::Backend::None) | None => out.push(Finding::warn(
            "arbiter",
            "none: a static lease (two hosts can both go live)",
            "configure [fence] backend = \"etcd\" (or \"embedded\") for a pair",
        )),
        Some(_) => match cfg.fence.build_arbiter() {
            Err(e) => out.push(Finding::fail("arbiter", e.to_string(), "fix [fence]")),
            Ok(arb) => {
                let read = tokio::time::timeout(Duration::from_secs(5), arb.read(&cfg.fence.vm));
                match read.await {
                    Ok(Ok(o)) => out.push(Finding::ok(
                        format!("arbiter {}", arb.describe()),
                        match (&o.owner, o.epoch) {
                            (_, 0) => format!("answers; no VM {} has run yet (epoch 0)", cfg.fence.vm),
                            (Some(w), e) => format!(
                                "answers; VM {} owned by {w} at epoch {e}, lease {:.1} s left",
                                cfg.fence.vm,
                                o.lease_remaining.as_secs_f64()
                            ),
                            (None, e) => format!("answers; VM {} at epoch {e}, no owner", cfg.fence.vm),
                        },
                    )),
                    Ok(Err(e)) => out.push(Finding::fail(
                        format!("arbiter {}", arb.describe()),
                        e.to_string(),
                        "check the arbiter's address, its secret (fence.secret_file) or etcd credentials, and that it runs",
                    )),
                    Err(_) => out.push(Finding::fail(
                        format!("arbiter {}", arb.describe()),
                        "no answer within 5 s",
                        "check the network path to the arbiter and that it runs",
                    )),
                }
            }
        },
    }
    out.push(peer(&cfg.channel.join_peer));
    out
}

/// The peer's host over the logging link: a TCP connection to its join address is
/// answered (its join service listens: it runs alone) or refused (the host is there;
/// nothing listens, as when it is a paired primary, a backup or stopped); silence
/// means the link or the address is wrong.
fn peer(join_peer: &str) -> Finding {
    if join_peer.is_empty() {
        return Finding::warn(
            "peer",
            "channel.join_peer is empty: this node cannot join the peer after a failover",
            "set [channel] join_peer to the peer's join_listen (an address on its logging NIC)",
        );
    }
    let what = format!("peer {join_peer}");
    let Ok(addr) = join_peer.parse::<SocketAddr>() else {
        return Finding::fail(what, "not an address:port", "fix [channel] join_peer");
    };
    match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
        Ok(_) => Finding::ok(what, "reachable; its join service listens (it runs alone)"),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Finding::ok(
            what,
            "reachable over the logging link (its join service listens only while it runs alone)",
        ),
        Err(e) => Finding::fail(
            what,
            format!("unreachable: {e}"),
            "check the logging link's cable and addresses (join_listen on the peer, an address on this host's logging NIC's network)",
        ),
    }
}

/// Two hosts' configs held against each other: what must match (the VM, the guest
/// image, the channel's key and settings, the arbiter's record) and what must mirror
/// (each names the other's logging MAC and join address).
pub fn compare(a: &Config, b: &Config) -> Vec<Finding> {
    let mut out = Vec::new();
    let same = |what: &str, x: String, y: String, fix: &str| {
        if x == y {
            Finding::ok(format!("{what} on both hosts"), x)
        } else {
            Finding::fail(
                format!("{what} on both hosts"),
                format!("{x} here, {y} there"),
                fix,
            )
        }
    };
    let vm_hash = |c: &Config| match crate::vm::guest_image(c) {
        Ok(img) => format!("{:#018x}", c.vm.vmm_config().config_hash(&img)),
        Err(e) => format!("unreadable guest image ({e:#})"),
    };
    out.push(same(
        "VM configuration hash (guest image, RAM, network identity, service settings, CPU model)",
        vm_hash(a),
        vm_hash(b),
        "the [vm] sections (and vm.image's file) must be identical",
    ));
    let fence = |c: &Config| {
        format!(
            "{} at {:?}, VM {}",
            c.fence
                .backend
                .map_or("none".into(), |b| format!("{b:?}").to_lowercase()),
            c.fence.arbiters,
            c.fence.vm
        )
    };
    let (ka, kb) = (
        crate::channel::auth::ChannelKey::load(&a.channel.key_file),
        crate::channel::auth::ChannelKey::load(&b.channel.key_file),
    );
    match (ka, kb) {
        (Ok(x), Ok(y)) if x == y => out.push(Finding::ok(
            "channel key on both hosts",
            format!(
                "the same key (id {})",
                crate::channel::keys::HeldKey::new(x).id
            ),
        )),
        (Ok(_), Ok(_)) => out.push(Finding::fail(
            "channel key on both hosts",
            "the key files differ",
            "copy the same key file to both hosts (`ftd keygen` once)",
        )),
        (Err(e), _) | (_, Err(e)) => out.push(Finding::fail(
            "channel key on both hosts",
            e.to_string(),
            "copy the same key file to both hosts (`ftd keygen` once)",
        )),
    }
    out.push(same(
        "fence (backend, arbiters, vm)",
        fence(a),
        fence(b),
        "both hosts use the same arbiter and VM name",
    ));
    out.push(same(
        "channel timing (heartbeat_ms, peer_timeout_ms)",
        format!("{} {}", a.channel.heartbeat_ms, a.channel.peer_timeout_ms),
        format!("{} {}", b.channel.heartbeat_ms, b.channel.peer_timeout_ms),
        "set the same [channel] heartbeat_ms and peer_timeout_ms on both hosts",
    ));
    if a.node.name == b.node.name {
        out.push(Finding::fail(
            "node names",
            format!("both hosts are {}", a.node.name),
            "give each host its own node.name",
        ));
    }
    let arbitrated = !matches!(a.fence.backend, Some(ft_fence::Backend::None) | None);
    if arbitrated && (a.fence.peer != b.node.name || b.fence.peer != a.node.name) {
        out.push(Finding::fail(
            "fence.peer",
            format!(
                "{} names {:?}, {} names {:?}",
                a.node.name, a.fence.peer, b.node.name, b.fence.peer
            ),
            "each host's fence.peer is the other's node.name (a take-over then needs no lease to lapse)",
        ));
    }
    let joins = [&a.channel, &b.channel]
        .iter()
        .any(|c| !c.join_peer.is_empty() || !c.join_listen.is_empty());
    if joins
        && (a.channel.join_peer != b.channel.join_listen
            || b.channel.join_peer != a.channel.join_listen)
    {
        out.push(Finding::fail(
            "join addresses",
            format!(
                "{} asks {:?} and listens on {:?}; {} asks {:?} and listens on {:?}",
                a.node.name,
                a.channel.join_peer,
                a.channel.join_listen,
                b.node.name,
                b.channel.join_peer,
                b.channel.join_listen
            ),
            "each host's join_peer is the other's join_listen",
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> NicFacts {
        NicFacts {
            exists: true,
            up: true,
            carrier: true,
            mtu: 9000,
            mac: [2, 0, 0, 0, 0, 1],
            driver: Some("mlx5_core".into()),
            xdp_features: Some(XDP_BASIC | XDP_REDIRECT | XDP_NDO_XMIT),
        }
    }

    fn verdicts(f: &[Finding]) -> Vec<Verdict> {
        f.iter().map(|f| f.verdict).collect()
    }

    #[test]
    fn a_good_nic_passes() {
        let f = nic(
            "logging NIC",
            "log0",
            &facts(),
            Some(1558),
            XdpAttachMode::Driver,
            XDP_BASIC | XDP_NDO_XMIT,
        );
        assert_eq!(verdicts(&f), vec![Verdict::Ok; 3], "{f:#?}");
        assert!(f[2].detail.contains("native: basic, redirect, ndo-xmit"));
    }

    #[test]
    fn each_fault_is_a_failure_with_its_fix() {
        let missing = nic(
            "client NIC",
            "cli9",
            &NicFacts::default(),
            None,
            XdpAttachMode::Driver,
            XDP_BASIC,
        );
        assert_eq!(verdicts(&missing), vec![Verdict::Fail]);
        assert!(missing[0].fix.as_ref().unwrap().contains("ip -br link"));

        let down = NicFacts {
            up: false,
            ..facts()
        };
        let f = nic(
            "client NIC",
            "cli0",
            &down,
            None,
            XdpAttachMode::Driver,
            XDP_BASIC,
        );
        assert_eq!(f[0].verdict, Verdict::Fail);
        assert!(
            f[0].fix
                .as_ref()
                .unwrap()
                .contains("ip link set dev cli0 up")
        );

        let small = NicFacts {
            mtu: 1500,
            ..facts()
        };
        let f = nic(
            "logging NIC",
            "log0",
            &small,
            Some(1558),
            XdpAttachMode::Driver,
            XDP_BASIC,
        );
        assert_eq!(f[1].verdict, Verdict::Fail);
        assert!(f[1].fix.as_ref().unwrap().contains("mtu 2000"), "{f:#?}");

        let no_xmit = NicFacts {
            xdp_features: Some(XDP_BASIC | XDP_REDIRECT),
            ..facts()
        };
        let f = nic(
            "logging NIC",
            "log0",
            &no_xmit,
            None,
            XdpAttachMode::Driver,
            XDP_BASIC | XDP_NDO_XMIT,
        );
        // Some drivers report ndo-xmit only with a program attached: a warning.
        assert_eq!(f[1].verdict, Verdict::Warn, "{f:#?}");
        assert!(f[1].fix.as_ref().unwrap().contains("xdp_mode = \"skb\""));
        let no_xdp = NicFacts {
            xdp_features: Some(0),
            ..facts()
        };
        let f = nic(
            "logging NIC",
            "log0",
            &no_xdp,
            None,
            XdpAttachMode::Driver,
            XDP_BASIC | XDP_NDO_XMIT,
        );
        assert_eq!(f[1].verdict, Verdict::Fail, "{f:#?}");
        // Generic mode works on any driver.
        let f = nic(
            "logging NIC",
            "log0",
            &no_xmit,
            None,
            XdpAttachMode::Skb,
            XDP_BASIC | XDP_NDO_XMIT,
        );
        assert_eq!(f[1].verdict, Verdict::Ok);
        // A kernel that does not report features: a warning, not a refusal.
        let old = NicFacts {
            xdp_features: None,
            ..facts()
        };
        let f = nic(
            "client NIC",
            "cli0",
            &old,
            None,
            XdpAttachMode::Driver,
            XDP_BASIC,
        );
        assert_eq!(f[1].verdict, Verdict::Warn);
        let no_carrier = NicFacts {
            carrier: false,
            ..facts()
        };
        let f = nic(
            "client NIC",
            "cli0",
            &no_carrier,
            None,
            XdpAttachMode::Driver,
            XDP_BASIC,
        );
        assert_eq!(f[0].verdict, Verdict::Warn);
        assert_eq!(worst(&f), Verdict::Warn);
    }

    #[test]
    fn a_key_others_may_read_fails() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        std::fs::write(&p, [7u8; 16]).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let f = secret_file("channel key", &p, Some(16));
        assert_eq!(f.verdict, Verdict::Fail);
        assert!(f.fix.as_ref().unwrap().starts_with("chmod 600"));
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(
            secret_file("channel key", &p, Some(16)).verdict,
            Verdict::Ok
        );
        std::fs::write(&p, [7u8; 15]).unwrap();
        assert_eq!(
            secret_file("channel key", &p, Some(16)).verdict,
            Verdict::Fail
        );
        assert_eq!(
            secret_file("channel key", &dir.path().join("none"), Some(16)).verdict,
            Verdict::Fail
        );
    }
}
