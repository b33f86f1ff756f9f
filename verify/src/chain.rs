//! The hash chain of an audit log, read as a stream.
//!
//! Each line's hash is checked over its exact bytes, then the chain: seq counts up from 0
//! and `prev` is the hash of the record before. A file may hold several *runs* one after
//! another (a file sink on a persistent volume is appended to at every boot): a run starts
//! with seq 0 and `prev` = `sha256:000…`. Further checks plug in through [`RecordCheck`]
//! (the evidence and checkpoint checks of [`crate::check`]); what the whole proves is
//! decided in [`crate::verdict`].
//!
//! The log is read line by line (memory bounded by the longest line, not the file). Lines
//! that are not records — anything not starting with `{"seq":`, such as the prefixed
//! workload output and kernel messages of a serial console capture — are skipped and
//! counted; a trailing `\r` (a console's CRLF) is removed. Skipping them cannot make a log
//! verify better: every record still has to chain to the one before.

use std::fmt;
use std::io::{self, BufRead};
use std::path::{Path, PathBuf};

use crate::digest::Digest;
use crate::record::{is_closing, leading_seq, LineError, Record};

/// One more check on each record, after its hash and its chain link were verified (a
/// checkpoint verifier: its evidence must bind `record.prev`, the head it was taken at).
pub trait RecordCheck {
    /// A short name for error messages, e.g. `checkpoint`.
    fn name(&self) -> String;
    /// Checks one record; records come in file order. The error says what is wrong.
    fn check(&mut self, record: &Record) -> Result<(), String>;
}

/// What went wrong at the line where verification stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// The hash over the line's bytes differs from the one it states.
    Changed,
    /// The line is not a record.
    Malformed(String),
    /// The last line is incomplete.
    Truncated,
    /// The first record of the file is not seq 0.
    StartsLate {
        /// The seq it has.
        seq: u64,
    },
    /// A seq 0 record whose `prev` is not zero.
    FirstPrevNotZero,
    /// Seq skips records that do not appear anywhere later.
    Removed {
        /// The seq before the gap.
        after: u64,
        /// The seq after the gap.
        next: u64,
    },
    /// Seq skips records that appear later, or goes back.
    Reordered {
        /// The seq before.
        after: u64,
        /// The seq that came instead of `after + 1`.
        next: u64,
    },
    /// The same seq twice in a row.
    Inserted {
        /// The repeated seq.
        seq: u64,
    },
    /// Seq counts on but `prev` is not the hash of the record before.
    PrevMismatch {
        /// The seq before.
        after: u64,
    },
    /// A record's `insecure` flag differs from the first record of its run.
    InsecureFlagChanged,
    /// A [`RecordCheck`] rejected the record.
    Rejected {
        /// The check's name.
        check: String,
        /// Why.
        reason: String,
    },
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::Changed => write!(f, "hash mismatch, the record was changed"),
            Problem::Malformed(why) => write!(f, "not an audit record ({why})"),
            Problem::Truncated => write!(
                f,
                "the last line is incomplete, the log was cut while or after it was written"
            ),
            Problem::StartsLate { seq } => write!(
                f,
                "the log starts at seq {seq}, not 0, the records before it were removed"
            ),
            Problem::FirstPrevNotZero => write!(
                f,
                "a seq 0 record whose prev is not zero, records before it were removed or it \
                 was inserted"
            ),
            Problem::Removed { after, next } => write!(
                f,
                "seq jumps from {after} to {next}, {} record(s) were removed",
                next - after - 1
            ),
            Problem::Reordered { after, next } => write!(
                f,
                "seq {next} comes right after seq {after}, records were reordered"
            ),
            Problem::Inserted { seq } => {
                write!(f, "seq {seq} appears twice in a row, a record was inserted")
            }
            Problem::PrevMismatch { after } => write!(
                f,
                "prev is not the hash of seq {after}, one of the two records was replaced or \
                 inserted"
            ),
            Problem::InsecureFlagChanged => write!(
                f,
                "the insecure flag differs from the first record of this run, the record was \
                 changed"
            ),
            Problem::Rejected { check, reason } => write!(f, "{check} check failed: {reason}"),
        }
    }
}

/// Why a log does not verify.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// The file could not be read.
    #[error("cannot read audit log {path}; check the path and its permissions")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// No bytes at all.
    #[error("audit log is empty; it holds no record (was the sink ever written?)")]
    Empty,
    /// The chain is broken.
    #[error(
        "audit log broken at line {line}{}: {problem}; {}",
        seq_part(*.seq),
        last_good_part(*.last_good)
    )]
    Broken {
        /// 1-based line number.
        line: usize,
        /// The seq of the offending line, when it could be read.
        seq: Option<u64>,
        /// The last seq of the chain that verified up to the break (in the run being read);
        /// `None` when no record before the break can be trusted.
        last_good: Option<u64>,
        /// What is wrong.
        problem: Problem,
    },
    /// The report could not be printed.
    #[error("cannot write the verification report")]
    Output(#[source] io::Error),
}

