//! Stage 1, perimeter: consoles and logins off, kernel hardened, default-deny nftables —
//! before anything valuable is touched.
//!
//! - `[lockdown]`: [`crate::lockdown`] loads the policy's modules, then sets the sysctls
//!   (`kernel.modules_disabled` last), the lockdown LSM, swap off, `/tmp` on tmpfs, Ctrl-Alt-Del
//!   off, the console's input closed and logins shut (root locked and nologin shells in the
//!   PID 1 shape; runtime masks, stopped units and ended sessions in the systemd shape); then
//!   every setting is read back and one that did not stick fails closed.
//! - `[network]`: every host name of both phases is resolved once (the pinned addresses are
//!   in the outcome record), the perimeter ruleset replaces whatever `inet cvm_warden` held in
//!   one transaction, is read back and compared, and its digest is measured (event log and
//!   runtime register) before the measure stage.
//!
//! In a sandbox PID namespace (the demo, namespace tests) the settings that are host-wide —
//! modules, sysctls, the lockdown LSM, swap, Ctrl-Alt-Del, the console, account files,
//! systemd units — are not touched: the plan lists them as skipped, with the reason, and
//! only the namespace's own settings (`/tmp`, standard input, the network namespace's
//! firewall) are applied.

use serde::Serialize;
use serde_json::{json, Value};

use super::{Effects, Facts, StageError};
use crate::eventlog::EventKind;
use crate::firewall::{self, Phase, Resolution};
use crate::lockdown::{self, LockdownPlan};
use crate::policy::Policy;

/// The sysctl that disables module loading: set last, by the allowlist stage, after unlock
/// (dm-crypt, dm-integrity) and the rulesets (nf_tables and friends) may have needed the
/// kernel to load modules on demand.
pub const MODULES_DISABLED: &str = "kernel.modules_disabled";

/// Turns a lockdown plan into the one step left for the end of the boot: module loading
/// disabled (and read back). Everything else was done by the perimeter stage.
pub fn only_disable_modules(plan: LockdownPlan) -> LockdownPlan {
    let keep: Vec<_> = plan
        .sysctls
        .iter()
        .filter(|s| s.key == MODULES_DISABLED)
        .cloned()
        .collect();
    let mut plan = plan.nothing();
    plan.sysctls = keep;
    plan
}

/// Turns a lockdown plan into its first step only: the policy's modules loaded. The boot
/// does this before it opens the TEE (whose driver, e.g. `sev-guest`, may be one of them);
/// the perimeter stage then finds them loaded.
pub fn only_load_modules(plan: LockdownPlan) -> LockdownPlan {
    let modules = plan.modules.clone();
    let mut plan = plan.nothing();
    plan.modules = modules;
    plan
}

/// Host-wide settings a sandbox never applies.
pub const SANDBOX_SKIPPED: [&str; 8] = [
    "kernel modules",
    "sysctls",
    "lockdown LSM",
    "swap",
    "Ctrl-Alt-Del",
    "console input",
    "account files (root password, login shells)",
    "systemd units and login sessions",
];

/// What the perimeter stage will do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Plan {
    /// Console, login and kernel lockdown (`None`: no `[lockdown]`).
    pub lockdown: Option<LockdownPlan>,
    /// Host-wide settings skipped because this is a sandbox (empty in a real boot).
    pub sandbox_skipped: Vec<&'static str>,
    /// Whether the perimeter ruleset is applied (`[network]` is configured).
    pub firewall: bool,
    /// The policy the rulesets are derived from (not printed: the plan shows the endpoints).
    #[serde(skip)]
    pub policy: Box<Policy>,
    /// What the perimeter lets through, before names are resolved.
    pub endpoints: Vec<firewall::Endpoint>,
}

/// Plans the perimeter. Pure.
pub fn plan(policy: &Policy, facts: &Facts) -> Result<Plan, StageError> {
    let lockdown = policy.lockdown.as_ref().map(|l| {
        let mut plan = lockdown::plan(l, facts.shape);
        // Module loading is disabled at the end of the boot (allowlist stage), not here.
        plan.sysctls.retain(|s| s.key != MODULES_DISABLED);
        if facts.sandbox {
            plan = plan.without_host_wide();
        }
        plan
    });
    let sandbox_skipped = if facts.sandbox && lockdown.is_some() {
        SANDBOX_SKIPPED.to_vec()
    } else {
        Vec::new()
    };
    let endpoints = if policy.network.is_some() {
        firewall::endpoints(policy, Phase::Perimeter).map_err(|e| firewall_error("perimeter", e))?
    } else {
        Vec::new()
    };
    Ok(Plan {
        lockdown,
        sandbox_skipped,
        firewall: policy.network.is_some(),
        policy: Box::new(policy.clone()),
        endpoints,
    })
}

pub(super) fn firewall_error(stage: &'static str, source: firewall::FirewallError) -> StageError {
    StageError::Firewall {
        stage,
        source: Box::new(source),
    }
}

/// Applies the plan; returns the details of the outcome record.
pub fn apply(plan: &Plan, fx: &mut Effects<'_>) -> Result<Value, StageError> {
    let mut details = json!({});
    match &plan.lockdown {
        Some(lockdown_plan) => {
            let report = lockdown::apply(lockdown_plan, fx.lockdown, fx.lockdown_paths).map_err(
                |source| StageError::Lockdown {
                    stage: "perimeter",
                    source: Box::new(source),
                },
            )?;
            details["lockdown"] = json!(report);
            if !plan.sandbox_skipped.is_empty() {
                details["sandbox_skipped"] = json!({
                    "settings": plan.sandbox_skipped,
                    "reason": "sandbox PID namespace: these settings are host-wide and are applied only in a real boot",
                });
            }
        }
        None => {
            details["lockdown"] =
                json!({ "applied": false, "reason": "the policy configures no [lockdown]" })
        }
    }
    if plan.firewall {
        // Names of both phases are resolved now, once: the allowlist then needs no DNS
        // through the perimeter, and both phases pin the same addresses.
        let resolution = Resolution::resolve(
            &plan.policy,
            &[Phase::Perimeter, Phase::Allowlist],
            fx.resolver,
        )
        .map_err(|e| firewall_error("perimeter", e))?;
        let applied = apply_ruleset(&plan.policy, Phase::Perimeter, &resolution, fx)?;
        details["firewall"] = json!(applied);
        fx.resolution = Some(resolution);
    } else {
        details["firewall"] =
            json!({ "applied": false, "reason": "the policy configures no [network]" });
    }
    Ok(details)
}

/// Builds the ruleset of `phase` from the pinned addresses, applies it (one transaction,
/// read back and compared) and measures its digest (`"<phase> ruleset"` event).
pub(super) fn apply_ruleset(
    policy: &Policy,
    phase: Phase,
    resolution: &Resolution,
    fx: &mut Effects<'_>,
) -> Result<firewall::Applied, StageError> {
    let stage = match phase {
        Phase::Perimeter => "perimeter",
        Phase::Allowlist => "allowlist",
    };
    let ruleset =
        firewall::plan(policy, phase, resolution).map_err(|e| firewall_error(stage, e))?;
    let applied = firewall::apply(&ruleset, fx.firewall).map_err(|e| firewall_error(stage, e))?;
    fx.event_log
        .measure(
            fx.register,
            EventKind::Ruleset,
            applied.digest,
            format!("{stage} ruleset"),
        )
        .map_err(|e| StageError::Extend(Box::new(e)))?;
    Ok(applied)
}
