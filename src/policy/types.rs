//! Validated policy types. Everything here has already been checked: paths are absolute,
//! ports are in range, users resolved to numeric ids, digests well-formed. Stages take these
//! and never re-validate.

use std::path::PathBuf;

use serde::Serialize;

use crate::digest::Digest;

/// The whole validated policy (after operator overrides were applied).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Policy {
    /// What to measure and run.
    pub workload: Workload,
    /// How to attest; `None` means `attestation = "none"` was written explicitly (insecure).
    pub attestation: Attestation,
    /// Encrypted volumes to unlock (implemented by a later issue).
    pub volumes: Vec<Volume>,
    /// Network perimeter and allowlist (implemented by a later issue); `None` when absent.
    pub network: Option<Network>,
    /// Console/kernel lockdown (implemented by a later issue); `None` when absent.
    pub lockdown: Option<Lockdown>,
    /// Audit sinks.
    pub audit: AuditConfig,
    /// What to do when boot fails or the workload ends in PID 1 mode.
    pub on_failure: FailureAction,
    /// Dotted keys the operator file may set (e.g. `attestation.kbs`).
    pub overridable: Vec<String>,
}

/// `[workload]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Workload {
    /// Directory that is measured (absolute).
    pub bundle: PathBuf,
    /// Where the measured bytes come from.
    pub source: BundleSource,
    /// Expected bundle digest; boot stops before attestation when it differs.
    pub digest: Option<Digest>,
    /// Reference manifest (JSON from `cvm-warden measure --manifest`) used to name differing
    /// entries when the digest does not match.
    pub manifest: Option<PathBuf>,
    /// argv of the workload; `exec[0]` is absolute.
    pub exec: Vec<String>,
    /// The workload's identity.
    pub user: Identity,
    /// Exact environment of the workload (nothing is inherited).
    pub env: Vec<(String, String)>,
    /// Working directory (absolute).
    pub workdir: PathBuf,
    /// umask, e.g. 0o077.
    pub umask: u32,
    /// Resource limits.
    pub rlimits: Vec<Rlimit>,
    /// Restart policy (PID 1 mode only).
    pub restart: Restart,
}

/// Where the bundle's bytes live while they are measured and used.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase", tag = "kind")]
pub enum BundleSource {
    /// Measured in place: the bundle is inside the (encrypted, launch-measured) initramfs.
    Initramfs,
    /// Copied into a tmpfs at `into` while hashed in the same pass, then made read-only; the
    /// workload runs from the copy (`exec` paths under `bundle` are rewritten to `into`).
    Copy {
        /// tmpfs mount point for the copy (absolute).
        into: PathBuf,
    },
    /// A dm-verity volume whose root hash the policy pins (later issue).
    Verity,
}

/// A resolved user and group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Identity {
    /// User name as written (or the number).
    pub name: String,
    /// Numeric uid.
    pub uid: u32,
    /// Numeric primary gid.
    pub gid: u32,
}

/// One `[[workload.rlimit]]` entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Rlimit {
    /// Which resource.
    pub resource: RlimitResource,
    /// Soft limit.
    pub soft: u64,
    /// Hard limit.
    pub hard: u64,
}

/// Resources a policy may limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RlimitResource {
    /// RLIMIT_NOFILE
    Nofile,
    /// RLIMIT_NPROC
    Nproc,
    /// RLIMIT_CORE
    Core,
    /// RLIMIT_AS
    As,
    /// RLIMIT_FSIZE
    Fsize,
    /// RLIMIT_STACK
    Stack,
    /// RLIMIT_MEMLOCK
    Memlock,
}

/// Restart policy for the workload in PID 1 mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "mode")]
pub enum Restart {
    /// Never restart: the workload's end is the VM's end.
    Never,
    /// Restart after a non-zero exit or a signal, at most `max` times.
    OnFailure {
        /// Maximum number of restarts.
        max: u32,
    },
}

/// `[attestation]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "mode")]
pub enum Attestation {
    /// `attestation = "none"`: development only; every audit record carries `"insecure": true`.
    None,
    /// A TEE and a key broker (implemented by a later issue).
    Broker {
        /// Evidence provider.
        tee: Tee,
        /// Key broker base URL.
        kbs: String,
        /// CA certificate the broker's TLS is pinned to.
        kbs_ca: Option<PathBuf>,
    },
}

/// Evidence providers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Tee {
    /// AMD SEV-SNP.
    Snp,
    /// Intel TDX.
    Tdx,
    /// TPM 2.0.
    Tpm,
    /// Azure SNP with vTPM.
    AzSnpVtpm,
    /// Sample evidence (tests only).
    Sample,
}

/// One `[[volume]]` (validated shape only; unlocking comes in a later issue).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Volume {
    /// Name (used for the dm mapping).
    pub name: String,
    /// Block device.
    pub device: PathBuf,
    /// Broker resource URI of the key.
    pub key: String,
    /// Mount point.
    pub mount: PathBuf,
    /// Format when the device is blank.
    pub format_if_blank: bool,
    /// dm-integrity mode, if any.
    pub integrity: Option<String>,
}

/// `[network]` (validated shape only).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Network {
    /// Inbound ports.
    pub inbound: Vec<InboundRule>,
    /// Outbound host:port pairs.
    pub outbound: Vec<OutboundRule>,
}

/// Transport protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    /// TCP
    Tcp,
    /// UDP
    Udp,
}

/// An inbound port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InboundRule {
    /// Port 1..=65535.
    pub port: u16,
    /// Protocol.
    pub proto: Proto,
    /// Allowed source CIDRs (empty: any).
    pub from: Vec<String>,
}

/// An outbound destination.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OutboundRule {
    /// Host name or address.
    pub host: String,
    /// Port 1..=65535.
    pub port: u16,
    /// Protocol.
    pub proto: Proto,
}

/// `[lockdown]` (validated shape only).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Lockdown {
    /// `off` disables consoles and logins.
    pub consoles: String,
    /// Lockdown LSM mode.
    pub kernel_lockdown: Option<String>,
    /// Modules loaded before module loading is disabled.
    pub modules: Vec<String>,
}

/// `[audit]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuditConfig {
    /// JSON-lines file sink.
    pub file: Option<PathBuf>,
    /// When true, a failing file sink stops the boot (fail closed).
    pub file_required: bool,
    /// Syslog destination.
    pub syslog: Option<SyslogTarget>,
    /// Console sink (serial console in PID 1 mode, stderr otherwise).
    pub console: bool,
}

/// Where syslog records go (RFC 5424).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase", tag = "transport", content = "address")]
pub enum SyslogTarget {
    /// The local `/dev/log` socket (`syslog = "local"`).
    Local,
    /// Remote UDP `host:port` (`syslog = "udp://host:port"`).
    Udp(String),
    /// Remote TCP `host:port` (`syslog = "tcp://host:port"`).
    Tcp(String),
}

/// What happens when boot fails or the workload ends (PID 1 mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FailureAction {
    /// Power the VM off (default).
    Poweroff,
    /// Halt the VM (the hypervisor keeps it for inspection of the serial log).
    Halt,
}
