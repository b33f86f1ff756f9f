//! Console, login and kernel lockdown (being written).
