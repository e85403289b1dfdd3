//! The HTTP source's header parsers on header values as an HTTP client can hand them over
//! (visible ASCII, spaces and tabs): `Content-Range` agrees with an independent strict
//! parser and round-trips, `Content-Length` accepts only plain decimal numbers, and only
//! quoted entity tags count as strong.
#![no_main]

use libfuzzer_sys::fuzz_target;
use streamboot::source::http_parse::{is_strong_etag, parse_content_length, parse_content_range};
use streamboot_fuzz::reference_content_range;

fuzz_target!(|data: &[u8]| {
    // What `HeaderValue::to_str` can return.
    if !data
        .iter()
        .all(|&b| b == b'\t' || (0x20..0x7f).contains(&b))
    {
        return;
    }
    let text = std::str::from_utf8(data).expect("ASCII");
    // Three header values separated by '|' (the last one, the ETag, may contain more).
    let mut parts = text.splitn(3, '|');
    let range = parts.next().unwrap_or("");
    let length = parts.next().unwrap_or("");
    let etag = parts.next().unwrap_or("");

    let got = parse_content_range(range);
    assert_eq!(
        got,
        reference_content_range(range),
        "Content-Range {range:?}"
    );
    if let Some((start, end, total)) = got {
        assert!(start <= end);
        let shown = match total {
            Some(t) => {
                assert!(end < t);
                format!("bytes {start}-{end}/{t}")
            }
            None => format!("bytes {start}-{end}/*"),
        };
        assert_eq!(parse_content_range(&shown), got);
    }

    let n = parse_content_length(length);
    let plain = !length.is_empty() && length.bytes().all(|b| b.is_ascii_digit());
    if n.is_some() {
        assert!(plain, "Content-Length {length:?} accepted as {n:?}");
    }
    if let Some(n) = n {
        assert_eq!(parse_content_length(&n.to_string()), Some(n));
    }

    // Strong means quoted: never a weak `W/"..."` tag, never a lone quote.
    if is_strong_etag(etag) {
        assert!(etag.len() >= 2 && etag.starts_with('"') && etag.ends_with('"'));
    }
    assert!(is_strong_etag(&format!("\"{etag}\"")));
    assert!(!is_strong_etag(&format!("W/\"{etag}\"")));
});
