//! The kernel side of the agent: eBPF programs, pinned maps and links, layouts and migrations.
//!
//! ```text
//!  DataplaneConfig ─► preflight/start ─► decide (pure, layout.rs) ─► load/adopt/migrate (loader.rs)
//!                                                                      │ aya + bpf(2) (sys.rs)
//!  DesiredState ────► Dataplane::apply ─► diff vs observed ─► batched map writes (tables.rs)
//! ```
//!
//! Everything is pinned under `bpffs_root` (`maps/`, `links/`, `meta`); nothing is torn down on
//! drop, only [`reset`] detaches and unpins.

pub mod layout;
pub mod loader;
pub mod sys;
pub mod tables;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::model::{Backend, DesiredState, ServiceKey};
use loader::{NodeLock, Paths};
use sys::RawMap;
use tables::{Index, Installed};

/// Data-plane configuration chosen by the agent's flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataplaneConfig {
    /// bpffs directory owned by this agent (default `/sys/fs/bpf/meshlet`).
    pub bpffs_root: PathBuf,
    /// cgroup v2 directory the programs attach to.
    pub cgroup: PathBuf,
    /// Map layout this binary writes (1 or 2).
    pub layout: u32,
    /// Number of services the maps hold.
    pub max_services: u32,
    /// Number of endpoints (backends over all services) the maps hold.
    pub max_endpoints: u32,
    /// Node lock file (default `/run/meshlet/agent.lock`).
    pub lock_path: PathBuf,
}

impl Default for DataplaneConfig {
    fn default() -> Self {
        Self {
            bpffs_root: PathBuf::from("/sys/fs/bpf/meshlet"),
            cgroup: PathBuf::from("/sys/fs/cgroup"),
            layout: 2,
            max_services: 5_000,
            max_endpoints: 100_000,
            lock_path: PathBuf::from("/run/meshlet/agent.lock"),
        }
    }
}

/// What start-up does with the state currently pinned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartupDecision {
    /// Nothing pinned: load, create maps, attach, pin.
    Fresh,
    /// Pinned maps already have the wanted layout: reuse them, replace programs in place.
    SameLayout {
        /// The layout found and wanted.
        layout: u32,
    },
    /// Pinned maps have another layout this binary knows how to convert.
    Migrate {
        /// Layout found.
        from: u32,
        /// Layout wanted.
        to: u32,
    },
    /// Pinned state this binary cannot adopt; nothing may be changed.
    Unknown {
        /// Layout found in meta (0 when meta is missing or unreadable).
        found: u32,
        /// Why it cannot be adopted.
        reason: String,
    },
}

/// How the last start-up went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartKind {
    /// Loaded from nothing.
    Fresh,
    /// Adopted pinned maps and replaced programs in place.
    Warm,
    /// Converted the maps to another layout and replaced programs in place.
    Migrated,
}

/// Result of [`Dataplane::start`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartReport {
    /// Kind of start-up performed.
    pub kind: RestartKind,
    /// Wall time from taking the lock to serving with the new programs.
    pub duration: Duration,
    /// True when every pinned link that existed before is still the same kernel link.
    pub link_ids_unchanged: bool,
}

/// One attached program.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProgramInfo {
    /// Program name (e.g. `connect4`).
    pub name: String,
    /// Kernel program id.
    pub id: u32,
    /// Attach point (`cgroup/connect4 on <cgroup path>`).
    pub attach_point: String,
    /// Kernel link id.
    pub link_id: u32,
}

/// One pinned map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapInfo {
    /// Map name (pin name under `maps/`).
    pub name: String,
    /// Layout version of this map.
    pub layout: u32,
    /// Entries currently stored.
    pub entries: u64,
    /// Maximum entries.
    pub capacity: u64,
}

/// Data-plane counters summed over CPUs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Socket calls examined by the programs (connect, sendmsg).
    pub handled: u64,
    /// Destinations rewritten to a backend.
    pub rewritten: u64,
    /// Calls to a known service that had no backend.
    pub no_backend: u64,
}

/// What [`Dataplane::apply`] changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ApplyStats {
    /// Services created or changed.
    pub services_upserted: usize,
    /// Services removed.
    pub services_removed: usize,
    /// Backend entries written.
    pub backends_written: usize,
    /// Wall time of the apply.
    pub duration: Duration,
}

