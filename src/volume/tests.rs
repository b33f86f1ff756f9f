//! Unit tests of the unlock flow through the recording fake, and of the small types. No root.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};

use nix::mount::MsFlags;
use zeroize::Zeroizing;

use super::*;

const DEV: &str = "/dev/vdb";
const RES: &str = "kbs:///default/keys/workspace";
/// The policy's root in these tests: the workload's uid and gid, mode 0700.
const ROOT: RootAttrs = RootAttrs {
    uid: 1000,
    gid: 1000,
    mode: 0o700,
};

fn uri(text: &str) -> ResourceUri {
    ResourceUri::parse(text).unwrap()
}

fn key_bytes(fill: u8) -> Vec<u8> {
    vec![fill; 32]
}

fn key(fill: u8) -> VolumeKey {
    VolumeKey::new(Zeroizing::new(key_bytes(fill)), uri(RES)).unwrap()
}

fn spec(format_if_blank: bool) -> VolumeSpec {
    VolumeSpec {
        name: "workspace".to_string(),
        device: PathBuf::from(DEV),
        resource: uri(RES),
        mountpoint: PathBuf::from("/data"),
        format_if_blank,
        integrity: None,
        mount: MountOptions { noexec: true },
        root: ROOT,
    }
}

/// The one place that builds a policy `Volume` (update it when the policy type grows).
fn policy_volume(name: &str, allow_exec: bool, integrity: Option<&str>) -> Volume {
    Volume {
        name: name.to_string(),
        device: PathBuf::from(DEV),
        key: uri(RES),
        mount: PathBuf::from("/data"),
        format_if_blank: true,
        integrity: integrity.map(str::to_string),
        allow_exec,
        owner: 1000,
        group: 1000,
        mode: 0o700,
    }
}

fn mapped() -> PathBuf {
    PathBuf::from("/dev/mapper/workspace")
}

#[test]
fn first_boot_formats_then_opens_makes_ext4_and_mounts_in_that_order() {
    let fake = FakeVolumes::new().with_device(DEV, DeviceState::Blank);
    let got = unlock(&fake, &spec(true), &key(7)).unwrap();
    assert_eq!(
        got,
        Unlocked {
            name: "workspace".to_string(),
            mapped: mapped(),
            keyslot: 0,
            formatted: true,
            step: FsStep::Make,
            root: ROOT,
        }
    );
    let dev = PathBuf::from(DEV);
    assert_eq!(
        fake.calls(),
        vec![
            VolumeCall::Inspect(dev.clone()),
            VolumeCall::Format {
                device: dev.clone(),
                resource: RES.to_string(),
                integrity: None
            },
            VolumeCall::CheckFormat {
                device: dev.clone(),
                integrity: None
            },
            VolumeCall::TokenResources(dev.clone()),
            VolumeCall::VerifyKey {
                device: dev.clone(),
                resource: RES.to_string()
            },
            VolumeCall::Open {
                device: dev,
                name: "workspace".to_string()
            },
            VolumeCall::MkfsExt4 {
                mapped: mapped(),
                uid: 1000,
                gid: 1000
            },
            VolumeCall::Mount {
                mapped: mapped(),
                mountpoint: PathBuf::from("/data"),
                options: MountOptions { noexec: true }
            },
            VolumeCall::SetRootMode {
                mountpoint: PathBuf::from("/data"),
                mode: 0o700
            },
            VolumeCall::SetTokenState {
                device: PathBuf::from(DEV),
                state: TokenState::Ready
            },
        ]
    );
    assert_eq!(fake.state(Path::new(DEV)), Some(DeviceState::Luks2));
    assert_eq!(fake.mappings(), vec!["workspace".to_string()]);
    assert_eq!(fake.fs(Path::new(DEV)), Some(ROOT));
    assert_eq!(
        fake.tokens(Path::new(DEV)),
        vec![KbsToken::new(RES, Some(TokenState::Ready))]
    );
}

#[test]
fn integrity_mode_reaches_format() {
    let fake = FakeVolumes::new().with_device(DEV, DeviceState::Blank);
    let mut s = spec(true);
    s.integrity = Some(Integrity::HmacSha256);
    unlock(&fake, &s, &key(7)).unwrap();
    assert!(fake.calls().contains(&VolumeCall::Format {
        device: PathBuf::from(DEV),
        resource: RES.to_string(),
        integrity: Some(Integrity::HmacSha256)
    }));
}

