//! Stage 5, allowlist: just before launch, the workload's nftables allowlist replaces the
//! perimeter in one transaction, is read back and compared, and its digest is measured. It
//! uses the addresses the perimeter stage pinned (no name is resolved again).

use serde::Serialize;
use serde_json::{json, Value};

use super::perimeter::firewall_error;
use super::{Effects, StageError};
use crate::eventlog::EventKind;
use crate::firewall::{self, Phase, Resolution};
use crate::policy::Policy;

/// What the allowlist stage will do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "action", rename_all = "kebab-case")]
pub enum Plan {
    /// The policy has no `[network]`.
    NotConfigured,
    /// The allowlist for the policy's `[network]`.
    Allowlist {
        /// The policy the ruleset is derived from (not printed).
        #[serde(skip)]
        policy: Box<Policy>,
        /// What the allowlist lets through, before names are resolved.
        endpoints: Vec<firewall::Endpoint>,
    },
}

/// Plans the allowlist. Pure.
pub fn plan(policy: &Policy) -> Result<Plan, StageError> {
    if policy.network.is_none() {
        return Ok(Plan::NotConfigured);
    }
    Ok(Plan::Allowlist {
        endpoints: firewall::endpoints(policy, Phase::Allowlist)
            .map_err(|e| firewall_error("allowlist", e))?,
        policy: Box::new(policy.clone()),
    })
}

/// Applies the plan; returns the details of the outcome record.
pub fn apply(plan: &Plan, fx: &mut Effects<'_>) -> Result<Value, StageError> {
    let Plan::Allowlist { policy, .. } = plan else {
        return Ok(json!({
            "applied": false,
            "reason": "the policy configures no [network]",
        }));
    };
    let resolution = match fx.resolution.take() {
        Some(resolution) => resolution,
        // The perimeter resolved both phases; resolving here only happens when it did not run
        // (never in a boot; kept so the stage is self-contained).
        None => Resolution::resolve(policy, &[Phase::Allowlist], fx.resolver)
            .map_err(|e| firewall_error("allowlist", e))?,
    };
    let ruleset = firewall::plan(policy, Phase::Allowlist, &resolution)
        .map_err(|e| firewall_error("allowlist", e))?;
    let applied =
        firewall::apply(&ruleset, fx.firewall).map_err(|e| firewall_error("allowlist", e))?;
    fx.event_log
        .measure(
            fx.register,
            EventKind::Ruleset,
            applied.digest,
            "allowlist ruleset",
        )
        .map_err(|e| StageError::Extend(Box::new(e)))?;
    Ok(json!({ "firewall": applied }))
}
