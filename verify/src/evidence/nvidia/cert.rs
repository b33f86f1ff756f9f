//! The GPU's attestation certificate chain (PEM, leaf first): each link's signature, names,
//! CA constraints and validity, the pinned root, and the leaf's FWID extension.

use std::time::SystemTime;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use sha2::{Digest as _, Sha256, Sha384};
use x509_cert::der::asn1::{AnyRef, ObjectIdentifier, OctetStringRef};
use x509_cert::der::{Decode, Encode, Reader, SliceReader, Tag, TagNumber, Tagged};
use x509_cert::ext::pkix::BasicConstraints;
use x509_cert::name::Name;
use x509_cert::Certificate;

use super::{Arch, NvidiaError};

/// NVIDIA's device identity root ("NVIDIA Device Identity CA"), as nvtrust ships it
/// (`verifier_device_root.pem`; notice in `NOTICE-verifier_device_root.md`).
pub const NVIDIA_DEVICE_ROOT_PEM: &[u8] = include_bytes!("verifier_device_root.pem");

/// SHA-256 of the DER of [`NVIDIA_DEVICE_ROOT_PEM`]: the pin.
pub const NVIDIA_DEVICE_ROOT_SHA256: &str =
    "102bf659d5419614c9d8e6aecebc80454eb26b1df6a769ac720b9a690b167b48";

/// Hopper leaf FWID extension: `SEQUENCE { INTEGER, SubjectPublicKeyInfo, SEQUENCE { sha384,
/// OCTET STRING (48) } }`.
pub const OID_FWID_HOPPER: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.23.133.5.4.1");
/// Blackwell leaf FWID extension: a DICE TcbInfo whose `[6]` fwids' first digest is the FWID.
pub const OID_FWID_BLACKWELL: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.23.133.5.4.1.1");
const OID_SHA384: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.16.840.1.101.3.4.2.2");
const OID_ECDSA_SHA256: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.2");
const OID_ECDSA_SHA384: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.3");
const OID_EC_PUBLIC_KEY: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.2.1");
const OID_SECP384R1: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.132.0.34");
const OID_PRIME256V1: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.3.1.7");
const OID_BASIC_CONSTRAINTS: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.29.19");
const OID_COMMON_NAME: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.4.3");

/// One certificate of a chain: its DER and parsed form.
#[derive(Debug, Clone)]
pub struct ChainCert {
    /// The DER bytes.
    pub der: Vec<u8>,
    /// The parsed certificate.
    pub cert: Certificate,
}

impl ChainCert {
    /// The subject's common name (or the whole RFC 4514 name when it has none).
    pub fn subject(&self) -> String {
        display_name(&self.cert.tbs_certificate.subject)
    }

    /// SHA-256 of the DER, hex.
    pub fn sha256(&self) -> String {
        hex::encode(Sha256::digest(&self.der))
    }
}

/// The common name of `name`, or its RFC 4514 text.
pub fn display_name(name: &Name) -> String {
    for rdn in name.0.iter() {
        for atv in rdn.0.iter() {
            if atv.oid == OID_COMMON_NAME {
                if let Ok(text) = std::str::from_utf8(atv.value.value()) {
                    return text.to_string();
                }
            }
        }
    }
    name.to_string()
}

/// Reads every `CERTIFICATE` block of a PEM text, in order.
pub fn parse_pem_chain(pem: &[u8], what: &'static str) -> Result<Vec<ChainCert>, NvidiaError> {
    const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
    const END: &str = "-----END CERTIFICATE-----";
    let text = std::str::from_utf8(pem).map_err(|e| NvidiaError::Pem {
        what,
        detail: format!("not text: {e}"),
    })?;
    let mut rest = text;
    let mut out = Vec::new();
    while let Some(start) = rest.find(BEGIN) {
        let body_start = start + BEGIN.len();
        let Some(len) = rest[body_start..].find(END) else {
            return Err(NvidiaError::Pem {
                what,
                detail: format!("certificate {} has no END line", out.len()),
            });
        };
        let body: String = rest[body_start..body_start + len]
            .chars()
            .filter(|c| !c.is_ascii_whitespace())
            .collect();
        let der = STANDARD.decode(body).map_err(|e| NvidiaError::Pem {
            what,
            detail: format!("certificate {}: base64: {e}", out.len()),
        })?;
        let cert = Certificate::from_der(&der).map_err(|e| NvidiaError::Pem {
            what,
            detail: format!("certificate {}: not an X.509 certificate: {e}", out.len()),
        })?;
        out.push(ChainCert { der, cert });
        rest = &rest[body_start + len + END.len()..];
    }
    if out.is_empty() {
        return Err(NvidiaError::Pem {
            what,
            detail: "no \"-----BEGIN CERTIFICATE-----\" block".to_string(),
        });
    }
    Ok(out)
}

