//! Wire and map types of the benchmark-only probe programs (`ft-ebpf`'s `probe.rs`).
