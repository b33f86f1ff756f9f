//! The VM tasks: `image`, `vm-test`, the VM `demo` and `bench vm`. The harness itself is
//! the `cvm-warden-vm` crate (`tests/vm/`); these build the release binaries it drives and
//! run its `vm-test` driver with the project's folders:
//!
//! - `target/vm-cache/`: QEMU unpacked from Debian's packages and the guest kernel with its
//!   modules, by version (fetched on first use; CI starts with none).
//! - `target/vm/`: one private folder per scenario (serial log, exported audit log, swtpm
//!   state, disk image, broker log), kept for inspection after the run.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Result;

use crate::{cargo, ensure_tools, sh, target_dir, TOOLS};

/// Builds the release binaries the harness runs (`/init` is the release cvm-warden).
fn build(root: &Path) -> Result<PathBuf> {
    ensure_tools(TOOLS)?;
    sh(cargo().current_dir(root).args([
        "build",
        "--release",
        "--quiet",
        "-p",
        "cvm-warden",
        "-p",
        "cvm-warden-verify",
        "-p",
        "kbs-test-broker",
        "-p",
        "cvm-warden-vm",
    ]))?;
    Ok(target_dir(root).join("release"))
}

/// `vm-test COMMAND --bins … --cache … --work … ARGS…`.
fn harness(root: &Path, command: &str, args: &[&str]) -> Result<()> {
    let bins = build(root)?;
    let target = target_dir(root);
    sh(Command::new(bins.join("vm-test"))
        .arg(command)
        .arg("--bins")
        .arg(&bins)
        .arg("--cache")
        .arg(target.join("vm-cache"))
        .arg("--work")
        .arg(target.join("vm"))
        .args(args)
        .current_dir(root))
}

/// `cargo xtask vm-test [--list] [SCENARIO…]`: the VM scenarios, at most two VMs at once.
pub(crate) fn test(root: &Path, args: &[&str]) -> Result<()> {
    if args == ["--list"] {
        let bins = build(root)?;
        return sh(Command::new(bins.join("vm-test")).arg("list"));
    }
    harness(root, "run", args)
}

/// `cargo xtask image [--policy P [--bundle DIR --at PATH] [--module M]…] [--out F]`: a
/// test initramfs; without `--policy`, the demo CVM's.
pub(crate) fn image(root: &Path, args: &[&str]) -> Result<()> {
    let default_out = target_dir(root).join("vm/image.cpio.gz");
    let default_out = default_out.to_string_lossy().into_owned();
    let mut all: Vec<&str> = args.to_vec();
    if !args.contains(&"--out") {
        all.extend(["--out", &default_out]);
    }
    harness(root, "image", &all)
}

/// `cargo xtask demo`: the demo CVM under QEMU.
pub(crate) fn demo(root: &Path) -> Result<()> {
    harness(root, "demo", &[])
}

/// `cargo xtask bench vm`: boot-time and PID 1 memory figures, cvm-warden against a
/// trivial `/init` in the same VM.
pub(crate) fn bench(root: &Path, args: &[&str]) -> Result<()> {
    harness(root, "bench", args)
}
