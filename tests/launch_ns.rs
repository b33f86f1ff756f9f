//! Launch and the PID 1 supervisor, for real, as root, inside namespaces.
//!
//! Each test re-executes this test binary as PID 1 of a fresh PID and mount namespace
//! (`unshare --pid --fork --mount --mount-proc --kill-child`), in a scenario chosen with an
//! environment variable; there, [`namespace_entry_point`] calls the launch code directly with a
//! launch plan built in code, prints what happened, and exits with the workload's status. The
//! outer test then checks the output from outside. The workload runs as `nobody` (65534) and
//! reports what it sees from `/proc/$$/status`, its environment and its fds.
//!
//! Every run is bounded (`RUN_LIMIT`); on a timeout `unshare` is killed and `--kill-child`
//! takes the whole namespace down with it. Without root these tests fail (they do not skip).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::time::Duration;

use serde_json::Value;

#[allow(dead_code)] // the parts only tests/boot_ns.rs uses
mod common;

use common::{Outcome, Run};

/// Selects the scenario in the re-executed binary.
const SCENARIO_ENV: &str = "CVM_WARDEN_LAUNCH_NS_SCENARIO";
/// A directory the outer test prepared (workdir, kmsg stand-in).
const DIR_ENV: &str = "CVM_WARDEN_LAUNCH_NS_DIR";
/// Upper bound of one namespace run.
const RUN_LIMIT: Duration = Duration::from_secs(40);
/// Uid and gid of `nobody`/`nogroup` on Debian.
const NOBODY: u32 = 65534;

/// The script the identity checks run: everything the workload can see about itself.
/// The status is read by the shell itself, with builtins only: dash blocks every signal
/// around its own (v)forks, so a `cat` of the shell's status may catch that transient mask.
const REPORT: &str = r#"while IFS= read -r line; do printf '%s\n' "$line"; done < /proc/$$/status
echo ENV-BEGIN; tr '\0' '\n' < /proc/$$/environ; echo ENV-END
echo FDS-BEGIN; ls /proc/$$/fd; echo FDS-END
echo "UMASK $(umask)"
echo "NOFILE $(ulimit -n) $(ulimit -Hn)"
echo "CORE $(ulimit -c)"
echo "PWD $(pwd)"
echo "GROUPS $(id -G)"
exit 7"#;

// ---------------------------------------------------------------------------------------------
// Inside the namespace.

/// Entry point of the re-executed binary; does nothing in a normal test run.
#[test]
fn namespace_entry_point() {
    if let Ok(scenario) = std::env::var(SCENARIO_ENV) {
        inside::run(&scenario);
    }
}

mod inside {
    use std::io::Write;
    use std::os::fd::IntoRawFd;
    use std::path::{Path, PathBuf};

    use cvm_warden::launch::{self, LaunchPlan};
    use cvm_warden::policy::{FailureAction, Restart, Rlimit, RlimitResource};
    use cvm_warden::sys::{RealSys, Sys};
    use nix::mount::{MntFlags, MsFlags};
    use serde_json::{json, Value};

    fn say(line: &str) {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }

    fn fail(what: &str) -> ! {
        say(&format!("HARNESS-ERROR {what}"));
        std::process::exit(90)
    }

    fn dir() -> PathBuf {
        std::env::var_os(super::DIR_ENV).map_or_else(|| PathBuf::from("/"), PathBuf::from)
    }

    fn plan(argv: &[&str], restart: Restart) -> LaunchPlan {
        LaunchPlan {
            argv: argv.iter().map(|s| (*s).to_owned()).collect(),
            env: vec![
                ("FOO".to_owned(), "bar baz".to_owned()),
                ("PATH".to_owned(), "/usr/bin:/bin".to_owned()),
            ],
            user: "nobody".to_owned(),
            uid: super::NOBODY,
            gid: super::NOBODY,
            workdir: dir(),
            umask: 0o027,
            rlimits: vec![
                Rlimit {
                    resource: RlimitResource::Nofile,
                    soft: 64,
                    hard: 128,
                },
                Rlimit {
                    resource: RlimitResource::Core,
                    soft: 0,
                    hard: 0,
                },
            ],
            restart,
        }
    }

