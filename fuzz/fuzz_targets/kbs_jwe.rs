//! The KBS resource response: `kbs::jwe::decrypt` (flattened JSON JWE, ECDH-ES+A256KW or
//! RSA-OAEP-256 with A256GCM) with the fixed test keys of `src/kbs/testdata/jwe_vectors.json`.
#![no_main]

use std::sync::OnceLock;

use cvm_warden::kbs::jwe::decrypt;
use cvm_warden::kbs::TeeKey;
use libfuzzer_sys::fuzz_target;
use rsa::pkcs8::DecodePrivateKey;

const VECTORS: &str = include_str!("../../src/kbs/testdata/jwe_vectors.json");

fn keys() -> &'static Option<(TeeKey, TeeKey)> {
    static KEYS: OnceLock<Option<(TeeKey, TeeKey)>> = OnceLock::new();
    KEYS.get_or_init(|| {
        let vectors: serde_json::Value = serde_json::from_str(VECTORS).ok()?;
        let d = hex_decode(vectors["ec"]["d"].as_str()?)?;
        let ec = TeeKey::from_p256(p256::SecretKey::from_slice(&d).ok()?);
        let pem = vectors["rsa"]["pkcs8_pem"].as_str()?;
        let rsa = TeeKey::from_rsa(rsa::RsaPrivateKey::from_pkcs8_pem(pem).ok()?);
        Some((ec, rsa))
    })
}

fn hex_decode(text: &str) -> Option<Vec<u8>> {
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let Some((ec, rsa)) = keys() else {
        // The committed vectors are broken: fail loudly rather than fuzz nothing.
        std::process::abort();
    };
    let _ = decrypt(data, ec);
    let _ = decrypt(data, rsa);
});
