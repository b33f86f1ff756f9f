//! NVIDIA GPU confidential-computing evidence, verified offline (GPU-ATTESTATION.md §1-2).
//!
//! The evidence is what NVML returns per GPU: the attestation report (SPDM 1.1
//! GET_MEASUREMENTS request ‖ signed MEASUREMENTS response, [`spdm`]) and the attestation
//! certificate chain (PEM, leaf first, [`cert`]). [`verify`] checks, in this order:
//!
//! 1. the report parses by its fields (SPDM 1.1 only, DMTF measurement blocks, opaque TLVs
//!    without duplicates; trailing bytes after the signature are ignored);
//! 2. the chain: every link's signature (ecdsa-with-SHA384, or -SHA256), issuer = next
//!    subject, the issuer is a CA, every certificate valid at [`VerifyOptions::at`], and the
//!    last certificate is NVIDIA's device identity root baked into this crate (pinned by
//!    SHA-256 [`cert::NVIDIA_DEVICE_ROOT_SHA256`]) or a root the caller passed explicitly
//!    ([`Roots::with_extra`]; the verdict then says [`RootKind::Other`]);
//! 3. the leaf's FWID extension (Hopper `2.23.133.5.4.1`, Blackwell `2.23.133.5.4.1.1`);
//! 4. the ECDSA P-384/SHA-384 signature (raw `r‖s`) over request ‖ response up to the
//!    signature, with the leaf's key;
//! 5. the leaf's FWID equals the report's FWID (opaque type 20); a report without FWID is
//!    refused (as Trustee's local verifier does) unless
//!    [`VerifyOptions::allow_missing_fwid`] (NVIDIA's verifiers skip the check);
//! 6. the request nonce equals the expected 32 bytes.
//!
//! What it cannot check offline: revocation (OCSP/CRL) of the device certificates, and the
//! measurements against NVIDIA's RIMs (the RIM module does, with RIM files given to it).

pub mod cert;
#[cfg(any(test, feature = "test-forge"))]
pub mod forge;
pub mod spdm;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::fmt;
use std::time::SystemTime;

use serde::Serialize;

pub use spdm::{decode_report, parse_report, Measurement, OpaqueField, Report};

use cert::{ChainCert, NVIDIA_DEVICE_ROOT_PEM};
use spdm::opaque_id;

/// The GPU architecture, from the leaf certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Arch {
    /// H100 (GH100).
    Hopper,
    /// B200 and others (GB100).
    Blackwell,
}

