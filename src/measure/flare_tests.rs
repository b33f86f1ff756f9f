//! Kit verification against real kits from `nvflare provision` (tests/data/flare, made by
//! make-kits.py) and tampered copies of them.

use std::path::{Path, PathBuf};

use super::*;

fn data() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/flare")
}

/// The pin make-kits.py wrote with Python's `cryptography` (openssl's fingerprint).
fn pin(kit: &str) -> Digest {
    let text = fs::read_to_string(data().join(format!("{kit}.root-ca-sha256"))).unwrap();
    format!("sha256:{}", text.trim()).parse().unwrap()
}

fn copy_dir(src: &Path, dst: &Path) {
    fs::create_dir_all(dst).unwrap();
    for entry in fs::read_dir(src).unwrap() {
        let entry = entry.unwrap();
        let to = dst.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &to);
        } else {
            fs::copy(entry.path(), &to).unwrap();
        }
    }
}

/// A writable copy of `kit-a/site-1` (or kit-b's) in a temporary directory.
fn copy_of(kit: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("site-1");
    copy_dir(&data().join(kit).join("site-1"), &root);
    (dir, root)
}

/// The problems of a kit that must not verify.
fn problems(kit: &Path, pinned: &Digest, withheld: &[String]) -> (Vec<KitProblem>, String) {
    match verify_kit(kit, pinned, withheld) {
        Err(error @ KitError::Tampered { .. }) => {
            let text = error.to_string();
            let KitError::Tampered { problems, .. } = error else {
                unreachable!()
            };
            (problems, text)
        }
        other => panic!("expected a tampered kit, got {other:?}"),
    }
}

fn assert_one_problem(kit: &Path, withheld: &[String], path: &str, words: &str) -> String {
    let (problems, text) = problems(kit, &pin("kit-a"), withheld);
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert_eq!(problems[0].path, path);
    assert!(problems[0].what.contains(words), "{}", problems[0].what);
    assert!(text.contains(path), "{text}");
    assert!(text.contains("nvflare provision"), "{text}");
    text
}

#[test]
fn the_provisioned_kit_verifies_and_lists_every_entry() {
    let kit = data().join("kit-a/site-1");
    let verified = verify_kit(&kit, &pin("kit-a"), &[]).unwrap();
    assert_eq!(verified.root_ca_sha256, pin("kit-a"));
    let root_ca = fs::read(kit.join(ROOT_CA_FILE)).unwrap();
    assert!(verified.entries.contains(&KitEntry::File {
        path: ROOT_CA_FILE.to_string(),
        sha256: Digest::of(&root_ca),
    }));
    for dir in ["local", "startup", "transfer"] {
        assert!(verified.entries.contains(&KitEntry::Dir {
            path: dir.to_string()
        }));
    }
    // Every regular file of the kit is listed, signature.json files included, in path order.
    let mut files = Vec::new();
    fn walk(root: &Path, rel: &str, out: &mut Vec<String>) {
        for entry in fs::read_dir(root.join(rel)).unwrap() {
            let entry = entry.unwrap();
            let name = entry.file_name().into_string().unwrap();
            let path = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            if entry.file_type().unwrap().is_dir() {
                walk(root, &path, out);
            } else {
                out.push(path);
            }
        }
    }
    walk(&kit, "", &mut files);
    files.sort();
    let listed: Vec<&str> = verified
        .entries
        .iter()
        .filter(|e| matches!(e, KitEntry::File { .. }))
        .map(KitEntry::path)
        .collect();
    assert_eq!(listed, files);
    assert!(files.contains(&"startup/client.key".to_string()));
    let paths: Vec<&str> = verified.entries.iter().map(KitEntry::path).collect();
    let mut sorted = paths.clone();
    sorted.sort();
    assert_eq!(paths, sorted);
    let (file_count, dirs, withheld) = verified.counts();
    assert_eq!((file_count, dirs, withheld), (files.len(), 3, 0));

    let listing = verified.listing();
    assert!(listing.starts_with(&format!(
        "cvm-warden flare kit v1\nroot-ca {}\n",
        pin("kit-a")
    )));
    assert!(listing.contains("\ndir local\n"));
    assert!(listing.contains(&format!(
        "\nfile {} startup/rootCA.pem\n",
        Digest::of(&root_ca)
    )));
    assert_eq!(verified.listing_digest(), Digest::of(listing.as_bytes()));
    // The other project's kit verifies against its own pin.
    verify_kit(&data().join("kit-b/site-1"), &pin("kit-b"), &[]).unwrap();
}

#[test]
fn the_pin_is_openssls_sha256_fingerprint_of_the_root_ca() {
    assert_eq!(
        root_ca_sha256(&data().join("kit-a/site-1")).unwrap(),
        pin("kit-a")
    );
    assert_ne!(pin("kit-a"), pin("kit-b"));
}

