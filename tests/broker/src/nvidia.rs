//! NVIDIA GPU additional evidence, verified the way Trustee's *Local* NVIDIA verifier does
//! (`deps/verifier/src/nvidia/`, see `../shared/GPU-ATTESTATION.md` §1, §2, §4), written
//! here independently of cvm-warden's verifier crate.
//!
//! Per device: `arch` must be Hopper (Blackwell and LS10 are refused, as Trustee Local does);
//! `evidence` is hex (tried first) or base64 of the NVML report = SPDM 1.1 GET_MEASUREMENTS
//! request (37 bytes) ‖ MEASUREMENTS response, parsed by its fields (trailing bytes after the
//! signature are tolerated); `certificate` is base64 of the PEM chain, leaf first. Checks:
//! the request nonce equals the session's device nonce; the chain's last certificate is a
//! pinned root (NVIDIA's device identity root, baked in, or a configured extra root) and every
//! link verifies (ECDSA P-384/SHA-384, issuer = subject, issuers are CAs, each certificate
//! valid now); the leaf's FWID (extension 2.23.133.5.4.1) is present and equals the report's
//! opaque FWID; the ECDSA P-384 signature over request ‖ response-up-to-the-signature
//! verifies with the leaf key. The claims are Trustee's: `{arch, uuid, measurements{"1".."N"},
//! config{<opaque fields>}}`.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use p384::ecdsa::signature::Verifier;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};
use x509_cert::der::{Decode, Encode};
use x509_cert::Certificate;

/// NVIDIA's device identity root (nvtrust `verifier_device_root.pem`; see
/// `nvidia_device_root.NOTICE`).
pub const NVIDIA_DEVICE_ROOT_PEM: &str = include_str!("nvidia_device_root.pem");
/// SHA-256 of the root's DER, pinned.
pub const NVIDIA_DEVICE_ROOT_SHA256: &str =
    "102bf659d5419614c9d8e6aecebc80454eb26b1df6a769ac720b9a690b167b48";

/// Length of the SPDM GET_MEASUREMENTS request NVML puts before the response.
pub const SPDM_REQUEST_LEN: usize = 37;
/// The only SPDM version accepted (Trustee's `SPDM_VERSION_SUPPORTED`).
pub const SPDM_VERSION: u8 = 0x11;
/// ECDSA P-384 `r‖s`.
pub const SIGNATURE_LEN: usize = 96;
/// Opaque data type of the firmware ID.
const OPAQUE_FWID: u16 = 20;
/// The Hopper FWID extension (TCG DICE `tcg-dice-FWID`-style, 2.23.133.5.4.1).
const FWID_OID: &str = "2.23.133.5.4.1";
const ECDSA_WITH_SHA384: &str = "1.2.840.10045.4.3.3";
const BASIC_CONSTRAINTS: &str = "2.5.29.19";

/// Which check failed (tests and the request log tell cases apart by it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The JSON, encoding or report layout is wrong.
    Format,
    /// An architecture the local verifier does not verify.
    Architecture,
    /// The report's request nonce is not this session's device nonce.
    Nonce,
    /// The chain does not end at a pinned root.
    UnknownRoot,
    /// A chain link, validity period or CA flag is wrong.
    Chain,
    /// The FWID is missing or differs between leaf and report.
    Fwid,
    /// The report signature does not verify with the leaf key.
    Signature,
}

/// Why GPU evidence was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NvidiaError {
    /// The failed check.
    pub failure: Failure,
    /// What, with the values involved (never a secret: evidence is public).
    pub detail: String,
}

impl std::fmt::Display for NvidiaError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}: {}", self.failure, self.detail)
    }
}

fn fail<T>(failure: Failure, detail: impl Into<String>) -> Result<T, NvidiaError> {
    Err(NvidiaError {
        failure,
        detail: detail.into(),
    })
}