impl Arch {
    /// `HOPPER` / `BLACKWELL`, as guest-components' `arch` field says.
    pub fn as_str(self) -> &'static str {
        match self {
            Arch::Hopper => "HOPPER",
            Arch::Blackwell => "BLACKWELL",
        }
    }

    /// Reads an `arch` field as Trustee does (`Hopper`/`HOPPER`, `Blackwell`/`BLACKWELL`).
    pub fn parse(text: &str) -> Option<Arch> {
        match text {
            "HOPPER" | "Hopper" => Some(Arch::Hopper),
            "BLACKWELL" | "Blackwell" => Some(Arch::Blackwell),
            _ => None,
        }
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why GPU evidence does not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NvidiaError {
    /// The report file is neither raw bytes nor hex text, or evidence is not base64.
    #[error("{what}: {detail}")]
    Encoding {
        /// What was decoded.
        what: &'static str,
        /// Why it failed.
        detail: String,
    },
    /// A report field is not what an NVIDIA GPU produces.
    #[error("malformed GPU attestation report: {what} at offset {offset} {detail}")]
    Malformed {
        /// The field.
        what: &'static str,
        /// Its byte offset in the report.
        offset: usize,
        /// Why.
        detail: String,
    },
    /// Only SPDM 1.1 (0x11) is accepted.
    #[error(
        "the GPU attestation {message} has SPDM version 0x{found:02x}; only 1.1 (0x11) is \
         supported"
    )]
    UnsupportedSpdmVersion {
        /// `request` or `response`.
        message: &'static str,
        /// The version byte.
        found: u8,
    },
    /// The certificate chain is not PEM certificates.
    #[error("{what} is not a PEM certificate chain: {detail}")]
    Pem {
        /// What was read.
        what: &'static str,
        /// Why.
        detail: String,
    },
    /// The chain has fewer than two certificates.
    #[error(
        "the GPU certificate chain has {count} certificate(s); it needs at least the signing \
         (leaf) certificate and the root, leaf first"
    )]
    ChainTooShort {
        /// How many.
        count: usize,
    },
    /// A link of the chain does not hold.
    #[error("the GPU certificate chain is broken at index {index} (\"{subject}\" issued by \"{issuer}\"): {reason}")]
    ChainBroken {
        /// Index of the certificate whose link fails (0 = leaf).
        index: usize,
        /// Its subject.
        subject: String,
        /// The subject of the certificate that should have issued it.
        issuer: String,
        /// Why.
        reason: String,
    },
    /// A certificate had expired at the verification time.
    #[error("GPU certificate {index} (\"{subject}\") expired at {not_after}, before the verification time {at}")]
    CertExpired {
        /// Its index (0 = leaf).
        index: usize,
        /// Its subject.
        subject: String,
        /// notAfter.
        not_after: String,
        /// The verification time.
        at: String,
    },
    /// A certificate was not yet valid at the verification time.
    #[error("GPU certificate {index} (\"{subject}\") is valid only from {not_before}, after the verification time {at}")]
    CertNotYetValid {
        /// Its index (0 = leaf).
        index: usize,
        /// Its subject.
        subject: String,
        /// notBefore.
        not_before: String,
        /// The verification time.
        at: String,
    },
    /// The chain's last certificate is not a trusted root.
    #[error(
        "the GPU certificate chain ends at \"{subject}\" (SHA-256 {sha256}), which is not \
         NVIDIA's device identity root (SHA-256 {nvidia}) nor a root given explicitly"
    )]
    UnknownRoot {
        /// Its subject.
        subject: String,
        /// Its SHA-256 fingerprint.
        sha256: String,
        /// The pinned NVIDIA root's fingerprint.
        nvidia: &'static str,
    },
    /// The leaf's key cannot check the report.
    #[error("the GPU leaf certificate \"{subject}\" has no usable P-384 key: {detail}")]
    LeafKey {
        /// The leaf's subject.
        subject: String,
        /// Why.
        detail: String,
    },
    /// The report's signature does not verify with the leaf's key.
    #[error(
        "the GPU attestation report's signature does not verify with the key of \"{subject}\" \
         (the report was changed, or it comes from another GPU than the chain)"
    )]
    SignatureInvalid {
        /// The leaf's subject.
        subject: String,
    },
    /// The report has an FWID but the leaf has no FWID extension.
    #[error(
        "the GPU signing certificate \"{subject}\" has no FWID extension (2.23.133.5.4.1 or \
         2.23.133.5.4.1.1): is the chain's leaf missing?"
    )]
    LeafFwidMissing {
        /// The leaf's subject.
        subject: String,
    },
    /// The leaf's FWID extension does not parse.
    #[error("the FWID extension {oid} of \"{subject}\" is malformed: {detail}")]
    LeafFwidMalformed {
        /// The leaf's subject.
        subject: String,
        /// The extension.
        oid: String,
        /// Why.
        detail: String,
    },
    /// The report's FWID differs from the leaf's.
    #[error("GPU FWID mismatch: the report says {report}, the signing certificate says {leaf}")]
    FwidMismatch {
        /// The report's FWID, hex.
        report: String,
        /// The leaf's FWID, hex.
        leaf: String,
    },
    /// The report has no FWID field (drivers before 550).
    #[error(
        "fwid not found: the GPU attestation report (driver {driver}) has no FWID field, so its \
         firmware cannot be tied to the signing certificate; accept it explicitly with \
         --allow-missing-fwid (NVIDIA's verifiers do), or update the driver"
    )]
    FwidMissing {
        /// The report's driver version.
        driver: String,
    },
    /// The request nonce is not the expected one.
    #[error("GPU nonce mismatch: expected {expected}, the report's request carries {found}")]
    NonceMismatch {
        /// Expected, hex.
        expected: String,
        /// Found, hex.
        found: String,
    },
    /// The chain's architecture cannot be told.
    #[error("cannot tell the GPU architecture of \"{subject}\" (no FWID extension, subject not GH…/GB…)")]
    UnknownArch {
        /// The leaf's subject.
        subject: String,
    },
    /// A RIM given in [`VerifyOptions::rims`] did not verify, or the measurements do not
    /// match it.
    #[error("GPU measurements against the RIMs")]
    Rim(#[from] super::nvidia_rim::RimError),
}

