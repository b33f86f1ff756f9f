//! Policy: strict TOML, parsed into raw types, validated into typed ones.
//!
//! [`parse`] is pure (text in, [`LoadedPolicy`] or every problem out); [`load`] reads the
//! files and calls it. The operator file (deploy-time values) may only set keys that the
//! policy lists in `overridable`; its values replace the policy's before validation, so the
//! merged policy is validated as a whole. The reference is the README's "Policy reference".

mod diag;
mod exec_check;
mod operator;
mod raw;
mod types;
mod users;
mod validate;

#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};

pub use exec_check::{check_exec, ExecCheck};
pub use types::*;
pub use users::{MemoryUsers, PasswdFiles, UserDb, DEFAULT_GROUP, DEFAULT_PASSWD};
pub use validate::{
    BrokerUrl, BrokerUrlError, AUDIT_DIR_FORBIDDEN, DEFAULT_COPY_TO, DEFAULT_MAX_RESTARTS,
    DEFAULT_UMASK, DEFAULT_WORKDIR, MAX_NAMESERVERS, MAX_RESTARTS_LIMIT, RUNTIME_DIR,
    VOLUME_FORBIDDEN,
};

use crate::digest::Digest;
use raw::RawPolicy;

/// A validated policy and what the measure stage records about where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadedPolicy {
    /// The validated policy, operator overrides applied.
    pub policy: Policy,
    /// SHA-256 of the policy file's bytes.
    pub policy_digest: Digest,
    /// SHA-256 of the operator file's bytes, when there is one.
    pub operator_digest: Option<Digest>,
    /// Dotted keys the operator file set (sorted), e.g. `attestation.kbs`.
    pub overridden: Vec<String>,
}

/// Why a policy could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// A policy or operator file could not be read.
    #[error("cannot read the {role} file {path:?}; check the path and its permissions")]
    Read {
        /// `policy` or `operator`.
        role: &'static str,
        /// The path as given.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The policy (with its operator file) is invalid. Each entry is one complete line
    /// naming the key, the bad value and what to do; `Display` prints one per line.
    #[error("{}", .0.join("\n"))]
    Invalid(Vec<String>),
}

impl PolicyError {
    /// The problem lines (a read error is one line).
    pub fn problems(&self) -> Vec<String> {
        match self {
            PolicyError::Invalid(lines) => lines.clone(),
            other => vec![other.to_string()],
        }
    }
}

/// Reads and validates the policy file and the optional operator file. Errors name the
/// files as given.
pub fn load(
    policy_path: &Path,
    operator_path: Option<&Path>,
    users: &dyn UserDb,
) -> Result<LoadedPolicy, PolicyError> {
    let read = |role: &'static str, path: &Path| {
        std::fs::read(path).map_err(|source| PolicyError::Read {
            role,
            path: path.to_path_buf(),
            source,
        })
    };
    let policy_bytes = read("policy", policy_path)?;
    let operator_bytes = match operator_path {
        Some(path) => Some((read("operator", path)?, path.display().to_string())),
        None => None,
    };
    let policy_label = policy_path.display().to_string();
    let policy_text = utf8(&policy_label, &policy_bytes)?;
    let operator = match &operator_bytes {
        Some((bytes, label)) => Some((utf8(label, bytes)?, label.as_str())),
        None => None,
    };
    parse_labelled((policy_text, &policy_label), operator, users)
}

fn utf8<'a>(label: &str, bytes: &'a [u8]) -> Result<&'a str, PolicyError> {
    std::str::from_utf8(bytes).map_err(|e| {
        PolicyError::Invalid(vec![format!(
            "{label}: not UTF-8 text (invalid byte at offset {}); save the file as UTF-8",
            e.valid_up_to()
        )])
    })
}

/// Validates a policy text and an optional operator text (pure). Messages call the files
/// `policy` and `operator`.
pub fn parse(
    policy_text: &str,
    operator_text: Option<&str>,
    users: &dyn UserDb,
) -> Result<LoadedPolicy, PolicyError> {
    parse_labelled(
        (policy_text, "policy"),
        operator_text.map(|text| (text, "operator")),
        users,
    )
}

fn parse_labelled(
    (policy_text, policy_label): (&str, &str),
    operator: Option<(&str, &str)>,
    users: &dyn UserDb,
) -> Result<LoadedPolicy, PolicyError> {
    let invalid = PolicyError::Invalid;
    let policy_digest = Digest::of(policy_text.as_bytes());
    let policy_raw: RawPolicy = toml::from_str(policy_text)
        .map_err(|e| invalid(vec![diag::toml_problem(policy_label, policy_text, &e)]))?;

    let Some((operator_text, operator_label)) = operator else {
        let policy = validate::validate(&policy_raw, users, &[], "").map_err(invalid)?;
        return Ok(LoadedPolicy {
            policy,
            policy_digest,
            operator_digest: None,
            overridden: Vec::new(),
        });
    };

    let operator_digest = Digest::of(operator_text.as_bytes());
    // The operator file has the policy's shape: unknown keys and wrong types are reported
    // against it, with its positions.
    let _: RawPolicy = toml::from_str(operator_text)
        .map_err(|e| invalid(vec![diag::toml_problem(operator_label, operator_text, &e)]))?;
    let operator_table: toml::Table = toml::from_str(operator_text)
        .map_err(|e| invalid(vec![diag::toml_problem(operator_label, operator_text, &e)]))?;
    let mut merged: toml::Table = toml::from_str(policy_text)
        .map_err(|e| invalid(vec![diag::toml_problem(policy_label, policy_text, &e)]))?;

    let (mut problems, overridable) =
        operator::check_overridable(policy_raw.overridable.as_deref().unwrap_or(&[]));
    let overridden = match operator::apply(
        operator_label,
        operator_text,
        &mut merged,
        &operator_table,
        &overridable,
    ) {
        Ok(keys) => keys,
        Err(more) => {
            problems.extend(more);
            return Err(invalid(problems));
        }
    };
    let merged_raw: RawPolicy = toml::Value::Table(merged).try_into().map_err(|e| {
        invalid(vec![format!(
            "{policy_label} with {operator_label}: {}",
            e.message().trim()
        )])
    })?;
    let policy =
        validate::validate(&merged_raw, users, &overridden, operator_label).map_err(invalid)?;
    Ok(LoadedPolicy {
        policy,
        policy_digest,
        operator_digest: Some(operator_digest),
        overridden,
    })
}
