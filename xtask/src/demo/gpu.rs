//! Act 4 of the sandbox demo: an NVIDIA GPU in confidential-computing mode beside the TPM.
//!
//! The GPU is the simulated H100 of `tests/data/nvidia-sim` (a real H100 report re-signed per
//! nonce with a TEST key, under a TEST root: it proves nothing), copied under the demo
//! directory so its recording can script the GPU leaving CC mode mid-run
//! (`leave_cc_after`). The policy gains `[attestation.gpu]` (one Hopper GPU, driver ≥ 550)
//! and re-attests every 5 s; the broker trusts the TEST root (`[nvidia] extra_roots`) and
//! requires one verified GPU for the secret (`require_gpus = 1`).
//!
//! 1. The boot: the GPU precheck's facts (`gpu/ok`: arch, UUID, driver, VBIOS, FWID,
//!    measurements digest) measured as the `gpu` event (the one `cvm-warden
//!    reference-values` computes, so it is part of the registered PCR 15), the GPU's report
//!    sent with the quote, the broker's token with `gpu0`, the secret released, and the
//!    ready state set (`gpu/ready`) only after `unlock/ok`.
//! 2. The re-attestations affirm while the GPU is in CC mode; then it leaves CC mode: the
//!    next re-attestation fails as a TEE error naming the GPU and the setting, the workload
//!    is stopped, its secret removed, `gpu/not_ready` recorded before the closing record, and
//!    the run ends fail-closed with the reason.
//! 3. `audit verify` checks the GPU evidence inside the boot's exchange (not yet inside the
//!    re-attestation exchanges): without a GPU root pin the TEST root is unknown (the log is
//!    refused, exit 1); with `--gpu-root` the run is at best "not proven" (exit 3): the GPU
//!    root is not NVIDIA's, and the simulated GPU marks every record insecure.
//! 4. The broker requires a newer driver (`[nvidia] min_driver`) than the simulated
//!    550.90.07: the secret is refused, the workload never starts, the log says why.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;

use super::{banner, broker_config, reattesting_policy, BROKER_LISTEN, WORKLOAD_MARK};
use crate::sandbox::{boot, json_of, spawn_boot, Bins, Broker, Netns, Swtpm};

/// Re-attestations the broker affirms before the simulated GPU leaves CC mode.
const AFFIRMED_REATTESTS: u32 = 1;
/// The simulated GPU's driver (`tests/data/nvidia-sim/gpu.json`, the template report's).
const SIM_DRIVER: &str = "550.90.07";
/// What the broker requires in the variant: newer than the simulated driver.
const NEWER_DRIVER: &str = "555.42";

