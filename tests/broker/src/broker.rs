//! The running broker: sessions, the three endpoints, the request log.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use rand_core::{OsRng, RngCore};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::binding::{self, TeePubKey};
use crate::config::KNOWN_TEES;
use crate::config::{
    check_resource_path, BrokerConfig, Compiled, CompiledNvidia, CompiledPolicy, RequiredStatus,
};
use crate::error::{BrokerError, ErrorKind, KbsError};
use crate::evidence::{self, InitData};
use crate::http::{self, Request, Response};
use crate::jwe;
use crate::nvidia;
use crate::token::{TokenSigner, EAR_PROFILE, TEE_PUBKEY_POINTER};
use crate::tpm;

/// The protocol version the broker accepts, compared exactly.
pub const KBS_PROTOCOL_VERSION: &str = "0.4.0";
/// The session cookie name.
pub const SESSION_COOKIE: &str = "kbs-session-id";

/// One request as the broker saw it, for test assertions. Never holds a secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestRecord {
    /// HTTP method.
    pub method: String,
    /// Path without the query string.
    pub path: String,
    /// Status answered.
    pub status: u16,
    /// The error variant answered, if any (`None` for success and injected 503s).
    pub error: Option<ErrorKind>,
    /// Why (broker-side reason, more precise than the wire detail).
    pub reason: Option<String>,
    /// The request carried a `kbs-session-id` cookie.
    pub session_cookie: bool,
    /// The request carried `Authorization: Bearer`.
    pub bearer: bool,
    /// For a successful `/attest`: the `ear.status` issued.
    pub ear_status: Option<String>,
    /// For a successful `/attest`: each submodule of the token, `name status` (`cpu0
    /// affirming`, `gpu0 affirming <uuid> root <root>`), in the request log line.
    pub submods: Vec<String>,
}

struct Session {
    tee: String,
    nonce: String,
    expires_at: SystemTime,
    token: Option<String>,
}

struct State {
    cfg: Compiled,
    signer: TokenSigner,
    sessions: Mutex<HashMap<String, Session>>,
    log: Mutex<Vec<RequestRecord>>,
    failures_left: AtomicU32,
    /// What the admin API registered.
    registered: Mutex<crate::admin::Registered>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn json_response(body: Value) -> Response {
    Response {
        status: 200,
        content_type: "application/json",
        extra_headers: Vec::new(),
        body: body.to_string().into_bytes(),
    }
}

fn bearer(req: &Request) -> Option<String> {
    let value = req.header("authorization")?;
    let (scheme, token) = value.split_once(' ')?;
    if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() {
        Some(token.trim().to_string())
    } else {
        None
    }
}

#[derive(Deserialize)]
struct AuthRequest {
    version: String,
    tee: String,
    #[serde(rename = "extra-params")]
    #[allow(dead_code)]
    extra_params: Value,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
struct AttestationBody {
    init_data: Option<InitData>,
    runtime_data: RuntimeData,
    tee_evidence: CompositeEvidence,
}

#[derive(Deserialize)]
struct RuntimeData {
    nonce: String,
    #[serde(rename = "tee-pubkey")]
    tee_pubkey: Value,
}

#[derive(Deserialize)]
struct CompositeEvidence {
    primary_evidence: Value,
    additional_evidence: String,
}

impl State {
    fn handle(&self, req: &Request) -> Response {
        if self.cfg.faults.delay_ms > 0 {
            std::thread::sleep(Duration::from_millis(self.cfg.faults.delay_ms));
        }
        let mut rec = RequestRecord {
            method: req.method.clone(),
            path: req.path().to_string(),
            status: 0,
            error: None,
            reason: None,
            session_cookie: req.cookie(SESSION_COOKIE).is_some(),
            bearer: bearer(req).is_some(),
            ear_status: None,
            submods: Vec::new(),
        };
        let injected = self
            .failures_left
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        let response = if injected {
            rec.reason = Some("injected failure (faults.fail_first_n)".to_string());
            Response {
                status: 503,
                content_type: "text/plain",
                extra_headers: Vec::new(),
                body: b"kbs-test-broker: injected failure (faults.fail_first_n)".to_vec(),
            }
        } else {
            match self.route(req, &mut rec) {
                Ok(response) => response,
                Err(err) => {
                    rec.error = Some(err.kind);
                    rec.reason = Some(err.reason.clone());
                    Response {
                        status: err.kind.status(),
                        content_type: "application/json",
                        extra_headers: Vec::new(),
                        body: err.body(),
                    }
                }
            }
        };
        rec.status = response.status;
        if self.cfg.log_requests {
            eprintln!(
                "kbs-test-broker: {} {} -> {}{}{}{}",
                rec.method,
                rec.path,
                rec.status,
                if rec.submods.is_empty() {
                    String::new()
                } else {
                    format!(" [{}]", rec.submods.join("; "))
                },
                rec.error.map(|k| format!(" {k}")).unwrap_or_default(),
                rec.reason
                    .as_ref()
                    .map(|r| format!(": {r}"))
                    .unwrap_or_default()
            );
        }
        lock(&self.log).push(rec);
        response
    }

