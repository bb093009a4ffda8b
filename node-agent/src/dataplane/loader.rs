//! Loading, adopting, migrating and tearing down the pinned data plane, plus the node lock.
//!
//! ```text
//!  start ─► lock ─► gather PinnedState ─► layout::decide ─┬─ Fresh:   load, pin maps, attach, pin links
//!                                                        ├─ Same:    load on pinned maps, LINK_UPDATE
//!                                                        ├─ Migrate: new maps at *_next, copy+convert,
//!                                                        │           load, LINK_UPDATE, rename, meta
//!                                                        └─ Unknown: touch nothing, error
//! ```

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use aya::programs::CgroupSockAddr;
use aya::programs::links::{CgroupAttachMode, FdLink};
use aya::{Ebpf, EbpfLoader};

use super::layout::{self, MAPS, META_SLOTS, MetaRecord, PinnedState};
use super::sys::{self, RawMap};
use super::tables;
use super::{DataplaneConfig, DataplaneError};

/// The eBPF object built for each layout.
fn object(layout: u32) -> &'static [u8] {
    static L1: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/sockaddr-layout1.o"));
    static L2: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/sockaddr-layout2.o"));
    if layout == 1 { L1 } else { L2 }
}

/// Every program: (link pin name, program symbol).
pub const PROGRAMS: [(&str, &str); 8] = [
    ("connect4", "mlt_connect4"),
    ("connect6", "mlt_connect6"),
    ("sendmsg4", "mlt_sendmsg4"),
    ("sendmsg6", "mlt_sendmsg6"),
    ("recvmsg4", "mlt_recvmsg4"),
    ("recvmsg6", "mlt_recvmsg6"),
    ("getpeername4", "mlt_peername4"),
    ("getpeername6", "mlt_peername6"),
];

/// Suffix of temporary map pins during a migration (bpffs refuses dots).
const NEXT_SUFFIX: &str = "_next";

/// Paths under a bpffs root.
#[derive(Debug, Clone)]
pub struct Paths {
    /// Root directory.
    pub root: PathBuf,
}

impl Paths {
    /// `maps/` directory.
    pub fn maps(&self) -> PathBuf {
        self.root.join("maps")
    }
    /// `links/` directory.
    pub fn links(&self) -> PathBuf {
        self.root.join("links")
    }
    /// Pin of a map.
    pub fn map(&self, pin: &str) -> PathBuf {
        self.maps().join(pin)
    }
    /// Temporary pin of a map being migrated.
    pub fn map_next(&self, pin: &str) -> PathBuf {
        self.maps().join(format!("{pin}{NEXT_SUFFIX}"))
    }
    /// Pin of a link.
    pub fn link(&self, name: &str) -> PathBuf {
        self.links().join(name)
    }
    /// Pin of the meta map.
    pub fn meta(&self) -> PathBuf {
        self.root.join("meta")
    }
}

fn fs_err(
    action: &'static str,
    path: &Path,
) -> impl FnOnce(std::io::Error) -> DataplaneError + use<> {
    let path = path.to_path_buf();
    move |source| DataplaneError::Filesystem {
        action,
        path,
        source,
    }
}

fn sys_err(
    cmd: &'static str,
    object: impl Into<String>,
) -> impl FnOnce(std::io::Error) -> DataplaneError {
    let object = object.into();
    move |source| DataplaneError::Syscall {
        cmd,
        object,
        source,
    }
}

/// Exclusive node lock (`flock`); released when dropped or when the process dies.
#[derive(Debug)]
pub struct NodeLock {
    _file: nix::fcntl::Flock<File>,
}

impl NodeLock {
    /// Takes the lock without waiting; a held lock names the holder's pid.
    pub fn acquire(path: &Path) -> Result<Self, DataplaneError> {
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(|source| DataplaneError::OpenLock {
                path: path.into(),
                source,
            })?;
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|source| DataplaneError::OpenLock {
                path: path.into(),
                source,
            })?;
        let mut file =
            match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
                Ok(locked) => locked,
                Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => {
                    let mut text = String::new();
                    let _ = file.read_to_string(&mut text);
                    return Err(DataplaneError::LockHeld {
                        path: path.into(),
                        holder: text.trim().parse().unwrap_or(0),
                    });
                }
                Err((_, e)) => {
                    return Err(DataplaneError::OpenLock {
                        path: path.into(),
                        source: std::io::Error::from(e),
                    });
                }
            };
        let record = |file: &mut File| -> std::io::Result<()> {
            file.set_len(0)?;
            file.rewind()?;
            writeln!(file, "{}", std::process::id())
        };
        record(&mut file).map_err(|source| DataplaneError::OpenLock {
            path: path.into(),
            source,
        })?;
        Ok(Self { _file: file })
    }
}

