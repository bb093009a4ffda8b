//! The cgroup v2 directory the socket programs attach to: checked when given (`--cgroup`),
//! found in `/proc/self/mountinfo` when not.
//!
//! ```text
//!  --cgroup P ──────────────────────────────────────────────► statfs(P) == cgroup2? ─► P
//!  (none) ─► /proc/self/mountinfo ─► choose (pure) ─► widest cgroup2 mount ─► statfs ─► path
//!            /proc/self/ns/cgroup ─┘ (inside a cgroup namespace "/" is only our own subtree)
//! ```
//!
//! The mount root (4th mountinfo field) says which part of the hierarchy a mount shows,
//! relative to the reader's cgroup namespace. On a host the one cgroup2 mount has root `/`
//! (`/sys/fs/cgroup` on cgroup-v2-only nodes, `/sys/fs/cgroup/unified` on hybrid ones). In a
//! container with its own cgroup namespace, `/sys/fs/cgroup` shows root `/` = the container's
//! own cgroup, while a hostPath bind of the node's `/sys/fs/cgroup` shows `/..` (or `/../..`,
//! one `..` per level between the container's cgroup and the node's root): the mount whose
//! root climbs highest covers the widest part of the hierarchy, and that is the one to attach
//! to.

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::path::{Component, Path, PathBuf};

/// `statfs` magic of cgroup2 (`CGROUP2_SUPER_MAGIC`).
pub const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// Inode of the initial cgroup namespace (`PROC_CGROUP_INIT_INO`, fixed by the kernel).
const INITIAL_CGROUP_NAMESPACE_INODE: u64 = 0xEFFF_FFFB;

const MOUNTINFO: &str = "/proc/self/mountinfo";
const OWN_CGROUP_NAMESPACE: &str = "/proc/self/ns/cgroup";

/// Errors of finding or checking the cgroup the programs attach to.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// The mount table could not be read.
    #[error("failed to read {path} to find the node's cgroup2 mount")]
    ReadMountinfo {
        /// The file read.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// No cgroup2 mount at all.
    #[error(
        "failed to find a cgroup2 mount in {MOUNTINFO}: the node must run cgroup v2 (unified or hybrid); in a container, mount the host's /sys/fs/cgroup, or pass --cgroup"
    )]
    NoCgroup2Mount,
    /// Inside a cgroup namespace only the container's own subtree is mounted.
    #[error(
        "no cgroup2 mount of the node's hierarchy; mount the host's /sys/fs/cgroup (a hostPath volume, e.g. at /host/sys/fs/cgroup): {seen} shows only this container's own cgroup"
    )]
    OnlyOwnCgroup {
        /// The widest cgroup2 mount found.
        seen: PathBuf,
    },
    /// The given or found path is not cgroup v2.
    #[error(
        "{path} is not a cgroup v2 directory ({detail}); point --cgroup (MESHLET_CGROUP) at the node's cgroup2 mount, or leave it out to find it"
    )]
    NotCgroup2 {
        /// The path refused.
        path: PathBuf,
        /// Why it was refused.
        detail: String,
    },
}

/// A cgroup2 mount from the mount table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cgroup2Mount {
    /// Where it is mounted.
    pub mount_point: PathBuf,
    /// Which part of the hierarchy it shows, relative to the reader's cgroup namespace.
    pub root: PathBuf,
}

impl Cgroup2Mount {
    /// How many levels above the reader's namespace root this mount's root lies: `/..` is 1,
    /// `/` is 0, a bind of a child cgroup (`/child`) is -1.
    pub fn height(&self) -> i64 {
        self.root
            .components()
            .map(|c| match c {
                Component::ParentDir => 1,
                Component::Normal(_) => -1,
                _ => 0,
            })
            .sum()
    }
}

/// How the attach point was chosen (logged with it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// `--cgroup` / `MESHLET_CGROUP`.
    Flag,
    /// The widest cgroup2 mount in the mount table.
    Mountinfo,
}

