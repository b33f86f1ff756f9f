//! The scenario list: good boots, the second boot, the regressions of the eight failures
//! issue 9 found with cvm-warden as a kernel-started PID 1, and the fault matrix. Each
//! asserts: the workload ran or never started, the VM powered off (or halted) by itself, the
//! exported audit log names the reason and verifies, no key byte in the serial log, the
//! exported log or the disk image.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context, Result};

use crate::host::{self, Broker};
use crate::scenario::{judge, Boot, Booted, Ctx, Expect, Guest, Scenario, Site};

macro_rules! scenario {
    ($name:literal, $what:literal, $run:ident) => {
        Scenario {
            name: $name,
            what: $what,
            run: $run,
        }
    };
}

/// Every scenario, in the order they run (the slow ones first, so two VMs stay busy).
pub const ALL: &[Scenario] = &[
    scenario!("systemd-good", "systemd as PID 1 (Debian image from image/mkimage.sh): cvm-warden.service READY only behind the perimeter, gettys/SSH/rescue/emergency/ctrl-alt-del masked and refused by the live systemd, a Ctrl-Alt-Del burst ignored, the workload exec'd in the unit after attestation, its end powers off", systemd_good),
    scenario!("systemd-attest-refused", "systemd as PID 1, the broker refuses the attestation: cvm-warden.service fails, FailureAction=poweroff ends the VM, the workload never ran", systemd_attest_refused),
    scenario!("good-boot", "attested boot: network, perimeter, TPM quote, LUKS2 volume formatted and owned by the workload, secret 0400, allowlist; the probe and the host check from both sides", good_boot),
    scenario!("second-boot", "boot 2 opens the volume without formatting and reads boot 1's data; boot 3 with a changed bundle is refused", second_boot),
    scenario!("dhcp", "eth0 by DHCPv4 from QEMU's server: the lease is applied and recorded, the allowlist admits only that server's renewals, the attested boot completes", dhcp),
    scenario!("bare", "no attestation, volume or network: /init reaches the workload and powers off (unattested)", bare),
    scenario!("kernel-args", "regression 6: bare words on the kernel command line (`single`, words after `--`) are ignored and recorded, no kernel panic", kernel_args),
    scenario!("no-lockdown-modules", "regression 7: volume + network without [lockdown]: the modules the policy needs are loaded anyway", no_lockdown_modules),
    scenario!("interrupted-format", "regression 5: power lost between luksFormat and mkfs; the next boot makes the volume ready", interrupted_format),
    scenario!("broker-down", "no broker: bounded retries over the timeout, the workload never starts", broker_down),
    scenario!("broker-slow", "a broker slower than attestation.timeout: the boot fails on the timeout", broker_slow),
    scenario!("broker-denies", "the broker's reference PCR 15 differs: PolicyDeny, no key", broker_denies),
    scenario!("wrong-key", "boot 2 gets another key: the volume stays closed, nothing is reformatted, the old key still opens it", wrong_key),
    scenario!("corrupt-header", "a corrupted LUKS2 header: refused, the disk is not written", corrupt_header),
    scenario!("cipher-null-header", "the header swapped for a cipher_null one: refused", cipher_null_header),
    scenario!("data-no-header", "a disk with data but no LUKS2 header: never formatted", data_no_header),
    scenario!("bundle-changed", "a bundle file changed after the reference value was made: refused by the broker", bundle_changed),
    scenario!("bundle-added", "a file added to the bundle: refused by the broker", bundle_added),
    scenario!("bundle-symlink", "a symlink leaving the bundle: the measure stage stops the boot", bundle_symlink),
    scenario!("policy-changed", "the image's policy differs from the one the reference value was made with: refused", policy_changed),
    scenario!("missing-module", "the image lacks dm_crypt, which the policy's volume needs: the boot stops naming it, before any key is asked for", missing_module),
    scenario!("no-tpm", "no TPM device: the boot stops naming it", no_tpm),
    scenario!("workload-crash", "the workload exits 3 with restart = on-failure, max 2: restarted twice, then power-off", workload_crash),
    scenario!("power-button", "QMP system_powerdown while the workload runs: stopped cleanly, power-off recorded", power_button),
    scenario!("audit-disk-full", "the required audit file's volume fills up: the workload is stopped, power-off", audit_disk_full),
    scenario!("hung-nft", "an nft that never returns: the tool timeout fails the perimeter, no hang", hung_nft),
    scenario!("invalid-policy", "an invalid policy in the image powers off (never an exit, never a panic)", invalid_policy),
];

