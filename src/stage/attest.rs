//! Stage 3, attest: TEE evidence bound to the broker's nonce and an ephemeral key is sent to
//! the key broker (Trustee KBS protocol), which answers with a token.
//!
//! Every try of the exchange is an audit record. After a successful exchange the stage
//! appends a **checkpoint**: fresh evidence whose report data is
//! `SHA-512("cvm-warden checkpoint v1\0" || head)`, where `head` is the hash of the audit
//! record that holds the broker exchange, so `audit verify` can show that this log — up to
//! that record — is what the TEE vouched for. A checkpoint can never pass for broker evidence
//! (the label), and the broker's evidence cannot carry the head (its report data is fixed by
//! the protocol).
//!
//! `attestation = "none"` must be written explicitly; nothing is attested and every audit
//! record says `"insecure": true`.

use serde::Serialize;
use serde_json::{json, Value};

use super::{Effects, StageError};
use crate::policy::{Attestation, Policy, Tee};
use cvm_warden_verify::schema::{AttestedDetails, Exchange, ExchangeCheckpoint, TeeEvidence};

pub use cvm_warden_verify::binding::{checkpoint_binding, CHECKPOINT_LABEL};

/// What the attest stage will do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "action", rename_all = "kebab-case")]
pub enum Plan {
    /// `attestation = "none"`: nothing is attested; development only.
    InsecureNone,
    /// Evidence from `tee` to the broker at `kbs`.
    Broker {
        /// Evidence provider.
        tee: Tee,
        /// Broker URL.
        kbs: String,
        /// Whether plain HTTP was allowed (`insecure_http = true`).
        insecure_http: bool,
        /// Tries per call.
        tries: u32,
        /// Total time budget, seconds.
        timeout_secs: u64,
        /// `[attestation.gpu]`: GPUs checked after the perimeter, their evidence sent as
        /// `additional_evidence`, set ready after the unlock stage.
        #[serde(skip_serializing_if = "Option::is_none")]
        gpu: Option<Box<crate::policy::Gpu>>,
        /// Re-attestation while the workload runs (PID 1 shape; the unit shape refuses an
        /// explicit interval and records that it cannot re-attest).
        reattest: crate::policy::Reattest,
    },
}

/// Plans attestation. Pure.
///
/// The unit shape `execve`s the workload, so nothing is left to re-attest while it runs: a
/// policy that writes `attestation.reattest_interval` above 0 is refused there (never
/// skipped silently); with the default interval the runner records
/// `attest/reattest_unavailable` instead.
pub fn plan(policy: &Policy, facts: &super::Facts) -> Result<Plan, StageError> {
    if let Attestation::Broker { reattest, .. } = &policy.attestation {
        if facts.shape == crate::lockdown::Shape::Systemd
            && reattest.interval_explicit
            && reattest.interval_secs > 0
        {
            return Err(StageError::Unsupported {
                stage: "attest",
                what: format!(
                    "attestation.reattest_interval = \"{}s\" in the systemd-unit shape",
                    reattest.interval_secs
                ),
                hint: "the unit shape execs the workload, so no cvm-warden process is left to re-attest while it runs; boot cvm-warden as PID 1 (cvm-warden init) for continuous trust, or write reattest_interval = \"0\"",
            });
        }
    }
    Ok(match &policy.attestation {
        Attestation::None => Plan::InsecureNone,
        Attestation::Broker {
            tee,
            kbs,
            insecure_http,
            tries,
            timeout_secs,
            gpu,
            reattest,
            ..
        } => Plan::Broker {
            tee: *tee,
            kbs: kbs.clone(),
            insecure_http: *insecure_http,
            tries: *tries,
            timeout_secs: *timeout_secs,
            gpu: gpu.clone(),
            reattest: reattest.clone(),
        },
    })
}

