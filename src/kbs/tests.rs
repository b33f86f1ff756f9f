//! Unit tests of the KBS client: the binding against bytes computed independently, the JWE
//! against vectors made by Python `cryptography` (testdata/jwe_vectors.py) and against a
//! test-only encryptor, the protocol against a fake broker, and the real transport against
//! TLS and plain-HTTP servers on loopback.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::io::{Read, Write};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use kbs_types::TeePubKey;
use p256::elliptic_curve::sec1::{FromEncodedPoint, ToEncodedPoint};
use rand_core::{OsRng, RngCore};
use serde_json::{json, Value};

use super::fake::{FakeRequest, FakeTransport, ManualClock, Method};
use super::jwe::{concat_kdf, decrypt};
use super::*;
use crate::eventlog::RuntimeRegister;
use crate::policy::ResourceUri;
use crate::tee::{Provider, TeeError};

const URL: &str = "https://kbs.test:8080";

// ---------------------------------------------------------------------------------------
// binding

#[test]
fn binding_hashes_the_exact_jcs_bytes() {
    // Expected bytes and digest computed with Python (json.dumps sort_keys, no spaces;
    // hashlib.sha384), independently of this crate.
    let jwk = json!({
        "y": "7a4QzvuOx0_MbX8cid6vdnzFkxR90e1ootMWEkADvbE",
        "kty": "EC",
        "x": "tEatQeNjrUhvbFWg07cPCwTuYqIwG4id__9gGdd-_18",
        "crv": "P-256",
        "alg": "ECDH-ES+A256KW",
    });
    let nonce = "Dn/RSy3SMzL+nsKPkD5p6d9A91pHw5S8IiDW5WnBFsY=";
    let bytes = canonical_binding(nonce, &jwk, "").unwrap();
    assert_eq!(
        String::from_utf8(bytes).unwrap(),
        r#"{"additional-evidence":"","nonce":"Dn/RSy3SMzL+nsKPkD5p6d9A91pHw5S8IiDW5WnBFsY=","tee-pubkey":{"alg":"ECDH-ES+A256KW","crv":"P-256","kty":"EC","x":"tEatQeNjrUhvbFWg07cPCwTuYqIwG4id__9gGdd-_18","y":"7a4QzvuOx0_MbX8cid6vdnzFkxR90e1ootMWEkADvbE"}}"#
    );
    assert_eq!(
        hex::encode(report_data(nonce, &jwk, "").unwrap()),
        "059957b184b43242b0873b32522511561ea1e4dd08c2a92b4fb3b1f4d878b4b860c49e8a40647f1a9a08d922161586f5"
    );
}

#[test]
fn binding_covers_rsa_keys_and_additional_evidence() {
    let jwk = json!({"kty": "RSA", "alg": "RSA-OAEP-256", "n": "sXch", "e": "AQAB"});
    assert_eq!(
        hex::encode(report_data("abc", &jwk, "{\"nvidia\":{}}").unwrap()),
        "ce196f43a9f893be16310ba72b24ef1e2ff6662ac8dc81882353b037415a9a84f67d16dfd76ff7b751339c75fdfa91ac"
    );
}

#[test]
fn binding_changes_with_any_extra_jwk_field() {
    let jwk = json!({"kty": "EC", "crv": "P-256", "alg": "ECDH-ES+A256KW", "x": "a", "y": "b"});
    let mut with_kid = jwk.clone();
    with_kid["kid"] = json!("1");
    assert_ne!(
        report_data("n", &jwk, "").unwrap(),
        report_data("n", &with_kid, "").unwrap()
    );
    assert!(matches!(
        report_data("n", &json!("not a jwk"), ""),
        Err(BindingError::NotAnObject { found: "a string" })
    ));
}

// ---------------------------------------------------------------------------------------
// ephemeral key

fn rsa_test_key() -> rsa::RsaPrivateKey {
    use rsa::pkcs8::DecodePrivateKey;
    let vectors = vectors();
    rsa::RsaPrivateKey::from_pkcs8_pem(vectors["rsa"]["pkcs8_pem"].as_str().unwrap()).unwrap()
}

#[test]
fn ec_jwk_has_exactly_the_protocol_fields() {
    let key = TeeKey::generate(KeyWrap::EcdhEsA256kw).unwrap();
    let jwk = key.jwk();
    let mut fields: Vec<&str> = jwk
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    fields.sort_unstable();
    assert_eq!(fields, ["alg", "crv", "kty", "x", "y"]);
    assert_eq!(jwk["kty"], "EC");
    assert_eq!(jwk["crv"], "P-256");
    assert_eq!(jwk["alg"], "ECDH-ES+A256KW");
    for c in ["x", "y"] {
        let text = jwk[c].as_str().unwrap();
        assert_eq!(text.len(), 43, "unpadded base64url of 32 bytes");
        assert_eq!(URL_SAFE_NO_PAD.decode(text).unwrap().len(), 32);
    }
    // Two keys are different (fresh randomness).
    let other = TeeKey::generate(KeyWrap::EcdhEsA256kw).unwrap();
    assert_ne!(other.jwk(), jwk);
}

#[test]
fn rsa_jwk_has_exactly_the_protocol_fields() {
    let key = TeeKey::from_rsa(rsa_test_key());
    let jwk = key.jwk();
    let mut fields: Vec<&str> = jwk
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    fields.sort_unstable();
    assert_eq!(fields, ["alg", "e", "kty", "n"]);
    assert_eq!(jwk["kty"], "RSA");
    assert_eq!(jwk["alg"], "RSA-OAEP-256");
    assert_eq!(jwk["e"], "AQAB");
    assert_eq!(
        URL_SAFE_NO_PAD
            .decode(jwk["n"].as_str().unwrap())
            .unwrap()
            .len(),
        256
    );
}

#[test]
fn key_debug_shows_no_private_material() {
    let secret = p256::SecretKey::random(&mut OsRng);
    let d = secret.to_bytes();
    let key = TeeKey::from_p256(secret);
    let debug = format!("{key:?}");
    assert!(debug.contains("ECDH-ES+A256KW"), "{debug}");
    assert!(!debug.contains(&hex::encode(d)));
    assert!(!debug.contains(&URL_SAFE_NO_PAD.encode(d)));
    assert!(!debug.contains(&format!("{:?}", d.as_slice())));
}

// ---------------------------------------------------------------------------------------
// JWE: independent vectors

fn vectors() -> Value {
    serde_json::from_str(include_str!("testdata/jwe_vectors.json")).unwrap()
}

fn vector_ec_key() -> TeeKey {
    let d = hex::decode(vectors()["ec"]["d"].as_str().unwrap()).unwrap();
    TeeKey::from_p256(p256::SecretKey::from_slice(&d).unwrap())
}

#[test]
fn concat_kdf_matches_an_independent_computation() {
    // SHA256(00000001 || 0x01*32 || 0000000e "ECDH-ES+A256KW" || 0 || 0 || 00000100),
    // computed with Python hashlib.
    assert_eq!(
        hex::encode(*concat_kdf(&[1u8; 32], "ECDH-ES+A256KW")),
        "9ef57177b3ca41231c4fb70924571c4ee531046d10592852f4fc8446b5861f73"
    );
}

#[test]
fn decrypts_an_independently_made_ecdh_es_jwe() {
    let v = vectors();
    let body = serde_json::to_vec(&v["ec"]["jwe"]).unwrap();
    let plain = decrypt(&body, &vector_ec_key()).unwrap();
    assert_eq!(hex::encode(&*plain), v["plaintext_hex"].as_str().unwrap());
}

#[test]
fn decrypts_an_independently_made_rsa_oaep_jwe() {
    let v = vectors();
    let body = serde_json::to_vec(&v["rsa"]["jwe"]).unwrap();
    let plain = decrypt(&body, &TeeKey::from_rsa(rsa_test_key())).unwrap();
    assert_eq!(hex::encode(&*plain), v["plaintext_hex"].as_str().unwrap());
}

// ---------------------------------------------------------------------------------------
// JWE: test-only encryptor (the broker side), round trips and tampering

