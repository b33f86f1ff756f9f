//! The one list of TEEs. Every place that handles evidence matches on [`Tee`]
//! exhaustively, so adding a TEE is a compile error until every place handles it.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Evidence providers (`attestation.tee` in the policy, `tee` in evidence records).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Tee {
    /// AMD SEV-SNP.
    Snp,
    /// Intel TDX.
    Tdx,
    /// TPM 2.0.
    Tpm,
    /// Azure SNP with vTPM.
    AzSnpVtpm,
    /// Sample evidence (tests only; proves nothing).
    Sample,
}

impl Tee {
    /// Every TEE, in a fixed order.
    pub const ALL: [Tee; 5] = [Tee::Snp, Tee::Tdx, Tee::Tpm, Tee::AzSnpVtpm, Tee::Sample];

    /// The name in policies, evidence records and the KBS protocol.
    pub fn as_str(self) -> &'static str {
        match self {
            Tee::Snp => "snp",
            Tee::Tdx => "tdx",
            Tee::Tpm => "tpm",
            Tee::AzSnpVtpm => "az-snp-vtpm",
            Tee::Sample => "sample",
        }
    }

    /// The KBS protocol's name for it.
    pub fn kbs(self) -> kbs_types::Tee {
        match self {
            Tee::Snp => kbs_types::Tee::Snp,
            Tee::Tdx => kbs_types::Tee::Tdx,
            Tee::Tpm => kbs_types::Tee::Tpm,
            Tee::AzSnpVtpm => kbs_types::Tee::AzSnpVtpm,
            Tee::Sample => kbs_types::Tee::Sample,
        }
    }

    /// Whether evidence from it can prove anything (`sample` cannot).
    pub fn is_hardware(self) -> bool {
        match self {
            Tee::Snp | Tee::Tdx | Tee::Tpm | Tee::AzSnpVtpm => true,
            Tee::Sample => false,
        }
    }
}

impl fmt::Display for Tee {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A name that is no TEE.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown tee {0:?}; expected one of snp, tdx, tpm, az-snp-vtpm, sample")]
pub struct UnknownTee(pub String);

impl FromStr for Tee {
    type Err = UnknownTee;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Tee::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| UnknownTee(s.to_string()))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_match_the_kbs_protocol() {
        for tee in Tee::ALL {
            assert_eq!(tee.as_str().parse::<Tee>(), Ok(tee));
            assert_eq!(
                serde_json::to_value(tee).ok(),
                Some(serde_json::json!(tee.as_str()))
            );
            let kbs: kbs_types::Tee = tee.as_str().parse().unwrap();
            assert_eq!(kbs, tee.kbs(), "{tee}");
        }
        assert!("bogus".parse::<Tee>().is_err());
    }
}
