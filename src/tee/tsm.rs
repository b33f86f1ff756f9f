//! The configfs-tsm report interface (`/sys/kernel/config/tsm/report`, Linux ≥ 6.7) that the
//! `snp` and `tdx` providers share.
//!
//! Kernel ABI (Documentation/ABI/testing/configfs-tsm): `mkdir $root/$name` creates a report
//! entry whose attribute files appear at once; `inblob` (write only, at most 64 bytes) takes
//! the user data; `privlevel` (write only, optional) the privilege level (SEV-SNP VMPL);
//! `provider` (read only) names the format of the answer (`sev_guest`, `tdx_guest`, …);
//! reading `outblob` makes the TEE produce the report (SNP) or quote (TDX); `auxblob` holds
//! supplemental data (for `sev_guest`, the GHCB certificate table); `generation` counts the
//! writes to `inblob` and every option, so a reader can tell whether someone else wrote to
//! the same entry between its write and its read.
//!
//! [`Tsm::generate`] does one request in this order, each try in a fresh entry:
//! mkdir → read `provider` (must be the expected one) → read `generation` (g0) → write
//! `privlevel` (if asked) → write `inblob` → read `outblob` → read `auxblob` (if asked) →
//! read `generation` (must be g0 + the number of writes) → rmdir. A changed generation means
//! another writer raced us: the entry is removed and the request retried, at most
//! [`MAX_TRIES`] times, then it fails closed. The entry is removed on every path, errors
//! included.
//!
//! configfs semantics (attributes that appear on mkdir, a read that triggers the TEE) cannot
//! be reproduced in a temporary directory, so the file operations go through [`TsmFs`]:
//! [`RealTsmFs`] on a guest, [`FakeTsmFs`] (which records every call) in tests.

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::TeeError;

/// Where configfs-tsm report entries are created.
pub const DEFAULT_ROOT: &str = "/sys/kernel/config/tsm/report";

/// The `provider` value of the AMD SEV-SNP guest driver.
pub const PROVIDER_SEV: &str = "sev_guest";

/// The `provider` value of the Intel TDX guest driver.
pub const PROVIDER_TDX: &str = "tdx_guest";

/// How many times a request is tried when another writer changes the entry under us.
pub const MAX_TRIES: u32 = 3;

/// The largest `inblob` the kernel accepts (`TSM_INBLOB_MAX`).
pub const INBLOB_LEN: usize = 64;

/// Makes entry names unique within this process (the pid makes them unique between
/// processes).
static ENTRY_COUNTER: AtomicU64 = AtomicU64::new(0);

/// The file operations configfs-tsm needs.
pub trait TsmFs: fmt::Debug {
    /// True when `path` exists.
    fn exists(&self, path: &Path) -> bool;
    /// Creates the directory `path` (one level).
    fn create_dir(&mut self, path: &Path) -> io::Result<()>;
    /// Removes the empty directory `path` (configfs removes the attributes with it).
    fn remove_dir(&mut self, path: &Path) -> io::Result<()>;
    /// Writes `data` to the attribute `path` in one write.
    fn write(&mut self, path: &Path, data: &[u8]) -> io::Result<()>;
    /// Reads the attribute `path` to its end.
    fn read(&mut self, path: &Path) -> io::Result<Vec<u8>>;
}

/// [`TsmFs`] on the real file system.
#[derive(Debug, Default, Clone, Copy)]
pub struct RealTsmFs;

impl TsmFs for RealTsmFs {
    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }

    fn create_dir(&mut self, path: &Path) -> io::Result<()> {
        std::fs::create_dir(path)
    }

    fn remove_dir(&mut self, path: &Path) -> io::Result<()> {
        std::fs::remove_dir(path)
    }

    fn write(&mut self, path: &Path, data: &[u8]) -> io::Result<()> {
        use std::io::Write;
        let mut file = std::fs::OpenOptions::new().write(true).open(path)?;
        // configfs binary attributes take the whole buffer at once; a short write would
        // leave a truncated inblob behind, so it is an error.
        let written = file.write(data)?;
        if written != data.len() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("short write: {written} of {} bytes", data.len()),
            ));
        }
        file.flush()
    }

    fn read(&mut self, path: &Path) -> io::Result<Vec<u8>> {
        std::fs::read(path)
    }
}

