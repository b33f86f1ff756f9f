//! The PID 1 supervisor: fork the workload, reap every child (orphans too), forward signals,
//! apply the restart policy, and clean up what the workload left behind.
//!
//! The loop ([`run`]) works on a [`Processes`] seam, so its decisions (restart, forwarding,
//! escalation from SIGTERM to SIGKILL) are unit-tested with a scripted fake; the real
//! implementation is tested as PID 1 of a PID namespace in `tests/launch_ns.rs`.

use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::signal::Signal;
use nix::sys::wait::{waitid, waitpid, Id, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use serde::Serialize;
use serde_json::{json, Value};

use super::relay::{Relay, Stream};
use super::{exec_spec, failure_error, LaunchError, LaunchPlan};
use crate::policy::Restart;
use crate::sys::process::{spawn_with_stdio, ExecSpec, SignalPipe, SpawnError};
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
    /// At most one `orphans_reaped` record per this interval while the workload runs.
    orphan_report: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            grace: Duration::from_secs(5),
            kill_wait: Duration::from_secs(5),
            restart_delay: Duration::from_secs(1),
            tick: Duration::from_secs(1),
            orphan_report: Duration::from_secs(60),
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

/// Orphans reaped since the last `orphans_reaped` record.
#[derive(Debug, Default, Clone, Copy)]
struct Orphans {
    count: u64,
    nonzero: u64,
    signaled: u64,
    first_pid: i32,
    last_pid: i32,
}

/// Where the supervisor's events go, with the orphans counted rather than recorded one by
/// one: a workload that double-forks thousands of short-lived children must not write (or
/// keep) a record for each.
struct Out<'a, 'e> {
    events: &'a mut Events<'e>,
    orphans: Orphans,
    /// The interval of `orphans_reaped` records.
    every: Duration,
    /// When the last one was written (or the supervisor started).
    last: Instant,
}

impl Out<'_, '_> {
    fn event(&mut self, name: &str, details: Value) {
        (self.events)(name, details);
    }

    /// Counts one reaped orphan.
    fn orphan(&mut self, status: WaitStatus, code: i32) {
        let pid = status.pid().map_or(0, Pid::as_raw);
        let o = &mut self.orphans;
        if o.count == 0 {
            o.first_pid = pid;
        }
        o.count += 1;
        o.last_pid = pid;
        match status {
            WaitStatus::Signaled(..) => o.signaled += 1,
            _ if code != 0 => o.nonzero += 1,
            _ => {}
        }
    }

    /// Writes the `orphans_reaped` record once an interval has passed since the last one.
    fn report_orphans_if_due(&mut self, now: Instant) {
        if self.orphans.count > 0 && now.saturating_duration_since(self.last) >= self.every {
            self.flush_orphans(now);
        }
    }

    /// Writes the `orphans_reaped` record now if any orphan was reaped since the last one:
    /// `{count, exited_nonzero, signaled, first_pid, last_pid, interval_ms}`.
    fn flush_orphans(&mut self, now: Instant) {
        let o = std::mem::take(&mut self.orphans);
        if o.count > 0 {
            self.event(
                "orphans_reaped",
                json!({
                    "count": o.count,
                    "exited_nonzero": o.nonzero,
                    "signaled": o.signaled,
                    "first_pid": o.first_pid,
                    "last_pid": o.last_pid,
                    "interval_ms": now.saturating_duration_since(self.last).as_millis(),
                }),
            );
        }
        self.last = now;
    }
}

/// What a [`Periodic`] work asks of the supervisor after it ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Run again an interval from now.
    OnSchedule,
    /// Run again after this (a retry sooner than the interval), then on schedule.
    In(Duration),
    /// Stop the workload for good: SIGTERM, the grace period, SIGKILL; no restart. The work
    /// records why before it asks.
    StopWorkload,
}

