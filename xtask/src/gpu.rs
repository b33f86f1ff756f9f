//! `cargo xtask gpu-probe`: for a machine with an NVIDIA GPU and its driver (not a CVM).
//! Builds `cvm-warden`, shows what `nvidia-smi` says about CC mode (when it is installed),
//! then runs `cvm-warden gpu probe`: the real NVML calls (driver, GPUs, CC and ready state)
//! and the boot's GPU precheck for a policy requiring a GPU in CC mode — on a machine
//! whose GPU is not in CC mode, the exact refusal a user would see. Its exit status is
//! reported, not treated as a failure: a refusal is the expected outcome there.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};

use crate::{cargo, sh, show, target_dir};

pub(crate) fn probe(root: &Path) -> Result<()> {
    sh(cargo().current_dir(root).args([
        "build",
        "--quiet",
        "--bin",
        "cvm-warden",
        "-p",
        "cvm-warden",
    ]))?;
    for args in [
        &[
            "--query-gpu=index,uuid,name,driver_version,vbios_version",
            "--format=csv",
        ][..],
        &["conf-compute", "-f"],
    ] {
        let mut cmd = Command::new("nvidia-smi");
        cmd.args(args);
        eprintln!("$ {}", show(&cmd));
        match cmd.status() {
            Ok(status) => eprintln!("({status})"),
            Err(error) => {
                eprintln!("nvidia-smi: {error} (not installed? the probe below still runs)")
            }
        }
    }
    let mut cmd = Command::new(target_dir(root).join("debug/cvm-warden"));
    cmd.args(["gpu", "probe"]);
    eprintln!("$ {}", show(&cmd));
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {}", show(&cmd)))?;
    eprintln!(
        "cvm-warden gpu probe exited with {status}: 0 = the GPU passed the precheck (CC mode on), 1 = refused (the message above is what a boot would stop with)"
    );
    Ok(())
}
