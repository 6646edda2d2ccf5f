//! Snapshot/restore of the full VM state: RAM, vCPU (regs, sregs, FPU, events, MSRs) and
//! device state, to any `Write`/`Read` (file or stream). Together with the dirty-page API
//! ([`Vmm::take_dirty_pages`], [`Vmm::write_pages`], [`apply_pages`]) this is the basis for
//! creating a new backup by state transfer: send a full snapshot while the primary runs,
//! then the pages dirtied meanwhile, then a final delta with the vCPU state.
//!
//! Format (little-endian): magic `FTVMSNAP`, version, config hash, device state (u64s),
//! vCPU structures as raw KVM structs with their sizes, MSR list, RAM size and bytes.
use crate::error::{Error, Result};
use crate::vmm::{Control, DeviceState, Stats, Vmm, VmmConfig};
use crate::vstate::memory::PAGE_SIZE;
use crate::vstate::vcpu::VcpuState;
use std::io::{Read, Write};
use std::sync::Arc;

const SNAP_MAGIC: [u8; 8] = *b"FTVMSNAP";
/// 4: the timer stays armed until its interrupt is injected (no pending timer bit).
const SNAP_VERSION: u64 = 4;
const PAGES_MAGIC: [u8; 8] = *b"FTVMPAGE";

fn w64(w: &mut dyn Write, v: u64) -> Result<()> {
    w.write_all(&v.to_le_bytes())?;
    Ok(())
}

fn r64(r: &mut dyn Read) -> Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)
        .map_err(|e| Error::Snapshot(format!("truncated snapshot: {e}")))?;
    Ok(u64::from_le_bytes(b))
}

/// Raw bytes of a plain KVM struct.
fn pod_bytes<T: Copy>(v: &T) -> &[u8] {
    // SAFETY: only used with kvm-bindings structs (#[repr(C)], integer fields with explicit
    // padding members), which have no uninitialised bytes; the slice borrows `v`.
    unsafe { std::slice::from_raw_parts(v as *const T as *const u8, std::mem::size_of::<T>()) }
}

fn write_pod<T: Copy>(w: &mut dyn Write, v: &T) -> Result<()> {
    w64(w, std::mem::size_of::<T>() as u64)?;
    w.write_all(pod_bytes(v))?;
    Ok(())
}

fn read_pod<T: Copy + Default>(r: &mut dyn Read) -> Result<T> {
    let n = r64(r)? as usize;
    if n != std::mem::size_of::<T>() {
        return Err(Error::Snapshot(format!(
            "structure size {n} != {} (snapshot from another KVM ABI)",
            std::mem::size_of::<T>()
        )));
    }
    let mut buf = vec![0u8; n];
    r.read_exact(&mut buf)
        .map_err(|e| Error::Snapshot(format!("truncated snapshot: {e}")))?;
    let mut v = T::default();
    // SAFETY: `buf` holds exactly size_of::<T>() bytes written by `write_pod` for the same
    // plain-data KVM struct type; every bit pattern of these integer structs is valid.
    unsafe { std::ptr::copy_nonoverlapping(buf.as_ptr(), &mut v as *mut T as *mut u8, n) };
    Ok(v)
}

/// Everything of a VMM's state but RAM: devices, log position, vCPU.
pub(crate) struct MachineState {
    device: DeviceState,
    entries_consumed: u64,
    exit_rip: u64,
    ready: bool,
    vcpu: VcpuState,
}

impl Vmm {
    /// Writes a full snapshot. Call between runs (e.g. after [`crate::RunOutcome::ExitLimit`]).
    pub fn snapshot(&mut self, w: &mut dyn Write) -> Result<()> {
        w.write_all(&SNAP_MAGIC)?;
        w64(w, SNAP_VERSION)?;
        w64(w, self.config_hash())?;
        self.write_state(w)?;
        let ram = self.vm().ram.as_slice();
        w64(w, ram.len() as u64)?;
        w.write_all(ram)?;
        w.flush()?;
        // Start a new dirty-page epoch for incremental transfer.
        self.vm().dirty.take_written()?;
        Ok(())
    }

