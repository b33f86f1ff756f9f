//! Test initramfs images: cvm-warden itself as `/init` (no shell wrapper), `nft` and
//! `mkfs.ext4`, every shared library they load (including the TCTIs libtss2 dlopens, which
//! `ldd` does not show), the kernel modules with their dependencies, a merged-usr layout
//! (`/bin`, `/sbin`, `/lib`, `/lib64` are links into `/usr`), the root directory 0755, the
//! policy at `/etc/cvm-warden/policy.toml` and the workload bundle.

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, ensure, Context, Result};

use crate::assets::Assets;
use crate::output_of;

/// Libraries loaded at run time with `dlopen`, which `ldd` cannot see: the TSS's TCTI modules
/// (`device` for `/dev/tpmrm0`, `tabrmd`-less images need only it, the others are small).
pub const DLOPENED: &[&str] = &[
    "/usr/lib/x86_64-linux-gnu/libtss2-tcti-device.so.0",
    "/usr/lib/x86_64-linux-gnu/libtss2-tcti-swtpm.so.0",
    "/usr/lib/x86_64-linux-gnu/libtss2-tcti-mssim.so.0",
];

/// Tools cvm-warden runs in the guest (`src/tool.rs` looks for them at these paths).
pub const TOOLS: &[&str] = &["/usr/sbin/nft", "/usr/sbin/mkfs.ext4"];

/// One image.
#[derive(Debug, Clone, Default)]
pub struct ImageSpec {
    /// The cvm-warden binary that becomes `/init`.
    pub warden: PathBuf,
    /// Other executables, copied to the given guest paths with their libraries.
    pub binaries: Vec<(PathBuf, String)>,
    /// The policy text (`/etc/cvm-warden/policy.toml`).
    pub policy: String,
    /// A folder copied as it is to a guest path (the bundle).
    pub trees: Vec<(PathBuf, String)>,
    /// Extra files: guest path, content, mode.
    pub files: Vec<(String, Vec<u8>, u32)>,
    /// Kernel modules to include with their dependencies.
    pub modules: Vec<String>,
}

/// What was built.
#[derive(Debug, Clone)]
pub struct Image {
    /// The gzip-compressed newc cpio archive.
    pub path: PathBuf,
    /// Its size.
    pub compressed: u64,
    /// Bytes of all regular files inside.
    pub unpacked: u64,
    /// cvm-warden's own size.
    pub warden: u64,
    /// The kernel modules included (dependencies resolved).
    pub modules: Vec<String>,
}

impl Image {
    /// One line: the size and cvm-warden's share.
    pub fn summary(&self) -> String {
        let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
        format!(
            "image {}: {:.1} MiB gzip ({:.1} MiB unpacked, {} modules); cvm-warden {:.1} MiB = {:.0}% of the unpacked image",
            self.path.display(),
            mib(self.compressed),
            mib(self.unpacked),
            self.modules.len(),
            mib(self.warden),
            100.0 * self.warden as f64 / self.unpacked.max(1) as f64
        )
    }
}

