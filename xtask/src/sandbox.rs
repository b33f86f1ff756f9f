//! Sandboxed sites for the demos: network namespaces, swtpm as a site's TPM (on loopback
//! inside the site's namespace, so every site uses the same ports), the image builder's AK,
//! the test broker, and `cvm-warden init --sandbox` as PID 1 of fresh PID, mount and UTS
//! namespaces. Shared by `demo --sandbox` and `flare`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

use crate::{cargo, sh, show, target_dir};

/// swtpm's command port inside a site's namespace (the control port is the next one).
pub(crate) const TPM_PORT: u16 = 12321;
const TPM_CTRL_PORT: u16 = 12322;
/// The persistent handle of the attestation key the image builder provisions.
pub(crate) const AK_HANDLE: &str = "0x81010002";

/// Runs `cmd`, requires success, parses its stdout as JSON.
pub(crate) fn json_of(cmd: &mut Command) -> Result<serde_json::Value> {
    eprintln!("$ {}", show(cmd));
    let out = cmd
        .output()
        .with_context(|| format!("cannot start {}", show(cmd)))?;
    ensure!(
        out.status.success(),
        "{} failed with {}: {}",
        show(cmd),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).with_context(|| format!("{} printed no JSON", show(cmd)))
}

/// `cvm-warden audit verify --trusted-ak AK LOG` must exit 0 (every run attested: covered up
/// to its closing record by checkpoints of the TPM the broker trusts), and without the pin
/// the same log must not (exit 3: an unpinned AK proves nothing).
pub(crate) fn audit_verify_attested(warden: &Path, log: &Path, trusted_ak: &Path) -> Result<()> {
    sh(Command::new(warden)
        .args(["audit", "verify", "--trusted-ak"])
        .arg(trusted_ak)
        .arg(log))?;
    let unpinned = Command::new(warden)
        .args(["audit", "verify"])
        .arg(log)
        .output()
        .context("running audit verify without --trusted-ak")?;
    ensure!(
        unpinned.status.code() == Some(3),
        "audit verify without --trusted-ak exited {:?}, expected 3 (unattested):\n{}",
        unpinned.status.code(),
        String::from_utf8_lossy(&unpinned.stdout)
    );
    Ok(())
}

/// The two binaries a sandboxed site needs.
pub(crate) struct Bins {
    pub(crate) warden: PathBuf,
    pub(crate) broker: PathBuf,
}

/// Builds `cvm-warden` and `kbs-test-broker` (debug) and names them.
pub(crate) fn build_bins(root: &Path) -> Result<Bins> {
    sh(cargo().current_dir(root).args([
        "build",
        "--quiet",
        "--bin",
        "cvm-warden",
        "--bin",
        "kbs-test-broker",
        "-p",
        "cvm-warden",
        "-p",
        "kbs-test-broker",
    ]))?;
    Ok(Bins {
        warden: target_dir(root).join("debug/cvm-warden"),
        broker: target_dir(root).join("debug/kbs-test-broker"),
    })
}

/// A network namespace (loopback up); deleted on drop.
pub(crate) struct Netns {
    name: String,
}

impl Netns {
    pub(crate) fn create(name: &str) -> Result<Netns> {
        // A namespace left over by an interrupted run is replaced.
        let _ = Command::new("ip")
            .args(["netns", "del", name])
            .stderr(Stdio::null())
            .status();
        sh(Command::new("ip").args(["netns", "add", name]))?;
        let netns = Netns {
            name: name.to_string(),
        };
        sh(netns
            .command(Path::new("ip"))
            .args(["link", "set", "lo", "up"]))?;
        Ok(netns)
    }

    /// The namespace's name (for `ip netns exec`, `ip link set … netns`).
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// `program` inside the namespace.
    pub(crate) fn command(&self, program: &Path) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// swtpm as the VM's TPM, in the namespace; killed on drop. A restart is a reboot: PCRs
/// reset, persistent objects (the AK) stay.
pub(crate) struct Swtpm<'a> {
    netns: &'a Netns,
    state: PathBuf,
    child: Option<Child>,
}

