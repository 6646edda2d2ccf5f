//! The keyspace: string keys and values with expiry on the guest's device clock.
//!
//! Expiry is exact and deterministic: every key with a TTL is also in an index ordered by
//! deadline; a key is removed when it is touched after its deadline (lazy) or when the
//! service loop pops due deadlines (active, a bounded number per call). Time is always
//! the device clock value the caller read for the current loop iteration, which is logged
//! and replayed, so a key expires at the same guest exit on primary and backup.
use alloc::boxed::Box;
use alloc::collections::{BTreeMap, BTreeSet, VecDeque};
use alloc::vec::Vec;

pub type Key = Box<[u8]>;

pub struct Entry {
    pub value: Vec<u8>,
    /// Device-clock deadline in ms; 0 = no expiry.
    pub expire_ms: u64,
}

/// Estimated per-key overhead beyond key and value bytes (tree node share, allocation
/// headers): used for `used_memory_dataset`.
const ENTRY_OVERHEAD: usize = 64;

#[derive(Default)]
pub struct Keyspace {
    map: BTreeMap<Key, Entry>,
    expires: BTreeSet<(u64, Key)>,
    /// Flushed keyspaces, freed a bounded number of keys at a time (no stall on FLUSHALL).
    lazy: VecDeque<BTreeMap<Key, Entry>>,
    lazy_keys: usize,
    /// Estimated bytes held by live keys.
    dataset_bytes: usize,
    pub expired_keys: u64,
}

fn cost(k: &[u8], e: &Entry) -> usize {
    let ttl = if e.expire_ms != 0 {
        k.len() + ENTRY_OVERHEAD
    } else {
        0
    };
    k.len() + e.value.capacity() + ENTRY_OVERHEAD + ttl
}

impl Keyspace {
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn expires_len(&self) -> usize {
        self.expires.len()
    }

    pub fn dataset_bytes(&self) -> usize {
        self.dataset_bytes
    }

    /// Keys of flushed keyspaces not freed yet.
    pub fn lazyfree_pending(&self) -> usize {
        self.lazy_keys
    }

    fn expired(e: &Entry, now_ms: u64) -> bool {
        e.expire_ms != 0 && e.expire_ms <= now_ms
    }

    /// Removes `key` if it has expired at `now_ms`. True if it was removed.
    fn expire_if_due(&mut self, key: &[u8], now_ms: u64) -> bool {
        match self.map.get(key) {
            Some(e) if Self::expired(e, now_ms) => {
                self.remove(key);
                self.expired_keys += 1;
                true
            }
            _ => false,
        }
    }

    /// The live entry of `key` at `now_ms`.
    pub fn get(&mut self, key: &[u8], now_ms: u64) -> Option<&Entry> {
        self.expire_if_due(key, now_ms);
        self.map.get(key)
    }

    pub fn contains(&mut self, key: &[u8], now_ms: u64) -> bool {
        self.get(key, now_ms).is_some()
    }

    /// Mutable access to the value of a live key (the caller must call
    /// [`Keyspace::value_resized`] if the value's capacity may have changed).
    pub fn get_mut(&mut self, key: &[u8], now_ms: u64) -> Option<&mut Entry> {
        self.expire_if_due(key, now_ms);
        self.map.get_mut(key)
    }

    /// Accounts a change of a value's capacity from `old_cap` to `new_cap`.
    pub fn value_resized(&mut self, old_cap: usize, new_cap: usize) {
        self.dataset_bytes = self.dataset_bytes + new_cap - old_cap;
    }

    /// Sets `key` to `value`. `keep_ttl` keeps an existing expiry; otherwise any expiry
    /// is cleared. Returns whether the key existed.
    pub fn set(&mut self, key: &[u8], value: Vec<u8>, keep_ttl: bool, now_ms: u64) -> bool {
        self.expire_if_due(key, now_ms);
        if let Some(e) = self.map.get_mut(key) {
            let old = cost(key, e);
            e.value = value;
            let had_ttl = e.expire_ms;
            if !keep_ttl && had_ttl != 0 {
                e.expire_ms = 0;
                self.expires.remove(&(had_ttl, Box::from(key)));
            }
            let new = cost(key, self.map.get(key).expect("present"));
            self.dataset_bytes = self.dataset_bytes + new - old;
            return true;
        }
        let e = Entry {
            value,
            expire_ms: 0,
        };
        self.dataset_bytes += cost(key, &e);
        self.map.insert(Box::from(key), e);
        false
    }

    /// Sets the expiry of an existing key (device-clock ms, > 0).
    pub fn set_expire(&mut self, key: &[u8], at_ms: u64) {
        let Some(e) = self.map.get_mut(key) else {
            return;
        };
        let old = cost(key, e);
        if e.expire_ms != 0 {
            self.expires.remove(&(e.expire_ms, Box::from(key)));
        }
        e.expire_ms = at_ms;
        self.expires.insert((at_ms, Box::from(key)));
        let new = cost(key, e);
        self.dataset_bytes = self.dataset_bytes + new - old;
    }

    /// Clears the expiry of a live key; true if it had one.
    pub fn persist(&mut self, key: &[u8], now_ms: u64) -> bool {
        self.expire_if_due(key, now_ms);
        let Some(e) = self.map.get_mut(key) else {
            return false;
        };
        if e.expire_ms == 0 {
            return false;
        }
        let old = cost(key, e);
        self.expires.remove(&(e.expire_ms, Box::from(key)));
        e.expire_ms = 0;
        let new = cost(key, e);
        self.dataset_bytes = self.dataset_bytes + new - old;
        true
    }