    fn route(&self, req: &Request, rec: &mut RequestRecord) -> Result<Response, KbsError> {
        let path = req.path();
        let Some(rest) = path.strip_prefix("/kbs/v0/") else {
            return Err(KbsError::invalid_path(path, "not under /kbs/v0/"));
        };
        let (plugin, tail) = rest.split_once('/').unwrap_or((rest, ""));
        match (plugin, req.method.as_str()) {
            ("auth", "POST") => self.auth(req),
            ("attest", "POST") => self.attest(req, rec),
            ("resource", "GET") => self.resource(req, tail),
            ("resource", "POST")
            | ("reference-value", "POST")
            | ("attestation-policy", "POST")
            | ("resource-policy", "POST") => self.admin(req, plugin, tail),
            _ => Err(KbsError::plugin_not_found(
                plugin,
                format!("no endpoint {} /kbs/v0/{plugin}", req.method),
            )),
        }
    }

    fn session_cookie_header(&self, id: &str, expires_at: SystemTime) -> (String, String) {
        (
            "Set-Cookie".to_string(),
            format!(
                "{SESSION_COOKIE}={id}; Expires={}",
                http::http_date(unix_secs(expires_at))
            ),
        )
    }

    fn auth(&self, req: &Request) -> Result<Response, KbsError> {
        let request: AuthRequest = serde_json::from_slice(&req.body)
            .map_err(|e| KbsError::auth(format!("deserialize Request: {e}")))?;
        if request.version != KBS_PROTOCOL_VERSION {
            return Err(KbsError::auth(format!(
                "KBS Client Protocol Version Mismatch: expect ={KBS_PROTOCOL_VERSION} while the \
                 request is {}",
                request.version
            )));
        }
        if !KNOWN_TEES.contains(&request.tee.as_str()) {
            return Err(KbsError::auth(format!(
                "deserialize Request: unknown tee {:?} (known: {KNOWN_TEES:?})",
                request.tee
            )));
        }
        let mut nonce = [0u8; 32];
        OsRng.fill_bytes(&mut nonce);
        let nonce = match &self.cfg.faults.nonce {
            Some(injected) => injected.clone(),
            None => base64::engine::general_purpose::STANDARD.encode(nonce),
        };
        let mut id = [0u8; 16];
        OsRng.fill_bytes(&mut id);
        let id = hex::encode(id);
        let now = SystemTime::now();
        let expires_at = if self.cfg.faults.expire_sessions_immediately {
            now - Duration::from_secs(1)
        } else {
            now + self.cfg.session_ttl
        };
        let cookie = self.session_cookie_header(&id, expires_at);
        {
            let mut sessions = lock(&self.sessions);
            let horizon = now - Duration::from_secs(60);
            sessions.retain(|_, s| s.expires_at > horizon);
            sessions.insert(
                id,
                Session {
                    tee: request.tee,
                    nonce: nonce.clone(),
                    expires_at,
                    token: None,
                },
            );
        }
        let mut response = json_response(json!({"nonce": nonce, "extra-params": ""}));
        response.extra_headers.push(cookie);
        Ok(response)
    }

