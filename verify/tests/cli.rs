//! `cvm-warden-verify audit`: exit statuses and output of the auditor's binary.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;
use std::time::UNIX_EPOCH;

use cvm_warden_verify::digest::Digest;
use cvm_warden_verify::record::{encode, Fields};
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_cvm-warden-verify");

/// A chained log of `(stage, event, details)` records.
fn log(records: &[(&str, &str, Value)]) -> String {
    let mut prev = Digest::ZERO;
    let mut text = String::new();
    for (seq, (stage, event, details)) in records.iter().enumerate() {
        let line = encode(&Fields {
            seq: seq as u64,
            time: UNIX_EPOCH,
            stage,
            event,
            details,
            insecure: false,
            prev,
        })
        .unwrap();
        prev = line.hash;
        text.push_str(&line.line);
        text.push('\n');
    }
    text
}

fn hand_written() -> String {
    log(&[
        ("boot", "start", json!({})),
        ("measure", "ok", json!({})),
        ("attest", "ok", json!({})),
        ("launch", "workload_done", json!({"code": 0})),
        ("shutdown", "poweroff", json!({})),
    ])
}

fn verify(text: &str, args: &[&str]) -> (Option<i32>, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    std::fs::write(&path, text).unwrap();
    let out = Command::new(BIN)
        .arg("audit")
        .arg(&path)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn an_intact_log_without_evidence_exits_3_never_0() {
    let (code, stdout, _) = verify(&hand_written(), &[]);
    assert_eq!(code, Some(3), "{stdout}");
    assert!(
        stdout.starts_with("run 1: unattested (no broker exchange"),
        "{stdout}"
    );
    assert!(
        stdout.ends_with("verdict: 0 of 1 run(s) attested; exit 3\n"),
        "{stdout}"
    );
}

#[test]
fn json_verdicts_for_machines() {
    let (code, stdout, _) = verify(&hand_written(), &["--json"]);
    assert_eq!(code, Some(3));
    let value: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(value["exit_code"], 3);
    assert_eq!(value["runs"][0]["verdict"], "unattested");
    assert_eq!(value["runs"][0]["complete"], true);
}

#[test]
fn a_changed_record_exits_1_with_the_last_good_seq() {
    let text = hand_written().replace("\"code\":0", "\"code\":1");
    let (code, stdout, stderr) = verify(&text, &[]);
    assert_eq!(code, Some(1), "{stdout}");
    assert!(stderr.contains("(seq 3): hash mismatch"), "{stderr}");
    assert!(stderr.contains("last good seq is 2"), "{stderr}");
    let (code, stdout, _) = verify(&text, &["--json"]);
    assert_eq!(code, Some(1));
    let value: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(value["verdict"], "broken");
    assert_eq!(value["last_good_seq"], 2);
}

#[test]
fn a_pin_the_log_contradicts_exits_1() {
    let text = log(&[
        (
            "boot",
            "start",
            json!({"policy_digest": Digest::of(b"policy")}),
        ),
        ("shutdown", "poweroff", json!({})),
    ]);
    let pin = Digest::of(b"policy").to_string();
    assert_eq!(verify(&text, &["--expect-policy", &pin]).0, Some(3));
    let other = Digest::of(b"other").to_string();
    let (code, _, stderr) = verify(&text, &["--expect-policy", &other]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("--expect-policy"), "{stderr}");
}

#[test]
fn usage_errors_exit_2() {
    let (code, _, stderr) = verify(&hand_written(), &["--snp-measurement", "abcd"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("96 hex digits"), "{stderr}");
    let (code, _, _) = verify(&hand_written(), &["--expect-policy", "md5:00"]);
    assert_eq!(code, Some(2));
    let out = Command::new(BIN).arg("bogus").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}
