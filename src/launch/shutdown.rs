//! The end of the PID 1 shape: sync, unmount, power off — or, inside a sandbox PID namespace,
//! exit with the workload's status. And the panic hook that takes the same path.

use std::io::Write;
use std::panic::PanicHookInfo;
use std::path::Path;

use crate::policy::FailureAction;
use crate::sys::{RealSys, Sys};

/// Kernel log device written by the panic hook in PID 1 mode.
pub const DEV_KMSG: &str = "/dev/kmsg";
/// Exit status after a panic (outside PID 1, and inside a sandbox PID namespace).
pub const PANIC_EXIT_CODE: i32 = 1;

/// What the end of PID 1 does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutdownAction {
    /// A real boot (initial PID namespace): sync, unmount everything, power off or halt.
    PowerOff(FailureAction),
    /// A sandbox PID namespace (tests, demos): sync and exit with this status. Nothing is
    /// unmounted: the sandbox may share its mount namespace with the host, and its own mounts
    /// go away with it anyway.
    Exit(i32),
}

/// Pure: the shutdown for a process that is (or is not) in the initial PID namespace.
pub fn shutdown_plan(in_initial_ns: bool, action: FailureAction, code: i32) -> ShutdownAction {
    if in_initial_ns {
        ShutdownAction::PowerOff(action)
    } else {
        ShutdownAction::Exit(code)
    }
}

/// Does everything of the shutdown except the final `exit`, and returns the exit status the
/// process must end with. In a real boot that is reached only when `reboot(2)` failed.
/// Separate from [`shutdown`] so that it can be tested with a fake [`Sys`].
pub fn prepare_shutdown(sys: &dyn Sys, action: FailureAction, code: i32) -> i32 {
    // Decided before anything is unmounted: the answer reads /proc.
    let plan = shutdown_plan(sys.in_initial_pid_namespace(), action, code);
    sys.sync();
    match plan {
        ShutdownAction::Exit(code) => code,
        ShutdownAction::PowerOff(action) => {
            unmount_all(sys);
            sys.sync();
            let error = sys.power_off(action);
            let _ = writeln!(
                std::io::stderr(),
                "cvm-warden: {}; exiting, which makes the kernel panic and stops the machine",
                super::chain(&error)
            );
            code
        }
    }
}

/// Best effort, newest mount first; a busy file system is at least made read-only so that
/// its data is on disk before the power goes.
fn unmount_all(sys: &dyn Sys) {
    for target in sys.mount_points().iter().rev() {
        if target == Path::new("/") {
            continue;
        }
        if sys.umount(target).is_err() {
            let _ = sys.remount_readonly(target);
        }
    }
}

/// Ends PID 1: [`prepare_shutdown`], then `exit`.
///
/// In a real boot `exit` is reached only when `reboot(2)` failed. PID 1 then exits on
/// purpose: the kernel panics ("Attempted to kill init!"), which stops every CPU (or reboots
/// with `panic=N`, into a fresh launch that must attest again). We prefer that to looping
/// forever, which would leave the kernel running with the network up and any opened volume
/// still mapped; no user process is left either way.
pub fn shutdown(sys: &dyn Sys, action: FailureAction, code: i32) -> ! {
    let code = prepare_shutdown(sys, action, code);
    std::process::exit(code)
}

/// The panic's message and location, on one line: `panicked at FILE:LINE:COL: MESSAGE`.
pub fn panic_message(info: &PanicHookInfo<'_>) -> String {
    let payload = info.payload();
    let message = payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(non-text panic payload)".to_owned());
    match info.location() {
        Some(at) => format!(
            "panicked at {}:{}:{}: {message}",
            at.file(),
            at.line(),
            at.column()
        ),
        None => format!("panicked: {message}"),
    }
}

/// One kernel-log line at priority 2 (critical), cut to the kernel's line limit.
fn kmsg_line(message: &str) -> String {
    let mut line = format!("<2>cvm-warden: {}", message.replace('\n', " "));
    if line.len() > 900 {
        let mut end = 900;
        while !line.is_char_boundary(end) {
            end -= 1;
        }
        line.truncate(end);
    }
    line.push('\n');
    line
}

