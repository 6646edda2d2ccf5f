//! KVM state: the VM (memory slot, dirty logging), the vCPU (long mode, registers) and
//! guest memory.
pub mod memory;
pub mod vcpu;
pub mod vm;
