//! `cargo xtask fuzz`: the libFuzzer targets of `fuzz/` (cargo-fuzz, nightly Rust).
//!
//! - `cargo xtask fuzz --smoke [--seconds N]`: every target for N seconds (default
//!   [`SMOKE_SECONDS`], at most [`MAX_SMOKE_SECONDS`]) from its committed seed corpus; what CI
//!   runs.
//! - `cargo xtask fuzz TARGET [--seconds N]`: one target for longer (default
//!   [`LONG_SECONDS`]); new inputs accumulate in the scratch corpus between runs.
//!
//! The committed corpus `fuzz/corpus/TARGET/` is only read: libFuzzer writes new inputs to
//! the first corpus directory it is given, and that is the scratch directory
//! `fuzz/scratch/TARGET/` (ignored by git). A crash fails the task, naming the input
//! libFuzzer saved under `fuzz/artifacts/TARGET/` and the command that replays it.
//! Each target's libFuzzer output is kept in `fuzz/logs/TARGET.log`.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{bail, ensure, Context, Result};

use crate::{ensure_tools, sh, show};

/// The fuzz targets (`fuzz/fuzz_targets/NAME.rs`), each with a seed corpus.
pub(crate) const TARGETS: &[&str] = &[
    "policy_toml",
    "audit_log",
    "snp_report",
    "tpm_attest",
    "kbs_jwe",
    "bundle_manifest",
    "tdx_quote",
    "nvidia_report",
    "nvidia_rim",
];

/// Seconds per target in the smoke pass (9 targets: about 3 minutes of fuzzing in CI).
pub(crate) const SMOKE_SECONDS: u64 = 20;
/// The most seconds per target the smoke pass takes.
pub(crate) const MAX_SMOKE_SECONDS: u64 = 60;
/// Seconds of a single-target run.
pub(crate) const LONG_SECONDS: u64 = 600;
/// The most bytes the committed seed corpora may hold together.
pub(crate) const MAX_CORPUS_BYTES: u64 = 2 * 1024 * 1024;
/// A single input that runs longer than this (seconds) is reported as a hang.
const UNIT_TIMEOUT_SECONDS: u64 = 10;

/// What a fuzz command asks for.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Request {
    /// The targets to run, in order.
    pub targets: Vec<String>,
    /// Seconds per target.
    pub seconds: u64,
    /// Whether the scratch corpus starts empty (the smoke pass) or keeps what earlier
    /// runs found.
    pub fresh: bool,
}

/// Parses the arguments after `fuzz`.
pub(crate) fn parse_args(args: &[&str]) -> Result<Request> {
    let mut smoke = false;
    let mut target = None;
    let mut seconds = None;
    let mut rest = args.iter();
    while let Some(&arg) = rest.next() {
        match arg {
            "--smoke" => smoke = true,
            "--seconds" => {
                let value = rest.next().context("--seconds needs a number of seconds")?;
                let n: u64 = value
                    .parse()
                    .with_context(|| format!("--seconds {value}: not a whole number of seconds"))?;
                ensure!(n > 0, "--seconds 0: give at least 1 second");
                seconds = Some(n);
            }
            name if !name.starts_with('-') && target.is_none() => {
                ensure!(
                    TARGETS.contains(&name),
                    "unknown fuzz target {name:?}; the targets are {}",
                    TARGETS.join(", ")
                );
                target = Some(name.to_string());
            }
            other => bail!("unexpected argument {other:?}; {USAGE}"),
        }
    }
    match (smoke, target) {
        (true, None) => {
            let seconds = seconds.unwrap_or(SMOKE_SECONDS);
            ensure!(
                seconds <= MAX_SMOKE_SECONDS,
                "--seconds {seconds}: the smoke pass runs each target at most \
                 {MAX_SMOKE_SECONDS} s; run one target longer with `cargo xtask fuzz TARGET \
                 --seconds {seconds}`"
            );
            Ok(Request {
                targets: TARGETS.iter().map(|t| t.to_string()).collect(),
                seconds,
                fresh: true,
            })
        }
        (false, Some(target)) => Ok(Request {
            targets: vec![target],
            seconds: seconds.unwrap_or(LONG_SECONDS),
            fresh: false,
        }),
        (true, Some(_)) => bail!("--smoke runs every target; leave out the target name"),
        (false, None) => bail!("{USAGE}"),
    }
}

