//! `tpm` evidence, verified the way KBS-PROTOCOL.md describes the real verifier:
//! `ak_public` is the AK's SubjectPublicKeyInfo DER (RSA only), `message` the marshalled
//! TPMS_ATTEST, `signature` the marshalled TPMT_SIGNATURE (RSASSA-PKCS1-v1_5 / SHA-256),
//! `pcrs` the 24 SHA-256 PCR values whose concatenation hashes to the quote's PCR digest,
//! and the quote's qualifying data is exactly `report_data[..32]`.
//!
//! The structures are decoded by hand from TPM 2.0 Part 2 (big-endian, TPM2B = u16 size +
//! bytes), independently of cvm-warden's own decoder and of libtss2.

use base64::Engine;
use rsa::pkcs1v15::{Signature as RsaSignature, VerifyingKey};
use rsa::pkcs8::DecodePublicKey;
use rsa::signature::Verifier;
use rsa::RsaPublicKey;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

/// `TPM_GENERATED_VALUE`.
pub const TPM_GENERATED: u32 = 0xff54_4347;
/// `TPM_ST_ATTEST_QUOTE`.
pub const TPM_ST_ATTEST_QUOTE: u16 = 0x8018;
/// `TPM_ALG_RSASSA`.
pub const TPM_ALG_RSASSA: u16 = 0x0014;
/// `TPM_ALG_SHA256`.
pub const TPM_ALG_SHA256: u16 = 0x000b;
/// The PCR whose value binds init-data (`SHA-256(0^32 || digest)`).
pub const INIT_DATA_PCR: usize = 8;

/// Why TPM evidence was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TpmError {
    /// The evidence JSON is not `{"ak_public", "tpm_quote": {"signature","message","pcrs"}}`.
    #[error("tpm evidence is not of the expected shape: {0}")]
    Shape(String),
    /// A field is not standard base64 with padding.
    #[error("tpm evidence field {field} is not standard base64")]
    Base64 {
        /// The field.
        field: &'static str,
    },
    /// `pcrs` is not 24 values of 64 hex digits.
    #[error("tpm evidence pcrs: {0}")]
    Pcrs(String),
    /// `ak_public` is not an RSA SubjectPublicKeyInfo.
    #[error("ak_public is not an RSA SubjectPublicKeyInfo (DER): {0}")]
    AkPublic(String),
    /// The TPMT_SIGNATURE is malformed or not RSASSA/SHA-256.
    #[error("quote signature (TPMT_SIGNATURE): {0}")]
    SignatureFormat(String),
    /// The TPMS_ATTEST is malformed or not a quote of sha256:0-23.
    #[error("quote message (TPMS_ATTEST): {0}")]
    Message(String),
    /// The AK signature does not verify over the message.
    #[error("quote signature does not verify with ak_public (RSASSA-PKCS1-v1_5, SHA-256)")]
    BadSignature,
    /// SHA-256 of the PCR values does not equal the quote's PCR digest.
    #[error("the pcrs do not hash to the quote's PCR digest (quote {quote}, pcrs {computed})")]
    PcrDigest {
        /// Digest in the quote (hex).
        quote: String,
        /// SHA-256 of the concatenated PCRs (hex).
        computed: String,
    },
    /// The qualifying data is not `report_data[..32]`.
    #[error("quote qualifying data {got} is not report_data[..32] {expected}")]
    Nonce {
        /// The quote's extraData (hex).
        got: String,
        /// The expected 32 bytes (hex).
        expected: String,
    },
    /// PCR 8 does not carry the init-data digest.
    #[error("PCR 8 is {got}, not SHA-256(0^32 || init-data digest) = {expected}")]
    InitData {
        /// PCR 8 (hex).
        got: String,
        /// Expected value (hex).
        expected: String,
    },
}

