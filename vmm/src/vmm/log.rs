//! Log plumbing: appending (record), reading ahead and matching entries (replay),
//! the log header, go-live, state hashes and checkpoints.
use super::*;
use crate::vmlog::Recv;
use crate::vstate::vcpu::regs_hash;
use ft_common::vmlog::*;
use std::os::fd::AsRawFd;

impl Vmm {
    // ---------------------------------------------------------------- log plumbing

    pub(super) fn log(
        &mut self,
        kind: u8,
        rip: u64,
        value: u64,
        aux: u64,
        arg: u32,
        payload: &[u8],
    ) -> Result<()> {
        if self.mode != Mode::Record {
            return Ok(());
        }
        let Some(sink) = self.sink.as_mut() else {
            return Ok(());
        };
        let mut h = EntryHdr::new(kind, self.exits, rip, value);
        h.aux.set(aux);
        h.arg.set(arg);
        sink.append(&h, payload)?;
        self.stats.log_entries += 1;
        self.stats.log_bytes += (ENTRY_HLEN + payload.len()) as u64;
        Ok(())
    }

    pub(super) fn flush_log(&mut self) -> Result<()> {
        if let Some(s) = self.sink.as_mut() {
            s.flush()?;
        }
        Ok(())
    }

    /// Next entry of the log (blocking), or `None` if the VMM went live instead.
    pub(super) fn peek(&mut self) -> Result<Option<&LogEntry>> {
        if self.mode != Mode::Replay {
            return Ok(None);
        }
        if self.peeked.is_none() {
            let Some(src) = self.source.as_mut() else {
                return Err(Error::Config("replay mode needs a log source".into()));
            };
            loop {
                let go_live = self.control.go_live_requested();
                let timeout = if go_live {
                    Duration::ZERO
                } else {
                    Duration::from_millis(20)
                };
                match src.recv(timeout)? {
                    Recv::Entry(e) => {
                        self.peeked = Some(e);
                        break;
                    }
                    Recv::Empty if go_live => {
                        self.go_live()?;
                        return Ok(None);
                    }
                    Recv::Empty => {
                        if self.control.stop_requested() {
                            return Err(Error::Stopped);
                        }
                    }
                    Recv::End => {
                        if go_live || self.cfg.go_live_at_end || self.wait_for_go_live_request()? {
                            self.go_live()?;
                            return Ok(None);
                        }
                        return Err(Error::LogTruncated {
                            after_exit: self.exits,
                        });
                    }
                }
            }
        }
        Ok(self.peeked.as_ref())
    }

    /// Consumes the next entry if it is for the current exit and of one of `kinds`.
    pub(super) fn take_if(&mut self, kinds: &[u8]) -> Result<Option<LogEntry>> {
        let exits = self.exits;
        let Some(e) = self.peek()? else {
            return Ok(None);
        };
        if e.exit() < exits {
            let what = format!(
                "log has a {} entry for exit {} that the guest never reached in that form",
                kind_name(e.kind()),
                e.exit()
            );
            return Err(self.divergence(what));
        }
        if e.exit() == exits && kinds.contains(&e.kind()) {
            self.stats.entries_consumed += 1;
            return Ok(self.peeked.take());
        }
        Ok(None)
    }

    pub(super) fn divergence(&self, what: String) -> Error {
        Error::Divergence {
            exit: self.exits,
            rip: self.vcpu.exit_rip(),
            what,
        }
    }

    pub(super) fn check_rip(&self, e: &LogEntry, rip: u64) -> Result<()> {
        if e.hdr.rip.get() != rip {
            return Err(self.divergence(format!(
                "{} entry was logged at rip {:#x}, the backup is at rip {rip:#x}",
                kind_name(e.kind()),
                e.hdr.rip.get()
            )));
        }
        Ok(())
    }

    pub(super) fn start_log(&mut self) -> Result<()> {
        if self.log_started {
            return Ok(());
        }
        self.log_started = true;
        match self.mode {
            Mode::Record => {
                let (h, v) = (self.config_hash, VMLOG_VERSION);
                self.log(EV_HEADER, 0, h, v, 0, &VMLOG_MAGIC)?;
                self.flush_log()?;
            }
            Mode::Replay => {
                let Some(e) = self.take_if(&[EV_HEADER])? else {
                    return Err(Error::LogCorrupt {
                        offset: 0,
                        what: "log does not start with a header entry".into(),
                    });
                };
                if e.payload != VMLOG_MAGIC || e.hdr.aux.get() != VMLOG_VERSION {
                    return Err(Error::LogCorrupt {
                        offset: 0,
                        what: "bad log magic or version".into(),
                    });
                }
                if e.value() != self.config_hash {
                    return Err(Error::LogConfigMismatch {
                        log: e.value(),
                        ours: self.config_hash,
                    });
                }
            }
            Mode::Free => {}
        }
        Ok(())
    }

    /// With `wait_for_go_live`: blocks until go-live (true) or stop (Err(Stopped)).
    pub(super) fn wait_for_go_live_request(&mut self) -> Result<bool> {
        if !self.cfg.wait_for_go_live {
            return Ok(false);
        }
        self.flush_log()?;
        loop {
            if self.control.go_live_requested() {
                return Ok(true);
            }
            if self.control.stop_requested() {
                return Err(Error::Stopped);
            }
            let mut fds = [libc::pollfd {
                fd: self.control.wake.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            }];
            // SAFETY: poll(2) on one initialised pollfd we own.
            unsafe { libc::poll(fds.as_mut_ptr(), 1, 50) };
            self.control.drain();
        }
    }

    pub(super) fn go_live(&mut self) -> Result<()> {
        self.mode = Mode::Free;
        self.peeked = None;
        self.source = None;
        self.clock.resync();
        self.went_live_at = Some(self.exits);
        if self.net.is_none()
            && let Some(f) = self.net_on_live.take()
        {
            self.net = Some(f()?);
        }
        if self.cfg.console_echo {
            eprintln!("ft-vmm: went live at exit {}", self.exits);
        }
        Ok(())
    }

    // ---------------------------------------------------------------- state hashes

    /// (combined, regs, mem) hash of the current state; `full` rehashes all of RAM.
    pub fn state_hash(&mut self, full: bool) -> Result<(u64, u64, u64)> {
        let dirty = self.vm.take_dirty_log()?;
        self.vm.ram.update_hashes(&dirty);
        let mem = if full {
            self.vm.ram.full_hash()
        } else {
            self.vm.ram.memory_hash()
        };
        let regs = regs_hash(&self.vcpu.regs()?);
        Ok((hash_words(&[regs, mem, self.dev_hash], 0xc4ec), regs, mem))
    }

    pub(super) fn checkpoint_stage(&mut self) -> Result<()> {
        match self.mode {
            Mode::Replay => {
                while let Some(e) = self.take_if(&[EV_CHECKPOINT])? {
                    let (h, _, _) = self.state_hash(false)?;
                    if h != e.value() || self.nic.tx_frames != e.hdr.aux.get() {
                        return Err(self.divergence(format!(
                            "checkpoint mismatch: primary state {:#x} / {} output frames, backup state {h:#x} / {} output frames",
                            e.value(),
                            e.hdr.aux.get(),
                            self.nic.tx_frames
                        )));
                    }
                    self.stats.checkpoints_verified += 1;
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
