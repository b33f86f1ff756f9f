//! Tests of the evidence checks on logs written with the real [`Audit`] API: sample evidence
//! from the real `sample` provider, TPM quotes made here (TPMS_ATTEST and TPMT_SIGNATURE
//! marshalled as TPM 2.0 Part 2 says, signed by an RSA key generated per test run) in the
//! evidence shape of the real `tpm` provider, and SEV-SNP evidence made from a real report
//! (Trustee's Milan test vector) with REPORT_DATA set to the binding and no VCEK (so its
//! signature is not checked: the guest-identity checks are what such logs test), TDX
//! evidence with synthetic version 4 quotes (laid out as `tee::tdx` documents) in the shape
//! of the real `tdx` provider, and the real Azure `az-snp-vtpm` evidence of Trustee's v2
//! vector (which no binding of ours can match, so it is checked against its own nonce, and
//! the checkpoint rules with its verified parts).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use rand_core::OsRng;
use rsa::pkcs1v15::SigningKey;
use rsa::pkcs8::EncodePublicKey;
use rsa::signature::{SignatureEncoding, Signer};
use rsa::RsaPrivateKey;
use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};

use cvm_warden_verify::binding::{self, checkpoint_binding};
use cvm_warden_verify::check::*;
use cvm_warden_verify::digest::Digest;
use cvm_warden_verify::evidence::tdx;
use cvm_warden_verify::evidence::tpm::APP_PCR;

use crate::audit::{verify_with, Audit, Clock, MemorySink, Problem, VerifyError};
use crate::eventlog::{EventKind, EventLog, RuntimeRegister, SimulatedPcr};
use crate::tee::sample::SampleProvider;
use crate::tee::snp::{CertTableEntry, CertType};
use crate::tee::tpm::{tpm_evidence_json, QuoteParts};
use crate::tee::Provider;

fn ticking_clock() -> Clock {
    let ms = Arc::new(AtomicU64::new(1_700_000_000_000));
    Box::new(move || UNIX_EPOCH + Duration::from_millis(ms.fetch_add(1, Ordering::SeqCst)))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tee {
    Sample,
    Tpm,
    Snp,
    Tdx,
    AzSnpVtpm,
}

/// What a forger changes (then rewrites the chain with the real API, so only the evidence
/// check can notice).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tamper {
    Nothing,
    Nonce,
    TeePubkey,
    EvidenceReportData,
    CheckpointEvidence,
    CheckpointReportData,
    Head,
    HeadSeq,
    /// The TPM register saw an extend the event log does not show.
    PcrReplay,
    /// The checkpoint quote is signed by another (valid) key.
    OtherAk,
    /// The log ends after the exchange: no checkpoint.
    NoCheckpoint,
    /// The checkpoint quote selects sha256:0-14,16-23 and claims the replay for pcr 15,
    /// while the register saw an unlogged extend.
    PcrSelectionGap,
    /// The exchange quote selects sha256:0-14,16-23.
    ExchangeSelectionGap,
    /// The checkpoint quote is from a later boot (resetCount + 1).
    OtherBoot,
    /// The TPM restarted between the quotes (restartCount + 1).
    Restarted,
    /// The checkpoint quote's clock is behind the exchange quote's.
    ClockBehind,
    /// Pcr 7 differs between the exchange and the checkpoint quote.
    OtherPcr7,
    /// Pcr 15 did not start at zero; the log says so (`register_initial`).
    RegisterInitial,
    /// `register_initial` is not a digest.
    BadRegisterInitial,
    /// One bit of the checkpoint report at this offset differs from the exchange report.
    SnpCheckpointByte(usize),
    /// The exchange report's guest policy has debug (bit 19) set.
    SnpDebug,
    /// The checkpoint quote's MRTD differs from the exchange quote's.
    TdxMrtd,
    /// The checkpoint quote's RTMR n differs from the exchange quote's.
    TdxRtmr(usize),
    /// The checkpoint evidence's cc_eventlog differs from the exchange evidence's.
    TdxEventLog,
    /// The exchange quote's TDATTRIBUTES has debug (bit 0) set.
    TdxDebug,
}

struct Ak {
    key: RsaPrivateKey,
    spki: Vec<u8>,
}

fn ak(which: usize) -> &'static Ak {
    static KEYS: OnceLock<Vec<Ak>> = OnceLock::new();
    &KEYS.get_or_init(|| {
        (0..2)
            .map(|_| {
                let key = RsaPrivateKey::new(&mut OsRng, 1024).unwrap();
                let spki = key
                    .to_public_key()
                    .to_public_key_der()
                    .unwrap()
                    .as_bytes()
                    .to_vec();
                Ak { key, spki }
            })
            .collect()
    })[which]
}

fn tpm2b(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&u16::try_from(bytes.len()).unwrap().to_be_bytes());
    out.extend_from_slice(bytes);
}

/// The clock and PCR selection of a quote.
#[derive(Debug, Clone, Copy)]
struct QuoteSpec {
    clock: u64,
    reset_count: u32,
    restart_count: u32,
    /// pcrSelect bitmap of the (single) sha256 selection.
    select: [u8; 3],
}

const ALL_PCRS: [u8; 3] = [0xff, 0xff, 0xff];
const ALL_BUT_15: [u8; 3] = [0xff, 0x7f, 0xff];

const EXCHANGE_QUOTE: QuoteSpec = QuoteSpec {
    clock: 42_000,
    reset_count: 1,
    restart_count: 0,
    select: ALL_PCRS,
};

const CHECKPOINT_QUOTE: QuoteSpec = QuoteSpec {
    clock: 43_500,
    ..EXCHANGE_QUOTE
};

/// A quote over sha256:0-23 with `extra` as extraData, in the `tpm` provider's JSON shape.
fn tpm_quote(ak: &Ak, extra: &[u8], pcrs: [[u8; 32]; 24]) -> Value {
    tpm_quote_with(ak, extra, pcrs, EXCHANGE_QUOTE)
}

/// A quote as `spec` says; its pcrDigest covers the selected PCRs only, as a TPM's does.
fn tpm_quote_with(ak: &Ak, extra: &[u8], pcrs: [[u8; 32]; 24], spec: QuoteSpec) -> Value {
    let mut msg = Vec::new();
    msg.extend_from_slice(&0xFF54_4347u32.to_be_bytes()); // TPM_GENERATED_VALUE
    msg.extend_from_slice(&0x8018u16.to_be_bytes()); // TPM_ST_ATTEST_QUOTE
    let mut name = vec![0x00, 0x0b];
    name.extend_from_slice(&Sha256::digest(&ak.spki));
    tpm2b(&mut msg, &name); // qualifiedSigner
    tpm2b(&mut msg, extra); // extraData
    msg.extend_from_slice(&spec.clock.to_be_bytes()); // clock
    msg.extend_from_slice(&spec.reset_count.to_be_bytes()); // resetCount
    msg.extend_from_slice(&spec.restart_count.to_be_bytes()); // restartCount
    msg.push(1); // safe
    msg.extend_from_slice(&0x2023_0101u64.to_be_bytes()); // firmwareVersion
    msg.extend_from_slice(&1u32.to_be_bytes()); // one selection
    msg.extend_from_slice(&0x000bu16.to_be_bytes()); // sha256
    msg.push(3); // sizeofSelect
    msg.extend_from_slice(&spec.select); // pcrSelect
    let mut hasher = Sha256::new();
    for (i, pcr) in pcrs.iter().enumerate() {
        if spec.select[i / 8] & (1 << (i % 8)) != 0 {
            hasher.update(pcr);
        }
    }
    tpm2b(&mut msg, &hasher.finalize()); // pcrDigest
    let raw = SigningKey::<Sha256>::new(ak.key.clone())
        .sign(&msg)
        .to_vec();
    let mut signature = vec![0x00, 0x14, 0x00, 0x0b];
    tpm2b(&mut signature, &raw);
    tpm_evidence_json(
        &ak.spki,
        &QuoteParts {
            message: msg,
            signature,
            raw_signature: raw,
            pcrs,
        },
    )
}

