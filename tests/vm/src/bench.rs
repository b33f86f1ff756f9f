//! `cargo xtask bench vm`: what cvm-warden costs as `/init`, against a trivial `/init` (a
//! busybox script) in the same VM, printed as ratios (not a timed test):
//!
//! - `Run /init` → workload start: the kernel's `Run /init as init process` timestamp to the
//!   workload's first `/proc/uptime` reading, bare (no attestation) and full (TPM quote,
//!   broker, LUKS2 volume, secret, network, lockdown);
//! - the stage times of the full boot from its audit log;
//! - PID 1's resident memory while the workload runs (`VmRSS`, `VmHWM` of `/proc/1/status`).

use anyhow::{Context, Result};

use crate::host::Broker;
use crate::scenario::{Boot, Booted, Ctx, Guest, Site};

/// Kernel log level 7 shows `Run /init as init process` with its timestamp.
const LOGLEVEL: &str = "loglevel=7";

fn run_init_at(serial: &str) -> Option<f64> {
    serial
        .lines()
        .find(|l| l.contains("Run /init as init process"))
        .and_then(|l| l.split(']').next())
        .and_then(|t| t.trim_start_matches('[').trim().parse().ok())
}

fn workload_at(serial: &str) -> Option<f64> {
    serial
        .lines()
        .find_map(|l| l.split("PROBE start uptime ").nth(1))
        .and_then(|t| t.trim().parse().ok())
}