fn seq_part(seq: Option<u64>) -> String {
    seq.map(|s| format!(" (seq {s})")).unwrap_or_default()
}

fn last_good_part(last_good: Option<u64>) -> String {
    match last_good {
        Some(s) => format!("last good seq is {s}"),
        None => "no record before it can be trusted".to_string(),
    }
}

/// One run of the log (one boot, or one start of the unit).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunSummary {
    /// Its number in the file, from 1.
    pub index: usize,
    /// The line of its seq 0 record.
    pub first_line: usize,
    /// How many records it holds.
    pub records: u64,
    /// Its last seq.
    pub last_seq: u64,
    /// The hash of its last record.
    pub head: Digest,
    /// The seq of its closing record (one of [`CLOSING_EVENTS`](crate::record::CLOSING_EVENTS)),
    /// when nothing but checkpoint records (`audit/checkpoint`, `audit/checkpoint_failed`)
    /// follows it.
    pub closing_seq: Option<u64>,
    /// It has a closing record followed by nothing but checkpoint records.
    pub complete: bool,
    /// Its last line was torn (a crash while writing) and the next run began after it.
    pub torn: bool,
    /// Its records say `"insecure": true` (`attestation = "none"`).
    pub insecure: bool,
}

/// A log whose chain verified. The main fields describe the last run (the newest boot).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// Records in the last run.
    pub records: u64,
    /// The last run's last seq.
    pub last_seq: u64,
    /// The last run's head (hash of its last record).
    pub head: Digest,
    /// Any record in the file is marked insecure (`attestation = "none"`).
    pub insecure: bool,
    /// The last run ends with a closing record (and its closing checkpoint).
    pub complete: bool,
    /// Earlier runs in the same file, oldest first.
    pub earlier_runs: Vec<RunSummary>,
    /// Every run, oldest first (the last one is the one the main fields describe).
    pub runs: Vec<RunSummary>,
    /// Lines that are not records (console capture) and were skipped.
    pub skipped_lines: u64,
}

/// True for the records allowed after a run's closing record: its closing checkpoint.
pub fn is_checkpoint_record(stage: &str, event: &str) -> bool {
    stage == "audit" && (event == "checkpoint" || event == "checkpoint_failed")
}

/// The run being read.
struct Run {
    index: usize,
    first_line: usize,
    records: u64,
    last_seq: u64,
    head: Digest,
    insecure: bool,
    closing_seq: Option<u64>,
}

impl Run {
    fn start(index: usize, line: usize, record: &Record) -> Run {
        let mut run = Run {
            index,
            first_line: line,
            records: 0,
            last_seq: record.seq,
            head: record.hash,
            insecure: record.insecure,
            closing_seq: None,
        };
        run.push(record);
        run
    }

    fn push(&mut self, record: &Record) {
        self.records += 1;
        self.last_seq = record.seq;
        self.head = record.hash;
        if is_closing(&record.stage, &record.event) {
            self.closing_seq = Some(record.seq);
        } else if !is_checkpoint_record(&record.stage, &record.event) {
            self.closing_seq = None;
        }
    }

    fn summary(&self, torn: bool) -> RunSummary {
        let closing_seq = if torn { None } else { self.closing_seq };
        RunSummary {
            index: self.index,
            first_line: self.first_line,
            records: self.records,
            last_seq: self.last_seq,
            head: self.head,
            closing_seq,
            complete: closing_seq.is_some(),
            torn,
            insecure: self.insecure,
        }
    }
}

fn is_run_start(record: &Record) -> bool {
    record.seq == 0 && record.prev == Digest::ZERO
}

/// One line of the file: its number, its bytes without `\n` (and without a console's
/// `\r`), and whether it ended with `\n`.
struct Line {
    number: usize,
    bytes: Vec<u8>,
    ended: bool,
}

impl Line {
    /// A record line, or a line that looks like JSON (which another tool could read as a
    /// record, so it is judged as one and cannot be skipped).
    fn is_record_line(&self) -> bool {
        self.bytes.trim_ascii_start().starts_with(b"{")
    }
}

/// The longest line read (a record with all its evidence is far smaller); a longer one is
/// an error rather than unbounded memory.
pub const MAX_LINE: usize = 16 << 20;

/// Reads lines one at a time; memory is bounded by the longest line.
struct Lines<R> {
    reader: R,
    number: usize,
}

