//! The state transfer's secure channel: everything after an authenticated `transfer`
//! answer (the VM's pages, the frames that travel with them, the cut positions and the
//! joiner's confirmation) goes through a Noise session, so a host on the logging link
//! can neither read nor change any of it.
//!
//! Pattern `Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s`:
//! - `psk0`: the pre-shared key is derived from the channel key (HMAC-SHA256 under the
//!   label [`PSK_LABEL`]), so only a holder of the key completes the handshake, on either
//!   side;
//! - `NN`: fresh ephemeral keys on both sides give the session keys forward secrecy
//!   (a key file stolen later does not decrypt a recorded transfer);
//! - the prologue is the join handshake's two challenges: the session belongs to this
//!   one authenticated exchange and cannot be spliced into another.
//!
//! The joiner is the initiator. On the wire every Noise message is a 2-byte big-endian
//! length and the message (at most 65,535 bytes: 65,519 of plaintext and the 16-byte
//! tag). The writer and the reader of one session run on different threads (the live
//! node reads the confirmation while its VMM thread may still hold the writer), so the
//! transport is stateless snow with one nonce counter per direction; a message out of
//! order, replayed or altered fails to decrypt and ends the transfer.
use std::{
    io::{self, Read, Write},
    sync::Arc,
};

use snow::{Builder, HandshakeState, StatelessTransportState};

use crate::channel::auth::ChannelKey;

/// The Noise protocol name.
pub const PATTERN: &str = "Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s";
/// The derivation label of the pre-shared key.
pub const PSK_LABEL: &str = "ft-join-transfer-psk";
const MAX_MSG: usize = 65_535;
const TAG: usize = 16;
const MAX_PLAIN: usize = MAX_MSG - TAG;

