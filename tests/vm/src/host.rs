//! What the host plays around a VM: the image builder's TPM provisioning (a persistent AK
//! in the swtpm state the VM will boot with), the model owner's reference values, the key
//! broker, and blank disks.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::{output_of, sh, Bins};

/// The persistent AK handle the guest policy names.
pub const AK_HANDLE: &str = "0x81010002";

/// swtpm on two free loopback ports (the swtpm TCTI talks to the control channel on port + 1),
/// listening. Ports picked while another VM's harness picks its own can collide: a swtpm that
/// exits or does not listen is retried on fresh ports.
fn start_provisioning_swtpm(state: &Path, work: &Path) -> Result<(Child, u16)> {
    let mut last = String::new();
    for _ in 0..8 {
        let port = free_port()?;
        let ctrl = port + 1;
        let mut swtpm = Command::new("swtpm")
            .args(["socket", "--tpm2", "--tpmstate"])
            .arg(format!("dir={}", state.display()))
            .args([
                "--server",
                &format!("type=tcp,port={port},bindaddr=127.0.0.1"),
                "--ctrl",
                &format!("type=tcp,port={ctrl},bindaddr=127.0.0.1"),
                "--flags",
                "not-need-init,startup-clear",
            ])
            .stdout(Stdio::null())
            .stderr(fs::File::create(work.join("swtpm-provision.log"))?)
            .spawn()
            .context("starting swtpm to provision the AK")?;
        let start = Instant::now();
        loop {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Ok((swtpm, port));
            }
            if let Some(status) = swtpm.try_wait()? {
                last = format!(
                    "swtpm on ports {port}/{ctrl} exited with {status}: {}",
                    fs::read_to_string(work.join("swtpm-provision.log")).unwrap_or_default()
                );
                break;
            }
            if start.elapsed() > Duration::from_secs(10) {
                let _ = swtpm.kill();
                let _ = swtpm.wait();
                last = format!("swtpm did not listen on {port} within 10 s");
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    bail!("cannot start swtpm to provision the AK: {last}")
}

/// A swtpm state folder with an RSA AK at [`AK_HANDLE`]; returns the AK as base64 SPKI DER
/// (what the broker's `trusted_aks` and `audit verify --trusted-ak` take).
pub fn provision_tpm(state: &Path, work: &Path) -> Result<String> {
    fs::create_dir_all(state)?;
    fs::create_dir_all(work)?;
    let (mut swtpm, port) = start_provisioning_swtpm(state, work)?;
    let result = (|| -> Result<String> {
        let tcti = format!("swtpm:host=127.0.0.1,port={port}");
        let tool = |name: &str| {
            let mut cmd = Command::new(name);
            cmd.env("TPM2TOOLS_TCTI", &tcti).current_dir(work);
            cmd
        };
        let quiet = |cmd: &mut Command| -> Result<()> { output_of(cmd).map(|_| ()) };
        let flush = || -> Result<()> {
            quiet(tool("tpm2_flushcontext").arg("-t"))?;
            quiet(tool("tpm2_flushcontext").arg("-s"))
        };
        quiet(tool("tpm2_createek").args(["-c", "ek.ctx", "-G", "rsa", "-u", "ek.pub"]))?;
        flush()?;
        quiet(tool("tpm2_createak").args([
            "-C", "ek.ctx", "-c", "ak.ctx", "-G", "rsa", "-g", "sha256", "-s", "rsassa", "-u",
            "ak.pub", "-n", "ak.name",
        ]))?;
        flush()?;
        quiet(tool("tpm2_evictcontrol").args(["-C", "o", "-c", "ak.ctx", AK_HANDLE]))?;
        flush()?;
        quiet(tool("tpm2_readpublic").args(["-c", AK_HANDLE, "-f", "der", "-o", "ak.der"]))?;
        // A clean TPM2_Shutdown: swtpm counts unclean stops towards dictionary-attack lockout.
        quiet(tool("tpm2_shutdown").arg("-c"))?;
        let der = fs::read(work.join("ak.der"))?;
        use base64::Engine as _;
        Ok(base64::engine::general_purpose::STANDARD.encode(der))
    })();
    let _ = swtpm.kill();
    let _ = swtpm.wait();
    result
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The model owner's reference values (`cvm-warden reference-values`' JSON: `tpm.value`,
/// PCR 15 after the measure stage, and `tpm.reattest_value`, PCR 15 while the workload runs),
/// computed with the bundle where the guest has it (a private mount namespace binds the host
/// copy at the guest path), the guest's kernel command line, and `binds` (host folder, guest
/// path) bound the same way: each guest path must lie under the bundle's top folder (a tmpfs
/// there hides the host's own), e.g. a simulated GPU's recording the policy names.
pub fn reference_values(
    bins: &Bins,
    policy: &Path,
    bundle_src: &Path,
    bundle_at: &str,
    cmdline: &Path,
    etc: &Path,
    binds: &[(PathBuf, String)],
) -> Result<serde_json::Value> {
    let top = Path::new(bundle_at)
        .iter()
        .nth(1)
        .context("the bundle's guest path has no top folder")?;
    let top = Path::new("/").join(top);
    let mut script = format!(
        "set -e; mount -t tmpfs cvm-warden-vm {top}; mkdir -p {at}; mount --bind {src} {at}; ",
        top = top.display(),
        at = bundle_at,
        src = bundle_src.display()
    );
    for (src, at) in binds {
        // Outside the tmpfs, `mkdir -p` would write into the host's own folders.
        if !Path::new(at).starts_with(&top) {
            bail!(
                "the guest path {at} is not under {}: the reference computation can only bind there",
                top.display()
            );
        }
        script.push_str(&format!(
            "mkdir -p {at}; mount --bind {src} {at}; ",
            src = src.display()
        ));
    }
    script.push_str("exec \"$@\"");
    let text = output_of(
        Command::new("unshare")
            .args([
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                &script,
                "sh",
            ])
            .arg(&bins.warden)
            .args(["reference-values", "--policy"])
            .arg(policy)
            .arg("--cmdline")
            .arg(cmdline)
            .arg("--passwd")
            .arg(etc.join("passwd"))
            .arg("--group")
            .arg(etc.join("group")),
    )?;
    serde_json::from_str(&text).with_context(|| format!("reference-values printed no JSON: {text}"))
}

/// `tpm.value` (or `tpm.reattest_value` when `reattest`) of [`reference_values`]' JSON.
pub fn tpm_value(values: &serde_json::Value, reattest: bool) -> Result<String> {
    let key = if reattest { "reattest_value" } else { "value" };
    values["tpm"][key]
        .as_str()
        .map(str::to_string)
        .with_context(|| format!("reference-values printed no tpm.{key}: {values}"))
}

/// The test broker on the host (`kbs-test-broker`), on a free loopback port.
#[derive(Debug)]
pub struct Broker {
    child: Option<Child>,
    /// `host:port`.
    pub addr: String,
    log: PathBuf,
}

impl Broker {
    /// Starts it with `config` (TOML) written into `dir`.
    pub fn start(bins: &Bins, dir: &Path, config: &str) -> Result<Broker> {
        Broker::start_on(bins, dir, config, "127.0.0.1:0")
    }

    /// Starts it on `listen` (`host:port`; a broker restarted with another configuration
    /// where a running VM's relay already connects).
    pub fn start_on(bins: &Bins, dir: &Path, config: &str, listen: &str) -> Result<Broker> {
        fs::create_dir_all(dir)?;
        let config_path = dir.join("broker.toml");
        fs::write(&config_path, config)?;
        let ready = dir.join("broker.ready");
        let _ = fs::remove_file(&ready);
        let log = dir.join("broker.log");
        let child = Command::new(&bins.broker)
            .arg("--config")
            .arg(&config_path)
            .args(["--listen", listen, "--ready-file"])
            .arg(&ready)
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log)?)
            .spawn()
            .context("starting kbs-test-broker")?;
        let mut broker = Broker {
            child: Some(child),
            addr: String::new(),
            log,
        };
        let start = Instant::now();
        while !ready.exists() {
            if start.elapsed() > Duration::from_secs(10) {
                bail!(
                    "the broker did not start: {}",
                    fs::read_to_string(&broker.log).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let url = fs::read_to_string(&ready)?;
        broker.addr = url
            .trim()
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_string();
        Ok(broker)
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A sparse blank raw disk of `mib` MiB.
pub fn blank_disk(path: &Path, mib: u64) -> Result<()> {
    let file = fs::File::create(path)?;
    file.set_len(mib * 1024 * 1024)?;
    Ok(())
}

/// Whether `needle` occurs in the file at `path` (read in chunks: disk images are large).
pub fn file_contains(path: &Path, needle: &[u8]) -> Result<bool> {
    use std::io::Read;
    if needle.is_empty() {
        return Ok(false);
    }
    let mut file = fs::File::open(path)?;
    let mut carry: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            return Ok(false);
        }
        carry.extend_from_slice(&buf[..n]);
        if carry.windows(needle.len()).any(|w| w == needle) {
            return Ok(true);
        }
        let keep = needle.len().saturating_sub(1).min(carry.len());
        carry.drain(..carry.len() - keep);
    }
}

/// `cryptsetup luksFormat` on a file (the host has no device-mapper, but formatting and
/// header edits work on a file): the harness's "device with a foreign header" setups.
pub fn luks_format(disk: &Path, key: &[u8], dir: &Path) -> Result<()> {
    let keyfile = dir.join("foreign.key");
    fs::write(&keyfile, key)?;
    sh(Command::new("cryptsetup")
        .args([
            "luksFormat",
            "--batch-mode",
            "--type",
            "luks2",
            "--pbkdf",
            "pbkdf2",
            "--pbkdf-force-iterations",
            "1000",
            "--key-file",
        ])
        .arg(&keyfile)
        .arg(disk))?;
    fs::remove_file(&keyfile)?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn key_bytes_are_found_across_read_chunks() {
        let dir = std::env::temp_dir().join(format!("cvm-warden-vm-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("disk.img");
        let mut bytes = vec![0u8; (1 << 20) + 64];
        let needle = b"0123456789abcdef";
        // Straddles the 1 MiB boundary of the reader's chunks.
        bytes[(1 << 20) - 5..(1 << 20) + 11].copy_from_slice(needle);
        fs::write(&path, &bytes).unwrap();
        assert!(file_contains(&path, needle).unwrap());
        assert!(!file_contains(&path, b"fedcba9876543210").unwrap());
        assert!(!file_contains(&path, b"").unwrap());
        fs::remove_dir_all(&dir).unwrap();
    }
}
