//! The logging channel's userspace half. The primary's log frames are made in the kernel
//! (XDP); userspace only adds heartbeats. The backup receives log frames over AF_XDP,
//! puts them in order, hands them to the VM side exactly once, and sends cumulative acks
//! and per-entry nacks.
pub mod auth;
pub mod backup;
pub mod frames;
pub mod primary;
pub mod reorder;
pub mod status;
pub mod vmrepair;
