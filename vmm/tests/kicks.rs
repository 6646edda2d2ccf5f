//! Signal kicks (EINTR from KVM_RUN at host-timing-dependent points of guest code) must not
//! leak into the recording: a guest that keeps interrupts pending across a long stretch of
//! native code, kicked every few hundred microseconds while recording, replays exactly.
mod common;

use common::*;
use ft_vmm::abi::*;
use ft_vmm::net::NetBackend;
use ft_vmm::vmlog::{VecSource, WriteSink, read_all};
use ft_vmm::{Control, Mode, RunOutcome, Vmm};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// A backend that offers one small frame at every other poll, so that at many exits both a
/// NIC and a timer interrupt are pending and one of them must wait (one per entry).
struct Trickle(u64);

impl NetBackend for Trickle {
    fn recv(&mut self, buf: &mut [u8]) -> ft_vmm::error::Result<Option<usize>> {
        self.0 += 1;
        if self.0.is_multiple_of(2) {
            return Ok(None);
        }
        buf[..60].fill(0);
        buf[..8].copy_from_slice(&self.0.to_le_bytes());
        Ok(Some(60))
    }
    fn send(&mut self, _frame: &[u8]) -> ft_vmm::error::Result<()> {
        Ok(())
    }
    fn poll_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }
}

/// NIC_IRQ = 1; loop { t = CLOCK; TIMER = t + ~1 ms; rx_cons = rx_prod; spin ~ms natively }
fn guest() -> Vec<u8> {
    let mut c = Vec::new();
    c.extend_from_slice(&[0xB8, 1, 0, 0, 0]); // mov eax, 1
    store_rax(&mut c, MMIO_BASE + REG_NIC_IRQ); // NIC interrupts on
    let top = c.len();
    load_rax(&mut c, MMIO_BASE + REG_CLOCK_NS);
    c.extend_from_slice(&[0x48, 0x05, 0x00, 0x00, 0x10, 0x00]); // add rax, 0x100000
    store_rax(&mut c, MMIO_BASE + REG_TIMER_DEADLINE);
    load_rax(&mut c, NIC_RX_PROD);
    store_rax(&mut c, NIC_RX_CONS);
    c.extend_from_slice(&[0xB9, 0x00, 0x00, 0x40, 0x00]); // mov ecx, 0x400000
    c.extend_from_slice(&[0xFF, 0xC9, 0x75, 0xFC]); // 1: dec ecx; jnz 1b
    let back = top as i64 - (c.len() as i64 + 2);
    c.extend_from_slice(&[0xEB, back as u8]); // jmp top
    c
}

