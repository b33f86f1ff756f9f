//! `cargo xtask bench measure`: bundle measurement throughput of `cvm-warden measure` against
//! `fsverity digest` (fsverity-utils, OpenSSL SHA-256) and `sha256sum` (coreutils), on the
//! same data in the same run, from a warm page cache, best of 3.
//!
//! Data: one 2 GiB file of pseudo-random bytes, and a tree of 20,000 small files (1–16 KiB)
//! in 100 directories, in a temporary directory that is removed at the end.
//!
//! Targets (PASS/FAIL each; an error when one is missed):
//! - 2 GiB file: `cvm-warden measure` ≥ 1.8 × `fsverity digest`;
//! - 2 GiB file and small-file tree: `cvm-warden measure` ≥ 0.9 × cores × single-core
//!   SHA-256, the single-core speed being `sha256sum`'s throughput on the same data.
//!
//! The small-file comparison with `fsverity digest` (one invocation over all 20,000 paths) is
//! printed for information.
//!
//! `CVM_WARDEN_BIN=/path/to/cvm-warden` skips the release build and times that binary.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

const LARGE_BYTES: u64 = 2 << 30;
const SMALL_FILES: usize = 20_000;
const SMALL_DIRS: usize = 100;
const RUNS: usize = 3;
const MIB: f64 = 1024.0 * 1024.0;

/// Removes the benchmark data when dropped (also on errors).
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.0) {
            eprintln!("xtask: warning: cannot remove {}: {e}", self.0.display());
        }
    }
}

/// Pseudo-random bytes: xorshift64* seeded per call.
struct Noise(u64);

impl Noise {
    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            let v = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// Best wall time of [`RUNS`] runs of `cmd` (stdout discarded, must succeed).
fn best_of(cmd: &mut Command) -> Result<Duration> {
    cmd.stdout(Stdio::null());
    let mut best = Duration::MAX;
    for _ in 0..RUNS {
        let start = Instant::now();
        let status = cmd
            .status()
            .with_context(|| format!("cannot start {}", crate::show(cmd)))?;
        let took = start.elapsed();
        ensure!(
            status.success(),
            "{} failed with {status}",
            crate::show(cmd)
        );
        best = best.min(took);
    }
    Ok(best)
}

fn mib_s(bytes: u64, took: Duration) -> f64 {
    bytes as f64 / MIB / took.as_secs_f64()
}

/// Writes the 2 GiB file; returns its path.
fn make_large(dir: &Path) -> Result<PathBuf> {
    fs::create_dir(dir)?;
    let path = dir.join("blob.bin");
    // The kernel's generator is fast even when xtask is a debug build.
    let mut random = File::open("/dev/urandom").context("cannot open /dev/urandom")?;
    let mut out =
        File::create(&path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut buf = vec![0u8; 8 << 20];
    let mut left = LARGE_BYTES;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        random.read_exact(&mut buf[..n])?;
        out.write_all(&buf[..n])?;
        left -= n as u64;
    }
    out.sync_all()?;
    Ok(path)
}

/// Writes the small-file tree; returns the relative paths and the total size.
fn make_small(dir: &Path) -> Result<(Vec<String>, u64)> {
    let mut noise = Noise(0x9E37_79B9_7F4A_7C15);
    let mut pool = vec![0u8; 1 << 20];
    File::open("/dev/urandom")
        .and_then(|mut r| r.read_exact(&mut pool))
        .context("cannot read /dev/urandom")?;
    let mut names = Vec::with_capacity(SMALL_FILES);
    let mut total = 0u64;
    let mut word = [0u8; 8];
    for d in 0..SMALL_DIRS {
        fs::create_dir_all(dir.join(format!("d{d:03}")))?;
    }
    for i in 0..SMALL_FILES {
        noise.fill(&mut word);
        let r = u64::from_le_bytes(word);
        let size = 1024 + (r % (15 * 1024 + 1)) as usize;
        let offset = ((r >> 32) as usize) % (pool.len() - size);
        let name = format!("d{:03}/f{i:05}", i % SMALL_DIRS);
        fs::write(dir.join(&name), &pool[offset..offset + size])?;
        names.push(name);
        total += size as u64;
    }
    Ok((names, total))
}

/// Reads every file once so that all runs start from a warm page cache.
fn warm(paths: &[PathBuf]) -> Result<()> {
    let mut buf = vec![0u8; 1 << 20];
    for path in paths {
        let mut file = File::open(path)?;
        while file.read(&mut buf)? > 0 {}
    }
    Ok(())
}

/// The first `sha256:<64 hex>` after `key` in `text`.
fn digest_after<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    let start = text.find(key)? + key.len();
    text.get(start..start + 7 + 64)
}

struct Row {
    what: &'static str,
    tool: &'static str,
    took: Duration,
    mib_s: f64,
}