/// Reads the meta record if the meta map is pinned.
pub fn read_meta(paths: &Paths) -> Result<Option<MetaRecord>, DataplaneError> {
    let path = paths.meta();
    if !path.exists() {
        return Ok(None);
    }
    let map = RawMap::open(&path).map_err(sys_err("BPF_OBJ_GET", path.display().to_string()))?;
    if map.facts.key_size != 4
        || map.facts.value_size != 4
        || map.facts.max_entries as usize != META_SLOTS
    {
        return Ok(Some(MetaRecord {
            slots: [0; META_SLOTS],
        }));
    }
    let mut slots = [0u32; META_SLOTS];
    for (i, slot) in slots.iter_mut().enumerate() {
        let mut v = [0u8; 4];
        map.lookup(&(i as u32).to_ne_bytes(), &mut v)
            .map_err(sys_err("BPF_MAP_LOOKUP_ELEM", "meta"))?;
        *slot = u32::from_ne_bytes(v);
    }
    Ok(Some(MetaRecord { slots }))
}

/// Writes the meta record.
pub fn write_meta(paths: &Paths, meta: &MetaRecord) -> Result<(), DataplaneError> {
    let path = paths.meta();
    let map = RawMap::open(&path).map_err(sys_err("BPF_OBJ_GET", path.display().to_string()))?;
    for (i, slot) in meta.slots.iter().enumerate() {
        map.update(&(i as u32).to_ne_bytes(), &slot.to_ne_bytes())
            .map_err(sys_err("BPF_MAP_UPDATE_ELEM", "meta"))?;
    }
    Ok(())
}

