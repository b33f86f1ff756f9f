//! `snp` evidence provider: an AMD SEV-SNP attestation report with its certificate chain.
//!
//! # Where the report comes from
//!
//! configfs-tsm (provider `sev_guest`, [`crate::tee::tsm`]) when its root exists, else
//! `/dev/sev-guest` through the `sev` crate (`Firmware::get_ext_report`, VMPL 0, falling
//! back to `get_report` when the host answers no extended request). Neither → the error
//! names `/dev/sev-guest` and the kernel module `sev-guest`. Both are behind [`SnpDevice`],
//! so [`SnpProvider`] is tested end to end with a fake device.
//!
//! REPORT_DATA is the 48-byte binding (KBS-PROTOCOL.md) followed by 16 zero bytes
//! ([`report_data`]); [`SnpProvider::checkpoint`] takes all 64 bytes from the caller.
//!
//! # Evidence shape
//!
//! `{"attestation_report": <report>, "cert_chain": [<entry>, …] | null}`, exactly what the
//! Trustee `snp` verifier deserializes (`deps/verifier/src/snp/mod.rs`:
//! `struct SnpEvidence { attestation_report: sev::firmware::guest::AttestationReport,
//! cert_chain: Option<Vec<sev::firmware::host::CertTableEntry>> }`, serde_json):
//!
//! - `attestation_report` is the `sev` crate's `AttestationReport` in its serde form: an
//!   object with the field names of the struct, integers as numbers, byte arrays as arrays
//!   of numbers, `policy`/`plat_info`/`key_info` as their raw integers, TCB versions as
//!   `{"fmc","bootloader","tee","snp","microcode"}` (`fmc` null before Turin), `cpuid_*` null
//!   in a version 2 report, `launch_mit_vector`/`current_mit_vector` null before version 5,
//!   `signature` as `{"r":[72],"s":[72]}`. This crate's `sev` dependency is built without its
//!   `serde` feature, so [`ReportJson`] writes the same form field by field; the tests pin it
//!   to the output of `sev` 8.0.0 with `serde` (SHA-256 of the canonical JSON for every
//!   vector) and prove the JSON converts back to the same 1184 bytes. The form of
//!   `trustee/e2e/evidence.json` (Trustee's own end-to-end evidence) is the same.
//! - each `cert_chain` entry is `{"cert_type": "VCEK"|"VLEK"|"ASK"|"ARK"|…, "data": [DER
//!   bytes as numbers]}` (`sev::firmware::host::CertTableEntry`; an unknown GUID is
//!   `{"OTHER": "<uuid>"}`). Trustee needs exactly one VCEK or VLEK; an ASK and ARK are
//!   optional (it checks a given ARK against its own and uses a given ASK).
//!
//! # Certificate chain
//!
//! 1. the host's certificate table (extended report / configfs `auxblob`, the GHCB
//!    GUID-keyed table, [`parse_cert_table`]) when it holds a VCEK or VLEK; only the ARK,
//!    ASK, VCEK and VLEK entries are sent;
//! 2. else the cache directory baked into the image ([`DEFAULT_CERT_CACHE`],
//!    [`load_cert_cache`]): `vcek.der` or `vlek.der` (the endorsement key, DER as the AMD KDS
//!    serves it; a one-certificate PEM is accepted too), and optionally the CA either as
//!    `cert_chain.pem` (the KDS `cert_chain` file: ASK or ASVK first, then ARK) or as
//!    `ask.pem` + `ark.pem`;
//! 3. else `null`: the broker then finds the VCEK itself.
//!
//! The guest never contacts AMD's key server.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::{json, Value};

use super::tsm::{RealTsmFs, Tsm, TsmFs, TsmRequest, DEFAULT_ROOT, PROVIDER_SEV};
use super::{Provider, TeeError};
use crate::eventlog::RuntimeRegister;

/// The SEV-SNP guest device the `sev` crate opens.
pub const SEV_GUEST_DEVICE: &str = "/dev/sev-guest";

/// The kernel module that provides `/dev/sev-guest` and the `sev_guest` tsm provider.
pub const MODULE: &str = "sev-guest";

/// The certificate cache baked into the image (file names in the module documentation).
pub const DEFAULT_CERT_CACHE: &str = "/etc/cvm-warden/snp-certs";

pub use cvm_warden_verify::evidence::snp_json::{
    encode_cert_table, evidence_json, parse_cert_table, report_from_evidence, CertTableEntry,
    CertType, ReportJson, SignatureJson, TcbJson, VersionJson, REPORT_LEN,
};

const TEE: &str = "snp";

/// REPORT_DATA for a binding: the 48 bytes followed by 16 zero bytes.
pub fn report_data(binding: &[u8; 48]) -> [u8; 64] {
    let mut data = [0u8; 64];
    data[..48].copy_from_slice(binding);
    data
}

fn malformed(what: &'static str, detail: impl Into<String>) -> TeeError {
    TeeError::Malformed {
        tee: TEE,
        what,
        detail: detail.into(),
    }
}

fn from_sev_entry(e: &sev::firmware::host::CertTableEntry) -> CertTableEntry {
    use sev::firmware::host::CertType as S;
    let cert_type = match &e.cert_type {
        S::Empty => CertType::Empty,
        S::ARK => CertType::Ark,
        S::ASK => CertType::Ask,
        S::VCEK => CertType::Vcek,
        S::VLEK => CertType::Vlek,
        S::CRL => CertType::Crl,
        S::OTHER(uuid) => CertType::Other(uuid.to_string()),
    };
    CertTableEntry {
        cert_type,
        data: e.data().to_vec(),
    }
}

// ---------------------------------------------------------------------------------------
// Certificate cache
// ---------------------------------------------------------------------------------------

