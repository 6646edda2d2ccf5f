//! The etcd backend with TLS (mutual) and etcd authentication, configured through
//! `[fence]` (`etcd_ca_file`, `etcd_cert_file`, `etcd_key_file`, `etcd_user`,
//! `etcd_password_file`), against a real etcd member serving https only with
//! `--client-cert-auth` and authentication enabled. Certificates are made per test with
//! the `openssl` command. FAILS (never skips) without etcd or openssl.
mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::{TEST_BUDGET, race_rounds};
use etcd_client::{Certificate, Client, ConnectOptions, Identity, Permission, TlsOptions};
use ft_fence::testkit::{EtcdCluster, MemberTls, TestPki, make_test_pki};
use ft_fence::{Acquire, Arbiter, FenceConfig, FenceError, try_acquire};
use tokio::time::timeout;

const PREFIX: &str = "/ft-fence-tls/";
const ROLE: &str = "ft-fence";
const USER: &str = "ft-node";
const PASSWORD: &str = "correct horse battery staple";
/// The client certificate's common name: no etcd user of that name, so the certificate
/// alone grants nothing (etcd maps a client certificate's CN to a user).
const CLIENT_CN: &str = "ft-fence-client";

/// One etcd member with TLS, client certificates and authentication, set up for tests.
struct Secured {
    dir: tempfile::TempDir,
    pki: TestPki,
    cluster: EtcdCluster,
}

impl Secured {
    async fn start() -> Secured {
        let dir = tempfile::tempdir().unwrap();
        let pki = make_test_pki(&dir.path().join("pki"), CLIENT_CN)
            .unwrap_or_else(|e| panic!("cannot make test certificates: {e}"));
        let tls = MemberTls {
            cert: pki.server_cert.clone(),
            key: pki.server_key.clone(),
            client_ca: Some(pki.ca.clone()),
        };
        let cluster =
            EtcdCluster::start_tls(1, &dir.path().join("etcd"), Duration::from_secs(20), &tls)
                .unwrap_or_else(|e| panic!("etcd test cannot run: {e}"));
        let s = Secured { dir, pki, cluster };
        timeout(Duration::from_secs(20), s.enable_auth())
            .await
            .expect("setting up etcd auth took over 20 s");
        s.write("password", &format!("{PASSWORD}\n"));
        s.write("wrong-password", "not the password\n");
        s
    }

