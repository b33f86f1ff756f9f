//! The KBS 0.4.0 protocol: handshake (auth → evidence → attest), resource requests with
//! the reference client's re-handshake on 401, retries with capped exponential backoff
//! inside a total timeout, and operator-facing errors.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine;
use kbs_types::{
    Attestation, Challenge, CompositeEvidence, ErrorInformation, Request, RuntimeData,
};
use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::binding::report_data;
use super::jwe;
use super::key::{KeyWrap, TeeKey};
use super::transport::{
    check_url, Clock, HttpResponse, HttpTransport, SystemClock, Transport, TransportErrorKind,
};
use super::{sanitize, Attempt, Call, KbsError, Observer, Outcome, PROTOCOL_VERSION};
use crate::policy::ResourceUri;
use crate::tee::Provider;

/// Most tries of one call the configuration may ask for.
pub const MAX_TRIES: u32 = 10;

/// Most handshakes one [`Client::resource`] call runs: one per resource request at most
/// (see [`MAX_RESOURCE_REQUESTS`]).
pub const MAX_HANDSHAKES: u32 = MAX_RESOURCE_REQUESTS;

/// Most requests for one resource one [`Client::resource`] call sends, the first included
/// (Trustee's own client asks at most 3 times in all). Transport retries of one request
/// (connection failures, 5xx) are not counted: they are the same request.
pub const MAX_RESOURCE_REQUESTS: u32 = 3;

// Bounds on what the broker sends, checked before anything is bound, logged or audited.
// Trustee sends a 44-character nonce, a 32-hex-digit cookie, tokens of a few KiB (tens of
// KiB with large evidence claims) and one-line errors; these leave wide margins.

/// Longest nonce accepted, in bytes.
pub const MAX_NONCE: usize = 1024;
/// Longest `kbs-session-id` cookie value accepted, in bytes (the RFC 6265 size a client must
/// at least support).
pub const MAX_COOKIE: usize = 4096;
/// Longest attestation token accepted, in bytes.
pub const MAX_TOKEN: usize = 1024 * 1024;
/// Longest error `type` shown, in bytes (the URL prefix is 55 bytes); a longer one is
/// reported as `unknown` with its length.
pub const MAX_ERROR_TYPE: usize = 256;
/// Longest error `detail` shown, in bytes; a longer one is replaced by its length (a
/// shorter one is still cut to [`super::MAX_SHOWN`] characters for messages).
pub const MAX_ERROR_DETAIL: usize = 4096;

/// Capped exponential backoff: after try `n` fails, wait `min(initial · 2^(n-1), max)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Backoff {
    /// Wait after the first failed try.
    pub initial: Duration,
    /// Longest wait.
    pub max: Duration,
}

impl Backoff {
    /// The wait after try `try_no` (1-based) failed.
    pub fn delay(&self, try_no: u32) -> Duration {
        let factor = 1u32
            .checked_shl(try_no.saturating_sub(1))
            .unwrap_or(u32::MAX);
        self.initial.saturating_mul(factor).min(self.max)
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(250),
            max: Duration::from_secs(4),
        }
    }
}

/// How to reach the broker and how hard to try.
#[derive(Clone)]
pub struct KbsConfig {
    /// Broker base URL (`attestation.kbs`), e.g. `https://kbs.example:8080`.
    pub url: String,
    /// PEM certificate(s) the broker's TLS certificate must chain to (`attestation.kbs_ca`).
    /// The only trust anchors: no system or webpki roots. Required for `https://`.
    pub ca_pem: Option<Vec<u8>>,
    /// Where `ca_pem` came from, named in TLS error messages.
    pub ca_path: Option<PathBuf>,
    /// Allow `http://` (development only: the evidence and the session travel in clear).
    pub insecure_http: bool,
    /// The ephemeral key kind.
    pub key_wrap: KeyWrap,
    /// Tries per call for transport failures and 5xx (1..=[`MAX_TRIES`]).
    pub tries: u32,
    /// Wait between tries after a 5xx, and the shortest wait after no answer (then the tries
    /// left are spread over the time left when that waits longer).
    pub backoff: Backoff,
    /// Bound on one whole operation ([`Client::attest`] or [`Client::resource`], handshakes,
    /// evidence and retries included).
    pub total_timeout: Duration,
    /// Bound on one TCP connect.
    pub connect_timeout: Duration,
    /// Bound on one read or write.
    pub read_timeout: Duration,
}

