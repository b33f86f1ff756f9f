//! A self-made NVIDIA-shaped GPU chain for tests (never in a release build): a P-384 test
//! root and a leaf with a Hopper FWID extension, keys generated per call, and real reports
//! re-signed with a chosen nonce. Every signature holds, but the root is not NVIDIA's: pass
//! [`GpuChain::root_pem`] with [`super::Roots::with_extra`] (a verdict rooted there says
//! [`super::RootKind::Other`]).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::str::FromStr;
use std::time::Duration;

use p384::ecdsa::signature::Signer;
use p384::ecdsa::{SigningKey, VerifyingKey};
use rand_core::OsRng;
use x509_cert::der::asn1::{BitString, GeneralizedTime, ObjectIdentifier, OctetString, UtcTime};
use x509_cert::der::{Any, Encode};
use x509_cert::ext::pkix::BasicConstraints;
use x509_cert::ext::Extension;
use x509_cert::name::Name;
use x509_cert::serial_number::SerialNumber;
use x509_cert::spki::{AlgorithmIdentifierOwned, SubjectPublicKeyInfoOwned};
use x509_cert::time::{Time, Validity};
use x509_cert::{Certificate, TbsCertificate, Version};

use super::cert::OID_FWID_HOPPER;
use super::parse_report;

/// The forged leaf's subject.
pub const LEAF_NAME: &str = "CN=GH100 A01 GSP FMC LF,O=cvm-warden test";

const OID_ECDSA_SHA256: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.2");
const OID_ECDSA_SHA384: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.3");
const OID_EC_PUBLIC_KEY: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.2.1");
const OID_SECP384R1: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.132.0.34");
const OID_SHA384: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.16.840.1.101.3.4.2.2");
const OID_BASIC_CONSTRAINTS: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.29.19");

/// A forged chain: test root → leaf (`GH100 A01 GSP FMC LF`, test).
#[derive(Debug, Clone)]
pub struct GpuChain {
    /// The root certificate, PEM.
    pub root_pem: Vec<u8>,
    /// Leaf then root, PEM (what NVML's `attestationCertChain` holds).
    pub chain_pem: Vec<u8>,
    /// The leaf's key (signs reports).
    pub leaf_key: SigningKey,
    /// The FWID in the leaf's extension.
    pub fwid: [u8; 48],
}

/// A DER TLV with a short or long length.
fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = content.len();
    if len < 0x80 {
        out.push(len as u8);
    } else if len < 0x100 {
        out.extend([0x81, len as u8]);
    } else {
        out.extend([0x82, (len >> 8) as u8, len as u8]);
    }
    out.extend_from_slice(content);
    out
}

fn spki(key: &VerifyingKey) -> SubjectPublicKeyInfoOwned {
    SubjectPublicKeyInfoOwned {
        algorithm: AlgorithmIdentifierOwned {
            oid: OID_EC_PUBLIC_KEY,
            parameters: Some(Any::encode_from(&OID_SECP384R1).unwrap()),
        },
        subject_public_key: BitString::from_bytes(key.to_encoded_point(false).as_bytes()).unwrap(),
    }
}

/// The Hopper FWID extension value: `SEQUENCE { INTEGER 1, SPKI, SEQUENCE { sha384, OCTET
/// STRING fwid } }`.
pub fn hopper_fwid_extension(key: &VerifyingKey, fwid: &[u8; 48]) -> Vec<u8> {
    let mut digest = OID_SHA384.to_der().unwrap();
    digest.extend(tlv(0x04, fwid));
    let mut content = tlv(0x02, &[1]);
    content.extend(spki(key).to_der().unwrap());
    content.extend(tlv(0x30, &digest));
    tlv(0x30, &content)
}

/// `basicConstraints` cA = true (critical).
pub fn ca_extension() -> Extension {
    Extension {
        extn_id: OID_BASIC_CONSTRAINTS,
        critical: true,
        extn_value: OctetString::new(
            BasicConstraints {
                ca: true,
                path_len_constraint: None,
            }
            .to_der()
            .unwrap(),
        )
        .unwrap(),
    }
}

/// The Hopper FWID extension (2.23.133.5.4.1) of a leaf with `key`.
pub fn fwid_extension(key: &VerifyingKey, fwid: &[u8; 48]) -> Extension {
    Extension {
        extn_id: OID_FWID_HOPPER,
        critical: false,
        extn_value: OctetString::new(hopper_fwid_extension(key, fwid)).unwrap(),
    }
}

