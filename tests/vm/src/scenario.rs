//! The scenarios: good boots, the second boot, and the fault matrix. Each builds its image,
//! plays the host side (TPM, broker, disk), boots, and asserts on what left the guest: the
//! closing audit record, the exported audit log judged by `cvm-warden-verify audit verify`,
//! the serial log (`Kernel panic`, the probe's lines) and the disk image (key bytes). Never on
//! QEMU's exit status.

use std::fmt::Write as _;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

use crate::assets::Assets;
use crate::host;
use crate::image::{self, ImageSpec};
use crate::vm::{Outcome, Vm, VmConfig, AUDIT_PORT, BROKER_GUEST_ADDR};
use crate::Bins;

/// Where the bundle lives in the guest.
pub const BUNDLE_AT: &str = "/opt/fl/bundle";
/// The workload user.
pub const WORKLOAD_UID: u32 = 1000;
/// The volume's mount point.
pub const VOLUME_AT: &str = "/mnt/data";
/// Where the simulated GPU's recording lies in the guest (`[attestation.gpu] simulate`).
pub const SIM_GPU_AT: &str = "/opt/nvidia-sim";
/// The secret's guest path.
pub const SECRET_AT: &str = "/run/cvm-warden/secrets/fl.key";
/// The port the allowlist opens; the probe listens here and on [`BLOCKED_PORT`].
pub const ALLOWED_PORT: u16 = 8002;
/// A port the probe listens on but the allowlist does not open.
pub const BLOCKED_PORT: u16 = 9000;
/// The broker resources.
const VOLUME_RESOURCE: &str = "default/keys/data";
const SECRET_RESOURCE: &str = "default/secrets/fl-key";
/// Modules the harness's virtual hardware needs (listed in `[kernel] modules`): virtio, and
/// the ACPI power button read through evdev.
pub const HARNESS_MODULES: &[&str] = &[
    "button",
    "evdev",
    "virtio_pci",
    "virtio_blk",
    "virtio_net",
    "virtio_console",
    "virtio_rng",
];

/// What the harness shares between scenarios.
#[derive(Debug, Clone)]
pub struct Ctx {
    /// QEMU, kernel, modules.
    pub assets: Assets,
    /// The binaries.
    pub bins: Bins,
    /// The folder under which each scenario gets its own.
    pub work: PathBuf,
    /// The cache of fetched and built assets (`target/vm-cache`: QEMU, the kernel, the
    /// systemd-shape root file system).
    pub cache: PathBuf,
}

/// What a boot's guest looks like (one policy and bundle).
#[derive(Debug, Clone)]
pub struct Guest {
    /// `tee = "tpm"` + the broker; otherwise `attestation = "none"`.
    pub attest: bool,
    /// A `[[volume]]` on `/dev/vda` (needs `attest`).
    pub volume: bool,
    /// A `[[secret]]` (needs `attest`).
    pub secret: bool,
    /// `[network]` with the interface and the allowlist.
    pub network: bool,
    /// `[lockdown]`.
    pub lockdown: bool,
    /// `workload.restart`.
    pub restart: &'static str,
    /// Extra probe arguments (e.g. `--exit 3`).
    pub probe_args: Vec<String>,
    /// Extra words of the kernel command line.
    pub cmdline_extra: String,
    /// TOML appended to the policy.
    pub policy_extra: String,
    /// Replacements applied to the policy text (from, to).
    pub policy_edits: Vec<(String, String)>,
    /// Which boot this is (the probe writes it to the volume).
    pub boot: u32,
    /// Extra image files (guest path, content, mode), written last: they may replace a tool.
    pub files: Vec<(String, Vec<u8>, u32)>,
    /// Put a static busybox at `/usr/bin/busybox` (for the scripts of `files`).
    pub busybox: bool,
    /// Kernel modules the image builder leaves out although the policy needs them.
    pub omit_modules: Vec<String>,
    /// Extra executables (host path, guest path) with their libraries.
    pub binaries: Vec<(PathBuf, String)>,
    /// `eth0` by DHCPv4 (QEMU's user network serves it) instead of the static address.
    pub dhcp: bool,
    /// Keys added to `[attestation]` (e.g. `reattest_interval = "5s"`).
    pub attestation_extra: String,
    /// A simulated GPU (`[attestation.gpu] simulate`, `count = 1`; needs `attest`).
    pub gpu: Option<SimGpu>,
}

