//! Byte streams of entries: [`WriteSink`] (any writer) and [`ReadSource`] (any reader;
//! a file, pipe or socket is polled so `recv` honours its timeout), and the entry decoder
//! they and the channel share.
use super::{LogEntry, LogSink, LogSource, Recv, format};
use crate::error::{Error, Result};
use ft_common::vmlog::{ENTRY_HLEN, EntryHdr, VMLOG_MAX_PAYLOAD};
use std::io::{self, BufWriter, Read, Write};
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::time::{Duration, Instant};
use zerocopy::FromBytes;

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

/// True if an entry of `kind` can have a payload of `len` bytes.
fn payload_len_valid(kind: u8, len: usize) -> bool {
    match kind {
        format::EV_HEADER => len == format::VMLOG_MAGIC.len(),
        format::EV_RX_FRAME => len <= VMLOG_MAX_PAYLOAD,
        format::EV_RX_FRAME_REF => len == format::RX_FRAME_REF_PAYLOAD,
        _ => len == 0,
    }
}

/// Decodes one entry from the front of `buf` (which starts at byte `offset` of the log);
/// `None` if `buf` holds no complete entry yet. A complete header that no valid entry can
/// have (unknown kind, a payload length its kind cannot have) is [`Error::LogCorrupt`].
pub fn decode(buf: &[u8], offset: u64) -> Result<Option<(LogEntry, usize)>> {
    let Ok((hdr, rest)) = EntryHdr::read_from_prefix(buf) else {
        return Ok(None);
    };
    let len = hdr.len.get() as usize;
    if hdr.kind == 0 || hdr.kind > format::EV_END || !payload_len_valid(hdr.kind, len) {
        return Err(Error::LogCorrupt {
            offset,
            what: format!(
                "bad entry header (kind {} '{}', payload length {len})",
                hdr.kind,
                format::kind_name(hdr.kind)
            ),
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

/// Bytes received but not decoded yet, and their position in the log.
#[derive(Default)]
pub(super) struct Decoder {
    buf: Vec<u8>,
    pos: usize,
    /// Log offset of `buf[pos]`.
    offset: u64,
}

impl Decoder {
    /// The next complete entry, if the buffer holds one.
    pub(super) fn next(&mut self) -> Result<Option<LogEntry>> {
        let Some((e, n)) = decode(&self.buf[self.pos..], self.offset)? else {
            return Ok(None);
        };
        self.pos += n;
        self.offset += n as u64;
        Ok(Some(e))
    }

    /// Bytes of an incomplete entry.
    pub(super) fn pending(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn compact(&mut self) {
        if self.pos > 0 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
    }

    pub(super) fn feed(&mut self, data: &[u8]) {
        self.compact();
        self.buf.extend_from_slice(data);
    }

    /// One `read` from `r` appended to the buffer; returns its result (0 = end).
    fn read_from(&mut self, r: &mut impl Read) -> io::Result<usize> {
        const CHUNK: usize = 1 << 16;
        self.compact();
        let old = self.buf.len();
        self.buf.resize(old + CHUNK, 0);
        let res = r.read(&mut self.buf[old..]);
        self.buf.truncate(old + *res.as_ref().unwrap_or(&0));
        res
    }
}

/// Source reading encoded entries from any reader.
///
/// [`ReadSource::new`] / [`ReadSource::open`] take a reader with a file descriptor (file,
/// pipe, socket, FIFO): `recv(timeout)` waits for it with ppoll(2) and returns
/// [`Recv::Empty`] if no complete entry arrived within the timeout, keeping the partial
/// bytes for the next call. [`ReadSource::blocking`] takes any reader (e.g. in memory) and
/// reads it directly, so a read that blocks, blocks.
///
/// End of input is [`Recv::End`]; an incomplete entry at the end (torn write) is dropped,
/// see [`LogSource::torn_bytes`].
pub struct ReadSource<R: Read + Send> {
    r: R,
    fd: Option<RawFd>,
    dec: Decoder,
    eof: bool,
}

impl<R: Read + Send + AsFd> ReadSource<R> {
    /// A source on a file, pipe or socket; `recv` honours its timeout.
    pub fn new(r: R) -> Self {
        // The descriptor stays valid as long as `r`, which this source owns.
        let fd = Some(r.as_fd().as_raw_fd());
        ReadSource {
            r,
            fd,
            dec: Decoder::default(),
            eof: false,
        }
    }
}

impl<R: Read + Send> ReadSource<R> {
    /// A source on a reader without a descriptor (in-memory data); reads are not
    /// polled, so `recv` waits as long as the reader's `read` does.
    pub fn blocking(r: R) -> Self {
        ReadSource {
            r,
            fd: None,
            dec: Decoder::default(),
            eof: false,
        }
    }
}

impl ReadSource<std::fs::File> {
    /// Opens a log file (or a FIFO).
    pub fn open(path: &std::path::Path) -> Result<Self> {
        Ok(ReadSource::new(std::fs::File::open(path)?))
    }
}

/// Waits until `fd` is readable (or hung up) or `timeout` passes; `None` waits forever.
/// Returns false on timeout (or a signal: the caller re-checks its deadline).
fn wait_readable(fd: RawFd, timeout: Option<Duration>) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ts = timeout.map(|t| libc::timespec {
        tv_sec: t.as_secs().min(i32::MAX as u64) as libc::time_t,
        tv_nsec: t.subsec_nanos() as libc::c_long,
    });
    let tsp = ts
        .as_ref()
        .map_or(std::ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: ppoll(2) on one initialised pollfd and an optional timespec, both live
    // locals; no signal mask change.
    let r = unsafe { libc::ppoll(&mut pfd, 1, tsp, std::ptr::null()) };
    if r < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::Interrupted {
            Ok(false)
        } else {
            Err(e)
        };
    }
    Ok(r > 0)
}

impl<R: Read + Send> LogSource for ReadSource<R> {
    fn recv(&mut self, timeout: Duration) -> Result<Recv> {
        let deadline = Instant::now().checked_add(timeout);
        loop {
            if let Some(e) = self.dec.next()? {
                return Ok(Recv::Entry(e));
            }
            if self.eof {
                return Ok(Recv::End);
            }
            let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            if let Some(fd) = self.fd
                && !wait_readable(fd, left)?
            {
                if left.is_some_and(|l| l.is_zero())
                    || deadline.is_some_and(|d| Instant::now() >= d)
                {
                    return Ok(Recv::Empty);
                }
                continue; // a signal: wait for the rest of the timeout
            }
            match self.dec.read_from(&mut self.r) {
                Ok(0) => self.eof = true,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // A non-blocking descriptor with nothing to read after all.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if self.fd.is_none() || deadline.is_some_and(|d| Instant::now() >= d) {
                        return Ok(Recv::Empty);
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    fn torn_bytes(&self) -> u64 {
        if self.eof {
            self.dec.pending() as u64
        } else {
            0
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use format::*;
    use std::os::unix::net::UnixStream;

    pub(crate) fn entries() -> Vec<LogEntry> {
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

    fn encoded(entries: &[LogEntry]) -> Vec<u8> {
        let mut buf = Vec::new();
        for e in entries {
            LogEntry::encode_into(&e.hdr, &e.payload, &mut buf);
        }
        buf
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]

        /// Any bytes: an entry, "not complete yet", or LogCorrupt; never a panic, and a
        /// decoded entry re-encodes to exactly the bytes it was read from.
        #[test]
        fn decode_takes_any_bytes(buf in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400)) {
            if let Ok(Some((e, n))) = decode(&buf, 0) {
                proptest::prop_assert!(n <= buf.len());
                let mut again = Vec::new();
                LogEntry::encode_into(&e.hdr, &e.payload, &mut again);
                proptest::prop_assert_eq!(&again[..], &buf[..n]);
            }
        }

        /// Entry headers with any kind and length (valid or not) before any bytes: the
        /// same rules, and a decoded entry is exactly what the header says.
        #[test]
        fn decode_takes_any_header(
            kind in 0u8..(EV_END + 3),
            len in proptest::prop_oneof![0u16..24, 0u16..2000],
            exit in proptest::prelude::any::<u64>(),
            value in proptest::prelude::any::<u64>(),
            tail in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300),
        ) {
            let mut hdr = EntryHdr::new(kind, exit, 0x200000, value);
            hdr.len.set(len);
            let mut buf = zerocopy::IntoBytes::as_bytes(&hdr).to_vec();
            buf.extend_from_slice(&tail);
            match decode(&buf, 0) {
                Ok(Some((e, n))) => {
                    proptest::prop_assert_eq!(e.hdr, hdr);
                    proptest::prop_assert_eq!(n, ENTRY_HLEN + len as usize);
                    proptest::prop_assert_eq!(&e.payload[..], &tail[..len as usize]);
                }
                Ok(None) => proptest::prop_assert!(tail.len() < len as usize),
                Err(_) => proptest::prop_assert!(
                    kind == 0 || kind > EV_END || !payload_len_valid(kind, len as usize)
                ),
            }
        }

        /// A valid log with bytes flipped, cut or inserted: the source hands out entries
        /// and then ends or reports LogCorrupt; it never panics and never returns more
        /// bytes of entries than it was given.
        #[test]
        fn mutated_logs_end_or_are_corrupt(
            flips in proptest::collection::vec((0usize..20_000, proptest::prelude::any::<u8>()), 0..8),
            cut in 0usize..20_000,
        ) {
            let good = encoded(&entries()[..200]);
            let mut b = good.clone();
            for (at, v) in flips {
                let at = at % b.len();
                b[at] ^= v;
            }
            b.truncate(cut.min(b.len()));
            let mut src = ReadSource::blocking(std::io::Cursor::new(b.clone()));
            let mut total = 0;
            for _ in 0..10_000 {
                match src.recv(Duration::ZERO) {
                    Ok(Recv::Entry(e)) => total += e.wire_len(),
                    Ok(Recv::End) | Err(_) => break,
                    Ok(Recv::Empty) => {}
                }
            }
            proptest::prop_assert!(total <= b.len());
        }
    }

    fn drain(src: &mut dyn LogSource) -> Result<Vec<LogEntry>> {
        let mut got = Vec::new();
        loop {
            match src.recv(Duration::ZERO)? {
                Recv::Entry(e) => got.push(e),
                Recv::End => return Ok(got),
                Recv::Empty => panic!("in-memory source reported Empty"),
            }
        }
    }

    #[test]
    fn stream_roundtrip() {
        let mut buf = Vec::new();
        {
            let mut s = WriteSink::new(&mut buf);
            for e in entries() {
                s.append(&e.hdr, &e.payload).unwrap();
            }
            s.flush().unwrap();
        }
        let mut src = ReadSource::blocking(buf.as_slice());
        assert_eq!(drain(&mut src).unwrap(), entries());
        assert_eq!(src.torn_bytes(), 0);
    }

    #[test]
    fn torn_last_entry_is_the_end_of_the_log() {
        let all = entries();
        let buf = encoded(&all);
        // Cut inside the last entry's payload (the last entry is a frame: 999 % 7 != 0,
        // so use the last frame entry as the end) and inside a header.
        let last_frame = all.iter().rposition(|e| e.kind() == EV_RX_FRAME).unwrap();
        let whole = encoded(&all[..last_frame]).len();
        for cut in [
            whole + 1,                              // 1 byte of the header
            whole + ENTRY_HLEN - 1,                 // header minus one byte
            whole + ENTRY_HLEN,                     // header, no payload
            whole + all[last_frame].wire_len() - 1, // payload minus one byte
        ] {
            let mut src = ReadSource::blocking(&buf[..cut]);
            let got = drain(&mut src).unwrap_or_else(|e| panic!("cut at {cut}: {e}"));
            assert_eq!(got, all[..last_frame], "cut at {cut}");
            assert_eq!(src.torn_bytes(), (cut - whole) as u64, "cut at {cut}");
            // It stays ended.
            assert!(matches!(src.recv(Duration::ZERO), Ok(Recv::End)));
        }
    }

    #[test]
    fn complete_but_impossible_entry_is_corrupt() {
        let all = entries();
        let mut buf = encoded(&all[..3]);
        let at = buf.len();
        buf.extend_from_slice(&encoded(&all[3..5]));
        let cases: [(&str, usize, &[u8]); 4] = [
            ("unknown kind", at, &[0xEE]),
            ("kind 0", at, &[0]),
            // A clock entry with a payload (len field is bytes 2..4).
            ("clock with payload", at + 2, &[0, 16]),
            ("payload beyond the maximum", at + 2, &[0xFF, 0xFF]),
        ];
        for (name, off, bytes) in cases {
            let mut bad = buf.clone();
            bad[off..off + bytes.len()].copy_from_slice(bytes);
            let mut src = ReadSource::blocking(bad.as_slice());
            match drain(&mut src) {
                Err(Error::LogCorrupt { offset, .. }) => assert_eq!(offset, at as u64, "{name}"),
                other => panic!("{name}: expected LogCorrupt, got {other:?}"),
            }
            // Even when the stream ends right after the bad header.
            let mut src = ReadSource::blocking(&bad[..at + ENTRY_HLEN]);
            assert!(
                matches!(drain(&mut src), Err(Error::LogCorrupt { .. })),
                "{name} at the end"
            );
        }
        // A frame reference must carry its 8-byte epoch.
        let mut h = EntryHdr::new(EV_RX_FRAME_REF, 1, 2, 3);
        let mut v = Vec::new();
        LogEntry::encode_into(&h, &[0; 4], &mut v);
        assert!(matches!(
            drain(&mut ReadSource::blocking(v.as_slice())),
            Err(Error::LogCorrupt { .. })
        ));
        h.len.set(0);
        v.clear();
        LogEntry::encode_into(&h, &7u64.to_be_bytes(), &mut v);
        let got = drain(&mut ReadSource::blocking(v.as_slice())).unwrap();
        assert_eq!(
            got[0].frame_key(),
            Some(super::super::FrameKey { epoch: 7, seq: 3 })
        );
    }

    /// A socket fed slowly: `recv` returns `Empty` after its timeout while nothing or
    /// only part of an entry arrived, keeps the partial bytes, and returns the entry once
    /// it is complete. (The writer always progresses, so a source that ignores its
    /// timeout fails the timing assertions instead of hanging.)
    #[test]
    fn stream_source_honours_its_timeout() {
        let all = entries();
        let buf = encoded(&all[..50]);
        let first = all[0].wire_len();
        let (mut w, r) = UnixStream::pair().unwrap();
        let mut src = ReadSource::new(r);
        let torn = encoded(&all[50..51])[..10].to_vec();
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(400));
            w.write_all(&buf[..first / 2]).unwrap();
            std::thread::sleep(Duration::from_millis(600));
            // Byte by byte, so the source sees many partial reads.
            for &b in &buf[first / 2..] {
                w.write_all(&[b]).unwrap();
            }
            // A torn entry, then the writer goes away.
            w.write_all(&torn).unwrap();
        });
        let t0 = Instant::now();
        // Nothing at all yet.
        assert!(matches!(
            src.recv(Duration::from_millis(50)).unwrap(),
            Recv::Empty
        ));
        let took = t0.elapsed();
        assert!(
            took >= Duration::from_millis(45) && took < Duration::from_millis(300),
            "{took:?}"
        );
        // Wait for the half entry to be there, then time out on it.
        std::thread::sleep(Duration::from_millis(600).saturating_sub(t0.elapsed()));
        let t = Instant::now();
        match src.recv(Duration::from_millis(100)).unwrap() {
            Recv::Empty => {}
            other => panic!("expected Empty for a half entry, got {other:?}"),
        }
        let took = t.elapsed();
        assert!(
            took >= Duration::from_millis(95) && took < Duration::from_millis(350),
            "{took:?}"
        );
        assert!(matches!(src.recv(Duration::ZERO).unwrap(), Recv::Empty));
        let mut got = Vec::new();
        loop {
            match src.recv(Duration::from_millis(20)).unwrap() {
                Recv::Entry(e) => got.push(e),
                Recv::Empty => assert!(t0.elapsed() < Duration::from_secs(20), "stalled"),
                Recv::End => break,
            }
        }
        assert!(t0.elapsed() >= Duration::from_millis(1000));
        writer.join().unwrap();
        // The torn entry at the end: the end of the log, not corruption.
        assert_eq!(got, all[..50]);
        assert_eq!(src.torn_bytes(), 10);
    }
}
