//! Record/replay log streams.
//!
//! Entries ([`LogEntry`]: a [`EntryHdr`] from `ft_common::vmlog` plus payload) flow from
//! a recording VMM into a [`LogSink`] and out of a [`LogSource`] into a replaying VMM. The
//! data plane can carry them by implementing these two traits; provided here:
//! - [`WriteSink`] / [`ReadSource`]: any `Write`/`Read` (file, pipe, socket), entries
//!   back to back in the binary format of `ft_common::vmlog`;
//! - [`channel`]: an in-process pair (bounded, batches of encoded entries).
//!
//! Received frames can be stored by reference ([`FrameStore`]): when the data plane
//! delivers frames tagged with their log sequence, the log holds only the sequence and a
//! hash and the replaying side fetches the bytes from the store.
use crate::error::{Error, Result};
use ft_common::vmlog::{ENTRY_HLEN, EntryHdr, VMLOG_MAX_PAYLOAD};
use std::collections::HashMap;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use zerocopy::{FromBytes, IntoBytes};

pub use ft_common::vmlog as format;

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
    /// Nothing available within the timeout; more may come.
    Empty,
    /// The stream has ended (writer gone / end of file).
    End,
}

/// Where a replaying VMM takes its entries from.
pub trait LogSource: Send {
    /// Next entry, waiting at most `timeout` for one.
    fn recv(&mut self, timeout: Duration) -> Result<Recv>;
}

/// Sink writing encoded entries to any writer (a file, a pipe).
pub struct WriteSink<W: Write + Send> {
    w: BufWriter<W>,
    buf: Vec<u8>,
}

impl<W: Write + Send> WriteSink<W> {
    pub fn new(w: W) -> Self {
        WriteSink {
            w: BufWriter::with_capacity(1 << 16, w),
            buf: Vec::with_capacity(2048),
        }
    }
}

impl WriteSink<std::fs::File> {
    pub fn create(path: &std::path::Path) -> Result<Self> {
        Ok(WriteSink::new(std::fs::File::create(path)?))
    }
}

impl<W: Write + Send> LogSink for WriteSink<W> {
    fn append(&mut self, hdr: &EntryHdr, payload: &[u8]) -> Result<()> {
        self.buf.clear();
        LogEntry::encode_into(hdr, payload, &mut self.buf);
        self.w.write_all(&self.buf)?;
        Ok(())
    }
    fn flush(&mut self) -> Result<()> {
        self.w.flush()?;
        Ok(())
    }
}

/// Decodes one entry from the front of `buf`; `None` if incomplete.
pub fn decode(buf: &[u8], offset: u64) -> Result<Option<(LogEntry, usize)>> {
    let Ok((hdr, rest)) = EntryHdr::read_from_prefix(buf) else {
        return Ok(None);
    };
    let len = hdr.len.get() as usize;
    if hdr.kind == 0 || hdr.kind > format::EV_END || len > VMLOG_MAX_PAYLOAD {
        return Err(Error::LogCorrupt {
            offset,
            what: format!("bad entry header (kind {}, len {len})", hdr.kind),
        });
    }
    if rest.len() < len {
        return Ok(None);
    }
    Ok(Some((
        LogEntry {
            hdr,
            payload: rest[..len].to_vec(),
        },
        ENTRY_HLEN + len,
    )))
}

/// Source reading encoded entries from any reader (a file, a pipe). End of input is
/// [`Recv::End`]; a partial entry at the end is reported as corruption.
pub struct ReadSource<R: Read + Send> {
    r: BufReader<R>,
    offset: u64,
}

impl<R: Read + Send> ReadSource<R> {
    pub fn new(r: R) -> Self {
        ReadSource {
            r: BufReader::with_capacity(1 << 16, r),
            offset: 0,
        }
    }
}

impl ReadSource<std::fs::File> {
    pub fn open(path: &std::path::Path) -> Result<Self> {
        Ok(ReadSource::new(std::fs::File::open(path)?))
    }
}

fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

