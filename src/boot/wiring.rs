//! The real effects wired into the runner, for both shapes: the policy loaded from files, the
//! audit log with the policy's sinks, the panic hook, the tool runner, the kernel modules the
//! policy needs, the evidence provider and key broker client (opened before the stages, so
//! the provider's register receives every measurement), and [`Setup`], what the runner keeps
//! using after the stages.

use std::path::{Path, PathBuf};

use super::{Env, Lifecycle, Ready};
use crate::audit::{self, Audit};
use crate::eventlog::{NoRegister, RuntimeRegister};
use crate::policy::{self, Attestation, LoadedPolicy, PasswdFiles};
use crate::stage::{Facts, RealMeasurer};
use crate::sys::{RealSys, Sys};

/// Kernel command line.
pub const PROC_CMDLINE: &str = "/proc/cmdline";

/// Where a policy and its operator file are read, and the user database users resolve in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyFiles {
    /// The policy file.
    pub policy: PathBuf,
    /// The operator file, if any.
    pub operator: Option<PathBuf>,
    /// passwd file.
    pub passwd: PathBuf,
    /// group file.
    pub group: PathBuf,
}

/// Loads and validates the policy (and the operator file).
pub fn load(files: &PolicyFiles) -> Result<LoadedPolicy, policy::PolicyError> {
    let users = PasswdFiles {
        passwd: files.passwd.clone(),
        group: files.group.clone(),
    };
    policy::load(&files.policy, files.operator.as_deref(), &users)
}

/// The facts a plan depends on. `sandbox`: only `init --sandbox` (checked against the PID
/// namespace); every other command plans a real boot.
pub fn facts(loaded: &LoadedPolicy, shape: crate::lockdown::Shape, sandbox: bool) -> Facts {
    Facts {
        cmdline_path: PathBuf::from(PROC_CMDLINE),
        policy_digest: loaded.policy_digest,
        operator_digest: loaded.operator_digest,
        shape,
        sandbox,
    }
}

/// Whether every audit record must say `"insecure": true`: nothing is attested
/// (`attestation = "none"`), the evidence proves nothing (`tee = "sample"`, a simulated GPU
/// `[attestation.gpu] simulate`) or the GPU is not confidential (`allow_devtools = true`).
pub fn insecure(loaded: &LoadedPolicy) -> bool {
    match &loaded.policy.attestation {
        Attestation::None => true,
        Attestation::Broker { tee, gpu, .. } => {
            *tee == policy::Tee::Sample
                || gpu
                    .as_ref()
                    .is_some_and(|g| g.simulate.is_some() || g.allow_devtools)
        }
    }
}

/// Builds the audit log for a loaded policy (console = stderr: the serial console in PID 1
/// mode, the journal in unit mode).
pub fn open_audit(loaded: &LoadedPolicy) -> Audit {
    let insecure = insecure(loaded);
    let sinks = audit::sinks_from_config(&loaded.policy.audit, Box::new(std::io::stderr()));
    Audit::new(sinks, insecure)
}

/// The panic hook: a `boot/panic` record and the closing record, then (PID 1) power off.
pub fn install_hook(audit: &Audit, pid1: bool) {
    let audit = audit.clone();
    let closing = if pid1 {
        super::closing_event(&RealSys::default(), policy::FailureAction::Poweroff)
    } else {
        "exit"
    };
    crate::launch::install_panic_hook(
        Box::new(move |message: &str| {
            // A panic may strike while this thread holds the audit lock: never wait forever.
            let _ = audit.record_within(
                std::time::Duration::from_secs(2),
                "boot",
                "panic",
                serde_json::json!({ "message": message }),
            );
            let _ = audit.record_within(
                std::time::Duration::from_secs(1),
                "shutdown",
                closing,
                serde_json::json!({ "code": 1 }),
            );
        }),
        pid1,
    );
}

/// What [`prepare`] sets up and the runner keeps using: the key broker (for checkpoints), the
/// volumes (closed after a failed launch) and the events measured so far.
pub struct Setup {
    broker: Option<crate::keybroker::RealBroker>,
    /// Every external tool (nft, mkfs.ext4, systemctl, loginctl) runs through this one
    /// runner: fixed absolute paths, a timeout, each path recorded in the audit log before
    /// first use.
    tools: crate::tool::Tools,
    volumes: crate::volume::RealVolumes,
    event_log: crate::eventlog::EventLog,
}

