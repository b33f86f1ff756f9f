//! cvm-warden: the init and lockdown daemon of a confidential VM that hosts a
//! federated-learning workload. See ARCHITECTURE.md for the codemap and invariants.
//!
//! Layers, top to bottom, as in ARCHITECTURE.md's code map (the source of truth). A module
//! imports from its own layer, without a cycle, or from the layers below it; `cargo xtask
//! tidy` checks every import, this list and the modules below against the code map.
//!
//! - cli: `cli`, `dryrun` (the commands, the operator's dry runs)
//! - runner: `boot` (the stage order, fail-closed handling)
//! - adapters: `keybroker` (the real implementation of the stages' `KeyBroker` seam)
//! - stages: `stage` (one module per stage, pure `plan` + effectful `apply`)
//! - capabilities: `kbs`, `firewall`, `lockdown`, `volume`, `launch`, `net`
//! - foundations: `audit`, `policy`, `measure`, `tee`, `tool`, `eventlog`, `report`, `sys`,
//!   `digest`, `evidence` (the last two re-exported from the verifier crate, `verify/`, which
//!   depends on no part of this crate)
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
pub mod net;
pub mod policy;
pub mod report;
pub mod stage;
#[allow(unsafe_code)]
pub mod sys;
pub mod tee;
pub mod tool;
pub mod volume;
