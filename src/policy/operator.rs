//! The operator file: deploy-time values for the keys the policy declares overridable. Its
//! values replace the policy's at those keys before validation, so the merged policy is
//! validated as a whole.

use std::collections::{HashMap, HashSet};

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
    "workload.flare",
    "workload.flare.startup_kit",
    "workload.flare.root_ca_sha256",
    "workload.flare.withheld",
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
    "attestation.gpu",
    "attestation.gpu.required",
    "attestation.gpu.count",
    "attestation.gpu.arch",
    "attestation.gpu.min_driver",
    "attestation.gpu.min_vbios",
    "attestation.gpu.allow_devtools",
    "attestation.gpu.rims",
    "attestation.gpu.simulate",
    "attestation.reattest_interval",
    "attestation.reattest_grace",
    "attestation.reattest_resource",
    "volume",
    "secret",
    "network",
    "network.inbound",
    "network.outbound",
    "network.interface",
    "lockdown",
    "lockdown.consoles",
    "lockdown.kernel_lockdown",
    "lockdown.modules",
    "kernel",
    "kernel.modules",
    "audit",
    "audit.file",
    "audit.file_dir",
    "audit.file_required",
    "audit.syslog",
    "audit.console",
    "audit.checkpoint_interval",
    "on_failure",
];

/// The keys of one `[network.interface.<NAME>]`; `overridable` may name
/// `network.interface.<NAME>` or `network.interface.<NAME>.<KEY>` for each.
pub(crate) const INTERFACE_KEYS: &[&str] = &["address", "gateway", "dns", "dhcp", "link_timeout"];

/// Whether `key` is `<NAME>` or `<NAME>.<one of INTERFACE_KEYS>` (after `network.interface.`).
fn is_interface_key(key: &str) -> bool {
    let (name, field) = match key.split_once('.') {
        Some((name, field)) => (name, Some(field)),
        None => (key, None),
    };
    super::validate::is_interface_name(name) && field.is_none_or(|f| INTERFACE_KEYS.contains(&f))
}

/// Keys that decide whom the VM trusts or what it runs: never set by the site operator. On
/// SNP and TDX the operator file is invisible to the broker, so an overridable trust anchor
/// would let the host point the VM at its own broker (and have blank volumes formatted with
/// keys it knows).
pub(crate) const NEVER_OVERRIDABLE: &[&str] = &[
    "workload",
    "workload.digest",
    "workload.manifest",
    "workload.flare",
    "workload.flare.startup_kit",
    "workload.flare.root_ca_sha256",
    "workload.flare.withheld",
    "attestation",
    "attestation.tee",
    "attestation.kbs_ca",
    "attestation.insecure_http",
    "attestation.insecure_sample",
    "attestation.tpm_ak_handle",
    "attestation.snp_certs",
    "attestation.gpu",
    "attestation.gpu.required",
    "attestation.gpu.count",
    "attestation.gpu.arch",
    "attestation.gpu.min_driver",
    "attestation.gpu.min_vbios",
    "attestation.gpu.allow_devtools",
    "attestation.gpu.rims",
    "attestation.gpu.simulate",
    "attestation.reattest_interval",
    "attestation.reattest_grace",
    "attestation.reattest_resource",
    "volume",
    "secret",
];

/// Environment variables that make a program load code, options or trust anchors from where
/// they point (the dynamic loader, shells, interpreters, TLS libraries): the operator file
/// may never set them, so `overridable` may not name them. The image builder may still set
/// them in `[workload.env]`. Names ending in `*` are prefixes.
pub(crate) const CODE_LOADING_ENV: &[&str] = &[
    "LD_*",
    "SSL_CERT_*",
    "PATH",
    "BASH_ENV",
    "ENV",
    "GCONV_PATH",
    "LOCPATH",
    "PYTHONPATH",
    "PYTHONHOME",
    "PYTHONSTARTUP",
    "PYTHONUSERBASE",
    "PERL5LIB",
    "PERLLIB",
    "PERL5OPT",
    "RUBYLIB",
    "RUBYOPT",
    "NODE_OPTIONS",
    "NODE_PATH",
    "NODE_EXTRA_CA_CERTS",
    "JAVA_TOOL_OPTIONS",
    "JDK_JAVA_OPTIONS",
    "_JAVA_OPTIONS",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
    "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH",
];

