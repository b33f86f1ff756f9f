//! The scenario list: good boots, the second boot, the regressions of issue 9's eight
//! failures, and the fault matrix.

use std::path::Path;

use anyhow::{ensure, Result};

use crate::host::Broker;
use crate::scenario::{judge, Boot, Ctx, Expect, Guest, Scenario, Site};

/// Every scenario.
pub const ALL: &[Scenario] = &[
    Scenario {
        name: "bare",
        what: "no attestation, no volume, no network: /init reaches the workload and powers off",
        run: bare,
    },
    Scenario {
        name: "good-boot",
        what: "attested boot: network, perimeter, TPM quote, volume formatted, secret, allowlist, probe",
        run: good_boot,
    },
];

fn bare(ctx: &Ctx, dir: &Path) -> Result<String> {
    let site = Site::new(ctx, dir)?;
    let guest = Guest {
        attest: false,
        volume: false,
        secret: false,
        network: false,
        lockdown: false,
        ..Guest::default()
    };
    let booted = Boot::new(&site, guest, None).run(ctx, "boot")?;
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
        dir,
    )?;
    Ok(format!("{:.1} s; {}", booted.outcome.wall.as_secs_f64(), booted.image))
}

fn good_boot(ctx: &Ctx, dir: &Path) -> Result<String> {
    let site = Site::new(ctx, dir)?;
    let guest = Guest::default();
    let pcr15 = site.pcr15(ctx, &guest, &site.bundle)?;
    let broker = Broker::start(
        &ctx.bins,
        &dir.join("broker"),
        &site.broker_config(&pcr15, &site.volume_key)?,
    )?;
    let mut boot = Boot::new(&site, guest, Some(broker.addr.clone()));
    boot.probe_ports = true;
    let booted = boot.run(ctx, "boot")?;
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
        dir,
    )?;
    ensure!(
        booted.ports.iter().any(|p| p.starts_with("8002: VM-PROBE-BANNER"))
            && booted.ports.iter().any(|p| p.starts_with("9000: no banner")),
        "ports: {:?}",
        booted.ports
    );
    Ok(format!("{:.1} s; ports {:?}", booted.outcome.wall.as_secs_f64(), booted.ports))
}
