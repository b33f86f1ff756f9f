//! The pure half of the volume capability: what the first bytes of a device say
//! ([`classify`]), what to do about it ([`decide`]), whether the LUKS2 token agrees with
//! the policy ([`check_token`]), and whether the LUKS2 header says what cvm-warden formats
//! ([`check_format`] on a [`HeaderFormat`] read from its JSON metadata). No I/O here; every
//! rule is unit-tested exhaustively.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::{Integrity, CIPHER_KEY_BYTES, SECTOR_SIZE};
use crate::policy::ResourceUri;

/// How many bytes at the start of a device decide "blank" (all zeros) versus "holds data".
pub const PROBE_LEN: usize = 1024 * 1024;

/// LUKS (1 and 2) primary header magic, at offset 0.
pub const LUKS_MAGIC: [u8; 6] = *b"LUKS\xba\xbe";

/// LUKS2 secondary header magic.
pub const LUKS2_SECONDARY_MAGIC: [u8; 6] = *b"SKUL\xba\xbe";

/// Offsets of a LUKS2 secondary header that lie at or past [`PROBE_LEN`] (LUKS2 metadata of
/// 1, 2 or 4 MiB). A device whose first MiB is zero but that has a secondary header there is a
/// LUKS2 volume with a wiped primary header, not a blank device.
pub const SECONDARY_OFFSETS_PAST_PROBE: [u64; 3] = [0x10_0000, 0x20_0000, 0x40_0000];

/// The LUKS2 token type cvm-warden writes and reads.
pub const TOKEN_TYPE: &str = "cvm-warden-kbs";

/// What the first bytes of a device say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceState {
    /// A LUKS2 primary header at offset 0.
    Luks2,
    /// A LUKS1 header at offset 0.
    Luks1,
    /// A LUKS header of a version this build does not know.
    LuksVersion(u16),
    /// No header and the first MiB (or the whole device, when smaller) is all zeros.
    Blank,
    /// No header and a non-zero byte in the first MiB.
    HoldsData {
        /// Offset of the first non-zero byte.
        first_nonzero: u64,
    },
    /// The first MiB is zero but a LUKS2 secondary header lies past it: a LUKS2 volume whose
    /// primary header was wiped, recoverable with `cryptsetup repair`.
    OrphanSecondaryHeader {
        /// Offset of the secondary header.
        offset: u64,
    },
}

/// What the unlock flow does with a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Open the existing LUKS2 volume.
    Unlock,
    /// First boot: format LUKS2, then open it and make an ext4 file system.
    FormatThenUnlock,
}

/// Why a device is neither unlocked nor formatted. Nothing was written to it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// No LUKS2 header and data in the first MiB.
    #[error("refusing to format {}: it holds data but no LUKS2 header", device.display())]
    HoldsData {
        /// The device.
        device: PathBuf,
    },
    /// Blank, and the policy does not allow formatting.
    #[error("{} is blank; set format_if_blank = true to format it on first boot", device.display())]
    BlankNotAllowed {
        /// The device.
        device: PathBuf,
    },
    /// A LUKS1 volume.
    #[error(
        "refusing to use {0}: it has a LUKS1 header and cvm-warden opens only LUKS2 volumes \
         (their token names the broker resource of the key); convert it with \
         `cryptsetup convert --type luks2 {0}` or point the volume at a LUKS2 device",
        device.display()
    )]
    Luks1 {
        /// The device.
        device: PathBuf,
    },
    /// A LUKS header of an unknown version.
    #[error(
        "refusing to use {}: it has a LUKS header of version {version}, which this build does \
         not know; nothing was written", device.display()
    )]
    UnknownLuksVersion {
        /// The device.
        device: PathBuf,
        /// The version field of the header.
        version: u16,
    },
    /// A wiped primary header with a surviving secondary header.
    #[error(
        "refusing to format {0}: its first MiB is zero but a LUKS2 secondary header lies at \
         offset {offset}; restore the primary header with `cryptsetup repair {0}`, or wipe the \
         device if its contents may be destroyed", device.display()
    )]
    OrphanSecondaryHeader {
        /// The device.
        device: PathBuf,
        /// Offset of the secondary header.
        offset: u64,
    },
}

/// Classifies a device from its first bytes (`head`: the first [`PROBE_LEN`] bytes, or the
/// whole device when it is smaller) and the 6 bytes read at each offset of
/// [`SECONDARY_OFFSETS_PAST_PROBE`] that lies inside the device (`past_probe`).
pub fn classify(head: &[u8], past_probe: &[(u64, [u8; 6])]) -> DeviceState {
    if head.len() >= 8 && head[..6] == LUKS_MAGIC {
        return match u16::from_be_bytes([head[6], head[7]]) {
            1 => DeviceState::Luks1,
            2 => DeviceState::Luks2,
            other => DeviceState::LuksVersion(other),
        };
    }
    if let Some(index) = head.iter().position(|&b| b != 0) {
        return DeviceState::HoldsData {
            first_nonzero: index as u64,
        };
    }
    if let Some((offset, _)) = past_probe
        .iter()
        .find(|(_, magic)| *magic == LUKS2_SECONDARY_MAGIC)
    {
        return DeviceState::OrphanSecondaryHeader { offset: *offset };
    }
    DeviceState::Blank
}

/// Where, past the first MiB, [`classify_samples`] looks for data: one MiB at each
/// power-of-two MiB offset (1, 2, 4, … MiB) and the device's last MiB. A device whose first
/// MiB was wiped (`wipefs`, a zeroed partition table) but that holds a file system or a
/// volume further on is not blank; reading every byte of a large disk at each boot is not
/// affordable, so this samples where data usually starts and ends.
pub fn sample_offsets(device_len: u64) -> Vec<u64> {
    let mib = PROBE_LEN as u64;
    let mut offsets = Vec::new();
    let mut at = mib;
    while at < device_len {
        offsets.push(at);
        at = at.saturating_mul(2);
    }
    if device_len > 2 * mib {
        let last = device_len - mib;
        if !offsets.contains(&last) {
            offsets.push(last);
        }
    }
    offsets
}

/// [`classify`], and a device it finds blank holds data after all when any of `samples`
/// (offset, bytes read there; see [`sample_offsets`]) has a nonzero byte.
pub fn classify_samples(
    head: &[u8],
    past_probe: &[(u64, [u8; 6])],
    samples: &[(u64, Vec<u8>)],
) -> DeviceState {
    match classify(head, past_probe) {
        DeviceState::Blank => samples
            .iter()
            .find_map(|(offset, bytes)| {
                bytes
                    .iter()
                    .position(|&b| b != 0)
                    .map(|i| DeviceState::HoldsData {
                        first_nonzero: offset + i as u64,
                    })
            })
            .unwrap_or(DeviceState::Blank),
        other => other,
    }
}

