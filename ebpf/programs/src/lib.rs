//! The eBPF programs are the `ft` binary target of this crate (built for
//! bpfel-unknown-none by userspace/build.rs). This empty library exists so that the
//! daemon can declare a build-dependency on the crate (rebuild tracking).
#![no_std]
