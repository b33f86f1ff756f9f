//! One audit record and the exact bytes of its line.
//!
//! A line is the JSON object `{"seq":…,"time":…,"stage":…,"event":…,"details":{…},
//! ["insecure":true,]"prev":"sha256:…"}` (the *body*) with `,"hash":"sha256:<hex>"` inserted
//! before its final `}`, where the hash is SHA-256 over the body's bytes. The verifier
//! checks those exact bytes, so it needs no canonical JSON: see `docs/audit-log.md`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::digest::Digest;

/// The `(stage, event)` pairs that end a run of the log. The runner's last record is exactly
/// one of these; a log whose last record is not one was cut (or the VM died).
///
/// `launch/exec` is the unit shape's last record before `execve` replaces cvm-warden;
/// `shutdown/*` ends the PID 1 shape (`exit` in a sandbox PID namespace or after a unit
/// shape failure).
pub const CLOSING_EVENTS: &[(&str, &str)] = &[
    ("launch", "exec"),
    ("shutdown", "poweroff"),
    ("shutdown", "halt"),
    ("shutdown", "exit"),
];

/// True when `(stage, event)` is one of [`CLOSING_EVENTS`].
pub fn is_closing(stage: &str, event: &str) -> bool {
    CLOSING_EVENTS
        .iter()
        .any(|(s, e)| *s == stage && *e == event)
}

/// What a line ends with, before the 64 hex digits and `"}`.
const HASH_MEMBER: &str = ",\"hash\":\"sha256:";
/// Length of `,"hash":"sha256:<64 hex>"}`.
const HASH_SUFFIX_LEN: usize = HASH_MEMBER.len() + 64 + 2;
/// The last instant `humantime` can print (end of year 9999).
const LAST_PRINTABLE_SECOND: u64 = 253_402_300_799;

/// The hashed part of a line, in its fixed key order.
#[derive(Serialize)]
struct Body<'a> {
    seq: u64,
    time: &'a str,
    stage: &'a str,
    event: &'a str,
    details: &'a Value,
    #[serde(skip_serializing_if = "is_false")]
    insecure: bool,
    prev: Digest,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// A line ready to be written (without its newline) and its hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedLine {
    /// The complete line, without the trailing `\n`.
    pub line: String,
    /// SHA-256 over the body (the line without the hash member): the next record's `prev`.
    pub hash: Digest,
}

/// The fields of a record before it is encoded.
#[derive(Debug, Clone, Copy)]
pub struct Fields<'a> {
    /// Position in the log, from 0.
    pub seq: u64,
    /// When the record was made.
    pub time: SystemTime,
    /// Boot stage (`boot`, `perimeter`, …, `audit`, `shutdown`).
    pub stage: &'a str,
    /// What happened (`begin`, `ok`, `failed`, `sink_failed`, …).
    pub event: &'a str,
    /// Details: a JSON object (see [`normalize_details`]).
    pub details: &'a Value,
    /// `attestation = "none"`: the record carries `"insecure": true`.
    pub insecure: bool,
    /// The previous record's hash ([`Digest::ZERO`] for seq 0).
    pub prev: Digest,
}

/// Encodes a record as its line and computes its hash.
///
/// `details` must already be an object ([`normalize_details`]); it is written as given.
pub fn encode(fields: &Fields<'_>) -> Result<EncodedLine, serde_json::Error> {
    let time = format_time(fields.time);
    let body = serde_json::to_string(&Body {
        seq: fields.seq,
        time: &time,
        stage: fields.stage,
        event: fields.event,
        details: fields.details,
        insecure: fields.insecure,
        prev: fields.prev,
    })?;
    let hash = Digest::of(body.as_bytes());
    // The body is a serialized struct, so it ends with `}`.
    let open = body.strip_suffix('}').unwrap_or(&body);
    let mut line = String::with_capacity(body.len() + HASH_SUFFIX_LEN);
    line.push_str(open);
    line.push_str(HASH_MEMBER);
    line.push_str(&hash.hex());
    line.push_str("\"}");
    Ok(EncodedLine { line, hash })
}

/// Makes any JSON value a details object: `null` becomes `{}`, an object stays as it is, and
/// anything else is wrapped as `{"value": …}`. Nothing is dropped.
pub fn normalize_details(details: Value) -> Value {
    match details {
        Value::Null => Value::Object(Map::new()),
        Value::Object(map) => Value::Object(map),
        other => {
            let mut map = Map::new();
            map.insert("value".to_string(), other);
            Value::Object(map)
        }
    }
}

/// RFC 3339 UTC with milliseconds, e.g. `2025-01-02T03:04:05.678Z`.
///
/// A clock before 1970 is written as the epoch and one after year 9999 as the last
/// millisecond of 9999 (the formatter cannot print either, and the audit log must never
/// panic: the panic hook writes to it).
pub fn format_time(time: SystemTime) -> String {
    let last = UNIX_EPOCH + Duration::new(LAST_PRINTABLE_SECOND, 999_000_000);
    let clamped = if time < UNIX_EPOCH {
        UNIX_EPOCH
    } else if time > last {
        last
    } else {
        time
    };
    humantime::format_rfc3339_millis(clamped).to_string()
}

/// A parsed and hash-checked line.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    /// Position in the log, from 0.
    pub seq: u64,
    /// RFC 3339 time as written.
    pub time: String,
    /// Boot stage.
    pub stage: String,
    /// What happened.
    pub event: String,
    /// Details object.
    pub details: Map<String, Value>,
    /// True when the boot ran with `attestation = "none"`.
    #[serde(default)]
    pub insecure: bool,
    /// The previous record's hash.
    pub prev: Digest,
    /// This record's hash (SHA-256 over the body).
    pub hash: Digest,
}

