//! Command-line interface: parses arguments and dispatches, nothing else.
//!
//! Exit codes: 0 success, 1 a runtime failure (boot failed, log broken, bundle unreadable),
//! 2 invalid input (usage, invalid policy).

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand};

use crate::audit::{self, Audit};
use crate::boot::{self, Env, RealLauncher};
use crate::eventlog::{NoRegister, RuntimeRegister};
use crate::policy::{self, Attestation, LoadedPolicy, PasswdFiles};
use crate::stage::{BootPlan, Facts, RealMeasurer};
use crate::sys::RealSys;

/// Default policy path when started as `/init` without arguments.
pub const DEFAULT_POLICY: &str = "/etc/cvm-warden/policy.toml";
/// Kernel command line.
pub const PROC_CMDLINE: &str = "/proc/cmdline";

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
    /// bundle and the application PCR value they produce (no TEE, no root needed).
    ReferenceValues(ReferenceArgs),
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
}

#[derive(Debug, Subcommand)]
enum EvidenceCommand {
    /// Verify one piece of evidence offline and print its parsed fields as JSON (exit 0 only
    /// when it verifies).
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

/// Runs the command line; returns the process exit code.
pub fn main() -> i32 {
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    // The kernel starts `/init` without arguments: that means `init` with the defaults.
    let invoked_as_init = args
        .first()
        .and_then(|a| Path::new(a).file_name())
        .is_some_and(|name| name == "init");
    if invoked_as_init && args.len() == 1 {
        args.push("init".into());
    }
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(error) => {
            let _ = error.print();
            return if error.use_stderr() { 2 } else { 0 };
        }
    };
    init_logger();
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
        Command::Init(args) => init(&args),
        Command::Run(args) => run(&args),
        Command::Attest(args) => attest_dry_run(&args),
        Command::Firewall { command } => firewall(&command),
        Command::Lockdown {
            command: LockdownCommand::Status,
        } => {
            let status = crate::lockdown::status(&crate::lockdown::Paths::default());
            let ok = status["ok"] == serde_json::Value::Bool(true);
            match print_json(&status) {
                0 if ok => 0,
                0 => 1,
                code => code,
            }
        }
        Command::ReferenceValues(args) => reference_values(&args),
        Command::Audit {
            command: AuditCommand::Verify(args),
        } => cvm_warden_verify::cli::audit_verify(&args),
        Command::Evidence {
            command: EvidenceCommand::Verify(args),
        } => cvm_warden_verify::cli::evidence_verify(&args),
    }
}

fn print_error(error: &dyn std::error::Error) {
    let mut stderr = std::io::stderr().lock();
    let _ = writeln!(stderr, "error: {error}");
    let mut source = error.source();
    while let Some(cause) = source {
        let _ = writeln!(stderr, "  because: {cause}");
        source = cause.source();
    }
}

fn measure(dir: &Path, json: bool, manifest: Option<&Path>) -> i32 {
    let mut stdout = std::io::stdout().lock();
    match crate::measure::run_measure_command(dir, json, manifest, &mut stdout) {
        Ok(()) => 0,
        Err(error) => {
            print_error(&error);
            1
        }
    }
}

fn load(policy_path: &Path, common: &CommonArgs) -> Result<LoadedPolicy, policy::PolicyError> {
    let users = PasswdFiles {
        passwd: common.passwd.clone(),
        group: common.group.clone(),
    };
    policy::load(policy_path, common.operator.as_deref(), &users)
}

/// `exec[0]` against the bundle on this machine (`policy check`, `plan`): false (the error
/// printed) when the program in the bundle is not an executable regular file.
fn exec_in_bundle_ok(policy: &policy::Policy) -> bool {
    match policy::check_exec(&policy.workload) {
        Ok(policy::ExecCheck::BundleAbsent) => {
            let _ = writeln!(
                std::io::stderr().lock(),
                "note: workload.bundle {:?} is not on this machine, so exec[0] was not checked; run this where the bundle is to check it",
                policy.workload.bundle.display().to_string()
            );
            true
        }
        Ok(policy::ExecCheck::InBundle(_) | policy::ExecCheck::OutsideBundle) => true,
        Err(problem) => {
            let _ = writeln!(std::io::stderr().lock(), "error: {problem}");
            false
        }
    }
}

fn policy_check(file: &Path, common: &CommonArgs) -> i32 {
    match load(file, common) {
        Ok(loaded) if !exec_in_bundle_ok(&loaded.policy) => 2,
        Ok(loaded) => print_json(&serde_json::json!({
            "policy_digest": loaded.policy_digest,
            "operator_digest": loaded.operator_digest,
            "overridden": loaded.overridden,
            "policy": loaded.policy,
        })),
        Err(error) => {
            print_error(&error);
            2
        }
    }
}