    /// Removes a key (live or not); true if it was present.
    pub fn remove(&mut self, key: &[u8]) -> bool {
        let Some(e) = self.map.remove(key) else {
            return false;
        };
        self.dataset_bytes -= cost(key, &e);
        if e.expire_ms != 0 {
            self.expires.remove(&(e.expire_ms, Box::from(key)));
        }
        true
    }

    /// Deletes a live key; true if it existed.
    pub fn delete(&mut self, key: &[u8], now_ms: u64) -> bool {
        if self.expire_if_due(key, now_ms) {
            return false;
        }
        self.remove(key)
    }

    /// Pops up to `budget` keys whose deadline is at or before `now_ms`. Returns the
    /// number removed; if it equals `budget`, more may be due.
    pub fn active_expire(&mut self, now_ms: u64, budget: usize) -> usize {
        let mut n = 0;
        while n < budget {
            match self.expires.first() {
                Some((at, _)) if *at <= now_ms => {}
                _ => break,
            }
            let (_, key) = self.expires.pop_first().expect("checked");
            if let Some(e) = self.map.remove(&key) {
                // The index entry is gone already; account as `remove` would.
                self.dataset_bytes -= cost(&key, &e);
                self.expired_keys += 1;
            }
            n += 1;
        }
        n
    }

    /// Earliest expiry deadline, if any (for the idle wake-up).
    pub fn next_expiry(&self) -> Option<u64> {
        self.expires.first().map(|(at, _)| *at)
    }

    /// Empties the keyspace at once; the old keys are freed later by [`Keyspace::lazy_free`].
    pub fn flush(&mut self) {
        let old = core::mem::take(&mut self.map);
        self.lazy_keys += old.len();
        if !old.is_empty() {
            self.lazy.push_back(old);
        }
        self.expires = BTreeSet::new();
        self.dataset_bytes = 0;
    }

    /// Frees up to `budget` keys of flushed keyspaces; true if some are left.
    pub fn lazy_free(&mut self, budget: usize) -> bool {
        let mut n = 0;
        while n < budget {
            let Some(m) = self.lazy.front_mut() else {
                return false;
            };
            if m.pop_first().is_some() {
                n += 1;
                self.lazy_keys -= 1;
            } else {
                self.lazy.pop_front();
            }
        }
        self.lazy_keys > 0
    }

    /// Live keys matching `pattern` at `now_ms`, in key order.
    pub fn keys(&self, pattern: &[u8], now_ms: u64, mut f: impl FnMut(&[u8])) {
        let all = pattern == b"*";
        for (k, e) in &self.map {
            if !Self::expired(e, now_ms) && (all || crate::glob::matches(pattern, k, false)) {
                f(k);
            }
        }
    }

    /// Sum of remaining TTLs of live keys with a TTL and their count (for `avg_ttl`).
    pub fn ttl_sum(&self, now_ms: u64) -> (u128, u64) {
        let mut s = 0u128;
        let mut n = 0u64;
        for (at, _) in &self.expires {
            if *at > now_ms {
                s += (*at - now_ms) as u128;
                n += 1;
            }
        }
        (s, n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    #[test]
    fn expiry_lazy_and_active() {
        let mut ks = Keyspace::default();
        ks.set(b"a", vec![1], false, 0);
        ks.set(b"b", vec![2], false, 0);
        ks.set_expire(b"a", 100);
        ks.set_expire(b"b", 200);
        assert_eq!(ks.expires_len(), 2);
        assert!(ks.get(b"a", 99).is_some());
        assert!(ks.get(b"a", 100).is_none(), "lazy expiry at the deadline");
        assert_eq!(ks.active_expire(150, 10), 0);
        assert_eq!(ks.active_expire(200, 10), 1);
        assert_eq!(ks.expired_keys, 2);
        assert!(ks.is_empty());
        assert_eq!(ks.dataset_bytes(), 0);
        assert_eq!(ks.expires_len(), 0);
    }

    #[test]
    fn overwrite_clears_ttl_unless_kept() {
        let mut ks = Keyspace::default();
        ks.set(b"k", vec![1], false, 0);
        ks.set_expire(b"k", 50);
        ks.set(b"k", vec![2], true, 0);
        assert_eq!(ks.get(b"k", 0).unwrap().expire_ms, 50);
        ks.set(b"k", vec![3], false, 0);
        assert_eq!(ks.get(b"k", 0).unwrap().expire_ms, 0);
        assert_eq!(ks.expires_len(), 0);
        assert!(!ks.persist(b"k", 0));
    }

    #[test]
    fn flush_frees_lazily() {
        let mut ks = Keyspace::default();
        for i in 0..100u32 {
            ks.set(&i.to_be_bytes(), vec![0; 10], false, 0);
        }
        ks.flush();
        assert!(ks.is_empty());
        assert_eq!(ks.dataset_bytes(), 0);
        assert_eq!(ks.lazyfree_pending(), 100);
        assert!(ks.lazy_free(60));
        assert!(!ks.lazy_free(60));
        assert_eq!(ks.lazyfree_pending(), 0);
    }
}
