//! The logging channel's userspace half. The primary's log frames are made in the kernel
//! (XDP); userspace only adds heartbeats. The backup's XDP buffers every log frame in a
//! ring buffer and acks in-order frames itself; its daemon drains the ring, puts the
//! frames in order, hands them to the VM side exactly once, and sends a cumulative ack once
//! per wake-up (covering the acks XDP deferred and repaired gaps) and per-entry nacks.
pub mod auth;
pub mod backup;
pub mod frames;
pub mod heartbeat;
pub mod keys;
pub mod reorder;
pub mod status;
pub mod vmrepair;