impl<R: Read + Send> LogSource for ReadSource<R> {
    fn recv(&mut self, _timeout: Duration) -> Result<Recv> {
        let mut hb = [0u8; ENTRY_HLEN];
        let n = read_full(&mut self.r, &mut hb)?;
        if n == 0 {
            return Ok(Recv::End);
        }
        if n < ENTRY_HLEN {
            return Err(Error::LogCorrupt {
                offset: self.offset,
                what: "partial entry header at end of log".into(),
            });
        }
        let hdr = EntryHdr::read_from_bytes(&hb).expect("exact size");
        let len = hdr.len.get() as usize;
        if hdr.kind == 0 || hdr.kind > format::EV_END || len > VMLOG_MAX_PAYLOAD {
            return Err(Error::LogCorrupt {
                offset: self.offset,
                what: format!("bad entry header (kind {}, len {len})", hdr.kind),
            });
        }
        let mut payload = vec![0u8; len];
        if read_full(&mut self.r, &mut payload)? < len {
            return Err(Error::LogCorrupt {
                offset: self.offset,
                what: "partial entry payload at end of log".into(),
            });
        }
        self.offset += (ENTRY_HLEN + len) as u64;
        Ok(Recv::Entry(LogEntry { hdr, payload }))
    }
}

/// In-process channel: the sink batches encoded entries and sends a batch on `flush` or
/// when it exceeds [`CHANNEL_BATCH`] bytes.
pub fn channel(capacity_batches: usize) -> (ChannelSink, ChannelSource) {
    let (tx, rx) = std::sync::mpsc::sync_channel(capacity_batches);
    (
        ChannelSink {
            tx,
            batch: Vec::with_capacity(CHANNEL_BATCH * 2),
            bytes_sent: 0,
        },
        ChannelSource {
            rx,
            buf: Vec::new(),
            pos: 0,
            offset: 0,
        },
    )
}

pub const CHANNEL_BATCH: usize = 32 * 1024;

pub struct ChannelSink {
    tx: SyncSender<Vec<u8>>,
    batch: Vec<u8>,
    bytes_sent: u64,
}

impl ChannelSink {
    pub fn bytes_sent(&self) -> u64 {
        self.bytes_sent
    }
}

impl LogSink for ChannelSink {
    fn append(&mut self, hdr: &EntryHdr, payload: &[u8]) -> Result<()> {
        LogEntry::encode_into(hdr, payload, &mut self.batch);
        if self.batch.len() >= CHANNEL_BATCH {
            self.flush()?;
        }
        Ok(())
    }
    fn flush(&mut self) -> Result<()> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let b = std::mem::replace(&mut self.batch, Vec::with_capacity(CHANNEL_BATCH * 2));
        self.bytes_sent += b.len() as u64;
        match self.tx.try_send(b) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(b)) => self.tx.send(b).map_err(|_| {
                Error::LogIo(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    "log receiver gone",
                ))
            }),
            // A vanished backup must not stop the primary.
            Err(TrySendError::Disconnected(_)) => Ok(()),
        }
    }
}

impl Drop for ChannelSink {
    fn drop(&mut self) {
        let _ = self.flush();
    }
}

pub struct ChannelSource {
    rx: Receiver<Vec<u8>>,
    buf: Vec<u8>,
    pos: usize,
    offset: u64,
}

impl LogSource for ChannelSource {
    fn recv(&mut self, timeout: Duration) -> Result<Recv> {
        loop {
            if let Some((e, n)) = decode(&self.buf[self.pos..], self.offset)? {
                self.pos += n;
                self.offset += n as u64;
                return Ok(Recv::Entry(e));
            }
            let next = if timeout.is_zero() {
                self.rx.try_recv().map_err(|e| match e {
                    std::sync::mpsc::TryRecvError::Empty => RecvTimeoutError::Timeout,
                    std::sync::mpsc::TryRecvError::Disconnected => RecvTimeoutError::Disconnected,
                })
            } else {
                self.rx.recv_timeout(timeout)
            };
            match next {
                Ok(b) => {
                    self.buf.drain(..self.pos);
                    self.pos = 0;
                    self.buf.extend_from_slice(&b);
                }
                Err(RecvTimeoutError::Timeout) => return Ok(Recv::Empty),
                Err(RecvTimeoutError::Disconnected) => {
                    if self.pos < self.buf.len() {
                        return Err(Error::LogCorrupt {
                            offset: self.offset,
                            what: "partial entry at end of stream".into(),
                        });
                    }
                    return Ok(Recv::End);
                }
            }
        }
    }
}

