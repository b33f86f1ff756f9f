//! The expected SEV-SNP launch measurement of a guest, for image builders and model owners:
//! what `cvm-warden reference-values --snp-launch` prints and a broker checks against the
//! `measurement` field of the guest's attestation report.
//!
//! The digest is computed by the `sev` crate's measurement support
//! (`sev::measurement::snp::snp_calc_launch_digest`, built with `crypto_nossl`: pure-Rust
//! SHA-384, no OpenSSL) for a QEMU guest: the OVMF image as firmware (`-bios`), the SEV
//! metadata pages it declares, then one VMSA per vCPU (`-cpu TYPE -smp N`, the SEV features
//! of `--guest-features`).
//!
//! # Two modes
//!
//! - **firmware only** (no `--kernel`): the measurement covers the firmware and the vCPUs
//!   only; whatever the firmware then boots (kernel, initramfs, cvm-warden, the policy) is
//!   *not* in it. Any OVMF with SEV-SNP metadata works (Debian's `/usr/share/ovmf/OVMF.fd`).
//! - **kernel hashes** (`--kernel`, optionally `--initrd` and `--append`): QEMU
//!   (`sev-snp-guest,kernel-hashes=on`) writes the SHA-256 of the kernel, initrd and command
//!   line into the firmware's SEV hashes table before launch, so the measurement covers
//!   them and hence cvm-warden and its policy in the initramfs; the firmware refuses to boot
//!   a kernel whose hash differs. Only an AmdSev build of OVMF
//!   (`OvmfPkg/AmdSev/AmdSevX64.dsc`; Debian: `OVMF.amdsev.fd` in `ovmf-amdsev`) has that
//!   table; any other OVMF with `--kernel` is refused, naming the file ([`SnpLaunchError::NoHashesTable`]).
//!
//! # Input checks
//!
//! The `sev` crate indexes the OVMF image without bounds checks and asserts on the hashes
//! section's size, so a truncated or foreign file would abort the process. [`parse_ovmf`]
//! reads the same structures first (OVMF footer table, SEV metadata header and sections,
//! SEV hashes table entry) with every offset checked, and the crate only ever sees an image
//! that passed. The command line is refused when it starts or ends with white space: the
//! crate trims it before hashing, QEMU and `sev-snp-measure` do not, so the value would be
//! wrong for the real launch.
//!
//! The values equal `sev-snp-measure` (PyPI) on the same inputs: `tests/snp_launch.rs`
//! checks the table recorded in `tests/snp_launch/expected.json`, and `cargo xtask
//! snp-measure-check` recomputes it with the real tool.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use serde::Serialize;
use sev::measurement::snp::{snp_calc_launch_digest, SnpMeasurementArgs};
use sev::measurement::vcpu_types::CpuType;
use sev::measurement::vmsa::{GuestFeatures, VMMType};
use sha2::Digest as _;

use crate::digest::Digest;

/// The vCPU types the measurement knows: QEMU `-cpu` model names, as the VM is started.
pub const VCPU_TYPES: &[&str] = &[
    "EPYC",
    "EPYC-v1",
    "EPYC-v2",
    "EPYC-IBPB",
    "EPYC-v3",
    "EPYC-v4",
    "EPYC-Rome",
    "EPYC-Rome-v1",
    "EPYC-Rome-v2",
    "EPYC-Rome-v3",
    "EPYC-Milan",
    "EPYC-Milan-v1",
    "EPYC-Milan-v2",
    "EPYC-Genoa",
    "EPYC-Genoa-v1",
    "EPYC-Turin",
    "EPYC-Turin-v1",
    "EPYC-Turin-v2",
];

/// At most this many vCPUs (KVM's largest x86 limit, `KVM_MAX_VCPUS` with `MAXSMP`).
pub const MAX_VCPUS: u32 = 4096;

/// The SEV features QEMU gives an SNP guest by default: SNPActive only.
pub const DEFAULT_GUEST_FEATURES: u64 = 0x1;

/// The SEV feature bits the `sev` crate's VMSA names (0–10, 12, 14, 15): SNPActive, vTOM,
/// ReflectVC, RestrictedInjection, AlternateInjection, DebugSwap, PreventHostIBS,
/// BTBIsolation, VmplSSS, SecureTSC, VmgexitParameter, IbsVirtualization, VmsaRegProt,
/// SmtProtection.
pub const KNOWN_FEATURE_BITS: u64 = 0xd7ff;

/// The largest SEV metadata section read: every page of a section is measured one by one, and
/// OVMF's sections are a few pages each; a damaged size would take minutes.
const MAX_SECTION: u32 = 64 << 20;

/// The size of the page QEMU fills with the SEV hashes table.
const PAGE: usize = 4096;

/// What the command line gives.
#[derive(Debug, Clone, Default)]
pub struct LaunchInputs {
    /// The OVMF image the VM boots (`-bios`).
    pub ovmf: PathBuf,
    /// The number of vCPUs (`-smp`).
    pub vcpus: u32,
    /// The vCPU type (`-cpu`), one of [`VCPU_TYPES`].
    pub vcpu_type: String,
    /// The SEV features, `0x…` hex or decimal (default [`DEFAULT_GUEST_FEATURES`]).
    pub guest_features: Option<String>,
    /// The kernel (`-kernel`): kernel hashes mode.
    pub kernel: Option<PathBuf>,
    /// The initrd (`-initrd`), only with `kernel`.
    pub initrd: Option<PathBuf>,
    /// The kernel command line (`-append`), only with `kernel`.
    pub append: Option<String>,
}