/// The simulated H100 of `tests/data/nvidia-sim` (a real report re-signed per nonce with a
/// TEST key), as the guest carries it under [`SIM_GPU_AT`].
#[derive(Debug, Clone, Default)]
pub struct SimGpu {
    /// `leave_cc_after`: the CC feature turns off after this many attestation reports.
    pub leave_cc_after: Option<u32>,
}

impl SimGpu {
    /// The repository's recording.
    pub fn source() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/nvidia-sim")
    }

    /// The TEST root the simulated GPU's chain ends at (the broker's `[nvidia] extra_roots`).
    pub fn root() -> PathBuf {
        SimGpu::source().join("root.pem")
    }

    /// Writes the recording the guest carries into `dir` (the repository's, with
    /// `leave_cc_after` set): the files `gpu.json` names, relative to it.
    pub fn write(&self, dir: &Path) -> Result<()> {
        if dir.exists() {
            fs::remove_dir_all(dir)?;
        }
        fs::create_dir_all(dir)?;
        let src = SimGpu::source();
        let text = fs::read_to_string(src.join("gpu.json"))
            .with_context(|| format!("reading {}/gpu.json", src.display()))?;
        let mut recording: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{}/gpu.json is not JSON", src.display()))?;
        recording["leave_cc_after"] = serde_json::json!(self.leave_cc_after);
        for gpu in recording["gpus"].as_array().into_iter().flatten() {
            for key in ["report", "certificate", "signing_key"] {
                if let Some(name) = gpu[key].as_str() {
                    ensure!(
                        !name.contains('/'),
                        "{}/gpu.json names {name:?}: the harness copies files beside it only",
                        src.display()
                    );
                    fs::copy(src.join(name), dir.join(name))
                        .with_context(|| format!("copying {}/{name}", src.display()))?;
                }
            }
        }
        fs::write(
            dir.join("gpu.json"),
            serde_json::to_string_pretty(&recording)?,
        )?;
        Ok(())
    }
}

impl Default for Guest {
    fn default() -> Guest {
        Guest {
            attest: true,
            volume: true,
            secret: true,
            network: true,
            lockdown: true,
            restart: "never",
            probe_args: Vec::new(),
            cmdline_extra: String::new(),
            policy_extra: String::new(),
            policy_edits: Vec::new(),
            boot: 1,
            files: Vec::new(),
            busybox: false,
            omit_modules: Vec::new(),
            binaries: Vec::new(),
            dhcp: false,
            attestation_extra: String::new(),
            gpu: None,
        }
    }
}

