//! What an audit log proves: one verdict per run (`cvm-warden audit verify`).
//!
//! The hash chain has no key, so anyone can write a consistent one: only TEE evidence says
//! where a log came from. A record is *attested* when a verified checkpoint of the TEE
//! instance and boot that answered the broker covers it (the checkpoint's evidence binds the
//! hash of that record, and so of every record before it). Per run:
//!
//! - `attested`: every record up to and including the closing record is covered;
//! - `attested up to seq N`: the chain holds, but the records past N are covered by no
//!   checkpoint (they are named, marked *not attested*);
//! - `unattested`: no evidence that proves anything (`attestation = "none"`, `sample`, a TPM
//!   whose AK is not pinned, TDX quotes, no checkpoint);
//! - `broken`: the chain, a binding, the evidence or an auditor's pin fails; the whole file
//!   is broken (exit 1), with the last good seq.
//!
//! Exit status: 0 only when every run in the file is `attested`; 3 when the file is intact
//! but some run is not; 1 broken or unreadable; 2 usage.

use std::io::{self, Write};
use std::path::Path;

use serde::Serialize;

use crate::chain::{verify_reader, RunSummary, VerifyError};
use crate::check::{EvidenceCheck, EvidenceFinding, Pins, RunEvidence, TailRecord};
use crate::digest::Digest;
use crate::text::sanitize;

/// Exit status: every run attested.
pub const EXIT_ATTESTED: i32 = 0;
/// Exit status: broken or unreadable.
pub const EXIT_BROKEN: i32 = 1;
/// Exit status: usage.
pub const EXIT_USAGE: i32 = 2;
/// Exit status: intact, but some run is not fully attested.
pub const EXIT_NOT_ATTESTED: i32 = 3;

/// What one run's evidence proves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "verdict", rename_all = "kebab-case")]
pub enum Verdict {
    /// Every record up to and including the closing record is covered.
    Attested,
    /// Records up to `seq` are covered; the rest is chained but not attested.
    AttestedUpTo {
        /// The last covered seq.
        seq: u64,
    },
    /// Nothing in the run is attested.
    Unattested {
        /// Why.
        reason: String,
    },
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Verdict::Attested => write!(f, "attested"),
            Verdict::AttestedUpTo { seq } => write!(f, "attested up to seq {seq}"),
            Verdict::Unattested { reason } => write!(f, "unattested ({})", sanitize(reason, 2000)),
        }
    }
}

/// One run and its verdict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RunVerdict {
    /// The run's number in the file, from 1.
    pub run: usize,
    /// The line of its first record.
    pub first_line: usize,
    /// How many records it holds.
    pub records: u64,
    /// Its last seq.
    pub last_seq: u64,
    /// The hash of its last record.
    pub head: Digest,
    /// It ends with a closing record (and only its checkpoint after it).
    pub complete: bool,
    /// Its records say `"insecure": true`.
    pub insecure: bool,
    /// The TEE of its broker exchange.
    pub tee: Option<String>,
    /// What it proves.
    #[serde(flatten)]
    pub verdict: Verdict,
    /// How many records no checkpoint covers.
    pub not_attested_count: u64,
    /// The newest of them (see [`crate::check::TAIL_KEPT`]).
    pub not_attested: Vec<TailRecord>,
}

/// The outcome of a log that is not broken.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Outcome {
    /// Every run, oldest first.
    pub runs: Vec<RunVerdict>,
    /// What the evidence checks verified and warned about, per record.
    pub evidence: Vec<EvidenceFinding>,
    /// Lines skipped as not records (a console capture's other output).
    pub skipped_lines: u64,
}

impl Outcome {
    /// 0 when there is a run and every run is attested, else 3.
    pub fn exit_code(&self) -> i32 {
        // An outcome without runs attests nothing (a log without records is refused
        // earlier; this keeps a vacuous "all" from ever meaning attested).
        if !self.runs.is_empty() && self.runs.iter().all(|r| r.verdict == Verdict::Attested) {
            EXIT_ATTESTED
        } else {
            EXIT_NOT_ATTESTED
        }
    }
}

