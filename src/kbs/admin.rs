//! The Trustee KBS admin API, as a model owner uses it: the reference values, the rego
//! additions and the resources one workload needs (`cvm-warden reference-values --format
//! trustee` prints them; `cvm-warden broker register` posts them with an Ed25519 admin JWT).
//!
//! Shapes as checked against a real Trustee (see `../shared/KBS-PROTOCOL.md`, "Administering
//! a real Trustee KBS"): `POST /kbs/v0/reference-value` with `{"version": "0.1.0", "type":
//! "sample", "payload": b64(JSON {name: [values]})}`; `POST /kbs/v0/resource-policy` with
//! `{"policy": b64url(rego)}`; `POST /kbs/v0/attestation-policy` with `{"policy_id":
//! "default_cpu", "policy": b64url(rego)}`; `POST /kbs/v0/resource/<repo>/<type>/<tag>` with
//! the raw bytes. The admin token is a JWT signed with EdDSA (Ed25519) whose `iss`/`aud` an
//! identity provider of the KBS accepts and whose `role` its ACL maps to the endpoints.

use std::time::Duration;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use serde_json::{json, Value};
use zeroize::Zeroizing;

use super::transport::{HttpResponse, HttpTransport, TransportError};

/// `POST` target of reference values.
pub const REFERENCE_VALUE_PATH: &str = "/kbs/v0/reference-value";
/// `POST` target of the (one, global) resource policy.
pub const RESOURCE_POLICY_PATH: &str = "/kbs/v0/resource-policy";
/// `POST` target of an attestation policy.
pub const ATTESTATION_POLICY_PATH: &str = "/kbs/v0/attestation-policy";
/// The attestation policy Trustee applies to CPU evidence by default.
pub const DEFAULT_CPU_POLICY_ID: &str = "default_cpu";
/// The rego line that makes Trustee's default CPU policy read PCR 15 (added to its
/// `executables := 3 if { input.tpm … }` rule).
pub const PCR15_POLICY_LINE: &str = "input.tpm.pcr15 in query_reference_value(\"tpm_pcr15\")";
/// The name of the set of resources in the resource policy cvm-warden writes.
pub const RESOURCE_SET: &str = "cvm_warden_resources";

/// Why an admin step failed. Never holds the admin key or the token.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The admin key file is not an Ed25519 private key.
    #[error("admin key {path}: {detail}; give the PEM (PKCS#8) Ed25519 private key whose public key the KBS's [admin] identity provider trusts (e.g. `openssl genpkey -algorithm ed25519`)")]
    Key {
        /// The file.
        path: String,
        /// What is wrong (never the key).
        detail: String,
    },
    /// A value to register is malformed.
    #[error("{what}: {detail}")]
    Value {
        /// The value's name.
        what: String,
        /// What is wrong and what to do.
        detail: String,
    },
    /// The KBS could not be reached.
    #[error(
        "registering {what} at the KBS failed: {source}; check --kbs, --kbs-ca and the network"
    )]
    Transport {
        /// The step.
        what: String,
        /// The transport error.
        #[source]
        source: TransportError,
    },
    /// The KBS refused a step.
    #[error("the KBS refused {what} (POST {path}: HTTP {status}{detail}); {hint}")]
    Refused {
        /// The step.
        what: String,
        /// The endpoint.
        path: String,
        /// The status.
        status: u16,
        /// `: <the broker's words>` when it said something.
        detail: String,
        /// What to do.
        hint: &'static str,
    },
}

