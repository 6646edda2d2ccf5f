//! Loading, configuring and attaching the kernel data plane.
pub const EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ft"));
