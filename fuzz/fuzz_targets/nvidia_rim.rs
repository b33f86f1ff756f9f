//! NVIDIA RIM (SWID tag) reading: `nvidia_rim::parse` (roxmltree, the C14N 1.1 subset the
//! signature needs, the XMLDSig parts, the embedded chain) and, for what parses, the
//! signature check (digest, ECDSA, chain) at a fixed time.
#![no_main]

use cvm_warden_verify::evidence::nvidia_rim;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(rim) = nvidia_rim::parse(data) {
        let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_790_000_000);
        let _ = rim.verify_signature(at);
        let _ = rim.active().count();
    }
});
