//! Offline verification of TPM 2.0 quotes.
//!
//! [`verify_quote`] checks, in this order and failing closed at the first problem:
//!
//! 1. the signature is RSASSA-PKCS1-v1_5 with SHA-256 over the `TPMS_ATTEST` bytes, made
//!    by the attestation key (AK) given as an RSA public key;
//! 2. the `TPMS_ATTEST` parses completely: `TPM_GENERATED_VALUE` magic, `TPM_ST_ATTEST_QUOTE`
//!    type, and no bytes left over;
//! 3. when PCR values are given, the quote's PCR digest is SHA-256 over the selected SHA-256
//!    bank PCR values, in ascending PCR order.
//!
//! A PCR the quote does not select is not covered by its signature, whatever value was
//! given for it: [`VerifiedQuote::pcrs`] lists the selected ones only, and a caller that
//! relies on a PCR must check [`VerifiedQuote::pcr_selection`] (`audit verify` requires
//! exactly `sha256:0-23`).
//!
//! No TPM software stack is used, on purpose: the TSS marshalling of `TPMS_ATTEST` and
//! `TPMT_SIGNATURE` is small and fixed by the TPM 2.0 specification (Part 2, Structures),
//! and the verifier must run on an auditor's machine that has no `libtss2` and no TPM.
//!
//! Only the quote is checked. Whether the AK belongs to the platform (for example through
//! the HCL report's `HCLAkPub`), whether the nonce in `extraData` is fresh, and which PCR
//! values are acceptable are decisions for the caller, which gets the parsed fields in
//! [`VerifiedQuote`].

use std::collections::BTreeMap;

use base64::Engine;
use rsa::pkcs1::DecodeRsaPublicKey;
use rsa::pkcs1v15::{Signature, VerifyingKey};
use rsa::pkcs8::DecodePublicKey;
use rsa::signature::Verifier;
use rsa::traits::PublicKeyParts;
use rsa::RsaPublicKey;
use serde::Serialize;
use sha2::{Digest, Sha256};

/// `TPM_GENERATED_VALUE`: every structure a TPM signs starts with it.
pub const TPM_GENERATED_VALUE: u32 = 0xFF54_4347;
/// `TPM_ST_ATTEST_QUOTE`: the attestation structure type of a quote.
pub const TPM_ST_ATTEST_QUOTE: u16 = 0x8018;
/// `TPM_ALG_RSASSA`.
pub const TPM_ALG_RSASSA: u16 = 0x0014;
/// `TPM_ALG_SHA256`.
pub const TPM_ALG_SHA256: u16 = 0x000B;
/// Size of one SHA-256 PCR value, in bytes.
pub const PCR_LEN: usize = 32;
/// The PCR cvm-warden extends its measurements into (SHA-256 bank).
pub const APP_PCR: u8 = 15;
/// Number of PCRs in the quoted bank (every quote covers sha256:0-23).
pub const PCR_COUNT: usize = 24;

/// The quote's qualifying data for a 48-byte `report_data`: its first 32 bytes (Trustee
/// rejects the full 48).
pub fn qualifying_data(report_data: &[u8; 48]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(&report_data[..32]);
    out
}

/// The two names of a TPM attestation key, from its SubjectPublicKeyInfo DER: its
/// fingerprint `sha256:<hex of SHA-256(DER)>` (short, for messages and comparisons) and the
/// standard base64 (with padding) of the DER — the exact string a Trustee broker's
/// `trusted_aks` reference value holds and the `tpm` evidence's `ak_public` carries.
pub fn ak_names(spki_der: &[u8]) -> (String, String) {
    (
        format!("sha256:{}", hex::encode(Sha256::digest(spki_der))),
        base64::engine::general_purpose::STANDARD.encode(spki_der),
    )
}

