//! Console, login and kernel lockdown.
//!
//! [`plan`] turns the policy's `[lockdown]` and the boot shape into a [`LockdownPlan`] (pure,
//! printed by `cvm-warden plan`); [`apply`] carries it out in a fixed order and then reads
//! every setting back ([`self_check`]); a setting that did not stick fails closed naming the
//! setting, the wanted and the actual value. [`status`] is the same read-back without a plan,
//! as JSON, for `cvm-warden lockdown status`.
//!
//! Order of [`apply`]:
//! 1. kernel modules from the policy (`finit_module`, dependencies first, from
//!    `/lib/modules/<release>/modules.dep`);
//! 2. sysctls, `kernel.modules_disabled=1` last;
//! 3. the lockdown LSM mode (`/sys/kernel/security/lockdown`);
//! 4. every swap area off; `/tmp` on a `nosuid,nodev` tmpfs;
//! 5. consoles and logins: Ctrl-Alt-Del off, our stdin on `/dev/null`, and
//!    - PID 1 shape: the console's receiver off (`CREAD` cleared), root's password locked,
//!      login shells set to `nologin` (where `/etc/passwd` is writable);
//!    - systemd shape: runtime masks in `/run/systemd/system.control` (that directory outranks
//!      `/etc/systemd/system`, so a unit file there cannot override a mask; `/run/systemd/system`,
//!      where `systemctl mask --runtime` writes, does not), systemd's own Ctrl-Alt-Del burst
//!      (7 presses in 2 s force a reboot by default) off in
//!      `/run/systemd/system.conf.d/50-cvm-warden.conf`, then `daemon-reexec` when the manager
//!      does not show `CtrlAltDelBurstAction=none` yet (else `daemon-reload`), running gettys
//!      and SSH (including Debian's per-connection `ssh@`/`sshd@` instances) stopped, login
//!      sessions ended;
//! 6. the self-check (in the systemd shape it asks systemd: each masked unit's `LoadState`
//!    must be `masked`, `CtrlAltDelBurstAction` must be `none`).
//!
//! Every path is in [`Paths`], every system call and command goes through [`LockdownSys`]
//! ([`RealLockdownSys`], the recording [`FakeLockdownSys`]).

mod accounts;
mod apply;
mod check;
mod effects;
mod error;
mod kmod;
mod mountinfo;
mod preload;
#[cfg(test)]
mod tests;

use std::path::PathBuf;

use serde::Serialize;

use crate::policy::Lockdown;

pub use accounts::{lock_root_in_passwd, lock_root_password, nologin_shells, NOLOGIN};
pub use apply::{apply, Outcome, Report, Step};
pub use check::{self_check, status, status_with, Check, CheckState};
pub use effects::{CommandOutput, FakeLockdownSys, LockdownCall, LockdownSys, RealLockdownSys};
pub use error::{LockdownError, Mismatch};
pub use kmod::{module_name, ModuleIndex};
pub use preload::{
    load_planned, module_plan, ModulePlan, ModuleReport, PlannedModule, INTEGRITY_MODULES,
    NETWORK_MODULES, TPM_MODULES, VOLUME_MODULES,
};

/// How cvm-warden runs, which decides how consoles and logins are shut.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Shape {
    /// PID 1 of the initramfs: nothing else starts gettys; cvm-warden closes what is left.
    Pid1,
    /// A unit under systemd: gettys, debug shells and SSH are masked and stopped.
    Systemd,
}