/// Verifies `signature` (DER ECDSA, as in a certificate) over `message` with the issuer's
/// key, for ecdsa-with-SHA384 and ecdsa-with-SHA256 on P-384 or P-256 keys.
fn verify_cert_signature(
    issuer: &Certificate,
    algorithm: &ObjectIdentifier,
    message: &[u8],
    signature: &[u8],
) -> Result<(), String> {
    use p384::ecdsa::signature::hazmat::PrehashVerifier;
    let prehash: Vec<u8> = if *algorithm == OID_ECDSA_SHA384 {
        Sha384::digest(message).to_vec()
    } else if *algorithm == OID_ECDSA_SHA256 {
        Sha256::digest(message).to_vec()
    } else {
        return Err(format!(
            "signature algorithm {algorithm} (only ecdsa-with-SHA384 and ecdsa-with-SHA256)"
        ));
    };
    let spki = &issuer.tbs_certificate.subject_public_key_info;
    if spki.algorithm.oid != OID_EC_PUBLIC_KEY {
        return Err(format!(
            "issuer key algorithm {} is not an EC key",
            spki.algorithm.oid
        ));
    }
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.decode_as::<ObjectIdentifier>().ok());
    let point = spki.subject_public_key.raw_bytes();
    match curve {
        Some(c) if c == OID_SECP384R1 => {
            let key = p384::ecdsa::VerifyingKey::from_sec1_bytes(point)
                .map_err(|e| format!("issuer P-384 key: {e}"))?;
            let sig = p384::ecdsa::Signature::from_der(signature)
                .map_err(|e| format!("signature encoding: {e}"))?;
            key.verify_prehash(&prehash, &sig)
                .map_err(|_| "the signature does not verify with the issuer's key".to_string())
        }
        Some(c) if c == OID_PRIME256V1 => {
            let key = p256::ecdsa::VerifyingKey::from_sec1_bytes(point)
                .map_err(|e| format!("issuer P-256 key: {e}"))?;
            let sig = p256::ecdsa::Signature::from_der(signature)
                .map_err(|e| format!("signature encoding: {e}"))?;
            key.verify_prehash(&prehash, &sig)
                .map_err(|_| "the signature does not verify with the issuer's key".to_string())
        }
        other => Err(format!(
            "issuer curve {} (only P-384 and P-256)",
            other.map_or_else(|| "(none)".to_string(), |o| o.to_string())
        )),
    }
}

fn is_ca(cert: &Certificate) -> bool {
    cert.tbs_certificate
        .extensions
        .iter()
        .flatten()
        .find(|e| e.extn_id == OID_BASIC_CONSTRAINTS)
        .and_then(|e| BasicConstraints::from_der(e.extn_value.as_bytes()).ok())
        .is_some_and(|bc| bc.ca)
}

/// RFC 3339 text of a time (seconds since the epoch past year 9999, which RFC 3339 cannot
/// write).
pub fn rfc3339(time: SystemTime) -> String {
    use std::fmt::Write;
    let mut text = String::new();
    if write!(text, "{}", humantime::format_rfc3339(time)).is_err() {
        let secs = time
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        return format!("{secs} s after 1970-01-01T00:00:00Z");
    }
    text
}

/// Checks every link of `chain` (leaf first) and every certificate's validity at `at`;
/// the caller checks the root.
pub fn verify_links(chain: &[ChainCert], at: SystemTime) -> Result<(), NvidiaError> {
    if chain.len() < 2 {
        return Err(NvidiaError::ChainTooShort { count: chain.len() });
    }
    for (index, link) in chain.iter().enumerate() {
        let validity = &link.cert.tbs_certificate.validity;
        let not_before = validity.not_before.to_system_time();
        let not_after = validity.not_after.to_system_time();
        if at < not_before {
            return Err(NvidiaError::CertNotYetValid {
                index,
                subject: link.subject(),
                not_before: rfc3339(not_before),
                at: rfc3339(at),
            });
        }
        if at > not_after {
            return Err(NvidiaError::CertExpired {
                index,
                subject: link.subject(),
                not_after: rfc3339(not_after),
                at: rfc3339(at),
            });
        }
        // The root signs itself.
        let issuer = chain.get(index + 1).unwrap_or(link);
        let broken = |reason: String| NvidiaError::ChainBroken {
            index,
            subject: link.subject(),
            issuer: issuer.subject(),
            reason,
        };
        if link.cert.tbs_certificate.issuer != issuer.cert.tbs_certificate.subject {
            return Err(broken(format!(
                "its issuer is \"{}\", not the next certificate's subject",
                display_name(&link.cert.tbs_certificate.issuer)
            )));
        }
        // The issuer (for the root: itself) must be a CA.
        if !is_ca(&issuer.cert) {
            return Err(broken(
                "the issuer is not a CA (basicConstraints cA is not true)".to_string(),
            ));
        }
        if link.cert.signature_algorithm != link.cert.tbs_certificate.signature {
            return Err(broken(
                "the outer and inner signature algorithms differ".to_string(),
            ));
        }
        let tbs = link
            .cert
            .tbs_certificate
            .to_der()
            .map_err(|e| broken(format!("cannot re-encode the certificate: {e}")))?;
        let signature = link
            .cert
            .signature
            .as_bytes()
            .ok_or_else(|| broken("the signature has unused bits".to_string()))?;
        verify_cert_signature(
            &issuer.cert,
            &link.cert.signature_algorithm.oid,
            &tbs,
            signature,
        )
        .map_err(broken)?;
    }
    Ok(())
}