/// Why a TPM quote did not verify.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TpmError {
    /// The AK public key is neither SubjectPublicKeyInfo nor PKCS#1, in PEM or DER.
    #[error(
        "cannot read the ak public key; pass an rsa SubjectPublicKeyInfo (pem or der) or a \
         pkcs#1 RSA PUBLIC KEY pem"
    )]
    AkKey(#[source] rsa::pkcs8::spki::Error),
    /// The signature is not a raw RSA signature of the AK's size nor a well-formed
    /// `TPMT_SIGNATURE`.
    #[error(
        "cannot read the quote signature ({len} bytes): {reason}; pass the raw rsa signature \
         (as long as the ak modulus) or a marshalled TPMT_SIGNATURE"
    )]
    SignatureFormat {
        /// Size of the signature given.
        len: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// The `TPMT_SIGNATURE` uses a scheme this verifier does not support.
    #[error(
        "unsupported quote signature scheme: sigAlg 0x{sig_alg:04x}, hashAlg 0x{hash_alg:04x}; \
         only rsassa (0x0014) with sha256 (0x000b) is supported, quote with that scheme"
    )]
    SignatureScheme {
        /// `sigAlg` of the signature.
        sig_alg: u16,
        /// `hashAlg` of the signature.
        hash_alg: u16,
    },
    /// The RSA signature does not verify over the quote with the AK.
    #[error(
        "quote signature does not verify with the ak (rsassa-pkcs1-v1_5, sha256); check that \
         the ak, the TPMS_ATTEST bytes and the signature belong together and are unmodified"
    )]
    Signature(#[source] rsa::signature::Error),
    /// The `TPMS_ATTEST` ends inside a field.
    #[error(
        "TPMS_ATTEST is truncated in field {field}: needs {need} bytes at offset {offset}, \
         {have} left; pass the complete quote message"
    )]
    Truncated {
        /// The field being read.
        field: &'static str,
        /// Offset of the field.
        offset: usize,
        /// Bytes the field needs.
        need: usize,
        /// Bytes left.
        have: usize,
    },
    /// Bytes follow the `TPMS_ATTEST`.
    #[error(
        "TPMS_ATTEST has {count} trailing bytes after pcrDigest; pass exactly the signed \
         quote message"
    )]
    TrailingBytes {
        /// How many bytes are left over.
        count: usize,
    },
    /// The magic is not `TPM_GENERATED_VALUE`.
    #[error(
        "TPMS_ATTEST magic is 0x{found:08x}, expected 0xff544347 (TPM_GENERATED_VALUE); \
         the message was not produced by a tpm"
    )]
    Magic {
        /// The magic found.
        found: u32,
    },
    /// The attestation type is not `TPM_ST_ATTEST_QUOTE`.
    #[error(
        "TPMS_ATTEST type is 0x{found:04x}, expected 0x8018 (TPM_ST_ATTEST_QUOTE); pass a \
         quote, not another attestation structure"
    )]
    AttestType {
        /// The type found.
        found: u16,
    },
    /// The PCR values are not whole SHA-256 values.
    #[error(
        "pcr values are {len} bytes, not a multiple of 32; pass sha-256 pcr values \
         concatenated, pcr 0 first"
    )]
    PcrsLength {
        /// Size of the PCR values given.
        len: usize,
    },
    /// The quote selects PCRs of a bank other than SHA-256 while PCR values were given.
    #[error(
        "quote selects pcrs of hash algorithm {hash} (0x{alg:04x}), but only sha-256 pcr \
         values can be checked; quote the sha256 bank only, or verify without pcr values"
    )]
    PcrBank {
        /// Name of the hash algorithm.
        hash: String,
        /// Its TPM algorithm id.
        alg: u16,
    },
    /// The quote selects a PCR whose value was not given.
    #[error(
        "quote selects pcr {index} but only {available} pcr values were given; pass all \
         selected pcr values"
    )]
    PcrMissing {
        /// The selected PCR.
        index: u32,
        /// How many PCR values were given.
        available: usize,
    },
    /// The PCR values do not hash to the quote's PCR digest.
    #[error(
        "pcr values do not match the quote: pcrDigest is {quoted}, sha-256 over the selected \
         pcr values is {computed}; the pcr values are not the ones the tpm quoted"
    )]
    PcrDigest {
        /// The digest in the quote (hex).
        quoted: String,
        /// The digest computed from the values given (hex).
        computed: String,
    },
}

/// One `TPMS_PCR_SELECTION` of the quote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PcrSelection {
    /// Hash algorithm of the bank: `sha1`, `sha256`, `sha384`, `sha512`, or the id in hex.
    pub hash: String,
    /// TPM algorithm id of the bank.
    #[serde(skip)]
    pub alg: u16,
    /// The selected PCR indices, ascending.
    pub pcrs: Vec<u32>,
}

