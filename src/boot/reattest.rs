//! Continuous trust while the workload runs (PID 1 shape): every
//! `attestation.reattest_interval` the supervisor asks for a fresh broker exchange (new
//! nonce, new ephemeral key, fresh evidence), optionally a resource again, and audits it
//! (`attest/reattested`, the attest stage's record type, then an `audit/checkpoint` of kind
//! `reattest` right after it).
//!
//! A refusal (the broker rejects the evidence, its token does not affirm every submodule,
//! the resource is refused), a TEE that no longer answers, or a broker that stays
//! unreachable for longer than `attestation.reattest_grace` is a loss of trust:
//! `attest/reattest_failed` with the reason, and the supervisor stops the workload (SIGTERM,
//! the grace period, SIGKILL). [`super::run_init`] then removes the secrets, closes the
//! volumes, clears what the boot made ready (GPU ready state, through
//! [`Reattester::trust_lost`]), writes the closing record with the reason and powers off.
//!
//! The unit shape `execve`s the workload, so nothing re-attests there: an explicit interval
//! above 0 is refused when the boot is planned, the default one is recorded as
//! `attest/reattest_unavailable` ([`record_unavailable`]).

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::{chain, checkpoint, CheckpointKind, Checkpointer};
use crate::audit::Audit;
use crate::eventlog::EventLog;
use crate::keybroker::RealBroker;
use crate::launch::Next;
use crate::policy::ResourceUri;
use crate::stage::attest::Plan as AttestPlan;
use crate::stage::BrokerError;
use cvm_warden_verify::schema::{AttestedDetails, Exchange};

/// Why a re-attestation did not succeed. Only [`ReattestError::Unreachable`] is retried
/// (within `attestation.reattest_grace`); the others stop the workload at once.
#[derive(Debug, thiserror::Error)]
pub enum ReattestError {
    /// The broker rejected the evidence, its token does not affirm, the resource was
    /// refused — or anything else that is not known to be transient (fail closed).
    #[error("the key broker refused the re-attestation")]
    Refused(#[source] BrokerError),
    /// The broker could not be reached, kept answering 5xx, or ran out of time.
    #[error("the key broker could not be reached for the re-attestation")]
    Unreachable(#[source] BrokerError),
    /// The TEE (or a device whose evidence the provider collects) did not answer.
    #[error("the TEE did not give evidence for the re-attestation")]
    Tee(#[source] BrokerError),
}

impl ReattestError {
    /// `refused`, `unreachable` or `tee` (the records' `kind`).
    pub fn kind(&self) -> &'static str {
        match self {
            ReattestError::Refused(_) => "refused",
            ReattestError::Unreachable(_) => "unreachable",
            ReattestError::Tee(_) => "tee",
        }
    }
}

/// What one successful re-attestation returns.
#[derive(Debug, Clone, PartialEq)]
pub struct Reattested {
    /// The broker exchange, in the shape of [`Exchange`] (as `attest/attested` records it).
    pub exchange: Value,
    /// The resource asked for again (`{resource, bytes}`; the bytes themselves were
    /// dropped and zeroized), when the policy names one.
    pub resource: Option<Value>,
}

/// The re-attestation seam: what the runner needs of the broker while the workload runs.
/// [`RealBroker`] implements it; tests use scripted fakes.
pub trait Reattester {
    /// A fresh handshake (new nonce, new key, fresh evidence — CPU and whatever devices the
    /// provider collects), the token checked ([`token_affirms`]), then `resource` asked for
    /// again and dropped. Every broker try goes to `attempt`.
    fn reattest(
        &mut self,
        resource: Option<&ResourceUri>,
        attempt: &mut dyn FnMut(Value),
    ) -> Result<Reattested, ReattestError>;
    /// Trust is lost: clear what the boot made ready for the workload (e.g. the GPUs' ready
    /// state); returns what was done, for the `attest/trust_lost` record.
    fn trust_lost(&mut self) -> Value;
}

/// Checks the broker token's claims (unverified: the guest holds no key for the token's
/// signature — a reason to stop, never a reason to trust). Every CPU/TEE submodule (`cpu0`,
/// …) must be `affirming`; evidence that proves nothing (`sample`) can at best earn
/// `warning`, which `insecure` accepts. GPU submodules are not scored affirming by Trustee's
/// local NVIDIA verifier (its default GPU EAR policy scores only NRAS claims; the broker's
/// resource policy reads their claims instead), so for them the token must show that the
/// broker verified every GPU the handshake sent: `gpu0` … `gpu{gpus-1}` present.
pub fn token_affirms(claims: &Value, insecure: bool, gpus: usize) -> Result<(), String> {
    let Some(submods) = claims.get("submods").and_then(Value::as_object) else {
        return Err("the broker's token has no submods: no verdict on the evidence".to_string());
    };
    if submods.is_empty() {
        return Err("the broker's token has no submods: no verdict on the evidence".to_string());
    }
    let missing: Vec<String> = (0..gpus)
        .map(|i| format!("gpu{i}"))
        .filter(|name| !submods.contains_key(name))
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "the broker's token (unverified claims) has no verdict on {} of the {gpus} GPU(s) the evidence carried: the broker did not verify them",
            missing.join(", ")
        ));
    }
    let mut bad = Vec::new();
    for (name, submod) in submods {
        if name.starts_with("gpu") && name[3..].bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let status = submod
            .get("ear.status")
            .and_then(Value::as_str)
            .unwrap_or("(none)");
        let ok = status == "affirming" || (insecure && status == "warning");
        if !ok {
            bad.push(format!(
                "{}: ear.status = {}",
                crate::report::sanitize(name, 64),
                crate::report::sanitize(status, 64)
            ));
        }
        if bad.len() >= 8 {
            break;
        }
    }
    if bad.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "the broker's token (unverified claims) does not affirm the evidence: {}",
            bad.join(", ")
        ))
    }
}

