//! Decryption of the broker's resource answer: a JWE in flattened JSON serialisation
//! (RFC 7516 §7.2.2) with `enc` = `A256GCM` and `alg` = `ECDH-ES+A256KW` or `RSA-OAEP-256`
//! (KBS-PROTOCOL.md, "Resource answer").
//!
//! The answer is parsed here rather than with `kbs_types::Response`, because that type
//! decodes `protected` into a header struct and would force a re-serialisation for the
//! AES-GCM additional data; the additional data must be the `protected` string exactly as
//! received.
//!
//! Everything is checked before anything is used: only the members Trustee sends are
//! accepted, the header's `alg` must be the one of the key we sent, `enc` must be
//! `A256GCM`, and the IV, tag, wrapped key and ephemeral key have their exact sizes.

use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce, Tag};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use p256::elliptic_curve::sec1::FromEncodedPoint;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::key::{Private, TeeKey, ECDH_ES_A256KW, P256, RSA_OAEP_256};

/// The only content encryption the broker uses.
pub const A256GCM: &str = "A256GCM";
/// AES-GCM IV length.
const IV_LEN: usize = 12;
/// AES-GCM tag length.
const TAG_LEN: usize = 16;
/// A256KW-wrapped 256-bit key: 32 bytes + the 8-byte integrity block.
const WRAPPED_KEY_LEN: usize = 40;

/// Why a JWE was refused. Never holds key material or plaintext.
#[derive(Debug, thiserror::Error)]
pub enum JweError {
    /// Not a JSON object, or a member has the wrong JSON type.
    #[error("the answer is not a flattened JSON JWE: {detail}")]
    Malformed {
        /// What is wrong.
        detail: String,
    },
    /// A member this client does not accept (`aad`, unprotected headers, several
    /// recipients, …).
    #[error("the JWE has a member {member:?} that this client does not accept (only protected, encrypted_key, iv, ciphertext, tag)")]
    UnexpectedMember {
        /// The member name.
        member: String,
    },
    /// A required member is missing.
    #[error("the JWE has no {member:?}")]
    Missing {
        /// The member name.
        member: &'static str,
    },
    /// A member is not unpadded base64url.
    #[error("JWE member {member:?} is not unpadded base64url: {detail}")]
    Base64 {
        /// The member name.
        member: &'static str,
        /// The decoder's error.
        detail: String,
    },
    /// The protected header is not a JSON object.
    #[error("the JWE protected header is not a JSON object: {detail}")]
    Header {
        /// Why.
        detail: String,
    },
    /// `alg` is not one this client knows.
    #[error("unsupported JWE alg {alg:?}; this client accepts ECDH-ES+A256KW and RSA-OAEP-256")]
    UnknownAlg {
        /// The header's `alg`.
        alg: String,
    },
    /// `alg` is known but not the one of the key we sent.
    #[error("JWE alg {found:?} does not match the key this client sent (alg {expected:?}); the answer was not made for this session's key")]
    AlgMismatch {
        /// The header's `alg`.
        found: String,
        /// Our key's `alg`.
        expected: &'static str,
    },
    /// `enc` is not A256GCM.
    #[error("unsupported JWE enc {enc:?}; the broker always uses A256GCM")]
    UnknownEnc {
        /// The header's `enc`.
        enc: String,
    },
    /// A header parameter this client does not implement (`zip`, `crit`).
    #[error("the JWE header has {param:?}, which this client does not implement")]
    Unsupported {
        /// The parameter.
        param: String,
    },
    /// A member is longer than this client accepts (checked before it is decoded).
    #[error("JWE member {member:?} is {found} characters; at most {max} are accepted")]
    TooLong {
        /// The member name.
        member: &'static str,
        /// Its length.
        found: usize,
        /// The bound.
        max: usize,
    },
    /// A member has the wrong length.
    #[error("JWE {what} is {found} bytes; expected {expected}")]
    Size {
        /// Which value.
        what: &'static str,
        /// Its length.
        found: usize,
        /// The required length.
        expected: usize,
    },
    /// The header's ephemeral public key is unusable.
    #[error("JWE header epk: {detail}")]
    Epk {
        /// What is wrong.
        detail: String,
    },
    /// AES key unwrap failed its integrity check (wrong key, or a changed wrapped key or
    /// ephemeral key).
    #[error("AES key unwrap of the content key failed its integrity check; the JWE was not made for this key, or was changed")]
    Unwrap,
    /// RSA-OAEP decryption failed.
    #[error("RSA-OAEP-256 decryption of the content key failed; the JWE was not made for this key, or was changed")]
    RsaDecrypt,
    /// AES-GCM authentication failed.
    #[error("AES-256-GCM authentication failed (ciphertext, IV, tag or protected header changed, or wrong content key)")]
    Authentication,
}

