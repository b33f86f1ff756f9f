//! [`FakeVolumes`]: the recording fake of [`Volumes`]. It keeps a table of devices (their
//! [`DeviceState`], the SHA-256 of the key a LUKS2 one was formatted with, its token
//! resources and its [`HeaderFormat`]), records every call, mirrors the real implementation's
//! refusals (format only a blank device; the header format must be cvm-warden's, also on
//! open; the key must match), and fails the operations it is told to fail.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};

use libcryptsetup_rs::LibcryptErr;
use sha2::{Digest as _, Sha256};

use super::decide::{self, DeviceState, HeaderFormat};
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
    MkfsExt4(PathBuf),
    /// [`Volumes::mount`].
    Mount {
        /// Mapped device.
        mapped: PathBuf,
        /// Mount point.
        mountpoint: PathBuf,
        /// Options.
        options: MountOptions,
    },
}

impl VolumeCall {
    /// The kind of call.
    pub fn op(&self) -> VolumeOp {
        match self {
            VolumeCall::Inspect(_) => VolumeOp::Inspect,
            VolumeCall::Format { .. } => VolumeOp::Format,
            VolumeCall::CheckFormat { .. } => VolumeOp::CheckFormat,
            VolumeCall::TokenResources(_) => VolumeOp::TokenResources,
            VolumeCall::VerifyKey { .. } => VolumeOp::VerifyKey,
            VolumeCall::Open { .. } => VolumeOp::Open,
            VolumeCall::Close(_) => VolumeOp::Close,
            VolumeCall::MkfsExt4(_) => VolumeOp::MkfsExt4,
            VolumeCall::Mount { .. } => VolumeOp::Mount,
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
}

#[derive(Debug, Clone)]
struct FakeDevice {
    state: DeviceState,
    key_sha256: Option<[u8; 32]>,
    tokens: Vec<String>,
    header: HeaderFormat,
}

#[derive(Debug, Default)]
struct Inner {
    devices: BTreeMap<PathBuf, FakeDevice>,
    calls: Vec<VolumeCall>,
    fail: BTreeSet<VolumeOp>,
    mappings: BTreeMap<String, PathBuf>,
    mounts: BTreeMap<PathBuf, PathBuf>,
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
            },
        );
        self
    }

    /// Adds a LUKS2 device that `key` opens and whose tokens name `tokens`, with the header
    /// format cvm-warden writes without integrity (see [`Self::with_header`]).
    pub fn with_luks2(self, device: impl Into<PathBuf>, key: &[u8], tokens: &[&str]) -> Self {
        self.lock().devices.insert(
            device.into(),
            FakeDevice {
                state: DeviceState::Luks2,
                key_sha256: Some(sha256(key)),
                tokens: tokens.iter().map(|t| t.to_string()).collect(),
                header: HeaderFormat::cvm_warden(None),
            },
        );
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
            tokens: vec![key.resource().to_string()],
            header: HeaderFormat::cvm_warden(integrity),
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

    fn token_resources(&self, device: &Path) -> Result<Vec<String>, VolumeError> {
        let mut inner = self.record(VolumeCall::TokenResources(device.to_path_buf()), device)?;
        Ok(luks2(&mut inner, device)?.tokens.clone())
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

    fn mkfs_ext4(&self, mapped: &Path) -> Result<(), VolumeError> {
        let _recorded = self.record(VolumeCall::MkfsExt4(mapped.to_path_buf()), mapped)?;
        Ok(())
    }

    fn mount(
        &self,
        mapped: &Path,
        mountpoint: &Path,
        options: MountOptions,
    ) -> Result<(), VolumeError> {
        let call = VolumeCall::Mount {
            mapped: mapped.to_path_buf(),
            mountpoint: mountpoint.to_path_buf(),
            options,
        };
        let mut inner = self.record(call, mapped)?;
        inner
            .mounts
            .insert(mountpoint.to_path_buf(), mapped.to_path_buf());
        Ok(())
    }
}
