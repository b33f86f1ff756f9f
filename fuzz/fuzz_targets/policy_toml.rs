//! Policy and operator TOML: `cvm_warden::policy::parse`, the pure function the file loader
//! (`policy::load`) runs after reading the files. Input: the policy text, optionally a NUL
//! byte and the operator text (TOML text cannot hold a raw NUL).
#![no_main]

use cvm_warden::policy::{parse, MemoryUsers};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (policy, operator) = match data.iter().position(|&b| b == 0) {
        Some(at) => (&data[..at], Some(&data[at + 1..])),
        None => (data, None),
    };
    let Ok(policy) = std::str::from_utf8(policy) else {
        return;
    };
    let operator = match operator.map(std::str::from_utf8) {
        Some(Ok(text)) => Some(text),
        Some(Err(_)) => return,
        None => None,
    };
    let users = MemoryUsers::new()
        .user("root", 0, 0)
        .user("flare", 1000, 1000)
        .group("root", 0)
        .group("flare", 1000);
    match parse(policy, operator, &users) {
        Ok(loaded) => {
            // Measured as given: the digest is of the policy bytes.
            assert_eq!(
                loaded.policy_digest,
                cvm_warden_verify::Digest::of(policy.as_bytes())
            );
            assert_eq!(loaded.operator_digest.is_some(), operator.is_some());
        }
        Err(error) => {
            // Every refusal names at least one problem, none of them empty.
            let problems = error.problems();
            assert!(!problems.is_empty());
            assert!(problems.iter().all(|p| !p.trim().is_empty()));
        }
    }
});
