//! Operator and owner tools that run parts of the boot without its effects:
//!
//! - [`reference_values`]: the event log and the application-PCR value the measure stage
//!   will produce for a policy and bundle — what a model owner registers with the key
//!   broker's resource policy;
//! - [`attest`]: the measure and attest stages against the real TEE and broker, reporting
//!   for each resource whether it was released (length and SHA-256 fingerprint, never the
//!   bytes) — how an operator debugs a broker setup before a real boot, once the VM can no
//!   longer be logged into.
//!
//! Both measure the bundle in place (no tmpfs copy; the digest is the same).

use serde_json::{json, Value};

use crate::audit::Audit;
use crate::digest::Digest;
use crate::eventlog::{
    EventKind, EventLog, ExtendError, NoRegister, RuntimeRegister, SimulatedPcr,
};
use crate::firewall::{self, NftFirewall, Phase, SystemResolver};
use crate::keybroker::{self, RealBroker, SetupError};
use crate::policy::{LoadedPolicy, ResourceUri};
use crate::stage::{self, Effects, Facts, KeyBroker, RealMeasurer, StageError};
use crate::sys::Sys;
use crate::tee::tpm::APP_PCR;

/// Why a dry run could not run.
#[derive(Debug, thiserror::Error)]
pub enum DryRunError {
    /// The policy has `attestation = "none"`.
    #[error("attestation = \"none\" in the policy: there is no TEE or key broker to try; configure [attestation]")]
    NoBroker,
    /// The provider or client could not be set up.
    #[error(transparent)]
    Setup(#[from] SetupError),
    /// A stage failed.
    #[error(transparent)]
    Stage(#[from] StageError),
}

/// The events a boot extends before the attest stage, in the same order: the perimeter
/// ruleset's digest (when `[network]` is configured; names resolved now, as the boot would),
/// then the measure stage (in place). Nothing is applied: no firewall, no lockdown, no mount.
fn measure(
    loaded: &LoadedPolicy,
    facts: &Facts,
    sys: &dyn Sys,
    register: &mut dyn RuntimeRegister,
    devices: &[crate::tee::DeviceFacts],
) -> Result<(EventLog, Value), StageError> {
    let plan = stage::measure::plan(&loaded.policy, facts)?;
    let audit = Audit::new(Vec::new(), false);
    let mut event_log = EventLog::new();
    let initial = register.read().map_err(|source| {
        StageError::Extend(Box::new(ExtendError {
            kind: EventKind::Policy,
            register: register.name(),
            source,
        }))
    })?;
    event_log.set_register_initial(initial);
    if loaded.policy.network.is_some() {
        let resolver = SystemResolver::default();
        let ruleset =
            firewall::build(&loaded.policy, Phase::Perimeter, &resolver).map_err(|source| {
                StageError::Firewall {
                    stage: "perimeter",
                    source: Box::new(source),
                }
            })?;
        event_log
            .measure(
                register,
                EventKind::Ruleset,
                ruleset.digest(),
                "perimeter ruleset",
            )
            .map_err(|e| StageError::Extend(Box::new(e)))?;
    }
    // The GPUs' events come right after the perimeter, as in a boot (`boot::device_precheck`).
    for device in devices {
        event_log
            .measure(
                register,
                device.kind,
                device.digest,
                device.description.clone(),
            )
            .map_err(|e| StageError::Extend(Box::new(e)))?;
    }
    // The measure stage uses none of the effects below; they are here because `Effects`
    // carries every seam.
    let mut nft = NftFirewall::new();
    let lockdown_paths = crate::lockdown::Paths::default();
    let mut fx = Effects {
        sys,
        measurer: &RealMeasurer,
        register,
        event_log: &mut event_log,
        audit: &audit,
        broker: None,
        volumes: &crate::volume::RealVolumes::new(),
        firewall: &mut nft,
        resolver: &SystemResolver::default(),
        resolution: None,
        lockdown: &crate::lockdown::RealLockdownSys::new(),
        lockdown_paths: &lockdown_paths,
    };
    let details = stage::measure::apply_in_place(&plan, &mut fx)?;
    Ok((event_log, details))
}

/// The events a boot extends before the attest stage (perimeter ruleset, measure stage) for
/// `loaded` and the value the TEE's application PCR (a TPM or vTPM PCR [`APP_PCR`], starting
/// from zero after reset) holds after them. With host names in `[network]` the ruleset —
/// and so the PCR — depends on what DNS answers; pin addresses where the broker checks PCR 15.
pub fn reference_values(
    loaded: &LoadedPolicy,
    facts: &Facts,
    sys: &dyn Sys,
) -> Result<Value, StageError> {
    let mut pcr = SimulatedPcr::default();
    let devices = gpu_reference_events(loaded)?;
    let (event_log, details) = measure(loaded, facts, sys, &mut pcr, &devices)?;
    let mut values = json!({
        "bundle_digest": details["bundle_digest"],
        "events": event_log.events(),
        "event_log_accumulator": event_log.accumulator(),
        "tpm": {
            "pcr": APP_PCR,
            "bank": "sha256",
            "initial": "0".repeat(64),
            "value": pcr.value.hex(),
        },
    });
    let dhcp = loaded.policy.network.as_ref().is_some_and(|n| {
        n.interfaces
            .iter()
            .any(|i| matches!(i.addressing, crate::policy::Addressing::Dhcp))
    });
    if dhcp {
        // The allowlist names the DHCP server the lease gives: PCR 15 while the workload
        // runs is known only on the machine.
        if reattesting(loaded) {
            values["tpm"]["reattest_value_unknown"] = json!(
                "re-attestation quotes PCR 15 after the allowlist, which names the DHCP server \
                 of the lease: it is known only on the machine (the boot's allowlist record \
                 holds the ruleset digest); give the interface a static address, or set \
                 attestation.reattest_interval = \"0\""
            );
        }
    } else if let Some(value) = reattest_pcr(loaded, pcr.value)? {
        values["tpm"]["reattest_value"] = json!(value.hex());
    }
    Ok(values)
}

/// Whether the policy re-attests (`attestation.reattest_interval` above 0).
fn reattesting(loaded: &LoadedPolicy) -> bool {
    matches!(
        &loaded.policy.attestation,
        crate::policy::Attestation::Broker { reattest, .. } if reattest.interval_secs > 0
    )
}

/// With re-attestation on (`attestation.reattest_interval` above 0): the application PCR as
/// the workload runs, which every re-attestation quotes — `after_measure` extended with the
/// allowlist ruleset (when `[network]` is configured) and the separator. The broker must
/// accept it as well (register it in `tpm_pcr15` next to `value`), or every re-attestation is
/// refused.
fn reattest_pcr(
    loaded: &LoadedPolicy,
    after_measure: Digest,
) -> Result<Option<Digest>, StageError> {
    if !reattesting(loaded) {
        return Ok(None);
    }
    let mut value = after_measure;
    if loaded.policy.network.is_some() {
        let ruleset = firewall::build(&loaded.policy, Phase::Allowlist, &SystemResolver::default())
            .map_err(|source| StageError::Firewall {
                stage: "allowlist",
                source: Box::new(source),
            })?;
        value = SimulatedPcr::extended(&value, &ruleset.digest());
    }
    Ok(Some(SimulatedPcr::extended(
        &value,
        &Digest::of(crate::boot::SEPARATOR),
    )))
}

/// The `gpu` events a boot with `[attestation.gpu]` extends after the perimeter ruleset. A
/// simulated GPU's facts are fixed by its recording, so they are computed here; real GPUs'
/// facts (UUID, FWID, measurements) exist only on the machine, so reference values for them
/// are refused rather than computed without them (a PCR 15 the boot would never reach).
fn gpu_reference_events(loaded: &LoadedPolicy) -> Result<Vec<crate::tee::DeviceFacts>, StageError> {
    let crate::policy::Attestation::Broker { gpu: Some(gpu), .. } = &loaded.policy.attestation
    else {
        return Ok(Vec::new());
    };
    if gpu.simulate.is_none() {
        return Err(StageError::Unsupported {
            stage: "measure",
            what: "reference values with [attestation.gpu] (each GPU's facts are extended into the runtime register after the perimeter ruleset)".to_string(),
            hint: "this build computes them only for a simulated GPU (simulate); for real GPUs take the gpu events from the gpu/ok record of a boot's audit log",
        });
    }
    let mut gpus =
        crate::tee::nvidia::Gpus::new(keybroker::open_nvml(gpu), keybroker::gpu_requirements(gpu));
    let precheck = |source: crate::tee::TeeError| StageError::Broker {
        stage: "gpu",
        what: "GPU precheck ([attestation.gpu])".to_string(),
        source: Box::new(source),
    };
    gpus.precheck()
        .map_err(precheck)?
        .iter()
        .map(|facts| facts.event().map_err(precheck))
        .collect()
}

/// What the owner adds to the trustee format besides the policy: AKs, PCR 11, the SNP
/// launch measurement.
#[derive(Debug, Clone, Default)]
pub struct TrusteeInputs {
    /// AKs as base64 SPKI DER ([`ak_spki_base64`]).
    pub trusted_aks: Vec<String>,
    /// PCR 11 (hex).
    pub tpm_pcr11: Option<String>,
    /// SNP launch measurement (hex).
    pub snp_launch_measurement: Option<String>,
}

/// An AK public key file (PEM `PUBLIC KEY` or SPKI DER) as the string Trustee's
/// `trusted_aks` lists: base64 (standard) of the SPKI DER.
pub fn ak_spki_base64(bytes: &[u8]) -> Result<String, String> {
    use base64::Engine;
    use rustls_pki_types::pem::PemObject;
    let der = if bytes.starts_with(b"-----") {
        rustls_pki_types::SubjectPublicKeyInfoDer::from_pem_slice(bytes)
            .map_err(|e| format!("no PEM PUBLIC KEY block ({e})"))?
            .to_vec()
    } else if bytes.first() == Some(&0x30) {
        bytes.to_vec()
    } else {
        return Err(
            "neither PEM (-----BEGIN PUBLIC KEY-----) nor DER; write it with `tpm2_readpublic -c <handle> -f der -o ak.der`"
                .to_string(),
        );
    };
    // An SPKI is SEQUENCE { SEQUENCE { OID … } BIT STRING }: check the outer length.
    let long_len = |n: usize| {
        der.get(2..2 + n)
            .map(|b| b.iter().fold(0usize, |a, x| (a << 8) | usize::from(*x)))
    };
    let declared = match der.get(1) {
        Some(&l) if l < 0x80 => Some((usize::from(l), 2)),
        Some(&0x81) => long_len(1).map(|l| (l, 3)),
        Some(&0x82) => long_len(2).map(|l| (l, 4)),
        _ => None,
    };
    match declared {
        Some((len, header)) if header + len == der.len() && der.get(header) == Some(&0x30) => {}
        _ => return Err("not a DER SubjectPublicKeyInfo".to_string()),
    }
    Ok(base64::engine::general_purpose::STANDARD.encode(der))
}

/// The trustee format of `reference-values`: the values a Trustee KBS needs for this
/// policy's TEE (PCR 15 from `values`, the measure stage's output), the resources the
/// policy fetches, and warnings for what only the owner can supply.
pub fn trustee_values(
    loaded: &LoadedPolicy,
    values: &Value,
    inputs: TrusteeInputs,
) -> Result<crate::kbs::admin::TrusteeValues, crate::kbs::admin::AdminError> {
    use crate::policy::{Attestation, Tee};
    let (tee, gpus) =
        match &loaded.policy.attestation {
            Attestation::Broker { tee, gpu, .. } => (
                *tee,
                gpu.as_deref()
                    .map_or(0, |g| g.count.unwrap_or(u32::from(g.required))),
            ),
            Attestation::None => return Err(crate::kbs::admin::AdminError::Value {
                what: "attestation".to_string(),
                detail:
                    "the policy has attestation = \"none\": there is no key broker to register at"
                        .to_string(),
            }),
        };
    let mut warnings = Vec::new();
    let tpm = tee == Tee::Tpm;
    if tpm && inputs.trusted_aks.is_empty() {
        warnings.push("no --ak: trusted_aks is not registered, and Trustee's default CPU policy gives `tpm` evidence executables 3 only for an AK it lists".to_string());
    }
    if tpm && inputs.tpm_pcr11.is_none() {
        warnings.push("no --tpm-pcr11: Trustee's default CPU policy also requires tpm_pcr11 for `tpm` evidence; register what the VM's boot chain leaves in PCR 11 (all zeros when nothing measures into it)".to_string());
    }
    if tee == Tee::Snp && inputs.snp_launch_measurement.is_none() {
        warnings.push("no --snp-measurement: snp_launch_measurement is not registered; compute it with `cvm-warden reference-values --snp-launch` for the image's OVMF, kernel, initrd and command line".to_string());
    }
    if !matches!(tee, Tee::Tpm | Tee::Snp) {
        warnings.push(format!(
            "the trustee format covers `tpm` and `snp` evidence; for {} register the values its Trustee verifier reads by hand",
            tee.as_str()
        ));
    }
    let policy = &loaded.policy;
    let mut resources: Vec<String> = policy
        .volumes
        .iter()
        .map(|v| v.key.path())
        .chain(policy.secrets.iter().map(|s| s.resource.path()))
        .collect();
    resources.sort();
    resources.dedup();
    crate::kbs::admin::TrusteeValues {
        policy: format!(
            "bundle {}",
            values["bundle_digest"].as_str().unwrap_or("(unknown)")
        ),
        tpm_pcr15: if tpm {
            values["tpm"]["value"].as_str().map(str::to_string)
        } else {
            None
        },
        tpm_pcr15_running: if tpm {
            values["tpm"]["reattest_value"].as_str().map(str::to_string)
        } else {
            None
        },
        tpm_pcr11: if tpm { inputs.tpm_pcr11 } else { None },
        trusted_aks: if tpm { inputs.trusted_aks } else { Vec::new() },
        snp_launch_measurement: inputs.snp_launch_measurement,
        resources,
        gpus,
        warnings,
    }
    .checked()
}

/// The attestation key a provider describes (`ak_public`, base64 of its SPKI DER: `tpm`
/// and `az-snp-vtpm`), by both its names: `{"sha256": "sha256:<hex>", "spki_der_base64":
/// "<the string to put in the broker's trusted_aks>"}`. `None` for a provider without an AK.
pub fn ak_report(provider: &Value) -> Option<Value> {
    use base64::Engine;
    let der = base64::engine::general_purpose::STANDARD
        .decode(provider.get("ak_public")?.as_str()?)
        .ok()?;
    let (fingerprint, spki) = crate::report::ak_names(&der);
    Some(json!({
        "sha256": fingerprint,
        "spki_der_base64": spki,
        "register": "add spki_der_base64 to the broker's trusted_aks reference value",
    }))
}

/// The measure and attest stages against the policy's TEE and broker, then a fetch of each
/// resource (the policy's volume keys and secrets, plus `extra`). Returns the report and
/// whether everything was released.
pub fn attest(
    loaded: &LoadedPolicy,
    facts: &Facts,
    sys: &dyn Sys,
    extra: &[ResourceUri],
) -> Result<(Value, bool), DryRunError> {
    let attestation = &loaded.policy.attestation;
    let provider = keybroker::open_provider(attestation)?.ok_or(DryRunError::NoBroker)?;
    let config = keybroker::client_config(attestation)?.ok_or(DryRunError::NoBroker)?;
    let mut broker = RealBroker::new(provider, config)?;
    let mut register = broker.runtime_register()?;
    let mut none = NoRegister;
    let register: &mut dyn RuntimeRegister = match register.as_deref_mut() {
        Some(register) => register,
        None => &mut none,
    };
    let register_name = register.name();
    // The GPU precheck as a boot runs it, so their events are extended and the evidence can
    // be collected.
    let devices = broker
        .device_precheck()
        .map_err(|source| StageError::Broker {
            stage: "gpu",
            what: "GPU precheck ([attestation.gpu])".to_string(),
            source,
        })?
        .unwrap_or_default();
    let (event_log, details) = measure(loaded, facts, sys, register, &devices)?;

    let mut tries = Vec::new();
    let exchange = broker.attest(&mut |attempt| tries.push(attempt));
    let mut report = json!({
        "provider": broker.describe(),
        "register": register_name,
        "bundle_digest": details["bundle_digest"],
        "event_log_accumulator": event_log.accumulator(),
    });
    if let Some(ak) = ak_report(&report["provider"]["provider"]) {
        report["ak"] = ak;
    }
    let exchange = match exchange {
        Ok(exchange) => exchange,
        Err(error) => {
            report["attested"] = json!(false);
            report["error"] = json!(crate::report::error_chain(error.as_ref()));
            report["tries"] = json!(tries);
            return Ok((report, false));
        }
    };
    report["attested"] = json!(true);
    report["tee"] = exchange["tee"].clone();
    report["status"] = exchange["status"].clone();
    report["nonce"] = exchange["nonce"].clone();

    let mut resources: Vec<ResourceUri> = loaded
        .policy
        .volumes
        .iter()
        .map(|v| v.key.clone())
        .chain(loaded.policy.secrets.iter().map(|s| s.resource.clone()))
        .chain(extra.iter().cloned())
        .collect();
    resources.dedup();
    let mut all = true;
    let mut results = Vec::new();
    for uri in &resources {
        match broker.release(uri, &mut |attempt| tries.push(attempt)) {
            Ok(released) => results.push(json!({
                "resource": uri,
                "released": true,
                "bytes": released.len(),
                "sha256": released.sha256_hex(),
            })),
            Err(error) => {
                all = false;
                results.push(json!({
                    "resource": uri,
                    "released": false,
                    "error": crate::report::error_chain(&error),
                }));
            }
        }
    }
    report["resources"] = json!(results);
    report["tries"] = json!(tries);
    Ok((report, all))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn the_ak_is_named_by_fingerprint_and_by_its_trusted_aks_string() {
        use sha2::Digest;
        let der = [0x30u8, 0x82, 0x01, 0x0a, 0x02, 0x82];
        let ak = ak_report(&json!({"tcti": "swtpm", "ak_public": "MIIBCgKC"})).unwrap();
        assert_eq!(
            ak["sha256"],
            format!("sha256:{}", hex::encode(sha2::Sha256::digest(der)))
        );
        assert_eq!(ak["spki_der_base64"], "MIIBCgKC");
        assert!(ak_report(&json!({"tee": "sample"})).is_none());
        assert!(ak_report(&json!({"ak_public": "not base64!"})).is_none());
    }
}