impl<'a> Swtpm<'a> {
    pub(crate) fn start(netns: &'a Netns, state: &Path) -> Result<Swtpm<'a>> {
        let mut tpm = Swtpm {
            netns,
            state: state.to_path_buf(),
            child: None,
        };
        tpm.spawn()?;
        Ok(tpm)
    }

    fn spawn(&mut self) -> Result<()> {
        let mut cmd = self.netns.command(Path::new("swtpm"));
        cmd.args(["socket", "--tpm2", "--tpmstate"])
            .arg(format!("dir={}", self.state.display()))
            .args([
                "--server",
                &format!("type=tcp,port={TPM_PORT},bindaddr=127.0.0.1"),
                "--ctrl",
                &format!("type=tcp,port={TPM_CTRL_PORT},bindaddr=127.0.0.1"),
                "--flags",
                "not-need-init,startup-clear",
            ]);
        eprintln!("$ {} &", show(&cmd));
        let child = cmd.spawn().context("cannot start swtpm")?;
        self.child = Some(child);
        // Ready when its port accepts connections (probed from inside the namespace).
        let probe = format!("exec 3<>/dev/tcp/127.0.0.1/{TPM_PORT}");
        wait_until(Duration::from_secs(10), "swtpm to listen", || {
            self.netns
                .command(Path::new("bash"))
                .args(["-c", &probe])
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
    }

    /// `TPM2_Shutdown(CLEAR)`, as a kernel sends it at power-off: swtpm counts a stop
    /// without it as an unclean shutdown, and after three of them following AK use it enters
    /// dictionary-attack lockout ("the TPM is in DA lockout mode", 1000 s to recover).
    fn shutdown(&self) -> Result<()> {
        let mut cmd = self.netns.command(Path::new("tpm2_shutdown"));
        cmd.arg("-c").env(
            "TPM2TOOLS_TCTI",
            format!("swtpm:host=127.0.0.1,port={TPM_PORT}"),
        );
        sh(&mut cmd)
    }

    /// Shuts the TPM down cleanly, then stops swtpm.
    pub(crate) fn stop(&mut self) -> Result<()> {
        let clean = match self.child {
            Some(_) => self.shutdown(),
            None => Ok(()),
        };
        self.kill();
        clean
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub(crate) fn restart(&mut self) -> Result<()> {
        self.stop()?;
        eprintln!("(reboot: TPM2_Shutdown, swtpm restarts, PCRs reset)");
        self.spawn()
    }
}

impl Drop for Swtpm<'_> {
    fn drop(&mut self) {
        // An error path: still try to leave swtpm's state clean.
        if self.child.is_some() && self.shutdown().is_err() {
            eprintln!("(tpm2_shutdown failed; swtpm stops uncleanly)");
        }
        self.kill();
    }
}

/// The image builder's step: an RSA-2048 restricted signing key (RSASSA-SHA256) under the
/// endorsement key, made persistent at [`AK_HANDLE`]; the tools' files go to `dir/ak`.
pub(crate) fn provision_ak(netns: &Netns, dir: &Path) -> Result<()> {
    let dir = dir.join("ak");
    fs::create_dir_all(&dir)?;
    let tcti = format!("swtpm:host=127.0.0.1,port={TPM_PORT}");
    let tool = |name: &str| {
        let mut cmd = netns.command(Path::new(name));
        cmd.env("TPM2TOOLS_TCTI", &tcti).current_dir(&dir);
        cmd
    };
    // swtpm has no resource manager: flush what each tool leaves loaded before the next.
    let flush = || -> Result<()> {
        sh(tool("tpm2_flushcontext").arg("-t"))?;
        sh(tool("tpm2_flushcontext").arg("-s"))
    };
    sh(tool("tpm2_createek").args(["-c", "ek.ctx", "-G", "rsa", "-u", "ek.pub"]))?;
    flush()?;
    sh(tool("tpm2_createak").args([
        "-C", "ek.ctx", "-c", "ak.ctx", "-G", "rsa", "-g", "sha256", "-s", "rsassa", "-u",
        "ak.pub", "-n", "ak.name",
    ]))?;
    flush()?;
    sh(tool("tpm2_evictcontrol").args(["-C", "o", "-c", "ak.ctx", AK_HANDLE]))?;
    flush()?;
    Ok(())
}

/// The test broker in a namespace; stopped (and its log returned) by [`Broker::stop`].
pub(crate) struct Broker {
    child: Option<Child>,
    log: PathBuf,
}

impl Broker {
    /// Starts `kbs-test-broker` (`bin`) with `config` (written to `dir/broker.toml`; its
    /// relative paths are relative to `dir`), listening on `listen`.
    pub(crate) fn start(
        netns: &Netns,
        bin: &Path,
        dir: &Path,
        config: &str,
        listen: &str,
    ) -> Result<Broker> {
        let config_path = dir.join("broker.toml");
        fs::write(&config_path, config)?;
        let ready = dir.join("broker.ready");
        let _ = fs::remove_file(&ready);
        let log = dir.join("broker.log");
        let mut cmd = netns.command(bin);
        cmd.arg("--config")
            .arg(&config_path)
            .args(["--listen", listen, "--ready-file"])
            .arg(&ready)
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log)?);
        eprintln!("$ {} &", show(&cmd));
        let child = cmd.spawn().context("cannot start kbs-test-broker")?;
        let broker = Broker {
            child: Some(child),
            log,
        };
        wait_until(Duration::from_secs(10), "the broker to listen", || {
            ready.exists()
        })?;
        Ok(broker)
    }

    pub(crate) fn stop(mut self) -> String {
        self.kill();
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
    }
}

pub(crate) fn wait_until(
    limit: Duration,
    what: &str,
    mut ready: impl FnMut() -> bool,
) -> Result<()> {
    let start = Instant::now();
    while !ready() {
        if start.elapsed() > limit {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// What a boot printed and how it ended.
pub(crate) struct Output {
    pub(crate) status: std::process::ExitStatus,
    pub(crate) stdout: String,
}

/// [`boot`] in the background: stdout and stderr go to `log`.
pub(crate) fn spawn_boot(netns: &Netns, bin: &Path, policy: &Path, log: &Path) -> Result<Child> {
    let output = fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let mut cmd = netns.command(Path::new("unshare"));
    cmd.args([
        "--pid",
        "--fork",
        "--mount",
        "--mount-proc",
        "--uts",
        "--kill-child",
        "--",
    ])
    .arg(bin)
    .args(["init", "--sandbox", "--policy"])
    .arg(policy)
    .stdout(output.try_clone()?)
    .stderr(output);
    eprintln!("$ {} > {} &", show(&cmd), log.display());
    cmd.spawn()
        .with_context(|| format!("cannot start {}", show(&cmd)))
}

/// `cvm-warden init` as PID 1 of new PID, mount and UTS namespaces, inside `netns`.
pub(crate) fn boot(netns: &Netns, bin: &Path, policy: &Path) -> Result<Output> {
    // `sh -c 'exec "$@" 2>&1'`: one stream, so stage lines and workload output interleave.
    let mut cmd = netns.command(Path::new("sh"));
    cmd.args([
        "-c",
        "exec \"$@\" 2>&1",
        "sh",
        "unshare",
        "--pid",
        "--fork",
        "--mount",
        "--mount-proc",
        "--uts",
        "--kill-child",
        "--",
    ])
    .arg(bin)
    .arg("init")
    // A sandbox PID namespace: host-wide lockdown settings are skipped (and recorded so).
    .arg("--sandbox")
    .arg("--policy")
    .arg(policy);
    eprintln!("$ {}", show(&cmd));
    let out = cmd
        .output()
        .with_context(|| format!("cannot start {}", show(&cmd)))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    print!("{stdout}");
    println!("(cvm-warden exited with {})", out.status);
    Ok(Output {
        status: out.status,
        stdout,
    })
}
