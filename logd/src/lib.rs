//! The bounded, hardened log sink: per-sender budgets, kernel-derived identity, a query surface.
