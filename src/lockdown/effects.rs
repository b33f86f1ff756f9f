//! The lockdown's system calls and commands: [`LockdownSys`], the real
//! [`RealLockdownSys`] and the recording [`FakeLockdownSys`]. Plain file reads and writes
//! (sysctls, account files, masks) are not here: they go to the paths in
//! [`super::Paths`], which tests point at a temporary directory.

use std::collections::VecDeque;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use nix::mount::MsFlags;

use crate::tool::{Tool, Tools};

/// What a command printed and how it ended.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CommandOutput {
    /// Exit code; `None` when it was killed by a signal.
    pub code: Option<i32>,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl CommandOutput {
    /// Exit code 0.
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
}

/// The effects of the lockdown that are system calls or commands. Pass it in as
/// `&dyn LockdownSys`; nothing picks an implementation with `cfg!(test)`.
pub trait LockdownSys {
    /// The running kernel's release (`uname -r`).
    fn kernel_release(&self) -> io::Result<String>;
    /// `finit_module(2)` of the file at `path`, with `MODULE_INIT_COMPRESSED_FILE` when
    /// `compressed`.
    fn finit_module(&self, path: &Path, compressed: bool) -> io::Result<()>;
    /// `swapoff(2)`.
    fn swapoff(&self, path: &Path) -> io::Result<()>;
    /// `mount(2)`.
    fn mount(
        &self,
        source: Option<&str>,
        target: &Path,
        fstype: Option<&str>,
        flags: MsFlags,
        data: Option<&str>,
    ) -> io::Result<()>;
    /// `reboot(RB_DISABLE_CAD)`: Ctrl-Alt-Del sends SIGINT to PID 1 instead of rebooting.
    fn disable_ctrl_alt_del(&self) -> io::Result<()>;
    /// Our fd 0 onto `dev_null`.
    fn stdin_to_null(&self, dev_null: &Path) -> io::Result<()>;
    /// Clears `CREAD` on the terminal at `console` and flushes its pending input. `Ok(false)`
    /// when it is not a terminal (nothing to turn off).
    fn console_receiver_off(&self, console: &Path) -> io::Result<bool>;
    /// Whether the terminal at `console` receives (`CREAD`); `Ok(None)` when not a terminal.
    fn console_receives(&self, console: &Path) -> io::Result<Option<bool>>;
    /// Runs `program args…` with no stdin and waits for it. The real one runs only the
    /// tools of [`crate::tool::Tool`] (by name), through the tool runner: a tool that is not
    /// installed is `ErrorKind::NotFound`, one that hung `ErrorKind::TimedOut`.
    fn run(&self, program: &str, args: &[&str]) -> io::Result<CommandOutput>;
    /// Waits (between read-backs of asynchronous effects).
    fn pause(&self, duration: Duration);
}

/// The real system. Commands go through the tool runner ([`crate::tool`]).
#[derive(Debug, Clone, Default)]
pub struct RealLockdownSys {
    tools: Tools,
}

impl RealLockdownSys {
    /// The real system; tools from their fixed paths ([`Tools::system`]), no audit.
    pub fn new() -> Self {
        Self::default()
    }

    /// The real system, running tools with `tools` (the boot passes its audited runner).
    pub fn with_tools(tools: Tools) -> Self {
        Self { tools }
    }
}

/// `MODULE_INIT_COMPRESSED_FILE` from `include/uapi/linux/module.h` (Linux 5.17); `nix` and
/// `libc` do not name it.
const MODULE_INIT_COMPRESSED_FILE: libc::c_uint = 4;

impl LockdownSys for RealLockdownSys {
    fn kernel_release(&self) -> io::Result<String> {
        let uts = nix::sys::utsname::uname()?;
        Ok(uts.release().to_string_lossy().into_owned())
    }

