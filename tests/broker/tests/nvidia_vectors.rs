//! The broker's NVIDIA verifier against the real vectors in tests/data/nvidia/ (see its
//! PROVENANCE.md): every positive report verifies with its recorded nonce and gives
//! Trustee's claims; every negative case fails at the check it breaks.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;
use std::time::SystemTime;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use kbs_test_broker::nvidia::{
    parse_report, verify_additional_evidence, verify_hopper_report, Failure, Roots,
};
use serde_json::{json, Value};

const NVTRUST_NONCE: &str = "931d8dd0add203ac3d8b4fbde75e115278eefcdceac5b87671a748f32364dfcb";
/// Trustee's expected report_data for the CoCo CI report; the GPU nonce is its first 32 bytes.
const COCO_REPORT_DATA: &str = "87d8e24ab336adafe228d49e83d745f6dba4ae505372b6a5704820856b343fece279b616efefc2aae21da80cf5581250";

fn data(name: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/nvidia")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

fn hex_file(name: &str) -> Vec<u8> {
    hex::decode(String::from_utf8(data(name)).unwrap().trim()).unwrap()
}

fn nonce(text: &str) -> [u8; 32] {
    hex::decode(&text[..64]).unwrap().try_into().unwrap()
}

fn roots() -> Roots {
    Roots::nvidia().unwrap()
}

#[test]
fn real_h100_nvtrust_report_verifies_with_its_recorded_nonce_and_gives_trustees_claims() {
    let report = hex_file("nvtrust/hopperAttestationReport.txt");
    assert_eq!(report.len(), 4117);
    let gpu = verify_hopper_report(
        &report,
        &data("nvtrust/hopperCertChain.txt"),
        &nonce(NVTRUST_NONCE),
        "1111-2222-33333-444444-555555",
        &roots(),
        SystemTime::now(),
    )
    .unwrap();
    assert_eq!(gpu.root, "nvidia");
    let expected: Value =
        serde_json::from_slice(&data("trustee/hopperAttestationReport-claims.txt")).unwrap();
    assert_eq!(gpu.claims, expected);
    assert_eq!(gpu.claims["config"]["driver_version"], "550.90.07");
    let parsed = parse_report(&report).unwrap();
    assert_eq!(parsed.signed_len, 4021);
    assert_eq!(parsed.measurements.len(), 64);
}

#[test]
fn real_h100_coco_ci_report_with_a_trailing_byte_verifies_with_its_recorded_nonce() {
    let report = hex_file("trustee/hopper_coco_report1.txt");
    assert_eq!(report.len(), 4130);
    let parsed = parse_report(&report).unwrap();
    assert_eq!(
        parsed.signed_len, 4033,
        "length from the fields, not len - 96"
    );
    let gpu = verify_hopper_report(
        &report,
        &data("trustee/hopper_coco_certs1.txt"),
        &nonce(COCO_REPORT_DATA),
        "unknown",
        &roots(),
        SystemTime::now(),
    )
    .unwrap();
    assert_eq!(gpu.claims["config"]["driver_version"], "580.95.05");
    assert_eq!(gpu.claims["config"]["vbios_version"], "96.00.74.00.1a");
    assert_eq!(gpu.claims["config"]["feature_flag"], "SPT");
    assert_eq!(gpu.claims["config"]["opaque_data_version"], 1);
}

#[test]
fn real_coco_additional_evidence_string_verifies_in_the_kbs_shape() {
    let additional =
        String::from_utf8(data("derived/trustee-hopper_coco-additional-evidence.json")).unwrap();
    let gpus = verify_additional_evidence(
        additional.trim(),
        &nonce(COCO_REPORT_DATA),
        &roots(),
        SystemTime::now(),
    )
    .unwrap();
    assert_eq!(gpus.len(), 1);
    assert_eq!(gpus[0].claims["arch"], "Hopper");
    assert_eq!(gpus[0].claims["uuid"], "unknown");
}

#[test]
fn wrong_nonce_evidence_bound_to_another_session_is_refused() {
    let report = hex_file("nvtrust/hopperAttestationReport.txt");
    let mut other = nonce(NVTRUST_NONCE);
    other[31] ^= 1;
    let err = verify_hopper_report(
        &report,
        &data("nvtrust/hopperCertChain.txt"),
        &other,
        "u",
        &roots(),
        SystemTime::now(),
    )
    .unwrap_err();
    assert_eq!(err.failure, Failure::Nonce, "{err}");
}

#[test]
fn tampered_report_flipped_byte_fails_the_signature() {
    let report = hex_file("nvtrust/hopperAttestationReport.txt");
    // a measurement byte, the driver version text, the signature itself
    for at in [37 + 8 + 4 + 4 + 100, 3800, 4117 - 1] {
        let mut tampered = report.clone();
        tampered[at] ^= 0x01;
        let err = verify_hopper_report(
            &tampered,
            &data("nvtrust/hopperCertChain.txt"),
            &nonce(NVTRUST_NONCE),
            "u",
            &roots(),
            SystemTime::now(),
        )
        .unwrap_err();
        assert_eq!(err.failure, Failure::Signature, "byte {at}: {err}");
    }
}

#[test]
fn chain_missing_an_intermediate_is_refused() {
    let err = verify_hopper_report(
        &hex_file("nvtrust/hopperAttestationReport.txt"),
        &data("trustee/hopper_cert_chain_case3.txt"),
        &nonce(NVTRUST_NONCE),
        "u",
        &roots(),
        SystemTime::now(),
    )
    .unwrap_err();
    assert_eq!(err.failure, Failure::Chain, "{err}");
}

#[test]
fn chain_without_the_leaf_has_no_fwid_extension() {
    let err = verify_hopper_report(
        &hex_file("nvtrust/hopperAttestationReport.txt"),
        &data("trustee/hopper_cert_chain_case4.txt"),
        &nonce(NVTRUST_NONCE),
        "u",
        &roots(),
        SystemTime::now(),
    )
    .unwrap_err();
    assert_eq!(err.failure, Failure::Fwid, "{err}");
    assert!(err.detail.contains("FwId oid"), "{err}");
}

#[test]
fn fwid_mismatch_another_gpus_chain_is_refused() {
    // the h100_nvtrust report with the CoCo CI GPU's chain: valid chain, other firmware
    let err = verify_hopper_report(
        &hex_file("nvtrust/hopperAttestationReport.txt"),
        &data("trustee/hopper_coco_certs1.txt"),
        &nonce(NVTRUST_NONCE),
        "u",
        &roots(),
        SystemTime::now(),
    )
    .unwrap_err();
    assert_eq!(err.failure, Failure::Fwid, "{err}");
    assert!(err.detail.contains("differs"), "{err}");
}

#[test]
fn pre_fwid_driver_535_report_is_refused_as_trustee_local_does() {
    let err = verify_hopper_report(
        &hex_file("attestation-sdk/gpu/hopperAttestationReport.txt"),
        &data("attestation-sdk/gpu/hopperCertChain.txt"),
        &nonce("27a328247bf7935c993341cf587be6f05986ccce4fe7ba2c54100bd616a58f66"),
        "u",
        &roots(),
        SystemTime::now(),
    )
    .unwrap_err();
    assert_eq!(err.failure, Failure::Fwid, "{err}");
    assert!(err.detail.contains("fwid not found"), "{err}");
}

fn additional(arch: &str, report: &[u8], chain: &[u8]) -> String {
    json!({"nvidia": {"device_evidence_list": [{
        "arch": arch, "uuid": "GPU-1", "evidence": STANDARD.encode(report),
        "certificate": STANDARD.encode(chain),
    }]}})
    .to_string()
}

#[test]
fn blackwell_refused_by_the_local_verifier() {
    let report = hex_file("attestation-sdk/gpu/blackwellAttestationReport.txt");
    let chain = data("attestation-sdk/gpu/blackwellCertChain.txt");
    // the report itself is well-formed and carries the nonce: only the architecture refuses it
    assert_eq!(
        parse_report(&report).unwrap().request_nonce,
        nonce(NVTRUST_NONCE)
    );
    for arch in ["BLACKWELL", "Blackwell"] {
        let err = verify_additional_evidence(
            &additional(arch, &report, &chain),
            &nonce(NVTRUST_NONCE),
            &roots(),
            SystemTime::now(),
        )
        .unwrap_err();
        assert_eq!(err.failure, Failure::Architecture, "{err}");
        assert!(err.detail.contains("device architecture not supported"));
    }
}

#[test]
fn evidence_may_be_hex_or_base64_and_arch_either_spelling() {
    let report = hex_file("nvtrust/hopperAttestationReport.txt");
    let chain = data("nvtrust/hopperCertChain.txt");
    let hex_form = json!({"nvidia": {"device_evidence_list": [{
        "arch": "Hopper", "uuid": "GPU-1", "evidence": hex::encode(&report),
        "certificate": STANDARD.encode(&chain),
    }]}})
    .to_string();
    for text in [hex_form, additional("HOPPER", &report, &chain)] {
        let gpus =
            verify_additional_evidence(&text, &nonce(NVTRUST_NONCE), &roots(), SystemTime::now())
                .unwrap();
        assert_eq!(gpus[0].claims["uuid"], "GPU-1");
    }
    for bad in [
        r#"{"tdx":{}}"#.to_string(),
        r#"{"nvidia":{"device_evidence_list":[{"arch":"Ampere","uuid":"u","evidence":"","certificate":""}]}}"#.to_string(),
        "[]".to_string(),
    ] {
        let err =
            verify_additional_evidence(&bad, &nonce(NVTRUST_NONCE), &roots(), SystemTime::now())
                .unwrap_err();
        assert_eq!(err.failure, Failure::Format, "{bad}: {err}");
    }
    assert!(verify_additional_evidence(
        r#"{"nvidia":{"device_evidence_list":[]}}"#,
        &nonce(NVTRUST_NONCE),
        &roots(),
        SystemTime::now()
    )
    .unwrap()
    .is_empty());
}
