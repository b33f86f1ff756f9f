//! Offline checks of the attestation evidence an audit log carries (`cvm-warden audit
//! verify`).
//!
//! [`EvidenceCheck`] is a [`RecordCheck`]: it sees every record whose hash and chain link
//! verified, in file order, and fails at the first record whose evidence does not hold up:
//!
//! - `attest/attested` (the broker exchange): `exchange.report_data` is recomputed from the
//!   nonce, the ephemeral key and the additional evidence ([`crate::binding::report_data`]), and
//!   the primary evidence must carry it and verify (per TEE, see [`check_evidence`]);
//! - `attest/reattested` (a re-attestation while the workload runs): the same binding and
//!   evidence checks, and the evidence comes from the TEE instance and boot of the run's
//!   exchange (as a checkpoint's must);
//! - `attest/ok` with `"attested": true` (the checkpoint): the record at `head_seq` is an
//!   `attest/attested` record of the same run whose hash is `head`; `report_data` is
//!   [`checkpoint_binding`]`(head)`; the checkpoint evidence carries it and verifies, and it
//!   comes from the machine and boot of the exchange:
//!   - TPM: both quotes select exactly sha256:0-23, the checkpoint quote is made by the
//!     exchange's AK in the same boot (equal resetCount and restartCount, clock not behind),
//!     PCRs 0-14 equal the exchange's, and PCR 15 ([`APP_PCR`]) equals the replay of the
//!     exchange record's event log from its `register_initial` (zero when absent; a warning
//!     when not zero);
//!   - SEV-SNP: both guests have debug disabled (policy bit 19), and the checkpoint report's
//!     measurement, chip_id, policy, host_data, reported_tcb, vmpl and report_id equal the
//!     exchange report's (any SNP guest can put any REPORT_DATA in a report);
//!   - TDX: the checkpoint quote's MRTD and RTMR0-3 and the evidence's `cc_eventlog` equal
//!     the exchange's (the quote signature cannot be checked offline: always a warning);
//!   - az-snp-vtpm: both the SEV-SNP rule (on the VCEK-verified report inside the HCL
//!     report) and the TPM rule (on the vTPM quote made by the HCL report's `HCLAkPub`).
//!
//! What was verified and every warning (sample evidence proves nothing; a TDX quote whose
//! signature is not checked offline; a TEE this build cannot check offline; an exchange
//! without a checkpoint) is kept in [`EvidenceFinding`]s.

use std::collections::BTreeMap;
use std::str::FromStr;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde_json::{Map, Value};

use crate::binding::checkpoint_binding;
use crate::chain::RecordCheck;
use crate::digest::Digest;
use crate::error_chain;
use crate::evidence::azure::{parse_hcl_report, AzEvidence, QUOTE_NONCE_LEN};
use crate::evidence::snp::{parse_unverified, verify_report, ChainSource, Product, VerifiedReport};
use crate::evidence::snp_json::{CertTableEntry, CertType};
use crate::evidence::tdx;
use crate::evidence::tpm::{
    verify_quote, PcrSelection, APP_PCR, PCR_COUNT, PCR_LEN, TPM_ALG_SHA256,
};
use crate::record::Record;
use crate::schema::{
    AttestedDetails, CheckpointDetails, ExchangeCheckpoint, SampleEvidence, SnpEvidence,
    TpmEvidence,
};
use crate::tee::Tee;

/// The name of this check in verification errors (`evidence check failed: …`).
pub const CHECK_NAME: &str = "evidence";

/// Offset of REPORT_DATA in an SEV-SNP attestation report.
pub const SNP_REPORT_DATA_OFFSET: usize = 0x50;

/// The DEBUG bit of the SEV-SNP guest policy: the hypervisor may read and write the guest's
/// memory with the debug commands.
const SNP_POLICY_DEBUG: u64 = 1 << 19;

/// Offset of TDATTRIBUTES (8 bytes, little-endian) in a TD report body.
const TD_BODY_ATTRIBUTES_OFFSET: usize = 120;

/// The DEBUG bit of TDATTRIBUTES: the host VMM may read and write the TD's memory.
const TD_ATTRIBUTES_DEBUG: u64 = 1;

/// Offset of MRTD (48 bytes) in a TD report body.
const TD_BODY_MRTD_OFFSET: usize = 136;

/// Offset of RTMR0 in a TD report body; RTMR1-3 follow it.
const TD_BODY_RTMR_OFFSET: usize = 328;

/// Length of MRTD and of each RTMR (SHA-384).
const TD_MEASUREMENT_LEN: usize = 48;

/// Number of RTMRs in a TD report.
const TD_RTMR_COUNT: usize = 4;

/// The outcome of the evidence checks of one record.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
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
#[doc(hidden)] // public for the daemon's writer-reader tests only
pub struct Exchange {
    pub hash: Digest,
    pub tee: String,
    /// The facts of a TPM exchange quote.
    pub tpm: Option<TpmFacts>,
    /// The fields of an SEV-SNP exchange report.
    pub snp: Option<VerifiedReport>,
    /// The measurements of a TDX exchange quote.
    pub tdx: Option<TdxFacts>,
    /// The event log digests, in order; `Err` says why they could not be read.
    pub event_digests: Result<Vec<Digest>, String>,
    /// The register's value before the first event (`register_initial`; zero when the log
    /// does not say, as after a TPM reset).
    pub register_initial: Digest,
    /// Index of its finding, to warn when no checkpoint follows.
    pub finding: usize,
    pub checkpointed: bool,
}

/// What an auditor pins: a log whose evidence or records say otherwise is broken.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pins {
    /// `--expect-policy`: the policy digest of every run (`boot/start` `policy_digest`).
    pub policy: Option<Digest>,
    /// `--expect-bundle`: the bundle digest of every run (`measure/ok` `bundle_digest`).
    pub bundle: Option<Digest>,
    /// `--trusted-ak`: the TPM attestation key the broker trusts (SubjectPublicKeyInfo DER).
    /// Without it a `tpm` quote proves nothing: anyone can make a key and sign a quote.
    pub trusted_ak: Option<Vec<u8>>,
    /// `--snp-measurement`: the SEV-SNP launch measurement (48 bytes).
    pub snp_measurement: Option<Vec<u8>>,
    /// `--tdx-mrtd`: the TD's MRTD (48 bytes).
    pub tdx_mrtd: Option<Vec<u8>>,
    /// `--gpu-root`: a PEM root GPU chains may also end at (tests, demos). A GPU rooted there
    /// leaves its run unproven: it is not NVIDIA's device identity root.
    pub gpu_root: Option<Vec<u8>>,
}

/// How many of a run's unattested records are kept to be named (the newest ones).
pub const TAIL_KEPT: usize = 200;

/// A record no verified checkpoint covers.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TailRecord {
    /// Its seq.
    pub seq: u64,
    /// Its stage.
    pub stage: String,
    /// Its event.
    pub event: String,
}

/// What the evidence of one run proves: which of its records a verified checkpoint of the
/// TEE that answered the broker covers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunEvidence {
    /// The run (1 for the first in the file).
    pub run: usize,
    /// The TEE of the run's broker exchange, if it had one.
    pub tee: Option<String>,
    /// The exchange's evidence is proven (see [`EvidenceResult::proven`]; `tpm`: the AK is
    /// pinned and equal).
    pub proven: bool,
    /// Why the run's evidence proves nothing, when it does not.
    pub unproven: Option<String>,
    /// The highest seq a verified, proven checkpoint of the same TEE instance and boot
    /// covers (every record up to it is attested).
    pub covered_through: Option<u64>,
    /// The newest records (at most [`TAIL_KEPT`]) past `covered_through`, other than
    /// verified checkpoint records.
    pub tail: std::collections::VecDeque<TailRecord>,
    /// How many records past `covered_through` there are in all (`tail` keeps the newest).
    pub tail_count: u64,
}

