//! Stage 1, perimeter: default-deny nftables, consoles and logins off, kernel hardened.
//!
//! This build plans the perimeter from `[network]` and `[lockdown]` but cannot apply it yet:
//! a policy that configures either is refused with "not supported by this build yet" (never
//! silently skipped). A policy without both gets an explicit, audited "nothing configured".

use serde::Serialize;
use serde_json::{json, Value};

use super::{Effects, StageError};
use crate::policy::Policy;

/// What the perimeter stage will do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "action", rename_all = "kebab-case")]
pub enum Plan {
    /// The policy has neither `[network]` nor `[lockdown]`.
    NotConfigured,
}

/// Plans the perimeter. Pure.
pub fn plan(policy: &Policy) -> Result<Plan, StageError> {
    if policy.network.is_some() {
        return Err(StageError::Unsupported {
            stage: "perimeter",
            what: "[network] (nftables perimeter)".to_string(),
            hint: "remove [network] from the policy or use a release with firewall support",
        });
    }
    if policy.lockdown.is_some() {
        return Err(StageError::Unsupported {
            stage: "perimeter",
            what: "[lockdown] (console and kernel lockdown)".to_string(),
            hint: "remove [lockdown] from the policy or use a release with lockdown support",
        });
    }
    Ok(Plan::NotConfigured)
}

/// Applies the plan; returns the details of the outcome record.
pub fn apply(plan: &Plan, _fx: &mut Effects<'_>) -> Result<Value, StageError> {
    match plan {
        Plan::NotConfigured => Ok(json!({
            "applied": false,
            "reason": "the policy configures no [network] and no [lockdown]",
        })),
    }
}