    fn event(name: &str, details: Value) {
        say(&format!(
            "EVENT {}",
            json!({ "event": name, "details": details })
        ));
    }

    /// Other processes still in this PID namespace (zombies included).
    fn remaining() -> Vec<String> {
        std::fs::read_dir("/proc")
            .unwrap()
            .filter_map(Result::ok)
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|name| name.parse::<u32>().is_ok() && name != "1")
            .map(|pid| {
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
                format!("{pid}:{}", stat.trim())
            })
            .collect()
    }

    /// Supervises `plan`, prints events and the result, exits with the workload's status.
    fn supervise(plan: &LaunchPlan) -> ! {
        let sys = RealSys::default();
        let result = launch::supervise(
            plan,
            &sys,
            &mut |name: &str, details: Value| event(name, details),
            vec![],
            None,
        );
        say(&format!("REMAINING {}", json!(remaining())));
        match result {
            Ok(exit) => {
                say(&format!("RESULT {}", json!(exit)));
                std::process::exit(exit.code)
            }
            Err(error) => {
                say(&format!("ERROR {}", chain(&error)));
                std::process::exit(99)
            }
        }
    }

    use cvm_warden::report::error_chain as chain;

    /// An fd without close-on-exec, which the workload must not inherit.
    fn leak_fd() {
        let file = std::fs::File::open("/dev/null").unwrap();
        let leaked = nix::unistd::dup(&file).unwrap();
        say(&format!("LEAKED-FD {}", leaked.into_raw_fd()));
    }

    pub fn run(scenario: &str) -> ! {
        // libtest has printed "test namespace_entry_point ... " without a newline.
        say("");
        if std::process::id() != 1 {
            fail("not PID 1 of a PID namespace");
        }
        match scenario {
            "identity" => {
                leak_fd();
                // A blocked signal must not reach the workload blocked.
                let mut set = nix::sys::signal::SigSet::empty();
                set.add(nix::sys::signal::Signal::SIGUSR1);
                set.thread_block().unwrap();
                supervise(&plan(&["/bin/sh", "-c", super::REPORT], Restart::Never))
            }
            "exec" => {
                leak_fd();
                let error = launch::exec(&plan(&["/bin/sh", "-c", super::REPORT], Restart::Never));
                say(&format!("ERROR {}", chain(&error)));
                std::process::exit(99)
            }
            "orphans" => supervise(&plan(
                &[
                    "/bin/sh",
                    "-c",
                    "(sh -c 'sleep 0.1; exit 3' &); (exec sleep 30 &); sleep 1.5; exit 0",
                ],
                Restart::Never,
            )),
            "sigterm" => supervise(&plan(
                &[
                    "/bin/sh",
                    "-c",
                    "trap 'exit 42' TERM; echo READY; while :; do sleep 0.05; done",
                ],
                Restart::OnFailure { max: 3 },
            )),
            "restart" => supervise(&plan(
                &["/bin/sh", "-c", "echo RUN; exit 5"],
                Restart::OnFailure { max: 2 },
            )),
            "child_failures" => {
                let sys = RealSys::default();
                let mut bad_dir = plan(&["/bin/true"], Restart::Never);
                bad_dir.workdir = PathBuf::from("/nonexistent/cvm-warden-workdir");
                let mut bad_program = plan(&["/nonexistent/cvm-warden-program"], Restart::Never);
                bad_program.restart = Restart::OnFailure { max: 3 };
                for plan in [bad_dir, bad_program] {
                    match launch::supervise(&plan, &sys, &mut event, vec![], None) {
                        Ok(exit) => fail(&format!("started anyway: {exit:?}")),
                        Err(error) => say(&format!("ERROR {}", chain(&error))),
                    }
                }
                say(&format!("REMAINING {}", json!(remaining())));
                std::process::exit(0)
            }
            "sys" => sys_checks(),
            "shutdown" => {
                let sys = RealSys::default();
                say(&format!("INITIAL-NS {}", sys.in_initial_pid_namespace()));
                launch::shutdown(&sys, FailureAction::Poweroff, 33)
            }
            "panic_pid1" | "panic_unit" => {
                let pid1 = scenario == "panic_pid1";
                let kmsg = dir().join("kmsg");
                std::fs::write(&kmsg, "").unwrap();
                RealSys::default()
                    .mount(
                        Some(kmsg.to_str().unwrap()),
                        Path::new("/dev/kmsg"),
                        None,
                        MsFlags::MS_BIND,
                        None,
                    )
                    .unwrap();
                launch::install_panic_hook(
                    Box::new(|message: &str| say(&format!("ON-PANIC {message}"))),
                    pid1,
                );
                let boom: Option<u32> = std::hint::black_box(None);
                boom.expect("boom");
                fail("still running after a panic")
            }
            other => fail(&format!("unknown scenario {other}")),
        }
    }

    fn mount_line(target: &Path) -> Option<String> {
        let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        text.lines()
            .rfind(|line| line.split(' ').nth(4) == Some(target.to_str().unwrap()))
            .map(str::to_owned)
    }

    fn sys_checks() -> ! {
        use std::os::unix::fs::PermissionsExt;

        let sys = RealSys::default();
        say(&format!("INITIAL-NS {}", sys.in_initial_pid_namespace()));
        say(&format!("PID {}", sys.pid()));

        // The copy-bundle tmpfs: mount, write, remount read-only, unmount.
        let target = dir().join("copy/bundle");
        sys.mkdir_all(&target).unwrap();
        sys.mount_tmpfs(&target, 0o750).unwrap();
        say(&format!("MOUNTED {}", sys.is_mountpoint(&target)));
        say(&format!(
            "MODE {:o}",
            std::fs::metadata(&target).unwrap().permissions().mode() & 0o7777
        ));
        std::fs::write(target.join("file"), "x").unwrap();
        say(&format!("RW-LINE {}", mount_line(&target).unwrap()));
        sys.remount_readonly(&target).unwrap();
        say(&format!("RO-LINE {}", mount_line(&target).unwrap()));
        let write = std::fs::write(target.join("other"), "y");
        say(&format!(
            "RO-WRITE {}",
            write.map_or_else(|e| e.raw_os_error().unwrap_or(0), |()| 0)
        ));
        sys.umount(&target).unwrap();
        say(&format!("UNMOUNTED {}", !sys.is_mountpoint(&target)));
        let error = sys.umount(&target).unwrap_err();
        say(&format!("UMOUNT-AGAIN {}", chain(&error)));

        // Early mounts: take away /tmp, /run and /dev/shm in this private mount namespace.
        for gone in ["/dev/shm", "/run", "/tmp"] {
            while sys.is_mountpoint(Path::new(gone)) {
                nix::mount::umount2(gone, MntFlags::MNT_DETACH).unwrap();
            }
        }
        // configfs is mounted too when this kernel has it and the host has not mounted it.
        let config = Path::new(launch::CONFIGFS.target);
        say(&format!(
            "CONFIGFS-EXPECTED {}",
            config.is_dir() && !sys.is_mountpoint(config)
        ));
        let done = launch::early_mounts(&sys).unwrap();
        say(&format!("EARLY {}", json!(done.mounted)));
        // Whatever was missing in /dev is linked now; what was there is left alone.
        let links_ok = launch::DEV_LINKS.iter().all(|(link, target)| {
            std::fs::read_link(link).is_ok_and(|t| t == Path::new(target))
                || !done.linked.contains(&PathBuf::from(link))
        });
        say(&format!(
            "LINKS {}",
            links_ok
                && launch::DEV_LINKS
                    .iter()
                    .all(|(link, _)| std::fs::symlink_metadata(link).is_ok())
        ));
        say(&format!(
            "TMP-LINE {}",
            mount_line(Path::new("/tmp")).unwrap()
        ));
        say(&format!(
            "TMP-MODE {:o}",
            std::fs::metadata("/tmp").unwrap().permissions().mode() & 0o7777
        ));
        let again = launch::early_mounts(&sys).unwrap();
        say(&format!("EARLY-AGAIN {}", json!(again)));
        std::process::exit(0)
    }
}

