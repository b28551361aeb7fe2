//! How much host memory the process may still take: the smaller of what the kernel says is
//! available (`MemAvailable`) and what its memory cgroup leaves (a container's limit).
//!
//! Inside a container `/proc/meminfo` shows the host's memory, not the container's: a pod
//! limited to 4 GiB on a 64 GiB node would size its KV cache from the 64 and be OOM-killed.
//! So the process's memory cgroup, and each cgroup above it, is read as the kubelet reads it:
//! what is left is the limit less the working set (usage less the reclaimable inactive page
//! cache). cgroup v2: `memory.max` (`max`: no limit), `memory.current`, `memory.stat`'s
//! `inactive_file`; v1: `memory.limit_in_bytes` (9223372036854771712, or any value of 2^62
//! and more: no limit), `memory.usage_in_bytes`, `memory.stat`'s `total_inactive_file`.

use std::fmt;
use std::path::{Path, PathBuf};

/// The host memory still available to the process, and what bounds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostMemory {
    pub available: u64,
    pub bound: MemoryBound,
}

/// Which limit gave [`HostMemory::available`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemoryBound {
    /// `MemAvailable` in `/proc/meminfo` (no cgroup limit, or a looser one).
    MemAvailable,
    /// A memory cgroup's limit less its working set.
    Cgroup {
        /// 1 or 2.
        version: u8,
        /// The cgroup's directory.
        dir: PathBuf,
        limit: u64,
        working_set: u64,
    },
}

impl fmt::Display for MemoryBound {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MemoryBound::MemAvailable => write!(f, "MemAvailable (no tighter cgroup limit)"),
            MemoryBound::Cgroup {
                version,
                dir,
                limit,
                working_set,
            } => write!(
                f,
                "cgroup v{version} limit {} MiB less working set {} MiB ({})",
                limit >> 20,
                working_set >> 20,
                dir.display()
            ),
        }
    }
}

/// Limits at or above this are "no limit" (cgroup v1 writes 2^63 less a page).
const NO_LIMIT: u64 = 1 << 62;

/// The host memory available to this process, from the running system's files; `None` where
/// `/proc/meminfo` does not say (not Linux).
pub fn host_memory() -> Option<HostMemory> {
    host_memory_under(Path::new("/"))
}

/// As [`host_memory`], with `/proc` and the cgroup mounts under `root` (for tests).
pub fn host_memory_under(root: &Path) -> Option<HostMemory> {
    let meminfo = std::fs::read_to_string(root.join("proc/meminfo")).ok()?;
    let mem_available = parse_mem_available(&meminfo)?;
    let mut best = HostMemory {
        available: mem_available,
        bound: MemoryBound::MemAvailable,
    };
    for (available, bound) in cgroup_limits(root) {
        if available < best.available {
            best = HostMemory { available, bound };
        }
    }
    Some(best)
}

fn parse_mem_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let mut words = line.split_whitespace().skip(1);
    let kib: u64 = words.next()?.parse().ok()?;
    (words.next() == Some("kB")).then_some(kib * 1024)
}

/// A cgroup filesystem mounted at `mount_point`, showing its hierarchy from `root`.
struct Mount {
    version: u8,
    root: String,
    mount_point: PathBuf,
}

/// The cgroup mounts of `/proc/self/mountinfo`: cgroup2, and v1's with the memory controller.
fn cgroup_mounts(mountinfo: &str) -> Vec<Mount> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let (before, after) = line.split_once(" - ")?;
            let fields: Vec<&str> = before.split_whitespace().collect();
            let mut tail = after.split_whitespace();
            let (fstype, _source, options) =
                (tail.next()?, tail.next()?, tail.next().unwrap_or(""));
            let version = match fstype {
                "cgroup2" => 2,
                "cgroup" if options.split(',').any(|o| o == "memory") => 1,
                _ => return None,
            };
            Some(Mount {
                version,
                root: unescape(fields.get(3)?),
                mount_point: PathBuf::from(unescape(fields.get(4)?)),
            })
        })
        .collect()
}

/// mountinfo writes space, tab, newline and backslash as octal escapes.
fn unescape(field: &str) -> String {
    field
        .replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// The process's cgroup path for `version` from `/proc/self/cgroup`.
fn cgroup_path(proc_cgroup: &str, version: u8) -> Option<&str> {
    proc_cgroup.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (id, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let matches = match version {
            2 => id == "0" && controllers.is_empty(),
            _ => controllers.split(',').any(|c| c == "memory"),
        };
        matches.then_some(path)
    })
}

