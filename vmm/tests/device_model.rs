//! The backup runs the device model on the logged inputs: a replayed timer interrupt
//! disarms the timer like the primary's injection, delivered frames make the NIC
//! interrupt pending and a replayed NIC interrupt clears it. Checkpoints (here at every
//! exit) cover the device state, and a backup that goes live has exactly the primary's
//! devices: the same state hash and snapshot, and no spurious timer interrupt later.
mod common;

use common::synth::{self, Trickle};
use common::with_timeout;
use ft_vmm::vmlog::VecSource;
use ft_vmm::vmlog::format::{EV_CHECKPOINT, EV_END};
use ft_vmm::{Control, Mode, RunOutcome, Vmm};
use std::time::Duration;

#[test]
fn backup_devices_at_go_live_equal_the_primarys() {
    with_timeout(Duration::from_secs(60), || {
        // The guest arms the timer once (1 ms after boot) and takes NIC interrupts.
        let elf = synth::guest(true, 0x4000);
        let mut c = synth::cfg(Mode::Record, false);
        c.checkpoint_interval = 1;
        let mut rec = synth::record(&elf, c, Trickle::new(None, 0), 800);
        let p = rec.report.clone();
        assert_eq!(p.stats.timer_irqs, 1, "{:?}", p.stats);
        assert!(p.stats.nic_irqs > 100, "{:?}", p.stats);
        assert_eq!(
            p.device.timer_deadline, None,
            "injection disarmed the timer"
        );
        let checkpoints = rec
            .entries
            .iter()
            .filter(|e| e.kind() == EV_CHECKPOINT || e.kind() == EV_END)
            .count() as u64;

        // Replay to the END and go live there; stop right after.
        let mut bc = synth::cfg(Mode::Replay, false);
        bc.go_live_at_end = true;
        bc.max_exits = Some(p.exits);
        let mut backup = Vmm::new(bc, &elf, Control::new()).unwrap();
        backup.set_source(Box::new(VecSource::new(rec.entries.clone())));
        let b = backup.run().expect("replay");
        assert_eq!(b.outcome, RunOutcome::ExitLimit);
        assert_eq!(b.went_live_at_exit, Some(p.exits));
        assert_eq!(b.stats.checkpoints_verified, checkpoints);
        assert_eq!(b.device, p.device, "device state at go-live");
        assert_eq!(b.state_hash, p.state_hash);

        // Snapshots of both carry the same device state.
        let free = synth::cfg(Mode::Free, false);
        let mut restored = Vec::new();
        for vmm in [&mut rec.vmm, &mut backup] {
            let mut snap = Vec::new();
            vmm.snapshot(&mut snap).unwrap();
            let mut r =
                Vmm::restore(free.clone(), &elf, Control::new(), &mut snap.as_slice()).unwrap();
            assert_eq!(r.device_state(), p.device);
            restored.push(r.state_hash(true).unwrap().0);
        }
        assert_eq!(restored[0], restored[1], "restored snapshots");

        // Live, the backup's guest gets no timer interrupt it did not arm.
        backup.set_max_exits(Some(p.exits + 300));
        let live = backup.run().expect("live");
        assert_eq!(live.exits, p.exits + 300);
        assert_eq!(live.stats.timer_irqs, 1, "only the replayed one");
        // The NIC interrupt pending at go-live (frames delivered at the END exit) is the
        // only one injected live (no backend is attached).
        assert_ne!(p.device.pending_irqs, 0, "{:?}", p.device);
        assert_eq!(live.stats.nic_irqs, b.stats.nic_irqs + 1);
    });
}