/// Where every file the lockdown reads or writes lives; [`Paths::default`] is the real
/// system, tests point each at a temporary directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Paths {
    /// `/proc/sys` (sysctls, `kernel/ctrl-alt-del`).
    pub proc_sys: PathBuf,
    /// `/proc/swaps`.
    pub proc_swaps: PathBuf,
    /// `/proc/self/mountinfo` (is `/tmp` a tmpfs, is securityfs mounted).
    pub mountinfo: PathBuf,
    /// `/proc/self/fd` (where our stdin points).
    pub proc_self_fd: PathBuf,
    /// `/lib/modules` (the release directory below it holds `modules.dep`).
    pub lib_modules: PathBuf,
    /// `/sys/module` (loaded modules; `compression` says what the kernel decompresses).
    pub sys_module: PathBuf,
    /// `/sys/kernel/security` (securityfs; `lockdown` below it).
    pub securityfs: PathBuf,
    /// `/etc/passwd`.
    pub passwd: PathBuf,
    /// `/etc/shadow`.
    pub shadow: PathBuf,
    /// `/run/systemd/system`: a directory exactly when systemd runs as PID 1 (`sd_booted()`);
    /// [`status`] decides by it which shape's checks apply. Nothing is written there.
    pub systemd_runtime: PathBuf,
    /// `/run/systemd/system.control` (runtime unit masks; ranked above `/etc/systemd/system`).
    pub systemd_control: PathBuf,
    /// `/run/systemd/system.conf.d/50-cvm-warden.conf` (the manager drop-in turning the
    /// Ctrl-Alt-Del burst off).
    pub manager_conf: PathBuf,
    /// `/dev/console`.
    pub console: PathBuf,
    /// `/dev/null` (our new stdin).
    pub dev_null: PathBuf,
    /// `/tmp`.
    pub tmp: PathBuf,
}

impl Default for Paths {
    fn default() -> Self {
        Paths {
            proc_sys: PathBuf::from("/proc/sys"),
            proc_swaps: PathBuf::from("/proc/swaps"),
            mountinfo: PathBuf::from("/proc/self/mountinfo"),
            proc_self_fd: PathBuf::from("/proc/self/fd"),
            lib_modules: PathBuf::from("/lib/modules"),
            sys_module: PathBuf::from("/sys/module"),
            securityfs: PathBuf::from("/sys/kernel/security"),
            passwd: PathBuf::from("/etc/passwd"),
            shadow: PathBuf::from("/etc/shadow"),
            systemd_runtime: PathBuf::from("/run/systemd/system"),
            systemd_control: PathBuf::from("/run/systemd/system.control"),
            manager_conf: PathBuf::from("/run/systemd/system.conf.d/50-cvm-warden.conf"),
            console: PathBuf::from("/dev/console"),
            dev_null: PathBuf::from("/dev/null"),
            tmp: PathBuf::from("/tmp"),
        }
    }
}

impl Paths {
    /// Every path re-rooted under `root` (`/proc/sys` becomes `<root>/proc/sys`), for tests
    /// and for inspecting an image.
    pub fn under(root: &std::path::Path) -> Paths {
        let at = |p: PathBuf| root.join(p.strip_prefix("/").unwrap_or(&p));
        let d = Paths::default();
        Paths {
            proc_sys: at(d.proc_sys),
            proc_swaps: at(d.proc_swaps),
            mountinfo: at(d.mountinfo),
            proc_self_fd: at(d.proc_self_fd),
            lib_modules: at(d.lib_modules),
            sys_module: at(d.sys_module),
            securityfs: at(d.securityfs),
            passwd: at(d.passwd),
            shadow: at(d.shadow),
            systemd_runtime: at(d.systemd_runtime),
            systemd_control: at(d.systemd_control),
            manager_conf: at(d.manager_conf),
            console: at(d.console),
            dev_null: at(d.dev_null),
            tmp: at(d.tmp),
        }
    }

    /// `/proc/sys/<key with dots as slashes>`.
    pub fn sysctl(&self, key: &str) -> PathBuf {
        self.proc_sys.join(key.replace('.', "/"))
    }

    /// `/sys/kernel/security/lockdown`.
    pub fn lockdown(&self) -> PathBuf {
        self.securityfs.join("lockdown")
    }
}

/// One sysctl the lockdown sets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Sysctl {
    /// Dotted key, e.g. `kernel.kptr_restrict`.
    pub key: &'static str,
    /// Value written and expected back.
    pub value: &'static str,
    /// `Some(why)`: the key may be absent (the kernel lacks the feature); it is then recorded
    /// as not available instead of failing.
    pub optional: Option<&'static str>,
}

