//! The suite's two sizes: short (CI) and full (`REGMIRROR_RELIABILITY=full`).
#![allow(dead_code)]

/// Whether the full-size suite was asked for.
pub fn full() -> bool {
    std::env::var("REGMIRROR_RELIABILITY").is_ok_and(|v| v == "full")
}

/// `short` in CI, `full` in the full run.
pub fn pick<T>(short: T, full: T) -> T {
    if self::full() {
        full
    } else {
        short
    }
}

/// Whether to measure distribution's proxy beside regmirror: in the full run, where
/// Debian's docker-registry is installed.
pub fn compare_distribution() -> bool {
    full() && crate::distribution::installed()
}
