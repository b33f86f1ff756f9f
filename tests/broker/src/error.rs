//! Errors: the wire shape Trustee answers with, and the broker's own start-up errors.
//!
//! Variant names and status codes follow Trustee's `kbs/src/error.rs` (the `strum::AsRefStr`
//! name of the outer `Error` variant becomes the last segment of the `type` URL). Every
//! authentication, attestation, token and policy failure is 401; only a bad path or an
//! unknown plugin is 404 (KBS-PROTOCOL.md, "Errors").

use std::fmt;
use std::path::PathBuf;

/// Prefix of the `type` field of every error body.
pub const ERROR_TYPE_PREFIX: &str = "https://github.com/confidential-containers/kbs/errors";

/// The error variants the broker answers with, named exactly as Trustee names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// `/auth` or `/attest` failed (Trustee wraps `RcarAuthFailed` / `RcarAttestFailed`
    /// in its outer `AttestationError` variant, so this is the name on the wire).
    AttestationError,
    /// A resource request carried neither an attested session cookie nor a bearer token.
    TokenNotFound,
    /// The attestation token did not verify (signature, expiry, shape, tee-pubkey).
    TokenVerifierError,
    /// The resource policy denied the request (also for a resource with no policy,
    /// that is an unknown resource: the policy is evaluated before the resource is read).
    PolicyDeny,
    /// The resource plugin failed after the policy allowed the request.
    PluginInternalError,
    /// The resource could not be encrypted to the token's tee-pubkey.
    JweError,
    /// The resource path is not `<repo>/<type>/<tag>` with valid segments (404).
    InvalidRequestPath,
    /// No endpoint of that name and method under `/kbs/v0` (404).
    PluginNotFound,
    /// An admin request without a token the `[admin]` config accepts.
    AdminAuthAccess,
    /// A posted policy is not rego this broker can read.
    ParsePolicyError,
    /// A posted reference value is malformed.
    RvpsError,
}

