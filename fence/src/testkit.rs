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

/// Ports [`free_port`] hands out: below Linux's ephemeral range (32768-60999 by
/// default), so the kernel never picks one of them for an outgoing connection or a
/// `bind(0)` between the moment a port is handed out and the moment a server binds it.
const PORTS: std::ops::Range<u32> = 20_000..32_000;

/// A TCP port for a test server, never the same twice in one process: two members of
/// one etcd cluster must not get the same port, which binding port 0 and letting go
/// cannot promise (the kernel may hand the released port out again at once; CI saw two
/// members of one cluster collide). Each process starts at its own offset in the range
/// (concurrent test processes rarely meet), and a port that cannot be bound on
/// 127.0.0.1 right now is skipped.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let span = PORTS.end - PORTS.start;
    // First call: an offset of this process's own (a race between two first calls only
    // picks one of two offsets: every later port still comes from the one counter).
    let _ = NEXT.compare_exchange(
        u32::MAX,
        std::process::id().wrapping_mul(7919) % span,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    for _ in 0..span {
        let port = (PORTS.start + NEXT.fetch_add(1, Ordering::Relaxed) % span) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no bindable TCP port left in {PORTS:?} on 127.0.0.1")
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

/// Server-side TLS of test members: each serves its client port over https with
/// `cert`/`key` (the certificate must name the member's IP); with `client_ca` the members
/// run with `--client-cert-auth` and accept only clients whose certificate it signed.
#[derive(Clone, Debug)]
pub struct MemberTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

/// One etcd member process.
pub struct EtcdMember {
    pub name: String,
    pub ip: IpAddr,
    pub client_port: u16,
    pub peer_port: u16,
    /// Plain-http port that answers `/health` (and `/metrics`): TLS members only.
    pub metrics_port: Option<u16>,
    tls: bool,
    child: Option<Child>,
    log: PathBuf,
    /// The command line that started it (program first), to start it again.
    argv: Vec<std::ffi::OsString>,
}

impl EtcdMember {
    /// `ip:port`, or `https://ip:port` for a TLS member.
    pub fn endpoint(&self) -> String {
        let a = SocketAddr::new(self.ip, self.client_port);
        if self.tls {
            format!("https://{a}")
        } else {
            a.to_string()
        }
    }

    /// Where the health probe asks: the metrics port of a TLS member, else the client port.
    fn probe_addr(&self) -> SocketAddr {
        SocketAddr::new(self.ip, self.metrics_port.unwrap_or(self.client_port))
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
        Self::start_with(n, dir, ready_timeout, at, None)
    }

    /// Starts `n` members on loopback whose client ports speak TLS only (https; peers
    /// talk plain http among themselves). Readiness is probed on each member's
    /// plain-http metrics port.
    pub fn start_tls(
        n: usize,
        dir: &Path,
        ready_timeout: Duration,
        tls: &MemberTls,
    ) -> Result<EtcdCluster, String> {
        Self::start_with(n, dir, ready_timeout, &Placement::loopback(), Some(tls))
    }

    fn start_with(
        n: usize,
        dir: &Path,
        ready_timeout: Duration,
        at: &Placement,
        tls: Option<&MemberTls>,
    ) -> Result<EtcdCluster, String> {
        let bin = etcd_binary()?;
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let ip = at.ip;
        let url = |port: u16| format!("http://{}", SocketAddr::new(ip, port));
        let client_url = |port: u16| match tls {
            Some(_) => format!("https://{}", SocketAddr::new(ip, port)),
            None => url(port),
        };
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
                    &client_url(*cp),
                    "--advertise-client-urls",
                    &client_url(*cp),
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
            let metrics_port = tls.map(|_| free_port());
            if let (Some(t), Some(mp)) = (tls, metrics_port) {
                cmd.arg("--cert-file")
                    .arg(&t.cert)
                    .arg("--key-file")
                    .arg(&t.key)
                    .args(["--listen-metrics-urls", &url(mp)]);
                if let Some(ca) = &t.client_ca {
                    cmd.arg("--client-cert-auth")
                        .arg("--trusted-ca-file")
                        .arg(ca);
                }
            }
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
                metrics_port,
                tls: tls.is_some(),
                child: Some(child),
                log,
                argv,
            });
        }
        let mut cluster = EtcdCluster { members };
        let start = Instant::now();
        for m in &mut cluster.members {
            loop {
                if (at.probe)(m.probe_addr()) {
                    break;
                }
                // A member that exited (a port taken meanwhile, a bad flag) never gets
                // healthy: say so at once.
                if let Some(Ok(Some(status))) = m.child.as_mut().map(|c| c.try_wait()) {
                    return Err(format!(
                        "etcd member {} exited at startup ({status}); its log:\n{}",
                        m.name,
                        m.log_tail()
                    ));
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

/// Certificates for TLS tests, made with the `openssl` command (EC P-256, valid 2 days):
/// a CA, a member certificate for 127.0.0.1/localhost and a client certificate signed by
/// it, and an unrelated CA with a client certificate of its own (to test refusals).
#[derive(Clone, Debug)]
pub struct TestPki {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    /// Signed by `ca`; common name `client_cn`.
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    pub client_cn: String,
    /// A CA that signed none of the above.
    pub other_ca: PathBuf,
    /// Signed by `other_ca`.
    pub stranger_cert: PathBuf,
    pub stranger_key: PathBuf,
}

const PKI_CNF: &str = "[req]
distinguished_name = dn
[dn]
[ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
[server]
basicConstraints = CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = serverAuth,clientAuth
subjectAltName = IP:127.0.0.1,DNS:localhost
[client]
basicConstraints = CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = clientAuth
";

/// Runs `openssl` with `args`; stderr in the error.
fn openssl(args: &[&str]) -> Result<(), String> {
    let out = Command::new("openssl")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run openssl (install it): {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "openssl {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

/// Makes the certificates of [`TestPki`] in `dir` (created if missing).
pub fn make_test_pki(dir: &Path, client_cn: &str) -> Result<TestPki, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let p = |name: &str| dir.join(name).display().to_string();
    let cnf = p("pki.cnf");
    std::fs::write(&cnf, PKI_CNF).map_err(|e| format!("cannot write {cnf}: {e}"))?;
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let ca = |name: &str| -> Result<(), String> {
        let (key, pem, subj) = (
            p(&format!("{name}.key")),
            p(&format!("{name}.pem")),
            format!("/CN=ft-fence test {name}"),
        );
        let mut a = vec![
            "req",
            "-x509",
            "-days",
            "2",
            "-config",
            &cnf,
            "-extensions",
            "ca",
        ];
        a.extend(ec);
        a.extend(["-keyout", &key, "-out", &pem, "-subj", &subj]);
        openssl(&a)
    };
    let leaf = |name: &str, cn: &str, ca: &str, ext: &str, serial: &str| -> Result<(), String> {
        let (key, csr, pem) = (
            p(&format!("{name}.key")),
            p(&format!("{name}.csr")),
            p(&format!("{name}.pem")),
        );
        let subj = format!("/CN={cn}");
        let mut a = vec!["req", "-new", "-config", &cnf];
        a.extend(ec);
        a.extend(["-keyout", &key, "-out", &csr, "-subj", &subj]);
        openssl(&a)?;
        let (ca_pem, ca_key) = (p(&format!("{ca}.pem")), p(&format!("{ca}.key")));
        openssl(&[
            "x509",
            "-req",
            "-days",
            "2",
            "-in",
            &csr,
            "-CA",
            &ca_pem,
            "-CAkey",
            &ca_key,
            "-set_serial",
            serial,
            "-extfile",
            &cnf,
            "-extensions",
            ext,
            "-out",
            &pem,
        ])
    };
    ca("ca")?;
    ca("other-ca")?;
    leaf("server", "localhost", "ca", "server", "2")?;
    leaf("client", client_cn, "ca", "client", "3")?;
    leaf("stranger", client_cn, "other-ca", "client", "4")?;
    let f = |name: &str| dir.join(name);
    Ok(TestPki {
        ca: f("ca.pem"),
        server_cert: f("server.pem"),
        server_key: f("server.key"),
        client_cert: f("client.pem"),
        client_key: f("client.key"),
        client_cn: client_cn.to_string(),
        other_ca: f("other-ca.pem"),
        stranger_cert: f("stranger.pem"),
        stranger_key: f("stranger.key"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_are_never_handed_out_twice() {
        let ports: Vec<u16> = (0..2000).map(|_| free_port()).collect();
        let distinct: std::collections::HashSet<u16> = ports.iter().copied().collect();
        assert_eq!(distinct.len(), ports.len(), "a port was handed out twice");
        assert!(ports.iter().all(|p| PORTS.contains(&(*p as u32))));
    }
}
