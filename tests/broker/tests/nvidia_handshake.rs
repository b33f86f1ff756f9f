//! GPU additional evidence through the broker's HTTP API. A test PKI (P-384, a leaf with the
//! Hopper FWID extension) stands in for NVIDIA's: a real H100 report is the template, its
//! request nonce is replaced by the session's device nonce and it is re-signed with the test
//! leaf key; the broker trusts the test root through `[nvidia] extra_roots`. The client side
//! (device nonce, binding string) is written here by hand, not through the broker's code.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::PathBuf;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use common::*;
use kbs_test_broker::{
    Broker, BrokerConfig, ErrorKind, NvidiaConfig, RequiredStatus, ResourcePolicy, RunningBroker,
};
use rcgen::{
    BasicConstraints, CertificateParams, CustomExtension, DnType, IsCa, KeyPair,
    PKCS_ECDSA_P384_SHA384,
};
use serde_json::{json, Value};
use sha2::{Digest, Sha384};

const VALUE: &[u8] = b"model-key-0123456789abcdef-00001";
const RES: &str = "default/key/model";
/// The template: nvtrust's real H100 report (driver 550.90.07), signed over its first 4021
/// bytes (see tests/data/nvidia/PROVENANCE.md and the shared expected.json).
const TEMPLATE_SIGNED_LEN: usize = 4021;
const TEMPLATE_FWID: &str = "f5c384aebb579217a2c66b17ed0f28e6a9b8d639041acd7b4721cec004f7275494ba94bb5cdfdb3055ee051762b1f75d";

fn data(name: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/nvidia")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

fn template_report() -> Vec<u8> {
    let text = String::from_utf8(data("nvtrust/hopperAttestationReport.txt")).unwrap();
    let report = hex::decode(text.trim()).unwrap();
    assert_eq!(report.len(), TEMPLATE_SIGNED_LEN + 96);
    report
}

/// DER length prefix.
fn der_len(len: usize) -> Vec<u8> {
    match len {
        0..=127 => vec![len as u8],
        128..=255 => vec![0x81, len as u8],
        _ => vec![0x82, (len >> 8) as u8, len as u8],
    }
}

fn der(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    out.extend(der_len(content.len()));
    out.extend_from_slice(content);
    out
}

/// The Hopper FWID extension value: SEQUENCE{INTEGER 1, SubjectPublicKeyInfo,
/// SEQUENCE{sha384 OID, OCTET STRING(48)}}.
fn fwid_extension(spki: &[u8], fwid: &[u8]) -> Vec<u8> {
    let sha384_oid = [
        0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x02,
    ];
    let digest = der(0x30, &[&sha384_oid[..], &der(0x04, fwid)].concat());
    der(0x30, &[&[0x02, 0x01, 0x01][..], spki, &digest].concat())
}

/// A test GPU PKI: root → provisioner → leaf (with the FWID extension).
struct TestPki {
    root_pem: String,
    chain_pem: String,
    leaf_pkcs8: Vec<u8>,
}

fn ca_params(cn: &str) -> CertificateParams {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(DnType::CommonName, cn);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
}

fn test_pki(fwid: &[u8]) -> TestPki {
    let root_key = KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384).unwrap();
    let root = ca_params("Test GPU Device Identity CA")
        .self_signed(&root_key)
        .unwrap();
    let ica_key = KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384).unwrap();
    let ica = ca_params("Test GH100 Provisioner ICA")
        .signed_by(&ica_key, &root, &root_key)
        .unwrap();
    let leaf_key = KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384).unwrap();
    let mut leaf_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    leaf_params
        .distinguished_name
        .push(DnType::CommonName, "Test GH100 GSP FMC LF");
    leaf_params.custom_extensions = vec![CustomExtension::from_oid_content(
        &[2, 23, 133, 5, 4, 1],
        fwid_extension(&leaf_key.public_key_der(), fwid),
    )];
    let leaf = leaf_params.signed_by(&leaf_key, &ica, &ica_key).unwrap();
    TestPki {
        root_pem: root.pem(),
        chain_pem: format!("{}{}{}", leaf.pem(), ica.pem(), root.pem()),
        leaf_pkcs8: leaf_key.serialize_der(),
    }
}

