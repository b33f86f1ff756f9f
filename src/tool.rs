//! External tools: the one way cvm-warden runs another program before the workload.
//!
//! Every tool is one of [`Tool`]'s fixed list, found at the first of its fixed absolute
//! paths that is an executable regular file — never through `PATH` (PID 1 started by a
//! kernel has none, and an inherited one is not ours to trust). [`Tools::run`] starts it in
//! its own process group with a clean environment ([`TOOL_ENV`]), `/` as its working
//! directory, the given bytes on a pipe as standard input (or `/dev/null`), and standard
//! output and error captured up to a bound. A tool that does not finish within its timeout
//! is killed with its process group and reaped, and the caller gets
//! [`ToolError::Timeout`]: a hung tool fails the stage, it never hangs PID 1. When a tool
//! exits, whatever it left running in its process group is killed too.
//!
//! [`Tools::audited`] writes one audit record (`tool/resolved`: name, absolute path,
//! timeout) the first time each tool is found, before it first runs; the path is then kept
//! for the rest of the process, so every later run uses the recorded file.
//!
//! Tests point a tool at a script with [`Tools::with_candidates`] and shorten its timeout
//! with [`Tools::with_timeout`]. Nothing in a boot calls them: the CLI wires
//! [`Tools::system`], and neither the policy nor the environment can change a path.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fmt;
use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{killpg, Signal};
use nix::sys::wait::{waitid, Id, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use serde::Serialize;
use serde_json::json;

use crate::audit::{Audit, AuditError};

/// The whole environment a tool gets: nothing is inherited.
pub const TOOL_ENV: [(&str, &str); 2] =
    [("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), ("LC_ALL", "C")];

/// Default bound on what a tool may print on standard output (more is an error).
pub const STDOUT_LIMIT: usize = 16 * 1024 * 1024;
/// Default bound on what is kept of a tool's standard error (more is cut).
pub const STDERR_LIMIT: usize = 64 * 1024;
/// How long a killed tool may take to die before it is left to a background reaper.
const KILL_GRACE: Duration = Duration::from_secs(5);
/// How long the output pipes may stay open after the tool's process group is gone.
const OUTPUT_GRACE: Duration = Duration::from_secs(2);

/// The external tools cvm-warden runs: a fixed list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(into = "&'static str")]
pub enum Tool {
    /// `nft` (nftables): firewall transactions and read-back.
    Nft,
    /// `mkfs.ext4` (e2fsprogs): the file system of a freshly formatted volume.
    MkfsExt4,
    /// `systemctl` (systemd): masks, stops and the manager's settings (systemd shape).
    Systemctl,
    /// `loginctl` (systemd): login sessions (systemd shape).
    Loginctl,
}

impl From<Tool> for &'static str {
    fn from(tool: Tool) -> Self {
        tool.name()
    }
}

impl fmt::Display for Tool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl Tool {
    /// Every tool.
    pub const ALL: [Tool; 4] = [Tool::Nft, Tool::MkfsExt4, Tool::Systemctl, Tool::Loginctl];

    /// Its command name.
    pub fn name(self) -> &'static str {
        match self {
            Tool::Nft => "nft",
            Tool::MkfsExt4 => "mkfs.ext4",
            Tool::Systemctl => "systemctl",
            Tool::Loginctl => "loginctl",
        }
    }

    /// The tool called `name`, if it is one of the list.
    pub fn from_name(name: &str) -> Option<Tool> {
        Tool::ALL.into_iter().find(|t| t.name() == name)
    }

    /// Where it may be installed, in the order tried (Debian 12 puts each at the first).
    pub fn candidates(self) -> &'static [&'static str] {
        match self {
            Tool::Nft => &["/usr/sbin/nft", "/sbin/nft", "/usr/bin/nft"],
            Tool::MkfsExt4 => &["/usr/sbin/mkfs.ext4", "/sbin/mkfs.ext4"],
            Tool::Systemctl => &["/usr/bin/systemctl", "/bin/systemctl"],
            Tool::Loginctl => &["/usr/bin/loginctl", "/bin/loginctl"],
        }
    }

    /// The Debian package that installs it.
    pub fn package(self) -> &'static str {
        match self {
            Tool::Nft => "nftables",
            Tool::MkfsExt4 => "e2fsprogs",
            Tool::Systemctl | Tool::Loginctl => "systemd",
        }
    }

    /// How long one run may take by default.
    pub fn default_timeout(self) -> Duration {
        match self {
            Tool::Nft => Duration::from_secs(30),
            // A large volume on a slow disk.
            Tool::MkfsExt4 => Duration::from_secs(600),
            // A daemon-reexec or a stop waits for the manager; systemd's own default
            // stop timeout is 90 s.
            Tool::Systemctl => Duration::from_secs(90),
            Tool::Loginctl => Duration::from_secs(30),
        }
    }
}

