//! The single vCPU: long-mode setup (the guest starts directly in ring 3), register access
//! through `kvm_run` sync regs (no extra ioctl per exit), interrupt injection with
//! KVM_INTERRUPT, and full state save/restore for snapshots.
use crate::abi::*;
use crate::error::{Error, Result};
use crate::vstate::cpuid;
use kvm_bindings::{
    KVM_MAX_CPUID_ENTRIES, Msrs, kvm_dtable, kvm_fpu, kvm_interrupt, kvm_msr_entry, kvm_regs,
    kvm_segment, kvm_sregs, kvm_vcpu_events,
};
use kvm_ioctls::{Kvm, SyncReg, VcpuFd, VmFd};
use std::os::fd::AsRawFd;

/// _IOW(KVMIO, 0x86, struct kvm_interrupt): kvm-ioctls has no wrapper.
const KVM_INTERRUPT: libc::c_ulong = 0x4004_AE86;

/// MSRs saved in snapshots (the guest does not use them; saved so a restored vCPU is
/// identical to the original).
pub const SNAPSHOT_MSRS: [u32; 6] = [
    0xC000_0081,
    0xC000_0082,
    0xC000_0083,
    0xC000_0084,
    0xC000_0102,
    0x277,
];

pub struct Vcpu {
    pub fd: VcpuFd,
    /// (rip, interrupt-ready) as of the last guest exit, kept when `kvm_run` no longer
    /// shows them: after an immediate-exit completion (snapshot) or a restore. Cleared by
    /// the next real exit.
    at_exit: Option<(u64, bool)>,
}