    /// Users root and `USER` (role `ROLE`: readwrite on `PREFIX`), then auth enable.
    async fn enable_auth(&self) {
        let read = |p: &Path| std::fs::read(p).unwrap();
        let tls = TlsOptions::new()
            .ca_certificate(Certificate::from_pem(read(&self.pki.ca)))
            .identity(Identity::from_pem(
                read(&self.pki.client_cert),
                read(&self.pki.client_key),
            ));
        let opts = ConnectOptions::new()
            .with_tls(tls)
            .with_timeout(Duration::from_secs(5));
        let mut c = Client::connect(self.cluster.endpoints(), Some(opts))
            .await
            .expect("admin connect");
        c.user_add("root", "root password", None).await.unwrap();
        c.user_grant_role("root", "root").await.unwrap();
        c.role_add(ROLE).await.unwrap();
        c.role_grant_permission(ROLE, Permission::read_write(PREFIX).with_prefix())
            .await
            .unwrap();
        c.user_add(USER, PASSWORD, None).await.unwrap();
        c.user_grant_role(USER, ROLE).await.unwrap();
        c.auth_enable().await.unwrap();
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    fn file(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    /// The `[fence]` table of a node with everything right.
    fn config(&self, node: &str) -> FenceConfig {
        let p = |p: &Path| p.display().to_string();
        FenceConfig::from_toml_str(&format!(
            r#"
            backend = "etcd"
            arbiters = {:?}
            lease_ms = 3000
            request_timeout_ms = 1000
            vm = "vm"
            node = "{node}"
            peer = "{}"
            etcd_prefix = "{PREFIX}"
            etcd_ca_file = "{}"
            etcd_cert_file = "{}"
            etcd_key_file = "{}"
            etcd_user = "{USER}"
            etcd_password_file = "{}"
            "#,
            self.cluster.endpoints(),
            if node == "node-a" { "node-b" } else { "node-a" },
            p(&self.pki.ca),
            p(&self.pki.client_cert),
            p(&self.pki.client_key),
            self.file("password"),
        ))
        .unwrap_or_else(|e| panic!("{e}"))
    }
}

fn arbiter(c: &FenceConfig) -> Arc<dyn Arbiter> {
    c.build_arbiter().unwrap_or_else(|e| panic!("{e}"))
}

/// `c` cannot go live, and the error (from `try_acquire`, the daemon's step) is returned.
async fn not_live(c: &FenceConfig) -> FenceError {
    let a = arbiter(c);
    match try_acquire(a.as_ref(), "vm", &c.node, c.drift_margin()).await {
        Err(e) => {
            assert!(e.to_string().contains("will not go live"), "{e}");
            e
        }
        Ok(r) => panic!("{} must not reach etcd, got {r:?}", a.describe()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_right_ca_certificate_and_user_it_works() {
    let s = Secured::start().await;
    timeout(TEST_BUDGET, async {
        let (ca, cb) = (s.config("node-a"), s.config("node-b"));
        let (a, b) = (arbiter(&ca), arbiter(&cb));
        let d = a.describe();
        assert!(
            d.contains("TLS with a client certificate") && d.contains(USER),
            "{d}"
        );
        let g = match try_acquire(a.as_ref(), "vm", "node-a", ca.drift_margin()).await {
            Ok(Acquire::Live { grant, .. }) => grant,
            r => panic!("node-a must go live: {r:?}"),
        };
        assert_eq!(g.epoch, 1);
        a.renew("vm", "node-a", g.epoch).await.unwrap();
        assert!(matches!(
            try_acquire(b.as_ref(), "vm", "node-b", cb.drift_margin()).await,
            Ok(Acquire::NotLive(_))
        ));
        a.pair("vm", "node-a", g.epoch, "node-b").await.unwrap();
        let g2 = b.test_and_set("vm", "node-b", g.epoch).await.unwrap();
        assert_eq!(g2.won().map(|g| g.epoch), Some(2), "{g2:?}");
        b.renew("vm", "node-b", 2).await.unwrap();
        b.release("vm", "node-b", 2).await.unwrap();
        assert_eq!(race_rounds(a, b, "vm-race", 5).await, 5);
    })
    .await
    .expect("test budget exceeded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_tls_or_with_the_wrong_ca_or_certificate_nobody_goes_live() {
    let s = Secured::start().await;
    timeout(TEST_BUDGET, async {
        let good = s.config("node-a");
        let p = |p: &Path| p.display().to_string();

        // No TLS at all (plain host:port endpoints, no TLS options).
        let mut c = good.clone();
        c.arbiters = s
            .cluster
            .members
            .iter()
            .map(|m| m.client_addr().to_string())
            .collect();
        c.etcd_ca_file.clear();
        c.etcd_cert_file.clear();
        c.etcd_key_file.clear();
        c.etcd_user.clear();
        c.etcd_password_file.clear();
        let e = not_live(&c).await;
        eprintln!("no TLS: {e}");
        assert!(matches!(e, FenceError::EtcdTls { tls: false, .. }), "{e:?}");
        assert!(e.to_string().contains("set fence.etcd_ca_file"), "{e}");

        // The wrong CA: the member's certificate is refused.
        let mut c = good.clone();
        c.etcd_ca_file = p(&s.pki.other_ca);
        let e = not_live(&c).await;
        eprintln!("wrong CA: {e}");
        assert!(matches!(e, FenceError::EtcdTls { tls: true, .. }), "{e:?}");
        assert!(
            e.to_string().contains("fence.etcd_ca_file is the CA"),
            "{e}"
        );

        // No client certificate, and one signed by another CA: the member refuses us.
        let mut c = good.clone();
        c.etcd_cert_file.clear();
        c.etcd_key_file.clear();
        let e = not_live(&c).await;
        eprintln!("no client certificate: {e}");
        assert!(matches!(e, FenceError::EtcdTls { tls: true, .. }), "{e:?}");
        let mut c = good.clone();
        c.etcd_cert_file = p(&s.pki.stranger_cert);
        c.etcd_key_file = p(&s.pki.stranger_key);
        let e = not_live(&c).await;
        eprintln!("client certificate of another CA: {e}");
        assert!(matches!(e, FenceError::EtcdTls { tls: true, .. }), "{e:?}");

        // Nothing was written by any of them: the right node goes live at epoch 1.
        let a = arbiter(&good);
        let g = a.test_and_set("vm", "node-a", 0).await.unwrap();
        assert_eq!(g.won().map(|g| g.epoch), Some(1), "{g:?}");
    })
    .await
    .expect("test budget exceeded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_a_missing_user_or_a_foreign_prefix_is_an_auth_error() {
    let s = Secured::start().await;
    timeout(TEST_BUDGET, async {
        let good = s.config("node-a");

        let mut c = good.clone();
        c.etcd_password_file = s.file("wrong-password");
        let e = not_live(&c).await;
        eprintln!("wrong password: {e}");
        assert!(
            matches!(&e, FenceError::EtcdAuth { user: Some(u), .. } if u == USER),
            "{e:?}"
        );
        assert!(e.to_string().contains("fence.etcd_password_file"), "{e}");

        // Authentication on the cluster, none configured (the certificate's name is no user).
        let mut c = good.clone();
        c.etcd_user.clear();
        c.etcd_password_file.clear();
        let e = not_live(&c).await;
        eprintln!("no user: {e}");
        assert!(
            matches!(e, FenceError::EtcdAuth { user: None, .. }),
            "{e:?}"
        );
        assert!(e.to_string().contains("set fence.etcd_user"), "{e}");

        // The right user, but its role does not cover the prefix.
        let mut c = good.clone();
        c.etcd_prefix = "/elsewhere/".into();
        let e = not_live(&c).await;
        eprintln!("foreign prefix: {e}");
        assert!(matches!(e, FenceError::EtcdAuth { .. }), "{e:?}");

        let a = arbiter(&good);
        let g = a.test_and_set("vm", "node-a", 0).await.unwrap();
        assert_eq!(g.won().map(|g| g.epoch), Some(1), "{g:?}");
    })
    .await
    .expect("test budget exceeded");
}
