//! NVIDIA Reference Integrity Manifests (RIMs), verified offline.
//!
//! A RIM is a TCG SWID tag (ISO/IEC 19770-2 XML) listing golden GPU measurements, signed with
//! an enveloped XML signature (C14N 1.1, ecdsa-sha384, SHA-384 reference digest) whose
//! `KeyInfo/X509Data` carries the signer's chain up to the `NVIDIA CoRIM signing Root CA`.
//! NVIDIA serves one RIM per driver version (`NV_GPU_DRIVER_GH100_<driver>`) and one per
//! VBIOS (`NV_GPU_VBIOS_<project>_<sku>_<chip sku>_<vbios>`); cvm-warden ships them in the
//! image instead of calling NVIDIA's RIM service.
//!
//! - [`parse`]: the tag (`Meta` version and product, `Payload/Resource` measurements) and the
//!   signature's parts, refusing anything outside the subset NVIDIA uses;
//! - [`Rim::verify_signature`]: reference digest, ECDSA P-384 signature (raw `r‖s`, RFC 4050)
//!   over the canonical `SignedInfo`, the chain to the baked root pinned by SHA-256
//!   ([`RIM_ROOT_SHA256`]), each certificate valid at the given time (RIM signers are
//!   short-lived: pass the time the RIM must be judged at);
//! - [`match_measurements`]: the report's measurements against the active `Resource`s of a
//!   driver and a VBIOS RIM, as NVIDIA's verifiers do (nvtrust `verifier.py`, NVAT
//!   `verify.cpp`).
//!
//! Not checked offline: revocation of the RIM chain (OCSP), and whether NVIDIA published a
//! newer RIM for the same version.

pub mod c14n;
mod chain;

use std::collections::BTreeMap;
use std::fmt;
use std::time::SystemTime;

use base64::Engine as _;
use p384::ecdsa::signature::Verifier as _;
use roxmltree::Node;
use serde::{Serialize, Serializer};
use sha2::{Digest as _, Sha384};

pub use chain::{RIM_ROOT_PEM, RIM_ROOT_SHA256};

/// The SWID tag namespace (ISO/IEC 19770-2:2015).
pub const SWID_NS: &str = "http://standards.iso.org/iso/19770/-2/2015/schema.xsd";
/// The XMLDSig namespace.
pub const DSIG_NS: &str = "http://www.w3.org/2000/09/xmldsig#";
/// The namespace of the `Hash0..HashN` attributes of a `Resource` (SHA-384 values).
pub const SHA384_NS: &str = "http://www.w3.org/2001/04/xmlenc#sha384";
/// Canonical XML 1.1 (without comments).
pub const C14N11: &str = "http://www.w3.org/2006/12/xml-c14n11";
/// ECDSA with SHA-384 (RFC 4051/6931), signature value raw `r‖s`.
pub const ECDSA_SHA384: &str = "http://www.w3.org/2001/04/xmldsig-more#ecdsa-sha384";
/// SHA-384 digest (RFC 4051/6931).
pub const DIGEST_SHA384: &str = "http://www.w3.org/2001/04/xmldsig-more#sha384";
/// The enveloped-signature transform.
pub const ENVELOPED: &str = "http://www.w3.org/2000/09/xmldsig#enveloped-signature";

/// RIM index 35 is not compared when the report's NVDEC0_STATUS says NVDEC0 is off (`0x55`),
/// as NVIDIA's NVAT does.
pub const NVDEC0_RIM_INDEX: u8 = 35;

/// The most nodes a RIM may have (NVIDIA's have about 150).
const MAX_NODES: u32 = 100_000;

/// Which firmware a RIM describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RimKind {
    /// The GPU driver (`colloquialVersion` like `550.144.03`).
    Driver,
    /// The VBIOS (`colloquialVersion` like `96.00.5E.00.01`).
    Vbios,
}

impl fmt::Display for RimKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Driver => "driver",
            Self::Vbios => "VBIOS",
        })
    }
}

impl RimKind {
    /// The kind a `colloquialVersion` names. NVIDIA's tags carry no field telling a driver
    /// RIM from a VBIOS RIM (both have `edition="GPU"`, the chip as `product`; NVIDIA's
    /// verifiers know which one they fetched by its RIM id); the version's shape does:
    /// a driver version is 2–4 dot-separated decimal numbers, a VBIOS version five
    /// dot-separated two-digit hex groups.
    pub fn of_version(version: &str) -> Option<Self> {
        let parts: Vec<&str> = version.split('.').collect();
        let all = |f: fn(char) -> bool| {
            parts
                .iter()
                .all(|p| !p.is_empty() && p.len() <= 4 && p.chars().all(f))
        };
        if parts.len() == 5 && parts.iter().all(|p| p.len() == 2) && all(|c| c.is_ascii_hexdigit())
        {
            Some(Self::Vbios)
        } else if (2..=4).contains(&parts.len()) && all(|c| c.is_ascii_digit()) {
            Some(Self::Driver)
        } else {
            None
        }
    }
}

