//! Runs the real appliance daemon (`ftd`) on a [`Testbed`]: writes one config per host
//! (into the testbed's temp dir), starts `ftd run` inside host A's and host B's
//! namespaces, and reads their status over the control socket.
use std::{
    io::Read,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::{ChildGuard, Testbed, fmt_mac, names::*};

/// Knobs for the generated configs.
#[derive(Clone, Debug)]
pub struct ApplianceOptions {
    pub hold_output: bool,
    /// `[channel] kernel_acks`: the backup's XDP acks in-order frames (false: its daemon
    /// sends every ack; the benchmark's comparison).
    pub kernel_acks: bool,
    pub retx_slots: u32,
    pub hold_slots: u32,
    pub heartbeat_ms: u64,
    pub peer_timeout_ms: u64,
    pub nack_retry_ms: u64,
    pub epoch_a: u64,
    pub epoch_b: u64,
    pub start_backup: bool,
    /// Roles: host A primary, host B backup (false) or the other way round (true).
    pub swap_roles: bool,
    pub xdp_mode: &'static str,
    /// Body of the `[fence]` table (without `vm`/`node`, which are filled per host).
    /// Default: `backend = "none"`.
    pub fence: String,
    /// The protected VM: the stand-in VMs of the testbed (default, data-plane tests) or
    /// the VMM inside ftd.
    pub vm: VmOptions,
    /// Extra lines for the `[channel]` table.
    pub channel_extra: String,
    /// Host A runs `role = "solo"` (no backup is started).
    pub solo: bool,
    /// Re-protection: each host accepts joining backups on its logging address (port
    /// 7480) and, started as backup, asks the peer there.
    pub join: bool,
    /// Both hosts `role = "auto"` (as the samples and the systemd unit): host A is
    /// started with `--bootstrap` (the pair's first start boots there), and keeps it on
    /// every restart (ignored once a VM of the pair has lived).
    pub auto: bool,
    /// Environment of host A's first `ftd run` (fault injection: `ftd::fault`).
    pub env_a: Vec<(String, String)>,
    /// The `ftd` binary both hosts run (default: [`ftd_bin`], the build's); the package
    /// test runs the installed one.
    pub ftd: Option<PathBuf>,
    /// Host B's `ftd` binary, if not the same as host A's (each host's own install).
    pub ftd_b: Option<PathBuf>,
}

/// What runs as the protected VM.
#[derive(Clone, Debug, Default)]
pub enum VmOptions {
    /// `[vm] kind = "external"`: the testbed's stand-in VM behind `vmh`.
    #[default]
    Standin,
    /// `[vm] kind = "vmm"`: ftd runs the VMM; its TAP is `VM_TAP`.
    Vmm {
        ram_mib: u64,
        /// Extra lines for the `[vm]` table (e.g. service settings).
        extra: String,
    },
}

impl VmOptions {
    /// The VMM with default settings.
    pub fn vmm() -> VmOptions {
        VmOptions::Vmm {
            ram_mib: 256,
            extra: String::new(),
        }
    }
}

impl Default for ApplianceOptions {
    fn default() -> Self {
        ApplianceOptions {
            hold_output: true,
            kernel_acks: true,
            retx_slots: 16384,
            hold_slots: 2048,
            heartbeat_ms: 5,
            peer_timeout_ms: 500,
            nack_retry_ms: 3,
            epoch_a: 1,
            epoch_b: 1,
            start_backup: true,
            swap_roles: false,
            xdp_mode: "driver",
            fence: "backend = \"none\"".into(),
            vm: VmOptions::Standin,
            channel_extra: String::new(),
            solo: false,
            join: false,
            auto: false,
            env_a: Vec::new(),
            ftd: None,
            ftd_b: None,
        }
    }
}

/// A running pair of daemons. Dropping it stops them (SIGKILL via the guards).
pub struct Appliance {
    pub a: Option<ChildGuard>,
    pub b: Option<ChildGuard>,
    pub sock_a: PathBuf,
    pub sock_b: PathBuf,
    pub config_a: PathBuf,
    pub config_b: PathBuf,
    /// Extra `ftd run` arguments of each host (kept for restarts).
    pub args_a: Vec<String>,
    pub args_b: Vec<String>,
    /// The `ftd` binary each host runs (and its restarts use).
    pub bin_a: PathBuf,
    pub bin_b: PathBuf,
}

/// The `ftd` binary: `$FTD_BIN`, or next to the running test executable.
pub fn ftd_bin() -> Result<PathBuf> {
    workspace_bin("ftd", "FTD_BIN")
}

/// A binary of the workspace: `$<env>`, or next to the running executable.
pub fn workspace_bin(name: &str, env: &str) -> Result<PathBuf> {
    if let Some(p) = std::env::var_os(env) {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    let mut dir = exe.parent();
    for _ in 0..3 {
        let Some(d) = dir else { break };
        if d.join(name).is_file() {
            return Ok(d.join(name));
        }
        dir = d.parent();
    }
    bail!(
        "{name} binary not found near {}: run `cargo build --bins` first or set {env}",
        exe.display()
    )
}

/// The channel key file both hosts' configs name (`[channel] key_file`): 16 random
/// bytes, made once per testbed on first use.
pub fn channel_key_file(tb: &Testbed) -> Result<PathBuf> {
    use std::{io::Write, os::unix::fs::OpenOptionsExt};
    let path = tb.tmp_dir.join("channel.key");
    if !path.exists() {
        let mut key = [0u8; 16];
        std::fs::File::open("/dev/urandom")?.read_exact(&mut key)?;
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .and_then(|mut f| f.write_all(&key))
            .with_context(|| format!("writing the channel key {}", path.display()))?;
    }
    Ok(path)
}

/// The testbed's channel key (what the backup's acks are tagged with).
pub fn channel_key(tb: &Testbed) -> Result<[u8; 16]> {
    let path = channel_key_file(tb)?;
    let b = std::fs::read(&path)?;
    b.as_slice()
        .try_into()
        .with_context(|| format!("{} holds {} bytes, not 16", path.display(), b.len()))
}

pub fn write_config(tb: &Testbed, host: char, role: &str, o: &ApplianceOptions) -> Result<PathBuf> {
    let (me, peer, epoch) = match host {
        'a' => (&tb.a, &tb.b, o.epoch_a),
        _ => (&tb.b, &tb.a, o.epoch_b),
    };
    let sock = tb.tmp_dir.join(format!("ftd-{host}.sock"));
    let text = format!(
        r#"[node]
name = "host-{host}"
role = "{role}"
[interfaces]
client = "{CLI_IF}"
logging = "{LOG_IF}"
vm = "{vm_if}"
peer_log_mac = "{peer_mac}"
xdp_mode = "{xdp}"
[vm]
mac = "{vm_mac}"
ipv4 = "{VM_IP}"
{vm_extra}
[channel]
epoch = {epoch}
retx_slots = {retx}
hold_slots = {hold}
heartbeat_ms = {hb}
peer_timeout_ms = {pt}
nack_retry_ms = {nr}
hold_output = {ho}
kernel_acks = {ka}
key_file = "{key}"
{join}
{channel_extra}
[api]
metrics_listen = "127.0.0.1:9477"
control_socket = "{sock}"
[fence]
{fence}
{fence_ids}
"#,
        fence = o.fence,
        channel_extra = o.channel_extra,
        join = if o.join {
            let (own, peer) = if host == 'a' {
                (HOST_A_LOG_IP, HOST_B_LOG_IP)
            } else {
                (HOST_B_LOG_IP, HOST_A_LOG_IP)
            };
            format!("join_listen = \"{own}:{JOIN_PORT}\"\njoin_peer = \"{peer}:{JOIN_PORT}\"")
        } else {
            String::new()
        },
        fence_ids = if o.fence.contains("\"none\"") {
            String::new()
        } else {
            let peer = if host == 'a' { 'b' } else { 'a' };
            format!("vm = \"vm1\"\nnode = \"host-{host}\"\npeer = \"host-{peer}\"")
        },
        vm_if = match o.vm {
            VmOptions::Standin => VMH_IF,
            VmOptions::Vmm { .. } => VM_TAP,
        },
        vm_extra = match &o.vm {
            VmOptions::Standin => "kind = \"external\"".to_string(),
            VmOptions::Vmm { ram_mib, extra } => format!(
                "kind = \"vmm\"\nram_mib = {ram_mib}\nprefix_len = {CLIENT_NET_PREFIX}\n{extra}"
            ),
        },
        peer_mac = fmt_mac(&peer.log_mac),
        xdp = o.xdp_mode,
        vm_mac = fmt_mac(&VM_MAC),
        retx = o.retx_slots,
        hold = o.hold_slots,
        hb = o.heartbeat_ms,
        pt = o.peer_timeout_ms,
        nr = o.nack_retry_ms,
        ho = o.hold_output,
        ka = o.kernel_acks,
        sock = sock.display(),
        key = channel_key_file(tb)?.display(),
    );
    let _ = me;
    let path = tb.tmp_dir.join(format!("ftd-{host}.toml"));
    std::fs::write(&path, text)?;
    Ok(path)
}

/// TCP port of the join service in the generated configs.
pub const JOIN_PORT: u16 = 7480;

impl Appliance {
    /// Starts host `host`'s ftd again (after it was killed) with its config's role
    /// changed to backup; waits for its control socket.
    pub fn restart_as_backup(&mut self, tb: &Testbed, host: char) -> Result<()> {
        let cfg = if host == 'a' {
            &self.config_a
        } else {
            &self.config_b
        };
        let text = std::fs::read_to_string(cfg)?;
        let text = text
            .lines()
            .map(|l| {
                if l.starts_with("role = ") {
                    "role = \"backup\""
                } else {
                    l
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        std::fs::write(cfg, text)?;
        self.restart(tb, host, &[])
    }

    /// Starts host `host`'s ftd again (after it was killed or exited) with the config it
    /// has, as a service manager would (`systemctl restart ftd`), plus `args` (e.g.
    /// `--bootstrap`); waits for its control socket.
    pub fn restart(&mut self, tb: &Testbed, host: char, args: &[&str]) -> Result<()> {
        let (cfg, sock) = if host == 'a' {
            (&self.config_a, &self.sock_a)
        } else {
            (&self.config_b, &self.sock_b)
        };
        let _ = std::fs::remove_file(sock);
        let ns = if host == 'a' { &tb.a.ns } else { &tb.b.ns };
        let mut argv = vec!["run", "--config", cfg.to_str().unwrap()];
        argv.extend_from_slice(args);
        let bin = if host == 'a' {
            &self.bin_a
        } else {
            &self.bin_b
        };
        let g = tb.spawn(ns, bin, argv)?;
        wait_socket(sock, &g)?;
        if host == 'a' {
            self.a = Some(g);
        } else {
            self.b = Some(g);
        }
        Ok(())
    }

    /// Starts host `host`'s ftd again as a service manager would: its config and its
    /// own `ftd run` arguments, as at the first start.
    pub fn restart_configured(&mut self, tb: &Testbed, host: char) -> Result<()> {
        let args = if host == 'a' {
            self.args_a.clone()
        } else {
            self.args_b.clone()
        };
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.restart(tb, host, &args)
    }

    /// The role host `host`'s daemon reports, None if it does not answer (dead, or
    /// frozen).
    pub fn role(&self, host: char) -> Option<String> {
        self.status(host)
            .ok()
            .and_then(|s| s["role"].as_str().map(String::from))
    }

    pub fn start(tb: &Testbed, o: &ApplianceOptions) -> Result<Appliance> {
        let bin = match &o.ftd {
            Some(b) => b.clone(),
            None => ftd_bin()?,
        };
        let bin_b = o.ftd_b.clone().unwrap_or_else(|| bin.clone());
        let (role_a, role_b) = if o.solo {
            ("solo", "backup")
        } else if o.auto {
            ("auto", "auto")
        } else if o.swap_roles {
            ("backup", "primary")
        } else {
            ("primary", "backup")
        };
        let config_a = write_config(tb, 'a', role_a, o)?;
        let config_b = write_config(tb, 'b', role_b, o)?;
        let sock_a = tb.tmp_dir.join("ftd-a.sock");
        let sock_b = tb.tmp_dir.join("ftd-b.sock");
        let _ = std::fs::remove_file(&sock_a);
        let _ = std::fs::remove_file(&sock_b);
        // Backup first, so that it is listening before the primary sends the first entry.
        let mut b = None;
        if o.start_backup && !o.solo {
            let g = tb.spawn(
                &tb.b.ns,
                &bin_b,
                ["run", "--config", config_b.to_str().unwrap()],
            )?;
            wait_socket(&sock_b, &g)?;
            b = Some(g);
        }
        let args_a: Vec<String> = if o.auto {
            vec!["--bootstrap".into()]
        } else {
            Vec::new()
        };
        let mut argv = vec![
            "run".to_string(),
            "--config".into(),
            config_a.display().to_string(),
        ];
        argv.extend(args_a.iter().cloned());
        let a = if o.env_a.is_empty() {
            tb.spawn(&tb.a.ns, &bin, argv)?
        } else {
            let mut env_argv: Vec<String> =
                o.env_a.iter().map(|(k, v)| format!("{k}={v}")).collect();
            env_argv.push(bin.display().to_string());
            env_argv.extend(argv);
            tb.spawn(&tb.a.ns, "/usr/bin/env", env_argv)?
        };
        wait_socket(&sock_a, &a)?;
        Ok(Appliance {
            a: Some(a),
            b,
            sock_a,
            sock_b,
            config_a,
            config_b,
            args_a,
            args_b: Vec::new(),
            bin_a: bin,
            bin_b,
        })
    }

    pub fn status(&self, host: char) -> Result<Value> {
        query(if host == 'a' {
            &self.sock_a
        } else {
            &self.sock_b
        })
    }

    /// The daemon's Prometheus exposition (GET /metrics in its namespace), body only.
    pub fn metrics(&self, host: char) -> Result<String> {
        use std::io::Write;
        let ns = self.guard(host).ns().to_string();
        let resp = crate::netns::try_run_in_ns(&ns, || -> Result<String> {
            let mut s = std::net::TcpStream::connect("127.0.0.1:9477")?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: ftd\r\nConnection: close\r\n\r\n")?;
            let mut out = String::new();
            s.read_to_string(&mut out)?;
            Ok(out)
        })??;
        let (head, body) = resp
            .split_once("\r\n\r\n")
            .with_context(|| format!("host {host}: not an HTTP response: {resp:?}"))?;
        if !head.starts_with("HTTP/1.1 200") {
            bail!("host {host}: GET /metrics: {head}");
        }
        Ok(body.to_string())
    }

    /// A data-plane counter (`counters.<name>` without the `ft_` prefix) or drop reason.
    /// An error if the daemon does not answer or has no such counter (a misspelled name
    /// must fail the test, not read as 0).
    pub fn counter(&self, host: char, name: &str) -> Result<u64> {
        let s = self.status(host)?;
        s["counters"][name]
            .as_u64()
            .or_else(|| s["drops"][name].as_u64())
            .with_context(|| format!("host {host} has no counter {name:?}"))
    }

    /// Output frames held by the host's hold ring.
    pub fn held(&self, host: char) -> Result<u64> {
        self.status(host)?["held_frames"]
            .as_u64()
            .with_context(|| format!("host {host}: status has no held_frames"))
    }

    /// The primary run's session number (what its acks must carry).
    pub fn session(&self, host: char) -> Result<u64> {
        let s = self.status(host)?;
        let hex = s["session"]
            .as_str()
            .with_context(|| format!("host {host}: status has no session"))?;
        u64::from_str_radix(hex.trim_start_matches("0x"), 16)
            .with_context(|| format!("host {host}: bad session {hex:?}"))
    }

    pub fn guard(&self, host: char) -> &ChildGuard {
        if host == 'a' {
            self.a.as_ref().unwrap()
        } else {
            self.b.as_ref().unwrap()
        }
    }

    /// SIGSTOPs a daemon and waits until every one of its threads is stopped (signal
    /// delivery is asynchronous: a thread could otherwise still send an ack).
    pub fn pause(&self, host: char) -> Result<()> {
        let g = self.guard(host);
        g.pause()?;
        let pid = g.pid();
        let stopped = Self::wait_until(Duration::from_secs(5), || {
            let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
                return false;
            };
            tasks.filter_map(|t| t.ok()).all(|t| {
                std::fs::read_to_string(t.path().join("stat"))
                    .ok()
                    .and_then(|s| {
                        s.rsplit_once(')')
                            .map(|(_, r)| r.trim_start().starts_with('T'))
                    })
                    .unwrap_or(false)
            })
        });
        if !stopped {
            bail!("daemon {host} (pid {pid}) did not stop");
        }
        // Frames it had already handed to the kernel before stopping are still in flight.
        std::thread::sleep(Duration::from_millis(20));
        Ok(())
    }

    pub fn resume(&self, host: char) -> Result<()> {
        self.guard(host).resume()
    }

    /// The phase of the VMM that ftd runs on `host` ("recording", "replaying", "live",
    /// ...); None if the daemon does not answer or runs no VMM.
    pub fn vm_phase(&self, host: char) -> Option<String> {
        self.status(host)
            .ok()
            .and_then(|s| s["vm"]["phase"].as_str().map(String::from))
    }

    /// Waits (bounded) until host A's VMM records and host B's replays: the pair
    /// protects the VM.
    pub fn wait_replicating(&self, timeout: Duration) -> bool {
        Self::wait_until(timeout, || {
            self.vm_phase('a').as_deref() == Some("recording")
                && self.vm_phase('b').as_deref() == Some("replaying")
        })
    }

    /// Starts the pair ([`Appliance::start`]) and waits (bounded by `timeout`) until it
    /// replicates ([`Appliance::wait_replicating`]); an error that shows both nodes'
    /// status otherwise.
    pub fn start_replicating(
        tb: &Testbed,
        o: &ApplianceOptions,
        timeout: Duration,
    ) -> Result<Appliance> {
        let app = Appliance::start(tb, o)?;
        if !app.wait_replicating(timeout) {
            bail!(
                "not up:\nA: {:#}\nB: {:#}",
                app.status('a').unwrap_or_default(),
                app.status('b').unwrap_or_default()
            );
        }
        Ok(app)
    }

    /// `host` runs the VM alone after taking over: role solo, its VMM live.
    pub fn live_after_take_over(&self, host: char) -> bool {
        self.status(host)
            .is_ok_and(|s| s["role"] == "solo" && s["vm"]["phase"] == "live")
    }

    /// Polls `f` until it returns true or `timeout` passes.
    pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if f() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        f()
    }
}

fn wait_socket(sock: &Path, g: &ChildGuard) -> Result<()> {
    let end = Instant::now() + Duration::from_secs(15);
    while Instant::now() < end {
        if query(sock).is_ok() {
            return Ok(());
        }
        if !g.is_running() {
            bail!("ftd exited during start-up:\n{}", g.log_contents());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("ftd did not come up within 15 s:\n{}", g.log_contents())
}

/// The status of the daemon at `sock`, through ftd's own control client.
pub fn query(sock: &Path) -> Result<Value> {
    Ok(ftd::control::client::query(sock)?)
}
