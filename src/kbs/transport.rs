//! The HTTP seam of the KBS client, and time.
//!
//! [`Transport`] is what the client needs from HTTP: a JSON `POST` and a `GET`, each with
//! the session cookie (and, for `GET`, the bearer token), answering status, `Set-Cookie`
//! values and body. [`HttpTransport`] is the real one: `ureq` 2 over a `rustls`
//! configuration whose only trust anchors are the policy's CA PEM (no system roots, no
//! webpki roots); `http://` only when the policy says `insecure_http`; connect, read and
//! write timeouts; no redirects; no proxy from the environment; bounded answer size.
//!
//! [`Clock`] is time: retries and the total timeout read it, backoffs sleep on it, so tests
//! run with a manual clock and no real sleeps.

use std::fmt;
use std::io::Read;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use zeroize::Zeroizing;

use super::{KbsError, SESSION_COOKIE};
use crate::policy::{BrokerUrl, BrokerUrlError};

/// The largest answer body the client reads (a resource JWE, a token, a challenge).
pub const MAX_BODY: u64 = 4 * 1024 * 1024;

/// One HTTP answer.
pub struct HttpResponse {
    /// Status code.
    pub status: u16,
    /// Every `Set-Cookie` header value, as received (zeroized: they carry the session id).
    pub set_cookie: Vec<Zeroizing<String>>,
    /// The body.
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// An answer with a body and no cookies.
    pub fn new(status: u16, body: impl Into<Vec<u8>>) -> Self {
        Self {
            status,
            set_cookie: Vec::new(),
            body: body.into(),
        }
    }

    /// Adds a `Set-Cookie` header value.
    pub fn with_cookie(mut self, set_cookie: impl Into<String>) -> Self {
        self.set_cookie.push(Zeroizing::new(set_cookie.into()));
        self
    }

    /// The value of the `kbs-session-id` cookie, if one was set.
    pub fn session_cookie(&self) -> Option<Zeroizing<String>> {
        self.set_cookie.iter().find_map(|header| {
            let pair = header.split(';').next()?.trim();
            let (name, value) = pair.split_once('=')?;
            (name.trim() == SESSION_COOKIE && !value.trim().is_empty())
                .then(|| Zeroizing::new(value.trim().trim_matches('"').to_string()))
        })
    }
}

impl fmt::Debug for HttpResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpResponse")
            .field("status", &self.status)
            .field(
                "set_cookie",
                &format_args!("<{} redacted>", self.set_cookie.len()),
            )
            .field("body_len", &self.body.len())
            .finish()
    }
}

/// What kind of transport failure happened; decides whether it is retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportErrorKind {
    /// DNS or TCP connect failed (retried).
    Connect,
    /// A connect, read or write timeout (retried).
    Timeout,
    /// The TLS handshake or certificate check failed (not retried).
    Tls,
    /// The connection broke, or the answer was unreadable (retried).
    Io,
    /// The request cannot be made as configured: URL, scheme (not retried).
    Config,
    /// The answer is larger than [`MAX_BODY`] (not retried).
    TooLarge,
}

impl TransportErrorKind {
    /// Whether another try can help.
    pub fn retryable(self) -> bool {
        matches!(self, Self::Connect | Self::Timeout | Self::Io)
    }
}

/// No usable answer came back. Never holds a secret (the cookie and token are not part of
/// any error text).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{url}: {detail}")]
pub struct TransportError {
    /// The kind.
    pub kind: TransportErrorKind,
    /// The full request URL.
    pub url: String,
    /// What happened (the error chain, as text).
    pub detail: String,
}

impl TransportError {
    /// A transport error of `kind` for `url`.
    pub fn new(
        kind: TransportErrorKind,
        url: impl Into<String>,
        detail: impl Into<String>,
    ) -> Self {
        Self {
            kind,
            url: url.into(),
            detail: detail.into(),
        }
    }
}

/// What the KBS client needs from HTTP. `path` is absolute (`/kbs/v0/auth`); `cookie` is the
/// `kbs-session-id` value; `timeout` bounds the whole request (the client passes what is
/// left of its total timeout).
pub trait Transport: fmt::Debug + Send {
    /// The broker base URL, for messages.
    fn base_url(&self) -> &str;

    /// `POST` a JSON body.
    fn post_json(
        &mut self,
        path: &str,
        body: &[u8],
        cookie: Option<&str>,
        timeout: Duration,
    ) -> Result<HttpResponse, TransportError>;

    /// `GET`, with the session cookie and/or `Authorization: Bearer <token>`.
    fn get(
        &mut self,
        path: &str,
        cookie: Option<&str>,
        bearer: Option<&str>,
        timeout: Duration,
    ) -> Result<HttpResponse, TransportError>;
}

/// Time, as the client's retry loop sees it.
pub trait Clock: fmt::Debug + Send {
    /// Now.
    fn now(&self) -> Instant;
    /// Waits `duration`.
    fn sleep(&self, duration: Duration);
}