pub(crate) const USAGE: &str =
    "usage: cargo xtask fuzz --smoke [--seconds N] | cargo xtask fuzz TARGET [--seconds N]";

/// How one target's run ended.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Summary {
    /// Inputs executed (`stat::number_of_executed_units`, else the `Done N runs` line).
    pub executions: Option<u64>,
    /// The input libFuzzer saved for a crash, leak, timeout or out-of-memory.
    pub artifact: Option<String>,
}

/// Reads libFuzzer's output: the executions and any saved artifact.
pub(crate) fn summarize(output: &str) -> Summary {
    let mut stat = None;
    let mut done = None;
    let mut artifact = None;
    for line in output.lines() {
        let line = line.trim();
        if let Some(n) = line.strip_prefix("stat::number_of_executed_units:") {
            stat = n.trim().parse().ok().or(stat);
        } else if let Some(rest) = line.strip_prefix("Done ") {
            // "Done 123 runs in 20 second(s)"
            if let Some(n) = rest.strip_suffix(")").and_then(|r| r.split(' ').next()) {
                done = n.parse().ok().or(done);
            }
        } else if let Some(at) = line.find("Test unit written to ") {
            let path = line[at + "Test unit written to ".len()..].trim();
            artifact = Some(path.to_string());
        }
    }
    Summary {
        executions: stat.or(done),
        artifact,
    }
}

/// Runs the request; fails on the first target that crashes, after running none further.
pub(crate) fn run(root: &Path, args: &[&str]) -> Result<()> {
    let request = parse_args(args)?;
    ensure_fuzz_tools()?;
    let fuzz_dir = root.join("fuzz");
    for target in &request.targets {
        let corpus = fuzz_dir.join("corpus").join(target);
        let seeds = fs::read_dir(&corpus)
            .with_context(|| {
                format!(
                    "no seed corpus {}: commit seeds for {target}",
                    corpus.display()
                )
            })?
            .count();
        ensure!(
            seeds > 0,
            "the seed corpus {} is empty: commit seeds for {target}",
            corpus.display()
        );
    }
    let size = corpus_size(root)?;
    ensure!(
        size < MAX_CORPUS_BYTES,
        "the committed seed corpora under fuzz/corpus hold {size} bytes, more than \
         {MAX_CORPUS_BYTES}: keep a few small seeds per target"
    );
    // Build every target once (the runs then start at once).
    sh(fuzz_cargo(root).args(["build", "--fuzz-dir", "fuzz"]))?;
    let logs = fuzz_dir.join("logs");
    fs::create_dir_all(&logs).with_context(|| format!("cannot create {}", logs.display()))?;
    let mut totals = Vec::new();
    for target in &request.targets {
        let executions = run_target(root, target, &request, &logs.join(format!("{target}.log")))?;
        totals.push((target.as_str(), executions));
    }
    println!("fuzz: executions per target ({} s each):", request.seconds);
    for (target, executions) in &totals {
        println!("fuzz:   {target:<16} {executions:>12}");
    }
    println!(
        "fuzz: {} targets, {} executions, no crash",
        totals.len(),
        totals.iter().map(|(_, n)| n).sum::<u64>()
    );
    Ok(())
}