impl<R: BufRead> Lines<R> {
    fn next_line(&mut self) -> io::Result<Option<Line>> {
        let mut bytes = Vec::new();
        let limit = u64::try_from(MAX_LINE + 2).unwrap_or(u64::MAX);
        if io::Read::take(&mut self.reader, limit).read_until(b'\n', &mut bytes)? == 0 {
            return Ok(None);
        }
        if bytes.len() > MAX_LINE && bytes.last() != Some(&b'\n') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "line {} is longer than {MAX_LINE} bytes: not an audit log",
                    self.number + 1
                ),
            ));
        }
        self.number += 1;
        let ended = bytes.last() == Some(&b'\n');
        if ended {
            bytes.pop();
            if bytes.last() == Some(&b'\r') {
                bytes.pop();
            }
        }
        Ok(Some(Line {
            number: self.number,
            bytes,
            ended,
        }))
    }

    /// The next line that may be a record (lines that are not are counted in `skipped`).
    fn next_record_line(&mut self, skipped: &mut u64) -> io::Result<Option<Line>> {
        while let Some(line) = self.next_line()? {
            if line.is_record_line() {
                return Ok(Some(line));
            }
            if !line.bytes.iter().all(u8::is_ascii_whitespace) {
                *skipped += 1;
            }
        }
        Ok(None)
    }
}

/// Verifies a whole log held in memory.
pub fn verify(bytes: &[u8]) -> Result<VerifyReport, VerifyError> {
    verify_with(bytes, &mut [])
}

