//! Guest RAM: one anonymous mapping (vm-memory `GuestMemoryMmap`) at guest physical 0.
//!
//! Besides bounds-checked access, it keeps a hash per 4 KiB page so that the state hash
//! (divergence checks) only rehashes pages dirtied since the last check: pages the guest
//! wrote (KVM dirty log) plus pages the VMM wrote (tracked here).
use crate::error::{Error, Result};
use crate::hash::{hash_bytes, hash_words};
use crate::vstate::dirty::PageBitmap;
use std::sync::Arc;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

pub const PAGE_SIZE: usize = 4096;
/// Seed of the hash of an all-zero page.
const ZERO_PAGE_SEED: u64 = 0x5a5a_0000_0000_0001;

pub struct GuestRam {
    mem: GuestMemoryMmap<()>,
    host: *mut u8,
    size: usize,
    /// Pages written by the VMM since the last hash update (bitmap, 1 bit per page).
    vmm_dirty: Vec<u64>,
    page_hash: Vec<u64>,
    /// Pages written (guest or VMM) since a state transfer last took them (shared with
    /// the KVM dirty log and the transfer thread).
    written: Arc<PageBitmap>,
}

// SAFETY: `host` points into the mapping owned by `mem`, which lives as long as `self`;
// all access goes through `&self`/`&mut self`, and the vCPU only runs while the owner of
// this struct is blocked in KVM_RUN on the same thread.
unsafe impl Send for GuestRam {}

