//! Command-line interface: parses arguments and dispatches, nothing else. The boot itself
//! (both shapes, with the real effects) is the runner's: [`crate::boot::init`],
//! [`crate::boot::unit`], [`crate::boot::wiring`].
//!
//! Every command returns `Result<(), CliError>`; [`main`] prints an error once (the
//! `error: … / because: …` chain of [`crate::report::write_error`]) and exits with its code:
//! 0 success, 1 a runtime failure (boot failed, log broken, bundle unreadable), 2 invalid
//! input (usage, invalid policy), or the status a verdict command reported.
//!
//! As PID 1 the arguments may be the kernel's: [`crate::boot::init::kernel_invocation`]
//! decides, and PID 1 never exits on a bad argument.

use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};

use clap::{Args, CommandFactory, Parser, Subcommand};

use crate::boot::init::{InitOption, InitOptions, Invocation, DEFAULT_POLICY};
use crate::boot::wiring::{self, PolicyFiles, PROC_CMDLINE};
use crate::policy::{self, LoadedPolicy};
use crate::report::Message;
use crate::stage::BootPlan;
use crate::sys::RealSys;

#[derive(Debug, Parser)]
#[command(
    name = "cvm-warden",
    version,
    about = "Init and lockdown daemon for confidential VMs that host federated-learning workloads"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Measure a bundle directory: print its digest and manifest.
    Measure {
        /// The bundle directory.
        dir: PathBuf,
        /// Print the manifest as JSON.
        #[arg(long)]
        json: bool,
        /// Write the JSON manifest to this file (the reference manifest for the policy).
        #[arg(long, value_name = "OUT")]
        manifest: Option<PathBuf>,
    },
    /// Policy commands.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Print the whole boot plan as JSON (no side effects, no root needed).
    Plan(PolicyArgs),
    /// PID 1 shape: boot, supervise the workload, power off.
    Init(InitArgs),
    /// systemd-unit shape: boot, then execve the workload.
    Run(PolicyArgs),
    /// Operator dry run: the measure and attest stages against the policy's TEE and key
    /// broker; prints the broker's verdict and, for each resource, whether it was released
    /// (length and SHA-256 fingerprint, never the bytes). Exit 0 only when every resource
    /// was released. Extends the TEE's register like a boot: reboot before a real boot.
    Attest(AttestArgs),
    /// Reference values for the key broker: the measure stage's events for this policy and
    /// bundle and the application PCR value they produce (no TEE, no root needed). With
    /// --snp-launch: the expected SEV-SNP launch measurement of a QEMU guest instead.
    ReferenceValues(ReferenceArgs),
    /// The key broker's admin side (a model owner's machine, never the CVM).
    Broker {
        #[command(subcommand)]
        command: BrokerCommand,
    },
    /// nftables rulesets: render (no root) or apply (in the current network namespace).
    Firewall {
        #[command(subcommand)]
        command: FirewallCommand,
    },
    /// Console, login and kernel lockdown.
    Lockdown {
        #[command(subcommand)]
        command: LockdownCommand,
    },
    /// Audit log commands.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Offline evidence checks for auditors.
    Evidence {
        #[command(subcommand)]
        command: EvidenceCommand,
    },
    /// NVIDIA GPUs (NVML).
    Gpu {
        #[command(subcommand)]
        command: GpuCommand,
    },
}

#[derive(Debug, Subcommand)]
enum GpuCommand {
    /// List the NVIDIA driver, the GPUs (index, UUID, arch, VBIOS), the CC and ready states
    /// through NVML, then run the boot's GPU precheck and print its verdict (exit 0 only
    /// when it passes; the refusal is the exact message a boot would stop with). Without
    /// --policy: a GPU in CC mode is required. Never sets the ready state.
    Probe {
        /// Check the policy's [attestation.gpu] (its `simulate` GPU too) instead.
        #[arg(long)]
        policy: Option<PathBuf>,
        #[command(flatten)]
        common: CommonArgs,
    },
}

#[derive(Debug, Subcommand)]
enum BrokerCommand {
    /// Register a workload at a Trustee KBS through its admin API: the requests of a
    /// `reference-values --format trustee` file, an attestation policy, resources.
    Register(RegisterArgs),
}