#[derive(Debug, thiserror::Error)]
pub enum SecureError {
    #[error(
        "the state transfer's secure session failed: {0} (both hosts need the same [channel] key_file; anything else is a host on the logging link tampering with the transfer)"
    )]
    Noise(#[from] snow::Error),
    #[error("the state transfer's connection: {0}")]
    Io(#[from] io::Error),
}

/// The two halves of an established session.
pub struct Session {
    pub writer: SecureWriter,
    pub reader: SecureReader,
}

fn builder_state(
    key: &ChannelKey,
    prologue: &[u8],
    initiator: bool,
) -> Result<HandshakeState, SecureError> {
    let psk = key.derive(PSK_LABEL, &[]);
    let b = Builder::new(PATTERN.parse()?)
        .psk(0, &psk)?
        .prologue(prologue)?;
    Ok(if initiator {
        b.build_initiator()?
    } else {
        b.build_responder()?
    })
}

fn write_msg(w: &mut impl Write, m: &[u8]) -> io::Result<()> {
    w.write_all(&(m.len() as u16).to_be_bytes())?;
    w.write_all(m)?;
    w.flush()
}

fn read_msg(r: &mut impl Read, buf: &mut Vec<u8>) -> io::Result<()> {
    let mut len = [0u8; 2];
    r.read_exact(&mut len)?;
    buf.resize(u16::from_be_bytes(len) as usize, 0);
    r.read_exact(buf)
}

/// The joiner's side: `-> psk, e` then `<- e, ee`.
pub fn initiate<W: Write + Send + 'static, R: Read + Send + 'static>(
    key: &ChannelKey,
    prologue: &[u8],
    mut w: W,
    mut r: R,
) -> Result<Session, SecureError> {
    let mut hs = builder_state(key, prologue, true)?;
    let mut m = vec![0u8; MAX_MSG];
    let n = hs.write_message(&[], &mut m)?;
    write_msg(&mut w, &m[..n])?;
    let mut buf = Vec::new();
    read_msg(&mut r, &mut buf)?;
    hs.read_message(&buf, &mut m)?;
    finish(hs, w, r)
}

/// The live node's side.
pub fn respond<W: Write + Send + 'static, R: Read + Send + 'static>(
    key: &ChannelKey,
    prologue: &[u8],
    mut w: W,
    mut r: R,
) -> Result<Session, SecureError> {
    let mut hs = builder_state(key, prologue, false)?;
    let mut m = vec![0u8; MAX_MSG];
    let mut buf = Vec::new();
    read_msg(&mut r, &mut buf)?;
    hs.read_message(&buf, &mut m)?;
    let n = hs.write_message(&[], &mut m)?;
    write_msg(&mut w, &m[..n])?;
    finish(hs, w, r)
}

fn finish<W: Write + Send + 'static, R: Read + Send + 'static>(
    hs: HandshakeState,
    w: W,
    r: R,
) -> Result<Session, SecureError> {
    let t = Arc::new(hs.into_stateless_transport_mode()?);
    Ok(Session {
        writer: SecureWriter {
            t: t.clone(),
            inner: Box::new(w),
            nonce: 0,
            plain: Vec::with_capacity(MAX_PLAIN),
            sealed: vec![0u8; MAX_MSG],
        },
        reader: SecureReader {
            t,
            inner: Box::new(r),
            nonce: 0,
            msg: Vec::new(),
            plain: vec![0u8; MAX_PLAIN],
            pos: 0,
            end: 0,
        },
    })
}

/// Encrypts what is written, in messages of up to 65,519 bytes of plaintext; `flush`
/// seals what is buffered.
pub struct SecureWriter {
    t: Arc<StatelessTransportState>,
    inner: Box<dyn Write + Send>,
    nonce: u64,
    plain: Vec<u8>,
    sealed: Vec<u8>,
}

impl SecureWriter {
    fn seal(&mut self) -> io::Result<()> {
        if self.plain.is_empty() {
            return Ok(());
        }
        let n = self
            .t
            .write_message(self.nonce, &self.plain, &mut self.sealed)
            .map_err(io::Error::other)?;
        self.nonce += 1;
        self.inner.write_all(&(n as u16).to_be_bytes())?;
        self.inner.write_all(&self.sealed[..n])?;
        self.plain.clear();
        Ok(())
    }
}

impl Write for SecureWriter {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        if self.plain.len() == MAX_PLAIN {
            self.seal()?;
        }
        let n = b.len().min(MAX_PLAIN - self.plain.len());
        self.plain.extend_from_slice(&b[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.seal()?;
        self.inner.flush()
    }
}

/// Decrypts and checks every message before any of its bytes are returned.
pub struct SecureReader {
    t: Arc<StatelessTransportState>,
    inner: Box<dyn Read + Send>,
    nonce: u64,
    msg: Vec<u8>,
    plain: Vec<u8>,
    pos: usize,
    end: usize,
}

impl Read for SecureReader {
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        if b.is_empty() {
            return Ok(0);
        }
        while self.pos == self.end {
            // The end of the stream between two messages is the end of the data (the
            // transfer's own framing tells a stream cut short); inside one it is an error.
            let mut first = [0u8; 1];
            if self.inner.read(&mut first)? == 0 {
                return Ok(0);
            }
            let mut second = [0u8; 1];
            self.inner.read_exact(&mut second)?;
            self.msg
                .resize(u16::from_be_bytes([first[0], second[0]]) as usize, 0);
            self.inner.read_exact(&mut self.msg)?;
            let n = self
                .t
                .read_message(self.nonce, &self.msg, &mut self.plain)
                .map_err(|e| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "message {} of the state transfer does not authenticate ({e}): altered on the way",
                            self.nonce
                        ),
                    )
                })?;
            self.nonce += 1;
            (self.pos, self.end) = (0, n);
        }
        let n = b.len().min(self.end - self.pos);
        b[..n].copy_from_slice(&self.plain[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixStream;

    use proptest::prelude::*;

    use super::*;

    fn key(b: u8) -> ChannelKey {
        ChannelKey::from_bytes([b; 16])
    }

    /// A session over a socket pair; `tamper` sees the initiator's bytes to the
    /// responder after the handshake.
    fn pair(ki: u8, kr: u8, pro_i: &[u8], pro_r: &[u8]) -> Result<(Session, Session), String> {
        let (a, b) = UnixStream::pair().unwrap();
        let (ai, bi) = (a.try_clone().unwrap(), b.try_clone().unwrap());
        let pro_r = pro_r.to_vec();
        let h = std::thread::spawn(move || respond(&key(kr), &pro_r, b, bi));
        let i = initiate(&key(ki), pro_i, a, ai).map_err(|e| e.to_string());
        let r = h.join().unwrap().map_err(|e| e.to_string());
        Ok((i?, r?))
    }

    #[test]
    fn both_directions_carry_what_was_written() {
        let (mut i, mut r) = pair(1, 1, b"p", b"p").unwrap();
        let data: Vec<u8> = (0..200_000u32).map(|x| (x * 7) as u8).collect();
        let d2 = data.clone();
        let h = std::thread::spawn(move || {
            i.writer.write_all(&d2).unwrap();
            i.writer.flush().unwrap();
            let mut back = [0u8; 3];
            i.reader.read_exact(&mut back).unwrap();
            back
        });
        let mut got = vec![0u8; data.len()];
        r.reader.read_exact(&mut got).unwrap();
        assert_eq!(got, data);
        r.writer.write_all(b"yes").unwrap();
        r.writer.flush().unwrap();
        assert_eq!(&h.join().unwrap(), b"yes");
    }

    #[test]
    fn another_key_or_another_exchange_never_completes() {
        // Either side may notice first; neither gets a session.
        assert!(pair(1, 2, b"p", b"p").is_err());
        assert!(pair(1, 1, b"p", b"q").is_err());
    }

    /// The initiator's sealed bytes for `data` (one message per 4,000 bytes), and the
    /// responder's transport state to read them with.
    fn sealed(data: &[u8]) -> (Vec<u8>, Arc<StatelessTransportState>) {
        let (i, r) = pair(3, 3, b"p", b"p").unwrap();
        let mut out = Vec::new();
        let mut w = SecureWriter {
            t: i.writer.t.clone(),
            inner: Box::new(io::sink()),
            nonce: 0,
            plain: Vec::new(),
            sealed: vec![0; MAX_MSG],
        };
        for chunk in data.chunks(4000) {
            w.plain.extend_from_slice(chunk);
            let n = w.t.write_message(w.nonce, &w.plain, &mut w.sealed).unwrap();
            w.nonce += 1;
            out.extend_from_slice(&(n as u16).to_be_bytes());
            out.extend_from_slice(&w.sealed[..n]);
            w.plain.clear();
        }
        (out, r.reader.t.clone())
    }

    fn read_all(t: Arc<StatelessTransportState>, bytes: Vec<u8>) -> io::Result<Vec<u8>> {
        let mut r = SecureReader {
            t,
            inner: Box::new(io::Cursor::new(bytes)),
            nonce: 0,
            msg: Vec::new(),
            plain: vec![0; MAX_PLAIN],
            pos: 0,
            end: 0,
        };
        let mut v = Vec::new();
        r.read_to_end(&mut v).map(|_| v)
    }

    #[test]
    fn messages_reordered_or_replayed_are_refused() {
        let data = vec![7u8; 8000];
        let (s, t) = sealed(&data);
        assert_eq!(read_all(t.clone(), s.clone()).unwrap(), data);
        let one = 2 + 4000 + TAG;
        let (m0, m1) = (s[..one].to_vec(), s[one..].to_vec());
        assert!(read_all(t.clone(), [m1.clone(), m0.clone()].concat()).is_err());
        assert!(read_all(t, [m0.clone(), m0].concat()).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Any bit of the sealed stream flipped is refused, never read as data (a
        /// flipped length makes the message short or long: refused as well, or the
        /// stream ends early without the data).
        #[test]
        fn a_flipped_bit_is_never_read_as_data(at in 0usize..(2 * (2 + 4000 + TAG)), bit in 0u8..8) {
            let data: Vec<u8> = (0..8000u32).map(|x| x as u8).collect();
            let (mut s, t) = sealed(&data);
            s[at] ^= 1 << bit;
            if let Ok(v) = read_all(t, s) {
                prop_assert!(v.len() < data.len() && data.starts_with(&v));
            }
        }
    }
}
