//! Raw → validated. Pure: every problem is collected (not only the first), one line each,
//! `key: the bad value, why; what to do`.

use std::collections::{BTreeSet, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Component, Path, PathBuf};

use super::operator::{check_overridable, covers_audit_file};
use super::raw::{
    Int, RawAttestation, RawAudit, RawBroker, RawGpu, RawId, RawInbound, RawInterface, RawLimit,
    RawLockdown, RawNetwork, RawOutbound, RawPolicy, RawRlimit, RawSecret, RawUmask, RawVolume,
    RawWorkload,
};
use super::types::*;
use super::users::UserDb;
use crate::digest::Digest;

/// Default tmpfs for `source = "copy"`.
pub const DEFAULT_COPY_TO: &str = "/run/cvm-warden/bundle";
/// Default `workload.workdir`.
pub const DEFAULT_WORKDIR: &str = "/";
/// Default `workload.umask`.
pub const DEFAULT_UMASK: u32 = 0o077;
/// Default `workload.max_restarts` with `restart = "on-failure"`.
pub const DEFAULT_MAX_RESTARTS: u32 = 3;
/// Upper bound of `workload.max_restarts`.
pub const MAX_RESTARTS_LIMIT: i64 = 100;

const ROOT_HINT: &str =
    "the workload must not run as root; create an unprivileged user in the image";
const RLIMIT_NAMES: &str = "nofile, nproc, core, as, fsize, stack, memlock";

/// cvm-warden's own runtime directory: the default bundle copy and [`SECRETS_DIR`] are in it.
pub const RUNTIME_DIR: &str = "/run/cvm-warden";

/// Directories of the image a `[[volume]]` may not be mounted on, in, or above (a last
/// component ending in `*` matches by prefix: `/lib*` is `/lib`, `/lib64`, `/libx32`, …).
pub const VOLUME_FORBIDDEN: &[&str] = &[
    RUNTIME_DIR,
    "/etc",
    "/proc",
    "/sys",
    "/dev",
    "/usr",
    "/bin",
    "/sbin",
    "/lib*",
    "/boot",
];

/// Directories `audit.file_dir` may not be, be in, or contain.
pub const AUDIT_DIR_FORBIDDEN: &[&str] = &["/etc", "/proc", "/sys", "/dev", "/usr"];

/// How a path relates to another, component by component.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Overlap {
    /// The same path.
    Is,
    /// Strictly below the other.
    Inside,
    /// Strictly above the other.
    Contains,
}

impl Overlap {
    fn words(self) -> &'static str {
        match self {
            Overlap::Is => "is",
            Overlap::Inside => "is inside",
            Overlap::Contains => "contains",
        }
    }
}

/// How the normalised absolute `path` relates to `pattern` (absolute; its components may end
/// in `*` to match by prefix), and the part of `path` that matched when it is the same or
/// inside. `None`: neither is inside the other.
fn overlap(path: &Path, pattern: &str) -> Option<(Overlap, PathBuf)> {
    let ours: Vec<Component<'_>> = path.components().collect();
    let theirs: Vec<Component<'_>> = Path::new(pattern).components().collect();
    for (a, b) in ours.iter().zip(&theirs) {
        let matches = match (a, b) {
            (Component::Normal(a), Component::Normal(b)) => {
                match b.to_str().and_then(|b| b.strip_suffix('*')) {
                    Some(prefix) => a.to_str().is_some_and(|a| a.starts_with(prefix)),
                    None => a == b,
                }
            }
            (a, b) => a == b,
        };
        if !matches {
            return None;
        }
    }
    let matched: PathBuf = ours.iter().take(theirs.len()).collect();
    Some(match ours.len().cmp(&theirs.len()) {
        std::cmp::Ordering::Equal => (Overlap::Is, matched),
        std::cmp::Ordering::Greater => (Overlap::Inside, matched),
        std::cmp::Ordering::Less => (Overlap::Contains, PathBuf::from(pattern)),
    })
}

/// A path as `abs_path` would normalise it, or `None` where `abs_path` reports a problem.
fn lexical(value: &str) -> Option<PathBuf> {
    let path = Path::new(value);
    (path.is_absolute()
        && !value.contains('\0')
        && !path.components().any(|c| c == Component::ParentDir))
    .then(|| path.components().collect())
}

/// Whether `name` is a portable environment variable name: `[A-Za-z_][A-Za-z0-9_]*`.
pub(crate) fn is_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Whether `host` is a DNS name or an IPv4 address.
fn is_host_name(host: &str) -> bool {
    if host.parse::<Ipv4Addr>().is_ok() {
        return true;
    }
    let host = host.strip_suffix('.').unwrap_or(host);
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
        // An all-numeric name would be a malformed IPv4 address.
        && !host.split('.').all(|l| l.chars().all(|c| c.is_ascii_digit()))
}

/// Checks `host[:port]` or `[v6][:port]`; returns (host, port).
fn split_host_port(authority: &str) -> Result<(String, Option<u16>), String> {
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (v6, after) = rest
            .split_once(']')
            .ok_or_else(|| "the IPv6 address has no closing \"]\"".to_string())?;
        v6.parse::<Ipv6Addr>()
            .map_err(|_| format!("{v6:?} is not an IPv6 address"))?;
        let port = match after {
            "" => None,
            p => Some(
                p.strip_prefix(':')
                    .ok_or_else(|| format!("unexpected {p:?} after the address"))?,
            ),
        };
        (format!("[{v6}]"), port)
    } else {
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        };
        if host.is_empty() {
            return Err("the host is empty".to_string());
        }
        if !is_host_name(host) {
            return Err(format!("{host:?} is not a host name or address"));
        }
        (host.to_string(), port)
    };
    let port = match port {
        None => None,
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n > 0 && p.chars().all(|c| c.is_ascii_digit()) => Some(n),
            _ => return Err(format!("port {p:?} is not a number from 1 to 65535")),
        },
    };
    Ok((host, port))
}

/// A key broker URL (`attestation.kbs`): `https://host[:port][/path]` or `http://…`, read
/// by the `url` crate (the parser `ureq` uses) and held to the policy's rules. The policy
/// checks it; the KBS client and the firewall read the broker's address through it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    /// `https://` (else `http://`).
    pub https: bool,
    /// A host name (lowercase), a dotted IPv4 address, or an IPv6 address (no brackets).
    pub host: String,
    /// The port written, else 443 (`https`) or 80 (`http`).
    pub port: u16,
    /// The path, `/` when none is written.
    pub path: String,
}

/// Why a text is not a [`BrokerUrl`]. The display is the reason only: the caller names the
/// key, shows the value through [`BrokerUrl::redacted`] and says what to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BrokerUrlError {
    /// Not `https://` or `http://` (as written, lowercase).
    Scheme,
    /// Whitespace or control characters anywhere.
    Characters,
    /// A backslash (the URL standard reads it as `/`).
    Backslash,
    /// No host after `://`.
    NoHost,
    /// The port is not from 1 to 65535 (the port as written, when it can be shown).
    Port(Option<String>),
    /// A host that is not a DNS name or an IP address.
    Host(String),
    /// The URL parser reads the host differently than it is written (`10.1` is `10.0.0.1`,
    /// `010.0.0.1` is `8.0.0.1`, percent escapes, international names).
    NotAsWritten {
        /// The host as the parser reads it.
        host: String,
    },
    /// `user[:password]@` before the host.
    UserInfo,
    /// `?query` or `#fragment`.
    QueryOrFragment,
    /// Any other refusal of the URL parser (a malformed IPv4 or IPv6 address, …).
    Parse(url::ParseError),
}

impl std::fmt::Display for BrokerUrlError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Scheme => write!(f, "the scheme must be https:// or http://"),
            Self::Characters => write!(f, "it contains spaces or control characters"),
            Self::Backslash => write!(f, "it contains a backslash; separate path segments with /"),
            Self::NoHost => write!(f, "the host is empty"),
            Self::Port(Some(port)) => write!(f, "port {port:?} is not a number from 1 to 65535"),
            Self::Port(None) => write!(f, "the port is not a number from 1 to 65535"),
            Self::Host(host) => write!(f, "{host:?} is not a host name or address"),
            Self::NotAsWritten { host } => write!(
                f,
                "the URL parser reads the host as {host}, not as written; write {host}"
            ),
            Self::UserInfo => write!(
                f,
                "user information (user:password@) is not allowed and is not shown here: \
                 credentials never belong in a policy"
            ),
            Self::QueryOrFragment => write!(f, "a query or fragment is not allowed"),
            Self::Parse(e) => write!(f, "the host is not a host name or address: {e}"),
        }
    }
}

impl std::error::Error for BrokerUrlError {}

impl BrokerUrl {
    /// Parses and checks `text`; https:// is not required here (the policy and the KBS
    /// client each refuse http:// without `insecure_http`).
    pub fn parse(text: &str) -> Result<Self, BrokerUrlError> {
        use url::ParseError as P;
        if text.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(BrokerUrlError::Characters);
        }
        if text.contains('\\') {
            return Err(BrokerUrlError::Backslash);
        }
        let url = url::Url::parse(text).map_err(|e| match e {
            P::RelativeUrlWithoutBase => BrokerUrlError::Scheme,
            P::EmptyHost => BrokerUrlError::NoHost,
            P::InvalidPort => BrokerUrlError::Port(written_port(text)),
            e => BrokerUrlError::Parse(e),
        })?;
        let https = match url.scheme() {
            "https" => true,
            "http" => false,
            _ => return Err(BrokerUrlError::Scheme),
        };
        // The parser forgives `https:host`, `https:///host` and `HTTPS://`; a policy is
        // written as it is read.
        let after = text
            .strip_prefix(url.scheme())
            .and_then(|rest| rest.strip_prefix("://"))
            .ok_or(BrokerUrlError::Scheme)?;
        if !url.username().is_empty() || url.password().is_some() {
            return Err(BrokerUrlError::UserInfo);
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(BrokerUrlError::QueryOrFragment);
        }
        let (Some(host), Some(as_read)) = (url.host(), url.host_str()) else {
            return Err(BrokerUrlError::NoHost);
        };
        if after.is_empty() || after.starts_with('/') {
            return Err(BrokerUrlError::NoHost);
        }
        let written = after
            .get(..as_read.len())
            .is_some_and(|w| w.eq_ignore_ascii_case(as_read))
            && matches!(
                after.get(as_read.len()..).and_then(|r| r.chars().next()),
                None | Some(':' | '/')
            );
        if !written {
            return Err(BrokerUrlError::NotAsWritten {
                host: as_read.to_string(),
            });
        }
        let host = match host {
            url::Host::Domain(name) if !is_host_name(name) => {
                return Err(BrokerUrlError::Host(name.to_string()))
            }
            url::Host::Domain(name) => name.to_string(),
            url::Host::Ipv4(address) => address.to_string(),
            url::Host::Ipv6(address) => address.to_string(),
        };
        let port = match url.port() {
            Some(0) => return Err(BrokerUrlError::Port(Some("0".to_string()))),
            Some(port) => port,
            None if https => 443,
            None => 80,
        };
        Ok(Self {
            https,
            host,
            port,
            path: url.path().to_string(),
        })
    }

    /// `text` as it may be shown in a message: without its user information, if it has any
    /// (credentials never go into an error, a log or the audit trail).
    pub fn redacted(text: &str) -> String {
        match url::Url::parse(text) {
            Ok(url) if url.username().is_empty() && url.password().is_none() => text.to_string(),
            Ok(mut url) => {
                if url.set_username("").is_ok() && url.set_password(None).is_ok() {
                    url.to_string()
                } else {
                    "(a URL with user information, not shown)".to_string()
                }
            }
            Err(_) if text.contains('@') => "(a URL with an @, not shown)".to_string(),
            Err(_) => text.to_string(),
        }
    }

    /// `host:port`, the host in brackets when it is an IPv6 address.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// The port as written in a URL whose port the parser refused, for the message only.