fn systemd_good(ctx: &Ctx, dir: &Path) -> Result<String> {
    crate::systemd::good(ctx, dir)
}

fn systemd_attest_refused(ctx: &Ctx, dir: &Path) -> Result<String> {
    crate::systemd::attest_refused(ctx, dir)
}

/// A good boot's expectation.
fn ran(verify: i32) -> Expect {
    Expect {
        workload: true,
        closing: "poweroff",
        reasons: vec![],
        verify,
    }
}

/// A refused boot: the workload never started, power-off, the log names `reasons`.
fn refused(reasons: Vec<&'static str>, verify: i32) -> Expect {
    Expect {
        workload: false,
        closing: "poweroff",
        reasons,
        verify,
    }
}

fn took(booted: &Booted) -> String {
    format!("{:.1} s", booted.outcome.wall.as_secs_f64())
}

/// A site with its broker configured for `guest` (reference PCR 15 from the intact bundle).
fn attested_site(ctx: &Ctx, dir: &Path, guest: &Guest) -> Result<(Site, Broker)> {
    let site = Site::new(ctx, dir)?;
    let pcr15 = site.pcr15(ctx, guest, &site.bundle)?;
    let broker = Broker::start(
        &ctx.bins,
        &dir.join("broker"),
        &site.broker_config(&pcr15, &site.volume_key)?,
    )?;
    Ok((site, broker))
}

fn good_boot(ctx: &Ctx, dir: &Path) -> Result<String> {
    let guest = Guest::default();
    let (site, broker) = attested_site(ctx, dir, &guest)?;
    let boot = Boot::new(&site, guest, Some(broker.addr.clone()));
    let booted = boot.run(ctx, "boot1")?;
    judge(ctx, &site, &booted, &ran(0), dir)?;
    booted.require_ports()?;
    let serial = &booted.outcome.serial;
    for line in [
        "PROBE ok volume-write",
        "PROBE ok secret",
        "PROBE ok capeff",
        "PROBE ok nonewprivs",
        "PROBE ok lockdown",
        "PROBE ok no-login",
        "PROBE ok outbound-blocked 10.0.2.101:7777",
        "PROBE ok outbound-blocked 10.0.2.100:5555",
        "PROBE ok outbound-allowed 10.0.2.102:7002",
        "PROBE volume-previous none",
    ] {
        ensure!(serial.contains(line), "the probe did not report {line:?}");
    }
    // PCR 15 in the guest is what the log's events replay to.
    let pcr = serial
        .lines()
        .find_map(|l| l.split("PROBE pcr15 ").nth(1))
        .context("the probe printed no PCR 15")?
        .trim()
        .to_string();
    ensure!(
        pcr.len() == 64 && pcr.chars().any(|c| c != '0'),
        "PCR 15 in the guest is {pcr:?}"
    );
    // … and it is the PCR 15 the launch checkpoint's quote signed (which `audit verify`
    // replayed from the measured events).
    let quoted = booted
        .outcome
        .records("audit", "checkpoint")
        .iter()
        .find(|r| r["details"]["kind"] == "launch")
        .and_then(|r| {
            r["details"]["evidence"]["evidence"]["tpm_quote"]["pcrs"][15]
                .as_str()
                .map(str::to_string)
        })
        .context("no launch checkpoint with a TPM quote")?;
    ensure!(
        quoted == pcr,
        "the workload saw PCR 15 {pcr}, the launch checkpoint quoted {quoted}"
    );
    ensure!(
        !booted.outcome.records("unlock", "volume_format").is_empty()
            && !booted.outcome.records("unlock", "volume_ready").is_empty(),
        "boot 1 did not record formatting the blank volume and making it ready"
    );
    // The nftables table in the guest is the intended one: the digest cvm-warden read back
    // there equals the digest of the same policy's allowlist applied by the host in a network
    // namespace of its own.
    let applied = booted
        .outcome
        .records("allowlist", "ok")
        .first()
        .and_then(|r| {
            r["details"]["firewall"]["digest"]
                .as_str()
                .map(str::to_string)
        })
        .context("no allowlist/ok record with a ruleset digest")?;
    let host = crate::output_of(
        Command::new("unshare")
            .arg("--net")
            .arg(&ctx.bins.warden)
            .args(["firewall", "apply", "--phase", "allowlist", "--policy"])
            .arg(dir.join("reference-policy.toml"))
            .arg("--passwd")
            .arg(dir.join("etc/passwd"))
            .arg("--group")
            .arg(dir.join("etc/group")),
    )?;
    let host: serde_json::Value = serde_json::from_str(&host)?;
    ensure!(
        host["digest"] == applied.as_str(),
        "the guest's allowlist {applied} is not the intended {}",
        host["digest"]
    );
    Ok(format!("{}; ports {:?}", took(&booted), booted.ports))
}

