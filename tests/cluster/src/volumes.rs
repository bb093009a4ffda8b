//! Pod volumes on a simulated node: `hostPath` (with its `type` check, on the node's own
//! "host" tree), `emptyDir`, and the projected service-account volume.
//!
//! ```text
//!  pod.spec.volumes ─► prepare ─┬─ hostPath  /x ─► SimNode::host_path("/x") (type checked,
//!                               │                  created for *OrCreate)
//!                               ├─ emptyDir     ─► <pod dir>/volumes/<name>
//!                               └─ kube-api-access (implicit, as the ServiceAccount admission
//!                                  plugin adds it) ─► token, ca.crt, namespace
//!  every container ─► mounted at /var/run/secrets/kubernetes.io/serviceaccount (read-only)
//! ```

use std::collections::BTreeMap;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{Pod, Volume};

use crate::SimNode;
use crate::spec::PreparedVolume;

/// Name of the implicit service-account volume.
pub const SA_VOLUME: &str = "kube-api-access";
/// Where containers see the service-account volume.
pub const SA_MOUNT_PATH: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// Why a volume cannot be set up (the kubelet reports `FailedMount` and keeps the pod in
/// `ContainerCreating`, retrying).
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// `hostPath` type check failed.
    #[error(
        "MountVolume.SetUp failed for volume {volume:?} : hostPath type check failed: {path} is not a {expected}"
    )]
    HostPathType {
        /// Volume name.
        volume: String,
        /// The path as the pod gave it.
        path: String,
        /// What `type` required.
        expected: &'static str,
    },
    /// An unknown `hostPath` type.
    #[error("MountVolume.SetUp failed for volume {volume:?} : unsupported hostPath type {kind:?}")]
    UnknownType {
        /// Volume name.
        volume: String,
        /// The type given.
        kind: String,
    },
    /// A volume kind the local cluster does not provide.
    #[error(
        "MountVolume.SetUp failed for volume {0:?} : only hostPath, emptyDir and the service-account token are supported by the local cluster"
    )]
    Unsupported(String),
    /// Creating a file or directory failed.
    #[error("MountVolume.SetUp failed for volume {volume:?} : {path}: {source}")]
    Io {
        /// Volume name.
        volume: String,
        /// Path.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
}

/// The service-account files of a pod.
pub struct ServiceAccountFiles {
    /// The bound token.
    pub token: String,
    /// The cluster CA (PEM).
    pub ca_pem: String,
    /// The pod's namespace.
    pub namespace: String,
}

/// Checks `host` against a `hostPath` `type`, creating it for the `*OrCreate` types.
pub fn check_host_path(
    volume: &str,
    given: &str,
    host: &Path,
    kind: &str,
) -> Result<(), VolumeError> {
    let io = |source| VolumeError::Io {
        volume: volume.into(),
        path: host.into(),
        source,
    };
    let meta = std::fs::metadata(host);
    let fail = |expected| VolumeError::HostPathType {
        volume: volume.into(),
        path: given.into(),
        expected,
    };
    match kind {
        "" => Ok(()),
        "DirectoryOrCreate" => match meta {
            Ok(m) if m.is_dir() => Ok(()),
            Ok(_) => Err(fail("directory")),
            Err(_) => std::fs::create_dir_all(host).map_err(io),
        },
        "Directory" => match meta {
            Ok(m) if m.is_dir() => Ok(()),
            _ => Err(fail("directory")),
        },
        "FileOrCreate" => match meta {
            Ok(m) if m.is_file() => Ok(()),
            Ok(_) => Err(fail("file")),
            Err(_) => {
                if let Some(parent) = host.parent() {
                    std::fs::create_dir_all(parent).map_err(io)?;
                }
                std::fs::File::create(host).map(|_| ()).map_err(io)
            }
        },
        "File" => match meta {
            Ok(m) if m.is_file() => Ok(()),
            _ => Err(fail("file")),
        },
        "Socket" => match meta {
            Ok(m) if m.file_type().is_socket() => Ok(()),
            _ => Err(fail("socket")),
        },
        "CharDevice" => match meta {
            Ok(m) if m.file_type().is_char_device() => Ok(()),
            _ => Err(fail("character device")),
        },
        "BlockDevice" => match meta {
            Ok(m) if m.file_type().is_block_device() => Ok(()),
            _ => Err(fail("block device")),
        },
        other => Err(VolumeError::UnknownType {
            volume: volume.into(),
            kind: other.into(),
        }),
    }
}

/// Sets up every volume of `pod` on `node` in `pod_dir`; the service-account volume is added
/// unless `automountServiceAccountToken` is false.
pub fn prepare(
    pod: &Pod,
    node: &SimNode,
    pod_dir: &Path,
    sa: Option<&ServiceAccountFiles>,
) -> Result<BTreeMap<String, PreparedVolume>, VolumeError> {
    let mut out = BTreeMap::new();
    let spec = pod.spec.clone().unwrap_or_default();
    for v in spec.volumes.iter().flatten() {
        out.insert(v.name.clone(), prepare_one(v, node, pod_dir)?);
    }
    if let Some(sa) = sa {
        let dir = pod_dir.join("volumes").join(SA_VOLUME);
        let io = |source| VolumeError::Io {
            volume: SA_VOLUME.into(),
            path: dir.clone(),
            source,
        };
        std::fs::create_dir_all(&dir).map_err(io)?;
        for (file, text) in [
            ("token", sa.token.as_str()),
            ("ca.crt", sa.ca_pem.as_str()),
            ("namespace", sa.namespace.as_str()),
        ] {
            std::fs::write(dir.join(file), text).map_err(io)?;
        }
        out.insert(
            SA_VOLUME.into(),
            PreparedVolume {
                source: dir,
                read_only: true,
                host_path: false,
            },
        );
    }
    Ok(out)
}

fn prepare_one(v: &Volume, node: &SimNode, pod_dir: &Path) -> Result<PreparedVolume, VolumeError> {
    if let Some(hp) = &v.host_path {
        let host = node.host_path(&hp.path);
        check_host_path(&v.name, &hp.path, &host, hp.type_.as_deref().unwrap_or(""))?;
        return Ok(PreparedVolume {
            source: host,
            read_only: false,
            host_path: true,
        });
    }
    if v.empty_dir.is_some() {
        let dir = pod_dir.join("volumes").join(&v.name);
        std::fs::create_dir_all(&dir).map_err(|source| VolumeError::Io {
            volume: v.name.clone(),
            path: dir.clone(),
            source,
        })?;
        return Ok(PreparedVolume {
            source: dir,
            read_only: false,
            host_path: false,
        });
    }
    Err(VolumeError::Unsupported(v.name.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_path_types_are_checked_and_created() {
        let t = tempfile::tempdir().expect("tempdir");
        let missing = t.path().join("missing");
        let err = check_host_path("v", "/missing", &missing, "Directory").expect_err("missing");
        assert!(
            err.to_string()
                .contains("hostPath type check failed: /missing is not a directory"),
            "{err}"
        );
        check_host_path("v", "/missing", &missing, "DirectoryOrCreate").expect("created");
        assert!(missing.is_dir());
        let err = check_host_path("v", "/missing", &missing, "File").expect_err("a dir");
        assert!(err.to_string().contains("is not a file"), "{err}");
        let f = t.path().join("a/b/f");
        check_host_path("v", "/a/b/f", &f, "FileOrCreate").expect("file created");
        assert!(f.is_file());
        assert!(check_host_path("v", "/x", &f, "Bogus").is_err());
    }
}