/// Builds `spec` into `out` (a `.cpio.gz`), staging in `out` + `.root`.
pub fn build(assets: &Assets, spec: &ImageSpec, out: &Path) -> Result<Image> {
    let stage = out.with_extension("root");
    if stage.exists() {
        fs::remove_dir_all(&stage).with_context(|| format!("removing {}", stage.display()))?;
    }
    fs::create_dir_all(&stage)?;
    fs::set_permissions(&stage, fs::Permissions::from_mode(0o755))?;
    for dir in [
        "usr/bin",
        "usr/sbin",
        "usr/lib",
        "usr/lib64",
        "dev",
        "proc",
        "sys",
        "run",
        "tmp",
        "etc/cvm-warden",
        "mnt",
        "var/lib",
        "opt",
    ] {
        mkdirs(&stage.join(dir))?;
    }
    for (link, target) in [
        ("bin", "usr/bin"),
        ("sbin", "usr/sbin"),
        ("lib", "usr/lib"),
        ("lib64", "usr/lib64"),
    ] {
        symlink(target, stage.join(link))?;
    }
    fs::set_permissions(stage.join("tmp"), fs::Permissions::from_mode(0o1777))?;

    let mut libraries = BTreeSet::new();
    copy_file(&spec.warden, &stage.join("init"), 0o755)?;
    libraries.extend(libraries_of(&spec.warden)?);
    for tool in TOOLS {
        copy_file(Path::new(tool), &guest(&stage, tool), 0o755)?;
        libraries.extend(libraries_of(Path::new(tool))?);
    }
    for (binary, at) in &spec.binaries {
        copy_file(binary, &guest(&stage, at), 0o755)?;
        libraries.extend(libraries_of(binary)?);
    }
    for lib in DLOPENED {
        let path = Path::new(lib);
        ensure!(
            path.exists(),
            "{lib} is missing on this machine (package libtss2-tcti-device0 / libtss2-tcti-swtpm0 / libtss2-tcti-mssim0)"
        );
        libraries.insert(path.to_path_buf());
        libraries.extend(libraries_of(path)?);
    }
    for lib in &libraries {
        copy_library(lib, &stage)?;
    }

    fs::write(
        stage.join("etc/cvm-warden/policy.toml"),
        spec.policy.as_bytes(),
    )?;
    for (src, at) in &spec.trees {
        copy_tree(src, &guest(&stage, at))?;
    }
    for (at, content, mode) in &spec.files {
        let path = guest(&stage, at);
        if let Some(parent) = path.parent() {
            mkdirs(parent)?;
        }
        fs::write(&path, content)?;
        fs::set_permissions(&path, fs::Permissions::from_mode(*mode))?;
    }
    let modules = copy_modules(assets, &spec.modules, &stage)?;

    let unpacked = tree_bytes(&stage)?;
    let warden = fs::metadata(&spec.warden)?.len();
    pack(&stage, out)?;
    fs::remove_dir_all(&stage)?;
    Ok(Image {
        path: out.to_path_buf(),
        compressed: fs::metadata(out)?.len(),
        unpacked,
        warden,
        modules,
    })
}

/// A guest path inside the staging root; `/lib/...` lands in `/usr/lib/...` (merged usr).
fn guest(stage: &Path, at: &str) -> PathBuf {
    let rel = at.trim_start_matches('/');
    for (old, new) in [
        ("lib/", "usr/lib/"),
        ("lib64/", "usr/lib64/"),
        ("bin/", "usr/bin/"),
        ("sbin/", "usr/sbin/"),
    ] {
        if let Some(rest) = rel.strip_prefix(old) {
            return stage.join(new).join(rest);
        }
    }
    stage.join(rel)
}

fn mkdirs(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755))?;
    Ok(())
}