/// PCR values with pcr 15 = `app` and the others fixed.
fn pcr_values(app: [u8; 32]) -> [[u8; 32]; 24] {
    let mut pcrs = [[0u8; 32]; 24];
    for (i, pcr) in pcrs.iter_mut().enumerate() {
        *pcr = [u8::try_from(i).unwrap(); 32];
    }
    pcrs[usize::from(APP_PCR)] = app;
    pcrs
}

fn flip_char(text: &str, at: usize) -> String {
    let mut bytes = text.as_bytes().to_vec();
    bytes[at] = if bytes[at] == b'A' { b'B' } else { b'A' };
    String::from_utf8(bytes).unwrap()
}

struct Built {
    bytes: Vec<u8>,
    attested_seq: u64,
    ok_seq: u64,
}

/// A boot log with a broker exchange and its checkpoint, as the attest stage writes them.
fn build(tee: Tee, tamper: Tamper) -> Built {
    let (sink, _) = MemorySink::new();
    let audit = Audit::with_clock(vec![Box::new(sink)], false, ticking_clock());
    audit.record("boot", "start", json!({})).unwrap();

    // The measure stage: write-ahead into a simulated pcr 15.
    let initial = (tamper == Tamper::RegisterInitial).then(|| Digest::of(b"firmware extend"));
    let mut pcr = SimulatedPcr {
        value: initial.unwrap_or(Digest::ZERO),
    };
    let mut log = EventLog::new();
    log.measure(&mut pcr, EventKind::Policy, Digest::of(b"policy"), "policy")
        .unwrap();
    log.measure(&mut pcr, EventKind::Bundle, Digest::of(b"bundle"), "bundle")
        .unwrap();
    audit
        .record("measure", "ok", json!({"accumulator": log.accumulator()}))
        .unwrap();
    audit
        .record("attest", "try", json!({"call": "auth", "try_no": 1}))
        .unwrap();

    // The exchange.
    let nonce = "ZXhhbXBsZSBub25jZSBmcm9tIHRoZSBicm9rZXI=".to_string();
    let tee_pubkey = json!({
        "kty": "EC", "crv": "P-256", "alg": "ECDH-ES+A256KW",
        "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
        "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0",
    });
    let report_data = binding::report_data(&nonce, &tee_pubkey, "").unwrap();
    let (tee_name, mut evidence) = match tee {
        Tee::Sample => (
            "sample",
            SampleProvider::new().evidence(&report_data).unwrap(),
        ),
        Tee::Tpm => {
            let spec = QuoteSpec {
                select: if tamper == Tamper::ExchangeSelectionGap {
                    ALL_BUT_15
                } else {
                    ALL_PCRS
                },
                ..EXCHANGE_QUOTE
            };
            (
                "tpm",
                tpm_quote_with(ak(0), &report_data[..32], pcr_values(pcr.value.0), spec),
            )
        }
        Tee::Snp => {
            let mut rd = [0u8; 64];
            rd[..48].copy_from_slice(&report_data);
            ("snp", snp_evidence_for(&rd, tamper, false))
        }
        Tee::Tdx => {
            let mut rd = [0u8; 64];
            rd[..48].copy_from_slice(&report_data);
            ("tdx", tdx_evidence_for(&rd, tamper, false))
        }
        Tee::AzSnpVtpm => ("az-snp-vtpm", az_v2_evidence()),
    };
    let mut exchange = json!({
        "broker": "https://kbs.example:8080",
        "tee": tee_name,
        "insecure": tee == Tee::Sample,
        "nonce": nonce,
        "tee_pubkey": tee_pubkey,
        "additional_evidence": "",
        "report_data": hex::encode(report_data),
        "evidence": Value::Null,
        "claims": {"submods": {}},
        "status": "affirming",
    });
    match tamper {
        Tamper::Nonce => exchange["nonce"] = json!(flip_char(&nonce, 3)),
        Tamper::TeePubkey => {
            exchange["tee_pubkey"]["x"] = json!(flip_char(tee_pubkey["x"].as_str().unwrap(), 5))
        }
        Tamper::EvidenceReportData => match tee {
            Tee::Sample => {
                let mut rd = report_data;
                rd[7] ^= 1;
                evidence["report_data"] = json!(STANDARD.encode(rd));
            }
            Tee::Tpm => {
                let mut rd = report_data;
                rd[7] ^= 1;
                evidence = tpm_quote(ak(0), &rd[..32], pcr_values(pcr.value.0));
            }
            Tee::Snp => {
                let mut rd = [0u8; 64];
                rd[..48].copy_from_slice(&report_data);
                rd[7] ^= 1;
                evidence = snp_evidence_for(&rd, tamper, false);
            }
            Tee::Tdx => {
                let mut rd = [0u8; 64];
                rd[..48].copy_from_slice(&report_data);
                rd[7] ^= 1;
                evidence = tdx_evidence_for(&rd, tamper, false);
            }
            Tee::AzSnpVtpm => panic!("the az-snp-vtpm vector never carries our binding"),
        },
        _ => {}
    }
    exchange["evidence"] = evidence;
    let head = audit
        .record(
            "attest",
            "attested",
            json!({
                "broker": "https://kbs.example:8080",
                "tee": {"tee": tee_name},
                "exchange": exchange,
                "event_log": log.events(),
                "event_log_accumulator": log.accumulator(),
                "register_initial": if tamper == Tamper::BadRegisterInitial {
                    json!("firmware")
                } else {
                    json!(initial)
                },
            }),
        )
        .unwrap();
    let attested_seq = audit.seq() - 1;

    // The checkpoint.
    let binding = checkpoint_binding(&head);
    let mut checkpoint_evidence = match tee {
        Tee::Sample => SampleProvider::new().checkpoint(&binding).unwrap(),
        Tee::Tpm => {
            let mut app = pcr;
            if matches!(tamper, Tamper::PcrReplay | Tamper::PcrSelectionGap) {
                app.extend(&Digest::of(b"unlogged")).unwrap();
            }
            let key = if tamper == Tamper::OtherAk { 1 } else { 0 };
            let mut spec = CHECKPOINT_QUOTE;
            let mut values = pcr_values(app.value.0);
            match tamper {
                Tamper::PcrSelectionGap => {
                    // Pcr 15 is outside the signed selection: claim the logged value.
                    spec.select = ALL_BUT_15;
                    values[usize::from(APP_PCR)] = pcr.value.0;
                }
                Tamper::OtherBoot => spec.reset_count += 1,
                Tamper::Restarted => spec.restart_count += 1,
                Tamper::ClockBehind => spec.clock = EXCHANGE_QUOTE.clock - 1,
                Tamper::OtherPcr7 => values[7][0] ^= 1,
                _ => {}
            }
            tpm_quote_with(ak(key), &binding[..32], values, spec)
        }
        Tee::Snp => snp_evidence_for(&binding, tamper, true),
        Tee::Tdx => tdx_evidence_for(&binding, tamper, true),
        Tee::AzSnpVtpm => az_v2_evidence(),
    };
    if tamper == Tamper::CheckpointEvidence {
        match tee {
            Tee::Sample => {
                let mut rd = binding;
                rd[40] ^= 0x80;
                checkpoint_evidence = SampleProvider::new().checkpoint(&rd).unwrap();
            }
            Tee::Snp => {
                let mut rd = binding;
                rd[40] ^= 0x80;
                checkpoint_evidence = snp_evidence_for(&rd, tamper, true);
            }
            Tee::Tdx => {
                let mut rd = binding;
                rd[40] ^= 0x80;
                checkpoint_evidence = tdx_evidence_for(&rd, tamper, true);
            }
            Tee::AzSnpVtpm => panic!("the az-snp-vtpm vector never carries our binding"),
            Tee::Tpm => {
                let sig = checkpoint_evidence["tpm_quote"]["signature"]
                    .as_str()
                    .unwrap()
                    .to_string();
                let mut bytes = STANDARD.decode(sig).unwrap();
                bytes[20] ^= 1;
                checkpoint_evidence["tpm_quote"]["signature"] = json!(STANDARD.encode(bytes));
            }
        }
    }
    let mut checkpoint = json!({
        "head_seq": attested_seq,
        "head": head,
        "report_data": hex::encode(binding),
        "evidence": {"tee": tee_name, "evidence": checkpoint_evidence},
    });
    match tamper {
        Tamper::Head => {
            let text = head.to_string();
            let last = text.len() - 1;
            let c = if text.ends_with('0') { "1" } else { "0" };
            checkpoint["head"] = json!(format!("{}{c}", &text[..last]));
        }
        Tamper::HeadSeq => checkpoint["head_seq"] = json!(attested_seq - 1),
        Tamper::CheckpointReportData => {
            let mut rd = binding;
            rd[63] ^= 1;
            checkpoint["report_data"] = json!(hex::encode(rd));
        }
        _ => {}
    }
    if tamper != Tamper::NoCheckpoint {
        audit
            .record(
                "attest",
                "ok",
                json!({"attested": true, "status": "affirming", "checkpoint": checkpoint}),
            )
            .unwrap();
    }
    let ok_seq = audit.seq() - 1;
    audit.record("launch", "exec", json!({})).unwrap();
    let bytes = audit
        .lines()
        .iter()
        .flat_map(|l| format!("{l}\n").into_bytes())
        .collect();
    Built {
        bytes,
        attested_seq,
        ok_seq,
    }
}

