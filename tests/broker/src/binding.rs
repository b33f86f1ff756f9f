//! The tee-pubkey and the report_data binding (KBS-PROTOCOL.md, "report_data binding").
//!
//! Like Trustee, the broker parses the client's JWK into the fields it knows for its `kty`
//! and rebuilds the JSON from those fields only. A client that sends any other field
//! (`kid`, `use`) hashed a different object, so its binding does not match.

use serde_json::{json, Value};
use sha2::{Digest, Sha384};

/// The client's ephemeral public key, rebuilt from the known fields of its `kty`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TeePubKey {
    /// `{"kty":"EC","crv","alg","x","y"}`.
    Ec {
        /// Curve (`P-256`, `P-521`).
        crv: String,
        /// Key-management algorithm (`ECDH-ES+A256KW`).
        alg: String,
        /// base64url x coordinate.
        x: String,
        /// base64url y coordinate.
        y: String,
    },
    /// `{"kty":"RSA","alg","n","e"}`.
    Rsa {
        /// Key-management algorithm (`RSA-OAEP-256`).
        alg: String,
        /// base64url modulus.
        n: String,
        /// base64url exponent.
        e: String,
    },
    /// `{"kty":"AKP","alg","pub"}` (post-quantum; accepted for the binding, never encrypted to).
    Akp {
        /// Algorithm.
        alg: String,
        /// base64url public key.
        public: String,
    },
}

impl TeePubKey {
    /// Parse a JWK object; fields other than those of its `kty` are dropped.
    pub fn from_jwk(jwk: &Value) -> Result<Self, String> {
        let obj = jwk
            .as_object()
            .ok_or_else(|| "tee-pubkey is not a JSON object".to_string())?;
        let field = |name: &str| -> Result<String, String> {
            obj.get(name)
                .and_then(Value::as_str)
                .map(str::to_string)
                .ok_or_else(|| format!("tee-pubkey has no string field {name:?}"))
        };
        match field("kty")?.as_str() {
            "EC" => Ok(TeePubKey::Ec {
                crv: field("crv")?,
                alg: field("alg")?,
                x: field("x")?,
                y: field("y")?,
            }),
            "RSA" => Ok(TeePubKey::Rsa {
                alg: field("alg")?,
                n: field("n")?,
                e: field("e")?,
            }),
            "AKP" => Ok(TeePubKey::Akp {
                alg: field("alg")?,
                public: field("pub")?,
            }),
            other => Err(format!(
                "tee-pubkey kty {other:?} is not one of EC, RSA, AKP"
            )),
        }
    }

    /// The JWK rebuilt from the known fields.
    pub fn to_jwk(&self) -> Value {
        match self {
            TeePubKey::Ec { crv, alg, x, y } => {
                json!({"kty": "EC", "crv": crv, "alg": alg, "x": x, "y": y})
            }
            TeePubKey::Rsa { alg, n, e } => json!({"kty": "RSA", "alg": alg, "n": n, "e": e}),
            TeePubKey::Akp { alg, public } => json!({"kty": "AKP", "alg": alg, "pub": public}),
        }
    }
}

/// The runtime data object that is hashed (and that the token reports as
/// `runtime_data_claims`).
pub fn runtime_data(additional_evidence: &str, nonce: &str, key: &TeePubKey) -> Value {
    json!({
        "additional-evidence": additional_evidence,
        "nonce": nonce,
        "tee-pubkey": key.to_jwk(),
    })
}

/// `SHA-384(JCS({"additional-evidence", "nonce", "tee-pubkey"}))`.
pub fn report_data(
    additional_evidence: &str,
    nonce: &str,
    key: &TeePubKey,
) -> Result<[u8; 48], String> {
    let canonical =
        serde_json_canonicalizer::to_vec(&runtime_data(additional_evidence, nonce, key))
            .map_err(|e| format!("cannot canonicalise the runtime data: {e}"))?;
    Ok(Sha384::digest(&canonical).into())
}

/// The device nonce of additional (GPU) evidence, as guest-components makes it and Trustee
/// checks it: the first 32 bytes of `SHA-384(JCS({"nonce", "tee-pubkey"}))` (no
/// `additional-evidence` key: devices are verified against the runtime data without it).
pub fn device_nonce(nonce: &str, key: &TeePubKey) -> Result<[u8; 32], String> {
    let canonical =
        serde_json_canonicalizer::to_vec(&json!({"nonce": nonce, "tee-pubkey": key.to_jwk()}))
            .map_err(|e| format!("cannot canonicalise the device runtime data: {e}"))?;
    let digest = Sha384::digest(&canonical);
    let mut out = [0u8; 32];
    out.copy_from_slice(&digest[..32]);
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn hash_input_is_exactly_the_documented_string() {
        let key = TeePubKey::from_jwk(&json!({
            "y": "YY", "x": "XX", "kty": "EC", "crv": "P-256", "alg": "ECDH-ES+A256KW", "kid": "k1"
        }))
        .unwrap();
        let expected = r#"{"additional-evidence":"","nonce":"N+/=","tee-pubkey":{"alg":"ECDH-ES+A256KW","crv":"P-256","kty":"EC","x":"XX","y":"YY"}}"#;
        let got = serde_json_canonicalizer::to_string(&runtime_data("", "N+/=", &key)).unwrap();
        assert_eq!(got, expected);
        let digest: [u8; 48] = Sha384::digest(expected.as_bytes()).into();
        assert_eq!(report_data("", "N+/=", &key).unwrap(), digest);
    }

    #[test]
    fn unknown_kty_or_missing_field_is_rejected() {
        assert!(TeePubKey::from_jwk(&json!({"kty": "oct", "k": "x"})).is_err());
        assert!(TeePubKey::from_jwk(&json!({"kty": "EC", "crv": "P-256", "x": "a"})).is_err());
        assert!(TeePubKey::from_jwk(&json!("EC")).is_err());
    }

    #[test]
    fn device_nonce_matches_the_synthetic_trustee_example() {
        let example: Value = serde_json::from_str(include_str!(
            "../tests/data/nvidia/derived/kbs-binding-example.SYNTHETIC.json"
        ))
        .unwrap();
        let key = TeePubKey::from_jwk(&example["tee_pubkey_jwk"]).unwrap();
        let nonce = example["kbs_challenge_nonce"].as_str().unwrap();
        let jcs = serde_json_canonicalizer::to_string(
            &json!({"nonce": nonce, "tee-pubkey": key.to_jwk()}),
        )
        .unwrap();
        assert_eq!(jcs, example["device_runtime_data_jcs"].as_str().unwrap());
        assert_eq!(
            hex::encode(device_nonce(nonce, &key).unwrap()),
            example["gpu_spdm_nonce_hex (first 32 bytes)"]
                .as_str()
                .unwrap()
        );
        // the primary binding of the same example hashes the additional-evidence string as sent
        let additional = example["additional_evidence_string"].as_str().unwrap();
        assert_eq!(
            hex::encode(report_data(additional, nonce, &key).unwrap()),
            example["primary_report_data_sha384_hex"].as_str().unwrap()
        );
    }
}
