//! The admin API of a Trustee KBS, as far as a model owner registering one workload uses
//! it: `POST /kbs/v0/reference-value`, `/kbs/v0/attestation-policy`,
//! `/kbs/v0/resource-policy` and `/kbs/v0/resource/<repo>/<type>/<tag>`, each behind an
//! EdDSA (Ed25519) JWT checked against the `[admin]` config (signature, `exp`/`nbf`, and
//! `iss`, `aud`, `role` when configured).
//!
//! Trustee evaluates posted policies with a rego engine; this broker has none. It reads
//! exactly the rego forms a workload owner needs and refuses anything else with
//! `ParsePolicyError` naming the line, so a policy it accepts means what it says here:
//! - resource policy: `package policy`, `import rego.v1`, `default allow := false`, sets of
//!   resource paths (`NAME := {"repo/type/tag", …}`), `allow if { … }` rules (any one
//!   allows) whose lines are among `data["resource-path"] in NAME`,
//!   `data["resource-path"] == "repo/type/tag"`, `count(input.submods) > 0`, `not HELPER`
//!   (HELPER being a rule `some _, submod in input.submods` / `submod["ear.status"] !=
//!   "affirming"`), `input.submods.cpu0["ear.status"] == "affirming"` and
//!   `input.submods.cpu0["ear.trustworthiness-vector"].<claim> == N`, and the general forms
//!   `count(input.submods) OP N`, a bare `input.submods.PATH` (defined and not `false`, e.g.
//!   `input.submods.gpu1`: at least two GPUs) and `input.submods.PATH OP LITERAL`, where PATH
//!   is `.ident` / `["key"]` segments, OP one of `== != >= > <= <` and LITERAL a `"string"`
//!   (no escapes), an integer, `true` or `false`. Ordering two strings holds only when it
//!   holds lexicographically (as rego compares strings) *and*, for two dotted decimal
//!   versions, as dotted numbers: `driver_version >= "550.90"` passes 550.90.07, fails
//!   535.86.09, and also fails 1000.1 (rego says "1000.1" < "550.90"), so a policy this
//!   broker allows is one Trustee allows too;
//! - attestation policy (`default_cpu`): the text is kept and its lines
//!   `input.tpm.pcrNN in query_reference_value("tpm_pcrNN")` say which PCRs beyond PCR 11
//!   the tpm `executables` rule compares, as they do in Trustee's default CPU policy.

use std::collections::{BTreeMap, BTreeSet};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use serde::Deserialize;
use serde_json::Value;

use crate::config::SecretBytes;

/// The `[admin]` section: who may use the admin API.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// The Ed25519 public key (PEM `PUBLIC KEY`) admin tokens are signed with.
    pub public_key: std::path::PathBuf,
    /// The `iss` a token must carry (unchecked when absent).
    #[serde(default)]
    pub issuer: Option<String>,
    /// An `aud` a token must carry (unchecked when absent).
    #[serde(default)]
    pub audience: Option<String>,
    /// The `role` a token must carry to use the admin endpoints (unchecked when absent).
    #[serde(default)]
    pub role: Option<String>,
}

/// The checked `[admin]` section.
#[derive(Debug, Clone)]
pub(crate) struct CompiledAdmin {
    key: [u8; 32],
    issuer: Option<String>,
    audience: Option<String>,
    role: Option<String>,
}

impl AdminConfig {
    pub(crate) fn compile(&self) -> Result<CompiledAdmin, String> {
        let pem = std::fs::read_to_string(&self.public_key)
            .map_err(|e| format!("admin.public_key {}: {e}", self.public_key.display()))?;
        let body: String = pem
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .collect::<Vec<_>>()
            .concat();
        let der = STANDARD.decode(body.trim()).map_err(|_| {
            format!(
                "admin.public_key {}: not a PEM PUBLIC KEY",
                self.public_key.display()
            )
        })?;
        // SPKI of Ed25519: 30 2a 30 05 06 03 2b 65 70 03 21 00 || 32 bytes.
        const PREFIX: [u8; 12] = [
            0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
        ];
        if der.len() != 44 || der[..12] != PREFIX {
            return Err(format!(
                "admin.public_key {}: not an Ed25519 public key (SPKI with OID 1.3.101.112)",
                self.public_key.display()
            ));
        }
        let mut key = [0u8; 32];
        key.copy_from_slice(&der[12..]);
        Ok(CompiledAdmin {
            key,
            issuer: self.issuer.clone(),
            audience: self.audience.clone(),
            role: self.role.clone(),
        })
    }
}