fn check(bytes: &[u8]) -> Result<Vec<EvidenceFinding>, VerifyError> {
    let mut evidence = EvidenceCheck::new();
    verify_with(bytes, &mut [&mut evidence])?;
    Ok(evidence.finish())
}

/// The log fails the evidence check at `seq`; returns the reason.
fn rejected_at(built: &Built, seq: u64) -> String {
    // The chain itself is intact: a forger rewrote it.
    crate::audit::verify(&built.bytes).unwrap();
    match check(&built.bytes) {
        Err(VerifyError::Broken {
            seq: Some(at),
            problem: Problem::Rejected { check, reason },
            ..
        }) => {
            assert_eq!(check, CHECK_NAME);
            assert_eq!(at, seq, "{reason}");
            reason
        }
        other => panic!("expected an evidence failure at seq {seq}, got {other:?}"),
    }
}

#[test]
fn intact_sample_log_verifies_and_says_sample_proves_nothing() {
    let built = build(Tee::Sample, Tamper::Nothing);
    let findings = check(&built.bytes).unwrap();
    assert_eq!(findings.len(), 2);
    assert_eq!(
        (
            findings[0].seq,
            findings[0].what.as_str(),
            findings[0].tee.as_str()
        ),
        (built.attested_seq, "broker exchange", "sample")
    );
    assert_eq!(findings[1].seq, built.ok_seq);
    assert_eq!(
        findings[1].what,
        format!("checkpoint of seq {}", built.attested_seq)
    );
    for f in &findings {
        assert!(
            f.warnings.iter().any(|w| w.contains("proves nothing")),
            "{f:?}"
        );
    }
    assert!(findings[0].verified[0].contains("SHA-384"));
}

#[test]
fn intact_tpm_log_verifies_with_pcr_replay() {
    let built = build(Tee::Tpm, Tamper::Nothing);
    let findings = check(&built.bytes).unwrap();
    assert_eq!(findings.len(), 2);
    let checkpoint = &findings[1];
    assert_eq!(checkpoint.tee, "tpm");
    assert!(checkpoint
        .verified
        .iter()
        .any(|v| v.starts_with("pcr 15 = replay of the 2 event log digest(s)")));
    assert!(checkpoint
        .verified
        .iter()
        .any(|v| v.contains("same ak signed")));
    assert!(findings
        .iter()
        .all(|f| !f.warnings.iter().any(|w| w.contains("proves nothing"))));
}

#[test]
fn changed_nonce_or_key_breaks_the_exchange_binding() {
    for tee in [Tee::Sample, Tee::Tpm, Tee::Snp, Tee::Tdx] {
        for tamper in [Tamper::Nonce, Tamper::TeePubkey] {
            let built = build(tee, tamper);
            let reason = rejected_at(&built, built.attested_seq);
            assert!(
                reason.starts_with("exchange.report_data is ")
                    && reason.contains("SHA-384 of the JCS binding"),
                "{tee:?} {tamper:?}: {reason}"
            );
        }
    }
}

#[test]
fn evidence_for_another_report_data_is_rejected() {
    let built = build(Tee::Sample, Tamper::EvidenceReportData);
    let reason = rejected_at(&built, built.attested_seq);
    assert!(
        reason.starts_with("broker exchange evidence (sample): sample report_data is "),
        "{reason}"
    );
    let built = build(Tee::Tpm, Tamper::EvidenceReportData);
    let reason = rejected_at(&built, built.attested_seq);
    assert!(
        reason.starts_with("broker exchange evidence (tpm): quote extraData is "),
        "{reason}"
    );
    let built = build(Tee::Snp, Tamper::EvidenceReportData);
    let reason = rejected_at(&built, built.attested_seq);
    assert!(
        reason.starts_with("broker exchange evidence (snp): REPORT_DATA is "),
        "{reason}"
    );
    let built = build(Tee::Tdx, Tamper::EvidenceReportData);
    let reason = rejected_at(&built, built.attested_seq);
    assert!(
        reason.starts_with("broker exchange evidence (tdx): REPORTDATA is ")
            && reason.ends_with(
                "(the report data followed by zero bytes): the quote was not made for this \
                 binding"
            ),
        "{reason}"
    );
}

#[test]
fn changed_checkpoint_evidence_is_rejected() {
    let built = build(Tee::Sample, Tamper::CheckpointEvidence);
    let reason = rejected_at(&built, built.ok_seq);
    assert!(
        reason.starts_with("checkpoint evidence (sample): sample report_data is "),
        "{reason}"
    );
    let built = build(Tee::Tpm, Tamper::CheckpointEvidence);
    let reason = rejected_at(&built, built.ok_seq);
    assert!(
        reason.starts_with("checkpoint evidence (tpm): quote does not verify: quote signature"),
        "{reason}"
    );
    let built = build(Tee::Snp, Tamper::CheckpointEvidence);
    let reason = rejected_at(&built, built.ok_seq);
    assert!(
        reason.starts_with("checkpoint evidence (snp): REPORT_DATA is "),
        "{reason}"
    );
    let built = build(Tee::Tdx, Tamper::CheckpointEvidence);
    let reason = rejected_at(&built, built.ok_seq);
    assert!(
        reason.starts_with("checkpoint evidence (tdx): REPORTDATA is ")
            && reason.contains("(the report data): the quote was not made"),
        "{reason}"
    );
}

#[test]
fn a_checkpoint_for_another_head_is_rejected() {
    for tee in [Tee::Sample, Tee::Tpm, Tee::Snp, Tee::Tdx] {
        let built = build(tee, Tamper::Head);
        let reason = rejected_at(&built, built.ok_seq);
        assert!(
            reason.starts_with(&format!(
                "checkpoint.head_seq {} is not an attest/attested record of this run just \
                 before it",
                built.attested_seq
            )),
            "{reason}"
        );
        let built = build(tee, Tamper::HeadSeq);
        let reason = rejected_at(&built, built.ok_seq);
        assert!(
            reason.contains("is not an attest/attested record of this run"),
            "{reason}"
        );
        let built = build(tee, Tamper::CheckpointReportData);
        let reason = rejected_at(&built, built.ok_seq);
        assert!(
            reason.starts_with("checkpoint.report_data is ")
                && reason.contains("checkpoint_binding(head)"),
            "{reason}"
        );
    }
}

#[test]
fn pcr_replay_mismatch_is_rejected() {
    let built = build(Tee::Tpm, Tamper::PcrReplay);
    let reason = rejected_at(&built, built.ok_seq);
    assert!(
        reason.starts_with("pcr 15 in the checkpoint quote is ")
            && reason.contains("the register and the event log disagree"),
        "{reason}"
    );
}

