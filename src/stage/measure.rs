//! Stage 2, measure: the policy, the operator file, the kernel command line and the workload
//! bundle go into the event log (extended into the runtime register first), and the bundle
//! digest is checked against the policy's pin before anything asks for a key. With
//! `[workload.flare]` the NVIDIA FLARE startup kit inside the bundle (in the copy, with
//! `copy`) is verified against its pinned root CA first, and the root CA digest and the kit's
//! listing become two more events (`flare-root-ca`, `flare-kit`).
//!
//! Time of check vs time of use: `copy` measures while copying into a fresh tmpfs that is then
//! remounted read-only, and the workload runs from that copy; `initramfs` measures in place
//! (the initramfs is already in encrypted, launch-measured memory). Measuring a host disk in
//! place is not offered.

use std::path::PathBuf;

use serde::Serialize;
use serde_json::{json, Value};

use super::{Effects, Facts, StageError};
use crate::digest::Digest;
use crate::eventlog::EventKind;
use crate::measure::{MeasureError, Measurement};
use crate::policy::{BundleSource, FlareKit, Policy};

/// Mode of the tmpfs that receives a `copy` bundle (read-only after the copy).
pub const COPY_TMPFS_MODE: u32 = 0o755;

/// Where the measured bytes come from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Source {
    /// Measured in place inside the initramfs.
    InPlace,
    /// Copied into a new tmpfs at `into`, measured in the same pass, then remounted read-only.
    Copy {
        /// The tmpfs mount point.
        into: PathBuf,
    },
}

/// What the measure stage will do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Plan {
    /// The policy file's digest (first event).
    pub policy_digest: Digest,
    /// The operator file's digest (second event, when present).
    pub operator_digest: Option<Digest>,
    /// Kernel command line file.
    pub cmdline_path: PathBuf,
    /// Bundle directory.
    pub bundle: PathBuf,
    /// How it is read.
    pub source: Source,
    /// The pinned digest, if any.
    pub expected: Option<Digest>,
    /// Reference manifest used to name differing entries.
    pub reference_manifest: Option<PathBuf>,
    /// The NVIDIA FLARE startup kit to verify (`[workload.flare]`; path relative to the
    /// bundle root).
    pub flare: Option<FlareKit>,
}

/// Plans the measure stage. Pure.
pub fn plan(policy: &Policy, facts: &Facts) -> Result<Plan, StageError> {
    let source =
        match &policy.workload.source {
            BundleSource::Initramfs => Source::InPlace,
            BundleSource::Copy { into } => Source::Copy { into: into.clone() },
            BundleSource::Verity => return Err(StageError::Unsupported {
                stage: "measure",
                what: "workload.source = \"verity\"".to_string(),
                hint: "use source = \"copy\" or \"initramfs\", or a release with dm-verity support",
            }),
        };
    Ok(Plan {
        policy_digest: facts.policy_digest,
        operator_digest: facts.operator_digest,
        cmdline_path: facts.cmdline_path.clone(),
        bundle: policy.workload.bundle.clone(),
        source,
        expected: policy.workload.digest,
        reference_manifest: policy.workload.manifest.clone(),
        flare: policy.workload.flare.clone(),
    })
}

/// Applies the plan; returns the details of the outcome record.
pub fn apply(plan: &Plan, fx: &mut Effects<'_>) -> Result<Value, StageError> {
    fx.event_log
        .measure(fx.register, EventKind::Policy, plan.policy_digest, "policy")
        .map_err(|e| StageError::Extend(Box::new(e)))?;
    if let Some(operator) = plan.operator_digest {
        fx.event_log
            .measure(fx.register, EventKind::Operator, operator, "operator file")
            .map_err(|e| StageError::Extend(Box::new(e)))?;
    }
    let cmdline = std::fs::read(&plan.cmdline_path).map_err(|source| StageError::ReadInput {
        path: plan.cmdline_path.clone(),
        source: Box::new(source),
    })?;
    fx.event_log
        .measure(
            fx.register,
            EventKind::KernelCmdline,
            Digest::of(&cmdline),
            plan.cmdline_path.display().to_string(),
        )
        .map_err(|e| StageError::Extend(Box::new(e)))?;

    let measurement = measure_bundle(plan, fx)?;
    fx.event_log
        .measure(
            fx.register,
            EventKind::Bundle,
            measurement.bundle_digest,
            plan.bundle.display().to_string(),
        )
        .map_err(|e| StageError::Extend(Box::new(e)))?;
    let flare = match &plan.flare {
        Some(kit) => Some(verify_flare_kit(plan, kit, fx)?),
        None => None,
    };
    check_pin(plan, fx, &measurement)?;

    Ok(json!({
        "bundle": plan.bundle,
        "bundle_digest": measurement.bundle_digest,
        "entries": measurement.manifest.entries.len(),
        "pinned": plan.expected.is_some(),
        "source": plan.source,
        "flare": flare,
        "register": fx.register.name(),
        "register_initial": fx.event_log.register_initial(),
        "events": fx.event_log.events(),
    }))
}

