//! Project tasks, run as `cargo xtask <task>`:
//!
//! - `ci`: everything CI checks (installs what it needs with apt-get when root).
//! - `tidy`: the layer rule of ARCHITECTURE.md's code map, and the verifier's portable deps.
//! - `demo`: the demo CVM: cvm-warden as PID 1 of a Linux guest under QEMU (`vm.rs`);
//!   `demo --sandbox`: the namespace demo (`cvm-warden init` as PID 1 of new namespaces).
//! - `image`: a test initramfs (cvm-warden as `/init`), by default the demo CVM's.
//! - `vm-test [--list] [SCENARIO…]`: the VM harness's scenarios (`tests/vm/`).
//! - `bench vm`: `/init` → workload against a trivial `/init`, PID 1's memory.
//! - `bench measure`: bundle measurement throughput against `fsverity digest` and `sha256sum`.
//! - `bench unlock`: released key → verified LUKS2 keyslot against `cryptsetup open
//!   --test-passphrase` with the default PBKDF (`benches/unlock.rs`; root).
//! - `bench checkpoint`: one audit-log checkpoint with a swtpm quote and with SNP on the fake
//!   configfs-tsm (`benches/checkpoint.rs`).
//! - `bench gpu`: GPU precheck, evidence collection per handshake (1, 2, 4 simulated GPUs) and
//!   offline verification per GPU (`benches/gpu.rs`), then the verifier's bench on NVIDIA's
//!   real vectors (`verify/benches/nvidia.rs`).
//! - `bench reattest`: one re-attestation round trip against the test broker, sample and
//!   swtpm evidence (`benches/reattest.rs`).
//! - `snp-measure-check [--write]`: `cvm-warden reference-values --snp-launch` against the
//!   real `sev-snp-measure` (PyPI) on the cases of `tests/snp_launch/expected.json`;
//!   `snp-fetch`: only the OVMF images those tests need;
//!   `snp-launch [...]`: the QEMU command line for real SEV-SNP hardware and the matching
//!   reference-values command (`snp.rs`).
//! - `gpu-probe`: on a machine with an NVIDIA GPU and driver (not a CVM), the real NVML
//!   calls and the GPU precheck's verdict through `cvm-warden gpu probe` (`gpu.rs`).
//! - `fuzz --smoke [--seconds N]` / `fuzz TARGET [--seconds N]`: the cargo-fuzz targets
//!   (`fuzz/`, nightly; see `fuzz.rs`).
//!
//! `anyhow` is allowed here and nowhere else.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

mod bench;
mod demo;
mod flare;

mod fuzz;
mod gpu;
mod sandbox;
mod snp;
mod tidy;
mod vm;

