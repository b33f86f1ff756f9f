//! `tdx` evidence provider: an Intel TDX quote through configfs-tsm (provider `tdx_guest`).
//!
//! The inblob (TDX REPORTDATA) is the 48-byte binding followed by 16 zero bytes for the broker
//! exchange ([`report_data`]), and the whole 64-byte audit-log binding for a checkpoint
//! ([`Provider::checkpoint`]; its last 16 bytes are a SHA-512 output, so a checkpoint quote
//! never passes for broker evidence). The evidence, the same for both, is the shape the
//! Trustee `tdx` verifier reads:
//! `{"quote":"<base64 std of the quote>","cc_eventlog":"<base64 std of the CCEL table>"|null}`,
//! where the CC event log is the ACPI CCEL data (`/sys/firmware/acpi/tables/data/CCEL`) when
//! it can be read, else `null`.
//!
//! Before the quote leaves the guest its header is checked (version 4 or 5, TEE type 0x81)
//! and its REPORTDATA must equal the inblob, so a quote for other data, or from another TEE,
//! is never sent. The signature is the broker's business (providers do not verify their own
//! evidence).
//!
//! TD quote layout (Intel TDX DCAP Quote Generation Library, appendix "TD Quote format"):
//! a 48-byte header (`version` u16 at 0, `att_key_type` u16 at 2, `tee_type` u32 at 4, …);
//! in version 4 the TD report body follows at offset 48; in version 5 a body descriptor
//! (`type` u16 at 48: 2 = TD report 1.0, 584 bytes; 3 = TD report 1.5, 648 bytes; `size` u32
//! at 50) precedes the body at offset 54. In both bodies REPORTDATA is the 64 bytes at body
//! offset 520 (after TEE_TCB_SVN 16, MRSEAM 48, MRSIGNERSEAM 48, SEAMATTRIBUTES 8,
//! TDATTRIBUTES 8, XFAM 8, MRTD 48, MRCONFIGID 48, MROWNER 48, MROWNERCONFIG 48, RTMR0-3 192).
//!
//! Runtime register: none yet ([`Provider::runtime_register`] returns `None`). TDX has RTMRs
//! that the event log could extend (RTMR 2 or 3, through configfs-tsm `rtmrs` on newer
//! kernels or the `tdx_guest` ioctl); whether and how cvm-warden extends them is the lead's
//! decision, so no measurement reaches an RTMR in this build.

use std::io;
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde_json::{json, Value};

use super::tsm::{RealTsmFs, Tsm, TsmFs, TsmRequest, DEFAULT_ROOT, INBLOB_LEN, PROVIDER_TDX};
use super::{Provider, TeeError};
use crate::eventlog::RuntimeRegister;

/// Where the kernel exposes the ACPI CC event log (CCEL) data.
pub const DEFAULT_CCEL: &str = "/sys/firmware/acpi/tables/data/CCEL";

/// The kernel module that registers the `tdx_guest` configfs-tsm provider.
pub const MODULE: &str = "tdx_guest";

pub use cvm_warden_verify::evidence::tdx::{
    check_quote, quote_from_evidence, quote_report_data, BODY_REPORT_DATA_OFFSET, QUOTE_HEADER_LEN,
    TD_REPORT10_LEN, TD_REPORT15_LEN, TEE_TYPE_TDX,
};

const TEE: &str = "tdx";

/// The inblob: the 48-byte binding followed by 16 zero bytes.
pub fn report_data(binding: &[u8; 48]) -> [u8; INBLOB_LEN] {
    let mut data = [0u8; INBLOB_LEN];
    data[..48].copy_from_slice(binding);
    data
}

/// Reads the CC event log: `None` when it does not exist or cannot be read (logged).
fn read_ccel(path: &Path) -> Option<Vec<u8>> {
    match std::fs::read(path) {
        Ok(bytes) if !bytes.is_empty() => Some(bytes),
        Ok(_) => {
            log::warn!(
                "tdx: the CC event log {} is empty; sending none",
                path.display()
            );
            None
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            log::info!("tdx: no CC event log at {}; sending none", path.display());
            None
        }
        Err(e) => {
            log::warn!(
                "tdx: cannot read the CC event log {}: {e}; sending none",
                path.display()
            );
            None
        }
    }
}