/// Runs one target; returns its executions.
fn run_target(root: &Path, target: &str, request: &Request, log_path: &Path) -> Result<u64> {
    let fuzz_dir = root.join("fuzz");
    let scratch = fuzz_dir.join("scratch").join(target);
    if request.fresh && scratch.exists() {
        fs::remove_dir_all(&scratch)
            .with_context(|| format!("cannot empty {}", scratch.display()))?;
    }
    fs::create_dir_all(&scratch).with_context(|| format!("cannot create {}", scratch.display()))?;
    let mut cmd = fuzz_cargo(root);
    cmd.args(["run", "--fuzz-dir", "fuzz", target])
        .arg(&scratch)
        .arg(fuzz_dir.join("corpus").join(target))
        .arg("--")
        .arg(format!("-max_total_time={}", request.seconds))
        .arg(format!("-timeout={UNIT_TIMEOUT_SECONDS}"))
        .arg("-print_final_stats=1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    eprintln!("$ {}", show(&cmd));
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start {}", show(&cmd)))?;
    // libFuzzer reports on stderr; stdout is cargo's. Keep both in the log, in order of
    // arrival per stream.
    let stdout = child.stdout.take().context("cargo fuzz has no stdout")?;
    let out_thread = std::thread::spawn(move || {
        let mut text = String::new();
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            text.push_str(&line);
            text.push('\n');
        }
        text
    });
    let stderr = child.stderr.take().context("cargo fuzz has no stderr")?;
    let mut log = String::new();
    for line in BufReader::new(stderr).lines() {
        let line = line.context("reading cargo fuzz output")?;
        log.push_str(&line);
        log.push('\n');
    }
    let status = child.wait().context("waiting for cargo fuzz")?;
    log.push_str(&out_thread.join().unwrap_or_default());
    let mut file = fs::File::create(log_path)
        .with_context(|| format!("cannot write {}", log_path.display()))?;
    file.write_all(log.as_bytes())
        .with_context(|| format!("cannot write {}", log_path.display()))?;

    let summary = summarize(&log);
    if !status.success() || summary.artifact.is_some() {
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        for line in tail.iter().rev() {
            eprintln!("{line}");
        }
        match summary.artifact {
            Some(artifact) => {
                let artifact = root.join(artifact);
                bail!(
                    "fuzz target {target} failed ({status}) on the input {}; reproduce with \
                     `cargo +nightly fuzz run --fuzz-dir fuzz {target} {}` in {}, fix the \
                     code and add a regression test with that input (full output: {})",
                    artifact.display(),
                    artifact.display(),
                    root.display(),
                    log_path.display()
                )
            }
            None => bail!(
                "fuzz target {target} failed ({status}) without saving an input; see {}",
                log_path.display()
            ),
        }
    }
    let executions = summary.executions.with_context(|| {
        format!(
            "fuzz target {target}: libFuzzer printed no execution count; see {}",
            log_path.display()
        )
    })?;
    ensure!(
        executions > 0,
        "fuzz target {target} executed no input; see {}",
        log_path.display()
    );
    println!(
        "fuzz: {target}: {executions} executions in {} s",
        request.seconds
    );
    Ok(executions)
}

/// `cargo +nightly` from PATH (the rustup proxy: `$CARGO` is the stable toolchain's own
/// binary, which does not take `+nightly`), without the variables the outer cargo set, so
/// the fuzz project always builds into `fuzz/target` with its own flags.
fn fuzz_cargo(root: &Path) -> Command {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(root)
        .arg("+nightly")
        .arg("fuzz")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTC")
        .env_remove("RUSTDOC")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS");
    cmd
}

