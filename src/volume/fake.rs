//! [`FakeVolumes`]: the recording fake of [`Volumes`]. It keeps a table of devices (their
//! [`DeviceState`], the SHA-256 of the key a LUKS2 one was formatted with, its tokens with
//! their states, its [`HeaderFormat`] and the root of the file system inside, if any), records
//! every call, mirrors the real implementation's refusals (format only a blank device; the
//! header format must be cvm-warden's, also on open; the key must match; a mapping without a
//! file system does not mount, with `EINVAL` as mount(2) says), and fails the operations it is
//! told to fail.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};

use libcryptsetup_rs::LibcryptErr;
use sha2::{Digest as _, Sha256};

use super::decide::{self, DeviceState, HeaderFormat, KbsToken, RootAttrs, TokenState};
use super::{Integrity, MountOptions, VolumeError, VolumeKey, Volumes};

/// One recorded call (no key material: the key is recorded by its resource).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VolumeCall {
    /// [`Volumes::inspect`].
    Inspect(PathBuf),
    /// [`Volumes::format`].
    Format {
        /// Device.
        device: PathBuf,
        /// Resource of the key.
        resource: String,
        /// Integrity mode.
        integrity: Option<Integrity>,
    },
    /// [`Volumes::check_format`].
    CheckFormat {
        /// Device.
        device: PathBuf,
        /// The policy's integrity mode.
        integrity: Option<Integrity>,
    },
    /// [`Volumes::token_resources`].
    TokenResources(PathBuf),
    /// [`Volumes::set_token_state`].
    SetTokenState {
        /// Device.
        device: PathBuf,
        /// The state written.
        state: TokenState,
    },
    /// [`Volumes::verify_key`].
    VerifyKey {
        /// Device.
        device: PathBuf,
        /// Resource of the key.
        resource: String,
    },
    /// [`Volumes::open`].
    Open {
        /// Device.
        device: PathBuf,
        /// Mapping name.
        name: String,
    },
    /// [`Volumes::close`].
    Close(String),
    /// [`Volumes::mkfs_ext4`].
    MkfsExt4 {
        /// Mapped device.
        mapped: PathBuf,
        /// Owner of the root.
        uid: u32,
        /// Group of the root.
        gid: u32,
    },
    /// [`Volumes::mount`].
    Mount {
        /// Mapped device.
        mapped: PathBuf,
        /// Mount point.
        mountpoint: PathBuf,
        /// Options.
        options: MountOptions,
    },
    /// [`Volumes::set_root_mode`].
    SetRootMode {
        /// Mount point.
        mountpoint: PathBuf,
        /// Mode.
        mode: u32,
    },
    /// [`Volumes::unmount`].
    Unmount(PathBuf),
}

impl VolumeCall {
    /// The kind of call.
    pub fn op(&self) -> VolumeOp {
        match self {
            VolumeCall::Inspect(_) => VolumeOp::Inspect,
            VolumeCall::Format { .. } => VolumeOp::Format,
            VolumeCall::CheckFormat { .. } => VolumeOp::CheckFormat,
            VolumeCall::TokenResources(_) => VolumeOp::TokenResources,
            VolumeCall::SetTokenState { .. } => VolumeOp::SetTokenState,
            VolumeCall::VerifyKey { .. } => VolumeOp::VerifyKey,
            VolumeCall::Open { .. } => VolumeOp::Open,
            VolumeCall::Close(_) => VolumeOp::Close,
            VolumeCall::MkfsExt4 { .. } => VolumeOp::MkfsExt4,
            VolumeCall::Mount { .. } => VolumeOp::Mount,
            VolumeCall::SetRootMode { .. } => VolumeOp::SetRootMode,
            VolumeCall::Unmount(_) => VolumeOp::Unmount,
        }
    }
}

