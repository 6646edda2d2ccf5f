//! The logging link's shared key (`[channel] key_file`): 16 random bytes, the same file on
//! both hosts. It keys two MACs:
//!
//! - the **tag** of the backup's frames to the primary (ACK, NACK, VMNACK, LEAVE):
//!   SipHash-2-4 over the frame header (`ft_common::wire::frame_tag`), checked by the
//!   primary's XDP (the daemon puts the key into the `CONFIG` map) and, for VMNACK and
//!   LEAVE, by the daemon again;
//! - the **join handshake** (`vm/join.rs`): HMAC-SHA256 over the primary's challenge and
//!   the joiner's hello, and over the joiner's challenge and the primary's answer, so
//!   only a host with the key receives the VM's state, and a joiner only takes state from
//!   a primary with the key.
//!
//! `ftd keygen <file>` writes a new key (mode 0600); copy that file to the peer.
use std::{
    io::Write,
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
};

use ft_common::{siphash::SipKey, wire::FtHdr};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tracing::warn;

/// Bytes of the channel key.
pub const KEY_LEN: usize = 16;

/// How to make a key, for the error messages.
fn how_to_create(path: &Path) -> String {
    let p = path.display();
    format!(
        "create one with `ftd keygen {p}` (or `head -c 16 /dev/urandom > {p} && chmod 600 {p}`) \
         and copy the same file to the peer host"
    )
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error(
        "channel.key_file is required: the key that authenticates the backup's acks and the \
         join handshake on the logging link. Set key_file = \"/etc/ftd/channel.key\" in \
         [channel] and {}",
        how_to_create(Path::new("/etc/ftd/channel.key"))
    )]
    NotSet,
    #[error("cannot read the channel key {}: {source}; {}", path.display(), how_to_create(path))]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the channel key {} holds {len} bytes, it must hold exactly {KEY_LEN} (raw bytes, not \
         text); {}",
        path.display(),
        how_to_create(path)
    )]
    Length { path: PathBuf, len: usize },
    #[error("the channel key {} is all zeros, not a random key; {}", path.display(), how_to_create(path))]
    Zero { path: PathBuf },
    #[error(
        "{} exists: ftd keygen never overwrites a key (both hosts must hold the same one); \
         remove it first to make a new one",
        path.display()
    )]
    Exists { path: PathBuf },
    #[error("cannot write the channel key {}: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The 16-byte channel key.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ChannelKey([u8; KEY_LEN]);

// A secret: never printed.
impl std::fmt::Debug for ChannelKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ChannelKey(..)")
    }
}

type HmacSha256 = Hmac<Sha256>;

impl ChannelKey {
    pub fn from_bytes(b: [u8; KEY_LEN]) -> ChannelKey {
        ChannelKey(b)
    }

    /// Reads the key file: exactly 16 bytes, not all zero. Warns when others than the
    /// owner may read it.
    pub fn load(path: &Path) -> Result<ChannelKey, KeyError> {
        if path.as_os_str().is_empty() {
            return Err(KeyError::NotSet);
        }
        let b = std::fs::read(path).map_err(|source| KeyError::Read {
            path: path.into(),
            source,
        })?;
        let key: [u8; KEY_LEN] = b.as_slice().try_into().map_err(|_| KeyError::Length {
            path: path.into(),
            len: b.len(),
        })?;
        if key == [0; KEY_LEN] {
            return Err(KeyError::Zero { path: path.into() });
        }
        if let Ok(m) = std::fs::metadata(path)
            && m.permissions().mode() & 0o077 != 0
        {
            warn!(
                "the channel key {} may be read by other users (mode {:o}): chmod 600 it",
                path.display(),
                m.permissions().mode() & 0o777
            );
        }
        Ok(ChannelKey(key))
    }

    /// `ftd keygen`: writes 16 random bytes to a new file `path` (mode 0600).
    pub fn generate(path: &Path) -> Result<(), KeyError> {
        let mut key = [0u8; KEY_LEN];
        fill_random(&mut key);
        ChannelKey::write_new(path, &ChannelKey(key))
    }

