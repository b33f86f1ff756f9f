//! `units/`: every unit and drop-in passes `systemd-analyze verify` with no warning.
//!
//! The check runs against a temporary root (`--root`) holding a copy of this machine's
//! system units, our units under `/etc/systemd/system`, the drop-ins under
//! `/etc/systemd/system/<unit>.d/`, stub units for the ones they apply to, and the built `cvm-warden` as `/usr/bin/cvm-warden` (verify checks
//! that `ExecStart=` is executable). `systemd-analyze verify` exits 0 on unknown keys, so any
//! output at all fails the test. A missing `systemd-analyze` fails the test; it is never
//! skipped.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::Command;

const UNITS: [&str; 2] = ["cvm-warden.service", "examples/nvflare-client.service"];

/// The units the drop-ins forbid (the units cvm-warden masks at runtime,
/// `lockdown::MASKED_UNITS`), and the instance `verify` loads for each template.
const FORBIDDEN: [(&str, &str); 15] = [
    ("getty@.service", "getty@tty1.service"),
    ("serial-getty@.service", "serial-getty@ttyS0.service"),
    ("console-getty.service", "console-getty.service"),
    ("container-getty@.service", "container-getty@1.service"),
    ("autovt@.service", "autovt@tty1.service"),
    ("debug-shell.service", "debug-shell.service"),
    ("ssh.service", "ssh.service"),
    ("sshd.service", "sshd.service"),
    ("ssh.socket", "ssh.socket"),
    ("sshd.socket", "sshd.socket"),
    // Debian's per-connection instances (ssh.socket with Accept=yes); the stub is a service.
    ("ssh@.service", "ssh@0.service"),
    ("sshd@.service", "sshd@0.service"),
    ("rescue.service", "rescue.service"),
    ("emergency.service", "emergency.service"),
    ("ctrl-alt-del.target", "ctrl-alt-del.target"),
];

/// A stub of the right kind for `unit`.
fn stub(unit: &str) -> &'static str {
    if unit.ends_with(".socket") {
        "[Unit]\nDescription=stub\nDefaultDependencies=no\n\n[Socket]\nListenStream=22\n"
    } else if unit.ends_with(".target") {
        "[Unit]\nDescription=stub\nDefaultDependencies=no\n"
    } else {
        "[Unit]\nDescription=stub\nDefaultDependencies=no\n\n[Service]\nExecStart=/usr/bin/cvm-warden --version\n"
    }
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn copy_dir(from: &Path, to: &Path) {
    let status = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(
        status.success(),
        "cp -a {} {}",
        from.display(),
        to.display()
    );
}

/// A root with the system's units, ours, the drop-ins and the binary.
fn root() -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    std::fs::create_dir_all(r.join("usr/lib/systemd")).unwrap();
    copy_dir(
        Path::new("/usr/lib/systemd/system"),
        &r.join("usr/lib/systemd/"),
    );
    std::os::unix::fs::symlink("usr/lib", r.join("lib")).unwrap();
    std::fs::create_dir_all(r.join("usr/bin")).unwrap();
    std::fs::copy(
        env!("CARGO_BIN_EXE_cvm-warden"),
        r.join("usr/bin/cvm-warden"),
    )
    .unwrap();
    let etc = r.join("etc/systemd/system");
    std::fs::create_dir_all(&etc).unwrap();
    for unit in UNITS {
        let src = repo().join("units").join(unit);
        std::fs::copy(&src, etc.join(src.file_name().unwrap())).unwrap();
    }
    for (unit, _) in FORBIDDEN {
        // A stub stands in for the unit (this machine may lack it, e.g. without
        // openssh-server, and Debian's own units are not what is checked here), so the
        // drop-in is loaded and checked on its own.
        std::fs::write(r.join("usr/lib/systemd/system").join(unit), stub(unit)).unwrap();
        let dir = format!("{unit}.d");
        copy_dir(&repo().join("units/dropins").join(&dir), &etc.join(&dir));
    }
    root
}

fn verify(root: &Path, args: &[String]) -> String {
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(format!("--root={}", root.display()))
        // Documentation= man pages of the system's units need not be installed here.
        .arg("--man=no")
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "systemd-analyze is needed to check units/ (apt-get install systemd; cargo xtask ci installs it): {e}"
            )
        });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "systemd-analyze verify {args:?}:\n{text}"
    );
    text
}

#[test]
fn units_verify_without_a_warning() {
    let root = root();
    let paths: Vec<String> = UNITS
        .iter()
        .map(|u| {
            format!(
                "/etc/systemd/system/{}",
                Path::new(u).file_name().unwrap().to_str().unwrap()
            )
        })
        .collect();
    let text = verify(root.path(), &paths);
    assert!(
        text.trim().is_empty(),
        "systemd-analyze verify warned:\n{text}"
    );
}

#[test]
fn drop_ins_verify_and_forbid_their_units() {
    let root = root();
    for (unit, instance) in FORBIDDEN {
        let text = verify(root.path(), &[instance.to_string()]);
        assert!(
            text.trim().is_empty(),
            "{unit}: systemd-analyze verify warned:\n{text}"
        );
        let conf = std::fs::read_to_string(
            repo()
                .join("units/dropins")
                .join(format!("{unit}.d/50-cvm-warden.conf")),
        )
        .unwrap();
        assert!(
            conf.contains("\n[Unit]\nConditionPathExists=/dev/null/cvm-warden-forbids-this-unit\n"),
            "{unit}: the drop-in must carry the impossible condition:\n{conf}"
        );
    }
}

#[test]
fn a_unit_with_an_unknown_key_fails_the_check() {
    // The check itself can fail: systemd-analyze exits 0 on unknown keys, so the test
    // looks at its output.
    let root = root();
    let unit = root.path().join("etc/systemd/system/cvm-warden.service");
    let text = std::fs::read_to_string(&unit).unwrap();
    std::fs::write(
        &unit,
        text.replace("[Service]\n", "[Service]\nNoSuchKey=1\n"),
    )
    .unwrap();
    let out = verify(
        root.path(),
        &["/etc/systemd/system/cvm-warden.service".to_string()],
    );
    assert!(out.contains("Unknown key 'NoSuchKey'"), "{out}");
}

#[test]
fn the_drop_ins_are_exactly_the_units_masked_at_runtime() {
    let mut forbidden: Vec<&str> = FORBIDDEN.iter().map(|(u, _)| *u).collect();
    let mut masked: Vec<&str> = cvm_warden::lockdown::MASKED_UNITS.to_vec();
    forbidden.sort_unstable();
    masked.sort_unstable();
    assert_eq!(forbidden, masked);
    let mut dirs: Vec<String> = std::fs::read_dir(repo().join("units/dropins"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    dirs.sort_unstable();
    let expected: Vec<String> = masked.iter().map(|u| format!("{u}.d")).collect();
    assert_eq!(dirs, expected);
}
