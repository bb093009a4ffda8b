//! The images `cargo xtask images` writes (hack/test.sh builds them before the tests): their
//! configs, their contents, and that each binary runs from the image alone under runc.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use meshlet_oci::Image;

const AGENT: &str = "ghcr.io/meshlet-io/meshlet-agent";
const OPERATOR: &str = "ghcr.io/meshlet-io/meshlet-operator:v0.1.0";
const BUNDLE: &str = "ghcr.io/meshlet-io/meshlet-operator-bundle:v0.1.0";
const TRAFFIC: &str = "meshlet.local/mesh-traffic:v1";
const MIB: u64 = 1024 * 1024;

fn images_dir() -> PathBuf {
    xtask::workspace_root().join(xtask::images::DEFAULT_OUT)
}

/// The image `reference` as `cargo xtask images` wrote it.
fn open(reference: &str) -> Image {
    let archive = meshlet_oci::archive_path(&images_dir(), reference);
    assert!(
        archive.is_file(),
        "{} is missing: run `cargo xtask images` first (hack/test.sh does)",
        archive.display()
    );
    let image = Image::open(&archive).unwrap_or_else(|e| panic!("{reference}: {e}"));
    assert_eq!(image.reference(), reference);
    image
}

fn unpack(image: &Image) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    image
        .unpack(&dir.path().join("rootfs"))
        .unwrap_or_else(|e| panic!("{}: {e}", image.reference()));
    dir
}

/// Every regular file and symlink of `root`, as image paths.
fn files(root: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).expect("list") {
            let path = entry.expect("entry").path();
            let meta = std::fs::symlink_metadata(&path).expect("stat");
            if meta.is_dir() {
                walk(root, &path, out);
            } else {
                let rel = path.strip_prefix(root).expect("inside");
                out.push(format!("/{}", rel.display()));
            }
        }
    }
    let mut out = Vec::new();
    walk(root, root, &mut out);
    out.sort();
    out
}

#[test]
fn every_agent_tag_is_the_same_files_with_the_documented_config() {
    // The test tags also record xfrm state in a file: the local cluster has no ESP.
    const XFRM: &str = "MESHLET_IPSEC_XFRM=recording:/run/meshlet/xfrm.json";
    let expected_env: [(&str, &[&str]); 5] = [
        ("v0.1.0", &[]),
        ("0.1.0", &[]),
        ("v1", &["MESHLET_DATAPLANE_LAYOUT=1", XFRM]),
        ("v2", &["MESHLET_DATAPLANE_LAYOUT=2", XFRM]),
        ("broken", &["MESHLET_CGROUP=/nonexistent/meshlet", XFRM]),
    ];
    let mut layers = Vec::new();
    let mut digests = Vec::new();
    for (tag, env) in expected_env {
        let image = open(&format!("{AGENT}:{tag}"));
        let config = image.config();
        assert_eq!(config.entrypoint, ["/usr/bin/meshlet-agent"], "{tag}");
        assert!(config.cmd.is_empty(), "{tag}: cmd {:?}", config.cmd);
        assert_eq!(config.env, env, "{tag}");
        assert_eq!(config.user, None, "{tag}: the agent runs as root");
        assert_eq!(
            config
                .labels
                .get("org.opencontainers.image.version")
                .map(String::as_str),
            Some(tag)
        );
        // The layers' content, not where each archive happens to store them.
        layers.push(
            image
                .layers()
                .iter()
                .map(|l| (l.digest.clone(), l.diff_id.clone(), l.size))
                .collect::<Vec<_>>(),
        );
        digests.push(image.digest().to_string());
    }
    assert!(
        layers.windows(2).all(|w| w[0] == w[1]),
        "the agent tags differ in their files"
    );
    digests.sort();
    digests.dedup();
    assert_eq!(digests.len(), 5, "two agent tags are the same image");
}

#[test]
fn the_operator_and_traffic_images_have_the_documented_config() {
    let operator = open(OPERATOR);
    assert_eq!(operator.config().entrypoint, ["/usr/bin/meshlet-operator"]);
    assert_eq!(operator.config().user.as_deref(), Some("65532:65532"));
    assert!(operator.config().env.is_empty());
    let traffic = open(TRAFFIC);
    assert_eq!(traffic.config().entrypoint, ["/usr/bin/mesh-traffic"]);
}

