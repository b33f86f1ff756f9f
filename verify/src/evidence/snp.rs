//! Offline verification of AMD SEV-SNP attestation reports.
//!
//! [`verify_report`] checks, in this order and failing closed at the first problem:
//!
//! 1. the report is exactly 1184 bytes, parses (the `sev` parser is strict: reserved bytes
//!    must be zero) and re-encodes byte-exact, so the bytes whose signature is checked are
//!    the bytes that were passed in;
//! 2. it is signed (signature algorithm 1, ECDSA P-384 with SHA-384, by a VCEK or VLEK);
//! 3. the ARK is AMD's: for [`ChainSource::Builtin`] it is the one built into the `sev`
//!    crate; the ARK of a [`ChainSource::Pem`] must have the public key of the built-in
//!    Milan, Genoa or Turin ARK, or the chain is refused ([`SnpError::ArkNotAmd`]) — a
//!    self-made ARK/ASK/VCEK would otherwise "verify" any report its maker signs;
//! 4. the ARK is self-signed, the ARK signs the ASK (or ASVK), the ASK signs the VCEK
//!    (or VLEK), and the VCEK signs the report.
//!
//! Only signatures are checked: no certificate validity period, no revocation list, and
//! no comparison of the VCEK's hwID / TCB extensions with the report. Policy decisions
//! (measurement, TCB minimums, debug bit) belong to the caller, which gets the parsed
//! fields in [`VerifiedReport`].

use std::fmt;
use std::str::FromStr;

use serde::Serialize;
use sev::certs::snp::{builtin, Certificate, Verifiable};
use sev::firmware::guest::AttestationReport;
use sev::parser::ByteParser;

/// Size of an SEV-SNP attestation report (ATTESTATION_REPORT structure), in bytes.
pub const REPORT_LEN: usize = 1184;

/// Signature algorithm encoding for ECDSA P-384 with SHA-384 (the only one defined).
const SIG_ALGO_ECDSA_P384_SHA384: u32 = 1;

/// An AMD EPYC product line with its own ARK/ASK.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Product {
    /// 3rd generation EPYC (Zen 3).
    Milan,
    /// 4th generation EPYC (Zen 4).
    Genoa,
    /// 5th generation EPYC (Zen 5).
    Turin,
}

impl Product {
    /// The lowercase name, as used by the AMD KDS URLs.
    pub fn name(self) -> &'static str {
        match self {
            Product::Milan => "milan",
            Product::Genoa => "genoa",
            Product::Turin => "turin",
        }
    }

    /// Every product, oldest first.
    pub const ALL: [Product; 3] = [Product::Milan, Product::Genoa, Product::Turin];

    /// The built-in ARK for this product, as shipped in the `sev` crate.
    fn builtin_ark(self) -> std::io::Result<Certificate> {
        match self {
            Product::Milan => builtin::milan::ark(),
            Product::Genoa => builtin::genoa::ark(),
            Product::Turin => builtin::turin::ark(),
        }
    }

    /// The built-in (ARK, ASK) for this product, as shipped in the `sev` crate.
    fn builtin_ark_ask(self) -> std::io::Result<(Certificate, Certificate)> {
        match self {
            Product::Milan => Ok((builtin::milan::ark()?, builtin::milan::ask()?)),
            Product::Genoa => Ok((builtin::genoa::ark()?, builtin::genoa::ask()?)),
            Product::Turin => Ok((builtin::turin::ark()?, builtin::turin::ask()?)),
        }
    }
}

impl fmt::Display for Product {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Product {
    type Err = SnpError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "milan" => Ok(Product::Milan),
            "genoa" => Ok(Product::Genoa),
            "turin" => Ok(Product::Turin),
            other => Err(SnpError::UnknownProduct {
                name: other.to_string(),
            }),
        }
    }
}

/// Where the AMD CA certificates (ARK and ASK or ASVK) come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChainSource {
    /// The ARK/ASK built into the `sev` crate for this product.
    Builtin(Product),
    /// A PEM file holding exactly two certificates, the ASK (or ASVK) and the ARK, in either
    /// order (the AMD KDS `cert_chain` form is [ASK, ARK]). The ARK is the one that is
    /// self-signed and signs the other, and its public key must be that of AMD's Milan,
    /// Genoa or Turin ARK (built into the `sev` crate); any other ARK is refused.
    Pem(Vec<u8>),
}

impl ChainSource {
    fn describe(&self) -> String {
        match self {
            ChainSource::Builtin(p) => format!("built-in {p} chain"),
            ChainSource::Pem(_) => "pem chain".to_string(),
        }
    }
}