/// A log source that replays a fixed list of entries (tests, tooling).
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

/// Reads a whole log (file) into memory.
pub fn read_all(path: &std::path::Path) -> Result<Vec<LogEntry>> {
    let mut src = ReadSource::open(path)?;
    let mut v = Vec::new();
    while let Recv::Entry(e) = src.recv(Duration::ZERO)? {
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

/// Frames received in "tagged input" mode, by the data plane's log sequence number.
pub trait FrameStore: Send + Sync {
    fn put(&self, seq: u64, frame: &[u8]);
    fn get(&self, seq: u64) -> Option<Vec<u8>>;
}

/// In-memory [`FrameStore`].
#[derive(Default, Clone)]
pub struct MemFrameStore {
    frames: Arc<Mutex<HashMap<u64, Vec<u8>>>>,
}

impl FrameStore for MemFrameStore {
    fn put(&self, seq: u64, frame: &[u8]) {
        self.frames
            .lock()
            .expect("frame store lock")
            .insert(seq, frame.to_vec());
    }
    fn get(&self, seq: u64) -> Option<Vec<u8>> {
        self.frames
            .lock()
            .expect("frame store lock")
            .get(&seq)
            .cloned()
    }
}

impl MemFrameStore {
    pub fn len(&self) -> usize {
        self.frames.lock().expect("frame store lock").len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use format::*;

    fn entries() -> Vec<LogEntry> {
        (0..1000u64)
            .map(|i| {
                let kind = if i % 7 == 0 { EV_RX_FRAME } else { EV_CLOCK };
                let payload = if kind == EV_RX_FRAME {
                    vec![i as u8; (i % 300) as usize + 60]
                } else {
                    vec![]
                };
                let mut hdr = EntryHdr::new(kind, i, 0x200000 + i, i * 3);
                hdr.len.set(payload.len() as u16);
                LogEntry { hdr, payload }
            })
            .collect()
    }

    #[test]
    fn stream_roundtrip_and_truncation() {
        let mut buf = Vec::new();
        {
            let mut s = WriteSink::new(&mut buf);
            for e in entries() {
                s.append(&e.hdr, &e.payload).unwrap();
            }
            s.flush().unwrap();
        }
        let mut src = ReadSource::new(buf.as_slice());
        let mut got = Vec::new();
        while let Recv::Entry(e) = src.recv(Duration::ZERO).unwrap() {
            got.push(e);
        }
        assert_eq!(got, entries());
        let cut = &buf[..buf.len() - 3];
        let mut src = ReadSource::new(cut);
        let err = loop {
            match src.recv(Duration::ZERO) {
                Ok(Recv::Entry(_)) => {}
                Ok(other) => panic!("expected corruption, got {other:?}"),
                Err(e) => break e,
            }
        };
        assert!(matches!(err, Error::LogCorrupt { .. }));
        let mut bad = buf.clone();
        bad[0] = 0xEE; // kind
        assert!(matches!(
            ReadSource::new(bad.as_slice()).recv(Duration::ZERO),
            Err(Error::LogCorrupt { .. })
        ));
    }

    #[test]
    fn channel_roundtrip_across_threads() {
        let (mut sink, mut src) = channel(4);
        let t = std::thread::spawn(move || {
            for e in entries() {
                sink.append(&e.hdr, &e.payload).unwrap();
            }
            sink.flush().unwrap();
        });
        let mut got = Vec::new();
        loop {
            match src.recv(Duration::from_millis(50)).unwrap() {
                Recv::Entry(e) => got.push(e),
                Recv::Empty => {}
                Recv::End => break,
            }
        }
        t.join().unwrap();
        assert_eq!(got, entries());
    }

    #[test]
    fn frame_store() {
        let s = MemFrameStore::default();
        s.put(7, b"abc");
        assert_eq!(s.get(7).as_deref(), Some(&b"abc"[..]));
        assert!(s.get(8).is_none());
    }
}
