//! The NVML seam: every NVML call the GPU provider makes goes through [`Nvml`]. [`RealNvml`]
//! loads `libnvidia-ml.so.1` at run time through `nvml-wrapper` (so cvm-warden builds and
//! runs without a driver when no GPU is configured); [`super::fake::FakeNvml`] replays
//! recorded GPUs or simulates one.
//!
//! Pitfalls of `nvml-wrapper` 0.13 avoided here (GPU-ATTESTATION.md §3):
//! - `Device::get_confidential_compute_capabilities` fails with `Unknown` on SEV-SNP hosts
//!   (cpuCaps 3/4 are not mapped): never called;
//! - the environment (PROD/SIM) is not exposed: read raw through [`crate::sys::nvml`];
//! - the ready-state calls live on `Device` but are system-wide
//!   (`nvmlSystemGet/SetConfComputeGpusReadyState`): called on device 0, once.

use serde::{Deserialize, Serialize};

/// The NVML library the real implementation loads.
pub const NVML_LIBRARY: &str = "libnvidia-ml.so.1";

/// A GPU architecture as NVML reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    /// NVML 9: H100, H200.
    Hopper,
    /// NVML 10: B200, GB200.
    Blackwell,
    /// Anything else (named as NVML's wrapper names it).
    Other(String),
}

impl Arch {
    /// The `arch` value of guest-components' device evidence (`HOPPER`, `BLACKWELL`).
    pub fn evidence_name(&self) -> String {
        match self {
            Arch::Hopper => "HOPPER".to_string(),
            Arch::Blackwell => "BLACKWELL".to_string(),
            Arch::Other(name) => name.to_uppercase(),
        }
    }

    /// The policy's spelling (`hopper`, `blackwell`, or the other name in lower case).
    pub fn as_policy(&self) -> String {
        match self {
            Arch::Hopper => "hopper".to_string(),
            Arch::Blackwell => "blackwell".to_string(),
            Arch::Other(name) => name.to_lowercase(),
        }
    }
}

impl std::fmt::Display for Arch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.as_policy())
    }
}

/// `environment` of the CC state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CcEnvironment {
    /// 0: CC unavailable.
    Unavailable,
    /// 1: simulation (not a real CC environment).
    Sim,
    /// 2: production.
    Prod,
}

impl CcEnvironment {
    /// From NVML's `environment` value.
    pub fn from_raw(value: u32) -> Option<CcEnvironment> {
        match value {
            0 => Some(CcEnvironment::Unavailable),
            1 => Some(CcEnvironment::Sim),
            2 => Some(CcEnvironment::Prod),
            _ => None,
        }
    }
}

/// `multiGpuMode` of the CC settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MultiGpuMode {
    /// 0: none.
    None,
    /// 1: protected PCIe.
    ProtectedPcie,
    /// 2: NVLink encryption.
    Nvle,
    /// Another value.
    Unknown,
}

/// The system's CC state and settings (`nvmlSystemGetConfComputeState` / `…Settings`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CcState {
    /// PROD, SIM or unavailable.
    pub environment: CcEnvironment,
    /// `ccFeature` enabled.
    pub cc_feature: bool,
    /// `devToolsMode` on (debugging allowed: not confidential).
    pub devtools: bool,
    /// `multiGpuMode` from the settings.
    pub multi_gpu_mode: MultiGpuMode,
}

/// Why an NVML call failed.
#[derive(Debug, thiserror::Error)]
pub enum NvmlError {
    /// The library could not be loaded or initialised.
    #[error("cannot load NVML ({library}): {detail}; install the NVIDIA driver with its NVML library (Debian: nvidia-driver and libnvidia-ml1; NVIDIA's .run installer also installs it) and check that the nvidia kernel module is loaded (nvidia-smi must work)")]
    Library {
        /// The library file.
        library: String,
        /// What NVML or the loader said.
        detail: String,
    },
    /// A call failed.
    #[error("NVML {call} failed: {detail}")]
    Call {
        /// The NVML function (and device index).
        call: String,
        /// What NVML said.
        detail: String,
    },
    /// A GPU index past the device count.
    #[error("NVML has no GPU {index}")]
    NoDevice {
        /// The index.
        index: u32,
    },
}

/// Every NVML effect the GPU provider needs. Devices are named by NVML index.
pub trait Nvml: std::fmt::Debug + Send {
    /// `nvmlSystemGetDriverVersion`.
    fn driver_version(&mut self) -> Result<String, NvmlError>;
    /// `nvmlDeviceGetCount_v2`.
    fn device_count(&mut self) -> Result<u32, NvmlError>;
    /// `nvmlDeviceGetUUID` (`GPU-…`).
    fn uuid(&mut self, index: u32) -> Result<String, NvmlError>;
    /// `nvmlDeviceGetArchitecture`.
    fn architecture(&mut self, index: u32) -> Result<Arch, NvmlError>;
    /// `nvmlDeviceGetVbiosVersion`.
    fn vbios_version(&mut self, index: u32) -> Result<String, NvmlError>;
    /// `nvmlSystemGetConfComputeState` and `nvmlSystemGetConfComputeSettings` (system-wide).
    fn cc_state(&mut self) -> Result<CcState, NvmlError>;
    /// `nvmlDeviceGetConfComputeGpuAttestationReport` with `nonce`: the report bytes (SPDM
    /// GET_MEASUREMENTS request ‖ MEASUREMENTS response).
    fn attestation_report(&mut self, index: u32, nonce: [u8; 32]) -> Result<Vec<u8>, NvmlError>;
    /// `nvmlDeviceGetConfComputeGpuCertificate`: the attestation certificate chain (PEM,
    /// leaf first).
    fn attestation_cert_chain(&mut self, index: u32) -> Result<Vec<u8>, NvmlError>;
    /// `nvmlSystemGetConfComputeGpusReadyState` (system-wide).
    fn ready_state(&mut self) -> Result<bool, NvmlError>;
    /// `nvmlSystemSetConfComputeGpusReadyState` (system-wide).
    fn set_ready_state(&mut self, ready: bool) -> Result<(), NvmlError>;
}

