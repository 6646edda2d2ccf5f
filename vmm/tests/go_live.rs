//! Go-live: a backup replays the primary's log through an in-process channel while the
//! primary serves clients; the primary stops; the backup consumes every buffered entry,
//! goes live on the same tap, and answers new clients with the state the primary had.
mod common;

use common::*;
use ft_vmm::vmlog::channel;
use ft_vmm::{Mode, RunOutcome};
use std::time::Duration;

#[test]
fn backup_goes_live_and_counter_never_goes_backwards() {
    let ns = NetNs::new("golive");
    let (sink, source) = channel(1 << 16);
    let tap = ns.open_tap();
    let primary = spawn_vmm(cfg(Mode::Record), move |v| {
        v.set_net(Box::new(tap));
        v.set_sink(Box::new(sink));
    });
    let ns_name = ns.name.clone();
    let mut bcfg = cfg(Mode::Replay);
    bcfg.wait_for_go_live = true;
    let backup = spawn_vmm(bcfg, move |v| {
        v.set_source(Box::new(source));
        v.set_net_on_live(Box::new(move || {
            let tap = ft_vmm::net::in_netns(&ns_name, || ft_vmm::net::Tap::open(TAP))?;
            Ok(Box::new(tap) as Box<dyn ft_vmm::net::NetBackend>)
        }));
    });

    ns.wait_ready(Duration::from_secs(20));
    let mut last = 0i64;
    for _ in 0..20 {
        let v: i64 = ns.redis(&["INCR", "counter"]).parse().unwrap();
        assert!(v > last);
        last = v;
    }
    ns.must(&[
        "redis-benchmark",
        "-h",
        GUEST_IP,
        "-c",
        "10",
        "-n",
        "1000",
        "-t",
        "set,get",
        "-q",
    ]);
    assert_eq!(ns.redis(&["SET", "before", "failover"]), "OK");
    let v: i64 = ns.redis(&["INCR", "counter"]).parse().unwrap();
    assert_eq!(v, last + 1);
    last = v;

    // The primary stops (its tap fd is closed when the thread ends).
    let (prec, _) = primary.stop().expect("primary run");
    assert_eq!(prec.outcome, RunOutcome::Stopped);
    // The backup may still be behind; go-live makes it drain the log first.
    backup.control.request_go_live();

    let t = std::time::Instant::now();
    let first = incr_when_up(&ns, "counter", Duration::from_secs(30));
    eprintln!(
        "backup answered after {:?}: counter {last} -> {first}",
        t.elapsed()
    );
    assert_eq!(first, last + 1, "counter went backwards or lost updates");
    assert_eq!(ns.redis(&["GET", "before"]), "failover");
    for i in 1..=5 {
        let v: i64 = ns.redis(&["INCR", "counter"]).parse().unwrap();
        assert_eq!(v, first + i);
    }
    ns.must(&[
        "redis-benchmark",
        "-h",
        GUEST_IP,
        "-c",
        "10",
        "-n",
        "500",
        "-t",
        "incr",
        "-q",
    ]);
    let (brec, _) = backup.stop().expect("backup run");
    assert_eq!(brec.outcome, RunOutcome::Stopped);
    let live_at = brec.went_live_at_exit.expect("backup went live");
    assert!(
        live_at >= prec.exits,
        "backup went live at exit {live_at} before the primary's end {}",
        prec.exits
    );
    assert_eq!(
        brec.stats.entries_consumed, prec.stats.log_entries,
        "every logged entry was consumed"
    );
    assert!(brec.stats.checkpoints_verified > 0);
}

