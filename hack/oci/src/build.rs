//! Writing an `oci-archive`: [`Layer`]s describe files by image path, [`ImageBuilder`] turns
//! them and an [`ImageConfig`] into a reproducible archive: the same inputs give the same
//! bytes (fixed mtimes and owners, entries sorted by path, blobs sorted by digest, gzip
//! without a timestamp), so the same image gets the same digest on every machine.
//!
//! ```text
//!  Layer { image path → dir | file (host path or bytes) | symlink } ─► tar ─► sha256 (diff_id)
//!                                                                      └─► gzip ─► sha256 (blob)
//!  ImageConfig + diff_ids ─► config blob ─┐
//!  layer blobs ───────────────────────────┼─► manifest ─► index.json (ref.name = reference)
//!                                         └─► <archive>.tmp ─► rename to <archive>
//! ```

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use flate2::GzBuilder;

use crate::REF_NAME_ANNOTATION;
use crate::config::{self, ConfigBlob, ImageConfig, RootFs};
use crate::layout::{
    self, Descriptor, HashingWriter, Index, MEDIA_CONFIG, MEDIA_INDEX, MEDIA_LAYER_GZIP,
    MEDIA_MANIFEST, Manifest, OCI_LAYOUT,
};

/// Modification time of every entry, inner and outer (the epoch): builds are reproducible.
pub const MTIME: u64 = 0;
/// `created` of the image config, matching [`MTIME`].
const CREATED: &str = "1970-01-01T00:00:00Z";