    fn finit_module(&self, path: &Path, compressed: bool) -> io::Result<()> {
        use nix::kmod::ModuleInitFlags;
        let file = std::fs::File::open(path)?;
        let flags = if compressed {
            ModuleInitFlags::from_bits_retain(MODULE_INIT_COMPRESSED_FILE)
        } else {
            ModuleInitFlags::empty()
        };
        nix::kmod::finit_module(&file, c"", flags)?;
        Ok(())
    }

    fn swapoff(&self, path: &Path) -> io::Result<()> {
        crate::sys::kernel::swapoff(path)?;
        Ok(())
    }

    fn mount(
        &self,
        source: Option<&str>,
        target: &Path,
        fstype: Option<&str>,
        flags: MsFlags,
        data: Option<&str>,
    ) -> io::Result<()> {
        nix::mount::mount(source, target, fstype, flags, data)?;
        Ok(())
    }

    fn disable_ctrl_alt_del(&self) -> io::Result<()> {
        nix::sys::reboot::set_cad_enabled(false)?;
        Ok(())
    }

    fn stdin_to_null(&self, dev_null: &Path) -> io::Result<()> {
        let null = std::fs::File::open(dev_null)?;
        nix::unistd::dup2_stdin(&null)?;
        Ok(())
    }

    fn console_receiver_off(&self, console: &Path) -> io::Result<bool> {
        use nix::sys::termios::{tcflush, tcgetattr, tcsetattr, ControlFlags, FlushArg, SetArg};
        let tty = open_console(console)?;
        let mut attrs = match tcgetattr(&tty) {
            Ok(attrs) => attrs,
            Err(nix::errno::Errno::ENOTTY) => return Ok(false),
            Err(errno) => return Err(errno.into()),
        };
        attrs.control_flags.remove(ControlFlags::CREAD);
        tcsetattr(&tty, SetArg::TCSANOW, &attrs)?;
        tcflush(&tty, FlushArg::TCIFLUSH)?;
        Ok(true)
    }

    fn console_receives(&self, console: &Path) -> io::Result<Option<bool>> {
        use nix::sys::termios::{tcgetattr, ControlFlags};
        let tty = open_console(console)?;
        match tcgetattr(&tty) {
            Ok(attrs) => Ok(Some(attrs.control_flags.contains(ControlFlags::CREAD))),
            Err(nix::errno::Errno::ENOTTY) => Ok(None),
            Err(errno) => Err(errno.into()),
        }
    }

    fn run(&self, program: &str, args: &[&str]) -> io::Result<CommandOutput> {
        let tool = Tool::from_name(program).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{program} is not one of the tools cvm-warden runs ({})",
                    Tool::ALL.map(Tool::name).join(", ")
                ),
            )
        })?;
        let output = self.tools.run(tool, args, None)?;
        Ok(CommandOutput {
            code: output.status.code(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: output.stderr_text(),
        })
    }

    fn pause(&self, duration: Duration) {
        std::thread::sleep(duration);
    }
}

/// Opens a terminal without making it our controlling terminal.
fn open_console(console: &Path) -> io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(console)
}

/// One call recorded by [`FakeLockdownSys`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LockdownCall {
    /// [`LockdownSys::finit_module`].
    FinitModule {
        /// The file.
        path: PathBuf,
        /// `MODULE_INIT_COMPRESSED_FILE`.
        compressed: bool,
    },
    /// [`LockdownSys::swapoff`].
    Swapoff(PathBuf),
    /// [`LockdownSys::mount`].
    Mount {
        /// Source.
        source: Option<String>,
        /// Target.
        target: PathBuf,
        /// File-system type.
        fstype: Option<String>,
        /// Flags.
        flags: MsFlags,
        /// Options.
        data: Option<String>,
    },
    /// [`LockdownSys::disable_ctrl_alt_del`].
    DisableCtrlAltDel,
    /// [`LockdownSys::stdin_to_null`].
    StdinToNull(PathBuf),
    /// [`LockdownSys::console_receiver_off`].
    ConsoleReceiverOff(PathBuf),
    /// [`LockdownSys::run`]: the program and its arguments.
    Run(Vec<String>),
}

