//! The real [`KeyBroker`]: the policy's evidence provider ([`crate::tee`]) joined with the
//! Trustee KBS client ([`crate::kbs`]). Built once per boot, before the measure stage, so
//! the provider's runtime register (vTPM PCR) receives every measurement.

use std::time::Duration;

use serde_json::{json, Value};
use zeroize::Zeroizing;

use crate::eventlog::RuntimeRegister;
use crate::kbs::{self, Attempt, Client, KbsConfig};
use crate::policy::{Attestation, Gpu, GpuArch, KeyWrap, ResourceUri, Tee};
use crate::stage::{BrokerError, KeyBroker};
use crate::tee::{self, Provider, TeeError};

/// Why the key broker could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// The evidence provider could not be opened.
    #[error("attest: cannot open the {tee} evidence provider")]
    Provider {
        /// `attestation.tee`.
        tee: &'static str,
        /// Why.
        #[source]
        source: TeeError,
    },
    /// The CA file named by `attestation.kbs_ca` cannot be read.
    #[error("attest: cannot read attestation.kbs_ca {path}; install the broker's CA certificate (PEM) there")]
    Ca {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The KBS client refused its configuration.
    #[error("attest: key broker client")]
    Client(#[source] Box<kbs::KbsError>),
}

/// The name of a TEE as the KBS protocol writes it.
pub fn tee_name(tee: Tee) -> &'static str {
    tee.as_str()
}

/// Opens the evidence provider the policy names. `None` for `attestation = "none"`.
pub fn open_provider(attestation: &Attestation) -> Result<Option<Box<dyn Provider>>, SetupError> {
    let Attestation::Broker {
        tee,
        tpm,
        tpm_ak_handle,
        snp_certs,
        gpu,
        ..
    } = attestation
    else {
        return Ok(None);
    };
    let wrap = |source| SetupError::Provider {
        tee: tee_name(*tee),
        source,
    };
    let provider: Box<dyn Provider> = match tee {
        Tee::Sample => Box::new(tee::sample::SampleProvider::new()),
        Tee::Tpm => {
            let ak = match tpm_ak_handle {
                Some(handle) => tee::tpm::AkSource::Persistent(*handle),
                None => tee::tpm::AkSource::Create,
            };
            Box::new(tee::tpm::TpmProvider::open(tpm, ak).map_err(wrap)?)
        }
        Tee::AzSnpVtpm => {
            let mut options = tee::azure::AzureOptions::default();
            if let Some(dir) = snp_certs {
                // A VCEK baked into the image instead of Azure IMDS.
                options.vcek = tee::azure::VcekSource::File(dir.join("vcek.der"));
            }
            Box::new(tee::azure::AzSnpVtpmProvider::open_with(tpm, options).map_err(wrap)?)
        }
        Tee::Snp => match snp_certs {
            Some(cache) => {
                let device = tee::snp::open_device(
                    tee::tsm::Tsm::new("snp", tee::tsm::DEFAULT_ROOT, tee::tsm::RealTsmFs),
                    std::path::Path::new(tee::snp::SEV_GUEST_DEVICE),
                )
                .map_err(wrap)?;
                Box::new(tee::snp::SnpProvider::new(device, cache))
            }
            None => Box::new(tee::snp::SnpProvider::open_default().map_err(wrap)?),
        },
        Tee::Tdx => Box::new(tee::tdx::TdxProvider::open_default().map_err(wrap)?),
    };
    Ok(Some(match gpu {
        Some(gpu) => Box::new(gpu_provider(provider, gpu)),
        None => provider,
    }))
}

/// What `[attestation.gpu]` requires, as the GPU provider reads it.
pub fn gpu_requirements(gpu: &Gpu) -> tee::nvidia::GpuRequirements {
    tee::nvidia::GpuRequirements {
        required: gpu.required,
        count: gpu.count,
        arch: gpu
            .arch
            .iter()
            .map(|a| match a {
                GpuArch::Hopper => tee::nvidia::Arch::Hopper,
                GpuArch::Blackwell => tee::nvidia::Arch::Blackwell,
            })
            .collect(),
        min_driver: gpu.min_driver.clone(),
        min_vbios: gpu.min_vbios.clone(),
        allow_devtools: gpu.allow_devtools,
        simulated: gpu.simulate.is_some(),
        rims: gpu.rims.clone(),
        verify_at: None,
    }
}

/// NVML for `[attestation.gpu]`: the simulated GPU of `simulate`, else `libnvidia-ml.so.1`.
pub fn open_nvml(gpu: &Gpu) -> Result<Box<dyn tee::nvidia::Nvml>, tee::nvidia::NvmlError> {
    Ok(match &gpu.simulate {
        Some(recording) => Box::new(tee::nvidia::fake::FakeNvml::load(recording)?),
        None => Box::new(tee::nvidia::RealNvml::open()?),
    })
}

