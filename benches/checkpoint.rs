//! `cargo bench --bench checkpoint` (`cargo xtask bench checkpoint`): what one audit-log
//! checkpoint costs the daemon — fresh evidence over the log's head and the `audit/checkpoint`
//! record — with the real providers behind the real broker type:
//!
//! - `tpm`: a quote from a software TPM (`swtpm`, started here on loopback ports);
//! - `snp`: a report through configfs-tsm, answered by the fake configfs-tsm (the published
//!   Trustee test report with the requested REPORT_DATA), so this is cvm-warden's own cost
//!   without the PSP's.
//!
//! Prints min, median and max over the runs. Runs in a few seconds.

#[path = "../tests/common/swtpm.rs"]
#[allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod swtpm;

use std::process::ExitCode;
use std::time::{Duration, Instant};

use cvm_warden::audit::{Audit, MemorySink};
use cvm_warden::boot::{checkpoint, CheckpointKind};
use cvm_warden::eventlog::EventLog;
use cvm_warden::kbs::KbsConfig;
use cvm_warden::keybroker::RealBroker;
use cvm_warden::tee::{self, Provider};
use serde_json::json;

const TPM_RUNS: usize = 20;
const SNP_RUNS: usize = 200;
/// Where the SNP firmware puts REPORT_DATA in a report.
const REPORT_DATA_OFFSET: usize = 0x50;

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("bench checkpoint: {err}");
            ExitCode::FAILURE
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Times `runs` checkpoints with `provider`; every one must be written.
fn time_checkpoints(name: &str, provider: Box<dyn Provider>, runs: usize) -> Result<(), String> {
    let mut config = KbsConfig::new("http://127.0.0.1:9");
    config.insecure_http = true;
    let mut broker =
        RealBroker::new(provider, config).map_err(|e| format!("{name}: broker: {e}"))?;
    let (sink, lines) = MemorySink::new();
    let audit = Audit::new(vec![Box::new(sink)], false);
    let event_log = EventLog::new();
    let mut samples = Vec::with_capacity(runs);
    for i in 0..runs {
        audit
            .record("launch", "bench", json!({ "i": i }))
            .map_err(|e| format!("{name}: audit: {e}"))?;
        let start = Instant::now();
        let written = checkpoint(&audit, &mut broker, CheckpointKind::Periodic, &event_log);
        samples.push(start.elapsed());
        if !written {
            let last = lines
                .lock()
                .map(|l| l.last().cloned().unwrap_or_default())
                .unwrap_or_default();
            return Err(format!("{name}: the checkpoint was not written: {last}"));
        }
    }
    samples.sort();
    println!(
        "checkpoint {name:<24} runs {runs:>4}  min {:>8.3} ms  median {:>8.3} ms  max {:>8.3} ms",
        ms(samples[0]),
        ms(samples[runs / 2]),
        ms(samples[runs - 1]),
    );
    Ok(())
}

fn run() -> Result<(), String> {
    // SNP through configfs-tsm, answered by the fake (no PSP round trip).
    let vectors = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vectors");
    let report = std::fs::read(vectors.join("trustee/snp/test-report.bin"))
        .map_err(|e| format!("test report: {e}"))?;
    let vcek = std::fs::read(vectors.join("trustee/snp/test-vcek.der"))
        .map_err(|e| format!("test VCEK: {e}"))?;
    let cache = tempfile::tempdir().map_err(|e| format!("temporary directory: {e}"))?;
    std::fs::write(cache.path().join("vcek.der"), vcek).map_err(|e| format!("cache: {e}"))?;
    let root = "/sys/kernel/config/tsm/report";
    let fs = tee::tsm::FakeTsmFs::new(
        root,
        "sev_guest",
        Box::new(move |inblob| {
            let mut answer = report.clone();
            answer[REPORT_DATA_OFFSET..REPORT_DATA_OFFSET + 64].copy_from_slice(inblob);
            Ok(answer)
        }),
    );
    let device = tee::snp::TsmSnpDevice::new(tee::tsm::Tsm::new("snp", root, fs));
    let snp = tee::snp::SnpProvider::new(Box::new(device), cache.path());
    time_checkpoints("snp (fake configfs-tsm)", Box::new(snp), SNP_RUNS)?;

    // A TPM quote from swtpm.
    let swtpm = swtpm::Swtpm::start();
    let tpm = tee::tpm::TpmProvider::open(&swtpm.tcti(), tee::tpm::AkSource::Create)
        .map_err(|e| format!("swtpm: {e}"))?;
    time_checkpoints("tpm (swtpm quote)", Box::new(tpm), TPM_RUNS)?;
    Ok(())
}