fn second_boot(ctx: &Ctx, dir: &Path) -> Result<String> {
    let guest = Guest::default();
    let (site, broker) = attested_site(ctx, dir, &guest)?;
    let boot1 = Boot::new(&site, guest.clone(), Some(broker.addr.clone())).run(ctx, "boot1")?;
    judge(ctx, &site, &boot1, &ran(0), &dir.join("boot1"))?;
    let mut guest2 = guest.clone();
    guest2.boot = 2;
    // The probe's `--boot 2` argument is part of exec: a new policy, so a new reference.
    let pcr15 = site.pcr15(ctx, &guest2, &site.bundle)?;
    drop(broker);
    let broker = Broker::start(
        &ctx.bins,
        &dir.join("broker2"),
        &site.broker_config(&pcr15, &site.volume_key)?,
    )?;
    let boot2 = Boot::new(&site, guest2.clone(), Some(broker.addr.clone())).run(ctx, "boot2")?;
    judge(ctx, &site, &boot2, &ran(0), &dir.join("boot2"))?;
    ensure!(
        boot2
            .outcome
            .serial
            .contains("PROBE volume-previous written-in-boot-1"),
        "boot 2 did not read boot 1's data from the volume"
    );
    ensure!(
        boot2.outcome.records("unlock", "volume_format").is_empty()
            && boot2.outcome.records("unlock", "volume_resume").is_empty()
            && boot2
                .outcome
                .records("unlock", "ok")
                .first()
                .is_some_and(|r| r["details"]["volumes"][0]["formatted"] == false),
        "boot 2 formatted the volume again"
    );
    // Boot 3: one bundle file changed; the broker keeps boot 2's reference value.
    fs::write(site.bundle.join("model/weights.txt"), "0.9 0.9 0.9\n")?;
    let mut guest3 = guest2;
    guest3.boot = 2; // same policy as boot 2: only the bundle differs
    let boot3 = Boot::new(&site, guest3, Some(broker.addr.clone())).run(ctx, "boot3")?;
    judge(
        ctx,
        &site,
        &boot3,
        &refused(vec!["PolicyDeny"], 0),
        &dir.join("boot3"),
    )?;
    Ok(format!(
        "boot1 {}, boot2 {}, boot3 refused {}",
        took(&boot1),
        took(&boot2),
        took(&boot3)
    ))
}

fn dhcp(ctx: &Ctx, dir: &Path) -> Result<String> {
    let guest = Guest {
        dhcp: true,
        ..Guest::default()
    };
    let (site, broker) = attested_site(ctx, dir, &guest)?;
    let booted = Boot::new(&site, guest, Some(broker.addr.clone())).run(ctx, "boot")?;
    judge(ctx, &site, &booted, &ran(0), dir)?;
    let network = booted
        .outcome
        .records("network", "ok")
        .first()
        .cloned()
        .context("no network/ok record")?;
    let text = network.to_string();
    ensure!(
        text.contains("10.0.2.15") && text.contains("10.0.2.2"),
        "the lease is not recorded: {text}"
    );
    let allowlist = booted.outcome.records("allowlist", "ok");
    ensure!(
        allowlist
            .first()
            .is_some_and(|r| r.to_string().contains("10.0.2.2")),
        "the allowlist does not pin the DHCP server: {allowlist:?}"
    );
    Ok(took(&booted))
}

fn bare_guest() -> Guest {
    Guest {
        attest: false,
        volume: false,
        secret: false,
        network: false,
        lockdown: false,
        ..Guest::default()
    }
}

