//! The set of URLs an image is read from, and its replacement while serving (a presigned
//! URL that expired is refreshed through the control API: `POST /v1/target-urls`).
//!
//! A replacement is probed like an open: every new URL that answers must serve the pinned
//! identity (same size and validator, of the kind recorded). Only then the whole set is
//! swapped; reads in flight finish their attempt on the old URLs and their next attempt
//! uses the new ones (a read waiting out a backoff is woken at once).

use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};

use futures_util::future::join_all;

use super::probe::{pin_mirrors, probe_with_retries};
use super::{identity_url, Inner, Mirror};
use crate::source::{SourceError, SourceIdentity};

/// The URLs in use and, per URL, why it is no longer used (it answered without the
/// pinned validator).
pub(super) struct MirrorSet {
    pub(super) mirrors: Vec<Mirror>,
    pub(super) refused: Vec<OnceLock<String>>,
}

impl MirrorSet {
    pub(super) fn new(mirrors: Vec<Mirror>) -> MirrorSet {
        MirrorSet {
            refused: mirrors.iter().map(|_| OnceLock::new()).collect(),
            mirrors,
        }
    }

    /// The first mirror still in use at or after `start` (wrapping around); when every
    /// mirror was refused, the first one's refusal.
    pub(super) fn usable_from(&self, start: usize) -> Result<usize, SourceError> {
        let n = self.mirrors.len();
        (0..n)
            .map(|i| (start + i) % n)
            .find(|&i| self.refused[i].get().is_none())
            .ok_or_else(|| {
                match (0..n).find_map(|i| self.refused[i].get().map(|r| (i, r.clone()))) {
                    Some((i, reason)) => SourceError::Unvalidated {
                        url: self.mirrors[i].shown.clone(),
                        reason,
                    },
                    None => SourceError::Invalid("no usable mirror".into()),
                }
            })
    }

    pub(super) fn usable_count(&self) -> usize {
        self.refused.iter().filter(|r| r.get().is_none()).count()
    }
}

impl Inner {
    /// Refuses a new URL whose location (without credentials and query) is not one of the
    /// current URLs': a refresh changes signatures or credentials, not where the image is.
    fn check_locations(&self, new: &[Mirror]) -> Result<(), SourceError> {
        let set = self.mirror_set();
        let current: Vec<String> = set
            .mirrors
            .iter()
            .map(|m| identity_url(m.url.as_str()))
            .collect();
        match new
            .iter()
            .find(|m| !current.contains(&identity_url(m.url.as_str())))
        {
            None => Ok(()),
            Some(m) => Err(SourceError::Invalid(format!(
                "{}: not a location of this target (read from {}); new URLs may change only \
                 the credentials or the signature (query string); to read the image from \
                 elsewhere, restart serve with --target",
                m.shown,
                current.join(", ")
            ))),
        }
    }

    /// The URLs in use now.
    pub(super) fn mirror_set(&self) -> Arc<MirrorSet> {
        self.set.read().clone()
    }

    /// Replaces the URLs after checking that they serve the pinned image; on any error
    /// nothing changes. See the module docs.
    pub(super) async fn replace_urls(&self, urls: &[String]) -> Result<(), SourceError> {
        if urls.is_empty() {
            return Err(SourceError::Invalid("no URL given for the image".into()));
        }
        let mirrors = urls
            .iter()
            .map(|u| Mirror::parse(u))
            .collect::<Result<Vec<_>, _>>()?;
        self.check_locations(&mirrors)?;
        let probes = join_all(
            mirrors
                .iter()
                .map(|m| probe_with_retries(&self.client, &self.auth, &self.opts, m)),
        )
        .await;
        let (first_ok, size, pin) = pin_mirrors(&mirrors, probes, Some(&self.identity))?;
        let found = SourceIdentity {
            kind: self.identity.kind.clone(),
            size,
            validator: pin.validator(),
        };
        if found != self.identity {
            return Err(SourceError::Changed {
                url: mirrors[first_ok].shown.clone(),
                expected: self.identity.to_string(),
                found: found.to_string(),
            });
        }
        let shown: Vec<String> = mirrors.iter().map(|m| m.shown.clone()).collect();
        *self.set.write() = Arc::new(MirrorSet::new(mirrors));
        self.preferred.store(first_ok, Ordering::Relaxed);
        self.replaced.notify_waiters();
        tracing::info!(urls = ?shown, "target URLs replaced (same pinned image)");
        Ok(())
    }
}