/// One `Payload/Resource` (a golden measurement).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resource {
    /// RIM index (0-based; SPDM measurement block `index + 1`).
    pub index: u8,
    /// The `name` attribute (`Measurement_7`, `HashedMeasurement_1_FSP`, …; may be empty).
    pub name: String,
    /// `active="True"`: only active resources are compared.
    pub active: bool,
    /// Value size in bytes (`size`, 48 for SHA-384).
    pub size: usize,
    /// `Hash0..Hash{alternatives-1}`: the runtime value must equal one of them.
    pub alternatives: Vec<Vec<u8>>,
}

impl Resource {
    /// The SPDM measurement block index this resource is compared with.
    pub fn spdm_index(&self) -> u16 {
        u16::from(self.index) + 1
    }
}

/// A parsed RIM. Its content is trustworthy only after [`Rim::verify_signature`].
#[derive(Clone, PartialEq, Eq)]
pub struct Rim {
    /// Driver or VBIOS ([`RimKind::of_version`]).
    pub kind: RimKind,
    /// `Meta/@colloquialVersion` (driver or VBIOS version).
    pub version: String,
    /// `Meta/@product` (`GH100`, …).
    pub product: String,
    /// `SoftwareIdentity/@tagId`.
    pub tag_id: String,
    /// Every `Payload/Resource`, in document order.
    pub resources: Vec<Resource>,
    signature: SignatureParts,
}

impl fmt::Debug for Rim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Rim")
            .field("kind", &self.kind)
            .field("version", &self.version)
            .field("product", &self.product)
            .field("tag_id", &self.tag_id)
            .field("resources", &self.resources.len())
            .finish_non_exhaustive()
    }
}

/// What the XML signature covers and says, computed at parse time.
#[derive(Clone, PartialEq, Eq)]
struct SignatureParts {
    /// SHA-384 of the canonical document without its `Signature`.
    document_digest: Vec<u8>,
    /// `Reference/DigestValue`.
    digest_value: Vec<u8>,
    /// The canonical `SignedInfo` (what the signature signs).
    signed_info: Vec<u8>,
    /// `SignatureValue`, raw `r‖s`.
    signature_value: Vec<u8>,
    /// `KeyInfo/X509Data/X509Certificate`, DER, in document order.
    certificates: Vec<Vec<u8>>,
}

/// One certificate of a verified RIM chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CertInfo {
    /// Subject (RFC 4514).
    pub subject: String,
    /// Start of validity (RFC 3339 in JSON).
    #[serde(serialize_with = "rfc3339")]
    pub not_before: SystemTime,
    /// End of validity (RFC 3339 in JSON).
    #[serde(serialize_with = "rfc3339")]
    pub not_after: SystemTime,
    /// SHA-256 of the DER, hex.
    pub sha256: String,
}

/// Who signed a RIM whose signature verified.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SignedBy {
    /// The signer's subject (`CN=HCC RIM L4 Signer,…`).
    pub signer: String,
    /// The path, signer first, the pinned root last.
    pub chain: Vec<CertInfo>,
}

/// A golden measurement that the report does not meet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    /// RIM index (SPDM block `rim_index + 1`).
    pub rim_index: u8,
    /// The RIM the golden value comes from.
    pub kind: RimKind,
    /// That RIM's version.
    pub rim_version: String,
    /// The accepted values.
    pub expected: Vec<Vec<u8>>,
    /// The RIM's size for the value.
    pub size: usize,
    /// The report's value (`None`: the report has no such block).
    pub found: Option<Vec<u8>>,
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let expected: Vec<String> = self.expected.iter().map(|v| short_hex(v)).collect();
        write!(
            f,
            "index {} (SPDM block {}) of the {} RIM {}: expected {}{} ({} bytes), found ",
            self.rim_index,
            u16::from(self.rim_index) + 1,
            self.kind,
            self.rim_version,
            if expected.len() > 1 { "one of " } else { "" },
            expected.join(" | "),
            self.size
        )?;
        match &self.found {
            Some(value) => write!(f, "{} ({} bytes)", short_hex(value), value.len()),
            None => f.write_str("no such measurement in the report"),
        }
    }
}

/// A measurement that matched.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Matched {
    /// RIM index.
    pub rim_index: u8,
    /// The RIM it came from.
    pub kind: RimKind,
    /// Which alternative (`HashN`) matched.
    pub alternative: usize,
}

/// The outcome of a successful [`match_measurements`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MatchReport {
    /// Every active golden index compared, ascending.
    pub matched: Vec<Matched>,
    /// RIM indices not compared (35 when NVDEC0 is off).
    pub skipped: Vec<u8>,
    /// The RIMs used: kind and version.
    pub rims: Vec<(RimKind, String)>,
}

impl MatchReport {
    /// Both a driver and a VBIOS RIM were compared (NVIDIA's verifiers require both; with
    /// one, the other firmware's measurements are unchecked).
    pub fn covers_driver_and_vbios(&self) -> bool {
        let has = |k| self.rims.iter().any(|(kind, _)| *kind == k);
        has(RimKind::Driver) && has(RimKind::Vbios)
    }
}

