//! The manifest: every entry of a bundle with its type, mode, size and digest or link target;
//! its canonical bytes (whose SHA-256 is the bundle digest), its JSON form and diffs between
//! two manifests. The format is specified in the README's "Bundle manifest and bundle digest".

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::error::MeasureError;
use crate::digest::Digest;

/// First line of the canonical manifest bytes.
pub const CANONICAL_HEADER: &str = "cvm-warden-manifest v1";

/// The permission bits kept in the manifest: rwx for user, group, other, plus setuid, setgid
/// and sticky (`st_mode & 0o7777`).
pub const MODE_MASK: u32 = 0o7777;

/// One bundle entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Path relative to the bundle root: UTF-8, components joined by `/`, no `.` or `..`.
    pub path: String,
    /// `st_mode & 0o7777`.
    pub mode: u32,
    /// Type and content.
    pub kind: EntryKind,
}

/// What an entry is, with what identifies its content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    /// A regular file (hard links are measured as separate files).
    File {
        /// Length in bytes.
        size: u64,
        /// fs-verity digest of the content.
        digest: Digest,
    },
    /// A directory.
    Dir,
    /// A symbolic link.
    Symlink {
        /// The target as stored in the link.
        target: String,
    },
}

impl Entry {
    /// `file`, `dir` or `symlink`.
    pub fn type_name(&self) -> &'static str {
        match self.kind {
            EntryKind::File { .. } => "file",
            EntryKind::Dir => "dir",
            EntryKind::Symlink { .. } => "symlink",
        }
    }

    /// File: byte length; dir: 0; symlink: length of the target in bytes.
    pub fn size(&self) -> u64 {
        match &self.kind {
            EntryKind::File { size, .. } => *size,
            EntryKind::Dir => 0,
            EntryKind::Symlink { target } => target.len() as u64,
        }
    }
}

/// The entries of a bundle, sorted by path bytes, each path once. The bundle root itself is
/// not an entry.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Manifest {
    /// Sorted by path bytes, unique.
    pub entries: Vec<Entry>,
}

/// How an entry of a measured manifest differs from a reference manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryDiff {
    /// Only in the measured manifest.
    Added {
        /// Relative path.
        path: String,
    },
    /// Only in the reference manifest.
    Removed {
        /// Relative path.
        path: String,
    },
    /// In both, with different fields.
    Changed {
        /// Relative path.
        path: String,
        /// Which of `type`, `mode`, `size`, `digest`, `target` differ.
        fields: Vec<&'static str>,
    },
}

impl EntryDiff {
    /// The entry's relative path.
    pub fn path(&self) -> &str {
        match self {
            EntryDiff::Added { path } | EntryDiff::Removed { path } => path,
            EntryDiff::Changed { path, .. } => path,
        }
    }
}

impl fmt::Display for EntryDiff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EntryDiff::Added { path } => write!(f, "added {path}"),
            EntryDiff::Removed { path } => write!(f, "removed {path}"),
            EntryDiff::Changed { path, fields } => {
                write!(f, "changed {path} ({})", fields.join(", "))
            }
        }
    }
}

/// Appends `text` with every byte below 0x21, `%` and 0x7f written as `%XX` (uppercase hex).
fn push_escaped(out: &mut Vec<u8>, text: &str) {
    for &b in text.as_bytes() {
        if b <= 0x20 || b == b'%' || b == 0x7f {
            out.extend_from_slice(format!("%{b:02X}").as_bytes());
        } else {
            out.push(b);
        }
    }
}

/// JSON shape of one entry.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonEntry {
    path: String,
    #[serde(rename = "type")]
    kind: JsonType,
    mode: u32,
    size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    digest: Option<Digest>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    target: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum JsonType {
    File,
    Dir,
    Symlink,
}

/// JSON shape of a manifest.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonManifest {
    bundle_digest: Digest,
    entries: Vec<JsonEntry>,
}

