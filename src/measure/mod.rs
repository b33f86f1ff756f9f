//! Bundle measurement: every file's fs-verity digest, a canonical manifest of the bundle and
//! its SHA-256, the bundle digest that the policy pins and the event log records.
//!
//! - [`measure_in_place`] measures a directory where it is (the initramfs case).
//! - [`measure_and_copy`] copies it into an empty directory (a fresh tmpfs) while measuring,
//!   reading every byte once, then removes write permission from the copy.
//! - [`flare::verify_kit`] verifies an NVIDIA FLARE startup kit inside the bundle
//!   (`[workload.flare]`) against its pinned root CA, as FLARE does and stricter.
//! - [`run_measure_command`] is `cvm-warden measure DIR [--json] [--manifest OUT]`.
//!
//! Files are hashed in parallel on the rayon pool, and large files in parallel chunks. The
//! manifest format, the bundle digest and the command's output are specified in
//! the README's "Bundle manifest and bundle digest".
//!
//! Refused, with the path in the error: device nodes, FIFOs, sockets, non-UTF-8 names and
//! link targets, symlinks that leave the bundle, and entries that change while measured.

use std::io::Write;
use std::path::Path;

use crate::digest::Digest;

mod error;
pub mod flare;
mod manifest;
mod verity;
mod walk;

pub use error::{MeasureError, MAX_LISTED_DIFFERENCES};
pub use manifest::{Entry, EntryDiff, EntryKind, Manifest, CANONICAL_HEADER, MODE_MASK};
pub use walk::MAX_SYMLINK_HOPS;

/// The fs-verity digest (SHA-256, 4096-byte blocks, no salt) of `data`, as `fsverity digest`
/// prints it for a file with that content.
pub fn fsverity_digest_of(data: &[u8]) -> Digest {
    verity::digest_of(data)
}

/// The result of measuring a bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Measurement {
    /// SHA-256 of the manifest's canonical bytes.
    pub bundle_digest: Digest,
    /// Every entry below the bundle root.
    pub manifest: Manifest,
}

impl Measurement {
    fn of(manifest: Manifest) -> Measurement {
        Measurement {
            bundle_digest: manifest.digest(),
            manifest,
        }
    }
}

/// Measures the bundle at `dir` without copying it.
pub fn measure_in_place(dir: &Path) -> Result<Measurement, MeasureError> {
    walk::measure(dir, None).map(Measurement::of)
}

/// Copies the bundle at `src` into `dst` — an existing, empty directory such as a tmpfs the
/// caller mounted — measuring it in the same pass: each chunk is read once, hashed and
/// written. Directories, files and symlinks are recreated (owned by the caller, timestamps not
/// kept); after the copy every copied file and directory gets its measured mode minus the
/// write bits (`dst` itself is left as it is: the caller remounts it read-only). The returned
/// measurement describes the source modes, so it equals [`measure_in_place`] of `src`.
pub fn measure_and_copy(src: &Path, dst: &Path) -> Result<Measurement, MeasureError> {
    walk::measure(src, Some(dst)).map(Measurement::of)
}

impl MeasureError {
    /// The error for a measured digest that differs from the pinned `expected` one; with a
    /// `reference` manifest (from the build machine) it names the differing entries.
    pub fn mismatch(
        expected: Digest,
        measured: &Measurement,
        reference: Option<&Manifest>,
    ) -> MeasureError {
        MeasureError::DigestMismatch {
            expected,
            actual: measured.bundle_digest,
            differences: reference
                .map(|r| {
                    measured
                        .manifest
                        .diff(r)
                        .iter()
                        .map(ToString::to_string)
                        .collect()
                })
                .unwrap_or_default(),
            reference: reference.map(Manifest::digest),
        }
    }
}

/// `cvm-warden measure DIR [--json] [--manifest OUT]`: measures `dir` in place, writes the
/// JSON manifest to `manifest_out` when given, and prints to `out` either the JSON manifest on
/// one line (`json`) or a summary whose first line is
/// `bundle_digest sha256:<hex> (<N> entries, <M> bytes)`.
pub fn run_measure_command(
    dir: &Path,
    json: bool,
    manifest_out: Option<&Path>,
    out: &mut dyn Write,
) -> Result<(), MeasureError> {
    let measurement = measure_in_place(dir)?;
    let manifest = &measurement.manifest;
    if let Some(path) = manifest_out {
        manifest.save_json(path)?;
    }
    let text = if json {
        format!("{}\n", manifest.to_json())
    } else {
        let count = |kind: &str| {
            manifest
                .entries
                .iter()
                .filter(|e| e.type_name() == kind)
                .count()
        };
        let mut text = format!(
            "bundle_digest {} ({} entries, {} bytes)\nfiles {}, dirs {}, symlinks {}\n",
            measurement.bundle_digest,
            manifest.entries.len(),
            manifest.file_bytes(),
            count("file"),
            count("dir"),
            count("symlink"),
        );
        if let Some(path) = manifest_out {
            text.push_str(&format!("manifest written to {}\n", path.display()));
        }
        text
    };
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(|source| MeasureError::Output { source })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests;