/// Why a RIM was refused or measurements did not match.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RimError {
    /// Not well-formed XML (or not UTF-8, or has a DTD).
    #[error("the RIM is not well-formed XML (or has a DTD, which is refused): {0}")]
    Xml(String),
    /// A construct this verifier does not accept (other algorithms, transforms, layout).
    #[error(
        "the RIM uses {0}, which cvm-warden's RIM verifier does not accept; NVIDIA's RIMs do not"
    )]
    Unsupported(String),
    /// A required element or attribute is missing or invalid.
    #[error("the RIM is malformed: {0}")]
    Malformed(String),
    /// The reference digest does not match: the document changed after signing.
    #[error(
        "RIM {version}: reference digest mismatch: DigestValue is {expected} but the canonical \
         document without its Signature hashes to {computed} (SHA-384): the RIM was changed \
         after it was signed; get the original from NVIDIA"
    )]
    Digest {
        /// The RIM's version.
        version: String,
        /// DigestValue, hex.
        expected: String,
        /// Computed, hex.
        computed: String,
    },
    /// The signature over SignedInfo does not verify with the signer's key.
    #[error(
        "RIM {version}: the XML signature (ecdsa-sha384 over the canonical SignedInfo) does \
         not verify with the key of {signer}: the signature or SignedInfo was altered"
    )]
    Signature {
        /// The RIM's version.
        version: String,
        /// The leaf certificate's subject.
        signer: String,
    },
    /// The signer chain does not lead to the pinned root.
    #[error("RIM signer chain: {detail}")]
    Chain {
        /// What failed.
        detail: String,
    },
    /// A certificate of the chain is not valid at the verification time.
    #[error(
        "RIM signer chain: {subject} is {} at {at} (valid from {not_before} to {not_after}); \
         use a RIM with a current signer, or verify at a time inside that window (--at) if \
         the RIM is known to have been good then",
        if *expired { "expired" } else { "not yet valid" }
    )]
    CertificateTime {
        /// The certificate.
        subject: String,
        /// notBefore, RFC 3339.
        not_before: String,
        /// notAfter, RFC 3339.
        not_after: String,
        /// The verification time, RFC 3339.
        at: String,
        /// Past notAfter (else before notBefore).
        expired: bool,
    },
    /// No RIM given to [`match_measurements`].
    #[error("no RIM given: pass the driver RIM and the VBIOS RIM of the GPU")]
    NoRims,
    /// Two RIMs of one kind.
    #[error("two {kind} RIMs given ({first} and {second}): pass one driver RIM and one VBIOS RIM per GPU")]
    TwoOfAKind {
        /// The kind.
        kind: RimKind,
        /// The first one's version.
        first: String,
        /// The second one's version.
        second: String,
    },
    /// The driver and VBIOS RIMs both have an active resource at one index.
    #[error(
        "the driver RIM {driver} and the VBIOS RIM {vbios} both have an active measurement \
         at index {index}: one of them is not for this GPU"
    )]
    IndexConflict {
        /// RIM index.
        index: u8,
        /// Driver RIM version.
        driver: String,
        /// VBIOS RIM version.
        vbios: String,
    },
    /// A RIM was given but not the version to compare it with.
    #[error(
        "a {kind} RIM ({rim}) was given but not the report's {kind} version to compare it with"
    )]
    VersionUnknown {
        /// The kind.
        kind: RimKind,
        /// The RIM's version.
        rim: String,
    },
    /// The RIM is for another version than the report's.
    #[error(
        "the {kind} RIM is for version {rim}, the report's {kind} is {report}: use the RIM \
         NVIDIA publishes for {report}"
    )]
    VersionMismatch {
        /// The kind.
        kind: RimKind,
        /// The RIM's colloquialVersion.
        rim: String,
        /// The report's version.
        report: String,
    },
    /// Runtime measurements that match no alternative.
    #[error(
        "GPU measurements do not match the RIMs at {} index(es): {}",
        .0.len(),
        .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
    )]
    Mismatch(Vec<Mismatch>),
}

impl From<c14n::C14nError> for RimError {
    fn from(error: c14n::C14nError) -> Self {
        let c14n::C14nError::Unsupported(what) = error;
        Self::Unsupported(format!("{what} (canonical XML 1.1)"))
    }
}

/// Parses a RIM (SWID tag XML, as NVIDIA's RIM service serves it after base64 decoding).
/// Does not verify it: call [`Rim::verify_signature`].
pub fn parse(xml: &[u8]) -> Result<Rim, RimError> {
    let source = std::str::from_utf8(xml).map_err(|e| RimError::Xml(format!("not UTF-8: {e}")))?;
    let options = roxmltree::ParsingOptions {
        allow_dtd: false,
        nodes_limit: MAX_NODES,
        ..roxmltree::ParsingOptions::default()
    };
    let doc = roxmltree::Document::parse_with_options(source, options)
        .map_err(|e| RimError::Xml(e.to_string()))?;
    let root = doc.root_element();
    if !is(root, SWID_NS, "SoftwareIdentity") {
        return Err(RimError::Malformed(format!(
            "the document element is <{}> in namespace {:?}, not a SWID SoftwareIdentity",
            root.tag_name().name(),
            root.tag_name().namespace()
        )));
    }
    let tag_id = required_attr(root, "tagId")?.to_string();
    let meta = only_child(root, SWID_NS, "Meta")?;
    let version = required_attr(meta, "colloquialVersion")?.to_string();
    let product = required_attr(meta, "product")?.to_string();
    let kind = RimKind::of_version(&version).ok_or_else(|| {
        RimError::Malformed(format!(
            "Meta/@colloquialVersion {version:?} is neither a driver version (like 550.144.03) \
             nor a VBIOS version (like 96.00.5E.00.01)"
        ))
    })?;
    let payload = only_child(root, SWID_NS, "Payload")?;
    let resources = parse_resources(payload)?;
    let signature = parse_signature(source, &doc, root)?;
    Ok(Rim {
        kind,
        version,
        product,
        tag_id,
        resources,
        signature,
    })
}

