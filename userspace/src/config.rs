//! Daemon configuration: TOML, parsed with serde, validated with messages that say what to
//! fix. `configs/primary.toml` and `configs/backup.toml` are the documented samples.
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

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Primary,
    Backup,
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

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSection {
    /// MAC address of the protected VM (same on both hosts).
    pub mac: Mac,
    /// IPv4 address of the protected VM (ARP requests for it are VM input).
    pub ipv4: Ipv4Addr,
    /// Deliver inbound frames with the log header kept (a VMM reads the sequence).
    #[serde(default)]
    pub tagged_input: bool,
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
    /// Silence on the logging channel after which the peer is reported down.
    pub peer_timeout_ms: u64,
    /// Backup: delay before a missing entry is asked for again.
    pub nack_retry_ms: u64,
    /// Backup: most nacks sent per retry round.
    pub nack_burst: u32,
    /// The output rule. `false` releases VM output without waiting for the backup —
    /// only for the benchmark's "gate disabled" baseline; never in production.
    pub hold_output: bool,
}

impl Default for Channel {
    fn default() -> Self {
        Channel {
            epoch: 1,
            retx_slots: 16384,
            hold_slots: 2048,
            heartbeat_ms: 5,
            peer_timeout_ms: 500,
            nack_retry_ms: 3,
            nack_burst: 64,
            hold_output: true,
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
        if c.nack_retry_ms == 0 || c.nack_burst == 0 {
            return invalid("channel.nack_retry_ms and channel.nack_burst must be >= 1");
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

    const GOOD: &str = r#"
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

    fn with(extra: &str) -> Result<Config, ConfigError> {
        Config::parse(&format!("{GOOD}{extra}"))
    }

    fn err(r: Result<Config, ConfigError>) -> String {
        r.expect_err("config should be rejected").to_string()
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = Config::parse(GOOD).unwrap();
        assert_eq!(c.node.role, Role::Primary);
        assert_eq!(c.channel.retx_slots, 16384);
        assert!(c.channel.hold_output);
        assert_eq!(c.vm.mac, Mac([2, 0xf7, 0, 0, 0, 0x64]));
        assert_eq!(c.window(), 16384 - 512);
    }

    #[test]
    fn samples_in_configs_are_valid() {
        for f in ["primary.toml", "backup.toml"] {
            let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../configs")
                .join(f);
            Config::load(&p).unwrap_or_else(|e| panic!("{f}: {e}"));
        }
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
        let bad_mac = GOOD.replace("02:00:00:00:00:02", "02:00:00:00:00");
        assert!(err(Config::parse(&bad_mac)).contains("not a MAC"));
        let same_nic = GOOD.replace("vm = \"vmh\"", "vm = \"cli0\"");
        assert!(err(Config::parse(&same_nic)).contains("three different"));
        let mcast = GOOD.replace("02:f7:00:00:00:64", "01:00:5e:00:00:01");
        assert!(err(Config::parse(&mcast)).contains("unicast"));
    }

    #[test]
    fn fence_section_is_validated() {
        let no_backend = GOOD.replace("backend = \"none\"\n", "");
        assert!(err(Config::parse(&no_backend)).contains("fence"));
        let other = GOOD.replace(
            "backend = \"none\"",
            "backend = \"embedded\"\narbiters = [\"10.0.0.2:7700\"]\nvm = \"vm1\"\nnode = \"b\"",
        );
        assert!(err(Config::parse(&other)).contains("differs from node.name"));
    }

    #[test]
    fn rejects_unknown_keys_and_missing_sections() {
        assert!(err(with("[channel]\nretx = 5\n")).contains("unknown field"));
        assert!(
            err(Config::parse("[node]\nname = \"a\"\nrole = \"primary\"\n")).contains("missing")
        );
        assert!(err(Config::parse(&GOOD.replace("primary", "leader"))).contains("unknown variant"));
    }
}
