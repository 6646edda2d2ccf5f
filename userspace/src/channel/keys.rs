//! The channel keys a node holds, and key rotation without downtime.
//!
//! A node holds one key (`[channel] key_file`), or two while a rotation is under way: the
//! new one in `key_file` and the old one in `<key_file>.prev`, which `ftd keygen
//! --rotate` leaves behind. Every frame on the logging link names the key its tag or MAC
//! is under (`FtHdr.key_id`, a 1-byte fingerprint of the key) and the newest key its
//! sender holds (`FtHdr.key_adv`); receivers, in XDP and here, check a frame with the
//! key it names, so both keys are accepted while both are held.
//!
//! The rotation, on both hosts, with no moment where one host refuses the other's frames:
//! 1. `ftd keygen --rotate <key_file>` on one host, the two files copied to the other,
//!    and each daemon told to read them again (`systemctl reload ftd`: SIGHUP). A node
//!    that holds both keys advertises the new one but keeps sending under the old one.
//! 2. A node switches its own frames to the new key once the peer advertises it in a
//!    frame that verified: the peer holds it, so it accepts it.
//! 3. `key_overlap_s` after the rotation began (the `.prev` file's modification time),
//!    a node that sends under the new key forgets the old one: frames under it are
//!    refused from then on (`bad_mac`). A node whose peer never advertised the new key
//!    keeps the old one (refusing it would cut the pair) and says the rotation is stalled.
//!
//! [`decide`] is that policy as a pure function; the daemon's rotation task applies it
//! every second and writes the result to the kernel's `KEYS` map
//! (`DataPlane::set_keys`).
use std::{
    path::{Path, PathBuf},
    sync::RwLock,
    time::{Duration, SystemTime},
};

use ft_common::wire::{MacKey, key_id};

use super::auth::{ChannelKey, KeyError};

/// A key, its id and the log frames' MAC key derived from it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeldKey {
    pub id: u8,
    pub key: ChannelKey,
    pub mac: std::sync::Arc<MacKey>,
}

impl HeldKey {
    pub fn new(key: ChannelKey) -> HeldKey {
        HeldKey {
            id: key_id(&key.sip()),
            mac: std::sync::Arc::new(MacKey::derive(&key.sip())),
            key,
        }
    }
}

/// What the node holds: the newest key, and the older one of a rotation with the time
/// the rotation began.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Held {
    pub newest: HeldKey,
    pub older: Option<(HeldKey, SystemTime)>,
    /// The id of the key this node's frames are made under.
    pub send: u8,
}

/// The key a frame is made under, and what it says.
#[derive(Clone, Debug)]
pub struct Sender {
    pub key: ChannelKey,
    /// The log frames' MAC key of `key`.
    pub mac: std::sync::Arc<MacKey>,
    /// The frame's `key_id`.
    pub id: u8,
    /// The frame's `key_adv`.
    pub adv: u8,
}

/// The node's keys, shared by everything that makes or checks a frame.
#[derive(Debug)]
pub struct ChannelKeys {
    held: RwLock<Held>,
}

impl Default for ChannelKeys {
    fn default() -> Self {
        ChannelKeys::single(ChannelKey::default())
    }
}

/// `<key_file>.prev`: the key a rotation replaces.
pub fn prev_path(key_file: &Path) -> PathBuf {
    let mut p = key_file.as_os_str().to_owned();
    p.push(".prev");
    PathBuf::from(p)
}

impl ChannelKeys {
    /// One key, no rotation.
    pub fn single(key: ChannelKey) -> ChannelKeys {
        let newest = HeldKey::new(key);
        ChannelKeys {
            held: RwLock::new(Held {
                send: newest.id,
                newest,
                older: None,
            }),
        }
    }