/// The sysctls, in the order they are written: `kernel.modules_disabled` last, after the
/// policy's modules were loaded.
pub const SYSCTLS: [Sysctl; 8] = [
    Sysctl {
        key: "kernel.kexec_load_disabled",
        value: "1",
        optional: None,
    },
    Sysctl {
        key: "kernel.dmesg_restrict",
        value: "1",
        optional: None,
    },
    Sysctl {
        key: "kernel.kptr_restrict",
        value: "2",
        optional: None,
    },
    Sysctl {
        key: "kernel.yama.ptrace_scope",
        value: "3",
        optional: Some("the kernel has no Yama LSM"),
    },
    Sysctl {
        key: "kernel.unprivileged_bpf_disabled",
        value: "1",
        optional: None,
    },
    Sysctl {
        key: "kernel.sysrq",
        value: "0",
        optional: None,
    },
    Sysctl {
        key: "kernel.perf_event_paranoid",
        value: "3",
        optional: None,
    },
    Sysctl {
        key: "kernel.modules_disabled",
        value: "1",
        optional: None,
    },
];

/// Units masked at runtime in the systemd shape. Beyond the gettys, the debug shell and SSH:
/// `autovt@` (logind's alias of `getty@` for virtual terminals), the SSH sockets (socket
/// activation would otherwise still accept connections) and `ssh@`/`sshd@` (Debian's
/// per-connection instances that `ssh.socket` starts with `Accept=yes`), `rescue`/`emergency`
/// (root shells on the console) and `ctrl-alt-del.target` (with the kernel's Ctrl-Alt-Del off,
/// the key reaches systemd as SIGINT, and this target is what reboots).
pub const MASKED_UNITS: [&str; 15] = [
    "getty@.service",
    "serial-getty@.service",
    "console-getty.service",
    "container-getty@.service",
    "autovt@.service",
    "debug-shell.service",
    "ssh.service",
    "sshd.service",
    "ssh.socket",
    "sshd.socket",
    "ssh@.service",
    "sshd@.service",
    "rescue.service",
    "emergency.service",
    "ctrl-alt-del.target",
];

/// The unit whose `LoadState` the self-check asks systemd for: the unit itself, or for a
/// template (which `systemctl show` refuses) the instance most likely in use, whose state
/// comes from the template's mask: `getty@tty1.service`, `autovt@tty1.service`,
/// `serial-getty@ttyS0.service` (the serial console of a VM), `container-getty@0.service`,
/// `ssh@0.service`, `sshd@0.service`.
pub fn load_state_probe(unit: &str) -> String {
    match unit.split_once("@.") {
        Some((name, kind)) => {
            let instance = match name {
                "getty" | "autovt" => "tty1",
                "serial-getty" => "ttyS0",
                _ => "0",
            };
            format!("{name}@{instance}.{kind}")
        }
        None => unit.to_owned(),
    }
}

/// Lockdown LSM modes, weakest first.
pub const LOCKDOWN_MODES: [&str; 3] = ["none", "integrity", "confidentiality"];

/// What [`apply`] will do; pure data, serialisable into `cvm-warden plan`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LockdownPlan {
    /// Boot shape.
    pub shape: Shape,
    /// Kernel modules to load before module loading is disabled (policy order).
    pub modules: Vec<String>,
    /// Sysctls in write order.
    pub sysctls: Vec<Sysctl>,
    /// Lockdown LSM mode to reach (`None` or `"none"`: left as the kernel booted).
    pub kernel_lockdown: Option<String>,
    /// Every swap area off.
    pub swap_off: bool,
    /// `/tmp` on a `nosuid,nodev` tmpfs.
    pub tmp_tmpfs: bool,
    /// `reboot(RB_DISABLE_CAD)`; in the systemd shape also systemd's Ctrl-Alt-Del burst
    /// (`CtrlAltDelBurstAction=none` in [`Paths::manager_conf`], see
    /// [`LockdownPlan::burst_action_off`]).
    pub disable_ctrl_alt_del: bool,
    /// Our stdin onto `/dev/null`.
    pub close_stdin: bool,
    /// Clear `CREAD` on `/dev/console` (PID 1 shape: the serial console stays output-only).
    pub console_receiver_off: bool,
    /// Prefix root's password hash with `!` (PID 1 shape).
    pub lock_root: bool,
    /// Set every login shell to [`NOLOGIN`] (PID 1 shape).
    pub nologin_shells: bool,
    /// Units masked in `/run/systemd/system.control` (systemd shape).
    pub masks: Vec<String>,
    /// `systemctl daemon-reload`, then stop the masked units that are running (systemd shape).
    pub stop_units: bool,
    /// `loginctl terminate-session` for every session (systemd shape).
    pub end_sessions: bool,
}

