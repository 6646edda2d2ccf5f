//! ft-guest: a tiny x86_64 guest for the fault-tolerant VMM.
//!
//! The VMM builds GDT/TSS/IDT/page tables and starts us directly in ring 3 (ring-0 code is
//! emulated on this host, ring 3 runs natively). The only ring-0 code is in
//! `global_asm!` below: exception stubs that report to the VMM and two interrupt handlers
//! that bump counters. Everything else — the smoltcp TCP/IP stack and a RESP key-value
//! server — runs in ring 3 and reaches devices by MMIO.
//!
//! Determinism: no RDTSC/RDRAND/CPUID (vmm/build.rs disassembles the image and refuses
//! one). Time comes from the clock and idle registers, randomness (smoltcp's seed, hence
//! TCP ISNs and ports) from the entropy register, frames from the RX ring the VMM fills
//! only while the vCPU is stopped at an exit.
#![no_std]
#![no_main]

extern crate alloc;

mod abi;
mod dev;
mod net;

use abi::*;
use core::arch::global_asm;
use core::sync::atomic::{AtomicU64, Ordering};

/// Incremented by the ring-0 timer interrupt handler.
pub static TIMER_TICKS: AtomicU64 = AtomicU64::new(0);
/// Incremented by the ring-0 NIC interrupt handler.
pub static NIC_IRQS: AtomicU64 = AtomicU64::new(0);

// Image header (layout = `abi::GuestHeader`), first bytes of the image; addresses are
// resolved by the linker.
global_asm!(
    ".section .header, \"a\"",
    ".ascii \"FTGUEST1\"",
    ".long {abi}",
    ".long 0",
    ".quad guest_main",
    ".quad exc_stubs",
    ".quad irq_timer",
    ".quad irq_nic",
    ".quad __image_end",
    ".previous",
    abi = const GUEST_ABI_VERSION,
);

// Ring-0 code. Exception stub N writes N to the fault register (the VMM then stops the VM
// and reports vector, error code and RIP from the exception frame) and spins. The IRQ
// handlers only bump a counter: ring-3 code does the real work after `iretq`. The device
// page is above 2 GiB, so the stubs address it through a register (`mov eax, imm32`
// zero-extends) rather than a sign-extended 32-bit displacement.
global_asm!(
    ".section .text.ring0, \"ax\"",
    ".balign 16",
    ".global exc_stubs",
    "exc_stubs:",
    ".set vec, 0",
    ".rept 32",
    ".balign 16",
    "mov eax, {fault}",
    "mov dword ptr [rax], vec",
    "2: jmp 2b",
    ".set vec, vec + 1",
    ".endr",
    ".balign 16",
    ".global irq_timer",
    "irq_timer:",
    "lock inc qword ptr [rip + {ticks}]",
    "iretq",
    ".balign 16",
    ".global irq_nic",
    "irq_nic:",
    "lock inc qword ptr [rip + {nic}]",
    "iretq",
    ".previous",
    fault = const MMIO_BASE + REG_FAULT,
    ticks = sym TIMER_TICKS,
    nic = sym NIC_IRQS,
);

/// The heap: talc (dlmalloc-style with size bins, near-constant time), counting the bytes
/// in use for INFO and the `maxmemory` check. One vCPU and no allocation in interrupt
/// handlers, so the spin lock is never contended.
#[global_allocator]
static ALLOC: talc::TalcLock<spinning_top::RawSpinlock, talc::source::Manual> =
    talc::TalcLock::new(talc::source::Manual);

/// Bytes allocated from the heap now.
pub fn heap_used() -> usize {
    ALLOC.lock().counters().allocated_bytes
}

/// Ring-3 entry point (the VMM sets rdi = boot info, rsp = stack top).
#[unsafe(no_mangle)]
pub extern "C" fn guest_main(boot_addr: u64) -> ! {
    // SAFETY: the VMM writes a BootInfo at this fixed address before the first instruction.
    let boot = unsafe { core::ptr::read_volatile(boot_addr as *const BootInfo) };
    if boot.magic != BOOT_MAGIC {
        dev::console(b"bad boot info");
        dev::poweroff(2);
    }
    // SAFETY: the heap range is RAM reserved for the guest by the VMM (identity-mapped,
    // used by nothing else); it is claimed exactly once, before any allocation.
    let claimed = unsafe {
        ALLOC.lock().claim(
            boot.heap_base as *mut u8,
            (boot.heap_end - boot.heap_base) as usize,
        )
    };
    if claimed.is_none() {
        dev::console(b"ft-guest: cannot set up the heap");
        dev::poweroff(3);
    }
    dev::console(b"ft-guest: up");
    net::serve(&boot)
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    let mut buf = dev::LineBuf::new();
    use core::fmt::Write;
    let _ = write!(buf, "guest panic: {}", info);
    dev::console(buf.as_bytes());
    dev::poweroff(101)
}

/// Ticks seen so far (read by the service loop; written by the ring-0 handler).
pub fn timer_ticks() -> u64 {
    TIMER_TICKS.load(Ordering::Relaxed)
}