/// The real clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }

    fn sleep(&self, duration: Duration) {
        std::thread::sleep(duration);
    }
}

/// Checks a broker base URL: `https://host[:port][/prefix]`, or `http://` when
/// `insecure_http` is set (read by the policy's [`BrokerUrl`], the `url` crate).
/// Returns it without a trailing `/`.
pub fn check_url(url: &str, insecure_http: bool) -> Result<String, KbsError> {
    let bad = |why: &str| KbsError::Config {
        detail: format!("attestation.kbs = {:?} {why}", BrokerUrl::redacted(url)),
    };
    match BrokerUrl::parse(url) {
        Ok(parsed) if !parsed.https && !insecure_http => Err(bad(
            "uses plain http://, which exposes the evidence and the session to the network; use https:// with attestation.kbs_ca (http:// is allowed only with insecure_http = true, for development)",
        )),
        Ok(_) => Ok(url.trim_end_matches('/').to_string()),
        Err(BrokerUrlError::Scheme) => Err(bad("must start with https://")),
        Err(BrokerUrlError::NoHost) => {
            Err(bad("has no host; write e.g. https://kbs.example:8080"))
        }
        Err(
            BrokerUrlError::Characters
            | BrokerUrlError::QueryOrFragment
            | BrokerUrlError::UserInfo,
        ) => Err(bad(
            "must not contain spaces, a query, a fragment or credentials; write e.g. https://kbs.example:8080",
        )),
        Err(why) => Err(bad(&format!(
            "is not a broker URL ({why}); write e.g. https://kbs.example:8080"
        ))),
    }
}

/// A `rustls` client configuration whose only trust anchors are the certificates in
/// `ca_pem` (`ca` names where they came from, for messages).
pub fn tls_config(ca_pem: &[u8], ca: &str) -> Result<rustls::ClientConfig, KbsError> {
    let ca_error = |detail: String| KbsError::Ca {
        ca: ca.to_string(),
        detail,
    };
    let mut roots = rustls::RootCertStore::empty();
    for (index, cert) in CertificateDer::pem_slice_iter(ca_pem).enumerate() {
        let cert =
            cert.map_err(|e| ca_error(format!("PEM block {} is unreadable: {e}", index + 1)))?;
        roots.add(cert).map_err(|e| {
            ca_error(format!(
                "certificate {} is not usable as a trust anchor: {e}",
                index + 1
            ))
        })?;
    }
    if roots.is_empty() {
        return Err(ca_error("holds no PEM CERTIFICATE block".into()));
    }
    tls_config_with_roots(roots)
}

fn tls_config_with_roots(roots: rustls::RootCertStore) -> Result<rustls::ClientConfig, KbsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| KbsError::Config {
            detail: format!("TLS setup failed: {e}"),
        })?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// The real transport: `ureq` 2 with TLS pinned to the policy's CA.
pub struct HttpTransport {
    agent: ureq::Agent,
    base: String,
}

impl fmt::Debug for HttpTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpTransport")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

impl HttpTransport {
    /// A transport for `url` (checked with [`check_url`]). `ca_pem` is required for
    /// `https://`; `ca` names its source for messages. `connect` and `read` bound each
    /// connection attempt and each read or write.
    pub fn new(
        url: &str,
        ca_pem: Option<&[u8]>,
        ca: &str,
        insecure_http: bool,
        connect: Duration,
        read: Duration,
    ) -> Result<Self, KbsError> {
        let base = check_url(url, insecure_http)?;
        let tls = match ca_pem {
            Some(pem) => tls_config(pem, ca)?,
            None if base.starts_with("https://") => {
                return Err(KbsError::Config {
                    detail: format!(
                        "attestation.kbs = {base:?} is https:// but no CA is configured; set attestation.kbs_ca to the PEM CA the broker's certificate chains to (system roots are never used)"
                    ),
                })
            }
            // http:// (insecure_http): TLS is never used; an empty root store makes sure
            // nothing could be trusted if it were.
            None => tls_config_with_roots(rustls::RootCertStore::empty())?,
        };
        let agent = ureq::AgentBuilder::new()
            .tls_config(Arc::new(tls))
            .https_only(!insecure_http)
            .redirects(0)
            .timeout_connect(connect)
            .timeout_read(read)
            .timeout_write(read)
            .user_agent(concat!("cvm-warden/", env!("CARGO_PKG_VERSION")))
            .build();
        Ok(Self { agent, base })
    }