impl Guest {
    /// The guest policy.
    pub fn policy(&self) -> String {
        let mut p = String::new();
        let _ = writeln!(p, "on_failure = \"poweroff\"");
        if !self.attest {
            let _ = writeln!(p, "attestation = \"none\"");
        }
        let mut exec = vec![
            format!("{BUNDLE_AT}/vm-probe"),
            "--uid".into(),
            WORKLOAD_UID.to_string(),
            "--gid".into(),
            WORKLOAD_UID.to_string(),
            "--boot".into(),
            self.boot.to_string(),
        ];
        if self.lockdown {
            exec.push("--lockdown".into());
        }
        if self.volume {
            exec.extend(["--volume".into(), VOLUME_AT.into()]);
        }
        if self.secret {
            exec.extend(["--secret".into(), SECRET_AT.into()]);
        }
        if self.network {
            exec.extend([
                "--allowed-out".into(),
                crate::vm::ALLOWED_OUT_GUEST_ADDR.into(),
                "--listen".into(),
                ALLOWED_PORT.to_string(),
                "--listen".into(),
                BLOCKED_PORT.to_string(),
            ]);
        }
        if self.network && self.reattests() {
            exec.push("--broker-reachable".into());
        }
        exec.extend(self.probe_args.iter().cloned());
        let exec: Vec<String> = exec.iter().map(|a| format!("{a:?}")).collect();
        let modules: Vec<String> = HARNESS_MODULES.iter().map(|m| format!("{m:?}")).collect();
        let _ = write!(
            p,
            "\n[kernel]\nmodules = [{}]\n\n[workload]\nbundle = \"{BUNDLE_AT}\"\nsource = \"initramfs\"\nexec = [{}]\nuser = \"fl\"\nworkdir = \"/\"\nrestart = \"{}\"\n",
            modules.join(", "),
            exec.join(", "),
            self.restart
        );
        if self.attest {
            let _ = write!(
                p,
                "\n[attestation]\ntee = \"tpm\"\nkbs = \"http://{BROKER_GUEST_ADDR}\"\ninsecure_http = true\ntpm = \"device:/dev/tpmrm0\"\ntpm_ak_handle = \"{}\"\ntries = 3\ntimeout = \"20s\"\n",
                host::AK_HANDLE
            );
            p.push_str(&self.attestation_extra);
            if self.gpu.is_some() {
                let _ = write!(
                    p,
                    "\n[attestation.gpu]\nsimulate = \"{SIM_GPU_AT}/gpu.json\"\ncount = 1\n"
                );
            }
        }
        if self.volume {
            let _ = write!(
                p,
                "\n[[volume]]\nname = \"data\"\ndevice = \"/dev/vda\"\nkey = \"kbs:///{VOLUME_RESOURCE}\"\nmount = \"{VOLUME_AT}\"\nformat_if_blank = true\nowner = \"fl\"\ngroup = \"fl\"\nmode = \"0700\"\n"
            );
        }
        if self.secret {
            let _ = write!(
                p,
                "\n[[secret]]\nname = \"fl.key\"\nresource = \"kbs:///{SECRET_RESOURCE}\"\n"
            );
        }
        if self.network {
            let _ = write!(
                p,
                "\n[network]\ninbound = [{{ port = {ALLOWED_PORT} }}]\noutbound = [{{ host = \"10.0.2.102\", port = 7002 }}]\n\n[network.interface.eth0]\n{}",
                if self.dhcp {
                    "dhcp = true\n"
                } else {
                    "address = \"10.0.2.15/24\"\ngateway = \"10.0.2.2\"\n"
                }
            );
        }
        if self.lockdown {
            let _ = write!(
                p,
                "\n[lockdown]\nconsoles = \"off\"\nkernel_lockdown = \"confidentiality\"\n"
            );
        }
        let _ = write!(
            p,
            "\n[audit]\nconsole = true\nexport = \"virtio-port:{AUDIT_PORT}\"\n"
        );
        p.push_str(&self.policy_extra);
        for (from, to) in &self.policy_edits {
            // An edit that matches nothing would silently test the unedited policy.
            assert!(
                p.contains(from.as_str()),
                "policy edit {from:?} matches nothing"
            );
            p = p.replace(from.as_str(), to);
        }
        p
    }

    /// Whether the guest re-attests while the workload runs (`attestation.reattest_interval`
    /// above 0; the daemon's default is 10 minutes): the allowlist then keeps the broker open.
    pub fn reattests(&self) -> bool {
        self.attest && !self.attestation_extra.contains("reattest_interval = \"0\"")
    }

    /// The kernel command line.
    pub fn cmdline(&self) -> String {
        let mut line = String::from("console=ttyS0 panic=-1 loglevel=4");
        if !self.cmdline_extra.is_empty() {
            line.push(' ');
            line.push_str(&self.cmdline_extra);
        }
        line
    }
}

/// A site: the persistent state of one machine across boots (TPM, disk, keys, broker).
#[derive(Debug)]
pub struct Site {
    /// Its folder.
    pub dir: PathBuf,
    /// swtpm's state (the AK persists, PCRs reset every boot).
    pub tpm_state: PathBuf,
    /// The AK, base64 SPKI DER.
    pub ak: String,
    /// The volume's disk image.
    pub disk: PathBuf,
    /// The volume key the broker releases (hex text: searchable as bytes).
    pub volume_key: Vec<u8>,
    /// The secret the broker releases.
    pub secret: Vec<u8>,
    /// The bundle as the image builder made it (host copy).
    pub bundle: PathBuf,
}

