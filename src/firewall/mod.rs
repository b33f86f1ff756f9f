//! nftables perimeter and allowlist (being written).
