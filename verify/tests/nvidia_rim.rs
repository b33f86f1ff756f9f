//! NVIDIA RIMs: parse, XML signature, chain to the pinned root at an injected time, and the
//! measurement match, on NVIDIA's own RIM files (`tests/vectors/nvidia/rims/`, provenance
//! in its `PROVENANCE.md`) and the `h100_sdk_535` report's measurements from
//! `tests/vectors/nvidia/derived/expected.json` (computed by an independent parser).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::SystemTime;

use cvm_warden_verify::evidence::nvidia;
use cvm_warden_verify::evidence::nvidia_rim::{
    self, check_claims, match_measurements, Rim, RimError, RimKind, RIM_ROOT_PEM, RIM_ROOT_SHA256,
};
use sha2::{Digest as _, Sha256};

fn vectors() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/vectors/nvidia")
}

fn rim_bytes(name: &str) -> Vec<u8> {
    std::fs::read(vectors().join("rims").join(name)).unwrap()
}

fn rim(name: &str) -> Rim {
    nvidia_rim::parse(&rim_bytes(name)).unwrap()
}

fn at(rfc3339: &str) -> SystemTime {
    humantime::parse_rfc3339(rfc3339).unwrap()
}

const DRIVER_550: &str = "NV_GPU_DRIVER_GH100_550.144.03.xml";
const DRIVER_BAD_SIG: &str = "incorrect_signature_driver_rim.xml";
const DRIVER_535_MISMATCH: &str = "NV_GPU_DRIVER_GH100_535.86.09_measurement_mismatch.xml";
const VBIOS_5E: &str = "1010_0200_882_96005E0001_PROD.swidtag";

/// The `h100_sdk_535` vector's facts: SPDM measurements, NVDEC0 status, versions.
struct Report {
    measurements: BTreeMap<u8, Vec<u8>>,
    nvdec0_off: bool,
    driver: String,
    vbios: String,
}

