//! Build script: compiles the eBPF C programs and the admin API protos.

fn main() {
    compile_admin_protos();
}

/// Admin gRPC API (`proto/admin.proto`) for the agent's server and `meshletctl`; needs `protoc`
/// (Debian package `protobuf-compiler`, installed by `hack/setup.sh`).
fn compile_admin_protos() {
    println!("cargo:rerun-if-changed=proto/admin.proto");
    if let Err(e) = tonic_prost_build::compile_protos("proto/admin.proto") {
        panic!("failed to compile proto/admin.proto ({e}); install protoc: apt-get install protobuf-compiler");
    }
}
