//! SEV-SNP launch measurement tasks.
//!
//! - `cargo xtask snp-measure-check [--write]`: recomputes every case of
//!   `tests/snp_launch/expected.json` with the real `sev-snp-measure` (the pinned PyPI
//!   version, installed into `<target>/snp-venv`) and with `cvm-warden reference-values
//!   --snp-launch`, and fails unless the tool, cvm-warden and the record agree. `--write`
//!   records the tool's values anew (and the installed Debian `ovmf`'s version and digest):
//!   for a new `ovmf` or tool version. First it fetches the inputs ([`fetch_inputs`]).
//! - `cargo xtask snp-launch [--ovmf F] [--vcpus N] [--vcpu-type T] [--kernel K [--initrd I]
//!   [--append S]] [--guest-features X] [--memory M]`: prints the QEMU command line that
//!   launches that guest on real SEV-SNP hardware and the `cvm-warden reference-values
//!   --snp-launch` command whose value its attestation report's `measurement` will have.
//!
//! [`fetch_inputs`] (`cargo xtask snp-fetch`; also what CI runs before `cargo test`, so `tests/snp_launch.rs` finds
//! its images): Debian's `ovmf` (`/usr/share/ovmf/OVMF.fd`, apt-get), and Debian's AmdSev
//! build `OVMF.amdsev.fd` from the `ovmf-amdsev` .deb recorded in the table (sid only; the
//! .deb's SHA-256 is checked before it is unpacked with `dpkg-deb`, the image's after), cached
//! in `<target>/snp-cache/`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;

use crate::{ensure_tools, sh, show, target_dir};

const TABLE: &str = "tests/snp_launch/expected.json";

/// What the tasks need from Debian.
const SNP_TOOLS: &[(&str, &str)] = &[
    ("curl", "curl"),
    ("dpkg-deb", "dpkg"),
    ("sha256sum", "coreutils"),
    ("python3", "python3"),
    ("python:ensurepip", "python3-venv"),
    ("file:/usr/share/ovmf/OVMF.fd", "ovmf"),
];

fn table(root: &Path) -> Result<Value> {
    let path = root.join(TABLE);
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

fn text<'a>(value: &'a Value, what: &str) -> Result<&'a str> {
    value
        .as_str()
        .with_context(|| format!("{TABLE}: {what} is not a string"))
}

fn sha256(path: &Path) -> Result<String> {
    let output = Command::new("sha256sum")
        .arg(path)
        .output()
        .with_context(|| format!("sha256sum {}", path.display()))?;
    ensure!(
        output.status.success(),
        "sha256sum {} failed",
        path.display()
    );
    let text = String::from_utf8_lossy(&output.stdout);
    Ok(text
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned())
}

/// Where a recorded OVMF image is on this machine (`target/…` is under the target directory).
fn ovmf_path(root: &Path, recorded: &str) -> PathBuf {
    match recorded.strip_prefix("target/") {
        Some(rest) => target_dir(root).join(rest),
        None => PathBuf::from(recorded),
    }
}