    /// Reads `key_file` and, if it is there and younger than `overlap`, `<key_file>.prev`
    /// (a rotation under way: sent under until the peer holds the new key).
    /// A node that starts during a rotation sends under the old key until the peer says
    /// it holds the new one (the peer may not have read it yet).
    pub fn load(key_file: &Path, overlap: Duration) -> Result<ChannelKeys, KeyError> {
        let keys = ChannelKeys::single(ChannelKey::load(key_file)?);
        // Nothing sent yet: `read` starts under the oldest key held.
        keys.held.write().unwrap().send = 0;
        keys.reload(key_file, overlap)?;
        Ok(keys)
    }

    /// Reads the files again and holds what they say ([`ChannelKeys::read`]).
    pub fn reload(&self, key_file: &Path, overlap: Duration) -> Result<(), KeyError> {
        let h = self.read(key_file, overlap)?;
        self.set(h);
        Ok(())
    }

    /// What the files say should be held now (SIGHUP; the daemon gives it to the kernel
    /// before it holds it here, so no frame names a key the kernel lacks). A new key in
    /// `key_file` becomes the newest; the key sent under stays the same until [`decide`]
    /// moves it.
    pub fn read(&self, key_file: &Path, overlap: Duration) -> Result<Held, KeyError> {
        let newest = HeldKey::new(ChannelKey::load(key_file)?);
        let prev = prev_path(key_file);
        let older = match std::fs::metadata(&prev).and_then(|m| m.modified()) {
            Ok(since) if since.elapsed().unwrap_or_default() < overlap => {
                let k = HeldKey::new(ChannelKey::load(&prev)?);
                (k.id != newest.id).then_some((k, since))
            }
            _ => None,
        };
        let h = self.held.read().unwrap();
        let send = if h.send == newest.id || older.as_ref().is_some_and(|(k, _)| k.id == h.send) {
            h.send
        } else {
            // The key sent under is no longer held: the oldest one that is.
            older.as_ref().map_or(newest.id, |(k, _)| k.id)
        };
        Ok(Held {
            newest,
            older,
            send,
        })
    }

    pub fn held(&self) -> Held {
        self.held.read().unwrap().clone()
    }

    /// Replaces what is held (the rotation task, after [`decide`]).
    pub fn set(&self, h: Held) {
        *self.held.write().unwrap() = h;
    }

    pub fn sender(&self) -> Sender {
        let h = self.held.read().unwrap();
        let k = match &h.older {
            Some((k, _)) if k.id == h.send => k,
            _ => &h.newest,
        };
        Sender {
            key: k.key.clone(),
            mac: k.mac.clone(),
            id: h.send,
            adv: h.newest.id,
        }
    }

    /// The key with id `id`, if held.
    pub fn by_id(&self, id: u8) -> Option<ChannelKey> {
        let h = self.held.read().unwrap();
        if h.newest.id == id {
            return Some(h.newest.key.clone());
        }
        h.older
            .as_ref()
            .filter(|(k, _)| k.id == id)
            .map(|(k, _)| k.key.clone())
    }

    /// Every key held: the one sent under first.
    pub fn all(&self) -> Vec<ChannelKey> {
        let h = self.held.read().unwrap();
        let mut v = vec![h.newest.clone()];
        v.extend(h.older.as_ref().map(|(k, _)| k.clone()));
        v.sort_by_key(|k| k.id != h.send);
        v.into_iter().map(|k| k.key).collect()
    }
}

/// Where a rotation stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rotation {
    /// One key.
    None,
    /// Two keys, within the overlap.
    InProgress,
    /// The overlap is over but the peer never said it holds the new key: the old one
    /// stays.
    Stalled,
}

