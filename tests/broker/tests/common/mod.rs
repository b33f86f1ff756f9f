//! A minimal KBS client for the broker's own tests: HTTP through ureq, the binding string
//! written out by hand (not through the broker's JCS code), a tiny JWE decryptor, and a
//! synthetic TPM quote encoder. Independent of the broker's internals on purpose.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::OnceLock;

use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce, Tag};
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use p256::elliptic_curve::sec1::ToEncodedPoint;
use rand_core::OsRng;
use rsa::pkcs8::EncodePublicKey;
use rsa::traits::PublicKeyParts;
use rsa::{Oaep, RsaPrivateKey};
use serde_json::{json, Value};
use sha2::{Digest, Sha256, Sha384};

pub struct Reply {
    pub status: u16,
    pub body: Vec<u8>,
    pub set_cookie: Option<String>,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    /// The `kbs-session-id=<id>` pair of the Set-Cookie header.
    pub fn cookie(&self) -> String {
        self.set_cookie
            .as_deref()
            .expect("Set-Cookie")
            .split(';')
            .next()
            .unwrap()
            .to_string()
    }

    /// Assert a Trustee-shaped error.
    pub fn assert_error(&self, status: u16, variant: &str) {
        assert_eq!(
            self.status,
            status,
            "body: {}",
            String::from_utf8_lossy(&self.body)
        );
        let body = self.json();
        assert_eq!(
            body["type"],
            format!("https://github.com/confidential-containers/kbs/errors/{variant}"),
            "{body}"
        );
        assert!(body["detail"].is_string(), "{body}");
        assert_eq!(body.as_object().unwrap().len(), 2, "{body}");
    }
}

pub struct Client {
    pub base: String,
    agent: ureq::Agent,
}

impl Client {
    pub fn new(base: &str) -> Self {
        Self::with_agent(base, ureq::AgentBuilder::new().build())
    }

    pub fn with_agent(base: &str, agent: ureq::Agent) -> Self {
        Client {
            base: base.to_string(),
            agent,
        }
    }

    fn finish(result: Result<ureq::Response, ureq::Error>) -> Reply {
        let response = match result {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("transport error: {e}"),
        };
        let status = response.status();
        let set_cookie = response.header("set-cookie").map(str::to_string);
        let mut body = Vec::new();
        std::io::Read::read_to_end(&mut response.into_reader(), &mut body).unwrap();
        Reply {
            status,
            body,
            set_cookie,
        }
    }

    pub fn post(&self, path: &str, body: &str, cookie: Option<&str>) -> Reply {
        let mut req = self
            .agent
            .post(&format!("{}{path}", self.base))
            .set("Content-Type", "application/json");
        if let Some(c) = cookie {
            req = req.set("Cookie", c);
        }
        Self::finish(req.send_string(body))
    }

    pub fn get(&self, path: &str, cookie: Option<&str>, bearer: Option<&str>) -> Reply {
        let mut req = self.agent.get(&format!("{}{path}", self.base));
        if let Some(c) = cookie {
            req = req.set("Cookie", c);
        }
        if let Some(t) = bearer {
            req = req.set("Authorization", &format!("Bearer {t}"));
        }
        Self::finish(req.call())
    }

    /// `/auth`; returns (cookie pair, nonce).
    pub fn auth(&self, tee: &str) -> (String, String) {
        let reply = self.post(
            "/kbs/v0/auth",
            &json!({"version": "0.4.0", "tee": tee, "extra-params": ""}).to_string(),
            None,
        );
        assert_eq!(
            reply.status,
            200,
            "{}",
            String::from_utf8_lossy(&reply.body)
        );
        let challenge = reply.json();
        (
            reply.cookie(),
            challenge["nonce"].as_str().unwrap().to_string(),
        )
    }
}

/// The client's ephemeral key.
pub enum TeeKey {
    Ec(p256::SecretKey),
    Rsa(Box<RsaPrivateKey>),
}

impl TeeKey {
    pub fn ec() -> Self {
        TeeKey::Ec(p256::SecretKey::random(&mut OsRng))
    }

    pub fn rsa() -> Self {
        TeeKey::Rsa(Box::new(test_rsa_key().clone()))
    }

