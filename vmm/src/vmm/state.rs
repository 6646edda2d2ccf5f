//! The device model's state, state hashes and checkpoints.
use super::*;
use crate::vstate::vcpu::regs_hash;
use ft_common::vmlog::EV_CHECKPOINT;

/// The device model's state: everything besides registers and RAM that decides what the
/// guest sees next. Equal on primary and backup at every exit (the backup runs the same
/// model on the logged inputs), so it is part of every checkpoint/END hash, and a
/// backup that goes live continues with exactly the primary's devices.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceState {
    pub exits: u64,
    /// Last device clock value the guest read.
    pub clock_last: u64,
    pub timer_deadline: Option<u64>,
    /// Interrupts due but not injected yet (bit 1: NIC).
    pub pending_irqs: u32,
    pub nic_irq_enabled: bool,
    pub rx_frames: u64,
    pub rx_bytes: u64,
    pub tx_frames: u64,
    pub tx_bytes: u64,
    /// FNV-1a over every output frame (length, bytes), in order.
    pub tx_hash: u64,
    /// Running hash of every device access the guest made (register, value).
    pub dev_hash: u64,
}

impl DeviceState {
    pub fn hash(&self) -> u64 {
        hash_words(
            &[
                self.exits,
                self.clock_last,
                self.timer_deadline.map_or(u64::MAX, |d| d),
                self.timer_deadline.is_some() as u64,
                self.pending_irqs as u64,
                self.nic_irq_enabled as u64,
                self.rx_frames,
                self.rx_bytes,
                self.tx_frames,
                self.tx_bytes,
                self.tx_hash,
                self.dev_hash,
            ],
            0xde5,
        )
    }
}

impl Vmm {
    /// The device model's state now.
    pub fn device_state(&self) -> DeviceState {
        DeviceState {
            exits: self.exits,
            clock_last: self.clock.last(),
            timer_deadline: self.timer.deadline,
            pending_irqs: self.pending_irqs,
            nic_irq_enabled: self.nic.irq_enabled,
            rx_frames: self.nic.rx_frames,
            rx_bytes: self.nic.rx_bytes,
            tx_frames: self.nic.tx_frames,
            tx_bytes: self.nic.tx_bytes,
            tx_hash: self.nic.tx_hash,
            dev_hash: self.dev_hash,
        }
    }

    /// Restores the device model (snapshot restore).
    pub(crate) fn set_device_state(&mut self, d: &DeviceState) {
        self.exits = d.exits;
        self.clock.observe(d.clock_last);
        self.clock.resync();
        self.timer.deadline = d.timer_deadline;
        self.pending_irqs = d.pending_irqs;
        self.nic.irq_enabled = d.nic_irq_enabled;
        self.nic.rx_frames = d.rx_frames;
        self.nic.rx_bytes = d.rx_bytes;
        self.nic.tx_frames = d.tx_frames;
        self.nic.tx_bytes = d.tx_bytes;
        self.nic.tx_hash = d.tx_hash;
        self.dev_hash = d.dev_hash;
    }

    /// (combined, regs, mem) hash of the current state; `full` rehashes all of RAM. The
    /// combined hash covers registers, RAM and the device state (including the guest's
    /// device accesses and the output hash).
    pub fn state_hash(&mut self, full: bool) -> Result<(u64, u64, u64)> {
        let dirty = self.vm.take_dirty_log()?;
        self.vm.ram.update_hashes(&dirty);
        let mem = if full {
            self.vm.ram.full_hash()
        } else {
            self.vm.ram.memory_hash()
        };
        let regs = regs_hash(&self.vcpu.regs()?);
        let dev = self.device_state().hash();
        Ok((hash_words(&[regs, mem, dev], 0xc4ec), regs, mem))
    }

    pub(super) fn checkpoint_stage(&mut self) -> Result<()> {
        match self.mode {
            Mode::Replay => {
                while let Some(e) = self.take_if(&[EV_CHECKPOINT])? {
                    let (h, _, _) = self.state_hash(false)?;
                    if h != e.value() || self.nic.tx_frames != e.hdr.aux.get() {
                        return Err(self.divergence(format!(
                            "checkpoint mismatch: primary state {:#x} / {} output frames, backup state {h:#x} / {} output frames (backup devices: {:?})",
                            e.value(),
                            e.hdr.aux.get(),
                            self.nic.tx_frames,
                            self.device_state()
                        )));
                    }
                    self.stats.checkpoints_verified += 1;
                    self.stats.last_verified_exit = self.exits;
                }
            }
            Mode::Record => {
                let k = self.cfg.checkpoint_interval;
                if k > 0 && self.exits.is_multiple_of(k) {
                    let (h, _, _) = self.state_hash(false)?;
                    let rip = self.vcpu.exit_rip();
                    let tx = self.nic.tx_frames;
                    self.log(EV_CHECKPOINT, rip, h, tx, 0, &[])?;
                    self.stats.checkpoints += 1;
                }
            }
            Mode::Free => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every part of the device model changes the checkpoint hash, registers and RAM
    /// being equal.
    #[test]
    fn state_hash_covers_the_device_model() {
        let mut vmm = Vmm::new(VmmConfig::default(), crate::GUEST_ELF, Control::new()).unwrap();
        let (base, regs, mem) = vmm.state_hash(true).unwrap();
        type Change = (&'static str, fn(&mut Vmm));
        let changes: [Change; 9] = [
            ("timer deadline", |v| v.timer.deadline = Some(5)),
            ("pending NIC interrupt", |v| v.pending_irqs |= PENDING_NIC),
            ("NIC interrupt enabled", |v| v.nic.irq_enabled = true),
            ("output hash", |v| v.nic.tx_hash ^= 1),
            ("output frames", |v| v.nic.tx_frames += 1),
            ("received bytes", |v| v.nic.rx_bytes += 1),
            ("last clock value", |v| v.clock.observe(77)),
            ("device accesses", |v| v.dev_hash ^= 1),
            ("exit count", |v| v.exits += 1),
        ];
        for (what, change) in changes {
            let saved = vmm.device_state();
            change(&mut vmm);
            let (h, r, m) = vmm.state_hash(true).unwrap();
            assert_eq!((r, m), (regs, mem), "{what}: registers and RAM unchanged");
            assert_ne!(h, base, "{what} is not covered by the state hash");
            vmm.set_device_state(&saved);
            assert_eq!(vmm.state_hash(true).unwrap().0, base, "{what} restored");
        }
    }
}
