//! Helpers for tests and benchmarks: throw-away etcd members on loopback. Every process
//! started here is killed when its guard is dropped (also on panic).
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where to find etcd: `$FT_ETCD_BIN`, else `/usr/bin/etcd`, else `etcd` on `$PATH`.
pub fn etcd_binary() -> Result<PathBuf, String> {
    if let Ok(p) = std::env::var("FT_ETCD_BIN") {
        let p = PathBuf::from(p);
        if p.exists() {
            return Ok(p);
        }
        return Err(format!(
            "etcd binary not found at $FT_ETCD_BIN={}: fix the variable or install the Debian package etcd-server (scripts/bootstrap.sh does) — the etcd backend tests cannot run without it",
            p.display()
        ));
    }
    let std_path = PathBuf::from("/usr/bin/etcd");
    if std_path.exists() {
        return Ok(std_path);
    }
    if let Some(paths) = std::env::var_os("PATH") {
        for d in std::env::split_paths(&paths) {
            let p = d.join("etcd");
            if p.exists() {
                return Ok(p);
            }
        }
    }
    Err("etcd binary not found (looked at $FT_ETCD_BIN, /usr/bin/etcd and $PATH): install the Debian package etcd-server (scripts/bootstrap.sh does) — the etcd backend tests cannot run without it".to_string())
}

/// A free TCP port on 127.0.0.1 (bound then released; fine for tests).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("cannot bind an ephemeral port on 127.0.0.1")
}

/// Where the members run: their IP address, a command prefix that places them (for
/// example `ip netns exec <ns>`), and how to probe a member's health endpoint from
/// there (the probe runs in the caller's network namespace unless it moves itself).
pub struct Placement<'a> {
    pub ip: IpAddr,
    pub command_prefix: Vec<String>,
    pub probe: &'a (dyn Fn(SocketAddr) -> bool + Sync),
}

impl Placement<'static> {
    /// On 127.0.0.1 in this namespace.
    pub fn loopback() -> Placement<'static> {
        Placement {
            ip: IpAddr::from([127, 0, 0, 1]),
            command_prefix: Vec::new(),
            probe: &health_ok,
        }
    }
}

/// One etcd member process.
pub struct EtcdMember {
    pub name: String,
    pub ip: IpAddr,
    pub client_port: u16,
    pub peer_port: u16,
    child: Option<Child>,
    log: PathBuf,
    /// The command line that started it (program first), to start it again.
    argv: Vec<std::ffi::OsString>,
}

impl EtcdMember {
    pub fn endpoint(&self) -> String {
        SocketAddr::new(self.ip, self.client_port).to_string()
    }

    pub fn client_addr(&self) -> SocketAddr {
        SocketAddr::new(self.ip, self.client_port)
    }

