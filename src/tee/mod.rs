//! TEE evidence providers: the hardware (or software TPM) side of attestation.
//!
//! One trait, [`Provider`], with one implementation per `attestation.tee` value. A provider
//! produces the TEE-specific `primary_evidence` JSON the key broker expects (shapes in
//! KBS-PROTOCOL.md), bound to the 48-byte `report_data` the KBS client computed, and, where
//! the TEE has a runtime register (vTPM PCR, TDX RTMR), hands out a [`RuntimeRegister`] that
//! the event log extends before it logs (write-ahead).
//!
//! The verifiers for auditors live in [`crate::evidence`]; providers never verify their own
//! evidence.

use std::path::PathBuf;

use serde_json::Value;

use crate::digest::Digest;
use crate::eventlog::{EventKind, RuntimeRegister};

pub mod azure;
pub mod nvidia;
pub mod sample;
pub mod snp;
pub mod snp_launch;
pub mod tdx;
pub mod tpm;
pub mod tsm;

/// Produces evidence for the key broker.
pub trait Provider: std::fmt::Debug {
    /// The KBS `tee` value (`snp`, `tdx`, `tpm`, `az-snp-vtpm`, `sample`).
    fn tee(&self) -> &'static str;

    /// Evidence bound to `report_data` (SHA-384 of the JCS binding, KBS-PROTOCOL.md), in the
    /// shape the broker's verifier for [`Provider::tee`] expects.
    fn evidence(&mut self, report_data: &[u8; 48]) -> Result<Value, TeeError>;

    /// The runtime register measurements are extended into, when the TEE has one. The
    /// returned handle shares the provider's device.
    fn runtime_register(&mut self) -> Result<Option<Box<dyn RuntimeRegister>>, TeeError>;

    /// Public facts for the audit log and the `attest` dry-run (device, AK public key,
    /// PCR selection). Never a secret.
    fn describe(&self) -> Value;

    /// Fresh evidence for an audit-log checkpoint whose report data is `binding`
    /// (`SHA-512(label || audit head)`, see [`crate::stage::attest`]), in the same shape as
    /// [`Provider::evidence`]. `snp` and `tdx` carry it whole as report data; a TPM quote
    /// carries its first 32 bytes as qualifying data; `az-snp-vtpm` carries it whole as the
    /// HCL report's user-data and its first 48 bytes as the quote's qualifying data; `sample`
    /// its first 48.
    fn checkpoint(&mut self, binding: &[u8; 64]) -> Result<Value, TeeError> {
        let _ = binding;
        Err(TeeError::Config {
            tee: self.tee(),
            detail: "this provider cannot produce checkpoint evidence yet".to_string(),
        })
    }

    /// True when the evidence proves nothing (`sample`); every audit record then says so.
    fn insecure(&self) -> bool {
        false
    }

    /// The KBS `additional_evidence` string for one handshake, gathered after the ephemeral
    /// key is made and before the primary evidence, whose report data then binds it
    /// (GPU-ATTESTATION.md §4). `tee_pubkey` is the JWK sent as `tee-pubkey`. Empty: no
    /// devices ([`nvidia::GpuProvider`] has them).
    fn additional_evidence(&mut self, nonce: &str, tee_pubkey: &Value) -> Result<String, TeeError> {
        let _ = (nonce, tee_pubkey);
        Ok(String::new())
    }

    /// Checks the devices beside the TEE (GPUs) against the policy before anything is
    /// measured or asked for, and returns their facts to measure. `None`: no devices are
    /// configured.
    fn device_precheck(&mut self) -> Result<Option<Vec<DeviceFacts>>, TeeError> {
        Ok(None)
    }

    /// Sets (`true`) or clears the devices' ready state (NVIDIA: the system-wide
    /// `nvmlSystemSetConfComputeGpusReadyState`); the details to audit. `None`: no devices.
    fn set_devices_ready(&mut self, ready: bool) -> Result<Option<Value>, TeeError> {
        let _ = ready;
        Ok(None)
    }
}

/// One device's facts, measured before attestation (a [`EventKind::Gpu`] event) and audited.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceFacts {
    /// The event kind.
    pub kind: EventKind,
    /// The measurement.
    pub digest: Digest,
    /// The event's description (for a GPU: the JCS text the digest is taken over).
    pub description: String,
    /// The facts, for the audit record.
    pub details: Value,
}

/// Why evidence could not be produced.
#[derive(Debug, thiserror::Error)]
pub enum TeeError {
    /// The TEE device is absent.
    #[error("{tee}: device {device} does not exist; load the kernel module {module} (or check that this VM is a {tee} guest)")]
    DeviceMissing {
        /// The provider.
        tee: &'static str,
        /// The path that is missing.
        device: PathBuf,
        /// The kernel module that provides it.
        module: &'static str,
    },
    /// I/O on the TEE device failed.
    #[error("{tee}: {what} {device}")]
    Device {
        /// The provider.
        tee: &'static str,
        /// What was being done (e.g. "cannot read the report from").
        what: &'static str,
        /// The device or file.
        device: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The TPM refused an operation.
    #[error("tpm: {operation} failed: {detail}")]
    Tpm {
        /// The TPM command or step.
        operation: &'static str,
        /// The TSS error text.
        detail: String,
    },
    /// The TEE answered with something that does not parse.
    #[error("{tee}: malformed {what}: {detail}")]
    Malformed {
        /// The provider.
        tee: &'static str,
        /// What did not parse.
        what: &'static str,
        /// Why.
        detail: String,
    },
    /// The configuration cannot work (e.g. a PCR out of range).
    #[error("{tee}: {detail}")]
    Config {
        /// The provider.
        tee: &'static str,
        /// What is wrong and what to do.
        detail: String,
    },
}

impl From<cvm_warden_verify::EvidenceError> for TeeError {
    /// Evidence that does not parse (the verifier crate's parsers) is malformed TEE output.
    fn from(error: cvm_warden_verify::EvidenceError) -> Self {
        match error {
            cvm_warden_verify::EvidenceError::Malformed { tee, what, detail } => {
                TeeError::Malformed { tee, what, detail }
            }
            cvm_warden_verify::EvidenceError::Schema { what, detail } => TeeError::Malformed {
                tee: "evidence",
                what,
                detail,
            },
        }
    }
}