impl Rim {
    /// The active resources (the golden values NVIDIA compares).
    pub fn active(&self) -> impl Iterator<Item = &Resource> {
        self.resources.iter().filter(|r| r.active)
    }

    /// Verifies the XML signature: the reference digest of the document without its
    /// Signature, the ECDSA P-384 signature over the canonical SignedInfo with the first
    /// certificate's key, and that certificate's chain up to the baked
    /// `NVIDIA CoRIM signing Root CA` (pinned by [`RIM_ROOT_SHA256`]), every certificate
    /// valid at `at`.
    pub fn verify_signature(&self, at: SystemTime) -> Result<SignedBy, RimError> {
        let parts = &self.signature;
        if parts.digest_value != parts.document_digest {
            return Err(RimError::Digest {
                version: self.version.clone(),
                expected: hex::encode(&parts.digest_value),
                computed: hex::encode(&parts.document_digest),
            });
        }
        let certs = parts
            .certificates
            .iter()
            .enumerate()
            .map(|(i, der)| chain::Cert::from_der(der.clone(), i))
            .collect::<Result<Vec<_>, _>>()?;
        let Some(leaf) = certs.first() else {
            return Err(RimError::Malformed(
                "KeyInfo/X509Data holds no X509Certificate".into(),
            ));
        };
        let signature =
            p384::ecdsa::Signature::from_slice(&parts.signature_value).map_err(|_| {
                RimError::Signature {
                    version: self.version.clone(),
                    signer: leaf.subject(),
                }
            })?;
        leaf.verifying_key()?
            .verify(&parts.signed_info, &signature)
            .map_err(|_| RimError::Signature {
                version: self.version.clone(),
                signer: leaf.subject(),
            })?;
        let chain = chain::verify(&certs, at)?;
        Ok(SignedBy {
            signer: leaf.subject(),
            chain,
        })
    }
}

/// Compares a report's measurements with the active resources of `rims` (at most one driver
/// RIM and one VBIOS RIM; NVIDIA requires both, see [`MatchReport::covers_driver_and_vbios`]).
///
/// - `measurements`: SPDM measurement block index (1-based) → value; RIM index `i` is block
///   `i + 1`.
/// - `nvdec0_off`: the report's NVDEC0_STATUS is `0x55`; RIM index 35 is then skipped.
/// - `driver_version` / `vbios_version`: the report's versions; each given RIM's
///   `colloquialVersion` must equal its own (driver exactly, ignoring ASCII case; VBIOS
///   ignoring case and dots, as NVIDIA does). A RIM without its version is an error.
///
/// Every mismatching index is listed in one [`RimError::Mismatch`].
pub fn match_measurements(
    measurements: &BTreeMap<u8, Vec<u8>>,
    rims: &[&Rim],
    nvdec0_off: bool,
    driver_version: Option<&str>,
    vbios_version: Option<&str>,
) -> Result<MatchReport, RimError> {
    if rims.is_empty() {
        return Err(RimError::NoRims);
    }
    let mut by_kind: BTreeMap<RimKind, &Rim> = BTreeMap::new();
    for rim in rims {
        if let Some(first) = by_kind.insert(rim.kind, rim) {
            return Err(RimError::TwoOfAKind {
                kind: rim.kind,
                first: first.version.clone(),
                second: rim.version.clone(),
            });
        }
    }
    for rim in by_kind.values() {
        let report = match rim.kind {
            RimKind::Driver => driver_version,
            RimKind::Vbios => vbios_version,
        };
        let Some(report) = report else {
            return Err(RimError::VersionUnknown {
                kind: rim.kind,
                rim: rim.version.clone(),
            });
        };
        if !same_version(rim.kind, &rim.version, report) {
            return Err(RimError::VersionMismatch {
                kind: rim.kind,
                rim: rim.version.clone(),
                report: report.to_string(),
            });
        }
    }

    // Golden = active resources of the driver RIM ∪ the VBIOS RIM; one index, one owner.
    let mut golden: BTreeMap<u8, (&Rim, &Resource)> = BTreeMap::new();
    for rim in by_kind.values() {
        for resource in rim.active() {
            if let Some((other, _)) = golden.insert(resource.index, (rim, resource)) {
                let (driver, vbios) = if other.kind == RimKind::Driver {
                    (other, *rim)
                } else {
                    (*rim, other)
                };
                return Err(RimError::IndexConflict {
                    index: resource.index,
                    driver: driver.version.clone(),
                    vbios: vbios.version.clone(),
                });
            }
        }
    }

    let mut matched = Vec::new();
    let mut skipped = Vec::new();
    let mut mismatches = Vec::new();
    for (&index, (rim, resource)) in &golden {
        if index == NVDEC0_RIM_INDEX && nvdec0_off {
            skipped.push(index);
            continue;
        }
        let found = u8::try_from(resource.spdm_index())
            .ok()
            .and_then(|spdm| measurements.get(&spdm));
        let hit = found.and_then(|value| {
            resource
                .alternatives
                .iter()
                .position(|alt| value.len() == resource.size && alt == value)
        });
        match hit {
            Some(alternative) => matched.push(Matched {
                rim_index: index,
                kind: rim.kind,
                alternative,
            }),
            None => mismatches.push(Mismatch {
                rim_index: index,
                kind: rim.kind,
                rim_version: rim.version.clone(),
                expected: resource.alternatives.clone(),
                size: resource.size,
                found: found.cloned(),
            }),
        }
    }
    if !mismatches.is_empty() {
        return Err(RimError::Mismatch(mismatches));
    }
    Ok(MatchReport {
        matched,
        skipped,
        rims: by_kind
            .values()
            .map(|rim| (rim.kind, rim.version.clone()))
            .collect(),
    })
}

