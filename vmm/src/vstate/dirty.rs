//! Dirty-page tracking shared between the vCPU thread and a state transfer.
//!
//! KVM's dirty log (`KVM_GET_DIRTY_LOG`) returns and clears one bitmap, but two parties
//! need the pages written since *they* last looked: the vCPU thread, which rehashes them
//! for checkpoints, and a live state transfer on another thread, which sends them again
//! (pre-copy). [`DirtyLog`] owns the ioctl: every fetch ORs KVM's bits into both the
//! vCPU thread's pending set and the [`PageBitmap`] of pages written since the transfer
//! last took it, which also receives the pages the VMM itself writes (RX frames).
use crate::error::{Error, Result};
use kvm_ioctls::VmFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// One bit per guest page, set by writers on any thread, taken (read and cleared) by
/// one reader.
///
/// Ordering: a writer sets a page's bit *after* writing the page (`Release`), and the
/// reader clears the bit (`Acquire`) *before* copying the page. So a copy either sees a
/// write, or the write's bit is set again after the reader cleared it and the page is
/// sent again in a later round; no write is lost between rounds.
pub struct PageBitmap {
    words: Vec<AtomicU64>,
    pages: usize,
}

impl PageBitmap {
    pub fn new(pages: usize) -> PageBitmap {
        PageBitmap {
            words: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            pages,
        }
    }

    /// Marks pages `first..=last` written (call after writing them).
    pub fn set_range(&self, first: usize, last: usize) {
        for p in first..=last.min(self.pages.saturating_sub(1)) {
            self.words[p / 64].fetch_or(1 << (p % 64), Ordering::Release);
        }
    }

    /// ORs a KVM-format bitmap (1 bit per page, 64 pages per word) in.
    pub fn or_words(&self, bits: &[u64]) {
        for (w, &b) in self.words.iter().zip(bits) {
            if b != 0 {
                w.fetch_or(b, Ordering::Release);
            }
        }
    }

    /// Page numbers marked since the last call, in order; clears them.
    pub fn take(&self) -> Vec<u64> {
        let mut v = Vec::new();
        for (i, w) in self.words.iter().enumerate() {
            let mut b = w.swap(0, Ordering::Acquire);
            while b != 0 {
                let p = i * 64 + b.trailing_zeros() as usize;
                if p < self.pages {
                    v.push(p as u64);
                }
                b &= b - 1;
            }
        }
        v
    }

    /// Pages marked now (without clearing).
    pub fn count(&self) -> usize {
        self.words
            .iter()
            .map(|w| w.load(Ordering::Relaxed).count_ones() as usize)
            .sum()
    }
}

/// The owner of `KVM_GET_DIRTY_LOG` for one memory slot.
pub struct DirtyLog {
    fd: Arc<VmFd>,
    size: usize,
    /// Guest-written pages the vCPU thread has not taken yet (KVM format).
    for_hash: Mutex<Vec<u64>>,
    /// Pages written (guest or VMM) since the transfer side last took them.
    written: Arc<PageBitmap>,
}

impl DirtyLog {
    pub fn new(fd: Arc<VmFd>, size: usize, written: Arc<PageBitmap>) -> DirtyLog {
        let words = (size / crate::vstate::memory::PAGE_SIZE).div_ceil(64);
        DirtyLog {
            fd,
            size,
            for_hash: Mutex::new(vec![0; words]),
            written,
        }
    }

    /// Fetches KVM's bitmap (which clears it) into both consumers. Holding `for_hash`
    /// serialises fetches, so no bit can reach one consumer and miss the other.
    fn fetch(&self, for_hash: &mut [u64]) -> Result<()> {
        let bits = self
            .fd
            .get_dirty_log(0, self.size)
            .map_err(Error::ioctl("KVM_GET_DIRTY_LOG"))?;
        for (h, b) in for_hash.iter_mut().zip(&bits) {
            *h |= b;
        }
        self.written.or_words(&bits);
        Ok(())
    }

    /// vCPU thread: pages the guest wrote since its last call (KVM format).
    pub fn take_for_hash(&self) -> Result<Vec<u64>> {
        let mut g = self.for_hash.lock().unwrap_or_else(|e| e.into_inner());
        self.fetch(&mut g)?;
        let words = g.len();
        Ok(std::mem::replace(&mut *g, vec![0; words]))
    }

    /// Transfer side (any thread): pages written by the guest or the VMM since its last
    /// call, by number.
    pub fn take_written(&self) -> Result<Vec<u64>> {
        {
            let mut g = self.for_hash.lock().unwrap_or_else(|e| e.into_inner());
            self.fetch(&mut g)?;
        }
        Ok(self.written.take())
    }
}
