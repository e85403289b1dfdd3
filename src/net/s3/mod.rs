//! S3-compatible object storage: the client of `s3://` raw images (`crate::source::s3`)
//! and chunk stores (`crate::store::s3`).
//!
//! The S3 protocol (request signing, XML errors, retries of throttled requests) is the
//! `object_store` crate's; this module picks the endpoint, region, addressing style and
//! credentials ([`S3Options`]) and classifies errors into one-line messages ([`S3Error`]).
//!
//! # Credentials
//! The standard chain, first match wins (docs/s3.md):
//! 1. `--aws-profile NAME`: that profile of the shared credentials file;
//! 2. the environment: `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`;
//! 3. the shared credentials file (`AWS_SHARED_CREDENTIALS_FILE`, else
//!    `~/.aws/credentials`), profile `AWS_PROFILE` or `default`;
//! 4. `object_store`'s own providers (web identity, ECS/EKS container, instance metadata).
//!
//! Keys live in memory only: they are never printed, logged or written to the disk (the
//! superblock records `s3://bucket/key`; see `crate::target`).

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use object_store::aws::{AmazonS3, AmazonS3Builder, AwsCredential};
use object_store::path::Path as ObjectPath;
use object_store::{BackoffConfig, ClientOptions, RetryConfig, StaticCredentialProvider};

mod creds;

/// Where and how to reach S3 (`--s3-endpoint`, `--s3-region`, `--s3-path-style`,
/// `--aws-profile`), plus the network timeouts of the other sources.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct S3Options {
    /// Endpoint URL of an S3-compatible service (default: `AWS_ENDPOINT_URL`, else AWS).
    pub endpoint: Option<String>,
    /// Region (default: `AWS_REGION`, `AWS_DEFAULT_REGION`, the profile's, `us-east-1`).
    pub region: Option<String>,
    /// Path-style requests (`ENDPOINT/bucket/key`) instead of virtual-hosted ones
    /// (`bucket.ENDPOINT/key`).
    pub path_style: bool,
    /// Profile of the shared credentials file; overrides the environment's keys.
    pub profile: Option<String>,
}

/// An `s3://bucket/key` location.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct S3Url {
    pub bucket: String,
    /// Object key or store prefix, without leading or trailing `/` (may be empty).
    pub key: String,
}

impl S3Url {
    /// Parses `s3://bucket/key`; `None` for another scheme.
    pub fn parse(s: &str) -> Option<Result<Self, S3Error>> {
        let rest = s.strip_prefix("s3://")?;
        let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
        let valid_bucket = !bucket.is_empty()
            && bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-.".contains(&b));
        if !valid_bucket || rest.contains(['?', '#']) {
            return Some(Err(S3Error::BadUrl(super::redact_url(s))));
        }
        Some(Ok(S3Url {
            bucket: bucket.to_owned(),
            key: key.trim_matches('/').to_owned(),
        }))
    }

    /// `s3://bucket/key/rel` (or the URL itself for an empty `rel`).
    pub fn join(&self, rel: &str) -> String {
        match (self.key.as_str(), rel) {
            (k, "") => format!("s3://{}/{k}", self.bucket),
            ("", r) => format!("s3://{}/{r}", self.bucket),
            (k, r) => format!("s3://{}/{k}/{r}", self.bucket),
        }
    }

    /// Object path of `rel` under this URL's key.
    pub fn path(&self, rel: &str) -> ObjectPath {
        let full = match (self.key.as_str(), rel) {
            (k, "") => k.to_owned(),
            ("", r) => r.to_owned(),
            (k, r) => format!("{k}/{r}"),
        };
        ObjectPath::from(full)
    }
}

impl fmt::Display for S3Url {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.join(""))
    }
}

/// True when `s` is an `s3://` URL.
pub fn is_s3_url(s: &str) -> bool {
    s.starts_with("s3://")
}

/// What went wrong talking to S3; each message is one line naming the `s3://` URL.
#[derive(Debug, thiserror::Error)]
pub enum S3Error {
    #[error("{0}: not a valid s3://bucket/key URL")]
    BadUrl(String),
    /// Wrong or unknown keys, an expired session token, a clock far off.
    #[error("S3 refused the credentials for {url}: {code}: {message}")]
    Credentials {
        url: String,
        code: String,
        message: String,
    },
    /// The keys are valid but do not grant this access.
    #[error("{url}: access denied by S3: {message}")]
    AccessDenied { url: String, message: String },
    #[error("{url}: no such object")]
    NoSuchObject { url: String },
    #[error("{url}: no such bucket {bucket:?}")]
    NoSuchBucket { url: String, bucket: String },
    /// Connection refused, DNS failure, timeouts after object_store's retries.
    #[error("cannot reach the S3 endpoint for {url}: {reason}")]
    Unreachable { url: String, reason: String },
    /// Another answer S3 gave (5xx after retries, a malformed response...).
    #[error("{url}: S3 request failed: {reason}")]
    Request { url: String, reason: String },
    /// A failure while no static keys were found (see [`S3Client::classify`]).
    #[error(
        "{0} (no AWS keys found in --aws-profile, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or \
         the shared credentials file; web identity, container and instance-metadata \
         credentials were tried)"
    )]
    NoStaticKeys(Box<S3Error>),
    /// The credentials file or profile cannot be used.
    #[error("AWS credentials: {0}")]
    Config(String),
}