/// Work the supervisor does every `every` while the workload runs (the periodic audit
/// checkpoint, the re-attestation). The wait for signals and children ends in time for the
/// next one due (no busy loop: the wait's timeout is the time left until then). `run` gets
/// the supervisor's time now and says when it wants to run again, or that the workload must
/// stop.
pub struct Periodic<'p> {
    /// The interval.
    pub every: Duration,
    /// What to do.
    pub run: &'p mut dyn FnMut(Instant) -> Next,
}

impl std::fmt::Debug for Periodic<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Periodic")
            .field("every", &self.every)
            .finish_non_exhaustive()
    }
}

/// A [`Periodic`] with its next due time.
struct Due<'p> {
    periodic: Periodic<'p>,
    next: Instant,
}

/// How long the next wait may last: at most `tick`, and never past the first work due.
fn wait_timeout(dues: &[Due<'_>], now: Instant, tick: Duration) -> Duration {
    dues.iter()
        .map(|due| due.next.saturating_duration_since(now))
        .fold(tick, Duration::min)
}

/// Runs every work that is due, in order; each is next due an interval (or what it asked
/// for) after it ran. Whether one asked to stop the workload (the rest then wait).
fn run_due(dues: &mut [Due<'_>], procs: &dyn Processes) -> bool {
    for due in dues.iter_mut() {
        let now = procs.now();
        if now < due.next {
            continue;
        }
        match (due.periodic.run)(now) {
            Next::OnSchedule => due.next = procs.now() + due.periodic.every,
            Next::In(after) => due.next = procs.now() + after,
            Next::StopWorkload => return true,
        }
    }
    false
}

/// Supervises the workload until it is done for good. See [`supervise`].
fn run(
    plan: &LaunchPlan,
    procs: &mut dyn Processes,
    events: &mut Events<'_>,
    timing: Timing,
    periodic: Vec<Periodic<'_>>,
) -> Result<WorkloadExit, LaunchError> {
    let out = &mut Out {
        events,
        orphans: Orphans::default(),
        every: timing.orphan_report,
        last: procs.now(),
    };
    let mut dues: Vec<Due<'_>> = periodic
        .into_iter()
        .map(|periodic| Due {
            next: procs.now() + periodic.every,
            periodic,
        })
        .collect();
    let mut restarts = 0u32;
    let mut stop = false;
    loop {
        let pid = match procs.spawn() {
            Ok(pid) => pid,
            Err(error) => {
                terminate_remaining(procs, out, timing, &mut stop);
                return Err(error);
            }
        };
        out.event(
            "started",
            json!({ "pid": pid.as_raw(), "attempt": restarts + 1, "argv": plan.argv }),
        );
        let (status, code) = match wait_for(pid, procs, out, timing, &mut stop, &mut dues) {
            Ok(ended) => ended,
            Err(error) => {
                procs.kill(pid, Signal::SIGKILL);
                terminate_remaining(procs, out, timing, &mut stop);
                return Err(error);
            }
        };
        // Orphans reaped during the run are accounted for before its end.
        out.flush_orphans(procs.now());
        out.event("exited", status_details(status));
        terminate_remaining(procs, out, timing, &mut stop);
        if stop || !should_restart(plan.restart, code, restarts) {
            return Ok(WorkloadExit { code, restarts });
        }
        pause(procs, out, timing, &mut stop);
        if stop {
            return Ok(WorkloadExit { code, restarts });
        }
        restarts += 1;
        let max = match plan.restart {
            Restart::OnFailure { max } => max,
            Restart::Never => 0,
        };
        out.event(
            "restart",
            json!({ "attempt": restarts, "max": max, "previous_code": code }),
        );
    }
}

/// Reports reaped children other than `workload`; returns the workload's status if it ended.
fn reaped(
    observed: &[Observed],
    workload: Option<Pid>,
    out: &mut Out<'_, '_>,
) -> Option<(WaitStatus, i32)> {
    let mut ended = None;
    for item in observed {
        if let Observed::Reaped(status) = *item {
            match exit_code_from_wait_status(status) {
                Some(code) if status.pid() == workload => ended = Some((status, code)),
                Some(code) => out.orphan(status, code),
                None => {}
            }
        }
    }
    ended
}

fn wait_for(
    pid: Pid,
    procs: &mut dyn Processes,
    out: &mut Out<'_, '_>,
    timing: Timing,
    stop: &mut bool,
    dues: &mut [Due<'_>],
) -> Result<(WaitStatus, i32), LaunchError> {
    loop {
        let observed = procs.wait(wait_timeout(dues, procs.now(), timing.tick))?;
        // Reaps first: a signal that arrives together with the workload's end must not be
        // sent to its (now free, possibly reused) pid.
        let ended = reaped(&observed, Some(pid), out);
        if ended.is_none() {
            out.report_orphans_if_due(procs.now());
        }
        for item in &observed {
            if let Observed::Signal(signal) = *item {
                if procs.ignored(signal) {
                    out.event(
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
                    out.event(
                        "signal_forwarded",
                        json!({ "signal": signal.as_str(), "pid": pid.as_raw() }),
                    );
                }
            }
        }
        if let Some(ended) = ended {
            return Ok(ended);
        }
        if run_due(dues, procs) {
            *stop = true;
            return stop_workload(pid, procs, out, timing, stop);
        }
    }
}

/// Periodic work asked to stop the workload: SIGTERM to it (`stopping` {pid, signal,
/// grace_ms}), the grace period, then SIGKILL (`stopping` {pid, signal}); its end is
/// returned like any end. A workload that not even SIGKILL ends within `kill_wait` is an
/// error (the caller fails closed).
fn stop_workload(
    pid: Pid,
    procs: &mut dyn Processes,
    out: &mut Out<'_, '_>,
    timing: Timing,
    stop: &mut bool,
) -> Result<(WaitStatus, i32), LaunchError> {
    for (signal, wait) in [
        (Signal::SIGTERM, timing.grace),
        (Signal::SIGKILL, timing.kill_wait),
    ] {
        procs.kill(pid, signal);
        let mut details = json!({ "pid": pid.as_raw(), "signal": signal.as_str() });
        if signal == Signal::SIGTERM {
            details["grace_ms"] = json!(timing.grace.as_millis());
        }
        out.event("stopping", details);
        let deadline = procs.now() + wait;
        loop {
            let now = procs.now();
            if now >= deadline {
                break;
            }
            let observed = procs.wait(timing.tick.min(deadline - now))?;
            let ended = reaped(&observed, Some(pid), out);
            for item in &observed {
                if let Observed::Signal(signal) = *item {
                    *stop |= !procs.ignored(signal) && is_stop_request(signal);
                }
            }
            if let Some(ended) = ended {
                return Ok(ended);
            }
        }
    }
    Err(LaunchError::Supervise(SysError::Process {
        op: format!(
            "stop the workload (pid {}): it did not end within {:?} of SIGKILL",
            pid.as_raw(),
            timing.kill_wait
        ),
        errno: Errno::ETIMEDOUT,
    }))
}

/// Waits until `deadline` or until no child is left, reaping and reporting; records stop
/// requests. Wait errors end the wait early (best effort: we are cleaning up).
fn drain_until(
    deadline: Instant,
    procs: &mut dyn Processes,
    out: &mut Out<'_, '_>,
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
        reaped(&observed, None, out);
        out.report_orphans_if_due(procs.now());
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
    out: &mut Out<'_, '_>,
    timing: Timing,
    stop: &mut bool,
) {
    if !procs.has_children() {
        return;
    }
    procs.kill_remaining(Signal::SIGTERM);
    out.event(
        "terminating",
        json!({ "signal": "SIGTERM", "grace_ms": timing.grace.as_millis() }),
    );
    let deadline = procs.now() + timing.grace;
    drain_until(deadline, procs, out, timing, stop, true);
    if !procs.has_children() {
        out.flush_orphans(procs.now());
        return;
    }
    out.event("terminating", json!({ "signal": "SIGKILL" }));
    let deadline = procs.now() + timing.kill_wait;
    while procs.has_children() && procs.now() < deadline {
        // Again each round: orphans of the killed processes are re-parented to us.
        procs.kill_remaining(Signal::SIGKILL);
        let round = procs.now() + timing.tick.min(Duration::from_millis(100));
        drain_until(round.min(deadline), procs, out, timing, stop, true);
    }
    out.flush_orphans(procs.now());
    if procs.has_children() {
        out.event(
            "children_left",
            json!({ "after_ms": timing.kill_wait.as_millis() }),
        );
    }
}

/// The pause before a restart, reaping and listening for a stop request meanwhile.
fn pause(procs: &mut dyn Processes, out: &mut Out<'_, '_>, timing: Timing, stop: &mut bool) {
    let deadline = procs.now() + timing.restart_delay;
    loop {
        let now = procs.now();
        if *stop || now >= deadline {
            return;
        }
        drain_until(deadline, procs, out, timing, stop, false);
    }
}

/// PID 1 shape: supervises the workload until it is done for good.
///
/// Becomes child subreaper, installs the signal handlers (SIGTERM, SIGINT, SIGHUP, SIGCHLD;
/// see [`SignalPipe`] for why a self-pipe rather than `signalfd`), then forks the workload
/// (privileges dropped in the child; a failure before `execve` comes back as the error).
/// Meanwhile it reaps every child — orphans re-parented to us are counted, and reported in
/// at most one `orphans_reaped` {count, exited_nonzero, signaled, first_pid, last_pid,
/// interval_ms} a minute (and before `exited`) — forwards SIGTERM/SIGINT/SIGHUP to the
/// workload (`signal_forwarded`), and runs each `periodic` work on time; one that answers
/// [`Next::StopWorkload`] ends the workload (SIGTERM, 5 s, SIGKILL: `stopping` {pid, signal})
/// and it is not restarted. Events: `started` {pid, attempt, argv}, `exited` {pid, code,
/// status | signal}, `restart` {attempt, max, previous_code}, `terminating` {signal},
/// `stopping`, `children_left`.
///
/// With `relay`, the workload's stdout and stderr are pipes read here and written line by
/// line to `relay` behind a prefix ([`super::relay`]); otherwise it inherits ours.
///
/// When the workload ends, whatever it left behind gets SIGTERM, 5 s, then SIGKILL, and is
/// reaped; then the restart policy decides: `on-failure` restarts after a non-zero end, at
/// most `max` times, unless a SIGTERM or SIGINT asked us to stop.
pub fn supervise(
    plan: &LaunchPlan,
    sys: &dyn Sys,
    events: &mut dyn FnMut(&str, Value),
    periodic: Vec<Periodic<'_>>,
    relay: Option<Box<dyn Write + Send>>,
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
        relay: relay.map(Relay::new),
        pipes: Vec::new(),
    };
    let result = run(plan, &mut procs, events, Timing::default(), periodic);
    procs.drain_output();
    result
}

struct RealProcesses<'p> {
    plan: &'p LaunchPlan,
    spec: ExecSpec,
    signals: SignalPipe,
    pid1: bool,
    ignore_sigint: bool,
    proc_root: PathBuf,
    relay: Option<Relay<Box<dyn Write + Send>>>,
    /// The read ends of the relay pipes still open (of this and earlier runs).
    pipes: Vec<(Stream, OwnedFd)>,
}

/// Most bytes read from one relay pipe per wake-up, so a flooding workload cannot keep the
/// supervisor from reaping and forwarding signals.
const RELAY_READ_MAX: usize = 256 * 1024;

impl RealProcesses<'_> {
    /// Pipes for the workload's stdout and stderr: read ends kept (non-blocking), write ends
    /// returned for the child.
    fn relay_pipes(&mut self) -> Result<Option<(OwnedFd, OwnedFd)>, LaunchError> {
        if self.relay.is_none() {
            return Ok(None);
        }
        let pipe = || {
            nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|errno| {
                LaunchError::Supervise(SysError::Process {
                    op: "pipe2 for the workload's output".to_owned(),
                    errno,
                })
            })
        };
        let (out_r, out_w) = pipe()?;
        let (err_r, err_w) = pipe()?;
        for fd in [&out_r, &err_r] {
            let flags = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFL)
                .map(OFlag::from_bits_truncate)
                .and_then(|flags| {
                    nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))
                });
            if let Err(errno) = flags {
                return Err(LaunchError::Supervise(SysError::Process {
                    op: "make the workload's output pipe non-blocking".to_owned(),
                    errno,
                }));
            }
        }
        self.pipes.push((Stream::Stdout, out_r));
        self.pipes.push((Stream::Stderr, err_r));
        Ok(Some((out_w, err_w)))
    }

    /// Reads what pipe `i` holds (at most [`RELAY_READ_MAX`]) into the relay; whether it
    /// ended (end of file or an error).
    fn read_pipe(&mut self, i: usize) -> bool {
        let Some(relay) = self.relay.as_mut() else {
            return true;
        };
        let Some((stream, fd)) = self.pipes.get(i) else {
            return true;
        };
        let mut buf = [0u8; 16 * 1024];
        let mut total = 0;
        loop {
            match nix::unistd::read(fd, &mut buf) {
                Ok(0) => {
                    relay.close(*stream, Instant::now());
                    return true;
                }
                Ok(n) => {
                    relay.feed(*stream, &buf[..n], Instant::now());
                    total += n;
                    if total >= RELAY_READ_MAX {
                        return false;
                    }
                }
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => return false,
                Err(_) => {
                    relay.close(*stream, Instant::now());
                    return true;
                }
            }
        }
    }

    /// Reads the pipes that are ready (`ready[i]` for `pipes[i]`); closes those that ended.
    fn relay_ready(&mut self, ready: &[bool]) {
        let mut ended = Vec::new();
        for (i, is_ready) in ready.iter().enumerate() {
            if *is_ready && self.read_pipe(i) {
                ended.push(i);
            }
        }
        for i in ended.into_iter().rev() {
            self.pipes.remove(i);
        }
    }

    /// After the supervision: what is left in the pipes (every writer is gone or killed).
    fn drain_output(&mut self) {
        for _ in 0..64 {
            if self.pipes.is_empty() {
                return;
            }
            let ready = vec![true; self.pipes.len()];
            self.relay_ready(&ready);
        }
    }
}