/// `1.5 s`, `250 ms`: a duration for people.
fn human(duration: Duration) -> String {
    if duration < Duration::from_secs(1) {
        format!("{} ms", duration.as_millis())
    } else if duration.subsec_millis() == 0 {
        format!("{} s", duration.as_secs())
    } else {
        format!("{:.1} s", duration.as_secs_f64())
    }
}

/// Why a candidate path was not used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tried {
    /// The path.
    pub path: PathBuf,
    /// Why not: `not found`, `not a regular file`, `not executable`, …
    pub why: String,
}

impl fmt::Display for Tried {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.path.display(), self.why)
    }
}

fn list(tried: &[Tried]) -> String {
    tried
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// A tool could not be run to completion.
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    /// None of the tool's paths holds an executable file.
    #[error(
        "{tool} is not installed: tried {} (cvm-warden never searches PATH); install the \
         Debian package {package} in the image",
        list(tried)
    )]
    NotFound {
        /// The tool.
        tool: Tool,
        /// Every path tried, with why it was not used.
        tried: Vec<Tried>,
        /// The package that installs it.
        package: &'static str,
    },
    /// The audit record of the tool's path could not be written, so it was not run.
    #[error("{tool} was not run: the audit record of its path {} could not be written", path.display())]
    Audit {
        /// The tool.
        tool: Tool,
        /// Its path.
        path: PathBuf,
        /// Why.
        #[source]
        source: AuditError,
    },
    /// The kernel refused to start it.
    #[error("cannot start `{command}` ({})", path.display())]
    Spawn {
        /// The command line.
        command: String,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A helper thread (stdin writer, output readers) could not be started; the tool was
    /// killed.
    #[error("cannot run `{command}` ({}): no thread for its input and output", path.display())]
    Thread {
        /// The command line.
        command: String,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Waiting for it failed.
    #[error("cannot wait for `{command}` ({})", path.display())]
    Wait {
        /// The command line.
        command: String,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// It did not finish in time and was killed with its process group.
    #[error(
        "`{command}` ({}) did not finish within {}: {}; the step fails closed. Run the same \
         command in the image to see why {tool} hangs (a missing kernel feature, a stuck \
         service manager, a device that does not answer)",
        path.display(),
        human(*timeout),
        if *reaped { "it was killed with its process group" } else { "it was killed but has not died yet (stuck in the kernel); a background thread reaps it" }
    )]
    Timeout {
        /// The tool.
        tool: Tool,
        /// The command line.
        command: String,
        /// The file.
        path: PathBuf,
        /// The limit.
        timeout: Duration,
        /// Whether it died and was reaped before this error was returned.
        reaped: bool,
    },
    /// It printed more on standard output than cvm-warden reads.
    #[error(
        "`{command}` ({}) printed more than {limit} bytes on standard output; its output was \
         not used. Check what the tool prints when run by hand in the image",
        path.display()
    )]
    OutputTooLarge {
        /// The command line.
        command: String,
        /// The file.
        path: PathBuf,
        /// The bound.
        limit: usize,
    },
    /// It exited, but something it started outside its process group still holds its output.
    #[error(
        "`{command}` ({}) exited but its output stayed open for {}: a process it started \
         (outside its process group) holds it; its output was not used",
        path.display(),
        human(OUTPUT_GRACE)
    )]
    OutputHeld {
        /// The command line.
        command: String,
        /// The file.
        path: PathBuf,
    },
    /// Reading its output failed.
    #[error("cannot read the output of `{command}` ({})", path.display())]
    Read {
        /// The command line.
        command: String,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

impl ToolError {
    /// The closest `io::ErrorKind` (for seams that speak `io::Error`): `NotFound` for a tool
    /// that is not installed, `TimedOut` for one that hung.
    pub fn kind(&self) -> io::ErrorKind {
        match self {
            ToolError::NotFound { .. } => io::ErrorKind::NotFound,
            ToolError::Timeout { .. } => io::ErrorKind::TimedOut,
            ToolError::OutputTooLarge { .. } => io::ErrorKind::InvalidData,
            _ => io::ErrorKind::Other,
        }
    }
}

impl From<ToolError> for io::Error {
    fn from(error: ToolError) -> Self {
        io::Error::new(error.kind(), error)
    }
}

/// What a tool printed and how it ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolOutput {
    /// The file that ran.
    pub path: PathBuf,
    /// How it ended.
    pub status: ExitStatus,
    /// Its standard output (whole: more than the bound is an error).
    pub stdout: Vec<u8>,
    /// Its standard error, up to the bound.
    pub stderr: Vec<u8>,
    /// Whether standard error was cut at the bound.
    pub stderr_cut: bool,
}