#[test]
fn a_checkpoint_by_another_ak_is_rejected() {
    let built = build(Tee::Tpm, Tamper::OtherAk);
    let reason = rejected_at(&built, built.ok_seq);
    assert!(
        reason.starts_with("checkpoint quote is signed by ak sha256:"),
        "{reason}"
    );
}

#[test]
fn an_exchange_without_checkpoint_is_a_warning() {
    let built = build(Tee::Sample, Tamper::NoCheckpoint);
    let findings = check(&built.bytes).unwrap();
    assert_eq!(findings.len(), 1);
    assert!(findings[0]
        .warnings
        .iter()
        .any(|w| w.starts_with("no checkpoint follows this exchange")));
}

#[test]
fn evidence_of_a_tee_cvm_warden_never_writes_is_refused() {
    let err = check_evidence("az-tdx-vtpm", &json!({"quote": "AAAA"}), &[0u8; 48]).unwrap_err();
    assert!(err.starts_with("unknown tee \"az-tdx-vtpm\""), "{err}");
}

fn vector(path: &str) -> Vec<u8> {
    std::fs::read(format!(
        "{}/verify/tests/vectors/{path}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

/// Offsets of the SEV-SNP report fields a checkpoint must share with the exchange.
const SNP_POLICY: usize = 0x08;
const SNP_VMPL: usize = 0x30;
const SNP_MEASUREMENT: usize = 0x90;
const SNP_HOST_DATA: usize = 0xc0;
const SNP_REPORT_ID: usize = 0x140;
const SNP_REPORTED_TCB: usize = 0x180;
const SNP_CHIP_ID: usize = 0x1a0;

/// Trustee's Milan test report with `report_data` as REPORT_DATA and what `tamper` changes
/// (in the checkpoint report when `checkpoint`, else in the exchange report), as `snp`
/// evidence without a certificate table.
fn snp_evidence_for(report_data: &[u8; 64], tamper: Tamper, checkpoint: bool) -> Value {
    let mut report = vector("trustee/snp/test-report.bin");
    report[SNP_REPORT_DATA_OFFSET..SNP_REPORT_DATA_OFFSET + 64].copy_from_slice(report_data);
    match tamper {
        Tamper::SnpCheckpointByte(offset) if checkpoint => report[offset] ^= 1,
        Tamper::SnpDebug if !checkpoint => report[SNP_POLICY + 2] |= 0x08,
        _ => {}
    }
    crate::tee::snp::evidence_json(&report, None).unwrap()
}

/// A real SEV-SNP report (Trustee's Milan test vector) in the `snp` evidence shape.
fn snp_evidence(vcek: Option<Vec<u8>>) -> (Value, [u8; 64]) {
    let report = vector("trustee/snp/test-report.bin");
    let mut carried = [0u8; 64];
    carried.copy_from_slice(&report[SNP_REPORT_DATA_OFFSET..SNP_REPORT_DATA_OFFSET + 64]);
    let chain = vcek.map(|data| {
        vec![CertTableEntry {
            cert_type: CertType::Vcek,
            data,
        }]
    });
    let evidence = crate::tee::snp::evidence_json(&report, chain.as_deref()).unwrap();
    (evidence, carried)
}

#[test]
fn snp_report_is_verified_to_amd_and_must_carry_the_binding() {
    let (evidence, carried) = snp_evidence(Some(vector("trustee/snp/test-vcek.der")));
    let result = check_evidence("snp", &evidence, &carried).unwrap();
    assert!(
        result
            .verified
            .iter()
            .any(|v| v.contains("chains to the built-in milan chain")),
        "{result:?}"
    );
    assert!(result.warnings.is_empty());

    let mut other = carried;
    other[10] ^= 1;
    let err = check_evidence("snp", &evidence, &other).unwrap_err();
    assert!(err.starts_with("REPORT_DATA is "), "{err}");
    // An exchange binding (48 bytes) needs 16 zero bytes after it.
    if carried[48..] != [0u8; 16] {
        let err = check_evidence("snp", &evidence, &carried[..48]).unwrap_err();
        assert!(err.starts_with("REPORT_DATA is "), "{err}");
    }

    let (wrong_vcek, _) = snp_evidence(Some(vector("virtee-sev/certs_data/vcek_milan.der")));
    let err = check_evidence("snp", &wrong_vcek, &carried).unwrap_err();
    assert!(err.starts_with("the report does not verify"), "{err}");

    let (no_chain, _) = snp_evidence(None);
    let result = check_evidence("snp", &no_chain, &carried).unwrap();
    assert!(result.warnings[0].contains("no VCEK"), "{result:?}");
}

#[test]
fn verify_command_prints_the_evidence_section() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let built = build(Tee::Sample, Tamper::Nothing);
    std::fs::write(&path, &built.bytes).unwrap();
    let mut out = Vec::new();
    let code =
        crate::audit::run_verify_command(&path, Default::default(), false, &mut out).unwrap();
    let text = String::from_utf8(out).unwrap();
    assert_eq!(code, 3, "sample evidence attests nothing: {text}");
    assert!(
        text.starts_with("run 1: unattested (sample evidence: software wrote it"),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "evidence:\n  run 1 seq {} broker exchange, tee sample:\n    verified: ",
            built.attested_seq
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "  run 1 seq {} checkpoint of seq {}, tee sample:\n",
            built.ok_seq, built.attested_seq
        )),
        "{text}"
    );
    assert!(text.contains("    WARNING: sample evidence proves nothing"));

    let bad = build(Tee::Sample, Tamper::Head);
    std::fs::write(&path, &bad.bytes).unwrap();
    let mut out = Vec::new();
    let err =
        crate::audit::run_verify_command(&path, Default::default(), false, &mut out).unwrap_err();
    assert!(out.is_empty());
    assert!(err.to_string().contains(&format!(
        "(seq {}): evidence check failed: checkpoint.head_seq",
        bad.ok_seq
    )));
}

#[test]
fn a_forged_snp_chain_in_the_evidence_is_refused() {
    let (_, carried) = snp_evidence(None);
    let report = vector("trustee/snp/test-report.bin");
    let forged =
        cvm_warden_verify::evidence::snp::forge::chain(&vector("trustee/snp/test-vcek.der"));
    let table = |vcek: &[u8], ask: &[u8], ark: &[u8]| {
        let entries = [
            (CertType::Vcek, vcek),
            (CertType::Ask, ask),
            (CertType::Ark, ark),
        ]
        .map(|(cert_type, data)| CertTableEntry {
            cert_type,
            data: data.to_vec(),
        });
        crate::tee::snp::evidence_json(&report, Some(&entries)).unwrap()
    };
    // Every signature of the forgery holds (see evidence::snp's tests); its ARK is not AMD's.
    let evidence = table(&forged.vcek, &forged.ask, &forged.ark);
    let err = check_evidence("snp", &evidence, &carried).unwrap_err();
    assert!(
        err.starts_with("the report does not verify with the VCEK of cert_chain")
            && err.contains("the ark of the pem chain is not amd's"),
        "{err}"
    );

    // AMD's own ASK and ARK in the table verify, and say so.
    let milan = |c: sev::certs::snp::Certificate| c.to_der().unwrap();
    let evidence = table(
        &vector("trustee/snp/test-vcek.der"),
        &milan(sev::certs::snp::builtin::milan::ask().unwrap()),
        &milan(sev::certs::snp::builtin::milan::ark().unwrap()),
    );
    let result = check_evidence("snp", &evidence, &carried).unwrap();
    assert!(
        result
            .verified
            .iter()
            .any(|v| v.contains("chains to the ASK and ARK of cert_chain (the ARK is AMD's)")),
        "{result:?}"
    );
    assert!(result.snp.unwrap().verified);
}

