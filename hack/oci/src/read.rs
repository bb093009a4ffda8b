//! Reading an `oci-archive`: [`Image::open`] indexes the archive's files, follows
//! `index.json` → manifest → config (each blob's digest and size checked) and keeps where each
//! layer blob lies, so [`Image::unpack`] streams the layers straight from the archive.
//!
//! ```text
//!  archive.tar ─► tar index { name → (offset, size) }
//!                   index.json ─► the one manifest (ref.name annotation = reference)
//!                   manifest   ─► config blob ─► ImageConfig, diff_ids
//!                              └► layers [(digest, media type, offset, size)]
//!  unpack ─► for each layer: seek ─► sha256 ─► gunzip ─► sha256 ─► unpack::apply_layer
//! ```

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use flate2::read::MultiGzDecoder;

use crate::config::{ConfigBlob, ImageConfig};
use crate::layout::{
    self, Compression, Descriptor, HashingReader, Index, MEDIA_CONFIG, MEDIA_DOCKER_CONFIG,
    MEDIA_DOCKER_MANIFEST, MEDIA_MANIFEST, Manifest,
};
use crate::{REF_NAME_ANNOTATION, unpack};

/// The largest JSON document (index, manifest, config) read into memory.
const MAX_JSON_BYTES: u64 = 16 << 20;

/// Failures to read or unpack an image archive.
#[derive(Debug, thiserror::Error)]
pub enum OciError {
    /// The archive file cannot be opened or read.
    #[error("failed to read image archive {path}: {source}")]
    ReadArchive {
        /// The archive.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
    /// A file every OCI image layout has is missing.
    #[error(
        "failed to find {name} in image archive {path}: not an oci-archive (a tar of an OCI image layout)"
    )]
    MissingFile {
        /// The archive.
        path: PathBuf,
        /// File inside the layout.
        name: String,
    },
    /// A JSON document of the layout does not parse.
    #[error("failed to parse {name} in image archive {path}: {source}")]
    ParseJson {
        /// The archive.
        path: PathBuf,
        /// File inside the layout.
        name: String,
        /// Underlying error.
        #[source]
        source: serde_json::Error,
    },
    /// `index.json` does not hold exactly one image.
    #[error(
        "failed to choose the image of archive {path}: index.json lists {count} manifests, an oci-archive here holds exactly one"
    )]
    ImageCount {
        /// The archive.
        path: PathBuf,
        /// Number of manifests listed.
        count: usize,
    },
    /// `index.json` names no reference.
    #[error(
        "failed to find the reference of image archive {path}: index.json has no {REF_NAME_ANNOTATION} annotation (copy it with `skopeo copy … oci-archive:FILE:REFERENCE`)"
    )]
    NoReference {
        /// The archive.
        path: PathBuf,
    },
    /// A descriptor has a media type this reader does not handle.
    #[error(
        "failed to read {what} of image archive {path}: media type {media_type:?} is not supported (gzip or plain tar layers of single-platform OCI or Docker v2 images are)"
    )]
    UnsupportedMediaType {
        /// The archive.
        path: PathBuf,
        /// What the descriptor points at.
        what: &'static str,
        /// Its media type.
        media_type: String,
    },
    /// A blob's content differs from its descriptor.
    #[error(
        "failed to verify blob {digest} of image archive {path}: {actual} ({size} bytes) does not match the descriptor"
    )]
    BlobMismatch {
        /// The archive.
        path: PathBuf,
        /// Digest the descriptor names.
        digest: String,
        /// Digest (or problem) of what the archive holds.
        actual: String,
        /// Size the archive holds.
        size: u64,
    },
    /// The config's diff ids do not describe the manifest's layers.
    #[error(
        "failed to match layers of image archive {path}: the config lists {diff_ids} diff_ids for {layers} layers"
    )]
    DiffIds {
        /// The archive.
        path: PathBuf,
        /// Number of diff ids.
        diff_ids: usize,
        /// Number of layers.
        layers: usize,
    },
    /// The root filesystem directory cannot be created.
    #[error("failed to create root filesystem {path}: {source}")]
    CreateRootfs {
        /// The directory.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
    /// A layer cannot be read (decompression or tar stream).
    #[error("failed to read layer {layer}: {source}")]
    ReadLayer {
        /// Layer digest.
        layer: String,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
    /// An entry of a layer cannot be written into the root filesystem.
    #[error("failed to unpack {entry} of layer {layer}: {source}")]
    UnpackEntry {
        /// Layer digest.
        layer: String,
        /// Path of the entry inside the image.
        entry: PathBuf,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
    /// An entry's path or hard-link target would leave the root filesystem.
    #[error("failed to unpack {entry} of layer {layer}: the path escapes the root filesystem")]
    EscapingPath {
        /// Layer digest.
        layer: String,
        /// Path of the entry.
        entry: PathBuf,
    },
    /// An entry kind that an image root filesystem must not hold here.
    #[error(
        "failed to unpack {entry} of layer {layer}: {kind} entries are not supported (the runtime creates /dev)"
    )]
    UnsupportedEntry {
        /// Layer digest.
        layer: String,
        /// Path of the entry.
        entry: PathBuf,
        /// What it is.
        kind: &'static str,
    },
}

