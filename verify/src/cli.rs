//! The verifier's command line, shared by `cvm-warden-verify` and the daemon's
//! `cvm-warden audit verify` / `cvm-warden evidence verify` (thin wrappers).
//!
//! Exit statuses of `audit verify`: 0 every run in the file is attested, 3 the file is
//! intact but some run is not fully attested, 1 broken or unreadable, 2 usage.

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::Args;

use crate::check::Pins;
use crate::digest::Digest;
use crate::text::sanitize;
use crate::verdict::{run_verify_command, EXIT_BROKEN, EXIT_USAGE};

/// `audit verify FILE`.
#[derive(Debug, Args)]
pub struct AuditVerifyArgs {
    /// The JSON-lines audit log (a file sink's copy, or a console capture).
    pub file: PathBuf,
    /// Print the verdicts as JSON (for machines).
    #[arg(long)]
    pub json: bool,
    /// The policy digest every run must have booted with (`sha256:<hex>`, as `cvm-warden
    /// policy check` prints it).
    #[arg(long, value_name = "DIGEST")]
    pub expect_policy: Option<Digest>,
    /// The bundle digest every run must have measured (`sha256:<hex>`, as `cvm-warden
    /// measure` prints it).
    #[arg(long, value_name = "DIGEST")]
    pub expect_bundle: Option<Digest>,
    /// The TPM attestation key the broker trusts: SubjectPublicKeyInfo as PEM, DER, or
    /// base64 of the DER (the form of Trustee's `trusted_aks`). Without it a `tpm` quote
    /// proves nothing.
    #[arg(long, value_name = "FILE")]
    pub trusted_ak: Option<PathBuf>,
    /// The SEV-SNP launch measurement (96 hex digits).
    #[arg(long, value_name = "HEX")]
    pub snp_measurement: Option<String>,
    /// The TD's MRTD (96 hex digits).
    #[arg(long, value_name = "HEX")]
    pub tdx_mrtd: Option<String>,
    /// Also trust this PEM root for the GPU evidence of broker exchanges (tests, demos). A
    /// run whose GPU is rooted there is at best "not proven" (exit 3), never attested.
    #[arg(long, value_name = "FILE")]
    pub gpu_root: Option<PathBuf>,
}

/// A pin that cannot be read (exit 2).
#[derive(Debug, thiserror::Error)]
pub enum PinError {
    /// The AK file cannot be read.
    #[error("cannot read --trusted-ak {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The AK file holds no public key.
    #[error(
        "--trusted-ak {path} is not a SubjectPublicKeyInfo (PEM \"PUBLIC KEY\", DER, or base64 \
         of the DER as in Trustee's trusted_aks): {why}"
    )]
    Ak {
        /// The file.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// The GPU root file cannot be read or holds no certificate.
    #[error("--gpu-root {path}: {why}")]
    GpuRoot {
        /// The file.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// A measurement is not 48 bytes of hex.
    #[error("{flag} {value:?} is not 48 bytes in hex (96 hex digits)")]
    Measurement {
        /// The option.
        flag: &'static str,
        /// What was given.
        value: String,
    },
}

impl AuditVerifyArgs {
    /// The pins the options ask for.
    pub fn pins(&self) -> Result<Pins, PinError> {
        let measurement = |flag: &'static str, value: &Option<String>| {
            value
                .as_deref()
                .map(|text| {
                    hex::decode(text.trim())
                        .ok()
                        .filter(|b| b.len() == 48)
                        .ok_or_else(|| PinError::Measurement {
                            flag,
                            value: text.to_string(),
                        })
                })
                .transpose()
        };
        Ok(Pins {
            policy: self.expect_policy,
            bundle: self.expect_bundle,
            trusted_ak: self.trusted_ak.as_deref().map(read_ak).transpose()?,
            snp_measurement: measurement("--snp-measurement", &self.snp_measurement)?,
            tdx_mrtd: measurement("--tdx-mrtd", &self.tdx_mrtd)?,
            gpu_root: self.gpu_root.as_deref().map(read_gpu_root).transpose()?,
        })
    }
}