/// The decoded TPMS_ATTEST of a quote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuoteInfo {
    /// `qualifiedSigner` (TPM2B_NAME contents).
    pub qualified_signer: Vec<u8>,
    /// `extraData` (the qualifying data / nonce).
    pub extra_data: Vec<u8>,
    /// `clockInfo.clock`.
    pub clock: u64,
    /// `clockInfo.resetCount`.
    pub reset_count: u32,
    /// `clockInfo.restartCount`.
    pub restart_count: u32,
    /// `clockInfo.safe`.
    pub safe: bool,
    /// `firmwareVersion`.
    pub firmware_version: u64,
    /// `pcrDigest` (SHA-256 of the selected PCRs).
    pub pcr_digest: [u8; 32],
}

struct Reader<'a> {
    bytes: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, field: &str) -> Result<&'a [u8], String> {
        if self.bytes.len() < n {
            return Err(format!(
                "{} ends inside {field} (needs {n} more bytes, has {})",
                self.what,
                self.bytes.len()
            ));
        }
        let (head, tail) = self.bytes.split_at(n);
        self.bytes = tail;
        Ok(head)
    }

    fn u8(&mut self, field: &str) -> Result<u8, String> {
        Ok(self.take(1, field)?[0])
    }

    fn u16(&mut self, field: &str) -> Result<u16, String> {
        let b = self.take(2, field)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self, field: &str) -> Result<u32, String> {
        let b = self.take(4, field)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self, field: &str) -> Result<u64, String> {
        let b = self.take(8, field)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }

    fn tpm2b(&mut self, field: &str) -> Result<&'a [u8], String> {
        let n = self.u16(field)? as usize;
        self.take(n, field)
    }

    fn end(&self) -> Result<(), String> {
        if self.bytes.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "{} has {} trailing bytes",
                self.what,
                self.bytes.len()
            ))
        }
    }
}

/// Decode a marshalled TPMS_ATTEST that must be a quote selecting exactly sha256:0-23.
pub fn parse_tpms_attest(message: &[u8]) -> Result<QuoteInfo, TpmError> {
    parse_attest_inner(message).map_err(TpmError::Message)
}

fn parse_attest_inner(message: &[u8]) -> Result<QuoteInfo, String> {
    let mut r = Reader {
        bytes: message,
        what: "TPMS_ATTEST",
    };
    let magic = r.u32("magic")?;
    if magic != TPM_GENERATED {
        return Err(format!(
            "magic is {magic:#010x}, not TPM_GENERATED {TPM_GENERATED:#010x}"
        ));
    }
    let st = r.u16("type")?;
    if st != TPM_ST_ATTEST_QUOTE {
        return Err(format!(
            "type is {st:#06x}, not TPM_ST_ATTEST_QUOTE {TPM_ST_ATTEST_QUOTE:#06x}"
        ));
    }
    let qualified_signer = r.tpm2b("qualifiedSigner")?.to_vec();
    let extra_data = r.tpm2b("extraData")?.to_vec();
    if extra_data.len() > 64 {
        return Err(format!(
            "extraData is {} bytes, more than a TPM2B_DATA holds (64)",
            extra_data.len()
        ));
    }
    let clock = r.u64("clockInfo.clock")?;
    let reset_count = r.u32("clockInfo.resetCount")?;
    let restart_count = r.u32("clockInfo.restartCount")?;
    let safe = match r.u8("clockInfo.safe")? {
        0 => false,
        1 => true,
        other => return Err(format!("clockInfo.safe is {other}, not YES/NO")),
    };
    let firmware_version = r.u64("firmwareVersion")?;
    let count = r.u32("pcrSelect.count")?;
    if count != 1 {
        return Err(format!(
            "pcrSelect has {count} selections; the quote must select sha256:0-23 only"
        ));
    }
    let hash = r.u16("pcrSelect.hash")?;
    if hash != TPM_ALG_SHA256 {
        return Err(format!(
            "pcrSelect bank is {hash:#06x}, not SHA-256 ({TPM_ALG_SHA256:#06x})"
        ));
    }
    let size = r.u8("pcrSelect.sizeofSelect")? as usize;
    let bitmap = r.take(size, "pcrSelect.pcrSelect")?;
    let selected: Vec<usize> = (0..size * 8)
        .filter(|i| bitmap[i / 8] & (1 << (i % 8)) != 0)
        .collect();
    if selected != (0..24).collect::<Vec<usize>>() {
        return Err(format!(
            "the quote selects sha256 PCRs {selected:?}; it must select exactly 0-23"
        ));
    }
    let digest = r.tpm2b("pcrDigest")?;
    let pcr_digest: [u8; 32] = digest
        .try_into()
        .map_err(|_| format!("pcrDigest is {} bytes, not 32 (SHA-256)", digest.len()))?;
    r.end()?;
    Ok(QuoteInfo {
        qualified_signer,
        extra_data,
        clock,
        reset_count,
        restart_count,
        safe,
        firmware_version,
        pcr_digest,
    })
}

