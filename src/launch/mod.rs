//! Launching the workload, in either process shape.
//!
//! - [`plan`] turns the validated `[workload]` policy into a [`LaunchPlan`] (pure; printed by
//!   `cvm-warden plan`).
//! - Unit shape: [`exec`] drops every privilege and `execve`s the workload; it returns only on
//!   failure.
//! - PID 1 shape: [`early_mounts`] first, then [`supervise`] forks the workload, reaps every
//!   child, forwards signals and applies the restart policy; [`shutdown`] ends the machine (or
//!   the sandbox). [`install_panic_hook`] turns a panic into an audit record and a shutdown.
//!
//! The privilege drop itself (its order and the reasons for it) is in
//! [`crate::sys::process::drop_privileges_and_exec`], the one program the forked child runs.

mod mounts;
pub mod power;
pub mod relay;
mod shutdown;
mod supervise;

use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::sys::resource::Resource;
use serde::{Serialize, Serializer};

use crate::policy::{Restart, Rlimit, RlimitResource, Workload};
use crate::sys::process::{CapSet, ExecFailure, ExecInputError, ExecSpec, Step};
use crate::sys::SysError;

pub use mounts::{
    early_mount_table, early_mounts, mount_configfs, EarlyMounts, MountSpec, CONFIGFS, DEV_LINKS,
};
pub use shutdown::{
    install_panic_hook, panic_message, prepare_shutdown, shutdown, shutdown_plan, ShutdownAction,
};
pub use supervise::{exit_code_from_wait_status, supervise, Next, Periodic, WorkloadExit};

/// Why the workload could not be planned, started or supervised.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// `exec` is empty.
    #[error("workload.exec is empty; hint: give the program and its arguments")]
    EmptyExec,
    /// `exec[0]` is not an absolute path (there is no `PATH` search).
    #[error("workload.exec[0] {path:?} is not an absolute path; hint: there is no PATH search, write the full path")]
    RelativeExec {
        /// The program.
        path: String,
    },
    /// The working directory is not absolute.
    #[error("workload.workdir {} is not an absolute path", path.display())]
    RelativeWorkdir {
        /// The directory.
        path: PathBuf,
    },
    /// A path contains `..`, which could leave the (copied) bundle.
    #[error("{what} {} contains \"..\"; hint: write the path without \"..\"", path.display())]
    ParentDir {
        /// Which input.
        what: &'static str,
        /// The path.
        path: PathBuf,
    },
    /// The workload would run as root.
    #[error("workload identity uid {uid} gid {gid} is root; the workload must not run as root")]
    Root {
        /// uid.
        uid: u32,
        /// gid.
        gid: u32,
    },
    /// An environment variable name cannot be passed to a program.
    #[error("workload.env name {name:?} is empty or contains '='")]
    EnvName {
        /// The name.
        name: String,
    },
    /// An rlimit's soft limit is above its hard limit.
    #[error("workload rlimit {resource:?}: soft limit {soft} is above hard limit {hard}")]
    RlimitOrder {
        /// Which resource.
        resource: RlimitResource,
        /// Soft limit.
        soft: u64,
        /// Hard limit.
        hard: u64,
    },
    /// A launch input cannot be passed to `execve`.
    #[error("workload launch input")]
    Input(#[source] ExecInputError),
    /// The program or working directory is unusable (checked before privileges are dropped
    /// in the unit shape, where a failed `execve` leaves cvm-warden unprivileged).
    #[error("workload {what} {} is unusable; hint: it must exist in the image or the (copied) bundle", path.display())]
    Preflight {
        /// `program` or `workdir`.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A step of the privilege drop failed.
    #[error("drop privileges for the workload: {step}")]
    Drop {
        /// The step and its inputs, e.g. `setresuid to 65534`.
        step: String,
        /// Why.
        #[source]
        source: Errno,
    },
    /// A privilege was still held after the drop; the workload was not started.
    #[error("privilege drop did not hold: {what}; the workload was not started")]
    Verify {
        /// What was found.
        what: String,
    },
    /// `execve` of the workload failed.
    #[error("execve {}", path.display())]
    Exec {
        /// The program.
        path: PathBuf,
        /// Why.
        #[source]
        source: Errno,
    },
    /// The child ended before `execve` without saying why.
    #[error("the workload's process for {} ended before execve without a report", path.display())]
    ChildLost {
        /// The program.
        path: PathBuf,
    },
    /// The supervisor's own system calls failed.
    #[error("supervise the workload")]
    Supervise(#[source] SysError),
}

/// How the workload is started: exactly what `execve` and the privilege drop get. Printed by
/// `cvm-warden plan` and recorded in the audit log before launch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LaunchPlan {
    /// Program and arguments; `argv[0]` is the absolute path executed.
    pub argv: Vec<String>,
    /// The complete environment (nothing is inherited).
    pub env: Vec<(String, String)>,
    /// User name, for records only.
    pub user: String,
    /// Real, effective and saved uid.
    pub uid: u32,
    /// Real, effective and saved gid; there are no supplementary groups.
    pub gid: u32,
    /// Working directory.
    pub workdir: PathBuf,
    /// File-mode creation mask (printed in octal).
    #[serde(serialize_with = "octal")]
    pub umask: u32,
    /// Resource limits, applied in this order.
    pub rlimits: Vec<Rlimit>,
    /// Restart policy (PID 1 shape only).
    pub restart: Restart,
}

fn octal<S: Serializer>(value: &u32, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&format!("{value:04o}"))
}

