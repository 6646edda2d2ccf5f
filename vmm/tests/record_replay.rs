//! Record the guest serving real redis-cli / redis-benchmark traffic, replay it, and check
//! identical state and output; altered or truncated logs are detected; snapshots restore.
mod common;

use common::*;
use ft_vmm::net::NetBackend;
use ft_vmm::vmlog::format::*;
use ft_vmm::vmlog::{
    FrameKey, FrameStore, LogEntry, MemFrameStore, VecSource, WriteSink, read_all,
};
use ft_vmm::{Error, Mode, RunOutcome, RunReport, Vmm};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

struct Recording {
    report: RunReport,
    tx: Vec<Vec<u8>>,
    entries: Vec<LogEntry>,
}

/// Drives traffic at a running guest: single commands, redis-benchmark, pipelining.
fn traffic(ns: &NetNs) {
    assert_eq!(ns.redis(&["SET", "k1", "hello"]), "OK");
    assert_eq!(ns.redis(&["GET", "k1"]), "hello");
    for i in 1..=3 {
        assert_eq!(ns.redis(&["INCR", "ctr"]), i.to_string());
    }
    assert_eq!(ns.redis(&["EXISTS", "k1", "nope"]), "1");
    assert_eq!(ns.redis(&["DEL", "k1"]), "1");
    assert_eq!(ns.redis(&["EXISTS", "k1"]), "0");
    assert!(ns.redis(&["NOSUCHCOMMAND"]).contains("ERR"));
    // Expiry on the device clock (replayed from the log) and INFO.
    assert_eq!(ns.redis(&["SET", "short", "x", "PX", "150"]), "OK");
    assert_eq!(ns.redis(&["SET", "long", "y", "EX", "100"]), "OK");
    assert!(ns.redis(&["INFO", "keyspace"]).contains("db0:keys="));
    let t = std::time::Instant::now();
    while ns.redis(&["EXISTS", "short"]) != "0" {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "key with PX 150 never expired"
        );
        std::thread::sleep(Duration::from_millis(30));
    }
    assert_eq!(ns.redis(&["GET", "long"]), "y");
    let out = ns.must(&[
        "redis-benchmark",
        "-h",
        GUEST_IP,
        "-c",
        "10",
        "-n",
        "2000",
        "-t",
        "set,get,incr",
        "-q",
    ]);
    assert_eq!(
        out.matches("requests per second").count(),
        3,
        "benchmark output: {out}"
    );
    let out = ns.must(&[
        "redis-benchmark",
        "-h",
        GUEST_IP,
        "-c",
        "4",
        "-n",
        "2000",
        "-P",
        "16",
        "-t",
        "set,get",
        "-q",
    ]);
    assert_eq!(
        out.matches("requests per second").count(),
        2,
        "pipelined benchmark output: {out}"
    );
    assert_eq!(ns.redis(&["INCR", "ctr"]), "4");
    // Let some timers fire while idle (delayed ACKs, TIME-WAIT, idle deadline): the
    // guest's idle deadline is at most 200 ms away and the tap carries no traffic of its
    // own (IPv6 is off on it), so at least one timer interrupt fires in this pause.
    std::thread::sleep(Duration::from_millis(600));
}

fn recording() -> &'static Recording {
    static R: OnceLock<Recording> = OnceLock::new();
    R.get_or_init(|| {
        let ns = NetNs::new("rec");
        let log = PathBuf::from(format!("/tmp/ftvmm-test-{}.log", std::process::id()));
        let tap = ns.open_tap();
        let sink = WriteSink::create(&log).unwrap();
        let t = spawn_vmm(cfg(Mode::Record), move |v| {
            v.set_net(Box::new(tap));
            v.set_sink(Box::new(sink));
        });
        ns.wait_ready(Duration::from_secs(20));
        traffic(&ns);
        let (report, tx) = t.stop().expect("record run");
        let entries = read_all(&log).unwrap();
        let _ = std::fs::remove_file(&log);
        Recording {
            report,
            tx,
            entries,
        }
    })
}

