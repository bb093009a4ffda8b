//! The kernel side of the agent: eBPF programs, pinned maps and links, layouts and migrations.