/// Reads a `--gpu-root` PEM file (it must hold at least one certificate).
fn read_gpu_root(path: &Path) -> Result<Vec<u8>, PinError> {
    let why = |why: String| PinError::GpuRoot {
        path: path.to_path_buf(),
        why,
    };
    let pem = std::fs::read(path).map_err(|e| why(format!("cannot read it: {e}")))?;
    crate::evidence::nvidia::Roots::with_extra(&pem).map_err(|e| why(e.to_string()))?;
    Ok(pem)
}

/// Reads an AK public key: PEM `PUBLIC KEY`, DER, or base64 (standard) of the DER.
pub fn read_ak(path: &Path) -> Result<Vec<u8>, PinError> {
    use base64::Engine;
    use rsa::pkcs8::DecodePublicKey;
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::SubjectPublicKeyInfoDer;
    let bytes = std::fs::read(path).map_err(|source| PinError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let der = if let Ok(spki) = SubjectPublicKeyInfoDer::from_pem_slice(&bytes) {
        spki.as_ref().to_vec()
    } else if rsa::RsaPublicKey::from_public_key_der(&bytes).is_ok() {
        bytes
    } else {
        let text = String::from_utf8_lossy(&bytes);
        base64::engine::general_purpose::STANDARD
            .decode(text.trim())
            .map_err(|e| PinError::Ak {
                path: path.to_path_buf(),
                why: format!("neither PEM nor DER, and not base64: {e}"),
            })?
    };
    rsa::RsaPublicKey::from_public_key_der(&der).map_err(|e| PinError::Ak {
        path: path.to_path_buf(),
        why: e.to_string(),
    })?;
    Ok(der)
}

/// `audit verify`: prints the verdicts to stdout; returns the exit status (0 every run
/// attested, 3 intact but not fully attested, 1 broken or unreadable, 2 usage).
pub fn audit_verify(args: &AuditVerifyArgs) -> i32 {
    let pins = match args.pins() {
        Ok(pins) => pins,
        Err(error) => {
            print_error(&error);
            return EXIT_USAGE;
        }
    };
    let mut stdout = std::io::stdout().lock();
    match run_verify_command(&args.file, pins, args.json, &mut stdout) {
        Ok(code) => code,
        Err(error) => {
            print_error(&error);
            EXIT_BROKEN
        }
    }
}

/// Prints an error and its causes to stderr, one `because:` line per cause.
pub fn print_error(error: &dyn std::error::Error) {
    let mut stderr = std::io::stderr().lock();
    let _ = writeln!(stderr, "error: {}", sanitize(&error.to_string(), 4000));
    let mut source = error.source();
    while let Some(cause) = source {
        let _ = writeln!(stderr, "  because: {}", sanitize(&cause.to_string(), 4000));
        source = cause.source();
    }
}

fn print_json(value: &impl serde::Serialize) -> i32 {
    match serde_json::to_string_pretty(value) {
        Ok(text) => {
            let _ = writeln!(std::io::stdout().lock(), "{text}");
            0
        }
        Err(error) => {
            print_error(&error);
            1
        }
    }
}

#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("kind").required(true).args(["snp_report", "tpm_quote", "gpu_report"]))]
pub struct EvidenceArgs {
    /// SEV-SNP attestation report (1184 bytes, raw).
    #[arg(long, value_name = "FILE", requires = "vcek")]
    pub snp_report: Option<PathBuf>,
    /// The VCEK (or VLEK) certificate that signed the report, DER or PEM.
    #[arg(long, value_name = "FILE", requires = "snp_report")]
    pub vcek: Option<PathBuf>,
    /// PEM file with the ASK (or ASVK) and ARK, as AMD's key server serves `cert_chain`.
    #[arg(
        long,
        value_name = "FILE",
        conflicts_with = "product",
        requires = "snp_report"
    )]
    pub chain: Option<PathBuf>,
    /// Use AMD's built-in ARK and ASK for this product: milan, genoa or turin.
    #[arg(long, requires = "snp_report")]
    pub product: Option<crate::evidence::Product>,
    /// TPM quote: the TPMS_ATTEST bytes.
    #[arg(long, value_name = "MSG", requires_all = ["tpm_signature", "ak"], conflicts_with = "snp_report")]
    pub tpm_quote: Option<PathBuf>,
    /// The quote's signature: raw, or a marshalled TPMT_SIGNATURE.
    #[arg(long, value_name = "SIG", requires = "tpm_quote")]
    pub tpm_signature: Option<PathBuf>,
    /// The attestation key's public key, PEM or DER.
    #[arg(long, value_name = "FILE", requires = "tpm_quote")]
    pub ak: Option<PathBuf>,
    /// SHA-256 PCR values concatenated, PCR 0 first (32 bytes each); checked against the
    /// quote's PCR digest.
    #[arg(long, value_name = "FILE", requires = "tpm_quote")]
    pub pcrs: Option<PathBuf>,
    /// NVIDIA GPU attestation report (SPDM GET_MEASUREMENTS request ‖ response), raw bytes
    /// or hex text as NVIDIA's samples are.
    #[arg(
        long,
        value_name = "FILE",
        requires_all = ["gpu_certs", "nonce"],
        conflicts_with_all = ["snp_report", "tpm_quote"]
    )]
    pub gpu_report: Option<PathBuf>,
    /// The GPU's attestation certificate chain, PEM, leaf first (NVML's
    /// `attestationCertChain`); it must end at NVIDIA's device identity root.
    #[arg(long, value_name = "FILE", requires = "gpu_report")]
    pub gpu_certs: Option<PathBuf>,
    /// The 32-byte nonce the report must carry (64 hex digits).
    #[arg(long, value_name = "HEX", requires = "gpu_report")]
    pub nonce: Option<String>,
    /// Verification time for certificate validity (RFC 3339; default: now).
    #[arg(long, value_name = "RFC3339", requires = "gpu_report")]
    pub at: Option<String>,
    /// Accept a GPU report without FWID (drivers before 550), as NVIDIA's verifiers do;
    /// refused by default, as Trustee's local verifier does ("fwid not found").
    #[arg(long, requires = "gpu_report")]
    pub allow_missing_fwid: bool,
    /// Also trust this PEM root for GPU chains (tests, demos). Evidence rooted there is
    /// printed but exits 3: it proves nothing about a real NVIDIA GPU.
    #[arg(long, value_name = "FILE", requires = "gpu_report")]
    pub gpu_root: Option<PathBuf>,
    /// An NVIDIA RIM (signed SWID tag XML: the driver's or the VBIOS's) the GPU's
    /// measurements must match; repeat for the driver and the VBIOS RIM. Its signature and
    /// chain up to NVIDIA's pinned CoRIM root are verified at --at.
    #[arg(long = "rim", value_name = "FILE", requires = "gpu_report")]
    pub rims: Vec<PathBuf>,
}

