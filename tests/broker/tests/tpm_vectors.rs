//! The broker's TPM quote verification against the real vectors in verify/tests/vectors/ (see
//! verify/tests/vectors/PROVENANCE.md): every quote verifies (AK signature, TPMS_ATTEST, PCR digest)
//! and a one-bit change anywhere is rejected. The vectors' qualifying data is whatever their
//! producer chose, so the full evidence path must fail exactly at the nonce check.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use kbs_test_broker::tpm::{
    check_qualifying_data, parse_tpmt_signature, verify_quote, verify_tpm_evidence, QuoteInfo,
    TpmError,
};
use serde_json::json;

fn derived(name: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../verify/tests/vectors")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// SPKI DER from a `PUBLIC KEY` PEM, decoded by hand (no re-encoding of the key).
fn pem_to_der(pem: &[u8]) -> Vec<u8> {
    let text = std::str::from_utf8(pem).unwrap();
    assert!(text.contains("-----BEGIN PUBLIC KEY-----"));
    let body: String = text.lines().filter(|l| !l.starts_with("-----")).collect();
    STANDARD.decode(body).unwrap()
}

struct Vector {
    name: &'static str,
    ak_der: Vec<u8>,
    message: Vec<u8>,
    /// Raw RSASSA signature bytes.
    signature: Vec<u8>,
    pcrs: Vec<[u8; 32]>,
}

fn pcrs_from(bytes: &[u8]) -> Vec<[u8; 32]> {
    assert_eq!(bytes.len(), 24 * 32);
    bytes
        .chunks(32)
        .map(|c| <[u8; 32]>::try_from(c).unwrap())
        .collect()
}

fn tpmt_signature(raw: &[u8]) -> Vec<u8> {
    let mut out = vec![0x00, 0x14, 0x00, 0x0b];
    out.extend_from_slice(&(raw.len() as u16).to_be_bytes());
    out.extend_from_slice(raw);
    out
}

fn vectors() -> Vec<Vector> {
    let mut all = vec![Vector {
        name: "azure-cvm-tooling",
        ak_der: pem_to_der(&derived("azure-cvm-tooling/akpub.pem")),
        message: derived("derived/azure-cvm-tooling-quote.msg.bin"),
        signature: derived("derived/azure-cvm-tooling-quote.sig.bin"),
        pcrs: pcrs_from(&derived("derived/azure-cvm-tooling-quote.pcrs-sha256.bin")),
    }];
    for name in [
        "trustee-az-hcl-report",
        "trustee-evidence-v0",
        "trustee-evidence-v1",
        "trustee-evidence-v2",
        "trustee-evidence-genoa",
    ] {
        all.push(Vector {
            name,
            ak_der: pem_to_der(&derived(&format!("derived/{name}.akpub.pem"))),
            message: derived(&format!("derived/{name}.tpm-quote.msg.bin")),
            signature: derived(&format!("derived/{name}.tpm-quote.sig.bin")),
            pcrs: pcrs_from(&derived(&format!("derived/{name}.tpm-pcrs-sha256.bin"))),
        });
    }
    // swtpm evidence: the signature file is already a marshalled TPMT_SIGNATURE
    let tpmt = derived("derived/trustee-tpm_evidence.quote.tpmt_signature.bin");
    all.push(Vector {
        name: "trustee-tpm_evidence",
        ak_der: derived("derived/trustee-tpm_evidence.akpub.der"),
        message: derived("derived/trustee-tpm_evidence.quote.msg.bin"),
        signature: parse_tpmt_signature(&tpmt).unwrap(),
        pcrs: pcrs_from(&derived("derived/trustee-tpm_evidence.pcrs-sha256.bin")),
    });
    all
}

#[test]
fn every_real_quote_verifies() {
    for v in vectors() {
        let info = verify_quote(&v.ak_der, &v.message, &v.signature, &v.pcrs)
            .unwrap_or_else(|e| panic!("{}: {e}", v.name));
        assert!(!info.extra_data.is_empty(), "{}", v.name);
        assert_eq!(info.qualified_signer.len(), 34, "{}", v.name);
    }
}

#[test]
fn swtpm_signature_file_is_rsassa_sha256() {
    let tpmt = derived("derived/trustee-tpm_evidence.quote.tpmt_signature.bin");
    assert_eq!(parse_tpmt_signature(&tpmt).unwrap(), tpmt[6..].to_vec());
    // RSAPSS, ECDSA, SHA-1, truncation and trailing bytes are refused
    for bad in [
        [&[0x00, 0x16][..], &tpmt[2..]].concat(),
        [&[0x00, 0x18][..], &tpmt[2..]].concat(),
        [&tpmt[..2], &[0x00, 0x04][..], &tpmt[4..]].concat(),
        tpmt[..tpmt.len() - 1].to_vec(),
        [&tpmt[..], &[0][..]].concat(),
    ] {
        assert!(matches!(
            parse_tpmt_signature(&bad),
            Err(TpmError::SignatureFormat(_))
        ));
    }
}

#[test]
fn one_bit_changes_are_rejected() {
    for v in vectors() {
        // every bit of the message: the signature no longer verifies
        for byte in 0..v.message.len() {
            let mut m = v.message.clone();
            m[byte] ^= 0x01 << (byte % 8);
            assert_eq!(
                verify_quote(&v.ak_der, &m, &v.signature, &v.pcrs),
                Err(TpmError::BadSignature),
                "{} message byte {byte}",
                v.name
            );
        }
        for byte in [0, v.signature.len() / 2, v.signature.len() - 1] {
            let mut s = v.signature.clone();
            s[byte] ^= 0x80;
            assert_eq!(
                verify_quote(&v.ak_der, &v.message, &s, &v.pcrs),
                Err(TpmError::BadSignature),
                "{} signature byte {byte}",
                v.name
            );
        }
        for index in [0usize, 8, 11, 15, 23] {
            let mut pcrs = v.pcrs.clone();
            pcrs[index][31] ^= 0x01;
            assert!(
                matches!(
                    verify_quote(&v.ak_der, &v.message, &v.signature, &pcrs),
                    Err(TpmError::PcrDigest { .. })
                ),
                "{} pcr {index}",
                v.name
            );
        }
        // a bit of the AK modulus (the last bytes of the SPKI are modulus, then exponent)
        let mut ak = v.ak_der.clone();
        let at = ak.len() - 10;
        ak[at] ^= 0x01;
        assert_eq!(
            verify_quote(&ak, &v.message, &v.signature, &v.pcrs),
            Err(TpmError::BadSignature),
            "{} ak",
            v.name
        );
        // 23 PCRs are not the 24 the quote selects
        assert!(verify_quote(&v.ak_der, &v.message, &v.signature, &v.pcrs[..23]).is_err());
    }
}

#[test]
fn pkcs1_or_ec_keys_are_not_an_ak_public() {
    let v = &vectors()[0];
    // PKCS#1 RSAPublicKey is the BIT STRING content of the SPKI (after 24 bytes of header
    // for a 2048-bit key): valid RSA, wrong container
    let pkcs1 = v.ak_der[24..].to_vec();
    assert!(matches!(
        verify_quote(&pkcs1, &v.message, &v.signature, &v.pcrs),
        Err(TpmError::AkPublic(_))
    ));
    let ec_spki = {
        use p256::pkcs8::EncodePublicKey;
        let key = p256::SecretKey::random(&mut rand_core::OsRng).public_key();
        key.to_public_key_der().unwrap().as_bytes().to_vec()
    };
    assert!(matches!(
        verify_quote(&ec_spki, &v.message, &v.signature, &v.pcrs),
        Err(TpmError::AkPublic(_))
    ));
}

#[test]
fn full_evidence_path_fails_only_at_the_nonce() {
    let report_data = [0x5au8; 48];
    for v in vectors() {
        let evidence = json!({
            "ak_public": STANDARD.encode(&v.ak_der),
            "tpm_quote": {
                "signature": STANDARD.encode(tpmt_signature(&v.signature)),
                "message": STANDARD.encode(&v.message),
                "pcrs": v.pcrs.iter().map(hex::encode).collect::<Vec<_>>(),
            }
        });
        match verify_tpm_evidence(&evidence, &report_data, None) {
            Err(TpmError::Nonce { got, expected }) => {
                assert_eq!(expected, hex::encode(&report_data[..32]), "{}", v.name);
                assert!(!got.is_empty());
            }
            other => panic!("{}: expected a nonce error, got {other:?}", v.name),
        }
        // unpadded base64 is not accepted
        let mut unpadded = evidence.clone();
        unpadded["tpm_quote"]["message"] = json!(STANDARD
            .encode(&v.message)
            .trim_end_matches('=')
            .to_string());
        if STANDARD.encode(&v.message).ends_with('=') {
            assert!(matches!(
                verify_tpm_evidence(&unpadded, &report_data, None),
                Err(TpmError::Base64 { .. })
            ));
        }
        // hex-encoded message (the az-snp-vtpm shape) is not tpm evidence
        let mut hexed = evidence.clone();
        hexed["tpm_quote"]["message"] = json!(hex::encode(&v.message));
        assert!(verify_tpm_evidence(&hexed, &report_data, None).is_err());
    }
}

#[test]
fn qualifying_data_must_be_report_data_cut_to_32() {
    let report_data: [u8; 48] = std::array::from_fn(|i| i as u8);
    let info = |extra: &[u8]| QuoteInfo {
        qualified_signer: vec![0; 34],
        extra_data: extra.to_vec(),
        clock: 0,
        reset_count: 0,
        restart_count: 0,
        safe: true,
        firmware_version: 0,
        pcr_digest: [0; 32],
    };
    assert!(check_qualifying_data(&info(&report_data[..32]), &report_data).is_ok());
    assert!(check_qualifying_data(&info(&report_data), &report_data).is_err());
    assert!(check_qualifying_data(&info(&report_data[..31]), &report_data).is_err());
    let mut other = report_data[..32].to_vec();
    other[0] ^= 1;
    assert!(check_qualifying_data(&info(&other), &report_data).is_err());
}
