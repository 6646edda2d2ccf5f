//! Daemon configuration: TOML, parsed with serde, validated with messages that say what to
//! fix. `configs/host-a.toml` and `configs/host-b.toml` are the documented samples.
use std::{net::Ipv4Addr, path::PathBuf, str::FromStr};

use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid TOML for ftd: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid config: {0}")]
    Invalid(String),
    #[error(transparent)]
    Key(#[from] crate::channel::auth::KeyError),
}

fn invalid<T>(msg: impl Into<String>) -> Result<T, ConfigError> {
    Err(ConfigError::Invalid(msg.into()))
}

/// A MAC address written `aa:bb:cc:dd:ee:ff`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Mac(pub [u8; 6]);

impl FromStr for Mac {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let parts: Vec<&str> = s.split(':').collect();
        if parts.len() != 6 {
            return Err(format!(
                "{s:?} is not a MAC address (expected aa:bb:cc:dd:ee:ff)"
            ));
        }
        let mut m = [0u8; 6];
        for (i, p) in parts.iter().enumerate() {
            if p.len() != 2 {
                return Err(format!(
                    "{s:?} is not a MAC address (expected aa:bb:cc:dd:ee:ff)"
                ));
            }
            m[i] = u8::from_str_radix(p, 16).map_err(|_| format!("{s:?}: {p:?} is not hex"))?;
        }
        Ok(Mac(m))
    }
}

