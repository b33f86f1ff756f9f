//! [`RealVolumes`]: the volume effects through libcryptsetup (on one worker thread),
//! `mkfs.ext4` and mount(2).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::OnceLock;

use libcryptsetup_rs::consts::flags::{
    CryptActivate, CryptDeactivate, CryptPbkdf, CryptVolumeKey, CryptWipe,
};
use libcryptsetup_rs::consts::vals::{CryptKdf, CryptWipePattern, EncryptionFormat};
use libcryptsetup_rs::{
    CryptDevice, CryptInit, CryptParamsLuks2, CryptParamsLuks2Ref, CryptPbkdfType, CryptTokenInfo,
    Either, LibcryptErr, TokenInput,
};
use nix::mount::MsFlags;
use zeroize::Zeroizing;

use super::decide::{
    self, DeviceState, FormatProblem, HeaderFormat, KbsToken, RootAttrs, TokenState, PROBE_LEN,
    SECONDARY_OFFSETS_PAST_PROBE,
};
use super::{
    Integrity, MountOptions, VolumeError, VolumeKey, Volumes, CIPHER, PBKDF2_ITERATIONS,
    SECTOR_SIZE,
};
use crate::policy::ResourceUri;
use crate::tool::{Tool, Tools};

/// Default device-mapper directory.
pub const DEV_MAPPER: &str = "/dev/mapper";
/// LUKS2 has at most 32 tokens.
const MAX_TOKENS: u32 = 32;
/// Block size of the integrity wipe (as cryptsetup's default).
const WIPE_BLOCK: usize = 1024 * 1024;

/// The real volume effects. `mkfs.ext4` runs through the tool runner ([`crate::tool`]);
/// the runner and `/dev/mapper` are injectable.
#[derive(Debug, Clone)]
pub struct RealVolumes {
    tools: Tools,
    dev_mapper: PathBuf,
}

impl Default for RealVolumes {
    fn default() -> Self {
        Self {
            tools: Tools::system(),
            dev_mapper: PathBuf::from(DEV_MAPPER),
        }
    }
}

impl RealVolumes {
    /// The real effects with the default paths (tools from their fixed paths, no audit).
    pub fn new() -> Self {
        Self::default()
    }

    /// The real effects running tools with `tools` (the boot passes its audited runner).
    pub fn with_tools(tools: Tools) -> Self {
        Self {
            tools,
            ..Self::default()
        }
    }

    /// The real effects with another tool runner and device-mapper directory.
    pub fn with_paths(tools: Tools, dev_mapper: PathBuf) -> Self {
        Self { tools, dev_mapper }
    }

    fn mapped(&self, name: &str) -> PathBuf {
        self.dev_mapper.join(name)
    }
}

// ---------------------------------------------------------------------------------------------
// The libcryptsetup worker thread.

type Job = Box<dyn FnOnce() + Send + 'static>;

static WORKER: OnceLock<Option<mpsc::Sender<Job>>> = OnceLock::new();

fn spawn_worker() -> Option<mpsc::Sender<Job>> {
    let (tx, rx) = mpsc::channel::<Job>();
    let spawned = std::thread::Builder::new()
        .name("cvm-warden-luks".to_string())
        .spawn(move || {
            for job in rx {
                // A panicking call drops its reply channel; the caller sees `Worker`. The
                // thread stays alive for the next call.
                let _ = std::panic::catch_unwind(AssertUnwindSafe(job));
            }
        });
    match spawned {
        Ok(_) => Some(tx),
        Err(err) => {
            log::error!("cannot start the libcryptsetup worker thread: {err}");
            None
        }
    }
}

/// Runs `f` on the libcryptsetup worker thread and waits for its result.
fn on_worker<R, F>(f: F) -> Result<R, VolumeError>
where
    R: Send + 'static,
    F: FnOnce() -> R + Send + 'static,
{
    let sender = WORKER
        .get_or_init(spawn_worker)
        .as_ref()
        .ok_or(VolumeError::Worker("it could not be started"))?;
    let (reply_tx, reply_rx) = mpsc::sync_channel(1);
    let job: Job = Box::new(move || {
        let _ = reply_tx.send(f());
    });
    sender
        .send(job)
        .map_err(|_| VolumeError::Worker("it stopped"))?;
    reply_rx
        .recv()
        .map_err(|_| VolumeError::Worker("a libcryptsetup call panicked"))
}