/// What one workload needs registered at a Trustee KBS.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrusteeValues {
    /// What the values are for (the bundle digest), for the rego comment.
    pub policy: String,
    /// SHA-256 PCR 15 after the measure stage (hex), for `tpm` evidence.
    pub tpm_pcr15: Option<String>,
    /// SHA-256 PCR 15 while the workload runs (hex): what every re-attestation quotes when
    /// `attestation.reattest_interval` is on (`reference-values`' `tpm.reattest_value`).
    /// Registered in `tpm_pcr15` beside the boot's value, and its resources bound to either.
    pub tpm_pcr15_running: Option<String>,
    /// SHA-256 PCR 11 (hex), when the owner knows what the boot chain leaves there.
    pub tpm_pcr11: Option<String>,
    /// The attestation keys accepted: base64 (standard) of their SPKI DER.
    pub trusted_aks: Vec<String>,
    /// The SEV-SNP launch measurement (hex, 48 bytes), for `snp` evidence.
    pub snp_launch_measurement: Option<String>,
    /// The resources the policy fetches (`repo/type/tag`).
    pub resources: Vec<String>,
    /// GPUs the workload's evidence carries (`[attestation.gpu]`: `count`, else 1 when
    /// `required`): the resource policy requires a `gpuN` verdict of the broker for each.
    pub gpus: u32,
    /// What the owner must still supply (printed with the values).
    pub warnings: Vec<String>,
}

/// One admin call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminRequest {
    /// What it registers, for messages.
    pub what: String,
    /// The endpoint.
    pub path: String,
    /// The JSON body.
    pub body: Value,
}

impl AdminRequest {
    fn to_json(&self) -> Value {
        json!({ "what": self.what, "method": "POST", "path": self.path, "body": self.body })
    }
}

fn check_hex(what: &str, value: &str, bytes: usize) -> Result<String, AdminError> {
    let lower = value.trim().to_ascii_lowercase();
    if lower.len() != bytes * 2 || !lower.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(AdminError::Value {
            what: what.to_string(),
            detail: format!(
                "{value:?} is not {bytes} bytes of hex ({} hex digits)",
                bytes * 2
            ),
        });
    }
    Ok(lower)
}

impl TrusteeValues {
    /// Checks every value's shape (PCRs 32 bytes of hex, the SNP measurement 48, AKs
    /// base64) and lowers the hex, as Trustee's verifiers print it.
    pub fn checked(mut self) -> Result<Self, AdminError> {
        if let Some(pcr) = &self.tpm_pcr15 {
            self.tpm_pcr15 = Some(check_hex("tpm_pcr15", pcr, 32)?);
        }
        if let Some(pcr) = &self.tpm_pcr15_running {
            if self.tpm_pcr15.is_none() {
                return Err(AdminError::Value {
                    what: "tpm_pcr15".to_string(),
                    detail: "a running value without the boot's value".to_string(),
                });
            }
            self.tpm_pcr15_running = Some(check_hex("tpm_pcr15", pcr, 32)?);
        }
        if let Some(pcr) = &self.tpm_pcr11 {
            self.tpm_pcr11 = Some(check_hex("tpm_pcr11", pcr, 32)?);
        }
        if let Some(m) = &self.snp_launch_measurement {
            self.snp_launch_measurement = Some(check_hex("snp_launch_measurement", m, 48)?);
        }
        for ak in &self.trusted_aks {
            if STANDARD.decode(ak).is_err() {
                return Err(AdminError::Value {
                    what: "trusted_aks".to_string(),
                    detail: format!("{ak:?} is not standard base64 of an SPKI DER"),
                });
            }
        }
        Ok(self)
    }

    /// The reference values as `(name, values)`, in registration order.
    pub fn reference_values(&self) -> Vec<(&'static str, Vec<String>)> {
        let mut out = Vec::new();
        if let Some(pcr) = &self.tpm_pcr15 {
            out.push(("tpm_pcr15", self.pcr15_values(pcr)));
        }
        if let Some(pcr) = &self.tpm_pcr11 {
            out.push(("tpm_pcr11", vec![pcr.clone()]));
        }
        if !self.trusted_aks.is_empty() {
            out.push(("trusted_aks", self.trusted_aks.clone()));
        }
        if let Some(m) = &self.snp_launch_measurement {
            out.push(("snp_launch_measurement", vec![m.clone()]));
        }
        out
    }