impl From<&Entry> for JsonEntry {
    fn from(e: &Entry) -> Self {
        let (kind, digest, target) = match &e.kind {
            EntryKind::File { digest, .. } => (JsonType::File, Some(*digest), None),
            EntryKind::Dir => (JsonType::Dir, None, None),
            EntryKind::Symlink { target } => (JsonType::Symlink, None, Some(target.clone())),
        };
        JsonEntry {
            path: e.path.clone(),
            kind,
            mode: e.mode,
            size: e.size(),
            digest,
            target,
        }
    }
}

/// Checks a relative path: non-empty, no empty, `.` or `..` component, no NUL.
fn check_rel_path(path: &str) -> Result<(), String> {
    if path.is_empty() || path.contains('\0') {
        return Err(format!("entry path {path:?} is empty or contains NUL"));
    }
    if path
        .split('/')
        .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return Err(format!(
            "entry path {path:?} is not a plain relative path (empty, `.` or `..` component, or leading/trailing `/`)"
        ));
    }
    Ok(())
}

impl TryFrom<JsonEntry> for Entry {
    type Error = String;

    fn try_from(j: JsonEntry) -> Result<Self, String> {
        check_rel_path(&j.path)?;
        let path = j.path;
        if j.mode & !MODE_MASK != 0 {
            return Err(format!(
                "entry {path}: mode {} has bits outside 0o7777",
                j.mode
            ));
        }
        let kind = match (j.kind, j.digest, j.target) {
            (JsonType::File, Some(digest), None) => EntryKind::File {
                size: j.size,
                digest,
            },
            (JsonType::Dir, None, None) if j.size == 0 => EntryKind::Dir,
            (JsonType::Symlink, None, Some(target))
                if !target.is_empty() && target.len() as u64 == j.size && !target.contains('\0') =>
            {
                EntryKind::Symlink { target }
            }
            (kind, ..) => {
                return Err(format!(
                    "entry {path}: fields do not fit type {kind:?} (a file has `digest`, a symlink a non-empty `target` of `size` bytes, a dir neither and size 0)"
                ))
            }
        };
        Ok(Entry {
            path,
            mode: j.mode,
            kind,
        })
    }
}

impl Manifest {
    /// Builds a manifest from entries in any order (sorted here by path bytes).
    pub fn from_entries(mut entries: Vec<Entry>) -> Manifest {
        entries.sort_by(|a, b| a.path.as_bytes().cmp(b.path.as_bytes()));
        Manifest { entries }
    }

