//! LUKS2 volumes opened with keys the key broker released; blank volumes formatted on first
//! boot; nothing that holds data is ever formatted.
//!
//! # Shape
//!
//! - [`decide`](mod@decide) (pure): [`classify`] reads a device's first MiB into a [`DeviceState`];
//!   [`decide()`] turns it into an [`Action`] or a [`Refusal`]; [`check_token`] compares the
//!   LUKS2 token with the policy and returns the volume's [`TokenState`]; [`fs_step`] turns
//!   that into what happens to the file system; [`check_root`] compares the mounted root with
//!   the policy; [`check_format`] compares the header's format with what cvm-warden formats.
//! - [`Volumes`]: the effect seam (inspect, format, check format, tokens and their state,
//!   verify, open, close, mkfs, mount, root mode, unmount).
//!   [`RealVolumes`] does it with libcryptsetup, `mkfs.ext4` and mount(2); [`FakeVolumes`]
//!   records the calls for unit tests.
//! - [`unlock`]: the whole flow for one volume, through a `&dyn Volumes`.
//!
//! # The decision (never lose data)
//!
//! | device | `format_if_blank` | outcome |
//! |---|---|---|
//! | LUKS2 header | any | unlock |
//! | no header, first MiB all zeros | true | format, unlock, mkfs.ext4 |
//! | no header, first MiB all zeros | false | refused: "… is blank; set format_if_blank = true …" |
//! | no header, any non-zero byte in the first MiB | any | refused: "refusing to format /dev/vdb: it holds data but no LUKS2 header" |
//! | LUKS1 header (or an unknown LUKS version) | any | refused |
//! | first MiB zero, LUKS2 secondary header at 1, 2 or 4 MiB | any | refused (recoverable with `cryptsetup repair`) |
//!
//! [`RealVolumes::format`] inspects the device again itself and formats only a blank one, so
//! no caller can format a device that holds data.
//!
//! # Volume states (never reformat a ready volume)
//!
//! The `cvm-warden-kbs` token carries `"state"`: `initialising` is written with the token at
//! luksFormat, before any file system exists; `ready` only after `mkfs.ext4 -E
//! root_owner=UID:GID`, the mount, the root's mode set, the root checked and the file system
//! synced (`syncfs`), so `ready` never describes blocks still in the page cache. The workload
//! starts only after every volume is ready, so no data can be on a volume that says
//! `initialising`:
//!
//! | token state | device decision | [`FsStep`] |
//! |---|---|---|
//! | `initialising` | formatted this boot | `Make`: mkfs, mount, chmod, check, sync, `ready` |
//! | `initialising` | LUKS2 found (an earlier first boot stopped) | `Resume`: the same, audited first |
//! | `ready`, or no state (older release, bound by hand) | any | `Use`: mount, check the root; never mkfs |
//! | anything else | any | refused ([`VolumeError::BadToken`]) |
//!
//! A `ready` volume that does not mount is refused with [`VolumeError::NotMounted`]: it names
//! the volume, says it is ready and nothing was formatted, and the likely cause from
//! mount(2)'s errno. A `ready` volume whose root differs from the policy's owner, group and
//! mode is unmounted, closed and refused ([`RootMismatch`]): its data may belong to someone
//! else, so cvm-warden does not chown it. A failure between luksFormat and `ready` leaves the
//! token `initialising`, and the next boot resumes.
//!
//! The state is metadata the host could rewrite like the rest of the header (unkeyed
//! checksum): turning `ready` into `initialising` gets the file system made again through the
//! same key, which destroys data (the host can always do that) but discloses nothing.
//!
//! One window remains: luksFormat writes the header, the keyslot and the token in three
//! header updates, milliseconds apart. A boot that stops between them leaves a LUKS2 header
//! without a token (refused: [`TokenProblem::Missing`] says how to bind one) or without a
//! keyslot (the key opens nothing); zeroing the first 16 MiB makes it blank again.
//!
//! # Keys: a keyslot with PBKDF2-SHA256 at 1000 iterations, no benchmark
//!
//! The broker releases a high-entropy key (32 bytes or more of randomness). cvm-warden keys it
//! into LUKS2 keyslot 0 as the passphrase, with PBKDF2-SHA256 at 1000 iterations, the lowest
//! count libcryptsetup accepts, and `CRYPT_PBKDF_NO_BENCHMARK` (no timing run at format).
//!
//! **Why this is safe.** Password stretching (argon2id, many PBKDF2 iterations) makes each
//! guess of a *low-entropy* password expensive. A 256-bit random key has no dictionary to
//! walk: an attacker who has the header must try 2^256 keys, and 2^256 stays out of reach
//! whether each try costs one PBKDF2 run of 1000 iterations or a second of argon2id. The
//! stretching would only slow every boot down (cryptsetup's default argon2id is tuned to
//! ~2 s and up to 1 GiB of memory per unlock; the whole PBKDF2-1000 key check takes a few
//! milliseconds, see `cargo bench --bench unlock`) and add an out-of-memory failure mode in
//! small confidential VMs. For the same reason a key **shorter than 32 bytes is refused**
//! ([`VolumeError::KeyTooShort`], naming the resource): a broker resource shorter than 32
//! bytes is not a volume key, and no iteration count would make it one.
//!
//! **Why a keyslot rather than the broker key as the volume key.** The volume key stays a
//! fresh random key of the size the cipher needs (64 bytes for AES-XTS-512, plus 32 for
//! HMAC-SHA256 with integrity) even when the broker key is 32 bytes; the broker key can be
//! rotated by adding a keyslot (`cryptsetup luksAddKey`) without re-encrypting; and standard
//! tools open the volume for recovery (`cryptsetup open --key-file`).
//!
//! Keys live in [`VolumeKey`] (a `Zeroizing` buffer, no `Display`, a redacting `Debug`), are
//! passed by reference, and are never logged nor written to a file by this module.
//!
//! # Format
//!
//! LUKS2, `aes-xts-plain64` with a 512-bit key, 4096-byte sectors. With
//! `integrity = "hmac-sha256"`: LUKS2 authenticated encryption as
//! `cryptsetup luksFormat --integrity hmac-sha256` does it (integrity `hmac(sha256)`, a 768-bit
//! volume key: 512 for XTS, 256 for the HMAC). libcryptsetup formats the dm-integrity
//! superblock through a temporary device-mapper device, and the data area must then be wiped
//! through the mapping so every sector has a valid tag; both need device-mapper.
//! [`RealVolumes::format`] therefore checks for `/dev/mapper/control` *before* writing
//! anything and refuses without it. Hosts without device-mapper (the CI sandbox) test the
//! format on file images without integrity; the integrity format and wipe are exercised by
//! the VM test.
//!
//! # The header is checked before the key is tried
//!
//! LUKS2 metadata is protected by an unkeyed checksum only, and the host controls the disk. A
//! host can rewrite a header the guest wrote, switch the data segment to `cipher_null-ecb`,
//! recompute the checksum and put a plaintext ext4 in the data area: the keyslot still opens
//! with the broker key and the token still matches. Or it adds a keyslot whose area is not
//! encrypted (`cipher_null`) holding a volume key it chose. So before the key is tried and
//! again on the header that [`RealVolumes`] activates from, [`check_format`] requires exactly
//! what cvm-warden formats: one data segment of type `crypt`, cipher `aes-xts-plain64`, a
//! 64-byte volume key (96 with integrity), the policy's integrity (none, or `hmac(sha256)`),
//! 4096-byte sectors, and every keyslot a `luks2` keyslot holding a volume key of that size in
//! an `aes-xts-plain64` area with a 64-byte key. Anything else fails closed, naming the
//! device, the field, what the header says and what cvm-warden formats. A volume whose keys
//! are added with `cryptsetup luksAddKey` (defaults) still passes.
//!
//! The LUKS2 header carries a token `{"type":"cvm-warden-kbs","keyslots":["0"],
//! "resource":"kbs:///…","state":"ready"}` naming the broker resource (visible in `cryptsetup
//! luksDump --dump-json-metadata`). On unlock the token's resource must equal the policy's; a
//! mismatch fails closed naming both.
//!
//! # Threads
//!
//! libcryptsetup-rs (without its `mutex` feature) panics when it is called from a thread
//! other than the first one that called it. [`RealVolumes`] therefore runs every libcryptsetup
//! call on one dedicated worker thread, so callers (the boot runner, test threads) may be any
//! thread.

