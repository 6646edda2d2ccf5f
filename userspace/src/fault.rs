//! Fault injection for the system tests. Off unless the environment names a trigger
//! file, and then armed only while that file exists; a node started without the
//! variable pays nothing (the sink holds `None`).
//!
//! The one fault so far stands for what the logging link's MAC cannot see: a log entry
//! that differs from what the primary's VM consumed (a non-determinism bug, a memory
//! error). The backup's replay must find it at its next checkpoint, halt and leave, and
//! the primary go on alone (`tests/tests/protected_vm.rs`). Corruption on the wire is
//! no longer such a fault: the backup's XDP drops the frame (`bad_mac`) and it is
//! repaired.
use std::path::PathBuf;

/// Names the trigger file of [`CorruptClock`].
pub const CORRUPT_VMLOG_CLOCK: &str = "FTD_FAULT_CORRUPT_VMLOG_CLOCK";

/// Once armed, changes the value of the next VMLOG frame's leading CLOCK entry before the
/// frame is tagged (a time jump of seconds to minutes, which the guest keeps in memory),
/// once.
#[derive(Debug, Default)]
pub struct CorruptClock {
    trigger: Option<PathBuf>,
}

impl CorruptClock {
    pub fn from_env() -> CorruptClock {
        CorruptClock {
            trigger: std::env::var_os(CORRUPT_VMLOG_CLOCK).map(PathBuf::from),
        }
    }

    /// Applies the fault to `entries` (whole entries, back to back) if it is armed and
    /// they begin with a CLOCK entry; true if it did (it never fires again).
    pub fn apply(&mut self, entries: &mut [u8]) -> bool {
        let Some(t) = &self.trigger else {
            return false;
        };
        if entries.first() != Some(&ft_common::vmlog::EV_CLOCK)
            || entries.len() < ft_common::vmlog::ENTRY_HLEN
            || !t.exists()
        {
            return false;
        }
        // EntryHdr.value is at offset 24 (big-endian): its bytes 3 and 4.
        entries[27..29].copy_from_slice(&[0x5a, 0x5a]);
        let _ = std::fs::remove_file(t);
        self.trigger = None;
        true
    }
}
