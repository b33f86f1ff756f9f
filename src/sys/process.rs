//! Starting the workload: the privilege drop, `fork`, `execve`, and the signal self-pipe of
//! the PID 1 supervisor. All of this crate's process-level `unsafe` is here, behind safe
//! functions.
//!
//! Why the privilege drop lives here rather than in `launch`: after `fork` in a process that
//! may have other threads (the measure stage hashes with a thread pool), the child may only
//! make async-signal-safe calls until `execve`. A safe `fork()` that runs caller-supplied code
//! could not promise that, so the child's whole program is [`drop_privileges_and_exec`], which
//! makes only raw system calls on data prepared beforehand ([`ExecSpec`]): no allocation, no
//! locks. `launch` builds the spec from the policy and turns an [`ExecFailure`] into an error.

use std::ffi::{CString, OsString};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, IntoRawFd, OwnedFd, RawFd};
use std::os::raw::{c_char, c_int, c_ulong};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::time::Duration;

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::resource::Resource;
use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, SigmaskHow, Signal};
use nix::sys::stat::Mode;
use nix::sys::wait::waitpid;
use nix::unistd::{Gid, Pid, Uid};

use super::SysError;

/// Highest capability number probed (the kernel's `CAP_LAST_CAP` is 40 in Linux 6.x; the
/// 64-bit capability sets cannot hold more than 64).
const CAP_PROBE_MAX: c_ulong = 63;
/// `_LINUX_CAPABILITY_VERSION_3`: 64-bit capability sets in two 32-bit words.
const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
/// Highest signal number reset to its default action before exec (`_NSIG - 1` on Linux).
const SIGNAL_MAX: c_int = 64;
/// Upper bound of the fd loop used when `close_range(2)` is not available.
const FD_LOOP_MAX: i32 = 1 << 20;

/// Launch inputs that cannot be passed to `execve`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExecInputError {
    /// A string contains a NUL byte.
    #[error("{what} contains a NUL byte")]
    Nul {
        /// Which input, e.g. `exec[1]` or `env FOO`.
        what: String,
    },
    /// There is no program to run.
    #[error("exec is empty")]
    EmptyArgv,
}

/// Everything the child needs, converted to C data before `fork` so that the child allocates
/// nothing. Built by `launch` from a launch plan.
pub struct ExecSpec {
    path: CString,
    // The pointer arrays point into these strings' heap buffers, which never move or change
    // while the spec lives (the vectors are private and never modified after `new`).
    _argv: Vec<CString>,
    _env: Vec<CString>,
    argv_ptrs: Vec<*const c_char>,
    env_ptrs: Vec<*const c_char>,
    workdir: CString,
    uid: Uid,
    gid: Gid,
    umask: Mode,
    rlimits: Vec<(Resource, u64, u64)>,
}

impl std::fmt::Debug for ExecSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecSpec")
            .field("path", &self.path)
            .field("argc", &self._argv.len())
            .field("envc", &self._env.len())
            .field("workdir", &self.workdir)
            .field("uid", &self.uid)
            .field("gid", &self.gid)
            .field("umask", &self.umask)
            .field("rlimits", &self.rlimits)
            .finish()
    }
}

fn c_string(bytes: &[u8], what: impl FnOnce() -> String) -> Result<CString, ExecInputError> {
    CString::new(bytes).map_err(|_| ExecInputError::Nul { what: what() })
}