/// The template report with `nonce` as its request nonce, re-signed with the test leaf key.
fn forge_report(pki: &TestPki, nonce: &[u8; 32]) -> Vec<u8> {
    use ring::signature::{EcdsaKeyPair, ECDSA_P384_SHA384_FIXED_SIGNING};
    let mut report = template_report();
    report[4..36].copy_from_slice(nonce);
    let rng = ring::rand::SystemRandom::new();
    let key =
        EcdsaKeyPair::from_pkcs8(&ECDSA_P384_SHA384_FIXED_SIGNING, &pki.leaf_pkcs8, &rng).unwrap();
    let signature = key.sign(&rng, &report[..TEMPLATE_SIGNED_LEN]).unwrap();
    report[TEMPLATE_SIGNED_LEN..].copy_from_slice(signature.as_ref());
    report
}

/// The device nonce, written out by hand: SHA-384 of `{"nonce":…,"tee-pubkey":{sorted}}`,
/// first 32 bytes.
fn device_nonce(key: &TeeKey, nonce: &str, jwk: &Value) -> [u8; 32] {
    let text = key
        .binding_text(nonce, jwk)
        .replacen("\"additional-evidence\":\"\",", "", 1);
    assert!(text.starts_with("{\"nonce\":"), "{text}");
    Sha384::digest(text.as_bytes())[..32].try_into().unwrap()
}

fn additional(arch: &str, report: &[u8], chain_pem: &str) -> String {
    json!({"nvidia": {"device_evidence_list": [{
        "arch": arch, "uuid": "GPU-test-0", "evidence": STANDARD.encode(report),
        "certificate": STANDARD.encode(chain_pem),
    }]}})
    .to_string()
}

/// SHA-384 of the binding string with `additional` as the additional-evidence string (JSON
/// string escaping by serde_json, which agrees with JCS for this ASCII text).
fn report_data_with(key: &TeeKey, nonce: &str, jwk: &Value, additional: &str) -> [u8; 48] {
    let text = key.binding_text(nonce, jwk).replacen(
        "\"additional-evidence\":\"\"",
        &format!(
            "\"additional-evidence\":{}",
            serde_json::to_string(additional).unwrap()
        ),
        1,
    );
    Sha384::digest(text.as_bytes()).into()
}

fn attest_body(nonce: &str, jwk: &Value, report_data: &[u8], additional: &str) -> String {
    json!({
        "runtime-data": {"nonce": nonce, "tee-pubkey": jwk},
        "tee-evidence": {"primary_evidence": sample_evidence(report_data), "additional_evidence": additional},
        "init-data": null,
    })
    .to_string()
}

struct Setup {
    _dir: tempfile::TempDir,
    broker: RunningBroker,
    client: Client,
    pki: TestPki,
}

fn setup(nvidia: impl FnOnce(PathBuf) -> NvidiaConfig) -> Setup {
    setup_full(&hex::decode(TEMPLATE_FWID).unwrap(), |dir, config| {
        BrokerConfig {
            nvidia: nvidia(dir.join("test-gpu-root.pem")),
            ..config
        }
    })
}

