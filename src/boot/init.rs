//! The PID 1 shape (`cvm-warden init`, the initramfs's `/init`): early mounts, the
//! arguments the kernel passed, the policy, the audit log, the module step and the stages
//! ([`super::wiring::prepare`]), the supervised workload ([`run_init`]), and at the end always
//! [`crate::launch::shutdown`]: power-off or halt in a real boot, never a return to the
//! kernel ("Attempted to kill init!"). [`main`] returns `!`, so no path can forget it.
//!
//! **When the arguments are the kernel's** ([`kernel_invocation`]): the kernel passes every
//! bare word of its command line (`single`, anything after `--`) to init as argv, and the
//! kernel command line is not the image owner's. As PID 1:
//! - invoked as `init` (`/init`, `/sbin/init`): every argument is the kernel's; all are
//!   ignored and `init` runs with its defaults;
//! - invoked as `cvm-warden init …` (a wrapper, `rdinit=`): the options of `init` are kept
//!   (each once), every other word is ignored;
//! - any other command as PID 1 of the initial PID namespace (a real boot, also assumed when
//!   `/proc` is not mounted yet): nothing but `init` may run there, so it is `init` with every
//!   argument ignored;
//! - any other command as PID 1 of another PID namespace (a container): as typed.
//!
//! Ignored arguments never change what boots; they are recorded (`boot/kernel_args_ignored`,
//! each sanitized, at most [`MAX_IGNORED`]).

use std::ffi::{OsStr, OsString};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::wiring::{self, PolicyFiles, Setup};
use super::{
    chain, checkpoint, closing_event, reattest, CheckpointKind, Checkpointer, Launcher, Lifecycle,
    Ready, RealLauncher, Reattester, Shutdown,
};
use crate::audit::{self, Audit};
use crate::launch::EarlyMounts;
use crate::policy::{FailureAction, LoadedPolicy};
use crate::sys::{RealSys, Sys};

/// Default policy path when started as `/init` without arguments.
pub const DEFAULT_POLICY: &str = "/etc/cvm-warden/policy.toml";
/// At most this many ignored arguments are recorded (the rest are counted).
pub const MAX_IGNORED: usize = 32;
/// Each recorded ignored argument is cut to this many characters.
pub const MAX_IGNORED_CHARS: usize = 256;

/// What `init` is told on its command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitOptions {
    /// The policy and operator files and the user database.
    pub files: PolicyFiles,
    /// This PID 1 runs in a sandbox PID namespace (tests, the demo).
    pub sandbox: bool,
}

impl Default for InitOptions {
    fn default() -> Self {
        InitOptions {
            files: PolicyFiles {
                policy: PathBuf::from(DEFAULT_POLICY),
                operator: None,
                passwd: PathBuf::from("/etc/passwd"),
                group: PathBuf::from("/etc/group"),
            },
            sandbox: false,
        }
    }
}

/// An option of `init`, as the command line parser knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InitOption<'a> {
    /// The long name without `--`, e.g. `policy`.
    pub long: &'a str,
    /// Whether it takes a value (`--policy FILE`, `--policy=FILE`).
    pub takes_value: bool,
}

/// How to read the command line (see the module documentation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invocation {
    /// Parse it as typed.
    AsTyped,
    /// PID 1 started by the kernel: parse `argv` (`argv[0] init [kept options]`); `ignored`
    /// are the arguments dropped, sanitized, for the audit log.
    Init {
        /// What to parse.
        argv: Vec<OsString>,
        /// The dropped arguments (at most [`MAX_IGNORED`], then a count).
        ignored: Vec<String>,
    },
}