    /// The canonical bytes (see the README's "Bundle manifest and bundle digest"): the header line, then one line per entry
    /// `<path> <type> <mode> <size> [<digest>|<target>]`, fields separated by one space,
    /// every line ending in `\n`, path and target escaped.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        let mut entries: Vec<&Entry> = self.entries.iter().collect();
        entries.sort_by(|a, b| a.path.as_bytes().cmp(b.path.as_bytes()));
        let mut out = Vec::with_capacity(64 + entries.len() * 120);
        out.extend_from_slice(CANONICAL_HEADER.as_bytes());
        out.push(b'\n');
        for e in entries {
            push_escaped(&mut out, &e.path);
            out.extend_from_slice(
                format!(" {} {:04o} {}", e.type_name(), e.mode, e.size()).as_bytes(),
            );
            match &e.kind {
                EntryKind::File { digest, .. } => {
                    out.extend_from_slice(format!(" {digest}").as_bytes());
                }
                EntryKind::Dir => {}
                EntryKind::Symlink { target } => {
                    out.push(b' ');
                    push_escaped(&mut out, target);
                }
            }
            out.push(b'\n');
        }
        out
    }

    /// The bundle digest: SHA-256 of [`Manifest::canonical_bytes`].
    pub fn digest(&self) -> Digest {
        Digest::of(&self.canonical_bytes())
    }

    /// Total length of the regular files.
    pub fn file_bytes(&self) -> u64 {
        self.entries
            .iter()
            .map(|e| match e.kind {
                EntryKind::File { size, .. } => size,
                _ => 0,
            })
            .sum()
    }

    /// The JSON form on one line, without a trailing newline:
    /// `{"bundle_digest":"sha256:…","entries":[{"path":…,"type":…,"mode":…,"size":…,…}]}`.
    pub fn to_json(&self) -> String {
        let json = JsonManifest {
            bundle_digest: self.digest(),
            entries: self.entries.iter().map(JsonEntry::from).collect(),
        };
        // Serializing these plain structs to a string cannot fail.
        serde_json::to_string(&json).unwrap_or_default()
    }

    /// The same JSON with one entry per line (for `--manifest FILE`, friendly to `diff`),
    /// ending with a newline.
    pub fn to_json_lines(&self) -> String {
        let mut out = format!("{{\"bundle_digest\":\"{}\",\"entries\":[", self.digest());
        for (i, e) in self.entries.iter().enumerate() {
            out.push_str(if i == 0 { "\n" } else { ",\n" });
            out.push_str(&serde_json::to_string(&JsonEntry::from(e)).unwrap_or_default());
        }
        out.push_str("\n]}\n");
        out
    }

    /// Writes [`Manifest::to_json_lines`] to `path` (created or replaced).
    pub fn save_json(&self, path: &Path) -> Result<(), MeasureError> {
        let write = || -> std::io::Result<()> {
            let mut file = std::fs::File::create(path)?;
            file.write_all(self.to_json_lines().as_bytes())?;
            file.sync_all()
        };
        write().map_err(|source| MeasureError::ManifestWrite {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Parses manifest JSON and checks it: plain relative paths, sorted and unique, every
    /// parent directory listed, fields that fit the type, and a `bundle_digest` that matches
    /// the entries. `Err` is the problem in words.
    pub fn from_json(text: &str) -> Result<Manifest, serde_json::Error> {
        let json: JsonManifest = serde_json::from_str(text)?;
        Self::from_parsed(json).map_err(serde::de::Error::custom)
    }

    fn from_parsed(json: JsonManifest) -> Result<Manifest, String> {
        let entries = json
            .entries
            .into_iter()
            .map(Entry::try_from)
            .collect::<Result<Vec<_>, _>>()?;
        for pair in entries.windows(2) {
            if pair[0].path.as_bytes() >= pair[1].path.as_bytes() {
                return Err(format!(
                    "entries are not sorted by path bytes or repeat a path: {:?} before {:?}",
                    pair[0].path, pair[1].path
                ));
            }
        }
        let dirs: BTreeSet<&str> = entries
            .iter()
            .filter(|e| e.kind == EntryKind::Dir)
            .map(|e| e.path.as_str())
            .collect();
        for e in &entries {
            if let Some((parent, _)) = e.path.rsplit_once('/') {
                if !dirs.contains(parent) {
                    return Err(format!(
                        "entry {} is listed without its directory {parent}",
                        e.path
                    ));
                }
            }
        }
        let manifest = Manifest { entries };
        let digest = manifest.digest();
        if digest != json.bundle_digest {
            return Err(format!(
                "bundle_digest {} does not match the entries, which give {digest}; the file was edited or damaged, write it again with `cvm-warden measure --manifest FILE DIR`",
                json.bundle_digest
            ));
        }
        Ok(manifest)
    }

    /// Reads a manifest written by `cvm-warden measure --manifest` (or `--json`), checked as
    /// in [`Manifest::from_json`].
    pub fn load_json(path: &Path) -> Result<Manifest, MeasureError> {
        let text = std::fs::read_to_string(path).map_err(|source| MeasureError::ManifestRead {
            path: path.to_path_buf(),
            source,
        })?;
        let json: JsonManifest =
            serde_json::from_str(&text).map_err(|source| MeasureError::ManifestParse {
                path: path.to_path_buf(),
                source,
            })?;
        Self::from_parsed(json).map_err(|problem| MeasureError::ManifestInvalid {
            path: path.to_path_buf(),
            problem,
        })
    }

    /// The entries of `self` (measured) that differ from `reference`, in path order: `Added`
    /// when only in `self`, `Removed` when only in `reference`, `Changed` when in both with
    /// other fields.
    pub fn diff(&self, reference: &Manifest) -> Vec<EntryDiff> {
        let ours: BTreeMap<&[u8], &Entry> = self
            .entries
            .iter()
            .map(|e| (e.path.as_bytes(), e))
            .collect();
        let theirs: BTreeMap<&[u8], &Entry> = reference
            .entries
            .iter()
            .map(|e| (e.path.as_bytes(), e))
            .collect();
        let paths: BTreeSet<&[u8]> = ours.keys().chain(theirs.keys()).copied().collect();
        let mut out = Vec::new();
        for key in paths {
            match (ours.get(key), theirs.get(key)) {
                (Some(a), None) => out.push(EntryDiff::Added {
                    path: a.path.clone(),
                }),
                (None, Some(b)) => out.push(EntryDiff::Removed {
                    path: b.path.clone(),
                }),
                (Some(a), Some(b)) => {
                    let fields = changed_fields(a, b);
                    if !fields.is_empty() {
                        out.push(EntryDiff::Changed {
                            path: a.path.clone(),
                            fields,
                        });
                    }
                }
                (None, None) => {}
            }
        }
        out
    }
}

fn changed_fields(a: &Entry, b: &Entry) -> Vec<&'static str> {
    let mut fields = Vec::new();
    if a.type_name() != b.type_name() {
        fields.push("type");
    }
    if a.mode != b.mode {
        fields.push("mode");
    }
    if a.size() != b.size() {
        fields.push("size");
    }
    match (&a.kind, &b.kind) {
        (EntryKind::File { digest: x, .. }, EntryKind::File { digest: y, .. }) if x != y => {
            fields.push("digest")
        }
        (EntryKind::Symlink { target: x }, EntryKind::Symlink { target: y }) if x != y => {
            fields.push("target")
        }
        _ => {}
    }
    fields
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn file(path: &str, mode: u32, content: &[u8]) -> Entry {
        Entry {
            path: path.into(),
            mode,
            kind: EntryKind::File {
                size: content.len() as u64,
                digest: super::super::verity::digest_of(content),
            },
        }
    }

    fn dir(path: &str, mode: u32) -> Entry {
        Entry {
            path: path.into(),
            mode,
            kind: EntryKind::Dir,
        }
    }

    fn link(path: &str, target: &str) -> Entry {
        Entry {
            path: path.into(),
            mode: 0o777,
            kind: EntryKind::Symlink {
                target: target.into(),
            },
        }
    }

    /// The worked example of the README: keep the two in step.
    fn docs_example() -> Manifest {
        Manifest::from_entries(vec![
            file("run.sh", 0o755, b"#!/bin/sh\necho hi\n"),
            dir("app", 0o755),
            file("app/my file.txt", 0o644, b""),
            link("app/current", "../run.sh"),
        ])
    }

    #[test]
    fn docs_example_canonical_bytes_and_digest() {
        let m = docs_example();
        let text = String::from_utf8(m.canonical_bytes()).unwrap();
        let doc =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
        // The canonical bytes as printed in the docs, between the markers.
        let block = doc
            .split("<!-- canonical-example -->\n```\n")
            .nth(1)
            .and_then(|rest| rest.split("```").next())
            .unwrap();
        assert_eq!(text, block);
        let digest = m.digest().to_string();
        assert!(
            doc.contains(&format!("bundle digest: `{digest}`")),
            "README.md must state bundle digest: `{digest}`"
        );
        assert!(
            doc.contains(&m.to_json()),
            "README.md must show the JSON:\n{}",
            m.to_json()
        );
    }

    #[test]
    fn escaping_keeps_lines_and_fields_unambiguous() {
        let m =
            Manifest::from_entries(vec![file("a b\nc%d\u{7f}é", 0o644, b"x"), link("l", "x y")]);
        let text = String::from_utf8(m.canonical_bytes()).unwrap();
        assert_eq!(text.lines().count(), 3);
        assert!(
            text.contains("a%20b%0Ac%25d%7Fé file 0644 1 sha256:"),
            "{text}"
        );
        assert!(text.contains("l symlink 0777 3 x%20y\n"), "{text}");
    }

    #[test]
    fn modes_print_as_four_octal_digits_with_special_bits() {
        let m = Manifest::from_entries(vec![dir("d", 0o1777), file("s", 0o4755, b"")]);
        let text = String::from_utf8(m.canonical_bytes()).unwrap();
        assert!(text.contains("d dir 1777 0\n"), "{text}");
        assert!(text.contains("s file 4755 0 sha256:"), "{text}");
    }

    #[test]
    fn canonical_order_is_by_path_bytes() {
        let m = Manifest::from_entries(vec![
            file("a/b", 0o644, b""),
            dir("a", 0o755),
            file("a.txt", 0o644, b""),
        ]);
        let paths: Vec<&str> = m.entries.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["a", "a.txt", "a/b"]);
    }

    #[test]
    fn json_round_trips_in_both_layouts() {
        let m = docs_example();
        assert_eq!(Manifest::from_json(&m.to_json()).unwrap(), m);
        assert_eq!(Manifest::from_json(&m.to_json_lines()).unwrap(), m);
        let json = m.to_json();
        assert!(json.starts_with("{\"bundle_digest\":\"sha256:"), "{json}");
        assert!(
            json.contains(r#"{"path":"app","type":"dir","mode":493,"size":0}"#),
            "{json}"
        );
        assert!(
            json.contains(r#"{"path":"app/current","type":"symlink","mode":511,"size":9,"target":"../run.sh"}"#),
            "{json}"
        );
    }

    #[test]
    fn loading_rejects_edited_or_inconsistent_manifests() {
        let m = docs_example();
        let edited = m.to_json().replace("\"mode\":420", "\"mode\":438");
        let err = Manifest::from_json(&edited).unwrap_err().to_string();
        assert!(err.contains("does not match the entries"), "{err}");

        let unsorted = Manifest {
            entries: vec![file("b", 0o644, b""), file("a", 0o644, b"")],
        };
        let json = unsorted.to_json();
        let err = Manifest::from_json(&json).unwrap_err().to_string();
        assert!(err.contains("not sorted"), "{err}");

        let orphan = Manifest::from_entries(vec![file("x/y", 0o644, b"")]);
        let err = Manifest::from_json(&orphan.to_json())
            .unwrap_err()
            .to_string();
        assert!(err.contains("without its directory x"), "{err}");

        for bad in ["../x", "/x", "a//b", "./a", "a/"] {
            let m = Manifest::from_entries(vec![file(bad, 0o644, b"")]);
            assert!(Manifest::from_json(&m.to_json()).is_err(), "{bad}");
        }
        let extra = m
            .to_json()
            .replacen("\"size\":0}", "\"size\":0,\"owner\":0}", 1);
        assert!(Manifest::from_json(&extra).is_err());
    }

    #[test]
    fn diff_names_added_removed_and_changed_entries_in_path_order() {
        let reference = docs_example();
        let mut measured = docs_example();
        measured.entries.retain(|e| e.path != "app/my file.txt");
        measured.entries.push(file("extra.py", 0o644, b"print()"));
        for e in &mut measured.entries {
            if e.path == "run.sh" {
                *e = file("run.sh", 0o775, b"#!/bin/sh\necho bye\n");
            }
        }
        let measured = Manifest::from_entries(measured.entries);
        let diffs: Vec<String> = measured
            .diff(&reference)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            diffs,
            [
                "removed app/my file.txt",
                "added extra.py",
                "changed run.sh (mode, size, digest)"
            ]
        );
        assert!(reference.diff(&reference).is_empty());
    }
}