#[test]
fn a_changed_byte_names_the_file() {
    let (_dir, kit) = copy_of("kit-a");
    let path = kit.join("startup/fed_client.json");
    let mut bytes = fs::read(&path).unwrap();
    bytes[10] ^= 1;
    fs::write(&path, bytes).unwrap();
    assert_one_problem(&kit, &[], "startup/fed_client.json", "changed");
}

#[test]
fn an_added_file_names_the_file() {
    let (_dir, kit) = copy_of("kit-a");
    fs::write(kit.join("local/extra.py"), "import os\n").unwrap();
    assert_one_problem(
        &kit,
        &[],
        "local/extra.py",
        "not signed in local/signature.json",
    );
}

#[test]
fn a_removed_file_is_refused_although_flare_misses_it() {
    let (_dir, kit) = copy_of("kit-a");
    fs::remove_file(kit.join("startup/sub_start.sh")).unwrap();
    assert_one_problem(&kit, &[], "startup/sub_start.sh", "missing");
}

#[test]
fn a_removed_directory_is_refused() {
    let (_dir, kit) = copy_of("kit-a");
    fs::remove_dir_all(kit.join("transfer")).unwrap();
    assert_one_problem(&kit, &[], "transfer", "missing");
}

#[test]
fn an_added_directory_names_the_directory() {
    let (_dir, kit) = copy_of("kit-a");
    fs::create_dir(kit.join("local/custom")).unwrap();
    fs::write(kit.join("local/custom/app.py"), "x = 1\n").unwrap();
    assert_one_problem(&kit, &[], "local/custom", "directory not signed");
}

#[test]
fn a_symlink_names_the_link() {
    let (_dir, kit) = copy_of("kit-a");
    fs::remove_file(kit.join("startup/start.sh")).unwrap();
    std::os::unix::fs::symlink("sub_start.sh", kit.join("startup/start.sh")).unwrap();
    assert_one_problem(&kit, &[], "startup/start.sh", "symbolic link");

    let (_dir2, kit2) = copy_of("kit-a");
    let link = kit2.parent().unwrap().join("link");
    std::os::unix::fs::symlink(&kit2, &link).unwrap();
    let error = verify_kit(&link, &pin("kit-a"), &[]).unwrap_err();
    assert!(
        matches!(
            error,
            KitError::NotDirectory {
                what: "a symbolic link",
                ..
            }
        ),
        "{error}"
    );
}

#[test]
fn a_fifo_is_refused() {
    let (_dir, kit) = copy_of("kit-a");
    nix::unistd::mkfifo(&kit.join("local/pipe"), nix::sys::stat::Mode::S_IRUSR).unwrap();
    assert_one_problem(&kit, &[], "local/pipe", "a FIFO");
}

#[test]
fn another_projects_kit_fails_on_the_pin_naming_the_root_ca() {
    let error = verify_kit(&data().join("kit-b/site-1"), &pin("kit-a"), &[]).unwrap_err();
    let text = error.to_string();
    assert!(
        matches!(&error, KitError::PinMismatch { pinned, actual, .. } if *pinned == pin("kit-a") && *actual == pin("kit-b")),
        "{text}"
    );
    assert!(text.contains("startup/rootCA.pem"), "{text}");
    assert!(text.contains("openssl x509"), "{text}");
}

#[test]
fn a_wrong_pin_fails_naming_the_root_ca() {
    let wrong = Digest::of(b"not this root");
    let error = verify_kit(&data().join("kit-a/site-1"), &wrong, &[]).unwrap_err();
    assert!(matches!(error, KitError::PinMismatch { .. }), "{error}");
    assert!(error.to_string().contains("startup/rootCA.pem"));
}

#[test]
fn a_swapped_root_ca_fails_on_the_pin_before_any_signature() {
    let (_dir, kit) = copy_of("kit-a");
    fs::copy(
        data().join("kit-b/site-1/startup/rootCA.pem"),
        kit.join(ROOT_CA_FILE),
    )
    .unwrap();
    let error = verify_kit(&kit, &pin("kit-a"), &[]).unwrap_err();
    assert!(
        matches!(&error, KitError::PinMismatch { actual, .. } if *actual == pin("kit-b")),
        "{error}"
    );
    // Pinned to the swapped-in root, the signatures (made by kit-a's root) fail instead: a kit
    // signed by another project's root, every signed entry named.
    let (problems, text) = problems(&kit, &pin("kit-b"), &[]);
    for path in [
        "startup/fed_client.json",
        "startup/client.key",
        "local",
        "readme.txt",
    ] {
        assert!(problems.iter().any(|p| p.path == path), "{path}: {text}");
    }
}

#[test]
fn withheld_keys_may_be_absent_but_not_present() {
    let withheld = vec!["startup/client.key".to_string()];
    let (_dir, kit) = copy_of("kit-a");
    assert_one_problem(&kit, &withheld, "startup/client.key", "present");
    fs::remove_file(kit.join("startup/client.key")).unwrap();
    let verified = verify_kit(&kit, &pin("kit-a"), &withheld).unwrap();
    assert!(verified.entries.contains(&KitEntry::Withheld {
        path: "startup/client.key".to_string()
    }));
    assert!(verified
        .listing()
        .contains("\nwithheld startup/client.key\n"));
    assert_eq!(verified.counts().2, 1);
    // A withheld path that the kit does not sign is a mistake in the policy.
    let unknown = vec!["startup/server.key".to_string()];
    let (_dir2, kit2) = copy_of("kit-a");
    assert_one_problem(&kit2, &unknown, "startup/server.key", "no signature.json");
}

