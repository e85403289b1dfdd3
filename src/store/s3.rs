//! Chunk stores on S3 (`s3://bucket/prefix`): the same layout as a directory store
//! (`chunks/`, `indexes/` under the prefix; docs/chunk-store.md), reached through
//! [`crate::net::s3::S3Client`].
//!
//! - reading ([`S3Store::get_many`]) backs [`super::fetch::Fetcher`] for `s3://` locations;
//! - `publish` stages into a local temporary store, then uploads the chunk objects the
//!   bucket lacks and the index last ([`publish`]): a reader never sees an index whose
//!   objects are not there yet;
//! - `store gc` and `store stats` list the bucket ([`gc`], [`stats`]). S3 has no lock:
//!   gc deletes only unreferenced objects older than a grace period, so that objects a
//!   concurrent publish uploaded before its index are kept.

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use futures_util::{StreamExt, TryStreamExt};
use object_store::{ObjectStore, PutPayload};

use super::fetch::FetchOptions;
use super::index::{Index, Trust};
use super::layout::{parse_object_name, CHUNKS_DIR, INDEXES_DIR, INDEX_SUFFIX};
use super::{ChunkHash, StoreError};
use crate::net::s3::{S3Client, S3Error, S3Url};
use crate::net::NetError;

/// Largest index read while listing (as a reader's limit).
const MAX_INDEX_LEN: u64 = 1 << 30;

/// A store under `s3://bucket/prefix`.
#[derive(Debug)]
pub struct S3Store {
    url: S3Url,
    client: S3Client,
    concurrency: usize,
}

/// One object listed under the store.
#[derive(Debug, Clone)]
pub struct Listed {
    /// Path relative to the store root (`chunks/ab/…`).
    pub rel: String,
    pub size: u64,
    pub age: Duration,
}

impl S3Store {
    /// Opens the store at `base` (`s3://bucket/prefix`).
    pub fn open(base: &str, opts: &FetchOptions) -> Result<Self, S3Error> {
        let url = S3Url::parse(base).unwrap_or_else(|| Err(S3Error::BadUrl(base.to_owned())))?;
        let client = S3Client::new(
            &url.bucket,
            &opts.http.s3,
            opts.http.connect_timeout,
            opts.http.request_timeout,
        )?;
        Ok(S3Store {
            url,
            client,
            concurrency: opts.concurrency.max(1),
        })
    }

    /// `s3://bucket/prefix/rel`, for messages.
    pub fn describe(&self, rel: &str) -> String {
        self.url.join(rel)
    }

    fn err(&self, rel: &str, e: object_store::Error) -> S3Error {
        self.client
            .classify(&self.describe(rel), &self.url.bucket, e)
    }

    async fn get_one(&self, rel: &str, max_len: u64) -> Result<Vec<u8>, NetError> {
        let res = self
            .client
            .store()
            .get(&self.url.path(rel))
            .await
            .map_err(|e| self.err(rel, e))?;
        if res.meta.size > max_len {
            return Err(NetError::BadResponse {
                url: self.describe(rel),
                reason: format!("{} bytes, more than the {max_len} allowed", res.meta.size),
            });
        }
        // Streamed with a cap: a body longer than announced is cut off, never buffered.
        let mut body = res.into_stream();
        let mut out = Vec::with_capacity(res_size_hint(max_len));
        while let Some(part) = body.next().await {
            let part = part.map_err(|e| self.err(rel, e))?;
            if (out.len() + part.len()) as u64 > max_len {
                return Err(NetError::BadResponse {
                    url: self.describe(rel),
                    reason: format!("more than the {max_len} bytes allowed"),
                });
            }
            out.extend_from_slice(&part);
        }
        Ok(out)
    }

    /// Gets several files concurrently; one result per request, in order.
    pub fn get_many(&self, reqs: &[(String, u64)]) -> Vec<Result<Vec<u8>, NetError>> {
        let fut = futures_util::stream::iter(reqs.iter())
            .map(|(rel, max)| self.get_one(rel, *max))
            .buffered(self.concurrency)
            .collect::<Vec<_>>();
        self.client.block_on(fut)
    }

    /// Uploads `data` as `rel`.
    pub fn put(&self, rel: &str, data: Vec<u8>) -> Result<(), S3Error> {
        let path = self.url.path(rel);
        self.client
            .block_on(self.client.store().put(&path, PutPayload::from(data)))
            .map(|_| ())
            .map_err(|e| self.err(rel, e))
    }