impl KbsConfig {
    /// Defaults for `url`: EC key, 4 tries, 250 ms → 4 s backoff, 60 s total, 10 s connect,
    /// 30 s read, no CA (set `ca_pem` for `https://`).
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            ca_pem: None,
            ca_path: None,
            insecure_http: false,
            key_wrap: KeyWrap::default(),
            tries: 4,
            backoff: Backoff::default(),
            total_timeout: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(30),
        }
    }

    fn ca_label(&self) -> String {
        match &self.ca_path {
            Some(path) => path.display().to_string(),
            None => "the configured CA (attestation.kbs_ca)".to_string(),
        }
    }

    fn validate(&self) -> Result<String, KbsError> {
        let url = check_url(&self.url, self.insecure_http)?;
        let bad = |detail: String| Err(KbsError::Config { detail });
        if self.tries == 0 || self.tries > MAX_TRIES {
            return bad(format!("tries = {} must be 1..={MAX_TRIES}", self.tries));
        }
        if self.total_timeout.is_zero() {
            return bad("the total timeout must be more than zero".into());
        }
        if self.connect_timeout.is_zero() || self.read_timeout.is_zero() {
            return bad("the connect and read timeouts must be more than zero".into());
        }
        if self.backoff.initial > self.backoff.max {
            return bad(format!(
                "backoff initial {:?} is longer than its cap {:?}",
                self.backoff.initial, self.backoff.max
            ));
        }
        Ok(url)
    }
}

impl fmt::Debug for KbsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KbsConfig")
            .field("url", &self.url)
            .field("ca_pem_len", &self.ca_pem.as_ref().map(Vec::len))
            .field("ca_path", &self.ca_path)
            .field("insecure_http", &self.insecure_http)
            .field("key_wrap", &self.key_wrap)
            .field("tries", &self.tries)
            .field("backoff", &self.backoff)
            .field("total_timeout", &self.total_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("read_timeout", &self.read_timeout)
            .finish()
    }
}

/// What an auditor needs to re-check one handshake (the verifier crate's typed record, so
/// the writer and the reader share one shape).
pub use cvm_warden_verify::schema::Exchange as Attested;

/// A resource the broker released. The bytes are zeroized on drop; `Debug` shows only the
/// length and the SHA-256 fingerprint.
pub struct Released {
    uri: String,
    bytes: Zeroizing<Vec<u8>>,
}

impl Released {
    /// The resource (`kbs:///repo/type/tag`).
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Whether the resource is empty.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// The secret bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Gives up the secret bytes (still zeroized on drop).
    pub fn into_bytes(self) -> Zeroizing<Vec<u8>> {
        self.bytes
    }

    /// SHA-256 of the bytes, hex: a fingerprint for the audit log. For a random key this
    /// reveals nothing; do not log it for a low-entropy secret (a password), which it would
    /// expose to guessing.
    pub fn sha256_hex(&self) -> String {
        hex::encode(Sha256::digest(self.bytes.as_slice()))
    }
}

impl fmt::Debug for Released {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Released")
            .field("uri", &self.uri)
            .field("len", &self.len())
            .field("sha256", &self.sha256_hex())
            .finish()
    }
}

/// One attested session: cookie, token and the key the broker encrypts to.
struct Session {
    cookie: Zeroizing<String>,
    token: Zeroizing<String>,
    key: TeeKey,
    attested: Attested,
}

/// Makes the ephemeral key of each handshake ([`TeeKey::generate`] unless replaced with
/// [`Client::with_key_generator`]).
pub type KeyGenerator = fn(KeyWrap) -> Result<TeeKey, KbsError>;

/// The KBS client. One per broker; keeps at most one session.
pub struct Client {
    config: KbsConfig,
    url: String,
    transport: Box<dyn Transport>,
    clock: Box<dyn Clock>,
    keygen: KeyGenerator,
    session: Option<Session>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("url", &self.url)
            .field("key_wrap", &self.config.key_wrap)
            .field("transport", &self.transport)
            .field("session", &self.session.as_ref().map(|_| "<attested>"))
            .finish_non_exhaustive()
    }
}

