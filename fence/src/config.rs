//! `[fence]` configuration.
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::arbiter::{Arbiter, StaticArbiter, validate_name};
use crate::embedded::EmbeddedArbiter;
use crate::etcd::{DEFAULT_PREFIX, EtcdArbiter, EtcdTls};
use crate::keeper::LeaseTiming;

/// Which arbiter decides who may go live.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    /// One `ft-arbiter` process (`arbiters` = its single `host:port`). Not redundant.
    Embedded,
    /// An etcd cluster (`arbiters` = member client endpoints; use 3 or 5 members).
    Etcd,
    /// No arbiter: static, never-expiring lease. Single-host demos ONLY: two hosts with
    /// this setting can both go live.
    None,
}

/// The `[fence]` table. Every field has a default except `backend`, which must be set
/// explicitly (validation fails otherwise), and `vm`/`node`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FenceConfig {
    pub backend: Option<Backend>,
    /// `host:port` of the embedded arbiter (exactly one), or etcd client endpoints.
    pub arbiters: Vec<String>,
    /// Lease length granted by the arbiter.
    pub lease_ms: u64,
    /// How often the owner renews. Must be below half the lease.
    pub renew_interval_ms: u64,
    /// Bound on one arbiter request (test-and-set, renew, ...).
    pub request_timeout_ms: u64,
    /// Subtracted from the lease when computing the local kernel deadline; covers the
    /// rate difference between this node's and the arbiter's clocks over one lease.
    pub drift_margin_ms: u64,
    /// Name of the protected VM (the arbitrated resource).
    pub vm: String,
    /// This host's name, unique among the nodes protecting `vm`.
    pub node: String,
    /// The peer host's name (its `node`): the backup a primary pairs at the arbiter, so
    /// that it may take over at once when the primary dies (see `Arbiter::pair`).
    pub peer: String,
    /// etcd key prefix.
    pub etcd_prefix: String,
    /// Embedded arbiter: a file holding the shared secret (at least 16 bytes; the
    /// arbiter's `--secret-file`). Requests and replies then carry its MAC, and the
    /// arbiter refuses any other client. Required for the embedded backend unless
    /// `insecure = true`.
    pub secret_file: String,
    /// Embedded arbiter only: run without `secret_file` (anyone who reaches the arbiter
    /// can then take or refuse the VM's lease). Only for an isolated test network; the
    /// arbiter must be started with `--insecure` as well.
    pub insecure: bool,
    /// etcd only: PEM file of the CA that signed the members' certificates. Set: the
    /// members are reached over TLS (`https://host:port` or `host:port` endpoints) and
    /// their certificates must name the endpoint's host. Empty: plain http.
    pub etcd_ca_file: String,
    /// etcd only, with `etcd_ca_file`: this node's client certificate (PEM), for members
    /// started with `--client-cert-auth` (mutual TLS). Set together with `etcd_key_file`.
    pub etcd_cert_file: String,
    /// The private key (PEM) of `etcd_cert_file`.
    pub etcd_key_file: String,
    /// etcd only: the etcd user this node authenticates as (etcd authentication); its
    /// role must grant readwrite on `etcd_prefix`. Needs `etcd_password_file` and TLS.
    pub etcd_user: String,
    /// A file holding the password of `etcd_user` (trailing newline dropped). The
    /// password is never written in the configuration itself.
    pub etcd_password_file: String,
}

impl Default for FenceConfig {
    fn default() -> Self {
        Self {
            backend: None,
            arbiters: Vec::new(),
            lease_ms: 3000,
            renew_interval_ms: 1000,
            request_timeout_ms: 500,
            drift_margin_ms: 100,
            vm: String::new(),
            node: String::new(),
            peer: String::new(),
            etcd_prefix: DEFAULT_PREFIX.to_string(),
            secret_file: String::new(),
            insecure: false,
            etcd_ca_file: String::new(),
            etcd_cert_file: String::new(),
            etcd_key_file: String::new(),
            etcd_user: String::new(),
            etcd_password_file: String::new(),
        }
    }
}

/// A `[fence]` setting that cannot work, with what to change.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("invalid [fence] configuration: {0}")]
pub struct ConfigError(pub String);

fn bad(msg: impl Into<String>) -> Result<(), ConfigError> {
    Err(ConfigError(msg.into()))
}

