//! Applying one layer (an uncompressed tar stream) onto a root filesystem directory, with the
//! OCI layer semantics: later layers replace earlier files, `.wh.NAME` deletes `NAME`,
//! `.wh..wh..opq` empties a directory of what lower layers put there.
//!
//! ```text
//!  tar entry ─► clean path (no `..`, no absolute) ─► resolve parent inside rootfs
//!     │            (symlinks followed as if rootfs were `/`, never out of it)
//!     ├─ .wh..wh..opq ─► remove the directory's children not written by this layer
//!     ├─ .wh.NAME     ─► remove NAME
//!     ├─ hard link    ─► link to the target, resolved the same way
//!     └─ dir, file, symlink ─► replace what is there; mode, uid/gid and mtime from the header
//! ```

use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::io::{self, Read};
use std::path::{Component, Path, PathBuf};

use tar::EntryType;

use crate::OciError;

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE_WHITEOUT: &str = ".wh..wh..opq";
/// As Linux's own limit on symlinks followed while resolving one path.
const MAX_SYMLINKS: usize = 40;

/// Applies the layer tar read from `reader` onto `root`; `layer` names it in errors.
pub(crate) fn apply_layer<R: Read>(root: &Path, reader: R, layer: &str) -> Result<(), OciError> {
    let read_err = |source| OciError::ReadLayer {
        layer: layer.to_string(),
        source,
    };
    let mut archive = tar::Archive::new(reader);
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(true);
    archive.set_preserve_mtime(true);
    archive.set_overwrite(true);
    archive.set_unpack_xattrs(false);
    // Paths this layer wrote, so an opaque whiteout only hides what lower layers put there.
    let mut written: HashSet<PathBuf> = HashSet::new();
    for entry in archive.entries().map_err(read_err)? {
        let mut entry = entry.map_err(read_err)?;
        let raw = entry.path().map_err(read_err)?.into_owned();
        let escaping = || OciError::EscapingPath {
            layer: layer.to_string(),
            entry: raw.clone(),
        };
        let unpack_err = |source| OciError::UnpackEntry {
            layer: layer.to_string(),
            entry: raw.clone(),
            source,
        };
        let Some(rel) = clean(&raw) else {
            return Err(escaping());
        };
        let (Some(name), parent) = (rel.file_name(), rel.parent().unwrap_or(Path::new(""))) else {
            // The root directory itself: its metadata is the runtime's business.
            continue;
        };
        let kind = entry.header().entry_type();
        if matches!(kind, EntryType::XGlobalHeader) {
            continue;
        }
        let dir = resolve(root, parent).map_err(unpack_err)?;
        let name_str = name.to_string_lossy();

        if name_str == OPAQUE_WHITEOUT {
            empty_dir(&dir, &written).map_err(unpack_err)?;
            continue;
        }
        if let Some(hidden) = name_str.strip_prefix(WHITEOUT_PREFIX) {
            let hidden = dir.join(hidden);
            remove_any(&hidden).map_err(unpack_err)?;
            continue;
        }

        std::fs::create_dir_all(&dir).map_err(unpack_err)?;
        let dst = dir.join(name);
        match kind {
            EntryType::Directory => {
                if std::fs::symlink_metadata(&dst).is_ok_and(|m| !m.is_dir()) {
                    remove_any(&dst).map_err(unpack_err)?;
                }
                entry.unpack(&dst).map_err(unpack_err)?;
            }
            EntryType::Regular | EntryType::Continuous | EntryType::Symlink => {
                remove_any(&dst).map_err(unpack_err)?;
                entry.unpack(&dst).map_err(unpack_err)?;
            }
            EntryType::Link => {
                let target = entry
                    .link_name()
                    .map_err(read_err)?
                    .map(|t| t.into_owned())
                    .unwrap_or_default();
                let target = clean(&target)
                    .filter(|t| t.file_name().is_some())
                    .ok_or_else(escaping)?;
                let src = resolve(root, target.parent().unwrap_or(Path::new("")))
                    .map_err(unpack_err)?
                    .join(target.file_name().unwrap_or(OsStr::new("")));
                remove_any(&dst).map_err(unpack_err)?;
                std::fs::hard_link(&src, &dst).map_err(unpack_err)?;
            }
            other => {
                let kind = match other {
                    EntryType::Char => "character device",
                    EntryType::Block => "block device",
                    EntryType::Fifo => "fifo",
                    _ => "unknown",
                };
                return Err(OciError::UnsupportedEntry {
                    layer: layer.to_string(),
                    entry: raw.clone(),
                    kind,
                });
            }
        }
        written.insert(dst);
    }
    Ok(())
}