/// Evidence for the Trustee `tdx` verifier.
#[derive(Debug)]
pub struct TdxProvider<F: TsmFs = RealTsmFs> {
    tsm: Tsm<F>,
    ccel: PathBuf,
}

impl TdxProvider<RealTsmFs> {
    /// The provider on the real configfs-tsm root and CCEL path. Fails with
    /// [`TeeError::DeviceMissing`] when configfs-tsm is absent.
    pub fn open_default() -> Result<Self, TeeError> {
        Self::open(Tsm::new(TEE, DEFAULT_ROOT, RealTsmFs), DEFAULT_CCEL)
    }
}

impl<F: TsmFs> TdxProvider<F> {
    /// The provider on `tsm` (its root must exist) with the CC event log at `ccel`.
    pub fn open(tsm: Tsm<F>, ccel: impl Into<PathBuf>) -> Result<Self, TeeError> {
        if !tsm.available() {
            return Err(TeeError::DeviceMissing {
                tee: TEE,
                device: tsm.root().to_path_buf(),
                module: MODULE,
            });
        }
        Ok(Self {
            tsm,
            ccel: ccel.into(),
        })
    }

    /// A quote for `inblob` (checked: header, and REPORTDATA = `inblob`) and the CC event
    /// log, as the evidence JSON.
    fn quote(&mut self, inblob: &[u8; INBLOB_LEN]) -> Result<Value, TeeError> {
        let answer = self.tsm.generate(
            PROVIDER_TDX,
            &TsmRequest {
                inblob: *inblob,
                privlevel: None,
                read_auxblob: false,
            },
        )?;
        check_quote(&answer.outblob, inblob)?;
        let ccel = read_ccel(&self.ccel);
        Ok(json!({
            "quote": STANDARD.encode(&answer.outblob),
            "cc_eventlog": ccel.map(|el| STANDARD.encode(el)),
        }))
    }

    /// The configfs-tsm root (tests inspect its fake through this).
    pub fn tsm(&self) -> &Tsm<F> {
        &self.tsm
    }
}

