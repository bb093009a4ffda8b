//! Build script: compiles the eBPF C programs and the admin API protos.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    compile_ebpf();
    compile_admin_protos();
}

/// Compiles `ebpf/sockaddr.c` once per map layout into `$OUT_DIR/sockaddr-layout<N>.o`.
fn compile_ebpf() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let src_dir = manifest.join("..").join("ebpf");
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    for file in ["sockaddr.c", "meshlet.h"] {
        println!("cargo:rerun-if-changed={}", src_dir.join(file).display());
    }
    println!("cargo:rerun-if-env-changed=CLANG");
    let clang = std::env::var("CLANG").unwrap_or_else(|_| "clang".to_owned());
    if !Path::new("/usr/include/bpf/bpf_helpers.h").exists() {
        panic!(
            "/usr/include/bpf/bpf_helpers.h is missing: install the Debian package `libbpf-dev` \
             (apt-get install clang libbpf-dev)"
        );
    }
    for layout in [1, 2] {
        let out = out_dir.join(format!("sockaddr-layout{layout}.o"));
        let status = Command::new(&clang)
            .args(["-target", "bpf", "-O2", "-g", "-Wall", "-Werror"])
            .arg(format!("-DMESHLET_LAYOUT={layout}"))
            .arg(format!("-I{}", multiarch_include().display()))
            .arg("-c")
            .arg(src_dir.join("sockaddr.c"))
            .arg("-o")
            .arg(&out)
            .status();
        match status {
            Ok(s) if s.success() => {}
            Ok(s) => panic!("clang failed ({s}) compiling ebpf/sockaddr.c for layout {layout}"),
            Err(e) => panic!(
                "cannot run `{clang}` ({e}): install the Debian packages `clang` and `libbpf-dev` \
                 (apt-get install clang libbpf-dev), or set CLANG to a clang binary"
            ),
        }
    }
}

/// Directory holding `asm/types.h` on Debian (needed by `linux/types.h` under `-target bpf`).
fn multiarch_include() -> PathBuf {
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_else(|_| "x86_64".to_owned());
    let triple = match arch.as_str() {
        "aarch64" => "aarch64-linux-gnu",
        other => return PathBuf::from(format!("/usr/include/{other}-linux-gnu")),
    };
    PathBuf::from(format!("/usr/include/{triple}"))
}

/// Admin gRPC API (`proto/admin.proto`) for the agent's server and `meshletctl`; needs `protoc`
/// (Debian package `protobuf-compiler`, installed by `hack/setup.sh`).
fn compile_admin_protos() {
    println!("cargo:rerun-if-changed=proto/admin.proto");
    let built = tonic_prost_build::configure()
        .type_attribute(".", "#[derive(serde::Serialize)]")
        .compile_protos(&["proto/admin.proto"], &["proto"]);
    if let Err(e) = built {
        panic!(
            "failed to compile proto/admin.proto ({e}); install protoc: apt-get install protobuf-compiler"
        );
    }
}