/// Decode a marshalled TPMT_SIGNATURE that must be RSASSA with SHA-256; returns the raw
/// RSA signature bytes.
pub fn parse_tpmt_signature(signature: &[u8]) -> Result<Vec<u8>, TpmError> {
    let mut r = Reader {
        bytes: signature,
        what: "TPMT_SIGNATURE",
    };
    let mut inner = || -> Result<Vec<u8>, String> {
        let alg = r.u16("sigAlg")?;
        if alg != TPM_ALG_RSASSA {
            return Err(format!(
                "sigAlg is {alg:#06x}; only RSASSA ({TPM_ALG_RSASSA:#06x}) is accepted"
            ));
        }
        let hash = r.u16("hash")?;
        if hash != TPM_ALG_SHA256 {
            return Err(format!(
                "hash is {hash:#06x}; only SHA-256 ({TPM_ALG_SHA256:#06x}) is accepted"
            ));
        }
        let sig = r.tpm2b("sig")?.to_vec();
        if sig.is_empty() {
            return Err("signature is empty".to_string());
        }
        r.end()?;
        Ok(sig)
    };
    inner().map_err(TpmError::SignatureFormat)
}

/// Verify a quote: the AK (SPKI DER, RSA) signature over `message`, the message's
/// structure, and that SHA-256 of the 24 PCRs equals its PCR digest. Does not check the
/// qualifying data (see [`check_qualifying_data`]).
pub fn verify_quote(
    ak_spki_der: &[u8],
    message: &[u8],
    rsa_signature: &[u8],
    pcrs: &[[u8; 32]],
) -> Result<QuoteInfo, TpmError> {
    let key = RsaPublicKey::from_public_key_der(ak_spki_der)
        .map_err(|e| TpmError::AkPublic(e.to_string()))?;
    let signature = RsaSignature::try_from(rsa_signature).map_err(|_| TpmError::BadSignature)?;
    VerifyingKey::<Sha256>::new(key)
        .verify(message, &signature)
        .map_err(|_| TpmError::BadSignature)?;
    let info = parse_tpms_attest(message)?;
    if pcrs.len() != 24 {
        return Err(TpmError::Pcrs(format!("{} values, not 24", pcrs.len())));
    }
    let mut hasher = Sha256::new();
    for pcr in pcrs {
        hasher.update(pcr);
    }
    let computed: [u8; 32] = hasher.finalize().into();
    if computed != info.pcr_digest {
        return Err(TpmError::PcrDigest {
            quote: hex::encode(info.pcr_digest),
            computed: hex::encode(computed),
        });
    }
    Ok(info)
}

/// The quote's qualifying data must be exactly the first 32 bytes of report_data.
pub fn check_qualifying_data(info: &QuoteInfo, report_data: &[u8; 48]) -> Result<(), TpmError> {
    if info.extra_data.as_slice() != &report_data[..32] {
        return Err(TpmError::Nonce {
            got: hex::encode(&info.extra_data),
            expected: hex::encode(&report_data[..32]),
        });
    }
    Ok(())
}