fn replay(
    entries: Vec<LogEntry>,
    store: Option<MemFrameStore>,
) -> Result<(RunReport, Vec<Vec<u8>>), Error> {
    with_timeout(Duration::from_secs(60), move || {
        let mut vmm = Vmm::new(cfg(Mode::Replay), ft_vmm::GUEST_ELF, ft_vmm::Control::new())?;
        vmm.set_source(Box::new(VecSource::new(entries)));
        if let Some(s) = store {
            vmm.set_frame_store(Arc::new(s));
        }
        let r = vmm.run()?;
        Ok((r, vmm.captured_tx().unwrap().to_vec()))
    })
}

fn count(entries: &[LogEntry], kind: u8) -> usize {
    entries.iter().filter(|e| e.kind() == kind).count()
}

#[test]
fn replay_reproduces_state_and_output() {
    let rec = recording();
    let e = &rec.entries;
    assert_eq!(rec.report.outcome, RunOutcome::Stopped);
    assert!(count(e, EV_CLOCK) > 100, "clock reads logged");
    assert_eq!(count(e, EV_ENTROPY), 1, "entropy read logged");
    assert!(count(e, EV_RX_FRAME) > 1000, "received frames logged");
    // The guest polls its NIC (no NIC interrupts) and takes the timer interrupt for its
    // housekeeping ticks.
    assert!(rec.report.stats.timer_irqs > 0, "{:?}", rec.report.stats);
    assert_eq!(count(e, EV_IRQ) as u64, rec.report.stats.irqs_injected);
    assert!(count(e, EV_CHECKPOINT) > 0);
    assert_eq!(e.last().unwrap().kind(), EV_END);

    let (r, tx) = replay(e.clone(), None).expect("replay");
    assert_eq!(r.outcome, RunOutcome::ReplayComplete);
    assert_eq!(r.exits, rec.report.exits);
    assert_eq!(r.regs_hash, rec.report.regs_hash, "register hash");
    assert_eq!(r.mem_hash, rec.report.mem_hash, "memory hash");
    assert_eq!(r.state_hash, rec.report.state_hash);
    assert_eq!(r.tx_frames, rec.report.tx_frames);
    assert_eq!(r.tx_hash, rec.report.tx_hash);
    assert_eq!(tx.len(), rec.tx.len());
    assert!(tx == rec.tx, "replayed output differs from recorded output");
    assert!(r.stats.checkpoints_verified as usize >= count(e, EV_CHECKPOINT));
    assert_eq!(r.stats.entries_consumed as usize, e.len());
}

fn expect_divergence(entries: Vec<LogEntry>, what: &str) {
    match replay(entries, None) {
        Err(Error::Divergence { exit, what: w, .. }) => {
            eprintln!("{what}: divergence at exit {exit}: {w}")
        }
        Err(other) => panic!("{what}: expected a divergence, got error: {other}"),
        Ok((r, _)) => panic!(
            "{what}: altered log replayed without error ({:?})",
            r.outcome
        ),
    }
}

#[test]
fn altered_log_is_detected() {
    let rec = recording();
    let e = &rec.entries;
    // Entropy value (smoltcp seed): different ISNs -> different memory.
    let mut v = e.clone();
    let i = v.iter().position(|x| x.kind() == EV_ENTROPY).unwrap();
    let nv = v[i].value() ^ 1;
    v[i].hdr.value.set(nv);
    expect_divergence(v, "entropy");
    // A clock value in the middle of the run.
    let mut v = e.clone();
    let clocks: Vec<usize> = (0..v.len()).filter(|&i| v[i].kind() == EV_CLOCK).collect();
    let i = clocks[clocks.len() / 2];
    let nv = v[i].value() + 3_000_000_000;
    v[i].hdr.value.set(nv);
    expect_divergence(v, "clock");
    // One byte of the last received frame.
    let mut v = e.clone();
    let i = v.iter().rposition(|x| x.kind() == EV_RX_FRAME).unwrap();
    let n = v[i].payload.len();
    v[i].payload[n - 1] ^= 0x55;
    expect_divergence(v, "rx frame byte");
    // A delivery point moved by one exit.
    let mut v = e.clone();
    let i = v.iter().position(|x| x.kind() == EV_IRQ).unwrap();
    let nv = v[i].exit() + 1;
    v[i].hdr.exit.set(nv);
    expect_divergence(v, "irq delivery point");
    // A checkpoint value.
    let mut v = e.clone();
    let i = v.iter().position(|x| x.kind() == EV_CHECKPOINT).unwrap();
    let nv = v[i].value() ^ 0xff;
    v[i].hdr.value.set(nv);
    expect_divergence(v, "checkpoint value");
}

