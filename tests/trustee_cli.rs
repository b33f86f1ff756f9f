//! `cvm-warden reference-values --format trustee` and `cvm-warden broker register` as a model
//! owner runs them (no root, no TEE): the printed payloads, and the refusals that keep a
//! registration from meaning less than it says. The registration itself against a broker
//! is in `kbs_protocol.rs` (library) and the namespace demo (`cargo xtask demo --sandbox`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::Command;

use base64::Engine;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_cvm-warden");

struct Owner {
    dir: tempfile::TempDir,
}

impl Owner {
    fn new(tee: &str) -> Owner {
        let dir = tempfile::tempdir().unwrap();
        let bundle = dir.path().join("bundle/startup");
        std::fs::create_dir_all(&bundle).unwrap();
        std::fs::write(bundle.join("start.sh"), "#!/bin/sh\necho hi\n").unwrap();
        std::fs::write(
            dir.path().join("passwd"),
            "root:x:0:0::/root:/bin/sh\nflare:x:1000:1000::/home/flare:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("group"), "root:x:0:\nflare:x:1000:\n").unwrap();
        std::fs::write(dir.path().join("cmdline"), "console=ttyS0\n").unwrap();
        // snp has no runtime register: the policy pins the bundle digest.
        let digest = if tee == "snp" {
            let out = Command::new(BIN)
                .args(["measure", "--json"])
                .arg(dir.path().join("bundle"))
                .output()
                .unwrap();
            let manifest: Value = serde_json::from_slice(&out.stdout).unwrap();
            format!("digest = {}\n", manifest["bundle_digest"])
        } else {
            String::new()
        };
        std::fs::write(
            dir.path().join("policy.toml"),
            format!(
                "[workload]\nbundle = \"{b}\"\nsource = \"initramfs\"\nexec = [\"{b}/startup/start.sh\"]\nuser = \"flare\"\n{digest}\n[network]\n\n[attestation]\ntee = \"{tee}\"\nkbs = \"http://127.0.0.1:9\"\ninsecure_http = true\n\n[[secret]]\nname = \"client.key\"\nresource = \"kbs:///default/secret/client-key\"\n\n[[secret]]\nname = \"ca.pem\"\nresource = \"kbs:///default/secret/ca\"\n",
                b = dir.path().join("bundle").display()
            ),
        )
        .unwrap();
        Owner { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn run(&self, args: &[&str]) -> (i32, String, String) {
        let out = Command::new(BIN).args(args).output().unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn reference_values(&self, extra: &[&str]) -> (i32, String, String) {
        let policy = self.path("policy.toml");
        let (passwd, group, cmdline) = (
            self.path("passwd"),
            self.path("group"),
            self.path("cmdline"),
        );
        let mut args = vec![
            "reference-values",
            "--policy",
            policy.to_str().unwrap(),
            "--passwd",
            passwd.to_str().unwrap(),
            "--group",
            group.to_str().unwrap(),
            "--cmdline",
            cmdline.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        self.run(&args)
    }
}

/// An RSA public key as SPKI DER (an AK as `tpm2_readpublic -f der` writes it) and PEM.
fn ak_files(dir: &Path) -> (PathBuf, PathBuf) {
    let key = dir.join("ak-private.pem");
    let ok = Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
        ])
        .arg(&key)
        .output()
        .unwrap();
    assert!(ok.status.success());
    let (der, pem) = (dir.join("ak.der"), dir.join("ak.pem"));
    for (out, form) in [(&der, "DER"), (&pem, "PEM")] {
        let ok = Command::new("openssl")
            .args(["pkey", "-pubout", "-in"])
            .arg(&key)
            .args(["-outform", form, "-out"])
            .arg(out)
            .output()
            .unwrap();
        assert!(ok.status.success());
    }
    (der, pem)
}

#[test]
fn the_trustee_format_prints_what_a_trustee_kbs_takes() {
    let owner = Owner::new("tpm");
    let (der, pem) = ak_files(owner.dir.path());
    let (code, json_out, stderr) = owner.reference_values(&[]);
    assert_eq!(code, 0, "{stderr}");
    let plain: Value = serde_json::from_str(&json_out).unwrap();
    let pcr15 = plain["tpm"]["value"].as_str().unwrap().to_string();
    // The policy re-attests (the default interval): PCR 15 while the workload runs too.
    let running = plain["tpm"]["reattest_value"].as_str().unwrap().to_string();
    assert_ne!(running, pcr15);

    let pcr11 = "00".repeat(32);
    let (code, out, stderr) = owner.reference_values(&[
        "--format",
        "trustee",
        "--ak",
        der.to_str().unwrap(),
        "--ak",
        pem.to_str().unwrap(),
        "--tpm-pcr11",
        &pcr11,
    ]);
    assert_eq!(code, 0, "{stderr}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["format"], "trustee");
    assert_eq!(
        v["reference_values"]["tpm_pcr15"],
        serde_json::json!([pcr15, running])
    );
    let rego = v["resource_policy"]["rego"].as_str().unwrap();
    assert!(
        rego.contains(&format!(".tpm.pcr15 == \"{pcr15}\""))
            && rego.contains(&format!(".tpm.pcr15 == \"{running}\"")),
        "{rego}"
    );
    assert_eq!(
        v["reference_values"]["tpm_pcr11"],
        serde_json::json!([pcr11])
    );
    // Both AK files name the same key: the SPKI DER, base64.
    let der_b64 = base64::engine::general_purpose::STANDARD.encode(std::fs::read(&der).unwrap());
    assert_eq!(
        v["reference_values"]["trusted_aks"],
        serde_json::json!([der_b64.clone(), der_b64])
    );
    assert_eq!(
        v["attestation_policy"]["lines"],
        serde_json::json!(["input.tpm.pcr15 in query_reference_value(\"tpm_pcr15\")"])
    );
    let rego = v["resource_policy"]["rego"].as_str().unwrap();
    assert!(
        rego.contains("\"default/secret/ca\",\n\t\"default/secret/client-key\","),
        "{rego}"
    );
    assert_eq!(v["warnings"], serde_json::json!([]));
    let paths: Vec<&str> = v["requests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["path"].as_str().unwrap())
        .collect();
    assert_eq!(
        paths,
        [
            "/kbs/v0/reference-value",
            "/kbs/v0/reference-value",
            "/kbs/v0/reference-value",
            "/kbs/v0/resource-policy"
        ]
    );

    // Without the AK and PCR 11, the output says what is missing.
    let (code, out, _) = owner.reference_values(&["--format", "trustee"]);
    assert_eq!(code, 0);
    let v: Value = serde_json::from_str(&out).unwrap();
    let warnings = v["warnings"].to_string();
    assert!(
        warnings.contains("--ak") && warnings.contains("--tpm-pcr11"),
        "{warnings}"
    );

    // A file that is not a public key is refused naming it.
    let bogus = owner.path("bogus.der");
    std::fs::write(&bogus, b"not a key").unwrap();
    let (code, _, stderr) =
        owner.reference_values(&["--format", "trustee", "--ak", bogus.to_str().unwrap()]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("bogus.der") && stderr.contains("tpm2_readpublic"),
        "{stderr}"
    );
    let (code, _, stderr) = owner.reference_values(&["--format", "trustee", "--tpm-pcr11", "1234"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("tpm_pcr11"), "{stderr}");
}

#[test]
fn snp_policies_get_the_launch_measurement_and_no_pcrs() {
    let owner = Owner::new("snp");
    let measurement = "ab".repeat(48);
    let (code, out, stderr) =
        owner.reference_values(&["--format", "trustee", "--snp-measurement", &measurement]);
    assert_eq!(code, 0, "{stderr}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        v["reference_values"],
        serde_json::json!({ "snp_launch_measurement": [measurement] })
    );
    assert_eq!(v["attestation_policy"]["lines"], serde_json::json!([]));
    let (_, out, _) = owner.reference_values(&["--format", "trustee"]);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert!(v["warnings"].to_string().contains("--snp-launch"), "{v}");
}

#[test]
fn register_refuses_a_policy_that_ignores_pcr15_and_files_it_did_not_write() {
    let owner = Owner::new("tpm");
    let (code, out, stderr) = owner.reference_values(&["--format", "trustee"]);
    assert_eq!(code, 0, "{stderr}");
    let values = owner.path("values.json");
    std::fs::write(&values, &out).unwrap();
    let key = owner.path("admin.pem");
    assert!(Command::new("openssl")
        .args(["genpkey", "-algorithm", "ed25519", "-out"])
        .arg(&key)
        .status()
        .unwrap()
        .success());
    let rego = owner.path("cpu.rego");
    std::fs::write(
        &rego,
        "package policy\nexecutables := 3 if {\n\tinput.tpm\n}\n",
    )
    .unwrap();
    // Port 9 (discard) on loopback: nothing may be sent, the refusals come first.
    let register = |extra: &[&str]| {
        let mut args = vec![
            "broker",
            "register",
            "--kbs",
            "http://127.0.0.1:9",
            "--insecure-http",
            "--admin-key",
            key.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        owner.run(&args)
    };
    let (code, _, stderr) = register(&[
        "--values",
        values.to_str().unwrap(),
        "--attestation-policy",
        rego.to_str().unwrap(),
    ]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("never reads it") && stderr.contains("tpm_pcr15"),
        "{stderr}"
    );
    // The line commented out does not count.
    std::fs::write(
        &rego,
        "package policy\nexecutables := 3 if {\n\tinput.tpm\n\t# input.tpm.pcr15 in query_reference_value(\"tpm_pcr15\")\n}\n",
    )
    .unwrap();
    let (code, _, stderr) = register(&[
        "--values",
        values.to_str().unwrap(),
        "--attestation-policy",
        rego.to_str().unwrap(),
    ]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("never reads it"), "{stderr}");

    // A values file is read for its values, never replayed: an unknown name is refused.
    let mut edited: Value = serde_json::from_str(&out).unwrap();
    edited["reference_values"]["launch_digest"] = serde_json::json!(["00"]);
    std::fs::write(&values, edited.to_string()).unwrap();
    let (code, _, stderr) = register(&["--values", values.to_str().unwrap()]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("unknown reference value \"launch_digest\""),
        "{stderr}"
    );

    // The plain format is not a registration.
    let (_, plain, _) = owner.reference_values(&[]);
    std::fs::write(&values, plain).unwrap();
    let (code, _, stderr) = register(&["--values", values.to_str().unwrap()]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("--format trustee") && stderr.contains("values.json"),
        "{stderr}"
    );

    // A key that is not Ed25519.
    let (code, _, stderr) = owner.run(&[
        "broker",
        "register",
        "--kbs",
        "http://127.0.0.1:9",
        "--insecure-http",
        "--admin-key",
        rego.to_str().unwrap(),
        "--values",
        values.to_str().unwrap(),
    ]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("cpu.rego") && stderr.contains("Ed25519"),
        "{stderr}"
    );
}
