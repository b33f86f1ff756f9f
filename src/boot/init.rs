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
    chain, checkpoint, closing_event, CheckpointKind, Launcher, Lifecycle, Ready, RealLauncher,
    Shutdown,
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
    let argv0 = argv.first().cloned().unwrap_or_else(|| OsString::from("init"));
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
pub fn start(options: &InitOptions, sys: &dyn Sys, console: Console<'_>) -> Result<Started, Shutdown> {
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
            let _ = audit.record(
                "shutdown",
                closing_event(sys, action),
                json!({ "code": 2 }),
            );
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
        crate::report::write_error(
            &mut console(),
            &crate::report::Message(problem.to_owned()),
        );
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
    match prepared {
        Ok(ready) => run_init(&ready, &RealLauncher, &mut life, action),
        Err(error) => {
            crate::report::print_error(&error);
            super::fail(&mut life, action, &error, event_log)
        }
    }
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
    let mut events = |event: &str, details: Value| {
        log::info!("workload: {event} {details}");
        let _ = audit.record("launch", event, details);
        if event == "started" {
            if let Some(cp) = checkpointer.borrow_mut().as_deref_mut() {
                checkpoint(audit, cp, CheckpointKind::Launch, event_log);
            }
        }
    };
    let mut periodic_run = || {
        if let Some(cp) = checkpointer.borrow_mut().as_deref_mut() {
            checkpoint(audit, cp, CheckpointKind::Periodic, event_log);
        }
    };
    let periodic = match (interval, checkpointer.borrow().is_some()) {
        (Some(every), true) => Some(crate::launch::Periodic {
            every,
            run: &mut periodic_run,
        }),
        _ => None,
    };
    let result = launcher.supervise(&ready.plan.launch, sys, &mut events, periodic);
    let code = match result {
        Ok(exit) => {
            let _ = audit.record(
                "launch",
                "workload_done",
                json!({ "code": exit.code, "restarts": exit.restarts }),
            );
            exit.code
        }
        Err(error) => {
            log::error!("{}", chain(&error));
            let _ = audit.record("launch", "failed", json!({ "error": chain(&error) }));
            life.clean_up_after_failed_launch(&ready.plan);
            1
        }
    };
    life.close(
        "shutdown",
        closing_event(sys, action),
        json!({ "code": code }),
        event_log,
    );
    Shutdown { action, code }
}

