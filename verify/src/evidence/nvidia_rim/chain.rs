//! The RIM signer's X.509 chain (`KeyInfo/X509Data`, leaf first) checked link by link up to
//! the baked, fingerprint-pinned `NVIDIA CoRIM signing Root CA`, every certificate valid at
//! the caller's verification time.
//!
//! Accepted certificates: ecdsa-with-SHA384 signatures by P-384 keys (what NVIDIA issues);
//! issuers must be CAs (basicConstraints cA, keyCertSign when keyUsage is present, path length
//! respected); the leaf must allow digitalSignature when keyUsage is present; an unknown
//! critical extension is refused. Revocation (OCSP/CRL) needs the network and is not checked.

use std::time::SystemTime;

use p384::ecdsa::signature::Verifier as _;
use p384::ecdsa::{Signature, VerifyingKey};
use sha2::{Digest as _, Sha256};
use x509_cert::der::{Decode, DecodePem, Encode};
use x509_cert::ext::pkix::{BasicConstraints, KeyUsage};
use x509_cert::spki::ObjectIdentifier;
use x509_cert::Certificate;

use super::{CertInfo, RimError};

/// NVIDIA's RIM root, as bundled with nvtrust's local GPU verifier
/// (`certs/verifier_RIM_root.pem`); see `NOTICE-NVIDIA.md` beside it.
pub const RIM_ROOT_PEM: &str = include_str!("verifier_RIM_root.pem");

/// SHA-256 of the DER of [`RIM_ROOT_PEM`] (`NVIDIA CoRIM signing Root CA`, O=NVIDIA, C=US,
/// P-384, 2023-03-16..2053-03-08).
pub const RIM_ROOT_SHA256: &str =
    "12977b5115acb0381179279fffeb5a8c4d264971ebb32298023a465fa41df5d1";

const ECDSA_WITH_SHA384: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.3");
const ID_EC_PUBLIC_KEY: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.2.1");
const SECP384R1: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.132.0.34");
const BASIC_CONSTRAINTS: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.29.19");
const KEY_USAGE: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.29.15");

/// One parsed certificate with its DER.
pub(super) struct Cert {
    pub der: Vec<u8>,
    pub cert: Certificate,
}

impl Cert {
    pub(super) fn from_der(der: Vec<u8>, position: usize) -> Result<Self, RimError> {
        let cert = Certificate::from_der(&der).map_err(|e| RimError::Chain {
            detail: format!("X509Certificate #{position} is not an X.509 certificate: {e}"),
        })?;
        Ok(Self { der, cert })
    }

    pub(super) fn subject(&self) -> String {
        self.cert.tbs_certificate.subject.to_string()
    }

    fn info(&self) -> CertInfo {
        let validity = &self.cert.tbs_certificate.validity;
        CertInfo {
            subject: self.subject(),
            not_before: validity.not_before.to_system_time(),
            not_after: validity.not_after.to_system_time(),
            sha256: hex::encode(Sha256::digest(&self.der)),
        }
    }

    /// The certificate's P-384 public key.
    pub(super) fn verifying_key(&self) -> Result<VerifyingKey, RimError> {
        let spki = &self.cert.tbs_certificate.subject_public_key_info;
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.decode_as::<ObjectIdentifier>().ok());
        if spki.algorithm.oid != ID_EC_PUBLIC_KEY || curve != Some(SECP384R1) {
            return Err(RimError::Chain {
                detail: format!(
                    "the key of {} is not an EC P-384 key (algorithm {}, curve {:?}); NVIDIA's \
                     RIM signers use P-384",
                    self.subject(),
                    spki.algorithm.oid,
                    curve.map(|c| c.to_string())
                ),
            });
        }
        VerifyingKey::from_sec1_bytes(spki.subject_public_key.raw_bytes()).map_err(|e| {
            RimError::Chain {
                detail: format!("the P-384 key of {} does not decode: {e}", self.subject()),
            }
        })
    }
}

/// The baked root, checked against its pinned fingerprint.
pub(super) fn pinned_root() -> Result<Cert, RimError> {
    let cert = Certificate::from_pem(RIM_ROOT_PEM).map_err(|e| RimError::Chain {
        detail: format!("the baked RIM root does not parse: {e}"),
    })?;
    let der = cert.to_der().map_err(|e| RimError::Chain {
        detail: format!("the baked RIM root does not re-encode: {e}"),
    })?;
    let sha256 = hex::encode(Sha256::digest(&der));
    if sha256 != RIM_ROOT_SHA256 {
        return Err(RimError::Chain {
            detail: format!(
                "the baked RIM root's SHA-256 is {sha256}, not the pinned {RIM_ROOT_SHA256}: \
                 this build of cvm-warden-verify was altered"
            ),
        });
    }
    Ok(Cert { der, cert })
}

/// Checks `chain` (leaf first) up to the pinned root at time `at`; returns each certificate
/// of the path, leaf first, root last.
pub(super) fn verify(chain: &[Cert], at: SystemTime) -> Result<Vec<CertInfo>, RimError> {
    let root = pinned_root()?;
    // The embedded chain may end with the root itself: drop it (the baked copy is used).
    let mut path: Vec<&Cert> = chain.iter().collect();
    if path.last().is_some_and(|last| last.der == root.der) {
        path.pop();
    }
    let Some(leaf) = path.first() else {
        return Err(RimError::Chain {
            detail: "X509Data holds no signer certificate (only the root or nothing)".into(),
        });
    };
    if let Some(stray) = path.iter().position(|c| c.der == root.der) {
        return Err(RimError::Chain {
            detail: format!(
                "the RIM root appears at position {stray} of X509Data, not at its end; \
                 expected the signer first and each issuer after the certificate it signed"
            ),
        });
    }
    check_leaf_usage(leaf)?;
    path.push(&root);
    for (position, pair) in path.windows(2).enumerate() {
        let [child, issuer] = pair else { continue };
        check_link(child, issuer, position)?;
    }
    for cert in &path {
        check_validity(cert, at)?;
    }
    Ok(path.iter().map(|c| c.info()).collect())
}

