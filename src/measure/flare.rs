//! NVIDIA FLARE startup-kit verification: the kit is checked exactly as FLARE 2.9 checks a
//! signed folder, plus what FLARE's check misses, before anything asks for a key.
//!
//! FLARE's scheme (`nvflare/lighter/utils.py`: `sign_folders`, and
//! `verify_folder_signature_and_get_signers` with `single_signer=True`, which
//! `nvflare/tool/verify_startup_kits.py` calls; `SignatureBuilder` signs a CC-enabled
//! participant's whole folder from its root): every directory holds a `signature.json`, a JSON
//! object that maps each file name to the base64 RSA-PSS signature (SHA-256, MGF1-SHA-256,
//! salt length = the maximum, `emLen - 32 - 2`, when signing; any salt length is accepted when
//! verifying, as OpenSSL does for `PSS.MAX_LENGTH`) of the file's bytes, and each subdirectory
//! name to the signature of the name's UTF-8 bytes, all made with the project's root CA key;
//! `startup/rootCA.pem` holds that CA's certificate. FLARE refuses symlinks, and a file or
//! directory without an entry; it skips `signature.json` and `.__nvfl_submitter.crt`.
//!
//! What this check adds: the root CA certificate must be the pinned one (checked first, so a
//! re-signed kit with a swapped `rootCA.pem` fails on the pin); an entry whose file or
//! directory is missing is refused (unless the policy lists it as withheld: a private key the
//! broker releases as a `[[secret]]`); `.__nvfl_submitter.crt` is an unsigned file like any
//! other (a CC kit never holds one); non-regular files, names that are not UTF-8 or hold
//! control characters, and one signature used for two entries (`signature.json` itself is not
//! signed, so copying another file's entry is the one way to move signed bytes to another name)
//! are refused. The root CA's validity dates are not checked (FLARE does not either, and the
//! boot has no trusted clock).
//!
//! The result, [`VerifiedKit`], is what the measure stage records: the root CA digest and the
//! kit's listing (every directory, every file with its SHA-256, every withheld path), whose
//! format is [`VerifiedKit::listing`].

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use base64::Engine;
use rsa::pkcs8::DecodePublicKey;
use rsa::traits::PublicKeyParts;
use rsa::{Pss, RsaPublicKey};
use serde::Serialize;
use sha2::{Digest as _, Sha256};
use x509_cert::der::{Decode, Encode};

use crate::digest::Digest;

/// The signature file FLARE writes into every directory of a signed folder.
pub const SIGNATURE_FILE: &str = "signature.json";
/// The submitter certificate name FLARE's verifier skips (never in a CC kit).
pub const SUBMITTER_CERT_FILE: &str = ".__nvfl_submitter.crt";
/// The project root CA certificate, relative to the participant folder.
pub const ROOT_CA_FILE: &str = "startup/rootCA.pem";
/// The first line of [`VerifiedKit::listing`].
pub const LISTING_HEADER: &str = "cvm-warden flare kit v1";
/// At most this many problems are named in a [`KitError::Tampered`] message.
pub const MAX_LISTED_PROBLEMS: usize = 20;

/// Largest RSA modulus accepted for the root CA key (FLARE makes 2048-bit keys).
const MAX_KEY_BITS: usize = 8192;

/// One verified entry of a kit, by its path relative to the kit root (`/`-separated).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum KitEntry {
    /// A signed directory.
    Dir {
        /// Relative path.
        path: String,
    },
    /// A regular file: signed, or a `signature.json`.
    File {
        /// Relative path.
        path: String,
        /// SHA-256 of its bytes.
        sha256: Digest,
    },
    /// A signed entry the policy withholds from the bundle (released as a secret).
    Withheld {
        /// Relative path.
        path: String,
    },
}

impl KitEntry {
    /// The entry's path relative to the kit root.
    pub fn path(&self) -> &str {
        match self {
            KitEntry::Dir { path } | KitEntry::File { path, .. } | KitEntry::Withheld { path } => {
                path
            }
        }
    }

    fn line(&self) -> String {
        match self {
            KitEntry::Dir { path } => format!("dir {path}"),
            KitEntry::File { path, sha256 } => format!("file {sha256} {path}"),
            KitEntry::Withheld { path } => format!("withheld {path}"),
        }
    }
}

