//! `az-snp-vtpm` evidence (an Azure confidential VM on AMD SEV-SNP with a vTPM run by the
//! paravisor): the HCL report and the evidence JSON, parsed offline. The provider that
//! produces it lives in the daemon (`cvm_warden::tee::azure`); how the binding works is
//! documented there.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use rsa::pkcs8::EncodePublicKey;
use rsa::{BigUint, RsaPublicKey};
use serde_json::Value;
use sev::firmware::guest::AttestationReport;
use sev::parser::ByteParser;
use sha2::{Digest as _, Sha256};

use super::EvidenceError;

/// NV index of the HCL report (the paravisor refreshes it).
pub const HCL_REPORT_NV_INDEX: u32 = 0x0140_0001;
/// Size of the SNP report inside the HCL report.
pub const SNP_REPORT_SIZE: usize = 1184;
/// Size of the HCL report's `user-data` (the report data NV index).
pub const USER_DATA_SIZE: usize = 64;
/// The evidence JSON shape version Trustee's `az-snp-vtpm` verifier reads.
pub const EVIDENCE_VERSION: u32 = 2;
/// Length of the vTPM quote's qualifying data: the 48-byte report data, or the
/// first 48 bytes of a 64-byte checkpoint binding.
pub const QUOTE_NONCE_LEN: usize = 48;

const TEE: &str = "az-snp-vtpm";
/// `"HCLA"` little-endian: the HCL report header signature.
const HCL_SIGNATURE: u32 = 0x414c_4348;
/// Size of the HCL report header.
pub const HCL_HEADER_SIZE: usize = 32;
/// Offset of the IGVM request data (after header and the 1184-byte hardware report).
pub const REQUEST_DATA_OFFSET: usize = HCL_HEADER_SIZE + SNP_REPORT_SIZE;
const REQUEST_DATA_HEADER_SIZE: usize = 20;
/// Offset of the variable data (runtime data JSON).
pub const VAR_DATA_OFFSET: usize = REQUEST_DATA_OFFSET + REQUEST_DATA_HEADER_SIZE;
const REPORT_TYPE_SNP: u32 = 2;
const REPORT_TYPE_TDX: u32 = 4;
const HASH_TYPE_SHA256: u32 = 1;
const AK_KEY_ID: &str = "HCLAkPub";

/// An HCL report from NV index 0x01400001, split and checked by [`parse_hcl_report`].
#[derive(Debug, Clone)]
pub struct HclReport {
    /// HCL header version (1 or 2 seen on Azure).
    pub version: u32,
    /// The SNP attestation report bytes (1184), exactly as in the HCL report.
    pub snp_report: Vec<u8>,
    /// The SNP report, parsed by the sev crate.
    pub report: AttestationReport,
    /// The variable data (runtime data JSON) bytes; SHA-256 of them is REPORT_DATA[..32].
    pub var_data: Vec<u8>,
    /// The `HCLAkPub` key of the variable data, SubjectPublicKeyInfo DER.
    pub ak_public: Vec<u8>,
    /// The `user-data` of the variable data, hex-decoded; absent in old HCL versions.
    pub user_data: Option<Vec<u8>>,
    /// The `vm-configuration` object of the variable data (`Null` when absent).
    pub vm_configuration: Value,
}

fn malformed(detail: impl Into<String>) -> EvidenceError {
    EvidenceError::Malformed {
        tee: TEE,
        what: "hcl report",
        detail: detail.into(),
    }
}

fn le_u32(bytes: &[u8], offset: usize, field: &str) -> Result<u32, EvidenceError> {
    bytes
        .get(offset..offset + 4)
        .and_then(|b| <[u8; 4]>::try_from(b).ok())
        .map(u32::from_le_bytes)
        .ok_or_else(|| {
            malformed(format!(
                "{field} at offset {offset} is past the end ({} bytes)",
                bytes.len()
            ))
        })
}