/// The rotation policy (module docs): what to hold and send under next, given the newest
/// key id the peer advertised and the time.
pub fn decide(h: &Held, peer_newest: u8, now: SystemTime, overlap: Duration) -> (Held, Rotation) {
    let Some((older, since)) = &h.older else {
        return (
            Held {
                send: h.newest.id,
                ..h.clone()
            },
            Rotation::None,
        );
    };
    // Switch to the new key once the peer holds it; never back.
    let send = if peer_newest == h.newest.id || h.send == h.newest.id {
        h.newest.id
    } else {
        older.id
    };
    let over = now.duration_since(*since).unwrap_or_default() >= overlap;
    match (over, send == h.newest.id) {
        (true, true) => (
            Held {
                newest: h.newest.clone(),
                older: None,
                send,
            },
            Rotation::None,
        ),
        (true, false) => (Held { send, ..h.clone() }, Rotation::Stalled),
        (false, _) => (Held { send, ..h.clone() }, Rotation::InProgress),
    }
}

impl Rotation {
    pub fn name(self) -> &'static str {
        match self {
            Rotation::None => "none",
            Rotation::InProgress => "in-progress",
            Rotation::Stalled => "stalled",
        }
    }
}

/// The daemon's rotation task: every second, applies [`decide`] to what the kernel
/// reports of the peer and publishes the result (kernel first); on `reload` (SIGHUP)
/// reads the key files again.
pub async fn run(
    key_file: PathBuf,
    overlap: Duration,
    keys: std::sync::Arc<ChannelKeys>,
    dp: std::sync::Arc<crate::dataplane::DataPlane>,
    status: std::sync::Arc<super::status::ChannelStatus>,
    mut reload: tokio::sync::mpsc::UnboundedReceiver<()>,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut warned: Option<std::time::Instant> = None;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            r = reload.recv() => {
                if r.is_none() {
                    return;
                }
                match keys.read(&key_file, overlap) {
                    Ok(h) => {
                        dp.keys.write(&h);
                        keys.set(h.clone());
                        tracing::info!(
                            newest = h.newest.id,
                            older = ?h.older.as_ref().map(|(k, _)| k.id),
                            send = h.send,
                            "channel keys read again"
                        );
                    }
                    Err(e) => tracing::error!("channel keys not read again: {e}; the keys held are unchanged"),
                }
            }
        }
        let held = keys.held();
        let (next, rotation) = decide(&held, dp.keys.peer_newest(), SystemTime::now(), overlap);
        *status.key_rotation.lock().unwrap() = rotation.name();
        if next != held {
            dp.keys.write(&next);
            keys.set(next.clone());
            if next.older.is_none() {
                tracing::info!(
                    key = next.newest.id,
                    "key rotation done: the old channel key is refused from now on"
                );
            } else if next.send != held.send {
                tracing::info!(
                    key = next.send,
                    "the peer holds the new channel key: sending under it"
                );
            }
        }
        if rotation == Rotation::Stalled
            && warned.is_none_or(|t| t.elapsed() > Duration::from_secs(60))
        {
            warned = Some(std::time::Instant::now());
            tracing::warn!(
                "key rotation stalled: the overlap is over but the peer never said it holds the new channel key; the old key stays accepted (copy {} to the peer and reload its ftd)",
                key_file.display()
            );
        }
    }
}