/// `primary` with the policy's GPUs beside it. NVML that cannot be loaded is not an error
/// here: the GPU precheck reports it (naming the library) unless no GPU is required.
pub fn gpu_provider(primary: Box<dyn Provider>, gpu: &Gpu) -> tee::nvidia::GpuProvider {
    tee::nvidia::GpuProvider::new(
        primary,
        tee::nvidia::Gpus::new(open_nvml(gpu), gpu_requirements(gpu)),
    )
}

/// The KBS client configuration for the policy's `[attestation]` table (`None` for
/// `attestation = "none"`). Reads the CA file.
pub fn client_config(attestation: &Attestation) -> Result<Option<KbsConfig>, SetupError> {
    let Attestation::Broker {
        kbs,
        kbs_ca,
        insecure_http,
        key_wrap,
        tries,
        timeout_secs,
        ..
    } = attestation
    else {
        return Ok(None);
    };
    let mut config = KbsConfig::new(kbs.clone());
    if let Some(path) = kbs_ca {
        config.ca_pem = Some(std::fs::read(path).map_err(|source| SetupError::Ca {
            path: path.display().to_string(),
            source,
        })?);
        config.ca_path = Some(path.clone());
    }
    config.insecure_http = *insecure_http;
    config.key_wrap = match key_wrap {
        KeyWrap::EcdhEsA256kw => kbs::KeyWrap::EcdhEsA256kw,
        KeyWrap::RsaOaep256 => kbs::KeyWrap::RsaOaep256,
    };
    config.tries = *tries;
    config.total_timeout = Duration::from_secs(*timeout_secs);
    Ok(Some(config))
}

/// A provider and a KBS client: what the attest and unlock stages talk to.
#[derive(Debug)]
pub struct RealBroker {
    provider: Box<dyn Provider>,
    client: Client,
}

impl RealBroker {
    /// Joins `provider` and a client for `config` (real transport, pinned TLS).
    pub fn new(provider: Box<dyn Provider>, config: KbsConfig) -> Result<Self, SetupError> {
        let client = Client::new(config).map_err(|e| SetupError::Client(Box::new(e)))?;
        Ok(Self { provider, client })
    }

    /// Joins `provider` and an already built client (tests: scripted transports).
    pub fn with_client(provider: Box<dyn Provider>, client: Client) -> Self {
        Self { provider, client }
    }

    /// The provider's runtime register, if its TEE has one.
    pub fn runtime_register(&mut self) -> Result<Option<Box<dyn RuntimeRegister>>, SetupError> {
        let tee = self.provider.tee();
        self.provider
            .runtime_register()
            .map_err(|source| SetupError::Provider { tee, source })
    }

    /// A fresh handshake while the workload runs (new nonce, new ephemeral key, fresh
    /// evidence from the provider, replacing the session): the typed exchange. Every try
    /// goes to `attempt`.
    pub fn reattest(
        &mut self,
        attempt: &mut dyn FnMut(Value),
    ) -> Result<kbs::Attested, kbs::KbsError> {
        let mut observer = |a: &Attempt| attempt(attempt_json(a));
        self.client.attest(self.provider.as_mut(), &mut observer)
    }

    /// Whether the provider's evidence proves nothing (`sample`).
    pub fn provider_insecure(&self) -> bool {
        self.provider.insecure()
    }

    /// Fetches one resource (for the `attest` dry run, which reports every resource).
    pub fn release(
        &mut self,
        uri: &ResourceUri,
        attempt: &mut dyn FnMut(Value),
    ) -> Result<kbs::Released, kbs::KbsError> {
        // The broker may ask for a fresh handshake (401): a new nonce, key and evidence.
        // Each is recorded with its exchange, so no key is released under an exchange the
        // audit log does not hold.
        let mut observer = AuditObserver {
            attempt,
            resource: Some(uri),
        };
        self.client
            .resource(uri, self.provider.as_mut(), &mut observer)
    }
}

/// Forwards the client's tries, and the handshakes a resource request runs, as JSON.
struct AuditObserver<'a, 'b> {
    attempt: &'a mut dyn FnMut(Value),
    /// The resource being fetched (`None` during `attest`, whose exchange the stage records).
    resource: Option<&'b ResourceUri>,
}

impl kbs::Observer for AuditObserver<'_, '_> {
    fn attempt(&mut self, attempt: &Attempt) {
        (self.attempt)(attempt_json(attempt));
    }

    fn attested(&mut self, attested: &kbs::Attested) {
        if let Some(uri) = self.resource {
            (self.attempt)(json!({
                "call": "re-attested",
                "resource": uri,
                "exchange": attested,
            }));
        }
    }
}

