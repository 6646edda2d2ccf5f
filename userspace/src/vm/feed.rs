//! Backup: what the logging channel hands to the replaying VMM. Input frames go into
//! the VMM's frame store under their (epoch, sequence) key; the entries of each VMLOG
//! frame, in order, into the VMM's log source (through the feed's backlog when the
//! replay queue is full). Both count as delivered (and so may be acked) only once they
//! are held there.
use std::{
    collections::VecDeque,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
    },
};

use ft_common::{
    vmlog::{ENTRY_HLEN, EntryHdr},
    wire::parse_log_frame,
};
use ft_vmm::vmlog::{ChannelSink, FrameKey, FrameStore, MemFrameStore};
use zerocopy::FromBytes;

use crate::channel::backup::{InputSink, VmFeed};

/// Input frames into the replaying VMM's frame store.
pub struct FrameStoreSink(pub Arc<dyn FrameStore>);

impl InputSink for FrameStoreSink {
    fn deliver(&mut self, seq: u64, log_frame: &[u8]) -> std::io::Result<()> {
        let (hdr, payload) = parse_log_frame(log_frame)
            .map_err(|e| std::io::Error::other(format!("malformed input frame: {e:?}")))?;
        let key = FrameKey {
            epoch: hdr.ft.epoch.get(),
            seq,
        };
        self.0.put(key, payload);
        Ok(())
    }
}

/// Splits a VMLOG frame's payload into whole entries (header, payload). An entry that
/// runs past the end is an error: the primary only sends whole entries.
pub fn split_entries(mut b: &[u8]) -> Result<Vec<(EntryHdr, &[u8])>, String> {
    let mut v = Vec::new();
    while !b.is_empty() {
        let (hdr, rest) = EntryHdr::read_from_prefix(b)
            .map_err(|_| format!("{} bytes left are not a whole entry header", b.len()))?;
        let n = hdr.len.get() as usize;
        if n > rest.len() {
            return Err(format!(
                "entry of {n} payload bytes runs past the frame ({} left)",
                rest.len()
            ));
        }
        v.push((hdr, &rest[..n]));
        b = &rest[n..];
        debug_assert_eq!(ENTRY_HLEN, std::mem::size_of::<EntryHdr>());
    }
    Ok(v)
}

/// VMLOG frames the replay queue holds at most (about 3 MiB of entries).
pub const REPLAY_QUEUE_FRAMES: usize = 2048;

/// The take-over's request to close the replay feed, and the receive loop's answer; the
/// backlog the feed holds now (status).
#[derive(Default)]
pub struct FeedClose {
    requested: AtomicBool,
    closed: AtomicBool,
    backlog_bytes: AtomicU64,
}

impl FeedClose {
    /// The log ends here: once the feed handed every entry it holds to the replay, it
    /// closes the replay's source (the VMM then goes live at its end).
    pub fn request(&self) {
        self.requested.store(true, Relaxed);
    }

    /// The replay's source is closed: it holds every entry the feed had.
    pub fn closed(&self) -> bool {
        self.closed.load(Relaxed)
    }

    /// Entries (bytes) delivered but not yet queued for the replay.
    pub fn backlog_bytes(&self) -> u64 {
        self.backlog_bytes.load(Relaxed)
    }
}

/// VMLOG entries into the replaying VMM's log source. It never blocks the receive loop:
/// entries that do not fit the replay queue wait here (they are delivered: held in
/// memory, in order), and while they wait the loop takes no more from the kernel's ring
/// ([`VmFeed::backlogged`]), so the ring fills, the backup's XDP stops acking and the
/// primary's windows close: the primary slows to the backup's replay speed
/// (back-pressure), while this backup keeps sending its keep-alives (it is slow, not
/// dead). One exception: while the replay waits for an input frame, the loop drains the
/// ring anyway (the frame may be in it, behind VMLOG frames, or be repaired into it), so
/// a full queue never deadlocks with a missing frame.
pub struct VmmFeed {
    sink: Option<ChannelSink>,
    backlog: VecDeque<Vec<u8>>,
    /// Entries buffered for replay so far.
    entries: Arc<AtomicU64>,
    close: Arc<FeedClose>,
    frames: MemFrameStore,
}

impl VmmFeed {
    pub fn new(
        sink: ChannelSink,
        entries: Arc<AtomicU64>,
        close: Arc<FeedClose>,
        frames: MemFrameStore,
    ) -> VmmFeed {
        VmmFeed {
            sink: Some(sink),
            backlog: VecDeque::new(),
            entries,
            close,
            frames,
        }
    }

    fn set_backlog_bytes(&self) {
        let n: usize = self.backlog.iter().map(Vec::len).sum();
        self.close.backlog_bytes.store(n as u64, Relaxed);
    }
}

impl VmFeed for VmmFeed {
    fn deliver(&mut self, _seq: u64, entries: &[u8]) -> Result<(), String> {
        if self.sink.is_none() {
            // The log ended at the take-over: this replica acks nothing more (it stopped
            // confirming first), so what still arrives is not part of it.
            return Ok(());
        }
        let split = split_entries(entries)?;
        let n = split.len() as u64;
        let mut batch = Vec::with_capacity(entries.len() + split.len() * 8);
        for (hdr, payload) in split {
            ft_vmm::vmlog::LogEntry::encode_into(&hdr, payload, &mut batch);
        }
        self.backlog.push_back(batch);
        self.entries.fetch_add(n, Relaxed);
        self.pump()
    }

    fn pump(&mut self) -> Result<(), String> {
        let Some(sink) = self.sink.as_mut() else {
            return Ok(());
        };
        while let Some(b) = self.backlog.pop_front() {
            match sink.try_send_encoded(b) {
                Ok(None) => {}
                Ok(Some(b)) => {
                    self.backlog.push_front(b);
                    break;
                }
                Err(e) => return Err(format!("the replaying VMM is gone: {e}")),
            }
        }
        self.set_backlog_bytes();
        if self.backlog.is_empty() && self.close.requested.load(Relaxed) {
            // The replay's source ends once it handed out what it holds.
            self.sink = None;
            self.close.closed.store(true, Relaxed);
        }
        Ok(())
    }

    fn backlogged(&self) -> bool {
        !self.backlog.is_empty() && !self.frames.is_waited_on()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use zerocopy::IntoBytes;

    #[test]
    fn splits_whole_entries_and_rejects_torn_ones() {
        let mut b = Vec::new();
        let h = EntryHdr::new(ft_common::vmlog::EV_CLOCK, 7, 0x200000, 123);
        b.extend_from_slice(h.as_bytes());
        let mut h2 = EntryHdr::new(ft_common::vmlog::EV_HEADER, 0, 0, 1);
        h2.len.set(8);
        b.extend_from_slice(h2.as_bytes());
        b.extend_from_slice(b"FTVMLOG1");
        let v = split_entries(&b).unwrap();
        assert_eq!(v.len(), 2);
        assert_eq!(v[0].0.exit.get(), 7);
        assert_eq!(v[1].1, b"FTVMLOG1");
        assert!(split_entries(&b[..b.len() - 1]).is_err());
        assert!(split_entries(&b[..10]).is_err());
    }
}