/// Verifies a log file (streaming) with the auditor's pins and judges every run.
pub fn verify_log(path: &Path, pins: Pins) -> Result<Outcome, VerifyError> {
    let file = std::fs::File::open(path).map_err(|source| VerifyError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    verify_log_from(io::BufReader::new(file), path, pins)
}

/// [`verify_log`] over any reader (`path` names it in errors).
pub fn verify_log_from<R: io::BufRead>(
    reader: R,
    path: &Path,
    pins: Pins,
) -> Result<Outcome, VerifyError> {
    let mut evidence = EvidenceCheck::with_pins(pins);
    let report = verify_reader(reader, path, &mut [&mut evidence])?;
    let (findings, run_evidence) = evidence.finish_runs();
    let mut proofs = run_evidence.into_iter();
    let runs = report
        .runs
        .iter()
        .map(|summary| {
            let proof = (summary.records > 0).then(|| proofs.next()).flatten();
            judge(summary, proof)
        })
        .collect();
    Ok(Outcome {
        runs,
        evidence: findings,
        skipped_lines: report.skipped_lines,
    })
}

fn judge(summary: &RunSummary, proof: Option<RunEvidence>) -> RunVerdict {
    let proof = proof.unwrap_or_default();
    let verdict = if summary.records == 0 {
        Verdict::Unattested {
            reason: "only a torn line is left of this run".to_string(),
        }
    } else if summary.insecure {
        Verdict::Unattested {
            reason: match (&proof.tee, &proof.unproven) {
                (None, _) => {
                    "attestation = \"none\": the boot asked no TEE for evidence".to_string()
                }
                (Some(tee), unproven) => format!(
                    "its records are marked insecure (tee {tee}: sample evidence, a simulated GPU \
                     or GPU developer tools prove nothing){}",
                    unproven
                        .as_ref()
                        .map(|why| format!("; {why}"))
                        .unwrap_or_default()
                ),
            },
        }
    } else {
        match proof.covered_through {
            None => Verdict::Unattested {
                reason: proof
                    .unproven
                    .clone()
                    .unwrap_or_else(|| "no verified checkpoint".to_string()),
            },
            Some(covered) => {
                let closed = summary.closing_seq.is_some_and(|c| covered >= c);
                if closed && proof.tail_count == 0 {
                    Verdict::Attested
                } else {
                    Verdict::AttestedUpTo { seq: covered }
                }
            }
        }
    };
    let (not_attested_count, not_attested) = if verdict == Verdict::Attested {
        (0, Vec::new())
    } else if proof.covered_through.is_none() {
        (summary.records, Vec::new())
    } else {
        (proof.tail_count, proof.tail.iter().cloned().collect())
    };
    RunVerdict {
        run: summary.index,
        first_line: summary.first_line,
        records: summary.records,
        last_seq: summary.last_seq,
        head: summary.head,
        complete: summary.complete,
        insecure: summary.insecure,
        tee: proof.tee,
        verdict,
        not_attested_count,
        not_attested,
    }
}

/// `audit verify`: verifies `path`, prints the verdicts (text, or JSON with `json`) to
/// `out`, and returns the exit status. A broken log is printed as such (JSON) or returned
/// as the error for the caller to print (text).
pub fn run_verify_command(
    path: &Path,
    pins: Pins,
    json: bool,
    out: &mut dyn Write,
) -> Result<i32, VerifyError> {
    match verify_log(path, pins) {
        Ok(outcome) => {
            let printed = if json {
                print_json(&outcome, out)
            } else {
                print_text(&outcome, out)
            };
            printed.map_err(VerifyError::Output)?;
            Ok(outcome.exit_code())
        }
        Err(error) if json => {
            let value = broken_json(&error);
            writeln!(out, "{}", json_escape_unsafe(&value.to_string()))
                .map_err(VerifyError::Output)?;
            Err(error)
        }
        Err(error) => Err(error),
    }
}

fn broken_json(error: &VerifyError) -> serde_json::Value {
    let mut value = serde_json::json!({
        "verdict": "broken",
        "error": crate::error_chain(error),
    });
    if let VerifyError::Broken {
        line,
        seq,
        last_good,
        ..
    } = error
    {
        value["line"] = serde_json::json!(line);
        value["seq"] = serde_json::json!(seq);
        value["last_good_seq"] = serde_json::json!(last_good);
    }
    value
}

fn print_json(outcome: &Outcome, out: &mut dyn Write) -> io::Result<()> {
    let mut value = serde_json::to_value(outcome).map_err(io::Error::other)?;
    value["exit_code"] = serde_json::json!(outcome.exit_code());
    let text = serde_json::to_string_pretty(&value).map_err(io::Error::other)?;
    writeln!(out, "{}", json_escape_unsafe(&text))
}

/// serde_json leaves DEL, C1 controls and bidi/format characters as they are; text from the
/// log reaches the JSON output, so those become `\uXXXX` escapes (valid JSON, inside
/// strings: the only raw control characters serde writes outside strings are the pretty
/// printer's newlines, which are kept).
fn json_escape_unsafe(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c != '\n' && crate::text::is_unsafe_char(c) {
            out.push_str(&format!("\\u{:04x}", u32::from(c)));
        } else {
            out.push(c);
        }
    }
    out
}