#[test]
fn existing_volume_is_opened_and_mounted_without_format_or_mkfs() {
    let fake = ready_volume(Some(TokenState::Ready), Some(ROOT));
    let got = unlock(&fake, &spec(true), &key(7)).unwrap();
    assert!(!got.formatted);
    assert_eq!((got.step, got.root), (FsStep::Use, ROOT));
    assert_eq!(
        fake.ops(),
        vec![
            VolumeOp::Inspect,
            VolumeOp::CheckFormat,
            VolumeOp::TokenResources,
            VolumeOp::VerifyKey,
            VolumeOp::Open,
            VolumeOp::Mount
        ]
    );
}

#[test]
fn refusals_stop_after_inspect_and_write_nothing() {
    let cases = [
        (
            DeviceState::HoldsData {
                first_nonzero: 1000,
            },
            true,
        ),
        (DeviceState::HoldsData { first_nonzero: 0 }, false),
        (DeviceState::Blank, false),
        (DeviceState::Luks1, true),
        (DeviceState::LuksVersion(3), true),
        (
            DeviceState::OrphanSecondaryHeader { offset: 0x20_0000 },
            true,
        ),
    ];
    for (state, allow) in cases {
        let fake = FakeVolumes::new().with_device(DEV, state.clone());
        let err = unlock(&fake, &spec(allow), &key(7)).unwrap_err();
        assert!(matches!(err, VolumeError::Refused(_)), "{state:?}: {err}");
        assert_eq!(fake.ops(), vec![VolumeOp::Inspect], "{state:?}");
        assert_eq!(fake.state(Path::new(DEV)), Some(state.clone()));
    }
    let fake = FakeVolumes::new().with_device(
        DEV,
        DeviceState::HoldsData {
            first_nonzero: 1000,
        },
    );
    assert_eq!(
        unlock(&fake, &spec(true), &key(7)).unwrap_err().to_string(),
        "refusing to format /dev/vdb: it holds data but no LUKS2 header"
    );
}

#[test]
fn token_mismatch_fails_closed_before_the_key_is_tried() {
    let fake = FakeVolumes::new().with_luks2(DEV, &key_bytes(7), &["kbs:///default/keys/other"]);
    let err = unlock(&fake, &spec(true), &key(7)).unwrap_err();
    let text = err.to_string();
    assert!(matches!(
        err,
        VolumeError::Token(TokenProblem::Mismatch { .. })
    ));
    assert!(text.contains("kbs:///default/keys/other"), "{text}");
    assert!(text.contains(RES), "{text}");
    assert_eq!(
        fake.ops(),
        vec![
            VolumeOp::Inspect,
            VolumeOp::CheckFormat,
            VolumeOp::TokenResources
        ]
    );
    assert!(fake.mappings().is_empty());
}

#[test]
fn missing_token_fails_closed() {
    let fake = FakeVolumes::new().with_luks2(DEV, &key_bytes(7), &[]);
    let err = unlock(&fake, &spec(true), &key(7)).unwrap_err();
    assert!(
        matches!(err, VolumeError::Token(TokenProblem::Missing { .. })),
        "{err}"
    );
}

#[test]
fn wrong_key_is_rejected_naming_device_and_resource_and_nothing_is_opened() {
    let fake = FakeVolumes::new().with_luks2(DEV, &key_bytes(7), &[RES]);
    let err = unlock(&fake, &spec(true), &key(8)).unwrap_err();
    assert!(matches!(err, VolumeError::KeyRejected { .. }));
    let text = err.to_string();
    assert!(text.contains("/dev/vdb") && text.contains(RES), "{text}");
    assert!(fake.mappings().is_empty());
    assert!(!fake.ops().contains(&VolumeOp::Open));
}

#[test]
fn key_for_another_resource_is_refused_before_any_effect() {
    let fake = FakeVolumes::new().with_device(DEV, DeviceState::Blank);
    let other = VolumeKey::new(Zeroizing::new(key_bytes(7)), uri("kbs:///default/keys/b")).unwrap();
    let err = unlock(&fake, &spec(true), &other).unwrap_err();
    assert!(matches!(err, VolumeError::WrongResource { .. }), "{err}");
    assert!(fake.calls().is_empty());
}

