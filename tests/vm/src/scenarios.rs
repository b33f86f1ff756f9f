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
use crate::scenario::{
    judge, Boot, Booted, Ctx, During, Expect, Guest, Scenario, SimGpu, Site, SIM_GPU_AT,
};
use crate::vm::Vm;

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
    scenario!("gpu-simulated", "a simulated H100 (tests/data/nvidia-sim, TEST-signed): precheck and gpu event in PCR 15, GPU evidence verified by the broker (gpu0, TEST root) before any key, ready state set after unlock and cleared before power-off; every record insecure, audit verify 3", gpu_simulated),
    scenario!("reattest-refused", "continuous trust: re-attestation every 5 s affirmed, then the owner withdraws the running PCR 15 from the broker: the next round is refused, the workload stopped, secrets and volume closed, the VM powers off by itself", reattest_refused),
    scenario!("gpu-leaves-cc", "continuous trust with the simulated GPU: it leaves CC mode after one affirmed re-attestation; the next fails as a TEE error naming the GPU, the ready state is cleared, fail closed", gpu_leaves_cc),
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
        // The default policy re-attests every 10 minutes: the allowlist keeps the broker.
        "PROBE ok broker-reachable 10.0.2.100:5555",
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

/// The simulated GPU's UUID (`tests/data/nvidia-sim/gpu.json`).
pub(crate) const SIM_GPU_UUID: &str = "GPU-5e1f0000-0000-4000-8000-000000000001";

/// A site with a simulated GPU and its broker: the reference PCR 15s (at the boot's exchange
/// and while the workload runs; both include the GPU's measured facts) accepted, the TEST GPU
/// root trusted, one verified GPU required for every key.
pub(crate) fn gpu_site(ctx: &Ctx, dir: &Path, guest: &Guest) -> Result<(Site, Broker)> {
    let site = Site::new(ctx, dir)?;
    let values = site.reference(ctx, guest, &site.bundle)?;
    let gpu_event = values["events"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|e| e.to_string().contains(SIM_GPU_UUID));
    ensure!(
        gpu_event,
        "reference-values has no event with the simulated GPU's facts: {}",
        values["events"]
    );
    let pcr15 = [
        host::tpm_value(&values, false)?,
        host::tpm_value(&values, true)?,
    ];
    let broker = Broker::start(
        &ctx.bins,
        &dir.join("broker"),
        &site.broker_config_for(&pcr15, true, &site.volume_key)?,
    )?;
    Ok((site, broker))
}

/// The seq of the first record `stage/event`.
fn seq_of(booted: &Booted, stage: &str, event: &str) -> Result<u64> {
    booted
        .outcome
        .records(stage, event)
        .first()
        .and_then(|r| r["seq"].as_u64())
        .with_context(|| format!("the exported audit log has no {stage}/{event} record"))
}

/// The GPU facts of a simulated-GPU boot: `gpu/ok` (precheck) before `unlock/ok` before
/// `gpu/ready`, `gpu/not_ready` before the closing record, the broker's `gpu0` verified at the
/// TEST root, every record `insecure`.
pub(crate) fn require_gpu_boot(booted: &Booted, broker: &Broker) -> Result<String> {
    let gpu_ok = seq_of(booted, "gpu", "ok")?;
    let unlock = seq_of(booted, "unlock", "ok")?;
    let ready = seq_of(booted, "gpu", "ready")?;
    ensure!(
        gpu_ok < unlock && unlock < ready,
        "expected gpu/ok (#{gpu_ok}) < unlock/ok (#{unlock}) < gpu/ready (#{ready})"
    );
    let ok = booted.outcome.records("gpu", "ok");
    ensure!(
        ok[0].to_string().contains(SIM_GPU_UUID),
        "gpu/ok does not name the simulated GPU: {}",
        ok[0]
    );
    let not_ready = seq_of(booted, "gpu", "not_ready")?;
    let closing = booted
        .outcome
        .closing()
        .and_then(|c| c["seq"].as_u64())
        .context("no closing record")?;
    ensure!(
        ready < not_ready && not_ready < closing,
        "expected gpu/ready (#{ready}) < gpu/not_ready (#{not_ready}) < the closing record (#{closing})"
    );
    // The broker verified gpu0 (signature, chain to the TEST root, FWID, nonce); its status
    // is Trustee's for Local claims, `contraindicated` (tests/broker/README.md).
    // The simulated GPU's reports are signed with a TEST key: every record says so.
    let records: Vec<serde_json::Value> = booted
        .outcome
        .audit
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .collect();
    let secure: Vec<u64> = records
        .iter()
        .filter(|r| r["insecure"] != true)
        .filter_map(|r| r["seq"].as_u64())
        .collect();
    ensure!(
        !records.is_empty() && secure.is_empty(),
        "records not marked insecure although the GPU is simulated: {secure:?}"
    );
    let log = broker.log();
    let gpu0 = log
        .lines()
        .find(|l| l.contains("/attest -> 200") && l.contains("; gpu0 "))
        .with_context(|| format!("the broker's log shows no verified gpu0:\n{log}"))?;
    ensure!(
        gpu0.contains(SIM_GPU_UUID) && gpu0.contains("root extra root"),
        "the broker's gpu0 is not the simulated GPU at the TEST root: {gpu0}"
    );
    Ok(gpu0.to_string())
}