    /// Every object under `dir` (`chunks` or `indexes`).
    pub fn list(&self, dir: &str) -> Result<Vec<Listed>, S3Error> {
        let root = self.url.path("");
        let prefix = self.url.path(dir);
        let now = std::time::SystemTime::now();
        let fut = self
            .client
            .store()
            .list(Some(&prefix))
            .map_ok(|m| {
                let rel = m
                    .location
                    .prefix_match(&root)
                    .map(|parts| parts.map(|p| p.as_ref().to_owned()).collect::<Vec<_>>())
                    .unwrap_or_default()
                    .join("/");
                let modified: std::time::SystemTime = m.last_modified.into();
                let age = now.duration_since(modified).unwrap_or(Duration::ZERO);
                Listed {
                    rel,
                    size: m.size,
                    age,
                }
            })
            .try_collect::<Vec<_>>();
        self.client
            .block_on(fut)
            .map_err(|e| self.err(&format!("{dir}/"), e))
    }

    /// Deletes `rel` (a missing object is not an error).
    pub fn delete(&self, rel: &str) -> Result<(), S3Error> {
        match self
            .client
            .block_on(self.client.store().delete(&self.url.path(rel)))
        {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.err(rel, e)),
        }
    }

    /// Names and bytes of every index of the store.
    pub fn indexes(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let listed = self.list(INDEXES_DIR).map_err(s3_store_err)?;
        let names: Vec<(String, String)> = listed
            .into_iter()
            .filter_map(|l| {
                let file = l.rel.rsplit('/').next()?.to_owned();
                let name = file.strip_suffix(INDEX_SUFFIX)?.to_owned();
                Some((name, l.rel))
            })
            .collect();
        let reqs: Vec<(String, u64)> = names
            .iter()
            .map(|(_, rel)| (rel.clone(), MAX_INDEX_LEN))
            .collect();
        let mut out = Vec::new();
        for ((name, _), got) in names.into_iter().zip(self.get_many(&reqs)) {
            out.push((name, got.map_err(source_store_err)?));
        }
        Ok(out)
    }

    /// Every chunk object: relative path, size and age, hash and form (compressed).
    pub fn chunk_objects(&self) -> Result<Vec<ChunkObject>, StoreError> {
        Ok(self
            .list(CHUNKS_DIR)
            .map_err(s3_store_err)?
            .into_iter()
            .filter_map(|l| {
                let file = l.rel.rsplit('/').next()?;
                let (hash, compressed) = parse_object_name(file)?;
                Some(ChunkObject {
                    listed: l,
                    hash,
                    compressed,
                })
            })
            .collect())
    }
}

/// Initial capacity for a body of at most `max_len` bytes (grown as it arrives).
fn res_size_hint(max_len: u64) -> usize {
    max_len.min(4 << 20) as usize
}

/// A chunk object found in the bucket.
#[derive(Debug, Clone)]
pub struct ChunkObject {
    pub listed: Listed,
    pub hash: ChunkHash,
    pub compressed: bool,
}

/// An S3 error of store maintenance.
pub fn s3_store_err(e: S3Error) -> StoreError {
    StoreError::Remote(NetError::S3(e))
}

fn source_store_err(e: NetError) -> StoreError {
    StoreError::Remote(e)
}

/// The chunk hashes the indexes of the store reference, and the number of indexes.
fn referenced(store: &S3Store) -> Result<(HashSet<ChunkHash>, u64), StoreError> {
    let mut all = HashSet::new();
    let mut count = 0;
    for (name, bytes) in store.indexes()? {
        let p = Index::parse(&bytes, Trust::Unverified).map_err(|e| StoreError::Index {
            path: store.describe(&super::layout::index_rel(&name)).into(),
            source: e,
        })?;
        all.extend(p.index.entries().iter().filter_map(|e| e.hash()));
        count += 1;
    }
    Ok((all, count))
}

/// What [`gc`] did (or would do with `dry_run`).
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct S3GcReport {
    pub indexes: u64,
    pub objects_kept: u64,
    pub objects_removed: u64,
    pub bytes_removed: u64,
    /// Unreferenced objects younger than the grace period, kept.
    pub objects_too_young: u64,
}

/// Deletes chunk objects no index references and older than `grace`.
pub fn gc(store: &S3Store, grace: Duration, dry_run: bool) -> Result<S3GcReport, StoreError> {
    let (live, indexes) = referenced(store)?;
    let mut report = S3GcReport {
        indexes,
        ..S3GcReport::default()
    };
    for c in store.chunk_objects()? {
        let obj = c.listed;
        if live.contains(&c.hash) {
            report.objects_kept += 1;
        } else if obj.age < grace {
            report.objects_too_young += 1;
        } else {
            if !dry_run {
                store.delete(&obj.rel).map_err(s3_store_err)?;
            }
            report.objects_removed += 1;
            report.bytes_removed += obj.size;
        }
    }
    Ok(report)
}