/// A kit that verified: its root CA digest and every entry, sorted by path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedKit {
    /// SHA-256 of the root CA certificate's DER bytes (`startup/rootCA.pem`).
    pub root_ca_sha256: Digest,
    /// Every directory and file below the kit root, and every withheld entry, by path.
    pub entries: Vec<KitEntry>,
}

impl VerifiedKit {
    /// The listing the measure stage hashes: `cvm-warden flare kit v1`, `root-ca sha256:<hex>`,
    /// then one line per entry in path order (`dir PATH`, `file sha256:<hex> PATH`,
    /// `withheld PATH`), each line ending in `\n`.
    pub fn listing(&self) -> String {
        let mut text = format!("{LISTING_HEADER}\nroot-ca {}\n", self.root_ca_sha256);
        for entry in &self.entries {
            text.push_str(&entry.line());
            text.push('\n');
        }
        text
    }

    /// SHA-256 of [`VerifiedKit::listing`] (the digest of the `flare-kit` event).
    pub fn listing_digest(&self) -> Digest {
        Digest::of(self.listing().as_bytes())
    }

    /// How many entries of each kind: (files, directories, withheld).
    pub fn counts(&self) -> (usize, usize, usize) {
        let mut counts = (0, 0, 0);
        for entry in &self.entries {
            match entry {
                KitEntry::File { .. } => counts.0 += 1,
                KitEntry::Dir { .. } => counts.1 += 1,
                KitEntry::Withheld { .. } => counts.2 += 1,
            }
        }
        counts
    }
}

/// One reason a kit does not verify, by the path relative to the kit root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KitProblem {
    /// Relative path (`.` for the kit root).
    pub path: String,
    /// What is wrong with it, and what to do.
    pub what: String,
}

impl std::fmt::Display for KitProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path, self.what)
    }
}