/// NVML through `nvml-wrapper`, the library loaded at run time.
pub struct RealNvml {
    nvml: nvml_wrapper::Nvml,
}

impl std::fmt::Debug for RealNvml {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RealNvml")
            .field("library", &NVML_LIBRARY)
            .finish()
    }
}

fn call_error(call: impl Into<String>) -> impl FnOnce(nvml_wrapper::error::NvmlError) -> NvmlError {
    let call = call.into();
    move |e| NvmlError::Call {
        call,
        detail: e.to_string(),
    }
}

impl RealNvml {
    /// Loads [`NVML_LIBRARY`] and initialises NVML.
    pub fn open() -> Result<RealNvml, NvmlError> {
        Self::open_library(NVML_LIBRARY)
    }

    /// Loads NVML from `library` (a file name the loader resolves, or a path).
    pub fn open_library(library: &str) -> Result<RealNvml, NvmlError> {
        let nvml = nvml_wrapper::Nvml::builder()
            .lib_path(std::ffi::OsStr::new(library))
            .init()
            .map_err(|e| NvmlError::Library {
                library: library.to_string(),
                detail: e.to_string(),
            })?;
        Ok(RealNvml { nvml })
    }

    fn device(&self, index: u32) -> Result<nvml_wrapper::Device<'_>, NvmlError> {
        self.nvml
            .device_by_index(index)
            .map_err(call_error(format!("nvmlDeviceGetHandleByIndex({index})")))
    }
}

impl Nvml for RealNvml {
    fn driver_version(&mut self) -> Result<String, NvmlError> {
        self.nvml
            .sys_driver_version()
            .map_err(call_error("nvmlSystemGetDriverVersion"))
    }

    fn device_count(&mut self) -> Result<u32, NvmlError> {
        self.nvml
            .device_count()
            .map_err(call_error("nvmlDeviceGetCount"))
    }

    fn uuid(&mut self, index: u32) -> Result<String, NvmlError> {
        self.device(index)?
            .uuid()
            .map_err(call_error(format!("nvmlDeviceGetUUID({index})")))
    }

    fn architecture(&mut self, index: u32) -> Result<Arch, NvmlError> {
        use nvml_wrapper::enums::device::DeviceArchitecture as A;
        let arch = self
            .device(index)?
            .architecture()
            .map_err(call_error(format!("nvmlDeviceGetArchitecture({index})")))?;
        Ok(match arch {
            A::Hopper => Arch::Hopper,
            A::Blackwell => Arch::Blackwell,
            other => Arch::Other(other.to_string()),
        })
    }

    fn vbios_version(&mut self, index: u32) -> Result<String, NvmlError> {
        self.device(index)?
            .vbios_version()
            .map_err(call_error(format!("nvmlDeviceGetVbiosVersion({index})")))
    }

    fn cc_state(&mut self) -> Result<CcState, NvmlError> {
        let (environment, cc_feature, devtools) = crate::sys::nvml::cc_system_state(&self.nvml)
            .map_err(call_error("nvmlSystemGetConfComputeState"))?;
        // The settings add multiGpuMode; a driver without them (before 550) still has a state.
        let multi_gpu_mode = match crate::sys::nvml::cc_system_settings(&self.nvml) {
            Ok((_, _, _, 0)) => MultiGpuMode::None,
            Ok((_, _, _, 1)) => MultiGpuMode::ProtectedPcie,
            Ok((_, _, _, 2)) => MultiGpuMode::Nvle,
            Ok(_) | Err(_) => MultiGpuMode::Unknown,
        };
        Ok(CcState {
            environment: CcEnvironment::from_raw(environment).ok_or_else(|| NvmlError::Call {
                call: "nvmlSystemGetConfComputeState".to_string(),
                detail: format!("unknown environment value {environment}"),
            })?,
            cc_feature: cc_feature == 1,
            devtools: devtools == 1,
            multi_gpu_mode,
        })
    }

    fn attestation_report(&mut self, index: u32, nonce: [u8; 32]) -> Result<Vec<u8>, NvmlError> {
        let report = self
            .device(index)?
            .confidential_compute_gpu_attestation_report(nonce)
            .map_err(call_error(format!(
                "nvmlDeviceGetConfComputeGpuAttestationReport({index})"
            )))?;
        Ok(report.attestation_report)
    }

    fn attestation_cert_chain(&mut self, index: u32) -> Result<Vec<u8>, NvmlError> {
        let certificate = self
            .device(index)?
            .confidential_compute_gpu_certificate()
            .map_err(call_error(format!(
                "nvmlDeviceGetConfComputeGpuCertificate({index})"
            )))?;
        Ok(certificate.attestation_cert_chain)
    }

    fn ready_state(&mut self) -> Result<bool, NvmlError> {
        // System-wide although nvml-wrapper puts it on a device.
        self.device(0)?
            .get_confidential_compute_state()
            .map_err(call_error("nvmlSystemGetConfComputeGpusReadyState"))
    }

    fn set_ready_state(&mut self, ready: bool) -> Result<(), NvmlError> {
        self.device(0)?
            .set_confidential_compute_state(ready)
            .map_err(call_error(format!(
                "nvmlSystemSetConfComputeGpusReadyState({})",
                u32::from(ready)
            )))
    }
}