/// `cvm-warden-verify audit`'s verdict lines on the log `judge` exported into `dir`.
pub(crate) fn verdict(ctx: &Ctx, site: &Site, dir: &Path) -> Result<String> {
    let out = Command::new(&ctx.bins.verify)
        .args(["audit", "--trusted-ak"])
        .arg(dir.join("trusted-ak.b64"))
        .args(site.gpu_root_args())
        .arg(dir.join("exported-audit.jsonl"))
        .output()
        .context("running cvm-warden-verify")?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn gpu_simulated(ctx: &Ctx, dir: &Path) -> Result<String> {
    let guest = Guest {
        gpu: Some(SimGpu::default()),
        ..Guest::default()
    };
    let (site, broker) = gpu_site(ctx, dir, &guest)?;
    let booted = Boot::new(&site, guest, Some(broker.addr.clone())).run(ctx, "boot1")?;
    // Intact, attested, but not trustworthy: the simulated GPU makes every record insecure,
    // which the auditor's tool reports as "intact but not fully attested" (3), never 0.
    judge(ctx, &site, &booted, &ran(3), dir)?;
    booted.require_ports()?;
    for line in ["PROBE ok volume-write", "PROBE ok secret"] {
        ensure!(
            booted.outcome.serial.contains(line),
            "the probe did not report {line:?}"
        );
    }
    let gpu0 = require_gpu_boot(&booted, &broker)?;
    let verdict = verdict(ctx, &site, dir)?;
    // Exit 3 because every record is insecure; the GPU evidence itself verifies, at the root
    // given with --gpu-root, which the tool says proves nothing about a real GPU.
    ensure!(
        verdict.contains("its records are marked insecure")
            && verdict.contains("chain to the --gpu-root root")
            && verdict.contains("this proves nothing about a real GPU")
            && verdict.contains("0 of 1 run(s) attested; exit 3"),
        "audit verify does not say why the run is not attested: {verdict}"
    );
    Ok(format!(
        "{}; broker: {gpu0}; the simulated GPU's files under {SIM_GPU_AT}",
        took(&booted)
    ))
}

/// A guest that re-attests every 5 s and holds its workload running.
fn reattesting(gpu: Option<SimGpu>) -> Guest {
    Guest {
        attestation_extra: "reattest_interval = \"5s\"\n".to_string(),
        gpu,
        ..Guest::default()
    }
}

/// The fail-closed ending of a run whose trust was lost (`kind`): re-attestation affirmed at
/// least once, then `attest/reattest_failed` {kind} naming `reason`, the workload stopped,
/// `launch/cleanup`, `attest/trust_lost`, the closing record's reason.
fn require_trust_lost(booted: &Booted, kind: &str, reason: &str) -> Result<String> {
    let affirmed = seq_of(booted, "attest", "reattested")?;
    let failed = booted.outcome.records("attest", "reattest_failed");
    let failed = failed
        .first()
        .context("the exported audit log has no attest/reattest_failed record")?;
    ensure!(
        failed["details"]["kind"] == kind
            && failed["details"]["error"]
                .as_str()
                .is_some_and(|e| e.contains(reason)),
        "attest/reattest_failed is not {kind} naming {reason:?}: {failed}"
    );
    let failed_at = failed["seq"].as_u64().unwrap_or_default();
    let stopping = seq_of(booted, "launch", "stopping")?;
    let cleanup = seq_of(booted, "launch", "cleanup")?;
    let lost = seq_of(booted, "attest", "trust_lost")?;
    let closing = booted.outcome.closing().context("no closing record")?;
    let closing_at = closing["seq"].as_u64().unwrap_or_default();
    ensure!(
        affirmed < failed_at
            && failed_at < stopping
            && stopping < cleanup
            && cleanup < closing_at
            && lost < closing_at,
        "out of order: reattested #{affirmed}, reattest_failed #{failed_at}, launch/stopping #{stopping}, launch/cleanup #{cleanup}, attest/trust_lost #{lost}, closing #{closing_at}"
    );
    let why = closing["details"]["reason"].as_str().unwrap_or_default();
    ensure!(
        why.starts_with(&format!("trust lost ({kind})")) && why.contains(reason),
        "the closing record's reason is {why:?}"
    );
    // Stopped, not ended by the host: the probe never printed its own end.
    ensure!(
        !booted.outcome.serial.contains("PROBE-DONE"),
        "the workload ended by itself instead of being stopped"
    );
    Ok(why.to_string())
}

fn reattest_refused(ctx: &Ctx, dir: &Path) -> Result<String> {
    let guest = reattesting(None);
    let site = Site::new(ctx, dir)?;
    let values = site.reference(ctx, &guest, &site.bundle)?;
    let (at_boot, running) = (
        host::tpm_value(&values, false)?,
        host::tpm_value(&values, true)?,
    );
    let broker = std::cell::RefCell::new(Some(Broker::start(
        &ctx.bins,
        &dir.join("broker"),
        &site.broker_config_for(&[at_boot.clone(), running], false, &site.volume_key)?,
    )?));
    let addr = broker
        .borrow()
        .as_ref()
        .map(|b| b.addr.clone())
        .unwrap_or_default();
    // Once a re-attestation has been affirmed, the owner withdraws the running PCR 15: the
    // broker is restarted where the guest reaches it with only the boot's value.
    let refusing = site.broker_config_for(&[at_boot], false, &site.volume_key)?;
    let withdraw = |vm: &mut Vm| -> Result<()> {
        vm.wait_serial("\"event\":\"reattested\"", Duration::from_secs(90))?;
        drop(broker.borrow_mut().take());
        *broker.borrow_mut() = Some(Broker::start_on(
            &ctx.bins,
            &dir.join("broker-refusing"),
            &refusing,
            &addr,
        )?);
        Ok(())
    };
    let mut boot = Boot::new(&site, guest, Some(addr.clone()));
    boot.hold = true;
    boot.during = Some(During(&withdraw));
    let booted = boot.run(ctx, "boot1")?;
    judge(ctx, &site, &booted, &ran(0), dir)?;
    let why = require_trust_lost(&booted, "refused", "cpu0: ear.status = warning")?;
    let log = broker
        .borrow()
        .as_ref()
        .map(Broker::log)
        .unwrap_or_default();
    // The restarted broker still verifies the quote but no longer affirms its PCR 15.
    ensure!(
        log.contains("/attest -> 200 [cpu0 warning]"),
        "the restarted broker did not judge a re-attestation: {log}"
    );
    Ok(format!("{}; closing reason: {why}", took(&booted)))
}

fn gpu_leaves_cc(ctx: &Ctx, dir: &Path) -> Result<String> {
    // Reports: the precheck's, the boot's exchange, re-attestation 1 (affirmed: the CPU
    // affirming, gpu0 verified); after the third the CC feature is off, so re-attestation 2
    // finds the GPU out of CC mode before it asks the broker.
    let guest = reattesting(Some(SimGpu {
        leave_cc_after: Some(3),
    }));
    let (site, broker) = gpu_site(ctx, dir, &guest)?;
    let mut boot = Boot::new(&site, guest, Some(broker.addr.clone()));
    // The host never sends `done`: the workload runs until the supervisor stops it.
    boot.hold = true;
    let booted = boot.run(ctx, "boot1")?;
    judge(ctx, &site, &booted, &ran(3), dir)?;
    require_gpu_boot(&booted, &broker)?;
    let why = require_trust_lost(&booted, "tee", SIM_GPU_UUID)?;
    Ok(format!("{}; closing reason: {why}", took(&booted)))
}