use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use crate::policy::{ResourceUri, Volume};

pub mod decide;
mod fake;
mod luks;

pub use decide::{
    check_format, check_root, check_token, classify, decide, fs_step, not_mounted_text,
    parse_token, token_json, volume_key_bytes, Action, DeviceState, FormatProblem, FsStep,
    HeaderFormat, KbsToken, KeyslotFormat, Refusal, RootAttrs, RootMismatch, SegmentFormat,
    TokenProblem, TokenState, TOKEN_TYPE,
};
pub use fake::{FakeVolumes, VolumeCall, VolumeOp};
pub use luks::RealVolumes;

/// The cipher, as `cryptsetup --cipher` writes it.
pub const CIPHER: (&str, &str) = ("aes", "xts-plain64");
/// Bytes of the XTS key (512 bits: AES-256 in XTS mode).
pub const CIPHER_KEY_BYTES: usize = 64;
/// Encryption sector size.
pub const SECTOR_SIZE: u32 = 4096;
/// PBKDF2 iterations of the keyslot: libcryptsetup's minimum.
pub const PBKDF2_ITERATIONS: u32 = 1000;

/// A key the broker released for a volume. Holds the bytes in a `Zeroizing` buffer; its
/// `Debug` shows the resource and length only; it has no `Display`.
pub struct VolumeKey {
    bytes: Zeroizing<Vec<u8>>,
    resource: ResourceUri,
}

