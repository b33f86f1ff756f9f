//! Offline checks of the attestation evidence an audit log carries (`cvm-warden audit
//! verify`).
//!
//! [`EvidenceCheck`] is a [`RecordCheck`]: it sees every record whose hash and chain link
//! verified, in file order, and fails at the first record whose evidence does not hold up:
//!
//! - `attest/attested` (the broker exchange): `exchange.report_data` is recomputed from the
//!   nonce, the ephemeral key and the additional evidence ([`crate::kbs::report_data`]), and
//!   the primary evidence must carry it and verify (per TEE, see [`check_evidence`]);
//! - `attest/ok` with `"attested": true` (the checkpoint): the record at `head_seq` is an
//!   `attest/attested` record of the same run whose hash is `head`; `report_data` is
//!   [`checkpoint_binding`]`(head)`; the checkpoint evidence carries it and verifies; for a
//!   TPM the quote is made by the exchange's AK and its PCR 15 ([`APP_PCR`]) equals the
//!   replay of the exchange record's event log from its `register_initial` (zero when absent).
//!
//! What was verified and every warning (sample evidence proves nothing; a TEE this build
//! cannot check offline; an exchange without a checkpoint) is kept in [`EvidenceFinding`]s.

use std::collections::BTreeMap;
use std::str::FromStr;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde_json::{Map, Value};

use super::record::Record;
use super::verify::RecordCheck;
use crate::digest::Digest;
use crate::eventlog::SimulatedPcr;
use crate::evidence::snp::{verify_report, ChainSource, Product};
use crate::evidence::tpm::{verify_quote, PCR_LEN};
use crate::report::error_chain;
use crate::stage::attest::checkpoint_binding;
use crate::tee::snp::{report_from_evidence, CertTableEntry, CertType};
use crate::tee::tpm::{APP_PCR, PCR_COUNT};

/// The name of this check in verification errors (`evidence check failed: …`).
pub const CHECK_NAME: &str = "evidence";

/// Offset of REPORT_DATA in an SEV-SNP attestation report.
const SNP_REPORT_DATA_OFFSET: usize = 0x50;

/// The outcome of the evidence checks of one record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EvidenceFinding {
    /// The run of the file the record belongs to (1 for the first).
    pub run: usize,
    /// The record's seq.
    pub seq: u64,
    /// `broker exchange` or `checkpoint of seq N`.
    pub what: String,
    /// The TEE the evidence comes from (`tpm`, `snp`, `sample`, …).
    pub tee: String,
    /// What was verified, one item each.
    pub verified: Vec<String>,
    /// What was not or cannot be verified, or proves nothing.
    pub warnings: Vec<String>,
}

/// What the checkpoint check needs from an `attest/attested` record.
#[derive(Debug, Clone)]
struct Exchange {
    hash: Digest,
    tee: String,
    /// The AK of a TPM exchange (SPKI DER).
    ak_public: Option<Vec<u8>>,
    /// The event log digests, in order; `Err` says why they could not be read.
    event_digests: Result<Vec<Digest>, String>,
    /// The register's value before the first event (`register_initial`; zero when the log
    /// does not say, as after a TPM reset).
    register_initial: Digest,
    /// Index of its finding, to warn when no checkpoint follows.
    finding: usize,
    checkpointed: bool,
}

/// Checks the attestation evidence of every `attest` record; see the module doc.
#[derive(Debug, Default)]
pub struct EvidenceCheck {
    run: usize,
    /// Hashes of the current run's records, by seq.
    hashes: BTreeMap<u64, Digest>,
    /// The current run's broker exchanges, by seq.
    exchanges: BTreeMap<u64, Exchange>,
    findings: Vec<EvidenceFinding>,
}

impl EvidenceCheck {
    /// A check that has seen no record yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Every finding so far, in file order ([`EvidenceCheck::finish`] adds the warnings
    /// about exchanges that no checkpoint followed).
    pub fn findings(&self) -> &[EvidenceFinding] {
        &self.findings
    }

    /// Ends the current run: an exchange without a checkpoint gets a warning.
    fn close_run(&mut self) {
        for exchange in self.exchanges.values().filter(|e| !e.checkpointed) {
            if let Some(finding) = self.findings.get_mut(exchange.finding) {
                finding.warnings.push(
                    "no checkpoint follows this exchange in its run: the log is not bound to \
                     the TEE (was the log cut, or did the checkpoint fail?)"
                        .to_string(),
                );
            }
        }
        self.exchanges.clear();
        self.hashes.clear();
    }

