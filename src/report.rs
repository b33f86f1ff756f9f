//! Error reporting shared by every layer.

pub use cvm_warden_verify::error_chain;