/// Why an SEV-SNP report did not verify.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SnpError {
    /// The product name is not one of milan, genoa, turin.
    #[error("unknown product {name:?}; use milan, genoa or turin")]
    UnknownProduct {
        /// The name that was given.
        name: String,
    },
    /// The report has the wrong size.
    #[error(
        "attestation report is {len} bytes, expected {REPORT_LEN}; pass the raw sev-snp report \
         (for an azure hcl report, the {REPORT_LEN} bytes at offset 0x20)"
    )]
    ReportLength {
        /// The size that was given.
        len: usize,
    },
    /// The report does not parse.
    #[error(
        "cannot parse the attestation report; check that it is a raw sev-snp report \
         (version 2 or later, reserved bytes zero, chip_id not masked in a version 2 report)"
    )]
    ReportParse(#[source] std::io::Error),
    /// The report does not re-encode to the same bytes, so its signature cannot be checked
    /// over exactly the bytes given.
    #[error(
        "attestation report does not re-encode byte-exact; it has fields or reserved bytes \
         this verifier does not understand, so its signature cannot be checked"
    )]
    ReportNotCanonical,
    /// The guest policy lacks bit 17, which the SEV-SNP ABI reserves as must-be-one.
    #[error(
        "the report's guest policy {policy:#x} lacks bit 17, which the SEV-SNP ABI requires to \
         be one: no correct AMD firmware signs such a report"
    )]
    PolicyReservedBit {
        /// The policy as in the report.
        policy: u64,
    },
    /// The report's signature algorithm is not ECDSA P-384 with SHA-384.
    #[error(
        "report signature algorithm {algo} is not supported; only 1 (ecdsa p-384 with sha-384) is"
    )]
    UnsupportedSignatureAlgo {
        /// The `signature_algo` field.
        algo: u32,
    },
    /// The report's key_info says it is not signed by a VCEK or VLEK.
    #[error(
        "report is not signed by a vcek or vlek (key_info signing key {signing_key}); \
         request the report from the firmware with a vcek or vlek signing key"
    )]
    UnsignedReport {
        /// The SIGNING_KEY field of key_info (0 VCEK, 1 VLEK, 7 none).
        signing_key: u32,
    },
    /// The VCEK certificate does not parse.
    #[error(
        "cannot parse the vcek certificate; pass a der or pem file holding exactly the vcek \
         (or vlek) as served by the amd kds"
    )]
    VcekParse(#[source] std::io::Error),
    /// The VCEK PEM holds no certificate or more than one.
    #[error("vcek pem holds {count} certificates, expected 1; pass the vcek alone, not a bundle")]
    VcekCount {
        /// How many certificates the PEM held.
        count: usize,
    },
    /// A built-in ARK/ASK could not be loaded.
    #[error(
        "cannot load the built-in {product} ark/ask from the sev crate; this is a build problem"
    )]
    BuiltinChain {
        /// The product asked for.
        product: Product,
        /// The underlying parse error.
        #[source]
        source: std::io::Error,
    },
    /// The CA PEM could not be parsed.
    #[error("cannot parse the certificate chain pem; pass the amd kds cert_chain file [ask, ark]")]
    ChainParse(#[source] std::io::Error),
    /// The CA PEM holds the wrong number of certificates.
    #[error(
        "certificate chain pem holds {count} certificates, expected 2 (ask and ark); pass the \
         amd kds cert_chain file, not a bundle with the vcek or the asvk"
    )]
    ChainCount {
        /// How many certificates the PEM held.
        count: usize,
    },
    /// Neither certificate of the CA PEM is a self-signed ARK that signs the other.
    #[error(
        "cannot find the ark in the certificate chain pem: neither certificate is self-signed \
         and signs the other; pass the amd kds cert_chain file [ask, ark]"
    )]
    ChainNoArk,
    /// The ARK of a PEM chain is not AMD's: its public key is none of the built-in ARKs.
    #[error(
        "the ark of the {chain} is not amd's: its public key (sha-256 {key_sha256}) is not the \
         key of the built-in milan, genoa or turin ark, so the chain proves nothing (anyone can \
         make a self-signed ark); pass the amd kds cert_chain of the chip's product, or use \
         the built-in chain (--product)"
    )]
    ArkNotAmd {
        /// Which chain was used.
        chain: String,
        /// SHA-256 of the supplied ARK's public key (hex).
        key_sha256: String,
    },
    /// The ARK is not self-signed.
    #[error("ark is not self-signed ({chain}); the chain is not an amd root")]
    ArkNotSelfSigned {
        /// Which chain was used.
        chain: String,
        /// The signature check error.
        #[source]
        source: std::io::Error,
    },
    /// The ARK does not sign the ASK.
    #[error("ask is not signed by the ark ({chain}); ask and ark must be of the same product")]
    AskNotSignedByArk {
        /// Which chain was used.
        chain: String,
        /// The signature check error.
        #[source]
        source: std::io::Error,
    },
    /// The ASK does not sign the VCEK.
    #[error(
        "vcek is not signed by the ask ({chain}); check that the chain is for the chip's product \
         (milan, genoa, turin) and that a vlek is paired with the asvk chain"
    )]
    VcekNotSignedByAsk {
        /// Which chain was used.
        chain: String,
        /// The signature check error.
        #[source]
        source: std::io::Error,
    },
    /// The VCEK does not sign the report.
    #[error(
        "report signature does not verify with the vcek; check that the vcek belongs to this chip \
         and tcb (chip_id {chip_id}…, reported tcb {reported_tcb}) and that the report is unmodified"
    )]
    ReportSignature {
        /// The first 16 hex digits of the report's chip_id.
        chip_id: String,
        /// The report's reported TCB, as `bl.tee.snp.ucode`.
        reported_tcb: String,
        /// The signature check error.
        #[source]
        source: std::io::Error,
    },
}

/// A TCB version as found in the report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct TcbFields {
    /// SVN of the PSP bootloader.
    pub bootloader: u8,
    /// SVN of the PSP operating system.
    pub tee: u8,
    /// SVN of the SNP firmware.
    pub snp: u8,
    /// Lowest patch level of all cores.
    pub microcode: u8,
    /// SVN of the FMC firmware (Turin and later only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fmc: Option<u8>,
}

impl From<&sev::firmware::host::TcbVersion> for TcbFields {
    fn from(t: &sev::firmware::host::TcbVersion) -> Self {
        TcbFields {
            bootloader: t.bootloader,
            tee: t.tee,
            snp: t.snp,
            microcode: t.microcode,
            fmc: t.fmc,
        }
    }
}

impl fmt::Display for TcbFields {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "bl{}/tee{}/snp{}/ucode{}",
            self.bootloader, self.tee, self.snp, self.microcode
        )?;
        if let Some(fmc) = self.fmc {
            write!(f, "/fmc{fmc}")?;
        }
        Ok(())
    }
}

/// The fields of a report whose signature chain verified. Byte strings are lowercase hex.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VerifiedReport {
    /// `true` when [`verify_report`] returned it (the whole chain verified); `false` only
    /// from [`parse_unverified`], whose fields nothing vouches for.
    pub verified: bool,
    /// Which key signed the report: `"vcek"` or `"vlek"`.
    pub signing_key: &'static str,
    /// Report format version.
    pub version: u32,
    /// Guest SVN (from the ID block).
    pub guest_svn: u32,
    /// Guest policy (raw 64-bit value).
    pub policy: u64,
    /// Family ID (hex, 16 bytes).
    pub family_id: String,
    /// Image ID (hex, 16 bytes).
    pub image_id: String,
    /// VMPL the report was requested at.
    pub vmpl: u32,
    /// Signature algorithm (1 = ECDSA P-384 with SHA-384).
    pub signature_algo: u32,
    /// Current TCB of the platform.
    pub current_tcb: TcbFields,
    /// TCB reported to the guest (the one the VCEK is derived from).
    pub reported_tcb: TcbFields,
    /// Committed TCB.
    pub committed_tcb: TcbFields,
    /// TCB at launch.
    pub launch_tcb: TcbFields,
    /// Platform info (raw 64-bit value).
    pub platform_info: u64,
    /// Key info (raw 32-bit value).
    pub key_info: u32,
    /// Guest-supplied report data (hex, 64 bytes).
    pub report_data: String,
    /// Launch measurement (hex, 48 bytes).
    pub measurement: String,
    /// Host data (hex, 32 bytes).
    pub host_data: String,
    /// SHA-384 of the ID key (hex, 48 bytes; zero without an ID block).
    pub id_key_digest: String,
    /// SHA-384 of the author key (hex, 48 bytes).
    pub author_key_digest: String,
    /// Report ID (hex, 32 bytes).
    pub report_id: String,
    /// Report ID of the migration agent (hex, 32 bytes).
    pub report_id_ma: String,
    /// CPUID family (version 3 and later).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpuid_fam_id: Option<u8>,
    /// CPUID model (version 3 and later).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpuid_mod_id: Option<u8>,
    /// CPUID stepping (version 3 and later).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpuid_step: Option<u8>,
    /// Chip ID (hex, 64 bytes; zero when masked).
    pub chip_id: String,
    /// Current firmware version, `major.minor.build`.
    pub current_version: String,
    /// Committed firmware version, `major.minor.build`.
    pub committed_version: String,
}