impl ExecSpec {
    /// Converts the launch inputs. `argv[0]` is the program that is executed (no `PATH`
    /// search); an empty `argv` is refused as `exec[0]`.
    pub fn new(
        argv: &[String],
        env: &[(String, String)],
        workdir: &Path,
        uid: u32,
        gid: u32,
        umask: u32,
        rlimits: &[(Resource, u64, u64)],
    ) -> Result<ExecSpec, ExecInputError> {
        let argv_c = argv
            .iter()
            .enumerate()
            .map(|(i, arg)| c_string(arg.as_bytes(), || format!("exec[{i}]")))
            .collect::<Result<Vec<_>, _>>()?;
        let path = argv_c.first().cloned().ok_or(ExecInputError::EmptyArgv)?;
        let env_c = env
            .iter()
            .map(|(key, value)| {
                let mut pair = OsString::from(key);
                pair.push("=");
                pair.push(value);
                c_string(pair.as_bytes(), || format!("env {key}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let workdir = c_string(workdir.as_os_str().as_bytes(), || "workdir".to_owned())?;
        let mut argv_ptrs: Vec<*const c_char> = argv_c.iter().map(|s| s.as_ptr()).collect();
        argv_ptrs.push(std::ptr::null());
        let mut env_ptrs: Vec<*const c_char> = env_c.iter().map(|s| s.as_ptr()).collect();
        env_ptrs.push(std::ptr::null());
        Ok(ExecSpec {
            path,
            _argv: argv_c,
            _env: env_c,
            argv_ptrs,
            env_ptrs,
            workdir,
            uid: Uid::from_raw(uid),
            gid: Gid::from_raw(gid),
            umask: Mode::from_bits_truncate(umask & 0o777),
            rlimits: rlimits.to_vec(),
        })
    }
}

/// A step of [`drop_privileges_and_exec`], in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Blocking all signals for the duration of the drop.
    BlockSignals,
    /// Resetting signal dispositions to their defaults.
    SignalDefaults,
    /// `setrlimit` of the spec's rlimit with this index.
    Rlimit(u32),
    /// `chdir` to the working directory.
    Chdir,
    /// `setgroups([])`.
    Setgroups,
    /// `setresgid`.
    Setresgid,
    /// `PR_CAPBSET_DROP` of this capability.
    DropBounding(u32),
    /// `PR_CAP_AMBIENT_CLEAR_ALL`.
    ClearAmbient,
    /// `PR_SET_KEEPCAPS 0`.
    KeepCaps,
    /// `setresuid`.
    Setresuid,
    /// `capset` to empty effective, permitted and inheritable sets.
    ClearCapabilities,
    /// Reading back the user and group ids (detail: the unexpected id).
    VerifyIds,
    /// Reading back the supplementary groups (detail: how many are left).
    VerifyGroups,
    /// Reading back a capability set (detail: the mask left in it).
    VerifyCapabilities(CapSet),
    /// `PR_SET_NO_NEW_PRIVS`.
    NoNewPrivs,
    /// Marking every fd from 3 up close-on-exec.
    CloseFds,
    /// Unblocking all signals.
    UnblockSignals,
    /// `execve`.
    Execve,
    /// `dup2` of the relay pipe onto this fd (1 or 2), before anything else.
    Stdio(u32),
}

/// A capability set, as the kernel keeps it per thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CapSet {
    /// Effective.
    Effective,
    /// Permitted.
    Permitted,
    /// Inheritable.
    Inheritable,
    /// Bounding.
    Bounding,
    /// Ambient.
    Ambient,
}

impl CapSet {
    const ALL: [CapSet; 5] = [
        CapSet::Effective,
        CapSet::Permitted,
        CapSet::Inheritable,
        CapSet::Bounding,
        CapSet::Ambient,
    ];

    /// Name as in `/proc/PID/status` (`CapEff`, …).
    pub fn status_name(self) -> &'static str {
        match self {
            CapSet::Effective => "CapEff",
            CapSet::Permitted => "CapPrm",
            CapSet::Inheritable => "CapInh",
            CapSet::Bounding => "CapBnd",
            CapSet::Ambient => "CapAmb",
        }
    }
}

impl Step {
    fn encode(self) -> (u32, u32) {
        match self {
            Step::BlockSignals => (18, 0),
            Step::SignalDefaults => (1, 0),
            Step::Rlimit(i) => (2, i),
            Step::Chdir => (3, 0),
            Step::Setgroups => (4, 0),
            Step::Setresgid => (5, 0),
            Step::DropBounding(cap) => (6, cap),
            Step::ClearAmbient => (7, 0),
            Step::KeepCaps => (8, 0),
            Step::Setresuid => (9, 0),
            Step::ClearCapabilities => (10, 0),
            Step::VerifyIds => (11, 0),
            Step::VerifyGroups => (12, 0),
            Step::VerifyCapabilities(set) => (
                13,
                CapSet::ALL.iter().position(|s| *s == set).unwrap_or(0) as u32,
            ),
            Step::NoNewPrivs => (14, 0),
            Step::CloseFds => (15, 0),
            Step::UnblockSignals => (16, 0),
            Step::Execve => (17, 0),
            Step::Stdio(fd) => (19, fd),
        }
    }