#[test]
fn truncated_log_is_detected() {
    let rec = recording();
    let e = &rec.entries;
    let v = e[..e.len() * 2 / 3].to_vec();
    match replay(v, None) {
        Err(Error::LogTruncated {
            after_exit,
            torn_bytes: 0,
        }) => assert!(after_exit > 0),
        other => panic!(
            "expected LogTruncated, got {:?}",
            other.map(|r| r.0.outcome)
        ),
    }
    // A log file cut in the middle of an entry (the primary died mid-write): the log
    // ends before that entry — truncated, not corrupt — and a backup can go live there.
    let path = PathBuf::from(format!("/tmp/ftvmm-trunc-{}.log", std::process::id()));
    ft_vmm::vmlog::write_all(&path, &e[..100]).unwrap();
    let len = std::fs::metadata(&path).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(len - 7).unwrap();
    let torn = e[99].wire_len() as u64 - 7;
    let last_whole_exit = e[98].exit();
    for go_live in [false, true] {
        let t0 = std::time::Instant::now();
        let r = with_timeout(Duration::from_secs(120), {
            let path = path.clone();
            move || {
                let mut c = cfg(Mode::Replay);
                c.go_live_at_end = go_live;
                let mut vmm = Vmm::new(c, ft_vmm::GUEST_ELF, ft_vmm::Control::new())?;
                vmm.set_source(Box::new(ft_vmm::vmlog::ReadSource::open(&path)?));
                if go_live {
                    vmm.set_max_exits(Some(last_whole_exit + 20));
                }
                vmm.run()
            }
        });
        eprintln!("go_live {go_live}: {:?}", t0.elapsed());
        match r {
            Err(Error::LogTruncated {
                after_exit,
                torn_bytes,
            }) if !go_live => {
                assert_eq!(torn_bytes, torn);
                assert!(after_exit >= last_whole_exit, "{after_exit}");
            }
            Ok(r) if go_live => {
                let at = r.went_live_at_exit.expect("went live");
                assert!(at >= last_whole_exit, "went live at {at}");
                assert_eq!(r.stats.entries_consumed, 99, "every whole entry");
            }
            other => panic!(
                "go_live {go_live}: expected the end of the log at the torn entry, got {:?}",
                other.map(|r| r.outcome)
            ),
        }
    }
    let _ = std::fs::remove_file(&path);
    // A complete entry that cannot be valid is corruption.
    ft_vmm::vmlog::write_all(&path, &e[..100]).unwrap();
    let mut bytes = std::fs::read(&path).unwrap();
    let at: usize = e[..50].iter().map(|x| x.wire_len()).sum();
    bytes[at] = 0xEE; // kind
    std::fs::write(&path, &bytes).unwrap();
    let r = with_timeout(Duration::from_secs(30), {
        let path = path.clone();
        move || {
            let mut vmm = Vmm::new(cfg(Mode::Replay), ft_vmm::GUEST_ELF, ft_vmm::Control::new())?;
            vmm.set_source(Box::new(ft_vmm::vmlog::ReadSource::open(&path)?));
            vmm.run()
        }
    });
    let _ = std::fs::remove_file(&path);
    match r {
        Err(Error::LogCorrupt { offset, .. }) => assert_eq!(offset, at as u64),
        other => panic!("expected LogCorrupt, got {:?}", other.map(|r| r.outcome)),
    }
    // A log from another configuration.
    let mut v = e.clone();
    let nv = v[0].value() ^ 1;
    v[0].hdr.value.set(nv);
    assert!(matches!(
        replay(v, None),
        Err(Error::LogConfigMismatch { .. })
    ));
}

