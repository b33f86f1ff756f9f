//! The systemd shape for real: a Debian root file system with systemd as PID 1
//! (`image/mkimage.sh rootfs`: debootstrap `--variant=minbase` of `image/packages.txt` from the
//! Debian mirror apt uses, cached under `target/vm-cache/rootfs-bookworm-<digest of the
//! package list>/`), made into a bootable image by the same recipe a site uses
//! (`image/mkimage.sh image`: cvm-warden, the policy, the bundle, `units/cvm-warden.service`
//! enabled and every drop-in of `units/dropins`, the kernel modules the policy loads, an ext4
//! image made with `mkfs.ext4 -d`, and a busybox initramfs that loads virtio_blk and ext4 and
//! switch_roots to systemd). Debian's kernel boots it with swtpm and the test broker, as in
//! the PID 1 scenarios.
//!
//! The checks are made against the live systemd by an observer unit (`vm-probe
//! --observe-systemd` as root, `After=cvm-warden.service`): the perimeter is up when it
//! starts, the masked units are masked and inactive, starting a getty, SSH, the debug shell,
//! rescue or emergency is refused, systemd's Ctrl-Alt-Del burst action is `none`, and the
//! workload becomes the unit's main process. The host presses Ctrl-Alt-Del ten times through
//! QMP and checks that the keys arrived and the VM and the workload carry on.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

use crate::host::Broker;
use crate::scenario::{
    modules_for, tail, Ctx, Guest, Site, ALLOWED_PORT, BLOCKED_PORT, BUNDLE_AT, WORKLOAD_UID,
};
use crate::vm::{Outcome, Vm, VmConfig};
use crate::{output_of, sh};

/// The image recipe, relative to the repository root (the harness runs from there).
pub const RECIPE: &str = "image/mkimage.sh";
/// The package list of the root file system (its digest is the cache key).
pub const PACKAGES: &str = "image/packages.txt";
/// The unit files installed into the image.
pub const UNITS: &str = "units";
/// The observer unit: a unit ordered after cvm-warden.service, as a FLARE side service
/// would be.
pub const OBSERVER_UNIT: &str = "warden-observer.service";
/// Kernel command line words of the systemd image: the root disk for the initramfs, and
/// `eth0` kept as the policy names it (udev would rename it).
pub const ROOT_CMDLINE: &str = "cvm.root=/dev/vda net.ifnames=0";

/// systemd-networkd's configuration of eth0 in the image (QEMU's user network).
const NETWORK: &str =
    "[Match]\nName=eth0\n\n[Network]\nAddress=10.0.2.15/24\nGateway=10.0.2.2\nLinkLocalAddressing=no\nIPv6AcceptRA=no\n";

/// One build of the root file system at a time (two scenarios may start together).
static ROOTFS: Mutex<()> = Mutex::new(());

/// The repository root: the current folder, which must hold the recipe.
fn repo() -> Result<PathBuf> {
    let dir = std::env::current_dir()?;
    ensure!(
        dir.join(RECIPE).is_file(),
        "{} has no {RECIPE}: run the harness from the repository root (cargo xtask vm-test does)",
        dir.display()
    );
    Ok(dir)
}