/// The fields of a verified quote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VerifiedQuote {
    /// Always `true`: a quote that did not verify is an error.
    pub verified: bool,
    /// `magic`, hex.
    pub magic: String,
    /// `type`, hex.
    #[serde(rename = "type")]
    pub attest_type: String,
    /// `qualifiedSigner` (the AK's qualified name), hex.
    pub qualified_signer: String,
    /// `extraData` (the nonce the quote was made with), hex.
    pub extra_data: String,
    /// `clockInfo.clock`, milliseconds.
    pub clock: u64,
    /// `clockInfo.resetCount`.
    pub reset_count: u32,
    /// `clockInfo.restartCount`.
    pub restart_count: u32,
    /// `clockInfo.safe`.
    pub safe: bool,
    /// `firmwareVersion`.
    pub firmware_version: u64,
    /// The PCR selection the quote covers.
    pub pcr_selection: Vec<PcrSelection>,
    /// `pcrDigest`, hex.
    pub pcr_digest: String,
    /// Whether PCR values were given and matched `pcrDigest`.
    pub pcrs_checked: bool,
    /// The PCR values the quote covers (the selected SHA-256 PCRs), by index, hex. Values
    /// given for PCRs the quote does not select are left out: nothing vouches for them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pcrs: Option<BTreeMap<u32, String>>,
}

/// Name of a TPM hash algorithm id, or the id in hex.
fn hash_name(alg: u16) -> String {
    match alg {
        0x0004 => "sha1".to_string(),
        TPM_ALG_SHA256 => "sha256".to_string(),
        0x000C => "sha384".to_string(),
        0x000D => "sha512".to_string(),
        0x0012 => "sm3_256".to_string(),
        other => format!("0x{other:04x}"),
    }
}

/// Reads an AK public key: SPKI PEM/DER, or PKCS#1 PEM/DER.
fn read_ak(ak: &[u8]) -> Result<RsaPublicKey, TpmError> {
    if let Ok(text) = std::str::from_utf8(ak) {
        let text = text.trim();
        if text.contains("-----BEGIN RSA PUBLIC KEY-----") {
            if let Ok(key) = RsaPublicKey::from_pkcs1_pem(text) {
                return Ok(key);
            }
        }
        if text.starts_with("-----BEGIN") {
            return RsaPublicKey::from_public_key_pem(text).map_err(TpmError::AkKey);
        }
    }
    match RsaPublicKey::from_public_key_der(ak) {
        Ok(key) => Ok(key),
        Err(err) => RsaPublicKey::from_pkcs1_der(ak).map_err(|_| TpmError::AkKey(err)),
    }
}

/// Returns the raw RSA signature: `sig` itself when it is as long as the modulus,
/// otherwise the signature inside a marshalled `TPMT_SIGNATURE`.
fn raw_signature(sig: &[u8], modulus_len: usize) -> Result<&[u8], TpmError> {
    if sig.len() == modulus_len {
        return Ok(sig);
    }
    let format = |reason: &str| TpmError::SignatureFormat {
        len: sig.len(),
        reason: reason.to_string(),
    };
    let (Some(alg), Some(hash)) = (sig.get(0..2), sig.get(2..4)) else {
        return Err(format("too short for a TPMT_SIGNATURE header"));
    };
    let sig_alg = u16::from_be_bytes([alg[0], alg[1]]);
    let hash_alg = u16::from_be_bytes([hash[0], hash[1]]);
    if sig_alg != TPM_ALG_RSASSA || hash_alg != TPM_ALG_SHA256 {
        return Err(TpmError::SignatureScheme { sig_alg, hash_alg });
    }
    let Some(size) = sig.get(4..6) else {
        return Err(format("TPMT_SIGNATURE ends before the signature size"));
    };
    let size = usize::from(u16::from_be_bytes([size[0], size[1]]));
    let body = sig.get(6..).unwrap_or_default();
    if body.len() != size {
        return Err(format(&format!(
            "TPMT_SIGNATURE announces {size} signature bytes but {} follow",
            body.len()
        )));
    }
    Ok(body)
}

