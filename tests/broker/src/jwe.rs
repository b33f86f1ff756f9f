//! The resource answer: a flattened-JSON JWE encrypted to the token's tee-pubkey
//! (KBS-PROTOCOL.md, "Resource answer"). Content is always A256GCM with the ASCII of the
//! `protected` string as additional data.

use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use p256::elliptic_curve::sec1::ToEncodedPoint;
use rand_core::{OsRng, RngCore};
use rsa::{BigUint, Oaep, RsaPublicKey};
use serde::Serialize;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::binding::TeePubKey;

/// `ECDH-ES+A256KW`.
pub const ECDH_ES_A256KW: &str = "ECDH-ES+A256KW";
/// `RSA-OAEP-256`.
pub const RSA_OAEP_256: &str = "RSA-OAEP-256";

/// The flattened JSON serialisation, fields in Trustee's order.
#[derive(Debug, Serialize)]
pub struct JweResponse {
    /// base64url of the protected header JSON.
    pub protected: String,
    /// base64url of the wrapped content key.
    pub encrypted_key: String,
    /// base64url of the 12-byte GCM nonce.
    pub iv: String,
    /// base64url of the ciphertext.
    pub ciphertext: String,
    /// base64url of the 16-byte GCM tag.
    pub tag: String,
}

/// Concat KDF (RFC 7518 §4.6.2) with SHA-256 for a 256-bit key, no PartyU/PartyV info.
pub fn concat_kdf_a256kw(z: &[u8]) -> Zeroizing<[u8; 32]> {
    let mut hasher = Sha256::new();
    hasher.update(1u32.to_be_bytes());
    hasher.update(z);
    hasher.update((ECDH_ES_A256KW.len() as u32).to_be_bytes());
    hasher.update(ECDH_ES_A256KW.as_bytes());
    hasher.update(0u32.to_be_bytes());
    hasher.update(0u32.to_be_bytes());
    hasher.update(256u32.to_be_bytes());
    Zeroizing::new(hasher.finalize().into())
}

/// Encrypt `plaintext` to `key`. `tamper` flips one ciphertext bit (fault injection).
pub fn encrypt(key: &TeePubKey, plaintext: &[u8], tamper: bool) -> Result<JweResponse, String> {
    let mut cek = Zeroizing::new([0u8; 32]);
    OsRng.fill_bytes(cek.as_mut());
    let (header, encrypted_key) = match key {
        TeePubKey::Ec { crv, alg, x, y } => {
            if crv != "P-256" || alg != ECDH_ES_A256KW {
                return Err(format!(
                    "curve {crv} with algorithm {alg} is not supported by the test broker \
                     (use P-256 with {ECDH_ES_A256KW})"
                ));
            }
            wrap_ecdh_p256(x, y, &cek)?
        }
        TeePubKey::Rsa { alg, n, e } => {
            if alg != RSA_OAEP_256 {
                return Err(format!(
                    "RSA algorithm {alg} is not supported by the test broker (use {RSA_OAEP_256})"
                ));
            }
            wrap_rsa_oaep(n, e, &cek)?
        }
        TeePubKey::Akp { alg, .. } => {
            return Err(format!(
                "AKP algorithm {alg} is not supported by the test broker"
            ))
        }
    };
    let protected = URL_SAFE_NO_PAD.encode(header);
    let mut iv = [0u8; 12];
    OsRng.fill_bytes(&mut iv);
    let cipher = Aes256Gcm::new_from_slice(cek.as_ref()).map_err(|e| e.to_string())?;
    let mut buffer = Zeroizing::new(plaintext.to_vec());
    let tag = cipher
        .encrypt_in_place_detached(Nonce::from_slice(&iv), protected.as_bytes(), &mut buffer)
        .map_err(|_| "AES-256-GCM encryption failed".to_string())?;
    let mut ciphertext = buffer.to_vec();
    let mut tag = tag.to_vec();
    if tamper {
        match ciphertext.first_mut() {
            Some(byte) => *byte ^= 0x01,
            None => tag[0] ^= 0x01,
        }
    }
    Ok(JweResponse {
        protected,
        encrypted_key: URL_SAFE_NO_PAD.encode(encrypted_key),
        iv: URL_SAFE_NO_PAD.encode(iv),
        ciphertext: URL_SAFE_NO_PAD.encode(&ciphertext),
        tag: URL_SAFE_NO_PAD.encode(&tag),
    })
}

fn decode_coord(name: &str, text: &str) -> Result<[u8; 32], String> {
    URL_SAFE_NO_PAD
        .decode(text)
        .ok()
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
        .ok_or_else(|| format!("tee-pubkey {name} is not 32 bytes of base64url"))
}

fn wrap_ecdh_p256(x: &str, y: &str, cek: &[u8; 32]) -> Result<(String, Vec<u8>), String> {
    let mut sec1 = Vec::with_capacity(65);
    sec1.push(0x04);
    sec1.extend_from_slice(&decode_coord("x", x)?);
    sec1.extend_from_slice(&decode_coord("y", y)?);
    let client = p256::PublicKey::from_sec1_bytes(&sec1)
        .map_err(|_| "tee-pubkey is not a point on P-256".to_string())?;
    let ephemeral = p256::ecdh::EphemeralSecret::random(&mut OsRng);
    let shared = ephemeral.diffie_hellman(&client);
    let kek = concat_kdf_a256kw(shared.raw_secret_bytes().as_slice());
    let mut wrapped = vec![0u8; 40];
    aes_kw::KekAes256::from(*kek)
        .wrap(cek, &mut wrapped)
        .map_err(|e| format!("AES key wrap failed: {e}"))?;
    let epk = ephemeral.public_key().to_encoded_point(false);
    let (Some(ex), Some(ey)) = (epk.x(), epk.y()) else {
        return Err("ephemeral key has no affine coordinates".to_string());
    };
    // Written by hand so the byte order of the header is fixed (Trustee's serde order).
    let header = format!(
        r#"{{"alg":"{ECDH_ES_A256KW}","enc":"A256GCM","epk":{{"crv":"P-256","kty":"EC","x":"{}","y":"{}"}}}}"#,
        URL_SAFE_NO_PAD.encode(ex),
        URL_SAFE_NO_PAD.encode(ey)
    );
    Ok((header, wrapped))
}

fn wrap_rsa_oaep(n: &str, e: &str, cek: &[u8; 32]) -> Result<(String, Vec<u8>), String> {
    let n = URL_SAFE_NO_PAD
        .decode(n)
        .map_err(|_| "tee-pubkey n is not base64url".to_string())?;
    let e = URL_SAFE_NO_PAD
        .decode(e)
        .map_err(|_| "tee-pubkey e is not base64url".to_string())?;
    let key = RsaPublicKey::new(BigUint::from_bytes_be(&n), BigUint::from_bytes_be(&e))
        .map_err(|err| format!("tee-pubkey is not a usable RSA key: {err}"))?;
    let wrapped = key
        .encrypt(&mut OsRng, Oaep::new::<Sha256>(), cek)
        .map_err(|err| format!("RSA-OAEP-256 encryption of the content key failed: {err}"))?;
    Ok((
        format!(r#"{{"alg":"{RSA_OAEP_256}","enc":"A256GCM"}}"#),
        wrapped,
    ))
}