/// Encrypts `plaintext` to `jwk` the way the Trustee broker does; `extra_header` members are
/// added to the protected header. Test-only.
fn encrypt(jwk: &TeePubKey, plaintext: &[u8], extra_header: &[(&str, Value)]) -> Value {
    let mut cek = [0u8; 32];
    OsRng.fill_bytes(&mut cek);
    let mut header = serde_json::Map::new();
    let encrypted_key = match jwk {
        TeePubKey::EC { crv, alg, x, y } => {
            assert_eq!((crv.as_str(), alg.as_str()), ("P-256", "ECDH-ES+A256KW"));
            let x: [u8; 32] = URL_SAFE_NO_PAD.decode(x).unwrap().try_into().unwrap();
            let y: [u8; 32] = URL_SAFE_NO_PAD.decode(y).unwrap().try_into().unwrap();
            let point = p256::EncodedPoint::from_affine_coordinates(&x.into(), &y.into(), false);
            let public = p256::PublicKey::from_encoded_point(&point).unwrap();
            let eph = p256::ecdh::EphemeralSecret::random(&mut OsRng);
            let shared = eph.diffie_hellman(&public);
            let kek = concat_kdf(shared.raw_secret_bytes(), "ECDH-ES+A256KW");
            let epk = eph.public_key().to_encoded_point(false);
            header.insert("alg".into(), json!("ECDH-ES+A256KW"));
            header.insert("enc".into(), json!("A256GCM"));
            header.insert(
                "epk".into(),
                json!({"crv": "P-256", "kty": "EC",
                       "x": URL_SAFE_NO_PAD.encode(epk.x().unwrap()),
                       "y": URL_SAFE_NO_PAD.encode(epk.y().unwrap())}),
            );
            let mut wrapped = vec![0u8; 40];
            aes_kw::KekAes256::from(*kek)
                .wrap(&cek, &mut wrapped)
                .unwrap();
            wrapped
        }
        TeePubKey::RSA { alg, k_mod, k_exp } => {
            assert_eq!(alg, "RSA-OAEP-256");
            let n = rsa::BigUint::from_bytes_be(&URL_SAFE_NO_PAD.decode(k_mod).unwrap());
            let e = rsa::BigUint::from_bytes_be(&URL_SAFE_NO_PAD.decode(k_exp).unwrap());
            let public = rsa::RsaPublicKey::new(n, e).unwrap();
            header.insert("alg".into(), json!("RSA-OAEP-256"));
            header.insert("enc".into(), json!("A256GCM"));
            public
                .encrypt(&mut OsRng, rsa::Oaep::new::<sha2::Sha256>(), &cek)
                .unwrap()
        }
        TeePubKey::AKP { .. } => panic!("not used"),
    };
    for (name, value) in extra_header {
        header.insert((*name).to_string(), value.clone());
    }
    let protected = URL_SAFE_NO_PAD.encode(serde_json::to_string(&header).unwrap());
    let mut iv = [0u8; 12];
    OsRng.fill_bytes(&mut iv);
    let mut buffer = plaintext.to_vec();
    let tag = Aes256Gcm::new(&cek.into())
        .encrypt_in_place_detached(Nonce::from_slice(&iv), protected.as_bytes(), &mut buffer)
        .unwrap();
    json!({
        "protected": protected,
        "encrypted_key": URL_SAFE_NO_PAD.encode(encrypted_key),
        "iv": URL_SAFE_NO_PAD.encode(iv),
        "ciphertext": URL_SAFE_NO_PAD.encode(buffer),
        "tag": URL_SAFE_NO_PAD.encode(tag.as_slice()),
    })
}

fn open(jwe: &Value, key: &TeeKey) -> Result<Vec<u8>, JweError> {
    decrypt(&serde_json::to_vec(jwe).unwrap(), key).map(|p| p.to_vec())
}

/// Flips bit `bit` of byte `byte` of the base64url member `member`.
fn flip(jwe: &Value, member: &str, byte: usize, bit: u8) -> Value {
    let mut jwe = jwe.clone();
    let mut bytes = URL_SAFE_NO_PAD
        .decode(jwe[member].as_str().unwrap())
        .unwrap();
    bytes[byte] ^= 1 << bit;
    jwe[member] = json!(URL_SAFE_NO_PAD.encode(bytes));
    jwe
}

fn both_keys() -> Vec<TeeKey> {
    vec![
        TeeKey::generate(KeyWrap::EcdhEsA256kw).unwrap(),
        TeeKey::from_rsa(rsa_test_key()),
    ]
}

#[test]
fn round_trip_for_both_key_wraps_and_sizes() {
    for key in both_keys() {
        for len in [0usize, 1, 32, 1000] {
            let plaintext: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let jwe = encrypt(key.public(), &plaintext, &[]);
            assert_eq!(
                open(&jwe, &key).unwrap(),
                plaintext,
                "{:?} {len}",
                key.alg()
            );
        }
    }
}

#[test]
fn one_bit_changes_are_refused() {
    for key in both_keys() {
        let jwe = encrypt(key.public(), b"a volume key of thirty-two bytes", &[]);
        assert!(open(&jwe, &key).is_ok());
        for (member, byte) in [
            ("ciphertext", 0),
            ("ciphertext", 31),
            ("tag", 15),
            ("iv", 0),
        ] {
            for bit in [0, 7] {
                let err = open(&flip(&jwe, member, byte, bit), &key).unwrap_err();
                assert!(
                    matches!(err, JweError::Authentication),
                    "{member}[{byte}] bit {bit}: {err}"
                );
            }
        }
        let err = open(&flip(&jwe, "encrypted_key", 0, 0), &key).unwrap_err();
        match key.wrap() {
            KeyWrap::EcdhEsA256kw => assert!(matches!(err, JweError::Unwrap), "{err}"),
            KeyWrap::RsaOaep256 => assert!(matches!(err, JweError::RsaDecrypt), "{err}"),
        }
        // Any bit of the protected header: refused one way or another.
        let header_len = URL_SAFE_NO_PAD
            .decode(jwe["protected"].as_str().unwrap())
            .unwrap()
            .len();
        let step = if key.wrap() == KeyWrap::RsaOaep256 {
            7
        } else {
            1
        };
        for byte in (0..header_len).step_by(step) {
            assert!(
                open(&flip(&jwe, "protected", byte, 0), &key).is_err(),
                "byte {byte}"
            );
        }
    }
}

#[test]
fn the_protected_string_is_the_additional_data() {
    let key = TeeKey::generate(KeyWrap::EcdhEsA256kw).unwrap();
    // A header member the client ignores: changing it changes nothing but the AAD.
    let jwe = encrypt(key.public(), b"secret", &[("kid", json!("a"))]);
    assert_eq!(open(&jwe, &key).unwrap(), b"secret");
    let header = URL_SAFE_NO_PAD
        .decode(jwe["protected"].as_str().unwrap())
        .unwrap();
    let at = header.windows(7).position(|w| w == b"\"kid\":\"").unwrap() + 7;
    let err = open(&flip(&jwe, "protected", at, 1), &key).unwrap_err(); // "a" -> "c"
    assert!(matches!(err, JweError::Authentication), "{err}");
}

#[test]
fn the_epk_is_checked() {
    let key = TeeKey::generate(KeyWrap::EcdhEsA256kw).unwrap();
    let other = p256::SecretKey::random(&mut OsRng)
        .public_key()
        .to_encoded_point(false);
    // Another valid point: the unwrap's integrity check fails.
    let jwe = encrypt(
        key.public(),
        b"secret",
        &[(
            "epk",
            json!({"kty": "EC", "crv": "P-256",
                         "x": URL_SAFE_NO_PAD.encode(other.x().unwrap()),
                         "y": URL_SAFE_NO_PAD.encode(other.y().unwrap())}),
        )],
    );
    assert!(matches!(open(&jwe, &key), Err(JweError::Unwrap)));
    // Not on the curve.
    let mut y = URL_SAFE_NO_PAD
        .decode(URL_SAFE_NO_PAD.encode(other.y().unwrap()))
        .unwrap();
    y[31] ^= 1;
    let jwe = encrypt(
        key.public(),
        b"secret",
        &[(
            "epk",
            json!({"kty": "EC", "crv": "P-256",
                         "x": URL_SAFE_NO_PAD.encode(other.x().unwrap()),
                         "y": URL_SAFE_NO_PAD.encode(y)}),
        )],
    );
    let err = open(&jwe, &key).unwrap_err();
    assert!(err.to_string().contains("not on P-256"), "{err}");
    // Wrong curve, short coordinate, missing epk.
    for (epk, expect) in [
        (
            json!({"kty": "EC", "crv": "P-521", "x": "AA", "y": "AA"}),
            "crv \"P-521\"",
        ),
        (
            json!({"kty": "EC", "crv": "P-256", "x": "AAAA", "y": "AAAA"}),
            "epk x is 3 bytes; expected 32",
        ),
        (json!("none"), "missing"),
    ] {
        let jwe = encrypt(key.public(), b"s", &[("epk", epk)]);
        let err = open(&jwe, &key).unwrap_err().to_string();
        assert!(err.contains(expect), "{err}");
    }
}