impl VerifiedReport {
    fn from_report(r: &AttestationReport) -> Self {
        let key_info: u32 = r.key_info.into();
        VerifiedReport {
            verified: true,
            signing_key: if r.key_info.signing_key() == 1 {
                "vlek"
            } else {
                "vcek"
            },
            version: r.version,
            guest_svn: r.guest_svn,
            policy: r.policy.into(),
            family_id: hex::encode(r.family_id),
            image_id: hex::encode(r.image_id),
            vmpl: r.vmpl,
            signature_algo: r.sig_algo,
            current_tcb: (&r.current_tcb).into(),
            reported_tcb: (&r.reported_tcb).into(),
            committed_tcb: (&r.committed_tcb).into(),
            launch_tcb: (&r.launch_tcb).into(),
            platform_info: r.plat_info.into(),
            key_info,
            report_data: hex::encode(r.report_data),
            measurement: hex::encode(r.measurement),
            host_data: hex::encode(r.host_data),
            id_key_digest: hex::encode(r.id_key_digest),
            author_key_digest: hex::encode(r.author_key_digest),
            report_id: hex::encode(r.report_id),
            report_id_ma: hex::encode(r.report_id_ma),
            cpuid_fam_id: r.cpuid_fam_id,
            cpuid_mod_id: r.cpuid_mod_id,
            cpuid_step: r.cpuid_step,
            chip_id: hex::encode(r.chip_id),
            current_version: r.current.to_string(),
            committed_version: r.committed.to_string(),
        }
    }
}

/// Verify an SEV-SNP attestation report offline: ARK self-signature → ASK → VCEK → report.
///
/// `report` is the raw 1184-byte report, `vcek` the VCEK (or VLEK) certificate as DER or
/// PEM (exactly one certificate), `chain` the AMD CA certificates. Returns the parsed
/// fields only if every signature verifies.
pub fn verify_report(
    report: &[u8],
    vcek: &[u8],
    chain: ChainSource,
) -> Result<VerifiedReport, SnpError> {
    let parsed = parse_report(report)?;

    if parsed.sig_algo != SIG_ALGO_ECDSA_P384_SHA384 {
        return Err(SnpError::UnsupportedSignatureAlgo {
            algo: parsed.sig_algo,
        });
    }
    let signing_key = parsed.key_info.signing_key();
    if signing_key > 1 {
        return Err(SnpError::UnsignedReport { signing_key });
    }

    let vek = parse_vcek(vcek)?;
    let (ark, ask, chain_name) = load_chain(chain)?;

    (&ark, &ark)
        .verify()
        .map_err(|source| SnpError::ArkNotSelfSigned {
            chain: chain_name.clone(),
            source,
        })?;
    (&ark, &ask)
        .verify()
        .map_err(|source| SnpError::AskNotSignedByArk {
            chain: chain_name.clone(),
            source,
        })?;
    (&ask, &vek)
        .verify()
        .map_err(|source| SnpError::VcekNotSignedByAsk {
            chain: chain_name,
            source,
        })?;
    (&vek, &parsed)
        .verify()
        .map_err(|source| SnpError::ReportSignature {
            chip_id: hex::encode(&parsed.chip_id[..8]),
            reported_tcb: TcbFields::from(&parsed.reported_tcb).to_string(),
            source,
        })?;

    Ok(VerifiedReport::from_report(&parsed))
}

/// Parse a report strictly (exact size, reserved bytes zero, byte-exact re-encoding)
/// without checking its signature: the fields are what the bytes say, nothing vouches for
/// them, and `verified` is `false`. For comparing reports whose signature is checked
/// elsewhere, or cannot be.
pub fn parse_unverified(report: &[u8]) -> Result<VerifiedReport, SnpError> {
    let parsed = parse_report(report)?;
    let mut fields = VerifiedReport::from_report(&parsed);
    fields.verified = false;
    Ok(fields)
}

/// Parse a report strictly: exact size, `sev` parser, byte-exact re-encoding.
fn parse_report(report: &[u8]) -> Result<AttestationReport, SnpError> {
    if report.len() != REPORT_LEN {
        return Err(SnpError::ReportLength { len: report.len() });
    }
    let mut policy = [0u8; 8];
    policy.copy_from_slice(&report[0x08..0x10]);
    let policy = u64::from_le_bytes(policy);
    if policy & (1 << 17) == 0 {
        return Err(SnpError::PolicyReservedBit { policy });
    }
    let parsed = AttestationReport::from_bytes(report).map_err(SnpError::ReportParse)?;
    // `sev` checks the signature over its own re-encoding of the struct: make sure that
    // is exactly what was passed in.
    let reencoded = parsed.to_bytes().map_err(SnpError::ReportParse)?;
    if reencoded.as_slice() != report {
        return Err(SnpError::ReportNotCanonical);
    }
    Ok(parsed)
}

fn is_pem(bytes: &[u8]) -> bool {
    bytes.trim_ascii_start().starts_with(b"-----BEGIN")
}