/// The roots a chain may end at: NVIDIA's device identity root always, plus any given
/// explicitly (tests, demos: a verdict rooted there says [`RootKind::Other`]).
#[derive(Debug, Clone)]
pub struct Roots {
    nvidia: Vec<u8>,
    extra: Vec<Vec<u8>>,
}

impl Roots {
    /// NVIDIA's device identity root only.
    pub fn nvidia() -> Result<Roots, NvidiaError> {
        let mut certs = cert::parse_pem_chain(NVIDIA_DEVICE_ROOT_PEM, "the built-in NVIDIA root")?;
        let root = certs.remove(0);
        Ok(Roots {
            nvidia: root.der,
            extra: Vec::new(),
        })
    }

    /// NVIDIA's root and every certificate of `pem` (roots that are not NVIDIA's).
    pub fn with_extra(pem: &[u8]) -> Result<Roots, NvidiaError> {
        let mut roots = Roots::nvidia()?;
        roots.extra = cert::parse_pem_chain(pem, "the extra GPU root")?
            .into_iter()
            .map(|c| c.der)
            .collect();
        Ok(roots)
    }

    fn kind_of(&self, last: &ChainCert) -> Option<RootKind> {
        if last.der == self.nvidia {
            return Some(RootKind::Nvidia);
        }
        self.extra.contains(&last.der).then(|| RootKind::Other {
            sha256: last.sha256(),
        })
    }
}

/// The root a verified chain ended at.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RootKind {
    /// NVIDIA's device identity root (SHA-256 [`cert::NVIDIA_DEVICE_ROOT_SHA256`]).
    Nvidia,
    /// A root given explicitly, which is not NVIDIA's: proves nothing about a real GPU.
    Other {
        /// Its SHA-256 fingerprint, hex.
        sha256: String,
    },
}

/// How to verify.
#[derive(Debug, Clone)]
pub struct VerifyOptions {
    /// The roots a chain may end at.
    pub roots: Roots,
    /// The verification time (certificate validity).
    pub at: SystemTime,
    /// Accept a report without FWID (drivers before 550), as NVIDIA's verifiers do.
    pub allow_missing_fwid: bool,
    /// RIM files (SWID XML) the measurements must match. Left for the RIM module: this
    /// module refuses a non-empty list ([`NvidiaError::RimsUnsupported`]).
    pub rims: Vec<Vec<u8>>,
}

impl VerifyOptions {
    /// NVIDIA's root only, FWID required, no RIMs, verification at `at`.
    pub fn new(at: SystemTime) -> Result<VerifyOptions, NvidiaError> {
        Ok(VerifyOptions {
            roots: Roots::nvidia()?,
            at,
            allow_missing_fwid: false,
            rims: Vec::new(),
        })
    }
}

/// The GPU's claims, in the shape of Trustee's local NVIDIA verifier (`arch`,
/// `measurements {"1".."64": hex}`, `config {…}`), plus the measurements digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Claims {
    /// The architecture.
    pub arch: Arch,
    /// Measurement values by index (`"1"`…), hex.
    pub measurements: BTreeMap<String, String>,
    /// The opaque fields.
    pub config: Config,
    /// [`Report::measurements_digest`], hex.
    pub measurements_digest: String,
}

/// The report's opaque fields, decoded. Status bytes are hex (`"55"` off, `"aa"` on; Trustee
/// renders them as the character, `"U"`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Config {
    /// DRIVER_VERSION.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub driver_version: Option<String>,
    /// VBIOS_VERSION (`96.00.9f.00.01`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vbios_version: Option<String>,
    /// FWID, hex.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fwid: Option<String>,
    /// PROJECT.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub project: Option<String>,
    /// PROJECT_SKU.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub project_sku: Option<String>,
    /// PROJECT_SKU_MOD.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub project_sku_mod: Option<String>,
    /// CHIP_SKU.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chip_sku: Option<String>,
    /// CHIP_SKU_MOD.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chip_sku_mod: Option<String>,
    /// BOARD_ID, hex.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub board_id: Option<String>,
    /// GPU_INFO, hex.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpu_info: Option<String>,
    /// CPRINFO, hex.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpr_info: Option<String>,
    /// NVDEC0_STATUS, hex.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nvdec0_status: Option<String>,
    /// PROTECTED_PCIE_STATUS, hex.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub protected_pcie_status: Option<String>,
    /// MSRSCNT: the count per measurement block (`"1"`…).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub measurement_count: Option<BTreeMap<String, u32>>,
    /// FEATURE_FLAG: `SPT`, `MPT`, `PPCIE` (or the number).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub feature_flag: Option<String>,
    /// OPAQUE_DATA_VERSION.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub opaque_data_version: Option<u16>,
    /// Every other opaque field by type id, hex (unknown ids are data).
    pub other: BTreeMap<String, String>,
}

