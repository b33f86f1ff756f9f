//! Stage 3, attest: TEE evidence bound to the broker's nonce and the event log, sent to the
//! key broker.
//!
//! This build supports only `attestation = "none"`, which must be written explicitly and
//! marks every audit record `"insecure": true`. A configured TEE is refused with "not
//! supported by this build yet".

use serde::Serialize;
use serde_json::{json, Value};

use super::{Effects, StageError};
use crate::policy::{Attestation, Policy};

/// What the attest stage will do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "action", rename_all = "kebab-case")]
pub enum Plan {
    /// `attestation = "none"`: nothing is attested; development only.
    InsecureNone,
}

/// Plans attestation. Pure.
pub fn plan(policy: &Policy) -> Result<Plan, StageError> {
    match &policy.attestation {
        Attestation::None => Ok(Plan::InsecureNone),
        Attestation::Broker { tee, .. } => Err(StageError::Unsupported {
            stage: "attest",
            what: format!(
                "attestation.tee = {:?}",
                serde_json::to_value(tee)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default()
            ),
            hint: "for development write attestation = \"none\", or use a release with key-broker support",
        }),
    }
}

/// Applies the plan; returns the details of the outcome record.
pub fn apply(plan: &Plan, fx: &mut Effects<'_>) -> Result<Value, StageError> {
    match plan {
        Plan::InsecureNone => Ok(json!({
            "attested": false,
            "reason": "attestation = \"none\" in the policy: no evidence, no key broker (development only)",
            "event_log_accumulator": fx.event_log.accumulator(),
        })),
    }
}