#[test]
fn a_debug_snp_guest_is_refused() {
    // go-sev-guest's real report has policy 0xb0000: debug (bit 19) set.
    let report = vector("go-sev-guest/attestation.bin");
    let mut carried = [0u8; 64];
    carried.copy_from_slice(&report[SNP_REPORT_DATA_OFFSET..SNP_REPORT_DATA_OFFSET + 64]);
    let entries = [CertTableEntry {
        cert_type: CertType::Vcek,
        data: vector("go-sev-guest/vcek.testcer"),
    }];
    let evidence = crate::tee::snp::evidence_json(&report, Some(&entries)).unwrap();
    let err = check_evidence("snp", &evidence, &carried).unwrap_err();
    assert!(
        err.starts_with("guest policy is 0xb0000: bit 19 (DEBUG) is set")
            && err.contains("launch the guest with debug disabled"),
        "{err}"
    );

    let built = build(Tee::Snp, Tamper::SnpDebug);
    let reason = rejected_at(&built, built.attested_seq);
    assert!(
        reason.starts_with("broker exchange evidence (snp): guest policy is 0xb001f: bit 19"),
        "{reason}"
    );
}

#[test]
fn intact_snp_log_binds_the_checkpoint_to_the_exchange_guest() {
    let built = build(Tee::Snp, Tamper::Nothing);
    let findings = check(&built.bytes).unwrap();
    assert_eq!(findings.len(), 2);
    let report = vector("trustee/snp/test-report.bin");
    let measurement = format!(
        "measurement {}",
        hex::encode(&report[SNP_MEASUREMENT..SNP_MEASUREMENT + 48])
    );
    for f in &findings {
        assert_eq!(f.tee, "snp");
        assert!(f.verified.contains(&measurement), "{f:?}");
        assert!(
            f.verified
                .iter()
                .any(|v| v == "guest policy 0x3001f has debug (bit 19) disabled"),
            "{f:?}"
        );
        assert!(f.warnings.iter().any(|w| w.contains("no VCEK")), "{f:?}");
    }
    assert!(findings[1].verified.iter().any(|v| v.starts_with(
        "measurement, chip_id, policy, host_data, reported_tcb, vmpl and report_id equal"
    )));
}

#[test]
fn an_snp_checkpoint_from_another_guest_is_rejected() {
    for (name, offset) in [
        ("measurement", SNP_MEASUREMENT + 5),
        ("chip_id", SNP_CHIP_ID + 9),
        ("policy", SNP_POLICY),
        ("host_data", SNP_HOST_DATA + 31),
        ("reported_tcb", SNP_REPORTED_TCB),
        ("vmpl", SNP_VMPL),
        ("report_id", SNP_REPORT_ID),
    ] {
        let built = build(Tee::Snp, Tamper::SnpCheckpointByte(offset));
        let reason = rejected_at(&built, built.ok_seq);
        assert!(
            reason.starts_with(&format!("checkpoint report {name} is "))
                && reason.contains(&format!(
                    "but the exchange report of seq {} has",
                    built.attested_seq
                ))
                && reason.contains("another guest"),
            "{name}: {reason}"
        );
    }
}

#[test]
fn a_quote_that_leaves_pcr_15_out_is_rejected() {
    let built = build(Tee::Tpm, Tamper::PcrSelectionGap);
    let reason = rejected_at(&built, built.ok_seq);
    assert!(
        reason.starts_with(
            "checkpoint evidence (tpm): quote selects sha256:0-14,16-23, but the protocol \
             requires exactly one selection, sha256:0-23"
        ),
        "{reason}"
    );
    let built = build(Tee::Tpm, Tamper::ExchangeSelectionGap);
    let reason = rejected_at(&built, built.attested_seq);
    assert!(
        reason.starts_with("broker exchange evidence (tpm): quote selects sha256:0-14,16-23"),
        "{reason}"
    );
}

#[test]
fn a_tpm_checkpoint_from_another_boot_is_rejected() {
    for (tamper, expected) in [
        (
            Tamper::OtherBoot,
            "checkpoint quote has resetCount 2 and restartCount 0, but",
        ),
        (
            Tamper::Restarted,
            "checkpoint quote has resetCount 1 and restartCount 1, but",
        ),
        (
            Tamper::ClockBehind,
            "checkpoint quote clock is 41999 ms, behind the exchange",
        ),
    ] {
        let built = build(Tee::Tpm, tamper);
        let reason = rejected_at(&built, built.ok_seq);
        assert!(reason.starts_with(expected), "{tamper:?}: {reason}");
    }
    let built = build(Tee::Tpm, Tamper::OtherPcr7);
    let reason = rejected_at(&built, built.ok_seq);
    assert!(
        reason.starts_with("pcr 7 in the checkpoint quote is ")
            && reason.contains("pcrs 0-14 must not change"),
        "{reason}"
    );
}

#[test]
fn intact_tpm_log_says_same_boot_and_pcrs_equal() {
    let built = build(Tee::Tpm, Tamper::Nothing);
    let findings = check(&built.bytes).unwrap();
    let checkpoint = &findings[1];
    assert!(
        checkpoint.verified.iter().any(|v| v
            == "same boot as the exchange quote (resetCount 1, restartCount 0; clock 42000 ms \
                then 43500 ms)"),
        "{checkpoint:?}"
    );
    assert!(checkpoint
        .verified
        .iter()
        .any(|v| v == "pcrs 0-14 equal the exchange quote's"));
    assert!(!checkpoint
        .warnings
        .iter()
        .any(|w| w.contains("did not start at zero")));
}

#[test]
fn a_nonzero_register_initial_is_replayed_from_and_warned_about() {
    let built = build(Tee::Tpm, Tamper::RegisterInitial);
    let findings = check(&built.bytes).unwrap();
    let checkpoint = &findings[1];
    assert!(checkpoint
        .verified
        .iter()
        .any(|v| v.starts_with("pcr 15 = replay of the 2 event log digest(s)")));
    assert!(
        checkpoint.warnings.iter().any(|w| w.starts_with(&format!(
            "PCR 15 did not start at zero (register_initial {}): something extended it before \
             cvm-warden; the replay starts from the logged value, which the log itself asserts",
            Digest::of(b"firmware extend")
        ))),
        "{checkpoint:?}"
    );

    let built = build(Tee::Tpm, Tamper::BadRegisterInitial);
    let reason = rejected_at(&built, built.attested_seq);
    assert!(
        reason.starts_with("attest/attested details does not have the shape cvm-warden writes")
            && reason.contains("\"firmware\""),
        "{reason}"
    );
}

// ---- tdx ----

const TSM_ROOT: &str = "/fake/tsm/report";

/// The CC event log the synthetic TD exposes.
const CCEL: &[u8] = b"CCEL\x01\x00synthetic td event log";

/// What a synthetic TD puts in its quotes besides REPORTDATA.
#[derive(Debug, Clone)]
struct TdSpec {
    version: u16,
    body_type: u16,
    attributes: u64,
    mrtd: [u8; 48],
    rtmrs: [[u8; 48]; 4],
}

fn td_spec() -> TdSpec {
    let mut mrtd = [0u8; 48];
    for (i, b) in mrtd.iter_mut().enumerate() {
        *b = u8::try_from(i).unwrap().wrapping_mul(3).wrapping_add(1);
    }
    TdSpec {
        version: 4,
        body_type: 2,
        // SEPT_VE_DISABLE (bit 28), debug (bit 0) off.
        attributes: 0x1000_0000,
        mrtd,
        rtmrs: [1u8, 2, 3, 4].map(|k| [0x10 * k; 48]),
    }
}

/// A synthetic TD quote laid out as the Intel TD quote format says (and as `tee::tdx`'s
/// tests build them): header, (v5 body descriptor), the TD report body (filler, then
/// TDATTRIBUTES at 120, MRTD at 136, RTMR0-3 at 328, REPORTDATA at 520), a fake signature
/// section.
fn td_quote(spec: &TdSpec, report_data: &[u8]) -> Vec<u8> {
    let mut q = Vec::new();
    q.extend_from_slice(&spec.version.to_le_bytes());
    q.extend_from_slice(&2u16.to_le_bytes()); // ECDSA-256 P-256
    q.extend_from_slice(&tdx::TEE_TYPE_TDX.to_le_bytes());
    q.resize(48, 0xaa);
    let body_len = if spec.body_type == 3 { 648 } else { 584 };
    if spec.version == 5 {
        q.extend_from_slice(&spec.body_type.to_le_bytes());
        q.extend_from_slice(&u32::try_from(body_len).unwrap().to_le_bytes());
    }
    let body = q.len();
    q.resize(body + body_len, 0xbb);
    q[body + 120..body + 128].copy_from_slice(&spec.attributes.to_le_bytes());
    q[body + 136..body + 184].copy_from_slice(&spec.mrtd);
    for (i, rtmr) in spec.rtmrs.iter().enumerate() {
        let at = body + 328 + 48 * i;
        q[at..at + 48].copy_from_slice(rtmr);
    }
    q[body + 520..body + 584].copy_from_slice(report_data);
    q.extend_from_slice(&[0x10, 0, 0, 0]);
    q.extend_from_slice(&[0xcc; 16]);
    q
}