fn written_port(text: &str) -> Option<String> {
    let after = text.split_once("://")?.1;
    let authority = after.split(['/', '?', '#']).next()?;
    let (_, port) = authority.rsplit_once(':')?;
    (!port.contains(']')).then(|| port.to_string())
}

/// A CIDR in canonical form (`10.0.0.0/8`, `fd00::/8`), or why not.
fn canonical_cidr(text: &str) -> Result<String, String> {
    let (addr, prefix) = text
        .split_once('/')
        .ok_or_else(|| "it has no prefix length".to_string())?;
    let addr: IpAddr = addr
        .parse()
        .map_err(|_| format!("{addr:?} is not an IP address"))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let prefix: u32 = match prefix.parse() {
        Ok(p) if p <= max && prefix.chars().all(|c| c.is_ascii_digit()) => p,
        _ => return Err(format!("prefix length {prefix:?} is not from 0 to {max}")),
    };
    let network = match addr {
        IpAddr::V4(a) => {
            let mask = u32::MAX.checked_shl(32 - prefix).unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask))
        }
        IpAddr::V6(a) => {
            let mask = u128::MAX.checked_shl(128 - prefix).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask))
        }
    };
    if network != addr {
        return Err(format!(
            "it has host bits set; write \"{network}/{prefix}\""
        ));
    }
    Ok(format!("{network}/{prefix}"))
}

/// Collects the problems while validating.
struct Check<'a> {
    problems: Vec<String>,
    /// Keys set by the operator file, and its name, to say where a bad value came from.
    overridden: HashSet<&'a str>,
    operator_label: &'a str,
}

impl Check<'_> {
    fn error(&mut self, key: &str, message: impl std::fmt::Display) {
        // The key itself or a table or array above it (constant time per key).
        let from_operator = self.overridden.contains(key)
            || key.char_indices().any(|(i, ch)| {
                matches!(ch, '.' | '[') && key.get(..i).is_some_and(|k| self.overridden.contains(k))
            });
        if from_operator {
            self.problems
                .push(format!("{key} (set by {}): {message}", self.operator_label));
        } else {
            self.problems.push(format!("{key}: {message}"));
        }
    }

    fn missing(&mut self, key: &str, what_to_do: &str) {
        self.error(key, format!("missing; {what_to_do}"));
    }

    /// An absolute path without `..`, normalised (no `.`, no repeated or trailing `/`).
    fn abs_path(&mut self, key: &str, value: &str, example: &str) -> Option<PathBuf> {
        if value.contains('\0') {
            self.error(
                key,
                format!("{value:?} contains a NUL character; remove it"),
            );
            return None;
        }
        let path = Path::new(value);
        if !path.is_absolute() {
            self.error(
                key,
                format!(
                    "{value:?} is not an absolute path; write the full path inside the image, e.g. {example:?}"
                ),
            );
            return None;
        }
        if path.components().any(|c| c == Component::ParentDir) {
            self.error(
                key,
                format!(
                    "{value:?} contains \"..\"; write the path without \"..\", e.g. {example:?}"
                ),
            );
            return None;
        }
        Some(path.components().collect())
    }

    fn opt_path(&mut self, key: &str, value: Option<&String>, example: &str) -> Option<PathBuf> {
        value.and_then(|v| self.abs_path(key, v, example))
    }

    fn port(&mut self, key: &str, value: Option<Int>) -> Option<u16> {
        match value {
            None => {
                self.missing(key, "write a port number from 1 to 65535");
                None
            }
            Some(Int(n)) => match u16::try_from(n) {
                Ok(p) if p > 0 => Some(p),
                _ => {
                    self.error(
                        key,
                        format!("{n} is out of range; write a port number from 1 to 65535"),
                    );
                    None
                }
            },
        }
    }

    fn proto(&mut self, key: &str, value: Option<&String>) -> Option<Proto> {
        match value.map(String::as_str) {
            None | Some("tcp") => Some(Proto::Tcp),
            Some("udp") => Some(Proto::Udp),
            Some(other) => {
                self.error(
                    key,
                    format!("{other:?} is not a protocol; write \"tcp\" or \"udp\""),
                );
                None
            }
        }
    }

    fn id(&mut self, key: &str, n: i64, what: &str) -> Option<u32> {
        match u32::try_from(n) {
            Ok(id) if id != u32::MAX => Some(id),
            _ => {
                self.error(
                    key,
                    format!("{n} is not a valid {what}; write a number from 1 to 4294967294"),
                );
                None
            }
        }
    }
}

/// Validates a (merged) raw policy. `overridden` are the keys the operator file set, named
/// `operator_label` in messages.
pub(crate) fn validate(
    raw: &RawPolicy,
    users: &dyn UserDb,
    overridden: &[String],
    operator_label: &str,
) -> Result<Policy, Vec<String>> {
    let mut c = Check {
        problems: Vec::new(),
        overridden: overridden.iter().map(String::as_str).collect(),
        operator_label,
    };
    let workload = workload(&mut c, raw.workload.as_ref(), users);
    let attestation = attestation(&mut c, raw.attestation.as_ref());
    let volumes = volumes(
        &mut c,
        raw.volume.as_deref().unwrap_or_default(),
        raw.workload.as_ref(),
        workload.as_ref().map(|w| &w.user),
        users,
    );
    let secrets = secrets(&mut c, raw.secret.as_deref().unwrap_or_default());
    if matches!(attestation, Some(Attestation::None)) {
        if !volumes.is_empty() {
            c.error("volume", "attestation = \"none\" releases no keys, so no volume can be unlocked; configure [attestation] with a TEE and a key broker, or remove the [[volume]] entries");
        }
        if !secrets.is_empty() {
            c.error("secret", "attestation = \"none\" releases no secrets; configure [attestation] with a TEE and a key broker, or remove the [[secret]] entries");
        }
    }
    // Without a runtime register the broker's evidence cannot show the bundle: the
    // launch-measured policy's pin is then the only thing that keeps a changed bundle from
    // getting keys.
    if let (
        Some(Attestation::Broker {
            tee: tee @ (Tee::Snp | Tee::Tdx),
            ..
        }),
        Some(workload),
    ) = (&attestation, &workload)
    {
        if workload.digest.is_none() {
            let name = if *tee == Tee::Snp { "snp" } else { "tdx" };
            c.missing(
                "workload.digest",
                &format!("tee = \"{name}\" has no runtime register, so the key broker cannot see the bundle; pin the bundle digest (cvm-warden measure prints it) so a changed bundle stops the boot before keys are asked for"),
            );
        }
    }
    if matches!(attestation, Some(Attestation::Broker { .. })) && raw.network.is_none() {
        c.missing(
            "network",
            "a key broker is configured, so the default-deny perimeter must be up before any key is asked for; add a [network] table (with no inbound or outbound entries only the broker is reachable during the boot, and nothing afterwards)",
        );
    }
    let network = raw.network.as_ref().and_then(|n| network(&mut c, n));
    let lockdown = raw.lockdown.as_ref().and_then(|l| lockdown(&mut c, l));
    let kernel = Kernel {
        modules: module_names(
            &mut c,
            "kernel.modules",
            raw.kernel.as_ref().and_then(|k| k.modules.as_deref()),
        )
        .unwrap_or_default(),
    };
    let file_overridable = raw
        .overridable
        .iter()
        .flatten()
        .any(|key| covers_audit_file(key));
    let audit = audit(&mut c, raw.audit.as_ref(), file_overridable);
    let on_failure = match raw.on_failure.as_deref() {
        None | Some("poweroff") => Some(FailureAction::Poweroff),
        Some("halt") => Some(FailureAction::Halt),
        Some(other) => {
            c.error(
                "on_failure",
                format!("{other:?} is not a failure action; write \"poweroff\" or \"halt\""),
            );
            None
        }
    };
    let (overridable_problems, _) = check_overridable(raw.overridable.as_deref().unwrap_or(&[]));
    c.problems.extend(overridable_problems);

    match (workload, attestation, audit, on_failure) {
        (Some(workload), Some(attestation), Some(audit), Some(on_failure))
            if c.problems.is_empty() =>
        {
            Ok(Policy {
                workload,
                attestation,
                volumes,
                secrets,
                network,
                lockdown,
                kernel,
                audit,
                on_failure,
                overridable: raw.overridable.clone().unwrap_or_default(),
            })
        }
        _ => Err(c.problems),
    }
}