impl VolumeKey {
    /// Shortest accepted key: 32 bytes (256 bits).
    pub const MIN_LEN: usize = 32;

    /// Wraps the key released for `resource`; refuses one shorter than [`Self::MIN_LEN`].
    pub fn new(bytes: Zeroizing<Vec<u8>>, resource: ResourceUri) -> Result<Self, VolumeError> {
        if bytes.len() < Self::MIN_LEN {
            return Err(VolumeError::KeyTooShort {
                resource,
                len: bytes.len(),
            });
        }
        Ok(Self { bytes, resource })
    }

    /// The broker resource the key was released for.
    pub fn resource(&self) -> &ResourceUri {
        &self.resource
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Always false (a key has at least [`Self::MIN_LEN`] bytes).
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// The secret bytes, for libcryptsetup only.
    pub(crate) fn expose(&self) -> &[u8] {
        &self.bytes
    }
}

impl std::fmt::Debug for VolumeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VolumeKey")
            .field("resource", &self.resource.to_string())
            .field("len", &self.bytes.len())
            .field("bytes", &"<redacted>")
            .finish()
    }
}

/// Authenticated encryption modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Integrity {
    /// `hmac-sha256`: dm-integrity with HMAC-SHA256 tags keyed from the volume key.
    HmacSha256,
}

impl Integrity {
    /// Parses the policy's `integrity` value.
    pub fn parse(text: &str) -> Result<Self, String> {
        match text {
            "hmac-sha256" => Ok(Self::HmacSha256),
            other => Err(format!(
                "integrity {other:?} is not supported; write integrity = \"hmac-sha256\" or leave it out"
            )),
        }
    }

    /// The policy spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::HmacSha256 => "hmac-sha256",
        }
    }

    /// The libcryptsetup spelling (kernel crypto API name).
    pub fn crypto_api_name(self) -> &'static str {
        match self {
            Self::HmacSha256 => "hmac(sha256)",
        }
    }

    /// Bytes of the integrity key appended to the volume key.
    pub fn key_bytes(self) -> usize {
        match self {
            Self::HmacSha256 => 32,
        }
    }
}