/// A KBS client error as a [`ReattestError`]: transport failures, 5xx and timeouts are
/// [`ReattestError::Unreachable`], the provider's evidence error is [`ReattestError::Tee`],
/// everything else (rejections, refusals, TLS, protocol errors) [`ReattestError::Refused`].
pub fn classify(error: crate::kbs::KbsError) -> ReattestError {
    use crate::kbs::KbsError;
    match error {
        KbsError::Unreachable { .. } | KbsError::ServerError { .. } | KbsError::Timeout { .. } => {
            ReattestError::Unreachable(Box::new(error))
        }
        KbsError::Evidence { .. } => ReattestError::Tee(Box::new(error)),
        other => ReattestError::Refused(Box::new(other)),
    }
}

impl Checkpointer for RealBroker {
    fn describe(&self) -> Value {
        crate::stage::KeyBroker::describe(self)
    }

    fn checkpoint(&mut self, binding: &[u8; 64]) -> Result<Value, BrokerError> {
        crate::stage::KeyBroker::checkpoint(self, binding)
    }

    fn reattester(&mut self) -> Option<&mut dyn Reattester> {
        Some(self)
    }

    fn set_devices_ready(&mut self, ready: bool) -> Result<Option<Value>, BrokerError> {
        crate::stage::KeyBroker::set_devices_ready(self, ready)
    }
}

impl Reattester for RealBroker {
    fn reattest(
        &mut self,
        resource: Option<&ResourceUri>,
        attempt: &mut dyn FnMut(Value),
    ) -> Result<Reattested, ReattestError> {
        let attested = RealBroker::reattest(self, attempt).map_err(classify)?;
        let gpus = serde_json::from_str::<cvm_warden_verify::schema::AdditionalEvidence>(
            &attested.additional_evidence,
        )
        .map(|e| e.nvidia.device_evidence_list.len())
        .unwrap_or(0);
        token_affirms(&attested.claims, self.provider_insecure(), gpus)
            .map_err(|why| ReattestError::Refused(why.into()))?;
        let exchange =
            serde_json::to_value(&attested).map_err(|e| ReattestError::Refused(Box::new(e)))?;
        let resource = match resource {
            None => None,
            Some(uri) => {
                let released = self.release(uri, attempt).map_err(classify)?;
                let bytes = released.len();
                // Dropped (and zeroized) here: only the broker's yes counts.
                drop(released);
                Some(json!({ "resource": uri, "bytes": bytes }))
            }
        };
        Ok(Reattested { exchange, resource })
    }

