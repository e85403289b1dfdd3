//! Credentials and TLS trust of an HTTP source: extra request headers (inline or from
//! files), a bearer token read from a file (and read again when the server answers 401),
//! private CAs, the OS trust store and a client certificate.
//!
//! Secrets are read from files at run time, kept in memory only and never shown: header
//! values are marked sensitive, [`HttpAuth`]'s `Debug` prints header names only, and every
//! error about a header names the file and line, never the value.

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use reqwest::header::{HeaderMap, HeaderName, HeaderValue, AUTHORIZATION};
use reqwest::{ClientBuilder, RequestBuilder, Response, StatusCode};

use super::attempt::{request_error, Clock};
use super::HttpOptions;
use crate::source::SourceError;

/// Credentials and trust settings of an HTTP source (all empty by default: no extra
/// header, the bundled web PKI roots).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct HttpAuth {
    /// Extra request headers, each `Name: value` (`--header`).
    pub headers: Vec<String>,
    /// Files with one `Name: value` header per line; empty lines and lines starting with
    /// `#` are skipped (`--header-file`).
    pub header_files: Vec<PathBuf>,
    /// File holding a bearer token (`Authorization: Bearer TOKEN`); read at open and again
    /// whenever a request gets 401, which is then retried once (`--bearer-token-file`).
    pub bearer_token_file: Option<PathBuf>,
    /// PEM bundles of CA certificates trusted in addition to the roots (`--cacert`).
    pub cacerts: Vec<PathBuf>,
    /// Trust no bundled or system root: only the `cacerts` (`--no-default-roots`).
    pub no_default_roots: bool,
    /// Also trust the operating system's store (`--system-roots`).
    pub system_roots: bool,
    /// PEM client certificate (chain) for mutual TLS (`--client-cert`).
    pub client_cert: Option<PathBuf>,
    /// PEM private key of `client_cert` (`--client-key`).
    pub client_key: Option<PathBuf>,
}

impl fmt::Debug for HttpAuth {
    /// Header names only: values are secrets.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self
            .headers
            .iter()
            .map(|h| h.split_once(':').map_or("?", |(n, _)| n.trim()))
            .collect();
        f.debug_struct("HttpAuth")
            .field("headers", &names)
            .field("header_files", &self.header_files)
            .field("bearer_token_file", &self.bearer_token_file)
            .field("cacerts", &self.cacerts)
            .field("no_default_roots", &self.no_default_roots)
            .field("system_roots", &self.system_roots)
            .field("client_cert", &self.client_cert)
            .field("client_key", &self.client_key)
            .finish()
    }
}

impl HttpAuth {
    /// Checks combinations that cannot work, before anything is read.
    pub fn validate(&self) -> Result<(), SourceError> {
        if self.no_default_roots && self.cacerts.is_empty() && !self.system_roots {
            return Err(SourceError::Invalid(
                "HTTP options: --no-default-roots needs --cacert or --system-roots \
                 (nothing would be trusted)"
                    .into(),
            ));
        }
        if self.client_cert.is_some() != self.client_key.is_some() {
            return Err(SourceError::Invalid(
                "HTTP options: --client-cert and --client-key go together".into(),
            ));
        }
        Ok(())
    }

    /// Applies the extra headers and the trust settings to another client reaching the
    /// same servers (for the chunk-store fetcher). The bearer token is not included: it
    /// is sent per request and read again after a 401 (see `Auth::send`).
    pub fn configure(&self, builder: ClientBuilder) -> Result<ClientBuilder, SourceError> {
        self.validate()?;
        self.apply_tls(builder.default_headers(self.header_map()?))
    }

    /// The extra headers (inline, then from the files), values marked sensitive.
    pub fn header_map(&self) -> Result<HeaderMap, SourceError> {
        let mut map = HeaderMap::new();
        for (i, line) in self.headers.iter().enumerate() {
            let (name, value) = parse_header(line)
                .map_err(|why| invalid(format!("--header number {}: {why}", i + 1)))?;
            map.append(name, value);
        }
        for file in &self.header_files {
            let text = read_secret(file, "header file")?;
            for (n, line) in text.lines().enumerate() {
                let line = line.trim();
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                let (name, value) = parse_header(line).map_err(|why| {
                    invalid(format!(
                        "header file {} line {}: {why}",
                        file.display(),
                        n + 1
                    ))
                })?;
                map.append(name, value);
            }
        }
        Ok(map)
    }

    /// Applies the trust settings and the client identity to `builder`.
    pub fn apply_tls(&self, mut builder: ClientBuilder) -> Result<ClientBuilder, SourceError> {
        // With rustls, these two decide which built-in roots are loaded.
        builder = builder
            .tls_built_in_webpki_certs(!self.no_default_roots)
            .tls_built_in_native_certs(self.system_roots);
        for file in &self.cacerts {
            let pem =
                fs::read(file).map_err(|e| invalid(format!("--cacert {}: {e}", file.display())))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
                invalid(format!(
                    "--cacert {}: not a PEM certificate bundle ({e})",
                    file.display()
                ))
            })?;
            if certs.is_empty() {
                return Err(invalid(format!(
                    "--cacert {}: no certificate in the file",
                    file.display()
                )));
            }
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        if let (Some(cert), Some(key)) = (&self.client_cert, &self.client_key) {
            let mut pem = fs::read(cert)
                .map_err(|e| invalid(format!("--client-cert {}: {e}", cert.display())))?;
            pem.push(b'\n');
            pem.extend_from_slice(read_secret(key, "--client-key")?.as_bytes());
            let identity = reqwest::Identity::from_pem(&pem).map_err(|_| {
                invalid(format!(
                    "--client-cert {} / --client-key {}: not a PEM certificate and private key",
                    cert.display(),
                    key.display()
                ))
            })?;
            builder = builder.identity(identity);
        }
        Ok(builder)
    }
}