/// `path` relative, without `.` components; `None` when it climbs out with `..` or has a
/// Windows prefix. An empty result is the root itself.
fn clean(path: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(n) => out.push(n),
            Component::ParentDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

/// `rel` (clean) inside `root`, following the symlinks met on the way as if `root` were `/`:
/// absolute targets restart at `root` and `..` stops at `root`. The result is `root` joined
/// with components that are not symlinks (or do not exist yet).
fn resolve(root: &Path, rel: &Path) -> io::Result<PathBuf> {
    let mut pending: Vec<OsString> = rel
        .components()
        .rev()
        .map(|c| c.as_os_str().to_os_string())
        .collect();
    let mut done: Vec<OsString> = Vec::new();
    let mut followed = 0;
    while let Some(part) = pending.pop() {
        if part == "." || part.is_empty() {
            continue;
        }
        if part == ".." {
            done.pop();
            continue;
        }
        let here: PathBuf = root.join(done.iter().collect::<PathBuf>()).join(&part);
        match std::fs::symlink_metadata(&here) {
            Ok(m) if m.file_type().is_symlink() => {
                followed += 1;
                if followed > MAX_SYMLINKS {
                    return Err(io::Error::other(format!(
                        "too many levels of symbolic links at {}",
                        here.display()
                    )));
                }
                let target = std::fs::read_link(&here)?;
                if target.is_absolute() {
                    done.clear();
                }
                for c in target.components().rev() {
                    match c {
                        Component::RootDir | Component::Prefix(_) => {}
                        other => pending.push(other.as_os_str().to_os_string()),
                    }
                }
            }
            Ok(_) => done.push(part),
            Err(e) if e.kind() == io::ErrorKind::NotFound => done.push(part),
            Err(e) => return Err(e),
        }
    }
    Ok(root.join(done.iter().collect::<PathBuf>()))
}

/// Removes whatever is at `path` (a directory with its content); nothing there is fine.
fn remove_any(path: &Path) -> io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Removes the children of `dir` that this layer did not write; no directory is fine.
fn empty_dir(dir: &Path, written: &HashSet<PathBuf>) -> io::Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
            ) =>
        {
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    for entry in entries {
        let path = entry?.path();
        if !written.contains(&path) {
            remove_any(&path)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt as _;

    use super::*;

    #[test]
    fn clean_refuses_parent_components_and_drops_the_root() {
        assert_eq!(
            clean(Path::new("./usr/bin/x")),
            Some(PathBuf::from("usr/bin/x"))
        );
        assert_eq!(
            clean(Path::new("/etc/passwd")),
            Some(PathBuf::from("etc/passwd"))
        );
        assert_eq!(clean(Path::new("a/../../b")), None);
        assert_eq!(clean(Path::new("./")), Some(PathBuf::new()));
    }

    #[test]
    fn resolve_keeps_absolute_and_climbing_symlinks_inside_the_root() {
        let root = tempfile::tempdir().expect("tempdir");
        let r = root.path();
        std::fs::create_dir_all(r.join("usr/lib")).expect("mkdir");
        std::os::unix::fs::symlink("usr/lib", r.join("lib")).expect("symlink");
        std::os::unix::fs::symlink("/etc", r.join("abs")).expect("symlink");
        std::os::unix::fs::symlink("../../../../..", r.join("usr/up")).expect("symlink");
        assert_eq!(
            resolve(r, Path::new("lib/x")).expect("resolve"),
            r.join("usr/lib/x")
        );
        assert_eq!(
            resolve(r, Path::new("abs/passwd")).expect("resolve"),
            r.join("etc/passwd")
        );
        assert_eq!(
            resolve(r, Path::new("usr/up/etc")).expect("resolve"),
            r.join("etc")
        );
    }

    /// A tar stream with raw names, as a hostile layer would hold (tar's builder refuses `..`).
    fn raw_tar(entries: &[(&str, EntryType, &str, &[u8])]) -> Vec<u8> {
        let mut tar = tar::Builder::new(Vec::new());
        for (name, kind, link, data) in entries {
            let mut header = tar::Header::new_old();
            header.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
            header.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
            header.set_entry_type(*kind);
            header.set_mode(0o644);
            header.set_uid(0);
            header.set_gid(0);
            header.set_mtime(0);
            header.set_size(data.len() as u64);
            header.set_cksum();
            tar.append(&header, *data).expect("append");
        }
        tar.into_inner().expect("finish")
    }

    fn apply(root: &Path, entries: &[(&str, EntryType, &str, &[u8])]) -> Result<(), OciError> {
        apply_layer(root, raw_tar(entries).as_slice(), "sha256:test")
    }

    #[test]
    fn an_entry_climbing_out_with_dot_dot_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("root");
        let err = apply(&root, &[("../escaped", EntryType::Regular, "", b"x")])
            .expect_err("a climbing path unpacked");
        assert!(matches!(err, OciError::EscapingPath { .. }), "{err}");
        assert!(!dir.path().join("escaped").exists());
    }

    #[test]
    fn a_file_under_a_symlink_to_an_absolute_path_lands_inside_the_root() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("root");
        let outside = dir.path().join("outside");
        std::fs::create_dir_all(&outside).expect("mkdir");
        let target = outside.to_str().expect("utf-8");
        apply(&root, &[("link", EntryType::Symlink, target, b"")]).expect("lower layer");
        apply(&root, &[("link/planted", EntryType::Regular, "", b"x")]).expect("upper layer");
        assert!(
            !outside.join("planted").exists(),
            "written through the symlink"
        );
        let inside = root
            .join(outside.strip_prefix("/").expect("absolute"))
            .join("planted");
        assert!(inside.is_file(), "{} missing", inside.display());
    }

    #[test]
    fn a_hard_link_to_a_file_outside_the_root_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("root");
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "s").expect("write");
        let err = apply(&root, &[("stolen", EntryType::Link, "../secret", b"")])
            .expect_err("a hard link out of the root unpacked");
        assert!(matches!(err, OciError::EscapingPath { .. }), "{err}");

        // Through a symlink: the target resolves inside the root, where nothing is.
        let outside = dir.path().to_str().expect("utf-8");
        apply(&root, &[("up", EntryType::Symlink, outside, b"")]).expect("symlink");
        let err = apply(&root, &[("stolen", EntryType::Link, "up/secret", b"")])
            .expect_err("a hard link through a symlink reached outside");
        assert!(matches!(err, OciError::UnpackEntry { .. }), "{err}");
        assert_eq!(std::fs::metadata(&secret).expect("stat").nlink(), 1);
    }

    #[test]
    fn device_nodes_are_refused_by_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = apply(dir.path(), &[("dev/null", EntryType::Char, "", b"")])
            .expect_err("a device node unpacked");
        assert!(err.to_string().contains("character device"), "{err}");
    }

    #[test]
    fn resolve_gives_up_on_a_symlink_loop() {
        let root = tempfile::tempdir().expect("tempdir");
        std::os::unix::fs::symlink("b", root.path().join("a")).expect("symlink");
        std::os::unix::fs::symlink("a", root.path().join("b")).expect("symlink");
        assert!(resolve(root.path(), Path::new("a/x")).is_err());
    }
}