impl Processes for RealProcesses<'_> {
    fn ignored(&self, signal: Signal) -> bool {
        self.ignore_sigint && signal == Signal::SIGINT
    }

    fn spawn(&mut self) -> Result<Pid, LaunchError> {
        let stdio = self.relay_pipes()?;
        let spawned = spawn_with_stdio(
            &self.spec,
            stdio.as_ref().map(|(out, err)| (out.as_fd(), err.as_fd())),
        );
        // The child has its copies (or failed): ours go, so the pipes end with the workload.
        drop(stdio);
        spawned.map_err(|error| match error {
            SpawnError::Sys(error) => LaunchError::Supervise(error),
            SpawnError::Child(failure) => failure_error(self.plan, failure),
        })
    }

    fn wait(&mut self, timeout: Duration) -> Result<Vec<Observed>, LaunchError> {
        let signal_timeout = if self.pipes.is_empty() {
            timeout
        } else {
            // One poll for the signal pipe and the output pipes; the signals are then
            // collected without waiting.
            let ready = {
                let mut fds: Vec<PollFd<'_>> = Vec::with_capacity(self.pipes.len() + 1);
                fds.push(PollFd::new(self.signals.fd(), PollFlags::POLLIN));
                for (_, fd) in &self.pipes {
                    fds.push(PollFd::new(fd.as_fd(), PollFlags::POLLIN));
                }
                let poll_timeout = PollTimeout::try_from(timeout).unwrap_or(PollTimeout::MAX);
                match nix::poll::poll(&mut fds, poll_timeout) {
                    Ok(_) | Err(Errno::EINTR) => {}
                    Err(errno) => {
                        return Err(LaunchError::Supervise(SysError::Process {
                            op: "poll the signal and output pipes".to_owned(),
                            errno,
                        }))
                    }
                }
                fds[1..]
                    .iter()
                    .map(|fd| fd.revents().is_some_and(|r| !r.is_empty()))
                    .collect::<Vec<bool>>()
            };
            self.relay_ready(&ready);
            Duration::ZERO
        };
        let signals = self
            .signals
            .wait(Some(signal_timeout))
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
        /// No scripted batch is delivered before this much fake time has passed.
        hold_until: Duration,
        /// The timeout of every wait.
        timeouts: Vec<Duration>,
        /// Signals that end a live process when `kill` sends them to it.
        dies_on: Vec<Signal>,
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
                hold_until: Duration::ZERO,
                timeouts: vec![],
                dies_on: vec![],
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
            self.timeouts.push(timeout);
            if let Some(signal) = self.doomed.take() {
                let batch: Vec<_> = self.live.iter().map(|p| killed(*p, signal)).collect();
                self.live.clear();
                return Ok(batch);
            }
            // A batch that reaps a process is delivered only once that process exists.
            let held = self.elapsed() < self.hold_until;
            let ready = !held
                && self.script.front().is_some_and(|batch| {
                    batch.iter().all(|item| match item {
                        Observed::Reaped(status) => {
                            self.live.contains(&status.pid().unwrap().as_raw())
                        }
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
            if self.dies_on.contains(&signal) && self.live.contains(&pid.as_raw()) {
                self.script.push_front(vec![killed(pid.as_raw(), signal)]);
            }
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
            vec![],
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
    fn orphans_are_reaped_and_counted() {
        let mut fake = Fake::new(&[10])
            .with_orphans(&[77])
            .then(vec![exited(77, 3)])
            .then(vec![exited(10, 0)]);
        let (result, log) = run_fake(Restart::Never, &mut fake);
        assert_eq!(result.unwrap().code, 0);
        assert_eq!(names(&log), ["started", "orphans_reaped", "exited"]);
        assert_eq!(
            log[1].1,
            json!({ "count": 1, "exited_nonzero": 1, "signaled": 0, "first_pid": 77, "last_pid": 77, "interval_ms": 0 })
        );
        assert!(fake.kill_remaining.is_empty());
    }

    #[test]
    fn thousands_of_orphans_make_one_record_per_interval() {
        // 10,000 orphans end over 200 s of fake time, 50 per second.
        let pids: Vec<i32> = (1000..11_000).collect();
        let mut fake = Fake::new(&[10]).with_orphans(&pids);
        for chunk in pids.chunks(50) {
            fake = fake.then(chunk.iter().map(|p| exited(*p, 0)).collect());
            fake = fake.then(vec![]);
        }
        let fake = fake.then(vec![exited(10, 0)]);
        // An empty batch is a one-second pause of the fake clock.
        struct Paced(Fake);
        impl Processes for Paced {
            fn spawn(&mut self) -> Result<Pid, LaunchError> {
                self.0.spawn()
            }
            fn wait(&mut self, timeout: Duration) -> Result<Vec<Observed>, LaunchError> {
                if self.0.script.front().is_some_and(Vec::is_empty) {
                    self.0.script.pop_front();
                    self.0.clock += Duration::from_secs(1);
                    return Ok(vec![]);
                }
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
        let mut paced = Paced(fake);
        let mut log = Vec::new();
        let result = run(
            &plan(Restart::Never),
            &mut paced,
            &mut |event: &str, details: Value| log.push((event.to_owned(), details)),
            Timing::default(),
            vec![],
        );
        assert_eq!(result.unwrap().code, 0);
        let reports: Vec<&Value> = log
            .iter()
            .filter(|(name, _)| name == "orphans_reaped")
            .map(|(_, details)| details)
            .collect();
        // 200 s at one record per 60 s, plus the one before `exited`.
        assert!(reports.len() <= 5, "{}", reports.len());
        let counted: u64 = reports.iter().map(|d| d["count"].as_u64().unwrap()).sum();
        assert_eq!(counted, 10_000);
        assert_eq!(log.len(), reports.len() + 2);
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
                "orphans_reaped"
            ]
        );
        assert_eq!(log[3].1["signal"], "SIGKILL");
        assert_eq!(log[4].1["count"], 2);
        assert_eq!(log[4].1["signaled"], 2);
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
            ["started", "exited", "terminating", "orphans_reaped"]
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
            vec![],
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

    #[test]
    fn periodic_work_runs_on_time_while_the_workload_runs_without_busy_waiting() {
        let mut fake = Fake::new(&[10]).then(vec![exited(10, 0)]);
        fake.hold_until = Duration::from_millis(95_500);
        let mut runs = Vec::new();
        let start = fake.clock;
        let clock = std::cell::Cell::new(start);
        let mut log = Vec::new();
        {
            let mut run_periodic = |now: Instant| {
                assert_eq!(now, clock.get());
                runs.push(now - start);
                Next::OnSchedule
            };
            struct Clocked<'f, 'c>(&'f mut Fake, &'c std::cell::Cell<Instant>);
            impl Processes for Clocked<'_, '_> {
                fn spawn(&mut self) -> Result<Pid, LaunchError> {
                    self.0.spawn()
                }
                fn wait(&mut self, timeout: Duration) -> Result<Vec<Observed>, LaunchError> {
                    let result = self.0.wait(timeout);
                    self.1.set(self.0.clock);
                    result
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
            let result = run(
                &plan(Restart::Never),
                &mut Clocked(&mut fake, &clock),
                &mut |event: &str, details: Value| log.push((event.to_owned(), details)),
                Timing {
                    tick: Duration::from_secs(7),
                    ..Timing::default()
                },
                vec![Periodic {
                    every: Duration::from_secs(30),
                    run: &mut run_periodic,
                }],
            );
            assert_eq!(result.unwrap().code, 0);
        }
        // Exactly on time: the wait before each run ends when it is due.
        assert_eq!(
            runs,
            [
                Duration::from_secs(30),
                Duration::from_secs(60),
                Duration::from_secs(90)
            ]
        );
        // No busy loop: every wait lasts the tick or until the next run, never zero.
        assert!(
            fake.timeouts.iter().all(|t| !t.is_zero()),
            "{:?}",
            fake.timeouts
        );
        assert!(fake.timeouts.len() <= 20, "{}", fake.timeouts.len());
        assert_eq!(names(&log), ["started", "exited"]);
    }

    /// Runs `fake` with periodic works of these intervals; each answers from its script
    /// (then `OnSchedule`); returns the result, the log and when each work ran.
    #[allow(clippy::type_complexity)]
    fn run_periodic(
        restart: Restart,
        fake: &mut Fake,
        works: &[(u64, Vec<Next>)],
    ) -> (
        Result<WorkloadExit, LaunchError>,
        Vec<(String, Value)>,
        Vec<Vec<Duration>>,
    ) {
        let start = fake.clock;
        let mut runs: Vec<Vec<Duration>> = vec![Vec::new(); works.len()];
        let mut scripts: Vec<VecDeque<Next>> = works
            .iter()
            .map(|(_, s)| s.iter().copied().collect())
            .collect();
        let mut log = Vec::new();
        let result = {
            let mut closures: Vec<Box<dyn FnMut(Instant) -> Next + '_>> = runs
                .iter_mut()
                .zip(scripts.iter_mut())
                .map(|(runs, script)| {
                    Box::new(move |now: Instant| {
                        runs.push(now - start);
                        script.pop_front().unwrap_or(Next::OnSchedule)
                    }) as Box<dyn FnMut(Instant) -> Next + '_>
                })
                .collect();
            let periodic: Vec<Periodic<'_>> = closures
                .iter_mut()
                .zip(works)
                .map(|(run, (every, _))| Periodic {
                    every: Duration::from_secs(*every),
                    run: run.as_mut(),
                })
                .collect();
            run(
                &plan(restart),
                fake,
                &mut |event: &str, details: Value| log.push((event.to_owned(), details)),
                Timing::default(),
                periodic,
            )
        };
        (result, log, runs)
    }

    #[test]
    fn periodic_work_that_asks_to_stop_ends_the_workload_with_sigterm_and_no_restart() {
        let mut fake = Fake::new(&[10, 11]);
        fake.dies_on = vec![Signal::SIGTERM, Signal::SIGKILL];
        let (result, log, runs) = run_periodic(
            Restart::OnFailure { max: 3 },
            &mut fake,
            &[(30, vec![Next::OnSchedule, Next::StopWorkload])],
        );
        assert_eq!(
            result.unwrap(),
            WorkloadExit {
                code: 143,
                restarts: 0
            }
        );
        assert_eq!(runs[0], [Duration::from_secs(30), Duration::from_secs(60)]);
        assert_eq!(fake.kills, [(10, Signal::SIGTERM)]);
        assert_eq!(names(&log), ["started", "stopping", "exited"]);
        assert_eq!(
            log[1].1,
            json!({ "pid": 10, "signal": "SIGTERM", "grace_ms": 5000 })
        );
        assert_eq!(fake.elapsed(), Duration::from_secs(60));
    }

    #[test]
    fn a_workload_that_ignores_sigterm_gets_sigkill_after_the_grace_period() {
        let mut fake = Fake::new(&[10]);
        fake.dies_on = vec![Signal::SIGKILL];
        let (result, log, _) =
            run_periodic(Restart::Never, &mut fake, &[(30, vec![Next::StopWorkload])]);
        assert_eq!(result.unwrap().code, 137);
        assert_eq!(fake.kills, [(10, Signal::SIGTERM), (10, Signal::SIGKILL)]);
        assert_eq!(names(&log), ["started", "stopping", "stopping", "exited"]);
        assert_eq!(log[2].1, json!({ "pid": 10, "signal": "SIGKILL" }));
        // 30 s until the work ran, then the 5 s grace period.
        assert_eq!(fake.elapsed(), Duration::from_secs(35));
    }

    #[test]
    fn a_workload_that_not_even_sigkill_ends_is_an_error() {
        let mut fake = Fake::new(&[10]);
        let (result, log, _) =
            run_periodic(Restart::Never, &mut fake, &[(30, vec![Next::StopWorkload])]);
        let error = result.unwrap_err();
        assert!(
            crate::report::error_chain(&error).contains("did not end within 5s of SIGKILL"),
            "{}",
            crate::report::error_chain(&error)
        );
        assert_eq!(names(&log)[..3], ["started", "stopping", "stopping"]);
    }

    #[test]
    fn two_periodic_works_run_on_their_own_schedules_and_a_retry_comes_sooner() {
        let mut fake = Fake::new(&[10]).then(vec![exited(10, 0)]);
        fake.hold_until = Duration::from_secs(100);
        let (result, log, runs) = run_periodic(
            Restart::Never,
            &mut fake,
            &[
                (20, vec![]),
                (30, vec![Next::In(Duration::from_secs(4)), Next::OnSchedule]),
            ],
        );
        assert_eq!(result.unwrap().code, 0);
        let secs = |v: &[Duration]| v.iter().map(Duration::as_secs).collect::<Vec<_>>();
        assert_eq!(secs(&runs[0]), [20, 40, 60, 80, 100]);
        // The retry 4 s after the first run, then the interval again from there.
        assert_eq!(secs(&runs[1]), [30, 34, 64, 94]);
        assert!(
            fake.timeouts.iter().all(|t| !t.is_zero()),
            "{:?}",
            fake.timeouts
        );
        assert!(fake.kills.is_empty());
        assert_eq!(names(&log), ["started", "exited"]);
    }
}
