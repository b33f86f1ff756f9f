//! Stage 6, launch: the workload's launch plan (identity, environment, limits). The runner
//! writes the separator event and the pre-launch audit records; the process shape (PID 1
//! supervisor or `execve`) is chosen by the caller of [`crate::boot`].

use super::StageError;
use crate::launch::LaunchPlan;
use crate::policy::{BundleSource, Policy};

/// The launch stage's plan is the launch module's plan.
pub type Plan = LaunchPlan;

/// Plans the launch. Pure: `exec` paths inside a `copy` bundle are rewritten to the copy, so
/// the workload runs from the measured bytes.
pub fn plan(policy: &Policy) -> Result<Plan, StageError> {
    let workload = &policy.workload;
    let exec_root = match &workload.source {
        BundleSource::Copy { into } => Some((workload.bundle.as_path(), into.as_path())),
        BundleSource::Initramfs | BundleSource::Verity => None,
    };
    crate::launch::plan(workload, exec_root).map_err(|e| StageError::Launch(Box::new(e)))
}