/// A TLS or authentication setting of the etcd backend that cannot work.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum EtcdAccessError {
    #[error(
        "fence.{key} is set but fence.backend is not \"etcd\": remove it (the embedded arbiter authenticates with fence.secret_file)"
    )]
    NotEtcd { key: &'static str },
    #[error(
        "fence.etcd_cert_file and fence.etcd_key_file go together (a client certificate and its private key): set both or neither"
    )]
    HalfIdentity,
    #[error(
        "fence.etcd_cert_file needs fence.etcd_ca_file: a client certificate is only sent over TLS; set the CA that signed the members' certificates"
    )]
    IdentityWithoutCa,
    #[error(
        "fence.etcd_user and fence.etcd_password_file go together (the password is read from the file, never written in the configuration): set both or neither"
    )]
    HalfUser,
    #[error(
        "fence.etcd_user without TLS would send the password in clear text: set fence.etcd_ca_file (and https endpoints)"
    )]
    PasswordInClear,
    #[error("fence.{key} = {path:?} cannot be read ({cause}): fix the path or its permissions")]
    Unreadable {
        key: &'static str,
        path: String,
        cause: String,
    },
    #[error(
        "fence.{key} = {path:?} holds no PEM {what} (a \"-----BEGIN {what}-----\" block): check that the files are not swapped"
    )]
    NotPem {
        key: &'static str,
        path: String,
        what: &'static str,
    },
    #[error("fence.etcd_password_file = {path:?} is empty: write the etcd user's password in it")]
    EmptyPassword { path: String },
    #[error(
        "fence.arbiters entry {endpoint:?} is http:// but fence.etcd_ca_file turns TLS on: write it as \"https://host:port\" (or \"host:port\")"
    )]
    HttpWithTls { endpoint: String },
    #[error(
        "fence.arbiters entry {endpoint:?} is https:// but fence.etcd_ca_file is empty: set the CA file that signed the members' certificates"
    )]
    HttpsWithoutCa { endpoint: String },
}

impl From<EtcdAccessError> for ConfigError {
    fn from(e: EtcdAccessError) -> Self {
        ConfigError(e.to_string())
    }
}

/// The etcd credentials read from their files.
struct EtcdAccess {
    tls: Option<EtcdTls>,
    user: Option<(String, String)>,
}

fn read_file(key: &'static str, path: &str) -> Result<Vec<u8>, EtcdAccessError> {
    std::fs::read(path).map_err(|e| EtcdAccessError::Unreadable {
        key,
        path: path.to_string(),
        cause: e.to_string(),
    })
}

fn read_pem(key: &'static str, path: &str, what: &'static str) -> Result<Vec<u8>, EtcdAccessError> {
    let b = read_file(key, path)?;
    // "PRIVATE KEY" also matches "EC PRIVATE KEY" and "RSA PRIVATE KEY".
    let marker = format!("{what}-----");
    if !String::from_utf8_lossy(&b).contains(&marker) {
        return Err(EtcdAccessError::NotPem {
            key,
            path: path.to_string(),
            what,
        });
    }
    Ok(b)
}

impl FenceConfig {
    /// Parses a TOML document holding just the `[fence]` fields (no table header).
    pub fn from_toml_str(s: &str) -> Result<Self, ConfigError> {
        let c: FenceConfig = toml::from_str(s).map_err(|e| ConfigError(e.to_string()))?;
        c.validate()?;
        Ok(c)
    }

