//! Offline verification of an audit log (`cvm-warden audit verify FILE`).
//!
//! Each line's hash is checked over its exact bytes, then the chain: seq counts up from 0
//! and `prev` is the hash of the record before. A file may hold several *runs* one after
//! another (a file sink on a persistent volume is appended to at every boot): a run starts
//! with seq 0 and `prev` = `sha256:000…`. Further checks plug in through [`RecordCheck`];
//! [`run_verify_command`] adds the [`EvidenceCheck`] (the broker exchange's binding and
//! evidence, and the checkpoint that binds the log to the TEE).

use std::fmt;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use crate::check::{EvidenceCheck, EvidenceFinding};
use crate::digest::Digest;
use crate::record::{is_closing, LineError, Record};

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
    /// The line of its seq 0 record.
    pub first_line: usize,
    /// How many records it holds.
    pub records: u64,
    /// Its last seq.
    pub last_seq: u64,
    /// The hash of its last record.
    pub head: Digest,
    /// Its last record is one of [`CLOSING_EVENTS`](crate::record::CLOSING_EVENTS).
    pub complete: bool,
    /// Its last line was torn (a crash while writing) and the next run began after it.
    pub torn: bool,
}

/// A log that verified. The main fields describe the last run (the newest boot).
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
    /// The last run ends with a closing record.
    pub complete: bool,
    /// Earlier runs in the same file, oldest first.
    pub earlier_runs: Vec<RunSummary>,
}

/// The run being read.
struct Run {
    first_line: usize,
    records: u64,
    last_seq: u64,
    head: Digest,
    insecure: bool,
    complete: bool,
}

impl Run {
    fn start(line: usize, record: &Record) -> Run {
        Run {
            first_line: line,
            records: 1,
            last_seq: record.seq,
            head: record.hash,
            insecure: record.insecure,
            complete: is_closing(&record.stage, &record.event),
        }
    }

    fn summary(&self, torn: bool) -> RunSummary {
        RunSummary {
            first_line: self.first_line,
            records: self.records,
            last_seq: self.last_seq,
            head: self.head,
            complete: self.complete && !torn,
            torn,
        }
    }
}

fn is_run_start(record: &Record) -> bool {
    record.seq == 0 && record.prev == Digest::ZERO
}

/// Verifies a whole log.
pub fn verify(bytes: &[u8]) -> Result<VerifyReport, VerifyError> {
    verify_with(bytes, &mut [])
}