/// Runs the act on the demo policy (`demo/policy.toml`, where the earlier acts copied it);
/// `tpm` restarts before each boot (a reboot: fresh PCRs).
pub(super) fn act(
    root: &Path,
    netns: &Netns,
    bins: &Bins,
    demo: &Path,
    tpm: &mut Swtpm,
    ak: &str,
    trusted_ak: &Path,
) -> Result<()> {
    banner("act 4: a simulated NVIDIA H100 in CC mode beside the TPM (TEST key and root: proves nothing)");
    let act_started = Instant::now();
    let log = demo.join("audit.jsonl");
    if log.exists() {
        fs::remove_file(&log).context("removing the earlier audit log")?;
    }
    let sim = demo.join("nvidia-sim");
    copy_sim(&root.join("tests/data/nvidia-sim"), &sim)?;
    // Attestation reports the GPU serves: one at the precheck, one in the boot's handshake,
    // one per re-attestation. After the last affirmed re-attestation's report it leaves CC
    // mode, so the next re-attestation's CC check fails.
    let leave_after = 2 + AFFIRMED_REATTESTS;
    let recording = sim.join("gpu.json");
    let mut gpu: Value = serde_json::from_str(&fs::read_to_string(&recording)?)
        .context("the simulated GPU's gpu.json is not JSON")?;
    ensure!(
        gpu["driver_version"] == SIM_DRIVER && gpu["cc"]["cc_feature"] == true,
        "the simulated GPU is no longer a {SIM_DRIVER} GPU in CC mode: {gpu}"
    );
    gpu["leave_cc_after"] = leave_after.into();
    fs::write(&recording, serde_json::to_vec_pretty(&gpu)?)?;
    println!(
        "simulated GPU: {} (leave_cc_after = {leave_after}: CC mode turns off after attestation report number {leave_after})",
        recording.display()
    );

    let policy_text = format!(
        "{}\n# Act 4: one simulated Hopper GPU in CC mode (TEST data: every record is insecure).\n[attestation.gpu]\nsimulate = \"{}\"\ncount = 1\narch = [\"hopper\"]\nmin_driver = \"550\"\n",
        reattesting_policy(&demo.join("policy.toml"))?,
        recording.display()
    );
    let gpu_policy = demo.join("policy-gpu.toml");
    fs::write(&gpu_policy, &policy_text)?;
    banner("model owner: reference values with the GPU (its facts are fixed by the recording)");
    let reference = json_of(
        Command::new(&bins.warden)
            .args(["reference-values", "--policy"])
            .arg(&gpu_policy),
    )?;
    let pcr15 = str_at(&reference, "/tpm/value")?;
    let running = str_at(&reference, "/tpm/reattest_value")?;
    let gpu_event = gpu_event_of(&reference)?;
    println!(
        "the gpu event: {}\nPCR 15 after the measure stage: {pcr15}\nPCR 15 while the workload runs: {running}",
        serde_json::to_string(&gpu_event)?
    );

    // 1 and 2: the boot, the re-attestations, the GPU leaving CC mode.
    tpm.restart()?;
    let broker = Broker::start(
        netns,
        &bins.broker,
        demo,
        &gpu_broker_config(ak, &[pcr15.as_str(), running.as_str()], None),
        BROKER_LISTEN,
    )?;
    let console = demo.join("act4-console.log");
    let started = Instant::now();
    let mut child = spawn_boot(netns, &bins.warden, &gpu_policy, &console)?;
    let deadline = started + Duration::from_secs(90);
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "the GPU run was still going 90 s after the boot: the GPU leaving CC mode did not stop it; the console:\n{}",
                fs::read_to_string(&console).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let took = started.elapsed();
    let broker_log = broker.stop();
    let console_text = fs::read_to_string(&console).unwrap_or_default();
    let text = fs::read_to_string(&log).context("reading the act 4 audit log")?;
    let records = parse_log(&text)?;

    banner("the boot's GPU precheck (gpu/ok): the facts measured");
    let ok = find(&records, "gpu", "ok")?;
    let device = &records[ok]["details"]["devices"][0];
    let facts = &device["facts"];
    println!("{}", serde_json::to_string_pretty(device)?);
    ensure!(
        records[ok]["details"]["devices"].as_array().map(Vec::len) == Some(1),
        "gpu/ok lists not exactly the one simulated GPU: {}",
        records[ok]
    );
    ensure!(
        facts["arch"] == "hopper"
            && facts["uuid"] == gpu["gpus"][0]["uuid"]
            && facts["driver_version"] == SIM_DRIVER
            && facts["vbios_version"] == gpu["gpus"][0]["vbios_version"],
        "gpu/ok does not carry the simulated GPU's arch, UUID, driver and VBIOS: {facts}"
    );
    // The template report's FWID (tests/data/nvidia-sim/README.md) and a SHA-384 digest.
    let fwid = facts["fwid"].as_str().unwrap_or_default();
    ensure!(
        fwid.len() == 96 && fwid.starts_with("f5c384ae") && fwid.ends_with("f75d"),
        "gpu/ok's FWID is not the template report's f5c384ae…f75d: {fwid:?}"
    );
    ensure!(
        facts["measurements_digest"]
            .as_str()
            .is_some_and(|d| d.len() == 96 && d.bytes().all(|b| b.is_ascii_hexdigit())),
        "gpu/ok has no SHA-384 measurements digest: {facts}"
    );
    ensure!(
        device["event"]["digest"] == gpu_event["digest"],
        "the measured gpu event ({}) is not the one reference-values computed ({}): PCR 15 cannot match",
        device["event"],
        gpu_event
    );
    ensure!(
        records.iter().all(|r| r["insecure"] == true),
        "a record of a boot with a simulated GPU is not marked insecure"
    );

    banner("the exchange: the GPU's report sent with the quote, the broker's token with gpu0");
    let attested = find(&records, "attest", "attested")?;
    let exchange = &records[attested]["details"];
    let additional = exchange_field(exchange, "additional_evidence")?;
    println!(
        "additional_evidence: {}…",
        additional.chars().take(120).collect::<String>()
    );
    ensure!(
        additional.starts_with("{\"nvidia\":{\"device_evidence_list\":[{\"arch\":\"HOPPER\"")
            && additional.contains(facts["uuid"].as_str().unwrap_or("(none)")),
        "the boot's exchange does not carry the GPU's evidence: {additional}"
    );
    let gpu0 = token_gpu0(exchange)?;
    println!("the token's gpu0: {}", serde_json::to_string(&gpu0)?);
    ensure!(
        gpu0["ear.veraison.annotated-evidence"]["nvidia"]["config"]["driver_version"] == SIM_DRIVER
            && gpu0["ear.veraison.annotated-evidence"]["kbs-test-broker"]["root"]
                .as_str()
                .is_some_and(|r| r.contains("root.pem")),
        "the broker's token has no gpu0 verified under the TEST root: {gpu0}"
    );

    banner("the secret released, then the GPU made ready (the audit log's order)");
    let unlock = find(&records, "unlock", "ok")?;
    let ready = find(&records, "gpu", "ready")?;
    for at in [ok, attested, unlock, ready] {
        println!("{}", summary(&records[at]));
    }
    ensure!(
        ok < attested && attested < unlock && unlock < ready,
        "the order is not gpu/ok < attest/attested < unlock/ok < gpu/ready: {ok} {attested} {unlock} {ready}"
    );
    ensure!(
        records[ready]["details"]["ready"] == true,
        "gpu/ready does not say the ready state was set: {}",
        records[ready]
    );
    ensure!(
        console_text.contains(WORKLOAD_MARK)
            && console_text.contains("workload: TLS key /run/cvm-warden/secrets/fl-client.key:"),
        "the workload did not run with its released TLS key; the console:\n{console_text}"
    );

    banner("continuous trust: re-attestations while the GPU is in CC mode, then it leaves CC mode");
    let failed = find(&records, "attest", "reattest_failed")?;
    let affirmed: Vec<usize> = positions(&records, "attest", "reattested");
    for at in &affirmed {
        println!("{}", summary(&records[*at]));
    }
    ensure!(
        affirmed.len() == AFFIRMED_REATTESTS as usize && affirmed.iter().all(|&at| at < failed),
        "expected exactly {AFFIRMED_REATTESTS} affirmed re-attestation(s) before the failure, found {} (at {affirmed:?}, failure at {failed})",
        affirmed.len()
    );
    for at in &affirmed {
        let additional = exchange_field(&records[*at]["details"], "additional_evidence")?;
        ensure!(
            additional.contains("\"device_evidence_list\":[{\"arch\":\"HOPPER\""),
            "an affirmed re-attestation carries no GPU evidence: {additional}"
        );
    }
    let failure = &records[failed];
    println!("{}", serde_json::to_string(failure)?);
    let error = failure["details"]["error"].as_str().unwrap_or_default();
    ensure!(
        failure["details"]["kind"] == "tee"
            && error.contains("GPU 0")
            && error.contains(facts["uuid"].as_str().unwrap_or("(none)"))
            && error.contains("confidential computing is off")
            && error.contains("[attestation.gpu] requires CC mode"),
        "the failed re-attestation is not a TEE error naming the GPU and the setting: {failure}"
    );
    let stopping = find(&records, "launch", "stopping")?;
    let cleanup = find(&records, "launch", "cleanup")?;
    let lost = find(&records, "attest", "trust_lost")?;
    let not_ready = find(&records, "gpu", "not_ready")?;
    let closing = records
        .iter()
        .rposition(|r| r["stage"] == "shutdown")
        .context("the audit log has no closing record")?;
    for at in [stopping, cleanup, lost, not_ready, closing] {
        println!("{}", summary(&records[at]));
    }
    ensure!(
        failed < stopping && stopping < cleanup && cleanup < not_ready && not_ready < closing,
        "the order is not reattest_failed < stopping < cleanup < gpu/not_ready < closing: {failed} {stopping} {cleanup} {not_ready} {closing}"
    );
    ensure!(
        records[not_ready]["details"]["ready"] == false,
        "gpu/not_ready does not say the ready state was cleared: {}",
        records[not_ready]
    );
    let reason = records[closing].to_string();
    ensure!(
        reason.contains("trust lost (tee)") && reason.contains("confidential computing is off"),
        "the closing record does not give the reason: {reason}"
    );
    ensure!(
        !status.success(),
        "the run ended with {status} after the GPU left CC mode: fail-closed is broken"
    );
    ensure!(
        !console_text.contains("workload: done"),
        "the workload finished although its GPU left CC mode"
    );
    ensure!(
        !text.contains("demo FL client key") && !broker_log.contains("demo FL client key"),
        "the secret appears in the audit log or the broker's log"
    );
    banner("the broker's view");
    print!("{broker_log}");
    banner("the workload's console, stopped mid-run");
    print!("{console_text}");
    println!("(boot to fail-closed stop: {:.1} s)", took.as_secs_f64());

    // 3: the audit log, verified offline with its GPU evidence.
    verify_log(bins, &log, trusted_ak, &sim.join("root.pem"))?;

    // 4: a broker that requires a newer driver.
    banner(&format!(
        "act 4, variant: the broker requires driver >= {NEWER_DRIVER} ([nvidia] min_driver), the GPU has {SIM_DRIVER}"
    ));
    fs::remove_file(&log).context("removing the act 4 audit log")?;
    tpm.restart()?;
    let broker = Broker::start(
        netns,
        &bins.broker,
        demo,
        &gpu_broker_config(ak, &[pcr15.as_str(), running.as_str()], Some(NEWER_DRIVER)),
        BROKER_LISTEN,
    )?;
    let out = boot(netns, &bins.warden, &gpu_policy)?;
    let broker_log = broker.stop();
    ensure!(
        !out.status.success(),
        "the boot succeeded although the broker requires a newer driver"
    );
    ensure!(
        !out.stdout.contains(WORKLOAD_MARK),
        "the workload ran although the broker refused its secret"
    );
    ensure!(
        broker_log.contains("PolicyDeny")
            && broker_log.contains(&format!(
                "gpu0 driver_version \"{SIM_DRIVER}\" is below [nvidia] min_driver \"{NEWER_DRIVER}\""
            )),
        "the broker did not refuse the secret for the driver:\n{broker_log}"
    );
    let text = fs::read_to_string(&log).context("reading the variant's audit log")?;
    let records = parse_log(&text)?;
    ensure!(
        positions(&records, "gpu", "ready").is_empty()
            && positions(&records, "unlock", "ok").is_empty(),
        "the secret was released or the GPU made ready although the broker refused"
    );
    let failed = records
        .iter()
        .find(|r| r["event"] == "failed")
        .context("the variant's audit log has no failed record")?
        .to_string();
    ensure!(
        failed.contains("kbs:///default/secrets/fl-client-key")
            && failed.contains("PolicyDeny")
            && failed.contains("gpu0: ear.status"),
        "the failed record does not say the broker refused the secret, with the token's gpu0: {failed}"
    );
    // Why, from the log: the token's gpu0 claims in the exchange record.
    let attested = find(&records, "attest", "attested")?;
    let gpu0 = token_gpu0(&records[attested]["details"])?;
    let driver = &gpu0["ear.veraison.annotated-evidence"]["nvidia"]["config"]["driver_version"];
    ensure!(
        driver == SIM_DRIVER,
        "the exchange record's token has no gpu0 driver_version {SIM_DRIVER}: {gpu0}"
    );
    banner("the broker's view");
    print!("{broker_log}");
    banner("the record that stopped the boot, and the token's gpu0 driver claim in the exchange record");
    println!("{failed}");
    println!("attest/attested: submods.gpu0 ... nvidia.config.driver_version = {driver} (the broker requires >= {NEWER_DRIVER})");
    println!(
        "\n(act 4 took {:.1} s)",
        act_started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `audit verify` on act 4's log: the GPU evidence inside every exchange is checked. Without
/// a GPU root pin the TEST root is unknown: the log is refused (exit 1) naming the GPU. With
/// `--gpu-root` (the TEST root) and the trusted AK, every exchange verifies but the run is
/// at best "not proven" (exit 3): the GPU's root is not NVIDIA's.
fn verify_log(bins: &Bins, log: &Path, trusted_ak: &Path, test_root: &Path) -> Result<()> {
    banner("the audit log, verified offline: the GPU evidence inside the exchanges is checked");
    let run = |gpu_root: Option<&Path>| -> Result<(Option<i32>, String)> {
        let mut cmd = Command::new(&bins.warden);
        cmd.args(["audit", "verify", "--trusted-ak"])
            .arg(trusted_ak);
        if let Some(root) = gpu_root {
            cmd.arg("--gpu-root").arg(root);
        }
        cmd.arg(log);
        eprintln!("$ {}", crate::show(&cmd));
        let out = cmd.output().context("running audit verify")?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        print!("{text}");
        println!("(exit {:?})", out.status.code());
        Ok((out.status.code(), text))
    };
    let (code, text) = run(None)?;
    ensure!(
        code == Some(1)
            && text.contains("GPU 0 (HOPPER")
            && text.contains("not NVIDIA's device identity root"),
        "audit verify without --gpu-root gave exit {code:?}, expected 1 naming the GPU's unknown root:\n{text}"
    );
    let (code, text) = run(Some(test_root))?;
    let gpu_lines: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("verified: GPU 0 (HOPPER"))
        .collect();
    // The boot's exchange and the one affirmed re-attestation each carry GPU 0's evidence,
    // bound to their own device nonce: both are verified.
    let blocks: Vec<&str> = text.split("  run 1 seq ").collect();
    let boot_exchange = blocks
        .iter()
        .find(|block| block.contains(" broker exchange, tee tpm:"))
        .copied()
        .unwrap_or_default();
    let reattest_exchange = blocks
        .iter()
        .find(|block| block.contains(" re-attestation exchange, tee tpm:"))
        .copied()
        .unwrap_or_default();
    ensure!(
        gpu_lines.len() == 2
            && boot_exchange.contains(gpu_lines[0])
            && reattest_exchange.contains(gpu_lines[1])
            && gpu_lines.iter().all(|l| l.contains("NOT NVIDIA's")
                && l.contains(&format!("driver {SIM_DRIVER}"))
                && l.contains("nonce = the exchange's device binding")),
        "audit verify --gpu-root did not verify the GPU evidence of the boot's exchange and of the re-attestation under the TEST root:\n{text}"
    );
    // The verdict: the simulated GPU marks every record insecure, and the reason names the
    // TEE that answered and why the GPU proves nothing (its root is not NVIDIA's).
    let verdict = text
        .lines()
        .find(|l| l.starts_with("run 1: "))
        .unwrap_or_default();
    ensure!(
        code == Some(3)
            && verdict.starts_with("run 1: unattested (its records are marked insecure (tee tpm")
            && verdict.contains("not NVIDIA's")
            && verdict.contains("complete, tee tpm")
            && text.contains("verdict: 0 of 1 run(s) attested; exit 3"),
        "audit verify --gpu-root gave exit {code:?} and {verdict:?}, expected exit 3, run 1 unattested (its records insecure):\n{text}"
    );
    println!("\n(the verdict: {verdict})");
    Ok(())
}

/// The demo broker's configuration plus `[nvidia]`: the simulated GPU's TEST root trusted
/// beside NVIDIA's, one verified GPU required for every resource, and `min_driver` when set.
fn gpu_broker_config(ak: &str, pcr15: &[&str], min_driver: Option<&str>) -> String {
    let mut config = broker_config(&[ak], pcr15);
    config.push_str(
        "\n# The simulated GPU's TEST root (not NVIDIA's: it proves nothing).\n[nvidia]\nextra_roots = [\"nvidia-sim/root.pem\"]\nrequire_gpus = 1\n",
    );
    if let Some(min) = min_driver {
        config.push_str(&format!("min_driver = \"{min}\"\n"));
    }
    config
}

/// Copies the simulated GPU's directory (flat: its files only).
fn copy_sim(src: &Path, dst: &Path) -> Result<()> {
    if dst.exists() {
        fs::remove_dir_all(dst).with_context(|| format!("removing {}", dst.display()))?;
    }
    fs::create_dir_all(dst)?;
    for entry in fs::read_dir(src).with_context(|| format!("reading {}", src.display()))? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            fs::copy(entry.path(), dst.join(entry.file_name()))
                .with_context(|| format!("copying {}", entry.path().display()))?;
        }
    }
    Ok(())
}