impl CompiledAdmin {
    /// Checks an admin bearer token; `Err` says why (for the request log).
    pub(crate) fn check(&self, token: &str, now: u64) -> Result<(), String> {
        let parts: Vec<&str> = token.split('.').collect();
        let [header, claims, signature] = parts[..] else {
            return Err("the admin token is not a JWS compact serialization".to_string());
        };
        let json = |part: &str, what: &str| -> Result<Value, String> {
            URL_SAFE_NO_PAD
                .decode(part)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
                .ok_or_else(|| format!("the admin token's {what} is not base64url JSON"))
        };
        let header = json(header, "header")?;
        if header["alg"] != "EdDSA" {
            return Err(format!(
                "the admin token's alg is {}, not EdDSA",
                header["alg"]
            ));
        }
        let signature = URL_SAFE_NO_PAD
            .decode(signature)
            .map_err(|_| "the admin token's signature is not base64url".to_string())?;
        let signed = &token[..token.rfind('.').unwrap_or(0)];
        ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, &self.key)
            .verify(signed.as_bytes(), &signature)
            .map_err(|_| "the admin token is not signed by admin.public_key".to_string())?;
        let claims = json(claims, "claims")?;
        match claims["exp"].as_u64() {
            Some(exp) if exp > now => {}
            Some(_) => return Err("the admin token has expired".to_string()),
            None => return Err("the admin token has no exp".to_string()),
        }
        if claims["nbf"].as_u64().is_some_and(|nbf| nbf > now + 60) {
            return Err("the admin token is not valid yet (nbf)".to_string());
        }
        if let Some(issuer) = &self.issuer {
            if claims["iss"].as_str() != Some(issuer) {
                return Err(format!(
                    "the admin token's iss is {}, the config expects {issuer:?}",
                    claims["iss"]
                ));
            }
        }
        if let Some(audience) = &self.audience {
            let ok = match &claims["aud"] {
                Value::String(aud) => aud == audience,
                Value::Array(list) => list.iter().any(|a| a.as_str() == Some(audience)),
                _ => false,
            };
            if !ok {
                return Err(format!(
                    "the admin token's aud {} does not include {audience:?}",
                    claims["aud"]
                ));
            }
        }
        if let Some(role) = &self.role {
            if claims["role"].as_str() != Some(role) {
                return Err(format!(
                    "the admin token's role {} is not {role:?}",
                    claims["role"]
                ));
            }
        }
        Ok(())
    }
}

/// What was registered through the admin API.
#[derive(Debug, Default)]
pub(crate) struct Registered {
    /// `trusted_aks`.
    pub(crate) trusted_aks: BTreeSet<String>,
    /// `tpm_pcrNN` by PCR index.
    pub(crate) pcrs: BTreeMap<u8, Vec<[u8; 32]>>,
    /// Every other reference value, kept as sent (e.g. `snp_launch_measurement`).
    pub(crate) other: BTreeMap<String, Vec<Value>>,
    /// The PCRs a posted `default_cpu` policy compares besides PCR 11; `None`: none posted.
    pub(crate) policy_pcrs: Option<BTreeSet<u8>>,
    /// The posted resource policy.
    pub(crate) resource_policy: Option<ResourcePolicyRego>,
    /// Uploaded resources.
    pub(crate) resources: BTreeMap<String, SecretBytes>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReferenceValueBody {
    version: String,
    #[serde(rename = "type")]
    kind: String,
    payload: String,
}

fn hex32(name: &str, value: &Value) -> Result<[u8; 32], String> {
    let text = value
        .as_str()
        .ok_or_else(|| format!("{name}: {value} is not a hex string"))?;
    let bytes = hex::decode(text).map_err(|_| format!("{name}: {text:?} is not hex"))?;
    bytes
        .try_into()
        .map_err(|_| format!("{name}: {text:?} is not 32 bytes"))
}

impl Registered {
    /// `POST /kbs/v0/reference-value`.
    pub(crate) fn reference_value(&mut self, body: &[u8]) -> Result<Vec<String>, String> {
        let body: ReferenceValueBody = serde_json::from_slice(body)
            .map_err(|e| format!("the body is not {{version, type, payload}}: {e}"))?;
        if body.version != "0.1.0" {
            return Err(format!("version {:?} is not 0.1.0", body.version));
        }
        if body.kind != "sample" {
            return Err(format!(
                "provenance type {:?}: this broker takes the `sample` type only",
                body.kind
            ));
        }
        let payload: BTreeMap<String, Value> = STANDARD
            .decode(&body.payload)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or("payload is not base64 of a JSON object")?;
        let mut names = Vec::new();
        for (name, value) in payload {
            let values = match value {
                Value::Array(list) => list,
                one => vec![one],
            };
            if name == "trusted_aks" {
                let mut aks = BTreeSet::new();
                for ak in &values {
                    let text = ak
                        .as_str()
                        .filter(|t| STANDARD.decode(t).is_ok())
                        .ok_or_else(|| format!("trusted_aks: {ak} is not base64"))?;
                    aks.insert(text.to_string());
                }
                self.trusted_aks = aks;
            } else if let Some(index) = name.strip_prefix("tpm_pcr") {
                let index: u8 = index
                    .parse()
                    .ok()
                    .filter(|i| *i < 24)
                    .ok_or_else(|| format!("{name}: not a PCR (tpm_pcr0 .. tpm_pcr23)"))?;
                let parsed = values
                    .iter()
                    .map(|v| hex32(&name, v))
                    .collect::<Result<Vec<_>, _>>()?;
                self.pcrs.insert(index, parsed);
            } else {
                self.other.insert(name.clone(), values);
            }
            names.push(name);
        }
        Ok(names)
    }