fn invalid(message: String) -> SourceError {
    SourceError::Invalid(message)
}

/// Reads a file holding a secret; the error names the file, never its content.
fn read_secret(path: &Path, what: &str) -> Result<String, SourceError> {
    fs::read_to_string(path).map_err(|e| invalid(format!("{what} {}: {e}", path.display())))
}

/// Parses `Name: value`; the error never contains the value.
fn parse_header(line: &str) -> Result<(HeaderName, HeaderValue), &'static str> {
    let (name, value) = line
        .split_once(':')
        .ok_or("not of the form 'Name: value'")?;
    let name = HeaderName::from_bytes(name.trim().as_bytes()).map_err(|_| "bad header name")?;
    let mut value = HeaderValue::from_str(value.trim())
        .map_err(|_| "the value has characters not allowed in a header")?;
    value.set_sensitive(true);
    Ok((name, value))
}

/// A bearer token read from a file, read again after a 401.
struct Bearer {
    path: PathBuf,
    value: Mutex<HeaderValue>,
}

impl Bearer {
    fn load(path: &Path) -> Result<HeaderValue, SourceError> {
        let text = read_secret(path, "bearer token file")?;
        let token = text.trim();
        if token.is_empty() {
            return Err(invalid(format!(
                "bearer token file {}: empty",
                path.display()
            )));
        }
        let mut value = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| {
            invalid(format!(
                "bearer token file {}: the token has characters not allowed in a header",
                path.display()
            ))
        })?;
        value.set_sensitive(true);
        Ok(value)
    }

    fn current(&self) -> HeaderValue {
        self.value.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Per-request credentials of an open source (the static headers live in the client).
pub struct Auth {
    bearer: Option<Bearer>,
}

impl Auth {
    /// Reads the bearer token file, if any.
    pub fn new(opts: &HttpAuth) -> Result<Auth, SourceError> {
        let bearer = match &opts.bearer_token_file {
            None => None,
            Some(path) => Some(Bearer {
                value: Mutex::new(Bearer::load(path)?),
                path: path.clone(),
            }),
        };
        Ok(Auth { bearer })
    }

    fn authorize(&self, request: RequestBuilder) -> RequestBuilder {
        match &self.bearer {
            Some(b) => request.header(AUTHORIZATION, b.current()),
            None => request,
        }
    }

    /// Sends `request` (to the URL shown as `shown`) with the credentials within `clock`. A 401 with a bearer token file
    /// reads the file again and retries once (the token may have been rotated).
    pub async fn send(
        &self,
        clock: &Clock,
        opts: &HttpOptions,
        shown: &str,
        request: RequestBuilder,
    ) -> Result<Response, SourceError> {
        let again = request.try_clone();
        let response = clock
            .run(shown, self.authorize(request).send())
            .await?
            .map_err(|e| request_error(opts, shown, e))?;
        let (Some(bearer), Some(again)) = (&self.bearer, again) else {
            return Ok(response);
        };
        if response.status() != StatusCode::UNAUTHORIZED {
            return Ok(response);
        }
        let fresh = Bearer::load(&bearer.path)?;
        tracing::info!(
            url = %shown,
            file = %bearer.path.display(),
            "HTTP 401: read the bearer token file again, retrying once"
        );
        *bearer.value.lock().unwrap_or_else(|e| e.into_inner()) = fresh;
        drop(response);
        clock
            .run(shown, self.authorize(again).send())
            .await?
            .map_err(|e| request_error(opts, shown, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_parse_and_never_show_values() {
        let auth = HttpAuth {
            headers: vec!["X-Token: s3cret".into(), "X-Other:v".into()],
            ..HttpAuth::default()
        };
        let map = auth.header_map().unwrap();
        assert_eq!(map["x-token"], "s3cret");
        assert!(map["x-token"].is_sensitive());
        assert!(!format!("{auth:?}").contains("s3cret"));
        assert!(!format!("{map:?}").contains("s3cret"));
        for bad in ["no colon s3cret", "bad name: s3cret", "X: s3cret\u{1}"] {
            let auth = HttpAuth {
                headers: vec![bad.into()],
                ..HttpAuth::default()
            };
            let e = auth.header_map().unwrap_err().to_string();
            assert!(!e.contains("s3cret"), "{e}");
        }
    }

    #[test]
    fn header_file_skips_comments_and_names_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("h");
        fs::write(&file, "# comment\n\nX-A: one\nX-B: two\n").unwrap();
        let auth = HttpAuth {
            header_files: vec![file.clone()],
            ..HttpAuth::default()
        };
        let map = auth.header_map().unwrap();
        assert_eq!(
            (map["x-a"].as_bytes(), map["x-b"].as_bytes()),
            (&b"one"[..], &b"two"[..])
        );
        fs::write(&file, "X-A: one\ngarbage s3cret\n").unwrap();
        let e = auth.header_map().unwrap_err().to_string();
        assert!(e.contains("line 2") && !e.contains("s3cret"), "{e}");
    }

    #[test]
    fn impossible_combinations_are_refused() {
        let no_roots = HttpAuth {
            no_default_roots: true,
            ..HttpAuth::default()
        };
        assert!(no_roots.validate().is_err());
        let half = HttpAuth {
            client_cert: Some("c.pem".into()),
            ..HttpAuth::default()
        };
        assert!(half.validate().is_err());
    }
}
