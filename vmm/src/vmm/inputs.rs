//! Inputs at an exit: clock/entropy values, received frames (live), idle waits and
//! interrupt injection.
use super::*;
use crate::devices::entropy;
use crate::hash::fnv1a;
use crate::vmlog::FrameKey;
use ft_common::vmlog::*;
use ft_common::wire::{ETHERTYPE_FT, FT_MAGIC, LogHdr};
use std::os::fd::AsRawFd;
use zerocopy::FromBytes;

impl Vmm {
    // ---------------------------------------------------------------- inputs

    /// Value of a clock/entropy read at the current exit.
    pub(super) fn input_value(&mut self, kind: u8, rip: u64) -> Result<u64> {
        if self.mode == Mode::Replay {
            if let Some(e) = self.take_if(&[kind])? {
                self.check_rip(&e, rip)?;
                if kind == EV_CLOCK {
                    self.clock.observe(e.value());
                }
                return Ok(e.value());
            }
            if self.mode == Mode::Replay {
                let next = self
                    .peeked
                    .as_ref()
                    .map(|e| format!("{} entry at exit {}", kind_name(e.kind()), e.exit()))
                    .unwrap_or_default();
                return Err(self.divergence(format!(
                    "guest read the {} but the log has {next}",
                    kind_name(kind)
                )));
            }
        }
        let v = if kind == EV_CLOCK {
            self.clock.read_live()
        } else {
            entropy::host_random()
        };
        self.log(kind, rip, v, 0, 0, &[])?;
        Ok(v)
    }

    /// Polls the backend (free/record): delivers what fits into the RX ring and makes the
    /// NIC interrupt pending if the guest enabled it. (A due timer is found at injection.)
    pub(super) fn poll_inputs(&mut self) -> Result<()> {
        if self.net.is_some() {
            let mut free = self.nic.rx_free(&self.vm.ram)?;
            let mut n = 0;
            while free > 0 {
                let Some((key, frame)) = self.precut.pop_front() else {
                    break;
                };
                match key {
                    Some(k) => self.deliver_ref(k, &frame)?,
                    None => self.deliver_live(&frame)?,
                }
                n += 1;
                free -= 1;
            }
            while free > 0 {
                let Some(len) = self.net.as_mut().expect("checked").recv(&mut self.rxbuf)? else {
                    break;
                };
                let buf = std::mem::take(&mut self.rxbuf);
                let r = self.deliver_live(&buf[..len]);
                self.rxbuf = buf;
                r?;
                n += 1;
                free -= 1;
            }
            if n > 0 && self.nic.irq_enabled {
                self.pending_irqs |= PENDING_NIC;
            }
        }
        Ok(())
    }

    pub(super) fn deliver_live(&mut self, buf: &[u8]) -> Result<()> {
        let rip = self.vcpu.exit_rip();
        if self.cfg.tagged_input
            && let Ok((hdr, rest)) = LogHdr::ref_from_prefix(buf)
            && hdr.eth.ethertype.get() == ETHERTYPE_FT
            && hdr.ft.magic == FT_MAGIC
        {
            let len = (hdr.ft.len.get() as usize).min(rest.len());
            let frame = &rest[..len];
            let key = FrameKey {
                epoch: hdr.ft.epoch.get(),
                seq: hdr.ft.seq.get(),
            };
            if let Some(s) = self.frames.as_ref() {
                s.put(key, frame);
            }
            self.nic.deliver(&mut self.vm.ram, frame)?;
            let h = fnv1a(frame, FNV_OFFSET);
            let epoch = key.epoch.to_be_bytes();
            return self.log(EV_RX_FRAME_REF, rip, key.seq, h, frame.len() as u32, &epoch);
        }
        self.nic.deliver(&mut self.vm.ram, buf)?;
        self.log(EV_RX_FRAME, rip, 0, 0, 0, buf)
    }

    /// A frame the replica holds under `key` (it came with a transfer): delivered and
    /// logged by reference.
    fn deliver_ref(&mut self, key: FrameKey, frame: &[u8]) -> Result<()> {
        let rip = self.vcpu.exit_rip();
        self.nic.deliver(&mut self.vm.ram, frame)?;
        let h = fnv1a(frame, FNV_OFFSET);
        let epoch = key.epoch.to_be_bytes();
        self.log(EV_RX_FRAME_REF, rip, key.seq, h, frame.len() as u32, &epoch)
    }

    /// At a transfer's cut: every frame the backend holds, taken now. Untagged ones (they
    /// arrived before the new log's input stream existed) get a key in the transfer's own
    /// space and travel with the state (returned); tagged ones are the new log's input
    /// and are delivered as usual. Both go before any frame received later.
    pub(crate) fn take_precut_frames(&mut self, epoch: u64) -> Result<Vec<(FrameKey, Vec<u8>)>> {
        let mut out = Vec::new();
        let Some(net) = self.net.as_mut() else {
            return Ok(out);
        };
        while let Some(len) = net.recv(&mut self.rxbuf)? {
            let f = self.rxbuf[..len].to_vec();
            let tagged = LogHdr::ref_from_prefix(&f).is_ok_and(|(h, _)| {
                h.eth.ethertype.get() == ETHERTYPE_FT && h.ft.magic == FT_MAGIC
            });
            if self.cfg.tagged_input && !tagged {
                let key = FrameKey {
                    epoch,
                    seq: out.len() as u64 + 1,
                };
                out.push((key, f.clone()));
                self.precut.push_back((Some(key), f));
            } else {
                self.precut.push_back((None, f));
            }
        }
        Ok(out)
    }