/// One operation in progress: its start (for the total timeout) and its resource.
struct Op {
    started: Instant,
    resource: Option<String>,
}

/// One request to send (borrowing the secrets it carries).
enum Req<'a> {
    Post {
        path: &'a str,
        body: &'a [u8],
        cookie: Option<&'a str>,
    },
    Get {
        path: &'a str,
        cookie: Option<&'a str>,
        bearer: Option<&'a str>,
    },
}

impl Client {
    /// A client over the real transport ([`HttpTransport`]) and clock. Fails on a bad URL,
    /// `http://` without `insecure_http`, `https://` without a CA, an unusable CA, or
    /// limits out of range.
    pub fn new(config: KbsConfig) -> Result<Self, KbsError> {
        config.validate()?;
        let transport = HttpTransport::new(
            &config.url,
            config.ca_pem.as_deref(),
            &config.ca_label(),
            config.insecure_http,
            config.connect_timeout,
            config.read_timeout,
        )?;
        Self::with_transport(config, Box::new(transport), Box::new(SystemClock))
    }

    /// A client over any transport and clock (tests; the configuration is checked the same
    /// way, except for the CA, which only the real transport uses).
    pub fn with_transport(
        config: KbsConfig,
        transport: Box<dyn Transport>,
        clock: Box<dyn Clock>,
    ) -> Result<Self, KbsError> {
        let url = config.validate()?;
        Ok(Self {
            config,
            url,
            transport,
            clock,
            keygen: TeeKey::generate,
            session: None,
        })
    }

    /// Replaces the ephemeral key generator. For tests: RSA-3072 generation takes tens of
    /// seconds in an unoptimised build, so a test may hand out a pre-made key instead.
    /// Production code keeps the default (a fresh key from the OS random source per
    /// handshake).
    pub fn with_key_generator(mut self, keygen: KeyGenerator) -> Self {
        self.keygen = keygen;
        self
    }

    /// The broker base URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The current session's handshake, if there is one.
    pub fn attested(&self) -> Option<&Attested> {
        self.session.as_ref().map(|s| &s.attested)
    }

    /// Runs a fresh handshake (replacing any session): `auth`, evidence bound to the nonce
    /// and a fresh key, `attest`. Every try goes to `observer`.
    pub fn attest(
        &mut self,
        provider: &mut dyn Provider,
        observer: &mut dyn Observer,
    ) -> Result<Attested, KbsError> {
        let op = Op {
            started: self.clock.now(),
            resource: None,
        };
        self.session = None;
        let session = self.handshake(&op, provider, observer)?;
        let attested = session.attested.clone();
        self.session = Some(session);
        Ok(attested)
    }

    /// Fetches and decrypts one resource. Without a session it runs the handshake first;
    /// when the broker answers 401 (no or expired session, failed token check) it runs a
    /// fresh handshake and asks again, at most [`MAX_HANDSHAKES`] handshakes in all. A
    /// `PolicyDeny` is final. Every try goes to `observer`.
    pub fn resource(
        &mut self,
        uri: &ResourceUri,
        provider: &mut dyn Provider,
        observer: &mut dyn Observer,
    ) -> Result<Released, KbsError> {
        let op = Op {
            started: self.clock.now(),
            resource: Some(uri.to_string()),
        };
        let path = format!("/kbs/v0/resource/{}", uri.path());
        let mut handshakes = 0;
        let mut requests = 0;
        loop {
            let session = match self.session.take() {
                Some(session) => session,
                None => {
                    handshakes += 1;
                    self.handshake(&op, provider, observer)?
                }
            };
            requests += 1;
            let response = self.exchange(
                &op,
                observer,
                Call::Resource,
                Req::Get {
                    path: &path,
                    cookie: Some(&session.cookie),
                    bearer: Some(&session.token),
                },
            )?;
            match response.status {
                200 => {
                    let bytes = jwe::decrypt(&response.body, &session.key).map_err(|source| {
                        KbsError::Decrypt {
                            uri: uri.to_string(),
                            url: self.url.clone(),
                            source,
                        }
                    })?;
                    self.session = Some(session);
                    return Ok(Released {
                        uri: uri.to_string(),
                        bytes,
                    });
                }
                401 | 403 => {
                    let (variant, detail) = error_info(&response.body);
                    // The refusal names no check; the token the client holds does.
                    let verdict = super::verdict::refusal_words(
                        &session.attested.claims,
                        &session.attested.evidence,
                    );
                    if variant == "PolicyDeny" {
                        self.session = Some(session);
                        return Err(KbsError::PolicyDeny {
                            uri: uri.to_string(),
                            detail,
                            verdict,
                        });
                    }
                    // The session or token is no longer good: forget it (its key and token
                    // are zeroized on drop) and attest again, within the limit. No handshake
                    // is run that no request would use.
                    drop(session);
                    if requests >= MAX_RESOURCE_REQUESTS {
                        return Err(KbsError::Unauthorized {
                            uri: uri.to_string(),
                            requests,
                            handshakes,
                            status: response.status,
                            variant,
                            detail,
                            verdict,
                        });
                    }
                }
                404 => {
                    self.session = Some(session);
                    return Err(self.not_found(&path, &response));
                }
                status => {
                    return Err(self.protocol(
                        Call::Resource,
                        format!("HTTP {status}{}", detail_suffix(&response.body)),
                    ))
                }
            }
        }
    }

