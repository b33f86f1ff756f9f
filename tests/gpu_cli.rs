//! `cvm-warden gpu probe`: without a driver it names the library and what to install; with
//! the policy's simulated GPU it lists it and runs the boot's precheck, printing the exact
//! refusal a boot would stop with. `policy check` and `plan` show `[attestation.gpu]`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_cvm-warden");

struct Setup {
    dir: tempfile::TempDir,
}

impl Setup {
    fn new() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("bundle")).unwrap();
        std::fs::write(
            dir.path().join("passwd"),
            "flare:x:1000:1000::/home/flare:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("group"), "flare:x:1000:\n").unwrap();
        Setup { dir }
    }

    /// A recording like `tests/data/nvidia-sim/gpu.json` with `edit` applied (its files by
    /// absolute path).
    fn recording(&self, edit: impl FnOnce(&mut serde_json::Value)) -> PathBuf {
        let sim = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/nvidia-sim");
        let mut json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(sim.join("gpu.json")).unwrap()).unwrap();
        for file in ["report", "certificate", "signing_key"] {
            let name = json["gpus"][0][file].as_str().unwrap().to_string();
            json["gpus"][0][file] = sim.join(name).display().to_string().into();
        }
        edit(&mut json);
        let path = self.dir.path().join("gpu.json");
        std::fs::write(&path, json.to_string()).unwrap();
        path
    }

    fn policy(&self, gpu: &str) -> PathBuf {
        let path = self.dir.path().join("policy.toml");
        std::fs::write(
            &path,
            format!(
                "[workload]\nbundle = \"{}\"\nsource = \"initramfs\"\nexec = [\"/bin/true\"]\nuser = \"flare\"\n\n[attestation]\ntee = \"tpm\"\nkbs = \"http://127.0.0.1:9\"\ninsecure_http = true\n\n[attestation.gpu]\n{gpu}\n\n[network]\n",
                self.dir.path().join("bundle").display()
            ),
        )
        .unwrap();
        path
    }

    fn run(&self, args: &[&str]) -> (i32, String, String) {
        let out = Command::new(BIN)
            .args(args)
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
}

#[test]
fn gpu_probe_without_a_driver_names_the_library_and_what_to_install() {
    if cvm_warden::tee::nvidia::RealNvml::open().is_ok() {
        eprintln!("NVML loads on this machine: the no-driver case cannot be shown here");
        return;
    }
    let setup = Setup::new();
    let (code, stdout, stderr) = setup.run(&["gpu", "probe"]);
    assert_eq!(code, 1, "{stdout}{stderr}");
    assert!(stdout.is_empty(), "{stdout}");
    assert!(
        stderr.starts_with("error: cannot load NVML (libnvidia-ml.so.1): ")
            && stderr.contains("install the NVIDIA driver with its NVML library"),
        "{stderr}"
    );
}

#[test]
fn gpu_probe_lists_the_simulated_gpu_and_passes_its_precheck() {
    let setup = Setup::new();
    let recording = setup.recording(|_| {});
    let policy = setup.policy(&format!(
        "count = 1\nsimulate = \"{}\"",
        recording.display()
    ));
    let (code, stdout, stderr) = setup.run(&["gpu", "probe", "--policy", policy.to_str().unwrap()]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["nvml"], "simulated GPU (proves nothing)");
    assert_eq!(report["driver_version"], "550.90.07");
    assert_eq!(
        report["gpus"][0]["uuid"],
        "GPU-5e1f0000-0000-4000-8000-000000000001"
    );
    assert_eq!(report["gpus"][0]["arch"], "hopper");
    assert_eq!(report["cc_state"]["cc_feature"], true);
    assert_eq!(report["ready_state"], false);
    assert_eq!(report["precheck"]["result"], "passed");
    assert!(report["precheck"]["facts"][0]["fwid"]
        .as_str()
        .unwrap()
        .starts_with("f5c384ae"));
}

#[test]
fn gpu_probe_prints_the_exact_refusal_when_cc_is_off() {
    let setup = Setup::new();
    let recording = setup.recording(|json| json["cc"]["cc_feature"] = false.into());
    let policy = setup.policy(&format!("simulate = \"{}\"", recording.display()));
    let (code, stdout, stderr) = setup.run(&["gpu", "probe", "--policy", policy.to_str().unwrap()]);
    assert_eq!(code, 1, "{stdout}{stderr}");
    let expected = "error: stage gpu failed\n  because: gpu: GPU precheck ([attestation.gpu])\n  because: nvidia: GPU 0 (GPU-5e1f0000-0000-4000-8000-000000000001, hopper): confidential computing is off (ccFeature disabled, environment Prod); [attestation.gpu] requires CC mode";
    assert!(stderr.starts_with(expected), "{stderr}");
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["precheck"]["result"], "refused");
    assert_eq!(report["cc_state"]["cc_feature"], false);
    assert!(report["precheck"]["error"]
        .as_str()
        .unwrap()
        .contains("confidential computing is off"));
}

#[test]
fn policy_check_and_plan_show_the_gpu_requirements() {
    let setup = Setup::new();
    let policy = setup.policy("count = 2\narch = [\"hopper\"]\nmin_driver = \"550.90.07\"");
    for args in [&["policy", "check"][..], &["plan", "--policy"]] {
        let mut args = args.to_vec();
        args.push(policy.to_str().unwrap());
        let (code, stdout, stderr) = setup.run(&args);
        assert_eq!(code, 0, "{stdout}{stderr}");
        let json: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        let gpu = json
            .pointer("/policy/attestation/gpu")
            .or_else(|| json.pointer("/stages/attest/gpu"))
            .unwrap_or_else(|| panic!("no gpu in {stdout}"));
        assert_eq!(gpu["count"], 2);
        assert_eq!(gpu["arch"], serde_json::json!(["hopper"]));
        assert_eq!(gpu["min_driver"], "550.90.07");
        assert_eq!(gpu["allow_devtools"], false);
    }
}

#[test]
fn reference_values_include_the_simulated_gpus_event_and_refuse_real_gpus() {
    let setup = Setup::new();
    let cmdline = setup.dir.path().join("cmdline");
    std::fs::write(&cmdline, "console=ttyS0\n").unwrap();
    let recording = setup.recording(|_| {});
    let policy = setup.policy(&format!("simulate = \"{}\"", recording.display()));
    let args = [
        "reference-values",
        "--policy",
        policy.to_str().unwrap(),
        "--cmdline",
        cmdline.to_str().unwrap(),
    ];
    let (code, stdout, stderr) = setup.run(&args);
    assert_eq!(code, 0, "{stdout}{stderr}");
    let values: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let kinds: Vec<&str> = values["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(&kinds[..3], ["ruleset", "gpu", "policy"]);
    let gpu: serde_json::Value =
        serde_json::from_str(values["events"][1]["description"].as_str().unwrap()).unwrap();
    assert_eq!(gpu["uuid"], "GPU-5e1f0000-0000-4000-8000-000000000001");

    let policy = setup.policy("count = 1");
    let args = [
        "reference-values",
        "--policy",
        policy.to_str().unwrap(),
        "--cmdline",
        cmdline.to_str().unwrap(),
    ];
    let (code, stdout, stderr) = setup.run(&args);
    assert_ne!(code, 0, "{stdout}{stderr}");
    assert!(
        stderr.contains("reference values with [attestation.gpu]")
            && stderr.contains("not supported by this build yet"),
        "{stderr}"
    );
}