/// A copy of the key for the worker thread, zeroized when dropped there.
fn key_copy(key: &VolumeKey) -> Zeroizing<Vec<u8>> {
    Zeroizing::new(key.expose().to_vec())
}

// ---------------------------------------------------------------------------------------------
// Pieces that run on the worker thread.

fn crypt_err<'a>(
    op: &'static str,
    device: &'a Path,
) -> impl FnOnce(LibcryptErr) -> VolumeError + 'a {
    move |source| VolumeError::Crypt {
        op,
        device: device.to_path_buf(),
        source,
    }
}

fn is_errno(err: &LibcryptErr, errno: i32) -> bool {
    matches!(err, LibcryptErr::IOError(io) if io.raw_os_error() == Some(errno))
}

/// `crypt_init` + `crypt_load(LUKS2)`.
fn load_luks2(device: &Path) -> Result<CryptDevice, VolumeError> {
    let mut dev = CryptInit::init(device).map_err(crypt_err("open the device", device))?;
    dev.context_handle()
        .load::<()>(Some(EncryptionFormat::Luks2), None)
        .map_err(crypt_err("load the LUKS2 header of", device))?;
    Ok(dev)
}

/// The keyslot PBKDF: PBKDF2-SHA256, minimum iterations, no benchmark (see the module doc).
fn keyslot_pbkdf() -> CryptPbkdfType {
    CryptPbkdfType {
        type_: CryptKdf::Pbkdf2,
        hash: Some("sha256".to_string()),
        time_ms: 0,
        iterations: PBKDF2_ITERATIONS,
        max_memory_kb: 0,
        parallel_threads: 0,
        flags: CryptPbkdf::NO_BENCHMARK,
    }
}

/// The LUKS2 subsystem cvm-warden writes (shown by `cryptsetup luksDump`).
pub const LUKS2_SUBSYSTEM: &str = "cvm-warden";

/// The LUKS2 label: the broker resource when it fits in 47 bytes, else a pointer to the
/// token.
pub fn header_label(resource: &ResourceUri) -> String {
    let uri = resource.to_string();
    if uri.len() <= 47 {
        uri
    } else {
        "key: see token cvm-warden-kbs".to_string()
    }
}

