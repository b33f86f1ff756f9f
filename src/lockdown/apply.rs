//! Carrying out a [`LockdownPlan`], step by step, then the self-check.

use std::io;
use std::path::Path;
use std::time::Duration;

use nix::mount::MsFlags;
use serde::Serialize;

use super::accounts::{
    lock_root_in_passwd, lock_root_password, nologin_shells, write_atomic, write_atomic_or_create,
};
use super::check::{self_check, Check};
use super::effects::{CommandOutput, LockdownSys};
use super::error::LockdownError;
use super::kmod::{module_name, ModuleIndex};
use super::mountinfo;
use super::preload::{resolve_and_load, Found, Wanted};
use super::{
    load_state_probe, lockdown_rank, parse_lockdown, LockdownPlan, Paths, Shape, Sysctl,
    MANAGER_CONF,
};

/// What one step did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "outcome")]
pub enum Outcome {
    /// Changed now.
    Applied,
    /// Already as wanted; nothing written.
    AlreadySet,
    /// The kernel or system lacks the feature (e.g. no Yama); nothing to set.
    NotAvailable {
        /// Why.
        reason: String,
    },
    /// Left alone on purpose (e.g. `/etc/passwd` on a read-only initramfs).
    Skipped {
        /// Why.
        reason: String,
    },
}

/// One step of [`apply`], for the audit log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Step {
    /// The setting, e.g. `kernel.sysrq`, `module dm_crypt`, `swap /dev/vda2`.
    pub setting: String,
    /// The value set or found.
    pub value: String,
    /// What happened.
    #[serde(flatten)]
    pub outcome: Outcome,
}

/// What the lockdown did and what the self-check read back; goes into the audit log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    /// Boot shape.
    pub shape: Shape,
    /// The steps, in order.
    pub steps: Vec<Step>,
    /// The self-check after the last step (every entry ok, not available or skipped).
    pub checks: Vec<Check>,
}

struct Steps(Vec<Step>);

impl Steps {
    fn push(&mut self, setting: impl Into<String>, value: impl Into<String>, outcome: Outcome) {
        self.0.push(Step {
            setting: setting.into(),
            value: value.into(),
            outcome,
        });
    }
}

/// Carries out `plan` (see the module documentation for the order), then runs
/// [`self_check`]. The first failure stops it: fail closed.
pub fn apply(
    plan: &LockdownPlan,
    sys: &dyn LockdownSys,
    paths: &Paths,
) -> Result<Report, LockdownError> {
    let mut steps = Steps(Vec::new());
    load_modules(&plan.modules, sys, paths, &mut steps)?;
    for sysctl in &plan.sysctls {
        set_sysctl(sysctl, paths, &mut steps)?;
    }
    set_kernel_lockdown(plan.kernel_lockdown.as_deref(), sys, paths, &mut steps)?;
    if plan.swap_off {
        swap_off(sys, paths, &mut steps)?;
    }
    if plan.tmp_tmpfs {
        tmp_on_tmpfs(sys, paths, &mut steps)?;
    }
    if plan.disable_ctrl_alt_del {
        sys.disable_ctrl_alt_del()
            .map_err(LockdownError::CtrlAltDel)?;
        steps.push("ctrl-alt-del", "ignored", Outcome::Applied);
    }
    if plan.close_stdin {
        sys.stdin_to_null(&paths.dev_null)
            .map_err(|source| LockdownError::Stdin {
                dev_null: paths.dev_null.clone(),
                source,
            })?;
        steps.push(
            "stdin",
            paths.dev_null.display().to_string(),
            Outcome::Applied,
        );
    }
    if plan.console_receiver_off {
        console_receiver_off(sys, paths, &mut steps)?;
    }
    if plan.lock_root {
        let outcome = edit_account_file(&paths.shadow, "lock root's password", |text| {
            lock_root_password(text)
        })?;
        steps.push("root password", "locked", outcome);
        // pam_unix uses a hash in /etc/passwd itself (the field is not `x`): lock it there too.
        let outcome = edit_account_file(&paths.passwd, "lock root's password", |text| {
            lock_root_in_passwd(text)
        })?;
        steps.push("root password in passwd", "locked", outcome);
    }
    if plan.nologin_shells {
        let mut changed = Vec::new();
        let outcome = edit_account_file(&paths.passwd, "set login shells to nologin", |text| {
            let (new, accounts) = nologin_shells(text);
            changed = accounts;
            Ok((!changed.is_empty()).then_some(new))
        })?;
        let value = if changed.is_empty() {
            super::NOLOGIN.to_owned()
        } else {
            format!("{} for {}", super::NOLOGIN, changed.join(","))
        };
        steps.push("login shells", value, outcome);
    }
    for unit in &plan.masks {
        mask(unit, paths, &mut steps)?;
    }
    let mut reexec = false;
    if plan.burst_action_off() {
        write_manager_conf(paths, &mut steps)?;
        // Only a re-executed manager reads system.conf.d; skip it when this one already has it.
        reexec = burst_action(sys).as_deref() != Some(BURST_OFF);
    }
    if reexec {
        // Re-execution reloads the units too (the masks above).
        run_checked(sys, "systemctl", &["daemon-reexec"])?;
        let now = wait_burst_action(sys);
        steps.push(
            "systemd",
            format!(
                "daemon-reexec (CtrlAltDelBurstAction {})",
                now.as_deref().unwrap_or("unreadable")
            ),
            Outcome::Applied,
        );
    } else if plan.stop_units {
        run_checked(sys, "systemctl", &["daemon-reload"])?;
        steps.push("systemd", "daemon-reload", Outcome::Applied);
    }
    if plan.stop_units {
        let running = active_units(sys, &plan.masks)?;
        if running.is_empty() {
            steps.push("running gettys and ssh", "none", Outcome::AlreadySet);
        } else {
            let mut args = vec!["stop", "--"];
            args.extend(running.iter().map(String::as_str));
            run_checked(sys, "systemctl", &args)?;
            steps.push(
                "running gettys and ssh",
                running.join(","),
                Outcome::Applied,
            );
        }
    }
    if plan.end_sessions {
        end_sessions(sys, &mut steps)?;
    }
    let checks = self_check(plan, sys, paths)?;
    Ok(Report {
        shape: plan.shape,
        steps: steps.0,
        checks,
    })
}

