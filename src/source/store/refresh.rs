//! A chunk-store target whose location is replaced while serving (a presigned store URL
//! that expired, a store that moved): `POST /v1/target-urls` gives a new index location,
//! taken only when its index has the pinned hash. Reads that got HTTP 403 ("expired or
//! forbidden") wait for it, like the reads of a raw HTTP image, until the fetch deadline
//! (`--fetch-deadline`; `serve` waits forever by default) or a cancellation.

use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use super::{split_index_location, StoreSource};
use crate::net::retry::Deadline;
use crate::source::{CancellationToken, SourceError};
use crate::store::fetch::{Fetcher, StoreLocation};
use crate::store::index::{Index, Trust, MAX_INDEX_LEN};
use crate::store::layout::{index_rel, validate_name};

/// Longest sleep between checks for a cancellation while waiting.
const CANCEL_POLL: Duration = Duration::from_millis(200);

/// Counts replacements of the location and wakes waiting reads.
#[derive(Default)]
pub(super) struct Replaced {
    generation: Mutex<u64>,
    changed: Condvar,
}

impl Replaced {
    fn current(&self) -> u64 {
        *self.generation.lock()
    }

    fn bump(&self) {
        *self.generation.lock() += 1;
        self.changed.notify_all();
    }

    /// Waits until the generation is no longer `seen`, at most `limit`.
    fn wait(&self, seen: u64, limit: Duration) {
        let mut generation = self.generation.lock();
        if *generation == seen {
            self.changed.wait_for(&mut generation, limit);
        }
    }
}

impl StoreSource {
    /// [`RemoteSource::replace_urls`]: takes the index location `urls` (exactly one:
    /// `<store>/indexes/<name>.idx`) when the index found there is the pinned one (same
    /// hash), and wakes the reads waiting for it; otherwise nothing changes.
    pub(super) fn replace_location(&self, urls: &[String]) -> Result<(), SourceError> {
        let [url] = urls else {
            return Err(SourceError::Invalid(
                "a chunk-store target takes exactly one index URL".into(),
            ));
        };
        let (base, name) = split_index_location(url)?;
        validate_name(name).map_err(|e| SourceError::Invalid(e.to_string()))?;
        let fetcher = Fetcher::new(StoreLocation::parse(base), self.fetch_opts.clone())?;
        let rel = index_rel(name);
        let shown = fetcher.location().describe(&rel);
        let bytes = fetcher.get(&rel, MAX_INDEX_LEN)?;
        let found = Index::parse(&bytes, Trust::Unverified)
            .map_err(|e| SourceError::Verify {
                what: shown.clone(),
                reason: e.to_string(),
            })?
            .hash;
        if found != self.index_hash {
            return Err(SourceError::Changed {
                url: shown,
                expected: self.identity.to_string(),
                found: format!("store index {}", found.to_hex()),
            });
        }
        *self.fetcher.write() = Arc::new(fetcher);
        self.replaced.bump();
        tracing::info!(index = %shown, "chunk-store location replaced (same index hash)");
        Ok(())
    }

    /// Reads like [`Self::read_once`]; a 403 is waited out (backoff, woken early by a
    /// replaced location) until the fetch deadline, then returned.
    pub(super) fn read_waiting(
        &self,
        offset: u64,
        buf: &mut [u8],
        cancel: Option<&CancellationToken>,
    ) -> Result<(), SourceError> {
        let cancelled = || cancel.is_some_and(|c| c.is_cancelled());
        let deadline = Deadline::after(self.fetch_opts.http.deadline);
        let backoff = self.fetch_opts.http.backoff();
        let mut round = 0u32;
        loop {
            if cancelled() {
                return Err(SourceError::Cancelled);
            }
            let seen = self.replaced.current();
            let err = match self.read_once(offset, buf) {
                Err(e) if e.awaits_refresh() => e,
                done => return done,
            };
            let delay = backoff.delay(round);
            if !deadline.allows(delay) {
                return Err(err);
            }
            if round == 0 {
                tracing::warn!("{err}; the read waits for a new location (POST /v1/target-urls)");
            }
            let end = Instant::now() + delay;
            while self.replaced.current() == seen && !cancelled() {
                let left = end.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                self.replaced.wait(seen, left.min(CANCEL_POLL));
            }
            round = round.saturating_add(1);
        }
    }
}
