//! `ft-vmm`: a one-vCPU KVM VMM that records (primary) or replays (backup) every
//! non-deterministic input of its guest, for VMware-FT-style fault tolerance.
//!
//! - [`vstate`]: KVM VM, vCPU and guest memory (vm-memory), long mode set up by the VMM.
//! - [`devices`]: paravirtual devices (clock, entropy, timer, NIC, console); see DEVICES.md.
//! - [`vmlog`]: the record/replay log stream ([`vmlog::LogSink`], [`vmlog::LogSource`],
//!   file/stream and in-process channel implementations, [`vmlog::FrameStore`]).
//! - [`net`]: network backends for the NIC (TAP).
//! - [`vmm`]: the run loop ([`Vmm`]), modes, divergence checks, go-live, snapshots.
//!
//! The guest (vmm/guest) is built by build.rs and embedded as [`GUEST_ELF`].

#[path = "../guest/src/abi.rs"]
pub mod abi;
pub mod devices;
pub mod error;
pub mod hash;
pub mod image;
pub mod net;
pub mod snapshot;
pub mod vmlog;
pub mod vmm;
pub mod vstate;

pub use error::Error;
pub use vmm::{Control, Mode, RunOutcome, RunReport, Vmm, VmmConfig};

/// The guest kernel + RESP service, built from vmm/guest by build.rs.
pub static GUEST_ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/ft-guest.elf"));
