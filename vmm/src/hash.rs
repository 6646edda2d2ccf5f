//! Fast non-cryptographic hashing of guest state (divergence detection, not security).

/// Hashes `data` 8 bytes at a time (multiply-rotate mix; ~1 byte/cycle).
pub fn hash_bytes(data: &[u8], seed: u64) -> u64 {
    let mut h = seed ^ 0x9E37_79B9_7F4A_7C15 ^ (data.len() as u64);
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        let w = u64::from_le_bytes(c.try_into().expect("chunk of 8"));
        h = (h ^ w).wrapping_mul(0xFF51_AFD7_ED55_8CCD).rotate_left(31);
    }
    for &b in chunks.remainder() {
        h = (h ^ b as u64)
            .wrapping_mul(0xC4CE_B9FE_1A85_EC53)
            .rotate_left(17);
    }
    h ^ (h >> 29)
}

/// Hashes a slice of words.
pub fn hash_words(words: &[u64], seed: u64) -> u64 {
    let mut h = seed ^ 0x243F_6A88_85A3_08D3;
    for &w in words {
        h = (h ^ w).wrapping_mul(0xFF51_AFD7_ED55_8CCD).rotate_left(31);
    }
    h ^ (h >> 29)
}

pub use ft_common::vmlog::{FNV_OFFSET, fnv1a};