/// One layer of an [`Image`]: a blob inside the archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerInfo {
    /// Digest of the (compressed) blob.
    pub digest: String,
    /// Media type of the blob.
    pub media_type: String,
    /// Size of the blob in the archive, in bytes.
    pub size: u64,
    /// Digest of the uncompressed tar (`rootfs.diff_ids` of the config).
    pub diff_id: String,
    compression: Compression,
    offset: u64,
}

/// One image, parsed from an `oci-archive`.
#[derive(Debug, Clone)]
pub struct Image {
    archive: PathBuf,
    reference: String,
    digest: String,
    config: ImageConfig,
    layers: Vec<LayerInfo>,
}

/// Where a file's data lies in the archive.
#[derive(Debug, Clone, Copy)]
struct Span {
    offset: u64,
    size: u64,
}

impl Image {
    /// Reads an `oci-archive` (a tar of an OCI image layout holding one image).
    pub fn open(archive: &Path) -> Result<Image, OciError> {
        let read_err = |source| OciError::ReadArchive {
            path: archive.to_path_buf(),
            source,
        };
        let mut file = File::open(archive).map_err(read_err)?;
        let files = index_tar(&mut file).map_err(read_err)?;
        let mut reader = ArchiveReader {
            path: archive,
            file,
            files,
        };

        let index: Index = reader.json("index.json", reader.file_span("index.json")?)?;
        let [manifest_desc] = index.manifests.as_slice() else {
            return Err(OciError::ImageCount {
                path: archive.to_path_buf(),
                count: index.manifests.len(),
            });
        };
        reader.expect_media_type(
            "the manifest",
            manifest_desc,
            &[MEDIA_MANIFEST, MEDIA_DOCKER_MANIFEST],
        )?;
        let reference = manifest_desc
            .annotations
            .get(REF_NAME_ANNOTATION)
            .cloned()
            .ok_or_else(|| OciError::NoReference {
                path: archive.to_path_buf(),
            })?;
        let manifest: Manifest = reader.blob_json(manifest_desc)?;
        reader.expect_media_type(
            "the config",
            &manifest.config,
            &[MEDIA_CONFIG, MEDIA_DOCKER_CONFIG],
        )?;
        let config: ConfigBlob = reader.blob_json(&manifest.config)?;
        if config.rootfs.diff_ids.len() != manifest.layers.len() {
            return Err(OciError::DiffIds {
                path: archive.to_path_buf(),
                diff_ids: config.rootfs.diff_ids.len(),
                layers: manifest.layers.len(),
            });
        }
        let layers = manifest
            .layers
            .iter()
            .zip(&config.rootfs.diff_ids)
            .map(|(desc, diff_id)| {
                let compression = layout::layer_compression(&desc.media_type).ok_or_else(|| {
                    OciError::UnsupportedMediaType {
                        path: archive.to_path_buf(),
                        what: "a layer",
                        media_type: desc.media_type.clone(),
                    }
                })?;
                let span = reader.blob_span(desc)?;
                Ok(LayerInfo {
                    digest: desc.digest.clone(),
                    media_type: desc.media_type.clone(),
                    size: desc.size,
                    diff_id: diff_id.clone(),
                    compression,
                    offset: span.offset,
                })
            })
            .collect::<Result<Vec<_>, OciError>>()?;
        Ok(Image {
            archive: archive.to_path_buf(),
            reference,
            digest: manifest_desc.digest.clone(),
            config: config.config,
            layers,
        })
    }