/// Why a PEM text gives no certificates. Each message completes "the file …" (the caller
/// names the file and says what to do).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PemError {
    /// The bytes are not UTF-8 text (DER, say).
    #[error("is not PEM text ({0})")]
    NotText(std::str::Utf8Error),
    /// Not one `CERTIFICATE` section.
    #[error("holds no PEM certificate (no \"-----BEGIN CERTIFICATE-----\" section)")]
    NoCertificate,
    /// A section has no matching END line.
    #[error("has a {label} section without an END line")]
    NoEnd {
        /// The section's label, e.g. `CERTIFICATE`.
        label: String,
    },
    /// A `-----BEGIN …` line that does not end in five dashes.
    #[error("has a malformed BEGIN line {line:?}")]
    BadBegin {
        /// The line, lossily decoded.
        line: String,
    },
    /// A section's body is not base64.
    #[error("has a PEM section whose body is not base64 ({detail})")]
    Base64 {
        /// The PEM reader's description (the first illegal character, a misplaced `=`).
        detail: String,
    },
    /// Any other failure of the PEM reader (a section over 256 MiB).
    #[error("cannot be read as PEM ({0})")]
    Other(String),
}

impl From<rustls_pki_types::pem::Error> for PemError {
    fn from(e: rustls_pki_types::pem::Error) -> Self {
        use rustls_pki_types::pem::Error as E;
        match e {
            E::MissingSectionEnd { end_marker } => PemError::NoEnd {
                label: String::from_utf8_lossy(&end_marker).into_owned(),
            },
            E::IllegalSectionStart { line } => PemError::BadBegin {
                line: String::from_utf8_lossy(&line).trim_end().to_string(),
            },
            E::Base64Decode(detail) => PemError::Base64 { detail },
            E::NoItemsFound => PemError::NoCertificate,
            other => PemError::Other(other.to_string()),
        }
    }
}

/// The DER certificates of a PEM text, in order, read by `rustls-pki-types`' PEM reader.
///
/// Sections of other kinds (a key, a CRL, an unknown label) are skipped, as is text outside
/// the sections; a section without an END line, a malformed BEGIN line or a body that is not
/// base64 is an error, and so is a text without a certificate.
pub fn pem_certificates(pem: &[u8]) -> Result<Vec<Vec<u8>>, PemError> {
    use rustls_pki_types::pem::PemObject as _;
    use rustls_pki_types::CertificateDer;
    std::str::from_utf8(pem).map_err(PemError::NotText)?;
    let certs = CertificateDer::pem_slice_iter(pem)
        .map(|cert| cert.map(|c| c.as_ref().to_vec()))
        .collect::<Result<Vec<_>, _>>()?;
    if certs.is_empty() {
        return Err(PemError::NoCertificate);
    }
    Ok(certs)
}

fn pem_io_error(e: PemError) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, e)
}

fn parse_vcek(vcek: &[u8]) -> Result<Certificate, SnpError> {
    if is_pem(vcek) {
        let ders = match pem_certificates(vcek) {
            Ok(ders) => ders,
            Err(PemError::NoCertificate) => Vec::new(),
            Err(e) => return Err(SnpError::VcekParse(pem_io_error(e))),
        };
        match ders.as_slice() {
            [one] => Certificate::from_der(one).map_err(SnpError::VcekParse),
            other => Err(SnpError::VcekCount { count: other.len() }),
        }
    } else {
        Certificate::from_der(vcek).map_err(SnpError::VcekParse)
    }
}

/// The product whose built-in ARK has the public key of `ark`, if any.
fn amd_ark_product(ark: &Certificate) -> Result<Option<Product>, SnpError> {
    for product in Product::ALL {
        let builtin = product
            .builtin_ark()
            .map_err(|source| SnpError::BuiltinChain { product, source })?;
        if builtin.public_key_sec1() == ark.public_key_sec1() {
            return Ok(Some(product));
        }
    }
    Ok(None)
}

/// Load (ARK, ASK) and a description of the chain from the chain source. For a PEM, the
/// ARK is the certificate that is self-signed and signs the other one, and it must have the
/// public key of one of AMD's built-in ARKs; the signatures are checked again by the caller.
fn load_chain(chain: ChainSource) -> Result<(Certificate, Certificate, String), SnpError> {
    let name = chain.describe();
    match chain {
        ChainSource::Builtin(product) => {
            let (ark, ask) = product
                .builtin_ark_ask()
                .map_err(|source| SnpError::BuiltinChain { product, source })?;
            Ok((ark, ask, name))
        }
        ChainSource::Pem(pem) => {
            let ders = match pem_certificates(&pem) {
                Ok(ders) => ders,
                Err(PemError::NoCertificate) => Vec::new(),
                Err(e) => return Err(SnpError::ChainParse(pem_io_error(e))),
            };
            let certs = ders
                .iter()
                .map(|der| Certificate::from_der(der))
                .collect::<std::io::Result<Vec<_>>>()
                .map_err(SnpError::ChainParse)?;
            let [a, b]: [Certificate; 2] = certs
                .try_into()
                .map_err(|v: Vec<Certificate>| SnpError::ChainCount { count: v.len() })?;
            let is_ark_of = |ark: &Certificate, ask: &Certificate| {
                (ark, ark).verify().is_ok() && (ark, ask).verify().is_ok()
            };
            let (ark, ask) = if is_ark_of(&b, &a) {
                (b, a)
            } else if is_ark_of(&a, &b) {
                (a, b)
            } else {
                return Err(SnpError::ChainNoArk);
            };
            match amd_ark_product(&ark)? {
                Some(product) => Ok((ark, ask, format!("{name} (amd {product} ark)"))),
                None => {
                    use sha2::Digest as _;
                    Err(SnpError::ArkNotAmd {
                        chain: name,
                        key_sha256: hex::encode(sha2::Sha256::digest(ark.public_key_sec1())),
                    })
                }
            }
        }
    }
}

/// A self-made ARK/ASK chain for tests: certificates re-signed with RSASSA-PSS SHA-384 by
/// keys generated per test run, so that every signature in the chain holds but its root is
/// not AMD's.
#[cfg(any(test, feature = "test-forge"))]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
pub mod forge {
    use rand_core::OsRng;
    use rsa::pkcs8::EncodePublicKey;
    use rsa::signature::{RandomizedSigner, SignatureEncoding};
    use rsa::RsaPrivateKey;
    use sev::certs::snp::builtin;
    use sha2::Sha384;

    /// (header length, total length) of the DER element at the start of `buf`.
    fn tlv(buf: &[u8]) -> (usize, usize) {
        let first = usize::from(buf[1]);
        if first < 0x80 {
            return (2, 2 + first);
        }
        let n = first & 0x7f;
        let len = buf[2..2 + n]
            .iter()
            .fold(0usize, |len, b| (len << 8) | usize::from(*b));
        (2 + n, 2 + n + len)
    }