fn bare(ctx: &Ctx, dir: &Path) -> Result<String> {
    let site = Site::new(ctx, dir)?;
    let booted = Boot::new(&site, bare_guest(), None).run(ctx, "boot")?;
    judge(ctx, &site, &booted, &ran(3), dir)?;
    Ok(format!("{}; {}", took(&booted), booted.image))
}

fn kernel_args(ctx: &Ctx, dir: &Path) -> Result<String> {
    let site = Site::new(ctx, dir)?;
    let guest = Guest {
        cmdline_extra: "single -- extra-word".into(),
        ..bare_guest()
    };
    let booted = Boot::new(&site, guest, None).run(ctx, "boot")?;
    judge(ctx, &site, &booted, &ran(3), dir)?;
    ensure!(
        booted.outcome.audit.contains("single") && booted.outcome.audit.contains("extra-word"),
        "the ignored kernel arguments are not recorded"
    );
    Ok(took(&booted))
}

fn no_lockdown_modules(ctx: &Ctx, dir: &Path) -> Result<String> {
    let guest = Guest {
        lockdown: false,
        ..Guest::default()
    };
    let (site, broker) = attested_site(ctx, dir, &guest)?;
    let booted = Boot::new(&site, guest, Some(broker.addr.clone())).run(ctx, "boot")?;
    judge(ctx, &site, &booted, &ran(0), dir)?;
    let loaded = booted
        .outcome
        .records("boot", "modules_loaded")
        .first()
        .map(|r| r["details"].to_string())
        .unwrap_or_default();
    for module in ["\"dm_crypt\"", "\"nf_tables\"", "\"ext4\""] {
        ensure!(
            loaded.contains(module),
            "boot/modules_loaded does not list {module}: {loaded}"
        );
    }
    Ok(took(&booted))
}

/// `#!/usr/bin/busybox sh` + `body`.
fn script(body: &str) -> Vec<u8> {
    format!("#!/usr/bin/busybox sh\n{body}\n").into_bytes()
}

fn interrupted_format(ctx: &Ctx, dir: &Path) -> Result<String> {
    let guest = Guest::default();
    let (site, broker) = attested_site(ctx, dir, &guest)?;
    // Boot 1: mkfs.ext4 is a script that cuts the power (as a power loss would) — after
    // luksFormat wrote the header, before any file system exists.
    let cut = Guest {
        files: vec![(
            "/usr/sbin/mkfs.ext4".into(),
            script("/usr/bin/busybox poweroff -f"),
            0o755,
        )],
        busybox: true,
        ..guest.clone()
    };
    let boot1 = Boot::new(&site, cut, Some(broker.addr.clone())).run(ctx, "boot1")?;
    ensure!(
        !boot1.outcome.serial.contains("PROBE-READY"),
        "the workload ran although mkfs never did"
    );
    ensure!(
        host::file_contains(&site.disk, b"LUKS\xba\xbe")?,
        "boot 1 did not get as far as luksFormat"
    );
    // Boot 2: the intact image. The policy is the same (files differ only in the image,
    // not in the measured bundle or policy): the broker's reference value still holds.
    let boot2 = Boot::new(&site, guest, Some(broker.addr.clone())).run(ctx, "boot2")?;
    judge(ctx, &site, &boot2, &ran(0), &dir.join("boot2"))?;
    ensure!(
        boot2.outcome.audit.contains("initialising"),
        "boot 2 did not record finding the volume initialising"
    );
    Ok(format!("cut {}, ready {}", took(&boot1), took(&boot2)))
}

fn broker_down(ctx: &Ctx, dir: &Path) -> Result<String> {
    let guest = Guest::default();
    let site = Site::new(ctx, dir)?;
    let booted = Boot::new(&site, guest, None).run(ctx, "boot")?;
    judge(
        ctx,
        &site,
        &booted,
        &refused(
            vec!["cannot reach the key broker at http://10.0.2.100:5555"],
            3,
        ),
        dir,
    )?;
    // The tries spread over the timeout (20 s), not spent in a second.
    let attest: Vec<_> = booted
        .outcome
        .audit
        .lines()
        .filter(|l| l.contains("\"stage\":\"attest\""))
        .collect();
    ensure!(!attest.is_empty(), "no attest records");
    let times: Vec<i64> = booted
        .outcome
        .records("attest", "try")
        .iter()
        .filter_map(|r| r["time"].as_str().and_then(crate::bench::millis))
        .collect();
    ensure!(
        times.len() == 3 && times[2] - times[0] >= 10_000,
        "3 tries spread over at least 10 s of the 20 s timeout expected, got tries at {times:?} ms"
    );
    Ok(took(&booted))
}