    /// The workload's PCR 15 values: the boot's, then the running one (when re-attesting).
    fn pcr15_values(&self, boot: &str) -> Vec<String> {
        let mut values = vec![boot.to_string()];
        if let Some(running) = &self.tpm_pcr15_running {
            if running != boot {
                values.push(running.clone());
            }
        }
        values
    }

    /// The rego of the resource policy for this workload alone ([`resource_policy_rego`]).
    pub fn resource_policy_rego(&self) -> String {
        resource_policy_rego(std::slice::from_ref(self))
    }

    /// Every admin call these values make, in order: one reference value per name, then
    /// the resource policy ([`merged_requests`] of this workload alone).
    pub fn requests(&self) -> Vec<AdminRequest> {
        merged_requests(std::slice::from_ref(self))
    }

    /// Reads back what [`TrusteeValues::to_json`] printed: the reference values, the
    /// resources and the label. `Err` names what is missing or malformed.
    pub fn from_json(value: &Value) -> Result<TrusteeValues, AdminError> {
        let bad = |detail: String| AdminError::Value {
            what: "values file".to_string(),
            detail: format!(
                "{detail}; give what `cvm-warden reference-values --format trustee` printed"
            ),
        };
        if value["format"] != "trustee" {
            return Err(bad(format!(
                "\"format\" is {}, not \"trustee\"",
                value["format"]
            )));
        }
        let refs = value["reference_values"]
            .as_object()
            .ok_or_else(|| bad("no reference_values object".to_string()))?;
        let mut out = TrusteeValues {
            policy: value["workload"]
                .as_str()
                .unwrap_or("(unnamed)")
                .to_string(),
            ..TrusteeValues::default()
        };
        for (name, values) in refs {
            let list: Vec<String> = values
                .as_array()
                .and_then(|l| l.iter().map(|v| v.as_str().map(str::to_string)).collect())
                .ok_or_else(|| bad(format!("reference value {name} is not a list of strings")))?;
            let one = || -> Result<String, AdminError> {
                match list.as_slice() {
                    [one] => Ok(one.clone()),
                    _ => Err(bad(format!(
                        "reference value {name} must hold exactly one value"
                    ))),
                }
            };
            match name.as_str() {
                // The boot's value, then (re-attesting workloads) the running one.
                "tpm_pcr15" => match list.as_slice() {
                    [boot] => out.tpm_pcr15 = Some(boot.clone()),
                    [boot, running] => {
                        out.tpm_pcr15 = Some(boot.clone());
                        out.tpm_pcr15_running = Some(running.clone());
                    }
                    _ => {
                        return Err(bad(format!(
                            "reference value {name} must hold one value (PCR 15 after the measure stage) or two (then PCR 15 while the workload runs)"
                        )))
                    }
                },
                "tpm_pcr11" => out.tpm_pcr11 = Some(one()?),
                "snp_launch_measurement" => out.snp_launch_measurement = Some(one()?),
                "trusted_aks" => out.trusted_aks = list,
                other => return Err(bad(format!("unknown reference value {other:?}"))),
            }
        }
        out.gpus = match &value["gpus"] {
            Value::Null => 0,
            n => n
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .filter(|n| *n <= 64)
                .ok_or_else(|| bad(format!("\"gpus\" is {n}, not a number of GPUs (0-64)")))?,
        };
        out.resources = value["resource_policy"]["resources"]
            .as_array()
            .and_then(|l| l.iter().map(|v| v.as_str().map(str::to_string)).collect())
            .ok_or_else(|| bad("no resource_policy.resources list".to_string()))?;
        out.checked()
    }

