//! Archives written by `ImageBuilder` read back with `Image`, unpack with the OCI layer
//! semantics, and are accepted by skopeo.

use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::Path;
use std::process::Command;

use meshlet_oci::{Image, ImageBuilder, ImageConfig, Layer, OciError, archive_path};

const REF: &str = "meshlet.local/test:v1";

fn config() -> ImageConfig {
    ImageConfig {
        entrypoint: vec!["/usr/bin/app".into()],
        cmd: vec!["serve".into()],
        env: vec!["MODE=test".into()],
        user: Some("65532:65532".into()),
        working_dir: Some("/work".into()),
        labels: [(
            "org.opencontainers.image.version".to_string(),
            "v1".to_string(),
        )]
        .into(),
    }
}

fn base_layer(host_file: &Path) -> Layer {
    Layer::new()
        .file("/usr/bin/app", host_file, 0o4755)
        .bytes("/etc/motd", "hello\n", 0o600)
        .dir("/tmp", 0o1777)
        .symlink("/bin", "usr/bin")
        .hard_link("/usr/bin/app-again", "/usr/bin/app")
        .owner(1000, 1001)
        .bytes("/home/user/notes", "mine\n", 0o640)
}

fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path)
        .expect("stat")
        .permissions()
        .mode()
        & 0o7777
}

#[test]
fn a_written_image_reads_back_with_its_reference_config_and_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let host = dir.path().join("app");
    std::fs::write(&host, b"#!/bin/sh\necho app\n").expect("write");
    let archive = archive_path(dir.path(), REF);
    let written = ImageBuilder::new(REF)
        .config(config())
        .layer(base_layer(&host))
        .write(&archive)
        .expect("write image");
    assert_eq!(
        written.archive_bytes,
        std::fs::metadata(&archive).expect("stat").len()
    );
    assert_eq!(written.unpacked_bytes, 19 + 6 + 5);

    let image = Image::open(&archive).expect("open");
    assert_eq!(image.reference(), REF);
    assert_eq!(image.config(), &config());
    assert_eq!(image.digest(), written.digest);
    assert_eq!(image.layers().len(), 1);

    let rootfs = dir.path().join("rootfs");
    image.unpack(&rootfs).expect("unpack");
    assert_eq!(
        std::fs::read_to_string(rootfs.join("usr/bin/app")).expect("read"),
        "#!/bin/sh\necho app\n"
    );
    assert_eq!(mode(&rootfs.join("usr/bin/app")), 0o4755);
    assert_eq!(mode(&rootfs.join("etc/motd")), 0o600);
    assert_eq!(mode(&rootfs.join("tmp")), 0o1777);
    assert_eq!(
        std::fs::read_link(rootfs.join("bin")).expect("readlink"),
        Path::new("usr/bin")
    );
    let app = std::fs::metadata(rootfs.join("usr/bin/app")).expect("stat");
    let again = std::fs::metadata(rootfs.join("usr/bin/app-again")).expect("stat");
    assert_eq!(
        (app.ino(), app.nlink()),
        (again.ino(), 2),
        "not one hard-linked file"
    );
    let notes = std::fs::metadata(rootfs.join("home/user/notes")).expect("stat");
    assert_eq!((notes.uid(), notes.gid()), (1000, 1001));
    assert_eq!((app.uid(), app.gid()), (0, 0));
}

#[test]
fn the_same_inputs_give_the_same_archive_bytes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let host = dir.path().join("app");
    std::fs::write(&host, b"binary").expect("write");
    let write = |name: &str| {
        let path = dir.path().join(name);
        ImageBuilder::new(REF)
            .config(config())
            .layer(base_layer(&host))
            .write(&path)
            .expect("write");
        std::fs::read(path).expect("read")
    };
    let (a, b) = (write("a.tar"), write("b.tar"));
    assert!(a == b, "two builds of the same image differ");
}

#[test]
fn upper_layers_replace_files_and_whiteouts_delete_lower_ones() {
    let dir = tempfile::tempdir().expect("tempdir");
    let archive = dir.path().join("layers.tar");
    let lower = Layer::new()
        .bytes("/etc/keep", "lower", 0o644)
        .bytes("/etc/replaced", "lower", 0o644)
        .bytes("/etc/deleted", "lower", 0o644)
        .bytes("/var/cache/a", "lower", 0o644)
        .bytes("/var/cache/sub/b", "lower", 0o644)
        .bytes("/was-a-dir/x", "lower", 0o644);
    let upper = Layer::new()
        .bytes("/etc/replaced", "upper", 0o644)
        .bytes("/etc/.wh.deleted", "", 0o644)
        .bytes("/var/cache/.wh..wh..opq", "", 0o644)
        .bytes("/var/cache/fresh", "upper", 0o644)
        .bytes("/was-a-dir", "now a file", 0o644);
    ImageBuilder::new(REF)
        .layer(lower)
        .layer(upper)
        .write(&archive)
        .expect("write");

    let rootfs = dir.path().join("rootfs");
    Image::open(&archive)
        .expect("open")
        .unpack(&rootfs)
        .expect("unpack");
    let read = |p: &str| std::fs::read_to_string(rootfs.join(p)).ok();
    assert_eq!(read("etc/keep").as_deref(), Some("lower"));
    assert_eq!(read("etc/replaced").as_deref(), Some("upper"));
    assert_eq!(read("etc/deleted"), None);
    assert!(
        !rootfs.join("etc/.wh.deleted").exists(),
        "the whiteout itself was written"
    );
    let mut cache: Vec<_> = std::fs::read_dir(rootfs.join("var/cache"))
        .expect("list")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    cache.sort();
    assert_eq!(cache, ["fresh"], "the opaque directory kept lower entries");
    assert_eq!(read("was-a-dir").as_deref(), Some("now a file"));
}

