//! The audit log: hash-chained JSON lines written to every configured sink.
//!
//! Every action of the boot is recorded before it runs and again with its outcome. Each
//! record names the hash of the one before it, so [`verify`] finds a changed, removed,
//! reordered or inserted record and a cut tail. The format, the hashing rule and the sink
//! failure rules are in `docs/audit-log.md`.
//!
//! **Secrets never reach this log.** Details carry names, paths, digests, counts and error
//! chains only; secret types must implement neither `Serialize` nor `Display`, so they
//! cannot be passed to [`Audit::record`] by accident.

mod sinks;

/// The evidence checks of `audit verify` (in the verifier crate).
pub use cvm_warden_verify::check as evidence_check;

use std::collections::VecDeque;
use std::fmt;
use std::io::{self, ErrorKind};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, TryLockError};
use std::time::{Duration, Instant, SystemTime};

use serde_json::{json, Value};

use crate::digest::Digest;

pub use cvm_warden_verify::chain::{
    verify, verify_file, verify_with, Problem, RecordCheck, RunSummary, VerifyError, VerifyReport,
};
pub use cvm_warden_verify::record::{
    encode, format_time, is_closing, normalize_details, EncodedLine, Fields, LineError, Record,
    CLOSING_EVENTS,
};
pub use cvm_warden_verify::verdict::{run_verify_command, verify_log, Outcome, Verdict};
pub use sinks::{
    sinks_from_config, ConsoleSink, FileSink, MemorySink, MemorySinkControl, Sink, SyslogSink,
    VirtioPortSink, PORT_WRITE_WAIT, SYSLOG_APP_NAME, VIRTIO_PORTS_SYSFS,
};

/// The stage of the records the log writes about its own sinks.
pub const AUDIT_STAGE: &str = "audit";
/// A sink that had worked (or is not a missing file) failed: `{"sink", "required", "error"}`.
pub const EVENT_SINK_FAILED: &str = "sink_failed";
/// A sink cannot be written yet (`NotFound` before its first write, e.g. a file on a volume
/// that is not unlocked yet); it gets the backlog later: `{"sink", "required", "error"}`.
pub const EVENT_SINK_WAITING: &str = "sink_waiting";
/// A failing or waiting sink took the whole backlog: `{"sink", "caught_up"}`.
pub const EVENT_SINK_RECOVERED: &str = "sink_recovered";
/// The backlog held for a failing or waiting sink reached its bound, and its oldest lines were
/// dropped for that sink: `{"sink", "dropped", "first_seq", "last_seq", "bound_lines",
/// "bound_bytes"}`. That sink's copy has a gap there; the other sinks have every line.
pub const EVENT_SINK_DROPPED: &str = "sink_dropped";

/// The most lines held for sinks that have not received them yet (a waiting or failing
/// sink). Lines every sink has are dropped at once, so the log's memory does not grow with
/// its length.
pub const BACKLOG_MAX_LINES: usize = 20_000;
/// The most bytes held for such sinks.
pub const BACKLOG_MAX_BYTES: usize = 8 << 20;

/// Why a record could not be written as the policy requires.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// A required sink failed; the boot must stop (fail closed). The record itself was kept
    /// and went to the other sinks.
    #[error(
        "required audit sink {sink} failed, so the boot stops (audit.file_required = true); \
         fix the sink or make it optional in the policy"
    )]
    RequiredSinkFailed {
        /// The sink's name.
        sink: String,
        /// What went wrong first.
        #[source]
        source: io::Error,
    },
    /// Before launch a required sink has not received every record.
    #[error(
        "required audit sink {sink} has not received {pending} record(s) before launch; \
         make it writable before launch (is the volume it lives on unlocked and mounted?)"
    )]
    RequiredSinkBehind {
        /// The sink's name.
        sink: String,
        /// How many lines it still lacks.
        pending: usize,
        /// The sink's last error, if it had one.
        #[source]
        source: Option<io::Error>,
    },
    /// The record could not be encoded (cannot happen with JSON details).
    #[error("audit record {stage}/{event} cannot be encoded as JSON")]
    Encode {
        /// The record's stage.
        stage: String,
        /// The record's event.
        event: String,
        /// The encoder's error.
        #[source]
        source: serde_json::Error,
    },
    /// [`Audit::record_within`] could not take the log in time (another thread, or a panic
    /// in the middle of a record, holds it).
    #[error("audit log is busy for more than {0:?}; the record {1} was not written")]
    Busy(Duration, String),
}

/// Returns the time of a record (injected for deterministic tests).
pub type Clock = Box<dyn Fn() -> SystemTime + Send>;

/// The handle to the audit log. Clones share one log: the boot runner, the PID 1 supervisor
/// and the panic hook all write to it. Records are strictly ordered, and every sink gets the
/// lines in seq order (the lock is held while sinks write).
#[derive(Clone)]
pub struct Audit {
    inner: Arc<Mutex<Inner>>,
}