/// Whether the environment variable `name` is in [`CODE_LOADING_ENV`].
pub(crate) fn is_code_loading_env(name: &str) -> bool {
    CODE_LOADING_ENV
        .iter()
        .any(|entry| match entry.strip_suffix('*') {
            Some(prefix) => name.starts_with(prefix),
            None => name == *entry,
        })
}

/// Whether the `overridable` entry `key` lets the operator file set `audit.file`.
pub(crate) fn covers_audit_file(key: &str) -> bool {
    key == "audit" || key == "audit.file"
}

/// Whether `key` is something `overridable` may name.
fn is_schema_key(key: &str) -> bool {
    SCHEMA_KEYS.contains(&key)
        || key.strip_prefix("workload.env.").is_some_and(is_env_name)
        || key
            .strip_prefix("network.interface.")
            .is_some_and(is_interface_key)
}

/// Checks the `overridable` list. Returns the problems (one line each, `overridable[i]: …`)
/// and the entries that are usable.
pub(crate) fn check_overridable(list: &[String]) -> (Vec<String>, Vec<String>) {
    let mut problems = Vec::new();
    let mut valid: Vec<String> = Vec::new();
    let mut seen: HashSet<&str> = HashSet::with_capacity(list.len());
    for (i, key) in list.iter().enumerate() {
        let env_name = key.strip_prefix("workload.env.");
        if key == "overridable" || key.starts_with("overridable.") {
            problems.push(format!(
                "overridable[{i}]: {key:?} cannot be overridable; the operator file must not widen what it may set, so remove it"
            ));
        } else if NEVER_OVERRIDABLE.contains(&key.as_str()) {
            problems.push(format!(
                "overridable[{i}]: {key:?} decides what the VM trusts or runs, so only the image builder may set it; remove it (overridable keys for deployment values: attestation.kbs, attestation.tries, attestation.timeout, workload.env.<NAME>, network.outbound, …)"
            ));
        } else if key == "audit.file_dir" {
            problems.push(format!(
                "overridable[{i}]: \"audit.file_dir\" is the directory that confines an overridable audit.file, so only the image builder may set it; remove it"
            ));
        } else if key == "workload.env" {
            problems.push(format!(
                "overridable[{i}]: \"workload.env\" would let the operator file replace the workload's whole environment; list each variable it may set as \"workload.env.<NAME>\" instead"
            ));
        } else if let Some(name) = env_name.filter(|n| is_code_loading_env(n)) {
            problems.push(format!(
                "overridable[{i}]: {key:?}: {name} makes programs load code or trust anchors from where it points, so only the image builder may set it; set it in [workload.env] and remove it from overridable (never overridable: {})",
                CODE_LOADING_ENV.join(", ")
            ));
        } else if !is_schema_key(key) {
            problems.push(format!(
                "overridable[{i}]: {key:?} is not a policy key; write one of {}, workload.env.<NAME>, network.interface.<NAME> or network.interface.<NAME>.<KEY> (KEY: {})",
                SCHEMA_KEYS.join(", "),
                INTERFACE_KEYS.join(", ")
            ));
        } else if !seen.insert(key.as_str()) {
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
/// does not declare overridable. Linear in the size of both files: one pass over the keys'
/// positions, set look-ups for the rest.
fn collect_overrides(
    label: &str,
    text: &str,
    operator: &toml::Table,
    overridable: &[String],
) -> Result<Vec<(String, toml::Value)>, Vec<String>> {
    // The first position of each dotted key (a key may be written more than once, e.g. a
    // table header and a dotted key below it).
    let mut first: HashMap<String, usize> = HashMap::new();
    for (span, path) in diag::key_paths(text).unwrap_or_default() {
        first
            .entry(path)
            .and_modify(|start| *start = (*start).min(span.start))
            .or_insert(span.start);
    }
    let walker = Walker {
        label,
        positions: LineIndex::new(text),
        first,
        overridable: overridable.iter().map(String::as_str).collect(),
    };
    let mut found = Vec::new();
    let mut problems = Vec::new();
    walker.walk("", operator, &mut found, &mut problems);
    if problems.is_empty() {
        Ok(found)
    } else {
        Err(problems)
    }
}

/// Byte offsets of line starts, for line and column look-ups in logarithmic time.
struct LineIndex<'a> {
    text: &'a str,
    starts: Vec<usize>,
}

impl<'a> LineIndex<'a> {
    fn new(text: &'a str) -> Self {
        let mut starts = vec![0];
        starts.extend(text.match_indices('\n').map(|(i, _)| i + 1));
        Self { text, starts }
    }

    /// 1-based line and column (in characters) of a byte offset, as [`diag::line_column`].
    fn line_column(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.text.len());
        let line = self.starts.partition_point(|&s| s <= offset);
        let start = self
            .starts
            .get(line.saturating_sub(1))
            .copied()
            .unwrap_or(0);
        let column = self
            .text
            .get(start..offset)
            .map_or(0, |s| s.chars().count())
            + 1;
        (line, column)
    }
}

struct Walker<'a> {
    label: &'a str,
    positions: LineIndex<'a>,
    first: HashMap<String, usize>,
    overridable: HashSet<&'a str>,
}

