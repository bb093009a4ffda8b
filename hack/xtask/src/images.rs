//! `cargo xtask images`: Meshlet's container images, built offline from this workspace's
//! binaries and the host's Debian files, written as `oci-archive`s (no docker, no registry).
//!
//! ```text
//!  olm/metadata/annotations.yaml ══ olm/bundle.Dockerfile LABELs ─► bundle image labels
//!  cargo metadata ─► target dir, is there a mesh-traffic bin yet?
//!  cargo build --profile P -p meshlet-agent -p meshlet-operator -p meshlet-local-cluster --bins
//!     └─► strip --strip-all (copies) ─► ldd ─► the exact shared libraries + ELF interpreter
//!  specs() ─► one meshlet_oci::Layer per image ─► ImageBuilder::write
//!                                                   └─► <out>/<reference, / and : as _>.tar
//! ```
//!
//! [`specs`] is the one table of the images and their configs; [`references`] lists them for
//! other code (the local cluster's tests, the README).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use meshlet_oci::{ImageBuilder, ImageConfig, Layer};

use crate::{AGENT_IMAGE_REPO, OPERATOR_IMAGE_REPO, VERSION};

/// Default output directory, relative to the workspace root.
pub const DEFAULT_OUT: &str = "target/images";
/// Repository of the OLM bundle image (tag `v` + [`VERSION`]).
pub const BUNDLE_IMAGE_REPO: &str = "ghcr.io/meshlet-io/meshlet-operator-bundle";
/// The traffic program of the end-to-end tests (clients and backends).
pub const MESH_TRAFFIC_IMAGE: &str = "meshlet.local/mesh-traffic:v1";
/// A shell for test pods: Debian's static busybox and its applets.
pub const BUSYBOX_IMAGE: &str = "meshlet.local/busybox:1";
/// The image label carrying the tag.
pub const VERSION_LABEL: &str = "org.opencontainers.image.version";
/// The environment variable selecting the agent's map layout.
pub const LAYOUT_ENV: &str = "MESHLET_DATAPLANE_LAYOUT";
/// The environment variable naming the agent's cgroup.
pub const CGROUP_ENV: &str = "MESHLET_CGROUP";
/// The image user of the operator (`nonroot`).
pub const NONROOT: u32 = 65532;

/// The Debian files the images take from the host, with the package that ships each.
const CA_CERTIFICATES: (&str, &str) = ("/etc/ssl/certs/ca-certificates.crt", "ca-certificates");
const BUSYBOX: (&str, &str) = ("/bin/busybox", "busybox-static");

/// The package and bin target that `meshlet.local/mesh-traffic:v1` packs.
const MESH_TRAFFIC_PACKAGE: &str = "meshlet-local-cluster";
const MESH_TRAFFIC_BIN: &str = "mesh-traffic";