/// A big-endian reader that names the field it fails in.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, field: &'static str, need: usize) -> Result<&'a [u8], TpmError> {
        let have = self.buf.len().saturating_sub(self.pos);
        match self.buf.get(self.pos..).and_then(|rest| rest.get(..need)) {
            Some(bytes) => {
                self.pos += need;
                Ok(bytes)
            }
            None => Err(TpmError::Truncated {
                field,
                offset: self.pos,
                need,
                have,
            }),
        }
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], TpmError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(field, N)?);
        Ok(out)
    }

    fn u8(&mut self, field: &'static str) -> Result<u8, TpmError> {
        Ok(self.array::<1>(field)?[0])
    }

    fn u16(&mut self, field: &'static str) -> Result<u16, TpmError> {
        self.array(field).map(u16::from_be_bytes)
    }

    fn u32(&mut self, field: &'static str) -> Result<u32, TpmError> {
        self.array(field).map(u32::from_be_bytes)
    }

    fn u64(&mut self, field: &'static str) -> Result<u64, TpmError> {
        self.array(field).map(u64::from_be_bytes)
    }

    /// A TPM2B: u16 size, then that many bytes.
    fn tpm2b(
        &mut self,
        size_field: &'static str,
        field: &'static str,
    ) -> Result<&'a [u8], TpmError> {
        let size = self.u16(size_field)?;
        self.take(field, usize::from(size))
    }
}

/// Parses a `TPMS_ATTEST` quote strictly; returns the fields (not yet marked verified)
/// and the raw `pcrDigest`.
fn parse_attest(msg: &[u8]) -> Result<(VerifiedQuote, &[u8]), TpmError> {
    let mut r = Reader { buf: msg, pos: 0 };
    let magic = r.u32("magic")?;
    if magic != TPM_GENERATED_VALUE {
        return Err(TpmError::Magic { found: magic });
    }
    let attest_type = r.u16("type")?;
    if attest_type != TPM_ST_ATTEST_QUOTE {
        return Err(TpmError::AttestType { found: attest_type });
    }
    let qualified_signer = r.tpm2b("qualifiedSigner.size", "qualifiedSigner.name")?;
    let extra_data = r.tpm2b("extraData.size", "extraData.buffer")?;
    let clock = r.u64("clockInfo.clock")?;
    let reset_count = r.u32("clockInfo.resetCount")?;
    let restart_count = r.u32("clockInfo.restartCount")?;
    let safe = r.u8("clockInfo.safe")?;
    let firmware_version = r.u64("firmwareVersion")?;
    let count = r.u32("quote.pcrSelect.count")?;
    let mut pcr_selection = Vec::new();
    for _ in 0..count {
        let alg = r.u16("quote.pcrSelect.pcrSelections.hash")?;
        let size = r.u8("quote.pcrSelect.pcrSelections.sizeofSelect")?;
        let bitmap = r.take("quote.pcrSelect.pcrSelections.pcrSelect", usize::from(size))?;
        let mut selected = Vec::new();
        for (byte_index, byte) in (0u32..).zip(bitmap) {
            for bit in 0..8u32 {
                if byte & (1 << bit) != 0 {
                    selected.push(byte_index * 8 + bit);
                }
            }
        }
        pcr_selection.push(PcrSelection {
            hash: hash_name(alg),
            alg,
            pcrs: selected,
        });
    }
    let pcr_digest = r.tpm2b("quote.pcrDigest.size", "quote.pcrDigest.buffer")?;
    let trailing = msg.len().saturating_sub(r.pos);
    if trailing != 0 {
        return Err(TpmError::TrailingBytes { count: trailing });
    }

    Ok((
        VerifiedQuote {
            verified: false,
            magic: format!("{magic:08x}"),
            attest_type: format!("{attest_type:04x}"),
            qualified_signer: hex::encode(qualified_signer),
            extra_data: hex::encode(extra_data),
            clock,
            reset_count,
            restart_count,
            safe: safe != 0,
            firmware_version,
            pcr_selection,
            pcr_digest: hex::encode(pcr_digest),
            pcrs_checked: false,
            pcrs: None,
        },
        pcr_digest,
    ))
}

/// Parses `TPMS_ATTEST` quote bytes strictly without checking any signature: the fields
/// are what the bytes say and `verified` is `false` (the fuzzer's and auditors' entry to the
/// parser [`verify_quote`] runs after the signature check).
pub fn parse_unverified(msg: &[u8]) -> Result<VerifiedQuote, TpmError> {
    parse_attest(msg).map(|(quote, _)| quote)
}