#[test]
fn mkfs_failure_closes_the_mapping_and_returns_the_mkfs_error() {
    let fake = FakeVolumes::new()
        .with_device(DEV, DeviceState::Blank)
        .fail(VolumeOp::MkfsExt4);
    let err = unlock(&fake, &spec(true), &key(7)).unwrap_err();
    assert!(matches!(err, VolumeError::Crypt { .. }), "{err}");
    assert_eq!(fake.ops().last(), Some(&VolumeOp::Close));
    assert!(!fake.ops().contains(&VolumeOp::Mount));
    assert!(fake.mappings().is_empty());
    // The token still says initialising: the next boot makes the file system again.
    assert_eq!(
        fake.tokens(Path::new(DEV)),
        vec![KbsToken::new(RES, Some(TokenState::Initialising))]
    );
}

#[test]
fn mount_failure_closes_the_mapping() {
    let fake = ready_volume(Some(TokenState::Ready), Some(ROOT)).fail(VolumeOp::Mount);
    let err = unlock(&fake, &spec(true), &key(7)).unwrap_err();
    let VolumeError::NotMounted { step, errno, .. } = &err else {
        panic!("{err}");
    };
    assert_eq!((*step, *errno), (FsStep::Use, nix::errno::Errno::EIO));
    assert_eq!(fake.ops().last(), Some(&VolumeOp::Close));
    assert!(!fake.ops().contains(&VolumeOp::Unmount));
    assert!(fake.mappings().is_empty());
    assert!(fake.mounts().is_empty());
}

// ---------------------------------------------------------------------------------------------
// Volume states (`initialising` → `ready`) and the root's owner, group and mode.

/// A LUKS2 volume opened by `key(7)` whose token names RES in `state`, with a file system whose
/// root is `fs` (`None`: no file system).
fn ready_volume(state: Option<TokenState>, fs: Option<RootAttrs>) -> FakeVolumes {
    FakeVolumes::new()
        .with_luks2(DEV, &key_bytes(7), &[RES])
        .with_token_state(DEV, state)
        .with_fs(DEV, fs)
}

/// Runs the flow recording the notices.
fn unlock_recording(
    fake: &FakeVolumes,
    spec: &VolumeSpec,
) -> (Result<Unlocked, VolumeError>, Vec<Notice>) {
    let mut notices = Vec::new();
    let result = unlock_notified(fake, spec, &key(7), &mut |n| {
        notices.push(n);
        Ok(())
    });
    (result, notices)
}

#[test]
fn first_boot_notices_the_format_before_and_ready_after() {
    let fake = FakeVolumes::new().with_device(DEV, DeviceState::Blank);
    let (result, notices) = unlock_recording(&fake, &spec(true));
    assert_eq!(result.unwrap().step, FsStep::Make);
    assert_eq!(notices, [Notice::Format, Notice::Ready]);
}

#[test]
fn a_first_boot_that_stopped_before_mkfs_is_resumed_on_the_next_boot() {
    // Boot 1: luksFormat wrote the token (initialising), then mkfs did not finish.
    let fake = FakeVolumes::new()
        .with_device(DEV, DeviceState::Blank)
        .fail(VolumeOp::MkfsExt4);
    unlock(&fake, &spec(true), &key(7)).unwrap_err();
    assert_eq!(fake.fs(Path::new(DEV)), None);
    assert_eq!(
        fake.tokens(Path::new(DEV)),
        vec![KbsToken::new(RES, Some(TokenState::Initialising))]
    );

    // Boot 2: the device is LUKS2 now, its token says initialising: mkfs again, not luksFormat.
    fake.heal();
    let before = fake.calls().len();
    let (result, notices) = unlock_recording(&fake, &spec(true));
    let got = result.unwrap();
    assert_eq!(
        (got.formatted, got.step, got.root),
        (false, FsStep::Resume, ROOT)
    );
    assert_eq!(notices, [Notice::Resume, Notice::Ready]);
    assert_eq!(
        fake.ops()[before..],
        [
            VolumeOp::Inspect,
            VolumeOp::CheckFormat,
            VolumeOp::TokenResources,
            VolumeOp::VerifyKey,
            VolumeOp::Open,
            VolumeOp::MkfsExt4,
            VolumeOp::Mount,
            VolumeOp::SetRootMode,
            VolumeOp::SetTokenState,
        ]
    );
    assert_eq!(
        fake.tokens(Path::new(DEV)),
        vec![KbsToken::new(RES, Some(TokenState::Ready))]
    );

    // Boot 3: ready, mounted as it is.
    fake.close("workspace").unwrap();
    fake.unmount(Path::new("/data")).unwrap();
    let before = fake.calls().len();
    let (result, notices) = unlock_recording(&fake, &spec(true));
    assert_eq!(result.unwrap().step, FsStep::Use);
    assert!(notices.is_empty());
    assert!(!fake.ops()[before..].contains(&VolumeOp::MkfsExt4));
    assert!(!fake.ops()[before..].contains(&VolumeOp::SetRootMode));
    assert!(!fake.ops()[before..].contains(&VolumeOp::SetTokenState));
}

