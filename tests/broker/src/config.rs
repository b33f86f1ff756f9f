//! Broker configuration: TOML-loadable, strict (unknown keys are errors), compiled into
//! checked values before the broker starts.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};
use zeroize::Zeroizing;

use crate::error::BrokerError;

/// The tee names the `/auth` endpoint accepts (kbs-types 0.18 `Tee`, serde names).
pub const KNOWN_TEES: &[&str] = &[
    "az-snp-vtpm",
    "az-tdx-vtpm",
    "nvidia",
    "sgx",
    "snp",
    "tdx",
    "cca",
    "csv",
    "se",
    "hygondcu",
    "nvidia-dpu",
    "nvidiadpu",
    "tpm",
    "sample",
    "sampledevice",
];

/// The tee types whose evidence this broker verifies (and so may name in a policy).
pub const VERIFIED_TEES: &[&str] = &["tpm", "sample"];

/// Whole broker configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerConfig {
    /// How long a session (cookie) lives after `/auth`, in seconds (Trustee default: 5 min).
    #[serde(default = "default_session_ttl")]
    pub session_ttl_secs: u64,
    /// How long an issued token is valid (`exp - iat`), in seconds.
    #[serde(default = "default_token_ttl")]
    pub token_ttl_secs: u64,
    /// AKs whose quotes earn `affirming`: exact `ak_public` strings (base64 SPKI DER).
    #[serde(default)]
    pub trusted_aks: Vec<String>,
    /// Reference values the attestation policy compares (Trustee's RVPS names): for `tpm`
    /// evidence `tpm_pcrNN` (NN = 00..23, e.g. `tpm_pcr11`, `tpm_pcr15`) = a list of accepted
    /// SHA-256 hex values. Every one listed must match for `executables` = 3; see the
    /// README's "Attestation policy".
    #[serde(default)]
    pub reference_values: BTreeMap<String, Vec<String>>,
    /// Whether `sample` evidence is verified at all (never in a real deployment).
    #[serde(default)]
    pub allow_sample: bool,
    /// Resources by `repo/type/tag`.
    #[serde(default)]
    pub resources: BTreeMap<String, ResourceConfig>,
    /// Serve HTTPS with this certificate and key instead of plain HTTP.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Fault injection for client tests.
    #[serde(default)]
    pub faults: Faults,
    /// Print one line per request to stderr (the binary turns this on).
    #[serde(default)]
    pub log_requests: bool,
    /// The admin API (`POST` reference values, policies, resources), off when absent. When
    /// on, the broker behaves as a Trustee whose attestation policy is the default CPU one
    /// (plus a posted `default_cpu` policy): `tpm` evidence needs `tpm_pcr11` registered
    /// and an AK in `trusted_aks`.
    #[serde(default)]
    pub admin: Option<crate::admin::AdminConfig>,
    /// NVIDIA GPU additional evidence: extra roots and the config-policy GPU rules.
    #[serde(default)]
    pub nvidia: NvidiaConfig,
}

/// The `[nvidia]` section. GPU evidence is always verified against NVIDIA's pinned device
/// root; these keys add test roots and the GPU rules every `[resources]` policy applies.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NvidiaConfig {
    /// PEM files whose certificates a GPU chain may also end at (test roots for a simulated
    /// GPU; relative paths: to the config file's folder). Default: none.
    #[serde(default)]
    pub extra_roots: Vec<PathBuf>,
    /// Every `[resources]` policy requires at least this many verified GPUs (`gpu0`, …).
    #[serde(default)]
    pub require_gpus: usize,
    /// Every GPU's `driver_version` must be at least this, compared as dotted numbers
    /// (`"550.90"`: 550.90.07 and 550.100.1 pass, 535.86.09 fails).
    #[serde(default)]
    pub min_driver: Option<String>,
}

fn default_session_ttl() -> u64 {
    300
}

fn default_token_ttl() -> u64 {
    300
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            session_ttl_secs: default_session_ttl(),
            token_ttl_secs: default_token_ttl(),
            trusted_aks: Vec::new(),
            reference_values: BTreeMap::new(),
            allow_sample: false,
            resources: BTreeMap::new(),
            tls: None,
            faults: Faults::default(),
            log_requests: false,
            admin: None,
            nvidia: NvidiaConfig::default(),
        }
    }
}