#[test]
fn the_agent_image_holds_its_two_binaries_their_libraries_and_empty_mount_points() {
    let image = open(&format!("{AGENT}:v0.1.0"));
    let dir = unpack(&image);
    let root = dir.path().join("rootfs");
    let files = files(&root);
    let (binaries, others): (Vec<_>, Vec<_>) =
        files.iter().partition(|f| f.starts_with("/usr/bin/"));
    assert_eq!(binaries, ["/usr/bin/meshlet-agent", "/usr/bin/meshletctl"]);
    assert!(
        others
            .iter()
            .all(|f| f.starts_with("/lib") || f.starts_with("/usr/lib")),
        "files beside binaries and libraries: {others:?}"
    );
    assert!(
        others.iter().any(|f| f.contains("/libc.so")),
        "no libc: {others:?}"
    );
    for d in ["sys/fs/bpf", "sys/fs/cgroup", "run", "tmp", "proc", "dev"] {
        let path = root.join(d);
        assert!(path.is_dir(), "/{d} missing");
        assert_eq!(
            std::fs::read_dir(&path).expect("list").count(),
            0,
            "/{d} not empty"
        );
    }
    assert_eq!(
        std::fs::metadata(root.join("tmp")).expect("stat").mode() & 0o7777,
        0o1777
    );
}

#[test]
fn the_operator_image_has_a_nonroot_user_and_the_debian_ca_bundle() {
    let image = open(OPERATOR);
    let dir = unpack(&image);
    let root = dir.path().join("rootfs");
    let passwd = std::fs::read_to_string(root.join("etc/passwd")).expect("/etc/passwd");
    assert!(
        passwd
            .lines()
            .any(|l| l.starts_with("nonroot:x:65532:65532:")),
        "{passwd}"
    );
    let group = std::fs::read_to_string(root.join("etc/group")).expect("/etc/group");
    assert!(group.lines().any(|l| l == "nonroot:x:65532:"), "{group}");
    let certs = std::fs::read(root.join("etc/ssl/certs/ca-certificates.crt")).expect("CA bundle");
    assert_eq!(
        certs,
        std::fs::read("/etc/ssl/certs/ca-certificates.crt").expect("host CA bundle"),
        "not Debian's ca-certificates bundle"
    );
    assert!(root.join("tmp").is_dir());
    assert!(root.join("usr/bin/meshlet-operator").is_file());
}

#[test]
fn the_bundle_image_is_olm_manifests_and_metadata_labelled_with_the_annotations() {
    #[derive(serde::Deserialize)]
    struct Annotations {
        annotations: BTreeMap<String, String>,
    }
    let olm = xtask::workspace_root().join("olm");
    let text = std::fs::read_to_string(olm.join("metadata/annotations.yaml")).expect("read");
    let annotations: Annotations = serde_saphyr::from_str(&text).expect("annotations.yaml");
    assert!(!annotations.annotations.is_empty());

    let image = open(BUNDLE);
    assert_eq!(image.config().labels, annotations.annotations);
    assert!(image.config().entrypoint.is_empty() && image.config().cmd.is_empty());

    let dir = unpack(&image);
    let root = dir.path().join("rootfs");
    let files = files(&root);
    assert!(
        files
            .iter()
            .all(|f| f.starts_with("/manifests/") || f.starts_with("/metadata/")),
        "{files:?}"
    );
    for sub in ["manifests", "metadata"] {
        for entry in std::fs::read_dir(olm.join(sub)).expect("list") {
            let path = entry.expect("entry").path();
            let name = path
                .file_name()
                .expect("name")
                .to_string_lossy()
                .into_owned();
            let inside = std::fs::read(root.join(sub).join(&name))
                .unwrap_or_else(|e| panic!("/{sub}/{name} missing from the bundle image: {e}"));
            assert!(
                inside == std::fs::read(&path).expect("read"),
                "/{sub}/{name} differs from olm/"
            );
        }
    }
}