/// Each limited cgroup from the process's up to its mount's top: what it leaves and why.
fn cgroup_limits(root: &Path) -> Vec<(u64, MemoryBound)> {
    let read = |p: &str| std::fs::read_to_string(root.join(p)).unwrap_or_default();
    let (mountinfo, proc_cgroup) = (read("proc/self/mountinfo"), read("proc/self/cgroup"));
    let mut out = Vec::new();
    for mount in cgroup_mounts(&mountinfo) {
        let Some(path) = cgroup_path(&proc_cgroup, mount.version) else {
            continue;
        };
        let top = root.join(
            mount
                .mount_point
                .strip_prefix("/")
                .unwrap_or(&mount.mount_point),
        );
        // Inside a cgroup namespace or a container the mount shows a subtree: the process's
        // path is relative to the mount's root; where it cannot be found, the top stands in.
        let relative = Path::new(path)
            .strip_prefix(&mount.root)
            .unwrap_or(Path::new(path));
        let relative = relative.strip_prefix("/").unwrap_or(relative);
        let mut dir = top.join(relative);
        if !dir.is_dir() {
            dir = top.clone();
        }
        loop {
            if let Some(found) = limit_at(&dir, mount.version) {
                out.push(found);
            }
            if dir == top || !dir.pop() || !dir.starts_with(&top) {
                break;
            }
        }
    }
    out
}