/// Kinds of calls, for [`FakeVolumes::fail`] and [`FakeVolumes::ops`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum VolumeOp {
    /// [`Volumes::inspect`].
    Inspect,
    /// [`Volumes::format`].
    Format,
    /// [`Volumes::check_format`].
    CheckFormat,
    /// [`Volumes::token_resources`].
    TokenResources,
    /// [`Volumes::verify_key`].
    VerifyKey,
    /// [`Volumes::open`].
    Open,
    /// [`Volumes::close`].
    Close,
    /// [`Volumes::mkfs_ext4`].
    MkfsExt4,
    /// [`Volumes::mount`].
    Mount,
    /// [`Volumes::set_token_state`].
    SetTokenState,
    /// [`Volumes::set_root_mode`].
    SetRootMode,
    /// [`Volumes::unmount`].
    Unmount,
}

#[derive(Debug, Clone)]
struct FakeDevice {
    state: DeviceState,
    key_sha256: Option<[u8; 32]>,
    tokens: Vec<KbsToken>,
    header: HeaderFormat,
    /// The root of the ext4 file system inside; `None`: no file system.
    fs: Option<RootAttrs>,
}

#[derive(Debug, Default)]
struct Inner {
    devices: BTreeMap<PathBuf, FakeDevice>,
    calls: Vec<VolumeCall>,
    fail: BTreeSet<VolumeOp>,
    mappings: BTreeMap<String, PathBuf>,
    mounts: BTreeMap<PathBuf, PathBuf>,
    /// `mkfs_ext4` leaves the root `0:0`, as an `mkfs.ext4` without `-E root_owner` does.
    ignore_root_owner: bool,
}

/// The recording fake of [`Volumes`].
#[derive(Debug, Default)]
pub struct FakeVolumes {
    inner: Mutex<Inner>,
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

fn injected(op: VolumeOp, device: &Path) -> VolumeError {
    if op == VolumeOp::Mount {
        return VolumeError::Mount {
            device: device.to_path_buf(),
            target: PathBuf::new(),
            options: "nosuid,nodev".to_string(),
            source: nix::errno::Errno::EIO,
        };
    }
    if op == VolumeOp::Unmount {
        return VolumeError::Unmount {
            path: device.to_path_buf(),
            source: nix::errno::Errno::EBUSY,
        };
    }
    VolumeError::Crypt {
        op: "complete an operation FakeVolumes was told to fail on",
        device: device.to_path_buf(),
        source: LibcryptErr::IOError(std::io::Error::from_raw_os_error(libc::EIO)),
    }
}

impl FakeVolumes {
    /// A fake with no devices.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds a device in `state` (a LUKS2 one added this way has no key and no token, and the
    /// header format cvm-warden writes without integrity).
    pub fn with_device(self, device: impl Into<PathBuf>, state: DeviceState) -> Self {
        self.lock().devices.insert(
            device.into(),
            FakeDevice {
                state,
                key_sha256: None,
                tokens: Vec::new(),
                header: HeaderFormat::cvm_warden(None),
                fs: None,
            },
        );
        self
    }

    /// Adds a LUKS2 device that `key` opens and whose tokens name `tokens` (without a state,
    /// as written before volume states; see [`Self::with_token_state`]), with the header
    /// format cvm-warden writes without integrity (see [`Self::with_header`]) and no file
    /// system inside (see [`Self::with_fs`]).
    pub fn with_luks2(self, device: impl Into<PathBuf>, key: &[u8], tokens: &[&str]) -> Self {
        self.lock().devices.insert(
            device.into(),
            FakeDevice {
                state: DeviceState::Luks2,
                key_sha256: Some(sha256(key)),
                tokens: tokens.iter().map(|t| KbsToken::new(*t, None)).collect(),
                header: HeaderFormat::cvm_warden(None),
                fs: None,
            },
        );
        self
    }

    /// Sets the state of every token of a device added before.
    pub fn with_token_state(self, device: impl AsRef<Path>, state: Option<TokenState>) -> Self {
        if let Some(dev) = self.lock().devices.get_mut(device.as_ref()) {
            for token in &mut dev.tokens {
                token.state = state;
            }
        }
        self
    }

