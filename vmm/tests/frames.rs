//! Tagged input on the backup: RX_FRAME_REF entries name frames by (epoch, sequence) in
//! a frame store that the daemon fills from the logging link, separately from the log.
//! A reference waits for its frame (stop and go-live requests still work while it
//! waits), only a closed store or the configured timeout is `FrameMissing`, and a long
//! replay keeps the store small.
mod common;

use common::synth::{self, Trickle};
use common::with_timeout;
use ft_vmm::vmlog::format::EV_RX_FRAME_REF;
use ft_vmm::vmlog::{FrameKey, FrameStore, LogEntry, MemFrameStore, VecSource};
use ft_vmm::{Control, Error, Mode, RunOutcome, RunReport, Vmm, VmmConfig};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

const EPOCH: u64 = 7;

struct Rec {
    elf: Vec<u8>,
    entries: Vec<LogEntry>,
    sent: BTreeMap<FrameKey, Vec<u8>>,
    report: RunReport,
}

fn recording(exits: u64, skip_every: u64) -> Rec {
    let elf = synth::guest(false, 0x4000);
    let r = synth::record(
        &elf,
        synth::cfg(Mode::Record, true),
        Trickle::new(Some(EPOCH), skip_every),
        exits,
    );
    let sent = r.sent.lock().unwrap().clone();
    assert!(
        r.report.rx_frames * 3 > exits,
        "frames delivered: {:?}",
        r.report
    );
    Rec {
        elf,
        entries: r.entries,
        sent,
        report: r.report,
    }
}

fn refs(entries: &[LogEntry]) -> Vec<(usize, FrameKey)> {
    entries
        .iter()
        .enumerate()
        .filter(|(_, e)| e.kind() == EV_RX_FRAME_REF)
        .map(|(i, e)| (i, e.frame_key().expect("epoch in the entry")))
        .collect()
}

fn replay(
    rec: &Rec,
    store: &MemFrameStore,
    control: Arc<Control>,
    tweak: impl FnOnce(&mut VmmConfig) + Send + 'static,
) -> Result<RunReport, Error> {
    let (elf, entries, store) = (rec.elf.clone(), rec.entries.clone(), store.clone());
    with_timeout(Duration::from_secs(60), move || {
        let mut c = synth::cfg(Mode::Replay, true);
        tweak(&mut c);
        let mut vmm = Vmm::new(c, &elf, control)?;
        vmm.set_source(Box::new(VecSource::new(entries)));
        vmm.set_frame_store(Arc::new(store));
        vmm.run()
    })
}

fn after(ms: u64, f: impl FnOnce() + Send + 'static) {
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(ms));
        f()
    });
}