#[test]
fn algorithms_and_sizes_are_checked() {
    let ec = TeeKey::generate(KeyWrap::EcdhEsA256kw).unwrap();
    let rsa = TeeKey::from_rsa(rsa_test_key());
    let jwe = encrypt(ec.public(), b"secret", &[]);
    let with_header = |header: Value| {
        let mut j = jwe.clone();
        j["protected"] = json!(URL_SAFE_NO_PAD.encode(header.to_string()));
        j
    };
    let err = |j: &Value, key: &TeeKey| open(j, key).unwrap_err().to_string();

    // An answer made for the EC key, given to the RSA key: alg mismatch.
    assert_eq!(
        err(&jwe, &rsa),
        "JWE alg \"ECDH-ES+A256KW\" does not match the key this client sent (alg \"RSA-OAEP-256\"); the answer was not made for this session's key"
    );
    assert!(
        err(&with_header(json!({"alg": "dir", "enc": "A256GCM"})), &ec)
            .starts_with("unsupported JWE alg \"dir\"")
    );
    assert!(err(
        &with_header(json!({"alg": "RSA1_5", "enc": "A256GCM"})),
        &ec
    )
    .starts_with("unsupported JWE alg \"RSA1_5\""));
    assert!(err(
        &with_header(json!({"alg": "ECDH-ES+A256KW", "enc": "A128GCM"})),
        &ec
    )
    .starts_with("unsupported JWE enc \"A128GCM\""));
    assert!(err(
        &with_header(json!({"alg": "ECDH-ES+A256KW", "enc": "A256GCM", "zip": "DEF"})),
        &ec
    )
    .contains("\"zip\""));
    assert!(err(&with_header(json!({"enc": "A256GCM"})), &ec).contains("no string \"alg\""));

    // Sizes.
    let resize = |member: &str, len: usize| {
        let mut j = jwe.clone();
        j[member] = json!(URL_SAFE_NO_PAD.encode(vec![0u8; len]));
        j
    };
    assert_eq!(
        err(&resize("iv", 11), &ec),
        "JWE iv is 11 bytes; expected 12"
    );
    assert_eq!(
        err(&resize("tag", 15), &ec),
        "JWE tag is 15 bytes; expected 16"
    );
    assert_eq!(
        err(&resize("encrypted_key", 39), &ec),
        "JWE encrypted_key is 39 bytes; expected 40"
    );
    let rsa_jwe = encrypt(rsa.public(), b"x", &[]);
    let mut short = rsa_jwe.clone();
    short["encrypted_key"] = json!(URL_SAFE_NO_PAD.encode([0u8; 255]));
    assert_eq!(
        err(&short, &rsa),
        "JWE encrypted_key is 255 bytes; expected 256"
    );

    // Members.
    let mut with_aad = jwe.clone();
    with_aad["aad"] = json!("eHl6");
    assert!(err(&with_aad, &ec).contains("member \"aad\""));
    let mut missing = jwe.clone();
    missing.as_object_mut().unwrap().remove("tag");
    assert_eq!(err(&missing, &ec), "the JWE has no \"tag\"");
    let mut padded = jwe.clone();
    padded["iv"] = json!(format!("{}=", jwe["iv"].as_str().unwrap()));
    assert!(err(&padded, &ec).contains("\"iv\" is not unpadded base64url"));
    assert!(decrypt(b"[]", &ec).is_err());
    assert!(decrypt(b"not json", &ec).is_err());

    // Over-long members are refused before they are decoded; names and header values are
    // escaped in messages.
    for (member, max) in super::jwe::MAX_MEMBER {
        let mut long = jwe.clone();
        long[member] = json!("A".repeat(max + 1));
        assert_eq!(
            err(&long, &ec),
            format!(
                "JWE member {member:?} is {} characters; at most {max} are accepted",
                max + 1
            )
        );
    }
    let mut odd = jwe.clone();
    odd.as_object_mut()
        .unwrap()
        .insert("x\u{1b}[2J\u{202e}".into(), json!(1));
    let text = err(&odd, &ec);
    assert!(
        !text.contains('\u{1b}') && !text.contains('\u{202e}'),
        "{text}"
    );
    assert!(text.contains("u{1b}[2J"), "{text}");
}

// ---------------------------------------------------------------------------------------
// A fake broker (the protocol side; cryptography from the encryptor above)

/// A provider whose evidence is the `sample` shape over the given report data.
#[derive(Debug, Default)]
struct TestProvider {
    seen: Vec<[u8; 48]>,
    /// Sign this instead of what the client asked for.
    wrong_binding: bool,
    /// Additional evidence to return (`Err`: fail), and the (nonce, key) it was asked for.
    additional: Option<Result<String, String>>,
    additional_asked: Vec<(String, Value)>,
}

impl Provider for TestProvider {
    fn tee(&self) -> &'static str {
        "sample"
    }

    fn evidence(&mut self, report_data: &[u8; 48]) -> Result<Value, TeeError> {
        self.seen.push(*report_data);
        let mut rd = *report_data;
        if self.wrong_binding {
            rd[0] ^= 1;
        }
        Ok(json!({"svn": "1", "report_data": STANDARD.encode(rd)}))
    }

    fn runtime_register(&mut self) -> Result<Option<Box<dyn RuntimeRegister>>, TeeError> {
        Ok(None)
    }

    fn describe(&self) -> Value {
        json!({"tee": "sample"})
    }

    fn insecure(&self) -> bool {
        true
    }

    fn additional_evidence(&mut self, nonce: &str, tee_pubkey: &Value) -> Result<String, TeeError> {
        // Asked before the primary evidence: nothing was signed yet in this handshake.
        assert_eq!(self.seen.len(), self.additional_asked.len());
        self.additional_asked
            .push((nonce.to_string(), tee_pubkey.clone()));
        match &self.additional {
            None => Ok(String::new()),
            Some(Ok(text)) => Ok(text.clone()),
            Some(Err(detail)) => Err(TeeError::Config {
                tee: "nvidia",
                detail: detail.clone(),
            }),
        }
    }
}

#[derive(Default)]
struct BrokerSession {
    nonce: String,
    key: Option<TeePubKey>,
    token: Option<String>,
    expired: bool,
}

#[derive(Default)]
struct Broker {
    sessions: HashMap<String, BrokerSession>,
    counter: u32,
    resources: HashMap<String, Vec<u8>>,
    deny: bool,
    /// Answer 401 (expired) to this many resource requests.
    expire_gets: u32,
    /// Answer 503 to this many auth requests.
    auth_503: u32,
    /// Errors to return from the transport for this many auth requests.
    auth_transport_errors: u32,
    auth_error_kind: Option<TransportErrorKind>,
    omit_cookie: bool,
    /// Answer /auth with this nonce instead of a well-formed one.
    nonce: Option<String>,
    /// Set this `kbs-session-id` value instead of `session-N`.
    cookie: Option<String>,
    /// Answer /attest with this token instead of a well-formed one.
    token: Option<String>,
    /// Put this `ear.trustworthiness-vector` (and `ear.status`) into cpu0 of the token.
    verdict: Option<(&'static str, Value)>,
    /// Answer a denial with this error body instead of Trustee's PolicyDeny.
    deny_body: Option<Vec<u8>>,
    /// Every problem the broker found with a request (must stay empty).
    complaints: Vec<String>,
    /// The `additional_evidence` strings received.
    additional_seen: Vec<String>,
}

fn error_body(variant: &str, detail: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "type": format!("https://github.com/confidential-containers/kbs/errors/{variant}"),
        "detail": detail,
    }))
    .unwrap()
}

fn fake_token(status: &str) -> String {
    token_with(json!({"ear.status": status}))
}

/// A JWT with `cpu0` as its only submodule (unsigned: the client never verifies it).
fn token_with(cpu0: Value) -> String {
    let part = |v: Value| URL_SAFE_NO_PAD.encode(v.to_string());
    format!(
        "{}.{}.{}",
        part(json!({"alg": "ES256", "typ": "JWT"})),
        part(json!({"submods": {"cpu0": cpu0}, "eat_profile": "tag:github.com,2023:veraison/ear"})),
        URL_SAFE_NO_PAD.encode([7u8; 64])
    )
}

impl Broker {
    fn complain(&mut self, what: String) -> Result<HttpResponse, TransportError> {
        self.complaints.push(what.clone());
        Ok(HttpResponse::new(401, error_body("InvalidRequest", &what)))
    }

    fn handle(&mut self, req: &FakeRequest) -> Result<HttpResponse, TransportError> {
        match (req.method, req.path.as_str()) {
            (Method::Post, "/kbs/v0/auth") => self.auth(req),
            (Method::Post, "/kbs/v0/attest") => self.attest(req),
            (Method::Get, path) if path.starts_with("/kbs/v0/resource/") => self.resource(req),
            _ => Ok(HttpResponse::new(
                404,
                error_body("InvalidRequestPath", &req.path),
            )),
        }
    }

    fn auth(&mut self, req: &FakeRequest) -> Result<HttpResponse, TransportError> {
        if self.auth_transport_errors > 0 {
            self.auth_transport_errors -= 1;
            return Err(TransportError::new(
                self.auth_error_kind.unwrap_or(TransportErrorKind::Connect),
                format!("{URL}/kbs/v0/auth"),
                "Connection Failed: Connect error: connection refused",
            ));
        }
        if self.auth_503 > 0 {
            self.auth_503 -= 1;
            return Ok(HttpResponse::new(503, b"busy".to_vec()));
        }
        let body = req.json();
        if body != json!({"version": "0.4.0", "tee": "sample", "extra-params": ""}) {
            return self.complain(format!("bad request {body}"));
        }
        if req.cookie.is_some() {
            return self.complain("auth with a cookie".into());
        }
        self.counter += 1;
        let cookie = self
            .cookie
            .clone()
            .unwrap_or_else(|| format!("session-{}", self.counter));
        // Base64 with '/', '+' and '=': must be echoed exactly.
        let nonce = self.nonce.clone().unwrap_or_else(|| {
            format!(
                "Dn/RSy3SMzL+nsKPkD5p6d9A91pHw5S8IiDW5WnB{:03}s=",
                self.counter
            )
        });
        self.sessions.insert(
            cookie.clone(),
            BrokerSession {
                nonce: nonce.clone(),
                ..Default::default()
            },
        );
        let answer = HttpResponse::new(
            200,
            serde_json::to_vec(&json!({"nonce": nonce, "extra-params": ""})).unwrap(),
        );
        if self.omit_cookie {
            return Ok(answer);
        }
        Ok(answer.with_cookie(format!("kbs-session-id={cookie}; Path=/kbs/v0; HttpOnly")))
    }

