//! The bundle manifest parser: `Manifest::from_json` (what `--manifest` files and the
//! `workload.manifest` policy key are read with).
#![no_main]

use cvm_warden::measure::Manifest;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(manifest) = Manifest::from_json(text) {
        // A manifest that parses is written back to one that parses to the same entries and
        // digest, and differs from itself nowhere.
        let again = Manifest::from_json(&manifest.to_json()).map_err(|e| e.to_string());
        assert_eq!(again.as_ref(), Ok(&manifest));
        if let Ok(again) = again {
            assert_eq!(again.digest(), manifest.digest());
        }
        assert!(manifest.diff(&manifest).is_empty());
    }
});
