//! The real NVIDIA vectors (`verify/tests/vectors/nvidia/PROVENANCE-NVIDIA.md`), their
//! expected facts (`derived/expected.json`, computed by an independent parser) and forged
//! negatives.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use sha2::{Digest as _, Sha256, Sha384};

use super::*;

macro_rules! vector {
    ($path:literal) => {
        include_bytes!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/vectors/nvidia/",
            $path
        ))
        .as_slice()
    };
}

/// (id in expected.json, report file, chain file, allow missing FWID)
fn positives() -> Vec<(&'static str, &'static [u8], &'static [u8], bool)> {
    vec![
        (
            "h100_nvtrust",
            vector!("nvtrust/hopperAttestationReport.txt"),
            vector!("nvtrust/hopperCertChain.txt"),
            false,
        ),
        (
            "h100_coco_ci",
            vector!("trustee/hopper_coco_report1.txt"),
            vector!("trustee/hopper_coco_certs1.txt"),
            false,
        ),
        (
            "b200_sdk",
            vector!("attestation-sdk/gpu/blackwellAttestationReport.txt"),
            vector!("attestation-sdk/gpu/blackwellCertChain.txt"),
            false,
        ),
        (
            "h100_hgx_nvat_json",
            vector!("derived/attestation-sdk-hopper_evidence.report.bin"),
            vector!("derived/attestation-sdk-hopper_evidence.certchain.pem"),
            false,
        ),
        (
            "h100_sdk_535",
            vector!("attestation-sdk/gpu/hopperAttestationReport.txt"),
            vector!("attestation-sdk/gpu/hopperCertChain.txt"),
            true,
        ),
    ]
}

fn expected() -> Value {
    serde_json::from_slice(vector!("derived/expected.json")).unwrap()
}

/// 2026-12-05: a fixed verification time.
fn at() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_796_428_800)
}

fn options(allow_missing_fwid: bool) -> VerifyOptions {
    let mut o = VerifyOptions::new(at()).unwrap();
    o.allow_missing_fwid = allow_missing_fwid;
    o
}

fn nonce_of(facts: &Value) -> [u8; 32] {
    hex::decode(facts["request"]["nonce"].as_str().unwrap())
        .unwrap()
        .try_into()
        .unwrap()
}

fn nvtrust() -> (Vec<u8>, &'static [u8], [u8; 32]) {
    let facts = &expected()["vectors"]["h100_nvtrust"];
    (
        decode_report(vector!("nvtrust/hopperAttestationReport.txt")).unwrap(),
        vector!("nvtrust/hopperCertChain.txt"),
        nonce_of(facts),
    )
}

#[test]
fn the_baked_root_is_nvidias_device_identity_ca() {
    let certs = cert::parse_pem_chain(cert::NVIDIA_DEVICE_ROOT_PEM, "root").unwrap();
    assert_eq!(certs.len(), 1);
    assert_eq!(
        hex::encode(Sha256::digest(&certs[0].der)),
        cert::NVIDIA_DEVICE_ROOT_SHA256
    );
    assert_eq!(
        cert::NVIDIA_DEVICE_ROOT_SHA256,
        "102bf659d5419614c9d8e6aecebc80454eb26b1df6a769ac720b9a690b167b48"
    );
    assert_eq!(certs[0].subject(), "NVIDIA Device Identity CA");
    assert_eq!(
        cert::NVIDIA_DEVICE_ROOT_PEM,
        vector!("nvtrust/verifier_device_root.pem")
    );
}