/// One resource: its value and the policy that releases it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourceConfig {
    /// The value, written as hex in TOML. Exactly one of `value` and `value_file`.
    #[serde(default)]
    pub value: Option<SecretBytes>,
    /// A file whose raw bytes are the value (relative paths: to the config file's folder).
    #[serde(default)]
    pub value_file: Option<PathBuf>,
    /// Who may have it.
    pub policy: ResourcePolicy,
}

impl ResourceConfig {
    /// A resource with an inline value.
    pub fn new(value: &[u8], policy: ResourcePolicy) -> Self {
        ResourceConfig {
            value: Some(SecretBytes::new(value.to_vec())),
            value_file: None,
            policy,
        }
    }
}

/// The release policy of one resource, evaluated against the token's claims.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourcePolicy {
    /// Tee types allowed (`"tpm"`, `"sample"`); the token's tee must be one of them.
    pub tees: Vec<String>,
    /// Expected SHA-256 PCR values by index (`"15" = "<64 hex>"`); only a `tpm` token has PCRs.
    #[serde(default)]
    pub pcrs: BTreeMap<String, String>,
    /// The weakest `ear.status` accepted.
    #[serde(default)]
    pub require: RequiredStatus,
}

impl ResourcePolicy {
    /// A policy for the given tees, no PCRs, the given status.
    pub fn new(tees: &[&str], require: RequiredStatus) -> Self {
        ResourcePolicy {
            tees: tees.iter().map(|t| t.to_string()).collect(),
            pcrs: BTreeMap::new(),
            require,
        }
    }

    /// The same policy also requiring PCR `index` to equal `hex_sha256`.
    pub fn with_pcr(mut self, index: u8, hex_sha256: &str) -> Self {
        self.pcrs.insert(index.to_string(), hex_sha256.to_string());
        self
    }
}

/// The weakest `ear.status` a resource accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RequiredStatus {
    /// Only `affirming` (verified evidence and a trusted AK).
    #[default]
    Affirming,
    /// `affirming` or `warning` (untrusted AK, or sample evidence).
    Warning,
}

/// TLS certificate chain and private key (PEM files).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// Fault injection for client tests. All off by default.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Faults {
    /// Flip one bit of every JWE ciphertext (the client's AES-GCM open must fail).
    pub tamper_jwe: bool,
    /// Sessions are expired as soon as they are made (`/attest` answers "session expired").
    pub expire_sessions_immediately: bool,
    /// Tokens are issued already expired (`exp == iat - 1`): resource requests fail with
    /// `TokenVerifierError`.
    pub expire_tokens_immediately: bool,
    /// Answer the first N requests (any endpoint) with 503 and a plain-text body.
    pub fail_first_n: u32,
    /// Wait this long before answering each request (client timeout tests).
    pub delay_ms: u64,
    /// Answer `/auth` with this nonce instead of a fresh random one (a client's bounds and
    /// character checks; the session still expects it back).
    pub nonce: Option<String>,
    /// Answer a policy denial with this `detail` instead of Trustee's "Access denied by
    /// policy" (a client's escaping of broker text).
    pub deny_detail: Option<String>,
}

/// Bytes that are a secret: zeroized on drop, redacted in Debug, written as hex in TOML.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretBytes(Zeroizing<Vec<u8>>);

impl SecretBytes {
    /// Wrap bytes.
    pub fn new(bytes: Vec<u8>) -> Self {
        SecretBytes(Zeroizing::new(bytes))
    }

    /// The bytes.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretBytes(<{} bytes redacted>)", self.0.len())
    }
}

impl<'de> Deserialize<'de> for SecretBytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = Zeroizing::new(String::deserialize(d)?);
        let bytes = hex::decode(text.trim()).map_err(|_| {
            serde::de::Error::custom("a resource value must be hex (or use value_file)")
        })?;
        Ok(SecretBytes::new(bytes))
    }
}

impl BrokerConfig {
    /// Parse TOML text. Relative `value_file`/TLS paths stay relative to the working folder.
    pub fn from_toml_str(text: &str) -> Result<Self, BrokerError> {
        toml::from_str(text).map_err(|source| BrokerError::ParseConfig {
            origin: "<string>".to_string(),
            source,
        })
    }

