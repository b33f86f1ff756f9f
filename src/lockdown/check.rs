//! The self-check: every setting read back after the lockdown; and [`status`], the same
//! read-back without a plan for `cvm-warden lockdown status`.

use std::path::Path;

use serde::Serialize;

use super::accounts::{login_accounts, password_locked, root_password_field};
use super::apply::{
    active_units, burst_action, load_state, module_index, module_loaded, no_console, sessions,
    BURST_OFF,
};
use super::effects::LockdownSys;
use super::error::{LockdownError, Mismatch};
use super::{
    load_state_probe, lockdown_rank, mountinfo, parse_lockdown, LockdownPlan, Paths, MANAGER_CONF,
};

/// How a read-back came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CheckState {
    /// As wanted.
    Ok,
    /// Not as wanted: the lockdown did not stick.
    Failed,
    /// The kernel or system lacks the feature (recorded, not a failure).
    NotAvailable,
    /// Left alone on purpose (e.g. a read-only `/etc`).
    Skipped,
}

/// One setting read back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    /// The setting, e.g. `kernel.sysrq`.
    pub setting: String,
    /// The value wanted.
    pub wanted: String,
    /// The value read back.
    pub actual: String,
    /// The verdict.
    pub state: CheckState,
}

fn check(setting: impl Into<String>, wanted: &str, actual: &str, ok: bool) -> Check {
    Check {
        setting: setting.into(),
        wanted: wanted.to_owned(),
        actual: actual.to_owned(),
        state: if ok {
            CheckState::Ok
        } else {
            CheckState::Failed
        },
    }
}

fn with_state(setting: impl Into<String>, wanted: &str, actual: &str, state: CheckState) -> Check {
    Check {
        setting: setting.into(),
        wanted: wanted.to_owned(),
        actual: actual.to_owned(),
        state,
    }
}

/// A file's trimmed text; `None` when absent or unreadable.
fn read(path: &Path) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|t| t.trim().to_owned())
}

/// Whether `path` is on a read-only file system (so the lockdown skipped editing it).
fn read_only(path: &Path) -> bool {
    nix::unistd::access(path, nix::unistd::AccessFlags::W_OK) == Err(nix::errno::Errno::EROFS)
}

/// Reads back every setting of `plan`. Returns all checks when each is ok, not available or
/// skipped; fails closed with every [`Mismatch`] otherwise.
pub fn self_check(
    plan: &LockdownPlan,
    sys: &dyn LockdownSys,
    paths: &Paths,
) -> Result<Vec<Check>, LockdownError> {
    let mut checks = Vec::new();
    if !plan.modules.is_empty() {
        let (_, index) = module_index(sys, paths)?;
        for module in &plan.modules {
            let actual = if module_loaded(paths, module) {
                "loaded"
            } else if index.is_builtin(module) {
                "built in"
            } else {
                "not loaded"
            };
            checks.push(check(
                format!("module {module}"),
                "loaded",
                actual,
                actual != "not loaded",
            ));
        }
    }
    checks.extend(kernel_checks(plan, paths));
    if plan.close_stdin {
        checks.push(stdin_check(paths));
    }
    if plan.console_receiver_off {
        let setting = format!("{} input", paths.console.display());
        checks.push(match sys.console_receives(&paths.console) {
            Ok(Some(receives)) => check(
                setting,
                "off",
                if receives { "on (CREAD)" } else { "off" },
                !receives,
            ),
            Ok(None) => with_state(setting, "off", "not a terminal", CheckState::NotAvailable),
            Err(e) if no_console(&e) => with_state(
                setting,
                "off",
                "no console device",
                CheckState::NotAvailable,
            ),
            Err(e) => check(setting, "off", &format!("unreadable: {e}"), false),
        });
    }
    if plan.lock_root {
        checks.push(root_check(paths));
    }
    if plan.nologin_shells {
        checks.push(shells_check(paths));
    }
    for unit in &plan.masks {
        checks.push(mask_check(paths, sys, unit));
    }
    if plan.burst_action_off() {
        checks.extend(burst_checks(paths, sys));
    }
    if plan.stop_units {
        let running = active_units(sys, &plan.masks)?;
        checks.push(check(
            "running gettys and ssh",
            "none",
            &none_or_list(&running),
            running.is_empty(),
        ));
    }
    if plan.end_sessions {
        checks.push(match sessions(sys)? {
            None => with_state(
                "login sessions",
                "none",
                "no loginctl",
                CheckState::NotAvailable,
            ),
            Some(ids) => check(
                "login sessions",
                "none",
                &none_or_list(&ids),
                ids.is_empty(),
            ),
        });
    }
    let failed: Vec<Mismatch> = checks
        .iter()
        .filter(|c| c.state == CheckState::Failed)
        .map(|c| Mismatch {
            setting: c.setting.clone(),
            wanted: c.wanted.clone(),
            actual: c.actual.clone(),
        })
        .collect();
    if failed.is_empty() {
        Ok(checks)
    } else {
        Err(LockdownError::NotApplied(failed))
    }
}