/// The unlock decision. Only a LUKS2 volume is unlocked; only a blank device whose policy says
/// `format_if_blank = true` is formatted; everything else is refused, whatever
/// `format_if_blank` says.
pub fn decide(
    device: &Path,
    state: &DeviceState,
    format_if_blank: bool,
) -> Result<Action, Refusal> {
    let device = device.to_path_buf();
    match state {
        DeviceState::Luks2 => Ok(Action::Unlock),
        DeviceState::Blank if format_if_blank => Ok(Action::FormatThenUnlock),
        DeviceState::Blank => Err(Refusal::BlankNotAllowed { device }),
        DeviceState::HoldsData { .. } => Err(Refusal::HoldsData { device }),
        DeviceState::Luks1 => Err(Refusal::Luks1 { device }),
        DeviceState::LuksVersion(version) => Err(Refusal::UnknownLuksVersion {
            device,
            version: *version,
        }),
        DeviceState::OrphanSecondaryHeader { offset } => Err(Refusal::OrphanSecondaryHeader {
            device,
            offset: *offset,
        }),
    }
}

/// What the `state` member of a `cvm-warden-kbs` token says about the volume.
///
/// `initialising` is written with the token at luksFormat, before the file system exists;
/// `ready` only after `mkfs.ext4`, the root's owner and mode set and synced. The workload
/// starts only after every volume is `ready`, so a volume still `initialising` on a later
/// boot can hold nothing the workload wrote: its file system is made again. A `ready` volume
/// is never formatted nor given a new file system.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenState {
    /// LUKS2 formatted, file system not (yet) finished.
    Initialising,
    /// File system made, root owner and mode set: the volume holds (or may hold) data.
    Ready,
}

impl TokenState {
    /// The token's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Initialising => "initialising",
            Self::Ready => "ready",
        }
    }

    /// Parses the token's spelling.
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "initialising" => Some(Self::Initialising),
            "ready" => Some(Self::Ready),
            _ => None,
        }
    }
}

impl std::fmt::Display for TokenState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One `cvm-warden-kbs` token as read from a LUKS2 header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KbsToken {
    /// The broker resource it names.
    pub resource: String,
    /// Its `state`; `None` for a token written before volume states existed (read as
    /// [`TokenState::Ready`]: such a volume went through a whole first boot or was bound by
    /// hand, and may hold data).
    pub state: Option<TokenState>,
}

impl KbsToken {
    /// A token naming `resource` in `state`.
    pub fn new(resource: impl Into<String>, state: Option<TokenState>) -> Self {
        Self {
            resource: resource.into(),
            state,
        }
    }

    /// The state the unlock flow acts on: a token without one is `ready`.
    pub fn effective_state(&self) -> TokenState {
        self.state.unwrap_or(TokenState::Ready)
    }
}

/// The LUKS2 token JSON cvm-warden writes: `type` and `keyslots` (both required by LUKS2;
/// keyslot numbers are strings), the broker resource the key comes from, and the volume's
/// [`TokenState`].
pub fn token_json(resource: &ResourceUri, keyslot: u32, state: TokenState) -> Value {
    json!({
        "type": TOKEN_TYPE,
        "keyslots": [keyslot.to_string()],
        "resource": resource.to_string(),
        "state": state.as_str(),
    })
}

/// The resource named by a token of type [`TOKEN_TYPE`]; `Ok(None)` for a token of another
/// type, an error text for one of ours without a string `resource`.
pub fn token_resource(token: &Value) -> Result<Option<String>, String> {
    Ok(parse_token(token)?.map(|t| t.resource))
}

/// A token of type [`TOKEN_TYPE`] read: `Ok(None)` for a token of another type, an error text
/// for one of ours without a string `resource`, or with a `state` other than `"initialising"`
/// or `"ready"` (fail closed: this build does not know what such a volume holds).
pub fn parse_token(token: &Value) -> Result<Option<KbsToken>, String> {
    if token.get("type").and_then(Value::as_str) != Some(TOKEN_TYPE) {
        return Ok(None);
    }
    let resource = match token.get("resource") {
        Some(Value::String(resource)) => resource.clone(),
        Some(other) => return Err(format!("its \"resource\" is {other}, not a string")),
        None => return Err("it has no \"resource\" member".to_string()),
    };
    let state = match token.get("state") {
        None => None,
        Some(Value::String(text)) => Some(TokenState::parse(text).ok_or_else(|| {
            format!("its \"state\" is {text:?}, neither \"initialising\" nor \"ready\"")
        })?),
        Some(other) => return Err(format!("its \"state\" is {other}, not a string")),
    };
    Ok(Some(KbsToken { resource, state }))
}

/// Why the token check failed closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenProblem {
    /// No token of ours.
    #[error(
        "{0} has no {TOKEN_TYPE} LUKS2 token naming its broker resource, so cvm-warden cannot \
         tell which key it belongs to; if {expected} is its key, bind it with `cryptsetup token \
         import {0} --json-file <file>` where the file holds {json}",
        device.display(),
        json = token_json(expected, 0, TokenState::Ready)
    )]
    Missing {
        /// The device.
        device: PathBuf,
        /// The policy's resource.
        expected: ResourceUri,
    },
    /// More than one token of ours, naming different resources.
    #[error(
        "{} has {TOKEN_TYPE} tokens naming different broker resources ({}); keep exactly one \
         (`cryptsetup token remove --token-id <n>`)",
        device.display(),
        found.join(", ")
    )]
    Ambiguous {
        /// The device.
        device: PathBuf,
        /// The resources named.
        found: Vec<String>,
    },
    /// The token names another resource than the policy.
    #[error(
        "the LUKS2 token of {} names broker resource {found} but the policy names {expected}; \
         the volume was formatted for another key: fix the volume's `key` in the policy or \
         point it at the right device",
        device.display()
    )]
    Mismatch {
        /// The device.
        device: PathBuf,
        /// What the token says.
        found: String,
        /// What the policy says.
        expected: ResourceUri,
    },
}

/// Compares the device's tokens with the policy's resource. Exactly one distinct resource,
/// equal to `expected`, passes; anything else fails closed. Returns the volume's state: `ready`
/// when any token says `ready` or says nothing (a volume that may hold data is never treated
/// as unfinished), `initialising` only when every token says so.
pub fn check_token(
    device: &Path,
    found: &[KbsToken],
    expected: &ResourceUri,
) -> Result<TokenState, TokenProblem> {
    let mut distinct: Vec<String> = found.iter().map(|t| t.resource.clone()).collect();
    distinct.sort();
    distinct.dedup();
    match distinct.as_slice() {
        [] => Err(TokenProblem::Missing {
            device: device.to_path_buf(),
            expected: expected.clone(),
        }),
        [only] if *only == expected.to_string() => {
            if found
                .iter()
                .all(|t| t.effective_state() == TokenState::Initialising)
            {
                Ok(TokenState::Initialising)
            } else {
                Ok(TokenState::Ready)
            }
        }
        [only] => Err(TokenProblem::Mismatch {
            device: device.to_path_buf(),
            found: only.clone(),
            expected: expected.clone(),
        }),
        _ => Err(TokenProblem::Ambiguous {
            device: device.to_path_buf(),
            found: distinct,
        }),
    }
}

