//! Continuous trust against the real test broker (`tests/broker`) over HTTP on loopback:
//! [`RealBroker`] as the runner's [`Reattester`] (fresh handshake, the resource asked for
//! again), the broker's resource policy flipped at run time through its admin API, a
//! stopped broker, and the runner's re-attestation work ([`Watch`]) writing its records.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use cvm_warden::audit::{Audit, MemorySink};
use cvm_warden::boot::reattest::{Schedule, Watch};
use cvm_warden::boot::{ReattestError, Reattester};
use cvm_warden::eventlog::EventLog;
use cvm_warden::kbs::admin::{self, AdminKey, AdminRequest};
use cvm_warden::kbs::{Backoff, Client, KbsConfig};
use cvm_warden::keybroker::RealBroker;
use cvm_warden::launch::Next;
use cvm_warden::policy::ResourceUri;
use cvm_warden::tee::sample::SampleProvider;
use kbs_test_broker::{Broker, BrokerConfig, RequiredStatus, ResourcePolicy, RunningBroker};
use serde_json::{json, Value};

const RESOURCE: &str = "default/keys/liveness";

fn uri() -> ResourceUri {
    ResourceUri::parse(&format!("kbs:///{RESOURCE}")).unwrap()
}

/// A broker that verifies sample evidence, holds [`RESOURCE`] (released to sample evidence)
/// and has its admin API on (the key it returns signs the tokens).
fn broker(dir: &Path) -> (RunningBroker, AdminKey) {
    let out = std::process::Command::new("openssl")
        .args(["genpkey", "-algorithm", "ed25519"])
        .output()
        .expect("openssl makes the test's admin key");
    let key = AdminKey::from_pem(&out.stdout, "admin.pem").unwrap();
    let public = dir.join("admin.pub.pem");
    std::fs::write(&public, key.public_pem()).unwrap();
    let config = BrokerConfig {
        allow_sample: true,
        admin: Some(kbs_test_broker::AdminConfig {
            public_key: public,
            issuer: Some("owner".to_string()),
            audience: Some("kbs".to_string()),
            role: Some("admin".to_string()),
        }),
        ..BrokerConfig::default()
    }
    .with_resource(
        RESOURCE,
        &[7u8; 32],
        ResourcePolicy::new(&["sample"], RequiredStatus::Warning),
    );
    (Broker::start(config, "127.0.0.1:0").unwrap(), key)
}

/// Posts a resource policy that allows nothing: from now on the broker refuses every
/// resource (the owner revoked the workload).
fn revoke(broker: &RunningBroker, key: &AdminKey) {
    let claims = admin::AdminClaims {
        issuer: "owner".to_string(),
        audience: "kbs".to_string(),
        role: "admin".to_string(),
        ttl_secs: 300,
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let token = key.token(&claims, now).to_string();
    let rego = "package policy\n\nimport rego.v1\n\ndefault allow := false\n";
    let mut transport = cvm_warden::kbs::HttpTransport::new(
        broker.url(),
        None,
        "",
        true,
        Duration::from_secs(5),
        Duration::from_secs(5),
    )
    .unwrap();
    admin::register(
        &mut transport,
        &token,
        &[AdminRequest {
            what: "resource policy".to_string(),
            path: admin::RESOURCE_POLICY_PATH.to_string(),
            body: json!({ "policy": URL_SAFE_NO_PAD.encode(rego) }),
        }],
        &[],
    )
    .unwrap();
}

fn real_broker(url: &str) -> RealBroker {
    let mut config = KbsConfig::new(url);
    config.insecure_http = true;
    config.tries = 2;
    config.backoff = Backoff {
        initial: Duration::from_millis(10),
        max: Duration::from_millis(40),
    };
    config.total_timeout = Duration::from_secs(5);
    RealBroker::with_client(
        Box::new(SampleProvider::new()),
        Client::new(config).unwrap(),
    )
}

#[test]
fn the_real_broker_reattests_until_the_owner_revokes_then_refuses_and_when_gone_is_unreachable() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, key) = broker(dir.path());
    let url = broker.url().to_string();
    let mut real = real_broker(&url);
    let mut tries = Vec::new();

    // Affirmed: a fresh handshake each time (new nonce, new key), the resource released.
    let first = Reattester::reattest(&mut real, Some(&uri()), &mut |v| tries.push(v)).unwrap();
    let second = Reattester::reattest(&mut real, Some(&uri()), &mut |v| tries.push(v)).unwrap();
    assert_eq!(first.exchange["tee"], "sample");
    assert_ne!(first.exchange["nonce"], second.exchange["nonce"]);
    assert_ne!(first.exchange["tee_pubkey"], second.exchange["tee_pubkey"]);
    assert_eq!(
        first.resource,
        Some(json!({ "resource": format!("kbs:///{RESOURCE}"), "bytes": 32 }))
    );
    assert!(tries.iter().any(|t| t["call"] == "attest"));
    assert!(tries.iter().any(|t| t["call"] == "resource"));

    // The owner revokes mid-run: the attestation still passes, the resource does not.
    revoke(&broker, &key);
    let refused = Reattester::reattest(&mut real, Some(&uri()), &mut |_| {}).unwrap_err();
    assert!(matches!(refused, ReattestError::Refused(_)), "{refused:?}");
    let words = cvm_warden::report::error_chain(&refused);
    assert!(words.contains("PolicyDeny"), "{words}");
    // Without the resource only the attestation policy would be in the loop.
    assert!(Reattester::reattest(&mut real, None, &mut |_| {}).is_ok());

    // The broker is gone: unreachable (retried within the grace by the runner).
    broker.stop();
    let gone = Reattester::reattest(&mut real, Some(&uri()), &mut |_| {}).unwrap_err();
    assert!(matches!(gone, ReattestError::Unreachable(_)), "{gone:?}");
}

