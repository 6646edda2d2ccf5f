//! Device access from ring 3: MMIO registers and the NIC rings (see `abi`).
use crate::abi::*;
use core::ptr::{read_volatile, write_volatile};
use core::sync::atomic::{Ordering, compiler_fence};
use smoltcp::phy::{self, DeviceCapabilities, Medium};
use smoltcp::time::Instant;

fn reg_read(off: u64) -> u64 {
    compiler_fence(Ordering::SeqCst);
    // SAFETY: MMIO_BASE..+MMIO_SIZE is the VMM's device page, mapped user-accessible;
    // every access traps to the VMM.
    unsafe { read_volatile((MMIO_BASE + off) as *const u64) }
}

fn reg_write(off: u64, v: u64) {
    compiler_fence(Ordering::SeqCst);
    // SAFETY: see `reg_read`.
    unsafe { write_volatile((MMIO_BASE + off) as *mut u64, v) }
}

/// Device clock in ns (one exit).
pub fn clock_ns() -> u64 {
    reg_read(REG_CLOCK_NS)
}

pub fn entropy() -> u64 {
    reg_read(REG_ENTROPY)
}

/// Arms the timer interrupt for `deadline_ns` on the device clock.
pub fn set_timer(deadline_ns: u64) {
    reg_write(REG_TIMER_DEADLINE, deadline_ns)
}

/// One exit that sends queued output and waits until a frame arrives, an interrupt is
/// due or the device clock reaches `deadline_ns` (0: do not wait; `u64::MAX`: no
/// deadline). Returns the device clock.
pub fn idle(deadline_ns: u64) -> u64 {
    wr64(SHARED_IDLE_DEADLINE, deadline_ns);
    reg_read(REG_IDLE)
}

pub fn console(msg: &[u8]) {
    let len = msg.len().min(256) as u64;
    reg_write(REG_CONSOLE, (msg.as_ptr() as u64) | (len << 48))
}

pub fn poweroff(code: u64) -> ! {
    loop {
        reg_write(REG_POWEROFF, code)
    }
}

/// Small fixed buffer for formatted console lines.
pub struct LineBuf {
    buf: [u8; 256],
    len: usize,
}

impl LineBuf {
    pub fn new() -> Self {
        LineBuf {
            buf: [0; 256],
            len: 0,
        }
    }
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl core::fmt::Write for LineBuf {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        let n = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

fn rd64(addr: u64) -> u64 {
    compiler_fence(Ordering::SeqCst);
    // SAFETY: addr is inside the NIC shared area, RAM that the VMM reserved for the rings
    // and writes only while the vCPU is stopped at an exit.
    unsafe { read_volatile(addr as *const u64) }
}

fn wr64(addr: u64, v: u64) {
    compiler_fence(Ordering::SeqCst);
    // SAFETY: see `rd64`.
    unsafe { write_volatile(addr as *mut u64, v) }
}

/// The paravirtual NIC, as a smoltcp device. The VMM takes queued TX frames at the next
/// exit (the loop's idle or clock read), so no doorbell is needed per batch.
pub struct Nic;

impl Nic {
    pub fn rx_available(&self) -> bool {
        rd64(NIC_RX_PROD) != rd64(NIC_RX_CONS)
    }

    fn tx_free(&self) -> bool {
        rd64(NIC_TX_PROD) - rd64(NIC_TX_CONS) < NIC_SLOTS
    }
}

pub struct RxToken;
pub struct TxToken;

impl phy::RxToken for RxToken {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        let cons = rd64(NIC_RX_CONS);
        let slot = cons % NIC_SLOTS;
        // SAFETY: the slot is owned by the guest until NIC_RX_CONS moves past it; the VMM
        // only writes free slots, and only while the vCPU is stopped.
        let len = unsafe { read_volatile((NIC_RX_LEN + 2 * slot) as *const u16) } as usize;
        let len = len.min(NIC_MAX_FRAME as usize);
        // SAFETY: as above; the slot holds NIC_SLOT_SIZE >= len bytes.
        let data = unsafe {
            core::slice::from_raw_parts((NIC_RX_DATA + slot * NIC_SLOT_SIZE) as *const u8, len)
        };
        let r = f(data);
        wr64(NIC_RX_CONS, cons + 1);
        r
    }
}

impl phy::TxToken for TxToken {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let prod = rd64(NIC_TX_PROD);
        let slot = prod % NIC_SLOTS;
        let len = len.min(NIC_MAX_FRAME as usize);
        // SAFETY: `transmit` checked the ring has a free slot; the guest owns slots between
        // NIC_TX_PROD and NIC_TX_CONS + NIC_SLOTS.
        let data = unsafe {
            core::slice::from_raw_parts_mut((NIC_TX_DATA + slot * NIC_SLOT_SIZE) as *mut u8, len)
        };
        let r = f(data);
        // SAFETY: the length entry of the slot owned by the guest.
        unsafe { write_volatile((NIC_TX_LEN + 2 * slot) as *mut u16, len as u16) };
        wr64(NIC_TX_PROD, prod + 1);
        r
    }
}

impl phy::Device for Nic {
    type RxToken<'a> = RxToken;
    type TxToken<'a> = TxToken;

    fn receive(&mut self, _t: Instant) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        if self.rx_available() && self.tx_free() {
            Some((RxToken, TxToken))
        } else {
            None
        }
    }

    fn transmit(&mut self, _t: Instant) -> Option<Self::TxToken<'_>> {
        if self.tx_free() {
            return Some(TxToken);
        }
        // Ring full: one exit lets the VMM take the queued frames.
        reg_write(REG_NIC_DOORBELL, 1);
        self.tx_free().then_some(TxToken)
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut c = DeviceCapabilities::default();
        c.medium = Medium::Ethernet;
        c.max_transmission_unit = NIC_MAX_FRAME as usize;
        c
    }
}