fn print_json(value: &impl serde::Serialize) -> i32 {
    match serde_json::to_string_pretty(value) {
        Ok(text) => {
            let _ = writeln!(std::io::stdout().lock(), "{text}");
            0
        }
        Err(error) => {
            print_error(&error);
            1
        }
    }
}

/// `sandbox`: only `init --sandbox` (checked against the PID namespace by `init`); every
/// other command plans a real boot.
fn facts(loaded: &LoadedPolicy, shape: crate::lockdown::Shape, sandbox: bool) -> Facts {
    Facts {
        cmdline_path: PathBuf::from(PROC_CMDLINE),
        policy_digest: loaded.policy_digest,
        operator_digest: loaded.operator_digest,
        shape,
        sandbox,
    }
}

fn plan(args: &PolicyArgs) -> i32 {
    let loaded = match load(&args.policy, &args.common) {
        Ok(loaded) => loaded,
        Err(error) => {
            print_error(&error);
            return 2;
        }
    };
    if !exec_in_bundle_ok(&loaded.policy) {
        return 2;
    }
    match BootPlan::new(
        &loaded.policy,
        &facts(&loaded, crate::lockdown::Shape::Pid1, false),
    ) {
        Ok(plan) => print_json(&serde_json::json!({
            "policy_digest": loaded.policy_digest,
            "operator_digest": loaded.operator_digest,
            "insecure": insecure(&loaded),
            "stages": plan,
        })),
        Err(error) => {
            print_error(&error);
            2
        }
    }
}

fn attest_dry_run(args: &AttestArgs) -> i32 {
    let loaded = match load(&args.policy.policy, &args.policy.common) {
        Ok(loaded) => loaded,
        Err(error) => {
            print_error(&error);
            return 2;
        }
    };
    let mut extra = Vec::new();
    for text in &args.resource {
        match policy::ResourceUri::parse(text) {
            Ok(uri) => extra.push(uri),
            Err(why) => {
                let _ = writeln!(std::io::stderr().lock(), "error: --resource {why}");
                return 2;
            }
        }
    }
    let facts = facts(&loaded, crate::lockdown::Shape::Pid1, false);
    match crate::dryrun::attest(&loaded, &facts, &RealSys::default(), &extra) {
        Ok((report, all_released)) => {
            let code = print_json(&report);
            if code == 0 && all_released {
                0
            } else {
                1
            }
        }
        Err(error) => {
            print_error(&error);
            1
        }
    }
}

fn firewall(command: &FirewallCommand) -> i32 {
    use crate::firewall::{run_apply_command, run_render_command, NftFirewall, SystemResolver};
    let args = match command {
        FirewallCommand::Render { policy, .. } | FirewallCommand::Apply { policy, .. } => policy,
    };
    let loaded = match load(&args.policy, &args.common) {
        Ok(loaded) => loaded,
        Err(error) => {
            print_error(&error);
            return 2;
        }
    };
    let resolver = SystemResolver::default();
    let mut stdout = std::io::stdout().lock();
    let result = match command {
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
    };
    match result {
        Ok(()) => 0,
        Err(error) => {
            print_error(&error);
            1
        }
    }
}

fn reference_values(args: &ReferenceArgs) -> i32 {
    let loaded = match load(&args.policy.policy, &args.policy.common) {
        Ok(loaded) => loaded,
        Err(error) => {
            print_error(&error);
            return 2;
        }
    };
    let mut facts = facts(&loaded, crate::lockdown::Shape::Pid1, false);
    facts.cmdline_path = args.cmdline.clone();
    match crate::dryrun::reference_values(&loaded, &facts, &RealSys::default()) {
        Ok(values) => print_json(&values),
        Err(error) => {
            print_error(&error);
            1
        }
    }
}

/// Whether every audit record must say `"insecure": true`: nothing is attested
/// (`attestation = "none"`) or the evidence proves nothing (`tee = "sample"`).
fn insecure(loaded: &LoadedPolicy) -> bool {
    matches!(
        loaded.policy.attestation,
        Attestation::None
            | Attestation::Broker {
                tee: policy::Tee::Sample,
                ..
            }
    )
}

/// Builds the audit log for a loaded policy (console = stderr: the serial console in PID 1
/// mode, the journal in unit mode).
fn open_audit(loaded: &LoadedPolicy) -> Audit {
    let insecure = insecure(loaded);
    let sinks = audit::sinks_from_config(&loaded.policy.audit, Box::new(std::io::stderr()));
    Audit::new(sinks, insecure)
}

/// An audit log for the time before a policy could be read: console only.
fn console_audit() -> Audit {
    Audit::new(
        vec![Box::new(audit::ConsoleSink::new(Box::new(
            std::io::stderr(),
        )))],
        false,
    )
}