fn workload(c: &mut Check<'_>, raw: Option<&RawWorkload>, users: &dyn UserDb) -> Option<Workload> {
    let Some(raw) = raw else {
        c.missing(
            "workload",
            "add a [workload] table with at least bundle, source, exec and user",
        );
        return None;
    };
    let bundle = match &raw.bundle {
        None => {
            c.missing(
                "workload.bundle",
                "write the directory to measure, e.g. bundle = \"/opt/flare\"",
            );
            None
        }
        Some(b) => c.abs_path("workload.bundle", b, "/opt/flare"),
    };
    let source = bundle_source(c, raw, bundle.as_deref());
    // Some(None): not set; None: set but invalid.
    let digest = match raw.digest.as_deref() {
        None => Some(None),
        Some(d) => match d.parse::<Digest>() {
            Ok(digest) => Some(Some(digest)),
            Err(_) => {
                c.error(
                    "workload.digest",
                    format!(
                        "{d:?} is not a digest; write \"sha256:\" followed by 64 lowercase hex digits, as `cvm-warden measure` prints it"
                    ),
                );
                None
            }
        },
    };
    let manifest = match raw.manifest.as_deref() {
        None => Some(None),
        Some(m) => c
            .abs_path("workload.manifest", m, "/etc/cvm-warden/manifest.json")
            .map(Some),
    };
    let exec = exec(c, raw.exec.as_deref());
    let user = identity(c, raw.user.as_ref(), raw.group.as_ref(), users);
    let env = env(c, raw.env.as_ref());
    let workdir = match &raw.workdir {
        None => Some(PathBuf::from(DEFAULT_WORKDIR)),
        Some(w) => c.abs_path("workload.workdir", w, "/workspace"),
    };
    let umask = umask(c, raw.umask.as_ref());
    let rlimits = rlimits(c, raw.rlimit.as_deref().unwrap_or_default());
    let restart = restart(c, raw.restart.as_deref(), raw.max_restarts);
    let flare = match &raw.flare {
        None => Some(None),
        Some(f) => flare(c, f, bundle.as_deref()).map(Some),
    };
    Some(Workload {
        bundle: bundle?,
        source: source?,
        digest: digest?,
        manifest: manifest?,
        exec: exec?,
        user: user?,
        env: env?,
        workdir: workdir?,
        umask: umask?,
        rlimits: rlimits?,
        restart: restart?,
        flare: flare?,
    })
}

/// `[workload.flare]`: the kit path made relative to the bundle, the root CA pin, the
/// withheld entries.
fn flare(c: &mut Check<'_>, raw: &super::raw::RawFlare, bundle: Option<&Path>) -> Option<FlareKit> {
    let startup_kit = match raw.startup_kit.as_deref() {
        None => {
            c.missing(
                "workload.flare.startup_kit",
                "write the participant folder that `nvflare provision` wrote (it holds startup/, local/, transfer/), relative to workload.bundle, e.g. startup_kit = \"site-1\"",
            );
            None
        }
        Some(text) => flare_kit_path(c, text, bundle),
    };
    let root_ca_sha256 = match raw.root_ca_sha256.as_deref() {
        None => {
            c.missing(
                "workload.flare.root_ca_sha256",
                "pin the project's root CA: write the SHA-256 fingerprint of the kit's startup/rootCA.pem, as `openssl x509 -in startup/rootCA.pem -noout -fingerprint -sha256` prints it",
            );
            None
        }
        Some(text) => {
            let parsed = parse_fingerprint(text);
            if parsed.is_none() {
                c.error(
                    "workload.flare.root_ca_sha256",
                    format!("{text:?} is not a SHA-256 fingerprint; write what `openssl x509 -in startup/rootCA.pem -noout -fingerprint -sha256` prints after \"=\" (32 hex pairs with colons), 64 hex digits, or \"sha256:\" and 64 lowercase hex digits"),
                );
            }
            parsed
        }
    };
    let mut withheld = Vec::new();
    let mut ok = true;
    for (i, text) in raw.withheld.iter().flatten().enumerate() {
        let key = format!("workload.flare.withheld[{i}]");
        let Some(path) = relative_path(c, &key, text, "startup/client.key") else {
            ok = false;
            continue;
        };
        let path = path.to_string_lossy().into_owned();
        let name = path.rsplit('/').next().unwrap_or_default();
        if path.is_empty() || name == "signature.json" || path == "startup/rootCA.pem" {
            c.error(
                &key,
                format!("{text:?} cannot be withheld: the kit's signatures and root CA must be in the bundle; list signed files the key broker releases, e.g. \"startup/client.key\""),
            );
            ok = false;
        } else if withheld.contains(&path) {
            c.error(&key, format!("{text:?} is listed twice; remove one"));
            ok = false;
        } else {
            withheld.push(path);
        }
    }
    Some(FlareKit {
        startup_kit: startup_kit?,
        root_ca_sha256: root_ca_sha256?,
        withheld: ok.then_some(withheld)?,
    })
}

/// A path inside the bundle: relative (no `..`), or absolute below `bundle`; returned relative.
fn flare_kit_path(c: &mut Check<'_>, text: &str, bundle: Option<&Path>) -> Option<PathBuf> {
    let key = "workload.flare.startup_kit";
    if !Path::new(text).is_absolute() {
        return relative_path(c, key, text, "site-1");
    }
    let path = c.abs_path(key, text, "/opt/flare/site-1")?;
    let bundle = bundle?;
    match path.strip_prefix(bundle) {
        Ok(rel) => Some(rel.to_path_buf()),
        Err(_) => {
            c.error(
                key,
                format!(
                    "{text:?} is outside workload.bundle {:?}; the kit must be in the bundle, so that it is measured and (with source = \"copy\") read from the verified copy the workload runs from: move it there, or write it relative to the bundle",
                    bundle.display().to_string()
                ),
            );
            None
        }
    }
}

/// A relative path without `..` or NUL, normalised (no `.`, no repeated or trailing `/`).
fn relative_path(c: &mut Check<'_>, key: &str, text: &str, example: &str) -> Option<PathBuf> {
    let path = Path::new(text);
    if text.contains('\0')
        || path.is_absolute()
        || path.components().any(|p| p == Component::ParentDir)
    {
        c.error(
            key,
            format!("{text:?} is not a relative path inside the kit or bundle (no leading \"/\", no \"..\", no NUL); write e.g. {example:?}"),
        );
        return None;
    }
    Some(
        path.components()
            .filter(|p| *p != Component::CurDir)
            .collect(),
    )
}

/// A SHA-256 fingerprint: `sha256:<hex>`, 64 hex digits, or openssl's 32 colon-separated pairs.
fn parse_fingerprint(text: &str) -> Option<Digest> {
    let text = text.trim();
    if let Ok(digest) = text.parse::<Digest>() {
        return Some(digest);
    }
    let hex_digits: String = if text.contains(':') {
        let pairs: Vec<&str> = text.split(':').collect();
        if pairs.len() != 32 || pairs.iter().any(|p| p.len() != 2) {
            return None;
        }
        pairs.concat()
    } else {
        text.to_string()
    };
    let mut out = [0u8; 32];
    hex::decode_to_slice(&hex_digits, &mut out).ok()?;
    Some(Digest(out))
}

fn bundle_source(
    c: &mut Check<'_>,
    raw: &RawWorkload,
    bundle: Option<&Path>,
) -> Option<BundleSource> {
    let source = match raw.source.as_deref() {
        None => {
            c.missing(
                "workload.source",
                "write where the bundle's bytes live: \"initramfs\" (inside the measured initramfs), \"copy\" (copied into tmpfs while measured) or \"verity\"",
            );
            return None;
        }
        Some(s) => s,
    };
    if source != "copy" {
        if let Some(copy_to) = &raw.copy_to {
            c.error(
                "workload.copy_to",
                format!(
                    "{copy_to:?} is only used with source = \"copy\"; remove it or set workload.source = \"copy\""
                ),
            );
        }
    }
    match source {
        "initramfs" => Some(BundleSource::Initramfs),
        "verity" => Some(BundleSource::Verity),
        "copy" => {
            let into = match &raw.copy_to {
                None => PathBuf::from(DEFAULT_COPY_TO),
                Some(p) => c.abs_path("workload.copy_to", p, DEFAULT_COPY_TO)?,
            };
            if let Some(bundle) = bundle {
                if into.starts_with(bundle) || bundle.starts_with(&into) {
                    c.error(
                        "workload.copy_to",
                        format!(
                            "{:?} overlaps workload.bundle {:?}; choose a directory outside the bundle, e.g. {DEFAULT_COPY_TO:?}",
                            into.display().to_string(),
                            bundle.display().to_string()
                        ),
                    );
                    return None;
                }
            }
            Some(BundleSource::Copy { into })
        }
        other => {
            c.error(
                "workload.source",
                format!(
                    "{other:?} is not a bundle source; write \"initramfs\", \"copy\" or \"verity\""
                ),
            );
            None
        }
    }
}

fn exec(c: &mut Check<'_>, raw: Option<&[String]>) -> Option<Vec<String>> {
    let Some(args) = raw else {
        c.missing(
            "workload.exec",
            "write the workload's command line, e.g. exec = [\"/opt/flare/startup/start.sh\"]",
        );
        return None;
    };
    let Some(program) = args.first() else {
        c.error(
            "workload.exec",
            "the command line is empty; write the program and its arguments, e.g. exec = [\"/opt/flare/startup/start.sh\"]",
        );
        return None;
    };
    let mut ok = true;
    if !program.starts_with('/') {
        c.error(
            "workload.exec[0]",
            format!(
                "{program:?} is not an absolute path; write the full path inside the image, e.g. \"/opt/flare/startup/start.sh\""
            ),
        );
        ok = false;
    }
    for (i, arg) in args.iter().enumerate() {
        if arg.contains('\0') {
            c.error(
                &format!("workload.exec[{i}]"),
                format!("{arg:?} contains a NUL character; remove it"),
            );
            ok = false;
        }
    }
    ok.then(|| args.to_vec())
}

fn identity(
    c: &mut Check<'_>,
    user: Option<&RawId>,
    group: Option<&RawId>,
    users: &dyn UserDb,
) -> Option<Identity> {
    let explicit_gid = match group {
        None => None,
        Some(RawId::Number(n)) => Some(c.id("workload.group", *n, "gid")?),
        Some(RawId::Name(name)) => match users.group_by_name(name) {
            Some(gid) => Some(gid),
            None => {
                c.error(
                    "workload.group",
                    format!(
                        "no group {name:?} in the image's group file; create the group in the image or write a numeric gid"
                    ),
                );
                return None;
            }
        },
    };
    let (name, uid, primary_gid) = match user {
        None => {
            c.missing(
                "workload.user",
                "write the unprivileged user the workload runs as, e.g. user = \"flare\"",
            );
            return None;
        }
        Some(RawId::Name(name)) => match users.user_by_name(name) {
            Some((uid, gid)) => (name.clone(), uid, Some(gid)),
            None => {
                c.error(
                    "workload.user",
                    format!(
                        "no user {name:?} in the image's passwd file; create the user in the image, or write a numeric uid and set workload.group"
                    ),
                );
                return None;
            }
        },
        Some(RawId::Number(n)) => {
            let uid = c.id("workload.user", *n, "uid")?;
            let primary = users.user_by_uid(uid).map(|(_, gid)| gid);
            if primary.is_none() && group.is_none() {
                c.error(
                    "workload.user",
                    format!("numeric user {uid} has no passwd entry; set `workload.group`"),
                );
                return None;
            }
            (uid.to_string(), uid, primary)
        }
    };
    let written = match user {
        Some(RawId::Name(n)) => format!("{n:?}"),
        _ => name.clone(),
    };
    if uid == 0 {
        c.error("workload.user", format!("{written} is uid 0; {ROOT_HINT}"));
        return None;
    }
    let gid = match (explicit_gid, primary_gid) {
        (Some(gid), _) => {
            if gid == 0 {
                let g = match group {
                    Some(RawId::Name(n)) => format!("{n:?}"),
                    _ => "0".to_string(),
                };
                c.error("workload.group", format!("{g} is gid 0; {ROOT_HINT}"));
                return None;
            }
            gid
        }
        (None, Some(gid)) => {
            if gid == 0 {
                c.error(
                    "workload.user",
                    format!(
                        "{written} has primary group 0 (root); {ROOT_HINT}, or set workload.group to an unprivileged group"
                    ),
                );
                return None;
            }
            gid
        }
        (None, None) => return None,
    };
    Some(Identity { name, uid, gid })
}