/// Evidence from the real `tdx` provider on a fake configfs-tsm whose TD answers with a
/// synthetic quote of `spec` for the inblob, with `ccel` as the CC event log.
fn tdx_provider_evidence(
    spec: TdSpec,
    ccel: &[u8],
    report_data: &[u8; 64],
    checkpoint: bool,
) -> Value {
    use crate::tee::tdx::TdxProvider;
    use crate::tee::tsm::{FakeTsmFs, Tsm, PROVIDER_TDX};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("CCEL");
    std::fs::write(&path, ccel).unwrap();
    let fs = FakeTsmFs::new(
        TSM_ROOT,
        PROVIDER_TDX,
        Box::new(move |inblob| Ok(td_quote(&spec, inblob))),
    );
    let mut provider = TdxProvider::open(Tsm::new("tdx", TSM_ROOT, fs), &path).unwrap();
    if checkpoint {
        provider.checkpoint(report_data).unwrap()
    } else {
        assert_eq!(
            report_data[48..],
            [0u8; 16],
            "exchange report data is 48 bytes"
        );
        provider
            .evidence(&report_data[..48].try_into().unwrap())
            .unwrap()
    }
}

/// `tdx` evidence for `report_data` with what `tamper` changes (in the checkpoint quote when
/// `checkpoint`, else in the exchange quote).
fn tdx_evidence_for(report_data: &[u8; 64], tamper: Tamper, checkpoint: bool) -> Value {
    let mut spec = td_spec();
    let mut ccel = CCEL.to_vec();
    match tamper {
        Tamper::TdxMrtd if checkpoint => spec.mrtd[17] ^= 1,
        Tamper::TdxRtmr(i) if checkpoint => spec.rtmrs[i][47] ^= 1,
        Tamper::TdxEventLog if checkpoint => ccel.push(0),
        Tamper::TdxDebug if !checkpoint => spec.attributes |= 1,
        _ => {}
    }
    tdx_provider_evidence(spec, &ccel, report_data, checkpoint)
}

const TDX_SIGNATURE_WARNING: &str =
    "the td quote signature (Intel PCK certificate chain) is not verified offline";

#[test]
fn intact_tdx_log_verifies_with_the_unverified_signature_warning() {
    let built = build(Tee::Tdx, Tamper::Nothing);
    let findings = check(&built.bytes).unwrap();
    assert_eq!(findings.len(), 2);
    let mrtd = format!("MRTD {}", hex::encode(td_spec().mrtd));
    for f in &findings {
        assert_eq!(f.tee, "tdx");
        assert!(f.verified.contains(&mrtd), "{f:?}");
        assert!(
            f.verified
                .iter()
                .any(|v| v == "TDATTRIBUTES 0x0000000010000000 has debug (bit 0) disabled"),
            "{f:?}"
        );
        // Never a pass for the signature: a warning says it was not checked.
        assert!(
            f.warnings
                .iter()
                .any(|w| w.starts_with(TDX_SIGNATURE_WARNING)),
            "{f:?}"
        );
        assert!(!f.verified.iter().any(|v| v.contains("signature")), "{f:?}");
    }
    assert!(findings[0].verified.iter().any(|v| v
        == "quote header (version 4, tee type 0x81) and REPORTDATA = the report data followed \
            by zero bytes"));
    let checkpoint = &findings[1];
    assert_eq!(checkpoint.seq, built.ok_seq);
    assert!(checkpoint
        .verified
        .iter()
        .any(|v| v == "quote header (version 4, tee type 0x81) and REPORTDATA = the report data"));
    assert!(
        checkpoint.verified.iter().any(|v| v
            == "MRTD, RTMR0-3 and cc_eventlog equal the exchange's (the same TD, no runtime \
                measurement since)"),
        "{checkpoint:?}"
    );
}

#[test]
fn a_tdx_checkpoint_from_another_td_or_td_state_is_rejected() {
    let mut cases = vec![(Tamper::TdxMrtd, "checkpoint quote MRTD is ".to_string())];
    for i in 0..4 {
        cases.push((Tamper::TdxRtmr(i), format!("checkpoint quote RTMR{i} is ")));
    }
    cases.push((
        Tamper::TdxEventLog,
        format!(
            "checkpoint cc_eventlog is {} bytes, {}, but the exchange evidence of seq",
            CCEL.len() + 1,
            Digest::of(&[CCEL, &[0u8][..]].concat())
        ),
    ));
    for (tamper, start) in cases {
        let built = build(Tee::Tdx, tamper);
        let reason = rejected_at(&built, built.ok_seq);
        assert!(
            reason.starts_with(&start)
                && reason.contains(&format!("of seq {} has", built.attested_seq)),
            "{tamper:?}: {reason}"
        );
    }
    let built = build(Tee::Tdx, Tamper::TdxRtmr(2));
    let reason = rejected_at(&built, built.ok_seq);
    let mut changed = td_spec().rtmrs[2];
    changed[47] ^= 1;
    assert!(
        reason.starts_with(&format!(
            "checkpoint quote RTMR2 is {}, but the exchange quote of seq {} has {}",
            hex::encode(changed),
            built.attested_seq,
            hex::encode(td_spec().rtmrs[2])
        )) && reason.contains("cvm-warden extends no RTMR"),
        "{reason}"
    );
}

#[test]
fn a_debug_td_is_refused() {
    let built = build(Tee::Tdx, Tamper::TdxDebug);
    let reason = rejected_at(&built, built.attested_seq);
    assert!(
        reason.starts_with(
            "broker exchange evidence (tdx): TDATTRIBUTES is 0x0000000010000001: bit 0 (DEBUG) \
             is set"
        ) && reason.contains(&hex::encode(td_spec().mrtd)),
        "{reason}"
    );
}

#[test]
fn tdx_v5_quotes_are_read_at_their_body_offset() {
    let mut binding = [0u8; 64];
    for (i, b) in binding.iter_mut().enumerate() {
        *b = 0x80 ^ u8::try_from(i).unwrap();
    }
    for body_type in [2, 3] {
        let spec = TdSpec {
            version: 5,
            body_type,
            ..td_spec()
        };
        let evidence = tdx_provider_evidence(spec.clone(), CCEL, &binding, true);
        let result = check_evidence("tdx", &evidence, &binding).unwrap();
        let facts = result.tdx.unwrap();
        assert_eq!(facts.mrtd, spec.mrtd);
        assert_eq!(facts.rtmrs, spec.rtmrs);
        assert_eq!(facts.cc_eventlog.as_deref(), Some(CCEL));
        assert!(result.verified[0].starts_with("quote header (version 5, tee type 0x81)"));
        // The first 48 bytes padded with zeros are another binding.
        let err = check_evidence("tdx", &evidence, &binding[..48]).unwrap_err();
        assert!(err.starts_with("REPORTDATA is "), "{err}");
    }
}

