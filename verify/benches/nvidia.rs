//! `cargo bench -p cvm-warden-verify --bench nvidia`: what verifying one GPU's evidence
//! offline costs (`evidence::nvidia::verify`: parse, chain of 5 P-384 signatures, report
//! signature, FWID, nonce) on the real vectors of `tests/vectors/nvidia`. Prints min, median
//! and max per vector. Runs in a few seconds.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use cvm_warden_verify::evidence::nvidia::{decode_report, verify, VerifyOptions};

const RUNS: usize = 30;

fn vector(path: &str) -> Result<Vec<u8>, String> {
    let full = format!("{}/tests/vectors/nvidia/{path}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&full).map_err(|e| format!("{full}: {e}"))
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("bench nvidia: {err}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), String> {
    let options = VerifyOptions::new(std::time::SystemTime::now()).map_err(|e| e.to_string())?;
    for (name, report, chain, nonce) in [
        (
            "h100 (nvtrust, 550.90.07)",
            "nvtrust/hopperAttestationReport.txt",
            "nvtrust/hopperCertChain.txt",
            "931d8dd0add203ac3d8b4fbde75e115278eefcdceac5b87671a748f32364dfcb",
        ),
        (
            "b200 (attestation-sdk, 575.32)",
            "attestation-sdk/gpu/blackwellAttestationReport.txt",
            "attestation-sdk/gpu/blackwellCertChain.txt",
            "931d8dd0add203ac3d8b4fbde75e115278eefcdceac5b87671a748f32364dfcb",
        ),
    ] {
        let report = decode_report(&vector(report)?).map_err(|e| e.to_string())?;
        let chain = vector(chain)?;
        let nonce: [u8; 32] = hex::decode(nonce)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or("bad nonce")?;
        let mut times: Vec<Duration> = Vec::with_capacity(RUNS);
        for _ in 0..RUNS {
            let start = Instant::now();
            verify(&report, &chain, &nonce, &options).map_err(|e| format!("{name}: {e}"))?;
            times.push(start.elapsed());
        }
        times.sort();
        println!(
            "{name}: verify min {:?} median {:?} max {:?} ({RUNS} runs)",
            times[0],
            times[RUNS / 2],
            times[RUNS - 1]
        );
    }
    Ok(())
}