/// The DER certificates of a PEM file, in order (the verifier's PEM reader, on
/// `rustls-pki-types`; sections other than certificates are skipped).
fn pem_certificates(path: &Path, pem: &[u8]) -> Result<Vec<Vec<u8>>, TeeError> {
    cvm_warden_verify::evidence::snp::pem_certificates(pem).map_err(|e| TeeError::Config {
        tee: TEE,
        detail: format!(
            "certificate cache file {} {e}; put the PEM files from the AMD KDS there",
            path.display()
        ),
    })
}

fn read_optional(path: &Path) -> Result<Option<Vec<u8>>, TeeError> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(TeeError::Device {
            tee: TEE,
            what: "cannot read the certificate cache file",
            device: path.to_path_buf(),
            source,
        }),
    }
}

/// One certificate from a file that holds DER or a single PEM certificate.
fn single_certificate(path: &Path, bytes: Vec<u8>) -> Result<Vec<u8>, TeeError> {
    if bytes.trim_ascii_start().starts_with(b"-----BEGIN") {
        let mut certs = pem_certificates(path, &bytes)?;
        if certs.len() != 1 {
            return Err(TeeError::Config {
                tee: TEE,
                detail: format!(
                    "certificate cache file {} holds {} certificates, expected exactly one",
                    path.display(),
                    certs.len()
                ),
            });
        }
        Ok(certs.remove(0))
    } else if bytes.first() == Some(&0x30) {
        Ok(bytes)
    } else {
        Err(TeeError::Config {
            tee: TEE,
            detail: format!(
                "certificate cache file {} is neither DER nor PEM; store the certificate the \
                 AMD KDS serves",
                path.display()
            ),
        })
    }
}

/// Loads the certificate cache in `dir` (file names in the module documentation).
/// `Ok(None)` when the directory or the endorsement key file is absent; an inconsistent
/// cache (both `vcek.der` and `vlek.der`, CA files without a key, `cert_chain.pem` together
/// with `ask.pem`/`ark.pem`, `ask.pem` without `ark.pem`) is an error.
pub fn load_cert_cache(dir: &Path) -> Result<Option<Vec<CertTableEntry>>, TeeError> {
    let config = |detail: String| TeeError::Config { tee: TEE, detail };
    let vcek = read_optional(&dir.join("vcek.der"))?;
    let vlek = read_optional(&dir.join("vlek.der"))?;
    let chain = read_optional(&dir.join("cert_chain.pem"))?;
    let ask = read_optional(&dir.join("ask.pem"))?;
    let ark = read_optional(&dir.join("ark.pem"))?;

    let key = match (vcek, vlek) {
        (Some(_), Some(_)) => {
            return Err(config(format!(
                "certificate cache {} holds both vcek.der and vlek.der; keep the one that \
                 signs this VM's reports",
                dir.display()
            )))
        }
        (Some(der), None) => Some((
            CertType::Vcek,
            single_certificate(&dir.join("vcek.der"), der)?,
        )),
        (None, Some(der)) => Some((
            CertType::Vlek,
            single_certificate(&dir.join("vlek.der"), der)?,
        )),
        (None, None) => None,
    };

    let ca = match (chain, ask, ark) {
        (Some(_), Some(_), _) | (Some(_), _, Some(_)) => {
            return Err(config(format!(
                "certificate cache {} holds cert_chain.pem and ask.pem/ark.pem; keep one form",
                dir.display()
            )))
        }
        (Some(pem), None, None) => {
            let path = dir.join("cert_chain.pem");
            let certs = pem_certificates(&path, &pem)?;
            let [ask, ark]: [Vec<u8>; 2] = certs.try_into().map_err(|certs: Vec<Vec<u8>>| {
                config(format!(
                    "certificate cache file {} holds {} certificates, expected 2 (ASK or \
                     ASVK, then ARK, as the AMD KDS cert_chain)",
                    path.display(),
                    certs.len()
                ))
            })?;
            Some((ask, ark))
        }
        (None, Some(ask), Some(ark)) => Some((
            single_certificate(&dir.join("ask.pem"), ask)?,
            single_certificate(&dir.join("ark.pem"), ark)?,
        )),
        (None, Some(_), None) | (None, None, Some(_)) => {
            return Err(config(format!(
                "certificate cache {} holds only one of ask.pem and ark.pem; add the other or \
                 remove both",
                dir.display()
            )))
        }
        (None, None, None) => None,
    };

    let Some((kind, key)) = key else {
        if ca.is_some() {
            return Err(config(format!(
                "certificate cache {} holds CA certificates but no vcek.der or vlek.der",
                dir.display()
            )));
        }
        return Ok(None);
    };
    let mut entries = vec![CertTableEntry {
        cert_type: kind,
        data: key,
    }];
    if let Some((ask, ark)) = ca {
        entries.push(CertTableEntry {
            cert_type: CertType::Ask,
            data: ask,
        });
        entries.push(CertTableEntry {
            cert_type: CertType::Ark,
            data: ark,
        });
    }
    Ok(Some(entries))
}

// ---------------------------------------------------------------------------------------
// Devices
// ---------------------------------------------------------------------------------------

/// A report and the host's certificate table, as a device returns them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceReport {
    /// The raw report.
    pub report: Vec<u8>,
    /// The certificates the host supplied, if any.
    pub cert_table: Option<Vec<CertTableEntry>>,
}

/// Where SEV-SNP reports come from.
pub trait SnpDevice: fmt::Debug {
    /// The device, for errors and `describe` (e.g. `configfs-tsm /sys/kernel/config/…`).
    fn name(&self) -> String;
    /// A report at VMPL 0 with `report_data` as REPORT_DATA, and the host certificates.
    fn get_report(&mut self, report_data: &[u8; 64]) -> Result<DeviceReport, TeeError>;
}

/// Reports through configfs-tsm (provider `sev_guest`, privlevel 0, `auxblob` parsed as the
/// certificate table).
#[derive(Debug)]
pub struct TsmSnpDevice<F: TsmFs> {
    tsm: Tsm<F>,
}

