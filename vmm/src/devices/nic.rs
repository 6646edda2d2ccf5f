//! NIC device: two rings of `NIC_SLOTS` frame slots in guest RAM (layout in `abi`).
//!
//! - RX: the VMM copies a frame into slot `rx_prod % NIC_SLOTS`, sets its length and
//!   increments `NIC_RX_PROD`, only while the vCPU is stopped at an exit and only if the
//!   guest has freed the slot (`rx_prod - NIC_RX_CONS < NIC_SLOTS`). If the guest enabled
//!   it (`REG_NIC_IRQ`), it then injects `NIC_VECTOR`; a polling guest leaves it off. The
//!   guest consumes frames and advances `NIC_RX_CONS`.
//! - TX: the guest fills slots and advances `NIC_TX_PROD`; at its next exit (any exit:
//!   an idle or clock read, or `REG_NIC_DOORBELL`) the VMM takes every queued frame and
//!   advances `NIC_TX_CONS`.
//!
//! Output frames are always counted and hashed (so a backup's suppressed output can be
//! compared with the primary's), optionally captured, and sent to the backend only when
//! output is enabled (record/free mode, or after go-live).
use crate::abi::*;
use crate::error::Result;
use crate::hash::{FNV_OFFSET, fnv1a};
use crate::vstate::memory::GuestRam;

#[derive(Debug, Clone)]
pub struct Nic {
    pub rx_frames: u64,
    pub rx_bytes: u64,
    pub tx_frames: u64,
    pub tx_bytes: u64,
    /// FNV-1a over (length, bytes) of every TX frame, in order.
    pub tx_hash: u64,
    pub capture: Option<Vec<Vec<u8>>>,
    /// The guest asked for [`NIC_VECTOR`] on delivery (`REG_NIC_IRQ`).
    pub irq_enabled: bool,
}

impl Default for Nic {
    fn default() -> Self {
        Nic {
            rx_frames: 0,
            rx_bytes: 0,
            tx_frames: 0,
            tx_bytes: 0,
            tx_hash: FNV_OFFSET,
            capture: None,
            irq_enabled: false,
        }
    }
}

impl Nic {
    /// Free RX slots.
    pub fn rx_free(&self, ram: &GuestRam) -> Result<u64> {
        let prod = ram.read_u64(NIC_RX_PROD)?;
        let cons = ram.read_u64(NIC_RX_CONS)?;
        Ok(NIC_SLOTS.saturating_sub(prod.wrapping_sub(cons)))
    }

    /// True if the guest queued output frames the VMM has not taken yet.
    pub fn tx_pending(&self, ram: &GuestRam) -> Result<bool> {
        Ok(ram.read_u64(NIC_TX_PROD)? != ram.read_u64(NIC_TX_CONS)?)
    }

    /// True if the guest has not consumed every delivered frame yet.
    pub fn rx_pending(&self, ram: &GuestRam) -> Result<bool> {
        Ok(ram.read_u64(NIC_RX_PROD)? != ram.read_u64(NIC_RX_CONS)?)
    }

    /// Places `frame` into the RX ring (caller checked `rx_free` > 0).
    pub fn deliver(&mut self, ram: &mut GuestRam, frame: &[u8]) -> Result<()> {
        let frame = &frame[..frame.len().min(NIC_MAX_FRAME as usize)];
        let prod = ram.read_u64(NIC_RX_PROD)?;
        let slot = prod % NIC_SLOTS;
        ram.write(NIC_RX_DATA + slot * NIC_SLOT_SIZE, frame)?;
        ram.write_u16(NIC_RX_LEN + 2 * slot, frame.len() as u16)?;
        ram.write_u64(NIC_RX_PROD, prod + 1)?;
        self.rx_frames += 1;
        self.rx_bytes += frame.len() as u64;
        Ok(())
    }

    /// Takes every queued TX frame (doorbell).
    pub fn drain_tx(
        &mut self,
        ram: &mut GuestRam,
        mut out: impl FnMut(&[u8]) -> Result<()>,
    ) -> Result<u64> {
        let prod = ram.read_u64(NIC_TX_PROD)?;
        let mut cons = ram.read_u64(NIC_TX_CONS)?;
        let mut n = 0;
        // A guest that claims more than a ring's worth is clamped to one ring.
        if prod.wrapping_sub(cons) > NIC_SLOTS {
            cons = prod - NIC_SLOTS;
        }
        while cons != prod {
            let slot = cons % NIC_SLOTS;
            let len = (ram.read_u16(NIC_TX_LEN + 2 * slot)? as u64).min(NIC_MAX_FRAME) as usize;
            let frame = ram.slice(NIC_TX_DATA + slot * NIC_SLOT_SIZE, len)?;
            self.tx_hash = fnv1a(frame, fnv1a(&(len as u64).to_le_bytes(), self.tx_hash));
            self.tx_frames += 1;
            self.tx_bytes += len as u64;
            if let Some(c) = self.capture.as_mut() {
                c.push(frame.to_vec());
            }
            out(frame)?;
            cons += 1;
            n += 1;
        }
        ram.write_u64(NIC_TX_CONS, cons)?;
        Ok(n)
    }
}