/// Uploads a store staged in the local directory `staged` (one publish's result) to
/// `store`: chunk objects first, then the index of `name`. An object is skipped only when
/// the bucket has it and an index of the bucket references it (`live`): an unreferenced
/// one may be deleted by a concurrent gc, so it is uploaded again, which also makes it
/// young enough for gc's grace period. Returns the number of objects uploaded.
pub fn upload_staged(
    store: &S3Store,
    staged: &Path,
    name: &str,
    live: &HashSet<ChunkHash>,
) -> Result<u64, StoreError> {
    let have: HashSet<String> = store
        .list(CHUNKS_DIR)
        .map_err(s3_store_err)?
        .into_iter()
        .map(|l| l.rel)
        .collect();
    let mut uploaded = 0;
    let chunks = staged.join(CHUNKS_DIR);
    let subs = std::fs::read_dir(&chunks).map_err(|e| StoreError::io(&chunks, e))?;
    for sub in subs {
        let sub = sub.map_err(|e| StoreError::io(&chunks, e))?.path();
        let files = std::fs::read_dir(&sub).map_err(|e| StoreError::io(&sub, e))?;
        for f in files {
            let path = f.map_err(|e| StoreError::io(&sub, e))?.path();
            let rel = path
                .strip_prefix(staged)
                .expect("listed under the staged store")
                .to_string_lossy()
                .into_owned();
            let object = path
                .file_name()
                .and_then(|f| f.to_str())
                .and_then(parse_object_name);
            let Some((hash, _)) = object else { continue };
            if have.contains(&rel) && live.contains(&hash) {
                continue;
            }
            let data = std::fs::read(&path).map_err(|e| StoreError::io(&path, e))?;
            store.put(&rel, data).map_err(s3_store_err)?;
            uploaded += 1;
        }
    }
    let rel = super::layout::index_rel(name);
    let index = staged.join(&rel);
    let data = std::fs::read(&index).map_err(|e| StoreError::io(&index, e))?;
    store.put(&rel, data).map_err(s3_store_err)?;
    Ok(uploaded)
}

/// Copies every index of `store` into the local store at `staged` (so that a staged
/// publish numbers its version after the bucket's); returns the chunk hashes they
/// reference.
pub fn download_indexes(store: &S3Store, staged: &Path) -> Result<HashSet<ChunkHash>, StoreError> {
    let dir = staged.join(INDEXES_DIR);
    let mut live = HashSet::new();
    for (name, bytes) in store.indexes()? {
        let path = dir.join(format!("{name}{INDEX_SUFFIX}"));
        let p = Index::parse(&bytes, Trust::Unverified).map_err(|e| StoreError::Index {
            path: store.describe(&super::layout::index_rel(&name)).into(),
            source: e,
        })?;
        live.extend(p.index.entries().iter().filter_map(|e| e.hash()));
        std::fs::write(&path, bytes).map_err(|e| StoreError::io(&path, e))?;
    }
    Ok(live)
}

/// `publish --store s3://…`: publishes `image` into a temporary local store holding
/// copies of the bucket's indexes (so the version follows the bucket's), then uploads the
/// new objects and the index last ([`upload_staged`]). The staging directory (under
/// `TMPDIR`) holds the image's new chunk objects until the upload ends; it is removed
/// whatever happens.
pub fn publish(
    image: &Path,
    store: &S3Store,
    name: &str,
    opts: &super::PublishOptions<'_>,
) -> Result<super::PublishReport, StoreError> {
    let staged = std::env::temp_dir().join(format!("streamboot-publish-{}", uuid::Uuid::new_v4()));
    let result = (|| {
        super::StoreDir::create(&staged)?;
        let live = download_indexes(store, &staged)?;
        let mut report = super::publish_with(image, &staged, name, opts)?;
        upload_staged(store, &staged, name, &live)?;
        report.index_path = store.describe(&super::layout::index_rel(name)).into();
        Ok(report)
    })();
    let _ = std::fs::remove_dir_all(&staged);
    result
}

/// `store stats s3://…`.
pub fn stats(store: &S3Store) -> Result<super::StoreStats, StoreError> {
    let indexes = store
        .indexes()?
        .into_iter()
        .map(|(name, bytes)| {
            let at = store.describe(&super::layout::index_rel(&name)).into();
            (name, at, bytes)
        })
        .collect();
    let on_disk = store
        .chunk_objects()?
        .into_iter()
        .map(|c| ((c.hash, c.compressed), c.listed.size))
        .collect();
    super::stats::compute(indexes, &on_disk)
}