    /// What `reference-values --format trustee` prints.
    pub fn to_json(&self) -> Value {
        let values: serde_json::Map<String, Value> = self
            .reference_values()
            .into_iter()
            .map(|(name, values)| (name.to_string(), json!(values)))
            .collect();
        let mut lines = Vec::new();
        if self.tpm_pcr15.is_some() {
            lines.push(PCR15_POLICY_LINE);
        }
        json!({
            "format": "trustee",
            "workload": self.policy,
            "kbs_protocol": super::PROTOCOL_VERSION,
            "gpus": self.gpus,
            "reference_values": values,
            "attestation_policy": {
                "policy_id": DEFAULT_CPU_POLICY_ID,
                "add_to_rule": "executables := 3 if { input.tpm ... }",
                "lines": lines,
                "note": "Trustee's default CPU policy does not read PCR 15: add these lines to its tpm executables rule and post the whole policy (`broker register --attestation-policy FILE`), or the registered tpm_pcr15 is never compared",
            },
            "resource_policy": {
                "resources": self.resources,
                "rego": self.resource_policy_rego(),
                "note": "a KBS has one resource policy: posting this one replaces it (`broker register --replace-resource-policy`); merge it by hand when the KBS serves other workloads",
            },
            "requests": self.requests().iter().map(AdminRequest::to_json).collect::<Vec<_>>(),
            "warnings": self.warnings,
        })
    }
}

/// The claim a workload's resources are bound to in the resource policy: PCR 15 as the
/// token's annotated `tpm` evidence carries it (the attestation policy's input).
const PCR15_CLAIM: &str = "input.submods.cpu0[\"ear.veraison.annotated-evidence\"].tpm.pcr15";

/// The rego of one resource policy for `workloads` (a KBS has one): per workload, a set of
/// its resources and a rule releasing them only to a token whose every CPU/TEE submodule is
/// `affirming`, whose CPU `executables` claim is 3, — for `tpm` — whose PCR 15 is that
/// workload's (at boot, or while it runs when it re-attests), so one site's attested VM
/// cannot fetch another site's keys, and — with GPUs — that has the broker's verdict on each
/// GPU (`gpuN`; Trustee's local NVIDIA verifier never scores a GPU `affirming`, so GPU
/// submodules are left out of the affirming check and their presence is required instead).
pub fn resource_policy_rego(workloads: &[TrusteeValues]) -> String {
    let mut rego = String::from("package policy\n\nimport rego.v1\n\ndefault allow := false\n");
    for (n, workload) in workloads.iter().enumerate() {
        let mut resources: Vec<&String> = workload.resources.iter().collect();
        resources.sort();
        resources.dedup();
        if resources.is_empty() {
            continue;
        }
        let set = format!("{RESOURCE_SET}_{n}");
        rego.push_str(&format!(
            "\n# cvm-warden: the resources of the workload of {}\n{set} := {{\n",
            workload.policy.replace('\n', " ")
        ));
        for resource in resources {
            rego.push_str(&format!("\t\"{resource}\",\n"));
        }
        rego.push_str("}\n");
        // One rule per PCR 15 value the workload may show (rego ORs rules): at boot, and
        // while it runs when it re-attests.
        let pcrs = match &workload.tpm_pcr15 {
            Some(boot) => workload.pcr15_values(boot).into_iter().map(Some).collect(),
            None => vec![None],
        };
        for pcr15 in pcrs {
            rego.push_str("\nallow if {\n");
            rego.push_str(&format!("\tdata[\"resource-path\"] in {set}\n"));
            rego.push_str("\tcount(input.submods) > 0\n\tnot cvm_warden_any_not_affirming\n");
            rego.push_str(
                "\tinput.submods.cpu0[\"ear.trustworthiness-vector\"].executables == 3\n",
            );
            if let Some(pcr15) = pcr15 {
                rego.push_str(&format!("\t{PCR15_CLAIM} == \"{pcr15}\"\n"));
            }
            // The broker verified each GPU the evidence carried (one `gpuN` submodule each).
            for gpu in 0..workload.gpus {
                rego.push_str(&format!("\tinput.submods.gpu{gpu}\n"));
            }
            rego.push_str("}\n");
        }
    }
    rego.push_str(
        "\ncvm_warden_any_not_affirming if {\n\tsome name, submod in input.submods\n\tnot startswith(name, \"gpu\")\n\tsubmod[\"ear.status\"] != \"affirming\"\n}\n",
    );
    rego
}