    /// Read and parse a TOML file; relative `value_file` and TLS paths are resolved against
    /// the file's folder.
    pub fn from_toml_file(path: &Path) -> Result<Self, BrokerError> {
        let text = std::fs::read_to_string(path).map_err(|source| BrokerError::ReadConfig {
            path: path.to_path_buf(),
            source,
        })?;
        let mut config: BrokerConfig =
            toml::from_str(&text).map_err(|source| BrokerError::ParseConfig {
                origin: path.display().to_string(),
                source,
            })?;
        let base = path.parent().unwrap_or(Path::new("."));
        for resource in config.resources.values_mut() {
            if let Some(file) = resource.value_file.as_mut() {
                if file.is_relative() {
                    *file = base.join(&*file);
                }
            }
        }
        if let Some(admin) = config.admin.as_mut() {
            if admin.public_key.is_relative() {
                admin.public_key = base.join(&admin.public_key);
            }
        }
        for root in config.nvidia.extra_roots.iter_mut() {
            if root.is_relative() {
                *root = base.join(&*root);
            }
        }
        if let Some(tls) = config.tls.as_mut() {
            if tls.cert.is_relative() {
                tls.cert = base.join(&tls.cert);
            }
            if tls.key.is_relative() {
                tls.key = base.join(&tls.key);
            }
        }
        Ok(config)
    }

    /// Register reference value `name` (e.g. `tpm_pcr15`) with the given accepted hex
    /// values; convenient for tests.
    pub fn with_reference_value(mut self, name: &str, values: &[&str]) -> Self {
        self.reference_values.insert(
            name.to_string(),
            values.iter().map(|v| v.to_string()).collect(),
        );
        self
    }

    /// Add (or replace) a resource; convenient for tests.
    pub fn with_resource(mut self, path: &str, value: &[u8], policy: ResourcePolicy) -> Self {
        self.resources
            .insert(path.to_string(), ResourceConfig::new(value, policy));
        self
    }

    /// Check and convert every value; reads value files. Called by `Broker::start`.
    pub(crate) fn compile(&self) -> Result<Compiled, BrokerError> {
        let mut errors = Vec::new();
        let mut resources = BTreeMap::new();
        for (path, resource) in &self.resources {
            if let Err(why) = check_resource_path(path) {
                errors.push(format!(
                    "resource key {path:?} is not repo/type/tag with segments matching \
                     [a-zA-Z0-9_-][a-zA-Z0-9_.-]*: {why}"
                ));
                continue;
            }
            let value = match (&resource.value, &resource.value_file) {
                (Some(v), None) => v.clone(),
                (None, Some(file)) => match std::fs::read(file) {
                    Ok(bytes) => SecretBytes::new(bytes),
                    Err(source) => {
                        return Err(BrokerError::ReadResource {
                            resource: path.clone(),
                            path: file.clone(),
                            source,
                        })
                    }
                },
                _ => {
                    errors.push(format!(
                        "resource {path}: give exactly one of `value` (hex) and `value_file`"
                    ));
                    continue;
                }
            };
            match compile_policy(path, &resource.policy) {
                Ok(policy) => {
                    resources.insert(path.clone(), CompiledResource { value, policy });
                }
                Err(mut more) => errors.append(&mut more),
            }
        }
        for ak in &self.trusted_aks {
            if base64_std_decode(ak).is_none() {
                errors.push(format!(
                    "trusted_aks entry {ak:?} is not standard base64 (give the exact ak_public \
                     string the client reports)"
                ));
            }
        }
        let mut reference_pcrs = BTreeMap::new();
        for (name, values) in &self.reference_values {
            let index = name
                .strip_prefix("tpm_pcr")
                .filter(|n| n.len() <= 2 && n.chars().all(|c| c.is_ascii_digit()))
                .and_then(|n| n.parse::<u8>().ok())
                .filter(|i| *i < 24);
            let Some(index) = index else {
                errors.push(format!(
                    "reference value {name:?} is not one this broker's attestation policy reads                      (tpm_pcr0 .. tpm_pcr23)"
                ));
                continue;
            };
            let mut accepted = Vec::new();
            for value in values {
                match hex::decode(value) {
                    Ok(bytes) if bytes.len() == 32 => {
                        let mut digest = [0u8; 32];
                        digest.copy_from_slice(&bytes);
                        accepted.push(digest);
                    }
                    _ => errors.push(format!(
                        "reference value {name} entry {value:?} is not 64 hex digits (a SHA-256 value)"
                    )),
                }
            }
            if values.is_empty() {
                errors.push(format!(
                    "reference value {name} lists no value (nothing could match)"
                ));
            }
            reference_pcrs.insert(index, accepted);
        }
        if self.session_ttl_secs == 0 {
            errors.push(
                "session_ttl_secs must be > 0 (use faults.expire_sessions_immediately)".to_string(),
            );
        }
        if self.token_ttl_secs == 0 {
            errors.push(
                "token_ttl_secs must be > 0 (use faults.expire_tokens_immediately)".to_string(),
            );
        }
        let admin = match &self.admin {
            Some(admin) => match admin.compile() {
                Ok(admin) => Some(admin),
                Err(why) => {
                    errors.push(why);
                    None
                }
            },
            None => None,
        };
        let nvidia = match self.nvidia.compile() {
            Ok(nvidia) => Some(nvidia),
            Err(mut more) => {
                errors.append(&mut more);
                None
            }
        };
        let (Some(nvidia), true) = (nvidia, errors.is_empty()) else {
            return Err(BrokerError::InvalidConfig(errors.join("; ")));
        };
        Ok(Compiled {
            session_ttl: Duration::from_secs(self.session_ttl_secs),
            token_ttl_secs: self.token_ttl_secs,
            trusted_aks: self.trusted_aks.iter().cloned().collect(),
            reference_pcrs,
            allow_sample: self.allow_sample,
            resources,
            faults: self.faults.clone(),
            log_requests: self.log_requests,
            admin,
            nvidia,
        })
    }
}

