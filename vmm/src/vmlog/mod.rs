//! Record/replay log streams.
//!
//! Entries ([`LogEntry`]: a [`EntryHdr`] from `ft_common::vmlog` plus payload) flow from
//! a recording VMM into a [`LogSink`] and out of a [`LogSource`] into a replaying VMM. The
//! data plane can carry them by implementing these two traits; provided here:
//! - [`WriteSink`] / [`ReadSource`]: any `Write`/`Read` (file, pipe, socket), entries
//!   back to back in the binary format of `ft_common::vmlog` ([`stream`]);
//! - [`channel()`]: an in-process pair (bounded, batches of encoded entries);
//! - [`VecSource`]: a fixed list (tests, tooling).
//!
//! # End of a log
//! A source reports [`Recv::End`] only when it is *closed and drained*: the writer is gone
//! (end of file, pipe or socket closed, every [`ChannelSink`] dropped) and every entry it
//! delivered has been returned. A stream that ends inside an entry (a primary that died
//! mid-write) ends there: the incomplete entry is dropped ([`LogSource::torn_bytes`]) and
//! the source reports `End`, which a replay turns into `LogTruncated` or a go-live. A
//! *complete* entry that cannot be valid (unknown kind, a payload length its kind cannot
//! have) is `LogCorrupt`. [`Recv::Empty`] means "nothing complete yet, more may come".
//!
//! A replaying VMM that was asked to go live consumes entries until `End`, so the daemon
//! closes the source (drops the sender, closes the socket) when it decides to go live.
//!
//! Received frames can be stored by reference ([`FrameStore`], [`frames`]): when the
//! data plane delivers frames tagged with their log epoch and sequence, the log holds
//! only the (epoch, sequence) and a hash, and the replaying side fetches the bytes from
//! the store.
use crate::error::Result;
use ft_common::vmlog::{ENTRY_HLEN, EntryHdr};
use std::time::Duration;
use zerocopy::IntoBytes;

pub mod channel;
pub mod frames;
pub mod stream;

pub use channel::{CHANNEL_BATCH, ChannelSink, ChannelSource, channel};
pub use frames::{FrameKey, FrameStore, FrameWait, MemFrameStore};
pub use ft_common::vmlog as format;
pub use stream::{ReadSource, WriteSink, decode};

/// One log entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogEntry {
    pub hdr: EntryHdr,
    pub payload: Vec<u8>,
}

impl LogEntry {
    pub fn kind(&self) -> u8 {
        self.hdr.kind
    }
    pub fn exit(&self) -> u64 {
        self.hdr.exit.get()
    }
    pub fn value(&self) -> u64 {
        self.hdr.value.get()
    }
    /// Encoded size in bytes.
    pub fn wire_len(&self) -> usize {
        ENTRY_HLEN + self.payload.len()
    }
    pub fn encode_into(hdr: &EntryHdr, payload: &[u8], out: &mut Vec<u8>) {
        let mut h = *hdr;
        h.len.set(payload.len() as u16);
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(payload);
    }
    /// RX_FRAME_REF: the referenced frame's key (epoch from the payload, sequence from
    /// `value`); `None` if the payload is not the 8-byte epoch.
    pub fn frame_key(&self) -> Option<FrameKey> {
        let epoch: [u8; 8] = self.payload.as_slice().try_into().ok()?;
        Some(FrameKey {
            epoch: u64::from_be_bytes(epoch),
            seq: self.value(),
        })
    }
}

/// Where a recording VMM puts its entries. `append` must not block for long (it runs on
/// the vCPU thread); `flush` is called before the VMM blocks waiting for input and at the
/// end of a run, so a replaying peer is never starved of entries the primary has made.
pub trait LogSink: Send {
    fn append(&mut self, hdr: &EntryHdr, payload: &[u8]) -> Result<()>;
    fn flush(&mut self) -> Result<()>;
}

/// What a [`LogSource`] returns.
#[derive(Debug)]
pub enum Recv {
    Entry(LogEntry),
    /// Nothing complete arrived within the timeout; more may come.
    Empty,
    /// The source is closed and drained: the writer is gone and every entry was
    /// returned. An incomplete entry at the end (a torn write) was dropped.
    End,
}

/// Where a replaying VMM takes its entries from.
pub trait LogSource: Send {
    /// Next entry, waiting at most `timeout` for one. `End` only once the source is
    /// closed and drained; a transient lack of entries is `Empty`.
    fn recv(&mut self, timeout: Duration) -> Result<Recv>;
    /// After `End`: bytes of an incomplete last entry that were dropped (0 if none).
    fn torn_bytes(&self) -> u64 {
        0
    }
}

/// A log source that replays a fixed list of entries (tests, tooling): closed from the
/// start, so `End` once the list is drained.
pub struct VecSource {
    entries: std::collections::VecDeque<LogEntry>,
}

impl VecSource {
    pub fn new(entries: Vec<LogEntry>) -> Self {
        VecSource {
            entries: entries.into(),
        }
    }
}

impl LogSource for VecSource {
    fn recv(&mut self, _timeout: Duration) -> Result<Recv> {
        Ok(self
            .entries
            .pop_front()
            .map(Recv::Entry)
            .unwrap_or(Recv::End))
    }
}

/// Reads a whole log (file) into memory. A torn last entry is dropped.
pub fn read_all(path: &std::path::Path) -> Result<Vec<LogEntry>> {
    let mut src = ReadSource::open(path)?;
    let mut v = Vec::new();
    while let Recv::Entry(e) = src.recv(Duration::from_secs(1))? {
        v.push(e);
    }
    Ok(v)
}

/// Writes entries to a file.
pub fn write_all(path: &std::path::Path, entries: &[LogEntry]) -> Result<()> {
    let mut s = WriteSink::create(path)?;
    for e in entries {
        s.append(&e.hdr, &e.payload)?;
    }
    s.flush()
}