#[test]
fn every_positive_vector_parses_as_the_independent_parser_says() {
    let expected = expected();
    for (id, report, _, _) in positives() {
        let facts = &expected["vectors"][id];
        let raw = decode_report(report).unwrap();
        assert_eq!(
            raw.len() as u64,
            facts["report_bytes"].as_u64().unwrap(),
            "{id}"
        );
        let parsed = parse_report(&raw).unwrap();
        assert_eq!(
            hex::encode(parsed.nonce()),
            facts["request"]["nonce"],
            "{id}"
        );
        assert_eq!(
            hex::encode(parsed.responder_nonce()),
            facts["response"]["responder_nonce"],
            "{id}"
        );
        assert_eq!(
            parsed.signed_bytes().len() as u64,
            facts["signed_bytes_length"].as_u64().unwrap(),
            "{id}"
        );
        assert_eq!(
            hex::encode(Sha384::digest(parsed.signed_bytes())),
            facts["signed_bytes_sha384"],
            "{id}"
        );
        assert_eq!(
            hex::encode(parsed.signature()),
            facts["response"]["signature_r_s_hex"],
            "{id}"
        );
        assert_eq!(
            parsed.trailing() as u64,
            facts["trailing_bytes_after_signature"].as_u64().unwrap(),
            "{id}"
        );
        let values = facts["measurement_blocks"]["values"].as_object().unwrap();
        assert_eq!(parsed.measurements().len(), values.len(), "{id}");
        for m in parsed.measurements() {
            assert_eq!(
                values[&m.index.to_string()],
                hex::encode(&m.value),
                "{id} {}",
                m.index
            );
            assert_eq!(m.value_type, 1);
        }
        let opaque = &facts["opaque"];
        assert_eq!(
            parsed.driver_version(),
            opaque["driver_version"].as_str(),
            "{id}"
        );
        assert_eq!(
            parsed.vbios_version().as_deref(),
            opaque["vbios_version"].as_str(),
            "{id}"
        );
        assert_eq!(
            parsed.fwid().map(hex::encode).as_deref(),
            opaque["fwid"].as_str(),
            "{id}"
        );
        let order: Vec<u64> = opaque["_opaque_field_order"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f[0].as_u64().unwrap())
            .collect();
        let ids: Vec<u64> = parsed
            .opaque_fields()
            .iter()
            .map(|f| u64::from(f.id))
            .collect();
        assert_eq!(ids, order, "{id}");
        let claims = claims(&parsed, Arch::Hopper);
        for key in [
            "project",
            "project_sku",
            "chip_sku",
            "chip_sku_mod",
            "board_id",
            "gpu_info",
        ] {
            let want = opaque[key].as_str();
            let got = serde_json::to_value(&claims.config).unwrap()[key].clone();
            assert_eq!(got.as_str(), want, "{id} {key}");
        }
        if let Some(counts) = opaque["measurement_count"].as_array() {
            let got = claims.config.measurement_count.as_ref().unwrap();
            for (i, c) in counts.iter().enumerate() {
                assert_eq!(
                    u64::from(got[&(i + 1).to_string()]),
                    c.as_u64().unwrap(),
                    "{id}"
                );
            }
        }
    }
}

#[test]
fn every_positive_vector_verifies_with_nvidias_root() {
    let expected = expected();
    for (id, report, chain, allow) in positives() {
        let facts = &expected["vectors"][id];
        let raw = decode_report(report).unwrap();
        let verified = verify(&raw, chain, &nonce_of(facts), &options(allow))
            .unwrap_or_else(|e| panic!("{id}: {e}"));
        assert_eq!(verified.root, RootKind::Nvidia, "{id}");
        let subjects: Vec<String> = facts["chain"]["subjects"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_string())
            .collect();
        assert_eq!(verified.chain_subjects, subjects, "{id}");
        assert_eq!(verified.leaf_subject, subjects[0]);
        let arch = if id == "b200_sdk" {
            Arch::Blackwell
        } else {
            Arch::Hopper
        };
        assert_eq!(verified.claims.arch, arch, "{id}");
        assert_eq!(verified.fwid_checked, !allow, "{id}");
        assert_eq!(verified.claims.measurements.len(), 64);
        assert_eq!(
            verified.claims.measurements_digest,
            hex::encode(parse_report(&raw).unwrap().measurements_digest())
        );
    }
}

#[test]
fn the_blackwell_leaf_fwid_comes_from_the_tcbinfo_fwids() {
    let chain =
        cert::parse_pem_chain(vector!("attestation-sdk/gpu/blackwellCertChain.txt"), "c").unwrap();
    let (arch, fwid) = cert::leaf_fwid(&chain[0]).unwrap().unwrap();
    assert_eq!(arch, Arch::Blackwell);
    assert_eq!(
        hex::encode(fwid),
        expected()["vectors"]["b200_sdk"]["chain"]["leaf_fwid"]
    );
}

#[test]
fn the_measurements_digest_is_sha384_of_index_length_value() {
    let (raw, _, _) = nvtrust();
    let parsed = parse_report(&raw).unwrap();
    let mut hasher = Sha384::new();
    for index in 1..=64u8 {
        let m = parsed
            .measurements()
            .iter()
            .find(|m| m.index == index)
            .unwrap();
        hasher.update([index]);
        hasher.update(48u16.to_le_bytes());
        hasher.update(&m.value);
    }
    assert_eq!(
        parsed.measurements_digest(),
        <[u8; 48]>::from(hasher.finalize())
    );
    // Stable: recorded once.
    assert_eq!(
        hex::encode(parsed.measurements_digest()),
        hex::encode(parsed.measurements_digest())
    );
}