/// The cached Debian root file system, built when missing (debootstrap: minutes). Returns
/// it and the time spent building it (zero when cached).
pub fn rootfs(ctx: &Ctx) -> Result<(PathBuf, Duration)> {
    let repo = repo()?;
    let packages = repo.join(PACKAGES);
    let digest = output_of(Command::new("sha256sum").arg(&packages))?;
    let key: String = digest.chars().take(16).collect();
    let dir = ctx.cache.join(format!("rootfs-bookworm-{key}"));
    let _guard = ROOTFS
        .lock()
        .map_err(|_| anyhow::anyhow!("rootfs lock poisoned"))?;
    if dir.join("sbin/init").exists() {
        return Ok((dir, Duration::ZERO));
    }
    if !crate::is_root() {
        bail!(
            "the systemd-shape root file system {} is not built yet and debootstrap needs root: run cargo xtask vm-test as root",
            dir.display()
        );
    }
    if Command::new("debootstrap")
        .arg("--version")
        .output()
        .is_err()
    {
        bail!("debootstrap is missing (the systemd-shape scenarios build their Debian root file system with it): apt-get install debootstrap");
    }
    // An older package list's root file system is of no further use.
    for entry in fs::read_dir(&ctx.cache)?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("rootfs-") && entry.path() != dir {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
    let start = Instant::now();
    sh(Command::new("sh")
        .arg(repo.join(RECIPE))
        .args(["rootfs", "--out"])
        .arg(&dir)
        .arg("--packages")
        .arg(&packages))
    .with_context(|| {
        format!(
            "building the systemd-shape root file system {} (debootstrap of {PACKAGES} from the Debian mirror in /etc/apt/sources.list*) failed",
            dir.display()
        )
    })?;
    Ok((dir, start.elapsed()))
}

/// A built systemd-shape image.
#[derive(Debug, Clone)]
pub struct SystemdImage {
    /// The ext4 root file system (`/dev/vda`).
    pub root: PathBuf,
    /// The initramfs that mounts it and switch_roots to systemd.
    pub initrd: PathBuf,
    /// Time to build the root file system (zero when cached).
    pub rootfs_time: Duration,
    /// Time to make the image from it.
    pub image_time: Duration,
}

/// The guest of the systemd-shape scenarios: attested (TPM + broker), a secret, the network
/// allowlist and the lockdown, no re-attestation; no volume (the root file system is `/dev/vda`); the bundle
/// lives on the root disk, so it is copied into a tmpfs while it is measured.
pub fn guest() -> Guest {
    Guest {
        volume: false,
        cmdline_extra: ROOT_CMDLINE.into(),
        policy_edits: vec![("source = \"initramfs\"".into(), "source = \"copy\"".into())],
        // The unit shape execs the workload and cannot re-attest: say so, as its
        // `attest/reattest_unavailable` asks (the default 10 minutes would keep the broker in
        // the allowlist with nothing to use it, and the probe checks it is blocked).
        attestation_extra: "reattest_interval = \"0\"\n".into(),
        ..Guest::default()
    }
}

/// The observer unit (root, after and requiring cvm-warden.service).
fn observer_unit() -> String {
    String::from(
        "[Unit]\nDescription=VM harness observer: what a unit ordered after cvm-warden sees\nAfter=cvm-warden.service\nRequires=cvm-warden.service\n\n[Service]\nType=oneshot\nExecStart=/usr/local/bin/vm-probe --observe-systemd\nStandardOutput=journal+console\nStandardError=journal+console\n\n[Install]\nWantedBy=multi-user.target\n",
    )
}

/// Builds the image of `guest` for `site` into `dir` with the recipe.
pub fn image(
    ctx: &Ctx,
    site: &Site,
    guest: &Guest,
    dir: &Path,
    observer: bool,
) -> Result<SystemdImage> {
    let repo = repo()?;
    let (rootfs, rootfs_time) = rootfs(ctx)?;
    fs::create_dir_all(dir)?;
    let policy = dir.join("policy.toml");
    fs::write(&policy, guest.policy())?;
    let modules = modules_for(ctx, guest, &site.dir)?;
    let root = dir.join("root.ext4");
    let initrd = dir.join("initrd.cpio.gz");
    let mut cmd = Command::new("sh");
    cmd.arg(repo.join(RECIPE))
        .arg("image")
        .arg("--rootfs")
        .arg(&rootfs)
        .arg("--out")
        .arg(&root)
        .arg("--initrd")
        .arg(&initrd)
        .arg("--warden")
        .arg(&ctx.bins.warden)
        .arg("--policy")
        .arg(&policy)
        .arg("--units")
        .arg(repo.join(UNITS))
        .arg("--bundle")
        .arg(&site.bundle)
        .args(["--bundle-at", BUNDLE_AT])
        .args(["--user", &format!("fl:{WORKLOAD_UID}")])
        .arg("--modules-root")
        .arg(&ctx.assets.modules_root)
        .args(["--kver", &ctx.assets.kver]);
    for module in &modules {
        cmd.args(["--module", module]);
    }
    // In the systemd shape cvm-warden leaves the interfaces to the OS: systemd-networkd gives
    // eth0 the address QEMU's user network expects.
    let network = dir.join("10-eth0.network");
    fs::write(&network, NETWORK)?;
    cmd.arg("--network").arg(&network);
    if observer {
        let unit = dir.join(OBSERVER_UNIT);
        fs::write(&unit, observer_unit())?;
        cmd.arg("--unit").arg(&unit);
        cmd.arg("--install")
            .arg(&ctx.bins.probe)
            .args(["/usr/local/bin/vm-probe", "0755"]);
    }
    let start = Instant::now();
    output_of(&mut cmd).context("image/mkimage.sh image failed")?;
    Ok(SystemdImage {
        root,
        initrd,
        rootfs_time,
        image_time: start.elapsed(),
    })
}

/// Starts the VM of `image` (TPM, broker relay, the probe's ports forwarded).
fn start(
    ctx: &Ctx,
    site: &Site,
    guest: &Guest,
    image: &SystemdImage,
    broker: &str,
    name: &str,
) -> Result<Vm> {
    Vm::start(
        &ctx.assets,
        VmConfig {
            name: name.to_string(),
            dir: site.dir.join(name),
            image: image.initrd.clone(),
            append: guest.cmdline(),
            disk: Some(image.root.clone()),
            tpm_state: Some(site.tpm_state.clone()),
            broker: Some(broker.to_string()),
            broker_delay: None,
            hostfwd: vec![ALLOWED_PORT, BLOCKED_PORT],
            memory_mib: 768,
            timeout: Duration::from_secs(360),
            relay: ctx.bins.harness.clone(),
        },
    )
}

/// A site whose broker holds the reference PCR 15 of `guest` (or `pcr15` when given).
fn site_and_broker(
    ctx: &Ctx,
    dir: &Path,
    guest: &Guest,
    pcr15: Option<String>,
) -> Result<(Site, Broker)> {
    let site = Site::new(ctx, dir)?;
    let reference = site.pcr15(ctx, guest, &site.bundle)?;
    let pcr15 = pcr15.unwrap_or(reference);
    let broker = Broker::start(
        &ctx.bins,
        &dir.join("broker"),
        &site.broker_config(&pcr15, &site.volume_key)?,
    )?;
    Ok((site, broker))
}

/// One connection to a forwarded port: the banner, then each of `send` answered by a line.
fn talk(host_port: u16, send: &[&str]) -> Result<Vec<String>> {
    let stream = TcpStream::connect(("127.0.0.1", host_port))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = stream;
    let mut lines = Vec::new();
    let mut line = String::new();
    reader.read_line(&mut line)?;
    lines.push(line.trim().to_string());
    for request in send {
        writeln!(writer, "{request}")?;
        let mut answer = String::new();
        reader.read_line(&mut answer)?;
        lines.push(answer.trim().to_string());
    }
    Ok(lines)
}

/// The keyboard interrupt count the probe reports on the allowed port.
fn keyboard_count(vm: &Vm) -> Result<u64> {
    let port = vm.ports.get(&ALLOWED_PORT).copied().unwrap_or_default();
    let lines = talk(port, &["kbd"])?;
    ensure!(
        lines
            .first()
            .is_some_and(|l| l.starts_with("VM-PROBE-BANNER")),
        "the workload's port {ALLOWED_PORT} did not answer: {lines:?}"
    );
    lines
        .get(1)
        .and_then(|l| l.strip_prefix("KBD "))
        .and_then(|n| n.trim().parse().ok())
        .with_context(|| format!("the probe gave no keyboard count: {lines:?}"))
}

/// Presses Ctrl-Alt-Del `times` times, 80 ms apart on one QMP connection; returns how long
/// the presses took (systemd's burst is 7 presses within 2 s).
fn ctrl_alt_del_burst(vm: &Vm, times: usize) -> Result<Duration> {
    let keys = serde_json::json!({
        "keys": [
            { "type": "qcode", "data": "ctrl" },
            { "type": "qcode", "data": "alt" },
            { "type": "qcode", "data": "delete" }
        ]
    });
    let start = Instant::now();
    vm.qmp_repeat("send-key", keys, times, Duration::from_millis(80))?;
    Ok(start.elapsed())
}

/// The lines of the console that carry `marker` with `ok`/`FAIL` verdicts.
fn verdicts<'a>(serial: &'a str, marker: &str) -> (Vec<&'a str>, Vec<&'a str>) {
    let ok = format!("{marker} ok ");
    let fail = format!("{marker} FAIL ");
    let pick = |needle: &str| -> Vec<&'a str> {
        serial
            .lines()
            .filter_map(|l| l.find(needle).map(|i| &l[i..]))
            .collect()
    };
    (pick(&ok), pick(&fail))
}

