//! The volume capability against real libcryptsetup and the real `cryptsetup` tool, on sparse
//! file images under /var/tmp. Needs root (libcryptsetup locking, loop devices, mount); fails
//! with a message when not root. Device-mapper is not needed: keys are checked the way
//! `cryptsetup open --test-passphrase` does (activation without a name). Opening a mapping
//! and the dm-integrity format are covered by the VM test.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use cvm_warden::policy::ResourceUri;
use cvm_warden::report::error_chain;
use cvm_warden::tool::{Tool, ToolError, Tools};
use cvm_warden::volume::{
    check_token, decide, token_json, unlock, Action, DeviceState, FormatProblem, Integrity,
    MountOptions, RealVolumes, TokenProblem, VolumeError, VolumeKey, VolumeSpec, Volumes,
};
use rand_core::{OsRng, RngCore};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

const RES: &str = "kbs:///default/keys/workspace";
const IMAGE_SIZE: u64 = 64 * 1024 * 1024;

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
    assert_eq!(vols.token_resources(&image).unwrap(), vec![RES.to_string()]);
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
        serde_json::json!({"type":"cvm-warden-kbs","keyslots":["0"],"resource":RES})
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
        serde_json::json!({"type":"cvm-warden-kbs","keyslots":["0"],"resource":RES})
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
fn mkfs_ext4_then_mount_sets_nosuid_nodev_and_noexec() {
    require_root();
    let dir = tempdir();
    let image = blank_image(dir.path(), "fs.img");
    let vols = RealVolumes::new();
    vols.mkfs_ext4(&image).unwrap();
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
        vols.mount(Path::new(&lo.device), &target, MountOptions { noexec })
            .unwrap();
        lo.mounted = Some(target.clone());
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
    let err = vols.mkfs_ext4(&image).unwrap_err();
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
    let err = vols.mkfs_ext4(dir.path()).unwrap_err();
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
    let err = vols.mkfs_ext4(&dir.path().join("image")).unwrap_err();
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
    assert_eq!(vols.token_resources(&image).unwrap(), vec![RES.to_string()]);

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
        &token_json(&uri(RES), 0).to_string(),
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
    assert_eq!(vols.token_resources(&image).unwrap(), vec![RES.to_string()]);
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
    assert_eq!(vols.token_resources(&image).unwrap(), vec![RES.to_string()]);
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