// ---------------------------------------------------------------------------------------------
// Outside: run a scenario and check what it printed.

fn require_root() {
    common::require_root(
        "launch_ns",
        &format!("it creates PID and mount namespaces and drops to uid {NOBODY}"),
    );
}

impl Outcome {
    fn events(&self) -> Vec<(String, Value)> {
        self.lines
            .iter()
            .filter_map(|l| l.strip_prefix("EVENT "))
            .map(|json| {
                let v: Value = serde_json::from_str(json).unwrap();
                (
                    v["event"].as_str().unwrap().to_owned(),
                    v["details"].clone(),
                )
            })
            .collect()
    }

    fn event_names(&self) -> Vec<String> {
        self.events().into_iter().map(|(name, _)| name).collect()
    }

    /// The rest of the first line that starts with `prefix` + space.
    fn value(&self, prefix: &str) -> &str {
        let marker = format!("{prefix} ");
        self.lines
            .iter()
            .find_map(|l| l.strip_prefix(marker.as_str()))
            .unwrap_or_else(|| panic!("no {prefix:?} line in {self:#?}"))
    }

    /// The workload's lines between `begin` and `end` (the supervisor's `EVENT` lines, written
    /// to the same stdout while the workload runs, are left out).
    fn block(&self, begin: &str, end: &str) -> Vec<&str> {
        let start = self.lines.iter().position(|l| l == begin).unwrap();
        let stop = self.lines.iter().position(|l| l == end).unwrap();
        self.lines[start + 1..stop]
            .iter()
            .map(String::as_str)
            .filter(|l| !l.starts_with("EVENT "))
            .collect()
    }
}

