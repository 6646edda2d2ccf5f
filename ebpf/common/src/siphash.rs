//! SipHash-2-4 with a 64-bit tag (Aumasson and Bernstein, "SipHash: a fast short-input
//! PRF", 2012): the keyed MAC of the logging link's control frames
//! ([`crate::wire::frame_tag`]). One implementation serves the eBPF programs (which
//! check tags in XDP) and userspace (which makes and checks them).
//!
//! The key is 128 bits, taken as the SipHash reference does: `k0` = key bytes 0-7 and
//! `k1` = bytes 8-15, both little-endian ([`SipKey::from_bytes`]). Message bytes are
//! absorbed as little-endian 64-bit words; the last block carries the message length.
//!
//! [`siphash24_words`] hashes a message of exactly `8 * N` bytes given as its words: a
//! fixed-size loop without byte-level tail handling, which the BPF verifier accepts as
//! is (unrolled by the compiler, no packet-dependent bounds). [`siphash24`] hashes any
//! byte string (userspace and tests).

/// A SipHash key: the two little-endian halves of the 16 key bytes.
#[derive(Clone, Copy, Default, PartialEq, Eq)]
pub struct SipKey {
    pub k0: u64,
    pub k1: u64,
}

impl SipKey {
    pub const fn from_bytes(b: &[u8; 16]) -> SipKey {
        SipKey {
            k0: u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]),
            k1: u64::from_le_bytes([b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]]),
        }
    }
}

// The key is a secret: never print it.
impl core::fmt::Debug for SipKey {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("SipKey(..)")
    }
}

/// An incremental SipHash-2-4: [`Sip24::write_word`] for each whole little-endian
/// 64-bit word of the message, then [`Sip24::finish`] with the message's length in bytes
/// and its last `len % 8` bytes. The eBPF programs hash packet bytes with it word by word.
#[derive(Clone, Copy)]
pub struct Sip24 {
    v0: u64,
    v1: u64,
    v2: u64,
    v3: u64,
}

type State = Sip24;

impl Sip24 {
    #[inline(always)]
    pub fn new(key: &SipKey) -> Sip24 {
        State {
            v0: key.k0 ^ 0x736f_6d65_7073_6575,
            v1: key.k1 ^ 0x646f_7261_6e64_6f6d,
            v2: key.k0 ^ 0x6c79_6765_6e65_7261,
            v3: key.k1 ^ 0x7465_6462_7974_6573,
        }
    }

    #[inline(always)]
    fn round(&mut self) {
        self.v0 = self.v0.wrapping_add(self.v1);
        self.v1 = self.v1.rotate_left(13);
        self.v1 ^= self.v0;
        self.v0 = self.v0.rotate_left(32);
        self.v2 = self.v2.wrapping_add(self.v3);
        self.v3 = self.v3.rotate_left(16);
        self.v3 ^= self.v2;
        self.v0 = self.v0.wrapping_add(self.v3);
        self.v3 = self.v3.rotate_left(21);
        self.v3 ^= self.v0;
        self.v2 = self.v2.wrapping_add(self.v1);
        self.v1 = self.v1.rotate_left(17);
        self.v1 ^= self.v2;
        self.v2 = self.v2.rotate_left(32);
    }

    /// Absorbs one whole message word (little-endian: the next 8 message bytes).
    #[inline(always)]
    pub fn write_word(&mut self, m: u64) {
        self.compress(m);
    }

    /// Absorbs one message word (2 compression rounds).
    #[inline(always)]
    fn compress(&mut self, m: u64) {
        self.v3 ^= m;
        self.round();
        self.round();
        self.v0 ^= m;
    }

    /// The last block (`len` mod 256 in the top byte, `tail` = the message's last
    /// `len % 8` bytes, little-endian), then 4 finalization rounds.
    #[inline(always)]
    pub fn finish(mut self, len: usize, tail: u64) -> u64 {
        self.compress(((len as u64 & 0xff) << 56) | tail);
        self.v2 ^= 0xff;
        self.round();
        self.round();
        self.round();
        self.round();
        self.v0 ^ self.v1 ^ self.v2 ^ self.v3
    }
}

/// SipHash-2-4 of the `8 * N` bytes whose little-endian words are `m`.
#[inline(always)]
pub fn siphash24_words<const N: usize>(key: &SipKey, m: &[u64; N]) -> u64 {
    let mut s = State::new(key);
    let mut i = 0;
    while i < N {
        s.compress(m[i]);
        i += 1;
    }
    s.finish(8 * N, 0)
}