/// The admin calls that register `workloads` at one KBS: each reference value name once,
/// holding the values of every workload (in order, each once: RVPS keeps one list per
/// name), then one resource policy for all of them.
pub fn merged_requests(workloads: &[TrusteeValues]) -> Vec<AdminRequest> {
    let mut names: Vec<(&'static str, Vec<String>)> = Vec::new();
    for workload in workloads {
        for (name, values) in workload.reference_values() {
            let index = match names.iter().position(|(n, _)| *n == name) {
                Some(index) => index,
                None => {
                    names.push((name, Vec::new()));
                    names.len() - 1
                }
            };
            if let Some((_, slot)) = names.get_mut(index) {
                for value in values {
                    if !slot.contains(&value) {
                        slot.push(value);
                    }
                }
            }
        }
    }
    let mut requests: Vec<AdminRequest> = names
        .into_iter()
        .map(|(name, values)| AdminRequest {
            what: format!("reference value {name}"),
            path: REFERENCE_VALUE_PATH.to_string(),
            body: reference_value_body(name, &values),
        })
        .collect();
    if workloads.iter().any(|w| !w.resources.is_empty()) {
        requests.push(AdminRequest {
            what: "resource policy".to_string(),
            path: RESOURCE_POLICY_PATH.to_string(),
            body: json!({ "policy": URL_SAFE_NO_PAD.encode(resource_policy_rego(workloads)) }),
        });
    }
    requests
}

/// The body of one `POST /kbs/v0/reference-value`.
pub fn reference_value_body(name: &str, values: &[String]) -> Value {
    let payload = json!({ name: values }).to_string();
    json!({ "version": "0.1.0", "type": "sample", "payload": STANDARD.encode(payload) })
}

/// The body of `POST /kbs/v0/attestation-policy` for the rego text `rego`.
pub fn attestation_policy_body(rego: &str) -> Value {
    json!({ "policy_id": DEFAULT_CPU_POLICY_ID, "policy": URL_SAFE_NO_PAD.encode(rego) })
}

/// The claims of an admin token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminClaims {
    /// `iss`: the identity provider's issuer in the KBS config.
    pub issuer: String,
    /// `aud`: an audience the KBS's identity provider and ACL accept.
    pub audience: String,
    /// `role`: the role the KBS's ACL maps to the admin endpoints.
    pub role: String,
    /// Lifetime in seconds.
    pub ttl_secs: u64,
}

/// An Ed25519 admin key (held by `ring`; never printed).
pub struct AdminKey(ring::signature::Ed25519KeyPair);

impl std::fmt::Debug for AdminKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminKey(<redacted>)")
    }
}

impl AdminKey {
    /// Reads a PEM `PRIVATE KEY` (PKCS#8 v1 as openssl writes it, or v2) holding an
    /// Ed25519 key. `path` names the file in errors.
    pub fn from_pem(pem: &[u8], path: &str) -> Result<AdminKey, AdminError> {
        use rustls_pki_types::pem::PemObject;
        let error = |detail: String| AdminError::Key {
            path: path.to_string(),
            detail,
        };
        let der = rustls_pki_types::PrivatePkcs8KeyDer::from_pem_slice(pem)
            .map_err(|e| error(format!("no PEM PRIVATE KEY (PKCS#8) block ({e})")))?;
        let pair =
            ring::signature::Ed25519KeyPair::from_pkcs8_maybe_unchecked(der.secret_pkcs8_der())
                .map_err(|e| error(format!("not an Ed25519 key ({e})")))?;
        Ok(AdminKey(pair))
    }

    /// The public key as PEM `PUBLIC KEY` (SPKI), what the KBS config names.
    pub fn public_pem(&self) -> String {
        use ring::signature::KeyPair;
        // SPKI of an Ed25519 key: SEQUENCE { SEQUENCE { OID 1.3.101.112 } BIT STRING key }.
        let mut der = vec![
            0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
        ];
        der.extend_from_slice(self.0.public_key().as_ref());
        format!(
            "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
            STANDARD.encode(der)
        )
    }