    fn exchange(&mut self, record: &Record) -> Result<(), String> {
        let details = &record.details;
        let exchange = object(details.get("exchange"), "details.exchange")?;
        let nonce = string(exchange.get("nonce"), "exchange.nonce")?;
        let tee_pubkey = exchange
            .get("tee_pubkey")
            .ok_or("exchange.tee_pubkey is missing")?;
        let additional = string(
            exchange.get("additional_evidence"),
            "exchange.additional_evidence",
        )?;
        let stated = hex_bytes(exchange.get("report_data"), "exchange.report_data")?;
        let computed = crate::kbs::report_data(nonce, tee_pubkey, additional)
            .map_err(|e| format!("cannot recompute the exchange binding: {e}"))?;
        if stated.as_slice() != computed.as_slice() {
            return Err(format!(
                "exchange.report_data is {}, but SHA-384 of the JCS binding of exchange.nonce, \
                 exchange.tee_pubkey and exchange.additional_evidence is {}: one of them was \
                 changed after the exchange",
                hex::encode(&stated),
                hex::encode(computed)
            ));
        }
        let tee = string(exchange.get("tee"), "exchange.tee")?;
        let evidence = exchange
            .get("evidence")
            .ok_or("exchange.evidence is missing")?;
        let mut result = check_evidence(tee, evidence, &computed)
            .map_err(|e| format!("broker exchange evidence ({tee}): {e}"))?;
        result.verified.insert(
            0,
            "exchange.report_data = SHA-384 of the JCS binding of nonce, tee_pubkey and \
             additional_evidence"
                .to_string(),
        );
        self.findings.push(EvidenceFinding {
            run: self.run,
            seq: record.seq,
            what: "broker exchange".to_string(),
            tee: tee.to_string(),
            verified: result.verified,
            warnings: result.warnings,
        });
        self.exchanges.insert(
            record.seq,
            Exchange {
                hash: record.hash,
                tee: tee.to_string(),
                ak_public: result.tpm.map(|t| t.ak_public),
                event_digests: event_digests(details.get("event_log")),
                register_initial: details
                    .get("register_initial")
                    .and_then(|v| serde_json::from_value(v.clone()).ok())
                    .unwrap_or(Digest::ZERO),
                finding: self.findings.len() - 1,
                checkpointed: false,
            },
        );
        Ok(())
    }