fn broker_slow(ctx: &Ctx, dir: &Path) -> Result<String> {
    let guest = Guest::default();
    let (site, broker) = attested_site(ctx, dir, &guest)?;
    let mut boot = Boot::new(&site, guest, Some(broker.addr.clone()));
    boot.broker_delay = Some(Duration::from_secs(25));
    let booted = boot.run(ctx, "boot")?;
    judge(
        ctx,
        &site,
        &booted,
        &refused(vec!["did not finish within 20s"], 3),
        dir,
    )?;
    Ok(took(&booted))
}

fn broker_denies(ctx: &Ctx, dir: &Path) -> Result<String> {
    let guest = Guest::default();
    let site = Site::new(ctx, dir)?;
    let broker = Broker::start(
        &ctx.bins,
        &dir.join("broker"),
        &site.broker_config(&"ab".repeat(32), &site.volume_key)?,
    )?;
    let booted = Boot::new(&site, guest, Some(broker.addr.clone())).run(ctx, "boot")?;
    judge(ctx, &site, &booted, &refused(vec!["PolicyDeny"], 0), dir)?;
    Ok(took(&booted))
}

/// Boot 1 (good, formats the volume), then a second broker with `volume_key` for boot 2.
fn formatted_site(ctx: &Ctx, dir: &Path) -> Result<(Site, String)> {
    let guest = Guest::default();
    let (site, broker) = attested_site(ctx, dir, &guest)?;
    let boot1 = Boot::new(&site, guest.clone(), Some(broker.addr.clone())).run(ctx, "boot1")?;
    judge(ctx, &site, &boot1, &ran(0), &dir.join("boot1"))?;
    let pcr15 = site.pcr15(ctx, &guest, &site.bundle)?;
    Ok((site, pcr15))
}

fn disk_digest(path: &Path) -> Result<String> {
    let out = crate::output_of(Command::new("sha256sum").arg(path))?;
    Ok(out
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string())
}

fn wrong_key(ctx: &Ctx, dir: &Path) -> Result<String> {
    let (site, pcr15) = formatted_site(ctx, dir)?;
    let other_key = "0".repeat(64).into_bytes();
    let broker = Broker::start(
        &ctx.bins,
        &dir.join("broker2"),
        &site.broker_config(&pcr15, &other_key)?,
    )?;
    let before = disk_digest(&site.disk)?;
    let booted = Boot::new(&site, Guest::default(), Some(broker.addr.clone())).run(ctx, "boot2")?;
    judge(
        ctx,
        &site,
        &booted,
        &refused(vec!["opens no keyslot of /dev/vda"], 0),
        &dir.join("boot2"),
    )?;
    ensure!(disk_digest(&site.disk)? == before, "the disk was written");
    // The right key still opens the keyslot: nothing was lost.
    let key = dir.join("right.key");
    fs::write(&key, &site.volume_key)?;
    let test = Command::new("cryptsetup")
        .args(["open", "--test-passphrase", "--key-file"])
        .arg(&key)
        .arg(&site.disk)
        .status()?;
    fs::remove_file(&key)?;
    ensure!(
        test.success(),
        "the original key no longer opens the volume"
    );
    Ok(took(&booted))
}

/// Overwrites `len` bytes at `offset` of the disk.
fn scribble(disk: &Path, offset: u64, bytes: &[u8]) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let file = fs::OpenOptions::new().write(true).open(disk)?;
    file.write_all_at(bytes, offset)?;
    Ok(())
}