pub(crate) fn read_optional(
    path: &Path,
    what: &'static str,
) -> Result<Option<String>, LockdownError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(LockdownError::Read {
            what,
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Whether `/sys/module/<name>` exists (loaded, or built in with parameters).
pub(crate) fn module_loaded(paths: &Paths, name: &str) -> bool {
    paths.sys_module.join(module_name(name)).exists()
}

/// The module index of the running kernel (empty when the files are absent).
pub(crate) fn module_index(
    sys: &dyn LockdownSys,
    paths: &Paths,
) -> Result<(String, ModuleIndex), LockdownError> {
    let release = sys.kernel_release().map_err(LockdownError::KernelRelease)?;
    let dir = paths.lib_modules.join(&release);
    let dep = read_optional(&dir.join("modules.dep"), "modules.dep")?.unwrap_or_default();
    let builtin =
        read_optional(&dir.join("modules.builtin"), "modules.builtin")?.unwrap_or_default();
    let softdep =
        read_optional(&dir.join("modules.softdep"), "modules.softdep")?.unwrap_or_default();
    let alias = read_optional(&dir.join("modules.alias"), "modules.alias")?.unwrap_or_default();
    Ok((
        release,
        ModuleIndex::parse(&dir, &dep, &builtin).with_softdeps(&softdep, &alias),
    ))
}

fn load_modules(
    modules: &[String],
    sys: &dyn LockdownSys,
    paths: &Paths,
    steps: &mut Steps,
) -> Result<(), LockdownError> {
    if modules.is_empty() {
        return Ok(());
    }
    let wanted: Vec<Wanted<'_>> = modules
        .iter()
        .map(|name| Wanted {
            name,
            needed_by: "lockdown.modules",
            or: &[],
        })
        .collect();
    let (found, _, _) = resolve_and_load(&wanted, sys, paths)?;
    for (module, found) in modules.iter().zip(found) {
        let setting = format!("module {module}");
        match found {
            Found::Loaded => steps.push(setting, "loaded", Outcome::AlreadySet),
            Found::BuiltIn => steps.push(setting, "built in", Outcome::AlreadySet),
            Found::LoadedNow(path) => {
                steps.push(setting, path.display().to_string(), Outcome::Applied)
            }
            Found::Served => steps.push(setting, "absent", Outcome::AlreadySet),
        }
    }
    Ok(())
}

fn set_sysctl(sysctl: &Sysctl, paths: &Paths, steps: &mut Steps) -> Result<(), LockdownError> {
    let path = paths.sysctl(sysctl.key);
    let Some(current) = read_optional(&path, "sysctl")? else {
        if let Some(reason) = sysctl.optional {
            steps.push(
                sysctl.key,
                sysctl.value,
                Outcome::NotAvailable {
                    reason: reason.to_owned(),
                },
            );
            return Ok(());
        }
        return Err(LockdownError::SysctlMissing {
            key: sysctl.key.to_owned(),
            path,
            wanted: sysctl.value.to_owned(),
        });
    };
    if current.trim() == sysctl.value {
        steps.push(sysctl.key, sysctl.value, Outcome::AlreadySet);
        return Ok(());
    }
    write_existing(&path, sysctl.value).map_err(|source| LockdownError::SysctlWrite {
        key: sysctl.key.to_owned(),
        path: path.clone(),
        wanted: sysctl.value.to_owned(),
        source,
    })?;
    steps.push(sysctl.key, sysctl.value, Outcome::Applied);
    Ok(())
}

/// Writes `value` to an existing file (a `/proc` or `/sys` knob) in one `write`.
fn write_existing(path: &Path, value: &str) -> io::Result<()> {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)?;
    file.write_all(value.as_bytes())
}

fn set_kernel_lockdown(
    wanted: Option<&str>,
    sys: &dyn LockdownSys,
    paths: &Paths,
    steps: &mut Steps,
) -> Result<(), LockdownError> {
    const SETTING: &str = "kernel lockdown";
    let Some(wanted) = wanted else {
        steps.push(
            SETTING,
            "-",
            Outcome::Skipped {
                reason: "the policy sets no lockdown.kernel_lockdown".to_owned(),
            },
        );
        return Ok(());
    };
    let rank = lockdown_rank(wanted).ok_or_else(|| LockdownError::LockdownMode(wanted.into()))?;
    if rank == 0 {
        steps.push(
            SETTING,
            wanted,
            Outcome::Skipped {
                reason: "lockdown.kernel_lockdown = \"none\"".to_owned(),
            },
        );
        return Ok(());
    }
    let file = paths.lockdown();
    if !file.exists() && paths.securityfs.is_dir() && !securityfs_mounted(paths) {
        // PID 1 mounts only /proc, /sys and /dev early; the lockdown file is in securityfs.
        sys.mount(
            Some("securityfs"),
            &paths.securityfs,
            Some("securityfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            None,
        )
        .map_err(|source| LockdownError::SecurityfsMount {
            path: paths.securityfs.clone(),
            source,
        })?;
    }
    let Some(text) = read_optional(&file, "lockdown")? else {
        return Err(LockdownError::LockdownUnavailable {
            wanted: wanted.to_owned(),
            path: file,
        });
    };
    let current = parse_lockdown(&text)
        .and_then(|mode| Some((mode, lockdown_rank(mode)?)))
        .ok_or_else(|| LockdownError::LockdownUnreadable {
            path: file.clone(),
            text: text.trim().to_owned(),
        })?;
    if current.1 >= rank {
        steps.push(SETTING, current.0, Outcome::AlreadySet);
        return Ok(());
    }
    write_existing(&file, wanted).map_err(|source| LockdownError::LockdownWrite {
        wanted: wanted.to_owned(),
        path: file.clone(),
        source,
    })?;
    steps.push(SETTING, wanted, Outcome::Applied);
    Ok(())
}

fn securityfs_mounted(paths: &Paths) -> bool {
    std::fs::read_to_string(&paths.mountinfo)
        .map(|text| {
            mountinfo::parse(&text)
                .iter()
                .any(|m| m.point == paths.securityfs && m.fstype == "securityfs")
        })
        .unwrap_or(false)
}

fn swap_off(sys: &dyn LockdownSys, paths: &Paths, steps: &mut Steps) -> Result<(), LockdownError> {
    let Some(text) = read_optional(&paths.proc_swaps, "swaps")? else {
        steps.push(
            "swap",
            "off",
            Outcome::NotAvailable {
                reason: format!(
                    "{} is absent: the kernel has no swap support",
                    paths.proc_swaps.display()
                ),
            },
        );
        return Ok(());
    };
    let swaps = mountinfo::parse_swaps(&text);
    if swaps.is_empty() {
        steps.push("swap", "off", Outcome::AlreadySet);
    }
    for swap in swaps {
        sys.swapoff(Path::new(&swap))
            .map_err(|source| LockdownError::Swapoff {
                swap: swap.clone(),
                source,
            })?;
        steps.push(format!("swap {swap}"), "off", Outcome::Applied);
    }
    Ok(())
}

fn tmp_on_tmpfs(
    sys: &dyn LockdownSys,
    paths: &Paths,
    steps: &mut Steps,
) -> Result<(), LockdownError> {
    let text = std::fs::read_to_string(&paths.mountinfo).map_err(|source| LockdownError::Read {
        what: "mount table",
        path: paths.mountinfo.clone(),
        source,
    })?;
    let setting = paths.tmp.display().to_string();
    let fail = |action, source| LockdownError::TmpMount {
        path: paths.tmp.clone(),
        action,
        source,
    };
    match mountinfo::top_mount_at(&mountinfo::parse(&text), &paths.tmp) {
        Some(m) if m.fstype == "tmpfs" && m.has("nosuid") && m.has("nodev") => {
            steps.push(setting, "tmpfs,nosuid,nodev", Outcome::AlreadySet);
        }
        Some(m) if m.fstype == "tmpfs" => {
            // A bind remount changes only the per-mount flags; keep the others it had.
            let mut flags =
                MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
            for (option, flag) in [
                ("ro", MsFlags::MS_RDONLY),
                ("noexec", MsFlags::MS_NOEXEC),
                ("noatime", MsFlags::MS_NOATIME),
                ("nodiratime", MsFlags::MS_NODIRATIME),
            ] {
                if m.has(option) {
                    flags |= flag;
                }
            }
            sys.mount(None, &paths.tmp, None, flags, None)
                .map_err(|e| fail("remount", e))?;
            steps.push(setting, "tmpfs,nosuid,nodev (remounted)", Outcome::Applied);
        }
        _ => {
            std::fs::create_dir_all(&paths.tmp).map_err(|e| fail("mount", e))?;
            sys.mount(
                Some("tmpfs"),
                &paths.tmp,
                Some("tmpfs"),
                MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
                Some("mode=1777"),
            )
            .map_err(|e| fail("mount", e))?;
            steps.push(setting, "tmpfs,nosuid,nodev", Outcome::Applied);
        }
    }
    Ok(())
}

/// Whether an error opening a console means there is no console device.
pub(crate) fn no_console(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound
        || matches!(e.raw_os_error(), Some(libc::ENXIO | libc::ENODEV))
}

fn console_receiver_off(
    sys: &dyn LockdownSys,
    paths: &Paths,
    steps: &mut Steps,
) -> Result<(), LockdownError> {
    let setting = format!("{} input", paths.console.display());
    match sys.console_receiver_off(&paths.console) {
        Ok(true) => steps.push(setting, "off (no CREAD)", Outcome::Applied),
        Ok(false) => steps.push(
            setting,
            "off",
            Outcome::NotAvailable {
                reason: "the console is not a terminal".to_owned(),
            },
        ),
        Err(e) if no_console(&e) => steps.push(
            setting,
            "off",
            Outcome::NotAvailable {
                reason: "there is no console device".to_owned(),
            },
        ),
        Err(source) => {
            return Err(LockdownError::ConsoleInput {
                console: paths.console.clone(),
                source,
            })
        }
    }
    Ok(())
}

/// Edits an account file in place (atomically); skipped when absent or on a read-only file
/// system.
fn edit_account_file(
    path: &Path,
    what: &'static str,
    mut edit: impl FnMut(&str) -> Result<Option<String>, String>,
) -> Result<Outcome, LockdownError> {
    let Some(text) = read_optional(path, "account file")? else {
        return Ok(Outcome::Skipped {
            reason: format!("{} is absent", path.display()),
        });
    };
    let new = edit(&text).map_err(|reason| LockdownError::AccountFile {
        path: path.to_path_buf(),
        reason,
    })?;
    let Some(new) = new else {
        return Ok(Outcome::AlreadySet);
    };
    match write_atomic(path, &new) {
        Ok(()) => Ok(Outcome::Applied),
        Err(e) if e.raw_os_error() == Some(libc::EROFS) => Ok(Outcome::Skipped {
            reason: format!("{} is on a read-only file system", path.display()),
        }),
        Err(source) => Err(LockdownError::AccountWrite {
            path: path.to_path_buf(),
            what,
            source,
        }),
    }
}

fn mask(unit: &str, paths: &Paths, steps: &mut Steps) -> Result<(), LockdownError> {
    let link = paths.systemd_control.join(unit);
    let fail = |source| LockdownError::Mask {
        unit: unit.to_owned(),
        path: link.clone(),
        source,
    };
    if std::fs::read_link(&link).is_ok_and(|target| target == Path::new("/dev/null")) {
        steps.push(format!("mask {unit}"), "/dev/null", Outcome::AlreadySet);
        return Ok(());
    }
    std::fs::create_dir_all(&paths.systemd_control).map_err(fail)?;
    // A new link renamed over whatever is there: the mask appears in one step.
    let tmp = paths.systemd_control.join(format!(".{unit}.cvm-warden"));
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink("/dev/null", &tmp).map_err(fail)?;
    if let Err(source) = std::fs::rename(&tmp, &link) {
        let _ = std::fs::remove_file(&tmp);
        return Err(fail(source));
    }
    steps.push(format!("mask {unit}"), "/dev/null", Outcome::Applied);
    Ok(())
}

/// The value systemd's Ctrl-Alt-Del burst must have.
pub(crate) const BURST_OFF: &str = "none";

/// Writes [`MANAGER_CONF`] to [`Paths::manager_conf`] (atomically: a new file renamed over
/// whatever is there), unless it already holds exactly that.
fn write_manager_conf(paths: &Paths, steps: &mut Steps) -> Result<(), LockdownError> {
    const SETTING: &str = "systemd CtrlAltDelBurstAction";
    let path = &paths.manager_conf;
    let fail = |source| LockdownError::ManagerConf {
        path: path.clone(),
        source,
    };
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_file())
        && std::fs::read_to_string(path).is_ok_and(|text| text == MANAGER_CONF)
    {
        steps.push(SETTING, BURST_OFF, Outcome::AlreadySet);
        return Ok(());
    }
    std::fs::create_dir_all(path.parent().unwrap_or(Path::new("/"))).map_err(fail)?;
    write_atomic_or_create(path, MANAGER_CONF, 0o644).map_err(fail)?;
    steps.push(SETTING, BURST_OFF, Outcome::Applied);
    Ok(())
}

/// `systemctl show -p <property> --value <unit…>`, trimmed; `Err` with the reason when it
/// cannot be run or fails.
pub(crate) fn show(
    sys: &dyn LockdownSys,
    property: &str,
    unit: Option<&str>,
) -> Result<String, String> {
    let mut args = vec!["show", "-p", property, "--value"];
    args.extend(unit);
    match run_checked(sys, "systemctl", &args) {
        Ok(output) => Ok(output.stdout.trim().to_owned()),
        Err(e) => Err(e.to_string()),
    }
}

/// The manager's `CtrlAltDelBurstAction`, `None` when systemctl cannot tell.
pub(crate) fn burst_action(sys: &dyn LockdownSys) -> Option<String> {
    show(sys, "CtrlAltDelBurstAction", None).ok()
}

/// `LoadState` of the unit systemd loads for `unit` ([`load_state_probe`]).
pub(crate) fn load_state(sys: &dyn LockdownSys, unit: &str) -> Result<String, String> {
    show(sys, "LoadState", Some(&load_state_probe(unit)))
}

/// How often, and how long apart, the manager is asked while it re-executes.
const REEXEC_POLLS: u32 = 20;
const REEXEC_POLL_GAP: Duration = Duration::from_millis(250);

/// Waits until the re-executed manager answers with the burst off (at most ~5 s); the last
/// answer. The self-check decides.
fn wait_burst_action(sys: &dyn LockdownSys) -> Option<String> {
    let mut last = None;
    for _ in 0..REEXEC_POLLS {
        last = burst_action(sys);
        if last.as_deref() == Some(BURST_OFF) {
            break;
        }
        sys.pause(REEXEC_POLL_GAP);
    }
    last
}

fn command_line(program: &str, args: &[&str]) -> String {
    std::iter::once(program)
        .chain(args.iter().copied())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs a command and fails unless it exits 0.
pub(crate) fn run_checked(
    sys: &dyn LockdownSys,
    program: &str,
    args: &[&str],
) -> Result<CommandOutput, LockdownError> {
    let output = sys
        .run(program, args)
        .map_err(|source| LockdownError::CommandSpawn {
            command: command_line(program, args),
            source,
        })?;
    if output.success() {
        return Ok(output);
    }
    Err(LockdownError::CommandFailed {
        command: command_line(program, args),
        status: output
            .code
            .map_or("killed by a signal".to_owned(), |c| format!("exit {c}")),
        stderr: output
            .stderr
            .lines()
            .take(4)
            .collect::<Vec<_>>()
            .join(" / ")
            .trim()
            .to_owned(),
    })
}

/// First column of each non-empty line (after a status bullet, if any).
fn first_column(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|line| {
            line.split_whitespace()
                .find(|word| !matches!(*word, "●" | "*" | "○" | "×"))
        })
        .map(str::to_owned)
        .collect()
}

/// `systemctl list-units` pattern of a unit (`getty@.service` → `getty@*.service`).
fn unit_pattern(unit: &str) -> String {
    match unit.split_once("@.") {
        Some((name, kind)) => format!("{name}@*.{kind}"),
        None => unit.to_owned(),
    }
}

/// Units matching `masks` that are active, activating or reloading.
pub(crate) fn active_units(
    sys: &dyn LockdownSys,
    masks: &[String],
) -> Result<Vec<String>, LockdownError> {
    let patterns: Vec<String> = masks.iter().map(|u| unit_pattern(u)).collect();
    let mut args = vec![
        "list-units",
        "--plain",
        "--no-legend",
        "--full",
        "--state=active,activating,reloading",
        "--",
    ];
    args.extend(patterns.iter().map(String::as_str));
    let output = run_checked(sys, "systemctl", &args)?;
    Ok(first_column(&output.stdout))
}

/// Login sessions, or `None` when loginctl is not installed.
pub(crate) fn sessions(sys: &dyn LockdownSys) -> Result<Option<Vec<String>>, LockdownError> {
    match run_checked(sys, "loginctl", &["list-sessions", "--no-legend"]) {
        Ok(output) => Ok(Some(first_column(&output.stdout))),
        Err(LockdownError::CommandSpawn { source, .. })
            if source.kind() == io::ErrorKind::NotFound =>
        {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// How often, and how long apart, the session list is read while sessions close.
const SESSION_POLLS: u32 = 20;
const SESSION_POLL_GAP: Duration = Duration::from_millis(250);

fn end_sessions(sys: &dyn LockdownSys, steps: &mut Steps) -> Result<(), LockdownError> {
    let Some(ids) = sessions(sys)? else {
        steps.push(
            "login sessions",
            "none",
            Outcome::NotAvailable {
                reason: "loginctl is not installed (no systemd-logind, no sessions)".to_owned(),
            },
        );
        return Ok(());
    };
    if ids.is_empty() {
        steps.push("login sessions", "none", Outcome::AlreadySet);
        return Ok(());
    }
    // A session that ended by itself in between makes terminate-session fail; the read-back
    // below is what decides.
    for id in &ids {
        let _ = sys.run("loginctl", &["terminate-session", id]);
    }
    let mut left = wait_sessions_gone(sys, &ids)?;
    if !left.is_empty() {
        // Processes that ignore SIGTERM keep a session closing; end them for good.
        for id in &left {
            let _ = sys.run("loginctl", &["kill-session", "--signal=SIGKILL", id]);
        }
        left = wait_sessions_gone(sys, &ids)?;
    }
    if !left.is_empty() {
        return Err(LockdownError::NotApplied(vec![super::Mismatch {
            setting: "login sessions".to_owned(),
            wanted: "none".to_owned(),
            actual: left.join(","),
        }]));
    }
    steps.push(
        "login sessions",
        format!("ended {}", ids.join(",")),
        Outcome::Applied,
    );
    Ok(())
}

fn wait_sessions_gone(sys: &dyn LockdownSys, ids: &[String]) -> Result<Vec<String>, LockdownError> {
    let mut left = Vec::new();
    for _ in 0..SESSION_POLLS {
        let now = sessions(sys)?.unwrap_or_default();
        left = ids.iter().filter(|id| now.contains(id)).cloned().collect();
        if left.is_empty() {
            break;
        }
        sys.pause(SESSION_POLL_GAP);
    }
    Ok(left)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod unit_tests {
    use super::*;

    #[test]
    fn template_units_become_list_patterns() {
        assert_eq!(unit_pattern("getty@.service"), "getty@*.service");
        assert_eq!(unit_pattern("ssh.socket"), "ssh.socket");
    }

    #[test]
    fn first_column_skips_status_bullets_and_blank_lines() {
        assert_eq!(
            first_column("● getty@tty1.service loaded active running Getty\n\n  3 0 root  tty1\n"),
            vec!["getty@tty1.service", "3"]
        );
    }
}
