//! The two NVML calls `nvml-wrapper` 0.13 does not expose with their values: the system CC
//! state (`nvmlSystemGetConfComputeState`) and settings (`nvmlSystemGetConfComputeSettings`,
//! version 1). The wrapper only turns them into booleans (`is_cc_enabled`, …) and never
//! returns the environment (PROD / SIM), which the GPU precheck must see.

use nvml_wrapper::error::{nvml_sym, nvml_try, NvmlError};
use nvml_wrapper::Nvml;
use nvml_wrapper_sys::bindings::{
    nvmlConfComputeSystemState_t, nvmlSystemConfComputeSettings_v1_t,
};

/// `nvmlSystemGetConfComputeState`: (environment, ccFeature, devToolsMode).
pub fn cc_system_state(nvml: &Nvml) -> Result<(u32, u32, u32), NvmlError> {
    let sym = nvml_sym(nvml.lib().nvmlSystemGetConfComputeState.as_ref())?;
    let mut state = nvmlConfComputeSystemState_t {
        environment: 0,
        ccFeature: 0,
        devToolsMode: 0,
    };
    // SAFETY: `sym` is the library's nvmlSystemGetConfComputeState, resolved by libloading
    // from the loaded libnvidia-ml (kept alive by `nvml`); it writes one
    // nvmlConfComputeSystemState_t (three unsigned ints, repr(C) here) through the pointer,
    // which points at a live, initialised local of that type.
    nvml_try(unsafe { sym(&mut state) })?;
    Ok((state.environment, state.ccFeature, state.devToolsMode))
}

/// `nvmlSystemGetConfComputeSettings` (v1): (environment, ccFeature, devToolsMode, multiGpuMode).
pub fn cc_system_settings(nvml: &Nvml) -> Result<(u32, u32, u32, u32), NvmlError> {
    let sym = nvml_sym(nvml.lib().nvmlSystemGetConfComputeSettings.as_ref())?;
    let size = u32::try_from(std::mem::size_of::<nvmlSystemConfComputeSettings_v1_t>())
        .map_err(|_| NvmlError::Unknown)?;
    let mut settings = nvmlSystemConfComputeSettings_v1_t {
        // NVML_STRUCT_VERSION(SystemConfComputeSettings, 1), as nvml.h defines it.
        version: size | (1 << 24),
        environment: 0,
        ccFeature: 0,
        devToolsMode: 0,
        multiGpuMode: 0,
    };
    // SAFETY: as above; the function reads `version` and writes the v1 struct, which the
    // pointer (a live local of exactly that repr(C) type and size) covers.
    nvml_try(unsafe { sym(&mut settings) })?;
    Ok((
        settings.environment,
        settings.ccFeature,
        settings.devToolsMode,
        settings.multiGpuMode,
    ))
}
