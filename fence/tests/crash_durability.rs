//! The embedded arbiter survives a crash that LOSES THE PAGE CACHE (a power cut), not
//! only a process kill.
//!
//! What it proves: every decision `ft-arbiter` replied to (test-and-set winners, epochs,
//! pairings, releases, the last request id per node) had reached the block device before
//! the reply, so an arbiter started on the disk as a power cut leaves it remembers all of
//! them and never grants an epoch again.
//!
//! How: the state directory is on ext4 on a loop device (a backing file in a temp dir).
//! The real binary grants decisions, is SIGKILLed, and the crash image is a copy of the
//! BACKING FILE taken while the filesystem is still mounted and nothing was synced: it
//! holds what the loop device received (fsync reaches it) and nothing of ext4's page
//! cache. The image is mounted on a second loop device (ext4 replays its journal as
//! after a power cut) and a new arbiter on it must answer as the old one did.
//!
//! The premise is checked in every run, so the test cannot pass vacuously: a file the
//! test writes without fsync at the start must be missing from the image (a `sync`
//! before the copy makes the test fail there), and the image must be taken before ext4
//! could have written un-fsynced data by itself. The first mount uses `commit=60` (the
//! journal commit timer; an fsync commits at once whatever it is) and dirty data is
//! written back after `/proc/sys/vm/dirty_expire_centisecs` (30 s by default); the
//! crash image is taken ~150 ms after the first write and the test asserts it stayed
//! below both. The mount also sets `noauto_da_alloc`: ext4's replace-by-rename
//! heuristic would otherwise flush a renamed file's data with the next commit and
//! sometimes hide a missing file fsync (other filesystems have no such heuristic).
//!
//! Checked to fail, every run, on broken code (`Store::persist` in
//! src/embedded/server.rs): without the file and directory fsyncs the image has no state
//! file at all; without only the directory fsync the last decision (`vm-last`) is
//! forgotten (each file fsync commits the journal, which carries the previous rename, so
//! only the last one is lost); without only the file fsync the state file is empty after
//! the journal replay and the arbiter refuses to start.
//!
//! Needs root, `losetup`, `mkfs.ext4` and `mount`; FAILS (never skips) without them.
mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{ArbiterProc, race_rounds};
use ft_fence::embedded::STATE_FILE;
use ft_fence::embedded::proto::{self, ErrorCode, Op, Reply, Request, Response};
use ft_fence::testkit::free_port;
use ft_fence::{Arbiter, EmbeddedArbiter, TasOutcome};
use tokio::net::TcpStream;
use tokio::time::timeout;

/// The journal commit interval of the first mount (seconds).
const COMMIT_S: u64 = 60;
const SENTINEL: &[u8] = b"written without fsync: must not survive the crash\n";

