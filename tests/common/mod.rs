//! The namespace harness shared by `tests/boot_ns.rs` and `tests/launch_ns.rs`.
//!
//! A [`Run`] is `unshare --pid --fork --mount --mount-proc … --kill-child -- <command>` with its
//! stdout (by line) and stderr collected by threads. Every wait is bounded by the run's limit;
//! on a timeout, and on drop while still running, `unshare` is killed and `--kill-child` takes
//! the namespace down with it.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Fails the test (it does not skip) unless it runs as root.
pub fn require_root(test: &str, why: &str) {
    assert!(
        nix::unistd::geteuid().is_root(),
        "tests/{test}.rs needs root: {why}; run it as root (CI does), e.g. \
         `sudo -E cargo test --test {test}`"
    );
}

/// `unshare --pid --fork --mount --mount-proc <extra> --kill-child --`, ready for the command.
pub fn unshare(extra: &[&str]) -> Command {
    let mut command = Command::new("unshare");
    command
        .args(["--pid", "--fork", "--mount", "--mount-proc"])
        .args(extra)
        .args(["--kill-child", "--"]);
    command
}

/// A namespace run in progress.
pub struct Run {
    child: Child,
    stdout: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<String>>,
    started: Instant,
    limit: Duration,
}

/// How a run ended and what it printed.
#[derive(Debug)]
pub struct Outcome {
    /// The exit status; `None` after a timeout or a signal.
    pub code: Option<i32>,
    pub lines: Vec<String>,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Outcome {
    /// The value of a `/proc/<pid>/status` line `field:\tvalue`.
    pub fn status_field(&self, field: &str) -> &str {
        let prefix = format!("{field}:");
        self.lines
            .iter()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
            .unwrap_or_else(|| panic!("no {field} in {self:#?}"))
            .trim()
    }
}

impl Run {
    /// Spawns `command` (from [`unshare`]) with piped output, bounded by `limit`.
    pub fn spawn(mut command: Command, limit: Duration) -> Run {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run unshare (util-linux): {e}"));
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let (out, lines) = (child.stdout.take().unwrap(), Arc::clone(&stdout));
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                lines.lock().unwrap().push(line);
            }
        });
        let (mut err, text) = (child.stderr.take().unwrap(), Arc::clone(&stderr));
        std::thread::spawn(move || {
            let mut all = String::new();
            let _ = err.read_to_string(&mut all);
            text.lock().unwrap().push_str(&all);
        });
        Run {
            child,
            stdout,
            stderr,
            started: Instant::now(),
            limit,
        }
    }

    /// Waits until `done` holds (bounded; fails the test if the run ends or times out first).
    pub fn wait_until(&mut self, what: &str, done: impl Fn(&Run) -> bool) {
        while !done(self) {
            if self.started.elapsed() > self.limit || self.child.try_wait().unwrap().is_some() {
                let outcome = self.finish_unchecked();
                panic!("{what} never happened: {outcome:#?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether the run has printed a line equal to `line`.
    pub fn has_line(&self, line: &str) -> bool {
        self.stdout.lock().unwrap().iter().any(|l| l == line)
    }

    /// Host pid of the namespace's PID 1: the one child of `unshare`.
    pub fn pid1(&self) -> nix::unistd::Pid {
        let unshare = self.child.id().to_string();
        let children: Vec<i32> = std::fs::read_dir("/proc")
            .unwrap()
            .filter_map(Result::ok)
            .filter_map(|entry| {
                let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
                let close = stat.rfind(')')?;
                if stat[close + 1..].split_whitespace().nth(1)? != unshare {
                    return None;
                }
                entry.file_name().to_str()?.parse().ok()
            })
            .collect();
        match children.as_slice() {
            [pid] => nix::unistd::Pid::from_raw(*pid),
            other => panic!("unshare {unshare} should have one child, has {other:?}"),
        }
    }

    /// Waits for the end (bounded: on a timeout the namespace is killed and `code` is `None`).
    pub fn finish_unchecked(&mut self) -> Outcome {
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break Some(status);
            }
            if self.started.elapsed() > self.limit {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        // Let the reader threads drain the pipes.
        std::thread::sleep(Duration::from_millis(100));
        Outcome {
            code: status.and_then(|s| s.code()),
            lines: self.stdout.lock().unwrap().clone(),
            stderr: self.stderr.lock().unwrap().clone(),
            elapsed: self.started.elapsed(),
        }
    }

    /// Waits for the end (bounded; on a timeout the namespace is killed and the test fails).
    pub fn finish(&mut self) -> Outcome {
        let outcome = self.finish_unchecked();
        assert!(
            outcome.code.is_some(),
            "timed out after {:?} (or killed by a signal): {outcome:#?}",
            self.limit
        );
        outcome
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
