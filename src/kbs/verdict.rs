//! The broker's verdict as its token states it, in words, for operator messages only.
//!
//! A Trustee broker answers a refused resource with a bare `PolicyDeny` ("Access denied by
//! policy"): *which* check failed is only in the attestation token the client already holds
//! — an EAR JWT whose `submods.<name>` each carry `ear.status` and
//! `ear.trustworthiness-vector`, the AR4SI trust claims the broker's attestation policy set
//! (`executables: 3` = the reference values matched, `33` = one did not). This module reads
//! them from the token's claims **decoded without verifying the signature** (the client holds
//! no trust anchor for the broker's token key), so every text it makes says "unverified
//! token claims" and nothing in cvm-warden decides anything on it: it only explains a refusal
//! the broker already made.
//!
//! The value meanings are those of the AR4SI draft (draft-ietf-rats-ar4si) as the `ear`
//! crate Trustee uses defines them: tiers by value (−1..=1 none, 2..=31 affirming, 32..=95
//! warning, 96..=127 contraindicated; the negative values mirror them) and, per claim, the
//! named values (`executables` 2 approved boot- and run-time, 3 approved boot-time, 32
//! known vulnerabilities, 33 unrecognized run-time, 96 contraindicated run-time;
//! `instance-identity` 2 recognized instance, 96 recognized but not trustworthy, 97 not
//! recognized; …; common: −1 verifier malfunction, 0 no claim, 1 unexpected evidence, 99
//! cryptographic validation failed).

use serde_json::Value;

/// The AR4SI tier of a trust claim value.
pub fn tier(value: i64) -> &'static str {
    match value {
        -1..=1 => "none",
        -32..=31 => "affirming",
        -96..=95 => "warning",
        _ => "contraindicated",
    }
}

/// What one trust claim value means, in words (`claim` is the JSON name, e.g.
/// `executables`). Values the draft does not name are described by their tier.
pub fn claim_words(claim: &str, value: i64) -> String {
    let named = match (claim, value) {
        (_, -1) => Some("verifier malfunction"),
        (_, 0) => Some("no claim"),
        (_, 1) => Some("unexpected evidence"),
        (_, 99) => Some("cryptographic validation failed"),
        ("executables", 2) => Some("approved boot- and run-time"),
        ("executables", 3) => Some("approved boot-time executables: the reference values matched"),
        ("executables", 32) => Some("recognized, but with known vulnerabilities"),
        ("executables", 33) => Some("unrecognized run-time: a reference value did not match"),
        ("executables", 96) => Some("contraindicated run-time"),
        ("instance-identity", 2) => Some("recognized instance"),
        ("instance-identity", 96) => Some("recognized, but not trustworthy"),
        ("instance-identity", 97) => Some("instance not recognized"),
        ("configuration", 2) => Some("approved configuration"),
        ("configuration", 3) => Some("no known vulnerabilities"),
        ("configuration", 32) => Some("known vulnerabilities"),
        ("configuration", 36) => Some("configuration elements unavailable"),
        ("configuration", 96) => Some("unsupportable configuration"),
        ("hardware", 2) => Some("genuine"),
        ("hardware", 32) => Some("genuine, with known vulnerabilities"),
        ("hardware", 96) => Some("genuine, but contraindicated"),
        ("hardware", 97) => Some("hardware not recognized"),
        ("file-system", 2) => Some("approved files"),
        ("file-system", 32) => Some("unrecognized files"),
        ("file-system", 96) => Some("contraindicated files"),
        ("runtime-opaque", 2) => Some("encrypted memory"),
        ("runtime-opaque", 32) => Some("isolated memory"),
        ("runtime-opaque", 96) => Some("memory visible to the host"),
        ("storage-opaque", 2) => Some("secrets encrypted with hardware-backed keys"),
        ("storage-opaque", 32) => Some("secrets encrypted with software keys"),
        ("storage-opaque", 96) => Some("unencrypted secrets"),
        ("sourced-data", 2) => Some("from affirming sources"),
        ("sourced-data", 32) => Some("from unattested or warning sources"),
        ("sourced-data", 96) => Some("from contraindicated sources"),
        _ => None,
    };
    match named {
        Some(words) => words.to_string(),
        None => format!("{} tier", tier(value)),
    }
}

/// The order the trust claims are listed in (the ones an operator acts on first).
const CLAIM_ORDER: [&str; 8] = [
    "executables",
    "instance-identity",
    "hardware",
    "configuration",
    "file-system",
    "runtime-opaque",
    "storage-opaque",
    "sourced-data",
];

