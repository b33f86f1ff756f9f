//! The volume capability against real libcryptsetup and the real `cryptsetup` tool, on sparse
//! file images under /var/tmp. Needs root (libcryptsetup locking, loop devices, mount); fails
//! with a message when not root. Device-mapper is not needed: keys are checked the way
//! `cryptsetup open --test-passphrase` does (activation without a name). Opening a mapping
//! and the dm-integrity format are covered by the VM test.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;

use cvm_warden::policy::ResourceUri;
use cvm_warden::report::error_chain;
use cvm_warden::tool::{Tool, ToolError, Tools};
use cvm_warden::volume::{
    check_token, decide, fs_step, token_json, unlock, unlock_notified, Action, DeviceState,
    FormatProblem, FsStep, Integrity, KbsToken, MountOptions, Notice, RealVolumes, RootAttrs,
    TokenProblem, TokenState, VolumeError, VolumeKey, VolumeSpec, Volumes,
};
use rand_core::{OsRng, RngCore};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

const RES: &str = "kbs:///default/keys/workspace";
const IMAGE_SIZE: u64 = 64 * 1024 * 1024;
/// The root the tests' policies ask for (ids no real account has, a mode mkfs never writes).
const ROOT: RootAttrs = RootAttrs {
    uid: 4321,
    gid: 8765,
    mode: 0o750,
};

/// The one token a freshly formatted image holds, in `state`.
fn our_token(state: TokenState) -> Vec<KbsToken> {
    vec![KbsToken::new(RES, Some(state))]
}

fn require_root() {
    if !nix::unistd::geteuid().is_root() {
        panic!(
            "tests/volume_luks.rs needs root (libcryptsetup locking in /run/cryptsetup, loop \
             devices, mount): run `sudo -E cargo test --test volume_luks`"
        );
    }
}

fn uri(text: &str) -> ResourceUri {
    ResourceUri::parse(text).unwrap()
}

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("cvm-warden-luks-")
        .tempdir_in("/var/tmp")
        .unwrap()
}

fn blank_image(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    File::create(&path).unwrap().set_len(IMAGE_SIZE).unwrap();
    path
}

fn random_key(len: usize) -> Zeroizing<Vec<u8>> {
    let mut bytes = Zeroizing::new(vec![0u8; len]);
    OsRng.fill_bytes(&mut bytes);
    bytes
}

fn volume_key(bytes: &[u8], resource: &str) -> VolumeKey {
    VolumeKey::new(Zeroizing::new(bytes.to_vec()), uri(resource)).unwrap()
}

/// A key file for the `cryptsetup` tool (test data only), mode 0600.
fn key_file(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .unwrap();
    file.write_all(bytes).unwrap();
    path
}

fn digest(path: &Path) -> [u8; 32] {
    let mut hasher = Sha256::new();
    let mut file = File::open(path).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    hasher.finalize().into()
}