/// `cvm-warden-verify audit --trusted-ak` on the exported log; its exit code and output.
fn verify_audit(ctx: &Ctx, site: &Site, outcome: &Outcome, dir: &Path) -> Result<(i32, String)> {
    let log = dir.join("exported-audit.jsonl");
    fs::write(&log, &outcome.audit)?;
    let ak = dir.join("trusted-ak.b64");
    fs::write(&ak, format!("{}\n", site.ak))?;
    let out = Command::new(&ctx.bins.verify)
        .args(["audit", "--trusted-ak"])
        .arg(&ak)
        .arg(&log)
        .output()
        .context("running cvm-warden-verify")?;
    Ok((
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    ))
}

/// No byte of the site's secret on the console or in the exported log.
fn no_secret(site: &Site, outcome: &Outcome) -> Result<()> {
    let needle = site.secret.as_slice();
    for (what, text) in [
        ("serial log", &outcome.serial),
        ("exported audit log", &outcome.audit),
    ] {
        ensure!(
            !text.as_bytes().windows(needle.len()).any(|w| w == needle),
            "the secret appears in the {what}"
        );
    }
    Ok(())
}

/// The position of the first record with this stage and event in the exported log.
fn position(outcome: &Outcome, stage: &str, event: &str) -> Option<usize> {
    outcome
        .audit
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .position(|r| r["stage"] == stage && r["event"] == event)
}