#[test]
fn backup_goes_live_after_primary_crash_without_end() {
    let ns = NetNs::new("crash");
    let (sink, source) = channel(1 << 16);
    let cut = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let tap = ns.open_tap();
    let c2 = cut.clone();
    let primary = spawn_vmm(cfg(Mode::Record), move |v| {
        v.set_net(Box::new(tap));
        v.set_sink(Box::new(CuttableSink {
            inner: sink,
            cut: c2,
        }));
    });
    let ns_name = ns.name.clone();
    let mut bcfg = cfg(Mode::Replay);
    bcfg.wait_for_go_live = true;
    let backup = spawn_vmm(bcfg, move |v| {
        v.set_source(Box::new(source));
        v.set_net_on_live(Box::new(move || {
            let tap = ft_vmm::net::in_netns(&ns_name, || ft_vmm::net::Tap::open(TAP))?;
            Ok(Box::new(tap) as Box<dyn ft_vmm::net::NetBackend>)
        }));
    });
    ns.wait_ready(Duration::from_secs(20));
    let mut last = 0i64;
    for _ in 0..10 {
        last = ns.redis(&["INCR", "c"]).parse().unwrap();
    }
    ns.must(&[
        "redis-benchmark",
        "-h",
        GUEST_IP,
        "-c",
        "10",
        "-n",
        "500",
        "-t",
        "set",
        "-q",
    ]);
    last = last.max(ns.redis(&["INCR", "c"]).parse().unwrap());
    // Let the last replies' ACKs in, then the primary crashes: its log stops here.
    std::thread::sleep(Duration::from_millis(300));
    cut.store(true, std::sync::atomic::Ordering::SeqCst);
    let _ = primary.stop();
    backup.control.request_go_live();
    let v = incr_when_up(&ns, "c", Duration::from_secs(30));
    assert_eq!(v, last + 1, "counter after failover");
    let (brec, _) = backup.stop().expect("backup run");
    assert!(brec.went_live_at_exit.is_some());
}

/// A source whose entries are still in flight behind a moment of "nothing yet" (a live
/// channel between two batches), then closed.
struct Gappy {
    entries: std::collections::VecDeque<ft_vmm::vmlog::LogEntry>,
    gap_after: usize,
    gaps_left: u32,
    given: usize,
}

impl ft_vmm::vmlog::LogSource for Gappy {
    fn recv(&mut self, timeout: Duration) -> ft_vmm::error::Result<ft_vmm::vmlog::Recv> {
        use ft_vmm::vmlog::Recv;
        if self.given == self.gap_after && self.gaps_left > 0 {
            self.gaps_left -= 1;
            std::thread::sleep(timeout.min(Duration::from_millis(20)));
            return Ok(Recv::Empty);
        }
        Ok(match self.entries.pop_front() {
            Some(e) => {
                self.given += 1;
                Recv::Entry(e)
            }
            None => Recv::End,
        })
    }
}

/// Go-live requested before the backup has even started: it still consumes every entry
/// the source delivers, across transient empties, and goes live only at the end of the
/// (closed) source — here at the last exit the crashed primary logged.
#[test]
fn go_live_consumes_entries_queued_behind_a_transient_empty() {
    use common::synth;
    let elf = synth::guest(false, 0x4000);
    let rec = synth::record(
        &elf,
        synth::cfg(Mode::Record, false),
        synth::Trickle::new(None, 0),
        600,
    );
    let mut entries = rec.entries.clone();
    // The primary crashed before its END.
    assert_eq!(
        entries.pop().unwrap().kind(),
        ft_common::vmlog::EV_END,
        "recording ends with END"
    );
    let last_exit = entries.last().unwrap().exit();
    let n = entries.len();
    let r = with_timeout(Duration::from_secs(60), move || {
        let control = ft_vmm::Control::new();
        control.request_go_live();
        let mut c = synth::cfg(Mode::Replay, false);
        c.max_exits = Some(last_exit + 30);
        let mut vmm = ft_vmm::Vmm::new(c, &elf, control)?;
        vmm.set_source(Box::new(Gappy {
            entries: entries.into(),
            gap_after: n / 3,
            gaps_left: 5,
            given: 0,
        }));
        vmm.run()
    })
    .expect("backup run");
    assert_eq!(
        r.stats.entries_consumed, n as u64,
        "every entry the source delivered was replayed"
    );
    assert_eq!(r.went_live_at_exit, Some(last_exit));
    assert_eq!(r.outcome, RunOutcome::ExitLimit);
}