#[test]
fn tdx_evidence_that_is_not_a_td_quote_is_rejected() {
    let rd = [7u8; 64];
    let quote = |spec: &TdSpec| td_quote(spec, &rd);
    let evidence =
        |q: &[u8], ccel: Value| json!({"quote": STANDARD.encode(q), "cc_eventlog": ccel});
    let good = quote(&td_spec());
    let result = check_evidence("tdx", &evidence(&good, Value::Null), &rd).unwrap();
    assert_eq!(result.tdx.unwrap().cc_eventlog, None);

    let mut other_tee = good.clone();
    other_tee[4] = 0;
    let v3 = quote(&TdSpec {
        version: 3,
        ..td_spec()
    });
    let cases = [
        (
            evidence(&good[..40], Value::Null),
            "the quote is not a td quote: tdx: malformed td quote: 40 bytes, shorter than",
        ),
        (
            evidence(&other_tee, Value::Null),
            "tee type 0x0, expected 0x81",
        ),
        (evidence(&v3, Value::Null), "version 3, expected 4 or 5"),
        (
            evidence(&good[..600], Value::Null),
            "too short for its 584-byte",
        ),
        (
            json!({"quote": STANDARD.encode(&good)}),
            "no cc_eventlog field",
        ),
        (
            evidence(&good, json!("%%")),
            "cc_eventlog is not standard base64",
        ),
        (
            json!({"quote": STANDARD.encode(&good), "cc_eventlog": null, "x": 1}),
            "unexpected field \"x\"",
        ),
    ];
    for (bad, want) in cases {
        let err = check_evidence("tdx", &bad, &rd).unwrap_err();
        assert!(err.contains(want), "{want}: {err}");
    }
}

// ---- az-snp-vtpm ----

/// The 48-byte report data of Trustee's v2 az-snp-vtpm vector: its quote's extraData, and its
/// HCL report's user-data followed by 16 zero bytes.
const AZ_V2_NONCE: &str = "982f5c6e45df0ed3f10b6f60b02f0c8390e281300f3805e2279c16168cd6ae9a\
                           a398f647caa2338748cd0fd9f5f819ef";

fn az_vector(name: &str, part: &str) -> Vec<u8> {
    vector(&format!("derived/trustee-evidence-{name}.{part}"))
}

/// The real Azure evidence of Trustee's `name` vector, written by the `az-snp-vtpm`
/// provider's own JSON writer.
fn az_evidence(name: &str) -> Value {
    let raw = az_vector(name, "tpm-quote.sig.bin");
    let mut signature = vec![0x00, 0x14, 0x00, 0x0b];
    tpm2b(&mut signature, &raw);
    let mut pcrs = [[0u8; 32]; 24];
    for (pcr, value) in pcrs
        .iter_mut()
        .zip(az_vector(name, "tpm-pcrs-sha256.bin").chunks_exact(32))
    {
        pcr.copy_from_slice(value);
    }
    crate::tee::azure::az_evidence_json(
        &QuoteParts {
            message: az_vector(name, "tpm-quote.msg.bin"),
            signature,
            raw_signature: raw,
            pcrs,
        },
        &az_vector(name, "hcl-report.bin"),
        &az_vector(name, "vcek.der"),
    )
}

fn az_v2_evidence() -> Value {
    az_evidence("v2")
}

fn az_v2_nonce() -> Vec<u8> {
    hex::decode(AZ_V2_NONCE).unwrap()
}

fn az_v2_ak() -> Vec<u8> {
    crate::tee::azure::parse_hcl_report(&az_vector("v2", "hcl-report.bin"))
        .unwrap()
        .ak_public
}

#[test]
fn az_snp_vtpm_v2_vector_verifies_against_its_own_report_data() {
    let nonce = az_v2_nonce();
    let result = check_evidence("az-snp-vtpm", &az_v2_evidence(), &nonce).unwrap();
    for want in [
        "SNP report (VMPL 0) of the HCL report signed by the VCEK of the evidence, which chains \
         to the built-in milan chain"
            .to_string(),
        "SHA-256 of the HCL report's variable data = REPORT_DATA[..32] (it carries HCLAkPub \
         and user-data)"
            .to_string(),
        "HCL user-data = the report data followed by zero bytes".to_string(),
        format!(
            "vtpm quote signature by HCLAkPub {} (RSASSA SHA-256)",
            Digest::of(&az_v2_ak())
        ),
        "the quote selects sha256:0-23 and pcrs 0-23 match its pcrDigest".to_string(),
        "quote extraData = first 48 bytes of the report data".to_string(),
    ] {
        assert!(result.verified.contains(&want), "{want}: {result:?}");
    }
    assert!(result.warnings.is_empty(), "{result:?}");
    let snp = result.snp.unwrap();
    assert!(snp.verified);
    assert_eq!(snp.vmpl, 0);
    assert_eq!(
        snp.measurement,
        hex::encode(&az_vector("v2", "snp-report.bin")[0x90..0xc0])
    );
    let tpm = result.tpm.unwrap();
    assert_eq!(tpm.ak_public, az_v2_ak());
    assert_eq!(tpm.pcrs.concat(), az_vector("v2", "tpm-pcrs-sha256.bin"));

    // A 64-byte binding: user-data is all of it, the quote's extraData its first 48 bytes.
    let mut binding = [0u8; 64];
    binding[..48].copy_from_slice(&nonce);
    let result = check_evidence("az-snp-vtpm", &az_v2_evidence(), &binding).unwrap();
    assert!(result
        .verified
        .contains(&"HCL user-data = the report data".to_string()));
}

#[test]
fn az_snp_vtpm_evidence_for_another_binding_is_rejected() {
    let evidence = az_v2_evidence();
    let user_data = format!("{AZ_V2_NONCE}{}", "00".repeat(16));
    let mut other = az_v2_nonce();
    other[47] ^= 1;
    let err = check_evidence("az-snp-vtpm", &evidence, &other).unwrap_err();
    assert_eq!(
        err,
        format!(
            "HCL report user-data is {user_data}, expected {}{} (the report data followed by \
             zero bytes): the paravisor's report was not made for this binding",
            hex::encode(&other),
            "00".repeat(16)
        )
    );
    // A checkpoint binding with the same first 48 bytes: its last 16 are not zero.
    let mut binding = [0x5au8; 64];
    binding[..48].copy_from_slice(&az_v2_nonce());
    let err = check_evidence("az-snp-vtpm", &evidence, &binding).unwrap_err();
    assert!(
        err.starts_with(&format!("HCL report user-data is {user_data}, expected "))
            && err.contains("(the report data): the paravisor's report"),
        "{err}"
    );

    // The real Genoa vector verifies to AMD's built-in Genoa chain (else the error would be
    // about the VCEK), then fails on its all-zero user-data...
    let genoa = az_evidence("genoa");
    let err = check_evidence("az-snp-vtpm", &genoa, &az_v2_nonce()).unwrap_err();
    assert!(
        err.starts_with(&format!(
            "HCL report user-data is {}, expected ",
            "00".repeat(64)
        )),
        "{err}"
    );
    // ... and with a zero binding (matching that user-data) on its quote's extraData.
    let err = check_evidence("az-snp-vtpm", &genoa, &[0u8; 48]).unwrap_err();
    assert!(
        err.starts_with("vtpm quote extraData is 0218488b")
            && err.contains(&format!(
                "expected {} (the first 48 bytes of the report data)",
                "00".repeat(48)
            ))
            && err.contains("the ak is the HCL report's HCLAkPub sha256:"),
        "{err}"
    );
}

