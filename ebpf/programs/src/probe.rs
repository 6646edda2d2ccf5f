//! Benchmark-only programs (perf/dataplane): the kernel-to-kernel round trip on the
//! logging link. Never attached by ftd.
