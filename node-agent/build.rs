//! Build script: compiles the eBPF C programs and the admin API protos.

fn main() {}
