//! NVIDIA GPUs in confidential-computing mode, next to the CPU TEE (GPU-ATTESTATION.md).
//!
//! [`GpuProvider`] wraps the policy's primary [`Provider`] and adds the GPUs:
//! - [`Provider::device_precheck`] (the runner calls it right after the perimeter stage,
//!   before the network and the measure stage): the CC state (ccFeature on, environment
//!   PROD, devtools off unless allowed), the GPU count and architectures, the driver and
//!   VBIOS minimums; then one report per GPU with a random nonce gives the FWID and the
//!   measurement digest; each GPU's facts become a `gpu` measurement event;
//! - [`Provider::additional_evidence`] (the KBS client calls it per handshake, before the
//!   primary evidence): the CC state checked again, then per GPU the report for the §4 nonce
//!   (`device_nonce(nonce, tee-pubkey)`) and the PEM chain, in guest-components' shape;
//! - [`Provider::set_devices_ready`]: the system-wide ready state.
//!
//! Providers never verify their own evidence: a report whose nonce is not the one asked
//! for goes to the broker as it is, and the broker refuses it.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde::Serialize;
use serde_json::{json, Value};

use super::{DeviceFacts, Provider, TeeError};
use crate::digest::Digest;
use crate::eventlog::{EventKind, RuntimeRegister};
use cvm_warden_verify::evidence::nvidia::parse_report;
use cvm_warden_verify::schema::{AdditionalEvidence, DeviceEvidence, NvidiaEvidence};

pub mod fake;
pub mod nvml;
#[cfg(test)]
mod tests;

pub use nvml::{Arch, CcEnvironment, CcState, MultiGpuMode, Nvml, NvmlError, RealNvml};

/// The provider name in messages.
const TEE: &str = "nvidia";

/// What the policy requires of the GPUs (`[attestation.gpu]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GpuRequirements {
    /// At least one GPU must be present (`required`).
    pub required: bool,
    /// Exactly this many GPUs (`count`).
    pub count: Option<u32>,
    /// Allowed architectures (`arch`; empty: any of Hopper and Blackwell).
    pub arch: Vec<Arch>,
    /// Lowest driver version (`min_driver`; decimal dotted numbers).
    pub min_driver: Option<String>,
    /// Lowest VBIOS version (`min_vbios`; hexadecimal dotted numbers, as NVIDIA prints it).
    pub min_vbios: Option<String>,
    /// Developer tools mode allowed (`allow_devtools`; development only, not confidential).
    pub allow_devtools: bool,
    /// A simulated GPU (`simulate`): proves nothing.
    pub simulated: bool,
    /// RIM files (`rims`): at the precheck each GPU's evidence is verified offline
    /// (`cvm_warden_verify::evidence::nvidia::verify`: chain to NVIDIA's pinned root, FWID,
    /// signature, then every RIM's signature and the measurements against them).
    pub rims: Vec<std::path::PathBuf>,
    /// The verification time of that check (`None`: now). Tests pin it.
    pub verify_at: Option<std::time::SystemTime>,
}

/// Compares dotted version numbers component by component (`radix` 10 for drivers, 16 for
/// VBIOS); a missing component counts as 0. `None` when either does not parse.
pub fn compare_versions(a: &str, b: &str, radix: u32) -> Option<std::cmp::Ordering> {
    let parse = |s: &str| -> Option<Vec<u64>> {
        s.trim()
            .split('.')
            .map(|part| u64::from_str_radix(part, radix).ok())
            .collect()
    };
    let (a, b) = (parse(a)?, parse(b)?);
    let len = a.len().max(b.len());
    let at = |v: &[u64], i: usize| v.get(i).copied().unwrap_or(0);
    Some(
        (0..len)
            .map(|i| at(&a, i).cmp(&at(&b, i)))
            .find(|o| o.is_ne())
            .unwrap_or(std::cmp::Ordering::Equal),
    )
}

/// One GPU's facts, measured as a `gpu` event and audited.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GpuFacts {
    /// NVML index.
    pub index: u32,
    /// NVML UUID.
    pub uuid: String,
    /// Architecture (`hopper`, `blackwell`).
    pub arch: String,
    /// `nvmlSystemGetDriverVersion`.
    pub driver_version: String,
    /// `nvmlDeviceGetVbiosVersion`.
    pub vbios_version: String,
    /// The report's opaque FWID (hex; empty when the report has none).
    pub fwid: String,
    /// The report's measurements digest as the verifier crate defines it
    /// (`Report::measurements_digest`: SHA-384 over every block in index order, each as
    /// `index ‖ length (u16 LE) ‖ value`), hex.
    pub measurements_digest: String,
    /// The RIMs the measurements matched (`kind version sha256:<file digest>`), when the
    /// policy ships any; measured with the rest, so the broker's policy sees them.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rims: Vec<String>,
}

