//! `cargo xtask demo`: the sandbox demo, end to end with a software TPM and the test broker.
//!
//! Everything runs inside a network namespace the demo creates (`cvm-warden-demo`, loopback
//! only): `swtpm` plays the VM's vTPM, `kbs-test-broker` plays the Trustee key broker, and
//! `cvm-warden init` runs as PID 1 of new PID, mount and UTS namespaces in it.
//!
//! 1. The image builder provisions an attestation key at a persistent handle (tpm2-tools),
//!    and the model owner computes the reference value: PCR 15 after the measure stage
//!    (`cvm-warden reference-values`).
//! 2. The operator's dry run (`cvm-warden attest`) against a broker that does not trust the
//!    AK yet: evidence `warning`, the secret is refused — and the AK to register is printed.
//! 3. Act 1: the broker trusts the AK and requires PCR 15; the VM "reboots" (swtpm restarts,
//!    PCRs reset), boots: bundle digest extended into PCR 15 → quote → broker checks it →
//!    secret released into a tmpfs → the workload reads it; the audit log verifies with its
//!    evidence.
//! 4. Act 2, continuous trust: a long-running workload under a policy that re-attests every
//!    5 s (`attestation.reattest_interval`) and asks for its secret again each time; the
//!    owner then revokes it at the broker (its PCR 15 is no longer the registered one): the
//!    next re-attestation is refused, the workload is stopped (SIGTERM), its secret removed,
//!    and the run ends fail-closed with the reason in the closing record.
//! 5. Act 3: one bundle file changes; reboot: PCR 15 differs, the broker refuses
//!    (PolicyDeny), no secret, the workload never starts, the audit log says why.
//! 6. Act 4, a GPU (`gpu.rs`): the simulated H100 of `tests/data/nvidia-sim` under
//!    `[attestation.gpu]`, the broker trusting its TEST root and requiring one GPU: the GPU's
//!    facts measured, its report sent with the quote, `gpu0` in the token, the secret
//!    released, the GPU made ready after `unlock/ok`; a re-attestation affirms, then the GPU
//!    leaves CC mode and the next one stops the workload (fail closed, `gpu/not_ready`);
//!    `audit verify` checks the GPU evidence (exit 3 with `--gpu-root`: not NVIDIA's root);
//!    a broker requiring a newer driver refuses the secret.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use anyhow::{bail, ensure, Context, Result};

use crate::sandbox::{
    audit_verify_attested, boot, build_bins, json_of, provision_ak, Bins, Broker, Netns, Swtpm,
};
use crate::{ensure_tools, is_root, sh, show, TOOLS};

mod gpu;

/// Where the example policy expects the bundle and the audit log (not under /run or /tmp:
/// PID 1 mounts fresh tmpfs there when they are not mount points).
const DEMO_DIR: &str = "/var/lib/cvm-warden-demo";
/// The network namespace everything runs in.
const NETNS: &str = "cvm-warden-demo";
/// swtpm's ports (the policy's `attestation.tpm` names the first).
/// The broker's address (the policy's `attestation.kbs`).
const BROKER_LISTEN: &str = "127.0.0.1:18999";
/// The persistent AK handle (the policy's `attestation.tpm_ak_handle`).
/// The broker resource of the workload's TLS key (the policy's `[[secret]]`).
const SECRET_RESOURCE: &str = "default/secrets/fl-client-key";
/// The line the example workload prints when it ran.
const WORKLOAD_MARK: &str = "workload: hello from the federated-learning participant";

pub(crate) fn run(root: &Path) -> Result<()> {
    ensure_tools(TOOLS)?;
    if !is_root() {
        bail!("the demo creates namespaces and mounts: run it as root");
    }
    let bins = build_bins(root)?;
    let demo = Path::new(DEMO_DIR);
    if demo.exists() {
        fs::remove_dir_all(demo).with_context(|| format!("removing {}", demo.display()))?;
    }
    let result = Netns::create(NETNS).and_then(|netns| acts(root, &bins, demo, &netns));
    let _ = fs::remove_dir_all(demo);
    result
}