fn init(init_args: &InitArgs) -> i32 {
    let args = &init_args.policy;
    let sys = RealSys::default();
    let pid1 = std::process::id() == 1;
    if !pid1 {
        // Run by hand on a host, `init` would power the host off when the workload ends.
        let _ = writeln!(
            std::io::stderr().lock(),
            "error: `cvm-warden init` must run as PID 1 (the initramfs /init, or a new PID \
             namespace such as `unshare --pid --fork`), not as PID {}; use `cvm-warden run` \
             for the systemd-unit shape",
            std::process::id()
        );
        return 2;
    }
    {
        if let Err(error) = crate::launch::early_mounts(&sys) {
            // Without /proc and /dev nothing below can be trusted to work: stop now.
            print_error(&error);
            crate::launch::shutdown(&sys, policy::FailureAction::Poweroff, 1);
        }
    }
    let loaded = match load(&args.policy, &args.common) {
        Ok(loaded) => loaded,
        Err(error) => {
            print_error(&error);
            let audit = console_audit();
            install_hook(&audit, pid1);
            let _ = audit.record(
                "boot",
                "policy_invalid",
                serde_json::json!({ "policy": args.policy, "error": boot::chain(&error) }),
            );
            let action = policy::FailureAction::Poweroff;
            let _ = audit.record(
                "shutdown",
                boot::closing_event(&sys, action),
                serde_json::json!({ "code": 2 }),
            );
            let _ = audit.flush();
            crate::launch::shutdown(&sys, action, 2);
        }
    };
    let in_sandbox = !crate::sys::Sys::in_initial_pid_namespace(&sys);
    let sandbox_problem = match (init_args.sandbox, in_sandbox) {
        (true, false) => Some(
            "--sandbox was given, but this is the PID 1 of a real boot (the initial PID \
             namespace): a real boot applies every lockdown setting; remove --sandbox",
        ),
        (false, true) if loaded.policy.lockdown.is_some() => Some(
            "this PID 1 runs in a sandbox PID namespace and the policy has [lockdown], whose \
             kernel settings are host-wide: pass --sandbox to skip them (tests, demo), or boot \
             the VM",
        ),
        _ => None,
    };
    if let Some(problem) = sandbox_problem {
        let _ = writeln!(std::io::stderr().lock(), "error: {problem}");
        // In a sandbox, shutdown() exits instead of powering anything off.
        crate::launch::shutdown(&sys, policy::FailureAction::Poweroff, 2);
    }
    let audit = open_audit(&loaded);
    install_hook(&audit, pid1);
    let action = loaded.policy.on_failure;
    let mut setup = Setup::new(&audit);
    let prepared = prepare(
        &loaded,
        &sys,
        &audit,
        crate::lockdown::Shape::Pid1,
        init_args.sandbox,
        &mut setup,
    );
    let (mut life, event_log) = setup.lifecycle(&sys, &audit, &loaded);
    let shutdown = match prepared {
        Ok(ready) => boot::run_init(&ready, &RealLauncher, &mut life, action),
        Err(error) => {
            print_error(&error);
            boot::fail(&mut life, action, &error, event_log)
        }
    };
    crate::launch::shutdown(&sys, shutdown.action, shutdown.code)
}

fn run(args: &PolicyArgs) -> i32 {
    let sys = RealSys::default();
    let loaded = match load(&args.policy, &args.common) {
        Ok(loaded) => loaded,
        Err(error) => {
            print_error(&error);
            return 2;
        }
    };
    let audit = open_audit(&loaded);
    install_hook(&audit, false);
    let mut setup = Setup::new(&audit);
    let prepared = prepare(
        &loaded,
        &sys,
        &audit,
        crate::lockdown::Shape::Systemd,
        false,
        &mut setup,
    );
    let (mut life, event_log) = setup.lifecycle(&sys, &audit, &loaded);
    match prepared {
        Ok(ready) => boot::run_unit(&ready, &RealLauncher, &mut life),
        Err(error) => {
            print_error(&error);
            boot::record_failure(&mut life, "exit", &error, event_log);
            1
        }
    }
}

/// What [`prepare`] sets up and the runner keeps using: the key broker (for checkpoints), the
/// volumes (closed after a failed launch) and the events measured so far.
struct Setup {
    broker: Option<crate::keybroker::RealBroker>,
    /// Every external tool (nft, mkfs.ext4, systemctl, loginctl) runs through this one
    /// runner: fixed absolute paths, a timeout, each path recorded in the audit log before
    /// first use.
    tools: crate::tool::Tools,
    volumes: crate::volume::RealVolumes,
    event_log: crate::eventlog::EventLog,
}