impl GpuFacts {
    /// The event: digest = SHA-256 of the description, the description the JCS (RFC 8785)
    /// text of these facts, so an auditor recomputes the digest from the log alone.
    pub fn event(&self) -> Result<DeviceFacts, TeeError> {
        let value =
            serde_json::to_value(self).map_err(|e| malformed("GPU facts", e.to_string()))?;
        let text = serde_json_canonicalizer::to_string(&value)
            .map_err(|e| malformed("GPU facts", e.to_string()))?;
        Ok(DeviceFacts {
            kind: EventKind::Gpu,
            digest: Digest::of(text.as_bytes()),
            description: text,
            details: value,
        })
    }
}

fn malformed(what: &'static str, detail: String) -> TeeError {
    TeeError::Malformed {
        tee: TEE,
        what,
        detail,
    }
}

/// `[attestation.gpu] rims`: one GPU's precheck evidence verified offline against the RIM
/// files — NVIDIA's pinned root, FWID, signature, nonce, then each RIM's signature and every
/// active measurement. Returns what matched, as the GPU event names it.
fn check_rims(
    req: &GpuRequirements,
    index: u32,
    uuid: &str,
    report: &[u8],
    chain: &[u8],
    nonce: &[u8; 32],
) -> Result<Vec<String>, TeeError> {
    use cvm_warden_verify::evidence::nvidia::{verify, Roots, VerifyOptions};
    let mut files = Vec::with_capacity(req.rims.len());
    let mut digests = Vec::with_capacity(req.rims.len());
    for path in &req.rims {
        let bytes = std::fs::read(path).map_err(|e| {
            refuse(format!(
                "cannot read the RIM {} ([attestation.gpu] rims): {e}; put the RIM file in the image or remove it from rims",
                path.display()
            ))
        })?;
        digests.push(Digest::of(&bytes));
        files.push(bytes);
    }
    let at = req.verify_at.unwrap_or_else(std::time::SystemTime::now);
    let root_error = |e: cvm_warden_verify::evidence::nvidia::NvidiaError| {
        malformed("GPU roots", cvm_warden_verify::error_chain(&e))
    };
    let mut options = VerifyOptions::new(at).map_err(root_error)?;
    if req.simulated {
        // The simulated GPU's own TEST root (it proves nothing anyway), so the RIM half is
        // reached; a real GPU's chain must end at NVIDIA's root.
        options.roots = Roots::with_extra(chain).map_err(root_error)?;
    }
    options.rims = files;
    let verified = verify(report, chain, nonce, &options).map_err(|e| {
        refuse(format!(
            "GPU {index} ({uuid}) does not verify against [attestation.gpu] rims ({}): {}; install the driver and VBIOS the RIMs describe, or ship the RIMs of the installed ones",
            req.rims.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "),
            cvm_warden_verify::error_chain(&e)
        ))
    })?;
    let signed = verified.rims.map(|v| v.signed).unwrap_or_default();
    Ok(signed
        .iter()
        .zip(&digests)
        .map(|(rim, digest)| format!("{:?} {} {digest}", rim.kind, rim.version).to_lowercase())
        .collect())
}

fn refuse(detail: String) -> TeeError {
    TeeError::Config { tee: TEE, detail }
}

fn nvml_error(error: NvmlError) -> TeeError {
    refuse(error.to_string())
}

/// The GPUs of the policy: NVML (or why it could not be loaded) and the requirements.
#[derive(Debug)]
pub struct Gpus {
    nvml: Result<Box<dyn Nvml>, String>,
    requirements: GpuRequirements,
    /// Indices found by the precheck (`None`: not run yet).
    devices: Option<Vec<(u32, String, Arch)>>,
    ready_set: bool,
}

