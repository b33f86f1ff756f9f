//! Applying a ruleset: the [`Firewall`] seam (the real [`NftFirewall`] runs `nft` through
//! [`crate::tool`]; the [`RecordingFirewall`] simulates the table), [`apply`] (one
//! transaction, then read back and compared) and [`verify`] (the comparison).

use std::net::IpAddr;

use serde::Serialize;
use serde_json::{json, Value};

use super::model::{Ruleset, TABLE};
use super::plan::Pin;
use super::{FirewallError, Phase};
use crate::digest::Digest;
use crate::tool::{Tool, Tools};

/// Runs nft transactions and lists the table, in one network namespace.
pub trait Firewall {
    /// Runs `document` (an nft JSON document of commands) as one transaction: all of it
    /// takes effect or none does.
    fn transaction(&mut self, document: &str) -> Result<(), FirewallError>;

    /// `nft -j list table inet cvm_warden`: the table as the kernel has it now.
    fn list_table(&mut self) -> Result<String, FirewallError>;
}

/// The real firewall: runs `nft` through the tool runner ([`crate::tool`]: its fixed
/// absolute path, a timeout, a clean environment) in the network namespace it is started in.
#[derive(Debug, Clone, Default)]
pub struct NftFirewall {
    tools: Tools,
}

impl NftFirewall {
    /// `nft` from its fixed paths ([`Tools::system`]), no audit.
    pub fn new() -> Self {
        Self::default()
    }

    /// `nft` as `tools` finds and runs it (the boot passes its audited runner).
    pub fn with_tools(tools: Tools) -> Self {
        Self { tools }
    }

    fn run(&self, args: &[&str], stdin: Option<&str>) -> Result<String, FirewallError> {
        let command = std::iter::once(Tool::Nft.name())
            .chain(args.iter().copied())
            .collect::<Vec<_>>()
            .join(" ");
        let output = self
            .tools
            .run(Tool::Nft, args, stdin.map(str::as_bytes))
            .map_err(|source| FirewallError::NftSpawn {
                command: command.clone(),
                source,
            })?;
        if !output.success() {
            return Err(FirewallError::Nft {
                command,
                status: output.status.to_string(),
                stderr: output.stderr_text(),
            });
        }
        String::from_utf8(output.stdout).map_err(|_| FirewallError::ReadBack {
            detail: format!("{command} printed output that is not UTF-8"),
        })
    }
}

impl Firewall for NftFirewall {
    fn transaction(&mut self, document: &str) -> Result<(), FirewallError> {
        self.run(&["-j", "-f", "-"], Some(document)).map(drop)
    }

    fn list_table(&mut self) -> Result<String, FirewallError> {
        self.run(&["-j", "list", "table", "inet", TABLE], None)
    }
}

/// A firewall that simulates table `inet cvm_warden` for the commands cvm-warden sends (add
/// and delete table, add chain, add rule; atomically, with nft's errors for a missing table
/// or chain) and records every transaction. Tests add objects behind cvm-warden's back with
/// [`RecordingFirewall::inject`] or make the next transaction fail.
#[derive(Debug, Default)]
pub struct RecordingFirewall {
    /// Every transaction document received, in order (failed ones included).
    pub transactions: Vec<String>,
    /// How many times the table was listed.
    pub listings: usize,
    /// When set, the next transaction fails with this nft error text and changes nothing.
    pub fail_next: Option<String>,
    /// When set, this object (e.g. a `{"rule": …}`) is added to the table just before the
    /// next listing, as if someone changed the table between apply and read-back.
    pub inject_before_listing: Option<Value>,
    objects: Vec<Value>,
    next_handle: u64,
}

impl RecordingFirewall {
    /// An empty namespace (no table).
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a list object (`{"rule": {…}}`, `{"chain": {…}}`, …) to the simulated table
    /// directly, the way a hand-run `nft add` would.
    pub fn inject(&mut self, object: Value) {
        let mut object = object;
        self.next_handle += 1;
        if let Some(inner) = object.as_object_mut().and_then(|o| o.values_mut().next()) {
            if let Some(map) = inner.as_object_mut() {
                map.insert("handle".to_string(), json!(self.next_handle));
            }
        }
        self.objects.push(object);
    }

    /// Whether the simulated table exists.
    pub fn has_table(&self) -> bool {
        self.objects.iter().any(|o| o.get("table").is_some())
    }

