//! Determinism check of a guest image: finds instructions that read time, randomness or
//! host identity directly (RDTSC, RDTSCP, RDRAND, RDSEED, CPUID) in its executable
//! segments. On this host they are not trapped, so a replica that executed one would
//! see a different value from the primary's and diverge. A replicated guest takes time
//! and entropy only from devices, whose values are logged.
//!
//! Used by vmm/build.rs (the build fails if the built-in guest contains one), by the
//! image loader (a custom image with one is refused) and by the tests.
use iced_x86::{Decoder, DecoderOptions, Mnemonic};

/// An instruction the guest must not contain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    pub addr: u64,
    pub mnemonic: &'static str,
}

const PT_LOAD: u32 = 1;
const PF_X: u32 = 1;

fn rd<const N: usize>(b: &[u8], off: usize) -> Option<[u8; N]> {
    b.get(off..off + N)?.try_into().ok()
}

/// Executable PT_LOAD segments of an ELF64 image: (load address, bytes). Malformed
/// headers yield what could be read (the loader reports malformed images itself).
fn exec_segments(elf: &[u8]) -> Vec<(u64, &[u8])> {
    let mut v = Vec::new();
    if elf.len() < 64 || &elf[..4] != b"\x7fELF" || elf[4] != 2 {
        return v;
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (
        rd::<8>(elf, 32).map(u64::from_le_bytes),
        rd::<2>(elf, 54).map(u16::from_le_bytes),
        rd::<2>(elf, 56).map(u16::from_le_bytes),
    ) else {
        return v;
    };
    for i in 0..phnum.min(64) as usize {
        let ph = phoff as usize + i * phentsize as usize;
        let (Some(ty), Some(flags), Some(off), Some(vaddr), Some(filesz)) = (
            rd::<4>(elf, ph).map(u32::from_le_bytes),
            rd::<4>(elf, ph + 4).map(u32::from_le_bytes),
            rd::<8>(elf, ph + 8).map(u64::from_le_bytes),
            rd::<8>(elf, ph + 16).map(u64::from_le_bytes),
            rd::<8>(elf, ph + 32).map(u64::from_le_bytes),
        ) else {
            continue;
        };
        if ty != PT_LOAD || flags & PF_X == 0 {
            continue;
        }
        let end = (off as usize)
            .saturating_add(filesz as usize)
            .min(elf.len());
        if let Some(bytes) = elf.get(off as usize..end) {
            v.push((vaddr, bytes));
        }
    }
    v
}

/// Every forbidden instruction in the executable segments of `elf`.
pub fn forbidden_instructions(elf: &[u8]) -> Vec<Finding> {
    let mut found = Vec::new();
    for (addr, code) in exec_segments(elf) {
        let mut d = Decoder::with_ip(64, code, addr, DecoderOptions::NONE);
        while d.can_decode() {
            let ins = d.decode();
            let name = match ins.mnemonic() {
                Mnemonic::Rdtsc => "RDTSC",
                Mnemonic::Rdtscp => "RDTSCP",
                Mnemonic::Rdrand => "RDRAND",
                Mnemonic::Rdseed => "RDSEED",
                Mnemonic::Cpuid => "CPUID",
                _ => continue,
            };
            found.push(Finding {
                addr: ins.ip(),
                mnemonic: name,
            });
        }
    }
    found
}