/// The `--snp-launch` options of `cvm-warden reference-values` (flattened into its
/// arguments; the policy options conflict with it: no policy is read).
#[derive(Debug, Clone, Default, clap::Args)]
#[command(next_help_heading = "SEV-SNP launch measurement (--snp-launch: no policy is read)")]
pub struct SnpLaunchArgs {
    /// Print the expected SEV-SNP launch measurement of a QEMU guest (the report's
    /// `measurement`) instead of the policy's reference values. Without --kernel it covers
    /// the firmware and vCPUs only ("mode": "firmware-only"); with --kernel, also the kernel,
    /// initrd and command line through OVMF's SEV hashes table ("mode": "kernel-hashes"; QEMU
    /// `sev-snp-guest,kernel-hashes=on`), which needs an AmdSev OVMF (OVMF.amdsev.fd). For a
    /// Trustee KBS, give the printed launch_measurement to `--format trustee --snp-measurement`.
    #[arg(long, conflicts_with_all = [
        "policy", "cmdline", "operator", "passwd", "group",
        "format", "ak", "tpm_pcr11", "snp_measurement",
    ])]
    pub snp_launch: bool,
    /// The OVMF image the VM boots (`-bios`).
    #[arg(
        long,
        value_name = "FILE",
        requires = "snp_launch",
        required_if_eq("snp_launch", "true")
    )]
    pub ovmf: Option<PathBuf>,
    /// The number of vCPUs (`-smp N`).
    #[arg(
        long,
        value_name = "N",
        requires = "snp_launch",
        required_if_eq("snp_launch", "true")
    )]
    pub vcpus: Option<u32>,
    /// The vCPU type (`-cpu TYPE`), e.g. EPYC-Milan, EPYC-Genoa, EPYC-v4.
    #[arg(
        long,
        value_name = "TYPE",
        requires = "snp_launch",
        required_if_eq("snp_launch", "true")
    )]
    pub vcpu_type: Option<String>,
    /// The kernel (`-kernel`): measured through the SEV hashes table (AmdSev OVMF only).
    #[arg(long, value_name = "FILE", requires = "snp_launch")]
    pub kernel: Option<PathBuf>,
    /// The initrd (`-initrd`), with --kernel.
    #[arg(long, value_name = "FILE", requires = "kernel")]
    pub initrd: Option<PathBuf>,
    /// The kernel command line (`-append`), with --kernel.
    #[arg(
        long,
        value_name = "CMDLINE",
        requires = "kernel",
        allow_hyphen_values = true
    )]
    pub append: Option<String>,
    /// The guest's SEV features, hex (default 0x1: SNPActive).
    #[arg(long, value_name = "HEX", requires = "snp_launch")]
    pub guest_features: Option<String>,
}

impl SnpLaunchArgs {
    /// The inputs when `--snp-launch` was given (clap has required the rest).
    pub fn inputs(&self) -> Option<LaunchInputs> {
        if !self.snp_launch {
            return None;
        }
        Some(LaunchInputs {
            ovmf: self.ovmf.clone().unwrap_or_default(),
            vcpus: self.vcpus.unwrap_or(0),
            vcpu_type: self.vcpu_type.clone().unwrap_or_default(),
            guest_features: self.guest_features.clone(),
            kernel: self.kernel.clone(),
            initrd: self.initrd.clone(),
            append: self.append.clone(),
        })
    }
}

/// The inputs once checked: nothing read yet.
#[derive(Debug, Clone)]
pub struct LaunchSpec {
    /// The OVMF image.
    pub ovmf: PathBuf,
    /// The number of vCPUs.
    pub vcpus: u32,
    /// The vCPU type's name, as in [`VCPU_TYPES`].
    pub vcpu_type: &'static str,
    /// The SEV features.
    pub guest_features: u64,
    /// Kernel, initrd and command line, in kernel hashes mode.
    pub kernel: Option<KernelInputs>,
}

/// What kernel hashes mode measures besides the firmware.
#[derive(Debug, Clone)]
pub struct KernelInputs {
    /// `-kernel`.
    pub kernel: PathBuf,
    /// `-initrd` (absent: the hash of no bytes, as QEMU).
    pub initrd: Option<PathBuf>,
    /// `-append` (absent: the hash of a lone NUL, as QEMU).
    pub append: Option<String>,
}

/// Which parts the measurement covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Firmware and vCPUs only.
    FirmwareOnly,
    /// Firmware, vCPUs and the SEV hashes table (kernel, initrd, command line).
    KernelHashes,
}

impl Mode {
    /// What the mode means for whoever registers the value.
    pub fn explain(self) -> &'static str {
        match self {
            Mode::FirmwareOnly => {
                "firmware only: the measurement covers OVMF and the vCPUs, not the kernel, \
                 initramfs or cvm-warden's policy; give --kernel/--initrd/--append with an AmdSev \
                 OVMF (OVMF.amdsev.fd) to cover them"
            }
            Mode::KernelHashes => {
                "kernel hashes: the measurement covers OVMF, the vCPUs and the SHA-256 of the \
                 kernel, initrd and command line that QEMU (sev-snp-guest,kernel-hashes=on) puts \
                 in OVMF's SEV hashes table; the firmware refuses any other kernel, initrd or \
                 command line"
            }
        }
    }
}

/// A file that went into the measurement.
#[derive(Debug, Clone, Serialize)]
pub struct FileInput {
    /// As given (not escaped: JSON escapes control characters).
    pub path: String,
    /// SHA-256 of its bytes.
    pub sha256: Digest,
}

/// The OVMF image that went into the measurement.
#[derive(Debug, Clone, Serialize)]
pub struct OvmfInput {
    /// As given.
    pub path: String,
    /// SHA-256 of its bytes.
    pub sha256: Digest,
    /// Its size in bytes.
    pub bytes: usize,
    /// Whether it carries the SEV hashes table (an AmdSev build).
    pub sev_hashes_table: bool,
}