fn acts(root: &Path, bins: &Bins, demo: &Path, netns: &Netns) -> Result<()> {
    stage_bundle(&root.join("examples/bundle"), &demo.join("bundle"))?;
    // The policy is read after PID 1 has mounted a fresh tmpfs on /tmp and /run, so it must
    // not live there (the checkout might): copy it next to the bundle.
    let policy = &demo.join("policy.toml");
    fs::copy(root.join("examples/policy.toml"), policy).context("copying the example policy")?;

    banner("the example policy, validated and normalised");
    sh(Command::new(&bins.warden)
        .args(["policy", "check"])
        .arg(policy))?;

    banner("image builder: the VM's TPM gets a persistent attestation key");
    let tpm_state = demo.join("tpm");
    fs::create_dir_all(&tpm_state)?;
    let mut tpm = Swtpm::start(netns, &tpm_state)?;
    provision_ak(netns, demo)?;

    banner("model owner: reference values for the broker (PCR 15 after the measure stage)");
    let reference = json_of(
        Command::new(&bins.warden)
            .args(["reference-values", "--policy"])
            .arg(policy),
    )?;
    let pcr15 = reference["tpm"]["value"]
        .as_str()
        .context("reference-values printed no tpm.value")?
        .to_string();
    println!(
        "bundle digest {}\nPCR 15 after the measure stage: {pcr15}",
        reference["bundle_digest"]
    );

    let secret = demo.join("fl-client.key");
    fs::write(
        &secret,
        "-----BEGIN PRIVATE KEY----- (demo FL client key, released by the broker) -----END PRIVATE KEY-----\n",
    )?;

    banner("operator dry run: `cvm-warden attest` against a broker that does not know the AK yet");
    let broker = Broker::start(
        netns,
        &bins.broker,
        demo,
        &broker_config(&[], &[pcr15.as_str()]),
        BROKER_LISTEN,
    )?;
    let dry = netns.command(&bins.warden);
    let mut dry = dry;
    dry.args(["attest", "--policy"]).arg(policy);
    eprintln!("$ {}", show(&dry));
    let out = dry.output().context("running the attest dry run")?;
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "the dry run printed no JSON: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    ensure!(
        !out.status.success(),
        "the dry run released the secret to an AK the broker does not trust"
    );
    ensure!(
        report["status"] == "warning",
        "an untrusted AK must give status warning"
    );
    let ak = report["ak"]["spki_der_base64"]
        .as_str()
        .context("the dry run did not print the AK")?
        .to_string();
    ensure!(
        report["provider"]["provider"]["ak_public"] == ak.as_str(),
        "the dry run's AK names disagree"
    );
    let refusal = report["resources"][0]["error"].as_str().unwrap_or_default();
    ensure!(
        refusal.contains("instance-identity=0 (no claim)")
            && refusal.contains("an AK that is not in trusted_aks"),
        "the refusal does not say what the broker's token says about the AK: {refusal}"
    );
    broker.stop();
    println!(
        "\nthe operator registers this AK ({}) with the broker's trusted_aks: {ak}",
        report["ak"]["sha256"].as_str().unwrap_or_default()
    );

    banner("model owner: register the workload at the broker through its admin API (what a Trustee KBS takes as is)");
    let broker = register_at_broker(netns, bins, demo, policy, &ak)?;

    banner("act 1: reboot (fresh PCRs) and boot the intact bundle; the broker now trusts the AK and requires PCR 15");
    tpm.restart()?;
    let out = boot(netns, &bins.warden, policy)?;
    ensure!(
        out.status.success(),
        "the demo boot failed with {}; see the output above",
        out.status
    );
    ensure!(
        out.stdout.contains(WORKLOAD_MARK),
        "the workload did not print {WORKLOAD_MARK:?}"
    );
    ensure!(
        out.stdout
            .contains("workload: TLS key /run/cvm-warden/secrets/fl-client.key:")
            && out.stdout.contains("mode 400, owner nobody"),
        "the workload did not read its released TLS key"
    );
    broker.stop();
    banner("the allowlist the workload ran behind (nft list table inet cvm_warden, in the VM's network namespace)");
    let listing = netns
        .command(Path::new("nft"))
        .args(["list", "table", "inet", "cvm_warden"])
        .output()
        .context("running nft list table")?;
    let listing = String::from_utf8_lossy(&listing.stdout).into_owned();
    print!("{listing}");
    ensure!(
        listing.contains("comment \"inbound tcp 8002 (network.inbound[0])\"")
            && listing.contains("comment \"outbound tcp 192.0.2.10:8002 (network.outbound[0])\""),
        "the allowlist is not in place after the boot"
    );
    ensure!(
        !listing.contains("comment \"key broker tcp"),
        "the perimeter's broker rule survived the allowlist"
    );
    // Re-attestation is on by default (every 10 minutes): the broker stays reachable.
    ensure!(
        listing.contains(
            "comment \"key broker (re-attestation) tcp 127.0.0.1:18999 (attestation.kbs)\""
        ),
        "the allowlist does not keep the broker for re-attestation"
    );
    let log = demo.join("audit.jsonl");
    banner("the audit log");
    let text = fs::read_to_string(&log).context("reading the audit log")?;
    print!("{text}");
    ensure!(
        !text.contains("demo FL client key"),
        "the secret appears in the audit log"
    );
    for (stage, what) in [
        ("perimeter", "\"phase\":\"perimeter\""),
        ("perimeter", "\"checks\""),
        ("allowlist", "\"phase\":\"allowlist\""),
    ] {
        ensure!(
            text.lines().any(
                |l| l.contains(&format!("\"stage\":\"{stage}\",\"event\":\"ok\""))
                    && l.contains(what)
            ),
            "the audit log has no {stage} record with {what}"
        );
    }
    banner("the audit log, verified offline with its evidence (the auditor pins the AK the broker trusts)");
    let trusted_ak = demo.join("trusted-ak.b64");
    fs::write(&trusted_ak, format!("{ak}\n")).context("writing the trusted AK for the auditor")?;
    audit_verify_attested(&bins.warden, &log, &trusted_ak)?;

    continuous_trust(netns, bins, demo, policy, &mut tpm, &ak, &trusted_ak)?;

    banner("act 3: a file of the bundle changes; reboot and boot again");
    fs::remove_file(&log).context("removing the earlier audit log")?;
    let tampered = demo.join("bundle/startup/start.sh");
    let mut perms = fs::metadata(&tampered)?.permissions();
    perms.set_mode(0o755);
    let mut script = fs::read_to_string(&tampered)?;
    script.push_str("echo 'workload: exfiltrating the model' >&2\n");
    fs::write(&tampered, script)?;
    fs::set_permissions(&tampered, perms)?;
    tpm.restart()?;
    let broker = Broker::start(
        netns,
        &bins.broker,
        demo,
        &broker_config(&[ak.as_str()], &[pcr15.as_str()]),
        BROKER_LISTEN,
    )?;
    let out = boot(netns, &bins.warden, policy)?;
    let broker_log = broker.stop();
    ensure!(
        !out.status.success(),
        "the boot with a tampered bundle succeeded: fail-closed is broken"
    );
    ensure!(
        !out.stdout.contains(WORKLOAD_MARK),
        "the workload ran although the bundle was tampered with"
    );
    ensure!(
        broker_log.contains("PolicyDeny"),
        "the broker did not refuse the resource:\n{broker_log}"
    );
    let text = fs::read_to_string(&log).context("reading the second audit log")?;
    let failed = text
        .lines()
        .find(|l| l.contains("\"event\":\"failed\""))
        .context("the audit log has no failed record")?;
    ensure!(
        failed.contains("kbs:///default/secrets/fl-client-key") && failed.contains("PolicyDeny"),
        "the failed record does not say the broker refused the secret: {failed}"
    );
    ensure!(
        failed.contains("executables=33") && failed.contains("instance-identity=2"),
        "the failed record does not say which check failed (the token's trust vector): {failed}"
    );
    banner("the broker's view");
    print!("{broker_log}");
    banner("the record that stopped the boot");
    println!("{failed}");
    audit_verify_attested(&bins.warden, &log, &trusted_ak)?;
    // Act 4 boots the intact bundle again.
    stage_bundle(&root.join("examples/bundle"), &demo.join("bundle"))?;
    gpu::act(root, netns, bins, demo, &mut tpm, &ak, &trusted_ak)?;
    tpm.stop()?;
    banner("demo done: intact bundle attested, secret released, workload ran; revoked mid-run, stopped at the next re-attestation; tampered bundle refused by the broker, no secret, no workload; GPU attested with the TPM, stopped when it left CC mode, refused for an old driver");
    Ok(())
}