/// A test PKI whose leaf carries `fwid`, its root written to `<dir>/test-gpu-root.pem`, and
/// a broker with a `sample` resource whose config `more` completes.
fn setup_full(
    fwid: &[u8],
    more: impl FnOnce(&std::path::Path, BrokerConfig) -> BrokerConfig,
) -> Setup {
    let pki = test_pki(fwid);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("test-gpu-root.pem"), &pki.root_pem).unwrap();
    let config = BrokerConfig {
        allow_sample: true,
        ..BrokerConfig::default()
    }
    .with_resource(
        RES,
        VALUE,
        ResourcePolicy::new(&["sample"], RequiredStatus::Warning),
    );
    let broker = Broker::start(more(dir.path(), config), "127.0.0.1:0").unwrap();
    let client = Client::new(broker.url());
    Setup {
        _dir: dir,
        broker,
        client,
        pki,
    }
}

fn trusting(root: PathBuf) -> NvidiaConfig {
    NvidiaConfig {
        extra_roots: vec![root],
        require_gpus: 1,
        min_driver: Some("550.90".to_string()),
    }
}

/// One session: auth, GPU evidence made by `make(device nonce)`, attest. Returns (cookie,
/// attest reply).
fn attest_with(s: &Setup, key: &TeeKey, make: impl FnOnce(&[u8; 32]) -> String) -> (String, Reply) {
    let (cookie, nonce) = s.client.auth("sample");
    let jwk = key.jwk();
    let additional = make(&device_nonce(key, &nonce, &jwk));
    let rd = report_data_with(key, &nonce, &jwk, &additional);
    let reply = s.client.post(
        "/kbs/v0/attest",
        &attest_body(&nonce, &jwk, &rd, &additional),
        Some(&cookie),
    );
    (cookie, reply)
}

fn last_reason(broker: &RunningBroker) -> String {
    broker
        .requests()
        .last()
        .unwrap()
        .reason
        .clone()
        .unwrap_or_default()
}

fn token_of(reply: &Reply) -> Value {
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    token_claims(reply.json()["token"].as_str().unwrap())
}

#[test]
fn full_handshake_with_gpu_evidence_forged_for_the_session_releases_the_resource() {
    let s = setup(trusting);
    let key = TeeKey::ec();
    let (cookie, reply) = attest_with(&s, &key, |n| {
        additional("HOPPER", &forge_report(&s.pki, n), &s.pki.chain_pem)
    });
    let claims = token_of(&reply);
    let submods = claims["submods"].as_object().unwrap();
    assert_eq!(
        submods.keys().collect::<Vec<_>>(),
        ["cpu0", "gpu0"],
        "{claims}"
    );
    let gpu0 = &claims["submods"]["gpu0"];
    let nvidia = &gpu0["ear.veraison.annotated-evidence"]["nvidia"];
    assert_eq!(nvidia["arch"], "Hopper");
    assert_eq!(nvidia["uuid"], "GPU-test-0");
    assert_eq!(nvidia["config"]["driver_version"], "550.90.07");
    assert_eq!(nvidia["config"]["vbios_version"], "96.00.9f.00.01");
    assert_eq!(nvidia["config"]["fwid"], TEMPLATE_FWID);
    assert_eq!(nvidia["measurements"].as_object().unwrap().len(), 64);
    let derived = &gpu0["ear.veraison.annotated-evidence"][kbs_test_broker::GPU_DERIVED_KEY];
    assert_eq!(derived["cc_attested"], true);
    assert!(
        derived["root"]
            .as_str()
            .unwrap()
            .contains("test-gpu-root.pem"),
        "{derived}"
    );
    // Trustee's default GPU attestation policy does not score Local claims
    assert_eq!(gpu0["ear.status"], "contraindicated");
    // … and the request log names each submod (what the VM harness reads in the broker's log)
    let record = s.broker.requests().last().unwrap().clone();
    assert_eq!(record.submods.len(), 2, "{:?}", record.submods);
    assert_eq!(
        record.submods[0],
        format!(
            "cpu0 {}",
            claims["submods"]["cpu0"]["ear.status"].as_str().unwrap()
        )
    );
    assert!(
        record.submods[1].starts_with("gpu0 contraindicated GPU-test-0 root extra root ")
            && record.submods[1].ends_with("test-gpu-root.pem"),
        "{:?}",
        record.submods
    );
    assert_eq!(gpu0["ear.appraisal-policy-id"], "default_gpu");
    // the CPU submod binds the additional-evidence string as sent
    let runtime =
        &claims["submods"]["cpu0"]["ear.veraison.annotated-evidence"]["runtime_data_claims"];
    assert!(runtime["additional-evidence"]
        .as_str()
        .unwrap()
        .starts_with("{\"nvidia\""));

    let reply = s
        .client
        .get(&format!("/kbs/v0/resource/{RES}"), Some(&cookie), None);
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    assert_eq!(key.decrypt(&reply.json()).unwrap(), VALUE);
}