impl Origin {
    /// Lower-case name for logs.
    pub fn name(self) -> &'static str {
        match self {
            Origin::Flag => "flag",
            Origin::Mountinfo => "mountinfo",
        }
    }
}

/// The cgroup the programs attach to and how it was chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachCgroup {
    /// The cgroup v2 directory.
    pub path: PathBuf,
    /// Where it came from.
    pub origin: Origin,
}

/// `--cgroup` when given (checked), otherwise the node's cgroup2 root from the mount table.
pub fn resolve(given: Option<&Path>) -> Result<AttachCgroup, CgroupError> {
    if let Some(path) = given {
        check_cgroup2(path)?;
        return Ok(AttachCgroup {
            path: path.to_path_buf(),
            origin: Origin::Flag,
        });
    }
    let text = std::fs::read_to_string(MOUNTINFO).map_err(|source| CgroupError::ReadMountinfo {
        path: MOUNTINFO.into(),
        source,
    })?;
    let chosen = choose(&text, in_cgroup_namespace())?;
    check_cgroup2(&chosen.mount_point)?;
    Ok(AttachCgroup {
        path: chosen.mount_point,
        origin: Origin::Mountinfo,
    })
}

/// True when this process runs in a cgroup namespace other than the initial one.
fn in_cgroup_namespace() -> bool {
    // The link reads `cgroup:[<inode>]`; without cgroup namespaces (kernel < 4.6) it is missing.
    std::fs::read_link(OWN_CGROUP_NAMESPACE)
        .ok()
        .and_then(|l| namespace_inode(&l.to_string_lossy()))
        .is_some_and(|inode| inode != INITIAL_CGROUP_NAMESPACE_INODE)
}

