//! Walking a bundle, checking what it may hold, hashing its files (and copying them).

use std::collections::HashMap;
use std::fs::{self, File, Metadata, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use super::error::MeasureError;
use super::manifest::{Entry, EntryKind, Manifest, MODE_MASK};
use super::verity::{self, HashFailure};
use crate::digest::Digest;

/// Most symlinks followed while resolving one link (the kernel's limit, `MAXSYMLINKS`).
pub const MAX_SYMLINK_HOPS: usize = 40;

/// What the walk found at one path (with its `lstat`).
#[derive(Debug)]
struct Node {
    rel: String,
    abs: PathBuf,
    meta: Metadata,
    kind: NodeKind,
}

#[derive(Debug)]
enum NodeKind {
    File,
    Dir,
    Symlink(String),
}

/// The relative path as printed in errors (`.` for the root).
fn shown(rel: &str) -> String {
    if rel.is_empty() {
        ".".to_string()
    } else {
        rel.to_string()
    }
}

fn join_rel(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_string()
    } else {
        format!("{dir}/{name}")
    }
}

/// Lists the entries of the directory `abs` (relative path `rel`), each with its `lstat`.
fn walk_dir(abs: &Path, rel: &str) -> Result<Vec<Node>, MeasureError> {
    let read_dir_err = |source| MeasureError::ReadDir {
        rel: shown(rel),
        path: abs.to_path_buf(),
        source,
    };
    let mut nodes = Vec::new();
    for item in fs::read_dir(abs).map_err(read_dir_err)? {
        let item = item.map_err(read_dir_err)?;
        let child_abs = item.path();
        let name = item.file_name();
        let Some(name) = name.to_str() else {
            return Err(MeasureError::NonUtf8Name { path: child_abs });
        };
        let child_rel = join_rel(rel, name);
        // `DirEntry::metadata` is `lstat` (fstatat with AT_SYMLINK_NOFOLLOW).
        let meta = item.metadata().map_err(|source| MeasureError::Stat {
            rel: child_rel.clone(),
            path: child_abs.clone(),
            source,
        })?;
        let ft = meta.file_type();
        let kind = if ft.is_file() {
            NodeKind::File
        } else if ft.is_dir() {
            NodeKind::Dir
        } else if ft.is_symlink() {
            let target = fs::read_link(&child_abs).map_err(|source| MeasureError::ReadLink {
                rel: child_rel.clone(),
                path: child_abs.clone(),
                source,
            })?;
            match target.into_os_string().into_string() {
                Ok(target) => NodeKind::Symlink(target),
                Err(_) => {
                    return Err(MeasureError::NonUtf8Target {
                        rel: child_rel,
                        path: child_abs,
                    })
                }
            }
        } else {
            let kind = if ft.is_block_device() {
                "block device"
            } else if ft.is_char_device() {
                "character device"
            } else if ft.is_fifo() {
                "FIFO"
            } else if ft.is_socket() {
                "socket"
            } else {
                "file of unknown type"
            };
            return Err(MeasureError::Unsupported {
                rel: child_rel,
                path: child_abs,
                kind,
            });
        };
        nodes.push(Node {
            rel: child_rel,
            abs: child_abs,
            meta,
            kind,
        });
    }
    Ok(nodes)
}

/// Lists the whole tree below `root`, one depth level at a time with the directories of a
/// level listed in parallel (no recursion, so a deep tree cannot exhaust a stack).
fn walk(root: &Path) -> Result<Vec<Node>, MeasureError> {
    let mut all = walk_dir(root, "")?;
    let mut level_start = 0;
    while level_start < all.len() {
        let below = all[level_start..]
            .par_iter()
            .filter(|n| matches!(n.kind, NodeKind::Dir))
            .map(|n| walk_dir(&n.abs, &n.rel))
            .collect::<Result<Vec<_>, _>>()?;
        level_start = all.len();
        all.extend(below.into_iter().flatten());
    }
    Ok(all)
}