/// A RIM whose signature verified.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SignedRim {
    /// Driver or VBIOS.
    pub kind: RimKind,
    /// Its `colloquialVersion`.
    pub version: String,
    /// Its signer.
    pub signed_by: SignedBy,
}

/// RIMs checked against one GPU's verified evidence ([`check_claims`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RimVerdict {
    /// Each RIM, its signature verified.
    pub signed: Vec<SignedRim>,
    /// The measurement match.
    pub matched: MatchReport,
    /// What was not checked (revocation; a missing driver or VBIOS RIM).
    pub warnings: Vec<String>,
}

/// The RIM half of GPU verification, for evidence [`super::nvidia::verify`] accepted:
/// every RIM file parsed and its signature verified at `at` (the same verification time as
/// the report's chain), then the report's measurements matched against them with the
/// report's NVDEC0_STATUS, driver and VBIOS versions. Both must pass.
pub fn check_claims(
    claims: &super::nvidia::Claims,
    rim_files: &[Vec<u8>],
    at: SystemTime,
) -> Result<RimVerdict, RimError> {
    let rims = rim_files
        .iter()
        .map(|bytes| parse(bytes))
        .collect::<Result<Vec<_>, _>>()?;
    let mut signed = Vec::with_capacity(rims.len());
    for rim in &rims {
        signed.push(SignedRim {
            kind: rim.kind,
            version: rim.version.clone(),
            signed_by: rim.verify_signature(at)?,
        });
    }
    let mut measurements = BTreeMap::new();
    for (index, value) in &claims.measurements {
        let index: u8 = index.parse().map_err(|_| {
            RimError::Malformed(format!(
                "GPU claims: measurement index {index:?} is not 1..255"
            ))
        })?;
        let value = hex::decode(value).map_err(|e| {
            RimError::Malformed(format!("GPU claims: measurement {index} is not hex: {e}"))
        })?;
        measurements.insert(index, value);
    }
    let config = &claims.config;
    let nvdec0_off = config
        .nvdec0_status
        .as_deref()
        .is_some_and(|status| status.eq_ignore_ascii_case("55"));
    let refs: Vec<&Rim> = rims.iter().collect();
    let matched = match_measurements(
        &measurements,
        &refs,
        nvdec0_off,
        config.driver_version.as_deref(),
        config.vbios_version.as_deref(),
    )?;
    let mut warnings =
        vec!["revocation of the RIM signer certificates (OCSP) is not checked offline".to_string()];
    for kind in [RimKind::Driver, RimKind::Vbios] {
        if !rims.iter().any(|rim| rim.kind == kind) {
            warnings.push(format!(
                "no {kind} RIM given: the {kind}'s measurements are not compared (NVIDIA's \
                 verifiers require both a driver and a VBIOS RIM)"
            ));
        }
    }
    Ok(RimVerdict {
        signed,
        matched,
        warnings,
    })
}

fn rfc3339<S: Serializer>(time: &SystemTime, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.collect_str(&humantime::format_rfc3339_seconds(*time))
}

/// NVIDIA's version comparison: driver versions equal ignoring ASCII case; VBIOS versions
/// equal ignoring case and dots (`96.00.5E.00.01` = `96.00.5e.00.01` = `96005E0001`).
fn same_version(kind: RimKind, rim: &str, report: &str) -> bool {
    match kind {
        RimKind::Driver => rim.eq_ignore_ascii_case(report),
        RimKind::Vbios => rim
            .replace('.', "")
            .eq_ignore_ascii_case(&report.replace('.', "")),
    }
}

/// The first 8 bytes in hex, then `…` when longer.
fn short_hex(value: &[u8]) -> String {
    if value.len() > 8 {
        format!("{}…", hex::encode(&value[..8]))
    } else {
        hex::encode(value)
    }
}

