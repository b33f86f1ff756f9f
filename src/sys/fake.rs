//! The recording fake of [`Sys`]: records every call as a [`SysCall`], keeps a mount table
//! that `mount`/`umount` update, and fails the operations it is told to fail.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};

use nix::errno::Errno;
use nix::mount::MsFlags;

use super::{Sys, SysError};
use crate::policy::FailureAction;

/// One recorded call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SysCall {
    /// [`Sys::mount`].
    Mount {
        /// Source.
        source: Option<String>,
        /// Target.
        target: PathBuf,
        /// File-system type.
        fstype: Option<String>,
        /// Flags.
        flags: MsFlags,
        /// Options.
        data: Option<String>,
    },
    /// [`Sys::umount`].
    Umount(PathBuf),
    /// [`Sys::mkdir_all`].
    MkdirAll(PathBuf),
    /// [`Sys::symlink`].
    Symlink {
        /// What the link points to.
        target: PathBuf,
        /// The link.
        link: PathBuf,
    },
    /// [`Sys::mount_tmpfs`].
    MountTmpfs {
        /// Target.
        target: PathBuf,
        /// Root directory mode.
        mode: u32,
    },
    /// [`Sys::remount_readonly`].
    RemountReadonly(PathBuf),
    /// [`Sys::set_child_subreaper`].
    SetChildSubreaper,
    /// [`Sys::sync`].
    Sync,
    /// [`Sys::power_off`].
    PowerOff(FailureAction),
    /// [`Sys::notify_ready`].
    NotifyReady(String),
    /// [`Sys::write_private`]: the length and SHA-256 of the data, never the bytes.
    WritePrivate {
        /// The file.
        path: PathBuf,
        /// Bytes written.
        len: usize,
        /// SHA-256 of the bytes, hex.
        sha256: String,
        /// Owner.
        uid: u32,
        /// Group.
        gid: u32,
    },
}

impl SysCall {
    /// The kind of call.
    pub fn op(&self) -> Op {
        match self {
            SysCall::Mount { .. } => Op::Mount,
            SysCall::Umount(_) => Op::Umount,
            SysCall::MkdirAll(_) => Op::MkdirAll,
            SysCall::Symlink { .. } => Op::Symlink,
            SysCall::MountTmpfs { .. } => Op::MountTmpfs,
            SysCall::RemountReadonly(_) => Op::RemountReadonly,
            SysCall::SetChildSubreaper => Op::SetChildSubreaper,
            SysCall::Sync => Op::Sync,
            SysCall::PowerOff(_) => Op::PowerOff,
            SysCall::WritePrivate { .. } => Op::WritePrivate,
            SysCall::NotifyReady(_) => Op::NotifyReady,
        }
    }
}

/// Kinds of calls that [`FakeSys`] can be told to fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Op {
    /// [`Sys::mount`].
    Mount,
    /// [`Sys::umount`].
    Umount,
    /// [`Sys::mkdir_all`].
    MkdirAll,
    /// [`Sys::symlink`].
    Symlink,
    /// [`Sys::mount_tmpfs`].
    MountTmpfs,
    /// [`Sys::remount_readonly`].
    RemountReadonly,
    /// [`Sys::set_child_subreaper`].
    SetChildSubreaper,
    /// [`Sys::sync`] (cannot fail; listed for completeness).
    Sync,
    /// [`Sys::power_off`] (always "fails" in the fake, which cannot power anything off).
    PowerOff,
    /// [`Sys::write_private`].
    WritePrivate,
    /// [`Sys::notify_ready`].
    NotifyReady,
}

#[derive(Debug, Default)]
struct State {
    calls: Vec<SysCall>,
    mounted: Vec<PathBuf>,
    /// Paths that exist (besides mount points): given, created by `mkdir_all` or `symlink`.
    existing: BTreeSet<PathBuf>,
    /// Which of `existing` are directories.
    dirs: BTreeSet<PathBuf>,
    /// Remaining failures per operation (`u32::MAX`: always) and the errno to fail with.
    failures: BTreeMap<Op, (u32, Errno)>,
}

/// A [`Sys`] that records calls instead of making them.
///
/// Defaults: nothing is mounted, the process is PID 1 of the initial PID namespace (a real
/// boot), and every call succeeds except `power_off`, which returns `ENOSYS` (the fake cannot
/// power off; use [`FakeSys::fail_on`] to choose another errno).
#[derive(Debug)]
pub struct FakeSys {
    state: Mutex<State>,
    initial_pid_namespace: bool,
    pid: u32,
}

impl Default for FakeSys {
    fn default() -> Self {
        FakeSys {
            state: Mutex::new(State::default()),
            initial_pid_namespace: true,
            pid: 1,
        }
    }
}

impl FakeSys {
    /// A fake real boot: PID 1 in the initial PID namespace, nothing mounted.
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts with these mount points (in mount order).
    pub fn with_mounted<I, P>(self, paths: I) -> Self
    where
        I: IntoIterator<Item = P>,
        P: Into<PathBuf>,
    {
        self.lock().mounted = paths.into_iter().map(Into::into).collect();
        self
    }