fn seg(selector: u16, code: bool, dpl: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: if code { 11 } else { 3 },
        present: 1,
        dpl,
        db: if code { 0 } else { 1 },
        s: 1,
        l: if code { 1 } else { 0 },
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Complete architectural state of the vCPU, as far as this guest can observe it.
#[derive(Clone)]
pub struct VcpuState {
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub fpu: kvm_fpu,
    pub events: kvm_vcpu_events,
    pub msrs: Vec<(u32, u64)>,
}

impl Vcpu {
    pub fn new(kvm: &Kvm, vm: &VmFd) -> Result<Self> {
        let mut fd = vm.create_vcpu(0).map_err(Error::ioctl("KVM_CREATE_VCPU"))?;
        // The fixed CPU model, not the host's: both hosts define the same vCPU.
        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(Error::ioctl("KVM_GET_SUPPORTED_CPUID"))?;
        cpuid::check_supported(&cpuid::MODEL, &supported)?;
        fd.set_cpuid2(&cpuid::to_kvm(&cpuid::MODEL)?)
            .map_err(Error::ioctl("KVM_SET_CPUID2"))?;
        fd.set_sync_valid_reg(SyncReg::Register);
        Ok(Vcpu { fd, at_exit: None })
    }

    /// The CPUID table KVM holds for this vCPU (KVM_GET_CPUID2).
    pub fn cpuid(&self) -> Result<Vec<cpuid::Leaf>> {
        let c = self
            .fd
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(Error::ioctl("KVM_GET_CPUID2"))?;
        Ok(c.as_slice()
            .iter()
            .map(|e| cpuid::Leaf {
                function: e.function,
                index: e.index,
                eax: e.eax,
                ebx: e.ebx,
                ecx: e.ecx,
                edx: e.edx,
            })
            .collect())
    }

    /// Long mode, paging on, CPL 3 at `entry` with rdi = boot info, IF = 1.
    pub fn setup_long_mode(&self, entry: u64) -> Result<()> {
        let mut s = self.fd.get_sregs().map_err(Error::ioctl("KVM_GET_SREGS"))?;
        s.cr3 = PML4_ADDR;
        s.cr4 = 0x20 | 0x200 | 0x400; // PAE | OSFXSR | OSXMMEXCPT
        s.cr0 = 0x1 | 0x2 | 0x10 | 0x20 | 0x10000 | 0x8000_0000; // PE MP ET NE WP PG
        s.efer = 0x100 | 0x400 | 0x800; // LME LMA NXE
        s.cs = seg(SEL_UCODE, true, 3);
        let ds = seg(SEL_UDATA, false, 3);
        s.ds = ds;
        s.es = ds;
        s.fs = ds;
        s.gs = ds;
        s.ss = ds;
        s.gdt = kvm_dtable {
            base: GDT_ADDR,
            limit: 7 * 8 - 1,
            padding: [0; 3],
        };
        s.idt = kvm_dtable {
            base: IDT_ADDR,
            limit: 256 * 16 - 1,
            padding: [0; 3],
        };
        s.tr = kvm_segment {
            base: TSS_ADDR,
            limit: 0x67,
            selector: SEL_TSS,
            type_: 11,
            present: 1,
            dpl: 0,
            db: 0,
            s: 0,
            l: 0,
            g: 0,
            avl: 0,
            unusable: 0,
            padding: 0,
        };
        self.fd
            .set_sregs(&s)
            .map_err(Error::ioctl("KVM_SET_SREGS"))?;
        let regs = kvm_regs {
            rip: entry,
            rsp: STACK_TOP,
            rflags: 0x202,
            rdi: BOOT_INFO_ADDR,
            ..Default::default()
        };
        self.fd
            .set_regs(&regs)
            .map_err(Error::ioctl("KVM_SET_REGS"))?;
        Ok(())
    }

    /// Registers as of the last exit (from `kvm_run` sync regs: no ioctl).
    pub fn sync_regs(&self) -> kvm_regs {
        self.fd.sync_regs().regs
    }

    /// Registers through the ioctl (valid before the first run and after restore).
    pub fn regs(&self) -> Result<kvm_regs> {
        self.fd.get_regs().map_err(Error::ioctl("KVM_GET_REGS"))
    }

    pub fn sregs(&self) -> Result<kvm_sregs> {
        self.fd.get_sregs().map_err(Error::ioctl("KVM_GET_SREGS"))
    }

    /// True if an interrupt can be injected now (IF set, no interrupt shadow).
    pub fn can_inject(&mut self) -> bool {
        if let Some((_, ready)) = self.at_exit {
            return ready;
        }
        let run = self.fd.get_kvm_run();
        run.ready_for_interrupt_injection != 0 && run.if_flag != 0
    }

    /// Guest RIP at the last exit (the delivery point's cross-check).
    pub fn exit_rip(&self) -> u64 {
        match self.at_exit {
            Some((rip, _)) => rip,
            None => self.sync_regs().rip,
        }
    }

    /// (rip, interrupt-ready) at the last exit, for snapshots.
    pub fn exit_state(&mut self) -> (u64, bool) {
        (self.exit_rip(), self.can_inject())
    }

    /// Restored VMs: the exit state of the snapshotted VM.
    pub fn set_exit_state(&mut self, rip: u64, ready: bool) {
        self.at_exit = Some((rip, ready));
    }

    /// Called after every real guest exit.
    pub fn clear_exit_override(&mut self) {
        self.at_exit = None;
    }

    /// Queues external interrupt `vector` for the next KVM_RUN.
    pub fn inject(&self, vector: u32) -> Result<()> {
        let irq = kvm_interrupt { irq: vector };
        // SAFETY: KVM_INTERRUPT reads one `struct kvm_interrupt` from the pointer, which
        // points to a live local of exactly that type.
        let r = unsafe { libc::ioctl(self.fd.as_raw_fd(), KVM_INTERRUPT, &irq) };
        if r != 0 {
            return Err(Error::KvmIoctl {
                op: "KVM_INTERRUPT",
                err: kvm_ioctls::Error::last(),
            });
        }
        Ok(())
    }

    /// Enters KVM_RUN with `immediate_exit` set: KVM finishes a pending MMIO/PIO read
    /// (register write-back, RIP advance) and returns EINTR without running guest code.
    /// Needed before saving state at an exit, and after restoring, so `kvm_run`'s
    /// interrupt-readiness flags and sync regs describe the current state.
    pub fn complete_pending_io(&mut self) -> Result<()> {
        if self.at_exit.is_none() {
            self.at_exit = Some(self.exit_state());
        }
        self.fd.set_kvm_immediate_exit(1);
        let r = match self.fd.run() {
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Ok(()),
            Err(e) => Err(Error::KvmIoctl {
                op: "KVM_RUN (immediate exit)",
                err: e,
            }),
            Ok(exit) => Err(Error::VcpuFailed(format!(
                "immediate-exit KVM_RUN returned {exit:?}"
            ))),
        };
        self.fd.set_kvm_immediate_exit(0);
        r
    }

    pub fn save_state(&self) -> Result<VcpuState> {
        let regs = self.regs()?;
        let sregs = self.sregs()?;
        let fpu = self.fd.get_fpu().map_err(Error::ioctl("KVM_GET_FPU"))?;
        let events = self
            .fd
            .get_vcpu_events()
            .map_err(Error::ioctl("KVM_GET_VCPU_EVENTS"))?;
        let entries: Vec<kvm_msr_entry> = SNAPSHOT_MSRS
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries)
            .map_err(|e| Error::Snapshot(format!("msr list: {e:?}")))?;
        let n = self
            .fd
            .get_msrs(&mut msrs)
            .map_err(Error::ioctl("KVM_GET_MSRS"))?;
        let msrs = msrs.as_slice()[..n]
            .iter()
            .map(|e| (e.index, e.data))
            .collect();
        Ok(VcpuState {
            regs,
            sregs,
            fpu,
            events,
            msrs,
        })
    }

    pub fn restore_state(&self, st: &VcpuState) -> Result<()> {
        self.fd
            .set_sregs(&st.sregs)
            .map_err(Error::ioctl("KVM_SET_SREGS"))?;
        self.fd
            .set_regs(&st.regs)
            .map_err(Error::ioctl("KVM_SET_REGS"))?;
        self.fd
            .set_fpu(&st.fpu)
            .map_err(Error::ioctl("KVM_SET_FPU"))?;
        let entries: Vec<kvm_msr_entry> = st
            .msrs
            .iter()
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let msrs = Msrs::from_entries(&entries)
            .map_err(|e| Error::Snapshot(format!("msr list: {e:?}")))?;
        self.fd
            .set_msrs(&msrs)
            .map_err(Error::ioctl("KVM_SET_MSRS"))?;
        self.fd
            .set_vcpu_events(&st.events)
            .map_err(Error::ioctl("KVM_SET_VCPU_EVENTS"))?;
        Ok(())
    }
}

/// Hash of the architectural registers a guest computation depends on.
pub fn regs_hash(r: &kvm_regs) -> u64 {
    crate::hash::hash_words(
        &[
            r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rsp, r.rbp, r.r8, r.r9, r.r10, r.r11,
            r.r12, r.r13, r.r14, r.r15, r.rip, r.rflags,
        ],
        0x5eed,
    )
}
