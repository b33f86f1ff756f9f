//! `cvm-warden policy check` and `cvm-warden plan` against a bundle on disk: `exec[0]` in the
//! bundle must be an executable regular file (exit 2 with the path and a hint otherwise).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_cvm-warden");

/// A bundle with `startup/start.sh` (0755), `startup/config.json` (0644) and a directory,
/// and the image's user database.
struct Setup {
    dir: tempfile::TempDir,
}

impl Setup {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let startup = dir.path().join("bundle/startup");
        std::fs::create_dir_all(startup.join("dir")).unwrap();
        for (name, mode) in [("start.sh", 0o755), ("config.json", 0o644)] {
            std::fs::write(startup.join(name), "#!/bin/sh\n").unwrap();
            std::fs::set_permissions(startup.join(name), std::fs::Permissions::from_mode(mode))
                .unwrap();
        }
        std::fs::write(
            dir.path().join("passwd"),
            "root:x:0:0::/root:/bin/sh\nflare:x:1000:1000::/home/flare:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("group"), "root:x:0:\nflare:x:1000:\n").unwrap();
        Self { dir }
    }

    fn bundle(&self) -> PathBuf {
        self.dir.path().join("bundle")
    }

    /// Writes a policy whose bundle is `bundle` and whose `exec[0]` is `exec`.
    fn policy(&self, bundle: &Path, source: &str, exec: &str) -> PathBuf {
        let path = self.dir.path().join("policy.toml");
        std::fs::write(
            &path,
            format!(
                "attestation = \"none\"\n\n[workload]\nbundle = \"{}\"\n{source}\nexec = [\"{exec}\", \"--once\"]\nuser = \"flare\"\n",
                bundle.display()
            ),
        )
        .unwrap();
        path
    }