    fn decode(code: u32, arg: u32) -> Option<Step> {
        Some(match code {
            18 => Step::BlockSignals,
            1 => Step::SignalDefaults,
            2 => Step::Rlimit(arg),
            3 => Step::Chdir,
            4 => Step::Setgroups,
            5 => Step::Setresgid,
            6 => Step::DropBounding(arg),
            7 => Step::ClearAmbient,
            8 => Step::KeepCaps,
            9 => Step::Setresuid,
            10 => Step::ClearCapabilities,
            11 => Step::VerifyIds,
            12 => Step::VerifyGroups,
            13 => Step::VerifyCapabilities(*CapSet::ALL.get(arg as usize)?),
            14 => Step::NoNewPrivs,
            15 => Step::CloseFds,
            16 => Step::UnblockSignals,
            17 => Step::Execve,
            19 => Step::Stdio(arg),
            _ => return None,
        })
    }
}

/// Why the privilege drop or `execve` failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExecFailure {
    /// The step that failed.
    pub step: Step,
    /// The system call's error; `None` for a read-back check that found the wrong value.
    pub errno: Option<Errno>,
    /// For read-back checks: the unexpected value (an id, a count, a capability mask).
    pub detail: u64,
}

const FAILURE_LEN: usize = 20;

impl ExecFailure {
    fn sys(step: Step, errno: Errno) -> Self {
        ExecFailure {
            step,
            errno: Some(errno),
            detail: 0,
        }
    }

    fn check(step: Step, detail: u64) -> Self {
        ExecFailure {
            step,
            errno: None,
            detail,
        }
    }

    fn encode(&self) -> [u8; FAILURE_LEN] {
        let (code, arg) = self.step.encode();
        let errno = self.errno.map_or(0, |e| e as i32);
        let mut out = [0u8; FAILURE_LEN];
        out[0..4].copy_from_slice(&code.to_le_bytes());
        out[4..8].copy_from_slice(&arg.to_le_bytes());
        out[8..12].copy_from_slice(&errno.to_le_bytes());
        out[12..20].copy_from_slice(&self.detail.to_le_bytes());
        out
    }

    fn decode(bytes: &[u8; FAILURE_LEN]) -> Option<Self> {
        let word = |i: usize| [bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]];
        let code = u32::from_le_bytes(word(0));
        let arg = u32::from_le_bytes(word(4));
        let errno = i32::from_le_bytes(word(8));
        let mut detail = [0u8; 8];
        detail.copy_from_slice(&bytes[12..20]);
        Some(ExecFailure {
            step: Step::decode(code, arg)?,
            errno: (errno != 0).then(|| Errno::from_raw(errno)),
            detail: u64::from_le_bytes(detail),
        })
    }
}

