//! The attestation token: an EAR-shaped JWT signed ES256 with a per-broker key.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use p256::ecdsa::signature::{Signer, Verifier};
use p256::ecdsa::{Signature, SigningKey, VerifyingKey};
use serde_json::{json, Value};

/// EAR profile of Veraison / CoCo AS tokens.
pub const EAR_PROFILE: &str = "tag:github.com,2023:veraison/ear";

/// JSON pointer of the tee-pubkey inside the token claims (Trustee's EAR path).
pub const TEE_PUBKEY_POINTER: &str =
    "/submods/cpu0/ear.veraison.annotated-evidence/runtime_data_claims/tee-pubkey";

/// Signs and verifies the broker's tokens.
pub(crate) struct TokenSigner {
    key: SigningKey,
}

impl std::fmt::Debug for TokenSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenSigner(<ES256 key redacted>)")
    }
}

impl TokenSigner {
    pub(crate) fn generate() -> Self {
        TokenSigner {
            key: SigningKey::random(&mut rand_core::OsRng),
        }
    }

    /// The public key as a JWK (`kty`, `crv`, `x`, `y`).
    pub(crate) fn public_jwk(&self) -> Value {
        public_jwk(self.key.verifying_key())
    }

    pub(crate) fn sign(&self, claims: &Value) -> String {
        let header = json!({"alg": "ES256", "typ": "JWT", "jwk": self.public_jwk()});
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let signature: Signature = self.key.sign(signing_input.as_bytes());
        format!(
            "{signing_input}.{}",
            URL_SAFE_NO_PAD.encode(signature.to_bytes())
        )
    }

    /// Verify signature, algorithm and expiry; return the claims.
    pub(crate) fn verify(&self, token: &str, now: u64) -> Result<Value, String> {
        verify_token(self.key.verifying_key(), token, now)
    }
}

fn public_jwk(key: &VerifyingKey) -> Value {
    let point = key.to_encoded_point(false);
    let coord =
        |c: Option<&p256::FieldBytes>| c.map(|b| URL_SAFE_NO_PAD.encode(b)).unwrap_or_default();
    json!({"kty": "EC", "crv": "P-256", "x": coord(point.x()), "y": coord(point.y())})
}

/// Verify an ES256 token against `key` and its `exp` against `now` (seconds since epoch).
pub fn verify_token(key: &VerifyingKey, token: &str, now: u64) -> Result<Value, String> {
    let parts: Vec<&str> = token.split('.').collect();
    let [header_b64, claims_b64, sig_b64] = parts.as_slice() else {
        return Err(format!(
            "token has {} dot-separated parts, not 3 (JWS compact)",
            parts.len()
        ));
    };
    let header: Value = URL_SAFE_NO_PAD
        .decode(header_b64)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or_else(|| "token header is not base64url JSON".to_string())?;
    if header.get("alg").and_then(Value::as_str) != Some("ES256") {
        return Err(format!(
            "token alg is {}, not ES256",
            header.get("alg").unwrap_or(&Value::Null)
        ));
    }
    let sig_bytes = URL_SAFE_NO_PAD
        .decode(sig_b64)
        .map_err(|_| "token signature is not base64url".to_string())?;
    let signature = Signature::from_slice(&sig_bytes)
        .map_err(|_| "token signature is not 64 bytes r||s".to_string())?;
    let signing_input = format!("{header_b64}.{claims_b64}");
    key.verify(signing_input.as_bytes(), &signature)
        .map_err(|_| "token signature does not verify with this broker's key".to_string())?;
    let claims: Value = URL_SAFE_NO_PAD
        .decode(claims_b64)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or_else(|| "token claims are not base64url JSON".to_string())?;
    let exp = claims
        .get("exp")
        .and_then(Value::as_u64)
        .ok_or_else(|| "token has no numeric exp".to_string())?;
    if now >= exp {
        return Err(format!("token expired at {exp} (now {now})"));
    }
    Ok(claims)
}

/// Decode a token's claims without verifying anything (for tests and logs).
pub fn decode_claims_unverified(token: &str) -> Option<Value> {
    let claims_b64 = token.split('.').nth(1)?;
    let bytes = URL_SAFE_NO_PAD.decode(claims_b64).ok()?;
    serde_json::from_slice(&bytes).ok()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn signed_token_verifies_and_expires() {
        let signer = TokenSigner::generate();
        let token = signer.sign(&json!({"exp": 1000, "x": 1}));
        assert_eq!(signer.verify(&token, 999).unwrap()["x"], 1);
        assert!(signer.verify(&token, 1000).unwrap_err().contains("expired"));
        // another broker's key does not verify it
        let other = TokenSigner::generate();
        assert!(other
            .verify(&token, 0)
            .unwrap_err()
            .contains("does not verify"));
        // a changed claim breaks the signature
        let parts: Vec<&str> = token.split('.').collect();
        let forged = format!(
            "{}.{}.{}",
            parts[0],
            URL_SAFE_NO_PAD.encode(json!({"exp": 99999, "x": 1}).to_string()),
            parts[2]
        );
        assert!(signer.verify(&forged, 0).is_err());
        assert!(signer.verify("a.b", 0).is_err());
    }
}