/// Failures to build an image archive.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// An image path is not a plain absolute or relative path inside the image.
    #[error("failed to add {path:?} to the image: {reason}")]
    InvalidPath {
        /// The image path given.
        path: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A host file or directory cannot be read.
    #[error("failed to read {path} for image path /{image_path}: {source}")]
    ReadHost {
        /// Host path.
        path: PathBuf,
        /// Where it was to go in the image.
        image_path: String,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
    /// Writing a layer or the archive failed.
    #[error("failed to write image archive {path}: {source}")]
    WriteArchive {
        /// The archive.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
}

/// What a host file or in-memory content becomes.
#[derive(Debug, Clone)]
enum Content {
    Host(PathBuf),
    Bytes(Vec<u8>),
}

#[derive(Debug, Clone)]
enum Node {
    Dir,
    File(Content),
    Symlink(String),
    HardLink(String),
}

#[derive(Debug, Clone)]
struct Entry {
    node: Node,
    mode: u32,
    uid: u64,
    gid: u64,
}

/// One layer: files, directories and symlinks by their path in the image. Parent
/// directories are added (mode 0755, root) when not given; entries are owned by root unless
/// [`Layer::owner`] says otherwise. Host files are read when the image is first written;
/// clones of a layer share its compressed blob, so images that differ only in their config
/// compress it once.
#[derive(Debug, Clone, Default)]
pub struct Layer {
    entries: BTreeMap<String, Entry>,
    invalid: Vec<(String, &'static str)>,
    uid: u64,
    gid: u64,
    blob: Arc<Mutex<Option<Arc<LayerBlob>>>>,
}

impl Layer {
    /// An empty layer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Entries added after this call are owned by `uid:gid`.
    pub fn owner(mut self, uid: u64, gid: u64) -> Self {
        self.uid = uid;
        self.gid = gid;
        self
    }

    /// The host file `host` (symlinks followed) at `image_path` with permission `mode`.
    pub fn file(self, image_path: &str, host: impl Into<PathBuf>, mode: u32) -> Self {
        self.add(image_path, Node::File(Content::Host(host.into())), mode)
    }

    /// A file holding `contents` at `image_path` with permission `mode`.
    pub fn bytes(self, image_path: &str, contents: impl Into<Vec<u8>>, mode: u32) -> Self {
        self.add(
            image_path,
            Node::File(Content::Bytes(contents.into())),
            mode,
        )
    }

    /// A directory at `image_path` with permission `mode` (e.g. `0o1777` for `/tmp`).
    pub fn dir(self, image_path: &str, mode: u32) -> Self {
        self.add(image_path, Node::Dir, mode)
    }

    /// A symlink at `image_path` pointing at `target`.
    pub fn symlink(self, image_path: &str, target: &str) -> Self {
        self.add(image_path, Node::Symlink(target.to_string()), 0o777)
    }

    /// A hard link at `image_path` to the file at `target` (an image path, in this layer or
    /// a lower one). Hard links are written after every other entry of the layer.
    pub fn hard_link(self, image_path: &str, target: &str) -> Self {
        match normalize(target) {
            Ok(target) => self.add(image_path, Node::HardLink(target), 0o644),
            Err(reason) => {
                let mut layer = self;
                layer.invalid.push((target.to_string(), reason));
                layer
            }
        }
    }

    /// Every file, directory and symlink under the host directory `host` at `image_dir`:
    /// directories 0755, files 0755 when executable on the host and 0644 otherwise.
    pub fn tree(mut self, image_dir: &str, host: &Path) -> Result<Self, BuildError> {
        let read_err = |path: &Path, source| BuildError::ReadHost {
            path: path.to_path_buf(),
            image_path: image_dir.trim_start_matches('/').to_string(),
            source,
        };
        self = self.dir(image_dir, 0o755);
        let mut children: Vec<_> = std::fs::read_dir(host)
            .map_err(|e| read_err(host, e))?
            .map(|e| e.map(|e| e.path()))
            .collect::<Result<_, _>>()
            .map_err(|e| read_err(host, e))?;
        children.sort();
        for child in children {
            let Some(name) = child.file_name().map(|n| n.to_string_lossy().into_owned()) else {
                continue;
            };
            let image_path = format!("{}/{name}", image_dir.trim_end_matches('/'));
            let meta = std::fs::symlink_metadata(&child).map_err(|e| read_err(&child, e))?;
            if meta.is_dir() {
                self = self.tree(&image_path, &child)?;
            } else if meta.file_type().is_symlink() {
                let target = std::fs::read_link(&child).map_err(|e| read_err(&child, e))?;
                self = self.symlink(&image_path, &target.to_string_lossy());
            } else {
                use std::os::unix::fs::PermissionsExt as _;
                let mode = if meta.permissions().mode() & 0o111 != 0 {
                    0o755
                } else {
                    0o644
                };
                self = self.file(&image_path, child, mode);
            }
        }
        Ok(self)
    }

    fn add(mut self, image_path: &str, node: Node, mode: u32) -> Self {
        self.blob = Arc::default();
        match normalize(image_path) {
            Ok(path) => {
                let entry = Entry {
                    node,
                    mode,
                    uid: self.uid,
                    gid: self.gid,
                };
                self.entries.insert(path, entry);
            }
            Err(reason) => self.invalid.push((image_path.to_string(), reason)),
        }
        self
    }

    /// The layer's gzip blob, compressed on first use.
    fn compressed(&self, archive: &Path) -> Result<Arc<LayerBlob>, BuildError> {
        let mut blob = self.blob.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(b) = blob.as_ref() {
            return Ok(b.clone());
        }
        let b = Arc::new(layer_blob(self, archive)?);
        *blob = Some(b.clone());
        Ok(b)
    }

    /// Every entry with its missing parent directories, sorted by path.
    fn complete(&self) -> Result<BTreeMap<String, Entry>, BuildError> {
        if let Some((path, reason)) = self.invalid.first() {
            return Err(BuildError::InvalidPath {
                path: path.clone(),
                reason,
            });
        }
        let mut all = self.entries.clone();
        for path in self.entries.keys() {
            let mut parent = Path::new(path).parent();
            while let Some(p) = parent.filter(|p| !p.as_os_str().is_empty()) {
                let key = p.to_string_lossy().into_owned();
                match all.get(&key) {
                    Some(Entry {
                        node: Node::Dir, ..
                    }) => {}
                    Some(_) => {
                        return Err(BuildError::InvalidPath {
                            path: format!("/{path}"),
                            reason: "a parent is a file or symlink in the same layer",
                        });
                    }
                    None => {
                        all.insert(
                            key,
                            Entry {
                                node: Node::Dir,
                                mode: 0o755,
                                uid: 0,
                                gid: 0,
                            },
                        );
                    }
                }
                parent = p.parent();
            }
        }
        Ok(all)
    }
}

/// An image path as stored in a layer: relative, no `.` or `..`, not the root itself.
fn normalize(image_path: &str) -> Result<String, &'static str> {
    let mut parts = Vec::new();
    for c in Path::new(image_path).components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(n) => parts.push(n.to_str().ok_or("the path is not UTF-8")?),
            Component::ParentDir | Component::Prefix(_) => {
                return Err("the path must not contain `..`");
            }
        }
    }
    if parts.is_empty() {
        return Err("the path names the root directory");
    }
    Ok(parts.join("/"))
}

/// Sizes and digest of a written archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    /// The manifest digest (`sha256:…`).
    pub digest: String,
    /// Size of the archive file, in bytes.
    pub archive_bytes: u64,
    /// Total size of the regular files in the layers, in bytes.
    pub unpacked_bytes: u64,
}

/// Builds one image from layers and a config and writes it as an `oci-archive`.
#[derive(Debug, Clone)]
pub struct ImageBuilder {
    reference: String,
    config: ImageConfig,
    layers: Vec<Layer>,
}

