//! Live state transfer: a VM serving clients (free running, as a primary that lost its
//! backup) sends its state to a new VMM while the clients go on; at the cut it starts a
//! new log, which the new VMM replays. When the source stops, the replica's final state
//! (RAM, registers, devices, output) is verified equal to the source's.
mod common;

use common::*;
use ft_vmm::transfer::{Progress, TransferOptions, TransferReport, TransferSource};
use ft_vmm::vmlog::{ChannelSource, channel};
use ft_vmm::{Control, Mode, RunOutcome, RunReport, Vmm};
use std::io::Read;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;
use std::time::Duration;

/// The source VM on a tap in `ns`, free running, and its transfer handle.
fn source(ns: &NetNs) -> (VmmThread, TransferSource) {
    let tap = ns.open_tap();
    let (tx, rx) = mpsc::channel();
    let vm = spawn_vmm(cfg(Mode::Free), move |v| {
        v.set_net(Box::new(tap));
        tx.send(v.transfer_source()).unwrap();
    });
    let src = rx.recv_timeout(Duration::from_secs(20)).unwrap();
    ns.wait_ready(Duration::from_secs(20));
    (vm, src)
}

/// A reader that fails once `cut` is set (the link breaks).
struct Cuttable {
    inner: UnixStream,
    cut: Arc<AtomicBool>,
}

impl Read for Cuttable {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.cut.load(Ordering::SeqCst) {
            return Err(std::io::Error::other("link cut"));
        }
        self.inner.read(buf)
    }
}

/// Receives on a thread; `cut_when(progress)` true breaks the link there.
fn receiver(
    stream: UnixStream,
    cut_when: impl Fn(&Progress) -> bool + Send + 'static,
) -> JoinHandle<ft_vmm::error::Result<(Vmm, TransferReport)>> {
    receiver_with(stream, false, cut_when)
}

fn receiver_with(
    stream: UnixStream,
    wait_for_go_live: bool,
    cut_when: impl Fn(&Progress) -> bool + Send + 'static,
) -> JoinHandle<ft_vmm::error::Result<(Vmm, TransferReport)>> {
    std::thread::spawn(move || {
        let cut = Arc::new(AtomicBool::new(false));
        let mut r = Cuttable {
            inner: stream,
            cut: cut.clone(),
        };
        let mut bcfg = cfg(Mode::Replay);
        bcfg.wait_for_go_live = wait_for_go_live;
        let res = Vmm::receive(
            bcfg,
            ft_vmm::GUEST_ELF,
            Control::new(),
            &mut r,
            None,
            &mut |p| {
                if cut_when(p) {
                    cut.store(true, Ordering::SeqCst);
                }
            },
        );
        // Closing the stream is what the source sees of a dead receiver.
        drop(r);
        res
    })
}

/// Runs the received VMM's replay of `log` on a thread.
fn replay(mut vmm: Vmm, log: ChannelSource) -> JoinHandle<ft_vmm::error::Result<RunReport>> {
    std::thread::spawn(move || {
        vmm.set_source(Box::new(log));
        vmm.run()
    })
}

/// 20,000 SETs of 64 bytes over 50,000 keys: state worth transferring.
fn preload(ns: &NetNs) {
    ns.must(&[
        "redis-benchmark",
        "-h",
        GUEST_IP,
        "-c",
        "10",
        "-n",
        "20000",
        "-r",
        "50000",
        "-d",
        "64",
        "-t",
        "set",
        "-q",
    ]);
}

/// One transfer from `src` into `stream` with default options and no cut hook; the
/// new log goes to `sink`.
fn transfer(
    src: &TransferSource,
    stream: UnixStream,
    sink: impl ft_vmm::vmlog::LogSink + 'static,
) -> ft_vmm::error::Result<TransferReport> {
    src.send(
        Box::new(stream),
        Box::new(sink),
        None,
        &TransferOptions::default(),
        &mut |_| {},
    )
}

fn incr(ns: &NetNs, key: &str) -> i64 {
    ns.redis(&["INCR", key]).parse().unwrap()
}

/// Clients write through the whole transfer (`redis-benchmark` SETs over 50,000 keys).
fn load(ns: &NetNs) -> JoinHandle<()> {
    let name = ns.name.clone();
    std::thread::spawn(move || {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &name, "redis-benchmark", "-h", GUEST_IP])
            .args(["-c", "20", "-n", "40000", "-r", "50000", "-d", "64"])
            .args(["-t", "set,incr", "-q"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    })
}