fn succeeds(cmd: &mut Command) -> bool {
    cmd.stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Makes sure of the nightly toolchain, cargo-fuzz and a C++ compiler (libfuzzer-sys builds
/// libFuzzer); installs cargo-fuzz from crates.io and g++ with apt-get when missing.
fn ensure_fuzz_tools() -> Result<()> {
    if !succeeds(Command::new("rustup").args(["run", "nightly", "rustc", "--version"])) {
        sh(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))
        .context("cargo fuzz needs the nightly toolchain (-Zsanitizer)")?;
    }
    ensure_tools(&[("c++", "g++")])?;
    if !succeeds(Command::new("cargo").args(["+nightly", "fuzz", "--version"])) {
        sh(Command::new("cargo").env_remove("RUSTUP_TOOLCHAIN").args([
            "install",
            "cargo-fuzz",
            "--locked",
        ]))?;
    }
    Ok(())
}

/// The committed seed corpora: every target has one, and together they stay small.
pub(crate) fn corpus_size(root: &Path) -> Result<u64> {
    let mut total = 0;
    for target in TARGETS {
        let dir = root.join("fuzz").join("corpus").join(target);
        for entry in fs::read_dir(&dir).with_context(|| format!("cannot read {}", dir.display()))? {
            let entry = entry.with_context(|| format!("cannot read {}", dir.display()))?;
            total += entry
                .metadata()
                .with_context(|| format!("cannot stat {}", entry.path().display()))?
                .len();
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn smoke_runs_every_target_for_the_default_time() {
        let request = parse_args(&["--smoke"]).unwrap();
        assert_eq!(request.targets.len(), TARGETS.len());
        assert_eq!(request.seconds, SMOKE_SECONDS);
        assert!(request.fresh);
        assert_eq!(
            parse_args(&["--smoke", "--seconds", "5"]).unwrap().seconds,
            5
        );
    }

    #[test]
    fn smoke_refuses_more_than_a_minute_per_target() {
        let error = parse_args(&["--smoke", "--seconds", "61"]).unwrap_err();
        assert!(error.to_string().contains("at most 60 s"), "{error}");
    }

    #[test]
    fn one_target_runs_longer_and_keeps_its_scratch_corpus() {
        let request = parse_args(&["tpm_attest", "--seconds", "90"]).unwrap();
        assert_eq!(request.targets, vec!["tpm_attest".to_string()]);
        assert_eq!(request.seconds, 90);
        assert!(!request.fresh);
        assert_eq!(parse_args(&["audit_log"]).unwrap().seconds, LONG_SECONDS);
    }

    #[test]
    fn bad_arguments_are_refused() {
        assert!(parse_args(&[]).is_err());
        assert!(parse_args(&["no_such_target"])
            .unwrap_err()
            .to_string()
            .contains("policy_toml"));
        assert!(parse_args(&["--smoke", "kbs_jwe"]).is_err());
        assert!(parse_args(&["--smoke", "--seconds", "x"]).is_err());
        assert!(parse_args(&["--smoke", "--seconds", "0"]).is_err());
        assert!(parse_args(&["--smoke", "--seconds"]).is_err());
    }

    #[test]
    fn summary_reads_executions_and_the_crash_input() {
        let clean = "#262144\tpulse  cov: 1203 ft: 4410 corp: 301/40Kb exec/s: 13107 rss: 61Mb\n\
                     #401233\tDONE   cov: 1210 ft: 4460 corp: 310/41Kb lim: 4096 exec/s: 19106 rss: 61Mb\n\
                     Done 401233 runs in 21 second(s)\n\
                     stat::number_of_executed_units: 401235\n\
                     stat::average_exec_per_sec:     19106\n";
        assert_eq!(
            summarize(clean),
            Summary {
                executions: Some(401235),
                artifact: None
            }
        );
        let without_stats = "Done 77 runs in 1 second(s)\n";
        assert_eq!(summarize(without_stats).executions, Some(77));
        let crash = "==1234== ERROR: libFuzzer: deadly signal\n\
                     MS: 2 ChangeBit-InsertByte-; base unit: 0123\n\
                     artifact_prefix='/r/fuzz/artifacts/tdx_quote/'; Test unit written to /r/fuzz/artifacts/tdx_quote/crash-da39a3ee\n\
                     stat::number_of_executed_units: 5120\n";
        let summary = summarize(crash);
        assert_eq!(
            summary.artifact.as_deref(),
            Some("/r/fuzz/artifacts/tdx_quote/crash-da39a3ee")
        );
        assert_eq!(summary.executions, Some(5120));
        assert_eq!(summarize("garbage\n").executions, None);
    }

    #[test]
    fn every_target_has_a_small_committed_corpus() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        for target in TARGETS {
            assert!(
                root.join("fuzz/fuzz_targets")
                    .join(format!("{target}.rs"))
                    .is_file(),
                "{target}"
            );
            let seeds = fs::read_dir(root.join("fuzz/corpus").join(target))
                .unwrap()
                .count();
            assert!(seeds > 0, "{target} has no seeds");
        }
        let size = corpus_size(root).unwrap();
        assert!(
            size < MAX_CORPUS_BYTES,
            "the seed corpora hold {size} bytes"
        );
    }
}
