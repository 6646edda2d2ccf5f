//! Primary: the recording VMM's log sink. Entries are batched into `VMLOG` frames (whole
//! entries, back to back, up to a client frame's size), numbered in the VMM stream, kept
//! until the backup acks them (for `VMNACK` repair) and sent on the logging NIC.
//!
//! The output rule: the VMM flushes its pending entries before an output frame reaches
//! the VM NIC, and each flush stores the stream's highest sequence in `CHAN.vm_last`
//! before returning, so the hold ring gives every output frame a VMM-stream dependency
//! that covers the entries it depends on.
//!
//! Solo: while the node runs without a backup (its role is SOLO, or SUSPENDED), entries
//! are discarded (counted): there is nobody to replay them, and the output rule no
//! longer applies. The role is read from the supervisor's [`Roles`] at every entry: a
//! join's cut (SOLO -> PRIMARY) makes the sink send from that guest exit on.
//!
//! Back-pressure: never more than `window` VMLOG frames unacked. A full window stalls the
//! vCPU (the flush waits) — VMM entries are never dropped, and client frames have a
//! window of their own, so a client flood cannot take this one's room.
use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use ft_common::{vmlog::EntryHdr, wire::*};
use ft_vmm::vmlog::LogSink;
use zerocopy::IntoBytes;

use crate::{
    dataplane::DataPlane,
    netif::RawSocket,
    role::{NodeRole, Roles},
};

/// VMLOG frames sent and not yet acked, by sequence (shared with the repair thread).
#[derive(Default)]
pub struct VmLogStore {
    frames: Mutex<BTreeMap<u64, Vec<u8>>>,
}

impl VmLogStore {
    /// The stored frame `seq`, marked as a retransmission.
    pub fn get(&self, seq: u64) -> Option<Vec<u8>> {
        let mut f = self.frames.lock().unwrap().get(&seq).cloned()?;
        f[ETH_HLEN + 3] |= FLAG_RETRANSMIT;
        Some(f)
    }

    fn put(&self, seq: u64, frame: Vec<u8>) {
        self.frames.lock().unwrap().insert(seq, frame);
    }

    /// Forgets every frame at or below `acked`.
    pub fn prune(&self, acked: u64) {
        let mut f = self.frames.lock().unwrap();
        *f = f.split_off(&(acked + 1));
    }

    pub fn len(&self) -> usize {
        self.frames.lock().unwrap().len()
    }

    pub fn is_empty(&self) -> bool {
        self.frames.lock().unwrap().is_empty()
    }
}

/// Counters of the VMM stream (primary side).
#[derive(Default, Debug)]
pub struct VmLogStats {
    pub frames: AtomicU64,
    pub bytes: AtomicU64,
    pub entries: AtomicU64,
    pub retransmits: AtomicU64,
    pub send_errors: AtomicU64,
    /// Flushes that waited for the backup (full window), and for how long in total.
    pub stalls: AtomicU64,
    pub stall_ns: AtomicU64,
    /// The vCPU is waiting for the window right now.
    pub stalled: AtomicBool,
    /// Entries discarded because the primary runs alone (no backup to replay them).
    pub discarded: AtomicU64,
    /// VMNACK and LEAVE frames the daemon ignored for a wrong or missing tag (XDP drops
    /// them first: this counts only what reached the daemon by another path).
    pub bad_tags: AtomicU64,
}

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error(
        "a VMM log entry of {0} bytes does not fit a logging-link frame (at most {MAX_FRAME} bytes of entries); the VMM must log input by reference (tagged input)"
    )]
    TooLarge(usize),
    #[error("ftd is stopping")]
    Stopping,
    #[error("the primary is not live (no epoch): nothing may be recorded")]
    NotLive,
}

pub struct ChannelSink {
    pub dp: Arc<DataPlane>,
    pub sock: RawSocket,
    pub src: [u8; 6],
    pub dst: [u8; 6],
    pub session: u64,
    /// The channel keys (every VMLOG frame carries a MAC under the one sent under).
    pub keys: Arc<crate::channel::keys::ChannelKeys>,
    /// The epoch of this log (the node's when the log began; a new epoch means SOLO,
    /// where entries are discarded, or a new log from a join's cut).
    pub epoch: u64,
    pub window: u64,
    pub store: Arc<VmLogStore>,
    pub stats: Arc<VmLogStats>,
    pub stop: Arc<AtomicBool>,
    /// The node's role: entries are sent while it is PRIMARY (and, best effort, after it
    /// halted: the END of a fail-stop), discarded while it runs alone.
    pub roles: Arc<Roles>,
    /// Entries of the frame being filled.
    pub buf: Vec<u8>,
    /// Test-only fault injection (see [`crate::fault`]); unarmed in production.
    pub fault: crate::fault::CorruptClock,
    pub next_seq: u64,
}

fn io_err(e: impl std::error::Error + Send + Sync + 'static) -> ft_vmm::Error {
    ft_vmm::Error::LogIo(std::io::Error::other(e))
}