/// Drops every privilege of the calling thread and `execve`s the spec's program; returns only
/// on failure. The order matters and is explained step by step below. Makes only raw system
/// calls on prepared data, so it is safe to run in the child of a `fork` in a multi-threaded
/// process.
///
/// In the unit shape it runs in the cvm-warden process itself: capability sets, `no_new_privs`
/// and the signal mask are per thread, but `execve` ends every other thread and the program
/// inherits the calling thread's credentials (`setresuid`/`setgroups` are process-wide
/// through libc anyway).
pub fn drop_privileges_and_exec(spec: &ExecSpec) -> ExecFailure {
    // 0. Block every signal for the whole sequence: nothing may interrupt it half-way, and no
    //    handler of ours may run in the child. (In the fork path they are blocked already.)
    if let Err(errno) = SigSet::all().thread_set_mask() {
        return ExecFailure::sys(Step::BlockSignals, errno);
    }
    // 1. Resource limits, while still privileged: raising a hard limit needs
    //    CAP_SYS_RESOURCE, which is gone after setresuid.
    for (i, (resource, soft, hard)) in spec.rlimits.iter().enumerate() {
        if let Err(errno) = nix::sys::resource::setrlimit(*resource, *soft, *hard) {
            return ExecFailure::sys(Step::Rlimit(i as u32), errno);
        }
    }
    // 2. umask (needs no privilege; cannot fail).
    nix::sys::stat::umask(spec.umask);
    // 3. Working directory (as root, so the policy's directory is reached even through
    //    directories the workload user may not search).
    if let Err(errno) = nix::unistd::chdir(spec.workdir.as_c_str()) {
        return ExecFailure::sys(Step::Chdir, errno);
    }
    // 4. Supplementary groups cleared (needs CAP_SETGID: before setresgid/setresuid).
    if let Err(errno) = nix::unistd::setgroups(&[]) {
        return ExecFailure::sys(Step::Setgroups, errno);
    }
    // 5. Real, effective and saved group ids (needs CAP_SETGID: before setresuid).
    if let Err(errno) = nix::unistd::setresgid(spec.gid, spec.gid, spec.gid) {
        return ExecFailure::sys(Step::Setresgid, errno);
    }
    // 6. Empty the bounding set, so that no file capability or setuid-root binary can ever
    //    give a capability back. PR_CAPBSET_DROP needs CAP_SETPCAP: before setresuid.
    if let Err(failure) = drop_bounding_set() {
        return failure;
    }
    // 7. Empty the ambient set (it would otherwise be carried across execve).
    if let Err(errno) = clear_ambient() {
        return ExecFailure::sys(Step::ClearAmbient, errno);
    }
    // 8. Make sure SECURE_KEEP_CAPS is off, so that setresuid clears permitted/effective.
    if let Err(errno) = nix::sys::prctl::set_keepcaps(false) {
        return ExecFailure::sys(Step::KeepCaps, errno);
    }
    // 9. Real, effective and saved user ids. Going from uid 0 to all-non-zero ids makes the
    //    kernel clear the permitted, effective and ambient sets.
    if let Err(errno) = nix::unistd::setresuid(spec.uid, spec.uid, spec.uid) {
        return ExecFailure::sys(Step::Setresuid, errno);
    }
    // 10. Belt and braces: empty effective, permitted and inheritable explicitly (dropping is
    //     always allowed), in case a securebit such as NO_SETUID_FIXUP kept them.
    if let Err(errno) = clear_capabilities() {
        return ExecFailure::sys(Step::ClearCapabilities, errno);
    }
    // 11. Read everything back and fail closed on any surprise.
    if let Err(failure) = verify_ids(spec) {
        return failure;
    }
    match capability_sets() {
        Ok(sets) => {
            for (set, mask) in CapSet::ALL.into_iter().zip(sets) {
                if mask != 0 {
                    return ExecFailure::check(Step::VerifyCapabilities(set), mask);
                }
            }
        }
        Err((set, errno)) => return ExecFailure::sys(Step::VerifyCapabilities(set), errno),
    }
    // 12. no_new_privs: execve can never grant privileges again (setuid bits, file caps).
    if let Err(errno) = nix::sys::prctl::set_no_new_privs() {
        return ExecFailure::sys(Step::NoNewPrivs, errno);
    }
    // 13. No inherited fds: every fd from 3 up is closed by execve. Close-on-exec rather than
    //     close, so that the supervisor's error pipe stays open until execve succeeds.
    if let Err(errno) = cloexec_from(3) {
        return ExecFailure::sys(Step::CloseFds, errno);
    }
    // 14. Every disposition back to SIG_DFL: an ignored signal stays ignored across execve
    //     (Rust ignores SIGPIPE, for instance). Late on purpose: in the unit shape libc's
    //     setresuid signals the other threads with a reserved real-time signal, whose
    //     default action would end the process.
    if let Err(errno) = reset_signal_dispositions() {
        return ExecFailure::sys(Step::SignalDefaults, errno);
    }
    // 15. An empty signal mask (it is inherited across execve), right before execve.
    if let Err(errno) = SigSet::empty().thread_set_mask() {
        return ExecFailure::sys(Step::UnblockSignals, errno);
    }
    // 16. Exactly the policy's argv and environment.
    // SAFETY: `path` is a valid C string; `argv_ptrs`/`env_ptrs` are NULL-terminated arrays of
    // pointers into C strings owned by `spec`, which outlives this call. execve only reads them.
    unsafe {
        libc::execve(
            spec.path.as_ptr(),
            spec.argv_ptrs.as_ptr(),
            spec.env_ptrs.as_ptr(),
        )
    };
    ExecFailure::sys(Step::Execve, Errno::last())
}

/// Sets every signal's disposition to SIG_DFL with the raw `rt_sigaction` system call: libc's
/// `sigaction` refuses the real-time signals it reserves for itself (32 and 33 with glibc),
/// and an inherited "ignore" on those must not reach the workload either.
fn reset_signal_dispositions() -> Result<(), Errno> {
    // The kernel's `struct sigaction`; all zeros is SIG_DFL with no flags and an empty mask
    // whatever the architecture's field order, and 4 words cover every layout.
    let default_action = [0u64; 4];
    for signal in 1..=SIGNAL_MAX {
        // SAFETY: rt_sigaction reads a `struct sigaction` (at most 4 words) from
        // `default_action`, which is valid and lives across the call; the old action is not
        // requested (null). The size argument is the kernel's sigset size (8 bytes).
        let ret = unsafe {
            libc::syscall(
                libc::SYS_rt_sigaction,
                signal,
                default_action.as_ptr(),
                std::ptr::null_mut::<u64>(),
                std::mem::size_of::<u64>(),
            )
        };
        match Errno::result(ret) {
            // SIGKILL and SIGSTOP cannot be changed; they are at their defaults anyway.
            Ok(_) | Err(Errno::EINVAL) => {}
            Err(errno) => return Err(errno),
        }
    }
    Ok(())
}