/// The leaf's P-384 public key (the report signer).
pub fn leaf_key(leaf: &ChainCert) -> Result<p384::ecdsa::VerifyingKey, NvidiaError> {
    let spki = &leaf.cert.tbs_certificate.subject_public_key_info;
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.decode_as::<ObjectIdentifier>().ok());
    if spki.algorithm.oid != OID_EC_PUBLIC_KEY || curve != Some(OID_SECP384R1) {
        return Err(NvidiaError::LeafKey {
            subject: leaf.subject(),
            detail: "not an EC P-384 key".to_string(),
        });
    }
    p384::ecdsa::VerifyingKey::from_sec1_bytes(spki.subject_public_key.raw_bytes()).map_err(|e| {
        NvidiaError::LeafKey {
            subject: leaf.subject(),
            detail: e.to_string(),
        }
    })
}

fn children<'a>(any: AnyRef<'a>) -> Result<Vec<AnyRef<'a>>, String> {
    let mut reader = SliceReader::new(any.value()).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    while !reader.is_finished() {
        out.push(AnyRef::decode(&mut reader).map_err(|e| e.to_string())?);
    }
    Ok(out)
}

/// `SEQUENCE { OID sha384, OCTET STRING (48) }` → the digest.
fn fwid_digest(any: AnyRef<'_>) -> Result<[u8; 48], String> {
    if any.tag() != Tag::Sequence {
        return Err(format!("the FWID entry is {}, not a SEQUENCE", any.tag()));
    }
    let parts = children(any)?;
    let [alg, digest] = parts.as_slice() else {
        return Err(format!(
            "the FWID entry has {} elements, not 2 (hash algorithm, digest)",
            parts.len()
        ));
    };
    let alg: ObjectIdentifier = alg
        .decode_as()
        .map_err(|e| format!("hash algorithm: {e}"))?;
    if alg != OID_SHA384 {
        return Err(format!("hash algorithm {alg}, not SHA-384"));
    }
    let digest: OctetStringRef<'_> = digest.decode_as().map_err(|e| format!("digest: {e}"))?;
    <[u8; 48]>::try_from(digest.as_bytes())
        .map_err(|_| format!("digest is {} bytes, not 48", digest.as_bytes().len()))
}

fn hopper_fwid(value: &[u8]) -> Result<[u8; 48], String> {
    let outer = AnyRef::from_der(value).map_err(|e| e.to_string())?;
    if outer.tag() != Tag::Sequence {
        return Err(format!("{}, not a SEQUENCE", outer.tag()));
    }
    let parts = children(outer)?;
    let last = parts
        .last()
        .ok_or_else(|| "an empty SEQUENCE".to_string())?;
    fwid_digest(*last)
}

fn blackwell_fwid(value: &[u8]) -> Result<[u8; 48], String> {
    let outer = AnyRef::from_der(value).map_err(|e| e.to_string())?;
    if outer.tag() != Tag::Sequence {
        return Err(format!("{}, not a SEQUENCE", outer.tag()));
    }
    let fwids_tag = Tag::ContextSpecific {
        constructed: true,
        number: TagNumber::N6,
    };
    let fwids = children(outer)?
        .into_iter()
        .find(|c| c.tag() == fwids_tag)
        .ok_or_else(|| "the TcbInfo has no [6] fwids".to_string())?;
    let first = children(fwids)?
        .into_iter()
        .next()
        .ok_or_else(|| "the [6] fwids list is empty".to_string())?;
    fwid_digest(first)
}

/// The leaf's FWID and the architecture its extension names, or `None` when the leaf has
/// neither FWID extension.
pub fn leaf_fwid(leaf: &ChainCert) -> Result<Option<(Arch, [u8; 48])>, NvidiaError> {
    for ext in leaf.cert.tbs_certificate.extensions.iter().flatten() {
        let (arch, parsed) = if ext.extn_id == OID_FWID_HOPPER {
            (Arch::Hopper, hopper_fwid(ext.extn_value.as_bytes()))
        } else if ext.extn_id == OID_FWID_BLACKWELL {
            (Arch::Blackwell, blackwell_fwid(ext.extn_value.as_bytes()))
        } else {
            continue;
        };
        return parsed.map(|fwid| Some((arch, fwid))).map_err(|detail| {
            NvidiaError::LeafFwidMalformed {
                subject: leaf.subject(),
                oid: ext.extn_id.to_string(),
                detail,
            }
        });
    }
    Ok(None)
}

/// The architecture a certificate's subject names (`GH…` Hopper, `GB…` Blackwell).
pub fn arch_from_subject(subject: &str) -> Option<Arch> {
    if subject.starts_with("GH") {
        Some(Arch::Hopper)
    } else if subject.starts_with("GB") {
        Some(Arch::Blackwell)
    } else {
        None
    }
}