    fn attest(&mut self, req: &FakeRequest) -> Result<HttpResponse, TransportError> {
        let Some(cookie) = req.cookie.clone() else {
            return self.complain("attest without cookie".into());
        };
        let Some(nonce) = self.sessions.get(&cookie).map(|s| s.nonce.clone()) else {
            return self.complain(format!("unknown session {cookie}"));
        };
        let body = req.json();
        let mut top: Vec<&str> = body
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        top.sort_unstable();
        if top != ["init-data", "runtime-data", "tee-evidence"] || body["init-data"] != Value::Null
        {
            return self.complain(format!("bad attestation members {top:?}"));
        }
        if body["runtime-data"]["nonce"] != json!(nonce) {
            return self.complain(format!(
                "nonce not echoed: {}",
                body["runtime-data"]["nonce"]
            ));
        }
        // As Trustee: the primary evidence must bind the additional-evidence string exactly
        // as sent.
        let Some(additional) = body["tee-evidence"]["additional_evidence"].as_str() else {
            return self.complain("additional_evidence is not a string".into());
        };
        self.additional_seen.push(additional.to_string());
        let jwk = body["runtime-data"]["tee-pubkey"].clone();
        let expected = report_data(&nonce, &jwk, additional).unwrap();
        let claimed = STANDARD
            .decode(
                body["tee-evidence"]["primary_evidence"]["report_data"]
                    .as_str()
                    .unwrap(),
            )
            .unwrap();
        if claimed != expected {
            return Ok(HttpResponse::new(
                401,
                error_body(
                    "AttestationError",
                    "Attestation error: Verifier evaluate failed: sample report_data mismatch",
                ),
            ));
        }
        let key: TeePubKey = serde_json::from_value(jwk).unwrap();
        let token = match (&self.token, &self.verdict) {
            (Some(token), _) => token.clone(),
            (None, Some((status, vector))) => {
                token_with(json!({"ear.status": status, "ear.trustworthiness-vector": vector}))
            }
            (None, None) => fake_token("affirming"),
        };
        let session = self.sessions.get_mut(&cookie).unwrap();
        session.key = Some(key);
        session.token = Some(token.clone());
        Ok(HttpResponse::new(
            200,
            serde_json::to_vec(&json!({"token": token})).unwrap(),
        ))
    }

    fn resource(&mut self, req: &FakeRequest) -> Result<HttpResponse, TransportError> {
        let session = req.cookie.as_ref().and_then(|c| self.sessions.get_mut(c));
        let Some(session) = session else {
            return Ok(HttpResponse::new(
                401,
                error_body("TokenNotFound", "Attestation Token not found"),
            ));
        };
        if session.token.is_none() || session.token != req.bearer {
            return Ok(HttpResponse::new(
                401,
                error_body("TokenNotFound", "Attestation Token not found"),
            ));
        }
        if self.expire_gets > 0 {
            self.expire_gets -= 1;
            session.expired = true;
        }
        if session.expired {
            return Ok(HttpResponse::new(
                401,
                error_body("TokenVerifierError", "Token Verifier error: token expired"),
            ));
        }
        if self.deny {
            let body = self
                .deny_body
                .clone()
                .unwrap_or_else(|| error_body("PolicyDeny", "Access denied by policy"));
            return Ok(HttpResponse::new(401, body));
        }
        let key = session.key.clone().unwrap();
        let path = req.path.trim_start_matches("/kbs/v0/resource/");
        let Some(plain) = self.resources.get(path) else {
            return Ok(HttpResponse::new(
                401,
                error_body(
                    "PluginInternalError",
                    "Plugin internal error: resource not found",
                ),
            ));
        };
        let jwe = encrypt(&key, plain, &[]);
        Ok(HttpResponse::new(200, serde_json::to_vec(&jwe).unwrap()))
    }
}

const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

struct Harness {
    client: Client,
    broker: Arc<Mutex<Broker>>,
    log: super::fake::FakeLog,
    clock: ManualClock,
    provider: TestProvider,
    observer: RecordingObserver,
}

fn config() -> KbsConfig {
    let mut config = KbsConfig::new(URL);
    config.tries = 3;
    config.backoff = Backoff {
        initial: Duration::from_millis(1),
        max: Duration::from_millis(3),
    };
    config.total_timeout = Duration::from_secs(5);
    config
}

fn harness_with(config: KbsConfig, broker: Broker) -> Harness {
    let broker = Arc::new(Mutex::new(broker));
    let shared = Arc::clone(&broker);
    let (transport, log) = FakeTransport::new(URL, move |req: &FakeRequest| {
        shared.lock().unwrap().handle(req)
    });
    let clock = ManualClock::new();
    let client =
        Client::with_transport(config, Box::new(transport), Box::new(clock.clone())).unwrap();
    Harness {
        client,
        broker,
        log,
        clock,
        provider: TestProvider::default(),
        observer: RecordingObserver::default(),
    }
}

fn harness(broker: Broker) -> Harness {
    harness_with(config(), broker)
}

fn broker_with_secret() -> Broker {
    let mut broker = Broker::default();
    broker
        .resources
        .insert("default/keys/workspace".into(), SECRET.to_vec());
    broker
}

fn uri() -> ResourceUri {
    ResourceUri::parse("kbs:///default/keys/workspace").unwrap()
}

fn calls(h: &Harness) -> Vec<(Call, u32, Outcome, bool)> {
    h.observer
        .attempts
        .iter()
        .map(|a| (a.call, a.try_no, a.outcome.clone(), a.will_retry))
        .collect()
}

fn ok(call: Call) -> (Call, u32, Outcome, bool) {
    (call, 1, Outcome::Status(200), false)
}

#[test]
fn happy_path_ec() {
    let mut h = harness(broker_with_secret());
    let attested = h.client.attest(&mut h.provider, &mut h.observer).unwrap();
    let released = h
        .client
        .resource(&uri(), &mut h.provider, &mut h.observer)
        .unwrap();
    assert_eq!(released.bytes(), SECRET);
    assert_eq!(released.len(), 32);
    assert_eq!(released.uri(), "kbs:///default/keys/workspace");
    assert_eq!(
        calls(&h),
        [ok(Call::Auth), ok(Call::Attest), ok(Call::Resource)]
    );
    assert!(h.broker.lock().unwrap().complaints.is_empty());

    // The nonce is echoed exactly and the binding is what an auditor recomputes.
    assert_eq!(
        attested.nonce,
        "Dn/RSy3SMzL+nsKPkD5p6d9A91pHw5S8IiDW5WnB001s="
    );
    let recomputed = report_data(&attested.nonce, &attested.tee_pubkey, "").unwrap();
    assert_eq!(attested.report_data, hex::encode(recomputed));
    assert_eq!(h.provider.seen, vec![recomputed]);
    assert_eq!(
        attested.evidence["report_data"],
        json!(STANDARD.encode(recomputed))
    );
    assert_eq!(attested.status.as_deref(), Some("affirming"));
    assert_eq!(attested.tee, "sample");
    assert!(attested.insecure);
    assert_eq!(attested.broker, URL);
    assert_eq!(h.client.attested(), Some(&attested));

    // What went over the wire: the JWK exactly as the Attested record says, with no extra
    // field; the cookie sent back on attest and resource; the bearer token on resource.
    let requests = h.log.requests();
    assert_eq!(requests.len(), 3);
    assert_eq!(requests[0].cookie, None);
    assert_eq!(requests[1].cookie.as_deref(), Some("session-1"));
    let sent = requests[1].json();
    assert_eq!(sent["runtime-data"]["tee-pubkey"], attested.tee_pubkey);
    assert_eq!(
        attested.tee_pubkey.as_object().unwrap().len(),
        5,
        "{}",
        attested.tee_pubkey
    );
    assert_eq!(sent["runtime-data"]["nonce"], json!(attested.nonce));
    assert_eq!(sent["tee-evidence"]["primary_evidence"], attested.evidence);
    assert_eq!(requests[2].path, "/kbs/v0/resource/default/keys/workspace");
    assert_eq!(requests[2].cookie.as_deref(), Some("session-1"));
    assert_eq!(
        requests[2].bearer.as_deref(),
        Some(fake_token("affirming").as_str())
    );
    // Timeouts passed to the transport are what is left of the total.
    assert!(requests.iter().all(|r| r.timeout == Duration::from_secs(5)));
}

/// The RSA test key (2048 bits, from the vectors): generating RSA-3072 takes tens of
/// seconds unoptimised; [`rsa_generation_makes_a_3072_bit_key`] covers generation.
fn premade_keys(wrap: KeyWrap) -> Result<TeeKey, KbsError> {
    match wrap {
        KeyWrap::RsaOaep256 => Ok(TeeKey::from_rsa(rsa_test_key())),
        KeyWrap::EcdhEsA256kw => TeeKey::generate(wrap),
    }
}

#[test]
fn happy_path_rsa() {
    let mut config = config();
    config.key_wrap = KeyWrap::RsaOaep256;
    let mut h = harness_with(config, broker_with_secret());
    h.client = h.client.with_key_generator(premade_keys);
    let released = h
        .client
        .resource(&uri(), &mut h.provider, &mut h.observer)
        .unwrap();
    assert_eq!(released.bytes(), SECRET);
    let attested = h.client.attested().unwrap();
    assert_eq!(attested.tee_pubkey, TeeKey::from_rsa(rsa_test_key()).jwk());
    let sent = h.log.requests()[1].json();
    assert_eq!(sent["runtime-data"]["tee-pubkey"], attested.tee_pubkey);
    assert_eq!(
        attested.report_data,
        hex::encode(report_data(&attested.nonce, &attested.tee_pubkey, "").unwrap())
    );
    assert_eq!(
        calls(&h),
        [ok(Call::Auth), ok(Call::Attest), ok(Call::Resource)]
    );
    assert!(h.broker.lock().unwrap().complaints.is_empty());
}

/// Fast enough in a debug build because the workspace builds `num-bigint-dig` optimised
/// (`[profile.dev.package.num-bigint-dig]`).
#[test]
fn rsa_generation_makes_a_3072_bit_key() {
    let key = TeeKey::generate(KeyWrap::RsaOaep256).unwrap();
    let jwk = key.jwk();
    assert_eq!(
        URL_SAFE_NO_PAD
            .decode(jwk["n"].as_str().unwrap())
            .unwrap()
            .len(),
        384
    );
    let jwe = encrypt(key.public(), SECRET, &[]);
    assert_eq!(open(&jwe, &key).unwrap(), SECRET);
}