#[test]
fn the_coco_sample_signs_only_up_to_the_parsed_signature() {
    let raw = decode_report(vector!("trustee/hopper_coco_report1.txt")).unwrap();
    assert_eq!(raw.last(), Some(&0));
    let parsed = parse_report(&raw).unwrap();
    assert_eq!(parsed.trailing(), 1);
    // "last 96 bytes" slicing would take the trailing zero into the signature.
    assert_ne!(&raw[raw.len() - 96..], parsed.signature());
}

#[test]
fn the_535_report_without_fwid_is_refused_unless_allowed() {
    let facts = &expected()["vectors"]["h100_sdk_535"];
    let raw = decode_report(vector!("attestation-sdk/gpu/hopperAttestationReport.txt")).unwrap();
    let chain = vector!("attestation-sdk/gpu/hopperCertChain.txt");
    let err = verify(&raw, chain, &nonce_of(facts), &options(false)).unwrap_err();
    assert_eq!(
        err,
        NvidiaError::FwidMissing {
            driver: "535.86.09".to_string()
        }
    );
    assert!(err.to_string().contains("fwid not found"), "{err}");
    let ok = verify(&raw, chain, &nonce_of(facts), &options(true)).unwrap();
    assert!(ok.warnings.iter().any(|w| w.contains("no FWID")));
}

#[test]
fn the_invalid_signature_sample_fails_naming_the_signature() {
    let raw = decode_report(vector!(
        "attestation-sdk/gpu/hopperAttestationReportInvalidSignature.txt"
    ))
    .unwrap();
    let chain = vector!("attestation-sdk/gpu/hopperCertChainExpired.txt");
    let nonce = nonce_of(&expected()["vectors"]["h100_invalid_signature"]);
    let err = verify(&raw, chain, &nonce, &options(false)).unwrap_err();
    assert!(matches!(err, NvidiaError::SignatureInvalid { .. }), "{err}");
    assert!(err.to_string().contains("GH100 A01 GSP FMC LF"), "{err}");
}

#[test]
fn trustees_broken_chains_fail_naming_the_break() {
    let (raw, _, nonce) = nvtrust();
    let err = verify(
        &raw,
        vector!("trustee/hopper_cert_chain_case2.txt"),
        &nonce,
        &options(false),
    )
    .unwrap_err();
    assert_eq!(err, NvidiaError::ChainTooShort { count: 1 });
    let err = verify(
        &raw,
        vector!("trustee/hopper_cert_chain_case3.txt"),
        &nonce,
        &options(false),
    )
    .unwrap_err();
    match &err {
        NvidiaError::ChainBroken {
            index,
            subject,
            issuer,
            ..
        } => {
            assert_eq!(*index, 1);
            assert_eq!(subject, "GH100 A01 GSP BROM");
            assert_eq!(issuer, "NVIDIA GH100 Identity");
        }
        other => panic!("{other}"),
    }
    let err = verify(
        &raw,
        vector!("trustee/hopper_cert_chain_case4.txt"),
        &nonce,
        &options(false),
    )
    .unwrap_err();
    assert_eq!(
        err,
        NvidiaError::LeafFwidMissing {
            subject: "GH100 A01 GSP BROM".to_string()
        }
    );
}

#[test]
fn a_wrong_nonce_fails_naming_both() {
    let (raw, chain, nonce) = nvtrust();
    let err = verify(&raw, chain, &[0; 32], &options(false)).unwrap_err();
    assert_eq!(
        err,
        NvidiaError::NonceMismatch {
            expected: "00".repeat(32),
            found: hex::encode(nonce)
        }
    );
}

#[test]
fn another_gpus_chain_fails_on_the_signature() {
    let (raw, _, nonce) = nvtrust();
    let err = verify(
        &raw,
        vector!("trustee/hopper_coco_certs1.txt"),
        &nonce,
        &options(false),
    )
    .unwrap_err();
    assert!(matches!(err, NvidiaError::SignatureInvalid { .. }), "{err}");
}

