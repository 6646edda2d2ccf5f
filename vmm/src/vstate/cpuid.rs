//! The guest's CPU model: a fixed CPUID table (like Firecracker's CPU templates), set with
//! KVM_SET_CPUID2 on every vCPU instead of whatever KVM_GET_SUPPORTED_CPUID offers on the
//! host, so that primary and backup define the same vCPU whatever CPUs they run on. Its
//! hash is part of the VMM's configuration hash (log header, snapshots): a backup with
//! another CPU model refuses the primary's log.
//!
//! On this platform (kvm_pvm) CPUID filtering has no effect on what guest code sees, and
//! the guest never executes CPUID (the build and the loader refuse images that do), so the
//! model's purpose is a defined, hashed vCPU for KVM itself (long mode needs LM, EFER.NXE
//! needs NX) and for any future platform that honours it. It is deliberately minimal:
//!
//! | leaf | eax | ebx / ecx / edx |
//! |---|---|---|
//! | 0x0 | highest basic leaf = 1 | vendor `FtVmmCPUv01` |
//! | 0x1 | family 6, model 0, stepping 0 | ebx 0 (APIC id 0), ecx 0, edx FPU PSE MSR PAE CX8 CMOV PAT MMX FXSR SSE SSE2 |
//! | 0x80000000 | highest extended leaf = 0x80000008 | 0 |
//! | 0x80000001 | 0 | ecx 0, edx NX LM |
//! | 0x80000008 | 48 virtual / 36 physical address bits | 0 |
//!
//! Every other leaf is absent: KVM answers zeros inside the ranges above and, beyond them,
//! the highest basic leaf (Intel semantics, as for any non-AMD vendor). Not offered: TSC,
//! RDRAND/RDSEED, RDTSCP (the guest must take time and entropy from the logged devices),
//! APIC/x2APIC (no in-kernel irqchip), XSAVE/AVX (x87/SSE state only), PMU, hypervisor
//! leaves.
use crate::error::{Error, Result};
use kvm_bindings::{CpuId, kvm_cpuid_entry2};

/// One CPUID leaf of the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Leaf {
    pub function: u32,
    pub index: u32,
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

/// `FtVmmCPUv01` as CPUID leaf 0 returns it (ebx, edx, ecx).
const VENDOR: [u8; 12] = *b"FtVmmCPUv01\0";

const fn vendor_word(i: usize) -> u32 {
    u32::from_le_bytes([
        VENDOR[4 * i],
        VENDOR[4 * i + 1],
        VENDOR[4 * i + 2],
        VENDOR[4 * i + 3],
    ])
}

/// CPUID.1:EDX features.
const FPU: u32 = 1 << 0;
const PSE: u32 = 1 << 3;
const MSR: u32 = 1 << 5;
const PAE: u32 = 1 << 6;
const CX8: u32 = 1 << 8;
const CMOV: u32 = 1 << 15;
const PAT: u32 = 1 << 16;
const MMX: u32 = 1 << 23;
const FXSR: u32 = 1 << 24;
const SSE: u32 = 1 << 25;
const SSE2: u32 = 1 << 26;
/// CPUID.80000001:EDX features.
const NX: u32 = 1 << 20;
const LM: u32 = 1 << 29;

/// The guest's CPU model, version 1. Changing any value changes every configuration hash:
/// old logs and snapshots are then refused (as they must be).
pub const MODEL: [Leaf; 5] = [
    Leaf {
        function: 0,
        index: 0,
        eax: 1,
        ebx: vendor_word(0),
        ecx: vendor_word(2),
        edx: vendor_word(1),
    },
    Leaf {
        function: 1,
        index: 0,
        eax: 0x0000_0600,
        ebx: 0,
        ecx: 0,
        edx: FPU | PSE | MSR | PAE | CX8 | CMOV | PAT | MMX | FXSR | SSE | SSE2,
    },
    Leaf {
        function: 0x8000_0000,
        index: 0,
        eax: 0x8000_0008,
        ebx: 0,
        ecx: 0,
        edx: 0,
    },
    Leaf {
        function: 0x8000_0001,
        index: 0,
        eax: 0,
        ebx: 0,
        ecx: 0,
        edx: NX | LM,
    },
    Leaf {
        function: 0x8000_0008,
        index: 0,
        eax: (48 << 8) | 36,
        ebx: 0,
        ecx: 0,
        edx: 0,
    },
];

/// Hash of a CPU model (part of the configuration hash).
pub fn model_hash(model: &[Leaf]) -> u64 {
    let words: Vec<u64> = model
        .iter()
        .flat_map(|l| {
            [
                (l.function as u64) << 32 | l.index as u64,
                (l.eax as u64) << 32 | l.ebx as u64,
                (l.ecx as u64) << 32 | l.edx as u64,
            ]
        })
        .collect();
    crate::hash::hash_words(&words, 0xc9d1)
}

/// The model as KVM_SET_CPUID2 takes it.
pub fn to_kvm(model: &[Leaf]) -> Result<CpuId> {
    let entries: Vec<kvm_cpuid_entry2> = model
        .iter()
        .map(|l| kvm_cpuid_entry2 {
            function: l.function,
            index: l.index,
            flags: 0,
            eax: l.eax,
            ebx: l.ebx,
            ecx: l.ecx,
            edx: l.edx,
            padding: [0; 3],
        })
        .collect();
    CpuId::from_entries(&entries).map_err(|e| Error::CpuModel(format!("CPUID table: {e:?}")))
}

/// Feature registers of the model that the host must offer: (function, register name,
/// bits). Vendor, signature and address-size words are definitions, not features.
fn feature_words(l: &Leaf) -> Vec<(&'static str, u32)> {
    match l.function {
        1 | 0x8000_0001 => vec![("ecx", l.ecx), ("edx", l.edx)],
        _ => vec![],
    }
}

/// Checks that the host's KVM can offer every feature of `model` (what
/// KVM_GET_SUPPORTED_CPUID reports); the error names the missing bits.
pub fn check_supported(model: &[Leaf], supported: &CpuId) -> Result<()> {
    for l in model {
        let host = supported
            .as_slice()
            .iter()
            .find(|e| e.function == l.function && e.index == l.index);
        for (reg, want) in feature_words(l) {
            let have = match (host, reg) {
                (Some(h), "ecx") => h.ecx,
                (Some(h), _) => h.edx,
                (None, _) => 0,
            };
            let missing = want & !have;
            if missing != 0 {
                return Err(Error::CpuModel(format!(
                    "the host's KVM does not offer CPUID.{:#x}:{reg} bits {missing:#x} of the guest's CPU model",
                    l.function
                )));
            }
        }
    }
    Ok(())
}
