//! Running the vCPU and handling each guest-caused exit (device registers).
use super::*;
use ft_common::vmlog::*;
use kvm_ioctls::VcpuExit;

pub(super) fn exc_name(v: u64) -> &'static str {
    const N: [&str; 21] = [
        "#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM", "#DF", "CSO", "#TS", "#NP", "#SS",
        "#GP", "#PF", "?", "#MF", "#AC", "#MC", "#XM", "#VE",
    ];
    N.get(v as usize).copied().unwrap_or("exception")
}

pub(super) fn has_error_code(v: u64) -> bool {
    matches!(v, 8 | 10..=14 | 17 | 21 | 29 | 30)
}

pub(super) enum Exit {
    MmioRead { addr: u64, len: usize },
    MmioWrite { addr: u64, len: usize, value: u64 },
    Io { port: u16, write: bool },
    Interrupted,
}

impl Vmm {
    // ---------------------------------------------------------------- exits

    pub(super) fn run_vcpu(&mut self) -> Result<Exit> {
        self.vcpu.clear_exit_override();
        match self.vcpu.fd.run() {
            Ok(VcpuExit::MmioRead(addr, data)) => Ok(Exit::MmioRead {
                addr,
                len: data.len(),
            }),
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                let mut v = [0u8; 8];
                let n = data.len().min(8);
                v[..n].copy_from_slice(&data[..n]);
                Ok(Exit::MmioWrite {
                    addr,
                    len: data.len(),
                    value: u64::from_le_bytes(v),
                })
            }
            Ok(VcpuExit::IoIn(port, _)) => Ok(Exit::Io { port, write: false }),
            Ok(VcpuExit::IoOut(port, _)) => Ok(Exit::Io { port, write: true }),
            Ok(VcpuExit::Hlt) => Err(Error::GuestHalted {
                rip: self.vcpu.exit_rip(),
            }),
            Ok(VcpuExit::Shutdown) => Err(Error::TripleFault {
                rip: self.vcpu.regs().map(|r| r.rip).unwrap_or(0),
            }),
            Ok(VcpuExit::FailEntry(reason, _)) => Err(Error::VcpuFailed(format!(
                "KVM_EXIT_FAIL_ENTRY, hardware reason {reason:#x}"
            ))),
            Ok(VcpuExit::InternalError) => Err(Error::VcpuFailed(
                "KVM_EXIT_INTERNAL_ERROR (emulation failure)".into(),
            )),
            Ok(other) => Err(Error::VcpuFailed(format!("unexpected exit {other:?}"))),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                Ok(Exit::Interrupted)
            }
            Err(e) => Err(Error::KvmIoctl {
                op: "KVM_RUN",
                err: e,
            }),
        }
    }

    pub(super) fn set_mmio_read_value(&mut self, v: u64, len: usize) {
        let run = self.vcpu.fd.get_kvm_run();
        // SAFETY: the last exit was KVM_EXIT_MMIO (read), so the `mmio` member of the
        // union is the active one; `len` <= 8 = size of its data array.
        unsafe {
            let mmio = &mut run.__bindgen_anon_1.mmio;
            mmio.data[..len].copy_from_slice(&v.to_le_bytes()[..len]);
        }
    }

    pub(super) fn fault(&mut self, vector: u64) -> Error {
        let regs = self.vcpu.regs().ok();
        let rsp = regs.map(|r| r.rsp).unwrap_or(0);
        let (err, rip) = if has_error_code(vector) {
            (
                self.vm.ram.read_u64(rsp).unwrap_or(0),
                self.vm.ram.read_u64(rsp + 8).unwrap_or(0),
            )
        } else {
            (0, self.vm.ram.read_u64(rsp).unwrap_or(0))
        };
        let cr2 = self.vcpu.sregs().map(|s| s.cr2).unwrap_or(0);
        Error::GuestFault {
            vector,
            name: exc_name(vector),
            rip,
            error_code: err,
            cr2,
        }
    }

    /// Takes the TX frames the guest queued: counted and hashed always, sent unless this
    /// is a replaying backup.
    fn send_tx(&mut self) -> Result<()> {
        let output = self.mode != Mode::Replay;
        // The output rule: every entry logged so far (what this output can depend on)
        // is handed to the log before the output reaches the NIC; a network sink
        // publishes the log position the data plane holds the output against.
        if output && self.nic.tx_pending(&self.vm.ram)? {
            self.flush_log()?;
        }
        let Vmm { nic, vm, net, .. } = self;
        nic.drain_tx(&mut vm.ram, |f| match net.as_mut() {
            Some(n) if output => n.send(f),
            _ => Ok(()),
        })?;
        Ok(())
    }

    /// Handles one guest-caused exit; returns `Some(outcome)` to end the run.
    pub(super) fn handle(&mut self, exit: Exit) -> Result<Option<RunOutcome>> {
        self.exits += 1;
        let rip = self.vcpu.exit_rip();
        // Output first, at every exit: the guest queued it before exiting, and an idle
        // read below may block.
        self.send_tx()?;
        match exit {
            Exit::Interrupted => unreachable!("not counted"),
            Exit::Io { port, write } => {
                return Err(Error::BadDeviceAccess {
                    what: if write {
                        "port I/O write"
                    } else {
                        "port I/O read"
                    },
                    addr: port as u64,
                    len: 0,
                    rip,
                });
            }
            Exit::MmioRead { addr, len } => {
                let off = addr.wrapping_sub(MMIO_BASE);
                if len != 8 || off >= MMIO_SIZE {
                    return Err(Error::BadDeviceAccess {
                        what: "MMIO read",
                        addr,
                        len,
                        rip,
                    });
                }
                let v = match off {
                    REG_CLOCK_NS => {
                        self.stats.clock_reads += 1;
                        self.input_value(EV_CLOCK, rip)?
                    }
                    REG_ENTROPY => {
                        self.stats.entropy_reads += 1;
                        self.input_value(EV_ENTROPY, rip)?
                    }
                    REG_IDLE => {
                        self.stats.idles += 1;
                        if self.mode != Mode::Replay && !self.control.stop_requested() {
                            let deadline = self.vm.ram.read_u64(SHARED_IDLE_DEADLINE)?;
                            self.idle_wait(deadline)?;
                        }
                        self.input_value(EV_CLOCK, rip)?
                    }
                    _ => {
                        return Err(Error::BadDeviceAccess {
                            what: "MMIO read of a write-only/unknown register",
                            addr,
                            len,
                            rip,
                        });
                    }
                };
                self.dev_hash = hash_words(&[off, v], self.dev_hash);
                self.set_mmio_read_value(v, len);
            }
            Exit::MmioWrite { addr, len, value } => {
                let off = addr.wrapping_sub(MMIO_BASE);
                if off == REG_FAULT {
                    return Err(self.fault(value & 0xff));
                }
                if len != 8 || off >= MMIO_SIZE {
                    return Err(Error::BadDeviceAccess {
                        what: "MMIO write",
                        addr,
                        len,
                        rip,
                    });
                }
                self.dev_hash = hash_words(&[off | DEV_WRITE, value], self.dev_hash);
                match off {
                    REG_TIMER_DEADLINE => self.timer.write(value),
                    // The frames were taken above.
                    REG_NIC_DOORBELL => self.stats.doorbells += 1,
                    REG_NIC_IRQ => self.nic.irq_enabled = value != 0,
                    REG_CONSOLE => self.console.write(&self.vm.ram, value)?,
                    REG_POWEROFF => {
                        if value == 0 {
                            return Ok(Some(RunOutcome::PowerOff(0)));
                        }
                        return Err(Error::GuestPanic {
                            code: value,
                            message: self.console.lines.last().cloned().unwrap_or_default(),
                        });
                    }
                    _ => {
                        return Err(Error::BadDeviceAccess {
                            what: "MMIO write to a read-only/unknown register",
                            addr,
                            len,
                            rip,
                        });
                    }
                }
            }
        }
        // Inputs delivered at this exit.
        if self.mode == Mode::Replay {
            self.replay_frames()?;
        }
        // A recording that is stopping delivers nothing more: its END follows at this exit.
        if self.mode != Mode::Replay && !self.control.stop_requested() {
            self.poll_inputs()?;
        }
        self.checkpoint_stage()?;
        self.publish_live();
        Ok(None)
    }
}
