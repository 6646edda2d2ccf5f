//! The one-entry mmapable array maps shared with the kernel programs (`SEQ`, `CHAN`),
//! mapped into the daemon so their fields are read and written with plain atomic
//! instructions instead of a syscall per access (the VMM's output path stores
//! `CHAN.vm_last` before every output batch).
//!
//! Each map value has a single owner for all of its fields (ARCHITECTURE.md, "Maps and
//! their owners"): `SEQ` is written by the kernel only and mapped read-only here;
//! `CHAN` is written by the daemon only. `KACK` is the exception: the kernel and the
//! daemon both raise its fields, each with one atomic read-modify-write on the word.
use std::{
    os::fd::{AsFd, AsRawFd},
    ptr::NonNull,
    sync::atomic::{AtomicU64, Ordering},
};

use aya::maps::{Map, MapData};

use super::DataPlaneError;

/// A mapping of entry 0 of a `BPF_F_MMAPABLE` array map whose value is `T`, a
/// `#[repr(C)]` struct of `u64` fields.
pub struct Mapped<T> {
    ptr: NonNull<T>,
    len: usize,
    // Keeps the map alive as long as the mapping (the kernel would keep it anyway).
    _map: MapData,
}

// SAFETY: the mapping is shared memory accessed only through atomic operations on its
// u64 fields (see `load`/`store`); no references to the value are handed out.
unsafe impl<T> Send for Mapped<T> {}
// SAFETY: as above.
unsafe impl<T> Sync for Mapped<T> {}

impl<T> Mapped<T> {
    pub fn new(name: &'static str, map: Map, writable: bool) -> Result<Self, DataPlaneError> {
        let data = match map {
            Map::Array(d) => d,
            _ => {
                return Err(DataPlaneError::Mmap {
                    name,
                    error: std::io::Error::other("not an array map"),
                });
            }
        };
        let page = 4096;
        let len = std::mem::size_of::<T>().div_ceil(page) * page;
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        let fd = data.fd().as_fd().as_raw_fd();
        // SAFETY: maps `len` bytes of the array map behind `fd` (created with
        // BPF_F_MMAPABLE, one entry of size_of::<T>() <= len) as shared memory; the
        // result is checked for MAP_FAILED before use.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, libc::MAP_SHARED, fd, 0) };
        if p == libc::MAP_FAILED {
            return Err(DataPlaneError::Mmap {
                name,
                error: std::io::Error::last_os_error(),
            });
        }
        Ok(Mapped {
            ptr: NonNull::new(p as *mut T).expect("mmap returned null"),
            len,
            _map: data,
        })
    }

    fn field(&self, f: impl FnOnce(*const T) -> *const u64) -> &AtomicU64 {
        let p = f(self.ptr.as_ptr());
        // SAFETY: `p` points to an 8-byte aligned u64 field inside the live mapping (the
        // map value starts page-aligned and T is repr(C) of u64 fields); AtomicU64 has
        // the layout of u64. The kernel accesses the same memory with atomic
        // instructions (BPF_ATOMIC) or plain aligned 8-byte loads, so these are
        // race-free atomic accesses on both sides.
        unsafe { &*(p as *const AtomicU64) }
    }

    /// Atomic load of a field (Acquire: what the writer stored before it is visible).
    pub fn load(&self, f: impl FnOnce(*const T) -> *const u64) -> u64 {
        self.field(f).load(Ordering::Acquire)
    }

    /// Atomic store to a field of a writable mapping (Release: everything this thread
    /// did before, e.g. sending the log frames an output depends on, happens before a
    /// program reads the new value).
    pub fn store(&self, f: impl FnOnce(*const T) -> *const u64, v: u64) {
        self.field(f).store(v, Ordering::Release)
    }

    /// Atomic max on a field of a writable mapping (SeqCst, as the kernel's BPF atomics
    /// are full barriers); returns the previous value.
    pub fn fetch_max(&self, f: impl FnOnce(*const T) -> *const u64, v: u64) -> u64 {
        self.field(f).fetch_max(v, Ordering::SeqCst)
    }

    /// Atomic or on a field of a writable mapping (SeqCst); returns the previous value.
    pub fn fetch_or(&self, f: impl FnOnce(*const T) -> *const u64, v: u64) -> u64 {
        self.field(f).fetch_or(v, Ordering::SeqCst)
    }

    /// Atomic compare-and-exchange (SeqCst); true if `current` was replaced by `new`.
    pub fn compare_exchange(
        &self,
        f: impl FnOnce(*const T) -> *const u64,
        current: u64,
        new: u64,
    ) -> bool {
        self.field(f)
            .compare_exchange(current, new, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
    }
}

impl<T> Drop for Mapped<T> {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`, once.
        unsafe { libc::munmap(self.ptr.as_ptr() as *mut _, self.len) };
    }
}