#[derive(Debug, Args)]
struct RegisterArgs {
    /// The KBS base URL (without `/kbs/v0`).
    #[arg(long, value_name = "URL")]
    kbs: String,
    /// PEM CA the KBS's TLS certificate chains to (required for https://).
    #[arg(long, value_name = "FILE")]
    kbs_ca: Option<PathBuf>,
    /// Allow plain http:// (test brokers only).
    #[arg(long)]
    insecure_http: bool,
    /// The admin's Ed25519 private key (PEM PKCS#8) whose public key the KBS trusts.
    #[arg(long, value_name = "FILE")]
    admin_key: PathBuf,
    /// The token's `iss`: an identity provider's issuer in the KBS config.
    #[arg(long, default_value = "cvm-warden-owner")]
    issuer: String,
    /// The token's `aud`.
    #[arg(long, default_value = "kbs")]
    audience: String,
    /// The token's `role`, which the KBS's ACL maps to the admin endpoints.
    #[arg(long, default_value = "admin")]
    role: String,
    /// What `cvm-warden reference-values --format trustee` printed (repeatable: one per
    /// workload sharing this KBS; their values are merged and the resource policy holds one
    /// rule per workload, bound to its PCR 15).
    #[arg(long, value_name = "FILE", required = true)]
    values: Vec<PathBuf>,
    /// Also post the values file's resource policy, which replaces the KBS's one resource
    /// policy (without this flag it is left out and reported as skipped).
    #[arg(long)]
    replace_resource_policy: bool,
    /// A whole attestation policy (rego) to post as `default_cpu`; it must read every
    /// reference value the file registers that Trustee's default policy does not (PCR 15).
    #[arg(long, value_name = "FILE")]
    attestation_policy: Option<PathBuf>,
    /// A resource to upload, `REPO/TYPE/TAG=FILE` (repeatable); the file's bytes are the value.
    #[arg(long, value_name = "PATH=FILE")]
    resource: Vec<String>,
}

#[derive(Debug, Subcommand)]
enum EvidenceCommand {
    /// Verify one piece of evidence offline (SEV-SNP report, TPM quote, NVIDIA GPU report)
    /// and print its parsed fields as JSON (exit 0 only when it verifies; 3 for a GPU rooted
    /// at `--gpu-root`, not NVIDIA's root).
    Verify(cvm_warden_verify::cli::EvidenceArgs),
}

#[derive(Debug, Subcommand)]
enum PolicyCommand {
    /// Validate a policy and print it normalised (exit 2 with every error when invalid).
    Check {
        /// The policy file.
        file: PathBuf,
        #[command(flatten)]
        common: CommonArgs,
    },
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Check an audit log's hash chain and its embedded attestation evidence and
    /// checkpoints (exit 0 intact, 1 broken).
    Verify(cvm_warden_verify::cli::AuditVerifyArgs),
}

#[derive(Debug, Args)]
struct PolicyArgs {
    /// The policy file.
    #[arg(long, default_value = DEFAULT_POLICY)]
    policy: PathBuf,
    #[command(flatten)]
    common: CommonArgs,
}

#[derive(Debug, Subcommand)]
enum LockdownCommand {
    /// Read back every lockdown setting of this machine and print it as JSON (exit 0 only
    /// when every kernel setting is locked down).
    Status,
}

#[derive(Debug, Subcommand)]
enum FirewallCommand {
    /// Print the ruleset of a phase for a policy (names resolved once, addresses pinned).
    Render {
        #[command(flatten)]
        policy: PolicyArgs,
        /// perimeter (before measure) or allowlist (just before launch).
        #[arg(long)]
        phase: crate::firewall::Phase,
        /// nft (text for `nft -f`) or json (`nft -j -f -` input).
        #[arg(long, default_value = "nft")]
        format: crate::firewall::RenderFormat,
    },
    /// Apply the ruleset of a phase in this network namespace: one atomic transaction, read
    /// back and compared; prints what was applied (digest, pinned addresses) as JSON.
    Apply {
        #[command(flatten)]
        policy: PolicyArgs,
        /// perimeter or allowlist.
        #[arg(long)]
        phase: crate::firewall::Phase,
    },
}

#[derive(Debug, Args)]
struct InitArgs {
    #[command(flatten)]
    policy: PolicyArgs,
    /// This PID 1 runs in a sandbox PID namespace (tests, the demo): host-wide lockdown
    /// settings (modules, sysctls, lockdown LSM, swap, Ctrl-Alt-Del, console, accounts) are
    /// skipped and the audit log says so. Refused in a real boot; required in a sandbox whose
    /// policy has [lockdown], so neither is ever guessed.
    #[arg(long)]
    sandbox: bool,
}

