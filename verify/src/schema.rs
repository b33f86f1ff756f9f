//! The typed shapes of what cvm-warden writes into its audit log: the measurement events,
//! the broker exchange, the checkpoints and each TEE's evidence JSON. The daemon serializes
//! these types and the verifier deserializes them with `deny_unknown_fields`, so writer
//! and reader cannot drift and a field nobody checks cannot ride along unnoticed.

use std::fmt;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

use crate::digest::Digest;
use crate::evidence::snp_json::{CertTableEntry, ReportJson};

/// Bytes written as standard base64 (with padding).
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Base64(pub Vec<u8>);

impl fmt::Debug for Base64 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Base64({} bytes)", self.0.len())
    }
}

impl Serialize for Base64 {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(&self.0))
    }
}

impl<'de> Deserialize<'de> for Base64 {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        STANDARD
            .decode(&text)
            .map(Base64)
            .map_err(|e| D::Error::custom(format!("not standard base64: {e}")))
    }
}

/// A SHA-256 PCR value written as 64 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct Pcr(pub [u8; 32]);

impl fmt::Debug for Pcr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", hex::encode(self.0))
    }
}

impl Serialize for Pcr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(self.0))
    }
}

impl<'de> Deserialize<'de> for Pcr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        let mut out = [0u8; 32];
        hex::decode_to_slice(&text, &mut out)
            .map_err(|_| D::Error::custom("a pcr value is not 32 bytes of hex"))?;
        Ok(Pcr(out))
    }
}

/// What a measurement event measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EventKind {
    /// The policy file's bytes.
    Policy,
    /// The operator file's bytes.
    Operator,
    /// The kernel command line.
    KernelCmdline,
    /// The workload bundle digest (SHA-256 of the canonical manifest).
    Bundle,
    /// A firewall ruleset.
    Ruleset,
    /// The pinned and verified NVIDIA FLARE root CA (SHA-256 of its DER certificate).
    FlareRootCa,
    /// The verified NVIDIA FLARE startup kit (SHA-256 of its listing, `measure::flare`).
    FlareKit,
    /// The separator written just before the workload starts.
    Separator,
    /// One NVIDIA GPU's facts (index, UUID, arch, driver, VBIOS, FWID, measurement digest):
    /// the digest is SHA-256 of the description, the JCS text of those facts.
    Gpu,
}

/// One measurement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Event {
    /// Position in the log, from 0.
    pub index: u32,
    /// What was measured.
    pub kind: EventKind,
    /// The measurement.
    pub digest: Digest,
    /// Human description (a path, a name); never a secret.
    pub description: String,
    /// The accumulator after this event: `SHA-256(previous || kind-tag || digest)`.
    pub accumulator: Digest,
}

/// One handshake with the key broker, as the `attest/attested` record carries it: what an
/// auditor needs to recompute [`crate::binding::report_data`]`(nonce, tee_pubkey,
/// additional_evidence)`, compare it with `report_data` and with the value inside
/// `evidence`, and verify `evidence` offline.
///
/// `claims` are the broker token's claims, decoded but **not verified** (the guest holds no
/// key for the broker's signature); `status` is recorded for the operator. The token itself
/// (a bearer credential) is never here.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Exchange {
    /// The broker base URL.
    pub broker: String,
    /// The KBS `tee` value.
    pub tee: String,
    /// Whether the evidence proves nothing (`sample`).
    pub insecure: bool,
    /// The broker's nonce, as received.
    pub nonce: String,
    /// The ephemeral public key (JWK) sent as `tee-pubkey`.
    pub tee_pubkey: Value,
    /// The `additional_evidence` string sent (`""`: no devices).
    pub additional_evidence: String,
    /// The 48-byte binding, hex.
    pub report_data: String,
    /// The `primary_evidence` sent.
    pub evidence: Value,
    /// The token's claims (decoded, unverified).
    pub claims: Value,
    /// `submods.cpu0["ear.status"]` of the token, when present.
    pub status: Option<String>,
}

/// The `additional_evidence` string a handshake sends when the policy has GPUs
/// (GPU-ATTESTATION.md §4): `{"nvidia": {"device_evidence_list": [...]}}`, the JSON of
/// `HashMap<Tee, Value>` that guest-components sends and Trustee splits. The KBS hashes the
/// string exactly as sent; readers parse it with this type.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdditionalEvidence {
    /// NVIDIA GPUs (`Tee::Nvidia` serializes as `nvidia`).
    pub nvidia: NvidiaEvidence,
}

/// The `nvidia` entry of [`AdditionalEvidence`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NvidiaEvidence {
    /// One entry per GPU, in NVML index order.
    pub device_evidence_list: Vec<DeviceEvidence>,
}

/// One GPU's evidence in guest-components' shape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceEvidence {
    /// `HOPPER` or `BLACKWELL` (Trustee also accepts `Hopper`, `Blackwell`, `LS10`).
    pub arch: String,
    /// The GPU's UUID as NVML reports it (`GPU-…`), or `unknown`.
    pub uuid: String,
    /// Base64 (standard) of the NVML attestation report: SPDM GET_MEASUREMENTS request ‖
    /// MEASUREMENTS response.
    pub evidence: String,
    /// Base64 (standard) of the PEM attestation certificate chain, leaf first.
    pub certificate: String,
}