/// SipHash-2-4 of `data`.
pub fn siphash24(key: &SipKey, data: &[u8]) -> u64 {
    let mut s = State::new(key);
    let mut words = data.chunks_exact(8);
    for w in &mut words {
        let mut b = [0u8; 8];
        b.copy_from_slice(w);
        s.compress(u64::from_le_bytes(b));
    }
    let mut tail = [0u8; 8];
    let rest = words.remainder();
    tail[..rest.len()].copy_from_slice(rest);
    s.finish(data.len(), u64::from_le_bytes(tail))
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec::Vec;

    use super::*;

    /// The reference implementation's `vectors_sip64` (SipHash-2-4, 64-bit output): key
    /// `00 01 .. 0f`, message `00 01 .. (n-1)` for n = 0..63. Entry 15 is the paper's
    /// worked example (Appendix A).
    const VECTORS: [u64; 64] = [
        0x726fdb47dd0e0e31,
        0x74f839c593dc67fd,
        0x0d6c8009d9a94f5a,
        0x85676696d7fb7e2d,
        0xcf2794e0277187b7,
        0x18765564cd99a68d,
        0xcbc9466e58fee3ce,
        0xab0200f58b01d137,
        0x93f5f5799a932462,
        0x9e0082df0ba9e4b0,
        0x7a5dbbc594ddb9f3,
        0xf4b32f46226bada7,
        0x751e8fbc860ee5fb,
        0x14ea5627c0843d90,
        0xf723ca908e7af2ee,
        0xa129ca6149be45e5,
        0x3f2acc7f57c29bdb,
        0x699ae9f52cbe4794,
        0x4bc1b3f0968dd39c,
        0xbb6dc91da77961bd,
        0xbed65cf21aa2ee98,
        0xd0f2cbb02e3b67c7,
        0x93536795e3a33e88,
        0xa80c038ccd5ccec8,
        0xb8ad50c6f649af94,
        0xbce192de8a85b8ea,
        0x17d835b85bbb15f3,
        0x2f2e6163076bcfad,
        0xde4daaaca71dc9a5,
        0xa6a2506687956571,
        0xad87a3535c49ef28,
        0x32d892fad841c342,
        0x7127512f72f27cce,
        0xa7f32346f95978e3,
        0x12e0b01abb051238,
        0x15e034d40fa197ae,
        0x314dffbe0815a3b4,
        0x027990f029623981,
        0xcadcd4e59ef40c4d,
        0x9abfd8766a33735c,
        0x0e3ea96b5304a7d0,
        0xad0c42d6fc585992,
        0x187306c89bc215a9,
        0xd4a60abcf3792b95,
        0xf935451de4f21df2,
        0xa9538f0419755787,
        0xdb9acddff56ca510,
        0xd06c98cd5c0975eb,
        0xe612a3cb9ecba951,
        0xc766e62cfcadaf96,
        0xee64435a9752fe72,
        0xa192d576b245165a,
        0x0a8787bf8ecb74b2,
        0x81b3e73d20b49b6f,
        0x7fa8220ba3b2ecea,
        0x245731c13ca42499,
        0xb78dbfaf3a8d83bd,
        0xea1ad565322a1a0b,
        0x60e61c23a3795013,
        0x6606d7e446282b93,
        0x6ca4ecb15c5f91e1,
        0x9f626da15c9625f3,
        0xe51b38608ef25f57,
        0x958a324ceb064572,
    ];

    fn ref_key() -> SipKey {
        let mut k = [0u8; 16];
        for (i, b) in k.iter_mut().enumerate() {
            *b = i as u8;
        }
        SipKey::from_bytes(&k)
    }

    fn words<const N: usize>(data: &[u8]) -> [u64; N] {
        let mut w = [0u64; N];
        for (i, c) in data.chunks_exact(8).enumerate() {
            w[i] = u64::from_le_bytes(c.try_into().unwrap());
        }
        w
    }

    #[test]
    fn reference_vectors() {
        let key = ref_key();
        assert_eq!(key.k0, 0x0706050403020100);
        assert_eq!(key.k1, 0x0f0e0d0c0b0a0908);
        let msg: Vec<u8> = (0..64u8).collect();
        for (n, want) in VECTORS.iter().enumerate() {
            assert_eq!(siphash24(&key, &msg[..n]), *want, "message of {n} bytes");
        }
        // The fixed-size form, at every multiple of 8 the table has.
        assert_eq!(siphash24_words(&key, &words::<0>(&msg[..0])), VECTORS[0]);
        assert_eq!(siphash24_words(&key, &words::<1>(&msg[..8])), VECTORS[8]);
        assert_eq!(siphash24_words(&key, &words::<2>(&msg[..16])), VECTORS[16]);
        assert_eq!(siphash24_words(&key, &words::<4>(&msg[..32])), VECTORS[32]);
        assert_eq!(siphash24_words(&key, &words::<5>(&msg[..40])), VECTORS[40]);
        assert_eq!(siphash24_words(&key, &words::<7>(&msg[..56])), VECTORS[56]);
    }

    /// Against an independent implementation: the standard library's (deprecated, but
    /// still SipHash-2-4) `SipHasher`, with other keys and lengths than the table's.
    #[test]
    #[allow(deprecated)]
    fn matches_std_siphasher() {
        use core::hash::Hasher;
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for len in 0..200usize {
            let key = SipKey {
                k0: next(),
                k1: next(),
            };
            let data: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            let mut h = std::hash::SipHasher::new_with_keys(key.k0, key.k1);
            h.write(&data);
            assert_eq!(siphash24(&key, &data), h.finish(), "{len} bytes");
            if len == 40 {
                assert_eq!(siphash24_words(&key, &words::<5>(&data)), h.finish());
            }
        }
    }

    #[test]
    fn every_key_bit_and_message_bit_matters() {
        let key = ref_key();
        let m = [1u64, 2, 3, 4, 5];
        let t = siphash24_words(&key, &m);
        for bit in 0..64 {
            let k = SipKey {
                k0: key.k0 ^ (1 << bit),
                k1: key.k1,
            };
            assert_ne!(siphash24_words(&k, &m), t);
            let k = SipKey {
                k0: key.k0,
                k1: key.k1 ^ (1 << bit),
            };
            assert_ne!(siphash24_words(&k, &m), t);
            for w in 0..5 {
                let mut m2 = m;
                m2[w] ^= 1 << bit;
                assert_ne!(siphash24_words(&key, &m2), t);
            }
        }
    }

    #[test]
    fn the_key_is_not_printed() {
        assert_eq!(std::format!("{:?}", ref_key()), "SipKey(..)");
    }
}