/// Act 2, continuous trust: the example policy with re-attestation every 5 s (the secret
/// asked for again each time) and a workload that runs for minutes; once two re-attestations
/// were affirmed, the owner revokes the workload at the broker (the broker restarts with
/// another PCR 15 registered) and the next re-attestation stops it, fail-closed.
fn continuous_trust(
    netns: &Netns,
    bins: &Bins,
    demo: &Path,
    policy: &Path,
    tpm: &mut Swtpm,
    ak: &str,
    trusted_ak: &Path,
) -> Result<()> {
    banner("act 2: continuous trust: re-attestation every 5 s while the workload runs; the owner revokes it mid-run");
    let log = demo.join("audit.jsonl");
    fs::remove_file(&log).context("removing the first audit log")?;
    let reattesting = demo.join("policy-reattest.toml");
    fs::write(&reattesting, reattesting_policy(policy)?)?;
    let reference = json_of(
        Command::new(&bins.warden)
            .args(["reference-values", "--policy"])
            .arg(&reattesting),
    )?;
    let pcr15 = reference["tpm"]["value"]
        .as_str()
        .context("reference-values printed no tpm.value")?
        .to_string();
    // What every re-attestation quotes: PCR 15 after the allowlist and the separator too.
    let running = reference["tpm"]["reattest_value"]
        .as_str()
        .context("reference-values printed no tpm.reattest_value for a re-attesting policy")?
        .to_string();
    println!("PCR 15 after the measure stage: {pcr15}\nPCR 15 while the workload runs: {running}");
    tpm.restart()?;
    let broker = Broker::start(
        netns,
        &bins.broker,
        demo,
        &broker_config(&[ak], &[pcr15.as_str(), running.as_str()]),
        BROKER_LISTEN,
    )?;
    let console = demo.join("act2-console.log");
    let mut child = crate::sandbox::spawn_boot(netns, &bins.warden, &reattesting, &console)?;
    let reattested = |n: usize| {
        fs::read_to_string(&log)
            .map(|t| t.matches("\"event\":\"reattested\"").count() >= n)
            .unwrap_or(false)
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
    while !reattested(2) {
        if std::time::Instant::now() > deadline || child.try_wait()?.is_some() {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "no two affirmed re-attestations within 90 s; the console:\n{}",
                fs::read_to_string(&console).unwrap_or_default()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    println!("two re-attestations affirmed while the workload runs; the owner now revokes it");
    broker.stop();
    let broker = Broker::start(
        netns,
        &bins.broker,
        demo,
        &broker_config(&[ak], &["0".repeat(64).as_str()]),
        BROKER_LISTEN,
    )?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "the workload was still running 60 s after the revocation: fail-closed is broken"
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    let broker_log = broker.stop();
    let console_text = fs::read_to_string(&console).unwrap_or_default();
    ensure!(
        !status.success(),
        "the run ended with {status} after a refused re-attestation: fail-closed is broken"
    );
    ensure!(
        !console_text.contains("workload: done"),
        "the workload finished although its trust was revoked"
    );
    let text = fs::read_to_string(&log).context("reading the act 2 audit log")?;
    let failed = text
        .lines()
        .find(|l| l.contains("\"event\":\"reattest_failed\""))
        .context("the audit log has no attest/reattest_failed record")?;
    // The revoked PCR 15 makes the broker's token `warning` (executables=33): refused before
    // the secret is even asked for.
    ensure!(
        failed.contains("\"kind\":\"refused\"")
            && (failed.contains("does not affirm") || failed.contains("PolicyDeny")),
        "the reattest_failed record does not say the broker refused: {failed}"
    );
    let closing = text
        .lines()
        .find(|l| l.contains("\"stage\":\"shutdown\""))
        .context("the audit log has no closing record")?;
    ensure!(
        closing.contains("trust lost (refused)"),
        "the closing record does not give the reason: {closing}"
    );
    for event in ["stopping", "cleanup", "trust_lost"] {
        ensure!(
            text.contains(&format!("\"event\":\"{event}\"")),
            "the audit log has no {event} record"
        );
    }
    banner("the broker's view");
    print!("{broker_log}");
    banner("the workload's console, stopped mid-run");
    print!("{console_text}");
    banner("the record that stopped the workload, and the closing record");
    println!("{failed}\n{closing}");
    audit_verify_attested(&bins.warden, &log, trusted_ak)?;
    Ok(())
}

/// The demo policy with a long-running workload (1000 rounds, 1 s apart) that re-attests
/// every 5 s and asks for its secret again each time (acts 2 and 4).
fn reattesting_policy(policy: &Path) -> Result<String> {
    let text = fs::read_to_string(policy).context("reading the demo policy")?;
    let text = text
        .replace(
            "/startup/start.sh\", \"3\"]",
            "/startup/start.sh\", \"1000\", \"1\"]",
        )
        .replace(
            "timeout = \"30s\"\n",
            &format!("timeout = \"30s\"\nreattest_interval = \"5s\"\nreattest_grace = \"3s\"\nreattest_resource = \"kbs:///{SECRET_RESOURCE}\"\n"),
        );
    ensure!(
        text.contains("\"1000\", \"1\"]") && text.contains("reattest_interval"),
        "the example policy no longer has the lines the re-attesting acts change"
    );
    Ok(text)
}

/// The broker's configuration, as a Trustee deployment registers it (KBS-PROTOCOL.md,
/// "Administering a real Trustee KBS"): the AK in `trusted_aks`, PCR 15 as the `tpm_pcr15`
/// reference value the attestation policy compares, and the secret released only to an
/// `affirming` token.
fn broker_config(trusted_aks: &[&str], pcr15: &[&str]) -> String {
    let aks: Vec<String> = trusted_aks.iter().map(|a| format!("{a:?}")).collect();
    let pcrs: Vec<String> = pcr15.iter().map(|p| format!("{p:?}")).collect();
    format!(
        "# written by cargo xtask demo\ntrusted_aks = [{}]\n\n[reference_values]\ntpm_pcr15 = [{}]\n\n[resources.\"{SECRET_RESOURCE}\"]\nvalue_file = \"fl-client.key\"\npolicy = {{ tees = [\"tpm\"], require = \"affirming\" }}\n",
        aks.join(", "),
        pcrs.join(", ")
    )
}

/// The model owner's registration: an Ed25519 admin key, a broker with only its admin API
/// configured (nothing registered), `cvm-warden reference-values --format trustee` for the
/// policy and the operator's AK, and `cvm-warden broker register` with an attestation policy
/// that reads PCR 15, the resource policy and the secret. Returns the broker, left running
/// for act 1.
fn register_at_broker(
    netns: &Netns,
    bins: &Bins,
    demo: &Path,
    policy: &Path,
    ak_base64: &str,
) -> Result<Broker> {
    use base64::Engine;
    let key = demo.join("owner-admin.pem");
    sh(Command::new("openssl")
        .args(["genpkey", "-algorithm", "ed25519", "-out"])
        .arg(&key))?;
    sh(Command::new("openssl")
        .args(["pkey", "-pubout", "-in"])
        .arg(&key)
        .arg("-out")
        .arg(demo.join("owner-admin.pub.pem")))?;
    let ak = demo.join("ak.der");
    fs::write(
        &ak,
        base64::engine::general_purpose::STANDARD
            .decode(ak_base64)
            .context("the AK the dry run printed is not base64")?,
    )?;
    let broker = Broker::start(
        netns,
        &bins.broker,
        demo,
        "# written by cargo xtask demo: a fresh broker, only its admin API configured\n[admin]\npublic_key = \"owner-admin.pub.pem\"\nissuer = \"model-owner\"\naudience = \"kbs\"\nrole = \"admin\"\n",
        BROKER_LISTEN,
    )?;
    let values = json_of(
        Command::new(&bins.warden)
            .args(["reference-values", "--format", "trustee", "--policy"])
            .arg(policy)
            .arg("--ak")
            .arg(&ak)
            // Nothing measures into the demo TPM's PCR 11.
            .args(["--tpm-pcr11", &"0".repeat(64)]),
    )?;
    println!("{}", serde_json::to_string_pretty(&values)?);
    let values_file = demo.join("trustee-values.json");
    fs::write(&values_file, serde_json::to_vec_pretty(&values)?)?;
    let lines: Vec<&str> = values["attestation_policy"]["lines"]
        .as_array()
        .context("no attestation_policy.lines")?
        .iter()
        .filter_map(|l| l.as_str())
        .collect();
    ensure!(!lines.is_empty(), "the trustee values carry no PCR 15 line");
    // The owner's default_cpu policy: the tpm executables rule with the printed line added.
    let rego = format!(
        "package policy\n\nimport rego.v1\n\ndefault executables := 33\n\nexecutables := 3 if {{\n\tinput.tpm\n\tinput.tpm.pcr11 in query_reference_value(\"tpm_pcr11\")\n\t{}\n\tinput.tpm.ak_public in query_reference_value(\"trusted_aks\")\n}}\n",
        lines.join("\n\t")
    );
    let rego_file = demo.join("default_cpu.rego");
    fs::write(&rego_file, rego)?;
    let registered = json_of(
        netns
            .command(&bins.warden)
            .args([
                "broker",
                "register",
                "--kbs",
                &format!("http://{BROKER_LISTEN}"),
            ])
            .args(["--insecure-http", "--admin-key"])
            .arg(&key)
            .args(["--issuer", "model-owner", "--values"])
            .arg(&values_file)
            .arg("--attestation-policy")
            .arg(&rego_file)
            .arg("--replace-resource-policy")
            .arg("--resource")
            .arg(format!(
                "{SECRET_RESOURCE}={}",
                demo.join("fl-client.key").display()
            )),
    )?;
    let done = registered["registered"]
        .as_array()
        .map(Vec::len)
        .unwrap_or(0);
    ensure!(
        done == 6,
        "broker register did not register the 3 reference values, the resource policy, the attestation policy and the secret: {registered}"
    );
    println!("{}", serde_json::to_string_pretty(&registered)?);
    Ok(broker)
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
