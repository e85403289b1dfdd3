//! [`S3Source`]: one S3 object read as a pinned raw image (ranged `GET`s, `If-Match` on
//! the ETag pinned at open).

use std::fmt;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use object_store::path::Path as ObjectPath;
use object_store::{GetOptions, GetRange, ObjectStore};

use crate::net::s3::{S3Client, S3Error, S3Options, S3Url};
use crate::source::{
    check_range, CancellationToken, HttpOptions, RemoteSource, SourceError, SourceIdentity,
};

/// One S3 object read as a pinned raw image.
pub struct S3Source {
    client: S3Client,
    url: S3Url,
    shown: String,
    path: ObjectPath,
    e_tag: String,
    identity: SourceIdentity,
    /// How long one read retries transient errors (`--fetch-deadline`; `None`: forever).
    deadline: Option<Duration>,
}

impl fmt::Debug for S3Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Source")
            .field("url", &self.shown)
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

impl S3Source {
    /// Opens `s3://bucket/key`: a `HEAD` pins its size and ETag; with `expected`, an object
    /// other than the pinned one is refused.
    pub fn open(
        url: &str,
        expected: Option<&SourceIdentity>,
        opts: &S3Options,
        http: &HttpOptions,
    ) -> Result<Self, SourceError> {
        let parsed = S3Url::parse(url).unwrap_or_else(|| Err(S3Error::BadUrl(url.to_owned())))?;
        if parsed.key.is_empty() {
            return Err(S3Error::BadUrl(url.to_owned()).into());
        }
        let shown = parsed.to_string();
        let client = S3Client::new(
            &parsed.bucket,
            opts,
            http.connect_timeout,
            http.request_timeout,
        )?;
        let path = parsed.path("");
        let meta = client
            .block_on(probe(&client, &path))
            .map_err(|e| client.classify(&shown, &parsed.bucket, e))?;
        let Some(e_tag) = meta.e_tag.clone() else {
            return Err(SourceError::Unvalidated {
                url: shown,
                reason: "S3 gives the object no ETag: it cannot be pinned".into(),
            });
        };
        let identity = SourceIdentity {
            kind: "s3".into(),
            size: meta.size,
            validator: e_tag.clone(),
        };
        if let Some(want) = expected {
            if *want != identity {
                return Err(SourceError::Changed {
                    url: shown,
                    expected: want.to_string(),
                    found: identity.to_string(),
                });
            }
        }
        Ok(S3Source {
            client,
            url: parsed,
            shown,
            path,
            e_tag,
            identity,
            deadline: http.deadline,
        })
    }

    /// One ranged GET of `[offset, offset+buf.len())`, pinned to the ETag.
    async fn get_once(&self, offset: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        let end = offset + buf.len() as u64;
        let opts = GetOptions {
            if_match: Some(self.e_tag.clone()),
            range: Some(GetRange::Bounded(offset..end)),
            ..GetOptions::default()
        };
        let res = match self.client.store().get_opts(&self.path, opts).await {
            Ok(r) => r,
            Err(object_store::Error::Precondition { .. }) => {
                return Err(self.changed("a different ETag"))
            }
            Err(e) => {
                return Err(self
                    .client
                    .classify(&self.shown, &self.url.bucket, e)
                    .into())
            }
        };
        if res.meta.size != self.identity.size {
            return Err(self.changed(&format!("size={}", res.meta.size)));
        }
        if res.range != (offset..end) {
            return Err(SourceError::Net(crate::net::NetError::BadResponse {
                url: self.shown.clone(),
                reason: format!("asked for bytes {offset}..{end}, got {:?}", res.range),
            }));
        }
        // Streamed into `buf`: a server sending more than the range is cut off, never
        // buffered.
        let mut body = res.into_stream();
        let mut filled = 0;
        while let Some(part) = body.next().await {
            let part = part.map_err(|e| self.client.classify(&self.shown, &self.url.bucket, e))?;
            let Some(dest) = buf.get_mut(filled..filled + part.len()) else {
                return Err(self.short_or_long(filled + part.len(), buf.len()));
            };
            dest.copy_from_slice(&part);
            filled += part.len();
        }
        if filled != buf.len() {
            return Err(self.short_or_long(filled, buf.len()));
        }
        Ok(())
    }

    fn short_or_long(&self, got: usize, want: usize) -> SourceError {
        SourceError::Net(crate::net::NetError::BadResponse {
            url: self.shown.clone(),
            reason: format!("{got} bytes (or more) for a {want}-byte range"),
        })
    }

    fn changed(&self, found: &str) -> SourceError {
        SourceError::Changed {
            url: self.shown.clone(),
            expected: self.identity.to_string(),
            found: found.to_owned(),
        }
    }

    /// Reads with retries of transient errors until the deadline or `cancel`.
    async fn read_retrying(
        &self,
        offset: u64,
        buf: &mut [u8],
        cancel: &CancellationToken,
    ) -> Result<(), SourceError> {
        let start = Instant::now();
        let mut delay = Duration::from_millis(200);
        loop {
            let res = tokio::select! {
                r = self.get_once(offset, buf) => r,
                _ = cancel.cancelled() => return Err(SourceError::Cancelled),
            };
            match res {
                Err(e) if e.is_transient() => {
                    if self.deadline.is_some_and(|d| start.elapsed() >= d) {
                        return Err(e);
                    }
                    tracing::debug!("{e}; retrying in {delay:?}");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = cancel.cancelled() => return Err(SourceError::Cancelled),
                    }
                    delay = (delay * 2).min(Duration::from_secs(10));
                }
                other => return other,
            }
        }
    }
}

impl RemoteSource for S3Source {
    fn identity(&self) -> &SourceIdentity {
        &self.identity
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        self.read_at_cancellable(offset, buf, &CancellationToken::new())
    }

    fn read_at_cancellable(
        &self,
        offset: u64,
        buf: &mut [u8],
        cancel: &CancellationToken,
    ) -> Result<(), SourceError> {
        check_range(offset, buf.len(), self.identity.size)?;
        if buf.is_empty() {
            return Ok(());
        }
        self.client
            .block_on(self.read_retrying(offset, buf, cancel))
    }

    fn name(&self) -> String {
        self.shown.clone()
    }
}

/// The object's metadata from a one-byte `GET` rather than a `HEAD`: an error answer to a
/// `GET` carries S3's error code (`SignatureDoesNotMatch`, `NoSuchBucket`...), one to a
/// `HEAD` only a status. An empty object (which has no byte 0) is asked with a `HEAD`.
async fn probe(
    client: &S3Client,
    path: &ObjectPath,
) -> Result<object_store::ObjectMeta, object_store::Error> {
    let opts = GetOptions {
        range: Some(GetRange::Bounded(0..1)),
        ..GetOptions::default()
    };
    match client.store().get_opts(path, opts).await {
        Ok(res) => Ok(res.meta),
        Err(object_store::Error::Generic { source, .. })
            if source.to_string().contains("416")
                || source.to_string().contains("InvalidRange") =>
        {
            client.store().head(path).await
        }
        Err(e) => Err(e),
    }
}
