//! Coverage verdicts on whole runs written through the daemon's own audit log, and the
//! red-team logs of issue 8: a forger who can write the whole file must never get exit 0.

use std::io::Cursor;
use std::path::Path;

use cvm_warden_verify::check::Pins;
use cvm_warden_verify::verdict::{verify_log_from, Outcome, Verdict};

use super::*;
use crate::audit::{encode, run_verify_command, Fields, Record};

const POLICY: &str = "policy";
const BUNDLE: &str = "bundle";

/// How far a simulated boot gets its checkpoints written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Checkpoints {
    /// Exchange, launch and closing checkpoints.
    All,
    /// Exchange and launch checkpoints, no closing one (the TEE stopped answering).
    NoClosing,
}

/// A TPM boot as the daemon writes it: measure, broker exchange + checkpoint, launch
/// checkpoint, the workload's end, power-off and the closing checkpoint. Quotes by
/// `ak(0)`; PCR 15 = replay of the event log.
struct Boot {
    audit: Audit,
    pcr: SimulatedPcr,
    log: EventLog,
    clock: u64,
    /// The exchange's `additional_evidence` (GPU evidence; empty: none).
    additional: String,
}

impl Boot {
    fn new() -> Boot {
        let (sink, _) = MemorySink::new();
        let audit = Audit::with_clock(vec![Box::new(sink)], false, ticking_clock());
        Boot {
            audit,
            pcr: SimulatedPcr::default(),
            log: EventLog::new(),
            clock: EXCHANGE_QUOTE.clock,
            additional: String::new(),
        }
    }

    fn quote(&mut self, extra: &[u8]) -> Value {
        self.clock += 1000;
        let spec = QuoteSpec {
            clock: self.clock,
            ..EXCHANGE_QUOTE
        };
        tpm_quote_with(ak(0), extra, pcr_values(self.pcr.value.0), spec)
    }

    fn checkpoint(&mut self, kind: &str) {
        let head = self.audit.head();
        let binding = checkpoint_binding(&head);
        let evidence = self.quote(&binding[..32]);
        self.audit
            .record(
                "audit",
                "checkpoint",
                json!({
                    "kind": kind,
                    "head_seq": self.audit.seq() - 1,
                    "head": head,
                    "report_data": hex::encode(binding),
                    "tee": {"tee": "tpm"},
                    "evidence": {"tee": "tpm", "evidence": evidence},
                    "event_log": self.log.events(),
                    "register_initial": Value::Null,
                }),
            )
            .unwrap();
    }

    fn run(mut self, checkpoints: Checkpoints, code: i32) -> Vec<String> {
        let a = self.audit.clone();
        a.record(
            "boot",
            "start",
            json!({"policy_digest": Digest::of(POLICY.as_bytes())}),
        )
        .unwrap();
        self.log
            .measure(
                &mut self.pcr,
                EventKind::Policy,
                Digest::of(POLICY.as_bytes()),
                "policy",
            )
            .unwrap();
        self.log
            .measure(
                &mut self.pcr,
                EventKind::Bundle,
                Digest::of(BUNDLE.as_bytes()),
                "bundle",
            )
            .unwrap();
        a.record(
            "measure",
            "ok",
            json!({"bundle_digest": Digest::of(BUNDLE.as_bytes())}),
        )
        .unwrap();
        let nonce = EXCHANGE_NONCE.to_string();
        let tee_pubkey = exchange_pubkey();
        let report_data = binding::report_data(&nonce, &tee_pubkey, &self.additional).unwrap();
        let evidence = self.quote(&report_data[..32]);
        let head = a
            .record(
                "attest",
                "attested",
                json!({
                    "broker": "https://kbs.example",
                    "tee": {"tee": "tpm"},
                    "exchange": {
                        "broker": "https://kbs.example", "tee": "tpm", "insecure": false,
                        "nonce": nonce, "tee_pubkey": tee_pubkey,
                        "additional_evidence": self.additional,
                        "report_data": hex::encode(report_data),
                        "evidence": evidence, "claims": {}, "status": "affirming",
                    },
                    "event_log": self.log.events(),
                    "register_initial": Value::Null,
                    "event_log_accumulator": self.log.accumulator(),
                }),
            )
            .unwrap();
        let binding = checkpoint_binding(&head);
        let evidence = self.quote(&binding[..32]);
        a.record(
            "attest",
            "ok",
            json!({"attested": true, "checkpoint": {
                "head_seq": a.seq() - 1, "head": head, "report_data": hex::encode(binding),
                "evidence": {"tee": "tpm", "evidence": evidence},
            }}),
        )
        .unwrap();
        a.record("unlock", "ok", json!({})).unwrap();
        a.record("launch", "started", json!({"pid": 42})).unwrap();
        self.checkpoint("launch");
        a.record("launch", "workload_done", json!({"code": code}))
            .unwrap();
        a.record("shutdown", "poweroff", json!({})).unwrap();
        if checkpoints == Checkpoints::All {
            self.checkpoint("closing");
        }
        a.lines()
    }
}