    fn finish(
        url: &str,
        result: Result<ureq::Response, ureq::Error>,
    ) -> Result<HttpResponse, TransportError> {
        let response = match result {
            Ok(response) => response,
            Err(ureq::Error::Status(_, response)) => response,
            Err(ureq::Error::Transport(error)) => return Err(classify(url, &error)),
        };
        let status = response.status();
        let set_cookie = response
            .all("set-cookie")
            .into_iter()
            .map(|v| Zeroizing::new(v.to_string()))
            .collect();
        let mut body = Vec::new();
        response
            .into_reader()
            .take(MAX_BODY + 1)
            .read_to_end(&mut body)
            .map_err(|e| io_error(url, &e))?;
        if body.len() as u64 > MAX_BODY {
            return Err(TransportError::new(
                TransportErrorKind::TooLarge,
                url,
                format!("the answer is larger than {MAX_BODY} bytes"),
            ));
        }
        Ok(HttpResponse {
            status,
            set_cookie,
            body,
        })
    }
}

impl Transport for HttpTransport {
    fn base_url(&self) -> &str {
        &self.base
    }

    fn post_json(
        &mut self,
        path: &str,
        body: &[u8],
        cookie: Option<&str>,
        timeout: Duration,
    ) -> Result<HttpResponse, TransportError> {
        let url = format!("{}{path}", self.base);
        let mut request = self
            .agent
            .post(&url)
            .timeout(timeout)
            .set("Content-Type", "application/json");
        if let Some(cookie) = cookie {
            let header = Zeroizing::new(format!("{SESSION_COOKIE}={cookie}"));
            request = request.set("Cookie", &header);
        }
        Self::finish(&url, request.send_bytes(body))
    }

    fn get(
        &mut self,
        path: &str,
        cookie: Option<&str>,
        bearer: Option<&str>,
        timeout: Duration,
    ) -> Result<HttpResponse, TransportError> {
        let url = format!("{}{path}", self.base);
        let mut request = self.agent.get(&url).timeout(timeout);
        if let Some(cookie) = cookie {
            let header = Zeroizing::new(format!("{SESSION_COOKIE}={cookie}"));
            request = request.set("Cookie", &header);
        }
        if let Some(token) = bearer {
            let header = Zeroizing::new(format!("Bearer {token}"));
            request = request.set("Authorization", &header);
        }
        Self::finish(&url, request.call())
    }
}

impl HttpTransport {
    /// `POST` raw bytes with `Authorization: Bearer <token>` (the KBS admin API: reference
    /// values, policies, resources).
    pub fn post_admin(
        &mut self,
        path: &str,
        body: &[u8],
        content_type: &str,
        bearer: &str,
        timeout: Duration,
    ) -> Result<HttpResponse, TransportError> {
        let url = format!("{}{path}", self.base);
        let header = Zeroizing::new(format!("Bearer {bearer}"));
        let request = self
            .agent
            .post(&url)
            .timeout(timeout)
            .set("Content-Type", content_type)
            .set("Authorization", &header);
        Self::finish(&url, request.send_bytes(body))
    }
}

/// Sorts a `ureq` transport error into a [`TransportErrorKind`], looking through the whole
/// source chain (including the payloads of `io::Error`s) for `rustls` and timeout errors.
fn classify(url: &str, error: &ureq::Transport) -> TransportError {
    let mut kind = match error.kind() {
        ureq::ErrorKind::Dns | ureq::ErrorKind::ConnectionFailed => TransportErrorKind::Connect,
        ureq::ErrorKind::InvalidUrl
        | ureq::ErrorKind::UnknownScheme
        | ureq::ErrorKind::InsecureRequestHttpsOnly
        | ureq::ErrorKind::TooManyRedirects
        | ureq::ErrorKind::InvalidProxyUrl => TransportErrorKind::Config,
        _ => TransportErrorKind::Io,
    };
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(error);
    let mut depth = 0;
    while let Some(err) = current {
        if err.downcast_ref::<rustls::Error>().is_some() {
            kind = TransportErrorKind::Tls;
            break;
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if matches!(
                io.kind(),
                std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
            ) {
                kind = TransportErrorKind::Timeout;
            }
            if let Some(inner) = io.get_ref() {
                if inner.downcast_ref::<rustls::Error>().is_some() {
                    kind = TransportErrorKind::Tls;
                    break;
                }
            }
        }
        depth += 1;
        if depth > 16 {
            break;
        }
        current = err.source();
    }
    let text = chain_text(error);
    let text = text
        .strip_prefix(url)
        .and_then(|t| t.strip_prefix(": "))
        .map(str::to_string)
        .unwrap_or(text);
    // The chain may quote what the server sent (a malformed status line or header).
    TransportError::new(kind, url, super::sanitize(&text))
}

fn io_error(url: &str, error: &std::io::Error) -> TransportError {
    let kind = match error.kind() {
        std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => {
            TransportErrorKind::Timeout
        }
        _ => TransportErrorKind::Io,
    };
    TransportError::new(kind, url, format!("reading the answer: {error}"))
}

/// The error and its causes, `: `-separated, without repeating a cause its parent already
/// printed.
fn chain_text(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut current = error.source();
    let mut depth = 0;
    while let Some(err) = current {
        let part = err.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        depth += 1;
        if depth > 16 {
            break;
        }
        current = err.source();
    }
    text
}