/// One root a GPU chain may end at.
#[derive(Debug, Clone)]
struct Root {
    name: String,
    sha256: [u8; 32],
}

/// The pinned roots: NVIDIA's device identity root plus configured extra (test) roots.
#[derive(Debug, Clone)]
pub struct Roots {
    roots: Vec<Root>,
}

impl Roots {
    /// NVIDIA's root only; `Err` if the baked copy does not have the pinned fingerprint.
    pub fn nvidia() -> Result<Self, String> {
        let ders = pem_certificates(NVIDIA_DEVICE_ROOT_PEM.as_bytes())?;
        let [der] = ders.as_slice() else {
            return Err("the baked NVIDIA root PEM does not hold exactly one certificate".into());
        };
        let sha256: [u8; 32] = Sha256::digest(der).into();
        if hex::encode(sha256) != NVIDIA_DEVICE_ROOT_SHA256 {
            return Err(format!(
                "the baked NVIDIA root has SHA-256 {}, not the pinned {NVIDIA_DEVICE_ROOT_SHA256}",
                hex::encode(sha256)
            ));
        }
        Ok(Roots {
            roots: vec![Root {
                name: "nvidia".to_string(),
                sha256,
            }],
        })
    }

    /// Also accept every certificate of `pem` as a root, named `name` in the claims.
    pub fn with_extra(mut self, name: &str, pem: &[u8]) -> Result<Self, String> {
        let ders = pem_certificates(pem)?;
        if ders.is_empty() {
            return Err(format!("{name}: no CERTIFICATE block"));
        }
        for der in ders {
            Certificate::from_der(&der)
                .map_err(|e| format!("{name}: not an X.509 certificate: {e}"))?;
            self.roots.push(Root {
                name: name.to_string(),
                sha256: Sha256::digest(&der).into(),
            });
        }
        Ok(self)
    }

    fn find(&self, der: &[u8]) -> Option<&Root> {
        let sha256: [u8; 32] = Sha256::digest(der).into();
        self.roots.iter().find(|r| r.sha256 == sha256)
    }
}

/// The DER certificates of a PEM text, in order.
pub fn pem_certificates(pem: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    let text = std::str::from_utf8(pem).map_err(|_| "the PEM chain is not UTF-8".to_string())?;
    let mut out = Vec::new();
    let mut body: Option<String> = None;
    for line in text.lines().map(str::trim) {
        match (line, body.as_mut()) {
            ("-----BEGIN CERTIFICATE-----", None) => body = Some(String::new()),
            ("-----END CERTIFICATE-----", Some(b64)) => {
                let der = STANDARD
                    .decode(b64.as_bytes())
                    .map_err(|_| format!("PEM certificate {} is not base64", out.len()))?;
                out.push(der);
                body = None;
            }
            (_, Some(b64)) => b64.push_str(line),
            _ => {}
        }
    }
    if body.is_some() {
        return Err(format!("PEM certificate {} has no END line", out.len()));
    }
    Ok(out)
}

/// One measurement block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Measurement {
    /// SPDM block index (1-based).
    pub index: u8,
    /// DMTF value type.
    pub value_type: u8,
    /// The value (a SHA-384 digest in every known report).
    pub value: Vec<u8>,
}

/// A report parsed by its fields.
#[derive(Debug, Clone)]
pub struct Report {
    /// The request nonce (the verifier's 32 bytes).
    pub request_nonce: [u8; 32],
    /// The measurement blocks.
    pub measurements: Vec<Measurement>,
    /// Opaque fields in Trustee's claim form (`driver_version`, `vbios_version`, `fwid`, …).
    pub opaque: Map<String, Value>,
    /// Raw opaque FWID (type 20), if present.
    pub fwid: Option<Vec<u8>>,
    /// Bytes covered by the signature: request ‖ response up to the signature.
    pub signed_len: usize,
    /// The signature, `r‖s`.
    pub signature: [u8; SIGNATURE_LEN],
}

