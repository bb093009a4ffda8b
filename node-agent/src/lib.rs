//! The Meshlet node agent: loads the eBPF data plane, keeps its maps pinned, and restarts or
//! upgrades without disrupting traffic.

pub mod dataplane;
pub mod model;