#[test]
fn policy_requiring_a_higher_driver_refuses_the_resource() {
    let s = setup(|root| NvidiaConfig {
        min_driver: Some("580.95".to_string()),
        ..trusting(root)
    });
    let key = TeeKey::ec();
    let (cookie, reply) = attest_with(&s, &key, |n| {
        additional("HOPPER", &forge_report(&s.pki, n), &s.pki.chain_pem)
    });
    token_of(&reply);
    let reply = s
        .client
        .get(&format!("/kbs/v0/resource/{RES}"), Some(&cookie), None);
    reply.assert_error(401, "PolicyDeny");
    let reason = last_reason(&s.broker);
    assert!(
        reason.contains("550.90.07") && reason.contains("580.95"),
        "{reason}"
    );
}

#[test]
fn gpu_evidence_missing_while_the_policy_requires_gpus_is_refused() {
    let s = setup(trusting);
    let key = TeeKey::ec();
    // the request dropped the GPU evidence: a valid CPU-only attestation
    let (cookie, reply) = attest_with(&s, &key, |_| String::new());
    let claims = token_of(&reply);
    assert!(claims["submods"].get("gpu0").is_none());
    let reply = s
        .client
        .get(&format!("/kbs/v0/resource/{RES}"), Some(&cookie), None);
    reply.assert_error(401, "PolicyDeny");
    assert!(
        last_reason(&s.broker).contains("require_gpus = 1"),
        "{}",
        last_reason(&s.broker)
    );
    // dropping it after the report was made breaks the binding instead
    let (cookie, nonce) = s.client.auth("sample");
    let jwk = key.jwk();
    let with_gpu = additional(
        "HOPPER",
        &forge_report(&s.pki, &device_nonce(&key, &nonce, &jwk)),
        &s.pki.chain_pem,
    );
    let rd = report_data_with(&key, &nonce, &jwk, &with_gpu);
    let reply = s.client.post(
        "/kbs/v0/attest",
        &attest_body(&nonce, &jwk, &rd, ""),
        Some(&cookie),
    );
    reply.assert_error(401, "AttestationError");
    assert!(last_reason(&s.broker).contains("report_data"));
}

#[test]
fn wrong_nonce_gpu_evidence_bound_to_another_session_is_refused() {
    let s = setup(trusting);
    let key = TeeKey::ec();
    // evidence made for session A's nonce, sent (correctly bound by the CPU) in session B
    let (_, nonce_a) = s.client.auth("sample");
    let old = forge_report(&s.pki, &device_nonce(&key, &nonce_a, &key.jwk()));
    let (_, reply) = attest_with(&s, &key, |_| additional("HOPPER", &old, &s.pki.chain_pem));
    reply.assert_error(401, "AttestationError");
    let reason = last_reason(&s.broker);
    assert!(
        reason.contains("Nonce") && reason.contains("another session"),
        "{reason}"
    );
}