fn take<'a>(bytes: &'a [u8], at: usize, len: usize, what: &str) -> Result<&'a [u8], NvidiaError> {
    match at.checked_add(len).and_then(|end| bytes.get(at..end)) {
        Some(slice) => Ok(slice),
        None => fail(
            Failure::Format,
            format!(
                "{what} ({len} bytes at offset {at}) runs past the end of the {}-byte report",
                bytes.len()
            ),
        ),
    }
}

fn u16le(b: &[u8]) -> usize {
    usize::from(b[0]) | usize::from(b[1]) << 8
}

/// Parse a report (request ‖ response). Lengths come from the fields; bytes after the
/// signature are ignored, as Trustee ignores them.
pub fn parse_report(bytes: &[u8]) -> Result<Report, NvidiaError> {
    let request = take(
        bytes,
        0,
        SPDM_REQUEST_LEN,
        "the SPDM GET_MEASUREMENTS request",
    )?;
    if request[0] != SPDM_VERSION || request[1] != 0xE0 {
        return fail(
            Failure::Format,
            format!(
                "the request starts {:02x} {:02x}, not SPDM 1.1 GET_MEASUREMENTS (11 e0)",
                request[0], request[1]
            ),
        );
    }
    let mut request_nonce = [0u8; 32];
    request_nonce.copy_from_slice(&request[4..36]);
    let base = SPDM_REQUEST_LEN;
    let header = take(bytes, base, 8, "the MEASUREMENTS response header")?;
    if header[0] != SPDM_VERSION {
        return fail(
            Failure::Format,
            format!("SPDM version {:#04x} not supported (only 0x11)", header[0]),
        );
    }
    if header[1] != 0x60 {
        return fail(
            Failure::Format,
            format!(
                "response code {:#04x} is not MEASUREMENTS (0x60)",
                header[1]
            ),
        );
    }
    let blocks = usize::from(header[4]);
    let record_len =
        usize::from(header[5]) | usize::from(header[6]) << 8 | usize::from(header[7]) << 16;
    let record = take(bytes, base + 8, record_len, "the measurement record")?;
    let mut measurements = Vec::with_capacity(blocks);
    let mut off = 0;
    for n in 0..blocks {
        let head = take(record, off, 4, &format!("measurement block {n} header"))?;
        if head[1] != 1 {
            return fail(
                Failure::Format,
                format!(
                    "measurement block {} has specification {} (only DMTF, 1, is supported)",
                    head[0], head[1]
                ),
            );
        }
        let size = u16le(&head[2..4]);
        let m = take(
            record,
            off + 4,
            size,
            &format!("measurement block {}", head[0]),
        )?;
        if m.len() < 3 {
            return fail(
                Failure::Format,
                format!("measurement block {} is shorter than 3 bytes", head[0]),
            );
        }
        let value = take(
            m,
            3,
            u16le(&m[1..3]),
            &format!("measurement {} value", head[0]),
        )?;
        measurements.push(Measurement {
            index: head[0],
            value_type: m[0],
            value: value.to_vec(),
        });
        off += 4 + size;
    }
    let mut at = base + 8 + record_len + 32; // the responder's own nonce is not checked
    let opaque_len = u16le(take(bytes, at, 2, "OpaqueLength")?);
    at += 2;
    let opaque_bytes = take(bytes, at, opaque_len, "the opaque data")?;
    at += opaque_len;
    let sig = take(bytes, at, SIGNATURE_LEN, "the signature")?;
    let mut signature = [0u8; SIGNATURE_LEN];
    signature.copy_from_slice(sig);
    let (opaque, fwid) = decode_opaque(opaque_bytes)?;
    Ok(Report {
        request_nonce,
        measurements,
        opaque,
        fwid,
        signed_len: at,
        signature,
    })
}