#[test]
fn resource_without_session_attests_first_and_reuses_the_session() {
    let mut h = harness(broker_with_secret());
    let first = h
        .client
        .resource(&uri(), &mut h.provider, &mut h.observer)
        .unwrap();
    let second = h
        .client
        .resource(&uri(), &mut h.provider, &mut h.observer)
        .unwrap();
    assert_eq!(first.bytes(), second.bytes());
    assert_eq!(
        calls(&h),
        [
            ok(Call::Auth),
            ok(Call::Attest),
            ok(Call::Resource),
            ok(Call::Resource)
        ]
    );
    assert!(h
        .observer
        .attempts
        .iter()
        .all(|a| a.resource.as_deref() == Some("kbs:///default/keys/workspace")));
}

#[test]
fn expired_session_runs_a_new_handshake() {
    let mut broker = broker_with_secret();
    broker.expire_gets = 1;
    let mut h = harness(broker);
    let first = h.client.attest(&mut h.provider, &mut h.observer).unwrap();
    let released = h
        .client
        .resource(&uri(), &mut h.provider, &mut h.observer)
        .unwrap();
    assert_eq!(released.bytes(), SECRET);
    assert_eq!(
        calls(&h),
        [
            ok(Call::Auth),
            ok(Call::Attest),
            (Call::Resource, 1, Outcome::Status(401), false),
            ok(Call::Auth),
            ok(Call::Attest),
            ok(Call::Resource),
        ]
    );
    // A fresh nonce, a fresh key, the new cookie.
    let second = h.client.attested().unwrap().clone();
    assert_ne!(first.nonce, second.nonce);
    assert_ne!(first.tee_pubkey, second.tee_pubkey);
    let last = h.log.requests().pop().unwrap();
    assert_eq!(last.cookie.as_deref(), Some("session-2"));
}

