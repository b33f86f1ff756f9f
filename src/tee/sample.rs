//! `sample` evidence provider: the Trustee sample verifier's shape, for tests and demos.
//!
//! The evidence is `{"svn":"1","report_data":"<base64 std of the 48-byte binding>"}`. It is
//! produced by software with no hardware behind it, so it proves nothing about this
//! machine: anyone can write it. [`Provider::insecure`] is true, every audit record says
//! so, and the policy layer refuses `sample` unless `insecure_sample = true`.

use serde_json::{json, Value};

use super::{Provider, TeeError};
use crate::eventlog::RuntimeRegister;

/// The security version number the sample evidence claims (the Trustee sample verifier
/// reads it as a string).
pub const SAMPLE_SVN: &str = "1";

/// Evidence for the Trustee `sample` verifier.
#[derive(Debug, Default, Clone, Copy)]
pub struct SampleProvider;

impl SampleProvider {
    /// The sample provider (it has no device).
    pub fn new() -> Self {
        Self
    }
}

impl Provider for SampleProvider {
    fn tee(&self) -> &'static str {
        "sample"
    }

    fn evidence(&mut self, report_data: &[u8; 48]) -> Result<Value, TeeError> {
        let evidence = cvm_warden_verify::schema::SampleEvidence {
            svn: SAMPLE_SVN.to_string(),
            report_data: cvm_warden_verify::schema::Base64(report_data.to_vec()),
        };
        serde_json::to_value(evidence).map_err(|e| TeeError::Malformed {
            tee: "sample",
            what: "evidence",
            detail: e.to_string(),
        })
    }

    fn checkpoint(&mut self, binding: &[u8; 64]) -> Result<Value, TeeError> {
        let mut report_data = [0u8; 48];
        report_data.copy_from_slice(&binding[..48]);
        self.evidence(&report_data)
    }

    fn runtime_register(&mut self) -> Result<Option<Box<dyn RuntimeRegister>>, TeeError> {
        Ok(None)
    }

    fn describe(&self) -> Value {
        json!({
            "tee": "sample",
            "device": null,
            "insecure": true,
            "note": "sample evidence is written by software and proves nothing about this \
                     machine; use it only for tests and demos",
        })
    }

    fn insecure(&self) -> bool {
        true
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine;

    #[test]
    fn evidence_carries_the_48_bytes_in_standard_base64() {
        let mut binding = [0u8; 48];
        for (i, b) in binding.iter_mut().enumerate() {
            *b = 0xf0 ^ i as u8; // bytes that differ between std and url-safe alphabets
        }
        let evidence = SampleProvider::new().evidence(&binding).unwrap();
        assert_eq!(evidence["svn"], "1");
        let text = evidence["report_data"].as_str().unwrap();
        assert_eq!(STANDARD.decode(text).unwrap(), binding);
        assert_eq!(
            text.len(),
            64,
            "48 bytes are 64 base64 characters, no padding needed"
        );
        assert_eq!(
            evidence.as_object().unwrap().len(),
            2,
            "exactly svn and report_data"
        );
    }

    #[test]
    fn evidence_uses_the_standard_alphabet() {
        let evidence = SampleProvider.evidence(&[0xff; 48]).unwrap();
        assert_eq!(evidence["report_data"], "/".repeat(64));
    }

    #[test]
    fn sample_is_insecure_and_says_so() {
        let mut p = SampleProvider::new();
        assert_eq!(p.tee(), "sample");
        assert!(p.insecure());
        assert!(p.runtime_register().unwrap().is_none());
        let d = p.describe();
        assert_eq!(d["insecure"], true);
        assert!(d["note"].as_str().unwrap().contains("proves nothing"));
    }
}
