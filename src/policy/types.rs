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
    /// Encrypted volumes to unlock.
    pub volumes: Vec<Volume>,
    /// Broker resources delivered to the workload as files.
    pub secrets: Vec<Secret>,
    /// Network perimeter and allowlist (implemented by a later issue); `None` when absent.
    pub network: Option<Network>,
    /// Console/kernel lockdown (implemented by a later issue); `None` when absent.
    pub lockdown: Option<Lockdown>,
    /// `[kernel]`: kernel modules loaded beyond those the configured features need.
    pub kernel: Kernel,
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
    /// `[workload.flare]`: the NVIDIA FLARE startup kit verified in the measure stage.
    pub flare: Option<FlareKit>,
}

/// `[workload.flare]`: an NVIDIA FLARE startup kit inside the bundle, verified against its
/// pinned root CA before attestation (`measure::flare`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FlareKit {
    /// The participant folder, relative to the bundle root (empty: the bundle root itself).
    pub startup_kit: PathBuf,
    /// SHA-256 of the DER certificate in the kit's `startup/rootCA.pem`.
    pub root_ca_sha256: Digest,
    /// Kit-relative paths of signed entries left out of the bundle (released as secrets).
    pub withheld: Vec<String>,
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
// One per policy: the table's size does not matter.
#[allow(clippy::large_enum_variant)]
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
        /// CA certificate the broker's TLS is pinned to (required for `https://`).
        kbs_ca: Option<PathBuf>,
        /// `insecure_http = true`: plain HTTP to the broker is allowed (tests only; audited).
        insecure_http: bool,
        /// How the broker wraps released resources to the ephemeral TEE key.
        key_wrap: KeyWrap,
        /// Tries per broker call (≥ 1), with exponential backoff between them.
        tries: u32,
        /// Total time budget for the whole broker exchange, in seconds.
        timeout_secs: u64,
        /// TPM (for `tpm`, `az-snp-vtpm`): a TCTI, e.g. `device:/dev/tpmrm0` (default).
        tpm: String,
        /// TPM attestation key at a persistent handle; `None`: created each boot.
        tpm_ak_handle: Option<u32>,
        /// Directory of SNP certificates baked into the image (used when the host supplies
        /// none with the extended report).
        snp_certs: Option<PathBuf>,
        /// `[attestation.gpu]`: NVIDIA GPUs checked, measured and attested beside the TEE.
        gpu: Option<Box<Gpu>>,
        /// Re-attestation while the workload runs (`reattest_*`).
        reattest: Reattest,
    },
}

/// `[attestation.gpu]`: the NVIDIA GPUs the CVM must have, in confidential-computing mode.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Gpu {
    /// At least one GPU must be present (default true).
    pub required: bool,
    /// Exactly this many GPUs.
    pub count: Option<u32>,
    /// Allowed architectures (empty: Hopper and Blackwell).
    pub arch: Vec<GpuArch>,
    /// Lowest driver version (decimal dotted numbers, e.g. `550.90.07`).
    pub min_driver: Option<String>,
    /// Lowest VBIOS version (hexadecimal dotted numbers as NVIDIA prints them, e.g.
    /// `96.00.9f.00.01`).
    pub min_vbios: Option<String>,
    /// Developer tools mode allowed: development only, nothing is confidential; every audit
    /// record says insecure.
    pub allow_devtools: bool,
    /// RIM files in the image (offline reference measurements), for the GPU verifier.
    pub rims: Vec<PathBuf>,
    /// A simulated GPU (a recording, `tests/data/nvidia-sim/gpu.json`): tests and demos
    /// only, proves nothing; every audit record says insecure.
    pub simulate: Option<PathBuf>,
}

/// A GPU architecture `[attestation.gpu] arch` may name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum GpuArch {
    /// H100, H200.
    Hopper,
    /// B200, GB200.
    Blackwell,
}

