//! Guest image loading and validation.
//!
//! The image is an ELF64 x86-64 executable whose PT_LOAD segments lie in
//! `[IMAGE_BASE, IMAGE_LIMIT)` and whose first bytes (at `IMAGE_BASE`) are a
//! [`GuestHeader`] (magic `FTGUEST1`, ABI version, entry point, ring-0 stub addresses).
//! Anything else is rejected with [`Error::Image`] before the VM runs.
use crate::abi::*;
use crate::error::{Error, Result};
use crate::vstate::memory::GuestRam;

pub struct LoadedImage {
    pub header: GuestHeader,
}

fn u16_at(b: &[u8], off: usize) -> Result<u16> {
    b.get(off..off + 2)
        .map(|s| u16::from_le_bytes(s.try_into().expect("2 bytes")))
        .ok_or_else(|| Error::Image(format!("truncated ELF (need byte {})", off + 2)))
}
fn u32_at(b: &[u8], off: usize) -> Result<u32> {
    b.get(off..off + 4)
        .map(|s| u32::from_le_bytes(s.try_into().expect("4 bytes")))
        .ok_or_else(|| Error::Image(format!("truncated ELF (need byte {})", off + 4)))
}
fn u64_at(b: &[u8], off: usize) -> Result<u64> {
    b.get(off..off + 8)
        .map(|s| u64::from_le_bytes(s.try_into().expect("8 bytes")))
        .ok_or_else(|| Error::Image(format!("truncated ELF (need byte {})", off + 8)))
}

fn in_image(addr: u64) -> bool {
    (IMAGE_BASE..IMAGE_LIMIT).contains(&addr)
}

/// Validates `elf` and copies its segments into RAM.
pub fn load(elf: &[u8], ram: &mut GuestRam) -> Result<LoadedImage> {
    if let Some(f) = crate::scan::forbidden_instructions(elf).first() {
        return Err(Error::Image(format!(
            "it executes {} at {:#x}, which reads the host directly: a backup replaying it would see other values and diverge; a replicated guest takes time and entropy from its devices",
            f.mnemonic, f.addr
        )));
    }
    if elf.len() < 64 || &elf[..4] != b"\x7fELF" {
        return Err(Error::Image("not an ELF file (bad magic)".into()));
    }
    if elf[4] != 2 || elf[5] != 1 {
        return Err(Error::Image("not a little-endian ELF64 file".into()));
    }
    if u16_at(elf, 16)? != 2 {
        return Err(Error::Image(
            "ELF type is not EXEC (static, non-PIE executable expected)".into(),
        ));
    }
    if u16_at(elf, 18)? != 62 {
        return Err(Error::Image("ELF machine is not x86-64".into()));
    }
    let phoff = u64_at(elf, 32)? as usize;
    let phentsize = u16_at(elf, 54)? as usize;
    let phnum = u16_at(elf, 56)? as usize;
    if phentsize < 56 || phnum == 0 || phnum > 64 {
        return Err(Error::Image(format!(
            "bad program header table ({phnum} entries of {phentsize} bytes)"
        )));
    }
    let mut loaded_any = false;
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        if u32_at(elf, ph)? != 1 {
            continue; // not PT_LOAD
        }
        let offset = u64_at(elf, ph + 8)? as usize;
        let paddr = u64_at(elf, ph + 24)?;
        let filesz = u64_at(elf, ph + 32)? as usize;
        let memsz = u64_at(elf, ph + 40)?;
        if memsz < filesz as u64 {
            return Err(Error::Image(format!("segment {i}: memsz < filesz")));
        }
        let end = paddr
            .checked_add(memsz)
            .ok_or_else(|| Error::Image(format!("segment {i}: size overflow")))?;
        if !in_image(paddr) || end > IMAGE_LIMIT {
            return Err(Error::Image(format!(
                "segment {i} at {paddr:#x}..{end:#x} is outside the image window {IMAGE_BASE:#x}..{IMAGE_LIMIT:#x} (image too large or linked at the wrong address)"
            )));
        }
        let data = elf
            .get(offset..offset.saturating_add(filesz))
            .ok_or_else(|| {
                Error::Image(format!(
                    "segment {i}: file data beyond end of file (truncated image)"
                ))
            })?;
        ram.write(paddr, data)?;
        loaded_any = true;
    }
    if !loaded_any {
        return Err(Error::Image("no loadable segments".into()));
    }
    let mut hb = [0u8; std::mem::size_of::<GuestHeader>()];
    ram.read(IMAGE_BASE, &mut hb)?;
    // SAFETY: GuestHeader is #[repr(C)] plain data (arrays and integers), valid for any
    // bit pattern; the buffer has exactly its size; read_unaligned has no alignment needs.
    let header: GuestHeader =
        unsafe { std::ptr::read_unaligned(hb.as_ptr() as *const GuestHeader) };
    if header.magic != GUEST_MAGIC {
        return Err(Error::Image(format!(
            "no ft-guest header at {IMAGE_BASE:#x} (magic {:02x?}, expected \"FTGUEST1\")",
            header.magic
        )));
    }
    if header.abi_version != GUEST_ABI_VERSION {
        return Err(Error::Image(format!(
            "guest ABI version {} but this VMM speaks {GUEST_ABI_VERSION}",
            header.abi_version
        )));
    }
    let elf_entry = u64_at(elf, 24)?;
    for (name, addr) in [
        ("entry", header.entry),
        ("exception stubs", header.exc_stubs),
        ("timer handler", header.irq_timer),
        ("NIC handler", header.irq_nic),
    ] {
        if !in_image(addr) {
            return Err(Error::Image(format!(
                "{name} address {addr:#x} is outside the image"
            )));
        }
    }
    if header.entry != elf_entry {
        return Err(Error::Image(format!(
            "header entry {:#x} differs from ELF entry {elf_entry:#x}",
            header.entry
        )));
    }
    if header.image_end > IMAGE_LIMIT || header.image_end < IMAGE_BASE {
        return Err(Error::Image(format!(
            "image end {:#x} beyond {IMAGE_LIMIT:#x} (.bss too large)",
            header.image_end
        )));
    }
    Ok(LoadedImage { header })
}

/// Hash of a guest image's bytes (part of the configuration hash).
pub fn image_hash(elf: &[u8]) -> u64 {
    ft_common::vmlog::fnv1a(elf, ft_common::vmlog::FNV_OFFSET)
}
