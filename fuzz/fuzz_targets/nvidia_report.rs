//! NVIDIA GPU evidence parsing: `nvidia::decode_report` (raw or hex text),
//! `nvidia::parse_report` (SPDM 1.1 GET_MEASUREMENTS request ‖ response, every length from
//! the parsed fields, opaque TLVs), the claims, and the PEM chain with the leaf's FWID
//! extension (`cert::parse_pem_chain`, `cert::leaf_fwid`).
#![no_main]

use cvm_warden_verify::evidence::nvidia::{self, cert, Arch};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(raw) = nvidia::decode_report(data) {
        if let Ok(report) = nvidia::parse_report(&raw) {
            // What is signed and the signature lie inside the buffer, in order.
            assert!(report.signed_bytes().len() + report.signature().len() <= raw.len());
            assert_eq!(report.signature().len(), 96);
            let claims = nvidia::claims(&report, Arch::Hopper);
            assert_eq!(claims.measurements.len(), report.measurements().len());
            let _ = report.measurements_digest();
            let _ = report.vbios_version();
        }
    }
    if let Ok(chain) = cert::parse_pem_chain(data, "fuzz") {
        for c in &chain {
            let _ = cert::leaf_fwid(c);
        }
    }
});
