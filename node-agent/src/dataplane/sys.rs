//! The raw `bpf(2)` calls aya 0.14 does not expose (object get/pin, link update, batched map
//! operations, object info) — the only module of the agent with `unsafe`.
//!
//! Every call builds its `union bpf_attr` in a zeroed, 8-byte aligned buffer with safe
//! helpers; the single `unsafe` block is the syscall itself. Callers pass and get plain byte
//! slices and owned file descriptors.
#![expect(
    unsafe_code,
    reason = "bpf(2) has no safe wrapper in aya 0.14 for these commands; kept to one syscall site"
)]

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

const MAP_LOOKUP_ELEM: i64 = 1;
const MAP_UPDATE_ELEM: i64 = 2;
const MAP_DELETE_ELEM: i64 = 3;
const MAP_GET_NEXT_KEY: i64 = 4;
const OBJ_PIN: i64 = 6;
const OBJ_GET: i64 = 7;
const PROG_GET_FD_BY_ID: i64 = 13;
const OBJ_GET_INFO_BY_FD: i64 = 15;
const MAP_LOOKUP_BATCH: i64 = 24;
const MAP_UPDATE_BATCH: i64 = 26;
const MAP_DELETE_BATCH: i64 = 27;
const LINK_UPDATE: i64 = 29;
const LINK_GET_FD_BY_ID: i64 = 30;
const LINK_DETACH: i64 = 34;

/// `BPF_F_LOCK`-free update flag: create or replace.
pub const BPF_ANY: u64 = 0;

/// A zeroed `union bpf_attr` (128 bytes, more than any command here uses).
#[repr(C, align(8))]
struct Attr([u8; 128]);

impl Default for Attr {
    fn default() -> Self {
        Self([0u8; 128])
    }
}

impl Attr {
    fn u32(mut self, offset: usize, value: u32) -> Self {
        self.0[offset..offset + 4].copy_from_slice(&value.to_ne_bytes());
        self
    }

    fn u64(mut self, offset: usize, value: u64) -> Self {
        self.0[offset..offset + 8].copy_from_slice(&value.to_ne_bytes());
        self
    }

    fn ptr<T>(self, offset: usize, ptr: *const T) -> Self {
        self.u64(offset, ptr as usize as u64)
    }
}

/// Issues `bpf(cmd, attr, size)`; returns the non-negative result.
fn bpf(cmd: i64, attr: &mut Attr, size: usize) -> io::Result<i64> {
    // SAFETY: `attr` is a valid, writable buffer of at least `size` bytes that outlives the
    // call; every pointer stored in it was taken from a live slice or CString of the caller,
    // which stays borrowed until this function returns, with the length the kernel expects
    // for that command (checked by each caller).
    let ret = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.0.as_mut_ptr(), size) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Wraps a new fd returned by the kernel.
fn owned(fd: i64) -> io::Result<OwnedFd> {
    let raw = i32::try_from(fd).map_err(|_| io::Error::other("fd out of range"))?;
    // SAFETY: the kernel just returned `raw` as a new file descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

fn fd_u32(fd: BorrowedFd<'_>) -> u32 {
    fd.as_raw_fd() as u32
}

fn cpath(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)
}

/// `BPF_OBJ_GET`: opens a pinned map, program or link.
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let c = cpath(path)?;
    let mut attr = Attr::default().ptr(0, c.as_ptr());
    owned(bpf(OBJ_GET, &mut attr, 16)?)
}

/// `BPF_OBJ_PIN`: pins `fd` at `path` (parent must exist on bpffs, no dots in the name).
pub fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let c = cpath(path)?;
    let mut attr = Attr::default().ptr(0, c.as_ptr()).u32(8, fd_u32(fd));
    bpf(OBJ_PIN, &mut attr, 16).map(|_| ())
}

/// `BPF_LINK_UPDATE`: atomically replaces the program of `link` with `prog`.
pub fn link_update(link: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = Attr::default().u32(0, fd_u32(link)).u32(4, fd_u32(prog));
    bpf(LINK_UPDATE, &mut attr, 16).map(|_| ())
}

/// `BPF_LINK_GET_FD_BY_ID`: opens a link by id (fails with `ENOENT` once it is gone).
pub fn link_fd_by_id(id: u32) -> io::Result<OwnedFd> {
    let mut attr = Attr::default().u32(0, id);
    owned(bpf(LINK_GET_FD_BY_ID, &mut attr, 12)?)
}

/// `BPF_PROG_GET_FD_BY_ID`: opens a loaded program by id.
pub fn prog_fd_by_id(id: u32) -> io::Result<OwnedFd> {
    let mut attr = Attr::default().u32(0, id);
    owned(bpf(PROG_GET_FD_BY_ID, &mut attr, 12)?)
}