fn base64_std_decode(text: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(text).ok()
}

fn compile_policy(path: &str, policy: &ResourcePolicy) -> Result<CompiledPolicy, Vec<String>> {
    let mut errors = Vec::new();
    if policy.tees.is_empty() {
        errors.push(format!(
            "resource {path}: policy.tees is empty; name the tees allowed (tpm, sample)"
        ));
    }
    for tee in &policy.tees {
        if !VERIFIED_TEES.contains(&tee.as_str()) {
            errors.push(format!(
                "resource {path}: policy tee {tee:?} is not one this broker verifies \
                 (use one of {VERIFIED_TEES:?})"
            ));
        }
    }
    let mut pcrs = BTreeMap::new();
    for (index, value) in &policy.pcrs {
        let idx = match index.parse::<u8>() {
            Ok(i) if i < 24 => i,
            _ => {
                errors.push(format!(
                    "resource {path}: PCR index {index:?} is not a number from 0 to 23"
                ));
                continue;
            }
        };
        match hex::decode(value) {
            Ok(bytes) if bytes.len() == 32 => {
                let mut digest = [0u8; 32];
                digest.copy_from_slice(&bytes);
                pcrs.insert(idx, digest);
            }
            _ => errors.push(format!(
                "resource {path}: PCR {idx} value {value:?} is not 64 hex digits (a SHA-256 value)"
            )),
        }
    }
    if !pcrs.is_empty() && !policy.tees.iter().all(|t| t == "tpm") {
        errors.push(format!(
            "resource {path}: a policy with pcrs can only allow tees = [\"tpm\"] \
             (other evidence carries no PCRs)"
        ));
    }
    if errors.is_empty() {
        Ok(CompiledPolicy {
            tees: policy.tees.clone(),
            pcrs,
            require: policy.require,
        })
    } else {
        Err(errors)
    }
}

/// Check one `repo/type/tag` path: three segments matching `[a-zA-Z0-9_-][a-zA-Z0-9_.-]*`.
pub fn check_resource_path(path: &str) -> Result<(), String> {
    let segments: Vec<&str> = path.split('/').collect();
    if segments.len() != 3 {
        return Err(format!("{} segments instead of 3", segments.len()));
    }
    for segment in segments {
        check_segment(segment)?;
    }
    Ok(())
}

fn check_segment(segment: &str) -> Result<(), String> {
    let mut chars = segment.chars();
    let Some(first) = chars.next() else {
        return Err("empty segment".to_string());
    };
    if !(first.is_ascii_alphanumeric() || first == '_' || first == '-') {
        return Err(format!("segment {segment:?} starts with {first:?}"));
    }
    if let Some(bad) = chars.find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')))
    {
        return Err(format!("segment {segment:?} contains {bad:?}"));
    }
    Ok(())
}

