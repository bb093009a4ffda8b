//! Kernel tests of the data plane's life cycle: warm restart with link ids unchanged,
//! migrations between layouts under traffic, refusal of an unknown layout, the node lock, and
//! a reset that leaves nothing behind.

mod dataplane_support;

use std::path::Path;

use dataplane_support::{TestEnv, Traffic, backends, bulk_state, state, svc};
use meshlet_agent::dataplane::{
    self, Dataplane, DataplaneError, RestartKind, StartupDecision, sys,
};
use meshlet_agent::model::{DesiredState, Protocol};

fn pins(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for sub in ["", "maps", "links"] {
        if let Ok(rd) = std::fs::read_dir(root.join(sub)) {
            for e in rd.flatten() {
                out.push(format!("{sub}/{}", e.file_name().to_string_lossy()));
            }
        }
    }
    out.sort();
    out
}

fn link_ids(dp: &Dataplane) -> Vec<u32> {
    dp.programs().iter().map(|p| p.link_id).collect()
}

/// Link ids as the kernel resolves them from the pins, without a `Dataplane`.
fn link_ids_of(env: &TestEnv) -> Vec<u32> {
    let links = env.cfg.bpffs_root.join("links");
    [
        "connect4",
        "connect6",
        "sendmsg4",
        "sendmsg6",
        "recvmsg4",
        "recvmsg6",
        "getpeername4",
        "getpeername6",
    ]
    .iter()
    .map(|name| {
        let fd = sys::obj_get(&links.join(name)).expect("open pinned link");
        sys::link_facts(std::os::fd::AsFd::as_fd(&fd))
            .expect("link info")
            .id
    })
    .collect()
}

fn with_weight_one(s: &DesiredState) -> DesiredState {
    let mut out = s.clone();
    for bes in out.services.values_mut() {
        for b in bes {
            b.weight = 1;
        }
    }
    out
}