    /// The DER elements of a constructed element's content.
    fn elements(mut content: &[u8]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        while !content.is_empty() {
            let (_, total) = tlv(content);
            out.push(content[..total].to_vec());
            content = &content[total..];
        }
        out
    }

    fn wrap(tag: u8, content: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        let len = content.len();
        if len < 0x80 {
            out.push(u8::try_from(len).unwrap());
        } else {
            let bytes: Vec<u8> = len
                .to_be_bytes()
                .into_iter()
                .skip_while(|b| *b == 0)
                .collect();
            out.push(0x80 | u8::try_from(bytes.len()).unwrap());
            out.extend(bytes);
        }
        out.extend_from_slice(content);
        out
    }

    /// `cert` (DER) with its public key replaced by `spki` (DER, when given) and signed by
    /// `signer` (RSASSA-PSS SHA-384, the AMD certificate signature scheme).
    pub fn resign(cert: &[u8], spki: Option<&[u8]>, signer: &RsaPrivateKey) -> Vec<u8> {
        let (header, _) = tlv(cert);
        let parts = elements(&cert[header..]);
        assert_eq!(parts.len(), 3, "certificate: tbs, algorithm, signature");
        let (tbs_header, _) = tlv(&parts[0]);
        let mut tbs = elements(&parts[0][tbs_header..]);
        if let Some(spki) = spki {
            // [0] version, serial, signature, issuer, validity, subject, spki, …
            assert_eq!(tbs[0][0], 0xa0);
            assert_eq!(tbs[6][0], 0x30);
            tbs[6] = spki.to_vec();
        }
        let tbs = wrap(0x30, &tbs.concat());
        let signature = rsa::pss::SigningKey::<Sha384>::new(signer.clone())
            .sign_with_rng(&mut OsRng, &tbs)
            .to_vec();
        let mut bits = vec![0u8];
        bits.extend(signature);
        wrap(0x30, &[tbs, parts[1].clone(), wrap(0x03, &bits)].concat())
    }

    /// A forged chain, DER.
    #[derive(Debug)]
    pub struct Forged {
        /// A self-signed ARK (AMD's Milan ARK with another key).
        pub ark: Vec<u8>,
        /// An ASK signed by that ARK (AMD's Milan ASK with another key).
        pub ask: Vec<u8>,
        /// The VCEK given to [`chain`], signed by that ASK (its key unchanged).
        pub vcek: Vec<u8>,
    }

    /// A self-made ARK and ASK, and `vcek` (DER) re-signed by that ASK.
    pub fn chain(vcek: &[u8]) -> Forged {
        let ark_key = RsaPrivateKey::new(&mut OsRng, 1024).unwrap();
        let ask_key = RsaPrivateKey::new(&mut OsRng, 1024).unwrap();
        let spki = |k: &RsaPrivateKey| {
            k.to_public_key()
                .to_public_key_der()
                .unwrap()
                .as_bytes()
                .to_vec()
        };
        let ark = resign(
            &builtin::milan::ark().unwrap().to_der().unwrap(),
            Some(&spki(&ark_key)),
            &ark_key,
        );
        let ask = resign(
            &builtin::milan::ask().unwrap().to_der().unwrap(),
            Some(&spki(&ask_key)),
            &ark_key,
        );
        Forged {
            ark,
            ask,
            vcek: resign(vcek, None, &ask_key),
        }
    }

    /// DER certificates as one PEM.
    pub fn pem(ders: &[&[u8]]) -> Vec<u8> {
        use base64::Engine;
        let mut out = String::new();
        for der in ders {
            let text = base64::engine::general_purpose::STANDARD.encode(der);
            out.push_str("-----BEGIN CERTIFICATE-----\n");
            for line in text.as_bytes().chunks(64) {
                out.push_str(std::str::from_utf8(line).unwrap());
                out.push('\n');
            }
            out.push_str("-----END CERTIFICATE-----\n");
        }
        out.into_bytes()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    macro_rules! vector {
        ($path:literal) => {
            std::fs::read(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/vectors/",
                $path
            ))
            .expect($path)
        };
    }

    fn milan_pem() -> ChainSource {
        ChainSource::Pem(vector!("go-sev-guest/milan.testcer"))
    }

    fn flip(mut bytes: Vec<u8>, index: usize) -> Vec<u8> {
        bytes[index] ^= 0x01;
        bytes
    }

    fn first_pem_cert(pem: &[u8]) -> Vec<u8> {
        pem_certificates(pem).unwrap()[0].to_vec()
    }

    #[test]
    fn product_from_str() {
        assert_eq!("milan".parse::<Product>().unwrap(), Product::Milan);
        assert_eq!("genoa".parse::<Product>().unwrap(), Product::Genoa);
        assert_eq!("turin".parse::<Product>().unwrap(), Product::Turin);
        assert!(matches!(
            "Milan".parse::<Product>(),
            Err(SnpError::UnknownProduct { .. })
        ));
    }

    #[test]
    fn go_sev_guest_with_pem_chain_and_builtin_milan() {
        let report = vector!("go-sev-guest/attestation.bin");
        let vcek = vector!("go-sev-guest/vcek.testcer");
        let v = verify_report(&report, &vcek, milan_pem()).unwrap();
        assert!(v.verified);
        assert_eq!(v.version, 2);
        assert_eq!(v.policy, 0xb0000);
        assert!(v.report_data.starts_with("0102030405000000"));
        assert_eq!(
            v.reported_tcb,
            TcbFields {
                bootloader: 2,
                tee: 0,
                snp: 5,
                microcode: 68,
                fmc: None
            }
        );
        assert_eq!(v.measurement.len(), 96);
        assert_eq!(v.chip_id.len(), 128);
        let v2 = verify_report(&report, &vcek, ChainSource::Builtin(Product::Milan)).unwrap();
        assert_eq!(v, v2);

        let json = serde_json::to_value(&v).unwrap();
        assert_eq!(json["verified"], serde_json::Value::Bool(true));
        assert_eq!(json["signing_key"], "vcek");
        assert_eq!(json["reported_tcb"]["microcode"], 68);
        assert!(json["reported_tcb"].get("fmc").is_none());
        assert!(json["measurement"].is_string());
    }

