//! The Debian packages (`cargo xtask package`, which `./x test` runs before the tests)
//! installed with dpkg into a root of their own (maintainer scripts included, confined
//! there by `$DPKG_ROOT`), and the appliance run on the testbed from the installed
//! binaries: nothing of the build tree is used.
use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use ft_testbed::{
    Appliance, ApplianceOptions, Testbed, TestbedOptions, VmOptions, embedded_fence, resp,
    start_arbiter_bin,
};

const T: Duration = Duration::from_secs(60);

fn debs() -> (PathBuf, PathBuf) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debian");
    let (ftd, arb) = (dir.join("ftd.deb"), dir.join("ft-arbiter.deb"));
    for d in [&ftd, &arb] {
        assert!(
            d.is_file(),
            "{} missing: `cargo xtask package` builds it (./x test does)",
            d.display()
        );
    }
    (ftd, arb)
}

/// `dpkg --root ROOT ARGS`, confined to ROOT (the host's dpkg database and its other
/// packages are not there: their dependencies are forced).
fn dpkg(root: &Path, args: &[&str]) -> String {
    let out = Command::new("dpkg")
        .arg(format!("--root={}", root.display()))
        .args(["--force-script-chrootless", "--force-depends"])
        .args(args)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "dpkg {args:?}:\n{text}");
    text
}

fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

#[test]
fn the_packages_install_and_the_appliance_runs_from_them() {
    let (ftd_deb, arb_deb) = debs();
    let root = std::env::temp_dir().join(format!("ft-pkgroot-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    for d in ["var/lib/dpkg/info", "var/lib/dpkg/updates"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::write(root.join("var/lib/dpkg/status"), "").unwrap();
    dpkg(
        &root,
        &["-i", ftd_deb.to_str().unwrap(), arb_deb.to_str().unwrap()],
    );
    let list = dpkg(&root, &["-l"]);
    for p in ["ii  ftd ", "ii  ft-arbiter "] {
        assert!(list.contains(p), "{p} not installed:\n{list}");
    }

    // What the packages put where.
    let r = |p: &str| root.join(p);
    for f in [
        "usr/bin/ftd",
        "usr/bin/ft-arbiter",
        "usr/lib/systemd/system/ftd.service",
        "usr/lib/systemd/system/ft-arbiter.service",
        "usr/lib/sysusers.d/ft-arbiter.conf",
        "usr/share/doc/ftd/deploy.md",
        "usr/share/doc/ftd/prometheus/ft-alerts.yml",
        "usr/share/doc/ftd/grafana/ft-appliance.json",
        "usr/share/zsh/vendor-completions/_ftd",
        "usr/share/fish/vendor_completions.d/ftd.fish",
    ] {
        assert!(r(f).is_file(), "{f} not installed");
    }
    // The config is a conffile, in a directory only root reads (postinst); the arbiter's
    // user exists (systemd-sysusers, run by its postinst) and /etc/ft waits for its
    // secret.
    assert!(r("etc/ftd/ftd.toml").is_file());
    assert!(
        std::fs::read_to_string(r("var/lib/dpkg/info/ftd.conffiles"))
            .unwrap()
            .contains("/etc/ftd/ftd.toml")
    );
    assert_eq!(mode(&r("etc/ftd")), 0o700);
    assert_eq!(mode(&r("etc/ft")), 0o700);
    let passwd = std::fs::read_to_string(r("etc/passwd")).unwrap();
    assert!(passwd.contains("ft-arbiter:x:"), "{passwd}");
    // Man pages render from the command line's own definition; completions parse.
    for page in ["ftd", "ftd-status", "ftd-preflight", "ft-arbiter"] {
        let out = Command::new("zcat")
            .arg(r(&format!("usr/share/man/man1/{page}.1.gz")))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains(".TH"), "{page}.1: {text}");
    }
    for c in ["ftd", "ft-arbiter"] {
        let st = Command::new("bash")
            .arg("-n")
            .arg(r(&format!("usr/share/bash-completion/completions/{c}")))
            .status()
            .unwrap();
        assert!(st.success(), "{c}'s bash completion does not parse");
    }

    // The appliance from the installed binaries: the arbiter and both hosts.
    let (ftd, arbiter) = (r("usr/bin/ftd"), r("usr/bin/ft-arbiter"));
    let tb = Testbed::new(TestbedOptions {
        start_standins: false,
        ..Default::default()
    })
    .unwrap();
    let _arb = start_arbiter_bin(&tb, &arbiter).unwrap();
    let mut app = Appliance::start_replicating(
        &tb,
        &ApplianceOptions {
            vm: VmOptions::vmm(),
            fence: embedded_fence(2000, 400),
            ftd: Some(ftd.clone()),
            join: true,
            ..Default::default()
        },
        T,
    )
    .unwrap();
    let mut c = resp::connect(&tb, Duration::from_secs(10)).unwrap();
    assert_eq!(
        resp::call(&mut c, &[b"SET", b"installed", b"yes"]).unwrap(),
        b"+OK\r\n"
    );
    let check = |sock: &Path| {
        let out = Command::new(&ftd)
            .args(["status", "--check", "--socket"])
            .arg(sock)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (code, line) = check(&app.sock_a);
    assert_eq!(code, Some(0), "{line}");
    assert!(line.starts_with("FT OK - node host-a: primary"), "{line}");
    // The installed pair fails over: B takes over with what A acknowledged.
    app.guard('a').kill().unwrap();
    assert!(
        Appliance::wait_until(T, || app.live_after_take_over('b')),
        "B did not take over: {:#}",
        app.status('b').unwrap_or_default()
    );
    let mut c = resp::connect(&tb, Duration::from_secs(10)).unwrap();
    assert_eq!(
        resp::call(&mut c, &[b"GET", b"installed"]).unwrap(),
        b"$3\r\nyes\r\n"
    );
    let (code, line) = check(&app.sock_b);
    assert_eq!(code, Some(1), "unprotected is a warning: {line}");
    // A restarted A runs the installed binary again and rejoins.
    app.restart_as_backup(&tb, 'a').unwrap();
    assert!(
        Appliance::wait_until(T, || check(&app.sock_b).0 == Some(0)),
        "A did not rejoin: {:?}",
        check(&app.sock_b)
    );
    drop(app);
    drop(tb);

    // Purged, nothing of them is left.
    dpkg(&root, &["-P", "ftd", "ft-arbiter"]);
    for f in [
        "usr/bin/ftd",
        "usr/bin/ft-arbiter",
        "etc/ftd/ftd.toml",
        "usr/lib/systemd/system/ftd.service",
    ] {
        assert!(!r(f).exists(), "{f} left after purge");
    }
    let _ = std::fs::remove_dir_all(&root);
}
