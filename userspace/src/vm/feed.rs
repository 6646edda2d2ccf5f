//! Backup: what the logging channel hands to the replaying VMM. Input frames go into
//! the VMM's frame store under their (epoch, sequence) key; the entries of each VMLOG
//! frame, in order, into the VMM's log source. Both count as delivered (and so may be
//! acked) only once they are there.
use std::sync::{
    Arc, Mutex,
    atomic::{AtomicU64, Ordering::Relaxed},
};

use ft_common::{
    vmlog::{ENTRY_HLEN, EntryHdr},
    wire::parse_log_frame,
};
use ft_vmm::vmlog::{ChannelSink, FrameKey, FrameStore, LogSink};
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

/// VMLOG entries into the replaying VMM's log source (a bounded channel: a VMM that
/// lags makes this wait, and the backup's window closes).
pub struct VmmFeed {
    /// Taken (dropped) by the role controller at go-live: the VMM's source then ends
    /// once it has handed out every entry buffered so far.
    pub sink: Arc<Mutex<Option<ChannelSink>>>,
    /// Entries buffered for replay so far.
    pub entries: Arc<AtomicU64>,
}

impl VmFeed for VmmFeed {
    fn deliver(&mut self, _seq: u64, entries: &[u8]) -> Result<(), String> {
        let entries = split_entries(entries)?;
        let n = entries.len() as u64;
        let mut g = self.sink.lock().unwrap_or_else(|e| e.into_inner());
        let sink = g
            .as_mut()
            .ok_or("the log is closed: this replica is going live")?;
        for (hdr, payload) in entries {
            sink.append(&hdr, payload)
                .map_err(|e| format!("the replaying VMM is gone: {e}"))?;
        }
        sink.flush()
            .map_err(|e| format!("the replaying VMM is gone: {e}"))?;
        self.entries.fetch_add(n, Relaxed);
        Ok(())
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