#[test]
fn a_directory_entry_replaces_a_lower_symlink_pointing_outside_the_root() {
    let dir = tempfile::tempdir().expect("tempdir");
    let outside = dir.path().join("outside");
    std::fs::create_dir(&outside).expect("mkdir");
    let archive = dir.path().join("escape.tar");
    let lower = Layer::new().symlink("/evil", outside.to_str().expect("utf-8"));
    let upper = Layer::new().bytes("/evil/planted", "x", 0o644);
    ImageBuilder::new(REF)
        .layer(lower)
        .layer(upper)
        .write(&archive)
        .expect("write");
    let rootfs = dir.path().join("rootfs");
    Image::open(&archive)
        .expect("open")
        .unpack(&rootfs)
        .expect("unpack");
    assert!(
        !outside.join("planted").exists(),
        "a layer wrote outside the root filesystem"
    );
    assert!(rootfs.join("evil/planted").is_file());
    assert!(!rootfs.join("evil").is_symlink());
}

#[test]
fn a_corrupted_layer_is_refused_with_its_digest() {
    let dir = tempfile::tempdir().expect("tempdir");
    let archive = dir.path().join("corrupt.tar");
    ImageBuilder::new(REF)
        .layer(Layer::new().bytes("/data", vec![7u8; 4096], 0o644))
        .write(&archive)
        .expect("write");
    let image = Image::open(&archive).expect("open");
    let layer = image.layers()[0].digest.clone();
    // Flip one byte inside the layer blob (the gzip trailer: its CRC, so gunzip still runs).
    let mut bytes = std::fs::read(&archive).expect("read");
    let name = format!("blobs/sha256/{}", &layer["sha256:".len()..]);
    let name_at = (0..bytes.len())
        .step_by(512)
        .find(|&at| bytes[at..].starts_with(name.as_bytes()))
        .expect("blob entry");
    let data_at = (name_at / 512 + 1) * 512;
    let end = data_at + usize::try_from(image.layers()[0].size).expect("size");
    bytes[end - 5] ^= 0xff;
    std::fs::write(&archive, bytes).expect("write");

    let err = Image::open(&archive)
        .expect("open (only layers are corrupt)")
        .unpack(&dir.path().join("rootfs"))
        .expect_err("a corrupt layer unpacked");
    let text = err.to_string();
    assert!(
        matches!(
            err,
            OciError::BlobMismatch { .. } | OciError::ReadLayer { .. }
        ),
        "{text}"
    );
    assert!(text.contains(&layer[..20]), "{text}");
}

#[test]
fn an_archive_without_a_reference_or_with_two_images_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let not_an_image = dir.path().join("plain.tar");
    let mut tar = tar::Builder::new(std::fs::File::create(&not_an_image).expect("create"));
    let mut header = tar::Header::new_gnu();
    header.set_size(2);
    header.set_mode(0o644);
    tar.append_data(&mut header, "hello", &b"hi"[..])
        .expect("append");
    tar.finish().expect("finish");
    let err = Image::open(&not_an_image).expect_err("a plain tar opened");
    assert!(err.to_string().contains("index.json"), "{err}");
}

#[test]
fn skopeo_reads_the_archive_with_its_config() {
    let dir = tempfile::tempdir().expect("tempdir");
    let archive = dir.path().join("skopeo.tar");
    ImageBuilder::new(REF)
        .config(config())
        .layer(Layer::new().bytes("/usr/bin/app", "x", 0o755))
        .write(&archive)
        .expect("write");
    let out = Command::new("skopeo")
        .arg("inspect")
        .arg(format!("oci-archive:{}", archive.display()))
        .output()
        .expect("skopeo is not installed (apt-get install skopeo, or run hack/setup.sh)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "skopeo inspect failed: {}{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    let inspected: serde_json::Value = serde_json::from_str(&text).expect("skopeo json");
    let image = Image::open(&archive).expect("open");
    assert_eq!(inspected["Digest"], image.digest());
    assert_eq!(inspected["Env"], serde_json::json!(["MODE=test"]));
    assert_eq!(
        inspected["Labels"]["org.opencontainers.image.version"],
        "v1"
    );
    assert_eq!(inspected["Os"], "linux");
}