    /// auth → key → binding → evidence → attest.
    fn handshake(
        &mut self,
        op: &Op,
        provider: &mut dyn Provider,
        observer: &mut dyn Observer,
    ) -> Result<Session, KbsError> {
        let tee_name = provider.tee();
        // The one Tee enum, mapped to the protocol's exhaustively.
        let tee = cvm_warden_verify::Tee::from_str(tee_name)
            .map(cvm_warden_verify::Tee::kbs)
            .map_err(|_| KbsError::UnknownTee {
                tee: tee_name.to_string(),
            })?;

        // 1. Request → Challenge, and the session cookie.
        let request = Request {
            version: PROTOCOL_VERSION.to_string(),
            tee,
            extra_params: Value::String(String::new()),
        };
        let body = self.to_json(Call::Auth, &request)?;
        let response = self.exchange(
            op,
            observer,
            Call::Auth,
            Req::Post {
                path: "/kbs/v0/auth",
                body: &body,
                cookie: None,
            },
        )?;
        self.expect_ok(Call::Auth, "/kbs/v0/auth", &response)?;
        let challenge: Challenge = serde_json::from_slice(&response.body).map_err(|e| {
            // serde may quote the body's text: escape it.
            self.protocol(
                Call::Auth,
                format!(
                    "a body that is not a challenge ({})",
                    sanitize(&e.to_string())
                ),
            )
        })?;
        check_nonce(&challenge.nonce).map_err(|what| self.protocol(Call::Auth, what))?;
        let Some(mut cookie) = response.session_cookie() else {
            return Err(self.protocol(Call::Auth, format!("no {} cookie", super::SESSION_COOKIE)));
        };
        check_cookie(&cookie).map_err(|what| self.protocol(Call::Auth, what))?;

        // 2. A fresh key, the binding, the evidence.
        let key = (self.keygen)(self.config.key_wrap)?;
        let jwk = key.jwk();
        // Device evidence (GPUs) first, bound to the nonce and key: the primary evidence's
        // report data then covers it through `additional-evidence`.
        let additional_evidence = provider
            .additional_evidence(&challenge.nonce, &jwk)
            .map_err(|source| KbsError::Evidence {
                tee: tee_name.to_string(),
                source,
            })?;
        let binding =
            report_data(&challenge.nonce, &jwk, &additional_evidence).map_err(KbsError::Binding)?;
        let evidence = provider
            .evidence(&binding)
            .map_err(|source| KbsError::Evidence {
                tee: tee_name.to_string(),
                source,
            })?;

        // 3. Attestation → token.
        let attestation = Attestation {
            init_data: None,
            runtime_data: RuntimeData {
                nonce: challenge.nonce.clone(),
                tee_pubkey: key.public().clone(),
            },
            tee_evidence: CompositeEvidence {
                primary_evidence: evidence.clone(),
                additional_evidence: additional_evidence.clone(),
            },
        };
        let body = self.to_json(Call::Attest, &attestation)?;
        let response = self.exchange(
            op,
            observer,
            Call::Attest,
            Req::Post {
                path: "/kbs/v0/attest",
                body: &body,
                cookie: Some(&cookie),
            },
        )?;
        if matches!(response.status, 401 | 403) {
            let (variant, detail) = error_info(&response.body);
            return Err(KbsError::EvidenceRejected {
                url: self.url.clone(),
                tee: tee_name.to_string(),
                variant,
                detail,
            });
        }
        self.expect_ok(Call::Attest, "/kbs/v0/attest", &response)?;
        let mut response = response;
        let token = self.token(&response.body);
        zeroize::Zeroize::zeroize(&mut response.body); // it holds the token
        let token = token?;
        let claims = token_claims(&token).map_err(|what| self.protocol(Call::Attest, what))?;
        let status = claims
            .pointer("/submods/cpu0/ear.status")
            .and_then(Value::as_str)
            .map(str::to_string);
        if let Some(renewed) = response.session_cookie() {
            check_cookie(&renewed).map_err(|what| self.protocol(Call::Attest, what))?;
            cookie = renewed;
        }

        let attested = Attested {
            broker: self.url.clone(),
            tee: tee_name.to_string(),
            insecure: provider.insecure(),
            nonce: challenge.nonce,
            tee_pubkey: jwk,
            additional_evidence,
            report_data: hex::encode(binding),
            evidence,
            claims,
            status,
        };
        observer.attested(&attested);
        Ok(Session {
            cookie,
            token,
            key,
            attested,
        })
    }