/// `prctl` with integer arguments.
fn prctl(option: c_int, arg2: c_ulong, arg3: c_ulong) -> Result<c_int, Errno> {
    // SAFETY: every prctl option used here takes integer arguments only (no pointers), so no
    // memory is read or written; prctl is async-signal-safe.
    let ret = unsafe { libc::prctl(option, arg2, arg3, 0 as c_ulong, 0 as c_ulong) };
    Errno::result(ret)
}

fn drop_bounding_set() -> Result<(), ExecFailure> {
    for cap in 0..=CAP_PROBE_MAX {
        match prctl(libc::PR_CAPBSET_READ, cap, 0) {
            Ok(0) => continue,
            Ok(_) => {}
            // Past the kernel's last capability.
            Err(Errno::EINVAL) => return Ok(()),
            Err(errno) => return Err(ExecFailure::sys(Step::DropBounding(cap as u32), errno)),
        }
        if let Err(errno) = prctl(libc::PR_CAPBSET_DROP, cap, 0) {
            return Err(ExecFailure::sys(Step::DropBounding(cap as u32), errno));
        }
    }
    Ok(())
}

fn clear_ambient() -> Result<(), Errno> {
    match prctl(
        libc::PR_CAP_AMBIENT,
        libc::PR_CAP_AMBIENT_CLEAR_ALL as c_ulong,
        0,
    ) {
        // EINVAL: a kernel older than 4.3 has no ambient set.
        Ok(_) | Err(Errno::EINVAL) => Ok(()),
        Err(errno) => Err(errno),
    }
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

fn capget() -> Result<[CapData; 2], Errno> {
    let mut header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: `header` and `data` are valid, properly laid out (repr(C), as in
    // linux/capability.h) and writable; version 3 makes the kernel write exactly two
    // `CapData` elements. capget is a plain system call, async-signal-safe.
    let ret = unsafe { libc::syscall(libc::SYS_capget, &raw mut header, data.as_mut_ptr()) };
    Errno::result(ret).map(|_| data)
}

fn clear_capabilities() -> Result<(), Errno> {
    let mut header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [CapData::default(); 2];
    // SAFETY: as in `capget`; capset only reads the two `CapData` elements. Lowering
    // capabilities of the calling thread is always permitted.
    let ret = unsafe { libc::syscall(libc::SYS_capset, &raw mut header, data.as_ptr()) };
    Errno::result(ret).map(drop)
}

fn join(low: u32, high: u32) -> u64 {
    (u64::from(high) << 32) | u64::from(low)
}

/// The calling thread's capability sets as masks, in [`CapSet`] order (effective, permitted,
/// inheritable, bounding, ambient). Every capability the running kernel knows is probed,
/// also ones newer than this build. On failure, names the set that could not be read.
pub fn capability_sets() -> Result<[u64; 5], (CapSet, Errno)> {
    let data = capget().map_err(|errno| (CapSet::Effective, errno))?;
    let mut bounding = 0u64;
    let mut ambient = 0u64;
    for cap in 0..=CAP_PROBE_MAX {
        match prctl(libc::PR_CAPBSET_READ, cap, 0) {
            Ok(0) => {}
            Ok(_) => bounding |= 1 << cap,
            Err(Errno::EINVAL) => break,
            Err(errno) => return Err((CapSet::Bounding, errno)),
        }
        match prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_IS_SET as c_ulong,
            cap,
        ) {
            Ok(0) | Err(Errno::EINVAL) => {}
            Ok(_) => ambient |= 1 << cap,
            Err(errno) => return Err((CapSet::Ambient, errno)),
        }
    }
    Ok([
        join(data[0].effective, data[1].effective),
        join(data[0].permitted, data[1].permitted),
        join(data[0].inheritable, data[1].inheritable),
        bounding,
        ambient,
    ])
}

fn verify_ids(spec: &ExecSpec) -> Result<(), ExecFailure> {
    let uids = nix::unistd::getresuid().map_err(|e| ExecFailure::sys(Step::VerifyIds, e))?;
    let gids = nix::unistd::getresgid().map_err(|e| ExecFailure::sys(Step::VerifyIds, e))?;
    for uid in [uids.real, uids.effective, uids.saved] {
        if uid != spec.uid {
            return Err(ExecFailure::check(Step::VerifyIds, u64::from(uid.as_raw())));
        }
    }
    for gid in [gids.real, gids.effective, gids.saved] {
        if gid != spec.gid {
            return Err(ExecFailure::check(Step::VerifyIds, u64::from(gid.as_raw())));
        }
    }
    // SAFETY: with a size of 0, getgroups(2) only returns the number of supplementary groups
    // and does not touch the (null) list.
    let groups = unsafe { libc::getgroups(0, std::ptr::null_mut()) };
    match groups {
        0 => Ok(()),
        n if n < 0 => Err(ExecFailure::sys(Step::VerifyGroups, Errno::last())),
        n => Err(ExecFailure::check(Step::VerifyGroups, n as u64)),
    }
}

/// Marks every fd from `first` up close-on-exec: `close_range(first, ~0, CLOEXEC)` (Linux
/// 5.11), or an `fcntl` loop on older kernels.
fn cloexec_from(first: u32) -> Result<(), Errno> {
    // SAFETY: close_range with CLOSE_RANGE_CLOEXEC only sets a flag on descriptors; it reads
    // and writes no memory of ours.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            first,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    match Errno::result(ret) {
        Ok(_) => Ok(()),
        Err(Errno::ENOSYS | Errno::EINVAL) => {
            for fd in first as i32..FD_LOOP_MAX {
                // SAFETY: F_SETFD on an arbitrary number touches no memory; a number that is
                // not an open fd fails with EBADF, which is ignored.
                unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
            }
            Ok(())
        }
        Err(errno) => Err(errno),
    }
}