fn list_dir(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Gathers what is pinned, changing nothing.
pub fn gather(paths: &Paths) -> Result<PinnedState, DataplaneError> {
    let meta = read_meta(paths)?;
    let mut pins = Vec::new();
    for name in list_dir(&paths.maps()) {
        if !name.ends_with(NEXT_SUFFIX) {
            pins.push(format!("maps/{name}"));
        }
    }
    for name in list_dir(&paths.links()) {
        pins.push(format!("links/{name}"));
    }
    pins.sort();
    Ok(PinnedState { meta, pins })
}

/// Checks that every pinned map has the key/value sizes of `layout` (aya does not).
fn check_pinned_sizes(paths: &Paths, layout: u32) -> Result<(), DataplaneError> {
    for map in MAPS {
        let path = paths.map(map.pin);
        if !path.exists() {
            continue;
        }
        let raw =
            RawMap::open(&path).map_err(sys_err("BPF_OBJ_GET", path.display().to_string()))?;
        let (k, v) = tables::map_sizes(map.pin, layout);
        if map.pin != "counters"
            && (raw.facts.key_size as usize != k || raw.facts.value_size as usize != v)
        {
            return Err(DataplaneError::UnknownLayout {
                found: layout,
                reason: format!(
                    "pinned map {} has key/value sizes {}/{}, layout {layout} needs {k}/{v}",
                    map.pin, raw.facts.key_size, raw.facts.value_size
                ),
            });
        }
    }
    Ok(())
}

/// Removes stale temporary pins left by an interrupted migration.
fn remove_next_pins(paths: &Paths) {
    for map in MAPS {
        let _ = fs::remove_file(paths.map_next(map.pin));
    }
}

/// Capacities of each map from the configuration. Service, endpoint and backend maps get
/// twice the configured size: `apply` writes a changed service under a new id before it
/// retires the old one.
fn capacity(cfg: &DataplaneConfig, pin: &str) -> Option<u32> {
    match pin {
        "frontend" => Some(cfg.max_services.max(1)),
        "service" => Some(cfg.max_services.max(1).saturating_mul(2)),
        "endpoint" | "backend" => Some(cfg.max_endpoints.max(1).saturating_mul(2)),
        _ => None,
    }
}

/// Loads the object for `layout`, opening or creating each map at the given pin path.
fn load_object(
    cfg: &DataplaneConfig,
    layout: u32,
    pins: &[(&'static str, PathBuf)],
) -> Result<Ebpf, DataplaneError> {
    let mut loader = EbpfLoader::new();
    for (symbol, path) in pins {
        loader.map_pin_path(symbol, path.clone());
    }
    for map in MAPS {
        if let Some(cap) = capacity(cfg, map.pin) {
            loader.map_max_entries(map.symbol, cap);
        }
    }
    loader
        .load(object(layout))
        .map_err(|e| DataplaneError::Load {
            what: format!("object (layout {layout})"),
            detail: format!("{e:#}"),
        })
}

/// Loads every program of `ebpf` into the kernel.
fn load_programs(ebpf: &mut Ebpf) -> Result<(), DataplaneError> {
    for (name, symbol) in PROGRAMS {
        let prog: &mut CgroupSockAddr = ebpf
            .program_mut(symbol)
            .ok_or_else(|| DataplaneError::Load {
                what: name.into(),
                detail: "missing from object".into(),
            })?
            .try_into()
            .map_err(|e| DataplaneError::Load {
                what: name.into(),
                detail: format!("{e}"),
            })?;
        prog.load().map_err(|e| DataplaneError::Load {
            what: name.into(),
            detail: format!("{e:?}"),
        })?;
    }
    Ok(())
}

fn program<'a>(
    ebpf: &'a mut Ebpf,
    name: &str,
    symbol: &str,
) -> Result<&'a mut CgroupSockAddr, DataplaneError> {
    ebpf.program_mut(symbol)
        .ok_or_else(|| DataplaneError::Load {
            what: name.into(),
            detail: "missing from object".into(),
        })?
        .try_into()
        .map_err(|e| DataplaneError::Load {
            what: name.into(),
            detail: format!("{e}"),
        })
}

/// Attaches one program to the cgroup with a new link and pins the link.
fn attach_and_pin(
    ebpf: &mut Ebpf,
    cfg: &DataplaneConfig,
    paths: &Paths,
    name: &str,
    symbol: &str,
) -> Result<(), DataplaneError> {
    let attach_err = |detail: String| DataplaneError::Attach {
        program: name.into(),
        cgroup: cfg.cgroup.clone(),
        detail,
    };
    let cgroup = File::open(&cfg.cgroup).map_err(fs_err("open cgroup", &cfg.cgroup))?;
    let prog = program(ebpf, name, symbol)?;
    let id = prog
        .attach(&cgroup, CgroupAttachMode::Single)
        .map_err(|e| attach_err(format!("{e:?}")))?;
    let link = prog
        .take_link(id)
        .map_err(|e| attach_err(format!("{e:?}")))?;
    let fd: FdLink = link.try_into().map_err(|e| attach_err(format!("{e:?}")))?;
    fd.pin(paths.link(name))
        .map_err(|e| attach_err(format!("pin: {e:?}")))?;
    Ok(())
}

/// Replaces the program of the pinned link `name` with the loaded program, or attaches a new
/// link when the pin is missing. Returns the program id the link ran before (0 if new).
fn replace_or_attach(
    ebpf: &mut Ebpf,
    cfg: &DataplaneConfig,
    paths: &Paths,
    name: &str,
    symbol: &str,
) -> Result<u32, DataplaneError> {
    let pin = paths.link(name);
    if !pin.exists() {
        attach_and_pin(ebpf, cfg, paths, name, symbol)?;
        return Ok(0);
    }
    let link = sys::obj_get(&pin).map_err(sys_err("BPF_OBJ_GET", pin.display().to_string()))?;
    let before = sys::link_facts(link.as_fd()).map_err(sys_err("BPF_OBJ_GET_INFO_BY_FD", name))?;
    let prog = program(ebpf, name, symbol)?;
    let prog_fd = prog.fd().map_err(|e| DataplaneError::Load {
        what: name.into(),
        detail: format!("{e:?}"),
    })?;
    sys::link_update(link.as_fd(), prog_fd.as_fd()).map_err(sys_err("BPF_LINK_UPDATE", name))?;
    Ok(before.prog_id)
}

/// Link ids of every pinned link (0 for a missing one).
pub fn link_ids(paths: &Paths) -> Vec<(String, u32, u32)> {
    PROGRAMS
        .iter()
        .map(|(name, _)| {
            let facts = sys::obj_get(&paths.link(name)).and_then(|fd| sys::link_facts(fd.as_fd()));
            match facts {
                Ok(f) => (name.to_string(), f.id, f.prog_id),
                Err(_) => (name.to_string(), 0, 0),
            }
        })
        .collect()
}

fn map_pins(paths: &Paths, layout_next: Option<u32>) -> Vec<(&'static str, PathBuf)> {
    let mut pins: Vec<(&'static str, PathBuf)> = MAPS
        .iter()
        .map(|m| {
            let path = match layout_next {
                Some(_) if m.follows_layout => paths.map_next(m.pin),
                _ => paths.map(m.pin),
            };
            (m.symbol, path)
        })
        .collect();
    pins.push(("mlt_meta", paths.meta()));
    pins
}

fn create_dirs(paths: &Paths) -> Result<(), DataplaneError> {
    for dir in [paths.root.clone(), paths.maps(), paths.links()] {
        fs::create_dir_all(&dir).map_err(fs_err("create bpffs directory", &dir))?;
    }
    Ok(())
}

/// Fresh start: create and pin maps, write meta, attach and pin links. Rolls back on error.
pub fn fresh(cfg: &DataplaneConfig, paths: &Paths) -> Result<(), DataplaneError> {
    create_dirs(paths)?;
    let result = (|| {
        let mut ebpf = load_object(cfg, cfg.layout, &map_pins(paths, None))?;
        write_meta(paths, &MetaRecord::for_layout(cfg.layout))?;
        load_programs(&mut ebpf)?;
        for (name, symbol) in PROGRAMS {
            attach_and_pin(&mut ebpf, cfg, paths, name, symbol)?;
        }
        Ok(())
    })();
    if result.is_err() {
        teardown(paths);
    }
    result
}

/// Same layout: load against the pinned maps and replace each program in place.
pub fn adopt(cfg: &DataplaneConfig, paths: &Paths) -> Result<(), DataplaneError> {
    check_pinned_sizes(paths, cfg.layout)?;
    remove_next_pins(paths);
    create_dirs(paths)?;
    let mut ebpf = load_object(cfg, cfg.layout, &map_pins(paths, None))?;
    load_programs(&mut ebpf)?;
    for (name, symbol) in PROGRAMS {
        replace_or_attach(&mut ebpf, cfg, paths, name, symbol)?;
    }
    Ok(())
}

/// Copies and converts the endpoint and backend maps from `from` into the `_next` maps of `to`.
fn copy_converted(paths: &Paths, from: u32, to: u32) -> Result<(), DataplaneError> {
    let old_ep =
        RawMap::open(&paths.map("endpoint")).map_err(sys_err("BPF_OBJ_GET", "endpoint"))?;
    let new_ep = RawMap::open(&paths.map_next("endpoint"))
        .map_err(sys_err("BPF_OBJ_GET", "endpoint_next"))?;
    let old_be = RawMap::open(&paths.map("backend")).map_err(sys_err("BPF_OBJ_GET", "backend"))?;
    let new_be =
        RawMap::open(&paths.map_next("backend")).map_err(sys_err("BPF_OBJ_GET", "backend_next"))?;

    // Backends first, then endpoints (cumulative weights need the converted backend weights).
    let old_backends = old_be
        .dump()
        .map_err(sys_err("BPF_MAP_LOOKUP_BATCH", "backend"))?;
    let mut weights = std::collections::HashMap::with_capacity(old_backends.count);
    let mut values = Vec::with_capacity(old_backends.count * tables::backend_value_size(to));
    for (key, value) in old_backends.entries() {
        let converted = tables::convert_backend(from, to, value);
        let weight = if to == 1 {
            1
        } else {
            u16::from_ne_bytes([converted[18], converted[19]])
        };
        weights.insert(
            u32::from_ne_bytes([key[0], key[1], key[2], key[3]]),
            u32::from(weight),
        );
        values.extend_from_slice(&converted);
    }
    new_be
        .update_batch(&old_backends.keys, &values, old_backends.count)
        .map_err(sys_err("BPF_MAP_UPDATE_BATCH", "backend_next"))?;

    let old_endpoints = old_ep
        .dump()
        .map_err(sys_err("BPF_MAP_LOOKUP_BATCH", "endpoint"))?;
    let mut entries: Vec<((u32, u32), &[u8])> = old_endpoints
        .entries()
        .map(|(k, v)| (tables::decode_endpoint_key(k), v))
        .collect();
    entries.sort_unstable_by_key(|(k, _)| *k);
    let (mut keys, mut values, mut n) = (Vec::new(), Vec::new(), 0usize);
    let mut current = None;
    let mut cum = 0u32;
    for ((service, index), value) in entries {
        if current != Some(service) {
            current = Some(service);
            cum = 0;
        }
        let backend = tables::decode_endpoint_backend(value);
        cum = cum.saturating_add(weights.get(&backend).copied().unwrap_or(1));
        keys.extend_from_slice(&tables::endpoint_key(service, index));
        values.extend_from_slice(&tables::convert_endpoint(from, to, value, cum));
        n += 1;
    }
    new_ep
        .update_batch(&keys, &values, n)
        .map_err(sys_err("BPF_MAP_UPDATE_BATCH", "endpoint_next"))?;
    Ok(())
}

/// Known migration: new maps under temporary pins, copy+convert, load, swap links, rename pins,
/// update meta. Before the first link update a failure removes the temporary pins and leaves
/// the running data plane as it was.
pub fn migrate(
    cfg: &DataplaneConfig,
    paths: &Paths,
    from: u32,
    to: u32,
) -> Result<(), DataplaneError> {
    check_pinned_sizes(paths, from)?;
    remove_next_pins(paths);
    let prepared = (|| {
        let mut ebpf = load_object(cfg, to, &map_pins(paths, Some(to)))?;
        copy_converted(paths, from, to)?;
        load_programs(&mut ebpf)?;
        Ok(ebpf)
    })();
    let mut ebpf = match prepared {
        Ok(ebpf) => ebpf,
        Err(e) => {
            remove_next_pins(paths);
            return Err(e);
        }
    };
    let mut swapped: Vec<(&str, u32)> = Vec::new();
    for (name, symbol) in PROGRAMS {
        match replace_or_attach(&mut ebpf, cfg, paths, name, symbol) {
            Ok(old_prog) => swapped.push((name, old_prog)),
            Err(e) => {
                roll_back_links(paths, &swapped);
                remove_next_pins(paths);
                return Err(e);
            }
        }
    }
    for map in MAPS.iter().filter(|m| m.follows_layout) {
        let next = paths.map_next(map.pin);
        fs::rename(&next, paths.map(map.pin)).map_err(fs_err("rename migrated map pin", &next))?;
    }
    write_meta(paths, &MetaRecord::for_layout(to))?;
    Ok(())
}

/// Points links already swapped back at the programs they ran before (0: link was new, so
/// it is removed). Best effort: used only on the error path of a migration.
fn roll_back_links(paths: &Paths, swapped: &[(&str, u32)]) {
    for (name, old_prog) in swapped {
        let pin = paths.link(name);
        if *old_prog == 0 {
            let _ = fs::remove_file(&pin);
            continue;
        }
        if let (Ok(link), Ok(prog)) = (sys::obj_get(&pin), sys::prog_fd_by_id(*old_prog)) {
            let _ = sys::link_update(link.as_fd(), prog.as_fd());
        }
    }
}

/// Detaches every link and removes every pin and directory under the root. Best effort: it
/// carries on past errors so a partial state is still cleaned.
pub fn teardown(paths: &Paths) {
    for (name, _) in PROGRAMS {
        let pin = paths.link(name);
        if let Ok(fd) = sys::obj_get(&pin) {
            let _ = sys::link_detach(fd.as_fd());
        }
        let _ = fs::remove_file(&pin);
    }
    for name in list_dir(&paths.links()) {
        let _ = fs::remove_file(paths.links().join(name));
    }
    for name in list_dir(&paths.maps()) {
        let _ = fs::remove_file(paths.maps().join(name));
    }
    let _ = fs::remove_file(paths.meta());
    let _ = fs::remove_dir(paths.links());
    let _ = fs::remove_dir(paths.maps());
    let _ = fs::remove_dir(&paths.root);
}

/// Opens one pinned map for byte-level access.
pub fn open_map(paths: &Paths, pin: &'static str) -> Result<RawMap, DataplaneError> {
    RawMap::open(&paths.map(pin)).map_err(sys_err("BPF_OBJ_GET", pin))
}

/// The layout assertion used by `Dataplane`: whether the data plane `layout` is known.
pub fn layout_known(layout: u32) -> bool {
    layout::KNOWN_LAYOUTS.contains(&layout)
}
