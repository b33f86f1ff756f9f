//! The boot stages, one module each, in boot order:
//! perimeter → measure → attest → unlock → allowlist → launch.
//!
//! Every stage has a pure `plan` (policy in, data out, no I/O) and an `apply` that performs
//! the plan through traits passed in ([`Effects`]), so the whole boot can be planned and
//! printed (`cvm-warden plan`) and unit-tested with recording fakes. A stage never calls
//! another stage and knows nothing of the order; the order lives in [`crate::boot`].

use std::path::{Path, PathBuf};

use serde::Serialize;

use serde_json::Value;
use zeroize::Zeroizing;

use crate::audit::Audit;
use crate::eventlog::{EventLog, ExtendError, RuntimeRegister};
use crate::launch::LaunchError;
use crate::measure::{Manifest, MeasureError, Measurement};
use crate::policy::{Policy, ResourceUri};
use crate::sys::{Sys, SysError};

pub mod allowlist;
pub mod attest;
pub mod launch;
pub mod measure;
pub mod perimeter;
pub mod unlock;

/// The stages in boot order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StageName {
    /// Default-deny network, consoles off, kernel hardened.
    Perimeter,
    /// Policy, operator file, kernel command line and bundle measured into the event log.
    Measure,
    /// Evidence to the key broker.
    Attest,
    /// LUKS2 volumes opened with released keys.
    Unlock,
    /// The workload's network allowlist replaces the perimeter.
    Allowlist,
    /// The workload starts with dropped privileges.
    Launch,
}

impl StageName {
    /// Every stage, in boot order.
    pub const ALL: [StageName; 6] = [
        StageName::Perimeter,
        StageName::Measure,
        StageName::Attest,
        StageName::Unlock,
        StageName::Allowlist,
        StageName::Launch,
    ];

    /// The name used in audit records.
    pub fn as_str(self) -> &'static str {
        match self {
            StageName::Perimeter => "perimeter",
            StageName::Measure => "measure",
            StageName::Attest => "attest",
            StageName::Unlock => "unlock",
            StageName::Allowlist => "allowlist",
            StageName::Launch => "launch",
        }
    }
}

