//! Behaviour of the measure module on real directory trees (no root needed).

use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;

use super::*;

/// A small bundle: a dir, files with special modes, a hard link and internal symlinks.
fn sample(root: &Path) {
    fs::create_dir_all(root.join("app/lib")).unwrap();
    fs::write(root.join("app/main.py"), b"print('hi')\n").unwrap();
    fs::write(root.join("app/lib/data.bin"), vec![7u8; 10_000]).unwrap();
    fs::write(
        root.join("run.sh"),
        b"#!/bin/sh\nexec python3 app/main.py\n",
    )
    .unwrap();
    fs::set_permissions(root.join("run.sh"), fs::Permissions::from_mode(0o4755)).unwrap();
    fs::set_permissions(root.join("app/lib"), fs::Permissions::from_mode(0o1755)).unwrap();
    fs::hard_link(root.join("app/main.py"), root.join("app/main-again.py")).unwrap();
    symlink("lib/data.bin", root.join("app/data")).unwrap();
    symlink("../run.sh", root.join("app/run")).unwrap();
    fs::write(root.join("empty"), b"").unwrap();
}

fn err_text(e: &MeasureError) -> String {
    e.to_string()
}

#[test]
fn sample_bundle_manifest_lists_every_entry_with_type_mode_size() {
    let dir = tempfile::tempdir().unwrap();
    sample(dir.path());
    let m = measure_in_place(dir.path()).unwrap();
    let lines: Vec<String> = m
        .manifest
        .entries
        .iter()
        .map(|e| format!("{} {} {:o} {}", e.path, e.type_name(), e.mode, e.size()))
        .collect();
    assert_eq!(
        lines,
        [
            "app dir 755 0",
            "app/data symlink 777 12",
            "app/lib dir 1755 0",
            "app/lib/data.bin file 644 10000",
            "app/main-again.py file 644 12",
            "app/main.py file 644 12",
            "app/run symlink 777 9",
            "empty file 644 0",
            "run.sh file 4755 35",
        ]
    );
    assert_eq!(m.bundle_digest, m.manifest.digest());
    let data = m
        .manifest
        .entries
        .iter()
        .find(|e| e.path == "app/lib/data.bin")
        .unwrap();
    assert_eq!(
        data.kind,
        EntryKind::File {
            size: 10_000,
            digest: fsverity_digest_of(&[7u8; 10_000])
        }
    );
    // Measuring again gives the same digest; any content change gives another.
    assert_eq!(measure_in_place(dir.path()).unwrap(), m);
    fs::write(dir.path().join("app/main.py"), b"print('HI')\n").unwrap();
    assert_ne!(
        measure_in_place(dir.path()).unwrap().bundle_digest,
        m.bundle_digest
    );
}

#[test]
fn mode_change_alone_changes_the_digest() {
    let dir = tempfile::tempdir().unwrap();
    sample(dir.path());
    let before = measure_in_place(dir.path()).unwrap();
    fs::set_permissions(dir.path().join("empty"), fs::Permissions::from_mode(0o664)).unwrap();
    let after = measure_in_place(dir.path()).unwrap();
    assert_ne!(before.bundle_digest, after.bundle_digest);
    let diffs: Vec<String> = after
        .manifest
        .diff(&before.manifest)
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(diffs, ["changed empty (mode)"]);
}

#[test]
fn copy_reproduces_the_bundle_read_only_with_the_same_digest() {
    let src = tempfile::tempdir().unwrap();
    let dst = tempfile::tempdir().unwrap();
    sample(src.path());
    let big = vec![0x5au8; 5 * 1024 * 1024 + 3];
    fs::write(src.path().join("app/lib/big.bin"), &big).unwrap();
    let in_place = measure_in_place(src.path()).unwrap();
    let copied = measure_and_copy(src.path(), dst.path()).unwrap();
    assert_eq!(copied, in_place);

    let d = dst.path();
    assert_eq!(fs::read(d.join("app/lib/big.bin")).unwrap(), big);
    assert_eq!(fs::read(d.join("app/main.py")).unwrap(), b"print('hi')\n");
    assert_eq!(fs::read(d.join("empty")).unwrap(), b"");
    assert_eq!(
        fs::read_link(d.join("app/run")).unwrap(),
        Path::new("../run.sh")
    );
    let mode = |p: &str| {
        fs::symlink_metadata(d.join(p))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777
    };
    assert_eq!(mode("run.sh"), 0o4555);
    assert_eq!(mode("app/main.py"), 0o444);
    assert_eq!(mode("app/lib"), 0o1555);
    assert_eq!(mode("app"), 0o555);
    // The copy differs from the source only in the write bits.
    let copy_manifest = measure_in_place(d).unwrap().manifest;
    assert_eq!(copy_manifest.entries.len(), in_place.manifest.entries.len());
    for (a, b) in copy_manifest.entries.iter().zip(&in_place.manifest.entries) {
        assert_eq!((&a.path, &a.kind), (&b.path, &b.kind));
        if a.type_name() != "symlink" {
            assert_eq!(a.mode, b.mode & !0o222, "{}", a.path);
        }
    }
    // Let tempdir clean up.
    for e in &copy_manifest.entries {
        if e.type_name() == "dir" {
            fs::set_permissions(d.join(&e.path), fs::Permissions::from_mode(0o755)).unwrap();
        }
    }
}

