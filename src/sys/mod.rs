//! The effect seam: every mount, reboot and process-wide switch that cvm-warden makes goes
//! through the [`Sys`] trait, so the logic that decides *what* to do is unit-tested without
//! root against the recording [`FakeSys`], and [`RealSys`] is tested as root in namespaces
//! (`tests/launch_ns.rs`).
//!
//! This is the only module of the crate where `unsafe` is allowed. The unsafe code is in
//! [`process`] (fork, execve, raw capability and fd syscalls, the signal self-pipe) and
//! [`kernel`] (`swapoff`) and [`nvml`] (two NVML calls `nvml-wrapper` does not expose); every
//! block carries a `// SAFETY:` comment and is wrapped in a safe function. Everything else
//! here uses `nix`.

mod fake;
pub mod kernel;
pub mod nvml;
pub mod process;

use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags};
use nix::sys::statvfs::FsFlags;

pub use fake::{FakeSys, Op, SysCall};

use crate::policy::FailureAction;

/// Default mount table of the calling process.
pub const PROC_SELF_MOUNTINFO: &str = "/proc/self/mountinfo";
/// Default PID-namespace handle of the calling process.
pub const PROC_SELF_NS_PID: &str = "/proc/self/ns/pid";
/// Inode number of the initial PID namespace's `nsfs` handle (`PROC_PID_INIT_INO` in
/// `include/linux/proc_ns.h`, fixed since Linux 3.8). Every other PID namespace gets a
/// dynamically allocated inode, so `stat /proc/self/ns/pid` tells a real boot from a sandbox.
pub const PROC_PID_INIT_INO: u64 = 0xEFFF_FFFC;

/// A failed system call, naming the operation and its inputs; the `errno` is the source.
#[derive(Debug, thiserror::Error)]
pub enum SysError {
    /// `mount(2)` failed.
    #[error(
        "mount {} {} on {} (options {})",
        fstype.as_deref().unwrap_or("-"),
        device.as_deref().unwrap_or("-"),
        target.display(),
        mount_options(*flags, data.as_deref())
    )]
    Mount {
        /// What was mounted (device or pseudo file system name).
        device: Option<String>,
        /// Mount point.
        target: PathBuf,
        /// File-system type.
        fstype: Option<String>,
        /// Mount flags.
        flags: MsFlags,
        /// File-system specific options.
        data: Option<String>,
        /// Why.
        #[source]
        errno: Errno,
    },
    /// `umount2(2)` failed.
    #[error("unmount {}", target.display())]
    Umount {
        /// Mount point.
        target: PathBuf,
        /// Why.
        #[source]
        errno: Errno,
    },
    /// `statvfs(2)` of a mount point failed (needed to keep its flags on remount).
    #[error("statvfs {}", path.display())]
    Statvfs {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        errno: Errno,
    },
    /// Creating a directory (and its parents) failed.
    #[error("create directory {}", path.display())]
    Mkdir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Creating a symbolic link failed.
    #[error("create symbolic link {} -> {}", link.display(), target.display())]
    Symlink {
        /// The link.
        link: PathBuf,
        /// What it points to.
        target: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A `prctl(2)` failed.
    #[error("prctl {op}")]
    Prctl {
        /// The operation, e.g. `PR_SET_CHILD_SUBREAPER`.
        op: &'static str,
        /// Why.
        #[source]
        errno: Errno,
    },
    /// `reboot(2)` failed.
    #[error("{} the machine (reboot {}); hint: PID 1 needs CAP_SYS_BOOT", action_verb(*action), reboot_cmd(*action))]
    Reboot {
        /// What was asked for.
        action: FailureAction,
        /// Why.
        #[source]
        errno: Errno,
    },
    /// Writing a private file (a delivered secret) failed. Never carries the contents.
    #[error("write {} (owner {uid}:{gid}, mode 0400)", path.display())]
    WritePrivate {
        /// The file.
        path: PathBuf,
        /// Owner it was to get.
        uid: u32,
        /// Group it was to get.
        gid: u32,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Another process-level system call failed (fork, pipe, sigaction, waitpid, kill).
    #[error("{op}")]
    Process {
        /// The call and its inputs, e.g. `sigaction(SIGTERM)`.
        op: String,
        /// Why.
        #[source]
        errno: Errno,
    },
}

/// Flags and data the way mount(8) writes options: `nosuid,nodev,mode=1777`.
pub fn mount_options(flags: MsFlags, data: Option<&str>) -> String {
    const NAMES: [(MsFlags, &str); 12] = [
        (MsFlags::MS_REMOUNT, "remount"),
        (MsFlags::MS_BIND, "bind"),
        (MsFlags::MS_REC, "rec"),
        (MsFlags::MS_RDONLY, "ro"),
        (MsFlags::MS_NOSUID, "nosuid"),
        (MsFlags::MS_NODEV, "nodev"),
        (MsFlags::MS_NOEXEC, "noexec"),
        (MsFlags::MS_NOATIME, "noatime"),
        (MsFlags::MS_NODIRATIME, "nodiratime"),
        (MsFlags::MS_RELATIME, "relatime"),
        (MsFlags::MS_STRICTATIME, "strictatime"),
        (MsFlags::MS_PRIVATE, "private"),
    ];
    let mut parts: Vec<String> = Vec::new();
    let mut rest = flags;
    for (flag, name) in NAMES {
        if flags.contains(flag) {
            parts.push(name.to_owned());
            rest.remove(flag);
        }
    }
    if !rest.is_empty() {
        parts.push(format!("{:#x}", rest.bits()));
    }
    parts.extend(data.map(str::to_owned));
    if parts.is_empty() {
        "defaults".to_owned()
    } else {
        parts.join(",")
    }
}

fn action_verb(action: FailureAction) -> &'static str {
    match action {
        FailureAction::Poweroff => "power off",
        FailureAction::Halt => "halt",
    }
}