/// Checks the attestation evidence of every `attest` record; see the module doc.
#[derive(Debug, Default)]
pub struct EvidenceCheck {
    run: usize,
    /// The current run's broker exchanges, by seq.
    exchanges: BTreeMap<u64, Exchange>,
    findings: Vec<EvidenceFinding>,
    pins: Pins,
    current: RunEvidence,
    runs: Vec<RunEvidence>,
    /// The TEE boot of each run's exchange (TPM: AK, resetCount, restartCount; SEV-SNP:
    /// report_id), so a copied run is found.
    identities: BTreeMap<String, usize>,
    /// The exchange's event log and register start, which every later checkpoint's must
    /// extend.
    exchange_events: Vec<crate::schema::Event>,
    exchange_register_initial: Option<Digest>,
}

impl EvidenceCheck {
    /// A check that has seen no record yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// A check that also holds the log to what the auditor pins.
    pub fn with_pins(pins: Pins) -> Self {
        Self {
            pins,
            ..Self::default()
        }
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
        self.exchange_events.clear();
        self.exchange_register_initial = None;
        if self.run > 0 {
            let mut done = std::mem::take(&mut self.current);
            if done.unproven.is_none() && done.covered_through.is_none() {
                done.unproven = Some(if done.tee.is_none() {
                    "no broker exchange: no TEE evidence ties this run to hardware".to_string()
                } else {
                    "no verified checkpoint of the TEE that answered the broker".to_string()
                });
            }
            self.runs.push(done);
        }
    }

    /// Marks every record up to `seq` attested. A checkpoint covers the record just before
    /// it, so every record seen so far (the tail) is covered.
    fn cover(&mut self, seq: u64) {
        let run = &mut self.current;
        if run.covered_through.is_some_and(|c| c >= seq) {
            return;
        }
        run.covered_through = Some(seq);
        run.tail.retain(|r| r.seq > seq);
        run.tail_count = run.tail.len() as u64;
    }

    fn push_tail(&mut self, record: &Record) {
        let run = &mut self.current;
        run.tail_count += 1;
        run.tail.push_back(TailRecord {
            seq: record.seq,
            stage: record.stage.clone(),
            event: record.event.clone(),
        });
        if run.tail.len() > TAIL_KEPT {
            run.tail.pop_front();
        }
    }

    /// Whether checkpoint evidence of the run's exchange TEE counts as proof, and why not.
    fn judge(&self, result: &mut EvidenceResult) -> Result<bool, String> {
        if let (Some(trusted), Some(tpm)) = (&self.pins.trusted_ak, &result.tpm) {
            if &tpm.ak_public != trusted {
                return Err(format!(
                    "the quote is signed by ak {} ({}), not the trusted ak {} given with \
                     --trusted-ak",
                    Digest::of(&tpm.ak_public),
                    STANDARD.encode(&tpm.ak_public),
                    Digest::of(trusted)
                ));
            }
            result.warnings.retain(|w| !w.starts_with("whether ak "));
            result
                .verified
                .push("the ak is the trusted ak given with --trusted-ak".to_string());
            // A pinned AK identifies the TPM (for az-snp-vtpm: the VM's own vTPM AK, which
            // its VCEK-signed report carries).
            return Ok(result.tpm.is_some() && (result.snp.is_none() || result.proven));
        }
        // Hardware that signed is not yet the software that ran: any SEV-SNP guest can sign
        // any report data, so a report proves this boot only with its measurement pinned; an
        // az-snp-vtpm report carries Azure's common paravisor measurement, so it needs the
        // VM's vTPM AK pinned (above).
        match (&result.snp, &result.tpm) {
            (Some(_), None) => Ok(result.proven && self.pins.snp_measurement.is_some()),
            (Some(_), Some(_)) => Ok(false),
            _ => Ok(result.proven),
        }
    }

    /// The auditor's pins on the exchange evidence.
    fn check_evidence_pins(&self, result: &EvidenceResult) -> Result<(), String> {
        if let Some(want) = &self.pins.snp_measurement {
            let Some(snp) = &result.snp else {
                return Err(
                    "--snp-measurement is pinned, but the broker exchange carries no \
                            SEV-SNP report"
                        .to_string(),
                );
            };
            if snp.measurement != hex::encode(want) {
                return Err(format!(
                    "the SEV-SNP measurement is {}, not {} given with --snp-measurement",
                    snp.measurement,
                    hex::encode(want)
                ));
            }
        }
        if let Some(want) = &self.pins.tdx_mrtd {
            let Some(tdx) = &result.tdx else {
                return Err(
                    "--tdx-mrtd is pinned, but the broker exchange carries no TD quote".to_string(),
                );
            };
            if tdx.mrtd.as_slice() != want.as_slice() {
                return Err(format!(
                    "the TD quote's MRTD is {}, not {} given with --tdx-mrtd",
                    hex::encode(tdx.mrtd),
                    hex::encode(want)
                ));
            }
        }
        if self.pins.trusted_ak.is_some() && result.tpm.is_none() {
            return Err(
                "--trusted-ak is pinned, but the broker exchange carries no TPM quote".to_string(),
            );
        }
        Ok(())
    }

    /// The auditor's pins on the records (policy and bundle digests).
    fn check_record_pins(&self, record: &Record) -> Result<(), String> {
        let pinned = match (record.stage.as_str(), record.event.as_str()) {
            ("boot", "start") => self
                .pins
                .policy
                .map(|d| (d, "policy_digest", "--expect-policy")),
            ("measure", "ok") => self
                .pins
                .bundle
                .map(|d| (d, "bundle_digest", "--expect-bundle")),
            _ => None,
        };
        let Some((want, field, flag)) = pinned else {
            return Ok(());
        };
        let found = record.details.get(field).and_then(Value::as_str);
        if found != Some(want.to_string().as_str()) {
            return Err(format!(
                "{}/{} says {field} {}, not {want} given with {flag}",
                record.stage,
                record.event,
                found.unwrap_or("(none)")
            ));
        }
        Ok(())
    }

    /// What each run's evidence proves; call after the whole log verified (after
    /// [`EvidenceCheck::finish_runs`]).
    pub fn runs(&self) -> &[RunEvidence] {
        &self.runs
    }