fn env(
    c: &mut Check<'_>,
    raw: Option<&std::collections::BTreeMap<String, String>>,
) -> Option<Vec<(String, String)>> {
    let mut ok = true;
    let mut out = Vec::new();
    for (name, value) in raw.into_iter().flatten() {
        let key = format!("workload.env.{name}");
        if !is_env_name(name) {
            c.error(
                &key,
                format!(
                    "{name:?} is not a valid environment variable name; use letters, digits and \"_\", not starting with a digit"
                ),
            );
            ok = false;
        } else if value.contains('\0') {
            c.error(
                &key,
                format!("{value:?} contains a NUL character; remove it"),
            );
            ok = false;
        } else {
            out.push((name.clone(), value.clone()));
        }
    }
    ok.then_some(out)
}

fn umask(c: &mut Check<'_>, raw: Option<&RawUmask>) -> Option<u32> {
    match raw {
        None => Some(DEFAULT_UMASK),
        Some(RawUmask::Number(n)) => {
            c.error(
                "workload.umask",
                format!(
                    "{n} is an integer; write the umask as a string of octal digits, e.g. \"0077\""
                ),
            );
            None
        }
        Some(RawUmask::Text(text)) => {
            let valid =
                (3..=4).contains(&text.len()) && text.chars().all(|ch| ('0'..='7').contains(&ch));
            match u32::from_str_radix(text, 8) {
                Ok(mask) if valid && mask <= 0o777 => Some(mask),
                _ => {
                    c.error(
                        "workload.umask",
                        format!("{text:?} is not an octal umask; write 3 or 4 octal digits, e.g. \"0077\""),
                    );
                    None
                }
            }
        }
    }
}

fn rlimit_value(c: &mut Check<'_>, key: &str, raw: Option<&RawLimit>) -> Option<u64> {
    match raw {
        None => {
            c.missing(key, "write a number or \"unlimited\"");
            None
        }
        Some(RawLimit::Number(n)) => match u64::try_from(*n) {
            Ok(v) => Some(v),
            Err(_) => {
                c.error(
                    key,
                    format!("{n} is negative; write a number of 0 or more, or \"unlimited\""),
                );
                None
            }
        },
        Some(RawLimit::Word(w)) if w == "unlimited" => Some(u64::MAX),
        Some(RawLimit::Word(w)) => {
            c.error(
                key,
                format!("{w:?} is not a limit; write a number or \"unlimited\""),
            );
            None
        }
    }
}

fn rlimits(c: &mut Check<'_>, raw: &[RawRlimit]) -> Option<Vec<Rlimit>> {
    let mut ok = true;
    let mut out: Vec<Rlimit> = Vec::new();
    for (i, r) in raw.iter().enumerate() {
        let key = format!("workload.rlimit[{i}]");
        let resource = match r.resource.as_deref() {
            None => {
                c.missing(
                    &format!("{key}.resource"),
                    &format!("write one of {RLIMIT_NAMES}"),
                );
                None
            }
            Some(name) => {
                let resource = match name {
                    "nofile" => Some(RlimitResource::Nofile),
                    "nproc" => Some(RlimitResource::Nproc),
                    "core" => Some(RlimitResource::Core),
                    "as" => Some(RlimitResource::As),
                    "fsize" => Some(RlimitResource::Fsize),
                    "stack" => Some(RlimitResource::Stack),
                    "memlock" => Some(RlimitResource::Memlock),
                    _ => None,
                };
                if resource.is_none() {
                    c.error(
                        &format!("{key}.resource"),
                        format!("{name:?} is not a resource; write one of {RLIMIT_NAMES}"),
                    );
                } else if out.iter().any(|o| Some(o.resource) == resource) {
                    c.error(
                        &format!("{key}.resource"),
                        format!("{name:?} is limited twice; keep one entry per resource"),
                    );
                    ok = false;
                }
                resource
            }
        };
        let soft = rlimit_value(c, &format!("{key}.soft"), r.soft.as_ref());
        let hard = rlimit_value(c, &format!("{key}.hard"), r.hard.as_ref());
        match (resource, soft, hard) {
            (Some(resource), Some(soft), Some(hard)) => {
                if soft > hard {
                    c.error(
                        &key,
                        format!("soft limit {soft} is above hard limit {hard}; lower soft or raise hard"),
                    );
                    ok = false;
                }
                out.push(Rlimit {
                    resource,
                    soft,
                    hard,
                });
            }
            _ => ok = false,
        }
    }
    ok.then_some(out)
}

fn restart(c: &mut Check<'_>, raw: Option<&str>, max: Option<Int>) -> Option<Restart> {
    match raw {
        None | Some("never") => {
            if let Some(Int(n)) = max {
                c.error(
                    "workload.max_restarts",
                    format!("{n} is only used with restart = \"on-failure\"; remove it or set workload.restart = \"on-failure\""),
                );
                return None;
            }
            Some(Restart::Never)
        }
        Some("on-failure") => match max {
            None => Some(Restart::OnFailure {
                max: DEFAULT_MAX_RESTARTS,
            }),
            Some(Int(n)) if (0..=MAX_RESTARTS_LIMIT).contains(&n) => Some(Restart::OnFailure {
                max: u32::try_from(n).unwrap_or(DEFAULT_MAX_RESTARTS),
            }),
            Some(Int(n)) => {
                c.error(
                    "workload.max_restarts",
                    format!("{n} is out of range; write a number from 0 to {MAX_RESTARTS_LIMIT}"),
                );
                None
            }
        },
        Some(other) => {
            c.error(
                "workload.restart",
                format!("{other:?} is not a restart policy; write \"never\" or \"on-failure\""),
            );
            None
        }
    }
}

fn attestation(c: &mut Check<'_>, raw: Option<&RawAttestation>) -> Option<Attestation> {
    match raw {
        None => {
            c.missing(
                "attestation",
                "configure an [attestation] table (tee, kbs), or write attestation = \"none\" for development",
            );
            None
        }
        Some(RawAttestation::Mode(mode)) if mode == "none" => Some(Attestation::None),
        Some(RawAttestation::Mode(mode)) => {
            c.error(
                "attestation",
                format!(
                    "{mode:?} is not valid as a string, only \"none\" (development) is; configure an [attestation] table with tee and kbs"
                ),
            );
            None
        }
        Some(RawAttestation::Broker(broker)) => broker_attestation(c, broker),
    }
}

