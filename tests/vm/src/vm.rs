//! One test VM: QEMU under TCG with its private folder (serial log, the audit log read from a
//! virtio-serial port, QMP socket, swtpm state over a unix socket, the disk image), user-mode
//! networking with `restrict=on` (no guest packet leaves the machine: the broker is reached
//! through `guestfwd`, inbound probes go through `hostfwd`), a watchdog, and cleanup by PID.
//!
//! QEMU exits 0 on every guest power-off, so the outcome is never read from its exit status:
//! callers judge the closing audit record and the serial log (`Kernel panic`).

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::assets::Assets;

/// The guest's address of the broker (a `guestfwd` to the host's broker).
pub const BROKER_GUEST_ADDR: &str = "10.0.2.100:5555";
/// A second guestfwd the workload must NOT be able to reach (an outbound probe).
pub const SINK_GUEST_ADDR: &str = "10.0.2.101:7777";
/// A guestfwd the allowlist opens (outbound): it answers with a banner.
pub const ALLOWED_OUT_GUEST_ADDR: &str = "10.0.2.102:7002";
/// The virtio-serial port name the audit log leaves the guest on.
pub const AUDIT_PORT: &str = "cvm-warden.audit";

/// How to start one VM.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// A short name (logs, the private folder's name).
    pub name: String,
    /// The private folder (created; kept after the run for inspection).
    pub dir: PathBuf,
    /// The initramfs.
    pub image: PathBuf,
    /// The kernel command line.
    pub append: String,
    /// A raw disk image, seen as `/dev/vda`.
    pub disk: Option<PathBuf>,
    /// swtpm's state folder; `None`: no TPM device.
    pub tpm_state: Option<PathBuf>,
    /// The host address the guest's `10.0.2.100:5555` is relayed to.
    pub broker: Option<String>,
    /// Each relayed broker connection waits this long first (a slow broker).
    pub broker_delay: Option<Duration>,
    /// Guest TCP ports forwarded from free host ports on 127.0.0.1.
    pub hostfwd: Vec<u16>,
    /// Guest memory.
    pub memory_mib: u32,
    /// The watchdog: QEMU and swtpm are killed after this.
    pub timeout: Duration,
    /// The harness binary (`vm-test`), run by QEMU as the guestfwd relay.
    pub relay: PathBuf,
}

/// A running VM.
#[derive(Debug)]
pub struct Vm {
    config: VmConfig,
    qemu: Option<Child>,
    swtpm: Option<Child>,
    /// Guest port → host port.
    pub ports: BTreeMap<u16, u16>,
    audit_reader: Option<JoinHandle<()>>,
    sink_hits: PathBuf,
    started: Instant,
}

/// What a finished VM left.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The serial console (CR stripped).
    pub serial: String,
    /// What arrived on the audit virtio-serial port.
    pub audit: String,
    /// The watchdog killed QEMU (the guest neither powered off nor panicked in time).
    pub timed_out: bool,
    /// The guest halted (QEMU stays up after `reboot: System halted`; killed by the harness).
    pub halted: bool,
    /// Connections that reached the outbound sink (must stay 0).
    pub sink_hits: usize,
    /// Host wall time of the boot.
    pub wall: Duration,
}

impl Outcome {
    /// Whether the guest kernel panicked.
    pub fn panicked(&self) -> bool {
        self.serial.contains("Kernel panic")
    }

