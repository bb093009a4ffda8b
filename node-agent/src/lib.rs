//! The Meshlet node agent: loads the eBPF data plane, keeps its maps pinned, and restarts or
//! upgrades without disrupting traffic.
//!
//! ```text
//!  config (flags) ─► cgroup (attach point: --cgroup, or found in /proc/self/mountinfo)
//!        │           bpffs  (pins only on a bpffs; `meshlet-agent mount-bpffs`)
//!        ▼
//!  agent (run loop) ─────────► dataplane (kernel)
//!   ▲    ├─► admin (gRPC on a unix socket, meshletctl)
//!   │    ├─► metrics (/healthz /readyz /metrics)
//!   │    └─► status (NodeEnrollment.status, --kubernetes)
//!  index ◄── source/* (standalone file, Kubernetes)
//! ```

pub mod admin;
pub mod agent;
pub mod bpffs;
pub mod cgroup;
pub mod config;
pub mod dataplane;
pub mod index;
pub mod ipsec;
pub mod metrics;
pub mod model;
pub mod source;
pub mod status;