#[test]
fn reference_waits_for_its_frame() {
    let rec = recording(600, 0);
    assert!(refs(&rec.entries).len() > 150);
    let store = MemFrameStore::default();
    // The frames arrive 300 ms after the log (another stream on the logging link).
    let (s, sent) = (store.clone(), rec.sent.clone());
    after(300, move || {
        for (k, f) in sent {
            s.put(k, &f);
        }
    });
    let t = Instant::now();
    let r = replay(&rec, &store, Control::new(), |_| {}).expect("replay waits for its frames");
    assert!(
        t.elapsed() >= Duration::from_millis(250),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(r.outcome, RunOutcome::ReplayComplete);
    assert_eq!(r.state_hash, rec.report.state_hash);
    assert!(r.stats.frame_waits >= 1, "{:?}", r.stats);
}

#[test]
fn go_live_while_a_frame_is_missing_goes_live_at_its_exit() {
    let rec = recording(600, 0);
    let all = refs(&rec.entries);
    let (idx, missing) = all[all.len() / 2];
    let exit = rec.entries[idx].exit();
    let store = MemFrameStore::default();
    for (k, f) in &rec.sent {
        if *k != missing {
            store.put(*k, f);
        }
    }
    let control = Control::new();
    let c = control.clone();
    after(300, move || c.request_go_live());
    let r = replay(&rec, &store, control, move |c| {
        c.max_exits = Some(exit + 50)
    })
    .expect("goes live instead of failing");
    assert_eq!(
        r.went_live_at_exit,
        Some(exit),
        "live at the missing frame's exit"
    );
    assert_eq!(
        r.stats.entries_consumed, idx as u64,
        "everything before the missing frame's entry, nothing from it on"
    );
    assert!(r.stats.frame_waits >= 1);
    assert_eq!(r.outcome, RunOutcome::ExitLimit);
    assert_eq!(r.exits, exit + 50, "runs on live");
}

#[test]
fn stop_while_waiting_for_a_frame_ends_the_run() {
    let rec = recording(300, 0);
    let store = MemFrameStore::default(); // never filled, never closed
    let control = Control::new();
    let c = control.clone();
    after(200, move || c.request_stop());
    let r = replay(&rec, &store, control, |_| {}).expect("stopped, not an error");
    assert_eq!(r.outcome, RunOutcome::Stopped);
    assert!(r.stats.frame_waits >= 1);
    assert!(r.went_live_at_exit.is_none());
}

#[test]
fn frame_missing_only_when_the_store_is_closed_or_after_the_timeout() {
    let rec = recording(300, 0);
    let first = refs(&rec.entries)[0].1;
    // Timeout: not before it.
    let store = MemFrameStore::default();
    let t = Instant::now();
    match replay(&rec, &store, Control::new(), |c| {
        c.frame_wait_timeout = Some(Duration::from_millis(400))
    }) {
        Err(e @ Error::FrameMissing { .. }) => {
            assert!(
                t.elapsed() >= Duration::from_millis(400),
                "{:?}",
                t.elapsed()
            );
            assert!(e.to_string().contains("frame_wait_timeout"), "{e}");
            let Error::FrameMissing { key, .. } = e else {
                unreachable!()
            };
            assert_eq!(key, first);
        }
        other => panic!("expected FrameMissing, got {:?}", other.map(|r| r.outcome)),
    }
    // A store the daemon closes: at once, long before the (default) timeout.
    let store = MemFrameStore::default();
    let s = store.clone();
    after(200, move || s.close());
    let t = Instant::now();
    match replay(&rec, &store, Control::new(), |_| {}) {
        Err(e @ Error::FrameMissing { .. }) => {
            assert!(e.to_string().contains("closed"), "{e}");
            assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        }
        other => panic!("expected FrameMissing, got {:?}", other.map(|r| r.outcome)),
    }
}

/// A frame the input stream skipped (a backup that acked input it never received: the
/// stream's start moved past it) can never come: a store fed in order tells the replay
/// so, which fails at once and names the frame instead of waiting for ever (no timeout
/// is set).
#[test]
fn a_frame_the_input_stream_skipped_fails_the_replay_at_once() {
    let rec = recording(300, 0);
    let first = refs(&rec.entries)[0].1;
    let store = MemFrameStore::in_order();
    for (key, f) in rec.sent.iter().filter(|(k, _)| **k != first) {
        store.put(*key, f);
    }
    let t = Instant::now();
    match replay(&rec, &store, Control::new(), |c| {
        c.frame_wait_timeout = None
    }) {
        Err(e @ Error::FrameMissing { .. }) => {
            assert!(e.to_string().contains("never received"), "{e}");
            let Error::FrameMissing { key, .. } = e else {
                unreachable!()
            };
            assert_eq!(key, first);
            assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
        }
        other => panic!("expected FrameMissing, got {:?}", other.map(|r| r.outcome)),
    }
}

/// The daemon keeps at most 64 frames ahead of the replay (it would run out of memory
/// otherwise); a replay that does not evict what it consumed — and frames the primary's
/// VM never got, which are never referenced — stalls and fails.
#[test]
fn long_replay_keeps_the_frame_store_small() {
    const LIMIT: usize = 64;
    const WINDOW: u64 = 16;
    let rec = recording(4000, 10);
    let frames = rec.sent.len();
    let unreferenced = frames - refs(&rec.entries).len();
    assert!(
        frames > 3000 && unreferenced > 250,
        "{frames} / {unreferenced}"
    );
    let store = MemFrameStore::default();
    let (s, sent) = (store.clone(), rec.sent.clone());
    let feeder = std::thread::spawn(move || {
        let t = Instant::now();
        for (k, f) in sent {
            while s.len() >= LIMIT {
                if t.elapsed() > Duration::from_secs(20) {
                    return false;
                }
                std::thread::sleep(Duration::from_micros(100));
            }
            s.put(k, &f);
        }
        true
    });
    let r = replay(&rec, &store, Control::new(), |c| {
        c.frame_reorder_window = WINDOW;
        c.frame_wait_timeout = Some(Duration::from_secs(3));
    })
    .expect("replay with a bounded frame store");
    assert!(feeder.join().unwrap(), "the feeder never stalled");
    assert_eq!(r.outcome, RunOutcome::ReplayComplete);
    assert_eq!(r.state_hash, rec.report.state_hash);
    eprintln!(
        "{frames} frames ({unreferenced} never referenced): peak {} held, {} left",
        store.peak_len(),
        store.len()
    );
    assert!(store.peak_len() <= LIMIT);
    assert!(
        store.len() as u64 <= WINDOW,
        "{} frames left after the replay",
        store.len()
    );
}
