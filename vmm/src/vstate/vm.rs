//! The KVM VM: RAM slot with dirty-page logging, and the system tables (GDT, TSS, IDT,
//! identity page tables) that the VMM builds so the guest needs almost no ring-0 code.
use crate::abi::*;
use crate::error::{Error, Result};
use crate::image::LoadedImage;
use crate::vstate::dirty::DirtyLog;
use crate::vstate::memory::GuestRam;
use kvm_bindings::{KVM_MEM_LOG_DIRTY_PAGES, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VmFd};
use std::sync::Arc;

pub struct Vm {
    pub kvm: Kvm,
    pub fd: Arc<VmFd>,
    pub ram: GuestRam,
    /// Shared with a state transfer (pre-copy on another thread).
    pub dirty: Arc<DirtyLog>,
}

impl Vm {
    /// Creates the VM and registers `ram_size` bytes of RAM at guest physical 0 with
    /// dirty-page logging enabled.
    pub fn new(ram_size: usize) -> Result<Self> {
        let kvm = Kvm::new().map_err(Error::Kvm)?;
        let fd = kvm.create_vm().map_err(Error::Kvm)?;
        let ram = GuestRam::new(ram_size)?;
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: KVM_MEM_LOG_DIRTY_PAGES,
            guest_phys_addr: 0,
            memory_size: ram_size as u64,
            userspace_addr: ram.host_addr(),
        };
        // SAFETY: the region maps `ram`, which this struct owns and keeps alive (and
        // mapped) as long as the VM fd exists; the slot does not overlap any other.
        unsafe { fd.set_user_memory_region(region) }
            .map_err(Error::ioctl("KVM_SET_USER_MEMORY_REGION"))?;
        let fd = Arc::new(fd);
        let dirty = Arc::new(DirtyLog::new(fd.clone(), ram_size, ram.written().clone()));
        Ok(Vm {
            kvm,
            fd,
            ram,
            dirty,
        })
    }

    /// Pages the guest wrote since the last call (KVM dirty bitmap, 1 bit per page).
    pub fn take_dirty_log(&self) -> Result<Vec<u64>> {
        self.dirty.take_for_hash()
    }

    /// Writes GDT, TSS, IDT, page tables and boot info into RAM.
    pub fn setup_system_tables(&mut self, img: &LoadedImage, boot: &BootInfo) -> Result<()> {
        let ram = &mut self.ram;
        // GDT: null, kernel code64, kernel data, user data, user code64, TSS (16 bytes).
        let tss_lo: u64 = 0x67
            | ((TSS_ADDR & 0xff_ffff) << 16)
            | (0x89u64 << 40)
            | (((TSS_ADDR >> 24) & 0xff) << 56);
        let gdt: [u64; 7] = [
            0,
            0x00AF_9B00_0000_FFFF,
            0x00CF_9300_0000_FFFF,
            0x00CF_F300_0000_FFFF,
            0x00AF_FB00_0000_FFFF,
            tss_lo,
            TSS_ADDR >> 32,
        ];
        for (i, e) in gdt.iter().enumerate() {
            ram.write_u64(GDT_ADDR + 8 * i as u64, *e)?;
        }
        // TSS: rsp0 (interrupts from ring 3 switch to this stack), no I/O bitmap.
        ram.write_u64(TSS_ADDR + 4, IRQ_STACK_TOP)?;
        ram.write_u16(TSS_ADDR + 102, 0x68)?;
        // IDT: 32 exception stubs, timer and NIC handlers; other vectors not present.
        let mut set_gate = |vector: u64, handler: u64| -> Result<()> {
            let lo: u64 = (handler & 0xffff)
                | ((SEL_KCODE as u64) << 16)
                | (0x8Eu64 << 40)
                | (((handler >> 16) & 0xffff) << 48);
            ram.write_u64(IDT_ADDR + 16 * vector, lo)?;
            ram.write_u64(IDT_ADDR + 16 * vector + 8, handler >> 32)
        };
        for v in 0..32 {
            set_gate(v, img.header.exc_stubs + v * EXC_STUB_STRIDE)?;
        }
        set_gate(TIMER_VECTOR as u64, img.header.irq_timer)?;
        set_gate(NIC_VECTOR as u64, img.header.irq_nic)?;
        // Identity map of the first 4 GiB (RAM and the device page) with 2 MiB pages,
        // user-accessible (the guest is a single ring-3 program that reaches its devices
        // directly). Addresses without RAM or a device exit as bad device accesses.
        ram.write_u64(PML4_ADDR, PDPT_ADDR | 7)?;
        for d in 0..PD_COUNT {
            let pd = PD_ADDR + d * 0x1000;
            ram.write_u64(PDPT_ADDR + d * 8, pd | 7)?;
            for i in 0..512u64 {
                ram.write_u64(pd + i * 8, (((d << 9) | i) << 21) | 0x87)?;
            }
        }
        ram.write(BOOT_INFO_ADDR, boot.as_bytes())?;
        Ok(())
    }
}