fn format_on_worker(
    device: &Path,
    key: &[u8],
    resource: &ResourceUri,
    integrity: Option<Integrity>,
    wipe_name: &str,
    wipe_path: &Path,
) -> Result<u32, VolumeError> {
    let step = |step: &'static str| {
        move |source| VolumeError::Format {
            device: device.to_path_buf(),
            step,
            source,
        }
    };
    let mut dev = CryptInit::init(device).map_err(crypt_err("open the device", device))?;
    // Plain `cryptsetup luksDump` prints the label and subsystem but only the type of an
    // unknown token: the label names the broker resource when it fits (LUKS2 labels hold 47
    // bytes); the token always holds it.
    let label = header_label(resource);
    let params = CryptParamsLuks2 {
        pbkdf: Some(keyslot_pbkdf()),
        integrity: integrity.map(|i| i.crypto_api_name().to_string()),
        integrity_params: None,
        data_alignment: 0,
        data_device: None,
        sector_size: SECTOR_SIZE,
        label: Some(label),
        subsystem: Some(LUKS2_SUBSYSTEM.to_string()),
    };
    let mut params_ref: CryptParamsLuks2Ref<'_> = (&params)
        .try_into()
        .map_err(step("preparing the LUKS2 parameters"))?;
    let volume_key_bytes = decide::volume_key_bytes(integrity) as usize;
    dev.context_handle()
        .format(
            EncryptionFormat::Luks2,
            CIPHER,
            None,
            Either::Right(volume_key_bytes),
            Some(&mut params_ref),
        )
        .map_err(step("writing the LUKS2 header"))?;
    dev.settings_handle()
        .set_pbkdf_type(&keyslot_pbkdf())
        .map_err(step("setting the keyslot PBKDF"))?;
    let keyslot = dev
        .keyslot_handle()
        .add_by_key(None, None, key, CryptVolumeKey::empty())
        .map_err(step("adding the keyslot"))?;
    dev.token_handle()
        .json_set(TokenInput::AddToken(&decide::token_json(
            resource,
            keyslot,
            TokenState::Initialising,
        )))
        .map_err(step("writing the cvm-warden-kbs token"))?;
    if integrity.is_some() {
        // As `cryptsetup luksFormat --integrity` does (`_wipe_data_device`): write every sector
        // once through a private temporary mapping so each has a valid tag (an unwritten
        // sector reads as an I/O error), then remove the mapping. The mapping is activated by
        // the volume key libcryptsetup still holds from the format, as the CLI does.
        dev.activate_handle()
            .activate_by_volume_key(
                Some(wipe_name),
                None,
                CryptActivate::PRIVATE | CryptActivate::NO_JOURNAL,
            )
            .map_err(step(
                "activating the mapping that initialises the integrity tags",
            ))?;
        let wiped = dev
            .wipe_handle()
            .wipe::<()>(
                wipe_path,
                CryptWipePattern::Zero,
                0,
                0,
                WIPE_BLOCK,
                CryptWipe::empty(),
                None,
                None,
            )
            .map_err(step("initialising the integrity tags"));
        let closed = dev
            .activate_handle()
            .deactivate(wipe_name, CryptDeactivate::empty())
            .map_err(step("closing the integrity initialisation mapping"));
        wiped?;
        closed?;
    }
    Ok(keyslot)
}

/// Checks the header loaded in `dev` (the one libcryptsetup activates from): the LUKS2 JSON
/// metadata through [`decide::check_format`], then the cipher, mode, volume key size and
/// sector size libcryptsetup itself reports for the data segment.
fn check_format_loaded(
    dev: &mut CryptDevice,
    device: &Path,
    integrity: Option<Integrity>,
) -> Result<(), VolumeError> {
    let metadata = dev
        .status_handle()
        .dump_json()
        .map_err(crypt_err("read the LUKS2 metadata of", device))?;
    decide::check_format(device, &HeaderFormat::from_metadata(&metadata), integrity)?;
    let problem = |field: &str, found: String, expected: String| {
        VolumeError::HeaderFormat(FormatProblem {
            device: device.to_path_buf(),
            field: field.to_string(),
            found,
            expected,
        })
    };
    let mut status = dev.status_handle();
    let cipher = status
        .get_cipher()
        .map_err(crypt_err("read the cipher of", device))?;
    let mode = status
        .get_cipher_mode()
        .map_err(crypt_err("read the cipher mode of", device))?;
    if (cipher.as_str(), mode.as_str()) != CIPHER {
        return Err(problem(
            "cipher",
            format!("{cipher}-{mode}"),
            decide::CIPHER_SPEC.to_string(),
        ));
    }
    let key_bytes = decide::volume_key_bytes(integrity);
    let found_key = status.get_volume_key_size();
    if u64::try_from(found_key).ok() != Some(key_bytes) {
        return Err(problem(
            "volume key size",
            format!("{found_key} bytes"),
            format!("{key_bytes} bytes"),
        ));
    }
    let sector = libcryptsetup_rs::get_sector_size(Some(dev));
    if u32::try_from(sector).ok() != Some(SECTOR_SIZE) {
        return Err(problem(
            "sector size",
            format!("{sector} bytes"),
            format!("{SECTOR_SIZE} bytes"),
        ));
    }
    Ok(())
}

fn verify_on_worker(device: &Path, key: &[u8], resource: &ResourceUri) -> Result<u32, VolumeError> {
    let mut dev = load_luks2(device)?;
    dev.activate_handle()
        .activate_by_passphrase(None, None, key, CryptActivate::empty())
        .map_err(|source| rejected_or(device, resource, "check the key against", source))
}