fn print_text(outcome: &Outcome, out: &mut dyn Write) -> io::Result<()> {
    for run in &outcome.runs {
        writeln!(
            out,
            "run {}: {} ({} records from line {}, seq 0..{}, head {}, {}{})",
            run.run,
            run.verdict,
            run.records,
            run.first_line,
            run.last_seq,
            run.head,
            if run.complete {
                "complete"
            } else {
                "incomplete: no closing record, it may have been cut"
            },
            run.tee
                .as_deref()
                .map(|t| format!(", tee {}", sanitize(t, 80)))
                .unwrap_or_default()
        )?;
        if !run.not_attested.is_empty() {
            let shown = run.not_attested.len() as u64;
            if run.not_attested_count > shown {
                writeln!(
                    out,
                    "  not attested: {} earlier record(s), then:",
                    run.not_attested_count - shown
                )?;
            }
            for record in &run.not_attested {
                writeln!(
                    out,
                    "  not attested: seq {} {}/{}",
                    record.seq,
                    sanitize(&record.stage, 80),
                    sanitize(&record.event, 80)
                )?;
            }
        }
    }
    if outcome.skipped_lines > 0 {
        writeln!(
            out,
            "note: {} line(s) that are not records were skipped (a console capture's other \
             output)",
            outcome.skipped_lines
        )?;
    }
    if !outcome.evidence.is_empty() {
        writeln!(out, "evidence:")?;
        for finding in &outcome.evidence {
            writeln!(
                out,
                "  run {} seq {} {}, tee {}:",
                finding.run,
                finding.seq,
                sanitize(&finding.what, 200),
                sanitize(&finding.tee, 80)
            )?;
            for item in &finding.verified {
                writeln!(out, "    verified: {}", sanitize(item, 2000))?;
            }
            for item in &finding.warnings {
                writeln!(out, "    WARNING: {}", sanitize(item, 2000))?;
            }
        }
    }
    let attested = outcome
        .runs
        .iter()
        .filter(|r| r.verdict == Verdict::Attested)
        .count();
    writeln!(
        out,
        "verdict: {attested} of {} run(s) attested; exit {}",
        outcome.runs.len(),
        outcome.exit_code()
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn run(verdict: Verdict, tail: Vec<TailRecord>) -> RunVerdict {
        RunVerdict {
            run: 1,
            first_line: 1,
            records: 9,
            last_seq: 8,
            head: Digest::ZERO,
            complete: true,
            insecure: false,
            tee: Some("tpm".to_string()),
            verdict,
            not_attested_count: tail.len() as u64,
            not_attested: tail,
        }
    }

    #[test]
    fn exit_code_is_0_only_when_every_run_is_attested() {
        let mut outcome = Outcome {
            runs: vec![run(Verdict::Attested, vec![])],
            evidence: vec![],
            skipped_lines: 0,
        };
        assert_eq!(outcome.exit_code(), 0);
        outcome
            .runs
            .push(run(Verdict::AttestedUpTo { seq: 3 }, vec![]));
        assert_eq!(outcome.exit_code(), 3);
        outcome.runs = vec![];
        assert_eq!(outcome.exit_code(), 3, "no run is not all runs attested");
    }

    #[test]
    fn json_output_escapes_c1_del_and_bidi() {
        let text = serde_json::json!({"a": "x\u{9b}y\u{7f}\u{202e}z\n"}).to_string();
        let escaped = json_escape_unsafe(&text);
        for bad in ['\u{9b}', '\u{7f}', '\u{202e}'] {
            assert!(!escaped.contains(bad), "{escaped}");
        }
        let back: serde_json::Value = serde_json::from_str(&escaped).unwrap();
        assert_eq!(back["a"], "x\u{9b}y\u{7f}\u{202e}z\n");
    }

    #[test]
    fn text_from_the_log_is_escaped_when_printed() {
        let outcome = Outcome {
            runs: vec![run(
                Verdict::AttestedUpTo { seq: 6 },
                vec![TailRecord {
                    seq: 7,
                    stage: "launch\u{1b}[2J".to_string(),
                    event: "x\u{202e}gnp.exe".to_string(),
                }],
            )],
            evidence: vec![EvidenceFinding {
                run: 1,
                seq: 3,
                what: "broker exchange".to_string(),
                tee: "tpm\u{2066}".to_string(),
                verified: vec!["a\u{202d}b".to_string()],
                warnings: vec!["c\u{200f}d".to_string()],
            }],
            skipped_lines: 0,
        };
        let mut out = Vec::new();
        print_text(&outcome, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        for bad in ['\u{1b}', '\u{202e}', '\u{2066}', '\u{202d}', '\u{200f}'] {
            assert!(!text.contains(bad), "{bad:?} in {text}");
        }
        assert!(
            text.contains("not attested: seq 7 launch\\u{1b}[2J/x\\u{202e}gnp.exe"),
            "{text}"
        );
        assert!(text.contains("run 1: attested up to seq 6"), "{text}");
        assert!(
            text.contains("  run 1 seq 3 broker exchange, tee tpm\\u{2066}:"),
            "{text}"
        );
    }
}