#[test]
fn az_snp_vtpm_evidence_that_does_not_verify_is_rejected() {
    let nonce = az_v2_nonce();
    let edited = |edit: &dyn Fn(&mut crate::tee::azure::AzEvidence)| {
        let mut az = crate::tee::azure::AzEvidence::from_json(&az_v2_evidence()).unwrap();
        edit(&mut az);
        let mut signature = vec![0x00, 0x14, 0x00, 0x0b];
        tpm2b(&mut signature, &az.quote_signature);
        let evidence = crate::tee::azure::az_evidence_json(
            &QuoteParts {
                message: az.quote_message.clone(),
                signature,
                raw_signature: az.quote_signature.clone(),
                pcrs: az.pcrs.clone().try_into().unwrap(),
            },
            &az.hcl_report,
            &az.vcek,
        );
        check_evidence("az-snp-vtpm", &evidence, &nonce).unwrap_err()
    };
    // Another chip's VCEK (Genoa): the SNP report, hence HCLAkPub and user-data, is unproven.
    let err = edited(&|az| az.vcek = az_vector("genoa", "vcek.der"));
    assert!(
        err.starts_with(
            "the SNP report of the HCL report does not verify with the VCEK of the evidence \
             (built-in milan chain: "
        ) && err.contains("built-in genoa chain: ")
            && err.contains("built-in turin chain: ")
            && err
                .ends_with("without that signature neither HCLAkPub nor user-data can be trusted"),
        "{err}"
    );
    // One bit of the variable data (HCLAkPub, user-data; it starts after the 32-byte header,
    // the 1184-byte report and the 20-byte request data header) breaks its binding to the
    // report.
    let err = edited(&|az| az.hcl_report[32 + 1184 + 20 + 10] ^= 1);
    assert!(err.contains("REPORT_DATA[..32]"), "{err}");
    // One bit of the quote's signature, or of a PCR value.
    let err = edited(&|az| az.quote_signature[9] ^= 1);
    assert!(
        err.starts_with("vtpm quote does not verify: ")
            && err.contains("the ak is the HCL report's HCLAkPub"),
        "{err}"
    );
    let err = edited(&|az| az.pcrs[3][0] ^= 1);
    assert!(err.starts_with("vtpm quote does not verify: "), "{err}");
    // Not the version 2 shape.
    let mut old = az_v2_evidence();
    old["version"] = json!(1);
    let err = check_evidence("az-snp-vtpm", &old, &nonce).unwrap_err();
    assert!(err.contains("version is 1, expected 2"), "{err}");
}

#[test]
fn an_az_snp_vtpm_log_runs_the_real_checks_up_to_the_user_data() {
    // The vector's report data cannot be our exchange binding: the exchange is refused on
    // its user-data (its VCEK signature, which the check verifies first, holds).
    let built = build(Tee::AzSnpVtpm, Tamper::Nothing);
    let reason = rejected_at(&built, built.attested_seq);
    assert!(
        reason.starts_with(&format!(
            "broker exchange evidence (az-snp-vtpm): HCL report user-data is {AZ_V2_NONCE}{}, \
             expected ",
            "00".repeat(16)
        )) && reason.ends_with(
            "(the report data followed by zero bytes): the paravisor's report was not made \
             for this binding"
        ),
        "{reason}"
    );
}

/// The vTPM quote's extraData is the binding's first 48 bytes (a tpm quote's: 32).
#[test]
fn vtpm_quote_extra_data_is_the_first_48_bytes() {
    let mut binding = [0u8; 64];
    for (i, b) in binding.iter_mut().enumerate() {
        *b = 0x40 + u8::try_from(i).unwrap();
    }
    let pcrs = pcr_values([9; 32]).to_vec();
    let quote = tpm_quote(ak(0), &binding[..48], pcr_values([9; 32]));
    let field = |name: &str| {
        STANDARD
            .decode(quote["tpm_quote"][name].as_str().unwrap())
            .unwrap()
    };
    let (msg, sig) = (field("message"), field("signature"));
    let facts = verify_pcr_quote(&msg, &sig, &ak(0).spki, pcrs.clone(), &binding, 48).unwrap();
    assert_eq!(facts.ak_public, ak(0).spki);
    assert_eq!(facts.pcrs, pcrs);
    assert_eq!(
        (facts.clock, facts.reset_count, facts.restart_count),
        (42_000, 1, 0)
    );
    let err = verify_pcr_quote(&msg, &sig, &ak(0).spki, pcrs.clone(), &binding, 32).unwrap_err();
    assert!(
        err.contains("(the first 32 bytes of the report data)"),
        "{err}"
    );
    let mut other = binding;
    other[47] ^= 1;
    let err = verify_pcr_quote(&msg, &sig, &ak(0).spki, pcrs, &other, 48).unwrap_err();
    assert!(
        err.starts_with(&format!(
            "quote extraData is {}, expected {} (the first 48 bytes of the report data)",
            hex::encode(&binding[..48]),
            hex::encode(&other[..48])
        )),
        "{err}"
    );
}

/// The checkpoint rules of az-snp-vtpm, on the verified parts of the real v2 evidence: the
/// same SNP guest (measurement, chip_id, …), the same AK and boot, PCRs 0-14 unchanged, PCR
/// 15 = the event log's replay.
#[test]
fn az_snp_vtpm_checkpoint_rules_apply_to_the_verified_parts() {
    let verified = check_evidence("az-snp-vtpm", &az_v2_evidence(), &az_v2_nonce()).unwrap();
    let exchange = |events: Vec<Digest>| Exchange {
        hash: Digest::of(b"the exchange record"),
        tee: "az-snp-vtpm".to_string(),
        tpm: verified.tpm.clone(),
        snp: verified.snp.clone(),
        tdx: None,
        event_digests: Ok(events),
        register_initial: Digest::ZERO,
        finding: 0,
        checkpointed: false,
    };
    // The vector itself: PCR 15 is zero, the replay of an empty event log.
    let mut same = verified.clone();
    same_origin(&exchange(Vec::new()), 7, &mut same).unwrap();
    for want in [
        "measurement, chip_id, policy, host_data, reported_tcb, vmpl and report_id equal the \
         exchange report's (the same guest)",
        "the same ak signed the exchange and the checkpoint",
        "pcrs 0-14 equal the exchange quote's",
        "pcr 15 = replay of the 0 event log digest(s) of seq 7",
    ] {
        assert!(same.verified.iter().any(|v| v == want), "{want}: {same:?}");
    }

    // A later quote in the same boot, after two logged extends of PCR 15.
    let events = vec![Digest::of(b"policy"), Digest::of(b"bundle")];
    let replay = events
        .iter()
        .fold(Digest::ZERO, |v, d| SimulatedPcr::extended(&v, d));
    let mut later = verified.clone();
    {
        let tpm = later.tpm.as_mut().unwrap();
        tpm.pcrs[usize::from(APP_PCR)] = replay.0;
        tpm.clock += 1500;
    }
    let mut ok = later.clone();
    same_origin(&exchange(events.clone()), 7, &mut ok).unwrap();
    assert!(ok
        .verified
        .iter()
        .any(|v| v == "pcr 15 = replay of the 2 event log digest(s) of seq 7"));

    let rejected = |edit: &dyn Fn(&mut EvidenceResult)| {
        let mut result = later.clone();
        edit(&mut result);
        same_origin(&exchange(events.clone()), 7, &mut result).unwrap_err()
    };
    let cases: Vec<(String, &str)> = vec![
        (
            rejected(&|r| r.snp.as_mut().unwrap().measurement = "00".repeat(48)),
            "checkpoint report measurement is 0000",
        ),
        (
            rejected(&|r| r.snp.as_mut().unwrap().chip_id = "11".repeat(64)),
            "checkpoint report chip_id is 1111",
        ),
        (
            rejected(&|r| r.tpm.as_mut().unwrap().ak_public = ak(0).spki.clone()),
            "checkpoint quote is signed by ak sha256:",
        ),
        (
            rejected(&|r| r.tpm.as_mut().unwrap().reset_count += 1),
            "checkpoint quote has resetCount",
        ),
        (
            rejected(&|r| r.tpm.as_mut().unwrap().pcrs[4][0] ^= 1),
            "pcr 4 in the checkpoint quote is ",
        ),
        (
            rejected(&|r| r.tpm.as_mut().unwrap().pcrs[usize::from(APP_PCR)] = [0; 32]),
            "pcr 15 in the checkpoint quote is 0000",
        ),
    ];
    for (err, want) in cases {
        assert!(
            err.starts_with(want) && err.contains("seq 7"),
            "{want}: {err}"
        );
    }
    // An exchange without the parts to compare with is an error, not a pass.
    let mut no_snp = exchange(events.clone());
    no_snp.snp = None;
    let err = same_origin(&no_snp, 7, &mut later.clone()).unwrap_err();
    assert!(err.contains("has no sev-snp report"), "{err}");
    let mut no_tpm = exchange(events);
    no_tpm.tpm = None;
    let err = same_origin(&no_tpm, 7, &mut later.clone()).unwrap_err();
    assert!(err.contains("has no tpm quote"), "{err}");
}

#[path = "verdict_tests.rs"]
mod verdict;