/// `executables=33 (unrecognized run-time: …), hardware=2 (genuine), …` for one
/// submodule's `ear.trustworthiness-vector`, claims in [`CLAIM_ORDER`] then any others.
/// Claims at 0 ("no claim") are left out, except `executables` and `instance-identity`,
/// which tell the operator which check failed.
fn vector_words(vector: &serde_json::Map<String, Value>) -> String {
    let shown = |name: &str| {
        matches!(name, "executables" | "instance-identity")
            || vector.get(name).and_then(Value::as_i64) != Some(0)
    };
    let mut names: Vec<&str> = CLAIM_ORDER
        .iter()
        .copied()
        .filter(|n| vector.contains_key(*n) && shown(n))
        .collect();
    let mut others: Vec<&str> = vector
        .keys()
        .map(String::as_str)
        .filter(|k| !CLAIM_ORDER.contains(k) && shown(k))
        .collect();
    others.sort_unstable();
    names.extend(others);
    names
        .iter()
        .map(|name| {
            let shown = crate::report::sanitize(name, 40);
            match vector.get(*name).and_then(Value::as_i64) {
                Some(value) => format!("{shown}={value} ({})", claim_words(name, value)),
                None => format!("{shown}=(not a number)"),
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The words for every submodule of the token's claims (`cpu0`, `gpu0`, …): `cpu0: ear.status
/// = warning, trust vector executables=33 (…), …`; `None` when the claims carry none.
pub fn submods_words(claims: &Value) -> Option<String> {
    let submods = claims.get("submods")?.as_object()?;
    let mut parts = Vec::new();
    for (name, submod) in submods.iter().take(8) {
        let name = crate::report::sanitize(name, 40);
        let status = submod
            .get("ear.status")
            .and_then(Value::as_str)
            .map(|s| crate::report::sanitize(s, 40))
            .unwrap_or_else(|| "(none)".to_string());
        let mut text = format!("{name}: ear.status = {status}");
        match submod
            .get("ear.trustworthiness-vector")
            .and_then(Value::as_object)
        {
            Some(vector) if !vector.is_empty() => {
                text.push_str(", trust vector ");
                text.push_str(&vector_words(vector));
            }
            _ => text.push_str(", no trust vector"),
        }
        parts.push(text);
    }
    (!parts.is_empty()).then(|| parts.join("; "))
}

/// For `tpm` evidence, what the broker's `executables` says about the two things its
/// default policy compares (the PCR reference values and the AK in `trusted_aks`), with the
/// token's PCR 11 and 15 and the AK's fingerprint, so the operator can compare them with the
/// registered reference values.
fn tpm_hint(claims: &Value, evidence: &Value) -> Option<String> {
    let cpu0 = claims.pointer("/submods/cpu0")?;
    let vector = cpu0.get("ear.trustworthiness-vector")?;
    let executables = vector.get("executables").and_then(Value::as_i64)?;
    if tier(executables) == "affirming" || tier(executables) == "none" {
        return None;
    }
    let tpm = cpu0.pointer("/ear.veraison.annotated-evidence/tpm");
    if tpm.is_none() && evidence.get("ak_public").is_none() {
        return None; // not tpm evidence
    }
    let pcr = |name: &str| {
        tpm.and_then(|t| t.get(name))
            .and_then(Value::as_str)
            .map(|v| format!("{name} = {}", crate::report::sanitize(v, 64)))
    };
    let pcrs: Vec<String> = ["pcr11", "pcr15"].iter().filter_map(|n| pcr(n)).collect();
    let ak = evidence
        .get("ak_public")
        .and_then(Value::as_str)
        .and_then(|b64| {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD.decode(b64).ok()
        })
        .map(|der| crate::report::ak_names(&der).0)
        .unwrap_or_else(|| "(not in the evidence)".to_string());
    let identity = vector.get("instance-identity").and_then(Value::as_i64);
    let which = if identity == Some(2) {
        "the AK is recognized (instance-identity 2), so a PCR did not match its reference value (tpm_pcr11, or a PCR the deployment added such as tpm_pcr15)".to_string()
    } else {
        "for tpm evidence the broker's default policy gives this both for a PCR that does not match its reference value (tpm_pcr11, or tpm_pcr15 where the deployment added it) and for an AK that is not in trusted_aks".to_string()
    };
    let mut text = format!("{which}; the AK that signed the quote is {ak}");
    if !pcrs.is_empty() {
        text.push_str(&format!(", the token's {}", pcrs.join(", ")));
    }
    Some(text)
}

/// The sentence an operator message adds about a refusal: `the broker's token (unverified
/// token claims) says cpu0: ear.status = warning, trust vector executables=33 (…), …`, plus
/// the `tpm` hint; empty when the claims say nothing.
pub fn refusal_words(claims: &Value, evidence: &Value) -> String {
    let Some(words) = submods_words(claims) else {
        return String::new();
    };
    let mut text = format!("; the broker's token (unverified token claims) says {words}");
    if let Some(hint) = tpm_hint(claims, evidence) {
        text.push_str("; ");
        text.push_str(&hint);
    }
    text
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn tiers_follow_ar4si() {
        for (value, expected) in [
            (0, "none"),
            (1, "none"),
            (-1, "none"),
            (2, "affirming"),
            (3, "affirming"),
            (31, "affirming"),
            (-32, "affirming"),
            (32, "warning"),
            (33, "warning"),
            (95, "warning"),
            (-33, "warning"),
            (96, "contraindicated"),
            (97, "contraindicated"),
            (-97, "contraindicated"),
        ] {
            assert_eq!(tier(value), expected, "{value}");
        }
        assert_eq!(claim_words("executables", 40), "warning tier");
        assert_eq!(claim_words("instance-identity", 0), "no claim");
        assert_eq!(
            claim_words("executables", 33),
            "unrecognized run-time: a reference value did not match"
        );
    }

    fn claims(vector: Value) -> Value {
        json!({"submods": {"cpu0": {
            "ear.status": "warning",
            "ear.trustworthiness-vector": vector,
            "ear.veraison.annotated-evidence": {"tpm": {"pcr11": "11".repeat(32), "pcr15": "ab".repeat(32)}},
        }}})
    }

    #[test]
    fn a_wrong_pcr_and_an_untrusted_ak_read_differently() {
        let evidence = json!({"ak_public": "MIIBIv8="});
        let (fingerprint, _) = crate::report::ak_names(&[0x30, 0x82, 0x01, 0x22, 0xff]);
        let wrong_pcr = refusal_words(
            &claims(
                json!({"executables": 33, "instance-identity": 2, "hardware": 2, "configuration": 0}),
            ),
            &evidence,
        );
        assert_eq!(
            wrong_pcr,
            format!("; the broker's token (unverified token claims) says cpu0: ear.status = warning, trust vector executables=33 (unrecognized run-time: a reference value did not match), instance-identity=2 (recognized instance), hardware=2 (genuine); the AK is recognized (instance-identity 2), so a PCR did not match its reference value (tpm_pcr11, or a PCR the deployment added such as tpm_pcr15); the AK that signed the quote is {fingerprint}, the token's pcr11 = {}, pcr15 = {}", "11".repeat(32), "ab".repeat(32))
        );
        let untrusted = refusal_words(
            &claims(json!({"executables": 33, "instance-identity": 0, "hardware": 2})),
            &evidence,
        );
        assert!(
            untrusted.contains("instance-identity=0 (no claim)"),
            "{untrusted}"
        );
        assert!(
            untrusted.contains("an AK that is not in trusted_aks"),
            "{untrusted}"
        );
        assert!(untrusted.contains(&fingerprint), "{untrusted}");
        assert_ne!(wrong_pcr, untrusted);
        // Approved executables: no hint, only the vector.
        let good = refusal_words(&claims(json!({"executables": 3})), &evidence);
        assert!(
            good.ends_with(
                "executables=3 (approved boot-time executables: the reference values matched)"
            ),
            "{good}"
        );
        // No submodules: nothing to add.
        assert_eq!(refusal_words(&json!({}), &evidence), "");
    }

    #[test]
    fn every_submodule_and_unknown_claims_are_listed_safely() {
        let words = submods_words(&json!({"submods": {
            "cpu0": {"ear.status": "affirming", "ear.trustworthiness-vector": {"executables": 3}},
            "gpu0": {"ear.status": "warning\u{202e}", "ear.trustworthiness-vector": {"x-\u{1b}[31m": 40, "hardware": "2"}},
        }}))
        .unwrap();
        assert_eq!(
            words,
            "cpu0: ear.status = affirming, trust vector executables=3 (approved boot-time executables: the reference values matched); gpu0: ear.status = warning\\u{202e}, trust vector hardware=(not a number), x-\\u{1b}[31m=40 (warning tier)"
        );
    }
}
