//! Frames received in "tagged input" mode, by their data-plane key (epoch, sequence).
//!
//! The recording VMM logs a frame that arrived with the data plane's `LogHdr` as an
//! RX_FRAME_REF entry carrying `FtHdr.epoch` (payload) and `FtHdr.seq` (`value`); the
//! backup's daemon puts every input frame it receives on the logging link into a
//! [`FrameStore`] under the same key, and the replaying VMM fetches it from there:
//! - it waits for a frame that is not there yet ([`FrameStore::wait`]: the input stream
//!   and the VMM stream travel separately, so a reference can arrive before its frame);
//! - once it has delivered a frame it removes it, and evicts every frame at or below
//!   `(epoch, seq - reorder window)` (and all older epochs): frames the primary's VM never
//!   received are never referenced, and without eviction they would stay for ever.
//!   The window allows for input frames that reach the primary's VM in a slightly
//!   different order than their sequence numbers were assigned (XDP runs on several
//!   CPUs); see `VmmConfig::frame_reorder_window`;
//! - a closed store ([`FrameStore::close`]: the daemon abandons the replay) ends a wait
//!   at once;
//! - so does a frame the store knows will never come ([`FrameWait::Never`]): one at or
//!   below what it evicted (later puts of such keys are ignored), or, in a store fed in
//!   key order ([`MemFrameStore::in_order`]: the backup's daemon puts input in sequence
//!   order, exactly once), one below a key already put. Waiting would stall the replay
//!   for ever; the VMM fails instead and says which frame.
use std::collections::BTreeMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Key of an input frame: the data plane's fencing epoch and log sequence number
/// (`FtHdr.epoch`, `FtHdr.seq`). Ordered by epoch, then sequence.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FrameKey {
    pub epoch: u64,
    pub seq: u64,
}

impl std::fmt::Display for FrameKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "epoch {} sequence {}", self.epoch, self.seq)
    }
}

/// Result of [`FrameStore::wait`].
#[derive(Debug, PartialEq, Eq)]
pub enum FrameWait {
    Ready(Vec<u8>),
    /// Not there within the timeout; it may still come.
    NotYet,
    /// Not there, and the store was closed: it never will.
    Closed,
    /// Not there, and it never will be: why.
    Never(&'static str),
}

/// Where the replaying VMM finds the frames that RX_FRAME_REF entries refer to.
pub trait FrameStore: Send + Sync {
    /// Stores a received frame (the daemon, or a recording VMM in tests).
    fn put(&self, key: FrameKey, frame: &[u8]);
    /// The frame, waiting at most `timeout` for it to be put.
    fn wait(&self, key: FrameKey, timeout: Duration) -> FrameWait;
    /// The frame if it is there now.
    fn get(&self, key: FrameKey) -> Option<Vec<u8>> {
        match self.wait(key, Duration::ZERO) {
            FrameWait::Ready(f) => Some(f),
            _ => None,
        }
    }
    /// Drops one frame (the replay delivered it).
    fn remove(&self, key: FrameKey);
    /// Drops every frame with a key at or below `key` (older epochs entirely), and
    /// ignores later puts of such keys (late duplicates).
    fn evict_through(&self, key: FrameKey);
    /// No more frames will be put: waits for missing frames end with
    /// [`FrameWait::Closed`].
    fn close(&self);
}

#[derive(Default)]
struct State {
    frames: BTreeMap<FrameKey, Vec<u8>>,
    bytes: usize,
    peak: usize,
    floor: Option<FrameKey>,
    closed: bool,
    /// Frames are put in key order (see [`MemFrameStore::in_order`]).
    in_order: bool,
    last_put: Option<FrameKey>,
    /// Readers inside `wait` for a frame that was not here.
    waiters: usize,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    put: Condvar,
}

/// In-memory [`FrameStore`]; clones share the same store.
#[derive(Default, Clone)]
pub struct MemFrameStore {
    shared: Arc<Shared>,
}

impl MemFrameStore {
    /// A store whose frames are put in key order, each once (the backup's input stream):
    /// a missing frame below one already put will never come.
    pub fn in_order() -> MemFrameStore {
        let s = MemFrameStore::default();
        s.lock().in_order = true;
        s
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves the map consistent (single operations).
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Frames held now.
    pub fn len(&self) -> usize {
        self.lock().frames.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes of the frames held now.
    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }

    /// Most frames held at any time.
    pub fn peak_len(&self) -> usize {
        self.lock().peak
    }

    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// A reader waits for a frame that is not here now (the replay stands still until
    /// it arrives).
    pub fn is_waited_on(&self) -> bool {
        self.lock().waiters > 0
    }

    /// Closes the store and hands out every frame with a key above `after`, in key order
    /// (at go-live: input that arrived but that the primary's guest never consumed).
    pub fn take_after(&self, after: FrameKey) -> Vec<(FrameKey, Vec<u8>)> {
        let mut s = self.lock();
        s.closed = true;
        let frames = std::mem::take(&mut s.frames);
        s.bytes = 0;
        drop(s);
        self.shared.put.notify_all();
        frames.into_iter().filter(|(k, _)| *k > after).collect()
    }
}

impl FrameStore for MemFrameStore {
    fn put(&self, key: FrameKey, frame: &[u8]) {
        let mut s = self.lock();
        if s.closed || s.floor.is_some_and(|f| key <= f) {
            return;
        }
        s.last_put = s.last_put.max(Some(key));
        if let Some(old) = s.frames.insert(key, frame.to_vec()) {
            s.bytes -= old.len();
        }
        s.bytes += frame.len();
        s.peak = s.peak.max(s.frames.len());
        drop(s);
        self.shared.put.notify_all();
    }