/// The expected launch measurement and everything it was computed from.
#[derive(Debug, Clone, Serialize)]
pub struct SnpLaunchValues {
    /// The 48-byte launch measurement, hex: the attestation report's `measurement`.
    pub launch_measurement: String,
    /// Which parts it covers.
    pub mode: Mode,
    /// [`Mode::explain`].
    pub mode_note: &'static str,
    /// The OVMF image.
    pub ovmf: OvmfInput,
    /// `-smp`.
    pub vcpus: u32,
    /// `-cpu`.
    pub vcpu_type: &'static str,
    /// The VMM whose initial vCPU state is measured.
    pub vmm: &'static str,
    /// The SEV features, hex.
    pub guest_features: String,
    /// `-kernel`, in kernel hashes mode.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel: Option<FileInput>,
    /// `-initrd`, in kernel hashes mode when given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub initrd: Option<FileInput>,
    /// `-append`, in kernel hashes mode when given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub append: Option<String>,
    /// Where the value goes.
    pub register: &'static str,
}

/// Why no measurement could be computed.
#[derive(Debug, thiserror::Error)]
pub enum SnpLaunchError {
    /// `--vcpu-type` names no known type.
    #[error(
        "--vcpu-type {value:?} is not a vCPU type the SEV-SNP measurement knows; give the QEMU -cpu model the VM starts with, one of: {}",
        VCPU_TYPES.join(", ")
    )]
    UnknownVcpuType {
        /// As given (escaped).
        value: String,
    },
    /// `--vcpus` is 0 or too large.
    #[error("--vcpus {value}: give the number of vCPUs QEMU starts the VM with (-smp), from 1 to {MAX_VCPUS}")]
    Vcpus {
        /// As given.
        value: u32,
    },
    /// `--guest-features` is not a number.
    #[error("--guest-features {value:?} is not a number; give the SEV features as hex (0x1, the default) or decimal, as sev-snp-measure takes them")]
    GuestFeaturesSyntax {
        /// As given (escaped).
        value: String,
    },
    /// `--guest-features` lacks SNPActive.
    #[error("--guest-features {value:#x} lacks bit 0 (SNPActive), which every SEV-SNP guest has; start from 0x1")]
    GuestFeaturesNotSnp {
        /// The value.
        value: u64,
    },
    /// `--guest-features` sets bits the measurement does not know.
    #[error("--guest-features {value:#x} sets bits {unknown:#x} that the SEV-SNP VMSA does not define; the known bits are {KNOWN_FEATURE_BITS:#x} (0-10, 12, 14, 15)")]
    GuestFeaturesUnknown {
        /// The value.
        value: u64,
        /// The bits outside [`KNOWN_FEATURE_BITS`].
        unknown: u64,
    },
    /// `--initrd` or `--append` without `--kernel`.
    #[error("{option} given without --kernel: the initrd and command line are measured only through OVMF's SEV hashes table, which QEMU fills when it boots a -kernel; give --kernel too")]
    WithoutKernel {
        /// `--initrd` or `--append`.
        option: &'static str,
    },
    /// `--append` starts or ends with white space.
    #[error("--append {value:?} starts or ends with white space; QEMU hashes the command line exactly as given but the measurement library trims it, so the value would not match: remove the white space here and in -append")]
    AppendWhitespace {
        /// As given (escaped).
        value: String,
    },
    /// A file could not be read.
    #[error("cannot read the {what} {path:?}")]
    Read {
        /// `OVMF image`, `kernel`, `initrd`.
        what: &'static str,
        /// The path.
        path: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The OVMF image is not one with SEV-SNP metadata.
    #[error("{path:?} is not an OVMF image with SEV-SNP metadata: {problem}; give the OVMF the VM boots with -bios, built with SEV-SNP support (Debian: /usr/share/ovmf/OVMF.fd from the ovmf package, or OVMF.amdsev.fd from ovmf-amdsev)")]
    Ovmf {
        /// The path.
        path: String,
        /// What is wrong.
        problem: String,
    },
    /// `--kernel` with an OVMF image without the SEV hashes table.
    #[error("--kernel given, but the OVMF image {path:?} has no SEV hashes table ({missing}), so QEMU cannot put the kernel's hash into the measurement and the firmware would not check it; use an AmdSev build of OVMF (OvmfPkg/AmdSev/AmdSevX64.dsc; Debian: /usr/share/ovmf/OVMF.amdsev.fd from the ovmf-amdsev package), or leave out --kernel, --initrd and --append to measure the firmware alone")]
    NoHashesTable {
        /// The path.
        path: String,
        /// Which part is missing.
        missing: &'static str,
    },
    /// The measurement library failed.
    #[error("computing the SEV-SNP launch measurement for the OVMF image {path:?} failed")]
    Measurement {
        /// The OVMF path.
        path: String,
        /// The library's error.
        #[source]
        source: sev::error::MeasurementError,
    },
}

impl SnpLaunchError {
    /// Whether the inputs are wrong (exit 2) rather than a file unreadable (exit 1).
    pub fn is_input(&self) -> bool {
        !matches!(
            self,
            SnpLaunchError::Read { .. } | SnpLaunchError::Measurement { .. }
        )
    }
}

fn shown(text: &str) -> String {
    crate::report::sanitize(text, 256)
}

fn shown_path(path: &Path) -> String {
    shown(&path.to_string_lossy())
}