    /// The wait after try `try_no` got no answer (connect failure, timeout, I/O error) with
    /// `remaining` of the total timeout left: the tries still allowed are spread evenly over
    /// the time left (each gets an equal share, the last one included), never closer than the
    /// capped exponential [`Backoff`]. So a broker that is not reachable yet (the network
    /// still coming up) is tried across the whole timeout instead of `tries` times within a
    /// second.
    fn spread_delay(&self, try_no: u32, remaining: Duration) -> Duration {
        let left = self.config.tries.saturating_sub(try_no);
        let spread = remaining / left.saturating_add(1);
        self.config.backoff.delay(try_no).max(spread)
    }

    /// Sends one request with retries: transport failures (except TLS) and 5xx are retried
    /// with backoff while tries and the total timeout allow; every try is reported.
    fn exchange(
        &mut self,
        op: &Op,
        observer: &mut dyn Observer,
        call: Call,
        req: Req<'_>,
    ) -> Result<HttpResponse, KbsError> {
        let total = self.config.total_timeout;
        let mut last = String::from("no try started: no time was left");
        let mut try_no = 0u32;
        loop {
            let elapsed = self.clock.now().saturating_duration_since(op.started);
            let remaining = total.saturating_sub(elapsed);
            if remaining.is_zero() {
                return Err(KbsError::Timeout {
                    url: self.url.clone(),
                    call,
                    total,
                    tries: try_no,
                    last,
                });
            }
            try_no += 1;
            let result = match &req {
                Req::Post { path, body, cookie } => {
                    self.transport.post_json(path, body, *cookie, remaining)
                }
                Req::Get {
                    path,
                    cookie,
                    bearer,
                } => self.transport.get(path, *cookie, *bearer, remaining),
            };
            let (outcome, retryable) = match &result {
                Ok(response) => (Outcome::Status(response.status), response.status >= 500),
                Err(error) => (Outcome::Error(error.to_string()), error.kind.retryable()),
            };
            let elapsed = self.clock.now().saturating_duration_since(op.started);
            // No answer at all (the network or the broker not up yet): spread the tries over
            // the time left. An answer (5xx): the broker is there, back off only.
            let delay = if result.is_err() {
                self.spread_delay(try_no, total.saturating_sub(elapsed))
            } else {
                self.config.backoff.delay(try_no)
            };
            let time_left = elapsed.saturating_add(delay) < total;
            let tries_left = try_no < self.config.tries;
            let will_retry = retryable && tries_left && time_left;
            observer.attempt(&Attempt {
                call,
                try_no,
                resource: op.resource.clone(),
                outcome: outcome.clone(),
                will_retry,
            });
            if will_retry {
                last = outcome.to_string();
                self.clock.sleep(delay);
                continue;
            }
            let out_of_time = retryable && tries_left;
            return match result {
                Ok(response) if response.status >= 500 => {
                    if out_of_time {
                        Err(KbsError::Timeout {
                            url: self.url.clone(),
                            call,
                            total,
                            tries: try_no,
                            last: format!("{outcome}{}", detail_suffix(&response.body)),
                        })
                    } else {
                        Err(KbsError::ServerError {
                            url: self.url.clone(),
                            call,
                            status: response.status,
                            detail: detail_suffix(&response.body),
                            tries: try_no,
                            elapsed,
                        })
                    }
                }
                Ok(response) => Ok(response),
                Err(source) => Err(match source.kind {
                    TransportErrorKind::Tls => KbsError::Tls {
                        url: self.url.clone(),
                        call,
                        ca: self.config.ca_label(),
                        source,
                    },
                    TransportErrorKind::Config => KbsError::Config {
                        detail: source.to_string(),
                    },
                    TransportErrorKind::TooLarge => KbsError::Protocol {
                        url: self.url.clone(),
                        call,
                        what: source.detail,
                    },
                    _ if out_of_time => KbsError::Timeout {
                        url: self.url.clone(),
                        call,
                        total,
                        tries: try_no,
                        last: outcome.to_string(),
                    },
                    _ => KbsError::Unreachable {
                        url: self.url.clone(),
                        call,
                        tries: try_no,
                        elapsed,
                        source,
                    },
                }),
            };
        }
    }

