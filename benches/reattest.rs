//! `cargo bench --bench reattest` (`cargo xtask bench reattest`): what one re-attestation
//! while the workload runs costs — a fresh handshake with the test broker (`tests/broker`,
//! plain HTTP on loopback: `auth`, new ephemeral key, evidence, `attest`), with and without
//! the resource asked for again, and the runner's whole round (`boot::reattest::Watch`: the
//! `attest/reattested` record, the resource record, the `reattest` checkpoint):
//!
//! - `sample`: the sample provider (no TEE cost: the protocol, the key and the broker);
//! - `tpm`: quotes from a software TPM (`swtpm`, started here on loopback ports), its AK
//!   trusted by the broker.
//!
//! Prints min, median and max per round trip. Runs in a few seconds.

#[path = "../tests/common/swtpm.rs"]
#[allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod swtpm;

use std::process::ExitCode;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use cvm_warden::audit::{Audit, MemorySink};
use cvm_warden::boot::reattest::{Schedule, Watch};
use cvm_warden::boot::Reattester;
use cvm_warden::eventlog::EventLog;
use cvm_warden::kbs::{Client, KbsConfig};
use cvm_warden::keybroker::RealBroker;
use cvm_warden::launch::Next;
use cvm_warden::policy::ResourceUri;
use cvm_warden::tee::{self, Provider};
use kbs_test_broker::{Broker, BrokerConfig, RequiredStatus, ResourcePolicy};

const SAMPLE_RUNS: usize = 100;
const TPM_RUNS: usize = 20;
const RESOURCE: &str = "default/keys/liveness";

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("bench reattest: {err}");
            ExitCode::FAILURE
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn report(name: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let runs = samples.len();
    println!(
        "reattest {name:<52} runs {runs:>4}  min {:>8.3} ms  median {:>8.3} ms  max {:>8.3} ms",
        ms(samples[0]),
        ms(samples[runs / 2]),
        ms(samples[runs - 1]),
    );
}

fn real_broker(url: &str, provider: Box<dyn Provider>) -> Result<RealBroker, String> {
    let mut config = KbsConfig::new(url);
    config.insecure_http = true;
    let client = Client::new(config).map_err(|e| format!("client: {e}"))?;
    Ok(RealBroker::with_client(provider, client))
}

/// Times `runs` round trips of each kind with `make`'s provider against a broker started
/// with `config`.
fn time_reattest(
    name: &str,
    config: BrokerConfig,
    make: &dyn Fn() -> Result<Box<dyn Provider>, String>,
    runs: usize,
) -> Result<(), String> {
    let broker = Broker::start(config, "127.0.0.1:0").map_err(|e| format!("broker: {e}"))?;
    let uri = ResourceUri::parse(&format!("kbs:///{RESOURCE}")).map_err(|e| e.to_string())?;
    let mut real = real_broker(broker.url(), make()?)?;
    for (label, resource) in [("handshake", None), ("handshake + resource", Some(&uri))] {
        let mut samples = Vec::with_capacity(runs);
        for _ in 0..runs {
            let start = Instant::now();
            Reattester::reattest(&mut real, resource, &mut |_| {})
                .map_err(|e| format!("{name} {label}: {}", cvm_warden::report::error_chain(&e)))?;
            samples.push(start.elapsed());
        }
        report(&format!("{name} {label}"), samples);
    }
    // The runner's whole round: records and the checkpoint after them.
    let (sink, lines) = MemorySink::new();
    let audit = Audit::new(vec![Box::new(sink)], false);
    let event_log = EventLog::new();
    let mut watch = Watch::new(Schedule {
        every: Duration::from_secs(600),
        grace: Duration::from_secs(300),
        resource: Some(uri.clone()),
        broker: broker.url().to_string(),
    });
    let mut samples = Vec::with_capacity(runs);
    for _ in 0..runs {
        let start = Instant::now();
        let next = watch.run(Instant::now(), &audit, &mut real, &event_log);
        samples.push(start.elapsed());
        if next != Next::OnSchedule {
            let last = lines
                .lock()
                .map(|l| l.last().cloned().unwrap_or_default())
                .unwrap_or_default();
            return Err(format!("{name}: the round failed: {last}"));
        }
    }
    report(&format!("{name} round (records + checkpoint)"), samples);
    broker.stop();
    Ok(())
}

fn run() -> Result<(), String> {
    let sample = BrokerConfig {
        allow_sample: true,
        ..BrokerConfig::default()
    }
    .with_resource(
        RESOURCE,
        &[7u8; 32],
        ResourcePolicy::new(&["sample"], RequiredStatus::Warning),
    );
    time_reattest(
        "sample",
        sample,
        &|| Ok(Box::new(tee::sample::SampleProvider::new())),
        SAMPLE_RUNS,
    )?;

    // Quotes from swtpm, its AK trusted by the broker (so the token affirms).
    let swtpm = swtpm::Swtpm::start();
    let tcti = swtpm.tcti();
    let tpm = tee::tpm::TpmProvider::open(&tcti, tee::tpm::AkSource::Create)
        .map_err(|e| format!("swtpm: {e}"))?;
    let ak = STANDARD.encode(tpm.ak_public());
    let config = BrokerConfig {
        trusted_aks: vec![ak],
        ..BrokerConfig::default()
    }
    .with_resource(
        RESOURCE,
        &[7u8; 32],
        ResourcePolicy::new(&["tpm"], RequiredStatus::Affirming),
    );
    let provider = std::cell::RefCell::new(Some(tpm));
    time_reattest(
        "tpm (swtpm quote)",
        config,
        &|| {
            provider
                .borrow_mut()
                .take()
                .map(|p| Box::new(p) as Box<dyn Provider>)
                .ok_or_else(|| "the tpm provider was used already".to_string())
        },
        TPM_RUNS,
    )?;
    Ok(())
}