fn random_hex(bytes: usize) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; bytes];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut buf))
        .context("reading /dev/urandom")?;
    Ok(hex(&buf).into_bytes())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Site {
    /// A fresh site in `dir`: a provisioned TPM, a blank disk, fresh keys, the probe bundle.
    pub fn new(ctx: &Ctx, dir: &Path) -> Result<Site> {
        if dir.exists() {
            fs::remove_dir_all(dir)?;
        }
        fs::create_dir_all(dir)?;
        let tpm_state = dir.join("tpm");
        let ak = host::provision_tpm(&tpm_state, &dir.join("ak"))?;
        let disk = dir.join("disk.img");
        host::blank_disk(&disk, 64)?;
        let bundle = dir.join("bundle");
        fs::create_dir_all(&bundle)?;
        fs::copy(&ctx.bins.probe, bundle.join("vm-probe"))?;
        fs::write(
            bundle.join("README.txt"),
            "The probe workload of the cvm-warden VM harness.\n",
        )?;
        fs::create_dir_all(bundle.join("model"))?;
        fs::write(bundle.join("model/weights.txt"), "0.1 0.2 0.3\n")?;
        Ok(Site {
            dir: dir.to_path_buf(),
            tpm_state,
            ak,
            disk,
            volume_key: random_hex(32)?,
            secret: random_hex(24)?,
            bundle,
        })
    }

    fn etc(&self) -> Result<PathBuf> {
        let etc = self.dir.join("etc");
        fs::create_dir_all(&etc)?;
        fs::write(
            etc.join("passwd"),
            format!("root:x:0:0:root:/:/nonexistent\nfl:x:{WORKLOAD_UID}:{WORKLOAD_UID}:fl:/nonexistent:/nonexistent\nnobody:x:65534:65534:nobody:/nonexistent:/nonexistent\n"),
        )?;
        fs::write(
            etc.join("group"),
            format!("root:x:0:\nfl:x:{WORKLOAD_UID}:\nnogroup:x:65534:\n"),
        )?;
        Ok(etc)
    }

    /// Builds the image for `guest` (the site's bundle, `/etc/passwd` and `/etc/group`).
    pub fn image(&self, ctx: &Ctx, guest: &Guest, name: &str) -> Result<image::Image> {
        let etc = self.etc()?;
        let mut files = vec![
            ("/etc/passwd".into(), fs::read(etc.join("passwd"))?, 0o644),
            ("/etc/group".into(), fs::read(etc.join("group"))?, 0o644),
        ];
        if let Some(dir) = self.sim_gpu(guest)? {
            for entry in fs::read_dir(&dir)? {
                let entry = entry?;
                let name = entry.file_name().to_string_lossy().to_string();
                files.push((
                    format!("{SIM_GPU_AT}/{name}"),
                    fs::read(entry.path())?,
                    0o600,
                ));
            }
        }
        files.extend(guest.files.iter().cloned());
        let mut binaries = guest.binaries.clone();
        if guest.busybox {
            binaries.push((
                PathBuf::from("/bin/busybox"),
                "/usr/bin/busybox".to_string(),
            ));
        }
        let spec = ImageSpec {
            warden: ctx.bins.warden.clone(),
            binaries,
            policy: guest.policy(),
            trees: vec![(self.bundle.clone(), BUNDLE_AT.to_string())],
            files,
            modules: modules_for(ctx, guest, &self.dir)?
                .into_iter()
                .filter(|m| !guest.omit_modules.contains(m))
                .collect(),
        };
        image::build(
            &ctx.assets,
            &spec,
            &self.dir.join(format!("{name}.cpio.gz")),
        )
    }

    /// `cvm-warden-verify audit`'s `--gpu-root TEST-root` when a guest of this site carried
    /// the simulated GPU (its chain ends at the TEST root, not NVIDIA's).
    pub fn gpu_root_args(&self) -> Vec<std::ffi::OsString> {
        if self.dir.join("nvidia-sim").exists() {
            vec!["--gpu-root".into(), SimGpu::root().into_os_string()]
        } else {
            Vec::new()
        }
    }

    /// The simulated GPU's recording for `guest`, written into this site's folder.
    fn sim_gpu(&self, guest: &Guest) -> Result<Option<PathBuf>> {
        let Some(gpu) = &guest.gpu else {
            return Ok(None);
        };
        let dir = self.dir.join("nvidia-sim");
        gpu.write(&dir)?;
        Ok(Some(dir))
    }

    /// The reference PCR 15 for `guest` (computed on the host from the intact bundle).
    pub fn pcr15(&self, ctx: &Ctx, guest: &Guest, bundle: &Path) -> Result<String> {
        host::tpm_value(&self.reference(ctx, guest, bundle)?, false)
    }

    /// `cvm-warden reference-values`' JSON for `guest` (computed on the host from `bundle`,
    /// with the simulated GPU's recording where the guest has it).
    pub fn reference(&self, ctx: &Ctx, guest: &Guest, bundle: &Path) -> Result<serde_json::Value> {
        let etc = self.etc()?;
        let policy = self.dir.join("reference-policy.toml");
        fs::write(&policy, guest.policy())?;
        let cmdline = self.dir.join("cmdline");
        fs::write(&cmdline, format!("{}\n", guest.cmdline()))?;
        let binds: Vec<(PathBuf, String)> = self
            .sim_gpu(guest)?
            .map(|dir| (dir, SIM_GPU_AT.to_string()))
            .into_iter()
            .collect();
        host::reference_values(
            &ctx.bins, &policy, bundle, BUNDLE_AT, &cmdline, &etc, &binds,
        )
    }

    /// The broker's configuration: this site's AK trusted, `pcr15` required, both resources
    /// released only to an affirming token.
    pub fn broker_config(&self, pcr15: &str, volume_key: &[u8]) -> Result<String> {
        self.broker_config_for(&[pcr15.to_string()], false, volume_key)
    }

    /// The broker's configuration with every PCR 15 of `pcr15` accepted (the boot's and the
    /// re-attestations' values), and with `gpu`: the simulated GPU's TEST root trusted
    /// (`[nvidia] extra_roots`) and one verified GPU required for every resource.
    pub fn broker_config_for(
        &self,
        pcr15: &[String],
        gpu: bool,
        volume_key: &[u8],
    ) -> Result<String> {
        let (key_file, secret_file) = (self.dir.join("volume.key"), self.dir.join("secret.bin"));
        fs::write(&key_file, volume_key)?;
        fs::write(&secret_file, &self.secret)?;
        Ok(format!(
            "trusted_aks = [{:?}]\n\n[reference_values]\ntpm_pcr15 = {pcr15:?}\n{}\n[resources.\"{VOLUME_RESOURCE}\"]\nvalue_file = {:?}\npolicy = {{ tees = [\"tpm\"], require = \"affirming\" }}\n\n[resources.\"{SECRET_RESOURCE}\"]\nvalue_file = {:?}\npolicy = {{ tees = [\"tpm\"], require = \"affirming\" }}\n",
            self.ak,
            if gpu {
                format!(
                    "\n[nvidia]\nextra_roots = [{:?}]\nrequire_gpus = 1\n",
                    SimGpu::root().display().to_string()
                )
            } else {
                String::new()
            },
            key_file.display().to_string(),
            secret_file.display().to_string()
        ))
    }
}