fn has_parent_dir(path: &Path) -> bool {
    path.components().any(|c| c == Component::ParentDir)
}

/// `path` moved from under `bundle` to under `copy`, when it lies under `bundle`.
fn rebase(path: &Path, bundle: &Path, copy: &Path) -> Option<PathBuf> {
    if !path.is_absolute() || has_parent_dir(path) {
        return None;
    }
    let rest = path.strip_prefix(bundle).ok()?;
    Some(if rest.as_os_str().is_empty() {
        copy.to_path_buf()
    } else {
        copy.join(rest)
    })
}

/// Plans the launch. Pure: no I/O.
///
/// `exec_root = Some((bundle, copy))` is for `source = "copy"`: every `exec` element that is
/// an absolute path under the bundle (`exec[0]`, and also arguments such as a script given to
/// an interpreter) and a working directory under the bundle are rewritten to the copy, so that
/// the workload only ever reads the measured bytes.
///
/// Re-checks the invariants that the privilege drop relies on (absolute program, no root, no
/// NUL bytes) even though the policy validation already did: a violation here would be a
/// security bug, not a user error.
pub fn plan(
    workload: &Workload,
    exec_root: Option<(&Path, &Path)>,
) -> Result<LaunchPlan, LaunchError> {
    let program = workload.exec.first().ok_or(LaunchError::EmptyExec)?;
    if !Path::new(program).is_absolute() {
        return Err(LaunchError::RelativeExec {
            path: program.clone(),
        });
    }
    if has_parent_dir(Path::new(program)) {
        return Err(LaunchError::ParentDir {
            what: "workload.exec[0]",
            path: PathBuf::from(program),
        });
    }
    if !workload.workdir.is_absolute() {
        return Err(LaunchError::RelativeWorkdir {
            path: workload.workdir.clone(),
        });
    }
    if has_parent_dir(&workload.workdir) {
        return Err(LaunchError::ParentDir {
            what: "workload.workdir",
            path: workload.workdir.clone(),
        });
    }
    let (uid, gid) = (workload.user.uid, workload.user.gid);
    if uid == 0 || gid == 0 {
        return Err(LaunchError::Root { uid, gid });
    }
    if let Some((name, _)) = workload
        .env
        .iter()
        .find(|(name, _)| name.is_empty() || name.contains('='))
    {
        return Err(LaunchError::EnvName { name: name.clone() });
    }
    if let Some(limit) = workload.rlimits.iter().find(|l| l.soft > l.hard) {
        return Err(LaunchError::RlimitOrder {
            resource: limit.resource,
            soft: limit.soft,
            hard: limit.hard,
        });
    }

    let mut argv = workload.exec.clone();
    let mut workdir = workload.workdir.clone();
    if let Some((bundle, copy)) = exec_root {
        for arg in &mut argv {
            if let Some(moved) = rebase(Path::new(arg.as_str()), bundle, copy) {
                if let Ok(moved) = moved.into_os_string().into_string() {
                    *arg = moved;
                }
            }
        }
        if let Some(moved) = rebase(&workdir, bundle, copy) {
            workdir = moved;
        }
    }
    let plan = LaunchPlan {
        argv,
        env: workload.env.clone(),
        user: workload.user.name.clone(),
        uid,
        gid,
        workdir,
        umask: workload.umask,
        rlimits: workload.rlimits.clone(),
        restart: workload.restart,
    };
    // NUL bytes: the same conversion that exec uses, so plan and exec cannot disagree.
    exec_spec(&plan)?;
    Ok(plan)
}

