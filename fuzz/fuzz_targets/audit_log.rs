//! The audit log verifier: `verify_log_from` (hash chain, run splitting, evidence and
//! checkpoint checks, verdicts) over any bytes, as `cvm-warden-verify audit verify` reads a
//! log file or a console capture.
#![no_main]

use std::path::Path;

use cvm_warden_verify::check::Pins;
use cvm_warden_verify::verdict::{verify_log_from, Verdict};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(outcome) = verify_log_from(data, Path::new("fuzz.jsonl"), Pins::default()) else {
        return;
    };
    for run in &outcome.runs {
        // A run the checks call attested has no unattested record left.
        if run.verdict == Verdict::Attested {
            assert_eq!(run.not_attested_count, 0);
            assert!(run.records > 0);
        }
    }
    // The plain chain verifier agrees that the chain holds.
    assert!(cvm_warden_verify::chain::verify(data).is_ok());
});
