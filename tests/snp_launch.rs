//! `cvm-warden reference-values --snp-launch` against `sev-snp-measure` (PyPI): the values
//! in `tests/snp_launch/expected.json` were computed by that tool from the command recorded
//! beside each (`cargo xtask snp-measure-check` reruns it and compares; `--write` records
//! anew). These tests need no Python: they check cvm-warden's output against the record.
//!
//! The OVMF images must be exactly the recorded ones (SHA-256 checked first):
//! - Debian's `/usr/share/ovmf/OVMF.fd` (package `ovmf`, `apt-get install ovmf`; `cargo
//!   xtask ci` installs it);
//! - Debian's AmdSev build `OVMF.amdsev.fd` (package `ovmf-amdsev`, in sid only), unpacked
//!   into `<target>/snp-cache/` by `cargo xtask snp-fetch` (`ci` and `snp-measure-check` too).
//!
//! A missing or different image FAILS the test, naming what to do: never skipped.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;
use sha2::Digest;

const BIN: &str = env!("CARGO_BIN_EXE_cvm-warden");

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn table() -> Value {
    let path = root().join("tests/snp_launch/expected.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path:?}: {e}"))
}

fn text(value: &Value) -> &str {
    value
        .as_str()
        .unwrap_or_else(|| panic!("not a string: {value}"))
}

/// Where the recorded OVMF image is on this machine; fails unless its digest is the
/// recorded one.
fn ovmf_path(table: &Value, name: &str) -> PathBuf {
    let ovmf = &table["ovmf"][name];
    let recorded = text(&ovmf["path"]);
    let path = match recorded.strip_prefix("target/") {
        // CARGO_TARGET_TMPDIR is <target>/tmp, wherever the target directory is.
        Some(rest) => Path::new(env!("CARGO_TARGET_TMPDIR"))
            .parent()
            .expect("the target directory")
            .join(rest),
        None => PathBuf::from(recorded),
    };
    let what = format!(
        "{} {} ({}), SHA-256 {}",
        text(&ovmf["package"]),
        text(&ovmf["version"]),
        text(&ovmf["suite"]),
        text(&ovmf["sha256"])
    );
    let bytes = std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "the recorded values need {path:?} ({e}): {what}; get it with: {}",
            text(&ovmf["get"])
        )
    });
    let digest = hex::encode(sha2::Sha256::digest(&bytes));
    assert_eq!(
        digest,
        text(&ovmf["sha256"]),
        "{path:?} is not the OVMF image the values were recorded with ({what}); install that \
         version, or re-record the values for this one with `cargo xtask snp-measure-check --write`"
    );
    path
}

/// `cvm-warden reference-values --snp-launch` for one recorded case.
fn cvm_warden_args(case: &Value, ovmf: &Path) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "reference-values".into(),
        "--snp-launch".into(),
        "--ovmf".into(),
        ovmf.display().to_string(),
        "--vcpus".into(),
        case["vcpus"].to_string(),
        "--vcpu-type".into(),
        text(&case["vcpu_type"]).into(),
    ];
    for (option, key) in [
        ("--guest-features", "guest_features"),
        ("--kernel", "kernel"),
        ("--initrd", "initrd"),
        ("--append", "append"),
    ] {
        if let Some(value) = case[key].as_str() {
            args.push(option.into());
            args.push(match key {
                "kernel" | "initrd" => root().join(value).display().to_string(),
                _ => value.into(),
            });
        }
    }
    args
}

fn run(args: &[String]) -> Output {
    Command::new(BIN)
        .args(args)
        .output()
        .expect("run cvm-warden")
}