/// Why the workload could not be started.
#[derive(Debug)]
pub enum SpawnError {
    /// The supervisor's own system calls (pipe, fork) failed.
    Sys(SysError),
    /// The child reported a failed step before `execve` succeeded.
    Child(ExecFailure),
}

/// Forks a child that runs [`drop_privileges_and_exec`]. Returns its pid once `execve`
/// succeeded, or the child's [`ExecFailure`], written by the child into a close-on-exec pipe
/// (after which the child `_exit(127)`s and is reaped here).
pub fn spawn(spec: &ExecSpec) -> Result<Pid, SpawnError> {
    spawn_with_stdio(spec, None)
}

/// [`spawn`] with the child's stdout and stderr connected to `stdio` (the write ends of the
/// relay pipes, `(stdout, stderr)`): the child `dup2`s them onto fds 1 and 2 first (a plain
/// system call on numbers prepared before the fork; the originals are close-on-exec).
pub fn spawn_with_stdio(
    spec: &ExecSpec,
    stdio: Option<(BorrowedFd<'_>, BorrowedFd<'_>)>,
) -> Result<Pid, SpawnError> {
    let stdio = stdio.map(|(out, err)| (out.as_raw_fd(), err.as_raw_fd()));
    let (read_end, write_end) = nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|errno| {
        SpawnError::Sys(SysError::Process {
            op: "pipe2 for the workload's error report".to_owned(),
            errno,
        })
    })?;
    // All signals blocked across fork: the child starts with them blocked and resets the
    // dispositions before anything can be delivered to it.
    let saved = SigSet::all()
        .thread_swap_mask(SigmaskHow::SIG_SETMASK)
        .map_err(|errno| {
            SpawnError::Sys(SysError::Process {
                op: "block signals before fork".to_owned(),
                errno,
            })
        })?;
    // SAFETY: the child runs only `child_main`, which makes async-signal-safe system calls on
    // data prepared before the fork (no allocation, no locks) and ends in execve or _exit.
    let forked = unsafe { nix::unistd::fork() };
    let _ = saved.thread_set_mask();
    match forked {
        Err(errno) => Err(SpawnError::Sys(SysError::Process {
            op: "fork the workload".to_owned(),
            errno,
        })),
        Ok(nix::unistd::ForkResult::Child) => {
            drop(read_end);
            child_main(spec, stdio, write_end)
        }
        Ok(nix::unistd::ForkResult::Parent { child }) => {
            drop(write_end);
            match read_failure(&read_end) {
                None => Ok(child),
                Some(failure) => {
                    // The child _exits right after writing; reap it so it leaves no zombie.
                    let _ = waitpid(child, None);
                    Err(SpawnError::Child(failure))
                }
            }
        }
    }
}

fn child_main(spec: &ExecSpec, stdio: Option<(RawFd, RawFd)>, report: OwnedFd) -> ! {
    let failure = match stdio.map(|(out, err)| connect_stdio(out, err)) {
        Some(Err(failure)) => failure,
        _ => drop_privileges_and_exec(spec),
    };
    let _ = nix::unistd::write(&report, &failure.encode());
    // SAFETY: _exit(2) ends the process at once without running atexit handlers or
    // destructors, which must not run in a forked child.
    unsafe { libc::_exit(127) }
}

