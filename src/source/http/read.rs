//! Reading a range: retries across the mirrors still in use, one attempt at a time, and the
//! refusal of a mirror that answers without the pinned validator.

use std::sync::atomic::Ordering;
use std::time::Duration;

use reqwest::header::{IF_MATCH, IF_UNMODIFIED_SINCE, RANGE};

use super::check::header_label;
use super::mirrors::MirrorSet;
use super::{Inner, Pin};
use crate::net::attempt::{request_error, Clock};
use crate::net::retry::Deadline;
use crate::source::SourceError;

impl Inner {
    /// Fills `buf` with `[offset, offset + buf.len())`, retrying transient errors across
    /// the mirrors still in use until the deadline.
    pub(super) async fn read_range(&self, offset: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        let backoff = self.opts.backoff();
        let deadline = Deadline::after(self.opts.deadline);
        let mut done = 0usize;
        // Failures since the last progress; every `usable` failures make one round.
        let mut failures: u32 = 0;
        let mut mirror = self.preferred.load(Ordering::Relaxed);
        loop {
            // The URLs may have been replaced since the last attempt (a refreshed
            // presigned URL): every attempt uses the current set.
            let set = self.mirror_set();
            mirror = set.usable_from(mirror)?;
            let before = done;
            let error = match self.fetch_once(&set, mirror, offset, buf, &mut done).await {
                Ok(()) => return Ok(()),
                // A refused mirror is out; the others may still serve the range.
                Err(e) if set.refused[mirror].get().is_some() => e,
                Err(e) if !e.is_transient() && !e.awaits_refresh() => return Err(e),
                Err(e) => e,
            };
            if done == buf.len() {
                // Every byte arrived and was checked; only the end of the exchange failed.
                return Ok(());
            }
            if done > before {
                failures = 0;
            }
            failures = failures.saturating_add(1);
            let next = set.usable_from(mirror + 1)?;
            // Steer other readers away from the failing mirror (unless one already did).
            let _ =
                self.preferred
                    .compare_exchange(mirror, next, Ordering::Relaxed, Ordering::Relaxed);
            let usable = set.usable_count().max(1);
            let round_done = failures as usize % usable == 0;
            let delay = if round_done {
                backoff.delay(failures / usable as u32 - 1)
            } else {
                Duration::ZERO
            };
            if !deadline.allows(delay) {
                tracing::warn!(
                    url = %set.mirrors[mirror].shown,
                    offset,
                    len = buf.len(),
                    error = %error,
                    "giving up on range: retry deadline passed"
                );
                return Err(error);
            }
            tracing::warn!(
                url = %set.mirrors[mirror].shown,
                next = %set.mirrors[next].shown,
                offset = offset + done as u64,
                len = buf.len() - done,
                failures,
                delay_ms = delay.as_millis() as u64,
                error = %error,
                "range request failed, retrying"
            );
            if !delay.is_zero() {
                // New URLs end the wait at once.
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = self.replaced.notified() => failures = 0,
                }
            }
            mirror = next;
        }
    }

    /// Stops using mirror `index`: it answered a range request without the pinned
    /// validator, so nothing proves its bytes belong to the pinned image. Logs once.
    pub(super) fn refuse(&self, set: &MirrorSet, index: usize) -> SourceError {
        let m = &set.mirrors[index];
        let label = header_label(&self.pin);
        let pinned = match &self.pin {
            Pin::ETag(etag) => etag,
            Pin::LastModified(date) => date,
        };
        let reason = format!(
            "the server answered a range request without the pinned {label} ({pinned}): \
             nothing proves the bytes are those of the pinned image (a server that ignores \
             the precondition and drops {label} can serve a replaced image), so this server \
             is not used"
        );
        if set.refused[index].set(reason.clone()).is_ok() {
            tracing::warn!(url = %m.shown, "{}: {reason}", m.shown);
        }
        SourceError::Unvalidated {
            url: m.shown.clone(),
            reason,
        }
    }

    /// One ranged `GET` for `buf[*done..]` (image bytes from `offset + *done`) on `mirror`,
    /// within the attempt budget. Advances `*done` by the bytes
    /// received and verified, even when the transfer breaks off later, so that a retry asks
    /// only for the rest.
    async fn fetch_once(
        &self,
        set: &MirrorSet,
        mirror: usize,
        offset: u64,
        buf: &mut [u8],
        done: &mut usize,
    ) -> Result<(), SourceError> {
        let m = &set.mirrors[mirror];
        let want = &mut buf[*done..];
        let start = offset + *done as u64;
        let end = start + want.len() as u64 - 1;
        let clock = Clock::start(&self.opts, want.len() as u64);
        let mut request = self
            .client
            .get(m.url.clone())
            .header(RANGE, format!("bytes={start}-{end}"));
        request = match &self.pin {
            Pin::ETag(etag) => request.header(IF_MATCH, etag),
            Pin::LastModified(date) => request.header(IF_UNMODIFIED_SINCE, date),
        };
        let mut response = self
            .auth
            .send(&clock, &self.opts, &m.shown, request)
            .await?;
        self.check_response(set, mirror, &response, start, end)?;

        let mut pos = 0usize;
        let outcome = loop {
            let piece = match clock.run(&m.shown, response.chunk()).await {
                Ok(Ok(Some(piece))) => piece,
                Ok(Ok(None)) => break Ok(()),
                Ok(Err(e)) => break Err(request_error(&self.opts, &m.shown, e)),
                Err(timeout) => break Err(timeout),
            };
            let Some(slot) = want.get_mut(pos..pos + piece.len()) else {
                // Framing is broken: do not trust any byte of this response.
                return Err(SourceError::BadResponse {
                    url: m.shown.clone(),
                    reason: format!(
                        "body longer than the {} bytes requested at {start}",
                        want.len()
                    ),
                });
            };
            slot.copy_from_slice(&piece);
            pos += piece.len();
        };
        *done += pos;
        outcome?;
        if pos != want.len() {
            return Err(SourceError::Transfer {
                url: m.shown.clone(),
                reason: format!(
                    "body ended after {pos} of {} bytes requested at {start}",
                    want.len()
                ),
            });
        }
        Ok(())
    }
}
