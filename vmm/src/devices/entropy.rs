//! Entropy device: register `REG_ENTROPY` (read) returns 64 random bits from the host's
//! getrandom(2) in record/free mode, or the logged value in replay. The guest seeds
//! smoltcp (TCP initial sequence numbers, ephemeral ports) from it and never uses RDRAND.

/// 64 random bits from the host.
pub fn host_random() -> u64 {
    let mut v = 0u64;
    // SAFETY: getrandom(2) writes at most 8 bytes into the live local `v`.
    let n = unsafe { libc::getrandom(&mut v as *mut u64 as *mut libc::c_void, 8, 0) };
    if n != 8 {
        // getrandom on Linux >= 3.17 does not fail for 8 bytes once the pool is ready;
        // fall back to time-derived bits rather than abort the VM.
        v ^= std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
    }
    v
}