/// A blob ready to be written into the archive.
struct Blob {
    descriptor: Descriptor,
    bytes: Vec<u8>,
}

impl Blob {
    fn new(media_type: &str, bytes: Vec<u8>) -> Self {
        Self {
            descriptor: Descriptor {
                media_type: media_type.to_string(),
                digest: layout::sha256_digest(&bytes),
                size: bytes.len() as u64,
                annotations: BTreeMap::new(),
            },
            bytes,
        }
    }
}

impl ImageBuilder {
    /// An image named `reference` (written as the `org.opencontainers.image.ref.name`
    /// annotation of `index.json`), with an empty config and no layers.
    pub fn new(reference: impl Into<String>) -> Self {
        Self {
            reference: reference.into(),
            config: ImageConfig::default(),
            layers: Vec::new(),
        }
    }

    /// Sets the image config.
    pub fn config(mut self, config: ImageConfig) -> Self {
        self.config = config;
        self
    }

    /// Adds a layer on top of the previous ones.
    pub fn layer(mut self, layer: Layer) -> Self {
        self.layers.push(layer);
        self
    }

    /// Writes the `oci-archive` to `archive` (replaced atomically; its directory is created).
    pub fn write(&self, archive: &Path) -> Result<Written, BuildError> {
        let write_err = |source| BuildError::WriteArchive {
            path: archive.to_path_buf(),
            source,
        };
        let mut blobs = Vec::new();
        let mut diff_ids = Vec::new();
        let mut unpacked_bytes = 0;
        for layer in &self.layers {
            let built = layer.compressed(archive)?;
            blobs.push(Blob::new(MEDIA_LAYER_GZIP, built.gzip.clone()));
            diff_ids.push(built.diff_id.clone());
            unpacked_bytes += built.file_bytes;
        }
        let config = ConfigBlob {
            created: Some(CREATED.to_string()),
            architecture: config::host_architecture().to_string(),
            os: "linux".to_string(),
            config: self.config.clone(),
            rootfs: RootFs {
                kind: "layers".to_string(),
                diff_ids,
            },
        };
        let config = Blob::new(MEDIA_CONFIG, json(&config).map_err(write_err)?);
        let manifest = Manifest {
            schema_version: 2,
            media_type: Some(MEDIA_MANIFEST.to_string()),
            config: config.descriptor.clone(),
            layers: blobs.iter().map(|b| b.descriptor.clone()).collect(),
        };
        let manifest = Blob::new(MEDIA_MANIFEST, json(&manifest).map_err(write_err)?);
        let digest = manifest.descriptor.digest.clone();
        let mut manifest_desc = manifest.descriptor.clone();
        manifest_desc
            .annotations
            .insert(REF_NAME_ANNOTATION.to_string(), self.reference.clone());
        let index = Index {
            schema_version: 2,
            media_type: Some(MEDIA_INDEX.to_string()),
            manifests: vec![manifest_desc],
        };
        let index = json(&index).map_err(write_err)?;
        blobs.push(config);
        blobs.push(manifest);

        if let Some(dir) = archive.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(write_err)?;
        }
        let mut tmp = archive.as_os_str().to_os_string();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let written =
            write_outer(&tmp, blobs, &index).and_then(|()| std::fs::rename(&tmp, archive));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(write_err(e));
        }
        let archive_bytes = std::fs::metadata(archive).map_err(write_err)?.len();
        Ok(Written {
            digest,
            archive_bytes,
            unpacked_bytes,
        })
    }
}

fn json<T: serde::Serialize>(value: &T) -> io::Result<Vec<u8>> {
    serde_json::to_vec(value).map_err(io::Error::other)
}

/// A layer as a gzip blob.
#[derive(Debug)]
struct LayerBlob {
    gzip: Vec<u8>,
    diff_id: String,
    file_bytes: u64,
}