fn run(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"))
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Formats a blank image the way the first boot does; returns the key bytes.
fn formatted_image(vols: &RealVolumes, image: &Path, resource: &str) -> Zeroizing<Vec<u8>> {
    let bytes = random_key(32);
    let state = vols.inspect(image).unwrap();
    assert_eq!(state, DeviceState::Blank);
    assert_eq!(decide(image, &state, true), Ok(Action::FormatThenUnlock));
    let slot = vols
        .format(image, &volume_key(&bytes, resource), None)
        .unwrap();
    assert_eq!(slot, 0);
    bytes
}

#[test]
fn format_if_blank_formats_and_the_key_verifies() {
    require_root();
    let dir = tempdir();
    let image = blank_image(dir.path(), "blank.img");
    let vols = RealVolumes::new();
    let bytes = formatted_image(&vols, &image, RES);

    assert_eq!(vols.inspect(&image).unwrap(), DeviceState::Luks2);
    // The header says exactly what cvm-warden formats, for a policy without integrity only.
    vols.check_format(&image, None).unwrap();
    let err = vols
        .check_format(&image, Some(Integrity::HmacSha256))
        .unwrap_err();
    let problem = header_problem(&err);
    assert_eq!(
        (problem.field.as_str(), problem.found.as_str()),
        ("integrity", "none")
    );
    assert_eq!(
        vols.token_resources(&image).unwrap(),
        our_token(TokenState::Initialising)
    );
    assert_eq!(
        vols.verify_key(&image, &volume_key(&bytes, RES)).unwrap(),
        0
    );
    // A second format of the now-LUKS2 image is refused and leaves it as it is.
    let before = digest(&image);
    let err = vols
        .format(&image, &volume_key(&random_key(32), RES), None)
        .unwrap_err();
    assert!(
        err.to_string().contains("already has a LUKS2 header"),
        "{err}"
    );
    assert_eq!(digest(&image), before);
}

#[test]
fn a_wrong_key_fails_with_a_clear_error() {
    require_root();
    let dir = tempdir();
    let image = blank_image(dir.path(), "wrong.img");
    let vols = RealVolumes::new();
    let _bytes = formatted_image(&vols, &image, RES);
    let err = vols
        .verify_key(&image, &volume_key(&random_key(32), RES))
        .unwrap_err();
    assert!(matches!(err, VolumeError::KeyRejected { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!(
            "the key released for {RES} opens no keyslot of {}: the broker holds a different \
             key than the one this volume was formatted with; check the broker resource (a \
             rotated key must be added with `cryptsetup luksAddKey` first)",
            image.display()
        )
    );
}

#[test]
fn luks_dump_shows_the_token_the_resource_and_the_format() {
    require_root();
    let dir = tempdir();
    let image = blank_image(dir.path(), "dump.img");
    let vols = RealVolumes::new();
    let _bytes = formatted_image(&vols, &image, RES);

    let out = run("cryptsetup", &["luksDump", path_str(&image)]);
    let dump = text(&out);
    assert!(out.status.success(), "{dump}");
    assert!(dump.contains("Version:       \t2"), "{dump}");
    // The label names the resource and the subsystem says who wrote it.
    assert!(
        dump.contains(&format!("Label:         \t{RES}\n")),
        "{dump}"
    );
    assert!(dump.contains("Subsystem:     \tcvm-warden\n"), "{dump}");
    // cryptsetup prints an external token's type and keyslots; its other members (the
    // resource) only with --dump-json-metadata (below).
    assert!(
        dump.contains("Tokens:\n  0: cvm-warden-kbs\n\tKeyslot:    0\n"),
        "{dump}"
    );
    assert!(dump.contains("aes-xts-plain64"), "{dump}");
    assert!(dump.contains("sector: 4096 [bytes]"), "{dump}");
    assert!(dump.contains("Cipher key: 512 bits"), "{dump}");
    assert!(dump.contains("PBKDF:      pbkdf2"), "{dump}");
    assert!(dump.contains("Hash:       sha256"), "{dump}");
    assert!(dump.contains("Iterations: 1000\n"), "{dump}");
    assert!(!dump.contains("argon2"), "{dump}");

    let out = run(
        "cryptsetup",
        &["luksDump", "--dump-json-metadata", path_str(&image)],
    );
    assert!(out.status.success(), "{}", text(&out));
    let metadata: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        metadata["tokens"]["0"],
        serde_json::json!({"type":"cvm-warden-kbs","keyslots":["0"],"resource":RES,
            "state":"initialising"})
    );

    // The token JSON itself, as `cryptsetup token export` prints it.
    let out = run(
        "cryptsetup",
        &["token", "export", "--token-id", "0", path_str(&image)],
    );
    assert!(out.status.success(), "{}", text(&out));
    let token: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        token,
        serde_json::json!({"type":"cvm-warden-kbs","keyslots":["0"],"resource":RES,
            "state":"initialising"})
    );
}

#[test]
fn cryptsetup_test_passphrase_accepts_the_key_and_rejects_another() {
    require_root();
    let dir = tempdir();
    let image = blank_image(dir.path(), "tool.img");
    let vols = RealVolumes::new();
    let bytes = formatted_image(&vols, &image, RES);

    let good = key_file(dir.path(), "good.key", &bytes);
    let out = run(
        "cryptsetup",
        &[
            "open",
            "--test-passphrase",
            "--key-file",
            path_str(&good),
            path_str(&image),
        ],
    );
    assert!(out.status.success(), "{}", text(&out));

    let bad = key_file(dir.path(), "bad.key", &random_key(32));
    let out = run(
        "cryptsetup",
        &[
            "open",
            "--test-passphrase",
            "--key-file",
            path_str(&bad),
            path_str(&image),
        ],
    );
    assert!(!out.status.success(), "a wrong key file was accepted");
}

#[test]
fn one_nonzero_byte_without_header_is_refused_and_the_image_is_unchanged() {
    require_root();
    let dir = tempdir();
    let image = blank_image(dir.path(), "data.img");
    {
        let mut file = OpenOptions::new().write(true).open(&image).unwrap();
        file.seek(SeekFrom::Start(1000)).unwrap();
        file.write_all(&[0x01]).unwrap();
    }
    let before = digest(&image);
    let vols = RealVolumes::new();
    let want = format!(
        "refusing to format {}: it holds data but no LUKS2 header",
        image.display()
    );

    let state = vols.inspect(&image).unwrap();
    assert_eq!(
        state,
        DeviceState::HoldsData {
            first_nonzero: 1000
        }
    );
    for allow in [true, false] {
        assert_eq!(decide(&image, &state, allow).unwrap_err().to_string(), want);
    }
    // The whole flow, and a direct format call, refuse with the exact message.
    let spec = VolumeSpec {
        name: "data".to_string(),
        device: image.clone(),
        resource: uri(RES),
        mountpoint: dir.path().join("mnt"),
        format_if_blank: true,
        integrity: None,
        mount: MountOptions { noexec: true },
        root: ROOT,
    };
    let key = volume_key(&random_key(32), RES);
    assert_eq!(unlock(&vols, &spec, &key).unwrap_err().to_string(), want);
    assert_eq!(
        vols.format(&image, &key, None).unwrap_err().to_string(),
        want
    );

    assert_eq!(digest(&image), before, "the image changed");
    assert_eq!(std::fs::metadata(&image).unwrap().len(), IMAGE_SIZE);
}

#[test]
fn blank_image_without_format_if_blank_is_refused_and_unchanged() {
    require_root();
    let dir = tempdir();
    let image = blank_image(dir.path(), "blank-no.img");
    let before = digest(&image);
    let vols = RealVolumes::new();
    let spec = VolumeSpec {
        name: "blank".to_string(),
        device: image.clone(),
        resource: uri(RES),
        mountpoint: dir.path().join("mnt"),
        format_if_blank: false,
        integrity: None,
        mount: MountOptions { noexec: true },
        root: ROOT,
    };
    let err = unlock(&vols, &spec, &volume_key(&random_key(32), RES)).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "{} is blank; set format_if_blank = true to format it on first boot",
            image.display()
        )
    );
    assert_eq!(digest(&image), before);
    assert!(!dir.path().join("mnt").exists());
}

#[test]
fn luks1_image_is_refused_and_unchanged() {
    require_root();
    let dir = tempdir();
    let image = blank_image(dir.path(), "luks1.img");
    let keyfile = key_file(dir.path(), "luks1.key", &random_key(32));
    let out = run(
        "cryptsetup",
        &[
            "luksFormat",
            "--batch-mode",
            "--type",
            "luks1",
            "--pbkdf-force-iterations",
            "1000",
            "--key-file",
            path_str(&keyfile),
            path_str(&image),
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let before = digest(&image);
    let vols = RealVolumes::new();

    let state = vols.inspect(&image).unwrap();
    assert_eq!(state, DeviceState::Luks1);
    let err = decide(&image, &state, true).unwrap_err().to_string();
    assert!(
        err.starts_with(&format!(
            "refusing to use {}: it has a LUKS1 header",
            image.display()
        )),
        "{err}"
    );
    assert!(err.contains("cryptsetup convert --type luks2"), "{err}");
    let key = volume_key(&random_key(32), RES);
    assert_eq!(
        vols.format(&image, &key, None).unwrap_err().to_string(),
        err
    );
    assert_eq!(digest(&image), before);
}

#[test]
fn token_mismatch_is_refused_naming_both_resources() {
    require_root();
    let dir = tempdir();
    let image = blank_image(dir.path(), "mismatch.img");
    let vols = RealVolumes::new();
    let other = "kbs:///default/keys/other";
    let bytes = formatted_image(&vols, &image, other);
    let before = digest(&image);

    let found = vols.token_resources(&image).unwrap();
    let problem = check_token(&image, &found, &uri(RES)).unwrap_err();
    assert!(matches!(problem, TokenProblem::Mismatch { .. }));

    // Through the whole flow: refused before the key is tried or anything is opened.
    let spec = VolumeSpec {
        name: "mismatch".to_string(),
        device: image.clone(),
        resource: uri(RES),
        mountpoint: dir.path().join("mnt"),
        format_if_blank: true,
        integrity: None,
        mount: MountOptions { noexec: true },
        root: ROOT,
    };
    let err = unlock(&vols, &spec, &volume_key(&bytes, RES)).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "the LUKS2 token of {} names broker resource {other} but the policy names {RES}; \
             the volume was formatted for another key: fix the volume's `key` in the policy or \
             point it at the right device",
            image.display()
        )
    );
    assert_eq!(digest(&image), before);
}