/// Parses an HCL report: header, the 1184-byte SNP report (sev crate), the variable data
/// JSON (`HCLAkPub`, `user-data`), and checks Azure's binding
/// `SHA-256(variable data) == REPORT_DATA[..32]`. Fails closed on anything unexpected.
pub fn parse_hcl_report(bytes: &[u8]) -> Result<HclReport, EvidenceError> {
    if bytes.len() < VAR_DATA_OFFSET {
        return Err(malformed(format!(
            "{} bytes, shorter than header + snp report + request data header ({VAR_DATA_OFFSET})",
            bytes.len()
        )));
    }
    let signature = le_u32(bytes, 0, "header.signature")?;
    if signature != HCL_SIGNATURE {
        return Err(malformed(format!(
            "header signature is 0x{signature:08x}, not 0x{HCL_SIGNATURE:08x} (\"HCLA\"); \
             NV index 0x{HCL_REPORT_NV_INDEX:08x} does not hold an Azure HCL report"
        )));
    }
    let version = le_u32(bytes, 4, "header.version")?;
    let report_size = le_u32(bytes, 8, "header.report_size")? as usize;
    let status = le_u32(bytes, 16, "header.status")?;
    if status != 0 {
        return Err(malformed(format!(
            "header status is 0x{status:08x}: the paravisor could not get a report from the \
             AMD secure processor"
        )));
    }
    let data_size = le_u32(bytes, REQUEST_DATA_OFFSET, "request_data.data_size")? as usize;
    let report_type = le_u32(bytes, REQUEST_DATA_OFFSET + 8, "request_data.report_type")?;
    let hash_type = le_u32(bytes, REQUEST_DATA_OFFSET + 12, "request_data.hash_type")?;
    let var_size = le_u32(
        bytes,
        REQUEST_DATA_OFFSET + 16,
        "request_data.variable_data_size",
    )? as usize;
    match report_type {
        REPORT_TYPE_SNP => {}
        REPORT_TYPE_TDX => {
            return Err(malformed(
                "it holds a TDX report: this is an Azure TDX VM, use tee = az-tdx-vtpm",
            ))
        }
        other => return Err(malformed(format!("unknown hardware report type {other}"))),
    }
    if hash_type != HASH_TYPE_SHA256 {
        return Err(malformed(format!(
            "variable data hash type {hash_type}, only 1 (sha-256) is supported"
        )));
    }
    if data_size != REQUEST_DATA_HEADER_SIZE + var_size {
        return Err(malformed(format!(
            "request data size {data_size} != 20 + variable data size {var_size}"
        )));
    }
    if report_size != REQUEST_DATA_OFFSET + data_size {
        return Err(malformed(format!(
            "header report_size {report_size} != 1216 + request data size {data_size}"
        )));
    }
    let var_data = bytes
        .get(VAR_DATA_OFFSET..VAR_DATA_OFFSET + var_size)
        .ok_or_else(|| {
            malformed(format!(
                "variable data of {var_size} bytes runs past the end ({} bytes)",
                bytes.len()
            ))
        })?
        .to_vec();
    let snp_report = bytes[HCL_HEADER_SIZE..REQUEST_DATA_OFFSET].to_vec();
    let report = AttestationReport::from_bytes(&snp_report)
        .map_err(|e| malformed(format!("the snp report does not parse: {e}")))?;

    let hash: [u8; 32] = Sha256::digest(&var_data).into();
    if hash[..] != report.report_data[..32] {
        return Err(malformed(format!(
            "SHA-256 of the variable data is {} but the snp report's REPORT_DATA[..32] is {}; \
             the variable data is not the one the hardware report binds",
            hex::encode(hash),
            hex::encode(&report.report_data[..32])
        )));
    }

    let json: Value = serde_json::from_slice(&var_data)
        .map_err(|e| malformed(format!("the variable data is not json: {e}")))?;
    let ak_public = hcl_ak_public(&json)?;
    let user_data = match json.get("user-data") {
        None => None,
        Some(Value::String(text)) => Some(
            hex::decode(text)
                .map_err(|e| malformed(format!("user-data is not hex ({e}): {text:?}")))?,
        ),
        Some(other) => return Err(malformed(format!("user-data is not a string: {other}"))),
    };
    Ok(HclReport {
        version,
        snp_report,
        report,
        var_data,
        ak_public,
        user_data,
        vm_configuration: json.get("vm-configuration").cloned().unwrap_or(Value::Null),
    })
}

/// The `HCLAkPub` JWK of the variable data as SPKI DER.
fn hcl_ak_public(json: &Value) -> Result<Vec<u8>, EvidenceError> {
    let keys = json
        .get("keys")
        .and_then(Value::as_array)
        .ok_or_else(|| malformed("the variable data has no \"keys\" array"))?;
    let jwk = keys
        .iter()
        .find(|k| k.get("kid").and_then(Value::as_str) == Some(AK_KEY_ID))
        .ok_or_else(|| malformed("the variable data has no HCLAkPub key"))?;
    if jwk.get("kty").and_then(Value::as_str) != Some("RSA") {
        return Err(malformed("HCLAkPub is not an RSA key"));
    }
    let part = |name: &str| -> Result<BigUint, EvidenceError> {
        let text = jwk
            .get(name)
            .and_then(Value::as_str)
            .ok_or_else(|| malformed(format!("HCLAkPub has no \"{name}\"")))?;
        let raw = URL_SAFE_NO_PAD
            .decode(text.trim_end_matches('='))
            .map_err(|e| malformed(format!("HCLAkPub \"{name}\" is not base64url: {e}")))?;
        Ok(BigUint::from_bytes_be(&raw))
    };
    let key = RsaPublicKey::new(part("n")?, part("e")?)
        .map_err(|e| malformed(format!("HCLAkPub is not a valid rsa key: {e}")))?;
    key.to_public_key_der()
        .map(|d| d.as_bytes().to_vec())
        .map_err(|e| malformed(format!("cannot encode HCLAkPub: {e}")))
}