/// Reads and verifies a log file, streaming.
pub fn verify_file(path: &Path) -> Result<VerifyReport, VerifyError> {
    let file = std::fs::File::open(path).map_err(|source| VerifyError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    verify_reader(io::BufReader::new(file), path, &mut [])
}

/// Verifies a log held in memory and runs `checks` on every record whose hash and link
/// verified.
pub fn verify_with(
    bytes: &[u8],
    checks: &mut [&mut dyn RecordCheck],
) -> Result<VerifyReport, VerifyError> {
    verify_reader(bytes, Path::new("<memory>"), checks)
}

/// Verifies a log read from `reader` (named `path` in errors), one line at a time, and runs
/// `checks` on every record whose hash and link verified.
pub fn verify_reader<R: BufRead>(
    reader: R,
    path: &Path,
    checks: &mut [&mut dyn RecordCheck],
) -> Result<VerifyReport, VerifyError> {
    let read_error = |source: io::Error| VerifyError::Read {
        path: path.to_path_buf(),
        source,
    };
    let mut lines = Lines { reader, number: 0 };
    let mut skipped = 0u64;
    let mut runs: Vec<RunSummary> = Vec::new();
    let mut run: Option<Run> = None;
    let mut insecure = false;
    // A torn line that may end the run before it: only if a new run follows at once.
    let mut torn_at: Option<usize> = None;
    let mut last_ended = true;
    let mut any_line = false;

    let mut current = lines.next_record_line(&mut skipped).map_err(read_error)?;
    while let Some(line) = current {
        any_line = true;
        let next = lines.next_record_line(&mut skipped).map_err(read_error)?;
        let number = line.number;
        let last_good = run.as_ref().map(|r| r.last_seq);
        let broken =
            |seq: Option<u64>, last_good: Option<u64>, problem: Problem| VerifyError::Broken {
                line: number,
                seq,
                last_good,
                problem,
            };
        last_ended = line.ended;
        let record = match Record::parse_line(&line.bytes) {
            Ok(record) => record,
            Err(LineError::NoHashMember) if next.is_none() => {
                return Err(broken(None, last_good, Problem::Truncated))
            }
            Err(LineError::NoHashMember)
                if torn_at.is_none()
                    && matches!(
                        next.as_ref().map(|n| Record::parse_line(&n.bytes)),
                        Some(Ok(ref r)) if is_run_start(r)
                    ) =>
            {
                torn_at = Some(number);
                current = next;
                continue;
            }
            Err(LineError::NoHashMember) => {
                return Err(broken(
                    None,
                    last_good,
                    Problem::Malformed(
                        "it does not end with ,\"hash\":\"sha256:<64 hex digits>\"}".to_string(),
                    ),
                ))
            }
            Err(LineError::HashMismatch { .. }) => {
                return Err(broken(
                    leading_seq(&line.bytes),
                    last_good,
                    Problem::Changed,
                ));
            }
            Err(LineError::Json(why)) => {
                return Err(broken(
                    leading_seq(&line.bytes),
                    last_good,
                    Problem::Malformed(why),
                ));
            }
        };
        let seq = Some(record.seq);
        match run.as_mut() {
            None => {
                if record.seq != 0 {
                    return Err(broken(seq, None, Problem::StartsLate { seq: record.seq }));
                }
                if record.prev != Digest::ZERO {
                    return Err(broken(seq, None, Problem::FirstPrevNotZero));
                }
                if let Some(torn_line) = torn_at.take() {
                    runs.push(torn_only_run(runs.len() + 1, torn_line));
                }
                run = Some(Run::start(runs.len() + 1, number, &record));
            }
            Some(current_run) if is_run_start(&record) => {
                runs.push(current_run.summary(torn_at.take().is_some()));
                *current_run = Run::start(runs.len() + 1, number, &record);
            }
            Some(current_run) => {
                let after = current_run.last_seq;
                let problem = if record.seq == after + 1 {
                    (record.prev != current_run.head).then_some(Problem::PrevMismatch { after })
                } else if record.seq == after {
                    Some(Problem::Inserted { seq: after })
                } else if record.seq > after + 1 {
                    let missing = after + 1..record.seq;
                    let appears_later =
                        appears_later(&mut lines, next.as_ref(), &missing).map_err(read_error)?;
                    Some(if appears_later {
                        Problem::Reordered {
                            after,
                            next: record.seq,
                        }
                    } else {
                        Problem::Removed {
                            after,
                            next: record.seq,
                        }
                    })
                } else if record.seq == 0 {
                    Some(Problem::FirstPrevNotZero)
                } else {
                    Some(Problem::Reordered {
                        after,
                        next: record.seq,
                    })
                };
                if let Some(problem) = problem {
                    // Where one of the two neighbours is foreign, the one before is suspect.
                    let last_good = match problem {
                        Problem::Inserted { .. } | Problem::PrevMismatch { .. } => {
                            after.checked_sub(1)
                        }
                        _ => Some(after),
                    };
                    return Err(broken(seq, last_good, problem));
                }
                if record.insecure != current_run.insecure {
                    return Err(broken(seq, Some(after), Problem::InsecureFlagChanged));
                }
                current_run.push(&record);
            }
        }
        for check in checks.iter_mut() {
            if let Err(reason) = check.check(&record) {
                let last_good = record.seq.checked_sub(1);
                return Err(broken(
                    seq,
                    last_good,
                    Problem::Rejected {
                        check: check.name(),
                        reason,
                    },
                ));
            }
        }
        insecure |= record.insecure;
        current = next;
    }

    if !any_line {
        return Err(VerifyError::Empty);
    }
    let tail_line = lines.number;
    let run = run.ok_or(VerifyError::Broken {
        line: tail_line,
        seq: None,
        last_good: None,
        problem: Problem::Truncated,
    })?;
    if !last_ended {
        return Err(VerifyError::Broken {
            line: tail_line,
            seq: Some(run.last_seq),
            last_good: run.last_seq.checked_sub(1),
            problem: Problem::Truncated,
        });
    }
    let last = run.summary(false);
    let earlier = runs.clone();
    runs.push(last.clone());
    Ok(VerifyReport {
        records: last.records,
        last_seq: last.last_seq,
        head: last.head,
        insecure,
        complete: last.complete,
        earlier_runs: earlier,
        runs,
        skipped_lines: skipped,
    })
}

/// Whether any seq of `missing` appears in the rest of the run (the line after the gap and
/// what follows it, up to the next run): tells reordered records from removed ones. Reads
/// on from `lines`, one line at a time.
fn appears_later<R: BufRead>(
    lines: &mut Lines<R>,
    next: Option<&Line>,
    missing: &std::ops::Range<u64>,
) -> io::Result<bool> {
    let mut skipped = 0;
    let seq_of = |line: &Line| -> Option<Option<u64>> {
        match Record::parse_line(&line.bytes) {
            Ok(r) if is_run_start(&r) => None,
            Ok(r) => Some(Some(r.seq)),
            Err(_) => Some(None),
        }
    };
    if let Some(line) = next {
        match seq_of(line) {
            None => return Ok(false),
            Some(Some(s)) if missing.contains(&s) => return Ok(true),
            Some(_) => {}
        }
    }
    while let Some(line) = lines.next_record_line(&mut skipped)? {
        match seq_of(&line) {
            None => return Ok(false),
            Some(Some(s)) if missing.contains(&s) => return Ok(true),
            Some(_) => {}
        }
    }
    Ok(false)
}

/// A run of which only a torn first line is left.
fn torn_only_run(index: usize, line: usize) -> RunSummary {
    RunSummary {
        index,
        first_line: line,
        records: 0,
        last_seq: 0,
        head: Digest::ZERO,
        closing_seq: None,
        complete: false,
        torn: true,
        insecure: false,
    }
}
