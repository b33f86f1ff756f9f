//! SEV-SNP evidence as cvm-warden writes it: the GHCB certificate table and the report in
//! the `sev` crate's serde form (`{"attestation_report": …, "cert_chain": […]}`), parsed
//! strictly. Verification of the report itself is in [`super::snp`].

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sev::certs::snp::ecdsa::Signature;
use sev::firmware::guest::{AttestationReport, GuestPolicy, KeyInfo, PlatformInfo, Version};
use sev::firmware::host::TcbVersion;
use sev::parser::ByteParser;

use super::EvidenceError;

/// Size of an SEV-SNP attestation report.
pub const REPORT_LEN: usize = 1184;

/// Offset of the guest policy in the report.
const POLICY_OFFSET: usize = 0x08;

/// Size of one certificate table entry: GUID (16), offset (u32 LE), length (u32 LE).
const CERT_TABLE_ENTRY_LEN: usize = 24;

const TEE: &str = "snp";

fn malformed(what: &'static str, detail: impl Into<String>) -> EvidenceError {
    EvidenceError::Malformed {
        tee: TEE,
        what,
        detail: detail.into(),
    }
}

// ---------------------------------------------------------------------------------------
// Certificate table
// ---------------------------------------------------------------------------------------

/// The kind of a certificate table entry, serialized like `sev::firmware::host::CertType`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CertType {
    /// The all-zero GUID (end of table).
    Empty,
    /// AMD Root Key, `c0b406a4-a803-4952-9743-3fb6014cd0ae`.
    #[serde(rename = "ARK")]
    Ark,
    /// AMD SEV Key (or ASVK for a VLEK), `4ab7b379-bbac-4fe4-a02f-05aef327c782`.
    #[serde(rename = "ASK")]
    Ask,
    /// Versioned Chip Endorsement Key, `63da758d-e664-4564-adc5-f4b93be8accd`.
    #[serde(rename = "VCEK")]
    Vcek,
    /// Versioned Loaded Endorsement Key, `a8074bc2-a25a-483e-aae6-39c045a0b8a1`.
    #[serde(rename = "VLEK")]
    Vlek,
    /// Certificate revocation list, `92f81bc3-5811-4d3d-97ff-d19f88dc67ea`.
    #[serde(rename = "CRL")]
    Crl,
    /// Any other GUID (lowercase, hyphenated).
    #[serde(rename = "OTHER")]
    Other(String),
}

const GUIDS: [(CertType, [u8; 16]); 5] = [
    (
        CertType::Ark,
        [
            0xc0, 0xb4, 0x06, 0xa4, 0xa8, 0x03, 0x49, 0x52, 0x97, 0x43, 0x3f, 0xb6, 0x01, 0x4c,
            0xd0, 0xae,
        ],
    ),
    (
        CertType::Ask,
        [
            0x4a, 0xb7, 0xb3, 0x79, 0xbb, 0xac, 0x4f, 0xe4, 0xa0, 0x2f, 0x05, 0xae, 0xf3, 0x27,
            0xc7, 0x82,
        ],
    ),
    (
        CertType::Vcek,
        [
            0x63, 0xda, 0x75, 0x8d, 0xe6, 0x64, 0x45, 0x64, 0xad, 0xc5, 0xf4, 0xb9, 0x3b, 0xe8,
            0xac, 0xcd,
        ],
    ),
    (
        CertType::Vlek,
        [
            0xa8, 0x07, 0x4b, 0xc2, 0xa2, 0x5a, 0x48, 0x3e, 0xaa, 0xe6, 0x39, 0xc0, 0x45, 0xa0,
            0xb8, 0xa1,
        ],
    ),
    (
        CertType::Crl,
        [
            0x92, 0xf8, 0x1b, 0xc3, 0x58, 0x11, 0x4d, 0x3d, 0x97, 0xff, 0xd1, 0x9f, 0x88, 0xdc,
            0x67, 0xea,
        ],
    ),
];

/// A GUID in its usual text form (`8-4-4-4-12` hex digits).
pub fn guid_string(g: &[u8; 16]) -> String {
    let h = hex::encode(g);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

impl CertType {
    /// The kind for a GUID as it appears in the table (RFC 4122 byte order).
    pub fn from_guid(guid: &[u8; 16]) -> Self {
        if guid == &[0u8; 16] {
            return CertType::Empty;
        }
        GUIDS
            .iter()
            .find(|(_, g)| g == guid)
            .map(|(t, _)| t.clone())
            .unwrap_or_else(|| CertType::Other(guid_string(guid)))
    }

    /// The GUID bytes of a known kind (`None` for [`CertType::Other`] with a bad string).
    pub fn guid(&self) -> Option<[u8; 16]> {
        match self {
            CertType::Empty => Some([0; 16]),
            CertType::Other(s) => {
                let bytes = hex::decode(s.replace('-', "")).ok()?;
                bytes.try_into().ok()
            }
            known => GUIDS.iter().find(|(t, _)| t == known).map(|(_, g)| *g),
        }
    }

    pub fn is_endorsement_key(&self) -> bool {
        matches!(self, CertType::Vcek | CertType::Vlek)
    }
}

impl fmt::Display for CertType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CertType::Empty => f.write_str("empty"),
            CertType::Ark => f.write_str("ARK"),
            CertType::Ask => f.write_str("ASK"),
            CertType::Vcek => f.write_str("VCEK"),
            CertType::Vlek => f.write_str("VLEK"),
            CertType::Crl => f.write_str("CRL"),
            CertType::Other(g) => write!(f, "GUID {g}"),
        }
    }
}