impl GuestRam {
    pub fn new(size: usize) -> Result<Self> {
        if !size.is_multiple_of(PAGE_SIZE) || size == 0 {
            return Err(Error::Memory(format!(
                "RAM size {size} is not a positive multiple of 4 KiB"
            )));
        }
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), size)])
            .map_err(|e| Error::Memory(format!("cannot map {size} bytes of guest RAM: {e}")))?;
        let host = mem
            .get_host_address(GuestAddress(0))
            .map_err(|e| Error::Memory(format!("no host address for guest RAM: {e}")))?;
        let pages = size / PAGE_SIZE;
        Ok(GuestRam {
            mem,
            host,
            size,
            vmm_dirty: vec![0; pages.div_ceil(64)],
            page_hash: vec![0; pages],
            written: Arc::new(PageBitmap::new(pages)),
        })
    }

    pub fn size(&self) -> usize {
        self.size
    }

    pub fn host_addr(&self) -> u64 {
        self.host as u64
    }

    pub fn mmap(&self) -> &GuestMemoryMmap<()> {
        &self.mem
    }

    /// The whole RAM (only while the vCPU is stopped, which is whenever we hold `&self`).
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `host` maps `size` bytes for the lifetime of `self.mem`.
        unsafe { std::slice::from_raw_parts(self.host, self.size) }
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as `as_slice`; `&mut self` makes this the only VMM-side reference.
        unsafe { std::slice::from_raw_parts_mut(self.host, self.size) }
    }

    fn range(&self, addr: u64, len: usize) -> Result<std::ops::Range<usize>> {
        let start = usize::try_from(addr)
            .map_err(|_| Error::Memory(format!("address {addr:#x} out of range")))?;
        match start.checked_add(len) {
            Some(end) if end <= self.size => Ok(start..end),
            _ => Err(Error::Memory(format!(
                "access {addr:#x}+{len} beyond guest RAM ({} bytes)",
                self.size
            ))),
        }
    }

    pub fn read(&self, addr: u64, buf: &mut [u8]) -> Result<()> {
        let r = self.range(addr, buf.len())?;
        buf.copy_from_slice(&self.as_slice()[r]);
        Ok(())
    }

    pub fn slice(&self, addr: u64, len: usize) -> Result<&[u8]> {
        let r = self.range(addr, len)?;
        Ok(&self.as_slice()[r])
    }

    pub fn write(&mut self, addr: u64, data: &[u8]) -> Result<()> {
        let r = self.range(addr, data.len())?;
        self.as_mut_slice()[r.clone()].copy_from_slice(data);
        // After the write: a transfer that takes the bit copies the new bytes.
        self.mark_dirty(r.start, r.len());
        Ok(())
    }

    pub fn read_u64(&self, addr: u64) -> Result<u64> {
        let mut b = [0u8; 8];
        self.read(addr, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    pub fn write_u64(&mut self, addr: u64, v: u64) -> Result<()> {
        self.write(addr, &v.to_le_bytes())
    }

    pub fn read_u16(&self, addr: u64) -> Result<u16> {
        let mut b = [0u8; 2];
        self.read(addr, &mut b)?;
        Ok(u16::from_le_bytes(b))
    }

    pub fn write_u16(&mut self, addr: u64, v: u16) -> Result<()> {
        self.write(addr, &v.to_le_bytes())
    }

    fn mark_dirty(&mut self, start: usize, len: usize) {
        if len == 0 {
            return;
        }
        let (first, last) = (start / PAGE_SIZE, (start + len - 1) / PAGE_SIZE);
        for p in first..=last {
            self.vmm_dirty[p / 64] |= 1 << (p % 64);
        }
        self.written.set_range(first, last);
    }

    /// Hash of page `p` (an all-zero page, the state of most of a large guest's RAM, is
    /// recognised without hashing it).
    fn page_hash(&self, p: usize) -> u64 {
        let page = &self.as_slice()[p * PAGE_SIZE..(p + 1) * PAGE_SIZE];
        // SAFETY (of the view only): u64 has no invalid bit patterns; `align_to` puts
        // any unaligned bytes in the prefix/suffix, which are checked too.
        let (pre, words, post) = unsafe { page.align_to::<u64>() };
        if pre.iter().all(|&b| b == 0)
            && words.iter().all(|&w| w == 0)
            && post.iter().all(|&b| b == 0)
        {
            hash_words(&[p as u64], ZERO_PAGE_SEED)
        } else {
            hash_bytes(page, p as u64)
        }
    }

    /// Recomputes every page hash (after load or restore).
    pub fn rehash_all(&mut self) {
        for p in 0..self.page_hash.len() {
            self.page_hash[p] = self.page_hash(p);
        }
        self.vmm_dirty.iter_mut().for_each(|w| *w = 0);
    }

    /// Marks every page's hash stale: the next `update_hashes` recomputes them all (a
    /// state transfer's receiver defers this work past its first ack).
    pub fn mark_all_stale(&mut self) {
        let pages = self.page_hash.len();
        for (w, word) in self.vmm_dirty.iter_mut().enumerate() {
            let first = w * 64;
            let n = pages.saturating_sub(first).min(64);
            *word = if n == 64 { u64::MAX } else { (1u64 << n) - 1 };
        }
    }

    /// Rehashes the pages in `kvm_dirty` (a KVM dirty bitmap) and those the VMM wrote.
    /// Returns the number of pages rehashed.
    pub fn update_hashes(&mut self, kvm_dirty: &[u64]) -> usize {
        let mut n = 0;
        for w in 0..self.vmm_dirty.len() {
            let mut bits = self.vmm_dirty[w] | kvm_dirty.get(w).copied().unwrap_or(0);
            self.vmm_dirty[w] = 0;
            while bits != 0 {
                let b = bits.trailing_zeros() as usize;
                bits &= bits - 1;
                let p = w * 64 + b;
                if p < self.page_hash.len() {
                    self.page_hash[p] = self.page_hash(p);
                    n += 1;
                }
            }
        }
        n
    }

    /// Hash of all of RAM, from the per-page hashes (call `update_hashes` first).
    pub fn memory_hash(&self) -> u64 {
        hash_words(&self.page_hash, self.size as u64)
    }

    /// Full recomputation, independent of any dirty tracking (final checks).
    pub fn full_hash(&mut self) -> u64 {
        self.rehash_all();
        self.memory_hash()
    }

    /// Makes all of RAM zero (the receiving side of a state transfer, before pages
    /// arrive): the anonymous private mapping's pages are dropped and read back as zero.
    pub fn zero_all(&mut self) -> Result<()> {
        // SAFETY: `host` maps `size` bytes of a private anonymous mapping owned by `mem`;
        // MADV_DONTNEED only replaces their contents with zero-fill-on-demand pages (KVM
        // follows through its MMU notifier). No reference into RAM is held across this.
        let r = unsafe { libc::madvise(self.host.cast(), self.size, libc::MADV_DONTNEED) };
        if r != 0 {
            return Err(Error::Memory(format!(
                "madvise(MADV_DONTNEED) on guest RAM: {}",
                std::io::Error::last_os_error()
            )));
        }
        Ok(())
    }

    /// The bitmap of pages written since a transfer last took them.
    pub fn written(&self) -> &Arc<PageBitmap> {
        &self.written
    }
}
