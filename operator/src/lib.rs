//! The Meshlet operator: reconciles `MeshConfig`, `NodeEnrollment` and `IPsecPolicy`.
//!
//! The controllers, rollout engine and IPsec key manager live here; `main.rs` only parses
//! flags and starts them.

/// Field manager used for every server-side apply the operator makes.
pub const FIELD_MANAGER: &str = "meshlet-operator";

pub mod rollout;

pub mod ipsec;