/// Why a stage could not be planned or applied.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    /// The policy configures something a later release implements. Never skipped silently.
    #[error("{stage}: {what} is not supported by this build yet; {hint}")]
    Unsupported {
        /// The stage.
        stage: &'static str,
        /// The policy key that asks for it.
        what: String,
        /// What the operator can do.
        hint: &'static str,
    },
    /// Measuring the bundle failed or its digest differs from the pin.
    #[error("measure: bundle {bundle}")]
    Measure {
        /// The bundle directory.
        bundle: PathBuf,
        /// Why.
        #[source]
        source: Box<MeasureError>,
    },
    /// Reading an input that is measured (kernel command line, policy) failed.
    #[error("measure: cannot read {path}")]
    ReadInput {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: Box<std::io::Error>,
    },
    /// A runtime register refused an event.
    #[error("measure: event log")]
    Extend(#[source] Box<ExtendError>),
    /// A mount or other system call failed.
    #[error("{stage}: system call failed")]
    Sys {
        /// The stage.
        stage: &'static str,
        /// Why.
        #[source]
        source: Box<SysError>,
    },
    /// The workload's launch plan is invalid.
    #[error("launch: invalid launch plan")]
    Launch(#[source] Box<LaunchError>),
    /// The TEE or the key broker failed (attestation, a resource, a checkpoint).
    #[error("{stage}: {what}")]
    Broker {
        /// The stage.
        stage: &'static str,
        /// What was being done, e.g. `key broker exchange with https://kbs:8999`.
        what: String,
        /// Why (the broker's or TEE's error, already phrased for the operator).
        #[source]
        source: BrokerError,
    },
    /// A firewall ruleset could not be built, applied or verified.
    #[error("{stage}: nftables")]
    Firewall {
        /// The stage.
        stage: &'static str,
        /// Why.
        #[source]
        source: Box<crate::firewall::FirewallError>,
    },
    /// The console, login or kernel lockdown failed or did not stick.
    #[error("{stage}: lockdown")]
    Lockdown {
        /// The stage.
        stage: &'static str,
        /// Why.
        #[source]
        source: Box<crate::lockdown::LockdownError>,
    },
    /// A volume could not be unlocked, formatted or mounted.
    #[error("unlock: volume {name:?} ({device})")]
    Volume {
        /// The policy's volume name.
        name: String,
        /// The device.
        device: String,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Runs a broker call whose every try is recorded as a `<stage>/try` audit record, then
/// maps its error to a [`StageError::Broker`] naming `what`. A try that cannot be recorded
/// fails the call: the audit log must hold every try.
pub(crate) fn audited_broker_call<T>(
    audit: &Audit,
    stage: &'static str,
    what: impl FnOnce() -> String,
    call: impl FnOnce(&mut dyn FnMut(Value)) -> Result<T, BrokerError>,
) -> Result<T, StageError> {
    let mut audit_failure = None;
    let mut attempt = |details: Value| {
        if let Err(error) = audit.record(stage, "try", details) {
            audit_failure.get_or_insert(error);
        }
    };
    let result = call(&mut attempt);
    if let Some(error) = audit_failure {
        return Err(StageError::Broker {
            stage,
            what: "recording a key broker try in the audit log".to_string(),
            source: Box::new(error),
        });
    }
    result.map_err(|source| StageError::Broker {
        stage,
        what: what(),
        source,
    })
}

/// An error from a [`KeyBroker`] (already phrased for the operator; never holds a secret).
pub type BrokerError = Box<dyn std::error::Error + Send + Sync>;

/// The TEE and the key broker, as the attest and unlock stages see them. The real one
/// ([`crate::keybroker::RealBroker`]) joins an evidence provider and the KBS client; tests
/// use recording fakes.
pub trait KeyBroker {
    /// Public facts for the audit log: TEE, broker URL, attestation key. Never a secret.
    fn describe(&self) -> Value;
    /// Whether the evidence proves nothing (`sample`).
    fn insecure(&self) -> bool;
    /// Runs the handshake (auth, evidence, attest). `attempt` receives one JSON record per
    /// try. Returns what an auditor needs to re-check the exchange: TEE, nonce, ephemeral
    /// public key, report data, the evidence and the broker's verdict.
    fn attest(&mut self, attempt: &mut dyn FnMut(Value)) -> Result<Value, BrokerError>;
    /// Fetches one resource with the attested session (re-attesting if the broker asks).
    fn fetch(
        &mut self,
        uri: &ResourceUri,
        attempt: &mut dyn FnMut(Value),
    ) -> Result<Zeroizing<Vec<u8>>, BrokerError>;
    /// Fresh evidence whose report data is `binding` (an audit-log checkpoint).
    fn checkpoint(&mut self, binding: &[u8; 64]) -> Result<Value, BrokerError>;
    /// The devices beside the TEE (GPUs) checked against the policy, their facts to measure
    /// ([`crate::tee::Provider::device_precheck`]); `None`: no devices configured.
    fn device_precheck(&mut self) -> Result<Option<Vec<crate::tee::DeviceFacts>>, BrokerError> {
        Ok(None)
    }
    /// Sets (after the unlock stage) or clears (before power-off) the devices' ready state
    /// ([`crate::tee::Provider::set_devices_ready`]); the details to audit, `None`: no devices.
    fn set_devices_ready(&mut self, ready: bool) -> Result<Option<Value>, BrokerError> {
        let _ = ready;
        Ok(None)
    }
}

/// Loads bundles; the seam between the measure stage and the file system.
pub trait Measurer {
    /// Measures `dir` where it is.
    fn in_place(&self, dir: &Path) -> Result<Measurement, MeasureError>;
    /// Copies `src` into the empty directory `dst` while measuring it.
    fn copy(&self, src: &Path, dst: &Path) -> Result<Measurement, MeasureError>;
    /// Loads a reference manifest (JSON written by `cvm-warden measure --manifest`).
    fn reference(&self, path: &Path) -> Result<Manifest, MeasureError>;
    /// Verifies the NVIDIA FLARE startup kit at `kit` against the pinned root CA
    /// ([`crate::measure::flare::verify_kit`]).
    fn flare_kit(
        &self,
        kit: &Path,
        root_ca_sha256: &crate::digest::Digest,
        withheld: &[String],
    ) -> Result<crate::measure::flare::VerifiedKit, MeasureError>;
}

/// The real measurer: the `measure` module on the real file system.
#[derive(Debug, Default)]
pub struct RealMeasurer;

impl Measurer for RealMeasurer {
    fn in_place(&self, dir: &Path) -> Result<Measurement, MeasureError> {
        crate::measure::measure_in_place(dir)
    }

    fn copy(&self, src: &Path, dst: &Path) -> Result<Measurement, MeasureError> {
        crate::measure::measure_and_copy(src, dst)
    }

    fn reference(&self, path: &Path) -> Result<Manifest, MeasureError> {
        Manifest::load_json(path)
    }

    fn flare_kit(
        &self,
        kit: &Path,
        root_ca_sha256: &crate::digest::Digest,
        withheld: &[String],
    ) -> Result<crate::measure::flare::VerifiedKit, MeasureError> {
        crate::measure::flare::verify_kit(kit, root_ca_sha256, withheld)
            .map_err(|e| MeasureError::FlareKit(Box::new(e)))
    }
}

/// Everything a stage's `apply` may touch. Passed in, never chosen with `cfg!(test)`.
pub struct Effects<'a> {
    /// Mounts, reboot and other system calls.
    pub sys: &'a dyn Sys,
    /// Bundle measurement.
    pub measurer: &'a dyn Measurer,
    /// Where events are extended before they are logged.
    pub register: &'a mut dyn RuntimeRegister,
    /// The event log being built.
    pub event_log: &'a mut EventLog,
    /// The audit log (stages record each broker try and checkpoints).
    pub audit: &'a Audit,
    /// The TEE and key broker; `None` with `attestation = "none"`.
    pub broker: Option<&'a mut dyn KeyBroker>,
    /// LUKS2 volumes.
    pub volumes: &'a dyn crate::volume::Volumes,
    /// nftables.
    pub firewall: &'a mut dyn crate::firewall::Firewall,
    /// Name resolution for the rulesets (once, in the perimeter stage).
    pub resolver: &'a dyn crate::firewall::Resolver,
    /// The addresses the perimeter stage pinned, for the allowlist stage.
    pub resolution: Option<crate::firewall::Resolution>,
    /// Console, login and kernel lockdown effects.
    pub lockdown: &'a dyn crate::lockdown::LockdownSys,
    /// Where the lockdown reads and writes (`/proc/sys`, `/etc/shadow`, …).
    pub lockdown_paths: &'a crate::lockdown::Paths,
}

impl std::fmt::Debug for Effects<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Effects")
            .field("register", &self.register.name())
            .field("event_log", &self.event_log)
            .field("broker", &self.broker.as_ref().map(|b| b.describe()))
            .finish_non_exhaustive()
    }
}