/// Failures of `cargo xtask images`.
#[derive(Debug, thiserror::Error)]
pub enum ImagesError {
    /// A tool (cargo, strip, ldd) could not be started.
    #[error("failed to run {tool}: {source} (run hack/setup.sh to install the build tools)")]
    RunTool {
        /// The command.
        tool: String,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A tool ran and failed.
    #[error("failed to {action}: `{command}` exited with {status}\n{stderr}")]
    ToolFailed {
        /// What was being done.
        action: String,
        /// The command line.
        command: String,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// Its error output (empty when it went to the terminal).
        stderr: String,
    },
    /// `cargo metadata` printed something unexpected.
    #[error("failed to read `cargo metadata`: {0}")]
    Metadata(String),
    /// A file of the OLM bundle cannot be read.
    #[error("failed to read {path}: {source}")]
    ReadBundle {
        /// The file.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
    /// `annotations.yaml` does not parse.
    #[error("failed to parse {path}: {message} (expected `annotations:` with string values)")]
    ParseAnnotations {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        message: String,
    },
    /// The bundle's annotations and its Dockerfile's labels disagree.
    #[error(
        "failed to label the bundle image: olm/metadata/annotations.yaml and the LABELs of olm/bundle.Dockerfile differ ({0}); run `cargo xtask gen`"
    )]
    BundleLabels(String),
    /// A binary links a library the host does not have.
    #[error("failed to find the libraries of {binary}: ldd reports {library} not found")]
    MissingLibrary {
        /// The binary.
        binary: PathBuf,
        /// The library.
        library: String,
    },
    /// A file an image takes from the host is missing.
    #[error("failed to find {path} for image {reference}: install the Debian package {package}")]
    MissingHostFile {
        /// The file.
        path: PathBuf,
        /// The image needing it.
        reference: String,
        /// The package shipping it.
        package: String,
    },
    /// Preparing a stripped binary failed.
    #[error("failed to prepare {path}: {source}")]
    Prepare {
        /// The file or directory.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Writing an image failed.
    #[error("failed to build image {reference}: {source}")]
    Write {
        /// The image.
        reference: String,
        /// Underlying error.
        #[source]
        source: meshlet_oci::BuildError,
    },
}

/// The cargo profile the binaries are built with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Profile {
    /// `--profile release` (`target/release`).
    Release,
    /// `--profile dev` (`target/debug`).
    Dev,
}

impl Profile {
    /// The name cargo's `--profile` takes.
    pub fn cargo_name(self) -> &'static str {
        match self {
            Profile::Release => "release",
            Profile::Dev => "dev",
        }
    }

    /// The directory under the target directory holding the binaries.
    pub fn dir_name(self) -> &'static str {
        match self {
            Profile::Release => "release",
            Profile::Dev => "debug",
        }
    }
}

/// What goes into an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Contents {
    /// `meshlet-agent` and `meshletctl`, their libraries, the mount points the agent needs.
    Agent,
    /// `meshlet-operator`, its libraries, CA certificates, a `nonroot` user.
    Operator,
    /// `olm/manifests` and `olm/metadata`, no binaries.
    Bundle,
    /// `mesh-traffic` of the local cluster and its libraries.
    MeshTraffic,
    /// Debian's static busybox with a symlink per applet.
    Busybox,
}

/// One image: its reference, contents and config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSpec {
    /// Full reference (`repository:tag`).
    pub reference: String,
    /// What it holds.
    pub contents: Contents,
    /// Its config (the bundle's labels are added from `olm/` when building).
    pub config: ImageConfig,
}

/// Environment of the local cluster's test agents: xfrm state goes to a file of the node
/// (`/run/meshlet` is the node's), because the machines the tests run on have no ESP.
pub const XFRM_RECORDING_ENV: &str = "MESHLET_IPSEC_XFRM=recording:/run/meshlet/xfrm.json";

/// The agent tags and the environment each adds: the variants are the same files, so moving
/// between them is a real image change that only the config tells apart. `v1`, `v2` and
/// `broken` are test images: they also record xfrm state instead of using the kernel's.
pub fn agent_variants() -> Vec<(String, Vec<String>)> {
    vec![
        (format!("v{VERSION}"), vec![]),
        (VERSION.to_string(), vec![]),
        (
            "v1".into(),
            vec![format!("{LAYOUT_ENV}=1"), XFRM_RECORDING_ENV.into()],
        ),
        (
            "v2".into(),
            vec![format!("{LAYOUT_ENV}=2"), XFRM_RECORDING_ENV.into()],
        ),
        (
            "broken".into(),
            vec![
                format!("{CGROUP_ENV}=/nonexistent/meshlet"),
                XFRM_RECORDING_ENV.into(),
            ],
        ),
    ]
}

/// The bundle image reference.
pub fn bundle_image() -> String {
    format!("{BUNDLE_IMAGE_REPO}:v{VERSION}")
}