/// Opens a flattened-JSON JWE made for `key`; returns the plaintext (zeroized on drop).
pub fn decrypt(body: &[u8], key: &TeeKey) -> Result<Zeroizing<Vec<u8>>, JweError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| JweError::Malformed {
        detail: e.to_string(),
    })?;
    let Value::Object(members) = value else {
        return Err(JweError::Malformed {
            detail: "not a JSON object".into(),
        });
    };
    for name in members.keys() {
        if !matches!(
            name.as_str(),
            "protected" | "encrypted_key" | "iv" | "ciphertext" | "tag"
        ) {
            return Err(JweError::UnexpectedMember {
                member: super::sanitize(name),
            });
        }
    }
    let protected = member_str(&members, "protected")?;
    let encrypted_key = member_b64(&members, "encrypted_key")?;
    let iv = member_b64(&members, "iv")?;
    let ciphertext = member_b64(&members, "ciphertext")?;
    let tag = member_b64(&members, "tag")?;

    let header_bytes = URL_SAFE_NO_PAD
        .decode(protected)
        .map_err(|e| JweError::Base64 {
            member: "protected",
            detail: e.to_string(),
        })?;
    let header: Map<String, Value> =
        serde_json::from_slice(&header_bytes).map_err(|e| JweError::Header {
            detail: e.to_string(),
        })?;
    let alg = header_str(&header, "alg")?;
    let enc = header_str(&header, "enc")?;
    if alg != ECDH_ES_A256KW && alg != RSA_OAEP_256 {
        return Err(JweError::UnknownAlg {
            alg: super::sanitize(alg),
        });
    }
    if alg != key.alg() {
        return Err(JweError::AlgMismatch {
            found: alg.to_string(),
            expected: key.alg(),
        });
    }
    if enc != A256GCM {
        return Err(JweError::UnknownEnc {
            enc: super::sanitize(enc),
        });
    }
    for param in ["zip", "crit"] {
        if header.contains_key(param) {
            return Err(JweError::Unsupported {
                param: param.to_string(),
            });
        }
    }
    check_len("iv", &iv, IV_LEN)?;
    check_len("tag", &tag, TAG_LEN)?;

    let cek = match key.private() {
        Private::Ec(secret) => {
            let epk = epk(&header)?;
            check_len("encrypted_key", &encrypted_key, WRAPPED_KEY_LEN)?;
            let shared = p256::ecdh::diffie_hellman(secret.to_nonzero_scalar(), epk.as_affine());
            let kek = concat_kdf(shared.raw_secret_bytes(), ECDH_ES_A256KW);
            let kw = aes_kw::KekAes256::from(*kek);
            let mut cek = Zeroizing::new([0u8; 32]);
            kw.unwrap(&encrypted_key, cek.as_mut_slice())
                .map_err(|_| JweError::Unwrap)?;
            cek
        }
        Private::Rsa(private) => {
            let size = rsa::traits::PublicKeyParts::size(private.as_ref());
            check_len("encrypted_key", &encrypted_key, size)?;
            let plain = Zeroizing::new(
                private
                    .decrypt_blinded(
                        &mut rand_core::OsRng,
                        rsa::Oaep::new::<Sha256>(),
                        &encrypted_key,
                    )
                    .map_err(|_| JweError::RsaDecrypt)?,
            );
            let mut cek = Zeroizing::new([0u8; 32]);
            if plain.len() != cek.len() {
                return Err(JweError::Size {
                    what: "content key",
                    found: plain.len(),
                    expected: 32,
                });
            }
            cek.copy_from_slice(&plain);
            cek
        }
    };

    let cipher = Aes256Gcm::new(aes_gcm::Key::<Aes256Gcm>::from_slice(cek.as_slice()));
    let mut buffer = Zeroizing::new(ciphertext);
    cipher
        .decrypt_in_place_detached(
            Nonce::from_slice(&iv),
            protected.as_bytes(),
            buffer.as_mut_slice(),
            Tag::from_slice(&tag),
        )
        .map_err(|_| JweError::Authentication)?;
    Ok(buffer)
}