    fn attest(&self, req: &Request, rec: &mut RequestRecord) -> Result<Response, KbsError> {
        let id = req
            .cookie(SESSION_COOKIE)
            .ok_or_else(|| KbsError::attest("cookie not found"))?
            .to_string();
        let body: AttestationBody = serde_json::from_slice(&req.body)
            .map_err(|e| KbsError::attest(format!("deserialize Attestation: {e}")))?;
        let now = SystemTime::now();
        let (tee, nonce, expires_at) = {
            let sessions = lock(&self.sessions);
            let session = sessions
                .get(&id)
                .ok_or_else(|| KbsError::attest(format!("no session {id}")))?;
            if session.expires_at < now {
                return Err(KbsError::attest(format!("session {id} expired")));
            }
            if let Some(token) = &session.token {
                // Trustee answers an already attested session with its token.
                let mut response = json_response(json!({ "token": token }));
                response
                    .extra_headers
                    .push(self.session_cookie_header(&id, session.expires_at));
                return Ok(response);
            }
            (
                session.tee.clone(),
                session.nonce.clone(),
                session.expires_at,
            )
        };
        if body.runtime_data.nonce != nonce {
            return Err(KbsError::attest(
                "the nonce in the handshake session is different from the one in the \
                 Attestation message",
            ));
        }
        let key = TeePubKey::from_jwk(&body.runtime_data.tee_pubkey).map_err(KbsError::attest)?;
        let additional = &body.tee_evidence.additional_evidence;
        let report_data =
            binding::report_data(additional, &nonce, &key).map_err(KbsError::attest)?;
        let init_digest = match &body.init_data {
            Some(init) => Some(evidence::init_data_digest(init).map_err(KbsError::attest)?),
            None => None,
        };
        let primary = &body.tee_evidence.primary_evidence;
        let (tee_claims, vector) = match tee.as_str() {
            "sample" => {
                if !self.cfg.allow_sample {
                    return Err(KbsError::attest(
                        "sample evidence is not accepted (allow_sample = false)",
                    ));
                }
                let claims = evidence::verify_sample_evidence(primary, &report_data)
                    .map_err(KbsError::attest)?;
                (claims, sample_trust_vector())
            }
            "tpm" => {
                let verified =
                    tpm::verify_tpm_evidence(primary, &report_data, init_digest.as_ref())
                        .map_err(|e| KbsError::attest(e.to_string()))?;
                let (trusted, reference_pcrs) = self.trusted_and_pcrs(&verified.ak_public);
                let vector = tpm_trust_vector(trusted, &verified.pcrs, &reference_pcrs);
                (verified.claims(trusted), vector)
            }
            other => {
                return Err(KbsError::attest(format!(
                    "evidence of tee {other} is not verified by the test broker (only tpm, sample)"
                )))
            }
        };
        // Additional (device) evidence: each device is bound to the runtime data without the
        // additional-evidence key, as Trustee verifies it (GPU-ATTESTATION.md §4).
        let gpus = if additional.is_empty() {
            Vec::new()
        } else {
            let device_nonce = binding::device_nonce(&nonce, &key).map_err(KbsError::attest)?;
            nvidia::verify_additional_evidence(
                additional,
                &device_nonce,
                &self.cfg.nvidia.roots,
                now,
            )
            .map_err(|e| KbsError::attest(format!("NVIDIA device evidence: {e}")))?
        };
        let iat = unix_secs(now);
        let exp = if self.cfg.faults.expire_tokens_immediately {
            iat.saturating_sub(1)
        } else {
            iat + self.cfg.token_ttl_secs
        };
        let mut annotated = json!({
            tee.clone(): tee_claims,
            "report_data": hex::encode(report_data),
            "runtime_data_claims": binding::runtime_data(additional, &nonce, &key),
        });
        if let (Some(digest), Some(map)) = (init_digest, annotated.as_object_mut()) {
            map.insert("init_data".to_string(), Value::String(hex::encode(digest)));
        }
        let status = ear_status(&vector);
        let mut submods = serde_json::Map::new();
        rec.submods.push(format!("cpu0 {status}"));
        submods.insert(
            "cpu0".to_string(),
            json!({
                "ear.status": status,
                "ear.trustworthiness-vector": vector,
                "ear.appraisal-policy-id": "default",
                "ear.veraison.annotated-evidence": annotated,
            }),
        );
        for (n, gpu) in gpus.into_iter().enumerate() {
            let vector = gpu_trust_vector();
            rec.submods.push(format!(
                "gpu{n} {} {} root {}",
                ear_status(&vector),
                gpu.claims["uuid"].as_str().unwrap_or("(no uuid)"),
                gpu.root
            ));
            submods.insert(
                format!("gpu{n}"),
                json!({
                    "ear.status": ear_status(&vector),
                    "ear.trustworthiness-vector": vector,
                    "ear.appraisal-policy-id": "default_gpu",
                    "ear.veraison.annotated-evidence": {
                        "nvidia": gpu.claims,
                        GPU_DERIVED_KEY: {"cc_attested": true, "root": gpu.root},
                    },
                }),
            );
        }
        let claims = json!({
            "eat_profile": EAR_PROFILE,
            "iat": iat,
            "exp": exp,
            "ear.verifier-id": {"developer": "kbs-test-broker", "build": env!("CARGO_PKG_VERSION")},
            "submods": submods,
        });
        let token = self.signer.sign(&claims);
        {
            let mut sessions = lock(&self.sessions);
            let session = sessions
                .get_mut(&id)
                .ok_or_else(|| KbsError::attest(format!("session {id} vanished")))?;
            session.token = Some(token.clone());
        }
        rec.ear_status = Some(status.to_string());
        let mut response = json_response(json!({ "token": token }));
        response
            .extra_headers
            .push(self.session_cookie_header(&id, expires_at));
        Ok(response)
    }

