//! The lockdown's real effects, as root, inside a private mount (and PID) namespace.
//!
//! Each test re-executes this test binary inside `unshare --pid --fork --mount --mount-proc`,
//! where [`namespace_entry_point`] runs `lockdown::apply` for the PID 1 shape against a
//! temporary tree. What is real there: the `/tmp` tmpfs mount (and the bind remount that adds
//! `nosuid,nodev`) on a temporary directory, read back from the real `/proc/self/mountinfo`;
//! stdin onto the real `/dev/null`, read back from `/proc/self/fd/0`; and the
//! account files on a real read-only tmpfs, which the lockdown must skip with the reason.
//! What is never real: the host's sysctls, swap, modules, Ctrl-Alt-Del and account files —
//! those are files in the temporary tree or recorded calls ([`Sandboxed`]).
//!
//! Every run is bounded; the mount namespace (private propagation) takes every mount with it.
//! Without root these tests fail (they do not skip).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::time::Duration;

use serde_json::Value;

#[allow(dead_code)] // the parts only other namespace tests use
mod common;

use common::Run;

const SCENARIO_ENV: &str = "CVM_WARDEN_LOCKDOWN_NS_SCENARIO";
const DIR_ENV: &str = "CVM_WARDEN_LOCKDOWN_NS_DIR";
const RUN_LIMIT: Duration = Duration::from_secs(40);

/// Entry point of the re-executed binary; does nothing in a normal test run.
#[test]
fn namespace_entry_point() {
    if let Ok(scenario) = std::env::var(SCENARIO_ENV) {
        inside::run(&scenario);
    }
}

mod inside {
    use std::io;
    use std::path::{Path, PathBuf};
    use std::time::Duration;

    use cvm_warden::lockdown::{self, CommandOutput, LockdownSys, Paths, RealLockdownSys, Shape};
    use cvm_warden::policy::Lockdown;
    use nix::mount::MsFlags;

    /// Real where it is safe (mounts inside this mount namespace, a pty, our own stdin),
    /// simulated against the temporary tree everywhere else.
    struct Sandboxed {
        paths: Paths,
    }

    impl LockdownSys for Sandboxed {
        fn kernel_release(&self) -> io::Result<String> {
            Ok("test".into())
        }
        fn finit_module(&self, _: &Path, _: bool) -> io::Result<()> {
            Err(io::Error::other("no modules in this test"))
        }
        fn swapoff(&self, _: &Path) -> io::Result<()> {
            Err(io::Error::other("no swap in this test"))
        }
        fn mount(
            &self,
            source: Option<&str>,
            target: &Path,
            fstype: Option<&str>,
            flags: MsFlags,
            data: Option<&str>,
        ) -> io::Result<()> {
            assert!(
                target.starts_with(self.paths.tmp.parent().unwrap()),
                "mount outside the test tree: {}",
                target.display()
            );
            RealLockdownSys::new().mount(source, target, fstype, flags, data)
        }
        fn disable_ctrl_alt_del(&self) -> io::Result<()> {
            std::fs::write(self.paths.proc_sys.join("kernel/ctrl-alt-del"), "0\n")
        }
        fn stdin_to_null(&self, dev_null: &Path) -> io::Result<()> {
            RealLockdownSys::new().stdin_to_null(dev_null)
        }
        fn console_receiver_off(&self, console: &Path) -> io::Result<bool> {
            RealLockdownSys::new().console_receiver_off(console)
        }
        fn console_receives(&self, console: &Path) -> io::Result<Option<bool>> {
            RealLockdownSys::new().console_receives(console)
        }
        fn run(&self, program: &str, _: &[&str]) -> io::Result<CommandOutput> {
            Err(io::Error::other(format!(
                "{program} is not run in this test"
            )))
        }
        fn pause(&self, duration: Duration) {
            std::thread::sleep(duration);
        }
    }