    /// `POST /kbs/v0/attestation-policy`.
    pub(crate) fn attestation_policy(&mut self, body: &[u8]) -> Result<(), String> {
        let body: Value = serde_json::from_slice(body).map_err(|e| e.to_string())?;
        let id = body["policy_id"].as_str().ok_or("no policy_id")?;
        let rego = decode_policy(&body)?;
        if id != "default_cpu" {
            return Err(format!(
                "policy_id {id:?}: this broker applies only default_cpu (the policy Trustee uses for CPU evidence)"
            ));
        }
        if !rego.contains("package policy") {
            return Err("the rego has no `package policy`".to_string());
        }
        let mut pcrs = BTreeSet::new();
        for line in rego.lines().map(str::trim) {
            if let Some(rest) = line.strip_prefix("input.tpm.pcr") {
                let (index, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                let expected = format!("in query_reference_value(\"tpm_pcr{index}\")");
                match index.parse::<u8>() {
                    Ok(i) if i < 24 && tail.trim() == expected => {
                        pcrs.insert(i);
                    }
                    _ => return Err(format!("cannot read the line {line:?}")),
                }
            }
        }
        pcrs.remove(&11);
        self.policy_pcrs = Some(pcrs);
        Ok(())
    }

    /// `POST /kbs/v0/resource-policy`.
    pub(crate) fn resource_policy(&mut self, body: &[u8]) -> Result<(), String> {
        let body: Value = serde_json::from_slice(body).map_err(|e| e.to_string())?;
        let rego = decode_policy(&body)?;
        self.resource_policy = Some(ResourcePolicyRego::parse(&rego)?);
        Ok(())
    }
}

fn decode_policy(body: &Value) -> Result<String, String> {
    let text = body["policy"].as_str().ok_or("no policy string")?;
    let bytes = URL_SAFE_NO_PAD
        .decode(text.trim_end_matches('='))
        .map_err(|_| "policy is not base64url".to_string())?;
    String::from_utf8(bytes).map_err(|_| "policy is not UTF-8".to_string())
}

/// One condition of an `allow` rule.
#[derive(Debug, Clone, PartialEq)]
enum Condition {
    PathIn(String),
    PathIs(String),
    AnySubmods,
    /// `not HELPER`: every submodule affirming (GPU ones left out when the helper says so).
    EverySubmodAffirming(String),
    Cpu0Affirming,
    Cpu0Claim(String, i64),
    /// `input.submods.cpu0["ear.veraison.annotated-evidence"].TEE.CLAIM == "VALUE"`.
    Evidence(String, String, String),
    /// `count(input.submods) OP N`.
    Count(Op, usize),
    /// A bare `input.submods.PATH` line: defined and not `false`.
    Defined(Vec<String>),
    /// `input.submods.PATH OP LITERAL`.
    Compare(Vec<String>, Op, Value),
}

/// A comparison operator of the rego subset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Eq,
    Ne,
    Ge,
    Gt,
    Le,
    Lt,
}

impl Op {
    fn parse(text: &str) -> Option<Op> {
        Some(match text {
            "==" => Op::Eq,
            "!=" => Op::Ne,
            ">=" => Op::Ge,
            ">" => Op::Gt,
            "<=" => Op::Le,
            "<" => Op::Lt,
            _ => return None,
        })
    }

    fn text(self) -> &'static str {
        match self {
            Op::Eq => "==",
            Op::Ne => "!=",
            Op::Ge => ">=",
            Op::Gt => ">",
            Op::Le => "<=",
            Op::Lt => "<",
        }
    }

    fn holds(self, ordering: std::cmp::Ordering) -> bool {
        use std::cmp::Ordering::{Equal, Greater, Less};
        match self {
            Op::Eq => ordering == Equal,
            Op::Ne => ordering != Equal,
            Op::Ge => ordering != Less,
            Op::Gt => ordering == Greater,
            Op::Le => ordering != Greater,
            Op::Lt => ordering == Less,
        }
    }
}

/// `input.submods` followed by `.ident` / `["key"]` segments; `None` if `text` is not that.
fn parse_submods_path(text: &str) -> Option<Vec<String>> {
    let mut rest = text
        .strip_prefix("input.submods")
        .or_else(|| text.strip_prefix("input[\"submods\"]"))?;
    let mut path = Vec::new();
    while !rest.is_empty() {
        if let Some(after) = rest.strip_prefix('.') {
            let end = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(after.len());
            if end == 0 {
                return None;
            }
            path.push(after[..end].to_string());
            rest = &after[end..];
        } else if let Some(after) = rest.strip_prefix("[\"") {
            let end = after.find('"')?;
            let key = &after[..end];
            if key.is_empty() || key.contains('\\') {
                return None;
            }
            path.push(key.to_string());
            rest = after[end..].strip_prefix("\"]")?;
        } else {
            return None;
        }
    }
    if path.is_empty() {
        None
    } else {
        Some(path)
    }
}