fn version_label(tag: &str) -> BTreeMap<String, String> {
    BTreeMap::from([(VERSION_LABEL.to_string(), tag.to_string())])
}

/// Every image `cargo xtask images` builds, in the order it builds them.
pub fn specs() -> Vec<ImageSpec> {
    let mut specs: Vec<ImageSpec> = agent_variants()
        .into_iter()
        .map(|(tag, env)| ImageSpec {
            reference: format!("{AGENT_IMAGE_REPO}:{tag}"),
            contents: Contents::Agent,
            config: ImageConfig {
                entrypoint: vec!["/usr/bin/meshlet-agent".into()],
                env,
                labels: version_label(&tag),
                ..ImageConfig::default()
            },
        })
        .collect();
    let tag = format!("v{VERSION}");
    specs.push(ImageSpec {
        reference: format!("{OPERATOR_IMAGE_REPO}:{tag}"),
        contents: Contents::Operator,
        config: ImageConfig {
            entrypoint: vec!["/usr/bin/meshlet-operator".into()],
            user: Some(format!("{NONROOT}:{NONROOT}")),
            labels: version_label(&tag),
            ..ImageConfig::default()
        },
    });
    specs.push(ImageSpec {
        reference: bundle_image(),
        contents: Contents::Bundle,
        config: ImageConfig::default(),
    });
    specs.push(ImageSpec {
        reference: MESH_TRAFFIC_IMAGE.into(),
        contents: Contents::MeshTraffic,
        config: ImageConfig {
            entrypoint: vec!["/usr/bin/mesh-traffic".into()],
            labels: version_label("v1"),
            ..ImageConfig::default()
        },
    });
    specs.push(ImageSpec {
        reference: BUSYBOX_IMAGE.into(),
        contents: Contents::Busybox,
        config: ImageConfig {
            cmd: vec!["sh".into()],
            env: vec!["PATH=/usr/sbin:/usr/bin:/sbin:/bin".into()],
            labels: version_label("1"),
            ..ImageConfig::default()
        },
    });
    specs
}

/// The references of every image, as [`specs`] lists them.
pub fn references() -> Vec<String> {
    specs().into_iter().map(|s| s.reference).collect()
}

/// Options of `cargo xtask images`.
#[derive(Debug, Clone)]
pub struct Options {
    /// Profile of the binaries.
    pub profile: Profile,
    /// Directory the archives are written to.
    pub out: PathBuf,
}

/// What happened to one image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Written.
    Built {
        /// Reference.
        reference: String,
        /// Archive written.
        archive: PathBuf,
        /// Size of the archive, in bytes.
        archive_bytes: u64,
        /// Size of the files in the image, in bytes.
        unpacked_bytes: u64,
    },
    /// Not built, and why.
    Skipped {
        /// Reference.
        reference: String,
        /// Why.
        reason: String,
    },
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const MIB: f64 = 1024.0 * 1024.0;
        match self {
            Outcome::Built {
                reference,
                archive,
                archive_bytes,
                unpacked_bytes,
            } => write!(
                f,
                "{reference}  {}  {:.2} MiB compressed, {:.2} MiB unpacked",
                archive.display(),
                *archive_bytes as f64 / MIB,
                *unpacked_bytes as f64 / MIB
            ),
            Outcome::Skipped { reference, reason } => write!(f, "{reference}  skipped: {reason}"),
        }
    }
}

