//! The demo CVM (`cargo xtask demo`): the image builder, the model owner and the operator
//! each do their part, then the VM boots with cvm-warden as `/init` and every stage shows on
//! its serial console as it happens; the host then checks from outside: the allowed port
//! answers, the blocked one does not, the volume was written by the workload, and the
//! exported audit log verifies as attested. Then the GPU variant: the same CVM with a
//! simulated H100, its evidence verified by the broker (`gpu0`) before any key.

use std::process::Command;
use std::time::Instant;

use anyhow::Result;

use crate::host::Broker;
use crate::scenario::{judge, Boot, Ctx, Expect, Guest, SimGpu, Site, SIM_GPU_AT};
use crate::scenarios;

fn banner(text: &str) {
    println!("\n=== {text} ===");
}

/// Runs the demo.
pub fn run(ctx: &Ctx) -> Result<()> {
    let start = Instant::now();
    let dir = ctx.work.join("demo");
    let guest = Guest::default();

    banner(
        "image builder: the VM's TPM gets a persistent AK; the initramfs has cvm-warden as /init",
    );
    let site = Site::new(ctx, &dir)?;
    println!(
        "AK (base64 SPKI DER): {}…",
        &site.ak[..site.ak.len().min(48)]
    );
    println!("policy:\n{}", guest.policy());

    banner("model owner: PCR 15 after the measure stage (cvm-warden reference-values), registered with the broker with the AK; the volume key and the FL key are released only to it");
    let pcr15 = site.pcr15(ctx, &guest, &site.bundle)?;
    println!("tpm_pcr15 = {pcr15}");
    let broker = Broker::start(
        &ctx.bins,
        &dir.join("broker"),
        &site.broker_config(&pcr15, &site.volume_key)?,
    )?;
    println!("broker on the host at {} (the guest reaches it as 10.0.2.100:5555 through QEMU's guestfwd; no other packet leaves the VM)", broker.addr);

    banner("boot: QEMU (TCG) + swtpm + a blank 64 MiB disk; the serial console, live");
    let mut boot = Boot::new(&site, guest, Some(broker.addr.clone()));
    boot.live = true;
    let booted = boot.run(ctx, "boot")?;
    println!("({})", booted.image);

    banner("host checks");
    for port in &booted.ports {
        println!("port {port}");
    }
    for line in booted.outcome.serial.lines() {
        if line.contains("PROBE ok volume")
            || line.contains("PROBE ok secret")
            || line.contains("PROBE ok capeff")
        {
            println!("{line}");
        }
    }
    judge(
        ctx,
        &site,
        &booted,
        &Expect {
            workload: true,
            closing: "poweroff",
            reasons: vec![],
            verify: 0,
        },
        &dir,
    )?;
    booted.require_ports()?;
    banner("the auditor: cvm-warden-verify audit --trusted-ak AK, on the log exported over virtio-serial");
    let out = Command::new(&ctx.bins.verify)
        .args(["audit", "--trusted-ak"])
        .arg(dir.join("trusted-ak.b64"))
        .arg(dir.join("exported-audit.jsonl"))
        .output()?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    println!("(exit {})", out.status.code().unwrap_or(-1));
    gpu_act(ctx)?;
    banner(&format!(
        "demo done in {:.0} s: attested boot, volume and key released only to the measured VM, allowlist in force, the log verifies; no key byte on the console, in the log or on the disk; with a (simulated) GPU, its evidence verified by the broker before any key and its ready state set only after unlock",
        start.elapsed().as_secs_f64()
    ));
    Ok(())
}

/// The GPU variant: the same CVM with a simulated H100 (`tests/data/nvidia-sim`: a real
/// report re-signed per nonce with a TEST key) behind `[attestation.gpu]`; the broker trusts
/// the TEST root and requires one verified GPU for every key.
fn gpu_act(ctx: &Ctx) -> Result<()> {
    let dir = ctx.work.join("demo-gpu");
    let guest = Guest {
        gpu: Some(SimGpu::default()),
        ..Guest::default()
    };
    banner("GPU variant: a simulated H100 (TEST-signed, proves nothing) in the image; the policy adds [attestation.gpu]; the broker requires gpu0");
    println!(
        "[attestation.gpu]\nsimulate = \"{SIM_GPU_AT}/gpu.json\"\ncount = 1\n\nbroker: [nvidia] extra_roots = [{:?}], require_gpus = 1",
        SimGpu::root().display().to_string()
    );
    let (site, broker) = scenarios::gpu_site(ctx, &dir, &guest)?;
    println!("reference PCR 15 includes the GPU's measured facts (reference-values' gpu event)");
    let mut boot = Boot::new(&site, guest, Some(broker.addr.clone()));
    boot.live = true;
    let booted = boot.run(ctx, "boot")?;

    banner("GPU facts, the broker's gpu0, the auditor's verdict");
    for (stage, event) in [("gpu", "ok"), ("gpu", "ready"), ("gpu", "not_ready")] {
        for record in booted.outcome.records(stage, event) {
            println!(
                "audit #{} {stage}/{event} {}",
                record["seq"], record["details"]
            );
        }
    }
    judge(
        ctx,
        &site,
        &booted,
        &Expect {
            workload: true,
            closing: "poweroff",
            reasons: vec![],
            verify: 3,
        },
        &dir,
    )?;
    booted.require_ports()?;
    let gpu0 = scenarios::require_gpu_boot(&booted, &broker)?;
    println!("broker: {gpu0}");
    println!("{}", scenarios::verdict(ctx, &site, &dir)?);
    println!("(cvm-warden-verify audit --trusted-ak AK --gpu-root {} exits 3: intact, the broker affirmed the CPU (cpu0) and verified the GPU evidence (gpu0), but every record is insecure: the GPU is simulated)", SimGpu::root().display());
    Ok(())
}