/// `attestation.reattest_interval`, `reattest_grace`, `reattest_resource`: continuous trust
/// while the workload runs (PID 1 shape).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Reattest {
    /// Seconds between re-attestations; 0: none (`reattest_interval = "0"`).
    pub interval_secs: u64,
    /// Whether the policy wrote `reattest_interval` (the unit shape refuses an explicit
    /// interval above 0: it `execve`s the workload, so no one would re-attest).
    pub interval_explicit: bool,
    /// How long a merely unreachable broker is retried before it counts as a refusal;
    /// always shorter than the interval.
    pub grace_secs: u64,
    /// A resource asked for again (and dropped at once) at each re-attestation, so the
    /// broker's resource policy is in the loop too.
    pub resource: Option<ResourceUri>,
}

/// `attestation.reattest_interval` when absent: 10 minutes.
pub const DEFAULT_REATTEST_INTERVAL_SECS: u64 = 600;
/// `attestation.reattest_grace` when absent: 5 minutes, or half the interval when that is
/// shorter.
pub const DEFAULT_REATTEST_GRACE_SECS: u64 = 300;

/// `attestation.key_wrap`: the algorithm of the ephemeral TEE key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum KeyWrap {
    /// `ECDH-ES+A256KW` with an ephemeral P-256 key (default).
    #[serde(rename = "ECDH-ES+A256KW")]
    EcdhEsA256kw,
    /// `RSA-OAEP-256` with an ephemeral RSA key.
    #[serde(rename = "RSA-OAEP-256")]
    RsaOaep256,
}

/// Evidence providers (the one list, in the verifier crate).
pub use cvm_warden_verify::Tee;

/// One `[[volume]]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Volume {
    /// Name (used for the dm mapping).
    pub name: String,
    /// Block device.
    pub device: PathBuf,
    /// Broker resource of the key.
    pub key: ResourceUri,
    /// Mount point.
    pub mount: PathBuf,
    /// Format when the device is blank.
    pub format_if_blank: bool,
    /// dm-integrity mode, if any.
    pub integrity: Option<String>,
    /// `allow_exec = true`: mounted without `noexec` (always `nosuid,nodev`).
    pub allow_exec: bool,
    /// uid that owns the file system's root (`owner`; default: the workload's uid).
    pub owner: u32,
    /// gid of the file system's root (`group`; default: the workload's gid).
    pub group: u32,
    /// Permission bits of the file system's root (`mode`; default [`DEFAULT_VOLUME_MODE`]).
    pub mode: u32,
}

/// Default `[[volume]] mode`: the root of a volume is the workload's alone.
pub const DEFAULT_VOLUME_MODE: u32 = 0o700;

/// Directory (a tmpfs cvm-warden mounts) that holds the `[[secret]]` files.
pub const SECRETS_DIR: &str = "/run/cvm-warden/secrets";

/// One `[[secret]]`: a broker resource delivered to the workload as a file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Secret {
    /// File name under [`SECRETS_DIR`].
    pub name: String,
    /// The broker resource.
    pub resource: ResourceUri,
    /// `SECRETS_DIR/name`: owned by the workload user, mode 0400.
    pub path: PathBuf,
}

/// `[network]` (validated shape only).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Network {
    /// Inbound ports.
    pub inbound: Vec<InboundRule>,
    /// Outbound host:port pairs.
    pub outbound: Vec<OutboundRule>,
    /// `[network.interface.<NAME>]`: interfaces configured in the PID 1 shape (sorted by name).
    pub interfaces: Vec<Interface>,
}

/// Default `network.interface.<NAME>.link_timeout`: how long an interface may take to appear
/// and report carrier.
pub const DEFAULT_LINK_TIMEOUT_SECS: u64 = 10;

/// `[network.interface.<NAME>]`: one interface's IPv4 configuration (PID 1 shape only; under
/// systemd the OS configures interfaces).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Interface {
    /// Kernel interface name, e.g. `eth0`.
    pub name: String,
    /// Static address or DHCPv4.
    pub addressing: Addressing,
    /// Name servers written to `/etc/resolv.conf` (with DHCP: instead of the lease's).
    pub dns: Vec<std::net::IpAddr>,
    /// Bound on waiting for the interface to appear and report carrier, in seconds.
    pub link_timeout_secs: u64,
}

