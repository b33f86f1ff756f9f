//! `cvm-warden-verify`: the auditor's offline verifier, without the daemon.
//!
//! - `cvm-warden-verify audit FILE [options]`: the audit log's chain, evidence and coverage.
//! - `cvm-warden-verify evidence …`: one piece of TEE evidence.

use clap::{Parser, Subcommand};
use cvm_warden_verify::cli;

/// Offline verifier of cvm-warden audit logs and TEE evidence.
#[derive(Debug, Parser)]
#[command(name = "cvm-warden-verify", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Verify an audit log: chain, embedded evidence, checkpoints and their coverage
    /// (exit 0 every run attested, 3 intact but not fully attested, 1 broken, 2 usage).
    Audit(cli::AuditVerifyArgs),
    /// Verify one piece of evidence offline and print its parsed fields as JSON.
    Evidence(cli::EvidenceArgs),
}

fn main() {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => {
            let _ = error.print();
            std::process::exit(if error.use_stderr() { 2 } else { 0 });
        }
    };
    let code = match &cli.command {
        Command::Audit(args) => cli::audit_verify(args),
        Command::Evidence(args) => cli::evidence_verify(args),
    };
    std::process::exit(code);
}
