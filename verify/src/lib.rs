//! cvm-warden-verify: the offline verifier of cvm-warden's audit logs and TEE evidence.
//!
//! Auditors build this crate anywhere (pure Rust: no libtss2, no libcryptsetup, no `nix`,
//! no Linux-only API), and the daemon writes its records and bindings through the same
//! types, so writer and reader cannot drift.
//!
//! - [`record`]: one audit record and the exact bytes of its line (the daemon encodes
//!   through [`record::encode`]);
//! - [`chain`]: the hash chain of a log file, run by run;
//! - [`check`]: the attestation evidence a log carries (broker exchanges, checkpoints);
//! - [`schema`]: the typed details and evidence JSON the daemon writes and this crate reads;
//! - [`binding`]: the KBS report-data binding and the checkpoint binding;
//! - [`evidence`]: offline verifiers per TEE (`snp`, `tpm`, `tdx`, `az-snp-vtpm`, `sample`);
//! - [`verdict`]: what a log proves, run by run (coverage by verified checkpoints);
//! - [`tee`]: the one [`Tee`] enum;
//! - [`digest`]: the one digest type, `sha256:<hex>`.

pub mod binding;
pub mod chain;
pub mod check;
pub mod cli;
pub mod digest;
pub mod evidence;
pub mod pcr;
pub mod record;
pub mod schema;
pub mod tee;
pub mod text;
pub mod verdict;

pub use digest::Digest;
pub use evidence::EvidenceError;
pub use tee::Tee;

use std::error::Error;

/// Renders an error and its causes on one line: `outer: cause: root cause` (audit records,
/// log lines). The CLI prints the same chain with one `because:` line per cause.
pub fn error_chain(error: &dyn Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
