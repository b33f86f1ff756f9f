//! The fs-verity file digest: SHA-256, 4096-byte blocks, no salt — the value the Linux kernel
//! reports for a verity file and `fsverity digest` prints.
//!
//! The Merkle tree hashes every 4096-byte data block (the last one zero-padded); the hashes
//! of one level are packed into 4096-byte tree blocks (zero-padded) and hashed again, until a
//! single block is left: the root hash is the hash of that block. A file of at most one block
//! has no tree (its root hash is the hash of its padded block); an empty file's root hash is
//! all zeros. The file digest is SHA-256 of the 256-byte `struct fsverity_descriptor`
//! (Linux `Documentation/filesystems/fsverity.rst`).
//!
//! Large files are hashed in parallel: the data is split into chunks aligned to the span of
//! one level-0 tree block (128 data blocks = 512 KiB), each chunk is read with `read_at` and
//! hashed on the rayon pool up to its level-0 tree blocks, and the upper levels (1/128 of the
//! work) are built afterwards. In copy mode each chunk is written out with `write_at` right
//! after it is hashed, so every byte is read once.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use rayon::prelude::*;
use sha2::{Digest as _, Sha256};

use crate::digest::Digest;

/// Data and tree block size (log2 = 12).
pub const BLOCK_SIZE: usize = 4096;
/// Hashes per tree block.
const HASHES_PER_BLOCK: usize = BLOCK_SIZE / 32;
/// Bytes of data covered by one level-0 tree block (512 KiB).
const TREE_SPAN: usize = BLOCK_SIZE * HASHES_PER_BLOCK;
/// Bytes read per `read_at` and hashed per parallel task (a multiple of [`TREE_SPAN`]).
const CHUNK: usize = 2 * TREE_SPAN;
/// Files larger than this are hashed in parallel chunks.
const PARALLEL_THRESHOLD: u64 = 4 * CHUNK as u64;

type Hash = [u8; 32];

fn sha256(data: &[u8]) -> Hash {
    Sha256::digest(data).into()
}

/// SHA-256 of one block, zero-padded to [`BLOCK_SIZE`].
fn hash_block(data: &[u8]) -> Hash {
    if data.len() == BLOCK_SIZE {
        return sha256(data);
    }
    let mut block = [0u8; BLOCK_SIZE];
    block[..data.len()].copy_from_slice(data);
    sha256(&block)
}

/// Hashes `data` (a whole number of tree spans, except possibly at the end of the file) up to
/// level-0 tree blocks and appends one hash per tree block to `out`.
fn hash_tree_spans(data: &[u8], out: &mut Vec<Hash>) {
    let mut tree_block = [0u8; BLOCK_SIZE];
    for span in data.chunks(TREE_SPAN) {
        let mut used = 0;
        for block in span.chunks(BLOCK_SIZE) {
            tree_block[used..used + 32].copy_from_slice(&hash_block(block));
            used += 32;
        }
        tree_block[used..].fill(0);
        out.push(sha256(&tree_block));
    }
}

/// Builds the upper levels from the hashes of the level-0 tree blocks; returns the root hash.
fn root_from_level0(mut level: Vec<Hash>) -> Hash {
    while level.len() > 1 {
        level = level
            .chunks(HASHES_PER_BLOCK)
            .map(|hashes| {
                let mut block = [0u8; BLOCK_SIZE];
                for (slot, hash) in block.chunks_exact_mut(32).zip(hashes) {
                    slot.copy_from_slice(hash);
                }
                sha256(&block)
            })
            .collect();
    }
    level.first().copied().unwrap_or([0u8; 32])
}

/// The file digest: SHA-256 of the `fsverity_descriptor` for `data_size` and `root`.
fn descriptor_digest(data_size: u64, root: &Hash) -> Digest {
    let mut desc = [0u8; 256];
    desc[0] = 1; // version
    desc[1] = 1; // hash_algorithm: FS_VERITY_HASH_ALG_SHA256
    desc[2] = 12; // log_blocksize: 4096
    desc[3] = 0; // salt_size
                 // desc[4..8]: sig_size (le32), 0 when computing the digest
    desc[8..16].copy_from_slice(&data_size.to_le_bytes());
    desc[16..48].copy_from_slice(root); // root_hash[64], zero-padded
                                        // desc[80..112]: salt, desc[112..256]: reserved — all zero
    Digest::of(&desc)
}

/// The fs-verity digest of `data` held in memory.
pub fn digest_of(data: &[u8]) -> Digest {
    let root = match data.len() {
        0 => [0u8; 32],
        n if n <= BLOCK_SIZE => hash_block(data),
        _ => {
            let mut level0 = Vec::with_capacity(data.len().div_ceil(TREE_SPAN));
            hash_tree_spans(data, &mut level0);
            root_from_level0(level0)
        }
    };
    descriptor_digest(data.len() as u64, &root)
}

/// Why hashing a file stopped.
#[derive(Debug)]
pub(crate) enum HashFailure {
    /// Reading the source failed.
    Read(io::Error),
    /// The source ended before `size` bytes.
    Truncated { offset: u64 },
    /// Writing the copy failed.
    Write(io::Error),
}

/// Reads exactly `buf.len()` bytes at `offset`.
fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> Result<(), HashFailure> {
    let mut done = 0;
    while done < buf.len() {
        let at = offset + done as u64;
        match file.read_at(&mut buf[done..], at) {
            Ok(0) => return Err(HashFailure::Truncated { offset: at }),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(HashFailure::Read(e)),
        }
    }
    Ok(())
}