/// What happens to the file system once the mapping is open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FsStep {
    /// First boot, the device was formatted just now: `mkfs.ext4` (root owner from the
    /// policy), mount, root mode, check, sync, mark the token `ready`.
    Make,
    /// The token says `initialising`: an earlier first boot stopped after luksFormat and
    /// before the volume was ready, so no workload ever ran on it. The same steps as
    /// [`FsStep::Make`], audited as a resume.
    Resume,
    /// The token says `ready` (or nothing): mount and check the root's owner, group and mode.
    /// Never `mkfs.ext4`, whatever happens.
    Use,
}

impl FsStep {
    /// Whether this step makes a file system.
    pub fn makes_file_system(self) -> bool {
        matches!(self, Self::Make | Self::Resume)
    }
}

/// The file system decision. Only a token that says `initialising` gets a new file system;
/// a `ready` one (or one written before volume states) is only mounted, whatever [`decide`]
/// said. Pure.
pub fn fs_step(action: Action, state: TokenState) -> FsStep {
    match (action, state) {
        (_, TokenState::Ready) => FsStep::Use,
        (Action::FormatThenUnlock, TokenState::Initialising) => FsStep::Make,
        (Action::Unlock, TokenState::Initialising) => FsStep::Resume,
    }
}

/// Owner, group and permission bits of a file system's root directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct RootAttrs {
    /// Owner uid.
    pub uid: u32,
    /// Group gid.
    pub gid: u32,
    /// Permission bits (`st_mode & 0o7777`).
    pub mode: u32,
}

impl std::fmt::Display for RootAttrs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "owner {} group {} mode {:04o}",
            self.uid, self.gid, self.mode
        )
    }
}

/// The root of a `ready` volume's file system is not what the policy says. The volume was
/// unmounted and closed; nothing was changed on it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "volume {volume:?}: the root of its file system (mounted on {}) has {found}, but the policy \
     says {expected}; cvm-warden does not change the owner or mode of a ready volume, which may \
     hold someone else's data, so it is not used: if this is the right volume, set the \
     volume's owner, group and mode in the policy to what it holds, or change its root from a \
     recovery boot (`cryptsetup open {}`, mount it, `chown {}:{}` and `chmod {:04o}` its root)",
    mountpoint.display(),
    device.display(),
    expected.uid,
    expected.gid,
    expected.mode
)]
pub struct RootMismatch {
    /// The policy's volume name.
    pub volume: String,
    /// The LUKS2 device.
    pub device: PathBuf,
    /// Where it was mounted.
    pub mountpoint: PathBuf,
    /// The policy's owner, group and mode.
    pub expected: RootAttrs,
    /// What the root holds.
    pub found: RootAttrs,
}

/// Compares the root of a mounted volume with the policy. Pure.
pub fn check_root(
    volume: &str,
    device: &Path,
    mountpoint: &Path,
    expected: RootAttrs,
    found: RootAttrs,
) -> Result<(), RootMismatch> {
    if found == expected {
        return Ok(());
    }
    Err(RootMismatch {
        volume: volume.to_string(),
        device: device.to_path_buf(),
        mountpoint: mountpoint.to_path_buf(),
        expected,
        found,
    })
}

/// Why a volume's file system did not mount, for the operator: the volume, its state, the
/// likely cause from mount(2)'s errno, and what was (not) done. Pure.
pub fn not_mounted_text(
    volume: &str,
    device: &Path,
    mapped: &Path,
    step: FsStep,
    errno: Option<nix::errno::Errno>,
) -> String {
    use nix::errno::Errno;
    let mapped_text = mapped.display();
    let no_fs = matches!(errno, Some(Errno::EINVAL | Errno::EUCLEAN | Errno::EBADMSG));
    let cause = match errno {
        Some(Errno::ENODEV) => "the kernel has no ext4 file system type: load the ext4 module \
                               (and crc32c_generic, which it needs) before the unlock stage"
            .to_string(),
        Some(Errno::ENOENT) => "ext4 could not get its crc32c checksum (or the mapped device \
                               is missing): load crc32c_generic before the unlock stage"
            .to_string(),
        Some(Errno::EIO) => format!(
            "reading {mapped_text} failed with an I/O error (with integrity: blocks changed \
             outside the VM)"
        ),
        _ if no_fs && step.makes_file_system() => format!(
            "the kernel does not accept the ext4 file system mkfs.ext4 just made on \
             {mapped_text} (a file system feature this kernel lacks? see the kernel log)"
        ),
        _ if no_fs => format!(
            "{mapped_text} holds no valid ext4 file system: a corrupted file system (check it \
             from a recovery boot with `e2fsck -n {mapped_text}`), or a first boot that stopped \
             before mkfs.ext4 under a cvm-warden release that recorded no volume state"
        ),
        Some(other) => format!(
            "mount(2) said {other}; check the kernel log for a missing module (ext4, \
             crc32c_generic) or a damaged file system (`e2fsck -n {mapped_text}` from a \
             recovery boot)"
        ),
        None => format!(
            "check the kernel log for a missing module (ext4, crc32c_generic) or a damaged file \
             system (`e2fsck -n {mapped_text}` from a recovery boot)"
        ),
    };
    match step {
        FsStep::Use => {
            let mut text = format!(
                "volume {volume:?} is ready (its LUKS2 token says its file system was made), but \
                 its file system did not mount: {cause}; nothing was formatted: cvm-warden never \
                 formats a ready volume"
            );
            if no_fs {
                let device = device.display();
                text.push_str(&format!(
                    "; if it holds nothing of value, zero its first 16 MiB (`dd if=/dev/zero \
                     of={device} bs=1M count=16 conv=fsync`) and the next boot formats it anew"
                ));
            }
            text
        }
        FsStep::Make | FsStep::Resume => format!(
            "volume {volume:?}: the file system just made on it did not mount: {cause}; its \
             LUKS2 token still says initialising (no workload ran on it), so the next boot makes \
             its file system again"
        ),
    }
}

// ---------------------------------------------------------------------------------------------
// The header format check.
//
// LUKS2 metadata is protected by an unkeyed checksum only, and the host controls the disk: it
// can rewrite a header cvm-warden wrote (switch the data segment to `cipher_null-ecb`, add a
// keyslot whose area is not encrypted and that holds a volume key of its choosing, drop the
// integrity) and recompute the checksum. The broker key still opens the keyslot and the token
// still matches, so nothing but an explicit check stops the guest from mounting a file system
// the host can read. [`check_format`] requires exactly what cvm-warden formats.

/// The cipher spec of the data segment and of every keyslot area cvm-warden writes.
pub const CIPHER_SPEC: &str = "aes-xts-plain64";

/// The LUKS2 segment type of an encrypted data segment.
pub const SEGMENT_TYPE: &str = "crypt";