fn is(node: Node<'_, '_>, namespace: &str, local: &str) -> bool {
    node.is_element()
        && node.tag_name().namespace() == Some(namespace)
        && node.tag_name().name() == local
}

fn describe(node: Node<'_, '_>) -> String {
    match node.tag_name().namespace() {
        Some(ns) => format!("<{}> ({ns})", node.tag_name().name()),
        None => format!("<{}>", node.tag_name().name()),
    }
}

fn required_attr<'a>(node: Node<'a, '_>, name: &str) -> Result<&'a str, RimError> {
    node.attribute(name)
        .filter(|v| !v.trim().is_empty())
        .ok_or_else(|| {
            RimError::Malformed(format!(
                "{} has no (or an empty) {name} attribute",
                describe(node)
            ))
        })
}

/// The one child element `namespace:local` of `parent`.
fn only_child<'a, 'i>(
    parent: Node<'a, 'i>,
    namespace: &str,
    local: &str,
) -> Result<Node<'a, 'i>, RimError> {
    let mut found = parent.children().filter(|c| is(*c, namespace, local));
    match (found.next(), found.next()) {
        (Some(one), None) => Ok(one),
        (None, _) => Err(RimError::Malformed(format!(
            "{} has no {local} element",
            describe(parent)
        ))),
        (Some(_), Some(_)) => Err(RimError::Malformed(format!(
            "{} has more than one {local} element",
            describe(parent)
        ))),
    }
}

/// The element children of `parent`, which must be exactly `expected` (XMLDSig names) in
/// that order; text between them must be whitespace.
fn dsig_children<'a, 'i>(
    parent: Node<'a, 'i>,
    expected: &[&str],
) -> Result<Vec<Node<'a, 'i>>, RimError> {
    let mut elements = Vec::new();
    for child in parent.children() {
        if child.is_element() {
            elements.push(child);
        } else if child.is_text() && !child.text().unwrap_or("").trim().is_empty() {
            return Err(RimError::Unsupported(format!(
                "text inside {}",
                describe(parent)
            )));
        }
    }
    let names: Vec<String> = elements.iter().map(|e| describe(*e)).collect();
    let ok = elements.len() == expected.len()
        && elements
            .iter()
            .zip(expected)
            .all(|(e, name)| is(*e, DSIG_NS, name));
    if !ok {
        return Err(RimError::Unsupported(format!(
            "{} with children [{}] (expected ds:{} only)",
            describe(parent),
            names.join(", "),
            expected.join(", ds:")
        )));
    }
    Ok(elements)
}

fn algorithm(node: Node<'_, '_>, expected: &str) -> Result<(), RimError> {
    let found = required_attr(node, "Algorithm")?;
    if found != expected {
        return Err(RimError::Unsupported(format!(
            "{} Algorithm {found} (only {expected} is accepted)",
            describe(node)
        )));
    }
    if node.children().any(|c| c.is_element()) {
        return Err(RimError::Unsupported(format!(
            "parameters inside {}",
            describe(node)
        )));
    }
    Ok(())
}

fn base64_text(node: Node<'_, '_>) -> Result<Vec<u8>, RimError> {
    if node.children().any(|c| c.is_element()) {
        return Err(RimError::Malformed(format!(
            "{} holds elements, expected base64 text",
            describe(node)
        )));
    }
    let text: String = node
        .children()
        .filter_map(|c| c.text())
        .flat_map(str::chars)
        .filter(|c| !c.is_ascii_whitespace())
        .collect();
    base64::engine::general_purpose::STANDARD
        .decode(text.as_bytes())
        .map_err(|e| RimError::Malformed(format!("{} is not base64: {e}", describe(node))))
}