/// One certificate, serialized like `sev::firmware::host::CertTableEntry`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertTableEntry {
    /// What the certificate is.
    pub cert_type: CertType,
    /// The certificate (DER for the AMD keys).
    pub data: Vec<u8>,
}

/// Parses a GHCB certificate table (SNP extended guest request; configfs-tsm `auxblob`
/// for `sev_guest`): 24-byte entries of GUID, offset and length (u32 little-endian, offsets
/// from the start of the table) ended by an all-zero GUID; the certificates follow.
/// Every entry must lie inside the table and outside the entry array.
pub fn parse_cert_table(table: &[u8]) -> Result<Vec<CertTableEntry>, EvidenceError> {
    let mut entries = Vec::new();
    let mut at = 0;
    loop {
        let Some(raw) = table.get(at..at + CERT_TABLE_ENTRY_LEN) else {
            return Err(malformed(
                "certificate table",
                format!(
                    "no terminating all-zero entry within {} bytes (after {} entries)",
                    table.len(),
                    entries.len()
                ),
            ));
        };
        let mut guid = [0u8; 16];
        guid.copy_from_slice(&raw[..16]);
        let offset = u32::from_le_bytes([raw[16], raw[17], raw[18], raw[19]]) as usize;
        let length = u32::from_le_bytes([raw[20], raw[21], raw[22], raw[23]]) as usize;
        at += CERT_TABLE_ENTRY_LEN;
        let cert_type = CertType::from_guid(&guid);
        if cert_type == CertType::Empty {
            break;
        }
        entries.push((cert_type, offset, length));
    }
    let header_end = at;
    entries
        .into_iter()
        .map(|(cert_type, offset, length)| {
            let end = offset.checked_add(length).filter(|end| *end <= table.len());
            match end {
                Some(end) if offset >= header_end && length > 0 => Ok(CertTableEntry {
                    cert_type,
                    data: table[offset..end].to_vec(),
                }),
                _ => Err(malformed(
                    "certificate table",
                    format!(
                        "{cert_type} entry at offset {offset} with length {length} does not lie \
                         between the entry array (ends at {header_end}) and the end of the \
                         table ({} bytes)",
                        table.len()
                    ),
                )),
            }
        })
        .collect()
}

/// Builds a GHCB certificate table from entries (the inverse of [`parse_cert_table`]; for
/// fakes and tests). Entries whose kind has no GUID are skipped.
pub fn encode_cert_table(entries: &[CertTableEntry]) -> Vec<u8> {
    let entries: Vec<_> = entries
        .iter()
        .filter_map(|e| e.cert_type.guid().map(|g| (g, &e.data)))
        .collect();
    let mut offset = (entries.len() + 1) * CERT_TABLE_ENTRY_LEN;
    let mut head = Vec::new();
    let mut body = Vec::new();
    for (guid, data) in entries {
        head.extend_from_slice(&guid);
        head.extend_from_slice(&(offset as u32).to_le_bytes());
        head.extend_from_slice(&(data.len() as u32).to_le_bytes());
        body.extend_from_slice(data);
        offset += data.len();
    }
    head.extend_from_slice(&[0u8; CERT_TABLE_ENTRY_LEN]);
    head.extend_from_slice(&body);
    head
}

// ---------------------------------------------------------------------------------------
// Report JSON (the `sev` crate's serde form)
// ---------------------------------------------------------------------------------------

/// A TCB version in the `sev` serde form.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TcbJson {
    /// FMC SVN (Turin and later), else null.
    pub fmc: Option<u8>,
    /// Boot loader SVN.
    pub bootloader: u8,
    /// PSP OS SVN.
    pub tee: u8,
    /// SNP firmware SVN.
    pub snp: u8,
    /// Microcode patch level.
    pub microcode: u8,
}

impl From<&TcbVersion> for TcbJson {
    fn from(t: &TcbVersion) -> Self {
        Self {
            fmc: t.fmc,
            bootloader: t.bootloader,
            tee: t.tee,
            snp: t.snp,
            microcode: t.microcode,
        }
    }
}