/// Concat KDF (NIST SP 800-56A, RFC 7518 §4.6.2) with SHA-256 for a 256-bit key; one
/// round: `SHA256(00000001 || Z || len32(alg) || alg || len32("") || len32("") || 256)`.
pub fn concat_kdf(z: &[u8], alg: &str) -> Zeroizing<[u8; 32]> {
    let mut hasher = Sha256::new();
    hasher.update(1u32.to_be_bytes());
    hasher.update(z);
    hasher.update((alg.len() as u32).to_be_bytes());
    hasher.update(alg.as_bytes());
    hasher.update(0u32.to_be_bytes()); // PartyUInfo: empty
    hasher.update(0u32.to_be_bytes()); // PartyVInfo: empty
    hasher.update(256u32.to_be_bytes()); // SuppPubInfo: key length in bits
    Zeroizing::new(hasher.finalize().into())
}

fn epk(header: &Map<String, Value>) -> Result<p256::PublicKey, JweError> {
    let Some(Value::Object(epk)) = header.get("epk") else {
        return Err(JweError::Epk {
            detail: "missing, or not a JSON object".into(),
        });
    };
    let field = |name: &str| -> Result<&str, JweError> {
        epk.get(name)
            .and_then(Value::as_str)
            .ok_or_else(|| JweError::Epk {
                detail: format!("no string {name:?}"),
            })
    };
    if field("kty")? != "EC" {
        return Err(JweError::Epk {
            detail: format!("kty {:?}; expected \"EC\"", super::sanitize(field("kty")?)),
        });
    }
    if field("crv")? != P256 {
        return Err(JweError::Epk {
            detail: format!(
                "crv {:?}; expected \"P-256\" (the curve of the key we sent)",
                super::sanitize(field("crv")?)
            ),
        });
    }
    let coord = |name: &'static str| -> Result<p256::FieldBytes, JweError> {
        let bytes = URL_SAFE_NO_PAD
            .decode(field(name)?)
            .map_err(|e| JweError::Epk {
                detail: format!("{name} is not unpadded base64url: {e}"),
            })?;
        if bytes.len() != 32 {
            return Err(JweError::Size {
                what: if name == "x" { "epk x" } else { "epk y" },
                found: bytes.len(),
                expected: 32,
            });
        }
        Ok(*p256::FieldBytes::from_slice(&bytes))
    };
    let point = p256::EncodedPoint::from_affine_coordinates(&coord("x")?, &coord("y")?, false);
    Option::from(p256::PublicKey::from_encoded_point(&point)).ok_or_else(|| JweError::Epk {
        detail: "the point is not on P-256".into(),
    })
}

/// Longest member accepted, in characters, before it is decoded: the protected header (an
/// `epk` and four short names), the wrapped key (RSA-4096: 683), the IV and tag (16 and 22);
/// the ciphertext is bounded by the answer size ([`super::transport::MAX_BODY`]).
pub const MAX_MEMBER: [(&str, usize); 4] = [
    ("protected", 8192),
    ("encrypted_key", 1024),
    ("iv", 64),
    ("tag", 64),
];

fn member_str<'a>(
    members: &'a Map<String, Value>,
    name: &'static str,
) -> Result<&'a str, JweError> {
    match members.get(name) {
        None => Err(JweError::Missing { member: name }),
        Some(Value::String(s)) => {
            if let Some((_, max)) = MAX_MEMBER.iter().find(|(member, _)| *member == name) {
                if s.len() > *max {
                    return Err(JweError::TooLong {
                        member: name,
                        found: s.len(),
                        max: *max,
                    });
                }
            }
            Ok(s)
        }
        Some(_) => Err(JweError::Malformed {
            detail: format!("{name:?} is not a string"),
        }),
    }
}

fn member_b64(members: &Map<String, Value>, name: &'static str) -> Result<Vec<u8>, JweError> {
    URL_SAFE_NO_PAD
        .decode(member_str(members, name)?)
        .map_err(|e| JweError::Base64 {
            member: name,
            detail: e.to_string(),
        })
}

fn header_str<'a>(header: &'a Map<String, Value>, name: &'static str) -> Result<&'a str, JweError> {
    header
        .get(name)
        .and_then(Value::as_str)
        .ok_or_else(|| JweError::Header {
            detail: format!("no string {name:?}"),
        })
}

fn check_len(what: &'static str, bytes: &[u8], expected: usize) -> Result<(), JweError> {
    if bytes.len() == expected {
        Ok(())
    } else {
        Err(JweError::Size {
            what,
            found: bytes.len(),
            expected,
        })
    }
}
