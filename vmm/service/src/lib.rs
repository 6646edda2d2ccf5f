//! The protected VM's service: a Redis-compatible (RESP2) key-value server.
//!
//! `no_std` + `alloc`: the guest kernel (vmm/guest) runs it on smoltcp in ring 3, and the
//! host runs the same code in unit and property tests. It has no clock, no randomness
//! and no I/O of its own: the caller hands in received bytes, the device clock value of
//! the current loop iteration and a seed, and sends the replies. So the service is a
//! deterministic function of its inputs, which is what record/replay needs.
//!
//! Every size a client names is bounded before anything is allocated (see [`limits`]).
#![cfg_attr(not(test), no_std)]

extern crate alloc;

pub mod client;
pub mod commands;
pub mod compat;
pub mod glob;
pub mod info;
pub mod limits;
pub mod num;
pub mod resp;
pub mod server;
pub mod store;

pub use client::{Client, CloseReason};
pub use limits::{LimitError, Limits, Settings};
pub use server::{MemInfo, Server};