    /// Writes the state without RAM (devices, log position, vCPU): the last part of a
    /// snapshot, and the stop phase of a live transfer. The vCPU must be stopped at a
    /// guest exit (between runs, or at the top of the run loop).
    pub(crate) fn write_state(&mut self, w: &mut dyn Write) -> Result<()> {
        let (exit_rip, ready) = self.vcpu_mut().exit_state();
        self.vcpu_mut().complete_pending_io()?;
        let st = self.vcpu().save_state()?;
        let d = self.device_state();
        w64(w, d.exits)?;
        w64(w, d.clock_last)?;
        w64(w, d.timer_deadline.unwrap_or(0))?;
        w64(w, d.pending_irqs as u64)?;
        w64(w, d.rx_frames)?;
        w64(w, d.rx_bytes)?;
        w64(w, d.tx_frames)?;
        w64(w, d.tx_bytes)?;
        w64(w, d.tx_hash)?;
        w64(w, self.stats.entries_consumed)?;
        w64(w, exit_rip)?;
        w64(w, ready as u64)?;
        w64(w, d.dev_hash)?;
        w64(w, d.nic_irq_enabled as u64)?;
        write_pod(w, &st.regs)?;
        write_pod(w, &st.sregs)?;
        write_pod(w, &st.fpu)?;
        write_pod(w, &st.events)?;
        w64(w, st.msrs.len() as u64)?;
        for &(i, d) in &st.msrs {
            w64(w, i as u64)?;
            w64(w, d)?;
        }
        Ok(())
    }

    /// Reads what [`Vmm::write_state`] wrote (validated; applied by `apply_state`).
    pub(crate) fn read_state(r: &mut dyn Read) -> Result<MachineState> {
        let mut d = DeviceState {
            exits: r64(r)?,
            clock_last: r64(r)?,
            timer_deadline: Some(r64(r)?).filter(|&t| t != 0),
            pending_irqs: r64(r)? as u32,
            rx_frames: r64(r)?,
            rx_bytes: r64(r)?,
            tx_frames: r64(r)?,
            tx_bytes: r64(r)?,
            tx_hash: r64(r)?,
            ..Default::default()
        };
        let entries_consumed = r64(r)?;
        let exit_rip = r64(r)?;
        let ready = r64(r)? != 0;
        d.dev_hash = r64(r)?;
        d.nic_irq_enabled = r64(r)? != 0;
        let regs = read_pod(r)?;
        let sregs = read_pod(r)?;
        let fpu = read_pod(r)?;
        let events = read_pod(r)?;
        let n = r64(r)? as usize;
        if n > 64 {
            return Err(Error::Snapshot("corrupt MSR count".into()));
        }
        let mut msrs = Vec::with_capacity(n);
        for _ in 0..n {
            msrs.push((r64(r)? as u32, r64(r)?));
        }
        Ok(MachineState {
            device: d,
            entries_consumed,
            exit_rip,
            ready,
            vcpu: VcpuState {
                regs,
                sregs,
                fpu,
                events,
                msrs,
            },
        })
    }

    /// Applies a state read by `read_state` after RAM holds the matching contents:
    /// vCPU, devices, hashes rebuilt from RAM (now, or with `defer_hashes` at the first
    /// checkpoint), the dirty log started afresh.
    pub(crate) fn apply_state(&mut self, m: MachineState, defer_hashes: bool) -> Result<()> {
        self.set_device_state(&m.device);
        self.vcpu().restore_state(&m.vcpu)?;
        self.vcpu_mut().complete_pending_io()?;
        self.vcpu_mut().set_exit_state(m.exit_rip, m.ready);
        let _ = self.vm().take_dirty_log()?;
        if defer_hashes {
            self.vm_mut().ram.mark_all_stale();
        } else {
            self.vm_mut().ram.rehash_all();
        }
        self.vm().dirty.take_written()?;
        self.stats = Stats {
            entries_consumed: m.entries_consumed,
            ..Default::default()
        };
        Ok(())
    }