/// Mount options the caller chooses; `nosuid` and `nodev` are always set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MountOptions {
    /// Mount with `noexec` (the policy's `allow_exec = false`).
    pub noexec: bool,
}

/// Everything [`unlock`] needs about one volume, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeSpec {
    /// Device-mapper name (`/dev/mapper/<name>`).
    pub name: String,
    /// Block device.
    pub device: PathBuf,
    /// Broker resource of the key.
    pub resource: ResourceUri,
    /// Mount point.
    pub mountpoint: PathBuf,
    /// Format when blank.
    pub format_if_blank: bool,
    /// Authenticated encryption, if any.
    pub integrity: Option<Integrity>,
    /// Mount options.
    pub mount: MountOptions,
    /// Owner, group and mode of the file system's root: set on a new file system, checked at
    /// every mount.
    pub root: RootAttrs,
}

impl VolumeSpec {
    /// Builds the spec of a policy volume (`noexec` unless the policy says `allow_exec`).
    pub fn from_policy(volume: &Volume) -> Result<Self, VolumeError> {
        let bad = |what: &'static str, value: &str, reason: String| VolumeError::BadSpec {
            volume: volume.name.clone(),
            what,
            value: value.to_string(),
            reason,
        };
        if !dm_name_ok(&volume.name) {
            return Err(bad(
                "name",
                &volume.name,
                "a device-mapper name is 1 to 127 characters of [A-Za-z0-9_.-] and not . or .."
                    .to_string(),
            ));
        }
        let integrity = match &volume.integrity {
            None => None,
            Some(text) => Some(Integrity::parse(text).map_err(|r| bad("integrity", text, r))?),
        };
        Ok(Self {
            name: volume.name.clone(),
            device: volume.device.clone(),
            resource: volume.key.clone(),
            mountpoint: volume.mount.clone(),
            format_if_blank: volume.format_if_blank,
            integrity,
            mount: MountOptions {
                noexec: !volume.allow_exec,
            },
            root: RootAttrs {
                uid: volume.owner,
                gid: volume.group,
                mode: volume.mode,
            },
        })
    }
}

fn dm_name_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 127
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// What [`unlock`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unlocked {
    /// Device-mapper name.
    pub name: String,
    /// The mapped device (`/dev/mapper/<name>`).
    pub mapped: PathBuf,
    /// The keyslot the key opened.
    pub keyslot: u32,
    /// Whether this boot formatted the device (first boot).
    pub formatted: bool,
    /// What was done to the file system: made (first boot), made again (an interrupted
    /// first boot resumed) or used.
    pub step: FsStep,
    /// Owner, group and mode of the mounted root (the policy's: checked).
    pub root: RootAttrs,
}

/// What [`unlock_notified`] is about to do, or did, to a volume's persistent state, so the
/// caller can audit it: before luksFormat, before a resumed first boot's `mkfs.ext4`, and
/// after the token says `ready`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Notice {
    /// A blank device is about to be formatted (LUKS2, token `initialising`).
    Format,
    /// The token says `initialising`: the file system is about to be made again.
    Resume,
    /// The file system is made, its root has the policy's owner and mode, and the token now
    /// says `ready`.
    Ready,
}

/// An error of the [`unlock_notified`] callback (an audit record that could not be written).
pub type NoticeError = Box<dyn std::error::Error + Send + Sync>;