    /// Puts an ext4 file system whose root is `root` inside a device added before (`None`:
    /// none).
    pub fn with_fs(self, device: impl AsRef<Path>, root: Option<RootAttrs>) -> Self {
        if let Some(dev) = self.lock().devices.get_mut(device.as_ref()) {
            dev.fs = root;
        }
        self
    }

    /// Gives a device added before the header format `header` (a host's rewrite, another
    /// tool's format). Does nothing for a device not added yet.
    pub fn with_header(self, device: impl AsRef<Path>, header: HeaderFormat) -> Self {
        if let Some(dev) = self.lock().devices.get_mut(device.as_ref()) {
            dev.header = header;
        }
        self
    }

    /// Makes every call of kind `op` fail.
    pub fn fail(self, op: VolumeOp) -> Self {
        self.lock().fail.insert(op);
        self
    }

    /// Makes `mkfs_ext4` leave the root owned by `0:0` whatever it is asked (an `mkfs.ext4`
    /// that ignores `-E root_owner`).
    pub fn ignoring_root_owner(self) -> Self {
        self.lock().ignore_root_owner = true;
        self
    }

    /// Makes the calls told to fail with [`Self::fail`] succeed again (a later boot).
    pub fn heal(&self) {
        self.lock().fail.clear();
    }

    /// Every call so far, in order.
    pub fn calls(&self) -> Vec<VolumeCall> {
        self.lock().calls.clone()
    }

    /// The kinds of the calls so far, in order.
    pub fn ops(&self) -> Vec<VolumeOp> {
        self.lock().calls.iter().map(VolumeCall::op).collect()
    }

    /// The current state of a device.
    pub fn state(&self, device: &Path) -> Option<DeviceState> {
        self.lock().devices.get(device).map(|d| d.state.clone())
    }

    /// The tokens of a device.
    pub fn tokens(&self, device: &Path) -> Vec<KbsToken> {
        self.lock()
            .devices
            .get(device)
            .map(|d| d.tokens.clone())
            .unwrap_or_default()
    }

    /// The root of the file system inside a device (`None`: none).
    pub fn fs(&self, device: &Path) -> Option<RootAttrs> {
        self.lock().devices.get(device).and_then(|d| d.fs)
    }

    /// Names of the open mappings.
    pub fn mappings(&self) -> Vec<String> {
        self.lock().mappings.keys().cloned().collect()
    }

    /// Mount table: mount point → mapped device.
    pub fn mounts(&self) -> BTreeMap<PathBuf, PathBuf> {
        self.lock().mounts.clone()
    }

    /// Records `call`, then fails when `op` was told to fail.
    fn record(
        &self,
        call: VolumeCall,
        device: &Path,
    ) -> Result<MutexGuard<'_, Inner>, VolumeError> {
        let op = call.op();
        let mut inner = self.lock();
        inner.calls.push(call);
        if inner.fail.contains(&op) {
            return Err(injected(op, device));
        }
        Ok(inner)
    }
}

fn missing(device: &Path) -> VolumeError {
    VolumeError::Inspect {
        device: device.to_path_buf(),
        source: std::io::Error::from_raw_os_error(libc::ENOENT),
    }
}

fn luks2<'a>(inner: &'a mut Inner, device: &Path) -> Result<&'a mut FakeDevice, VolumeError> {
    match inner.devices.get_mut(device) {
        Some(dev) if dev.state == DeviceState::Luks2 => Ok(dev),
        Some(_) => Err(VolumeError::Crypt {
            op: "load the LUKS2 header of",
            device: device.to_path_buf(),
            source: LibcryptErr::IOError(std::io::Error::from_raw_os_error(libc::EINVAL)),
        }),
        None => Err(missing(device)),
    }
}

fn check_key(dev: &FakeDevice, device: &Path, key: &VolumeKey) -> Result<u32, VolumeError> {
    if dev.key_sha256 == Some(sha256(key.expose())) {
        Ok(0)
    } else {
        Err(VolumeError::KeyRejected {
            device: device.to_path_buf(),
            resource: key.resource().clone(),
        })
    }
}