/// One request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TsmRequest {
    /// The user data bound into the report (SNP REPORT_DATA, TDX REPORTDATA).
    pub inblob: [u8; INBLOB_LEN],
    /// The privilege level to write to `privlevel` (SEV-SNP VMPL), or `None` to leave it.
    pub privlevel: Option<u32>,
    /// Whether to read `auxblob` (SEV-SNP certificate table).
    pub read_auxblob: bool,
}

/// The answer to one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TsmReport {
    /// The `provider` attribute, trimmed.
    pub provider: String,
    /// The report or quote.
    pub outblob: Vec<u8>,
    /// The supplemental data, when asked for and not empty.
    pub auxblob: Option<Vec<u8>>,
}

/// A configfs-tsm report root.
#[derive(Debug)]
pub struct Tsm<F: TsmFs> {
    tee: &'static str,
    root: PathBuf,
    fs: F,
}

/// How one try ended when it did not fail outright.
enum Try {
    Done(TsmReport),
    Raced {
        before: u64,
        after: u64,
        writes: u64,
    },
}

impl<F: TsmFs> Tsm<F> {
    /// A report root for provider `tee` (`snp`, `tdx`: used in error messages).
    pub fn new(tee: &'static str, root: impl Into<PathBuf>, fs: F) -> Self {
        Self {
            tee,
            root: root.into(),
            fs,
        }
    }

    /// The report root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// True when the root exists (the kernel has configfs-tsm and configfs is mounted).
    pub fn available(&self) -> bool {
        self.fs.exists(&self.root)
    }

    /// The file operations (tests inspect a fake through this).
    pub fn fs(&self) -> &F {
        &self.fs
    }

    /// Runs one request (see the module documentation for the order). `expected_provider`
    /// is [`PROVIDER_SEV`] or [`PROVIDER_TDX`].
    pub fn generate(
        &mut self,
        expected_provider: &str,
        request: &TsmRequest,
    ) -> Result<TsmReport, TeeError> {
        let mut last_race = (0, 0, 0);
        for _ in 0..MAX_TRIES {
            let entry = self.root.join(format!(
                "cvm-warden-{}-{}",
                std::process::id(),
                ENTRY_COUNTER.fetch_add(1, Ordering::Relaxed)
            ));
            self.fs
                .create_dir(&entry)
                .map_err(|source| TeeError::Device {
                    tee: self.tee,
                    what: "cannot create a configfs-tsm report entry (is the TEE guest driver \
                           loaded and configfs mounted at /sys/kernel/config?)",
                    device: entry.clone(),
                    source,
                })?;
            let outcome = self.try_once(&entry, expected_provider, request);
            if let Err(e) = self.fs.remove_dir(&entry) {
                // The answer (or the error) is already in hand; a leftover entry only
                // costs a directory. Say so, and keep the first error if there was one.
                log::warn!(
                    "{}: cannot remove the configfs-tsm report entry {}: {e}; remove it by hand \
                     with rmdir",
                    self.tee,
                    entry.display()
                );
            }
            match outcome? {
                Try::Done(report) => return Ok(report),
                Try::Raced {
                    before,
                    after,
                    writes,
                } => {
                    log::warn!(
                        "{}: configfs-tsm entry {} changed under us (generation {before} -> \
                         {after}, expected {}); retrying in a fresh entry",
                        self.tee,
                        entry.display(),
                        before + writes
                    );
                    last_race = (before, after, writes);
                }
            }
        }
        let (before, after, writes) = last_race;
        Err(TeeError::Device {
            tee: self.tee,
            what: "another process kept writing to our configfs-tsm report entries; make sure \
                   nothing else uses",
            device: self.root.clone(),
            source: io::Error::other(format!(
                "generation went {before} -> {after} where {} was expected, in each of \
                 {MAX_TRIES} tries",
                before + writes
            )),
        })
    }