fn read_u64(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn stat_field(stat: &str, key: &str) -> Option<u64> {
    stat.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

/// The memory one cgroup still leaves, if it has a limit.
fn limit_at(dir: &Path, version: u8) -> Option<(u64, MemoryBound)> {
    let (limit, usage, inactive) = match version {
        2 => {
            let max = std::fs::read_to_string(dir.join("memory.max")).ok()?;
            let limit: u64 = max.trim().parse().ok()?; // "max": no limit
            let stat = std::fs::read_to_string(dir.join("memory.stat")).unwrap_or_default();
            let usage = read_u64(&dir.join("memory.current"))?;
            (
                limit,
                usage,
                stat_field(&stat, "inactive_file").unwrap_or(0),
            )
        }
        _ => {
            let limit = read_u64(&dir.join("memory.limit_in_bytes"))?;
            let stat = std::fs::read_to_string(dir.join("memory.stat")).unwrap_or_default();
            let usage = read_u64(&dir.join("memory.usage_in_bytes"))?;
            let inactive = stat_field(&stat, "total_inactive_file")
                .or_else(|| stat_field(&stat, "inactive_file"))
                .unwrap_or(0);
            (limit, usage, inactive)
        }
    };
    if limit >= NO_LIMIT {
        return None;
    }
    let working_set = usage.saturating_sub(inactive);
    Some((
        limit.saturating_sub(working_set),
        MemoryBound::Cgroup {
            version,
            dir: dir.to_path_buf(),
            limit,
            working_set,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;
    const MIB: u64 = 1 << 20;

    /// A fake system under a temporary root: `files` are (path, contents).
    fn system(files: &[(&str, String)]) -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        for (path, text) in files {
            let p = root.path().join(path);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        }
        root
    }

    fn meminfo(available: u64) -> (&'static str, String) {
        (
            "proc/meminfo",
            format!(
                "MemTotal: 67108864 kB\nMemAvailable: {} kB\n",
                available / 1024
            ),
        )
    }

    const V2_MOUNT: &str =
        "30 24 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate\n";
    const V1_MOUNT: &str =
        "25 24 0:22 / /sys/fs/cgroup/memory rw,nosuid - cgroup cgroup rw,memory\n\
                            26 24 0:23 / /sys/fs/cgroup/cpu rw,nosuid - cgroup cgroup rw,cpu\n";

    #[test]
    fn meminfo_alone_without_cgroups() {
        let root = system(&[meminfo(20 * GIB)]);
        let m = host_memory_under(root.path()).unwrap();
        assert_eq!(
            m,
            HostMemory {
                available: 20 * GIB,
                bound: MemoryBound::MemAvailable
            }
        );
        assert_eq!(parse_mem_available("MemTotal: 1 kB\n"), None);
        assert_eq!(parse_mem_available("MemAvailable: many kB\n"), None);
        assert!(host_memory_under(Path::new("/nonexistent")).is_none());
    }

    #[test]
    fn a_v2_container_limit_less_its_working_set() {
        // A pod limited to 4 GiB on a 64 GiB node: 1.5 GiB used, of which 0.5 GiB is
        // reclaimable page cache.
        let stat = format!("anon 1000\ninactive_file {}\nactive_file 5\n", 512 * MIB);
        let root = system(&[
            meminfo(60 * GIB),
            ("proc/self/mountinfo", V2_MOUNT.into()),
            ("proc/self/cgroup", "0::/\n".into()),
            ("sys/fs/cgroup/memory.max", format!("{}\n", 4 * GIB)),
            ("sys/fs/cgroup/memory.current", format!("{}\n", 1536 * MIB)),
            ("sys/fs/cgroup/memory.stat", stat),
        ]);
        let m = host_memory_under(root.path()).unwrap();
        assert_eq!(m.available, 3 * GIB);
        match &m.bound {
            MemoryBound::Cgroup {
                version: 2,
                limit,
                working_set,
                ..
            } => {
                assert_eq!((*limit, *working_set), (4 * GIB, GIB));
            }
            other => panic!("{other:?}"),
        }
        assert!(
            m.bound.to_string().contains("cgroup v2 limit 4096 MiB"),
            "{}",
            m.bound
        );
    }

    #[test]
    fn v2_max_means_no_limit_and_a_parent_limit_counts() {
        let root = system(&[
            meminfo(10 * GIB),
            ("proc/self/mountinfo", V2_MOUNT.into()),
            ("proc/self/cgroup", "0::/kubepods/pod1/ctr\n".into()),
            ("sys/fs/cgroup/kubepods/pod1/ctr/memory.max", "max\n".into()),
            (
                "sys/fs/cgroup/kubepods/pod1/ctr/memory.current",
                "100\n".into(),
            ),
            (
                "sys/fs/cgroup/kubepods/pod1/memory.max",
                format!("{}\n", 2 * GIB),
            ),
            (
                "sys/fs/cgroup/kubepods/pod1/memory.current",
                format!("{}\n", GIB),
            ),
            ("sys/fs/cgroup/kubepods/memory.max", "max\n".into()),
            ("sys/fs/cgroup/kubepods/memory.current", "100\n".into()),
        ]);
        let m = host_memory_under(root.path()).unwrap();
        assert_eq!(m.available, GIB);
        match &m.bound {
            MemoryBound::Cgroup { dir, .. } => assert!(dir.ends_with("kubepods/pod1"), "{dir:?}"),
            other => panic!("{other:?}"),
        }
        // Unlimited all the way up: MemAvailable.
        let root = system(&[
            meminfo(10 * GIB),
            ("proc/self/mountinfo", V2_MOUNT.into()),
            ("proc/self/cgroup", "0::/user.slice\n".into()),
            ("sys/fs/cgroup/user.slice/memory.max", "max\n".into()),
            ("sys/fs/cgroup/user.slice/memory.current", "100\n".into()),
        ]);
        let m = host_memory_under(root.path()).unwrap();
        assert_eq!(m.bound, MemoryBound::MemAvailable);
    }

    #[test]
    fn v1_limits_and_their_no_limit_value() {
        let stat = format!(
            "cache 9\ninactive_file 1\ntotal_inactive_file {}\n",
            256 * MIB
        );
        let files = |limit: u64| {
            vec![
                meminfo(20 * GIB),
                ("proc/self/mountinfo", V1_MOUNT.to_string()),
                (
                    "proc/self/cgroup",
                    "5:cpu:/\n4:memory:/docker/abc\n0::/\n".to_string(),
                ),
                (
                    "sys/fs/cgroup/memory/docker/abc/memory.limit_in_bytes",
                    format!("{limit}\n"),
                ),
                (
                    "sys/fs/cgroup/memory/docker/abc/memory.usage_in_bytes",
                    format!("{}\n", 768 * MIB),
                ),
                ("sys/fs/cgroup/memory/docker/abc/memory.stat", stat.clone()),
            ]
        };
        let root = system(&files(GIB));
        let m = host_memory_under(root.path()).unwrap();
        assert_eq!(m.available, GIB - 512 * MIB);
        assert!(matches!(m.bound, MemoryBound::Cgroup { version: 1, .. }));
        let root = system(&files(9_223_372_036_854_771_712));
        assert_eq!(
            host_memory_under(root.path()).unwrap().bound,
            MemoryBound::MemAvailable
        );
        // The limit is above what is free: MemAvailable is the tighter bound.
        let root = system(&files(30 * GIB));
        assert_eq!(host_memory_under(root.path()).unwrap().available, 20 * GIB);
    }

    #[test]
    fn a_namespaced_v1_mount_shows_the_process_cgroup_at_its_top() {
        // Inside a container: /proc/self/cgroup names the host's path, the mount shows only
        // the container's subtree (root /docker/abc) at /sys/fs/cgroup/memory.
        let root = system(&[
            meminfo(20 * GIB),
            (
                "proc/self/mountinfo",
                "25 24 0:22 /docker/abc /sys/fs/cgroup/memory ro - cgroup cgroup rw,memory\n"
                    .into(),
            ),
            ("proc/self/cgroup", "4:memory:/docker/abc\n".into()),
            (
                "sys/fs/cgroup/memory/memory.limit_in_bytes",
                format!("{}\n", 2 * GIB),
            ),
            (
                "sys/fs/cgroup/memory/memory.usage_in_bytes",
                format!("{GIB}\n"),
            ),
        ]);
        assert_eq!(host_memory_under(root.path()).unwrap().available, GIB);
    }

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape("/a\\040b"), "/a b");
        let mounts = cgroup_mounts(V1_MOUNT);
        assert_eq!(mounts.len(), 1);
        assert_eq!(
            mounts[0].mount_point,
            PathBuf::from("/sys/fs/cgroup/memory")
        );
    }
}