fn start(scenario: &str, dir: &Path) -> Run {
    require_root();
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
        .env(DIR_ENV, dir);
    Run::spawn(command, RUN_LIMIT)
}

fn run_scenario(scenario: &str, dir: &Path) -> Outcome {
    start(scenario, dir).finish()
}

fn workdir() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

/// What every workload must see, in both shapes.
fn assert_locked_down(outcome: &Outcome, dir: &Path) {
    let ids = format!("{NOBODY}\t{NOBODY}\t{NOBODY}\t{NOBODY}");
    assert_eq!(outcome.status_field("Uid"), ids, "{outcome:#?}");
    assert_eq!(outcome.status_field("Gid"), ids);
    assert_eq!(outcome.status_field("Groups"), "");
    for set in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(outcome.status_field(set), "0000000000000000", "{set}");
    }
    assert_eq!(outcome.status_field("NoNewPrivs"), "1");
    assert_eq!(outcome.status_field("SigBlk"), "0000000000000000");
    assert_eq!(outcome.status_field("SigIgn"), "0000000000000000");
    assert_eq!(
        outcome.block("ENV-BEGIN", "ENV-END"),
        ["FOO=bar baz", "PATH=/usr/bin:/bin"]
    );
    assert_eq!(outcome.block("FDS-BEGIN", "FDS-END"), ["0", "1", "2"]);
    assert_eq!(outcome.value("UMASK"), "0027");
    assert_eq!(outcome.value("NOFILE"), "64 128");
    assert_eq!(outcome.value("CORE"), "0");
    assert_eq!(outcome.value("PWD"), dir.to_str().unwrap());
    assert_eq!(outcome.value("GROUPS"), NOBODY.to_string());
    assert_eq!(outcome.code, Some(7), "{outcome:#?}");
}