/// A scripted answer of [`FakeLockdownSys::run`]: every call whose command line starts with
/// `prefix` takes the next queued output (the last one repeats).
#[derive(Debug)]
struct Script {
    prefix: Vec<String>,
    outputs: VecDeque<io::Result<CommandOutput>>,
}

#[derive(Debug, Default)]
struct FakeState {
    calls: Vec<LockdownCall>,
    fail: Vec<(String, i32)>,
    scripts: Vec<Script>,
    console_receives: Option<bool>,
    manager: FakeManager,
}

/// What the simulated systemd has loaded: changed only by `daemon-reload` (masks) and
/// `daemon-reexec` (masks and the manager drop-in), as the real one.
#[derive(Debug)]
struct FakeManager {
    masked: Vec<String>,
    burst_action: String,
}

impl Default for FakeManager {
    fn default() -> Self {
        FakeManager {
            masked: Vec::new(),
            // systemd's default.
            burst_action: "reboot-force".to_owned(),
        }
    }
}

/// Recording fake of [`LockdownSys`]. It also plays the kernel against a [`super::Paths`]
/// tree when built with [`FakeLockdownSys::with_kernel`]: a loaded module appears in
/// `sys/module`, `swapoff` removes the line from the swaps file, a mount is appended to the
/// mount table, Ctrl-Alt-Del off writes `0` to `kernel/ctrl-alt-del`, and stdin points to
/// the null device in `proc_self_fd`. It plays systemd too, for commands no script answers:
/// `systemctl daemon-reload` loads the `/dev/null` links of `systemd_control`,
/// `daemon-reexec` also the `CtrlAltDelBurstAction=` of `manager_conf`, and `systemctl show
/// -p LoadState|CtrlAltDelBurstAction --value [unit]` answers from what was loaded (`masked`
/// for a unit or its template masked, `loaded` otherwise). So `apply` followed by
/// `self_check` is tested end to end, and a test proves the self-check catches a kernel that
/// ignores a write by leaving [`FakeLockdownSys::with_kernel`] out.
#[derive(Debug)]
pub struct FakeLockdownSys {
    release: String,
    kernel: Option<super::Paths>,
    state: Mutex<FakeState>,
}

impl FakeLockdownSys {
    /// A fake whose kernel release is `release`, with no simulated kernel.
    pub fn new(release: &str) -> Self {
        FakeLockdownSys {
            release: release.to_owned(),
            kernel: None,
            state: Mutex::new(FakeState {
                console_receives: Some(true),
                ..FakeState::default()
            }),
        }
    }

    /// Simulates the kernel's side of each effect in the files of `paths`.
    pub fn with_kernel(mut self, paths: &super::Paths) -> Self {
        self.kernel = Some(paths.clone());
        self
    }

    fn state(&self) -> MutexGuard<'_, FakeState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Every call so far, in order.
    pub fn calls(&self) -> Vec<LockdownCall> {
        self.state().calls.clone()
    }

    /// Makes every operation whose name (`finit_module`, `swapoff`, `mount`,
    /// `disable_ctrl_alt_del`, `stdin_to_null`, `console_receiver_off`, `run`) is `op` fail
    /// with `errno` (`console_receiver_off` also fails `console_receives`: same device).
    pub fn fail(&self, op: &str, errno: i32) {
        self.state().fail.push((op.to_owned(), errno));
    }

    /// Queues outputs for commands starting with `prefix` (e.g. `["loginctl",
    /// "list-sessions"]`). Unscripted commands succeed with no output.
    pub fn script(&self, prefix: &[&str], outputs: Vec<io::Result<CommandOutput>>) {
        self.state().scripts.push(Script {
            prefix: prefix.iter().map(|s| (*s).to_owned()).collect(),
            outputs: outputs.into(),
        });
    }

    /// What [`LockdownSys::console_receives`] answers before `console_receiver_off` is called
    /// (`None`: not a terminal). Default: a receiving terminal.
    pub fn set_console(&self, receives: Option<bool>) {
        self.state().console_receives = receives;
    }