    fn trust_lost(&mut self) -> Value {
        // The devices' ready state (GPUs) is cleared by the runner's closing path
        // (`gpu/not_ready`, before the closing record), as on every way down.
        json!({ "devices": "cleared before the closing record (gpu/not_ready)" })
    }
}

/// The policy's re-attestation schedule, `None` when off or without a broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    /// Between re-attestations.
    pub every: Duration,
    /// How long an unreachable broker is retried.
    pub grace: Duration,
    /// The resource asked for again each time.
    pub resource: Option<ResourceUri>,
    /// The broker URL (the records' `broker`).
    pub broker: String,
}

impl Schedule {
    /// From the attest stage's plan; `None` with `attestation = "none"` or
    /// `reattest_interval = "0"`.
    pub fn from_plan(plan: &AttestPlan) -> Option<Schedule> {
        match plan {
            AttestPlan::Broker { kbs, reattest, .. } if reattest.interval_secs > 0 => {
                Some(Schedule {
                    every: Duration::from_secs(reattest.interval_secs),
                    grace: Duration::from_secs(reattest.grace_secs),
                    resource: reattest.resource.clone(),
                    broker: kbs.clone(),
                })
            }
            _ => None,
        }
    }

    /// The wait between two tries while the broker is unreachable: a quarter of the grace
    /// (at least a second), so a few bounded tries fit in it.
    fn retry_step(&self) -> Duration {
        (self.grace / 4).max(Duration::from_secs(1))
    }
}

/// Why trust was lost (for the closing record).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustLost {
    /// `refused`, `unreachable`, `tee` (or `setup`: no re-attestation seam).
    pub kind: &'static str,
    /// The reason, in words.
    pub reason: String,
}

/// The re-attestation work the supervisor runs: the schedule, the unreachable streak, and
/// whether trust was lost.
#[derive(Debug)]
pub struct Watch {
    schedule: Schedule,
    round: u64,
    unreachable_since: Option<Instant>,
    unreachable_tries: u32,
    lost: Option<TrustLost>,
}

impl Watch {
    /// A watch on `schedule`; nothing has run yet.
    pub fn new(schedule: Schedule) -> Watch {
        Watch {
            schedule,
            round: 0,
            unreachable_since: None,
            unreachable_tries: 0,
            lost: None,
        }
    }

    /// The interval.
    pub fn every(&self) -> Duration {
        self.schedule.every
    }

    /// Why trust was lost, once it was.
    pub fn lost(&self) -> Option<&TrustLost> {
        self.lost.as_ref()
    }

