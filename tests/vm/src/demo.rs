//! The demo CVM (`cargo xtask demo`): the image builder, the model owner and the operator
//! each do their part, then the VM boots with cvm-warden as `/init` and every stage shows on
//! its serial console as it happens; the host then checks from outside: the allowed port
//! answers, the blocked one does not, the volume was written by the workload, and the
//! exported audit log verifies as attested.

use std::process::Command;
use std::time::Instant;

use anyhow::Result;

use crate::host::Broker;
use crate::scenario::{judge, Boot, Ctx, Expect, Guest, Site};

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
    banner(&format!(
        "demo done in {:.0} s: attested boot, volume and key released only to the measured VM, allowlist in force, the log verifies; no key byte on the console, in the log or on the disk",
        start.elapsed().as_secs_f64()
    ));
    Ok(())
}