    fn write(path: &Path, text: &str) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    pub fn run(scenario: &str) -> ! {
        let dir = PathBuf::from(std::env::var(super::DIR_ENV).unwrap());
        let root = dir.join("root");
        let fake = Paths::under(&root);
        // No console device: recorded as not available (the pty test below covers CREAD).
        let console = dir.join("no-console");
        let paths = Paths {
            mountinfo: PathBuf::from("/proc/self/mountinfo"),
            proc_self_fd: PathBuf::from("/proc/self/fd"),
            dev_null: PathBuf::from("/dev/null"),
            console,
            tmp: dir.join("tmp"),
            ..fake
        };
        for (key, value) in [
            ("kernel.kexec_load_disabled", "0"),
            ("kernel.dmesg_restrict", "0"),
            ("kernel.kptr_restrict", "0"),
            ("kernel.yama.ptrace_scope", "1"),
            ("kernel.unprivileged_bpf_disabled", "2"),
            ("kernel.sysrq", "176"),
            ("kernel.perf_event_paranoid", "2"),
            ("kernel.modules_disabled", "0"),
            ("kernel.ctrl-alt-del", "1"),
        ] {
            write(&paths.sysctl(key), value);
        }
        write(&paths.proc_swaps, "Filename Type Size Used Priority\n");
        std::fs::create_dir_all(&paths.tmp).unwrap();
        // /etc as a read-only file system, as in a read-only initramfs.
        let etc = paths.passwd.parent().unwrap().to_path_buf();
        std::fs::create_dir_all(&etc).unwrap();
        nix::mount::mount(
            Some("tmpfs"),
            &etc,
            Some("tmpfs"),
            MsFlags::empty(),
            None::<&str>,
        )
        .unwrap();
        // pam_unix uses a hash in /etc/passwd itself; read-only, it cannot be locked.
        let root_field = if scenario == "passwd-hash" {
            "$6$s$h"
        } else {
            "x"
        };
        write(
            &paths.passwd,
            &format!("root:{root_field}:0:0:root:/root:/bin/sh\n"),
        );
        write(&paths.shadow, "root:$6$s$h:1::::::\n");
        nix::mount::mount(
            None::<&str>,
            &etc,
            None::<&str>,
            MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
            None::<&str>,
        )
        .unwrap();
        match scenario {
            "fresh" | "passwd-hash" => {}
            "remount" => {
                // /tmp already a tmpfs, but without nosuid,nodev, and noexec to be kept.
                nix::mount::mount(
                    Some("tmpfs"),
                    &paths.tmp,
                    Some("tmpfs"),
                    MsFlags::MS_NOEXEC,
                    Some("mode=1777"),
                )
                .unwrap();
            }
            other => panic!("unknown scenario {other}"),
        }
        let policy = Lockdown {
            consoles: "off".into(),
            kernel_lockdown: None,
            modules: Vec::new(),
        };
        let plan = lockdown::plan(&policy, Shape::Pid1);
        let sys = Sandboxed {
            paths: paths.clone(),
        };
        // Stdin starts as a pipe holding a byte, so reading /dev/null afterwards is visible.
        let (pipe_read, pipe_write) = nix::unistd::pipe().unwrap();
        nix::unistd::write(&pipe_write, b"x").unwrap();
        nix::unistd::dup2_stdin(&pipe_read).unwrap();
        let code = match lockdown::apply(&plan, &sys, &paths) {
            Ok(report) => {
                println!("\nREPORT {}", serde_json::to_string(&report).unwrap());
                // The real stdin is /dev/null now: reading gives end of file at once.
                let mut byte = [0u8; 1];
                let n = std::io::Read::read(&mut std::io::stdin(), &mut byte).unwrap();
                println!("STDIN-READ {n}");
                println!("TMP {}", paths.tmp.display());
                0
            }
            Err(error) => {
                println!("\nERROR {}", cvm_warden::report::error_chain(&error));
                1
            }
        };
        std::process::exit(code);
    }
}

fn spawn_scenario(scenario: &str) -> (common::Outcome, tempfile::TempDir) {
    common::require_root(
        "lockdown_ns",
        "it mounts tmpfs in a private mount namespace",
    );
    let dir = tempfile::tempdir().unwrap();
    let mut command = common::unshare(&[]);
    command
        .arg(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "namespace_entry_point",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(SCENARIO_ENV, scenario)
        .env(DIR_ENV, dir.path());
    (Run::spawn(command, RUN_LIMIT).finish(), dir)
}

fn run_scenario(scenario: &str) -> (Value, tempfile::TempDir) {
    let (outcome, dir) = spawn_scenario(scenario);
    assert_eq!(outcome.code, Some(0), "{outcome:#?}");
    let report = outcome
        .lines
        .iter()
        .find_map(|l| l.strip_prefix("REPORT "))
        .unwrap_or_else(|| panic!("no report: {outcome:#?}"));
    assert!(
        outcome.lines.iter().any(|l| l == "STDIN-READ 0"),
        "{outcome:#?}"
    );
    (serde_json::from_str(report).unwrap(), dir)
}

fn check<'a>(report: &'a Value, setting: &str) -> &'a Value {
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["setting"] == setting)
        .unwrap_or_else(|| panic!("no check {setting} in {report:#}"))
}

fn step<'a>(report: &'a Value, setting: &str) -> &'a Value {
    report["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["setting"] == setting)
        .unwrap_or_else(|| panic!("no step {setting} in {report:#}"))
}