    /// Writes `key` to a new file `path` (mode 0600, synced).
    pub fn write_new(path: &Path, key: &ChannelKey) -> Result<(), KeyError> {
        let key = key.0;
        let werr = |source| KeyError::Write {
            path: path.into(),
            source,
        };
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| {
                if e.kind() == std::io::ErrorKind::AlreadyExists {
                    KeyError::Exists { path: path.into() }
                } else {
                    werr(e)
                }
            })?;
        f.write_all(&key).map_err(werr)?;
        f.sync_all().map_err(werr)
    }

    /// The SipHash key of the frame tags and MACs (what the daemon writes into `KEYS`).
    pub fn sip(&self) -> SipKey {
        SipKey::from_bytes(&self.0)
    }

    /// The tag of a frame with header `h` (`h.len` must already be `TAG_LEN`).
    pub fn tag(&self, h: &FtHdr) -> u64 {
        ft_common::wire::frame_tag(&self.sip(), h)
    }

    /// HMAC-SHA256 over `label` and `parts`, each length-prefixed (so no two different
    /// lists of parts give the same message).
    fn hmac(&self, label: &str, parts: &[&[u8]]) -> HmacSha256 {
        let mut m = HmacSha256::new_from_slice(&self.0).expect("HMAC takes any key length");
        for p in std::iter::once(label.as_bytes()).chain(parts.iter().copied()) {
            m.update(&(p.len() as u32).to_be_bytes());
            m.update(p);
        }
        m
    }

    /// 32 bytes derived from the key for `label` and `parts` (HMAC-SHA256 as a PRF): a
    /// key for one purpose that reveals nothing of the channel key.
    pub fn derive(&self, label: &str, parts: &[&[u8]]) -> [u8; 32] {
        self.hmac(label, parts).finalize().into_bytes().into()
    }

    /// The MAC of `parts` under `label` (hex).
    pub fn mac_hex(&self, label: &str, parts: &[&[u8]]) -> String {
        hex(&self.hmac(label, parts).finalize().into_bytes())
    }

    /// `mac` (hex) is the MAC of `parts` under `label` (compared in constant time).
    pub fn verify_hex(&self, label: &str, parts: &[&[u8]], mac: &str) -> bool {
        match unhex(mac) {
            Some(m) => self.hmac(label, parts).verify_slice(&m).is_ok(),
            None => false,
        }
    }
}

/// Fills `buf` from the kernel's random pool (getrandom(2), blocking until it is seeded).
pub fn fill_random(buf: &mut [u8]) {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: getrandom(2) writes at most `buf.len() - done` bytes into the rest of
        // `buf`, which we own mutably.
        let n = unsafe {
            libc::getrandom(
                buf[done..].as_mut_ptr() as *mut libc::c_void,
                buf.len() - done,
                0,
            )
        };
        if n > 0 {
            done += n as usize;
        }
    }
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || !s.is_ascii() {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ftd-auth-test-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let p = d.join(name);
        let _ = std::fs::remove_file(&p);
        p
    }

    #[test]
    fn keygen_writes_a_private_key_that_loads_and_never_overwrites() {
        let p = tmp("gen.key");
        ChannelKey::generate(&p).unwrap();
        let m = std::fs::metadata(&p).unwrap();
        assert_eq!(m.len(), KEY_LEN as u64);
        assert_eq!(m.permissions().mode() & 0o777, 0o600);
        let k = ChannelKey::load(&p).unwrap();
        assert_ne!(k, ChannelKey::default());
        let e = ChannelKey::generate(&p).unwrap_err().to_string();
        assert!(e.contains("never overwrites"), "{e}");
        assert_eq!(ChannelKey::load(&p).unwrap(), k, "the key was not changed");
    }

    #[test]
    fn bad_key_files_are_refused_with_how_to_make_one() {
        let e = ChannelKey::load(Path::new("")).unwrap_err().to_string();
        assert!(
            e.contains("key_file is required") && e.contains("ftd keygen"),
            "{e}"
        );
        let missing = tmp("missing.key");
        let e = ChannelKey::load(&missing).unwrap_err().to_string();
        assert!(
            e.contains("cannot read") && e.contains("head -c 16 /dev/urandom"),
            "{e}"
        );
        let short = tmp("short.key");
        std::fs::write(&short, b"0123456789abcde").unwrap();
        let e = ChannelKey::load(&short).unwrap_err().to_string();
        assert!(
            e.contains("holds 15 bytes") && e.contains("exactly 16"),
            "{e}"
        );
        // A text key of 16 characters plus a newline is 17 bytes: refused, not truncated.
        let text = tmp("text.key");
        std::fs::write(&text, b"0123456789abcdef\n").unwrap();
        assert!(matches!(
            ChannelKey::load(&text),
            Err(KeyError::Length { len: 17, .. })
        ));
        let zero = tmp("zero.key");
        std::fs::write(&zero, [0u8; 16]).unwrap();
        let e = ChannelKey::load(&zero).unwrap_err().to_string();
        assert!(e.contains("all zeros"), "{e}");
    }

    #[test]
    fn macs_depend_on_key_label_and_every_part() {
        let k = ChannelKey::from_bytes([1; 16]);
        let m = k.mac_hex("hello", &[b"ab", b"c"]);
        assert_eq!(m.len(), 64);
        assert!(k.verify_hex("hello", &[b"ab", b"c"], &m));
        // Moving a byte between parts changes the message (length prefixes).
        assert!(!k.verify_hex("hello", &[b"a", b"bc"], &m));
        assert!(!k.verify_hex("reply", &[b"ab", b"c"], &m));
        assert!(!ChannelKey::from_bytes([2; 16]).verify_hex("hello", &[b"ab", b"c"], &m));
        assert!(!k.verify_hex("hello", &[b"ab", b"c"], &m[..62]));
        assert!(!k.verify_hex("hello", &[b"ab", b"c"], "zz"));
        assert!(!k.verify_hex("hello", &[b"ab", b"c"], ""));
        assert_eq!(format!("{k:?}"), "ChannelKey(..)");
    }

    #[test]
    fn hex_roundtrip() {
        assert_eq!(unhex(&hex(&[0, 0xab, 0xff])).unwrap(), vec![0, 0xab, 0xff]);
        assert_eq!(unhex("abc"), None);
        assert_eq!(unhex("éa"), None);
    }
}
