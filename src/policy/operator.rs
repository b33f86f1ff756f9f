//! The operator file: deploy-time values for the keys the policy declares overridable. Its
//! values replace the policy's at those keys before validation, so the merged policy is
//! validated as a whole.

use super::diag;
use super::validate::is_env_name;

/// Every key of the schema that `overridable` may name (besides `workload.env.<NAME>`).
/// Kept in step with `raw.rs` by the test `schema_keys_match_the_raw_types`.
pub(crate) const SCHEMA_KEYS: &[&str] = &[
    "workload",
    "workload.bundle",
    "workload.source",
    "workload.copy_to",
    "workload.digest",
    "workload.manifest",
    "workload.exec",
    "workload.user",
    "workload.group",
    "workload.env",
    "workload.workdir",
    "workload.umask",
    "workload.rlimit",
    "workload.restart",
    "workload.max_restarts",
    "attestation",
    "attestation.tee",
    "attestation.kbs",
    "attestation.kbs_ca",
    "attestation.insecure_sample",
    "attestation.insecure_http",
    "attestation.key_wrap",
    "attestation.tries",
    "attestation.timeout",
    "attestation.tpm",
    "attestation.tpm_ak_handle",
    "attestation.snp_certs",
    "volume",
    "secret",
    "network",
    "network.inbound",
    "network.outbound",
    "lockdown",
    "lockdown.consoles",
    "lockdown.kernel_lockdown",
    "lockdown.modules",
    "audit",
    "audit.file",
    "audit.file_required",
    "audit.syslog",
    "audit.console",
    "on_failure",
];

/// Keys that decide whom the VM trusts or what it runs: never set by the site operator. On
/// SNP and TDX the operator file is invisible to the broker, so an overridable trust anchor
/// would let the host point the VM at its own broker (and have blank volumes formatted with
/// keys it knows).
pub(crate) const NEVER_OVERRIDABLE: &[&str] = &[
    "workload",
    "workload.digest",
    "workload.manifest",
    "attestation",
    "attestation.tee",
    "attestation.kbs_ca",
    "attestation.insecure_http",
    "attestation.insecure_sample",
    "attestation.tpm_ak_handle",
    "attestation.snp_certs",
    "volume",
    "secret",
];

/// Whether `key` is something `overridable` may name.
fn is_schema_key(key: &str) -> bool {
    SCHEMA_KEYS.contains(&key) || key.strip_prefix("workload.env.").is_some_and(is_env_name)
}

/// Checks the `overridable` list. Returns the problems (one line each, `overridable[i]: …`)
/// and the entries that are usable.
pub(crate) fn check_overridable(list: &[String]) -> (Vec<String>, Vec<String>) {
    let mut problems = Vec::new();
    let mut valid: Vec<String> = Vec::new();
    for (i, key) in list.iter().enumerate() {
        if key == "overridable" || key.starts_with("overridable.") {
            problems.push(format!(
                "overridable[{i}]: {key:?} cannot be overridable; the operator file must not widen what it may set, so remove it"
            ));
        } else if NEVER_OVERRIDABLE.contains(&key.as_str()) {
            problems.push(format!(
                "overridable[{i}]: {key:?} decides what the VM trusts or runs, so only the image builder may set it; remove it (overridable keys for deployment values: attestation.kbs, attestation.tries, attestation.timeout, workload.env.<NAME>, network.outbound, …)"
            ));
        } else if !is_schema_key(key) {
            problems.push(format!(
                "overridable[{i}]: {key:?} is not a policy key; write one of {}, or workload.env.<NAME>",
                SCHEMA_KEYS.join(", ")
            ));
        } else if valid.contains(key) {
            problems.push(format!(
                "overridable[{i}]: {key:?} is listed twice; remove one"
            ));
        } else {
            valid.push(key.clone());
        }
    }
    (problems, valid)
}

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_string()
    } else {
        format!("{prefix}.{key}")
    }
}

/// The operator's values at overridable keys, in key order, or one problem per key the policy
/// does not declare overridable.
fn collect_overrides(
    label: &str,
    text: &str,
    operator: &toml::Table,
    overridable: &[String],
) -> Result<Vec<(String, toml::Value)>, Vec<String>> {
    let positions = diag::key_paths(text).unwrap_or_default();
    let mut found = Vec::new();
    let mut problems = Vec::new();
    walk(
        label,
        text,
        &positions,
        "",
        operator,
        overridable,
        &mut found,
        &mut problems,
    );
    if problems.is_empty() {
        Ok(found)
    } else {
        Err(problems)
    }
}

#[allow(clippy::too_many_arguments)]
fn walk(
    label: &str,
    text: &str,
    positions: &[(std::ops::Range<usize>, String)],
    prefix: &str,
    table: &toml::Table,
    overridable: &[String],
    found: &mut Vec<(String, toml::Value)>,
    problems: &mut Vec<String>,
) {
    for (key, value) in table {
        let path = join(prefix, key);
        if overridable.contains(&path) {
            found.push((path, value.clone()));
        } else if let toml::Value::Table(inner) = value {
            walk(
                label,
                text,
                positions,
                &path,
                inner,
                overridable,
                found,
                problems,
            );
        } else {
            let at = positions
                .iter()
                .filter(|(_, p)| *p == path)
                .map(|(span, _)| diag::line_column(text, span.start))
                .min()
                .map(|(line, column)| format!(" at line {line}, column {column}"))
                .unwrap_or_default();
            problems.push(format!(
                "{label}: `{path}`{at} is not overridable: the policy does not declare it in `overridable`; remove it from the operator file"
            ));
        }
    }
}

/// Replaces the policy's values at the operator's keys. Returns the keys overridden.
pub(crate) fn apply(
    label: &str,
    text: &str,
    policy: &mut toml::Table,
    operator: &toml::Table,
    overridable: &[String],
) -> Result<Vec<String>, Vec<String>> {
    let overrides = collect_overrides(label, text, operator, overridable)?;
    let mut problems = Vec::new();
    let mut keys = Vec::new();
    for (path, value) in overrides {
        match set(policy, &path, value) {
            Ok(()) => keys.push(path),
            Err(parent) => problems.push(format!(
                "{label}: cannot set `{path}`: the policy's `{parent}` is not a table; declare `{parent}` overridable instead so the operator file replaces it whole"
            )),
        }
    }
    if problems.is_empty() {
        Ok(keys)
    } else {
        Err(problems)
    }
}

/// Sets `path` (dotted, no arrays) in `table`, creating missing tables. On failure returns
/// the prefix that is not a table.
fn set(table: &mut toml::Table, path: &str, value: toml::Value) -> Result<(), String> {
    let mut parts: Vec<&str> = path.split('.').collect();
    let last = parts.pop().unwrap_or_default();
    let mut current = table;
    let mut walked = String::new();
    for part in parts {
        walked = join(&walked, part);
        let entry = current
            .entry(part.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        match entry {
            toml::Value::Table(inner) => current = inner,
            _ => return Err(walked),
        }
    }
    current.insert(last.to_string(), value);
    Ok(())
}
