//! Trustee KBS protocol 0.4.0 client ("RCAR": request, challenge, attestation, response).
//!
//! The wire format is `../shared/KBS-PROTOCOL.md`, followed byte for byte:
//!
//! 1. `POST /kbs/v0/auth` `{"version":"0.4.0","tee":…,"extra-params":""}` → a challenge
//!    (nonce) and the `kbs-session-id` cookie;
//! 2. a fresh ephemeral key ([`TeeKey`], P-256 by default), the 48-byte
//!    [`report_data`] binding (SHA-384 of the JCS of nonce, key and additional evidence) and
//!    the provider's evidence over it;
//! 3. `POST /kbs/v0/attest` → an EAR token;
//! 4. `GET /kbs/v0/resource/<repo>/<type>/<tag>` → a flattened JWE encrypted to the
//!    ephemeral key, opened by [`jwe::decrypt`].
//!
//! Layout: [`binding`] (the report-data hash, also used by auditors), [`key`] (the
//! ephemeral key), [`jwe`] (decryption), [`transport`] (the HTTP seam, the real `ureq` +
//! `rustls` transport pinned to the policy's CA), [`client`] (the protocol, retries,
//! re-handshakes, operator-facing errors) and [`fake`] (a scripted, recording transport and
//! a manual clock for tests of this module and of the stages above it).
//!
//! Secrets — the ephemeral private key, the session cookie, the token and released
//! resources — are zeroized when dropped and never appear in `Debug`, `Serialize`, errors or
//! [`Attempt`] records.

/// The report-data binding (in the verifier crate, which auditors use to recompute it).
pub use cvm_warden_verify::binding;
pub mod admin;
pub mod client;
pub mod fake;
pub mod jwe;
pub mod key;
pub mod transport;
pub mod verdict;

#[cfg(test)]
mod tests;

use std::fmt;
use std::time::Duration;

use serde::Serialize;

pub use binding::{canonical_binding, report_data, BindingError};
pub use client::{
    Attested, Backoff, Client, KbsConfig, KeyGenerator, Released, MAX_COOKIE, MAX_ERROR_DETAIL,
    MAX_ERROR_TYPE, MAX_HANDSHAKES, MAX_NONCE, MAX_RESOURCE_REQUESTS, MAX_TOKEN, MAX_TRIES,
};
pub use jwe::JweError;
pub use key::{KeyWrap, TeeKey};
pub use transport::{
    Clock, HttpResponse, HttpTransport, SystemClock, Transport, TransportError, TransportErrorKind,
};

/// The protocol version this client speaks (sent in every `auth` request).
pub const PROTOCOL_VERSION: &str = "0.4.0";

/// The cookie the broker keeps the session in.
pub const SESSION_COOKIE: &str = "kbs-session-id";

/// Which protocol call a try belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Call {
    /// `POST /kbs/v0/auth`.
    Auth,
    /// `POST /kbs/v0/attest`.
    Attest,
    /// `GET /kbs/v0/resource/…`.
    Resource,
}

impl Call {
    /// `auth`, `attest` or `resource`.
    pub fn as_str(self) -> &'static str {
        match self {
            Call::Auth => "auth",
            Call::Attest => "attest",
            Call::Resource => "resource",
        }
    }
}

impl fmt::Display for Call {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How one try ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// The broker answered with this HTTP status.
    Status(u16),
    /// No answer: the transport error, as text (names the URL, never a secret).
    Error(String),
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Status(code) => write!(f, "HTTP {code}"),
            Outcome::Error(text) => f.write_str(text),
        }
    }
}

/// One try of one protocol call, as reported to the [`Observer`] (and from there to the
/// audit log). Never holds a secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Attempt {
    /// `auth`, `attest` or `resource`.
    pub call: Call,
    /// 1 for the first try of this call, counting up on each retry.
    pub try_no: u32,
    /// The resource (`kbs:///repo/type/tag`) the call is for, if any: set for `resource`
    /// tries and for the handshakes a resource request triggers.
    pub resource: Option<String>,
    /// Status code or transport error.
    pub outcome: Outcome,
    /// Whether the client will try this call again (after a backoff).
    pub will_retry: bool,
}