    fn try_once(
        &mut self,
        entry: &Path,
        expected_provider: &str,
        request: &TsmRequest,
    ) -> Result<Try, TeeError> {
        let provider = self.read_text(entry, "provider")?;
        if provider != expected_provider {
            return Err(TeeError::Config {
                tee: self.tee,
                detail: format!(
                    "configfs-tsm provider is {provider} but attestation.tee = {}; set \
                     attestation.tee to the TEE this VM runs on (the {provider} driver answers \
                     at {})",
                    self.tee,
                    self.root.display()
                ),
            });
        }
        let before = self.read_generation(entry)?;
        let mut writes = 0;
        if let Some(level) = request.privlevel {
            let path = entry.join("privlevel");
            self.fs
                .write(&path, level.to_string().as_bytes())
                .map_err(|source| TeeError::Device {
                    tee: self.tee,
                    what: "cannot set the privilege level (the broker accepts only VMPL 0 \
                           reports; an SVSM that keeps the guest above VMPL 0 is not \
                           supported) in",
                    device: path,
                    source,
                })?;
            writes += 1;
        }
        let path = entry.join("inblob");
        self.fs
            .write(&path, &request.inblob)
            .map_err(|source| TeeError::Device {
                tee: self.tee,
                what: "cannot write the report data to",
                device: path,
                source,
            })?;
        writes += 1;
        let path = entry.join("outblob");
        let outblob = self.fs.read(&path).map_err(|source| TeeError::Device {
            tee: self.tee,
            what: "the TEE did not produce a report (see the kernel log) when reading",
            device: path.clone(),
            source,
        })?;
        if outblob.is_empty() {
            return Err(TeeError::Malformed {
                tee: self.tee,
                what: "configfs-tsm outblob",
                detail: format!("{} is empty", path.display()),
            });
        }
        let auxblob = if request.read_auxblob {
            let path = entry.join("auxblob");
            let aux = self.fs.read(&path).map_err(|source| TeeError::Device {
                tee: self.tee,
                what: "cannot read the supplemental data (certificates) from",
                device: path,
                source,
            })?;
            (!aux.is_empty()).then_some(aux)
        } else {
            None
        };
        let after = self.read_generation(entry)?;
        if after != before + writes {
            return Ok(Try::Raced {
                before,
                after,
                writes,
            });
        }
        Ok(Try::Done(TsmReport {
            provider,
            outblob,
            auxblob,
        }))
    }

    fn read_text(&mut self, entry: &Path, attribute: &'static str) -> Result<String, TeeError> {
        let path = entry.join(attribute);
        let bytes = self.fs.read(&path).map_err(|source| TeeError::Device {
            tee: self.tee,
            what: "cannot read the configfs-tsm attribute",
            device: path.clone(),
            source,
        })?;
        String::from_utf8(bytes)
            .map(|s| s.trim().to_string())
            .map_err(|e| TeeError::Malformed {
                tee: self.tee,
                what: "configfs-tsm attribute",
                detail: format!("{} is not text: {e}", path.display()),
            })
    }

    fn read_generation(&mut self, entry: &Path) -> Result<u64, TeeError> {
        let text = self.read_text(entry, "generation")?;
        text.parse().map_err(|e| TeeError::Malformed {
            tee: self.tee,
            what: "configfs-tsm generation",
            detail: format!(
                "{} holds {text:?}, not a number: {e}",
                entry.join("generation").display()
            ),
        })
    }
}

/// One report entry of [`FakeTsmFs`].
#[derive(Debug, Default, Clone)]
struct FakeEntry {
    generation: u64,
    inblob: Vec<u8>,
}

/// The TEE behind a [`FakeTsmFs`]: turns an inblob into an outblob.
pub type FakeResponder = Box<dyn FnMut(&[u8]) -> io::Result<Vec<u8>> + Send>;

