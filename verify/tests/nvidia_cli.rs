//! `cvm-warden-verify evidence verify --gpu-report … --gpu-certs … --nonce …` on the real
//! NVIDIA vectors (`tests/vectors/nvidia/PROVENANCE-NVIDIA.md`): exit 0 with the claims as
//! JSON only when the evidence verifies up to NVIDIA's pinned root; 1 naming the reason
//! otherwise; 3 when rooted at a `--gpu-root` that is not NVIDIA's.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_cvm-warden-verify");

fn vector(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/vectors/nvidia")
        .join(path)
}

fn expected() -> Value {
    serde_json::from_slice(&std::fs::read(vector("derived/expected.json")).unwrap()).unwrap()
}

fn nonce(id: &str) -> String {
    expected()["vectors"][id]["request"]["nonce"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Runs `cvm-warden-verify evidence verify --gpu-report R --gpu-certs C --nonce N EXTRA…`.
fn gpu(report: &Path, certs: &Path, nonce: &str, extra: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN)
        .args(["evidence", "--gpu-report"])
        .arg(report)
        .arg("--gpu-certs")
        .arg(certs)
        .args(["--nonce", nonce])
        .args(extra)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn every_positive_nvidia_sample_verifies_through_the_binary() {
    let expected = expected();
    for (id, report, certs, extra) in [
        (
            "h100_nvtrust",
            "nvtrust/hopperAttestationReport.txt",
            "nvtrust/hopperCertChain.txt",
            &[][..],
        ),
        (
            "h100_coco_ci",
            "trustee/hopper_coco_report1.txt",
            "trustee/hopper_coco_certs1.txt",
            &[],
        ),
        (
            "b200_sdk",
            "attestation-sdk/gpu/blackwellAttestationReport.txt",
            "attestation-sdk/gpu/blackwellCertChain.txt",
            &[],
        ),
        (
            "h100_hgx_nvat_json",
            "derived/attestation-sdk-hopper_evidence.report.bin",
            "derived/attestation-sdk-hopper_evidence.certchain.pem",
            &[],
        ),
        (
            "h100_sdk_535",
            "attestation-sdk/gpu/hopperAttestationReport.txt",
            "attestation-sdk/gpu/hopperCertChain.txt",
            &["--allow-missing-fwid"],
        ),
    ] {
        let (code, stdout, stderr) = gpu(
            &vector(report),
            &vector(certs),
            &nonce(id),
            &[extra, &["--at", "2026-12-05T00:00:00Z"]].concat(),
        );
        assert_eq!(code, 0, "{id}: {stderr}");
        let json: Value = serde_json::from_str(&stdout).unwrap();
        let facts = &expected["vectors"][id];
        assert_eq!(json["root"]["kind"], "nvidia", "{id}");
        assert_eq!(
            json["claims"]["config"]["driver_version"], facts["opaque"]["driver_version"],
            "{id}"
        );
        assert_eq!(
            json["claims"]["config"]["vbios_version"], facts["opaque"]["vbios_version"],
            "{id}"
        );
        assert_eq!(
            json["claims"]["measurements"]["27"], facts["measurement_blocks"]["values"]["27"],
            "{id}"
        );
        assert_eq!(
            json["claims"]["arch"],
            if id == "b200_sdk" {
                "BLACKWELL"
            } else {
                "HOPPER"
            }
        );
        assert_eq!(json["leaf_subject"], facts["chain"]["subjects"][0], "{id}");
    }
}

#[test]
fn the_535_sample_needs_allow_missing_fwid() {
    let (code, _, stderr) = gpu(
        &vector("attestation-sdk/gpu/hopperAttestationReport.txt"),
        &vector("attestation-sdk/gpu/hopperCertChain.txt"),
        &nonce("h100_sdk_535"),
        &[],
    );
    assert_eq!(code, 1);
    assert!(stderr.contains("fwid not found"), "{stderr}");
    assert!(stderr.contains("--allow-missing-fwid"), "{stderr}");
}

fn refused(report: &str, certs: &str, nonce: &str, extra: &[&str]) -> String {
    let (code, stdout, stderr) = gpu(&vector(report), &vector(certs), nonce, extra);
    assert_eq!(code, 1, "{report} {certs}: {stdout}");
    assert!(stdout.is_empty(), "{stdout}");
    stderr
}

#[test]
fn every_negative_nvidia_sample_fails_naming_the_reason() {
    let report = "nvtrust/hopperAttestationReport.txt";
    let certs = "nvtrust/hopperCertChain.txt";
    let n = nonce("h100_nvtrust");
    let stderr = refused(
        "attestation-sdk/gpu/hopperAttestationReportInvalidSignature.txt",
        "attestation-sdk/gpu/hopperCertChainExpired.txt",
        &n,
        &[],
    );
    assert!(stderr.contains("signature does not verify"), "{stderr}");
    let stderr = refused(report, "trustee/hopper_cert_chain_case2.txt", &n, &[]);
    assert!(stderr.contains("has 1 certificate(s)"), "{stderr}");
    let stderr = refused(report, "trustee/hopper_cert_chain_case3.txt", &n, &[]);
    assert!(
        stderr.contains(
            "broken at index 1 (\"GH100 A01 GSP BROM\" issued by \"NVIDIA GH100 Identity\")"
        ),
        "{stderr}"
    );
    let stderr = refused(report, "trustee/hopper_cert_chain_case4.txt", &n, &[]);
    assert!(
        stderr.contains("\"GH100 A01 GSP BROM\" has no FWID extension"),
        "{stderr}"
    );
    let stderr = refused(report, certs, &"00".repeat(32), &[]);
    assert!(
        stderr.contains(&format!("GPU nonce mismatch: expected {}", "00".repeat(32))),
        "{stderr}"
    );
    assert!(stderr.contains(&n), "{stderr}");
    // Report and chain swapped.
    let stderr = refused(certs, report, &n, &[]);
    assert!(stderr.contains("SPDM version 0x2d"), "{stderr}");
    // Another GPU's chain: the FWIDs differ and the signature fails (signature first).
    let stderr = refused(report, "trustee/hopper_coco_certs1.txt", &n, &[]);
    assert!(stderr.contains("signature does not verify"), "{stderr}");
}

#[test]
fn a_flipped_byte_truncation_or_unknown_version_fails_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let raw = cvm_warden_verify::evidence::nvidia::decode_report(
        &std::fs::read(vector("nvtrust/hopperAttestationReport.txt")).unwrap(),
    )
    .unwrap();
    let certs = vector("nvtrust/hopperCertChain.txt");
    let n = nonce("h100_nvtrust");
    let write = |name: &str, bytes: &[u8]| {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    };
    let mut flipped = raw.clone();
    flipped[1000] ^= 0x10;
    let (code, _, stderr) = gpu(&write("flipped.bin", &flipped), &certs, &n, &[]);
    assert_eq!(code, 1);
    assert!(stderr.contains("signature does not verify"), "{stderr}");
    let (code, _, stderr) = gpu(&write("short.bin", &raw[..2000]), &certs, &n, &[]);
    assert_eq!(code, 1);
    assert!(
        stderr.contains("malformed GPU attestation report"),
        "{stderr}"
    );
    assert!(stderr.contains("truncated"), "{stderr}");
    let mut v12 = raw.clone();
    v12[0] = 0x12;
    let (code, _, stderr) = gpu(&write("v12.bin", &v12), &certs, &n, &[]);
    assert_eq!(code, 1);
    assert!(
        stderr.contains("request has SPDM version 0x12; only 1.1"),
        "{stderr}"
    );
    // The raw bytes verify as the hex text does.
    let (code, _, stderr) = gpu(&write("raw.bin", &raw), &certs, &n, &[]);
    assert_eq!(code, 0, "{stderr}");
}

#[test]
fn a_chain_not_rooted_at_nvidia_fails_and_with_gpu_root_exits_3() {
    use cvm_warden_verify::evidence::nvidia::{decode_report, forge};
    let dir = tempfile::tempdir().unwrap();
    let raw = decode_report(&std::fs::read(vector("nvtrust/hopperAttestationReport.txt")).unwrap())
        .unwrap();
    let nonce = [5u8; 32];
    let (report, chain) = forge::evidence(&raw, &nonce);
    let report_path = dir.path().join("report.bin");
    let chain_path = dir.path().join("chain.pem");
    let root_path = dir.path().join("root.pem");
    std::fs::write(&report_path, &report).unwrap();
    std::fs::write(&chain_path, &chain.chain_pem).unwrap();
    std::fs::write(&root_path, &chain.root_pem).unwrap();
    let (code, _, stderr) = gpu(&report_path, &chain_path, &hex::encode(nonce), &[]);
    assert_eq!(code, 1);
    assert!(
        stderr.contains("\"cvm-warden test GPU root\"")
            && stderr.contains("which is not NVIDIA's device identity root"),
        "{stderr}"
    );
    let (code, stdout, stderr) = gpu(
        &report_path,
        &chain_path,
        &hex::encode(nonce),
        &["--gpu-root", root_path.to_str().unwrap()],
    );
    assert_eq!(code, 3, "{stderr}");
    let json: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(json["root"]["kind"], "other");
    assert!(stderr.contains("not NVIDIA's"), "{stderr}");
}

#[test]
fn usage_errors_exit_2() {
    let report = vector("nvtrust/hopperAttestationReport.txt");
    let certs = vector("nvtrust/hopperCertChain.txt");
    let (code, _, stderr) = gpu(&report, &certs, "abcd", &[]);
    assert_eq!(code, 2);
    assert!(stderr.contains("64 hex digits"), "{stderr}");
    let (code, _, stderr) = gpu(
        &report,
        &certs,
        &nonce("h100_nvtrust"),
        &["--at", "yesterday"],
    );
    assert_eq!(code, 2);
    assert!(stderr.contains("RFC 3339"), "{stderr}");
    let out = Command::new(BIN)
        .args(["evidence", "--gpu-report"])
        .arg(&report)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}
