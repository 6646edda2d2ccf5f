//! Paravirtual devices. All registers are in one MMIO page (see `abi` and DEVICES.md);
//! each access is a VM exit handled on the vCPU thread, which is what makes every
//! input's delivery point (the exit count) exact.
//!
//! The devices here are pure state machines: *where* a value comes from (host, log) is
//! decided by the run loop in [`crate::vmm`], according to the mode.
pub mod clock;
pub mod console;
pub mod entropy;
pub mod nic;
pub mod timer;

pub use clock::Clock;
pub use console::Console;
pub use nic::Nic;
pub use timer::Timer;
