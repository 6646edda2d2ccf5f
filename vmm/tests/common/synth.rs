//! A tiny synthetic guest and network backend for fast record/replay tests without a
//! network namespace: the guest enables NIC interrupts, optionally arms the timer once,
//! and loops { read the clock; consume every received frame; spin }. The backend offers a
//! frame at every other poll, optionally tagged with the data plane's `LogHdr` (epoch,
//! sequence) like the VM-side copy of the data plane's duplication.
use super::{build_elf, load_rax, store_rax};
use ft_common::wire::*;
use ft_vmm::abi::*;
use ft_vmm::net::NetBackend;
use ft_vmm::vmlog::{FrameKey, LogEntry, LogSink};
use ft_vmm::{Control, Mode, RunOutcome, RunReport, Vmm, VmmConfig};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use zerocopy::IntoBytes;

/// The synthetic guest. `one_shot_timer`: arm the timer once, 1 ms after boot.
pub fn guest(one_shot_timer: bool, spin: u32) -> Vec<u8> {
    let mut c = Vec::new();
    c.extend_from_slice(&[0xB8, 1, 0, 0, 0]); // mov eax, 1
    store_rax(&mut c, MMIO_BASE + REG_NIC_IRQ); // NIC interrupts on
    if one_shot_timer {
        load_rax(&mut c, MMIO_BASE + REG_CLOCK_NS);
        c.extend_from_slice(&[0x48, 0x05, 0x40, 0x42, 0x0F, 0x00]); // add rax, 1_000_000
        store_rax(&mut c, MMIO_BASE + REG_TIMER_DEADLINE);
    }
    let top = c.len();
    load_rax(&mut c, MMIO_BASE + REG_CLOCK_NS);
    load_rax(&mut c, NIC_RX_PROD);
    store_rax(&mut c, NIC_RX_CONS);
    c.push(0xB9); // mov ecx, spin
    c.extend_from_slice(&spin.to_le_bytes());
    c.extend_from_slice(&[0xFF, 0xC9, 0x75, 0xFC]); // 1: dec ecx; jnz 1b
    let back = top as i64 - (c.len() as i64 + 5);
    c.push(0xE9); // jmp top (rel32)
    c.extend_from_slice(&(back as i32).to_le_bytes());
    build_elf(&c)
}

/// Every frame the "data plane" sequenced, by key: what the backup's daemon receives on
/// the logging link (including frames the primary's VM never got).
pub type Sent = Arc<Mutex<BTreeMap<FrameKey, Vec<u8>>>>;

/// Offers a 60-byte frame at every other poll. With `tag`: prefixed with a `LogHdr` of
/// epoch `tag` and the next sequence; every `skip_every`-th sequence is "lost on the VM
/// side" (sent to the backup, never delivered to the primary's VM).
pub struct Trickle {
    pub polls: u64,
    pub tag: Option<u64>,
    pub seq: u64,
    pub skip_every: u64,
    pub sent: Sent,
}

impl Trickle {
    pub fn new(tag: Option<u64>, skip_every: u64) -> Trickle {
        Trickle {
            polls: 0,
            tag,
            seq: 0,
            skip_every,
            sent: Sent::default(),
        }
    }
}

impl NetBackend for Trickle {
    fn recv(&mut self, buf: &mut [u8]) -> ft_vmm::error::Result<Option<usize>> {
        self.polls += 1;
        if self.polls.is_multiple_of(2) {
            return Ok(None);
        }
        let mut frame = [0u8; 60];
        frame[..8].copy_from_slice(&self.polls.to_le_bytes());
        let Some(epoch) = self.tag else {
            buf[..60].copy_from_slice(&frame);
            return Ok(Some(60));
        };
        loop {
            self.seq += 1;
            frame[8..16].copy_from_slice(&self.seq.to_le_bytes());
            let key = FrameKey {
                epoch,
                seq: self.seq,
            };
            self.sent.lock().unwrap().insert(key, frame.to_vec());
            if self.skip_every == 0 || !self.seq.is_multiple_of(self.skip_every) {
                break;
            }
        }
        let mut ft = FtHdr::new(KIND_LOG, 0x5e55, epoch, self.seq);
        ft.len.set(60);
        let hdr = LogHdr {
            eth: EthHdr {
                dst: [0xff; 6],
                src: [2, 0, 0, 0, 0, 0x99],
                ethertype: ETHERTYPE_FT.into(),
            },
            ft,
        };
        buf[..LOG_OVERHEAD].copy_from_slice(hdr.as_bytes());
        buf[LOG_OVERHEAD..LOG_OVERHEAD + 60].copy_from_slice(&frame);
        Ok(Some(LOG_OVERHEAD + 60))
    }
    fn send(&mut self, _frame: &[u8]) -> ft_vmm::error::Result<()> {
        Ok(())
    }
    fn poll_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }
}

/// A sink keeping the entries in memory.
#[derive(Clone, Default)]
pub struct MemSink(pub Arc<Mutex<Vec<LogEntry>>>);

impl LogSink for MemSink {
    fn append(
        &mut self,
        hdr: &ft_common::vmlog::EntryHdr,
        payload: &[u8],
    ) -> ft_vmm::error::Result<()> {
        let mut hdr = *hdr;
        hdr.len.set(payload.len() as u16);
        self.0.lock().unwrap().push(LogEntry {
            hdr,
            payload: payload.to_vec(),
        });
        Ok(())
    }
    fn flush(&mut self) -> ft_vmm::error::Result<()> {
        Ok(())
    }
}

pub fn cfg(mode: Mode, tagged: bool) -> VmmConfig {
    VmmConfig {
        mode,
        tagged_input: tagged,
        checkpoint_interval: 50,
        ..Default::default()
    }
}

/// A recording of `exits` exits ending with END; returns the primary's VMM too.
pub struct Recording {
    pub report: RunReport,
    pub entries: Vec<LogEntry>,
    pub sent: Sent,
    pub vmm: Vmm,
}

pub fn record(elf: &[u8], mut cfg: VmmConfig, backend: Trickle, exits: u64) -> Recording {
    cfg.mode = Mode::Record;
    let control = Control::new();
    let mut vmm = Vmm::new(cfg, elf, control.clone()).expect("record vmm");
    let sent = backend.sent.clone();
    vmm.set_net(Box::new(backend));
    let sink = MemSink::default();
    vmm.set_sink(Box::new(sink.clone()));
    vmm.set_max_exits(Some(exits));
    assert_eq!(vmm.run().expect("record").outcome, RunOutcome::ExitLimit);
    // Stop at this exit: END is written before anything else happens.
    control.request_stop();
    vmm.set_max_exits(None);
    let report = vmm.run().expect("record end");
    assert_eq!(report.outcome, RunOutcome::Stopped);
    let entries = sink.0.lock().unwrap().clone();
    Recording {
        report,
        entries,
        sent,
        vmm,
    }
}