#[test]
fn a_flipped_byte_anywhere_signed_fails() {
    let (raw, chain, nonce) = nvtrust();
    let parsed = parse_report(&raw).unwrap();
    // A measurement value byte, an opaque byte (driver version text) and a signature byte.
    let driver_at = raw.windows(9).position(|w| w == b"550.90.07").unwrap();
    // Block 1's value is at 37 + 8 + 7 = 52..100.
    for offset in [60, driver_at, parsed.signed_bytes().len() + 5] {
        let mut bad = raw.clone();
        bad[offset] ^= 0x01;
        let err = verify(&bad, chain, &nonce, &options(false)).unwrap_err();
        assert!(
            matches!(err, NvidiaError::SignatureInvalid { .. }),
            "offset {offset}: {err}"
        );
    }
    // A flipped nonce byte fails the signature before the nonce is compared.
    let mut bad = raw.clone();
    bad[4] ^= 0x80;
    assert!(matches!(
        verify(&bad, chain, &nonce, &options(false)).unwrap_err(),
        NvidiaError::SignatureInvalid { .. }
    ));
}

#[test]
fn a_truncated_report_fails_naming_the_field() {
    let (raw, chain, nonce) = nvtrust();
    for (cut, what) in [
        (20, "request nonce"),
        (37 + 100, "MeasurementRecord"),
        (raw.len() - 10, "Signature"),
    ] {
        let err = verify(&raw[..cut], chain, &nonce, &options(false)).unwrap_err();
        match &err {
            NvidiaError::Malformed { what: w, .. } => assert_eq!(*w, what, "{err}"),
            other => panic!("{cut}: {other}"),
        }
        assert!(err.to_string().contains("truncated"), "{err}");
    }
}

#[test]
fn only_spdm_1_1_is_accepted() {
    let (raw, chain, nonce) = nvtrust();
    let mut bad = raw.clone();
    bad[0] = 0x12;
    assert_eq!(
        verify(&bad, chain, &nonce, &options(false)).unwrap_err(),
        NvidiaError::UnsupportedSpdmVersion {
            message: "request",
            found: 0x12
        }
    );
    let mut bad = raw.clone();
    bad[37] = 0x10;
    assert_eq!(
        parse_report(&bad).unwrap_err(),
        NvidiaError::UnsupportedSpdmVersion {
            message: "response",
            found: 0x10
        }
    );
}

#[test]
fn a_measurement_spec_other_than_dmtf_is_malformed() {
    let (raw, _, _) = nvtrust();
    let mut bad = raw.clone();
    bad[37 + 8 + 1] = 2;
    match parse_report(&bad).unwrap_err() {
        NvidiaError::Malformed { what, offset, .. } => {
            assert_eq!(what, "measurement block MeasurementSpecification");
            assert_eq!(offset, 46);
        }
        other => panic!("{other}"),
    }
}

/// Rebuilds a report's opaque data (lengths fixed up; the signature kept, so only parsing
/// is tested).
fn with_opaque(raw: &[u8], fields: &[(u16, &[u8])]) -> Vec<u8> {
    let parsed = parse_report(raw).unwrap();
    let record_len = 64 * 55;
    let opaque_start = 37 + 8 + record_len + 32;
    let mut out = raw[..opaque_start].to_vec();
    let mut opaque = Vec::new();
    for (id, data) in fields {
        opaque.extend(id.to_le_bytes());
        opaque.extend((data.len() as u16).to_le_bytes());
        opaque.extend_from_slice(data);
    }
    out.extend((opaque.len() as u16).to_le_bytes());
    out.extend(opaque);
    out.extend_from_slice(parsed.signature());
    out
}

#[test]
fn opaque_fields_unknown_ids_are_data_and_duplicates_are_refused() {
    let (raw, _, _) = nvtrust();
    let report = parse_report(&with_opaque(&raw, &[(3, b"550.90.07\0"), (200, &[1, 2])])).unwrap();
    assert_eq!(report.driver_version(), Some("550.90.07"));
    assert_eq!(report.opaque(200), Some([1u8, 2].as_slice()));
    assert_eq!(claims(&report, Arch::Hopper).config.other["200"], "0102");
    match parse_report(&with_opaque(&raw, &[(3, b"1\0"), (3, b"2\0")])).unwrap_err() {
        NvidiaError::Malformed { what, detail, .. } => {
            assert_eq!(what, "opaque DataType");
            assert!(detail.contains("field 3 appears twice"), "{detail}");
        }
        other => panic!("{other}"),
    }
}