    fn exchange(&mut self, record: &Record) -> Result<(), String> {
        if let Some(first) = self.exchanges.keys().next() {
            return Err(format!(
                "a second broker exchange in this run (the first is seq {first}): the daemon \
                 records one per boot, so one of them was added"
            ));
        }
        let details: AttestedDetails = typed(&record.details, "attest/attested details")?;
        let exchange = &details.exchange;
        let tee = exchange.tee.as_str();
        let stated = hex::decode(&exchange.report_data)
            .map_err(|e| format!("exchange.report_data is not hex: {e}"))?;
        let computed = crate::binding::report_data(
            &exchange.nonce,
            &exchange.tee_pubkey,
            &exchange.additional_evidence,
        )
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
        let register_initial = details.register_initial.unwrap_or(Digest::ZERO);
        self.exchange_events = details.event_log.clone();
        self.exchange_register_initial = details.register_initial;
        let mut result = check_evidence(tee, &exchange.evidence, &computed)
            .map_err(|e| format!("broker exchange evidence ({tee}): {e}"))?;
        self.check_evidence_pins(&result)?;
        if let Some(identity) = boot_identity(&result) {
            if let Some(run) = self.identities.get(&identity) {
                return Err(format!(
                    "this run's broker exchange comes from the same TEE boot as run {run} \
                     ({identity}): a run was copied or replayed"
                ));
            }
            self.identities.insert(identity, self.run);
        }
        let gpus = check_gpus(exchange, &record.time, &self.pins)?;
        result.verified.extend(gpus.verified);
        result.warnings.extend(gpus.warnings);
        let proven = self.judge(&mut result)?;
        self.current.tee = Some(tee.to_string());
        self.current.proven = proven && gpus.not_nvidia.is_none();
        self.current.unproven = if !proven {
            Some(unproven_reason(tee, &result))
        } else {
            gpus.not_nvidia
        };
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
                tpm: result.tpm,
                snp: result.snp,
                tdx: result.tdx,
                event_digests: Ok(details.event_log.iter().map(|e| e.digest).collect()),
                register_initial,
                finding: self.findings.len() - 1,
                checkpointed: false,
            },
        );
        Ok(())
    }

    /// An `attest/reattested` record (a broker exchange while the workload runs): its
    /// binding is recomputed, its evidence must carry it and verify, and it must come from the
    /// TEE instance and boot of the run's first exchange. It covers nothing by itself (the
    /// `reattest` checkpoint after it does).
    fn reattested(&mut self, record: &Record) -> Result<(), String> {
        let details: AttestedDetails = typed(&record.details, "attest/reattested details")?;
        let exchange = &details.exchange;
        let tee = exchange.tee.as_str();
        let Some((first_seq, first)) = self
            .exchanges
            .iter()
            .next()
            .map(|(seq, e)| (*seq, e.clone()))
        else {
            return Err(
                "a re-attestation with no broker exchange before it in this run: the daemon \
                 re-attests only after the boot's exchange"
                    .to_string(),
            );
        };
        if tee != first.tee {
            return Err(format!(
                "the re-attestation evidence is from tee {tee}, but the run's broker exchange \
                 (seq {first_seq}) used {}",
                first.tee
            ));
        }
        let stated = hex::decode(&exchange.report_data)
            .map_err(|e| format!("exchange.report_data is not hex: {e}"))?;
        let computed = crate::binding::report_data(
            &exchange.nonce,
            &exchange.tee_pubkey,
            &exchange.additional_evidence,
        )
        .map_err(|e| format!("cannot recompute the re-attestation binding: {e}"))?;
        if stated.as_slice() != computed.as_slice() {
            return Err(format!(
                "the re-attestation's exchange.report_data is {}, but SHA-384 of the JCS \
                 binding of its nonce, tee_pubkey and additional_evidence is {}: one of them \
                 was changed after the exchange",
                hex::encode(&stated),
                hex::encode(computed)
            ));
        }
        let mut result = check_evidence(tee, &exchange.evidence, &computed)
            .map_err(|e| format!("re-attestation evidence ({tee}): {e}"))?;
        let mut at_reattest = first;
        at_reattest.event_digests = Ok(details.event_log.iter().map(|e| e.digest).collect());
        same_origin(&at_reattest, first_seq, &mut result)?;
        // The GPUs of a re-attestation are verified like the boot's (their device nonce
        // binds this exchange); one rooted at `--gpu-root` leaves the run unproven.
        let gpus = check_gpus(exchange, &record.time, &self.pins)
            .map_err(|e| format!("re-attestation: {e}"))?;
        result.verified.extend(gpus.verified);
        result.warnings.extend(gpus.warnings);
        if let Some(why) = gpus.not_nvidia {
            self.current.proven = false;
            if self.current.unproven.is_none() {
                self.current.unproven = Some(why);
            }
        }
        result.verified.insert(
            0,
            "exchange.report_data = SHA-384 of the JCS binding of nonce, tee_pubkey and \
             additional_evidence"
                .to_string(),
        );
        self.findings.push(EvidenceFinding {
            run: self.run,
            seq: record.seq,
            what: "re-attestation exchange".to_string(),
            tee: tee.to_string(),
            verified: result.verified,
            warnings: result.warnings,
        });
        Ok(())
    }

    fn checkpoint(&mut self, record: &Record) -> Result<(), String> {
        let details = &record.details;
        if details.get("attested") != Some(&Value::Bool(true)) {
            return Ok(());
        }
        let checkpoint: ExchangeCheckpoint = match details.get("checkpoint") {
            Some(value) => crate::schema::from_value(value, "attest/ok checkpoint")
                .map_err(|e| e.to_string())?,
            None => {
                return Err(
                    "the attest outcome says attested but details.checkpoint is missing"
                        .to_string(),
                )
            }
        };
        let head_seq = checkpoint.head_seq;
        let head = checkpoint.head;
        if record.seq == 0 || head_seq != record.seq - 1 || head != record.prev {
            return Err(format!(
                "checkpoint.head_seq {head_seq} is not an attest/attested record of this run just \
                 before it; a checkpoint binds the broker exchange record (seq {}, hash {})",
                record.seq.saturating_sub(1),
                record.prev
            ));
        }
        // The chain verified before this check, so `prev` is the hash of seq `head_seq`.
        let Some(exchange) = self.exchanges.get(&head_seq).cloned() else {
            return Err(format!(
                "checkpoint.head_seq {head_seq} is not an attest/attested record of this run; \
                 a checkpoint binds the broker exchange record"
            ));
        };
        let binding = checkpoint_binding(&exchange.hash);
        let stated = hex::decode(&checkpoint.report_data)
            .map_err(|e| format!("checkpoint.report_data is not hex: {e}"))?;
        if stated.as_slice() != binding.as_slice() {
            return Err(format!(
                "checkpoint.report_data is {}, but checkpoint_binding(head) is {}",
                hex::encode(&stated),
                hex::encode(binding)
            ));
        }
        let tee = checkpoint.evidence.tee.as_str();
        if tee != exchange.tee {
            return Err(format!(
                "checkpoint evidence is from tee {tee}, but the exchange at seq {head_seq} used \
                 {}",
                exchange.tee
            ));
        }
        let mut result = check_evidence(tee, &checkpoint.evidence.evidence, &binding)
            .map_err(|e| format!("checkpoint evidence ({tee}): {e}"))?;
        result.verified.insert(
            0,
            format!("head = hash of seq {head_seq}; report_data = checkpoint_binding(head)"),
        );
        same_origin(&exchange, head_seq, &mut result)?;
        if let Some(e) = self.exchanges.get_mut(&head_seq) {
            e.checkpointed = true;
        }
        if self.judge(&mut result)? && self.current.proven {
            self.cover(head_seq);
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
        if record.seq == 0 && record.prev == Digest::ZERO {
            self.current.run = self.run;
        }
        self.check_record_pins(record)?;
        let verified_checkpoint = match (record.stage.as_str(), record.event.as_str()) {
            ("attest", "attested") => self.exchange(record).map(|()| false),
            ("attest", "ok") => self.checkpoint(record).map(|()| false),
            ("attest", "reattested") => self.reattested(record).map(|()| false),
            ("audit", "checkpoint") => self.audit_checkpoint(record),
            _ => Ok(false),
        }?;
        if !verified_checkpoint {
            self.push_tail(record);
        }
        Ok(())
    }
}

impl EvidenceCheck {
    /// Ends the last run and returns every finding (exchanges without a checkpoint get a
    /// warning). Call after the whole log verified.
    pub fn finish(mut self) -> Vec<EvidenceFinding> {
        self.close_run();
        std::mem::take(&mut self.findings)
    }

    /// Ends the last run and returns every finding and what each run's evidence proves.
    pub fn finish_runs(mut self) -> (Vec<EvidenceFinding>, Vec<RunEvidence>) {
        self.close_run();
        (
            std::mem::take(&mut self.findings),
            std::mem::take(&mut self.runs),
        )
    }