/// Runs `args` in the unpacked `image` with runc, as the image's user, with nothing but the
/// image in the root filesystem; returns (success, stdout, stderr).
fn run_in(image: &Image, args: &[&str]) -> (bool, String, String) {
    static N: AtomicUsize = AtomicUsize::new(0);
    assert!(
        is_root(),
        "running images needs root (runc); run the tests as root"
    );
    let dir = unpack(image);
    let bundle = dir.path();
    let spec = Command::new("runc")
        .args(["spec", "--bundle"])
        .arg(bundle)
        .status()
        .expect("runc is not installed (apt-get install runc, or run hack/setup.sh)");
    assert!(spec.success(), "runc spec failed");
    let path = bundle.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).expect("config.json")).expect("json");
    let (uid, gid) = match image.config().user.as_deref() {
        None => (0, 0),
        Some(user) => {
            let (u, g) = user.split_once(':').unwrap_or((user, user));
            (
                u.parse::<u32>().expect("numeric uid"),
                g.parse::<u32>().expect("numeric gid"),
            )
        }
    };
    let process = &mut config["process"];
    process["terminal"] = false.into();
    process["args"] = args.into();
    process["env"] = image.config().env.clone().into();
    process["user"] = serde_json::json!({"uid": uid, "gid": gid});
    config["root"] = serde_json::json!({"path": "rootfs", "readonly": true});
    std::fs::write(&path, serde_json::to_vec(&config).expect("json")).expect("write");

    let id = format!(
        "meshlet-images-test-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    );
    let out = Command::new("runc")
        .arg("--root")
        .arg(bundle.join("state"))
        .args(["run", "--bundle"])
        .arg(bundle)
        .arg(&id)
        .output()
        .expect("run runc");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|l| l.split_whitespace().nth(1))
            == Some("0")
    })
}

fn assert_prints(image: &Image, args: &[&str], expected: &str) {
    let (ok, stdout, stderr) = run_in(image, args);
    assert!(
        ok && stdout.trim() == expected,
        "{} in {}: expected {expected:?}, got {stdout:?} (stderr: {stderr})",
        args.join(" "),
        image.reference()
    );
}

#[test]
fn the_agent_and_meshletctl_run_from_the_agent_image_alone() {
    let image = open(&format!("{AGENT}:v0.1.0"));
    assert_prints(
        &image,
        &["/usr/bin/meshlet-agent", "--version"],
        "meshlet-agent 0.1.0",
    );
    assert_prints(
        &image,
        &["/usr/bin/meshletctl", "--version"],
        "meshletctl 0.1.0",
    );
}

#[test]
fn the_operator_runs_from_its_image_alone_as_the_nonroot_user() {
    let image = open(OPERATOR);
    assert_prints(
        &image,
        &["/usr/bin/meshlet-operator", "--version"],
        "meshlet-operator 0.1.0",
    );
}

#[test]
fn the_traffic_program_runs_from_its_image_alone() {
    let image = open(TRAFFIC);
    assert_prints(
        &image,
        &["/usr/bin/mesh-traffic", "--version"],
        "mesh-traffic 0.1.0",
    );
}

/// Measured on the release images (stripped, glibc's four files): agent 13.5 MiB, operator
/// 8.5 MiB compressed. The bounds leave about a sixth for growth; a `--profile dev` build
/// (21.7 and 12.7 MiB) or host libraries beyond what `ldd` lists break them.
#[test]
fn the_agent_and_operator_images_stay_small() {
    let bounds = [
        (format!("{AGENT}:v0.1.0"), 16 * MIB),
        (OPERATOR.to_string(), 10 * MIB),
    ];
    for (reference, bound) in bounds {
        let archive = meshlet_oci::archive_path(&images_dir(), &reference);
        open(&reference);
        let size = std::fs::metadata(&archive).expect("stat").len();
        assert!(
            size < bound,
            "{reference} is {:.1} MiB, more than {} MiB (the bound is for release images: \
             `cargo xtask images`, not `--profile dev`)",
            size as f64 / MIB as f64,
            bound / MIB
        );
    }
}