/// Checked configuration the running broker uses.
#[derive(Debug)]
pub(crate) struct Compiled {
    pub(crate) session_ttl: Duration,
    pub(crate) token_ttl_secs: u64,
    pub(crate) trusted_aks: HashSet<String>,
    /// `tpm_pcrNN` reference values by PCR index.
    pub(crate) reference_pcrs: BTreeMap<u8, Vec<[u8; 32]>>,
    pub(crate) allow_sample: bool,
    pub(crate) resources: BTreeMap<String, CompiledResource>,
    pub(crate) faults: Faults,
    pub(crate) log_requests: bool,
    pub(crate) admin: Option<crate::admin::CompiledAdmin>,
    pub(crate) nvidia: CompiledNvidia,
}

/// The checked `[nvidia]` section.
#[derive(Debug)]
pub(crate) struct CompiledNvidia {
    pub(crate) roots: crate::nvidia::Roots,
    pub(crate) require_gpus: usize,
    pub(crate) min_driver: Option<String>,
}

impl NvidiaConfig {
    fn compile(&self) -> Result<CompiledNvidia, Vec<String>> {
        let mut errors = Vec::new();
        let mut roots = match crate::nvidia::Roots::nvidia() {
            Ok(roots) => roots,
            Err(why) => return Err(vec![why]),
        };
        for path in &self.extra_roots {
            let name = format!("extra root {}", path.display());
            match std::fs::read(path) {
                Ok(pem) => match roots.clone().with_extra(&name, &pem) {
                    Ok(more) => roots = more,
                    Err(why) => errors.push(format!("nvidia.extra_roots: {why}")),
                },
                Err(e) => errors.push(format!(
                    "nvidia.extra_roots: cannot read {}: {e}",
                    path.display()
                )),
            }
        }
        if let Some(min) = &self.min_driver {
            if crate::nvidia::compare_dotted(min, min).is_none() {
                errors.push(format!(
                    "nvidia.min_driver {min:?} is not a dotted decimal version (e.g. \"550.90\")"
                ));
            }
        }
        if errors.is_empty() {
            Ok(CompiledNvidia {
                roots,
                require_gpus: self.require_gpus,
                min_driver: self.min_driver.clone(),
            })
        } else {
            Err(errors)
        }
    }
}

#[derive(Debug)]
pub(crate) struct CompiledResource {
    pub(crate) value: SecretBytes,
    pub(crate) policy: CompiledPolicy,
}

#[derive(Debug, Clone)]
pub(crate) struct CompiledPolicy {
    pub(crate) tees: Vec<String>,
    pub(crate) pcrs: BTreeMap<u8, [u8; 32]>,
    pub(crate) require: RequiredStatus,
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    const PCR: &str = "3d458cfe55cc03ea1f443f1562beec8df51c75e14a9fcf9a7234a13f198e7969";

    #[test]
    fn toml_with_hex_value_and_pcrs_compiles() {
        let cfg = BrokerConfig::from_toml_str(&format!(
            r#"
            session_ttl_secs = 60
            trusted_aks = ["AAAA"]
            allow_sample = true
            [resources."default/key/volume"]
            value = "00ff10"
            policy = {{ tees = ["tpm"], pcrs = {{ "15" = "{PCR}" }}, require = "affirming" }}
            [faults]
            fail_first_n = 2
            "#
        ))
        .unwrap();
        let compiled = cfg.compile().unwrap();
        let res = &compiled.resources["default/key/volume"];
        assert_eq!(res.value.expose(), &[0x00, 0xff, 0x10]);
        assert_eq!(hex::encode(res.policy.pcrs[&15]), PCR);
        assert_eq!(compiled.faults.fail_first_n, 2);
        assert_eq!(compiled.session_ttl, Duration::from_secs(60));
        // the secret never shows in Debug
        assert!(!format!("{cfg:?}").contains("00ff10"));
        assert!(format!("{cfg:?}").contains("redacted"));
    }