/// How an interface gets its IPv4 address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase", tag = "mode")]
pub enum Addressing {
    /// `address = "A.B.C.D/LEN"`, optional `gateway`.
    Static {
        /// The address.
        address: std::net::Ipv4Addr,
        /// Prefix length, 1..=32.
        prefix: u8,
        /// Default route via this router (inside the address's subnet).
        gateway: Option<std::net::Ipv4Addr>,
    },
    /// `dhcp = true`: address, prefix, router and name servers from a DHCPv4 lease.
    Dhcp,
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

/// `[kernel]` (empty when absent).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Kernel {
    /// Modules loaded (with their dependencies) before the TEE is opened, in addition to the
    /// ones the policy's features need (e.g. the VM's virtio drivers).
    pub modules: Vec<String>,
}

/// `[audit]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuditConfig {
    /// JSON-lines file sink.
    pub file: Option<PathBuf>,
    /// The directory `file` must lie in (required when `audit.file` is overridable).
    pub file_dir: Option<PathBuf>,
    /// When true, a failing file sink stops the boot (fail closed).
    pub file_required: bool,
    /// Syslog destination.
    pub syslog: Option<SyslogTarget>,
    /// Console sink (serial console in PID 1 mode, stderr otherwise).
    pub console: bool,
    /// Seconds between checkpoints while the workload runs (`checkpoint_interval`); 0: none.
    pub checkpoint_interval_secs: u64,
    /// `export = "virtio-port:NAME"`: every line also goes out on this virtio-serial port
    /// (the host collects the log of a VM that has no network for syslog, e.g. the harness).
    pub export_port: Option<String>,
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

/// A key broker resource, written `kbs:///<repo>/<type>/<tag>` in a policy (the broker's
/// address comes from `attestation.kbs`). Each segment matches `[a-zA-Z0-9_-][a-zA-Z0-9_.-]*`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(into = "String")]
pub struct ResourceUri {
    /// Repository, e.g. `default`.
    pub repo: String,
    /// Type, e.g. `keys`.
    pub kind: String,
    /// Tag, e.g. `workspace`.
    pub tag: String,
}

impl ResourceUri {
    /// Parses `kbs:///repo/type/tag`; the error says what is wrong with `text`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let Some(path) = text.strip_prefix("kbs:///") else {
            return Err(format!(
                "{text:?} is not a broker resource; write kbs:///<repo>/<type>/<tag>, e.g. kbs:///default/keys/workspace"
            ));
        };
        let parts: Vec<&str> = path.split('/').collect();
        if parts.len() != 3 {
            return Err(format!(
                "{text:?} has {} path segments; write exactly three: kbs:///<repo>/<type>/<tag>",
                parts.len()
            ));
        }
        for part in &parts {
            if !Self::segment_ok(part) {
                return Err(format!(
                    "{text:?}: segment {part:?} must match [a-zA-Z0-9_-][a-zA-Z0-9_.-]* (the broker answers 404 otherwise)"
                ));
            }
        }
        Ok(Self {
            repo: parts[0].to_string(),
            kind: parts[1].to_string(),
            tag: parts[2].to_string(),
        })
    }

    fn segment_ok(s: &str) -> bool {
        let mut chars = s.chars();
        match chars.next() {
            Some(c) if c.is_ascii_alphanumeric() || c == '_' || c == '-' => {}
            _ => return false,
        }
        chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
    }

    /// The path under `/kbs/v0/resource/`: `repo/type/tag`.
    pub fn path(&self) -> String {
        format!("{}/{}/{}", self.repo, self.kind, self.tag)
    }
}

impl std::fmt::Display for ResourceUri {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "kbs:///{}", self.path())
    }
}

impl From<ResourceUri> for String {
    fn from(uri: ResourceUri) -> String {
        uri.to_string()
    }
}