fn none_or_list(items: &[String]) -> String {
    if items.is_empty() {
        "none".to_owned()
    } else {
        items.join(",")
    }
}

/// Sysctls, lockdown mode, swap, `/tmp` and Ctrl-Alt-Del: all from files.
fn kernel_checks(plan: &LockdownPlan, paths: &Paths) -> Vec<Check> {
    let mut checks = Vec::new();
    for sysctl in &plan.sysctls {
        checks.push(match read(&paths.sysctl(sysctl.key)) {
            Some(actual) => check(sysctl.key, sysctl.value, &actual, actual == sysctl.value),
            None if sysctl.optional.is_some() => {
                with_state(sysctl.key, sysctl.value, "absent", CheckState::NotAvailable)
            }
            None => check(sysctl.key, sysctl.value, "absent", false),
        });
    }
    if let Some(wanted) = plan.kernel_lockdown.as_deref() {
        let text = read(&paths.lockdown());
        let actual = text.as_deref().and_then(parse_lockdown);
        let wanted_rank = lockdown_rank(wanted);
        let ok = match (wanted_rank, actual.and_then(lockdown_rank)) {
            (Some(0), _) => true,
            (Some(w), Some(a)) => a >= w,
            _ => false,
        };
        let actual = match (&text, actual) {
            (None, _) => "absent".to_owned(),
            (Some(_), Some(mode)) => mode.to_owned(),
            (Some(t), None) => format!("unreadable {t:?}"),
        };
        checks.push(check("kernel lockdown", wanted, &actual, ok));
    }
    if plan.swap_off {
        checks.push(match read(&paths.proc_swaps) {
            None => with_state("swap", "none", "no swap support", CheckState::NotAvailable),
            Some(text) => {
                let swaps = mountinfo::parse_swaps(&text);
                check("swap", "none", &none_or_list(&swaps), swaps.is_empty())
            }
        });
    }
    if plan.tmp_tmpfs {
        let setting = paths.tmp.display().to_string();
        let wanted = "tmpfs,nosuid,nodev";
        checks.push(match read(&paths.mountinfo) {
            None => check(setting, wanted, "mount table unreadable", false),
            Some(text) => match mountinfo::top_mount_at(&mountinfo::parse(&text), &paths.tmp) {
                None => check(setting, wanted, "not a mount point", false),
                Some(m) => check(
                    setting,
                    wanted,
                    &format!("{},{}", m.fstype, m.options.join(",")),
                    m.fstype == "tmpfs" && m.has("nosuid") && m.has("nodev"),
                ),
            },
        });
    }
    if plan.disable_ctrl_alt_del {
        let path = paths.proc_sys.join("kernel/ctrl-alt-del");
        checks.push(match read(&path) {
            Some(actual) => check("kernel.ctrl-alt-del", "0", &actual, actual == "0"),
            None => with_state(
                "kernel.ctrl-alt-del",
                "0",
                "not observable",
                CheckState::NotAvailable,
            ),
        });
    }
    checks
}

fn stdin_check(paths: &Paths) -> Check {
    let wanted = paths.dev_null.display().to_string();
    match std::fs::read_link(paths.proc_self_fd.join("0")) {
        Ok(target) => check(
            "stdin",
            &wanted,
            &target.display().to_string(),
            target == paths.dev_null,
        ),
        Err(_) => with_state("stdin", &wanted, "not observable", CheckState::NotAvailable),
    }
}