/// A certificate (DER) for `key`, signed by `signer` with ecdsa-with-SHA384 (or -SHA256
/// when `sha256`), valid 2021-01-01 .. 9999-12-31. Names are RFC 4514 text.
pub fn certificate(
    subject: &str,
    issuer: &str,
    key: &VerifyingKey,
    signer: &SigningKey,
    serial: u8,
    extensions: Vec<Extension>,
    sha256: bool,
) -> Vec<u8> {
    use p384::ecdsa::signature::hazmat::PrehashSigner;
    use sha2::Digest as _;
    let algorithm = if sha256 {
        OID_ECDSA_SHA256
    } else {
        OID_ECDSA_SHA384
    };
    let tbs = TbsCertificate {
        version: Version::V3,
        serial_number: SerialNumber::new(&[serial]).unwrap(),
        signature: AlgorithmIdentifierOwned {
            oid: algorithm,
            parameters: None,
        },
        issuer: Name::from_str(issuer).unwrap(),
        validity: Validity {
            // 2021-01-01 .. 9999-12-31, as NVIDIA's device certificates.
            not_before: Time::UtcTime(
                UtcTime::from_unix_duration(Duration::from_secs(1_609_459_200)).unwrap(),
            ),
            not_after: Time::GeneralTime(
                GeneralizedTime::from_unix_duration(Duration::from_secs(253_402_300_799)).unwrap(),
            ),
        },
        subject: Name::from_str(subject).unwrap(),
        subject_public_key_info: spki(key),
        issuer_unique_id: None,
        subject_unique_id: None,
        extensions: Some(extensions),
    };
    let tbs_der = tbs.to_der().unwrap();
    let signature: p384::ecdsa::Signature = if sha256 {
        signer
            .sign_prehash(&sha2::Sha256::digest(&tbs_der))
            .unwrap()
    } else {
        signer.sign(&tbs_der)
    };
    Certificate {
        tbs_certificate: tbs,
        signature_algorithm: AlgorithmIdentifierOwned {
            oid: algorithm,
            parameters: None,
        },
        signature: BitString::from_bytes(signature.to_der().as_bytes()).unwrap(),
    }
    .to_der()
    .unwrap()
}

/// PEM of DER certificates, in order.
pub fn pem(ders: &[&[u8]]) -> Vec<u8> {
    use base64::Engine;
    let mut out = String::new();
    for der in ders {
        out.push_str("-----BEGIN CERTIFICATE-----\n");
        let text = base64::engine::general_purpose::STANDARD.encode(der);
        for chunk in text.as_bytes().chunks(64) {
            out.push_str(std::str::from_utf8(chunk).unwrap());
            out.push('\n');
        }
        out.push_str("-----END CERTIFICATE-----\n");
    }
    out.into_bytes()
}

/// A fresh test root and Hopper leaf whose FWID extension holds `fwid`.
pub fn chain(fwid: [u8; 48]) -> GpuChain {
    let root_key = SigningKey::random(&mut OsRng);
    let leaf_key = SigningKey::random(&mut OsRng);
    let root_name = "CN=cvm-warden test GPU root,O=cvm-warden test";
    let root = certificate(
        root_name,
        root_name,
        root_key.verifying_key(),
        &root_key,
        1,
        vec![ca_extension()],
        false,
    );
    let leaf = certificate(
        LEAF_NAME,
        root_name,
        leaf_key.verifying_key(),
        &root_key,
        2,
        vec![fwid_extension(leaf_key.verifying_key(), &fwid)],
        false,
    );
    GpuChain {
        root_pem: pem(&[&root]),
        chain_pem: pem(&[&leaf, &root]),
        leaf_key,
        fwid,
    }
}

impl GpuChain {
    /// `report` (raw) with its request nonce set to `nonce`, re-signed by the leaf; the
    /// trailing bytes after the signature are dropped.
    pub fn sign_report(&self, report: &[u8], nonce: &[u8; 32]) -> Vec<u8> {
        let parsed = parse_report(report).unwrap();
        let mut signed = parsed.signed_bytes().to_vec();
        signed[super::spdm::NONCE_OFFSET..super::spdm::NONCE_OFFSET + 32].copy_from_slice(nonce);
        let signature: p384::ecdsa::Signature = self.leaf_key.sign(&signed);
        signed.extend_from_slice(&signature.to_bytes());
        signed
    }
}

/// A forged chain for `report` (raw; its FWID, or zeros when it has none) and the report
/// re-signed with `nonce`.
pub fn evidence(report: &[u8], nonce: &[u8; 32]) -> (Vec<u8>, GpuChain) {
    let fwid = parse_report(report).unwrap().fwid().unwrap_or([0; 48]);
    let chain = chain(fwid);
    (chain.sign_report(report, nonce), chain)
}