fn h100_sdk_535() -> Report {
    let text = std::fs::read_to_string(vectors().join("derived/expected.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let vector = &json["vectors"]["h100_sdk_535"];
    let values = vector["measurement_blocks"]["values"].as_object().unwrap();
    let measurements = values
        .iter()
        .map(|(k, v)| {
            (
                k.parse::<u8>().unwrap(),
                hex::decode(v.as_str().unwrap()).unwrap(),
            )
        })
        .collect();
    let opaque = &vector["opaque"];
    let nvdec0 = opaque["nvdec0_status"].as_str().unwrap().to_string();
    Report {
        measurements,
        nvdec0_off: nvdec0.trim_start_matches("0x") == "55",
        driver: opaque["driver_version"].as_str().unwrap().to_string(),
        vbios: opaque["vbios_version"].as_str().unwrap().to_string(),
    }
}

#[test]
fn vectors_are_the_byte_exact_copies_listed_in_sha256sums() {
    let dir = vectors().join("rims");
    let sums = std::fs::read_to_string(dir.join("SHA256SUMS")).unwrap();
    let mut seen = 0;
    for line in sums.lines() {
        let (sum, name) = line.split_once("  ").unwrap();
        let bytes = std::fs::read(dir.join(name)).unwrap();
        assert_eq!(hex::encode(Sha256::digest(&bytes)), sum, "{name}");
        seen += 1;
    }
    assert_eq!(seen, 4);
}

#[test]
fn baked_rim_root_is_the_pinned_nvidia_corim_root() {
    let body: String = RIM_ROOT_PEM
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    use base64::Engine as _;
    let der = base64::engine::general_purpose::STANDARD
        .decode(body)
        .unwrap();
    assert_eq!(
        hex::encode(Sha256::digest(&der)),
        "12977b5115acb0381179279fffeb5a8c4d264971ebb32298023a465fa41df5d1"
    );
    assert_eq!(RIM_ROOT_SHA256, hex::encode(Sha256::digest(&der)));
}

#[test]
fn driver_rim_parses_meta_and_resources() {
    let rim = rim(DRIVER_550);
    assert_eq!(rim.kind, RimKind::Driver);
    assert_eq!(rim.version, "550.144.03");
    assert_eq!(rim.product, "GH100");
    assert_eq!(rim.resources.len(), 64);
    assert_eq!(rim.active().count(), 21);
    let r7 = &rim.resources[7];
    assert_eq!((r7.index, r7.active, r7.size), (7, true, 48));
    assert_eq!(
        hex::encode(&r7.alternatives[0]),
        "4a5e4b3d501fe31f91bd8b6f2921b58437704a504dbedba971440e840c938c805612689ae3ac04b1009515a179063d49"
    );
    // Alternatives counts as in the file: five with 2, one with 3, one with 4.
    let mut counts: BTreeMap<usize, usize> = BTreeMap::new();
    for r in &rim.resources {
        *counts.entry(r.alternatives.len()).or_default() += 1;
    }
    assert_eq!(counts.get(&2), Some(&5));
    assert_eq!(counts.get(&3), Some(&1));
    assert_eq!(counts.get(&4), Some(&1));
}

#[test]
fn driver_rim_550_verifies_until_its_signer_expires() {
    let rim = rim(DRIVER_550);
    let signed = rim.verify_signature(at("2026-12-30T00:00:00Z")).unwrap();
    assert!(
        signed.signer.contains("HCC RIM L4 Signer"),
        "{}",
        signed.signer
    );
    assert_eq!(signed.chain.len(), 4);
    assert!(signed.chain[1]
        .subject
        .contains("NVIDIA Reference Value L3 GH100 002"));
    assert!(signed.chain[3]
        .subject
        .contains("NVIDIA CoRIM signing Root CA"));
    assert_eq!(signed.chain[3].sha256, RIM_ROOT_SHA256);
    rim.verify_signature(at("2025-06-01T00:00:00Z")).unwrap();
}

#[test]
fn driver_rim_550_fails_after_its_signer_expired_naming_cert_and_not_after() {
    let rim = rim(DRIVER_550);
    let err = rim
        .verify_signature(at("2026-12-31T00:00:00Z"))
        .unwrap_err();
    assert!(
        matches!(err, RimError::CertificateTime { expired: true, .. }),
        "{err:?}"
    );
    let text = err.to_string();
    assert!(text.contains("HCC RIM L4 Signer"), "{text}");
    assert!(text.contains("expired"), "{text}");
    assert!(text.contains("2026-12-30T16:56:50Z"), "{text}");
}

#[test]
fn driver_rim_550_fails_before_its_signer_was_issued() {
    let err = rim(DRIVER_550)
        .verify_signature(at("2024-12-01T00:00:00Z"))
        .unwrap_err();
    assert!(
        matches!(err, RimError::CertificateTime { expired: false, .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("not yet valid"), "{err}");
}

#[test]
fn incorrect_signature_rim_fails_on_the_signature() {
    let rim = rim(DRIVER_BAD_SIG);
    let err = rim
        .verify_signature(at("2026-06-01T00:00:00Z"))
        .unwrap_err();
    assert!(matches!(err, RimError::Signature { .. }), "{err:?}");
    assert!(err.to_string().contains("signature"), "{err}");
    assert!(err.to_string().contains("HCC RIM L4 Signer"), "{err}");
}

#[test]
fn measurement_mismatch_rim_fails_on_the_reference_digest() {
    let rim = rim(DRIVER_535_MISMATCH);
    let err = rim
        .verify_signature(at("2026-06-01T00:00:00Z"))
        .unwrap_err();
    assert!(matches!(err, RimError::Digest { .. }), "{err:?}");
    assert!(
        err.to_string().contains("changed after it was signed"),
        "{err}"
    );
}

#[test]
fn vbios_rim_verifies_inside_its_chain_validity_and_not_after() {
    let rim = rim(VBIOS_5E);
    assert_eq!(rim.kind, RimKind::Vbios);
    assert_eq!(rim.version, "96.00.5E.00.01");
    assert_eq!(rim.active().count(), 12);
    let signed = rim.verify_signature(at("2024-06-01T00:00:00Z")).unwrap();
    assert!(signed.chain[1]
        .subject
        .contains("NVIDIA Reference Value L3 GH100 001"));
    let err = rim
        .verify_signature(at("2025-07-01T00:00:00Z"))
        .unwrap_err();
    assert!(err.to_string().contains("2025-06-22T09:30:33Z"), "{err}");
}

#[test]
fn a_byte_changed_in_a_golden_value_breaks_the_digest() {
    let mut bytes = rim_bytes(DRIVER_550);
    let needle = b"4a5e4b3d501fe31f";
    let at_pos = bytes
        .windows(needle.len())
        .position(|w| w == needle)
        .unwrap();
    bytes[at_pos] = b'5';
    let rim = nvidia_rim::parse(&bytes).unwrap();
    let err = rim
        .verify_signature(at("2026-06-01T00:00:00Z"))
        .unwrap_err();
    assert!(matches!(err, RimError::Digest { .. }), "{err:?}");
}

#[test]
fn insignificant_syntax_changes_keep_the_signature_valid() {
    // C14N makes attribute quoting and whitespace inside tags irrelevant: the canonical
    // form, hence the digest, stays the same.
    let text = String::from_utf8(rim_bytes(DRIVER_550)).unwrap();
    let changed = text
        .replacen("corpus=\"false\"", "corpus='false'", 1)
        .replacen("<ns0:Entity name=", "<ns0:Entity   name=", 1)
        .replacen("size=\"48\"/>", "size=\"48\"></ns0:Resource>", 1);
    assert_ne!(changed, text);
    let rim = nvidia_rim::parse(changed.as_bytes()).unwrap();
    rim.verify_signature(at("2026-06-01T00:00:00Z")).unwrap();
}

#[test]
fn a_rim_whose_chain_does_not_reach_the_pinned_root_is_refused() {
    // Drop the intermediate certificates: the leaf's issuer is then not the next cert.
    let text = String::from_utf8(rim_bytes(DRIVER_550)).unwrap();
    let first_end = text.find("</ds:X509Certificate>").unwrap() + "</ds:X509Certificate>".len();
    let last_start = text.rfind("<ds:X509Certificate>").unwrap();
    let cut = format!("{}{}", &text[..first_end], &text[last_start..]);
    let rim = nvidia_rim::parse(cut.as_bytes()).unwrap();
    let err = rim
        .verify_signature(at("2026-06-01T00:00:00Z"))
        .unwrap_err();
    assert!(matches!(err, RimError::Chain { .. }), "{err:?}");
    assert!(
        err.to_string()
            .contains("NVIDIA Reference Value L3 GH100 002"),
        "{err}"
    );
}

#[test]
fn other_algorithms_and_extra_signatures_are_refused() {
    let text = String::from_utf8(rim_bytes(DRIVER_550)).unwrap();
    for (from, to, expect) in [
        (
            "xmldsig-more#ecdsa-sha384",
            "xmldsig-more#ecdsa-sha256",
            "ecdsa-sha256",
        ),
        (
            "<ds:CanonicalizationMethod Algorithm=\"http://www.w3.org/2006/12/xml-c14n11\"/>",
            "<ds:CanonicalizationMethod Algorithm=\"http://www.w3.org/2001/10/xml-exc-c14n#\"/>",
            "xml-exc-c14n",
        ),
        (
            "<ds:Reference URI=\"\">",
            "<ds:Reference URI=\"#x\">",
            "URI",
        ),
        (
            "</ns0:Payload>",
            "</ns0:Payload><ds:Signature xmlns:ds=\"http://www.w3.org/2000/09/xmldsig#\"/>",
            "2 ds:Signature",
        ),
    ] {
        let changed = text.replacen(from, to, 1);
        assert_ne!(changed, text, "{from}");
        let err = nvidia_rim::parse(changed.as_bytes()).unwrap_err();
        assert!(matches!(err, RimError::Unsupported(_)), "{from}: {err:?}");
        assert!(err.to_string().contains(expect), "{from}: {err}");
    }
    let dtd = format!("<!DOCTYPE SoftwareIdentity>{text}");
    assert!(matches!(
        nvidia_rim::parse(dtd.as_bytes()),
        Err(RimError::Xml(_))
    ));
}

#[test]
fn vbios_rim_matches_the_h100_sdk_535_report() {
    let report = h100_sdk_535();
    let vbios = rim(VBIOS_5E);
    let result = match_measurements(
        &report.measurements,
        &[&vbios],
        report.nvdec0_off,
        Some(&report.driver),
        Some(&report.vbios),
    )
    .unwrap();
    let indices: Vec<u8> = result.matched.iter().map(|m| m.rim_index).collect();
    let active: Vec<u8> = vbios.active().map(|r| r.index).collect();
    // Index 35 is not a VBIOS index: nothing skipped, all 12 compared.
    assert!(result.skipped.is_empty());
    assert_eq!(indices.len(), 12);
    assert_eq!(
        indices
            .iter()
            .chain(&result.skipped)
            .copied()
            .collect::<BTreeSet<_>>(),
        active.into_iter().collect::<BTreeSet<_>>()
    );
    assert!(!result.covers_driver_and_vbios());
}

#[test]
fn mismatch_driver_rim_differs_at_the_indices_provenance_lists() {
    let report = h100_sdk_535();
    let driver = rim(DRIVER_535_MISMATCH);
    let vbios = rim(VBIOS_5E);
    let err = match_measurements(
        &report.measurements,
        &[&driver, &vbios],
        report.nvdec0_off,
        Some(&report.driver),
        Some(&report.vbios),
    )
    .unwrap_err();
    let RimError::Mismatch(mismatches) = &err else {
        panic!("{err:?}")
    };
    let indices: BTreeSet<u8> = mismatches.iter().map(|m| m.rim_index).collect();
    let listed: BTreeSet<u8> = [7, 21, 22, 25, 26, 27, 29, 30, 31, 32, 34, 37, 39, 40, 41]
        .into_iter()
        .collect();
    assert_eq!(indices, listed);
    assert!(mismatches.iter().all(|m| m.kind == RimKind::Driver));
    let text = err.to_string();
    assert!(
        text.contains("index 7 (SPDM block 8) of the driver RIM 535.86.09"),
        "{text}"
    );
    let m7 = &mismatches[0];
    let found = hex::encode(m7.found.as_ref().unwrap());
    assert!(text.contains(&format!("found {}…", &found[..16])), "{text}");
    assert!(
        text.contains(&format!("expected {}…", hex::encode(&m7.expected[0][..8]))),
        "{text}"
    );
}

#[test]
fn versions_must_match_the_report() {
    let report = h100_sdk_535();
    let vbios = rim(VBIOS_5E);
    let driver = rim(DRIVER_550);
    // VBIOS: case and dots are ignored ("96.00.5e.00.01" vs "96.00.5E.00.01", "9600 5E0001").
    for same in ["96.00.5e.00.01", "96005E0001", "96.00.5E.00.01"] {
        match_measurements(
            &report.measurements,
            &[&vbios],
            report.nvdec0_off,
            None,
            Some(same),
        )
        .unwrap();
    }
    let err = match_measurements(
        &report.measurements,
        &[&vbios],
        report.nvdec0_off,
        None,
        Some("96.00.9f.00.01"),
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            RimError::VersionMismatch {
                kind: RimKind::Vbios,
                ..
            }
        ),
        "{err:?}"
    );
    let err = match_measurements(
        &report.measurements,
        &[&driver, &vbios],
        report.nvdec0_off,
        Some(&report.driver),
        Some(&report.vbios),
    )
    .unwrap_err();
    assert!(err.to_string().contains("550.144.03"), "{err}");
    assert!(err.to_string().contains("535.86.09"), "{err}");
    let err = match_measurements(&report.measurements, &[&vbios], false, None, None).unwrap_err();
    assert!(matches!(err, RimError::VersionUnknown { .. }), "{err:?}");
}

#[test]
fn two_rims_of_one_kind_and_no_rim_are_refused() {
    let report = h100_sdk_535();
    let a = rim(DRIVER_550);
    let b = rim(DRIVER_BAD_SIG);
    let err = match_measurements(
        &report.measurements,
        &[&a, &b],
        false,
        Some("550.144.03"),
        None,
    )
    .unwrap_err();
    assert!(matches!(err, RimError::TwoOfAKind { .. }), "{err:?}");
    let err = match_measurements(&report.measurements, &[], false, None, None).unwrap_err();
    assert_eq!(err, RimError::NoRims);
}

/// A VBIOS RIM made from the real one with index 35 active and a golden value the report
/// does not have (parse only: the edit breaks its signature, which match does not need).
fn vbios_with_index_35(active: bool, conflicting_index: Option<u8>) -> Rim {
    let text = String::from_utf8(rim_bytes(VBIOS_5E)).unwrap();
    let mut vbios = nvidia_rim::parse(text.as_bytes()).unwrap();
    let r35 = vbios.resources.iter_mut().find(|r| r.index == 35).unwrap();
    r35.active = active;
    r35.alternatives = vec![vec![0xee; 48]];
    if let Some(index) = conflicting_index {
        vbios
            .resources
            .iter_mut()
            .find(|r| r.index == index)
            .unwrap()
            .active = true;
    }
    vbios
}

#[test]
fn rim_index_35_is_skipped_only_when_nvdec0_is_off() {
    let report = h100_sdk_535();
    let vbios = vbios_with_index_35(true, None);
    let off = match_measurements(
        &report.measurements,
        &[&vbios],
        true,
        None,
        Some(&report.vbios),
    )
    .unwrap();
    assert_eq!(off.skipped, vec![35]);
    let err = match_measurements(
        &report.measurements,
        &[&vbios],
        false,
        None,
        Some(&report.vbios),
    )
    .unwrap_err();
    let RimError::Mismatch(list) = &err else {
        panic!("{err:?}")
    };
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].rim_index, 35);
    assert!(
        err.to_string().contains("of the VBIOS RIM 96.00.5E.00.01"),
        "{err}"
    );
    assert!(
        err.to_string().contains("expected eeeeeeeeeeeeeeee…"),
        "{err}"
    );
}

#[test]
fn the_same_index_active_in_driver_and_vbios_rims_is_refused() {
    let report = h100_sdk_535();
    let driver = rim(DRIVER_550);
    let first_driver_index = driver.active().next().unwrap().index;
    let vbios = vbios_with_index_35(false, Some(first_driver_index));
    let err = match_measurements(
        &report.measurements,
        &[&driver, &vbios],
        false,
        Some("550.144.03"),
        Some(&report.vbios),
    )
    .unwrap_err();
    assert_eq!(
        err,
        RimError::IndexConflict {
            index: first_driver_index,
            driver: "550.144.03".into(),
            vbios: "96.00.5E.00.01".into()
        }
    );
}

#[test]
fn a_missing_or_wrong_size_runtime_value_does_not_match() {
    let mut report = h100_sdk_535();
    let vbios = rim(VBIOS_5E);
    let index = vbios.active().nth(1).unwrap().index;
    let spdm = index + 1;
    let mut longer = report.measurements[&spdm].clone();
    longer.push(0);
    report.measurements.insert(spdm, longer);
    let err = match_measurements(
        &report.measurements,
        &[&vbios],
        true,
        None,
        Some(&report.vbios),
    )
    .unwrap_err();
    assert!(err.to_string().contains("(49 bytes)"), "{err}");
    report.measurements.remove(&spdm);
    let err = match_measurements(
        &report.measurements,
        &[&vbios],
        true,
        None,
        Some(&report.vbios),
    )
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("no such measurement in the report"),
        "{err}"
    );
}