/// A recording configfs-tsm fake: `mkdir` under the root creates an entry with its
/// attributes, writes bump `generation`, reading `outblob` calls the responder.
pub struct FakeTsmFs {
    root: PathBuf,
    root_exists: bool,
    provider: String,
    responder: FakeResponder,
    auxblob: Vec<u8>,
    entries: BTreeMap<PathBuf, FakeEntry>,
    last_privlevel_written: Option<String>,
    /// Every call, in order: `mkdir NAME`, `rmdir NAME`, `read NAME/ATTR`, `write NAME/ATTR`.
    pub calls: Vec<String>,
    /// How many of the next requests see a foreign write between their inblob write and
    /// their outblob read.
    pub races: u32,
    /// Attribute (`provider`, `outblob`, `inblob`, `privlevel`, `auxblob`, `generation`)
    /// whose access fails with an I/O error.
    pub fail_on: Option<&'static str>,
    /// Whether `rmdir` fails.
    pub fail_rmdir: bool,
    /// Whether `mkdir` fails.
    pub fail_mkdir: bool,
}

impl fmt::Debug for FakeTsmFs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FakeTsmFs")
            .field("root", &self.root)
            .field("provider", &self.provider)
            .field("entries", &self.entries.keys().collect::<Vec<_>>())
            .field("calls", &self.calls)
            .finish_non_exhaustive()
    }
}

impl FakeTsmFs {
    /// A fake root at `root` answered by `provider` (`sev_guest`, `tdx_guest`), where
    /// `responder` computes the outblob from the inblob.
    pub fn new(root: impl Into<PathBuf>, provider: &str, responder: FakeResponder) -> Self {
        Self {
            root: root.into(),
            root_exists: true,
            provider: provider.to_string(),
            responder,
            auxblob: Vec::new(),
            entries: BTreeMap::new(),
            last_privlevel_written: None,
            calls: Vec::new(),
            races: 0,
            fail_on: None,
            fail_rmdir: false,
            fail_mkdir: false,
        }
    }

    /// A root that does not exist (kernel without configfs-tsm).
    pub fn absent(root: impl Into<PathBuf>) -> Self {
        let mut fake = Self::new(root, "", Box::new(|_| Ok(Vec::new())));
        fake.root_exists = false;
        fake
    }

    /// Sets what `auxblob` returns (empty: no supplemental data).
    pub fn with_auxblob(mut self, auxblob: Vec<u8>) -> Self {
        self.auxblob = auxblob;
        self
    }

    /// The entries that exist now (all of them should be gone after a request).
    pub fn live_entries(&self) -> usize {
        self.entries.len()
    }

    /// The privlevel written to the most recent entry that had one.
    pub fn last_privlevel(&self) -> Option<String> {
        self.last_privlevel_written.clone()
    }

    fn split<'p>(&self, path: &'p Path) -> io::Result<(PathBuf, &'p str)> {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        let parent = path
            .parent()
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        Ok((parent.to_path_buf(), name))
    }

    fn label(&self, path: &Path) -> String {
        path.strip_prefix(&self.root)
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| path.display().to_string())
    }

    fn check_fail(&self, attribute: &str) -> io::Result<()> {
        if self.fail_on == Some(attribute) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("injected failure on {attribute}"),
            ));
        }
        Ok(())
    }
}

impl TsmFs for FakeTsmFs {
    fn exists(&self, path: &Path) -> bool {
        self.root_exists && (path == self.root || self.entries.contains_key(path))
    }

    fn create_dir(&mut self, path: &Path) -> io::Result<()> {
        self.calls.push(format!("mkdir {}", self.label(path)));
        if !self.root_exists || path.parent() != Some(self.root.as_path()) {
            return Err(io::Error::from(io::ErrorKind::NotFound));
        }
        if self.fail_mkdir {
            return Err(io::Error::from_raw_os_error(libc::ENXIO));
        }
        if self.entries.contains_key(path) {
            return Err(io::Error::from(io::ErrorKind::AlreadyExists));
        }
        self.entries
            .insert(path.to_path_buf(), FakeEntry::default());
        Ok(())
    }