    /// Whether `ak` is trusted, and the PCR reference values the attestation policy
    /// compares: the config's; with the admin API on, also PCR 11 and the PCRs a posted
    /// `default_cpu` policy reads, from the registered values (a PCR the policy reads that
    /// has no registered value never matches, as `x in []` never holds in rego).
    fn trusted_and_pcrs(&self, ak: &str) -> (bool, std::collections::BTreeMap<u8, Vec<[u8; 32]>>) {
        let registered = lock(&self.registered);
        let trusted = self.cfg.trusted_aks.contains(ak) || registered.trusted_aks.contains(ak);
        let mut pcrs = self.cfg.reference_pcrs.clone();
        if self.cfg.admin.is_some() {
            let read =
                std::iter::once(11u8).chain(registered.policy_pcrs.iter().flatten().copied());
            for pcr in read {
                let values = registered
                    .pcrs
                    .get(&pcr)
                    .or_else(|| self.cfg.reference_pcrs.get(&pcr))
                    .cloned()
                    .unwrap_or_default();
                pcrs.insert(pcr, values);
            }
        }
        (trusted, pcrs)
    }

    /// The admin endpoints.
    fn admin(&self, req: &Request, plugin: &str, tail: &str) -> Result<Response, KbsError> {
        let endpoint = req.path().to_string();
        let admin = self.cfg.admin.as_ref().ok_or_else(|| {
            KbsError::admin_access(&endpoint, "the admin API is off (no [admin] in the config)")
        })?;
        let token = bearer(req)
            .ok_or_else(|| KbsError::admin_access(&endpoint, "no Authorization: Bearer token"))?;
        admin
            .check(&token, unix_secs(SystemTime::now()))
            .map_err(|why| KbsError::admin_access(&endpoint, why))?;
        let mut registered = lock(&self.registered);
        match plugin {
            "reference-value" => {
                registered
                    .reference_value(&req.body)
                    .map_err(KbsError::rvps)?;
            }
            "attestation-policy" => registered
                .attestation_policy(&req.body)
                .map_err(KbsError::parse_policy)?,
            "resource-policy" => registered
                .resource_policy(&req.body)
                .map_err(KbsError::parse_policy)?,
            _ => {
                check_resource_path(tail).map_err(|why| KbsError::invalid_path(&endpoint, why))?;
                registered.resources.insert(
                    tail.to_string(),
                    crate::config::SecretBytes::new(req.body.clone()),
                );
            }
        }
        Ok(Response {
            status: 200,
            content_type: "text/plain",
            extra_headers: Vec::new(),
            body: Vec::new(),
        })
    }

    fn session_token(&self, req: &Request) -> Result<String, String> {
        let id = req
            .cookie(SESSION_COOKIE)
            .ok_or_else(|| "no kbs-session-id cookie".to_string())?;
        let sessions = lock(&self.sessions);
        let session = sessions.get(id).ok_or_else(|| format!("no session {id}"))?;
        if session.expires_at < SystemTime::now() {
            return Err(format!("session {id} expired"));
        }
        session
            .token
            .clone()
            .ok_or_else(|| format!("session {id} is not attested"))
    }