#[test]
fn copy_refuses_a_destination_that_is_not_empty() {
    let src = tempfile::tempdir().unwrap();
    let dst = tempfile::tempdir().unwrap();
    sample(src.path());
    fs::write(dst.path().join("stale"), b"").unwrap();
    let err = measure_and_copy(src.path(), dst.path()).unwrap_err();
    assert_eq!(
        err_text(&err),
        format!(
            "copy destination {} is not an empty directory; copy into a freshly mounted tmpfs",
            dst.path().display()
        )
    );
}

#[test]
fn fifo_socket_and_device_are_refused_naming_the_path() {
    let dir = tempfile::tempdir().unwrap();
    fs::create_dir(dir.path().join("d")).unwrap();
    nix::unistd::mkfifo(&dir.path().join("d/pipe"), nix::sys::stat::Mode::S_IRWXU).unwrap();
    let err = measure_in_place(dir.path()).unwrap_err();
    assert_eq!(
        err_text(&err),
        format!(
            "d/pipe ({}) is a FIFO; a bundle may hold only regular files, directories and symlinks, remove it",
            dir.path().join("d/pipe").display()
        )
    );

    let dir = tempfile::tempdir().unwrap();
    let _listener = std::os::unix::net::UnixListener::bind(dir.path().join("sock")).unwrap();
    let err = measure_in_place(dir.path()).unwrap_err();
    assert!(err_text(&err).starts_with("sock ("), "{err}");
    assert!(err_text(&err).contains("is a socket"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    // A character device needs CAP_MKNOD; skip that part when not permitted.
    let made = nix::sys::stat::mknod(
        &dir.path().join("null"),
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::S_IRUSR,
        nix::sys::stat::makedev(1, 3),
    );
    if made.is_ok() {
        let err = measure_in_place(dir.path()).unwrap_err();
        assert!(err_text(&err).contains("null ("), "{err}");
        assert!(err_text(&err).contains("is a character device"), "{err}");
    }
}

#[test]
fn escaping_symlinks_are_refused_naming_link_and_target() {
    for (target, reason) in [
        ("/etc/passwd", "absolute target"),
        ("../../outside", "it resolves above the bundle root"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("d")).unwrap();
        symlink(target, dir.path().join("d/link")).unwrap();
        let err = measure_in_place(dir.path()).unwrap_err();
        assert_eq!(
            err_text(&err),
            format!(
                "symlink d/link -> {target} leaves the bundle: {reason}; make it a relative link to a path inside the bundle, or put the file itself in the bundle"
            )
        );
    }
}

#[test]
fn dangling_link_inside_the_bundle_is_measured() {
    let dir = tempfile::tempdir().unwrap();
    symlink("not-there", dir.path().join("link")).unwrap();
    let m = measure_in_place(dir.path()).unwrap();
    assert_eq!(
        m.manifest.entries[0].kind,
        EntryKind::Symlink {
            target: "not-there".into()
        }
    );
}

#[test]
fn non_utf8_names_and_targets_are_refused() {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join(OsStr::from_bytes(b"caf\xe9"));
    fs::write(&bad, b"").unwrap();
    let err = measure_in_place(dir.path()).unwrap_err();
    assert_eq!(
        err_text(&err),
        format!(
            "{}/caf\u{fffd} has a name that is not UTF-8; rename it, bundle paths must be UTF-8",
            dir.path().display()
        )
    );

    let dir = tempfile::tempdir().unwrap();
    symlink(OsStr::from_bytes(b"x\xff"), dir.path().join("l")).unwrap();
    let err = measure_in_place(dir.path()).unwrap_err();
    assert!(err_text(&err).starts_with("symlink l ("), "{err}");
    assert!(err_text(&err).contains("target that is not UTF-8"), "{err}");
}

#[test]
fn root_must_be_a_directory() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("f");
    fs::write(&file, b"").unwrap();
    let err = measure_in_place(&file).unwrap_err();
    assert!(
        matches!(err, MeasureError::RootNotDirectory { .. }),
        "{err}"
    );
    let err = measure_in_place(&dir.path().join("missing")).unwrap_err();
    assert_eq!(
        err_text(&err),
        format!(
            "cannot open bundle directory {}",
            dir.path().join("missing").display()
        )
    );
}

fn measured(dir: &Path) -> Measurement {
    measure_in_place(dir).unwrap()
}

#[test]
fn mismatch_with_reference_names_the_differing_entries() {
    let dir = tempfile::tempdir().unwrap();
    sample(dir.path());
    let reference = measured(dir.path());
    fs::write(dir.path().join("run.sh"), b"#!/bin/sh\nexec sh\n").unwrap();
    fs::write(dir.path().join("extra.py"), b"").unwrap();
    let now = measured(dir.path());
    let err = MeasureError::mismatch(reference.bundle_digest, &now, Some(&reference.manifest));
    assert_eq!(
        err.to_string(),
        format!(
            "bundle digest mismatch: expected {}, measured {}; differing entries: added extra.py, changed run.sh (size, digest)",
            reference.bundle_digest, now.bundle_digest
        )
    );
}

#[test]
fn mismatch_without_reference_says_how_to_get_one() {
    let dir = tempfile::tempdir().unwrap();
    sample(dir.path());
    let now = measured(dir.path());
    let err = MeasureError::mismatch(Digest::ZERO, &now, None);
    assert_eq!(
        err.to_string(),
        format!(
            "bundle digest mismatch: expected {}, measured {}; no reference manifest names the differing entries: run `cvm-warden measure --manifest manifest.json DIR` on the build machine, set workload.manifest to that file and compare",
            Digest::ZERO,
            now.bundle_digest
        )
    );
}

#[test]
fn mismatch_lists_at_most_twenty_entries_and_flags_a_foreign_reference() {
    let dir = tempfile::tempdir().unwrap();
    let reference = measured(dir.path());
    for i in 0..25 {
        fs::write(dir.path().join(format!("f{i:02}")), b"").unwrap();
    }
    let now = measured(dir.path());
    let text = MeasureError::mismatch(Digest::ZERO, &now, Some(&reference.manifest)).to_string();
    assert!(text.contains("the reference manifest describes"), "{text}");
    assert!(text.contains("added f19 and 5 more"), "{text}");
    assert!(!text.contains("f20"), "{text}");
}

#[test]
fn measure_command_prints_summary_or_json_and_writes_a_loadable_manifest() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("bundle");
    fs::create_dir(&bundle).unwrap();
    sample(&bundle);
    let m = measured(&bundle);
    let out_path = dir.path().join("manifest.json");

    let mut out = Vec::new();
    run_measure_command(&bundle, false, Some(&out_path), &mut out).unwrap();
    assert_eq!(
        String::from_utf8(out).unwrap(),
        format!(
            "bundle_digest {} (9 entries, 10059 bytes)\nfiles 5, dirs 2, symlinks 2\nmanifest written to {}\n",
            m.bundle_digest,
            out_path.display()
        )
    );
    assert_eq!(Manifest::load_json(&out_path).unwrap(), m.manifest);

    let mut out = Vec::new();
    run_measure_command(&bundle, true, None, &mut out).unwrap();
    let text = String::from_utf8(out).unwrap();
    assert_eq!(text, format!("{}\n", m.manifest.to_json()));
    let value: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(value["bundle_digest"], m.bundle_digest.to_string());
    assert_eq!(value["entries"][3]["path"], "app/lib/data.bin");
    assert_eq!(value["entries"][3]["mode"], 0o644);
}

