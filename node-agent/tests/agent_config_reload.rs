//! The standalone file at run time: a bad rewrite is refused with file:line:field while traffic
//! keeps its last good routes; fixing the file applies the change.

mod agent_support;

use std::time::{Duration, Instant};

use agent_support::{AgentEnv, count, svc, yaml};

const VIP: &str = "127.100.0.1";

fn backends_hit(env: &AgentEnv) -> Vec<String> {
    let report = env.run_traffic(
        &[18081, 18082],
        &[(VIP.into(), 80, vec![18081, 18082])],
        100,
    );
    assert_eq!(count(&report, "fail"), 0, "{report}");
    let mut hit: Vec<String> = report["by_backend"]
        .as_object()
        .expect("by_backend")
        .keys()
        .cloned()
        .collect();
    hit.sort();
    hit
}

#[test]
fn a_bad_rewrite_is_refused_with_its_location_and_a_fix_is_applied() {
    let mut env = AgentEnv::new("reload");
    env.write_source(&yaml(&[svc("web", VIP, 80, &[18081])], 0));
    env.start_agent(2);
    let first = env.wait_ready();
    assert_eq!(backends_hit(&env), ["18081"]);

    // Line 8 holds the endpoint port.
    let bad = yaml(&[svc("web", VIP, 80, &[18082])], 0).replace("port: 18082", "port: 70000");
    assert_eq!(
        bad.lines().nth(7).map(str::trim),
        Some("port: 70000"),
        "{bad}"
    );
    env.write_source(&bad);
    let want = format!(
        "{}:8: services[0].endpoints[0].port: must be 1..65535, got 70000",
        env.source().display()
    );
    let refused = env.wait_status("the refusal", |s| {
        s["last_error"].as_str().is_some_and(|e| e.contains(&want))
    });
    assert_eq!(
        refused["syncs"], first["syncs"],
        "a refused file was applied"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while !env.log().contains(&want) {
        assert!(
            Instant::now() < deadline,
            "refusal not logged:\n{}",
            env.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        backends_hit(&env),
        ["18081"],
        "traffic changed after a refused file"
    );

    // Not YAML at all: refused too, still serving the last good state.
    env.write_source("services: [\n  {name: web\n");
    env.wait_status("the YAML refusal", |s| {
        s["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("services.yaml:"))
    });
    assert_eq!(backends_hit(&env), ["18081"]);

    env.write_source(&yaml(&[svc("web", VIP, 80, &[18082])], 0));
    let fixed = env.wait_status("the fix to be applied", |s| {
        s["last_error"] == "" && s["syncs"].as_u64() > first["syncs"].as_u64()
    });
    assert_eq!(fixed["ready"], true);
    assert_eq!(backends_hit(&env), ["18082"]);
    assert_eq!(env.map_services(), env.source_services());
}