use crate::report::error_chain as chain;

fn resource(resource: RlimitResource) -> Resource {
    match resource {
        RlimitResource::Nofile => Resource::RLIMIT_NOFILE,
        RlimitResource::Nproc => Resource::RLIMIT_NPROC,
        RlimitResource::Core => Resource::RLIMIT_CORE,
        RlimitResource::As => Resource::RLIMIT_AS,
        RlimitResource::Fsize => Resource::RLIMIT_FSIZE,
        RlimitResource::Stack => Resource::RLIMIT_STACK,
        RlimitResource::Memlock => Resource::RLIMIT_MEMLOCK,
    }
}

/// The launch plan as C data for the privilege drop.
fn exec_spec(plan: &LaunchPlan) -> Result<ExecSpec, LaunchError> {
    let rlimits: Vec<_> = plan
        .rlimits
        .iter()
        .map(|l| (resource(l.resource), l.soft, l.hard))
        .collect();
    ExecSpec::new(
        &plan.argv,
        &plan.env,
        &plan.workdir,
        plan.uid,
        plan.gid,
        plan.umask,
        &rlimits,
    )
    .map_err(LaunchError::Input)
}

fn program(plan: &LaunchPlan) -> PathBuf {
    PathBuf::from(plan.argv.first().map(String::as_str).unwrap_or_default())
}

/// What a failed step was doing, with its inputs.
fn describe_step(plan: &LaunchPlan, step: Step) -> String {
    match step {
        Step::BlockSignals => "block signals".to_owned(),
        Step::SignalDefaults => "reset signal dispositions to their defaults".to_owned(),
        Step::Rlimit(i) => match plan.rlimits.get(i as usize) {
            Some(l) => format!("setrlimit {:?} soft {} hard {}", l.resource, l.soft, l.hard),
            None => format!("setrlimit #{i}"),
        },
        Step::Chdir => format!("chdir to {}", plan.workdir.display()),
        Step::Setgroups => "clear supplementary groups (setgroups [])".to_owned(),
        Step::Setresgid => format!("setresgid to {}", plan.gid),
        Step::DropBounding(cap) => format!("drop capability {cap} from the bounding set"),
        Step::ClearAmbient => "clear the ambient capability set".to_owned(),
        Step::KeepCaps => "PR_SET_KEEPCAPS 0".to_owned(),
        Step::Setresuid => format!("setresuid to {}", plan.uid),
        Step::ClearCapabilities => {
            "clear the effective, permitted and inheritable capability sets".to_owned()
        }
        Step::VerifyIds => "read back user and group ids".to_owned(),
        Step::VerifyGroups => "read back supplementary groups".to_owned(),
        Step::VerifyCapabilities(set) => format!("read back {}", set.status_name()),
        Step::NoNewPrivs => "PR_SET_NO_NEW_PRIVS".to_owned(),
        Step::CloseFds => "mark inherited fds close-on-exec (close_range)".to_owned(),
        Step::UnblockSignals => "unblock signals".to_owned(),
        Step::Execve => format!("execve {}", program(plan).display()),
        Step::Stdio(fd) => format!("connect the workload's fd {fd} to the relay pipe (dup2)"),
    }
}

/// Turns the child's (or this process's) failure report into an error naming the step.
fn failure_error(plan: &LaunchPlan, failure: ExecFailure) -> LaunchError {
    match (failure.step, failure.errno) {
        (Step::Execve, Some(source)) => LaunchError::Exec {
            path: program(plan),
            source,
        },
        (Step::Execve, None) => LaunchError::ChildLost {
            path: program(plan),
        },
        (step, Some(source)) => LaunchError::Drop {
            step: describe_step(plan, step),
            source,
        },
        (Step::VerifyIds, None) => LaunchError::Verify {
            what: format!(
                "an id is {}, expected uid {} and gid {}",
                failure.detail, plan.uid, plan.gid
            ),
        },
        (Step::VerifyGroups, None) => LaunchError::Verify {
            what: format!("{} supplementary groups remain", failure.detail),
        },
        (Step::VerifyCapabilities(set), None) => LaunchError::Verify {
            what: format!(
                "{} is {:016x}, expected 0",
                set.status_name(),
                failure.detail
            ),
        },
        (step, None) => LaunchError::Verify {
            what: describe_step(plan, step),
        },
    }
}