fn rejected_or(
    device: &Path,
    resource: &ResourceUri,
    op: &'static str,
    source: LibcryptErr,
) -> VolumeError {
    // libcryptsetup answers -EPERM when no keyslot accepts the passphrase.
    if is_errno(&source, libc::EPERM) {
        VolumeError::KeyRejected {
            device: device.to_path_buf(),
            resource: resource.clone(),
        }
    } else {
        VolumeError::Crypt {
            op,
            device: device.to_path_buf(),
            source,
        }
    }
}

/// Calls `each` with the id and JSON of every `cvm-warden-kbs` token of `dev`.
fn each_kbs_token(
    dev: &mut CryptDevice,
    device: &Path,
    mut each: impl FnMut(&mut CryptDevice, u32, serde_json::Value) -> Result<(), VolumeError>,
) -> Result<(), VolumeError> {
    for id in 0..MAX_TOKENS {
        let mut tokens = dev.token_handle();
        let info = tokens
            .status(id)
            .map_err(crypt_err("read the token status of", device))?;
        let kind = match info {
            CryptTokenInfo::Invalid | CryptTokenInfo::Inactive => continue,
            CryptTokenInfo::Internal(kind)
            | CryptTokenInfo::InternalUnknown(kind)
            | CryptTokenInfo::External(kind)
            | CryptTokenInfo::ExternalUnknown(kind) => kind,
        };
        if kind != decide::TOKEN_TYPE {
            continue;
        }
        let json = tokens
            .json_get(id)
            .map_err(crypt_err("read a cvm-warden-kbs token of", device))?;
        each(dev, id, json)?;
    }
    Ok(())
}

fn bad_token(device: &Path, id: u32) -> impl FnOnce(String) -> VolumeError + '_ {
    move |reason| VolumeError::BadToken {
        device: device.to_path_buf(),
        id,
        reason,
    }
}

fn tokens_on_worker(device: &Path) -> Result<Vec<KbsToken>, VolumeError> {
    let mut dev = load_luks2(device)?;
    let mut found = Vec::new();
    each_kbs_token(&mut dev, device, |_, id, json| {
        if let Some(token) = decide::parse_token(&json).map_err(bad_token(device, id))? {
            found.push(token);
        }
        Ok(())
    })?;
    Ok(found)
}

