//! SEV-SNP parsing: the raw 1184-byte report (`snp::parse_unverified`), its JSON form in the
//! evidence (`snp_json::report_from_evidence`), the GHCB certificate table
//! (`snp_json::parse_cert_table`) and the Azure HCL report that wraps a report
//! (`azure::parse_hcl_report`).
#![no_main]

use cvm_warden_verify::evidence::{azure, snp, snp_json};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(fields) = snp::parse_unverified(data) {
        assert!(!fields.verified);
        // A report that parses survives the evidence JSON unchanged.
        let evidence = snp_json::evidence_json(data, None);
        let evidence = evidence.as_ref().map_err(|e| e.to_string());
        assert!(evidence.is_ok(), "{evidence:?}");
        if let Ok(evidence) = evidence {
            let back = snp_json::report_from_evidence(evidence).map_err(|e| e.to_string());
            assert_eq!(back.as_deref(), Ok(data));
        }
    }
    if let Ok(entries) = snp_json::parse_cert_table(data) {
        // Encoding the entries again gives a table that parses to the same entries (entries
        // of a kind without a GUID are dropped by the encoder).
        let kept: Vec<_> = entries
            .iter()
            .filter(|e| e.cert_type.guid().is_some())
            .cloned()
            .collect();
        let again = snp_json::parse_cert_table(&snp_json::encode_cert_table(&kept))
            .map_err(|e| e.to_string());
        assert_eq!(again, Ok(kept));
    }
    let _ = azure::parse_hcl_report(data);
    if let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) {
        if let Ok(report) = snp_json::report_from_evidence(&value) {
            assert_eq!(report.len(), snp_json::REPORT_LEN);
        }
        let _ = azure::AzEvidence::from_json(&value);
    }
});
