//! The boot runner: the one place that knows the stage order.
//!
//! `prepare` plans every stage before the first side effect, then applies them in order with
//! an audit record before each stage (`begin`) and one with its outcome (`ok` / `failed`).
//! The first failure stops the boot: the workload is never started, and the caller powers
//! off (PID 1) or exits non-zero (unit). Only when every stage succeeded does `prepare`
//! return a [`Ready`], the sole input of [`run_init`] and [`run_unit`]: the type system is what
//! keeps a failed boot from launching the workload.

use serde_json::{json, Value};

use crate::audit::{Audit, AuditError};
use crate::digest::Digest;
use crate::eventlog::{EventKind, EventLog, RuntimeRegister};
use crate::launch::{LaunchError, LaunchPlan, WorkloadExit};
use crate::policy::{FailureAction, LoadedPolicy};
use crate::stage::{self, BootPlan, Effects, Facts, Measurer, StageError, StageName};
use crate::sys::Sys;

/// Why the boot stopped.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// A stage could not be planned.
    #[error("boot plan refused")]
    Plan(#[source] StageError),
    /// A stage failed.
    #[error("stage {stage} failed")]
    Stage {
        /// Which.
        stage: &'static str,
        /// Why.
        #[source]
        source: StageError,
    },
    /// The audit log could not be written where the policy requires it.
    #[error("audit log")]
    Audit(#[source] AuditError),
    /// The event log's separator could not be extended.
    #[error("measure: separator event")]
    Separator(#[source] crate::eventlog::ExtendError),
}

/// Starts the workload in one of the two process shapes. The seam that lets the runner be
/// tested without forking anything.
pub trait Launcher {
    /// PID 1 shape: fork the workload, supervise it, return when it is done.
    fn supervise(
        &self,
        plan: &LaunchPlan,
        sys: &dyn Sys,
        events: &mut dyn FnMut(&str, Value),
    ) -> Result<WorkloadExit, LaunchError>;
    /// Unit shape: replace this process with the workload; returns only on failure.
    fn exec(&self, plan: &LaunchPlan) -> LaunchError;
}

/// The real launcher: [`crate::launch`].
#[derive(Debug, Default)]
pub struct RealLauncher;

impl Launcher for RealLauncher {
    fn supervise(
        &self,
        plan: &LaunchPlan,
        sys: &dyn Sys,
        events: &mut dyn FnMut(&str, Value),
    ) -> Result<WorkloadExit, LaunchError> {
        crate::launch::supervise(plan, sys, events)
    }

    fn exec(&self, plan: &LaunchPlan) -> LaunchError {
        crate::launch::exec(plan)
    }
}

/// Everything the runner needs, passed in.
pub struct Env<'a> {
    /// System calls.
    pub sys: &'a dyn Sys,
    /// Bundle measurement.
    pub measurer: &'a dyn Measurer,
    /// Runtime measurement register.
    pub register: &'a mut dyn RuntimeRegister,
    /// The audit log.
    pub audit: &'a Audit,
}

impl std::fmt::Debug for Env<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Env")
            .field("register", &self.register.name())
            .finish_non_exhaustive()
    }
}

/// Proof that every stage before launch succeeded.
#[derive(Debug)]
pub struct Ready {
    /// The plan that was applied.
    pub plan: BootPlan,
    /// The measurements, ending with the separator.
    pub event_log: EventLog,
}

pub use crate::report::error_chain as chain;

fn record(audit: &Audit, stage: &str, event: &str, details: Value) -> Result<Digest, BootError> {
    audit
        .record(stage, event, details)
        .map_err(BootError::Audit)
}