/// Checks the command line's values (nothing is read).
pub fn validate(inputs: &LaunchInputs) -> Result<LaunchSpec, SnpLaunchError> {
    let vcpu_type = VCPU_TYPES
        .iter()
        .copied()
        .find(|name| *name == inputs.vcpu_type)
        .ok_or_else(|| SnpLaunchError::UnknownVcpuType {
            value: shown(&inputs.vcpu_type),
        })?;
    if inputs.vcpus == 0 || inputs.vcpus > MAX_VCPUS {
        return Err(SnpLaunchError::Vcpus {
            value: inputs.vcpus,
        });
    }
    let guest_features = match &inputs.guest_features {
        None => DEFAULT_GUEST_FEATURES,
        Some(text) => parse_guest_features(text)?,
    };
    let kernel = match &inputs.kernel {
        Some(kernel) => {
            if let Some(append) = &inputs.append {
                if append.trim() != append {
                    return Err(SnpLaunchError::AppendWhitespace {
                        value: shown(append),
                    });
                }
            }
            Some(KernelInputs {
                kernel: kernel.clone(),
                initrd: inputs.initrd.clone(),
                append: inputs.append.clone(),
            })
        }
        None if inputs.initrd.is_some() => {
            return Err(SnpLaunchError::WithoutKernel { option: "--initrd" })
        }
        None if inputs.append.is_some() => {
            return Err(SnpLaunchError::WithoutKernel { option: "--append" })
        }
        None => None,
    };
    Ok(LaunchSpec {
        ovmf: inputs.ovmf.clone(),
        vcpus: inputs.vcpus,
        vcpu_type,
        guest_features,
        kernel,
    })
}

/// `0x…` hex or decimal, as `sev-snp-measure --guest-features` (Python's `int(x, 0)`),
/// with bit 0 set and no bit outside [`KNOWN_FEATURE_BITS`].
pub fn parse_guest_features(text: &str) -> Result<u64, SnpLaunchError> {
    let syntax = || SnpLaunchError::GuestFeaturesSyntax { value: shown(text) };
    let digits = text.trim();
    let value = match digits
        .strip_prefix("0x")
        .or_else(|| digits.strip_prefix("0X"))
    {
        Some(hex) if !hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit()) => {
            u64::from_str_radix(hex, 16).map_err(|_| syntax())?
        }
        Some(_) => return Err(syntax()),
        None if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) => {
            digits.parse::<u64>().map_err(|_| syntax())?
        }
        None => return Err(syntax()),
    };
    if value & 1 == 0 {
        return Err(SnpLaunchError::GuestFeaturesNotSnp { value });
    }
    let unknown = value & !KNOWN_FEATURE_BITS;
    if unknown != 0 {
        return Err(SnpLaunchError::GuestFeaturesUnknown { value, unknown });
    }
    Ok(value)
}

/// A section of OVMF's SEV metadata (`OvmfSevMetadata.asm`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetadataSection {
    /// Guest physical address.
    pub gpa: u32,
    /// Size in bytes.
    pub size: u32,
    /// Section type: 1 SNP secure memory, 2 SNP secrets, 3 CPUID, 4 SVSM CAA, 0x10 SNP
    /// kernel hashes.
    pub kind: u32,
}

/// The SEV metadata section type of the kernel hashes page.
pub const SECTION_KERNEL_HASHES: u32 = 0x10;

/// What the measurement needs from an OVMF image, read with every offset checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OvmfLayout {
    /// The SEV metadata sections, in order.
    pub sections: Vec<MetadataSection>,
    /// The SEV hashes table's GPA (footer entry `7255371f-…`), when present and non-zero
    /// (OVMF builds other than AmdSev carry the entry with address 0).
    pub sev_hashes_table_gpa: Option<u32>,
}

impl OvmfLayout {
    /// Why kernel hashes cannot be measured with this image, if they cannot.
    pub fn hashes_table_missing(&self) -> Option<&'static str> {
        let section = self
            .sections
            .iter()
            .find(|s| s.kind == SECTION_KERNEL_HASHES);
        match (section, self.sev_hashes_table_gpa) {
            (None, None) => Some("no SNP_KERNEL_HASHES metadata section, no SEV hash table address in the footer table"),
            (None, Some(_)) => Some("no SNP_KERNEL_HASHES metadata section"),
            (Some(_), None) => Some("no SEV hash table address in the footer table"),
            (Some(s), Some(_)) if s.size as usize != PAGE => {
                Some("an SNP_KERNEL_HASHES section that is not one 4096-byte page")
            }
            (Some(_), Some(_)) => None,
        }
    }
}

// GUIDs of OVMF's footer table (`ResetVectorVtf0.asm`), as the bytes on disk (little-endian
// fields).
const FOOTER_GUID: [u8; 16] = guid_le(
    0x96b582de,
    0x1fb2,
    0x45f7,
    [0xba, 0xea, 0xa3, 0x66, 0xc5, 0x5a, 0x08, 0x2d],
);
const SEV_HASH_TABLE_GUID: [u8; 16] = guid_le(
    0x7255371f,
    0x3a3b,
    0x4b04,
    [0x92, 0x7b, 0x1d, 0xa6, 0xef, 0xa8, 0xd4, 0x54],
);
const SEV_ES_RESET_BLOCK_GUID: [u8; 16] = guid_le(
    0x00f771de,
    0x1a7e,
    0x4fcb,
    [0x89, 0x0e, 0x68, 0xc7, 0x7e, 0x2f, 0xb4, 0x4e],
);
const SEV_METADATA_GUID: [u8; 16] = guid_le(
    0xdc886566,
    0x984a,
    0x4798,
    [0xa7, 0x5e, 0x55, 0x85, 0xa7, 0xbf, 0x67, 0xcc],
);

