//! The PID 1 supervisor: fork the workload, reap every child (orphans too), forward signals,
//! apply the restart policy, and clean up what the workload left behind.
//!
//! The loop ([`run`]) works on a [`Processes`] seam, so its decisions (restart, forwarding,
//! escalation from SIGTERM to SIGKILL) are unit-tested with a scripted fake; the real
//! implementation is tested as PID 1 of a PID namespace in `tests/launch_ns.rs`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::Signal;
use nix::sys::wait::{waitid, waitpid, Id, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use serde::Serialize;
use serde_json::{json, Value};

use super::{exec_spec, failure_error, LaunchError, LaunchPlan};
use crate::policy::Restart;
use crate::sys::process::{spawn, ExecSpec, SignalPipe, SpawnError};
use crate::sys::{Sys, SysError};

/// How the workload ended, once the supervisor is done.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct WorkloadExit {
    /// Exit status of the last run, or 128 + signal number when a signal ended it.
    pub code: i32,
    /// How many times the workload was restarted.
    pub restarts: u32,
}

/// The shell convention for a wait status: the exit status, or 128 + the signal number.
/// `None` for statuses that do not end a process (stopped, continued, still alive).
pub fn exit_code_from_wait_status(status: WaitStatus) -> Option<i32> {
    match status {
        WaitStatus::Exited(_, code) => Some(code),
        WaitStatus::Signaled(_, signal, _) => Some(128 + signal as i32),
        _ => None,
    }
}

/// Event details of a terminated process.
fn status_details(status: WaitStatus) -> Value {
    match status {
        WaitStatus::Exited(pid, code) => {
            json!({ "pid": pid.as_raw(), "code": code, "status": code })
        }
        WaitStatus::Signaled(pid, signal, core_dumped) => json!({
            "pid": pid.as_raw(),
            "code": 128 + signal as i32,
            "signal": signal.as_str(),
            "core_dumped": core_dumped,
        }),
        other => json!({ "pid": other.pid().map(Pid::as_raw), "status": format!("{other:?}") }),
    }
}

/// Whether a run that ended with `code` is followed by another. Pure.
fn should_restart(restart: Restart, code: i32, restarts_done: u32) -> bool {
    match restart {
        Restart::Never => false,
        Restart::OnFailure { max } => code != 0 && restarts_done < max,
    }
}

/// Signals forwarded to the workload.
const FORWARDED: [Signal; 3] = [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP];

/// SIGTERM and SIGINT ask the whole thing to stop: after the workload ends it is not
/// restarted. SIGHUP (conventionally "reload") is only passed on.
fn is_stop_request(signal: Signal) -> bool {
    matches!(signal, Signal::SIGTERM | Signal::SIGINT)
}

/// Timeouts of the supervisor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Timing {
    /// Between SIGTERM and SIGKILL for the children left after the workload ended.
    grace: Duration,
    /// How long to wait for SIGKILLed children to be reaped before giving up on them.
    kill_wait: Duration,
    /// Pause before a restart (a crash loop must not spin).
    restart_delay: Duration,
    /// Longest single wait, a safety net against a lost wake-up.
    tick: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            grace: Duration::from_secs(5),
            kill_wait: Duration::from_secs(5),
            restart_delay: Duration::from_secs(1),
            tick: Duration::from_secs(1),
        }
    }
}

/// Something the supervisor learned while waiting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Observed {
    /// A signal arrived for the supervisor.
    Signal(Signal),
    /// A child (the workload or an orphan) ended and was reaped.
    Reaped(WaitStatus),
}