/// Runs the measure stage without mounting anything: the bundle is measured where it is
/// (same digest as `copy`, which hashes the same bytes), every event goes through
/// `fx.register`. Used to compute reference values (with a simulated PCR) and by the
/// operator's `attest` dry run (with the TEE's register). Never used by a boot: measuring a
/// host disk in place and then running from it would reopen the time-of-check gap that
/// `copy` closes.
pub fn apply_in_place(plan: &Plan, fx: &mut Effects<'_>) -> Result<Value, StageError> {
    let mut plan = plan.clone();
    plan.source = Source::InPlace;
    apply(&plan, fx)
}

fn measure_bundle(plan: &Plan, fx: &mut Effects<'_>) -> Result<Measurement, StageError> {
    let wrap = |source: MeasureError| StageError::Measure {
        bundle: plan.bundle.clone(),
        source: Box::new(source),
    };
    match &plan.source {
        Source::InPlace => fx.measurer.in_place(&plan.bundle).map_err(wrap),
        Source::Copy { into } => {
            let sys_err = |source| StageError::Sys {
                stage: "measure",
                source: Box::new(source),
            };
            fx.sys.mkdir_all(into).map_err(sys_err)?;
            fx.sys.mount_tmpfs(into, COPY_TMPFS_MODE).map_err(sys_err)?;
            let measurement = fx.measurer.copy(&plan.bundle, into).map_err(wrap)?;
            fx.sys.remount_readonly(into).map_err(sys_err)?;
            Ok(measurement)
        }
    }
}

/// Verifies the startup kit where the workload will read it (the copy, with `copy`), then
/// extends the root CA digest and the kit listing's digest. Returns the record's details:
/// the listing itself, so an auditor can recompute the `flare-kit` event.
fn verify_flare_kit(
    plan: &Plan,
    kit: &FlareKit,
    fx: &mut Effects<'_>,
) -> Result<Value, StageError> {
    let root = match &plan.source {
        Source::InPlace => &plan.bundle,
        Source::Copy { into } => into,
    };
    let dir = if kit.startup_kit.as_os_str().is_empty() {
        root.clone()
    } else {
        root.join(&kit.startup_kit)
    };
    let verified = fx
        .measurer
        .flare_kit(&dir, &kit.root_ca_sha256, &kit.withheld)
        .map_err(|source| StageError::Measure {
            bundle: plan.bundle.clone(),
            source: Box::new(source),
        })?;
    fx.event_log
        .measure(
            fx.register,
            EventKind::FlareRootCa,
            verified.root_ca_sha256,
            dir.join(crate::measure::flare::ROOT_CA_FILE)
                .display()
                .to_string(),
        )
        .map_err(|e| StageError::Extend(Box::new(e)))?;
    let (files, dirs, withheld) = verified.counts();
    let listing = verified.listing();
    let digest = Digest::of(listing.as_bytes());
    fx.event_log
        .measure(
            fx.register,
            EventKind::FlareKit,
            digest,
            format!(
                "{} ({files} files, {dirs} directories, {withheld} withheld)",
                dir.display()
            ),
        )
        .map_err(|e| StageError::Extend(Box::new(e)))?;
    Ok(json!({
        "startup_kit": dir,
        "root_ca_sha256": verified.root_ca_sha256,
        "listing_digest": digest,
        "files": files,
        "directories": dirs,
        "withheld": kit.withheld,
        "listing": listing,
    }))
}

fn check_pin(plan: &Plan, fx: &Effects<'_>, measured: &Measurement) -> Result<(), StageError> {
    let Some(expected) = plan.expected else {
        return Ok(());
    };
    if expected == measured.bundle_digest {
        return Ok(());
    }
    let reference = match &plan.reference_manifest {
        Some(path) => Some(
            fx.measurer
                .reference(path)
                .map_err(|source| StageError::Measure {
                    bundle: plan.bundle.clone(),
                    source: Box::new(source),
                })?,
        ),
        None => None,
    };
    Err(StageError::Measure {
        bundle: plan.bundle.clone(),
        source: Box::new(MeasureError::mismatch(
            expected,
            measured,
            reference.as_ref(),
        )),
    })
}