#[test]
fn integrity_format_needs_device_mapper_and_writes_nothing_without_it() {
    require_root();
    let dir = tempdir();
    let image = blank_image(dir.path(), "integrity.img");
    let no_dm = dir.path().join("no-mapper");
    std::fs::create_dir(&no_dm).unwrap();
    let vols = RealVolumes::with_paths(Tools::system(), no_dm.clone());
    let before = digest(&image);
    let err = vols
        .format(
            &image,
            &volume_key(&random_key(32), RES),
            Some(Integrity::HmacSha256),
        )
        .unwrap_err();
    assert!(matches!(err, VolumeError::NoDeviceMapper { .. }), "{err:?}");
    assert!(
        err.to_string()
            .contains(&no_dm.join("control").display().to_string()),
        "{err}"
    );
    assert_eq!(digest(&image), before);
}

/// Detaches the loop device and unmounts when dropped.
struct Loop {
    device: String,
    mounted: Option<PathBuf>,
}

impl Drop for Loop {
    fn drop(&mut self) {
        if let Some(target) = &self.mounted {
            let _ = nix::mount::umount(target.as_path());
        }
        let _ = run("losetup", &["-d", &self.device]);
    }
}

#[test]
fn mkfs_ext4_then_mount_sets_nosuid_nodev_and_noexec_and_the_root_owner_and_mode() {
    require_root();
    let dir = tempdir();
    let image = blank_image(dir.path(), "fs.img");
    let vols = RealVolumes::new();
    vols.mkfs_ext4(&image, ROOT.uid, ROOT.gid).unwrap();
    let out = run("dumpe2fs", &["-h", path_str(&image)]);
    assert!(
        text(&out).contains("Filesystem magic number:  0xEF53"),
        "{}",
        text(&out)
    );

    for noexec in [true, false] {
        let out = run("losetup", &["--find", "--show", path_str(&image)]);
        assert!(out.status.success(), "{}", text(&out));
        let mut lo = Loop {
            device: String::from_utf8_lossy(&out.stdout).trim().to_string(),
            mounted: None,
        };
        let target = dir.path().join(format!("mnt-{noexec}"));
        let root = vols
            .mount(Path::new(&lo.device), &target, MountOptions { noexec })
            .unwrap();
        lo.mounted = Some(target.clone());
        if noexec {
            // mkfs.ext4 -E root_owner gave the root its owner; its mode is mke2fs's 0755.
            assert_eq!(
                root,
                RootAttrs {
                    mode: 0o755,
                    ..ROOT
                }
            );
            assert_eq!(vols.set_root_mode(&target, ROOT.mode).unwrap(), ROOT);
        } else {
            // The mode set (and synced) on the first mount is still there.
            assert_eq!(root, ROOT);
        }
        let meta = std::fs::metadata(&target).unwrap();
        assert_eq!(
            (meta.uid(), meta.gid(), meta.mode() & 0o7777),
            (ROOT.uid, ROOT.gid, ROOT.mode)
        );
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let line = mountinfo
            .lines()
            .find(|l| l.split(' ').nth(4) == Some(path_str(&target)))
            .unwrap_or_else(|| panic!("{} not in mountinfo", target.display()));
        let options: Vec<&str> = line.split(' ').nth(5).unwrap().split(',').collect();
        assert!(options.contains(&"nosuid"), "{line}");
        assert!(options.contains(&"nodev"), "{line}");
        assert_eq!(options.contains(&"noexec"), noexec, "{line}");
        assert!(line.contains(" - ext4 "), "{line}");
        vols.unmount(&target).unwrap();
        lo.mounted = None;
        assert!(!std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .contains(path_str(&target)));
    }
}

#[test]
fn mkfs_failure_names_the_tool_and_device() {
    require_root();
    let dir = tempdir();
    let missing = dir.path().join("no-such-mkfs");
    let vols = RealVolumes::with_paths(
        Tools::system().with_candidates(Tool::MkfsExt4, [missing.clone()]),
        "/dev/mapper".into(),
    );
    let image = blank_image(dir.path(), "nomkfs.img");
    let err = vols.mkfs_ext4(&image, 0, 0).unwrap_err();
    assert!(matches!(err, VolumeError::MkfsSpawn { .. }), "{err:?}");
    let text = error_chain(&err);
    assert!(text.contains(&image.display().to_string()), "{text}");
    assert!(
        text.contains(&format!("tried {} (not found)", missing.display())),
        "{text}"
    );
    assert!(text.contains("e2fsprogs"), "{text}");

    // A device mkfs.ext4 cannot use (a directory): its stderr is reported.
    let vols = RealVolumes::new();
    let err = vols.mkfs_ext4(dir.path(), 0, 0).unwrap_err();
    assert!(matches!(err, VolumeError::Mkfs { .. }), "{err:?}");
}