    /// The image's reference: the `org.opencontainers.image.ref.name` annotation of
    /// `index.json`.
    pub fn reference(&self) -> &str {
        &self.reference
    }

    /// The image config's `config` object.
    pub fn config(&self) -> &ImageConfig {
        &self.config
    }

    /// The manifest digest, `sha256:…` (a pod status's `imageID`).
    pub fn digest(&self) -> &str {
        &self.digest
    }

    /// The layers, bottom first.
    pub fn layers(&self) -> &[LayerInfo] {
        &self.layers
    }

    /// The archive this image was read from.
    pub fn archive(&self) -> &Path {
        &self.archive
    }

    /// Extracts every layer in order into `rootfs` (created if missing), honouring OCI
    /// whiteouts (`.wh.NAME` and `.wh..wh..opq`), file modes, uid/gid, symlinks and hard
    /// links; refuses paths escaping `rootfs`. Each layer's digest and diff id are checked
    /// as it streams; keeping ownership needs root.
    pub fn unpack(&self, rootfs: &Path) -> Result<(), OciError> {
        std::fs::create_dir_all(rootfs).map_err(|source| OciError::CreateRootfs {
            path: rootfs.to_path_buf(),
            source,
        })?;
        let mut file = File::open(&self.archive).map_err(|source| OciError::ReadArchive {
            path: self.archive.clone(),
            source,
        })?;
        for layer in &self.layers {
            self.unpack_layer(&mut file, layer, rootfs)?;
        }
        Ok(())
    }

    fn unpack_layer(
        &self,
        file: &mut File,
        layer: &LayerInfo,
        rootfs: &Path,
    ) -> Result<(), OciError> {
        let read_err = |source| OciError::ReadLayer {
            layer: layer.digest.clone(),
            source,
        };
        file.seek(SeekFrom::Start(layer.offset)).map_err(read_err)?;
        let blob = HashingReader::new(BufReader::new(Read::by_ref(file).take(layer.size)));
        let (digest, size, diff_id) = match layer.compression {
            Compression::Gzip => {
                let mut tar = HashingReader::new(MultiGzDecoder::new(blob));
                unpack::apply_layer(rootfs, &mut tar, &layer.digest)?;
                let (diff_id, _, gz) = tar.finish().map_err(read_err)?;
                let (digest, size, _) = gz.into_inner().finish().map_err(read_err)?;
                (digest, size, diff_id)
            }
            Compression::None => {
                let mut tar = blob;
                unpack::apply_layer(rootfs, &mut tar, &layer.digest)?;
                let (digest, size, _) = tar.finish().map_err(read_err)?;
                (digest.clone(), size, digest)
            }
        };
        if digest != layer.digest || size != layer.size {
            return Err(OciError::BlobMismatch {
                path: self.archive.clone(),
                digest: layer.digest.clone(),
                actual: digest,
                size,
            });
        }
        if diff_id != layer.diff_id {
            return Err(OciError::BlobMismatch {
                path: self.archive.clone(),
                digest: layer.diff_id.clone(),
                actual: format!("the uncompressed layer {diff_id}"),
                size,
            });
        }
        Ok(())
    }
}