/// A literal: `"text"` (no escapes), an integer, `true` or `false`.
fn parse_literal(text: &str) -> Option<Value> {
    if let Some(inner) = text.strip_prefix('"').and_then(|t| t.strip_suffix('"')) {
        if inner.contains('"') || inner.contains('\\') {
            return None;
        }
        return Some(Value::String(inner.to_string()));
    }
    match text {
        "true" => Some(Value::Bool(true)),
        "false" => Some(Value::Bool(false)),
        _ => text.parse::<i64>().ok().map(Value::from),
    }
}

/// The general forms: `count(input.submods) OP N`, a bare `input.submods.PATH`, and
/// `input.submods.PATH OP LITERAL`.
fn general_condition(line: &str) -> Option<Condition> {
    if let Some(rest) = line.strip_prefix("count(input.submods) ") {
        let (op, n) = rest.split_once(' ')?;
        let op = Op::parse(op)?;
        return Some(Condition::Count(op, n.trim().parse().ok()?));
    }
    let parts: Vec<&str> = line.split(' ').collect();
    match parts.as_slice() {
        [path] => parse_submods_path(path).map(Condition::Defined),
        [path, op, literal] => Some(Condition::Compare(
            parse_submods_path(path)?,
            Op::parse(op)?,
            parse_literal(literal)?,
        )),
        _ => None,
    }
}

/// Order `got` against `want` as Trustee's rego would and as this broker documents: numbers
/// numerically; strings lexicographically (rego) *and*, when both are dotted decimal
/// versions, as dotted numbers too — the comparison holds only if both agree.
fn compare(got: &Value, op: Op, want: &Value) -> Result<(), String> {
    let shown = || format!("{got} {} {want}", op.text());
    if matches!(op, Op::Eq | Op::Ne) {
        return if (got == want) == (op == Op::Eq) {
            Ok(())
        } else {
            Err(format!("{} is false", shown()))
        };
    }
    match (got, want) {
        (Value::Number(a), Value::Number(b)) => {
            let (a, b) = (
                a.as_f64().unwrap_or(f64::NAN),
                b.as_f64().unwrap_or(f64::NAN),
            );
            match a.partial_cmp(&b) {
                Some(o) if op.holds(o) => Ok(()),
                _ => Err(format!("{} is false", shown())),
            }
        }
        (Value::String(a), Value::String(b)) => {
            let lexical = op.holds(a.as_str().cmp(b.as_str()));
            match crate::nvidia::compare_dotted(a, b) {
                Some(dotted) if op.holds(dotted) && lexical => Ok(()),
                Some(dotted) if op.holds(dotted) => Err(format!(
                    "{} holds as dotted numbers but not as rego compares strings \
                     (lexicographically), so Trustee would deny it: write versions with \
                     equal-width components",
                    shown()
                )),
                Some(_) => Err(format!("{} is false (dotted numbers)", shown())),
                None if lexical => Ok(()),
                None => Err(format!("{} is false (strings)", shown())),
            }
        }
        _ => Err(format!("{}: cannot order a {got} against {want}", shown())),
    }
}

/// A resource policy in the rego forms this broker reads.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ResourcePolicyRego {
    sets: BTreeMap<String, BTreeSet<String>>,
    rules: Vec<Vec<Condition>>,
    /// Helper rules "some submodule is not affirming", by name: `true` when the helper
    /// leaves out GPU submodules (`not startswith(NAME, "gpu")`).
    helpers: BTreeMap<String, bool>,
}

fn claim_path(expr: &str) -> Option<&str> {
    expr.strip_prefix("input.submods.cpu0")
        .or_else(|| expr.strip_prefix("input[\"submods\"][\"cpu0\"]"))
}