#[test]
fn vbios_is_formatted_as_nvidia_does() {
    let (raw, _, _) = nvtrust();
    let report = parse_report(&with_opaque(
        &raw,
        &[(6, &[0x00, 0x9f, 0x00, 0x96, 0x01, 0, 0, 0])],
    ))
    .unwrap();
    assert_eq!(report.vbios_version().as_deref(), Some("96.00.9f.00.01"));
}

#[test]
fn hex_and_raw_reports_decode_to_the_same_bytes() {
    let from_hex = decode_report(vector!("nvtrust/hopperAttestationReport.txt")).unwrap();
    assert_eq!(decode_report(&from_hex).unwrap(), from_hex);
    let mut spaced = vector!("nvtrust/hopperAttestationReport.txt").to_vec();
    spaced.extend(b"\n");
    assert_eq!(decode_report(&spaced).unwrap(), from_hex);
    assert!(matches!(
        decode_report(b"abc").unwrap_err(),
        NvidiaError::Encoding { .. }
    ));
    // A PEM chain given as the report: not hex, so raw, and the parse names the field.
    let pem = decode_report(vector!("nvtrust/hopperCertChain.txt")).unwrap();
    assert!(matches!(
        parse_report(&pem).unwrap_err(),
        NvidiaError::UnsupportedSpdmVersion { .. }
    ));
}

#[test]
fn validity_is_checked_at_the_injected_time() {
    let (raw, chain, nonce) = nvtrust();
    let mut o = options(false);
    o.at = UNIX_EPOCH + Duration::from_secs(1_000_000_000); // 2001
    match verify(&raw, chain, &nonce, &o).unwrap_err() {
        NvidiaError::CertNotYetValid { index, at, .. } => {
            assert_eq!(index, 0);
            assert_eq!(at, "2001-09-09T01:46:40Z");
        }
        other => panic!("{other}"),
    }
    // After 9999-12-31.
    o.at = UNIX_EPOCH + Duration::from_secs(253_402_300_800 + 86_400);
    assert!(matches!(
        verify(&raw, chain, &nonce, &o).unwrap_err(),
        NvidiaError::CertExpired { index: 0, .. }
    ));
}

#[test]
fn a_forged_chain_is_an_unknown_root_unless_given_and_then_says_so() {
    let (raw, _, _) = nvtrust();
    let nonce = [7u8; 32];
    let (report, forged) = forge::evidence(&raw, &nonce);
    match verify(&report, &forged.chain_pem, &nonce, &options(false)).unwrap_err() {
        NvidiaError::UnknownRoot {
            subject, sha256, ..
        } => {
            assert_eq!(subject, "cvm-warden test GPU root");
            let root = cert::parse_pem_chain(&forged.root_pem, "r").unwrap();
            assert_eq!(sha256, root[0].sha256());
        }
        other => panic!("{other}"),
    }
    let mut o = options(false);
    o.roots = Roots::with_extra(&forged.root_pem).unwrap();
    let verified = verify(&report, &forged.chain_pem, &nonce, &o).unwrap();
    assert!(matches!(verified.root, RootKind::Other { .. }));
    assert!(verified.warnings.iter().any(|w| w.contains("not NVIDIA's")));
    assert_eq!(verified.claims.arch, Arch::Hopper);
    assert_eq!(verified.nonce, hex::encode(nonce));
    // A real chain with the forged root appended to the extra roots still ends at NVIDIA's.
    let (real, chain, real_nonce) = nvtrust();
    assert_eq!(
        verify(&real, chain, &real_nonce, &o).unwrap().root,
        RootKind::Nvidia
    );
    // The forged leaf's FWID must still equal the report's.
    let other = forge::chain([9; 48]);
    let report = other.sign_report(&raw, &nonce);
    o.roots = Roots::with_extra(&other.root_pem).unwrap();
    match verify(&report, &other.chain_pem, &nonce, &o).unwrap_err() {
        NvidiaError::FwidMismatch { leaf, .. } => assert_eq!(leaf, "09".repeat(48)),
        other => panic!("{other}"),
    }
}

#[test]
fn rims_given_are_checked_never_ignored() {
    let (raw, chain, nonce) = nvtrust();
    let mut o = options(false);
    o.rims = vec![b"<SoftwareIdentity/>".to_vec()];
    let error = verify(&raw, chain, &nonce, &o).unwrap_err();
    assert!(matches!(error, NvidiaError::Rim(_)), "{error:?}");
    assert!(verify(&raw, chain, &nonce, &options(false))
        .unwrap()
        .rims
        .is_none());
}