    /// Creates a VMM from a snapshot. `cfg` must describe the same guest (checked by the
    /// configuration hash). In replay mode, give the restored VMM a log source positioned
    /// at the start of the log: the entries the original had consumed are skipped
    /// ([`Vmm::skip_consumed`]).
    pub fn restore(
        cfg: VmmConfig,
        guest_elf: &[u8],
        control: Arc<Control>,
        r: &mut dyn Read,
    ) -> Result<Vmm> {
        let mut vmm = Vmm::new(cfg, guest_elf, control)?;
        let mut magic = [0u8; 8];
        r.read_exact(&mut magic)
            .map_err(|e| Error::Snapshot(format!("truncated snapshot: {e}")))?;
        if magic != SNAP_MAGIC {
            return Err(Error::Snapshot("not an ft-vmm snapshot (bad magic)".into()));
        }
        if r64(r)? != SNAP_VERSION {
            return Err(Error::Snapshot("unsupported snapshot version".into()));
        }
        let ch = r64(r)?;
        if ch != vmm.config_hash() {
            return Err(Error::Snapshot(format!(
                "snapshot is of another configuration ({ch:#x} != {:#x}); use the same guest image and network settings",
                vmm.config_hash()
            )));
        }
        let state = Vmm::read_state(r)?;
        let size = r64(r)?;
        let ours = vmm.config().ram_size;
        if size != ours {
            return Err(Error::Snapshot(format!(
                "snapshot has {size} bytes of RAM, this VMM {ours}; configure the same RAM size"
            )));
        }
        let mut ram = vec![0u8; size as usize];
        r.read_exact(&mut ram)
            .map_err(|e| Error::Snapshot(format!("truncated RAM image: {e}")))?;
        vmm.vm_mut().ram.write(0, &ram)?;
        vmm.apply_state(state, false)?;
        // The log header was consumed (replay) or written (record) by the original.
        vmm.log_started = true;
        Ok(vmm)
    }

    /// Replay after restore: drops the log entries the snapshotted VMM had consumed.
    pub fn skip_consumed(&mut self, src: &mut dyn crate::vmlog::LogSource) -> Result<()> {
        for i in 0..self.stats.entries_consumed {
            match src.recv(std::time::Duration::from_secs(5))? {
                crate::vmlog::Recv::Entry(_) => {}
                _ => {
                    return Err(Error::Snapshot(format!(
                        "log ended after {i} entries but the snapshot had consumed {}",
                        self.stats.entries_consumed
                    )));
                }
            }
        }
        Ok(())
    }

    /// Pages written (by the guest or the VMM) since the last snapshot or call.
    pub fn take_dirty_pages(&mut self) -> Result<Vec<u64>> {
        let dirty = self.vm().take_dirty_log()?;
        self.vm_mut().ram.update_hashes(&dirty);
        self.vm().dirty.take_written()
    }

    /// Writes the given pages (an incremental snapshot delta).
    pub fn write_pages(&self, pages: &[u64], w: &mut dyn Write) -> Result<()> {
        w.write_all(&PAGES_MAGIC)?;
        w64(w, pages.len() as u64)?;
        for &p in pages {
            w64(w, p)?;
            w.write_all(self.vm().ram.slice(p * PAGE_SIZE as u64, PAGE_SIZE)?)?;
        }
        Ok(())
    }
}

/// Reads a page delta written by [`Vmm::write_pages`] into a (full) snapshot image in memory,
/// whose RAM starts at `ram_offset`.
pub fn apply_pages(snapshot: &mut [u8], ram_offset: usize, r: &mut dyn Read) -> Result<usize> {
    let mut magic = [0u8; 8];
    r.read_exact(&mut magic)
        .map_err(|e| Error::Snapshot(format!("truncated delta: {e}")))?;
    if magic != PAGES_MAGIC {
        return Err(Error::Snapshot("not a page delta".into()));
    }
    let n = r64(r)? as usize;
    for _ in 0..n {
        let p = r64(r)? as usize;
        let off = ram_offset + p * PAGE_SIZE;
        let dst = snapshot
            .get_mut(off..off + PAGE_SIZE)
            .ok_or_else(|| Error::Snapshot(format!("page {p} outside RAM")))?;
        r.read_exact(dst)
            .map_err(|e| Error::Snapshot(format!("truncated delta: {e}")))?;
    }
    Ok(n)
}

/// Offset of RAM bytes inside a snapshot image of a VM with `ram_size` bytes of RAM (to
/// apply deltas to it).
pub fn ram_offset(snapshot: &[u8], ram_size: u64) -> Result<usize> {
    let len = snapshot.len();
    let ram = ram_size as usize;
    if len < ram + 8 {
        return Err(Error::Snapshot("snapshot too short".into()));
    }
    Ok(len - ram)
}