/// Facts about the host that plans depend on, gathered before planning (injectable paths).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Facts {
    /// Where the kernel command line is read from (`/proc/cmdline`).
    pub cmdline_path: PathBuf,
    /// SHA-256 of the policy file.
    pub policy_digest: crate::digest::Digest,
    /// SHA-256 of the operator file, if one was given.
    pub operator_digest: Option<crate::digest::Digest>,
    /// PID 1 of the initramfs (`init`) or a systemd unit (`run`).
    pub shape: crate::lockdown::Shape,
    /// A sandbox PID namespace (demo, tests): host-wide settings are not touched.
    pub sandbox: bool,
}

/// The whole boot, planned before the first side effect. Printed by `cvm-warden plan`.
#[derive(Debug, Clone, Serialize)]
pub struct BootPlan {
    /// Network bring-up (PID 1: loopback and `[network.interface.*]`; systemd: left to the
    /// OS). Not a stage yet: the runner applies it with `net::apply` after the perimeter.
    pub network: crate::net::NetPlan,
    /// Stage 1.
    pub perimeter: perimeter::Plan,
    /// Stage 2.
    pub measure: measure::Plan,
    /// Stage 3.
    pub attest: attest::Plan,
    /// Stage 4.
    pub unlock: unlock::Plan,
    /// Stage 5.
    pub allowlist: allowlist::Plan,
    /// Stage 6.
    pub launch: launch::Plan,
}