/// Kernel facts about a map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapFacts {
    /// `BPF_MAP_TYPE_*`.
    pub map_type: u32,
    /// Kernel id.
    pub id: u32,
    /// Key size in bytes.
    pub key_size: u32,
    /// Value size in bytes (per CPU for per-CPU maps).
    pub value_size: u32,
    /// Capacity.
    pub max_entries: u32,
}

/// Kernel facts about a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkFacts {
    /// Kernel link id.
    pub id: u32,
    /// Id of the program it runs.
    pub prog_id: u32,
}

fn obj_info(fd: BorrowedFd<'_>) -> io::Result<[u8; 256]> {
    let mut info = [0u8; 256];
    let mut attr = Attr::default()
        .u32(0, fd_u32(fd))
        .u32(4, info.len() as u32)
        .ptr(8, info.as_mut_ptr());
    bpf(OBJ_GET_INFO_BY_FD, &mut attr, 16)?;
    Ok(info)
}

fn read_u32(buf: &[u8], offset: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&buf[offset..offset + 4]);
    u32::from_ne_bytes(b)
}

/// `BPF_OBJ_GET_INFO_BY_FD` on a map.
pub fn map_facts(fd: BorrowedFd<'_>) -> io::Result<MapFacts> {
    let info = obj_info(fd)?;
    Ok(MapFacts {
        map_type: read_u32(&info, 0),
        id: read_u32(&info, 4),
        key_size: read_u32(&info, 8),
        value_size: read_u32(&info, 12),
        max_entries: read_u32(&info, 16),
    })
}

/// `BPF_OBJ_GET_INFO_BY_FD` on a link.
pub fn link_facts(fd: BorrowedFd<'_>) -> io::Result<LinkFacts> {
    let info = obj_info(fd)?;
    Ok(LinkFacts {
        id: read_u32(&info, 4),
        prog_id: read_u32(&info, 8),
    })
}

/// Every entry of a map, packed.
#[derive(Debug, Default)]
pub struct Dump {
    /// Keys, `count * key_size` bytes.
    pub keys: Vec<u8>,
    /// Values, `count * value_size` bytes.
    pub values: Vec<u8>,
    /// Number of entries.
    pub count: usize,
    /// Key size.
    pub key_size: usize,
    /// Value size.
    pub value_size: usize,
}

impl Dump {
    /// Iterates (key, value) pairs.
    pub fn entries(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.keys
            .chunks(self.key_size.max(1))
            .zip(self.values.chunks(self.value_size.max(1)))
            .take(self.count)
    }
}

/// A map opened by fd with its key and value sizes, for byte-level access.
#[derive(Debug)]
pub struct RawMap {
    fd: OwnedFd,
    /// Kernel facts read when opened.
    pub facts: MapFacts,
}

impl RawMap {
    /// Opens the map pinned at `path`.
    pub fn open(path: &Path) -> io::Result<Self> {
        let fd = obj_get(path)?;
        let facts = map_facts(fd.as_fd())?;
        Ok(Self { fd, facts })
    }

