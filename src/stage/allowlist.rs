//! Stage 5, allowlist: the workload's nftables allowlist replaces the perimeter atomically.
//!
//! Not implemented by this build: a policy with `[network]` is refused at plan time (the
//! perimeter stage already refuses it first); without it the stage records that nothing was
//! configured.

use serde::Serialize;
use serde_json::{json, Value};

use super::{Effects, StageError};
use crate::policy::Policy;

/// What the allowlist stage will do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "action", rename_all = "kebab-case")]
pub enum Plan {
    /// The policy has no `[network]`.
    NotConfigured,
}

/// Plans the allowlist. Pure.
pub fn plan(policy: &Policy) -> Result<Plan, StageError> {
    if policy.network.is_some() {
        return Err(StageError::Unsupported {
            stage: "allowlist",
            what: "[network] (nftables allowlist)".to_string(),
            hint: "remove [network] from the policy or use a release with firewall support",
        });
    }
    Ok(Plan::NotConfigured)
}

/// Applies the plan; returns the details of the outcome record.
pub fn apply(plan: &Plan, _fx: &mut Effects<'_>) -> Result<Value, StageError> {
    match plan {
        Plan::NotConfigured => Ok(json!({
            "applied": false,
            "reason": "the policy configures no [network]",
        })),
    }
}