impl Walker<'_> {
    fn walk(
        &self,
        prefix: &str,
        table: &toml::Table,
        found: &mut Vec<(String, toml::Value)>,
        problems: &mut Vec<String>,
    ) {
        for (key, value) in table {
            let path = join(prefix, key);
            if self.overridable.contains(path.as_str()) {
                if let Some(inner) = value.as_table() {
                    // `audit` replaced whole still takes its confinement from the policy.
                    if path == "audit" && inner.contains_key("file_dir") {
                        problems.push(format!(
                            "{}: `audit.file_dir`{} cannot be set by the operator file: it confines audit.file, so only the policy sets it; remove it from the operator file",
                            self.label,
                            self.at("audit.file_dir")
                        ));
                        continue;
                    }
                }
                found.push((path, value.clone()));
            } else if let toml::Value::Table(inner) = value {
                self.walk(&path, inner, found, problems);
            } else {
                self.not_overridable(&path, problems);
            }
        }
    }

    /// ` at line L, column C` of the key's first occurrence, or nothing.
    fn at(&self, path: &str) -> String {
        self.first
            .get(path)
            .map(|&start| {
                let (line, column) = self.positions.line_column(start);
                format!(" at line {line}, column {column}")
            })
            .unwrap_or_default()
    }

    fn not_overridable(&self, path: &str, problems: &mut Vec<String>) {
        problems.push(format!(
            "{}: `{path}`{} is not overridable: the policy does not declare it in `overridable`; remove it from the operator file",
            self.label,
            self.at(path)
        ));
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
    // `audit.file_dir` always comes from the policy, also when `audit` is replaced whole.
    let file_dir = policy
        .get("audit")
        .and_then(toml::Value::as_table)
        .and_then(|audit| audit.get("file_dir"))
        .cloned();
    let mut problems = Vec::new();
    let mut keys = Vec::new();
    for (path, value) in overrides {
        let whole_audit = path == "audit";
        match set(policy, &path, value) {
            Ok(()) => keys.push(path),
            Err(parent) => problems.push(format!(
                "{label}: cannot set `{path}`: the policy's `{parent}` is not a table; declare `{parent}` overridable instead so the operator file replaces it whole"
            )),
        }
        if let (true, Some(dir)) = (whole_audit, &file_dir) {
            if let Some(audit) = policy.get_mut("audit").and_then(toml::Value::as_table_mut) {
                audit.insert("file_dir".to_string(), dir.clone());
            }
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

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn line_index_agrees_with_line_column() {
        let text = "a = 1\nbé = \"x\"\n\n[t]\nk = 2";
        let index = LineIndex::new(text);
        for offset in 0..=text.len() + 2 {
            if text.is_char_boundary(offset.min(text.len())) {
                assert_eq!(
                    index.line_column(offset),
                    diag::line_column(text, offset),
                    "{offset}"
                );
            }
        }
    }

    #[test]
    fn code_loading_variables_match_by_name_or_prefix() {
        for name in [
            "LD_PRELOAD",
            "LD_AUDIT",
            "SSL_CERT_FILE",
            "PATH",
            "ENV",
            "NODE_OPTIONS",
        ] {
            assert!(is_code_loading_env(name), "{name}");
        }
        for name in [
            "LD",
            "FL_SERVER",
            "PATHS",
            "ENVIRONMENT",
            "XLD_PRELOAD",
            "SSL_CERT",
        ] {
            assert!(!is_code_loading_env(name), "{name}");
        }
    }
}