#[test]
fn tampered_gpu_report_flipped_byte_fails_the_signature() {
    let s = setup(trusting);
    let key = TeeKey::ec();
    let (_, reply) = attest_with(&s, &key, |n| {
        let mut report = forge_report(&s.pki, n);
        report[2000] ^= 0x40; // inside the measurement record
        additional("HOPPER", &report, &s.pki.chain_pem)
    });
    reply.assert_error(401, "AttestationError");
    assert!(
        last_reason(&s.broker).contains("Signature"),
        "{}",
        last_reason(&s.broker)
    );
    assert_eq!(
        s.broker.requests().last().unwrap().error,
        Some(ErrorKind::AttestationError)
    );
}

#[test]
fn unknown_root_gpu_chain_not_configured_is_refused() {
    // the same test PKI, but the broker trusts only NVIDIA's root
    let s = setup(|_| NvidiaConfig::default());
    let key = TeeKey::ec();
    let (_, reply) = attest_with(&s, &key, |n| {
        additional("HOPPER", &forge_report(&s.pki, n), &s.pki.chain_pem)
    });
    reply.assert_error(401, "AttestationError");
    let reason = last_reason(&s.broker);
    assert!(
        reason.contains("UnknownRoot") && reason.contains("not a pinned root"),
        "{reason}"
    );
}

#[test]
fn fwid_mismatch_leaf_of_other_firmware_is_refused() {
    // a trusted test chain whose leaf names other firmware than the report's opaque FWID
    let s = setup_full(&[0x5a; 48], |dir, config| BrokerConfig {
        nvidia: trusting(dir.join("test-gpu-root.pem")),
        ..config
    });
    let key = TeeKey::ec();
    let (_, reply) = attest_with(&s, &key, |n| {
        additional("HOPPER", &forge_report(&s.pki, n), &s.pki.chain_pem)
    });
    reply.assert_error(401, "AttestationError");
    let reason = last_reason(&s.broker);
    assert!(
        reason.contains("Fwid") && reason.contains("differs"),
        "{reason}"
    );
}

#[test]
fn blackwell_gpu_evidence_is_refused_by_the_local_verifier() {
    let s = setup(trusting);
    let key = TeeKey::ec();
    let report = hex::decode(
        String::from_utf8(data("attestation-sdk/gpu/blackwellAttestationReport.txt"))
            .unwrap()
            .trim(),
    )
    .unwrap();
    let chain = String::from_utf8(data("attestation-sdk/gpu/blackwellCertChain.txt")).unwrap();
    let (_, reply) = attest_with(&s, &key, |_| additional("BLACKWELL", &report, &chain));
    reply.assert_error(401, "AttestationError");
    assert!(
        last_reason(&s.broker).contains("device architecture not supported"),
        "{}",
        last_reason(&s.broker)
    );
}

/// An Ed25519 admin key (ring) and its token, for the posted-policy path.
struct Admin {
    key: ring::signature::Ed25519KeyPair,
}

impl Admin {
    fn new(dir: &std::path::Path) -> (Admin, PathBuf) {
        use ring::signature::KeyPair as _;
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        let key = ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
        let spki = [
            &[
                0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
            ][..],
            key.public_key().as_ref(),
        ]
        .concat();
        let path = dir.join("admin.pub.pem");
        std::fs::write(
            &path,
            format!(
                "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
                STANDARD.encode(spki)
            ),
        )
        .unwrap();
        (Admin { key }, path)
    }

    fn token(&self) -> String {
        let header = URL_SAFE_NO_PAD.encode(json!({"alg": "EdDSA", "typ": "JWT"}).to_string());
        let claims = URL_SAFE_NO_PAD.encode(json!({"exp": 4_000_000_000u64}).to_string());
        let signed = format!("{header}.{claims}");
        let sig = URL_SAFE_NO_PAD.encode(self.key.sign(signed.as_bytes()));
        format!("{signed}.{sig}")
    }

    fn post(&self, client: &Client, path: &str, body: &[u8]) -> u16 {
        let agent = ureq::AgentBuilder::new().build();
        match agent
            .post(&format!("{}{path}", client.base))
            .set("Authorization", &format!("Bearer {}", self.token()))
            .send_bytes(body)
        {
            Ok(r) => r.status(),
            Err(ureq::Error::Status(code, _)) => code,
            Err(e) => panic!("{e}"),
        }
    }
}