#[test]
fn a_first_boot_that_stopped_after_mkfs_is_made_again_and_gets_the_policy_root() {
    // mkfs finished (root 0755) but the mode and `ready` were never written.
    let fake = ready_volume(
        Some(TokenState::Initialising),
        Some(RootAttrs {
            mode: 0o755,
            ..ROOT
        }),
    );
    let got = unlock(&fake, &spec(true), &key(7)).unwrap();
    assert_eq!((got.step, got.root), (FsStep::Resume, ROOT));
    assert!(fake.ops().contains(&VolumeOp::MkfsExt4));
    assert_eq!(fake.fs(Path::new(DEV)), Some(ROOT));
}

#[test]
fn a_failure_before_ready_leaves_the_token_initialising_and_unmounts() {
    let fake = FakeVolumes::new()
        .with_device(DEV, DeviceState::Blank)
        .fail(VolumeOp::SetTokenState);
    let (result, notices) = unlock_recording(&fake, &spec(true));
    result.unwrap_err();
    assert_eq!(notices, [Notice::Format]);
    assert_eq!(
        fake.ops()[fake.ops().len() - 3..],
        [VolumeOp::SetTokenState, VolumeOp::Unmount, VolumeOp::Close]
    );
    assert!(fake.mounts().is_empty() && fake.mappings().is_empty());
    assert_eq!(
        fake.tokens(Path::new(DEV)),
        vec![KbsToken::new(RES, Some(TokenState::Initialising))]
    );
}

/// A ready volume (or one whose token predates states) whose file system does not mount is
/// never given a new one; the error says it is ready, why it likely failed and that nothing
/// was formatted.
#[test]
fn a_ready_volume_that_does_not_mount_is_never_formatted() {
    for state in [Some(TokenState::Ready), None] {
        let fake = ready_volume(state, None);
        let (result, notices) = unlock_recording(&fake, &spec(true));
        let err = result.unwrap_err();
        assert!(notices.is_empty(), "{state:?}");
        assert_eq!(
            fake.ops(),
            [
                VolumeOp::Inspect,
                VolumeOp::CheckFormat,
                VolumeOp::TokenResources,
                VolumeOp::VerifyKey,
                VolumeOp::Open,
                VolumeOp::Mount,
                VolumeOp::Close,
            ],
            "{state:?}"
        );
        let text = err.to_string();
        assert!(
            text.starts_with(
                "volume \"workspace\" is ready (its LUKS2 token says its file system was made), \
                 but its file system did not mount: /dev/mapper/workspace holds no valid ext4 \
                 file system"
            ),
            "{text}"
        );
        assert!(
            text.contains("nothing was formatted: cvm-warden never formats a ready volume"),
            "{text}"
        );
        assert!(!text.contains("load the ext4 module"), "{text}");
        assert_eq!(fake.fs(Path::new(DEV)), None);
        assert_eq!(fake.tokens(Path::new(DEV))[0].state, state);
    }
}

#[test]
fn a_ready_volume_whose_root_differs_is_refused_unmounted_and_left_as_it_is() {
    let old = RootAttrs {
        uid: 0,
        gid: 0,
        mode: 0o755,
    };
    for state in [Some(TokenState::Ready), None] {
        let fake = ready_volume(state, Some(old));
        let err = unlock(&fake, &spec(true), &key(7)).unwrap_err();
        let VolumeError::RootMismatch(problem) = &err else {
            panic!("{err}");
        };
        assert_eq!(
            (problem.volume.as_str(), problem.expected, problem.found),
            ("workspace", ROOT, old)
        );
        assert!(
            err.to_string()
                .contains("has owner 0 group 0 mode 0755, but the policy says owner 1000 group 1000 mode 0700"),
            "{err}"
        );
        assert_eq!(
            fake.ops()[fake.ops().len() - 3..],
            [VolumeOp::Mount, VolumeOp::Unmount, VolumeOp::Close]
        );
        assert_eq!(fake.fs(Path::new(DEV)), Some(old));
        assert!(fake.mounts().is_empty() && fake.mappings().is_empty());
    }
    // Each of owner, group and mode is checked.
    for found in [
        RootAttrs { uid: 1001, ..ROOT },
        RootAttrs { gid: 1001, ..ROOT },
        RootAttrs {
            mode: 0o770,
            ..ROOT
        },
    ] {
        let fake = ready_volume(Some(TokenState::Ready), Some(found));
        let err = unlock(&fake, &spec(true), &key(7)).unwrap_err();
        assert!(
            matches!(err, VolumeError::RootMismatch(_)),
            "{found}: {err}"
        );
    }
}