/// The 64 bytes written to [`REPORT_DATA_NV_INDEX`]: `report_data` then 16 zero bytes.
pub fn user_data_for(report_data: &[u8; 48]) -> [u8; USER_DATA_SIZE] {
    let mut out = [0u8; USER_DATA_SIZE];
    out[..48].copy_from_slice(report_data);
    out
}

/// The qualifying data of a checkpoint's vTPM quote: the first [`QUOTE_NONCE_LEN`] bytes of
/// the 64-byte `binding` (whose whole is the HCL report's `user-data`).
pub fn checkpoint_quote_nonce(binding: &[u8; USER_DATA_SIZE]) -> [u8; QUOTE_NONCE_LEN] {
    let mut out = [0u8; QUOTE_NONCE_LEN];
    out.copy_from_slice(&binding[..QUOTE_NONCE_LEN]);
    out
}

/// `az-snp-vtpm` evidence decoded (the inverse of what [`AzSnpVtpmProvider`] writes, for
/// auditors and tests). Nothing is verified here: parse [`AzEvidence::hcl_report`] with
/// [`parse_hcl_report`] and verify the quote with its `HCLAkPub`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AzEvidence {
    /// The HCL report bytes (the whole NV index 0x01400001).
    pub hcl_report: Vec<u8>,
    /// The quote's `TPMS_ATTEST`.
    pub quote_message: Vec<u8>,
    /// The quote's raw RSASSA signature (no `TPMT_SIGNATURE` header).
    pub quote_signature: Vec<u8>,
    /// The SHA-256 PCRs 0–23 the quote covers.
    pub pcrs: Vec<[u8; 32]>,
    /// The VCEK, DER.
    pub vcek: Vec<u8>,
}

impl AzEvidence {
    /// Decodes the version 2 evidence JSON: exactly `version` (2), `tpm_quote` (`signature`,
    /// `message` in hex, `pcrs` 24 hex SHA-256 values), `hcl_report` and `vcek` (base64url,
    /// padding optional).
    pub fn from_json(evidence: &Value) -> Result<Self, EvidenceError> {
        let bad = |detail: String| EvidenceError::Malformed {
            tee: TEE,
            what: "evidence",
            detail,
        };
        let object = evidence
            .as_object()
            .ok_or_else(|| bad(format!("not a json object: {evidence}")))?;
        let mut keys: Vec<&str> = object.keys().map(String::as_str).collect();
        keys.sort_unstable();
        if keys != ["hcl_report", "tpm_quote", "vcek", "version"] {
            return Err(bad(format!(
                "fields {keys:?}, expected hcl_report, tpm_quote, vcek and version"
            )));
        }
        if object.get("version").and_then(Value::as_u64) != Some(u64::from(EVIDENCE_VERSION)) {
            return Err(bad(format!(
                "version is {}, expected {EVIDENCE_VERSION}",
                evidence["version"]
            )));
        }
        let base64url = |name: &str| -> Result<Vec<u8>, EvidenceError> {
            let text = object
                .get(name)
                .and_then(Value::as_str)
                .ok_or_else(|| bad(format!("{name} is not a string")))?;
            URL_SAFE_NO_PAD
                .decode(text.trim_end_matches('='))
                .map_err(|e| bad(format!("{name} is not base64url: {e}")))
        };
        let quote = object
            .get("tpm_quote")
            .and_then(Value::as_object)
            .ok_or_else(|| bad("tpm_quote is not an object".to_string()))?;
        let hex_field = |name: &str| -> Result<Vec<u8>, EvidenceError> {
            let text = quote
                .get(name)
                .and_then(Value::as_str)
                .ok_or_else(|| bad(format!("tpm_quote.{name} is not a string")))?;
            hex::decode(text).map_err(|e| bad(format!("tpm_quote.{name} is not hex: {e}")))
        };
        let texts = quote
            .get("pcrs")
            .and_then(Value::as_array)
            .ok_or_else(|| bad("tpm_quote.pcrs is not an array".to_string()))?;
        if texts.len() != 24 {
            return Err(bad(format!(
                "tpm_quote.pcrs holds {} values, expected 24 (sha256:0-23)",
                texts.len()
            )));
        }
        let mut pcrs = Vec::with_capacity(24);
        for (i, text) in texts.iter().enumerate() {
            let mut value = [0u8; 32];
            text.as_str()
                .and_then(|t| hex::decode_to_slice(t, &mut value).ok())
                .ok_or_else(|| bad(format!("tpm_quote.pcrs[{i}] is not 32 bytes of hex")))?;
            pcrs.push(value);
        }
        Ok(Self {
            hcl_report: base64url("hcl_report")?,
            quote_message: hex_field("message")?,
            quote_signature: hex_field("signature")?,
            pcrs,
            vcek: base64url("vcek")?,
        })
    }
}