impl ResourcePolicyRego {
    /// Reads `rego`; `Err` names the first line it cannot read.
    pub(crate) fn parse(rego: &str) -> Result<Self, String> {
        let lines: Vec<&str> = rego
            .lines()
            .map(|l| l.split_once('#').map_or(l, |(code, _)| code).trim())
            .filter(|l| !l.is_empty())
            .collect();
        let mut policy = ResourcePolicyRego {
            sets: BTreeMap::new(),
            rules: Vec::new(),
            helpers: BTreeMap::new(),
        };
        let mut pending_not = Vec::new();
        let (mut package, mut default_deny) = (false, false);
        let mut i = 0;
        while i < lines.len() {
            let line = lines[i];
            i += 1;
            match line {
                "package policy" => package = true,
                "import rego.v1" => {}
                "default allow := false" | "default allow = false" => default_deny = true,
                "allow if {" => {
                    let mut rule = Vec::new();
                    loop {
                        let Some(cond) = lines.get(i) else {
                            return Err("an `allow if {` rule is not closed".to_string());
                        };
                        i += 1;
                        if *cond == "}" {
                            break;
                        }
                        if let Some(helper) = cond.strip_prefix("not ") {
                            pending_not.push(helper.to_string());
                            rule.push(Condition::EverySubmodAffirming(helper.to_string()));
                            continue;
                        }
                        rule.push(Self::condition(cond)?);
                    }
                    policy.rules.push(rule);
                }
                _ if line.ends_with(" if {") => {
                    // A helper: exactly "some submod is not affirming", optionally leaving
                    // out GPU submodules (`some name, submod in input.submods` /
                    // `not startswith(name, "gpu")`).
                    let name = line.trim_end_matches(" if {").to_string();
                    let body: Vec<&str> = lines.iter().skip(i).take(4).copied().collect();
                    let some_ok = body.first().is_some_and(|l| {
                        l.starts_with("some ") && l.ends_with(" in input.submods")
                    });
                    let vars = body
                        .first()
                        .and_then(|l| l.strip_prefix("some "))
                        .map(|l| l.trim_end_matches(" in input.submods"))
                        .unwrap_or_default();
                    let (key, var) = vars
                        .split_once(',')
                        .map(|(k, v)| (k.trim(), v.trim()))
                        .unwrap_or(("_", vars.trim()));
                    let check = format!("{var}[\"ear.status\"] != \"affirming\"");
                    let gpu_line = format!("not startswith({key}, \"gpu\")");
                    let (skip_gpu, len) = if key != "_" && body.get(1) == Some(&gpu_line.as_str()) {
                        (true, 4)
                    } else {
                        (false, 3)
                    };
                    let check_at = if skip_gpu { 2 } else { 1 };
                    if !(some_ok
                        && body.get(check_at) == Some(&check.as_str())
                        && body.get(check_at + 1) == Some(&"}"))
                    {
                        return Err(format!(
                            "cannot read the rule {line:?}: the only helper rule read is `NAME if {{ some _, submod in input.submods; submod[\"ear.status\"] != \"affirming\" }}` (optionally `some name, submod in input.submods; not startswith(name, \"gpu\"); …`)"
                        ));
                    }
                    policy.helpers.insert(name, skip_gpu);
                    i += len;
                }
                _ if line.contains(" := {") => {
                    let (name, rest) = line.split_once(" := {").unwrap_or_default();
                    let mut text = rest.to_string();
                    while !text.contains('}') {
                        let Some(next) = lines.get(i) else {
                            return Err(format!("the set {name} is not closed"));
                        };
                        i += 1;
                        text.push_str(next);
                    }
                    let inner = text.split('}').next().unwrap_or_default();
                    let mut set = BTreeSet::new();
                    for item in inner.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                        let path = item
                            .strip_prefix('"')
                            .and_then(|s| s.strip_suffix('"'))
                            .ok_or_else(|| format!("set {name}: {item} is not a string"))?;
                        set.insert(path.to_string());
                    }
                    policy.sets.insert(name.trim().to_string(), set);
                }
                other => return Err(format!("cannot read the line {other:?}")),
            }
        }
        if !package || !default_deny {
            return Err(
                "a resource policy needs `package policy` and `default allow := false`".to_string(),
            );
        }
        for helper in pending_not {
            if !policy.helpers.contains_key(&helper) {
                return Err(format!("`not {helper}`: no such helper rule"));
            }
        }
        for rule in &policy.rules {
            for cond in rule {
                if let Condition::PathIn(set) = cond {
                    if !policy.sets.contains_key(set) {
                        return Err(format!("`in {set}`: no such set"));
                    }
                }
            }
        }
        Ok(policy)
    }

    fn condition(line: &str) -> Result<Condition, String> {
        let path_key = ["data[\"resource-path\"]", "data.resource_path"];
        for key in path_key {
            if let Some(rest) = line.strip_prefix(key) {
                let rest = rest.trim();
                if let Some(set) = rest.strip_prefix("in ") {
                    return Ok(Condition::PathIn(set.trim().to_string()));
                }
                if let Some(value) = rest.strip_prefix("== ") {
                    let value = value.trim().trim_matches('"');
                    return Ok(Condition::PathIs(value.to_string()));
                }
            }
        }
        if line == "count(input.submods) > 0" {
            return Ok(Condition::AnySubmods);
        }
        if let Some(rest) = claim_path(line) {
            if let Some(evidence) = rest.strip_prefix("[\"ear.veraison.annotated-evidence\"].") {
                if let Some((path, value)) = evidence.split_once(" == ") {
                    let value = value.trim();
                    if let (Some((tee, claim)), Some(value)) = (
                        path.split_once('.'),
                        value.strip_prefix('"').and_then(|v| v.strip_suffix('"')),
                    ) {
                        let simple = |t: &str| {
                            !t.is_empty()
                                && t.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                        };
                        if simple(tee) && simple(claim) {
                            return Ok(Condition::Evidence(
                                tee.to_string(),
                                claim.to_string(),
                                value.to_string(),
                            ));
                        }
                    }
                }
            }
            if rest == "[\"ear.status\"] == \"affirming\"" {
                return Ok(Condition::Cpu0Affirming);
            }
            let vector = rest
                .strip_prefix("[\"ear.trustworthiness-vector\"]")
                .and_then(|r| {
                    r.strip_prefix('.')
                        .or_else(|| r.strip_prefix("[\"").map(|r| r.trim_start()))
                });
            if let Some(vector) = vector {
                let (claim, value) = vector.split_once(" == ").unwrap_or_default();
                let claim = claim.trim_end_matches("\"]");
                if let Ok(value) = value.trim().parse::<i64>() {
                    return Ok(Condition::Cpu0Claim(claim.to_string(), value));
                }
            }
        }
        general_condition(line).ok_or_else(|| format!("cannot read the condition {line:?}"))
    }

    /// Whether one condition holds; `Err` says why not.
    fn holds(&self, cond: &Condition, path: &str, claims: &Value) -> Result<(), String> {
        let submods = claims["submods"].as_object();
        let plain = |ok: bool| {
            if ok {
                Ok(())
            } else {
                Err(format!("{cond:?} does not hold"))
            }
        };
        let lookup = |segments: &[String]| -> Option<&Value> {
            segments
                .iter()
                .try_fold(&claims["submods"], |v, key| v.as_object()?.get(key))
        };
        match cond {
            Condition::PathIn(set) => plain(self.sets.get(set).is_some_and(|s| s.contains(path))),
            Condition::PathIs(p) => plain(p == path),
            Condition::AnySubmods => plain(submods.is_some_and(|s| !s.is_empty())),
            Condition::EverySubmodAffirming(helper) => {
                let skip_gpu = self.helpers.get(helper).copied().unwrap_or(false);
                plain(submods.is_some_and(|s| {
                    s.iter()
                        .filter(|(name, _)| !(skip_gpu && name.starts_with("gpu")))
                        .all(|(_, m)| m["ear.status"] == "affirming")
                }))
            }
            Condition::Cpu0Affirming => {
                plain(claims["submods"]["cpu0"]["ear.status"] == "affirming")
            }
            Condition::Evidence(tee, claim, value) => plain(
                claims["submods"]["cpu0"]["ear.veraison.annotated-evidence"][tee.as_str()]
                    [claim.as_str()]
                .as_str()
                    == Some(value.as_str()),
            ),
            Condition::Cpu0Claim(claim, value) => plain(
                claims["submods"]["cpu0"]["ear.trustworthiness-vector"][claim.as_str()].as_i64()
                    == Some(*value),
            ),
            Condition::Count(op, n) => {
                let count = submods.map_or(0, |s| s.len());
                if op.holds(count.cmp(n)) {
                    Ok(())
                } else {
                    Err(format!(
                        "count(input.submods) {} {n} is false: the token has {count} submod(s) \
                         ({})",
                        op.text(),
                        submods
                            .map(|s| s.keys().cloned().collect::<Vec<_>>().join(", "))
                            .unwrap_or_default()
                    ))
                }
            }
            Condition::Defined(segments) => match lookup(segments) {
                None => Err(format!(
                    "input.submods.{} is undefined in the token",
                    segments.join(".")
                )),
                Some(Value::Bool(false)) => {
                    Err(format!("input.submods.{} is false", segments.join(".")))
                }
                Some(_) => Ok(()),
            },
            Condition::Compare(segments, op, want) => match lookup(segments) {
                None => Err(format!(
                    "input.submods.{} is undefined in the token",
                    segments.join(".")
                )),
                Some(got) => compare(got, *op, want)
                    .map_err(|why| format!("input.submods.{}: {why}", segments.join("."))),
            },
        }
    }

    /// Whether a token with `claims` may have `path`; `Err` says which rule failed where.
    pub(crate) fn allows(&self, path: &str, claims: &Value) -> Result<(), String> {
        let mut why = Vec::new();
        for (n, rule) in self.rules.iter().enumerate() {
            match rule
                .iter()
                .find_map(|cond| self.holds(cond, path, claims).err())
            {
                None => return Ok(()),
                Some(reason) => why.push(format!("rule {n}: {reason}")),
            }
        }
        Err(format!(
            "the posted resource policy denies {path}: {}",
            if why.is_empty() {
                "it has no allow rule".to_string()
            } else {
                why.join("; ")
            }
        ))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use serde_json::json;

    const REGO: &str = "package policy\n\nimport rego.v1\n\ndefault allow := false\n\n# the workload\nres := {\n\t\"default/key/volume\",\n\t\"default/secret/tls\",\n}\n\nallow if {\n\tdata[\"resource-path\"] in res\n\tcount(input.submods) > 0\n\tnot bad\n\tinput.submods.cpu0[\"ear.trustworthiness-vector\"].executables == 3\n}\n\nbad if {\n\tsome _, submod in input.submods\n\tsubmod[\"ear.status\"] != \"affirming\"\n}\n";

    fn claims(status: &str, executables: i64) -> Value {
        json!({"submods": {"cpu0": {"ear.status": status, "ear.trustworthiness-vector": {"executables": executables}}}})
    }

    #[test]
    fn the_resource_policy_is_read_and_applied() {
        let policy = ResourcePolicyRego::parse(REGO).unwrap();
        assert!(policy
            .allows("default/key/volume", &claims("affirming", 3))
            .is_ok());
        assert!(policy
            .allows("default/key/other", &claims("affirming", 3))
            .is_err());
        assert!(policy
            .allows("default/key/volume", &claims("warning", 33))
            .is_err());
        assert!(policy
            .allows("default/key/volume", &claims("affirming", 2))
            .is_err());
        let mut gpu = claims("affirming", 3);
        gpu["submods"]["gpu0"] = json!({"ear.status": "warning"});
        assert!(
            policy.allows("default/key/volume", &gpu).is_err(),
            "every submodule"
        );
    }

    #[test]
    fn a_rule_can_bind_resources_to_an_evidence_claim() {
        let rego = REGO.replace(
            "\tnot bad\n",
            "\tnot bad\n\tinput.submods.cpu0[\"ear.veraison.annotated-evidence\"].tpm.pcr15 == \"ab\"\n",
        );
        let policy = ResourcePolicyRego::parse(&rego).unwrap();
        let mut good = claims("affirming", 3);
        good["submods"]["cpu0"]["ear.veraison.annotated-evidence"] =
            json!({"tpm": {"pcr15": "ab"}});
        assert!(policy.allows("default/key/volume", &good).is_ok());
        let mut other = good.clone();
        other["submods"]["cpu0"]["ear.veraison.annotated-evidence"]["tpm"]["pcr15"] = json!("cd");
        assert!(policy.allows("default/key/volume", &other).is_err());
        assert!(policy
            .allows("default/key/volume", &claims("affirming", 3))
            .is_err());
    }

    fn gpu_claims(drivers: &[&str]) -> Value {
        let mut claims = claims("affirming", 3);
        for (n, driver) in drivers.iter().enumerate() {
            claims["submods"][format!("gpu{n}")] = json!({
                "ear.status": "contraindicated",
                "ear.veraison.annotated-evidence": {
                    "nvidia": {"arch": "Hopper", "config": {"driver_version": driver}},
                    "kbs-test-broker": {"cc_attested": true, "root": "nvidia"},
                }
            });
        }
        claims
    }

    const GPU_REGO: &str = "package policy\nimport rego.v1\ndefault allow := false\nallow if {\n\tdata[\"resource-path\"] == \"default/key/model\"\n\tinput.submods.cpu0[\"ear.trustworthiness-vector\"].executables == 3\n\tcount(input.submods) >= 3\n\tinput.submods.gpu1\n\tinput.submods.gpu0[\"ear.veraison.annotated-evidence\"].nvidia.arch == \"Hopper\"\n\tinput.submods.gpu0[\"ear.veraison.annotated-evidence\"].nvidia.config.driver_version >= \"550.90\"\n\tinput.submods.gpu1[\"ear.veraison.annotated-evidence\"].nvidia.config.driver_version >= \"550.90\"\n\tinput.submods.gpu0[\"ear.veraison.annotated-evidence\"][\"kbs-test-broker\"].cc_attested == true\n\tinput.submods.gpu1[\"ear.veraison.annotated-evidence\"][\"kbs-test-broker\"].root != \"x\"\n}\n";

    #[test]
    fn a_policy_can_require_gpu_count_driver_version_and_cc() {
        let policy = ResourcePolicyRego::parse(GPU_REGO).unwrap();
        let path = "default/key/model";
        assert!(policy
            .allows(path, &gpu_claims(&["550.90.07", "580.95.05"]))
            .is_ok());
        // one GPU: the count and gpu1 fail
        let err = policy
            .allows(path, &gpu_claims(&["550.90.07"]))
            .unwrap_err();
        assert!(err.contains("count(input.submods) >= 3 is false"), "{err}");
        // no GPU evidence at all
        assert!(policy.allows(path, &claims("affirming", 3)).is_err());
        // an old driver
        let err = policy
            .allows(path, &gpu_claims(&["550.90.07", "535.86.09"]))
            .unwrap_err();
        assert!(err.contains("535.86.09") && err.contains("dotted"), "{err}");
        // numerically newer but lexicographically older: rego would deny, so the broker does
        let err = policy
            .allows(path, &gpu_claims(&["550.90.07", "1000.1"]))
            .unwrap_err();
        assert!(err.contains("lexicographically"), "{err}");
        // CC not attested (the derived claim false) or missing
        let mut no_cc = gpu_claims(&["550.90.07", "580.95.05"]);
        no_cc["submods"]["gpu0"]["ear.veraison.annotated-evidence"]["kbs-test-broker"]
            ["cc_attested"] = json!(false);
        assert!(policy.allows(path, &no_cc).is_err());
        // another resource
        assert!(policy
            .allows(
                "default/key/other",
                &gpu_claims(&["550.90.07", "580.95.05"])
            )
            .is_err());
    }

    /// Trustee's local NVIDIA verifier never scores a GPU submodule affirming: a helper that
    /// leaves GPU submodules out lets the CPU's verdict and the GPU claims decide.
    #[test]
    fn a_helper_may_leave_gpu_submodules_out_of_every_affirming() {
        let rego = |helper_body: &str| {
            format!("package policy\ndefault allow := false\nallow if {{\n\tdata[\"resource-path\"] == \"default/key/model\"\n\tnot bad\n\tinput.submods.gpu0\n}}\nbad if {{\n{helper_body}\n}}\n")
        };
        let skipping = ResourcePolicyRego::parse(&rego(
            "\tsome name, submod in input.submods\n\tnot startswith(name, \"gpu\")\n\tsubmod[\"ear.status\"] != \"affirming\"",
        ))
        .unwrap();
        let plain = ResourcePolicyRego::parse(&rego(
            "\tsome _, submod in input.submods\n\tsubmod[\"ear.status\"] != \"affirming\"",
        ))
        .unwrap();
        let path = "default/key/model";
        let with_gpu = gpu_claims(&["550.90.07"]);
        assert!(skipping.allows(path, &with_gpu).is_ok());
        assert!(plain.allows(path, &with_gpu).is_err());
        // The CPU still has to affirm, and the GPU has to be there.
        let mut cpu_warning = with_gpu.clone();
        cpu_warning["submods"]["cpu0"]["ear.status"] = json!("warning");
        assert!(skipping.allows(path, &cpu_warning).is_err());
        assert!(skipping.allows(path, &claims("affirming", 3)).is_err());
        // A helper that says something else is refused, not guessed at.
        assert!(ResourcePolicyRego::parse(&rego(
            "\tsome name, submod in input.submods\n\tnot startswith(name, \"cpu\")\n\tsubmod[\"ear.status\"] != \"affirming\""
        ))
        .is_err());
    }

    #[test]
    fn general_forms_parse_only_what_they_say() {
        assert_eq!(
            general_condition("count(input.submods) == 2"),
            Some(Condition::Count(Op::Eq, 2))
        );
        assert_eq!(
            general_condition("input[\"submods\"].gpu0"),
            Some(Condition::Defined(vec!["gpu0".into()]))
        );
        for bad in [
            "count(input.submods) ~ 2",
            "input.submods",
            "input.submods.gpu0 >= 550.90",
            "input.submods.gpu0[\"a\\\"b\"] == 1",
            "input.submods.gpu0.x == \"a b\"",
            "input.other.gpu0 == 1",
            "input.submods.gpu0.x == \"1\" == \"1\"",
        ] {
            assert_eq!(general_condition(bad), None, "{bad}");
        }
    }

    #[test]
    fn rego_it_cannot_read_is_refused_naming_the_line() {
        for (bad, said) in [
            (
                REGO.replace("count(input.submods) > 0", "input.x == 1"),
                "input.x == 1",
            ),
            (
                REGO.replace("default allow := false\n", ""),
                "default allow",
            ),
            (REGO.replace("not bad", "not worse"), "worse"),
            (REGO.replace("in res", "in other"), "other"),
            (
                REGO.replace("submod[\"ear.status\"] != \"affirming\"", "true"),
                "bad if",
            ),
        ] {
            let err = ResourcePolicyRego::parse(&bad).unwrap_err();
            assert!(err.contains(said), "{err}");
        }
    }

    #[test]
    fn reference_values_and_the_attestation_policy_are_registered() {
        let mut reg = Registered::default();
        let payload = STANDARD.encode(json!({"tpm_pcr15": ["ab".repeat(32)]}).to_string());
        let body = json!({"version": "0.1.0", "type": "sample", "payload": payload});
        reg.reference_value(body.to_string().as_bytes()).unwrap();
        assert_eq!(reg.pcrs[&15], vec![[0xab; 32]]);
        let bad = json!({"version": "0.1.0", "type": "sample", "payload": STANDARD.encode(json!({"tpm_pcr15": "ab"}).to_string())});
        assert!(reg
            .reference_value(bad.to_string().as_bytes())
            .unwrap_err()
            .contains("32 bytes"));
        let other = json!({"version": "0.1.0", "type": "in-toto", "payload": payload});
        assert!(reg.reference_value(other.to_string().as_bytes()).is_err());

        let rego = "package policy\nexecutables := 3 if {\n\tinput.tpm\n\tinput.tpm.pcr11 in query_reference_value(\"tpm_pcr11\")\n\tinput.tpm.pcr15 in query_reference_value(\"tpm_pcr15\")\n}\n";
        let body = json!({"policy_id": "default_cpu", "policy": URL_SAFE_NO_PAD.encode(rego)});
        reg.attestation_policy(body.to_string().as_bytes()).unwrap();
        assert_eq!(reg.policy_pcrs, Some(BTreeSet::from([15])));
    }
}
