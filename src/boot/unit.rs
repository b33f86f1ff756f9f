//! The systemd-unit shape (`cvm-warden run`): the stages, then the closing record and
//! `execve` of the workload; `FailureAction=poweroff` in the unit does the rest on failure.

use serde_json::json;

use super::wiring::{self, Setup};
use super::{chain, CheckpointKind, Launcher, Lifecycle, Ready, RealLauncher};
use crate::policy::LoadedPolicy;
use crate::sys::RealSys;

/// The unit shape with the real effects: opens the audit log, runs every stage, then
/// `execve`s the workload. Returns only on failure (exit status 1) after recording it.
pub fn main(loaded: &LoadedPolicy) -> Result<(), super::BootError> {
    let sys = RealSys::default();
    let audit = wiring::open_audit(loaded);
    wiring::install_hook(&audit, false);
    let mut setup = Setup::new(&audit);
    let prepared = wiring::prepare(
        loaded,
        &sys,
        &audit,
        crate::lockdown::Shape::Systemd,
        false,
        &mut setup,
    );
    let (mut life, event_log) = setup.lifecycle(&sys, &audit, loaded);
    match prepared {
        Ok(ready) => {
            run_unit(&ready, &RealLauncher, &mut life);
            Err(super::BootError::NotLaunched)
        }
        Err(error) => {
            super::record_failure(&mut life, "exit", &error, event_log);
            Err(error)
        }
    }
}

/// Unit shape: record the closing `exec` event, the closing checkpoint, flush, and `execve`
/// the workload. Returns the exit code only when exec failed, after removing the secrets and
/// closing the volumes.
pub fn run_unit(ready: &Ready, launcher: &dyn Launcher, life: &mut Lifecycle<'_>) -> i32 {
    let audit = life.audit;
    let plan = &ready.plan.launch;
    // Nothing re-attests once the workload replaced this process: said, never skipped.
    super::reattest::record_unavailable(audit, &ready.plan.attest);
    if let Err(error) = audit.record("launch", "exec", json!({ "argv": plan.argv })) {
        log::error!("{}", chain(&error));
        life.clean_up_after_failed_launch(&ready.plan);
        life.close("shutdown", "exit", json!({ "code": 1 }), &ready.event_log);
        return 1;
    }
    life.checkpoint(CheckpointKind::Closing, &ready.event_log);
    if let Err(error) = audit.flush() {
        log::error!("{}", chain(&error));
        life.clean_up_after_failed_launch(&ready.plan);
        life.close("shutdown", "exit", json!({ "code": 1 }), &ready.event_log);
        return 1;
    }
    let error = launcher.exec(plan);
    log::error!("{}", chain(&error));
    let _ = audit.record("launch", "exec_failed", json!({ "error": chain(&error) }));
    life.clean_up_after_failed_launch(&ready.plan);
    life.close("shutdown", "exit", json!({ "code": 1 }), &ready.event_log);
    1
}