fn corrupt_header(ctx: &Ctx, dir: &Path) -> Result<String> {
    let (site, pcr15) = formatted_site(ctx, dir)?;
    // Both LUKS2 binary headers' JSON areas (primary at 0, secondary at 16 KiB for the
    // default 16 KiB header) get garbage.
    scribble(&site.disk, 4096 + 512, &[0x5a; 2048])?;
    scribble(&site.disk, 16384 + 4096 + 512, &[0x5a; 2048])?;
    let broker = Broker::start(
        &ctx.bins,
        &dir.join("broker2"),
        &site.broker_config(&pcr15, &site.volume_key)?,
    )?;
    let before = disk_digest(&site.disk)?;
    let booted = Boot::new(&site, Guest::default(), Some(broker.addr.clone())).run(ctx, "boot2")?;
    judge(
        ctx,
        &site,
        &booted,
        &refused(vec!["could not load the LUKS2 header of /dev/vda"], 0),
        &dir.join("boot2"),
    )?;
    ensure!(disk_digest(&site.disk)? == before, "the disk was written");
    Ok(took(&booted))
}

fn cipher_null_header(ctx: &Ctx, dir: &Path) -> Result<String> {
    let (site, pcr15) = formatted_site(ctx, dir)?;
    // The host rewrites the header cvm-warden wrote: the data segment "encrypts" with
    // cipher_null (plaintext on disk), keyslots and key untouched, checksums made valid.
    swap_segment_cipher(&site.disk, dir)?;
    let broker = Broker::start(
        &ctx.bins,
        &dir.join("broker2"),
        &site.broker_config(&pcr15, &site.volume_key)?,
    )?;
    let before = disk_digest(&site.disk)?;
    let booted = Boot::new(&site, Guest::default(), Some(broker.addr.clone())).run(ctx, "boot2")?;
    judge(
        ctx,
        &site,
        &booted,
        &refused(vec!["says cipher cipher_null-ecb"], 0),
        &dir.join("boot2"),
    )?;
    ensure!(disk_digest(&site.disk)? == before, "the disk was written");
    Ok(took(&booted))
}

/// Replaces the data segment's cipher in both LUKS2 header copies with `cipher_null-ecb`
/// (same length as `aes-xts-plain64`) and recomputes each copy's SHA-256 checksum (over the
/// header area with the checksum field zeroed, LUKS2 on-disk format §2).
fn swap_segment_cipher(disk: &Path, dir: &Path) -> Result<()> {
    use std::os::unix::fs::FileExt;
    const CSUM: std::ops::Range<usize> = 448..512;
    let file = fs::OpenOptions::new().read(true).write(true).open(disk)?;
    let mut size = [0u8; 8];
    file.read_exact_at(&mut size, 8)?;
    let hdr_size = u64::from_be_bytes(size);
    ensure!(hdr_size == 16384, "unexpected LUKS2 header size {hdr_size}");
    for offset in [0, hdr_size] {
        let mut area = vec![0u8; hdr_size as usize];
        file.read_exact_at(&mut area, offset)?;
        let segments = find(&area, b"\"segments\"").context("no segments in the header JSON")?;
        let at = segments
            + find(&area[segments..], b"aes-xts-plain64").context("no aes-xts-plain64 segment")?;
        area[at..at + 15].copy_from_slice(b"cipher_null-ecb");
        area[CSUM].fill(0);
        let scratch = dir.join("header.bin");
        fs::write(&scratch, &area)?;
        let sum = crate::output_of(Command::new("sha256sum").arg(&scratch))?;
        let hex = sum.split_whitespace().next().unwrap_or_default();
        for (i, byte) in area[CSUM.start..CSUM.start + 32].iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16)?;
        }
        file.write_all_at(&area, offset)?;
    }
    Ok(())
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn data_no_header(ctx: &Ctx, dir: &Path) -> Result<String> {
    let guest = Guest::default();
    let (site, broker) = attested_site(ctx, dir, &guest)?;
    let mut data = Vec::new();
    for i in 0..(1u32 << 20) {
        data.push((i.wrapping_mul(2_654_435_761) >> 24) as u8);
    }
    scribble(&site.disk, 1 << 20, &data)?;
    let before = disk_digest(&site.disk)?;
    let booted = Boot::new(&site, guest, Some(broker.addr.clone())).run(ctx, "boot")?;
    judge(
        ctx,
        &site,
        &booted,
        &refused(
            vec!["refusing to format /dev/vda: it holds data but no LUKS2 header"],
            0,
        ),
        dir,
    )?;
    ensure!(disk_digest(&site.disk)? == before, "the disk was written");
    Ok(took(&booted))
}