/// Installs Debian's `ovmf` (and the tools) and fetches the recorded `ovmf-amdsev` image into
/// `<target>/snp-cache/` unless it is there with the recorded digest. What `tests/snp_launch.rs`
/// needs; CI runs it before `cargo test`.
pub(crate) fn fetch_inputs(root: &Path) -> Result<()> {
    ensure_tools(SNP_TOOLS)?;
    let table = table(root)?;
    let amdsev = &table["ovmf"]["debian-ovmf-amdsev"];
    let path = ovmf_path(root, text(&amdsev["path"], "the AmdSev OVMF path")?);
    let want = text(&amdsev["sha256"], "the AmdSev OVMF sha256")?;
    if path.exists() && sha256(&path)? == want {
        return Ok(());
    }
    let url = text(&amdsev["deb_url"], "deb_url")?;
    let deb_sha256 = text(&amdsev["deb_sha256"], "deb_sha256")?;
    let member = text(&amdsev["member"], "member")?;
    let dir = path
        .parent()
        .context("the AmdSev OVMF path has no directory")?;
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let deb = dir.join("package.deb");
    if !deb.exists() || sha256(&deb)? != deb_sha256 {
        let partial = dir.join("package.deb.partial");
        let fetched = sh(Command::new("curl")
            .args([
                "--fail",
                "--location",
                "--silent",
                "--show-error",
                "--output",
            ])
            .arg(&partial)
            .arg(url));
        if let Err(error) = fetched {
            bail!(
                "{error:#}\n{} {} is no longer at {url} (Debian sid moves on): take the same .deb \
                 from https://snapshot.debian.org (SHA-256 {deb_sha256}) into {}, or record a newer \
                 one: change debian-ovmf-amdsev in {TABLE} and run `cargo xtask snp-measure-check --write`",
                text(&amdsev["package"], "package")?,
                text(&amdsev["version"], "version")?,
                deb.display()
            );
        }
        let got = sha256(&partial)?;
        ensure!(
            got == deb_sha256,
            "{url} has SHA-256 {got}, not the recorded {deb_sha256}: not the recorded package"
        );
        fs::rename(&partial, &deb)?;
    }
    let unpacked = dir.join("unpacked");
    let _ = fs::remove_dir_all(&unpacked);
    sh(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked))?;
    fs::rename(unpacked.join(member), &path)
        .with_context(|| format!("{member} is not in {}", deb.display()))?;
    let _ = fs::remove_dir_all(&unpacked);
    let got = sha256(&path)?;
    ensure!(
        got == want,
        "{} has SHA-256 {got}, not the recorded {want}",
        path.display()
    );
    eprintln!("xtask: {} ready", path.display());
    Ok(())
}

/// The pinned `sev-snp-measure` in `<target>/snp-venv`.
fn sev_snp_measure(root: &Path, version: &str) -> Result<PathBuf> {
    let venv = target_dir(root).join("snp-venv");
    let tool = venv.join("bin/sev-snp-measure");
    let installed = Command::new(&tool)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == format!("sev-snp-measure {version}"))
        .unwrap_or(false);
    if !installed {
        sh(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
        sh(Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet"])
            .arg(format!("sev-snp-measure=={version}")))?;
    }
    Ok(tool)
}

/// The options of one case, for either tool (paths as on this machine).
fn case_args(root: &Path, table: &Value, case: &Value) -> Result<Vec<String>> {
    let ovmf = text(
        &table["ovmf"][text(&case["ovmf"], "ovmf")?]["path"],
        "ovmf path",
    )?;
    let mut args = vec![
        "--vcpus".to_owned(),
        case["vcpus"].to_string(),
        "--vcpu-type".to_owned(),
        text(&case["vcpu_type"], "vcpu_type")?.to_owned(),
        "--ovmf".to_owned(),
        ovmf_path(root, ovmf).display().to_string(),
    ];
    for (option, key) in [
        ("--guest-features", "guest_features"),
        ("--kernel", "kernel"),
        ("--initrd", "initrd"),
        ("--append", "append"),
    ] {
        if let Some(value) = case[key].as_str() {
            args.push(option.to_owned());
            args.push(match key {
                "kernel" | "initrd" => root.join(value).display().to_string(),
                _ => value.to_owned(),
            });
        }
    }
    Ok(args)
}

