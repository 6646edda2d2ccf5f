//! ftd: the fault-tolerance daemon. See ARCHITECTURE.md for the packet and log paths.
pub mod channel;
pub mod cli;
pub mod config;
pub mod control;
pub mod daemon;
pub mod dataplane;
pub mod fault;
pub mod liveness;
pub mod logging;
pub mod metrics;
pub mod netif;
pub mod preflight;
pub mod role;
pub mod shared;
pub mod vm;