    fn expect_ok(&self, call: Call, path: &str, response: &HttpResponse) -> Result<(), KbsError> {
        match response.status {
            200 => Ok(()),
            404 => Err(self.not_found(path, response)),
            status => {
                let (variant, detail) = error_info(&response.body);
                Err(self.protocol(call, format!("HTTP {status} ({variant}: {detail})")))
            }
        }
    }

    fn token(&self, body: &[u8]) -> Result<Zeroizing<String>, KbsError> {
        #[derive(serde::Deserialize)]
        struct TokenAnswer {
            token: String,
        }
        if body.len() > MAX_TOKEN + 64 {
            return Err(self.protocol(
                Call::Attest,
                format!(
                    "an answer of {} bytes (a token may have at most {MAX_TOKEN} bytes)",
                    body.len()
                ),
            ));
        }
        match serde_json::from_slice::<TokenAnswer>(body) {
            Ok(mut answer) if answer.token.len() > MAX_TOKEN => {
                let len = answer.token.len();
                zeroize::Zeroize::zeroize(&mut answer.token);
                Err(self.protocol(
                    Call::Attest,
                    format!("a token of {len} bytes (at most {MAX_TOKEN} are accepted)"),
                ))
            }
            Ok(answer) if !answer.token.is_empty() => Ok(Zeroizing::new(answer.token)),
            Ok(mut answer) => {
                zeroize::Zeroize::zeroize(&mut answer.token);
                Err(self.protocol(Call::Attest, "an empty token".into()))
            }
            // The serde error could quote the body (the token): do not repeat it.
            Err(_) => Err(self.protocol(
                Call::Attest,
                "a body that is not {\"token\": \"<string>\"}".into(),
            )),
        }
    }

    fn to_json<T: Serialize>(&self, call: Call, value: &T) -> Result<Vec<u8>, KbsError> {
        serde_json::to_vec(value).map_err(|e| {
            self.protocol(
                call,
                format!("(client side) a request that cannot be serialised: {e}"),
            )
        })
    }

    fn not_found(&self, path: &str, response: &HttpResponse) -> KbsError {
        KbsError::NotFound {
            url: self.url.clone(),
            path: path.to_string(),
            detail: detail_suffix(&response.body),
        }
    }

    fn protocol(&self, call: Call, what: String) -> KbsError {
        KbsError::Protocol {
            url: self.url.clone(),
            call,
            what,
        }
    }
}

/// The nonce is bound into the evidence and recorded in the audit log as received, so it is
/// checked first: not empty, at most [`MAX_NONCE`] bytes, no control or bidi/format
/// characters (a Trustee nonce is base64).
fn check_nonce(nonce: &str) -> Result<(), String> {
    if nonce.is_empty() {
        return Err("an empty nonce".into());
    }
    if nonce.len() > MAX_NONCE {
        return Err(format!(
            "a nonce of {} bytes (at most {MAX_NONCE} are accepted; Trustee sends 44)",
            nonce.len()
        ));
    }
    if crate::report::has_unsafe_chars(nonce) {
        return Err(format!(
            "a nonce with control or bidi/format characters ({}); a Trustee nonce is base64",
            sanitize(nonce)
        ));
    }
    Ok(())
}