fn stdout_of(cmd: &mut Command) -> Result<String> {
    let output = cmd
        .output()
        .with_context(|| format!("cannot start {}", show(cmd)))?;
    if !output.status.success() {
        bail!(
            "{} failed with {}: {}",
            show(cmd),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// `cargo xtask snp-measure-check [--write]`.
pub(crate) fn check(root: &Path, rest: &[&str]) -> Result<()> {
    let write = match rest {
        [] => false,
        ["--write"] => true,
        _ => bail!("usage: cargo xtask snp-measure-check [--write]"),
    };
    fetch_inputs(root)?;
    let mut table = table(root)?;
    if write {
        // The installed Debian ovmf is what the values are recorded for.
        let version =
            stdout_of(Command::new("dpkg-query").args(["-W", "-f", "${Version}", "ovmf"]))?;
        let digest = sha256(Path::new("/usr/share/ovmf/OVMF.fd"))?;
        table["ovmf"]["debian-ovmf"]["version"] = Value::String(version);
        table["ovmf"]["debian-ovmf"]["sha256"] = Value::String(digest);
    }
    let version = text(&table["tool"]["version"], "tool version")?.to_owned();
    let tool = sev_snp_measure(root, &version)?;
    sh(crate::cargo()
        .current_dir(root)
        .args(["build", "--bin", "cvm-warden"]))?;
    let bin = target_dir(root).join("debug/cvm-warden");
    let mut problems = Vec::new();
    let count = table["cases"].as_array().map_or(0, Vec::len);
    ensure!(count > 0, "{TABLE} has no cases");
    for i in 0..count {
        let case = table["cases"][i].clone();
        let name = text(&case["name"], "name")?.to_owned();
        let args = case_args(root, &table, &case)?;
        let theirs = stdout_of(
            Command::new(&tool)
                .current_dir(root)
                .args(["--mode", "snp"])
                .args(&args),
        )?;
        let ours: Value = serde_json::from_str(&stdout_of(
            Command::new(&bin)
                .current_dir(root)
                .args(["reference-values", "--snp-launch"])
                .args(&args),
        )?)
        .context("cvm-warden printed no JSON")?;
        let ours = text(&ours["snp"]["launch_measurement"], "launch_measurement")?.to_owned();
        let recorded = text(&case["measurement"], "measurement")?.to_owned();
        if write {
            table["cases"][i]["measurement"] = Value::String(theirs.clone());
        } else if theirs != recorded {
            problems.push(format!(
                "{name}: sev-snp-measure {version} gives {theirs}, {TABLE} records {recorded}"
            ));
        }
        if ours != theirs {
            problems.push(format!(
                "{name}: cvm-warden gives {ours}, sev-snp-measure {version} gives {theirs}"
            ));
        }
        println!("{name}: sev-snp-measure {theirs}, cvm-warden {ours}");
    }
    if write {
        let text = serde_json::to_string_pretty(&table)? + "\n";
        fs::write(root.join(TABLE), text)?;
        eprintln!("xtask: wrote {TABLE}");
    }
    if !problems.is_empty() {
        bail!("{}", problems.join("\n"));
    }
    println!("snp-measure-check: {count} cases, sev-snp-measure {version} and cvm-warden agree");
    Ok(())
}

/// Shell quoting for a printed command line.
fn quote(word: &str) -> String {
    if !word.is_empty()
        && word
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"@%+=:,./-_".contains(&b))
    {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// `cargo xtask snp-launch …`: the QEMU command line for real SEV-SNP hardware and the
/// matching reference-values command, from the same inputs.
pub(crate) fn launch(root: &Path, rest: &[&str]) -> Result<()> {
    let mut ovmf = None;
    let mut vcpus = "4".to_owned();
    let mut vcpu_type = "EPYC-Milan".to_owned();
    let mut kernel = None;
    let mut initrd = None;
    let mut append = None;
    let mut features = None;
    let mut memory = "4G".to_owned();
    let mut words = rest.iter();
    while let Some(option) = words.next() {
        let value = words
            .next()
            .with_context(|| format!("{option} needs a value"))?
            .to_string();
        match *option {
            "--ovmf" => ovmf = Some(value),
            "--vcpus" => vcpus = value,
            "--vcpu-type" => vcpu_type = value,
            "--kernel" => kernel = Some(value),
            "--initrd" => initrd = Some(value),
            "--append" => append = Some(value),
            "--guest-features" => features = Some(value),
            "--memory" => memory = value,
            _ => bail!(
                "usage: cargo xtask snp-launch [--ovmf F] [--vcpus N] [--vcpu-type T] [--kernel K \
                 [--initrd I] [--append S]] [--guest-features X] [--memory M]"
            ),
        }
    }
    ensure!(
        kernel.is_some() || (initrd.is_none() && append.is_none()),
        "--initrd and --append go with --kernel (they are measured through its hashes table)"
    );
    let amdsev = {
        let table = table(root)?;
        ovmf_path(
            root,
            text(&table["ovmf"]["debian-ovmf-amdsev"]["path"], "AmdSev path")?,
        )
    };
    let ovmf = ovmf.unwrap_or_else(|| {
        if kernel.is_some() {
            amdsev.display().to_string()
        } else {
            "/usr/share/ovmf/OVMF.fd".to_owned()
        }
    });
    let hashes = if kernel.is_some() {
        ",kernel-hashes=on"
    } else {
        ""
    };
    let mut notes = Vec::new();
    if kernel.is_none() {
        notes.push(
            "# Firmware only: the measurement does not cover the kernel, the initramfs or \
             cvm-warden's policy. Give --kernel and --initrd (the initramfs of `cargo xtask image \
             --policy …`) to measure them through an AmdSev OVMF (kernel-hashes=on)."
                .to_owned(),
        );
    }
    if !Path::new(&ovmf).exists() {
        notes.push(format!(
            "# {ovmf} is not on this machine: `cargo xtask snp-measure-check` fetches Debian's \
             OVMF.amdsev.fd (package ovmf-amdsev); apt-get install ovmf gives OVMF.fd."
        ));
    }
    let mut qemu = vec![
        "qemu-system-x86_64".to_owned(),
        "-enable-kvm".to_owned(),
        "-machine".to_owned(),
        "q35,confidential-guest-support=sev0".to_owned(),
        "-object".to_owned(),
        format!("sev-snp-guest,id=sev0,cbitpos=51,reduced-phys-bits=1,policy=0x30000{hashes}"),
        "-cpu".to_owned(),
        vcpu_type.clone(),
        "-smp".to_owned(),
        vcpus.clone(),
        "-m".to_owned(),
        memory,
        "-bios".to_owned(),
        ovmf.clone(),
    ];
    let mut reference = vec![
        "cvm-warden".to_owned(),
        "reference-values".to_owned(),
        "--snp-launch".to_owned(),
        "--ovmf".to_owned(),
        ovmf,
        "--vcpus".to_owned(),
        vcpus,
        "--vcpu-type".to_owned(),
        vcpu_type,
    ];
    if let Some(features) = features {
        reference.extend(["--guest-features".to_owned(), features]);
    }
    for (qemu_option, option, value) in [
        ("-kernel", "--kernel", kernel),
        ("-initrd", "--initrd", initrd),
        ("-append", "--append", append),
    ] {
        if let Some(value) = value {
            qemu.extend([qemu_option.to_owned(), value.clone()]);
            reference.extend([option.to_owned(), value]);
        }
    }
    qemu.push("-nographic".to_owned());
    let line = |words: &[String]| words.iter().map(|w| quote(w)).collect::<Vec<_>>().join(" ");
    println!("# On the SEV-SNP host (QEMU 9.1 or later, a host kernel with SEV-SNP; cbitpos is");
    println!("# CPUID 0x8000001F EBX[5:0], 51 on Milan and Genoa). -cpu and -smp are measured:");
    println!("# keep them equal to the reference-values command below.");
    for note in &notes {
        println!("{note}");
    }
    println!("{}", line(&qemu));
    println!();
    println!("# The launch measurement that guest's attestation report carries:");
    println!("{}", line(&reference));
    Ok(())
}