impl std::fmt::Debug for Setup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Setup")
            .field("broker", &self.broker.is_some())
            .finish_non_exhaustive()
    }
}

impl Setup {
    /// The real effects, their tools audited in `audit`.
    pub fn new(audit: &Audit) -> Setup {
        let tools = crate::tool::Tools::system().audited(audit);
        Setup {
            broker: None,
            volumes: crate::volume::RealVolumes::with_tools(tools.clone()),
            tools,
            event_log: crate::eventlog::EventLog::new(),
        }
    }

    /// What the runner uses after the stages (both shapes), and the events measured so far.
    pub fn lifecycle<'a>(
        &'a mut self,
        sys: &'a dyn Sys,
        audit: &'a Audit,
        loaded: &'a LoadedPolicy,
    ) -> (Lifecycle<'a>, &'a crate::eventlog::EventLog) {
        let Setup {
            broker,
            volumes,
            event_log,
            ..
        } = self;
        let life = Lifecycle {
            sys,
            audit,
            volumes,
            checkpointer: broker.as_mut().map(|b| b as &mut dyn super::Checkpointer),
            checkpoint_interval: checkpoint_interval(loaded),
            audit_file: loaded.policy.audit.file.as_deref(),
            stop_workload: crate::launch::power::sigterm_self,
            watch_power_button: false,
        };
        (life, event_log)
    }
}

/// `audit.checkpoint_interval`, `None` when 0.
fn checkpoint_interval(loaded: &LoadedPolicy) -> Option<std::time::Duration> {
    match loaded.policy.audit.checkpoint_interval_secs {
        0 => None,
        secs => Some(std::time::Duration::from_secs(secs)),
    }
}

/// Runs every step before launch with the real effects: the kernel modules the policy needs
/// first ([`super::load_modules`]: the TEE's driver, e.g. `sev-guest`, may be one of them and
/// there is no udev in the initramfs), then the policy's evidence provider and key broker
/// client, so the provider's runtime register receives every measurement, then the stages.
/// The broker and the event log stay in `setup`, also after a failure.
pub fn prepare(
    loaded: &LoadedPolicy,
    sys: &dyn Sys,
    audit: &Audit,
    shape: crate::lockdown::Shape,
    sandbox: bool,
    setup: &mut Setup,
) -> Result<Ready, super::BootError> {
    use super::BootError;
    use crate::keybroker::{client_config, open_provider, RealBroker};
    let lockdown_paths = crate::lockdown::Paths::default();
    let tools = setup.tools.clone();
    let lockdown_sys = crate::lockdown::RealLockdownSys::with_tools(tools.clone());
    let modules = crate::lockdown::module_plan(&loaded.policy);
    super::load_modules(
        &modules,
        &super::ModuleStep {
            shape,
            sandbox,
            lockdown: &lockdown_sys,
            paths: &lockdown_paths,
            sys,
            audit,
        },
    )?;
    let attestation = &loaded.policy.attestation;
    setup.broker = match (
        open_provider(attestation).map_err(BootError::Setup)?,
        client_config(attestation).map_err(BootError::Setup)?,
    ) {
        (Some(provider), Some(config)) => {
            Some(RealBroker::new(provider, config).map_err(BootError::Setup)?)
        }
        _ => None,
    };
    let mut register: Box<dyn RuntimeRegister> = match setup.broker.as_mut() {
        Some(broker) => broker
            .runtime_register()
            .map_err(BootError::Setup)?
            .unwrap_or_else(|| Box::new(NoRegister)),
        None => Box::new(NoRegister),
    };
    let env = Env {
        sys,
        measurer: &RealMeasurer,
        register: register.as_mut(),
        audit,
        broker: setup
            .broker
            .as_mut()
            .map(|b| b as &mut dyn crate::stage::KeyBroker),
        volumes: &setup.volumes,
        firewall: &mut crate::firewall::NftFirewall::with_tools(tools),
        resolver: &crate::firewall::SystemResolver::default(),
        lockdown: &lockdown_sys,
        lockdown_paths: &lockdown_paths,
        net: Some((
            &crate::net::RealNetSys::new(),
            Path::new(crate::net::RESOLV_CONF),
        )),
    };
    super::prepare_logged(
        loaded,
        &facts(loaded, shape, sandbox),
        env,
        &mut setup.event_log,
    )
}

/// Whether `path`'s file name is `init` (the kernel's `/init`, `/sbin/init`).
pub fn named_init(path: &Path) -> bool {
    path.file_name().is_some_and(|name| name == "init")
}