    fn simulate(&mut self, document: &str) -> Result<(), String> {
        let doc: Value = serde_json::from_str(document).map_err(|e| format!("bad JSON: {e}"))?;
        let commands = doc
            .get("nftables")
            .and_then(Value::as_array)
            .ok_or("no \"nftables\" array")?;
        let mut objects = self.objects.clone();
        let mut handle = self.next_handle;
        let is_ours = |v: &Value, field: &str| {
            v.get("family") == Some(&json!("inet")) && v.get(field) == Some(&json!(TABLE))
        };
        for command in commands {
            let (verb, object) = single(command).ok_or("a command is not a one-key object")?;
            let (kind, body) = single(object).ok_or("an object is not a one-key object")?;
            let mut body = body.clone();
            match (verb, kind) {
                ("add", "table") => {
                    if !is_ours(&body, "name") {
                        return Err(format!("the fake handles only inet {TABLE}"));
                    }
                    if !objects.iter().any(|o| o.get("table").is_some()) {
                        handle += 1;
                        body["handle"] = json!(handle);
                        objects.push(json!({ "table": body }));
                    }
                }
                ("delete", "table") => {
                    if !objects.iter().any(|o| o.get("table").is_some()) {
                        return Err(
                            "Error: Could not process rule: No such file or directory".to_string()
                        );
                    }
                    objects.clear();
                }
                ("add", "chain") | ("add", "rule") => {
                    if !is_ours(&body, "table") || !objects.iter().any(|o| o.get("table").is_some())
                    {
                        return Err(
                            "Error: Could not process rule: No such file or directory".to_string()
                        );
                    }
                    if kind == "rule" {
                        let chain = body.get("chain").cloned();
                        let exists = objects
                            .iter()
                            .any(|o| o.get("chain").and_then(|c| c.get("name")) == chain.as_ref());
                        if !exists {
                            return Err("Error: Could not process rule: No such file or directory"
                                .to_string());
                        }
                    }
                    handle += 1;
                    body["handle"] = json!(handle);
                    objects.push(json!({ kind: body }));
                }
                _ => return Err(format!("the fake does not handle {verb} {kind}")),
            }
        }
        self.objects = objects;
        self.next_handle = handle;
        Ok(())
    }
}

fn single(value: &Value) -> Option<(&str, &Value)> {
    let map = value.as_object()?;
    if map.len() != 1 {
        return None;
    }
    map.iter().next().map(|(k, v)| (k.as_str(), v))
}

impl Firewall for RecordingFirewall {
    fn transaction(&mut self, document: &str) -> Result<(), FirewallError> {
        self.transactions.push(document.to_string());
        if let Some(stderr) = self.fail_next.take() {
            return Err(FirewallError::Nft {
                command: "nft -j -f - (recording fake)".to_string(),
                status: "exit status: 1".to_string(),
                stderr,
            });
        }
        self.simulate(document)
            .map_err(|stderr| FirewallError::Nft {
                command: "nft -j -f - (recording fake)".to_string(),
                status: "exit status: 1".to_string(),
                stderr,
            })
    }

    fn list_table(&mut self) -> Result<String, FirewallError> {
        self.listings += 1;
        if let Some(object) = self.inject_before_listing.take() {
            self.inject(object);
        }
        if !self.has_table() {
            return Err(FirewallError::Nft {
                command: format!("nft -j list table inet {TABLE} (recording fake)"),
                status: "exit status: 1".to_string(),
                stderr: "Error: No such file or directory".to_string(),
            });
        }
        // nft lists the table, then the chains, then each chain's rules.
        let mut listed = vec![json!({"metainfo": {"json_schema_version": 1}})];
        listed.extend(
            self.objects
                .iter()
                .filter(|o| o.get("table").is_some())
                .cloned(),
        );
        let chains: Vec<&Value> = self
            .objects
            .iter()
            .filter(|o| o.get("chain").is_some())
            .collect();
        listed.extend(chains.iter().map(|c| (*c).clone()));
        for chain in &chains {
            let name = chain.get("chain").and_then(|c| c.get("name"));
            listed.extend(
                self.objects
                    .iter()
                    .filter(|o| o.get("rule").and_then(|r| r.get("chain")) == name)
                    .cloned(),
            );
        }
        listed.extend(
            self.objects
                .iter()
                .filter(|o| {
                    o.get("table").is_none() && o.get("chain").is_none() && o.get("rule").is_none()
                })
                .cloned(),
        );
        Ok(json!({ "nftables": listed }).to_string())
    }
}

/// What an apply did, for the audit log and `cvm-warden firewall apply`'s output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Applied {
    /// The phase applied.
    pub phase: Phase,
    /// `inet cvm_warden`.
    pub table: String,
    /// [`Ruleset::digest`] of what was applied (and read back identical).
    pub digest: Digest,
    /// Number of rules.
    pub rules: usize,
    /// Names resolved and the addresses pinned for them.
    pub pins: Vec<Pin>,
    /// Name servers DNS is allowed to (empty: no DNS).
    pub nameservers: Vec<IpAddr>,
}

/// Replaces table `inet cvm_warden` with `ruleset` in one transaction, reads it back and
/// compares ([`verify`]). Any failure is an error: the caller must stop (fail closed).
pub fn apply(ruleset: &Ruleset, firewall: &mut dyn Firewall) -> Result<Applied, FirewallError> {
    firewall.transaction(ruleset.json())?;
    let listing = firewall.list_table()?;
    verify(ruleset, &listing)?;
    Ok(Applied {
        phase: ruleset.phase(),
        table: format!("inet {TABLE}"),
        digest: ruleset.digest(),
        rules: ruleset.rule_count(),
        pins: ruleset.pins().to_vec(),
        nameservers: ruleset.nameservers().to_vec(),
    })
}

