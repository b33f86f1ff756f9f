//! `cargo xtask demo`: the sandbox demo.
//!
//! Stages `examples/bundle` at the fixed path the example policy names (with explicit modes,
//! so the pinned digest does not depend on the checkout's umask), then runs
//! `cvm-warden init` as PID 1 of new PID, mount, network and UTS namespaces. Act 1 boots the
//! intact bundle: each stage, the workload's output and the audit log are shown and the log
//! is verified. Act 2 tampers with one bundle file: the boot must stop before launch, name
//! the file in the audit log, and the workload must not run.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use anyhow::{bail, ensure, Context, Result};

use crate::{cargo, ensure_tools, is_root, sh, show, target_dir, TOOLS};

/// Where the example policy expects the bundle, its manifest and the audit log (not under
/// /run or /tmp: PID 1 mounts fresh tmpfs there when they are not mount points).
const DEMO_DIR: &str = "/var/lib/cvm-warden-demo";
/// The line the example workload prints when it ran.
const WORKLOAD_MARK: &str = "workload: hello from the federated-learning participant";

pub(crate) fn run(root: &Path) -> Result<()> {
    ensure_tools(TOOLS)?;
    if !is_root() {
        bail!("the demo creates namespaces and mounts: run it as root");
    }
    sh(cargo()
        .current_dir(root)
        .args(["build", "--quiet", "--bin", "cvm-warden"]))?;
    let bin = target_dir(root).join("debug/cvm-warden");
    let demo = Path::new(DEMO_DIR);

    let result = acts(root, &bin, demo);
    let _ = fs::remove_dir_all(demo);
    result
}

fn acts(root: &Path, bin: &Path, demo: &Path) -> Result<()> {
    stage_bundle(&root.join("examples/bundle"), &demo.join("bundle"))?;
    // The policy is read after PID 1 has mounted a fresh tmpfs on /tmp and /run, so it must
    // not live there (the checkout might): copy it next to the bundle.
    let policy = &demo.join("policy.toml");
    fs::copy(root.join("examples/policy.toml"), policy).context("copying the example policy")?;
    fs::copy(
        root.join("examples/bundle.manifest.json"),
        demo.join("bundle.manifest.json"),
    )
    .context("copying the reference manifest")?;

    banner("the example policy, validated and normalised");
    sh(Command::new(bin).args(["policy", "check"]).arg(policy))?;
    banner("the bundle as the model owner measures it at build time");
    sh(Command::new(bin).arg("measure").arg(demo.join("bundle")))?;

    banner("act 1: boot with the intact bundle (cvm-warden is PID 1 of new namespaces)");
    let out = boot(bin, policy)?;
    ensure!(
        out.status.success(),
        "the demo boot failed with {}; see the output above",
        out.status
    );
    ensure!(
        out.stdout.contains(WORKLOAD_MARK),
        "the workload did not print {WORKLOAD_MARK:?}"
    );
    let log = demo.join("audit.jsonl");
    banner("the audit log");
    print!(
        "{}",
        fs::read_to_string(&log).context("reading the audit log")?
    );
    banner("the audit log, verified offline");
    sh(Command::new(bin).args(["audit", "verify"]).arg(&log))?;

    banner("act 2: a file of the bundle is changed after it was measured and pinned");
    fs::remove_file(&log).context("removing the first audit log")?;
    let tampered = demo.join("bundle/startup/start.sh");
    let mut perms = fs::metadata(&tampered)?.permissions();
    perms.set_mode(0o755);
    let mut script = fs::read_to_string(&tampered)?;
    script.push_str("echo 'workload: exfiltrating the model' >&2\n");
    fs::write(&tampered, script)?;
    fs::set_permissions(&tampered, perms)?;
    let out = boot(bin, policy)?;
    ensure!(
        !out.status.success(),
        "the boot with a tampered bundle succeeded: fail-closed is broken"
    );
    ensure!(
        !out.stdout.contains(WORKLOAD_MARK),
        "the workload ran although the bundle was tampered with"
    );
    let text = fs::read_to_string(&log).context("reading the second audit log")?;
    let failed = text
        .lines()
        .find(|l| l.contains("\"event\":\"failed\""))
        .context("the audit log has no failed record")?;
    ensure!(
        failed.contains("startup/start.sh"),
        "the failed record does not name the changed file: {failed}"
    );
    banner("the record that stopped the boot (the changed file is named)");
    println!("{failed}");
    sh(Command::new(bin).args(["audit", "verify"]).arg(&log))?;
    banner("demo done: intact bundle ran; tampered bundle stopped before launch");
    Ok(())
}

struct Output {
    status: std::process::ExitStatus,
    stdout: String,
}

/// `cvm-warden init` as PID 1 of new PID, mount, network and UTS namespaces.
fn boot(bin: &Path, policy: &Path) -> Result<Output> {
    // `sh -c 'exec "$@" 2>&1'`: one stream, so stage lines and workload output interleave.
    let mut cmd = Command::new("sh");
    cmd.args([
        "-c",
        "exec \"$@\" 2>&1",
        "sh",
        "unshare",
        "--pid",
        "--fork",
        "--mount",
        "--mount-proc",
        "--net",
        "--uts",
        "--kill-child",
        "--",
    ])
    .arg(bin)
    .arg("init")
    .arg("--policy")
    .arg(policy);
    eprintln!("$ {}", show(&cmd));
    let out = cmd
        .output()
        .with_context(|| format!("cannot start {}", show(&cmd)))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    print!("{stdout}");
    println!("(cvm-warden exited with {})", out.status);
    Ok(Output {
        status: out.status,
        stdout,
    })
}

/// Copies `src` to `dst` with fixed modes: directories 0755, `*.sh` 0755, other files 0644.
fn stage_bundle(src: &Path, dst: &Path) -> Result<()> {
    if dst.exists() {
        fs::remove_dir_all(dst).with_context(|| format!("removing {}", dst.display()))?;
    }
    fs::create_dir_all(dst).with_context(|| format!("creating {}", dst.display()))?;
    fs::set_permissions(dst, fs::Permissions::from_mode(0o755))?;
    let mut entries: Vec<_> = fs::read_dir(src)
        .with_context(|| format!("reading {}", src.display()))?
        .collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let from = entry.path();
        let to = dst.join(entry.file_name());
        let kind = entry.file_type()?;
        if kind.is_dir() {
            stage_bundle(&from, &to)?;
        } else if kind.is_file() {
            fs::copy(&from, &to)?;
            let mode = if to.extension().is_some_and(|e| e == "sh") {
                0o755
            } else {
                0o644
            };
            fs::set_permissions(&to, fs::Permissions::from_mode(mode))?;
        } else {
            bail!(
                "{}: only files and directories belong in the example bundle",
                from.display()
            );
        }
    }
    Ok(())
}

fn banner(text: &str) {
    println!("\n=== {text} ===");
}