/// The modules the image carries: what `cvm-warden plan` derives from the policy, plus the
/// harness's virtio drivers (also in the policy's `[kernel] modules`).
pub fn modules_for(ctx: &Ctx, guest: &Guest, dir: &Path) -> Result<Vec<String>> {
    let policy = dir.join("plan-policy.toml");
    fs::write(&policy, guest.policy())?;
    let etc = dir.join("etc");
    let out = Command::new(&ctx.bins.warden)
        .args(["plan", "--policy"])
        .arg(&policy)
        .arg("--passwd")
        .arg(etc.join("passwd"))
        .arg("--group")
        .arg(etc.join("group"))
        .output()
        .context("running cvm-warden plan")?;
    let mut modules: Vec<String> = HARNESS_MODULES.iter().map(|m| m.to_string()).collect();
    if let Ok(plan) = serde_json::from_slice::<serde_json::Value>(&out.stdout) {
        let list = plan["modules"]
            .as_array()
            .or_else(|| plan["modules"]["load"].as_array());
        for m in list.into_iter().flatten() {
            if let Some(name) = m.as_str().or(m["name"].as_str()) {
                modules.push(name.to_string());
            }
        }
    }
    modules.sort();
    modules.dedup();
    Ok(modules)
}

/// One boot of a site with a guest: image, broker, VM; returns what left the guest.
#[derive(Debug)]
pub struct Boot<'a> {
    /// The site.
    pub site: &'a Site,
    /// The guest.
    pub guest: Guest,
    /// The broker: `None` = no broker at all (the relay finds nothing listening).
    pub broker: Option<String>,
    /// A slow broker.
    pub broker_delay: Option<Duration>,
    /// Boot without a TPM device.
    pub no_tpm: bool,
    /// Send QMP `system_powerdown` once the workload is ready.
    pub power_button: bool,
    /// Watchdog.
    pub timeout: Duration,
    /// Print the serial console as it happens (the demo).
    pub live: bool,
    /// Leave the probe's ports alone: the workload keeps running (until `done`, at most its
    /// 120 s) while the guest re-attests; `during` runs once it is ready.
    pub hold: bool,
    /// What the host does once the workload is ready (with `hold`: e.g. restart the broker).
    pub during: Option<During<'a>>,
}

