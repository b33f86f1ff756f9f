//! The ephemeral TEE key: made fresh for every handshake, sent as `tee-pubkey`, bound into
//! `report_data`, and used once to open the resource JWE the broker encrypts to it.
//!
//! Two kinds, as the Trustee broker accepts them:
//!
//! - [`KeyWrap::EcdhEsA256kw`] (default): P-256, JWK exactly
//!   `{"kty":"EC","crv":"P-256","alg":"ECDH-ES+A256KW","x","y"}`. Generation costs well
//!   under a millisecond.
//! - [`KeyWrap::RsaOaep256`]: RSA-3072, JWK exactly `{"kty":"RSA","alg":"RSA-OAEP-256","n","e"}`.
//!   Generation costs about 0.2–2 s of one CPU in a release build (tens of seconds
//!   unoptimised), and the `rsa` crate's decryption is not constant-time (RUSTSEC-2023-0071,
//!   "Marvin"); the exposure is small here — one decryption per key, of a ciphertext that
//!   arrives over the pinned TLS channel, with blinding — but it is why EC is the default.
//!   Use RSA only for a broker that cannot do ECDH-ES.
//!
//! The private half is zeroized on drop (`p256::SecretKey` and `rsa::RsaPrivateKey` both
//! implement `ZeroizeOnDrop`) and `Debug` shows only the public JWK.

use std::fmt;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use kbs_types::TeePubKey;
use p256::elliptic_curve::sec1::ToEncodedPoint;
use rand_core::OsRng;
use rsa::traits::PublicKeyParts;
use serde::Serialize;
use serde_json::Value;

/// `alg` of the EC key and of the JWE it receives.
pub const ECDH_ES_A256KW: &str = "ECDH-ES+A256KW";
/// `alg` of the RSA key and of the JWE it receives.
pub const RSA_OAEP_256: &str = "RSA-OAEP-256";
/// The one curve this client offers.
pub const P256: &str = "P-256";
/// RSA modulus size, in bits.
pub const RSA_BITS: usize = 3072;

/// How the broker wraps the content key for us.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum KeyWrap {
    /// ECDH-ES with P-256, Concat KDF and AES-256 key wrap (default).
    #[default]
    EcdhEsA256kw,
    /// RSA-OAEP with SHA-256 (RSA-3072 key).
    RsaOaep256,
}

impl KeyWrap {
    /// The JOSE `alg` value.
    pub fn alg(self) -> &'static str {
        match self {
            KeyWrap::EcdhEsA256kw => ECDH_ES_A256KW,
            KeyWrap::RsaOaep256 => RSA_OAEP_256,
        }
    }
}

pub(crate) enum Private {
    Ec(p256::SecretKey),
    Rsa(Box<rsa::RsaPrivateKey>),
}

/// An ephemeral key pair. The private half never leaves this value.
pub struct TeeKey {
    private: Private,
    public: TeePubKey,
}

impl TeeKey {
    /// Makes a fresh key of the given kind from the operating system's random source.
    pub fn generate(wrap: KeyWrap) -> Result<Self, super::KbsError> {
        match wrap {
            KeyWrap::EcdhEsA256kw => Ok(Self::from_p256(p256::SecretKey::random(&mut OsRng))),
            KeyWrap::RsaOaep256 => {
                let key = rsa::RsaPrivateKey::new(&mut OsRng, RSA_BITS).map_err(|e| {
                    super::KbsError::Key {
                        alg: RSA_OAEP_256,
                        detail: e.to_string(),
                    }
                })?;
                Ok(Self::from_rsa(key))
            }
        }
    }

    /// Wraps an existing P-256 secret (tests and known-answer vectors).
    pub fn from_p256(secret: p256::SecretKey) -> Self {
        let point = secret.public_key().to_encoded_point(false);
        let coord = |c: Option<&p256::FieldBytes>| c.map(|b| URL_SAFE_NO_PAD.encode(b));
        let public = TeePubKey::EC {
            crv: P256.to_string(),
            alg: ECDH_ES_A256KW.to_string(),
            // An uncompressed point always has both coordinates.
            x: coord(point.x()).unwrap_or_default(),
            y: coord(point.y()).unwrap_or_default(),
        };
        Self {
            private: Private::Ec(secret),
            public,
        }
    }

    /// Wraps an existing RSA key (tests; a key generated once and reused keeps them fast).
    pub fn from_rsa(key: rsa::RsaPrivateKey) -> Self {
        let public = TeePubKey::RSA {
            alg: RSA_OAEP_256.to_string(),
            k_mod: URL_SAFE_NO_PAD.encode(key.n().to_bytes_be()),
            k_exp: URL_SAFE_NO_PAD.encode(key.e().to_bytes_be()),
        };
        Self {
            private: Private::Rsa(Box::new(key)),
            public,
        }
    }

    /// The key kind.
    pub fn wrap(&self) -> KeyWrap {
        match self.private {
            Private::Ec(_) => KeyWrap::EcdhEsA256kw,
            Private::Rsa(_) => KeyWrap::RsaOaep256,
        }
    }

    /// The JOSE `alg` the broker must use for this key.
    pub fn alg(&self) -> &'static str {
        self.wrap().alg()
    }

    /// The public JWK as the `kbs-types` message type.
    pub fn public(&self) -> &TeePubKey {
        &self.public
    }

    /// The public JWK as JSON: exactly the fields sent as `tee-pubkey`, and the object
    /// hashed into `report_data`.
    pub fn jwk(&self) -> Value {
        // Serialising a struct of strings cannot fail; Null would make the binding fail
        // closed (`BindingError::NotAnObject`).
        serde_json::to_value(&self.public).unwrap_or(Value::Null)
    }

    pub(crate) fn private(&self) -> &Private {
        &self.private
    }
}

impl fmt::Debug for TeeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TeeKey")
            .field("alg", &self.alg())
            .field("public", &self.jwk())
            .finish_non_exhaustive()
    }
}