/// `name (GPU index, UUID)` for every device.
fn names(devices: &[(u32, String, Arch)]) -> String {
    devices
        .iter()
        .map(|(i, uuid, arch)| format!("GPU {i} ({uuid}, {arch})"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl Gpus {
    /// `nvml` is the loaded library or why it could not be loaded.
    pub fn new(nvml: Result<Box<dyn Nvml>, NvmlError>, requirements: GpuRequirements) -> Gpus {
        Gpus {
            nvml: nvml.map_err(|e| e.to_string()),
            requirements,
            devices: None,
            ready_set: false,
        }
    }

    fn nvml(&mut self) -> Result<&mut Box<dyn Nvml>, TeeError> {
        self.nvml.as_mut().map_err(|why| {
            refuse(format!(
                "[attestation.gpu] needs NVML, which is not available: {why}"
            ))
        })
    }

    /// The CC state checked against the requirements; `devices` are named in the refusal.
    fn check_cc(&mut self, devices: &[(u32, String, Arch)]) -> Result<CcState, TeeError> {
        let allow_devtools = self.requirements.allow_devtools;
        let cc = self.nvml()?.cc_state().map_err(nvml_error)?;
        let who = names(devices);
        if !cc.cc_feature {
            return Err(refuse(format!(
                "{who}: confidential computing is off (ccFeature disabled, environment {:?}); [attestation.gpu] requires CC mode: turn it on for these GPUs on the host (NVIDIA's nvidia_gpu_tools.py --set-cc-mode=on, then reset the GPU) before starting the CVM",
                cc.environment
            )));
        }
        if cc.environment != CcEnvironment::Prod {
            return Err(refuse(format!(
                "{who}: the CC environment is {:?}, not PROD; [attestation.gpu] requires a production CC environment",
                cc.environment
            )));
        }
        if cc.devtools && !allow_devtools {
            return Err(refuse(format!(
                "{who}: CC developer tools mode is on (devToolsMode: the GPU's memory can be inspected, nothing is confidential); [attestation.gpu] allow_devtools = false: turn devtools mode off on the host (nvidia_gpu_tools.py --set-cc-mode=on without devtools)"
            )));
        }
        Ok(cc)
    }

    /// The precheck (see the module documentation). `None` when there is no GPU and the
    /// policy does not require one.
    pub fn precheck(&mut self) -> Result<Vec<GpuFacts>, TeeError> {
        let req = self.requirements.clone();
        if self.nvml.is_err() && !req.required && req.count.unwrap_or(0) == 0 {
            self.devices = Some(Vec::new());
            return Ok(Vec::new());
        }
        let nvml = self.nvml()?;
        let driver = nvml.driver_version().map_err(nvml_error)?;
        let count = nvml.device_count().map_err(nvml_error)?;
        let mut devices = Vec::new();
        for index in 0..count {
            let uuid = nvml.uuid(index).map_err(nvml_error)?;
            let arch = nvml.architecture(index).map_err(nvml_error)?;
            devices.push((index, uuid, arch));
        }
        if let Some(want) = req.count {
            if count != want {
                return Err(refuse(format!(
                    "{count} GPU(s) found ({}), [attestation.gpu] count = {want}; attach exactly {want} GPU(s) to the CVM or change count",
                    if devices.is_empty() { "none".to_string() } else { names(&devices) }
                )));
            }
        }
        if count == 0 {
            if req.required {
                return Err(refuse(
                    "no GPU found (NVML lists none), [attestation.gpu] required = true; attach the GPU to the CVM (VFIO) or set required = false".to_string(),
                ));
            }
            self.devices = Some(devices);
            return Ok(Vec::new());
        }
        self.check_cc(&devices)?;
        let nvml = self.nvml()?;
        let allowed = if req.arch.is_empty() {
            vec![Arch::Hopper, Arch::Blackwell]
        } else {
            req.arch.clone()
        };
        let mut facts = Vec::new();
        for (index, uuid, arch) in &devices {
            if !allowed.contains(arch) {
                return Err(refuse(format!(
                    "GPU {index} ({uuid}) is {arch}, [attestation.gpu] arch = [{}]; attach a GPU of an allowed architecture or change arch",
                    allowed.iter().map(|a| format!("{:?}", a.as_policy())).collect::<Vec<_>>().join(", ")
                )));
            }
            if let Some(min) = &req.min_driver {
                if !matches!(
                    compare_versions(&driver, min, 10),
                    Some(std::cmp::Ordering::Greater | std::cmp::Ordering::Equal)
                ) {
                    return Err(refuse(format!(
                        "GPU {index} ({uuid}): driver {driver} is older than [attestation.gpu] min_driver = {min:?}; install driver {min} or newer in the image"
                    )));
                }
            }
            let vbios = nvml.vbios_version(*index).map_err(nvml_error)?;
            if let Some(min) = &req.min_vbios {
                if !matches!(
                    compare_versions(&vbios, min, 16),
                    Some(std::cmp::Ordering::Greater | std::cmp::Ordering::Equal)
                ) {
                    return Err(refuse(format!(
                        "GPU {index} ({uuid}): VBIOS {vbios} is older than [attestation.gpu] min_vbios = {min:?}; update the GPU's VBIOS on the host"
                    )));
                }
            }
            let mut nonce = [0u8; 32];
            ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut nonce).map_err(
                |_| refuse("cannot draw a random nonce for the GPU precheck".to_string()),
            )?;
            let bytes = nvml.attestation_report(*index, nonce).map_err(nvml_error)?;
            let rims = if req.rims.is_empty() {
                Vec::new()
            } else {
                let chain = nvml.attestation_cert_chain(*index).map_err(nvml_error)?;
                check_rims(&req, *index, uuid, &bytes, &chain, &nonce)?
            };
            // The verifier crate's parser: the daemon and auditors read the same facts.
            let parsed = parse_report(&bytes).map_err(|error| {
                malformed(
                    "GPU attestation report",
                    format!("GPU {index} ({uuid}): {error}"),
                )
            })?;
            facts.push(GpuFacts {
                index: *index,
                uuid: uuid.clone(),
                arch: arch.as_policy(),
                driver_version: driver.clone(),
                vbios_version: vbios,
                fwid: parsed.fwid().map(hex::encode).unwrap_or_default(),
                measurements_digest: hex::encode(parsed.measurements_digest()),
                rims,
            });
        }
        self.devices = Some(devices);
        Ok(facts)
    }

    /// The `additional_evidence` string for one handshake (empty without GPUs).
    pub fn evidence(&mut self, nonce: &str, tee_pubkey: &Value) -> Result<String, TeeError> {
        let Some(devices) = self.devices.clone() else {
            return Err(refuse(
                "GPU evidence was asked for before the GPU precheck ran; this is a bug, report it"
                    .to_string(),
            ));
        };
        if devices.is_empty() {
            return Ok(String::new());
        }
        // Every collection re-checks the CC state: a GPU that left CC mode since the boot
        // (or since the last re-attestation) is refused here.
        self.check_cc(&devices)?;
        let device_nonce = cvm_warden_verify::binding::device_nonce(nonce, tee_pubkey)
            .map_err(|e| malformed("device binding", e.to_string()))?;
        let nvml = self.nvml()?;
        let count = nvml.device_count().map_err(nvml_error)?;
        if usize::try_from(count).ok() != Some(devices.len()) {
            return Err(refuse(format!(
                "{count} GPU(s) now, {} at the precheck ({}); a GPU came or went",
                devices.len(),
                names(&devices)
            )));
        }
        let mut list = Vec::new();
        for (index, uuid, arch) in &devices {
            let report = nvml
                .attestation_report(*index, device_nonce)
                .map_err(nvml_error)?;
            let chain = nvml.attestation_cert_chain(*index).map_err(nvml_error)?;
            list.push(DeviceEvidence {
                arch: arch.evidence_name(),
                uuid: uuid.clone(),
                evidence: STANDARD.encode(report),
                certificate: STANDARD.encode(chain),
            });
        }
        serde_json::to_string(&AdditionalEvidence {
            nvidia: NvidiaEvidence {
                device_evidence_list: list,
            },
        })
        .map_err(|e| malformed("additional evidence", e.to_string()))
    }

    /// Sets or clears the system-wide ready state; the audit details.
    pub fn set_ready(&mut self, ready: bool) -> Result<Value, TeeError> {
        // Cleared also when the precheck did not finish (`None`): fail closed. Only a
        // precheck that found no GPU (required = false) leaves nothing to set or clear.
        if self.devices.as_ref().is_some_and(Vec::is_empty) {
            return Ok(json!({ "ready": false, "devices": [], "reason": "no GPU" }));
        }
        if ready && self.devices.is_none() {
            return Err(refuse(
                "the GPUs were to be set ready before the GPU precheck ran; this is a bug, report it"
                    .to_string(),
            ));
        }
        let devices = self.devices.clone().unwrap_or_default();
        let was_set = self.ready_set;
        if self.nvml.is_err() {
            return Ok(json!({ "ready": false, "devices": [], "reason": "NVML not loaded" }));
        }
        self.nvml()?.set_ready_state(ready).map_err(nvml_error)?;
        self.ready_set = ready;
        Ok(json!({
            "ready": ready,
            "was_set_by_cvm_warden": was_set,
            "devices": devices.iter().map(|(i, uuid, _)| json!({"index": i, "uuid": uuid})).collect::<Vec<_>>(),
            "call": format!("nvmlSystemSetConfComputeGpusReadyState({})", u32::from(ready)),
        }))
    }

    /// Public facts for `describe`.
    pub fn describe(&self) -> Value {
        json!({
            "requirements": self.requirements,
            "nvml": match &self.nvml { Ok(_) => Value::String("loaded".into()), Err(why) => Value::String(why.clone()) },
            "devices": self.devices.as_ref().map(|d| d.iter().map(|(i, uuid, arch)| json!({"index": i, "uuid": uuid, "arch": arch.as_policy()})).collect::<Vec<_>>()),
            "simulated": self.requirements.simulated,
        })
    }
}

/// The primary provider with the GPUs beside it.
#[derive(Debug)]
pub struct GpuProvider {
    primary: Box<dyn Provider>,
    gpus: Gpus,
}

impl GpuProvider {
    /// Wraps `primary`.
    pub fn new(primary: Box<dyn Provider>, gpus: Gpus) -> GpuProvider {
        GpuProvider { primary, gpus }
    }
}

impl Provider for GpuProvider {
    fn tee(&self) -> &'static str {
        self.primary.tee()
    }

    fn evidence(&mut self, report_data: &[u8; 48]) -> Result<Value, TeeError> {
        self.primary.evidence(report_data)
    }

    fn runtime_register(&mut self) -> Result<Option<Box<dyn RuntimeRegister>>, TeeError> {
        self.primary.runtime_register()
    }

    fn describe(&self) -> Value {
        let mut value = self.primary.describe();
        let gpus = self.gpus.describe();
        match value.as_object_mut() {
            Some(map) => {
                map.insert("gpu".to_string(), gpus);
                value
            }
            None => json!({ "primary": value, "gpu": gpus }),
        }
    }

    fn checkpoint(&mut self, binding: &[u8; 64]) -> Result<Value, TeeError> {
        self.primary.checkpoint(binding)
    }

    fn insecure(&self) -> bool {
        self.primary.insecure()
            || self.gpus.requirements.simulated
            || self.gpus.requirements.allow_devtools
    }

    fn additional_evidence(&mut self, nonce: &str, tee_pubkey: &Value) -> Result<String, TeeError> {
        self.gpus.evidence(nonce, tee_pubkey)
    }

    fn device_precheck(&mut self) -> Result<Option<Vec<DeviceFacts>>, TeeError> {
        let facts = self.gpus.precheck()?;
        facts
            .iter()
            .map(GpuFacts::event)
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }

    fn set_devices_ready(&mut self, ready: bool) -> Result<Option<Value>, TeeError> {
        self.gpus.set_ready(ready).map(Some)
    }
}

/// What `cvm-warden gpu probe` lists before the precheck: the driver, each GPU (index, UUID,
/// architecture, VBIOS), the CC state and the ready state, read through `nvml`. A call that
/// fails is shown as `{"error": …}` in its place, so one unsupported call does not hide the
/// rest.
pub fn inventory(nvml: &mut dyn Nvml) -> Value {
    fn shown<T: Serialize>(result: Result<T, NvmlError>) -> Value {
        match result {
            Ok(value) => json!(value),
            Err(error) => json!({ "error": error.to_string() }),
        }
    }
    let count = nvml.device_count();
    let gpus: Vec<Value> = match &count {
        Ok(count) => (0..*count)
            .map(|index| {
                json!({
                    "index": index,
                    "uuid": shown(nvml.uuid(index)),
                    "arch": shown(nvml.architecture(index).map(|a| a.as_policy())),
                    "vbios_version": shown(nvml.vbios_version(index)),
                })
            })
            .collect(),
        Err(_) => Vec::new(),
    };
    json!({
        "driver_version": shown(nvml.driver_version()),
        "device_count": shown(count),
        "gpus": gpus,
        "cc_state": shown(nvml.cc_state()),
        "ready_state": shown(nvml.ready_state()),
    })
}

/// The requirements `cvm-warden gpu probe` checks without a policy: at least one GPU,
/// Hopper or Blackwell, in CC mode (ccFeature on, PROD), devtools off.
pub fn default_requirements() -> GpuRequirements {
    GpuRequirements {
        required: true,
        count: None,
        arch: Vec::new(),
        min_driver: None,
        min_vbios: None,
        allow_devtools: false,
        simulated: false,
        rims: Vec::new(),
        verify_at: None,
    }
}