    /// A signed admin token (`alg` EdDSA) issued at `now` (Unix seconds).
    pub fn token(&self, claims: &AdminClaims, now: u64) -> Zeroizing<String> {
        let header = URL_SAFE_NO_PAD.encode(json!({ "alg": "EdDSA", "typ": "JWT" }).to_string());
        let body = URL_SAFE_NO_PAD.encode(
            json!({
                "iss": claims.issuer,
                "aud": claims.audience,
                "role": claims.role,
                "sub": "cvm-warden broker register",
                "iat": now,
                "nbf": now,
                "exp": now + claims.ttl_secs,
            })
            .to_string(),
        );
        let signing_input = format!("{header}.{body}");
        let signature = self.0.sign(signing_input.as_bytes());
        Zeroizing::new(format!(
            "{signing_input}.{}",
            URL_SAFE_NO_PAD.encode(signature.as_ref())
        ))
    }
}

/// Where admin calls go (the real `HttpTransport`, or a recording fake in tests).
pub trait AdminTransport {
    /// `POST` `body` to `path` with the admin token.
    fn post(
        &mut self,
        path: &str,
        body: &[u8],
        content_type: &str,
        token: &str,
    ) -> Result<HttpResponse, TransportError>;
}

impl AdminTransport for HttpTransport {
    fn post(
        &mut self,
        path: &str,
        body: &[u8],
        content_type: &str,
        token: &str,
    ) -> Result<HttpResponse, TransportError> {
        self.post_admin(path, body, content_type, token, Duration::from_secs(30))
    }
}

/// One resource to upload: its `repo/type/tag` and its bytes (zeroized on drop).
pub struct ResourceUpload {
    /// `repo/type/tag`.
    pub path: String,
    /// The value.
    pub value: Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for ResourceUpload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ResourceUpload({}, <{} bytes redacted>)",
            self.path,
            self.value.len()
        )
    }
}

/// Posts `requests`, then each resource, in order; stops at the first refusal. Returns what
/// was registered, for the report.
pub fn register(
    transport: &mut dyn AdminTransport,
    token: &str,
    requests: &[AdminRequest],
    resources: &[ResourceUpload],
) -> Result<Vec<String>, AdminError> {
    let mut done = Vec::new();
    for request in requests {
        let body = request.body.to_string();
        post(
            transport,
            token,
            &request.what,
            &request.path,
            body.as_bytes(),
            "application/json",
        )?;
        done.push(request.what.clone());
    }
    for resource in resources {
        let what = format!("resource {}", resource.path);
        let path = format!("/kbs/v0/resource/{}", resource.path);
        post(
            transport,
            token,
            &what,
            &path,
            &resource.value,
            "application/octet-stream",
        )?;
        done.push(what);
    }
    Ok(done)
}

fn post(
    transport: &mut dyn AdminTransport,
    token: &str,
    what: &str,
    path: &str,
    body: &[u8],
    content_type: &str,
) -> Result<(), AdminError> {
    let response = transport
        .post(path, body, content_type, token)
        .map_err(|source| AdminError::Transport {
            what: what.to_string(),
            source,
        })?;
    if (200..300).contains(&response.status) {
        return Ok(());
    }
    let said = String::from_utf8_lossy(&response.body);
    let said = super::sanitize(said.trim());
    Err(AdminError::Refused {
        what: what.to_string(),
        path: path.to_string(),
        status: response.status,
        detail: if said.is_empty() {
            String::new()
        } else {
            format!(": {said}")
        },
        hint: match response.status {
            401 | 403 => "the admin token was not accepted: check --admin-key against the KBS's identity provider, and --issuer, --audience, --role against its config and ACL",
            404 => "the KBS does not serve this admin endpoint: check --kbs (the base URL, without /kbs/v0) and that the KBS has its admin API and RVPS built in",
            _ => "check the KBS's log for the reason",
        },
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests;