    pub fn lease(&self) -> Duration {
        Duration::from_millis(self.lease_ms)
    }
    pub fn renew_interval(&self) -> Duration {
        Duration::from_millis(self.renew_interval_ms)
    }
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }
    pub fn drift_margin(&self) -> Duration {
        Duration::from_millis(self.drift_margin_ms)
    }

    /// Timing for [`crate::LeaseKeeper`].
    pub fn timing(&self) -> LeaseTiming {
        LeaseTiming {
            renew_interval: self.renew_interval(),
            request_timeout: self.request_timeout(),
            drift_margin: self.drift_margin(),
        }
    }

    /// Checks every rule; the message says which key to change and why.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let Some(backend) = self.backend else {
            return bad(
                "fence.backend is not set: choose \"embedded\" (one ft-arbiter), \"etcd\" (redundant arbiter, recommended) or \"none\" (static lease, single-host demo only)",
            );
        };
        if let Err(e) = validate_name("fence.vm", &self.vm) {
            return bad(e.to_string());
        }
        if let Err(e) = validate_name("fence.node", &self.node) {
            return bad(e.to_string());
        }
        if backend != Backend::None {
            if let Err(e) = validate_name("fence.peer", &self.peer) {
                return bad(format!(
                    "{e}: set fence.peer to the other host's node name (the primary pairs it at the arbiter so that it can take over at once)"
                ));
            }
            if self.peer == self.node {
                return bad("fence.peer must name the other host, not this one (fence.node)");
            }
        }
        self.etcd_access()?;
        match backend {
            Backend::Embedded => {
                if self.arbiters.len() != 1 {
                    return bad(format!(
                        "fence.arbiters must hold exactly one \"host:port\" for backend \"embedded\" (got {}); for a redundant arbiter use backend = \"etcd\" with 3 members",
                        self.arbiters.len()
                    ));
                }
                let a = &self.arbiters[0];
                let port_ok = a
                    .rsplit_once(':')
                    .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0));
                if !port_ok {
                    return bad(format!(
                        "fence.arbiters entry {a:?} is not \"host:port\" (e.g. \"10.0.0.2:7700\")"
                    ));
                }
            }
            Backend::Etcd => {
                if self.arbiters.is_empty() {
                    return bad(
                        "fence.arbiters must list the etcd client endpoints (e.g. [\"10.0.0.3:2379\", \"10.0.0.4:2379\", \"10.0.0.5:2379\"])",
                    );
                }
                if let Some(a) = self
                    .arbiters
                    .iter()
                    .find(|a| a.is_empty() || a.contains(' '))
                {
                    return bad(format!(
                        "fence.arbiters entry {a:?} is not an etcd endpoint"
                    ));
                }
                if !self.etcd_prefix.starts_with('/') || !self.etcd_prefix.ends_with('/') {
                    return bad(format!(
                        "fence.etcd_prefix {:?} must start and end with '/'",
                        self.etcd_prefix
                    ));
                }
            }
            Backend::None => {
                if !self.arbiters.is_empty() {
                    return bad(
                        "fence.arbiters is set but backend = \"none\" ignores it; remove the arbiters or choose backend \"embedded\"/\"etcd\"",
                    );
                }
                return Ok(());
            }
        }
        if !(100..=600_000).contains(&self.lease_ms) {
            return bad(format!(
                "fence.lease_ms = {} is outside 100..=600000",
                self.lease_ms
            ));
        }
        if self.renew_interval_ms == 0 || self.renew_interval_ms * 2 >= self.lease_ms {
            return bad(format!(
                "fence.renew_interval_ms = {} must be above 0 and below half of fence.lease_ms ({}), so one lost renewal does not lose the lease",
                self.renew_interval_ms, self.lease_ms
            ));
        }
        if self.request_timeout_ms == 0 || self.request_timeout_ms * 2 >= self.lease_ms {
            return bad(format!(
                "fence.request_timeout_ms = {} must be above 0 and below half of fence.lease_ms ({})",
                self.request_timeout_ms, self.lease_ms
            ));
        }
        if self.drift_margin_ms == 0 {
            return bad(
                "fence.drift_margin_ms must be above 0 (clocks drift; e.g. 100 for a 3000 ms lease)",
            );
        }
        if self.backend == Some(Backend::Embedded) {
            match (self.secret_file.is_empty(), self.insecure) {
                (true, false) => {
                    return bad(
                        "fence.backend = \"embedded\" without fence.secret_file: anyone who reaches the arbiter could take or refuse this VM's lease. Write a secret once (head -c 32 /dev/urandom | base64 > /etc/ft/arbiter.secret), give the same file to ft-arbiter --secret-file and set fence.secret_file to it on both nodes (on an isolated test network only: insecure = true)",
                    );
                }
                (false, true) => {
                    return bad(
                        "fence.insecure = true and fence.secret_file are both set: remove insecure (the secret is used)",
                    );
                }
                _ => {}
            }
        } else if self.insecure {
            return bad(
                "fence.insecure is for the embedded arbiter (etcd is secured with fence.etcd_ca_file, etcd_cert_file/etcd_key_file and etcd_user/etcd_password_file)",
            );
        }
        if !self.secret_file.is_empty() {
            if self.backend != Some(Backend::Embedded) {
                return bad(
                    "fence.secret_file is for the embedded arbiter; for etcd set fence.etcd_ca_file, etcd_cert_file/etcd_key_file (TLS) and etcd_user/etcd_password_file (etcd authentication)",
                );
            }
            self.secret()?;
        }
        let need = self.renew_interval_ms + self.request_timeout_ms + self.drift_margin_ms;
        if need >= self.lease_ms {
            return bad(format!(
                "fence.renew_interval_ms + request_timeout_ms + drift_margin_ms = {need} must be below fence.lease_ms ({}): otherwise the local lease lapses before the next renewal can complete",
                self.lease_ms
            ));
        }
        Ok(())
    }

    /// The shared secret from `secret_file` (trailing newline dropped), if set.
    pub fn secret(&self) -> Result<Option<Vec<u8>>, ConfigError> {
        if self.secret_file.is_empty() {
            return Ok(None);
        }
        read_secret(std::path::Path::new(&self.secret_file))
            .map(Some)
            .map_err(|e| ConfigError(format!("fence.secret_file: {e}")))
    }

    /// The etcd TLS and authentication settings, checked and read from their files
    /// (all empty: none). Any of them with another backend is an error.
    fn etcd_access(&self) -> Result<EtcdAccess, EtcdAccessError> {
        let set = [
            ("etcd_ca_file", &self.etcd_ca_file),
            ("etcd_cert_file", &self.etcd_cert_file),
            ("etcd_key_file", &self.etcd_key_file),
            ("etcd_user", &self.etcd_user),
            ("etcd_password_file", &self.etcd_password_file),
        ];
        if self.backend != Some(Backend::Etcd) {
            return match set.iter().find(|(_, v)| !v.is_empty()) {
                Some((key, _)) => Err(EtcdAccessError::NotEtcd { key }),
                None => Ok(EtcdAccess {
                    tls: None,
                    user: None,
                }),
            };
        }
        let tls_on = !self.etcd_ca_file.is_empty();
        if self.etcd_cert_file.is_empty() != self.etcd_key_file.is_empty() {
            return Err(EtcdAccessError::HalfIdentity);
        }
        if !self.etcd_cert_file.is_empty() && !tls_on {
            return Err(EtcdAccessError::IdentityWithoutCa);
        }
        if self.etcd_user.is_empty() != self.etcd_password_file.is_empty() {
            return Err(EtcdAccessError::HalfUser);
        }
        if !self.etcd_user.is_empty() && !tls_on {
            return Err(EtcdAccessError::PasswordInClear);
        }
        for a in &self.arbiters {
            let lower = a.to_ascii_lowercase();
            if tls_on && lower.starts_with("http://") {
                return Err(EtcdAccessError::HttpWithTls {
                    endpoint: a.clone(),
                });
            }
            if !tls_on && lower.starts_with("https://") {
                return Err(EtcdAccessError::HttpsWithoutCa {
                    endpoint: a.clone(),
                });
            }
        }
        let tls = if tls_on {
            let ca = read_pem("etcd_ca_file", &self.etcd_ca_file, "CERTIFICATE")?;
            let t = EtcdTls::new(ca);
            Some(if self.etcd_cert_file.is_empty() {
                t
            } else {
                let cert = read_pem("etcd_cert_file", &self.etcd_cert_file, "CERTIFICATE")?;
                let key = read_pem("etcd_key_file", &self.etcd_key_file, "PRIVATE KEY")?;
                t.with_identity(cert, key)
            })
        } else {
            None
        };
        let user = if self.etcd_user.is_empty() {
            None
        } else {
            let raw = read_file("etcd_password_file", &self.etcd_password_file)?;
            let text = String::from_utf8(raw).map_err(|_| EtcdAccessError::Unreadable {
                key: "etcd_password_file",
                path: self.etcd_password_file.clone(),
                cause: "not UTF-8 text".into(),
            })?;
            let pw = text.trim_end_matches(['\n', '\r']);
            if pw.is_empty() {
                return Err(EtcdAccessError::EmptyPassword {
                    path: self.etcd_password_file.clone(),
                });
            }
            Some((self.etcd_user.clone(), pw.to_string()))
        };
        Ok(EtcdAccess { tls, user })
    }

    /// Builds the configured arbiter client (validates first). Connects lazily.
    pub fn build_arbiter(&self) -> Result<Arc<dyn Arbiter>, ConfigError> {
        self.validate()?;
        Ok(match self.backend.expect("validated") {
            Backend::Embedded => {
                let a = EmbeddedArbiter::new(
                    self.arbiters[0].clone(),
                    self.lease(),
                    self.request_timeout(),
                );
                Arc::new(match self.secret()? {
                    Some(k) => a.with_secret(k),
                    None => a,
                })
            }
            Backend::Etcd => {
                let mut a = EtcdArbiter::new(
                    self.arbiters.clone(),
                    self.etcd_prefix.clone(),
                    self.lease(),
                    self.request_timeout(),
                );
                let access = self.etcd_access()?;
                if let Some(t) = access.tls {
                    a = a.with_tls(t);
                }
                if let Some((u, p)) = access.user {
                    a = a.with_user(u, p);
                }
                Arc::new(a)
            }
            Backend::None => Arc::new(StaticArbiter::new()),
        })
    }
}

