//! Raw policy types: exactly the TOML's shape, strict (`deny_unknown_fields`), nothing
//! checked beyond types. Every field is optional here so that the operator file (a partial
//! policy) has the same shape; `validate` reports what is missing.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;

/// The whole file.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPolicy {
    pub workload: Option<RawWorkload>,
    pub attestation: Option<RawAttestation>,
    pub volume: Option<Vec<RawVolume>>,
    pub secret: Option<Vec<RawSecret>>,
    pub network: Option<RawNetwork>,
    pub lockdown: Option<RawLockdown>,
    pub kernel: Option<RawKernel>,
    pub audit: Option<RawAudit>,
    pub on_failure: Option<String>,
    pub overridable: Option<Vec<String>>,
}

/// `[workload]`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawWorkload {
    pub bundle: Option<String>,
    pub source: Option<String>,
    pub copy_to: Option<String>,
    pub digest: Option<String>,
    pub manifest: Option<String>,
    pub exec: Option<Vec<String>>,
    pub user: Option<RawId>,
    pub group: Option<RawId>,
    pub env: Option<BTreeMap<String, String>>,
    pub workdir: Option<String>,
    pub umask: Option<RawUmask>,
    pub rlimit: Option<Vec<RawRlimit>>,
    pub restart: Option<String>,
    pub max_restarts: Option<Int>,
    pub flare: Option<RawFlare>,
}

/// `[workload.flare]`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawFlare {
    pub startup_kit: Option<String>,
    pub root_ca_sha256: Option<String>,
    pub withheld: Option<Vec<String>>,
}

/// `[[workload.rlimit]]`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRlimit {
    pub resource: Option<String>,
    pub soft: Option<RawLimit>,
    pub hard: Option<RawLimit>,
}

/// `attestation = "none"` or an `[attestation]` table.
// One per policy load: the table's size does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum RawAttestation {
    /// A string (only `"none"` is valid).
    Mode(String),
    /// The table.
    Broker(RawBroker),
}

/// The `[attestation]` table.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawBroker {
    pub tee: Option<String>,
    pub kbs: Option<String>,
    pub kbs_ca: Option<String>,
    pub insecure_sample: Option<bool>,
    pub insecure_http: Option<bool>,
    pub key_wrap: Option<String>,
    pub tries: Option<Int>,
    pub timeout: Option<String>,
    pub tpm: Option<String>,
    pub tpm_ak_handle: Option<String>,
    pub snp_certs: Option<String>,
    pub gpu: Option<Box<RawGpu>>,
    pub reattest_interval: Option<String>,
    pub reattest_grace: Option<String>,
    pub reattest_resource: Option<String>,
}

/// `[attestation.gpu]`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawGpu {
    pub required: Option<bool>,
    pub count: Option<Int>,
    pub arch: Option<Vec<String>>,
    pub min_driver: Option<String>,
    pub min_vbios: Option<String>,
    pub allow_devtools: Option<bool>,
    pub rims: Option<Vec<String>>,
    pub simulate: Option<String>,
}

/// `[[secret]]`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSecret {
    pub name: Option<String>,
    pub resource: Option<String>,
}

/// `[[volume]]`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawVolume {
    pub name: Option<String>,
    pub device: Option<String>,
    pub key: Option<String>,
    pub mount: Option<String>,
    pub format_if_blank: Option<bool>,
    pub integrity: Option<String>,
    pub allow_exec: Option<bool>,
    pub owner: Option<RawId>,
    pub group: Option<RawId>,
    /// Octal digits, like `workload.umask`.
    pub mode: Option<RawUmask>,
}

/// `[network]`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawNetwork {
    pub inbound: Option<Vec<RawInbound>>,
    pub outbound: Option<Vec<RawOutbound>>,
    pub interface: Option<BTreeMap<String, RawInterface>>,
}

