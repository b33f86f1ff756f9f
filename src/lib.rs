//! cvm-warden: the init and lockdown daemon of a confidential VM that hosts a
//! federated-learning workload. See ARCHITECTURE.md for the codemap and invariants.
//!
//! Layers, top to bottom (imports only point down):
//! `cli` → `boot` (stage order, fail-closed handling) → `stage` (one module per stage,
//! pure `plan` + effectful `apply`) → capabilities (`audit`, `launch`) → foundations
//! (`policy`, `measure`, `digest`, `sys`).
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod audit;
pub mod boot;
pub mod cli;
/// The one digest type (in the verifier crate).
pub use cvm_warden_verify::digest;
pub mod dryrun;
pub mod eventlog;
/// Offline evidence verification (in the verifier crate).
pub use cvm_warden_verify::evidence;
pub mod firewall;
pub mod kbs;
pub mod keybroker;
pub mod launch;
pub mod lockdown;
pub mod measure;
pub mod policy;
pub mod report;
pub mod stage;
#[allow(unsafe_code)]
pub mod sys;
pub mod tee;
pub mod tool;
pub mod volume;