/// The gpu event `reference-values` computed.
fn gpu_event_of(reference: &Value) -> Result<Value> {
    reference["events"]
        .as_array()
        .and_then(|events| events.iter().find(|e| e["kind"] == "gpu"))
        .cloned()
        .with_context(|| format!("reference-values printed no gpu event: {reference}"))
}

fn str_at(value: &Value, pointer: &str) -> Result<String> {
    value
        .pointer(pointer)
        .and_then(Value::as_str)
        .map(str::to_string)
        .with_context(|| format!("reference-values printed no {pointer}: {value}"))
}

fn parse_log(text: &str) -> Result<Vec<Value>> {
    text.lines()
        .map(|l| serde_json::from_str(l).with_context(|| format!("an audit line is not JSON: {l}")))
        .collect()
}

fn positions(records: &[Value], stage: &str, event: &str) -> Vec<usize> {
    records
        .iter()
        .enumerate()
        .filter(|(_, r)| r["stage"] == stage && r["event"] == event)
        .map(|(i, _)| i)
        .collect()
}

/// The first `stage/event` record's index.
fn find(records: &[Value], stage: &str, event: &str) -> Result<usize> {
    positions(records, stage, event)
        .first()
        .copied()
        .with_context(|| format!("the audit log has no {stage}/{event} record"))
}

/// A field of an `attest/attested` or `attest/reattested` record's exchange.
fn exchange_field(details: &Value, field: &str) -> Result<String> {
    details
        .pointer(&format!("/exchange/{field}"))
        .or_else(|| details.get(field))
        .and_then(Value::as_str)
        .map(str::to_string)
        .with_context(|| format!("the exchange record has no {field}: {details}"))
}

/// The broker token's `gpu0` submodule, from the exchange's token claims.
fn token_gpu0(details: &Value) -> Result<Value> {
    details
        .pointer("/exchange/claims/submods/gpu0")
        .or_else(|| details.pointer("/claims/submods/gpu0"))
        .cloned()
        .with_context(|| format!("the exchange's token has no gpu0: {details}"))
}

/// `stage/event` and the record's time, for the order lines.
fn summary(record: &Value) -> String {
    let details = record["details"].to_string();
    let short: String = details.chars().take(160).collect();
    format!(
        "#{} {}/{} {}{}",
        record["seq"],
        record["stage"].as_str().unwrap_or("?"),
        record["event"].as_str().unwrap_or("?"),
        short,
        if details.len() > short.len() {
            "…"
        } else {
            ""
        }
    )
}
