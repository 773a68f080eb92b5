//! `Range` request header parsing for blob GETs (single byte ranges only).
//!
//! Pure functions of the header and the blob size; no I/O.

/// An inclusive byte range within a blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteRange {
    pub start: u64,
    pub end: u64,
}

impl ByteRange {
    pub fn len(&self) -> u64 {
        self.end - self.start + 1
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    /// The `Content-Range` value for a blob of `size` bytes.
    pub fn content_range(&self, size: u64) -> String {
        format!("bytes {}-{}/{}", self.start, self.end, size)
    }
}

/// What to serve for a `Range` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeRequest {
    /// No usable range: serve the whole blob with 200 (RFC 9110 lets a server
    /// ignore syntactically invalid or multi-range headers).
    Full,
    /// Serve this part with 206.
    Partial(ByteRange),
    /// The range starts past the end: 416.
    Unsatisfiable,
}

/// Parses `bytes=N-`, `bytes=N-M` and `bytes=-S` against a blob of `size` bytes.
pub fn parse(header: Option<&str>, size: u64) -> RangeRequest {
    let Some(spec) = header.and_then(|h| h.trim().strip_prefix("bytes=")) else {
        return RangeRequest::Full;
    };
    if spec.contains(',') {
        return RangeRequest::Full;
    }
    let Some((first, last)) = spec.trim().split_once('-') else {
        return RangeRequest::Full;
    };
    let num = |s: &str| -> Option<u64> {
        let s = s.trim();
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            None
        } else {
            s.parse().ok()
        }
    };
    match (first.trim().is_empty(), num(first), num(last)) {
        // bytes=-S: the last S bytes.
        (true, _, Some(suffix)) => {
            if suffix == 0 || size == 0 {
                return RangeRequest::Unsatisfiable;
            }
            let len = suffix.min(size);
            RangeRequest::Partial(ByteRange {
                start: size - len,
                end: size - 1,
            })
        }
        (false, Some(start), end) => {
            if !last.trim().is_empty() && end.is_none() {
                return RangeRequest::Full;
            }
            if start >= size {
                return RangeRequest::Unsatisfiable;
            }
            let end = end.map_or(size - 1, |e| e.min(size - 1));
            if end < start {
                return RangeRequest::Full;
            }
            RangeRequest::Partial(ByteRange { start, end })
        }
        _ => RangeRequest::Full,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(start: u64, end: u64) -> RangeRequest {
        RangeRequest::Partial(ByteRange { start, end })
    }

    #[test]
    fn forms() {
        assert_eq!(parse(None, 100), RangeRequest::Full);
        assert_eq!(parse(Some("bytes=10-"), 100), part(10, 99));
        assert_eq!(parse(Some("bytes=10-19"), 100), part(10, 19));
        assert_eq!(parse(Some("bytes=10-1000"), 100), part(10, 99));
        assert_eq!(parse(Some("bytes=-10"), 100), part(90, 99));
        assert_eq!(parse(Some("bytes=-1000"), 100), part(0, 99));
        assert_eq!(parse(Some("bytes=0-0"), 1), part(0, 0));
    }

    #[test]
    fn unsatisfiable_and_ignored() {
        assert_eq!(parse(Some("bytes=100-"), 100), RangeRequest::Unsatisfiable);
        assert_eq!(parse(Some("bytes=0-"), 0), RangeRequest::Unsatisfiable);
        assert_eq!(parse(Some("bytes=-0"), 100), RangeRequest::Unsatisfiable);
        assert_eq!(parse(Some("bytes=5-2"), 100), RangeRequest::Full);
        assert_eq!(parse(Some("bytes=0-1,5-6"), 100), RangeRequest::Full);
        assert_eq!(parse(Some("items=0-1"), 100), RangeRequest::Full);
        assert_eq!(parse(Some("bytes=a-b"), 100), RangeRequest::Full);
        assert_eq!(parse(Some("bytes=+1-2"), 100), RangeRequest::Full);
        assert_eq!(
            parse(Some("bytes=99999999999999999999999-"), 100),
            RangeRequest::Full
        );
    }

    #[test]
    fn content_range() {
        let r = ByteRange { start: 10, end: 19 };
        assert_eq!(r.len(), 10);
        assert_eq!(r.content_range(100), "bytes 10-19/100");
    }
}

#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn partial_ranges_stay_inside_the_blob(header in "bytes=[0-9-]{0,12}", size in 0u64..10_000) {
            if let RangeRequest::Partial(r) = parse(Some(&header), size) {
                prop_assert!(r.start <= r.end && r.end < size);
            }
        }
    }
}
