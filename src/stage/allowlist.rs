//! Stage 5, allowlist: just before launch, the workload's nftables allowlist replaces the
//! perimeter in one transaction, is read back and compared, and its digest is measured. It
//! uses the addresses the perimeter stage pinned (no name is resolved again).
//!
//! Last, with `[lockdown]`, module loading is disabled (`kernel.modules_disabled=1`, read
//! back): only now, because unlocking volumes and applying rulesets may have needed the
//! kernel to load modules (dm-crypt, nf_tables, …) on demand.

use serde::Serialize;
use serde_json::{json, Value};

use super::perimeter::{apply_ruleset, firewall_error};
use super::{Effects, StageError};
use crate::firewall::{self, Phase, Resolution};
use crate::lockdown::{self, LockdownPlan};
use crate::policy::Policy;

/// What the allowlist stage will do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Plan {
    /// The firewall part.
    pub firewall: FirewallPlan,
    /// Module loading disabled last (`None`: no `[lockdown]`, or a sandbox).
    pub disable_modules: Option<LockdownPlan>,
}

/// The firewall part of the allowlist stage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "action", rename_all = "kebab-case")]
pub enum FirewallPlan {
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
pub fn plan(policy: &Policy, facts: &super::Facts) -> Result<Plan, StageError> {
    let firewall = if policy.network.is_none() {
        FirewallPlan::NotConfigured
    } else {
        FirewallPlan::Allowlist {
            endpoints: firewall::endpoints(policy, Phase::Allowlist)
                .map_err(|e| firewall_error("allowlist", e))?,
            policy: Box::new(policy.clone()),
        }
    };
    let disable_modules = match &policy.lockdown {
        Some(l) if !facts.sandbox => Some(super::perimeter::only_disable_modules(lockdown::plan(
            l,
            facts.shape,
        ))),
        _ => None,
    };
    Ok(Plan {
        firewall,
        disable_modules,
    })
}

/// Applies the plan; returns the details of the outcome record.
pub fn apply(plan: &Plan, fx: &mut Effects<'_>) -> Result<Value, StageError> {
    let mut details = apply_firewall(&plan.firewall, fx)?;
    if let Some(disable) = &plan.disable_modules {
        let report =
            lockdown::apply(disable, fx.lockdown, fx.lockdown_paths).map_err(|source| {
                StageError::Lockdown {
                    stage: "allowlist",
                    source: Box::new(source),
                }
            })?;
        details["modules_disabled"] = json!(report);
    }
    Ok(details)
}

fn apply_firewall(plan: &FirewallPlan, fx: &mut Effects<'_>) -> Result<Value, StageError> {
    let FirewallPlan::Allowlist { policy, .. } = plan else {
        return Ok(json!({
            "firewall": {
                "applied": false,
                "reason": "the policy configures no [network]",
            }
        }));
    };
    let resolution = match fx.resolution.take() {
        Some(resolution) => resolution,
        // The perimeter resolved both phases; resolving here only happens when it did not run
        // (never in a boot; kept so the stage is self-contained).
        None => Resolution::resolve(policy, &[Phase::Allowlist], fx.resolver)
            .map_err(|e| firewall_error("allowlist", e))?,
    };
    let applied = apply_ruleset(policy, Phase::Allowlist, &resolution, fx)?;
    if resolution.dhcp.is_empty() {
        Ok(json!({ "firewall": applied }))
    } else {
        // The DHCP servers whose renewals the allowlist admits, and nothing else of DHCP.
        Ok(json!({ "firewall": applied, "dhcp_servers": resolution.dhcp }))
    }
}