/// Runs the benchmark; fails when a target is missed.
pub fn measure(repo_root: &Path) -> Result<()> {
    crate::ensure_tools(&[("fsverity", "fsverity"), ("sha256sum", "coreutils")])?;
    let bin = match std::env::var_os("CVM_WARDEN_BIN") {
        Some(bin) => PathBuf::from(bin),
        None => {
            crate::sh(crate::cargo().current_dir(repo_root).args([
                "build",
                "--release",
                "--bin",
                "cvm-warden",
            ]))?;
            crate::target_dir(repo_root).join("release/cvm-warden")
        }
    };
    ensure!(bin.is_file(), "{} is missing", bin.display());
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());

    let scratch =
        Scratch(std::env::temp_dir().join(format!("cvm-warden-bench-{}", std::process::id())));
    fs::create_dir(&scratch.0).with_context(|| format!("cannot create {}", scratch.0.display()))?;
    let large_dir = scratch.0.join("large");
    let small_dir = scratch.0.join("small");
    eprintln!(
        "bench: writing 2 GiB and {SMALL_FILES} small files under {}",
        scratch.0.display()
    );
    let large = make_large(&large_dir)?;
    let (names, small_bytes) = make_small(&small_dir)?;
    let mut all: Vec<PathBuf> = names.iter().map(|n| small_dir.join(n)).collect();
    all.push(large.clone());
    warm(&all)?;

    // Same answer first: cvm-warden's digest of the large file is fsverity's.
    let ours = Command::new(&bin)
        .args(["measure", "--json"])
        .arg(&large_dir)
        .output()?;
    ensure!(
        ours.status.success(),
        "{} measure --json failed: {}",
        bin.display(),
        String::from_utf8_lossy(&ours.stderr)
    );
    let theirs = Command::new("fsverity")
        .arg("digest")
        .arg(&large)
        .output()?;
    ensure!(theirs.status.success(), "fsverity digest failed");
    let ours = String::from_utf8_lossy(&ours.stdout);
    let theirs = String::from_utf8_lossy(&theirs.stdout);
    let (a, b) = (
        digest_after(&ours, "\"digest\":\""),
        digest_after(&theirs, ""),
    );
    ensure!(
        a.is_some() && a == b,
        "digests differ: cvm-warden {a:?}, fsverity {b:?}"
    );

    let mut rows = Vec::new();
    let mut row = |what, tool, bytes, cmd: &mut Command| -> Result<f64> {
        let took = best_of(cmd)?;
        let rate = mib_s(bytes, took);
        rows.push(Row {
            what,
            tool,
            took,
            mib_s: rate,
        });
        Ok(rate)
    };
    let warden_large = row(
        "2 GiB file",
        "cvm-warden measure",
        LARGE_BYTES,
        Command::new(&bin).arg("measure").arg(&large_dir),
    )?;
    let fsverity_large = row(
        "2 GiB file",
        "fsverity digest",
        LARGE_BYTES,
        Command::new("fsverity").arg("digest").arg(&large),
    )?;
    let sha_large = row(
        "2 GiB file",
        "sha256sum (1 core)",
        LARGE_BYTES,
        Command::new("sha256sum").arg(&large),
    )?;
    let warden_small = row(
        "20k small files",
        "cvm-warden measure",
        small_bytes,
        Command::new(&bin).arg("measure").arg(&small_dir),
    )?;
    let fsverity_small = row(
        "20k small files",
        "fsverity digest",
        small_bytes,
        Command::new("fsverity")
            .arg("digest")
            .args(&names)
            .current_dir(&small_dir),
    )?;
    let sha_small = row(
        "20k small files",
        "sha256sum (1 core)",
        small_bytes,
        Command::new("sha256sum")
            .args(&names)
            .current_dir(&small_dir),
    )?;
    drop(scratch);

    // Other work on the machine skews the numbers: show how busy it was.
    let load = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load = load.split_whitespace().next().unwrap_or("?");
    println!("bench measure: {cores} cores, best of {RUNS}, warm page cache, load average {load}");
    println!(
        "{:<16} {:<20} {:>9} {:>10}",
        "data", "tool", "seconds", "MiB/s"
    );
    for r in &rows {
        println!(
            "{:<16} {:<20} {:>9.3} {:>10.0}",
            r.what,
            r.tool,
            r.took.as_secs_f64(),
            r.mib_s
        );
    }
    println!(
        "small files ({:.0} MiB): cvm-warden = {:.2} x fsverity digest, {:.2} x sha256sum",
        small_bytes as f64 / MIB,
        warden_small / fsverity_small,
        warden_small / sha_small
    );

    let ideal = |sha: f64| cores as f64 * sha;
    let targets = [
        (
            format!(
                "2 GiB file: cvm-warden >= 1.8 x fsverity digest ({:.2} x)",
                warden_large / fsverity_large
            ),
            warden_large >= 1.8 * fsverity_large,
        ),
        (
            format!(
                "2 GiB file: cvm-warden >= 0.9 x {cores} cores x sha256sum = {:.0} MiB/s ({:.2} x)",
                0.9 * ideal(sha_large),
                warden_large / ideal(sha_large)
            ),
            warden_large >= 0.9 * ideal(sha_large),
        ),
        (
            format!(
                "small files: cvm-warden >= 0.9 x {cores} cores x sha256sum = {:.0} MiB/s ({:.2} x)",
                0.9 * ideal(sha_small),
                warden_small / ideal(sha_small)
            ),
            warden_small >= 0.9 * ideal(sha_small),
        ),
    ];
    let mut missed = 0;
    for (text, ok) in &targets {
        println!("{} {text}", if *ok { "PASS" } else { "FAIL" });
        missed += usize::from(!ok);
    }
    if missed > 0 {
        bail!(
            "{missed} of {} measurement throughput targets missed",
            targets.len()
        );
    }
    Ok(())
}