/// In the forked child: `dup2(out, 1)`, `dup2(err, 2)`. Async-signal-safe (two system calls).
fn connect_stdio(out: RawFd, err: RawFd) -> Result<(), ExecFailure> {
    for (from, to) in [(out, 1), (err, 2)] {
        // SAFETY: dup2(2) on plain numbers touches no memory of ours; `from` is an open pipe
        // end prepared before the fork, `to` a standard fd.
        if unsafe { libc::dup2(from, to) } < 0 {
            return Err(ExecFailure::sys(Step::Stdio(to as u32), Errno::last()));
        }
    }
    Ok(())
}

/// Reads the child's report until end of file (closed by a successful execve or by the
/// child's exit). `None`: execve succeeded.
fn read_failure(fd: &OwnedFd) -> Option<ExecFailure> {
    let mut buf = [0u8; FAILURE_LEN];
    let mut got = 0;
    while got < FAILURE_LEN {
        match nix::unistd::read(fd, &mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(Errno::EINTR) => continue,
            Err(_) => break,
        }
    }
    match got {
        0 => None,
        FAILURE_LEN => Some(ExecFailure::decode(&buf).unwrap_or(ExecFailure {
            step: Step::Execve,
            errno: None,
            detail: 0,
        })),
        // A partial report still means the child failed before exec.
        _ => Some(ExecFailure {
            step: Step::Execve,
            errno: None,
            detail: 0,
        }),
    }
}

static PIPE_WRITE_FD: AtomicI32 = AtomicI32::new(-1);
static PIPE_INSTALLED: AtomicBool = AtomicBool::new(false);
static PENDING: [AtomicBool; SIGNAL_MAX as usize + 1] =
    [const { AtomicBool::new(false) }; SIGNAL_MAX as usize + 1];

extern "C" fn on_signal(signal: c_int) {
    let saved = Errno::last_raw();
    if let Some(flag) = usize::try_from(signal).ok().and_then(|i| PENDING.get(i)) {
        flag.store(true, Ordering::SeqCst);
    }
    let fd = PIPE_WRITE_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        let byte = 0u8;
        // SAFETY: write(2) is async-signal-safe; `fd` is the non-blocking write end of the
        // installed pipe, which is never closed (see `SignalPipe`'s Drop); the buffer is a
        // valid one-byte local. A full pipe (EAGAIN) is fine: the reader is awake already.
        unsafe { libc::write(fd, (&raw const byte).cast(), 1) };
    }
    Errno::set_raw(saved);
}

/// The supervisor's signal source: handlers that set a flag and write a byte into a pipe
/// (the self-pipe trick). Unlike a blocked mask plus `signalfd`, this works however many
/// threads the process has: a signal is caught whichever thread the kernel delivers it to.
/// One may be installed at a time.
#[derive(Debug)]
pub struct SignalPipe {
    read: OwnedFd,
    previous: Vec<(Signal, SigAction)>,
}

impl SignalPipe {
    /// Installs handlers for `signals` and unblocks them in the calling thread.
    pub fn install(signals: &[Signal]) -> Result<SignalPipe, SysError> {
        let process_error = |op: &str, errno| SysError::Process {
            op: op.to_owned(),
            errno,
        };
        if PIPE_INSTALLED.swap(true, Ordering::SeqCst) {
            return Err(process_error(
                "install signal handlers (already installed)",
                Errno::EBUSY,
            ));
        }
        let (read, write) = match nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK) {
            Ok(pipe) => pipe,
            Err(errno) => {
                PIPE_INSTALLED.store(false, Ordering::SeqCst);
                return Err(process_error("pipe2 for signals", errno));
            }
        };
        // The write end becomes a raw number owned by the handler; see Drop.
        PIPE_WRITE_FD.store(write.into_raw_fd(), Ordering::SeqCst);
        let mut pipe = SignalPipe {
            read,
            previous: Vec::new(),
        };
        for &signal in signals {
            if let Some(flag) = PENDING.get(signal as usize) {
                flag.store(false, Ordering::SeqCst);
            }
            let mut flags = SaFlags::SA_RESTART;
            if signal == Signal::SIGCHLD {
                flags |= SaFlags::SA_NOCLDSTOP;
            }
            let action = SigAction::new(SigHandler::Handler(on_signal), flags, SigSet::empty());
            // SAFETY: `on_signal` is async-signal-safe: it only stores to atomics, calls
            // write(2) and saves/restores errno.
            match unsafe { nix::sys::signal::sigaction(signal, &action) } {
                Ok(previous) => pipe.previous.push((signal, previous)),
                Err(errno) => return Err(process_error(&format!("sigaction({signal})"), errno)),
            }
        }
        let set: SigSet = signals.iter().copied().collect();
        set.thread_unblock()
            .map_err(|errno| process_error("unblock supervisor signals", errno))?;
        Ok(pipe)
    }

    /// Waits until a signal arrives or `timeout` passes (`None`: no limit), then returns the
    /// installed signals that arrived since the last call (each once, in signal-number order).
    pub fn wait(&self, timeout: Option<Duration>) -> Result<Vec<Signal>, SysError> {
        let timeout = match timeout {
            None => PollTimeout::NONE,
            Some(t) => PollTimeout::try_from(t).unwrap_or(PollTimeout::MAX),
        };
        let mut fds = [PollFd::new(self.read.as_fd(), PollFlags::POLLIN)];
        match nix::poll::poll(&mut fds, timeout) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(errno) => {
                return Err(SysError::Process {
                    op: "poll the signal pipe".to_owned(),
                    errno,
                })
            }
        }
        self.drain();
        Ok(self
            .previous
            .iter()
            .filter(|(signal, _)| {
                PENDING
                    .get(*signal as usize)
                    .is_some_and(|flag| flag.swap(false, Ordering::SeqCst))
            })
            .map(|(signal, _)| *signal)
            .collect())
    }

    fn drain(&self) {
        let mut buf = [0u8; 64];
        while let Ok(n) = nix::unistd::read(&self.read, &mut buf) {
            if n == 0 {
                break;
            }
        }
    }

    /// The pipe's read end (for callers that poll it together with other fds).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.read.as_fd()
    }
}