impl ErrorKind {
    /// The variant name as it appears at the end of the `type` URL.
    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::AttestationError => "AttestationError",
            ErrorKind::TokenNotFound => "TokenNotFound",
            ErrorKind::TokenVerifierError => "TokenVerifierError",
            ErrorKind::PolicyDeny => "PolicyDeny",
            ErrorKind::PluginInternalError => "PluginInternalError",
            ErrorKind::JweError => "JweError",
            ErrorKind::InvalidRequestPath => "InvalidRequestPath",
            ErrorKind::PluginNotFound => "PluginNotFound",
            ErrorKind::AdminAuthAccess => "AdminAuthAccess",
            ErrorKind::ParsePolicyError => "ParsePolicyError",
            ErrorKind::RvpsError => "RvpsError",
        }
    }

    /// The HTTP status: 404 for a bad path or unknown endpoint, 401 for everything else.
    pub fn status(self) -> u16 {
        match self {
            ErrorKind::InvalidRequestPath | ErrorKind::PluginNotFound => 404,
            _ => 401,
        }
    }

    /// The full `type` URL of the error body.
    pub fn type_url(self) -> String {
        format!("{ERROR_TYPE_PREFIX}/{}", self.name())
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A failed request: what goes on the wire (`kind`, `detail`) and the broker-side reason
/// that only reaches the request log (Trustee's details are terse; tests want the reason).
#[derive(Debug, Clone)]
pub(crate) struct KbsError {
    pub(crate) kind: ErrorKind,
    pub(crate) detail: String,
    pub(crate) reason: String,
}

impl KbsError {
    /// `/auth` failures: Trustee's detail carries the cause (`RcarAuthFailed` prints its source).
    pub(crate) fn auth(reason: impl Into<String>) -> Self {
        let reason = reason.into();
        KbsError {
            kind: ErrorKind::AttestationError,
            detail: format!("Attestation error: RCAR handshake Auth failed: {reason}"),
            reason,
        }
    }

    /// `/attest` failures: Trustee's detail does not print the cause.
    pub(crate) fn attest(reason: impl Into<String>) -> Self {
        KbsError {
            kind: ErrorKind::AttestationError,
            detail: "Attestation error: RCAR handshake Attest failed".to_string(),
            reason: reason.into(),
        }
    }

    pub(crate) fn token_not_found(reason: impl Into<String>) -> Self {
        KbsError {
            kind: ErrorKind::TokenNotFound,
            detail: "Attestation Token not found".to_string(),
            reason: reason.into(),
        }
    }

    pub(crate) fn token_verifier(reason: impl Into<String>) -> Self {
        KbsError {
            kind: ErrorKind::TokenVerifierError,
            detail: "Token Verifier error".to_string(),
            reason: reason.into(),
        }
    }

    pub(crate) fn policy_deny(reason: impl Into<String>) -> Self {
        KbsError {
            kind: ErrorKind::PolicyDeny,
            detail: "Access denied by policy".to_string(),
            reason: reason.into(),
        }
    }

    pub(crate) fn admin_access(endpoint: &str, reason: impl Into<String>) -> Self {
        KbsError {
            kind: ErrorKind::AdminAuthAccess,
            detail: format!("admin access denied for endpoint {endpoint}"),
            reason: reason.into(),
        }
    }

    pub(crate) fn parse_policy(reason: impl Into<String>) -> Self {
        let reason = reason.into();
        KbsError {
            kind: ErrorKind::ParsePolicyError,
            detail: format!("Failed to parse policy: {reason}"),
            reason,
        }
    }

    pub(crate) fn rvps(reason: impl Into<String>) -> Self {
        let reason = reason.into();
        KbsError {
            kind: ErrorKind::RvpsError,
            detail: format!("RVPS configuration failed: {reason}"),
            reason,
        }
    }

    pub(crate) fn plugin_internal(reason: impl Into<String>) -> Self {
        KbsError {
            kind: ErrorKind::PluginInternalError,
            detail: "Plugin internal error".to_string(),
            reason: reason.into(),
        }
    }

    pub(crate) fn jwe(reason: impl Into<String>) -> Self {
        KbsError {
            kind: ErrorKind::JweError,
            detail: "JWE failed".to_string(),
            reason: reason.into(),
        }
    }

    pub(crate) fn invalid_path(path: &str, reason: impl Into<String>) -> Self {
        KbsError {
            kind: ErrorKind::InvalidRequestPath,
            detail: format!("Request path {path} is invalid"),
            reason: reason.into(),
        }
    }

    pub(crate) fn plugin_not_found(plugin: &str, reason: impl Into<String>) -> Self {
        KbsError {
            kind: ErrorKind::PluginNotFound,
            detail: format!("Plugin {plugin} not found"),
            reason: reason.into(),
        }
    }

    /// The JSON body `{"type": ..., "detail": ...}`.
    pub(crate) fn body(&self) -> Vec<u8> {
        serde_json::json!({ "type": self.kind.type_url(), "detail": self.detail })
            .to_string()
            .into_bytes()
    }
}

/// Why the broker could not be configured or started.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The configuration file could not be read.
    #[error("cannot read broker config {path}: check the path and its permissions")]
    ReadConfig {
        /// The file that was read.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The configuration is not valid TOML of the expected shape.
    #[error("broker config {origin} is not valid: fix the TOML (see tests/broker/README.md)")]
    ParseConfig {
        /// Where the text came from (a path, or `<string>`).
        origin: String,
        /// The TOML error, which names the key.
        #[source]
        source: toml::de::Error,
    },
    /// A value in the configuration is not acceptable.
    #[error("broker config: {0}")]
    InvalidConfig(String),
    /// A resource value file could not be read.
    #[error("cannot read the value of resource {resource} from {path}: check the path")]
    ReadResource {
        /// The resource path `repo/type/tag`.
        resource: String,
        /// The value file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The TLS certificate or key could not be loaded.
    #[error("cannot load TLS {what} from {path}: give a PEM file")]
    Tls {
        /// "certificate chain" or "private key".
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What went wrong.
        detail: String,
    },
    /// rustls refused the certificate/key pair.
    #[error("TLS server configuration rejected the certificate and key: use a matching pair")]
    TlsConfig(#[source] rustls::Error),
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: give a free address such as 127.0.0.1:0")]
    Bind {
        /// The address asked for.
        addr: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Randomness for the token signing key was not available.
    #[error("cannot generate the broker's token signing key from the OS random source")]
    Random,
}