/// Resolves `target` of the link at `rel` inside the bundle, following the bundle's own
/// symlinks (`links`: relative path → target) as the kernel would, and fails when any step
/// would leave the bundle root.
pub(crate) fn check_symlink(
    rel: &str,
    target: &str,
    links: &HashMap<&str, &str>,
) -> Result<(), String> {
    if target.starts_with('/') {
        return Err("absolute target".to_string());
    }
    // Components still to resolve, last first.
    let mut pending: Vec<&str> = Vec::new();
    push_components(&mut pending, target);
    let mut dir: Vec<&str> = rel.split('/').collect();
    dir.pop();
    let mut hops = 1;
    while let Some(component) = pending.pop() {
        if component == ".." {
            if dir.pop().is_none() {
                return Err("it resolves above the bundle root".to_string());
            }
            continue;
        }
        dir.push(component);
        let here = dir.join("/");
        if let Some(&next) = links.get(here.as_str()) {
            hops += 1;
            if hops > MAX_SYMLINK_HOPS {
                return Err(format!(
                    "more than {MAX_SYMLINK_HOPS} symlinks in its chain (a loop?)"
                ));
            }
            if next.starts_with('/') {
                return Err(format!(
                    "it goes through {here}, which has an absolute target"
                ));
            }
            dir.pop();
            push_components(&mut pending, next);
        }
    }
    Ok(())
}

/// Pushes the components of `target` onto `pending` so that the first is popped first.
fn push_components<'a>(pending: &mut Vec<&'a str>, target: &'a str) {
    let start = pending.len();
    pending.extend(target.split('/').filter(|c| !c.is_empty() && *c != "."));
    pending[start..].reverse();
}

/// Compares the `lstat` from the walk with a later `stat` of the same entry.
fn compare(walked: &Metadata, now: &Metadata) -> Result<(), String> {
    if (walked.dev(), walked.ino()) != (now.dev(), now.ino()) {
        return Err(format!(
            "inode {}:{} became {}:{}",
            walked.dev(),
            walked.ino(),
            now.dev(),
            now.ino()
        ));
    }
    if walked.file_type() != now.file_type() {
        return Err("its type changed".to_string());
    }
    if walked.size() != now.size() {
        return Err(format!("size {} became {}", walked.size(), now.size()));
    }
    if (walked.mtime(), walked.mtime_nsec()) != (now.mtime(), now.mtime_nsec()) {
        return Err("its modification time changed".to_string());
    }
    if (walked.ctime(), walked.ctime_nsec()) != (now.ctime(), now.ctime_nsec()) {
        return Err("its status change time changed".to_string());
    }
    Ok(())
}

/// Hashes one regular file found by the walk, writing it to `copy_to` when given.
fn measure_file(
    node: &Node,
    copy_to: Option<&Path>,
    buf: &mut Vec<u8>,
) -> Result<Digest, MeasureError> {
    let changed = |what: String| MeasureError::Changed {
        rel: node.rel.clone(),
        path: node.abs.clone(),
        what,
    };
    // O_NOFOLLOW: a symlink swapped in after the walk is not followed; O_NONBLOCK: a FIFO
    // swapped in does not block the open (the fstat below then reports the change).
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(&node.abs)
        .map_err(|source| {
            if source.raw_os_error() == Some(libc::ELOOP) {
                changed("it was replaced by a symlink".to_string())
            } else {
                MeasureError::Open {
                    rel: node.rel.clone(),
                    path: node.abs.clone(),
                    source,
                }
            }
        })?;
    let stat = |file: &File| {
        file.metadata().map_err(|source| MeasureError::Stat {
            rel: node.rel.clone(),
            path: node.abs.clone(),
            source,
        })
    };
    compare(&node.meta, &stat(&file)?).map_err(changed)?;
    let copy = match copy_to {
        Some(path) => Some(
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(path)
                .map_err(|source| MeasureError::Copy {
                    action: "create",
                    rel: node.rel.clone(),
                    path: path.to_path_buf(),
                    source,
                })?,
        ),
        None => None,
    };
    let size = node.meta.size();
    let digest =
        verity::digest_file(&file, size, copy.as_ref(), buf).map_err(|failure| match failure {
            HashFailure::Read(source) => MeasureError::Read {
                rel: node.rel.clone(),
                path: node.abs.clone(),
                source,
            },
            HashFailure::Truncated { offset } => changed(format!(
                "it ended at byte {offset}, before the {size} bytes it had when listed"
            )),
            HashFailure::Write(source) => MeasureError::Copy {
                action: "write",
                rel: node.rel.clone(),
                path: copy_to.map(Path::to_path_buf).unwrap_or_default(),
                source,
            },
        })?;
    compare(&node.meta, &stat(&file)?).map_err(changed)?;
    Ok(digest)
}