    /// Starts with these directories present (and their parents).
    pub fn with_dirs<I, P>(self, paths: I) -> Self
    where
        I: IntoIterator<Item = P>,
        P: Into<PathBuf>,
    {
        {
            let mut state = self.lock();
            for path in paths {
                let path: PathBuf = path.into();
                for dir in path.ancestors() {
                    state.existing.insert(dir.to_path_buf());
                    state.dirs.insert(dir.to_path_buf());
                }
            }
        }
        self
    }

    /// Starts with these (non-directory) files present.
    pub fn with_files<I, P>(self, paths: I) -> Self
    where
        I: IntoIterator<Item = P>,
        P: Into<PathBuf>,
    {
        self.lock()
            .existing
            .extend(paths.into_iter().map(Into::into));
        self
    }

    /// Pretends to run inside a sandbox PID namespace (not a real boot).
    pub fn in_sandbox(mut self) -> Self {
        self.initial_pid_namespace = false;
        self
    }

    /// Pretends to have this pid.
    pub fn with_pid(mut self, pid: u32) -> Self {
        self.pid = pid;
        self
    }

    /// Every call of kind `op` fails with `errno`.
    pub fn fail_on(self, op: Op, errno: Errno) -> Self {
        self.lock().failures.insert(op, (u32::MAX, errno));
        self
    }

    /// The next `times` calls of kind `op` fail with `errno`, later ones succeed.
    pub fn fail_times(self, op: Op, times: u32, errno: Errno) -> Self {
        self.lock().failures.insert(op, (times, errno));
        self
    }

    /// Every call so far, in order.
    pub fn calls(&self) -> Vec<SysCall> {
        self.lock().calls.clone()
    }

    /// Current mount points of the fake mount table.
    pub fn mounted(&self) -> Vec<PathBuf> {
        self.lock().mounted.clone()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records `call`; returns the injected errno if this call is to fail.
    fn record(&self, call: SysCall) -> Option<Errno> {
        let mut state = self.lock();
        let op = call.op();
        state.calls.push(call);
        let (left, errno) = state.failures.get_mut(&op)?;
        if *left == 0 {
            return None;
        }
        if *left != u32::MAX {
            *left -= 1;
        }
        Some(*errno)
    }
}

impl Sys for FakeSys {
    fn mount(
        &self,
        source: Option<&str>,
        target: &Path,
        fstype: Option<&str>,
        flags: MsFlags,
        data: Option<&str>,
    ) -> Result<(), SysError> {
        let call = SysCall::Mount {
            source: source.map(str::to_owned),
            target: target.to_path_buf(),
            fstype: fstype.map(str::to_owned),
            flags,
            data: data.map(str::to_owned),
        };
        if let Some(errno) = self.record(call) {
            return Err(SysError::Mount {
                device: source.map(str::to_owned),
                target: target.to_path_buf(),
                fstype: fstype.map(str::to_owned),
                flags,
                data: data.map(str::to_owned),
                errno,
            });
        }
        if !flags.contains(MsFlags::MS_REMOUNT) {
            self.lock().mounted.push(target.to_path_buf());
        }
        Ok(())
    }

    fn umount(&self, target: &Path) -> Result<(), SysError> {
        if let Some(errno) = self.record(SysCall::Umount(target.to_path_buf())) {
            return Err(SysError::Umount {
                target: target.to_path_buf(),
                errno,
            });
        }
        let mut state = self.lock();
        if let Some(last) = state.mounted.iter().rposition(|m| m == target) {
            state.mounted.remove(last);
            Ok(())
        } else {
            Err(SysError::Umount {
                target: target.to_path_buf(),
                errno: Errno::EINVAL,
            })
        }
    }

    fn is_mountpoint(&self, path: &Path) -> bool {
        self.lock().mounted.iter().any(|m| m == path)
    }

    fn mount_points(&self) -> Vec<PathBuf> {
        self.mounted()
    }

    fn mkdir_all(&self, path: &Path) -> Result<(), SysError> {
        match self.record(SysCall::MkdirAll(path.to_path_buf())) {
            Some(errno) => Err(SysError::Mkdir {
                path: path.to_path_buf(),
                source: std::io::Error::from_raw_os_error(errno as i32),
            }),
            None => {
                let mut state = self.lock();
                for dir in path.ancestors() {
                    state.existing.insert(dir.to_path_buf());
                    state.dirs.insert(dir.to_path_buf());
                }
                Ok(())
            }
        }
    }

    fn exists(&self, path: &Path) -> bool {
        let state = self.lock();
        state.existing.contains(path) || state.mounted.iter().any(|m| m == path)
    }

    fn is_dir(&self, path: &Path) -> bool {
        let state = self.lock();
        state.dirs.contains(path) || state.mounted.iter().any(|m| m == path)
    }

    fn symlink(&self, target: &Path, link: &Path) -> Result<(), SysError> {
        let call = SysCall::Symlink {
            target: target.to_path_buf(),
            link: link.to_path_buf(),
        };
        if let Some(errno) = self.record(call) {
            return Err(SysError::Symlink {
                link: link.to_path_buf(),
                target: target.to_path_buf(),
                source: std::io::Error::from_raw_os_error(errno as i32),
            });
        }
        self.lock().existing.insert(link.to_path_buf());
        Ok(())
    }