/// Decides whether `argv` came from the kernel and what of it is kept (see the module
/// documentation). Pure: `pid` and `initial_pid_ns` are this process's, `options` the options
/// of `init`.
pub fn kernel_invocation(
    argv: &[OsString],
    pid: u32,
    initial_pid_ns: bool,
    options: &[InitOption<'_>],
) -> Invocation {
    if pid != 1 {
        return Invocation::AsTyped;
    }
    let argv0 = argv
        .first()
        .cloned()
        .unwrap_or_else(|| OsString::from("init"));
    let rest = argv.get(1..).unwrap_or_default();
    let init_only = |ignored: &[OsString]| Invocation::Init {
        argv: vec![argv0.clone(), OsString::from("init")],
        ignored: ignored_list(ignored),
    };
    if wiring::named_init(Path::new(&argv0)) {
        return init_only(rest);
    }
    if rest.first().map(OsString::as_os_str) == Some(OsStr::new("init")) {
        let (kept, ignored) = keep_init_options(&rest[1..], options);
        let mut argv = vec![argv0, OsString::from("init")];
        argv.extend(kept);
        return Invocation::Init {
            argv,
            ignored: ignored_list(&ignored),
        };
    }
    if initial_pid_ns {
        return init_only(rest);
    }
    Invocation::AsTyped
}

/// Splits `words` into the options of `init` (each option once, with its value) and the rest.
fn keep_init_options(
    words: &[OsString],
    options: &[InitOption<'_>],
) -> (Vec<OsString>, Vec<OsString>) {
    let mut kept = Vec::new();
    let mut ignored = Vec::new();
    let mut seen: Vec<&str> = Vec::new();
    let mut i = 0;
    while i < words.len() {
        let word = &words[i];
        i += 1;
        let Some(text) = word.to_str() else {
            ignored.push(word.clone());
            continue;
        };
        let Some(long) = text.strip_prefix("--") else {
            ignored.push(word.clone());
            continue;
        };
        let (name, inline_value) = match long.split_once('=') {
            Some((name, value)) => (name, Some(value)),
            None => (long, None),
        };
        let Some(option) = options.iter().find(|o| o.long == name) else {
            ignored.push(word.clone());
            continue;
        };
        let first = !seen.contains(&option.long);
        match (option.takes_value, inline_value) {
            (true, Some(_)) if first => {
                seen.push(option.long);
                kept.push(word.clone());
            }
            (true, None) => match words.get(i) {
                Some(value) if first => {
                    seen.push(option.long);
                    kept.push(word.clone());
                    kept.push(value.clone());
                    i += 1;
                }
                Some(value) => {
                    ignored.push(word.clone());
                    ignored.push(value.clone());
                    i += 1;
                }
                None => ignored.push(word.clone()),
            },
            (false, None) if first => {
                seen.push(option.long);
                kept.push(word.clone());
            }
            _ => ignored.push(word.clone()),
        }
    }
    (kept, ignored)
}

/// The ignored arguments as the audit log shows them: sanitized, cut, at most
/// [`MAX_IGNORED`] and a count of the rest.
fn ignored_list(words: &[OsString]) -> Vec<String> {
    let mut list: Vec<String> = words
        .iter()
        .take(MAX_IGNORED)
        .map(|w| crate::report::sanitize(&w.to_string_lossy(), MAX_IGNORED_CHARS))
        .collect();
    if words.len() > MAX_IGNORED {
        list.push(format!("(and {} more)", words.len() - MAX_IGNORED));
    }
    list
}

/// What [`start`] hands on: the policy and what the early mounts did.
#[derive(Debug)]
pub struct Started {
    /// The validated policy.
    pub loaded: LoadedPolicy,
    /// The early mounts and links.
    pub early: EarlyMounts,
}

/// The console writer (standard error in PID 1; a buffer in tests).
pub type Console<'a> = &'a dyn Fn() -> Box<dyn Write + Send>;

/// The first part of PID 1, up to a loaded policy: early mounts (a failure powers off with
/// code 1), the policy (invalid: recorded on the console, `boot/policy_invalid` and the
/// closing record, then power-off with code 2), the sandbox check (code 2). Every failure is
/// a [`Shutdown`] for the caller to perform; nothing here returns to the kernel.
pub fn start(
    options: &InitOptions,
    sys: &dyn Sys,
    console: Console<'_>,
) -> Result<Started, Shutdown> {
    let power_off = |code| Shutdown {
        action: FailureAction::Poweroff,
        code,
    };
    let early = match crate::launch::early_mounts(sys) {
        Ok(early) => early,
        Err(error) => {
            // Without /proc and /dev nothing below can be trusted to work: stop now.
            crate::report::write_error(&mut console(), &error);
            return Err(power_off(1));
        }
    };
    let loaded = match wiring::load(&options.files) {
        Ok(loaded) => loaded,
        Err(error) => {
            crate::report::write_error(&mut console(), &error);
            let audit = Audit::new(vec![Box::new(audit::ConsoleSink::new(console()))], false);
            let _ = audit.record(
                "boot",
                "policy_invalid",
                json!({ "policy": options.files.policy, "error": chain(&error) }),
            );
            let action = FailureAction::Poweroff;
            let _ = audit.record("shutdown", closing_event(sys, action), json!({ "code": 2 }));
            let _ = audit.flush();
            return Err(power_off(2));
        }
    };
    let in_sandbox = !sys.in_initial_pid_namespace();
    let sandbox_problem = match (options.sandbox, in_sandbox) {
        (true, false) => Some(
            "--sandbox was given, but this is the PID 1 of a real boot (the initial PID \
             namespace): a real boot applies every lockdown setting; remove --sandbox",
        ),
        (false, true) if loaded.policy.lockdown.is_some() => Some(
            "this PID 1 runs in a sandbox PID namespace and the policy has [lockdown], whose \
             kernel settings are host-wide: pass --sandbox to skip them (tests, demo), or boot \
             the VM",
        ),
        _ => None,
    };
    if let Some(problem) = sandbox_problem {
        crate::report::write_error(&mut console(), &crate::report::Message(problem.to_owned()));
        // In a sandbox, shutdown() exits instead of powering anything off.
        return Err(power_off(2));
    }
    Ok(Started { loaded, early })
}

/// The records PID 1 writes first with the policy's audit log: what the early mounts did
/// (`boot/early_mounts`) and, when there are any, the kernel's arguments it ignored
/// (`boot/kernel_args_ignored`).
pub fn record_early(audit: &Audit, early: &EarlyMounts, ignored: &[String]) {
    let _ = audit.record("boot", "early_mounts", json!(early));
    if !ignored.is_empty() {
        let _ = audit.record(
            "boot",
            "kernel_args_ignored",
            json!({
                "args": ignored,
                "reason": "arguments on the kernel command line never configure cvm-warden",
            }),
        );
    }
}

/// PID 1 with the real effects. Never returns: every path ends in
/// [`crate::launch::shutdown`] (power-off or halt; in a sandbox PID namespace, exit).
pub fn main(options: &InitOptions, ignored: &[String]) -> ! {
    // Until the audit log is open a panic has nothing to record, but it must still power off
    // (never abort PID 1); the audited hook installed later runs first and then this one.
    crate::launch::install_panic_hook(Box::new(|_| {}), true);
    let sys = RealSys::default();
    let console = || Box::new(std::io::stderr()) as Box<dyn Write + Send>;
    let shutdown = match start(options, &sys, &console) {
        Ok(started) => boot(&started, options, ignored, &sys),
        Err(shutdown) => shutdown,
    };
    crate::launch::shutdown(&sys, shutdown.action, shutdown.code)
}

/// The part of [`main`] after [`start`]: the audit log, the module step and the stages, the
/// workload; returns the shutdown to perform.
fn boot(started: &Started, options: &InitOptions, ignored: &[String], sys: &dyn Sys) -> Shutdown {
    let loaded = &started.loaded;
    let audit = wiring::open_audit(loaded);
    wiring::install_hook(&audit, true);
    record_early(&audit, &started.early, ignored);
    let action = loaded.policy.on_failure;
    let mut setup = Setup::new(&audit);
    let prepared = wiring::prepare(
        loaded,
        sys,
        &audit,
        crate::lockdown::Shape::Pid1,
        options.sandbox,
        &mut setup,
    );
    let (mut life, event_log) = setup.lifecycle(sys, &audit, loaded);
    life.watch_power_button = !options.sandbox;
    match prepared {
        Ok(ready) => {
            // The stages' buffers are free now: give their pages back before the long run.
            crate::sys::kernel::trim_heap();
            run_init(&ready, &RealLauncher, &mut life, action)
        }
        Err(error) => {
            crate::report::print_error(&error);
            super::fail(&mut life, action, &error, event_log)
        }
    }
}

/// The host's ACPI power button becomes an orderly stop ([`crate::launch::power`]); the
/// devices watched are recorded (none: the image lacks the `button`/`evdev` modules, and
/// only SIGTERM or the workload's end stop the VM cleanly). A sandbox never watches: the
/// button would be the host's.
fn watch_power_button(audit: &Audit) {
    use crate::launch::power;
    let buttons = power::power_buttons(
        std::path::Path::new(power::INPUT_SYSFS),
        std::path::Path::new("/dev/input"),
    );
    let watched = power::watch(&buttons, audit, std::sync::Arc::new(power::sigterm_self));
    let _ = audit.record(
        "launch",
        "power_button_watch",
        serde_json::json!({ "devices": watched }),
    );
}

/// PID 1 shape: supervise the workload (a `launch` checkpoint after each start, `periodic`
/// ones while it runs), then record the shutdown and the closing checkpoint.
pub fn run_init(
    ready: &Ready,
    launcher: &dyn Launcher,
    life: &mut Lifecycle<'_>,
    action: FailureAction,
) -> Shutdown {
    let audit = life.audit;
    let sys = life.sys;
    let event_log = &ready.event_log;
    let interval = life.checkpoint_interval;
    let checkpointer = std::cell::RefCell::new(life.checkpointer.as_deref_mut());
    let stop_workload = life.stop_workload;
    // A required sink lost while the workload runs (the audit file's disk full, its volume
    // gone): nothing more reaches the place the policy requires, so the workload stops —
    // fail closed, recorded in the sinks that still work.
    let lost = std::cell::Cell::new(false);
    let check_sinks = || {
        if lost.get() {
            return;
        }
        if let Some((sink, error)) = audit.required_failure() {
            lost.set(true);
            log::error!("required audit sink {sink} failed ({error}): stopping the workload");
            let _ = audit.record(
                "launch",
                "audit_lost",
                json!({
                    "sink": sink,
                    "error": error,
                    "action": "stop the workload (SIGTERM, grace period), then the closing record and power-off",
                }),
            );
            stop_workload();
        }
    };
    let watch_power = std::cell::Cell::new(life.watch_power_button);
    let mut events = |event: &str, details: Value| {
        log::info!("workload: {event} {details}");
        let _ = audit.record("launch", event, details);
        if event == "started" && watch_power.replace(false) {
            // The supervisor's handlers are installed now: a press becomes its stop request.
            watch_power_button(audit);
        }
        if event == "started" {
            if let Some(cp) = checkpointer.borrow_mut().as_deref_mut() {
                checkpoint(audit, cp, CheckpointKind::Launch, event_log);
            }
        }
        check_sinks();
    };
    let mut periodic_run = |_now: std::time::Instant| {
        if let Some(cp) = checkpointer.borrow_mut().as_deref_mut() {
            checkpoint(audit, cp, CheckpointKind::Periodic, event_log);
        }
        check_sinks();
        crate::launch::Next::OnSchedule
    };
    // Continuous trust: a fresh broker exchange every `attestation.reattest_interval`; a
    // refusal stops the workload (see `super::reattest`).
    let watch = std::cell::RefCell::new(
        reattest::Schedule::from_plan(&ready.plan.attest).map(reattest::Watch::new),
    );
    let mut reattest_run = |now: std::time::Instant| {
        let mut watch = watch.borrow_mut();
        let Some(watch) = watch.as_mut() else {
            return crate::launch::Next::OnSchedule;
        };
        let next = match checkpointer.borrow_mut().as_deref_mut() {
            Some(cp) => watch.run(now, audit, cp, event_log),
            None => watch.no_seam(audit),
        };
        check_sinks();
        next
    };
    let mut periodic = Vec::new();
    if let (Some(every), true) = (interval, checkpointer.borrow().is_some()) {
        periodic.push(crate::launch::Periodic {
            every,
            run: &mut periodic_run,
        });
    }
    let reattest_every = watch.borrow().as_ref().map(reattest::Watch::every);
    if let Some(every) = reattest_every {
        periodic.push(crate::launch::Periodic {
            every,
            run: &mut reattest_run,
        });
    }
    let result = launcher.supervise(&ready.plan.launch, sys, &mut events, periodic);
    let lost_trust = watch.borrow().as_ref().and_then(|w| w.lost().cloned());
    let mut code = match result {
        Ok(exit) => {
            let _ = audit.record(
                "launch",
                "workload_done",
                json!({ "code": exit.code, "restarts": exit.restarts }),
            );
            // Stopped because the required log was lost or trust was: never a clean end,
            // whatever the workload answered to SIGTERM.
            if (lost.get() || lost_trust.is_some()) && exit.code == 0 {
                1
            } else {
                exit.code
            }
        }
        Err(error) => {
            log::error!("{}", chain(&error));
            let _ = audit.record("launch", "failed", json!({ "error": chain(&error) }));
            if lost_trust.is_none() {
                life.clean_up_after_failed_launch(&ready.plan);
            }
            1
        }
    };
    let mut closing = json!({ "code": code });
    if let Some(trust) = &lost_trust {
        code = code.max(1);
        life.clean_up_after_failed_launch(&ready.plan);
        let devices = life
            .checkpointer
            .as_deref_mut()
            .and_then(Checkpointer::reattester)
            .map(Reattester::trust_lost)
            .unwrap_or_else(|| json!({ "devices": [], "note": "no re-attestation seam" }));
        let _ = audit.record(
            "attest",
            "trust_lost",
            json!({ "kind": trust.kind, "error": trust.reason, "cleared": devices }),
        );
        closing = json!({
            "code": code,
            "reason": format!("trust lost ({}): {}", trust.kind, trust.reason),
        });
    }
    life.close("shutdown", closing_event(sys, action), closing, event_log);
    Shutdown { action, code }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use std::sync::{Arc, Mutex};

    use nix::errno::Errno;

    use super::*;
    use crate::sys::{FakeSys, Op};

    const OPTIONS: [InitOption<'static>; 5] = [
        InitOption {
            long: "policy",
            takes_value: true,
        },
        InitOption {
            long: "operator",
            takes_value: true,
        },
        InitOption {
            long: "passwd",
            takes_value: true,
        },
        InitOption {
            long: "group",
            takes_value: true,
        },
        InitOption {
            long: "sandbox",
            takes_value: false,
        },
    ];

    fn os(words: &[&str]) -> Vec<OsString> {
        words.iter().map(OsString::from).collect()
    }

    fn init(argv: &[&str], ignored: &[&str]) -> Invocation {
        Invocation::Init {
            argv: os(argv),
            ignored: ignored.iter().map(|s| (*s).to_owned()).collect(),
        }
    }

    #[test]
    fn the_kernels_init_ignores_every_argument() {
        for argv0 in ["/init", "init", "/sbin/init"] {
            assert_eq!(
                kernel_invocation(&os(&[argv0]), 1, true, &OPTIONS),
                init(&[argv0, "init"], &[])
            );
            // Bare words of the kernel command line, words after `--`, even our own options:
            // the kernel command line never configures cvm-warden.
            assert_eq!(
                kernel_invocation(
                    &os(&[argv0, "single", "--policy", "/evil.toml", "init"]),
                    1,
                    true,
                    &OPTIONS
                ),
                init(
                    &[argv0, "init"],
                    &["single", "--policy", "/evil.toml", "init"]
                )
            );
        }
        // Also as the PID 1 of a container (the name says it is an init).
        assert_eq!(
            kernel_invocation(&os(&["/init", "x"]), 1, false, &OPTIONS),
            init(&["/init", "init"], &["x"])
        );
    }

    #[test]
    fn cvm_warden_init_keeps_its_options_once_and_ignores_the_rest() {
        assert_eq!(
            kernel_invocation(
                &os(&[
                    "/usr/bin/cvm-warden",
                    "init",
                    "--policy",
                    "/p.toml",
                    "single",
                    "--sandbox",
                    "--operator=/o.toml",
                    "--policy",
                    "/second.toml",
                    "--sandbox",
                    "-x",
                    "--help",
                    "--bogus=1",
                    "--group",
                ]),
                1,
                false,
                &OPTIONS
            ),
            init(
                &[
                    "/usr/bin/cvm-warden",
                    "init",
                    "--policy",
                    "/p.toml",
                    "--sandbox",
                    "--operator=/o.toml",
                ],
                &[
                    "single",
                    "--policy",
                    "/second.toml",
                    "--sandbox",
                    "-x",
                    "--help",
                    "--bogus=1",
                    "--group",
                ]
            )
        );
    }

    #[test]
    fn other_commands_are_as_typed_except_as_the_pid_1_of_a_real_boot() {
        // Not PID 1: clap reads it (and refuses bad words with exit 2; nothing panics).
        for argv in [
            &["cvm-warden", "init", "single"][..],
            &["/init", "single"],
            &["cvm-warden", "plan"],
        ] {
            assert_eq!(
                kernel_invocation(&os(argv), 42, true, &OPTIONS),
                Invocation::AsTyped
            );
        }
        // A container's PID 1 running another command.
        assert_eq!(
            kernel_invocation(
                &os(&["cvm-warden", "plan", "--policy", "p"]),
                1,
                false,
                &OPTIONS
            ),
            Invocation::AsTyped
        );
        // The PID 1 of a real boot (`rdinit=/usr/bin/cvm-warden`, words from the kernel):
        // nothing but init may run there.
        assert_eq!(
            kernel_invocation(&os(&["/usr/bin/cvm-warden", "single"]), 1, true, &OPTIONS),
            init(&["/usr/bin/cvm-warden", "init"], &["single"])
        );
        assert_eq!(
            kernel_invocation(&os(&["/usr/bin/cvm-warden"]), 1, true, &OPTIONS),
            init(&["/usr/bin/cvm-warden", "init"], &[])
        );
    }

    #[test]
    fn ignored_arguments_are_sanitized_cut_and_counted() {
        let mut argv = os(&["/init", "a\u{1b}[31mred", "\u{202e}evil"]);
        argv.push(OsString::from("x".repeat(1000)));
        argv.extend((0..40).map(|i| OsString::from(format!("w{i}"))));
        let Invocation::Init { ignored, .. } = kernel_invocation(&argv, 1, true, &OPTIONS) else {
            panic!("not init");
        };
        assert_eq!(ignored.len(), MAX_IGNORED + 1);
        assert_eq!(ignored[0], "a\\u{1b}[31mred");
        assert_eq!(ignored[1], "\\u{202e}evil");
        assert!(
            ignored[2].chars().count() <= MAX_IGNORED_CHARS + 3,
            "{}",
            ignored[2]
        );
        assert_eq!(ignored[MAX_IGNORED], "(and 11 more)");
    }

    #[cfg(unix)]
    #[test]
    fn non_utf8_words_are_ignored_not_fatal() {
        use std::os::unix::ffi::OsStringExt;
        let argv = vec![
            OsString::from("cvm-warden"),
            OsString::from("init"),
            OsString::from_vec(vec![0xff, b'x']),
        ];
        let Invocation::Init { argv, ignored } = kernel_invocation(&argv, 1, true, &OPTIONS) else {
            panic!("not init");
        };
        assert_eq!(argv, os(&["cvm-warden", "init"]));
        assert_eq!(ignored, ["\u{fffd}x"]);
    }

    /// A console that tests can read.
    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Buffer {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    struct Files {
        dir: tempfile::TempDir,
    }

    impl Files {
        fn new(policy: &str) -> Files {
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join("policy.toml"), policy).unwrap();
            std::fs::write(
                dir.path().join("passwd"),
                "flare:x:1000:1000::/home/flare:/bin/sh\n",
            )
            .unwrap();
            std::fs::write(dir.path().join("group"), "flare:x:1000:\n").unwrap();
            Files { dir }
        }

        fn options(&self, sandbox: bool) -> InitOptions {
            InitOptions {
                files: PolicyFiles {
                    policy: self.dir.path().join("policy.toml"),
                    operator: None,
                    passwd: self.dir.path().join("passwd"),
                    group: self.dir.path().join("group"),
                },
                sandbox,
            }
        }
    }

    const POLICY: &str = "attestation = \"none\"\n[workload]\nbundle = \"/opt/b\"\nsource = \"initramfs\"\nexec = [\"/opt/b/run\"]\nuser = \"flare\"\n";

    fn start_with(
        files: &Files,
        sandbox: bool,
        sys: &FakeSys,
    ) -> (Result<Started, Shutdown>, String) {
        let console = Buffer::default();
        let writer = console.clone();
        let make = move || Box::new(writer.clone()) as Box<dyn Write + Send>;
        let result = start(&files.options(sandbox), sys, &make);
        (result, console.text())
    }

    const POWER_OFF_2: Shutdown = Shutdown {
        action: FailureAction::Poweroff,
        code: 2,
    };

    #[test]
    fn an_invalid_policy_powers_off_after_recording_it_on_the_console() {
        let files = Files::new(&POLICY.replace("user = \"flare\"", "user = \"nobody-here\""));
        let sys = FakeSys::new();
        let (result, console) = start_with(&files, false, &sys);
        assert_eq!(result.unwrap_err(), POWER_OFF_2);
        assert!(console.starts_with("error: "), "{console}");
        let records: Vec<Value> = console
            .lines()
            .filter(|l| l.starts_with('{'))
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let events: Vec<(&str, &str)> = records
            .iter()
            .map(|r| (r["stage"].as_str().unwrap(), r["event"].as_str().unwrap()))
            .collect();
        assert_eq!(
            events,
            [("boot", "policy_invalid"), ("shutdown", "poweroff")]
        );
        // The early mounts came first.
        assert!(!sys.calls().is_empty());
        // In a sandbox the closing record says exit (shutdown() then exits with 2).
        let (result, console) = start_with(&files, false, &FakeSys::new().in_sandbox());
        assert_eq!(result.unwrap_err(), POWER_OFF_2);
        assert!(console.contains("\"event\":\"exit\""), "{console}");
    }

    #[test]
    fn failed_early_mounts_power_off_before_the_policy_is_read() {
        let files = Files::new(POLICY);
        let sys = FakeSys::new().fail_on(Op::Mount, Errno::ENODEV);
        let (result, console) = start_with(&files, false, &sys);
        assert_eq!(
            result.unwrap_err(),
            Shutdown {
                action: FailureAction::Poweroff,
                code: 1
            }
        );
        assert!(
            console.starts_with("error: mount proc proc on /proc"),
            "{console}"
        );
    }

    #[test]
    fn the_sandbox_flag_must_match_the_pid_namespace() {
        let lockdown = format!("{POLICY}\n[lockdown]\nconsoles = \"off\"\n");
        let files = Files::new(&lockdown);
        let (result, console) = start_with(&files, false, &FakeSys::new().in_sandbox());
        assert_eq!(result.unwrap_err(), POWER_OFF_2);
        assert!(console.contains("pass --sandbox"), "{console}");
        let (result, console) = start_with(&files, true, &FakeSys::new());
        assert_eq!(result.unwrap_err(), POWER_OFF_2);
        assert!(console.contains("remove --sandbox"), "{console}");
        let (result, _) = start_with(&files, true, &FakeSys::new().in_sandbox());
        let started = result.unwrap();
        assert!(started.loaded.policy.lockdown.is_some());
        assert_eq!(started.early.linked.len(), 4);
    }

    #[test]
    fn the_early_mounts_and_the_ignored_arguments_are_recorded() {
        let (audit, lines) = {
            let (sink, lines) = crate::audit::MemorySink::new();
            (Audit::new(vec![Box::new(sink)], false), lines)
        };
        let early = EarlyMounts {
            mounted: vec![PathBuf::from("/proc")],
            linked: vec![PathBuf::from("/dev/stdin")],
        };
        record_early(&audit, &early, &[]);
        record_early(&audit, &early, &["single".to_owned()]);
        let records: Vec<Value> = lines
            .lock()
            .unwrap()
            .iter()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let events: Vec<&str> = records
            .iter()
            .map(|r| r["event"].as_str().unwrap())
            .collect();
        assert_eq!(
            events,
            ["early_mounts", "early_mounts", "kernel_args_ignored"]
        );
        assert_eq!(records[0]["details"]["linked"][0], "/dev/stdin");
        assert_eq!(records[2]["details"]["args"][0], "single");
    }
}