fn parse_signature(
    source: &str,
    doc: &roxmltree::Document<'_>,
    root: Node<'_, '_>,
) -> Result<SignatureParts, RimError> {
    let signatures: Vec<Node<'_, '_>> = doc
        .descendants()
        .filter(|n| is(*n, DSIG_NS, "Signature"))
        .collect();
    let signature = match signatures.as_slice() {
        [one] if one.parent() == Some(root) => *one,
        [] => {
            return Err(RimError::Malformed(
                "no ds:Signature element: the RIM is not signed".into(),
            ))
        }
        [_] => {
            return Err(RimError::Unsupported(
                "a ds:Signature that is not a child of SoftwareIdentity (only an enveloped \
                 signature over the whole tag is accepted)"
                    .into(),
            ))
        }
        _ => {
            return Err(RimError::Unsupported(format!(
                "{} ds:Signature elements (exactly one is accepted)",
                signatures.len()
            )))
        }
    };
    let parts = dsig_children(signature, &["SignedInfo", "SignatureValue", "KeyInfo"])?;
    let [signed_info, signature_value, key_info] = parts.as_slice() else {
        return Err(RimError::Malformed("ds:Signature".into()));
    };
    let info = dsig_children(
        *signed_info,
        &["CanonicalizationMethod", "SignatureMethod", "Reference"],
    )?;
    let [c14n_method, signature_method, reference] = info.as_slice() else {
        return Err(RimError::Malformed("ds:SignedInfo".into()));
    };
    algorithm(*c14n_method, C14N11)?;
    algorithm(*signature_method, ECDSA_SHA384)?;

    for attribute in reference.attributes() {
        if attribute.namespace().is_some() || !matches!(attribute.name(), "URI" | "Id") {
            return Err(RimError::Unsupported(format!(
                "a ds:Reference attribute {} (only URI and Id are accepted)",
                attribute.name()
            )));
        }
    }
    match reference.attribute("URI") {
        Some("") => {}
        other => {
            return Err(RimError::Unsupported(format!(
                "ds:Reference URI {other:?} (only URI=\"\", the whole document, is accepted)"
            )))
        }
    }
    let reference_parts =
        dsig_children(*reference, &["Transforms", "DigestMethod", "DigestValue"])?;
    let [transforms, digest_method, digest_value] = reference_parts.as_slice() else {
        return Err(RimError::Malformed("ds:Reference".into()));
    };
    let transform_list = dsig_children(*transforms, &["Transform", "Transform"])?;
    for (transform, expected) in transform_list.iter().zip([ENVELOPED, C14N11]) {
        algorithm(*transform, expected)?;
    }
    algorithm(*digest_method, DIGEST_SHA384)?;
    let digest_value = base64_text(*digest_value)?;
    if digest_value.len() != 48 {
        return Err(RimError::Malformed(format!(
            "ds:DigestValue has {} bytes, a SHA-384 digest has 48",
            digest_value.len()
        )));
    }
    let signature_value = base64_text(*signature_value)?;
    if signature_value.len() != 96 {
        return Err(RimError::Unsupported(format!(
            "a ds:SignatureValue of {} bytes (ecdsa-sha384 is raw r‖s, 96 bytes)",
            signature_value.len()
        )));
    }
    let key_parts = dsig_children(*key_info, &["X509Data"])?;
    let mut certificates = Vec::new();
    for x509data in &key_parts {
        for child in x509data.children().filter(|c| c.is_element()) {
            if !is(child, DSIG_NS, "X509Certificate") {
                return Err(RimError::Unsupported(format!(
                    "{} in ds:X509Data (only ds:X509Certificate is accepted)",
                    describe(child)
                )));
            }
            certificates.push(base64_text(child)?);
        }
    }
    if certificates.is_empty() {
        return Err(RimError::Malformed(
            "ds:X509Data holds no ds:X509Certificate".into(),
        ));
    }

    let canonical = c14n::document_without(source, doc, signature)?;
    let signed_info = c14n::subtree(source, *signed_info)?;
    Ok(SignatureParts {
        document_digest: Sha384::digest(&canonical).to_vec(),
        digest_value,
        signed_info,
        signature_value,
        certificates,
    })
}

fn parse_resources(payload: Node<'_, '_>) -> Result<Vec<Resource>, RimError> {
    let mut resources: Vec<Resource> = Vec::new();
    for child in payload.children() {
        if child.is_text() && child.text().unwrap_or("").trim().is_empty() {
            continue;
        }
        if child.is_comment() {
            continue;
        }
        if !is(child, SWID_NS, "Resource") {
            return Err(RimError::Unsupported(format!(
                "{} inside Payload (only Resource elements are accepted)",
                match child.node_type() {
                    roxmltree::NodeType::Element => describe(child),
                    roxmltree::NodeType::PI => "a processing instruction".to_string(),
                    _ => "text".to_string(),
                }
            )));
        }
        let resource = parse_resource(child)?;
        if resources.iter().any(|r| r.index == resource.index) {
            return Err(RimError::Malformed(format!(
                "two Resource elements have index {}",
                resource.index
            )));
        }
        resources.push(resource);
    }
    if resources.is_empty() {
        return Err(RimError::Malformed(
            "Payload has no Resource: no golden measurements".into(),
        ));
    }
    Ok(resources)
}