#[test]
fn manifest_load_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.json");
    fs::write(&path, b"{\"bundle_digest\": 1}").unwrap();
    let err = Manifest::load_json(&path).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "manifest {} is not a cvm-warden manifest; write it with `cvm-warden measure --manifest FILE DIR`",
            path.display()
        )
    );
    let err = Manifest::load_json(&dir.path().join("none.json")).unwrap_err();
    assert!(
        err.to_string().starts_with("cannot read manifest "),
        "{err}"
    );
}

#[test]
fn bundle_root_may_be_a_symlink_to_the_directory() {
    let dir = tempfile::tempdir().unwrap();
    let real = dir.path().join("real");
    fs::create_dir(&real).unwrap();
    sample(&real);
    symlink(&real, dir.path().join("current")).unwrap();
    assert_eq!(measured(&dir.path().join("current")), measured(&real));
}

#[test]
fn deep_trees_are_walked_without_recursion() {
    let dir = tempfile::tempdir().unwrap();
    let mut path = dir.path().to_path_buf();
    for _ in 0..1000 {
        path.push("d");
    }
    fs::create_dir_all(&path).unwrap();
    fs::write(path.join("f"), b"deep").unwrap();
    let m = measured(dir.path());
    assert_eq!(m.manifest.entries.len(), 1001);
    assert_eq!(m.manifest.entries[1000].path.len(), 2001);
}

#[test]
fn empty_bundle_is_the_header_line_alone() {
    let dir = tempfile::tempdir().unwrap();
    let m = measured(dir.path());
    assert!(m.manifest.entries.is_empty());
    assert_eq!(m.bundle_digest, Digest::of(b"cvm-warden-manifest v1\n"));
    assert_eq!(
        Manifest::from_json(&m.manifest.to_json_lines()).unwrap(),
        m.manifest
    );
}
