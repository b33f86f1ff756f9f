//! TEE evidence: parsing and offline verification.
//!
//! - [`snp`]: AMD SEV-SNP attestation reports, checked offline against a VCEK and the
//!   AMD ARK/ASK chain (built-in or a KDS `cert_chain` PEM).

pub mod snp;
pub mod tpm;

pub use snp::{verify_report, ChainSource, Product, SnpError, TcbFields, VerifiedReport};
pub use tpm::{verify_quote, PcrSelection, TpmError, VerifiedQuote};
