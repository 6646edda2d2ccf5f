//! The Debian packages (`cargo xtask package`, which `./x test` runs before the tests)
//! installed with dpkg into a root of their own (maintainer scripts included, confined
//! there by `$DPKG_ROOT`), and the appliance run on the testbed from the installed
//! binaries: nothing of the build tree is used.
use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use ft_testbed::{
    Appliance, ApplianceOptions, Testbed, TestbedOptions, VmOptions, embedded_fence,
    start_arbiter_bin,
    workload::{Clients, check_history},
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

/// An empty root for `dpkg --root` (a host's filesystem, as far as dpkg is concerned).
fn new_root(name: &str) -> PathBuf {
    let root = std::env::temp_dir().join(format!("ft-pkgroot-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    for d in ["var/lib/dpkg/info", "var/lib/dpkg/updates"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::write(root.join("var/lib/dpkg/status"), "").unwrap();
    root
}

/// The same package with another Debian revision (`0.1.0-2`) and another guest image:
/// the "new release" of the rolling upgrade. (The binary is this build's: the procedure,
/// and that a pinned guest survives the upgrade, are what is under test.)
fn next_revision(deb: &Path) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ft-deb-next-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let st = Command::new("dpkg-deb")
        .arg("-R")
        .arg(deb)
        .arg(&dir)
        .status()
        .unwrap();
    assert!(st.success());
    let control = dir.join("DEBIAN/control");
    let text = std::fs::read_to_string(&control).unwrap();
    std::fs::write(
        &control,
        text.replace("Version: 0.1.0-1", "Version: 0.1.0-2"),
    )
    .unwrap();
    // A new guest: any other bytes (a trailing byte does not change what it runs, but
    // it is another image: another hash, and a replica of it could not join).
    let guest = dir.join("usr/lib/ftd/guest.elf");
    let mut bytes = std::fs::read(&guest).unwrap();
    bytes.push(0);
    std::fs::write(&guest, bytes).unwrap();
    // dpkg checks the payload against md5sums.
    let sums = dir.join("DEBIAN/md5sums");
    if sums.exists() {
        let out = Command::new("md5sum")
            .arg("usr/lib/ftd/guest.elf")
            .current_dir(&dir)
            .output()
            .unwrap();
        let line = String::from_utf8_lossy(&out.stdout).trim_end().to_string();
        let text = std::fs::read_to_string(&sums).unwrap();
        let text: String = text
            .lines()
            .map(|l| {
                if l.ends_with("usr/lib/ftd/guest.elf") {
                    line.clone()
                } else {
                    l.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join("\n")
            + "\n";
        std::fs::write(&sums, text).unwrap();
    }
    let out = std::env::temp_dir().join(format!("ft-next-{}.deb", std::process::id()));
    let st = Command::new("dpkg-deb")
        .args(["-Zgzip", "-z1", "-b"])
        .arg(&dir)
        .arg(&out)
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    let _ = std::fs::remove_dir_all(&dir);
    out
}

fn installed_version(root: &Path, pkg: &str) -> String {
    let out = Command::new("dpkg-query")
        .arg(format!(
            "--admindir={}",
            root.join("var/lib/dpkg").display()
        ))
        .args(["-W", "-f", "${Version}", pkg])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The deployment guide (docs/deploy.md) on the testbed, from the packages: install on
/// two "hosts" (a dpkg root each), first start, clients writing throughout, the failover
/// drill, re-protection, and the rolling upgrade (the backup first, a switchover, then
/// the other host); every acknowledged write survives (the history is linearizable);
/// purged, nothing is left.
#[test]
fn the_packages_install_and_the_guide_runs_from_them() {
    let (ftd_deb, arb_deb) = debs();
    let (root_a, root_b) = (new_root("a"), new_root("b"));
    for root in [&root_a, &root_b] {
        dpkg(
            root,
            &["-i", ftd_deb.to_str().unwrap(), arb_deb.to_str().unwrap()],
        );
        let list = dpkg(root, &["-l"]);
        for p in ["ii  ftd ", "ii  ft-arbiter "] {
            assert!(list.contains(p), "{p} not installed:\n{list}");
        }
    }
    check_files(&root_a);
    // The package's guest is kept in the store under its hash; the configs pin it.
    let guest = std::fs::read(root_a.join("usr/lib/ftd/guest.elf")).unwrap();
    let sum = ftd::config::image_sha256(&guest);
    let stored = |root: &Path, sum: &str| root.join(format!("var/lib/ftd/guests/{sum}.elf"));
    assert_eq!(std::fs::read(stored(&root_a, &sum)).unwrap(), guest);
    let pin = format!(
        "image = {:?}\nimage_sha256 = \"{sum}\"",
        stored(&root_a, &sum).display().to_string()
    );

    // §6 First start, from the installed binaries: the arbiter and both hosts.
    let (ftd_a, ftd_b) = (root_a.join("usr/bin/ftd"), root_b.join("usr/bin/ftd"));
    let tb = Testbed::new(TestbedOptions {
        start_standins: false,
        ..Default::default()
    })
    .unwrap();
    let _arb = start_arbiter_bin(&tb, &root_a.join("usr/bin/ft-arbiter")).unwrap();
    let mut app = Appliance::start_replicating(
        &tb,
        &ApplianceOptions {
            vm: VmOptions::Vmm {
                ram_mib: 256,
                extra: pin.clone(),
            },
            fence: embedded_fence(2000, 400),
            ftd: Some(ftd_a.clone()),
            ftd_b: Some(ftd_b.clone()),
            join: true,
            ..Default::default()
        },
        T,
    )
    .unwrap();
    let (sock_a, sock_b) = (app.sock_a.clone(), app.sock_b.clone());
    let check = |h: char| {
        let (bin, sock) = if h == 'a' {
            (&ftd_a, &sock_a)
        } else {
            (&ftd_b, &sock_b)
        };
        let out = Command::new(bin)
            .args(["status", "--check", "--socket"])
            .arg(sock)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (code, line) = check('a');
    assert_eq!(code, Some(0), "{line}");
    assert!(line.starts_with("FT OK - node host-a: primary"), "{line}");
    let clients = Clients::start(&tb, 4, T);
    assert!(clients.wait_ops(200, T), "clients made no progress");
    let t0 = Instant::now();
    let rejoined = |live: char| {
        assert!(
            Appliance::wait_until(T, || check(live).0 == Some(0)),
            "not protected again: {:?}",
            check(live)
        );
    };

    // §8 The failover drill: the primary dies, B takes over, A rejoins.
    app.guard('a').kill().unwrap();
    assert!(
        Appliance::wait_until(T, || app.live_after_take_over('b')),
        "B did not take over: {:#}",
        app.status('b').unwrap_or_default()
    );
    assert_eq!(check('b').0, Some(1), "unprotected is a warning");
    app.restart_as_backup(&tb, 'a').unwrap();
    rejoined('b');

    // §11 The rolling upgrade: the backup (A) first.
    let next = next_revision(&ftd_deb);
    let conf = root_a.join("etc/ftd/ftd.toml");
    let edited = std::fs::read_to_string(&conf).unwrap() + "\n# edited by the operator\n";
    std::fs::write(&conf, &edited).unwrap();
    app.guard('a').send_signal(libc::SIGTERM).unwrap();
    assert!(
        Appliance::wait_until(T, || !app.guard('a').is_running()),
        "A did not stop on SIGTERM"
    );
    dpkg(&root_a, &["-i", next.to_str().unwrap()]);
    assert_eq!(installed_version(&root_a, "ftd"), "0.1.0-2");
    // The new release ships another guest; the pinned one is still in the store, so
    // the upgraded host can join the VM that runs it. The new guest would be refused.
    let new_guest = std::fs::read(root_a.join("usr/lib/ftd/guest.elf")).unwrap();
    let new_sum = ftd::config::image_sha256(&new_guest);
    assert_ne!(new_sum, sum);
    assert_eq!(std::fs::read(stored(&root_a, &sum)).unwrap(), guest);
    assert_eq!(std::fs::read(stored(&root_a, &new_sum)).unwrap(), new_guest);
    let wrong = std::fs::read_to_string(&app.config_a).unwrap().replace(
        &stored(&root_a, &sum).display().to_string(),
        &root_a.join("usr/lib/ftd/guest.elf").display().to_string(),
    );
    let wrong_path =
        std::env::temp_dir().join(format!("ft-wrong-guest-{}.toml", std::process::id()));
    std::fs::write(&wrong_path, wrong).unwrap();
    let out = Command::new(&ftd_a)
        .arg("check-config")
        .arg(&wrong_path)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&wrong_path);
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("pins"),
        "{out:?}"
    );
    // The operator's edit of the conffile survives the upgrade.
    assert_eq!(std::fs::read_to_string(&conf).unwrap(), edited);
    app.restart_as_backup(&tb, 'a').unwrap();
    rejoined('b');
    // A switchover on the primary (B, old build) hands the VM to the upgraded A.
    let out = Command::new(&ftd_b)
        .args(["switchover", "--socket"])
        .arg(&app.sock_b)
        .output()
        .unwrap();
    assert!(out.status.success(), "ftd switchover: {out:?}");
    assert_eq!(app.status('a').unwrap()["role"], "primary");
    // Then the other host.
    app.guard('b').send_signal(libc::SIGTERM).unwrap();
    assert!(
        Appliance::wait_until(T, || !app.guard('b').is_running()),
        "B did not stop on SIGTERM"
    );
    dpkg(&root_b, &["-i", next.to_str().unwrap()]);
    assert_eq!(installed_version(&root_b, "ftd"), "0.1.0-2");
    assert_eq!(std::fs::read(stored(&root_b, &sum)).unwrap(), guest);
    app.restart_as_backup(&tb, 'b').unwrap();
    rejoined('a');
    assert!(clients.wait_each_goes_on(), "clients stalled");
    let logs = clients.finish();
    check_history(&tb, &logs, t0);
    drop(app);
    drop(tb);
    let _ = std::fs::remove_file(&next);

    // Purged, nothing of them is left.
    for root in [&root_a, &root_b] {
        dpkg(root, &["-P", "ftd", "ft-arbiter"]);
        for f in [
            "usr/bin/ftd",
            "usr/bin/ft-arbiter",
            "etc/ftd/ftd.toml",
            "usr/lib/systemd/system/ftd.service",
            "var/lib/ftd",
        ] {
            assert!(!root.join(f).exists(), "{f} left after purge");
        }
        let _ = std::fs::remove_dir_all(root);
    }
}

/// What the packages put where (a root they were installed into).
fn check_files(root: &Path) {
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
    // dpkg never restarts a running ftd (an upgrade is the operator's rolling step).
    let postinst = std::fs::read_to_string(r("var/lib/dpkg/info/ftd.postinst")).unwrap();
    assert!(
        !postinst.contains("restart"),
        "the package restarts ftd:\n{postinst}"
    );
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
}