    /// Kills the member (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Starts a killed member again with the same command line and data directory (it
    /// rejoins the cluster from its write-ahead log); a running member is left alone.
    pub fn restart(&mut self) -> Result<(), String> {
        if self.child.is_some() {
            return Ok(());
        }
        let logf = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.log)
            .map_err(|e| format!("cannot open {}: {e}", self.log.display()))?;
        let logf2 = logf.try_clone().map_err(|e| e.to_string())?;
        let (prog, args) = self.argv.split_first().ok_or("no command line recorded")?;
        let child = Command::new(prog)
            .args(args)
            .stdin(Stdio::null())
            .stdout(logf)
            .stderr(logf2)
            .spawn()
            .map_err(|e| format!("cannot restart etcd member {}: {e}", self.name))?;
        self.child = Some(child);
        Ok(())
    }

    /// Last lines of the member's log (for failure messages).
    pub fn log_tail(&self) -> String {
        let s = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for EtcdMember {
    fn drop(&mut self) {
        self.kill();
    }
}

/// An etcd cluster of `n` members, data in `dir`.
pub struct EtcdCluster {
    pub members: Vec<EtcdMember>,
}

impl EtcdCluster {
    /// Starts `n` members on loopback and waits (bounded by `ready_timeout`) until each
    /// answers on its client port's health endpoint.
    pub fn start(n: usize, dir: &Path, ready_timeout: Duration) -> Result<EtcdCluster, String> {
        Self::start_placed(n, dir, ready_timeout, &Placement::loopback())
    }

    /// Starts `n` members where `at` says (ports picked on this namespace's loopback,
    /// which is fine for a fresh namespace).
    pub fn start_placed(
        n: usize,
        dir: &Path,
        ready_timeout: Duration,
        at: &Placement,
    ) -> Result<EtcdCluster, String> {
        let bin = etcd_binary()?;
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let ip = at.ip;
        let url = |port: u16| format!("http://{}", SocketAddr::new(ip, port));
        let ports: Vec<(u16, u16)> = (0..n).map(|_| (free_port(), free_port())).collect();
        let initial: Vec<String> = ports
            .iter()
            .enumerate()
            .map(|(i, (_, p))| format!("m{i}={}", url(*p)))
            .collect();
        let initial = initial.join(",");
        let token = format!("ft-fence-{}-{}", std::process::id(), ports[0].0);
        let mut members = Vec::new();
        for (i, (cp, pp)) in ports.iter().enumerate() {
            let data = dir.join(format!("m{i}"));
            let log = dir.join(format!("m{i}.log"));
            let logf = std::fs::File::create(&log).map_err(|e| e.to_string())?;
            let logf2 = logf.try_clone().map_err(|e| e.to_string())?;
            let mut cmd = match at.command_prefix.split_first() {
                Some((p, rest)) => {
                    let mut c = Command::new(p);
                    c.args(rest).arg(&bin);
                    c
                }
                None => Command::new(&bin),
            };
            cmd.args(["--name", &format!("m{i}")])
                .arg("--data-dir")
                .arg(&data)
                .args([
                    "--listen-client-urls",
                    &url(*cp),
                    "--advertise-client-urls",
                    &url(*cp),
                    "--listen-peer-urls",
                    &url(*pp),
                    "--initial-advertise-peer-urls",
                    &url(*pp),
                    "--initial-cluster",
                    &initial,
                    "--initial-cluster-state",
                    "new",
                    "--initial-cluster-token",
                    &token,
                    "--heartbeat-interval",
                    "50",
                    "--election-timeout",
                    "500",
                    "--logger",
                    "zap",
                    "--log-level",
                    "warn",
                ])
                .stdin(Stdio::null())
                .stdout(logf)
                .stderr(logf2);
            let argv = std::iter::once(cmd.get_program().to_owned())
                .chain(cmd.get_args().map(|a| a.to_owned()))
                .collect();
            let child = cmd
                .spawn()
                .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
            members.push(EtcdMember {
                name: format!("m{i}"),
                ip,
                client_port: *cp,
                peer_port: *pp,
                child: Some(child),
                log,
                argv,
            });
        }
        let cluster = EtcdCluster { members };
        let start = Instant::now();
        for m in &cluster.members {
            loop {
                if (at.probe)(m.client_addr()) {
                    break;
                }
                if start.elapsed() > ready_timeout {
                    return Err(format!(
                        "etcd member {} not healthy after {:?}; its log:\n{}",
                        m.name,
                        ready_timeout,
                        m.log_tail()
                    ));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Ok(cluster)
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| m.endpoint()).collect()
    }
}

/// One HTTP/1.0 exchange with `addr` (plain text; no client library needed). None when
/// the member does not answer within a second.
fn http(addr: SocketAddr, request: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()?;
    s.set_read_timeout(Some(Duration::from_millis(1000))).ok()?;
    s.write_all(request.as_bytes()).ok()?;
    let mut buf = Vec::new();
    let _ = s.take(16384).read_to_end(&mut buf);
    Some(String::from_utf8_lossy(&buf).into_owned())
}

/// GET /health on a member's client port.
pub fn health_ok(addr: SocketAddr) -> bool {
    http(
        addr,
        &format!("GET /health HTTP/1.0\r\nHost: {addr}\r\n\r\n"),
    )
    .is_some_and(|r| r.contains("\"health\":\"true\""))
}

/// Whether the member at `addr` is the cluster's leader (its maintenance status through
/// the JSON gateway: `header.member_id == leader`). None when it does not answer.
pub fn is_leader(addr: SocketAddr) -> Option<bool> {
    let body = "{}";
    let r = http(
        addr,
        &format!(
            "POST /v3/maintenance/status HTTP/1.0\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ),
    )?;
    let json = &r[r.find("\r\n\r\n")? + 4..];
    let field = |key: &str| -> Option<String> {
        let i = json.find(&format!("\"{key}\":\""))? + key.len() + 4;
        Some(json[i..i + json[i..].find('"')?].to_string())
    };
    Some(field("member_id")? == field("leader")?)
}