#[test]
fn a_hanging_mkfs_fails_within_its_timeout() {
    let dir = tempdir();
    // Written by install(1), not by this multi-threaded process (ETXTBSY).
    let draft = dir.path().join("draft");
    std::fs::write(&draft, "#!/bin/sh\nexec sleep 100000\n").unwrap();
    let fake = dir.path().join("mkfs.ext4");
    assert!(Command::new("/usr/bin/install")
        .args(["-m", "0755"])
        .arg(&draft)
        .arg(&fake)
        .status()
        .unwrap()
        .success());
    let vols = RealVolumes::with_paths(
        Tools::system()
            .with_candidates(Tool::MkfsExt4, [&fake])
            .with_timeout(Tool::MkfsExt4, std::time::Duration::from_millis(300)),
        "/dev/mapper".into(),
    );
    let started = std::time::Instant::now();
    let err = vols.mkfs_ext4(&dir.path().join("image"), 0, 0).unwrap_err();
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    match &err {
        VolumeError::MkfsSpawn { source, .. } => {
            assert!(matches!(source, ToolError::Timeout { .. }), "{source:?}")
        }
        other => panic!("{other:?}"),
    }
    assert!(
        error_chain(&err).contains("did not finish within 300 ms"),
        "{}",
        error_chain(&err)
    );
}

