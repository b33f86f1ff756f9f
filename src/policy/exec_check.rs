//! `exec[0]` against the bundle on this machine (`policy check`, `plan`): when the program
//! lies in the bundle, it must be an executable regular file there, reached without leaving
//! the bundle. The launch stage checks the same at boot (`metadata`, regular file, an execute
//! bit), but only after the bundle was measured and keys were released.
//!
//! Read-only: `lstat` and `readlink` below the bundle root, nothing else.

use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use super::types::{BundleSource, Workload};

/// Symlinks followed before the chain counts as a loop (the kernel's limit).
const MAX_SYMLINK_HOPS: u32 = 40;

/// What the check found when nothing is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecCheck {
    /// `exec[0]` is this executable regular file in the bundle.
    InBundle(PathBuf),
    /// `exec[0]` is not in the bundle (e.g. `/usr/bin/python3`): it is the image's, not
    /// checked here.
    OutsideBundle,
    /// The bundle directory is not on this machine, so nothing could be checked.
    BundleAbsent,
}

/// Checks `exec[0]` in the bundle. `exec[0]` is in the bundle when it lies under
/// `workload.bundle`, or, with `source = "copy"`, under `copy_to` (the launch runs the copy,
/// whose bytes are the bundle's). Errors are one line: `workload.exec[0]: …; what to do`.
pub fn check_exec(workload: &Workload) -> Result<ExecCheck, String> {
    let Some(program) = workload.exec.first() else {
        return Ok(ExecCheck::OutsideBundle);
    };
    let program_path = Path::new(program);
    let copy = match &workload.source {
        BundleSource::Copy { into } => program_path.strip_prefix(into).ok(),
        BundleSource::Initramfs | BundleSource::Verity => None,
    };
    let Some(rel) = copy.or_else(|| program_path.strip_prefix(&workload.bundle).ok()) else {
        return Ok(ExecCheck::OutsideBundle);
    };
    let bundle = &workload.bundle;
    match std::fs::metadata(bundle) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => {
            return Err(format!(
                "workload.exec[0]: {program:?} is in workload.bundle {:?}, which is not a directory on this machine; point workload.bundle at the bundle directory",
                bundle.display().to_string()
            ))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(ExecCheck::BundleAbsent),
        Err(e) => {
            return Err(format!(
                "workload.exec[0]: workload.bundle {:?} cannot be read ({e}); check its permissions",
                bundle.display().to_string()
            ))
        }
    }
    let problem = |why: String| format!("workload.exec[0]: {program:?}: {why}");
    let resolved = resolve(bundle, rel).map_err(problem)?;
    // The program, and the bundle's file when that is another path (a copy, a link).
    let shown = resolved.display().to_string();
    let subject = if resolved == program_path {
        format!("{program:?}")
    } else {
        format!("{program:?} (in the bundle {shown:?})")
    };
    let fail = |why: &str| Err(format!("workload.exec[0]: {subject} {why}"));
    let meta = match std::fs::symlink_metadata(&resolved) {
        Ok(meta) => meta,
        Err(e) => return fail(&format!("cannot be read ({e}); check its permissions")),
    };
    if meta.is_dir() {
        return fail("is a directory, not a program; name the program file itself");
    }
    if !meta.is_file() {
        return fail("is not a regular file; put the program itself into the bundle");
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o111 == 0 {
        return fail(&format!(
            "is not executable (mode {mode:04o}); make it executable in the bundle (chmod +x) before the bundle is measured"
        ));
    }
    Ok(ExecCheck::InBundle(resolved))
}

/// Resolves `rel` below `root` as the kernel would, following the bundle's own symlinks, and
/// fails when a step leaves the bundle (an absolute link target, `..` above the root), a
/// component is missing or not a directory, or the chain loops. Returns the final path (not
/// a symlink).
fn resolve(root: &Path, rel: &Path) -> Result<PathBuf, String> {
    // Components still to resolve, last first.
    let mut pending: Vec<OsString> = Vec::new();
    push(&mut pending, rel);
    let mut dir: Vec<OsString> = Vec::new();
    let mut hops = 0;
    let here = |dir: &[OsString]| -> PathBuf {
        let mut path = root.to_path_buf();
        path.extend(dir);
        path
    };
    while let Some(component) = pending.pop() {
        if component == ".." {
            if dir.pop().is_none() {
                return Err(format!(
                    "it resolves above the bundle root {:?}; name a program inside the bundle",
                    root.display().to_string()
                ));
            }
            continue;
        }
        dir.push(component);
        let path = here(&dir);
        let shown = path.display().to_string();
        let meta = match std::fs::symlink_metadata(&path) {
            Ok(meta) => meta,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(format!(
                    "{shown:?} does not exist; put the program into the bundle {:?} or correct the path",
                    root.display().to_string()
                ))
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => {
                return Err(format!(
                    "{:?} is not a directory; correct the path",
                    here(dir.split_last().map_or(&[][..], |(_, above)| above))
                        .display()
                        .to_string()
                ))
            }
            Err(e) => return Err(format!("{shown:?} cannot be read ({e}); check its permissions")),
        };
        if meta.file_type().is_symlink() {
            hops += 1;
            if hops > MAX_SYMLINK_HOPS {
                return Err(format!(
                    "more than {MAX_SYMLINK_HOPS} symlinks in its chain (a loop?); point it at the program itself"
                ));
            }
            let target = std::fs::read_link(&path)
                .map_err(|e| format!("symlink {shown:?} cannot be read ({e})"))?;
            if target.is_absolute() {
                return Err(format!(
                    "{shown:?} is a symlink to {:?}, which leaves the bundle (the measure stage refuses it); make it a relative link inside the bundle, or put the program itself there",
                    target.display().to_string()
                ));
            }
            dir.pop();
            push(&mut pending, &target);
        } else if !pending.is_empty() && !meta.is_dir() {
            return Err(format!("{shown:?} is not a directory; correct the path"));
        }
    }
    Ok(here(&dir))
}

/// Pushes the components of `path` onto `pending` so that the first is popped first.
fn push(pending: &mut Vec<OsString>, path: &Path) {
    let start = pending.len();
    pending.extend(path.components().filter_map(|c| match c {
        Component::Normal(name) => Some(name.to_os_string()),
        Component::ParentDir => Some(OsString::from("..")),
        Component::RootDir | Component::CurDir | Component::Prefix(_) => None,
    }));
    pending[start..].reverse();
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;
    use crate::policy::{Identity, Restart};

    fn workload(bundle: &Path, source: BundleSource, exec: &str) -> Workload {
        Workload {
            bundle: bundle.to_path_buf(),
            source,
            digest: None,
            manifest: None,
            exec: vec![exec.to_string(), "--once".to_string()],
            user: Identity {
                name: "flare".to_string(),
                uid: 1000,
                gid: 1000,
            },
            env: Vec::new(),
            workdir: PathBuf::from("/"),
            umask: 0o077,
            rlimits: Vec::new(),
            restart: Restart::Never,
            flare: None,
        }
    }

    fn file(path: &Path, mode: u32) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    /// A bundle with an executable, a plain file, a directory and links.
    fn bundle() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let b = dir.path();
        file(&b.join("startup/start.sh"), 0o755);
        file(&b.join("startup/owner-only.sh"), 0o700);
        file(&b.join("startup/config.json"), 0o644);
        std::fs::create_dir_all(b.join("lib")).unwrap();
        symlink("start.sh", b.join("startup/run")).unwrap();
        symlink("../startup", b.join("lib/up")).unwrap();
        symlink("/bin/sh", b.join("startup/shell")).unwrap();
        symlink("../../..", b.join("startup/escape")).unwrap();
        symlink("loop-b", b.join("loop-a")).unwrap();
        symlink("loop-a", b.join("loop-b")).unwrap();
        dir
    }

    fn check(bundle: &Path, exec: &str) -> Result<ExecCheck, String> {
        check_exec(&workload(bundle, BundleSource::Initramfs, exec))
    }

    #[test]
    fn an_executable_in_the_bundle_passes_also_through_inner_links() {
        let dir = bundle();
        let b = dir.path();
        let at = |p: &str| format!("{}/{p}", b.display());
        let start = b.join("startup/start.sh");
        for exec in [
            "startup/start.sh",
            "startup/run",
            "lib/up/run",
            "startup/./start.sh",
        ] {
            assert_eq!(
                check(b, &at(exec)),
                Ok(ExecCheck::InBundle(start.clone())),
                "{exec}"
            );
        }
        assert_eq!(
            check(b, &at("startup/owner-only.sh")),
            Ok(ExecCheck::InBundle(b.join("startup/owner-only.sh")))
        );
    }

    #[test]
    fn a_copy_bundle_is_checked_at_the_source() {
        let dir = bundle();
        let b = dir.path();
        let copy = BundleSource::Copy {
            into: PathBuf::from("/run/cvm-warden/bundle"),
        };
        let w = workload(b, copy.clone(), "/run/cvm-warden/bundle/startup/start.sh");
        assert_eq!(
            check_exec(&w),
            Ok(ExecCheck::InBundle(b.join("startup/start.sh")))
        );
        let w = workload(b, copy, "/run/cvm-warden/bundle/startup/config.json");
        assert_eq!(
            check_exec(&w).unwrap_err(),
            format!(
                "workload.exec[0]: \"/run/cvm-warden/bundle/startup/config.json\" (in the bundle \"{}/startup/config.json\") is not executable (mode 0644); make it executable in the bundle (chmod +x) before the bundle is measured",
                b.display()
            )
        );
    }

    #[test]
    fn programs_outside_the_bundle_and_absent_bundles_are_not_checked() {
        let dir = bundle();
        assert_eq!(
            check(dir.path(), "/usr/bin/python3"),
            Ok(ExecCheck::OutsideBundle)
        );
        let gone = dir.path().join("not-here");
        assert_eq!(
            check(&gone, &format!("{}/start.sh", gone.display())),
            Ok(ExecCheck::BundleAbsent)
        );
    }

    #[test]
    fn missing_directories_plain_files_and_escaping_links_are_refused() {
        let dir = bundle();
        let b = dir.path();
        let d = b.display().to_string();
        let err = |p: &str| check(b, &format!("{d}/{p}")).unwrap_err();
        let prefix = |p: &str| format!("workload.exec[0]: \"{d}/{p}\": ");
        assert_eq!(
            err("startup/missing.sh"),
            format!("{}\"{d}/startup/missing.sh\" does not exist; put the program into the bundle \"{d}\" or correct the path", prefix("startup/missing.sh"))
        );
        assert_eq!(
            err("nothing/start.sh"),
            format!("{}\"{d}/nothing\" does not exist; put the program into the bundle \"{d}\" or correct the path", prefix("nothing/start.sh"))
        );
        assert_eq!(
            err("startup"),
            format!("workload.exec[0]: \"{d}/startup\" is a directory, not a program; name the program file itself")
        );
        assert_eq!(
            err("startup/config.json"),
            format!("workload.exec[0]: \"{d}/startup/config.json\" is not executable (mode 0644); make it executable in the bundle (chmod +x) before the bundle is measured")
        );
        symlink("config.json", b.join("startup/config")).unwrap();
        assert_eq!(
            err("startup/config"),
            format!("workload.exec[0]: \"{d}/startup/config\" (in the bundle \"{d}/startup/config.json\") is not executable (mode 0644); make it executable in the bundle (chmod +x) before the bundle is measured")
        );
        nix::unistd::mkfifo(&b.join("startup/fifo"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        assert_eq!(
            err("startup/fifo"),
            format!("workload.exec[0]: \"{d}/startup/fifo\" is not a regular file; put the program itself into the bundle")
        );
        assert_eq!(
            err("startup/start.sh/x"),
            format!(
                "{}\"{d}/startup/start.sh\" is not a directory; correct the path",
                prefix("startup/start.sh/x")
            )
        );
        assert_eq!(
            err("startup/shell"),
            format!("{}\"{d}/startup/shell\" is a symlink to \"/bin/sh\", which leaves the bundle (the measure stage refuses it); make it a relative link inside the bundle, or put the program itself there", prefix("startup/shell"))
        );
        assert_eq!(
            err("startup/escape/bin/sh"),
            format!(
                "{}it resolves above the bundle root \"{d}\"; name a program inside the bundle",
                prefix("startup/escape/bin/sh")
            )
        );
        assert!(
            err("loop-a").contains("more than 40 symlinks"),
            "{}",
            err("loop-a")
        );
        assert_eq!(
            check(b, &d).unwrap_err(),
            format!("workload.exec[0]: \"{d}\" is a directory, not a program; name the program file itself")
        );
        std::fs::remove_dir_all(b.join("lib")).unwrap();
        std::fs::write(b.join("lib"), "").unwrap();
        let w = workload(
            &b.join("lib"),
            BundleSource::Initramfs,
            &format!("{d}/lib/x"),
        );
        assert_eq!(
            check_exec(&w).unwrap_err(),
            format!("workload.exec[0]: \"{d}/lib/x\" is in workload.bundle \"{d}/lib\", which is not a directory on this machine; point workload.bundle at the bundle directory")
        );
    }
}