#[test]
fn restarting_in_process_adopts_the_maps_keeps_link_ids_and_never_drops_a_connection() {
    let mut env = TestEnv::new("restart", 2);
    let key = svc("127.100.1.1", 8080, Protocol::Tcp);
    let bes = backends("127.0.0.1", 32000, 3);
    let mut desired = bulk_state(200, 4, 101);
    desired.services.insert(key, bes.clone());
    let (mut dp, first) = Dataplane::start(env.cfg.clone()).expect("first start");
    assert_eq!(first.kind, RestartKind::Fresh);
    dp.apply(&desired).expect("apply");
    let ids = link_ids(&dp);
    assert!(
        ids.iter().all(|id| *id != 0),
        "every program has a link: {ids:?}"
    );
    let running = env.start_traffic(&Traffic::to(key, &bes));
    std::thread::sleep(std::time::Duration::from_millis(300));
    drop(dp);
    for round in 0..10 {
        assert_eq!(
            dataplane::preflight(&env.cfg).expect("preflight"),
            StartupDecision::SameLayout { layout: 2 }
        );
        let (dp, report) = Dataplane::start(env.cfg.clone()).expect("warm start");
        assert_eq!(report.kind, RestartKind::Warm, "round {round}");
        assert!(report.link_ids_unchanged, "round {round}");
        assert_eq!(link_ids(&dp), ids, "round {round}");
        assert_eq!(dp.observed().expect("observed"), desired, "round {round}");
        drop(dp);
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    let seen = running.stop();
    assert!(
        seen.ok > 20,
        "too little traffic to prove anything: {seen:?}"
    );
    assert_eq!(
        seen.fail, 0,
        "connections failed during restarts: {}",
        seen.errors
    );
}

fn migrate_under_traffic(tag: &str, from: u32, to: u32) {
    let mut env = TestEnv::new(tag, from);
    let key = svc("127.100.2.1", 8080, Protocol::Tcp);
    let bes = backends("127.0.0.1", 33000, 3);
    let mut desired = bulk_state(1000, 5, 102);
    desired.services.insert(key, bes.clone());
    let (mut dp, _) = Dataplane::start(env.cfg.clone()).expect("start old layout");
    dp.apply(&desired).expect("apply");
    let before = dp.observed().expect("observed");
    let ids = link_ids(&dp);
    drop(dp);
    let running = env.start_traffic(&Traffic::to(key, &bes));
    std::thread::sleep(std::time::Duration::from_millis(300));
    let cfg = env.with_layout(to);
    assert_eq!(
        dataplane::preflight(&cfg).expect("preflight"),
        StartupDecision::Migrate { from, to }
    );
    let (dp, report) = Dataplane::start(cfg).expect("migrate");
    std::thread::sleep(std::time::Duration::from_millis(300));
    let seen = running.stop();
    assert_eq!(report.kind, RestartKind::Migrated);
    assert!(report.link_ids_unchanged);
    assert_eq!(link_ids(&dp), ids);
    assert_eq!(
        seen.fail, 0,
        "connections failed during migration: {}",
        seen.errors
    );
    assert!(seen.ok > 10, "{seen:?}");
    assert_eq!(dp.observed().expect("observed"), with_weight_one(&before));
    let entries: Vec<_> = dp.maps().expect("maps");
    let backend = entries
        .iter()
        .find(|m| m.name == "backend")
        .expect("backend map");
    assert_eq!(backend.layout, to);
    assert_eq!(backend.entries, 5003);
    let left = pins(&env.cfg.bpffs_root);
    assert!(
        !left.iter().any(|p| p.ends_with("_next")),
        "temporary pins left: {left:?}"
    );
    // Serves new connections after the old process's maps are gone.
    let after = env.run_traffic(&Traffic::to(key, &bes));
    assert_eq!(after.fail, 0, "{}", after.errors);
}

#[test]
fn migrating_from_layout_one_to_two_under_traffic_keeps_every_entry_and_connection() {
    migrate_under_traffic("mig12", 1, 2);
}

#[test]
fn migrating_from_layout_two_to_one_under_traffic_keeps_every_entry_and_connection() {
    migrate_under_traffic("mig21", 2, 1);
}

#[test]
fn an_unknown_pinned_layout_is_refused_without_changing_anything() {
    let env = TestEnv::new("unknown", 2);
    let key = svc("127.100.3.1", 8080, Protocol::Udp);
    let bes = backends("127.0.0.1", 34000, 2);
    let (mut dp, _) = Dataplane::start(env.cfg.clone()).expect("start");
    dp.apply(&state(&[(key, bes.clone())])).expect("apply");
    let ids = link_ids(&dp);
    drop(dp);
    let meta = sys::RawMap::open(&env.cfg.bpffs_root.join("meta")).expect("open meta");
    meta.update(&1u32.to_ne_bytes(), &99u32.to_ne_bytes())
        .expect("write layout 99");
    let before = pins(&env.cfg.bpffs_root);

    match dataplane::preflight(&env.cfg).expect("preflight") {
        StartupDecision::Unknown { found, .. } => assert_eq!(found, 99),
        other => panic!("preflight said {other:?}"),
    }
    match Dataplane::start(env.cfg.clone()) {
        Err(DataplaneError::UnknownLayout { found, reason }) => {
            assert_eq!(found, 99);
            assert!(reason.contains("99"), "{reason}");
        }
        Err(other) => panic!("unexpected error {other}"),
        Ok(_) => panic!("start adopted layout 99"),
    }
    assert_eq!(pins(&env.cfg.bpffs_root), before);
    let mut v = [0u8; 4];
    assert!(meta.lookup(&1u32.to_ne_bytes(), &mut v).expect("read meta"));
    assert_eq!(u32::from_ne_bytes(v), 99, "meta was rewritten");
    assert_eq!(link_ids_of(&env), ids, "links changed");
    let seen = env.run_traffic(&Traffic::to(key, &bes));
    assert_eq!(seen.fail, 0, "traffic stopped: {}", seen.errors);
}

#[test]
fn a_second_start_on_the_same_node_fails_naming_the_holder() {
    let env = TestEnv::new("lock", 1);
    let (_dp, _) = Dataplane::start(env.cfg.clone()).expect("first start");
    match Dataplane::start(env.cfg.clone()) {
        Err(e @ DataplaneError::LockHeld { holder, .. }) => {
            assert_eq!(holder, std::process::id());
            assert!(
                e.to_string().contains(&std::process::id().to_string()),
                "{e}"
            );
        }
        Err(other) => panic!("unexpected error {other}"),
        Ok(_) => panic!("two data planes started on one lock"),
    }
}

#[test]
fn reset_detaches_every_link_and_leaves_no_pin() {
    let env = TestEnv::new("reset", 2);
    let key = svc("127.100.4.1", 8080, Protocol::Tcp);
    let bes = backends("127.0.0.1", 35000, 2);
    let (mut dp, _) = Dataplane::start(env.cfg.clone()).expect("start");
    dp.apply(&state(&[(key, bes.clone())])).expect("apply");
    let ids = link_ids(&dp);
    let progs: Vec<u32> = dp.programs().iter().map(|p| p.id).collect();
    assert!(progs.iter().all(|id| *id != 0));
    drop(dp);
    dataplane::reset(&env.cfg).expect("reset");
    assert!(
        !env.cfg.bpffs_root.exists(),
        "pins left: {:?}",
        pins(&env.cfg.bpffs_root)
    );
    for id in ids {
        assert!(
            sys::link_fd_by_id(id).is_err(),
            "link {id} still exists after reset"
        );
    }
    // Programs are freed once their last link is gone (the kernel may take a moment).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    while progs.iter().any(|id| sys::prog_fd_by_id(*id).is_ok()) {
        assert!(
            std::time::Instant::now() < deadline,
            "programs {progs:?} still loaded after reset"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let seen = env.run_traffic(&Traffic {
        count: 3,
        ..Traffic::to(key, &bes)
    });
    assert_eq!(seen.ok, 0, "traffic still rewritten after reset: {seen:?}");
    assert_eq!(seen.fail, 3);
    assert_eq!(
        dataplane::preflight(&env.cfg).expect("preflight"),
        StartupDecision::Fresh
    );
}

#[test]
fn apply_converges_on_the_desired_state_and_leaves_no_stale_entries() {
    let env = TestEnv::new("diff", 2);
    let a = svc("127.100.5.1", 80, Protocol::Tcp);
    let b = svc("127.100.5.2", 80, Protocol::Udp);
    let c = svc("fd00:6d65::5", 443, Protocol::Tcp);
    let (mut dp, _) = Dataplane::start(env.cfg.clone()).expect("start");
    let first = state(&[
        (a, backends("127.0.0.1", 36100, 3)),
        (b, backends("127.0.0.1", 36200, 2)),
    ]);
    let stats = dp.apply(&first).expect("first apply");
    assert_eq!(
        (
            stats.services_upserted,
            stats.services_removed,
            stats.backends_written
        ),
        (2, 0, 5)
    );
    let again = dp.apply(&first).expect("same apply");
    assert_eq!(
        (
            again.services_upserted,
            again.services_removed,
            again.backends_written
        ),
        (0, 0, 0)
    );

    let second = state(&[
        (a, backends("127.0.0.1", 36100, 1)),
        (c, backends("::1", 36300, 4)),
    ]);
    let stats = dp.apply(&second).expect("second apply");
    assert_eq!(
        (
            stats.services_upserted,
            stats.services_removed,
            stats.backends_written
        ),
        (2, 1, 5)
    );
    assert_eq!(dp.observed().expect("observed"), second);
    let entries: std::collections::BTreeMap<String, u64> = dp
        .maps()
        .expect("maps")
        .into_iter()
        .map(|m| (m.name, m.entries))
        .collect();
    assert_eq!(entries["frontend"], 2);
    assert_eq!(entries["service"], 2);
    assert_eq!(entries["endpoint"], 5);
    assert_eq!(entries["backend"], 5);

    // A fresh reader of the same pins sees the same table.
    drop(dp);
    let (dp, _) = Dataplane::start(env.cfg.clone()).expect("restart");
    assert_eq!(dp.observed().expect("observed"), second);
}

#[test]
fn a_backend_of_the_wrong_family_is_refused_with_the_service_named() {
    let env = TestEnv::new("family", 1);
    let a = svc("127.100.6.1", 80, Protocol::Tcp);
    let (mut dp, _) = Dataplane::start(env.cfg.clone()).expect("start");
    let err = dp
        .apply(&state(&[(a, backends("::1", 36400, 1))]))
        .expect_err("mixed families");
    assert!(err.to_string().contains("127.100.6.1"), "{err}");
    assert!(dp.observed().expect("observed").services.is_empty());
}

#[test]
fn a_fresh_start_that_cannot_attach_rolls_back_every_pin() {
    let env = TestEnv::new("rollback", 2);
    let cfg = meshlet_agent::dataplane::DataplaneConfig {
        cgroup: env.cfg.cgroup.join("missing-child"),
        ..env.cfg.clone()
    };
    let err = Dataplane::start(cfg.clone()).expect_err("attach to a missing cgroup");
    assert!(err.to_string().contains("missing-child"), "{err}");
    assert!(
        !cfg.bpffs_root.exists(),
        "pins left behind: {:?}",
        pins(&cfg.bpffs_root)
    );
    // Preflight refuses the same cgroup up front, naming it ...
    let refused = dataplane::preflight(&cfg).expect_err("preflight of a missing cgroup");
    assert!(refused.to_string().contains("missing-child"), "{refused}");
    // ... and with a real cgroup it finds nothing pinned: the failed start left no trace.
    let real = meshlet_agent::dataplane::DataplaneConfig {
        cgroup: env.cfg.cgroup.clone(),
        ..cfg
    };
    assert_eq!(
        dataplane::preflight(&real).expect("preflight"),
        StartupDecision::Fresh
    );
}

#[test]
fn preflight_reads_the_pinned_state_while_an_agent_holds_the_lock() {
    let env = TestEnv::new("preflight", 1);
    let (_dp, _) = Dataplane::start(env.cfg.clone()).expect("start");
    assert_eq!(
        dataplane::preflight(&env.cfg).expect("preflight"),
        StartupDecision::SameLayout { layout: 1 }
    );
    assert_eq!(
        dataplane::preflight(&env.with_layout(2)).expect("preflight"),
        StartupDecision::Migrate { from: 1, to: 2 }
    );
    assert!(matches!(
        dataplane::preflight(&env.with_layout(7)),
        Err(DataplaneError::UnsupportedLayout { layout: 7 })
    ));
}
