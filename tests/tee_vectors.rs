//! The `snp` evidence provider's pure helpers on every real SEV-SNP report in
//! verify/tests/vectors (provenance in verify/tests/vectors/PROVENANCE.md).
//!
//! - the evidence JSON built from a report converts back to the same 1184 bytes;
//! - that JSON is the `sev` crate's serde form: its canonical JSON hashes to the value
//!   computed with `sev` 8.0.0 built with the `serde` feature (the form Trustee's verifier
//!   deserializes; for the e2e vector it equals Trustee's own `e2e/evidence.json`);
//! - the report, before and after the JSON round trip, verifies with its VCEK through
//!   `cvm_warden::evidence::snp::verify_report`;
//! - a certificate cache directory yields a chain that verifies the report.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use sha2::{Digest, Sha256};

use cvm_warden::evidence::snp::{verify_report, ChainSource, Product};
use cvm_warden::tee::snp::{
    evidence_json, load_cert_cache, report_from_evidence, CertTableEntry, CertType,
};

fn vectors() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("verify/tests/vectors")
}

fn read(path: &str) -> Vec<u8> {
    let full = vectors().join(path);
    std::fs::read(&full).unwrap_or_else(|e| panic!("{}: {e}", full.display()))
}

/// Raw SNP reports that are not named `*.snp-report.bin`.
const RAW_REPORTS: [&str; 4] = [
    "derived/virtee-sev-report_milan.bin",
    "go-sev-guest/attestation.bin",
    "trustee/snp/test-report.bin",
    "trustee/snp/test-vlek-report.bin",
];

/// Every raw SNP report in verify/tests/vectors: the four above and every `*.snp-report.bin`.
fn all_reports() -> Vec<String> {
    let mut found: Vec<String> = RAW_REPORTS.iter().map(|s| s.to_string()).collect();
    let mut stack = vec![vectors()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.to_string_lossy().ends_with(".snp-report.bin") {
                let rel = path.strip_prefix(vectors()).unwrap();
                found.push(rel.to_string_lossy().into_owned());
            }
        }
    }
    found.sort();
    found
}

#[test]
fn every_report_round_trips_through_the_evidence_json() {
    let reports = all_reports();
    assert!(reports.len() >= 11, "{reports:?}");
    for path in reports {
        let report = read(&path);
        assert_eq!(report.len(), 1184, "{path}");
        let evidence = evidence_json(&report, None).unwrap();
        // Through text, as the broker receives it.
        let text = serde_json::to_string(&evidence).unwrap();
        let parsed: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(report_from_evidence(&parsed).unwrap(), report, "{path}");
        assert!(parsed["cert_chain"].is_null(), "{path}");
    }
}

/// SHA-256 of the canonical (RFC 8785) JSON of `serde_json::to_value(&AttestationReport)`
/// with `sev` = "=8.0.0", features ["snp", "crypto_nossl", "serde"], for each report.
/// (Computed once outside this crate, whose `sev` lacks the `serde` feature.)
const SEV_SERDE_SHA256: [(&str, &str); 11] = [
    (
        "derived/azure-cvm-tooling-hcl-report-snp.snp-report.bin",
        "176ba7c1ddd79ae140835413ca410c53e9e81f996189f12204a3aa36e529531b",
    ),
    (
        "derived/trustee-az-hcl-report.snp-report.bin",
        "8b981ce4cea94693ce715f0aac94db86d443f06612e55744991a0ed46fd2aae6",
    ),
    (
        "derived/trustee-e2e-evidence.snp-report.bin",
        "4f582baa94f7d9895d03ce737b39457d0270e2054d94d38978087de3693005c8",
    ),
    (
        "derived/trustee-evidence-genoa.snp-report.bin",
        "f0d01b7ab1f6457fcd4844bde7e504caa9fc76129271d319b35aabc1229cccea",
    ),
    (
        "derived/trustee-evidence-v0.snp-report.bin",
        "86096fa3a5d4180a65d4feaba72765856675f7df201216f560356d287ded01bd",
    ),
    (
        "derived/trustee-evidence-v1.snp-report.bin",
        "907dd5620afedc954c975f820e6c9fcced305f8d11946ef4e378ead65c54156f",
    ),
    (
        "derived/trustee-evidence-v2.snp-report.bin",
        "da21cf1421d1c918a8cc91c135a0b07545e7dc20e370e5ec87ebcfab0324b2ab",
    ),
    (
        "derived/virtee-sev-report_milan.bin",
        "0093ace00ae5fa8e8b05a19ff5243d352d3f16ef351108091a96a939ac41a9b2",
    ),
    (
        "go-sev-guest/attestation.bin",
        "44ee14d8ac04a3a0fa1f494f0c6982f249b9b1ecf8657d1f8835d28e026ea552",
    ),
    (
        "trustee/snp/test-report.bin",
        "197b5d1b183a6f2e62b4641cfc3257dceca4eb26d90ff9e4fb9a765298e70209",
    ),
    (
        "trustee/snp/test-vlek-report.bin",
        "984a8b4c9c64f9293e6cc2fffb2c8870f8ad12182da5427e70248b0ba1c29ee5",
    ),
];