#[derive(Debug, Args)]
struct AttestArgs {
    #[command(flatten)]
    policy: PolicyArgs,
    /// A further resource to ask for, `kbs:///repo/type/tag` (repeatable); the policy's
    /// volume keys and secrets are always asked for.
    #[arg(long, value_name = "URI")]
    resource: Vec<String>,
}

#[derive(Debug, Args)]
struct ReferenceArgs {
    #[command(flatten)]
    policy: PolicyArgs,
    /// The kernel command line the VM will boot with, as a file (default: this machine's).
    #[arg(long, value_name = "FILE", default_value = PROC_CMDLINE)]
    cmdline: PathBuf,
    #[command(flatten)]
    trustee: TrusteeArgs,
    #[command(flatten)]
    snp: crate::tee::snp_launch::SnpLaunchArgs,
}

#[derive(Debug, Args)]
struct TrusteeArgs {
    /// `json`: the events and PCR value; `trustee`: the admin payloads and rego additions
    /// a Trustee KBS takes as they are (`broker register --values` posts them).
    #[arg(long, value_enum, default_value = "json")]
    format: ReferenceFormat,
    /// The TPM attestation key's public key (SPKI DER or PEM, e.g. `tpm2_readpublic -c
    /// 0x81010002 -f der`), registered as `trusted_aks` (repeatable; trustee format).
    #[arg(long, value_name = "FILE")]
    ak: Vec<PathBuf>,
    /// PCR 11 (SHA-256 hex) the VM's boot chain leaves, registered as `tpm_pcr11`: Trustee's
    /// default CPU policy requires it for `tpm` evidence (trustee format).
    #[arg(long, value_name = "HEX")]
    tpm_pcr11: Option<String>,
    /// The SEV-SNP launch measurement (hex), registered as `snp_launch_measurement`
    /// (trustee format).
    #[arg(long, value_name = "HEX")]
    snp_measurement: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum ReferenceFormat {
    Json,
    Trustee,
}

#[derive(Debug, Args)]
struct CommonArgs {
    /// Operator file with deploy-time values (only keys the policy declares overridable).
    #[arg(long, value_name = "FILE")]
    operator: Option<PathBuf>,
    /// passwd file users are resolved in (the image's, when checking on a build machine).
    #[arg(long, value_name = "FILE", default_value = "/etc/passwd")]
    passwd: PathBuf,
    /// group file groups are resolved in.
    #[arg(long, value_name = "FILE", default_value = "/etc/group")]
    group: PathBuf,
}

/// Why a command failed, and so the exit status.
#[derive(Debug)]
pub enum CliError {
    /// The command line could not be parsed (clap prints it; exit 2, or 0 for `--help`).
    Usage(clap::Error),
    /// Invalid input, e.g. an invalid policy: exit 2.
    Invalid(Box<dyn std::error::Error>),
    /// A runtime failure: exit 1.
    Failed(Box<dyn std::error::Error>),
    /// Already reported on standard output (a verdict, a status): exit with this status.
    Reported(i32),
}

impl CliError {
    fn invalid(error: impl std::error::Error + 'static) -> CliError {
        CliError::Invalid(Box::new(error))
    }

    fn failed(error: impl std::error::Error + 'static) -> CliError {
        CliError::Failed(Box::new(error))
    }

    /// The process exit status.
    pub fn code(&self) -> i32 {
        match self {
            CliError::Usage(error) if !error.use_stderr() => 0,
            CliError::Usage(_) | CliError::Invalid(_) => 2,
            CliError::Failed(_) => 1,
            CliError::Reported(code) => *code,
        }
    }

