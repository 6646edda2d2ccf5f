//! Guest <-> VMM ABI: memory layout, device registers, NIC rings, boot info and the guest
//! image header. This one file is compiled into both the guest (`ft-guest`) and the VMM
//! (`ft-vmm`, via `#[path]`), so the two sides cannot drift apart.
//!
//! All device registers are 8 bytes wide and live in one MMIO page at [`MMIO_BASE`]; the
//! VMM maps that page user-accessible so ring-3 code reaches devices directly (IOPL=3 is
//! not honoured by the host, and ring-0 code is emulated, so MMIO from ring 3 is the fast
//! path).
#![allow(dead_code)]

/// Guest RAM is one memory slot at guest physical 0 of a configurable size: at least
/// [`RAM_MIN`], at most [`RAM_MAX`] (below the device page), a multiple of
/// [`RAM_ALIGN`].
pub const RAM_MIN: u64 = 64 << 20;
pub const RAM_MAX: u64 = 3 << 30;
pub const RAM_DEFAULT: u64 = 256 << 20;
pub const RAM_ALIGN: u64 = 2 << 20;

/// VMM-built system tables (the guest never builds them: ring-0 code is slow here).
pub const GDT_ADDR: u64 = 0x1000;
pub const TSS_ADDR: u64 = 0x2000;
pub const IDT_ADDR: u64 = 0x3000;
pub const BOOT_INFO_ADDR: u64 = 0x4000;
pub const PML4_ADDR: u64 = 0x5000;
pub const PDPT_ADDR: u64 = 0x6000;
/// Four page directories (0x7000..0xB000) map the first 4 GiB with 2 MiB pages.
pub const PD_ADDR: u64 = 0x7000;
pub const PD_COUNT: u64 = 4;
/// Ring-0 stack used on interrupt/exception entry (TSS.rsp0).
pub const IRQ_STACK_TOP: u64 = 0xF_F000;

/// NIC shared area: control page, then RX slots, then TX slots.
/// (Above the ring-3 stack: 256 slots per direction, as a virtio-net queue, so a burst
/// from 1,000 clients waits in the guest's ring rather than overflowing the tap.)
pub const NIC_BASE: u64 = 0x110_0000;
pub const NIC_SLOTS: u64 = 256;
pub const NIC_SLOT_SIZE: u64 = 2048;
/// `u64` written by the VMM: number of frames ever placed in the RX ring.
pub const NIC_RX_PROD: u64 = NIC_BASE;
/// `u64` written by the guest: number of RX frames consumed.
pub const NIC_RX_CONS: u64 = NIC_BASE + 8;
/// `u64` written by the guest: number of TX frames queued.
pub const NIC_TX_PROD: u64 = NIC_BASE + 16;
/// `u64` written by the VMM: number of TX frames taken.
pub const NIC_TX_CONS: u64 = NIC_BASE + 24;
/// `u64` written by the guest: device-clock deadline (ns) of its next [`REG_IDLE`] read;
/// 0 (or any past time) returns at once, `u64::MAX` waits for input only.
pub const SHARED_IDLE_DEADLINE: u64 = NIC_BASE + 32;
/// `u16` lengths, one per RX slot.
pub const NIC_RX_LEN: u64 = NIC_BASE + 0x400;
/// `u16` lengths, one per TX slot.
pub const NIC_TX_LEN: u64 = NIC_BASE + 0x800;
pub const NIC_RX_DATA: u64 = NIC_BASE + 0x1000;
pub const NIC_TX_DATA: u64 = NIC_RX_DATA + NIC_SLOTS * NIC_SLOT_SIZE;
pub const NIC_END: u64 = NIC_TX_DATA + NIC_SLOTS * NIC_SLOT_SIZE;
/// Largest frame the NIC carries (Ethernet header + 1500 MTU).
pub const NIC_MAX_FRAME: u64 = 1514;

/// The guest image is linked and loaded here.
pub const IMAGE_BASE: u64 = 0x20_0000;
/// The image (including .bss) must end below this address.
pub const IMAGE_LIMIT: u64 = 0x100_0000;
/// Ring-3 stack (grows down from here to IMAGE_LIMIT).
pub const STACK_TOP: u64 = 0x110_0000;
/// Heap handed to the guest allocator: from here (after the NIC rings) to the end of RAM.
pub const HEAP_BASE: u64 = 0x130_0000;