    /// An `audit/checkpoint` record (launch, periodic, closing): fresh evidence over the
    /// record just before it, from the TEE instance and boot of the run's broker exchange.
    /// Returns whether the checkpoint covered the records before it (only then is the
    /// checkpoint record itself not counted as unattested).
    fn audit_checkpoint(&mut self, record: &Record) -> Result<bool, String> {
        let details: CheckpointDetails = typed(&record.details, "audit/checkpoint details")?;
        let kind = details.kind;
        let head_seq = details.head_seq;
        let head = details.head;
        if record.seq == 0 || head_seq != record.seq - 1 || head != record.prev {
            return Err(format!(
                "a checkpoint covers the record just before it (seq {}, hash {}), but it names \
                 seq {head_seq} with hash {head}",
                record.seq.saturating_sub(1),
                record.prev
            ));
        }
        let binding = checkpoint_binding(&head);
        let stated = hex::decode(&details.report_data)
            .map_err(|e| format!("details.report_data is not hex: {e}"))?;
        if stated.as_slice() != binding.as_slice() {
            return Err(format!(
                "details.report_data is {}, but checkpoint_binding(head) is {}",
                hex::encode(&stated),
                hex::encode(binding)
            ));
        }
        let tee = details.evidence.tee.as_str();
        let evidence = &details.evidence.evidence;
        let mut result = check_evidence(tee, evidence, &binding)
            .map_err(|e| format!("{kind} checkpoint evidence ({tee}): {e}"))?;
        result.verified.insert(
            0,
            format!("head = hash of seq {head_seq}; report_data = checkpoint_binding(head)"),
        );
        let what = format!("{kind} checkpoint of seq {head_seq}");
        let Some(exchange) = self.exchanges.values().next_back().cloned() else {
            result.warnings.push(
                "no broker exchange precedes it in this run: nothing ties this evidence to \
                 the TEE that attested the run, so it covers nothing"
                    .to_string(),
            );
            self.push_finding(record.seq, what, tee, result);
            return Ok(false);
        };
        if tee != exchange.tee {
            return Err(format!(
                "{kind} checkpoint evidence is from tee {tee}, but the run's broker exchange \
                 used {}",
                exchange.tee
            ));
        }
        // The event log up to the checkpoint extends the exchange's (PCR 15 replay).
        if details.event_log.len() < self.exchange_events.len()
            || details.event_log[..self.exchange_events.len()] != self.exchange_events[..]
            || details.register_initial != self.exchange_register_initial
        {
            return Err(format!(
                "the event log of the {kind} checkpoint does not start with the {} event(s) \
                 of the broker exchange from the same register start: measurements were \
                 rewritten",
                self.exchange_events.len()
            ));
        }
        let now: Vec<Digest> = details.event_log.iter().map(|e| e.digest).collect();
        let mut at_checkpoint = exchange.clone();
        if let Ok(first) = &exchange.event_digests {
            if !now.starts_with(first) {
                return Err(format!(
                    "the event log of the {kind} checkpoint does not start with the {} event(s) \
                     of the broker exchange: measurements were rewritten",
                    first.len()
                ));
            }
            at_checkpoint.event_digests = Ok(now);
        }
        same_origin(&at_checkpoint, head_seq, &mut result)?;
        let covered = self.judge(&mut result)? && self.current.proven;
        if covered {
            self.cover(head_seq);
        } else {
            result
                .warnings
                .push("this checkpoint proves nothing by itself: it covers no record".to_string());
        }
        self.push_finding(record.seq, what, tee, result);
        Ok(covered)
    }

    fn push_finding(&mut self, seq: u64, what: String, tee: &str, result: EvidenceResult) {
        self.findings.push(EvidenceFinding {
            run: self.run,
            seq,
            what,
            tee: tee.to_string(),
            verified: result.verified,
            warnings: result.warnings,
        });
    }
}

/// What [`check_evidence`] verified.
#[derive(Debug, Clone, Default)]
pub struct EvidenceResult {
    /// What was verified.
    pub verified: Vec<String>,
    /// What was not verified or proves nothing.
    pub warnings: Vec<String>,
    /// For `tpm` and `az-snp-vtpm`: the AK, the quoted PCR values and the quote's clock.
    pub tpm: Option<TpmFacts>,
    /// For `snp` and `az-snp-vtpm`: the report's fields (`verified` says whether its
    /// signature was checked; always for `az-snp-vtpm`).
    pub snp: Option<VerifiedReport>,
    /// For `tdx`: the quote's MRTD and RTMRs and the evidence's CC event log.
    pub tdx: Option<TdxFacts>,
    /// The evidence's signature chains to a hardware root this verifier trusts by itself
    /// (SEV-SNP and az-snp-vtpm: AMD's ARK). A `tpm` quote is proven only when its AK is the
    /// one the auditor pins (`--trusted-ak`), which [`EvidenceCheck`] decides; `tdx` quote
    /// signatures and `sample` evidence are never proven offline.
    pub proven: bool,
}

/// The parts of `tdx` evidence a checkpoint check needs. The quote's signature is not
/// checked offline: these are what the quote's bytes say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TdxFacts {
    /// MRTD: the measurement of the TD's initial contents (TD report body bytes 136..184).
    pub mrtd: [u8; TD_MEASUREMENT_LEN],
    /// RTMR0-3 (TD report body bytes 328..520).
    pub rtmrs: [[u8; TD_MEASUREMENT_LEN]; TD_RTMR_COUNT],
    /// The evidence's `cc_eventlog` (the ACPI CCEL data), `None` when it is `null`.
    pub cc_eventlog: Option<Vec<u8>>,
}

/// The parts of verified `tpm` evidence a checkpoint check needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TpmFacts {
    /// The AK (SubjectPublicKeyInfo DER).
    pub ak_public: Vec<u8>,
    /// SHA-256 PCR values 0..23, verified against the quote's pcrDigest.
    pub pcrs: Vec<[u8; PCR_LEN]>,
    /// `clockInfo.clock` of the quote (milliseconds the TPM has been powered).
    pub clock: u64,
    /// `clockInfo.resetCount` (TPM resets, i.e. boots).
    pub reset_count: u32,
    /// `clockInfo.restartCount` (TPM restarts and resumes since the last reset).
    pub restart_count: u32,
}

/// Checks that primary `evidence` of `tee` carries `binding` and verifies offline.
///
/// `binding` is the 48-byte exchange report data or the 64-byte checkpoint binding. A TPM
/// quote's extraData must be its first 32 bytes; `sample` report data its first 48; an
/// SEV-SNP REPORT_DATA and a TDX REPORTDATA all of it, zero-padded to 64 bytes; for
/// `az-snp-vtpm` the HCL report's `user-data` all of it zero-padded to 64 bytes and the vTPM
/// quote's extraData its first 48 bytes. A TDX quote's signature is not checked offline (a
/// warning). A TEE this build cannot check offline is a warning, not an error.
pub fn check_evidence(
    tee: &str,
    evidence: &Value,
    binding: &[u8],
) -> Result<EvidenceResult, String> {
    let tee = Tee::from_str(tee).map_err(|e| {
        format!("{e}: cvm-warden writes no evidence of that kind, the record was forged")
    })?;
    match tee {
        Tee::Tpm => check_tpm(evidence, binding),
        Tee::Sample => check_sample(evidence, binding),
        Tee::Snp => check_snp(evidence, binding),
        Tee::Tdx => check_tdx(evidence, binding),
        Tee::AzSnpVtpm => check_az_snp_vtpm(evidence, binding),
    }
}

