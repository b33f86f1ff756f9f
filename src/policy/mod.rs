//! Policy: strict TOML, parsed into raw types, validated into typed ones.
mod types;
pub use types::*;