/// Evidence that verified.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Verified {
    /// The claims.
    pub claims: Claims,
    /// The root the chain ended at.
    pub root: RootKind,
    /// The leaf's subject (`GH100 A01 GSP FMC LF`).
    pub leaf_subject: String,
    /// Every certificate's subject, leaf first.
    pub chain_subjects: Vec<String>,
    /// The request nonce, hex.
    pub nonce: String,
    /// Whether the FWID was compared (false only with `allow_missing_fwid` on a report
    /// without FWID).
    pub fwid_checked: bool,
    /// What was not checked.
    pub warnings: Vec<String>,
    /// The RIM verdict, when RIMs were given ([`VerifyOptions::rims`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rims: Option<super::nvidia_rim::RimVerdict>,
}

fn u16_le(bytes: &[u8]) -> Option<u16> {
    Some(u16::from_le_bytes(bytes.get(..2)?.try_into().ok()?))
}

/// The claims of a parsed report.
pub fn claims(report: &Report, arch: Arch) -> Claims {
    let text = |id| report.opaque_text(id).map(str::to_string);
    let hex_of = |id| report.opaque(id).map(hex::encode);
    let named = [
        opaque_id::DRIVER_VERSION,
        opaque_id::VBIOS_VERSION,
        opaque_id::FWID,
        opaque_id::PROJECT,
        opaque_id::PROJECT_SKU,
        opaque_id::PROJECT_SKU_MOD,
        opaque_id::CHIP_SKU,
        opaque_id::CHIP_SKU_MOD,
        opaque_id::BOARD_ID,
        opaque_id::GPU_INFO,
        opaque_id::CPRINFO,
        opaque_id::NVDEC0_STATUS,
        opaque_id::PROTECTED_PCIE_STATUS,
        opaque_id::MSRSCNT,
        opaque_id::FEATURE_FLAG,
        opaque_id::OPAQUE_DATA_VERSION,
    ];
    let measurement_count = report.opaque(opaque_id::MSRSCNT).map(|bytes| {
        bytes
            .chunks_exact(4)
            .enumerate()
            .map(|(i, c)| {
                (
                    (i + 1).to_string(),
                    u32::from_le_bytes([c[0], c[1], c[2], c[3]]),
                )
            })
            .collect()
    });
    let feature_flag = report
        .opaque(opaque_id::FEATURE_FLAG)
        .and_then(u16_le)
        .map(|f| match f {
            0 => "SPT".to_string(),
            1 => "MPT".to_string(),
            2 => "PPCIE".to_string(),
            other => other.to_string(),
        });
    Claims {
        arch,
        measurements: report
            .measurements()
            .iter()
            .map(|m| (m.index.to_string(), hex::encode(&m.value)))
            .collect(),
        config: Config {
            driver_version: report.driver_version().map(str::to_string),
            vbios_version: report.vbios_version(),
            fwid: report.fwid().map(hex::encode),
            project: text(opaque_id::PROJECT),
            project_sku: text(opaque_id::PROJECT_SKU),
            project_sku_mod: text(opaque_id::PROJECT_SKU_MOD),
            chip_sku: text(opaque_id::CHIP_SKU),
            chip_sku_mod: text(opaque_id::CHIP_SKU_MOD),
            board_id: hex_of(opaque_id::BOARD_ID),
            gpu_info: hex_of(opaque_id::GPU_INFO),
            cpr_info: hex_of(opaque_id::CPRINFO),
            nvdec0_status: hex_of(opaque_id::NVDEC0_STATUS),
            protected_pcie_status: hex_of(opaque_id::PROTECTED_PCIE_STATUS),
            measurement_count,
            feature_flag,
            opaque_data_version: report
                .opaque(opaque_id::OPAQUE_DATA_VERSION)
                .and_then(u16_le),
            other: report
                .opaque_fields()
                .iter()
                .filter(|f| !named.contains(&f.id))
                .map(|f| (f.id.to_string(), hex::encode(&f.data)))
                .collect(),
        },
        measurements_digest: hex::encode(report.measurements_digest()),
    }
}