#[test]
fn supervised_workload_runs_as_nobody_with_nothing_inherited() {
    let dir = workdir();
    let outcome = run_scenario("identity", dir.path());
    assert!(outcome.value("LEAKED-FD").parse::<i32>().unwrap() >= 3);
    assert_locked_down(&outcome, dir.path());
    assert_eq!(outcome.event_names(), ["started", "exited"], "{outcome:#?}");
    let events = outcome.events();
    assert_eq!(events[1].1["code"], 7);
    assert_eq!(outcome.value("RESULT"), r#"{"code":7,"restarts":0}"#);
    assert_eq!(outcome.value("REMAINING"), "[]");
}

#[test]
fn exec_shape_becomes_the_workload_with_nothing_inherited() {
    let dir = workdir();
    let outcome = run_scenario("exec", dir.path());
    assert_locked_down(&outcome, dir.path());
    assert!(!outcome.lines.iter().any(|l| l.starts_with("ERROR")));
}

#[test]
fn pid1_reaps_orphans_and_terminates_leftovers() {
    let dir = workdir();
    let outcome = run_scenario("orphans", dir.path());
    assert_eq!(outcome.code, Some(0), "{outcome:#?}");
    let events = outcome.events();
    let names: Vec<&str> = events.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(
        names,
        [
            "started",
            "orphans_reaped",
            "exited",
            "terminating",
            "orphans_reaped"
        ],
        "{outcome:#?}"
    );
    // The grandchild that exited by itself was re-parented to us, reaped and counted before
    // the workload's end.
    assert_eq!(events[1].1["count"], 1, "{outcome:#?}");
    assert_eq!(events[1].1["exited_nonzero"], 1, "{outcome:#?}");
    // The one still running when the workload ended got SIGTERM and was reaped too.
    assert_eq!(events[3].1["signal"], "SIGTERM");
    assert_eq!(events[4].1["count"], 1, "{outcome:#?}");
    assert_eq!(events[4].1["signaled"], 1, "{outcome:#?}");
    assert!(!events.iter().any(|(name, _)| name == "children_left"));
    // No zombie and no straggler is left in the namespace.
    assert_eq!(outcome.value("REMAINING"), "[]");
    // SIGTERM worked: nobody waited for `sleep 30`, nor for the 5 s before SIGKILL.
    assert!(outcome.elapsed < Duration::from_secs(6), "{outcome:#?}");
}

#[test]
fn sigterm_to_pid1_is_forwarded_and_its_status_is_the_exit_status() {
    let dir = workdir();
    let mut run = start("sigterm", dir.path());
    run.wait_until("READY", |run| run.has_line("READY"));
    nix::sys::signal::kill(run.pid1(), nix::sys::signal::Signal::SIGTERM).unwrap();
    let outcome = run.finish();
    assert_eq!(outcome.code, Some(42), "{outcome:#?}");
    let events = outcome.events();
    assert!(events
        .iter()
        .any(|(name, d)| name == "signal_forwarded" && d["signal"] == "SIGTERM"));
    // on-failure, but a stop was asked for: no restart.
    assert!(
        !events.iter().any(|(name, _)| name == "restart"),
        "{outcome:#?}"
    );
    assert_eq!(outcome.value("RESULT"), r#"{"code":42,"restarts":0}"#);
}

#[test]
fn on_failure_restarts_a_bounded_number_of_times() {
    let dir = workdir();
    let outcome = run_scenario("restart", dir.path());
    assert_eq!(outcome.code, Some(5), "{outcome:#?}");
    assert_eq!(
        outcome.event_names(),
        ["started", "exited", "restart", "started", "exited", "restart", "started", "exited"]
    );
    assert_eq!(outcome.lines.iter().filter(|l| *l == "RUN").count(), 3);
    assert_eq!(outcome.value("RESULT"), r#"{"code":5,"restarts":2}"#);
}

#[test]
fn failures_in_the_child_before_exec_are_reported_and_nothing_runs() {
    let dir = workdir();
    let outcome = run_scenario("child_failures", dir.path());
    assert_eq!(outcome.code, Some(0), "{outcome:#?}");
    let errors: Vec<&str> = outcome
        .lines
        .iter()
        .filter_map(|l| l.strip_prefix("ERROR "))
        .collect();
    assert_eq!(
        errors,
        [
            "drop privileges for the workload: chdir to /nonexistent/cvm-warden-workdir: ENOENT: No such file or directory",
            "execve /nonexistent/cvm-warden-program: ENOENT: No such file or directory",
        ]
    );
    assert!(outcome.event_names().is_empty(), "{outcome:#?}");
    assert_eq!(outcome.value("REMAINING"), "[]");
}

#[test]
fn real_sys_mounts_remounts_and_early_mounts_in_a_mount_namespace() {
    let dir = workdir();
    let outcome = run_scenario("sys", dir.path());
    assert_eq!(outcome.code, Some(0), "{outcome:#?}");
    assert_eq!(outcome.value("INITIAL-NS"), "false");
    assert_eq!(outcome.value("PID"), "1");
    assert_eq!(outcome.value("MOUNTED"), "true");
    assert_eq!(outcome.value("MODE"), "750");
    let rw = outcome.value("RW-LINE");
    assert!(rw.contains(" rw,nosuid,nodev"), "{rw}");
    assert!(rw.contains(" - tmpfs tmpfs "), "{rw}");
    let ro = outcome.value("RO-LINE");
    assert!(ro.contains(" ro,nosuid,nodev"), "{ro}");
    assert_eq!(outcome.value("RO-WRITE"), libc::EROFS.to_string());
    assert_eq!(outcome.value("UNMOUNTED"), "true");
    assert!(outcome.value("UMOUNT-AGAIN").starts_with(&format!(
        "unmount {}/copy/bundle: EINVAL",
        dir.path().display()
    )));
    let early: Vec<String> = serde_json::from_str(outcome.value("EARLY")).unwrap();
    let mut expected = vec!["/dev/shm", "/run", "/tmp"];
    if outcome.value("CONFIGFS-EXPECTED") == "true" {
        expected.push("/sys/kernel/config");
    }
    assert_eq!(early, expected);
    assert_eq!(outcome.value("LINKS"), "true");
    let tmp = outcome.value("TMP-LINE");
    assert!(tmp.contains(" rw,nosuid,nodev"), "{tmp}");
    assert_eq!(outcome.value("TMP-MODE"), "1777");
    assert_eq!(
        outcome.value("EARLY-AGAIN"),
        r#"{"linked":[],"mounted":[]}"#
    );
}

#[test]
fn shutdown_in_a_sandbox_exits_with_the_code_instead_of_powering_off() {
    let dir = workdir();
    let outcome = run_scenario("shutdown", dir.path());
    assert_eq!(outcome.value("INITIAL-NS"), "false");
    assert_eq!(outcome.code, Some(33), "{outcome:#?}");
}

#[test]
fn panic_in_pid1_is_recorded_logged_to_kmsg_and_shuts_down() {
    let dir = workdir();
    let outcome = run_scenario("panic_pid1", dir.path());
    assert_eq!(outcome.code, Some(1), "{outcome:#?}");
    let message = outcome.value("ON-PANIC");
    assert!(
        message.starts_with("panicked at tests/launch_ns.rs:"),
        "{message}"
    );
    assert!(message.ends_with(": boom"), "{message}");
    let kmsg = std::fs::read_to_string(dir.path().join("kmsg")).unwrap();
    assert_eq!(kmsg, format!("<2>cvm-warden: {message}\n"));
    assert!(outcome.stderr.contains("boom"), "{outcome:#?}");
}

#[test]
fn panic_outside_pid1_is_recorded_and_exits_non_zero() {
    let dir = workdir();
    let outcome = run_scenario("panic_unit", dir.path());
    assert_eq!(outcome.code, Some(1), "{outcome:#?}");
    assert!(outcome.value("ON-PANIC").ends_with(": boom"));
    assert_eq!(
        std::fs::read_to_string(dir.path().join("kmsg")).unwrap(),
        ""
    );
}

#[test]
fn real_boot_is_told_apart_from_a_sandbox_by_the_pid_namespace_inode() {
    require_root();
    // Here (outside any test namespace) the answer depends on where the tests run (a VM or
    // a container), so only check that it agrees with the inode itself.
    use std::os::unix::fs::MetadataExt;
    let ino = std::fs::metadata("/proc/self/ns/pid").unwrap().ino();
    let sys = cvm_warden::sys::RealSys::default();
    use cvm_warden::sys::Sys;
    assert_eq!(sys.in_initial_pid_namespace(), ino == 0xEFFF_FFFC);
}