/// Builds the binaries and writes every image into `opts.out`; `on_image` sees each outcome
/// as it happens.
pub fn build(
    root: &Path,
    opts: &Options,
    mut on_image: impl FnMut(&Outcome),
) -> Result<Vec<Outcome>, ImagesError> {
    let bundle_labels = bundle_labels(&root.join("olm"))?;
    let metadata = Metadata::read(root)?;
    let has_traffic = metadata.has_bin(MESH_TRAFFIC_PACKAGE, MESH_TRAFFIC_BIN);

    cargo_build(root, opts.profile)?;
    let built_dir = metadata.target_dir.join(opts.profile.dir_name());
    let stripped_dir = metadata
        .target_dir
        .join("images-stripped")
        .join(opts.profile.dir_name());
    std::fs::create_dir_all(&stripped_dir).map_err(|source| ImagesError::Prepare {
        path: stripped_dir.clone(),
        source,
    })?;
    let mut binaries = BTreeMap::new();
    let mut names = vec!["meshlet-agent", "meshletctl", "meshlet-operator"];
    if has_traffic {
        names.push(MESH_TRAFFIC_BIN);
    }
    for name in names {
        let stripped = strip(&built_dir.join(name), &stripped_dir.join(name))?;
        let libs = shared_libraries(&stripped)?;
        binaries.insert(name, (stripped, libs));
    }
    let binary_layer = |names: &[&str]| {
        let mut layer = Layer::new();
        let mut libs = BTreeSet::new();
        for name in names {
            if let Some((path, l)) = binaries.get(name) {
                layer = layer.file(&format!("/usr/bin/{name}"), path, 0o755);
                libs.extend(l.iter().cloned());
            }
        }
        for lib in libs {
            let image_path = lib.to_string_lossy().into_owned();
            layer = layer.file(&image_path, lib, 0o755);
        }
        layer
    };

    // One layer for every agent variant: built (and compressed) once, the variants differ
    // only in their config.
    let agent_layer = ["/sys/fs/bpf", "/sys/fs/cgroup", "/run", "/proc", "/dev"]
        .into_iter()
        .fold(binary_layer(&["meshlet-agent", "meshletctl"]), |l, d| {
            l.dir(d, 0o755)
        })
        .dir("/tmp", 0o1777);

    let mut outcomes = Vec::new();
    for spec in specs() {
        let reference = spec.reference.clone();
        let mut config = spec.config.clone();
        let layer = match spec.contents {
            Contents::Agent => agent_layer.clone(),
            Contents::Operator => binary_layer(&["meshlet-operator"])
                .file(CA_CERTIFICATES.0, host_file(CA_CERTIFICATES, &reference)?, 0o644)
                .bytes(
                    "/etc/passwd",
                    format!(
                        "root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:{NONROOT}:{NONROOT}:nonroot:/nonexistent:/sbin/nologin\n"
                    ),
                    0o644,
                )
                .bytes(
                    "/etc/group",
                    format!("root:x:0:\nnonroot:x:{NONROOT}:\n"),
                    0o644,
                )
                .dir("/tmp", 0o1777),
            Contents::Bundle => {
                config.labels.extend(bundle_labels.clone());
                let olm = root.join("olm");
                Layer::new()
                    .tree("/manifests", &olm.join("manifests"))
                    .and_then(|l| l.tree("/metadata", &olm.join("metadata")))
                    .map_err(|source| ImagesError::Write {
                        reference: reference.clone(),
                        source,
                    })?
            }
            Contents::MeshTraffic if !has_traffic => {
                let outcome = Outcome::Skipped {
                    reference,
                    reason: format!(
                        "package {MESH_TRAFFIC_PACKAGE} has no bin target {MESH_TRAFFIC_BIN} yet (tests/cluster/src/bin/mesh-traffic.rs); it is built once that exists"
                    ),
                };
                on_image(&outcome);
                outcomes.push(outcome);
                continue;
            }
            Contents::MeshTraffic => binary_layer(&[MESH_TRAFFIC_BIN]),
            Contents::Busybox => busybox_layer(&host_file(BUSYBOX, &reference)?)?,
        };
        let archive = meshlet_oci::archive_path(&opts.out, &reference);
        let written = ImageBuilder::new(reference.clone())
            .config(config)
            .layer(layer)
            .write(&archive)
            .map_err(|source| ImagesError::Write {
                reference: reference.clone(),
                source,
            })?;
        let outcome = Outcome::Built {
            reference,
            archive,
            archive_bytes: written.archive_bytes,
            unpacked_bytes: written.unpacked_bytes,
        };
        on_image(&outcome);
        outcomes.push(outcome);
    }
    Ok(outcomes)
}