#[test]
fn kicked_recording_replays_exactly() {
    // Our own no-op handler, so a kick that lands before `Vmm::run` installs its handler
    // cannot kill the test process.
    extern "C" fn noop(_: libc::c_int) {}
    // SAFETY: installs a handler that does nothing (async-signal-safe), no SA_RESTART.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = noop as *const () as usize;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(ft_vmm::vmm::KICK_SIGNAL, &sa, std::ptr::null_mut());
    }
    let elf = build_elf(&guest());
    let log = PathBuf::from(format!("/tmp/ftvmm-kicks-{}.log", std::process::id()));
    let control = Control::new();
    let (tid_tx, tid_rx) = std::sync::mpsc::channel();
    let vcpu = {
        let (elf, log, c) = (elf.clone(), log.clone(), control.clone());
        std::thread::spawn(move || {
            // SAFETY: pthread_self has no preconditions.
            let _ = tid_tx.send(unsafe { libc::pthread_self() } as u64);
            let mut vmm = Vmm::new(cfg(Mode::Record), &elf, c)?;
            vmm.set_net(Box::new(Trickle(0)));
            vmm.set_sink(Box::new(WriteSink::create(&log)?));
            vmm.run()
        })
    };
    let tid = tid_rx.recv().unwrap();
    // Let the VMM get going (the kicks are for KVM_RUN, not for its setup).
    std::thread::sleep(Duration::from_millis(300));
    let done = Arc::new(AtomicBool::new(false));
    let kicker = {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !done.load(Ordering::SeqCst) {
                // SAFETY: the vCPU thread is joined only after this thread has ended, so
                // `tid` names a live thread; the handler is a no-op.
                unsafe { libc::pthread_kill(tid as libc::pthread_t, ft_vmm::vmm::KICK_SIGNAL) };
                n += 1;
                std::thread::sleep(Duration::from_micros(300));
            }
            n
        })
    };
    std::thread::sleep(Duration::from_millis(1500));
    done.store(true, Ordering::SeqCst);
    let kicks = kicker.join().unwrap();
    control.request_stop();
    let rec = with_timeout(Duration::from_secs(20), move || vcpu.join().unwrap()).expect("record");
    let entries = read_all(&log).unwrap();
    let _ = std::fs::remove_file(&log);
    eprintln!(
        "{kicks} kicks, {} exits, {} irqs ({} timer), {} entries",
        rec.exits,
        rec.stats.irqs_injected,
        rec.stats.timer_irqs,
        entries.len()
    );
    assert!(
        rec.stats.timer_irqs > 10 && rec.stats.nic_irqs > 10,
        "{:?}",
        rec.stats
    );
    let r = with_timeout(Duration::from_secs(60), move || {
        let mut vmm = Vmm::new(cfg(Mode::Replay), &elf, Control::new())?;
        vmm.set_source(Box::new(VecSource::new(entries)));
        vmm.run()
    })
    .expect("replay of a kicked recording");
    assert_eq!(r.outcome, RunOutcome::ReplayComplete);
    assert_eq!(r.exits, rec.exits);
    assert_eq!(r.state_hash, rec.state_hash);
    assert_eq!(r.stats.irqs_injected, rec.stats.irqs_injected);
}

/// A paused recording (the daemon's lease lapsed) stands still at a guest exit — no
/// exit is made while it waits — and goes on at a resume; the recording replays
/// exactly (the pause leaves nothing in the log but later clock values).
#[test]
fn a_paused_recording_stands_still_and_replays_exactly() {
    let elf = build_elf(&guest());
    let log = PathBuf::from(format!("/tmp/ftvmm-pause-{}.log", std::process::id()));
    let control = Control::new();
    let live = Arc::new(ft_vmm::LiveStats::default());
    let vcpu = {
        let (elf, log, c, live) = (elf.clone(), log.clone(), control.clone(), live.clone());
        std::thread::spawn(move || {
            let mut vmm = Vmm::new(cfg(Mode::Record), &elf, c)?;
            vmm.set_live_stats(live);
            vmm.set_net(Box::new(Trickle(0)));
            vmm.set_sink(Box::new(WriteSink::create(&log)?));
            vmm.run()
        })
    };
    let exits = || live.exits.load(Ordering::Relaxed);
    let wait = |what: &str, f: &dyn Fn() -> bool| {
        let t0 = std::time::Instant::now();
        while !f() {
            assert!(t0.elapsed() < Duration::from_secs(20), "{what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    wait("the guest made no exits", &|| exits() > 20);
    control.pause();
    wait("the vCPU never paused", &|| control.is_paused());
    let at_pause = exits();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(exits(), at_pause, "the guest ran while paused");
    control.resume();
    wait("the guest did not go on after the resume", &|| {
        exits() > at_pause + 20
    });
    assert!(!control.is_paused());
    control.request_stop();
    let rec = with_timeout(Duration::from_secs(20), move || vcpu.join().unwrap()).expect("record");
    let entries = read_all(&log).unwrap();
    let _ = std::fs::remove_file(&log);
    let r = with_timeout(Duration::from_secs(60), move || {
        let mut vmm = Vmm::new(cfg(Mode::Replay), &elf, Control::new())?;
        vmm.set_source(Box::new(VecSource::new(entries)));
        vmm.run()
    })
    .expect("replay of a paused recording");
    assert_eq!(r.outcome, RunOutcome::ReplayComplete);
    assert_eq!((r.exits, r.state_hash), (rec.exits, rec.state_hash));
}