#[test]
fn a_new_file_system_whose_root_is_not_the_policys_is_not_marked_ready() {
    let fake = FakeVolumes::new()
        .with_device(DEV, DeviceState::Blank)
        .ignoring_root_owner();
    let (result, notices) = unlock_recording(&fake, &spec(true));
    let err = result.unwrap_err();
    assert!(
        matches!(err, VolumeError::NewRootWrong { found, .. } if found == RootAttrs { uid: 0, gid: 0, mode: 0o700 }),
        "{err}"
    );
    assert_eq!(
        err.to_string(),
        "volume \"workspace\": the root of the file system just made (mounted on /data) has \
         owner 0 group 0 mode 0700 after mkfs.ext4 -E root_owner and chmod, not the policy's \
         owner 1000 group 1000 mode 0700; its LUKS2 token still says initialising, so the next \
         boot makes the file system again; check that the image's mkfs.ext4 (e2fsprogs 1.42 or \
         later) honours -E root_owner"
    );
    assert_eq!(notices, [Notice::Format]);
    assert!(!fake.ops().contains(&VolumeOp::SetTokenState));
    assert_eq!(
        fake.ops()[fake.ops().len() - 2..],
        [VolumeOp::Unmount, VolumeOp::Close]
    );
    assert_eq!(
        fake.tokens(Path::new(DEV)),
        vec![KbsToken::new(RES, Some(TokenState::Initialising))]
    );
}

#[test]
fn the_policy_root_reaches_mkfs_and_chmod() {
    let fake = FakeVolumes::new().with_device(DEV, DeviceState::Blank);
    let mut s = spec(true);
    s.root = RootAttrs {
        uid: 0,
        gid: 2000,
        mode: 0o2750,
    };
    let got = unlock(&fake, &s, &key(7)).unwrap();
    assert_eq!(got.root, s.root);
    let calls = fake.calls();
    assert!(calls.contains(&VolumeCall::MkfsExt4 {
        mapped: mapped(),
        uid: 0,
        gid: 2000
    }));
    assert!(calls.contains(&VolumeCall::SetRootMode {
        mountpoint: PathBuf::from("/data"),
        mode: 0o2750
    }));
}

#[test]
fn a_notice_that_cannot_be_recorded_stops_before_the_change() {
    let fake = FakeVolumes::new().with_device(DEV, DeviceState::Blank);
    let err = unlock_notified(&fake, &spec(true), &key(7), &mut |_| {
        Err("audit disk full".into())
    })
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "volume \"workspace\": cannot record the format of a blank device in the audit log, so \
         the volume is not used"
    );
    assert_eq!(fake.ops(), [VolumeOp::Inspect]);
    assert_eq!(fake.state(Path::new(DEV)), Some(DeviceState::Blank));

    let fake = ready_volume(Some(TokenState::Initialising), None);
    let err = unlock_notified(&fake, &spec(true), &key(7), &mut |n| match n {
        Notice::Resume => Err("audit disk full".into()),
        _ => Ok(()),
    })
    .unwrap_err();
    assert!(matches!(err, VolumeError::Notice { .. }), "{err}");
    assert!(!fake.ops().contains(&VolumeOp::Open));
    assert!(!fake.ops().contains(&VolumeOp::MkfsExt4));
}

#[test]
fn fake_format_refuses_a_device_that_is_not_blank() {
    let fake = FakeVolumes::new().with_device(DEV, DeviceState::HoldsData { first_nonzero: 3 });
    let err = fake.format(Path::new(DEV), &key(7), None).unwrap_err();
    assert_eq!(
        err.to_string(),
        "refusing to format /dev/vdb: it holds data but no LUKS2 header"
    );
    assert_eq!(
        fake.state(Path::new(DEV)),
        Some(DeviceState::HoldsData { first_nonzero: 3 })
    );
}