/// The labels of the bundle image: `annotations` of `metadata/annotations.yaml`, which must
/// equal the `LABEL`s of `bundle.Dockerfile`.
pub fn bundle_labels(olm: &Path) -> Result<BTreeMap<String, String>, ImagesError> {
    let read = |path: PathBuf| {
        std::fs::read_to_string(&path).map_err(|source| ImagesError::ReadBundle { path, source })
    };
    let annotations_path = olm.join("metadata/annotations.yaml");
    let annotations = parse_annotations(&read(annotations_path.clone())?).map_err(|message| {
        ImagesError::ParseAnnotations {
            path: annotations_path,
            message,
        }
    })?;
    let labels = dockerfile_labels(&read(olm.join("bundle.Dockerfile"))?);
    if annotations != labels {
        let keys: BTreeSet<&String> = annotations.keys().chain(labels.keys()).collect();
        let differ: Vec<String> = keys
            .into_iter()
            .filter(|k| annotations.get(*k) != labels.get(*k))
            .map(|k| {
                format!(
                    "{k}: annotation {:?}, label {:?}",
                    annotations.get(k),
                    labels.get(k)
                )
            })
            .collect();
        return Err(ImagesError::BundleLabels(differ.join("; ")));
    }
    Ok(annotations)
}

/// `annotations` of an OLM `annotations.yaml`.
pub fn parse_annotations(text: &str) -> Result<BTreeMap<String, String>, String> {
    #[derive(serde::Deserialize)]
    struct File {
        annotations: BTreeMap<String, String>,
    }
    serde_saphyr::from_str::<File>(text)
        .map(|f| f.annotations)
        .map_err(|e| e.to_string())
}

/// The `LABEL key=value …` instructions of a Dockerfile (values optionally double-quoted).
pub fn dockerfile_labels(text: &str) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    for line in text.lines() {
        let line = line.trim();
        let Some(rest) = line
            .split_once(char::is_whitespace)
            .filter(|(instruction, _)| instruction.eq_ignore_ascii_case("LABEL"))
            .map(|(_, rest)| rest)
        else {
            continue;
        };
        for pair in rest.split_whitespace() {
            if let Some((k, v)) = pair.split_once('=') {
                labels.insert(
                    k.trim_matches('"').to_string(),
                    v.trim_matches('"').to_string(),
                );
            }
        }
    }
    labels
}

/// The parts of `cargo metadata` this needs.
struct Metadata {
    target_dir: PathBuf,
    /// (package, bin target) pairs of the workspace.
    bins: BTreeSet<(String, String)>,
}

impl Metadata {
    fn read(root: &Path) -> Result<Self, ImagesError> {
        let out = run(
            cargo()
                .current_dir(root)
                .args(["metadata", "--no-deps", "--format-version", "1"]),
            "read the workspace layout",
        )?;
        let value: serde_json::Value =
            serde_json::from_slice(&out).map_err(|e| ImagesError::Metadata(e.to_string()))?;
        let target_dir = value["target_directory"]
            .as_str()
            .ok_or_else(|| ImagesError::Metadata("no target_directory".into()))?
            .into();
        let mut bins = BTreeSet::new();
        for package in value["packages"].as_array().into_iter().flatten() {
            let name = package["name"].as_str().unwrap_or_default();
            for target in package["targets"].as_array().into_iter().flatten() {
                let is_bin = target["kind"]
                    .as_array()
                    .is_some_and(|k| k.iter().any(|k| k == "bin"));
                // A declared bin whose source does not exist yet does not count.
                let src_exists = target["src_path"]
                    .as_str()
                    .is_some_and(|p| Path::new(p).is_file());
                if is_bin && src_exists {
                    let bin = target["name"].as_str().unwrap_or_default();
                    bins.insert((name.to_string(), bin.to_string()));
                }
            }
        }
        Ok(Self { target_dir, bins })
    }