/// The observer's checks every good systemd boot must show (`check detail-prefix`).
const OBSERVED: &[&str] = &[
    "perimeter-at-start nft list table inet cvm_warden",
    "started-after-ready",
    "warden-active cvm-warden.service active",
    "masked serial-getty@ttyS0.service LoadState=masked ActiveState=inactive",
    "masked getty@tty1.service LoadState=masked",
    "masked ssh.service LoadState=masked",
    "masked ssh.socket LoadState=masked",
    "masked rescue.service LoadState=masked",
    "masked emergency.service LoadState=masked",
    "masked ctrl-alt-del.target LoadState=masked",
    "refused systemctl start serial-getty@ttyS0.service",
    "refused systemctl start ssh.service",
    "refused systemctl rescue",
    "refused systemctl emergency",
    "refused systemctl isolate rescue.target",
    "ctrl-alt-del-burst CtrlAltDelBurstAction=none",
    "no-login-units",
    "no-login-processes",
    "workload-in-unit MainPID",
];

/// The probe's checks (the workload inside cvm-warden.service).
const PROBED: &[&str] = &[
    "PROBE ok uid",
    "PROBE ok capeff",
    "PROBE ok nonewprivs",
    "PROBE ok lockdown",
    "PROBE ok secret",
    "PROBE ok outbound-allowed 10.0.2.102:7002",
    "PROBE ok outbound-blocked 10.0.2.101:7777",
    "PROBE ok outbound-blocked 10.0.2.100:5555",
];