fn check_leaf_usage(leaf: &Cert) -> Result<(), RimError> {
    if let Some(usage) = key_usage(leaf)? {
        if !usage.digital_signature() {
            return Err(RimError::Chain {
                detail: format!(
                    "the RIM signer {} may not sign (keyUsage has no digitalSignature)",
                    leaf.subject()
                ),
            });
        }
    }
    Ok(())
}

/// `child` (at `position` in the path, 0 = leaf) is signed by `issuer`, which may issue it.
fn check_link(child: &Cert, issuer: &Cert, position: usize) -> Result<(), RimError> {
    let tbs = &child.cert.tbs_certificate;
    if tbs.issuer != issuer.cert.tbs_certificate.subject {
        return Err(RimError::Chain {
            detail: format!(
                "{} names its issuer {}, but the next certificate is {}; X509Data must hold \
                 the signer first and each issuer after the certificate it signed, up to \
                 the NVIDIA CoRIM signing Root CA (SHA-256 {RIM_ROOT_SHA256})",
                child.subject(),
                tbs.issuer,
                issuer.subject()
            ),
        });
    }
    let constraints = extension::<BasicConstraints>(issuer, BASIC_CONSTRAINTS)?;
    let Some(constraints) = constraints.filter(|c| c.ca) else {
        return Err(RimError::Chain {
            detail: format!(
                "{} issued {} but is not a CA (basicConstraints cA is not set)",
                issuer.subject(),
                child.subject()
            ),
        });
    };
    // Non-leaf certificates below this issuer: as many as the child's index in the path.
    if let Some(limit) = constraints.path_len_constraint {
        if position > usize::from(limit) {
            return Err(RimError::Chain {
                detail: format!(
                    "{} allows {limit} intermediate CA(s) below it, the chain has {position}",
                    issuer.subject()
                ),
            });
        }
    }
    if let Some(usage) = key_usage(issuer)? {
        if !usage.key_cert_sign() {
            return Err(RimError::Chain {
                detail: format!(
                    "{} issued {} but its keyUsage has no keyCertSign",
                    issuer.subject(),
                    child.subject()
                ),
            });
        }
    }
    if child.cert.signature_algorithm.oid != ECDSA_WITH_SHA384
        || tbs.signature.oid != ECDSA_WITH_SHA384
    {
        return Err(RimError::Chain {
            detail: format!(
                "{} is signed with {} (tbs: {}); only ecdsa-with-SHA384 is accepted",
                child.subject(),
                child.cert.signature_algorithm.oid,
                tbs.signature.oid
            ),
        });
    }
    let signed = tbs.to_der().map_err(|e| RimError::Chain {
        detail: format!("{} does not re-encode: {e}", child.subject()),
    })?;
    let signature = child
        .cert
        .signature
        .as_bytes()
        .and_then(|der| Signature::from_der(der).ok())
        .ok_or_else(|| RimError::Chain {
            detail: format!(
                "the signature of {} is not a DER ECDSA signature",
                child.subject()
            ),
        })?;
    issuer
        .verifying_key()?
        .verify(&signed, &signature)
        .map_err(|_| RimError::Chain {
            detail: format!(
                "the signature of {} does not verify with the key of {}",
                child.subject(),
                issuer.subject()
            ),
        })
}

fn check_validity(cert: &Cert, at: SystemTime) -> Result<(), RimError> {
    let validity = &cert.cert.tbs_certificate.validity;
    let not_before = validity.not_before.to_system_time();
    let not_after = validity.not_after.to_system_time();
    if at < not_before || at > not_after {
        return Err(RimError::CertificateTime {
            subject: cert.subject(),
            not_before: humantime::format_rfc3339_seconds(not_before).to_string(),
            not_after: humantime::format_rfc3339_seconds(not_after).to_string(),
            at: humantime::format_rfc3339_seconds(at).to_string(),
            expired: at > not_after,
        });
    }
    Ok(())
}

fn key_usage(cert: &Cert) -> Result<Option<KeyUsage>, RimError> {
    extension::<KeyUsage>(cert, KEY_USAGE)
}

/// The extension `oid` decoded as `T`; an unknown critical extension anywhere is refused.
fn extension<'a, T: Decode<'a>>(
    cert: &'a Cert,
    oid: ObjectIdentifier,
) -> Result<Option<T>, RimError> {
    let mut found = None;
    for ext in cert.cert.tbs_certificate.extensions.iter().flatten() {
        if ext.critical && ext.extn_id != BASIC_CONSTRAINTS && ext.extn_id != KEY_USAGE {
            return Err(RimError::Chain {
                detail: format!(
                    "{} has a critical extension {} this verifier does not know",
                    cert.subject(),
                    ext.extn_id
                ),
            });
        }
        if ext.extn_id == oid {
            if found.is_some() {
                return Err(RimError::Chain {
                    detail: format!("{} carries extension {oid} twice", cert.subject()),
                });
            }
            found = Some(
                T::from_der(ext.extn_value.as_bytes()).map_err(|e| RimError::Chain {
                    detail: format!("extension {oid} of {} does not decode: {e}", cert.subject()),
                })?,
            );
        }
    }
    Ok(found)
}