fn broker_attestation(c: &mut Check<'_>, raw: &RawBroker) -> Option<Attestation> {
    let insecure_sample = raw.insecure_sample.unwrap_or(false);
    let tee = match raw.tee.as_deref() {
        None => {
            c.missing(
                "attestation.tee",
                "write the evidence provider: \"snp\", \"tdx\", \"tpm\" or \"az-snp-vtpm\"",
            );
            None
        }
        Some("snp") => Some(Tee::Snp),
        Some("tdx") => Some(Tee::Tdx),
        Some("tpm") => Some(Tee::Tpm),
        Some("az-snp-vtpm") => Some(Tee::AzSnpVtpm),
        Some("sample") if insecure_sample => Some(Tee::Sample),
        Some("sample") => {
            c.error(
                "attestation.tee",
                "\"sample\" evidence proves nothing; write insecure_sample = true in [attestation] to use it in tests, or use a real TEE",
            );
            None
        }
        Some(other) => {
            c.error(
                "attestation.tee",
                format!(
                    "{other:?} is not an evidence provider; write \"snp\", \"tdx\", \"tpm\", \"az-snp-vtpm\" or \"sample\" (tests only)"
                ),
            );
            None
        }
    };
    if insecure_sample && tee.is_some_and(|t| t != Tee::Sample) {
        c.error(
            "attestation.insecure_sample",
            "true only applies to tee = \"sample\"; remove it",
        );
        return None;
    }
    let kbs = match raw.kbs.as_deref() {
        None => {
            c.missing(
                "attestation.kbs",
                "write the key broker's URL, e.g. kbs = \"https://kbs.example:8999\"",
            );
            None
        }
        Some(url) => match BrokerUrl::parse(url) {
            Ok(_) => Some(url.to_string()),
            Err(why) => {
                c.error(
                    "attestation.kbs",
                    format!(
                        "{:?} is not a key broker URL ({why}); write scheme://host[:port][/path], e.g. \"https://kbs.example:8999\"",
                        BrokerUrl::redacted(url)
                    ),
                );
                None
            }
        },
    };
    let kbs_ca_ok = raw.kbs_ca.is_none();
    let kbs_ca = c.opt_path(
        "attestation.kbs_ca",
        raw.kbs_ca.as_ref(),
        "/etc/cvm-warden/kbs-ca.pem",
    );
    if !kbs_ca_ok && kbs_ca.is_none() {
        return None;
    }
    let insecure_http = raw.insecure_http.unwrap_or(false);
    let mut transport_ok = true;
    if let Some(url) = kbs.as_deref() {
        if url.starts_with("http://") && !insecure_http {
            c.error(
                "attestation.kbs",
                format!(
                    "{url:?} is plain HTTP: keys and evidence would cross the network unprotected; use https:// with kbs_ca, or write insecure_http = true (tests only)"
                ),
            );
            transport_ok = false;
        } else if url.starts_with("https://") && kbs_ca.is_none() {
            c.missing(
                "attestation.kbs_ca",
                "write the CA certificate (PEM) the broker's TLS certificate is pinned to, e.g. kbs_ca = \"/etc/cvm-warden/kbs-ca.pem\"; system roots are never used",
            );
            transport_ok = false;
        } else if insecure_http && !url.starts_with("http://") {
            c.error(
                "attestation.insecure_http",
                "true only applies to an http:// broker URL; remove it",
            );
            transport_ok = false;
        }
    }
    let key_wrap = match raw.key_wrap.as_deref() {
        None | Some("ECDH-ES+A256KW") => Some(KeyWrap::EcdhEsA256kw),
        Some("RSA-OAEP-256") => Some(KeyWrap::RsaOaep256),
        Some(other) => {
            c.error(
                "attestation.key_wrap",
                format!("{other:?} is not a key wrapping algorithm; write \"ECDH-ES+A256KW\" (default) or \"RSA-OAEP-256\""),
            );
            None
        }
    };
    let tries = match raw.tries {
        None => Some(5),
        Some(Int(n)) => match u32::try_from(n) {
            Ok(t @ 1..=10) => Some(t),
            _ => {
                c.error(
                    "attestation.tries",
                    format!("{n} is out of range; write a number of tries from 1 to 10"),
                );
                None
            }
        },
    };
    let timeout_secs = match raw.timeout.as_deref() {
        None => Some(120),
        Some(text) => {
            match humantime::parse_duration(text) {
                Ok(d) if (1..=3600).contains(&d.as_secs()) => Some(d.as_secs()),
                _ => {
                    c.error(
                    "attestation.timeout",
                    format!("{text:?} is not a duration from 1s to 1h; write e.g. \"120s\" or \"5m\""),
                );
                    None
                }
            }
        }
    };
    let tpm = match raw.tpm.as_deref() {
        None => Some("device:/dev/tpmrm0".to_string()),
        Some(t)
            if ["device:", "swtpm:", "mssim:", "tabrmd:"]
                .iter()
                .any(|p| t.starts_with(p)) =>
        {
            Some(t.to_string())
        }
        Some(other) => {
            c.error(
                "attestation.tpm",
                format!("{other:?} is not a TPM connection; write \"device:/dev/tpmrm0\" (default) or \"swtpm:host=127.0.0.1,port=2321\""),
            );
            None
        }
    };
    let tpm_ak_handle = match raw.tpm_ak_handle.as_deref() {
        None => Some(None),
        Some(text) => match text
            .strip_prefix("0x")
            .and_then(|h| u32::from_str_radix(h, 16).ok())
        {
            Some(h) if (0x8100_0000..=0x81FF_FFFF).contains(&h) => Some(Some(h)),
            _ => {
                c.error(
                    "attestation.tpm_ak_handle",
                    format!("{text:?} is not a persistent TPM handle; write one from 0x81000000 to 0x81FFFFFF, e.g. \"0x81010002\", or remove it to create the AK each boot"),
                );
                None
            }
        },
    };
    let snp_certs_ok = raw.snp_certs.is_none();
    let snp_certs = c.opt_path(
        "attestation.snp_certs",
        raw.snp_certs.as_ref(),
        "/etc/cvm-warden/snp-certs",
    );
    if !snp_certs_ok && snp_certs.is_none() {
        return None;
    }
    let gpu_ok = raw.gpu.is_none();
    let gpu = raw.gpu.as_ref().and_then(|g| gpu(c, g));
    if !gpu_ok && gpu.is_none() {
        return None;
    }
    let reattest = reattest(c, raw);
    if !transport_ok {
        return None;
    }
    Some(Attestation::Broker {
        tee: tee?,
        kbs: kbs?,
        kbs_ca,
        insecure_http,
        key_wrap: key_wrap?,
        tries: tries?,
        timeout_secs: timeout_secs?,
        tpm: tpm?,
        tpm_ak_handle: tpm_ak_handle?,
        snp_certs,
        gpu,
        reattest: reattest?,
    })
}

/// `attestation.reattest_interval` (\"0\" or 5s..24h, default 10m), `reattest_grace` (\"0\"
/// or 1s..24h, shorter than the interval; default 5m or half the interval when shorter),
/// `reattest_resource` (a `kbs:///` URI).
fn reattest(c: &mut Check<'_>, raw: &RawBroker) -> Option<Reattest> {
    let interval = match raw.reattest_interval.as_deref() {
        None => Some(DEFAULT_REATTEST_INTERVAL_SECS),
        Some("0") => Some(0),
        Some(text) => match humantime::parse_duration(text) {
            Ok(d) if (5..=86_400).contains(&d.as_secs()) => Some(d.as_secs()),
            _ => {
                c.error(
                    "attestation.reattest_interval",
                    format!("{text:?} is not a duration from 5s to 24h; write e.g. \"10m\", or \"0\" for no re-attestation while the workload runs"),
                );
                None
            }
        },
    };
    // Outer `None`: invalid (reported); inner `None`: not written.
    let grace = match raw.reattest_grace.as_deref() {
        None => Some(None),
        Some("0") => Some(Some(0)),
        Some(text) => match humantime::parse_duration(text) {
            Ok(d) if (1..=86_400).contains(&d.as_secs()) => Some(Some(d.as_secs())),
            _ => {
                c.error(
                    "attestation.reattest_grace",
                    format!("{text:?} is not a duration from 1s to 24h; write e.g. \"5m\", or \"0\" to stop the workload at the first unreachable broker"),
                );
                None
            }
        },
    };
    let resource = match raw.reattest_resource.as_deref() {
        None => Some(None),
        Some(text) => match ResourceUri::parse(text) {
            Ok(uri) => Some(Some(uri)),
            Err(why) => {
                c.error("attestation.reattest_resource", why);
                None
            }
        },
    };
    let interval_secs = interval?;
    // Not written: 5 minutes, or half the interval when that is shorter.
    let grace_secs = grace?.unwrap_or(DEFAULT_REATTEST_GRACE_SECS.min(interval_secs / 2));
    if interval_secs > 0 && grace_secs >= interval_secs {
        c.error(
            "attestation.reattest_grace",
            format!(
                "{:?} is not shorter than attestation.reattest_interval ({interval_secs}s): the retries of one re-attestation must end before the next is due; write a shorter grace, e.g. \"{}s\"",
                raw.reattest_grace.as_deref().unwrap_or_default(),
                interval_secs / 2
            ),
        );
        return None;
    }
    if interval_secs == 0 && raw.reattest_resource.is_some() {
        c.error(
            "attestation.reattest_resource",
            "is set but attestation.reattest_interval = \"0\" turns re-attestation off, so it would never be asked for; remove it or set an interval",
        );
        return None;
    }
    Some(Reattest {
        interval_secs,
        interval_explicit: raw.reattest_interval.is_some(),
        grace_secs,
        resource: resource?,
    })
}

/// `[attestation.gpu]`.
fn gpu(c: &mut Check<'_>, raw: &RawGpu) -> Option<Box<Gpu>> {
    let mut ok = true;
    let count = match raw.count {
        None => None,
        Some(Int(n)) => match u32::try_from(n) {
            Ok(n @ 1..=64) => Some(n),
            _ => {
                c.error(
                    "attestation.gpu.count",
                    format!("{n} is out of range; write the exact number of GPUs, from 1 to 64, or remove it"),
                );
                ok = false;
                None
            }
        },
    };
    let required = raw.required.unwrap_or(true);
    if !required && count.is_some() {
        c.error(
            "attestation.gpu.required",
            "false contradicts count (which requires that many GPUs); remove one of them",
        );
        ok = false;
    }
    let mut arch = Vec::new();
    for (i, name) in raw.arch.iter().flatten().enumerate() {
        match name.as_str() {
            "hopper" => arch.push(GpuArch::Hopper),
            "blackwell" => arch.push(GpuArch::Blackwell),
            other => {
                c.error(
                    &format!("attestation.gpu.arch[{i}]"),
                    format!("{other:?} is not a GPU architecture with confidential computing; write \"hopper\" or \"blackwell\""),
                );
                ok = false;
            }
        }
    }
    let version = |c: &mut Check<'_>,
                   key: &str,
                   value: Option<&String>,
                   radix: u32,
                   example: &str| {
        let text = value?;
        let parts_ok = !text.is_empty()
            && text
                .split('.')
                .all(|p| !p.is_empty() && p.len() <= 8 && u64::from_str_radix(p, radix).is_ok());
        if parts_ok {
            Some(Some(text.clone()))
        } else {
            let digits = if radix == 16 {
                "hexadecimal"
            } else {
                "decimal"
            };
            c.error(
                key,
                format!("{text:?} is not a version; write {digits} numbers separated by dots, e.g. {example:?}"),
            );
            None
        }
    };
    let min_driver = match raw.min_driver.as_ref() {
        None => None,
        Some(_) => match version(
            c,
            "attestation.gpu.min_driver",
            raw.min_driver.as_ref(),
            10,
            "550.90.07",
        ) {
            Some(v) => v,
            None => {
                ok = false;
                None
            }
        },
    };
    let min_vbios = match raw.min_vbios.as_ref() {
        None => None,
        Some(_) => match version(
            c,
            "attestation.gpu.min_vbios",
            raw.min_vbios.as_ref(),
            16,
            "96.00.9f.00.01",
        ) {
            Some(v) => v,
            None => {
                ok = false;
                None
            }
        },
    };
    let mut rims = Vec::new();
    for (i, rim) in raw.rims.iter().flatten().enumerate() {
        match c.abs_path(
            &format!("attestation.gpu.rims[{i}]"),
            rim,
            "/etc/cvm-warden/rims/driver.xml",
        ) {
            Some(path) => rims.push(path),
            None => ok = false,
        }
    }
    let simulate = match raw.simulate.as_ref() {
        None => None,
        Some(path) => match c.abs_path(
            "attestation.gpu.simulate",
            path,
            "/etc/cvm-warden/nvidia-sim/gpu.json",
        ) {
            Some(path) => Some(path),
            None => {
                ok = false;
                None
            }
        },
    };
    ok.then(|| {
        Box::new(Gpu {
            required,
            count,
            arch,
            min_driver,
            min_vbios,
            allow_devtools: raw.allow_devtools.unwrap_or(false),
            rims,
            simulate,
        })
    })
}