    /// Runs `cvm-warden ARGS… --passwd P --group G`; (exit code, stdout, stderr).
    fn run(&self, args: &[&str], policy: &Path) -> (i32, String, String) {
        let out = Command::new(BIN)
            .args(args)
            .arg(policy)
            .arg("--passwd")
            .arg(self.dir.path().join("passwd"))
            .arg("--group")
            .arg(self.dir.path().join("group"))
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// `policy check` and `plan` on the same policy.
    fn both(&self, policy: &Path) -> [(i32, String, String); 2] {
        [
            self.run(&["policy", "check"], policy),
            self.run(&["plan", "--policy"], policy),
        ]
    }
}

const INITRAMFS: &str = "source = \"initramfs\"";

#[test]
fn an_executable_program_in_the_bundle_passes() {
    let setup = Setup::new();
    let bundle = setup.bundle();
    let exec = format!("{}/startup/start.sh", bundle.display());
    for (code, stdout, stderr) in setup.both(&setup.policy(&bundle, INITRAMFS, &exec)) {
        assert_eq!(code, 0, "{stderr}");
        assert!(stderr.is_empty(), "{stderr}");
        serde_json::from_str::<serde_json::Value>(&stdout).unwrap();
    }
    // With source = "copy", exec[0] names the copy; the bundle's file is checked.
    let copy = "source = \"copy\"\ncopy_to = \"/run/cvm-warden/bundle\"";
    let policy = setup.policy(&bundle, copy, "/run/cvm-warden/bundle/startup/start.sh");
    for (code, _, stderr) in setup.both(&policy) {
        assert_eq!(code, 0, "{stderr}");
    }
}

#[test]
fn a_program_that_is_not_an_executable_regular_file_exits_2() {
    let setup = Setup::new();
    let bundle = setup.bundle();
    let b = bundle.display().to_string();
    for (exec, why) in [
        (
            format!("{b}/startup/config.json"),
            "is not executable (mode 0644); make it executable in the bundle (chmod +x) before the bundle is measured".to_string(),
        ),
        (
            format!("{b}/startup/missing.sh"),
            format!(": \"{b}/startup/missing.sh\" does not exist; put the program into the bundle \"{b}\" or correct the path"),
        ),
        (
            format!("{b}/startup/dir"),
            "is a directory, not a program; name the program file itself".to_string(),
        ),
    ] {
        for (code, stdout, stderr) in setup.both(&setup.policy(&bundle, INITRAMFS, &exec)) {
            assert_eq!(code, 2, "{exec}: {stderr}");
            assert!(stdout.is_empty(), "{stdout}");
            let sep = if why.starts_with(':') { "" } else { " " };
            assert_eq!(stderr, format!("error: workload.exec[0]: \"{exec}\"{sep}{why}\n"));
        }
    }
    // A link out of the bundle, through the copy's path.
    std::os::unix::fs::symlink("/bin/sh", bundle.join("startup/sh")).unwrap();
    let copy = "source = \"copy\"";
    let policy = setup.policy(&bundle, copy, "/run/cvm-warden/bundle/startup/sh");
    for (code, _, stderr) in setup.both(&policy) {
        assert_eq!(code, 2, "{stderr}");
        assert_eq!(
            stderr,
            format!("error: workload.exec[0]: \"/run/cvm-warden/bundle/startup/sh\": \"{b}/startup/sh\" is a symlink to \"/bin/sh\", which leaves the bundle (the measure stage refuses it); make it a relative link inside the bundle, or put the program itself there\n")
        );
    }
}

#[test]
fn a_bundle_that_is_not_here_is_noted_not_refused() {
    let setup = Setup::new();
    let gone = setup.dir.path().join("elsewhere");
    let exec = format!("{}/startup/start.sh", gone.display());
    for (code, stdout, stderr) in setup.both(&setup.policy(&gone, INITRAMFS, &exec)) {
        assert_eq!(code, 0, "{stderr}");
        assert!(!stdout.is_empty());
        assert_eq!(
            stderr,
            format!("note: workload.bundle \"{}\" is not on this machine, so exec[0] was not checked; run this where the bundle is to check it\n", gone.display())
        );
    }
    // A program outside the bundle is the image's: not checked here.
    let policy = setup.policy(&setup.bundle(), INITRAMFS, "/nonexistent/python3");
    for (code, _, stderr) in setup.both(&policy) {
        assert_eq!(code, 0, "{stderr}");
        assert!(stderr.is_empty(), "{stderr}");
    }
}

/// `plan` lists the kernel modules the boot will load and what needs each: the list the
/// image must carry.
#[test]
fn plan_lists_the_kernel_modules_the_policy_needs() {
    let setup = Setup::new();
    let bundle = setup.bundle();
    let exec = format!("{}/startup/start.sh", bundle.display());
    let policy = setup.policy(&bundle, INITRAMFS, &exec);
    let text = std::fs::read_to_string(&policy).unwrap();
    std::fs::write(
        &policy,
        format!("{text}\n[network]\n\n[kernel]\nmodules = [\"virtio-net\"]\n"),
    )
    .unwrap();
    let (code, stdout, stderr) = setup.run(&["plan", "--policy"], &policy);
    assert_eq!(code, 0, "{stderr}");
    let plan: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let modules: Vec<(&str, &str)> = plan["modules"]["load"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["name"].as_str().unwrap(),
                m["needed_by"][0].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        modules,
        [
            ("virtio_net", "kernel.modules"),
            ("nf_tables", "[network]"),
            ("nf_conntrack", "[network]"),
            ("nft_ct", "[network]"),
            ("crc32c_generic", "[network]"),
        ]
    );
    assert!(plan["stages"]["perimeter"].is_object());
}

/// Errors are printed once, as `error:` and a `because:` line per cause, exit 2 for an
/// invalid policy.
#[test]
fn an_invalid_policy_prints_one_error_chain_and_exits_2() {
    let setup = Setup::new();
    let missing = setup.dir.path().join("missing.toml");
    let (code, stdout, stderr) = setup.run(&["plan", "--policy"], &missing);
    assert_eq!(code, 2, "{stderr}");
    assert!(stdout.is_empty());
    assert!(
        stderr.starts_with("error: cannot read the policy file"),
        "{stderr}"
    );
    assert!(stderr.contains("\n  because: "), "{stderr}");
    assert_eq!(stderr.matches("error:").count(), 1, "{stderr}");
}
