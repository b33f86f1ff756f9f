//! `[workload.flare]` through the binary: `policy check` and `plan` show the kit's pin,
//! `reference-values` verifies the kit (a real one from `nvflare provision`,
//! tests/data/flare) and lists its two events after the bundle's; a tampered kit exits 1
//! naming the file.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_cvm-warden");

fn data() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/flare")
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for entry in std::fs::read_dir(src).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &dst.join(entry.file_name()));
        } else {
            std::fs::copy(entry.path(), dst.join(entry.file_name())).unwrap();
        }
    }
}

/// A bundle that is kit-a's participant folder, its policy (pinned with openssl's fingerprint
/// form), the image's user database and a kernel command line.
struct Setup {
    dir: tempfile::TempDir,
}

impl Setup {
    fn new() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let bundle = dir.path().join("bundle");
        copy_dir(&data().join("kit-a/site-1"), &bundle);
        let pin = std::fs::read_to_string(data().join("kit-a.root-ca-sha256")).unwrap();
        let openssl: Vec<String> = pin
            .trim()
            .as_bytes()
            .chunks(2)
            .map(|pair| String::from_utf8_lossy(pair).to_uppercase())
            .collect();
        std::fs::write(
            dir.path().join("policy.toml"),
            format!(
                "attestation = \"none\"\n\n[workload]\nbundle = \"{b}\"\nsource = \"initramfs\"\nexec = [\"{b}/startup/start.sh\"]\nuser = \"flare\"\n\n[workload.flare]\nstartup_kit = \"{b}\"\nroot_ca_sha256 = \"{}\"\n",
                openssl.join(":"),
                b = bundle.display()
            ),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("passwd"),
            "root:x:0:0::/root:/bin/sh\nflare:x:1000:1000::/home/flare:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("group"), "root:x:0:\nflare:x:1000:\n").unwrap();
        std::fs::write(dir.path().join("cmdline"), "console=ttyS0\n").unwrap();
        Setup { dir }
    }

    fn pin(&self) -> String {
        let pin = std::fs::read_to_string(data().join("kit-a.root-ca-sha256")).unwrap();
        format!("sha256:{}", pin.trim())
    }

    /// Runs `cvm-warden ARGS… --policy-like-arg POLICY --passwd P --group G [EXTRA]`.
    fn run(&self, args: &[&str], extra: &[&str]) -> (i32, String, String) {
        let out = Command::new(BIN)
            .args(args)
            .arg(self.dir.path().join("policy.toml"))
            .args(extra)
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

    fn reference_values(&self) -> (i32, String, String) {
        let cmdline = self.dir.path().join("cmdline");
        self.run(
            &["reference-values", "--policy"],
            &["--cmdline", cmdline.to_str().unwrap()],
        )
    }
}

#[test]
fn policy_check_and_plan_show_the_pinned_kit() {
    let setup = Setup::new();
    let (code, stdout, stderr) = setup.run(&["policy", "check"], &[]);
    assert_eq!(code, 0, "{stderr}");
    let json: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(
        json["policy"]["workload"]["flare"],
        serde_json::json!({ "startup_kit": "", "root_ca_sha256": setup.pin(), "withheld": [] })
    );
    let (code, stdout, stderr) = setup.run(&["plan", "--policy"], &[]);
    assert_eq!(code, 0, "{stderr}");
    let json: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(
        json["stages"]["measure"]["flare"]["root_ca_sha256"],
        setup.pin()
    );
}

#[test]
fn reference_values_verify_the_kit_and_list_its_events_after_the_bundle() {
    let setup = Setup::new();
    let (code, stdout, stderr) = setup.reference_values();
    assert_eq!(code, 0, "{stderr}");
    let json: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let kinds: Vec<&str> = json["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        [
            "policy",
            "kernel-cmdline",
            "bundle",
            "flare-root-ca",
            "flare-kit"
        ]
    );
    assert_eq!(json["events"][3]["digest"], setup.pin());
    let kit = json["events"][4]["description"].as_str().unwrap();
    assert!(
        kit.ends_with("bundle (17 files, 3 directories, 0 withheld)"),
        "{kit}"
    );
}

#[test]
fn reference_values_refuse_a_tampered_kit_naming_the_file() {
    let setup = Setup::new();
    std::fs::write(
        setup.dir.path().join("bundle/startup/fed_client.json"),
        "{\"servers\": []}",
    )
    .unwrap();
    let (code, stdout, stderr) = setup.reference_values();
    assert_eq!(code, 1, "{stdout}{stderr}");
    assert!(
        stderr.contains("startup/fed_client.json: its signature does not verify"),
        "{stderr}"
    );
}