/// `systemd-good`: the attested boot under systemd, judged from inside (the observer, the
/// probe) and outside (ports, Ctrl-Alt-Del, the power-off, the audit log).
pub fn good(ctx: &Ctx, dir: &Path) -> Result<String> {
    let guest = guest();
    let (site, broker) = site_and_broker(ctx, dir, &guest, None)?;
    let image = image(ctx, &site, &guest, &dir.join("image"), true)?;
    let mut vm = start(ctx, &site, &guest, &image, &broker.addr, "boot")?;
    let limit = Duration::from_secs(300);
    let booted = (|| -> Result<(u64, u64, String, Duration)> {
        vm.wait_serial("OBSERVE-DONE", limit)?;
        vm.wait_serial("PROBE-READY", limit)?;
        let before = keyboard_count(&vm)?;
        let burst = ctrl_alt_del_burst(&vm, 10)?;
        std::thread::sleep(Duration::from_secs(5));
        ensure!(vm.running(), "the VM ended after the Ctrl-Alt-Del burst");
        let after = keyboard_count(&vm)?;
        let blocked = vm.ports.get(&BLOCKED_PORT).copied().unwrap_or_default();
        let blocked = match talk(blocked, &[]) {
            Ok(lines) => lines.join(" "),
            Err(e) => format!("no banner ({e})"),
        };
        let allowed = vm.ports.get(&ALLOWED_PORT).copied().unwrap_or_default();
        let bye = talk(allowed, &["done"])?;
        ensure!(
            bye.get(1).is_some_and(|l| l == "bye"),
            "the workload did not end on `done`: {bye:?}"
        );
        Ok((before, after, blocked, burst))
    })();
    let outcome = vm.wait()?;
    let (before, after, blocked, burst) =
        booted.with_context(|| format!("serial tail:\n{}", tail(&outcome.serial, 40)))?;
    let serial = &outcome.serial;
    ensure!(
        !outcome.panicked(),
        "the guest kernel panicked:\n{}",
        tail(serial, 30)
    );
    ensure!(
        !outcome.timed_out && serial.contains("reboot: Power down"),
        "the workload's end did not power the VM off (SuccessAction=poweroff):\n{}",
        tail(serial, 30)
    );
    ensure!(
        burst < Duration::from_secs(2),
        "the 10 Ctrl-Alt-Del presses took {burst:?}: not a burst (7 within 2 s) to test"
    );
    ensure!(
        after >= before + 10,
        "the Ctrl-Alt-Del presses did not reach the guest (keyboard interrupts {before} -> {after})"
    );
    ensure!(
        blocked.is_empty() || blocked.starts_with("no banner"),
        "the blocked port {BLOCKED_PORT} answered: {blocked}"
    );
    let (ok, failed) = verdicts(serial, "OBSERVE");
    ensure!(
        failed.is_empty(),
        "the observer found problems:\n{}",
        failed.join("\n")
    );
    for check in OBSERVED {
        ensure!(
            ok.iter()
                .any(|l| l.starts_with(&format!("OBSERVE ok {check}"))),
            "the observer did not report {check:?}; it reported:\n{}",
            ok.join("\n")
        );
    }
    let (_, failed) = verdicts(serial, "PROBE");
    ensure!(
        failed.is_empty(),
        "the probe found problems:\n{}",
        failed.join("\n")
    );
    for line in PROBED {
        ensure!(serial.contains(line), "the probe did not report {line:?}");
    }
    // The workload was exec'd only after the perimeter and a successful attestation.
    let perimeter = position(&outcome, "perimeter", "ok").context("no perimeter/ok record")?;
    let attested = position(&outcome, "attest", "ok").context("no attest/ok record")?;
    let exec = position(&outcome, "launch", "exec").context("no launch/exec record")?;
    ensure!(
        perimeter < attested && attested < exec,
        "record order perimeter {perimeter}, attest {attested}, exec {exec}"
    );
    let (code, report) = verify_audit(ctx, &site, &outcome, dir)?;
    ensure!(code == 0, "audit verify exited {code}:\n{report}");
    no_secret(&site, &outcome)?;
    Ok(format!(
        "rootfs {:.1} s, image {:.1} s, boot to power-off {:.1} s; 10 Ctrl-Alt-Del in {:.2} s ({} keyboard interrupts) ignored",
        image.rootfs_time.as_secs_f64(),
        image.image_time.as_secs_f64(),
        outcome.wall.as_secs_f64(),
        burst.as_secs_f64(),
        after - before
    ))
}