    /// Prints the error (the one printer), nothing for [`CliError::Reported`].
    pub fn report(&self) {
        match self {
            CliError::Usage(error) => {
                let _ = error.print();
            }
            CliError::Invalid(error) | CliError::Failed(error) => {
                crate::report::print_error(error.as_ref());
            }
            CliError::Reported(_) => {}
        }
    }
}

/// A verdict command's status as a result: 0 is success, anything else already reported.
fn status(code: i32) -> Result<(), CliError> {
    match code {
        0 => Ok(()),
        code => Err(CliError::Reported(code)),
    }
}

/// The options of `init` as the parser knows them (for [`crate::boot::init::kernel_invocation`]).
fn init_options() -> Vec<(String, bool)> {
    let command = Cli::command();
    command
        .find_subcommand("init")
        .map(|init| {
            init.get_arguments()
                .filter_map(|arg| {
                    let long = arg.get_long()?;
                    (long != "help" && long != "version")
                        .then(|| (long.to_owned(), arg.get_action().takes_values()))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Reads the command line: as typed, or as PID 1 what [`crate::boot::init::kernel_invocation`]
/// keeps; returns the arguments to parse and the ones ignored.
fn invocation(
    argv: Vec<OsString>,
    pid: u32,
    initial_pid_ns: bool,
) -> (Vec<OsString>, Option<Vec<String>>) {
    let options = init_options();
    let options: Vec<InitOption<'_>> = options
        .iter()
        .map(|(long, takes_value)| InitOption {
            long,
            takes_value: *takes_value,
        })
        .collect();
    match crate::boot::init::kernel_invocation(&argv, pid, initial_pid_ns, &options) {
        Invocation::Init { argv, ignored } => (argv, Some(ignored)),
        Invocation::AsTyped => {
            let mut argv = argv;
            // `/init` run by hand: `init` with the defaults (it then refuses: not PID 1).
            if argv.len() == 1
                && argv
                    .first()
                    .is_some_and(|a| wiring::named_init(Path::new(a)))
            {
                argv.push("init".into());
            }
            (argv, None)
        }
    }
}

/// Runs the command line; returns the process exit code.
pub fn main() -> i32 {
    let argv: Vec<OsString> = std::env::args_os().collect();
    let pid = std::process::id();
    let initial_pid_ns = pid == 1 && crate::sys::Sys::in_initial_pid_namespace(&RealSys::default());
    let (argv, kernel_ignored) = invocation(argv, pid, initial_pid_ns);
    init_logger();
    let cli = match (Cli::try_parse_from(&argv), &kernel_ignored) {
        (Ok(cli), _) => cli,
        // PID 1 from the kernel: what was kept did not parse after all; boot with the
        // defaults, every argument ignored. Never an exit.
        (Err(_), Some(ignored)) => {
            let mut ignored = ignored.clone();
            ignored.extend(
                argv.iter()
                    .skip(2)
                    .map(|a| crate::report::sanitize(&a.to_string_lossy(), 256)),
            );
            crate::boot::init::main(&InitOptions::default(), &ignored)
        }
        (Err(error), None) => {
            let error = CliError::Usage(error);
            error.report();
            return error.code();
        }
    };
    match dispatch(cli, kernel_ignored.unwrap_or_default()) {
        Ok(()) => 0,
        Err(error) => {
            error.report();
            error.code()
        }
    }
}

fn dispatch(cli: Cli, kernel_ignored: Vec<String>) -> Result<(), CliError> {
    match cli.command {
        Command::Measure {
            dir,
            json,
            manifest,
        } => measure(&dir, json, manifest.as_deref()),
        Command::Policy {
            command: PolicyCommand::Check { file, common },
        } => policy_check(&file, &common),
        Command::Plan(args) => plan(&args),
        Command::Init(args) => init(&args, &kernel_ignored),
        Command::Run(args) => run(&args),
        Command::Attest(args) => attest_dry_run(&args),
        Command::Firewall { command } => firewall(&command),
        Command::Lockdown {
            command: LockdownCommand::Status,
        } => {
            let status = crate::lockdown::status(&crate::lockdown::Paths::default());
            print_json(&status)?;
            if status["ok"] == serde_json::Value::Bool(true) {
                Ok(())
            } else {
                Err(CliError::Reported(1))
            }
        }
        Command::ReferenceValues(args) => reference_values(&args),
        Command::Broker {
            command: BrokerCommand::Register(args),
        } => broker_register(&args),
        Command::Audit {
            command: AuditCommand::Verify(args),
        } => status(cvm_warden_verify::cli::audit_verify(&args)),
        Command::Evidence {
            command: EvidenceCommand::Verify(args),
        } => status(cvm_warden_verify::cli::evidence_verify(&args)),
        Command::Gpu {
            command: GpuCommand::Probe { policy, common },
        } => gpu_probe(policy.as_deref(), &common),
    }
}

/// `gpu probe`: the inventory, then the precheck (see [`GpuCommand::Probe`]).
fn gpu_probe(policy_path: Option<&Path>, common: &CommonArgs) -> Result<(), CliError> {
    use crate::tee::nvidia;
    let gpu = match policy_path {
        None => None,
        Some(path) => {
            let loaded = load(path, common)?;
            match loaded.policy.attestation {
                policy::Attestation::Broker { gpu: Some(gpu), .. } => Some(gpu),
                _ => {
                    return Err(CliError::Invalid(Box::new(Message(format!(
                    "{} has no [attestation.gpu] table; add one, or run gpu probe without --policy",
                    path.display()
                )))))
                }
            }
        }
    };
    let (nvml, requirements) = match &gpu {
        Some(gpu) => (
            crate::keybroker::open_nvml(gpu),
            crate::keybroker::gpu_requirements(gpu),
        ),
        None => (
            nvidia::RealNvml::open().map(|n| Box::new(n) as Box<dyn nvidia::Nvml>),
            nvidia::default_requirements(),
        ),
    };
    let mut nvml = nvml.map_err(CliError::failed)?;
    let listed = nvidia::inventory(nvml.as_mut());
    let mut gpus = nvidia::Gpus::new(Ok(nvml), requirements.clone());
    let verdict = gpus
        .precheck()
        .map_err(|error| crate::boot::device_precheck_error(Box::new(error)));
    let precheck = match &verdict {
        Ok(facts) => {
            serde_json::json!({ "requirements": requirements, "result": "passed", "facts": facts })
        }
        Err(error) => serde_json::json!({
            "requirements": requirements,
            "result": "refused",
            "error": crate::report::error_chain(error),
        }),
    };
    let mut report = listed;
    report["nvml"] = serde_json::json!(match &gpu {
        Some(g) if g.simulate.is_some() => "simulated GPU (proves nothing)".to_string(),
        _ => nvidia::nvml::NVML_LIBRARY.to_string(),
    });
    report["precheck"] = precheck;
    print_json(&report)?;
    verdict.map(|_| ()).map_err(CliError::failed)
}

fn measure(dir: &Path, json: bool, manifest: Option<&Path>) -> Result<(), CliError> {
    let mut stdout = std::io::stdout().lock();
    crate::measure::run_measure_command(dir, json, manifest, &mut stdout).map_err(CliError::failed)
}

impl CommonArgs {
    fn files(&self, policy: &Path) -> PolicyFiles {
        PolicyFiles {
            policy: policy.to_path_buf(),
            operator: self.operator.clone(),
            passwd: self.passwd.clone(),
            group: self.group.clone(),
        }
    }
}

fn load(policy_path: &Path, common: &CommonArgs) -> Result<LoadedPolicy, CliError> {
    wiring::load(&common.files(policy_path)).map_err(CliError::invalid)
}

/// `exec[0]` against the bundle on this machine (`policy check`, `plan`): an error when the
/// program in the bundle is not an executable regular file.
fn exec_in_bundle(policy: &policy::Policy) -> Result<(), CliError> {
    match policy::check_exec(&policy.workload) {
        Ok(policy::ExecCheck::BundleAbsent) => {
            let _ = writeln!(
                std::io::stderr().lock(),
                "note: workload.bundle {:?} is not on this machine, so exec[0] was not checked; run this where the bundle is to check it",
                policy.workload.bundle.display().to_string()
            );
            Ok(())
        }
        Ok(policy::ExecCheck::InBundle(_) | policy::ExecCheck::OutsideBundle) => Ok(()),
        Err(problem) => Err(CliError::Invalid(Box::new(Message(problem.to_string())))),
    }
}

fn policy_check(file: &Path, common: &CommonArgs) -> Result<(), CliError> {
    let loaded = load(file, common)?;
    exec_in_bundle(&loaded.policy)?;
    print_json(&serde_json::json!({
        "policy_digest": loaded.policy_digest,
        "operator_digest": loaded.operator_digest,
        "overridden": loaded.overridden,
        "policy": loaded.policy,
    }))
}

fn print_json(value: &impl serde::Serialize) -> Result<(), CliError> {
    let text = serde_json::to_string_pretty(value).map_err(CliError::failed)?;
    let _ = writeln!(std::io::stdout().lock(), "{text}");
    Ok(())
}

fn plan(args: &PolicyArgs) -> Result<(), CliError> {
    let loaded = load(&args.policy, &args.common)?;
    exec_in_bundle(&loaded.policy)?;
    let plan = BootPlan::new(
        &loaded.policy,
        &wiring::facts(&loaded, crate::lockdown::Shape::Pid1, false),
    )
    .map_err(CliError::invalid)?;
    print_json(&serde_json::json!({
        "policy_digest": loaded.policy_digest,
        "operator_digest": loaded.operator_digest,
        "insecure": wiring::insecure(&loaded),
        "modules": crate::lockdown::module_plan(&loaded.policy),
        "stages": plan,
    }))
}

fn attest_dry_run(args: &AttestArgs) -> Result<(), CliError> {
    let loaded = load(&args.policy.policy, &args.policy.common)?;
    let mut extra = Vec::new();
    for text in &args.resource {
        let uri = policy::ResourceUri::parse(text)
            .map_err(|why| CliError::Invalid(Box::new(Message(format!("--resource {why}")))))?;
        extra.push(uri);
    }
    let facts = wiring::facts(&loaded, crate::lockdown::Shape::Pid1, false);
    let (report, all_released) =
        crate::dryrun::attest(&loaded, &facts, &RealSys::default(), &extra)
            .map_err(CliError::failed)?;
    print_json(&report)?;
    if all_released {
        Ok(())
    } else {
        Err(CliError::Reported(1))
    }
}

fn firewall(command: &FirewallCommand) -> Result<(), CliError> {
    use crate::firewall::{run_apply_command, run_render_command, NftFirewall, SystemResolver};
    let args = match command {
        FirewallCommand::Render { policy, .. } | FirewallCommand::Apply { policy, .. } => policy,
    };
    let loaded = load(&args.policy, &args.common)?;
    let resolver = SystemResolver::default();
    let mut stdout = std::io::stdout().lock();
    match command {
        FirewallCommand::Render { phase, format, .. } => {
            run_render_command(&loaded.policy, *phase, *format, &resolver, &mut stdout).map(|_| ())
        }
        FirewallCommand::Apply { phase, .. } => run_apply_command(
            &loaded.policy,
            *phase,
            &resolver,
            &mut NftFirewall::new(),
            &mut stdout,
        )
        .map(|_| ()),
    }
    .map_err(CliError::failed)
}

fn reference_values(args: &ReferenceArgs) -> Result<(), CliError> {
    if let Some(inputs) = args.snp.inputs() {
        return snp_launch_values(&inputs);
    }
    let loaded = load(&args.policy.policy, &args.policy.common)?;
    let mut facts = wiring::facts(&loaded, crate::lockdown::Shape::Pid1, false);
    facts.cmdline_path = args.cmdline.clone();
    let values = crate::dryrun::reference_values(&loaded, &facts, &RealSys::default())
        .map_err(CliError::failed)?;
    match args.trustee.format {
        ReferenceFormat::Json => print_json(&values),
        ReferenceFormat::Trustee => {
            let trustee = &args.trustee;
            let mut aks = Vec::new();
            for file in &trustee.ak {
                let bytes = read_file(file, "the AK public key")?;
                aks.push(crate::dryrun::ak_spki_base64(&bytes).map_err(|detail| {
                    CliError::Invalid(Box::new(Message(format!(
                        "--ak {}: {detail}",
                        file.display()
                    ))))
                })?);
            }
            let inputs = crate::dryrun::TrusteeInputs {
                trusted_aks: aks,
                tpm_pcr11: trustee.tpm_pcr11.clone(),
                snp_launch_measurement: trustee.snp_measurement.clone(),
            };
            let out = crate::dryrun::trustee_values(&loaded, &values, inputs)
                .map_err(CliError::invalid)?;
            print_json(&out.to_json())
        }
    }
}

fn read_file(path: &Path, what: &str) -> Result<Vec<u8>, CliError> {
    std::fs::read(path).map_err(|e| {
        CliError::Invalid(Box::new(Message(format!(
            "cannot read {what} {}: {e}",
            path.display()
        ))))
    })
}

fn broker_register(args: &RegisterArgs) -> Result<(), CliError> {
    use crate::kbs::admin;
    let invalid = |text: String| CliError::Invalid(Box::new(Message(text)));
    let key_pem = zeroize::Zeroizing::new(read_file(&args.admin_key, "the admin key")?);
    let key = admin::AdminKey::from_pem(&key_pem, &args.admin_key.display().to_string())
        .map_err(CliError::invalid)?;
    let mut workloads = Vec::new();
    for file in &args.values {
        let text = read_file(file, "the values file")?;
        let value: serde_json::Value = serde_json::from_slice(&text).map_err(|e| {
            invalid(format!(
                "--values {}: not JSON ({e}); give what `cvm-warden reference-values --format trustee` printed",
                file.display()
            ))
        })?;
        workloads.push(
            admin::TrusteeValues::from_json(&value)
                .map_err(|e| invalid(format!("--values {}: {e}", file.display())))?,
        );
    }
    let mut requests = Vec::new();
    let mut skipped = Vec::new();
    for request in admin::merged_requests(&workloads) {
        if request.path == admin::RESOURCE_POLICY_PATH && !args.replace_resource_policy {
            skipped.push(format!(
                "{} (replaces the KBS's one resource policy: pass --replace-resource-policy)",
                request.what
            ));
            continue;
        }
        requests.push(request);
    }
    if let Some(file) = &args.attestation_policy {
        let rego = String::from_utf8(read_file(file, "the attestation policy")?).map_err(|_| {
            invalid(format!(
                "--attestation-policy {}: not UTF-8 text",
                file.display()
            ))
        })?;
        let registers_pcr15 = workloads.iter().any(|w| w.tpm_pcr15.is_some());
        // A line of its own, not inside a comment or another expression.
        let reads_pcr15 = rego
            .lines()
            .any(|line| line.trim() == admin::PCR15_POLICY_LINE);
        if registers_pcr15 && !reads_pcr15 {
            return Err(invalid(format!(
                "--attestation-policy {}: the values register tpm_pcr15 but this policy never reads it, so Trustee would release keys whatever PCR 15 holds; add `{}` to its tpm executables rule",
                file.display(),
                admin::PCR15_POLICY_LINE
            )));
        }
        requests.push(admin::AdminRequest {
            what: format!("attestation policy {}", admin::DEFAULT_CPU_POLICY_ID),
            path: admin::ATTESTATION_POLICY_PATH.to_string(),
            body: admin::attestation_policy_body(&rego),
        });
    }
    let mut resources = Vec::new();
    for spec in &args.resource {
        let Some((path, file)) = spec.split_once('=') else {
            return Err(invalid(format!(
                "--resource {spec:?}: write REPO/TYPE/TAG=FILE, e.g. default/key/volume=volume.key"
            )));
        };
        policy::ResourceUri::parse(&format!("kbs:///{path}"))
            .map_err(|why| invalid(format!("--resource {path:?}: {why}")))?;
        resources.push(admin::ResourceUpload {
            path: path.to_string(),
            value: zeroize::Zeroizing::new(read_file(Path::new(file), "the resource file")?),
        });
    }
    let ca = match &args.kbs_ca {
        Some(file) => Some(read_file(file, "the KBS CA")?),
        None => None,
    };
    let mut transport = crate::kbs::HttpTransport::new(
        &args.kbs,
        ca.as_deref(),
        &args
            .kbs_ca
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        args.insecure_http,
        std::time::Duration::from_secs(10),
        std::time::Duration::from_secs(30),
    )
    .map_err(CliError::invalid)?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let claims = admin::AdminClaims {
        issuer: args.issuer.clone(),
        audience: args.audience.clone(),
        role: args.role.clone(),
        ttl_secs: 300,
    };
    let token = key.token(&claims, now);
    let done =
        admin::register(&mut transport, &token, &requests, &resources).map_err(CliError::failed)?;
    print_json(&serde_json::json!({
        "kbs": args.kbs,
        "registered": done,
        "skipped": skipped,
    }))
}

/// `reference-values --snp-launch`: the expected SEV-SNP launch measurement (no policy read).
fn snp_launch_values(inputs: &crate::tee::snp_launch::LaunchInputs) -> Result<(), CliError> {
    match crate::tee::snp_launch::measure(inputs) {
        Ok(values) => print_json(&serde_json::json!({ "snp": values })),
        Err(error) if error.is_input() => Err(CliError::invalid(error)),
        Err(error) => Err(CliError::failed(error)),
    }
}

fn init(args: &InitArgs, kernel_ignored: &[String]) -> Result<(), CliError> {
    let pid = std::process::id();
    if pid != 1 {
        // Run by hand on a host, `init` would power the host off when the workload ends.
        return Err(CliError::Invalid(Box::new(Message(format!(
            "`cvm-warden init` must run as PID 1 (the initramfs /init, or a new PID namespace \
             such as `unshare --pid --fork`), not as PID {pid}; use `cvm-warden run` for the \
             systemd-unit shape"
        )))));
    }
    let options = InitOptions {
        files: args.policy.common.files(&args.policy.policy),
        sandbox: args.sandbox,
    };
    crate::boot::init::main(&options, kernel_ignored)
}

fn run(args: &PolicyArgs) -> Result<(), CliError> {
    let loaded = load(&args.policy, &args.common)?;
    crate::boot::unit::main(&loaded).map_err(CliError::failed)
}

/// A tiny logger: `cvm-warden: LEVEL message` on stderr (the console in PID 1 mode). Never
/// given secrets: callers log stage names, paths and error chains only.
struct StderrLogger;

impl log::Log for StderrLogger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        // Our own messages from info up; libraries (the TSS, rustls) only warnings and errors.
        let ours = metadata.target().starts_with("cvm_warden");
        metadata.level()
            <= if ours {
                log::Level::Info
            } else {
                log::Level::Warn
            }
    }

    fn log(&self, record: &log::Record<'_>) {
        if self.enabled(record.metadata()) {
            let _ = writeln!(
                std::io::stderr().lock(),
                "cvm-warden: {} {}",
                record.level().as_str().to_lowercase(),
                record.args()
            );
        }
    }

    fn flush(&self) {}
}

static LOGGER: StderrLogger = StderrLogger;

fn init_logger() {
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(log::LevelFilter::Info);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn os(words: &[&str]) -> Vec<OsString> {
        words.iter().map(OsString::from).collect()
    }

    #[test]
    fn init_options_come_from_the_parser() {
        let options = init_options();
        for (long, takes_value) in [
            ("policy", true),
            ("operator", true),
            ("passwd", true),
            ("group", true),
            ("sandbox", false),
        ] {
            assert!(
                options.contains(&(long.to_owned(), takes_value)),
                "{long}: {options:?}"
            );
        }
        assert!(!options.iter().any(|(long, _)| long == "help"));
    }

    #[test]
    fn a_kernel_started_init_parses_whatever_the_kernel_passed() {
        let (argv, ignored) = invocation(os(&["/init", "single", "--", "--bogus"]), 1, true);
        let cli = Cli::try_parse_from(&argv).unwrap();
        assert!(
            matches!(cli.command, Command::Init(ref a) if a.policy.policy == Path::new(DEFAULT_POLICY) && !a.sandbox)
        );
        assert_eq!(ignored.unwrap(), ["single", "--", "--bogus"]);
        // `cvm-warden init` from a wrapper: its options kept, the kernel's words ignored.
        let (argv, ignored) = invocation(
            os(&[
                "/usr/bin/cvm-warden",
                "init",
                "--policy",
                "/p.toml",
                "single",
                "--help",
            ]),
            1,
            true,
        );
        let cli = Cli::try_parse_from(&argv).unwrap();
        assert!(
            matches!(cli.command, Command::Init(ref a) if a.policy.policy == Path::new("/p.toml"))
        );
        assert_eq!(ignored.unwrap(), ["single", "--help"]);
        // Not PID 1: as typed, so clap reports the bad word (exit 2).
        let (argv, ignored) = invocation(os(&["cvm-warden", "init", "single"]), 7, false);
        assert!(ignored.is_none());
        assert_eq!(
            CliError::Usage(Cli::try_parse_from(&argv).unwrap_err()).code(),
            2
        );
    }

    #[test]
    fn exit_codes_follow_the_error() {
        assert_eq!(CliError::Invalid(Box::new(Message("x".into()))).code(), 2);
        assert_eq!(CliError::Failed(Box::new(Message("x".into()))).code(), 1);
        assert_eq!(CliError::Reported(3).code(), 3);
        assert_eq!(status(0).map_err(|e| e.code()), Ok(()));
        assert_eq!(status(3).map_err(|e| e.code()), Err(3));
    }
}