/// Reads a shared-secret file: at least 16 bytes once a trailing newline is dropped.
pub fn read_secret(path: &std::path::Path) -> Result<Vec<u8>, String> {
    let mut b = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    while b.last().is_some_and(|c| *c == b'\n' || *c == b'\r') {
        b.pop();
    }
    if b.len() < 16 {
        return Err(format!(
            "{} holds {} bytes: a shared secret needs at least 16 (e.g. head -c 32 /dev/urandom | base64 > {})",
            path.display(),
            b.len(),
            path.display()
        ));
    }
    Ok(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> FenceConfig {
        FenceConfig {
            backend: Some(Backend::Embedded),
            arbiters: vec!["10.0.0.2:7700".into()],
            vm: "vm1".into(),
            node: "host-a".into(),
            peer: "host-b".into(),
            insecure: true,
            ..Default::default()
        }
    }

    fn err(c: &FenceConfig) -> String {
        c.validate().unwrap_err().to_string()
    }

    #[test]
    fn secret_file_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        let short = dir.path().join("short");
        std::fs::write(&short, "too short\n").unwrap();
        let good = dir.path().join("good");
        std::fs::write(&good, "a shared secret of enough bytes\n").unwrap();
        let mut c = base();
        c.insecure = false;
        // The embedded arbiter needs a secret, or an explicit insecure = true.
        let e = err(&c);
        assert!(
            e.contains("without fence.secret_file") && e.contains("insecure = true"),
            "{e}"
        );
        c.secret_file = dir.path().join("missing").display().to_string();
        assert!(err(&c).contains("cannot read"), "{}", err(&c));
        c.secret_file = short.display().to_string();
        assert!(err(&c).contains("at least 16"), "{}", err(&c));
        c.secret_file = good.display().to_string();
        assert!(c.validate().is_ok());
        assert_eq!(
            c.secret().unwrap().unwrap(),
            b"a shared secret of enough bytes"
        );
        c.insecure = true;
        assert!(err(&c).contains("both set"), "{}", err(&c));
        c.insecure = false;
        c.backend = Some(Backend::Etcd);
        c.arbiters = vec!["10.0.0.2:2379".into()];
        assert!(err(&c).contains("for the embedded arbiter"), "{}", err(&c));
        c.secret_file.clear();
        c.insecure = true;
        assert!(
            err(&c).contains("fence.insecure is for the embedded"),
            "{}",
            err(&c)
        );
    }

    /// An etcd config with every security option set to files in `dir`.
    fn secured(dir: &std::path::Path) -> FenceConfig {
        let w = |name: &str, text: &str| {
            let p = dir.join(name);
            std::fs::write(&p, text).unwrap();
            p.display().to_string()
        };
        FenceConfig {
            backend: Some(Backend::Etcd),
            arbiters: vec!["https://10.0.0.3:2379".into(), "10.0.0.4:2379".into()],
            etcd_ca_file: w(
                "ca.pem",
                "-----BEGIN CERTIFICATE-----\nx\n-----END CERTIFICATE-----\n",
            ),
            etcd_cert_file: w(
                "c.pem",
                "-----BEGIN CERTIFICATE-----\ny\n-----END CERTIFICATE-----\n",
            ),
            etcd_key_file: w(
                "c.key",
                "-----BEGIN PRIVATE KEY-----\nz\n-----END PRIVATE KEY-----\n",
            ),
            etcd_user: "ft-node".into(),
            etcd_password_file: w("pw", "s3cret\n"),
            insecure: false,
            ..base()
        }
    }

    #[test]
    fn etcd_tls_and_auth_options_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let good = secured(dir.path());
        good.validate().unwrap();
        let d = good.build_arbiter().unwrap().describe();
        assert!(
            d.contains("TLS with a client certificate") && d.contains("etcd user ft-node"),
            "{d}"
        );
        let e = |f: &dyn Fn(&mut FenceConfig)| {
            let mut c = good.clone();
            f(&mut c);
            err(&c)
        };
        let has = |m: String, what: &str| assert!(m.contains(what), "{m}");
        has(e(&|c| c.etcd_key_file.clear()), "set both or neither");
        has(e(&|c| c.etcd_cert_file.clear()), "set both or neither");
        has(
            e(&|c| c.etcd_password_file.clear()),
            "fence.etcd_user and fence.etcd_password_file go together",
        );
        has(e(&|c| c.etcd_user.clear()), "go together");
        // No CA: no TLS, so neither a client certificate nor a password may be sent.
        has(
            e(&|c| {
                c.etcd_ca_file.clear();
                c.arbiters = vec!["10.0.0.3:2379".into()];
            }),
            "needs fence.etcd_ca_file",
        );
        has(
            e(&|c| {
                c.etcd_ca_file.clear();
                c.etcd_cert_file.clear();
                c.etcd_key_file.clear();
                c.arbiters = vec!["10.0.0.3:2379".into()];
            }),
            "clear text",
        );
        has(
            e(&|c| {
                c.etcd_ca_file.clear();
                c.etcd_cert_file.clear();
                c.etcd_key_file.clear();
                c.etcd_user.clear();
                c.etcd_password_file.clear();
            }),
            "is https:// but fence.etcd_ca_file is empty",
        );
        has(
            e(&|c| c.arbiters.push("http://10.0.0.5:2379".into())),
            "is http:// but",
        );
        has(
            e(&|c| c.etcd_ca_file = "/nonexistent/ca.pem".into()),
            "fence.etcd_ca_file = \"/nonexistent/ca.pem\" cannot be read",
        );
        has(
            e(&|c| std::mem::swap(&mut c.etcd_cert_file, &mut c.etcd_key_file)),
            "holds no PEM CERTIFICATE",
        );
        let empty = dir.path().join("empty");
        std::fs::write(&empty, "\n").unwrap();
        has(
            e(&|c| c.etcd_password_file = empty.display().to_string()),
            "is empty",
        );
        // Only with backend = "etcd".
        let mut c = base();
        c.etcd_ca_file = good.etcd_ca_file.clone();
        has(
            err(&c),
            "fence.etcd_ca_file is set but fence.backend is not \"etcd\"",
        );
        c.backend = Some(Backend::None);
        c.arbiters.clear();
        c.etcd_ca_file.clear();
        c.etcd_user = "u".into();
        has(err(&c), "fence.etcd_user is set but");
    }

    #[test]
    fn etcd_password_comes_from_its_file_without_the_newline() {
        let dir = tempfile::tempdir().unwrap();
        let c = secured(dir.path());
        let a = c.etcd_access().unwrap();
        assert_eq!(a.user, Some(("ft-node".to_string(), "s3cret".to_string())));
        assert!(a.tls.is_some());
        let t = FenceConfig::from_toml_str(&format!(
            "backend = \"etcd\"\narbiters = [\"https://10.0.0.3:2379\"]\nvm = \"v\"\nnode = \"a\"\npeer = \"b\"\netcd_ca_file = {:?}\netcd_user = \"ft-node\"\netcd_password_file = {:?}",
            c.etcd_ca_file, c.etcd_password_file
        ))
        .unwrap();
        assert_eq!(t.etcd_user, "ft-node");
    }

    #[test]
    fn defaults_need_explicit_backend() {
        let e = err(&FenceConfig::default());
        assert!(e.contains("fence.backend is not set"), "{e}");
        assert!(base().validate().is_ok());
    }

    #[test]
    fn a_real_arbiter_needs_the_peer_to_pair() {
        let mut c = base();
        c.peer = String::new();
        assert!(err(&c).contains("fence.peer"), "{}", err(&c));
        c.peer = "host-a".into();
        assert!(err(&c).contains("other host"), "{}", err(&c));
        c.backend = Some(Backend::None);
        c.arbiters.clear();
        c.peer = String::new();
        c.validate().unwrap();
    }

    #[test]
    fn parses_toml_and_rejects_unknown_keys() {
        let c = FenceConfig::from_toml_str(
            r#"
            backend = "etcd"
            arbiters = ["10.0.0.3:2379", "10.0.0.4:2379", "10.0.0.5:2379"]
            lease_ms = 4000
            renew_interval_ms = 1000
            request_timeout_ms = 800
            drift_margin_ms = 200
            vm = "web"
            node = "host-b"
            peer = "host-a"
            "#,
        )
        .unwrap();
        assert_eq!(c.backend, Some(Backend::Etcd));
        assert_eq!(c.arbiters.len(), 3);
        assert_eq!(c.etcd_prefix, DEFAULT_PREFIX);
        let e =
            FenceConfig::from_toml_str("backend = \"none\"\nvm=\"a\"\nnode=\"b\"\nleese_ms = 1")
                .unwrap_err()
                .to_string();
        assert!(e.contains("leese_ms"), "{e}");
        let e = FenceConfig::from_toml_str("backend = \"zookeeper\"\nvm=\"a\"\nnode=\"b\"")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("zookeeper") || e.contains("unknown variant"),
            "{e}"
        );
    }

    #[test]
    fn nests_as_a_table_with_default() {
        #[derive(Deserialize)]
        struct Daemon {
            #[serde(default)]
            fence: FenceConfig,
        }
        let d: Daemon =
            toml::from_str("[fence]\nbackend = \"none\"\nvm = \"v\"\nnode = \"n\"").unwrap();
        assert!(d.fence.validate().is_ok());
        let d: Daemon = toml::from_str("").unwrap();
        assert!(d.fence.validate().is_err());
    }

    #[test]
    fn renew_interval_must_be_below_half_lease() {
        let mut c = base();
        c.renew_interval_ms = 1500;
        assert!(err(&c).contains("below half"), "{}", err(&c));
        c.renew_interval_ms = 0;
        assert!(err(&c).contains("renew_interval_ms"));
    }

    #[test]
    fn timing_budget() {
        let mut c = base();
        c.lease_ms = 2000;
        c.renew_interval_ms = 900;
        c.request_timeout_ms = 900;
        c.drift_margin_ms = 200;
        assert!(
            err(&c).contains("lapses before the next renewal"),
            "{}",
            err(&c)
        );
        c.request_timeout_ms = 1000;
        assert!(err(&c).contains("request_timeout_ms"));
        c.request_timeout_ms = 500;
        c.drift_margin_ms = 0;
        assert!(err(&c).contains("drift_margin_ms"));
        c.lease_ms = 50;
        assert!(err(&c).contains("lease_ms"));
    }

    #[test]
    fn arbiter_lists() {
        let mut c = base();
        c.arbiters.push("10.0.0.9:7700".into());
        assert!(err(&c).contains("exactly one"), "{}", err(&c));
        c.arbiters = vec!["10.0.0.2".into()];
        assert!(err(&c).contains("host:port"));
        c.backend = Some(Backend::Etcd);
        c.arbiters.clear();
        assert!(err(&c).contains("etcd client endpoints"));
        c.backend = Some(Backend::None);
        c.arbiters = vec!["x:1".into()];
        assert!(err(&c).contains("backend = \"none\" ignores it"));
    }

    #[test]
    fn names_checked() {
        let mut c = base();
        c.node = String::new();
        assert!(err(&c).contains("fence.node"));
        c.node = "a b".into();
        assert!(err(&c).contains("fence.node"));
        c.node = "ok".into();
        c.vm = "x/y".into();
        assert!(err(&c).contains("fence.vm"));
    }

    #[test]
    fn builds_each_backend() {
        let c = base();
        assert!(
            c.build_arbiter()
                .unwrap()
                .describe()
                .contains("10.0.0.2:7700")
        );
        let mut c = base();
        c.backend = Some(Backend::None);
        c.arbiters.clear();
        assert_eq!(c.build_arbiter().unwrap().lease_len(), Duration::MAX);
    }
}
