//! The recording fake NVML: GPUs replayed from recorded vectors (the recorded report is
//! returned whatever nonce is asked: "wrong nonce" tests) or simulated (the request nonce is
//! replaced and the report signed again with a TEST key, as a GPU signs it). Loaded from a
//! JSON recording (`tests/data/nvidia-sim/gpu.json`, the policy's `simulate`) or built in
//! code. Every call is recorded; the CC state can be scripted to change after a number of
//! attestation reports (continuous-trust tests).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, ECDSA_P384_SHA384_FIXED_SIGNING};
use serde::Deserialize;

use super::nvml::{Arch, CcState, Nvml, NvmlError};
use cvm_warden_verify::evidence::nvidia::parse_report;

/// Offset of the request nonce in the SPDM GET_MEASUREMENTS request.
const NONCE_OFFSET: usize = 4;
/// Length of the raw `r‖s` ECDSA P-384 signature.
const SIGNATURE_LEN: usize = 96;

/// One fake GPU.
pub struct FakeGpu {
    /// NVML UUID.
    pub uuid: String,
    /// Architecture.
    pub arch: Arch,
    /// VBIOS version as NVML prints it.
    pub vbios_version: String,
    /// The recorded (replay) or template (simulated) report.
    pub report: Vec<u8>,
    /// The PEM chain.
    pub chain: Vec<u8>,
    /// Simulated: the TEST key that signs each report again.
    signer: Option<Arc<EcdsaKeyPair>>,
}

impl std::fmt::Debug for FakeGpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeGpu")
            .field("uuid", &self.uuid)
            .field("arch", &self.arch)
            .field("report_len", &self.report.len())
            .field("simulated", &self.signer.is_some())
            .finish()
    }
}

impl FakeGpu {
    /// A GPU that returns `report` as recorded, whatever nonce is asked.
    pub fn replay(
        uuid: &str,
        arch: Arch,
        vbios_version: &str,
        report: Vec<u8>,
        chain: Vec<u8>,
    ) -> FakeGpu {
        FakeGpu {
            uuid: uuid.to_string(),
            arch,
            vbios_version: vbios_version.to_string(),
            report,
            chain,
            signer: None,
        }
    }

    /// A simulated GPU: `template` with each request's nonce, signed with `key_pkcs8` (a TEST
    /// P-384 key, PKCS#8 DER).
    pub fn simulated(
        uuid: &str,
        arch: Arch,
        vbios_version: &str,
        template: Vec<u8>,
        chain: Vec<u8>,
        key_pkcs8: &[u8],
    ) -> Result<FakeGpu, NvmlError> {
        parse_report(&template).map_err(|error| NvmlError::Library {
            library: "simulated GPU".to_string(),
            detail: format!("the template report does not parse: {error}"),
        })?;
        let key = EcdsaKeyPair::from_pkcs8(
            &ECDSA_P384_SHA384_FIXED_SIGNING,
            key_pkcs8,
            &SystemRandom::new(),
        )
        .map_err(|e| NvmlError::Library {
            library: "simulated GPU".to_string(),
            detail: format!("the signing key is not a P-384 PKCS#8 key: {e}"),
        })?;
        Ok(FakeGpu {
            signer: Some(Arc::new(key)),
            ..FakeGpu::replay(uuid, arch, vbios_version, template, chain)
        })
    }

    fn report_for(&self, nonce: [u8; 32]) -> Result<Vec<u8>, NvmlError> {
        let Some(key) = &self.signer else {
            return Ok(self.report.clone());
        };
        let mut bytes = self.report.clone();
        let fail = |detail: String| NvmlError::Call {
            call: "simulated nvmlDeviceGetConfComputeGpuAttestationReport".to_string(),
            detail,
        };
        // Lengths from the parsed fields (the request is 37 bytes, the nonce at offset 4).
        let signed_len = parse_report(&bytes)
            .map_err(|e| fail(e.to_string()))?
            .signed_bytes()
            .len();
        bytes[NONCE_OFFSET..NONCE_OFFSET + 32].copy_from_slice(&nonce);
        let signature = key
            .sign(&SystemRandom::new(), &bytes[..signed_len])
            .map_err(|e| fail(format!("signing failed: {e}")))?;
        bytes[signed_len..signed_len + SIGNATURE_LEN].copy_from_slice(signature.as_ref());
        Ok(bytes)
    }
}

/// The recorded calls, shared with the test that made the fake.
pub type Calls = Arc<Mutex<Vec<String>>>;

/// A fake NVML.
#[derive(Debug)]
pub struct FakeNvml {
    /// `nvmlSystemGetDriverVersion`.
    pub driver_version: String,
    /// The CC state now.
    pub cc: CcState,
    /// The ready state.
    pub ready: bool,
    /// After this many attestation reports the CC feature turns off.
    pub leave_cc_after: Option<u32>,
    /// The GPUs.
    pub gpus: Vec<FakeGpu>,
    /// Attestation reports served so far.
    pub reports_served: u32,
    /// A call (by its recorded name's prefix, e.g. `set_ready_state`) that fails.
    pub fail_on: Option<String>,
    calls: Calls,
}

/// The JSON recording (see `tests/data/nvidia-sim/README.md`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Recording {
    #[serde(default)]
    #[allow(dead_code)]
    comment: Option<String>,
    driver_version: String,
    cc: CcState,
    #[serde(default)]
    ready: bool,
    #[serde(default)]
    leave_cc_after: Option<u32>,
    gpus: Vec<RecordedGpu>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RecordedGpu {
    uuid: String,
    arch: Arch,
    vbios_version: String,
    report: PathBuf,
    certificate: PathBuf,
    #[serde(default)]
    signing_key: Option<PathBuf>,
}