#[test]
fn a_live_transfer_makes_a_replica_that_ends_in_the_same_state() {
    with_timeout(Duration::from_secs(240), || {
        let ns = NetNs::new("xfer");
        let (vm, src) = source(&ns);
        preload(&ns);
        let before = incr(&ns, "counter");
        let clients = load(&ns);
        let (a, b) = UnixStream::pair().unwrap();
        let rx = receiver(b, |_| false);
        let (sink, log) = channel(1 << 16);
        let mut progress = Vec::new();
        let rep = src
            .send(
                Box::new(a),
                Box::new(sink),
                None,
                &TransferOptions::default(),
                &mut |p| progress.push(p.clone()),
            )
            .expect("transfer");
        let (replica, got) = rx.join().unwrap().expect("receive");
        eprintln!(
            "sent: {rep:?}\nreceived: {got:?}\n{} progress reports",
            progress.len()
        );
        assert_eq!(got.cut_exit, rep.cut_exit);
        assert_eq!(got.bytes_sent, rep.bytes_sent);
        assert!(rep.pause < rep.total);
        assert!(progress.iter().any(|p| p.round >= 1), "no pre-copy round");
        let backup = replay(replica, log);
        clients.join().unwrap();
        assert_eq!(incr(&ns, "counter"), before + 1, "the source serves on");
        let (prec, _) = vm.stop().expect("source run");
        assert_eq!(prec.outcome, RunOutcome::Stopped);
        let brec = backup.join().unwrap().expect("replay");
        assert_eq!(brec.outcome, RunOutcome::ReplayComplete);
        assert_eq!(brec.exits, prec.exits);
        assert_eq!(brec.state_hash, prec.state_hash, "replica state differs");
        assert_eq!(brec.tx_hash, prec.tx_hash);
        // Every checkpoint the source made after the cut (it ran free before it), and
        // its END, were verified (how many the load reached depends on the machine).
        assert_eq!(
            brec.stats.checkpoints_verified,
            prec.stats.checkpoints + 1,
            "{:?} / {:?}",
            brec.stats,
            prec.stats
        );
        assert_eq!(brec.stats.entries_consumed, prec.stats.log_entries);
    });
}

/// A transfer broken during pre-copy, then one broken in the stop phase: each time the
/// source serves on (unprotected, as before) and the next transfer succeeds.
#[test]
fn an_interrupted_transfer_leaves_the_source_serving_and_a_retry_succeeds() {
    with_timeout(Duration::from_secs(240), || {
        let ns = NetNs::new("xfercut");
        let (vm, src) = source(&ns);
        preload(&ns);
        let mut n = incr(&ns, "counter");
        // 1. The receiver dies half-way through the first pass.
        let (a, b) = UnixStream::pair().unwrap();
        let rx = receiver(b, |p| p.pages_sent > 1000);
        let (sink, _log) = channel(1 << 16);
        let e = transfer(&src, a, sink).expect_err("the receiver died");
        eprintln!("pre-copy cut: {e}");
        assert!(rx.join().unwrap().is_err());
        n += 1;
        assert_eq!(incr(&ns, "counter"), n);
        // 2. The link breaks once the stop phase's pages arrive: the source may have
        //    finished (its writes were buffered) and cut over to a log nobody reads; the
        //    daemon, seeing no receiver, abandons it.
        let (a, b) = UnixStream::pair().unwrap();
        let rx = receiver(b, |p| p.round == u32::MAX);
        let (sink, _log) = channel(1 << 16);
        let r = transfer(&src, a, sink);
        assert!(rx.join().unwrap().is_err());
        if r.is_ok() {
            assert!(src.abandon());
        }
        n += 1;
        assert_eq!(incr(&ns, "counter"), n);
        // 3. A retry succeeds, and the replica ends in the source's state.
        let (a, b) = UnixStream::pair().unwrap();
        let rx = receiver(b, |_| false);
        let (sink, log) = channel(1 << 16);
        let rep = transfer(&src, a, sink).expect("retry");
        let (replica, _) = rx.join().unwrap().expect("receive");
        let backup = replay(replica, log);
        n += 1;
        assert_eq!(incr(&ns, "counter"), n);
        let (prec, _) = vm.stop().expect("source run");
        let brec = backup.join().unwrap().expect("replay");
        eprintln!("retry: {rep:?}");
        assert_eq!(brec.outcome, RunOutcome::ReplayComplete);
        assert_eq!(brec.state_hash, prec.state_hash, "replica state differs");
    });
}

/// A receiver configured for another guest, or another RAM size, is refused with an
/// error that names the mismatch; the source serves on.
#[test]
fn a_receiver_of_another_configuration_is_refused() {
    with_timeout(Duration::from_secs(120), || {
        let ns = NetNs::new("xferbad");
        let (vm, src) = source(&ns);
        let (a, mut b) = UnixStream::pair().unwrap();
        let rx = std::thread::spawn(move || {
            let mut c = cfg(Mode::Replay);
            c.ram_size *= 2;
            Vmm::receive(
                c,
                ft_vmm::GUEST_ELF,
                Control::new(),
                &mut b,
                None,
                &mut |_| {},
            )
            .err()
            .map(|e| e.to_string())
        });
        let (sink, _log) = channel(16);
        let _ = transfer(&src, a, sink);
        let e = rx.join().unwrap().expect("refused");
        assert!(e.contains("configuration hash") || e.contains("RAM"), "{e}");
        assert_eq!(incr(&ns, "c"), 1);
        vm.stop().unwrap();
    });
}