    /// One re-attestation at `now` (the supervisor's time): records and a checkpoint on
    /// success, a sooner retry while the broker is unreachable within the grace, otherwise
    /// `attest/reattest_failed` and [`Next::StopWorkload`].
    pub fn run(
        &mut self,
        now: Instant,
        audit: &Audit,
        checkpointer: &mut dyn Checkpointer,
        event_log: &EventLog,
    ) -> Next {
        if self.lost.is_some() {
            return Next::StopWorkload;
        }
        self.round += 1;
        let round = self.round;
        let tee = checkpointer.describe();
        let Some(reattester) = checkpointer.reattester() else {
            self.round -= 1;
            return self.no_seam(audit);
        };
        let mut attempt = |details: Value| {
            let mut details = details;
            details["round"] = json!(round);
            let _ = audit.record("attest", "reattest_try", details);
        };
        let result = reattester.reattest(self.schedule.resource.as_ref(), &mut attempt);
        match result {
            Ok(done) => {
                let typed: Result<Exchange, String> =
                    cvm_warden_verify::schema::from_value(&done.exchange, "broker exchange")
                        .map_err(|e| e.to_string());
                let exchange = match typed {
                    Ok(exchange) => exchange,
                    Err(error) => {
                        return self.fail(
                            audit,
                            "refused",
                            format!("the re-attestation exchange cannot be recorded in a shape the verifier reads: {error}"),
                        )
                    }
                };
                let details = AttestedDetails {
                    broker: self.schedule.broker.clone(),
                    tee,
                    exchange,
                    event_log: event_log.events().to_vec(),
                    register_initial: event_log.register_initial(),
                    event_log_accumulator: event_log.accumulator(),
                };
                let recorded = serde_json::to_value(&details)
                    .unwrap_or_else(|e| json!({ "unserialisable": e.to_string() }));
                log::info!("re-attestation {round}: the key broker affirmed the evidence");
                let _ = audit.record("attest", "reattested", recorded);
                if let Some(resource) = done.resource {
                    let _ = audit.record("attest", "reattest_resource", resource);
                }
                self.unreachable_since = None;
                self.unreachable_tries = 0;
                checkpoint(audit, checkpointer, CheckpointKind::Reattest, event_log);
                Next::OnSchedule
            }
            Err(ReattestError::Unreachable(error)) => {
                let since = *self.unreachable_since.get_or_insert(now);
                self.unreachable_tries += 1;
                let waited = now.saturating_duration_since(since);
                let grace = self.schedule.grace;
                if waited >= grace {
                    return self.fail(
                        audit,
                        "unreachable",
                        format!(
                            "the key broker at {} stayed unreachable for {}s ({} tries), not shorter than attestation.reattest_grace ({}s): {}",
                            self.schedule.broker,
                            waited.as_secs(),
                            self.unreachable_tries,
                            grace.as_secs(),
                            chain(error.as_ref())
                        ),
                    );
                }
                let retry = self.schedule.retry_step().min(grace - waited);
                log::warn!(
                    "re-attestation {round}: the key broker is unreachable; retrying in {}s (grace left {}s)",
                    retry.as_secs(),
                    (grace - waited).as_secs()
                );
                let _ = audit.record(
                    "attest",
                    "reattest_unreachable",
                    json!({
                        "round": round,
                        "try": self.unreachable_tries,
                        "error": chain(error.as_ref()),
                        "unreachable_ms": waited.as_millis(),
                        "grace_ms": grace.as_millis(),
                        "retry_in_ms": retry.as_millis(),
                    }),
                );
                Next::In(retry)
            }
            Err(error) => {
                let kind = error.kind();
                self.fail(audit, kind, chain(&error))
            }
        }
    }

    /// A re-attestation is due but the boot has no broker to ask (fail closed).
    pub fn no_seam(&mut self, audit: &Audit) -> Next {
        self.round += 1;
        self.fail(
            audit,
            "setup",
            "no evidence provider or key broker is there to re-attest with, although the policy sets attestation.reattest_interval; this is a bug, report it".to_string(),
        )
    }

    /// Trust is lost: `attest/reattest_failed` {round, kind, error, action}.
    fn fail(&mut self, audit: &Audit, kind: &'static str, reason: String) -> Next {
        log::error!(
            "re-attestation {} failed ({kind}): {reason}; stopping the workload",
            self.round
        );
        let _ = audit.record(
            "attest",
            "reattest_failed",
            json!({
                "round": self.round,
                "kind": kind,
                "error": reason,
                "action": "stop the workload (SIGTERM, grace period, SIGKILL), remove the secrets, close the volumes, clear the devices' ready state, then the closing record and power-off",
            }),
        );
        self.lost = Some(TrustLost { kind, reason });
        Next::StopWorkload
    }
}

