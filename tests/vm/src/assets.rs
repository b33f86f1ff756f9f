//! What a test VM needs from Debian, fetched once and cached by version: QEMU (unpacked from
//! its packages, see `../shared/VM-NOTES.md`: the machine's `qemu-utils` 10.x blocks
//! installing `qemu-system-x86` 7.2), the firmware ROMs, and the guest kernel with its
//! modules (resolved through `linux-image-amd64`, never a hard-coded version).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, ensure, Context, Result};

use crate::{output_of, sh};

/// Packages installed with apt-get (QEMU's shared libraries, firmware, image tools).
pub const PACKAGES: &[&str] = &[
    "seabios",
    "ipxe-qemu",
    "cpio",
    "kmod",
    "busybox-static",
    "swtpm",
    "swtpm-tools",
    "tpm2-tools",
    "cryptsetup-bin",
    "e2fsprogs",
    "nftables",
    "libtss2-tcti-device0",
    // The systemd-shape image: its Debian root file system (image/mkimage.sh rootfs).
    "debootstrap",
    // What the unpacked qemu-system-x86 7.2 links against.
    "libaio1",
    "libbpf1",
    "libcapstone4",
    "libfdt1",
    "libfuse3-3",
    "libglib2.0-0",
    "libgmp10",
    "libgnutls30",
    "libibverbs1",
    "libjpeg62-turbo",
    "libnuma1",
    "libpixman-1-0",
    "libpmem1",
    "libpng16-16",
    "librdmacm1",
    "libsasl2-2",
    "libseccomp2",
    "libslirp0",
    "libudev1",
    "liburing2",
    "libvdeplug2",
    "libzstd1",
];

/// The QEMU packages unpacked (not installed) into the cache.
const QEMU_PACKAGES: &[&str] = &["qemu-system-x86", "qemu-system-data", "qemu-system-common"];

/// Everything found or fetched.
#[derive(Debug, Clone)]
pub struct Assets {
    /// The unpacked `qemu-system-x86_64`.
    pub qemu: PathBuf,
    /// `-L` folders (QEMU's data, SeaBIOS, iPXE ROMs for virtio-net).
    pub firmware: Vec<PathBuf>,
    /// QEMU's accelerator and device modules (`QEMU_MODULE_DIR`).
    pub qemu_modules: PathBuf,
    /// The guest kernel image.
    pub kernel: PathBuf,
    /// Its version (`6.1.0-57-amd64`).
    pub kver: String,
    /// A root whose `lib/modules/<kver>` holds the modules and `modules.dep` (depmod -b).
    pub modules_root: PathBuf,
}

impl Assets {
    /// Finds the cached assets under `cache`, fetching what is missing (root: apt-get).
    pub fn ensure(cache: &Path) -> Result<Assets> {
        fs::create_dir_all(cache).with_context(|| format!("creating {}", cache.display()))?;
        let cache = &fs::canonicalize(cache)?;
        install_packages()?;
        let qemu_root = ensure_qemu(cache)?;
        let (kver, kernel_root) = ensure_kernel(cache)?;
        let qemu = qemu_root.join("usr/bin/qemu-system-x86_64");
        let qemu_modules = qemu_root.join("usr/lib/x86_64-linux-gnu/qemu");
        ensure!(
            qemu_modules.join("accel-tcg-x86_64.so").is_file(),
            "{} lacks accel-tcg-x86_64.so (from qemu-system-common): remove {} and run again",
            qemu_modules.display(),
            qemu_root.display()
        );
        Ok(Assets {
            qemu,
            firmware: vec![
                qemu_root.join("usr/share/qemu"),
                PathBuf::from("/usr/share/seabios"),
                PathBuf::from("/usr/lib/ipxe/qemu"),
            ],
            qemu_modules,
            kernel: kernel_root.join(format!("boot/vmlinuz-{kver}")),
            kver,
            modules_root: kernel_root,
        })
    }

    /// The folder of the guest kernel's modules.
    pub fn modules_dir(&self) -> PathBuf {
        self.modules_root.join("lib/modules").join(&self.kver)
    }
}

fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

fn install_packages() -> Result<()> {
    let missing: Vec<&str> = PACKAGES.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !crate::is_root() {
        bail!(
            "the VM harness needs these Debian packages; install them as root: apt-get install -y {}",
            missing.join(" ")
        );
    }
    sh(Command::new("apt-get").args(["update", "-qq"]))?;
    sh(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

/// The candidate version apt would install of `package`.
fn candidate(package: &str) -> Result<String> {
    let text = output_of(Command::new("apt-cache").args(["policy", package]))?;
    text.lines()
        .find_map(|l| l.trim().strip_prefix("Candidate:"))
        .map(|v| v.trim().to_string())
        .filter(|v| v != "(none)")
        .with_context(|| {
            format!("apt knows no candidate for {package}: run apt-get update (as root)")
        })
}

/// Downloads `packages` into `dir` (apt-get download) and unpacks each into `root`.
fn download_unpack(dir: &Path, packages: &[&str], root: &Path) -> Result<()> {
    let debs = dir.join("debs");
    fs::create_dir_all(&debs)?;
    sh(Command::new("apt-get")
        .arg("download")
        .args(packages)
        .current_dir(&debs))?;
    for entry in fs::read_dir(&debs)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "deb") {
            sh(Command::new("dpkg").arg("-x").arg(&path).arg(root))?;
        }
    }
    fs::remove_dir_all(&debs)?;
    Ok(())
}

/// `cache/qemu-<version>/` with the three QEMU packages unpacked.
fn ensure_qemu(cache: &Path) -> Result<PathBuf> {
    let version = candidate("qemu-system-x86")?.replace([':', '+', '~'], "_");
    let root = cache.join(format!("qemu-{version}"));
    if root.join("usr/bin/qemu-system-x86_64").is_file() {
        return Ok(root);
    }
    let partial = cache.join(format!("qemu-{version}.partial"));
    let _ = fs::remove_dir_all(&partial);
    fs::create_dir_all(&partial)?;
    download_unpack(&partial, QEMU_PACKAGES, &partial)?;
    fs::rename(&partial, &root)?;
    Ok(root)
}

/// `cache/kernel-<kver>/` with the guest kernel, its modules and `modules.dep`.
fn ensure_kernel(cache: &Path) -> Result<(String, PathBuf)> {
    let depends = output_of(Command::new("apt-cache").args(["depends", "linux-image-amd64"]))?;
    let image = depends
        .lines()
        .find_map(|l| l.trim().strip_prefix("Depends: "))
        .map(str::trim)
        .filter(|p| p.starts_with("linux-image-"))
        .context("apt-cache depends linux-image-amd64 names no linux-image package")?
        .to_string();
    let kver = image
        .strip_prefix("linux-image-")
        .unwrap_or(&image)
        .to_string();
    let root = cache.join(format!("kernel-{kver}"));
    if root
        .join("lib/modules")
        .join(&kver)
        .join("modules.dep")
        .is_file()
    {
        return Ok((kver, root));
    }
    let partial = cache.join(format!("kernel-{kver}.partial"));
    let _ = fs::remove_dir_all(&partial);
    fs::create_dir_all(&partial)?;
    download_unpack(&partial, &[&image], &partial)?;
    sh(Command::new("depmod").arg("-b").arg(&partial).arg(&kver))?;
    fs::rename(&partial, &root)?;
    Ok((kver, root))
}