/// `evidence verify --gpu-report`: exit 0 verified up to NVIDIA's root, 3 verified up to a
/// root given with `--gpu-root` (not NVIDIA's), 1 refused or unreadable, 2 usage.
fn gpu_verify(args: &EvidenceArgs, report: &Path) -> i32 {
    use crate::evidence::nvidia;
    let fail = |error: &dyn std::error::Error| {
        print_error(error);
        1
    };
    let usage = |text: String| {
        let _ = writeln!(std::io::stderr().lock(), "error: {text}");
        2
    };
    let (Some(certs), Some(nonce)) = (&args.gpu_certs, &args.nonce) else {
        return usage("--gpu-report needs --gpu-certs FILE and --nonce HEX".to_string());
    };
    let Some(nonce) = hex::decode(nonce.trim())
        .ok()
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
    else {
        return usage(format!(
            "--nonce {nonce:?} is not 32 bytes in hex (64 hex digits)"
        ));
    };
    let at = match &args.at {
        Some(text) => match humantime::parse_rfc3339_weak(text) {
            Ok(at) => at,
            Err(e) => return usage(format!("--at {text:?} is not an RFC 3339 time: {e}")),
        },
        None => std::time::SystemTime::now(),
    };
    let read = |path: &Path| {
        std::fs::read(path).map_err(|error| {
            let _ = writeln!(
                std::io::stderr().lock(),
                "error: cannot read {}: {error}",
                path.display()
            );
        })
    };
    let (Ok(report), Ok(certs)) = (read(report), read(certs)) else {
        return 1;
    };
    let Ok(rims) = args
        .rims
        .iter()
        .map(|p| read(p))
        .collect::<Result<Vec<_>, ()>>()
    else {
        return 1;
    };
    let roots = match &args.gpu_root {
        Some(path) => match read(path) {
            Ok(pem) => nvidia::Roots::with_extra(&pem),
            Err(()) => return 1,
        },
        None => nvidia::Roots::nvidia(),
    };
    let roots = match roots {
        Ok(roots) => roots,
        Err(error) => return fail(&error),
    };
    let options = nvidia::VerifyOptions {
        roots,
        at,
        allow_missing_fwid: args.allow_missing_fwid,
        rims,
    };
    // With RIMs, each RIM's signature at `at`, then the measurements (both must pass).
    let verified = nvidia::decode_report(&report)
        .and_then(|raw| nvidia::verify(&raw, &certs, &nonce, &options));
    match verified {
        Ok(verified) => {
            let code = print_json(&verified);
            if code == 0 && verified.root != nvidia::RootKind::Nvidia {
                let _ = writeln!(
                    std::io::stderr().lock(),
                    "warning: the chain ends at the root given with --gpu-root, not NVIDIA's \
                     device identity root: this proves nothing about a real GPU (exit 3)"
                );
                return 3;
            }
            code
        }
        Err(error) => fail(&error),
    }
}