    fn mount_tmpfs(&self, target: &Path, mode: u32) -> Result<(), SysError> {
        let call = SysCall::MountTmpfs {
            target: target.to_path_buf(),
            mode,
        };
        if let Some(errno) = self.record(call) {
            return Err(SysError::Mount {
                device: Some("tmpfs".to_owned()),
                target: target.to_path_buf(),
                fstype: Some("tmpfs".to_owned()),
                flags: MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
                data: Some(super::tmpfs_data(mode)),
                errno,
            });
        }
        self.lock().mounted.push(target.to_path_buf());
        Ok(())
    }

    fn remount_readonly(&self, target: &Path) -> Result<(), SysError> {
        match self.record(SysCall::RemountReadonly(target.to_path_buf())) {
            Some(errno) => Err(SysError::Mount {
                device: None,
                target: target.to_path_buf(),
                fstype: None,
                flags: MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
                data: None,
                errno,
            }),
            None => Ok(()),
        }
    }

    fn set_child_subreaper(&self) -> Result<(), SysError> {
        match self.record(SysCall::SetChildSubreaper) {
            Some(errno) => Err(SysError::Prctl {
                op: "PR_SET_CHILD_SUBREAPER",
                errno,
            }),
            None => Ok(()),
        }
    }

    fn sync(&self) {
        let _ = self.record(SysCall::Sync);
    }

    fn power_off(&self, action: FailureAction) -> SysError {
        let errno = self
            .record(SysCall::PowerOff(action))
            .unwrap_or(Errno::ENOSYS);
        SysError::Reboot { action, errno }
    }

    fn in_initial_pid_namespace(&self) -> bool {
        self.initial_pid_namespace
    }

    fn pid(&self) -> u32 {
        self.pid
    }

    fn notify_ready(&self, status: &str) -> std::io::Result<bool> {
        match self.record(SysCall::NotifyReady(status.to_owned())) {
            Some(errno) => Err(std::io::Error::from_raw_os_error(errno as i32)),
            None => Ok(true),
        }
    }

    fn write_private(&self, path: &Path, data: &[u8], uid: u32, gid: u32) -> Result<(), SysError> {
        let call = SysCall::WritePrivate {
            path: path.to_path_buf(),
            len: data.len(),
            sha256: crate::digest::Digest::of(data).hex(),
            uid,
            gid,
        };
        match self.record(call) {
            Some(errno) => Err(SysError::WritePrivate {
                path: path.to_path_buf(),
                uid,
                gid,
                source: std::io::Error::from_raw_os_error(errno as i32),
            }),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn records_calls_in_order_and_tracks_mounts() {
        let sys = FakeSys::new();
        sys.mkdir_all(Path::new("/x")).unwrap();
        sys.mount_tmpfs(Path::new("/x"), 0o755).unwrap();
        assert!(sys.is_mountpoint(Path::new("/x")));
        sys.remount_readonly(Path::new("/x")).unwrap();
        sys.umount(Path::new("/x")).unwrap();
        assert!(!sys.is_mountpoint(Path::new("/x")));
        assert_eq!(
            sys.calls(),
            vec![
                SysCall::MkdirAll("/x".into()),
                SysCall::MountTmpfs {
                    target: "/x".into(),
                    mode: 0o755
                },
                SysCall::RemountReadonly("/x".into()),
                SysCall::Umount("/x".into()),
            ]
        );
    }

    #[test]
    fn injected_failures_fail_the_named_call_only() {
        let sys = FakeSys::new().fail_times(Op::Mount, 1, Errno::EBUSY);
        let error = sys
            .mount(
                Some("proc"),
                Path::new("/proc"),
                Some("proc"),
                MsFlags::empty(),
                None,
            )
            .unwrap_err();
        assert_eq!(
            error.to_string(),
            "mount proc proc on /proc (options defaults)"
        );
        assert!(!sys.is_mountpoint(Path::new("/proc")));
        sys.mount(
            Some("proc"),
            Path::new("/proc"),
            Some("proc"),
            MsFlags::empty(),
            None,
        )
        .unwrap();
        assert!(sys.is_mountpoint(Path::new("/proc")));
        sys.mkdir_all(Path::new("/y")).unwrap();
    }

    #[test]
    fn power_off_never_succeeds_in_the_fake() {
        let sys = FakeSys::new();
        let error = sys.power_off(FailureAction::Poweroff);
        assert!(matches!(
            error,
            SysError::Reboot {
                errno: Errno::ENOSYS,
                ..
            }
        ));
        assert_eq!(
            sys.calls(),
            vec![SysCall::PowerOff(FailureAction::Poweroff)]
        );
    }

    #[test]
    fn sandbox_and_pid_are_configurable() {
        let sys = FakeSys::new().in_sandbox().with_pid(7);
        assert!(!sys.in_initial_pid_namespace());
        assert_eq!(sys.pid(), 7);
        assert!(FakeSys::new().in_initial_pid_namespace());
    }
}