/// Trustee's names of the opaque data types (`OpaqueDataType`'s Display).
fn opaque_name(kind: u16) -> Option<&'static str> {
    Some(match kind {
        1 => "cert_issuer_name",
        2 => "cert_authority_key_identifier",
        3 => "driver_version",
        4 => "gpu_info",
        5 => "id_sku",
        6 => "vbios_version",
        7 => "manufacturer_id",
        8 => "tamper_detection",
        9 => "smc",
        10 => "vpr",
        11 => "nvdec0_status",
        12 => "measurement_count",
        13 => "cpr_info",
        14 => "board_id",
        15 => "chip_sku",
        16 => "chip_sku_mod",
        17 => "project",
        18 => "project_sku",
        19 => "project_sku_mod",
        20 => "fwid",
        21 => "protected_pcie_status",
        22 => "switch_pdi",
        23 => "floorswept_ports",
        24 => "position_id",
        25 => "lock_switch_status",
        32 => "gpu_link_conn",
        33 => "sys_enable_status",
        34 => "opaque_data_version",
        35 => "chip_info",
        36 => "feature_flag",
        _ => return None,
    })
}

fn le_u64(data: &[u8], name: &str) -> Result<u64, NvidiaError> {
    if data.len() > 8 {
        return fail(
            Failure::Format,
            format!("opaque {name} is {} bytes, more than 8", data.len()),
        );
    }
    let mut padded = [0u8; 8];
    padded[..data.len()].copy_from_slice(data);
    Ok(u64::from_le_bytes(padded))
}

/// Opaque fields in claim form, and the raw FWID if present.
type Opaque = (Map<String, Value>, Option<Vec<u8>>);

/// Decode the NVIDIA opaque TLVs into Trustee's claim values (text fields as text, the
/// VBIOS version formatted, measurement counts and PDIs as lists, the rest hex). Unknown or
/// repeated types, a truncated item, or a report without both versions are errors.
fn decode_opaque(bytes: &[u8]) -> Result<Opaque, NvidiaError> {
    let mut out = Map::new();
    let mut fwid = None;
    let mut at = 0;
    while at < bytes.len() {
        let head = take(bytes, at, 4, "an opaque item header")?;
        let kind = u16le(&head[0..2]);
        let size = u16le(&head[2..4]);
        let data = take(bytes, at + 4, size, &format!("opaque item type {kind}"))?;
        at += 4 + size;
        let kind = u16::try_from(kind).unwrap_or(u16::MAX);
        let Some(name) = opaque_name(kind) else {
            return fail(Failure::Format, format!("invalid opaque data type {kind}"));
        };
        let text = || {
            Value::String(
                String::from_utf8_lossy(data)
                    .trim_end_matches('\0')
                    .to_string(),
            )
        };
        let value = match kind {
            // Trustee renders these bytes as text (NVDEC0/PCIe status 0x55 becomes "U").
            3 | 11 | 15 | 16 | 17 | 18 | 21 | 35 => text(),
            6 => {
                let half = data.len() / 2;
                match data.get(half) {
                    Some(fifth) if half > 0 => {
                        let mut parts: Vec<String> = data[..half]
                            .iter()
                            .rev()
                            .map(|b| format!("{b:02x}"))
                            .collect();
                        parts.push(format!("{fifth:02x}"));
                        Value::String(parts.join("."))
                    }
                    _ => return fail(Failure::Format, "invalid GPU VBIOS version"),
                }
            }
            12 => {
                if data.len() % 4 != 0 {
                    return fail(Failure::Format, "measurement_count is not a multiple of 4");
                }
                let counts: Map<String, Value> = data
                    .chunks(4)
                    .enumerate()
                    .map(|(i, c)| {
                        (
                            (i + 1).to_string(),
                            json!(u32::from_le_bytes([c[0], c[1], c[2], c[3]])),
                        )
                    })
                    .collect();
                Value::Object(counts)
            }
            22 => {
                if data.len() % 8 != 0 {
                    return fail(Failure::Format, "switch_pdi is not a multiple of 8");
                }
                Value::Array(data.chunks(8).map(|c| json!(hex::encode(c))).collect())
            }
            34 => json!(le_u64(data, name)?),
            36 => json!(match le_u64(data, name)? {
                0 => "SPT",
                1 => "MPT",
                2 => "PPCIE",
                _ => "unknown",
            }),
            _ => Value::String(hex::encode(data)),
        };
        if kind == OPAQUE_FWID {
            fwid = Some(data.to_vec());
        }
        if out.insert(name.to_string(), value).is_some() {
            return fail(
                Failure::Format,
                format!("duplicated opaque data type {name}"),
            );
        }
    }
    if !out.contains_key("vbios_version") || !out.contains_key("driver_version") {
        return fail(
            Failure::Format,
            "both vbios_version and driver_version must be present in the report",
        );
    }
    Ok((out, fwid))
}