impl fmt::Debug for Audit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = self.lock();
        f.debug_struct("Audit")
            .field("next_seq", &inner.next_seq)
            .field("head", &inner.head)
            .field("insecure", &inner.insecure)
            .field(
                "sinks",
                &inner
                    .sinks
                    .iter()
                    .map(|s| s.name.as_str())
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// How a sink was last reported in the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SinkState {
    Ok,
    Waiting,
    Failed,
}

struct Slot {
    sink: Box<dyn Sink>,
    name: String,
    required: bool,
    /// Lines delivered (so the next one to write is `lines[delivered]`).
    delivered: usize,
    /// It has accepted at least one line.
    ever_ok: bool,
    /// Its state as last recorded in the log.
    reported: SinkState,
    /// Its last error.
    last_error: Option<(ErrorKind, String)>,
    /// A required sink that failed (sticky): every later record returns an error.
    fatal: Option<(ErrorKind, String)>,
}

/// The outcome of one delivery attempt.
struct Attempt {
    state: SinkState,
    caught_up: usize,
}

impl Slot {
    /// Writes every line it lacks (`lines` starts at line number `first`), then flushes.
    fn catch_up(&mut self, lines: &VecDeque<String>, first: usize) -> Attempt {
        let start = self.delivered;
        let mut result = Ok(());
        while let Some(line) = lines.get(self.delivered.saturating_sub(first)) {
            match self.sink.write_line(line) {
                Ok(()) => {
                    self.delivered += 1;
                    self.ever_ok = true;
                }
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        if result.is_ok() && self.delivered > start {
            result = self.sink.flush();
        }
        let state = match result {
            Ok(()) => {
                self.last_error = None;
                SinkState::Ok
            }
            Err(e) => {
                let waiting = e.kind() == ErrorKind::NotFound && !self.ever_ok;
                let err = (e.kind(), e.to_string());
                if self.required && !waiting && self.fatal.is_none() {
                    self.fatal = Some(err.clone());
                }
                self.last_error = Some(err);
                if waiting {
                    SinkState::Waiting
                } else {
                    SinkState::Failed
                }
            }
        };
        Attempt {
            state,
            caught_up: self.delivered - start,
        }
    }

    fn error_text(&self) -> String {
        self.last_error
            .as_ref()
            .map(|(_, m)| m.clone())
            .unwrap_or_default()
    }
}

struct Inner {
    /// The lines some sink has not received yet, from line number `first` on.
    lines: VecDeque<String>,
    /// The line number (counting every line of this log) of `lines[0]`.
    first: usize,
    /// The bytes in `lines`.
    backlog_bytes: usize,
    /// Every line (tests only: [`Audit::lines`]).
    #[cfg(test)]
    history: Vec<String>,
    head: Digest,
    next_seq: u64,
    insecure: bool,
    clock: Clock,
    sinks: Vec<Slot>,
}

impl Inner {
    /// Encodes and keeps one record; does not deliver it.
    fn append(&mut self, stage: &str, event: &str, details: Value) -> Result<Digest, AuditError> {
        let details = normalize_details(details);
        let encoded = encode(&Fields {
            seq: self.next_seq,
            time: (self.clock)(),
            stage,
            event,
            details: &details,
            insecure: self.insecure,
            prev: self.head,
        })
        .map_err(|source| AuditError::Encode {
            stage: stage.to_string(),
            event: event.to_string(),
            source,
        })?;
        #[cfg(test)]
        self.history.push(encoded.line.clone());
        self.backlog_bytes += encoded.line.len();
        self.lines.push_back(encoded.line);
        self.head = encoded.hash;
        self.next_seq += 1;
        Ok(encoded.hash)
    }

    /// Offers every sink its backlog and records state changes. Each sink is reported at
    /// most once per call, so a flapping sink cannot make this loop forever.
    fn deliver(&mut self) {
        let mut reported_now = vec![false; self.sinks.len()];
        loop {
            let mut changes = Vec::new();
            for (i, slot) in self.sinks.iter_mut().enumerate() {
                let attempt = slot.catch_up(&self.lines, self.first);
                if attempt.state != slot.reported && !reported_now[i] {
                    reported_now[i] = true;
                    slot.reported = attempt.state;
                    let details = match attempt.state {
                        SinkState::Ok => json!({
                            "sink": slot.name,
                            "caught_up": attempt.caught_up,
                        }),
                        SinkState::Waiting | SinkState::Failed => json!({
                            "sink": slot.name,
                            "required": slot.required,
                            "error": slot.error_text(),
                        }),
                    };
                    let event = match attempt.state {
                        SinkState::Ok => EVENT_SINK_RECOVERED,
                        SinkState::Waiting => EVENT_SINK_WAITING,
                        SinkState::Failed => EVENT_SINK_FAILED,
                    };
                    changes.push((event, details));
                }
            }
            changes.extend(self.prune());
            if changes.is_empty() {
                return;
            }
            for (event, details) in changes {
                // Encoding a json! object cannot fail; if it ever did, the change is simply
                // not recorded and the next record tries again.
                if self.append(AUDIT_STAGE, event, details).is_err() {
                    return;
                }
            }
        }
    }

    /// The number the next line gets.
    fn end(&self) -> usize {
        self.first + self.lines.len()
    }

    /// Drops the lines every sink has; when what is left for lagging sinks is over the bound,
    /// drops its older half for them and returns one `sink_dropped` record per sink that lost
    /// lines (so at most one such record per half a bound of lines: bounded).
    fn prune(&mut self) -> Vec<(&'static str, Value)> {
        let everyone = self
            .sinks
            .iter()
            .map(|s| s.delivered)
            .min()
            .unwrap_or(self.end());
        self.drop_front(everyone.min(self.end()));
        if self.lines.len() <= BACKLOG_MAX_LINES && self.backlog_bytes <= BACKLOG_MAX_BYTES {
            return Vec::new();
        }
        // Keep the newest half of the bound.
        let mut keep = 0;
        let mut bytes = 0;
        for line in self.lines.iter().rev() {
            if keep >= BACKLOG_MAX_LINES / 2 || bytes + line.len() > BACKLOG_MAX_BYTES / 2 {
                break;
            }
            keep += 1;
            bytes += line.len();
        }
        let cut = self.end() - keep;
        // seq = line number + the seq of line 0.
        let seq_base = self.next_seq.saturating_sub(self.end() as u64);
        let seq_of = |line: usize| seq_base + line as u64;
        let mut dropped = Vec::new();
        for slot in &mut self.sinks {
            if slot.delivered < cut {
                let n = cut - slot.delivered;
                dropped.push(json!({
                    "sink": slot.name,
                    "dropped": n,
                    "first_seq": seq_of(slot.delivered),
                    "last_seq": seq_of(cut - 1),
                    "bound_lines": BACKLOG_MAX_LINES,
                    "bound_bytes": BACKLOG_MAX_BYTES,
                }));
                slot.delivered = cut;
            }
        }
        self.drop_front(cut);
        dropped
            .into_iter()
            .map(|details| (EVENT_SINK_DROPPED, details))
            .collect()
    }

    /// Forgets the lines before line number `upto`.
    fn drop_front(&mut self, upto: usize) {
        while self.first < upto {
            match self.lines.pop_front() {
                Some(line) => self.backlog_bytes -= line.len(),
                None => break,
            }
            self.first += 1;
        }
        if self.lines.is_empty() {
            self.lines.shrink_to(64);
        }
    }

    fn fatal_error(&self) -> Result<(), AuditError> {
        match self.sinks.iter().find_map(|s| Some((s, s.fatal.as_ref()?))) {
            Some((slot, (kind, msg))) => Err(AuditError::RequiredSinkFailed {
                sink: slot.name.clone(),
                source: io::Error::new(*kind, msg.clone()),
            }),
            None => Ok(()),
        }
    }

    fn record(&mut self, stage: &str, event: &str, details: Value) -> Result<Digest, AuditError> {
        let hash = self.append(stage, event, details)?;
        self.deliver();
        self.fatal_error()?;
        Ok(hash)
    }
}

impl Audit {
    /// A log writing to `sinks`; `insecure` (`attestation = "none"`) marks every record.
    pub fn new(sinks: Vec<Box<dyn Sink>>, insecure: bool) -> Audit {
        Audit::with_clock(sinks, insecure, Box::new(SystemTime::now))
    }

    /// [`Audit::new`] with an injected clock.
    pub fn with_clock(sinks: Vec<Box<dyn Sink>>, insecure: bool, clock: Clock) -> Audit {
        let sinks = sinks
            .into_iter()
            .map(|sink| Slot {
                name: sink.name(),
                required: sink.required(),
                sink,
                delivered: 0,
                ever_ok: false,
                reported: SinkState::Ok,
                last_error: None,
                fatal: None,
            })
            .collect();
        Audit {
            inner: Arc::new(Mutex::new(Inner {
                lines: VecDeque::new(),
                first: 0,
                backlog_bytes: 0,
                #[cfg(test)]
                history: Vec::new(),
                head: Digest::ZERO,
                next_seq: 0,
                insecure,
                clock,
                sinks,
            })),
        }
    }

    /// Poisoning is ignored: every update keeps `Inner` consistent before any sink runs.
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Appends a record, delivers it (and any backlog) to every sink and returns its hash.
    ///
    /// A failing sink is recorded (`audit/sink_failed`, once per failure, and
    /// `audit/sink_recovered`) and does not stop the boot, except a required sink: once it
    /// has failed (other than `NotFound` before its first write), this returns
    /// [`AuditError::RequiredSinkFailed`] for every later record too. The record is kept
    /// and delivered to the other sinks either way.
    pub fn record(&self, stage: &str, event: &str, details: Value) -> Result<Digest, AuditError> {
        self.lock().record(stage, event, details)
    }

    /// [`Audit::record`] that gives up after `timeout` if the log is held. For the panic
    /// hook: a panic in the middle of a record still holds the lock on the same thread, and
    /// waiting for it would hang instead of powering off.
    pub fn record_within(
        &self,
        timeout: Duration,
        stage: &str,
        event: &str,
        details: Value,
    ) -> Result<Digest, AuditError> {
        let start = Instant::now();
        loop {
            match self.inner.try_lock() {
                Ok(mut inner) => return inner.record(stage, event, details),
                Err(TryLockError::Poisoned(p)) => {
                    return p.into_inner().record(stage, event, details)
                }
                Err(TryLockError::WouldBlock) => {
                    if start.elapsed() >= timeout {
                        return Err(AuditError::Busy(timeout, format!("{stage}/{event}")));
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
    }

    /// The hash of the last record ([`Digest::ZERO`] before the first): what a checkpoint
    /// binds.
    pub fn head(&self) -> Digest {
        self.lock().head
    }

    /// The seq and hash of the last record, read together (`(0, ZERO)` before the first):
    /// what a checkpoint covers.
    pub fn last(&self) -> (u64, Digest) {
        let inner = self.lock();
        (inner.next_seq.saturating_sub(1), inner.head)
    }

    /// [`Audit::record`], but only while the last record is still `prev`: `Ok(None)` (and
    /// nothing written) when another record came in between. For checkpoints, whose details
    /// bind the record they follow.
    pub fn record_after(
        &self,
        prev: Digest,
        stage: &str,
        event: &str,
        details: Value,
    ) -> Result<Option<Digest>, AuditError> {
        let mut inner = self.lock();
        if inner.head != prev {
            return Ok(None);
        }
        inner.record(stage, event, details).map(Some)
    }

    /// The seq the next record will get.
    pub fn seq(&self) -> u64 {
        self.lock().next_seq
    }

    /// Whether every record carries `"insecure": true`.
    pub fn insecure(&self) -> bool {
        self.lock().insecure
    }

    /// Every line written so far, in order, without newlines (tests only: the log keeps
    /// only the lines a sink still lacks).
    #[cfg(test)]
    pub fn lines(&self) -> Vec<String> {
        self.lock().history.clone()
    }

    /// How many lines are held for sinks that have not received them, and their bytes.
    pub fn backlog(&self) -> (usize, usize) {
        let inner = self.lock();
        (inner.lines.len(), inner.backlog_bytes)
    }

    /// Offers every sink its backlog again and flushes them (every delivery already ends
    /// with a flush; this is for shutdown). Fails only for a required sink that has failed;
    /// a flush error of an optional sink is left for the next delivery to record.
    pub fn flush(&self) -> Result<(), AuditError> {
        let mut inner = self.lock();
        inner.deliver();
        for slot in &mut inner.sinks {
            if slot.delivered == 0 {
                continue;
            }
            if let Err(e) = slot.sink.flush() {
                let err = (e.kind(), e.to_string());
                if slot.required && slot.fatal.is_none() {
                    slot.fatal = Some(err.clone());
                }
                slot.last_error = Some(err);
            }
        }
        inner.fatal_error()
    }

    /// The required sink that failed (its name and error), if one did: from then on no
    /// record reaches the place the policy requires, so whatever runs must stop.
    pub fn required_failure(&self) -> Option<(String, String)> {
        let inner = self.lock();
        inner.sinks.iter().find_map(|slot| {
            slot.fatal
                .as_ref()
                .map(|(_, msg)| (slot.name.clone(), msg.clone()))
        })
    }

    /// Called just before launch: every required sink must have received every record.
    pub fn require_sinks(&self) -> Result<(), AuditError> {
        let mut inner = self.lock();
        inner.deliver();
        inner.fatal_error()?;
        let total = inner.end();
        match inner
            .sinks
            .iter()
            .find(|s| s.required && s.delivered < total)
        {
            Some(slot) => Err(AuditError::RequiredSinkBehind {
                sink: slot.name.clone(),
                pending: total - slot.delivered,
                source: slot
                    .last_error
                    .as_ref()
                    .map(|(kind, msg)| io::Error::new(*kind, msg.clone())),
            }),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests;

/// The verifier's evidence checks against evidence the daemon's own providers wrote (the
/// writer and the reader must agree), so these tests live on the daemon's side.
#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod evidence_tests;