impl ChannelSink {
    /// Waits while the window is full (the vCPU stalls), then numbers, stores and sends
    /// the filled frame and publishes its sequence in `CHAN.vm_last`.
    fn send_frame(&mut self) -> ft_vmm::error::Result<()> {
        let seq = self.next_seq;
        let mut waited: Option<Instant> = None;
        loop {
            let acked = self.dp.seq_state().vm_acked;
            self.store.prune(acked);
            if seq - acked <= self.window {
                break;
            }
            if self.stop.load(Relaxed) {
                return Err(io_err(SinkError::Stopping));
            }
            // Only a paired primary waits for its backup's acks.
            if !matches!(self.roles.current(), NodeRole::Primary { .. }) {
                self.discard();
                return Ok(());
            }
            if waited.is_none() {
                waited = Some(Instant::now());
                self.stats.stalled.store(true, Relaxed);
            }
            std::thread::sleep(Duration::from_micros(50));
        }
        if let Some(t) = waited {
            self.stats.stalled.store(false, Relaxed);
            self.stats.stalls.fetch_add(1, Relaxed);
            self.stats
                .stall_ns
                .fetch_add(t.elapsed().as_nanos() as u64, Relaxed);
        }
        let epoch = self.epoch;
        if epoch == 0 {
            return Err(io_err(SinkError::NotLive));
        }
        if self.fault.apply(&mut self.buf) {
            tracing::warn!(
                seq,
                "fault injected: the leading CLOCK entry of VMLOG frame {seq} changed before it was tagged"
            );
        }
        let mut ft = FtHdr::new(KIND_VMLOG, self.session, epoch, seq);
        ft.len.set(self.buf.len() as u16);
        // The MAC the backup's XDP checks before it buffers or acks anything of it.
        let sender = self.keys.sender();
        (ft.key_id, ft.key_adv) = (sender.id, sender.adv);
        ft.aux.set(payload_mac(&sender.mac, &ft, &self.buf));
        let hdr = LogHdr {
            eth: EthHdr::ft(self.dst, self.src),
            ft,
        };
        let mut frame = Vec::with_capacity(LOG_OVERHEAD + self.buf.len());
        frame.extend_from_slice(hdr.as_bytes());
        frame.extend_from_slice(&self.buf);
        if frame.len() < 60 {
            frame.resize(60, 0);
        }
        // Before the send: the backup's ack of this frame is only valid (the primary's
        // XDP drops acks beyond `CHAN.vm_last`) once the sequence is published, and a
        // VMNACK for it can only be answered once it is stored. An output frame enqueued
        // from here on depends on it, which is conservative (it is about to be sent).
        self.dp.set_vm_last(seq);
        self.store.put(seq, frame.clone());
        // A lost frame is repaired by VMNACK from the store, so a failed send is counted
        // and not retried here (a full device queue is transient: wait a little).
        let mut sent = false;
        for _ in 0..200 {
            match self.sock.send(&frame) {
                Ok(()) => {
                    sent = true;
                    break;
                }
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    std::thread::sleep(Duration::from_micros(20))
                }
                Err(_) => break,
            }
        }
        if !sent {
            self.stats.send_errors.fetch_add(1, Relaxed);
        }
        self.stats.frames.fetch_add(1, Relaxed);
        self.stats.bytes.fetch_add(frame.len() as u64, Relaxed);
        self.next_seq += 1;
        self.buf.clear();
        Ok(())
    }
}

impl ChannelSink {
    fn discard(&mut self) {
        let n = split_count(&self.buf);
        self.stats.discarded.fetch_add(n, Relaxed);
        self.buf.clear();
    }
}

/// Entries in a buffer of whole entries.
fn split_count(b: &[u8]) -> u64 {
    crate::vm::feed::split_entries(b).map_or(0, |v| v.len() as u64)
}

impl LogSink for ChannelSink {
    fn append(&mut self, hdr: &EntryHdr, payload: &[u8]) -> ft_vmm::error::Result<()> {
        if matches!(
            self.roles.current(),
            NodeRole::Solo { .. } | NodeRole::Suspended { .. }
        ) {
            self.discard();
            self.stats.discarded.fetch_add(1, Relaxed);
            return Ok(());
        }
        let n = hdr.as_bytes().len() + payload.len();
        if n > MAX_FRAME {
            return Err(io_err(SinkError::TooLarge(n)));
        }
        if self.buf.len() + n > MAX_FRAME {
            self.send_frame()?;
        }
        ft_vmm::vmlog::LogEntry::encode_into(hdr, payload, &mut self.buf);
        self.stats.entries.fetch_add(1, Relaxed);
        Ok(())
    }

    fn flush(&mut self) -> ft_vmm::error::Result<()> {
        if !self.buf.is_empty() {
            self.send_frame()?;
        }
        Ok(())
    }
}