fn records(lines: &std::sync::Arc<std::sync::Mutex<Vec<String>>>) -> Vec<Value> {
    lines
        .lock()
        .unwrap()
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn the_runners_reattestation_work_records_the_exchange_and_stops_on_a_revocation() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, key) = broker(dir.path());
    let mut real = real_broker(broker.url());
    let (sink, lines) = MemorySink::new();
    let audit = Audit::new(vec![Box::new(sink)], true);
    let event_log = EventLog::new();
    let mut watch = Watch::new(Schedule {
        every: Duration::from_secs(600),
        grace: Duration::from_secs(300),
        resource: Some(uri()),
        broker: broker.url().to_string(),
    });
    let now = Instant::now();
    assert_eq!(
        watch.run(now, &audit, &mut real, &event_log),
        Next::OnSchedule
    );
    let recs = records(&lines);
    let events: Vec<&str> = recs.iter().map(|r| r["event"].as_str().unwrap()).collect();
    assert_eq!(
        events
            .iter()
            .filter(|e| **e != "reattest_try")
            .collect::<Vec<_>>(),
        [&"reattested", &"reattest_resource", &"checkpoint"]
    );
    let reattested = recs.iter().find(|r| r["event"] == "reattested").unwrap();
    // The attest stage's record type, which the verifier reads.
    let details: cvm_warden_verify::schema::AttestedDetails =
        serde_json::from_value(reattested["details"].clone()).unwrap();
    assert_eq!(details.exchange.tee, "sample");
    let checkpoint = recs.last().unwrap();
    assert_eq!(checkpoint["details"]["kind"], "reattest");
    assert!(watch.lost().is_none());

    revoke(&broker, &key);
    assert_eq!(
        watch.run(
            now + Duration::from_secs(600),
            &audit,
            &mut real,
            &event_log
        ),
        Next::StopWorkload
    );
    let lost = watch.lost().unwrap();
    assert_eq!(lost.kind, "refused");
    let recs = records(&lines);
    let failed = recs.last().unwrap();
    assert_eq!(failed["event"], "reattest_failed");
    assert_eq!(failed["details"]["kind"], "refused");
    assert!(failed["details"]["error"]
        .as_str()
        .unwrap()
        .contains("PolicyDeny"));
    // The log verifies as a chain.
    let joined: String = lines
        .lock()
        .unwrap()
        .iter()
        .map(|l| format!("{l}\n"))
        .collect();
    cvm_warden::audit::verify(joined.as_bytes()).unwrap();
}

#[test]
fn audit_verify_checks_the_reattestation_exchange_and_its_checkpoint() {
    use cvm_warden::stage::KeyBroker;
    let dir = tempfile::tempdir().unwrap();
    let (broker, key) = broker(dir.path());
    let mut real = real_broker(broker.url());
    let (sink, lines) = MemorySink::new();
    let audit = Audit::new(vec![Box::new(sink)], true);
    let event_log = EventLog::new();
    audit.record("boot", "start", json!({})).unwrap();
    // The boot's exchange, recorded as the attest stage records it.
    let exchange = real.attest(&mut |_| {}).unwrap();
    let details = cvm_warden_verify::schema::AttestedDetails {
        broker: broker.url().to_string(),
        tee: real.describe(),
        exchange: serde_json::from_value(exchange).unwrap(),
        event_log: vec![],
        register_initial: None,
        event_log_accumulator: event_log.accumulator(),
    };
    audit
        .record("attest", "attested", serde_json::to_value(details).unwrap())
        .unwrap();
    let mut watch = Watch::new(Schedule {
        every: Duration::from_secs(600),
        grace: Duration::from_secs(300),
        resource: Some(uri()),
        broker: broker.url().to_string(),
    });
    let now = Instant::now();
    assert_eq!(
        watch.run(now, &audit, &mut real, &event_log),
        Next::OnSchedule
    );
    revoke(&broker, &key);
    assert_eq!(
        watch.run(
            now + Duration::from_secs(600),
            &audit,
            &mut real,
            &event_log
        ),
        Next::StopWorkload
    );
    audit
        .record("shutdown", "exit", json!({ "code": 143 }))
        .unwrap();
    let joined: String = lines
        .lock()
        .unwrap()
        .iter()
        .map(|l| format!("{l}\n"))
        .collect();
    let outcome = cvm_warden_verify::verdict::verify_log_from(
        joined.as_bytes(),
        Path::new("memory"),
        cvm_warden_verify::check::Pins::default(),
    )
    .unwrap();
    let checked: Vec<&str> = outcome.evidence.iter().map(|f| f.what.as_str()).collect();
    assert_eq!(checked[0], "broker exchange");
    assert_eq!(checked[1], "re-attestation exchange");
    assert!(
        checked[2].starts_with("reattest checkpoint of seq"),
        "{checked:?}"
    );
    let reattest = &outcome.evidence[1];
    assert!(
        reattest.verified[0].starts_with("exchange.report_data = SHA-384"),
        "{:?}",
        reattest.verified
    );
}