impl std::fmt::Display for Mac {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl<'de> Deserialize<'de> for Mac {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// How a node starts (`[node] role`). The role it has is decided at run time by the
/// role supervisor from the arbiter's record (`ftd::role::start`); this only says what
/// to do on the pair's first start. Whatever it says, a node never boots the guest
/// while the arbiter records that a VM of this pair has lived (epoch > 0): it follows
/// the live node and joins it, or waits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Recommended for both hosts: join the live node as its backup, or wait for one.
    /// The pair's first start boots on one host with `ftd run --bootstrap`. Needs an
    /// arbiter (`[fence] backend = "embedded"` or `"etcd"`).
    Auto,
    /// Boots the VM if no VM of this pair ever ran (the first start); otherwise as
    /// `auto` (it says so in its log).
    Primary,
    /// As `auto` (kept for existing configs; without an arbiter, `backend = "none"`, it
    /// follows the primary of `channel.epoch`).
    Backup,
    /// The protected VM on this host alone, unprotected: no backup, no log, no output
    /// rule (maintenance, or the benchmark's FT-off baseline). It still wins
    /// test-and-set before it goes live, and boots only on a first start.
    Solo,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum XdpAttachMode {
    /// Native driver mode (what production NICs and veth support).
    #[default]
    Driver,
    /// Generic (skb) mode: slower, for drivers without native XDP.
    Skb,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub node: NodeSection,
    pub interfaces: Interfaces,
    pub vm: VmSection,
    #[serde(default)]
    pub channel: Channel,
    #[serde(default)]
    pub api: Api,
    /// Split-brain arbitration (ft-fence): who may go live, with which epoch and lease.
    pub fence: ft_fence::FenceConfig,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSection {
    /// Name of this node (logs, metrics, arbiter).
    pub name: String,
    /// Role at start.
    pub role: Role,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Interfaces {
    /// NIC facing the clients.
    pub client: String,
    /// NIC of the logging channel, linked to the peer's logging NIC.
    pub logging: String,
    /// Host side of the VM's NIC (TAP of the VMM, or a veth to a stand-in).
    pub vm: String,
    /// MAC address of the peer's logging NIC (log frames and acks from anything else
    /// are dropped).
    pub peer_log_mac: Mac,
    #[serde(default)]
    pub xdp_mode: XdpAttachMode,
}

/// What runs as the protected VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum VmKind {
    /// The built-in KVM VMM, run by ftd (the appliance's normal mode): it records on the
    /// primary, replays on the backup, and `interfaces.vm` is its TAP, created by ftd.
    #[default]
    Vmm,
    /// Something outside ftd behind `interfaces.vm` (a stand-in VM on a veth): for
    /// data-plane tests; nothing is replayed, the backup delivers input frames to it.
    External,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSection {
    #[serde(default)]
    pub kind: VmKind,
    /// MAC address of the protected VM (same on both hosts).
    pub mac: Mac,
    /// IPv4 address of the protected VM (ARP requests for it are VM input).
    pub ipv4: Ipv4Addr,
    /// Prefix length of the VM's network.
    #[serde(default = "default_prefix")]
    pub prefix_len: u8,
    /// Default gateway of the VM ("0.0.0.0" = none: clients on the VM's own network).
    #[serde(default = "default_gateway")]
    pub gateway: Ipv4Addr,
    /// TCP port of the VM's service.
    #[serde(default = "default_port")]
    pub port: u16,
    /// External VM only: deliver inbound frames with the log header kept. (The VMM
    /// always reads the log sequence of each frame: tagged input.)
    #[serde(default)]
    pub tagged_input: bool,
    /// Guest image (ELF); empty = the built-in guest. Same file on both hosts.
    #[serde(default)]
    pub image: PathBuf,
    /// The guest image's SHA-256 (hex), if pinned: ftd refuses to start with any other
    /// (the packages keep every guest they shipped in /var/lib/ftd/guests/<sha256>.elf,
    /// so a pinned guest survives upgrades of ftd, which is what lets an upgraded host
    /// join the running VM).
    #[serde(default)]
    pub image_sha256: String,
    /// Guest RAM in MiB (64 to 3072, even).
    #[serde(default = "default_ram")]
    pub ram_mib: u64,
    /// MTU of the TAP that ftd creates (tagged input needs at least 1558).
    #[serde(default = "default_tap_mtu")]
    pub tap_mtu: u32,
    /// Host CPU the vCPU thread is pinned to: the same index on both hosts. -1 = not
    /// pinned.
    #[serde(default = "default_cpu")]
    pub cpu: i32,
    /// A checkpoint (state hash the backup verifies) every this many guest exits.
    #[serde(default = "default_checkpoint")]
    pub checkpoint_interval: u64,
    /// Settings of the guest's service (0 = derived from the RAM size).
    #[serde(default)]
    pub service: VmService,
}

#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VmService {
    pub maxclients: u32,
    pub maxmemory: u64,
    /// Close clients idle for this many seconds (0 = never).
    pub timeout_s: u32,
    /// TCP keep-alive interval in seconds (0 = off).
    pub tcp_keepalive_s: u32,
}

impl Default for VmService {
    fn default() -> Self {
        VmService {
            maxclients: 0,
            maxmemory: 0,
            timeout_s: 0,
            tcp_keepalive_s: 60,
        }
    }
}

fn default_prefix() -> u8 {
    24
}
fn default_gateway() -> Ipv4Addr {
    Ipv4Addr::UNSPECIFIED
}
fn default_port() -> u16 {
    6379
}
fn default_ram() -> u64 {
    256
}
fn default_tap_mtu() -> u32 {
    1600
}
fn default_cpu() -> i32 {
    -1
}
fn default_checkpoint() -> u64 {
    1000
}

/// Smallest TAP MTU that carries a tagged input frame: the largest client frame plus the
/// log header, less the Ethernet header the MTU excludes.
pub const MIN_TAP_MTU: u32 =
    (ft_common::wire::MAX_FRAME + ft_common::wire::LOG_OVERHEAD - ft_common::wire::ETH_HLEN) as u32;

impl VmSection {
    /// The VM reads tagged input (always, for the VMM).
    pub fn tagged(&self) -> bool {
        self.kind == VmKind::Vmm || self.tagged_input
    }

    /// The VMM's configuration (mode and wiring are set by the daemon).
    pub fn vmm_config(&self) -> ft_vmm::VmmConfig {
        ft_vmm::VmmConfig {
            mac: self.mac.0,
            ip: self.ipv4.octets(),
            prefix_len: self.prefix_len,
            gateway: self.gateway.octets(),
            port: self.port,
            checkpoint_interval: self.checkpoint_interval,
            tagged_input: true,
            pin_cpu: usize::try_from(self.cpu).ok(),
            ram_size: self.ram_mib << 20,
            service: ft_vmm::vmm::ServiceConfig {
                maxclients: self.service.maxclients,
                maxmemory: self.service.maxmemory,
                timeout_s: self.service.timeout_s,
                tcp_keepalive_s: self.service.tcp_keepalive_s,
                hz: 0,
            },
            // A referenced frame that has not arrived is waited for until the daemon
            // decides (go-live at that exit, or stop): the primary may be repairing it.
            frame_wait_timeout: None,
            ..Default::default()
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.prefix_len == 0 || self.prefix_len > 32 {
            return invalid("vm.prefix_len must be 1..=32");
        }
        if self.kind != VmKind::Vmm {
            return Ok(());
        }
        if self.tap_mtu < MIN_TAP_MTU {
            return invalid(format!(
                "vm.tap_mtu = {}: inbound frames reach the VMM with their {}-byte log header, so \
                 the TAP needs an MTU of at least {MIN_TAP_MTU}",
                self.tap_mtu,
                ft_common::wire::LOG_OVERHEAD
            ));
        }
        if !self.image.as_os_str().is_empty() && !self.image.is_file() {
            return invalid(format!(
                "vm.image = {:?} does not exist; give the guest image's path, or leave it out for the built-in guest",
                self.image
            ));
        }
        if !self.image_sha256.is_empty() {
            self.checked_image_bytes()?;
        }
        if self.checkpoint_interval == 0 {
            return invalid(
                "vm.checkpoint_interval must be >= 1 (the backup verifies the replica at every checkpoint)",
            );
        }
        if self.cpu < -1 {
            return invalid("vm.cpu must be a CPU index, or -1 for no pinning");
        }
        self.vmm_config()
            .validate()
            .map_err(|e| ConfigError::Invalid(format!("[vm]: {e}")))
    }

    /// The guest image's bytes, checked against `vm.image_sha256` if it is pinned: at
    /// config load, and again when the VM starts (the file may have changed since).
    pub fn checked_image_bytes(&self) -> Result<Vec<u8>, ConfigError> {
        let bytes = self.image_bytes()?;
        if self.image_sha256.is_empty() {
            return Ok(bytes);
        }
        let pinned = self.image_sha256.to_ascii_lowercase();
        if pinned.len() != 64 || !pinned.bytes().all(|b| b.is_ascii_hexdigit()) {
            return invalid(format!(
                "vm.image_sha256 = {:?} is not a SHA-256 (64 hex digits)",
                self.image_sha256
            ));
        }
        let actual = image_sha256(&bytes);
        if actual != pinned {
            return invalid(format!(
                "vm.image {} has SHA-256 {actual}, but vm.image_sha256 pins {pinned}: the pair runs \
                 the pinned guest, and a replica of another guest cannot join it. Point vm.image \
                 at the pinned file (/var/lib/ftd/guests/{pinned}.elf), or change the pin when \
                 the VM may restart",
                if self.image.as_os_str().is_empty() {
                    "(the built-in guest)".to_string()
                } else {
                    format!("{:?}", self.image)
                }
            ));
        }
        Ok(bytes)
    }

    /// The guest image's bytes: `vm.image`, or the built-in guest.
    pub fn image_bytes(&self) -> Result<Vec<u8>, ConfigError> {
        if self.image.as_os_str().is_empty() {
            return Ok(ft_vmm::GUEST_ELF.to_vec());
        }
        std::fs::read(&self.image).map_err(|source| ConfigError::Read {
            path: self.image.clone(),
            source,
        })
    }
}

/// SHA-256 of a guest image, lowercase hex (what `vm.image_sha256` pins).
pub fn image_sha256(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Channel {
    /// Fencing epoch used while no arbiter assigns one.
    pub epoch: u64,
    /// Retransmission store entries (power of two, >= 1024). Bounds the log frames in
    /// flight: the primary stops duplicating (drops inbound, counted) when the backup
    /// lags by more than `retx_slots - 512`. ~1.5 KiB of kernel memory each.
    pub retx_slots: u32,
    /// Held-output ring entries (power of two, 64 to 2048: one ack can release the whole
    /// ring). A full ring drops new VM output (counted); it never releases early.
    /// ~1.6 KiB each.
    pub hold_slots: u32,
    /// Primary heartbeat and backup ack keep-alive period.
    pub heartbeat_ms: u64,
    /// Silence on the logging channel after which the peer is reported down (the
    /// backup takes over, the primary goes solo).
    pub peer_timeout_ms: u64,
    /// Primary: how long a backup that is heard (its keep-alives arrive) may make no
    /// progress at all while entries are outstanding before the primary goes on alone.
    /// A backup that replays slower than the primary records is waited for: the windows
    /// make the primary's vCPU wait for it (back-pressure). Only a wedged backup stays
    /// this long without any progress.
    pub backup_stall_ms: u64,
    /// Backup: delay before a missing entry is asked for again.
    pub nack_retry_ms: u64,
    /// Backup: most nacks sent per retry round.
    pub nack_burst: u32,
    /// Most VMLOG frames (VMM entries, up to ~1.5 KiB each) the primary keeps unacked:
    /// beyond it the primary's vCPU waits for the backup (back-pressure; entries are
    /// never dropped).
    pub vmlog_window: u64,
    /// The output rule. `false` releases VM output without waiting for the backup —
    /// only for the benchmark's "gate disabled" baseline; never in production.
    pub hold_output: bool,
    /// Backup: XDP acks log frames that arrive in order itself, once they are copied
    /// into the ring the daemon drains, so the output rule waits for one kernel-to-kernel
    /// round trip and never for the backup's userspace. `false` leaves every ack to the
    /// daemon — only for the benchmark's comparison. Needs native XDP (`xdp_mode =
    /// "driver"`); in generic mode the daemon acks.
    pub kernel_acks: bool,
    /// Backup: least time between two acks XDP sends for one stream, in microseconds
    /// (batching under load). A frame that arrives sooner is confirmed but its ack is
    /// left to the daemon's next one (one per wake-up) or to XDP's next after the
    /// interval; an isolated frame (request/response) is acked at once. 0: every
    /// in-order frame gets its own ack.
    pub kernel_ack_interval_us: u64,
    /// Re-protection: where this node accepts a joining backup (TCP `address:port`, an
    /// address of the logging NIC), while it runs the VM alone. Empty: no joins.
    pub join_listen: String,
    /// Re-protection: the peer's `join_listen`, where this node (configured as backup)
    /// asks to join a primary that runs alone. Empty: a backup only follows a log that
    /// starts with the VM's boot.
    pub join_peer: String,
    /// File with the 16-byte key of the logging link, the same on both hosts (required):
    /// every frame on the link carries a tag or MAC under it (checked in XDP), and the
    /// join and the state transfer are authenticated with it. `ftd keygen <file>` makes
    /// one; `ftd keygen --rotate <file>` replaces it and keeps the old one beside it as
    /// `<file>.prev` (see `channel::keys`).
    pub key_file: PathBuf,
    /// Key rotation: how long after `ftd keygen --rotate` the old key
    /// (`<key_file>.prev`) is still accepted. Both hosts must hold the new key within it.
    pub key_overlap_s: u64,
    /// The keys read from `key_file` (and `<key_file>.prev`) by [`Config::parse`],
    /// shared by every clone of this configuration (a reload changes them for all).
    #[serde(skip)]
    pub keys: std::sync::Arc<crate::channel::keys::ChannelKeys>,
}

impl Channel {
    pub fn key_overlap(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.key_overlap_s)
    }
}

impl Default for Channel {
    fn default() -> Self {
        Channel {
            epoch: 1,
            retx_slots: 16384,
            hold_slots: 2048,
            heartbeat_ms: 5,
            peer_timeout_ms: 50,
            backup_stall_ms: 5000,
            nack_retry_ms: 3,
            nack_burst: 64,
            vmlog_window: 4096,
            hold_output: true,
            kernel_acks: true,
            kernel_ack_interval_us: 200,
            join_listen: String::new(),
            join_peer: String::new(),
            key_file: PathBuf::new(),
            key_overlap_s: 3600,
            keys: Default::default(),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Api {
    /// Prometheus metrics endpoint (HTTP GET /metrics). Empty to disable.
    pub metrics_listen: String,
    /// Unix socket for `ftd status`.
    pub control_socket: PathBuf,
}

impl Default for Api {
    fn default() -> Self {
        Api {
            metrics_listen: "127.0.0.1:9477".into(),
            control_socket: "/run/ftd/ftd.sock".into(),
        }
    }
}

impl Config {
    /// The control socket a config names (`api.control_socket`, or its default), read
    /// without validating the rest: `ftd status` needs no keys or interfaces, and may
    /// run as a monitoring user who cannot read them.
    pub fn control_socket_of(path: &std::path::Path) -> Result<PathBuf, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        #[derive(Deserialize)]
        struct Only {
            #[serde(default)]
            api: Option<toml::Table>,
        }
        let only: Only = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.into(),
            message: e.to_string(),
        })?;
        match only.api.as_ref().and_then(|a| a.get("control_socket")) {
            None => Ok(Api::default().control_socket),
            Some(toml::Value::String(s)) if !s.is_empty() => Ok(s.into()),
            Some(_) => Err(ConfigError::Parse {
                path: path.into(),
                message: "api.control_socket must be a path".into(),
            }),
        }
    }

    pub fn load(path: &std::path::Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        Self::parse(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.into(),
                message,
            },
            other => other,
        })
    }

    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let mut cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::new(),
            message: e.to_string(),
        })?;
        // The arbiter knows this node by node.name unless [fence] says otherwise; a
        // static lease ("none") needs no VM name.
        if cfg.fence.node.is_empty() {
            cfg.fence.node = cfg.node.name.clone();
        }
        if cfg.fence.vm.is_empty() && cfg.fence.backend == Some(ft_fence::Backend::None) {
            cfg.fence.vm = "vm".into();
        }
        cfg.validate()?;
        cfg.channel.keys = std::sync::Arc::new(crate::channel::keys::ChannelKeys::load(
            &cfg.channel.key_file,
            cfg.channel.key_overlap(),
        )?);
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.node.name.is_empty() {
            return invalid("node.name must not be empty");
        }
        let i = &self.interfaces;
        for (key, name) in [
            ("client", &i.client),
            ("logging", &i.logging),
            ("vm", &i.vm),
        ] {
            if name.is_empty() || name.len() > 15 {
                return invalid(format!(
                    "interfaces.{key} = {name:?}: interface names are 1-15 characters"
                ));
            }
        }
        if i.client == i.logging || i.client == i.vm || i.logging == i.vm {
            return invalid("interfaces.client, .logging and .vm must be three different NICs");
        }
        if i.peer_log_mac.0 == [0; 6] || i.peer_log_mac.0[0] & 1 == 1 {
            return invalid("interfaces.peer_log_mac must be the peer's unicast MAC");
        }
        if self.vm.mac.0[0] & 1 == 1 || self.vm.mac.0 == [0; 6] {
            return invalid("vm.mac must be a unicast MAC address");
        }
        if self.vm.ipv4.is_unspecified() || self.vm.ipv4.is_broadcast() {
            return invalid("vm.ipv4 must be the VM's unicast address");
        }
        self.vm.validate()?;
        let c = &self.channel;
        if c.epoch == 0 {
            return invalid("channel.epoch must be >= 1 (0 means 'no epoch')");
        }
        if !c.retx_slots.is_power_of_two() || !(1024..=1 << 20).contains(&c.retx_slots) {
            return invalid(format!(
                "channel.retx_slots = {}: use a power of two between 1024 and 1048576",
                c.retx_slots
            ));
        }
        let hold_max = ft_common::maps::HOLD_RELEASE_MAX;
        if !c.hold_slots.is_power_of_two() || !(64..=hold_max).contains(&c.hold_slots) {
            return invalid(format!(
                "channel.hold_slots = {}: use a power of two between 64 and {hold_max} (the \
                 most held frames one ack releases)",
                c.hold_slots
            ));
        }
        if c.heartbeat_ms == 0 || c.heartbeat_ms > 1000 {
            return invalid("channel.heartbeat_ms must be 1..=1000");
        }
        if c.peer_timeout_ms < 4 * c.heartbeat_ms {
            return invalid(format!(
                "channel.peer_timeout_ms = {} must be at least 4 x heartbeat_ms ({}), or one \
                 lost heartbeat looks like a dead peer",
                c.peer_timeout_ms, c.heartbeat_ms
            ));
        }
        if c.backup_stall_ms < c.peer_timeout_ms {
            return invalid(format!(
                "channel.backup_stall_ms = {} must be at least peer_timeout_ms ({}): a slow \
                 backup is waited for longer than a silent one",
                c.backup_stall_ms, c.peer_timeout_ms
            ));
        }
        if !(16..=1 << 20).contains(&c.vmlog_window) {
            return invalid("channel.vmlog_window must be 16..=1048576 frames");
        }
        if c.key_file.as_os_str().is_empty() {
            return Err(crate::channel::auth::KeyError::NotSet.into());
        }
        if c.key_overlap_s < 60 {
            return invalid(format!(
                "channel.key_overlap_s = {}: both hosts must read the new key within the overlap; give them at least 60 s (default 3600)",
                c.key_overlap_s
            ));
        }
        if c.nack_retry_ms == 0 || c.nack_burst == 0 {
            return invalid("channel.nack_retry_ms and channel.nack_burst must be >= 1");
        }
        for (key, v) in [("join_listen", &c.join_listen), ("join_peer", &c.join_peer)] {
            if !v.is_empty() && v.parse::<std::net::SocketAddr>().is_err() {
                return invalid(format!(
                    "channel.{key} = {v:?} is not an address:port (an address of the logging NIC)"
                ));
            }
        }
        if (!c.join_listen.is_empty() || !c.join_peer.is_empty()) && self.vm.kind != VmKind::Vmm {
            return invalid(
                "channel.join_listen / join_peer need vm.kind = \"vmm\": only ftd's own VMM can transfer its state",
            );
        }
        if !self.api.metrics_listen.is_empty()
            && self
                .api
                .metrics_listen
                .parse::<std::net::SocketAddr>()
                .is_err()
        {
            return invalid(format!(
                "api.metrics_listen = {:?} is not an address:port",
                self.api.metrics_listen
            ));
        }
        if self.api.control_socket.as_os_str().is_empty() {
            return invalid("api.control_socket must be a path");
        }
        self.fence
            .validate()
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        if self.node.role == Role::Auto && self.fence.backend == Some(ft_fence::Backend::None) {
            return invalid(
                "node.role = \"auto\" needs an arbiter: it asks the arbiter whether a VM lives \
                 and where; set [fence] backend = \"embedded\" or \"etcd\" (or role = \"primary\" \
                 / \"backup\" for a demo without one)",
            );
        }
        if !self.fence.node.is_empty() && self.fence.node != self.node.name {
            return invalid(format!(
                "fence.node = {:?} differs from node.name = {:?}; the arbiter must know this node by its name",
                self.fence.node, self.node.name
            ));
        }
        Ok(())
    }

    /// Entries in flight allowed by the retransmission store.
    pub fn window(&self) -> u64 {
        self.channel.retx_slots as u64 - ft_common::maps::RETX_MARGIN
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD_BODY: &str = r#"
[node]
name = "a"
role = "primary"
[interfaces]
client = "cli0"
logging = "log0"
vm = "vmh"
peer_log_mac = "02:00:00:00:00:02"
[vm]
mac = "02:f7:00:00:00:64"
ipv4 = "10.77.0.100"
[fence]
backend = "none"
"#;

    /// A channel key file for the tests (the samples name /etc/ftd/channel.key).
    fn test_key() -> &'static std::path::Path {
        static KEY: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
        KEY.get_or_init(|| {
            let p =
                std::env::temp_dir().join(format!("ftd-config-test-{}.key", std::process::id()));
            std::fs::write(&p, [0x5a; 16]).unwrap();
            p
        })
    }

    /// A minimal valid config; its `[channel]` table (with the key) comes last.
    fn good() -> String {
        format!(
            "{GOOD_BODY}[channel]\nkey_file = \"{}\"\n",
            test_key().display()
        )
    }

    /// A sample config with its key path pointing at the tests' key.
    fn sample(text: &str) -> String {
        text.replace(
            "\"/etc/ftd/channel.key\"",
            &format!("\"{}\"", test_key().display()),
        )
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(1000))]

        /// The sample configs with a line dropped, duplicated, or its value replaced by
        /// random text: a config that validates, or an error that says what is wrong;
        /// never a panic.
        #[test]
        fn mutated_configs_load_or_explain(
            which in 0usize..2,
            line in 0usize..400,
            how in 0u8..3,
            junk in "[ -~]{0,24}",
        ) {
            let text = sample([
                include_str!("../../configs/host-a.toml"),
                include_str!("../../configs/host-b.toml"),
            ][which]);
            let mut lines: Vec<String> = text.lines().map(String::from).collect();
            let i = line % lines.len();
            match how {
                0 => {
                    lines.remove(i);
                }
                1 => {
                    let l = lines[i].clone();
                    lines.insert(i, l);
                }
                _ => {
                    if let Some((k, _)) = lines[i].clone().split_once('=') {
                        lines[i] = format!("{k}= {junk}");
                    } else {
                        lines[i] = junk.clone();
                    }
                }
            }
            match Config::parse(&lines.join("\n")) {
                Ok(c) => proptest::prop_assert!(c.validate().is_ok()),
                Err(e) => proptest::prop_assert!(!e.to_string().is_empty()),
            }
        }
    }

    /// `good()` plus `extra`; lines of a leading `[channel]` go into its `[channel]`.
    fn with(extra: &str) -> Result<Config, ConfigError> {
        let extra = extra.strip_prefix("[channel]\n").unwrap_or(extra);
        Config::parse(&format!("{}{extra}", good()))
    }

    fn err(r: Result<Config, ConfigError>) -> String {
        r.expect_err("config should be rejected").to_string()
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = Config::parse(&good()).unwrap();
        assert_eq!(c.node.role, Role::Primary);
        assert_eq!(c.channel.retx_slots, 16384);
        assert!(c.channel.hold_output);
        assert_eq!(c.vm.mac, Mac([2, 0xf7, 0, 0, 0, 0x64]));
        assert_eq!(c.window(), 16384 - 512);
    }

    #[test]
    fn samples_in_configs_are_valid() {
        for f in ["host-a.toml", "host-b.toml"] {
            let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../configs")
                .join(f);
            let text = std::fs::read_to_string(&p).unwrap();
            assert!(text.contains("key_file = \"/etc/ftd/channel.key\""), "{f}");
            Config::parse(&sample(&text)).unwrap_or_else(|e| panic!("{f}: {e}"));
        }
    }

    #[test]
    fn auto_needs_an_arbiter_and_a_stall_bound_above_the_timeout() {
        let e = err(Config::parse(
            &good().replace("role = \"primary\"", "role = \"auto\""),
        ));
        assert!(e.contains("needs an arbiter"), "{e}");
        assert!(
            err(with(
                "[channel]\npeer_timeout_ms = 500\nbackup_stall_ms = 100\n"
            ))
            .contains("backup_stall_ms")
        );
    }

    #[test]
    fn rejects_bad_values_with_clear_messages() {
        assert!(err(with("[channel]\nretx_slots = 1000\n")).contains("power of two"));
        assert!(err(with("[channel]\nhold_slots = 8\n")).contains("hold_slots"));
        assert!(err(with("[channel]\nepoch = 0\n")).contains("epoch"));
        assert!(
            err(with(
                "[channel]\nheartbeat_ms = 50\npeer_timeout_ms = 100\n"
            ))
            .contains("4 x heartbeat_ms")
        );
        assert!(err(with("[api]\nmetrics_listen = \"nope\"\n")).contains("address:port"));
        let bad_mac = good().replace("02:00:00:00:00:02", "02:00:00:00:00");
        assert!(err(Config::parse(&bad_mac)).contains("not a MAC"));
        let same_nic = good().replace("vm = \"vmh\"", "vm = \"cli0\"");
        assert!(err(Config::parse(&same_nic)).contains("three different"));
        let mcast = good().replace("02:f7:00:00:00:64", "01:00:5e:00:00:01");
        assert!(err(Config::parse(&mcast)).contains("unicast"));
    }

    fn with_vm(keys: &str) -> Result<Config, ConfigError> {
        Config::parse(&good().replace(
            "ipv4 = \"10.77.0.100\"\n",
            &format!("ipv4 = \"10.77.0.100\"\n{keys}\n"),
        ))
    }

    #[test]
    fn vm_section_defaults_to_the_built_in_vmm() {
        let c = Config::parse(&good()).unwrap();
        assert_eq!(c.vm.kind, VmKind::Vmm);
        assert!(c.vm.tagged());
        let v = c.vm.vmm_config();
        assert_eq!(v.ram_size, 256 << 20);
        assert_eq!(v.port, 6379);
        assert_eq!(v.checkpoint_interval, 1000);
        assert_eq!(v.pin_cpu, None);
        assert_eq!(with_vm("cpu = 3").unwrap().vm.vmm_config().pin_cpu, Some(3));
    }

    #[test]
    fn a_pinned_guest_image_must_be_the_one_configured() {
        let built_in = image_sha256(ft_vmm::GUEST_ELF);
        with_vm(&format!("image_sha256 = \"{built_in}\"")).unwrap();
        with_vm(&format!("image_sha256 = \"{}\"", built_in.to_uppercase())).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let other = dir.path().join("other.elf");
        let mut bytes = ft_vmm::GUEST_ELF.to_vec();
        bytes.push(0);
        std::fs::write(&other, &bytes).unwrap();
        let e = err(with_vm(&format!(
            "image = {:?}\nimage_sha256 = \"{built_in}\"",
            other.display().to_string()
        )));
        assert!(
            e.contains(&image_sha256(&bytes))
                && e.contains(&format!("/var/lib/ftd/guests/{built_in}.elf")),
            "{e}"
        );
        let e = err(with_vm("image_sha256 = \"abc\""));
        assert!(e.contains("64 hex digits"), "{e}");
    }

    #[test]
    fn vm_section_rejects_what_the_guest_cannot_use() {
        let e = err(with_vm("tap_mtu = 1500"));
        assert!(e.contains(&format!("at least {MIN_TAP_MTU}")), "{e}");
        // An external VM without a TAP is not held to it.
        with_vm("kind = \"external\"\ntap_mtu = 1500").unwrap();
        for ram in ["ram_mib = 32", "ram_mib = 4096", "ram_mib = 257"] {
            let e = err(with_vm(ram));
            assert!(e.contains("64 MiB to 3072 MiB"), "{ram}: {e}");
        }
        with_vm("ram_mib = 64").unwrap();
        with_vm("ram_mib = 2048").unwrap();
        let e = err(with_vm("image = \"/nonexistent/guest.elf\""));
        assert!(
            e.contains("does not exist") && e.contains("built-in guest"),
            "{e}"
        );
        let e = err(with_vm("checkpoint_interval = 0"));
        assert!(e.contains("checkpoint_interval"), "{e}");
        let e = err(with_vm("cpu = -2"));
        assert!(e.contains("vm.cpu"), "{e}");
        let e = err(with_vm("ram_mib = 64\n[vm.service]\nmaxclients = 100000"));
        assert!(e.contains("[vm]"), "{e}");
        let e = err(with("[channel]\nvmlog_window = 4\n"));
        assert!(e.contains("vmlog_window"), "{e}");
    }

    #[test]
    fn fence_section_is_validated() {
        let no_backend = good().replace("backend = \"none\"\n", "");
        assert!(err(Config::parse(&no_backend)).contains("fence"));
        let other = good().replace(
            "backend = \"none\"",
            "backend = \"embedded\"\narbiters = [\"10.0.0.2:7700\"]\nvm = \"vm1\"\nnode = \"b\"\npeer = \"c\"\ninsecure = true",
        );
        assert!(err(Config::parse(&other)).contains("differs from node.name"));
        // An embedded arbiter without its secret is refused unless told insecure.
        let open = other.replace("\ninsecure = true", "");
        let e = err(Config::parse(&open));
        assert!(
            e.contains("without fence.secret_file") && e.contains("ft-arbiter --secret-file"),
            "{e}"
        );
    }

    #[test]
    fn the_channel_key_is_required_and_checked() {
        let c = Config::parse(&good()).unwrap();
        assert_eq!(
            c.channel.keys.sender().key,
            crate::channel::auth::ChannelKey::from_bytes([0x5a; 16])
        );
        let no_key = good().replace(&format!("key_file = \"{}\"", test_key().display()), "");
        let e = err(Config::parse(&no_key));
        assert!(
            e.contains("key_file is required") && e.contains("ftd keygen"),
            "{e}"
        );
        let missing = good().replace(
            &test_key().display().to_string(),
            "/nonexistent/channel.key",
        );
        let e = err(Config::parse(&missing));
        assert!(
            e.contains("/nonexistent/channel.key") && e.contains("head -c 16 /dev/urandom"),
            "{e}"
        );
        // Not printed with the config.
        assert!(!format!("{c:?}").contains("5a, 5a") && !format!("{c:?}").contains("90, 90"));
    }

    #[test]
    fn rejects_unknown_keys_and_missing_sections() {
        assert!(err(with("[channel]\nretx = 5\n")).contains("unknown field"));
        assert!(
            err(Config::parse("[node]\nname = \"a\"\nrole = \"primary\"\n")).contains("missing")
        );
        assert!(
            err(Config::parse(&good().replace("primary", "leader"))).contains("unknown variant")
        );
    }
}