/// The details of the `attest/attested` record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttestedDetails {
    /// The broker URL.
    pub broker: String,
    /// The evidence provider's description (free-form, for people).
    pub tee: Value,
    /// The handshake.
    pub exchange: Exchange,
    /// The measurement events so far.
    pub event_log: Vec<Event>,
    /// The runtime register's value before the first event (`None`: zero, as after a TPM
    /// reset, or no register).
    pub register_initial: Option<Digest>,
    /// The event log's accumulator.
    pub event_log_accumulator: Digest,
}

/// TEE evidence with the name of the TEE that made it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TeeEvidence {
    /// The TEE (`tpm`, `snp`, …).
    pub tee: String,
    /// Its evidence JSON (one of the `*Evidence` types of this module, or az-snp-vtpm's).
    pub evidence: Value,
}

/// The checkpoint of the broker exchange, inside `attest/ok`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExchangeCheckpoint {
    /// The seq of the `attest/attested` record.
    pub head_seq: u64,
    /// Its hash.
    pub head: Digest,
    /// `checkpoint_binding(head)`, hex.
    pub report_data: String,
    /// The evidence.
    pub evidence: TeeEvidence,
}

/// When an `audit/checkpoint` was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CheckpointKind {
    /// Right after the workload started.
    Launch,
    /// While the workload runs (`audit.checkpoint_interval`).
    Periodic,
    /// Just before power-off or exit (also after a failure).
    Closing,
    /// Right after a re-attestation while the workload runs (`attest/reattested`,
    /// `attestation.reattest_interval`).
    Reattest,
}

impl CheckpointKind {
    /// The name in the record.
    pub fn as_str(self) -> &'static str {
        match self {
            CheckpointKind::Launch => "launch",
            CheckpointKind::Periodic => "periodic",
            CheckpointKind::Closing => "closing",
            CheckpointKind::Reattest => "reattest",
        }
    }
}

impl fmt::Display for CheckpointKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The details of an `audit/checkpoint` record: fresh evidence over the record just before
/// it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointDetails {
    /// When it was taken.
    pub kind: CheckpointKind,
    /// The seq of the record just before it.
    pub head_seq: u64,
    /// That record's hash (this record's `prev`).
    pub head: Digest,
    /// `checkpoint_binding(head)`, hex.
    pub report_data: String,
    /// The evidence provider's description (free-form, for people).
    pub tee: Value,
    /// The evidence.
    pub evidence: TeeEvidence,
    /// The measurement events so far (the TPM's PCR 15 is their replay).
    pub event_log: Vec<Event>,
    /// As in [`AttestedDetails::register_initial`].
    pub register_initial: Option<Digest>,
}

/// `tpm` evidence: the AK and a quote over sha256:0-23.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TpmEvidence {
    /// The AK, SubjectPublicKeyInfo DER.
    pub ak_public: Base64,
    /// The quote.
    pub tpm_quote: TpmQuote,
}

/// A TPM quote as the `tpm` evidence carries it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TpmQuote {
    /// Marshalled `TPMT_SIGNATURE`.
    pub signature: Base64,
    /// `TPMS_ATTEST`.
    pub message: Base64,
    /// The 24 SHA-256 PCR values.
    pub pcrs: Vec<Pcr>,
}

/// `sample` evidence (proves nothing).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SampleEvidence {
    /// The sample security version.
    pub svn: String,
    /// The 48 bytes of report data.
    pub report_data: Base64,
}

/// `snp` evidence: the report in the `sev` serde form and the host's certificate table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnpEvidence {
    /// The attestation report.
    pub attestation_report: ReportJson,
    /// The certificate table (VCEK, ASK, ARK), when the host supplied one.
    pub cert_chain: Option<Vec<CertTableEntry>>,
}

/// Reads typed evidence or details out of a record's JSON, naming what did not fit.
pub fn from_value<T: serde::de::DeserializeOwned>(
    value: &Value,
    what: &'static str,
) -> Result<T, crate::EvidenceError> {
    T::deserialize(value).map_err(|e| crate::EvidenceError::Schema {
        what,
        detail: e.to_string(),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn unknown_fields_and_bad_encodings_are_refused() {
        let good = json!({"svn": "1", "report_data": "AAEC"});
        let parsed: SampleEvidence = from_value(&good, "sample evidence").unwrap();
        assert_eq!(parsed.report_data.0, vec![0, 1, 2]);
        assert_eq!(serde_json::to_value(&parsed).unwrap(), good);
        let extra = json!({"svn": "1", "report_data": "AAEC", "trusted": true});
        let err = from_value::<SampleEvidence>(&extra, "sample evidence").unwrap_err();
        assert!(err.to_string().contains("unknown field `trusted`"), "{err}");
        let bad = json!({"svn": "1", "report_data": "!!"});
        let err = from_value::<SampleEvidence>(&bad, "sample evidence").unwrap_err();
        assert!(err.to_string().contains("not standard base64"), "{err}");
        let pcr =
            json!({"ak_public": "", "tpm_quote": {"signature": "", "message": "", "pcrs": ["00"]}});
        let err = from_value::<TpmEvidence>(&pcr, "tpm evidence").unwrap_err();
        assert!(err.to_string().contains("32 bytes of hex"), "{err}");
    }
}