/// Receives every try the client makes, so the boot stage can audit each one.
pub trait Observer {
    /// Called once per try, after it ended.
    fn attempt(&mut self, attempt: &Attempt);

    /// Called after every successful handshake (also the ones a resource request runs when
    /// the broker answers 401), with what an auditor needs to re-check it.
    fn attested(&mut self, attested: &Attested) {
        let _ = attested;
    }
}

impl<F: FnMut(&Attempt)> Observer for F {
    fn attempt(&mut self, attempt: &Attempt) {
        self(attempt)
    }
}

/// An [`Observer`] that keeps every try (tests, dry runs).
#[derive(Debug, Default, Clone)]
pub struct RecordingObserver {
    /// The tries, in order.
    pub attempts: Vec<Attempt>,
}

impl Observer for RecordingObserver {
    fn attempt(&mut self, attempt: &Attempt) {
        self.attempts.push(attempt.clone());
    }
}

/// Why the key broker exchange failed. Every message names the broker URL, the call or the
/// resource, and what the operator should check; none holds a secret.
#[derive(Debug, thiserror::Error)]
pub enum KbsError {
    /// The client configuration cannot work (URL, CA, limits).
    #[error("key broker configuration: {detail}")]
    Config {
        /// What is wrong and what to do.
        detail: String,
    },
    /// The CA file does not hold a usable certificate.
    #[error("key broker CA {ca}: {detail}; attestation.kbs_ca must hold the PEM certificate(s) the broker's TLS certificate chains to")]
    Ca {
        /// Where the CA came from (the policy's `attestation.kbs_ca`).
        ca: String,
        /// What is wrong with it.
        detail: String,
    },
    /// The broker could not be reached (connection, DNS, timeouts, I/O) after every try.
    #[error("cannot reach the key broker at {url} ({call} call, {tries} tries in {elapsed:?}); check attestation.kbs and the network path to the broker")]
    Unreachable {
        /// The broker base URL.
        url: String,
        /// The call.
        call: Call,
        /// Tries made.
        tries: u32,
        /// Time spent on the whole operation.
        elapsed: Duration,
        /// The last transport error.
        #[source]
        source: TransportError,
    },
    /// The TLS handshake failed (not retried: the certificate will not change).
    #[error("TLS with the key broker at {url} failed ({call} call): its certificate must chain to the CA pinned in {ca} (attestation.kbs_ca; no other roots are trusted) and name the broker's host")]
    Tls {
        /// The broker base URL.
        url: String,
        /// The call.
        call: Call,
        /// The CA the connection is pinned to.
        ca: String,
        /// The TLS error.
        #[source]
        source: TransportError,
    },
    /// The broker kept answering 5xx.
    #[error("the key broker at {url} kept failing the {call} call (last answer HTTP {status}{detail}) after {tries} tries in {elapsed:?}; check the broker's logs and its attestation service")]
    ServerError {
        /// The broker base URL.
        url: String,
        /// The call.
        call: Call,
        /// Last status.
        status: u16,
        /// `: <broker detail>` when the broker said more.
        detail: String,
        /// Tries made.
        tries: u32,
        /// Time spent on the whole operation.
        elapsed: Duration,
    },
    /// `total_timeout` ran out before the call succeeded.
    #[error("the key broker exchange with {url} did not finish within {total:?} ({call} call, {tries} tries, last: {last}); check the broker's load and the network, or raise the total timeout")]
    Timeout {
        /// The broker base URL.
        url: String,
        /// The call in progress.
        call: Call,
        /// The configured total timeout.
        total: Duration,
        /// Tries made of this call.
        tries: u32,
        /// How the last try ended (or `no try left time`).
        last: String,
    },
    /// The broker's resource policy refused to release the resource.
    #[error("the key broker refused the evidence for {uri} (PolicyDeny: {detail}){verdict}; check the broker's resource policy and reference values")]
    PolicyDeny {
        /// The resource.
        uri: String,
        /// The broker's detail.
        detail: String,
        /// What the token the client holds says (`; the broker's token (unverified token
        /// claims) says cpu0: ear.status = …, trust vector …`, see [`verdict`]), or empty.
        verdict: String,
    },
    /// The broker rejected the attestation (`POST /attest` answered 401).
    #[error("the key broker at {url} rejected the {tee} evidence ({variant}: {detail}); check the broker's attestation policy and reference values, and that attestation.tee matches this VM")]
    EvidenceRejected {
        /// The broker base URL.
        url: String,
        /// The TEE kind.
        tee: String,
        /// The broker's error variant.
        variant: String,
        /// The broker's detail.
        detail: String,
    },
    /// The broker refused a resource request [`MAX_RESOURCE_REQUESTS`] times, with fresh
    /// handshakes between.
    #[error("the key broker refused {uri} {requests} times in all, with {handshakes} handshake(s) (HTTP {status}, {variant}: {detail}){verdict}; check that the resource exists on the broker (a missing resource is refused like this too), its resource policy, and the token lifetime")]
    Unauthorized {
        /// The resource.
        uri: String,
        /// Resource requests made (at most [`MAX_RESOURCE_REQUESTS`]).
        requests: u32,
        /// Handshakes run for this request.
        handshakes: u32,
        /// The last status (401 or 403).
        status: u16,
        /// The broker's error variant.
        variant: String,
        /// The broker's detail.
        detail: String,
        /// What the last token said, as for [`KbsError::PolicyDeny`], or empty.
        verdict: String,
    },
    /// The broker answered 404: the path is not one it serves.
    #[error("the key broker at {url} has no {path} (HTTP 404{detail}); check the resource URI segments and that attestation.kbs points at a KBS {version} broker", version = PROTOCOL_VERSION)]
    NotFound {
        /// The broker base URL.
        url: String,
        /// The request path.
        path: String,
        /// `: <broker detail>` when the broker said more.
        detail: String,
    },
    /// The broker answered something this protocol version does not allow.
    #[error("the key broker at {url} answered the {call} call with {what}; check that attestation.kbs points at a Trustee KBS {version} broker", version = PROTOCOL_VERSION)]
    Protocol {
        /// The broker base URL.
        url: String,
        /// The call.
        call: Call,
        /// What was wrong.
        what: String,
    },
    /// The evidence provider failed.
    #[error("cannot produce {tee} evidence for the key broker")]
    Evidence {
        /// The TEE kind.
        tee: String,
        /// Why.
        #[source]
        source: crate::tee::TeeError,
    },
    /// The provider names a TEE kind the protocol does not know.
    #[error("the evidence provider's TEE kind {tee:?} is not a KBS {version} tee value", version = PROTOCOL_VERSION)]
    UnknownTee {
        /// The provider's `tee()`.
        tee: String,
    },
    /// The released resource could not be decrypted.
    #[error("cannot decrypt {uri} as released by the key broker at {url}")]
    Decrypt {
        /// The resource.
        uri: String,
        /// The broker base URL.
        url: String,
        /// Why.
        #[source]
        source: JweError,
    },
    /// The report-data binding could not be computed.
    #[error("cannot compute the report_data binding")]
    Binding(#[source] BindingError),
    /// The ephemeral key could not be made.
    #[error("cannot generate the ephemeral {alg} key: {detail}")]
    Key {
        /// The key algorithm.
        alg: &'static str,
        /// Why.
        detail: String,
    },
}

/// Most characters of one broker-supplied string (an error detail, a header value) shown in
/// a message or audit record.
pub const MAX_SHOWN: usize = 300;

/// Makes broker-provided text safe to put in one line of an error or audit record:
/// [`crate::report::sanitize`] (control and bidi/format characters escaped visibly), cut to
/// [`MAX_SHOWN`] characters.
pub(crate) fn sanitize(text: &str) -> String {
    crate::report::sanitize(text, MAX_SHOWN)
}
