//! Lockdown errors: each names the setting, the value and what the operator should do.

use std::path::PathBuf;

use serde::Serialize;

/// A setting that was read back with another value than the one wanted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Mismatch {
    /// The setting, e.g. `kernel.sysrq`.
    pub setting: String,
    /// What the lockdown set.
    pub wanted: String,
    /// What was read back.
    pub actual: String,
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} wanted {}, actual {}",
            self.setting, self.wanted, self.actual
        )
    }
}

fn list(mismatches: &[Mismatch]) -> String {
    mismatches
        .iter()
        .map(Mismatch::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// Why the lockdown failed. The boot stops on any of these (fail closed).
#[derive(Debug, thiserror::Error)]
pub enum LockdownError {
    /// Reading a file the lockdown depends on failed.
    #[error("read {} ({what})", path.display())]
    Read {
        /// What the file is, e.g. `modules.dep`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// `uname(2)` failed (needed to find `/lib/modules/<release>`).
    #[error("kernel release (uname) for /lib/modules/<release>")]
    KernelRelease(#[source] std::io::Error),
    /// A module the policy needs is neither loaded, built in nor in `modules.dep`.
    #[error(
        "kernel module {module} (needed by {needed_by}) is not loaded, not built in and not in {}; \
         hint: put the module of kernel {release} and its dependencies into the image and run \
         depmod (`cvm-warden plan` lists the modules the policy needs), or build it into the kernel",
        modules_dep.display()
    )]
    ModuleNotFound {
        /// The module's name.
        module: String,
        /// The features that need it, e.g. `[network]`, `lockdown.modules`.
        needed_by: String,
        /// The kernel release.
        release: String,
        /// The index searched.
        modules_dep: PathBuf,
    },
    /// `modules.dep` names a module file that is not there.
    #[error(
        "kernel module {module} (needed by {needed_by}) is listed in modules.dep but its file {} \
         is missing; hint: copy the module files with modules.dep into the image",
        path.display()
    )]
    ModuleFileMissing {
        /// The module (or the dependency) whose file is missing.
        module: String,
        /// The features that need it.
        needed_by: String,
        /// The file modules.dep names.
        path: PathBuf,
    },
    /// A compressed module whose format the kernel cannot decompress.
    #[error(
        "kernel module {module} ({}) is {format}-compressed but the kernel decompresses {}; \
         hint: ship it uncompressed or compressed as the kernel's CONFIG_MODULE_DECOMPRESS expects",
        path.display(),
        kernel.as_deref().map_or("no modules (no /sys/module/compression)".to_owned(), |k| format!("only {k}"))
    )]
    ModuleCompression {
        /// The module being loaded (the policy's module or one of its dependencies).
        module: String,
        /// Its file.
        path: PathBuf,
        /// `xz`, `zstd` or `gzip`.
        format: String,
        /// What `/sys/module/compression` says, if present.
        kernel: Option<String>,
    },
    /// Module loading is already disabled, so the policy's modules cannot be loaded.
    #[error(
        "kernel.modules_disabled is already 1 but kernel modules {modules:?} are not loaded; \
         hint: load them before anything sets kernel.modules_disabled, or build them in"
    )]
    ModulesAlreadyDisabled {
        /// Modules (and dependencies) still to load.
        modules: Vec<String>,
    },
    /// `finit_module(2)` failed.
    #[error(
        "load kernel module {module} from {} (finit_module{}); hint: the module must match \
         kernel {release} and be signed when the kernel enforces signatures",
        path.display(),
        if *compressed { ", MODULE_INIT_COMPRESSED_FILE" } else { "" }
    )]
    ModuleLoad {
        /// The module.
        module: String,
        /// Its file.
        path: PathBuf,
        /// Kernel release.
        release: String,
        /// Whether the kernel was asked to decompress it.
        compressed: bool,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A sysctl the lockdown needs does not exist on this kernel.
    #[error(
        "sysctl {key} is not available ({} is absent), so it cannot be set to {wanted}; hint: \
         boot a kernel that has it (and mount /proc)",
        path.display()
    )]
    SysctlMissing {
        /// Dotted key.
        key: String,
        /// Its file.
        path: PathBuf,
        /// The value wanted.
        wanted: String,
    },
    /// Writing a sysctl failed.
    #[error("set sysctl {key} = {wanted} (write {}); hint: cvm-warden needs CAP_SYS_ADMIN in the initial namespaces", path.display())]
    SysctlWrite {
        /// Dotted key.
        key: String,
        /// Its file.
        path: PathBuf,
        /// The value.
        wanted: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The policy asks for a lockdown mode but the kernel has no lockdown LSM.
    #[error(
        "lockdown.kernel_lockdown = {wanted:?} but the kernel has no lockdown LSM ({} is absent); \
         hint: boot a kernel with CONFIG_SECURITY_LOCKDOWN_LSM and `lockdown` in lsm=, or set \
         kernel_lockdown = \"none\"",
        path.display()
    )]
    LockdownUnavailable {
        /// The mode asked for.
        wanted: String,
        /// The file looked for.
        path: PathBuf,
    },
    /// A lockdown mode this build does not know.
    #[error("lockdown.kernel_lockdown = {0:?} is not a lockdown mode; write \"none\", \"integrity\" or \"confidentiality\"")]
    LockdownMode(String),
    /// The lockdown file does not show a mode in brackets.
    #[error("{} reads {text:?}, which names no active mode in brackets; hint: check the kernel's lockdown LSM", path.display())]
    LockdownUnreadable {
        /// The file.
        path: PathBuf,
        /// What it said.
        text: String,
    },
    /// Writing the lockdown mode failed.
    #[error("set the kernel lockdown mode to {wanted} (write {}); hint: the mode can only be raised, and needs CAP_SYS_ADMIN", path.display())]
    LockdownWrite {
        /// The mode.
        wanted: String,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Mounting securityfs (to reach the lockdown file) failed.
    #[error("mount securityfs on {} to set the lockdown mode", path.display())]
    SecurityfsMount {
        /// The mount point.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// `swapoff(2)` failed.
    #[error("turn swap off on {swap} (swapoff); hint: free enough memory for its pages, or remove the swap area from the image")]
    Swapoff {
        /// The swap device or file, as `/proc/swaps` names it.
        swap: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Mounting the `/tmp` tmpfs failed.
    #[error("mount a nosuid,nodev tmpfs on {} ({action})", path.display())]
    TmpMount {
        /// `/tmp`.
        path: PathBuf,
        /// `mount` or `remount`.
        action: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// `reboot(RB_DISABLE_CAD)` failed.
    #[error("disable Ctrl-Alt-Del (reboot RB_DISABLE_CAD); hint: needs CAP_SYS_BOOT in the initial PID namespace")]
    CtrlAltDel(#[source] std::io::Error),
    /// Redirecting our stdin to `/dev/null` failed.
    #[error("put cvm-warden's stdin on {}", dev_null.display())]
    Stdin {
        /// The null device.
        dev_null: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Turning the console's receiver off failed.
    #[error("turn the receiver of {} off (termios CREAD)", console.display())]
    ConsoleInput {
        /// The console.
        console: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// An account file has a form the lockdown will not edit.
    #[error("{} cannot be edited safely: {reason}; hint: fix the file in the image", path.display())]
    AccountFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Writing an account file failed.
    #[error("write {} ({what})", path.display())]
    AccountWrite {
        /// The file.
        path: PathBuf,
        /// `lock root's password` or `set login shells to nologin`.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Writing a runtime unit mask failed.
    #[error("mask {unit} ({} -> /dev/null)", path.display())]
    Mask {
        /// The unit.
        unit: String,
        /// The symlink.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Writing systemd's manager drop-in (Ctrl-Alt-Del burst off) failed.
    #[error(
        "write {} (CtrlAltDelBurstAction=none, so 7 Ctrl-Alt-Del presses in 2 s do not reboot); \
         hint: /run must be a writable tmpfs",
        path.display()
    )]
    ManagerConf {
        /// The drop-in.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A command could not be run to completion (not installed, hung, …); the cause says
    /// what to do.
    #[error("cannot run `{command}` (the systemd shape needs systemctl and loginctl)")]
    CommandSpawn {
        /// The command line.
        command: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A command failed.
    #[error("`{command}` failed ({status}): {stderr}")]
    CommandFailed {
        /// The command line.
        command: String,
        /// Exit status as text.
        status: String,
        /// Its stderr (trimmed, at most a few lines).
        stderr: String,
    },
    /// The self-check found settings that did not stick.
    #[error(
        "lockdown did not stick: {}; hint: a kernel or image that refuses these settings cannot \
         host the workload (see `cvm-warden lockdown status`)",
        list(.0)
    )]
    NotApplied(Vec<Mismatch>),
}