/// Plans and applies every stage up to (not including) starting the workload.
pub fn prepare(loaded: &LoadedPolicy, facts: &Facts, env: Env<'_>) -> Result<Ready, BootError> {
    let audit = env.audit;
    record(
        audit,
        "boot",
        "start",
        json!({
            "version": env!("CARGO_PKG_VERSION"),
            "policy_digest": loaded.policy_digest,
            "operator_digest": loaded.operator_digest,
            "overridden": loaded.overridden,
            "register": env.register.name(),
        }),
    )?;
    let plan = match BootPlan::new(&loaded.policy, facts) {
        Ok(plan) => plan,
        Err(error) => {
            record(
                audit,
                "boot",
                "plan_failed",
                json!({ "error": chain(&error) }),
            )?;
            return Err(BootError::Plan(error));
        }
    };
    record(audit, "boot", "planned", json!({ "plan": plan }))?;

    let mut event_log = EventLog::new();
    let mut fx = Effects {
        sys: env.sys,
        measurer: env.measurer,
        register: env.register,
        event_log: &mut event_log,
    };
    for stage in StageName::ALL {
        let name = stage.as_str();
        log::info!("stage {name}: begin");
        let result = match stage {
            StageName::Perimeter => {
                record(audit, name, "begin", json!({ "plan": plan.perimeter }))?;
                stage::perimeter::apply(&plan.perimeter, &mut fx)
            }
            StageName::Measure => {
                record(audit, name, "begin", json!({ "plan": plan.measure }))?;
                stage::measure::apply(&plan.measure, &mut fx)
            }
            StageName::Attest => {
                record(audit, name, "begin", json!({ "plan": plan.attest }))?;
                stage::attest::apply(&plan.attest, &mut fx)
            }
            StageName::Unlock => {
                record(audit, name, "begin", json!({ "plan": plan.unlock }))?;
                stage::unlock::apply(&plan.unlock, &mut fx)
            }
            StageName::Allowlist => {
                record(audit, name, "begin", json!({ "plan": plan.allowlist }))?;
                stage::allowlist::apply(&plan.allowlist, &mut fx)
            }
            StageName::Launch => {
                record(audit, name, "begin", json!({ "plan": plan.launch }))?;
                separator(&mut fx)
            }
        };
        match result {
            Ok(details) => {
                log::info!("stage {name}: ok");
                record(audit, name, "ok", details)?;
            }
            Err(source) => {
                let error = BootError::Stage {
                    stage: name,
                    source,
                };
                log::error!("{}", chain(&error));
                record(audit, name, "failed", json!({ "error": chain(&error) }))?;
                return Err(error);
            }
        }
    }
    // A required audit sink that never caught up stops the boot here, before launch.
    audit.require_sinks().map_err(BootError::Audit)?;
    Ok(Ready { plan, event_log })
}

fn separator(fx: &mut Effects<'_>) -> Result<Value, StageError> {
    let event = fx
        .event_log
        .measure(
            fx.register,
            EventKind::Separator,
            Digest::of(b"cvm-warden separator: workload starts"),
            "separator",
        )
        .map_err(|e| StageError::Extend(Box::new(e)))?;
    Ok(json!({
        "separator": event.digest,
        "event_log_accumulator": event.accumulator,
    }))
}

/// What the PID 1 shape does after the workload is done or the boot failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shutdown {
    /// Power off or halt (real boot).
    pub action: FailureAction,
    /// The process exit code (sandbox), the workload's status.
    pub code: i32,
}

/// The closing audit event for a shutdown: `poweroff`/`halt` in a real boot, `exit` in a
/// sandbox PID namespace.
pub fn closing_event(sys: &dyn Sys, action: FailureAction) -> &'static str {
    if !sys.in_initial_pid_namespace() {
        "exit"
    } else {
        match action {
            FailureAction::Poweroff => "poweroff",
            FailureAction::Halt => "halt",
        }
    }
}

/// Records a failed boot and the closing record; returns the shutdown to perform.
/// Audit errors here are ignored: the machine goes down either way (fail closed).
pub fn fail(audit: &Audit, sys: &dyn Sys, action: FailureAction, error: &BootError) -> Shutdown {
    let code = 1;
    let _ = audit.record(
        "boot",
        "failed",
        json!({ "error": chain(error), "workload_started": false }),
    );
    let _ = audit.record(
        "shutdown",
        closing_event(sys, action),
        json!({ "code": code }),
    );
    let _ = audit.flush();
    Shutdown { action, code }
}

/// PID 1 shape: supervise the workload, then record the shutdown.
pub fn run_init(
    ready: &Ready,
    launcher: &dyn Launcher,
    sys: &dyn Sys,
    audit: &Audit,
    action: FailureAction,
) -> Shutdown {
    let mut events = |event: &str, details: Value| {
        log::info!("workload: {event} {details}");
        let _ = audit.record("launch", event, details);
    };
    let code = match launcher.supervise(&ready.plan.launch, sys, &mut events) {
        Ok(exit) => {
            let _ = audit.record(
                "launch",
                "workload_done",
                json!({ "code": exit.code, "restarts": exit.restarts }),
            );
            exit.code
        }
        Err(error) => {
            log::error!("{}", chain(&error));
            let _ = audit.record("launch", "failed", json!({ "error": chain(&error) }));
            1
        }
    };
    let _ = audit.record(
        "shutdown",
        closing_event(sys, action),
        json!({ "code": code }),
    );
    let _ = audit.flush();
    Shutdown { action, code }
}

/// Unit shape: record the closing `exec` event, flush, and `execve` the workload. Returns the
/// exit code only when exec failed.
pub fn run_unit(ready: &Ready, launcher: &dyn Launcher, audit: &Audit) -> i32 {
    let plan = &ready.plan.launch;
    if let Err(error) = audit.record("launch", "exec", json!({ "argv": plan.argv })) {
        log::error!("{}", chain(&error));
        return 1;
    }
    if let Err(error) = audit.flush() {
        log::error!("{}", chain(&error));
        return 1;
    }
    let error = launcher.exec(plan);
    log::error!("{}", chain(&error));
    let _ = audit.record("launch", "exec_failed", json!({ "error": chain(&error) }));
    let _ = audit.record("shutdown", "exit", json!({ "code": 1 }));
    let _ = audit.flush();
    1
}