    /// The JWK with exactly the protocol's fields.
    pub fn jwk(&self) -> Value {
        match self {
            TeeKey::Ec(secret) => {
                let point = secret.public_key().to_encoded_point(false);
                json!({
                    "kty": "EC", "crv": "P-256", "alg": "ECDH-ES+A256KW",
                    "x": URL_SAFE_NO_PAD.encode(point.x().unwrap()),
                    "y": URL_SAFE_NO_PAD.encode(point.y().unwrap()),
                })
            }
            TeeKey::Rsa(key) => json!({
                "kty": "RSA", "alg": "RSA-OAEP-256",
                "n": URL_SAFE_NO_PAD.encode(key.n().to_bytes_be()),
                "e": URL_SAFE_NO_PAD.encode(key.e().to_bytes_be()),
            }),
        }
    }

    /// The hashed string, written out by hand from KBS-PROTOCOL.md (keys in sorted order).
    pub fn binding_text(&self, nonce: &str, jwk: &Value) -> String {
        // Sorted keys; every value is a plain string without escapes.
        let obj = jwk.as_object().unwrap();
        let mut keys: Vec<&String> = obj.keys().collect();
        keys.sort();
        let fields: Vec<String> = keys
            .iter()
            .map(|k| format!("\"{k}\":\"{}\"", obj[*k].as_str().unwrap()))
            .collect();
        format!(
            "{{\"additional-evidence\":\"\",\"nonce\":\"{nonce}\",\"tee-pubkey\":{{{}}}}}",
            fields.join(",")
        )
    }

    pub fn report_data(&self, nonce: &str, jwk: &Value) -> [u8; 48] {
        Sha384::digest(self.binding_text(nonce, jwk).as_bytes()).into()
    }

    /// Decrypt a flattened JWE answer.
    pub fn decrypt(&self, jwe: &Value) -> Result<Vec<u8>, String> {
        let field = |n: &str| -> Vec<u8> {
            URL_SAFE_NO_PAD
                .decode(jwe[n].as_str().unwrap_or_else(|| panic!("JWE has no {n}")))
                .unwrap()
        };
        let protected = jwe["protected"].as_str().unwrap();
        let header: Value = serde_json::from_slice(&field("protected")).unwrap();
        assert_eq!(header["enc"], "A256GCM");
        let encrypted_key = field("encrypted_key");
        let cek: Vec<u8> = match self {
            TeeKey::Ec(secret) => {
                assert_eq!(header["alg"], "ECDH-ES+A256KW");
                assert_eq!(header["epk"]["kty"], "EC");
                assert_eq!(header["epk"]["crv"], "P-256");
                let coord = |n: &str| {
                    URL_SAFE_NO_PAD
                        .decode(header["epk"][n].as_str().unwrap())
                        .unwrap()
                };
                let sec1 = [&[0x04][..], &coord("x"), &coord("y")].concat();
                let epk = p256::PublicKey::from_sec1_bytes(&sec1).unwrap();
                let z = p256::ecdh::diffie_hellman(secret.to_nonzero_scalar(), epk.as_affine());
                let alg = b"ECDH-ES+A256KW";
                let mut kdf = Sha256::new();
                kdf.update([0, 0, 0, 1]);
                kdf.update(z.raw_secret_bytes());
                kdf.update((alg.len() as u32).to_be_bytes());
                kdf.update(alg);
                kdf.update([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
                let kek: [u8; 32] = kdf.finalize().into();
                let mut cek = vec![0u8; 32];
                aes_kw::KekAes256::from(kek)
                    .unwrap(&encrypted_key, &mut cek)
                    .map_err(|e| format!("key unwrap: {e}"))?;
                cek
            }
            TeeKey::Rsa(key) => {
                assert_eq!(header["alg"], "RSA-OAEP-256");
                key.decrypt(Oaep::new::<Sha256>(), &encrypted_key)
                    .map_err(|e| format!("OAEP: {e}"))?
            }
        };
        let mut data = field("ciphertext");
        let cipher = Aes256Gcm::new_from_slice(&cek).unwrap();
        cipher
            .decrypt_in_place_detached(
                Nonce::from_slice(&field("iv")),
                protected.as_bytes(),
                &mut data,
                Tag::from_slice(&field("tag")),
            )
            .map_err(|_| "AES-GCM open failed".to_string())?;
        Ok(data)
    }
}

pub fn attestation(nonce: &str, jwk: &Value, evidence: Value) -> String {
    json!({
        "runtime-data": {"nonce": nonce, "tee-pubkey": jwk},
        "tee-evidence": {"primary_evidence": evidence, "additional_evidence": ""},
        "init-data": null,
    })
    .to_string()
}

pub fn sample_evidence(report_data: &[u8]) -> Value {
    json!({"svn": "1", "report_data": STANDARD.encode(report_data)})
}

/// One RSA key per test process (key generation is slow in debug builds).
pub fn test_rsa_key() -> &'static RsaPrivateKey {
    static KEY: OnceLock<RsaPrivateKey> = OnceLock::new();
    KEY.get_or_init(|| RsaPrivateKey::new(&mut OsRng, 2048).unwrap())
}

/// A second key (an "untrusted" AK).
pub fn other_rsa_key() -> &'static RsaPrivateKey {
    static KEY: OnceLock<RsaPrivateKey> = OnceLock::new();
    KEY.get_or_init(|| RsaPrivateKey::new(&mut OsRng, 2048).unwrap())
}

