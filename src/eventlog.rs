//! The measurement event log: what was measured before any secret was asked for.
//!
//! Each event is extended into a runtime register *before* it is appended to the log
//! (write-ahead), so a crash can never leave a register that is behind the log. Where the TEE
//! has no runtime register (bare SNP, or this build, which has no TPM support yet) the
//! [`NoRegister`] is used and the log's own accumulator is what later evidence binds.

use serde::Serialize;

use crate::digest::Digest;

pub use cvm_warden_verify::schema::{Event, EventKind};

/// A runtime measurement register (vTPM PCR, TDX RTMR). Later issues provide real ones.
pub trait RuntimeRegister {
    /// A short name for audit records, e.g. `none` or `tpm pcr 23`.
    fn name(&self) -> String;
    /// Extends `digest` into the register.
    fn extend(&mut self, digest: &Digest) -> Result<(), std::io::Error>;
    /// The register's current value, where it can be read (`None`: no register, or not
    /// readable). Recorded before the first extend so a verifier can replay the log from it.
    fn read(&mut self) -> Result<Option<Digest>, std::io::Error> {
        Ok(None)
    }
}

/// The register of a TEE without runtime registers.
#[derive(Debug, Default)]
pub struct NoRegister;

impl RuntimeRegister for NoRegister {
    fn name(&self) -> String {
        "none".to_string()
    }

    fn extend(&mut self, _digest: &Digest) -> Result<(), std::io::Error> {
        Ok(())
    }
}

/// A software model of a SHA-256 PCR: `value = SHA-256(value || digest)` per extend. Used to
/// compute reference values (what the TEE's register will read after the measure stage) and
/// by auditors to replay an event log.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SimulatedPcr {
    /// The current value (all zero after a TPM reset).
    pub value: Digest,
}

impl SimulatedPcr {
    /// The PCR after extending `digest`.
    pub fn extended(value: &Digest, digest: &Digest) -> Digest {
        cvm_warden_verify::pcr::extend(value, digest)
    }
}

impl RuntimeRegister for SimulatedPcr {
    fn name(&self) -> String {
        "simulated sha256 pcr".to_string()
    }

    fn extend(&mut self, digest: &Digest) -> Result<(), std::io::Error> {
        self.value = Self::extended(&self.value, digest);
        Ok(())
    }

    fn read(&mut self) -> Result<Option<Digest>, std::io::Error> {
        Ok(Some(self.value))
    }
}

/// A failed extend: the event was not appended.
#[derive(Debug, thiserror::Error)]
#[error("extending the {kind:?} measurement into runtime register {register} failed")]
pub struct ExtendError {
    /// The event that could not be recorded.
    pub kind: EventKind,
    /// The register's name.
    pub register: String,
    /// Why.
    #[source]
    pub source: std::io::Error,
}

/// The event log: ordered measurements plus a PCR-like accumulator over them.
#[derive(Debug, Default, Clone, Serialize)]
pub struct EventLog {
    events: Vec<Event>,
    accumulator: Digest,
    register_initial: Option<Digest>,
}

impl EventLog {
    /// An empty log (accumulator all zero).
    pub fn new() -> Self {
        Self::default()
    }

    /// Extends the register first, then appends the event (write-ahead).
    pub fn measure(
        &mut self,
        register: &mut dyn RuntimeRegister,
        kind: EventKind,
        digest: Digest,
        description: impl Into<String>,
    ) -> Result<&Event, ExtendError> {
        register.extend(&digest).map_err(|source| ExtendError {
            kind,
            register: register.name(),
            source,
        })?;
        let accumulator = Self::next(&self.accumulator, kind, &digest);
        self.accumulator = accumulator;
        let index = u32::try_from(self.events.len()).unwrap_or(u32::MAX);
        self.events.push(Event {
            index,
            kind,
            digest,
            description: description.into(),
            accumulator,
        });
        Ok(&self.events[self.events.len() - 1])
    }

    /// Records the register's value before the first event (see [`RuntimeRegister::read`]).
    pub fn set_register_initial(&mut self, value: Option<Digest>) {
        self.register_initial = value;
    }

    /// The register's value before the first event, when it could be read.
    pub fn register_initial(&self) -> Option<Digest> {
        self.register_initial
    }

    /// The accumulator over every event so far.
    pub fn accumulator(&self) -> Digest {
        self.accumulator
    }

    /// All events in order.
    pub fn events(&self) -> &[Event] {
        &self.events
    }

    /// One accumulator step; public so verifiers can replay a log.
    pub fn next(prev: &Digest, kind: EventKind, digest: &Digest) -> Digest {
        let tag = serde_json::to_string(&kind).unwrap_or_default();
        let mut buf = Vec::with_capacity(32 + tag.len() + 32);
        buf.extend_from_slice(&prev.0);
        buf.extend_from_slice(tag.trim_matches('"').as_bytes());
        buf.extend_from_slice(&digest.0);
        Digest::of(&buf)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    struct Recording(Vec<Digest>, bool);
    impl RuntimeRegister for Recording {
        fn name(&self) -> String {
            "fake".into()
        }
        fn extend(&mut self, digest: &Digest) -> Result<(), std::io::Error> {
            if self.1 {
                return Err(std::io::Error::other("register gone"));
            }
            self.0.push(*digest);
            Ok(())
        }
    }

    #[test]
    fn extends_before_logging_and_accumulates() {
        let mut reg = Recording(vec![], false);
        let mut log = EventLog::new();
        let a = Digest::of(b"policy");
        let b = Digest::of(b"bundle");
        log.measure(&mut reg, EventKind::Policy, a, "p").unwrap();
        log.measure(&mut reg, EventKind::Bundle, b, "b").unwrap();
        assert_eq!(reg.0, vec![a, b]);
        let step1 = EventLog::next(&Digest::ZERO, EventKind::Policy, &a);
        assert_eq!(
            log.accumulator(),
            EventLog::next(&step1, EventKind::Bundle, &b)
        );
        assert_eq!(log.events()[1].index, 1);
    }

    #[test]
    fn failed_extend_does_not_log() {
        let mut reg = Recording(vec![], true);
        let mut log = EventLog::new();
        let err = log
            .measure(&mut reg, EventKind::Bundle, Digest::of(b"x"), "b")
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "extending the Bundle measurement into runtime register fake failed"
        );
        assert!(log.events().is_empty());
        assert_eq!(log.accumulator(), Digest::ZERO);
    }
}