/// The process-level effects of the supervisor.
trait Processes {
    /// Starts the workload (privileges dropped, exec'd); its pid.
    fn spawn(&mut self) -> Result<Pid, LaunchError>;
    /// Waits for a signal or a child's end (at most `timeout`), reaps every child that ended.
    fn wait(&mut self, timeout: Duration) -> Result<Vec<Observed>, LaunchError>;
    /// Sends `signal` to `pid` (best effort: it may have just ended).
    fn kill(&mut self, pid: Pid, signal: Signal);
    /// Sends `signal` to every process left: all of our PID namespace when we are its PID 1,
    /// otherwise our children.
    fn kill_remaining(&mut self, signal: Signal);
    /// Whether any child is left to reap.
    fn has_children(&mut self) -> bool;
    /// The time now.
    fn now(&self) -> Instant;
    /// Signals that are neither forwarded nor a stop request: SIGINT for PID 1 of a real
    /// boot, which is how the kernel reports Ctrl-Alt-Del once the lockdown disabled it.
    fn ignored(&self, signal: Signal) -> bool {
        let _ = signal;
        false
    }
}

type Events<'e> = dyn FnMut(&str, Value) + 'e;

/// Supervises the workload until it is done for good. See [`supervise`].
fn run(
    plan: &LaunchPlan,
    procs: &mut dyn Processes,
    events: &mut Events<'_>,
    timing: Timing,
) -> Result<WorkloadExit, LaunchError> {
    let mut restarts = 0u32;
    let mut stop = false;
    loop {
        let pid = match procs.spawn() {
            Ok(pid) => pid,
            Err(error) => {
                terminate_remaining(procs, events, timing, &mut stop);
                return Err(error);
            }
        };
        events(
            "started",
            json!({ "pid": pid.as_raw(), "attempt": restarts + 1, "argv": plan.argv }),
        );
        let (status, code) = match wait_for(pid, procs, events, timing, &mut stop) {
            Ok(ended) => ended,
            Err(error) => {
                procs.kill(pid, Signal::SIGKILL);
                terminate_remaining(procs, events, timing, &mut stop);
                return Err(error);
            }
        };
        events("exited", status_details(status));
        terminate_remaining(procs, events, timing, &mut stop);
        if stop || !should_restart(plan.restart, code, restarts) {
            return Ok(WorkloadExit { code, restarts });
        }
        pause(procs, events, timing, &mut stop);
        if stop {
            return Ok(WorkloadExit { code, restarts });
        }
        restarts += 1;
        let max = match plan.restart {
            Restart::OnFailure { max } => max,
            Restart::Never => 0,
        };
        events(
            "restart",
            json!({ "attempt": restarts, "max": max, "previous_code": code }),
        );
    }
}

/// Reports reaped children other than `workload`; returns the workload's status if it ended.
fn reaped(
    observed: &[Observed],
    workload: Option<Pid>,
    events: &mut Events<'_>,
) -> Option<(WaitStatus, i32)> {
    let mut ended = None;
    for item in observed {
        if let Observed::Reaped(status) = *item {
            match exit_code_from_wait_status(status) {
                Some(code) if status.pid() == workload => ended = Some((status, code)),
                Some(_) => events("orphan_reaped", status_details(status)),
                None => {}
            }
        }
    }
    ended
}

fn wait_for(
    pid: Pid,
    procs: &mut dyn Processes,
    events: &mut Events<'_>,
    timing: Timing,
    stop: &mut bool,
) -> Result<(WaitStatus, i32), LaunchError> {
    loop {
        let observed = procs.wait(timing.tick)?;
        // Reaps first: a signal that arrives together with the workload's end must not be
        // sent to its (now free, possibly reused) pid.
        let ended = reaped(&observed, Some(pid), events);
        for item in &observed {
            if let Observed::Signal(signal) = *item {
                if procs.ignored(signal) {
                    events(
                        "signal_ignored",
                        json!({ "signal": signal.as_str(), "reason": "Ctrl-Alt-Del is disabled: the kernel reports it to PID 1 as SIGINT" }),
                    );
                    continue;
                }
                if !FORWARDED.contains(&signal) {
                    continue;
                }
                *stop |= is_stop_request(signal);
                if ended.is_none() {
                    procs.kill(pid, signal);
                    events(
                        "signal_forwarded",
                        json!({ "signal": signal.as_str(), "pid": pid.as_raw() }),
                    );
                }
            }
        }
        if let Some(ended) = ended {
            return Ok(ended);
        }
    }
}