/// Verifies one GPU's evidence; see the module doc for the checks and their order.
/// `report` is raw bytes (see [`decode_report`] for hex text), `chain_pem` the PEM chain,
/// leaf first.
pub fn verify(
    report: &[u8],
    chain_pem: &[u8],
    expected_nonce: &[u8; 32],
    options: &VerifyOptions,
) -> Result<Verified, NvidiaError> {
    let report = parse_report(report)?;
    let chain = cert::parse_pem_chain(chain_pem, "the GPU certificate chain")?;
    cert::verify_links(&chain, options.at)?;
    let (Some(leaf), Some(last)) = (chain.first(), chain.last()) else {
        return Err(NvidiaError::ChainTooShort { count: chain.len() });
    };
    let root = options
        .roots
        .kind_of(last)
        .ok_or_else(|| NvidiaError::UnknownRoot {
            subject: last.subject(),
            sha256: last.sha256(),
            nvidia: cert::NVIDIA_DEVICE_ROOT_SHA256,
        })?;
    let leaf_fwid = cert::leaf_fwid(leaf)?;
    let report_fwid = report.fwid();
    if report_fwid.is_some() && leaf_fwid.is_none() {
        return Err(NvidiaError::LeafFwidMissing {
            subject: leaf.subject(),
        });
    }
    let key = cert::leaf_key(leaf)?;
    let signature = p384::ecdsa::Signature::from_slice(report.signature()).map_err(|_| {
        NvidiaError::SignatureInvalid {
            subject: leaf.subject(),
        }
    })?;
    {
        use p384::ecdsa::signature::Verifier;
        key.verify(report.signed_bytes(), &signature).map_err(|_| {
            NvidiaError::SignatureInvalid {
                subject: leaf.subject(),
            }
        })?;
    }
    let mut warnings = vec![
        "revocation of the GPU certificates (OCSP/CRL) is not checked offline".to_string(),
        "the measurements are not compared with NVIDIA's RIMs".to_string(),
    ];
    let fwid_checked = match (report_fwid, leaf_fwid) {
        (Some(found), Some((_, want))) => {
            if found != want {
                return Err(NvidiaError::FwidMismatch {
                    report: hex::encode(found),
                    leaf: hex::encode(want),
                });
            }
            true
        }
        (None, _) if options.allow_missing_fwid => {
            warnings.push(
                "the report has no FWID field (accepted with allow-missing-fwid): its firmware \
                 is not tied to the signing certificate"
                    .to_string(),
            );
            false
        }
        (None, _) => {
            return Err(NvidiaError::FwidMissing {
                driver: report.driver_version().unwrap_or("unknown").to_string(),
            })
        }
        // Refused above.
        (Some(_), None) => {
            return Err(NvidiaError::LeafFwidMissing {
                subject: leaf.subject(),
            })
        }
    };
    if report.nonce() != *expected_nonce {
        return Err(NvidiaError::NonceMismatch {
            expected: hex::encode(expected_nonce),
            found: hex::encode(report.nonce()),
        });
    }
    let arch = match leaf_fwid {
        Some((arch, _)) => arch,
        None => {
            cert::arch_from_subject(&leaf.subject()).ok_or_else(|| NvidiaError::UnknownArch {
                subject: leaf.subject(),
            })?
        }
    };
    if let RootKind::Other { sha256 } = &root {
        warnings.push(format!(
            "the chain ends at a root given explicitly (SHA-256 {sha256}), not NVIDIA's device \
             identity root: this proves nothing about a real GPU"
        ));
    }
    let claims = claims(&report, arch);
    // The RIM half, last: every RIM's signature at the same verification time, then the
    // measurements with the report's NVDEC0 status and versions. Both must pass.
    let rims = if options.rims.is_empty() {
        None
    } else {
        let verdict = super::nvidia_rim::check_claims(&claims, &options.rims, options.at)?;
        warnings.retain(|w| !w.contains("NVIDIA's RIMs"));
        warnings.extend(verdict.warnings.iter().cloned());
        Some(verdict)
    };
    Ok(Verified {
        claims,
        rims,
        root,
        leaf_subject: leaf.subject(),
        chain_subjects: chain.iter().map(ChainCert::subject).collect(),
        nonce: hex::encode(report.nonce()),
        fwid_checked,
        warnings,
    })
}
