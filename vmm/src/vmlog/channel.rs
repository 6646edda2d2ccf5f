//! In-process log channel: the sink batches encoded entries and sends a batch on `flush`
//! or when it exceeds [`CHANNEL_BATCH`] bytes; the source decodes them.
//!
//! The source reports [`Recv::End`] once every sink is dropped (the channel is closed)
//! and every batch has been decoded; until then a lack of entries is [`Recv::Empty`].
use super::stream::Decoder;
use super::{LogEntry, LogSink, LogSource, Recv};
use crate::error::{Error, Result};
use ft_common::vmlog::EntryHdr;
use std::io;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TryRecvError, TrySendError};
use std::time::Duration;

/// A bounded channel of `capacity_batches` batches.
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
            dec: Decoder::default(),
            closed: false,
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

    /// Hands `batch` (whole encoded entries, `LogEntry::encode_into`) to the source
    /// without waiting, after anything appended before: `Ok(None)` when it went,
    /// `Ok(Some(batch))` handed back when the channel is full (try again later), an
    /// error when the source is gone.
    pub fn try_send_encoded(&mut self, batch: Vec<u8>) -> Result<Option<Vec<u8>>> {
        let gone = || {
            Error::LogIo(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "log receiver gone",
            ))
        };
        if !self.batch.is_empty() {
            let pending = std::mem::take(&mut self.batch);
            match self.tx.try_send(pending) {
                Ok(()) => {}
                Err(TrySendError::Full(p)) => {
                    self.batch = p;
                    return Ok(Some(batch));
                }
                Err(TrySendError::Disconnected(_)) => return Err(gone()),
            }
        }
        let n = batch.len() as u64;
        match self.tx.try_send(batch) {
            Ok(()) => {
                self.bytes_sent += n;
                Ok(None)
            }
            Err(TrySendError::Full(b)) => Ok(Some(b)),
            Err(TrySendError::Disconnected(_)) => Err(gone()),
        }
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
    dec: Decoder,
    closed: bool,
}

impl LogSource for ChannelSource {
    fn recv(&mut self, timeout: Duration) -> Result<Recv> {
        loop {
            if let Some(e) = self.dec.next()? {
                return Ok(Recv::Entry(e));
            }
            if self.closed {
                return Ok(Recv::End);
            }
            let next = if timeout.is_zero() {
                self.rx.try_recv().map_err(|e| match e {
                    TryRecvError::Empty => RecvTimeoutError::Timeout,
                    TryRecvError::Disconnected => RecvTimeoutError::Disconnected,
                })
            } else {
                self.rx.recv_timeout(timeout)
            };
            match next {
                Ok(b) => self.dec.feed(&b),
                Err(RecvTimeoutError::Timeout) => return Ok(Recv::Empty),
                // Closed and drained; an incomplete entry left in the buffer is dropped.
                Err(RecvTimeoutError::Disconnected) => self.closed = true,
            }
        }
    }

    fn torn_bytes(&self) -> u64 {
        if self.closed {
            self.dec.pending() as u64
        } else {
            0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmlog::stream::tests::entries;

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
    fn end_only_when_closed_and_drained() {
        let (mut sink, mut src) = channel(16);
        let all = entries();
        for e in &all[..10] {
            sink.append(&e.hdr, &e.payload).unwrap();
        }
        // Appended but not flushed: nothing in the channel yet.
        assert!(matches!(src.recv(Duration::ZERO).unwrap(), Recv::Empty));
        sink.flush().unwrap();
        for e in &all[10..20] {
            sink.append(&e.hdr, &e.payload).unwrap();
        }
        sink.flush().unwrap();
        // Dropping the sink closes the channel; both batches are still delivered.
        drop(sink);
        let mut got = Vec::new();
        loop {
            match src.recv(Duration::ZERO).unwrap() {
                Recv::Entry(e) => got.push(e),
                Recv::Empty => panic!("Empty after the channel was closed"),
                Recv::End => break,
            }
        }
        assert_eq!(got, all[..20]);
        assert_eq!(src.torn_bytes(), 0);
        assert!(matches!(src.recv(Duration::ZERO).unwrap(), Recv::End));
    }
}