fn check_tpm(evidence: &Value, binding: &[u8]) -> Result<EvidenceResult, String> {
    let evidence: TpmEvidence =
        crate::schema::from_value(evidence, "tpm evidence").map_err(|e| e.to_string())?;
    let ak_public = evidence.ak_public.0;
    let message = evidence.tpm_quote.message.0;
    let signature = evidence.tpm_quote.signature.0;
    if evidence.tpm_quote.pcrs.len() != PCR_COUNT {
        return Err(format!(
            "tpm_quote.pcrs holds {} values, expected {PCR_COUNT} (sha256:0-23)",
            evidence.tpm_quote.pcrs.len()
        ));
    }
    let pcrs: Vec<[u8; PCR_LEN]> = evidence.tpm_quote.pcrs.iter().map(|p| p.0).collect();
    let facts = verify_pcr_quote(&message, &signature, &ak_public, pcrs, binding, 32)?;
    Ok(EvidenceResult {
        verified: vec![
            format!(
                "quote signature by ak {} (RSASSA SHA-256)",
                ak_label(&ak_public)
            ),
            "the quote selects sha256:0-23 and pcrs 0-23 match its pcrDigest".to_string(),
            "quote extraData = first 32 bytes of the report data".to_string(),
        ],
        warnings: vec![format!(
            "whether ak {} belongs to this machine's TPM is not checked offline; pin the ak \
             the broker trusts with --trusted-ak",
            ak_label(&ak_public)
        )],
        tpm: Some(facts),
        ..EvidenceResult::default()
    })
}

/// Verifies a quote made by `ak_public` over the SHA-256 `pcrs` 0-23: its signature, that it
/// selects exactly sha256:0-23, that the values match its pcrDigest, and that its
/// extraData is the first `extra_len` bytes of `binding`.
#[doc(hidden)] // public for the daemon's writer-reader tests only
pub fn verify_pcr_quote(
    message: &[u8],
    signature: &[u8],
    ak_public: &[u8],
    pcrs: Vec<[u8; PCR_LEN]>,
    binding: &[u8],
    extra_len: usize,
) -> Result<TpmFacts, String> {
    let all: Vec<u8> = pcrs.iter().flatten().copied().collect();
    let verified = verify_quote(message, signature, ak_public, Some(&all))
        .map_err(|e| format!("quote does not verify: {}", error_chain(&e)))?;
    let all_pcrs: Vec<u32> = (0u32..).take(PCR_COUNT).collect();
    match verified.pcr_selection.as_slice() {
        [one] if one.alg == TPM_ALG_SHA256 && one.pcrs == all_pcrs => {}
        other => {
            return Err(format!(
                "quote selects {}, but the protocol requires exactly one selection, \
                 sha256:0-{}: a pcr the quote does not select is not covered by its signature \
                 (pcr {APP_PCR} would be free to claim any value); quote sha256:0-{} only",
                describe_selection(other),
                PCR_COUNT - 1,
                PCR_COUNT - 1
            ))
        }
    }
    let expected = hex::encode(
        binding
            .get(..extra_len)
            .ok_or_else(|| format!("binding shorter than {extra_len} bytes"))?,
    );
    if verified.extra_data != expected {
        return Err(format!(
            "quote extraData is {}, expected {expected} (the first {extra_len} bytes of the \
             report data): the quote was not made for this binding",
            verified.extra_data
        ));
    }
    Ok(TpmFacts {
        ak_public: ak_public.to_vec(),
        pcrs,
        clock: verified.clock,
        reset_count: verified.reset_count,
        restart_count: verified.restart_count,
    })
}

fn check_sample(evidence: &Value, binding: &[u8]) -> Result<EvidenceResult, String> {
    let evidence: SampleEvidence =
        crate::schema::from_value(evidence, "sample evidence").map_err(|e| e.to_string())?;
    let carried = evidence.report_data.0;
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
        ..EvidenceResult::default()
    })
}