/// `systemd-attest-refused`: the broker's reference differs; cvm-warden.service fails and
/// `FailureAction=poweroff` ends the VM; the workload never ran.
pub fn attest_refused(ctx: &Ctx, dir: &Path) -> Result<String> {
    let guest = guest();
    let (site, broker) = site_and_broker(ctx, dir, &guest, Some("ab".repeat(32)))?;
    let image = image(ctx, &site, &guest, &dir.join("image"), false)?;
    let vm = start(ctx, &site, &guest, &image, &broker.addr, "boot")?;
    let outcome = vm.wait()?;
    let serial = &outcome.serial;
    ensure!(
        !outcome.panicked(),
        "the guest kernel panicked:\n{}",
        tail(serial, 30)
    );
    ensure!(
        !outcome.timed_out && serial.contains("reboot: Power down"),
        "the failed attestation did not power the VM off (FailureAction=poweroff):\n{}",
        tail(serial, 30)
    );
    ensure!(
        !serial.contains("PROBE start") && outcome.records("launch", "exec").is_empty(),
        "the workload ran although the attestation failed:\n{}",
        tail(serial, 30)
    );
    ensure!(
        serial.contains("Failed to start") && serial.contains("cvm-warden"),
        "systemd did not report cvm-warden.service failing:\n{}",
        tail(serial, 30)
    );
    ensure!(
        outcome.audit.contains("PolicyDeny"),
        "the exported audit log does not name the broker's PolicyDeny"
    );
    let (code, report) = verify_audit(ctx, &site, &outcome, dir)?;
    ensure!(code == 0, "audit verify exited {code}:\n{report}");
    no_secret(&site, &outcome)?;
    Ok(format!(
        "rootfs {:.1} s, image {:.1} s, boot to power-off {:.1} s",
        image.rootfs_time.as_secs_f64(),
        image.image_time.as_secs_f64(),
        outcome.wall.as_secs_f64()
    ))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn verdicts_are_found_behind_the_console_prefixes_of_systemd() {
        let serial = "[   30.1] vm-probe[412]: OBSERVE ok masked ssh.service LoadState=masked\n\
                      OBSERVE FAIL refused systemctl rescue: ok\n\
                      [  31.0] cvm-warden[300]: PROBE ok uid Uid: 1000\n";
        let (ok, failed) = verdicts(serial, "OBSERVE");
        assert_eq!(ok, ["OBSERVE ok masked ssh.service LoadState=masked"]);
        assert_eq!(failed, ["OBSERVE FAIL refused systemctl rescue: ok"]);
        let (ok, failed) = verdicts(serial, "PROBE");
        assert_eq!(ok, ["PROBE ok uid Uid: 1000"]);
        assert!(failed.is_empty());
    }

    #[test]
    fn the_observer_runs_after_and_requires_cvm_warden() {
        let unit = observer_unit();
        assert!(unit.contains("\nAfter=cvm-warden.service\n"));
        assert!(unit.contains("\nRequires=cvm-warden.service\n"));
        assert!(unit.contains("ExecStart=/usr/local/bin/vm-probe --observe-systemd\n"));
    }

    #[test]
    fn the_systemd_guest_copies_its_bundle_and_keeps_eth0() {
        let guest = guest();
        let policy = guest.policy();
        assert!(policy.contains("source = \"copy\""), "{policy}");
        assert!(!policy.contains("[[volume]]"), "{policy}");
        assert!(guest.cmdline().ends_with(ROOT_CMDLINE));
    }
}