/// A host action on the running VM (see [`Boot::during`]).
pub struct During<'a>(pub &'a dyn Fn(&mut Vm) -> Result<()>);

impl std::fmt::Debug for During<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("During(..)")
    }
}

/// The result of one boot.
#[derive(Debug)]
pub struct Booted {
    /// What left the guest.
    pub outcome: Outcome,
    /// What the host saw on the allowed and blocked ports.
    pub ports: Vec<String>,
    /// The image summary.
    pub image: String,
}

impl Boot<'_> {
    /// A boot with the defaults: the broker is the caller's.
    pub fn new<'a>(site: &'a Site, guest: Guest, broker: Option<String>) -> Boot<'a> {
        Boot {
            site,
            guest,
            broker,
            broker_delay: None,
            no_tpm: false,
            power_button: false,
            timeout: Duration::from_secs(150),
            live: false,
            hold: false,
            during: None,
        }
    }

    /// Builds, boots, probes, waits.
    pub fn run(&self, ctx: &Ctx, name: &str) -> Result<Booted> {
        let image = self.site.image(ctx, &self.guest, name)?;
        self.boot(ctx, name, &image.path, image.summary())
    }

    /// Boots a prebuilt image (the bench's trivial `/init`).
    pub fn run_image(&self, ctx: &Ctx, name: &str, image: &Path) -> Result<Booted> {
        self.boot(ctx, name, image, format!("image {}", image.display()))
    }

    fn boot(&self, ctx: &Ctx, name: &str, image: &Path, summary: String) -> Result<Booted> {
        let broker = match &self.broker {
            Some(addr) => addr.clone(),
            // Nothing listens there: the relay's connect fails, the guest sees a closed
            // connection.
            None => format!("127.0.0.1:{}", closed_port()?),
        };
        let config = VmConfig {
            name: name.to_string(),
            dir: self.site.dir.join(name),
            image: image.to_path_buf(),
            append: self.guest.cmdline(),
            disk: self.guest.volume.then(|| self.site.disk.clone()),
            tpm_state: (!self.no_tpm && self.guest.attest).then(|| self.site.tpm_state.clone()),
            broker: Some(broker),
            broker_delay: self.broker_delay,
            hostfwd: vec![ALLOWED_PORT, BLOCKED_PORT],
            memory_mib: 512,
            timeout: self.timeout,
            relay: ctx.bins.harness.clone(),
        };
        let serial_log = config.dir.join("serial.log");
        let mut vm = Vm::start(&ctx.assets, config)?;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let follower = self.live.then(|| {
            let stop = stop.clone();
            std::thread::spawn(move || follow(&serial_log, &stop))
        });
        let mut ports = Vec::new();
        // With a network the probe serves its ports until the host's `done`: the host probes
        // the allowed and the blocked port, then ends the workload.
        let probing = self.power_button || self.guest.network || self.during.is_some();
        if probing && vm.wait_serial("PROBE-READY", self.timeout).is_ok() {
            if let Some(during) = &self.during {
                (during.0)(&mut vm)?;
            }
            if self.power_button {
                vm.qmp("system_powerdown")?;
            } else if !self.hold {
                for port in [BLOCKED_PORT, ALLOWED_PORT] {
                    let host = vm.ports.get(&port).copied().unwrap_or_default();
                    ports.push(format!("{port}: {}", banner(host, port == ALLOWED_PORT)));
                }
            }
        }
        let outcome = vm.wait()?;
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(follower) = follower {
            let _ = follower.join();
        }
        Ok(Booted {
            outcome,
            ports,
            image: summary,
        })
    }
}

impl Booted {
    /// This boot judged on its serial console's records: for boots that end before the
    /// export port exists (no policy yet, or no module loaded), the console carries the
    /// same records, and the auditor verifies console captures.
    pub fn on_console(self) -> Booted {
        let mut outcome = self.outcome;
        outcome.audit = outcome.serial.clone();
        Booted { outcome, ..self }
    }