    fn resource(&self, req: &Request, tail: &str) -> Result<Response, KbsError> {
        check_resource_path(tail).map_err(|why| KbsError::invalid_path(req.path(), why))?;
        let token = match self.session_token(req) {
            Ok(token) => token,
            Err(why) => bearer(req).ok_or_else(|| {
                KbsError::token_not_found(format!("{why}, and no Authorization: Bearer token"))
            })?,
        };
        let claims = self
            .signer
            .verify(&token, unix_secs(SystemTime::now()))
            .map_err(KbsError::token_verifier)?;
        let deny = |why: String| {
            let mut error = KbsError::policy_deny(why);
            if let Some(detail) = &self.cfg.faults.deny_detail {
                error.detail = detail.clone();
            }
            error
        };
        // A posted resource policy is the KBS's one policy (as in Trustee): it decides for
        // every path, before the storage is read.
        let posted = lock(&self.registered).resource_policy.clone();
        if let Some(policy) = &posted {
            policy.allows(tail, &claims).map_err(deny)?;
        }
        let uploaded = lock(&self.registered).resources.get(tail).cloned();
        // Trustee's resource policy reads the token, not the path; when it allows, the
        // storage read fails for a resource it does not hold: PluginInternalError (401).
        let value = match (self.cfg.resources.get(tail), uploaded) {
            (Some(resource), _) => {
                if posted.is_none() {
                    evaluate_policy(&resource.policy, &claims).map_err(deny)?;
                    evaluate_gpu_policy(&self.cfg.nvidia, &claims).map_err(deny)?;
                }
                resource.value.clone()
            }
            (None, Some(value)) if posted.is_some() => value,
            (None, Some(_)) => {
                return Err(deny(format!(
                    "{tail} was uploaded through the admin API but no resource policy was posted"
                )))
            }
            (None, None) => {
                return Err(KbsError::plugin_internal(format!(
                    "no resource {tail} in the broker's storage (a missing resource is answered \
                     like a failed read after the policy allowed the token, as Trustee does)"
                )))
            }
        };
        let key_jwk = claims.pointer(TEE_PUBKEY_POINTER).ok_or_else(|| {
            KbsError::token_verifier(format!("token has no {TEE_PUBKEY_POINTER}"))
        })?;
        let key = TeePubKey::from_jwk(key_jwk).map_err(KbsError::token_verifier)?;
        let answer = jwe::encrypt(&key, value.expose(), self.cfg.faults.tamper_jwe)
            .map_err(KbsError::jwe)?;
        let body = serde_json::to_value(&answer)
            .map_err(|e| KbsError::plugin_internal(format!("serialise JWE: {e}")))?;
        Ok(json_response(body))
    }
}

/// The AR4SI trust vector of `tpm` evidence, as Trustee's default CPU attestation policy
/// sets it (`hardware` 2, `configuration` 0; `executables` 3 only when the AK is in
/// `trusted_aks` and every registered `tpm_pcrNN` reference value matches, else the
/// default 33) plus the one rule this broker adds, as a deployment may:
/// `instance-identity` 2 ("recognized instance") when the AK is in `trusted_aks`, else 0 (no
/// claim), so a wrong PCR (33 with 2) and an untrusted AK (33 with 0) can be told apart.
pub(crate) fn tpm_trust_vector(
    ak_trusted: bool,
    pcrs: &[[u8; 32]],
    reference_pcrs: &std::collections::BTreeMap<u8, Vec<[u8; 32]>>,
) -> Value {
    let pcrs_match = reference_pcrs.iter().all(|(index, accepted)| {
        pcrs.get(usize::from(*index))
            .is_some_and(|value| accepted.contains(value))
    });
    json!({
        "instance-identity": if ak_trusted { 2 } else { 0 },
        "configuration": 0,
        "executables": if ak_trusted && pcrs_match { 3 } else { 33 },
        "file-system": 0,
        "hardware": 2,
        "runtime-opaque": 0,
        "storage-opaque": 0,
        "sourced-data": 0,
    })
}

/// The key, next to Trustee's `nvidia` claims in a `gpuN` submod's annotated evidence, of what
/// the broker itself derives: `cc_attested` (always `true`: a submod exists only for a GPU
/// whose CC attestation report verified for this session) and `root` (`nvidia`, or the
/// `[nvidia] extra_roots` file the chain ended at, i.e. a simulated GPU).
pub const GPU_DERIVED_KEY: &str = "kbs-test-broker";

/// The trust vector of a verified GPU, as Trustee's default GPU attestation policy leaves it
/// for Local verifier claims (it only scores NRAS claims): `hardware` 97, `executables` 33,
/// `configuration` 36 — so `ear.status` is `contraindicated`, and a resource policy must
/// read the GPU claims itself rather than require every submod to be affirming.
pub(crate) fn gpu_trust_vector() -> Value {
    json!({
        "instance-identity": 0,
        "configuration": 36,
        "executables": 33,
        "file-system": 0,
        "hardware": 97,
        "runtime-opaque": 0,
        "storage-opaque": 0,
        "sourced-data": 0,
    })
}

/// Whether a submod name is a GPU's (`gpu0`, `gpu1`, …).
pub(crate) fn is_gpu_submod(name: &str) -> bool {
    name.strip_prefix("gpu")
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// The `[nvidia]` rules every `[resources]` policy applies: at least `require_gpus` GPU
/// submods, each with `driver_version` ≥ `min_driver` (dotted numbers).
pub(crate) fn evaluate_gpu_policy(nvidia: &CompiledNvidia, claims: &Value) -> Result<(), String> {
    let gpus: Vec<(&String, &Value)> = claims["submods"]
        .as_object()
        .map(|m| m.iter().filter(|(k, _)| is_gpu_submod(k)).collect())
        .unwrap_or_default();
    if gpus.len() < nvidia.require_gpus {
        return Err(format!(
            "the token carries {} verified GPU(s); [nvidia] require_gpus = {} (the attestation \
             sent no or too little NVIDIA additional evidence)",
            gpus.len(),
            nvidia.require_gpus
        ));
    }
    if let Some(min) = &nvidia.min_driver {
        for (name, submod) in gpus {
            let driver = submod["ear.veraison.annotated-evidence"]["nvidia"]["config"]
                ["driver_version"]
                .as_str()
                .ok_or_else(|| format!("{name} has no nvidia.config.driver_version"))?;
            match nvidia::compare_dotted(driver, min) {
                Some(std::cmp::Ordering::Less) | None => {
                    return Err(format!(
                        "{name} driver_version {driver:?} is below [nvidia] min_driver {min:?} \
                         (dotted numbers)"
                    ))
                }
                _ => {}
            }
        }
    }
    Ok(())
}

/// The trust vector of `sample` evidence (which carries no launch digest): `executables` 33,
/// `hardware` 2, `configuration` 36 (unavailable), so its status is `warning`.
pub(crate) fn sample_trust_vector() -> Value {
    json!({
        "instance-identity": 0,
        "configuration": 36,
        "executables": 33,
        "file-system": 0,
        "hardware": 2,
        "runtime-opaque": 0,
        "storage-opaque": 0,
        "sourced-data": 0,
    })
}

/// `ear.status` from a trust vector as the EAR library does it: the worst AR4SI tier of its
/// claims (−1..=1 none, 2..=31 affirming, 32..=95 warning, 96.. contraindicated; negative
/// values mirror them).
pub(crate) fn ear_status(vector: &Value) -> &'static str {
    let rank = |value: i64| match value {
        -1..=1 => 0,
        -32..=31 => 1,
        -96..=95 => 2,
        _ => 3,
    };
    let worst = vector
        .as_object()
        .map(|claims| {
            claims
                .values()
                .filter_map(Value::as_i64)
                .map(rank)
                .max()
                .unwrap_or(0)
        })
        .unwrap_or(0);
    ["none", "affirming", "warning", "contraindicated"][worst]
}

/// Apply a resource policy to verified token claims; `Err` says why it denies.
pub(crate) fn evaluate_policy(policy: &CompiledPolicy, claims: &Value) -> Result<(), String> {
    let submod = claims
        .pointer("/submods/cpu0")
        .ok_or_else(|| "token has no submods.cpu0".to_string())?;
    let annotated = submod
        .get("ear.veraison.annotated-evidence")
        .and_then(Value::as_object)
        .ok_or_else(|| "token has no annotated evidence".to_string())?;
    let tee = annotated
        .keys()
        .find(|k| KNOWN_TEES.contains(&k.as_str()))
        .ok_or_else(|| "token names no tee".to_string())?;
    if !policy.tees.iter().any(|t| t == tee) {
        return Err(format!(
            "tee {tee} is not allowed (policy allows {:?})",
            policy.tees
        ));
    }
    let status = submod
        .get("ear.status")
        .and_then(Value::as_str)
        .ok_or_else(|| "token has no ear.status".to_string())?;
    let status_ok = match policy.require {
        RequiredStatus::Affirming => status == "affirming",
        RequiredStatus::Warning => status == "affirming" || status == "warning",
    };
    if !status_ok {
        return Err(format!(
            "ear.status is {status}; the policy requires {:?}",
            policy.require
        ));
    }
    for (index, expected) in &policy.pcrs {
        let name = format!("pcr{index:02}");
        let got = annotated
            .get(tee)
            .and_then(|c| c.get(&name))
            .and_then(Value::as_str)
            .ok_or_else(|| format!("token carries no {tee} {name}"))?;
        if !got.eq_ignore_ascii_case(&hex::encode(expected)) {
            return Err(format!(
                "PCR {index} is {got}, the policy expects {}",
                hex::encode(expected)
            ));
        }
    }
    Ok(())
}

fn load_tls(tls: &crate::config::TlsConfig) -> Result<Arc<rustls::ServerConfig>, BrokerError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&tls.cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| BrokerError::Tls {
            what: "certificate chain",
            path: tls.cert.clone(),
            detail: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(BrokerError::Tls {
            what: "certificate chain",
            path: tls.cert.clone(),
            detail: "no CERTIFICATE block".to_string(),
        });
    }
    let key = PrivateKeyDer::from_pem_file(&tls.key).map_err(|e| BrokerError::Tls {
        what: "private key",
        path: tls.key.clone(),
        detail: e.to_string(),
    })?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(BrokerError::TlsConfig)?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(BrokerError::TlsConfig)?;
    Ok(Arc::new(config))
}

/// Starts brokers.
#[derive(Debug)]
pub struct Broker;

impl Broker {
    /// Check `config`, bind `listen` (e.g. `"127.0.0.1:0"`), and serve on a background
    /// thread until [`RunningBroker::stop`] or drop. HTTPS when `config.tls` is set.
    pub fn start(config: BrokerConfig, listen: &str) -> Result<RunningBroker, BrokerError> {
        let compiled = config.compile()?;
        let tls = match &config.tls {
            Some(tls) => Some(load_tls(tls)?),
            None => None,
        };
        let listener = TcpListener::bind(listen).map_err(|source| BrokerError::Bind {
            addr: listen.to_string(),
            source,
        })?;
        let addr = listener.local_addr().map_err(|source| BrokerError::Bind {
            addr: listen.to_string(),
            source,
        })?;
        let host = match addr {
            SocketAddr::V4(a) if a.ip().is_unspecified() => {
                SocketAddr::from(([127, 0, 0, 1], a.port()))
            }
            SocketAddr::V6(a) if a.ip().is_unspecified() => {
                SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, a.port()))
            }
            other => other,
        };
        let url = format!("{}://{host}", if tls.is_some() { "https" } else { "http" });
        let state = Arc::new(State {
            failures_left: AtomicU32::new(compiled.faults.fail_first_n),
            cfg: compiled,
            signer: TokenSigner::generate(),
            sessions: Mutex::new(HashMap::new()),
            log: Mutex::new(Vec::new()),
            registered: Mutex::new(crate::admin::Registered::default()),
        });
        let stop = Arc::new(AtomicBool::new(false));
        let handler_state = state.clone();
        let handler: http::Handler = Arc::new(move |req: &Request| handler_state.handle(req));
        let thread =
            http::spawn_server(listener, tls, stop.clone(), handler).map_err(|source| {
                BrokerError::Bind {
                    addr: listen.to_string(),
                    source,
                }
            })?;
        Ok(RunningBroker {
            url,
            addr,
            stop,
            thread: Some(thread),
            state,
        })
    }
}