    fn record(&self, op: &str, call: LockdownCall) -> io::Result<()> {
        let mut state = self.state();
        state.calls.push(call);
        match state.fail.iter().find(|(name, _)| name == op) {
            Some((_, errno)) => Err(io::Error::from_raw_os_error(*errno)),
            None => Ok(()),
        }
    }

    fn kernel(&self, effect: impl FnOnce(&super::Paths) -> io::Result<()>) -> io::Result<()> {
        match &self.kernel {
            Some(paths) => effect(paths),
            None => Ok(()),
        }
    }
}

impl LockdownSys for FakeLockdownSys {
    fn kernel_release(&self) -> io::Result<String> {
        Ok(self.release.clone())
    }

    fn finit_module(&self, path: &Path, compressed: bool) -> io::Result<()> {
        self.record(
            "finit_module",
            LockdownCall::FinitModule {
                path: path.to_path_buf(),
                compressed,
            },
        )?;
        std::fs::metadata(path)?;
        self.kernel(|paths| {
            let name = path
                .file_name()
                .map(|n| super::module_name(&n.to_string_lossy()))
                .unwrap_or_default();
            std::fs::create_dir_all(paths.sys_module.join(name))
        })
    }

    fn swapoff(&self, path: &Path) -> io::Result<()> {
        self.record("swapoff", LockdownCall::Swapoff(path.to_path_buf()))?;
        self.kernel(|paths| {
            let text = std::fs::read_to_string(&paths.proc_swaps)?;
            let kept: Vec<&str> = text
                .lines()
                .filter(|line| {
                    line.split_whitespace()
                        .next()
                        .map(super::mountinfo::unescape)
                        .as_deref()
                        != Some(&path.to_string_lossy())
                })
                .collect();
            std::fs::write(&paths.proc_swaps, kept.join("\n") + "\n")
        })
    }

    fn mount(
        &self,
        source: Option<&str>,
        target: &Path,
        fstype: Option<&str>,
        flags: MsFlags,
        data: Option<&str>,
    ) -> io::Result<()> {
        self.record(
            "mount",
            LockdownCall::Mount {
                source: source.map(str::to_owned),
                target: target.to_path_buf(),
                fstype: fstype.map(str::to_owned),
                flags,
                data: data.map(str::to_owned),
            },
        )?;
        self.kernel(|paths| {
            use std::io::Write;
            let mut table = std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .open(&paths.mountinfo)?;
            let mut options = vec![if flags.contains(MsFlags::MS_RDONLY) {
                "ro"
            } else {
                "rw"
            }];
            for (flag, name) in [
                (MsFlags::MS_NOSUID, "nosuid"),
                (MsFlags::MS_NODEV, "nodev"),
                (MsFlags::MS_NOEXEC, "noexec"),
            ] {
                if flags.contains(flag) {
                    options.push(name);
                }
            }
            let fstype = fstype.unwrap_or("tmpfs");
            writeln!(
                table,
                "99 1 0:99 / {} {} - {fstype} {} rw",
                super::mountinfo::escape(&target.to_string_lossy()),
                options.join(","),
                source.unwrap_or(fstype)
            )
        })
    }

    fn disable_ctrl_alt_del(&self) -> io::Result<()> {
        self.record("disable_ctrl_alt_del", LockdownCall::DisableCtrlAltDel)?;
        self.kernel(|paths| std::fs::write(paths.proc_sys.join("kernel/ctrl-alt-del"), "0\n"))
    }

    fn stdin_to_null(&self, dev_null: &Path) -> io::Result<()> {
        self.record(
            "stdin_to_null",
            LockdownCall::StdinToNull(dev_null.to_path_buf()),
        )?;
        self.kernel(|paths| {
            let fd0 = paths.proc_self_fd.join("0");
            let _ = std::fs::remove_file(&fd0);
            std::os::unix::fs::symlink(dev_null, fd0)
        })
    }