/// `evidence verify`: prints the verified fields as JSON; exit 0 verified, 1 refused or
/// unreadable, 2 usage, 3 (GPU only) verified up to a root that is not NVIDIA's.
pub fn evidence_verify(args: &EvidenceArgs) -> i32 {
    use crate::evidence::{tpm, verify_report, ChainSource};
    if let Some(report) = &args.gpu_report {
        return gpu_verify(args, report);
    }
    let read = |path: &Path| {
        std::fs::read(path).map_err(|error| {
            let _ = writeln!(
                std::io::stderr().lock(),
                "error: cannot read {}: {error}",
                path.display()
            );
        })
    };
    if let (Some(quote), Some(signature), Some(ak)) =
        (&args.tpm_quote, &args.tpm_signature, &args.ak)
    {
        let (Ok(quote), Ok(signature), Ok(ak)) = (read(quote), read(signature), read(ak)) else {
            return 1;
        };
        let pcrs = match &args.pcrs {
            Some(path) => match read(path) {
                Ok(bytes) => Some(bytes),
                Err(()) => return 1,
            },
            None => None,
        };
        return match tpm::verify_quote(&quote, &signature, &ak, pcrs.as_deref()) {
            Ok(verified) => print_json(&verified),
            Err(error) => {
                print_error(&error);
                1
            }
        };
    }
    let (Some(report), Some(vcek)) = (&args.snp_report, &args.vcek) else {
        return 2;
    };
    let (Ok(report), Ok(vcek)) = (read(report), read(vcek)) else {
        return 1;
    };
    let chain = match (&args.chain, args.product) {
        (Some(path), _) => match read(path) {
            Ok(pem) => ChainSource::Pem(pem),
            Err(()) => return 1,
        },
        (None, Some(product)) => ChainSource::Builtin(product),
        (None, None) => {
            let _ = writeln!(
                std::io::stderr().lock(),
                "error: --snp-report needs --chain FILE or --product milan|genoa|turin"
            );
            return 2;
        }
    };
    match verify_report(&report, &vcek, chain) {
        Ok(verified) => print_json(&verified),
        Err(error) => {
            print_error(&error);
            1
        }
    }
}