    fn checkpoint(&mut self, record: &Record) -> Result<(), String> {
        let details = &record.details;
        if details.get("attested") != Some(&Value::Bool(true)) {
            return Ok(());
        }
        let checkpoint = object(details.get("checkpoint"), "details.checkpoint")
            .map_err(|e| format!("the attest outcome says attested but {e}"))?;
        let head_seq = checkpoint
            .get("head_seq")
            .and_then(Value::as_u64)
            .ok_or("checkpoint.head_seq is missing or not a number")?;
        let head_text = string(checkpoint.get("head"), "checkpoint.head")?;
        let head = Digest::from_str(head_text)
            .map_err(|_| format!("checkpoint.head {head_text:?} is not a sha256:<hex> digest"))?;
        let Some(actual) = self.hashes.get(&head_seq) else {
            return Err(format!(
                "checkpoint.head_seq is {head_seq}, but no record with that seq precedes it in \
                 this run"
            ));
        };
        if *actual != head {
            return Err(format!(
                "checkpoint.head is {head}, but record seq {head_seq} hashes to {actual}: the \
                 checkpoint does not bind this log"
            ));
        }
        let Some(exchange) = self.exchanges.get(&head_seq).cloned() else {
            return Err(format!(
                "checkpoint.head_seq {head_seq} is not an attest/attested record; a checkpoint \
                 binds the broker exchange record"
            ));
        };
        let binding = checkpoint_binding(&exchange.hash);
        let stated = hex_bytes(checkpoint.get("report_data"), "checkpoint.report_data")?;
        if stated.as_slice() != binding.as_slice() {
            return Err(format!(
                "checkpoint.report_data is {}, but checkpoint_binding(head) is {}",
                hex::encode(&stated),
                hex::encode(binding)
            ));
        }
        let wrapped = object(checkpoint.get("evidence"), "checkpoint.evidence")?;
        let tee = string(wrapped.get("tee"), "checkpoint.evidence.tee")?;
        if tee != exchange.tee {
            return Err(format!(
                "checkpoint evidence is from tee {tee}, but the exchange at seq {head_seq} used \
                 {}",
                exchange.tee
            ));
        }
        let evidence = wrapped
            .get("evidence")
            .ok_or("checkpoint.evidence.evidence is missing")?;
        let mut result = check_evidence(tee, evidence, &binding)
            .map_err(|e| format!("checkpoint evidence ({tee}): {e}"))?;
        result.verified.insert(
            0,
            format!("head = hash of seq {head_seq}; report_data = checkpoint_binding(head)"),
        );
        if let Some(tpm) = &result.tpm {
            if exchange.ak_public.as_deref() != Some(tpm.ak_public.as_slice()) {
                return Err(format!(
                    "checkpoint quote is signed by ak {}, but the exchange at seq {head_seq} by \
                     ak {}",
                    Digest::of(&tpm.ak_public),
                    exchange
                        .ak_public
                        .as_deref()
                        .map(|k| Digest::of(k).to_string())
                        .unwrap_or_else(|| "(none)".to_string())
                ));
            }
            result
                .verified
                .push("the same ak signed the exchange and the checkpoint".to_string());
            let digests = exchange
                .event_digests
                .as_ref()
                .map_err(|e| format!("cannot replay the event log of seq {head_seq}: {e}"))?;
            let replay = digests.iter().fold(exchange.register_initial, |value, d| {
                SimulatedPcr::extended(&value, d)
            });
            let quoted = tpm.pcrs[usize::from(APP_PCR)];
            if quoted != replay.0 {
                return Err(format!(
                    "pcr {APP_PCR} in the checkpoint quote is {}, but replaying the {} event \
                     log digest(s) of seq {head_seq} from {} gives {}: the register and the \
                     event log disagree (an unlogged extend, or a changed event log)",
                    hex::encode(quoted),
                    digests.len(),
                    exchange.register_initial.hex(),
                    replay.hex()
                ));
            }
            result.verified.push(format!(
                "pcr {APP_PCR} = replay of the {} event log digest(s) of seq {head_seq}",
                digests.len()
            ));
        }
        if let Some(e) = self.exchanges.get_mut(&head_seq) {
            e.checkpointed = true;
        }
        self.findings.push(EvidenceFinding {
            run: self.run,
            seq: record.seq,
            what: format!("checkpoint of seq {head_seq}"),
            tee: tee.to_string(),
            verified: result.verified,
            warnings: result.warnings,
        });
        Ok(())
    }
}

impl RecordCheck for EvidenceCheck {
    fn name(&self) -> String {
        CHECK_NAME.to_string()
    }

    fn check(&mut self, record: &Record) -> Result<(), String> {
        if record.seq == 0 && record.prev == Digest::ZERO {
            self.close_run();
            self.run += 1;
        }
        let result = match (record.stage.as_str(), record.event.as_str()) {
            ("attest", "attested") => self.exchange(record),
            ("attest", "ok") => self.checkpoint(record),
            _ => Ok(()),
        };
        self.hashes.insert(record.seq, record.hash);
        result
    }
}

impl EvidenceCheck {
    /// Ends the last run and returns every finding (exchanges without a checkpoint get a
    /// warning). Call after the whole log verified.
    pub fn finish(mut self) -> Vec<EvidenceFinding> {
        self.close_run();
        std::mem::take(&mut self.findings)
    }
}

/// What [`check_evidence`] verified.
#[derive(Debug, Clone, Default)]
pub struct EvidenceResult {
    /// What was verified.
    pub verified: Vec<String>,
    /// What was not verified or proves nothing.
    pub warnings: Vec<String>,
    /// For `tpm`: the AK and the quoted PCR values.
    pub tpm: Option<TpmFacts>,
}

/// The parts of verified `tpm` evidence a checkpoint check needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TpmFacts {
    /// The AK (SubjectPublicKeyInfo DER).
    pub ak_public: Vec<u8>,
    /// SHA-256 PCR values 0..23, verified against the quote's pcrDigest.
    pub pcrs: Vec<[u8; PCR_LEN]>,
}

