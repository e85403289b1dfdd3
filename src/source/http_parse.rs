//! Pure parsers for the HTTP response headers the HTTP source trusts: `Content-Range`,
//! `Content-Length` and `ETag`. Kept free of any HTTP client type so they can be unit
//! tested and fuzzed on raw strings (`fuzz/fuzz_targets/http_headers.rs`).

/// Parses `Content-Range: bytes START-END/TOTAL` (TOTAL may be `*`: `None`).
pub fn parse_content_range(value: &str) -> Option<(u64, u64, Option<u64>)> {
    let rest = value.trim().strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let (start, end) = range.trim().split_once('-')?;
    let start = decimal(start)?;
    let end = decimal(end)?;
    if end < start {
        return None;
    }
    let total = match total.trim() {
        "*" => None,
        t => {
            let t = decimal(t)?;
            if end >= t {
                return None;
            }
            Some(t)
        }
    };
    Some((start, end, total))
}

/// Parses a `Content-Length` value.
pub fn parse_content_length(value: &str) -> Option<u64> {
    decimal(value)
}

/// A header number (RFC 9110 `1*DIGIT`): ASCII digits only. `u64::from_str` alone would
/// also take a leading `+`, which no valid header carries.
fn decimal(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// A strong entity tag: quoted and without the `W/` weakness prefix. Only those can be
/// used with `If-Match` (which compares strongly).
pub fn is_strong_etag(etag: &str) -> bool {
    etag.len() >= 2 && etag.starts_with('"') && etag.ends_with('"')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range_parsing() {
        assert_eq!(parse_content_range("bytes 0-0/10"), Some((0, 0, Some(10))));
        assert_eq!(parse_content_range("bytes 5-9/*"), Some((5, 9, None)));
        assert_eq!(parse_content_range("bytes 5-4/10"), None);
        assert_eq!(parse_content_range("bytes 0-10/10"), None);
        assert_eq!(parse_content_range("bytes */10"), None);
        assert_eq!(parse_content_range("items 0-1/10"), None);
        assert_eq!(parse_content_range("bytes -1-2/10"), None);
        assert_eq!(parse_content_range("bytes 0-1/x"), None);
    }

    /// Found by the `http_headers` fuzz target: a leading `+` was accepted.
    #[test]
    fn numbers_are_plain_digits() {
        assert_eq!(parse_content_length("4096"), Some(4096));
        assert_eq!(parse_content_length("+4096"), None);
        assert_eq!(parse_content_length(""), None);
        assert_eq!(parse_content_length(" 1"), None);
        assert_eq!(parse_content_length("18446744073709551616"), None);
        assert_eq!(parse_content_range("bytes +0-1/10"), None);
        assert_eq!(parse_content_range("bytes 0-+1/10"), None);
        assert_eq!(parse_content_range("bytes 0-1/+10"), None);
        assert_eq!(
            parse_content_range(" bytes 0-1 / 10 "),
            Some((0, 1, Some(10)))
        );
    }

    #[test]
    fn etag_strength() {
        assert!(is_strong_etag("\"5f3a-1000\""));
        assert!(!is_strong_etag("W/\"5f3a-1000\""));
        assert!(!is_strong_etag("5f3a"));
        assert!(!is_strong_etag("\""));
    }
}