fn set_state_on_worker(device: &Path, state: TokenState) -> Result<(), VolumeError> {
    let mut dev = load_luks2(device)?;
    let mut written = 0usize;
    each_kbs_token(&mut dev, device, |dev, id, mut json| {
        // Only a token this build can read is rewritten.
        decide::parse_token(&json).map_err(bad_token(device, id))?;
        if let Some(members) = json.as_object_mut() {
            members.insert("state".to_string(), state.as_str().into());
        }
        dev.token_handle()
            .json_set(TokenInput::ReplaceToken(id, &json))
            .map_err(crypt_err(
                "write the volume state into the cvm-warden-kbs token of",
                device,
            ))?;
        written += 1;
        Ok(())
    })?;
    if written == 0 {
        return Err(VolumeError::BadToken {
            device: device.to_path_buf(),
            id: 0,
            reason: "it is gone: no cvm-warden-kbs token is left to record the volume state in"
                .to_string(),
        });
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Inspection (plain reads, no libcryptsetup).

fn read_up_to(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

fn inspect_device(device: &Path) -> std::io::Result<DeviceState> {
    let mut file = File::open(device)?;
    let mut head = vec![0u8; PROBE_LEN];
    let len = read_up_to(&mut file, &mut head)?;
    head.truncate(len);
    let mut past = Vec::new();
    if len == PROBE_LEN {
        for offset in SECONDARY_OFFSETS_PAST_PROBE {
            file.seek(SeekFrom::Start(offset))?;
            let mut magic = [0u8; 6];
            if read_up_to(&mut file, &mut magic)? < magic.len() {
                break;
            }
            past.push((offset, magic));
        }
    }
    let device_len = file.seek(SeekFrom::End(0))?;
    let mut samples = Vec::new();
    if len == PROBE_LEN {
        for offset in decide::sample_offsets(device_len) {
            file.seek(SeekFrom::Start(offset))?;
            let mut bytes = vec![0u8; PROBE_LEN];
            let got = read_up_to(&mut file, &mut bytes)?;
            bytes.truncate(got);
            samples.push((offset, bytes));
        }
    }
    Ok(decide::classify_samples(&head, &past, &samples))
}

/// mount(8)-style option text for errors.
pub(super) fn option_text(flags: MsFlags) -> String {
    let mut parts = Vec::new();
    for (flag, name) in [
        (MsFlags::MS_NOSUID, "nosuid"),
        (MsFlags::MS_NODEV, "nodev"),
        (MsFlags::MS_NOEXEC, "noexec"),
    ] {
        if flags.contains(flag) {
            parts.push(name);
        }
    }
    parts.join(",")
}

/// The mount flags for `options`: `nosuid` and `nodev` always.
pub(super) fn mount_flags(options: MountOptions) -> MsFlags {
    let mut flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    if options.noexec {
        flags |= MsFlags::MS_NOEXEC;
    }
    flags
}

impl Volumes for RealVolumes {
    fn inspect(&self, device: &Path) -> Result<DeviceState, VolumeError> {
        inspect_device(device).map_err(|source| VolumeError::Inspect {
            device: device.to_path_buf(),
            source,
        })
    }

    fn format(
        &self,
        device: &Path,
        key: &VolumeKey,
        integrity: Option<Integrity>,
    ) -> Result<u32, VolumeError> {
        // Defence in depth: whoever calls, only a blank device is formatted.
        let state = self.inspect(device)?;
        if state != DeviceState::Blank {
            return Err(match decide::decide(device, &state, true) {
                Err(refusal) => VolumeError::Refused(refusal),
                // A LUKS2 volume is never formatted over.
                Ok(_) => VolumeError::AlreadyLuks2 {
                    device: device.to_path_buf(),
                },
            });
        }
        if let Some(integrity) = integrity {
            let control = self.dev_mapper.join("control");
            if !control.exists() {
                return Err(VolumeError::NoDeviceMapper {
                    device: device.to_path_buf(),
                    integrity,
                    control,
                });
            }
        }
        let wipe_name = format!("cvm-warden-wipe-{}", std::process::id());
        let wipe_path = self.mapped(&wipe_name);
        let device = device.to_path_buf();
        let resource = key.resource().clone();
        let key = key_copy(key);
        on_worker(move || {
            format_on_worker(&device, &key, &resource, integrity, &wipe_name, &wipe_path)
        })?
    }

    fn check_format(&self, device: &Path, integrity: Option<Integrity>) -> Result<(), VolumeError> {
        let device = device.to_path_buf();
        on_worker(move || check_format_loaded(&mut load_luks2(&device)?, &device, integrity))?
    }

    fn token_resources(&self, device: &Path) -> Result<Vec<KbsToken>, VolumeError> {
        let device = device.to_path_buf();
        on_worker(move || tokens_on_worker(&device))?
    }

    fn set_token_state(&self, device: &Path, state: TokenState) -> Result<(), VolumeError> {
        let device = device.to_path_buf();
        on_worker(move || set_state_on_worker(&device, state))?
    }

    fn verify_key(&self, device: &Path, key: &VolumeKey) -> Result<u32, VolumeError> {
        let device = device.to_path_buf();
        let resource = key.resource().clone();
        let key = key_copy(key);
        on_worker(move || verify_on_worker(&device, &key, &resource))?
    }

    fn open(
        &self,
        device: &Path,
        name: &str,
        key: &VolumeKey,
        integrity: Option<Integrity>,
    ) -> Result<PathBuf, VolumeError> {
        let device = device.to_path_buf();
        let resource = key.resource().clone();
        let key = key_copy(key);
        let owned_name = name.to_string();
        on_worker(move || -> Result<u32, VolumeError> {
            let mut dev = load_luks2(&device)?;
            // Again, on the header this activation uses: one the host changed after
            // `check_format` is not opened either.
            check_format_loaded(&mut dev, &device, integrity)?;
            dev.activate_handle()
                .activate_by_passphrase(Some(&owned_name), None, &key, CryptActivate::empty())
                .map_err(|source| {
                    rejected_or(
                        &device,
                        &resource,
                        "activate the dm-crypt mapping of",
                        source,
                    )
                })
        })??;
        Ok(self.mapped(name))
    }

    fn close(&self, name: &str) -> Result<(), VolumeError> {
        let mapped = self.mapped(name);
        let name = name.to_string();
        on_worker(move || -> Result<(), VolumeError> {
            let mut dev = CryptInit::init_by_name_and_header(&name, None)
                .map_err(crypt_err("find the mapping", &mapped))?;
            dev.activate_handle()
                .deactivate(&name, CryptDeactivate::empty())
                .map_err(crypt_err("close the mapping", &mapped))
        })?
    }

    fn mkfs_ext4(&self, mapped: &Path, uid: u32, gid: u32) -> Result<(), VolumeError> {
        let extended = format!("nodiscard,root_owner={uid}:{gid}");
        let args = [
            "-F".as_ref(),
            "-q".as_ref(),
            "-E".as_ref(),
            extended.as_ref(),
            mapped.as_os_str(),
        ];
        let output = self
            .tools
            .run(Tool::MkfsExt4, &args, None)
            .map_err(|source| VolumeError::MkfsSpawn {
                device: mapped.to_path_buf(),
                source,
            })?;
        if output.success() {
            return Ok(());
        }
        Err(VolumeError::Mkfs {
            tool: output.path.clone(),
            device: mapped.to_path_buf(),
            status: output.status,
            stderr: output.stderr_text(),
        })
    }

    fn mount(
        &self,
        mapped: &Path,
        mountpoint: &Path,
        options: MountOptions,
    ) -> Result<RootAttrs, VolumeError> {
        std::fs::create_dir_all(mountpoint).map_err(|source| VolumeError::Mountpoint {
            path: mountpoint.to_path_buf(),
            source,
        })?;
        let flags = mount_flags(options);
        nix::mount::mount(Some(mapped), mountpoint, Some("ext4"), flags, None::<&str>).map_err(
            |source| VolumeError::Mount {
                device: mapped.to_path_buf(),
                target: mountpoint.to_path_buf(),
                options: option_text(flags),
                source,
            },
        )?;
        match root_attrs(mountpoint) {
            Ok(root) => Ok(root),
            Err(err) => {
                if let Err(unmount_err) = self.unmount(mountpoint) {
                    log::warn!("{unmount_err}");
                }
                Err(err)
            }
        }
    }

    fn set_root_mode(&self, mountpoint: &Path, mode: u32) -> Result<RootAttrs, VolumeError> {
        let root_err = |what: &'static str| {
            move |source| VolumeError::Root {
                what,
                path: mountpoint.to_path_buf(),
                source,
            }
        };
        std::fs::set_permissions(mountpoint, std::fs::Permissions::from_mode(mode))
            .map_err(root_err("set the mode of"))?;
        // The file system's blocks reach the disk before the token says `ready`.
        let dir = File::open(mountpoint).map_err(root_err("open"))?;
        nix::unistd::syncfs(&dir)
            .map_err(|errno| root_err("sync the file system of")(std::io::Error::from(errno)))?;
        root_attrs(mountpoint)
    }

    fn unmount(&self, mountpoint: &Path) -> Result<(), VolumeError> {
        nix::mount::umount(mountpoint).map_err(|source| VolumeError::Unmount {
            path: mountpoint.to_path_buf(),
            source,
        })
    }
}

/// Owner, group and permission bits of the directory at `path`.
fn root_attrs(path: &Path) -> Result<RootAttrs, VolumeError> {
    let meta = std::fs::metadata(path).map_err(|source| VolumeError::Root {
        what: "read the owner and mode of",
        path: path.to_path_buf(),
        source,
    })?;
    Ok(RootAttrs {
        uid: meta.uid(),
        gid: meta.gid(),
        mode: meta.mode() & 0o7777,
    })
}