/// Checks that primary `evidence` of `tee` carries `binding` and verifies offline.
///
/// `binding` is the 48-byte exchange report data or the 64-byte checkpoint binding. A TPM
/// quote's extraData must be its first 32 bytes; `sample` report data its first 48; an
/// SEV-SNP REPORT_DATA all of it, zero-padded to 64 bytes. A TEE this build cannot check
/// offline is a warning, not an error.
pub fn check_evidence(
    tee: &str,
    evidence: &Value,
    binding: &[u8],
) -> Result<EvidenceResult, String> {
    match tee {
        "tpm" => check_tpm(evidence, binding),
        "sample" => check_sample(evidence, binding),
        "snp" => check_snp(evidence, binding),
        other => Ok(EvidenceResult {
            warnings: vec![format!(
                "evidence of tee {other} is not checked offline by this build (neither its \
                 signature nor its report data); only the bindings around it were"
            )],
            ..EvidenceResult::default()
        }),
    }
}

fn check_tpm(evidence: &Value, binding: &[u8]) -> Result<EvidenceResult, String> {
    let ak_public = base64_field(evidence.get("ak_public"), "ak_public")?;
    let quote = object(evidence.get("tpm_quote"), "tpm_quote")?;
    let message = base64_field(quote.get("message"), "tpm_quote.message")?;
    let signature = base64_field(quote.get("signature"), "tpm_quote.signature")?;
    let pcr_texts = quote
        .get("pcrs")
        .and_then(Value::as_array)
        .ok_or("tpm_quote.pcrs is missing or not an array")?;
    if pcr_texts.len() != PCR_COUNT {
        return Err(format!(
            "tpm_quote.pcrs holds {} values, expected {PCR_COUNT} (sha256:0-23)",
            pcr_texts.len()
        ));
    }
    let mut pcrs = Vec::with_capacity(PCR_COUNT);
    for (i, text) in pcr_texts.iter().enumerate() {
        let mut value = [0u8; PCR_LEN];
        text.as_str()
            .and_then(|t| hex::decode_to_slice(t, &mut value).ok())
            .ok_or_else(|| format!("tpm_quote.pcrs[{i}] is not 32 bytes of hex"))?;
        pcrs.push(value);
    }
    let all: Vec<u8> = pcrs.iter().flatten().copied().collect();
    let verified = verify_quote(&message, &signature, &ak_public, Some(&all))
        .map_err(|e| format!("quote does not verify: {}", error_chain(&e)))?;
    let expected = hex::encode(binding.get(..32).ok_or("binding shorter than 32 bytes")?);
    if verified.extra_data != expected {
        return Err(format!(
            "quote extraData is {}, expected {expected} (the first 32 bytes of the report \
             data): the quote was not made for this binding",
            verified.extra_data
        ));
    }
    Ok(EvidenceResult {
        verified: vec![
            format!(
                "quote signature by ak {} (RSASSA SHA-256)",
                Digest::of(&ak_public)
            ),
            "pcrs 0-23 match the quote's pcrDigest".to_string(),
            "quote extraData = first 32 bytes of the report data".to_string(),
        ],
        warnings: vec![format!(
            "whether ak {} belongs to this machine's TPM is not checked offline; compare it \
             with the ak the broker trusts",
            Digest::of(&ak_public)
        )],
        tpm: Some(TpmFacts { ak_public, pcrs }),
    })
}

fn check_sample(evidence: &Value, binding: &[u8]) -> Result<EvidenceResult, String> {
    let carried = base64_field(evidence.get("report_data"), "report_data")?;
    let expected = binding.get(..48).ok_or("binding shorter than 48 bytes")?;
    if carried.as_slice() != expected {
        return Err(format!(
            "sample report_data is {}, expected {} (the first 48 bytes of the report data)",
            hex::encode(&carried),
            hex::encode(expected)
        ));
    }
    Ok(EvidenceResult {
        verified: vec!["sample report_data = first 48 bytes of the report data".to_string()],
        warnings: vec![
            "sample evidence proves nothing: software wrote it, no TEE vouches for it".to_string(),
        ],
        tpm: None,
    })
}