fn root_check(paths: &Paths) -> Check {
    const SETTING: &str = "root password";
    let shadow = read(&paths.shadow);
    let passwd = read(&paths.passwd);
    // pam_unix reads /etc/shadow only when root's passwd field is `x`; any other value (a
    // hash, an empty password) is what a login is checked against.
    if let Some(field) = passwd
        .as_deref()
        .and_then(root_password_field)
        .filter(|f| f != "x")
    {
        return if password_locked(&field) {
            check(SETTING, "locked", "locked (in passwd)", true)
        } else if read_only(&paths.passwd) {
            check(
                SETTING,
                "locked",
                "usable password in passwd (read-only /etc: cannot be locked)",
                false,
            )
        } else {
            check(SETTING, "locked", "usable password in passwd", false)
        };
    }
    match shadow.as_deref().and_then(root_password_field) {
        None if shadow.is_none() && passwd.is_none() => with_state(
            SETTING,
            "locked",
            "no account files",
            CheckState::NotAvailable,
        ),
        None => check(SETTING, "locked", "no root password", true),
        Some(field) if password_locked(&field) => check(SETTING, "locked", "locked", true),
        Some(_) if read_only(&paths.shadow) => with_state(
            SETTING,
            "locked",
            "usable (read-only /etc)",
            CheckState::Skipped,
        ),
        Some(_) => check(SETTING, "locked", "usable", false),
    }
}

fn shells_check(paths: &Paths) -> Check {
    const SETTING: &str = "login shells";
    let wanted = super::NOLOGIN;
    match read(&paths.passwd) {
        None => with_state(SETTING, wanted, "no passwd file", CheckState::Skipped),
        Some(text) => {
            let left = login_accounts(&text);
            if left.is_empty() {
                check(SETTING, wanted, "none left", true)
            } else if read_only(&paths.passwd) {
                with_state(
                    SETTING,
                    wanted,
                    &format!("{} (read-only /etc)", left.join(",")),
                    CheckState::Skipped,
                )
            } else {
                check(SETTING, wanted, &left.join(","), false)
            }
        }
    }
}

/// The mask link in `/run/systemd/system.control` and what systemd made of it: the
/// `LoadState` of the unit (of an instance for a template) must be `masked`, so a unit file
/// in a directory ranked higher, or a mask never loaded, fails.
fn mask_check(paths: &Paths, sys: &dyn LockdownSys, unit: &str) -> Check {
    let link = match std::fs::read_link(paths.systemd_control.join(unit)) {
        Ok(target) => target.display().to_string(),
        Err(_) => "not masked".to_owned(),
    };
    let probe = load_state_probe(unit);
    let state = load_state(sys, unit).unwrap_or_else(|e| format!("unknown ({e})"));
    check(
        format!("mask {unit}"),
        &format!("/dev/null, {probe} masked"),
        &format!("{link}, {probe} {state}"),
        link == "/dev/null" && state == "masked",
    )
}

/// The manager drop-in on disk and the manager's `CtrlAltDelBurstAction`.
fn burst_checks(paths: &Paths, sys: &dyn LockdownSys) -> [Check; 2] {
    let file = paths.manager_conf.display().to_string();
    let conf = match std::fs::symlink_metadata(&paths.manager_conf) {
        Ok(meta) if meta.file_type().is_file() => {
            match std::fs::read_to_string(&paths.manager_conf) {
                Ok(text) if text == MANAGER_CONF => "CtrlAltDelBurstAction=none".to_owned(),
                Ok(text) => format!("other content {:?}", text.trim()),
                Err(e) => format!("unreadable: {e}"),
            }
        }
        Ok(_) => "not a regular file".to_owned(),
        Err(_) => "absent".to_owned(),
    };
    let ok = conf == "CtrlAltDelBurstAction=none";
    let action = burst_action(sys).unwrap_or_else(|| "unknown (systemctl failed)".to_owned());
    [
        check(file, "CtrlAltDelBurstAction=none", &conf, ok),
        check(
            "systemd CtrlAltDelBurstAction",
            BURST_OFF,
            &action,
            action == BURST_OFF,
        ),
    ]
}