fn assert_not_mounted_on_host(path: &Path) {
    let table = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !table.contains(&path.display().to_string()),
        "{} leaked into the host's mount table",
        path.display()
    );
}

#[test]
fn tmp_gets_a_real_nosuid_nodev_tmpfs_and_the_console_and_stdin_are_closed() {
    let (report, dir) = run_scenario("fresh");
    let tmp = dir.path().join("tmp");
    let tmp_check = check(&report, &tmp.display().to_string());
    assert_eq!(tmp_check["state"], "ok", "{report:#}");
    let actual = tmp_check["actual"].as_str().unwrap();
    assert!(actual.starts_with("tmpfs,rw,nosuid,nodev"), "{actual}");
    assert_eq!(
        step(&report, &tmp.display().to_string())["outcome"],
        "applied"
    );
    // No console device: not available, not a failure. Stdin is the real /dev/null.
    let console = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["setting"].as_str().unwrap().ends_with(" input"))
        .unwrap();
    assert_eq!(
        (&console["state"], &console["actual"]),
        (&"not-available".into(), &"no console device".into())
    );
    assert_eq!(check(&report, "stdin")["actual"], "/dev/null");
    assert_eq!(check(&report, "stdin")["state"], "ok");
    // Account files on a read-only file system are skipped with the reason, not failed.
    let root = step(&report, "root password");
    assert_eq!(root["outcome"], "skipped");
    assert!(root["reason"]
        .as_str()
        .unwrap()
        .ends_with("is on a read-only file system"));
    assert_eq!(check(&report, "root password")["state"], "skipped");
    assert_eq!(check(&report, "login shells")["state"], "skipped");
    assert_not_mounted_on_host(&tmp);
}

#[test]
fn a_root_hash_in_a_read_only_passwd_fails_closed() {
    // Shadow's hash on a read-only /etc is skipped (the fresh scenario); a hash in passwd
    // is what pam_unix checks, and it cannot be locked there: the boot stops.
    let (outcome, dir) = spawn_scenario("passwd-hash");
    assert_eq!(outcome.code, Some(1), "{outcome:#?}");
    let error = outcome
        .lines
        .iter()
        .find_map(|l| l.strip_prefix("ERROR "))
        .unwrap_or_else(|| panic!("no error: {outcome:#?}"));
    assert!(
        error.contains(
            "root password wanted locked, actual usable password in passwd (read-only /etc: \
             cannot be locked)"
        ),
        "{error}"
    );
    assert_not_mounted_on_host(&dir.path().join("tmp"));
}

#[test]
fn a_tmpfs_on_tmp_without_nosuid_nodev_is_remounted_keeping_noexec() {
    let (report, dir) = run_scenario("remount");
    let tmp = dir.path().join("tmp");
    assert_eq!(
        step(&report, &tmp.display().to_string())["value"],
        "tmpfs,nosuid,nodev (remounted)"
    );
    let actual = check(&report, &tmp.display().to_string())["actual"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        actual.starts_with("tmpfs,rw,nosuid,nodev,noexec"),
        "{actual}"
    );
    assert_not_mounted_on_host(&tmp);
}

/// `CREAD` on a fresh pseudo-terminal (no root, no namespace: the pty is ours). Linux's pty
/// driver may refuse to clear `CREAD` (EINVAL, seen on 6.18); then the lockdown must report
/// the error (fail closed) and the terminal must still read back as receiving. Where the
/// driver accepts it, the read-back must say the receiver is off.
#[test]
fn console_receiver_off_on_a_pty_is_read_back_or_refused_loudly() {
    use cvm_warden::lockdown::{LockdownSys, RealLockdownSys};
    let pty = nix::pty::openpty(None, None).unwrap();
    let console = nix::unistd::ttyname(&pty.slave).unwrap();
    assert_eq!(
        RealLockdownSys::new().console_receives(&console).unwrap(),
        Some(true)
    );
    match RealLockdownSys::new().console_receiver_off(&console) {
        Ok(true) => assert_eq!(
            RealLockdownSys::new().console_receives(&console).unwrap(),
            Some(false)
        ),
        Ok(false) => panic!("a pty is a terminal"),
        Err(e) => {
            assert_eq!(e.raw_os_error(), Some(libc::EINVAL), "{e}");
            assert_eq!(
                RealLockdownSys::new().console_receives(&console).unwrap(),
                Some(true)
            );
        }
    }
    // A regular file is no terminal: nothing to turn off.
    let file = tempfile::NamedTempFile::new().unwrap();
    assert!(!RealLockdownSys::new()
        .console_receiver_off(file.path())
        .unwrap());
    assert_eq!(
        RealLockdownSys::new()
            .console_receives(file.path())
            .unwrap(),
        None
    );
}