/// Errors of the volume capability. Messages name the device, the resource and what the
/// operator should do; they never contain key material.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// The decision refused the device; nothing was written.
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// The token check failed closed.
    #[error(transparent)]
    Token(#[from] TokenProblem),
    /// The LUKS2 header does not say what cvm-warden formats; nothing was opened.
    #[error(transparent)]
    HeaderFormat(#[from] FormatProblem),
    /// The broker released fewer than 32 bytes.
    #[error(
        "broker resource {resource} released {len} bytes, but a broker resource shorter than 32 \
         bytes is not a volume key; store 32 or more random bytes under it \
         (e.g. `head -c 32 /dev/urandom`)"
    )]
    KeyTooShort {
        /// The resource.
        resource: ResourceUri,
        /// Bytes released.
        len: usize,
    },
    /// The key handed in was released for another resource than the volume's.
    #[error("volume {volume:?} needs the key of {expected}, but was handed the key of {got}")]
    WrongResource {
        /// The volume.
        volume: String,
        /// The policy's resource (`kbs:///…`).
        expected: String,
        /// The key's resource (`kbs:///…`).
        got: String,
    },
    /// A policy value cannot be used.
    #[error("volume {volume:?}: {what} {value:?} cannot be used: {reason}")]
    BadSpec {
        /// The volume.
        volume: String,
        /// Which field.
        what: &'static str,
        /// Its value.
        value: String,
        /// Why, and what to write instead.
        reason: String,
    },
    /// [`Volumes::format`] was called on a device that already has a LUKS2 header.
    #[error(
        "refusing to format {}: it already has a LUKS2 header; nothing was written",
        device.display()
    )]
    AlreadyLuks2 {
        /// The device.
        device: PathBuf,
    },
    /// A `cvm-warden-kbs` token cannot be read.
    #[error(
        "LUKS2 token {id} of {} has type {TOKEN_TYPE} but is malformed: {reason}; replace it \
         (`cryptsetup token remove --token-id {id}`, then `cryptsetup token import`)",
        device.display()
    )]
    BadToken {
        /// The device.
        device: PathBuf,
        /// Token number.
        id: u32,
        /// What is wrong.
        reason: String,
    },
    /// Reading the device's first bytes failed.
    #[error(
        "cannot read the start of {} to tell a LUKS2 volume from a blank device; check that \
         the device exists and is readable", device.display()
    )]
    Inspect {
        /// The device.
        device: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Formatting with integrity needs device-mapper, which is missing.
    #[error(
        "formatting {} with integrity {} needs device-mapper ({} is missing) to initialise the \
         integrity tags; load dm_mod and dm_integrity in the VM, or leave integrity out; \
         nothing was written", device.display(), integrity.as_str(), control.display()
    )]
    NoDeviceMapper {
        /// The device.
        device: PathBuf,
        /// The integrity mode.
        integrity: Integrity,
        /// The control node looked for.
        control: PathBuf,
    },
    /// Formatting failed after libcryptsetup started writing.
    #[error(
        "formatting {0} failed while {step}; the device may now hold a partial LUKS2 layout and \
         will be refused on the next boot: if it holds nothing of value, zero its first 16 MiB \
         (`dd if=/dev/zero of={0} bs=1M count=16 conv=fsync`) before booting again",
        device.display()
    )]
    Format {
        /// The device.
        device: PathBuf,
        /// What was being done.
        step: &'static str,
        /// Cause.
        #[source]
        source: libcryptsetup_rs::LibcryptErr,
    },
    /// The key opens no keyslot.
    #[error(
        "the key released for {resource} opens no keyslot of {}: the broker holds a different \
         key than the one this volume was formatted with; check the broker resource (a \
         rotated key must be added with `cryptsetup luksAddKey` first)", device.display()
    )]
    KeyRejected {
        /// The device.
        device: PathBuf,
        /// The resource.
        resource: ResourceUri,
    },
    /// Another libcryptsetup operation failed.
    #[error("libcryptsetup could not {op} {}", device.display())]
    Crypt {
        /// What was being done.
        op: &'static str,
        /// The device or mapping.
        device: PathBuf,
        /// Cause.
        #[source]
        source: libcryptsetup_rs::LibcryptErr,
    },
    /// mkfs.ext4 could not be run to completion (not installed, hung, …); the cause says
    /// what to do.
    #[error("cannot run mkfs.ext4 to make a file system on {}", device.display())]
    MkfsSpawn {
        /// The device.
        device: PathBuf,
        /// Cause.
        #[source]
        source: crate::tool::ToolError,
    },
    /// mkfs.ext4 failed.
    #[error("{} {} failed ({status}): {stderr}", tool.display(), device.display())]
    Mkfs {
        /// The tool.
        tool: PathBuf,
        /// The device.
        device: PathBuf,
        /// Exit status.
        status: std::process::ExitStatus,
        /// Its standard error, trimmed.
        stderr: String,
    },
    /// Creating the mount point failed.
    #[error("cannot create mount point {}", path.display())]
    Mountpoint {
        /// The mount point.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// mount(2) failed (the unlock flow wraps it in [`VolumeError::NotMounted`], which says
    /// what it likely means).
    #[error(
        "cannot mount {} on {} (ext4, {options})",
        device.display(), target.display()
    )]
    Mount {
        /// The mapped device.
        device: PathBuf,
        /// The mount point.
        target: PathBuf,
        /// The options, as mount(8) prints them.
        options: String,
        /// Cause.
        #[source]
        source: nix::errno::Errno,
    },
    /// A volume's file system did not mount; says whether it is `ready` (then nothing was
    /// formatted) or was just made, and the likely cause.
    #[error("{}", not_mounted_text(volume, device, mapped, *step, Some(*errno)))]
    NotMounted {
        /// The policy's volume name.
        volume: String,
        /// The LUKS2 device.
        device: PathBuf,
        /// The mapped device.
        mapped: PathBuf,
        /// Whether the file system was made this boot or is a ready one.
        step: FsStep,
        /// mount(2)'s errno.
        errno: nix::errno::Errno,
        /// The mount error.
        #[source]
        source: Box<VolumeError>,
    },
    /// The root of a ready volume is not what the policy says (nothing was changed).
    #[error(transparent)]
    RootMismatch(#[from] RootMismatch),
    /// The root of a file system made this boot is not what the policy says after
    /// `mkfs.ext4 -E root_owner` and chmod.
    #[error(
        "volume {volume:?}: the root of the file system just made (mounted on {}) has {found} \
         after mkfs.ext4 -E root_owner and chmod, not the policy's {expected}; its LUKS2 token \
         still says initialising, so the next boot makes the file system again; check that the \
         image's mkfs.ext4 (e2fsprogs 1.42 or later) honours -E root_owner",
        mountpoint.display()
    )]
    NewRootWrong {
        /// The policy's volume name.
        volume: String,
        /// Where it is mounted.
        mountpoint: PathBuf,
        /// The policy's owner, group and mode.
        expected: RootAttrs,
        /// What the root holds.
        found: RootAttrs,
    },
    /// Reading or setting the root's owner and mode, or syncing the file system, failed.
    #[error("cannot {what} {} (the root of a volume's file system)", path.display())]
    Root {
        /// What was being done.
        what: &'static str,
        /// The mount point.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// umount(2) failed.
    #[error("cannot unmount {}", path.display())]
    Unmount {
        /// The mount point.
        path: PathBuf,
        /// Cause.
        #[source]
        source: nix::errno::Errno,
    },
    /// The caller could not record a [`Notice`] (the audit log); the flow stopped there (a
    /// format or resume not recorded is not done) and the volume is not used.
    #[error("volume {volume:?}: cannot record {what} in the audit log, so the volume is not used")]
    Notice {
        /// The policy's volume name.
        volume: String,
        /// What was to be recorded.
        what: &'static str,
        /// Cause.
        #[source]
        source: NoticeError,
    },
    /// The libcryptsetup worker thread is gone.
    #[error("the libcryptsetup worker thread is gone ({0}); the boot cannot continue")]
    Worker(&'static str),
}

/// The effects of the volume capability: the seam the unlock stage goes through.
pub trait Volumes {
    /// Reads the device's first MiB (and the LUKS2 secondary-header offsets past it).
    fn inspect(&self, device: &Path) -> Result<DeviceState, VolumeError>;
    /// Formats a blank device: LUKS2, keyslot for `key`, token naming `key.resource()`, and
    /// with `integrity` the dm-integrity initialisation. Returns the keyslot. Refuses a device
    /// that is not blank.
    fn format(
        &self,
        device: &Path,
        key: &VolumeKey,
        integrity: Option<Integrity>,
    ) -> Result<u32, VolumeError>;
    /// Checks that the LUKS2 header says exactly what cvm-warden formats with `integrity` (the
    /// policy's): [`check_format`] on the header's metadata. Fails closed with
    /// [`VolumeError::HeaderFormat`] naming the field, what the header says and what was
    /// expected.
    fn check_format(&self, device: &Path, integrity: Option<Integrity>) -> Result<(), VolumeError>;
    /// The device's `cvm-warden-kbs` tokens (resource and state). Fails closed on a token of
    /// ours that is malformed ([`VolumeError::BadToken`]).
    fn token_resources(&self, device: &Path) -> Result<Vec<KbsToken>, VolumeError>;
    /// Writes `state` into every `cvm-warden-kbs` token of the device (its other members are
    /// kept).
    fn set_token_state(&self, device: &Path, state: TokenState) -> Result<(), VolumeError>;
    /// Checks that `key` opens a keyslot (no mapping is created); returns the keyslot. It does
    /// not check the header format: call [`Volumes::check_format`] first.
    fn verify_key(&self, device: &Path, key: &VolumeKey) -> Result<u32, VolumeError>;
    /// Activates the dm-crypt mapping `name`; returns the mapped device. Checks the header
    /// format (as [`Volumes::check_format`] with `integrity`) again on the header it activates
    /// from, so a header changed after the check is not opened either.
    fn open(
        &self,
        device: &Path,
        name: &str,
        key: &VolumeKey,
        integrity: Option<Integrity>,
    ) -> Result<PathBuf, VolumeError>;
    /// Removes the mapping `name`.
    fn close(&self, name: &str) -> Result<(), VolumeError>;
    /// Makes an ext4 file system on the mapped device, without prompts, its root owned by
    /// `uid:gid` (`mkfs.ext4 -E root_owner=UID:GID`).
    fn mkfs_ext4(&self, mapped: &Path, uid: u32, gid: u32) -> Result<(), VolumeError>;
    /// Mounts the mapped device (ext4, `nosuid,nodev`, plus `noexec` when asked); returns the
    /// owner, group and mode of the mounted root.
    fn mount(
        &self,
        mapped: &Path,
        mountpoint: &Path,
        options: MountOptions,
    ) -> Result<RootAttrs, VolumeError>;
    /// Sets the mode of the mounted root, syncs the file system (so the state written next
    /// describes what is on disk), and returns the root's owner, group and mode.
    fn set_root_mode(&self, mountpoint: &Path, mode: u32) -> Result<RootAttrs, VolumeError>;
    /// Unmounts `mountpoint`.
    fn unmount(&self, mountpoint: &Path) -> Result<(), VolumeError>;
}

/// Unlocks one volume without auditing its state changes: [`unlock_notified`] with a callback
/// that records nothing.
pub fn unlock(
    vols: &dyn Volumes,
    spec: &VolumeSpec,
    key: &VolumeKey,
) -> Result<Unlocked, VolumeError> {
    unlock_notified(vols, spec, key, &mut |_| Ok(()))
}

/// Unlocks one volume: inspect → decide → (format, token `initialising`) → header format
/// check → token check (resource and state) → verify key → open → then, by [`fs_step`]:
///
/// - `initialising` (first boot, or a first boot that stopped before the volume was ready):
///   `mkfs.ext4 -E root_owner` → mount → root mode → check → sync → token `ready`;
/// - `ready` (or a token without state): mount → check the root's owner, group and mode;
///   never `mkfs.ext4`.
///
/// `notify` is called before luksFormat ([`Notice::Format`]), before a resumed first boot's
/// `mkfs.ext4` ([`Notice::Resume`]) and after the token says `ready` ([`Notice::Ready`]); an
/// error from it stops the flow. A failure after `open` unmounts and closes again (the first
/// error is the one returned). Nothing is formatted unless [`decide()`] said so; nothing is
/// opened unless the header says what cvm-warden formats with the policy's integrity
/// ([`check_format`]).
pub fn unlock_notified(
    vols: &dyn Volumes,
    spec: &VolumeSpec,
    key: &VolumeKey,
    notify: &mut dyn FnMut(Notice) -> Result<(), NoticeError>,
) -> Result<Unlocked, VolumeError> {
    if key.resource() != &spec.resource {
        return Err(VolumeError::WrongResource {
            volume: spec.name.clone(),
            expected: spec.resource.to_string(),
            got: key.resource().to_string(),
        });
    }
    let mut notice = |what: Notice, text: &'static str| {
        notify(what).map_err(|source| VolumeError::Notice {
            volume: spec.name.clone(),
            what: text,
            source,
        })
    };
    let state = vols.inspect(&spec.device)?;
    let action = decide(&spec.device, &state, spec.format_if_blank)?;
    let formatted = action == Action::FormatThenUnlock;
    if formatted {
        notice(Notice::Format, "the format of a blank device")?;
        log::info!(
            "formatting blank device {} as LUKS2 for volume {:?} (key {})",
            spec.device.display(),
            spec.name,
            spec.resource
        );
        vols.format(&spec.device, key, spec.integrity)?;
    }
    vols.check_format(&spec.device, spec.integrity)?;
    let tokens = vols.token_resources(&spec.device)?;
    let token_state = check_token(&spec.device, &tokens, &spec.resource)?;
    let step = fs_step(action, token_state);
    let keyslot = vols.verify_key(&spec.device, key)?;
    if step == FsStep::Resume {
        notice(Notice::Resume, "the resume of an interrupted first boot")?;
        log::warn!(
            "volume {:?} ({}): its LUKS2 token says initialising, so an earlier first boot \
             stopped before the volume was ready; making its file system again (no workload \
             ran on it)",
            spec.name,
            spec.device.display()
        );
    }
    let mapped = vols.open(&spec.device, &spec.name, key, spec.integrity)?;
    let mut mounted = false;
    let mut after_open = || -> Result<RootAttrs, VolumeError> {
        if step.makes_file_system() {
            vols.mkfs_ext4(&mapped, spec.root.uid, spec.root.gid)?;
        }
        let root =
            vols.mount(&mapped, &spec.mountpoint, spec.mount)
                .map_err(|source| match source {
                    // mount(2) itself failed: say what it likely means for this volume.
                    VolumeError::Mount { source: errno, .. } => VolumeError::NotMounted {
                        volume: spec.name.clone(),
                        device: spec.device.clone(),
                        mapped: mapped.clone(),
                        step,
                        errno,
                        source: Box::new(source),
                    },
                    other => other,
                })?;
        mounted = true;
        if !step.makes_file_system() {
            check_root(&spec.name, &spec.device, &spec.mountpoint, spec.root, root)?;
            return Ok(root);
        }
        let root = vols.set_root_mode(&spec.mountpoint, spec.root.mode)?;
        if root != spec.root {
            return Err(VolumeError::NewRootWrong {
                volume: spec.name.clone(),
                mountpoint: spec.mountpoint.clone(),
                expected: spec.root,
                found: root,
            });
        }
        vols.set_token_state(&spec.device, TokenState::Ready)?;
        notice(Notice::Ready, "that the volume is ready")?;
        Ok(root)
    };
    let result = after_open();
    let root = match result {
        Ok(root) => root,
        Err(err) => {
            if mounted {
                if let Err(unmount_err) = vols.unmount(&spec.mountpoint) {
                    log::warn!(
                        "unmounting {} after a failure failed too: {unmount_err}",
                        spec.mountpoint.display()
                    );
                }
            }
            if let Err(close_err) = vols.close(&spec.name) {
                log::warn!(
                    "closing {:?} after a failure failed too: {close_err}",
                    spec.name
                );
            }
            return Err(err);
        }
    };
    Ok(Unlocked {
        name: spec.name.clone(),
        mapped,
        keyslot,
        formatted,
        step,
        root,
    })
}

#[cfg(test)]
mod tests;
