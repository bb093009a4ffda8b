//! The Meshlet node agent: loads the eBPF data plane, keeps its maps pinned, and restarts or
//! upgrades without disrupting traffic.
//!
//! ```text
//!  config (flags) ─► agent (run loop) ─► dataplane (kernel)
//!  source/* ─► index ─┘      │
//!                            ├─► admin (gRPC on a unix socket, meshletctl)
//!                            ├─► metrics (/healthz /readyz /metrics)
//!                            └─► status (NodeEnrollment.status, --kubernetes)
//! ```

pub mod admin;
pub mod agent;
pub mod config;
pub mod dataplane;
pub mod index;
pub mod ipsec;
pub mod metrics;
pub mod model;
pub mod source;
pub mod status;