fn secrets(c: &mut Check<'_>, raw: &[RawSecret]) -> Vec<Secret> {
    let mut out = Vec::new();
    let mut names = BTreeSet::new();
    for (i, s) in raw.iter().enumerate() {
        let key = |field: &str| format!("secret[{i}].{field}");
        let name = match s.name.as_deref() {
            None => {
                c.missing(
                    &key("name"),
                    "write the file name the workload reads, e.g. name = \"client.key\"",
                );
                None
            }
            Some(n)
                if n.is_empty()
                    || n.len() > 64
                    || n.starts_with('.')
                    || !n
                        .chars()
                        .all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '_' | '-' | '.')) =>
            {
                c.error(
                    &key("name"),
                    format!("{n:?} is not a secret file name; use 1 to 64 letters, digits, \"_\", \"-\" or \".\", not starting with \".\""),
                );
                None
            }
            Some(n) if !names.insert(n.to_string()) => {
                c.error(
                    &key("name"),
                    format!("{n:?} is used by another secret; give each secret its own name"),
                );
                None
            }
            Some(n) => Some(n.to_string()),
        };
        let resource = match s.resource.as_deref() {
            None => {
                c.missing(&key("resource"), "write the broker resource, e.g. resource = \"kbs:///default/secrets/client-key\"");
                None
            }
            Some(r) => match ResourceUri::parse(r) {
                Ok(uri) => Some(uri),
                Err(why) => {
                    c.error(&key("resource"), why);
                    None
                }
            },
        };
        if let (Some(name), Some(resource)) = (name, resource) {
            out.push(Secret {
                path: Path::new(SECRETS_DIR).join(&name),
                name,
                resource,
            });
        }
    }
    out
}

/// The directories a volume may not overlap that the workload decides: the bundle and, with
/// `source = "copy"`, its copy (each with its key), as far as they are valid paths.
fn workload_dirs(workload: Option<&RawWorkload>) -> Vec<(&'static str, PathBuf)> {
    let Some(w) = workload else {
        return Vec::new();
    };
    let mut dirs = Vec::new();
    if let Some(bundle) = w.bundle.as_deref().and_then(lexical) {
        dirs.push(("workload.bundle", bundle));
    }
    if w.source.as_deref() == Some("copy") {
        if let Some(copy) = lexical(w.copy_to.as_deref().unwrap_or(DEFAULT_COPY_TO)) {
            dirs.push(("workload.copy_to", copy));
        }
    }
    dirs
}

/// Why a volume may not be mounted at `mount` (normalised), or `None`.
fn mount_conflict(mount: &Path, workload_dirs: &[(&str, PathBuf)]) -> Option<String> {
    for (key, dir) in workload_dirs {
        let pattern = dir.to_string_lossy();
        if let Some((how, _)) = overlap(mount, &pattern) {
            return Some(format!(
                "{} {key} {pattern:?}: a volume there would hide or change the measured bundle the workload runs from",
                how.words()
            ));
        }
    }
    for pattern in VOLUME_FORBIDDEN {
        if let Some((how, matched)) = overlap(mount, pattern) {
            let what = if *pattern == RUNTIME_DIR {
                "cvm-warden's runtime directory (bundle copy, secrets)"
            } else {
                "the image's system directory"
            };
            return Some(format!(
                "{} {what} {:?}: a volume there would hide or replace files the boot and the workload rely on",
                how.words(),
                matched.to_string_lossy()
            ));
        }
    }
    None
}

fn volumes(
    c: &mut Check<'_>,
    raw: &[RawVolume],
    workload: Option<&RawWorkload>,
    user: Option<&Identity>,
    users: &dyn UserDb,
) -> Vec<Volume> {
    let workload_dirs = workload_dirs(workload);
    let mut out = Vec::new();
    let mut names = BTreeSet::new();
    let mut devices = BTreeSet::new();
    let mut mounts = BTreeSet::new();
    for (i, v) in raw.iter().enumerate() {
        let key = |field: &str| format!("volume[{i}].{field}");
        let name = match v.name.as_deref() {
            None => {
                c.missing(
                    &key("name"),
                    "write a name for the volume, e.g. name = \"workspace\"",
                );
                None
            }
            Some(n)
                if n.is_empty()
                    || n.len() > 64
                    || !n
                        .chars()
                        .all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == '-') =>
            {
                c.error(
                    &key("name"),
                    format!(
                        "{n:?} is not a volume name; use 1 to 64 letters, digits, \"_\" or \"-\""
                    ),
                );
                None
            }
            Some(n) if !names.insert(n.to_string()) => {
                c.error(
                    &key("name"),
                    format!("{n:?} is used by another volume; give each volume its own name"),
                );
                None
            }
            Some(n) => Some(n.to_string()),
        };
        let device = match &v.device {
            None => {
                c.missing(
                    &key("device"),
                    "write the block device, e.g. device = \"/dev/vdb\"",
                );
                None
            }
            Some(d) => c.abs_path(&key("device"), d, "/dev/vdb").and_then(|p| {
                if devices.insert(p.clone()) {
                    Some(p)
                } else {
                    c.error(
                        &key("device"),
                        format!("{d:?} is used by another volume; give each volume its own device"),
                    );
                    None
                }
            }),
        };
        let key_uri = match v.key.as_deref() {
            None => {
                c.missing(&key("key"), "write the broker resource of the key, e.g. key = \"kbs:///default/keys/workspace\"");
                None
            }
            Some(k) => match ResourceUri::parse(k) {
                Ok(uri) => Some(uri),
                Err(why) => {
                    c.error(&key("key"), why);
                    None
                }
            },
        };
        let mount = match &v.mount {
            None => {
                c.missing(&key("mount"), "write the mount point, e.g. mount = \"/workspace\"");
                None
            }
            Some(m) => c.abs_path(&key("mount"), m, "/workspace").and_then(|p| {
                if p == Path::new("/") {
                    c.error(&key("mount"), "\"/\" cannot be a volume's mount point; mount the volume on a directory, e.g. \"/workspace\"");
                    None
                } else if let Some(why) = mount_conflict(&p, &workload_dirs) {
                    c.error(
                        &key("mount"),
                        format!("{m:?} {why}; mount the volume on a directory of its own, e.g. \"/workspace\""),
                    );
                    None
                } else if mounts.insert(p.clone()) {
                    Some(p)
                } else {
                    c.error(&key("mount"), format!("{m:?} is used by another volume; give each volume its own mount point"));
                    None
                }
            }),
        };
        let integrity = match v.integrity.as_deref() {
            None => Some(None),
            Some(mode @ "hmac-sha256") => Some(Some(mode.to_string())),
            Some(other) => {
                c.error(
                    &key("integrity"),
                    format!("{other:?} is not an integrity mode; write \"hmac-sha256\" (dm-integrity with HMAC-SHA-256), or remove it"),
                );
                None
            }
        };
        let owner = volume_owner(c, &key("owner"), v.owner.as_ref(), user, users);
        let group = volume_group(c, &key("group"), v.group.as_ref(), user, users);
        let mode = volume_mode(c, &key("mode"), v.mode.as_ref());
        if let (
            Some(name),
            Some(device),
            Some(key),
            Some(mount),
            Some(integrity),
            Some(owner),
            Some(group),
            Some(mode),
        ) = (name, device, key_uri, mount, integrity, owner, group, mode)
        {
            out.push(Volume {
                name,
                device,
                key,
                mount,
                format_if_blank: v.format_if_blank.unwrap_or(false),
                integrity,
                allow_exec: v.allow_exec.unwrap_or(false),
                owner,
                group,
                mode,
            });
        }
    }
    out
}

/// A numeric owner or group of a volume's root: 0 (root) is allowed, as is any id but -1.
fn volume_id(c: &mut Check<'_>, key: &str, n: i64, what: &str) -> Option<u32> {
    match u32::try_from(n) {
        Ok(id) if id != u32::MAX => Some(id),
        _ => {
            c.error(
                key,
                format!("{n} is not a valid {what}; write a number from 0 to 4294967294"),
            );
            None
        }
    }
}

/// `[[volume]] owner`: a user name from the image's passwd file or a numeric uid; default the
/// workload's uid (`None` without a valid workload: its problem is reported already).
fn volume_owner(
    c: &mut Check<'_>,
    key: &str,
    raw: Option<&RawId>,
    user: Option<&Identity>,
    users: &dyn UserDb,
) -> Option<u32> {
    match raw {
        None => user.map(|u| u.uid),
        Some(RawId::Number(n)) => volume_id(c, key, *n, "uid"),
        Some(RawId::Name(name)) => match users.user_by_name(name) {
            Some((uid, _)) => Some(uid),
            None => {
                c.error(
                    key,
                    format!("no user {name:?} in the image's passwd file; create the user in the image or write a numeric uid"),
                );
                None
            }
        },
    }
}

/// `[[volume]] group`: a group name from the image's group file or a numeric gid; default the
/// workload's gid.
fn volume_group(
    c: &mut Check<'_>,
    key: &str,
    raw: Option<&RawId>,
    user: Option<&Identity>,
    users: &dyn UserDb,
) -> Option<u32> {
    match raw {
        None => user.map(|u| u.gid),
        Some(RawId::Number(n)) => volume_id(c, key, *n, "gid"),
        Some(RawId::Name(name)) => match users.group_by_name(name) {
            Some(gid) => Some(gid),
            None => {
                c.error(
                    key,
                    format!("no group {name:?} in the image's group file; create the group in the image or write a numeric gid"),
                );
                None
            }
        },
    }
}

/// `[[volume]] mode`: 3 or 4 octal digits as a string, at most 07777; default
/// [`DEFAULT_VOLUME_MODE`].
fn volume_mode(c: &mut Check<'_>, key: &str, raw: Option<&RawUmask>) -> Option<u32> {
    match raw {
        None => Some(DEFAULT_VOLUME_MODE),
        Some(RawUmask::Number(n)) => {
            c.error(
                key,
                format!(
                    "{n} is an integer; write the mode as a string of octal digits, e.g. \"0700\""
                ),
            );
            None
        }
        Some(RawUmask::Text(text)) => {
            let valid =
                (3..=4).contains(&text.len()) && text.chars().all(|ch| ('0'..='7').contains(&ch));
            match u32::from_str_radix(text, 8) {
                Ok(mode) if valid => Some(mode),
                _ => {
                    c.error(
                        key,
                        format!("{text:?} is not an octal mode; write 3 or 4 octal digits, e.g. \"0700\""),
                    );
                    None
                }
            }
        }
    }
}