/// An attempt as an audit record's details.
pub fn attempt_json(attempt: &Attempt) -> Value {
    json!({
        "call": attempt.call,
        "try": attempt.try_no,
        "resource": attempt.resource,
        "outcome": attempt.outcome.to_string(),
        "will_retry": attempt.will_retry,
    })
}

impl KeyBroker for RealBroker {
    fn describe(&self) -> Value {
        json!({
            "tee": self.provider.tee(),
            "broker": self.client.url(),
            "provider": self.provider.describe(),
        })
    }

    fn insecure(&self) -> bool {
        self.provider.insecure()
    }

    fn attest(&mut self, attempt: &mut dyn FnMut(Value)) -> Result<Value, BrokerError> {
        let mut observer = |a: &Attempt| attempt(attempt_json(a));
        let attested = self
            .client
            .attest(self.provider.as_mut(), &mut observer)
            .map_err(|e| Box::new(e) as BrokerError)?;
        Ok(serde_json::to_value(&attested)?)
    }

    fn fetch(
        &mut self,
        uri: &ResourceUri,
        attempt: &mut dyn FnMut(Value),
    ) -> Result<Zeroizing<Vec<u8>>, BrokerError> {
        Ok(self.release(uri, attempt)?.into_bytes())
    }

    fn checkpoint(&mut self, binding: &[u8; 64]) -> Result<Value, BrokerError> {
        Ok(json!({
            "tee": self.provider.tee(),
            "evidence": self.provider.checkpoint(binding)?,
        }))
    }

    fn device_precheck(&mut self) -> Result<Option<Vec<tee::DeviceFacts>>, BrokerError> {
        Ok(self.provider.device_precheck()?)
    }

    fn set_devices_ready(&mut self, ready: bool) -> Result<Option<Value>, BrokerError> {
        Ok(self.provider.set_devices_ready(ready)?)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn loaded(gpu: &str) -> crate::policy::LoadedPolicy {
        let sim =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/nvidia-sim/gpu.json");
        let text = format!(
            "[workload]\nbundle = \"/opt/b\"\nsource = \"initramfs\"\nexec = [\"/opt/b/run\"]\nuser = 1000\ngroup = 1000\n\n[attestation]\ntee = \"sample\"\ninsecure_sample = true\nkbs = \"http://127.0.0.1:9\"\ninsecure_http = true\n\n[attestation.gpu]\nsimulate = {:?}\n{gpu}\n\n[network]\n",
            sim.display().to_string()
        );
        crate::policy::parse(&text, None, &crate::policy::MemoryUsers::new()).unwrap()
    }

    #[test]
    fn the_policys_gpus_are_wrapped_around_the_provider_and_reached_through_the_broker() {
        let loaded = loaded("count = 1");
        let provider = open_provider(&loaded.policy.attestation).unwrap().unwrap();
        assert_eq!(provider.tee(), "sample");
        assert!(provider.insecure());
        assert_eq!(provider.describe()["gpu"]["simulated"], true);
        let config = client_config(&loaded.policy.attestation).unwrap().unwrap();
        let mut broker = RealBroker::new(provider, config).unwrap();
        let events = broker.device_precheck().unwrap().unwrap();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].kind, crate::eventlog::EventKind::Gpu);
        let ready = broker.set_devices_ready(true).unwrap().unwrap();
        assert_eq!(ready["ready"], true);
        // A mismatch is the broker's error, naming the setting.
        let loaded = loaded_with_count(2);
        let provider = open_provider(&loaded.policy.attestation).unwrap().unwrap();
        let config = client_config(&loaded.policy.attestation).unwrap().unwrap();
        let mut broker = RealBroker::new(provider, config).unwrap();
        let error = broker.device_precheck().unwrap_err().to_string();
        assert!(error.contains("[attestation.gpu] count = 2"), "{error}");
    }

    fn loaded_with_count(count: u32) -> crate::policy::LoadedPolicy {
        loaded(&format!("count = {count}"))
    }

    #[test]
    fn without_gpus_the_provider_is_not_wrapped() {
        let text = "[workload]\nbundle = \"/opt/b\"\nsource = \"initramfs\"\nexec = [\"/opt/b/run\"]\nuser = 1000\ngroup = 1000\n\n[attestation]\ntee = \"sample\"\ninsecure_sample = true\nkbs = \"http://127.0.0.1:9\"\ninsecure_http = true\n\n[network]\n";
        let loaded = crate::policy::parse(text, None, &crate::policy::MemoryUsers::new()).unwrap();
        let mut provider = open_provider(&loaded.policy.attestation).unwrap().unwrap();
        assert!(provider.describe().get("gpu").is_none());
        assert!(provider.device_precheck().unwrap().is_none());
        assert!(provider.set_devices_ready(true).unwrap().is_none());
    }
}
