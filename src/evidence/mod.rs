//! TEE evidence: parsing and offline verification.
//!
//! - [`snp`]: AMD SEV-SNP attestation reports, checked offline against a VCEK and the
//!   AMD ARK/ASK chain (built-in or a KDS `cert_chain` PEM).
//! - [`tpm`]: TPM 2.0 quotes, checked offline against the attestation key and, when given,
//!   the PCR values.

pub mod snp;
pub mod tpm;

pub use snp::{verify_report, ChainSource, Product, SnpError, TcbFields, VerifiedReport};
pub use tpm::{verify_quote, PcrSelection, TpmError, VerifiedQuote};
