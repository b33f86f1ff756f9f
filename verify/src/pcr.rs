//! SHA-256 PCR arithmetic: replaying an event log the way a TPM extends a register.

use crate::digest::Digest;

/// The register value after extending `value` with `digest`: `SHA-256(value || digest)`.
pub fn extend(value: &Digest, digest: &Digest) -> Digest {
    let mut buf = [0u8; 64];
    buf[..32].copy_from_slice(&value.0);
    buf[32..].copy_from_slice(&digest.0);
    Digest::of(&buf)
}

/// The register value after extending `initial` with every digest in order.
pub fn replay<'a>(initial: Digest, digests: impl IntoIterator<Item = &'a Digest>) -> Digest {
    digests.into_iter().fold(initial, |v, d| extend(&v, d))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extend_is_sha256_of_value_then_digest() {
        let a = Digest::of(b"a");
        let mut both = Vec::new();
        both.extend_from_slice(&Digest::ZERO.0);
        both.extend_from_slice(&a.0);
        assert_eq!(extend(&Digest::ZERO, &a), Digest::of(&both));
        assert_eq!(replay(Digest::ZERO, [&a]), extend(&Digest::ZERO, &a));
        assert_ne!(replay(Digest::ZERO, [&a, &a]), extend(&Digest::ZERO, &a));
    }
}
