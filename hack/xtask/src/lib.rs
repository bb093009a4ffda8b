//! Meshlet's generators and checks for committed artifacts (`cargo xtask ...`).
//!
//! ```text
//!  meshlet_crds::all_crds() ─┐
//!  rbac (permission table) ──┼─► generate::generate() ─► Tree ─┬─► gen:    write into the repo
//!  examples/*.yaml ──────────┘     manifests:: + olm::         └─► verify: diff against the repo
//!
//!  olm-validate DIR ─► bundle::check_bundle() ─► problems (errors) and warnings, as OLM's
//!                      validators classify them: CSV schema, name, semver, owned CRDs by
//!                      group/version/kind, duplicate CRDs, ServiceAccounts, install modes
//!                      and conversion webhooks, annotation names, alm-examples, metadata
//!
//!  images ─► images::build() ─► target/images/<reference>.tar (meshlet_oci archives)
//! ```

pub mod bundle;
pub mod generate;
pub mod images;
pub mod manifests;
pub mod olm;
pub mod rbac;
pub mod schema;
pub mod yaml;

use std::path::PathBuf;

/// Version of the operator and agent, used in image tags and the CSV.
pub const VERSION: &str = "0.1.0";
/// Container image registry path of the operator (tag is [`VERSION`]).
pub const OPERATOR_IMAGE_REPO: &str = "ghcr.io/meshlet-io/meshlet-operator";
/// Container image registry path of the agent (tag is [`VERSION`]).
pub const AGENT_IMAGE_REPO: &str = "ghcr.io/meshlet-io/meshlet-agent";

/// Full operator image reference.
pub fn operator_image() -> String {
    format!("{OPERATOR_IMAGE_REPO}:v{VERSION}")
}

/// Full agent image reference.
pub fn agent_image() -> String {
    format!("{AGENT_IMAGE_REPO}:v{VERSION}")
}

/// Root of the workspace (two levels above this crate).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Reference data copied from OLM (its CSV schema and a bundle its tooling accepts), with
/// its source and licence in `reference/olm/SOURCE.md`.
pub fn reference_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("reference")
}