/// Why a startup kit was refused. Paths are the kit directory and, inside it, relative paths.
#[derive(Debug, thiserror::Error)]
pub enum KitError {
    /// The kit directory cannot be examined.
    #[error("cannot open NVIDIA FLARE startup kit {kit}; check workload.flare.startup_kit")]
    Open {
        /// The kit directory.
        kit: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The kit path is not a directory (or is a symlink).
    #[error("NVIDIA FLARE startup kit {kit} is {what}, not a directory; point workload.flare.startup_kit at the participant folder that holds startup/")]
    NotDirectory {
        /// The kit directory.
        kit: PathBuf,
        /// `a symlink`, `a file`.
        what: &'static str,
    },
    /// `startup/rootCA.pem` is missing.
    #[error("NVIDIA FLARE startup kit {kit} has no {ROOT_CA_FILE}; {hint}")]
    NoRootCa {
        /// The kit directory.
        kit: PathBuf,
        /// What to do.
        hint: &'static str,
    },
    /// A file of the kit cannot be read.
    #[error("cannot read {rel} in NVIDIA FLARE startup kit {kit}")]
    Read {
        /// The kit directory.
        kit: PathBuf,
        /// Relative path.
        rel: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// `startup/rootCA.pem` is not one RSA certificate.
    #[error("{ROOT_CA_FILE} in NVIDIA FLARE startup kit {kit}: {problem}; use the rootCA.pem that `nvflare provision` wrote")]
    RootCa {
        /// The kit directory.
        kit: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// The root CA certificate is not the pinned one.
    #[error("{ROOT_CA_FILE} in NVIDIA FLARE startup kit {kit} is not the pinned root CA: workload.flare.root_ca_sha256 is {pinned}, the certificate's SHA-256 is {actual}; the kit belongs to another project or its root CA was replaced: install the kit provisioned for this project, or pin its root CA (`openssl x509 -in {ROOT_CA_FILE} -noout -fingerprint -sha256`) if the project was provisioned again")]
    PinMismatch {
        /// The kit directory.
        kit: PathBuf,
        /// The policy's pin.
        pinned: Digest,
        /// The certificate's digest.
        actual: Digest,
    },
    /// Entries of the kit do not verify against the root CA.
    #[error("NVIDIA FLARE startup kit {kit} does not verify against its root CA {root_ca}: {}; the kit differs from what the project's root CA signed: install the kit as `nvflare provision` wrote it and rebuild the image", list_problems(problems))]
    Tampered {
        /// The kit directory.
        kit: PathBuf,
        /// The pinned root CA digest.
        root_ca: Digest,
        /// Every problem, in path order.
        problems: Vec<KitProblem>,
    },
}

fn list_problems(problems: &[KitProblem]) -> String {
    let shown = problems.len().min(MAX_LISTED_PROBLEMS);
    let mut text = problems[..shown]
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ");
    if problems.len() > shown {
        text.push_str(&format!("; and {} more", problems.len() - shown));
    }
    text
}

/// SHA-256 of the DER certificate in a PEM file, as `openssl x509 -noout -fingerprint -sha256`
/// prints it. The file must hold exactly one `CERTIFICATE` block.
pub fn certificate_sha256(pem: &[u8]) -> Result<(Digest, Vec<u8>), String> {
    let blocks = pem_blocks(pem);
    if blocks != 1 {
        return Err(format!(
            "it holds {blocks} PEM blocks; FLARE writes exactly one CERTIFICATE"
        ));
    }
    let (label, der) = x509_cert::der::pem::decode_vec(pem)
        .map_err(|e| format!("it is not a PEM certificate ({e})"))?;
    if label != "CERTIFICATE" {
        return Err(format!("its PEM block is a {label:?}, not a CERTIFICATE"));
    }
    Ok((Digest::of(&der), der))
}

fn pem_blocks(pem: &[u8]) -> usize {
    let marker = b"-----BEGIN ";
    pem.windows(marker.len()).filter(|w| *w == marker).count()
}

/// The pin for a kit: the SHA-256 of `startup/rootCA.pem`'s certificate (`kit` is the
/// participant folder). What `workload.flare.root_ca_sha256` must say.
pub fn root_ca_sha256(kit: &Path) -> Result<Digest, KitError> {
    let (digest, _) = read_root_ca(kit)?;
    Ok(digest)
}

fn read_root_ca(kit: &Path) -> Result<(Digest, Vec<u8>), KitError> {
    let path = kit.join(ROOT_CA_FILE);
    match fs::symlink_metadata(&path) {
        Ok(meta) if meta.file_type().is_file() => {}
        Ok(meta) => {
            return Err(KitError::RootCa {
                kit: kit.to_path_buf(),
                problem: format!("it is {}, not a regular file", type_words(&meta)),
            })
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let hint = if kit.join("rootCA.pem").exists() {
                "this looks like the startup/ folder itself: point workload.flare.startup_kit at the participant folder above it (FLARE signs a CC participant's whole folder from its root)"
            } else {
                "point workload.flare.startup_kit at the participant folder that `nvflare provision` wrote (prod_NN/<participant>, holding startup/, local/, transfer/)"
            };
            return Err(KitError::NoRootCa {
                kit: kit.to_path_buf(),
                hint,
            });
        }
        Err(source) => {
            return Err(KitError::Read {
                kit: kit.to_path_buf(),
                rel: ROOT_CA_FILE.to_string(),
                source,
            })
        }
    }
    let pem = read_no_follow(&path).map_err(|source| KitError::Read {
        kit: kit.to_path_buf(),
        rel: ROOT_CA_FILE.to_string(),
        source,
    })?;
    certificate_sha256(&pem).map_err(|problem| KitError::RootCa {
        kit: kit.to_path_buf(),
        problem,
    })
}

fn read_no_follow(path: &Path) -> io::Result<Vec<u8>> {
    let mut file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    let mut data = Vec::new();
    file.read_to_end(&mut data)?;
    Ok(data)
}

fn hash_no_follow(path: &Path) -> io::Result<[u8; 32]> {
    let mut file: File = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)?;
    if !file.metadata()?.file_type().is_file() {
        return Err(io::Error::other("not a regular file when opened"));
    }
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher.finalize().into())
}

fn type_words(meta: &fs::Metadata) -> &'static str {
    let t = meta.file_type();
    if t.is_symlink() {
        "a symbolic link"
    } else if t.is_dir() {
        "a directory"
    } else if t.is_file() {
        "a file"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_char_device() {
        "a character device"
    } else {
        "of an unknown type"
    }
}

/// The root CA's public key and the PSS parameters FLARE signs with.
struct Verifier {
    key: RsaPublicKey,
    salt_len: usize,
}

impl Verifier {
    fn new(der: &[u8]) -> Result<Verifier, String> {
        let cert = x509_cert::Certificate::from_der(der)
            .map_err(|e| format!("it is not an X.509 certificate ({e})"))?;
        let spki = cert
            .tbs_certificate
            .subject_public_key_info
            .to_der()
            .map_err(|e| format!("its public key cannot be encoded ({e})"))?;
        let key = RsaPublicKey::from_public_key_der(&spki).map_err(|e| {
            format!("its public key is not an RSA key ({e}); FLARE signs kits with an RSA root key")
        })?;
        let bits = key.n().bits();
        if !(1024..=MAX_KEY_BITS).contains(&bits) {
            return Err(format!(
                "its RSA key has {bits} bits; FLARE's root keys have 2048"
            ));
        }
        // PSS.MAX_LENGTH: emLen - hLen - 2, emLen = ceil((modBits - 1) / 8) (RFC 8017 9.1.1).
        let em_len = (bits - 1).div_ceil(8);
        Ok(Verifier {
            key,
            salt_len: em_len - 32 - 2,
        })
    }