#[test]
fn an_xml_declaration_and_a_byte_order_mark_do_not_change_the_signed_content() {
    // Neither is part of the canonical form (C14N 1.1 §2.1: no XML declaration).
    let mut bytes = b"\xef\xbb\xbf<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n".to_vec();
    bytes.extend(rim_bytes(DRIVER_550));
    let rim = nvidia_rim::parse(&bytes).unwrap();
    rim.verify_signature(at("2026-06-01T00:00:00Z")).unwrap();
}

#[test]
fn a_processing_instruction_in_the_signed_content_is_refused() {
    let text = String::from_utf8(rim_bytes(DRIVER_550)).unwrap();
    for (from, to) in [
        ("</ns0:Payload>", "<?x y?></ns0:Payload>"),
        ("<ns0:Payload", "<?x y?><ns0:Payload"),
    ] {
        let changed = text.replacen(from, to, 1);
        let err = nvidia_rim::parse(changed.as_bytes()).unwrap_err();
        assert!(matches!(err, RimError::Unsupported(_)), "{err:?}");
        assert!(err.to_string().contains("processing instruction"), "{err}");
    }
}

/// The `h100_sdk_535` evidence as `evidence::nvidia::verify` accepts it (driver 535 has no
/// FWID, so `allow_missing_fwid`, as NVIDIA's verifiers do), at `when`.
fn verified_h100_sdk_535(when: SystemTime) -> nvidia::Verified {
    let dir = vectors().join("attestation-sdk/gpu");
    let report =
        nvidia::decode_report(&std::fs::read(dir.join("hopperAttestationReport.txt")).unwrap())
            .unwrap();
    let chain = std::fs::read(dir.join("hopperCertChain.txt")).unwrap();
    let nonce: [u8; 32] =
        hex::decode("27a328247bf7935c993341cf587be6f05986ccce4fe7ba2c54100bd616a58f66")
            .unwrap()
            .try_into()
            .unwrap();
    let mut options = nvidia::VerifyOptions::new(when).unwrap();
    options.allow_missing_fwid = true;
    nvidia::verify(&report, &chain, &nonce, &options).unwrap()
}

