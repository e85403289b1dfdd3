//! Printing the lifecycle's reports: one JSON line (`--json`) or text.

use std::path::Path;

use serde::Serialize;
use serde_json::Value;

use super::size::human;
use super::Cli;
use crate::engine::{HydrateReport, Status};
use crate::migration::{CommitReport, PrepareReport};

/// Prints `value` as one JSON line with `--json`, else `text()`. A reader that went away
/// (`streamboot status DISK | head -1`) is not an error; another write failure is.
pub fn emit(cli: &Cli, value: Value, text: impl FnOnce() -> String) -> anyhow::Result<()> {
    use anyhow::Context;
    use std::io::Write;
    let line = if cli.json { value.to_string() } else { text() };
    match writeln!(std::io::stdout().lock(), "{line}") {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => r.context("writing to stdout"),
    }
}

/// A report's JSON object with `"ok": true` added.
pub fn ok_json(report: &impl Serialize) -> Value {
    let mut v = serde_json::to_value(report).unwrap_or_else(|_| Value::Object(Default::default()));
    if let Value::Object(m) = &mut v {
        m.insert("ok".into(), Value::Bool(true));
    }
    v
}

/// `prepare`'s one-line summary.
pub fn prepared_text(r: &PrepareReport) -> String {
    let s = &r.status;
    let seed = match &r.seed {
        Some(x) => format!(
            "; seeded {} from the local disk ({} chunks at the same address, {} moved)",
            human(x.bytes),
            x.chunks_same_address,
            x.chunks_moved
        ),
        None => String::new(),
    };
    format!(
        "prepared: {} boot chunks home ({} of source saved), released area of {} at byte {}, \
         {} slots of {}; state {}{seed}",
        s.chunks_home,
        human(s.bytes_saved_source),
        human(r.area_end - r.area_offset),
        r.area_offset,
        r.slot_count,
        human(r.chunk_size),
        s.state
    )
}

/// `status` of a prepared disk.
pub fn status_text(s: &Status) -> String {
    format!(
        "state:        {}\ntarget:       {} ({}, {})\nchunks:       {} of {}: {} home, {} in slots, {} zero, {} \
         missing ({:.1}% local)\ndirty chunks: {}\nsaved source: {} chunks ({})\nslots:        {} free of {}\n\
         seeded:       {}\ntrial starts: {} of {}",
        s.state,
        s.target_urls.join(", "),
        human(s.target_size),
        s.target_kind,
        s.chunks_total,
        human(s.chunk_size),
        s.chunks_home,
        s.chunks_slotted,
        s.chunks_zero,
        s.chunks_missing,
        s.local_fraction() * 100.0,
        s.chunks_dirty,
        s.chunks_saved_source,
        human(s.bytes_saved_source),
        s.slots_free,
        s.slots_total,
        human(s.bytes_seeded),
        s.start_counter,
        s.max_trial_starts
    )
}

/// `hydrate`'s summary.
pub fn hydrated_text(r: &HydrateReport) -> String {
    let mut t = format!(
        "hydrated {} in {:.1} s ({}/s), {} requests; {} chunks still missing",
        human(r.bytes),
        r.secs,
        human((r.bytes as f64 / r.secs.max(1e-9)) as u64),
        r.requests,
        r.missing
    );
    if r.area_full {
        t.push_str(
            "\nthe released area is full: commit fetches the rest straight to its home addresses",
        );
    }
    t
}

/// `commit`'s summary.
pub fn committed_text(disk: &Path, r: &CommitReport) -> String {
    if r.resumed == Some(true) {
        return format!(
            "committed: {} now holds the target ({}); finished an interrupted commit",
            disk.display(),
            human(r.target_size)
        );
    }
    format!(
        "committed: {} now holds the target ({}); fetched {} during commit",
        disk.display(),
        human(r.target_size),
        human(r.fetched)
    )
}