/// A resource the broker does not have is answered 401 (Trustee: `PluginInternalError`
/// after its policy allowed the token), like an expired token: the client asks at most
/// [`MAX_RESOURCE_REQUESTS`] times in all, also when a session from `attest` is reused for
/// the first request (it used to ask 4 times then).
#[test]
fn a_missing_resource_is_asked_for_three_times_in_all() {
    let mut h = harness(broker_with_secret());
    h.client.attest(&mut h.provider, &mut h.observer).unwrap();
    let missing = ResourceUri::parse("kbs:///default/keys/missing").unwrap();
    let err = h
        .client
        .resource(&missing, &mut h.provider, &mut h.observer)
        .unwrap_err();
    assert!(
        matches!(
            err,
            KbsError::Unauthorized {
                requests: 3,
                handshakes: 2,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(
        err.to_string(),
        "the key broker refused kbs:///default/keys/missing 3 times in all, with 2 handshake(s) (HTTP 401, PluginInternalError: Plugin internal error: resource not found); the broker's token (unverified token claims) says cpu0: ear.status = affirming, no trust vector; check that the resource exists on the broker (a missing resource is refused like this too), its resource policy, and the token lifetime"
    );
    let requests = h.log.requests();
    let gets = requests.iter().filter(|r| r.method == Method::Get).count();
    let auths = requests.iter().filter(|r| r.path == "/kbs/v0/auth").count();
    assert_eq!(MAX_RESOURCE_REQUESTS, 3);
    assert_eq!((auths, gets), (3, 3));
    // The last request is a GET: no handshake is run that no request uses.
    assert_eq!(requests.last().unwrap().method, Method::Get);
}

#[test]
fn at_most_three_handshakes_per_resource() {
    let mut broker = broker_with_secret();
    broker.expire_gets = 100;
    let mut h = harness(broker);
    let err = h
        .client
        .resource(&uri(), &mut h.provider, &mut h.observer)
        .unwrap_err();
    assert!(
        matches!(err, KbsError::Unauthorized { handshakes: 3, .. }),
        "{err}"
    );
    assert_eq!(
        err.to_string(),
        "the key broker refused kbs:///default/keys/workspace 3 times in all, with 3 handshake(s) (HTTP 401, TokenVerifierError: Token Verifier error: token expired); the broker's token (unverified token claims) says cpu0: ear.status = affirming, no trust vector; check that the resource exists on the broker (a missing resource is refused like this too), its resource policy, and the token lifetime"
    );
    let auths = h
        .log
        .requests()
        .iter()
        .filter(|r| r.path == "/kbs/v0/auth")
        .count();
    let gets = h
        .log
        .requests()
        .iter()
        .filter(|r| r.method == Method::Get)
        .count();
    assert_eq!((auths, gets), (3, 3));
}

#[test]
fn policy_deny_is_final_and_explained() {
    let mut broker = broker_with_secret();
    broker.deny = true;
    let mut h = harness(broker);
    let err = h
        .client
        .resource(
            &ResourceUri::parse("kbs:///a/b/c").unwrap(),
            &mut h.provider,
            &mut h.observer,
        )
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "the key broker refused the evidence for kbs:///a/b/c (PolicyDeny: Access denied by policy); the broker's token (unverified token claims) says cpu0: ear.status = affirming, no trust vector; check the broker's resource policy and reference values"
    );
    // One handshake, one request: a denial is not retried.
    assert_eq!(h.log.requests().len(), 3);
}

/// A bare PolicyDeny names no check; the message says what the token the client holds says:
/// its status and trust vector, in words.
#[test]
fn policy_deny_shows_the_tokens_trust_vector() {
    let mut broker = broker_with_secret();
    broker.deny = true;
    broker.verdict = Some((
        "warning",
        json!({"executables": 33, "hardware": 2, "configuration": 0}),
    ));
    let mut h = harness(broker);
    let err = h
        .client
        .resource(&uri(), &mut h.provider, &mut h.observer)
        .unwrap_err();
    match &err {
        KbsError::PolicyDeny { verdict, .. } => assert_eq!(
            verdict,
            "; the broker's token (unverified token claims) says cpu0: ear.status = warning, trust vector executables=33 (unrecognized run-time: a reference value did not match), hardware=2 (genuine)"
        ),
        other => panic!("expected PolicyDeny, got {other:?}"),
    }
    assert!(
        err.to_string().contains("kbs:///default/keys/workspace"),
        "{err}"
    );
}

/// Broker-supplied text in an error is escaped (ANSI and bidi/format characters visibly),
/// and an over-long type or detail is not shown at all.
#[test]
fn broker_error_text_is_escaped_and_bounded() {
    let deny = |body: Vec<u8>| {
        let mut broker = broker_with_secret();
        broker.deny = true;
        broker.deny_body = Some(body);
        let mut h = harness(broker);
        h.client
            .resource(&uri(), &mut h.provider, &mut h.observer)
            .unwrap_err()
            .to_string()
    };
    let text = deny(error_body(
        "TokenVerifierError",
        "bad \u{1b}[2J\u{202e}gnp.exe token",
    ));
    assert!(
        text.contains("TokenVerifierError: bad \\u{1b}[2J\\u{202e}gnp.exe token"),
        "{text}"
    );
    assert!(
        !text.contains('\u{1b}') && !text.contains('\u{202e}'),
        "{text}"
    );
    let raw = serde_json::to_vec(&json!({
        "type": "https://github.com/confidential-containers/kbs/errors/TokenVerifierError",
        "detail": "x\u{1b}[31my\u{2066}z",
    }))
    .unwrap();
    let text = deny(raw);
    assert!(text.contains("x\\u{1b}[31my\\u{2066}z"), "{text}");
    assert!(
        !text.contains('\u{1b}') && !text.contains('\u{2066}'),
        "{text}"
    );
    let text = deny(error_body(
        "TokenVerifierError",
        &"d".repeat(MAX_ERROR_DETAIL + 1),
    ));
    assert!(
        text.contains("TokenVerifierError: a detail of 4097 bytes (over 4096; not shown)"),
        "{text}"
    );
    let text = deny(error_body(&"V".repeat(MAX_ERROR_TYPE), "detail"));
    assert!(
        text.contains("unknown: an error type of 310 bytes (over 256; not shown)"),
        "{text}"
    );
}

/// What the broker sends is bounded before anything is bound, sent back or recorded: a
/// nonce over 1 KiB (or with control or bidi characters) is refused before any evidence is
/// made, a cookie over 4 KiB before /attest, a token over 1 MiB before its claims are read.
#[test]
fn oversized_or_unsafe_broker_fields_are_refused() {
    let refused = |broker: Broker| {
        let mut h = harness(broker);
        let err = h
            .client
            .attest(&mut h.provider, &mut h.observer)
            .unwrap_err();
        let paths: Vec<String> = h.log.requests().into_iter().map(|r| r.path).collect();
        (err.to_string(), h.provider.seen.len(), paths)
    };
    let auth_only = vec!["/kbs/v0/auth".to_string()];

    let mut broker = broker_with_secret();
    broker.nonce = Some("n".repeat(MAX_NONCE));
    let mut h = harness(broker);
    h.client.attest(&mut h.provider, &mut h.observer).unwrap();
    assert_eq!(h.client.attested().unwrap().nonce.len(), MAX_NONCE);

    let mut broker = broker_with_secret();
    broker.nonce = Some("n".repeat(MAX_NONCE + 1));
    let (text, evidence, paths) = refused(broker);
    assert!(
        text.contains(
            "answered the auth call with a nonce of 1025 bytes (at most 1024 are accepted"
        ),
        "{text}"
    );
    assert_eq!((evidence, &paths), (0, &auth_only));

    for nonce in ["abc\u{202e}def", "abc\u{1b}[0mdef", "abc\u{2069}"] {
        let mut broker = broker_with_secret();
        broker.nonce = Some(nonce.to_string());
        let (text, evidence, paths) = refused(broker);
        assert!(
            text.contains("a nonce with control or bidi/format characters (abc\\u{"),
            "{text}"
        );
        assert!(!text.contains(nonce), "{text}");
        assert_eq!((evidence, &paths), (0, &auth_only));
    }

    let mut broker = broker_with_secret();
    broker.cookie = Some("c".repeat(MAX_COOKIE + 1));
    let (text, evidence, paths) = refused(broker);
    assert!(
        text.contains("a kbs-session-id cookie of 4097 bytes (at most 4096 are accepted)"),
        "{text}"
    );
    assert_eq!((evidence, &paths), (0, &auth_only));

    let mut broker = broker_with_secret();
    broker.token = Some(format!("{}.{}.x", "a".repeat(MAX_TOKEN), "b"));
    let (text, _, _) = refused(broker);
    assert!(
        text.contains(&format!(
            "a token of {} bytes (at most {MAX_TOKEN} are accepted)",
            MAX_TOKEN + 4
        )),
        "{text}"
    );
}

/// Token claims go to the audit log: control and bidi/format characters in them are
/// escaped before they are kept.
#[test]
fn token_claims_are_escaped_before_they_are_recorded() {
    let mut broker = broker_with_secret();
    broker.token = Some(token_with(json!({
        "ear.status": "affirming\u{202e}",
        "x\u{1b}[1m": ["\u{2066}y"],
    })));
    let mut h = harness(broker);
    let attested = h.client.attest(&mut h.provider, &mut h.observer).unwrap();
    assert_eq!(attested.status.as_deref(), Some("affirming\\u{202e}"));
    let cpu0 = &attested.claims["submods"]["cpu0"];
    assert_eq!(cpu0["x\\u{1b}[1m"], json!(["\\u{2066}y"]));
    let recorded = serde_json::to_string(&attested).unwrap();
    assert!(
        !recorded.contains('\u{202e}') && !recorded.contains('\u{2066}'),
        "{recorded}"
    );
}

#[test]
fn rejected_evidence_is_explained() {
    let mut h = harness(broker_with_secret());
    h.provider.wrong_binding = true;
    let err = h
        .client
        .attest(&mut h.provider, &mut h.observer)
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "the key broker at https://kbs.test:8080 rejected the sample evidence (AttestationError: Attestation error: Verifier evaluate failed: sample report_data mismatch); check the broker's attestation policy and reference values, and that attestation.tee matches this VM"
    );
    assert!(h.client.attested().is_none());
}

#[test]
fn transport_failures_are_retried_then_reported() {
    let mut broker = broker_with_secret();
    broker.auth_transport_errors = 100;
    let mut h = harness(broker);
    let err = h
        .client
        .attest(&mut h.provider, &mut h.observer)
        .unwrap_err();
    let failed = Outcome::Error(format!(
        "{URL}/kbs/v0/auth: Connection Failed: Connect error: connection refused"
    ));
    assert_eq!(
        calls(&h),
        [
            (Call::Auth, 1, failed.clone(), true),
            (Call::Auth, 2, failed.clone(), true),
            (Call::Auth, 3, failed, false),
        ]
    );
    // The two tries left share the 5 s budget with the last one: a third each.
    assert_eq!(
        h.clock.sleeps(),
        [
            Duration::from_nanos(1_666_666_666),
            Duration::from_nanos(1_666_666_667)
        ]
    );
    assert!(
        matches!(err, KbsError::Unreachable { tries: 3, .. }),
        "{err}"
    );
    let text = err.to_string();
    assert!(text.contains("https://kbs.test:8080"), "{text}");
    assert!(
        text.contains("check attestation.kbs and the network"),
        "{text}"
    );
}

#[test]
fn connection_failures_are_spread_over_the_whole_timeout() {
    // The PID 1 boot before its network is up: every connect fails at once. With the policy's
    // tries = 3 and timeout = "60s" the tries must not be spent in a second.
    let mut broker = broker_with_secret();
    broker.auth_transport_errors = 100;
    let mut config = config();
    config.tries = 3;
    config.total_timeout = Duration::from_secs(60);
    config.backoff = Backoff::default();
    let mut h = harness_with(config.clone(), broker);
    let err = h
        .client
        .attest(&mut h.provider, &mut h.observer)
        .unwrap_err();
    assert!(
        matches!(err, KbsError::Unreachable { tries: 3, .. }),
        "{err}"
    );
    assert_eq!(
        h.clock.sleeps(),
        [Duration::from_secs(20), Duration::from_secs(20)]
    );
    // The last try started at 40 s and had the last 20 s to connect.
    let timeouts: Vec<Duration> = h.log.requests().iter().map(|r| r.timeout).collect();
    assert_eq!(
        timeouts,
        [
            Duration::from_secs(60),
            Duration::from_secs(40),
            Duration::from_secs(20)
        ]
    );

    // A broker that answers from the third try on is reached at 40 s.
    let mut broker = broker_with_secret();
    broker.auth_transport_errors = 2;
    let mut h = harness_with(config, broker);
    h.client.attest(&mut h.provider, &mut h.observer).unwrap();
    assert_eq!(h.clock.elapsed(), Duration::from_secs(40));
}

#[test]
fn server_errors_are_retried() {
    let mut broker = broker_with_secret();
    broker.auth_503 = 2;
    let mut h = harness(broker);
    h.client.attest(&mut h.provider, &mut h.observer).unwrap();
    assert_eq!(
        calls(&h),
        [
            (Call::Auth, 1, Outcome::Status(503), true),
            (Call::Auth, 2, Outcome::Status(503), true),
            (Call::Auth, 3, Outcome::Status(200), false),
            ok(Call::Attest),
        ]
    );

    let mut broker = broker_with_secret();
    broker.auth_503 = 100;
    let mut h = harness(broker);
    let err = h
        .client
        .attest(&mut h.provider, &mut h.observer)
        .unwrap_err();
    assert!(
        matches!(
            err,
            KbsError::ServerError {
                status: 503,
                tries: 3,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(h.observer.attempts.len(), 3);
    assert!(!h.observer.attempts[2].will_retry);
}

#[test]
fn tls_failures_are_not_retried_and_name_the_ca() {
    let mut broker = broker_with_secret();
    broker.auth_transport_errors = 100;
    broker.auth_error_kind = Some(TransportErrorKind::Tls);
    let mut config = config();
    config.ca_path = Some("/etc/cvm-warden/kbs-ca.pem".into());
    let mut h = harness_with(config, broker);
    let err = h
        .client
        .attest(&mut h.provider, &mut h.observer)
        .unwrap_err();
    assert_eq!(h.observer.attempts.len(), 1);
    assert!(!h.observer.attempts[0].will_retry);
    let text = err.to_string();
    assert!(text.contains("/etc/cvm-warden/kbs-ca.pem"), "{text}");
    assert!(text.contains("attestation.kbs_ca"), "{text}");
}

#[test]
fn the_total_timeout_is_respected() {
    let mut broker = broker_with_secret();
    broker.auth_transport_errors = 100;
    broker.auth_error_kind = Some(TransportErrorKind::Timeout);
    let broker = Arc::new(Mutex::new(broker));
    let shared = Arc::clone(&broker);
    let clock = ManualClock::new();
    let ticking = clock.clone();
    // Each try "takes" 40 ms of the 100 ms budget.
    let (transport, log) = FakeTransport::new(URL, move |req: &FakeRequest| {
        ticking.advance(Duration::from_millis(40));
        shared.lock().unwrap().handle(req)
    });
    let mut config = config();
    config.tries = 10;
    config.total_timeout = Duration::from_millis(100);
    config.backoff = Backoff {
        initial: Duration::from_millis(5),
        max: Duration::from_millis(5),
    };
    let mut client =
        Client::with_transport(config, Box::new(transport), Box::new(clock.clone())).unwrap();
    let mut observer = RecordingObserver::default();
    let err = client
        .attest(&mut TestProvider::default(), &mut observer)
        .unwrap_err();
    // Try 1: 0 → 40; the 9 tries left share the 60 ms left (6 ms each, more than the 5 ms
    // backoff): sleep to 46; try 2: → 86, 14 ms left for 8 tries is less than the backoff, so
    // 5 ms: sleep to 91; try 3 gets the last 9 ms, ends at 131: no time for a fourth.
    assert!(matches!(err, KbsError::Timeout { .. }), "{err}");
    assert!(
        err.to_string().contains("did not finish within 100ms"),
        "{err}"
    );
    assert!(observer.attempts.len() < 10);
    assert!(!observer.attempts.last().unwrap().will_retry);
    assert!(
        clock.elapsed() <= Duration::from_millis(140),
        "{:?}",
        clock.elapsed()
    );
    // Each request was given only what was left of the total.
    let timeouts: Vec<Duration> = log.requests().iter().map(|r| r.timeout).collect();
    assert_eq!(
        timeouts,
        [
            Duration::from_millis(100),
            Duration::from_millis(54),
            Duration::from_millis(9)
        ]
    );
}

#[test]
fn no_try_starts_after_the_total_timeout() {
    let clock = ManualClock::new();
    let ticking = clock.clone();
    let (transport, log) = FakeTransport::new(URL, move |_req: &FakeRequest| {
        ticking.advance(Duration::from_millis(200));
        Ok(HttpResponse::new(503, Vec::new()))
    });
    let mut config = config();
    config.total_timeout = Duration::from_millis(100);
    let mut client = Client::with_transport(config, Box::new(transport), Box::new(clock)).unwrap();
    let mut observer = RecordingObserver::default();
    let err = client
        .attest(&mut TestProvider::default(), &mut observer)
        .unwrap_err();
    assert!(matches!(err, KbsError::Timeout { tries: 1, .. }), "{err}");
    assert_eq!(log.requests().len(), 1);
    assert_eq!(observer.attempts.len(), 1);
    assert!(!observer.attempts[0].will_retry);
}

#[test]
fn not_found_names_the_path() {
    let (transport, _log) = FakeTransport::new(URL, |req: &FakeRequest| {
        Ok(HttpResponse::new(
            404,
            error_body("InvalidRequestPath", &req.path),
        ))
    });
    let mut client =
        Client::with_transport(config(), Box::new(transport), Box::new(ManualClock::new()))
            .unwrap();
    let err = client
        .attest(
            &mut TestProvider::default(),
            &mut RecordingObserver::default(),
        )
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "the key broker at https://kbs.test:8080 has no /kbs/v0/auth (HTTP 404: InvalidRequestPath: /kbs/v0/auth); check the resource URI segments and that attestation.kbs points at a KBS 0.4.0 broker"
    );
}

#[test]
fn missing_cookie_and_empty_nonce_are_protocol_errors() {
    let mut broker = broker_with_secret();
    broker.omit_cookie = true;
    let mut h = harness(broker);
    let err = h
        .client
        .attest(&mut h.provider, &mut h.observer)
        .unwrap_err();
    assert!(
        err.to_string().contains("no kbs-session-id cookie"),
        "{err}"
    );

    let (transport, _log) = FakeTransport::new(URL, |_req: &FakeRequest| {
        Ok(
            HttpResponse::new(200, br#"{"nonce":"","extra-params":""}"#.to_vec())
                .with_cookie("kbs-session-id=x"),
        )
    });
    let mut client =
        Client::with_transport(config(), Box::new(transport), Box::new(ManualClock::new()))
            .unwrap();
    let err = client
        .attest(
            &mut TestProvider::default(),
            &mut RecordingObserver::default(),
        )
        .unwrap_err();
    assert!(err.to_string().contains("an empty nonce"), "{err}");
}

#[test]
fn secrets_stay_out_of_debug_and_errors() {
    let mut h = harness(broker_with_secret());
    let released = h
        .client
        .resource(&uri(), &mut h.provider, &mut h.observer)
        .unwrap();
    let token = fake_token("affirming");
    let debug = format!("{:?} {:?} {:?}", h.client, released, h.observer);
    assert!(!debug.contains(&token), "{debug}");
    assert!(!debug.contains("session-1"), "{debug}");
    assert!(!debug.contains(&hex::encode(SECRET)), "{debug}");
    assert!(!debug.contains("0123456789abcdef"), "{debug}");
    assert!(!debug.contains(&format!("{:?}", SECRET)), "{debug}");
    assert!(debug.contains(&released.sha256_hex()), "{debug}");
    let audit = serde_json::to_string(h.client.attested().unwrap()).unwrap();
    assert!(
        !audit.contains(&token) && !audit.contains("session-1"),
        "{audit}"
    );
}

#[test]
fn set_cookie_parsing() {
    let response = HttpResponse::new(200, Vec::new())
        .with_cookie("other=1; Path=/")
        .with_cookie("kbs-session-id=\"abc\"; Expires=Wed, 21 Oct 2025 07:28:00 GMT; HttpOnly");
    assert_eq!(response.session_cookie().unwrap().as_str(), "abc");
    assert!(HttpResponse::new(200, Vec::new())
        .with_cookie("kbs-session-id=; Path=/")
        .session_cookie()
        .is_none());
    let debug = format!("{response:?}");
    assert!(!debug.contains("abc"), "{debug}");
}

#[test]
fn every_provider_tee_is_a_protocol_tee() {
    use std::str::FromStr;
    for tee in ["snp", "tdx", "tpm", "az-snp-vtpm", "az-tdx-vtpm", "sample"] {
        let parsed = kbs_types::Tee::from_str(tee).unwrap();
        assert_eq!(serde_json::to_value(parsed).unwrap(), json!(tee));
    }
    assert!(kbs_types::Tee::from_str("bogus").is_err());
}

#[test]
fn backoff_is_exponential_and_capped() {
    let b = Backoff {
        initial: Duration::from_millis(100),
        max: Duration::from_secs(1),
    };
    let delays: Vec<u128> = (1..=6).map(|n| b.delay(n).as_millis()).collect();
    assert_eq!(delays, [100, 200, 400, 800, 1000, 1000]);
    assert_eq!(b.delay(100), Duration::from_secs(1));
}

// ---------------------------------------------------------------------------------------
// configuration and the real transport

#[test]
fn http_is_refused_without_insecure_http() {
    let mut config = KbsConfig::new("http://kbs.test:8080");
    let err = Client::new(config.clone()).unwrap_err().to_string();
    assert!(err.contains("plain http://"), "{err}");
    assert!(err.contains("insecure_http = true"), "{err}");
    let (transport, _log) = FakeTransport::new(URL, |_req: &FakeRequest| {
        Ok(HttpResponse::new(500, Vec::new()))
    });
    assert!(Client::with_transport(
        config.clone(),
        Box::new(transport),
        Box::new(ManualClock::new())
    )
    .is_err());
    config.insecure_http = true;
    assert!(Client::new(config).is_ok());
}

#[test]
fn broker_urls_are_read_by_the_url_crate() {
    assert_eq!(
        transport::check_url("https://[::1]:8080/", false).unwrap(),
        "https://[::1]:8080"
    );
    assert_eq!(
        transport::check_url("https://kbs.test:8999/kbs/", false).unwrap(),
        "https://kbs.test:8999/kbs"
    );
    let err = |url: &str| transport::check_url(url, false).unwrap_err().to_string();
    // Credentials are refused and never echoed.
    let e = err("https://admin:hunter2@kbs.test");
    assert!(e.contains("credentials"), "{e}");
    assert!(!e.contains("hunter2") && !e.contains("admin"), "{e}");
    // What the URL standard forgives is refused: no slashes, a third slash, uppercase.
    assert!(err("https:kbs.test").contains("must start with https://"));
    assert!(err("HTTPS://kbs.test").contains("must start with https://"));
    assert!(err("https:///kbs.test").contains("has no host"));
    assert!(err("https://kbs.test\n").contains("must not contain spaces"));
    for bad in [
        "https://kbs.test:0",
        "https://kbs.test:65536",
        "https://[::1",
        "https://10.1",
        "https://kbs.test\\x",
    ] {
        assert!(
            err(bad).contains("is not a broker URL"),
            "{bad}: {}",
            err(bad)
        );
    }
}

#[test]
fn configuration_is_checked() {
    let err = |config: KbsConfig| Client::new(config).unwrap_err().to_string();
    assert!(err(KbsConfig::new("https://kbs.test")).contains("no CA is configured"));
    assert!(err(KbsConfig::new("ftp://kbs.test")).contains("must start with https://"));
    assert!(err(KbsConfig::new("https:///x")).contains("has no host"));
    assert!(err(KbsConfig::new("https://user@kbs.test")).contains("credentials"));
    let mut bad_ca = KbsConfig::new("https://kbs.test");
    bad_ca.ca_pem = Some(b"not a certificate".to_vec());
    bad_ca.ca_path = Some("/etc/ca.pem".into());
    assert_eq!(
        err(bad_ca),
        "key broker CA /etc/ca.pem: holds no PEM CERTIFICATE block; attestation.kbs_ca must hold the PEM certificate(s) the broker's TLS certificate chains to"
    );
    for tries in [0, MAX_TRIES + 1] {
        let mut config = KbsConfig::new("http://kbs.test");
        config.insecure_http = true;
        config.tries = tries;
        assert!(err(config).contains("tries"));
    }
    let mut config = KbsConfig::new("http://kbs.test");
    config.insecure_http = true;
    config.total_timeout = Duration::ZERO;
    assert!(err(config).contains("total timeout"));
}

const CA: &[u8] = include_bytes!("testdata/ca.pem");
const OTHER_CA: &[u8] = include_bytes!("testdata/other-ca.pem");

/// Serves one HTTP exchange per connection on loopback (TLS when `tls` is set), answering
/// `answer` to every request; returns the port and the raw requests it read.
fn serve(tls: bool, connections: usize, answer: &'static str) -> (u16, Arc<Mutex<Vec<String>>>) {
    use rustls_pki_types::pem::PemObject;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = Arc::clone(&seen);
    let config = tls.then(|| {
        let chain: Vec<_> =
            rustls_pki_types::CertificateDer::pem_slice_iter(include_bytes!("testdata/server.pem"))
                .map(Result::unwrap)
                .collect();
        let key =
            rustls_pki_types::PrivateKeyDer::from_pem_slice(include_bytes!("testdata/server.key"))
                .unwrap();
        Arc::new(
            rustls::ServerConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap(),
        )
    });
    std::thread::spawn(move || {
        for _ in 0..connections {
            let Ok((tcp, _)) = listener.accept() else {
                return;
            };
            tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut stream: Box<dyn ReadWrite> = match &config {
                Some(config) => {
                    let conn = rustls::ServerConnection::new(Arc::clone(config)).unwrap();
                    Box::new(rustls::StreamOwned::new(conn, tcp))
                }
                None => Box::new(tcp),
            };
            let mut request = Vec::new();
            let mut buf = [0u8; 4096];
            loop {
                match stream.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => request.extend_from_slice(&buf[..n]),
                }
                let text = String::from_utf8_lossy(&request);
                if let Some(end) = text.find("\r\n\r\n") {
                    let length = text
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse::<usize>().unwrap())
                        })
                        .unwrap_or(0);
                    if request.len() >= end + 4 + length {
                        break;
                    }
                }
            }
            if request.is_empty() {
                continue; // the client gave up (e.g. TLS refused)
            }
            record
                .lock()
                .unwrap()
                .push(String::from_utf8_lossy(&request).into_owned());
            let _ = stream.write_all(answer.as_bytes());
            let _ = stream.flush();
        }
    });
    (port, seen)
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

const CHALLENGE_ANSWER: &str = "HTTP/1.1 200 OK\r\nSet-Cookie: kbs-session-id=live-1; Path=/kbs/v0\r\nContent-Type: application/json\r\nContent-Length: 38\r\nConnection: close\r\n\r\n{\"nonce\":\"bm9uY2U=\",\"extra-params\":\"\"}";

#[test]
fn real_transport_speaks_tls_pinned_to_the_ca() {
    let (port, seen) = serve(true, 1, CHALLENGE_ANSWER);
    let url = format!("https://localhost:{port}");
    let mut transport = HttpTransport::new(
        &url,
        Some(CA),
        "testdata/ca.pem",
        false,
        Duration::from_secs(5),
        Duration::from_secs(5),
    )
    .unwrap();
    let answer = transport
        .post_json(
            "/kbs/v0/auth",
            br#"{"a":1}"#,
            Some("c00kie"),
            Duration::from_secs(5),
        )
        .unwrap();
    assert_eq!(answer.status, 200);
    assert_eq!(answer.session_cookie().unwrap().as_str(), "live-1");
    assert_eq!(answer.body, br#"{"nonce":"bm9uY2U=","extra-params":""}"#);
    let request = seen.lock().unwrap()[0].clone();
    assert!(
        request.starts_with("POST /kbs/v0/auth HTTP/1.1\r\n"),
        "{request}"
    );
    assert!(
        request.contains("Cookie: kbs-session-id=c00kie\r\n"),
        "{request}"
    );
    assert!(
        request
            .to_ascii_lowercase()
            .contains("content-type: application/json\r\n"),
        "{request}"
    );
    assert!(request.ends_with("\r\n\r\n{\"a\":1}"), "{request}");
}

#[test]
fn real_transport_refuses_a_certificate_from_another_ca() {
    let (port, _seen) = serve(true, 1, CHALLENGE_ANSWER);
    let mut config = KbsConfig::new(format!("https://localhost:{port}"));
    config.ca_pem = Some(OTHER_CA.to_vec());
    config.ca_path = Some("/etc/cvm-warden/other-ca.pem".into());
    config.connect_timeout = Duration::from_secs(5);
    config.read_timeout = Duration::from_secs(5);
    let mut client = Client::new(config).unwrap();
    let mut observer = RecordingObserver::default();
    let err = client
        .attest(&mut TestProvider::default(), &mut observer)
        .unwrap_err();
    assert!(matches!(err, KbsError::Tls { .. }), "{err:?}");
    assert!(
        err.to_string().contains("/etc/cvm-warden/other-ca.pem"),
        "{err}"
    );
    assert_eq!(observer.attempts.len(), 1, "TLS failures are not retried");
    let Outcome::Error(text) = &observer.attempts[0].outcome else {
        panic!()
    };
    assert!(text.to_lowercase().contains("certificate"), "{text}");
}

#[test]
fn real_transport_plain_http_and_unreachable() {
    let answer = "HTTP/1.1 401 Unauthorized\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}";
    let (port, seen) = serve(false, 1, answer);
    let mut transport = HttpTransport::new(
        &format!("http://127.0.0.1:{port}/"),
        None,
        "-",
        true,
        Duration::from_secs(5),
        Duration::from_secs(5),
    )
    .unwrap();
    assert_eq!(transport.base_url(), format!("http://127.0.0.1:{port}"));
    let answer = transport
        .get(
            "/kbs/v0/resource/a/b/c",
            Some("s"),
            Some("tok"),
            Duration::from_secs(5),
        )
        .unwrap();
    assert_eq!(
        (answer.status, answer.body.as_slice()),
        (401, b"{}".as_slice())
    );
    let request = seen.lock().unwrap()[0].clone();
    assert!(
        request.starts_with("GET /kbs/v0/resource/a/b/c HTTP/1.1\r\n"),
        "{request}"
    );
    assert!(
        request.contains("Authorization: Bearer tok\r\n"),
        "{request}"
    );

    // A port nobody listens on: a connect error, retried.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let error = transport_to(port)
        .post_json("/kbs/v0/auth", b"{}", None, Duration::from_secs(5))
        .unwrap_err();
    assert_eq!(error.kind, TransportErrorKind::Connect, "{error}");
    assert!(error.kind.retryable());
    assert!(error.url.ends_with("/kbs/v0/auth"));
}

fn transport_to(port: u16) -> HttpTransport {
    HttpTransport::new(
        &format!("http://127.0.0.1:{port}"),
        None,
        "-",
        true,
        Duration::from_secs(2),
        Duration::from_secs(2),
    )
    .unwrap()
}

#[test]
fn additional_evidence_is_sent_and_bound_by_the_primary_report_data() {
    let additional = r#"{"nvidia":{"device_evidence_list":[{"arch":"HOPPER","uuid":"GPU-1","evidence":"AAAA","certificate":"BBBB"}]}}"#;
    let mut h = harness(broker_with_secret());
    h.provider.additional = Some(Ok(additional.to_string()));
    let attested = h.client.attest(&mut h.provider, &mut h.observer).unwrap();
    assert!(h.broker.lock().unwrap().complaints.is_empty());
    // Sent exactly, recorded for auditors, and asked for with the handshake's nonce and key.
    assert_eq!(h.broker.lock().unwrap().additional_seen, [additional]);
    assert_eq!(attested.additional_evidence, additional);
    assert_eq!(
        h.provider.additional_asked,
        [(attested.nonce.clone(), attested.tee_pubkey.clone())]
    );
    // The primary evidence binds it: report_data covers the additional string.
    let bound = report_data(&attested.nonce, &attested.tee_pubkey, additional).unwrap();
    assert_eq!(h.provider.seen, vec![bound]);
    assert_ne!(
        bound,
        report_data(&attested.nonce, &attested.tee_pubkey, "").unwrap()
    );
    assert_eq!(attested.report_data, hex::encode(bound));
}

#[test]
fn failing_additional_evidence_stops_the_handshake_before_the_primary_evidence() {
    let mut h = harness(broker_with_secret());
    h.provider.additional = Some(Err("GPU 0 (GPU-1): confidential computing is off".into()));
    let error = h
        .client
        .attest(&mut h.provider, &mut h.observer)
        .unwrap_err();
    assert!(matches!(error, KbsError::Evidence { .. }), "{error:?}");
    assert!(
        crate::report::error_chain(&error).contains("confidential computing is off"),
        "{}",
        crate::report::error_chain(&error)
    );
    assert!(h.provider.seen.is_empty());
    assert_eq!(calls(&h), [ok(Call::Auth)]);
}

#[test]
fn a_simulated_gpu_is_bound_through_the_whole_handshake() {
    use crate::tee::nvidia::{fake::FakeNvml, GpuProvider, GpuRequirements, Gpus};
    let nvml = FakeNvml::load(std::path::Path::new("tests/data/nvidia-sim/gpu.json")).unwrap();
    let calls_made = nvml.calls();
    let mut gpus = Gpus::new(
        Ok(Box::new(nvml)),
        GpuRequirements {
            required: true,
            count: Some(1),
            arch: vec![],
            min_driver: None,
            min_vbios: None,
            allow_devtools: false,
            simulated: true,
            rims: Vec::new(),
            verify_at: None,
        },
    );
    gpus.precheck().unwrap();
    let mut provider = GpuProvider::new(Box::new(TestProvider::default()), gpus);
    let mut h = harness(broker_with_secret());
    let attested = h.client.attest(&mut provider, &mut h.observer).unwrap();
    assert!(h.broker.lock().unwrap().complaints.is_empty());
    let sent: cvm_warden_verify::schema::AdditionalEvidence =
        serde_json::from_str(&attested.additional_evidence).unwrap();
    let report = STANDARD
        .decode(&sent.nvidia.device_evidence_list[0].evidence)
        .unwrap();
    // The GPU nonce is §4's: the first 32 bytes of SHA-384(JCS{nonce, tee-pubkey}).
    let device_nonce =
        cvm_warden_verify::binding::device_nonce(&attested.nonce, &attested.tee_pubkey).unwrap();
    assert_eq!(&report[4..36], &device_nonce);
    assert!(calls_made.lock().unwrap().contains(&format!(
        "attestation_report(0, {})",
        hex::encode(device_nonce)
    )));
    assert_eq!(
        attested.report_data,
        hex::encode(
            report_data(
                &attested.nonce,
                &attested.tee_pubkey,
                &attested.additional_evidence
            )
            .unwrap()
        )
    );
}