fn check_cases(ovmf_name: &str) -> usize {
    let table = table();
    let ovmf = ovmf_path(&table, ovmf_name);
    let mut checked = 0;
    for case in table["cases"].as_array().expect("cases") {
        if case["ovmf"] != ovmf_name {
            continue;
        }
        let name = text(&case["name"]);
        let output = run(&cvm_warden_args(case, &ovmf));
        assert!(
            output.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let values: Value = serde_json::from_slice(&output.stdout).expect("JSON");
        let snp = &values["snp"];
        assert_eq!(
            snp["launch_measurement"],
            case["measurement"],
            "{name}: cvm-warden differs from `{}`",
            text(&case["command"])
        );
        let kernel_hashes = !case["kernel"].is_null();
        assert_eq!(
            snp["mode"],
            if kernel_hashes {
                "kernel-hashes"
            } else {
                "firmware-only"
            },
            "{name}"
        );
        assert_eq!(snp["vcpus"], case["vcpus"], "{name}");
        assert_eq!(snp["vcpu_type"], case["vcpu_type"], "{name}");
        assert_eq!(
            snp["ovmf"]["sha256"],
            format!("sha256:{}", text(&table["ovmf"][ovmf_name]["sha256"])),
            "{name}"
        );
        if kernel_hashes {
            assert_eq!(snp["append"], case["append"], "{name}");
        }
        checked += 1;
    }
    checked
}

#[test]
fn firmware_only_values_equal_sev_snp_measure_with_debian_ovmf_fd() {
    assert_eq!(check_cases("debian-ovmf"), 4);
}

#[test]
fn values_equal_sev_snp_measure_with_debian_ovmf_amdsev_and_kernel_hashes() {
    assert_eq!(check_cases("debian-ovmf-amdsev"), 4);
}

/// The recorded command lines are the recorded inputs (so the record cannot drift from
/// what the values were computed from), and the table covers what the issue asks.
#[test]
fn the_recorded_commands_are_the_recorded_inputs() {
    let table = table();
    assert_eq!(table["tool"]["name"], "sev-snp-measure");
    let cases = table["cases"].as_array().expect("cases");
    for case in cases {
        let mut words = vec![
            "sev-snp-measure --mode snp".to_owned(),
            format!("--vcpus {}", case["vcpus"]),
            format!("--vcpu-type {}", text(&case["vcpu_type"])),
            format!(
                "--ovmf {}",
                text(&table["ovmf"][text(&case["ovmf"])]["path"])
            ),
        ];
        for (option, key) in [
            ("--guest-features", "guest_features"),
            ("--kernel", "kernel"),
            ("--initrd", "initrd"),
            ("--append", "append"),
        ] {
            if let Some(value) = case[key].as_str() {
                words.push(if value.contains(' ') {
                    format!("{option} '{value}'")
                } else {
                    format!("{option} {value}")
                });
            }
        }
        assert_eq!(case["command"], words.join(" "), "{}", case["name"]);
        assert_eq!(text(&case["measurement"]).len(), 96, "{}", case["name"]);
    }
    let kernel_hashes = cases.iter().filter(|c| !c["kernel"].is_null()).count();
    assert!(
        kernel_hashes >= 2,
        "{kernel_hashes} cases with kernel hashes"
    );
    for vcpus in [1, 4, 16] {
        assert!(cases.iter().any(|c| c["vcpus"] == vcpus), "vcpus {vcpus}");
    }
    for vcpu_type in ["EPYC-Milan", "EPYC-Genoa", "EPYC-v4"] {
        assert!(
            cases.iter().any(|c| c["vcpu_type"] == vcpu_type),
            "{vcpu_type}"
        );
    }
    assert!(cases.iter().any(|c| !c["guest_features"].is_null()));
}

#[test]
fn a_kernel_with_an_ovmf_without_the_hashes_table_is_refused_naming_the_amdsev_build() {
    let table = table();
    let ovmf = ovmf_path(&table, "debian-ovmf");
    let kernel = root().join("tests/snp_launch/kernel.bin");
    let output = run(&[
        "reference-values".into(),
        "--snp-launch".into(),
        "--ovmf".into(),
        ovmf.display().to_string(),
        "--vcpus".into(),
        "4".into(),
        "--vcpu-type".into(),
        "EPYC-Milan".into(),
        "--kernel".into(),
        kernel.display().to_string(),
    ]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(output.stdout.is_empty());
    assert!(
        stderr.contains("--kernel given, but the OVMF image \"/usr/share/ovmf/OVMF.fd\" has no SEV hashes table"),
        "{stderr}"
    );
    assert!(
        stderr.contains("OVMF.amdsev.fd from the ovmf-amdsev package"),
        "{stderr}"
    );
    // The same image without --kernel: firmware only, said so.
    let output = run(&[
        "reference-values".into(),
        "--snp-launch".into(),
        "--ovmf".into(),
        ovmf.display().to_string(),
        "--vcpus".into(),
        "4".into(),
        "--vcpu-type".into(),
        "EPYC-Milan".into(),
    ]);
    assert!(output.status.success());
    let values: Value = serde_json::from_slice(&output.stdout).expect("JSON");
    assert_eq!(values["snp"]["mode"], "firmware-only");
    assert_eq!(values["snp"]["ovmf"]["sev_hashes_table"], false);
    assert!(text(&values["snp"]["mode_note"]).contains("not the kernel"));
}

#[test]
fn snp_launch_options_go_only_with_snp_launch_and_no_policy_is_read() {
    let strings = |words: &[&str]| words.iter().map(|w| (*w).to_owned()).collect::<Vec<_>>();
    // No policy file exists at the default path here, and none is needed: a wrong vCPU type
    // is what fails (exit 2, naming it), not the policy.
    let output = run(&strings(&[
        "reference-values",
        "--snp-launch",
        "--ovmf",
        "/nonexistent.fd",
        "--vcpus",
        "4",
        "--vcpu-type",
        "EPYC-Mars",
    ]));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--vcpu-type \"EPYC-Mars\""), "{stderr}");
    for (words, says) in [
        (
            &[
                "reference-values",
                "--snp-launch",
                "--vcpus",
                "4",
                "--vcpu-type",
                "EPYC-Milan",
            ][..],
            "--ovmf",
        ),
        (
            &[
                "reference-values",
                "--ovmf",
                "/x.fd",
                "--vcpus",
                "4",
                "--vcpu-type",
                "EPYC-Milan",
            ][..],
            "--snp-launch",
        ),
        (
            &[
                "reference-values",
                "--snp-launch",
                "--policy",
                "/p.toml",
                "--ovmf",
                "/x.fd",
                "--vcpus",
                "4",
                "--vcpu-type",
                "EPYC-Milan",
            ][..],
            "--policy",
        ),
        (
            &[
                "reference-values",
                "--snp-launch",
                "--ovmf",
                "/x.fd",
                "--vcpus",
                "4",
                "--vcpu-type",
                "EPYC-Milan",
                "--initrd",
                "/i",
            ][..],
            "--kernel",
        ),
        (
            &[
                "reference-values",
                "--snp-launch",
                "--format",
                "trustee",
                "--ovmf",
                "/x.fd",
                "--vcpus",
                "4",
                "--vcpu-type",
                "EPYC-Milan",
            ][..],
            "--format",
        ),
    ] {
        let output = run(&strings(words));
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{words:?}: {stderr}");
        assert!(stderr.contains(says), "{words:?}: {stderr}");
    }
}