impl FakeNvml {
    /// A fake with no GPU.
    pub fn new(driver_version: &str, cc: CcState) -> FakeNvml {
        FakeNvml {
            driver_version: driver_version.to_string(),
            cc,
            ready: false,
            leave_cc_after: None,
            gpus: Vec::new(),
            reports_served: 0,
            fail_on: None,
            calls: Calls::default(),
        }
    }

    /// Adds a GPU.
    pub fn with_gpu(mut self, gpu: FakeGpu) -> FakeNvml {
        self.gpus.push(gpu);
        self
    }

    /// The recorded calls (a handle that stays valid after the fake is boxed).
    pub fn calls(&self) -> Calls {
        Arc::clone(&self.calls)
    }

    /// Loads a JSON recording; its files are relative to the recording's directory.
    pub fn load(recording: &Path) -> Result<FakeNvml, NvmlError> {
        let fail = |detail: String| NvmlError::Library {
            library: format!("simulated GPU {}", recording.display()),
            detail,
        };
        let text = std::fs::read_to_string(recording)
            .map_err(|e| fail(format!("cannot read the recording: {e}")))?;
        let parsed: Recording =
            serde_json::from_str(&text).map_err(|e| fail(format!("not a GPU recording: {e}")))?;
        let dir = recording.parent().unwrap_or(Path::new("."));
        let read = |file: &Path| {
            std::fs::read(dir.join(file))
                .map_err(|e| fail(format!("cannot read {}: {e}", dir.join(file).display())))
        };
        let mut fake = FakeNvml::new(&parsed.driver_version, parsed.cc);
        fake.ready = parsed.ready;
        fake.leave_cc_after = parsed.leave_cc_after;
        for gpu in parsed.gpus {
            let report = read(&gpu.report)?;
            let chain = read(&gpu.certificate)?;
            let gpu = match &gpu.signing_key {
                Some(key) => FakeGpu::simulated(
                    &gpu.uuid,
                    gpu.arch,
                    &gpu.vbios_version,
                    report,
                    chain,
                    &read(key)?,
                )?,
                None => FakeGpu::replay(&gpu.uuid, gpu.arch, &gpu.vbios_version, report, chain),
            };
            fake.gpus.push(gpu);
        }
        Ok(fake)
    }

    fn record(&mut self, call: String) -> Result<(), NvmlError> {
        let failing = self
            .fail_on
            .as_deref()
            .is_some_and(|prefix| call.starts_with(prefix));
        if let Ok(mut calls) = self.calls.lock() {
            calls.push(call.clone());
        }
        if failing {
            return Err(NvmlError::Call {
                call,
                detail: "scripted failure (fake NVML)".to_string(),
            });
        }
        Ok(())
    }

    fn gpu(&self, index: u32) -> Result<&FakeGpu, NvmlError> {
        usize::try_from(index)
            .ok()
            .and_then(|i| self.gpus.get(i))
            .ok_or(NvmlError::NoDevice { index })
    }
}

impl Nvml for FakeNvml {
    fn driver_version(&mut self) -> Result<String, NvmlError> {
        self.record("driver_version".to_string())?;
        Ok(self.driver_version.clone())
    }

    fn device_count(&mut self) -> Result<u32, NvmlError> {
        self.record("device_count".to_string())?;
        Ok(u32::try_from(self.gpus.len()).unwrap_or(u32::MAX))
    }

    fn uuid(&mut self, index: u32) -> Result<String, NvmlError> {
        self.record(format!("uuid({index})"))?;
        Ok(self.gpu(index)?.uuid.clone())
    }

    fn architecture(&mut self, index: u32) -> Result<Arch, NvmlError> {
        self.record(format!("architecture({index})"))?;
        Ok(self.gpu(index)?.arch.clone())
    }

    fn vbios_version(&mut self, index: u32) -> Result<String, NvmlError> {
        self.record(format!("vbios_version({index})"))?;
        Ok(self.gpu(index)?.vbios_version.clone())
    }

    fn cc_state(&mut self) -> Result<CcState, NvmlError> {
        self.record("cc_state".to_string())?;
        Ok(self.cc)
    }

    fn attestation_report(&mut self, index: u32, nonce: [u8; 32]) -> Result<Vec<u8>, NvmlError> {
        self.record(format!(
            "attestation_report({index}, {})",
            hex::encode(nonce)
        ))?;
        let report = self.gpu(index)?.report_for(nonce)?;
        self.reports_served = self.reports_served.saturating_add(1);
        if self
            .leave_cc_after
            .is_some_and(|after| self.reports_served >= after)
        {
            self.cc.cc_feature = false;
        }
        Ok(report)
    }

    fn attestation_cert_chain(&mut self, index: u32) -> Result<Vec<u8>, NvmlError> {
        self.record(format!("attestation_cert_chain({index})"))?;
        Ok(self.gpu(index)?.chain.clone())
    }

    fn ready_state(&mut self) -> Result<bool, NvmlError> {
        self.record("ready_state".to_string())?;
        Ok(self.ready)
    }

    fn set_ready_state(&mut self, ready: bool) -> Result<(), NvmlError> {
        self.record(format!("set_ready_state({ready})"))?;
        self.ready = ready;
        Ok(())
    }
}