impl Volumes for FakeVolumes {
    fn inspect(&self, device: &Path) -> Result<DeviceState, VolumeError> {
        let inner = self.record(VolumeCall::Inspect(device.to_path_buf()), device)?;
        inner
            .devices
            .get(device)
            .map(|d| d.state.clone())
            .ok_or_else(|| missing(device))
    }

    fn format(
        &self,
        device: &Path,
        key: &VolumeKey,
        integrity: Option<Integrity>,
    ) -> Result<u32, VolumeError> {
        let call = VolumeCall::Format {
            device: device.to_path_buf(),
            resource: key.resource().to_string(),
            integrity,
        };
        let mut inner = self.record(call, device)?;
        let dev = inner
            .devices
            .get_mut(device)
            .ok_or_else(|| missing(device))?;
        if dev.state != DeviceState::Blank {
            // As the real implementation: only a blank device is formatted.
            return Err(match decide::decide(device, &dev.state, true) {
                Err(refusal) => VolumeError::Refused(refusal),
                Ok(_) => VolumeError::AlreadyLuks2 {
                    device: device.to_path_buf(),
                },
            });
        }
        *dev = FakeDevice {
            state: DeviceState::Luks2,
            key_sha256: Some(sha256(key.expose())),
            tokens: vec![KbsToken::new(
                key.resource().to_string(),
                Some(TokenState::Initialising),
            )],
            header: HeaderFormat::cvm_warden(integrity),
            fs: None,
        };
        Ok(0)
    }

    fn check_format(&self, device: &Path, integrity: Option<Integrity>) -> Result<(), VolumeError> {
        let call = VolumeCall::CheckFormat {
            device: device.to_path_buf(),
            integrity,
        };
        let mut inner = self.record(call, device)?;
        let dev = luks2(&mut inner, device)?;
        Ok(decide::check_format(device, &dev.header, integrity)?)
    }

    fn token_resources(&self, device: &Path) -> Result<Vec<KbsToken>, VolumeError> {
        let mut inner = self.record(VolumeCall::TokenResources(device.to_path_buf()), device)?;
        Ok(luks2(&mut inner, device)?.tokens.clone())
    }

    fn set_token_state(&self, device: &Path, state: TokenState) -> Result<(), VolumeError> {
        let call = VolumeCall::SetTokenState {
            device: device.to_path_buf(),
            state,
        };
        let mut inner = self.record(call, device)?;
        let dev = luks2(&mut inner, device)?;
        for token in &mut dev.tokens {
            token.state = Some(state);
        }
        Ok(())
    }

    fn verify_key(&self, device: &Path, key: &VolumeKey) -> Result<u32, VolumeError> {
        let call = VolumeCall::VerifyKey {
            device: device.to_path_buf(),
            resource: key.resource().to_string(),
        };
        let mut inner = self.record(call, device)?;
        let dev = luks2(&mut inner, device)?;
        check_key(dev, device, key)
    }

    fn open(
        &self,
        device: &Path,
        name: &str,
        key: &VolumeKey,
        integrity: Option<Integrity>,
    ) -> Result<PathBuf, VolumeError> {
        let call = VolumeCall::Open {
            device: device.to_path_buf(),
            name: name.to_string(),
        };
        let mut inner = self.record(call, device)?;
        let dev = luks2(&mut inner, device)?;
        // As the real implementation: the header it activates from is checked again.
        decide::check_format(device, &dev.header, integrity)?;
        check_key(dev, device, key)?;
        let mapped = Path::new("/dev/mapper").join(name);
        if inner.mappings.contains_key(name) {
            return Err(VolumeError::Crypt {
                op: "activate the dm-crypt mapping of",
                device: device.to_path_buf(),
                source: LibcryptErr::IOError(std::io::Error::from_raw_os_error(libc::EEXIST)),
            });
        }
        inner
            .mappings
            .insert(name.to_string(), device.to_path_buf());
        Ok(mapped)
    }