    #[test]
    fn value_file_is_relative_to_the_config_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("secret.bin"), b"raw key bytes").unwrap();
        let cfg_path = dir.path().join("broker.toml");
        std::fs::write(
            &cfg_path,
            r#"
            [resources."r/t/tag"]
            value_file = "secret.bin"
            policy = { tees = ["sample"], require = "warning" }
            "#,
        )
        .unwrap();
        let cfg = BrokerConfig::from_toml_file(&cfg_path).unwrap();
        let compiled = cfg.compile().unwrap();
        assert_eq!(
            compiled.resources["r/t/tag"].value.expose(),
            b"raw key bytes"
        );
    }

    #[test]
    fn nvidia_section_reads_roots_relative_to_the_file_and_checks_its_values() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("gpu-root.pem"),
            crate::nvidia::NVIDIA_DEVICE_ROOT_PEM,
        )
        .unwrap();
        let cfg_path = dir.path().join("broker.toml");
        std::fs::write(
            &cfg_path,
            "[nvidia]\nextra_roots = [\"gpu-root.pem\"]\nrequire_gpus = 2\nmin_driver = \"550.90\"\n",
        )
        .unwrap();
        let cfg = BrokerConfig::from_toml_file(&cfg_path).unwrap();
        assert_eq!(
            cfg.nvidia.extra_roots,
            vec![dir.path().join("gpu-root.pem")]
        );
        let compiled = cfg.compile().unwrap();
        assert_eq!(compiled.nvidia.require_gpus, 2);
        assert_eq!(compiled.nvidia.min_driver.as_deref(), Some("550.90"));
        // defaults: NVIDIA's root only, no GPU rule
        let plain = BrokerConfig::default().compile().unwrap();
        assert_eq!(plain.nvidia.require_gpus, 0);
        assert!(plain.nvidia.min_driver.is_none());

        let bad = BrokerConfig::from_toml_str(
            "[nvidia]\nextra_roots = [\"/nonexistent/root.pem\"]\nmin_driver = \"550.x\"\n",
        )
        .unwrap();
        let msg = bad.compile().unwrap_err().to_string();
        for needle in ["/nonexistent/root.pem", "\"550.x\""] {
            assert!(msg.contains(needle), "missing {needle:?} in {msg}");
        }
        let err = BrokerConfig::from_toml_str("[nvidia]\nrequire_gpu = 1").unwrap_err();
        assert!(format!("{err:?}").contains("require_gpu"));
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let err = BrokerConfig::from_toml_str("sesion_ttl_secs = 3").unwrap_err();
        assert!(format!("{:?}", err).contains("sesion_ttl_secs"));
        let err = BrokerConfig::from_toml_str("[faults]\ntamper = true").unwrap_err();
        assert!(format!("{:?}", err).contains("tamper"));
    }

    #[test]
    fn bad_values_are_all_reported() {
        let cfg = BrokerConfig::from_toml_str(&format!(
            r#"
            trusted_aks = ["not base64!"]
            [resources."a/b"]
            value = "00"
            policy = {{ tees = ["tpm"] }}
            [resources."a/b/c"]
            value = "00"
            value_file = "x"
            policy = {{ tees = ["tpm"] }}
            [resources."a/b/d"]
            value = "00"
            policy = {{ tees = ["snp"], pcrs = {{ "24" = "{PCR}", "1" = "abc" }} }}
            [resources."a/b/e"]
            value = "00"
            policy = {{ tees = ["sample"], pcrs = {{ "1" = "{PCR}" }} }}
            "#
        ))
        .unwrap();
        let msg = cfg.compile().unwrap_err().to_string();
        for needle in [
            "\"a/b\"",
            "exactly one of",
            "\"snp\"",
            "\"24\"",
            "PCR 1 value",
            "not standard base64",
            "only allow tees",
        ] {
            assert!(msg.contains(needle), "missing {needle:?} in {msg}");
        }
    }

    #[test]
    fn hex_value_must_be_hex() {
        let err = BrokerConfig::from_toml_str(
            "[resources.\"a/b/c\"]\nvalue = \"zz\"\npolicy = { tees = [\"tpm\"] }",
        )
        .unwrap_err();
        assert!(format!("{err:?}").contains("must be hex"));
    }

    #[test]
    fn resource_path_segments_follow_trustee() {
        for ok in [
            "default/1/2",
            "123--_default/1Abff-_/___-afds44BC",
            "1.ok/2ok./3...",
        ] {
            assert!(check_resource_path(ok).is_ok(), "{ok}");
        }
        for bad in [
            "/1/2",
            "1/2",
            ".1.ok/2ok./3...",
            "1.ok/.2ok./3...",
            "1.ok/2ok./.3...",
            "a/b/c/d",
            "a/b/c%20",
            "a//c",
        ] {
            assert!(check_resource_path(bad).is_err(), "{bad}");
        }
    }
}