impl From<&TcbJson> for TcbVersion {
    fn from(t: &TcbJson) -> Self {
        TcbVersion {
            fmc: t.fmc,
            bootloader: t.bootloader,
            tee: t.tee,
            snp: t.snp,
            microcode: t.microcode,
        }
    }
}

/// A firmware version in the `sev` serde form.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionJson {
    /// Major.
    pub major: u8,
    /// Minor.
    pub minor: u8,
    /// Build.
    pub build: u8,
}

/// The report signature in the `sev` serde form.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignatureJson {
    /// R, 72 bytes little-endian.
    pub r: Vec<u8>,
    /// S, 72 bytes little-endian.
    pub s: Vec<u8>,
}

/// `sev::firmware::guest::AttestationReport` in its serde form, written without the `sev`
/// `serde` feature (module documentation). Byte arrays are `Vec<u8>` here; their lengths
/// are checked when converting back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)] // the fields are the report fields of the SEV-SNP ABI, named as in `sev`
pub struct ReportJson {
    pub version: u32,
    pub guest_svn: u32,
    pub policy: u64,
    pub family_id: Vec<u8>,
    pub image_id: Vec<u8>,
    pub vmpl: u32,
    pub sig_algo: u32,
    pub current_tcb: TcbJson,
    pub plat_info: u64,
    pub key_info: u32,
    pub report_data: Vec<u8>,
    pub measurement: Vec<u8>,
    pub host_data: Vec<u8>,
    pub id_key_digest: Vec<u8>,
    pub author_key_digest: Vec<u8>,
    pub report_id: Vec<u8>,
    pub report_id_ma: Vec<u8>,
    pub reported_tcb: TcbJson,
    pub cpuid_fam_id: Option<u8>,
    pub cpuid_mod_id: Option<u8>,
    pub cpuid_step: Option<u8>,
    pub chip_id: Vec<u8>,
    pub committed_tcb: TcbJson,
    pub current: VersionJson,
    pub committed: VersionJson,
    pub launch_tcb: TcbJson,
    pub launch_mit_vector: Option<u64>,
    pub current_mit_vector: Option<u64>,
    pub signature: SignatureJson,
}

/// Parses a raw report strictly: 1184 bytes, the `sev` parser, byte-exact re-encoding.
fn parse_report(report: &[u8]) -> Result<AttestationReport, EvidenceError> {
    if report.len() != REPORT_LEN {
        return Err(malformed(
            "attestation report",
            format!("{} bytes, expected {REPORT_LEN}", report.len()),
        ));
    }
    if report[POLICY_OFFSET + 2] & 0x02 == 0 {
        return Err(malformed(
            "attestation report",
            "its guest policy lacks bit 17, which the SEV-SNP ABI requires to be one",
        ));
    }
    let parsed = AttestationReport::from_bytes(report)
        .map_err(|e| malformed("attestation report", format!("does not parse: {e}")))?;
    let again = parsed
        .to_bytes()
        .map_err(|e| malformed("attestation report", format!("does not re-encode: {e}")))?;
    if again.as_slice() != report {
        return Err(malformed(
            "attestation report",
            "does not re-encode to the same bytes (non-zero reserved fields?)",
        ));
    }
    Ok(parsed)
}

impl ReportJson {
    /// The JSON form of a raw 1184-byte report (parsed strictly).
    pub fn from_report(report: &[u8]) -> Result<Self, EvidenceError> {
        let r = parse_report(report)?;
        let mut policy = [0u8; 8];
        policy.copy_from_slice(&report[POLICY_OFFSET..POLICY_OFFSET + 8]);
        Ok(Self {
            version: r.version,
            guest_svn: r.guest_svn,
            // The raw field: `u64::from(GuestPolicy)` would force the reserved bit 17.
            policy: u64::from_le_bytes(policy),
            family_id: r.family_id.to_vec(),
            image_id: r.image_id.to_vec(),
            vmpl: r.vmpl,
            sig_algo: r.sig_algo,
            current_tcb: (&r.current_tcb).into(),
            plat_info: u64::from(r.plat_info),
            key_info: u32::from(r.key_info),
            report_data: r.report_data.to_vec(),
            measurement: r.measurement.to_vec(),
            host_data: r.host_data.to_vec(),
            id_key_digest: r.id_key_digest.to_vec(),
            author_key_digest: r.author_key_digest.to_vec(),
            report_id: r.report_id.to_vec(),
            report_id_ma: r.report_id_ma.to_vec(),
            reported_tcb: (&r.reported_tcb).into(),
            cpuid_fam_id: r.cpuid_fam_id,
            cpuid_mod_id: r.cpuid_mod_id,
            cpuid_step: r.cpuid_step,
            chip_id: r.chip_id.to_vec(),
            committed_tcb: (&r.committed_tcb).into(),
            current: VersionJson {
                major: r.current.major,
                minor: r.current.minor,
                build: r.current.build,
            },
            committed: VersionJson {
                major: r.committed.major,
                minor: r.committed.minor,
                build: r.committed.build,
            },
            launch_tcb: (&r.launch_tcb).into(),
            launch_mit_vector: r.launch_mit_vector,
            current_mit_vector: r.current_mit_vector,
            signature: SignatureJson {
                r: r.signature.r().to_vec(),
                s: r.signature.s().to_vec(),
            },
        })
    }