fn write_kmsg(path: &Path, message: &str) {
    if let Ok(mut kmsg) = std::fs::OpenOptions::new().write(true).open(path) {
        let _ = kmsg.write_all(kmsg_line(message).as_bytes());
    }
}

/// Installs the panic hook: `on_panic(message)` first (the caller writes an audit record),
/// then the default hook's output on stderr. Then, when `pid1`, the message goes to
/// `/dev/kmsg` (best effort) and the machine is shut down as after a failed boot (power off;
/// exit status 1 in a sandbox PID namespace). Otherwise the process exits with status 1 — also
/// in debug builds, where a panic would otherwise only end its thread.
pub fn install_panic_hook(on_panic: Box<dyn Fn(&str) + Send + Sync>, pid1: bool) {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = panic_message(info);
        on_panic(&message);
        default_hook(info);
        if pid1 {
            write_kmsg(Path::new(DEV_KMSG), &message);
            shutdown(
                &RealSys::default(),
                FailureAction::Poweroff,
                PANIC_EXIT_CODE,
            );
        }
        std::process::exit(PANIC_EXIT_CODE);
    }));
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use nix::errno::Errno;

    use super::*;
    use crate::sys::{FakeSys, Op, SysCall};

    #[test]
    fn real_boot_powers_off_and_sandbox_exits() {
        assert_eq!(
            shutdown_plan(true, FailureAction::Halt, 3),
            ShutdownAction::PowerOff(FailureAction::Halt)
        );
        assert_eq!(
            shutdown_plan(false, FailureAction::Poweroff, 3),
            ShutdownAction::Exit(3)
        );
    }

    #[test]
    fn real_boot_syncs_unmounts_newest_first_then_powers_off() {
        let sys = FakeSys::new()
            .with_mounted(["/", "/proc", "/run", "/run/cvm-warden/bundle"])
            .fail_on(Op::PowerOff, Errno::EPERM);
        let code = prepare_shutdown(&sys, FailureAction::Poweroff, 7);
        assert_eq!(code, 7);
        assert_eq!(
            sys.calls(),
            vec![
                SysCall::Sync,
                SysCall::Umount("/run/cvm-warden/bundle".into()),
                SysCall::Umount("/run".into()),
                SysCall::Umount("/proc".into()),
                SysCall::Sync,
                SysCall::PowerOff(FailureAction::Poweroff),
            ]
        );
    }

    #[test]
    fn a_busy_mount_is_made_read_only_instead() {
        let sys = FakeSys::new()
            .with_mounted(["/", "/workspace"])
            .fail_on(Op::Umount, Errno::EBUSY);
        prepare_shutdown(&sys, FailureAction::Halt, 0);
        assert_eq!(
            sys.calls(),
            vec![
                SysCall::Sync,
                SysCall::Umount("/workspace".into()),
                SysCall::RemountReadonly("/workspace".into()),
                SysCall::Sync,
                SysCall::PowerOff(FailureAction::Halt),
            ]
        );
    }

    #[test]
    fn sandbox_only_syncs_and_keeps_the_code() {
        let sys = FakeSys::new().in_sandbox().with_mounted(["/", "/proc"]);
        assert_eq!(prepare_shutdown(&sys, FailureAction::Poweroff, 42), 42);
        assert_eq!(sys.calls(), vec![SysCall::Sync]);
    }

    #[test]
    fn kmsg_lines_are_critical_single_lines_within_the_limit() {
        assert_eq!(kmsg_line("boom\nat x"), "<2>cvm-warden: boom at x\n");
        let long = "é".repeat(1000);
        let line = kmsg_line(&long);
        assert!(line.len() <= 901);
        assert!(line.ends_with('\n'));
    }

    #[test]
    fn kmsg_writes_to_the_given_device_best_effort() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kmsg");
        std::fs::write(&path, "").unwrap();
        write_kmsg(&path, "panicked at a.rs:1:2: boom");
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "<2>cvm-warden: panicked at a.rs:1:2: boom\n"
        );
        // A missing device is ignored.
        write_kmsg(&dir.path().join("missing/kmsg"), "x");
    }
}