/// Makes listed and intended JSON comparable: no handles (top level), anonymous set
/// elements sorted, addresses in one canonical spelling.
fn normalise(value: &mut Value, top: bool) {
    match value {
        Value::Object(map) => {
            if top {
                map.remove("handle");
            }
            for (key, inner) in map.iter_mut() {
                normalise(inner, false);
                if key == "set" {
                    if let Value::Array(items) = inner {
                        items.sort_by_key(|v| v.to_string());
                    }
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|v| normalise(v, false)),
        Value::String(s) => {
            if let Ok(ip) = s.parse::<IpAddr>() {
                *s = ip.to_canonical().to_string();
            }
        }
        _ => {}
    }
}

fn normalised(value: &Value) -> Value {
    let mut out = value.clone();
    if let Value::Object(map) = &mut out {
        for inner in map.values_mut() {
            normalise(inner, true);
        }
    }
    out
}

fn short(value: &Value) -> String {
    let text = value.to_string();
    if text.len() > 600 {
        let cut: String = text.chars().take(600).collect();
        format!("{cut}…")
    } else {
        text
    }
}

/// Compares a `nft -j list table inet cvm_warden` listing with `ruleset`: the same table,
/// the same chains (type, hook, priority, policy) in order, the same rules in each chain in
/// order (expressions and comments; handles ignored, anonymous sets compared as sets) and
/// nothing else (no extra chain, rule, set, map, counter, …). The error names the first
/// difference.
pub fn verify(ruleset: &Ruleset, listing: &str) -> Result<(), FirewallError> {
    let mismatch = |detail: String| FirewallError::Mismatch {
        phase: ruleset.phase(),
        detail,
    };
    let doc: Value = serde_json::from_str(listing).map_err(|e| FirewallError::ReadBack {
        detail: format!("the listing of table inet {TABLE} is not JSON ({e})"),
    })?;
    let listed = doc
        .get("nftables")
        .and_then(Value::as_array)
        .ok_or_else(|| FirewallError::ReadBack {
            detail: format!("the listing of table inet {TABLE} has no \"nftables\" array"),
        })?;

    let expected: Vec<Value> = ruleset.expected_values().iter().map(normalised).collect();
    let kind = |v: &Value| single(v).map(|(k, _)| k.to_string()).unwrap_or_default();
    let of_kind = |list: &[Value], k: &str| -> Vec<Value> {
        list.iter().filter(|v| kind(v) == k).cloned().collect()
    };

    let mut found: Vec<Value> = Vec::new();
    for object in listed {
        match kind(object).as_str() {
            "metainfo" => {}
            "table" | "chain" | "rule" => found.push(normalised(object)),
            other => {
                return Err(mismatch(format!(
                    "the table holds an unexpected {} object: {}",
                    if other.is_empty() { "unknown" } else { other },
                    short(object)
                )))
            }
        }
    }

    let (want_tables, got_tables) = (of_kind(&expected, "table"), of_kind(&found, "table"));
    if want_tables != got_tables {
        return Err(mismatch(format!(
            "table: expected {}, found {}",
            short(&Value::Array(want_tables)),
            short(&Value::Array(got_tables))
        )));
    }

    let (want_chains, got_chains) = (of_kind(&expected, "chain"), of_kind(&found, "chain"));
    for i in 0..want_chains.len().max(got_chains.len()) {
        match (want_chains.get(i), got_chains.get(i)) {
            (Some(want), Some(got)) if want == got => {}
            (Some(want), Some(got)) => {
                return Err(mismatch(format!(
                    "chain {}: expected {}, found {}",
                    i + 1,
                    short(want),
                    short(got)
                )))
            }
            (Some(want), None) => return Err(mismatch(format!("chain missing: {}", short(want)))),
            (None, Some(got)) => return Err(mismatch(format!("unexpected chain: {}", short(got)))),
            (None, None) => {}
        }
    }

    let rules_of = |list: &[Value], chain: &str| -> Vec<Value> {
        of_kind(list, "rule")
            .into_iter()
            .filter(|r| r.get("rule").and_then(|r| r.get("chain")) == Some(&json!(chain)))
            .collect()
    };
    for chain in ruleset.chains() {
        let name = chain.hook.name();
        let want = rules_of(&expected, name);
        let got = rules_of(&found, name);
        for i in 0..want.len().max(got.len()) {
            let text = chain.rules.get(i).map(|r| r.text());
            match (want.get(i), got.get(i), text) {
                (Some(w), Some(g), _) if w == g => {}
                (Some(_), Some(g), Some(text)) => {
                    return Err(mismatch(format!(
                        "chain {name}, rule {}: expected `{text}`, found {}",
                        i + 1,
                        short(g)
                    )))
                }
                (Some(_), None, Some(text)) => {
                    return Err(mismatch(format!(
                        "chain {name}, rule {} is missing: `{text}`",
                        i + 1
                    )))
                }
                (None, Some(g), _) => {
                    return Err(mismatch(format!(
                        "chain {name} has an unexpected rule {}: {}",
                        i + 1,
                        short(g)
                    )))
                }
                _ => return Err(mismatch(format!("chain {name}, rule {} differs", i + 1))),
            }
        }
    }
    Ok(())
}