impl LockdownPlan {
    /// Whether systemd's Ctrl-Alt-Del burst is turned off: the systemd shape with
    /// [`LockdownPlan::disable_ctrl_alt_del`] (so a plan that clears that flag, as a sandbox
    /// does, leaves the manager alone too).
    pub fn burst_action_off(&self) -> bool {
        self.shape == Shape::Systemd && self.disable_ctrl_alt_del
    }

    /// The plan without its host-wide settings (modules, sysctls, lockdown LSM, swap,
    /// Ctrl-Alt-Del, the console's receiver, account files, systemd units and sessions),
    /// keeping the ones local to this process and its mount namespace (`/tmp`, standard
    /// input).
    pub fn without_host_wide(mut self) -> Self {
        self.modules.clear();
        self.sysctls.clear();
        self.kernel_lockdown = None;
        self.swap_off = false;
        self.disable_ctrl_alt_del = false;
        self.console_receiver_off = false;
        self.lock_root = false;
        self.nologin_shells = false;
        self.masks.clear();
        self.stop_units = false;
        self.end_sessions = false;
        self
    }

    /// A plan that does nothing but keeps `self`'s shape: the base for one-step plans.
    pub fn nothing(self) -> Self {
        let mut plan = self.without_host_wide();
        plan.tmp_tmpfs = false;
        plan.close_stdin = false;
        plan
    }
}

/// What [`apply`] writes to [`Paths::manager_conf`] in the systemd shape: systemd's default
/// `CtrlAltDelBurstAction=reboot-force` reboots on 7 Ctrl-Alt-Del presses within 2 s even
/// with `ctrl-alt-del.target` masked.
pub const MANAGER_CONF: &str =
    "# Written by cvm-warden: no reboot from the console, however often \
Ctrl-Alt-Del is pressed.\n[Manager]\nCtrlAltDelBurstAction=none\n";

/// The lockdown for `policy` in `shape`. Pure: no I/O.
pub fn plan(policy: &Lockdown, shape: Shape) -> LockdownPlan {
    let pid1 = shape == Shape::Pid1;
    let systemd = shape == Shape::Systemd;
    LockdownPlan {
        shape,
        modules: policy.modules.clone(),
        sysctls: SYSCTLS.to_vec(),
        kernel_lockdown: policy.kernel_lockdown.clone(),
        swap_off: true,
        tmp_tmpfs: true,
        disable_ctrl_alt_del: true,
        close_stdin: true,
        console_receiver_off: pid1,
        lock_root: pid1,
        nologin_shells: pid1,
        masks: if systemd {
            MASKED_UNITS.iter().map(|u| (*u).to_owned()).collect()
        } else {
            Vec::new()
        },
        stop_units: systemd,
        end_sessions: systemd,
    }
}

/// Rank of a lockdown mode (`none` 0 … `confidentiality` 2); `None` for an unknown word.
pub fn lockdown_rank(mode: &str) -> Option<usize> {
    LOCKDOWN_MODES.iter().position(|m| *m == mode)
}

/// The active mode of a `/sys/kernel/security/lockdown` text (`none [integrity]
/// confidentiality` → `integrity`).
pub fn parse_lockdown(text: &str) -> Option<&str> {
    text.split_whitespace()
        .find_map(|word| word.strip_prefix('[')?.strip_suffix(']'))
}
