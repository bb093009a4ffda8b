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

use std::path::PathBuf;
use std::time::Duration;

use crate::model::DesiredState;

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

/// Read-only: what would start-up do with the state currently pinned (no lock taken, nothing changed).
pub fn preflight(cfg: &DataplaneConfig) -> Result<StartupDecision, DataplaneError> {
    let _ = cfg;
    Err(DataplaneError::InvalidState("not implemented yet".into()))
}

/// A loaded, attached data plane. Dropping it leaves everything attached and pinned.
#[derive(Debug)]
pub struct Dataplane {
    cfg: DataplaneConfig,
}

impl Dataplane {
    /// Take the node lock, decide, then adopt/migrate/load+attach. Unknown layout →
    /// `Err(DataplaneError::UnknownLayout{..})` with nothing changed.
    pub fn start(cfg: DataplaneConfig) -> Result<(Dataplane, StartReport), DataplaneError> {
        let _ = cfg;
        Err(DataplaneError::InvalidState("not implemented yet".into()))
    }

    /// Read the current service table back from the maps (used to rebuild the index after restart).
    pub fn observed(&self) -> Result<DesiredState, DataplaneError> {
        Ok(DesiredState::default())
    }

    /// Make the maps equal `desired`: diff against observed, batched updates/deletes; stale
    /// entries removed. Backends and endpoints are written before the frontend, frontends
    /// deleted first, so no frontend ever points at a half-written service.
    pub fn apply(&mut self, desired: &DesiredState) -> Result<ApplyStats, DataplaneError> {
        let _ = desired;
        Ok(ApplyStats::default())
    }

    /// Attached programs with their kernel ids and link ids.
    pub fn programs(&self) -> Vec<ProgramInfo> {
        Vec::new()
    }

    /// Pinned maps with layout, fill and capacity.
    pub fn maps(&self) -> Result<Vec<MapInfo>, DataplaneError> {
        Ok(Vec::new())
    }

    /// Counters summed over CPUs.
    pub fn counters(&self) -> Result<Counters, DataplaneError> {
        Ok(Counters::default())
    }

    /// The configuration this data plane runs with.
    pub fn config(&self) -> &DataplaneConfig {
        &self.cfg
    }
}

/// Tear everything down (detach, unpin). Takes the lock.
pub fn reset(cfg: &DataplaneConfig) -> Result<(), DataplaneError> {
    let _ = cfg;
    Err(DataplaneError::InvalidState("not implemented yet".into()))
}