#[test]
fn arch_display_and_parse() {
    assert_eq!(Arch::Hopper.to_string(), "HOPPER");
    assert_eq!(Arch::Blackwell.to_string(), "BLACKWELL");
    assert_eq!(Arch::parse("Hopper"), Some(Arch::Hopper));
    assert_eq!(Arch::parse("LS10"), None);
}

/// root → intermediate → leaf, forged; `intermediate_ca`: whether the intermediate says cA;
/// `sha256`: every certificate signed with ecdsa-with-SHA256.
fn three_link_chain(intermediate_ca: bool, sha256: bool) -> (Vec<u8>, forge::GpuChain) {
    use p384::ecdsa::SigningKey;
    let (raw, _, _) = nvtrust();
    let fwid = parse_report(&raw).unwrap().fwid().unwrap();
    let root_key = SigningKey::random(&mut rand_core::OsRng);
    let mid_key = SigningKey::random(&mut rand_core::OsRng);
    let leaf_key = SigningKey::random(&mut rand_core::OsRng);
    let (root_name, mid_name) = ("CN=test root", "CN=test intermediate");
    let root = forge::certificate(
        root_name,
        root_name,
        root_key.verifying_key(),
        &root_key,
        1,
        vec![forge::ca_extension()],
        sha256,
    );
    let mid = forge::certificate(
        mid_name,
        root_name,
        mid_key.verifying_key(),
        &root_key,
        2,
        if intermediate_ca {
            vec![forge::ca_extension()]
        } else {
            vec![]
        },
        sha256,
    );
    let leaf = forge::certificate(
        forge::LEAF_NAME,
        mid_name,
        leaf_key.verifying_key(),
        &mid_key,
        3,
        vec![forge::fwid_extension(leaf_key.verifying_key(), &fwid)],
        sha256,
    );
    let chain = forge::GpuChain {
        root_pem: forge::pem(&[&root]),
        chain_pem: forge::pem(&[&leaf, &mid, &root]),
        leaf_key,
        fwid,
    };
    (raw, chain)
}

#[test]
fn an_issuer_that_is_not_a_ca_breaks_the_chain() {
    let nonce = [3u8; 32];
    let (raw, chain) = three_link_chain(true, false);
    let mut o = options(false);
    o.roots = Roots::with_extra(&chain.root_pem).unwrap();
    let report = chain.sign_report(&raw, &nonce);
    assert_eq!(
        verify(&report, &chain.chain_pem, &nonce, &o)
            .unwrap()
            .chain_subjects
            .len(),
        3
    );
    let (raw, chain) = three_link_chain(false, false);
    o.roots = Roots::with_extra(&chain.root_pem).unwrap();
    let report = chain.sign_report(&raw, &nonce);
    match verify(&report, &chain.chain_pem, &nonce, &o).unwrap_err() {
        NvidiaError::ChainBroken {
            index,
            issuer,
            reason,
            ..
        } => {
            assert_eq!(index, 0);
            assert_eq!(issuer, "test intermediate");
            assert!(reason.contains("not a CA"), "{reason}");
        }
        other => panic!("{other}"),
    }
}

#[test]
fn ecdsa_with_sha256_links_verify_too() {
    let nonce = [4u8; 32];
    let (raw, chain) = three_link_chain(true, true);
    let mut o = options(false);
    o.roots = Roots::with_extra(&chain.root_pem).unwrap();
    let report = chain.sign_report(&raw, &nonce);
    let verified = verify(&report, &chain.chain_pem, &nonce, &o).unwrap();
    assert_eq!(verified.leaf_subject, "GH100 A01 GSP FMC LF");
    // A SHA-256 link whose signature is for other bytes still fails.
    let (_, other) = three_link_chain(true, true);
    let mixed = [
        cert::parse_pem_chain(&chain.chain_pem, "c").unwrap()[0]
            .der
            .clone(),
        cert::parse_pem_chain(&other.chain_pem, "c").unwrap()[1]
            .der
            .clone(),
        cert::parse_pem_chain(&other.chain_pem, "c").unwrap()[2]
            .der
            .clone(),
    ];
    o.roots = Roots::with_extra(&other.root_pem).unwrap();
    let pem = forge::pem(&[&mixed[0], &mixed[1], &mixed[2]]);
    match verify(&report, &pem, &nonce, &o).unwrap_err() {
        NvidiaError::ChainBroken { index, reason, .. } => {
            assert_eq!(index, 0);
            assert!(reason.contains("does not verify"), "{reason}");
        }
        other => panic!("{other}"),
    }
}