/// A broker serving on a background thread. Stops on [`RunningBroker::stop`] or drop.
pub struct RunningBroker {
    url: String,
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    state: Arc<State>,
}

impl std::fmt::Debug for RunningBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningBroker")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

impl RunningBroker {
    /// Base URL, e.g. `http://127.0.0.1:41234` (no trailing slash; append `/kbs/v0/...`).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The bound socket address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Every request answered so far, in order.
    pub fn requests(&self) -> Vec<RequestRecord> {
        lock(&self.state.log).clone()
    }

    /// Forget the request log.
    pub fn clear_requests(&self) {
        lock(&self.state.log).clear();
    }

    /// The public key that verifies this broker's tokens (JWK: `kty`, `crv`, `x`, `y`).
    pub fn token_public_jwk(&self) -> Value {
        self.state.signer.public_jwk()
    }

    /// Stop serving and wait for the server threads to end.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for RunningBroker {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn claims(tee: &str, status: &str, pcr15: &str) -> Value {
        json!({"submods": {"cpu0": {
            "ear.status": status,
            "ear.veraison.annotated-evidence": {
                tee: {"pcr15": pcr15, "pcr08": "00"},
                "report_data": "ab",
                "runtime_data_claims": {},
            }
        }}})
    }

    fn policy(tees: &[&str], require: RequiredStatus, pcr15: Option<[u8; 32]>) -> CompiledPolicy {
        let mut pcrs = BTreeMap::new();
        if let Some(v) = pcr15 {
            pcrs.insert(15u8, v);
        }
        CompiledPolicy {
            tees: tees.iter().map(|s| s.to_string()).collect(),
            pcrs,
            require,
        }
    }

    #[test]
    fn trust_vectors_tell_a_wrong_pcr_from_an_untrusted_ak() {
        let mut pcrs = vec![[0u8; 32]; 24];
        pcrs[15] = [0x15; 32];
        let mut reference = BTreeMap::new();
        reference.insert(15u8, vec![[0x15u8; 32]]);
        let good = tpm_trust_vector(true, &pcrs, &reference);
        assert_eq!(
            (
                good["executables"].as_i64(),
                good["instance-identity"].as_i64()
            ),
            (Some(3), Some(2))
        );
        assert_eq!(ear_status(&good), "affirming");
        let untrusted = tpm_trust_vector(false, &pcrs, &reference);
        assert_eq!(
            (
                untrusted["executables"].as_i64(),
                untrusted["instance-identity"].as_i64()
            ),
            (Some(33), Some(0))
        );
        assert_eq!(ear_status(&untrusted), "warning");
        reference.insert(15u8, vec![[0x16u8; 32]]);
        let wrong_pcr = tpm_trust_vector(true, &pcrs, &reference);
        assert_eq!(
            (
                wrong_pcr["executables"].as_i64(),
                wrong_pcr["instance-identity"].as_i64()
            ),
            (Some(33), Some(2))
        );
        assert_eq!(ear_status(&wrong_pcr), "warning");
        assert_eq!(ear_status(&sample_trust_vector()), "warning");
        assert_eq!(
            ear_status(&json!({"hardware": 97, "executables": 3})),
            "contraindicated"
        );
        assert_eq!(ear_status(&json!({"configuration": 0})), "none");
    }

    #[test]
    fn policy_checks_tee_status_and_each_pcr() {
        let good = [0x11u8; 32];
        let good_hex = hex::encode(good);
        let p = policy(&["tpm"], RequiredStatus::Affirming, Some(good));
        assert!(evaluate_policy(&p, &claims("tpm", "affirming", &good_hex)).is_ok());
        // upper-case hex in the token is the same value
        assert!(evaluate_policy(&p, &claims("tpm", "affirming", &good_hex.to_uppercase())).is_ok());
        let e = evaluate_policy(&p, &claims("tpm", "affirming", &hex::encode([0x12u8; 32])));
        assert!(e.unwrap_err().contains("PCR 15"));
        let e = evaluate_policy(&p, &claims("tpm", "warning", &good_hex));
        assert!(e.unwrap_err().contains("ear.status is warning"));
        let e = evaluate_policy(&p, &claims("sample", "affirming", &good_hex));
        assert!(e.unwrap_err().contains("tee sample is not allowed"));

        let w = policy(&["tpm", "sample"], RequiredStatus::Warning, None);
        assert!(evaluate_policy(&w, &claims("sample", "warning", "")).is_ok());
        assert!(evaluate_policy(&w, &claims("tpm", "affirming", "")).is_ok());
        assert!(evaluate_policy(&w, &claims("tpm", "contraindicated", "")).is_err());
        assert!(evaluate_policy(&w, &json!({})).is_err());
    }
}