    /// Borrows the fd.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    fn check(&self, key: &[u8], value: Option<&[u8]>) -> io::Result<()> {
        if key.len() != self.facts.key_size as usize
            || value.is_some_and(|v| v.len() < self.facts.value_size as usize)
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "key or value size mismatch",
            ));
        }
        Ok(())
    }

    /// Looks `key` up into `value` (which must hold the whole value; per-CPU maps need
    /// `round_up(value_size, 8) * possible CPUs` bytes). Returns false if absent.
    pub fn lookup(&self, key: &[u8], value: &mut [u8]) -> io::Result<bool> {
        self.check(key, Some(value))?;
        let mut attr = Attr::default()
            .u32(0, fd_u32(self.fd()))
            .ptr(8, key.as_ptr())
            .ptr(16, value.as_mut_ptr());
        match bpf(MAP_LOOKUP_ELEM, &mut attr, 32) {
            Ok(_) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Creates or replaces one entry.
    pub fn update(&self, key: &[u8], value: &[u8]) -> io::Result<()> {
        self.check(key, Some(value))?;
        let mut attr = Attr::default()
            .u32(0, fd_u32(self.fd()))
            .ptr(8, key.as_ptr())
            .ptr(16, value.as_ptr())
            .u64(24, BPF_ANY);
        bpf(MAP_UPDATE_ELEM, &mut attr, 32).map(|_| ())
    }

    /// Deletes one entry; absent is not an error.
    pub fn delete(&self, key: &[u8]) -> io::Result<()> {
        self.check(key, None)?;
        let mut attr = Attr::default()
            .u32(0, fd_u32(self.fd()))
            .ptr(8, key.as_ptr());
        match bpf(MAP_DELETE_ELEM, &mut attr, 32) {
            Ok(_) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Every key of the map (hash maps; iteration order is the kernel's).
    pub fn keys(&self) -> io::Result<Vec<Vec<u8>>> {
        let size = self.facts.key_size as usize;
        let mut keys: Vec<Vec<u8>> = Vec::new();
        let mut next = vec![0u8; size];
        loop {
            let mut attr = Attr::default().u32(0, fd_u32(self.fd()));
            if let Some(prev) = keys.last() {
                attr = attr.ptr(8, prev.as_ptr());
            }
            attr = attr.ptr(16, next.as_mut_ptr());
            match bpf(MAP_GET_NEXT_KEY, &mut attr, 24) {
                Ok(_) => keys.push(next.clone()),
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(keys),
                Err(e) => return Err(e),
            }
        }
    }

    /// `BPF_MAP_LOOKUP_BATCH` over the whole map: every key and value, packed, with the count.
    /// Not for per-CPU maps.
    pub fn dump(&self) -> io::Result<Dump> {
        const CHUNK: usize = 4096;
        let ks = self.facts.key_size as usize;
        let vs = self.facts.value_size as usize;
        let mut out = Dump {
            keys: Vec::new(),
            values: Vec::new(),
            count: 0,
            key_size: ks,
            value_size: vs,
        };
        let mut keys = vec![0u8; CHUNK * ks];
        let mut values = vec![0u8; CHUNK * vs];
        let mut token_in = [0u8; 64];
        let mut token_out = [0u8; 64];
        let mut first = true;
        loop {
            let mut attr = Attr::default()
                .ptr(8, token_out.as_mut_ptr())
                .ptr(16, keys.as_mut_ptr())
                .ptr(24, values.as_mut_ptr())
                .u32(32, CHUNK as u32)
                .u32(36, fd_u32(self.fd()));
            if !first {
                attr = attr.ptr(0, token_in.as_ptr());
            }
            let res = bpf(MAP_LOOKUP_BATCH, &mut attr, 56);
            let n = read_u32(&attr.0, 32) as usize;
            let done = match res {
                Ok(_) => false,
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => true,
                Err(e) => return Err(e),
            };
            out.keys.extend_from_slice(&keys[..n * ks]);
            out.values.extend_from_slice(&values[..n * vs]);
            out.count += n;
            if done {
                return Ok(out);
            }
            token_in = token_out;
            first = false;
        }
    }

    /// `BPF_MAP_UPDATE_BATCH`: `keys` and `values` hold `count` packed entries.
    pub fn update_batch(&self, keys: &[u8], values: &[u8], count: usize) -> io::Result<()> {
        if count == 0 {
            return Ok(());
        }
        if keys.len() != count * self.facts.key_size as usize
            || values.len() != count * self.facts.value_size as usize
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "batch size mismatch",
            ));
        }
        let mut done = 0usize;
        while done < count {
            let ks = self.facts.key_size as usize;
            let vs = self.facts.value_size as usize;
            let mut n = (count - done) as u32;
            let mut attr = Attr::default()
                .ptr(16, keys[done * ks..].as_ptr())
                .ptr(24, values[done * vs..].as_ptr())
                .u32(32, n)
                .u32(36, fd_u32(self.fd()));
            let res = bpf(MAP_UPDATE_BATCH, &mut attr, 56);
            n = read_u32(&attr.0, 32);
            match res {
                Ok(_) => done += n as usize,
                Err(e) if n > 0 => {
                    done += n as usize;
                    if done >= count {
                        return Err(e);
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// `BPF_MAP_DELETE_BATCH`: `keys` holds `count` packed keys, all of which must exist.
    pub fn delete_batch(&self, keys: &[u8], count: usize) -> io::Result<()> {
        if count == 0 {
            return Ok(());
        }
        if keys.len() != count * self.facts.key_size as usize {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "batch size mismatch",
            ));
        }
        let mut attr = Attr::default()
            .ptr(16, keys.as_ptr())
            .u32(32, count as u32)
            .u32(36, fd_u32(self.fd()));
        bpf(MAP_DELETE_BATCH, &mut attr, 56).map(|_| ())
    }
}

/// `BPF_LINK_DETACH`: detaches a link from its hook (the link object lives on until closed).
pub fn link_detach(link: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = Attr::default().u32(0, fd_u32(link));
    bpf(LINK_DETACH, &mut attr, 4).map(|_| ())
}

/// Give memory the allocator holds but no longer uses back to the kernel. After a large
/// sync the parsed source and the diff are freed, but glibc keeps those pages in its arenas;
/// trimming keeps the agent's resident memory at what it actually holds.
pub fn release_free_memory() {
    // SAFETY: malloc_trim only walks glibc's own arenas and takes their locks; it has no
    // arguments that could point at memory we own and cannot invalidate live allocations.
    unsafe {
        libc::malloc_trim(0);
    }
}