/// Runs a command, bounded by `limit`; its stdout, or what went wrong.
fn run(prog: &str, args: &[&str], limit: Duration) -> Result<String, String> {
    let what = format!("{prog} {}", args.join(" "));
    let mut child = Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            format!("cannot run {what}: {e} (the test needs root and util-linux/e2fsprogs)")
        })?;
    let t0 = Instant::now();
    loop {
        match child.try_wait().map_err(|e| format!("{what}: {e}"))? {
            Some(_) => break,
            None if t0.elapsed() > limit => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{what} did not finish within {limit:?}"));
            }
            None => std::thread::sleep(Duration::from_millis(10)),
        }
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("{what}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Loop devices and mounts of one test; all undone on drop (also on panic).
struct Disks {
    dir: tempfile::TempDir,
    loops: Vec<String>,
    mounts: Vec<PathBuf>,
}

impl Disks {
    fn new() -> Disks {
        Disks {
            dir: tempfile::tempdir().expect("temp dir"),
            loops: Vec::new(),
            mounts: Vec::new(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Attaches `file` to a free loop device; returns the device.
    fn attach(&mut self, file: &Path) -> String {
        let f = file.to_str().expect("utf-8 path");
        let dev = run("losetup", &["--find", "--show", f], Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(dev.starts_with("/dev/loop"), "losetup printed {dev:?}");
        self.loops.push(dev.clone());
        dev
    }

    fn mount(&mut self, dev: &str, at: &Path, opts: &str) {
        std::fs::create_dir_all(at).expect("mount point");
        let at_s = at.to_str().expect("utf-8 path");
        run(
            "mount",
            &["-t", "ext4", "-o", opts, dev, at_s],
            Duration::from_secs(10),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        self.mounts.push(at.to_path_buf());
    }
}

impl Drop for Disks {
    fn drop(&mut self) {
        let limit = Duration::from_secs(10);
        for m in self.mounts.drain(..).rev() {
            let m = m.display().to_string();
            if let Err(e) = run("umount", &[&m], limit) {
                eprintln!("{e}; detaching it lazily");
                let _ = run("umount", &["-l", &m], limit);
            }
        }
        for d in self.loops.drain(..).rev() {
            if let Err(e) = run("losetup", &["-d", &d], limit) {
                eprintln!("cannot detach {d}: {e}");
            }
        }
    }
}

fn client(addr: &str) -> Arc<dyn Arbiter> {
    Arc::new(EmbeddedArbiter::new(
        addr,
        Duration::from_secs(10),
        Duration::from_secs(2),
    ))
}

/// One request on a fresh connection (to pick the request id ourselves).
async fn raw(addr: &str, id: u64, node: &str, vm: &str, op: Op) -> Reply {
    let req = Request {
        v: proto::PROTO_VERSION,
        id,
        node: node.into(),
        vm: vm.into(),
        op,
        mac: None,
    };
    let mut s = TcpStream::connect(addr).await.expect("connect");
    proto::write_frame(&mut s, &proto::encode(&req))
        .await
        .expect("send");
    let body = timeout(Duration::from_secs(3), proto::read_frame(&mut s))
        .await
        .expect("no reply within 3 s")
        .expect("reply frame");
    let resp: Response = serde_json::from_slice(&body).expect("reply JSON");
    resp.reply
}

fn won(o: TasOutcome, what: &str) -> u64 {
    o.won()
        .unwrap_or_else(|| panic!("{what}: did not win"))
        .epoch
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decisions_survive_a_crash_that_loses_the_page_cache() {
    let t_test = Instant::now();
    let expire_cs: u64 = std::fs::read_to_string("/proc/sys/vm/dirty_expire_centisecs")
        .expect("read /proc/sys/vm/dirty_expire_centisecs")
        .trim()
        .parse()
        .expect("dirty_expire_centisecs is a number");
    let mut disks = Disks::new();
    let img = disks.path("disk.img");
    std::fs::File::create(&img)
        .and_then(|f| f.set_len(64 << 20))
        .expect("backing file");
    let dev = disks.attach(&img);
    run(
        "mkfs.ext4",
        &[
            "-q",
            "-F",
            "-E",
            "lazy_itable_init=0,lazy_journal_init=0",
            &dev,
        ],
        Duration::from_secs(30),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let live = disks.path("live");
    disks.mount(&dev, &live, &format!("commit={COMMIT_S},noauto_da_alloc"));
    let state = live.join("state");
    std::fs::create_dir(&state).expect("state dir");
    // The setup is on the device; from here on only fsync puts anything there.
    run(
        "sync",
        &["-f", live.to_str().unwrap()],
        Duration::from_secs(10),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(live.join("sentinel"), SENTINEL).expect("sentinel");
    let t_window = Instant::now();

    // The arbiters are declared after `disks`, so they die before the unmounts.
    let addr = format!("127.0.0.1:{}", free_port());
    let mut arb = ArbiterProc::start_new_on(&addr, &state);
    let (a, b) = (client(&addr), client(&addr));
    // (owner, epoch) per VM, from the replies.
    let mut want: BTreeMap<&str, (Option<&str>, u64)> = BTreeMap::new();
    timeout(Duration::from_secs(10), async {
        // An owner re-taking its VM: epochs 1, 2, 3.
        let mut e = 0;
        for _ in 0..3 {
            e = won(
                a.test_and_set("vm-retake", "node-a", e).await.unwrap(),
                "retake",
            );
        }
        want.insert("vm-retake", (Some("node-a"), e));
        // A pairing.
        let e = won(
            a.test_and_set("vm-paired", "node-a", 0).await.unwrap(),
            "paired",
        );
        a.pair("vm-paired", "node-a", e, "node-b").await.unwrap();
        want.insert("vm-paired", (Some("node-a"), e));
        // A release.
        let e = won(
            a.test_and_set("vm-released", "node-a", 0).await.unwrap(),
            "rel",
        );
        a.release("vm-released", "node-a", e).await.unwrap();
        want.insert("vm-released", (None, e));
        // A hand-over to the paired follower.
        let e = won(
            a.test_and_set("vm-handover", "node-a", 0).await.unwrap(),
            "ho",
        );
        a.pair("vm-handover", "node-a", e, "node-b").await.unwrap();
        let e = won(
            b.test_and_set("vm-handover", "node-b", e).await.unwrap(),
            "ho b",
        );
        want.insert("vm-handover", (Some("node-b"), e));
        // Races, each won by one node, which then releases.
        let e = race_rounds(a.clone(), b.clone(), "vm-race", 20).await;
        want.insert("vm-race", (None, e));
        // The last reply before the crash, with a request id of our choosing.
        let r = raw(&addr, 1000, "node-r", "vm-last", tas_op(0)).await;
        assert!(matches!(r, Reply::Won { epoch: 1, .. }), "{r:?}");
        want.insert("vm-last", (Some("node-r"), 1));
    })
    .await
    .expect("decisions took over 10 s");

    // Power cut: kill the arbiter, copy the device as it is (no sync anywhere).
    arb.kill();
    let crash = disks.path("crash.img");
    std::fs::copy(&img, &crash).expect("copy the backing file");
    let window = t_window.elapsed();
    assert!(
        window < Duration::from_secs(COMMIT_S).min(Duration::from_millis(expire_cs * 10)),
        "the crash image was taken {window:?} after the first write: ext4 may have written \
         un-fsynced data by itself (commit={COMMIT_S} s, dirty_expire_centisecs={expire_cs}), \
         so this run proves nothing"
    );
    let dev2 = disks.attach(&crash);
    let after = disks.path("after");
    disks.mount(&dev2, &after, "defaults"); // replays the journal
    let sentinel = std::fs::read(after.join("sentinel")).unwrap_or_default();
    assert_ne!(
        sentinel, SENTINEL,
        "data written without fsync is in the crash image: the image kept the page cache, \
         so it cannot show what fsync made durable"
    );
    let state2 = after.join("state");
    assert!(
        state2.join(STATE_FILE).exists(),
        "no {STATE_FILE} in the crash image: the arbiter's replies were not durable"
    );
    let addr2 = format!("127.0.0.1:{}", free_port());
    let _arb2 = ArbiterProc::start_on(&addr2, &state2);
    let (a, b, c) = (client(&addr2), client(&addr2), client(&addr2));
    timeout(Duration::from_secs(10), async {
        for (vm, (owner, epoch)) in &want {
            let info = c.read(vm).await.unwrap();
            assert_eq!(
                (info.owner.as_deref(), info.epoch),
                (*owner, *epoch),
                "{vm}: the arbiter forgot a decision it had replied to"
            );
        }
        let held = |o: TasOutcome, owner: &str| {
            assert!(
                matches!(&o, TasOutcome::Held { owner: h, .. } if h == owner),
                "expected the lease of {owner} to hold after the crash: {o:?}"
            )
        };
        let e = want["vm-retake"].1;
        held(b.test_and_set("vm-retake", "node-b", e).await.unwrap(), "node-a");
        a.renew("vm-retake", "node-a", e).await.unwrap();
        // The pairing survived: only the follower takes over, at once.
        let e = want["vm-paired"].1;
        held(c.test_and_set("vm-paired", "node-c", e).await.unwrap(), "node-a");
        let g = won(b.test_and_set("vm-paired", "node-b", e).await.unwrap(), "follower");
        assert_eq!(g, e + 1, "epoch reused");
        let e = want["vm-handover"].1;
        held(a.test_and_set("vm-handover", "node-a", e).await.unwrap(), "node-b");
        for vm in ["vm-released", "vm-race"] {
            let e = want[vm].1;
            let g = won(a.test_and_set(vm, "node-a", e).await.unwrap(), vm);
            assert_eq!(g, e + 1, "{vm}: epoch reused");
        }
        // The last request id is durable (the reply cache is not): id 1000 again is refused.
        let r = raw(&addr2, 1000, "node-r", "vm-last", Op::Release { epoch: 1 }).await;
        assert!(
            matches!(&r, Reply::Error { code: ErrorCode::StaleRequestId, message } if message == "1000"),
            "request id 1000 forgotten: {r:?}"
        );
        let r = raw(&addr2, 1001, "node-r", "vm-last", Op::Release { epoch: 1 }).await;
        assert_eq!(r, Reply::Released { epoch: 1 });
        let g = won(a.test_and_set("vm-last", "node-a", 1).await.unwrap(), "last");
        assert_eq!(g, 2, "vm-last: epoch reused");
    })
    .await
    .expect("checks after the crash took over 10 s");
    eprintln!(
        "crash image taken {window:?} after the first write; test took {:?}",
        t_test.elapsed()
    );
}

fn tas_op(expected_epoch: u64) -> Op {
    Op::TestAndSet {
        expected_epoch,
        lease_ms: 10_000,
    }
}