/// The LUKS2 keyslot type libcryptsetup writes for a passphrase keyslot.
pub const KEYSLOT_TYPE: &str = "luks2";

/// Bytes of the key that encrypts a keyslot area (AES-256-XTS), as libcryptsetup writes it for
/// an `aes-xts-plain64` volume with or without integrity (also for `cryptsetup luksAddKey`).
pub const KEYSLOT_AREA_KEY_BYTES: u64 = 64;

/// How a LUKS2 header says the data and the keyslots are encrypted: the fields
/// [`check_format`] compares with what cvm-warden formats. [`HeaderFormat::from_metadata`]
/// reads it from the LUKS2 JSON metadata; a field that is absent or of the wrong JSON type is
/// `None` (and never matches).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderFormat {
    /// The segments, in the order of their ids.
    pub segments: Vec<SegmentFormat>,
    /// The keyslots, in the order of their ids.
    pub keyslots: Vec<KeyslotFormat>,
}

/// One LUKS2 segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentFormat {
    /// Segment id.
    pub id: String,
    /// `type` (`crypt` for an encrypted segment).
    pub kind: Option<String>,
    /// `encryption`: the cipher spec (`aes-xts-plain64`).
    pub encryption: Option<String>,
    /// `sector_size` in bytes.
    pub sector_size: Option<u64>,
    /// `integrity.type` (`hmac(sha256)`); `None` when the segment has no `integrity` member.
    pub integrity: Option<String>,
}

/// One LUKS2 keyslot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyslotFormat {
    /// Keyslot id.
    pub id: String,
    /// `type` (`luks2`).
    pub kind: Option<String>,
    /// `key_size`: bytes of the volume key the keyslot holds.
    pub key_size: Option<u64>,
    /// `area.encryption`: the cipher spec that encrypts the keyslot area.
    pub area_encryption: Option<String>,
    /// `area.key_size`: bytes of the key that encrypts the keyslot area.
    pub area_key_size: Option<u64>,
}

/// Bytes of the volume key cvm-warden formats: 64 for AES-256-XTS, plus the integrity key.
pub fn volume_key_bytes(integrity: Option<Integrity>) -> u64 {
    (CIPHER_KEY_BYTES + integrity.map_or(0, Integrity::key_bytes)) as u64
}

/// The members of a JSON object sorted by numeric id (LUKS2 ids are decimal strings); an empty
/// list when `value` is not an object.
fn by_id(value: &Value) -> Vec<(&String, &Value)> {
    let mut members: Vec<(&String, &Value)> = value
        .as_object()
        .map(|map| map.iter().collect())
        .unwrap_or_default();
    members.sort_by(|(a, _), (b, _)| {
        (a.parse::<u64>().ok(), a.as_str()).cmp(&(b.parse::<u64>().ok(), b.as_str()))
    });
    members
}

fn text_at(value: &Value, pointer: &str) -> Option<String> {
    value
        .pointer(pointer)
        .and_then(Value::as_str)
        .map(str::to_string)
}

fn number_at(value: &Value, pointer: &str) -> Option<u64> {
    value.pointer(pointer).and_then(Value::as_u64)
}

impl HeaderFormat {
    /// Reads the format from the LUKS2 JSON metadata (as `crypt_dump_json` and
    /// `cryptsetup luksDump --dump-json-metadata` print it).
    pub fn from_metadata(metadata: &Value) -> Self {
        let segments = by_id(&metadata["segments"])
            .into_iter()
            .map(|(id, segment)| SegmentFormat {
                id: id.clone(),
                kind: text_at(segment, "/type"),
                encryption: text_at(segment, "/encryption"),
                sector_size: number_at(segment, "/sector_size"),
                // A member that is there but malformed names itself (and never matches).
                integrity: segment.get("integrity").map(|integrity| {
                    text_at(integrity, "/type").unwrap_or_else(|| integrity.to_string())
                }),
            })
            .collect();
        let keyslots = by_id(&metadata["keyslots"])
            .into_iter()
            .map(|(id, keyslot)| KeyslotFormat {
                id: id.clone(),
                kind: text_at(keyslot, "/type"),
                key_size: number_at(keyslot, "/key_size"),
                area_encryption: text_at(keyslot, "/area/encryption"),
                area_key_size: number_at(keyslot, "/area/key_size"),
            })
            .collect();
        Self { segments, keyslots }
    }

    /// Exactly what cvm-warden formats: one `crypt` segment, `aes-xts-plain64`, 4096-byte
    /// sectors, `integrity`; keyslot 0 holding the volume key in an `aes-xts-plain64` area.
    pub fn cvm_warden(integrity: Option<Integrity>) -> Self {
        Self {
            segments: vec![SegmentFormat {
                id: "0".to_string(),
                kind: Some(SEGMENT_TYPE.to_string()),
                encryption: Some(CIPHER_SPEC.to_string()),
                sector_size: Some(u64::from(SECTOR_SIZE)),
                integrity: integrity.map(|i| i.crypto_api_name().to_string()),
            }],
            keyslots: vec![KeyslotFormat {
                id: "0".to_string(),
                kind: Some(KEYSLOT_TYPE.to_string()),
                key_size: Some(volume_key_bytes(integrity)),
                area_encryption: Some(CIPHER_SPEC.to_string()),
                area_key_size: Some(KEYSLOT_AREA_KEY_BYTES),
            }],
        }
    }
}

/// A LUKS2 header that does not say what cvm-warden formats. The volume is not opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the LUKS2 header of {0} says {field} {found}, cvm-warden formats {expected}: the header \
     was changed or does not match the policy, so the volume is not opened; restore the header \
     from a backup (`cryptsetup luksHeaderRestore {0} --header-backup-file <file>`) or \
     reformat the volume",
    device.display()
)]
pub struct FormatProblem {
    /// The device.
    pub device: PathBuf,
    /// Which field (`cipher`, `volume key size`, `keyslot 1 area cipher`, …).
    pub field: String,
    /// What the header says.
    pub found: String,
    /// What cvm-warden formats.
    pub expected: String,
}

fn shown<T: std::fmt::Display>(value: &Option<T>, unit: &str) -> String {
    match value {
        Some(value) => format!("{value}{unit}"),
        None => "nothing (the field is missing)".to_string(),
    }
}

