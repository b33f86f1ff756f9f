//! TEE evidence: parsing and offline verification, per TEE.
//!
//! - [`snp`]: AMD SEV-SNP attestation reports, checked offline against a VCEK and the
//!   AMD ARK/ASK chain (built-in or a KDS `cert_chain` PEM); [`snp_json`]: the evidence
//!   JSON cvm-warden writes (report in the `sev` serde form, GHCB certificate table).
//! - [`tpm`]: TPM 2.0 quotes, checked offline against the attestation key and, when given,
//!   the PCR values.
//! - [`tdx`]: TD quotes (header, TD report body, REPORTDATA; the quote signature needs
//!   Intel's collateral and is not checked offline).
//! - [`azure`]: `az-snp-vtpm` (HCL report carrying an SNP report and the vTPM AK).
//! - [`nvidia`]: NVIDIA GPU attestation reports (SPDM GET_MEASUREMENTS) and their
//!   certificate chains up to NVIDIA's device identity root, pinned.
//! - [`nvidia_rim`]: NVIDIA RIMs (signed SWID tags of golden GPU measurements) and the
//!   match of a GPU report's measurements against them.

pub mod azure;
pub mod nvidia;
pub mod nvidia_rim;
pub mod snp;
pub mod snp_json;
pub mod tdx;
pub mod tpm;

pub use snp::{verify_report, ChainSource, Product, SnpError, TcbFields, VerifiedReport};
pub use tpm::{verify_quote, PcrSelection, TpmError, VerifiedQuote};

/// Evidence that does not parse as the TEE writes it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EvidenceError {
    /// A field or structure is not what the TEE produces.
    #[error("{tee}: malformed {what}: {detail}")]
    Malformed {
        /// The TEE (`snp`, `tdx`, `az-snp-vtpm`, …).
        tee: &'static str,
        /// What did not parse (`td quote`, `hcl report`, `evidence`, …).
        what: &'static str,
        /// Why.
        detail: String,
    },
    /// A record's details or evidence JSON does not have the shape cvm-warden writes
    /// (a missing, unknown or mistyped field).
    #[error("{what} does not have the shape cvm-warden writes: {detail}")]
    Schema {
        /// What was read (`tpm evidence`, `attest/attested details`, …).
        what: &'static str,
        /// The decoder's message.
        detail: String,
    },
}