const fn guid_le(a: u32, b: u16, c: u16, d: [u8; 8]) -> [u8; 16] {
    let a = a.to_le_bytes();
    let b = b.to_le_bytes();
    let c = c.to_le_bytes();
    [
        a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d[0], d[1], d[2], d[3], d[4], d[5], d[6],
        d[7],
    ]
}

fn le16(bytes: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(
        bytes.get(at..at.checked_add(2)?)?.try_into().ok()?,
    ))
}

fn le32(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        bytes.get(at..at.checked_add(4)?)?.try_into().ok()?,
    ))
}

/// Reads OVMF's footer table and SEV metadata as the `sev` crate does, every offset checked:
/// an image this accepts is one the crate reads without going out of bounds.
pub fn parse_ovmf(data: &[u8]) -> Result<OvmfLayout, String> {
    const ENTRY_HEADER: usize = 18; // u16 size + GUID
    if data.len() as u64 > 1 << 32 {
        return Err(format!("its size, {} bytes, is over 4 GiB", data.len()));
    }
    if data.len() % PAGE != 0 || data.is_empty() {
        return Err(format!(
            "its size, {} bytes, is not a whole number of 4096-byte pages",
            data.len()
        ));
    }
    // The footer entry ends 32 bytes before the end of the image.
    let footer_at = data.len() - 32 - ENTRY_HEADER;
    let footer_size = le16(data, footer_at).ok_or("no footer table")? as usize;
    if data.get(footer_at + 2..footer_at + ENTRY_HEADER) != Some(&FOOTER_GUID[..]) {
        return Err("no OVMF footer table (GUID 96b582de-1fb2-45f7-baea-a366c55a082d)".into());
    }
    let table_size = footer_size
        .checked_sub(ENTRY_HEADER)
        .ok_or("a footer table entry shorter than its header")?;
    let table_start = footer_at
        .checked_sub(table_size)
        .ok_or("a footer table larger than the image")?;
    let table = &data[table_start..footer_at];
    let mut entries: Vec<([u8; 16], &[u8])> = Vec::new();
    let mut offset = table.len();
    while offset >= ENTRY_HEADER {
        let at = offset - ENTRY_HEADER;
        let size = le16(table, at).ok_or("a cut footer table entry")? as usize;
        let guid: [u8; 16] = table
            .get(at + 2..offset)
            .and_then(|g| g.try_into().ok())
            .ok_or("a cut footer table entry")?;
        if size < ENTRY_HEADER {
            return Err("a footer table entry shorter than its header".into());
        }
        if offset < size {
            break;
        }
        entries.push((guid, &table[offset - size..at]));
        offset -= size;
    }
    let entry = |guid: &[u8; 16]| {
        entries
            .iter()
            .rev()
            .find(|(g, _)| g == guid)
            .map(|(_, data)| *data)
    };
    if entry(&SEV_ES_RESET_BLOCK_GUID)
        .and_then(|e| le32(e, 0))
        .is_none()
    {
        return Err("no SEV-ES reset block in the footer table".into());
    }
    let sev_hashes_table_gpa = entry(&SEV_HASH_TABLE_GUID)
        .and_then(|e| le32(e, 0))
        .filter(|gpa| *gpa != 0);
    let metadata = entry(&SEV_METADATA_GUID).ok_or("no SEV metadata entry in the footer table")?;
    let from_end = le32(metadata, 0).ok_or("a cut SEV metadata entry")? as usize;
    if from_end == 0 || from_end > data.len() || from_end > i32::MAX as usize {
        return Err(format!(
            "the SEV metadata offset {from_end} is outside the image"
        ));
    }
    let header = data.len() - from_end;
    if data.get(header..header + 4) != Some(b"ASEV") {
        return Err("the SEV metadata has no ASEV signature".into());
    }
    let size = le32(data, header + 4).ok_or("a cut SEV metadata header")? as usize;
    let version = le32(data, header + 8).ok_or("a cut SEV metadata header")?;
    let count = le32(data, header + 12).ok_or("a cut SEV metadata header")? as usize;
    if version != 1 {
        return Err(format!("SEV metadata version {version}, not 1"));
    }
    const DESC: usize = 12; // u32 gpa, u32 size, u32 type
    let needed = count
        .checked_mul(DESC)
        .and_then(|n| n.checked_add(16))
        .ok_or("too many SEV metadata sections")?;
    if size < needed || header.checked_add(size).is_none_or(|end| end > data.len()) {
        return Err(format!(
            "SEV metadata of {size} bytes for {count} sections does not fit the image"
        ));
    }
    let mut sections = Vec::with_capacity(count);
    for i in 0..count {
        let at = header + 16 + i * DESC;
        let section = MetadataSection {
            gpa: le32(data, at).ok_or("a cut SEV metadata section")?,
            size: le32(data, at + 4).ok_or("a cut SEV metadata section")?,
            kind: le32(data, at + 8).ok_or("a cut SEV metadata section")?,
        };
        if !matches!(section.kind, 1..=4 | SECTION_KERNEL_HASHES) {
            return Err(format!(
                "SEV metadata section {i} has the unknown type {:#x}",
                section.kind
            ));
        }
        if section.size > MAX_SECTION || u64::from(section.gpa) + u64::from(section.size) > 1 << 32
        {
            return Err(format!(
                "SEV metadata section {i} ({:#x} bytes at {:#x}) is over 64 MiB or ends beyond 4 GiB \
                 (OVMF's are a few pages each)",
                section.size, section.gpa
            ));
        }
        if section.size as usize % PAGE != 0
            && matches!(section.kind, 1 | 4 | SECTION_KERNEL_HASHES)
        {
            return Err(format!(
                "SEV metadata section {i} is {} bytes, not whole pages",
                section.size
            ));
        }
        sections.push(section);
    }
    Ok(OvmfLayout {
        sections,
        sev_hashes_table_gpa,
    })
}