/// `ak_public` of a key: base64 std of its SPKI DER.
pub fn ak_public(key: &RsaPrivateKey) -> String {
    STANDARD.encode(key.to_public_key().to_public_key_der().unwrap().as_bytes())
}

/// TPM evidence signed by `ak`: a TPMS_ATTEST quote of sha256:0-23 over `pcrs`, with
/// `qualifying` as extraData, marshalled per TPM 2.0 Part 2 (written here independently).
pub fn tpm_evidence(ak: &RsaPrivateKey, qualifying: &[u8], pcrs: &[[u8; 32]; 24]) -> Value {
    use rsa::signature::{SignatureEncoding, Signer};
    let mut digest = Sha256::new();
    for p in pcrs {
        digest.update(p);
    }
    let pcr_digest = digest.finalize();
    let mut m = Vec::new();
    m.extend_from_slice(&0xff54_4347u32.to_be_bytes());
    m.extend_from_slice(&0x8018u16.to_be_bytes());
    let signer_name = [0x00, 0x0b]
        .iter()
        .chain([0x42u8; 32].iter())
        .copied()
        .collect::<Vec<u8>>();
    m.extend_from_slice(&(signer_name.len() as u16).to_be_bytes());
    m.extend_from_slice(&signer_name);
    m.extend_from_slice(&(qualifying.len() as u16).to_be_bytes());
    m.extend_from_slice(qualifying);
    m.extend_from_slice(&123_456u64.to_be_bytes()); // clock
    m.extend_from_slice(&1u32.to_be_bytes()); // resetCount
    m.extend_from_slice(&0u32.to_be_bytes()); // restartCount
    m.push(1); // safe
    m.extend_from_slice(&0x2019_1023_0016_3636u64.to_be_bytes()); // firmwareVersion
    m.extend_from_slice(&1u32.to_be_bytes()); // one selection
    m.extend_from_slice(&0x000bu16.to_be_bytes()); // sha256
    m.extend_from_slice(&[3, 0xff, 0xff, 0xff]); // PCRs 0-23
    m.extend_from_slice(&32u16.to_be_bytes());
    m.extend_from_slice(&pcr_digest);
    let signing_key = rsa::pkcs1v15::SigningKey::<Sha256>::new(ak.clone());
    let sig = signing_key.sign(&m).to_vec();
    let mut tpmt = vec![0x00, 0x14, 0x00, 0x0b];
    tpmt.extend_from_slice(&(sig.len() as u16).to_be_bytes());
    tpmt.extend_from_slice(&sig);
    json!({
        "ak_public": ak_public(ak),
        "tpm_quote": {
            "signature": STANDARD.encode(tpmt),
            "message": STANDARD.encode(m),
            "pcrs": pcrs.iter().map(hex::encode).collect::<Vec<_>>(),
        }
    })
}

/// The payload of a token, unverified.
pub fn token_claims(token: &str) -> Value {
    let part = token.split('.').nth(1).unwrap();
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).unwrap()).unwrap()
}
