//! A faithful Trustee KBS 0.4.0 test broker for cvm-warden's tests and demo.
//!
//! It speaks the RCAR protocol of `../shared/KBS-PROTOCOL.md` over HTTP(S): `POST
//! /kbs/v0/auth`, `POST /kbs/v0/attest`, `GET /kbs/v0/resource/<repo>/<type>/<tag>`, with
//! Trustee's error shapes and status codes, a fresh nonce per session, session expiry, the
//! report_data binding, `sample` and `tpm` evidence verification, NVIDIA GPU additional
//! evidence verified as Trustee's Local verifier does ([`nvidia`]), an EAR-shaped ES256
//! token, per-resource policies and a JWE answer. It is never linked into the daemon, and it
//! deliberately shares no code with it: evidence is verified here by an independent
//! implementation, so a bug in cvm-warden's encoder cannot be matched by the same bug here.
//!
//! ```no_run
//! use kbs_test_broker::{Broker, BrokerConfig, RequiredStatus, ResourcePolicy};
//! let config = BrokerConfig { allow_sample: true, ..BrokerConfig::default() }.with_resource(
//!     "default/key/volume",
//!     b"0123456789abcdef0123456789abcdef",
//!     ResourcePolicy::new(&["sample"], RequiredStatus::Warning),
//! );
//! let broker = Broker::start(config, "127.0.0.1:0")?;
//! println!("{}", broker.url());
//! # Ok::<(), kbs_test_broker::BrokerError>(())
//! ```

pub mod admin;
pub mod binding;
mod broker;
pub mod config;
pub mod error;
pub mod evidence;
mod http;
pub mod jwe;
pub mod nvidia;
pub mod token;
pub mod tpm;

pub use admin::AdminConfig;
pub use broker::{
    Broker, RequestRecord, RunningBroker, GPU_DERIVED_KEY, KBS_PROTOCOL_VERSION, SESSION_COOKIE,
};
pub use config::{
    BrokerConfig, Faults, NvidiaConfig, RequiredStatus, ResourceConfig, ResourcePolicy,
    SecretBytes, TlsConfig,
};
pub use error::{BrokerError, ErrorKind, ERROR_TYPE_PREFIX};