#[test]
fn verified_report_and_vbios_rim_pass_together() {
    let when = at("2024-06-01T00:00:00Z");
    let verified = verified_h100_sdk_535(when);
    let verdict = check_claims(&verified.claims, &[rim_bytes(VBIOS_5E)], when).unwrap();
    assert_eq!(verdict.signed.len(), 1);
    assert_eq!(verdict.signed[0].kind, RimKind::Vbios);
    let json = serde_json::to_value(&verdict).unwrap();
    assert_eq!(json["signed"][0]["kind"], "vbios");
    assert_eq!(
        json["signed"][0]["signed_by"]["chain"][0]["not_after"],
        "2025-06-22T09:30:33Z"
    );
    assert_eq!(verdict.matched.matched.len(), 12);
    // The same through `nvidia::verify` with the RIM in its options (what the CLI, the
    // daemon and audit verify use); a later time fails the whole verification.
    let dir = vectors().join("attestation-sdk/gpu");
    let report =
        nvidia::decode_report(&std::fs::read(dir.join("hopperAttestationReport.txt")).unwrap())
            .unwrap();
    let chain = std::fs::read(dir.join("hopperCertChain.txt")).unwrap();
    let nonce: [u8; 32] = hex::decode(verified.nonce.as_str())
        .unwrap()
        .try_into()
        .unwrap();
    let mut options = nvidia::VerifyOptions::new(when).unwrap();
    options.allow_missing_fwid = true;
    options.rims = vec![rim_bytes(VBIOS_5E)];
    let with_rims = nvidia::verify(&report, &chain, &nonce, &options).unwrap();
    assert_eq!(with_rims.rims.as_ref().unwrap().matched.matched.len(), 12);
    options.at = at("2026-12-31T00:00:00Z");
    assert!(matches!(
        nvidia::verify(&report, &chain, &nonce, &options).unwrap_err(),
        nvidia::NvidiaError::Rim(_)
    ));
    assert!(verdict
        .warnings
        .iter()
        .any(|w| w.contains("no driver RIM given")));
}

