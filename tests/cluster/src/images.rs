//! The image table: which local program a container image reference runs as.
//!
//! The local cluster pulls no images. A Pod's `image` is looked up here by its exact
//! `repo:tag`; an unknown reference leaves the container waiting with `ErrImagePull`.
//!
//! ```text
//!  pod.spec.containers[i].image ──► ImageTable ──► ImageCommand { program, args_prefix, env }
//!                                                       │
//!  argv = command + args            (container `command` set)
//!       = program + args_prefix + args   (otherwise)    ▼
//!  env  = container env < node-local overrides < image env
//! ```
//!
//! [`default_images`] is the one documented place of the table `hack/local-cluster up` uses:
//!
//! | image reference | runs |
//! |---|---|
//! | `ghcr.io/meshlet-io/meshlet-agent:v1` | `meshlet-agent`, `MESHLET_DATAPLANE_LAYOUT=1` |
//! | `ghcr.io/meshlet-io/meshlet-agent:v2` | `meshlet-agent`, `MESHLET_DATAPLANE_LAYOUT=2` |
//! | `ghcr.io/meshlet-io/meshlet-agent:v0.1.0` | `meshlet-agent` (newest layout) |
//! | `ghcr.io/meshlet-io/meshlet-agent:0.1.0` | `meshlet-agent` (the version `examples/meshconfig.yaml` asks for) |
//! | `ghcr.io/meshlet-io/meshlet-agent:broken` | `meshlet-agent`, `MESHLET_CGROUP=/nonexistent/meshlet` (preflight fails) |
//! | `ghcr.io/meshlet-io/meshlet-operator:v0.1.0` | `meshlet-operator` |

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Repository of the agent image.
pub const AGENT_REPO: &str = "ghcr.io/meshlet-io/meshlet-agent";
/// Repository of the operator image.
pub const OPERATOR_REPO: &str = "ghcr.io/meshlet-io/meshlet-operator";

/// What one image reference runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageCommand {
    /// The executable (absolute path, or a name looked up in `PATH`).
    pub program: PathBuf,
    /// Arguments placed before the container's `args`.
    pub args_prefix: Vec<String>,
    /// Environment of the image; wins over the container env and the node-local overrides.
    pub env: BTreeMap<String, String>,
}

impl ImageCommand {
    /// A command running `program` with no extra arguments or environment.
    pub fn new(program: impl Into<PathBuf>) -> Self {
        Self {
            program: program.into(),
            args_prefix: Vec::new(),
            env: BTreeMap::new(),
        }
    }

    /// Adds arguments placed before the container's `args`.
    pub fn with_args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.args_prefix.extend(args.into_iter().map(Into::into));
        self
    }

    /// Adds one environment variable of the image.
    pub fn with_env(mut self, name: &str, value: &str) -> Self {
        self.env.insert(name.into(), value.into());
        self
    }
}

/// Image reference (exact `repo:tag`) → [`ImageCommand`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageTable {
    entries: BTreeMap<String, ImageCommand>,
}

/// A malformed `--image` argument.
#[derive(Debug, thiserror::Error)]
#[error(
    "failed to parse --image {given:?}: {reason} (expected REF=[NAME=VALUE ...] PROGRAM [ARGS ...])"
)]
pub struct ParseImageError {
    /// The argument as given.
    pub given: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

impl ImageTable {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) one entry.
    pub fn with(mut self, image: &str, command: ImageCommand) -> Self {
        self.insert(image, command);
        self
    }

    /// Adds (or replaces) one entry.
    pub fn insert(&mut self, image: &str, command: ImageCommand) {
        self.entries.insert(image.to_string(), command);
    }

    /// The command of `image`, if known.
    pub fn get(&self, image: &str) -> Option<&ImageCommand> {
        self.entries.get(image)
    }

