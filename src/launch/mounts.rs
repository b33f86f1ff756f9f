//! The PID 1 shape's first act: the pseudo file systems that everything else needs, as a
//! table (kata's `INIT_ROOTFS_MOUNTS`) applied through [`Sys`], then what udev or systemd
//! would have made: configfs on `/sys/kernel/config` (configfs-tsm, the `tdx` provider) and
//! the `/dev/fd`, `/dev/stdin`, `/dev/stdout`, `/dev/stderr` links (`nft -f -` opens
//! `/dev/stdin`; workloads use `/dev/fd/N`).

use std::path::{Path, PathBuf};

use nix::mount::MsFlags;
use serde::Serialize;

use crate::sys::{Sys, SysError};

/// One early mount.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MountSpec {
    /// Source (the pseudo file system's name).
    pub source: &'static str,
    /// Mount point (created when missing).
    pub target: &'static str,
    /// File-system type.
    pub fstype: &'static str,
    /// Flags.
    pub flags: MsFlags,
    /// Options.
    pub data: Option<&'static str>,
}

/// The early mounts, in mount order. Pure.
///
/// - `/proc`, `/sys`: `nosuid,nodev,noexec` (nothing there is a device or a program).
/// - `/dev`: `devtmpfs`, `nosuid`, mode 0755 (device nodes must work, so not `nodev`; left
///   executable as systemd does, since some GPU drivers map device memory executable).
/// - `/dev/shm`: POSIX shared memory for the workload (PyTorch data loaders, NCCL),
///   `nosuid,nodev,noexec`, mode 1777.
/// - `/run`: `nosuid,nodev`, mode 0755 (the `copy` bundle gets its own tmpfs below it).
/// - `/tmp`: `nosuid,nodev`, mode 1777.
pub fn early_mount_table() -> Vec<MountSpec> {
    let nosuid_nodev = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    vec![
        MountSpec {
            source: "proc",
            target: "/proc",
            fstype: "proc",
            flags: nosuid_nodev | MsFlags::MS_NOEXEC,
            data: None,
        },
        MountSpec {
            source: "sysfs",
            target: "/sys",
            fstype: "sysfs",
            flags: nosuid_nodev | MsFlags::MS_NOEXEC,
            data: None,
        },
        MountSpec {
            source: "devtmpfs",
            target: "/dev",
            fstype: "devtmpfs",
            flags: MsFlags::MS_NOSUID,
            data: Some("mode=0755"),
        },
        MountSpec {
            source: "tmpfs",
            target: "/dev/shm",
            fstype: "tmpfs",
            flags: nosuid_nodev | MsFlags::MS_NOEXEC,
            data: Some("mode=1777"),
        },
        MountSpec {
            source: "tmpfs",
            target: "/run",
            fstype: "tmpfs",
            flags: nosuid_nodev,
            data: Some("mode=0755"),
        },
        MountSpec {
            source: "tmpfs",
            target: "/tmp",
            fstype: "tmpfs",
            flags: nosuid_nodev,
            data: Some("mode=1777"),
        },
    ]
}

/// The links systemd (`tmpfiles.d/static-nodes`, `mount-setup`) and udev make in `/dev`, as
/// (link, target), made where nothing is at the link's path yet.
pub const DEV_LINKS: [(&str, &str); 4] = [
    ("/dev/fd", "/proc/self/fd"),
    ("/dev/stdin", "/proc/self/fd/0"),
    ("/dev/stdout", "/proc/self/fd/1"),
    ("/dev/stderr", "/proc/self/fd/2"),
];

/// configfs: mounted here when the kernel has it (the directory exists exactly then).
pub const CONFIGFS: MountSpec = MountSpec {
    source: "configfs",
    target: "/sys/kernel/config",
    fstype: "configfs",
    flags: MsFlags::MS_NOSUID
        .union(MsFlags::MS_NODEV)
        .union(MsFlags::MS_NOEXEC),
    data: None,
};

/// What [`early_mounts`] did (for the audit log).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct EarlyMounts {
    /// Mount points mounted now, in order.
    pub mounted: Vec<PathBuf>,
    /// Links created now in `/dev`.
    pub linked: Vec<PathBuf>,
}

/// Mounts every entry of [`early_mount_table`] whose target is not a mount point yet
/// (creating the directory first), then configfs ([`mount_configfs`]), then creates the
/// [`DEV_LINKS`] that are missing. The first failure stops it: without `/proc` and `/dev`
/// nothing after can be trusted to work.
///
/// Before `/proc` is mounted the mount table cannot be read, so every entry counts as absent
/// until then; `/proc` comes first in the table for that reason.
pub fn early_mounts(sys: &dyn Sys) -> Result<EarlyMounts, SysError> {
    let mut done = EarlyMounts::default();
    for spec in early_mount_table() {
        let target = Path::new(spec.target);
        if sys.is_mountpoint(target) {
            continue;
        }
        sys.mkdir_all(target)?;
        sys.mount(
            Some(spec.source),
            target,
            Some(spec.fstype),
            spec.flags,
            spec.data,
        )?;
        done.mounted.push(target.to_path_buf());
    }
    if let Some(target) = mount_configfs(sys)? {
        done.mounted.push(target);
    }
    for (link, target) in DEV_LINKS {
        let link = Path::new(link);
        if sys.exists(link) {
            continue;
        }
        sys.symlink(Path::new(target), link)?;
        done.linked.push(link.to_path_buf());
    }
    Ok(done)
}