impl<F: TsmFs> TsmSnpDevice<F> {
    /// The device on `tsm`.
    pub fn new(tsm: Tsm<F>) -> Self {
        Self { tsm }
    }

    /// The configfs-tsm root (tests inspect its fake through this).
    pub fn tsm(&self) -> &Tsm<F> {
        &self.tsm
    }
}

impl<F: TsmFs> SnpDevice for TsmSnpDevice<F> {
    fn name(&self) -> String {
        format!("configfs-tsm {}", self.tsm.root().display())
    }

    fn get_report(&mut self, report_data: &[u8; 64]) -> Result<DeviceReport, TeeError> {
        let answer = self.tsm.generate(
            PROVIDER_SEV,
            &TsmRequest {
                inblob: *report_data,
                privlevel: Some(0),
                read_auxblob: true,
            },
        )?;
        let cert_table = answer
            .auxblob
            .as_deref()
            .map(parse_cert_table)
            .transpose()?;
        Ok(DeviceReport {
            report: answer.outblob,
            cert_table,
        })
    }
}

/// Reports through `/dev/sev-guest` (the `sev` crate's ioctls).
#[derive(Debug)]
pub struct SevGuestDevice {
    firmware: sev::firmware::guest::Firmware,
}

impl SevGuestDevice {
    /// Opens `/dev/sev-guest` (the `sev` crate always opens that path).
    pub fn open() -> Result<Self, TeeError> {
        let firmware =
            sev::firmware::guest::Firmware::open().map_err(|source| TeeError::Device {
                tee: TEE,
                what: "cannot open (run as root, with the sev-guest module loaded)",
                device: PathBuf::from(SEV_GUEST_DEVICE),
                source,
            })?;
        Ok(Self { firmware })
    }
}

impl SnpDevice for SevGuestDevice {
    fn name(&self) -> String {
        SEV_GUEST_DEVICE.to_string()
    }

    fn get_report(&mut self, report_data: &[u8; 64]) -> Result<DeviceReport, TeeError> {
        match self
            .firmware
            .get_ext_report(None, Some(*report_data), Some(0))
        {
            Ok((report, certs)) => Ok(DeviceReport {
                report,
                cert_table: certs.map(|c| c.iter().map(from_sev_entry).collect()),
            }),
            Err(ext) => {
                log::warn!(
                    "snp: the extended report request failed ({ext}); asking for a plain report \
                     (certificates then come from the cache)"
                );
                let report = self
                    .firmware
                    .get_report(None, Some(*report_data), Some(0))
                    .map_err(|e| TeeError::Device {
                        tee: TEE,
                        what: "the SNP_GET_REPORT request failed (see the kernel log) on",
                        device: PathBuf::from(SEV_GUEST_DEVICE),
                        source: io::Error::other(format!(
                            "{e}; the extended request failed before with: {ext}"
                        )),
                    })?;
                Ok(DeviceReport {
                    report,
                    cert_table: None,
                })
            }
        }
    }
}

/// Picks the device: configfs-tsm when `tsm`'s root exists, else `/dev/sev-guest` when
/// `sev_guest` exists (the `sev` crate then opens `/dev/sev-guest` itself), else
/// [`TeeError::DeviceMissing`] naming `sev_guest` and the module `sev-guest`.
pub fn open_device<F: TsmFs + 'static>(
    tsm: Tsm<F>,
    sev_guest: &Path,
) -> Result<Box<dyn SnpDevice>, TeeError> {
    if tsm.available() {
        return Ok(Box::new(TsmSnpDevice::new(tsm)));
    }
    if sev_guest.exists() {
        return Ok(Box::new(SevGuestDevice::open()?));
    }
    Err(TeeError::DeviceMissing {
        tee: TEE,
        device: sev_guest.to_path_buf(),
        module: MODULE,
    })
}

// ---------------------------------------------------------------------------------------
// Provider
// ---------------------------------------------------------------------------------------

/// Where the last evidence's certificate chain came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ChainOrigin {
    /// The host's certificate table.
    Host,
    /// The image's certificate cache.
    Cache,
    /// None was available: `cert_chain` is null.
    None,
}

/// Evidence for the Trustee `snp` verifier.
#[derive(Debug)]
pub struct SnpProvider {
    device: Box<dyn SnpDevice>,
    cert_cache: PathBuf,
    last_chain: Option<ChainOrigin>,
}

impl SnpProvider {
    /// The provider on `device`, with the certificate cache at `cert_cache`.
    pub fn new(device: Box<dyn SnpDevice>, cert_cache: impl Into<PathBuf>) -> Self {
        Self {
            device,
            cert_cache: cert_cache.into(),
            last_chain: None,
        }
    }

    /// The provider on the real devices ([`open_device`] with the default paths) and the
    /// default certificate cache.
    pub fn open_default() -> Result<Self, TeeError> {
        let device = open_device(
            Tsm::new(TEE, DEFAULT_ROOT, RealTsmFs),
            Path::new(SEV_GUEST_DEVICE),
        )?;
        Ok(Self::new(device, DEFAULT_CERT_CACHE))
    }

    /// A fresh report with REPORT_DATA = `data` (all 64 bytes, e.g. SHA-512 of a label and
    /// an event-log head), in the same evidence shape as [`Provider::evidence`].
    pub fn checkpoint(&mut self, data: &[u8; 64]) -> Result<Value, TeeError> {
        self.report(data)
    }

    /// Where the last evidence's certificate chain came from (`None` before the first).
    pub fn last_chain(&self) -> Option<ChainOrigin> {
        self.last_chain
    }

