//! TPM 2.0 `TPMS_ATTEST` parsing (`tpm::parse_unverified`, the parser `verify_quote` runs
//! once the signature holds), and `verify_quote` itself with a fixed AK and PCR values: the
//! input is the quote message; its signature is the input's tail when it is as long as the
//! key (it never verifies: the point is that nothing before the check misbehaves).
#![no_main]

use cvm_warden_verify::evidence::tpm;
use libfuzzer_sys::fuzz_target;

const AK: &[u8] = include_bytes!("../../verify/tests/vectors/azure-cvm-tooling/akpub.pem");

fuzz_target!(|data: &[u8]| {
    if let Ok(quote) = tpm::parse_unverified(data) {
        assert!(!quote.verified && !quote.pcrs_checked);
        assert_eq!(quote.magic, "ff544347");
        assert_eq!(quote.attest_type, "8018");
        // Indices come from the selection bitmaps: ascending, below 8 × 255.
        for selection in &quote.pcr_selection {
            assert!(selection.pcrs.windows(2).all(|w| w[0] < w[1]));
            assert!(selection.pcrs.iter().all(|&i| i < 8 * 255));
        }
    }
    let pcrs = [0u8; tpm::PCR_LEN * tpm::PCR_COUNT];
    let (msg, sig) = data.split_at(data.len().saturating_sub(256));
    let result = tpm::verify_quote(msg, sig, AK, Some(&pcrs));
    assert!(
        result.is_err(),
        "a quote verified without the AK's private key"
    );
});