/// Applies the plan; returns the details of the outcome record.
pub fn apply(plan: &Plan, fx: &mut Effects<'_>) -> Result<Value, StageError> {
    let kbs = match plan {
        Plan::InsecureNone => {
            return Ok(json!({
                "attested": false,
                "reason": "attestation = \"none\" in the policy: no evidence, no key broker (development only)",
                "event_log_accumulator": fx.event_log.accumulator(),
            }))
        }
        Plan::Broker { kbs, .. } => kbs,
    };
    let audit = fx.audit;
    let Some(broker) = fx.broker.as_deref_mut() else {
        return Err(StageError::Broker {
            stage: "attest",
            what: format!("no evidence provider or key broker client was set up for {kbs}"),
            source: "the boot environment has no key broker although the policy configures one; this is a bug, report it".into(),
        });
    };
    let exchange = super::audited_broker_call(
        audit,
        "attest",
        || format!("key broker exchange with {kbs}"),
        |attempt| broker.attest(attempt),
    )?;
    // The token's verdict is unverified (the guest holds no key for the broker's token
    // signature), so it is never a reason to go on — but a broker that itself says the
    // evidence contradicts its reference values is a reason to stop.
    if exchange.get("status").and_then(Value::as_str) == Some("contraindicated") {
        return Err(StageError::Broker {
            stage: "attest",
            what: format!("key broker exchange with {kbs}"),
            source: format!(
                "the broker's verdict on this evidence is \"contraindicated\" (ear.status): it contradicts the broker's reference values; check the measurements against the reference values registered at {kbs}"
            )
            .into(),
        });
    }
    // Written through the verifier's types: a shape the verifier would refuse is refused
    // here, before it reaches the log.
    let typed_exchange: Exchange =
        cvm_warden_verify::schema::from_value(&exchange, "broker exchange").map_err(|e| {
            StageError::Broker {
                stage: "attest",
                what: "recording the broker exchange in the audit log".to_string(),
                source: Box::new(e),
            }
        })?;
    let details = AttestedDetails {
        broker: kbs.clone(),
        tee: broker.describe(),
        exchange: typed_exchange,
        event_log: fx.event_log.events().to_vec(),
        register_initial: fx.event_log.register_initial(),
        event_log_accumulator: fx.event_log.accumulator(),
    };
    let recorded = serde_json::to_value(&details).map_err(|error| StageError::Broker {
        stage: "attest",
        what: "recording the broker exchange in the audit log".to_string(),
        source: Box::new(error),
    })?;
    let exchange_head = audit
        .record("attest", "attested", recorded)
        .map_err(|error| StageError::Broker {
            stage: "attest",
            what: "recording the broker exchange in the audit log".to_string(),
            source: Box::new(error),
        })?;
    let exchange_seq = audit.seq().saturating_sub(1);
    let binding = checkpoint_binding(&exchange_head);
    let evidence = broker
        .checkpoint(&binding)
        .map_err(|source| StageError::Broker {
            stage: "attest",
            what: "checkpoint evidence over the audit log".to_string(),
            source,
        })?;
    let evidence: TeeEvidence =
        cvm_warden_verify::schema::from_value(&evidence, "checkpoint evidence").map_err(|e| {
            StageError::Broker {
                stage: "attest",
                what: "checkpoint evidence over the audit log".to_string(),
                source: Box::new(e),
            }
        })?;
    let checkpoint = ExchangeCheckpoint {
        head_seq: exchange_seq,
        head: exchange_head,
        report_data: hex::encode(binding),
        evidence,
    };
    Ok(json!({
        "attested": true,
        "status": exchange.get("status").cloned().unwrap_or(Value::Null),
        "checkpoint": checkpoint,
    }))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::digest::Digest;
    use sha2::{Digest as _, Sha512};

    #[test]
    fn checkpoint_binding_is_sha512_of_label_and_head() {
        let head = Digest::of(b"record");
        let mut expected = Sha512::new();
        expected.update(b"cvm-warden checkpoint v1\0");
        expected.update(head.0);
        assert_eq!(
            checkpoint_binding(&head).to_vec(),
            expected.finalize().to_vec()
        );
        assert_ne!(checkpoint_binding(&head), checkpoint_binding(&Digest::ZERO));
    }
}