    fn wait(&self, key: FrameKey, timeout: Duration) -> FrameWait {
        let deadline = Instant::now().checked_add(timeout);
        let mut s = self.lock();
        if let Some(f) = s.frames.get(&key) {
            return FrameWait::Ready(f.clone());
        }
        s.waiters += 1;
        let r = loop {
            if let Some(f) = s.frames.get(&key) {
                break FrameWait::Ready(f.clone());
            }
            if s.closed {
                break FrameWait::Closed;
            }
            if s.floor.is_some_and(|f| key <= f) {
                break FrameWait::Never(
                    "it was evicted (it is older than the reorder window behind a frame the replay delivered)",
                );
            }
            if s.in_order && s.last_put.is_some_and(|l| key < l) {
                break FrameWait::Never(
                    "the input stream delivered later frames without it (this backup acked input it never received)",
                );
            }
            let left = match deadline {
                Some(d) => d.saturating_duration_since(Instant::now()),
                None => Duration::from_secs(3600),
            };
            if left.is_zero() {
                break FrameWait::NotYet;
            }
            s = self
                .shared
                .put
                .wait_timeout(s, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        };
        s.waiters -= 1;
        r
    }

    fn remove(&self, key: FrameKey) {
        let mut s = self.lock();
        if let Some(old) = s.frames.remove(&key) {
            s.bytes -= old.len();
        }
    }

    fn evict_through(&self, key: FrameKey) {
        let mut s = self.lock();
        let above = match key.seq.checked_add(1) {
            Some(seq) => FrameKey {
                epoch: key.epoch,
                seq,
            },
            None => FrameKey {
                epoch: key.epoch.saturating_add(1),
                seq: 0,
            },
        };
        let keep = s.frames.split_off(&above);
        let gone = std::mem::replace(&mut s.frames, keep);
        s.bytes -= gone.values().map(Vec::len).sum::<usize>();
        s.floor = Some(s.floor.map_or(key, |f| f.max(key)));
    }

    fn close(&self) {
        self.lock().closed = true;
        self.shared.put.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(epoch: u64, seq: u64) -> FrameKey {
        FrameKey { epoch, seq }
    }

    #[test]
    fn keyed_by_epoch_and_sequence() {
        let s = MemFrameStore::default();
        s.put(k(1, 7), b"abc");
        s.put(k(2, 7), b"defg");
        assert_eq!(s.get(k(1, 7)).as_deref(), Some(&b"abc"[..]));
        assert_eq!(s.get(k(2, 7)).as_deref(), Some(&b"defg"[..]));
        assert!(s.get(k(1, 8)).is_none());
        assert_eq!((s.len(), s.bytes()), (2, 7));
        s.remove(k(1, 7));
        assert_eq!((s.len(), s.bytes()), (1, 4));
    }

    #[test]
    fn eviction_drops_older_keys_and_late_duplicates() {
        let s = MemFrameStore::default();
        for seq in 1..=10 {
            s.put(k(1, seq), &[0; 100]);
            s.put(k(2, seq), &[0; 100]);
        }
        s.evict_through(k(2, 4));
        assert_eq!(s.len(), 6, "epoch 1 entirely, epoch 2 up to 4");
        assert!(s.get(k(2, 4)).is_none() && s.get(k(2, 5)).is_some());
        assert_eq!(s.bytes(), 600);
        s.put(k(2, 3), &[1]); // a late duplicate of an evicted frame
        s.put(k(1, 11), &[1]);
        assert_eq!(s.len(), 6);
        assert_eq!(s.peak_len(), 20);
    }

    #[test]
    fn a_frame_that_can_never_come_is_not_waited_for() {
        let s = MemFrameStore::in_order();
        s.put(k(1, 5), b"x");
        assert_eq!(s.wait(k(1, 6), Duration::ZERO), FrameWait::NotYet);
        assert!(matches!(
            s.wait(k(1, 4), Duration::from_secs(10)),
            FrameWait::Never(w) if w.contains("later frames")
        ));
        assert!(matches!(
            s.wait(k(0, 9), Duration::from_secs(10)),
            FrameWait::Never(_)
        ));
        // Without the order promise a gap may still be filled.
        let s = MemFrameStore::default();
        s.put(k(1, 5), b"x");
        assert_eq!(s.wait(k(1, 4), Duration::ZERO), FrameWait::NotYet);
        s.evict_through(k(1, 5));
        assert!(matches!(
            s.wait(k(1, 4), Duration::from_secs(10)),
            FrameWait::Never(w) if w.contains("evicted")
        ));
    }

    #[test]
    fn wait_returns_a_frame_put_later_or_closed() {
        let s = MemFrameStore::default();
        let t = std::time::Instant::now();
        assert_eq!(
            s.wait(k(1, 1), Duration::from_millis(30)),
            FrameWait::NotYet
        );
        assert!(t.elapsed() >= Duration::from_millis(30));
        let s2 = s.clone();
        let h = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            s2.put(k(1, 1), b"late");
            std::thread::sleep(Duration::from_millis(50));
            s2.close();
        });
        assert_eq!(
            s.wait(k(1, 1), Duration::from_secs(10)),
            FrameWait::Ready(b"late".to_vec())
        );
        let t = std::time::Instant::now();
        assert_eq!(s.wait(k(1, 2), Duration::from_secs(10)), FrameWait::Closed);
        assert!(t.elapsed() < Duration::from_secs(5));
        h.join().unwrap();
        // A frame that is there is still returned after close.
        assert_eq!(s.get(k(1, 1)).as_deref(), Some(&b"late"[..]));
    }
}