fn inbound(c: &mut Check<'_>, i: usize, raw: &RawInbound) -> Option<InboundRule> {
    let key = format!("network.inbound[{i}]");
    let port = c.port(&format!("{key}.port"), raw.port);
    let proto = c.proto(&format!("{key}.proto"), raw.proto.as_ref());
    let mut from = Vec::new();
    let mut ok = true;
    for (j, cidr) in raw.from.iter().flatten().enumerate() {
        match canonical_cidr(cidr) {
            Ok(canonical) => from.push(canonical),
            Err(why) => {
                c.error(
                    &format!("{key}.from[{j}]"),
                    format!("{cidr:?} is not a CIDR ({why}); write an address and a prefix length, e.g. \"10.0.0.0/8\" or \"fd00::/8\""),
                );
                ok = false;
            }
        }
    }
    if !ok {
        return None;
    }
    Some(InboundRule {
        port: port?,
        proto: proto?,
        from,
    })
}

fn outbound(c: &mut Check<'_>, i: usize, raw: &RawOutbound) -> Option<OutboundRule> {
    let key = format!("network.outbound[{i}]");
    let host = match raw.host.as_deref() {
        None => {
            c.missing(
                &format!("{key}.host"),
                "write the host name or address, e.g. host = \"fl-server.example\"",
            );
            None
        }
        Some(h) => {
            let bare = h
                .strip_prefix('[')
                .and_then(|r| r.strip_suffix(']'))
                .unwrap_or(h);
            if is_host_name(bare) || bare.parse::<Ipv6Addr>().is_ok() {
                Some(bare.to_string())
            } else {
                c.error(
                    &format!("{key}.host"),
                    format!("{h:?} is not a host name or address; write e.g. \"fl-server.example\" or \"10.0.0.5\" (no scheme, no port)"),
                );
                None
            }
        }
    };
    let port = c.port(&format!("{key}.port"), raw.port);
    let proto = c.proto(&format!("{key}.proto"), raw.proto.as_ref());
    Some(OutboundRule {
        host: host?,
        port: port?,
        proto: proto?,
    })
}

fn network(c: &mut Check<'_>, raw: &RawNetwork) -> Option<Network> {
    let mut inbound_rules: Vec<InboundRule> = Vec::new();
    let mut outbound_rules: Vec<OutboundRule> = Vec::new();
    let mut ok = true;
    for (i, r) in raw.inbound.iter().flatten().enumerate() {
        match inbound(c, i, r) {
            Some(rule)
                if inbound_rules
                    .iter()
                    .any(|o| o.port == rule.port && o.proto == rule.proto) =>
            {
                c.error(
                    &format!("network.inbound[{i}]"),
                    format!("port {} is listed twice for the same protocol; merge the entries (list every source in one `from`)", rule.port),
                );
                ok = false;
            }
            Some(rule) => inbound_rules.push(rule),
            None => ok = false,
        }
    }
    for (i, r) in raw.outbound.iter().flatten().enumerate() {
        match outbound(c, i, r) {
            Some(rule) if outbound_rules.contains(&rule) => {
                c.error(
                    &format!("network.outbound[{i}]"),
                    format!("{}:{} is listed twice; remove one", rule.host, rule.port),
                );
                ok = false;
            }
            Some(rule) => outbound_rules.push(rule),
            None => ok = false,
        }
    }
    let mut interfaces = Vec::new();
    for (name, r) in raw.interface.iter().flatten() {
        match interface(c, name, r) {
            Some(iface) => interfaces.push(iface),
            None => ok = false,
        }
    }
    let servers: BTreeSet<IpAddr> = interfaces
        .iter()
        .flat_map(|i| i.dns.iter().copied())
        .collect();
    if servers.len() > MAX_NAMESERVERS {
        c.error(
            "network.interface",
            format!(
                "{} name servers in all ({}); the resolver reads at most {MAX_NAMESERVERS} from /etc/resolv.conf, so list at most {MAX_NAMESERVERS} across the interfaces' `dns`",
                servers.len(),
                servers.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
            ),
        );
        ok = false;
    }
    ok.then_some(Network {
        inbound: inbound_rules,
        outbound: outbound_rules,
        interfaces,
    })
}

/// Most name servers `/etc/resolv.conf` may list (glibc's `MAXNS`).
pub const MAX_NAMESERVERS: usize = 3;

/// Whether `name` is a kernel interface name: 1 to 15 bytes, no `/`, `:`, white space or
/// control characters, not `.` or `..`.
pub(crate) fn is_interface_name(name: &str) -> bool {
    (1..=15).contains(&name.len())
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|ch| ch.is_ascii_graphic() && ch != '/' && ch != ':')
}

/// `A.B.C.D/LEN` with LEN 1..=32; not the network or broadcast address of a prefix below 31.
fn ipv4_with_prefix(text: &str) -> Result<(Ipv4Addr, u8), String> {
    let (addr, len) = text
        .split_once('/')
        .ok_or_else(|| "has no prefix length".to_string())?;
    let addr: Ipv4Addr = addr
        .parse()
        .map_err(|_| format!("{addr:?} is not an IPv4 address"))?;
    let len: u8 = match len.parse::<u8>() {
        Ok(l) if (1..=32).contains(&l) => l,
        _ => return Err(format!("prefix length {len:?} is not from 1 to 32")),
    };
    if len < 31 {
        let host_bits = u32::from(addr) & (u32::MAX >> len);
        if host_bits == 0 {
            return Err(format!("{addr} is the network address of /{len}"));
        }
        if host_bits == u32::MAX >> len {
            return Err(format!("{addr} is the broadcast address of /{len}"));
        }
    }
    if addr.is_unspecified() || addr.is_loopback() || addr.is_multicast() || addr.is_broadcast() {
        return Err(format!("{addr} cannot be an interface's address"));
    }
    Ok((addr, len))
}

fn same_subnet(a: Ipv4Addr, b: Ipv4Addr, prefix: u8) -> bool {
    let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
    u32::from(a) & mask == u32::from(b) & mask
}

fn interface(c: &mut Check<'_>, name: &str, raw: &RawInterface) -> Option<Interface> {
    let key = format!("network.interface.{name}");
    if !is_interface_name(name) {
        c.error(
            &key,
            format!("{name:?} is not an interface name; write the kernel's name (1 to 15 characters, no \"/\", \":\" or spaces), e.g. [network.interface.eth0]"),
        );
        return None;
    }
    if name == "lo" {
        c.error(
            &key,
            "the loopback interface is always brought up (127.0.0.1/8) in the PID 1 shape; remove [network.interface.lo]",
        );
        return None;
    }
    let mut ok = true;
    let dhcp = raw.dhcp.unwrap_or(false);
    let addressing = match (&raw.address, dhcp) {
        (Some(_), true) => {
            c.error(
                &format!("{key}.dhcp"),
                "dhcp = true and an `address` are both set; remove `address` (and `gateway`) to take them from a DHCP lease, or remove `dhcp`",
            );
            None
        }
        (None, true) => {
            if let Some(gateway) = &raw.gateway {
                c.error(
                    &format!("{key}.gateway"),
                    format!("{gateway:?}: with dhcp = true the router comes from the lease; remove `gateway`"),
                );
                None
            } else {
                Some(Addressing::Dhcp)
            }
        }
        (None, false) => {
            c.missing(
                &format!("{key}.address"),
                "write an IPv4 address with its prefix length, e.g. address = \"10.0.2.15/24\", or dhcp = true",
            );
            None
        }
        (Some(text), false) => match ipv4_with_prefix(text) {
            Err(why) => {
                c.error(
                    &format!("{key}.address"),
                    format!("{text:?} {why}; write an IPv4 address with its prefix length, e.g. \"10.0.2.15/24\""),
                );
                None
            }
            Ok((address, prefix)) => {
                let gateway = match raw.gateway.as_deref() {
                    None => Some(None),
                    Some(g) => match g.parse::<Ipv4Addr>() {
                        Ok(gw) if gw == address => {
                            c.error(&format!("{key}.gateway"), format!("{g:?} is the interface's own address; write the router's address, or remove `gateway`"));
                            None
                        }
                        Ok(gw) if !same_subnet(gw, address, prefix) => {
                            c.error(&format!("{key}.gateway"), format!("{g:?} is outside {text}, so it cannot be reached on the link; write the router's address in that subnet, or fix the prefix length"));
                            None
                        }
                        Ok(gw) => Some(Some(gw)),
                        Err(_) => {
                            c.error(&format!("{key}.gateway"), format!("{g:?} is not an IPv4 address; write the router's address, e.g. \"10.0.2.2\""));
                            None
                        }
                    },
                };
                gateway.map(|gateway| Addressing::Static {
                    address,
                    prefix,
                    gateway,
                })
            }
        },
    };
    let mut dns = Vec::new();
    for (i, text) in raw.dns.iter().flatten().enumerate() {
        match text.parse::<IpAddr>() {
            Ok(ip) if !ip.is_unspecified() && !ip.is_multicast() => {
                if dns.contains(&ip) {
                    c.error(
                        &format!("{key}.dns[{i}]"),
                        format!("{text:?} is listed twice; remove one"),
                    );
                    ok = false;
                } else {
                    dns.push(ip);
                }
            }
            _ => {
                c.error(
                    &format!("{key}.dns[{i}]"),
                    format!("{text:?} is not a name server address; write an IP address, e.g. \"10.0.2.3\""),
                );
                ok = false;
            }
        }
    }
    let link_timeout_secs = match raw.link_timeout.as_deref() {
        None => Some(DEFAULT_LINK_TIMEOUT_SECS),
        Some(text) => match humantime::parse_duration(text) {
            Ok(d) if (1..=300).contains(&d.as_secs()) => Some(d.as_secs()),
            _ => {
                c.error(
                    &format!("{key}.link_timeout"),
                    format!("{text:?} is not a duration from 1s to 5m; write e.g. \"10s\""),
                );
                None
            }
        },
    };
    let (Some(addressing), Some(link_timeout_secs), true) = (addressing, link_timeout_secs, ok)
    else {
        return None;
    };
    Some(Interface {
        name: name.to_string(),
        addressing,
        dns,
        link_timeout_secs,
    })
}

fn lockdown(c: &mut Check<'_>, raw: &RawLockdown) -> Option<Lockdown> {
    let consoles = match raw.consoles.as_deref() {
        None | Some("off") => Some("off".to_string()),
        Some(other) => {
            c.error(
                "lockdown.consoles",
                format!("{other:?} is not supported; write \"off\" (leave [lockdown] out to keep consoles)"),
            );
            None
        }
    };
    let kernel_lockdown = match raw.kernel_lockdown.as_deref() {
        None => Some(None),
        Some(mode @ ("none" | "integrity" | "confidentiality")) => Some(Some(mode.to_string())),
        Some(other) => {
            c.error(
                "lockdown.kernel_lockdown",
                format!("{other:?} is not a lockdown mode; write \"none\", \"integrity\" or \"confidentiality\""),
            );
            None
        }
    };
    let modules = module_names(c, "lockdown.modules", raw.modules.as_deref());
    Some(Lockdown {
        consoles: consoles?,
        kernel_lockdown: kernel_lockdown?,
        modules: modules?,
    })
}

