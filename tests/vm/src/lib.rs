//! The VM harness: cvm-warden as PID 1 of a real Linux guest (Debian's kernel, QEMU TCG,
//! swtpm, the test broker on the host). `cargo xtask vm-test` runs its scenarios,
//! `cargo xtask image` builds one image, `cargo xtask demo` boots the demo CVM.
//!
//! - [`assets`]: QEMU, firmware and the guest kernel from Debian packages, cached by version.
//! - [`image`]: initramfs images with cvm-warden as `/init`.
//! - [`vm`]: one VM (private folder, swtpm, QEMU, watchdog, audit port, QMP).
//! - [`host`]: what the host side plays: the TPM's AK provisioning, the broker, disks.
//! - [`scenario`]: the fault matrix and the good boots, each an assertion.
//! - [`systemd`]: the systemd shape for real (a Debian image with systemd as PID 1, built by
//!   `image/mkimage.sh`, judged against the live systemd).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};

pub mod assets;
pub mod bench;
pub mod demo;
pub mod host;
pub mod image;
pub mod scenario;
pub mod scenarios;
pub mod systemd;
pub mod vm;

/// Runs a command, echoing it, and fails when it fails.
pub fn sh(cmd: &mut Command) -> Result<()> {
    eprintln!("$ {}", show(cmd));
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {}", show(cmd)))?;
    if !status.success() {
        bail!("{} failed with {status}", show(cmd));
    }
    Ok(())
}

/// Runs a command quietly; its standard output, or an error with its standard error.
pub fn output_of(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot start {}", show(cmd)))?;
    if !out.status.success() {
        bail!(
            "{} failed with {}: {}",
            show(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A command as one line.
pub fn show(cmd: &Command) -> String {
    let mut text = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        text.push(' ');
        text.push_str(&arg.to_string_lossy());
    }
    text
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// The binaries the harness drives (built by the xtask before it runs the harness).
#[derive(Debug, Clone)]
pub struct Bins {
    /// The release cvm-warden (`/init` of every image).
    pub warden: PathBuf,
    /// `cvm-warden-verify` (the auditor's tool: judges the exported audit logs).
    pub verify: PathBuf,
    /// `kbs-test-broker`.
    pub broker: PathBuf,
    /// `vm-probe` (the probe workload).
    pub probe: PathBuf,
    /// `vm-test` itself (QEMU runs it as the guestfwd relay).
    pub harness: PathBuf,
}

impl Bins {
    /// The binaries in `dir` (a cargo profile folder, e.g. `target/release`).
    pub fn in_dir(dir: &Path) -> Result<Bins> {
        let dir = &std::fs::canonicalize(dir).with_context(|| {
            format!(
                "{} is missing: build the release binaries first",
                dir.display()
            )
        })?;
        let bin = |name: &str| -> Result<PathBuf> {
            let path = dir.join(name);
            if !path.is_file() {
                bail!(
                    "{} is missing: build it first (cargo xtask vm-test does)",
                    path.display()
                );
            }
            Ok(path)
        };
        Ok(Bins {
            warden: bin("cvm-warden")?,
            verify: bin("cvm-warden-verify")?,
            broker: bin("kbs-test-broker")?,
            probe: bin("vm-probe")?,
            harness: bin("vm-test")?,
        })
    }
}

/// The guestfwd relay: QEMU runs `vm-test relay HOST:PORT DELAY_MS` per guest connection,
/// with the connection on standard input and output. It waits `DELAY_MS` (a slow broker),
/// then copies both ways; when the host address does not answer it just ends (the guest
/// sees the connection closed: a broker that is down).
pub fn relay(target: &str, delay_ms: u64) -> Result<()> {
    std::thread::sleep(Duration::from_millis(delay_ms));
    let upstream = TcpStream::connect(target).with_context(|| format!("connecting {target}"))?;
    let mut up_read = upstream.try_clone()?;
    let mut up_write = upstream;
    let to_host = std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut buf = [0u8; 16384];
        while let Ok(n) = stdin.read(&mut buf) {
            if n == 0 || up_write.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = up_write.shutdown(std::net::Shutdown::Write);
    });
    let mut stdout = std::io::stdout().lock();
    let mut buf = [0u8; 16384];
    while let Ok(n) = up_read.read(&mut buf) {
        if n == 0 || stdout.write_all(&buf[..n]).is_err() {
            break;
        }
        let _ = stdout.flush();
    }
    drop(to_host);
    Ok(())
}

/// The outbound sink: every guest connection that reaches it appends a line to `hits` (a
/// workload behind the allowlist must never get here).
pub fn sink(hits: &Path) -> Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(hits)?;
    writeln!(file, "connection")?;
    let _ = std::io::stdout().write_all(b"SINK-BANNER\n");
    Ok(())
}