/// The broker nonce and ephemeral key of [`Boot`]'s exchange.
const EXCHANGE_NONCE: &str = "bm9uY2U=";

fn exchange_pubkey() -> Value {
    json!({"kty": "EC", "crv": "P-256", "x": "AA", "y": "BB"})
}

fn text(lines: &[String]) -> Vec<u8> {
    lines
        .iter()
        .flat_map(|l| format!("{l}\n").into_bytes())
        .collect()
}

fn trusted() -> Pins {
    Pins {
        trusted_ak: Some(ak(0).spki.clone()),
        ..Pins::default()
    }
}

fn outcome(bytes: &[u8], pins: Pins) -> Result<Outcome, VerifyError> {
    verify_log_from(Cursor::new(bytes), Path::new("test.jsonl"), pins)
}

/// Re-chains `lines` from index `from` on, as a forger who rewrites the tail would: every
/// record keeps its fields, `prev` and `hash` are recomputed.
fn rechain(lines: &mut [String], from: usize, edit: impl Fn(&mut Record)) {
    for i in from..lines.len() {
        let mut record = parse(&lines[i]);
        if i == from {
            edit(&mut record);
        }
        let prev = if i == 0 {
            Digest::ZERO
        } else {
            parse(&lines[i - 1]).hash
        };
        let details = Value::Object(record.details.clone());
        lines[i] = encode(&Fields {
            seq: record.seq,
            time: UNIX_EPOCH,
            stage: &record.stage,
            event: &record.event,
            details: &details,
            insecure: record.insecure,
            prev,
        })
        .unwrap()
        .line;
    }
}

/// A record's fields as written, whether or not its hash still holds.
fn parse(line: &str) -> Record {
    serde_json::from_str(line).unwrap()
}

#[test]
fn a_fully_checkpointed_tpm_boot_with_the_trusted_ak_is_attested() {
    let lines = Boot::new().run(Checkpoints::All, 0);
    let result = outcome(&text(&lines), trusted()).unwrap();
    assert_eq!(result.runs.len(), 1);
    assert_eq!(result.runs[0].verdict, Verdict::Attested, "{result:#?}");
    assert_eq!(result.exit_code(), 0);
    assert!(result
        .evidence
        .iter()
        .any(|f| f.run == 1 && f.what.starts_with("closing checkpoint of seq")));
}