    fn remove_dir(&mut self, path: &Path) -> io::Result<()> {
        self.calls.push(format!("rmdir {}", self.label(path)));
        if self.fail_rmdir {
            return Err(io::Error::from(io::ErrorKind::PermissionDenied));
        }
        self.entries
            .remove(path)
            .map(|_| ())
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))
    }

    fn write(&mut self, path: &Path, data: &[u8]) -> io::Result<()> {
        self.calls.push(format!("write {}", self.label(path)));
        let (entry, attribute) = self.split(path)?;
        self.check_fail(attribute)?;
        let state = self
            .entries
            .get_mut(&entry)
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        match attribute {
            "inblob" => {
                if data.len() > INBLOB_LEN {
                    return Err(io::Error::from_raw_os_error(libc::EINVAL));
                }
                state.inblob = data.to_vec();
            }
            "privlevel" => {
                self.last_privlevel_written = Some(String::from_utf8_lossy(data).into_owned());
            }
            _ => return Err(io::Error::from(io::ErrorKind::PermissionDenied)),
        }
        state.generation += 1;
        if attribute == "inblob" && self.races > 0 {
            // Another process writes the same entry before we read it back.
            self.races -= 1;
            state.generation += 1;
        }
        Ok(())
    }

    fn read(&mut self, path: &Path) -> io::Result<Vec<u8>> {
        self.calls.push(format!("read {}", self.label(path)));
        let (entry, attribute) = self.split(path)?;
        self.check_fail(attribute)?;
        let state = self
            .entries
            .get(&entry)
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?
            .clone();
        match attribute {
            "provider" => Ok(format!("{}\n", self.provider).into_bytes()),
            "generation" => Ok(format!("{}\n", state.generation).into_bytes()),
            "outblob" => (self.responder)(&state.inblob),
            "auxblob" => Ok(self.auxblob.clone()),
            _ => Err(io::Error::from(io::ErrorKind::PermissionDenied)),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    const ROOT: &str = "/fake/tsm/report";

    fn echo_fs(provider: &str) -> FakeTsmFs {
        FakeTsmFs::new(
            ROOT,
            provider,
            Box::new(|inblob| {
                let mut out = b"REPORT:".to_vec();
                out.extend_from_slice(inblob);
                Ok(out)
            }),
        )
    }

    fn request(privlevel: Option<u32>, read_auxblob: bool) -> TsmRequest {
        let mut inblob = [0u8; INBLOB_LEN];
        inblob[..4].copy_from_slice(b"bind");
        TsmRequest {
            inblob,
            privlevel,
            read_auxblob,
        }
    }

    /// The calls with the (unique, pid-dependent) entry names replaced by `E`.
    fn calls(fs: &FakeTsmFs) -> Vec<String> {
        fs.calls
            .iter()
            .map(|c| {
                let (verb, rest) = c.split_once(' ').unwrap();
                let attr = rest.split_once('/').map(|(_, a)| format!("/{a}"));
                format!("{verb} E{}", attr.unwrap_or_default())
            })
            .collect()
    }

    #[test]
    fn request_follows_the_abi_order_and_removes_the_entry() {
        let mut tsm = Tsm::new("snp", ROOT, echo_fs(PROVIDER_SEV).with_auxblob(vec![7; 3]));
        let report = tsm.generate(PROVIDER_SEV, &request(Some(0), true)).unwrap();
        assert_eq!(report.provider, "sev_guest");
        assert_eq!(&report.outblob[..11], b"REPORT:bind");
        assert_eq!(report.outblob.len(), 7 + 64);
        assert_eq!(report.auxblob, Some(vec![7; 3]));
        assert_eq!(
            calls(tsm.fs()),
            [
                "mkdir E",
                "read E/provider",
                "read E/generation",
                "write E/privlevel",
                "write E/inblob",
                "read E/outblob",
                "read E/auxblob",
                "read E/generation",
                "rmdir E",
            ]
        );
        assert_eq!(tsm.fs().last_privlevel().as_deref(), Some("0"));
        assert_eq!(tsm.fs().live_entries(), 0);
    }

    #[test]
    fn tdx_shaped_request_writes_only_the_inblob() {
        let mut tsm = Tsm::new("tdx", ROOT, echo_fs(PROVIDER_TDX));
        let report = tsm.generate(PROVIDER_TDX, &request(None, false)).unwrap();
        assert_eq!(report.auxblob, None);
        assert_eq!(
            calls(tsm.fs()),
            [
                "mkdir E",
                "read E/provider",
                "read E/generation",
                "write E/inblob",
                "read E/outblob",
                "read E/generation",
                "rmdir E",
            ]
        );
    }

    #[test]
    fn empty_auxblob_means_none() {
        let mut tsm = Tsm::new("snp", ROOT, echo_fs(PROVIDER_SEV));
        let report = tsm.generate(PROVIDER_SEV, &request(None, true)).unwrap();
        assert_eq!(report.auxblob, None);
    }

    #[test]
    fn one_race_is_retried_in_a_fresh_entry() {
        let mut fs = echo_fs(PROVIDER_SEV);
        fs.races = 1;
        let mut tsm = Tsm::new("snp", ROOT, fs);
        let report = tsm.generate(PROVIDER_SEV, &request(None, false)).unwrap();
        assert_eq!(&report.outblob[..11], b"REPORT:bind");
        let mkdirs: Vec<_> = tsm
            .fs()
            .calls
            .iter()
            .filter(|c| c.starts_with("mkdir"))
            .collect();
        assert_eq!(mkdirs.len(), 2);
        assert_ne!(mkdirs[0], mkdirs[1], "each try uses a fresh entry");
        assert_eq!(tsm.fs().live_entries(), 0);
    }

    #[test]
    fn persistent_race_fails_closed_after_max_tries() {
        let mut fs = echo_fs(PROVIDER_TDX);
        fs.races = MAX_TRIES;
        let mut tsm = Tsm::new("tdx", ROOT, fs);
        let err = tsm
            .generate(PROVIDER_TDX, &request(None, false))
            .unwrap_err();
        let text = format!("{err}: {}", std::error::Error::source(&err).unwrap());
        assert!(text.contains("another process kept writing"), "{text}");
        assert!(
            text.contains("generation went 0 -> 2 where 1 was expected"),
            "{text}"
        );
        let mkdirs = tsm
            .fs()
            .calls
            .iter()
            .filter(|c| c.starts_with("mkdir"))
            .count();
        let rmdirs = tsm
            .fs()
            .calls
            .iter()
            .filter(|c| c.starts_with("rmdir"))
            .count();
        assert_eq!((mkdirs, rmdirs), (MAX_TRIES as usize, MAX_TRIES as usize));
        assert_eq!(tsm.fs().live_entries(), 0);
    }

    #[test]
    fn provider_mismatch_names_both_and_removes_the_entry() {
        let mut tsm = Tsm::new("snp", ROOT, echo_fs(PROVIDER_TDX));
        let err = tsm
            .generate(PROVIDER_SEV, &request(Some(0), true))
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("configfs-tsm provider is tdx_guest but attestation.tee = snp"),
            "{err}"
        );
        assert_eq!(calls(tsm.fs()), ["mkdir E", "read E/provider", "rmdir E"]);
        assert_eq!(tsm.fs().live_entries(), 0);
    }

    #[test]
    fn every_failing_attribute_still_removes_the_entry() {
        for attribute in [
            "provider",
            "generation",
            "privlevel",
            "inblob",
            "outblob",
            "auxblob",
        ] {
            let mut fs = echo_fs(PROVIDER_SEV);
            fs.fail_on = Some(attribute);
            let mut tsm = Tsm::new("snp", ROOT, fs);
            let err = tsm
                .generate(PROVIDER_SEV, &request(Some(0), true))
                .unwrap_err();
            assert!(
                matches!(err, TeeError::Device { ref device, .. } if device.ends_with(attribute)),
                "{attribute}: {err:?}"
            );
            assert_eq!(tsm.fs().live_entries(), 0, "{attribute}");
            assert!(
                tsm.fs().calls.last().unwrap().starts_with("rmdir"),
                "{attribute}"
            );
        }
    }

    #[test]
    fn failed_outblob_read_is_not_retried() {
        let fs = FakeTsmFs::new(
            ROOT,
            PROVIDER_SEV,
            Box::new(|_| Err(io::Error::from_raw_os_error(libc::EIO))),
        );
        let mut tsm = Tsm::new("snp", ROOT, fs);
        let err = tsm
            .generate(PROVIDER_SEV, &request(None, false))
            .unwrap_err();
        assert!(
            err.to_string().contains("did not produce a report"),
            "{err}"
        );
        assert_eq!(
            tsm.fs()
                .calls
                .iter()
                .filter(|c| c.starts_with("mkdir"))
                .count(),
            1
        );
    }

    #[test]
    fn empty_outblob_is_malformed() {
        let fs = FakeTsmFs::new(ROOT, PROVIDER_TDX, Box::new(|_| Ok(Vec::new())));
        let mut tsm = Tsm::new("tdx", ROOT, fs);
        let err = tsm
            .generate(PROVIDER_TDX, &request(None, false))
            .unwrap_err();
        assert!(matches!(err, TeeError::Malformed { .. }), "{err:?}");
        assert_eq!(tsm.fs().live_entries(), 0);
    }

    #[test]
    fn mkdir_failure_is_reported_with_a_hint() {
        let mut fs = echo_fs(PROVIDER_SEV);
        fs.fail_mkdir = true;
        let mut tsm = Tsm::new("snp", ROOT, fs);
        let err = tsm
            .generate(PROVIDER_SEV, &request(None, false))
            .unwrap_err();
        assert!(err.to_string().contains("guest driver"), "{err}");
        assert!(!tsm.fs().calls.iter().any(|c| c.starts_with("rmdir")));
    }

    #[test]
    fn rmdir_failure_after_success_keeps_the_answer() {
        let mut fs = echo_fs(PROVIDER_SEV);
        fs.fail_rmdir = true;
        let mut tsm = Tsm::new("snp", ROOT, fs);
        let report = tsm.generate(PROVIDER_SEV, &request(None, false)).unwrap();
        assert_eq!(&report.outblob[..11], b"REPORT:bind");
    }

    #[test]
    fn absent_root_is_not_available() {
        let tsm = Tsm::new("snp", ROOT, FakeTsmFs::absent(ROOT));
        assert!(!tsm.available());
        let tsm = Tsm::new("snp", ROOT, echo_fs(PROVIDER_SEV));
        assert!(tsm.available());
    }

    #[test]
    fn real_fs_round_trips_in_a_temp_dir() {
        // Only the plain file operations: configfs behaviour needs a guest.
        let dir = tempfile::tempdir().unwrap();
        let mut fs = RealTsmFs;
        let entry = dir.path().join("entry");
        fs.create_dir(&entry).unwrap();
        assert!(fs.exists(&entry));
        std::fs::write(entry.join("inblob"), b"").unwrap();
        fs.write(&entry.join("inblob"), &[1, 2, 3]).unwrap();
        assert_eq!(fs.read(&entry.join("inblob")).unwrap(), [1, 2, 3]);
        assert!(fs.write(&entry.join("missing"), &[1]).is_err());
        assert!(
            fs.remove_dir(&entry).is_err(),
            "a non-empty directory stays"
        );
        std::fs::remove_file(entry.join("inblob")).unwrap();
        fs.remove_dir(&entry).unwrap();
        assert!(!fs.exists(&entry));
    }
}