/// Errors of the data plane, named for the action that failed.
#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    /// Another process holds the node lock.
    #[error("failed to take the node lock {path}: held by pid {holder}; stop that agent first")]
    LockHeld {
        /// Lock file.
        path: PathBuf,
        /// Pid of the holder (0 if unknown).
        holder: u32,
    },
    /// The lock file could not be opened or locked.
    #[error("failed to open the node lock {path}")]
    OpenLock {
        /// Lock file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The pinned state has a layout this binary does not know.
    #[error("refusing to adopt pinned data plane (layout {found}): {reason}")]
    UnknownLayout {
        /// Layout found.
        found: u32,
        /// Why it cannot be adopted.
        reason: String,
    },
    /// The configured layout is not one this binary writes.
    #[error("unsupported dataplane layout {layout}: this binary writes layouts 1 and 2")]
    UnsupportedLayout {
        /// Layout asked for.
        layout: u32,
    },
    /// The cgroup the programs attach to is not a cgroup v2 directory.
    #[error(transparent)]
    Cgroup(#[from] crate::cgroup::CgroupError),
    /// The bpffs root is not on a bpffs.
    #[error(transparent)]
    Bpffs(#[from] crate::bpffs::BpffsError),
    /// A bpffs or cgroup path could not be prepared or read.
    #[error("failed to {action} {path}")]
    Filesystem {
        /// What was being done.
        action: &'static str,
        /// Path concerned.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Loading the eBPF object or a program failed.
    #[error("failed to load eBPF {what}: {detail}")]
    Load {
        /// Object or program.
        what: String,
        /// Loader message (with verifier log if any).
        detail: String,
    },
    /// Attaching or pinning a link failed.
    #[error("failed to attach {program} to {cgroup}: {detail}")]
    Attach {
        /// Program name.
        program: String,
        /// Cgroup path.
        cgroup: PathBuf,
        /// Cause.
        detail: String,
    },
    /// A bpf(2) call failed.
    #[error("bpf({cmd}) failed on {object}")]
    Syscall {
        /// Command name.
        cmd: &'static str,
        /// Map, link or pin concerned.
        object: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A desired state cannot be represented in the maps.
    #[error("invalid desired state: {0}")]
    InvalidState(String),
    /// The maps are full.
    #[error("map {map} is full ({capacity} entries); raise spec.dataplane capacity")]
    MapFull {
        /// Map name.
        map: &'static str,
        /// Its capacity.
        capacity: u64,
    },
    /// The maps hold something this binary cannot decode.
    #[error("corrupt map {map}: {detail}")]
    Corrupt {
        /// Map name.
        map: &'static str,
        /// What is wrong.
        detail: String,
    },
}

/// The programs attach to `cfg.cgroup` and pin under `cfg.bpffs_root`: a path that is not a
/// cgroup v2 directory would only fail at attach time, after the previous agent is already
/// gone, and pins outside a bpffs would silently vanish with a tmpfs or the container.
fn check_paths(cfg: &DataplaneConfig) -> Result<(), DataplaneError> {
    crate::cgroup::check_cgroup2(&cfg.cgroup)?;
    crate::bpffs::require_bpffs(&cfg.bpffs_root)?;
    Ok(())
}

/// Read-only: what would start-up do with the state currently pinned (no lock taken, nothing changed).
pub fn preflight(cfg: &DataplaneConfig) -> Result<StartupDecision, DataplaneError> {
    if !loader::layout_known(cfg.layout) {
        return Err(DataplaneError::UnsupportedLayout { layout: cfg.layout });
    }
    check_paths(cfg)?;
    let paths = Paths {
        root: cfg.bpffs_root.clone(),
    };
    Ok(layout::decide(&loader::gather(&paths)?, cfg.layout))
}

/// Open handles on the pinned service maps.
#[derive(Debug)]
struct Maps {
    frontend: RawMap,
    service: RawMap,
    endpoint: RawMap,
    backend: RawMap,
    counters: RawMap,
}

impl Maps {
    fn open(paths: &Paths) -> Result<Self, DataplaneError> {
        Ok(Self {
            frontend: loader::open_map(paths, "frontend")?,
            service: loader::open_map(paths, "service")?,
            endpoint: loader::open_map(paths, "endpoint")?,
            backend: loader::open_map(paths, "backend")?,
            counters: loader::open_map(paths, "counters")?,
        })
    }
}

fn syscall(cmd: &'static str, object: &str) -> impl FnOnce(std::io::Error) -> DataplaneError {
    let object = object.to_owned();
    move |source| DataplaneError::Syscall {
        cmd,
        object,
        source,
    }
}

/// A loaded, attached data plane. Dropping it leaves everything attached and pinned.
#[derive(Debug)]
pub struct Dataplane {
    cfg: DataplaneConfig,
    paths: Paths,
    maps: Maps,
    index: Index,
    _lock: NodeLock,
}

impl Dataplane {
    /// Take the node lock, decide, then adopt/migrate/load+attach. Unknown layout →
    /// `Err(DataplaneError::UnknownLayout{..})` with nothing changed.
    pub fn start(cfg: DataplaneConfig) -> Result<(Dataplane, StartReport), DataplaneError> {
        if !loader::layout_known(cfg.layout) {
            return Err(DataplaneError::UnsupportedLayout { layout: cfg.layout });
        }
        check_paths(&cfg)?;
        let started = Instant::now();
        let lock = NodeLock::acquire(&cfg.lock_path)?;
        let paths = Paths {
            root: cfg.bpffs_root.clone(),
        };
        let decision = layout::decide(&loader::gather(&paths)?, cfg.layout);
        let before = loader::link_ids(&paths);
        let kind = match decision {
            StartupDecision::Unknown { found, reason } => {
                return Err(DataplaneError::UnknownLayout { found, reason });
            }
            StartupDecision::Fresh => {
                loader::fresh(&cfg, &paths)?;
                RestartKind::Fresh
            }
            StartupDecision::SameLayout { .. } => {
                loader::adopt(&cfg, &paths)?;
                RestartKind::Warm
            }
            StartupDecision::Migrate { from, to } => {
                loader::migrate(&cfg, &paths, from, to)?;
                RestartKind::Migrated
            }
        };
        let after = loader::link_ids(&paths);
        let link_ids_unchanged = before
            .iter()
            .zip(&after)
            .all(|((_, old, _), (_, new, _))| *old == 0 || old == new);
        let maps = Maps::open(&paths)?;
        let mut dp = Dataplane {
            cfg,
            paths,
            maps,
            index: Index::default(),
            _lock: lock,
        };
        dp.rebuild_index()?;
        tracing::info!(
            kind = ?kind,
            layout = dp.cfg.layout,
            services = dp.index.services.len(),
            duration_ms = started.elapsed().as_secs_f64() * 1e3,
            link_ids_unchanged,
            "data plane serving"
        );
        let report = StartReport {
            kind,
            duration: started.elapsed(),
            link_ids_unchanged,
        };
        Ok((dp, report))
    }

    /// Reads the maps into the index (service ids, backend ids, backends) with batched
    /// lookups, then deletes entries no frontend reaches (left by an interrupted apply).
    fn rebuild_index(&mut self) -> Result<(), DataplaneError> {
        use std::collections::{HashMap, HashSet};
        let layout = self.cfg.layout;
        let dump =
            |map: &RawMap, name: &str| map.dump().map_err(syscall("BPF_MAP_LOOKUP_BATCH", name));
        let fe = dump(&self.maps.frontend, "frontend")?;
        let sv = dump(&self.maps.service, "service")?;
        let ep = dump(&self.maps.endpoint, "endpoint")?;
        let be = dump(&self.maps.backend, "backend")?;
        let id_of = |k: &[u8]| u32::from_ne_bytes([k[0], k[1], k[2], k[3]]);
        let services: HashMap<u32, (u32, u32)> = sv
            .entries()
            .map(|(k, v)| (id_of(k), tables::decode_service_value(v)))
            .collect();
        let endpoints: HashMap<(u32, u32), u32> = ep
            .entries()
            .map(|(k, v)| {
                (
                    tables::decode_endpoint_key(k),
                    tables::decode_endpoint_backend(v),
                )
            })
            .collect();
        let backends: HashMap<u32, &[u8]> = be.entries().map(|(k, v)| (id_of(k), v)).collect();

        let mut index = Index::default();
        for (key, value) in fe.entries() {
            let Some(service) = tables::decode_frontend_key(key) else {
                return Err(DataplaneError::Corrupt {
                    map: "frontend",
                    detail: format!("undecodable key {key:?}"),
                });
            };
            let service_id = id_of(value);
            let Some((count, _)) = services.get(&service_id) else {
                return Err(DataplaneError::Corrupt {
                    map: "service",
                    detail: format!("service id {service_id} missing"),
                });
            };
            let mut installed = Installed {
                service_id,
                backend_ids: Vec::new(),
                backends: Vec::new(),
            };
            for i in 0..*count {
                let Some(backend_id) = endpoints.get(&(service_id, i)) else {
                    return Err(DataplaneError::Corrupt {
                        map: "endpoint",
                        detail: format!("{service_id}/{i} missing"),
                    });
                };
                let Some(raw) = backends.get(backend_id) else {
                    return Err(DataplaneError::Corrupt {
                        map: "backend",
                        detail: format!("backend {backend_id} missing"),
                    });
                };
                installed.backend_ids.push(*backend_id);
                installed.backends.push(tables::decode_backend_value(
                    layout,
                    raw,
                    tables::family(&service),
                ));
                index.backend_ids.mark(*backend_id);
            }
            index.service_ids.mark(service_id);
            index.services.insert(service, installed);
        }

        let live_services: HashSet<u32> = index.services.values().map(|s| s.service_id).collect();
        let live_backends: HashSet<u32> = index
            .services
            .values()
            .flat_map(|s| s.backend_ids.iter().copied())
            .collect();
        let orphans = |d: &sys::Dump, live: &dyn Fn(&[u8]) -> bool| {
            let mut keys = Vec::new();
            let mut n = 0usize;
            for (k, _) in d.entries() {
                if !live(k) {
                    keys.extend_from_slice(k);
                    n += 1;
                }
            }
            (keys, n)
        };
        let (sk, sn) = orphans(&sv, &|k| live_services.contains(&id_of(k)));
        let (ek, en) = orphans(&ep, &|k| {
            live_services.contains(&tables::decode_endpoint_key(k).0)
        });
        let (bk, bn) = orphans(&be, &|k| live_backends.contains(&id_of(k)));
        self.index = index;
        self.delete_keys(MapName::Service, &sk, sn)?;
        self.delete_keys(MapName::Endpoint, &ek, en)?;
        self.delete_keys(MapName::Backend, &bk, bn)?;
        Ok(())
    }

    /// Read the current service table back from the maps (used to rebuild the index after restart).
    pub fn observed(&self) -> Result<DesiredState, DataplaneError> {
        let services: BTreeMap<ServiceKey, Vec<Backend>> = self
            .index
            .services
            .iter()
            .map(|(k, v)| (*k, v.backends.clone()))
            .collect();
        Ok(DesiredState { services })
    }

    /// Normalises a desired backend list to what this layout stores, checking it.
    fn stored_form(
        &self,
        key: &ServiceKey,
        backends: &[Backend],
    ) -> Result<Vec<Backend>, DataplaneError> {
        let mut out = Vec::with_capacity(backends.len());
        for b in backends {
            if b.addr.is_ipv4() != key.vip.is_ipv4() {
                return Err(DataplaneError::InvalidState(format!(
                    "service {}:{} has backend {} of the other address family",
                    key.vip, key.port, b.addr
                )));
            }
            if b.weight == 0 {
                return Err(DataplaneError::InvalidState(format!(
                    "service {}:{} backend {}:{} has weight 0; weights are 1..=65535",
                    key.vip, key.port, b.addr, b.port
                )));
            }
            let weight = if self.cfg.layout == 1 { 1 } else { b.weight };
            out.push(Backend { weight, ..*b });
        }
        Ok(out)
    }

    /// Make the maps equal `desired`: diff against observed, batched updates/deletes; stale
    /// entries removed. Backends and endpoints are written before the frontend, frontends
    /// deleted first, so no frontend ever points at a half-written service.
    pub fn apply(&mut self, desired: &DesiredState) -> Result<ApplyStats, DataplaneError> {
        let started = Instant::now();
        let layout = self.cfg.layout;
        let mut changed: Vec<(ServiceKey, Vec<Backend>)> = Vec::new();
        for (key, backends) in &desired.services {
            let stored = self.stored_form(key, backends)?;
            if self.index.services.get(key).map(|i| &i.backends) != Some(&stored) {
                changed.push((*key, stored));
            }
        }
        let removed: Vec<ServiceKey> = self
            .index
            .services
            .keys()
            .filter(|k| !desired.services.contains_key(k))
            .copied()
            .collect();
        let new_endpoints: usize = changed.iter().map(|(_, b)| b.len()).sum();
        let kept_endpoints: usize = self.index.services.values().map(|s| s.backends.len()).sum();
        let endpoint_cap = u64::from(self.maps.backend.facts.max_entries);
        if (kept_endpoints + new_endpoints) as u64 > endpoint_cap {
            return Err(DataplaneError::MapFull {
                map: "backend",
                capacity: endpoint_cap,
            });
        }
        let frontend_cap = u64::from(self.maps.frontend.facts.max_entries);
        if desired.services.len() as u64 > frontend_cap {
            return Err(DataplaneError::MapFull {
                map: "frontend",
                capacity: frontend_cap,
            });
        }

        // 1. New service ids with their backends, endpoints and service entries.
        let (mut be_keys, mut be_vals, mut ep_keys, mut ep_vals, mut sv_keys, mut sv_vals) = (
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
        );
        let mut fe_keys = Vec::new();
        let mut fe_vals = Vec::new();
        let mut fresh: Vec<(ServiceKey, Installed)> = Vec::with_capacity(changed.len());
        for (key, backends) in changed {
            let service_id = self.index.service_ids.alloc();
            let mut ids = Vec::with_capacity(backends.len());
            let mut cum = 0u32;
            for (i, b) in backends.iter().enumerate() {
                let id = self.index.backend_ids.alloc();
                ids.push(id);
                cum = cum.saturating_add(u32::from(b.weight));
                be_keys.extend_from_slice(&id.to_ne_bytes());
                be_vals.extend_from_slice(&tables::backend_value(layout, b));
                ep_keys.extend_from_slice(&tables::endpoint_key(service_id, i as u32));
                ep_vals.extend_from_slice(&tables::endpoint_value(layout, id, cum));
            }
            sv_keys.extend_from_slice(&service_id.to_ne_bytes());
            sv_vals.extend_from_slice(&tables::service_value(backends.len() as u32, cum));
            fe_keys.extend_from_slice(&tables::frontend_key(&key));
            fe_vals.extend_from_slice(&service_id.to_ne_bytes());
            fresh.push((
                key,
                Installed {
                    service_id,
                    backend_ids: ids,
                    backends,
                },
            ));
        }
        let backends_written = be_keys.len() / 4;
        let n = fresh.len();
        self.maps
            .backend
            .update_batch(&be_keys, &be_vals, backends_written)
            .map_err(syscall("BPF_MAP_UPDATE_BATCH", "backend"))?;
        self.maps
            .endpoint
            .update_batch(&ep_keys, &ep_vals, backends_written)
            .map_err(syscall("BPF_MAP_UPDATE_BATCH", "endpoint"))?;
        self.maps
            .service
            .update_batch(&sv_keys, &sv_vals, n)
            .map_err(syscall("BPF_MAP_UPDATE_BATCH", "service"))?;
        // 2. Frontends switch to the complete new services.
        self.maps
            .frontend
            .update_batch(&fe_keys, &fe_vals, n)
            .map_err(syscall("BPF_MAP_UPDATE_BATCH", "frontend"))?;
        // 3. Frontends of removed services go first, then everything they reached.
        let mut gone_fe = Vec::new();
        for key in &removed {
            gone_fe.extend_from_slice(&tables::frontend_key(key));
        }
        self.delete_keys(MapName::Frontend, &gone_fe, removed.len())?;
        let mut retired: Vec<Installed> = removed
            .iter()
            .filter_map(|k| self.index.services.remove(k))
            .collect();
        let services_upserted = fresh.len();
        for (key, installed) in fresh {
            if let Some(old) = self.index.services.insert(key, installed) {
                retired.push(old);
            }
        }
        let (mut sv, mut ep, mut be) = (Vec::new(), Vec::new(), Vec::new());
        let (mut ns, mut nb) = (0usize, 0usize);
        for old in &retired {
            sv.extend_from_slice(&old.service_id.to_ne_bytes());
            ns += 1;
            for (i, id) in old.backend_ids.iter().enumerate() {
                ep.extend_from_slice(&tables::endpoint_key(old.service_id, i as u32));
                be.extend_from_slice(&id.to_ne_bytes());
                nb += 1;
            }
        }
        self.delete_keys(MapName::Service, &sv, ns)?;
        self.delete_keys(MapName::Endpoint, &ep, nb)?;
        self.delete_keys(MapName::Backend, &be, nb)?;
        for old in retired {
            self.index.service_ids.free(old.service_id);
            for id in old.backend_ids {
                self.index.backend_ids.free(id);
            }
        }
        Ok(ApplyStats {
            services_upserted,
            services_removed: removed.len(),
            backends_written,
            duration: started.elapsed(),
        })
    }

    fn delete_keys(&self, which: MapName, keys: &[u8], count: usize) -> Result<(), DataplaneError> {
        let (map, name) = match which {
            MapName::Frontend => (&self.maps.frontend, "frontend"),
            MapName::Service => (&self.maps.service, "service"),
            MapName::Endpoint => (&self.maps.endpoint, "endpoint"),
            MapName::Backend => (&self.maps.backend, "backend"),
        };
        if map.delete_batch(keys, count).is_ok() {
            return Ok(());
        }
        // A batch stops at the first missing key; finish one by one.
        let size = map.facts.key_size as usize;
        for key in keys.chunks(size) {
            map.delete(key)
                .map_err(syscall("BPF_MAP_DELETE_ELEM", name))?;
        }
        Ok(())
    }

    /// Attached programs with their kernel ids and link ids.
    pub fn programs(&self) -> Vec<ProgramInfo> {
        loader::link_ids(&self.paths)
            .into_iter()
            .map(|(name, link_id, id)| ProgramInfo {
                attach_point: format!("cgroup/{name} on {}", self.cfg.cgroup.display()),
                name,
                id,
                link_id,
            })
            .collect()
    }

    /// Pinned maps with layout, fill and capacity.
    pub fn maps(&self) -> Result<Vec<MapInfo>, DataplaneError> {
        let mut out = Vec::new();
        for spec in layout::MAPS {
            let map = loader::open_map(&self.paths, spec.pin)?;
            let entries = if spec.pin == "counters" {
                u64::from(map.facts.max_entries)
            } else {
                map.keys()
                    .map_err(syscall("BPF_MAP_GET_NEXT_KEY", spec.pin))?
                    .len() as u64
            };
            out.push(MapInfo {
                name: spec.pin.to_owned(),
                layout: spec.layout_for(self.cfg.layout),
                entries,
                capacity: u64::from(map.facts.max_entries),
            });
        }
        Ok(out)
    }

    /// Counters summed over CPUs.
    pub fn counters(&self) -> Result<Counters, DataplaneError> {
        let cpus = possible_cpus()?;
        let mut buf = vec![0u8; 8 * cpus];
        let mut sums = [0u64; 3];
        for (slot, sum) in sums.iter_mut().enumerate() {
            self.maps
                .counters
                .lookup(&(slot as u32).to_ne_bytes(), &mut buf)
                .map_err(syscall("BPF_MAP_LOOKUP_ELEM", "counters"))?;
            *sum = buf
                .chunks(8)
                .map(|c| u64::from_ne_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                .sum();
        }
        Ok(Counters {
            handled: sums[0],
            rewritten: sums[1],
            no_backend: sums[2],
        })
    }

    /// The configuration this data plane runs with.
    pub fn config(&self) -> &DataplaneConfig {
        &self.cfg
    }

    /// Tear the data plane down (detach, unpin) under the lock this instance already holds.
    pub fn teardown(self) -> Result<(), DataplaneError> {
        loader::teardown(&self.paths);
        check_gone(&self.paths)
    }
}

#[derive(Debug, Clone, Copy)]
enum MapName {
    Frontend,
    Service,
    Endpoint,
    Backend,
}

/// Number of possible CPUs (per-CPU map value count).
fn possible_cpus() -> Result<usize, DataplaneError> {
    let path = std::path::Path::new("/sys/devices/system/cpu/possible");
    let text = std::fs::read_to_string(path).map_err(|source| DataplaneError::Filesystem {
        action: "read",
        path: path.into(),
        source,
    })?;
    let mut n = 0usize;
    for part in text.trim().split(',') {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        let (a, b) = (
            a.parse::<usize>().unwrap_or(0),
            b.parse::<usize>().unwrap_or(0),
        );
        n = n.max(b + 1).max(a + 1);
    }
    Ok(n.max(1))
}

fn check_gone(paths: &Paths) -> Result<(), DataplaneError> {
    if paths.root.exists() {
        return Err(DataplaneError::Filesystem {
            action: "remove",
            path: paths.root.clone(),
            source: std::io::Error::other("pins remain after teardown"),
        });
    }
    Ok(())
}

/// Tear everything down (detach, unpin). Takes the lock.
pub fn reset(cfg: &DataplaneConfig) -> Result<(), DataplaneError> {
    let _lock = NodeLock::acquire(&cfg.lock_path)?;
    let paths = Paths {
        root: cfg.bpffs_root.clone(),
    };
    loader::teardown(&paths);
    check_gone(&paths)
}

/// `Dataplane` runs inside `spawn_blocking`, so it must stay `Send`.
const _: fn() = || {
    fn assert_send<T: Send>() {}
    assert_send::<Dataplane>();
};