fn check_snp(evidence: &Value, binding: &[u8]) -> Result<EvidenceResult, String> {
    let mut expected = [0u8; 64];
    let n = binding.len().min(64);
    expected[..n].copy_from_slice(&binding[..n]);
    let report = report_from_evidence(evidence).map_err(|e| error_chain(&e))?;
    let carried = report
        .get(SNP_REPORT_DATA_OFFSET..SNP_REPORT_DATA_OFFSET + 64)
        .ok_or("attestation report too short for REPORT_DATA")?;
    if carried != expected.as_slice() {
        return Err(format!(
            "REPORT_DATA is {}, expected {}",
            hex::encode(carried),
            hex::encode(expected)
        ));
    }
    let mut result = EvidenceResult {
        verified: vec![format!(
            "REPORT_DATA = the report data{}",
            if binding.len() < 64 {
                " followed by zero bytes"
            } else {
                ""
            }
        )],
        ..EvidenceResult::default()
    };
    let chain: Vec<CertTableEntry> = match evidence.get("cert_chain") {
        None | Some(Value::Null) => Vec::new(),
        Some(value) => serde_json::from_value(value.clone())
            .map_err(|e| format!("cert_chain is not a certificate table: {e}"))?,
    };
    let find = |kind: &CertType| chain.iter().find(|c| &c.cert_type == kind);
    let Some(vcek) = find(&CertType::Vcek) else {
        result.warnings.push(
            "the report signature is not checked offline: cert_chain carries no VCEK (the \
             broker fetched it)"
                .to_string(),
        );
        return Ok(result);
    };
    let sources: Vec<ChainSource> = match (find(&CertType::Ask), find(&CertType::Ark)) {
        (Some(ask), Some(ark)) => vec![ChainSource::Pem(
            format!("{}{}", pem(&ask.data), pem(&ark.data)).into_bytes(),
        )],
        _ => [Product::Milan, Product::Genoa, Product::Turin]
            .into_iter()
            .map(ChainSource::Builtin)
            .collect(),
    };
    let mut failures = Vec::new();
    for source in sources {
        let name = match &source {
            ChainSource::Builtin(p) => format!("built-in {} chain", p.name()),
            ChainSource::Pem(_) => "ASK and ARK of cert_chain".to_string(),
        };
        match verify_report(&report, &vcek.data, source) {
            Ok(_) => {
                result.verified.push(format!(
                    "report signed by the VCEK of cert_chain, which chains to the {name}"
                ));
                return Ok(result);
            }
            Err(e) => failures.push(format!("{name}: {}", error_chain(&e))),
        }
    }
    Err(format!(
        "the report does not verify with the VCEK of cert_chain ({})",
        failures.join("; ")
    ))
}

/// A DER certificate as PEM.
fn pem(der: &[u8]) -> String {
    let text = STANDARD.encode(der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for chunk in text.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

fn event_digests(log: Option<&Value>) -> Result<Vec<Digest>, String> {
    let events = log
        .and_then(Value::as_array)
        .ok_or("details.event_log is missing or not an array")?;
    events
        .iter()
        .enumerate()
        .map(|(i, event)| {
            event
                .get("digest")
                .and_then(Value::as_str)
                .and_then(|d| Digest::from_str(d).ok())
                .ok_or_else(|| format!("event_log[{i}].digest is not a sha256:<hex> digest"))
        })
        .collect()
}

fn object<'a>(value: Option<&'a Value>, name: &str) -> Result<&'a Map<String, Value>, String> {
    value
        .and_then(Value::as_object)
        .ok_or_else(|| format!("{name} is missing or not an object"))
}

fn string<'a>(value: Option<&'a Value>, name: &str) -> Result<&'a str, String> {
    value
        .and_then(Value::as_str)
        .ok_or_else(|| format!("{name} is missing or not a string"))
}

fn hex_bytes(value: Option<&Value>, name: &str) -> Result<Vec<u8>, String> {
    let text = string(value, name)?;
    hex::decode(text).map_err(|e| format!("{name} is not hex: {e}"))
}

fn base64_field(value: Option<&Value>, name: &str) -> Result<Vec<u8>, String> {
    let text = string(value, name)?;
    STANDARD
        .decode(text)
        .map_err(|e| format!("{name} is not standard base64: {e}"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#[path = "evidence_tests.rs"]
mod tests;