#[test]
fn without_the_trusted_ak_a_tpm_boot_proves_nothing() {
    let lines = Boot::new().run(Checkpoints::All, 0);
    let result = outcome(&text(&lines), Pins::default()).unwrap();
    match &result.runs[0].verdict {
        Verdict::Unattested { reason } => {
            assert!(reason.contains("--trusted-ak"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(result.exit_code(), 3);
}

#[test]
fn another_trusted_ak_breaks_the_log() {
    let lines = Boot::new().run(Checkpoints::All, 0);
    let pins = Pins {
        trusted_ak: Some(ak(1).spki.clone()),
        ..Pins::default()
    };
    let err = outcome(&text(&lines), pins).unwrap_err();
    assert!(err.to_string().contains("not the trusted ak"), "{err}");
}

#[test]
fn records_after_the_last_checkpoint_are_named_not_attested() {
    let lines = Boot::new().run(Checkpoints::NoClosing, 0);
    let result = outcome(&text(&lines), trusted()).unwrap();
    let run = &result.runs[0];
    // ..., launch/started, audit/checkpoint (launch), workload_done, poweroff.
    let launch_checkpoint_head = run.last_seq - 3;
    assert_eq!(
        run.verdict,
        Verdict::AttestedUpTo {
            seq: launch_checkpoint_head
        }
    );
    let named: Vec<(u64, &str)> = run
        .not_attested
        .iter()
        .map(|r| (r.seq, r.event.as_str()))
        .collect();
    assert_eq!(
        named,
        [
            (run.last_seq - 1, "workload_done"),
            (run.last_seq, "poweroff")
        ]
    );
    assert_eq!(result.exit_code(), 3);
}

/// Red team 1: a real log with a second, re-chained run appended whose attest records are
/// renamed and whose workload "succeeded". The forged run is unattested; the first run's
/// evidence is named with its own run.
#[test]
fn an_appended_forged_run_is_unattested_and_evidence_names_its_run() {
    let real = Boot::new().run(Checkpoints::All, 1);
    let mut forged = real.clone();
    for line in forged.iter_mut() {
        *line = line
            .replace("\"stage\":\"attest\"", "\"stage\":\"attest_\"")
            .replace(
                "\"stage\":\"audit\",\"event\":\"checkpoint\"",
                "\"stage\":\"audit\",\"event\":\"note\"",
            )
            .replace("\"code\":1", "\"code\":0");
    }
    rechain(&mut forged, 0, |_| {});
    let mut all = real.clone();
    all.extend(forged);
    let result = outcome(&text(&all), trusted()).unwrap();
    assert_eq!(result.runs.len(), 2);
    assert_eq!(result.runs[0].verdict, Verdict::Attested);
    assert!(
        matches!(result.runs[1].verdict, Verdict::Unattested { .. }),
        "{:?}",
        result.runs[1].verdict
    );
    assert_eq!(result.exit_code(), 3);
    assert!(result.evidence.iter().all(|f| f.run == 1), "{result:#?}");
    let mut out = Vec::new();
    print_outcome(&text(&all), &mut out);
    let printed = String::from_utf8(out).unwrap();
    for line in printed
        .lines()
        .filter(|l| l.contains(" seq ") && l.ends_with(':'))
    {
        assert!(line.trim_start().starts_with("run 1 seq "), "{line}");
    }
}

fn print_outcome(bytes: &[u8], out: &mut Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log.jsonl");
    std::fs::write(&path, bytes).unwrap();
    let code = run_verify_command(&path, trusted(), false, out).unwrap();
    assert_eq!(code, 3);
}

/// Red team 2: a hand-written five-record log without any evidence.
#[test]
fn a_hand_written_log_without_evidence_is_unattested() {
    let (sink, _) = MemorySink::new();
    let audit = Audit::with_clock(vec![Box::new(sink)], false, ticking_clock());
    audit.record("boot", "start", json!({})).unwrap();
    audit.record("measure", "ok", json!({})).unwrap();
    audit.record("attest", "ok", json!({})).unwrap();
    audit
        .record("launch", "workload_done", json!({"code": 0}))
        .unwrap();
    audit.record("shutdown", "poweroff", json!({})).unwrap();
    for pins in [Pins::default(), trusted()] {
        let result = outcome(&text(&audit.lines()), pins).unwrap();
        assert!(
            matches!(result.runs[0].verdict, Verdict::Unattested { .. }),
            "{result:?}"
        );
        assert!(result.runs[0].complete);
        assert_eq!(result.exit_code(), 3);
    }
}

/// Red team 3: a real log spliced with forged records. Re-chaining from the splice on
/// cannot move the checkpoints' heads: broken. Dropping the checkpoints after the splice
/// leaves the spliced records not attested.
#[test]
fn a_spliced_real_log_is_broken_or_not_attested_never_attested() {
    let real = Boot::new().run(Checkpoints::All, 1);
    let done = real
        .iter()
        .position(|l| l.contains("\"event\":\"workload_done\""))
        .unwrap();

    // The workload's exit code changed and everything after re-chained.
    let mut spliced = real.clone();
    rechain(&mut spliced, done, |r| {
        r.details.insert("code".into(), json!(0));
    });
    let err = outcome(&text(&spliced), trusted()).unwrap_err();
    assert!(err.to_string().contains("evidence check failed"), "{err}");

    // Spliced without re-chaining: the chain itself breaks.
    let mut cut = real.clone();
    cut[done] = cut[done].replace("\"code\":1", "\"code\":0");
    assert!(outcome(&text(&cut), trusted()).is_err());

    // The closing checkpoint dropped and the spliced records re-chained.
    let mut dropped = real[..real.len() - 1].to_vec();
    rechain(&mut dropped, done, |r| {
        r.details.insert("code".into(), json!(0));
    });
    let result = outcome(&text(&dropped), trusted()).unwrap();
    assert!(
        matches!(result.runs[0].verdict, Verdict::AttestedUpTo { .. }),
        "{:?}",
        result.runs[0].verdict
    );
    assert!(result.runs[0]
        .not_attested
        .iter()
        .any(|r| r.event == "workload_done"));
    assert_eq!(result.exit_code(), 3);
}

#[test]
fn pinned_policy_and_bundle_digests_must_match() {
    let lines = Boot::new().run(Checkpoints::All, 0);
    let mut pins = trusted();
    pins.policy = Some(Digest::of(POLICY.as_bytes()));
    pins.bundle = Some(Digest::of(BUNDLE.as_bytes()));
    assert_eq!(outcome(&text(&lines), pins.clone()).unwrap().exit_code(), 0);

    let mut wrong = pins.clone();
    wrong.policy = Some(Digest::of(b"another policy"));
    let err = outcome(&text(&lines), wrong).unwrap_err();
    assert!(err.to_string().contains("--expect-policy"), "{err}");

    let mut wrong = pins;
    wrong.bundle = Some(Digest::of(b"another bundle"));
    let err = outcome(&text(&lines), wrong).unwrap_err();
    assert!(err.to_string().contains("--expect-bundle"), "{err}");
}

#[test]
fn a_pinned_snp_measurement_needs_snp_evidence() {
    let lines = Boot::new().run(Checkpoints::All, 0);
    let mut pins = trusted();
    pins.snp_measurement = Some(vec![0; 48]);
    let err = outcome(&text(&lines), pins).unwrap_err();
    assert!(err.to_string().contains("--snp-measurement"), "{err}");
}

#[test]
fn a_checkpoint_must_cover_the_record_just_before_it() {
    let mut lines = Boot::new().run(Checkpoints::All, 0);
    let last = lines.len() - 1;
    rechain(&mut lines, last, |r| {
        let seq = r.details["head_seq"].as_u64().unwrap();
        r.details.insert("head_seq".into(), json!(seq - 1));
    });
    let err = outcome(&text(&lines), trusted()).unwrap_err();
    assert!(
        err.to_string().contains("covers the record just before it"),
        "{err}"
    );
}

#[test]
fn json_output_carries_the_verdicts_and_exit_code() {
    let lines = Boot::new().run(Checkpoints::NoClosing, 0);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log.jsonl");
    std::fs::write(&path, text(&lines)).unwrap();
    let mut out = Vec::new();
    let code = run_verify_command(&path, trusted(), true, &mut out).unwrap();
    assert_eq!(code, 3);
    let value: Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(value["exit_code"], 3);
    assert_eq!(value["runs"][0]["verdict"], "attested-up-to");
    assert_eq!(
        value["runs"][0]["not_attested"][0]["event"],
        "workload_done"
    );
    assert_eq!(value["evidence"][0]["run"], 1);
}

/// Review finding: a run with a second broker exchange (from another TEE boot the forger
/// controls) is broken, never covered by the second exchange's checkpoints.
#[test]
fn a_second_broker_exchange_in_a_run_is_refused() {
    let real = Boot::new().run(Checkpoints::All, 0);
    let exchange = real
        .iter()
        .position(|l| l.contains("\"event\":\"attested\""))
        .unwrap();
    let done = real
        .iter()
        .position(|l| l.contains("\"event\":\"workload_done\""))
        .unwrap();
    // The exchange record inserted again before the workload's end, the rest re-chained.
    let mut rebuilt = real[..done].to_vec();
    for (offset, line) in std::iter::once(&real[exchange])
        .chain(real[done..].iter())
        .enumerate()
    {
        let record = parse(line);
        let prev = parse(rebuilt.last().unwrap()).hash;
        let details = Value::Object(record.details.clone());
        rebuilt.push(
            encode(&Fields {
                seq: (done + offset) as u64,
                time: UNIX_EPOCH,
                stage: &record.stage,
                event: &record.event,
                details: &details,
                insecure: false,
                prev,
            })
            .unwrap()
            .line,
        );
    }
    let err = outcome(&text(&rebuilt), trusted()).unwrap_err();
    assert!(
        err.to_string()
            .contains("a second broker exchange in this run"),
        "{err}"
    );
}

/// Review finding: a good run copied (to stand for a bad one) is found: two runs cannot
/// come from the same TEE boot.
#[test]
fn a_copied_run_is_refused() {
    let real = Boot::new().run(Checkpoints::All, 0);
    let mut twice = real.clone();
    twice.extend(real);
    let err = outcome(&text(&twice), trusted()).unwrap_err();
    assert!(
        err.to_string()
            .contains("comes from the same TEE boot as run 1"),
        "{err}"
    );
}

/// Review finding: a line that other tools would read as JSON is judged as a record, not
/// skipped like console output.
#[test]
fn a_json_looking_line_is_not_skipped() {
    let mut lines = Boot::new().run(Checkpoints::All, 0);
    lines.insert(3, "{ \"seq\": 3, \"stage\": \"launch\" }".to_string());
    assert!(outcome(&text(&lines), trusted()).is_err());
}

/// A checkpoint whose event log rewrites the exchange's events (descriptions, kinds) or its
/// register start is refused, although only the digests are replayed.
#[test]
fn a_checkpoint_may_not_rewrite_the_exchange_events() {
    let mut lines = Boot::new().run(Checkpoints::All, 0);
    let last = lines.len() - 1;
    rechain(&mut lines, last, |r| {
        r.details["event_log"][0]["description"] = json!("something else");
    });
    let err = outcome(&text(&lines), trusted()).unwrap_err();
    assert!(
        err.to_string().contains("measurements were rewritten"),
        "{err}"
    );
}

mod gpu {
    //! GPU evidence in the exchange's `additional_evidence`: verified per device with the
    //! exchange's device nonce, up to NVIDIA's pinned root; a GPU rooted elsewhere (only with
    //! `--gpu-root`) leaves the run "not proven", never attested.

    use base64::engine::general_purpose::STANDARD;
    use base64::Engine;
    use cvm_warden_verify::evidence::nvidia::{decode_report, forge};
    use cvm_warden_verify::schema::{AdditionalEvidence, DeviceEvidence, NvidiaEvidence};

    use super::*;

    fn nvtrust_report() -> Vec<u8> {
        decode_report(include_bytes!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/verify/tests/vectors/nvidia/nvtrust/hopperAttestationReport.txt"
        )))
        .unwrap()
    }

    const NVTRUST_CHAIN: &[u8] = include_bytes!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/verify/tests/vectors/nvidia/nvtrust/hopperCertChain.txt"
    ));

    fn device_nonce() -> [u8; 32] {
        binding::device_nonce(EXCHANGE_NONCE, &exchange_pubkey()).unwrap()
    }

    fn additional(arch: &str, report: &[u8], chain: &[u8]) -> String {
        serde_json::to_string(&AdditionalEvidence {
            nvidia: NvidiaEvidence {
                device_evidence_list: vec![DeviceEvidence {
                    arch: arch.to_string(),
                    uuid: "GPU-test".to_string(),
                    evidence: STANDARD.encode(report),
                    certificate: STANDARD.encode(chain),
                }],
            },
        })
        .unwrap()
    }

    fn boot_with(additional: String) -> Vec<u8> {
        let mut boot = Boot::new();
        boot.additional = additional;
        text(&boot.run(Checkpoints::All, 0))
    }

    fn with_gpu_root(root_pem: &[u8]) -> Pins {
        Pins {
            gpu_root: Some(root_pem.to_vec()),
            ..trusted()
        }
    }

    #[test]
    fn a_gpu_at_a_test_root_leaves_an_otherwise_attested_boot_not_proven() {
        let (report, chain) = forge::evidence(&nvtrust_report(), &device_nonce());
        let log = boot_with(additional("HOPPER", &report, &chain.chain_pem));
        let result = outcome(&log, with_gpu_root(&chain.root_pem)).unwrap();
        match &result.runs[0].verdict {
            Verdict::Unattested { reason } => {
                assert!(reason.contains("GPU 0 (HOPPER, uuid GPU-test)"), "{reason}");
                assert!(reason.contains("--gpu-root"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(result.exit_code(), 3);
        let exchange = &result.evidence[0];
        assert!(
            exchange.verified.iter().any(|v| v.contains("GPU 0")
                && v.contains("NOT NVIDIA's")
                && v.contains("driver 550.90.07")),
            "{exchange:#?}"
        );
        // The same boot without GPU evidence is attested: the GPU alone made the difference.
        let plain = outcome(&boot_with(String::new()), with_gpu_root(&chain.root_pem)).unwrap();
        assert_eq!(plain.exit_code(), 0);
    }

    #[test]
    fn without_the_gpu_root_pin_the_test_root_is_unknown_and_the_log_broken() {
        let (report, chain) = forge::evidence(&nvtrust_report(), &device_nonce());
        let log = boot_with(additional("HOPPER", &report, &chain.chain_pem));
        let err = outcome(&log, trusted()).unwrap_err().to_string();
        assert!(err.contains("GPU 0 (HOPPER, uuid GPU-test)"), "{err}");
        assert!(err.contains("not NVIDIA's device identity root"), "{err}");
    }

    #[test]
    fn gpu_evidence_that_does_not_verify_breaks_the_exchange_naming_the_gpu() {
        let (report, chain) = forge::evidence(&nvtrust_report(), &device_nonce());
        let pins = with_gpu_root(&chain.root_pem);
        // Made for another nonce.
        let (other, other_chain) = forge::evidence(&nvtrust_report(), &[1; 32]);
        let err = outcome(
            &boot_with(additional("HOPPER", &other, &other_chain.chain_pem)),
            with_gpu_root(&other_chain.root_pem),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("GPU 0") && err.contains("GPU nonce mismatch"),
            "{err}"
        );
        assert!(err.contains(&hex::encode(device_nonce())), "{err}");
        // One flipped byte in the driver version.
        let mut tampered = report.clone();
        let at = tampered.windows(9).position(|w| w == b"550.90.07").unwrap();
        tampered[at] = b'6';
        let err = outcome(
            &boot_with(additional("HOPPER", &tampered, &chain.chain_pem)),
            pins.clone(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("GPU 0") && err.contains("signature does not verify"),
            "{err}"
        );
        // The evidence says Blackwell, the certificate is a Hopper's.
        let err = outcome(
            &boot_with(additional("BLACKWELL", &report, &chain.chain_pem)),
            pins,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("says arch BLACKWELL"), "{err}");
    }

    #[test]
    fn a_real_gpu_report_for_another_nonce_is_refused_after_its_chain_and_signature_verify() {
        let log = boot_with(additional("HOPPER", &nvtrust_report(), NVTRUST_CHAIN));
        let err = outcome(&log, trusted()).unwrap_err().to_string();
        assert!(err.contains("GPU nonce mismatch"), "{err}");
        assert!(
            err.contains("931d8dd0add203ac3d8b4fbde75e115278eefcdceac5b87671a748f32364dfcb"),
            "{err}"
        );
    }

    #[test]
    fn additional_evidence_of_another_shape_breaks_the_exchange() {
        let log = boot_with(r#"{"nvidia":{"devices":[]}}"#.to_string());
        let err = outcome(&log, trusted()).unwrap_err().to_string();
        assert!(err.contains("exchange.additional_evidence is not"), "{err}");
    }
}