/// The session cookie is sent back in a header, never shown: at most [`MAX_COOKIE`] bytes,
/// no control or bidi/format characters.
fn check_cookie(cookie: &str) -> Result<(), String> {
    if cookie.len() > MAX_COOKIE {
        return Err(format!(
            "a {} cookie of {} bytes (at most {MAX_COOKIE} are accepted)",
            super::SESSION_COOKIE,
            cookie.len()
        ));
    }
    if crate::report::has_unsafe_chars(cookie) {
        return Err(format!(
            "a {} cookie with control or bidi/format characters",
            super::SESSION_COOKIE
        ));
    }
    Ok(())
}

/// Every string in the token's claims (keys too) that holds a control or bidi/format
/// character passed through [`crate::report::sanitize`] (no cut: the token's size is bounded
/// by [`MAX_TOKEN`]), so the claims can go to the audit log and messages.
fn sanitize_claims(value: Value) -> Value {
    let clean = |text: String| {
        if crate::report::has_unsafe_chars(&text) {
            crate::report::sanitize(&text, usize::MAX)
        } else {
            text
        }
    };
    match value {
        Value::String(text) => Value::String(clean(text)),
        Value::Array(items) => Value::Array(items.into_iter().map(sanitize_claims).collect()),
        Value::Object(map) => Value::Object(
            map.into_iter()
                .map(|(k, v)| (clean(k), sanitize_claims(v)))
                .collect(),
        ),
        other => other,
    }
}

/// The broker's error variant (last segment of `type`) and detail, sanitised; for a body
/// that is not an error document, `("unknown", <start of the body>)`. A `type` longer than
/// [`MAX_ERROR_TYPE`] or a `detail` longer than [`MAX_ERROR_DETAIL`] is not shown, only
/// its length.
fn error_info(body: &[u8]) -> (String, String) {
    match serde_json::from_slice::<ErrorInformation>(body) {
        Ok(info) if info.error_type.len() > MAX_ERROR_TYPE => (
            "unknown".into(),
            format!(
                "an error type of {} bytes (over {MAX_ERROR_TYPE}; not shown)",
                info.error_type.len()
            ),
        ),
        Ok(info) => {
            let variant = info
                .error_type
                .rsplit('/')
                .next()
                .filter(|v| !v.is_empty())
                .unwrap_or("unknown");
            let detail = if info.detail.len() > MAX_ERROR_DETAIL {
                format!(
                    "a detail of {} bytes (over {MAX_ERROR_DETAIL}; not shown)",
                    info.detail.len()
                )
            } else {
                sanitize(&info.detail)
            };
            (sanitize(variant), detail)
        }
        Err(_) if body.is_empty() => ("unknown".into(), "empty body".into()),
        Err(_) => ("unknown".into(), sanitize(&String::from_utf8_lossy(body))),
    }
}

/// `: <variant>: <detail>` for messages, or empty when the body says nothing.
fn detail_suffix(body: &[u8]) -> String {
    if body.is_empty() {
        return String::new();
    }
    let (variant, detail) = error_info(body);
    format!(": {variant}: {detail}")
}

/// The claims of a JWT (the middle part), decoded without verification.
fn token_claims(token: &str) -> Result<Value, String> {
    let parts: Vec<&str> = token.split('.').collect();
    let [_, payload, _] = parts.as_slice() else {
        return Err(format!(
            "a token that is not a JWT ({} dot-separated parts, expected 3)",
            parts.len()
        ));
    };
    let engine = GeneralPurpose::new(
        &base64::alphabet::URL_SAFE,
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
    );
    let bytes = engine
        .decode(payload)
        .map_err(|e| format!("a token whose claims are not base64url ({e})"))?;
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(claims @ Value::Object(_)) => Ok(sanitize_claims(claims)),
        Ok(_) => Err("a token whose claims are not a JSON object".into()),
        Err(e) => Err(format!("a token whose claims are not JSON ({e})")),
    }
}