/// Device page (not RAM: every access is an MMIO exit). Below 4 GiB, so 32-bit
/// immediates reach it (`mov eax, imm32` zero-extends); above [`RAM_MAX`].
pub const MMIO_BASE: u64 = 0xF000_0000;
pub const MMIO_SIZE: u64 = 0x1000;
/// read: device clock in ns (monotonic, starts near 0).
pub const REG_CLOCK_NS: u64 = 0x00;
/// read: 64 random bits.
pub const REG_ENTROPY: u64 = 0x08;
/// write: timer deadline on the device clock (ns); 0 disarms. Expiry raises [`TIMER_VECTOR`].
pub const REG_TIMER_DEADLINE: u64 = 0x10;
/// read: "nothing to do until input": the VMM sends the queued TX frames, waits until a
/// frame is in the RX ring, an interrupt is pending or the device clock reaches
/// [`SHARED_IDLE_DEADLINE`], and returns the device clock (ns), like [`REG_CLOCK_NS`].
pub const REG_IDLE: u64 = 0x18;
/// write (any value): TX frames between NIC_TX_CONS and NIC_TX_PROD are ready. (The VMM
/// also takes queued TX frames at every other exit.)
pub const REG_NIC_DOORBELL: u64 = 0x20;
/// write: console line; value = guest address | (length << 48), length <= 256.
pub const REG_CONSOLE: u64 = 0x28;
/// write: exception vector (written by the ring-0 exception stubs only).
pub const REG_FAULT: u64 = 0x30;
/// write: guest requests power-off with this exit code.
pub const REG_POWEROFF: u64 = 0x38;
/// write: 1 = raise [`NIC_VECTOR`] when frames are placed in the RX ring, 0 = do not (a
/// polling driver; the default).
pub const REG_NIC_IRQ: u64 = 0x40;

pub const TIMER_VECTOR: u32 = 0x20;
pub const NIC_VECTOR: u32 = 0x21;

/// GDT selectors (VMM-built GDT).
pub const SEL_KCODE: u16 = 0x08;
pub const SEL_KDATA: u16 = 0x10;
pub const SEL_UDATA: u16 = 0x18 | 3;
pub const SEL_UCODE: u16 = 0x20 | 3;
pub const SEL_TSS: u16 = 0x28;

pub const GUEST_MAGIC: [u8; 8] = *b"FTGUEST1";
pub const GUEST_ABI_VERSION: u32 = 2;
/// Stride of the 32 exception stubs starting at [`GuestHeader::exc_stubs`].
pub const EXC_STUB_STRIDE: u64 = 16;

/// First bytes of the loaded image (at [`IMAGE_BASE`]).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct GuestHeader {
    pub magic: [u8; 8],
    pub abi_version: u32,
    pub _pad: u32,
    /// Ring-3 entry point; called with rdi = [`BOOT_INFO_ADDR`], rsp = [`STACK_TOP`].
    pub entry: u64,
    /// 32 ring-0 exception stubs, [`EXC_STUB_STRIDE`] bytes apart.
    pub exc_stubs: u64,
    pub irq_timer: u64,
    pub irq_nic: u64,
    /// End of the image including .bss.
    pub image_end: u64,
}

impl BootInfo {
    pub fn as_bytes(&self) -> &[u8] {
        // SAFETY: BootInfo is #[repr(C)] plain data whose padding is explicit (`_pad`
        // fields), so every byte is initialised; the slice borrows `self`.
        unsafe {
            core::slice::from_raw_parts(
                self as *const BootInfo as *const u8,
                core::mem::size_of::<BootInfo>(),
            )
        }
    }
}

pub const BOOT_MAGIC: u64 = 0x4f4f_425f_4d56_5446; // "FTVM_BOO"

/// Written by the VMM at [`BOOT_INFO_ADDR`] before the first instruction.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BootInfo {
    pub magic: u64,
    pub mac: [u8; 6],
    pub prefix_len: u8,
    pub _pad: u8,
    pub ip: [u8; 4],
    pub gateway: [u8; 4],
    pub port: u16,
    pub _pad2: [u8; 6],
    pub heap_base: u64,
    /// End of the heap = RAM size.
    pub heap_end: u64,
    /// Service settings (0 = the guest derives a default from its heap size).
    pub maxclients: u32,
    /// Close clients idle for this many seconds (0 = never).
    pub timeout_s: u32,
    /// TCP keep-alive interval in seconds (0 = off).
    pub tcp_keepalive_s: u32,
    /// Housekeeping ticks per second (timer interrupt), 0 = 10.
    pub hz: u32,
    /// Limit for `used_memory` before write commands get OOM errors (0 = derived).
    pub maxmemory: u64,
}