/// A list of kernel module names (`lockdown.modules`, `kernel.modules`): each the name
/// modprobe takes, none twice. `None` (the problems recorded) when any is not.
fn module_names(c: &mut Check<'_>, what: &str, raw: Option<&[String]>) -> Option<Vec<String>> {
    let mut modules: Vec<String> = Vec::new();
    let mut ok = true;
    for (i, m) in raw.iter().copied().flatten().enumerate() {
        let key = format!("{what}[{i}]");
        if m.is_empty()
            || !m
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == '-')
        {
            c.error(
                &key,
                format!(
                    "{m:?} is not a module name; write the name modprobe takes, e.g. \"dm_crypt\""
                ),
            );
            ok = false;
        } else if modules.contains(m) {
            c.error(&key, format!("{m:?} is listed twice; remove one"));
            ok = false;
        } else {
            modules.push(m.clone());
        }
    }
    ok.then_some(modules)
}

fn syslog_target(c: &mut Check<'_>, text: &str) -> Option<SyslogTarget> {
    if text == "local" {
        return Some(SyslogTarget::Local);
    }
    let parsed = if let Some(addr) = text.strip_prefix("udp://") {
        Some((true, addr))
    } else {
        text.strip_prefix("tcp://").map(|addr| (false, addr))
    };
    let result = match parsed {
        None => Err("unknown transport".to_string()),
        Some((udp, addr)) => match split_host_port(addr) {
            Ok((host, Some(port))) => {
                let address = format!("{host}:{port}");
                Ok(if udp {
                    SyslogTarget::Udp(address)
                } else {
                    SyslogTarget::Tcp(address)
                })
            }
            Ok((_, None)) => Err("the port is missing".to_string()),
            Err(why) => Err(why),
        },
    };
    match result {
        Ok(target) => Some(target),
        Err(why) => {
            c.error(
                "audit.syslog",
                format!("{text:?} is not a syslog target ({why}); write \"local\", \"udp://host:port\" or \"tcp://host:port\""),
            );
            None
        }
    }
}

/// `audit.file_dir`: normalised, and not one of [`AUDIT_DIR_FORBIDDEN`] (nor in or above one).
fn audit_file_dir(c: &mut Check<'_>, raw: &RawAudit, file_overridable: bool) -> Option<PathBuf> {
    let Some(value) = raw.file_dir.as_deref() else {
        if file_overridable {
            c.missing(
                "audit.file_dir",
                "audit.file is overridable, so name the directory the operator's audit file must lie in, e.g. file_dir = \"/workspace/audit\"",
            );
        }
        return None;
    };
    let dir = c.abs_path("audit.file_dir", value, "/workspace/audit")?;
    for pattern in AUDIT_DIR_FORBIDDEN {
        if let Some((how, matched)) = overlap(&dir, pattern) {
            c.error(
                "audit.file_dir",
                format!(
                    "{value:?} {} the image's system directory {:?}, where an audit file could overwrite what the system reads; name a directory for audit logs only, e.g. \"/workspace/audit\"",
                    how.words(),
                    matched.to_string_lossy()
                ),
            );
            return None;
        }
    }
    Some(dir)
}

fn audit(c: &mut Check<'_>, raw: Option<&RawAudit>, file_overridable: bool) -> Option<AuditConfig> {
    let default = RawAudit::default();
    let raw = raw.unwrap_or(&default);
    let file_dir_ok = raw.file_dir.is_none() && !file_overridable;
    let file_dir = audit_file_dir(c, raw, file_overridable);
    let file_dir_ok = file_dir_ok || file_dir.is_some();
    let file_ok = raw.file.is_none();
    let file = c.opt_path(
        "audit.file",
        raw.file.as_ref(),
        "/workspace/audit/cvm-warden.jsonl",
    );
    let mut file_ok = file_ok || file.is_some();
    if let (Some(file), Some(dir)) = (&file, &file_dir) {
        // Lexical: both are normalised and free of "..".
        if !file.starts_with(dir) || file == dir {
            c.error(
                "audit.file",
                format!(
                    "{:?} is outside audit.file_dir {:?}; write a path inside {:?}",
                    file.to_string_lossy(),
                    dir.to_string_lossy(),
                    dir.to_string_lossy()
                ),
            );
            file_ok = false;
        }
    }
    let file_required = raw.file_required.unwrap_or(false);
    if file_required && raw.file.is_none() {
        c.error(
            "audit.file_required",
            "true needs a file; set audit.file or remove file_required",
        );
        return None;
    }
    let syslog_ok = raw.syslog.is_none();
    let syslog = raw.syslog.as_deref().and_then(|s| syslog_target(c, s));
    let syslog_ok = syslog_ok || syslog.is_some();
    let console = raw.console.unwrap_or(true);
    let checkpoint_interval_secs = match raw.checkpoint_interval.as_deref() {
        None => Some(DEFAULT_CHECKPOINT_INTERVAL_SECS),
        Some("0") => Some(0),
        Some(text) => match humantime::parse_duration(text) {
            Ok(d) if (10..=86_400).contains(&d.as_secs()) => Some(d.as_secs()),
            _ => {
                c.error(
                    "audit.checkpoint_interval",
                    format!("{text:?} is not a duration from 10s to 24h; write e.g. \"10m\", or \"0\" for no periodic checkpoints"),
                );
                None
            }
        },
    };
    let export_port = match raw.export.as_deref() {
        None => Some(None),
        Some(text) => match text.strip_prefix("virtio-port:") {
            Some(name) if valid_port_name(name) => Some(Some(name.to_string())),
            _ => {
                c.error(
                    "audit.export",
                    format!("{:?} is not an export target; write \"virtio-port:NAME\" with the virtio-serial port's name (letters, digits, '.', '-', '_', at most 64), e.g. \"virtio-port:cvm-warden.audit\"", text),
                );
                None
            }
        },
    };
    let (true, true, true, Some(checkpoint_interval_secs), Some(export_port)) = (
        file_ok,
        syslog_ok,
        file_dir_ok,
        checkpoint_interval_secs,
        export_port,
    ) else {
        return None;
    };
    if !console && file.is_none() && syslog.is_none() {
        c.error(
            "audit",
            "every sink is off (console = false, no file, no syslog; an export port alone does not count: its port may never appear); enable at least one so the boot leaves a record",
        );
        return None;
    }
    Some(AuditConfig {
        file,
        file_dir,
        file_required,
        syslog,
        console,
        checkpoint_interval_secs,
        export_port,
    })
}

/// A virtio-serial port name as QEMU's `virtserialport,name=` gives it and sysfs shows it.
fn valid_port_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '.' | '-' | '_'))
}

/// `audit.checkpoint_interval` when absent: 10 minutes.
const DEFAULT_CHECKPOINT_INTERVAL_SECS: u64 = 600;

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked_by_shape() {
        for good in [
            "https://kbs.example:8999",
            "http://10.0.0.1",
            "https://[fd00::1]:443/kbs/v0",
            "https://kbs.example/",
        ] {
            assert!(BrokerUrl::parse(good).is_ok(), "{good}");
        }
        for bad in [
            "ftp://kbs.example",
            "https://",
            "https://user@kbs.example",
            "https://kbs.example:0",
            "https://kbs.example:99999",
            "https://kbs example",
            "https://kbs.example/?x=1",
            "https://[fd00::1",
            "https://999.1.1.1",
        ] {
            assert!(BrokerUrl::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn cidrs_are_canonical() {
        assert_eq!(canonical_cidr("10.0.0.0/8"), Ok("10.0.0.0/8".to_string()));
        assert_eq!(canonical_cidr("FD00::/8"), Ok("fd00::/8".to_string()));
        assert_eq!(canonical_cidr("0.0.0.0/0"), Ok("0.0.0.0/0".to_string()));
        assert_eq!(canonical_cidr("::/0"), Ok("::/0".to_string()));
        assert_eq!(
            canonical_cidr("10.0.0.1/8"),
            Err("it has host bits set; write \"10.0.0.0/8\"".to_string())
        );
        assert!(canonical_cidr("10.0.0.0/33").is_err());
        assert!(canonical_cidr("10.0.0.0").is_err());
        assert!(canonical_cidr("10.0.0/8").is_err());
        assert!(canonical_cidr("10.0.0.0/+8").is_err());
    }

    #[test]
    fn overlap_compares_whole_components() {
        let o = |path: &str, pattern: &str| {
            overlap(&lexical(path).unwrap(), pattern).map(|(how, p)| (how, p.display().to_string()))
        };
        assert_eq!(o("/etc", "/etc"), Some((Overlap::Is, "/etc".into())));
        assert_eq!(
            o("/etc//ssl/./", "/etc"),
            Some((Overlap::Inside, "/etc".into()))
        );
        assert_eq!(
            o("/run", "/run/cvm-warden"),
            Some((Overlap::Contains, "/run/cvm-warden".into()))
        );
        assert_eq!(o("/", "/etc"), Some((Overlap::Contains, "/etc".into())));
        assert_eq!(o("/etcetera", "/etc"), None);
        assert_eq!(o("/run/cvm-wardens", "/run/cvm-warden"), None);
        assert_eq!(
            o("/lib64/x", "/lib*"),
            Some((Overlap::Inside, "/lib64".into()))
        );
        assert_eq!(o("/lib", "/lib*"), Some((Overlap::Is, "/lib".into())));
        assert_eq!(o("/usr/lib", "/lib*"), None);
        assert_eq!(lexical("/a/../b"), None);
        assert_eq!(lexical("a/b"), None);
    }

    #[test]
    fn the_runtime_dir_holds_the_secrets_and_the_default_copy() {
        for inside in [SECRETS_DIR, DEFAULT_COPY_TO] {
            assert_eq!(
                overlap(Path::new(inside), RUNTIME_DIR).map(|(how, _)| how),
                Some(Overlap::Inside)
            );
        }
    }

    #[test]
    fn env_names_are_portable() {
        assert!(is_env_name("FL_SERVER"));
        assert!(is_env_name("_x1"));
        assert!(!is_env_name("1X"));
        assert!(!is_env_name("A=B"));
        assert!(!is_env_name(""));
        assert!(!is_env_name("A-B"));
    }
}