impl BootPlan {
    /// Plans every stage. Pure: no I/O, so it runs without root anywhere.
    pub fn new(policy: &Policy, facts: &Facts) -> Result<BootPlan, StageError> {
        Ok(BootPlan {
            network: crate::net::plan(policy, facts.shape),
            perimeter: perimeter::plan(policy, facts)?,
            measure: measure::plan(policy, facts)?,
            attest: attest::plan(policy, facts)?,
            unlock: unlock::plan(policy)?,
            allowlist: allowlist::plan(policy, facts)?,
            launch: launch::plan(policy)?,
        })
    }

    /// One stage's plan as JSON (for its `begin` audit record).
    pub fn stage_plan(&self, stage: StageName) -> serde_json::Value {
        let value = match stage {
            StageName::Perimeter => serde_json::to_value(&self.perimeter),
            StageName::Measure => serde_json::to_value(&self.measure),
            StageName::Attest => serde_json::to_value(&self.attest),
            StageName::Unlock => serde_json::to_value(&self.unlock),
            StageName::Allowlist => serde_json::to_value(&self.allowlist),
            StageName::Launch => serde_json::to_value(&self.launch),
        };
        // Plans are plain data; serialising them cannot fail, but never panic in PID 1.
        value.unwrap_or_else(|error| serde_json::json!({ "unserialisable": error.to_string() }))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn the_boot_plan_lists_the_network_bring_up_per_shape() {
        let text = "attestation = \"none\"\n[workload]\nbundle = \"/opt/w\"\nsource = \"initramfs\"\nexec = [\"/opt/w/run\"]\nuser = 1000\ngroup = 1000\n\n[network]\n[network.interface.eth0]\naddress = \"10.0.2.15/24\"\ngateway = \"10.0.2.2\"\n";
        let loaded = crate::policy::parse(text, None, &crate::policy::MemoryUsers::new()).unwrap();
        let facts = |shape| Facts {
            cmdline_path: PathBuf::from("/proc/cmdline"),
            policy_digest: loaded.policy_digest,
            operator_digest: None,
            shape,
            sandbox: false,
        };
        let pid1 = BootPlan::new(&loaded.policy, &facts(crate::lockdown::Shape::Pid1)).unwrap();
        let json = serde_json::to_value(&pid1).unwrap();
        assert_eq!(json["network"]["action"], "configure");
        assert_eq!(json["network"]["interfaces"][0]["name"], "eth0");
        assert_eq!(
            json["network"]["interfaces"][0]["addressing"]["address"],
            "10.0.2.15"
        );
        let unit = BootPlan::new(&loaded.policy, &facts(crate::lockdown::Shape::Systemd)).unwrap();
        let json = serde_json::to_value(&unit).unwrap();
        assert_eq!(json["network"]["action"], "left-to-the-os");
        assert_eq!(json["network"]["interfaces"][0], "eth0");
    }
}
