//! The PID 1 shape's first act: the pseudo file systems that everything else needs, as a
//! table (kata's `INIT_ROOTFS_MOUNTS`) applied through [`Sys`].

use std::path::{Path, PathBuf};

use nix::mount::MsFlags;

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

/// Mounts every entry of [`early_mount_table`] whose target is not a mount point yet
/// (creating the directory first); returns the targets it mounted. The first failure stops
/// it: without `/proc` and `/dev` nothing after can be trusted to work.
///
/// Before `/proc` is mounted the mount table cannot be read, so every entry counts as absent
/// until then; `/proc` comes first in the table for that reason.
pub fn early_mounts(sys: &dyn Sys) -> Result<Vec<PathBuf>, SysError> {
    let mut mounted = Vec::new();
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
        mounted.push(target.to_path_buf());
    }
    Ok(mounted)
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
    fn a_bare_initramfs_gets_every_mount() {
        let sys = FakeSys::new().with_mounted(["/"]);
        let mounted = early_mounts(&sys).unwrap();
        assert_eq!(
            mounted,
            ["/proc", "/sys", "/dev", "/dev/shm", "/run", "/tmp"].map(PathBuf::from)
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
        assert_eq!(calls.len(), 12);
    }

    #[test]
    fn existing_mount_points_are_left_alone() {
        let sys = FakeSys::new().with_mounted(["/", "/proc", "/sys", "/dev", "/run"]);
        let mounted = early_mounts(&sys).unwrap();
        assert_eq!(mounted, ["/dev/shm", "/tmp"].map(PathBuf::from));
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