    fn has_bin(&self, package: &str, bin: &str) -> bool {
        self.bins.contains(&(package.to_string(), bin.to_string()))
    }
}

/// A `cargo` command without the variables `cargo run` set for this program: they describe
/// xtask, and build scripts that track them (ring's) would rebuild on every run.
fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if name.starts_with("CARGO_PKG_")
            || [
                "CARGO_MANIFEST_DIR",
                "CARGO_MANIFEST_PATH",
                "CARGO_CRATE_NAME",
                "CARGO_BIN_NAME",
                "CARGO_PRIMARY_PACKAGE",
                "CARGO_RUSTC_CURRENT_DIR",
            ]
            .contains(&name.as_ref())
        {
            cmd.env_remove(name.as_ref());
        }
    }
    cmd
}

/// `cargo build` of the binaries the images hold; its output goes to the terminal.
fn cargo_build(root: &Path, profile: Profile) -> Result<(), ImagesError> {
    let mut cmd = cargo();
    cmd.current_dir(root).args([
        "build",
        "--profile",
        profile.cargo_name(),
        "-p",
        "meshlet-agent",
        "-p",
        "meshlet-operator",
        "-p",
        "meshlet-local-cluster",
        "--bins",
    ]);
    let status = cmd.status().map_err(|source| ImagesError::RunTool {
        tool: "cargo".into(),
        source,
    })?;
    if !status.success() {
        return Err(ImagesError::ToolFailed {
            action: "build the binaries".into(),
            command: format!("{cmd:?}"),
            status,
            stderr: String::new(),
        });
    }
    Ok(())
}

/// Runs `cmd`, returning its standard output; a failure carries its standard error.
fn run(cmd: &mut Command, action: &str) -> Result<Vec<u8>, ImagesError> {
    let out = cmd.output().map_err(|source| ImagesError::RunTool {
        tool: cmd.get_program().to_string_lossy().into_owned(),
        source,
    })?;
    if !out.status.success() {
        return Err(ImagesError::ToolFailed {
            action: action.into(),
            command: format!("{cmd:?}"),
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    Ok(out.stdout)
}

/// A stripped copy of `binary` at `dest`.
fn strip(binary: &Path, dest: &Path) -> Result<PathBuf, ImagesError> {
    run(
        Command::new("strip")
            .arg("--strip-all")
            .arg("-o")
            .arg(dest)
            .arg(binary),
        &format!("strip {}", binary.display()),
    )?;
    Ok(dest.to_path_buf())
}

/// The shared libraries `binary` loads and its ELF interpreter, as `ldd` resolves them on
/// this host (absolute paths); none for a static binary.
pub fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>, ImagesError> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .map_err(|source| ImagesError::RunTool {
            tool: "ldd".into(),
            source,
        })?;
    let text = String::from_utf8_lossy(&out.stdout);
    let errors = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        if text.contains("not a dynamic executable") || errors.contains("not a dynamic executable")
        {
            return Ok(Vec::new());
        }
        return Err(ImagesError::ToolFailed {
            action: format!("list the libraries of {}", binary.display()),
            command: format!("ldd {}", binary.display()),
            status: out.status,
            stderr: errors.into_owned(),
        });
    }
    parse_ldd(&text).map_err(|library| ImagesError::MissingLibrary {
        binary: binary.to_path_buf(),
        library,
    })
}

/// The absolute paths in `ldd` output; `Err(name)` for a library it could not find.
pub fn parse_ldd(text: &str) -> Result<Vec<PathBuf>, String> {
    let mut libs = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.contains("statically linked") {
            continue;
        }
        let path = match line.split_once("=>") {
            Some((name, resolved)) => {
                let resolved = resolved.trim();
                if resolved.starts_with("not found") {
                    return Err(name.trim().to_string());
                }
                resolved.split_whitespace().next().unwrap_or_default()
            }
            // The interpreter (`/lib64/ld-linux-x86-64.so.2 (0x…)`) or the vDSO (no path).
            None => line.split_whitespace().next().unwrap_or_default(),
        };
        if path.starts_with('/') {
            libs.push(PathBuf::from(path));
        }
    }
    Ok(libs)
}