    /// The closing record (`shutdown/…`; only the closing checkpoint may follow it).
    pub fn closing(&self) -> Option<serde_json::Value> {
        let last = self
            .audit
            .lines()
            .rev()
            .filter(|l| l.starts_with('{'))
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|r| r["stage"] != "audit" || r["event"] != "checkpoint")?;
        (last["stage"] == "shutdown").then_some(last)
    }

    /// Every record with this stage and event.
    pub fn records(&self, stage: &str, event: &str) -> Vec<serde_json::Value> {
        self.audit
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|r| r["stage"] == stage && r["event"] == event)
            .collect()
    }
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn wait_for(path: &Path, limit: Duration) -> Result<()> {
    let start = Instant::now();
    while !path.exists() {
        if start.elapsed() > limit {
            bail!("{} did not appear within {limit:?}", path.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

impl Vm {
    /// Starts swtpm (when configured) and QEMU.
    pub fn start(assets: &Assets, config: VmConfig) -> Result<Vm> {
        fs::create_dir_all(&config.dir)?;
        let dir = &config.dir;
        for stale in [
            "serial.log",
            "audit.jsonl",
            "audit.sock",
            "qmp.sock",
            "tpm.sock",
        ] {
            let _ = fs::remove_file(dir.join(stale));
        }
        let mut vm = Vm {
            qemu: None,
            swtpm: None,
            ports: BTreeMap::new(),
            audit_reader: None,
            sink_hits: dir.join("sink-hits"),
            started: Instant::now(),
            config: config.clone(),
        };
        let _ = fs::remove_file(&vm.sink_hits);
        let mut qemu = Command::new(&assets.qemu);
        qemu.env("QEMU_MODULE_DIR", &assets.qemu_modules);
        for dir in &assets.firmware {
            qemu.arg("-L").arg(dir);
        }
        qemu.args([
            "-machine",
            "pc",
            "-accel",
            "tcg",
            "-cpu",
            "max",
            "-smp",
            "1",
            "-m",
            &config.memory_mib.to_string(),
            "-nodefaults",
            "-display",
            "none",
            "-no-reboot",
        ]);
        qemu.arg("-kernel").arg(&assets.kernel);
        qemu.arg("-initrd").arg(&config.image);
        qemu.args(["-append", &config.append]);
        qemu.arg("-serial")
            .arg(format!("file:{}", dir.join("serial.log").display()));
        qemu.arg("-qmp").arg(format!(
            "unix:{},server=on,wait=off",
            dir.join("qmp.sock").display()
        ));
        qemu.args(["-device", "virtio-rng-pci"]);

        // The audit port: the harness listens, QEMU connects (a file chardev would drop the
        // guest's writes silently).
        let listener = UnixListener::bind(dir.join("audit.sock"))?;
        let audit_path = dir.join("audit.jsonl");
        vm.audit_reader = Some(std::thread::spawn(move || {
            if let Ok((mut stream, _)) = listener.accept() {
                if let Ok(mut file) = fs::File::create(&audit_path) {
                    let mut buf = [0u8; 8192];
                    while let Ok(n) = stream.read(&mut buf) {
                        if n == 0 || file.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                }
            }
        }));
        qemu.args(["-device", "virtio-serial-pci"]);
        qemu.arg("-chardev").arg(format!(
            "socket,id=audit,path={}",
            dir.join("audit.sock").display()
        ));
        qemu.args([
            "-device",
            &format!("virtserialport,chardev=audit,name={AUDIT_PORT}"),
        ]);

        if let Some(disk) = &config.disk {
            qemu.arg("-drive")
                .arg(format!("file={},format=raw,if=none,id=d0", disk.display()));
            qemu.args(["-device", "virtio-blk-pci,drive=d0"]);
        }

        let mut netdev = String::from("user,id=n0,restrict=on");
        for guest in &config.hostfwd {
            let host = free_port()?;
            vm.ports.insert(*guest, host);
            netdev.push_str(&format!(",hostfwd=tcp:127.0.0.1:{host}-:{guest}"));
        }
        if let Some(broker) = &config.broker {
            let delay = config.broker_delay.map(|d| d.as_millis()).unwrap_or(0);
            netdev.push_str(&format!(
                ",guestfwd=tcp:{BROKER_GUEST_ADDR}-cmd:{} relay {broker} {delay}",
                config.relay.display()
            ));
        }
        netdev.push_str(&format!(
            ",guestfwd=tcp:{SINK_GUEST_ADDR}-cmd:{} sink {}",
            config.relay.display(),
            vm.sink_hits.display()
        ));
        netdev.push_str(&format!(
            ",guestfwd=tcp:{ALLOWED_OUT_GUEST_ADDR}-cmd:{} sink {}",
            config.relay.display(),
            dir.join("allowed-hits").display()
        ));
        qemu.args(["-netdev", &netdev]);
        qemu.args(["-device", "virtio-net-pci,netdev=n0,romfile="]);

        if let Some(state) = &config.tpm_state {
            let sock = dir.join("tpm.sock");
            let swtpm = Command::new("swtpm")
                .args(["socket", "--tpm2", "--tpmstate"])
                .arg(format!("dir={}", state.display()))
                .arg("--ctrl")
                .arg(format!("type=unixio,path={}", sock.display()))
                .arg("--terminate")
                .stdout(Stdio::null())
                .stderr(fs::File::create(dir.join("swtpm.log"))?)
                .spawn()
                .context("starting swtpm")?;
            vm.swtpm = Some(swtpm);
            wait_for(&sock, Duration::from_secs(10))?;
            qemu.arg("-chardev")
                .arg(format!("socket,id=chrtpm,path={}", sock.display()));
            qemu.args(["-tpmdev", "emulator,id=tpm0,chardev=chrtpm"]);
            qemu.args(["-device", "tpm-tis,tpmdev=tpm0"]);
        }

        fs::write(dir.join("qemu.cmdline"), crate::show(&qemu))?;
        let child = qemu
            .stdin(Stdio::null())
            .stdout(fs::File::create(dir.join("qemu.log"))?)
            .stderr(fs::File::create(dir.join("qemu.err"))?)
            .spawn()
            .context("starting qemu")?;
        vm.qemu = Some(child);
        vm.started = Instant::now();
        Ok(vm)
    }

    /// The serial log so far (CR stripped).
    pub fn serial(&self) -> String {
        // Lossy: one stray byte on the console must not hide the rest of it.
        String::from_utf8_lossy(&fs::read(self.config.dir.join("serial.log")).unwrap_or_default())
            .replace('\r', "")
    }

    /// Waits until the serial log contains `marker`; fails when QEMU ends first or after
    /// `limit`.
    pub fn wait_serial(&mut self, marker: &str, limit: Duration) -> Result<()> {
        let start = Instant::now();
        loop {
            if self.serial().contains(marker) {
                return Ok(());
            }
            if let Some(qemu) = self.qemu.as_mut() {
                if qemu.try_wait()?.is_some() {
                    bail!(
                        "{}: the VM ended before printing {marker:?}",
                        self.config.name
                    );
                }
            }
            if start.elapsed() > limit {
                bail!(
                    "{}: no {marker:?} on the serial console within {limit:?}",
                    self.config.name
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Sends one QMP command and returns its `return` value.
    pub fn qmp(&self, execute: &str) -> Result<serde_json::Value> {
        self.qmp_with(execute, serde_json::Value::Null)
    }

    /// Whether QEMU is still running.
    pub fn running(&mut self) -> bool {
        self.qemu
            .as_mut()
            .is_some_and(|q| matches!(q.try_wait(), Ok(None)))
    }

    /// Sends one QMP command with `arguments` (none when `Null`) and returns its `return`
    /// value.
    pub fn qmp_with(
        &self,
        execute: &str,
        arguments: serde_json::Value,
    ) -> Result<serde_json::Value> {
        self.qmp_repeat(execute, arguments, 1, Duration::ZERO)
    }

    /// Sends one QMP command `times` times on one connection, `gap` apart (key presses in a
    /// burst); returns the last `return` value.
    pub fn qmp_repeat(
        &self,
        execute: &str,
        arguments: serde_json::Value,
        times: usize,
        gap: Duration,
    ) -> Result<serde_json::Value> {
        let stream =
            UnixStream::connect(self.config.dir.join("qmp.sock")).context("connecting to QMP")?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut reader = BufReader::new(stream.try_clone()?);
        let mut writer = stream;
        let mut line = String::new();
        reader.read_line(&mut line)?; // greeting
        let mut call =
            |command: &str, arguments: &serde_json::Value| -> Result<serde_json::Value> {
                let mut request = serde_json::json!({ "execute": command });
                if !arguments.is_null() {
                    request["arguments"] = arguments.clone();
                }
                writeln!(writer, "{request}")?;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line)? == 0 {
                        bail!("QMP closed during {command}");
                    }
                    let value: serde_json::Value = serde_json::from_str(&line)?;
                    if value.get("event").is_some() {
                        continue;
                    }
                    if let Some(error) = value.get("error") {
                        bail!("QMP {command}: {error}");
                    }
                    return Ok(value["return"].clone());
                }
            };
        call("qmp_capabilities", &serde_json::Value::Null)?;
        let mut last = call(execute, &arguments)?;
        for _ in 1..times {
            std::thread::sleep(gap);
            last = call(execute, &arguments)?;
        }
        Ok(last)
    }

    /// Waits for QEMU to end (power-off or panic) within the watchdog; a halted guest
    /// (`reboot: System halted`) is killed and reported as halted.
    pub fn wait(mut self) -> Result<Outcome> {
        let deadline = self.started + self.config.timeout;
        let mut timed_out = false;
        let mut halted = false;
        while let Some(qemu) = self.qemu.as_mut() {
            if qemu.try_wait()?.is_some() {
                break;
            }
            if self.serial().contains("reboot: System halted") {
                // QEMU stays up after a halt: give the port a moment, then stop it.
                std::thread::sleep(Duration::from_millis(500));
                halted = true;
                self.kill();
                break;
            }
            if Instant::now() > deadline {
                timed_out = true;
                self.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.qemu = None;
        let wall = self.started.elapsed();
        self.stop_swtpm();
        if let Some(reader) = self.audit_reader.take() {
            // When QEMU never connected, this connection ends the reader's accept().
            let _ = UnixStream::connect(self.config.dir.join("audit.sock"));
            let _ = reader.join();
        }
        let audit = String::from_utf8_lossy(
            &fs::read(self.config.dir.join("audit.jsonl")).unwrap_or_default(),
        )
        .replace('\r', "");
        let sink_hits = fs::read_to_string(&self.sink_hits)
            .map(|t| t.lines().count())
            .unwrap_or(0);
        Ok(Outcome {
            serial: self.serial(),
            audit,
            timed_out,
            halted,
            sink_hits,
            wall,
        })
    }

    fn kill(&mut self) {
        if let Some(mut qemu) = self.qemu.take() {
            let _ = qemu.kill();
            let _ = qemu.wait();
        }
    }

    fn stop_swtpm(&mut self) {
        if let Some(mut swtpm) = self.swtpm.take() {
            // --terminate: it ends when QEMU's connection closes; give it a moment.
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(3) {
                if let Ok(Some(_)) = swtpm.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = swtpm.kill();
            let _ = swtpm.wait();
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.kill();
        self.stop_swtpm();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn outcome(audit: &str, serial: &str) -> Outcome {
        Outcome {
            serial: serial.to_string(),
            audit: audit.to_string(),
            timed_out: false,
            halted: false,
            sink_hits: 0,
            wall: Duration::ZERO,
        }
    }

    #[test]
    fn the_closing_record_may_be_followed_only_by_the_closing_checkpoint() {
        let closed = outcome(
            "{\"stage\":\"launch\",\"event\":\"exited\"}\n{\"stage\":\"shutdown\",\"event\":\"poweroff\"}\n{\"stage\":\"audit\",\"event\":\"checkpoint\"}\n",
            "",
        );
        assert_eq!(closed.closing().unwrap()["event"], "poweroff");
        let open = outcome(
            "{\"stage\":\"shutdown\",\"event\":\"poweroff\"}\n{\"stage\":\"launch\",\"event\":\"started\"}\n",
            "",
        );
        assert!(open.closing().is_none(), "a record after the closing one");
        assert!(outcome("", "").closing().is_none());
        assert!(outcome("", "[ 1.0] Kernel panic - not syncing").panicked());
    }
}
