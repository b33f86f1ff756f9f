//! `sample` evidence and init-data (the `tpm` verifier is in [`crate::tpm`]).

use base64::Engine;
use serde::Deserialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

#[derive(Deserialize)]
struct SampleEvidence {
    svn: String,
    report_data: String,
}

/// Verify `sample` evidence `{"svn", "report_data": base64 std of the 48 bytes}`; returns
/// the claims for the token's annotated evidence.
pub fn verify_sample_evidence(evidence: &Value, report_data: &[u8; 48]) -> Result<Value, String> {
    let ev: SampleEvidence = serde_json::from_value(evidence.clone())
        .map_err(|e| format!("sample evidence is not {{\"svn\",\"report_data\"}}: {e}"))?;
    let got = base64::engine::general_purpose::STANDARD
        .decode(&ev.report_data)
        .map_err(|_| "sample evidence report_data is not standard base64".to_string())?;
    if got.as_slice() != report_data.as_slice() {
        return Err(format!(
            "sample evidence report_data {} is not SHA-384 of the runtime data {}",
            hex::encode(&got),
            hex::encode(report_data)
        ));
    }
    Ok(json!({"svn": ev.svn, "report_data": hex::encode(report_data)}))
}

/// The `init-data` object of an Attestation.
#[derive(Debug, Clone, Deserialize)]
pub struct InitData {
    /// Must be `toml`.
    pub format: String,
    /// The TOML text.
    pub body: String,
}

/// SHA-256 of the init-data body, after checking it is TOML that names `algorithm = "sha256"`
/// (the only algorithm the TPM binding supports).
pub fn init_data_digest(init_data: &InitData) -> Result<[u8; 32], String> {
    if init_data.format != "toml" {
        return Err(format!(
            "init-data format is {:?}, not \"toml\"",
            init_data.format
        ));
    }
    let table: toml::Table = init_data
        .body
        .parse()
        .map_err(|e| format!("init-data body is not TOML: {e}"))?;
    match table.get("algorithm").and_then(|v| v.as_str()) {
        Some("sha256") => {}
        other => {
            return Err(format!(
                "init-data algorithm is {other:?}; only \"sha256\" is supported"
            ))
        }
    }
    Ok(Sha256::digest(init_data.body.as_bytes()).into())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn sample_evidence_must_carry_exactly_the_48_bytes() {
        let rd = [7u8; 48];
        let b64 = base64::engine::general_purpose::STANDARD;
        let ok = json!({"svn": "1", "report_data": b64.encode(rd)});
        assert_eq!(verify_sample_evidence(&ok, &rd).unwrap()["svn"], "1");
        let mut padded = rd.to_vec();
        padded.extend_from_slice(&[0u8; 16]);
        let long = json!({"svn": "1", "report_data": b64.encode(padded)});
        assert!(verify_sample_evidence(&long, &rd).is_err());
        let wrong = json!({"svn": "1", "report_data": b64.encode([8u8; 48])});
        assert!(verify_sample_evidence(&wrong, &rd).is_err());
        assert!(verify_sample_evidence(&json!({"report_data": b64.encode(rd)}), &rd).is_err());
    }

    #[test]
    fn init_data_needs_toml_and_sha256() {
        let body = "algorithm = \"sha256\"\nversion = \"0.1.0\"\n".to_string();
        let digest = init_data_digest(&InitData {
            format: "toml".into(),
            body: body.clone(),
        })
        .unwrap();
        assert_eq!(digest, <[u8; 32]>::from(Sha256::digest(body.as_bytes())));
        for (format, body) in [
            ("json", body.as_str()),
            ("toml", "algorithm = \"sha384\""),
            ("toml", "not toml ="),
        ] {
            assert!(init_data_digest(&InitData {
                format: format.into(),
                body: body.into()
            })
            .is_err());
        }
    }
}