    fn close(&self, name: &str) -> Result<(), VolumeError> {
        let mapped = Path::new("/dev/mapper").join(name);
        let mut inner = self.record(VolumeCall::Close(name.to_string()), &mapped)?;
        match inner.mappings.remove(name) {
            Some(_) => Ok(()),
            None => Err(VolumeError::Crypt {
                op: "find the mapping",
                device: mapped,
                source: LibcryptErr::IOError(std::io::Error::from_raw_os_error(libc::ENODEV)),
            }),
        }
    }

    fn mkfs_ext4(&self, mapped: &Path, uid: u32, gid: u32) -> Result<(), VolumeError> {
        let call = VolumeCall::MkfsExt4 {
            mapped: mapped.to_path_buf(),
            uid,
            gid,
        };
        let mut inner = self.record(call, mapped)?;
        let (uid, gid) = if inner.ignore_root_owner {
            (0, 0)
        } else {
            (uid, gid)
        };
        let dev = mapped_device(&mut inner, mapped)?;
        // As mke2fs: the root directory is 0755 (0777 less its umask 022).
        dev.fs = Some(RootAttrs {
            uid,
            gid,
            mode: 0o755,
        });
        Ok(())
    }

    fn mount(
        &self,
        mapped: &Path,
        mountpoint: &Path,
        options: MountOptions,
    ) -> Result<RootAttrs, VolumeError> {
        let call = VolumeCall::Mount {
            mapped: mapped.to_path_buf(),
            mountpoint: mountpoint.to_path_buf(),
            options,
        };
        let mut inner = self.record(call, mapped)?;
        let Some(root) = mapped_device(&mut inner, mapped)?.fs else {
            // As mount(2) on a device without an ext4 superblock.
            return Err(VolumeError::Mount {
                device: mapped.to_path_buf(),
                target: mountpoint.to_path_buf(),
                options: super::luks::option_text(super::luks::mount_flags(options)),
                source: nix::errno::Errno::EINVAL,
            });
        };
        inner
            .mounts
            .insert(mountpoint.to_path_buf(), mapped.to_path_buf());
        Ok(root)
    }

    fn set_root_mode(&self, mountpoint: &Path, mode: u32) -> Result<RootAttrs, VolumeError> {
        let call = VolumeCall::SetRootMode {
            mountpoint: mountpoint.to_path_buf(),
            mode,
        };
        let mut inner = self.record(call, mountpoint)?;
        let not_mounted = || VolumeError::Root {
            what: "set the mode of",
            path: mountpoint.to_path_buf(),
            source: std::io::Error::from_raw_os_error(libc::ENOENT),
        };
        let mapped = inner
            .mounts
            .get(mountpoint)
            .cloned()
            .ok_or_else(not_mounted)?;
        let dev = mapped_device(&mut inner, &mapped)?;
        let root = dev.fs.as_mut().ok_or_else(not_mounted)?;
        root.mode = mode & 0o7777;
        Ok(*root)
    }

    fn unmount(&self, mountpoint: &Path) -> Result<(), VolumeError> {
        let mut inner = self.record(VolumeCall::Unmount(mountpoint.to_path_buf()), mountpoint)?;
        match inner.mounts.remove(mountpoint) {
            Some(_) => Ok(()),
            None => Err(VolumeError::Unmount {
                path: mountpoint.to_path_buf(),
                source: nix::errno::Errno::EINVAL,
            }),
        }
    }
}

/// The device behind an open mapping `/dev/mapper/<name>`.
fn mapped_device<'a>(
    inner: &'a mut Inner,
    mapped: &Path,
) -> Result<&'a mut FakeDevice, VolumeError> {
    let device = mapped
        .file_name()
        .and_then(|name| name.to_str())
        .and_then(|name| inner.mappings.get(name))
        .cloned()
        .ok_or_else(|| missing(mapped))?;
    inner
        .devices
        .get_mut(&device)
        .ok_or_else(|| missing(&device))
}
