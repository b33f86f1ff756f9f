//! `cargo bench --bench unlock` (as root): how long checking a released key takes on a volume
//! formatted the way cvm-warden formats it (PBKDF2-SHA256, 1000 iterations, no benchmark),
//! against `cryptsetup open --test-passphrase` on a volume made by `cryptsetup luksFormat`
//! with its default PBKDF (argon2id). Prints the medians and the ratio; exits non-zero when
//! ours is not at most 1/20 of the default. Runs in well under a minute.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use cvm_warden::policy::ResourceUri;
use cvm_warden::volume::{DeviceState, RealVolumes, VolumeKey, Volumes};
use rand_core::{OsRng, RngCore};
use zeroize::Zeroizing;

const RESOURCE: &str = "kbs:///default/keys/bench";
const IMAGE_SIZE: u64 = 64 * 1024 * 1024;
/// Runs of our in-process check.
const OURS_RUNS: usize = 50;
/// Runs of the `cryptsetup` tool (argon2id takes ~1-2 s each by design).
const TOOL_RUNS: usize = 7;
/// The target: ours ≤ 1/20 of the default-PBKDF unlock.
const TARGET_RATIO: f64 = 1.0 / 20.0;

fn main() -> ExitCode {
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(err) => {
            eprintln!("bench unlock: {err}");
            ExitCode::FAILURE
        }
    }
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    let mid = samples.len() / 2;
    if samples.len() % 2 == 1 {
        samples[mid]
    } else {
        (samples[mid - 1] + samples[mid]) / 2
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn blank_image(dir: &Path, name: &str) -> Result<PathBuf, String> {
    let path = dir.join(name);
    File::create(&path)
        .and_then(|f| f.set_len(IMAGE_SIZE))
        .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    Ok(path)
}

fn key_file(dir: &Path, name: &str, bytes: &[u8]) -> Result<PathBuf, String> {
    let path = dir.join(name);
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .and_then(|mut f| f.write_all(bytes))
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    Ok(path)
}

fn cryptsetup(args: &[&str]) -> Result<(), String> {
    let out = Command::new("cryptsetup")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run cryptsetup: {e}"))?;
    if out.status.success() {
        return Ok(());
    }
    Err(format!(
        "cryptsetup {} failed ({}): {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    ))
}

fn path_str(p: &Path) -> Result<&str, String> {
    p.to_str()
        .ok_or_else(|| format!("{} is not UTF-8", p.display()))
}

/// Times `runs` runs of `cryptsetup open --test-passphrase --key-file <key> <image>`.
fn time_tool(image: &Path, key: &Path, runs: usize) -> Result<Vec<Duration>, String> {
    let (image, key) = (path_str(image)?, path_str(key)?);
    let args = ["open", "--test-passphrase", "--key-file", key, image];
    let mut samples = Vec::with_capacity(runs);
    for _ in 0..runs {
        let start = Instant::now();
        cryptsetup(&args)?;
        samples.push(start.elapsed());
    }
    Ok(samples)
}

fn run() -> Result<bool, String> {
    if !nix::unistd::geteuid().is_root() {
        return Err(
            "needs root (libcryptsetup locking, cryptsetup): run `sudo -E cargo bench --bench unlock`"
                .to_string(),
        );
    }
    let dir = tempfile::Builder::new()
        .prefix("cvm-warden-bench-")
        .tempdir_in("/var/tmp")
        .map_err(|e| format!("cannot create a temporary directory in /var/tmp: {e}"))?;
    let resource = ResourceUri::parse(RESOURCE)?;
    let mut bytes = Zeroizing::new(vec![0u8; 32]);
    OsRng.fill_bytes(&mut bytes);
    let key = VolumeKey::new(bytes.clone(), resource).map_err(|e| e.to_string())?;
    let keyfile = key_file(dir.path(), "bench.key", &bytes)?;
    let vols = RealVolumes::new();

    // Image A: formatted by cvm-warden.
    let ours = blank_image(dir.path(), "cvm-warden.img")?;
    if vols.inspect(&ours).map_err(|e| e.to_string())? != DeviceState::Blank {
        return Err(format!("{} is not blank", ours.display()));
    }
    vols.format(&ours, &key, None).map_err(|e| e.to_string())?;

    // Image B: `cryptsetup luksFormat` defaults (LUKS2, argon2id, benchmarked to ~2 s).
    let default = blank_image(dir.path(), "default.img")?;
    let started = Instant::now();
    cryptsetup(&[
        "luksFormat",
        "--batch-mode",
        "--type",
        "luks2",
        "--key-file",
        path_str(&keyfile)?,
        path_str(&default)?,
    ])?;
    println!(
        "formatted {} with cryptsetup defaults in {:.0} ms",
        default.display(),
        ms(started.elapsed())
    );

    // Warm-up, and a check that both images accept the key.
    vols.verify_key(&ours, &key).map_err(|e| e.to_string())?;
    let mut ours_samples = Vec::with_capacity(OURS_RUNS);
    for _ in 0..OURS_RUNS {
        let start = Instant::now();
        let slot = vols.verify_key(&ours, &key).map_err(|e| e.to_string())?;
        ours_samples.push(start.elapsed());
        if slot != 0 {
            return Err(format!("the key opened keyslot {slot}, expected 0"));
        }
    }
    let tool_ours = time_tool(&ours, &keyfile, TOOL_RUNS)?;
    let tool_default = time_tool(&default, &keyfile, TOOL_RUNS)?;

    let ours_median = median(ours_samples);
    let tool_ours_median = median(tool_ours);
    let default_median = median(tool_default);
    let ratio = ours_median.as_secs_f64() / default_median.as_secs_f64();
    println!("unlock: key -> verified keyslot (median)");
    println!(
        "  cvm-warden verify_key, PBKDF2-SHA256 1000 it. ({OURS_RUNS} runs):        {:>9.2} ms",
        ms(ours_median)
    );
    println!(
        "  cryptsetup open --test-passphrase, same image ({TOOL_RUNS} runs):      {:>9.2} ms",
        ms(tool_ours_median)
    );
    println!(
        "  cryptsetup open --test-passphrase, default argon2id ({TOOL_RUNS} runs):{:>9.2} ms",
        ms(default_median)
    );
    let pass = ratio <= TARGET_RATIO;
    println!(
        "  ratio cvm-warden / default = {ratio:.5} (1/{:.0}); target <= 1/20: {}",
        1.0 / ratio,
        if pass { "met" } else { "MISSED" }
    );
    Ok(pass)
}