/// Unit shape: drops every privilege of this process and `execve`s the workload. Returns only
/// on failure (Firecracker's `exec_command` style): the caller records it and exits non-zero.
///
/// The program and working directory are checked first, while cvm-warden can still write its
/// audit records as root; a failure after the drop leaves this process unprivileged.
pub fn exec(plan: &LaunchPlan) -> LaunchError {
    let spec = match exec_spec(plan) {
        Ok(spec) => spec,
        Err(error) => return error,
    };
    let path = program(plan);
    if let Err(source) = std::fs::metadata(&path).and_then(|meta| {
        use std::os::unix::fs::PermissionsExt;
        if meta.is_file() && meta.permissions().mode() & 0o111 != 0 {
            Ok(())
        } else {
            Err(std::io::Error::from_raw_os_error(libc::EACCES))
        }
    }) {
        return LaunchError::Preflight {
            what: "program",
            path,
            source,
        };
    }
    if let Err(source) = std::fs::read_dir(&plan.workdir) {
        return LaunchError::Preflight {
            what: "workdir",
            path: plan.workdir.clone(),
            source,
        };
    }
    failure_error(plan, crate::sys::process::drop_privileges_and_exec(&spec))
}

/// The capability sets of the calling thread in `/proc/PID/status` order and naming
/// (`CapEff`, `CapPrm`, `CapInh`, `CapBnd`, `CapAmb`); for diagnostics and tests.
pub fn capability_report() -> Vec<(&'static str, Option<u64>)> {
    let sets = crate::sys::process::capability_sets().ok();
    [
        CapSet::Effective,
        CapSet::Permitted,
        CapSet::Inheritable,
        CapSet::Bounding,
        CapSet::Ambient,
    ]
    .into_iter()
    .enumerate()
    .map(|(i, set)| (set.status_name(), sets.map(|s| s[i])))
    .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::policy::{BundleSource, Identity};

    fn workload() -> Workload {
        Workload {
            bundle: "/opt/flare".into(),
            source: BundleSource::Copy {
                into: "/run/cvm-warden/bundle".into(),
            },
            digest: None,
            manifest: None,
            exec: vec![
                "/opt/flare/startup/sub_start.sh".into(),
                "--once".into(),
                "/opt/flare/app.py".into(),
                "/opt/flarex/other".into(),
            ],
            user: Identity {
                name: "flare".into(),
                uid: 1000,
                gid: 1001,
            },
            env: vec![("PATH".into(), "/usr/bin:/bin".into())],
            workdir: "/opt/flare/work".into(),
            umask: 0o077,
            rlimits: vec![Rlimit {
                resource: RlimitResource::Nofile,
                soft: 1024,
                hard: 4096,
            }],
            restart: Restart::OnFailure { max: 3 },
            flare: None,
        }
    }

    #[test]
    fn plan_copies_the_policy_without_exec_root() {
        let plan = plan(&workload(), None).unwrap();
        assert_eq!(plan.argv, workload().exec);
        assert_eq!(plan.env, workload().env);
        assert_eq!((plan.uid, plan.gid), (1000, 1001));
        assert_eq!(plan.workdir, PathBuf::from("/opt/flare/work"));
        assert_eq!(plan.umask, 0o077);
        assert_eq!(plan.restart, Restart::OnFailure { max: 3 });
    }

    #[test]
    fn copy_bundle_rewrites_paths_under_the_bundle_only() {
        let plan = plan(
            &workload(),
            Some((Path::new("/opt/flare"), Path::new("/run/cvm-warden/bundle"))),
        )
        .unwrap();
        assert_eq!(
            plan.argv,
            vec![
                "/run/cvm-warden/bundle/startup/sub_start.sh",
                "--once",
                "/run/cvm-warden/bundle/app.py",
                "/opt/flarex/other",
            ]
        );
        assert_eq!(plan.workdir, PathBuf::from("/run/cvm-warden/bundle/work"));
    }

    #[test]
    fn workdir_outside_the_bundle_is_kept() {
        let mut w = workload();
        w.workdir = "/workspace".into();
        let plan = plan(&w, Some((Path::new("/opt/flare"), Path::new("/copy")))).unwrap();
        assert_eq!(plan.workdir, PathBuf::from("/workspace"));
        assert_eq!(
            rebase(
                Path::new("/opt/flare"),
                Path::new("/opt/flare"),
                Path::new("/c")
            ),
            Some("/c".into())
        );
    }

    #[test]
    fn plan_serializes_umask_in_octal() {
        let json = serde_json::to_value(plan(&workload(), None).unwrap()).unwrap();
        assert_eq!(json["umask"], "0077");
        assert_eq!(json["env"][0][0], "PATH");
        assert_eq!(json["restart"]["mode"], "on-failure");
    }

    fn error_of(w: &Workload) -> String {
        plan(w, None).unwrap_err().to_string()
    }

    #[test]
    fn plan_refuses_what_the_privilege_drop_cannot_do_safely() {
        let mut w = workload();
        w.exec.clear();
        assert_eq!(
            error_of(&w),
            "workload.exec is empty; hint: give the program and its arguments"
        );

        let mut w = workload();
        w.exec[0] = "start.sh".into();
        assert_eq!(
            error_of(&w),
            "workload.exec[0] \"start.sh\" is not an absolute path; hint: there is no PATH search, write the full path"
        );

        let mut w = workload();
        w.exec[0] = "/opt/flare/../../bin/sh".into();
        assert_eq!(
            error_of(&w),
            "workload.exec[0] /opt/flare/../../bin/sh contains \"..\"; hint: write the path without \"..\""
        );

        let mut w = workload();
        w.user.uid = 0;
        assert_eq!(
            error_of(&w),
            "workload identity uid 0 gid 1001 is root; the workload must not run as root"
        );

        let mut w = workload();
        w.env.push(("A=B".into(), "c".into()));
        assert_eq!(
            error_of(&w),
            "workload.env name \"A=B\" is empty or contains '='"
        );

        let mut w = workload();
        w.rlimits[0].soft = 5000;
        assert_eq!(
            error_of(&w),
            "workload rlimit Nofile: soft limit 5000 is above hard limit 4096"
        );

        let mut w = workload();
        w.exec.push("a\0b".into());
        let error = plan(&w, None).unwrap_err();
        assert_eq!(error.to_string(), "workload launch input");
        assert_eq!(
            std::error::Error::source(&error).unwrap().to_string(),
            "exec[4] contains a NUL byte"
        );

        let mut w = workload();
        w.workdir = "work".into();
        assert_eq!(
            error_of(&w),
            "workload.workdir work is not an absolute path"
        );
    }

    #[test]
    fn child_failures_name_the_step_and_its_inputs() {
        let plan = plan(&workload(), None).unwrap();
        let error = failure_error(
            &plan,
            ExecFailure {
                step: Step::Setresuid,
                errno: Some(Errno::EPERM),
                detail: 0,
            },
        );
        assert_eq!(
            error.to_string(),
            "drop privileges for the workload: setresuid to 1000"
        );
        let error = failure_error(
            &plan,
            ExecFailure {
                step: Step::Rlimit(0),
                errno: Some(Errno::EPERM),
                detail: 0,
            },
        );
        assert_eq!(
            error.to_string(),
            "drop privileges for the workload: setrlimit Nofile soft 1024 hard 4096"
        );
        let error = failure_error(
            &plan,
            ExecFailure {
                step: Step::Execve,
                errno: Some(Errno::ENOENT),
                detail: 0,
            },
        );
        assert_eq!(error.to_string(), "execve /opt/flare/startup/sub_start.sh");
        let error = failure_error(
            &plan,
            ExecFailure {
                step: Step::VerifyCapabilities(CapSet::Bounding),
                errno: None,
                detail: 0x20,
            },
        );
        assert_eq!(
            error.to_string(),
            "privilege drop did not hold: CapBnd is 0000000000000020, expected 0; the workload was not started"
        );
    }

    #[test]
    fn exec_refuses_a_missing_program_before_dropping_anything() {
        let mut w = workload();
        w.exec = vec!["/nonexistent/cvm-warden-test/prog".into()];
        w.workdir = "/".into();
        let plan = plan(&w, None).unwrap();
        let error = exec(&plan);
        assert!(matches!(
            error,
            LaunchError::Preflight {
                what: "program",
                ..
            }
        ));
        // Still privileged as before: nothing was dropped.
        assert!(nix::unistd::getuid().as_raw() == nix::unistd::geteuid().as_raw());
    }
}