/// The broker holds the intact bundle's reference value; `change` alters the bundle after.
fn tampered_bundle(
    ctx: &Ctx,
    dir: &Path,
    change: impl Fn(&Path) -> Result<()>,
    expect: Expect,
) -> Result<String> {
    let guest = Guest::default();
    let (site, broker) = attested_site(ctx, dir, &guest)?;
    change(&site.bundle)?;
    let booted = Boot::new(&site, guest, Some(broker.addr.clone())).run(ctx, "boot")?;
    judge(ctx, &site, &booted, &expect, dir)?;
    Ok(took(&booted))
}

fn bundle_changed(ctx: &Ctx, dir: &Path) -> Result<String> {
    tampered_bundle(
        ctx,
        dir,
        |b| Ok(fs::write(b.join("model/weights.txt"), "9 9 9\n")?),
        refused(vec!["PolicyDeny"], 0),
    )
}

fn bundle_added(ctx: &Ctx, dir: &Path) -> Result<String> {
    tampered_bundle(
        ctx,
        dir,
        |b| Ok(fs::write(b.join("model/backdoor.py"), "import os\n")?),
        refused(vec!["PolicyDeny"], 0),
    )
}

fn bundle_symlink(ctx: &Ctx, dir: &Path) -> Result<String> {
    tampered_bundle(
        ctx,
        dir,
        |b| {
            Ok(std::os::unix::fs::symlink(
                "/etc/passwd",
                b.join("model/escape"),
            )?)
        },
        refused(
            vec!["symlink model/escape -> /etc/passwd leaves the bundle"],
            3,
        ),
    )
}

fn policy_changed(ctx: &Ctx, dir: &Path) -> Result<String> {
    let guest = Guest::default();
    let (site, broker) = attested_site(ctx, dir, &guest)?;
    // The image gets a policy that opens one more port than the model owner agreed to.
    let changed = Guest {
        policy_edits: vec![(
            "inbound = [{ port = 8002 }]".into(),
            "inbound = [{ port = 8002 }, { port = 22 }]".into(),
        )],
        ..guest
    };
    let booted = Boot::new(&site, changed, Some(broker.addr.clone())).run(ctx, "boot")?;
    judge(ctx, &site, &booted, &refused(vec!["PolicyDeny"], 0), dir)?;
    Ok(took(&booted))
}

fn missing_module(ctx: &Ctx, dir: &Path) -> Result<String> {
    // The image builder forgot dm_crypt (and only it: its dependencies are still there).
    let guest = Guest {
        omit_modules: vec!["dm_crypt".into()],
        ..Guest::default()
    };
    let (site, broker) = attested_site(ctx, dir, &guest)?;
    let booted = Boot::new(&site, guest, Some(broker.addr.clone())).run(ctx, "boot")?;
    // The module step loads nothing when one is missing — virtio_console neither, so the
    // export port never appears: the serial console carries the same records, and is what
    // the auditor verifies (it accepts console captures).
    ensure!(
        booted.outcome.audit.is_empty() || !booted.outcome.audit.contains("modules_loaded"),
        "modules were loaded although one is missing"
    );
    let booted = booted.on_console();
    judge(
        ctx,
        &site,
        &booted,
        &refused(
            vec!["kernel module dm_crypt (needed by [[volume]] data) is not loaded, not built in"],
            3,
        ),
        dir,
    )?;
    Ok(took(&booted))
}

fn no_tpm(ctx: &Ctx, dir: &Path) -> Result<String> {
    let guest = Guest::default();
    let (site, broker) = attested_site(ctx, dir, &guest)?;
    let mut boot = Boot::new(&site, guest, Some(broker.addr.clone()));
    boot.no_tpm = true;
    let booted = boot.run(ctx, "boot")?;
    judge(
        ctx,
        &site,
        &booted,
        &refused(vec!["device /dev/tpmrm0 does not exist"], 3),
        dir,
    )?;
    Ok(took(&booted))
}

