//! The kernel's copy of the channel keys (`KEYS`, a [`KeyRing`]): the daemon writes what
//! `channel::keys` decided, XDP reports the newest key the peer holds.
//!
//! Writes keep a slot that may be in use stable (see [`KeyRing`]): a key the node still
//! holds stays in its slot; a new key goes into a slot whose key is no longer held, with
//! its id cleared first and stored last (Release) after its key words; `newest` and
//! `send` move after the slots are filled. A program that reads a slot while it changes
//! (or, on a weakly ordered CPU, sees the id before the key words) finds no match or a
//! wrong key: it drops one frame as `bad_mac`, which the sender repairs. It never
//! accepts a frame under a key the node does not hold.
use aya::maps::Map;
use ft_common::maps::KeyRing;

use super::{DataPlaneError, mapped::Mapped};
use crate::channel::keys::Held;

pub struct KernelKeys(Mapped<KeyRing>);

impl KernelKeys {
    pub fn new(map: Map) -> Result<KernelKeys, DataPlaneError> {
        Ok(KernelKeys(Mapped::new("KEYS", map, true)?))
    }

    fn slot_id(&self, i: usize) -> u8 {
        // SAFETY (of the projection): `p` points to the live mapped value.
        self.0.load(|p| unsafe { &raw const (*p).slots[i].id }) as u8
    }

    /// Makes the kernel hold exactly `h`'s keys, send under `h.send` and advertise
    /// `h.newest`.
    pub fn write(&self, h: &Held) {
        let mut want = vec![h.newest.clone()];
        want.extend(h.older.as_ref().map(|(k, _)| k.clone()));
        // Slots whose key is no longer held are emptied first.
        for i in 0..2 {
            let id = self.slot_id(i);
            if id != 0 && !want.iter().any(|k| k.id == id) {
                // SAFETY (of the projection): as above.
                self.0.store(|p| unsafe { &raw const (*p).slots[i].id }, 0);
            }
        }
        for k in &want {
            if (0..2).any(|i| self.slot_id(i) == k.id) {
                continue;
            }
            let Some(i) = (0..2).find(|&i| self.slot_id(i) == 0) else {
                continue; // cannot happen: at most two keys are held
            };
            let s = k.key.sip();
            // SAFETY (of the projections): as above.
            self.0
                .store(|p| unsafe { &raw const (*p).slots[i].k0 }, s.k0);
            self.0
                .store(|p| unsafe { &raw const (*p).slots[i].k1 }, s.k1);
            for (j, w) in k.mac.nh.iter().enumerate() {
                // SAFETY (of the projection): as above; `j` < NH_KEY_WORDS.
                self.0
                    .store(|p| unsafe { &raw const (*p).slots[i].nh[j] }, *w);
            }
            self.0
                .store(|p| unsafe { &raw const (*p).slots[i].id }, k.id as u64);
        }
        let send = (0..2).find(|&i| self.slot_id(i) == h.send).unwrap_or(0);
        // SAFETY (of the projections): as above.
        self.0
            .store(|p| unsafe { &raw const (*p).newest }, h.newest.id as u64);
        self.0
            .store(|p| unsafe { &raw const (*p).send }, send as u64);
    }

    /// The newest key id the peer advertised in a frame that verified (0: none yet).
    pub fn peer_newest(&self) -> u8 {
        // SAFETY (of the projection): as above.
        self.0.load(|p| unsafe { &raw const (*p).peer_newest }) as u8
    }
}