fn check_empty_dir(dst: &Path) -> Result<(), MeasureError> {
    let dest_err = |source| MeasureError::Destination {
        path: dst.to_path_buf(),
        source,
    };
    let meta = fs::metadata(dst).map_err(dest_err)?;
    if !meta.is_dir() {
        return Err(MeasureError::DestinationNotEmpty {
            path: dst.to_path_buf(),
        });
    }
    if fs::read_dir(dst).map_err(dest_err)?.next().is_some() {
        return Err(MeasureError::DestinationNotEmpty {
            path: dst.to_path_buf(),
        });
    }
    Ok(())
}

/// Measures the bundle at `root`; with `copy_to`, copies it there in the same pass and then
/// removes write permission from every copied file and directory.
pub(crate) fn measure(root: &Path, copy_to: Option<&Path>) -> Result<Manifest, MeasureError> {
    let root_meta = fs::metadata(root).map_err(|source| MeasureError::OpenRoot {
        path: root.to_path_buf(),
        source,
    })?;
    if !root_meta.is_dir() {
        return Err(MeasureError::RootNotDirectory {
            path: root.to_path_buf(),
        });
    }
    if let Some(dst) = copy_to {
        check_empty_dir(dst)?;
    }
    let mut nodes = walk(root)?;
    nodes.sort_unstable_by(|a, b| a.rel.as_bytes().cmp(b.rel.as_bytes()));

    let links: HashMap<&str, &str> = nodes
        .iter()
        .filter_map(|n| match &n.kind {
            NodeKind::Symlink(target) => Some((n.rel.as_str(), target.as_str())),
            _ => None,
        })
        .collect();
    for node in &nodes {
        if let NodeKind::Symlink(target) = &node.kind {
            check_symlink(&node.rel, target, &links).map_err(|reason| {
                MeasureError::SymlinkEscapes {
                    rel: node.rel.clone(),
                    target: target.clone(),
                    reason,
                }
            })?;
        }
    }

    let dst_of = |rel: &str| copy_to.map(|dst| dst.join(rel));
    if let Some(dst) = copy_to {
        for node in &nodes {
            let path = dst.join(&node.rel);
            let result = match &node.kind {
                NodeKind::Dir => fs::DirBuilder::new().mode(0o700).create(&path),
                NodeKind::Symlink(target) => std::os::unix::fs::symlink(target, &path),
                NodeKind::File => continue,
            };
            result.map_err(|source| MeasureError::Copy {
                action: "create",
                rel: node.rel.clone(),
                path,
                source,
            })?;
        }
    }

    let digests: Vec<Option<Digest>> = nodes
        .par_iter()
        .map_init(Vec::new, |buf, node| match node.kind {
            NodeKind::File => measure_file(node, dst_of(&node.rel).as_deref(), buf).map(Some),
            _ => Ok(None),
        })
        .collect::<Result<_, _>>()?;

    // A directory whose entries changed during the walk has a new mtime/ctime.
    let root_node = Node {
        rel: String::new(),
        abs: root.to_path_buf(),
        meta: root_meta,
        kind: NodeKind::Dir,
    };
    for node in std::iter::once(&root_node).chain(&nodes) {
        if matches!(node.kind, NodeKind::Dir) {
            // The root was examined following symlinks (it may be a link to the bundle).
            let stat = if node.rel.is_empty() {
                fs::metadata
            } else {
                fs::symlink_metadata
            };
            let now = stat(&node.abs).map_err(|source| MeasureError::Stat {
                rel: shown(&node.rel),
                path: node.abs.clone(),
                source,
            })?;
            compare(&node.meta, &now).map_err(|what| MeasureError::Changed {
                rel: shown(&node.rel),
                path: node.abs.clone(),
                what,
            })?;
        }
    }

    if let Some(dst) = copy_to {
        for node in &nodes {
            if matches!(node.kind, NodeKind::Symlink(_)) {
                continue;
            }
            let path = dst.join(&node.rel);
            let mode = node.meta.mode() & MODE_MASK & !0o222;
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).map_err(|source| {
                MeasureError::Copy {
                    action: "set the mode of",
                    rel: node.rel.clone(),
                    path,
                    source,
                }
            })?;
        }
    }

    let entries = nodes
        .into_iter()
        .zip(digests)
        .map(|(node, digest)| {
            let kind = match (node.kind, digest) {
                (NodeKind::File, Some(digest)) => EntryKind::File {
                    size: node.meta.size(),
                    digest,
                },
                (NodeKind::Symlink(target), _) => EntryKind::Symlink { target },
                _ => EntryKind::Dir,
            };
            Entry {
                path: node.rel,
                mode: node.meta.mode() & MODE_MASK,
                kind,
            }
        })
        .collect();
    Ok(Manifest { entries })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn check(links: &[(&str, &str)], which: &str) -> Result<(), String> {
        let map: HashMap<&str, &str> = links.iter().copied().collect();
        check_symlink(which, map[which], &map)
    }

    #[test]
    fn links_inside_the_bundle_are_accepted() {
        let links = [
            ("a", "b"),
            ("d/x", "../a"),
            ("d/e/y", "../../d/./e//z"),
            ("d/up", ".."),
            ("d/self", "."),
        ];
        for (rel, _) in links {
            assert_eq!(check(&links, rel), Ok(()), "{rel}");
        }
    }

    #[test]
    fn links_leaving_the_bundle_are_refused() {
        assert_eq!(
            check(&[("a", "/etc/passwd")], "a"),
            Err("absolute target".into())
        );
        assert_eq!(
            check(&[("a", "../x")], "a"),
            Err("it resolves above the bundle root".into())
        );
        assert_eq!(
            check(&[("d/e/a", "../../../x")], "d/e/a"),
            Err("it resolves above the bundle root".into())
        );
        // Lexically `s/..` is d/e, but `s` is a link to the root, so the kernel resolves
        // `s/..` above it: links are followed as the kernel would.
        let chain = [("d/e/s", "../.."), ("d/e/l", "s/../x")];
        assert_eq!(check(&chain, "d/e/s"), Ok(()));
        assert_eq!(
            check(&chain, "d/e/l"),
            Err("it resolves above the bundle root".into())
        );
        let chain = [("up", ".."), ("d/l", "../up/x")];
        assert_eq!(
            check(&chain, "d/l"),
            Err("it resolves above the bundle root".into())
        );
        let chain = [("abs", "/"), ("l", "abs/etc")];
        assert_eq!(
            check(&chain, "l"),
            Err("it goes through abs, which has an absolute target".into())
        );
        let looped = [("a", "b"), ("b", "a")];
        assert!(check(&looped, "a").unwrap_err().contains("loop"));
    }

    fn walked(path: &Path) -> Node {
        Node {
            rel: "f".into(),
            abs: path.to_path_buf(),
            meta: fs::symlink_metadata(path).unwrap(),
            kind: NodeKind::File,
        }
    }

    #[test]
    fn a_file_that_changes_after_the_walk_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        fs::write(&path, b"before").unwrap();
        let node = walked(&path);
        fs::write(&path, b"after, longer").unwrap();
        let err = measure_file(&node, None, &mut Vec::new()).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "f ({}) changed while it was measured (size 6 became 13); stop whatever writes to the bundle and measure again",
                path.display()
            )
        );

        // Replaced (renamed over) by a new file of the same size: another inode.
        let node = walked(&path);
        fs::write(dir.path().join("g"), b"AFTER, LONGER").unwrap();
        fs::rename(dir.path().join("g"), &path).unwrap();
        let err = measure_file(&node, None, &mut Vec::new()).unwrap_err();
        assert!(err.to_string().contains("(inode "), "{err}");

        // Replaced by a symlink: not followed.
        let node = walked(&path);
        fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", &path).unwrap();
        let err = measure_file(&node, None, &mut Vec::new()).unwrap_err();
        assert!(
            err.to_string().contains("(it was replaced by a symlink)"),
            "{err}"
        );
    }

    #[test]
    fn a_directory_that_gains_an_entry_during_measurement_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d");
        fs::create_dir(&path).unwrap();
        let before = fs::symlink_metadata(&path).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        fs::write(path.join("new"), b"").unwrap();
        let after = fs::symlink_metadata(&path).unwrap();
        assert_eq!(
            compare(&before, &after),
            Err("its modification time changed".into())
        );
    }
}