fn workload_crash(ctx: &Ctx, dir: &Path) -> Result<String> {
    let site = Site::new(ctx, dir)?;
    let guest = Guest {
        restart: "on-failure",
        policy_extra: String::new(),
        policy_edits: vec![(
            "restart = \"on-failure\"".into(),
            "restart = \"on-failure\"\nmax_restarts = 2".into(),
        )],
        probe_args: vec!["--exit".into(), "3".into()],
        ..bare_guest()
    };
    let booted = Boot::new(&site, guest, None).run(ctx, "boot")?;
    judge(ctx, &site, &booted, &ran(3), dir)?;
    let starts = booted
        .outcome
        .serial
        .matches("PROBE exiting with 3")
        .count();
    ensure!(
        starts == 3,
        "the workload started {starts} times, expected 3 (1 + 2 restarts)"
    );
    Ok(took(&booted))
}

fn power_button(ctx: &Ctx, dir: &Path) -> Result<String> {
    let site = Site::new(ctx, dir)?;
    let guest = Guest {
        network: true,
        ..bare_guest()
    };
    let mut boot = Boot::new(&site, guest, None);
    boot.power_button = true;
    let booted = boot.run(ctx, "boot")?;
    let mut expect = ran(3);
    expect.reasons = vec!["\"event\":\"power_button\""];
    judge(ctx, &site, &booted, &expect, dir)?;
    ensure!(
        !booted.outcome.serial.contains("PROBE-DONE"),
        "the workload ended by itself: the power button did nothing"
    );
    Ok(took(&booted))
}

fn audit_disk_full(ctx: &Ctx, dir: &Path) -> Result<String> {
    // The audit file lives on the volume, required, with a checkpoint every 10 s. The image
    // builder made ext4 without root's reserved blocks (`-m 0`), so the workload can fill the
    // disk for everyone: the next checkpoint cannot be written.
    let guest = Guest {
        probe_args: vec!["--fill".into()],
        policy_edits: vec![(
            "[audit]\n".into(),
            "[audit]\nfile = \"/mnt/data/audit.jsonl\"\nfile_required = true\ncheckpoint_interval = \"10s\"\n".into(),
        )],
        files: vec![(
            "/usr/sbin/mkfs.ext4".into(),
            script("exec /usr/sbin/mke2fs -t ext4 -m 0 \"$@\""),
            0o755,
        )],
        binaries: vec![("/usr/sbin/mke2fs".into(), "/usr/sbin/mke2fs".into())],
        busybox: true,
        ..Guest::default()
    };
    let (site, broker) = attested_site(ctx, dir, &guest)?;
    let booted = Boot::new(&site, guest, Some(broker.addr.clone())).run(ctx, "boot")?;
    // The export port still got every record: that copy is whole and attested.
    let mut expect = ran(0);
    expect.reasons = vec![
        "\"event\":\"audit_lost\"",
        "\"sink\":\"file:/mnt/data/audit.jsonl\"",
    ];
    judge(ctx, &site, &booted, &expect, dir)?;
    ensure!(
        booted.outcome.serial.contains("PROBE filled"),
        "the workload did not fill the volume"
    );
    Ok(took(&booted))
}

fn hung_nft(ctx: &Ctx, dir: &Path) -> Result<String> {
    let site = Site::new(ctx, dir)?;
    let guest = Guest {
        network: true,
        files: vec![(
            "/usr/sbin/nft".into(),
            script("exec /usr/bin/busybox sleep 100000"),
            0o755,
        )],
        busybox: true,
        ..bare_guest()
    };
    let booted = Boot::new(&site, guest, None).run(ctx, "boot")?;
    judge(
        ctx,
        &site,
        &booted,
        &refused(vec!["(/usr/sbin/nft) did not finish within 30 s"], 3),
        dir,
    )?;
    Ok(took(&booted))
}

fn invalid_policy(ctx: &Ctx, dir: &Path) -> Result<String> {
    let site = Site::new(ctx, dir)?;
    let guest = Guest {
        policy_extra: "\n[surprise]\nkey = 1\n".into(),
        ..bare_guest()
    };
    let booted = Boot::new(&site, guest, None).run(ctx, "boot")?;
    // Before a policy exists there is no export port.
    ensure!(
        booted.outcome.audit.is_empty(),
        "records reached the export port before a policy named it"
    );
    let booted = booted.on_console();
    judge(
        ctx,
        &site,
        &booted,
        &refused(vec!["policy_invalid", "surprise"], 3),
        dir,
    )?;
    Ok(took(&booted))
}