fn read_all(what: &'static str, path: &Path) -> Result<Vec<u8>, SnpLaunchError> {
    std::fs::read(path).map_err(|source| SnpLaunchError::Read {
        what,
        path: shown_path(path),
        source,
    })
}

fn file_input(what: &'static str, path: &Path) -> Result<FileInput, SnpLaunchError> {
    let read = |source| SnpLaunchError::Read {
        what,
        path: shown_path(path),
        source,
    };
    let mut file = File::open(path).map_err(read)?;
    let mut hasher = sha2::Sha256::new();
    io::copy(&mut file, &mut hasher).map_err(read)?;
    Ok(FileInput {
        path: path.to_string_lossy().into_owned(),
        sha256: Digest(hasher.finalize().into()),
    })
}

/// The expected launch measurement for `inputs` (a QEMU guest).
pub fn measure(inputs: &LaunchInputs) -> Result<SnpLaunchValues, SnpLaunchError> {
    let spec = validate(inputs)?;
    let ovmf_bytes = read_all("OVMF image", &spec.ovmf)?;
    let ovmf_path = shown_path(&spec.ovmf);
    let layout = parse_ovmf(&ovmf_bytes).map_err(|problem| SnpLaunchError::Ovmf {
        path: ovmf_path.clone(),
        problem,
    })?;
    let missing = layout.hashes_table_missing();
    let ovmf = OvmfInput {
        path: spec.ovmf.to_string_lossy().into_owned(),
        sha256: Digest::of(&ovmf_bytes),
        bytes: ovmf_bytes.len(),
        sev_hashes_table: missing.is_none(),
    };
    drop(ovmf_bytes);
    let (mode, kernel, initrd, append) = match &spec.kernel {
        None => (Mode::FirmwareOnly, None, None, None),
        Some(k) => {
            if let Some(missing) = missing {
                return Err(SnpLaunchError::NoHashesTable {
                    path: ovmf_path,
                    missing,
                });
            }
            let initrd = k
                .initrd
                .as_deref()
                .map(|p| file_input("initrd", p))
                .transpose()?;
            (
                Mode::KernelHashes,
                Some(file_input("kernel", &k.kernel)?),
                initrd,
                k.append.clone(),
            )
        }
    };
    let vcpu_type =
        CpuType::try_from(spec.vcpu_type).map_err(|source| SnpLaunchError::Measurement {
            path: ovmf_path.clone(),
            source,
        })?;
    let features = GuestFeatures(spec.guest_features);
    let digest = snp_calc_launch_digest(SnpMeasurementArgs {
        vcpus: spec.vcpus,
        vcpu_type,
        ovmf_file: spec.ovmf.clone(),
        guest_features: features,
        kernel_file: spec.kernel.as_ref().map(|k| k.kernel.clone()),
        initrd_file: spec.kernel.as_ref().and_then(|k| k.initrd.clone()),
        append: spec.kernel.as_ref().and_then(|k| k.append.as_deref()),
        ovmf_hash_str: None,
        vmm_type: Some(VMMType::QEMU),
    })
    .map_err(|source| SnpLaunchError::Measurement {
        path: ovmf_path,
        source,
    })?;
    Ok(SnpLaunchValues {
        launch_measurement: digest.get_hex_ld(),
        mode,
        mode_note: mode.explain(),
        ovmf,
        vcpus: spec.vcpus,
        vcpu_type: spec.vcpu_type,
        vmm: "QEMU",
        guest_features: format!("{:#x}", spec.guest_features),
        kernel,
        initrd,
        // As given, whole: it is what QEMU's -append must be (errors escape, output does not).
        append,
        register: "the attestation report's measurement; Trustee's default CPU policy reads it as the reference value snp_launch_measurement",
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn inputs() -> LaunchInputs {
        LaunchInputs {
            ovmf: PathBuf::from("/nonexistent/OVMF.fd"),
            vcpus: 4,
            vcpu_type: "EPYC-Milan".into(),
            ..LaunchInputs::default()
        }
    }

    fn error(inputs: &LaunchInputs) -> String {
        validate(inputs).unwrap_err().to_string()
    }

    #[test]
    fn an_unknown_vcpu_type_is_named_with_the_known_ones() {
        for bad in ["EPYC-Mars", "epyc-milan", "", "EPYC-Milan\n"] {
            let message = error(&LaunchInputs {
                vcpu_type: bad.into(),
                ..inputs()
            });
            assert!(
                message.contains(&format!("--vcpu-type {:?}", shown(bad))),
                "{message}"
            );
            assert!(message.contains("EPYC-Milan, EPYC-Milan-v1"), "{message}");
            assert!(message.contains("-cpu"), "{message}");
        }
        for good in ["EPYC-Milan", "EPYC-Genoa", "EPYC-v4", "EPYC-Turin-v2"] {
            let spec = validate(&LaunchInputs {
                vcpu_type: good.into(),
                ..inputs()
            })
            .unwrap();
            assert_eq!(spec.vcpu_type, good);
            // Every name is one the sev crate knows, under the same name.
            assert_eq!(CpuType::try_from(good).unwrap().to_string(), good);
        }
        for name in VCPU_TYPES {
            assert_eq!(CpuType::try_from(*name).unwrap().to_string(), *name);
        }
    }

    #[test]
    fn vcpus_must_be_between_one_and_the_limit() {
        for bad in [0, MAX_VCPUS + 1] {
            let message = error(&LaunchInputs {
                vcpus: bad,
                ..inputs()
            });
            assert!(message.starts_with(&format!("--vcpus {bad}:")), "{message}");
            assert!(message.contains("-smp"), "{message}");
        }
        for good in [1, 16, MAX_VCPUS] {
            assert_eq!(
                validate(&LaunchInputs {
                    vcpus: good,
                    ..inputs()
                })
                .unwrap()
                .vcpus,
                good
            );
        }
    }

    #[test]
    fn guest_features_are_hex_or_decimal_with_snp_active_and_known_bits() {
        assert_eq!(validate(&inputs()).unwrap().guest_features, 0x1);
        for (text, value) in [
            ("0x1", 0x1),
            ("0X21", 0x21),
            ("33", 0x21),
            ("0xd7ff", 0xd7ff),
        ] {
            assert_eq!(parse_guest_features(text).unwrap(), value, "{text}");
        }
        for bad in ["", "0x", "zz", "0x1g", "-1", "1.0", "0x10000000000000000"] {
            let message = parse_guest_features(bad).unwrap_err().to_string();
            assert!(
                message.contains(&format!("--guest-features {bad:?} is not a number")),
                "{message}"
            );
        }
        let message = parse_guest_features("0x20").unwrap_err().to_string();
        assert!(
            message.contains("0x20 lacks bit 0 (SNPActive)"),
            "{message}"
        );
        let message = parse_guest_features("0x10801").unwrap_err().to_string();
        assert!(message.contains("0x10801 sets bits 0x10800"), "{message}");
        let message = error(&LaunchInputs {
            guest_features: Some("0x0".into()),
            ..inputs()
        });
        assert!(message.contains("SNPActive"), "{message}");
    }

    #[test]
    fn initrd_and_append_need_a_kernel_and_append_keeps_no_edge_white_space() {
        let message = error(&LaunchInputs {
            initrd: Some("/i".into()),
            ..inputs()
        });
        assert!(
            message.starts_with("--initrd given without --kernel"),
            "{message}"
        );
        let message = error(&LaunchInputs {
            append: Some("console=ttyS0".into()),
            ..inputs()
        });
        assert!(
            message.starts_with("--append given without --kernel"),
            "{message}"
        );
        for bad in [" console=ttyS0", "console=ttyS0 ", "console=ttyS0\n"] {
            let message = error(&LaunchInputs {
                kernel: Some("/k".into()),
                append: Some(bad.into()),
                ..inputs()
            });
            assert!(message.contains("white space"), "{message}");
        }
        let spec = validate(&LaunchInputs {
            kernel: Some("/k".into()),
            initrd: Some("/i".into()),
            append: Some("console=ttyS0 quiet".into()),
            ..inputs()
        })
        .unwrap();
        let kernel = spec.kernel.unwrap();
        assert_eq!(kernel.kernel, Path::new("/k"));
        assert_eq!(kernel.append.as_deref(), Some("console=ttyS0 quiet"));
    }

    /// A small image laid out as OVMF's reset vector lays out its tables: SEV metadata near
    /// the end, the footer table ending 32 bytes before the end.
    fn image(hashes_table: bool) -> Vec<u8> {
        let mut data = vec![0u8; 2 * PAGE];
        let len = data.len();
        // SEV metadata at len - 2048.
        let header = len - 2048;
        let mut sections = vec![
            (0x80_0000u32, 0x9000u32, 1u32),
            (0x80_9000, 0x1000, 2),
            (0x80_a000, 0x1000, 3),
        ];
        if hashes_table {
            sections.push((0x80_b000, 0x1000, SECTION_KERNEL_HASHES));
        }
        let size = 16 + 12 * sections.len() as u32;
        data[header..header + 4].copy_from_slice(b"ASEV");
        data[header + 4..header + 8].copy_from_slice(&size.to_le_bytes());
        data[header + 8..header + 12].copy_from_slice(&1u32.to_le_bytes());
        data[header + 12..header + 16].copy_from_slice(&(sections.len() as u32).to_le_bytes());
        for (i, (gpa, size, kind)) in sections.iter().enumerate() {
            let at = header + 16 + 12 * i;
            data[at..at + 4].copy_from_slice(&gpa.to_le_bytes());
            data[at + 4..at + 8].copy_from_slice(&size.to_le_bytes());
            data[at + 8..at + 12].copy_from_slice(&kind.to_le_bytes());
        }
        // Footer table entries, each `data || u16 size || GUID`, written from the footer back.
        let mut entries: Vec<([u8; 16], Vec<u8>)> = vec![
            (
                SEV_ES_RESET_BLOCK_GUID,
                0xffff_f000u32.to_le_bytes().to_vec(),
            ),
            (SEV_METADATA_GUID, 2048u32.to_le_bytes().to_vec()),
        ];
        if hashes_table {
            let mut entry = 0x80_b010u32.to_le_bytes().to_vec();
            entry.extend(0x3f0u32.to_le_bytes());
            entries.push((SEV_HASH_TABLE_GUID, entry));
        }
        let footer = len - 32 - 18;
        let mut at = footer;
        let mut table = 0;
        for (guid, body) in &entries {
            let size = body.len() + 18;
            data[at - 16..at].copy_from_slice(guid);
            data[at - 18..at - 16].copy_from_slice(&(size as u16).to_le_bytes());
            data[at - size..at - 18].copy_from_slice(body);
            at -= size;
            table += size;
        }
        data[footer..footer + 2].copy_from_slice(&((table + 18) as u16).to_le_bytes());
        data[footer + 2..footer + 18].copy_from_slice(&FOOTER_GUID);
        data
    }

    #[test]
    fn the_ovmf_tables_are_read_and_the_hashes_table_is_found_only_where_it_is() {
        let layout = parse_ovmf(&image(true)).unwrap();
        assert_eq!(layout.sections.len(), 4);
        assert_eq!(layout.sev_hashes_table_gpa, Some(0x80_b010));
        assert_eq!(layout.hashes_table_missing(), None);
        let layout = parse_ovmf(&image(false)).unwrap();
        assert_eq!(layout.sections.len(), 3);
        assert_eq!(
            layout.hashes_table_missing(),
            Some("no SNP_KERNEL_HASHES metadata section, no SEV hash table address in the footer table")
        );
        for (data, problem) in [
            (vec![], "not a whole number of 4096-byte pages"),
            (vec![0; 100], "not a whole number of 4096-byte pages"),
            (vec![0; PAGE], "no OVMF footer table"),
        ] {
            assert!(parse_ovmf(&data).unwrap_err().contains(problem));
        }
        // As Debian's OVMF.fd: the hash table entry is there with address 0, and the SEV
        // metadata has no SNP_KERNEL_HASHES section.
        let mut zero_address = image(true);
        let guid_at = zero_address
            .windows(16)
            .position(|w| w == SEV_HASH_TABLE_GUID)
            .unwrap();
        zero_address[guid_at - 10..guid_at - 2].fill(0);
        let layout = parse_ovmf(&zero_address).unwrap();
        assert_eq!(layout.sev_hashes_table_gpa, None);
        assert_eq!(
            layout.hashes_table_missing(),
            Some("no SEV hash table address in the footer table")
        );
        let mut no_metadata = image(true);
        let at = no_metadata.len() - 2048;
        no_metadata[at] = b'B';
        assert_eq!(
            parse_ovmf(&no_metadata).unwrap_err(),
            "the SEV metadata has no ASEV signature"
        );
    }

    fn measure_image(
        dir: &Path,
        data: &[u8],
        kernel: bool,
    ) -> Result<SnpLaunchValues, SnpLaunchError> {
        let ovmf = dir.join("ovmf.fd");
        std::fs::write(&ovmf, data).unwrap();
        let k = dir.join("kernel");
        std::fs::write(&k, b"kernel bytes").unwrap();
        measure(&LaunchInputs {
            ovmf,
            vcpus: 2,
            vcpu_type: "EPYC-Genoa".into(),
            kernel: kernel.then_some(k),
            append: kernel.then(|| "console=ttyS0".to_owned()),
            ..LaunchInputs::default()
        })
    }

    #[test]
    fn kernel_hashes_need_the_hashes_table_and_change_the_value() {
        let dir = tempfile::tempdir().unwrap();
        let firmware = measure_image(dir.path(), &image(true), false).unwrap();
        assert_eq!(firmware.mode, Mode::FirmwareOnly);
        assert!(firmware.ovmf.sev_hashes_table);
        assert_eq!(firmware.launch_measurement.len(), 96);
        let hashes = measure_image(dir.path(), &image(true), true).unwrap();
        assert_eq!(hashes.mode, Mode::KernelHashes);
        assert_eq!(hashes.kernel.unwrap().sha256, Digest::of(b"kernel bytes"));
        assert_ne!(hashes.launch_measurement, firmware.launch_measurement);
        let message = measure_image(dir.path(), &image(false), true)
            .unwrap_err()
            .to_string();
        assert!(
            message.starts_with("--kernel given, but the OVMF image"),
            "{message}"
        );
        assert!(message.contains("OVMF.amdsev.fd"), "{message}");
        assert!(message.contains("leave out --kernel"), "{message}");
        let long = "x".repeat(600);
        let ovmf = dir.path().join("ovmf.fd");
        std::fs::write(&ovmf, image(true)).unwrap();
        let values = measure(&LaunchInputs {
            ovmf,
            vcpus: 1,
            vcpu_type: "EPYC-v4".into(),
            kernel: Some(dir.path().join("kernel")),
            append: Some(long.clone()),
            ..LaunchInputs::default()
        })
        .unwrap();
        assert_eq!(values.append.as_deref(), Some(long.as_str()));
        let plain = measure_image(dir.path(), &image(false), false).unwrap();
        assert!(!plain.ovmf.sev_hashes_table);
        let message = measure(&inputs()).unwrap_err().to_string();
        assert!(
            message.starts_with("cannot read the OVMF image \"/nonexistent/OVMF.fd\""),
            "{message}"
        );
    }

    /// Whatever [`parse_ovmf`] accepts, the `sev` crate measures without going out of
    /// bounds or failing its assertion on the hashes page (a panic fails this test): each
    /// byte of the SEV metadata and the footer table set to 0 and to 0xff, which breaks
    /// sizes, offsets, signatures and GUIDs.
    #[test]
    fn a_damaged_ovmf_is_an_error_never_an_abort() {
        let dir = tempfile::tempdir().unwrap();
        let good = image(true);
        let len = good.len();
        let mut accepted = 0;
        let mut refused = 0;
        let positions = (len - 2048..len - 2048 + 64).chain(len - 160..len);
        for at in positions {
            for value in [0x00u8, 0xff] {
                if good[at] == value {
                    continue;
                }
                let mut data = good.clone();
                data[at] = value;
                match parse_ovmf(&data) {
                    Ok(_) => {
                        accepted += 1;
                        let _ = measure_image(dir.path(), &data, true);
                    }
                    Err(_) => {
                        refused += 1;
                        if refused == 1 {
                            let message = measure_image(dir.path(), &data, true)
                                .unwrap_err()
                                .to_string();
                            assert!(
                                message.contains("is not an OVMF image with SEV-SNP metadata"),
                                "{message}"
                            );
                        }
                    }
                }
            }
        }
        assert!(
            accepted > 0 && refused > 0,
            "{accepted} accepted, {refused} refused"
        );
    }
}