/// `SHA-256(0^32 || digest)`: PCR 8 after one extend of the init-data digest.
pub fn init_data_pcr(digest: &[u8; 32]) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update([0u8; 32]);
    hasher.update(digest);
    hasher.finalize().into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EvidenceJson {
    ak_public: String,
    tpm_quote: QuoteJson,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct QuoteJson {
    signature: String,
    message: String,
    pcrs: Vec<String>,
}

/// What verified TPM evidence yields.
#[derive(Debug, Clone)]
pub struct VerifiedTpm {
    /// The exact `ak_public` string (what `trusted_aks` lists).
    pub ak_public: String,
    /// The decoded quote.
    pub quote: QuoteInfo,
    /// The 24 PCR values.
    pub pcrs: Vec<[u8; 32]>,
}

impl VerifiedTpm {
    /// Claims for the token's annotated evidence: Trustee's `pcr00`..`pcr23`,
    /// `report_data` (the qualifying data) and `init_data` (PCR 8), plus the quote fields.
    pub fn claims(&self, ak_trusted: bool) -> Value {
        let mut map = Map::new();
        for (i, pcr) in self.pcrs.iter().enumerate() {
            map.insert(format!("pcr{i:02}"), Value::String(hex::encode(pcr)));
        }
        let extra = json!({
            "report_data": hex::encode(&self.quote.extra_data),
            "init_data": hex::encode(self.pcrs[INIT_DATA_PCR]),
            "ak_public": self.ak_public,
            "ak_trusted": ak_trusted,
            "qualified_signer": hex::encode(&self.quote.qualified_signer),
            "clock": self.quote.clock,
            "reset_count": self.quote.reset_count,
            "restart_count": self.quote.restart_count,
            "safe": self.quote.safe,
            "firmware_version": format!("{:016x}", self.quote.firmware_version),
        });
        if let Value::Object(more) = extra {
            map.extend(more);
        }
        Value::Object(map)
    }
}

/// Verify `tpm` evidence JSON against the expected report_data (and init-data digest).
pub fn verify_tpm_evidence(
    evidence: &Value,
    report_data: &[u8; 48],
    init_data_digest: Option<&[u8; 32]>,
) -> Result<VerifiedTpm, TpmError> {
    let ev: EvidenceJson =
        serde_json::from_value(evidence.clone()).map_err(|e| TpmError::Shape(e.to_string()))?;
    let b64 = base64::engine::general_purpose::STANDARD;
    let ak_der = b64
        .decode(&ev.ak_public)
        .map_err(|_| TpmError::Base64 { field: "ak_public" })?;
    let message = b64
        .decode(&ev.tpm_quote.message)
        .map_err(|_| TpmError::Base64 {
            field: "tpm_quote.message",
        })?;
    let signature = b64
        .decode(&ev.tpm_quote.signature)
        .map_err(|_| TpmError::Base64 {
            field: "tpm_quote.signature",
        })?;
    let mut pcrs = Vec::with_capacity(24);
    for (i, text) in ev.tpm_quote.pcrs.iter().enumerate() {
        let bytes = hex::decode(text)
            .ok()
            .and_then(|b| <[u8; 32]>::try_from(b).ok())
            .ok_or_else(|| TpmError::Pcrs(format!("pcrs[{i}] is not 64 hex digits")))?;
        pcrs.push(bytes);
    }
    let raw_signature = parse_tpmt_signature(&signature)?;
    let quote = verify_quote(&ak_der, &message, &raw_signature, &pcrs)?;
    check_qualifying_data(&quote, report_data)?;
    if let Some(digest) = init_data_digest {
        let expected = init_data_pcr(digest);
        if pcrs[INIT_DATA_PCR] != expected {
            return Err(TpmError::InitData {
                got: hex::encode(pcrs[INIT_DATA_PCR]),
                expected: hex::encode(expected),
            });
        }
    }
    Ok(VerifiedTpm {
        ak_public: ev.ak_public,
        quote,
        pcrs,
    })
}