#[test]
fn snapshot_mid_run_restores_identically() {
    let rec = recording();
    let entries = rec.entries.clone();
    let half = rec.report.exits / 2;
    let (snap, a) = with_timeout(Duration::from_secs(60), move || {
        let mut cfg = cfg(Mode::Replay);
        cfg.capture_tx = false;
        let mut vmm = Vmm::new(cfg, ft_vmm::GUEST_ELF, ft_vmm::Control::new()).unwrap();
        vmm.set_source(Box::new(VecSource::new(entries)));
        vmm.set_max_exits(Some(half));
        assert_eq!(vmm.run().unwrap().outcome, RunOutcome::ExitLimit);
        let mut snap = Vec::new();
        vmm.snapshot(&mut snap).unwrap();
        vmm.set_max_exits(None);
        let a = vmm.run().unwrap();
        // Incremental transfer: the pages dirtied since the snapshot, applied to the
        // snapshot image, give the final memory.
        let pages = vmm.take_dirty_pages().unwrap();
        let mut delta = Vec::new();
        vmm.write_pages(&pages, &mut delta).unwrap();
        let mut patched = snap.clone();
        let off = ft_vmm::snapshot::ram_offset(&patched, ft_vmm::abi::RAM_DEFAULT).unwrap();
        let n = ft_vmm::snapshot::apply_pages(&mut patched, off, &mut delta.as_slice()).unwrap();
        assert!(n > 0 && n < 8192, "{n} dirty pages");
        let mut c = common::cfg(Mode::Free);
        c.capture_tx = false;
        let mut restored = Vmm::restore(
            c,
            ft_vmm::GUEST_ELF,
            ft_vmm::Control::new(),
            &mut patched.as_slice(),
        )
        .unwrap();
        assert_eq!(
            restored.state_hash(true).unwrap().2,
            a.mem_hash,
            "RAM after applying the dirty-page delta"
        );
        (snap, a)
    });
    assert_eq!(a.outcome, RunOutcome::ReplayComplete);
    let entries = rec.entries.clone();
    let b = with_timeout(Duration::from_secs(60), move || {
        let mut cfg = cfg(Mode::Replay);
        cfg.capture_tx = false;
        let mut vmm = Vmm::restore(
            cfg,
            ft_vmm::GUEST_ELF,
            ft_vmm::Control::new(),
            &mut snap.as_slice(),
        )
        .unwrap();
        assert_eq!(vmm.exits(), half);
        let mut src = VecSource::new(entries);
        vmm.skip_consumed(&mut src).unwrap();
        vmm.set_source(Box::new(src));
        vmm.run().unwrap()
    });
    assert_eq!(b.outcome, RunOutcome::ReplayComplete);
    assert_eq!(a.state_hash, b.state_hash);
    assert_eq!(b.state_hash, rec.report.state_hash);
    assert_eq!(a.tx_hash, b.tx_hash);
    assert_eq!(b.tx_hash, rec.report.tx_hash);
    assert_eq!(b.exits, rec.report.exits);
}

const TAG_EPOCH: u64 = 3;

/// Simulates the data plane in "tagged input" mode: every inbound frame is prefixed with
/// the 46-byte LogHdr carrying its log sequence, and kept in the data plane's store.
struct TaggingTap {
    inner: ft_vmm::net::Tap,
    store: MemFrameStore,
    seq: u64,
    buf: Vec<u8>,
}

