//! ftd: the fault-tolerance daemon.
pub mod dataplane;
