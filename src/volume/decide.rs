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

/// The LUKS2 token JSON cvm-warden writes: `type` and `keyslots` (both required by LUKS2;
/// keyslot numbers are strings) and the broker resource the key comes from.
pub fn token_json(resource: &ResourceUri, keyslot: u32) -> Value {
    json!({
        "type": TOKEN_TYPE,
        "keyslots": [keyslot.to_string()],
        "resource": resource.to_string(),
    })
}

/// The resource named by a token of type [`TOKEN_TYPE`]; `Ok(None)` for a token of another
/// type, an error text for one of ours without a string `resource`.
pub fn token_resource(token: &Value) -> Result<Option<String>, String> {
    if token.get("type").and_then(Value::as_str) != Some(TOKEN_TYPE) {
        return Ok(None);
    }
    match token.get("resource") {
        Some(Value::String(resource)) => Ok(Some(resource.clone())),
        Some(other) => Err(format!("its \"resource\" is {other}, not a string")),
        None => Err("it has no \"resource\" member".to_string()),
    }
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
        json = token_json(expected, 0)
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

/// Compares the resources named by the device's tokens with the policy's resource. Exactly one
/// distinct resource, equal to `expected`, passes; anything else fails closed.
pub fn check_token(
    device: &Path,
    found: &[String],
    expected: &ResourceUri,
) -> Result<(), TokenProblem> {
    let mut distinct: Vec<String> = found.to_vec();
    distinct.sort();
    distinct.dedup();
    match distinct.as_slice() {
        [] => Err(TokenProblem::Missing {
            device: device.to_path_buf(),
            expected: expected.clone(),
        }),
        [only] if *only == expected.to_string() => Ok(()),
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
    fn token_json_has_the_required_luks2_members() {
        let token = token_json(&uri("kbs:///default/keys/workspace"), 0);
        assert_eq!(
            token,
            json!({"type":"cvm-warden-kbs","keyslots":["0"],"resource":"kbs:///default/keys/workspace"})
        );
        assert_eq!(
            token_resource(&token).unwrap().as_deref(),
            Some("kbs:///default/keys/workspace")
        );
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
    fn check_token_accepts_only_one_matching_resource() {
        let dev = Path::new(DEV);
        let want = uri("kbs:///default/keys/workspace");
        let same = "kbs:///default/keys/workspace".to_string();
        assert_eq!(check_token(dev, std::slice::from_ref(&same), &want), Ok(()));
        // The same resource twice is still one resource.
        assert_eq!(
            check_token(dev, &[same.clone(), same.clone()], &want),
            Ok(())
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
        assert!(
            missing.contains(r#""resource":"kbs:///default/keys/workspace""#),
            "{missing}"
        );

        let other = "kbs:///default/keys/other".to_string();
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