fn main() {
    if let Err(error) = run() {
        eprintln!("xtask: error: {error:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let root = repo_root()?;
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["ci"] => ci(&root),
        ["demo"] => vm::demo(&root),
        ["demo", "--sandbox"] => demo::run(&root),
        ["flare"] => flare::run(&root),
        ["image", rest @ ..] => vm::image(&root, rest),
        ["vm-test", rest @ ..] => vm::test(&root, rest),
        ["bench", "vm", rest @ ..] => vm::bench(&root, rest),
        ["tidy"] => tidy::run(&root),
        ["bench", "measure"] => bench::measure(&root),
        ["fuzz", rest @ ..] => fuzz::run(&root, rest),
        ["snp-fetch"] => snp::fetch_inputs(&root),
        ["snp-measure-check", rest @ ..] => snp::check(&root, rest),
        ["snp-launch", rest @ ..] => snp::launch(&root, rest),
        ["gpu-probe"] => gpu::probe(&root),
        ["bench", "unlock"] => {
            ensure_tools(TOOLS)?;
            sh(cargo()
                .current_dir(&root)
                .args(["bench", "--bench", "unlock"]))
        }
        ["bench", "checkpoint"] => {
            sh(cargo()
                .current_dir(&root)
                .args(["bench", "--bench", "checkpoint"]))
        }
        ["bench", "gpu"] => {
            sh(cargo().current_dir(&root).args(["bench", "--bench", "gpu"]))?;
            sh(cargo()
                .current_dir(&root)
                .args(["bench", "-p", "cvm-warden-verify", "--bench", "nvidia"]))
        }
        ["bench", "reattest"] => {
            sh(cargo()
                .current_dir(&root)
                .args(["bench", "--bench", "reattest"]))
        }
        _ => bail!(
            "usage: cargo xtask ci | tidy | demo [--sandbox] | flare | image [--policy P …] | vm-test [--list] [SCENARIO…] | bench vm | bench measure | bench unlock | bench checkpoint | bench gpu | bench reattest \
             | fuzz (--smoke | TARGET) [--seconds N] | snp-fetch | snp-measure-check [--write] | snp-launch [OPTIONS] | gpu-probe"
        ),
    }
}

/// The workspace root (the parent of xtask/).
fn repo_root() -> Result<PathBuf> {
    let manifest = std::env::var("CARGO_MANIFEST_DIR").context("run through `cargo xtask`")?;
    Path::new(&manifest)
        .parent()
        .map(Path::to_path_buf)
        .context("xtask has no parent directory")
}

/// Runs a command, echoing it, and fails when it fails.
pub(crate) fn sh(cmd: &mut Command) -> Result<()> {
    eprintln!("$ {}", show(cmd));
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {}", show(cmd)))?;
    if !status.success() {
        bail!("{} failed with {status}", show(cmd));
    }
    Ok(())
}

pub(crate) fn show(cmd: &Command) -> String {
    let mut text = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        text.push(' ');
        text.push_str(&arg.to_string_lossy());
    }
    text
}

pub(crate) fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Whether `tool` is installed: a command on PATH, `pkgconfig:NAME` for a C library that
/// pkg-config knows (the -dev packages the -sys crates build against), `file:PATH` for a
/// file a package installs, `python:MODULE` for a module python3 imports.
fn have(tool: &str) -> bool {
    let check = if let Some(lib) = tool.strip_prefix("pkgconfig:") {
        format!("pkg-config --exists {lib}")
    } else if let Some(path) = tool.strip_prefix("file:") {
        format!("test -f {path}")
    } else if let Some(module) = tool.strip_prefix("python:") {
        format!("python3 -c 'import {module}' >/dev/null 2>&1")
    } else {
        format!("command -v {tool} >/dev/null 2>&1")
    };
    Command::new("sh")
        .args(["-c", &check])
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Makes sure each `(tool, debian package)` is installed; installs missing ones with apt-get
/// when root, otherwise fails naming the packages.
pub(crate) fn ensure_tools(tools: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<&str> = tools
        .iter()
        .filter(|(tool, _)| !have(tool))
        .map(|(_, package)| *package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!(
            "missing tools; install them as root: apt-get install -y {}",
            missing.join(" ")
        );
    }
    sh(Command::new("apt-get").args(["update", "-qq"]))?;
    sh(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    for (tool, package) in tools {
        if !have(tool) {
            bail!("{tool} is still missing after apt-get install {package}");
        }
    }
    Ok(())
}

/// Tools the tests and the demo need, with the Debian package that provides each.
pub(crate) const TOOLS: &[(&str, &str)] = &[
    ("fsverity", "fsverity"),
    ("unshare", "util-linux"),
    ("sha256sum", "coreutils"),
    ("id", "coreutils"),
    // Building: bindgen (libcryptsetup-rs-sys) and the C libraries of the -sys crates.
    ("pkg-config", "pkg-config"),
    ("clang", "clang"),
    ("pkgconfig:tss2-esys", "libtss2-dev"),
    ("pkgconfig:libcryptsetup", "libcryptsetup-dev"),
    // Tests and the demo: a software TPM, LUKS2 tools, ext4.
    ("swtpm", "swtpm"),
    ("swtpm_setup", "swtpm-tools"),
    ("cryptsetup", "cryptsetup-bin"),
    ("mkfs.ext4", "e2fsprogs"),
    // The demo: a network namespace for the broker and the TPM, the AK provisioning step.
    ("ip", "iproute2"),
    ("tpm2_createak", "tpm2-tools"),
    // The lockdown: nftables rulesets, unit files checked with systemd-analyze.
    ("nft", "nftables"),
    ("systemd-analyze", "systemd"),
    // `tests/snp_launch.rs`: the SEV-SNP launch measurement of Debian's OVMF.
    ("file:/usr/share/ovmf/OVMF.fd", "ovmf"),
];

/// Cargo's target directory: `CARGO_TARGET_DIR` when set (relative to the workspace root),
/// else `target/` in the workspace.
pub(crate) fn target_dir(root: &Path) -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => root.join(dir),
        None => root.join("target"),
    }
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string()))
}