fn p384_key(cert: &Certificate, what: &str) -> Result<p384::ecdsa::VerifyingKey, NvidiaError> {
    let spki = &cert.tbs_certificate.subject_public_key_info;
    let point = spki.subject_public_key.raw_bytes();
    p384::ecdsa::VerifyingKey::from_sec1_bytes(point).or_else(|_| {
        fail(
            Failure::Chain,
            format!(
                "{what}: the public key (algorithm {}) is not an EC P-384 key",
                spki.algorithm.oid
            ),
        )
    })
}

fn subject(cert: &Certificate) -> String {
    cert.tbs_certificate.subject.to_string()
}

fn unix(t: &x509_cert::time::Time) -> u64 {
    t.to_unix_duration().as_secs()
}

/// Verify a PEM chain (leaf first) up to a pinned root at time `now`; returns the parsed
/// certificates and the root's name.
pub fn verify_chain(
    pem: &[u8],
    roots: &Roots,
    now: SystemTime,
) -> Result<(Vec<Certificate>, String), NvidiaError> {
    let ders = pem_certificates(pem).or_else(|e| fail(Failure::Format, e))?;
    if ders.len() < 2 {
        return fail(
            Failure::Chain,
            format!(
                "the certificate chain has {} certificate(s); it must have at least the root CA \
                 and the signing certificate",
                ders.len()
            ),
        );
    }
    let certs = ders
        .iter()
        .enumerate()
        .map(|(i, der)| {
            Certificate::from_der(der).or_else(|e| {
                fail(
                    Failure::Format,
                    format!("chain certificate {i} is not X.509 DER: {e}"),
                )
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let last = certs.len() - 1;
    let Some(root) = roots.find(&ders[last]) else {
        return fail(
            Failure::UnknownRoot,
            format!(
                "the chain ends at {:?} (SHA-256 {}), which is not a pinned root (NVIDIA's \
                 device identity root {NVIDIA_DEVICE_ROOT_SHA256} or an [nvidia] extra_roots \
                 certificate)",
                subject(&certs[last]),
                hex::encode(Sha256::digest(&ders[last]))
            ),
        );
    };
    let now = now
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    for (i, cert) in certs.iter().enumerate() {
        let issuer = &certs[(i + 1).min(last)];
        let what = format!("chain certificate {i} ({:?})", subject(cert));
        let validity = &cert.tbs_certificate.validity;
        let (from, until) = (unix(&validity.not_before), unix(&validity.not_after));
        if now < from || now > until {
            return fail(
                Failure::Chain,
                format!("{what} is valid from {from} to {until} (unix seconds), not at {now}"),
            );
        }
        if cert.tbs_certificate.issuer != issuer.tbs_certificate.subject {
            return fail(
                Failure::Chain,
                format!(
                    "{what} is issued by {:?}, but the next certificate is {:?}",
                    cert.tbs_certificate.issuer.to_string(),
                    subject(issuer)
                ),
            );
        }
        if i > 0 && !is_ca(cert) {
            return fail(
                Failure::Chain,
                format!("{what} issues a certificate but is not a CA (basicConstraints)"),
            );
        }
        if cert.signature_algorithm.oid.to_string() != ECDSA_WITH_SHA384 {
            return fail(
                Failure::Chain,
                format!(
                    "{what} is signed with {}, not ecdsa-with-SHA384",
                    cert.signature_algorithm.oid
                ),
            );
        }
        let tbs = cert.tbs_certificate.to_der().or_else(|e| {
            fail(
                Failure::Format,
                format!("{what}: cannot re-encode the TBS: {e}"),
            )
        })?;
        let signature =
            p384::ecdsa::Signature::from_der(cert.signature.raw_bytes()).or_else(|_| {
                fail(
                    Failure::Chain,
                    format!("{what}: the signature is not DER ECDSA"),
                )
            })?;
        p384_key(issuer, &format!("the issuer of {what}"))?
            .verify(&tbs, &signature)
            .or_else(|_| {
                fail(
                    Failure::Chain,
                    format!(
                        "{what}: its signature does not verify with {:?}'s key",
                        subject(issuer)
                    ),
                )
            })?;
    }
    Ok((certs, root.name.clone()))
}

fn is_ca(cert: &Certificate) -> bool {
    let Some(exts) = &cert.tbs_certificate.extensions else {
        return false;
    };
    exts.iter()
        .find(|e| e.extn_id.to_string() == BASIC_CONSTRAINTS)
        .and_then(|e| {
            x509_cert::ext::pkix::BasicConstraints::from_der(e.extn_value.as_bytes()).ok()
        })
        .is_some_and(|bc| bc.ca)
}

/// The Hopper FWID of a leaf: the last 48 bytes of extension 2.23.133.5.4.1 (which ends
/// with the OCTET STRING of the SHA-384 digest).
pub fn leaf_fwid(leaf: &Certificate) -> Result<Vec<u8>, NvidiaError> {
    let ext = leaf
        .tbs_certificate
        .extensions
        .as_ref()
        .and_then(|exts| exts.iter().find(|e| e.extn_id.to_string() == FWID_OID));
    let Some(ext) = ext else {
        return fail(
            Failure::Fwid,
            format!(
                "FwId oid {FWID_OID} not found in the NVIDIA signing certificate {:?}",
                subject(leaf)
            ),
        );
    };
    let value = ext.extn_value.as_bytes();
    match value.len().checked_sub(50) {
        Some(at) if value[at] == 0x04 && value[at + 1] == 48 => Ok(value[at + 2..].to_vec()),
        _ => fail(
            Failure::Fwid,
            format!(
                "the FWID extension of {:?} does not end with a 48-byte OCTET STRING",
                subject(leaf)
            ),
        ),
    }
}

/// A verified GPU.
#[derive(Debug, Clone)]
pub struct VerifiedGpu {
    /// Trustee's claims: `{arch, uuid, measurements, config}`.
    pub claims: Value,
    /// The name of the root the chain ended at (`nvidia`, or an extra root's file).
    pub root: String,
}

/// Verify one report and its PEM chain against `nonce` (Hopper, Trustee Local's checks);
/// returns Trustee's claims for a device named `uuid`.
pub fn verify_hopper_report(
    report: &[u8],
    chain_pem: &[u8],
    nonce: &[u8; 32],
    uuid: &str,
    roots: &Roots,
    now: SystemTime,
) -> Result<VerifiedGpu, NvidiaError> {
    let parsed = parse_report(report)?;
    if &parsed.request_nonce != nonce {
        return fail(
            Failure::Nonce,
            format!(
                "the report's nonce {} is not this session's device nonce {} (first 32 bytes of \
                 SHA-384(JCS{{nonce, tee-pubkey}})): evidence made for another session",
                hex::encode(parsed.request_nonce),
                hex::encode(nonce)
            ),
        );
    }
    let (certs, root) = verify_chain(chain_pem, roots, now)?;
    let leaf = &certs[0];
    let leaf_fwid = leaf_fwid(leaf)?;
    let Some(report_fwid) = &parsed.fwid else {
        return fail(
            Failure::Fwid,
            "fwid not found in the report's opaque data (the local verifier needs a driver that \
             reports it, 550 or later)",
        );
    };
    if report_fwid != &leaf_fwid {
        return fail(
            Failure::Fwid,
            format!(
                "the report's FWID {} differs from the signing certificate's {}",
                hex::encode(report_fwid),
                hex::encode(&leaf_fwid)
            ),
        );
    }
    let signature = p384::ecdsa::Signature::from_slice(&parsed.signature).or_else(|_| {
        fail(
            Failure::Signature,
            "the report signature is not a P-384 r‖s",
        )
    })?;
    p384_key(leaf, "the signing certificate")?
        .verify(&report[..parsed.signed_len], &signature)
        .or_else(|_| {
            fail(
                Failure::Signature,
                format!(
                    "the report signature does not verify with the key of {:?} over its first {} \
                     bytes",
                    subject(leaf),
                    parsed.signed_len
                ),
            )
        })?;
    let measurements: BTreeMap<String, Value> = parsed
        .measurements
        .iter()
        .map(|m| (m.index.to_string(), json!(hex::encode(&m.value))))
        .collect();
    Ok(VerifiedGpu {
        claims: json!({
            "arch": "Hopper",
            "uuid": uuid,
            "measurements": measurements,
            "config": parsed.opaque,
        }),
        root,
    })
}

#[derive(Deserialize)]
struct DeviceEvidence {
    device_evidence_list: Vec<Device>,
}

#[derive(Deserialize)]
struct Device {
    arch: String,
    uuid: String,
    evidence: String,
    certificate: String,
}

/// Verify the `additional_evidence` string: `{"nvidia": {"device_evidence_list": [...]}}`
/// (or `{}`), every device against `nonce`. Any other device class, any architecture but
/// Hopper, or any failed check refuses the whole evidence, as Trustee does.
pub fn verify_additional_evidence(
    additional: &str,
    nonce: &[u8; 32],
    roots: &Roots,
    now: SystemTime,
) -> Result<Vec<VerifiedGpu>, NvidiaError> {
    let map: BTreeMap<String, Value> = serde_json::from_str(additional).or_else(|e| {
        fail(
            Failure::Format,
            format!("additional_evidence is not a JSON object of device evidence: {e}"),
        )
    })?;
    let mut gpus = Vec::new();
    for (class, evidence) in map {
        if class != "nvidia" {
            return fail(
                Failure::Format,
                format!(
                    "additional evidence of {class:?} is not verified by the test broker (only \
                     \"nvidia\")"
                ),
            );
        }
        let list: DeviceEvidence = serde_json::from_value(evidence).or_else(|e| {
            fail(
                Failure::Format,
                format!("failed to deserialize the NVIDIA device evidence: {e}"),
            )
        })?;
        for (n, device) in list.device_evidence_list.into_iter().enumerate() {
            match device.arch.as_str() {
                "Hopper" | "HOPPER" => {}
                "Blackwell" | "BLACKWELL" | "LS10" => {
                    return fail(
                        Failure::Architecture,
                        format!(
                            "device {n} ({}): device architecture not supported (the local NVIDIA \
                             verifier verifies Hopper only; {} needs Trustee's Remote verifier)",
                            device.uuid, device.arch
                        ),
                    )
                }
                other => {
                    return fail(
                        Failure::Format,
                        format!(
                            "device {n}: unknown variant {other:?} for arch (expected Hopper, \
                             HOPPER, Blackwell, BLACKWELL or LS10)"
                        ),
                    )
                }
            }
            let report = match hex::decode(&device.evidence) {
                Ok(bytes) => bytes,
                Err(_) => STANDARD.decode(&device.evidence).or_else(|_| {
                    fail(
                        Failure::Format,
                        format!("device {n}: evidence is neither hex nor standard base64"),
                    )
                })?,
            };
            let chain = STANDARD.decode(&device.certificate).or_else(|_| {
                fail(
                    Failure::Format,
                    format!("device {n}: certificate is not standard base64 of a PEM chain"),
                )
            })?;
            let gpu = verify_hopper_report(&report, &chain, nonce, &device.uuid, roots, now)
                .map_err(|mut e| {
                    e.detail = format!("device {n} ({}): {}", device.uuid, e.detail);
                    e
                })?;
            gpus.push(gpu);
        }
    }
    Ok(gpus)
}

/// Compare two dotted decimal versions (`"550.90.07"` vs `"550.90"`: components as numbers,
/// a missing component counts as 0); `None` if either is not dotted decimal.
pub fn compare_dotted(a: &str, b: &str) -> Option<std::cmp::Ordering> {
    let parse = |s: &str| -> Option<Vec<u64>> {
        s.split('.')
            .map(|p| {
                if p.is_empty() || !p.bytes().all(|c| c.is_ascii_digit()) {
                    None
                } else {
                    p.parse().ok()
                }
            })
            .collect()
    };
    let (a, b) = (parse(a)?, parse(b)?);
    let len = a.len().max(b.len());
    let at = |v: &[u64], i: usize| v.get(i).copied().unwrap_or(0);
    Some(
        (0..len)
            .map(|i| at(&a, i).cmp(&at(&b, i)))
            .find(|o| o.is_ne())
            .unwrap_or(std::cmp::Ordering::Equal),
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use std::cmp::Ordering;

    #[test]
    fn the_baked_root_has_the_pinned_fingerprint() {
        assert!(Roots::nvidia().is_ok());
    }

    #[test]
    fn dotted_versions_compare_as_numbers() {
        assert_eq!(
            compare_dotted("550.90.07", "550.90"),
            Some(Ordering::Greater)
        );
        assert_eq!(
            compare_dotted("550.100", "550.90.07"),
            Some(Ordering::Greater)
        );
        assert_eq!(compare_dotted("535.86.09", "550.90"), Some(Ordering::Less));
        assert_eq!(compare_dotted("550.90.0", "550.90"), Some(Ordering::Equal));
        assert_eq!(compare_dotted("550.x", "550"), None);
        assert_eq!(compare_dotted("", "1"), None);
    }

    fn item(kind: u16, data: &[u8]) -> Vec<u8> {
        let mut out = kind.to_le_bytes().to_vec();
        out.extend((data.len() as u16).to_le_bytes());
        out.extend(data);
        out
    }

    #[test]
    fn opaque_data_needs_both_versions_and_known_unique_types() {
        let mut ok = item(3, b"550.90.07\0");
        ok.extend(item(6, &[0x00, 0x9f, 0x00, 0x96, 0x01, 0, 0, 0]));
        let (map, fwid) = decode_opaque(&ok).unwrap();
        assert_eq!(map["driver_version"], "550.90.07");
        assert_eq!(map["vbios_version"], "96.00.9f.00.01");
        assert!(fwid.is_none());
        let mut dup = ok.clone();
        dup.extend(item(3, b"1\0"));
        assert!(decode_opaque(&dup)
            .unwrap_err()
            .detail
            .contains("duplicated"));
        let mut unknown = ok.clone();
        unknown.extend(item(37, b""));
        assert!(decode_opaque(&unknown).unwrap_err().detail.contains("37"));
        let mut truncated = ok.clone();
        truncated.extend([20, 0]);
        assert!(decode_opaque(&truncated).is_err());
        assert!(decode_opaque(&item(3, b"550\0"))
            .unwrap_err()
            .detail
            .contains("both"));
    }
}