/// Why a line is not a well-formed record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LineError {
    /// The line does not end with `,"hash":"sha256:<64 hex>"}`.
    NoHashMember,
    /// The stated hash is not the hash of the body.
    HashMismatch {
        /// The hash written in the line.
        stated: Digest,
        /// The hash of the body's bytes.
        computed: Digest,
    },
    /// The bytes hash correctly but are not a record (bad JSON, missing or unknown members).
    Json(String),
}

impl Record {
    /// Parses one line (without its `\n`) and checks its hash over the exact bytes.
    pub fn parse_line(line: &[u8]) -> Result<Record, LineError> {
        let stated = stated_hash(line).ok_or(LineError::NoHashMember)?;
        let cut = line.len() - HASH_SUFFIX_LEN;
        let mut body = Vec::with_capacity(cut + 1);
        body.extend_from_slice(&line[..cut]);
        body.push(b'}');
        let computed = Digest::of(&body);
        if computed != stated {
            return Err(LineError::HashMismatch { stated, computed });
        }
        let record: Record =
            serde_json::from_slice(line).map_err(|e| LineError::Json(e.to_string()))?;
        if record.hash != stated {
            // Only possible when the suffix is not the real `hash` member.
            return Err(LineError::Json(
                "the hash member is not the last member of the object".to_string(),
            ));
        }
        Ok(record)
    }
}

/// The digest in the line's `,"hash":"sha256:<hex>"}` suffix, if it has one.
fn stated_hash(line: &[u8]) -> Option<Digest> {
    let start = line.len().checked_sub(HASH_SUFFIX_LEN)?;
    let suffix = &line[start..];
    let hex_part = suffix.strip_prefix(HASH_MEMBER.as_bytes())?;
    let hex_part = hex_part.strip_suffix(b"\"}")?;
    let text = std::str::from_utf8(hex_part).ok()?;
    format!("sha256:{text}").parse().ok()
}

/// The seq at the start of a line written by [`encode`] (`{"seq":N,…`), without parsing it.
pub fn leading_seq(line: &[u8]) -> Option<u64> {
    let rest = line.strip_prefix(b"{\"seq\":")?;
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use serde_json::json;

    fn at(ms: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(ms)
    }

    #[test]
    fn line_is_body_plus_hash_member_in_fixed_key_order() {
        let details = json!({"b": 1, "a": "x"});
        let enc = encode(&Fields {
            seq: 0,
            time: at(1_700_000_000_123),
            stage: "boot",
            event: "start",
            details: &details,
            insecure: false,
            prev: Digest::ZERO,
        })
        .unwrap();
        let body = format!(
            "{{\"seq\":0,\"time\":\"2023-11-14T22:13:20.123Z\",\"stage\":\"boot\",\"event\":\"start\",\"details\":{{\"a\":\"x\",\"b\":1}},\"prev\":\"{}\"}}",
            Digest::ZERO
        );
        assert_eq!(enc.hash, Digest::of(body.as_bytes()));
        let expected = format!("{},\"hash\":\"{}\"}}", &body[..body.len() - 1], enc.hash);
        assert_eq!(enc.line, expected);
        let parsed = Record::parse_line(enc.line.as_bytes()).unwrap();
        assert_eq!(parsed.seq, 0);
        assert!(!parsed.insecure);
        assert_eq!(parsed.hash, enc.hash);
    }

    #[test]
    fn insecure_member_appears_only_when_true() {
        let details = json!({});
        let enc = encode(&Fields {
            seq: 3,
            time: at(0),
            stage: "s",
            event: "e",
            details: &details,
            insecure: true,
            prev: Digest::of(b"x"),
        })
        .unwrap();
        assert!(enc.line.contains(",\"insecure\":true,\"prev\":"));
        assert!(Record::parse_line(enc.line.as_bytes()).unwrap().insecure);
    }

    #[test]
    fn parse_line_tells_missing_hash_from_changed_bytes() {
        let details = json!({"path": "/a"});
        let enc = encode(&Fields {
            seq: 1,
            time: at(0),
            stage: "s",
            event: "e",
            details: &details,
            insecure: false,
            prev: Digest::ZERO,
        })
        .unwrap();
        let changed = enc.line.replace("/a", "/b");
        assert!(matches!(
            Record::parse_line(changed.as_bytes()),
            Err(LineError::HashMismatch { .. })
        ));
        let cut = &enc.line[..enc.line.len() - 1];
        assert_eq!(
            Record::parse_line(cut.as_bytes()),
            Err(LineError::NoHashMember)
        );
        assert_eq!(leading_seq(enc.line.as_bytes()), Some(1));
    }

    #[test]
    fn clock_outside_the_printable_range_is_clamped_not_a_panic() {
        assert_eq!(
            format_time(UNIX_EPOCH - Duration::from_secs(5)),
            "1970-01-01T00:00:00.000Z"
        );
        assert_eq!(
            format_time(UNIX_EPOCH + Duration::from_secs(400_000_000_000)),
            "9999-12-31T23:59:59.999Z"
        );
    }

    #[test]
    fn details_are_always_an_object() {
        assert_eq!(normalize_details(Value::Null), json!({}));
        assert_eq!(normalize_details(json!({"a": 1})), json!({"a": 1}));
        assert_eq!(normalize_details(json!("x")), json!({"value": "x"}));
    }
}