/// Verifies a TPM 2.0 quote offline and returns its fields.
///
/// - `msg`: the `TPMS_ATTEST` bytes the TPM signed;
/// - `sig`: the raw RSA signature, or a marshalled `TPMT_SIGNATURE` (RSASSA, SHA-256);
///   a signature exactly as long as the AK modulus is taken as raw;
/// - `ak`: the AK public key, SubjectPublicKeyInfo in PEM or DER, or a PKCS#1
///   `RSA PUBLIC KEY` PEM;
/// - `pcrs`: optional SHA-256 PCR values concatenated, PCR 0 first, 32 bytes each; when
///   given, the quote's PCR digest must match the selected ones.
pub fn verify_quote(
    msg: &[u8],
    sig: &[u8],
    ak: &[u8],
    pcrs: Option<&[u8]>,
) -> Result<VerifiedQuote, TpmError> {
    let key = read_ak(ak)?;
    let raw = raw_signature(sig, key.size())?;
    let signature = Signature::try_from(raw).map_err(TpmError::Signature)?;
    VerifyingKey::<Sha256>::new(key)
        .verify(msg, &signature)
        .map_err(TpmError::Signature)?;

    let (mut quote, pcr_digest) = parse_attest(msg)?;
    let mut pcr_map = None;
    if let Some(values) = pcrs {
        if values.len() % PCR_LEN != 0 {
            return Err(TpmError::PcrsLength { len: values.len() });
        }
        let chunks: Vec<&[u8]> = values.chunks_exact(PCR_LEN).collect();
        let mut hasher = Sha256::new();
        for selection in &quote.pcr_selection {
            if selection.alg != TPM_ALG_SHA256 {
                if selection.pcrs.is_empty() {
                    continue;
                }
                return Err(TpmError::PcrBank {
                    hash: selection.hash.clone(),
                    alg: selection.alg,
                });
            }
            for &index in &selection.pcrs {
                let value = usize::try_from(index)
                    .ok()
                    .and_then(|i| chunks.get(i))
                    .ok_or(TpmError::PcrMissing {
                        index,
                        available: chunks.len(),
                    })?;
                hasher.update(value);
            }
        }
        let computed = hasher.finalize();
        if computed.as_slice() != pcr_digest {
            return Err(TpmError::PcrDigest {
                quoted: hex::encode(pcr_digest),
                computed: hex::encode(computed),
            });
        }
        pcr_map = Some(
            (0u32..)
                .zip(&chunks)
                .filter(|(i, _)| {
                    quote
                        .pcr_selection
                        .iter()
                        .any(|sel| sel.alg == TPM_ALG_SHA256 && sel.pcrs.contains(i))
                })
                .map(|(i, v)| (i, hex::encode(v)))
                .collect(),
        );
    }

    quote.verified = true;
    quote.pcrs_checked = pcr_map.is_some();
    quote.pcrs = pcr_map;
    Ok(quote)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    macro_rules! vector {
        ($path:literal) => {
            include_bytes!(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/vectors/",
                $path
            ))
            .as_slice()
        };
    }

    struct Set {
        name: &'static str,
        msg: &'static [u8],
        sig: &'static [u8],
        ak: &'static [u8],
        pcrs: &'static [u8],
    }

    fn sets() -> Vec<Set> {
        vec![
            Set {
                name: "azure-cvm-tooling",
                msg: vector!("derived/azure-cvm-tooling-quote.msg.bin"),
                sig: vector!("derived/azure-cvm-tooling-quote.sig.bin"),
                ak: vector!("azure-cvm-tooling/akpub.pem"),
                pcrs: vector!("derived/azure-cvm-tooling-quote.pcrs-sha256.bin"),
            },
            Set {
                name: "trustee-az-hcl-report",
                msg: vector!("derived/trustee-az-hcl-report.tpm-quote.msg.bin"),
                sig: vector!("derived/trustee-az-hcl-report.tpm-quote.sig.bin"),
                ak: vector!("derived/trustee-az-hcl-report.akpub.pem"),
                pcrs: vector!("derived/trustee-az-hcl-report.tpm-pcrs-sha256.bin"),
            },
            Set {
                name: "trustee-evidence-v0",
                msg: vector!("derived/trustee-evidence-v0.tpm-quote.msg.bin"),
                sig: vector!("derived/trustee-evidence-v0.tpm-quote.sig.bin"),
                ak: vector!("derived/trustee-evidence-v0.akpub.pem"),
                pcrs: vector!("derived/trustee-evidence-v0.tpm-pcrs-sha256.bin"),
            },
            Set {
                name: "trustee-evidence-v1",
                msg: vector!("derived/trustee-evidence-v1.tpm-quote.msg.bin"),
                sig: vector!("derived/trustee-evidence-v1.tpm-quote.sig.bin"),
                ak: vector!("derived/trustee-evidence-v1.akpub.pem"),
                pcrs: vector!("derived/trustee-evidence-v1.tpm-pcrs-sha256.bin"),
            },
            Set {
                name: "trustee-evidence-v2",
                msg: vector!("derived/trustee-evidence-v2.tpm-quote.msg.bin"),
                sig: vector!("derived/trustee-evidence-v2.tpm-quote.sig.bin"),
                ak: vector!("derived/trustee-evidence-v2.akpub.pem"),
                pcrs: vector!("derived/trustee-evidence-v2.tpm-pcrs-sha256.bin"),
            },
            Set {
                name: "trustee-evidence-genoa",
                msg: vector!("derived/trustee-evidence-genoa.tpm-quote.msg.bin"),
                sig: vector!("derived/trustee-evidence-genoa.tpm-quote.sig.bin"),
                ak: vector!("derived/trustee-evidence-genoa.akpub.pem"),
                pcrs: vector!("derived/trustee-evidence-genoa.tpm-pcrs-sha256.bin"),
            },
            Set {
                name: "trustee-tpm_evidence",
                msg: vector!("derived/trustee-tpm_evidence.quote.msg.bin"),
                sig: vector!("derived/trustee-tpm_evidence.quote.tpmt_signature.bin"),
                ak: vector!("derived/trustee-tpm_evidence.akpub.der"),
                pcrs: vector!("derived/trustee-tpm_evidence.pcrs-sha256.bin"),
            },
        ]
    }

    /// A quote over `sha256:` the PCRs of `select`, signed by a new RSA key; returns
    /// (message, raw signature, AK SPKI DER).
    fn made_quote(select: [u8; 3], pcrs: &[[u8; PCR_LEN]; 24]) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
        use rsa::pkcs8::EncodePublicKey;
        use rsa::signature::{SignatureEncoding, Signer};
        let key = rsa::RsaPrivateKey::new(&mut rand_core::OsRng, 1024).unwrap();
        let spki = key.to_public_key().to_public_key_der().unwrap().to_vec();
        let mut msg = Vec::new();
        msg.extend_from_slice(&TPM_GENERATED_VALUE.to_be_bytes());
        msg.extend_from_slice(&TPM_ST_ATTEST_QUOTE.to_be_bytes());
        msg.extend_from_slice(&[0, 0]); // qualifiedSigner
        msg.extend_from_slice(&[0, 1, 7]); // extraData
        msg.extend_from_slice(&[0; 17]); // clockInfo
        msg.extend_from_slice(&[0; 8]); // firmwareVersion
        msg.extend_from_slice(&1u32.to_be_bytes());
        msg.extend_from_slice(&TPM_ALG_SHA256.to_be_bytes());
        msg.push(3);
        msg.extend_from_slice(&select);
        let mut hasher = Sha256::new();
        for (i, pcr) in pcrs.iter().enumerate() {
            if select[i / 8] & (1 << (i % 8)) != 0 {
                hasher.update(pcr);
            }
        }
        msg.extend_from_slice(&32u16.to_be_bytes());
        msg.extend_from_slice(&hasher.finalize());
        let sig = rsa::pkcs1v15::SigningKey::<Sha256>::new(key)
            .sign(&msg)
            .to_vec();
        (msg, sig, spki)
    }

    #[test]
    fn unselected_pcrs_are_not_reported_as_covered() {
        let mut pcrs = [[0u8; PCR_LEN]; 24];
        for (i, pcr) in pcrs.iter_mut().enumerate() {
            pcr[0] = u8::try_from(i).unwrap();
        }
        // sha256:0-14,16-23: pcr 15 is outside the signature.
        let (msg, sig, ak) = made_quote([0xff, 0x7f, 0xff], &pcrs);
        let all: Vec<u8> = pcrs.iter().flatten().copied().collect();
        let q = verify_quote(&msg, &sig, &ak, Some(&all)).unwrap();
        let map = q.pcrs.unwrap();
        assert_eq!(map.len(), 23);
        assert!(!map.contains_key(&15));
        assert_eq!(map[&16], hex::encode(pcrs[16]));
        // Any value for pcr 15 "verifies": it is not covered.
        let mut changed = all.clone();
        changed[15 * PCR_LEN] ^= 0xff;
        verify_quote(&msg, &sig, &ak, Some(&changed)).unwrap();
        // …but a covered one is.
        changed[16 * PCR_LEN] ^= 0xff;
        assert!(matches!(
            verify_quote(&msg, &sig, &ak, Some(&changed)),
            Err(TpmError::PcrDigest { .. })
        ));

        let (msg, sig, ak) = made_quote([0xff; 3], &pcrs);
        let q = verify_quote(&msg, &sig, &ak, Some(&all)).unwrap();
        assert_eq!(q.pcrs.unwrap().len(), 24);
    }

    #[test]
    fn parse_unverified_reads_the_fields_without_a_signature() {
        for set in sets() {
            let verified = verify_quote(set.msg, set.sig, set.ak, None).unwrap();
            let parsed = parse_unverified(set.msg).unwrap_or_else(|e| panic!("{}: {e}", set.name));
            assert!(!parsed.verified, "{}", set.name);
            assert_eq!(parsed.extra_data, verified.extra_data, "{}", set.name);
            assert_eq!(parsed.pcr_selection, verified.pcr_selection, "{}", set.name);
            assert_eq!(parsed.pcr_digest, verified.pcr_digest, "{}", set.name);
            let mut trailing = set.msg.to_vec();
            trailing.push(0);
            assert!(matches!(
                parse_unverified(&trailing),
                Err(TpmError::TrailingBytes { count: 1 })
            ));
            assert!(matches!(
                parse_unverified(&set.msg[..set.msg.len() - 1]),
                Err(TpmError::Truncated { .. })
            ));
        }
    }

    #[test]
    fn all_vectors_verify_with_pcrs_checked() {
        for set in sets() {
            let q = verify_quote(set.msg, set.sig, set.ak, Some(set.pcrs))
                .unwrap_or_else(|e| panic!("{}: {e}", set.name));
            assert!(q.verified && q.pcrs_checked, "{}", set.name);
            assert_eq!(q.magic, "ff544347");
            assert_eq!(q.attest_type, "8018");
            assert!(q.pcrs.as_ref().is_some_and(|p| !p.is_empty()));
            let without = verify_quote(set.msg, set.sig, set.ak, None).unwrap();
            assert!(!without.pcrs_checked && without.pcrs.is_none());
        }
    }

    #[test]
    fn azure_quote_fields() {
        let s = &sets()[0];
        let q = verify_quote(s.msg, s.sig, s.ak, Some(s.pcrs)).unwrap();
        assert_eq!(q.extra_data, hex::encode("challenge"));
        assert_eq!(q.pcr_selection.len(), 1);
        assert_eq!(q.pcr_selection[0].hash, "sha256");
        assert_eq!(q.pcr_selection[0].pcrs, (0..24).collect::<Vec<u32>>());
        let json = serde_json::to_value(&q).unwrap();
        assert_eq!(json["verified"], true);
        assert_eq!(json["type"], "8018");
        assert_eq!(json["pcr_selection"][0]["hash"], "sha256");
        assert!(json["pcrs"]["23"].is_string());
    }

    #[test]
    fn tpmt_signature_and_raw_both_accepted() {
        let s = &sets()[6];
        assert_eq!(&s.sig[..4], &[0x00, 0x14, 0x00, 0x0b]);
        verify_quote(s.msg, &s.sig[6..], s.ak, Some(s.pcrs)).unwrap();
        let mut wrapped = vec![0x00, 0x14, 0x00, 0x0b];
        let raw = sets()[0].sig;
        wrapped.extend_from_slice(&u16::try_from(raw.len()).unwrap().to_be_bytes());
        wrapped.extend_from_slice(raw);
        let a = &sets()[0];
        verify_quote(a.msg, &wrapped, a.ak, Some(a.pcrs)).unwrap();
        let mut bad = wrapped.clone();
        bad[1] = 0x16;
        assert!(matches!(
            verify_quote(a.msg, &bad, a.ak, None),
            Err(TpmError::SignatureScheme { sig_alg: 0x16, .. })
        ));
        bad = wrapped;
        bad.pop();
        assert!(matches!(
            verify_quote(a.msg, &bad, a.ak, None),
            Err(TpmError::SignatureFormat { .. })
        ));
    }

    #[test]
    fn pkcs1_pem_accepted() {
        use rsa::pkcs1::{EncodeRsaPublicKey, LineEnding};
        let s = &sets()[0];
        let key = read_ak(s.ak).unwrap();
        let pem = key.to_pkcs1_pem(LineEnding::LF).unwrap();
        verify_quote(s.msg, s.sig, pem.as_bytes(), Some(s.pcrs)).unwrap();
        let der = key.to_pkcs1_der().unwrap();
        verify_quote(s.msg, s.sig, der.as_bytes(), Some(s.pcrs)).unwrap();
    }

    #[test]
    fn bit_flip_in_msg_fails_signature() {
        for set in sets() {
            let mut msg = set.msg.to_vec();
            let last = msg.len() - 1;
            msg[last] ^= 1;
            assert!(
                matches!(
                    verify_quote(&msg, set.sig, set.ak, Some(set.pcrs)),
                    Err(TpmError::Signature(_))
                ),
                "{}",
                set.name
            );
        }
    }

    #[test]
    fn bit_flip_in_sig_fails_signature() {
        for set in sets() {
            let mut sig = set.sig.to_vec();
            let mid = sig.len() / 2;
            sig[mid] ^= 0x10;
            assert!(
                matches!(
                    verify_quote(set.msg, &sig, set.ak, Some(set.pcrs)),
                    Err(TpmError::Signature(_))
                ),
                "{}",
                set.name
            );
        }
    }

    #[test]
    fn wrong_ak_fails_signature() {
        let all = sets();
        for (i, set) in all.iter().enumerate() {
            // evidence v0 and v1 come from the same vm and share an ak: pick a different key.
            let other = (1..all.len())
                .map(|k| &all[(i + k) % all.len()])
                .find(|o| o.ak != set.ak)
                .unwrap();
            assert!(
                matches!(
                    verify_quote(set.msg, set.sig, other.ak, Some(set.pcrs)),
                    Err(TpmError::Signature(_))
                ),
                "{}",
                set.name
            );
        }
    }

    #[test]
    fn changed_pcr_fails_digest() {
        for set in sets() {
            let q = verify_quote(set.msg, set.sig, set.ak, None).unwrap();
            let first = q
                .pcr_selection
                .iter()
                .find(|s| s.alg == TPM_ALG_SHA256)
                .and_then(|s| s.pcrs.first().copied())
                .unwrap();
            let mut pcrs = set.pcrs.to_vec();
            pcrs[first as usize * PCR_LEN] ^= 1;
            assert!(
                matches!(
                    verify_quote(set.msg, set.sig, set.ak, Some(&pcrs)),
                    Err(TpmError::PcrDigest { .. })
                ),
                "{}",
                set.name
            );
        }
    }

    #[test]
    fn bad_pcr_lengths() {
        let s = &sets()[0];
        assert!(matches!(
            verify_quote(s.msg, s.sig, s.ak, Some(&s.pcrs[..s.pcrs.len() - 1])),
            Err(TpmError::PcrsLength { .. })
        ));
        assert!(matches!(
            verify_quote(s.msg, s.sig, s.ak, Some(&s.pcrs[..PCR_LEN * 10])),
            Err(TpmError::PcrMissing {
                index: 10,
                available: 10
            })
        ));
    }

    #[test]
    fn truncated_msg_fails() {
        // Signed quotes cannot be truncated without breaking the signature, so the
        // signature check reports it first.
        let s = &sets()[0];
        assert!(matches!(
            verify_quote(&s.msg[..s.msg.len() - 1], s.sig, s.ak, Some(s.pcrs)),
            Err(TpmError::Signature(_))
        ));
    }

    #[test]
    fn truncated_or_padded_attest_fails_parse() {
        let msg = sets()[0].msg;
        let cases: [(usize, &str); 6] = [
            (0, "magic"),
            (5, "type"),
            (7, "qualifiedSigner.size"),
            (9, "qualifiedSigner.name"),
            (msg.len() - 33, "quote.pcrDigest.size"),
            (msg.len() - 1, "quote.pcrDigest.buffer"),
        ];
        for (cut, field) in cases {
            let err = parse_attest(&msg[..cut]).unwrap_err();
            match &err {
                TpmError::Truncated { field: f, .. } => assert_eq!(*f, field, "cut {cut}"),
                other => panic!("cut {cut}: {other}"),
            }
            assert!(err.to_string().contains(field));
        }
        let mut padded = msg.to_vec();
        padded.push(0);
        assert!(matches!(
            parse_attest(&padded),
            Err(TpmError::TrailingBytes { count: 1 })
        ));
        let mut bad = msg.to_vec();
        bad[0] = 0;
        assert!(matches!(parse_attest(&bad), Err(TpmError::Magic { .. })));
        bad = msg.to_vec();
        bad[5] = 0x17;
        assert!(matches!(
            parse_attest(&bad),
            Err(TpmError::AttestType { found: 0x8017 })
        ));
    }
}