fn reboot_cmd(action: FailureAction) -> &'static str {
    match action {
        FailureAction::Poweroff => "RB_POWER_OFF",
        FailureAction::Halt => "RB_HALT_SYSTEM",
    }
}

/// The effects cvm-warden has on the machine outside its own process tree. Pass it in as
/// `&dyn Sys`; nothing picks an implementation with `cfg!(test)`.
pub trait Sys {
    /// `mount(2)`.
    fn mount(
        &self,
        source: Option<&str>,
        target: &Path,
        fstype: Option<&str>,
        flags: MsFlags,
        data: Option<&str>,
    ) -> Result<(), SysError>;
    /// `umount2(target, 0)` (no lazy detach: a busy mount is reported, not hidden).
    fn umount(&self, target: &Path) -> Result<(), SysError>;
    /// Whether `path` is a mount point of this mount namespace, according to the mount table
    /// (`/proc/self/mountinfo` for [`RealSys`]). False when the table cannot be read.
    fn is_mountpoint(&self, path: &Path) -> bool;
    /// Mount points in mount order (best effort: empty when the table cannot be read).
    fn mount_points(&self) -> Vec<PathBuf>;
    /// Creates `path` and its missing parents with mode 0755.
    fn mkdir_all(&self, path: &Path) -> Result<(), SysError>;
    /// Whether something (a file, a directory, a device, a symbolic link, even a dangling
    /// one) is at `path`; links are not followed.
    fn exists(&self, path: &Path) -> bool;
    /// Whether `path` is a directory (links followed).
    fn is_dir(&self, path: &Path) -> bool;
    /// Creates the symbolic link `link` pointing to `target`.
    fn symlink(&self, target: &Path, link: &Path) -> Result<(), SysError>;
    /// Mounts a fresh tmpfs on `target` (`nosuid,nodev`, executable, root directory `mode`).
    fn mount_tmpfs(&self, target: &Path, mode: u32) -> Result<(), SysError>;
    /// Remounts the file system at `target` read-only, keeping its other flags.
    fn remount_readonly(&self, target: &Path) -> Result<(), SysError>;
    /// `prctl(PR_SET_CHILD_SUBREAPER, 1)`: orphans of our descendants are re-parented to us.
    fn set_child_subreaper(&self) -> Result<(), SysError>;
    /// `sync(2)`.
    fn sync(&self);
    /// `reboot(RB_POWER_OFF)` or `reboot(RB_HALT_SYSTEM)`. Returns only on failure.
    fn power_off(&self, action: FailureAction) -> SysError;
    /// Whether this process runs in the initial PID namespace (a real boot) rather than in a
    /// sandbox PID namespace. When that cannot be told (no `/proc`), answers `true`, which
    /// fails safe: PID 1 then powers the machine off instead of exiting.
    fn in_initial_pid_namespace(&self) -> bool;
    /// This process's id (in its own PID namespace).
    fn pid(&self) -> u32;
    /// Creates `path` (which must not exist; symlinks are not followed) with mode 0400,
    /// owned by `uid:gid`, writes `data` and syncs it. On failure the file is removed.
    fn write_private(&self, path: &Path, data: &[u8], uid: u32, gid: u32) -> Result<(), SysError>;
    /// Tells the service manager (systemd `Type=notify`, through `$NOTIFY_SOCKET`) that the
    /// unit is up: after the perimeter, so units ordered after cvm-warden start only behind
    /// it. Best effort: no socket, nothing to do; a failure is returned for the log.
    fn notify_ready(&self, status: &str) -> std::io::Result<bool>;
}