/// Reads and verifies a log file.
pub fn verify_file(path: &Path) -> Result<VerifyReport, VerifyError> {
    let bytes = std::fs::read(path).map_err(|source| VerifyError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    verify(&bytes)
}

/// Verifies a log and runs `checks` on every record whose hash and link verified.
pub fn verify_with(
    bytes: &[u8],
    checks: &mut [&mut dyn RecordCheck],
) -> Result<VerifyReport, VerifyError> {
    if bytes.is_empty() {
        return Err(VerifyError::Empty);
    }
    let ends_with_newline = bytes.last() == Some(&b'\n');
    let body = if ends_with_newline {
        &bytes[..bytes.len() - 1]
    } else {
        bytes
    };
    let lines: Vec<&[u8]> = body.split(|b| *b == b'\n').collect();
    let parsed: Vec<Result<Record, LineError>> =
        lines.iter().map(|l| Record::parse_line(l)).collect();

    let mut earlier: Vec<RunSummary> = Vec::new();
    let mut run: Option<Run> = None;
    let mut insecure = false;
    // A torn line that may end the run before it: only if a new run follows at once.
    let mut torn_at: Option<usize> = None;

    for (idx, result) in parsed.iter().enumerate() {
        let line = idx + 1;
        let is_last = idx + 1 == parsed.len();
        let last_good = run.as_ref().map(|r| r.last_seq);
        let broken =
            |seq: Option<u64>, last_good: Option<u64>, problem: Problem| VerifyError::Broken {
                line,
                seq,
                last_good,
                problem,
            };
        let record = match result {
            Ok(record) => record,
            Err(LineError::NoHashMember) if is_last => {
                return Err(broken(None, last_good, Problem::Truncated))
            }
            Err(LineError::NoHashMember)
                if torn_at.is_none()
                    && lines[idx].starts_with(b"{\"seq\":")
                    && matches!(parsed.get(idx + 1), Some(Ok(next)) if is_run_start(next)) =>
            {
                torn_at = Some(line);
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
                let seq = crate::record::leading_seq(lines[idx]);
                return Err(broken(seq, last_good, Problem::Changed));
            }
            Err(LineError::Json(why)) => {
                let seq = crate::record::leading_seq(lines[idx]);
                return Err(broken(seq, last_good, Problem::Malformed(why.clone())));
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
                    earlier.push(torn_only_run(torn_line));
                }
                run = Some(Run::start(line, record));
            }
            Some(current) if is_run_start(record) => {
                earlier.push(current.summary(torn_at.take().is_some()));
                *current = Run::start(line, record);
            }
            Some(current) => {
                let after = current.last_seq;
                let problem = if record.seq == after + 1 {
                    (record.prev != current.head).then_some(Problem::PrevMismatch { after })
                } else if record.seq == after {
                    Some(Problem::Inserted { seq: after })
                } else if record.seq > after + 1 {
                    let missing = after + 1..record.seq;
                    let appears_later = parsed[idx + 1..]
                        .iter()
                        .map_while(|later| match later {
                            Ok(r) if is_run_start(r) => None,
                            Ok(r) => Some(Some(r.seq)),
                            Err(_) => Some(None),
                        })
                        .flatten()
                        .any(|s| missing.contains(&s));
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
                if record.insecure != current.insecure {
                    return Err(broken(seq, Some(after), Problem::InsecureFlagChanged));
                }
                current.records += 1;
                current.last_seq = record.seq;
                current.head = record.hash;
                current.complete = is_closing(&record.stage, &record.event);
            }
        }
        for check in checks.iter_mut() {
            if let Err(reason) = check.check(record) {
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
    }

    let tail_line = parsed.len();
    let run = run.ok_or(VerifyError::Broken {
        line: tail_line,
        seq: None,
        last_good: None,
        problem: Problem::Truncated,
    })?;
    if !ends_with_newline {
        return Err(VerifyError::Broken {
            line: tail_line,
            seq: Some(run.last_seq),
            last_good: run.last_seq.checked_sub(1),
            problem: Problem::Truncated,
        });
    }
    Ok(VerifyReport {
        records: run.records,
        last_seq: run.last_seq,
        head: run.head,
        insecure,
        complete: run.complete,
        earlier_runs: earlier,
    })
}

/// A run of which only a torn first line is left.
fn torn_only_run(line: usize) -> RunSummary {
    RunSummary {
        first_line: line,
        records: 0,
        last_seq: 0,
        head: Digest::ZERO,
        complete: false,
        torn: true,
    }
}

/// `cvm-warden audit verify FILE`: verifies the chain and the attestation evidence
/// ([`EvidenceCheck`]) and prints the result to `out`.
///
/// On success it prints `ok: N records, seq 0..M, head sha256:…, complete` (or
/// `incomplete`), one line per earlier run, the warnings, and, when the log holds attest
/// records, an `evidence:` section (per record: the TEE, what was verified, warnings); on
/// failure it prints nothing and returns the error for the CLI to print (exit code 1).
pub fn run_verify_command(path: &Path, out: &mut dyn Write) -> Result<VerifyReport, VerifyError> {
    let bytes = std::fs::read(path).map_err(|source| VerifyError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let mut evidence = EvidenceCheck::new();
    let report = verify_with(&bytes, &mut [&mut evidence])?;
    let findings = evidence.finish();
    print_report(&report, out).map_err(VerifyError::Output)?;
    print_evidence(&findings, out).map_err(VerifyError::Output)?;
    Ok(report)
}

/// The `evidence:` section: nothing when the log holds no attest record.
fn print_evidence(findings: &[EvidenceFinding], out: &mut dyn Write) -> io::Result<()> {
    if findings.is_empty() {
        return Ok(());
    }
    let several_runs = findings.iter().any(|f| f.run != findings[0].run);
    writeln!(out, "evidence:")?;
    for finding in findings {
        let run = if several_runs {
            format!("run {} ", finding.run)
        } else {
            String::new()
        };
        writeln!(
            out,
            "  {run}seq {} {}, tee {}:",
            finding.seq, finding.what, finding.tee
        )?;
        for item in &finding.verified {
            writeln!(out, "    verified: {item}")?;
        }
        for item in &finding.warnings {
            writeln!(out, "    WARNING: {item}")?;
        }
    }
    Ok(())
}

fn print_report(report: &VerifyReport, out: &mut dyn Write) -> io::Result<()> {
    writeln!(
        out,
        "ok: {} records, seq 0..{}, head {}, {}",
        report.records,
        report.last_seq,
        report.head,
        if report.complete {
            "complete"
        } else {
            "incomplete"
        }
    )?;
    for (i, run) in report.earlier_runs.iter().enumerate() {
        writeln!(
            out,
            "earlier run {} at line {}: {} records, seq 0..{}, head {}, {}",
            i + 1,
            run.first_line,
            run.records,
            run.last_seq,
            run.head,
            if run.complete {
                "complete"
            } else if run.torn {
                "incomplete (its last line was torn)"
            } else {
                "incomplete"
            }
        )?;
    }
    if report.insecure {
        writeln!(out, "WARNING: insecure (attestation = \"none\")")?;
    }
    if !report.complete {
        writeln!(
            out,
            "WARNING: log does not end with a closing record; it may have been cut after seq {}",
            report.last_seq
        )?;
    }
    for (i, run) in report.earlier_runs.iter().enumerate() {
        if !run.complete {
            writeln!(
                out,
                "WARNING: earlier run {} does not end with a closing record; it may have been \
                 cut after seq {}",
                i + 1,
                run.last_seq
            )?;
        }
    }
    Ok(())
}
