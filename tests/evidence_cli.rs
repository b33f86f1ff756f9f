//! `cvm-warden evidence verify` on the real SEV-SNP vectors (see verify/tests/vectors/PROVENANCE.md):
//! exit 0 with the parsed fields only when the report verifies up to AMD's root.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_cvm-warden");

fn vector(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("verify/tests/vectors")
        .join(path)
}

/// Runs `cvm-warden evidence verify ARGS…`; returns (exit code, stdout, stderr).
fn evidence_verify(args: &[&std::ffi::OsStr]) -> (i32, String, String) {
    let out = Command::new(BIN)
        .args(["evidence", "verify"])
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn verify(report: &Path, vcek: &Path, chain: &[&str]) -> (i32, String, String) {
    let mut args = vec![
        "--snp-report".as_ref(),
        report.as_os_str(),
        "--vcek".as_ref(),
        vcek.as_os_str(),
    ];
    args.extend(chain.iter().map(std::ffi::OsStr::new));
    evidence_verify(&args)
}

#[test]
fn a_real_milan_report_verifies_with_the_builtin_and_the_kds_chain() {
    let report = vector("go-sev-guest/attestation.bin");
    let vcek = vector("go-sev-guest/vcek.testcer");
    let chain = vector("go-sev-guest/milan.testcer");
    for args in [
        vec!["--product", "milan"],
        vec!["--chain", chain.to_str().unwrap()],
    ] {
        let (code, stdout, stderr) = verify(&report, &vcek, &args);
        assert_eq!(code, 0, "{args:?}: {stderr}");
        let json: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        assert_eq!(json["verified"], true);
        assert_eq!(json["version"], 2);
        assert!(json["report_data"]
            .as_str()
            .unwrap()
            .starts_with("0102030405000000"));
    }
}

#[test]
fn a_genoa_report_verifies_with_the_genoa_chain_only() {
    let report = vector("derived/trustee-evidence-genoa.snp-report.bin");
    let vcek = vector("derived/trustee-evidence-genoa.vcek.der");
    assert_eq!(verify(&report, &vcek, &["--product", "genoa"]).0, 0);
    let (code, stdout, stderr) = verify(&report, &vcek, &["--product", "milan"]);
    assert_eq!(code, 1);
    assert!(stdout.is_empty());
    assert!(stderr.contains("not signed by the ask"), "{stderr}");
}

#[test]
fn one_flipped_bit_in_the_report_fails_with_exit_1() {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = std::fs::read(vector("go-sev-guest/attestation.bin")).unwrap();
    bytes[0x90] ^= 0x01; // inside the launch measurement
    let tampered = dir.path().join("report.bin");
    std::fs::write(&tampered, &bytes).unwrap();
    let (code, stdout, stderr) = verify(
        &tampered,
        &vector("go-sev-guest/vcek.testcer"),
        &["--product", "milan"],
    );
    assert_eq!(code, 1);
    assert!(stdout.is_empty());
    assert!(
        stderr.contains("report signature does not verify"),
        "{stderr}"
    );
}

fn verify_quote(msg: &Path, sig: &Path, ak: &Path, pcrs: &Path) -> (i32, String, String) {
    evidence_verify(&[
        "--tpm-quote".as_ref(),
        msg.as_os_str(),
        "--tpm-signature".as_ref(),
        sig.as_os_str(),
        "--ak".as_ref(),
        ak.as_os_str(),
        "--pcrs".as_ref(),
        pcrs.as_os_str(),
    ])
}

#[test]
fn a_real_azure_vtpm_quote_verifies_with_its_ak_and_pcrs() {
    let d = |f: &str| vector(&format!("derived/azure-cvm-tooling-quote.{f}"));
    let (code, stdout, stderr) = verify_quote(
        &d("msg.bin"),
        &d("sig.bin"),
        &vector("azure-cvm-tooling/akpub.pem"),
        &d("pcrs-sha256.bin"),
    );
    assert_eq!(code, 0, "{stderr}");
    let json: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(json["verified"], true);
    assert_eq!(json["pcrs_checked"], true);
    assert_eq!(json["extra_data"], hex_of(b"challenge"));
}

#[test]
fn a_quote_with_a_changed_pcr_or_another_ak_fails_with_exit_1() {
    let dir = tempfile::tempdir().unwrap();
    let d = |f: &str| vector(&format!("derived/azure-cvm-tooling-quote.{f}"));
    let mut pcrs = std::fs::read(d("pcrs-sha256.bin")).unwrap();
    pcrs[0] ^= 0x80;
    let changed = dir.path().join("pcrs.bin");
    std::fs::write(&changed, &pcrs).unwrap();
    let ak = vector("azure-cvm-tooling/akpub.pem");
    let (code, stdout, _) = verify_quote(&d("msg.bin"), &d("sig.bin"), &ak, &changed);
    assert_eq!((code, stdout.is_empty()), (1, true));
    let other_ak = vector("derived/trustee-evidence-genoa.akpub.pem");
    let (code, stdout, _) = verify_quote(
        &d("msg.bin"),
        &d("sig.bin"),
        &other_ak,
        &d("pcrs-sha256.bin"),
    );
    assert_eq!((code, stdout.is_empty()), (1, true));
}

fn hex_of(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `cvm-warden evidence verify --gpu-report` is the verifier's: the real H100 sample verifies
/// to NVIDIA's pinned root, and the same report for another nonce is refused naming both.
#[test]
fn a_real_h100_report_verifies_through_the_daemon_binary() {
    let report = vector("nvidia/nvtrust/hopperAttestationReport.txt");
    let certs = vector("nvidia/nvtrust/hopperCertChain.txt");
    let nonce = "931d8dd0add203ac3d8b4fbde75e115278eefcdceac5b87671a748f32364dfcb";
    let args = |nonce: &str| {
        vec![
            std::ffi::OsString::from("--gpu-report"),
            report.clone().into_os_string(),
            "--gpu-certs".into(),
            certs.clone().into_os_string(),
            "--nonce".into(),
            nonce.into(),
        ]
    };
    let good = args(nonce);
    let (code, stdout, stderr) =
        evidence_verify(&good.iter().map(|a| a.as_os_str()).collect::<Vec<_>>());
    assert_eq!(code, 0, "{stderr}");
    let json: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(json["root"]["kind"], "nvidia");
    assert_eq!(json["claims"]["arch"], "HOPPER");
    assert_eq!(json["claims"]["config"]["driver_version"], "550.90.07");
    let zero = "00".repeat(32);
    let bad = args(&zero);
    let (code, _, stderr) = evidence_verify(&bad.iter().map(|a| a.as_os_str()).collect::<Vec<_>>());
    assert_eq!(code, 1);
    assert!(stderr.contains("GPU nonce mismatch"), "{stderr}");
    assert!(stderr.contains(nonce), "{stderr}");
}
