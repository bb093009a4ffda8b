//! The netlink xfrm implementation against the running kernel, inside a private network
//! namespace: policies are written, found as the agent's own, repointed and removed without
//! touching a foreign policy; an SA the kernel cannot build fails with a message naming the
//! algorithm and the modules to load (our host kernels have no ESP; with ESP the SA must
//! round-trip instead).

use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;

use meshlet_agent::ipsec::xfrm::{PolicyId, PolicySpec, SaId, SaSpec, Xfrm};
use meshlet_agent::ipsec::{Algorithm, netlink::NetlinkXfrm, reqid_for};

fn ip(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 1, 0, last))
}

/// Run `f` on a thread that has its own network namespace (gone when the thread ends).
fn in_private_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN) to create a network namespace"
    );
    std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
            .expect("unshare(CLONE_NEWNET): the kernel must support network namespaces");
        f()
    })
    .join()
    .expect("test thread")
}

fn ip_xfrm(args: &[&str]) -> String {
    let out = Command::new("ip")
        .arg("xfrm")
        .args(args)
        .output()
        .expect("run ip (package iproute2)");
    assert!(
        out.status.success(),
        "ip xfrm {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn policies_are_written_adopted_repointed_and_removed_leaving_foreign_ones() {
    in_private_netns(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            // A policy another tool owns.
            ip_xfrm(&[
                "policy",
                "add",
                "src",
                "10.1.0.1/32",
                "dst",
                "10.1.0.9/32",
                "dir",
                "out",
                "tmpl",
                "proto",
                "esp",
                "mode",
                "transport",
                "reqid",
                "7",
            ]);
            let mut x = NetlinkXfrm::connect().expect("xfrm netlink socket (module xfrm_user)");
            assert!(x.list_own().await.expect("list").policies.is_empty());
            let id = PolicyId {
                src: ip(1),
                dst: ip(2),
            };
            x.install_policy(&PolicySpec {
                id,
                reqid: reqid_for(1),
            })
            .await
            .expect("install policy");
            // A new connection (a restarted agent) finds it as its own, with its generation.
            let mut again = NetlinkXfrm::connect().expect("second socket");
            let own = again.list_own().await.expect("list");
            assert_eq!(own.policies.len(), 1, "{own:?}");
            assert_eq!(own.policies.get(&id), Some(&reqid_for(1)));
            // Switching repoints the same policy atomically.
            again
                .install_policy(&PolicySpec {
                    id,
                    reqid: reqid_for(2),
                })
                .await
                .expect("repoint");
            let own = again.list_own().await.expect("list");
            assert_eq!(own.policies.get(&id), Some(&reqid_for(2)));
            assert_eq!(ip_xfrm(&["policy"]).matches("dir out").count(), 2);
            again.delete_policy(&id).await.expect("delete");
            assert!(again.list_own().await.expect("list").policies.is_empty());
            let left = ip_xfrm(&["policy"]);
            assert!(
                left.contains("10.1.0.9/32") && left.matches("dir out").count() == 1,
                "the foreign policy must stay: {left}"
            );
        });
    });
}

#[test]
fn an_sa_the_kernel_cannot_build_fails_with_a_message_naming_what_to_load() {
    in_private_netns(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let mut x = NetlinkXfrm::connect().expect("xfrm netlink socket (module xfrm_user)");
            let id = SaId {
                src: ip(1),
                dst: ip(2),
                spi: 0x1234,
            };
            let sa = SaSpec {
                id,
                reqid: reqid_for(1),
                algorithm: Algorithm::AesGcm,
                key: vec![7; Algorithm::AesGcm.key_len()],
            };
            match x.install_state(&sa).await {
                Err(e) => {
                    let msg = e.to_string();
                    assert!(
                        msg.contains("rfc4106(gcm(aes))")
                            && (msg.contains("load its modules") || msg.contains("no ESP support")),
                        "unclear error: {msg}"
                    );
                    assert!(x.list_own().await.expect("list").states.is_empty());
                }
                Ok(()) => {
                    // A kernel with ESP: the SA must be found as our own and removable.
                    let own = x.list_own().await.expect("list");
                    assert_eq!(own.states.get(&id).map(|s| s.reqid), Some(reqid_for(1)));
                    x.delete_state(&id).await.expect("delete");
                    assert!(x.list_own().await.expect("list").states.is_empty());
                }
            }
        });
    });
}