/// Compares `found` with what cvm-warden formats for `integrity` (the policy's). Fails closed
/// on the first difference: the segment count, then the data segment's type, cipher,
/// integrity and sector size, then every keyslot's type, volume key size, area cipher and area
/// key size. A header without keyslots is refused too.
pub fn check_format(
    device: &Path,
    found: &HeaderFormat,
    integrity: Option<Integrity>,
) -> Result<(), FormatProblem> {
    let problem = |field: String, found: String, expected: String| FormatProblem {
        device: device.to_path_buf(),
        field,
        found,
        expected,
    };
    let segment = match found.segments.as_slice() {
        [segment] => segment,
        segments => {
            let ids: Vec<&str> = segments.iter().map(|s| s.id.as_str()).collect();
            return Err(problem(
                "segments".to_string(),
                format!("{} ({})", segments.len(), ids.join(", ")),
                "exactly one data segment".to_string(),
            ));
        }
    };
    if segment.kind.as_deref() != Some(SEGMENT_TYPE) {
        return Err(problem(
            format!("segment {} type", segment.id),
            shown(&segment.kind, ""),
            SEGMENT_TYPE.to_string(),
        ));
    }
    if segment.encryption.as_deref() != Some(CIPHER_SPEC) {
        return Err(problem(
            "cipher".to_string(),
            shown(&segment.encryption, ""),
            CIPHER_SPEC.to_string(),
        ));
    }
    let want_integrity = integrity.map(Integrity::crypto_api_name);
    if segment.integrity.as_deref() != want_integrity {
        return Err(problem(
            "integrity".to_string(),
            segment
                .integrity
                .clone()
                .unwrap_or_else(|| "none".to_string()),
            match integrity {
                Some(i) => format!(
                    "{} for the policy's integrity = \"{}\"",
                    i.crypto_api_name(),
                    i.as_str()
                ),
                None => "none for a policy without integrity".to_string(),
            },
        ));
    }
    if segment.sector_size != Some(u64::from(SECTOR_SIZE)) {
        return Err(problem(
            "sector size".to_string(),
            shown(&segment.sector_size, " bytes"),
            format!("{SECTOR_SIZE} bytes"),
        ));
    }
    if found.keyslots.is_empty() {
        return Err(problem(
            "keyslots".to_string(),
            "none".to_string(),
            "keyslot 0 for the broker key".to_string(),
        ));
    }
    let key_bytes = volume_key_bytes(integrity);
    for keyslot in &found.keyslots {
        let id = &keyslot.id;
        if keyslot.kind.as_deref() != Some(KEYSLOT_TYPE) {
            return Err(problem(
                format!("keyslot {id} type"),
                shown(&keyslot.kind, ""),
                KEYSLOT_TYPE.to_string(),
            ));
        }
        if keyslot.key_size != Some(key_bytes) {
            return Err(problem(
                format!("volume key size (keyslot {id})"),
                shown(&keyslot.key_size, " bytes"),
                format!("{key_bytes} bytes"),
            ));
        }
        if keyslot.area_encryption.as_deref() != Some(CIPHER_SPEC) {
            return Err(problem(
                format!("keyslot {id} area cipher"),
                shown(&keyslot.area_encryption, ""),
                CIPHER_SPEC.to_string(),
            ));
        }
        if keyslot.area_key_size != Some(KEYSLOT_AREA_KEY_BYTES) {
            return Err(problem(
                format!("keyslot {id} area key size"),
                shown(&keyslot.area_key_size, " bytes"),
                format!("{KEYSLOT_AREA_KEY_BYTES} bytes"),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    const DEV: &str = "/dev/vdb";

    fn luks_head(version: u16) -> Vec<u8> {
        let mut head = vec![0u8; 4096];
        head[..6].copy_from_slice(&LUKS_MAGIC);
        head[6..8].copy_from_slice(&version.to_be_bytes());
        head
    }

    fn uri(text: &str) -> ResourceUri {
        ResourceUri::parse(text).unwrap()
    }

    #[test]
    fn classify_reads_the_luks_version() {
        assert_eq!(classify(&luks_head(2), &[]), DeviceState::Luks2);
        assert_eq!(classify(&luks_head(1), &[]), DeviceState::Luks1);
        assert_eq!(classify(&luks_head(3), &[]), DeviceState::LuksVersion(3));
        assert_eq!(classify(&luks_head(0), &[]), DeviceState::LuksVersion(0));
    }

    #[test]
    fn classify_all_zeros_is_blank() {
        assert_eq!(classify(&vec![0u8; PROBE_LEN], &[]), DeviceState::Blank);
        assert_eq!(classify(&[0u8; 512], &[]), DeviceState::Blank);
    }

    #[test]
    fn classify_any_nonzero_byte_is_data_wherever_it_is() {
        for offset in [0usize, 1, 7, 1000, 4096, PROBE_LEN / 2, PROBE_LEN - 1] {
            let mut head = vec![0u8; PROBE_LEN];
            head[offset] = 0x01;
            assert_eq!(
                classify(&head, &[]),
                DeviceState::HoldsData {
                    first_nonzero: offset as u64
                },
                "byte at {offset}"
            );
        }
    }

    #[test]
    fn classify_partial_or_short_magic_is_data_not_a_header() {
        let mut head = vec![0u8; PROBE_LEN];
        head[..5].copy_from_slice(&LUKS_MAGIC[..5]);
        assert_eq!(
            classify(&head, &[]),
            DeviceState::HoldsData { first_nonzero: 0 }
        );
        // Magic without the version field (a 6-byte device).
        assert_eq!(
            classify(&LUKS_MAGIC, &[]),
            DeviceState::HoldsData { first_nonzero: 0 }
        );
        // A LUKS2 secondary header inside the first MiB is data (the primary is gone).
        let mut head = vec![0u8; PROBE_LEN];
        head[0x4000..0x4006].copy_from_slice(&LUKS2_SECONDARY_MAGIC);
        assert_eq!(
            classify(&head, &[]),
            DeviceState::HoldsData {
                first_nonzero: 0x4000
            }
        );
    }

    #[test]
    fn samples_cover_powers_of_two_and_the_last_mib() {
        const MIB: u64 = 1024 * 1024;
        assert_eq!(sample_offsets(MIB), Vec::<u64>::new());
        assert_eq!(
            sample_offsets(64 * MIB),
            [1, 2, 4, 8, 16, 32, 63].map(|m| m * MIB)
        );
        assert_eq!(sample_offsets(2 * MIB), [MIB]);
        let big = sample_offsets(10 << 40);
        assert!(big.len() <= 25, "{}", big.len());
    }

    #[test]
    fn data_past_a_zero_first_mib_is_not_blank() {
        let head = vec![0u8; PROBE_LEN];
        let mut sample = vec![0u8; PROBE_LEN];
        sample[4096] = 0x53;
        assert_eq!(
            classify_samples(&head, &[], &[(8 << 20, vec![0; 16]), (16 << 20, sample)]),
            DeviceState::HoldsData {
                first_nonzero: (16 << 20) + 4096
            }
        );
        assert_eq!(
            classify_samples(&head, &[], &[(8 << 20, vec![0; 16])]),
            DeviceState::Blank
        );
        // A header at offset 0 decides before any sample.
        let mut luks = head.clone();
        luks[..6].copy_from_slice(&LUKS_MAGIC);
        luks[7] = 2;
        assert_eq!(
            classify_samples(&luks, &[], &[(1 << 20, vec![1])]),
            DeviceState::Luks2
        );
    }

    #[test]
    fn classify_zero_head_with_a_secondary_header_past_it_is_not_blank() {
        let zeros = vec![0u8; PROBE_LEN];
        assert_eq!(
            classify(
                &zeros,
                &[(0x10_0000, [0; 6]), (0x20_0000, LUKS2_SECONDARY_MAGIC)]
            ),
            DeviceState::OrphanSecondaryHeader { offset: 0x20_0000 }
        );
        assert_eq!(
            classify(&zeros, &[(0x10_0000, *b"SKUL\0\0"), (0x40_0000, [0xff; 6])]),
            DeviceState::Blank
        );
    }

    /// Every state × both values of `format_if_blank`: only LUKS2 unlocks, only blank with
    /// `format_if_blank` formats.
    #[test]
    fn decide_is_exhaustive_and_formats_only_blank_devices_that_allow_it() {
        let dev = Path::new(DEV);
        let states = [
            DeviceState::Luks2,
            DeviceState::Luks1,
            DeviceState::LuksVersion(7),
            DeviceState::Blank,
            DeviceState::HoldsData {
                first_nonzero: 1000,
            },
            DeviceState::OrphanSecondaryHeader { offset: 0x20_0000 },
        ];
        for state in &states {
            for allow in [false, true] {
                let got = decide(dev, state, allow);
                let want = match (state, allow) {
                    (DeviceState::Luks2, _) => Ok(Action::Unlock),
                    (DeviceState::Blank, true) => Ok(Action::FormatThenUnlock),
                    (DeviceState::Blank, false) => {
                        Err(Refusal::BlankNotAllowed { device: dev.into() })
                    }
                    (DeviceState::HoldsData { .. }, _) => {
                        Err(Refusal::HoldsData { device: dev.into() })
                    }
                    (DeviceState::Luks1, _) => Err(Refusal::Luks1 { device: dev.into() }),
                    (DeviceState::LuksVersion(v), _) => Err(Refusal::UnknownLuksVersion {
                        device: dev.into(),
                        version: *v,
                    }),
                    (DeviceState::OrphanSecondaryHeader { offset }, _) => {
                        Err(Refusal::OrphanSecondaryHeader {
                            device: dev.into(),
                            offset: *offset,
                        })
                    }
                };
                assert_eq!(got, want, "{state:?} format_if_blank={allow}");
                if got == Ok(Action::FormatThenUnlock) {
                    assert_eq!((state, allow), (&DeviceState::Blank, true));
                }
            }
        }
    }

    #[test]
    fn refusal_messages_are_exact() {
        let holds = decide(
            Path::new("/dev/vdb"),
            &DeviceState::HoldsData {
                first_nonzero: 1000,
            },
            true,
        )
        .unwrap_err();
        assert_eq!(
            holds.to_string(),
            "refusing to format /dev/vdb: it holds data but no LUKS2 header"
        );
        let other = decide(
            Path::new("/dev/disk/by-id/virtio-data"),
            &DeviceState::HoldsData { first_nonzero: 0 },
            false,
        )
        .unwrap_err();
        assert_eq!(
            other.to_string(),
            "refusing to format /dev/disk/by-id/virtio-data: it holds data but no LUKS2 header"
        );
        let blank = decide(Path::new(DEV), &DeviceState::Blank, false).unwrap_err();
        assert_eq!(
            blank.to_string(),
            "/dev/vdb is blank; set format_if_blank = true to format it on first boot"
        );
        let luks1 = decide(Path::new(DEV), &DeviceState::Luks1, true)
            .unwrap_err()
            .to_string();
        assert!(
            luks1.starts_with("refusing to use /dev/vdb: it has a LUKS1 header"),
            "{luks1}"
        );
        assert!(
            luks1.contains("cryptsetup convert --type luks2 /dev/vdb"),
            "{luks1}"
        );
        let orphan = decide(
            Path::new(DEV),
            &DeviceState::OrphanSecondaryHeader { offset: 2097152 },
            true,
        )
        .unwrap_err()
        .to_string();
        assert!(orphan.contains("offset 2097152"), "{orphan}");
        assert!(orphan.contains("cryptsetup repair /dev/vdb"), "{orphan}");
    }

    #[test]
    fn token_json_has_the_required_luks2_members_and_the_state() {
        let token = token_json(
            &uri("kbs:///default/keys/workspace"),
            0,
            TokenState::Initialising,
        );
        assert_eq!(
            token,
            json!({"type":"cvm-warden-kbs","keyslots":["0"],
                "resource":"kbs:///default/keys/workspace","state":"initialising"})
        );
        assert_eq!(
            parse_token(&token).unwrap(),
            Some(KbsToken::new(
                "kbs:///default/keys/workspace",
                Some(TokenState::Initialising)
            ))
        );
        let ready = token_json(&uri("kbs:///default/keys/workspace"), 2, TokenState::Ready);
        assert_eq!(ready["state"], "ready");
        assert_eq!(ready["keyslots"], json!(["2"]));
        assert_eq!(
            token_resource(&ready).unwrap().as_deref(),
            Some("kbs:///default/keys/workspace")
        );
    }

    #[test]
    fn a_token_without_a_state_is_read_as_ready() {
        let old = json!({"type":TOKEN_TYPE,"keyslots":["0"],"resource":"kbs:///a/b/c"});
        let token = parse_token(&old).unwrap().unwrap();
        assert_eq!(token, KbsToken::new("kbs:///a/b/c", None));
        assert_eq!(token.effective_state(), TokenState::Ready);
    }

    #[test]
    fn token_resource_ignores_other_types_and_rejects_malformed_ones() {
        assert_eq!(
            token_resource(&json!({"type":"systemd-tpm2","keyslots":["0"]})).unwrap(),
            None
        );
        assert!(token_resource(&json!({"type":TOKEN_TYPE,"keyslots":["0"]}))
            .unwrap_err()
            .contains("no \"resource\""));
        assert!(
            token_resource(&json!({"type":TOKEN_TYPE,"keyslots":["0"],"resource":7}))
                .unwrap_err()
                .contains("not a string")
        );
    }

    #[test]
    fn a_token_with_an_unknown_or_malformed_state_fails_closed() {
        for (state, want) in [
            (
                json!("formatting"),
                r#"its "state" is "formatting", neither"#,
            ),
            (json!("Ready"), r#"its "state" is "Ready", neither"#),
            (json!(""), r#"its "state" is "", neither"#),
            (json!(1), r#"its "state" is 1, not a string"#),
            (json!(null), r#"its "state" is null, not a string"#),
        ] {
            let token = json!({"type":TOKEN_TYPE,"keyslots":["0"],"resource":"kbs:///a/b/c",
                "state":state});
            let err = parse_token(&token).unwrap_err();
            assert!(err.starts_with(want), "{state}: {err}");
        }
        // Another tool's token is not ours to judge.
        assert_eq!(
            parse_token(&json!({"type":"other","state":"weird"})).unwrap(),
            None
        );
    }

    fn tok(resource: &str, state: Option<TokenState>) -> KbsToken {
        KbsToken::new(resource, state)
    }

    #[test]
    fn check_token_accepts_only_one_matching_resource() {
        let dev = Path::new(DEV);
        let want = uri("kbs:///default/keys/workspace");
        let same = tok("kbs:///default/keys/workspace", Some(TokenState::Ready));
        assert_eq!(
            check_token(dev, std::slice::from_ref(&same), &want),
            Ok(TokenState::Ready)
        );
        // The same resource twice is still one resource.
        assert_eq!(
            check_token(dev, &[same.clone(), same.clone()], &want),
            Ok(TokenState::Ready)
        );

        let missing = check_token(dev, &[], &want).unwrap_err().to_string();
        assert!(
            missing.contains("/dev/vdb has no cvm-warden-kbs LUKS2 token"),
            "{missing}"
        );
        assert!(
            missing.contains("cryptsetup token import /dev/vdb"),
            "{missing}"
        );
        // A token bound by hand to a volume that holds data says ready.
        assert!(
            missing.contains(r#""resource":"kbs:///default/keys/workspace","state":"ready""#),
            "{missing}"
        );

        let other = tok("kbs:///default/keys/other", Some(TokenState::Initialising));
        let mismatch = check_token(dev, std::slice::from_ref(&other), &want)
            .unwrap_err()
            .to_string();
        assert_eq!(
            mismatch,
            "the LUKS2 token of /dev/vdb names broker resource kbs:///default/keys/other but \
             the policy names kbs:///default/keys/workspace; the volume was formatted for \
             another key: fix the volume's `key` in the policy or point it at the right device"
        );

        let ambiguous = check_token(dev, &[same, other], &want).unwrap_err();
        assert!(matches!(ambiguous, TokenProblem::Ambiguous { ref found, .. } if found.len() == 2));
        assert!(ambiguous.to_string().contains("keep exactly one"));
    }

    /// Initialising only when every token of ours says so: ready or no state anywhere wins.
    #[test]
    fn check_token_state_is_initialising_only_when_every_token_says_so() {
        use TokenState::{Initialising, Ready};
        let dev = Path::new(DEV);
        let want = uri("kbs:///a/b/c");
        let cases: [(&[Option<TokenState>], TokenState); 7] = [
            (&[Some(Initialising)], Initialising),
            (&[Some(Initialising), Some(Initialising)], Initialising),
            (&[Some(Ready)], Ready),
            (&[None], Ready),
            (&[Some(Initialising), Some(Ready)], Ready),
            (&[Some(Initialising), None], Ready),
            (&[None, Some(Initialising)], Ready),
        ];
        for (states, expected) in cases {
            let tokens: Vec<KbsToken> = states.iter().map(|s| tok("kbs:///a/b/c", *s)).collect();
            assert_eq!(check_token(dev, &tokens, &want), Ok(expected), "{states:?}");
        }
    }

    /// Every action × state: only `initialising` makes a file system; `ready` never does,
    /// whatever the device decision said.
    #[test]
    fn fs_step_makes_a_file_system_only_for_initialising_tokens() {
        use TokenState::{Initialising, Ready};
        assert_eq!(
            fs_step(Action::FormatThenUnlock, Initialising),
            FsStep::Make
        );
        assert_eq!(fs_step(Action::Unlock, Initialising), FsStep::Resume);
        assert_eq!(fs_step(Action::Unlock, Ready), FsStep::Use);
        assert_eq!(fs_step(Action::FormatThenUnlock, Ready), FsStep::Use);
        for action in [Action::Unlock, Action::FormatThenUnlock] {
            assert!(!fs_step(action, Ready).makes_file_system());
            assert!(fs_step(action, Initialising).makes_file_system());
        }
    }

    #[test]
    fn check_root_names_volume_expected_found_and_what_to_do() {
        let want = RootAttrs {
            uid: 1000,
            gid: 1000,
            mode: 0o700,
        };
        let mnt = Path::new("/workspace");
        assert_eq!(
            check_root("workspace", Path::new(DEV), mnt, want, want),
            Ok(())
        );
        for found in [
            RootAttrs { uid: 0, ..want },
            RootAttrs { gid: 0, ..want },
            RootAttrs {
                mode: 0o755,
                ..want
            },
            RootAttrs {
                mode: 0o2700,
                ..want
            },
        ] {
            let err = check_root("workspace", Path::new(DEV), mnt, want, found).unwrap_err();
            assert_eq!((err.expected, err.found), (want, found));
        }
        let err = check_root(
            "workspace",
            Path::new(DEV),
            mnt,
            want,
            RootAttrs {
                uid: 0,
                gid: 0,
                mode: 0o755,
            },
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "volume \"workspace\": the root of its file system (mounted on /workspace) has owner \
             0 group 0 mode 0755, but the policy says owner 1000 group 1000 mode 0700; \
             cvm-warden does not change the owner or mode of a ready volume, which may hold \
             someone else's data, so it is not used: if this is the right volume, set the \
             volume's owner, group and mode in the policy to what it holds, or change its root \
             from a recovery boot (`cryptsetup open /dev/vdb`, mount it, `chown 1000:1000` and \
             `chmod 0700` its root)"
        );
    }

    #[test]
    fn not_mounted_text_says_ready_nothing_formatted_and_the_likely_cause() {
        use nix::errno::Errno;
        let dev = Path::new(DEV);
        let mapped = Path::new("/dev/mapper/workspace");
        let ready = |errno| not_mounted_text("workspace", dev, mapped, FsStep::Use, errno);
        let prefix = "volume \"workspace\" is ready (its LUKS2 token says its file system was \
                      made), but its file system did not mount: ";
        let never = "nothing was formatted: cvm-warden never formats a ready volume";

        let text = ready(Some(Errno::EINVAL));
        assert_eq!(
            text,
            format!(
                "{prefix}/dev/mapper/workspace holds no valid ext4 file system: a corrupted file \
                 system (check it from a recovery boot with `e2fsck -n /dev/mapper/workspace`), \
                 or a first boot that stopped before mkfs.ext4 under a cvm-warden release that \
                 recorded no volume state; {never}; if it holds nothing of value, zero its first \
                 16 MiB (`dd if=/dev/zero of=/dev/vdb bs=1M count=16 conv=fsync`) and the next \
                 boot formats it anew"
            )
        );
        // The module hints only where mount(2) says a module is missing.
        let enodev = ready(Some(Errno::ENODEV));
        assert!(enodev.starts_with(prefix), "{enodev}");
        assert!(
            enodev.contains("the kernel has no ext4 file system type: load the ext4 module"),
            "{enodev}"
        );
        assert!(enodev.ends_with(never), "{enodev}");
        let enoent = ready(Some(Errno::ENOENT));
        assert!(enoent.contains("load crc32c_generic"), "{enoent}");
        for errno in [Errno::EINVAL, Errno::EUCLEAN, Errno::EBADMSG, Errno::EIO] {
            let text = ready(Some(errno));
            assert!(!text.contains("load the ext4 module"), "{errno}: {text}");
            assert!(text.contains(never), "{errno}: {text}");
        }
        assert!(ready(Some(Errno::EIO)).contains("I/O error"));
        let other = ready(Some(Errno::EPERM));
        assert!(other.contains("mount(2) said EPERM"), "{other}");
        assert!(!other.contains("dd if=/dev/zero"), "{other}");

        // A file system made this boot: the token stays initialising.
        for step in [FsStep::Make, FsStep::Resume] {
            let text = not_mounted_text("workspace", dev, mapped, step, Some(Errno::EINVAL));
            assert_eq!(
                text,
                "volume \"workspace\": the file system just made on it did not mount: the kernel \
                 does not accept the ext4 file system mkfs.ext4 just made on \
                 /dev/mapper/workspace (a file system feature this kernel lacks? see the kernel \
                 log); its LUKS2 token still says initialising (no workload ran on it), so the \
                 next boot makes its file system again"
            );
        }
    }

    /// LUKS2 JSON metadata as `cryptsetup luksDump --dump-json-metadata` prints it (keyslot 0
    /// of `cryptsetup luksFormat --type luks2 --cipher aes-xts-plain64 --key-size 512
    /// --sector-size 4096 --pbkdf pbkdf2`, salts shortened).
    fn metadata(encryption: &str, key_size: u64, integrity: Option<Value>) -> Value {
        let mut segment = json!({
            "type":"crypt","offset":"16777216","size":"dynamic","iv_tweak":"0",
            "encryption":encryption,"sector_size":4096
        });
        if let Some(integrity) = integrity {
            segment["integrity"] = integrity;
        }
        json!({
            "keyslots":{"0":{"type":"luks2","key_size":key_size,
                "af":{"type":"luks1","stripes":4000,"hash":"sha256"},
                "area":{"type":"raw","offset":"32768","size":"258048",
                    "encryption":"aes-xts-plain64","key_size":64},
                "kdf":{"type":"pbkdf2","hash":"sha256","iterations":1000,"salt":"AA=="}}},
            "tokens":{"0":{"type":"cvm-warden-kbs","keyslots":["0"],"resource":"kbs:///a/b/c"}},
            "segments":{"0":segment},
            "digests":{"0":{"type":"pbkdf2","keyslots":["0"],"segments":["0"],"hash":"sha256",
                "iterations":1000,"salt":"AA==","digest":"AA=="}},
            "config":{"json_size":"12288","keyslots_size":"16744448"}
        })
    }

    #[test]
    fn from_metadata_reads_what_cvm_warden_formats() {
        let plain = HeaderFormat::from_metadata(&metadata("aes-xts-plain64", 64, None));
        assert_eq!(plain, HeaderFormat::cvm_warden(None));
        assert_eq!(check_format(Path::new(DEV), &plain, None), Ok(()));

        let integrity = json!({"type":"hmac(sha256)","journal_encryption":"none",
            "journal_integrity":"none"});
        let hmac = HeaderFormat::from_metadata(&metadata("aes-xts-plain64", 96, Some(integrity)));
        assert_eq!(hmac, HeaderFormat::cvm_warden(Some(Integrity::HmacSha256)));
        assert_eq!(
            check_format(Path::new(DEV), &hmac, Some(Integrity::HmacSha256)),
            Ok(())
        );
        // Each policy refuses the other's header.
        assert_eq!(
            check_format(Path::new(DEV), &hmac, None).unwrap_err().field,
            "integrity"
        );
        assert_eq!(
            check_format(Path::new(DEV), &plain, Some(Integrity::HmacSha256))
                .unwrap_err()
                .field,
            "integrity"
        );
    }

    #[test]
    fn from_metadata_reads_a_rewritten_header_and_check_format_names_the_field() {
        let rewritten = HeaderFormat::from_metadata(&metadata("cipher_null-ecb", 64, None));
        let problem = check_format(Path::new(DEV), &rewritten, None).unwrap_err();
        assert_eq!(
            (
                problem.field.as_str(),
                problem.found.as_str(),
                problem.expected.as_str()
            ),
            ("cipher", "cipher_null-ecb", "aes-xts-plain64")
        );
        let short = HeaderFormat::from_metadata(&metadata("aes-xts-plain64", 32, None));
        let problem = check_format(Path::new(DEV), &short, None).unwrap_err();
        assert_eq!(
            (problem.field.as_str(), problem.found.as_str()),
            ("volume key size (keyslot 0)", "32 bytes")
        );
    }

    #[test]
    fn from_metadata_turns_missing_or_malformed_members_into_refusals() {
        let dev = Path::new(DEV);
        // Not an object at all: no segments.
        let empty = HeaderFormat::from_metadata(&json!("nonsense"));
        assert_eq!(
            check_format(dev, &empty, None).unwrap_err().field,
            "segments"
        );

        // A number where a string belongs, a string where a number belongs.
        let mut meta = metadata("aes-xts-plain64", 64, None);
        meta["segments"]["0"]["encryption"] = json!(7);
        let problem = check_format(dev, &HeaderFormat::from_metadata(&meta), None).unwrap_err();
        assert_eq!(
            (problem.field.as_str(), problem.found.as_str()),
            ("cipher", "nothing (the field is missing)")
        );
        let mut meta = metadata("aes-xts-plain64", 64, None);
        meta["segments"]["0"]["sector_size"] = json!("4096");
        assert_eq!(
            check_format(dev, &HeaderFormat::from_metadata(&meta), None)
                .unwrap_err()
                .field,
            "sector size"
        );
        // An integrity member without a type is integrity that is not none.
        let mut meta = metadata("aes-xts-plain64", 64, None);
        meta["segments"]["0"]["integrity"] = json!({"journal_encryption":"none"});
        let problem = check_format(dev, &HeaderFormat::from_metadata(&meta), None).unwrap_err();
        assert_eq!(problem.field, "integrity");
        assert!(problem.found.contains("journal_encryption"), "{problem}");
        // Keyslots are read in numeric id order: 10 after 2.
        let mut meta = metadata("aes-xts-plain64", 64, None);
        let slot = meta["keyslots"]["0"].clone();
        meta["keyslots"]["2"] = slot.clone();
        meta["keyslots"]["10"] = slot;
        meta["keyslots"]["10"]["area"]["encryption"] = json!("cipher_null-ecb");
        meta["keyslots"]["2"]["area"]["encryption"] = json!("serpent-xts-plain64");
        let header = HeaderFormat::from_metadata(&meta);
        let ids: Vec<&str> = header.keyslots.iter().map(|k| k.id.as_str()).collect();
        assert_eq!(ids, ["0", "2", "10"]);
        assert_eq!(
            check_format(dev, &header, None).unwrap_err().field,
            "keyslot 2 area cipher"
        );
    }

    #[test]
    fn luks1_refusal_does_not_claim_authenticated_metadata() {
        let text = decide(Path::new(DEV), &DeviceState::Luks1, true)
            .unwrap_err()
            .to_string();
        assert!(!text.contains("authenticated"), "{text}");
    }
}