impl NetBackend for TaggingTap {
    fn recv(&mut self, buf: &mut [u8]) -> ft_vmm::error::Result<Option<usize>> {
        use ft_common::wire::*;
        use zerocopy::IntoBytes;
        let Some(n) = self.inner.recv(&mut self.buf)? else {
            return Ok(None);
        };
        self.seq += 1;
        let mut ft = FtHdr::new(KIND_LOG, 0x5e55, TAG_EPOCH, self.seq);
        ft.len.set(n as u16);
        let hdr = LogHdr {
            eth: EthHdr {
                dst: [0xff; 6],
                src: [2, 0, 0, 0, 0, 0x99],
                ethertype: ETHERTYPE_FT.into(),
            },
            ft,
        };
        buf[..LOG_OVERHEAD].copy_from_slice(hdr.as_bytes());
        buf[LOG_OVERHEAD..LOG_OVERHEAD + n].copy_from_slice(&self.buf[..n]);
        let key = FrameKey {
            epoch: TAG_EPOCH,
            seq: self.seq,
        };
        self.store.put(key, &self.buf[..n]);
        Ok(Some(LOG_OVERHEAD + n))
    }
    fn send(&mut self, frame: &[u8]) -> ft_vmm::error::Result<()> {
        self.inner.send(frame)
    }
    fn poll_fd(&self) -> Option<std::os::fd::RawFd> {
        self.inner.poll_fd()
    }
}

#[test]
fn tagged_input_logs_sequence_numbers() {
    let ns = NetNs::new("tag");
    let store = MemFrameStore::default();
    let log = PathBuf::from(format!("/tmp/ftvmm-tag-{}.log", std::process::id()));
    let backend = TaggingTap {
        inner: ns.open_tap(),
        store: store.clone(),
        seq: 0,
        buf: vec![0; 65536],
    };
    let sink = WriteSink::create(&log).unwrap();
    let mut c = cfg(Mode::Record);
    c.tagged_input = true;
    let t = spawn_vmm(c, move |v| {
        v.set_net(Box::new(backend));
        v.set_sink(Box::new(sink));
    });
    ns.wait_ready(Duration::from_secs(20));
    assert_eq!(ns.redis(&["SET", "t", "tagged"]), "OK");
    ns.must(&[
        "redis-benchmark",
        "-h",
        GUEST_IP,
        "-c",
        "4",
        "-n",
        "300",
        "-t",
        "set,incr",
        "-q",
    ]);
    assert_eq!(ns.redis(&["GET", "t"]), "tagged");
    let (rec, rec_tx) = t.stop().unwrap();
    drop(ns);
    let entries = read_all(&log).unwrap();
    let _ = std::fs::remove_file(&log);
    assert_eq!(count(&entries, EV_RX_FRAME), 0);
    assert!(count(&entries, EV_RX_FRAME_REF) as u64 == rec.rx_frames && rec.rx_frames > 100);
    let ref_bytes: usize = entries.iter().map(|e| e.wire_len()).sum();
    eprintln!(
        "tagged log: {} entries, {ref_bytes} bytes for {} frames",
        entries.len(),
        rec.rx_frames
    );
    let first = entries
        .iter()
        .find(|e| e.kind() == EV_RX_FRAME_REF)
        .unwrap();
    assert_eq!(first.frame_key().unwrap().epoch, TAG_EPOCH, "epoch logged");
    let held = store.len();
    let (r, tx) = replay(entries.clone(), Some(store.clone())).expect("replay with frame store");
    assert_eq!(r.outcome, RunOutcome::ReplayComplete);
    assert_eq!(r.state_hash, rec.state_hash);
    assert!(tx == rec_tx);
    // Replay evicted what it delivered.
    assert!(held as u64 >= rec.rx_frames);
    assert!(store.len() < held, "{} of {held} frames left", store.len());
    // Without the frames (the store abandoned) the replay stops with a clear error.
    let empty = MemFrameStore::default();
    empty.close();
    match replay(entries, Some(empty)) {
        Err(e @ Error::FrameMissing { .. }) => eprintln!("{e}"),
        other => panic!(
            "expected FrameMissing, got {:?}",
            other.map(|r| r.0.outcome)
        ),
    }
}