    /// FLARE verifies with `PSS.MAX_LENGTH`, which OpenSSL takes as "any salt length" when
    /// verifying (checked with nvflare 2.9's `cryptography`: a 32-byte salt passes). FLARE
    /// signs with the maximum, so that is tried first; the others only when it fails.
    fn verify(&self, hashed: &[u8; 32], signature: &[u8]) -> bool {
        let with = |salt_len| {
            self.key
                .verify(Pss::new_with_salt::<Sha256>(salt_len), hashed, signature)
                .is_ok()
        };
        with(self.salt_len) || (0..self.salt_len).rev().any(with)
    }
}

/// Verifies the startup kit at `kit` (the participant folder, holding `startup/rootCA.pem`)
/// against the pinned root CA digest; `withheld` lists the kit-relative paths of signed
/// entries that are deliberately absent (released as secrets). The pin is checked before any
/// signature. Every problem found is named in [`KitError::Tampered`].
pub fn verify_kit(
    kit: &Path,
    pinned_root_ca: &Digest,
    withheld: &[String],
) -> Result<VerifiedKit, KitError> {
    match fs::symlink_metadata(kit) {
        Ok(meta) if meta.file_type().is_dir() => {}
        Ok(meta) => {
            return Err(KitError::NotDirectory {
                kit: kit.to_path_buf(),
                what: type_words(&meta),
            })
        }
        Err(source) => {
            return Err(KitError::Open {
                kit: kit.to_path_buf(),
                source,
            })
        }
    }
    let (actual, der) = read_root_ca(kit)?;
    if actual != *pinned_root_ca {
        return Err(KitError::PinMismatch {
            kit: kit.to_path_buf(),
            pinned: *pinned_root_ca,
            actual,
        });
    }
    let verifier = Verifier::new(&der).map_err(|problem| KitError::RootCa {
        kit: kit.to_path_buf(),
        problem,
    })?;
    let mut walk = Walk {
        kit,
        verifier: &verifier,
        withheld: withheld.iter().map(String::as_str).collect(),
        entries: Vec::new(),
        problems: Vec::new(),
        seen_signatures: HashMap::new(),
    };
    walk.dir("")?;
    let found: BTreeSet<&str> = walk
        .entries
        .iter()
        .filter(|e| matches!(e, KitEntry::Withheld { .. }))
        .map(KitEntry::path)
        .collect();
    let mut problems = std::mem::take(&mut walk.problems);
    for path in &walk.withheld {
        let named = problems.iter().any(|p| p.path == *path);
        if !found.contains(path) && !named {
            problems.push(KitProblem {
                path: (*path).to_string(),
                what: "listed in workload.flare.withheld, but no signature.json of the kit has an entry for it; remove it from withheld or correct the path (relative to the kit, e.g. \"startup/client.key\")".to_string(),
            });
        }
    }
    let mut entries = walk.entries;
    if !problems.is_empty() {
        problems.sort_by(|a, b| a.path.cmp(&b.path));
        return Err(KitError::Tampered {
            kit: kit.to_path_buf(),
            root_ca: actual,
            problems,
        });
    }
    entries.sort_by(|a, b| a.path().cmp(b.path()));
    Ok(VerifiedKit {
        root_ca_sha256: actual,
        entries,
    })
}

struct Walk<'a> {
    kit: &'a Path,
    verifier: &'a Verifier,
    withheld: BTreeSet<&'a str>,
    entries: Vec<KitEntry>,
    problems: Vec<KitProblem>,
    /// Each signature seen, with the entry that carried it first.
    seen_signatures: HashMap<Vec<u8>, String>,
}

fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_string()
    } else {
        format!("{dir}/{name}")
    }
}

fn shown(dir: &str) -> &str {
    if dir.is_empty() {
        "."
    } else {
        dir
    }
}

impl Walk<'_> {
    fn problem(&mut self, path: String, what: impl Into<String>) {
        self.problems.push(KitProblem {
            path,
            what: what.into(),
        });
    }

    fn read_error(&self, rel: &str, source: io::Error) -> KitError {
        KitError::Read {
            kit: self.kit.to_path_buf(),
            rel: shown(rel).to_string(),
            source,
        }
    }

    /// Reads `dir/signature.json`: name → decoded signature. `None` after recording a problem.
    fn signatures(&mut self, dir: &str) -> Result<Option<BTreeMap<String, Vec<u8>>>, KitError> {
        let rel = join(dir, SIGNATURE_FILE);
        let path = self.kit.join(&rel);
        match fs::symlink_metadata(&path) {
            Ok(meta) if meta.file_type().is_file() => {}
            Ok(meta) => {
                self.problem(
                    rel,
                    format!(
                        "is {}, not FLARE's signature file; replace it with the kit's signature.json",
                        type_words(&meta)
                    ),
                );
                return Ok(None);
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                self.problem(
                    rel,
                    "missing; FLARE writes one into every directory of a signed kit, so this directory was added or its signatures removed",
                );
                return Ok(None);
            }
            Err(source) => return Err(self.read_error(&rel, source)),
        }
        let bytes = read_no_follow(&path).map_err(|source| self.read_error(&rel, source))?;
        let map: BTreeMap<String, serde_json::Value> = match serde_json::from_slice(&bytes) {
            Ok(map) => map,
            Err(e) => {
                self.problem(
                    rel,
                    format!("is not a JSON object of signatures ({e}); replace it with the kit's signature.json"),
                );
                return Ok(None);
            }
        };
        let mut out = BTreeMap::new();
        for (name, value) in map {
            let decoded = value.as_str().and_then(|s| {
                base64::engine::general_purpose::STANDARD
                    .decode(s.as_bytes())
                    .ok()
            });
            match decoded {
                Some(sig) if !sig.is_empty() => {
                    out.insert(name, sig);
                }
                _ => self.problem(
                    join(dir, &name),
                    format!("its entry in {rel} is not a base64 signature"),
                ),
            }
        }
        Ok(Some(out))
    }

    /// Records `signature` as used by `path`; a second use is a copied entry.
    fn once(&mut self, path: &str, signature: &[u8]) -> bool {
        if let Some(first) = self.seen_signatures.get(signature) {
            let first = first.clone();
            self.problem(
                path.to_string(),
                format!("its signature is the one of {first}: an entry was copied in signature.json (which is not itself signed) to move signed bytes to another name"),
            );
            return false;
        }
        self.seen_signatures
            .insert(signature.to_vec(), path.to_string());
        true
    }

    fn dir(&mut self, dir: &str) -> Result<(), KitError> {
        let abs = self.kit.join(dir);
        let mut names = Vec::new();
        for entry in fs::read_dir(&abs).map_err(|source| self.read_error(dir, source))? {
            let entry = entry.map_err(|source| self.read_error(dir, source))?;
            match entry.file_name().into_string() {
                Ok(name) if !name.chars().any(char::is_control) => names.push(name),
                Ok(name) => self.problem(
                    join(dir, &name.escape_debug().to_string()),
                    "its name holds control characters; FLARE kits have plain names, remove it",
                ),
                Err(raw) => self.problem(
                    join(dir, &raw.to_string_lossy()),
                    "its name is not UTF-8 (FLARE cannot verify it); remove it",
                ),
            }
        }
        names.sort();
        let signatures = self.signatures(dir)?;
        let mut subdirs = Vec::new();
        for name in &names {
            let rel = join(dir, name);
            let meta = fs::symlink_metadata(abs.join(name))
                .map_err(|source| self.read_error(&rel, source))?;
            let file_type = meta.file_type();
            if name == SIGNATURE_FILE {
                if file_type.is_file() {
                    let sha256 = hash_no_follow(&abs.join(name))
                        .map_err(|source| self.read_error(&rel, source))?;
                    self.entries.push(KitEntry::File {
                        path: rel,
                        sha256: Digest(sha256),
                    });
                }
                continue;
            }
            if file_type.is_symlink() {
                self.problem(
                    rel,
                    "a symbolic link; FLARE refuses links in signed folders: put the file itself there, as `nvflare provision` wrote it",
                );
                continue;
            }
            if !file_type.is_file() && !file_type.is_dir() {
                self.problem(
                    rel,
                    format!(
                        "{}; a kit holds only files and directories, remove it",
                        type_words(&meta)
                    ),
                );
                continue;
            }
            if self.withheld.contains(rel.as_str()) {
                self.problem(
                    rel,
                    "listed in workload.flare.withheld but present: remove it from the bundle (the key broker releases it as a [[secret]]) or from withheld",
                );
                continue;
            }
            let Some(sigs) = &signatures else {
                continue;
            };
            let Some(signature) = sigs.get(name).cloned() else {
                let what = if name == SUBMITTER_CERT_FILE {
                    format!("not signed in {}: FLARE's own check skips this name, but a CC kit never holds one; remove it", join(dir, SIGNATURE_FILE))
                } else if file_type.is_dir() {
                    format!("a directory not signed in {}: added after the kit was signed; remove it, or provision the kit again", join(dir, SIGNATURE_FILE))
                } else {
                    format!("not signed in {}: added after the kit was signed; remove it, or provision the kit again", join(dir, SIGNATURE_FILE))
                };
                self.problem(rel, what);
                continue;
            };
            if file_type.is_dir() {
                let hashed: [u8; 32] = Sha256::digest(name.as_bytes()).into();
                if !self.verifier.verify(&hashed, &signature) {
                    self.problem(
                        rel.clone(),
                        "the signature of this directory's name does not verify: renamed or added after the kit was signed",
                    );
                } else {
                    self.once(&rel, &signature);
                }
                self.entries.push(KitEntry::Dir { path: rel.clone() });
                subdirs.push(rel);
            } else {
                let hashed = hash_no_follow(&abs.join(name))
                    .map_err(|source| self.read_error(&rel, source))?;
                if !self.verifier.verify(&hashed, &signature) {
                    self.problem(
                        rel,
                        "its signature does not verify: the file was changed after the kit was signed",
                    );
                    continue;
                }
                if self.once(&rel, &signature) {
                    self.entries.push(KitEntry::File {
                        path: rel,
                        sha256: Digest(hashed),
                    });
                }
            }
        }
        if let Some(sigs) = &signatures {
            let present: BTreeSet<&str> = names.iter().map(String::as_str).collect();
            let missing: Vec<String> = sigs
                .keys()
                .filter(|name| !present.contains(name.as_str()))
                .cloned()
                .collect();
            for name in missing {
                let rel = join(dir, &name);
                if self.withheld.contains(rel.as_str()) {
                    self.entries.push(KitEntry::Withheld { path: rel });
                } else {
                    self.problem(
                        rel,
                        format!("signed in {} but missing: removed after the kit was signed (FLARE's own check misses this); restore it, or list it in workload.flare.withheld if the key broker releases it as a [[secret]]", join(dir, SIGNATURE_FILE)),
                    );
                }
            }
        }
        for sub in subdirs {
            self.dir(&sub)?;
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#[path = "flare_tests.rs"]
mod tests;