/// The unit shape cannot re-attest (it `execve`s the workload): with the default interval
/// (an explicit one is refused when the boot is planned) `attest/reattest_unavailable` says
/// so. Nothing is written without a broker or with `reattest_interval = "0"`.
pub fn record_unavailable(audit: &Audit, plan: &AttestPlan) {
    if let Some(schedule) = Schedule::from_plan(plan) {
        let _ = audit.record(
            "attest",
            "reattest_unavailable",
            json!({
                "interval_s": schedule.every.as_secs(),
                "reason": "the systemd-unit shape execs the workload, so no cvm-warden process is left to re-attest while it runs; boot cvm-warden as PID 1 (cvm-warden init) for continuous trust, or write attestation.reattest_interval = \"0\" to say so in the policy",
            }),
        );
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::kbs::KbsError;

    #[test]
    fn every_submodule_of_the_token_must_affirm() {
        let claims = |cpu: &str, gpu: Option<&str>| {
            let mut submods = json!({ "cpu0": { "ear.status": cpu } });
            if let Some(gpu) = gpu {
                submods["gpu0"] = json!({ "ear.status": gpu });
            }
            json!({ "submods": submods })
        };
        assert!(token_affirms(&claims("affirming", None), false, 0).is_ok());
        assert!(token_affirms(&claims("affirming", Some("affirming")), false, 1).is_ok());
        // Trustee's local NVIDIA verifier never scores a GPU affirming: presence counts.
        assert!(token_affirms(&claims("affirming", Some("contraindicated")), false, 1).is_ok());
        let gpu = token_affirms(&claims("affirming", None), false, 1).unwrap_err();
        assert_eq!(
            gpu,
            "the broker's token (unverified claims) has no verdict on gpu0 of the 1 GPU(s) the evidence carried: the broker did not verify them"
        );
        // A GPU verdict never stands in for the CPU's.
        assert!(token_affirms(&claims("contraindicated", Some("affirming")), false, 1).is_err());
        assert!(token_affirms(&claims("warning", None), false, 0).is_err());
        // Sample evidence earns `warning` at best: accepted only for an insecure provider.
        assert!(token_affirms(&claims("warning", None), true, 0).is_ok());
        assert!(token_affirms(&claims("contraindicated", None), true, 0).is_err());
        assert!(token_affirms(&json!({ "submods": {} }), true, 0).is_err());
        assert!(token_affirms(&json!({}), false, 0).is_err());
        let odd =
            token_affirms(&json!({ "submods": { "cpu0\u{1b}[31m": {} } }), false, 0).unwrap_err();
        assert!(
            odd.contains("cpu0\\u{1b}[31m: ear.status = (none)"),
            "{odd}"
        );
    }

    #[test]
    fn only_transport_failures_count_as_unreachable() {
        let url = "https://kbs.example".to_string();
        let unreachable = KbsError::ServerError {
            url: url.clone(),
            call: crate::kbs::Call::Attest,
            status: 503,
            detail: String::new(),
            tries: 3,
            elapsed: Duration::from_secs(1),
        };
        assert_eq!(classify(unreachable).kind(), "unreachable");
        let timeout = KbsError::Timeout {
            url: url.clone(),
            call: crate::kbs::Call::Auth,
            total: Duration::from_secs(5),
            tries: 2,
            last: "connection refused".to_string(),
        };
        assert_eq!(classify(timeout).kind(), "unreachable");
        let rejected = KbsError::EvidenceRejected {
            url: url.clone(),
            tee: "tpm".to_string(),
            variant: "AttestationFailed".to_string(),
            detail: "bad quote".to_string(),
        };
        assert_eq!(classify(rejected).kind(), "refused");
        let denied = KbsError::PolicyDeny {
            uri: "kbs:///a/b/c".to_string(),
            detail: "Access denied by policy".to_string(),
            verdict: String::new(),
        };
        assert_eq!(classify(denied).kind(), "refused");
        let tee = KbsError::Evidence {
            tee: "snp".to_string(),
            source: crate::tee::TeeError::Config {
                tee: "snp",
                detail: "the device is gone".to_string(),
            },
        };
        assert_eq!(classify(tee).kind(), "tee");
        let protocol = KbsError::Protocol {
            url,
            call: crate::kbs::Call::Attest,
            what: "a token that is not a JWT".to_string(),
        };
        assert_eq!(classify(protocol).kind(), "refused");
    }
}