/// Waits until `deadline` or until no child is left, reaping and reporting; records stop
/// requests. Wait errors end the wait early (best effort: we are cleaning up).
fn drain_until(
    deadline: Instant,
    procs: &mut dyn Processes,
    events: &mut Events<'_>,
    timing: Timing,
    stop: &mut bool,
    until_no_children: bool,
) {
    loop {
        if until_no_children && !procs.has_children() {
            return;
        }
        let now = procs.now();
        if now >= deadline {
            return;
        }
        let Ok(observed) = procs.wait(timing.tick.min(deadline - now)) else {
            return;
        };
        reaped(&observed, None, events);
        for item in &observed {
            if let Observed::Signal(signal) = *item {
                *stop |= !procs.ignored(signal) && is_stop_request(signal);
            }
        }
    }
}

/// After the workload ended: SIGTERM to what is left, a grace period, then SIGKILL; every
/// child is reaped.
fn terminate_remaining(
    procs: &mut dyn Processes,
    events: &mut Events<'_>,
    timing: Timing,
    stop: &mut bool,
) {
    if !procs.has_children() {
        return;
    }
    procs.kill_remaining(Signal::SIGTERM);
    events(
        "terminating",
        json!({ "signal": "SIGTERM", "grace_ms": timing.grace.as_millis() }),
    );
    let deadline = procs.now() + timing.grace;
    drain_until(deadline, procs, events, timing, stop, true);
    if !procs.has_children() {
        return;
    }
    events("terminating", json!({ "signal": "SIGKILL" }));
    let deadline = procs.now() + timing.kill_wait;
    while procs.has_children() && procs.now() < deadline {
        // Again each round: orphans of the killed processes are re-parented to us.
        procs.kill_remaining(Signal::SIGKILL);
        let round = procs.now() + timing.tick.min(Duration::from_millis(100));
        drain_until(round.min(deadline), procs, events, timing, stop, true);
    }
    if procs.has_children() {
        events(
            "children_left",
            json!({ "after_ms": timing.kill_wait.as_millis() }),
        );
    }
}

/// The pause before a restart, reaping and listening for a stop request meanwhile.
fn pause(procs: &mut dyn Processes, events: &mut Events<'_>, timing: Timing, stop: &mut bool) {
    let deadline = procs.now() + timing.restart_delay;
    loop {
        let now = procs.now();
        if *stop || now >= deadline {
            return;
        }
        drain_until(deadline, procs, events, timing, stop, false);
    }
}

/// PID 1 shape: supervises the workload until it is done for good.
///
/// Becomes child subreaper, installs the signal handlers (SIGTERM, SIGINT, SIGHUP, SIGCHLD;
/// see [`SignalPipe`] for why a self-pipe rather than `signalfd`), then forks the workload
/// (privileges dropped in the child; a failure before `execve` comes back as the error).
/// Meanwhile it reaps every child — orphans re-parented to us are reported as
/// `orphan_reaped` — and forwards SIGTERM/SIGINT/SIGHUP to the workload
/// (`signal_forwarded`). Events: `started` {pid, attempt, argv}, `exited` {pid, code,
/// status | signal}, `restart` {attempt, max, previous_code}, `terminating` {signal},
/// `children_left`.
///
/// When the workload ends, whatever it left behind gets SIGTERM, 5 s, then SIGKILL, and is
/// reaped; then the restart policy decides: `on-failure` restarts after a non-zero end, at
/// most `max` times, unless a SIGTERM or SIGINT asked us to stop.
pub fn supervise(
    plan: &LaunchPlan,
    sys: &dyn Sys,
    events: &mut dyn FnMut(&str, Value),
) -> Result<WorkloadExit, LaunchError> {
    sys.set_child_subreaper().map_err(LaunchError::Supervise)?;
    let spec = exec_spec(plan)?;
    let signals = SignalPipe::install(&[
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
        Signal::SIGCHLD,
    ])
    .map_err(LaunchError::Supervise)?;
    let pid1 = sys.pid() == 1;
    let mut procs = RealProcesses {
        plan,
        spec,
        signals,
        pid1,
        // In a sandbox PID namespace SIGINT comes from a person (Ctrl-C), not the kernel.
        ignore_sigint: pid1 && sys.in_initial_pid_namespace(),
        proc_root: PathBuf::from("/proc"),
    };
    run(plan, &mut procs, events, Timing::default())
}

