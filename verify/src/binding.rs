//! The `report_data` binding between the broker's nonce, the ephemeral key and the evidence
//! (KBS-PROTOCOL.md, "report_data binding"):
//!
//! ```text
//! report_data = SHA-384( JCS({"additional-evidence": <string>,
//!                             "nonce": <nonce>,
//!                             "tee-pubkey": <the JWK object>}) )
//! ```
//!
//! Public because auditors (`cvm-warden audit verify`) recompute it from an audit record.
//!
//! The **checkpoint binding** ties TEE evidence to the audit log: its report data is
//! `SHA-512("cvm-warden checkpoint v1\0" || head)`, `head` being the hash of the record it
//! covers. The label keeps a checkpoint from ever passing for broker evidence (whose
//! report data is fixed by the protocol), and the broker's evidence cannot carry a head.

use serde_json::{json, Value};
use sha2::{Digest, Sha384, Sha512};

/// Label hashed in front of the audit head for checkpoint evidence.
pub const CHECKPOINT_LABEL: &[u8] = b"cvm-warden checkpoint v1\0";

/// The report data of checkpoint evidence for an audit head.
pub fn checkpoint_binding(head: &crate::digest::Digest) -> [u8; 64] {
    let mut hasher = Sha512::new();
    hasher.update(CHECKPOINT_LABEL);
    hasher.update(head.0);
    hasher.finalize().into()
}

/// Why the binding could not be computed.
#[derive(Debug, thiserror::Error)]
pub enum BindingError {
    /// The key is not a JSON object (a JWK).
    #[error("tee-pubkey must be a JWK (a JSON object), found {found}")]
    NotAnObject {
        /// The JSON type found.
        found: &'static str,
    },
    /// RFC 8785 canonicalisation refused the value.
    #[error("JCS canonicalisation failed")]
    Canonical(#[source] serde_json::Error),
}

/// The exact bytes that are hashed: the JCS (RFC 8785) form of
/// `{"additional-evidence", "nonce", "tee-pubkey"}`.
pub fn canonical_binding(
    nonce: &str,
    tee_pubkey: &Value,
    additional_evidence: &str,
) -> Result<Vec<u8>, BindingError> {
    if !tee_pubkey.is_object() {
        return Err(BindingError::NotAnObject {
            found: json_type(tee_pubkey),
        });
    }
    let binding = json!({
        "additional-evidence": additional_evidence,
        "nonce": nonce,
        "tee-pubkey": tee_pubkey,
    });
    serde_json_canonicalizer::to_vec(&binding).map_err(BindingError::Canonical)
}

/// SHA-384 of [`canonical_binding`]: the 48 bytes the evidence must carry.
pub fn report_data(
    nonce: &str,
    tee_pubkey: &Value,
    additional_evidence: &str,
) -> Result<[u8; 48], BindingError> {
    let bytes = canonical_binding(nonce, tee_pubkey, additional_evidence)?;
    Ok(Sha384::digest(&bytes).into())
}

/// The device binding of a KBS handshake (GPU-ATTESTATION.md §4, guest-components'
/// `get_composite_evidence`, Trustee's additional-evidence verification): the JCS bytes of
/// `{"nonce", "tee-pubkey"}` — without `additional-evidence`, which the device evidence is
/// part of.
pub fn canonical_device_binding(nonce: &str, tee_pubkey: &Value) -> Result<Vec<u8>, BindingError> {
    if !tee_pubkey.is_object() {
        return Err(BindingError::NotAnObject {
            found: json_type(tee_pubkey),
        });
    }
    let binding = json!({ "nonce": nonce, "tee-pubkey": tee_pubkey });
    serde_json_canonicalizer::to_vec(&binding).map_err(BindingError::Canonical)
}

/// The 32-byte nonce a device (an NVIDIA GPU's SPDM GET_MEASUREMENTS request) carries for
/// one KBS handshake: the first 32 bytes of `SHA-384(JCS({"nonce", "tee-pubkey"}))`. The
/// device evidence is gathered with it *before* the primary evidence, whose report data
/// ([`report_data`]) then covers the device evidence through `additional-evidence`.
pub fn device_nonce(nonce: &str, tee_pubkey: &Value) -> Result<[u8; 32], BindingError> {
    let digest = Sha384::digest(canonical_device_binding(nonce, tee_pubkey)?);
    let mut out = [0u8; 32];
    out.copy_from_slice(&digest[..32]);
    Ok(out)
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod device_tests {
    use super::*;

    /// `shared/vectors/nvidia/derived/kbs-binding-example.SYNTHETIC.json`: the guest-components /
    /// Trustee arithmetic on a fixed nonce and JWK.
    #[test]
    fn device_nonce_and_report_data_follow_the_trustee_binding() {
        let nonce = "Dn/RSy3SMzL+nsKPkD5p6d9A91pHw5S8IiDW5WnBFsY=";
        let jwk = json!({
            "kty": "EC", "crv": "P-256", "alg": "ECDH-ES+A256KW",
            "x": "74gMjvgWiBeWwYjlcbAaxvcMUmJ0VtrkhnWO_9nGPd0",
            "y": "XNvBHiSIOhJZgkKpWHW5aohU9kv_msmjOBC4HxVPVOU"
        });
        assert_eq!(
            String::from_utf8(canonical_device_binding(nonce, &jwk).unwrap()).unwrap(),
            r#"{"nonce":"Dn/RSy3SMzL+nsKPkD5p6d9A91pHw5S8IiDW5WnBFsY=","tee-pubkey":{"alg":"ECDH-ES+A256KW","crv":"P-256","kty":"EC","x":"74gMjvgWiBeWwYjlcbAaxvcMUmJ0VtrkhnWO_9nGPd0","y":"XNvBHiSIOhJZgkKpWHW5aohU9kv_msmjOBC4HxVPVOU"}}"#
        );
        assert_eq!(
            hex::encode(device_nonce(nonce, &jwk).unwrap()),
            "009b3742e64ff8812526079a90b7ba8521cd8852f05a72f4d3a7ca4d77b7a716"
        );
        let additional = r#"{"nvidia":{"device_evidence_list":[]}}"#;
        assert_eq!(
            hex::encode(report_data(nonce, &jwk, additional).unwrap()),
            "681a3c6d3c224d4a48de083847eaa69af07efcfc10c8329556bfa865cad3e9f049d1f6354021452e4e61d6b0b076f97e"
        );
        assert!(device_nonce(nonce, &json!("not a jwk")).is_err());
    }
}