    /// The host saw the allowed port answer with the probe's banner and the blocked one
    /// stay silent.
    pub fn require_ports(&self) -> Result<()> {
        let saw = |prefix: &str| self.ports.iter().any(|p| p.starts_with(prefix));
        ensure!(
            saw(&format!("{ALLOWED_PORT}: VM-PROBE-BANNER"))
                && saw(&format!("{BLOCKED_PORT}: no banner")),
            "the allowed port must answer and the blocked one must not: {:?}",
            self.ports
        );
        Ok(())
    }
}

/// Prints the serial log as it grows until `stop` (then the rest): audit records as one
/// short line each, everything else as it is.
fn follow(path: &Path, stop: &std::sync::atomic::AtomicBool) {
    let mut done = 0usize;
    let mut pending = String::new();
    loop {
        let last = stop.load(std::sync::atomic::Ordering::SeqCst);
        let text = fs::read(path).unwrap_or_default();
        if text.len() > done {
            pending.push_str(&String::from_utf8_lossy(&text[done..]).replace('\r', ""));
            done = text.len();
            while let Some(end) = pending.find('\n') {
                let line: String = pending.drain(..=end).collect();
                show_console_line(line.trim_end());
            }
        }
        if last {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One console line for people: a record as `  #seq stage/event key details`.
pub fn show_console_line(line: &str) {
    if line.starts_with('{') {
        if let Ok(record) = serde_json::from_str::<serde_json::Value>(line) {
            let mut details = record["details"].to_string();
            if details.len() > 140 {
                let mut cut = 140;
                while !details.is_char_boundary(cut) {
                    cut -= 1;
                }
                details.truncate(cut);
                details.push('…');
            }
            println!(
                "  audit #{:<3} {}/{} {details}",
                record["seq"],
                record["stage"].as_str().unwrap_or("?"),
                record["event"].as_str().unwrap_or("?")
            );
            return;
        }
    }
    if !line.is_empty() {
        println!("  {line}");
    }
}

fn closed_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// Connects to a forwarded port: the first line the guest sends within 5 s (slirp accepts
/// every host connection at once, so a blocked port shows as no banner), then `done` when
/// `finish`.
fn banner(host_port: u16, finish: bool) -> String {
    let attempt = || -> std::io::Result<String> {
        let stream = TcpStream::connect(("127.0.0.1", host_port))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut reader = BufReader::new(stream.try_clone()?);
        let mut line = String::new();
        reader.read_line(&mut line)?;
        if finish && !line.is_empty() {
            let mut writer = stream;
            writeln!(writer, "done")?;
            let mut bye = String::new();
            let _ = reader.read_line(&mut bye);
        }
        Ok(line.trim().to_string())
    };
    match attempt() {
        Ok(line) if line.is_empty() => "no banner (closed)".to_string(),
        Ok(line) => line,
        Err(e) => format!("no banner ({e})"),
    }
}

/// What a scenario expects.
#[derive(Debug, Clone)]
pub struct Expect {
    /// The workload must have started (its probe printed `PROBE-READY` or its exit line).
    pub workload: bool,
    /// The closing audit record's event (`poweroff` / `halt`).
    pub closing: &'static str,
    /// Substrings the exported audit log must contain (the reason).
    pub reasons: Vec<&'static str>,
    /// `cvm-warden-verify audit verify --trusted-ak` exit code.
    pub verify: i32,
}

/// Judges one boot against `expect`, and that no key byte left the guest.
pub fn judge(ctx: &Ctx, site: &Site, booted: &Booted, expect: &Expect, dir: &Path) -> Result<()> {
    let o = &booted.outcome;
    ensure!(
        !o.panicked(),
        "the guest kernel panicked:\n{}",
        tail(&o.serial, 30)
    );
    ensure!(
        !o.timed_out,
        "the VM neither powered off nor halted within the watchdog:\n{}",
        tail(&o.serial, 30)
    );
    let closing = o.closing().with_context(|| {
        format!(
            "the exported audit log has no closing record; serial tail:\n{}",
            tail(&o.serial, 30)
        )
    })?;
    ensure!(
        closing["event"] == expect.closing,
        "closing record {closing}, expected event {:?}",
        expect.closing
    );
    let ran = o.serial.contains("PROBE start uptime") || o.serial.contains("PROBE exiting with");
    ensure!(
        ran == expect.workload,
        "the workload {} although it {}; serial tail:\n{}",
        if ran { "ran" } else { "did not run" },
        if expect.workload { "must" } else { "must not" },
        tail(&o.serial, 30)
    );
    if ran {
        let failed: Vec<&str> = o
            .serial
            .lines()
            .filter(|l| l.contains("PROBE FAIL"))
            .collect();
        ensure!(
            failed.is_empty(),
            "the probe found problems:\n{}",
            failed.join("\n")
        );
    }
    for reason in &expect.reasons {
        ensure!(
            o.audit.contains(reason),
            "the exported audit log does not say {reason:?}; its failures:\n{}",
            o.audit
                .lines()
                .filter(|l| l.contains("failed") || l.contains("error"))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    ensure!(
        o.sink_hits == 0,
        "the guest reached the outbound sink {} times",
        o.sink_hits
    );
    // The exported log, judged by the auditor's tool.
    let log = dir.join("exported-audit.jsonl");
    fs::write(&log, &o.audit)?;
    let ak = dir.join("trusted-ak.b64");
    fs::write(&ak, format!("{}\n", site.ak))?;
    let verify = Command::new(&ctx.bins.verify)
        .args(["audit", "--trusted-ak"])
        .arg(&ak)
        .args(site.gpu_root_args())
        .arg(&log)
        .output()
        .context("running cvm-warden-verify")?;
    let code = verify.status.code().unwrap_or(-1);
    ensure!(
        code == expect.verify,
        "audit verify exited {code}, expected {}:\n{}{}",
        expect.verify,
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
    // No key byte anywhere outside the guest's memory.
    for (what, key) in [("volume key", &site.volume_key), ("secret", &site.secret)] {
        let needle = key.as_slice();
        ensure!(
            !o.serial
                .as_bytes()
                .windows(needle.len())
                .any(|w| w == needle),
            "the {what} appears in the serial log"
        );
        ensure!(
            !o.audit
                .as_bytes()
                .windows(needle.len())
                .any(|w| w == needle),
            "the {what} appears in the exported audit log"
        );
        if site.disk.exists() {
            ensure!(
                !host::file_contains(&site.disk, needle)?,
                "the {what} appears in the disk image"
            );
        }
    }
    Ok(())
}

/// The last `lines` lines of `text`.
pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A named scenario.
#[derive(Debug, Clone, Copy)]
pub struct Scenario {
    /// Its name (`cargo xtask vm-test NAME`).
    pub name: &'static str,
    /// What it shows.
    pub what: &'static str,
    /// The test.
    pub run: fn(&Ctx, &Path) -> Result<String>,
}

/// Every scenario, in the order they run.
pub fn all() -> Vec<Scenario> {
    crate::scenarios::ALL.to_vec()
}

/// Runs `scenarios` with at most `parallel` VMs at once; prints one line each; returns the
/// number that failed.
pub fn run_all(ctx: &Ctx, scenarios: &[Scenario], parallel: usize) -> usize {
    let queue = std::sync::Mutex::new(scenarios.iter().copied());
    let failed = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|scope| {
        for _ in 0..parallel.max(1) {
            scope.spawn(|| loop {
                let next = queue.lock().ok().and_then(|mut q| q.next());
                let Some(scenario) = next else { break };
                let dir = ctx.work.join(scenario.name);
                let start = Instant::now();
                let result = (scenario.run)(ctx, &dir);
                let secs = start.elapsed().as_secs_f64();
                match result {
                    Ok(summary) => println!(
                        "vm-test: ok     {:<28} {secs:5.1} s  {summary}",
                        scenario.name
                    ),
                    Err(error) => {
                        failed.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        println!(
                            "vm-test: FAILED {:<28} {secs:5.1} s  ({}): {error:#}\n  (files: {})",
                            scenario.name,
                            scenario.what,
                            dir.display()
                        );
                    }
                }
            });
        }
    });
    failed.into_inner()
}

/// Fails unless `text` shows `what`.
pub fn require(text: &str, what: &str, context: &str) -> Result<()> {
    if !text.contains(what) {
        bail!("{context}: expected {what:?}");
    }
    Ok(())
}