struct RealProcesses<'p> {
    plan: &'p LaunchPlan,
    spec: ExecSpec,
    signals: SignalPipe,
    pid1: bool,
    ignore_sigint: bool,
    proc_root: PathBuf,
}

impl Processes for RealProcesses<'_> {
    fn ignored(&self, signal: Signal) -> bool {
        self.ignore_sigint && signal == Signal::SIGINT
    }

    fn spawn(&mut self) -> Result<Pid, LaunchError> {
        spawn(&self.spec).map_err(|error| match error {
            SpawnError::Sys(error) => LaunchError::Supervise(error),
            SpawnError::Child(failure) => failure_error(self.plan, failure),
        })
    }

    fn wait(&mut self, timeout: Duration) -> Result<Vec<Observed>, LaunchError> {
        let signals = self
            .signals
            .wait(Some(timeout))
            .map_err(LaunchError::Supervise)?;
        let mut observed: Vec<Observed> = signals
            .into_iter()
            .filter(|s| *s != Signal::SIGCHLD)
            .map(Observed::Signal)
            .collect();
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => break,
                Ok(status) => observed.push(Observed::Reaped(status)),
                Err(Errno::EINTR) => continue,
                Err(errno) => {
                    return Err(LaunchError::Supervise(SysError::Process {
                        op: "waitpid(-1, WNOHANG)".to_owned(),
                        errno,
                    }))
                }
            }
        }
        Ok(observed)
    }

    fn kill(&mut self, pid: Pid, signal: Signal) {
        let _ = nix::sys::signal::kill(pid, signal);
    }

    fn kill_remaining(&mut self, signal: Signal) {
        if self.pid1 {
            // PID 1 of a namespace (or of the machine): every other process in it.
            let _ = nix::sys::signal::kill(Pid::from_raw(-1), signal);
        } else {
            for child in children_of(&self.proc_root, Pid::this()) {
                let _ = nix::sys::signal::kill(child, signal);
            }
        }
    }

    fn has_children(&mut self) -> bool {
        let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
        loop {
            match waitid(Id::All, flags) {
                Ok(_) => return true,
                Err(Errno::EINTR) => continue,
                Err(_) => return false,
            }
        }
    }

    fn now(&self) -> Instant {
        Instant::now()
    }
}