impl ToolOutput {
    /// Exit code 0.
    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// Standard error as text, trimmed, with a note when it was cut.
    pub fn stderr_text(&self) -> String {
        let text = String::from_utf8_lossy(&self.stderr).trim().to_string();
        if self.stderr_cut {
            format!("{text} … (cut at {} bytes)", self.stderr.len())
        } else {
            text
        }
    }
}

/// The tool runner: the fixed table, per-tool timeouts, output bounds and (in a boot) the
/// audit log. Clones share the paths found so far.
#[derive(Debug, Clone)]
pub struct Tools {
    candidates: BTreeMap<Tool, Vec<PathBuf>>,
    timeouts: BTreeMap<Tool, Duration>,
    stdout_limit: usize,
    stderr_limit: usize,
    audit: Option<Audit>,
    resolved: Arc<Mutex<BTreeMap<Tool, PathBuf>>>,
}

impl Default for Tools {
    fn default() -> Self {
        Self::system()
    }
}

impl Tools {
    /// The fixed table ([`Tool::candidates`]), default timeouts and bounds, no audit.
    pub fn system() -> Self {
        Tools {
            candidates: BTreeMap::new(),
            timeouts: BTreeMap::new(),
            stdout_limit: STDOUT_LIMIT,
            stderr_limit: STDERR_LIMIT,
            audit: None,
            resolved: Arc::new(Mutex::new(BTreeMap::new())),
        }
    }

    /// Writes `tool/resolved` to `audit` the first time each tool is found, before it runs;
    /// a tool whose record cannot be written is not run.
    pub fn audited(mut self, audit: &Audit) -> Self {
        self.audit = Some(audit.clone());
        self.fresh()
    }

    /// For tests: `tool` is looked for at `paths` instead of its fixed ones. A boot never
    /// calls this (nothing in the policy or the environment reaches it).
    pub fn with_candidates<I, P>(mut self, tool: Tool, paths: I) -> Self
    where
        I: IntoIterator<Item = P>,
        P: Into<PathBuf>,
    {
        self.candidates
            .insert(tool, paths.into_iter().map(Into::into).collect());
        self.fresh()
    }

    /// For tests: another timeout for `tool`.
    pub fn with_timeout(mut self, tool: Tool, timeout: Duration) -> Self {
        self.timeouts.insert(tool, timeout);
        self
    }

    /// For tests: other output bounds (standard output, standard error).
    pub fn with_output_limits(mut self, stdout: usize, stderr: usize) -> Self {
        self.stdout_limit = stdout;
        self.stderr_limit = stderr;
        self
    }

    /// A new cache of found paths (the table changed).
    fn fresh(mut self) -> Self {
        self.resolved = Arc::new(Mutex::new(BTreeMap::new()));
        self
    }

    /// `tool`'s timeout.
    pub fn timeout(&self, tool: Tool) -> Duration {
        self.timeouts
            .get(&tool)
            .copied()
            .unwrap_or_else(|| tool.default_timeout())
    }