/// Mounts configfs on [`CONFIGFS`]'s target when that directory exists (the kernel has
/// configfs: built in, or its module loaded since) and nothing is mounted there yet; returns
/// the target when it mounted it. Called again after the policy's modules were loaded.
pub fn mount_configfs(sys: &dyn Sys) -> Result<Option<PathBuf>, SysError> {
    let target = Path::new(CONFIGFS.target);
    if !sys.is_dir(target) || sys.is_mountpoint(target) {
        return Ok(None);
    }
    sys.mount(
        Some(CONFIGFS.source),
        target,
        Some(CONFIGFS.fstype),
        CONFIGFS.flags,
        CONFIGFS.data,
    )?;
    Ok(Some(target.to_path_buf()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use nix::errno::Errno;

    use super::*;
    use crate::sys::{FakeSys, Op, SysCall};

    #[test]
    fn table_mounts_proc_first_and_hardens_every_entry() {
        let table = early_mount_table();
        assert_eq!(table[0].target, "/proc");
        let targets: Vec<_> = table.iter().map(|m| m.target).collect();
        assert_eq!(
            targets,
            ["/proc", "/sys", "/dev", "/dev/shm", "/run", "/tmp"]
        );
        for spec in &table {
            assert!(spec.flags.contains(MsFlags::MS_NOSUID), "{spec:?}");
            if spec.target != "/dev" {
                assert!(spec.flags.contains(MsFlags::MS_NODEV), "{spec:?}");
            }
        }
        let tmp = table.iter().find(|m| m.target == "/tmp").unwrap();
        assert_eq!(tmp.data, Some("mode=1777"));
        let run = table.iter().find(|m| m.target == "/run").unwrap();
        assert_eq!(run.data, Some("mode=0755"));
    }

    #[test]
    fn a_bare_initramfs_gets_every_mount_and_the_dev_links() {
        let sys = FakeSys::new().with_mounted(["/"]);
        let done = early_mounts(&sys).unwrap();
        assert_eq!(
            done.mounted,
            ["/proc", "/sys", "/dev", "/dev/shm", "/run", "/tmp"].map(PathBuf::from)
        );
        assert_eq!(
            done.linked,
            ["/dev/fd", "/dev/stdin", "/dev/stdout", "/dev/stderr"].map(PathBuf::from)
        );
        let calls = sys.calls();
        assert_eq!(calls[0], SysCall::MkdirAll("/proc".into()));
        assert_eq!(
            calls[1],
            SysCall::Mount {
                source: Some("proc".into()),
                target: "/proc".into(),
                fstype: Some("proc".into()),
                flags: MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
                data: None,
            }
        );
        // No /sys/kernel/config in this kernel: no configfs.
        assert!(!calls.iter().any(
            |c| matches!(c, SysCall::Mount { fstype, .. } if fstype.as_deref() == Some("configfs"))
        ));
        assert_eq!(
            calls[12..],
            [
                ("/proc/self/fd", "/dev/fd"),
                ("/proc/self/fd/0", "/dev/stdin"),
                ("/proc/self/fd/1", "/dev/stdout"),
                ("/proc/self/fd/2", "/dev/stderr"),
            ]
            .map(|(target, link)| SysCall::Symlink {
                target: target.into(),
                link: link.into(),
            })
        );
        assert_eq!(calls.len(), 16);
    }

    #[test]
    fn configfs_is_mounted_when_the_kernel_has_it_and_existing_links_are_kept() {
        let sys = FakeSys::new()
            .with_mounted(["/", "/proc", "/sys", "/dev", "/dev/shm", "/run", "/tmp"])
            .with_dirs(["/sys/kernel/config"])
            .with_files(["/dev/stdin", "/dev/fd"]);
        let done = early_mounts(&sys).unwrap();
        assert_eq!(done.mounted, [PathBuf::from("/sys/kernel/config")]);
        assert_eq!(
            done.linked,
            ["/dev/stdout", "/dev/stderr"].map(PathBuf::from)
        );
        assert_eq!(
            sys.calls()[0],
            SysCall::Mount {
                source: Some("configfs".into()),
                target: "/sys/kernel/config".into(),
                fstype: Some("configfs".into()),
                flags: MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
                data: None,
            }
        );
        // Mounted once: a second call (after the modules were loaded) leaves it alone.
        assert_eq!(mount_configfs(&sys).unwrap(), None);
        assert_eq!(sys.calls().len(), 3);
    }

    #[test]
    fn a_failed_link_stops_and_names_it() {
        let sys = FakeSys::new()
            .with_mounted(["/", "/proc", "/sys", "/dev", "/dev/shm", "/run", "/tmp"])
            .fail_on(Op::Symlink, Errno::EROFS);
        let error = early_mounts(&sys).unwrap_err();
        assert_eq!(
            error.to_string(),
            "create symbolic link /dev/fd -> /proc/self/fd"
        );
    }

    #[test]
    fn existing_mount_points_are_left_alone() {
        let sys = FakeSys::new().with_mounted(["/", "/proc", "/sys", "/dev", "/run"]);
        let done = early_mounts(&sys).unwrap();
        assert_eq!(done.mounted, ["/dev/shm", "/tmp"].map(PathBuf::from));
        assert!(!sys
            .calls()
            .iter()
            .any(|c| matches!(c, SysCall::Mount { target, .. } if target == Path::new("/proc"))));
    }

    #[test]
    fn first_failure_stops_and_names_the_mount() {
        let sys = FakeSys::new().fail_on(Op::Mount, Errno::ENODEV);
        let error = early_mounts(&sys).unwrap_err();
        assert_eq!(
            error.to_string(),
            "mount proc proc on /proc (options nosuid,nodev,noexec)"
        );
        assert_eq!(sys.calls().len(), 2);
    }
}