impl<F: TsmFs> Provider for TdxProvider<F> {
    fn tee(&self) -> &'static str {
        TEE
    }

    fn evidence(&mut self, binding: &[u8; 48]) -> Result<Value, TeeError> {
        self.quote(&report_data(binding))
    }

    /// A quote whose REPORTDATA is all 64 bytes of `binding`, same shape as the evidence.
    fn checkpoint(&mut self, binding: &[u8; 64]) -> Result<Value, TeeError> {
        self.quote(binding)
    }

    /// None: RTMR extension is not implemented yet (see the module documentation).
    fn runtime_register(&mut self) -> Result<Option<Box<dyn RuntimeRegister>>, TeeError> {
        Ok(None)
    }

    fn describe(&self) -> Value {
        json!({
            "tee": TEE,
            "device": format!("configfs-tsm {}", self.tsm.root().display()),
            "provider": PROVIDER_TDX,
            "cc_eventlog": self.ccel.display().to_string(),
            "report_data": "48-byte binding followed by 16 zero bytes",
            "checkpoint_report_data": "the 64-byte checkpoint binding",
            "runtime_register": null,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::tee::tsm::{FakeTsmFs, PROVIDER_SEV};

    const ROOT: &str = "/fake/tsm/report";

    /// A synthetic quote: header, (v5 descriptor), body with `report_data`, then a fake
    /// signature section.
    fn quote(version: u16, tee_type: u32, body_type: u16, report_data: &[u8]) -> Vec<u8> {
        let mut q = Vec::new();
        q.extend_from_slice(&version.to_le_bytes());
        q.extend_from_slice(&2u16.to_le_bytes()); // ECDSA-256 P-256
        q.extend_from_slice(&tee_type.to_le_bytes());
        q.resize(QUOTE_HEADER_LEN, 0xaa);
        let body_len = if body_type == 3 {
            TD_REPORT15_LEN
        } else {
            TD_REPORT10_LEN
        };
        if version == 5 {
            q.extend_from_slice(&body_type.to_le_bytes());
            q.extend_from_slice(&(body_len as u32).to_le_bytes());
        }
        let body_start = q.len();
        q.resize(body_start + body_len, 0xbb);
        q[body_start + BODY_REPORT_DATA_OFFSET..body_start + BODY_REPORT_DATA_OFFSET + 64]
            .copy_from_slice(report_data);
        q.extend_from_slice(&[0x10, 0, 0, 0]);
        q.extend_from_slice(&[0xcc; 16]);
        q
    }

    fn binding() -> [u8; 48] {
        let mut b = [0u8; 48];
        for (i, x) in b.iter_mut().enumerate() {
            *x = (i as u8).wrapping_mul(7).wrapping_add(1);
        }
        b
    }

    #[test]
    fn report_data_is_binding_then_zeros() {
        let d = report_data(&binding());
        assert_eq!(&d[..48], &binding());
        assert_eq!(&d[48..], &[0u8; 16]);
    }

    #[test]
    fn report_data_is_found_in_v4_and_both_v5_bodies() {
        let rd = report_data(&binding());
        for (version, body_type, at) in [(4, 2, 568), (5, 2, 574), (5, 3, 574)] {
            let q = quote(version, TEE_TYPE_TDX, body_type, &rd);
            assert_eq!(&q[at..at + 64], &rd, "layout of the synthetic quote");
            assert_eq!(
                quote_report_data(&q).unwrap(),
                rd,
                "v{version} type {body_type}"
            );
            check_quote(&q, &rd).unwrap();
        }
    }

    #[test]
    fn header_and_length_errors() {
        let rd = report_data(&binding());
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (vec![4, 0, 2, 0], "shorter than the 48-byte header"),
            (quote(3, TEE_TYPE_TDX, 2, &rd), "version 3, expected 4 or 5"),
            (quote(4, 0, 2, &rd), "tee type 0x0, expected 0x81"),
            (quote(5, TEE_TYPE_TDX, 9, &rd), "body type 9"),
            (quote(4, TEE_TYPE_TDX, 2, &rd)[..600].to_vec(), "too short"),
            (
                quote(5, TEE_TYPE_TDX, 2, &rd)[..50].to_vec(),
                "no body descriptor",
            ),
        ];
        for (q, want) in cases {
            let err = quote_report_data(&q).unwrap_err().to_string();
            assert!(err.contains(want), "{want}: {err}");
        }
        let mut q = quote(5, TEE_TYPE_TDX, 3, &rd);
        q[50..54].copy_from_slice(&584u32.to_le_bytes());
        let err = quote_report_data(&q).unwrap_err().to_string();
        assert!(err.contains("has size 584, expected 648"), "{err}");
    }

    #[test]
    fn quote_for_other_data_is_refused() {
        let rd = report_data(&binding());
        let mut other = rd;
        other[47] ^= 1;
        let err = check_quote(&quote(4, TEE_TYPE_TDX, 2, &other), &rd).unwrap_err();
        assert!(err.to_string().contains("REPORTDATA is"), "{err}");
    }

    fn fake(version: u16, body_type: u16) -> FakeTsmFs {
        FakeTsmFs::new(
            ROOT,
            PROVIDER_TDX,
            Box::new(move |inblob| Ok(quote(version, TEE_TYPE_TDX, body_type, inblob))),
        )
    }

    #[test]
    fn evidence_end_to_end_with_event_log() {
        let dir = tempfile::tempdir().unwrap();
        let ccel = dir.path().join("CCEL");
        std::fs::write(&ccel, b"\x01\x02event log").unwrap();
        let mut p = TdxProvider::open(Tsm::new("tdx", ROOT, fake(4, 2)), &ccel).unwrap();
        let evidence = p.evidence(&binding()).unwrap();
        let q = STANDARD
            .decode(evidence["quote"].as_str().unwrap())
            .unwrap();
        assert_eq!(q, quote(4, TEE_TYPE_TDX, 2, &report_data(&binding())));
        assert_eq!(
            STANDARD
                .decode(evidence["cc_eventlog"].as_str().unwrap())
                .unwrap(),
            b"\x01\x02event log"
        );
        assert_eq!(evidence.as_object().unwrap().len(), 2);
        assert_eq!(p.tsm().fs().live_entries(), 0);
        assert!(!p
            .tsm()
            .fs()
            .calls
            .iter()
            .any(|c| c.ends_with("privlevel") || c.ends_with("auxblob")));
    }

    #[test]
    fn evidence_without_event_log_is_null() {
        let dir = tempfile::tempdir().unwrap();
        let mut p =
            TdxProvider::open(Tsm::new("tdx", ROOT, fake(5, 3)), dir.path().join("CCEL")).unwrap();
        let evidence = p.evidence(&binding()).unwrap();
        assert!(evidence["cc_eventlog"].is_null());
        assert!(evidence["quote"].is_string());
    }

    #[test]
    fn unreadable_event_log_is_null() {
        let dir = tempfile::tempdir().unwrap();
        // A directory cannot be read as a file, whoever runs the test.
        let mut p = TdxProvider::open(Tsm::new("tdx", ROOT, fake(4, 2)), dir.path()).unwrap();
        assert!(p.evidence(&binding()).unwrap()["cc_eventlog"].is_null());
    }

    #[test]
    fn wrong_quote_from_the_device_fails_closed() {
        let fs = FakeTsmFs::new(
            ROOT,
            PROVIDER_TDX,
            Box::new(|_| Ok(quote(4, TEE_TYPE_TDX, 2, &[0u8; 64]))),
        );
        let mut p = TdxProvider::open(Tsm::new("tdx", ROOT, fs), "/nonexistent").unwrap();
        let err = p.evidence(&binding()).unwrap_err();
        assert!(matches!(err, TeeError::Malformed { .. }), "{err:?}");
    }

    fn checkpoint_binding() -> [u8; 64] {
        let mut b = [0u8; 64];
        for (i, x) in b.iter_mut().enumerate() {
            *x = (i as u8).wrapping_mul(13).wrapping_add(0x80);
        }
        b
    }

    #[test]
    fn checkpoint_quote_carries_the_whole_64_byte_binding() {
        let written = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = written.clone();
        let fs = FakeTsmFs::new(
            ROOT,
            PROVIDER_TDX,
            Box::new(move |inblob| {
                seen.lock().unwrap().push(inblob.to_vec());
                Ok(quote(5, TEE_TYPE_TDX, 3, inblob))
            }),
        );
        let dir = tempfile::tempdir().unwrap();
        let ccel = dir.path().join("CCEL");
        std::fs::write(&ccel, b"ccel bytes").unwrap();
        let mut p = TdxProvider::open(Tsm::new("tdx", ROOT, fs), &ccel).unwrap();
        let binding = checkpoint_binding();
        let evidence = p.checkpoint(&binding).unwrap();

        // The device was asked for exactly the binding, all 64 bytes.
        assert_eq!(*written.lock().unwrap(), vec![binding.to_vec()]);
        // Same shape as the broker evidence; the quote's REPORTDATA is the binding.
        let mut keys: Vec<&String> = evidence.as_object().unwrap().keys().collect();
        keys.sort();
        assert_eq!(keys, ["cc_eventlog", "quote"]);
        let q = quote_from_evidence(&evidence).unwrap();
        assert_eq!(q, quote(5, TEE_TYPE_TDX, 3, &binding));
        assert_eq!(quote_report_data(&q).unwrap(), binding);
        check_quote(&q, &binding).unwrap();
        assert_eq!(
            STANDARD
                .decode(evidence["cc_eventlog"].as_str().unwrap())
                .unwrap(),
            b"ccel bytes"
        );
        assert_eq!(p.tsm().fs().live_entries(), 0);

        // A checkpoint quote is not a quote for the 48-byte prefix padded with zeros (what
        // broker evidence carries), so neither passes for the other.
        let mut prefix = [0u8; 48];
        prefix.copy_from_slice(&binding[..48]);
        assert!(check_quote(&q, &report_data(&prefix)).is_err());
        let broker = quote_from_evidence(&p.evidence(&prefix).unwrap()).unwrap();
        assert!(check_quote(&broker, &binding).is_err());
    }

    #[test]
    fn checkpoint_quote_for_other_data_fails_closed() {
        // A device that keeps only 48 bytes of the inblob (zeroing the rest) is caught.
        let fs = FakeTsmFs::new(
            ROOT,
            PROVIDER_TDX,
            Box::new(|inblob| {
                let mut rd = inblob.to_vec();
                rd[48..].fill(0);
                Ok(quote(4, TEE_TYPE_TDX, 2, &rd))
            }),
        );
        let mut p = TdxProvider::open(Tsm::new("tdx", ROOT, fs), "/nonexistent").unwrap();
        let err = p.checkpoint(&checkpoint_binding()).unwrap_err();
        assert!(matches!(err, TeeError::Malformed { .. }), "{err:?}");
        let text = err.to_string();
        assert!(
            text.contains("REPORTDATA is") && text.contains(&hex::encode(checkpoint_binding())),
            "{text}"
        );

        // A device error is reported, not papered over.
        let mut fs = fake(4, 2);
        fs.fail_on = Some("outblob");
        let mut p = TdxProvider::open(Tsm::new("tdx", ROOT, fs), "/nonexistent").unwrap();
        assert!(p.checkpoint(&checkpoint_binding()).is_err());
    }

    #[test]
    fn quote_from_evidence_refuses_other_shapes() {
        let q = STANDARD.encode([1u8, 2, 3]);
        assert_eq!(
            quote_from_evidence(&json!({"quote": q, "cc_eventlog": null})).unwrap(),
            vec![1, 2, 3]
        );
        for (bad, want) in [
            (json!([]), "not a json object"),
            (json!({"quote": q}), "no cc_eventlog"),
            (json!({"cc_eventlog": null}), "no \"quote\""),
            (
                json!({"quote": "!!", "cc_eventlog": null}),
                "quote is not standard base64",
            ),
            (
                json!({"quote": q, "cc_eventlog": 5}),
                "neither a string nor null",
            ),
            (
                json!({"quote": q, "cc_eventlog": "-_"}),
                "cc_eventlog is not standard",
            ),
            (
                json!({"quote": q, "cc_eventlog": null, "x": 1}),
                "unexpected field \"x\"",
            ),
        ] {
            let err = quote_from_evidence(&bad).unwrap_err().to_string();
            assert!(err.contains(want), "{want}: {err}");
        }
    }

    #[test]
    fn sev_provider_is_refused() {
        let fs = FakeTsmFs::new(ROOT, PROVIDER_SEV, Box::new(|_| Ok(vec![0; 1184])));
        let mut p = TdxProvider::open(Tsm::new("tdx", ROOT, fs), "/nonexistent").unwrap();
        let err = p.evidence(&binding()).unwrap_err();
        assert!(
            err.to_string()
                .contains("configfs-tsm provider is sev_guest but attestation.tee = tdx"),
            "{err}"
        );
    }

    #[test]
    fn missing_configfs_tsm_is_device_missing() {
        let err = TdxProvider::open(Tsm::new("tdx", ROOT, FakeTsmFs::absent(ROOT)), DEFAULT_CCEL)
            .unwrap_err();
        match err {
            TeeError::DeviceMissing {
                tee,
                device,
                module,
            } => {
                assert_eq!((tee, module), ("tdx", "tdx_guest"));
                assert_eq!(device, Path::new(ROOT));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn tdx_has_no_runtime_register_yet_and_describes_itself() {
        let mut p = TdxProvider::open(Tsm::new("tdx", ROOT, fake(4, 2)), DEFAULT_CCEL).unwrap();
        assert!(p.runtime_register().unwrap().is_none());
        assert!(!p.insecure());
        let d = p.describe();
        assert_eq!(d["tee"], "tdx");
        assert_eq!(d["provider"], "tdx_guest");
        assert_eq!(d["device"], format!("configfs-tsm {ROOT}"));
        assert_eq!(
            d["checkpoint_report_data"],
            "the 64-byte checkpoint binding"
        );
    }
}