/// Every regular file of the outer tar, by its name without a leading `./`.
fn index_tar(file: &mut File) -> io::Result<HashMap<String, Span>> {
    let mut files = HashMap::new();
    let mut archive = tar::Archive::new(BufReader::new(file));
    for entry in archive.entries_with_seek()? {
        let entry = entry?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let path = entry.path()?;
        let name = path.to_string_lossy();
        let name = name
            .trim_start_matches("./")
            .trim_start_matches('/')
            .to_string();
        files.insert(
            name,
            Span {
                offset: entry.raw_file_position(),
                size: entry.size(),
            },
        );
    }
    Ok(files)
}

/// Reads files and blobs of one archive, checking them against their descriptors.
struct ArchiveReader<'a> {
    path: &'a Path,
    file: File,
    files: HashMap<String, Span>,
}

impl ArchiveReader<'_> {
    fn file_span(&self, name: &str) -> Result<Span, OciError> {
        self.files
            .get(name)
            .copied()
            .ok_or_else(|| OciError::MissingFile {
                path: self.path.to_path_buf(),
                name: name.to_string(),
            })
    }

    /// Where the blob of `desc` lies; its size must match.
    fn blob_span(&self, desc: &Descriptor) -> Result<Span, OciError> {
        let name = layout::blob_path(&desc.digest).ok_or_else(|| OciError::BlobMismatch {
            path: self.path.to_path_buf(),
            digest: desc.digest.clone(),
            actual: "a digest that is not sha256:<64 hex digits>".into(),
            size: 0,
        })?;
        let span = self.file_span(&name)?;
        if span.size != desc.size {
            return Err(OciError::BlobMismatch {
                path: self.path.to_path_buf(),
                digest: desc.digest.clone(),
                actual: "a blob of another size".into(),
                size: span.size,
            });
        }
        Ok(span)
    }

    fn read(&mut self, name: &str, span: Span) -> Result<Vec<u8>, OciError> {
        let read_err = |source| OciError::ReadArchive {
            path: self.path.to_path_buf(),
            source,
        };
        if span.size > MAX_JSON_BYTES {
            return Err(read_err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{name} is {} bytes, more than a JSON document may be",
                    span.size
                ),
            )));
        }
        self.file
            .seek(SeekFrom::Start(span.offset))
            .map_err(read_err)?;
        let mut buf = Vec::with_capacity(usize::try_from(span.size).unwrap_or(0));
        Read::by_ref(&mut self.file)
            .take(span.size)
            .read_to_end(&mut buf)
            .map_err(read_err)?;
        Ok(buf)
    }

    fn json<T: serde::de::DeserializeOwned>(
        &mut self,
        name: &str,
        span: Span,
    ) -> Result<T, OciError> {
        let bytes = self.read(name, span)?;
        serde_json::from_slice(&bytes).map_err(|source| OciError::ParseJson {
            path: self.path.to_path_buf(),
            name: name.to_string(),
            source,
        })
    }

    /// The JSON blob of `desc`, its digest checked.
    fn blob_json<T: serde::de::DeserializeOwned>(
        &mut self,
        desc: &Descriptor,
    ) -> Result<T, OciError> {
        let span = self.blob_span(desc)?;
        let name = format!("blob {}", desc.digest);
        let bytes = self.read(&name, span)?;
        let actual = layout::sha256_digest(&bytes);
        if actual != desc.digest {
            return Err(OciError::BlobMismatch {
                path: self.path.to_path_buf(),
                digest: desc.digest.clone(),
                actual,
                size: span.size,
            });
        }
        serde_json::from_slice(&bytes).map_err(|source| OciError::ParseJson {
            path: self.path.to_path_buf(),
            name,
            source,
        })
    }

    fn expect_media_type(
        &self,
        what: &'static str,
        desc: &Descriptor,
        allowed: &[&str],
    ) -> Result<(), OciError> {
        if allowed.contains(&desc.media_type.as_str()) {
            Ok(())
        } else {
            Err(OciError::UnsupportedMediaType {
                path: self.path.to_path_buf(),
                what,
                media_type: desc.media_type.clone(),
            })
        }
    }
}
