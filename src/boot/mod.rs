//! The boot runner: the one place that knows the stage order.
//!
//! - this module: the stage order ([`prepare`]), the module step before it
//!   ([`load_modules`]), failure ([`fail`]) and what the runner uses after the stages
//!   ([`Lifecycle`], checkpoints);
//! - [`init`]: the PID 1 shape — early mounts, the kernel's arguments, the policy, the audit
//!   log, the stages, the supervised workload, and always power-off or halt at the end;
//! - [`unit`]: the systemd-unit shape — the stages, then `execve` of the workload;
//! - [`wiring`]: the real effects both shapes plug in.
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
use crate::launch::{LaunchError, LaunchPlan, Periodic, WorkloadExit};
use crate::policy::{FailureAction, LoadedPolicy};
use crate::stage::{self, BootPlan, Effects, Facts, Measurer, StageError, StageName};
use crate::sys::Sys;
use cvm_warden_verify::schema::CheckpointDetails;

pub mod init;
pub mod reattest;
#[cfg(test)]
mod tests;
pub mod unit;
pub mod wiring;

pub use init::run_init;
pub use reattest::{ReattestError, Reattested, Reattester};
pub use unit::run_unit;

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
    /// The evidence provider or the key broker client could not be set up.
    #[error("boot setup")]
    Setup(#[source] crate::keybroker::SetupError),
    /// The kernel modules the policy needs could not be loaded (before the TEE is opened).
    #[error("boot setup: loading the kernel modules the policy needs")]
    Modules(#[source] crate::lockdown::LockdownError),
    /// The network could not be brought up (after the perimeter, before attestation).
    #[error("network bring-up")]
    Network(#[source] crate::net::NetError),
    /// configfs could not be mounted after its module was loaded.
    #[error("boot setup: mounting configfs after loading the kernel modules")]
    Configfs(#[source] crate::sys::SysError),
    /// The workload could not be started (unit shape); the reason was logged and recorded
    /// (`launch/exec_failed`).
    #[error("the workload was not started; the reason is in the log above and in the audit log (launch/exec_failed)")]
    NotLaunched,
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
        periodic: Vec<Periodic<'_>>,
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
        periodic: Vec<Periodic<'_>>,
    ) -> Result<WorkloadExit, LaunchError> {
        // The workload's output goes to the console line by line behind a prefix, so it
        // cannot pass for an audit record there.
        crate::launch::supervise(
            plan,
            sys,
            events,
            periodic,
            Some(Box::new(std::io::stdout())),
        )
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
    /// The TEE and key broker (`None` with `attestation = "none"`).
    pub broker: Option<&'a mut dyn stage::KeyBroker>,
    /// LUKS2 volumes.
    pub volumes: &'a dyn crate::volume::Volumes,
    /// nftables.
    pub firewall: &'a mut dyn crate::firewall::Firewall,
    /// Name resolution for the rulesets.
    pub resolver: &'a dyn crate::firewall::Resolver,
    /// Console, login and kernel lockdown effects.
    pub lockdown: &'a dyn crate::lockdown::LockdownSys,
    /// Where the lockdown reads and writes.
    pub lockdown_paths: &'a crate::lockdown::Paths,
    /// Network bring-up (after the perimeter, before the measure stage) and the
    /// `resolv.conf` it writes; `None`: nothing is brought up (tests of other stages).
    pub net: Option<(&'a dyn crate::net::NetSys, &'a std::path::Path)>,
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

/// The effects of [`load_modules`].
pub struct ModuleStep<'a> {
    /// Boot shape (configfs is mounted again in the PID 1 shape once its module is loaded).
    pub shape: crate::lockdown::Shape,
    /// A sandbox PID namespace: modules are host-wide, so nothing is loaded.
    pub sandbox: bool,
    /// `finit_module` and the kernel release.
    pub lockdown: &'a dyn crate::lockdown::LockdownSys,
    /// Where `/lib/modules` and `/sys/module` are.
    pub paths: &'a crate::lockdown::Paths,
    /// Mounts (configfs).
    pub sys: &'a dyn Sys,
    /// The audit log.
    pub audit: &'a Audit,
}

impl std::fmt::Debug for ModuleStep<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModuleStep")
            .field("shape", &self.shape)
            .field("sandbox", &self.sandbox)
            .finish_non_exhaustive()
    }
}

/// The step before the stages: the kernel modules `plan` lists (see
/// [`crate::lockdown::module_plan`]) loaded with their dependencies, one `boot/modules_loaded`
/// record saying what was loaded now, what was loaded already and what is built in. In a
/// sandbox nothing is loaded and `boot/modules_skipped` says so. An empty plan writes nothing.
/// In the PID 1 shape configfs is mounted afterwards when its directory appeared.
pub fn load_modules(
    plan: &crate::lockdown::ModulePlan,
    step: &ModuleStep<'_>,
) -> Result<(), BootError> {
    if plan.is_empty() {
        return Ok(());
    }
    if step.sandbox {
        record(
            step.audit,
            "boot",
            "modules_skipped",
            json!({
                "plan": plan,
                "reason": "sandbox PID namespace: kernel modules are host-wide and are loaded only in a real boot",
            }),
        )?;
        return Ok(());
    }
    let report = match crate::lockdown::load_planned(plan, step.lockdown, step.paths) {
        Ok(report) => report,
        Err(error) => {
            let error = BootError::Modules(error);
            log::error!("{}", chain(&error));
            return Err(error);
        }
    };
    let configfs = if step.shape == crate::lockdown::Shape::Pid1 {
        crate::launch::mount_configfs(step.sys).map_err(BootError::Configfs)?
    } else {
        None
    };
    let mut details = json!({ "plan": plan, "report": report });
    if let Some(target) = configfs {
        details["configfs_mounted"] = json!(target);
    }
    record(step.audit, "boot", "modules_loaded", details)?;
    Ok(())
}

/// Plans and applies every stage up to (not including) starting the workload.
pub fn prepare(loaded: &LoadedPolicy, facts: &Facts, env: Env<'_>) -> Result<Ready, BootError> {
    let mut event_log = EventLog::new();
    prepare_logged(loaded, facts, env, &mut event_log)
}

/// [`prepare`] that measures into `event_log`, which keeps the events measured before a
/// failure (the closing checkpoint of a failed boot carries them). On success the events move
/// into the [`Ready`].
pub fn prepare_logged(
    loaded: &LoadedPolicy,
    facts: &Facts,
    env: Env<'_>,
    event_log: &mut EventLog,
) -> Result<Ready, BootError> {
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
            "shape": facts.shape,
            "sandbox": facts.sandbox,
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

    *event_log = EventLog::new();
    // The register's value before the first extend (a TPM PCR may already carry the
    // firmware's or systemd's events): verifiers replay the log from it.
    match env.register.read() {
        Ok(initial) => event_log.set_register_initial(initial),
        Err(source) => {
            let error = BootError::Stage {
                stage: "measure",
                source: StageError::Extend(Box::new(crate::eventlog::ExtendError {
                    kind: EventKind::Policy,
                    register: env.register.name(),
                    source,
                })),
            };
            return Err(error);
        }
    }
    let mut fx = Effects {
        sys: env.sys,
        measurer: env.measurer,
        register: env.register,
        event_log,
        audit,
        broker: match env.broker {
            Some(broker) => Some(broker),
            None => None,
        },
        volumes: env.volumes,
        firewall: env.firewall,
        resolver: env.resolver,
        resolution: None,
        lockdown: env.lockdown,
        lockdown_paths: env.lockdown_paths,
    };
    let net = env.net.filter(|_| !facts.sandbox);
    if facts.sandbox && env.net.is_some() {
        // Nothing configured is skipped silently: the sandbox's network is the host's.
        record(
            audit,
            "network",
            "skipped",
            json!({
                "reason": "a sandbox PID namespace: the network namespace's interfaces are not configured",
                "plan": plan.network,
            }),
        )?;
    }
    let result = run_stages(&plan, &mut fx, audit, net);
    if result.is_err() && fx.sys.is_mountpoint(&plan.unlock.secrets_dir) {
        // Secrets may already sit in their tmpfs (a later stage, or a later secret, failed):
        // the workload will never read them, so they go now, not at power-off.
        let removed = fx.sys.umount(&plan.unlock.secrets_dir);
        let _ = audit.record(
            "unlock",
            "secrets_removed",
            json!({
                "dir": plan.unlock.secrets_dir,
                "removed": removed.is_ok(),
                "error": removed.err().map(|e| chain(&e)),
            }),
        );
    }
    result?;
    Ok(Ready {
        plan,
        event_log: std::mem::take(event_log),
    })
}

/// The stage loop of [`prepare`], then the audit sinks' check.
fn run_stages(
    plan: &BootPlan,
    fx: &mut Effects<'_>,
    audit: &Audit,
    net: Option<(&dyn crate::net::NetSys, &std::path::Path)>,
) -> Result<(), BootError> {
    for stage in StageName::ALL {
        let name = stage.as_str();
        log::info!("stage {name}: begin");
        record(
            audit,
            name,
            "begin",
            json!({ "plan": plan.stage_plan(stage) }),
        )?;
        let result = match stage {
            StageName::Perimeter => stage::perimeter::apply(&plan.perimeter, fx),
            StageName::Measure => stage::measure::apply(&plan.measure, fx),
            StageName::Attest => stage::attest::apply(&plan.attest, fx),
            StageName::Unlock => stage::unlock::apply(&plan.unlock, fx),
            StageName::Allowlist => stage::allowlist::apply(&plan.allowlist, fx),
            StageName::Launch => separator(fx),
        };
        match result {
            Ok(details) => {
                log::info!("stage {name}: ok");
                record(audit, name, "ok", details)?;
                if stage == StageName::Unlock {
                    devices_ready(fx, audit)?;
                }
                if stage == StageName::Perimeter {
                    device_precheck(fx, audit)?;
                    if let Some((sys, resolv_conf)) = net {
                        bring_up_network(&plan.network, sys, resolv_conf, fx, audit)?;
                    }
                    // systemd (Type=notify): units ordered after cvm-warden start now, behind
                    // the perimeter. Not fatal: without a service manager nothing listens.
                    if let Err(error) = fx.sys.notify_ready("perimeter up; measuring") {
                        log::warn!("cannot notify the service manager: {error}");
                    }
                }
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
    audit.require_sinks().map_err(BootError::Audit)
}

/// The devices beside the TEE (GPUs, `[attestation.gpu]`), right after the perimeter and
/// before the network and the measure stage: checked against the policy (a mismatch stops
/// the boot naming the GPU and the setting), each one's facts measured (a `gpu` event,
/// extended before it is logged) and recorded like a stage (`gpu/begin`, `gpu/ok` or
/// `gpu/failed`). Nothing is written when no devices are configured.
fn device_precheck(fx: &mut Effects<'_>, audit: &Audit) -> Result<(), BootError> {
    let Some(broker) = fx.broker.as_deref_mut() else {
        return Ok(());
    };
    let devices = match broker.device_precheck() {
        Ok(None) => return Ok(()),
        Ok(Some(devices)) => devices,
        Err(source) => {
            let error = device_precheck_error(source);
            log::error!("{}", chain(&error));
            record(audit, "gpu", "failed", json!({ "error": chain(&error) }))?;
            return Err(error);
        }
    };
    let mut measured = Vec::new();
    for device in &devices {
        let event = fx
            .event_log
            .measure(
                fx.register,
                device.kind,
                device.digest,
                device.description.clone(),
            )
            .map_err(|e| BootError::Stage {
                stage: "gpu",
                source: StageError::Extend(Box::new(e)),
            })?;
        measured.push(json!({ "facts": device.details, "event": event }));
    }
    log::info!("gpu: {} device(s) checked and measured", devices.len());
    record(audit, "gpu", "ok", json!({ "devices": measured }))?;
    Ok(())
}

/// The error a failed GPU precheck stops the boot with (also what `cvm-warden gpu probe`
/// prints, so an operator sees the exact refusal).
pub fn device_precheck_error(source: stage::BrokerError) -> BootError {
    BootError::Stage {
        stage: "gpu",
        source: StageError::Broker {
            stage: "gpu",
            what: "GPU precheck ([attestation.gpu])".to_string(),
            source,
        },
    }
}

/// After the unlock stage (the broker affirmed the evidence and released every key of the
/// boot): the devices' ready state is set (`gpu/ready`); a failure stops the boot.
fn devices_ready(fx: &mut Effects<'_>, audit: &Audit) -> Result<(), BootError> {
    let Some(broker) = fx.broker.as_deref_mut() else {
        return Ok(());
    };
    match broker.set_devices_ready(true) {
        Ok(None) => Ok(()),
        Ok(Some(details)) => {
            record(audit, "gpu", "ready", details)?;
            Ok(())
        }
        Err(source) => {
            let error = BootError::Stage {
                stage: "gpu",
                source: StageError::Broker {
                    stage: "gpu",
                    what: "setting the GPUs ready (nvmlSystemSetConfComputeGpusReadyState)"
                        .to_string(),
                    source,
                },
            };
            log::error!("{}", chain(&error));
            record(
                audit,
                "gpu",
                "ready_failed",
                json!({ "error": chain(&error) }),
            )?;
            Err(error)
        }
    }
}

/// The network, right after the perimeter ruleset is in place (default deny, DHCP admitted
/// where configured) and before anything needs it (the broker): recorded like a stage
/// (`network/begin`, `network/ok` with the report, or `network/failed`); each DHCP lease's
/// server is pinned for the allowlist, which then admits exactly its renewals.
fn bring_up_network(
    plan: &crate::net::NetPlan,
    sys: &dyn crate::net::NetSys,
    resolv_conf: &std::path::Path,
    fx: &mut Effects<'_>,
    audit: &Audit,
) -> Result<(), BootError> {
    log::info!("network: begin");
    record(audit, "network", "begin", json!({ "plan": plan }))?;
    match crate::net::apply(plan, sys, resolv_conf) {
        Ok(report) => {
            if let Some(resolution) = fx.resolution.as_mut() {
                for dhcp in report.dhcp_servers() {
                    resolution.pin_dhcp(dhcp.interface, dhcp.server);
                }
            }
            log::info!("network: ok");
            record(audit, "network", "ok", json!(report))?;
            Ok(())
        }
        Err(source) => {
            let error = BootError::Network(source);
            log::error!("{}", chain(&error));
            record(
                audit,
                "network",
                "failed",
                json!({ "error": chain(&error) }),
            )?;
            Err(error)
        }
    }
}

/// What the separator event measures (its digest is `Digest::of(SEPARATOR)`), the last event
/// before the workload starts.
pub const SEPARATOR: &[u8] = b"cvm-warden separator: workload starts";

fn separator(fx: &mut Effects<'_>) -> Result<Value, StageError> {
    let event = fx
        .event_log
        .measure(
            fx.register,
            EventKind::Separator,
            Digest::of(SEPARATOR),
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

/// When a checkpoint is taken (the `kind` of an `audit/checkpoint` record; the verifier's
/// type, so writer and reader share it).
pub use cvm_warden_verify::schema::CheckpointKind;

/// Fresh TEE evidence over the audit log's head, and the re-attestation seam: all the runner
/// needs of the broker after the stages (the real one is [`crate::keybroker::RealBroker`],
/// see [`reattest`]).
pub trait Checkpointer {
    /// Public facts about the evidence provider, as `attest/attested`'s `details.tee`.
    fn describe(&self) -> Value;
    /// Evidence whose report data is `binding`, as `attest/ok`'s `details.checkpoint.evidence`.
    fn checkpoint(&mut self, binding: &[u8; 64]) -> Result<Value, stage::BrokerError>;
    /// The same provider and broker as a [`Reattester`] (`None`: this one cannot re-attest;
    /// a policy with re-attestation then stops the workload at the first one, fail closed).
    fn reattester(&mut self) -> Option<&mut dyn Reattester> {
        None
    }

    /// Sets or clears the devices' ready state ([`stage::KeyBroker::set_devices_ready`]).
    fn set_devices_ready(&mut self, ready: bool) -> Result<Option<Value>, stage::BrokerError> {
        let _ = ready;
        Ok(None)
    }
}

/// Clears the devices' ready state before the machine goes down or the workload is gone
/// (`gpu/not_ready`, or `gpu/not_ready_failed`); nothing without devices. Audit errors are
/// ignored: the machine goes down either way.
pub fn clear_devices_ready(audit: &Audit, checkpointer: &mut dyn Checkpointer) {
    match checkpointer.set_devices_ready(false) {
        Ok(None) => {}
        Ok(Some(details)) => {
            let _ = audit.record("gpu", "not_ready", details);
        }
        Err(error) => {
            let error = chain(error.as_ref());
            log::error!("cannot clear the GPUs' ready state: {error}");
            let _ = audit.record("gpu", "not_ready_failed", json!({ "error": error }));
        }
    }
}

/// How often the evidence is taken again when the log moved on while it was being taken
/// (a sink changed state): then the checkpoint is recorded as failed.
const CHECKPOINT_TRIES: u32 = 3;

/// Writes one checkpoint: evidence over the hash of the last record, then `audit/checkpoint`
/// right after that record; `audit/checkpoint_failed` (and on) when the TEE does not answer.
/// Returns whether a checkpoint was written.
pub fn checkpoint(
    audit: &Audit,
    checkpointer: &mut dyn Checkpointer,
    kind: CheckpointKind,
    event_log: &EventLog,
) -> bool {
    let mut head_seq = 0;
    for _ in 0..CHECKPOINT_TRIES {
        let (seq, head) = audit.last();
        head_seq = seq;
        let binding = stage::attest::checkpoint_binding(&head);
        let evidence = match checkpointer.checkpoint(&binding) {
            Ok(evidence) => evidence,
            Err(error) => {
                let error = chain(error.as_ref());
                log::warn!("{} checkpoint over seq {seq}: {error}", kind.as_str());
                let _ = audit.record(
                    crate::audit::AUDIT_STAGE,
                    "checkpoint_failed",
                    json!({ "kind": kind.as_str(), "head_seq": seq, "error": error }),
                );
                return false;
            }
        };
        // Written through the verifier's type: evidence of a shape it would refuse is a
        // failed checkpoint here, not a record that breaks the log later.
        let typed = cvm_warden_verify::schema::from_value(&evidence, "checkpoint evidence")
            .map(|evidence| CheckpointDetails {
                kind,
                head_seq: seq,
                head,
                report_data: hex::encode(binding),
                tee: checkpointer.describe(),
                evidence,
                event_log: event_log.events().to_vec(),
                register_initial: event_log.register_initial(),
            })
            .map_err(|e| e.to_string())
            .and_then(|d| serde_json::to_value(d).map_err(|e| e.to_string()));
        let details = match typed {
            Ok(details) => details,
            Err(error) => {
                let _ = audit.record(
                    crate::audit::AUDIT_STAGE,
                    "checkpoint_failed",
                    json!({ "kind": kind.as_str(), "head_seq": seq, "error": error }),
                );
                return false;
            }
        };
        match audit.record_after(head, crate::audit::AUDIT_STAGE, "checkpoint", details) {
            Ok(Some(_)) => return true,
            Ok(None) => continue,
            // A required sink failed: the record went to the others; the caller's next record
            // or flush reports the sink.
            Err(_) => return true,
        }
    }
    let _ = audit.record(
        crate::audit::AUDIT_STAGE,
        "checkpoint_failed",
        json!({
            "kind": kind.as_str(),
            "head_seq": head_seq,
            "error": format!("the audit log moved on while the evidence was taken, {CHECKPOINT_TRIES} times"),
        }),
    );
    false
}

/// What the runner uses after the stages: the audit log, checkpoints, and what a failed
/// launch must clean up.
pub struct Lifecycle<'a> {
    /// System calls (unmounting the secrets tmpfs and volumes).
    pub sys: &'a dyn Sys,
    /// The audit log.
    pub audit: &'a Audit,
    /// LUKS2 volumes (closed after a failed launch).
    pub volumes: &'a dyn crate::volume::Volumes,
    /// The evidence provider for checkpoints (`None` with `attestation = "none"`: none).
    pub checkpointer: Option<&'a mut dyn Checkpointer>,
    /// Between periodic checkpoints while the workload runs (`None`: none).
    pub checkpoint_interval: Option<std::time::Duration>,
    /// The audit file, whose volume stays mounted after a failed launch.
    pub audit_file: Option<&'a std::path::Path>,
    /// Asks the supervisor to stop the workload (PID 1: SIGTERM to itself, the stop request
    /// that ends in the closing record and power-off); called when a required audit sink is
    /// lost while the workload runs.
    pub stop_workload: fn(),
    /// Watch the ACPI power button once the workload has started (PID 1 outside a sandbox):
    /// only then are the supervisor's signal handlers in place, and a SIGTERM that PID 1
    /// receives with the default action is dropped by the kernel.
    pub watch_power_button: bool,
}

impl std::fmt::Debug for Lifecycle<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lifecycle")
            .field("checkpoints", &self.checkpointer.is_some())
            .field("checkpoint_interval", &self.checkpoint_interval)
            .finish_non_exhaustive()
    }
}

impl Lifecycle<'_> {
    fn checkpoint(&mut self, kind: CheckpointKind, event_log: &EventLog) {
        if let Some(checkpointer) = self.checkpointer.as_deref_mut() {
            checkpoint(self.audit, checkpointer, kind, event_log);
        }
    }

    /// The devices' ready state cleared, the closing record, the closing checkpoint right
    /// after it, then a flush.
    fn close(&mut self, stage: &str, event: &str, details: Value, event_log: &EventLog) {
        if let Some(checkpointer) = self.checkpointer.as_deref_mut() {
            clear_devices_ready(self.audit, checkpointer);
        }
        let _ = self.audit.record(stage, event, details);
        self.checkpoint(CheckpointKind::Closing, event_log);
        let _ = self.audit.flush();
    }

    /// After a failed launch the workload will never read its secrets, and no one will use
    /// its volumes: the secrets tmpfs is unmounted, every volume unmounted and closed (except
    /// the one that holds the audit file), and that is recorded (`launch/cleanup`).
    fn clean_up_after_failed_launch(&self, plan: &BootPlan) {
        let mut removed = Vec::new();
        let secrets = &plan.unlock.secrets_dir;
        if self.sys.is_mountpoint(secrets) {
            let result = self.sys.umount(secrets);
            removed.push(json!({
                "what": "secrets",
                "path": secrets,
                "removed": result.is_ok(),
                "error": result.err().map(|e| chain(&e)),
            }));
        }
        for volume in &plan.unlock.volumes {
            if !self.sys.is_mountpoint(&volume.mount) {
                continue;
            }
            if self
                .audit_file
                .is_some_and(|file| file.starts_with(&volume.mount))
            {
                removed.push(json!({
                    "what": "volume",
                    "name": volume.name,
                    "path": volume.mount,
                    "removed": false,
                    "error": "kept mounted: it holds the audit file, whose last records are still to be written",
                }));
                continue;
            }
            let result = self
                .sys
                .umount(&volume.mount)
                .map_err(|e| chain(&e))
                .and_then(|()| self.volumes.close(&volume.name).map_err(|e| chain(&e)));
            removed.push(json!({
                "what": "volume",
                "name": volume.name,
                "path": volume.mount,
                "removed": result.is_ok(),
                "error": result.err(),
            }));
        }
        if !removed.is_empty() {
            let _ = self
                .audit
                .record("launch", "cleanup", json!({ "removed": removed }));
        }
    }
}

/// Records a failed boot and the closing record with code 1 (and the closing checkpoint when
/// there is a provider); returns the shutdown to perform. Audit errors here are ignored: the
/// machine goes down either way (fail closed). `event_log` holds the events measured before
/// the failure.
pub fn fail(
    life: &mut Lifecycle<'_>,
    action: FailureAction,
    error: &BootError,
    event_log: &EventLog,
) -> Shutdown {
    let closing = closing_event(life.sys, action);
    record_failure(life, closing, error, event_log);
    Shutdown { action, code: 1 }
}

/// Records a failed boot (`boot/failed`) and the closing `shutdown/<closing>` record with code
/// 1, the closing checkpoint, then flushes. Audit errors are ignored: the boot has already
/// failed closed.
pub fn record_failure(
    life: &mut Lifecycle<'_>,
    closing: &str,
    error: &BootError,
    event_log: &EventLog,
) {
    let _ = life.audit.record(
        "boot",
        "failed",
        json!({ "error": chain(error), "workload_started": false }),
    );
    life.close("shutdown", closing, json!({ "code": 1 }), event_log);
}
