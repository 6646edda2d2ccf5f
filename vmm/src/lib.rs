//! `ft-vmm`: a one-vCPU KVM VMM that records (primary) or replays (backup) every
//! non-deterministic input of its guest, for VMware-FT-style fault tolerance.
//!
//! - [`vstate`]: KVM VM, vCPU (with a fixed CPU model, [`vstate::cpuid`]) and guest
//!   memory (vm-memory), long mode set up by the VMM.
//! - [`devices`]: paravirtual devices (clock, entropy, timer, NIC, console); see DEVICES.md.
//! - [`vmlog`]: the record/replay log stream ([`vmlog::LogSink`], [`vmlog::LogSource`],
//!   file/stream and in-process channel implementations, [`vmlog::FrameStore`] of
//!   received frames by (epoch, sequence)).
//! - [`net`]: network backends for the NIC (TAP).
//! - [`vmm`]: the run loop ([`Vmm`]), modes, divergence checks, go-live, snapshots.
//!
//! The guest (vmm/guest) is built by build.rs and embedded as [`GUEST_ELF`].
//!
//! # Embedding (daemon side)
//!
//! ```no_run
//! use ft_vmm::{Control, Mode, Vmm, VmmConfig, vmlog, net};
//! # fn main() -> Result<(), ft_vmm::Error> {
//! // Primary: record into any LogSink (here an in-process channel).
//! let (sink, source) = vmlog::channel(1024);
//! let control = Control::new();
//! let mut primary = Vmm::new(VmmConfig { mode: Mode::Record, ..Default::default() },
//!                            ft_vmm::GUEST_ELF, control.clone())?;
//! primary.set_net(Box::new(net::Tap::open("ftap0")?));
//! primary.set_sink(Box::new(sink));
//! std::thread::spawn(move || primary.run());
//!
//! // Backup: replay from any LogSource; go live later with `request_go_live`.
//! let bctl = Control::new();
//! let cfg = VmmConfig { mode: Mode::Replay, wait_for_go_live: true, ..Default::default() };
//! let mut backup = Vmm::new(cfg, ft_vmm::GUEST_ELF, bctl.clone())?;
//! backup.set_source(Box::new(source));
//! backup.set_net_on_live(Box::new(|| Ok(Box::new(net::Tap::open("ftap0")?) as Box<dyn net::NetBackend>)));
//! let h = std::thread::spawn(move || backup.run());
//! // ... primary fails: its sink is gone (dropping every sender closes the channel), so
//! // the backup replays everything that arrived, then goes live.
//! bctl.request_go_live();
//! # let _ = h; Ok(()) }
//! ```

#[path = "../guest/src/abi.rs"]
pub mod abi;
pub mod devices;
pub mod error;
pub mod hash;
pub mod image;
pub mod net;
pub mod scan;
pub mod snapshot;
pub mod transfer;
pub mod vmlog;
pub mod vmm;
pub mod vstate;

pub use error::Error;
pub use vmm::{Control, DeviceState, LiveStats, Mode, RunOutcome, RunReport, Vmm, VmmConfig};

/// The guest kernel + RESP service, built from vmm/guest by build.rs.
pub static GUEST_ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/ft-guest.elf"));
