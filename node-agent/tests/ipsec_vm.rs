//! IPsec data path in a VM: `hack/vm/run.sh` boots Debian's kernel in qemu (software
//! emulation; our host kernels have no ESP) with this build of the agent, and runs three
//! node namespaces with agents in IPsec-only mode. Asserts every check the VM reports:
//! traffic is ESP (capture and counters), a key rotation under TCP and ping traffic loses no
//! packet and no connection, a restart adopts without a plaintext packet, an algorithm the
//! kernel lacks is reported and halts, 1,000 peers are installed, teardown leaves nothing.

use std::process::Command;

#[test]
fn ipsec_in_a_vm_encrypts_rotates_restarts_and_tears_down_without_loss() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let started = std::time::Instant::now();
    let out = Command::new("bash")
        .arg(format!("{root}/hack/vm/run.sh"))
        .arg(env!("CARGO_BIN_EXE_meshlet-agent"))
        .output()
        .expect("run hack/vm/run.sh (needs bash)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    eprintln!("{stderr}");
    println!("VM test took {:.1}s", started.elapsed().as_secs_f64());
    assert!(
        out.status.code() != Some(2),
        "the VM could not be built (missing package or kernel download); see above: {stderr}"
    );
    for check in [
        "enable:",
        "rotation:",
        "restart:",
        "bad algorithm:",
        "tcp: one connection kept",
        "ping: 0 lost",
        "xfrm: 0 errors",
        "capture:",
        "counters:",
        "scale: 1000 peers",
        "teardown:",
    ] {
        assert!(
            stdout.contains(&format!("VM-RESULT: PASS {check}")),
            "the VM did not report `{check}` as passed:\n{stdout}"
        );
    }
    assert!(
        !stdout.contains("VM-RESULT: FAIL"),
        "the VM reported a failure:\n{stdout}"
    );
    assert!(out.status.success(), "hack/vm/run.sh failed:\n{stdout}");
}