fn check_snp(evidence: &Value, binding: &[u8]) -> Result<EvidenceResult, String> {
    let mut expected = [0u8; 64];
    let n = binding.len().min(64);
    expected[..n].copy_from_slice(&binding[..n]);
    let evidence: SnpEvidence =
        crate::schema::from_value(evidence, "snp evidence").map_err(|e| e.to_string())?;
    let report = evidence
        .attestation_report
        .to_report()
        .map_err(|e| error_chain(&e))?;
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
    let fields = parse_unverified(&report)
        .map_err(|e| format!("cannot read the attestation report: {}", error_chain(&e)))?;
    if fields.policy & SNP_POLICY_DEBUG != 0 {
        return Err(format!(
            "guest policy is 0x{:x}: bit 19 (DEBUG) is set, so the hypervisor can read and \
             change the guest's memory and the report proves nothing about what runs in it \
             (measurement {}); launch the guest with debug disabled",
            fields.policy, fields.measurement
        ));
    }
    let mut result = EvidenceResult {
        verified: vec![
            format!(
                "REPORT_DATA = the report data{}",
                if binding.len() < 64 {
                    " followed by zero bytes"
                } else {
                    ""
                }
            ),
            format!(
                "guest policy 0x{:x} has debug (bit 19) disabled",
                fields.policy
            ),
            format!("measurement {}", fields.measurement),
        ],
        ..EvidenceResult::default()
    };
    let chain: Vec<CertTableEntry> = evidence.cert_chain.unwrap_or_default();
    let find = |kind: &CertType| chain.iter().find(|c| &c.cert_type == kind);
    let Some(vcek) = find(&CertType::Vcek) else {
        result.warnings.push(
            "the report signature is not checked offline: cert_chain carries no VCEK (the \
             broker fetched it); the report's fields are unverified"
                .to_string(),
        );
        result.snp = Some(fields);
        return Ok(result);
    };
    // A supplied ARK must be AMD's (verify_report refuses any other), so a self-made
    // ARK/ASK/VCEK in the evidence cannot vouch for a report.
    let sources: Vec<ChainSource> = match (find(&CertType::Ask), find(&CertType::Ark)) {
        (Some(ask), Some(ark)) => vec![ChainSource::Pem(
            format!("{}{}", pem(&ask.data), pem(&ark.data)).into_bytes(),
        )],
        _ => Product::ALL.into_iter().map(ChainSource::Builtin).collect(),
    };
    let mut failures = Vec::new();
    for source in sources {
        let name = match &source {
            ChainSource::Builtin(p) => format!("built-in {} chain", p.name()),
            ChainSource::Pem(_) => "ASK and ARK of cert_chain (the ARK is AMD's)".to_string(),
        };
        match verify_report(&report, &vcek.data, source) {
            Ok(verified) => {
                result.verified.push(format!(
                    "report signed by the VCEK of cert_chain, which chains to the {name}"
                ));
                result.snp = Some(verified);
                result.proven = true;
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

/// Checks that the checkpoint evidence (`result`) comes from the machine, guest and boot of
/// the exchange at `head_seq`, per TEE (see the module documentation), and adds what was
/// verified and the warnings to `result`.
#[doc(hidden)] // public for the daemon's writer-reader tests only
pub fn same_origin(
    exchange: &Exchange,
    head_seq: u64,
    result: &mut EvidenceResult,
) -> Result<(), String> {
    if let Some(snp) = &result.snp {
        let Some(first) = &exchange.snp else {
            return Err(format!(
                "the exchange at seq {head_seq} has no sev-snp report to compare the \
                 checkpoint report with"
            ));
        };
        same_snp_guest(first, snp, head_seq)?;
        result.verified.push(
            "measurement, chip_id, policy, host_data, reported_tcb, vmpl and report_id equal \
             the exchange report's (the same guest)"
                .to_string(),
        );
    }
    if let Some(tpm) = &result.tpm {
        let Some(first) = &exchange.tpm else {
            return Err(format!(
                "the exchange at seq {head_seq} has no tpm quote to compare the checkpoint \
                 quote with"
            ));
        };
        if first.ak_public != tpm.ak_public {
            return Err(format!(
                "checkpoint quote is signed by ak {}, but the exchange at seq {head_seq} by \
                 ak {}",
                Digest::of(&tpm.ak_public),
                Digest::of(&first.ak_public)
            ));
        }
        result
            .verified
            .push("the same ak signed the exchange and the checkpoint".to_string());
        same_boot(first, tpm, head_seq)?;
        result.verified.push(format!(
            "same boot as the exchange quote (resetCount {}, restartCount {}; clock {} ms \
             then {} ms)",
            tpm.reset_count, tpm.restart_count, first.clock, tpm.clock
        ));
        if let Some(index) = (0..usize::from(APP_PCR)).find(|&i| first.pcrs[i] != tpm.pcrs[i]) {
            return Err(format!(
                "pcr {index} in the checkpoint quote is {}, but {} in the exchange quote of \
                 seq {head_seq}: pcrs 0-{} must not change between the exchange and the \
                 checkpoint of one boot (another machine or a changed platform state)",
                hex::encode(tpm.pcrs[index]),
                hex::encode(first.pcrs[index]),
                APP_PCR - 1
            ));
        }
        result
            .verified
            .push(format!("pcrs 0-{} equal the exchange quote's", APP_PCR - 1));
        if exchange.register_initial != Digest::ZERO {
            result.warnings.push(format!(
                "PCR {APP_PCR} did not start at zero (register_initial {}): something \
                 extended it before cvm-warden; the replay starts from the logged value, \
                 which the log itself asserts",
                exchange.register_initial
            ));
        }
        let digests = exchange
            .event_digests
            .as_ref()
            .map_err(|e| format!("cannot replay the event log of seq {head_seq}: {e}"))?;
        let replay = digests.iter().fold(exchange.register_initial, |value, d| {
            crate::pcr::extend(&value, d)
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
    if let Some(tdx) = &result.tdx {
        let Some(first) = &exchange.tdx else {
            return Err(format!(
                "the exchange at seq {head_seq} has no td quote to compare the checkpoint \
                 quote with"
            ));
        };
        same_td(first, tdx, head_seq)?;
        result.verified.push(
            "MRTD, RTMR0-3 and cc_eventlog equal the exchange's (the same TD, no runtime \
             measurement since)"
                .to_string(),
        );
    }
    Ok(())
}

/// The checkpoint quote `later` is from the TD of the exchange quote `first`, with the same
/// runtime measurements (cvm-warden extends no RTMR, so they must not change).
fn same_td(first: &TdxFacts, later: &TdxFacts, head_seq: u64) -> Result<(), String> {
    if first.mrtd != later.mrtd {
        return Err(format!(
            "checkpoint quote MRTD is {}, but the exchange quote of seq {head_seq} has {}: \
             the checkpoint comes from another TD than the one that did the exchange (any TD \
             can put any REPORTDATA in a quote)",
            hex::encode(later.mrtd),
            hex::encode(first.mrtd)
        ));
    }
    if let Some(index) = (0..TD_RTMR_COUNT).find(|&i| first.rtmrs.get(i) != later.rtmrs.get(i)) {
        let show = |facts: &TdxFacts| facts.rtmrs.get(index).map(hex::encode).unwrap_or_default();
        return Err(format!(
            "checkpoint quote RTMR{index} is {}, but the exchange quote of seq {head_seq} has \
             {}: the TD's runtime measurements changed between the exchange and the checkpoint \
             (cvm-warden extends no RTMR), or another TD made the checkpoint",
            show(later),
            show(first)
        ));
    }
    if first.cc_eventlog != later.cc_eventlog {
        let show = |log: &Option<Vec<u8>>| match log {
            None => "null".to_string(),
            Some(bytes) => format!("{} bytes, {}", bytes.len(), Digest::of(bytes)),
        };
        return Err(format!(
            "checkpoint cc_eventlog is {}, but the exchange evidence of seq {head_seq} has {}: \
             the CC event log of one TD does not change, so the checkpoint comes from another \
             TD or its evidence was changed",
            show(&later.cc_eventlog),
            show(&first.cc_eventlog)
        ));
    }
    Ok(())
}

/// `binding` followed by zero bytes up to 64 bytes (a 64-byte binding as it is).
fn pad64(binding: &[u8]) -> Result<[u8; 64], String> {
    let mut out = [0u8; 64];
    out.get_mut(..binding.len())
        .ok_or_else(|| format!("binding of {} bytes is longer than 64", binding.len()))?
        .copy_from_slice(binding);
    Ok(out)
}

/// How [`pad64`] filled the 64 bytes, for the verified items.
fn padding(binding: &[u8]) -> &'static str {
    if binding.len() < 64 {
        " followed by zero bytes"
    } else {
        ""
    }
}

/// `N` bytes at `offset` of the TD report body that starts at `body_start`.
fn td_body_field<const N: usize>(
    quote: &[u8],
    body_start: usize,
    offset: usize,
    name: &str,
) -> Result<[u8; N], String> {
    let at = body_start + offset;
    quote
        .get(at..at + N)
        .and_then(|b| <[u8; N]>::try_from(b).ok())
        .ok_or_else(|| {
            format!(
                "td quote of {} bytes has no {name} at {at}..{}",
                quote.len(),
                at + N
            )
        })
}

fn check_tdx(evidence: &Value, binding: &[u8]) -> Result<EvidenceResult, String> {
    let quote = tdx::quote_from_evidence(evidence).map_err(|e| error_chain(&e))?;
    // quote_from_evidence accepted `cc_eventlog` as null or standard base64.
    let cc_eventlog = match evidence.get("cc_eventlog") {
        Some(Value::String(text)) => Some(
            STANDARD
                .decode(text)
                .map_err(|e| format!("cc_eventlog is not standard base64: {e}"))?,
        ),
        _ => None,
    };
    let expected = pad64(binding)?;
    // The header (version 4 or 5, tee type 0x81, v5 body descriptor, length), as
    // tdx::check_quote checks it; REPORTDATA is compared here for an auditor's message.
    let carried = tdx::quote_report_data(&quote)
        .map_err(|e| format!("the quote is not a td quote: {}", error_chain(&e)))?;
    if carried != expected {
        return Err(format!(
            "REPORTDATA is {}, expected {} (the report data{}): the quote was not made for \
             this binding",
            hex::encode(carried),
            hex::encode(expected),
            padding(binding)
        ));
    }
    let (version, body_start) = match quote.get(..2) {
        Some([4, 0]) => (4, tdx::QUOTE_HEADER_LEN),
        Some([5, 0]) => (5, tdx::QUOTE_HEADER_LEN + 6),
        _ => return Err("td quote version is neither 4 nor 5".to_string()),
    };
    let attributes = u64::from_le_bytes(td_body_field(
        &quote,
        body_start,
        TD_BODY_ATTRIBUTES_OFFSET,
        "TDATTRIBUTES",
    )?);
    let mrtd: [u8; TD_MEASUREMENT_LEN] =
        td_body_field(&quote, body_start, TD_BODY_MRTD_OFFSET, "MRTD")?;
    if attributes & TD_ATTRIBUTES_DEBUG != 0 {
        return Err(format!(
            "TDATTRIBUTES is 0x{attributes:016x}: bit 0 (DEBUG) is set, so the host can read \
             and change the TD's memory and the quote proves nothing about what runs in it \
             (MRTD {}); launch the TD with debug off",
            hex::encode(mrtd)
        ));
    }
    let mut rtmrs = [[0u8; TD_MEASUREMENT_LEN]; TD_RTMR_COUNT];
    for (i, rtmr) in rtmrs.iter_mut().enumerate() {
        *rtmr = td_body_field(
            &quote,
            body_start,
            TD_BODY_RTMR_OFFSET + i * TD_MEASUREMENT_LEN,
            &format!("RTMR{i}"),
        )?;
    }
    Ok(EvidenceResult {
        verified: vec![
            format!(
                "quote header (version {version}, tee type 0x{:x}) and REPORTDATA = the report \
                 data{}",
                tdx::TEE_TYPE_TDX,
                padding(binding)
            ),
            format!("TDATTRIBUTES 0x{attributes:016x} has debug (bit 0) disabled"),
            format!("MRTD {}", hex::encode(mrtd)),
        ],
        warnings: vec![
            "the td quote signature (Intel PCK certificate chain) is not verified offline: \
             its header, REPORTDATA, MRTD and RTMRs are what the quote's bytes say and nothing \
             here vouches for them; verify the quote with Intel's DCAP quote verification, or \
             rely on the broker's verdict at the exchange"
                .to_string(),
        ],
        tdx: Some(TdxFacts {
            mrtd,
            rtmrs,
            cc_eventlog,
        }),
        ..EvidenceResult::default()
    })
}

fn check_az_snp_vtpm(evidence: &Value, binding: &[u8]) -> Result<EvidenceResult, String> {
    let az = AzEvidence::from_json(evidence).map_err(|e| error_chain(&e))?;
    let hcl = parse_hcl_report(&az.hcl_report).map_err(|e| error_chain(&e))?;
    // Only the VCEK-signed SNP report vouches for the variable data (HCLAkPub, user-data)
    // that parse_hcl_report bound to its REPORT_DATA: verify it before trusting them.
    let (report, chain) = verify_az_snp_report(&hcl.snp_report, &az.vcek)?;
    if report.vmpl != 0 {
        return Err(format!(
            "the SNP report in the HCL report was requested at VMPL {}, not 0: Azure's \
             paravisor runs at VMPL 0, so the report is not the paravisor's and its HCLAkPub \
             and user-data vouch for nothing",
            report.vmpl
        ));
    }
    if report.policy & SNP_POLICY_DEBUG != 0 {
        return Err(format!(
            "guest policy is 0x{:x}: bit 19 (DEBUG) is set, so the hypervisor can read and \
             change the guest's memory and the report proves nothing about what runs in it \
             (measurement {}); launch the guest with debug disabled",
            report.policy, report.measurement
        ));
    }
    let expected = pad64(binding)?;
    match hcl.user_data.as_deref() {
        None => {
            return Err(format!(
                "the HCL report (header version {}) has no user-data, so nothing in it binds \
                 the report data {}: the paravisor is too old to carry report data, use an \
                 Azure image whose HCL report has user-data",
                hcl.version,
                hex::encode(binding)
            ))
        }
        Some(found) if found != expected.as_slice() => {
            return Err(format!(
                "HCL report user-data is {}, expected {} (the report data{}): the paravisor's \
                 report was not made for this binding",
                hex::encode(found),
                hex::encode(expected),
                padding(binding)
            ))
        }
        Some(_) => {}
    }
    let facts = verify_pcr_quote(
        &az.quote_message,
        &az.quote_signature,
        &hcl.ak_public,
        az.pcrs,
        binding,
        QUOTE_NONCE_LEN,
    )
    .map_err(|e| {
        format!(
            "vtpm {e} (the ak is the HCL report's HCLAkPub {})",
            Digest::of(&hcl.ak_public)
        )
    })?;
    Ok(EvidenceResult {
        verified: vec![
            format!(
                "SNP report (VMPL 0) of the HCL report signed by the VCEK of the evidence, \
                 which chains to the {chain}"
            ),
            format!(
                "guest policy 0x{:x} has debug (bit 19) disabled",
                report.policy
            ),
            format!("measurement {}", report.measurement),
            "SHA-256 of the HCL report's variable data = REPORT_DATA[..32] (it carries \
             HCLAkPub and user-data)"
                .to_string(),
            format!("HCL user-data = the report data{}", padding(binding)),
            format!(
                "vtpm quote signature by HCLAkPub {} (RSASSA SHA-256)",
                Digest::of(&facts.ak_public)
            ),
            "the quote selects sha256:0-23 and pcrs 0-23 match its pcrDigest".to_string(),
            format!("quote extraData = first {QUOTE_NONCE_LEN} bytes of the report data"),
        ],
        tpm: Some(facts),
        snp: Some(report),
        proven: true,
        ..EvidenceResult::default()
    })
}

/// Verifies the SNP report of an HCL report with `vcek` against AMD's built-in chains
/// (Milan, Genoa, Turin); returns its fields and the name of the chain.
fn verify_az_snp_report(report: &[u8], vcek: &[u8]) -> Result<(VerifiedReport, String), String> {
    let mut failures = Vec::new();
    for product in Product::ALL {
        let name = format!("built-in {} chain", product.name());
        match verify_report(report, vcek, ChainSource::Builtin(product)) {
            Ok(verified) => return Ok((verified, name)),
            Err(e) => failures.push(format!("{name}: {}", error_chain(&e))),
        }
    }
    Err(format!(
        "the SNP report of the HCL report does not verify with the VCEK of the evidence ({}): \
         without that signature neither HCLAkPub nor user-data can be trusted",
        failures.join("; ")
    ))
}

/// `sha256:0-14,16-23 sha1:0-7`, or `no pcrs`.
fn describe_selection(selections: &[PcrSelection]) -> String {
    if selections.is_empty() {
        return "no pcrs".to_string();
    }
    selections
        .iter()
        .map(|sel| {
            let mut ranges: Vec<(u32, u32)> = Vec::new();
            for &pcr in &sel.pcrs {
                match ranges.last_mut() {
                    Some((_, end)) if *end + 1 == pcr => *end = pcr,
                    _ => ranges.push((pcr, pcr)),
                }
            }
            let list: Vec<String> = ranges
                .iter()
                .map(|&(a, b)| {
                    if a == b {
                        a.to_string()
                    } else {
                        format!("{a}-{b}")
                    }
                })
                .collect();
            format!("{}:{}", sel.hash, list.join(","))
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The checkpoint quote `later` is from the boot of the exchange quote `first`.
fn same_boot(first: &TpmFacts, later: &TpmFacts, head_seq: u64) -> Result<(), String> {
    if (first.reset_count, first.restart_count) != (later.reset_count, later.restart_count) {
        return Err(format!(
            "checkpoint quote has resetCount {} and restartCount {}, but the exchange quote of \
             seq {head_seq} has {} and {}: the tpm was reset or restarted between them, so the \
             checkpoint is not from the boot that did the exchange",
            later.reset_count, later.restart_count, first.reset_count, first.restart_count
        ));
    }
    if later.clock < first.clock {
        return Err(format!(
            "checkpoint quote clock is {} ms, behind the exchange quote of seq {head_seq} \
             ({} ms): the checkpoint quote was not made after the exchange in the same boot",
            later.clock, first.clock
        ));
    }
    Ok(())
}

/// The checkpoint report `later` is from the guest of the exchange report `first`.
fn same_snp_guest(
    first: &VerifiedReport,
    later: &VerifiedReport,
    head_seq: u64,
) -> Result<(), String> {
    let fields = [
        (
            "measurement",
            first.measurement.clone(),
            later.measurement.clone(),
        ),
        ("chip_id", first.chip_id.clone(), later.chip_id.clone()),
        (
            "policy",
            format!("0x{:x}", first.policy),
            format!("0x{:x}", later.policy),
        ),
        (
            "host_data",
            first.host_data.clone(),
            later.host_data.clone(),
        ),
        (
            "reported_tcb",
            first.reported_tcb.to_string(),
            later.reported_tcb.to_string(),
        ),
        ("vmpl", first.vmpl.to_string(), later.vmpl.to_string()),
        (
            "report_id",
            first.report_id.clone(),
            later.report_id.clone(),
        ),
    ];
    let mismatch = fields.iter().find(|(_, a, b)| a != b);
    if let Some((name, a, b)) = mismatch {
        return Err(format!(
            "checkpoint report {name} is {b}, but the exchange report of seq {head_seq} has \
             {a}: the checkpoint comes from another guest than the one that did the exchange \
             (any sev-snp guest can put any REPORT_DATA in a report)"
        ));
    }
    Ok(())
}

/// What the GPU evidence of an exchange adds.
#[derive(Debug, Default)]
struct GpuFindings {
    verified: Vec<String>,
    warnings: Vec<String>,
    /// Why a GPU proves nothing (rooted at `--gpu-root`, not NVIDIA's root).
    not_nvidia: Option<String>,
}

/// Decodes a device evidence field as Trustee does: hex first, then base64 (standard).
fn hex_or_base64(text: &str) -> Option<Vec<u8>> {
    hex::decode(text)
        .ok()
        .or_else(|| STANDARD.decode(text).ok())
}

/// Verifies the GPU evidence of an exchange's `additional_evidence` (when not empty): each
/// device's report and chain up to NVIDIA's device identity root (or the `--gpu-root` pin),
/// FWID, and the nonce [`crate::binding::device_nonce`] of the exchange's nonce and key.
/// Certificates are checked at the record's time.
fn check_gpus(
    exchange: &crate::schema::Exchange,
    time: &str,
    pins: &Pins,
) -> Result<GpuFindings, String> {
    use crate::evidence::nvidia::{self, Arch, RootKind};
    let mut out = GpuFindings::default();
    if exchange.additional_evidence.is_empty() {
        return Ok(out);
    }
    let additional: crate::schema::AdditionalEvidence =
        serde_json::from_str(&exchange.additional_evidence).map_err(|e| {
            format!(
                "exchange.additional_evidence is not {{\"nvidia\": {{\"device_evidence_list\": \
                 [...]}}}}: {e}"
            )
        })?;
    let nonce = crate::binding::device_nonce(&exchange.nonce, &exchange.tee_pubkey)
        .map_err(|e| format!("cannot compute the GPU nonce of the exchange: {e}"))?;
    let at = humantime::parse_rfc3339_weak(time)
        .map_err(|e| format!("the record's time {time:?} is not RFC 3339: {e}"))?;
    let roots = match &pins.gpu_root {
        Some(pem) => nvidia::Roots::with_extra(pem),
        None => nvidia::Roots::nvidia(),
    }
    .map_err(|e| e.to_string())?;
    let options = nvidia::VerifyOptions {
        roots,
        at,
        allow_missing_fwid: false,
        rims: Vec::new(),
    };
    for (index, device) in additional.nvidia.device_evidence_list.iter().enumerate() {
        let name = format!(
            "GPU {index} ({}, uuid {})",
            crate::text::sanitize(&device.arch, 40),
            crate::text::sanitize(&device.uuid, 80)
        );
        let report = hex_or_base64(&device.evidence)
            .ok_or_else(|| format!("{name}: its evidence is neither hex nor base64"))?;
        let chain = STANDARD
            .decode(&device.certificate)
            .map_err(|e| format!("{name}: its certificate is not base64: {e}"))?;
        let verified = nvidia::verify(&report, &chain, &nonce, &options)
            .map_err(|e| format!("{name}: {e}"))?;
        if Arch::parse(&device.arch) != Some(verified.claims.arch) {
            return Err(format!(
                "{name}: the evidence says arch {}, but its certificate is a {} GPU's",
                crate::text::sanitize(&device.arch, 40),
                verified.claims.arch
            ));
        }
        let config = &verified.claims.config;
        let root = match &verified.root {
            RootKind::Nvidia => "NVIDIA's device identity root (pinned)".to_string(),
            RootKind::Other { sha256 } => {
                out.not_nvidia.get_or_insert_with(|| {
                    format!(
                        "{name} is rooted at the root given with --gpu-root (SHA-256 {sha256}), \
                         not NVIDIA's device identity root: it proves nothing about a real GPU"
                    )
                });
                format!("the --gpu-root root (SHA-256 {sha256}), NOT NVIDIA's")
            }
        };
        out.verified.push(format!(
            "{name}: report signed by \"{}\", chain to {root}, FWID equal, nonce = the \
             exchange's device binding; driver {}, VBIOS {}, measurements digest {}",
            verified.leaf_subject,
            config.driver_version.as_deref().unwrap_or("unknown"),
            config.vbios_version.as_deref().unwrap_or("unknown"),
            verified.claims.measurements_digest
        ));
        for warning in verified.warnings {
            let warning = format!("GPU evidence: {warning}");
            if !out.warnings.contains(&warning) {
                out.warnings.push(warning);
            }
        }
    }
    Ok(out)
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

/// Why evidence that verified proves nothing by itself.
fn unproven_reason(tee: &str, result: &EvidenceResult) -> String {
    match Tee::from_str(tee) {
        Ok(Tee::Sample) => "sample evidence: software wrote it, no TEE vouches for it".to_string(),
        Ok(Tee::Tdx) => "TD quote signatures (Intel's PCK chain) are not verified offline by \
                         this build"
            .to_string(),
        Ok(Tee::Tpm) => format!(
            "the quotes are signed by ak {}, which is not pinned: anyone can make a key and \
             sign a quote; pass the ak the broker trusts with --trusted-ak",
            result.tpm.as_ref().map_or_else(
                || "(none)".to_string(),
                |t| Digest::of(&t.ak_public).to_string()
            )
        ),
        Ok(Tee::Snp) if result.proven => "any SEV-SNP guest can sign any report data: pin the \
                                          launch measurement with --snp-measurement"
            .to_string(),
        Ok(Tee::Snp) => {
            "the report's signature was not checked (its evidence carries no VCEK)".to_string()
        }
        Ok(Tee::AzSnpVtpm) => "every Azure CVM's paravisor has the same measurement: pin this \
                               VM's vTPM AK (HCLAkPub) with --trusted-ak"
            .to_string(),
        Err(_) => "the evidence's signature was not verified".to_string(),
    }
}

/// An AK named both ways: its fingerprint and the base64 SPKI DER a broker's `trusted_aks`
/// holds.
fn ak_label(spki_der: &[u8]) -> String {
    let (fingerprint, base64) = crate::evidence::tpm::ak_names(spki_der);
    format!("{fingerprint} (trusted_aks form: {base64})")
}

/// A record's details read as the typed shape the daemon writes.
fn typed<T: serde::de::DeserializeOwned>(
    details: &Map<String, Value>,
    what: &'static str,
) -> Result<T, String> {
    T::deserialize(details).map_err(|e| {
        crate::EvidenceError::Schema {
            what,
            detail: e.to_string(),
        }
        .to_string()
    })
}

/// The TEE boot that made exchange evidence, when the evidence names one: a TPM's AK and
/// reset/restart counts, an SEV-SNP guest's report_id.
fn boot_identity(result: &EvidenceResult) -> Option<String> {
    if let Some(tpm) = &result.tpm {
        return Some(format!(
            "tpm ak {} resetCount {} restartCount {}",
            Digest::of(&tpm.ak_public),
            tpm.reset_count,
            tpm.restart_count
        ));
    }
    result
        .snp
        .as_ref()
        .map(|snp| format!("sev-snp report_id {}", snp.report_id))
}