#[test]
fn short_key_is_refused_naming_the_resource() {
    for len in [0usize, 1, 16, 31] {
        let err = VolumeKey::new(Zeroizing::new(vec![1; len]), uri(RES)).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "broker resource {RES} released {len} bytes, but a broker resource shorter than \
                 32 bytes is not a volume key; store 32 or more random bytes under it (e.g. \
                 `head -c 32 /dev/urandom`)"
            )
        );
    }
    assert_eq!(
        VolumeKey::new(Zeroizing::new(vec![1; 32]), uri(RES))
            .unwrap()
            .len(),
        32
    );
    assert_eq!(
        VolumeKey::new(Zeroizing::new(vec![1; 64]), uri(RES))
            .unwrap()
            .len(),
        64
    );
}

#[test]
fn key_debug_shows_no_key_bytes() {
    let k = VolumeKey::new(
        Zeroizing::new(b"0123456789abcdefghijklmnopqrstuv".to_vec()),
        uri(RES),
    )
    .unwrap();
    let debug = format!("{k:?}");
    assert!(
        debug.contains("<redacted>") && debug.contains(RES),
        "{debug}"
    );
    assert!(!debug.contains("0123456789"), "{debug}");
    assert!(!debug.contains("48, 49"), "{debug}");
}

#[test]
fn integrity_parses_only_hmac_sha256() {
    assert_eq!(Integrity::parse("hmac-sha256"), Ok(Integrity::HmacSha256));
    assert_eq!(Integrity::HmacSha256.crypto_api_name(), "hmac(sha256)");
    assert_eq!(Integrity::HmacSha256.key_bytes(), 32);
    for bad in ["hmac(sha256)", "HMAC-SHA256", "crc32c", ""] {
        assert!(
            Integrity::parse(bad).unwrap_err().contains("hmac-sha256"),
            "{bad}"
        );
    }
}