#[test]
fn verified_report_fails_with_an_expired_rim_or_a_tampered_rim() {
    let when = at("2024-06-01T00:00:00Z");
    let verified = verified_h100_sdk_535(when);
    // The VBIOS RIM's signer expired on 2025-06-22: at a later time the RIM half fails.
    let later = at("2026-01-01T00:00:00Z");
    let err = check_claims(&verified.claims, &[rim_bytes(VBIOS_5E)], later).unwrap_err();
    assert!(matches!(err, RimError::CertificateTime { .. }), "{err:?}");
    // The mismatch driver RIM fails on its signature before any measurement is compared.
    let err = check_claims(
        &verified.claims,
        &[rim_bytes(DRIVER_535_MISMATCH), rim_bytes(VBIOS_5E)],
        when,
    )
    .unwrap_err();
    assert!(matches!(err, RimError::Digest { .. }), "{err:?}");
    // Both signers valid on 2025-06-01; a well-signed driver RIM for another driver version
    // then fails the version check.
    let err = check_claims(
        &verified.claims,
        &[rim_bytes(DRIVER_550), rim_bytes(VBIOS_5E)],
        at("2025-06-01T00:00:00Z"),
    )
    .unwrap_err();
    assert_eq!(
        err,
        RimError::VersionMismatch {
            kind: RimKind::Driver,
            rim: "550.144.03".into(),
            report: "535.86.09".into()
        }
    );
}
