//! Stage 4, unlock: LUKS2 volumes opened with the keys the broker released.
//!
//! Not implemented by this build: a policy with `[[volume]]` entries is refused at plan time.

use serde::Serialize;
use serde_json::{json, Value};

use super::{Effects, StageError};
use crate::policy::Policy;

/// What the unlock stage will do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "action", rename_all = "kebab-case")]
pub enum Plan {
    /// The policy declares no volumes.
    NoVolumes,
}

/// Plans the unlock stage. Pure.
pub fn plan(policy: &Policy) -> Result<Plan, StageError> {
    if let Some(volume) = policy.volumes.first() {
        return Err(StageError::Unsupported {
            stage: "unlock",
            what: format!("[[volume]] {:?} (LUKS2 unlock)", volume.name),
            hint: "remove the [[volume]] entries or use a release with volume support",
        });
    }
    Ok(Plan::NoVolumes)
}

/// Applies the plan; returns the details of the outcome record.
pub fn apply(plan: &Plan, _fx: &mut Effects<'_>) -> Result<Value, StageError> {
    match plan {
        Plan::NoVolumes => Ok(json!({ "volumes": 0 })),
    }
}