fn namespace_inode(link: &str) -> Option<u64> {
    link.strip_prefix("cgroup:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// Checks with `statfs` that `path` is a cgroup2 mount or a directory in one.
pub fn check_cgroup2(path: &Path) -> Result<(), CgroupError> {
    let refuse = |detail: String| CgroupError::NotCgroup2 {
        path: path.to_path_buf(),
        detail,
    };
    let magic =
        crate::bpffs::filesystem_magic(path).map_err(|e| refuse(e.desc().to_lowercase()))?;
    if magic != CGROUP2_SUPER_MAGIC {
        return Err(refuse(format!("filesystem type {magic:#x}")));
    }
    if !path.is_dir() {
        return Err(refuse("not a directory".into()));
    }
    Ok(())
}

/// Chooses, among the cgroup2 mounts of `mountinfo`, the one covering the widest part of the
/// hierarchy (the first of equals). Inside a cgroup namespace a mount that shows no more than
/// the namespace's own root is only the container's subtree, and is refused.
pub fn choose(mountinfo: &str, in_cgroup_namespace: bool) -> Result<Cgroup2Mount, CgroupError> {
    let mut best: Option<Cgroup2Mount> = None;
    for mount in mountinfo.lines().filter_map(parse_cgroup2_line) {
        if best.as_ref().is_none_or(|b| mount.height() > b.height()) {
            best = Some(mount);
        }
    }
    let best = best.ok_or(CgroupError::NoCgroup2Mount)?;
    if in_cgroup_namespace && best.height() <= 0 {
        return Err(CgroupError::OnlyOwnCgroup {
            seen: best.mount_point,
        });
    }
    Ok(best)
}

/// The mount of one mountinfo line if it is a cgroup2 mount:
/// `ID PARENT MAJ:MIN ROOT MOUNT_POINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER_OPTIONS`.
fn parse_cgroup2_line(line: &str) -> Option<Cgroup2Mount> {
    let (left, right) = line.split_once(" - ")?;
    if right.split(' ').next()? != "cgroup2" {
        return None;
    }
    let mut fields = left.split(' ');
    let root = fields.nth(3)?;
    let mount_point = fields.next()?;
    Some(Cgroup2Mount {
        mount_point: unescape(mount_point),
        root: unescape(root),
    })
}

/// Undoes the kernel's octal escapes in mountinfo paths (`\040` space, `\011` tab, `\012`
/// newline, `\134` backslash).
fn unescape(field: &str) -> PathBuf {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).filter(|d| {
            bytes[i] == b'\\' && d.iter().all(|b| (b'0'..=b'7').contains(b)) && d[0] <= b'3'
        });
        match octal {
            Some(d) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    PathBuf::from(OsString::from_vec(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A v2-only node (Debian 12, Ubuntu 22.04+, any systemd with unified cgroups).
    const V2_HOST: &str = "\
22 28 0:21 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
26 22 0:24 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
27 22 0:25 / /sys/fs/bpf rw,nosuid,nodev,noexec,relatime shared:10 - bpf bpf rw,mode=700
";

    /// A hybrid node: v1 controllers under a tmpfs, cgroup2 at /sys/fs/cgroup/unified.
    const HYBRID_HOST: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
45 23 0:40 / /sys/fs/bpf rw,relatime - bpf bpf rw
";

    /// A container with its own cgroup namespace (runc, as containerd runs pods) and a
    /// hostPath bind of the node's /sys/fs/cgroup; lines as runc 1.1.5 shows them.
    const CONTAINER_WITH_HOST_BIND: &str = "\
70 60 0:50 / / ro,relatime - overlay overlay rw,lowerdir=/l,upperdir=/u,workdir=/w
76 70 0:22 / /sys ro,nosuid,nodev,noexec,relatime - sysfs sysfs ro
77 76 0:38 / /sys/fs/cgroup ro,nosuid,nodev,noexec,relatime - cgroup2 cgroup2 rw
78 70 0:38 /.. /host/sys/fs/cgroup ro,relatime - cgroup2 cgroup2 rw
79 76 0:41 / /sys/fs/bpf rw,relatime master:10 - bpf bpffs rw
";

    /// The same container without the hostPath bind.
    const CONTAINER_WITHOUT_HOST_BIND: &str = "\
70 60 0:50 / / ro,relatime - overlay overlay rw,lowerdir=/l,upperdir=/u,workdir=/w
76 70 0:22 / /sys ro,nosuid,nodev,noexec,relatime - sysfs sysfs ro
77 76 0:38 / /sys/fs/cgroup ro,nosuid,nodev,noexec,relatime - cgroup2 cgroup2 rw
79 76 0:41 / /sys/fs/bpf rw,relatime master:10 - bpf bpffs rw
";

    fn chosen(mountinfo: &str, in_namespace: bool) -> PathBuf {
        choose(mountinfo, in_namespace)
            .expect("a cgroup2 mount")
            .mount_point
    }

    #[test]
    fn a_v2_only_node_attaches_at_sys_fs_cgroup() {
        assert_eq!(chosen(V2_HOST, false), PathBuf::from("/sys/fs/cgroup"));
    }

    #[test]
    fn a_hybrid_node_attaches_at_its_unified_hierarchy() {
        assert_eq!(
            chosen(HYBRID_HOST, false),
            PathBuf::from("/sys/fs/cgroup/unified")
        );
    }

    #[test]
    fn a_container_attaches_through_the_host_bind_not_its_own_cgroup() {
        assert_eq!(
            chosen(CONTAINER_WITH_HOST_BIND, true),
            PathBuf::from("/host/sys/fs/cgroup")
        );
        // Listed before the container's own mount, the bind still wins: it is wider.
        let reordered: String = CONTAINER_WITH_HOST_BIND
            .lines()
            .rev()
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(
            chosen(&reordered, true),
            PathBuf::from("/host/sys/fs/cgroup")
        );
    }

    #[test]
    fn the_bind_two_levels_up_wins_over_one_level_up() {
        let text = format!(
            "{CONTAINER_WITH_HOST_BIND}90 70 0:38 /../.. /node rw,relatime - cgroup2 cgroup2 rw\n"
        );
        assert_eq!(chosen(&text, true), PathBuf::from("/node"));
    }

    #[test]
    fn a_container_without_the_host_bind_is_refused_with_what_to_mount() {
        let err = choose(CONTAINER_WITHOUT_HOST_BIND, true).expect_err("own subtree only");
        let text = err.to_string();
        assert!(
            text.contains(
                "no cgroup2 mount of the node's hierarchy; mount the host's /sys/fs/cgroup"
            ),
            "{text}"
        );
        assert!(text.contains("/sys/fs/cgroup"), "{text}");
    }

    #[test]
    fn a_node_without_cgroup2_is_refused() {
        let v1_only = "31 23 0:28 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n\
                       32 31 0:29 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n";
        let err = choose(v1_only, false).expect_err("no cgroup2");
        assert!(matches!(err, CgroupError::NoCgroup2Mount), "{err}");
        assert!(err.to_string().contains("cgroup v2"), "{err}");
    }

    #[test]
    fn equally_wide_mounts_resolve_to_the_first() {
        let text = format!("{V2_HOST}50 22 0:24 / /host/sys/fs/cgroup rw - cgroup2 cgroup2 rw\n");
        assert_eq!(chosen(&text, false), PathBuf::from("/sys/fs/cgroup"));
    }

    #[test]
    fn a_bind_of_a_child_cgroup_loses_to_the_root() {
        let text = format!(
            "60 22 0:24 /kubepods /sys/fs/cgroup/kubepods rw - cgroup2 cgroup2 rw\n{V2_HOST}"
        );
        assert_eq!(chosen(&text, false), PathBuf::from("/sys/fs/cgroup"));
    }

    #[test]
    fn escaped_octal_in_mount_points_and_roots_is_decoded() {
        let text = "78 70 0:38 /.. /host/my\\040cgroup\\011dir\\134 ro - cgroup2 cgroup2 rw\n";
        let m = choose(text, true).expect("the bind");
        assert_eq!(m.mount_point, PathBuf::from("/host/my cgroup\tdir\\"));
        assert_eq!(m.height(), 1);
        assert_eq!(unescape("/pod\\012x"), PathBuf::from("/pod\nx"));
        // A backslash not followed by three octal digits stays as it is.
        assert_eq!(unescape("/a\\9b\\04"), PathBuf::from("/a\\9b\\04"));
    }

    #[test]
    fn optional_fields_and_a_dash_in_a_path_do_not_confuse_the_parser() {
        let text =
            "41 31 0:38 / /sys/fs/cgroup/un-ified rw shared:9 master:2 - cgroup2 cgroup2 rw\n";
        assert_eq!(
            chosen(text, false),
            PathBuf::from("/sys/fs/cgroup/un-ified")
        );
    }

    #[test]
    fn the_cgroup_namespace_link_is_parsed() {
        assert_eq!(namespace_inode("cgroup:[4026531835]"), Some(4_026_531_835));
        assert_eq!(
            namespace_inode("cgroup:[4026531835]"),
            Some(INITIAL_CGROUP_NAMESPACE_INODE)
        );
        assert_eq!(namespace_inode("net:[1]"), None);
    }

    #[test]
    fn a_path_that_is_not_cgroup2_is_refused_naming_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = check_cgroup2(dir.path()).expect_err("tmpfs or disk is not cgroup2");
        let text = err.to_string();
        assert!(text.contains(&dir.path().display().to_string()), "{text}");
        assert!(text.contains("not a cgroup v2 directory"), "{text}");
        let err = check_cgroup2(Path::new("/nonexistent/meshlet")).expect_err("missing");
        assert!(err.to_string().contains("/nonexistent/meshlet"), "{err}");
    }
}