/// The tar of `layer`, gzipped in memory (layers here are tens of MiB at most).
fn layer_blob(layer: &Layer, archive: &Path) -> Result<LayerBlob, BuildError> {
    let write_err = |source| BuildError::WriteArchive {
        path: archive.to_path_buf(),
        source,
    };
    // No file name and mtime 0 in the gzip header: the same tar gives the same blob.
    let gz = GzBuilder::new()
        .mtime(0)
        .write(Vec::new(), flate2::Compression::default());
    let mut tar = tar::Builder::new(HashingWriter::new(gz));
    tar.mode(tar::HeaderMode::Deterministic);
    let mut file_bytes = 0;
    // Sorted by path, hard links last so that their targets precede them.
    let mut entries: Vec<_> = layer.complete()?.into_iter().collect();
    entries.sort_by_key(|(_, e)| matches!(e.node, Node::HardLink(_)));
    for (path, entry) in entries {
        let mut header = tar::Header::new_gnu();
        header.set_mtime(MTIME);
        header.set_uid(entry.uid);
        header.set_gid(entry.gid);
        header.set_mode(entry.mode);
        match &entry.node {
            Node::Dir => {
                header.set_entry_type(tar::EntryType::Directory);
                header.set_size(0);
                tar.append_data(&mut header, format!("{path}/"), io::empty())
                    .map_err(write_err)?;
            }
            Node::Symlink(target) => {
                header.set_entry_type(tar::EntryType::Symlink);
                header.set_size(0);
                tar.append_link(&mut header, &path, target)
                    .map_err(write_err)?;
            }
            Node::HardLink(target) => {
                header.set_entry_type(tar::EntryType::Link);
                header.set_size(0);
                tar.append_link(&mut header, &path, target)
                    .map_err(write_err)?;
            }
            Node::File(Content::Bytes(bytes)) => {
                header.set_entry_type(tar::EntryType::Regular);
                header.set_size(bytes.len() as u64);
                tar.append_data(&mut header, &path, bytes.as_slice())
                    .map_err(write_err)?;
                file_bytes += bytes.len() as u64;
            }
            Node::File(Content::Host(host)) => {
                let read_err = |source| BuildError::ReadHost {
                    path: host.clone(),
                    image_path: path.clone(),
                    source,
                };
                let file = File::open(host).map_err(read_err)?;
                let len = file.metadata().map_err(read_err)?.len();
                header.set_entry_type(tar::EntryType::Regular);
                header.set_size(len);
                // A file that changes while it is read would make a broken entry: tar
                // fails when fewer bytes than announced arrive; more are never read.
                tar.append_data(&mut header, &path, io::Read::take(file, len))
                    .map_err(write_err)?;
                file_bytes += len;
            }
        }
    }
    let hashing = tar.into_inner().map_err(write_err)?;
    let (gz, diff_id, _) = hashing.finish();
    let gzip = gz.finish().map_err(write_err)?;
    Ok(LayerBlob {
        gzip,
        diff_id,
        file_bytes,
    })
}

/// Writes the outer tar: `blobs/`, `blobs/sha256/`, the blobs by digest, `index.json`,
/// `oci-layout`, in that (sorted) order.
fn write_outer(tmp: &Path, mut blobs: Vec<Blob>, index: &[u8]) -> io::Result<()> {
    blobs.sort_by(|a, b| a.descriptor.digest.cmp(&b.descriptor.digest));
    blobs.dedup_by(|a, b| a.descriptor.digest == b.descriptor.digest);
    let mut tar = tar::Builder::new(BufWriter::new(File::create(tmp)?));
    tar.mode(tar::HeaderMode::Deterministic);
    for dir in ["blobs/", "blobs/sha256/"] {
        let mut header = header(tar::EntryType::Directory, 0o755, 0);
        tar.append_data(&mut header, dir, io::empty())?;
    }
    for blob in &blobs {
        let name = layout::blob_path(&blob.descriptor.digest)
            .ok_or_else(|| io::Error::other("a blob digest is not sha256"))?;
        let mut header = header(tar::EntryType::Regular, 0o644, blob.bytes.len() as u64);
        tar.append_data(&mut header, name, blob.bytes.as_slice())?;
    }
    for (name, bytes) in [("index.json", index), ("oci-layout", OCI_LAYOUT.as_bytes())] {
        let mut header = header(tar::EntryType::Regular, 0o644, bytes.len() as u64);
        tar.append_data(&mut header, name, bytes)?;
    }
    let mut out = tar.into_inner()?;
    out.flush()?;
    out.into_inner()
        .map_err(io::IntoInnerError::into_error)?
        .sync_all()
}

fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(kind);
    header.set_mode(mode);
    header.set_size(size);
    header.set_mtime(MTIME);
    header.set_uid(0);
    header.set_gid(0);
    header
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_paths_are_relative_and_never_climb() {
        assert_eq!(normalize("/usr/bin/x").as_deref(), Ok("usr/bin/x"));
        assert_eq!(normalize("./etc//passwd").as_deref(), Ok("etc/passwd"));
        assert!(normalize("/a/../b").is_err());
        assert!(normalize("/").is_err());
    }

    #[test]
    fn a_file_under_a_file_of_the_same_layer_is_refused() {
        let layer = Layer::new()
            .bytes("/a", "x", 0o644)
            .bytes("/a/b", "y", 0o644);
        assert!(matches!(
            layer.complete(),
            Err(BuildError::InvalidPath { .. })
        ));
    }
}