    fn candidate_paths(&self, tool: Tool) -> Vec<PathBuf> {
        match self.candidates.get(&tool) {
            Some(paths) => paths.clone(),
            None => tool.candidates().iter().map(PathBuf::from).collect(),
        }
    }

    /// The file `tool` runs from: the one found earlier in this process, else the first
    /// candidate that is an executable regular file (recorded in the audit log when
    /// [`Tools::audited`]).
    pub fn resolve(&self, tool: Tool) -> Result<PathBuf, ToolError> {
        let mut resolved = self.resolved.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(path) = resolved.get(&tool) {
            return Ok(path.clone());
        }
        let mut tried = Vec::new();
        let mut found = None;
        for path in self.candidate_paths(tool) {
            match executable(&path) {
                Ok(()) => {
                    found = Some(path);
                    break;
                }
                Err(why) => tried.push(Tried { path, why }),
            }
        }
        let Some(path) = found else {
            return Err(ToolError::NotFound {
                tool,
                tried,
                package: tool.package(),
            });
        };
        if let Some(audit) = &self.audit {
            audit
                .record(
                    "tool",
                    "resolved",
                    json!({
                        "tool": { "name": tool.name(), "path": path },
                        "package": tool.package(),
                        "timeout_ms": u64::try_from(self.timeout(tool).as_millis()).unwrap_or(u64::MAX),
                    }),
                )
                .map_err(|source| ToolError::Audit {
                    tool,
                    path: path.clone(),
                    source,
                })?;
        }
        resolved.insert(tool, path.clone());
        Ok(path)
    }

    /// Runs `tool args…` with `stdin` on a pipe (`None`: `/dev/null`) and waits for it, at
    /// most its timeout. A non-zero exit is not an error here: see [`ToolOutput::status`].
    pub fn run<S: AsRef<OsStr>>(
        &self,
        tool: Tool,
        args: &[S],
        stdin: Option<&[u8]>,
    ) -> Result<ToolOutput, ToolError> {
        let path = self.resolve(tool)?;
        let command = std::iter::once(tool.name().to_string())
            .chain(
                args.iter()
                    .map(|a| a.as_ref().to_string_lossy().into_owned()),
            )
            .collect::<Vec<_>>()
            .join(" ");
        let timeout = self.timeout(tool);
        let mut cmd = Command::new(&path);
        cmd.args(args)
            .env_clear()
            .envs(TOOL_ENV)
            .current_dir("/")
            .process_group(0)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let started = Instant::now();
        let child = cmd.spawn().map_err(|source| ToolError::Spawn {
            command: command.clone(),
            path: path.clone(),
            source,
        })?;
        Running {
            tool,
            command,
            path,
            child,
        }
        .finish(stdin, started + timeout, timeout, self)
    }
}

/// Whether `path` is an executable regular file (following symbolic links); why not.
fn executable(path: &Path) -> Result<(), String> {
    if !path.is_absolute() {
        return Err("not an absolute path".to_string());
    }
    match std::fs::metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err("not found".to_string()),
        Err(e) => Err(e.to_string()),
        Ok(meta) if !meta.is_file() => Err("not a regular file".to_string()),
        Ok(meta) if meta.permissions().mode() & 0o111 == 0 => Err("not executable".to_string()),
        Ok(_) => Ok(()),
    }
}

/// Which output stream a reader thread drained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stream {
    Stdout,
    Stderr,
}

type Drained = (Stream, io::Result<(Vec<u8>, bool)>);

