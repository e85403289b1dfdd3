//! Just enough HTTP/1.1 parsing (httparse) for the bench proxy to count requests and
//! response body bytes on a keep-alive connection: requests in order, each answered in
//! order, bodies delimited by `Content-Length`.

use std::collections::VecDeque;

/// Most header lines looked at in one message.
const MAX_HEADERS: usize = 64;
/// Longest header block kept while waiting for its end (a bigger one stops counting).
const MAX_HEAD: usize = 64 << 10;

/// What the proxy remembers of a request until its answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestInfo {
    /// `HEAD`: the answer has no body.
    pub head: bool,
    /// `Range: bytes=0-0`: streamboot's probe of a source, not image bytes.
    pub probe: bool,
}

/// Finds the end of a header block (`\r\n\r\n`), returns the length including it.
fn head_len(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

fn header<'a>(headers: &'a [httparse::Header<'a>], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case(name))
        .and_then(|h| std::str::from_utf8(h.value).ok())
        .map(str::trim)
}

fn content_length(headers: &[httparse::Header<'_>]) -> Option<u64> {
    header(headers, "content-length").and_then(|v| v.parse().ok())
}

/// Splits the client-to-origin byte stream into requests, and gives every request the
/// origin's `Host` header (streamboot addressed the proxy; a name-based virtual host at the
/// origin must see its own name).
#[derive(Default)]
pub struct RequestParser {
    /// `Host` value to send (None: forward the header as it is).
    host: Option<String>,
    buf: Vec<u8>,
    /// Request body bytes still to skip.
    body_left: u64,
    /// Something could not be parsed: stop (counts stay as they are).
    lost: bool,
}

impl RequestParser {
    /// A parser that rewrites `Host` to `host`.
    pub fn with_host(host: String) -> Self {
        Self {
            host: Some(host),
            ..Self::default()
        }
    }

    /// Feeds bytes; returns the requests whose header block ended in them, and appends
    /// the bytes to forward to `fwd` (header blocks are held until complete; once the
    /// stream cannot be parsed, everything is forwarded as it is).
    pub fn feed(&mut self, mut bytes: &[u8], fwd: &mut Vec<u8>) -> Vec<RequestInfo> {
        let mut out = Vec::new();
        while !bytes.is_empty() {
            if self.lost {
                fwd.extend_from_slice(bytes);
                break;
            }
            if self.body_left > 0 {
                let n = self.body_left.min(bytes.len() as u64);
                self.body_left -= n;
                fwd.extend_from_slice(&bytes[..n as usize]);
                bytes = &bytes[n as usize..];
                continue;
            }
            let before = self.buf.len();
            self.buf.extend_from_slice(bytes);
            let Some(len) = head_len(&self.buf) else {
                if self.buf.len() > MAX_HEAD {
                    self.lost = true;
                    fwd.append(&mut self.buf);
                }
                return out;
            };
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut req = httparse::Request::new(&mut headers);
            let Ok(httparse::Status::Complete(_)) = req.parse(&self.buf[..len]) else {
                self.lost = true;
                fwd.append(&mut self.buf);
                return out;
            };
            out.push(RequestInfo {
                head: req.method == Some("HEAD"),
                probe: header(req.headers, "range") == Some("bytes=0-0"),
            });
            self.body_left = content_length(req.headers).unwrap_or(0);
            match &self.host {
                Some(host) => rewrite_host(&self.buf[..len], host, fwd),
                None => fwd.extend_from_slice(&self.buf[..len]),
            }
            // The rest of `bytes` after this header block.
            bytes = &bytes[len - before..];
            self.buf.clear();
        }
        out
    }
}

/// Appends header block `head` to `fwd` with its `Host` line(s) replaced by `host`.
fn rewrite_host(head: &[u8], host: &str, fwd: &mut Vec<u8>) {
    let mut lines = head.split_inclusive(|&b| b == b'\n');
    if let Some(first) = lines.next() {
        fwd.extend_from_slice(first);
    }
    fwd.extend_from_slice(format!("Host: {host}\r\n").as_bytes());
    for line in lines {
        let is_host = line.len() >= 5 && line[..5].eq_ignore_ascii_case(b"host:");
        if !is_host {
            fwd.extend_from_slice(line);
        }
    }
}

/// What one feed of response bytes held.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counted {
    /// Body bytes of answers to requests other than probes.
    pub body_bytes: u64,
    /// Answers whose body length is unknown (not counted; counting stops there).
    pub uncounted: u64,
}

/// Splits the origin-to-client byte stream into responses and counts body bytes.
#[derive(Default)]
pub struct ResponseParser {
    buf: Vec<u8>,
    body_left: u64,
    /// The body being read belongs to a probe.
    probe: bool,
    lost: bool,
}

impl ResponseParser {
    /// Feeds bytes; `pending` holds the requests not answered yet, oldest first.
    pub fn feed(&mut self, mut bytes: &[u8], pending: &mut VecDeque<RequestInfo>) -> Counted {
        let mut c = Counted::default();
        while !self.lost && !bytes.is_empty() {
            if self.body_left > 0 {
                let n = self.body_left.min(bytes.len() as u64);
                self.body_left -= n;
                if !self.probe {
                    c.body_bytes += n;
                }
                bytes = &bytes[n as usize..];
                continue;
            }
            let before = self.buf.len();
            self.buf.extend_from_slice(bytes);
            let Some(len) = head_len(&self.buf) else {
                self.lost = self.buf.len() > MAX_HEAD;
                return c;
            };
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut resp = httparse::Response::new(&mut headers);
            let Ok(httparse::Status::Complete(_)) = resp.parse(&self.buf[..len]) else {
                self.lost = true;
                return c;
            };
            let status = resp.code.unwrap_or(0);
            if status >= 200 {
                let req = pending.pop_front().unwrap_or(RequestInfo {
                    head: false,
                    probe: false,
                });
                self.probe = req.probe;
                self.body_left = if req.head || status == 204 || status == 304 {
                    0
                } else if let Some(n) = content_length(resp.headers) {
                    n
                } else {
                    c.uncounted += 1;
                    self.lost = true;
                    0
                };
            }
            bytes = &bytes[len - before..];
            self.buf.clear();
        }
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_bodies_split_anywhere() {
        let reqs = b"GET /a HTTP/1.1\r\nRange: bytes=0-0\r\n\r\nGET /a HTTP/1.1\r\nRange: bytes=0-9\r\n\r\nHEAD /a HTTP/1.1\r\n\r\n";
        let resps = b"HTTP/1.1 206 Partial\r\nContent-Length: 1\r\n\r\nxHTTP/1.1 206 Partial\r\ncontent-length: 10\r\n\r\n0123456789HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n";
        for split in 1..resps.len() {
            let mut rp = RequestParser::default();
            let mut fwd = Vec::new();
            let mut pending: VecDeque<_> = rp.feed(&reqs[..7], &mut fwd).into();
            pending.extend(rp.feed(&reqs[7..], &mut fwd));
            assert_eq!(fwd, reqs);
            assert_eq!(pending.len(), 3);
            assert!(pending[0].probe && !pending[1].probe && pending[2].head);
            let mut p = ResponseParser::default();
            let a = p.feed(&resps[..split], &mut pending);
            let b = p.feed(&resps[split..], &mut pending);
            assert_eq!(a.body_bytes + b.body_bytes, 10, "split at {split}");
            assert!(pending.is_empty());
        }
    }

    #[test]
    fn host_is_the_origins() {
        let mut rp = RequestParser::with_host("img.example:8080".into());
        let mut fwd = Vec::new();
        let reqs = rp.feed(
            b"GET /a HTTP/1.1\r\nhost: 127.0.0.1:9\r\nRange: bytes=0-9\r\n\r\n",
            &mut fwd,
        );
        assert_eq!(reqs.len(), 1);
        assert_eq!(
            fwd,
            b"GET /a HTTP/1.1\r\nHost: img.example:8080\r\nRange: bytes=0-9\r\n\r\n"
        );
    }

    #[test]
    fn unknown_length_stops_counting() {
        let mut pending = VecDeque::from([RequestInfo {
            head: false,
            probe: false,
        }]);
        let mut p = ResponseParser::default();
        let c = p.feed(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello",
            &mut pending,
        );
        assert_eq!(c.uncounted, 1);
        assert_eq!(c.body_bytes, 0);
    }
}
