//! KVM state: the VM (memory slot, dirty logging), the vCPU (long mode, registers, the
//! fixed CPU model) and guest memory.
pub mod cpuid;
pub mod dirty;
pub mod memory;
pub mod vcpu;
pub mod vm;