/// Reads `pipe` to its end, keeping the first `limit` bytes (and whether there was more).
fn drain(mut pipe: impl Read, limit: usize) -> io::Result<(Vec<u8>, bool)> {
    let mut kept = Vec::new();
    let mut cut = false;
    let mut buf = [0u8; 8192];
    loop {
        match pipe.read(&mut buf) {
            Ok(0) => return Ok((kept, cut)),
            Ok(n) => {
                let room = limit.saturating_sub(kept.len());
                if n > room {
                    cut = true;
                }
                kept.extend_from_slice(&buf[..n.min(room)]);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Waits until our child `pid` has exited, without reaping it (its process group id stays
/// ours), until `deadline`: `Ok(true)` when it has exited, `Ok(false)` at the deadline.
fn wait_exit(pid: Pid, deadline: Instant) -> io::Result<bool> {
    let mut pause = Duration::from_millis(1);
    loop {
        match waitid(
            Id::Pid(pid),
            WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT,
        ) {
            Ok(WaitStatus::StillAlive) => {}
            Ok(_) => return Ok(true),
            Err(Errno::EINTR) => continue,
            Err(errno) => return Err(errno.into()),
        }
        let now = Instant::now();
        if now >= deadline {
            return Ok(false);
        }
        std::thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}

fn pid_of(child: &Child) -> Pid {
    Pid::from_raw(i32::try_from(child.id()).unwrap_or(i32::MAX))
}

/// SIGKILL to the tool's process group, then reap it, waiting at most [`KILL_GRACE`]: a
/// tool that has not died by then (stuck in the kernel) is left to a reaper thread, so it
/// never stays a zombie and never holds up the caller. Whether it was reaped here.
fn kill_and_reap(mut child: Child) -> bool {
    let pid = pid_of(&child);
    let _ = killpg(pid, Signal::SIGKILL);
    if matches!(wait_exit(pid, Instant::now() + KILL_GRACE), Ok(true)) {
        return child.wait().is_ok();
    }
    let reaper = std::thread::Builder::new()
        .name("tool-reaper".to_string())
        .spawn(move || {
            let _ = child.wait();
        });
    if let Err(error) = reaper {
        log::warn!("no thread to reap a killed tool (pid {pid}): {error}");
    }
    false
}

/// A started tool: from here on it is always killed and reaped, or handed to a reaper.
struct Running {
    tool: Tool,
    command: String,
    path: PathBuf,
    child: Child,
}

impl Running {
    /// Starts the helper threads, waits (bounded), kills, reaps and collects the output.
    fn finish(
        self,
        stdin: Option<&[u8]>,
        deadline: Instant,
        timeout: Duration,
        tools: &Tools,
    ) -> Result<ToolOutput, ToolError> {
        let Running {
            tool,
            command,
            path,
            mut child,
        } = self;
        let pid = pid_of(&child);
        let (tx, rx) = mpsc::channel::<Drained>();
        if let Err(source) = start_helpers(tool, &mut child, stdin, tools, &tx) {
            kill_and_reap(child);
            return Err(ToolError::Thread {
                command,
                path,
                source,
            });
        }
        drop(tx);

        let exited = match wait_exit(pid, deadline) {
            Ok(exited) => exited,
            Err(source) => {
                kill_and_reap(child);
                return Err(ToolError::Wait {
                    command,
                    path,
                    source,
                });
            }
        };
        if !exited {
            let reaped = kill_and_reap(child);
            log::error!(
                "`{command}` ({}) did not finish within {}; killed",
                path.display(),
                human(timeout)
            );
            return Err(ToolError::Timeout {
                tool,
                command,
                path,
                timeout,
                reaped,
            });
        }
        // The tool has exited but is not reaped yet, so its process group id is still
        // ours: whatever it left running in its group goes too.
        let _ = killpg(pid, Signal::SIGKILL);
        let status = match child.wait() {
            Ok(status) => status,
            Err(source) => {
                return Err(ToolError::Wait {
                    command,
                    path,
                    source,
                })
            }
        };

        let mut stdout = None;
        let mut stderr = None;
        let output_deadline = Instant::now() + OUTPUT_GRACE;
        while stdout.is_none() || stderr.is_none() {
            let left = output_deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok((stream, Ok(drained))) => match stream {
                    Stream::Stdout => stdout = Some(drained),
                    Stream::Stderr => stderr = Some(drained),
                },
                Ok((_, Err(source))) => {
                    return Err(ToolError::Read {
                        command,
                        path,
                        source,
                    })
                }
                Err(_) => return Err(ToolError::OutputHeld { command, path }),
            }
        }
        let (stdout, stdout_cut) = stdout.unwrap_or_default();
        let (stderr, stderr_cut) = stderr.unwrap_or_default();
        if stdout_cut {
            return Err(ToolError::OutputTooLarge {
                command,
                path,
                limit: tools.stdout_limit,
            });
        }
        Ok(ToolOutput {
            path,
            status,
            stdout,
            stderr,
            stderr_cut,
        })
    }
}

/// The stdin writer and the two output readers of `child`.
fn start_helpers(
    tool: Tool,
    child: &mut Child,
    stdin: Option<&[u8]>,
    tools: &Tools,
    tx: &mpsc::Sender<Drained>,
) -> io::Result<()> {
    if let (Some(data), Some(mut pipe)) = (stdin, child.stdin.take()) {
        let data = data.to_vec();
        std::thread::Builder::new()
            .name(format!("{tool}-stdin"))
            .spawn(move || {
                // A tool that exits early shows it in its status and stderr; a write error
                // adds nothing. The pipe closes when this thread ends.
                let _ = pipe.write_all(&data);
            })?;
    }
    let reader = |stream: Stream, pipe: Option<Box<dyn Read + Send>>, limit: usize| {
        let tx = tx.clone();
        match pipe {
            None => {
                let _ = tx.send((stream, Ok((Vec::new(), false))));
                Ok(())
            }
            Some(pipe) => std::thread::Builder::new()
                .name(format!("{tool}-{stream:?}"))
                .spawn(move || {
                    let _ = tx.send((stream, drain(pipe, limit)));
                })
                .map(drop),
        }
    };
    reader(
        Stream::Stdout,
        child
            .stdout
            .take()
            .map(|p: ChildStdout| Box::new(p) as Box<dyn Read + Send>),
        tools.stdout_limit,
    )?;
    reader(
        Stream::Stderr,
        child
            .stderr
            .take()
            .map(|p: ChildStderr| Box::new(p) as Box<dyn Read + Send>),
        tools.stderr_limit,
    )?;
    Ok(())
}

/// Fake tools for tests.
#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
pub(crate) mod testing {
    use std::path::{Path, PathBuf};
    use std::time::{Duration, Instant};

    /// Writes an executable `#!/bin/sh` script `name` with `body` into `dir`. The file is
    /// written by `install(1)`, in another process: a file this (multi-threaded) test process
    /// had open for writing could be inherited by a concurrent fork and make the exec fail
    /// with ETXTBSY.
    pub(crate) fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
        let draft = dir.join(format!("{name}.draft"));
        std::fs::write(&draft, format!("#!/bin/sh\n{body}\n")).unwrap();
        let path = dir.join(name);
        let status = std::process::Command::new("/usr/bin/install")
            .args(["-m", "0755"])
            .arg(&draft)
            .arg(&path)
            .status()
            .unwrap();
        assert!(status.success(), "install {}", path.display());
        path
    }

    /// A fake that records its pid and its child's pid in `dir/pids`, then waits forever.
    pub(crate) fn hanging(dir: &Path, name: &str) -> PathBuf {
        let pids = dir.join("pids");
        script(
            dir,
            name,
            &format!(
                "echo $$ > '{p}'\nsleep 100000 &\necho $! >> '{p}'\nwait",
                p = pids.display()
            ),
        )
    }

    /// The pids [`hanging`] wrote (waits for both).
    pub(crate) fn hanging_pids(dir: &Path) -> Vec<i32> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let pids: Vec<i32> = std::fs::read_to_string(dir.join("pids"))
                .unwrap_or_default()
                .lines()
                .filter_map(|l| l.trim().parse().ok())
                .collect();
            if pids.len() == 2 || Instant::now() > deadline {
                return pids;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Whether `pid` is a live process (a zombie is not).
    pub(crate) fn alive(pid: i32) -> bool {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => false,
            Ok(stat) => {
                let state = stat
                    .rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().next());
                !matches!(state, Some("Z") | Some("X"))
            }
        }
    }

    /// Waits (up to 5 s) until none of `pids` is alive; the ones still alive.
    pub(crate) fn left_alive(pids: &[i32]) -> Vec<i32> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let left: Vec<i32> = pids.iter().copied().filter(|p| alive(*p)).collect();
            if left.is_empty() || Instant::now() > deadline {
                return left;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::testing::{hanging, hanging_pids, left_alive, script};
    use super::*;
    use crate::audit::MemorySink;

    fn lines(out: &ToolOutput) -> Vec<String> {
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn every_tool_has_absolute_candidates_a_package_and_a_timeout() {
        for tool in Tool::ALL {
            assert_eq!(Tool::from_name(tool.name()), Some(tool));
            assert!(!tool.candidates().is_empty(), "{tool}");
            for path in tool.candidates() {
                assert!(Path::new(path).is_absolute(), "{tool}: {path}");
                assert!(
                    path.ends_with(&format!("/{}", tool.name())),
                    "{tool}: {path}"
                );
            }
            assert!(!tool.package().is_empty());
            assert!(tool.default_timeout() >= Duration::from_secs(30), "{tool}");
        }
        assert_eq!(Tool::Nft.candidates()[0], "/usr/sbin/nft");
        assert_eq!(Tool::MkfsExt4.default_timeout(), Duration::from_secs(600));
        assert_eq!(Tool::from_name("sh"), None);
    }

    #[test]
    fn a_tool_that_hangs_is_killed_with_its_process_group_within_its_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let fake = hanging(dir.path(), "nft");
        let tools = Tools::system()
            .with_candidates(Tool::Nft, [&fake])
            .with_timeout(Tool::Nft, Duration::from_millis(300));
        let started = Instant::now();
        let err = tools
            .run(Tool::Nft, &["-j", "-f", "-"], Some(b"{}".as_slice()))
            .unwrap_err();
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(300), "{took:?}");
        assert!(took < Duration::from_secs(5), "{took:?}");
        assert!(
            matches!(
                err,
                ToolError::Timeout {
                    tool: Tool::Nft,
                    reaped: true,
                    ..
                }
            ),
            "{err:?}"
        );
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        let text = err.to_string();
        for part in [
            "`nft -j -f -`",
            &fake.display().to_string(),
            "did not finish within 300 ms",
            "killed with its process group",
            "fails closed",
        ] {
            assert!(text.contains(part), "{part}: {text}");
        }
        // The script and the sleep it started are both gone (the script reaped by us).
        let pids = hanging_pids(dir.path());
        assert_eq!(pids.len(), 2, "{pids:?}");
        assert_eq!(left_alive(&pids), Vec::<i32>::new());
        assert!(
            !Path::new(&format!("/proc/{}", pids[0])).exists(),
            "not reaped"
        );
    }

    #[test]
    fn a_missing_tool_names_every_path_tried_and_its_package() {
        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("plain");
        std::fs::write(&plain, "#!/bin/sh\n").unwrap();
        let missing = dir.path().join("missing");
        let tools = Tools::system().with_candidates(
            Tool::Nft,
            [
                missing.clone(),
                plain.clone(),
                dir.path().to_path_buf(),
                PathBuf::from("nft"),
            ],
        );
        let err = tools.run(Tool::Nft, &["--version"], None).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert_eq!(
            err.to_string(),
            format!(
                "nft is not installed: tried {} (not found), {} (not executable), {} (not a \
                 regular file), nft (not an absolute path) (cvm-warden never searches PATH); \
                 install the Debian package nftables in the image",
                missing.display(),
                plain.display(),
                dir.path().display()
            )
        );
    }

    #[test]
    fn the_environment_is_replaced_and_stdin_goes_through_a_pipe() {
        // `env` prints exactly the environment it got.
        let tools = Tools::system().with_candidates(Tool::Loginctl, ["/usr/bin/env"]);
        let out = tools.run::<&str>(Tool::Loginctl, &[], None).unwrap();
        assert!(out.success());
        let mut env = lines(&out);
        env.sort();
        assert_eq!(env, ["LC_ALL=C", "PATH=/usr/sbin:/usr/bin:/sbin:/bin"]);
        assert!(
            std::env::vars().count() > 2,
            "the test's own environment is bigger"
        );

        // Standard input: 1 MiB through the pipe and back (more than a pipe buffer, so the
        // writer and the readers must run side by side).
        let dir = tempfile::tempdir().unwrap();
        let cat = script(dir.path(), "nft", "exec /bin/cat");
        let tools = Tools::system().with_candidates(Tool::Nft, [&cat]);
        let input: Vec<u8> = (0..1024 * 1024).map(|i| (i % 251) as u8).collect();
        let out = tools.run(Tool::Nft, &["-f", "-"], Some(&input)).unwrap();
        assert_eq!(out.stdout, input);
        assert_eq!(out.path, cat);
        // No stdin given: /dev/null, so a reader ends at once.
        let out = tools.run::<&str>(Tool::Nft, &[], None).unwrap();
        assert!(out.stdout.is_empty());
    }

    #[test]
    fn output_is_bounded_and_exit_status_and_stderr_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let loud = script(
            dir.path(),
            "mkfs.ext4",
            "head -c \"$1\" /dev/zero\nhead -c 5000 /dev/zero | tr '\\0' e >&2\nexit 3",
        );
        let tools = Tools::system()
            .with_candidates(Tool::MkfsExt4, [&loud])
            .with_output_limits(1000, 100);
        let out = tools.run(Tool::MkfsExt4, &["1000"], None).unwrap();
        assert_eq!(out.status.code(), Some(3));
        assert!(!out.success());
        assert_eq!(out.stdout.len(), 1000);
        assert_eq!(out.stderr.len(), 100);
        assert!(out.stderr_cut);
        assert_eq!(
            out.stderr_text(),
            format!("{} … (cut at 100 bytes)", "e".repeat(100))
        );

        let err = tools.run(Tool::MkfsExt4, &["1001"], None).unwrap_err();
        assert!(
            matches!(err, ToolError::OutputTooLarge { limit: 1000, .. }),
            "{err:?}"
        );
        assert!(
            err.to_string().contains("printed more than 1000 bytes"),
            "{err}"
        );
    }

    #[test]
    fn what_a_tool_leaves_running_in_its_group_is_killed_when_it_exits() {
        let dir = tempfile::tempdir().unwrap();
        // The background sleep keeps standard output open: without the group kill the
        // output would never end.
        let leaver = script(dir.path(), "systemctl", "sleep 100000 &\necho $!\nexit 0");
        let tools = Tools::system().with_candidates(Tool::Systemctl, [&leaver]);
        let started = Instant::now();
        let out = tools.run(Tool::Systemctl, &["stop"], None).unwrap();
        assert!(started.elapsed() < OUTPUT_GRACE, "{:?}", started.elapsed());
        assert!(out.success());
        let pid: i32 = lines(&out)[0].parse().unwrap();
        assert_eq!(left_alive(&[pid]), Vec::<i32>::new());
    }

    #[test]
    fn the_first_resolution_of_each_tool_is_audited_and_its_path_kept() {
        let (sink, records) = MemorySink::new();
        let audit = Audit::new(vec![Box::new(sink)], true);
        let dir = tempfile::tempdir().unwrap();
        let first = script(dir.path(), "nft", "echo one");
        let tools = Tools::system()
            .with_candidates(Tool::Nft, [&first])
            .with_timeout(Tool::Nft, Duration::from_millis(1500))
            .audited(&audit);
        let clone = tools.clone();
        assert_eq!(
            lines(&tools.run::<&str>(Tool::Nft, &[], None).unwrap()),
            ["one"]
        );
        assert_eq!(
            lines(&clone.run::<&str>(Tool::Nft, &[], None).unwrap()),
            ["one"]
        );
        let records: Vec<serde_json::Value> = records
            .lock()
            .unwrap()
            .iter()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(records.len(), 1, "{records:?}");
        assert_eq!(records[0]["stage"], "tool");
        assert_eq!(records[0]["event"], "resolved");
        assert_eq!(
            records[0]["details"],
            json!({
                "tool": { "name": "nft", "path": first },
                "package": "nftables",
                "timeout_ms": 1500,
            })
        );
    }

    #[test]
    fn a_tool_whose_path_cannot_be_audited_is_not_run() {
        let sink = MemorySink::new().0.required(true);
        let control = sink.control();
        let audit = Audit::new(vec![Box::new(sink)], true);
        control.fail_always(io::ErrorKind::PermissionDenied);
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("ran");
        let fake = script(dir.path(), "nft", &format!("touch '{}'", marker.display()));
        let tools = Tools::system()
            .with_candidates(Tool::Nft, [&fake])
            .audited(&audit);
        let err = tools.run::<&str>(Tool::Nft, &[], None).unwrap_err();
        assert!(
            matches!(
                err,
                ToolError::Audit {
                    tool: Tool::Nft,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(!marker.exists());
    }
}