    /// Every entry, sorted by image reference.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &ImageCommand)> {
        self.entries.iter()
    }

    /// Parses `REF=[NAME=VALUE ...] PROGRAM [ARGS ...]` (whitespace-separated after `=`) and
    /// adds it.
    pub fn insert_arg(&mut self, arg: &str) -> Result<(), ParseImageError> {
        let err = |reason| ParseImageError {
            given: arg.to_string(),
            reason,
        };
        let (image, rest) = arg.split_once('=').ok_or_else(|| err("no '='"))?;
        if image.is_empty() || !image.contains(':') {
            return Err(err("the image reference must be repo:tag"));
        }
        let mut words = rest.split_whitespace().peekable();
        let mut env = BTreeMap::new();
        while let Some(w) = words.peek() {
            match w.split_once('=') {
                Some((k, v))
                    if !k.is_empty()
                        && k.chars()
                            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_') =>
                {
                    env.insert(k.to_string(), v.to_string());
                    words.next();
                }
                _ => break,
            }
        }
        let program = words.next().ok_or_else(|| err("no program after '='"))?;
        let mut cmd = ImageCommand::new(program).with_args(words);
        cmd.env = env;
        self.insert(image, cmd);
        Ok(())
    }
}

/// The image table of `hack/local-cluster up`: agent versions `v1`, `v2`, `v0.1.0`, `0.1.0`, `broken`
/// and operator `v0.1.0`, mapped to the `meshlet-agent` / `meshlet-operator` binaries in
/// `bin_dir` (a cargo profile directory such as `target/debug`).
pub fn default_images(bin_dir: &Path) -> ImageTable {
    let agent = bin_dir.join("meshlet-agent");
    let operator = bin_dir.join("meshlet-operator");
    ImageTable::new()
        .with(
            &format!("{AGENT_REPO}:v1"),
            ImageCommand::new(&agent).with_env("MESHLET_DATAPLANE_LAYOUT", "1"),
        )
        .with(
            &format!("{AGENT_REPO}:v2"),
            ImageCommand::new(&agent).with_env("MESHLET_DATAPLANE_LAYOUT", "2"),
        )
        .with(&format!("{AGENT_REPO}:v0.1.0"), ImageCommand::new(&agent))
        // `examples/meshconfig.yaml` asks for version `0.1.0`.
        .with(&format!("{AGENT_REPO}:0.1.0"), ImageCommand::new(&agent))
        .with(
            &format!("{AGENT_REPO}:broken"),
            ImageCommand::new(&agent).with_env("MESHLET_CGROUP", "/nonexistent/meshlet"),
        )
        .with(
            &format!("{OPERATOR_REPO}:v0.1.0"),
            ImageCommand::new(&operator),
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_arguments_parse_env_program_and_args() {
        let mut t = ImageTable::new();
        t.insert_arg("test/web:1=A=1 B_2=x /usr/bin/python3 -m http.server")
            .expect("parse");
        let c = t.get("test/web:1").expect("entry");
        assert_eq!(c.program, PathBuf::from("/usr/bin/python3"));
        assert_eq!(c.args_prefix, vec!["-m", "http.server"]);
        assert_eq!(c.env.get("A").map(String::as_str), Some("1"));
        assert_eq!(c.env.get("B_2").map(String::as_str), Some("x"));
    }

    #[test]
    fn bad_image_arguments_are_refused_with_the_reason() {
        let mut t = ImageTable::new();
        let e = t.insert_arg("no-tag=/bin/true").expect_err("no tag");
        assert!(e.to_string().contains("repo:tag"), "{e}");
        let e = t.insert_arg("a/b:1=").expect_err("no program");
        assert!(e.to_string().contains("no program"), "{e}");
    }

    #[test]
    fn the_broken_agent_points_preflight_at_a_missing_cgroup() {
        let t = default_images(Path::new("/x"));
        let c = t
            .get("ghcr.io/meshlet-io/meshlet-agent:broken")
            .expect("entry");
        assert_eq!(
            c.env.get("MESHLET_CGROUP").map(String::as_str),
            Some("/nonexistent/meshlet")
        );
        assert_eq!(c.program, PathBuf::from("/x/meshlet-agent"));
    }
}