    /// Idle read (free/record): blocks until the guest has work: a frame in its RX ring
    /// (delivered at an earlier exit after the guest last looked) or waiting on the
    /// backend, a pending interrupt, the device clock at `deadline` or the timer's, or a
    /// control request. Delivers nothing itself: the read's clock value comes first in
    /// the log, the frames after it (the fixed per-exit order).
    pub(super) fn idle_wait(&mut self, deadline: u64) -> Result<()> {
        self.flush_log()?;
        let net_fd = self.net.as_ref().and_then(|n| n.poll_fd()).unwrap_or(-1);
        loop {
            let now = self.clock.host_now();
            if self.timer.due(now)
                || self.pending_irqs != 0
                || now >= deadline
                || self.nic.rx_pending(&self.vm.ram)?
                || !self.precut.is_empty()
                || self.control.stop_requested()
                || self.control.go_live_requested()
                || self.control.exit_work_pending()
            {
                return Ok(());
            }
            let wake = deadline.min(self.timer.deadline.unwrap_or(u64::MAX));
            if wake == u64::MAX && net_fd < 0 {
                // Nothing could ever wake the guest: let it run on.
                return Ok(());
            }
            // At most 100 ms per wait, so control requests are seen even without a kick.
            let wait = (wake - now).min(100_000_000);
            let ts = libc::timespec {
                tv_sec: (wait / 1_000_000_000) as libc::time_t,
                tv_nsec: (wait % 1_000_000_000) as libc::c_long,
            };
            let mut fds = [
                libc::pollfd {
                    fd: self.control.wake.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: net_fd,
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: ppoll(2) on an array of two initialised pollfd structs and a timespec
            // that we own; no signal mask change.
            unsafe { libc::ppoll(fds.as_mut_ptr(), 2, &ts, std::ptr::null()) };
            if fds[0].revents != 0 {
                self.control.drain();
            }
            if fds[1].revents != 0 {
                return Ok(());
            }
        }
    }

    /// Interrupt injection at the current exit (one per exit: KVM_INTERRUPT holds one).
    ///
    /// Record/free: a timer whose deadline the host clock has passed is injected first
    /// and disarmed *at injection*, then a pending NIC interrupt; both only when the vCPU
    /// can take one (otherwise they wait, the timer still armed, for a later exit).
    /// Replay: the logged interrupts, with the same effect on the device model: a timer
    /// interrupt disarms the timer, a NIC interrupt clears the pending NIC bit. Both
    /// changes happen at logged points only, so the device state is equal on both sides.
    pub(super) fn inject_stage(&mut self) -> Result<()> {
        if self.mode == Mode::Replay {
            while let Some(e) = self.take_if(&[EV_IRQ])? {
                if !self.vcpu.can_inject() {
                    return Err(self.divergence(
                        "log injects an interrupt but the backup's guest cannot take one".into(),
                    ));
                }
                self.check_rip(&e, self.vcpu.exit_rip())?;
                let vector = e.hdr.arg.get();
                match vector {
                    TIMER_VECTOR if self.timer.deadline.is_some() => self.timer.deadline = None,
                    NIC_VECTOR if self.pending_irqs & PENDING_NIC != 0 => {
                        self.pending_irqs &= !PENDING_NIC
                    }
                    _ => {
                        let state = if vector == TIMER_VECTOR {
                            "the backup's timer is not armed"
                        } else {
                            "no NIC interrupt is pending on the backup"
                        };
                        return Err(
                            self.divergence(format!("log injects vector {vector:#x} but {state}"))
                        );
                    }
                }
                self.vcpu.inject(vector)?;
                self.count_irq(vector);
            }
            if self.mode == Mode::Replay {
                return Ok(());
            }
        }
        if self.exits == 0 || !self.vcpu.can_inject() {
            return Ok(());
        }
        let vector = if self.timer.due(self.clock.host_now()) {
            self.timer.deadline = None;
            TIMER_VECTOR
        } else if self.pending_irqs & PENDING_NIC != 0 {
            self.pending_irqs &= !PENDING_NIC;
            NIC_VECTOR
        } else {
            return Ok(());
        };
        self.vcpu.inject(vector)?;
        self.count_irq(vector);
        let rip = self.vcpu.exit_rip();
        self.log(EV_IRQ, rip, 0, 0, vector, &[])
    }

    pub(super) fn count_irq(&mut self, vector: u32) {
        self.stats.irqs_injected += 1;
        if vector == TIMER_VECTOR {
            self.stats.timer_irqs += 1;
        } else {
            self.stats.nic_irqs += 1;
        }
    }
}