#[test]
fn spec_from_policy_checks_name_and_integrity_and_maps_allow_exec() {
    let spec =
        VolumeSpec::from_policy(&policy_volume("workspace", false, Some("hmac-sha256"))).unwrap();
    assert_eq!(spec.resource, uri(RES));
    assert_eq!(spec.root, ROOT);
    let mut other = policy_volume("workspace", false, None);
    (other.owner, other.group, other.mode) = (4, 2000, 0o750);
    assert_eq!(
        VolumeSpec::from_policy(&other).unwrap().root,
        RootAttrs {
            uid: 4,
            gid: 2000,
            mode: 0o750
        }
    );
    assert_eq!(spec.integrity, Some(Integrity::HmacSha256));
    assert_eq!(spec.mount, MountOptions { noexec: true });
    let spec = VolumeSpec::from_policy(&policy_volume("workspace", true, None)).unwrap();
    assert_eq!(spec.mount, MountOptions { noexec: false });
    assert_eq!(spec.integrity, None);

    for name in ["", ".", "..", "a/b", "a b", &"x".repeat(128)] {
        let err = VolumeSpec::from_policy(&policy_volume(name, false, None)).unwrap_err();
        assert!(
            matches!(err, VolumeError::BadSpec { what: "name", .. }),
            "{name:?}: {err}"
        );
    }
    let err = VolumeSpec::from_policy(&policy_volume("w", false, Some("crc32"))).unwrap_err();
    assert!(
        matches!(
            err,
            VolumeError::BadSpec {
                what: "integrity",
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("hmac-sha256"), "{err}");
}

#[test]
fn mount_always_sets_nosuid_and_nodev() {
    assert_eq!(
        luks::mount_flags(MountOptions { noexec: false }),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV
    );
    assert_eq!(
        luks::mount_flags(MountOptions { noexec: true }),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC
    );
}

#[test]
fn header_label_is_the_resource_when_it_fits() {
    use crate::volume::luks::header_label;
    let short = ResourceUri::parse("kbs:///default/keys/workspace").unwrap();
    assert_eq!(header_label(&short), "kbs:///default/keys/workspace");
    let long =
        ResourceUri::parse("kbs:///a-very-long-repository/keys/a-very-long-volume-tag").unwrap();
    assert!(long.to_string().len() > 47);
    assert_eq!(header_label(&long), "key: see token cvm-warden-kbs");
}

// ---------------------------------------------------------------------------------------------
// The header format check (a host that rewrote the LUKS2 header).

/// One change to the header cvm-warden writes, with the field the refusal must name and what
/// it must say was found and expected.
struct Tamper {
    what: &'static str,
    change: fn(&mut HeaderFormat),
    field: &'static str,
    found: &'static str,
    expected: &'static str,
}

fn tampers() -> Vec<Tamper> {
    vec![
        Tamper {
            what: "data segment switched to cipher_null",
            change: |h| h.segments[0].encryption = Some("cipher_null-ecb".to_string()),
            field: "cipher",
            found: "cipher_null-ecb",
            expected: "aes-xts-plain64",
        },
        Tamper {
            what: "another cipher",
            change: |h| h.segments[0].encryption = Some("aes-cbc-essiv:sha256".to_string()),
            field: "cipher",
            found: "aes-cbc-essiv:sha256",
            expected: "aes-xts-plain64",
        },
        Tamper {
            what: "no encryption member",
            change: |h| h.segments[0].encryption = None,
            field: "cipher",
            found: "nothing (the field is missing)",
            expected: "aes-xts-plain64",
        },
        Tamper {
            what: "AES-128-XTS",
            change: |h| h.keyslots[0].key_size = Some(32),
            field: "volume key size (keyslot 0)",
            found: "32 bytes",
            expected: "64 bytes",
        },
        Tamper {
            what: "integrity the policy does not ask for",
            change: |h| h.segments[0].integrity = Some("hmac(sha256)".to_string()),
            field: "integrity",
            found: "hmac(sha256)",
            expected: "none for a policy without integrity",
        },
        Tamper {
            what: "integrity \"none\" spelled out",
            change: |h| h.segments[0].integrity = Some("none".to_string()),
            field: "integrity",
            found: "none",
            expected: "none for a policy without integrity",
        },
        Tamper {
            what: "512-byte sectors",
            change: |h| h.segments[0].sector_size = Some(512),
            field: "sector size",
            found: "512 bytes",
            expected: "4096 bytes",
        },
        Tamper {
            what: "a second segment",
            change: |h| {
                let mut second = h.segments[0].clone();
                second.id = "1".to_string();
                h.segments.push(second);
            },
            field: "segments",
            found: "2 (0, 1)",
            expected: "exactly one data segment",
        },
        Tamper {
            what: "no segment",
            change: |h| h.segments.clear(),
            field: "segments",
            found: "0 ()",
            expected: "exactly one data segment",
        },
        Tamper {
            what: "a linear (unencrypted) segment",
            change: |h| h.segments[0].kind = Some("linear".to_string()),
            field: "segment 0 type",
            found: "linear",
            expected: "crypt",
        },
        Tamper {
            what: "a forged keyslot with a cipher_null area",
            change: |h| {
                let mut forged = h.keyslots[0].clone();
                forged.id = "1".to_string();
                forged.area_encryption = Some("cipher_null-ecb".to_string());
                h.keyslots.push(forged);
            },
            field: "keyslot 1 area cipher",
            found: "cipher_null-ecb",
            expected: "aes-xts-plain64",
        },
        Tamper {
            what: "keyslot 0 area switched to cipher_null",
            change: |h| h.keyslots[0].area_encryption = Some("cipher_null".to_string()),
            field: "keyslot 0 area cipher",
            found: "cipher_null",
            expected: "aes-xts-plain64",
        },
        Tamper {
            what: "a short keyslot area key",
            change: |h| h.keyslots[0].area_key_size = Some(16),
            field: "keyslot 0 area key size",
            found: "16 bytes",
            expected: "64 bytes",
        },
        Tamper {
            what: "a keyslot of another type",
            change: |h| h.keyslots[0].kind = Some("reencrypt".to_string()),
            field: "keyslot 0 type",
            found: "reencrypt",
            expected: "luks2",
        },
        Tamper {
            what: "no keyslot",
            change: |h| h.keyslots.clear(),
            field: "keyslots",
            found: "none",
            expected: "keyslot 0 for the broker key",
        },
    ]
}

#[test]
fn every_tampered_header_field_is_refused_before_the_key_is_tried() {
    for tamper in tampers() {
        let mut header = HeaderFormat::cvm_warden(None);
        (tamper.change)(&mut header);
        let fake = FakeVolumes::new()
            .with_luks2(DEV, &key_bytes(7), &[RES])
            .with_header(DEV, header);
        let err = unlock(&fake, &spec(true), &key(7)).unwrap_err();
        let VolumeError::HeaderFormat(problem) = &err else {
            panic!("{}: {err}", tamper.what);
        };
        assert_eq!(
            (
                problem.device.as_path(),
                problem.field.as_str(),
                problem.found.as_str(),
                problem.expected.as_str()
            ),
            (Path::new(DEV), tamper.field, tamper.found, tamper.expected),
            "{}",
            tamper.what
        );
        let text = err.to_string();
        assert!(
            text.starts_with(&format!(
                "the LUKS2 header of /dev/vdb says {} {}, cvm-warden formats {}: ",
                tamper.field, tamper.found, tamper.expected
            )),
            "{}: {text}",
            tamper.what
        );
        assert!(text.contains("restore the header from a backup"), "{text}");
        // Stopped right after the check: no key tried, nothing opened or mounted.
        assert_eq!(
            fake.ops(),
            vec![VolumeOp::Inspect, VolumeOp::CheckFormat],
            "{}",
            tamper.what
        );
        assert!(fake.mappings().is_empty() && fake.mounts().is_empty());
    }
}

#[test]
fn cipher_null_refusal_message_is_exact() {
    let mut header = HeaderFormat::cvm_warden(None);
    header.segments[0].encryption = Some("cipher_null-ecb".to_string());
    let fake = FakeVolumes::new()
        .with_luks2(DEV, &key_bytes(7), &[RES])
        .with_header(DEV, header);
    assert_eq!(
        unlock(&fake, &spec(true), &key(7)).unwrap_err().to_string(),
        "the LUKS2 header of /dev/vdb says cipher cipher_null-ecb, cvm-warden formats \
         aes-xts-plain64: the header was changed or does not match the policy, so the volume is \
         not opened; restore the header from a backup (`cryptsetup luksHeaderRestore /dev/vdb \
         --header-backup-file <file>`) or reformat the volume"
    );
}

#[test]
fn integrity_must_match_the_policy_both_ways() {
    // The policy asks for integrity; the header has none (a host dropped it).
    let fake = FakeVolumes::new().with_luks2(DEV, &key_bytes(7), &[RES]);
    let mut s = spec(true);
    s.integrity = Some(Integrity::HmacSha256);
    let err = unlock(&fake, &s, &key(7)).unwrap_err();
    let VolumeError::HeaderFormat(problem) = &err else {
        panic!("{err}");
    };
    assert_eq!(problem.field, "integrity");
    assert_eq!(problem.found, "none");
    assert_eq!(
        problem.expected,
        "hmac(sha256) for the policy's integrity = \"hmac-sha256\""
    );
    assert_eq!(fake.ops(), vec![VolumeOp::Inspect, VolumeOp::CheckFormat]);

    // Integrity in both, but a 64-byte volume key where integrity needs 96.
    let mut header = HeaderFormat::cvm_warden(Some(Integrity::HmacSha256));
    header.keyslots[0].key_size = Some(64);
    let fake = FakeVolumes::new()
        .with_luks2(DEV, &key_bytes(7), &[RES])
        .with_header(DEV, header);
    let err = unlock(&fake, &s, &key(7)).unwrap_err();
    assert!(
        err.to_string()
            .contains("says volume key size (keyslot 0) 64 bytes, cvm-warden formats 96 bytes"),
        "{err}"
    );

    // The format cvm-warden writes with integrity unlocks under that policy.
    let fake = FakeVolumes::new()
        .with_luks2(DEV, &key_bytes(7), &[RES])
        .with_header(DEV, HeaderFormat::cvm_warden(Some(Integrity::HmacSha256)))
        .with_fs(DEV, Some(ROOT));
    unlock(&fake, &s, &key(7)).unwrap();
    assert!(fake.calls().contains(&VolumeCall::CheckFormat {
        device: PathBuf::from(DEV),
        integrity: Some(Integrity::HmacSha256)
    }));
}

#[test]
fn a_key_added_with_luksaddkey_defaults_still_passes() {
    // cryptsetup luksAddKey on an aes-xts-plain64 volume writes a luks2 keyslot with a
    // 64-byte volume key in an aes-xts-plain64 area with a 64-byte key.
    let mut header = HeaderFormat::cvm_warden(None);
    let mut added = header.keyslots[0].clone();
    added.id = "1".to_string();
    header.keyslots.push(added);
    let fake = FakeVolumes::new()
        .with_luks2(DEV, &key_bytes(7), &[RES])
        .with_header(DEV, header)
        .with_fs(DEV, Some(ROOT));
    unlock(&fake, &spec(true), &key(7)).unwrap();
}

#[test]
fn open_checks_the_header_again() {
    let mut header = HeaderFormat::cvm_warden(None);
    header.segments[0].encryption = Some("cipher_null-ecb".to_string());
    let fake = FakeVolumes::new()
        .with_luks2(DEV, &key_bytes(7), &[RES])
        .with_header(DEV, header);
    let err = fake
        .open(Path::new(DEV), "workspace", &key(7), None)
        .unwrap_err();
    assert!(matches!(err, VolumeError::HeaderFormat(_)), "{err}");
    assert!(fake.mappings().is_empty());
}
