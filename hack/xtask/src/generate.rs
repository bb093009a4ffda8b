//! Writing the generated tree (`cargo xtask gen`) and checking it for drift
//! (`cargo xtask verify`).
//!
//! ```text
//!  generate(root) ─► Tree { "manifests/…", "olm/…" → contents }
//!        │                    │
//!        ├─► write(root)      └─► verify: write into a temp dir, then compare it file by
//!        │   (also deletes stale files under the generated dirs)   file with the repo
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context as _;

/// Top-level directories whose whole content is generated.
pub const GENERATED_DIRS: [&str; 2] = ["manifests", "olm"];

/// Generated files: path relative to the workspace root → contents.
pub type Tree = BTreeMap<PathBuf, String>;

/// Renders every generated file from the Rust types and the examples under `root`.
pub fn generate(root: &Path) -> anyhow::Result<Tree> {
    let crds = meshlet_crds::all_crds();
    let mut tree = Tree::new();
    for (path, text) in crate::manifests::render(&crds)? {
        tree.insert(Path::new("manifests").join(path), text);
    }
    for (path, text) in crate::olm::render(&crds, &root.join("examples"))? {
        tree.insert(Path::new("olm").join(path), text);
    }
    Ok(tree)
}

/// Every file under the generated directories of `root`, relative to `root`.
pub fn existing_files(root: &Path) -> anyhow::Result<Vec<PathBuf>> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
        if !dir.is_dir() {
            return Ok(());
        }
        for entry in
            std::fs::read_dir(dir).with_context(|| format!("failed to list {}", dir.display()))?
        {
            let path = entry?.path();
            if path.is_dir() {
                walk(root, &path, out)?;
            } else {
                out.push(path.strip_prefix(root)?.to_path_buf());
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    for dir in GENERATED_DIRS {
        walk(root, &root.join(dir), &mut out)?;
    }
    out.sort();
    Ok(out)
}

/// Writes `tree` under `root` and removes files under the generated directories that the
/// tree no longer contains. Returns the paths written.
pub fn write(tree: &Tree, root: &Path) -> anyhow::Result<Vec<PathBuf>> {
    for stale in existing_files(root)? {
        if !tree.contains_key(&stale) {
            std::fs::remove_file(root.join(&stale))
                .with_context(|| format!("failed to remove stale {}", stale.display()))?;
        }
    }
    let mut written = Vec::new();
    for (path, text) in tree {
        let full = root.join(path);
        if let Some(parent) = full.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("failed to create {}", parent.display()))?;
        }
        std::fs::write(&full, text)
            .with_context(|| format!("failed to write {}", full.display()))?;
        written.push(path.clone());
    }
    Ok(written)
}

/// One difference between freshly generated files and the committed ones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Drift {
    /// The file is generated but missing from the repository.
    Missing(PathBuf),
    /// The file exists in the repository but is no longer generated.
    Extra(PathBuf),
    /// The contents differ; the first differing line (1-based) is given.
    Changed { path: PathBuf, line: usize },
}

impl std::fmt::Display for Drift {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Drift::Missing(p) => write!(f, "{} is generated but missing", p.display()),
            Drift::Extra(p) => write!(f, "{} is not generated any more (stale)", p.display()),
            Drift::Changed { path, line } => {
                write!(
                    f,
                    "{} differs from the generated file (first at line {line})",
                    path.display()
                )
            }
        }
    }
}

/// Regenerates into a temporary directory and compares it, file by file, with the
/// generated directories under `root`.
pub fn verify(root: &Path) -> anyhow::Result<Vec<Drift>> {
    let tree = generate(root)?;
    let temp = tempfile::tempdir().context("failed to create a temporary directory")?;
    write(&tree, temp.path())?;
    compare(temp.path(), root)
}

/// Compares the generated directories of `fresh` with those of `committed`.
pub fn compare(fresh: &Path, committed: &Path) -> anyhow::Result<Vec<Drift>> {
    let fresh_files = existing_files(fresh)?;
    let committed_files = existing_files(committed)?;
    let mut drift = Vec::new();
    for path in &fresh_files {
        if !committed_files.contains(path) {
            drift.push(Drift::Missing(path.clone()));
            continue;
        }
        let want = std::fs::read_to_string(fresh.join(path))?;
        let have = std::fs::read_to_string(committed.join(path))
            .with_context(|| format!("failed to read {}", path.display()))?;
        if want != have {
            let line = want
                .lines()
                .zip(have.lines())
                .position(|(a, b)| a != b)
                .unwrap_or_else(|| want.lines().count().min(have.lines().count()))
                + 1;
            drift.push(Drift::Changed {
                path: path.clone(),
                line,
            });
        }
    }
    for path in committed_files {
        if !fresh_files.contains(&path) {
            drift.push(Drift::Extra(path));
        }
    }
    Ok(drift)
}