#[test]
fn report_json_is_the_sev_crate_serde_form() {
    for (path, want) in SEV_SERDE_SHA256 {
        let evidence = evidence_json(&read(path), None).unwrap();
        let canonical = serde_json_canonicalizer::to_vec(&evidence["attestation_report"]).unwrap();
        assert_eq!(hex::encode(Sha256::digest(&canonical)), want, "{path}");
    }
}

/// (report, VCEK/VLEK, CA) pairs from PROVENANCE.md.
fn pairs() -> Vec<(&'static str, Vec<u8>, ChainSource)> {
    let milan = || ChainSource::Builtin(Product::Milan);
    let genoa = || ChainSource::Builtin(Product::Genoa);
    vec![
        (
            "derived/virtee-sev-report_milan.bin",
            read("virtee-sev/certs_data/vcek_milan.der"),
            milan(),
        ),
        (
            "go-sev-guest/attestation.bin",
            read("go-sev-guest/vcek.testcer"),
            ChainSource::Pem(read("go-sev-guest/milan.testcer")),
        ),
        (
            "trustee/snp/test-report.bin",
            read("trustee/snp/test-vcek.der"),
            milan(),
        ),
        (
            "trustee/snp/test-vlek-report.bin",
            read("trustee/snp/test-vlek.der"),
            ChainSource::Pem(read("go-sev-guest/trust/ask_ark_milan_vlek.pem")),
        ),
        (
            "derived/trustee-az-hcl-report.snp-report.bin",
            first_pem_certificate(&read("trustee/az-snp-vtpm/vcek.pem")),
            milan(),
        ),
        (
            "derived/trustee-evidence-v0.snp-report.bin",
            read("derived/trustee-evidence-v0.vcek.der"),
            milan(),
        ),
        (
            "derived/trustee-evidence-v1.snp-report.bin",
            read("derived/trustee-evidence-v1.vcek.der"),
            milan(),
        ),
        (
            "derived/trustee-evidence-v2.snp-report.bin",
            read("derived/trustee-evidence-v2.vcek.der"),
            milan(),
        ),
        (
            "derived/trustee-evidence-genoa.snp-report.bin",
            read("derived/trustee-evidence-genoa.vcek.der"),
            genoa(),
        ),
        (
            "derived/trustee-e2e-evidence.snp-report.bin",
            read("derived/trustee-e2e-evidence.vcek.der"),
            ChainSource::Pem(read("go-sev-guest/trust/ask_ark_genoa.pem")),
        ),
    ]
}

fn first_pem_certificate(pem: &[u8]) -> Vec<u8> {
    let end = b"-----END CERTIFICATE-----";
    let cut = pem.windows(end.len()).position(|w| w == end).unwrap() + end.len();
    pem[..cut].to_vec()
}

fn to_pem(ders: &[&[u8]]) -> Vec<u8> {
    let mut out = String::new();
    for der in ders {
        out.push_str("-----BEGIN CERTIFICATE-----\n");
        let b64 = STANDARD.encode(der);
        for line in b64.as_bytes().chunks(64) {
            out.push_str(std::str::from_utf8(line).unwrap());
            out.push('\n');
        }
        out.push_str("-----END CERTIFICATE-----\n");
    }
    out.into_bytes()
}

#[test]
fn every_paired_report_verifies_before_and_after_the_json_round_trip() {
    for (path, vcek, chain) in pairs() {
        let report = read(path);
        verify_report(&report, &vcek, chain.clone()).unwrap_or_else(|e| panic!("{path}: {e}"));
        let evidence = evidence_json(&report, None).unwrap();
        let back = report_from_evidence(&evidence).unwrap();
        verify_report(&back, &vcek, chain).unwrap_or_else(|e| panic!("{path} (json): {e}"));
    }
}

#[test]
fn a_cert_cache_chain_verifies_its_report() {
    // The image bakes in the VCEK (DER) and the KDS cert_chain (ASK, ARK): the chain the
    // guest sends must verify the report.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("vcek.der"),
        read("go-sev-guest/vcek.testcer"),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("cert_chain.pem"),
        read("go-sev-guest/milan.testcer"),
    )
    .unwrap();
    let chain = load_cert_cache(dir.path()).unwrap().unwrap();
    let report = read("go-sev-guest/attestation.bin");
    let evidence = evidence_json(&report, Some(&chain)).unwrap();

    let sent: Vec<CertTableEntry> = serde_json::from_value(evidence["cert_chain"].clone()).unwrap();
    let find = |kind: CertType| {
        sent.iter()
            .find(|e| e.cert_type == kind)
            .map(|e| e.data.clone())
            .unwrap()
    };
    let (vcek, ask, ark) = (
        find(CertType::Vcek),
        find(CertType::Ask),
        find(CertType::Ark),
    );
    assert_eq!(
        evidence["cert_chain"][0]["cert_type"], "VCEK",
        "sev serde names the kind"
    );
    verify_report(&report, &vcek, ChainSource::Pem(to_pem(&[&ask, &ark]))).unwrap();
    // And a chain from another product does not.
    assert!(verify_report(
        &report,
        &vcek,
        ChainSource::Pem(read("go-sev-guest/trust/ask_ark_genoa.pem"))
    )
    .is_err());
}