fn gpu_rego(min_driver: &str) -> String {
    format!(
        "package policy\nimport rego.v1\ndefault allow := false\nallow if {{\n\
         \tdata[\"resource-path\"] == \"{RES}\"\n\
         \tcount(input.submods) >= 2\n\
         \tinput.submods.gpu0[\"ear.veraison.annotated-evidence\"].nvidia.arch == \"Hopper\"\n\
         \tinput.submods.gpu0[\"ear.veraison.annotated-evidence\"].nvidia.config.driver_version >= \"{min_driver}\"\n\
         \tinput.submods.gpu0[\"ear.veraison.annotated-evidence\"][\"kbs-test-broker\"].cc_attested == true\n\
         }}\n"
    )
}

#[test]
fn posted_rego_policy_reads_gpu_count_driver_and_cc() {
    let mut admin = None;
    let s = setup_full(&hex::decode(TEMPLATE_FWID).unwrap(), |dir, _| {
        let (key, public) = Admin::new(dir);
        admin = Some(key);
        // no [resources]: the uploaded resource and the posted policy decide
        BrokerConfig {
            allow_sample: true,
            nvidia: NvidiaConfig {
                extra_roots: vec![dir.join("test-gpu-root.pem")],
                ..NvidiaConfig::default()
            },
            admin: Some(kbs_test_broker::AdminConfig {
                public_key: public,
                issuer: None,
                audience: None,
                role: None,
            }),
            ..BrokerConfig::default()
        }
    });
    let admin = admin.unwrap();
    assert_eq!(
        admin.post(&s.client, &format!("/kbs/v0/resource/{RES}"), VALUE),
        200
    );
    let post_policy = |min: &str| {
        let body = json!({"policy": URL_SAFE_NO_PAD.encode(gpu_rego(min))}).to_string();
        admin.post(&s.client, "/kbs/v0/resource-policy", body.as_bytes())
    };
    assert_eq!(post_policy("550.90"), 200);
    let key = TeeKey::ec();
    let fetch = |cookie: &str| {
        s.client
            .get(&format!("/kbs/v0/resource/{RES}"), Some(cookie), None)
    };
    // with the GPU: released
    let (cookie, reply) = attest_with(&s, &key, |n| {
        additional("HOPPER", &forge_report(&s.pki, n), &s.pki.chain_pem)
    });
    token_of(&reply);
    let reply = fetch(&cookie);
    assert_eq!(reply.status, 200, "{}", last_reason(&s.broker));
    assert_eq!(key.decrypt(&reply.json()).unwrap(), VALUE);
    // without GPU evidence: refused by the count
    let (cookie, reply) = attest_with(&s, &key, |_| String::new());
    token_of(&reply);
    fetch(&cookie).assert_error(401, "PolicyDeny");
    assert!(last_reason(&s.broker).contains("count(input.submods) >= 2"));
    // a policy requiring a newer driver: refused
    assert_eq!(post_policy("580.95"), 200);
    let (cookie, reply) = attest_with(&s, &key, |n| {
        additional("HOPPER", &forge_report(&s.pki, n), &s.pki.chain_pem)
    });
    token_of(&reply);
    fetch(&cookie).assert_error(401, "PolicyDeny");
    assert!(
        last_reason(&s.broker).contains("580.95"),
        "{}",
        last_reason(&s.broker)
    );
    // rego the broker cannot read is refused at upload
    let bad = json!({"policy": URL_SAFE_NO_PAD.encode(gpu_rego("1").replace("count(input.submods) >= 2", "count(input.submods) >= two"))}).to_string();
    assert_eq!(
        admin.post(&s.client, "/kbs/v0/resource-policy", bad.as_bytes()),
        401
    );
}