    #[test]
    fn pem_chain_order_does_not_matter() {
        let pem = vector!("go-sev-guest/milan.testcer");
        let ders = pem_certificates(&pem).unwrap();
        assert_eq!(ders.len(), 2);
        let swapped = forge::pem(&[&ders[1], &ders[0]]);
        let report = vector!("go-sev-guest/attestation.bin");
        let vcek = vector!("go-sev-guest/vcek.testcer");
        verify_report(&report, &vcek, ChainSource::Pem(swapped)).unwrap();
    }

    #[test]
    fn trustee_test_report_builtin_milan() {
        let v = verify_report(
            &vector!("trustee/snp/test-report.bin"),
            &vector!("trustee/snp/test-vcek.der"),
            ChainSource::Builtin(Product::Milan),
        )
        .unwrap();
        assert_eq!(v.guest_svn, 4);
        assert_eq!(v.policy, 0x3001f);
        assert_eq!(v.reported_tcb.microcode, 115);
        assert_eq!(v.current_tcb.microcode, 206);
        assert_ne!(v.id_key_digest, "0".repeat(96));
    }

    #[test]
    fn virtee_milan_report_builtin_milan() {
        let v = verify_report(
            &vector!("derived/virtee-sev-report_milan.bin"),
            &vector!("virtee-sev/certs_data/vcek_milan.der"),
            ChainSource::Builtin(Product::Milan),
        )
        .unwrap();
        assert!(v.chip_id.starts_with("d49554ec"));
    }

    #[test]
    fn azure_hcl_report_with_pem_vcek() {
        // The VCEK is cert #1 of trustee's vcek.pem; the bundle itself is refused.
        let bundle = vector!("trustee/az-snp-vtpm/vcek.pem");
        let report = vector!("derived/trustee-az-hcl-report.snp-report.bin");
        let vcek = first_pem_cert(&bundle);
        verify_report(&report, &vcek, ChainSource::Builtin(Product::Milan)).unwrap();
        assert!(matches!(
            verify_report(&report, &bundle, ChainSource::Builtin(Product::Milan)),
            Err(SnpError::VcekCount { count: 3 })
        ));
    }

    #[test]
    fn azure_evidence_reports_builtin_milan() {
        for (report, vcek) in [
            (
                vector!("derived/trustee-evidence-v0.snp-report.bin"),
                vector!("derived/trustee-evidence-v0.vcek.der"),
            ),
            (
                vector!("derived/trustee-evidence-v1.snp-report.bin"),
                vector!("derived/trustee-evidence-v1.vcek.der"),
            ),
            (
                vector!("derived/trustee-evidence-v2.snp-report.bin"),
                vector!("derived/trustee-evidence-v2.vcek.der"),
            ),
        ] {
            let v = verify_report(&report, &vcek, ChainSource::Builtin(Product::Milan)).unwrap();
            assert_eq!(v.version, 3);
        }
    }

    #[test]
    fn genoa_reports_builtin_genoa_and_pem() {
        let report = vector!("derived/trustee-evidence-genoa.snp-report.bin");
        let vcek_der = vector!("derived/trustee-evidence-genoa.vcek.der");
        let vcek_pem = vector!("trustee/az-snp-vtpm/vcek-genoa.pem");
        let v = verify_report(&report, &vcek_der, ChainSource::Builtin(Product::Genoa)).unwrap();
        assert_eq!(v.reported_tcb.snp, 23);
        assert_eq!(v.cpuid_fam_id, Some(0x19));
        verify_report(&report, &vcek_pem, ChainSource::Builtin(Product::Genoa)).unwrap();
        verify_report(
            &report,
            &vcek_der,
            ChainSource::Pem(vector!("go-sev-guest/trust/ask_ark_genoa.pem")),
        )
        .unwrap();

        verify_report(
            &vector!("derived/trustee-e2e-evidence.snp-report.bin"),
            &vector!("derived/trustee-e2e-evidence.vcek.der"),
            ChainSource::Builtin(Product::Genoa),
        )
        .unwrap();
    }

    #[test]
    fn vlek_report_with_asvk_chain() {
        let report = vector!("trustee/snp/test-vlek-report.bin");
        let vlek = vector!("trustee/snp/test-vlek.der");
        let v = verify_report(
            &report,
            &vlek,
            ChainSource::Pem(vector!("go-sev-guest/trust/ask_ark_milan_vlek.pem")),
        )
        .unwrap();
        assert_eq!(v.signing_key, "vlek");
        assert_eq!(v.vmpl, 1);
        // The VLEK is not signed by the (VCEK) ASK.
        assert!(matches!(
            verify_report(&report, &vlek, ChainSource::Builtin(Product::Milan)),
            Err(SnpError::VcekNotSignedByAsk { .. })
        ));
    }

