//! `cvm-warden-verify evidence --gpu-report … --rim F [--rim F] --at T`: the report passes
//! only when each RIM's signature verifies at `--at` and its measurements match the RIMs
//! (`tests/vectors/nvidia/rims/PROVENANCE.md`; the `h100_sdk_535` report, whose VBIOS RIM
//! is NVIDIA's 96.00.5E.00.01 and whose driver RIM here is the tampered one).

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

const VBIOS: &str = "rims/1010_0200_882_96005E0001_PROD.swidtag";
const DRIVER_TAMPERED: &str = "rims/NV_GPU_DRIVER_GH100_535.86.09_measurement_mismatch.xml";

/// `h100_sdk_535` (no FWID: `--allow-missing-fwid`) with `--rim` for each of `rims`.
fn h100_sdk_535(rims: &[&str], at: &str) -> (i32, String, String) {
    let mut command = Command::new(BIN);
    command
        .args(["evidence", "--gpu-report"])
        .arg(vector("attestation-sdk/gpu/hopperAttestationReport.txt"))
        .arg("--gpu-certs")
        .arg(vector("attestation-sdk/gpu/hopperCertChain.txt"))
        .args([
            "--nonce",
            "27a328247bf7935c993341cf587be6f05986ccce4fe7ba2c54100bd616a58f66",
            "--allow-missing-fwid",
            "--at",
            at,
        ]);
    for rim in rims {
        command.arg("--rim").arg(vector(rim));
    }
    let out = command.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn report_and_vbios_rim_verify_together() {
    let (code, stdout, stderr) = h100_sdk_535(&[VBIOS], "2024-06-01T00:00:00Z");
    assert_eq!(code, 0, "{stderr}");
    let json: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(json["rims"]["signed"][0]["kind"], "vbios");
    assert_eq!(json["rims"]["signed"][0]["version"], "96.00.5E.00.01");
    assert_eq!(
        json["rims"]["matched"]["matched"].as_array().unwrap().len(),
        12
    );
    // The report's own claims are still there.
    assert_eq!(json["claims"]["config"]["driver_version"], "535.86.09");
    let warnings = json["warnings"].to_string();
    assert!(warnings.contains("no driver RIM given"), "{warnings}");
    assert!(
        !warnings.contains("not compared with NVIDIA's RIMs"),
        "{warnings}"
    );
}

#[test]
fn an_expired_rim_signer_fails_the_report_at_a_later_time() {
    let (code, stdout, stderr) = h100_sdk_535(&[VBIOS], "2026-01-01T00:00:00Z");
    assert_eq!(code, 1, "{stdout}");
    assert!(stderr.contains("HCC RIM L4 Signer"), "{stderr}");
    assert!(stderr.contains("expired"), "{stderr}");
    assert!(stdout.is_empty(), "{stdout}");
}

#[test]
fn a_tampered_driver_rim_fails_the_report() {
    let (code, stdout, stderr) = h100_sdk_535(&[DRIVER_TAMPERED, VBIOS], "2024-06-01T00:00:00Z");
    assert_eq!(code, 1, "{stdout}");
    assert!(stderr.contains("reference digest mismatch"), "{stderr}");
}

#[test]
fn an_unreadable_rim_fails() {
    let (code, _, stderr) = h100_sdk_535(&["rims/no-such.xml"], "2024-06-01T00:00:00Z");
    assert_eq!(code, 1);
    assert!(stderr.contains("no-such.xml"), "{stderr}");
}

#[test]
fn a_driver_rim_for_another_version_fails_the_report() {
    // Both RIM signers are valid on 2025-06-01; the driver RIM is for 550.144.03.
    let (code, stdout, stderr) = h100_sdk_535(
        &["rims/NV_GPU_DRIVER_GH100_550.144.03.xml", VBIOS],
        "2025-06-01T00:00:00Z",
    );
    assert_eq!(code, 1, "{stdout}");
    assert!(
        stderr.contains("driver RIM is for version 550.144.03"),
        "{stderr}"
    );
    assert!(stderr.contains("535.86.09"), "{stderr}");
}