/// `[network.interface.<NAME>]`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawInterface {
    pub address: Option<String>,
    pub gateway: Option<String>,
    pub dns: Option<Vec<String>>,
    pub dhcp: Option<bool>,
    pub link_timeout: Option<String>,
}

/// One inbound rule.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawInbound {
    pub port: Option<Int>,
    pub proto: Option<String>,
    pub from: Option<Vec<String>>,
}

/// One outbound rule.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawOutbound {
    pub host: Option<String>,
    pub port: Option<Int>,
    pub proto: Option<String>,
}

/// `[lockdown]`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawLockdown {
    pub consoles: Option<String>,
    pub kernel_lockdown: Option<String>,
    pub modules: Option<Vec<String>>,
}

/// `[kernel]`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawKernel {
    pub modules: Option<Vec<String>>,
}

/// `[audit]`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAudit {
    pub file: Option<String>,
    pub file_dir: Option<String>,
    pub file_required: Option<bool>,
    pub syslog: Option<String>,
    pub console: Option<bool>,
    pub checkpoint_interval: Option<String>,
    pub export: Option<String>,
}

/// A TOML integer (its own type so that type errors say "an integer").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Int(pub i64);

/// A user or group: a name (string) or a numeric id (integer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum RawId {
    Name(String),
    Number(i64),
}

/// An rlimit value: an integer or a string (only `"unlimited"` is valid).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum RawLimit {
    Number(i64),
    Word(String),
}

/// A umask: a string of octal digits (an integer is kept only to explain the error).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum RawUmask {
    Text(String),
    Number(i64),
}

/// Deserializes from a string or an integer into `T` through two constructors.
struct StrOrInt<T> {
    expecting: &'static str,
    text: fn(String) -> T,
    number: fn(i64) -> T,
}

impl<'de, T> Visitor<'de> for StrOrInt<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.expecting)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
        Ok((self.text)(v.to_string()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<T, E> {
        Ok((self.text)(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<T, E> {
        Ok((self.number)(v))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<T, E> {
        match i64::try_from(v) {
            Ok(n) => Ok((self.number)(n)),
            Err(_) => Err(E::invalid_value(de::Unexpected::Unsigned(v), &self)),
        }
    }
}

impl<'de> Deserialize<'de> for RawId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrOrInt {
            expecting: "a name (string) or a numeric id (integer)",
            text: RawId::Name,
            number: RawId::Number,
        })
    }
}

impl<'de> Deserialize<'de> for RawLimit {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrOrInt {
            expecting: "an integer or \"unlimited\"",
            text: RawLimit::Word,
            number: RawLimit::Number,
        })
    }
}

impl<'de> Deserialize<'de> for RawUmask {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrOrInt {
            expecting: "a string of octal digits such as \"0077\"",
            text: RawUmask::Text,
            number: RawUmask::Number,
        })
    }
}

impl<'de> Deserialize<'de> for Int {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct IntVisitor;
        impl Visitor<'_> for IntVisitor {
            type Value = Int;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an integer")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Int, E> {
                Ok(Int(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Int, E> {
                i64::try_from(v)
                    .map(Int)
                    .map_err(|_| E::invalid_value(de::Unexpected::Unsigned(v), &self))
            }
        }
        d.deserialize_any(IntVisitor)
    }
}

impl<'de> Deserialize<'de> for RawAttestation {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct AttestationVisitor;
        impl<'de> Visitor<'de> for AttestationVisitor {
            type Value = RawAttestation;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an [attestation] table or the string \"none\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawAttestation, E> {
                Ok(RawAttestation::Mode(v.to_string()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<RawAttestation, E> {
                Ok(RawAttestation::Mode(v))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<RawAttestation, A::Error> {
                // The same map access keeps toml's positions for unknown keys.
                RawBroker::deserialize(de::value::MapAccessDeserializer::new(map))
                    .map(RawAttestation::Broker)
            }
        }
        d.deserialize_any(AttestationVisitor)
    }
}
