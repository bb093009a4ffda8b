//! OCI images as `oci-archive` files: written by `cargo xtask images`, read by the local test
//! cluster's kubelet. Plain files only: no registry, no daemon, no network.
//!
//! ```text
//!  build:  Layer (host files, bytes, dirs, symlinks) ─┐
//!          ImageConfig ───────────────────────────────┼─► ImageBuilder::write ─► <ref>.tar
//!                        gzip layers, fixed mtimes, sorted entries, sha256 blobs, index.json
//!
//!  read:   <ref>.tar ─► Image::open ─► index.json ─► manifest ─► config   (digests checked)
//!                            │
//!                            └─► Image::unpack(rootfs): each layer in order, gunzip ─► tar
//!                                 entries, whiteouts (.wh.NAME, .wh..wh..opq) applied, paths
//!                                 resolved inside rootfs, layer and diff_id digests checked
//! ```
//!
//! An `oci-archive` is a tar of an OCI image layout (`oci-layout`, `index.json`,
//! `blobs/sha256/…`) holding one image, as `skopeo copy … oci-archive:FILE` writes and reads.

mod build;
mod config;
mod layout;
mod read;
mod unpack;

use std::path::{Path, PathBuf};

pub use build::{BuildError, ImageBuilder, Layer, Written};
pub use config::ImageConfig;
pub use read::{Image, LayerInfo, OciError};

/// The annotation of `index.json` naming the image: the full reference of our archives.
pub const REF_NAME_ANNOTATION: &str = "org.opencontainers.image.ref.name";

/// Where the archive of `reference` lives in an images directory: `<dir>/<file name>` with
/// the reference's `/` and `:` replaced by `_` plus `.tar`, e.g.
/// `ghcr.io_meshlet-io_meshlet-agent_v0.1.0.tar`.
pub fn archive_path(dir: &Path, reference: &str) -> PathBuf {
    dir.join(format!("{}.tar", reference.replace(['/', ':'], "_")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archive_path_replaces_slashes_and_colons_of_the_reference() {
        assert_eq!(
            archive_path(
                Path::new("target/images"),
                "ghcr.io/meshlet-io/meshlet-agent:v0.1.0"
            ),
            Path::new("target/images/ghcr.io_meshlet-io_meshlet-agent_v0.1.0.tar")
        );
        assert_eq!(
            archive_path(Path::new("/i"), "meshlet.local/mesh-traffic:v1"),
            Path::new("/i/meshlet.local_mesh-traffic_v1.tar")
        );
    }
}