    fn console_receiver_off(&self, console: &Path) -> io::Result<bool> {
        self.record(
            "console_receiver_off",
            LockdownCall::ConsoleReceiverOff(console.to_path_buf()),
        )?;
        let mut state = self.state();
        match state.console_receives {
            None => Ok(false),
            Some(_) => {
                if self.kernel.is_some() {
                    state.console_receives = Some(false);
                }
                Ok(true)
            }
        }
    }

    fn console_receives(&self, _console: &Path) -> io::Result<Option<bool>> {
        let state = self.state();
        // The same console device: a failure told for turning it off fails reading it too.
        match state
            .fail
            .iter()
            .find(|(name, _)| name == "console_receiver_off")
        {
            Some((_, errno)) => Err(io::Error::from_raw_os_error(*errno)),
            None => Ok(state.console_receives),
        }
    }

    fn run(&self, program: &str, args: &[&str]) -> io::Result<CommandOutput> {
        let line: Vec<String> = std::iter::once(program)
            .chain(args.iter().copied())
            .map(str::to_owned)
            .collect();
        self.record("run", LockdownCall::Run(line.clone()))?;
        let mut state = self.state();
        let script = state
            .scripts
            .iter_mut()
            .find(|s| line.starts_with(&s.prefix));
        match script {
            None => {
                let stdout = match &self.kernel {
                    Some(paths) => play_systemd(paths, &mut state.manager, &line)?,
                    None => String::new(),
                };
                Ok(CommandOutput {
                    code: Some(0),
                    stdout,
                    ..CommandOutput::default()
                })
            }
            Some(script) => {
                let next = if script.outputs.len() > 1 {
                    script.outputs.pop_front()
                } else {
                    script.outputs.front().map(|o| match o {
                        Ok(out) => Ok(out.clone()),
                        Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
                    })
                };
                next.unwrap_or_else(|| Ok(CommandOutput::default()))
            }
        }
    }

    fn pause(&self, _duration: Duration) {}
}

/// The simulated systemd's answer to `line` (empty for commands it does not play).
fn play_systemd(
    paths: &super::Paths,
    manager: &mut FakeManager,
    line: &[String],
) -> io::Result<String> {
    let words: Vec<&str> = line.iter().map(String::as_str).collect();
    let load_masks = |manager: &mut FakeManager| -> io::Result<()> {
        manager.masked.clear();
        let entries = match std::fs::read_dir(&paths.systemd_control) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            if std::fs::read_link(entry.path()).is_ok_and(|t| t == Path::new("/dev/null")) {
                manager
                    .masked
                    .push(entry.file_name().to_string_lossy().into_owned());
            }
        }
        Ok(())
    };
    match words.as_slice() {
        ["systemctl", "daemon-reload"] => load_masks(manager)?,
        ["systemctl", "daemon-reexec"] => {
            load_masks(manager)?;
            *manager = FakeManager {
                masked: std::mem::take(&mut manager.masked),
                ..FakeManager::default()
            };
            if let Ok(text) = std::fs::read_to_string(&paths.manager_conf) {
                if let Some(value) = text
                    .lines()
                    .find_map(|l| l.trim().strip_prefix("CtrlAltDelBurstAction="))
                {
                    manager.burst_action = value.trim().to_owned();
                }
            }
        }
        ["systemctl", "show", "-p", "LoadState", "--value", unit] => {
            let template = unit
                .split_once('@')
                .and_then(|(name, rest)| Some(format!("{name}@.{}", rest.rsplit_once('.')?.1)));
            let masked = manager
                .masked
                .iter()
                .any(|m| m == unit || Some(m) == template.as_ref());
            return Ok(if masked { "masked\n" } else { "loaded\n" }.to_owned());
        }
        ["systemctl", "show", "-p", "CtrlAltDelBurstAction", "--value"] => {
            return Ok(format!("{}\n", manager.burst_action));
        }
        _ => {}
    }
    Ok(String::new())
}