fn ci(root: &Path) -> Result<()> {
    ensure_tools(TOOLS)?;
    if !is_root() {
        eprintln!("xtask: warning: not root: the namespace tests will fail (CI runs as root)");
    }
    tidy::run(root)?;
    sh(cargo().current_dir(root).args(["fmt", "--all", "--check"]))?;
    sh(cargo().current_dir(root).args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    // The OVMF images `tests/snp_launch.rs` checks (Debian's ovmf, the recorded ovmf-amdsev).
    snp::fetch_inputs(root)?;
    // Unit tests (no root) and integration tests (namespace tests need root), all of them.
    let counts = cargo_test(root)?;
    // The namespace demo: PID 1 in namespaces, tamper detection, log verify.
    demo::run(root)?;
    // A real NVIDIA FLARE federation (nvflare from PyPI) behind cvm-warden, three sites.
    flare::run(root)?;
    // The SEV-SNP launch measurement against the real counterpart, sev-snp-measure (PyPI),
    // live on the recorded inputs.
    snp::check(root, &[])?;
    // The real shape: cvm-warden as PID 1 of a Linux guest, every VM scenario (two at once),
    // then the README's main command, the VM demo.
    vm::test(root, &[])?;
    vm::demo(root)?;
    // Every fuzz target for a short while from its seed corpus (nightly, cargo-fuzz).
    fuzz::run(root, &["--smoke"])?;
    // One closing line for whoever reads the log: the totals over every test binary.
    println!(
        "ci: {} passed, {} failed, {} skipped",
        counts.passed, counts.failed, counts.ignored
    );
    if counts.passed == 0 {
        bail!("cargo test ran no test");
    }
    Ok(())
}

#[derive(Debug, Default)]
struct Counts {
    passed: u64,
    failed: u64,
    ignored: u64,
}

/// Runs `cargo test` for the whole workspace, echoing its output, and adds up the
/// `test result:` lines of every test binary.
fn cargo_test(root: &Path) -> Result<Counts> {
    use std::io::{BufRead, BufReader};
    let mut cmd = cargo();
    cmd.current_dir(root)
        .args(["test", "--workspace", "--no-fail-fast"])
        .stdout(std::process::Stdio::piped());
    eprintln!("$ {}", show(&cmd));
    let mut child = cmd.spawn().context("cannot start cargo test")?;
    let stdout = child.stdout.take().context("cargo test has no stdout")?;
    let mut counts = Counts::default();
    for line in BufReader::new(stdout).lines() {
        let line = line.context("reading cargo test output")?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            for part in rest.split([';', '.']) {
                let mut words = part.split_whitespace();
                if let (Some(n), Some(what)) = (words.next(), words.next()) {
                    let Ok(n) = n.parse::<u64>() else { continue };
                    match what {
                        "passed" => counts.passed += n,
                        "failed" => counts.failed += n,
                        "ignored" => counts.ignored += n,
                        _ => {}
                    }
                }
            }
        }
    }
    let status = child.wait().context("waiting for cargo test")?;
    if !status.success() || counts.failed > 0 {
        println!(
            "ci: {} passed, {} failed, {} skipped",
            counts.passed, counts.failed, counts.ignored
        );
        bail!("cargo test failed with {status}");
    }
    Ok(counts)
}