/// The real system. Paths under `/proc` are injectable for tests.
#[derive(Debug, Clone)]
pub struct RealSys {
    /// Mount table read by [`Sys::is_mountpoint`] and [`Sys::mount_points`].
    pub mountinfo: PathBuf,
    /// PID-namespace handle read by [`Sys::in_initial_pid_namespace`].
    pub pid_ns: PathBuf,
}

impl Default for RealSys {
    fn default() -> Self {
        RealSys {
            mountinfo: PathBuf::from(PROC_SELF_MOUNTINFO),
            pid_ns: PathBuf::from(PROC_SELF_NS_PID),
        }
    }
}

impl Sys for RealSys {
    fn mount(
        &self,
        source: Option<&str>,
        target: &Path,
        fstype: Option<&str>,
        flags: MsFlags,
        data: Option<&str>,
    ) -> Result<(), SysError> {
        nix::mount::mount(source, target, fstype, flags, data).map_err(|errno| SysError::Mount {
            device: source.map(str::to_owned),
            target: target.to_path_buf(),
            fstype: fstype.map(str::to_owned),
            flags,
            data: data.map(str::to_owned),
            errno,
        })
    }

    fn umount(&self, target: &Path) -> Result<(), SysError> {
        nix::mount::umount2(target, MntFlags::empty()).map_err(|errno| SysError::Umount {
            target: target.to_path_buf(),
            errno,
        })
    }

    fn is_mountpoint(&self, path: &Path) -> bool {
        self.mount_points().iter().any(|mounted| mounted == path)
    }

    fn mount_points(&self) -> Vec<PathBuf> {
        std::fs::read_to_string(&self.mountinfo)
            .map(|text| parse_mountinfo(&text))
            .unwrap_or_default()
    }

    fn mkdir_all(&self, path: &Path) -> Result<(), SysError> {
        let fail = |source| SysError::Mkdir {
            path: path.to_path_buf(),
            source,
        };
        // The directories made here are 0755 whatever the process umask: the systemd unit
        // runs with UMask=0077, which made /run/cvm-warden 0700 and the workload's execve of
        // its bundle copy below it fail with EACCES.
        let missing: Vec<&Path> = path
            .ancestors()
            .take_while(|dir| std::fs::symlink_metadata(dir).is_err())
            .collect();
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(path)
            .map_err(fail)?;
        for dir in missing {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).map_err(fail)?;
        }
        Ok(())
    }

    fn exists(&self, path: &Path) -> bool {
        std::fs::symlink_metadata(path).is_ok()
    }

    fn is_dir(&self, path: &Path) -> bool {
        path.is_dir()
    }

    fn symlink(&self, target: &Path, link: &Path) -> Result<(), SysError> {
        std::os::unix::fs::symlink(target, link).map_err(|source| SysError::Symlink {
            link: link.to_path_buf(),
            target: target.to_path_buf(),
            source,
        })
    }

    fn mount_tmpfs(&self, target: &Path, mode: u32) -> Result<(), SysError> {
        let data = tmpfs_data(mode);
        self.mount(
            Some("tmpfs"),
            target,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some(&data),
        )
    }

    fn remount_readonly(&self, target: &Path) -> Result<(), SysError> {
        // A remount replaces the per-mount flags too, so the current ones are read back and
        // kept (otherwise nosuid/nodev/noexec would silently be lost).
        let current = nix::sys::statvfs::statvfs(target).map_err(|errno| SysError::Statvfs {
            path: target.to_path_buf(),
            errno,
        })?;
        let flags = MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | kept_flags(current.flags());
        self.mount(None, target, None, flags, None)
    }

    fn set_child_subreaper(&self) -> Result<(), SysError> {
        nix::sys::prctl::set_child_subreaper(true).map_err(|errno| SysError::Prctl {
            op: "PR_SET_CHILD_SUBREAPER",
            errno,
        })
    }

    fn sync(&self) {
        nix::unistd::sync();
    }

    fn power_off(&self, action: FailureAction) -> SysError {
        let mode = match action {
            FailureAction::Poweroff => nix::sys::reboot::RebootMode::RB_POWER_OFF,
            FailureAction::Halt => nix::sys::reboot::RebootMode::RB_HALT_SYSTEM,
        };
        match nix::sys::reboot::reboot(mode) {
            Ok(never) => match never {},
            Err(errno) => SysError::Reboot { action, errno },
        }
    }

    fn in_initial_pid_namespace(&self) -> bool {
        match std::fs::metadata(&self.pid_ns) {
            Ok(meta) => meta.ino() == PROC_PID_INIT_INO,
            // Fail safe: without /proc we cannot prove we are in a sandbox, so we act as the
            // init of a real boot (power off rather than return to a kernel that would panic).
            Err(_) => true,
        }
    }

    fn pid(&self) -> u32 {
        std::process::id()
    }

    fn notify_ready(&self, status: &str) -> std::io::Result<bool> {
        sd_notify(&format!("READY=1\nSTATUS={status}\n"))
    }

    fn write_private(&self, path: &Path, data: &[u8], uid: u32, gid: u32) -> Result<(), SysError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let fail = |source| SysError::WritePrivate {
            path: path.to_path_buf(),
            uid,
            gid,
            source,
        };
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o400)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)
            .map_err(fail)?;
        let written = std::os::unix::fs::fchown(&file, Some(uid), Some(gid))
            .and_then(|()| file.write_all(data))
            .and_then(|()| file.sync_all());
        if let Err(source) = written {
            drop(file);
            // Best effort: a half-written secret must not stay behind.
            let _ = std::fs::remove_file(path);
            return Err(fail(source));
        }
        Ok(())
    }
}