/// Reads `len` bytes at `start` (aligned to [`TREE_SPAN`]) in [`CHUNK`]-sized pieces, writes
/// them to `copy` at the same offset, and appends the hashes of their level-0 tree blocks.
fn hash_range(
    file: &File,
    copy: Option<&File>,
    start: u64,
    len: u64,
    buf: &mut Vec<u8>,
    out: &mut Vec<Hash>,
) -> Result<(), HashFailure> {
    let mut offset = start;
    let end = start + len;
    while offset < end {
        let n = (end - offset).min(CHUNK as u64) as usize;
        if buf.len() < n {
            buf.resize(n, 0);
        }
        let piece = &mut buf[..n];
        read_exact_at(file, piece, offset)?;
        hash_tree_spans(piece, out);
        if let Some(copy) = copy {
            copy.write_all_at(piece, offset)
                .map_err(HashFailure::Write)?;
        }
        offset += n as u64;
    }
    Ok(())
}

/// Computes the fs-verity digest of the first `size` bytes of `file`, optionally writing
/// every byte read to `copy` at the same offset. `buf` is a reusable read buffer.
pub(crate) fn digest_file(
    file: &File,
    size: u64,
    copy: Option<&File>,
    buf: &mut Vec<u8>,
) -> Result<Digest, HashFailure> {
    if size <= BLOCK_SIZE as u64 {
        let n = size as usize;
        if buf.len() < n {
            buf.resize(n, 0);
        }
        let data = &mut buf[..n];
        read_exact_at(file, data, 0)?;
        if let Some(copy) = copy {
            copy.write_all_at(data, 0).map_err(HashFailure::Write)?;
        }
        let root = if n == 0 { [0u8; 32] } else { hash_block(data) };
        return Ok(descriptor_digest(size, &root));
    }
    let level0 = if size <= PARALLEL_THRESHOLD {
        let mut level0 = Vec::new();
        hash_range(file, copy, 0, size, buf, &mut level0)?;
        level0
    } else {
        let chunks = size.div_ceil(CHUNK as u64);
        let parts = (0..chunks)
            .into_par_iter()
            .map_init(Vec::new, |buf, i| {
                let start = i * CHUNK as u64;
                let len = (size - start).min(CHUNK as u64);
                let mut hashes = Vec::with_capacity(CHUNK / TREE_SPAN);
                hash_range(file, copy, start, len, buf, &mut hashes).map(|()| hashes)
            })
            .collect::<Result<Vec<_>, _>>()?;
        parts.concat()
    };
    Ok(descriptor_digest(size, &root_from_level0(level0)))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    /// Known values, checked with `fsverity digest` (fsverity-utils 1.5).
    #[test]
    fn known_digests_match_fsverity_utils() {
        let cases: [(&[u8], &str); 3] = [
            (
                b"",
                "sha256:3d248ca542a24fc62d1c43b916eae5016878e2533c88238480b26128a1f1af95",
            ),
            (
                b"a",
                "sha256:bce75948b9e7510293f8f2720412af9697c1479281323f3f220623fb8e94b557",
            ),
            (
                &[0u8; 4097],
                "sha256:093756e4ea9683329106d4a16982682ed182c14bf076463a9e7f97305cbac743",
            ),
        ];
        for (data, want) in cases {
            assert_eq!(digest_of(data).to_string(), want, "{} bytes", data.len());
        }
    }

    fn file_with(data: &[u8]) -> (tempfile::TempDir, File) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, data).unwrap();
        let file = File::open(&path).unwrap();
        (dir, file)
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 4096) as u8).collect()
    }

    #[test]
    fn file_path_agrees_with_memory_at_block_and_chunk_edges() {
        let sizes = [
            0,
            1,
            4095,
            4096,
            4097,
            TREE_SPAN - 1,
            TREE_SPAN,
            TREE_SPAN + 1,
            PARALLEL_THRESHOLD as usize,
            PARALLEL_THRESHOLD as usize + 1,
            PARALLEL_THRESHOLD as usize + CHUNK + 4096 * 3 + 5,
        ];
        for size in sizes {
            let data = pattern(size);
            let (_dir, file) = file_with(&data);
            let mut buf = Vec::new();
            let got = digest_file(&file, size as u64, None, &mut buf).unwrap();
            assert_eq!(got, digest_of(&data), "size {size}");
        }
    }

    #[test]
    fn copy_receives_every_byte() {
        let size = PARALLEL_THRESHOLD as usize + 12345;
        let data = pattern(size);
        let (dir, file) = file_with(&data);
        let copy_path = dir.path().join("copy");
        let copy = File::create(&copy_path).unwrap();
        let mut buf = Vec::new();
        let got = digest_file(&file, size as u64, Some(&copy), &mut buf).unwrap();
        drop(copy);
        assert_eq!(got, digest_of(&data));
        assert_eq!(std::fs::read(copy_path).unwrap(), data);
    }

    #[test]
    fn short_file_is_reported_as_truncated() {
        let (_dir, file) = file_with(b"abc");
        let mut buf = Vec::new();
        match digest_file(&file, 10, None, &mut buf) {
            Err(HashFailure::Truncated { offset: 3 }) => {}
            other => panic!("{other:?}"),
        }
    }
}
