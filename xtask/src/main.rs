//! Project tasks: `cargo xtask ci | demo | bench`.
fn main() {}