/// Sends `state` to `$NOTIFY_SOCKET` (a path, or `@name` for an abstract socket), as
/// sd_notify(3) does. `Ok(false)` when the variable is not set.
pub fn sd_notify(state: &str) -> std::io::Result<bool> {
    match std::env::var_os("NOTIFY_SOCKET") {
        Some(target) => notify_socket(&target, state).map(|()| true),
        None => Ok(false),
    }
}

/// Sends `state` to the notification socket `target` (a path, or `@name`: abstract).
pub fn notify_socket(target: &std::ffi::OsStr, state: &str) -> std::io::Result<()> {
    let socket = std::os::unix::net::UnixDatagram::unbound()?;
    let bytes = target.as_encoded_bytes();
    if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
        socket.send_to_addr(state.as_bytes(), &addr)?;
    } else {
        socket.send_to(state.as_bytes(), Path::new(target))?;
    }
    Ok(())
}

/// `mode=…` option of a tmpfs (octal, as mount(8) writes it).
pub fn tmpfs_data(mode: u32) -> String {
    format!("mode={:04o}", mode & 0o7777)
}

/// Mount flags that a read-only remount must repeat so that they stay set.
fn kept_flags(current: FsFlags) -> MsFlags {
    let mut flags = MsFlags::empty();
    for (has, keep) in [
        (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
        (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
        (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
        (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
        (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
        (FsFlags::ST_RELATIME, MsFlags::MS_RELATIME),
    ] {
        if current.contains(has) {
            flags |= keep;
        }
    }
    flags
}

/// Mount points of a `/proc/PID/mountinfo` text, in order (field 5, octal escapes such as
/// `\040` for a space decoded). Malformed lines are skipped.
pub fn parse_mountinfo(text: &str) -> Vec<PathBuf> {
    text.lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|field| PathBuf::from(unescape_mountinfo(field)))
        .collect()
}

/// Decodes the kernel's octal escapes in a mountinfo or `/proc/swaps` field (`\040` for a
/// space).
pub fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() {
            let digits = &bytes[i + 1..i + 4];
            if digits.iter().all(|d| (b'0'..=b'7').contains(d)) {
                let value = digits
                    .iter()
                    .fold(0u32, |acc, d| acc * 8 + u32::from(d - b'0'));
                if let Ok(byte) = u8::try_from(value) {
                    out.push(byte);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    use std::os::unix::ffi::OsStringExt;
    std::ffi::OsString::from_vec(out)
        .into_string()
        .unwrap_or_else(|raw| raw.to_string_lossy().into_owned())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
22 1 0:21 / / rw,relatime shared:1 - ext4 /dev/vda rw
23 22 0:22 / /proc rw,nosuid,nodev,noexec,relatime shared:2 - proc proc rw
24 22 0:23 / /my\\040dir rw - tmpfs tmpfs rw
25 22 0:24 / /run rw,nosuid - tmpfs tmpfs rw,mode=755
broken
";

    #[test]
    fn mountinfo_lists_mount_points_in_order_and_decodes_escapes() {
        assert_eq!(
            parse_mountinfo(MOUNTINFO),
            vec![
                PathBuf::from("/"),
                PathBuf::from("/proc"),
                PathBuf::from("/my dir"),
                PathBuf::from("/run"),
            ]
        );
    }

    #[test]
    fn mountinfo_keeps_a_backslash_that_is_not_an_octal_escape() {
        assert_eq!(unescape_mountinfo("/a\\b"), "/a\\b");
        assert_eq!(unescape_mountinfo("/a\\04"), "/a\\04");
        assert_eq!(unescape_mountinfo("/tab\\011x"), "/tab\tx");
    }

    #[test]
    fn is_mountpoint_reads_the_injected_mount_table() {
        let dir = tempfile::tempdir().unwrap();
        let table = dir.path().join("mountinfo");
        std::fs::write(&table, MOUNTINFO).unwrap();
        let sys = RealSys {
            mountinfo: table,
            ..RealSys::default()
        };
        assert!(sys.is_mountpoint(Path::new("/proc")));
        assert!(sys.is_mountpoint(Path::new("/my dir")));
        assert!(!sys.is_mountpoint(Path::new("/tmp")));
    }

    #[test]
    fn is_mountpoint_is_false_when_the_table_is_unreadable() {
        let sys = RealSys {
            mountinfo: PathBuf::from("/nonexistent/mountinfo"),
            ..RealSys::default()
        };
        assert!(!sys.is_mountpoint(Path::new("/proc")));
        assert!(sys.mount_points().is_empty());
    }

    #[test]
    fn unreadable_pid_namespace_is_taken_for_a_real_boot() {
        let sys = RealSys {
            pid_ns: PathBuf::from("/nonexistent/ns/pid"),
            ..RealSys::default()
        };
        assert!(sys.in_initial_pid_namespace());
    }

    #[test]
    fn a_file_with_another_inode_is_not_the_initial_pid_namespace() {
        let file = tempfile::NamedTempFile::new().unwrap();
        let sys = RealSys {
            pid_ns: file.path().to_path_buf(),
            ..RealSys::default()
        };
        assert!(!sys.in_initial_pid_namespace());
    }

    #[test]
    fn notifications_reach_path_and_abstract_sockets() {
        use std::os::linux::net::SocketAddrExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let listener = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        notify_socket(path.as_os_str(), "READY=1\n").unwrap();
        let mut buf = [0u8; 64];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\n");

        let name = format!("cvm-warden-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let listener = std::os::unix::net::UnixDatagram::bind_addr(&addr).unwrap();
        notify_socket(
            std::ffi::OsStr::new(&format!("@{name}")),
            "READY=1\nSTATUS=x\n",
        )
        .unwrap();
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=x\n");

        let missing = dir.path().join("nobody-listens");
        assert!(notify_socket(missing.as_os_str(), "READY=1\n").is_err());
    }

    #[test]
    fn tmpfs_mode_is_written_in_octal() {
        assert_eq!(tmpfs_data(0o755), "mode=0755");
        assert_eq!(tmpfs_data(0o1777), "mode=1777");
    }

    #[test]
    fn remount_keeps_security_flags() {
        let kept = kept_flags(FsFlags::ST_NOSUID | FsFlags::ST_NODEV | FsFlags::ST_RDONLY);
        assert_eq!(kept, MsFlags::MS_NOSUID | MsFlags::MS_NODEV);
    }

    #[test]
    fn mount_errors_read_like_mount_options() {
        assert_eq!(mount_options(MsFlags::empty(), None), "defaults");
        assert_eq!(
            mount_options(
                MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID,
                None
            ),
            "remount,ro,nosuid"
        );
        assert_eq!(
            mount_options(MsFlags::MS_NOSUID | MsFlags::MS_NODEV, Some("mode=1777")),
            "nosuid,nodev,mode=1777"
        );
        let error = SysError::Mount {
            device: Some("tmpfs".into()),
            target: "/tmp".into(),
            fstype: Some("tmpfs".into()),
            flags: MsFlags::MS_NOSUID,
            data: Some("mode=1777".into()),
            errno: Errno::EBUSY,
        };
        assert_eq!(
            error.to_string(),
            "mount tmpfs tmpfs on /tmp (options nosuid,mode=1777)"
        );
    }

    #[test]
    fn reboot_error_names_the_action_and_hints() {
        let error = SysError::Reboot {
            action: FailureAction::Halt,
            errno: Errno::EPERM,
        };
        assert_eq!(
            error.to_string(),
            "halt the machine (reboot RB_HALT_SYSTEM); hint: PID 1 needs CAP_SYS_BOOT"
        );
    }
}