impl S3Error {
    /// True when a later attempt may succeed (network, server errors).
    pub fn is_transient(&self) -> bool {
        self.kind() == super::NetErrorKind::Transient
    }

    /// What the failure means for the caller, in the terms of every network error.
    pub fn kind(&self) -> super::NetErrorKind {
        use super::NetErrorKind as K;
        match self {
            S3Error::Unreachable { .. } | S3Error::Request { .. } => K::Transient,
            S3Error::NoStaticKeys(e) => e.kind(),
            S3Error::NoSuchObject { .. } | S3Error::NoSuchBucket { .. } => K::NotFound,
            S3Error::AccessDenied { .. } => K::Forbidden,
            S3Error::Credentials { .. } => K::Unauthorized,
            S3Error::BadUrl(_) | S3Error::Config(_) => K::Invalid,
        }
    }
}

/// A configured S3 client of one bucket. Blocking calls go through
/// [`S3Client::block_on`], on the network layer's one runtime.
pub struct S3Client {
    store: AmazonS3,
    rt: tokio::runtime::Handle,
    /// Keys came from the profile, the environment or the credentials file (not from
    /// object_store's providers).
    static_keys: bool,
}

impl fmt::Debug for S3Client {
    /// No keys: only that a client exists.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Client").finish_non_exhaustive()
    }
}

impl S3Client {
    /// A client of `bucket`. `connect_timeout` bounds connecting; `request_timeout` one
    /// request (object_store retries transient failures a few times within it).
    pub fn new(
        bucket: &str,
        opts: &S3Options,
        connect_timeout: Duration,
        request_timeout: Duration,
    ) -> Result<Self, S3Error> {
        let mut b = AmazonS3Builder::new().with_bucket_name(bucket);
        let cred = creds::chain(opts.profile.as_deref())?;
        let static_keys = cred.is_some();
        if let Some(cred) = cred {
            b = b.with_credentials(Arc::new(StaticCredentialProvider::new(AwsCredential {
                key_id: cred.key_id,
                secret_key: cred.secret_key,
                token: cred.token,
            })));
        } else {
            // No static keys: object_store's providers (web identity, container, IMDS).
            b = AmazonS3Builder::from_env().with_bucket_name(bucket);
        }
        let region = opts
            .region
            .clone()
            .or_else(|| env_nonempty("AWS_REGION"))
            .or_else(|| env_nonempty("AWS_DEFAULT_REGION"))
            .or_else(|| creds::profile_region(opts.profile.as_deref()))
            .unwrap_or_else(|| "us-east-1".to_owned());
        b = b.with_region(region);
        let mut client = ClientOptions::new()
            .with_connect_timeout(connect_timeout)
            .with_timeout(request_timeout.max(Duration::from_secs(60)))
            .with_user_agent(http::HeaderValue::from_static(concat!(
                "streamboot/",
                env!("CARGO_PKG_VERSION")
            )));
        let endpoint = opts
            .endpoint
            .clone()
            .or_else(|| env_nonempty("AWS_ENDPOINT_URL"));
        if let Some(ep) = endpoint {
            let ep = bucket_endpoint(&ep, bucket, opts.path_style);
            client = client.with_allow_http(ep.starts_with("http://"));
            b = b.with_endpoint(ep);
        }
        let retry = RetryConfig {
            backoff: BackoffConfig {
                init_backoff: Duration::from_millis(100),
                max_backoff: Duration::from_secs(2),
                base: 2.0,
            },
            max_retries: 3,
            retry_timeout: request_timeout,
        };
        let store = b
            .with_virtual_hosted_style_request(!opts.path_style)
            .with_client_options(client)
            .with_retry(retry)
            .build()
            .map_err(|e| S3Error::Config(format!("cannot set up the S3 client: {e}")))?;
        let rt = super::client::runtime()
            .map_err(|e| S3Error::Config(format!("cannot start the network runtime: {e}")))?;
        Ok(S3Client {
            store,
            rt,
            static_keys,
        })
    }

    /// [`classify`], noting when no static keys were found: then object_store's
    /// providers (instance metadata...) were asked, and their failure is the likely cause.
    pub fn classify(&self, url: &str, bucket: &str, e: object_store::Error) -> S3Error {
        let e = classify(url, bucket, e);
        match e {
            S3Error::Request { .. }
            | S3Error::Unreachable { .. }
            | S3Error::AccessDenied { .. }
                if !self.static_keys =>
            {
                S3Error::NoStaticKeys(Box::new(e))
            }
            e => e,
        }
    }

    /// The object store.
    pub fn store(&self) -> &AmazonS3 {
        &self.store
    }

