//! The fake registry's faults for resumed blob bodies: a registry that ignores `Range` (a
//! 200) or answers it elsewhere (a 206 at another offset), and a CDN whose signed URLs
//! expire after one use and which may sit behind another address (a fault proxy).

use std::collections::HashSet;

use http::StatusCode;

use super::Shared;

/// Switches in [`super::Faults::resume`].
#[derive(Debug, Clone, Default)]
pub struct ResumeFaults {
    /// Blob GETs with `Range` get the whole blob with 200.
    pub ignore_range: bool,
    /// Blob GETs with `Range: bytes=N-` get a 206 starting at `N - 1` (when `N` > 0).
    pub misplace_range: bool,
    /// Where the blob redirect points (`<base>/cdn/<digest>?sig=`); the fake itself when `None`.
    pub cdn_base: Option<String>,
    /// Each signed CDN URL serves one GET; later ones get 403, as an expired signature does.
    pub cdn_single_use: bool,
}

/// What the CDN handed out and refused.
#[derive(Debug, Default)]
pub(crate) struct CdnState {
    pub used: HashSet<String>,
    /// GETs refused because their URL was used before.
    pub expired: usize,
}

/// The base a blob redirect points at.
pub(crate) fn cdn_base(shared: &Shared) -> String {
    let g = shared.lock();
    g.faults
        .resume
        .cdn_base
        .clone()
        .unwrap_or_else(|| shared.base.clone())
}

/// `Err(403)` when the signed URL with this query has expired.
pub(crate) fn cdn_check(shared: &Shared, query: &str) -> Result<(), StatusCode> {
    let mut g = shared.lock();
    if !g.faults.resume.cdn_single_use {
        return Ok(());
    }
    let sig = url::form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == "sig")
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default();
    if g.cdn.used.insert(sig) {
        Ok(())
    } else {
        g.cdn.expired += 1;
        Err(StatusCode::FORBIDDEN)
    }
}

/// The range actually served for a requested `(first, last)`, and whether to answer 206.
pub(crate) fn served_range(shared: &Shared, asked: (u64, u64), size: u64) -> Option<(u64, u64)> {
    let g = shared.lock();
    let f = &g.faults.resume;
    if f.ignore_range {
        return None;
    }
    if f.misplace_range && asked.0 > 0 {
        return Some((asked.0 - 1, asked.1.min(size.saturating_sub(1))));
    }
    Some(asked)
}
