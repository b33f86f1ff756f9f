//! TDX quote parsing: `tdx::quote_report_data` (header and body layout of version 4 and 5
//! quotes), `tdx::check_quote`, and the evidence JSON (`tdx::quote_from_evidence`).
#![no_main]

use cvm_warden_verify::evidence::tdx;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(report_data) = tdx::quote_report_data(data) {
        assert!(tdx::check_quote(data, &report_data).is_ok());
        let mut other = report_data;
        other[0] ^= 1;
        assert!(tdx::check_quote(data, &other).is_err());
    }
    if let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) {
        if let Ok(quote) = tdx::quote_from_evidence(&value) {
            let _ = tdx::quote_report_data(&quote);
        }
    }
});
