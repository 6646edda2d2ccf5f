//! Helpers for tests and benchmarks: throw-away etcd members on loopback. Every process
//! started here is killed when its guard is dropped (also on panic).
use std::net::TcpListener;
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

/// One etcd member process.
pub struct EtcdMember {
    pub name: String,
    pub client_port: u16,
    pub peer_port: u16,
    child: Option<Child>,
    log: PathBuf,
}

impl EtcdMember {
    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
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

/// An etcd cluster of `n` members on loopback, data in `dir`.
pub struct EtcdCluster {
    pub members: Vec<EtcdMember>,
}

impl EtcdCluster {
    /// Starts `n` members and waits (bounded by `ready_timeout`) until each answers on
    /// its client port's health endpoint.
    pub fn start(n: usize, dir: &Path, ready_timeout: Duration) -> Result<EtcdCluster, String> {
        let bin = etcd_binary()?;
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let ports: Vec<(u16, u16)> = (0..n).map(|_| (free_port(), free_port())).collect();
        let initial: Vec<String> = ports
            .iter()
            .enumerate()
            .map(|(i, (_, p))| format!("m{i}=http://127.0.0.1:{p}"))
            .collect();
        let initial = initial.join(",");
        let token = format!("ft-fence-{}-{}", std::process::id(), ports[0].0);
        let mut members = Vec::new();
        for (i, (cp, pp)) in ports.iter().enumerate() {
            let data = dir.join(format!("m{i}"));
            let log = dir.join(format!("m{i}.log"));
            let logf = std::fs::File::create(&log).map_err(|e| e.to_string())?;
            let logf2 = logf.try_clone().map_err(|e| e.to_string())?;
            let child = Command::new(&bin)
                .args(["--name", &format!("m{i}")])
                .arg("--data-dir")
                .arg(&data)
                .args([
                    "--listen-client-urls",
                    &format!("http://127.0.0.1:{cp}"),
                    "--advertise-client-urls",
                    &format!("http://127.0.0.1:{cp}"),
                    "--listen-peer-urls",
                    &format!("http://127.0.0.1:{pp}"),
                    "--initial-advertise-peer-urls",
                    &format!("http://127.0.0.1:{pp}"),
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
                .stderr(logf2)
                .spawn()
                .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
            members.push(EtcdMember {
                name: format!("m{i}"),
                client_port: *cp,
                peer_port: *pp,
                child: Some(child),
                log,
            });
        }
        let cluster = EtcdCluster { members };
        let start = Instant::now();
        for m in &cluster.members {
            loop {
                if health_ok(m.client_port) {
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

/// GET /health on the client port (plain HTTP/1.0, no client library needed).
fn health_ok(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect_timeout(
        &([127, 0, 0, 1], port).into(),
        Duration::from_millis(200),
    ) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(1000)));
    if s.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut buf = Vec::new();
    let _ = s.take(4096).read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).contains("\"health\":\"true\"")
}