    /// Runs `fut` to completion on the network runtime, from any thread (also from inside
    /// another runtime: [`super::client::block_on_anywhere`]).
    pub fn block_on<F: Future + Send>(&self, fut: F) -> F::Output
    where
        F::Output: Send,
    {
        super::client::block_on_anywhere(&self.rt, fut)
    }
}

/// The endpoint object_store is given: `ENDPOINT` for path-style requests, else the
/// bucket as the first label of its host (`https://BUCKET.HOST`).
fn bucket_endpoint(endpoint: &str, bucket: &str, path_style: bool) -> String {
    let ep = endpoint.trim_end_matches('/');
    if path_style {
        return ep.to_owned();
    }
    let scheme_end = ep.find("://").map_or(0, |i| i + 3);
    format!("{}{bucket}.{}", &ep[..scheme_end], &ep[scheme_end..])
}

fn env_nonempty(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// Classifies an object_store error for `url` (an `s3://` URL, which holds no secret).
pub fn classify(url: &str, bucket: &str, e: object_store::Error) -> S3Error {
    let text = chain_text(&e);
    let code = xml_field(&text, "Code").unwrap_or_default();
    let message = xml_field(&text, "Message").unwrap_or_else(|| code.clone());
    let url = url.to_owned();
    match code.as_str() {
        "SignatureDoesNotMatch"
        | "InvalidAccessKeyId"
        | "InvalidToken"
        | "ExpiredToken"
        | "TokenRefreshRequired"
        | "RequestTimeTooSkewed"
        | "AuthorizationHeaderMalformed"
        | "InvalidClientTokenId" => {
            return S3Error::Credentials { url, code, message };
        }
        "NoSuchBucket" => {
            return S3Error::NoSuchBucket {
                url,
                bucket: bucket.to_owned(),
            }
        }
        "NoSuchKey" => return S3Error::NoSuchObject { url },
        "AccessDenied" => return S3Error::AccessDenied { url, message },
        _ => {}
    }
    match e {
        object_store::Error::NotFound { .. } => S3Error::NoSuchObject { url },
        object_store::Error::PermissionDenied { .. }
        | object_store::Error::Unauthenticated { .. } => S3Error::AccessDenied {
            url,
            message: if message.is_empty() {
                "HTTP 403".into()
            } else {
                message
            },
        },
        _ if code.is_empty() && !text.contains("Server returned") => S3Error::Unreachable {
            url,
            reason: innermost(&e),
        },
        _ => S3Error::Request {
            url,
            reason: if code.is_empty() {
                innermost(&e)
            } else {
                format!("{code}: {message}")
            },
        },
    }
}

/// The error and its causes, joined: object_store keeps S3's XML answer in a cause.
fn chain_text(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cur = c.source();
    }
    text
}

/// The innermost cause of `e` (the reason, without the wrappers' repeated prefixes).
fn innermost(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string().replace(['\n', '\r'], " ")
}

/// The text of `<field>…</field>` in an S3 XML error body.
fn xml_field(text: &str, field: &str) -> Option<String> {
    let open = format!("<{field}>");
    let start = text.find(&open)? + open.len();
    let len = text[start..].find(&format!("</{field}>"))?;
    Some(text[start..start + len].replace(['\n', '\r'], " "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_and_join() {
        let u = S3Url::parse("s3://bkt/a/b.img").unwrap().unwrap();
        assert_eq!((u.bucket.as_str(), u.key.as_str()), ("bkt", "a/b.img"));
        assert_eq!(u.to_string(), "s3://bkt/a/b.img");
        let store = S3Url::parse("s3://bkt/").unwrap().unwrap();
        assert_eq!(store.join("chunks/x"), "s3://bkt/chunks/x");
        assert_eq!(store.path("chunks/x").as_ref(), "chunks/x");
        assert!(S3Url::parse("http://x").is_none());
        for bad in [
            "s3://",
            "s3://Upper/k",
            "s3://b/k?x=1",
            "s3://key:secret@b/k",
        ] {
            let e = S3Url::parse(bad).unwrap().unwrap_err().to_string();
            assert!(!e.contains("secret"), "{e}");
        }
        assert_eq!(S3Url::parse("s3://b/a@b").unwrap().unwrap().key, "a@b");
    }

    #[test]
    fn endpoints_are_path_style_or_virtual_hosted() {
        let ep = "https://minio.example:9000/";
        assert_eq!(bucket_endpoint(ep, "b", true), "https://minio.example:9000");
        assert_eq!(
            bucket_endpoint(ep, "b", false),
            "https://b.minio.example:9000"
        );
    }

    #[test]
    fn s3_error_codes_classify() {
        let t = "Generic S3 error: Error performing GET http://h/b/k in 1ms - Server returned \
                 non-2xx status code: 403 Forbidden: <?xml version=\"1.0\"?><Error>\
                 <Code>SignatureDoesNotMatch</Code><Message>The request signature we \
                 calculated does not match</Message></Error>";
        assert_eq!(
            xml_field(t, "Code").as_deref(),
            Some("SignatureDoesNotMatch")
        );
    }
}