/// `ftd keygen --rotate <key_file>`: the current key becomes `<key_file>.prev` (a new
/// file, so its modification time marks the rotation's start), and a new key, with
/// another id, replaces it in `key_file` (written beside it and renamed over it).
pub fn rotate(key_file: &Path) -> Result<(u8, u8), KeyError> {
    let old = HeldKey::new(ChannelKey::load(key_file)?);
    let prev = prev_path(key_file);
    let _ = std::fs::remove_file(&prev);
    ChannelKey::write_new(&prev, &old.key)?;
    let tmp = {
        let mut p = key_file.as_os_str().to_owned();
        p.push(".new");
        PathBuf::from(p)
    };
    let new = loop {
        let _ = std::fs::remove_file(&tmp);
        ChannelKey::generate(&tmp)?;
        let k = HeldKey::new(ChannelKey::load(&tmp)?);
        if k.id != old.id {
            break k;
        }
    };
    std::fs::rename(&tmp, key_file).map_err(|source| KeyError::Write {
        path: key_file.into(),
        source,
    })?;
    Ok((old.id, new.id))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(b: u8) -> HeldKey {
        HeldKey::new(ChannelKey::from_bytes([b; 16]))
    }

    fn rotating(send_old: bool, since: SystemTime) -> Held {
        let (old, new) = (k(1), k(2));
        Held {
            send: if send_old { old.id } else { new.id },
            newest: new,
            older: Some((old, since)),
        }
    }

    const OVERLAP: Duration = Duration::from_secs(600);

    #[test]
    fn the_old_key_is_sent_under_until_the_peer_holds_the_new_one() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let h = rotating(true, t0);
        let (old, new) = (k(1).id, k(2).id);
        assert_ne!(old, new);
        // The peer advertises the old key: keep sending under it.
        let (h2, r) = decide(&h, old, t0 + Duration::from_secs(1), OVERLAP);
        assert_eq!((h2.send, r), (old, Rotation::InProgress));
        // The peer holds the new key: switch, and never back.
        let (h3, _) = decide(&h2, new, t0 + Duration::from_secs(2), OVERLAP);
        assert_eq!(h3.send, new);
        let (h4, _) = decide(&h3, old, t0 + Duration::from_secs(3), OVERLAP);
        assert_eq!(h4.send, new);
        assert!(h4.older.is_some(), "both accepted within the overlap");
        // After the overlap the old key is forgotten.
        let (h5, r) = decide(&h4, new, t0 + OVERLAP, OVERLAP);
        assert_eq!((h5.send, r), (new, Rotation::None));
        assert!(h5.older.is_none());
    }

    #[test]
    fn a_rotation_the_peer_never_joins_keeps_the_old_key_and_says_so() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let h = rotating(true, t0);
        let (h2, r) = decide(&h, k(1).id, t0 + OVERLAP * 2, OVERLAP);
        assert_eq!(r, Rotation::Stalled);
        assert_eq!(h2.send, k(1).id);
        assert!(h2.older.is_some());
    }

    #[test]
    fn keys_are_found_by_id_and_the_sender_names_its_key() {
        let keys = ChannelKeys::single(k(1).key);
        let t0 = SystemTime::now();
        keys.set(rotating(true, t0));
        let s = keys.sender();
        assert_eq!((s.id, s.adv), (k(1).id, k(2).id));
        assert_eq!(s.key, k(1).key);
        assert_eq!(keys.by_id(k(2).id), Some(k(2).key));
        let unknown = (1..=255u8)
            .find(|i| *i != k(1).id && *i != k(2).id)
            .unwrap();
        assert_eq!(keys.by_id(unknown), None);
        assert_eq!(keys.by_id(0), None);
        assert_eq!(keys.all(), vec![k(1).key, k(2).key]);
    }

    #[test]
    fn rotate_keeps_the_old_key_beside_the_new_one_and_reload_holds_both() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("channel.key");
        ChannelKey::generate(&f).unwrap();
        let keys = ChannelKeys::load(&f, OVERLAP).unwrap();
        let before = keys.held();
        assert!(before.older.is_none());
        let (old, new) = rotate(&f).unwrap();
        assert_eq!(old, before.newest.id);
        assert_ne!(old, new);
        keys.reload(&f, OVERLAP).unwrap();
        let h = keys.held();
        assert_eq!(h.newest.id, new);
        assert_eq!(h.older.as_ref().map(|(k, _)| k.id), Some(old));
        assert_eq!(h.send, old, "still sent under the old key");
        // A node that starts now (a restart during the rotation) starts under the old
        // key too: its peer may not hold the new one yet.
        let fresh = ChannelKeys::load(&f, OVERLAP).unwrap();
        assert_eq!(fresh.held().send, old);
        assert_eq!(fresh.held().newest.id, new);
        // With no overlap left, the .prev file is ignored.
        keys.reload(&f, Duration::ZERO).unwrap();
        assert!(keys.held().older.is_none());
        assert_eq!(keys.held().send, new);
    }
}
