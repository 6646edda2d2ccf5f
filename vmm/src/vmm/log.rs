//! Log plumbing: appending (record), reading ahead and matching entries (replay),
//! the log header and go-live.
use super::*;
use crate::vmlog::Recv;
use ft_common::vmlog::*;

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
        h.len.set(payload.len() as u16);
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
    ///
    /// A go-live request does not end the log: the VMM keeps consuming every entry the
    /// source still delivers, however long they take, and goes live only at
    /// [`Recv::End`] (the source is closed and drained; the daemon closes it when it
    /// decides to go live). A transient [`Recv::Empty`] is never taken as the end.
    pub(super) fn peek(&mut self) -> Result<Option<&LogEntry>> {
        if self.mode != Mode::Replay {
            return Ok(None);
        }
        if self.peeked.is_none() {
            if self.source.is_none() {
                return Err(Error::Config("replay mode needs a log source".into()));
            }
            let mut published = false;
            loop {
                let src = self.source.as_mut().expect("checked");
                match src.recv(Duration::from_millis(20))? {
                    Recv::Entry(e) => {
                        self.peeked = Some(e);
                        break;
                    }
                    Recv::Empty => {
                        if self.control.stop_requested() {
                            return Err(Error::Stopped);
                        }
                        // Waiting for the primary: what was consumed so far is visible.
                        if !published {
                            self.publish_live();
                            published = true;
                        }
                    }
                    Recv::End => {
                        let torn_bytes = src.torn_bytes();
                        if self.control.go_live_requested()
                            || self.cfg.go_live_at_end
                            || self.wait_for_go_live_request()?
                        {
                            self.go_live()?;
                            return Ok(None);
                        }
                        return Err(Error::LogTruncated {
                            after_exit: self.exits,
                            torn_bytes,
                        });
                    }
                }
            }
        }
        Ok(self.peeked.as_ref())
    }

    /// The next entry if it is for the current exit and of one of `kinds` (not consumed).
    pub(super) fn peek_if(&mut self, kinds: &[u8]) -> Result<Option<&LogEntry>> {
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
            return Ok(self.peeked.as_ref());
        }
        Ok(None)
    }

    /// Consumes the next entry if it is for the current exit and of one of `kinds`.
    pub(super) fn take_if(&mut self, kinds: &[u8]) -> Result<Option<LogEntry>> {
        if self.peek_if(kinds)?.is_none() {
            return Ok(None);
        }
        self.stats.entries_consumed += 1;
        Ok(self.peeked.take())
    }

    pub(super) fn divergence(&self, what: String) -> Error {
        Error::Divergence {
            exit: self.exits,
            rip: self.vcpu.exit_rip(),
            verified: self.stats.last_verified_exit,
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
                if e.exit() != self.exits {
                    return Err(Error::LogCorrupt {
                        offset: 0,
                        what: format!(
                            "the log starts at exit {}, this VMM's state is at exit {}: it was not restored from the state its primary sent at that log's start",
                            e.exit(),
                            self.exits
                        ),
                    });
                }
            }
            Mode::Free => {}
        }
        Ok(())
    }

    /// Starts a new log at the current exit into `sink` and records from here on (from
    /// free running, or replacing the sink of a recording VMM): the header carries this
    /// exit, where a VMM restored from a state transfer starts its replay.
    ///
    /// The header is appended, not flushed: it leaves with the next flush (before any
    /// output, before the VMM waits for input), so sending it is no part of the pause.
    pub(crate) fn start_new_log(&mut self, sink: Box<dyn LogSink>) -> Result<()> {
        // The old sink is dropped on another thread: closing a socket can wait for an RCU
        // grace period (AF_PACKET: milliseconds), which the paused guest must not.
        if let Some(old) = self.sink.replace(sink) {
            std::thread::spawn(move || drop(old));
        }
        self.mode = Mode::Record;
        self.log_started = true;
        self.stats.log_entries = 0;
        self.stats.log_bytes = 0;
        let (h, v) = (self.config_hash, VMLOG_VERSION);
        self.log(EV_HEADER, 0, h, v, 0, &VMLOG_MAGIC)
    }

    /// Stops recording (drops the sink) and runs free: a new backup that never got going.
    pub(crate) fn stop_recording(&mut self) {
        if self.mode == Mode::Record {
            let _ = self.flush_log();
            self.sink = None;
            self.mode = Mode::Free;
        }
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
            self.control.wait_for_kick(50);
        }
    }

    /// The vCPU waits at a guest exit while a pause is asked for (the log is flushed
    /// first: a recording sink must not hold entries back while the guest stands still).
    /// Returns at a resume; a stop ends the wait too (the run loop then stops).
    pub(super) fn wait_while_paused(&mut self) -> Result<()> {
        self.flush_log()?;
        self.control.set_paused(true);
        while self.control.pause_requested() && !self.control.stop_requested() {
            self.control.wait_for_kick(50);
        }
        self.control.set_paused(false);
        Ok(())
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
        self.publish_live();
        if let Some(l) = self.live.as_ref() {
            l.tx_frames_at_live
                .store(self.nic.tx_frames, std::sync::atomic::Ordering::Relaxed);
            l.went_live
                .store(true, std::sync::atomic::Ordering::Release);
        }
        if self.cfg.console_echo {
            eprintln!("ft-vmm: went live at exit {}", self.exits);
        }
        Ok(())
    }
}
