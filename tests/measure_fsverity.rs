//! Per-file digests of the measure module against `fsverity digest` (Debian package
//! `fsverity`, fsverity-utils) on generated trees. The tool is required: without it these
//! tests fail, they never pass silently.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use cvm_warden::digest::Digest;
use cvm_warden::measure::{self, EntryKind, Measurement};

/// `fsverity digest` of every path, in batches; panics with an install hint without the tool.
fn fsverity_digests(paths: &[PathBuf]) -> BTreeMap<PathBuf, Digest> {
    let mut out = BTreeMap::new();
    for batch in paths.chunks(500) {
        let output = match Command::new("fsverity").arg("digest").args(batch).output() {
            Ok(output) => output,
            Err(e) => panic!(
                "cannot run `fsverity digest` ({e}); these tests compare with it: apt-get install fsverity"
            ),
        };
        assert!(
            output.status.success(),
            "fsverity digest failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let text = String::from_utf8(output.stdout).unwrap();
        for line in text.lines() {
            let (digest, path) = line.split_once(' ').unwrap();
            out.insert(PathBuf::from(path), digest.parse().unwrap());
        }
    }
    assert_eq!(out.len(), paths.len(), "fsverity printed one line per file");
    out
}

/// Every file of `m` (relative to `root`) with the digest the library computed.
fn files_of(root: &Path, m: &Measurement) -> BTreeMap<PathBuf, Digest> {
    m.manifest
        .entries
        .iter()
        .filter_map(|e| match e.kind {
            EntryKind::File { digest, .. } => Some((root.join(&e.path), digest)),
            _ => None,
        })
        .collect()
}

fn assert_same_as_fsverity(root: &Path, m: &Measurement) {
    let ours = files_of(root, m);
    let paths: Vec<PathBuf> = ours.keys().cloned().collect();
    let theirs = fsverity_digests(&paths);
    for (path, digest) in &ours {
        assert_eq!(Some(digest), theirs.get(path), "{}", path.display());
    }
}

/// Deterministic pseudo-random bytes (xorshift64).
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

#[test]
fn fsverity_tool_is_installed() {
    match Command::new("fsverity").arg("--version").output() {
        Ok(o) if o.status.success() => {}
        other => {
            panic!("`fsverity` is required to check digests ({other:?}): apt-get install fsverity")
        }
    }
}

#[test]
fn block_edge_sizes_match_fsverity() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let sizes = [
        0,
        1,
        4095,
        4096,
        4097,
        2 * 4096,
        128 * 4096,
        128 * 4096 + 1,
        129 * 4096 - 1,
        4 << 20,
        (4 << 20) + 1,
        (9 << 20) + 12345,
    ];
    for (i, size) in sizes.into_iter().enumerate() {
        fs::write(root.join(format!("f{size}")), noise(size, i as u64 + 1)).unwrap();
    }
    // Edge sizes also as zeros, and a file of all 0xff.
    fs::write(root.join("zeros4096"), vec![0u8; 4096]).unwrap();
    fs::write(root.join("ff4097"), vec![0xffu8; 4097]).unwrap();
    let m = measure::measure_in_place(root).unwrap();
    assert_eq!(m.manifest.entries.len(), sizes.len() + 2);
    assert_same_as_fsverity(root, &m);
    // And the in-memory function on the same bytes.
    for (i, size) in sizes.into_iter().enumerate().take(6) {
        let want = fsverity_digests(&[root.join(format!("f{size}"))]);
        assert_eq!(
            Some(&measure::fsverity_digest_of(&noise(size, i as u64 + 1))),
            want.values().next()
        );
    }
}

#[test]
fn three_level_tree_file_matches_fsverity() {
    // 64 MiB + 1 byte: 16385 data blocks, 129 level-0 tree blocks, 2 level-1 blocks, 1 root
    // block. Sparse (cheap on disk), with some data written at a few offsets.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big");
    let file = fs::File::create(&path).unwrap();
    file.set_len((64 << 20) + 1).unwrap();
    for (i, offset) in [0u64, 4095, 512 << 10, 33 << 20, 64 << 20]
        .into_iter()
        .enumerate()
    {
        file.write_all_at(
            &noise(1000.min(((64 << 20) + 1 - offset) as usize), i as u64),
            offset,
        )
        .unwrap();
    }
    drop(file);
    let m = measure::measure_in_place(dir.path()).unwrap();
    assert_eq!(m.manifest.entries[0].size(), (64 << 20) + 1);
    assert_same_as_fsverity(dir.path(), &m);
}

#[test]
fn thousands_of_small_files_match_fsverity() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    for d in 0..20 {
        let sub = root.join(format!("d{d:02}/inner"));
        fs::create_dir_all(&sub).unwrap();
        for f in 0..150 {
            let n = d * 150 + f;
            let size = (n * 37) % 9000;
            let name = if f % 2 == 0 {
                sub.join(format!("f{f:03} é.bin"))
            } else {
                root.join(format!("d{d:02}/f{f:03}"))
            };
            let mut file = fs::File::create(name).unwrap();
            file.write_all(&noise(size, n as u64)).unwrap();
        }
    }
    let m = measure::measure_in_place(root).unwrap();
    assert_eq!(m.manifest.entries.len(), 20 * 2 + 3000);
    assert_same_as_fsverity(root, &m);
}

#[test]
fn copied_bundle_matches_fsverity_and_source() {
    let src = tempfile::tempdir().unwrap();
    let dst = tempfile::tempdir().unwrap();
    fs::create_dir(src.path().join("lib")).unwrap();
    for (i, size) in [0usize, 1, 4097, (5 << 20) + 7].into_iter().enumerate() {
        fs::write(src.path().join(format!("lib/f{i}")), noise(size, i as u64)).unwrap();
    }
    std::os::unix::fs::symlink("lib/f3", src.path().join("weights")).unwrap();
    let copied = measure::measure_and_copy(src.path(), dst.path()).unwrap();
    assert_eq!(copied, measure::measure_in_place(src.path()).unwrap());
    assert_same_as_fsverity(dst.path(), &copied);
    assert_same_as_fsverity(src.path(), &copied);
    // The copy's directories are read-only; make them writable so the tempdir can go.
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(dst.path().join("lib"), fs::Permissions::from_mode(0o755)).unwrap();
}
