//! `cargo bench --bench gpu` (`cargo xtask bench gpu`): what the GPU path costs the daemon
//! per GPU and per handshake, with the simulated NVML of `tests/data/nvidia-sim` (a real H100
//! report re-signed for each nonce with the TEST key, so the fake's ECDSA P-384 signing is
//! included; a real GPU's SPDM exchange takes the place of that on hardware):
//!
//! - `precheck`: CC state, inventory, one report parsed and its facts made (per boot);
//! - `collect`: one handshake's additional evidence (device nonce, report, chain, the
//!   guest-components JSON) for 1, 2 and 4 GPUs;
//! - `verify`: the offline verification an auditor or the daemon's RIM check runs on one
//!   collected report (`cvm_warden_verify::evidence::nvidia::verify`: five P-384 links, the
//!   report signature, FWID, nonce).
//!
//! Prints min, median and max per run and per GPU. Runs in a few seconds.

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use base64::Engine;
use cvm_warden::tee::nvidia::fake::{FakeGpu, FakeNvml};
use cvm_warden::tee::nvidia::{
    default_requirements, Arch, CcEnvironment, CcState, Gpus, MultiGpuMode,
};
use cvm_warden_verify::evidence::nvidia::{verify, Roots, VerifyOptions};
use cvm_warden_verify::schema::AdditionalEvidence;
use serde_json::json;

const RUNS: usize = 40;
const SIM_DIR: &str = "tests/data/nvidia-sim";
const NONCE: &str = "Dn/RSy3SMzL+nsKPkD5p6d9A91pHw5S8IiDW5WnBFsY=";

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("bench gpu: {err}");
            ExitCode::FAILURE
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn report(name: &str, gpus: usize, mut samples: Vec<Duration>) {
    samples.sort();
    let (min, med, max) = (
        samples[0],
        samples[samples.len() / 2],
        samples[samples.len() - 1],
    );
    let per = med / u32::try_from(gpus.max(1)).unwrap_or(1);
    println!(
        "{name:<28} gpus {gpus}  min {:8.3} ms  median {:8.3} ms  max {:8.3} ms  median per GPU {:8.3} ms",
        ms(min),
        ms(med),
        ms(max),
        ms(per)
    );
}

fn gpus_of(count: usize) -> Result<Gpus, String> {
    let read = |name: &str| {
        std::fs::read(Path::new(SIM_DIR).join(name)).map_err(|e| format!("{SIM_DIR}/{name}: {e}"))
    };
    let (template, chain, key) = (
        read("report.bin")?,
        read("chain.pem")?,
        read("leaf-key.pk8")?,
    );
    let mut nvml = FakeNvml::new(
        "550.90.07",
        CcState {
            environment: CcEnvironment::Prod,
            cc_feature: true,
            devtools: false,
            multi_gpu_mode: MultiGpuMode::None,
        },
    );
    for i in 0..count {
        let uuid = format!("GPU-5e1f0000-0000-4000-8000-00000000000{}", i + 1);
        let gpu = FakeGpu::simulated(
            &uuid,
            Arch::Hopper,
            "96.00.9F.00.01",
            template.clone(),
            chain.clone(),
            &key,
        )
        .map_err(|e| e.to_string())?;
        nvml = nvml.with_gpu(gpu);
    }
    let mut req = default_requirements();
    req.simulated = true;
    Ok(Gpus::new(Ok(Box::new(nvml)), req))
}

fn run() -> Result<(), String> {
    let jwk = json!({
        "kty": "EC", "crv": "P-256", "alg": "ECDH-ES+A256KW",
        "x": "74gMjvgWiBeWwYjlcbAaxvcMUmJ0VtrkhnWO_9nGPd0",
        "y": "XNvBHiSIOhJZgkKpWHW5aohU9kv_msmjOBC4HxVPVOU"
    });
    let mut last = String::new();
    for count in [1usize, 2, 4] {
        let mut samples = Vec::with_capacity(RUNS);
        for _ in 0..RUNS {
            let mut gpus = gpus_of(count)?;
            let start = Instant::now();
            let facts = gpus.precheck().map_err(|e| e.to_string())?;
            samples.push(start.elapsed());
            if facts.len() != count {
                return Err(format!(
                    "precheck gave {} facts for {count} GPUs",
                    facts.len()
                ));
            }
        }
        report("precheck", count, samples);
        let mut gpus = gpus_of(count)?;
        gpus.precheck().map_err(|e| e.to_string())?;
        let mut samples = Vec::with_capacity(RUNS);
        for _ in 0..RUNS {
            let start = Instant::now();
            last = gpus.evidence(NONCE, &jwk).map_err(|e| e.to_string())?;
            samples.push(start.elapsed());
        }
        report("collect (one handshake)", count, samples);
    }
    // Verify what was collected (4 GPUs): each entry, against the TEST root.
    let evidence: AdditionalEvidence = serde_json::from_str(&last).map_err(|e| e.to_string())?;
    let nonce = cvm_warden_verify::binding::device_nonce(NONCE, &jwk).map_err(|e| e.to_string())?;
    let chain = std::fs::read("tests/data/nvidia-sim/chain.pem").map_err(|e| e.to_string())?;
    let mut options =
        VerifyOptions::new(std::time::SystemTime::now()).map_err(|e| e.to_string())?;
    options.roots = Roots::with_extra(&chain).map_err(|e| e.to_string())?;
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut samples = Vec::with_capacity(RUNS);
    for _ in 0..RUNS {
        let start = Instant::now();
        for device in &evidence.nvidia.device_evidence_list {
            let report = b64.decode(&device.evidence).map_err(|e| e.to_string())?;
            let certs = b64.decode(&device.certificate).map_err(|e| e.to_string())?;
            verify(&report, &certs, &nonce, &options).map_err(|e| e.to_string())?;
        }
        samples.push(start.elapsed());
    }
    report(
        "verify (offline)",
        evidence.nvidia.device_evidence_list.len(),
        samples,
    );
    Ok(())
}