impl Drop for SignalPipe {
    fn drop(&mut self) {
        for (signal, previous) in self.previous.drain(..).rev() {
            // SAFETY: restores the disposition that was in place before `install`.
            let _ = unsafe { nix::sys::signal::sigaction(signal, &previous) };
        }
        PIPE_WRITE_FD.store(-1, Ordering::SeqCst);
        // The write end is deliberately left open (it is close-on-exec): a handler running at
        // this very moment on another thread may still hold its number, and closing it could
        // let that handler write into an unrelated file that reuses the number.
        PIPE_INSTALLED.store(false, Ordering::SeqCst);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn failure_reports_round_trip() {
        for step in [
            Step::SignalDefaults,
            Step::Rlimit(3),
            Step::Chdir,
            Step::DropBounding(40),
            Step::VerifyCapabilities(CapSet::Ambient),
            Step::Execve,
        ] {
            let failure = ExecFailure {
                step,
                errno: Some(Errno::EPERM),
                detail: 0xdead_beef_0000_0001,
            };
            assert_eq!(ExecFailure::decode(&failure.encode()), Some(failure));
        }
        let check = ExecFailure::check(Step::VerifyGroups, 2);
        assert_eq!(ExecFailure::decode(&check.encode()), Some(check));
    }

    #[test]
    fn spec_refuses_nul_bytes_and_empty_argv() {
        let root = Path::new("/");
        let err = ExecSpec::new(&["/bin/a\0b".into()], &[], root, 1, 1, 0o22, &[]).unwrap_err();
        assert_eq!(err.to_string(), "exec[0] contains a NUL byte");
        let env = [("K".to_owned(), "v\0".to_owned())];
        let err = ExecSpec::new(&["/bin/true".into()], &env, root, 1, 1, 0o22, &[]).unwrap_err();
        assert_eq!(err.to_string(), "env K contains a NUL byte");
        let err = ExecSpec::new(&[], &[], root, 1, 1, 0o22, &[]).unwrap_err();
        assert_eq!(err, ExecInputError::EmptyArgv);
    }

    #[test]
    fn spec_builds_null_terminated_arrays() {
        let env = [("A".to_owned(), "1".to_owned())];
        let spec = ExecSpec::new(
            &["/bin/true".into(), "x".into()],
            &env,
            Path::new("/"),
            1,
            1,
            0o22,
            &[],
        )
        .unwrap();
        assert_eq!(spec.argv_ptrs.len(), 3);
        assert!(spec.argv_ptrs[2].is_null());
        assert_eq!(spec.env_ptrs.len(), 2);
        assert!(spec.env_ptrs[1].is_null());
        assert_eq!(spec._env[0].as_bytes(), b"A=1");
    }

    #[test]
    fn capability_sets_of_this_thread_can_be_read() {
        let sets = capability_sets().unwrap();
        // Whatever we run as, effective is a subset of permitted.
        assert_eq!(sets[0] & !sets[1], 0);
    }
}