/// Failover after failover at the VMM level, three times: the live VM makes a new
/// backup by state transfer, clients go on, the live VM dies (its log cut mid-stream, no
/// END), the backup consumes what it holds and goes live on the same TAP, and becomes the
/// source of the next transfer. The counter never goes backwards and loses nothing.
#[test]
fn failover_after_failover_by_state_transfer() {
    with_timeout(Duration::from_secs(300), || {
        let ns = NetNs::new("xferff");
        let (mut live, mut src) = source(&ns);
        let mut counter = incr(&ns, "counter");
        for round in 1..=3 {
            let (a, b) = UnixStream::pair().unwrap();
            let rx = receiver_with(b, true, |_| false);
            let (sink, log) = channel(1 << 16);
            let cut = Arc::new(AtomicBool::new(false));
            let sink = CuttableSink {
                inner: sink,
                cut: cut.clone(),
            };
            let clients = load(&ns);
            let rep = transfer(&src, a, sink).expect("transfer");
            let (mut replica, _) = rx.join().unwrap().expect("receive");
            eprintln!("round {round}: {rep:?}");
            let next_src = replica.transfer_source();
            let ns_name = ns.name.clone();
            replica.set_net_on_live(Box::new(move || {
                let tap = ft_vmm::net::in_netns(&ns_name, || ft_vmm::net::Tap::open(TAP))?;
                Ok(Box::new(tap) as Box<dyn ft_vmm::net::NetBackend>)
            }));
            let control = replica.control().clone();
            let handle = std::thread::spawn(move || {
                replica.set_source(Box::new(log));
                let r = replica.run()?;
                Ok((r, Vec::new()))
            });
            let backup = VmmThread { control, handle };
            clients.join().unwrap();
            for _ in 0..20 {
                let v = incr(&ns, "counter");
                assert_eq!(v, counter + 1);
                counter = v;
            }
            // The live VM dies: nothing more reaches the backup, then it stops (its TAP
            // is released).
            cut.store(true, Ordering::SeqCst);
            let (dead, _) = live.stop().expect("live VM run");
            backup.control.request_go_live();
            let v = incr_when_up(&ns, "counter", Duration::from_secs(30));
            // Every INCR a client saw was logged before the cut (the VM flushes its log
            // before it waits for input), so the replica continues exactly after it.
            assert_eq!(
                v,
                counter + 1,
                "round {round}: counter went from {counter} to {v}"
            );
            eprintln!(
                "round {round}: the dead VM ran {} exits, the replica went live; counter {counter} -> {v}",
                dead.exits
            );
            counter = v;
            live = backup;
            src = next_src;
        }
        let (last, _) = live.stop().expect("last VM run");
        assert!(last.went_live_at_exit.is_some());
    });
}

/// A real transfer stream (a running source into memory) with bytes flipped or cut
/// short: the receiver builds a replica or refuses with an error; it never panics.
#[test]
fn a_damaged_transfer_stream_is_refused_not_a_crash() {
    use proptest::prelude::*;
    let stream = with_timeout(Duration::from_secs(120), || {
        let ns = NetNs::new("xferfuzz");
        let (vm, src) = source(&ns);
        let (a, mut b) = UnixStream::pair().unwrap();
        let reader = std::thread::spawn(move || {
            let mut v = Vec::new();
            b.read_to_end(&mut v).unwrap();
            v
        });
        let (sink, _log) = channel(1 << 16);
        transfer(&src, a, sink).expect("transfer");
        let stream = reader.join().unwrap();
        vm.stop().unwrap();
        stream
    });
    assert!(stream.len() > 4096, "{} bytes", stream.len());
    let n = stream.len();
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(48));
    runner
        .run(
            &(
                proptest::collection::vec((0..n, 1u8..=255), 0..4),
                prop_oneof![Just(n), 0..n],
            ),
            |(flips, cut)| {
                let mut b = stream.clone();
                for (at, x) in flips {
                    b[at] ^= x;
                }
                b.truncate(cut);
                let mut r = std::io::Cursor::new(b);
                let _ = Vmm::receive(
                    cfg(Mode::Replay),
                    ft_vmm::GUEST_ELF,
                    Control::new(),
                    &mut r,
                    Some(std::sync::Arc::new(ft_vmm::vmlog::MemFrameStore::default())),
                    &mut |_| {},
                );
                Ok(())
            },
        )
        .unwrap();
}