fn import_token(dir: &Path, image: &Path, name: &str, json: &str) {
    let file = dir.join(name);
    std::fs::write(&file, json).unwrap();
    let out = run(
        "cryptsetup",
        &[
            "token",
            "import",
            "--json-file",
            path_str(&file),
            path_str(image),
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn foreign_tokens_are_ignored_and_malformed_or_ambiguous_ones_fail_closed() {
    require_root();
    let dir = tempdir();
    let vols = RealVolumes::new();

    // Another tool's token next to ours changes nothing.
    let image = blank_image(dir.path(), "foreign.img");
    let _bytes = formatted_image(&vols, &image, RES);
    import_token(
        dir.path(),
        &image,
        "foreign.json",
        r#"{"type":"some-other-tool","keyslots":[],"resource":"kbs:///default/keys/other"}"#,
    );
    assert_eq!(
        vols.token_resources(&image).unwrap(),
        our_token(TokenState::Initialising)
    );

    // A second cvm-warden-kbs token naming another resource: ambiguous.
    import_token(
        dir.path(),
        &image,
        "second.json",
        r#"{"type":"cvm-warden-kbs","keyslots":[],"resource":"kbs:///default/keys/other"}"#,
    );
    let found = vols.token_resources(&image).unwrap();
    let problem = check_token(&image, &found, &uri(RES)).unwrap_err();
    assert!(
        matches!(problem, TokenProblem::Ambiguous { .. }),
        "{problem}"
    );

    // A cvm-warden-kbs token without a string resource.
    let image = blank_image(dir.path(), "malformed.img");
    let _bytes = formatted_image(&vols, &image, RES);
    import_token(
        dir.path(),
        &image,
        "bad.json",
        r#"{"type":"cvm-warden-kbs","keyslots":[],"resource":5}"#,
    );
    let err = vols.token_resources(&image).unwrap_err();
    assert!(
        matches!(err, VolumeError::BadToken { id: 1, .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("not a string"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Headers cvm-warden did not write, or that a host rewrote, are refused before the key is tried.

fn header_problem(err: &VolumeError) -> &FormatProblem {
    match err {
        VolumeError::HeaderFormat(problem) => problem,
        other => panic!("expected a header format refusal, got {other:?}"),
    }
}

fn spec_for(image: &Path, dir: &Path, integrity: Option<Integrity>) -> VolumeSpec {
    VolumeSpec {
        name: "tampered".to_string(),
        device: image.to_path_buf(),
        resource: uri(RES),
        mountpoint: dir.join("mnt"),
        format_if_blank: true,
        integrity,
        mount: MountOptions { noexec: true },
        root: ROOT,
    }
}

/// `cryptsetup luksFormat --type luks2` with `cipher_args` and the keyslot cvm-warden writes
/// (PBKDF2, 1000 iterations, 4096-byte sectors), then the cvm-warden token imported.
fn foreign_luks2(dir: &Path, image: &Path, keyfile: &Path, cipher_args: &[&str]) {
    let mut args = vec![
        "luksFormat",
        "--batch-mode",
        "--type",
        "luks2",
        "--sector-size",
        "4096",
        "--pbkdf",
        "pbkdf2",
        "--pbkdf-force-iterations",
        "1000",
        "--key-file",
        path_str(keyfile),
    ];
    args.extend_from_slice(cipher_args);
    args.push(path_str(image));
    let out = run("cryptsetup", &args);
    assert!(out.status.success(), "{}", text(&out));
    import_token(
        dir,
        image,
        "token.json",
        &token_json(&uri(RES), 0, TokenState::Ready).to_string(),
    );
}

/// Asserts that the whole flow refuses `image` naming `field`, `found` and `expected`, before
/// the key is tried, and leaves the image as it was.
fn assert_refused(
    vols: &RealVolumes,
    dir: &Path,
    image: &Path,
    key: &[u8],
    (field, found, expected): (&str, &str, &str),
) {
    let before = digest(image);
    let err = unlock(vols, &spec_for(image, dir, None), &volume_key(key, RES)).unwrap_err();
    let problem = header_problem(&err);
    assert_eq!(
        (
            problem.device.as_path(),
            problem.field.as_str(),
            problem.found.as_str(),
            problem.expected.as_str()
        ),
        (image, field, found, expected),
        "{err}"
    );
    assert!(
        err.to_string().starts_with(&format!(
            "the LUKS2 header of {} says {field} {found}, cvm-warden formats {expected}: ",
            image.display()
        )),
        "{err}"
    );
    assert_eq!(digest(image), before, "the image changed");
    assert!(!dir.join("mnt").exists(), "the flow went past the check");
}

#[test]
fn another_cipher_is_refused_naming_the_cipher() {
    require_root();
    let dir = tempdir();
    let image = blank_image(dir.path(), "cbc.img");
    let bytes = random_key(32);
    let keyfile = key_file(dir.path(), "cbc.key", &bytes);
    foreign_luks2(
        dir.path(),
        &image,
        &keyfile,
        &["--cipher", "aes-cbc-essiv:sha256", "--key-size", "256"],
    );
    let vols = RealVolumes::new();
    // The key opens it and the token matches: only the format check stands in the way.
    assert_eq!(
        vols.token_resources(&image).unwrap(),
        our_token(TokenState::Ready)
    );
    assert_eq!(
        vols.verify_key(&image, &volume_key(&bytes, RES)).unwrap(),
        0
    );
    assert_refused(
        &vols,
        dir.path(),
        &image,
        &bytes,
        ("cipher", "aes-cbc-essiv:sha256", "aes-xts-plain64"),
    );
}

#[test]
fn a_256_bit_xts_key_is_refused_naming_the_key_size() {
    require_root();
    let dir = tempdir();
    let image = blank_image(dir.path(), "xts256.img");
    let bytes = random_key(32);
    let keyfile = key_file(dir.path(), "xts256.key", &bytes);
    foreign_luks2(
        dir.path(),
        &image,
        &keyfile,
        &["--cipher", "aes-xts-plain64", "--key-size", "256"],
    );
    let vols = RealVolumes::new();
    assert_eq!(
        vols.verify_key(&image, &volume_key(&bytes, RES)).unwrap(),
        0
    );
    assert_refused(
        &vols,
        dir.path(),
        &image,
        &bytes,
        ("volume key size (keyslot 0)", "32 bytes", "64 bytes"),
    );
}

#[test]
fn a_key_added_with_cryptsetup_defaults_still_passes_the_check() {
    require_root();
    let dir = tempdir();
    let image = blank_image(dir.path(), "addkey.img");
    let vols = RealVolumes::new();
    let bytes = formatted_image(&vols, &image, RES);
    let old = key_file(dir.path(), "old.key", &bytes);
    let new = key_file(dir.path(), "new.key", &random_key(32));
    let out = run(
        "cryptsetup",
        &[
            "luksAddKey",
            "--batch-mode",
            "--pbkdf",
            "pbkdf2",
            "--pbkdf-force-iterations",
            "1000",
            "--key-file",
            path_str(&old),
            path_str(&image),
            path_str(&new),
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    vols.check_format(&image, None).unwrap();
}

// The LUKS2 binary header (cryptsetup's `struct luks2_hdr_disk`): big-endian `hdr_size` at 8,
// the checksum (SHA-256 over `hdr_size` bytes with the checksum field zeroed) at 448, the JSON
// metadata from 4096 to `hdr_size`. The secondary header starts at `hdr_size`.
const HDR_SIZE_AT: usize = 8;
const CSUM_AT: usize = 448;
const JSON_AT: usize = 4096;

/// Rewrites the JSON metadata of both LUKS2 headers of `image` with `change` and recomputes
/// their checksums, as a host that controls the disk can.
fn rewrite_header(image: &Path, change: impl Fn(&mut serde_json::Value)) {
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(image)
        .unwrap();
    let mut first = [0u8; 16];
    file.read_exact(&mut first).unwrap();
    let hdr_size = u64::from_be_bytes(first[HDR_SIZE_AT..HDR_SIZE_AT + 8].try_into().unwrap());
    for offset in [0, hdr_size] {
        let mut hdr = vec![0u8; hdr_size as usize];
        file.seek(SeekFrom::Start(offset)).unwrap();
        file.read_exact(&mut hdr).unwrap();
        let json_area = &hdr[JSON_AT..];
        let end = json_area.iter().position(|&b| b == 0).unwrap();
        let mut metadata: serde_json::Value = serde_json::from_slice(&json_area[..end]).unwrap();
        change(&mut metadata);
        let json = serde_json::to_vec(&metadata).unwrap();
        assert!(
            json.len() < hdr.len() - JSON_AT,
            "the metadata grew too large"
        );
        hdr[JSON_AT..].fill(0);
        hdr[JSON_AT..JSON_AT + json.len()].copy_from_slice(&json);
        hdr[CSUM_AT..CSUM_AT + 64].fill(0);
        let csum = Sha256::digest(&hdr);
        hdr[CSUM_AT..CSUM_AT + 32].copy_from_slice(&csum);
        file.seek(SeekFrom::Start(offset)).unwrap();
        file.write_all(&hdr).unwrap();
    }
    file.sync_all().unwrap();
}

#[test]
fn a_header_rewritten_to_cipher_null_is_refused_though_the_key_still_opens_it() {
    require_root();
    let dir = tempdir();
    let image = blank_image(dir.path(), "null.img");
    let vols = RealVolumes::new();
    let bytes = formatted_image(&vols, &image, RES);
    rewrite_header(&image, |meta| {
        meta["segments"]["0"]["encryption"] = "cipher_null-ecb".into();
    });
    // libcryptsetup accepts the rewritten header: the checksum is valid, the keyslot still
    // opens with the broker key and the token still matches.
    let out = run("cryptsetup", &["luksDump", path_str(&image)]);
    assert!(text(&out).contains("cipher_null-ecb"), "{}", text(&out));
    assert_eq!(
        vols.token_resources(&image).unwrap(),
        our_token(TokenState::Initialising)
    );
    assert_eq!(
        vols.verify_key(&image, &volume_key(&bytes, RES)).unwrap(),
        0
    );
    assert_refused(
        &vols,
        dir.path(),
        &image,
        &bytes,
        ("cipher", "cipher_null-ecb", "aes-xts-plain64"),
    );
    assert_eq!(
        unlock(
            &vols,
            &spec_for(&image, dir.path(), None),
            &volume_key(&bytes, RES)
        )
        .unwrap_err()
        .to_string(),
        format!(
            "the LUKS2 header of {0} says cipher cipher_null-ecb, cvm-warden formats \
             aes-xts-plain64: the header was changed or does not match the policy, so the \
             volume is not opened; restore the header from a backup (`cryptsetup \
             luksHeaderRestore {0} --header-backup-file <file>`) or reformat the volume",
            image.display()
        )
    );
}

#[test]
fn a_keyslot_area_rewritten_to_cipher_null_is_refused() {
    require_root();
    let dir = tempdir();
    let image = blank_image(dir.path(), "null-slot.img");
    let vols = RealVolumes::new();
    let bytes = formatted_image(&vols, &image, RES);
    rewrite_header(&image, |meta| {
        meta["keyslots"]["0"]["area"]["encryption"] = "cipher_null-ecb".into();
    });
    assert_refused(
        &vols,
        dir.path(),
        &image,
        &bytes,
        (
            "keyslot 0 area cipher",
            "cipher_null-ecb",
            "aes-xts-plain64",
        ),
    );
}

#[test]
fn integrity_dropped_from_the_policy_or_the_header_is_refused() {
    require_root();
    let dir = tempdir();
    let image = blank_image(dir.path(), "hmac.img");
    let vols = RealVolumes::new();
    let bytes = formatted_image(&vols, &image, RES);
    // The policy asks for integrity; the header (cvm-warden's, without) has none.
    let err = unlock(
        &vols,
        &spec_for(&image, dir.path(), Some(Integrity::HmacSha256)),
        &volume_key(&bytes, RES),
    )
    .unwrap_err();
    let problem = header_problem(&err);
    assert_eq!(
        (
            problem.field.as_str(),
            problem.found.as_str(),
            problem.expected.as_str()
        ),
        (
            "integrity",
            "none",
            "hmac(sha256) for the policy's integrity = \"hmac-sha256\""
        )
    );
}

// ---------------------------------------------------------------------------------------------
// Volume states: `initialising` at luksFormat, `ready` once the file system and its root are
// made; an interrupted first boot is resumed, a ready volume never gets a new file system.

/// Exports token `id` of `image` as `cryptsetup token export` prints it.
fn export_token(image: &Path, id: u32) -> serde_json::Value {
    let out = run(
        "cryptsetup",
        &[
            "token",
            "export",
            "--token-id",
            &id.to_string(),
            path_str(image),
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn the_token_says_initialising_after_format_and_ready_once_set() {
    require_root();
    let dir = tempdir();
    let image = blank_image(dir.path(), "state.img");
    let vols = RealVolumes::new();
    let bytes = formatted_image(&vols, &image, RES);
    // Another tool's token next to ours is left alone.
    import_token(
        dir.path(),
        &image,
        "foreign.json",
        r#"{"type":"some-other-tool","keyslots":[],"state":"whatever"}"#,
    );
    assert_eq!(
        vols.token_resources(&image).unwrap(),
        our_token(TokenState::Initialising)
    );

    // The interrupted first boot: the header and the `initialising` token are on disk, the
    // file system is not. The decision on the next boot: unlock, then make the file system.
    let state = vols.inspect(&image).unwrap();
    let action = decide(&image, &state, true).unwrap();
    assert_eq!(action, Action::Unlock);
    let tokens = vols.token_resources(&image).unwrap();
    let token_state = check_token(&image, &tokens, &uri(RES)).unwrap();
    assert_eq!(token_state, TokenState::Initialising);
    assert_eq!(fs_step(action, token_state), FsStep::Resume);

    vols.set_token_state(&image, TokenState::Ready).unwrap();
    assert_eq!(
        vols.token_resources(&image).unwrap(),
        our_token(TokenState::Ready)
    );
    // Only the state changed; the key, the header format and the other token are as before.
    assert_eq!(
        export_token(&image, 0),
        serde_json::json!({"type":"cvm-warden-kbs","keyslots":["0"],"resource":RES,
            "state":"ready"})
    );
    assert_eq!(
        export_token(&image, 1),
        serde_json::json!({"type":"some-other-tool","keyslots":[],"state":"whatever"})
    );
    vols.check_format(&image, None).unwrap();
    assert_eq!(
        vols.verify_key(&image, &volume_key(&bytes, RES)).unwrap(),
        0
    );
    let tokens = vols.token_resources(&image).unwrap();
    let token_state = check_token(&image, &tokens, &uri(RES)).unwrap();
    assert_eq!(fs_step(Action::Unlock, token_state), FsStep::Use);
}

#[test]
fn a_token_written_before_volume_states_reads_as_ready() {
    require_root();
    let dir = tempdir();
    let image = blank_image(dir.path(), "legacy.img");
    let vols = RealVolumes::new();
    let _bytes = formatted_image(&vols, &image, RES);
    let out = run(
        "cryptsetup",
        &["token", "remove", "--token-id", "0", path_str(&image)],
    );
    assert!(out.status.success(), "{}", text(&out));
    import_token(
        dir.path(),
        &image,
        "legacy.json",
        &format!(r#"{{"type":"cvm-warden-kbs","keyslots":["0"],"resource":"{RES}"}}"#),
    );
    let tokens = vols.token_resources(&image).unwrap();
    assert_eq!(tokens, vec![KbsToken::new(RES, None)]);
    let token_state = check_token(&image, &tokens, &uri(RES)).unwrap();
    assert_eq!(token_state, TokenState::Ready);
    assert_eq!(fs_step(Action::Unlock, token_state), FsStep::Use);

    // A state this build does not know fails closed.
    let out = run(
        "cryptsetup",
        &["token", "remove", "--token-id", "0", path_str(&image)],
    );
    assert!(out.status.success(), "{}", text(&out));
    import_token(
        dir.path(),
        &image,
        "future.json",
        &format!(
            r#"{{"type":"cvm-warden-kbs","keyslots":["0"],"resource":"{RES}","state":"resizing"}}"#
        ),
    );
    let err = vols.token_resources(&image).unwrap_err();
    assert!(matches!(err, VolumeError::BadToken { .. }), "{err:?}");
    assert!(
        err.to_string()
            .contains(r#"its "state" is "resizing", neither "initialising" nor "ready""#),
        "{err}"
    );
    let err = vols.set_token_state(&image, TokenState::Ready).unwrap_err();
    assert!(matches!(err, VolumeError::BadToken { .. }), "{err:?}");
}

/// [`RealVolumes`] for everything but the dm-crypt mapping, which this host cannot create (no
/// device-mapper): `open` checks the header format and the key as the real one does, then
/// stands a loop device over a plain image in for the mapped (decrypted) device; `close`
/// detaches it. The LUKS2 header, its token states, mkfs.ext4, mount(2), the root's owner and
/// mode, syncfs and umount(2) are all real.
struct LoopMapped {
    real: RealVolumes,
    plain: PathBuf,
    state: Mutex<(Option<String>, Option<PathBuf>)>,
}

impl LoopMapped {
    fn new(real: RealVolumes, plain: &Path) -> Self {
        Self {
            real,
            plain: plain.to_path_buf(),
            state: Mutex::new((None, None)),
        }
    }
}

impl Drop for LoopMapped {
    fn drop(&mut self) {
        let (lo, mounted) = &*self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(target) = mounted {
            let _ = nix::mount::umount(target.as_path());
        }
        if let Some(lo) = lo {
            let _ = run("losetup", &["-d", lo]);
        }
    }
}

impl Volumes for LoopMapped {
    fn inspect(&self, device: &Path) -> Result<DeviceState, VolumeError> {
        self.real.inspect(device)
    }
    fn format(
        &self,
        device: &Path,
        key: &VolumeKey,
        integrity: Option<Integrity>,
    ) -> Result<u32, VolumeError> {
        self.real.format(device, key, integrity)
    }
    fn check_format(&self, device: &Path, integrity: Option<Integrity>) -> Result<(), VolumeError> {
        self.real.check_format(device, integrity)
    }
    fn token_resources(&self, device: &Path) -> Result<Vec<KbsToken>, VolumeError> {
        self.real.token_resources(device)
    }
    fn set_token_state(&self, device: &Path, state: TokenState) -> Result<(), VolumeError> {
        self.real.set_token_state(device, state)
    }
    fn verify_key(&self, device: &Path, key: &VolumeKey) -> Result<u32, VolumeError> {
        self.real.verify_key(device, key)
    }
    fn open(
        &self,
        device: &Path,
        _name: &str,
        key: &VolumeKey,
        integrity: Option<Integrity>,
    ) -> Result<PathBuf, VolumeError> {
        self.real.check_format(device, integrity)?;
        self.real.verify_key(device, key)?;
        let out = run("losetup", &["--find", "--show", path_str(&self.plain)]);
        assert!(out.status.success(), "{}", text(&out));
        let lo = String::from_utf8_lossy(&out.stdout).trim().to_string();
        self.state.lock().unwrap().0 = Some(lo.clone());
        Ok(PathBuf::from(lo))
    }
    fn close(&self, _name: &str) -> Result<(), VolumeError> {
        if let Some(lo) = self.state.lock().unwrap().0.take() {
            let out = run("losetup", &["-d", &lo]);
            assert!(out.status.success(), "{}", text(&out));
        }
        Ok(())
    }
    fn mkfs_ext4(&self, mapped: &Path, uid: u32, gid: u32) -> Result<(), VolumeError> {
        self.real.mkfs_ext4(mapped, uid, gid)
    }
    fn mount(
        &self,
        mapped: &Path,
        mountpoint: &Path,
        options: MountOptions,
    ) -> Result<RootAttrs, VolumeError> {
        let root = self.real.mount(mapped, mountpoint, options)?;
        self.state.lock().unwrap().1 = Some(mountpoint.to_path_buf());
        Ok(root)
    }
    fn set_root_mode(&self, mountpoint: &Path, mode: u32) -> Result<RootAttrs, VolumeError> {
        self.real.set_root_mode(mountpoint, mode)
    }
    fn unmount(&self, mountpoint: &Path) -> Result<(), VolumeError> {
        self.real.unmount(mountpoint)?;
        self.state.lock().unwrap().1 = None;
        Ok(())
    }
}

/// A runner whose mkfs.ext4 does not exist: a boot that stops (fails) right before mkfs, or
/// proof that a later boot never runs it.
fn no_mkfs(dir: &Path) -> RealVolumes {
    RealVolumes::with_paths(
        Tools::system().with_candidates(Tool::MkfsExt4, [dir.join("no-such-mkfs")]),
        "/dev/mapper".into(),
    )
}

/// Runs the whole flow, recording the notices; unmounts and closes after a success.
fn boot(
    vols: &LoopMapped,
    spec: &VolumeSpec,
    key: &[u8],
) -> (
    Result<cvm_warden::volume::Unlocked, VolumeError>,
    Vec<Notice>,
) {
    let mut notices = Vec::new();
    let result = unlock_notified(vols, spec, &volume_key(key, RES), &mut |n| {
        notices.push(n);
        Ok(())
    });
    (result, notices)
}

fn shut_down(vols: &LoopMapped, spec: &VolumeSpec) {
    vols.unmount(&spec.mountpoint).unwrap();
    vols.close(&spec.name).unwrap();
}

#[test]
fn an_interrupted_first_boot_is_resumed_and_a_ready_volume_is_only_mounted() {
    require_root();
    let dir = tempdir();
    let image = blank_image(dir.path(), "luks.img");
    // What the mapping would show: all zeros until mkfs.ext4 writes to it.
    let plain = blank_image(dir.path(), "plain.img");
    let bytes = random_key(32);
    let spec = VolumeSpec {
        name: "workspace".to_string(),
        device: image.clone(),
        resource: uri(RES),
        mountpoint: dir.path().join("mnt"),
        format_if_blank: true,
        integrity: None,
        mount: MountOptions { noexec: true },
        root: ROOT,
    };

    // Boot 1: luksFormat, then the boot stops where mkfs.ext4 should run.
    let vols = LoopMapped::new(no_mkfs(dir.path()), &plain);
    let (result, notices) = boot(&vols, &spec, &bytes);
    let err = result.unwrap_err();
    assert!(matches!(err, VolumeError::MkfsSpawn { .. }), "{err:?}");
    assert_eq!(notices, [Notice::Format]);
    assert_eq!(
        vols.token_resources(&image).unwrap(),
        our_token(TokenState::Initialising)
    );
    drop(vols);

    // Boot 2: the token says initialising: the file system is made now, not the LUKS2 header.
    let header_before = {
        let out = run(
            "cryptsetup",
            &["luksDump", "--dump-json-metadata", path_str(&image)],
        );
        let mut meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        meta["tokens"] = serde_json::Value::Null;
        meta
    };
    let vols = LoopMapped::new(RealVolumes::new(), &plain);
    let (result, notices) = boot(&vols, &spec, &bytes);
    let got = result.unwrap();
    assert_eq!(
        (got.formatted, got.step, got.root),
        (false, FsStep::Resume, ROOT)
    );
    assert_eq!(notices, [Notice::Resume, Notice::Ready]);
    let meta = std::fs::metadata(&spec.mountpoint).unwrap();
    assert_eq!(
        (meta.uid(), meta.gid(), meta.mode() & 0o7777),
        (ROOT.uid, ROOT.gid, ROOT.mode)
    );
    assert_eq!(
        vols.token_resources(&image).unwrap(),
        our_token(TokenState::Ready)
    );
    let mut header_after = {
        let out = run(
            "cryptsetup",
            &["luksDump", "--dump-json-metadata", path_str(&image)],
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    header_after["tokens"] = serde_json::Value::Null;
    assert_eq!(
        header_after, header_before,
        "the LUKS2 header was rewritten"
    );
    // The workload writes its data.
    std::fs::write(spec.mountpoint.join("data"), b"boot 2").unwrap();
    shut_down(&vols, &spec);
    drop(vols);

    // Boot 3: ready: mounted, checked, never made again (this runner has no mkfs.ext4).
    let vols = LoopMapped::new(no_mkfs(dir.path()), &plain);
    let (result, notices) = boot(&vols, &spec, &bytes);
    let got = result.unwrap();
    assert_eq!((got.step, got.root), (FsStep::Use, ROOT));
    assert!(notices.is_empty());
    assert_eq!(
        std::fs::read(spec.mountpoint.join("data")).unwrap(),
        b"boot 2"
    );
    shut_down(&vols, &spec);
    drop(vols);

    // Boot 4: the root changed outside (another owner and mode): refused, left as it is.
    {
        let out = run("losetup", &["--find", "--show", path_str(&plain)]);
        let mut lo = Loop {
            device: String::from_utf8_lossy(&out.stdout).trim().to_string(),
            mounted: None,
        };
        let target = dir.path().join("outside");
        std::fs::create_dir(&target).unwrap();
        nix::mount::mount(
            Some(lo.device.as_str()),
            &target,
            Some("ext4"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .unwrap();
        lo.mounted = Some(target.clone());
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o777)).unwrap();
        std::os::unix::fs::chown(&target, Some(0), Some(0)).unwrap();
    }
    let vols = LoopMapped::new(RealVolumes::new(), &plain);
    let (result, _) = boot(&vols, &spec, &bytes);
    let err = result.unwrap_err();
    let VolumeError::RootMismatch(problem) = &err else {
        panic!("{err:?}");
    };
    assert_eq!(
        (problem.expected, problem.found),
        (
            ROOT,
            RootAttrs {
                uid: 0,
                gid: 0,
                mode: 0o777
            }
        )
    );
    assert!(
        err.to_string().starts_with(&format!(
            "volume \"workspace\": the root of its file system (mounted on {}) has owner 0 group \
             0 mode 0777, but the policy says owner 4321 group 8765 mode 0750; cvm-warden does \
             not change the owner or mode of a ready volume",
            spec.mountpoint.display()
        )),
        "{err}"
    );
    // Unmounted and closed again; the root as it was found.
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mountinfo.contains(path_str(&spec.mountpoint)),
        "{mountinfo}"
    );
    assert!(vols.state.lock().unwrap().0.is_none());
    drop(vols);

    // Boot 5: the file system is gone (its superblock zeroed): the ready volume is refused
    // with what it likely means, and nothing is formatted (a working mkfs.ext4 is at hand).
    {
        let mut file = OpenOptions::new().write(true).open(&plain).unwrap();
        file.write_all(&vec![0u8; 1 << 20]).unwrap();
        file.sync_all().unwrap();
    }
    let before = digest(&plain);
    let header = digest(&image);
    let vols = LoopMapped::new(RealVolumes::new(), &plain);
    let (result, notices) = boot(&vols, &spec, &bytes);
    let err = result.unwrap_err();
    assert!(notices.is_empty());
    let VolumeError::NotMounted { step, errno, .. } = &err else {
        panic!("{err:?}");
    };
    assert_eq!(*step, FsStep::Use);
    assert_eq!(*errno, nix::errno::Errno::EINVAL);
    let text = err.to_string();
    assert!(
        text.starts_with(
            "volume \"workspace\" is ready (its LUKS2 token says its file system was made), but \
             its file system did not mount: /dev/loop"
        ),
        "{text}"
    );
    assert!(text.contains("holds no valid ext4 file system"), "{text}");
    assert!(
        text.contains("nothing was formatted: cvm-warden never formats a ready volume"),
        "{text}"
    );
    assert!(!text.contains("load the ext4 module"), "{text}");
    drop(vols);
    assert_eq!(digest(&plain), before, "the file system image changed");
    assert_eq!(digest(&image), header, "the LUKS2 image changed");
}

#[test]
fn a_first_boot_through_the_real_effects_makes_the_root_the_policy_says() {
    require_root();
    let dir = tempdir();
    let image = blank_image(dir.path(), "first.img");
    let plain = blank_image(dir.path(), "first-plain.img");
    let bytes = random_key(32);
    let spec = VolumeSpec {
        name: "first".to_string(),
        device: image.clone(),
        resource: uri(RES),
        mountpoint: dir.path().join("mnt"),
        format_if_blank: true,
        integrity: None,
        mount: MountOptions { noexec: false },
        root: RootAttrs {
            uid: 0,
            gid: 8765,
            mode: 0o2770,
        },
    };
    let vols = LoopMapped::new(RealVolumes::new(), &plain);
    let (result, notices) = boot(&vols, &spec, &bytes);
    let got = result.unwrap();
    assert_eq!((got.formatted, got.step), (true, FsStep::Make));
    assert_eq!(notices, [Notice::Format, Notice::Ready]);
    let meta = std::fs::metadata(&spec.mountpoint).unwrap();
    assert_eq!(
        (meta.uid(), meta.gid(), meta.mode() & 0o7777),
        (0, 8765, 0o2770)
    );
    assert_eq!(
        vols.token_resources(&image).unwrap(),
        our_token(TokenState::Ready)
    );
    shut_down(&vols, &spec);
}

#[test]
fn data_past_a_wiped_first_mib_is_never_taken_for_blank() {
    require_root();
    let dir = tempdir();
    let image = blank_image(dir.path(), "wiped-head.img");
    let vols = RealVolumes::new();
    assert_eq!(vols.inspect(&image).unwrap(), DeviceState::Blank);
    // A file system whose first MiB was wiped (wipefs, a zeroed partition table): its data
    // further on must keep the device from being formatted, whatever format_if_blank says.
    let mut file = OpenOptions::new().write(true).open(&image).unwrap();
    file.seek(SeekFrom::Start(8 * 1024 * 1024 + 4096)).unwrap();
    file.write_all(b"the owner's data").unwrap();
    drop(file);
    let state = vols.inspect(&image).unwrap();
    assert_eq!(
        state,
        DeviceState::HoldsData {
            first_nonzero: 8 * 1024 * 1024 + 4096
        }
    );
    assert!(decide(&image, &state, true).is_err());
}
