//! Intel TDX evidence (`{"quote": base64, "cc_eventlog": base64 | null}`): the quote's
//! header and TD report body, parsed offline. The quote signature (Intel's PCK chain and
//! collateral) is not checked offline.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde_json::Value;

use super::EvidenceError;

/// Length of the configfs-tsm inblob (REPORTDATA).
pub const INBLOB_LEN: usize = 64;

/// TEE type of a TDX quote (SGX quotes carry 0).
pub const TEE_TYPE_TDX: u32 = 0x81;

/// Length of the quote header.
pub const QUOTE_HEADER_LEN: usize = 48;

/// Offset of REPORTDATA inside a TD report body (1.0 and 1.5 alike).
pub const BODY_REPORT_DATA_OFFSET: usize = 520;

/// Length of a TD report 1.0 body (quote v4; quote v5 body type 2).
pub const TD_REPORT10_LEN: usize = 584;

/// Length of a TD report 1.5 body (quote v5 body type 3).
pub const TD_REPORT15_LEN: usize = 648;

const TEE: &str = "tdx";

fn malformed(detail: String) -> EvidenceError {
    EvidenceError::Malformed {
        tee: TEE,
        what: "td quote",
        detail,
    }
}

fn u16_at(bytes: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([bytes[at], bytes[at + 1]])
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

/// The REPORTDATA of a TD quote, after checking the header (version 4 or 5, TEE type
/// 0x81) and, for version 5, the body descriptor.
pub fn quote_report_data(quote: &[u8]) -> Result<[u8; 64], EvidenceError> {
    if quote.len() < QUOTE_HEADER_LEN {
        return Err(malformed(format!(
            "{} bytes, shorter than the {QUOTE_HEADER_LEN}-byte header",
            quote.len()
        )));
    }
    let version = u16_at(quote, 0);
    let tee_type = u32_at(quote, 4);
    if tee_type != TEE_TYPE_TDX {
        return Err(malformed(format!(
            "tee type {tee_type:#x}, expected {TEE_TYPE_TDX:#x} (TDX); the tdx_guest driver \
             returned a quote of another TEE"
        )));
    }
    let (body_start, body_len) = match version {
        4 => (QUOTE_HEADER_LEN, TD_REPORT10_LEN),
        5 => {
            if quote.len() < QUOTE_HEADER_LEN + 6 {
                return Err(malformed(format!(
                    "version 5 quote of {} bytes has no body descriptor",
                    quote.len()
                )));
            }
            let body_type = u16_at(quote, QUOTE_HEADER_LEN);
            let size = u32_at(quote, QUOTE_HEADER_LEN + 2) as usize;
            let expected = match body_type {
                2 => TD_REPORT10_LEN,
                3 => TD_REPORT15_LEN,
                other => {
                    return Err(malformed(format!(
                        "version 5 body type {other}, expected 2 (TD report 1.0) or 3 \
                         (TD report 1.5)"
                    )))
                }
            };
            if size != expected {
                return Err(malformed(format!(
                    "version 5 body type {body_type} has size {size}, expected {expected}"
                )));
            }
            (QUOTE_HEADER_LEN + 6, expected)
        }
        other => return Err(malformed(format!("version {other}, expected 4 or 5"))),
    };
    if quote.len() < body_start + body_len {
        return Err(malformed(format!(
            "version {version} quote is {} bytes, too short for its {body_len}-byte TD report \
             body at offset {body_start}",
            quote.len()
        )));
    }
    let at = body_start + BODY_REPORT_DATA_OFFSET;
    let mut data = [0u8; 64];
    data.copy_from_slice(&quote[at..at + 64]);
    Ok(data)
}

/// Checks a quote's header and that its REPORTDATA is `inblob`.
pub fn check_quote(quote: &[u8], inblob: &[u8; INBLOB_LEN]) -> Result<(), EvidenceError> {
    let found = quote_report_data(quote)?;
    if &found != inblob {
        return Err(malformed(format!(
            "REPORTDATA is {}, expected {} (the data written to inblob); another writer may \
             have used the configfs-tsm entry",
            hex::encode(found),
            hex::encode(inblob)
        )));
    }
    Ok(())
}

/// The raw quote inside an evidence JSON (the inverse of the daemon's `TdxProvider` evidence and
/// checkpoint, for auditors and tests): exactly the fields `quote` (standard base64) and
/// `cc_eventlog` (standard base64 or `null`). The quote itself is not checked here; call
/// [`check_quote`] with the expected REPORTDATA.
pub fn quote_from_evidence(evidence: &Value) -> Result<Vec<u8>, EvidenceError> {
    let bad = |detail: String| EvidenceError::Malformed {
        tee: TEE,
        what: "evidence",
        detail,
    };
    let object = evidence
        .as_object()
        .ok_or_else(|| bad(format!("not a json object: {evidence}")))?;
    if let Some(extra) = object
        .keys()
        .find(|k| k.as_str() != "quote" && k.as_str() != "cc_eventlog")
    {
        return Err(bad(format!(
            "unexpected field {extra:?}; tdx evidence has only \"quote\" and \"cc_eventlog\""
        )));
    }
    match object.get("cc_eventlog") {
        Some(Value::Null) => {}
        Some(Value::String(text)) => {
            STANDARD
                .decode(text)
                .map_err(|e| bad(format!("cc_eventlog is not standard base64: {e}")))?;
        }
        Some(other) => {
            return Err(bad(format!(
                "cc_eventlog is neither a string nor null: {other}"
            )))
        }
        None => {
            return Err(bad(
                "no cc_eventlog field (null when there is none)".to_string()
            ))
        }
    }
    let text = object
        .get("quote")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("no \"quote\" string".to_string()))?;
    STANDARD
        .decode(text)
        .map_err(|e| bad(format!("quote is not standard base64: {e}")))
}
