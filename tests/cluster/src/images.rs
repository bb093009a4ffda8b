//! Where the local cluster's kubelet finds images: OCI archives, one per image reference, as
//! `cargo xtask images` writes them (`target/images/<reference with / and : as _>.tar`).
//!
//! ```text
//!  pod.spec.containers[i].image ──► meshlet_oci::archive_path(images dir, ref)
//!        found ──► runtime::ImageStore unpacks it once ──► container root (overlay)
//!        missing ─► ErrImagePull / ImagePullBackOff in the pod status, as a real kubelet
//! ```
//!
//! | image reference | what it is |
//! |---|---|
//! | `ghcr.io/meshlet-io/meshlet-agent:v0.1.0`, `:0.1.0` | the agent image users run |
//! | `ghcr.io/meshlet-io/meshlet-agent:v1`, `:v2` | the same binaries; `ENV` selects map layout 1 or 2 and the xfrm recording (this host kernel has no ESP) |
//! | `ghcr.io/meshlet-io/meshlet-agent:broken` | `ENV MESHLET_CGROUP=/nonexistent/meshlet`: its preflight fails |
//! | `ghcr.io/meshlet-io/meshlet-operator:v0.1.0` | the operator, non-root |
//! | `meshlet.local/mesh-traffic:v1` | backends and clients of the e2e tests (`src/bin/mesh-traffic.rs`) |
//! | `meshlet.local/busybox:1` | a shell for test pods (Debian's busybox-static) |

use std::path::PathBuf;

/// Repository of the agent image.
pub const AGENT_REPO: &str = "ghcr.io/meshlet-io/meshlet-agent";
/// Repository of the operator image.
pub const OPERATOR_REPO: &str = "ghcr.io/meshlet-io/meshlet-operator";
/// The traffic image of the e2e tests.
pub const TRAFFIC_IMAGE: &str = "meshlet.local/mesh-traffic:v1";
/// A busybox shell image for test pods.
pub const BUSYBOX_IMAGE: &str = "meshlet.local/busybox:1";

/// `target/images` of this workspace, found from the running executable (a binary in
/// `target/<profile>/` or a test in `target/<profile>/deps/`); `MESHLET_IMAGES_DIR` wins.
pub fn default_images_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("MESHLET_IMAGES_DIR") {
        return PathBuf::from(dir);
    }
    crate::current_bin_dir()
        .and_then(|d| d.parent().map(|t| t.join("images")))
        .unwrap_or_else(|| PathBuf::from("target/images"))
}