fn probe_field(serial: &str, field: &str) -> Option<u64> {
    serial
        .lines()
        .find_map(|l| l.split(&format!("PROBE pid1 {field}: ")).nth(1))
        .and_then(|t| t.split_whitespace().next())
        .and_then(|t| t.parse().ok())
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

fn init_to_workload(booted: &Booted) -> Result<f64> {
    let serial = &booted.outcome.serial;
    let run = run_init_at(serial).context("no `Run /init` line (loglevel 7)")?;
    let workload = workload_at(serial).context("the workload printed no start time")?;
    Ok(workload - run)
}

/// Runs `boots` boots of each kind and prints the figures.
pub fn run(ctx: &Ctx, boots: usize) -> Result<()> {
    let dir = ctx.work.join("bench");
    let site = Site::new(ctx, &dir)?;
    let trivial_guest = Guest {
        attest: false,
        volume: false,
        secret: false,
        network: false,
        lockdown: false,
        cmdline_extra: LOGLEVEL.into(),
        ..Guest::default()
    };
    let bare_guest = trivial_guest.clone();
    let full_guest = Guest {
        cmdline_extra: LOGLEVEL.into(),
        ..Guest::default()
    };
    let pcr15 = site.pcr15(ctx, &full_guest, &site.bundle)?;
    let broker = Broker::start(
        &ctx.bins,
        &dir.join("broker"),
        &site.broker_config(&pcr15, &site.volume_key)?,
    )?;

    // The trivial /init: busybox prints its uptime like the probe does, then powers off.
    let trivial = trivial_image(ctx, &site)?;
    let (mut t_trivial, mut t_bare, mut t_full) = (Vec::new(), Vec::new(), Vec::new());
    let mut rss = Vec::new();
    let mut stages = String::new();
    for i in 0..boots {
        let booted = Boot::new(&site, trivial_guest.clone(), None).run_image(
            ctx,
            &format!("trivial{i}"),
            &trivial,
        )?;
        t_trivial.push(init_to_workload(&booted)?);
        let booted = Boot::new(&site, bare_guest.clone(), None).run(ctx, &format!("bare{i}"))?;
        t_bare.push(init_to_workload(&booted)?);
        // A fresh blank disk each time: every full boot formats (the first-boot path).
        crate::host::blank_disk(&site.disk, 64)?;
        let boot = Boot::new(&site, full_guest.clone(), Some(broker.addr.clone()));
        let booted = boot.run(ctx, &format!("full{i}"))?;
        t_full.push(init_to_workload(&booted)?);
        let field = |name: &str| probe_field(&booted.outcome.serial, name).unwrap_or(0);
        rss.push((
            field("VmRSS"),
            field("VmHWM"),
            field("RssAnon"),
            field("RssShmem"),
        ));
        stages = stage_times(&booted.outcome.audit);
    }
    let (trivial, bare, full) = (
        median(&mut t_trivial),
        median(&mut t_bare),
        median(&mut t_full),
    );
    println!("bench vm ({boots} boots each, TCG, 1 vCPU; medians; Run /init → workload start):");
    println!("  trivial /init (busybox)        {:7.3} s", trivial);
    println!(
        "  cvm-warden, bare               {:7.3} s  = {:.1}× trivial",
        bare,
        bare / trivial
    );
    println!(
        "  cvm-warden, full attested boot {:7.3} s  = {:.1}× trivial",
        full,
        full / trivial
    );
    println!("  stage times of the last full boot (audit record times):\n{stages}");
    for (now, peak, anon, shmem) in &rss {
        println!(
            "  PID 1 while the workload runs: VmRSS {now} kB ({:.1} MiB; target ≤ 4 MiB) = private RssAnon {anon} kB ({:.1} MiB) + RssShmem {shmem} kB (the binary's and libraries' pages, mapped from the initramfs's tmpfs, shared); peak VmHWM {peak} kB",
            *now as f64 / 1024.0,
            *anon as f64 / 1024.0
        );
    }
    Ok(())
}

/// The trivial `/init`: a busybox script with the same output contract as the probe.
fn trivial_image(ctx: &Ctx, site: &Site) -> Result<std::path::PathBuf> {
    let spec = crate::image::ImageSpec {
        warden: std::path::PathBuf::from("/bin/busybox"),
        binaries: vec![(std::path::PathBuf::from("/bin/busybox"), "/usr/bin/busybox".into())],
        policy: String::new(),
        trees: Vec::new(),
        files: vec![(
            "/init".into(),
            b"#!/usr/bin/busybox sh\n/usr/bin/busybox mount -t proc proc /proc\nread up idle < /proc/uptime\necho \"PROBE start uptime $up\"\n/usr/bin/busybox poweroff -f\n".to_vec(),
            0o755,
        )],
        modules: Vec::new(),
    };
    let out = site.dir.join("trivial.cpio.gz");
    crate::image::build(&ctx.assets, &spec, &out)?;
    Ok(out)
}

/// `stage: N ms` from each stage's `begin` to its `ok`/`failed` record (the network step
/// too), and from the first record to `launch/started`.
fn stage_times(audit: &str) -> String {
    let records: Vec<serde_json::Value> = audit
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let at = |stage: &str, events: &[&str]| {
        records
            .iter()
            .find(|r| r["stage"] == stage && events.iter().any(|e| r["event"] == *e))
            .and_then(|r| r["time"].as_str().and_then(millis))
    };
    let mut out = String::new();
    for stage in [
        "perimeter",
        "network",
        "measure",
        "attest",
        "unlock",
        "allowlist",
        "launch",
    ] {
        if let (Some(begin), Some(end)) = (at(stage, &["begin"]), at(stage, &["ok", "failed"])) {
            out.push_str(&format!("    {stage:<10} {:6} ms\n", end - begin));
        }
    }
    let first = records
        .first()
        .and_then(|r| r["time"].as_str().and_then(millis));
    if let (Some(first), Some(started)) = (first, at("launch", &["started"])) {
        out.push_str(&format!(
            "    first record → launch/started {:6} ms (modules, TEE setup, every stage)\n",
            started - first
        ));
    }
    out
}

/// `2026-12-05T10:16:12.210Z` → milliseconds of the day.
pub fn millis(time: &str) -> Option<i64> {
    let clock = time.split('T').nth(1)?.trim_end_matches('Z');
    let mut parts = clock.split(':');
    let h: i64 = parts.next()?.parse().ok()?;
    let m: i64 = parts.next()?.parse().ok()?;
    let s: f64 = parts.next()?.parse().ok()?;
    Some((h * 3600 + m * 60) * 1000 + (s * 1000.0).round() as i64)
}