    fn report(&mut self, data: &[u8; 64]) -> Result<Value, TeeError> {
        let answer = self.device.get_report(data)?;
        let parsed = ReportJson::from_report(&answer.report)?;
        if parsed.report_data.as_slice() != data.as_slice() {
            return Err(malformed(
                "attestation report",
                format!(
                    "{} returned a report with REPORT_DATA {}, expected {}",
                    self.device.name(),
                    hex::encode(&parsed.report_data),
                    hex::encode(data)
                ),
            ));
        }
        if parsed.vmpl != 0 {
            return Err(malformed(
                "attestation report",
                format!(
                    "{} returned a report for VMPL {}; the broker accepts only VMPL 0",
                    self.device.name(),
                    parsed.vmpl
                ),
            ));
        }
        let (origin, chain) = self.select_chain(answer.cert_table)?;
        self.last_chain = Some(origin);
        Ok(json!({
            "attestation_report": parsed,
            "cert_chain": chain,
        }))
    }

    fn select_chain(
        &self,
        host: Option<Vec<CertTableEntry>>,
    ) -> Result<(ChainOrigin, Option<Vec<CertTableEntry>>), TeeError> {
        if let Some(table) = host {
            let kept: Vec<_> = table
                .into_iter()
                .filter(|e| {
                    matches!(
                        e.cert_type,
                        CertType::Ark | CertType::Ask | CertType::Vcek | CertType::Vlek
                    )
                })
                .collect();
            let keys = kept
                .iter()
                .filter(|e| e.cert_type.is_endorsement_key())
                .count();
            match keys {
                0 => log::info!(
                    "snp: the host certificate table has no VCEK or VLEK; using the cache {}",
                    self.cert_cache.display()
                ),
                1 => return Ok((ChainOrigin::Host, Some(kept))),
                n => {
                    return Err(malformed(
                        "certificate table",
                        format!(
                            "the host supplied {n} endorsement keys (VCEK/VLEK), expected one; \
                             fix the host's SNP certificate configuration"
                        ),
                    ))
                }
            }
        }
        match load_cert_cache(&self.cert_cache)? {
            Some(entries) => Ok((ChainOrigin::Cache, Some(entries))),
            None => {
                log::warn!(
                    "snp: no certificate chain from the host and none in {}; sending \
                     cert_chain null (the broker must find the VCEK itself)",
                    self.cert_cache.display()
                );
                Ok((ChainOrigin::None, None))
            }
        }
    }
}

