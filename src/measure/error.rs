//! Why a bundle could not be measured, copied, or did not match its pin.

use std::io;
use std::path::PathBuf;

use crate::digest::Digest;

/// At most this many differing entries are named in a [`MeasureError::DigestMismatch`] message.
pub const MAX_LISTED_DIFFERENCES: usize = 20;

/// Why measuring failed. Every variant names the path: `rel` is relative to the bundle root
/// (as in the manifest), `path` is the absolute path that was used.
#[derive(Debug, thiserror::Error)]
pub enum MeasureError {
    /// The bundle root cannot be examined.
    #[error("cannot open bundle directory {path}")]
    OpenRoot {
        /// The bundle root.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The bundle root is not a directory.
    #[error("bundle {path} is not a directory; point it at the directory that holds the workload")]
    RootNotDirectory {
        /// The bundle root.
        path: PathBuf,
    },
    /// A directory cannot be listed.
    #[error("cannot list directory {rel} ({path})")]
    ReadDir {
        /// Relative path (`.` for the root).
        rel: String,
        /// Absolute path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// An entry cannot be examined with `lstat`.
    #[error("cannot stat {rel} ({path})")]
    Stat {
        /// Relative path.
        rel: String,
        /// Absolute path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A file name is not UTF-8.
    #[error("{} has a name that is not UTF-8; rename it, bundle paths must be UTF-8", path.display())]
    NonUtf8Name {
        /// Absolute path (shown with replacement characters).
        path: PathBuf,
    },
    /// A symlink target is not UTF-8.
    #[error("symlink {rel} ({path}) has a target that is not UTF-8; bundle symlink targets must be UTF-8")]
    NonUtf8Target {
        /// Relative path.
        rel: String,
        /// Absolute path.
        path: PathBuf,
    },
    /// A device node, FIFO or socket.
    #[error("{rel} ({path}) is a {kind}; a bundle may hold only regular files, directories and symlinks, remove it")]
    Unsupported {
        /// Relative path.
        rel: String,
        /// Absolute path.
        path: PathBuf,
        /// `block device`, `character device`, `FIFO` or `socket`.
        kind: &'static str,
    },
    /// A symlink's target cannot be read.
    #[error("cannot read symlink {rel} ({path})")]
    ReadLink {
        /// Relative path.
        rel: String,
        /// Absolute path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A symlink points outside the bundle, or its chain cannot be resolved.
    #[error("symlink {rel} -> {target} leaves the bundle: {reason}; make it a relative link to a path inside the bundle, or put the file itself in the bundle")]
    SymlinkEscapes {
        /// Relative path of the link.
        rel: String,
        /// Its target, as stored.
        target: String,
        /// `absolute target`, `resolves above the bundle root`, …
        reason: String,
    },
    /// A regular file cannot be opened.
    #[error("cannot open {rel} ({path})")]
    Open {
        /// Relative path.
        rel: String,
        /// Absolute path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A regular file cannot be read.
    #[error("cannot read {rel} ({path})")]
    Read {
        /// Relative path.
        rel: String,
        /// Absolute path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A file or directory changed between the walk and the end of its measurement.
    #[error("{rel} ({path}) changed while it was measured ({what}); stop whatever writes to the bundle and measure again")]
    Changed {
        /// Relative path (`.` for the root).
        rel: String,
        /// Absolute path.
        path: PathBuf,
        /// What differs.
        what: String,
    },
    /// The copy destination cannot be used.
    #[error("cannot use copy destination {path}")]
    Destination {
        /// The destination directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The copy destination is not an empty directory.
    #[error(
        "copy destination {path} is not an empty directory; copy into a freshly mounted tmpfs"
    )]
    DestinationNotEmpty {
        /// The destination directory.
        path: PathBuf,
    },
    /// Creating, writing or finishing a copied entry failed.
    #[error("cannot {action} copy of {rel} at {path}")]
    Copy {
        /// `create`, `write`, `set the mode of`.
        action: &'static str,
        /// Relative path.
        rel: String,
        /// Absolute path in the destination.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A manifest file cannot be read.
    #[error("cannot read manifest {path}")]
    ManifestRead {
        /// The manifest file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A manifest file is not manifest JSON.
    #[error("manifest {path} is not a cvm-warden manifest; write it with `cvm-warden measure --manifest FILE DIR`")]
    ManifestParse {
        /// The manifest file.
        path: PathBuf,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// A manifest file parses but is inconsistent.
    #[error("manifest {path}: {problem}")]
    ManifestInvalid {
        /// The manifest file.
        path: PathBuf,
        /// What is wrong, and what to do.
        problem: String,
    },
    /// A manifest file cannot be written.
    #[error("cannot write manifest {path}")]
    ManifestWrite {
        /// The manifest file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The measurement cannot be written to the output.
    #[error("cannot write the measurement to the output")]
    Output {
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The NVIDIA FLARE startup kit (`[workload.flare]`) does not verify.
    #[error(transparent)]
    FlareKit(#[from] Box<super::flare::KitError>),
    /// The measured bundle digest differs from the pinned one.
    #[error(
        "bundle digest mismatch: expected {expected}, measured {actual}; {}",
        mismatch_detail(differences, reference.as_ref(), expected)
    )]
    DigestMismatch {
        /// The pinned digest.
        expected: Digest,
        /// The measured digest.
        actual: Digest,
        /// The entries that differ from the reference manifest (`changed a/b (digest)`,
        /// `added c`, `removed d`), in path order; empty without a reference manifest.
        differences: Vec<String>,
        /// The bundle digest of the reference manifest, when one was given.
        reference: Option<Digest>,
    },
}

fn mismatch_detail(
    differences: &[String],
    reference: Option<&Digest>,
    expected: &Digest,
) -> String {
    let Some(reference) = reference else {
        return "no reference manifest names the differing entries: run `cvm-warden measure --manifest manifest.json DIR` on the build machine, set workload.manifest to that file and compare".to_string();
    };
    let mut text = String::new();
    if reference != expected {
        text.push_str(&format!(
            "the reference manifest describes {reference}, not the pinned digest, so it belongs to another build; "
        ));
    }
    if differences.is_empty() {
        text.push_str("no entry differs from the reference manifest");
        return text;
    }
    text.push_str("differing entries: ");
    let shown = differences.len().min(MAX_LISTED_DIFFERENCES);
    text.push_str(&differences[..shown].join(", "));
    if differences.len() > shown {
        text.push_str(&format!(" and {} more", differences.len() - shown));
    }
    text
}