    #[test]
    fn flipped_measurement_bit_fails_signature() {
        let report = flip(vector!("go-sev-guest/attestation.bin"), 0x90);
        let err =
            verify_report(&report, &vector!("go-sev-guest/vcek.testcer"), milan_pem()).unwrap_err();
        assert!(matches!(err, SnpError::ReportSignature { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.starts_with("report signature does not verify with the vcek"));
        assert!(!msg.ends_with('.'));
    }

    #[test]
    fn flipped_signature_bit_fails_signature() {
        let report = flip(vector!("trustee/snp/test-report.bin"), 0x2a0);
        let err = verify_report(
            &report,
            &vector!("trustee/snp/test-vcek.der"),
            ChainSource::Builtin(Product::Milan),
        )
        .unwrap_err();
        assert!(matches!(err, SnpError::ReportSignature { .. }), "{err:?}");
    }

    #[test]
    fn flipped_vcek_bit_fails_chain() {
        let vcek = vector!("go-sev-guest/vcek.testcer");
        let last = vcek.len() - 1;
        let err = verify_report(
            &vector!("go-sev-guest/attestation.bin"),
            &flip(vcek, last),
            ChainSource::Builtin(Product::Milan),
        )
        .unwrap_err();
        assert!(
            matches!(err, SnpError::VcekNotSignedByAsk { .. }),
            "{err:?}"
        );
    }

    #[test]
    fn wrong_product_chain_fails() {
        let report = vector!("go-sev-guest/attestation.bin");
        let vcek = vector!("go-sev-guest/vcek.testcer");
        for chain in [
            ChainSource::Builtin(Product::Genoa),
            ChainSource::Builtin(Product::Turin),
            ChainSource::Pem(vector!("go-sev-guest/trust/ask_ark_genoa.pem")),
        ] {
            let err = verify_report(&report, &vcek, chain).unwrap_err();
            assert!(
                matches!(err, SnpError::VcekNotSignedByAsk { .. }),
                "{err:?}"
            );
        }
    }

    #[test]
    fn wrong_vcek_fails_signature() {
        let err = verify_report(
            &vector!("go-sev-guest/attestation.bin"),
            &vector!("trustee/snp/test-vcek.der"),
            ChainSource::Builtin(Product::Milan),
        )
        .unwrap_err();
        assert!(matches!(err, SnpError::ReportSignature { .. }), "{err:?}");
    }

    #[test]
    fn truncated_or_padded_report_fails() {
        let report = vector!("go-sev-guest/attestation.bin");
        let vcek = vector!("go-sev-guest/vcek.testcer");
        let err = verify_report(&report[..REPORT_LEN - 1], &vcek, milan_pem()).unwrap_err();
        assert!(
            matches!(err, SnpError::ReportLength { len: 1183 }),
            "{err:?}"
        );
        let mut padded = report.clone();
        padded.push(0);
        let err = verify_report(&padded, &vcek, milan_pem()).unwrap_err();
        assert!(matches!(err, SnpError::ReportLength { .. }), "{err:?}");
        assert!(matches!(
            verify_report(&[], &vcek, milan_pem()),
            Err(SnpError::ReportLength { len: 0 })
        ));
    }

    #[test]
    fn nonzero_reserved_byte_is_refused() {
        // 0x4c..0x50 is reserved (between key_info and report_data).
        let report = flip(vector!("go-sev-guest/attestation.bin"), 0x4c);
        let err =
            verify_report(&report, &vector!("go-sev-guest/vcek.testcer"), milan_pem()).unwrap_err();
        assert!(
            matches!(err, SnpError::ReportParse(_) | SnpError::ReportNotCanonical),
            "{err:?}"
        );
    }

    #[test]
    fn nonzero_unsigned_tail_is_refused() {
        // 0x400 is in the reserved part of the signature field, outside the signed bytes:
        // accepting it would let unsigned bytes ride along with a verified report.
        let report = flip(vector!("go-sev-guest/attestation.bin"), 0x400);
        let err =
            verify_report(&report, &vector!("go-sev-guest/vcek.testcer"), milan_pem()).unwrap_err();
        assert!(
            matches!(err, SnpError::ReportParse(_) | SnpError::ReportNotCanonical),
            "{err:?}"
        );
    }

    #[test]
    fn bad_chain_pems_fail_closed() {
        let report = vector!("go-sev-guest/attestation.bin");
        let vcek = vector!("go-sev-guest/vcek.testcer");
        let pem = vector!("go-sev-guest/milan.testcer");
        let ders = pem_certificates(&pem).unwrap();

        // Only the ASK.
        let err =
            verify_report(&report, &vcek, ChainSource::Pem(forge::pem(&[&ders[0]]))).unwrap_err();
        assert!(matches!(err, SnpError::ChainCount { count: 1 }), "{err:?}");
        // ASK twice: no ARK.
        let twice = forge::pem(&[&ders[0], &ders[0]]);
        let err = verify_report(&report, &vcek, ChainSource::Pem(twice)).unwrap_err();
        assert!(matches!(err, SnpError::ChainNoArk), "{err:?}");
        // Not PEM at all.
        let err = verify_report(&report, &vcek, ChainSource::Pem(vcek.clone())).unwrap_err();
        assert!(
            matches!(
                err,
                SnpError::ChainCount { count: 0 } | SnpError::ChainParse(_)
            ),
            "{err:?}"
        );
    }

    /// A private key section between the two certificates (the old hand-written parser
    /// skipped it too): skipped, the chain verifies.
    #[test]
    fn pem_sections_other_than_certificates_are_skipped() {
        let pem = vector!("go-sev-guest/milan.testcer");
        let ders = pem_certificates(&pem).unwrap();
        let ask = String::from_utf8(forge::pem(&[&ders[0]])).unwrap();
        let ark = String::from_utf8(forge::pem(&[&ders[1]])).unwrap();
        let mixed = format!(
            "subject=ASK\n{ask}-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIA==\n\
             -----END PRIVATE KEY-----\n-----BEGIN X-UNKNOWN-----\nnot base64 at all!\n\
             -----END X-UNKNOWN-----\n{ark}"
        );
        assert_eq!(pem_certificates(mixed.as_bytes()).unwrap(), ders);
        let report = vector!("go-sev-guest/attestation.bin");
        let vcek = vector!("go-sev-guest/vcek.testcer");
        verify_report(&report, &vcek, ChainSource::Pem(mixed.into_bytes())).unwrap();
    }

    #[test]
    fn broken_pem_is_refused_with_the_reason() {
        let pem = String::from_utf8(vector!("go-sev-guest/milan.testcer")).unwrap();
        let report = vector!("go-sev-guest/attestation.bin");
        let vcek = vector!("go-sev-guest/vcek.testcer");
        let chain_error = |pem: &str| {
            let err = verify_report(&report, &vcek, ChainSource::Pem(pem.as_bytes().to_vec()))
                .unwrap_err();
            assert!(matches!(err, SnpError::ChainParse(_)), "{err:?}");
            crate::error_chain(&err)
        };

        // Invalid base64 inside a CERTIFICATE section.
        let first_body_line = pem.lines().nth(1).unwrap();
        let bad = pem.replacen(first_body_line, &first_body_line.replace('A', "*"), 1);
        assert_ne!(bad, pem);
        assert!(matches!(
            pem_certificates(bad.as_bytes()),
            Err(PemError::Base64 { .. })
        ));
        let err = chain_error(&bad);
        assert!(err.contains("not base64"), "{err}");
        assert!(err.contains("cert_chain file"), "{err}");

        // No END line.
        let end = "-----END CERTIFICATE-----";
        let cut = &pem[..pem.rfind(end).unwrap()];
        assert_eq!(
            pem_certificates(cut.as_bytes()),
            Err(PemError::NoEnd {
                label: "CERTIFICATE".to_string()
            })
        );
        assert!(chain_error(cut).contains("without an END line"));

        // Not text.
        assert!(matches!(
            pem_certificates(&[0x30, 0x82, 0xff, 0xfe]),
            Err(PemError::NotText(_))
        ));
    }

    #[test]
    fn pem_without_a_certificate_is_refused() {
        let key_only = "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEA\n-----END PUBLIC KEY-----\n";
        for text in [key_only, "", "just words\n"] {
            assert_eq!(
                pem_certificates(text.as_bytes()),
                Err(PemError::NoCertificate),
                "{text:?}"
            );
        }
        assert!(PemError::NoCertificate
            .to_string()
            .contains("holds no PEM certificate"));
        let report = vector!("go-sev-guest/attestation.bin");
        let vcek = vector!("go-sev-guest/vcek.testcer");
        assert!(matches!(
            verify_report(
                &report,
                key_only.as_bytes(),
                ChainSource::Builtin(Product::Milan)
            ),
            Err(SnpError::VcekCount { count: 0 })
        ));
        assert!(matches!(
            verify_report(
                &report,
                &vcek,
                ChainSource::Pem(key_only.as_bytes().to_vec())
            ),
            Err(SnpError::ChainCount { count: 0 })
        ));
    }

    #[test]
    fn a_self_made_ark_is_refused_although_every_signature_holds() {
        let report = vector!("trustee/snp/test-report.bin");
        let forged = forge::chain(&vector!("trustee/snp/test-vcek.der"));
        let [ark, ask, vcek] =
            [&forged.ark, &forged.ask, &forged.vcek].map(|der| Certificate::from_der(der).unwrap());
        // The forgery is internally consistent: only the root decides.
        (&ark, &ark).verify().unwrap();
        (&ark, &ask).verify().unwrap();
        (&ask, &vcek).verify().unwrap();
        (&vcek, &parse_report(&report).unwrap()).verify().unwrap();

        for pem in [
            forge::pem(&[&forged.ask, &forged.ark]),
            forge::pem(&[&forged.ark, &forged.ask]),
        ] {
            let err = verify_report(&report, &forged.vcek, ChainSource::Pem(pem)).unwrap_err();
            assert!(matches!(err, SnpError::ArkNotAmd { .. }), "{err:?}");
            let msg = err.to_string();
            assert!(
                msg.starts_with("the ark of the pem chain is not amd's"),
                "{msg}"
            );
            assert!(msg.contains("pass the amd kds cert_chain"), "{msg}");
        }
        // The forged VCEK does not chain to AMD's ASK either.
        assert!(matches!(
            verify_report(&report, &forged.vcek, ChainSource::Builtin(Product::Milan)),
            Err(SnpError::VcekNotSignedByAsk { .. })
        ));
    }

    #[test]
    fn amd_ask_with_a_self_signed_ark_is_refused() {
        let report = vector!("go-sev-guest/attestation.bin");
        let vcek = vector!("go-sev-guest/vcek.testcer");
        let forged = forge::chain(&vector!("trustee/snp/test-vcek.der"));
        let ask = builtin::milan::ask().unwrap().to_der().unwrap();
        let err = verify_report(
            &report,
            &vcek,
            ChainSource::Pem(forge::pem(&[&ask, &forged.ark])),
        )
        .unwrap_err();
        assert!(matches!(err, SnpError::ChainNoArk), "{err:?}");
    }

    #[test]
    fn a_pem_chain_names_the_amd_product_of_its_ark() {
        for (pem, product) in [
            (vector!("go-sev-guest/milan.testcer"), Product::Milan),
            (
                vector!("go-sev-guest/trust/ask_ark_genoa.pem"),
                Product::Genoa,
            ),
            (
                vector!("go-sev-guest/trust/ask_ark_milan_vlek.pem"),
                Product::Milan,
            ),
        ] {
            let (ark, _, name) = load_chain(ChainSource::Pem(pem)).unwrap();
            assert_eq!(amd_ark_product(&ark).unwrap(), Some(product));
            assert_eq!(name, format!("pem chain (amd {product} ark)"));
        }
    }

    #[test]
    fn parse_unverified_reads_the_fields_and_says_unverified() {
        let report = vector!("trustee/snp/test-report.bin");
        let fields = parse_unverified(&report).unwrap();
        assert!(!fields.verified);
        let mut verified = verify_report(
            &report,
            &vector!("trustee/snp/test-vcek.der"),
            ChainSource::Builtin(Product::Milan),
        )
        .unwrap();
        verified.verified = false;
        assert_eq!(fields, verified);
        assert!(matches!(
            parse_unverified(&report[1..]),
            Err(SnpError::ReportLength { .. })
        ));
    }

    #[test]
    fn garbage_vcek_fails_parse() {
        let err = verify_report(
            &vector!("go-sev-guest/attestation.bin"),
            b"not a certificate",
            ChainSource::Builtin(Product::Milan),
        )
        .unwrap_err();
        assert!(matches!(err, SnpError::VcekParse(_)), "{err:?}");
    }

    #[test]
    fn error_messages_are_lowercase_without_period() {
        let errors = [
            SnpError::ReportLength { len: 3 },
            SnpError::ReportNotCanonical,
            SnpError::ChainNoArk,
            SnpError::ArkNotAmd {
                chain: "pem chain".to_string(),
                key_sha256: "00".repeat(32),
            },
            SnpError::ChainCount { count: 3 },
            SnpError::VcekCount { count: 0 },
            SnpError::UnsupportedSignatureAlgo { algo: 2 },
            SnpError::UnsignedReport { signing_key: 7 },
        ];
        for e in errors {
            let msg = e.to_string();
            assert!(!msg.ends_with('.'), "{msg}");
            assert_eq!(
                msg.chars().next(),
                msg.chars().next().map(|c| c.to_ascii_lowercase())
            );
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod json_round_trip {
    use super::*;

    /// Found by the fuzz smoke: a report whose policy has the must-be-one bit 17 clear parsed
    /// raw, but its evidence JSON could not be turned back into it. No correct firmware signs
    /// such a report: both parsers refuse it.
    #[test]
    fn a_policy_without_the_must_be_one_bit_is_refused_by_every_parser() {
        let mut report = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/vectors/go-sev-guest/attestation.bin"
        ))
        .unwrap();
        let policy = 0x08;
        report[policy + 2] &= !0x02; // bit 17
        assert!(matches!(
            parse_unverified(&report),
            Err(SnpError::PolicyReservedBit { .. })
        ));
        assert!(crate::evidence::snp_json::evidence_json(&report, None).is_err());
    }
}