impl Provider for SnpProvider {
    fn tee(&self) -> &'static str {
        TEE
    }

    fn checkpoint(&mut self, binding: &[u8; 64]) -> Result<Value, TeeError> {
        self.report(binding)
    }

    fn evidence(&mut self, binding: &[u8; 48]) -> Result<Value, TeeError> {
        self.report(&report_data(binding))
    }

    fn runtime_register(&mut self) -> Result<Option<Box<dyn RuntimeRegister>>, TeeError> {
        Ok(None)
    }

    fn describe(&self) -> Value {
        json!({
            "tee": TEE,
            "device": self.device.name(),
            "vmpl": 0,
            "report_data": "48-byte binding followed by 16 zero bytes",
            "cert_cache": self.cert_cache.display().to_string(),
            "last_cert_chain": self.last_chain,
            "runtime_register": null,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::tee::tsm::{FakeTsmFs, PROVIDER_TDX};
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine;
    use std::sync::{Arc, Mutex};

    /// Offset of REPORT_DATA in the report.
    const REPORT_DATA_OFFSET: usize = 0x50;

    fn vector(path: &str) -> Vec<u8> {
        let full = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("verify/tests/vectors")
            .join(path);
        std::fs::read(&full).unwrap_or_else(|e| panic!("{}: {e}", full.display()))
    }

    /// A Milan v2 report at VMPL 0 (trustee test vector).
    fn base_report() -> Vec<u8> {
        vector("trustee/snp/test-report.bin")
    }

    /// What the firmware does: the requested REPORT_DATA lands at 0x50.
    fn with_report_data(mut report: Vec<u8>, data: &[u8]) -> Vec<u8> {
        report[REPORT_DATA_OFFSET..REPORT_DATA_OFFSET + 64].copy_from_slice(data);
        report
    }

    fn binding() -> [u8; 48] {
        let mut b = [0u8; 48];
        for (i, x) in b.iter_mut().enumerate() {
            *x = 0x80 | i as u8;
        }
        b
    }

    fn entry(cert_type: CertType, data: &[u8]) -> CertTableEntry {
        CertTableEntry {
            cert_type,
            data: data.to_vec(),
        }
    }

    /// A fake device: answers `report` with the requested REPORT_DATA and `table`.
    #[derive(Debug, Clone)]
    struct FakeDevice {
        report: Vec<u8>,
        table: Option<Vec<CertTableEntry>>,
        patch_report_data: bool,
        requests: Arc<Mutex<Vec<[u8; 64]>>>,
    }

    impl FakeDevice {
        fn new(report: Vec<u8>, table: Option<Vec<CertTableEntry>>) -> Self {
            Self {
                report,
                table,
                patch_report_data: true,
                requests: Arc::default(),
            }
        }
    }

    impl SnpDevice for FakeDevice {
        fn name(&self) -> String {
            "fake-snp".to_string()
        }

        fn get_report(&mut self, report_data: &[u8; 64]) -> Result<DeviceReport, TeeError> {
            self.requests.lock().unwrap().push(*report_data);
            let report = if self.patch_report_data {
                with_report_data(self.report.clone(), report_data)
            } else {
                self.report.clone()
            };
            Ok(DeviceReport {
                report,
                cert_table: self.table.clone(),
            })
        }
    }

    fn provider(device: FakeDevice, cache: &Path) -> SnpProvider {
        SnpProvider::new(Box::new(device), cache)
    }

    // --- report data -----------------------------------------------------------------

    #[test]
    fn report_data_is_binding_then_sixteen_zeros() {
        let d = report_data(&binding());
        assert_eq!(&d[..48], &binding());
        assert_eq!(&d[48..], &[0u8; 16]);
    }

    #[test]
    fn evidence_places_the_binding_in_report_data() {
        let cache = tempfile::tempdir().unwrap();
        let device = FakeDevice::new(base_report(), None);
        let requests = device.requests.clone();
        let mut p = provider(device, cache.path());
        let evidence = p.evidence(&binding()).unwrap();
        assert_eq!(
            requests.lock().unwrap().as_slice(),
            &[report_data(&binding())]
        );
        let rd: Vec<u8> =
            serde_json::from_value(evidence["attestation_report"]["report_data"].clone()).unwrap();
        assert_eq!(&rd[..48], &binding());
        assert_eq!(&rd[48..], &[0u8; 16]);
        let raw = report_from_evidence(&evidence).unwrap();
        assert_eq!(
            raw,
            with_report_data(base_report(), &report_data(&binding()))
        );
        assert_eq!(evidence.as_object().unwrap().len(), 2);
    }

    #[test]
    fn checkpoint_uses_all_64_bytes() {
        let cache = tempfile::tempdir().unwrap();
        let mut p = provider(FakeDevice::new(base_report(), None), cache.path());
        let data = [0x5a; 64];
        let evidence = p.checkpoint(&data).unwrap();
        let raw = report_from_evidence(&evidence).unwrap();
        assert_eq!(&raw[REPORT_DATA_OFFSET..REPORT_DATA_OFFSET + 64], &data);
        assert!(evidence.get("cert_chain").is_some());
    }

    #[test]
    fn report_for_other_data_is_refused() {
        let cache = tempfile::tempdir().unwrap();
        let mut device = FakeDevice::new(base_report(), None);
        device.patch_report_data = false;
        let err = provider(device, cache.path())
            .evidence(&binding())
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("returned a report with REPORT_DATA"),
            "{err}"
        );
    }

    #[test]
    fn report_above_vmpl0_is_refused() {
        let cache = tempfile::tempdir().unwrap();
        // The AWS VLEK vector was taken at VMPL 1.
        let device = FakeDevice::new(vector("trustee/snp/test-vlek-report.bin"), None);
        let err = provider(device, cache.path())
            .evidence(&binding())
            .unwrap_err();
        assert!(err.to_string().contains("VMPL 1"), "{err}");
    }

    #[test]
    fn truncated_report_is_malformed() {
        let cache = tempfile::tempdir().unwrap();
        let mut device = FakeDevice::new(base_report()[..1000].to_vec(), None);
        device.patch_report_data = false;
        let err = provider(device, cache.path())
            .evidence(&binding())
            .unwrap_err();
        assert!(
            err.to_string().contains("1000 bytes, expected 1184"),
            "{err}"
        );
    }

    // --- chain selection -------------------------------------------------------------

    #[test]
    fn host_table_with_a_vcek_is_used_and_filtered() {
        let cache = tempfile::tempdir().unwrap();
        let table = vec![
            entry(CertType::Vcek, b"\x30vcek"),
            entry(CertType::Crl, b"crl"),
            entry(CertType::Ask, b"\x30ask"),
            entry(CertType::Ark, b"\x30ark"),
            entry(
                CertType::Other("01234567-89ab-cdef-0123-456789abcdef".into()),
                b"x",
            ),
        ];
        let mut p = provider(FakeDevice::new(base_report(), Some(table)), cache.path());
        let evidence = p.evidence(&binding()).unwrap();
        assert_eq!(p.last_chain(), Some(ChainOrigin::Host));
        assert_eq!(
            evidence["cert_chain"],
            json!([
                {"cert_type": "VCEK", "data": [0x30, b'v', b'c', b'e', b'k']},
                {"cert_type": "ASK", "data": [0x30, b'a', b's', b'k']},
                {"cert_type": "ARK", "data": [0x30, b'a', b'r', b'k']},
            ])
        );
    }

    #[test]
    fn host_table_without_a_key_falls_back_to_the_cache() {
        let cache = tempfile::tempdir().unwrap();
        std::fs::write(
            cache.path().join("vcek.der"),
            vector("trustee/snp/test-vcek.der"),
        )
        .unwrap();
        let table = vec![entry(CertType::Ark, b"\x30ark")];
        let mut p = provider(FakeDevice::new(base_report(), Some(table)), cache.path());
        let evidence = p.evidence(&binding()).unwrap();
        assert_eq!(p.last_chain(), Some(ChainOrigin::Cache));
        let chain: Vec<CertTableEntry> =
            serde_json::from_value(evidence["cert_chain"].clone()).unwrap();
        assert_eq!(
            chain,
            vec![entry(CertType::Vcek, &vector("trustee/snp/test-vcek.der"))]
        );
    }

    #[test]
    fn no_chain_anywhere_is_null() {
        let cache = tempfile::tempdir().unwrap();
        let mut p = provider(
            FakeDevice::new(base_report(), None),
            &cache.path().join("absent"),
        );
        let evidence = p.evidence(&binding()).unwrap();
        assert!(evidence["cert_chain"].is_null());
        assert_eq!(p.last_chain(), Some(ChainOrigin::None));
        assert_eq!(p.describe()["last_cert_chain"], "none");
    }

    #[test]
    fn two_endorsement_keys_from_the_host_fail_closed() {
        let cache = tempfile::tempdir().unwrap();
        let table = vec![
            entry(CertType::Vcek, b"\x30a"),
            entry(CertType::Vlek, b"\x30b"),
        ];
        let err = provider(FakeDevice::new(base_report(), Some(table)), cache.path())
            .evidence(&binding())
            .unwrap_err();
        assert!(err.to_string().contains("2 endorsement keys"), "{err}");
    }

    #[test]
    fn cert_chain_serializes_like_the_sev_crate() {
        // The form `sev` 8.0.0 (feature serde) gives `CertTableEntry`.
        let chain = vec![
            entry(CertType::Vcek, &[1, 2]),
            entry(
                CertType::Other("c0b406a4-a803-4952-9743-3fb6014cd0ae".into()),
                &[3],
            ),
        ];
        assert_eq!(
            serde_json::to_string(&chain).unwrap(),
            r#"[{"cert_type":"VCEK","data":[1,2]},{"cert_type":{"OTHER":"c0b406a4-a803-4952-9743-3fb6014cd0ae"},"data":[3]}]"#
        );
        let back: Vec<CertTableEntry> = serde_json::from_str(r#"[{"cert_type":"VLEK","data":[9]},{"cert_type":"ASK","data":[]},{"cert_type":"ARK","data":[]},{"cert_type":"CRL","data":[]},{"cert_type":"Empty","data":[]}]"#).unwrap();
        let kinds: Vec<_> = back.into_iter().map(|e| e.cert_type).collect();
        assert_eq!(
            kinds,
            [
                CertType::Vlek,
                CertType::Ask,
                CertType::Ark,
                CertType::Crl,
                CertType::Empty
            ]
        );
    }

    // --- certificate table -----------------------------------------------------------

    #[test]
    fn cert_table_round_trips() {
        let entries = vec![
            entry(CertType::Vcek, &[0x30, 1, 2, 3]),
            entry(CertType::Ask, &[0x30, 4]),
            entry(CertType::Ark, &[0x30, 5, 6]),
            entry(CertType::Vlek, &[0x30, 7]),
            entry(CertType::Crl, &[8]),
            entry(
                CertType::Other("01234567-89ab-cdef-0123-456789abcdef".into()),
                &[9],
            ),
        ];
        let table = encode_cert_table(&entries);
        assert_eq!(table.len(), 7 * 24 + 4 + 2 + 3 + 2 + 1 + 1);
        assert_eq!(parse_cert_table(&table).unwrap(), entries);
    }

    #[test]
    fn cert_table_guids_are_in_rfc4122_byte_order() {
        // One ARK entry by hand: GUID c0b406a4-a803-4952-9743-3fb6014cd0ae, offset 48, len 2.
        let mut table = hex::decode("c0b406a4a80349529743 3fb6014cd0ae".replace(' ', "")).unwrap();
        table.extend_from_slice(&48u32.to_le_bytes());
        table.extend_from_slice(&2u32.to_le_bytes());
        table.extend_from_slice(&[0u8; 24]);
        table.extend_from_slice(&[0xab, 0xcd]);
        assert_eq!(
            parse_cert_table(&table).unwrap(),
            vec![entry(CertType::Ark, &[0xab, 0xcd])]
        );
        assert_eq!(
            CertType::Vcek
                .guid()
                .map(|g| cvm_warden_verify::evidence::snp_json::guid_string(&g))
                .unwrap(),
            "63da758d-e664-4564-adc5-f4b93be8accd"
        );
        assert_eq!(
            CertType::Vlek
                .guid()
                .map(|g| cvm_warden_verify::evidence::snp_json::guid_string(&g))
                .unwrap(),
            "a8074bc2-a25a-483e-aae6-39c045a0b8a1"
        );
        assert_eq!(
            CertType::Ask
                .guid()
                .map(|g| cvm_warden_verify::evidence::snp_json::guid_string(&g))
                .unwrap(),
            "4ab7b379-bbac-4fe4-a02f-05aef327c782"
        );
    }

    #[test]
    fn bad_cert_tables_are_refused() {
        let good = encode_cert_table(&[entry(CertType::Vcek, &[0x30, 1, 2, 3])]);
        // No terminator.
        assert!(parse_cert_table(&good[..24])
            .unwrap_err()
            .to_string()
            .contains("no terminating"));
        // Length past the end.
        let mut long = good.clone();
        long[20..24].copy_from_slice(&100u32.to_le_bytes());
        assert!(parse_cert_table(&long)
            .unwrap_err()
            .to_string()
            .contains("does not lie"));
        // Offset inside the entry array.
        let mut overlap = good.clone();
        overlap[16..20].copy_from_slice(&8u32.to_le_bytes());
        assert!(parse_cert_table(&overlap).is_err());
        // Zero length.
        let mut empty = good.clone();
        empty[20..24].copy_from_slice(&0u32.to_le_bytes());
        assert!(parse_cert_table(&empty).is_err());
        // Offset + length overflow.
        let mut wrap = good;
        wrap[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
        wrap[20..24].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(parse_cert_table(&wrap).is_err());
        // Only a terminator: an empty table.
        assert_eq!(parse_cert_table(&[0u8; 24]).unwrap(), vec![]);
    }

    // --- certificate cache -----------------------------------------------------------

    #[test]
    fn cache_with_vcek_and_kds_cert_chain() {
        let dir = tempfile::tempdir().unwrap();
        let vcek = vector("go-sev-guest/vcek.testcer");
        std::fs::write(dir.path().join("vcek.der"), &vcek).unwrap();
        std::fs::write(
            dir.path().join("cert_chain.pem"),
            vector("go-sev-guest/milan.testcer"),
        )
        .unwrap();
        let entries = load_cert_cache(dir.path()).unwrap().unwrap();
        let kinds: Vec<_> = entries.iter().map(|e| e.cert_type.clone()).collect();
        assert_eq!(kinds, [CertType::Vcek, CertType::Ask, CertType::Ark]);
        assert_eq!(entries[0].data, vcek);
        // ASK and ARK were turned into DER (a SEQUENCE), and they differ.
        assert_eq!(entries[1].data[0], 0x30);
        assert_eq!(entries[2].data[0], 0x30);
        assert_ne!(entries[1].data, entries[2].data);
    }

    #[test]
    fn cache_with_separate_ask_and_ark_and_a_pem_vlek() {
        let dir = tempfile::tempdir().unwrap();
        let pem = String::from_utf8(vector("go-sev-guest/trust/ask_ark_milan_vlek.pem")).unwrap();
        let end = "-----END CERTIFICATE-----";
        let first_end = pem.find(end).unwrap() + end.len();
        let (asvk, ark) = pem.split_at(first_end);
        std::fs::write(dir.path().join("ask.pem"), asvk).unwrap();
        std::fs::write(dir.path().join("ark.pem"), ark).unwrap();
        let vlek = vector("trustee/snp/test-vlek.der");
        let vlek_pem = format!(
            "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
            STANDARD.encode(&vlek)
        );
        std::fs::write(dir.path().join("vlek.der"), vlek_pem).unwrap();
        let entries = load_cert_cache(dir.path()).unwrap().unwrap();
        assert_eq!(entries[0], entry(CertType::Vlek, &vlek));
        assert_eq!(entries[1].cert_type, CertType::Ask);
        assert_eq!(entries[2].cert_type, CertType::Ark);
        let whole = pem_certificates(Path::new("x"), pem.as_bytes()).unwrap();
        assert_eq!(
            (entries[1].data.clone(), entries[2].data.clone()),
            (whole[0].clone(), whole[1].clone())
        );
    }

    #[test]
    fn empty_or_missing_cache_is_none() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load_cert_cache(dir.path()).unwrap(), None);
        assert_eq!(load_cert_cache(&dir.path().join("absent")).unwrap(), None);
    }

    /// `cert_chain.pem` read by the PEM reader: another section among the certificates is
    /// skipped (as the hand-written parser did), broken base64 in a certificate and a file
    /// without a certificate are refused with the file's name.
    #[test]
    fn cert_chain_pem_sections_base64_and_emptiness() {
        let vcek = vector("trustee/snp/test-vcek.der");
        let chain = String::from_utf8(vector("go-sev-guest/milan.testcer")).unwrap();
        let end = "-----END CERTIFICATE-----\n";
        let split = chain.find(end).unwrap() + end.len();
        let (ask, ark) = chain.split_at(split);
        let load = |text: &str| {
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join("vcek.der"), &vcek).unwrap();
            let path = dir.path().join("cert_chain.pem");
            std::fs::write(&path, text).unwrap();
            (load_cert_cache(dir.path()), path)
        };

        let key =
            "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIA==\n-----END PRIVATE KEY-----\n";
        let (plain, _) = load(&chain);
        let (mixed, _) = load(&format!("{ask}{key}{ark}"));
        let mixed = mixed.unwrap().unwrap();
        assert_eq!(mixed.len(), 3);
        assert_eq!(mixed, plain.unwrap().unwrap());

        let body_line = chain.lines().nth(1).unwrap();
        let bad = chain.replacen(body_line, &body_line.replace('A', "!"), 1);
        assert_ne!(bad, chain);
        let (result, path) = load(&bad);
        let err = result.unwrap_err().to_string();
        assert!(err.contains(&path.display().to_string()), "{err}");
        assert!(err.contains("not base64"), "{err}");
        assert!(err.contains("AMD KDS"), "{err}");

        for empty in [key, "no pem here\n"] {
            let (result, path) = load(empty);
            let err = result.unwrap_err().to_string();
            assert!(err.contains(&path.display().to_string()), "{err}");
            assert!(err.contains("holds no PEM certificate"), "{err}");
        }
    }

    #[test]
    fn inconsistent_caches_are_refused() {
        let vcek = vector("trustee/snp/test-vcek.der");
        let chain = vector("go-sev-guest/milan.testcer");
        type Files = Vec<(&'static str, Vec<u8>)>;
        let cases: Vec<(Files, &str)> = vec![
            (
                vec![("vcek.der", vcek.clone()), ("vlek.der", vcek.clone())],
                "both vcek.der and vlek.der",
            ),
            (
                vec![
                    ("vcek.der", vcek.clone()),
                    ("cert_chain.pem", chain.clone()),
                    ("ask.pem", chain.clone()),
                ],
                "keep one form",
            ),
            (
                vec![("vcek.der", vcek.clone()), ("ask.pem", chain.clone())],
                "only one of ask.pem and ark.pem",
            ),
            (
                vec![("cert_chain.pem", chain.clone())],
                "no vcek.der or vlek.der",
            ),
            (
                vec![("vcek.der", b"not a certificate".to_vec())],
                "neither DER nor PEM",
            ),
            (vec![("vcek.der", chain.clone())], "expected exactly one"),
            (
                vec![
                    ("vcek.der", vcek.clone()),
                    (
                        "cert_chain.pem",
                        vector("virtee-sev/certs_data/vcek_milan.der"),
                    ),
                ],
                "not PEM text",
            ),
        ];
        for (files, want) in cases {
            let dir = tempfile::tempdir().unwrap();
            for (name, data) in &files {
                std::fs::write(dir.path().join(name), data).unwrap();
            }
            let err = load_cert_cache(dir.path()).unwrap_err().to_string();
            assert!(err.contains(want), "{want}: {err}");
        }
        // A KDS chain must hold exactly ASK + ARK.
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("vcek.der"), &vcek).unwrap();
        std::fs::write(
            dir.path().join("cert_chain.pem"),
            vector("trustee/az-snp-vtpm/vcek.pem"),
        )
        .unwrap();
        let err = load_cert_cache(dir.path()).unwrap_err().to_string();
        assert!(err.contains("holds 3 certificates, expected 2"), "{err}");
    }

    // --- configfs-tsm device -----------------------------------------------------------

    const ROOT: &str = "/fake/tsm/report";

    #[test]
    fn tsm_device_end_to_end_with_auxblob_chain() {
        let base = base_report();
        let vcek = vector("trustee/snp/test-vcek.der");
        let table =
            encode_cert_table(&[entry(CertType::Vcek, &vcek), entry(CertType::Crl, b"crl")]);
        let fs = FakeTsmFs::new(
            ROOT,
            PROVIDER_SEV,
            Box::new(move |inblob| Ok(with_report_data(base.clone(), inblob))),
        )
        .with_auxblob(table);
        let cache = tempfile::tempdir().unwrap();
        let device = open_device(
            Tsm::new("snp", ROOT, fs),
            Path::new("/nonexistent/sev-guest"),
        )
        .unwrap();
        assert_eq!(device.name(), format!("configfs-tsm {ROOT}"));
        let mut p = SnpProvider::new(device, cache.path());
        let evidence = p.evidence(&binding()).unwrap();
        assert_eq!(
            evidence["cert_chain"],
            json!([{"cert_type": "VCEK", "data": vcek}])
        );
        let raw = report_from_evidence(&evidence).unwrap();
        assert_eq!(
            &raw[REPORT_DATA_OFFSET..REPORT_DATA_OFFSET + 48],
            &binding()
        );
        assert_eq!(p.describe()["device"], format!("configfs-tsm {ROOT}"));
    }

    #[test]
    fn tsm_device_writes_privlevel_zero_and_cleans_up() {
        let base = base_report();
        let fs = FakeTsmFs::new(
            ROOT,
            PROVIDER_SEV,
            Box::new(move |inblob| Ok(with_report_data(base.clone(), inblob))),
        );
        let mut device = TsmSnpDevice::new(Tsm::new("snp", ROOT, fs));
        let answer = device.get_report(&[7; 64]).unwrap();
        assert_eq!(answer.cert_table, None);
        assert_eq!(device.tsm().fs().last_privlevel().as_deref(), Some("0"));
        assert_eq!(device.tsm().fs().live_entries(), 0);
    }

    #[test]
    fn tsm_provider_mismatch_is_reported() {
        let fs = FakeTsmFs::new(ROOT, PROVIDER_TDX, Box::new(|_| Ok(vec![0; 100])));
        let cache = tempfile::tempdir().unwrap();
        let mut p = SnpProvider::new(
            Box::new(TsmSnpDevice::new(Tsm::new("snp", ROOT, fs))),
            cache.path(),
        );
        let err = p.evidence(&binding()).unwrap_err();
        assert!(
            err.to_string()
                .contains("configfs-tsm provider is tdx_guest but attestation.tee = snp"),
            "{err}"
        );
    }

    #[test]
    fn malformed_auxblob_fails_closed() {
        let base = base_report();
        let fs = FakeTsmFs::new(
            ROOT,
            PROVIDER_SEV,
            Box::new(move |inblob| Ok(with_report_data(base.clone(), inblob))),
        )
        .with_auxblob(vec![1; 30]);
        let cache = tempfile::tempdir().unwrap();
        let mut p = SnpProvider::new(
            Box::new(TsmSnpDevice::new(Tsm::new("snp", ROOT, fs))),
            cache.path(),
        );
        assert!(matches!(
            p.evidence(&binding()),
            Err(TeeError::Malformed {
                what: "certificate table",
                ..
            })
        ));
    }

    #[test]
    fn no_device_names_sev_guest_and_its_module() {
        let missing = Path::new("/nonexistent/dev/sev-guest");
        let err = open_device(Tsm::new("snp", ROOT, FakeTsmFs::absent(ROOT)), missing).unwrap_err();
        match &err {
            TeeError::DeviceMissing {
                tee,
                device,
                module,
            } => {
                assert_eq!((*tee, *module), ("snp", "sev-guest"));
                assert_eq!(device, missing);
            }
            other => panic!("{other:?}"),
        }
        assert!(
            err.to_string().contains("load the kernel module sev-guest"),
            "{err}"
        );
    }

    #[test]
    fn snp_has_no_runtime_register() {
        let cache = tempfile::tempdir().unwrap();
        let mut p = provider(FakeDevice::new(base_report(), None), cache.path());
        assert!(p.runtime_register().unwrap().is_none());
        assert_eq!(p.tee(), "snp");
        assert!(!p.insecure());
    }

    // --- report JSON -------------------------------------------------------------------

    #[test]
    fn report_json_pins_the_sev_serde_form() {
        let v2 = evidence_json(&base_report(), None).unwrap();
        let r = &v2["attestation_report"];
        assert_eq!(r["version"], 2);
        assert!(r["policy"].is_u64());
        assert!(r["plat_info"].is_u64());
        assert!(r["key_info"].is_u64());
        assert!(
            r["cpuid_fam_id"].is_null(),
            "no CPUID fields in a version 2 report"
        );
        assert!(r["launch_mit_vector"].is_null());
        assert!(r["current_tcb"]["fmc"].is_null());
        assert_eq!(r["report_data"].as_array().unwrap().len(), 64);
        assert_eq!(r["chip_id"].as_array().unwrap().len(), 64);
        assert_eq!(r["signature"]["r"].as_array().unwrap().len(), 72);
        assert_eq!(r.as_object().unwrap().len(), 29);
        assert!(v2["cert_chain"].is_null());
        let v3 = evidence_json(
            &vector("derived/trustee-evidence-genoa.snp-report.bin"),
            None,
        )
        .unwrap();
        assert_eq!(v3["attestation_report"]["cpuid_fam_id"], 25);
    }

    #[test]
    fn report_json_with_wrong_lengths_is_refused() {
        let mut j = ReportJson::from_report(&base_report()).unwrap();
        j.report_data.pop();
        assert!(j
            .to_report()
            .unwrap_err()
            .to_string()
            .contains("report_data has 63 bytes"));
        let mut j = ReportJson::from_report(&base_report()).unwrap();
        j.policy &= !(1 << 17);
        assert!(
            j.to_report().is_err(),
            "a policy without the must-be-one bit cannot round-trip"
        );
        assert!(report_from_evidence(&json!({"x": 1})).is_err());
    }
}