/// `file` from the host, or the error naming the Debian package to install.
fn host_file((path, package): (&str, &str), reference: &str) -> Result<PathBuf, ImagesError> {
    let path = PathBuf::from(path);
    if path.is_file() {
        Ok(path)
    } else {
        Err(ImagesError::MissingHostFile {
            path,
            reference: reference.into(),
            package: package.into(),
        })
    }
}

/// `/bin/busybox`, a symlink to it for every applet it lists, and `/tmp`.
fn busybox_layer(busybox: &Path) -> Result<Layer, ImagesError> {
    let list = run(
        Command::new(busybox).arg("--list-full"),
        "list the busybox applets",
    )?;
    let mut layer = Layer::new()
        .file("/bin/busybox", busybox, 0o755)
        .dir("/tmp", 0o1777);
    for applet in String::from_utf8_lossy(&list).lines().map(str::trim) {
        if !applet.is_empty() && applet != "bin/busybox" {
            layer = layer.symlink(&format!("/{applet}"), "/bin/busybox");
        }
    }
    Ok(layer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_gives_libraries_and_the_interpreter_but_not_the_vdso() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                    \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f99)\n\
                    \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f98)\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x00007f99)\n";
        assert_eq!(
            parse_ldd(text).expect("parse"),
            [
                "/lib/x86_64-linux-gnu/libgcc_s.so.1",
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib64/ld-linux-x86-64.so.2"
            ]
            .map(PathBuf::from)
        );
        assert_eq!(
            parse_ldd("\tlibssl.so.3 => not found\n"),
            Err("libssl.so.3".to_string())
        );
    }

    #[test]
    fn dockerfile_labels_are_read_with_and_without_quotes() {
        let text = "FROM scratch\nLABEL a=1\nlabel \"b\"=\"two\" c=3\nCOPY x /x\n";
        assert_eq!(
            dockerfile_labels(text),
            BTreeMap::from([
                ("a".into(), "1".into()),
                ("b".into(), "two".into()),
                ("c".into(), "3".into())
            ])
        );
    }

    #[test]
    fn a_bundle_whose_dockerfile_labels_differ_from_its_annotations_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("metadata")).expect("mkdir");
        std::fs::write(
            dir.path().join("metadata/annotations.yaml"),
            "annotations:\n  x.v1: alpha\n  y.v1: meshlet\n",
        )
        .expect("write");
        std::fs::write(
            dir.path().join("bundle.Dockerfile"),
            "FROM scratch\nLABEL x.v1=alpha\nLABEL y.v1=meshlet\n",
        )
        .expect("write");
        assert_eq!(
            bundle_labels(dir.path()).expect("labels").len(),
            2,
            "matching files refused"
        );
        std::fs::write(
            dir.path().join("bundle.Dockerfile"),
            "FROM scratch\nLABEL x.v1=beta\nLABEL y.v1=meshlet\n",
        )
        .expect("write");
        let err = bundle_labels(dir.path()).expect_err("differing labels accepted");
        assert!(err.to_string().contains("x.v1"), "{err}");
    }

    #[test]
    fn every_reference_is_listed_once() {
        let refs = references();
        let unique: BTreeSet<_> = refs.iter().collect();
        assert_eq!(unique.len(), refs.len(), "{refs:?}");
        assert!(refs.contains(&"ghcr.io/meshlet-io/meshlet-agent:broken".to_string()));
    }
}