impl Setup {
    fn new(audit: &Audit) -> Setup {
        let tools = crate::tool::Tools::system().audited(audit);
        Setup {
            broker: None,
            volumes: crate::volume::RealVolumes::with_tools(tools.clone()),
            tools,
            event_log: crate::eventlog::EventLog::new(),
        }
    }

    /// What the runner uses after the stages (both shapes), and the events measured so far.
    fn lifecycle<'a>(
        &'a mut self,
        sys: &'a dyn crate::sys::Sys,
        audit: &'a Audit,
        loaded: &'a LoadedPolicy,
    ) -> (boot::Lifecycle<'a>, &'a crate::eventlog::EventLog) {
        let Setup {
            broker,
            volumes,
            event_log,
            ..
        } = self;
        let life = boot::Lifecycle {
            sys,
            audit,
            volumes,
            checkpointer: broker.as_mut().map(|b| b as &mut dyn boot::Checkpointer),
            checkpoint_interval: checkpoint_interval(loaded),
            audit_file: loaded.policy.audit.file.as_deref(),
        };
        (life, event_log)
    }
}

/// `audit.checkpoint_interval`, `None` when 0.
fn checkpoint_interval(loaded: &LoadedPolicy) -> Option<std::time::Duration> {
    match loaded.policy.audit.checkpoint_interval_secs {
        0 => None,
        secs => Some(std::time::Duration::from_secs(secs)),
    }
}

/// Runs every stage before launch with the real effects: the policy's evidence provider and
/// key broker client are set up first, so the provider's runtime register receives every
/// measurement. The broker and the event log stay in `setup`, also after a failure.
fn prepare(
    loaded: &LoadedPolicy,
    sys: &RealSys,
    audit: &Audit,
    shape: crate::lockdown::Shape,
    sandbox: bool,
    setup: &mut Setup,
) -> Result<boot::Ready, boot::BootError> {
    use crate::keybroker::{client_config, open_provider, RealBroker};
    let lockdown_paths = crate::lockdown::Paths::default();
    let tools = setup.tools.clone();
    let lockdown_sys = crate::lockdown::RealLockdownSys::with_tools(tools.clone());
    // The policy's modules first (the TEE's driver, e.g. sev-guest or tpm_crb, may be one of
    // them and there is no udev in the initramfs); the perimeter stage finds them loaded.
    if let Some(lockdown) = loaded.policy.lockdown.as_ref() {
        if !sandbox && !lockdown.modules.is_empty() {
            let plan =
                crate::stage::perimeter::only_load_modules(crate::lockdown::plan(lockdown, shape));
            let report = crate::lockdown::apply(&plan, &lockdown_sys, &lockdown_paths)
                .map_err(boot::BootError::Modules)?;
            let _ = audit.record("boot", "modules_loaded", serde_json::json!(report));
        }
    }
    let attestation = &loaded.policy.attestation;
    setup.broker = match (
        open_provider(attestation).map_err(boot::BootError::Setup)?,
        client_config(attestation).map_err(boot::BootError::Setup)?,
    ) {
        (Some(provider), Some(config)) => {
            Some(RealBroker::new(provider, config).map_err(boot::BootError::Setup)?)
        }
        _ => None,
    };
    let mut register: Box<dyn RuntimeRegister> = match setup.broker.as_mut() {
        Some(broker) => broker
            .runtime_register()
            .map_err(boot::BootError::Setup)?
            .unwrap_or_else(|| Box::new(NoRegister)),
        None => Box::new(NoRegister),
    };
    let env = Env {
        sys,
        measurer: &RealMeasurer,
        register: register.as_mut(),
        audit,
        broker: setup
            .broker
            .as_mut()
            .map(|b| b as &mut dyn crate::stage::KeyBroker),
        volumes: &setup.volumes,
        firewall: &mut crate::firewall::NftFirewall::with_tools(tools),
        resolver: &crate::firewall::SystemResolver::default(),
        lockdown: &lockdown_sys,
        lockdown_paths: &lockdown_paths,
    };
    boot::prepare_logged(
        loaded,
        &facts(loaded, shape, sandbox),
        env,
        &mut setup.event_log,
    )
}

fn install_hook(audit: &Audit, pid1: bool) {
    let audit = audit.clone();
    let closing = if pid1 {
        boot::closing_event(&RealSys::default(), policy::FailureAction::Poweroff)
    } else {
        "exit"
    };
    crate::launch::install_panic_hook(
        Box::new(move |message: &str| {
            // A panic may strike while this thread holds the audit lock: never wait forever.
            let _ = audit.record_within(
                std::time::Duration::from_secs(2),
                "boot",
                "panic",
                serde_json::json!({ "message": message }),
            );
            let _ = audit.record_within(
                std::time::Duration::from_secs(1),
                "shutdown",
                closing,
                serde_json::json!({ "code": 1 }),
            );
        }),
        pid1,
    );
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