#[test]
fn a_copied_signature_entry_is_refused() {
    // signature.json is not signed: moving start.sh's bytes and entry to stop_fl.sh passes
    // FLARE's check; the reused signature gives it away.
    let (_dir, kit) = copy_of("kit-a");
    let startup = kit.join("startup");
    fs::copy(startup.join("start.sh"), startup.join("stop_fl.sh")).unwrap();
    let sigs = startup.join(SIGNATURE_FILE);
    let mut map: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&fs::read(&sigs).unwrap()).unwrap();
    let start = map["start.sh"].clone();
    map.insert("stop_fl.sh".to_string(), start);
    fs::write(&sigs, serde_json::to_vec(&map).unwrap()).unwrap();
    let text = assert_one_problem(&kit, &[], "startup/stop_fl.sh", "startup/start.sh");
    assert!(text.contains("copied"), "{text}");
}

#[test]
fn a_submitter_certificate_is_an_unsigned_file() {
    let (_dir, kit) = copy_of("kit-a");
    fs::write(kit.join("local").join(SUBMITTER_CERT_FILE), "cert").unwrap();
    assert_one_problem(&kit, &[], "local/.__nvfl_submitter.crt", "never holds one");
}

#[test]
fn a_directory_without_signatures_is_refused() {
    let (_dir, kit) = copy_of("kit-a");
    fs::remove_file(kit.join("transfer/signature.json")).unwrap();
    assert_one_problem(&kit, &[], "transfer/signature.json", "missing");
    let (_dir2, kit2) = copy_of("kit-a");
    fs::write(kit2.join("local/signature.json"), "[]").unwrap();
    assert_one_problem(&kit2, &[], "local/signature.json", "not a JSON object");
}

#[test]
fn every_problem_is_named_in_path_order() {
    let (_dir, kit) = copy_of("kit-a");
    fs::write(kit.join("startup/start.sh"), "#!/bin/sh\nexit 0\n").unwrap();
    fs::write(kit.join("local/added"), "x").unwrap();
    fs::remove_file(kit.join("readme.txt")).unwrap();
    let (problems, _) = problems(&kit, &pin("kit-a"), &[]);
    let paths: Vec<&str> = problems.iter().map(|p| p.path.as_str()).collect();
    assert_eq!(paths, ["local/added", "readme.txt", "startup/start.sh"]);
}

#[test]
fn the_startup_folder_alone_is_refused_with_a_hint() {
    let error = verify_kit(&data().join("kit-a/site-1/startup"), &pin("kit-a"), &[]).unwrap_err();
    let text = error.to_string();
    assert!(matches!(error, KitError::NoRootCa { .. }), "{text}");
    assert!(text.contains("participant folder above it"), "{text}");
}

#[test]
fn a_root_ca_file_that_is_not_one_certificate_is_refused() {
    let one = fs::read(data().join("kit-a/site-1/startup/rootCA.pem")).unwrap();
    let mut two = one.clone();
    two.extend_from_slice(&one);
    assert!(certificate_sha256(&two)
        .unwrap_err()
        .contains("2 PEM blocks"));
    let key = fs::read(data().join("kit-a/site-1/startup/client.key")).unwrap();
    assert!(certificate_sha256(&key)
        .unwrap_err()
        .contains("not a CERTIFICATE"));
    let (digest, der) = certificate_sha256(&one).unwrap();
    assert_eq!(digest, Digest::of(&der));
}

#[test]
fn a_signature_with_another_pss_salt_length_verifies_as_in_flare() {
    // FLARE signs with the maximum salt (222 bytes for its 2048-bit keys) but verifies with
    // PSS.MAX_LENGTH, which accepts any salt length; make-kits.py signed start.sh again with
    // kit-a's root key and a 32-byte salt.
    let vector: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&fs::read(data().join("kit-a.pss-salt32.json")).unwrap()).unwrap();
    let (_dir, kit) = copy_of("kit-a");
    let sigs = kit.join("startup").join(SIGNATURE_FILE);
    let mut map: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&fs::read(&sigs).unwrap()).unwrap();
    assert_ne!(map["start.sh"], vector["startup/start.sh"]);
    map.insert("start.sh".to_string(), vector["startup/start.sh"].clone());
    fs::write(&sigs, serde_json::to_vec(&map).unwrap()).unwrap();
    verify_kit(&kit, &pin("kit-a"), &[]).unwrap();
    // The same signature on other bytes fails whatever the salt length.
    fs::write(kit.join("startup/start.sh"), "#!/bin/sh\nexit 0\n").unwrap();
    assert_one_problem(&kit, &[], "startup/start.sh", "changed");
}