/// The parent pid in a `/proc/PID/stat` line (the field after the state, which follows the
/// last `)`, since the command name may itself contain spaces and parentheses).
fn parent_of(stat: &str) -> Option<i32> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// Processes whose parent is `parent`, from `/proc` (used when we are not PID 1 and so must
/// not signal the whole namespace).
fn children_of(proc_root: &Path, parent: Pid) -> Vec<Pid> {
    let Ok(entries) = std::fs::read_dir(proc_root) else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|entry| entry.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(proc_root.join(pid.to_string()).join("stat"))
                .ok()
                .and_then(|stat| parent_of(&stat))
                == Some(parent.as_raw())
        })
        .map(Pid::from_raw)
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use std::collections::{BTreeSet, VecDeque};

    use super::*;

    #[test]
    fn exit_status_and_signals_follow_the_shell_convention() {
        let pid = Pid::from_raw(10);
        assert_eq!(
            exit_code_from_wait_status(WaitStatus::Exited(pid, 0)),
            Some(0)
        );
        assert_eq!(
            exit_code_from_wait_status(WaitStatus::Exited(pid, 42)),
            Some(42)
        );
        assert_eq!(
            exit_code_from_wait_status(WaitStatus::Signaled(pid, Signal::SIGTERM, false)),
            Some(143)
        );
        assert_eq!(
            exit_code_from_wait_status(WaitStatus::Signaled(pid, Signal::SIGKILL, true)),
            Some(137)
        );
        assert_eq!(
            exit_code_from_wait_status(WaitStatus::Stopped(pid, Signal::SIGSTOP)),
            None
        );
        assert_eq!(exit_code_from_wait_status(WaitStatus::StillAlive), None);
    }

    #[test]
    fn restart_policy() {
        assert!(!should_restart(Restart::Never, 1, 0));
        assert!(should_restart(Restart::OnFailure { max: 2 }, 1, 0));
        assert!(should_restart(Restart::OnFailure { max: 2 }, 143, 1));
        assert!(!should_restart(Restart::OnFailure { max: 2 }, 1, 2));
        assert!(!should_restart(Restart::OnFailure { max: 2 }, 0, 0));
        assert!(!should_restart(Restart::OnFailure { max: 0 }, 1, 0));
    }

    #[test]
    fn parent_pid_is_read_after_the_command_name() {
        assert_eq!(parent_of("42 (sleep) S 7 42 42 0 -1"), Some(7));
        assert_eq!(parent_of("42 (a) b (c)) R 1 42"), Some(1));
        assert_eq!(parent_of("garbage"), None);
    }

    #[test]
    fn children_are_found_in_an_injected_proc() {
        let dir = tempfile::tempdir().unwrap();
        for (pid, ppid) in [(5, 1), (6, 5), (7, 5)] {
            let d = dir.path().join(pid.to_string());
            std::fs::create_dir(&d).unwrap();
            std::fs::write(d.join("stat"), format!("{pid} (x) S {ppid} 0 0")).unwrap();
        }
        std::fs::create_dir(dir.path().join("self")).unwrap();
        let mut children = children_of(dir.path(), Pid::from_raw(5));
        children.sort();
        assert_eq!(children, [Pid::from_raw(6), Pid::from_raw(7)]);
    }

    fn plan(restart: Restart) -> LaunchPlan {
        LaunchPlan {
            argv: vec!["/bin/workload".into()],
            env: vec![],
            user: "nobody".into(),
            uid: 65534,
            gid: 65534,
            workdir: "/".into(),
            umask: 0o077,
            rlimits: vec![],
            restart,
        }
    }

    /// A scripted process table with a fake clock.
    struct Fake {
        spawns: VecDeque<Result<i32, LaunchError>>,
        script: VecDeque<Vec<Observed>>,
        live: BTreeSet<i32>,
        /// Whether leftover children die on SIGTERM (otherwise only SIGKILL works).
        obey_term: bool,
        /// Signals that will end the live children at the next wait.
        doomed: Option<Signal>,
        kills: Vec<(i32, Signal)>,
        kill_remaining: Vec<Signal>,
        clock: Instant,
        start: Instant,
        /// PID 1 of a real boot: SIGINT is Ctrl-Alt-Del and ignored.
        ignore_sigint: bool,
    }

    impl Fake {
        fn new(spawns: &[i32]) -> Fake {
            let now = Instant::now();
            Fake {
                spawns: spawns.iter().map(|p| Ok(*p)).collect(),
                script: VecDeque::new(),
                live: BTreeSet::new(),
                obey_term: true,
                doomed: None,
                kills: vec![],
                kill_remaining: vec![],
                clock: now,
                start: now,
                ignore_sigint: false,
            }
        }

        fn then(mut self, batch: Vec<Observed>) -> Fake {
            self.script.push_back(batch);
            self
        }

        fn with_orphans(mut self, pids: &[i32]) -> Fake {
            self.live.extend(pids);
            self
        }

        fn elapsed(&self) -> Duration {
            self.clock - self.start
        }
    }

    fn exited(pid: i32, code: i32) -> Observed {
        Observed::Reaped(WaitStatus::Exited(Pid::from_raw(pid), code))
    }

    fn killed(pid: i32, signal: Signal) -> Observed {
        Observed::Reaped(WaitStatus::Signaled(Pid::from_raw(pid), signal, false))
    }

    impl Processes for Fake {
        fn ignored(&self, signal: Signal) -> bool {
            self.ignore_sigint && signal == Signal::SIGINT
        }

        fn spawn(&mut self) -> Result<Pid, LaunchError> {
            let pid = self.spawns.pop_front().expect("unexpected spawn")?;
            self.live.insert(pid);
            Ok(Pid::from_raw(pid))
        }

        fn wait(&mut self, timeout: Duration) -> Result<Vec<Observed>, LaunchError> {
            if let Some(signal) = self.doomed.take() {
                let batch: Vec<_> = self.live.iter().map(|p| killed(*p, signal)).collect();
                self.live.clear();
                return Ok(batch);
            }
            // A batch that reaps a process is delivered only once that process exists.
            let ready = self.script.front().is_some_and(|batch| {
                batch.iter().all(|item| match item {
                    Observed::Reaped(status) => self.live.contains(&status.pid().unwrap().as_raw()),
                    Observed::Signal(_) => true,
                })
            });
            if let Some(batch) = ready.then(|| self.script.pop_front()).flatten() {
                for item in &batch {
                    if let Observed::Reaped(status) = item {
                        self.live.remove(&status.pid().unwrap().as_raw());
                    }
                }
                return Ok(batch);
            }
            self.clock += timeout;
            assert!(
                self.elapsed() < Duration::from_secs(600),
                "supervisor hangs"
            );
            Ok(vec![])
        }

        fn kill(&mut self, pid: Pid, signal: Signal) {
            self.kills.push((pid.as_raw(), signal));
        }

        fn kill_remaining(&mut self, signal: Signal) {
            self.kill_remaining.push(signal);
            if signal == Signal::SIGKILL || self.obey_term {
                self.doomed = Some(signal);
            }
        }

        fn has_children(&mut self) -> bool {
            !self.live.is_empty()
        }

        fn now(&self) -> Instant {
            self.clock
        }
    }

    fn run_fake(
        restart: Restart,
        fake: &mut Fake,
    ) -> (Result<WorkloadExit, LaunchError>, Vec<(String, Value)>) {
        let mut log = Vec::new();
        let result = run(
            &plan(restart),
            fake,
            &mut |event: &str, details: Value| log.push((event.to_owned(), details)),
            Timing::default(),
        );
        (result, log)
    }

    fn names(log: &[(String, Value)]) -> Vec<&str> {
        log.iter().map(|(name, _)| name.as_str()).collect()
    }

    #[test]
    fn a_clean_exit_is_reported_and_not_restarted() {
        let mut fake = Fake::new(&[10]).then(vec![exited(10, 0)]);
        let (result, log) = run_fake(Restart::OnFailure { max: 3 }, &mut fake);
        assert_eq!(
            result.unwrap(),
            WorkloadExit {
                code: 0,
                restarts: 0
            }
        );
        assert_eq!(names(&log), ["started", "exited"]);
        assert_eq!(log[0].1["pid"], 10);
        assert_eq!(log[1].1, json!({ "pid": 10, "code": 0, "status": 0 }));
    }

    #[test]
    fn on_failure_restarts_at_most_max_times_after_a_pause() {
        let mut fake = Fake::new(&[10, 11, 12])
            .then(vec![exited(10, 5)])
            .then(vec![exited(11, 5)])
            .then(vec![exited(12, 5)]);
        let (result, log) = run_fake(Restart::OnFailure { max: 2 }, &mut fake);
        assert_eq!(
            result.unwrap(),
            WorkloadExit {
                code: 5,
                restarts: 2
            }
        );
        assert_eq!(
            names(&log),
            ["started", "exited", "restart", "started", "exited", "restart", "started", "exited"]
        );
        assert_eq!(
            log[2].1,
            json!({ "attempt": 1, "max": 2, "previous_code": 5 })
        );
        assert_eq!(log[6].1["attempt"], 3);
        assert_eq!(fake.elapsed(), Duration::from_secs(2));
    }

    #[test]
    fn on_failure_stops_restarting_after_a_success() {
        let mut fake = Fake::new(&[10, 11])
            .then(vec![killed(10, Signal::SIGSEGV)])
            .then(vec![exited(11, 0)]);
        let (result, log) = run_fake(Restart::OnFailure { max: 5 }, &mut fake);
        assert_eq!(
            result.unwrap(),
            WorkloadExit {
                code: 0,
                restarts: 1
            }
        );
        assert_eq!(log[1].1["signal"], "SIGSEGV");
        assert_eq!(log[1].1["code"], 139);
    }

    #[test]
    fn never_means_never() {
        let mut fake = Fake::new(&[10]).then(vec![exited(10, 1)]);
        let (result, _) = run_fake(Restart::Never, &mut fake);
        assert_eq!(
            result.unwrap(),
            WorkloadExit {
                code: 1,
                restarts: 0
            }
        );
    }

    #[test]
    fn sigterm_is_forwarded_and_stops_restarts() {
        let mut fake = Fake::new(&[10])
            .then(vec![Observed::Signal(Signal::SIGTERM)])
            .then(vec![killed(10, Signal::SIGTERM)]);
        let (result, log) = run_fake(Restart::OnFailure { max: 3 }, &mut fake);
        assert_eq!(
            result.unwrap(),
            WorkloadExit {
                code: 143,
                restarts: 0
            }
        );
        assert_eq!(fake.kills, [(10, Signal::SIGTERM)]);
        assert_eq!(names(&log), ["started", "signal_forwarded", "exited"]);
        assert_eq!(log[1].1, json!({ "signal": "SIGTERM", "pid": 10 }));
    }

    #[test]
    fn sighup_is_forwarded_but_does_not_stop_restarts() {
        let mut fake = Fake::new(&[10, 11])
            .then(vec![Observed::Signal(Signal::SIGHUP)])
            .then(vec![exited(10, 1)])
            .then(vec![exited(11, 0)]);
        let (result, _) = run_fake(Restart::OnFailure { max: 3 }, &mut fake);
        assert_eq!(
            result.unwrap(),
            WorkloadExit {
                code: 0,
                restarts: 1
            }
        );
        assert_eq!(fake.kills, [(10, Signal::SIGHUP)]);
    }

    #[test]
    fn ctrl_alt_del_is_ignored_by_the_pid1_of_a_real_boot() {
        let mut fake = Fake::new(&[10, 11])
            .then(vec![Observed::Signal(Signal::SIGINT)])
            .then(vec![exited(10, 3)])
            .then(vec![Observed::Signal(Signal::SIGINT)])
            .then(vec![exited(11, 0)]);
        fake.ignore_sigint = true;
        let (result, log) = run_fake(Restart::OnFailure { max: 3 }, &mut fake);
        // Neither forwarded nor a stop request: the restart policy still applies.
        assert_eq!(
            result.unwrap(),
            WorkloadExit {
                code: 0,
                restarts: 1
            }
        );
        assert!(fake.kills.is_empty());
        // The second SIGINT falls into the restart pause: it does not stop the restart.
        assert_eq!(
            names(&log),
            [
                "started",
                "signal_ignored",
                "exited",
                "restart",
                "started",
                "exited"
            ]
        );
    }

    #[test]
    fn sigint_during_the_restart_pause_stops() {
        let mut fake = Fake::new(&[10])
            .then(vec![exited(10, 3)])
            .then(vec![Observed::Signal(Signal::SIGINT)]);
        let (result, log) = run_fake(Restart::OnFailure { max: 3 }, &mut fake);
        assert_eq!(
            result.unwrap(),
            WorkloadExit {
                code: 3,
                restarts: 0
            }
        );
        assert_eq!(names(&log), ["started", "exited"]);
    }

    #[test]
    fn a_signal_with_the_workloads_end_is_not_sent_to_its_freed_pid() {
        let mut fake =
            Fake::new(&[10]).then(vec![Observed::Signal(Signal::SIGTERM), exited(10, 0)]);
        let (result, _) = run_fake(Restart::Never, &mut fake);
        assert_eq!(result.unwrap().code, 0);
        assert!(fake.kills.is_empty());
    }

    #[test]
    fn orphans_are_reaped_and_reported() {
        let mut fake = Fake::new(&[10])
            .with_orphans(&[77])
            .then(vec![exited(77, 3)])
            .then(vec![exited(10, 0)]);
        let (result, log) = run_fake(Restart::Never, &mut fake);
        assert_eq!(result.unwrap().code, 0);
        assert_eq!(names(&log), ["started", "orphan_reaped", "exited"]);
        assert_eq!(log[1].1, json!({ "pid": 77, "code": 3, "status": 3 }));
        assert!(fake.kill_remaining.is_empty());
    }

    #[test]
    fn leftovers_get_sigterm_then_sigkill_after_the_grace_period() {
        let mut fake = Fake::new(&[10])
            .with_orphans(&[77, 78])
            .then(vec![exited(10, 0)]);
        fake.obey_term = false;
        let (result, log) = run_fake(Restart::Never, &mut fake);
        assert_eq!(result.unwrap().code, 0);
        assert_eq!(fake.kill_remaining, [Signal::SIGTERM, Signal::SIGKILL]);
        assert_eq!(
            names(&log),
            [
                "started",
                "exited",
                "terminating",
                "terminating",
                "orphan_reaped",
                "orphan_reaped"
            ]
        );
        assert_eq!(log[4].1["signal"], "SIGKILL");
        assert_eq!(fake.elapsed(), Duration::from_secs(5));
    }

    #[test]
    fn leftovers_that_obey_sigterm_are_not_killed() {
        let mut fake = Fake::new(&[10])
            .with_orphans(&[77])
            .then(vec![exited(10, 0)]);
        let (_, log) = run_fake(Restart::Never, &mut fake);
        assert_eq!(fake.kill_remaining, [Signal::SIGTERM]);
        assert_eq!(
            names(&log),
            ["started", "exited", "terminating", "orphan_reaped"]
        );
        assert_eq!(fake.elapsed(), Duration::ZERO);
    }

    #[test]
    fn unkillable_leftovers_are_reported_and_given_up_on() {
        struct Stuck(Fake);
        impl Processes for Stuck {
            fn spawn(&mut self) -> Result<Pid, LaunchError> {
                self.0.spawn()
            }
            fn wait(&mut self, timeout: Duration) -> Result<Vec<Observed>, LaunchError> {
                self.0.doomed = None;
                self.0.wait(timeout)
            }
            fn kill(&mut self, pid: Pid, signal: Signal) {
                self.0.kill(pid, signal);
            }
            fn kill_remaining(&mut self, signal: Signal) {
                self.0.kill_remaining(signal);
            }
            fn has_children(&mut self) -> bool {
                self.0.has_children()
            }
            fn now(&self) -> Instant {
                self.0.now()
            }
        }
        let mut stuck = Stuck(
            Fake::new(&[10])
                .with_orphans(&[77])
                .then(vec![exited(10, 0)]),
        );
        let mut log = Vec::new();
        let result = run(
            &plan(Restart::Never),
            &mut stuck,
            &mut |event: &str, details: Value| log.push((event.to_owned(), details)),
            Timing::default(),
        );
        assert_eq!(result.unwrap().code, 0);
        assert_eq!(log.last().unwrap().0, "children_left");
        assert_eq!(stuck.0.elapsed(), Duration::from_secs(10));
    }

    #[test]
    fn a_spawn_failure_is_returned() {
        let mut fake = Fake::new(&[]);
        fake.spawns.push_back(Err(LaunchError::ChildLost {
            path: "/bin/workload".into(),
        }));
        let (result, log) = run_fake(Restart::OnFailure { max: 3 }, &mut fake);
        assert!(matches!(result, Err(LaunchError::ChildLost { .. })));
        assert!(log.is_empty());
    }
}