fn parse_resource(node: Node<'_, '_>) -> Result<Resource, RimError> {
    let kind = required_attr(node, "type")?;
    if kind != "Measurement" {
        return Err(RimError::Unsupported(format!(
            "a Resource of type {kind:?} (only Measurement is accepted)"
        )));
    }
    let index_text = required_attr(node, "index")?;
    let index: u8 = index_text
        .parse()
        .ok()
        .filter(|i| *i < u8::MAX)
        .ok_or_else(|| {
            RimError::Malformed(format!(
                "Resource index {index_text:?} is not a number from 0 to 254"
            ))
        })?;
    let active = match required_attr(node, "active")? {
        "True" => true,
        "False" => false,
        other => {
            return Err(RimError::Malformed(format!(
                "Resource {index}: active is {other:?}, expected True or False"
            )))
        }
    };
    let number = |attr: &str| -> Result<usize, RimError> {
        let text = required_attr(node, attr)?;
        text.parse::<usize>()
            .ok()
            .filter(|n| (1..=1024).contains(n))
            .ok_or_else(|| {
                RimError::Malformed(format!(
                    "Resource {index}: {attr} is {text:?}, expected a number from 1 to 1024"
                ))
            })
    };
    let count = number("alternatives")?;
    let size = number("size")?;
    let mut alternatives = Vec::with_capacity(count);
    for i in 0..count {
        let name = format!("Hash{i}");
        let text = node.attribute((SHA384_NS, name.as_str())).ok_or_else(|| {
            RimError::Malformed(format!(
                "Resource {index} has alternatives={count} but no {name} in namespace {SHA384_NS}"
            ))
        })?;
        let value = hex::decode(text).map_err(|e| {
            RimError::Malformed(format!("Resource {index}: {name} is not hex: {e}"))
        })?;
        if value.len() != size {
            return Err(RimError::Malformed(format!(
                "Resource {index}: {name} has {} bytes, size says {size}",
                value.len()
            )));
        }
        alternatives.push(value);
    }
    for attribute in node.attributes() {
        let extra = attribute
            .name()
            .strip_prefix("Hash")
            .and_then(|n| n.parse::<usize>().ok())
            .is_some_and(|n| n >= count);
        if extra {
            return Err(RimError::Malformed(format!(
                "Resource {index} has {} but alternatives={count}",
                attribute.name()
            )));
        }
    }
    Ok(Resource {
        index,
        name: node.attribute("name").unwrap_or("").to_string(),
        active,
        size,
        alternatives,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn kind_from_version_shape() {
        assert_eq!(RimKind::of_version("550.144.03"), Some(RimKind::Driver));
        assert_eq!(RimKind::of_version("575.32"), Some(RimKind::Driver));
        assert_eq!(RimKind::of_version("96.00.5E.00.01"), Some(RimKind::Vbios));
        assert_eq!(RimKind::of_version("96.00.5e.00.01"), Some(RimKind::Vbios));
        assert_eq!(RimKind::of_version("550"), None);
        assert_eq!(RimKind::of_version("1.2.3.4.5.6"), None);
        assert_eq!(RimKind::of_version("abc.def"), None);
    }

    const DRIVER_550: &[u8] =
        include_bytes!("../../tests/vectors/nvidia/rims/NV_GPU_DRIVER_GH100_550.144.03.xml");

    /// The real driver RIM with its KeyInfo replaced by a self-made chain and SignedInfo
    /// re-signed by that chain's leaf: digest and signature hold.
    fn resigned_by_a_self_made_chain() -> Vec<u8> {
        use p384::ecdsa::signature::Signer as _;
        use x509_cert::der::Encode as _;

        let original = parse(DRIVER_550).unwrap();
        let forged = super::super::nvidia::forge::chain([7; 48]);
        let certs = x509_cert::Certificate::load_pem_chain(&forged.chain_pem).unwrap();
        let b64 = base64::engine::general_purpose::STANDARD;
        let x509: String = certs
            .iter()
            .map(|c| {
                format!(
                    "<ds:X509Certificate>{}</ds:X509Certificate>",
                    b64.encode(c.to_der().unwrap())
                )
            })
            .collect();
        let signature: p384::ecdsa::Signature =
            forged.leaf_key.sign(&original.signature.signed_info);
        let text = std::str::from_utf8(DRIVER_550).unwrap();
        let (head, rest) = text.split_once("<ds:SignatureValue>").unwrap();
        let (_, rest) = rest.split_once("</ds:SignatureValue>").unwrap();
        let (_, tail) = rest.split_once("</ds:X509Data>").unwrap();
        format!(
            "{head}<ds:SignatureValue>{}</ds:SignatureValue><ds:KeyInfo><ds:X509Data>{x509}\
             </ds:X509Data>{tail}",
            b64.encode(signature.to_bytes())
        )
        .into_bytes()
    }

    #[test]
    fn a_valid_signature_by_a_chain_outside_nvidias_root_is_refused() {
        let rim = parse(&resigned_by_a_self_made_chain()).unwrap();
        let err = rim.verify_signature(SystemTime::now()).unwrap_err();
        // Digest and signature passed (they are checked first); the chain did not.
        let RimError::Chain { detail } = &err else {
            panic!("{err:?}")
        };
        assert!(detail.contains("cvm-warden test GPU root"), "{detail}");
        assert!(detail.contains("NVIDIA CoRIM signing Root CA"), "{detail}");
    }

    #[test]
    fn the_signature_covers_the_canonical_signed_info() {
        // Same forged signer, but SignedInfo changed after signing (an Id added to the
        // Reference; the reference digest still holds): the signature check fails.
        let forged = String::from_utf8(resigned_by_a_self_made_chain()).unwrap();
        let changed = forged.replacen(
            "<ds:Reference URI=\"\">",
            "<ds:Reference URI=\"\" Id=\"r\">",
            1,
        );
        assert_ne!(changed, forged);
        let err = parse(changed.as_bytes())
            .unwrap()
            .verify_signature(SystemTime::now())
            .unwrap_err();
        assert!(matches!(err, RimError::Signature { .. }), "{err:?}");
    }

    #[test]
    fn short_hex_cuts_long_values() {
        assert_eq!(short_hex(&[0xab; 48]), "abababababababab…");
        assert_eq!(short_hex(&[1, 2]), "0102");
    }
}