fn copy_file(from: &Path, to: &Path, mode: u32) -> Result<()> {
    if let Some(parent) = to.parent() {
        fs::create_dir_all(parent)?;
    }
    fs::copy(from, to)
        .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    fs::set_permissions(to, fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// What `ldd` says `binary` loads (absolute paths).
fn libraries_of(binary: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .with_context(|| format!("running ldd {}", binary.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if text.contains("not a dynamic executable") || text.contains("statically linked") {
        return Ok(Vec::new());
    }
    let mut libs = Vec::new();
    for line in text.lines() {
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        match path {
            Some(p) if p.starts_with('/') => libs.push(PathBuf::from(p)),
            _ if line.contains("not found") => {
                bail!("{}: ldd says {}", binary.display(), line.trim())
            }
            _ => {}
        }
    }
    Ok(libs)
}

/// Copies a library to its merged-usr place, following links to the file.
fn copy_library(lib: &Path, stage: &Path) -> Result<()> {
    let real = fs::canonicalize(lib).with_context(|| format!("resolving {}", lib.display()))?;
    let to = guest(stage, &lib.to_string_lossy());
    if !to.exists() {
        copy_file(&real, &to, 0o755)?;
    }
    Ok(())
}

fn copy_tree(src: &Path, dst: &Path) -> Result<()> {
    mkdirs(dst)?;
    let mut entries: Vec<_> = fs::read_dir(src)
        .with_context(|| format!("reading {}", src.display()))?
        .collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let from = entry.path();
        let to = dst.join(entry.file_name());
        let meta = fs::symlink_metadata(&from)?;
        if meta.is_dir() {
            copy_tree(&from, &to)?;
        } else if meta.file_type().is_symlink() {
            symlink(fs::read_link(&from)?, &to)?;
        } else {
            copy_file(&from, &to, meta.permissions().mode() & 0o7777)?;
        }
    }
    Ok(())
}

/// The module files `names` need, dependencies first, as `modprobe --show-depends` on the
/// guest kernel's tree says; copied to `/usr/lib/modules/<kver>/` and indexed with depmod so
/// cvm-warden finds them through `modules.dep` in the guest.
fn copy_modules(assets: &Assets, names: &[String], stage: &Path) -> Result<Vec<String>> {
    let src = assets.modules_dir();
    let dst = stage.join("usr/lib/modules").join(&assets.kver);
    mkdirs(&dst)?;
    for index in [
        "modules.builtin",
        "modules.builtin.modinfo",
        "modules.order",
    ] {
        if src.join(index).is_file() {
            fs::copy(src.join(index), dst.join(index))?;
        }
    }
    let mut included = Vec::new();
    for name in names {
        let text = output_of(
            Command::new("modprobe")
                .arg("-d")
                .arg(&assets.modules_root)
                .args(["-S", &assets.kver, "--show-depends", name]),
        )
        .with_context(|| {
            format!(
                "kernel module {name} is not in {} (kernel {})",
                src.display(),
                assets.kver
            )
        })?;
        for line in text.lines() {
            let Some(path) = line.strip_prefix("insmod ") else {
                continue; // "builtin NAME"
            };
            let path = Path::new(path.split_whitespace().next().unwrap_or_default());
            let rel = path
                .strip_prefix(&src)
                .with_context(|| format!("{} is outside {}", path.display(), src.display()))?;
            let to = dst.join(rel);
            if !to.exists() {
                copy_file(path, &to, 0o644)?;
                included.push(
                    path.file_stem()
                        .map(|s| s.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                );
            }
        }
    }
    let status = Command::new("depmod")
        .arg("-b")
        .arg(stage)
        .arg(&assets.kver)
        .status()
        .context("running depmod")?;
    ensure!(status.success(), "depmod -b {} failed", stage.display());
    Ok(included)
}

fn tree_bytes(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let meta = fs::symlink_metadata(entry.path())?;
        if meta.is_dir() {
            total += tree_bytes(&entry.path())?;
        } else if meta.is_file() {
            total += meta.len();
        }
    }
    Ok(total)
}

/// `find . | cpio -o -H newc -R 0:0 | gzip` in a stable order.
fn pack(stage: &Path, out: &Path) -> Result<()> {
    let file = fs::File::create(out).with_context(|| format!("creating {}", out.display()))?;
    let status = Command::new("sh")
        .args([
            "-c",
            "find . -print0 | LC_ALL=C sort -z | cpio --quiet --null -o -H newc -R 0:0 --reproducible | gzip -1 -n",
        ])
        .current_dir(stage)
        .stdout(file)
        .stderr(Stdio::inherit())
        .status()
        .context("running cpio")?;
    ensure!(status.success(), "packing {} failed", stage.display());
    // "." is listed (first, sorted): the guest's root directory takes the staging folder's
    // mode, 0755 (a 0700 root makes the workload's execve fail with EACCES).
    Ok(())
}
