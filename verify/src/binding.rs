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