    /// The raw 1184 bytes this JSON describes (checked: the result parses back to the same
    /// JSON).
    pub fn to_report(&self) -> Result<Vec<u8>, EvidenceError> {
        fn arr<const N: usize>(name: &'static str, v: &[u8]) -> Result<[u8; N], EvidenceError> {
            v.try_into().map_err(|_| {
                malformed(
                    "attestation report json",
                    format!("{name} has {} bytes, expected {N}", v.len()),
                )
            })
        }
        let version = |v: &VersionJson| Version {
            major: v.major,
            minor: v.minor,
            build: v.build,
        };
        let report = AttestationReport {
            version: self.version,
            guest_svn: self.guest_svn,
            policy: GuestPolicy::from(self.policy),
            family_id: arr("family_id", &self.family_id)?,
            image_id: arr("image_id", &self.image_id)?,
            vmpl: self.vmpl,
            sig_algo: self.sig_algo,
            current_tcb: (&self.current_tcb).into(),
            plat_info: PlatformInfo::from(self.plat_info),
            key_info: KeyInfo::from(self.key_info),
            report_data: arr("report_data", &self.report_data)?,
            measurement: arr("measurement", &self.measurement)?,
            host_data: arr("host_data", &self.host_data)?,
            id_key_digest: arr("id_key_digest", &self.id_key_digest)?,
            author_key_digest: arr("author_key_digest", &self.author_key_digest)?,
            report_id: arr("report_id", &self.report_id)?,
            report_id_ma: arr("report_id_ma", &self.report_id_ma)?,
            reported_tcb: (&self.reported_tcb).into(),
            cpuid_fam_id: self.cpuid_fam_id,
            cpuid_mod_id: self.cpuid_mod_id,
            cpuid_step: self.cpuid_step,
            chip_id: arr("chip_id", &self.chip_id)?,
            committed_tcb: (&self.committed_tcb).into(),
            current: version(&self.current),
            committed: version(&self.committed),
            launch_tcb: (&self.launch_tcb).into(),
            launch_mit_vector: self.launch_mit_vector,
            current_mit_vector: self.current_mit_vector,
            signature: Signature::new(
                arr("signature.r", &self.signature.r)?,
                arr("signature.s", &self.signature.s)?,
            ),
        };
        let bytes = report
            .to_bytes()
            .map_err(|e| malformed("attestation report json", format!("cannot encode: {e}")))?
            .to_vec();
        let back = Self::from_report(&bytes)?;
        if &back != self {
            // Name the fields the layout could not hold.
            let (ours, theirs) = (
                serde_json::to_value(self).unwrap_or_default(),
                serde_json::to_value(&back).unwrap_or_default(),
            );
            let fields: Vec<&str> = ours
                .as_object()
                .into_iter()
                .flatten()
                .filter(|(key, value)| theirs.get(key.as_str()) != Some(value))
                .map(|(key, _)| key.as_str())
                .collect();
            return Err(malformed(
                "attestation report json",
                format!(
                    "does not describe a report exactly (a field the report layout cannot hold: {})",
                    fields.join(", ")
                ),
            ));
        }
        Ok(bytes)
    }
}

/// The evidence JSON ([`crate::schema::SnpEvidence`]) for a raw report and an optional
/// certificate chain.
pub fn evidence_json(
    report: &[u8],
    cert_chain: Option<&[CertTableEntry]>,
) -> Result<Value, EvidenceError> {
    let evidence = crate::schema::SnpEvidence {
        attestation_report: ReportJson::from_report(report)?,
        cert_chain: cert_chain.map(<[CertTableEntry]>::to_vec),
    };
    serde_json::to_value(evidence).map_err(|e| malformed("evidence", format!("cannot encode: {e}")))
}

/// The raw report inside an evidence JSON (the inverse of [`evidence_json`], for auditors
/// and tests).
pub fn report_from_evidence(evidence: &Value) -> Result<Vec<u8>, EvidenceError> {
    let report = evidence
        .get("attestation_report")
        .ok_or_else(|| malformed("evidence", "no attestation_report field"))?;
    let parsed: ReportJson = serde_json::from_value(report.clone())
        .map_err(|e| malformed("evidence", format!("attestation_report: {e}")))?;
    parsed.to_report()
}