/// Marks a check that does not apply in this machine's shape as skipped, keeping what was
/// read.
fn not_applicable(mut c: Check, why: &str) -> Check {
    if c.state != CheckState::NotAvailable {
        c.state = CheckState::Skipped;
        c.actual = format!("{} ({why})", c.actual);
    }
    c
}

/// [`status_with`] on the real system ([`super::RealLockdownSys`]), for
/// `cvm-warden lockdown status`.
pub fn status(paths: &Paths) -> serde_json::Value {
    status_with(paths, &super::RealLockdownSys::new())
}

/// The state of every lockdown setting on this machine, without a plan: the checks of the
/// shape this machine runs in — systemd when [`Paths::systemd_runtime`] is a directory
/// (`sd_booted()`), PID 1 otherwise — as JSON:
///
/// - `kernel`: the sysctls, swap, `/tmp`, Ctrl-Alt-Del and `kernel lockdown` (wanted
///   `integrity` or stricter; not available without the lockdown LSM, since the policy that
///   may ask for more is not known here);
/// - `kernel_lockdown`: the active mode, or `null` without the LSM;
/// - `accounts`: root password and login shells (PID 1 shape; in the systemd shape logins are
///   shut by the masks, so these are read but skipped, with the reason);
/// - `systemd_masks`: every unit of [`super::MASKED_UNITS`] (link and `LoadState` through
///   `systemctl show`), the manager drop-in and `CtrlAltDelBurstAction` (systemd shape; in the
///   PID 1 shape there is no systemd: links read, skipped, no command run);
/// - `failed`: every check whose state is `failed`;
/// - `ok`: `true` exactly when no check anywhere in the output has the state `failed`.
///   `not-available` (the kernel or system lacks the feature) and `skipped` (does not apply
///   in this shape, or a read-only file the lockdown may not edit) never make it false.
pub fn status_with(paths: &Paths, sys: &dyn LockdownSys) -> serde_json::Value {
    let policy = crate::policy::Lockdown {
        consoles: "off".to_owned(),
        kernel_lockdown: Some("integrity".to_owned()),
        modules: Vec::new(),
    };
    let systemd = paths.systemd_runtime.is_dir();
    let shape = if systemd {
        super::Shape::Systemd
    } else {
        super::Shape::Pid1
    };
    let full = super::plan(&policy, super::Shape::Systemd);
    let lockdown_text = read(&paths.lockdown());
    let mut kernel = kernel_checks(&full, paths);
    if lockdown_text.is_none() {
        for c in kernel.iter_mut().filter(|c| c.setting == "kernel lockdown") {
            c.state = CheckState::NotAvailable;
            c.actual = "no lockdown LSM".to_owned();
        }
    }
    let mut accounts = vec![root_check(paths), shells_check(paths)];
    let mut masks: Vec<Check>;
    if systemd {
        accounts = accounts
            .into_iter()
            .map(|c| not_applicable(c, "systemd shape: logins are shut by the masks"))
            .collect();
        masks = full
            .masks
            .iter()
            .map(|u| mask_check(paths, sys, u))
            .collect();
        masks.extend(burst_checks(paths, sys));
    } else {
        masks = full
            .masks
            .iter()
            .map(|u| {
                let link = match std::fs::read_link(paths.systemd_control.join(u)) {
                    Ok(target) => target.display().to_string(),
                    Err(_) => "not masked".to_owned(),
                };
                with_state(
                    format!("mask {u}"),
                    "/dev/null",
                    &format!("{link} (PID 1 shape: systemd is not running)"),
                    CheckState::Skipped,
                )
            })
            .collect();
    }
    let failed: Vec<&Check> = kernel
        .iter()
        .chain(&accounts)
        .chain(&masks)
        .filter(|c| c.state == CheckState::Failed)
        .collect();
    serde_json::json!({
        "ok": failed.is_empty(),
        "shape": shape,
        "failed": failed,
        "kernel": kernel,
        "kernel_lockdown": lockdown_text.as_deref().and_then(parse_lockdown),
        "accounts": accounts,
        "systemd_masks": masks,
    })
}
