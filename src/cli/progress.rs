//! Progress of long CLI work: bars on a terminal, JSON-lines events with `--json` (for
//! `hydrate` and `commit`), or nothing.

use std::io::Write;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use parking_lot::Mutex;
use serde_json::json;

/// Least time between two JSON progress events of one step (the first and the last
/// update of a step are always written).
const EVENT_EVERY: Duration = Duration::from_millis(250);

/// How progress is shown.
enum Mode {
    Hidden,
    Bars {
        bytes: bool,
    },
    /// `{"event":"progress","op":..,"step":..,"done":..,"total":..}` lines on stdout.
    Json {
        op: &'static str,
    },
}

/// Follows (step, done, total) updates, in bytes or chunks.
pub struct Bars {
    bar: Mutex<Option<(String, ProgressBar)>>,
    /// JSON mode: the current step and when its last event was written.
    last_event: Mutex<Option<(String, Instant)>>,
    mode: Mode,
}

impl Bars {
    /// New bars (nothing when `hidden`); `bytes` formats counts as bytes.
    pub fn new(hidden: bool, bytes: bool) -> Self {
        Self::with_mode(if hidden {
            Mode::Hidden
        } else {
            Mode::Bars { bytes }
        })
    }

    /// Bars on a terminal, or with `json` progress events of operation `op` as JSON lines
    /// on stdout (before the command's result line).
    pub fn or_events(json: bool, op: &'static str, bytes: bool) -> Self {
        Self::with_mode(if json {
            Mode::Json { op }
        } else {
            Mode::Bars { bytes }
        })
    }

    fn with_mode(mode: Mode) -> Self {
        Self {
            bar: Mutex::new(None),
            last_event: Mutex::new(None),
            mode,
        }
    }

    /// Updates (or starts) the bar for `step`.
    pub fn update(&self, step: &str, done: u64, total: u64) {
        match self.mode {
            Mode::Hidden => {}
            Mode::Json { op } => self.event(op, step, done, total),
            Mode::Bars { bytes } => self.bar(bytes, step, done, total),
        }
    }

    fn event(&self, op: &str, step: &str, done: u64, total: u64) {
        let mut last = self.last_event.lock();
        let due = match last.as_ref() {
            Some((s, at)) if s == step => done >= total || at.elapsed() >= EVENT_EVERY,
            _ => true,
        };
        if due {
            *last = Some((step.to_string(), Instant::now()));
            progress_event(op, step, done, total);
        }
    }

    fn bar(&self, bytes: bool, step: &str, done: u64, total: u64) {
        let mut g = self.bar.lock();
        if g.as_ref().is_none_or(|(s, _)| s != step) {
            if let Some((_, b)) = g.take() {
                b.finish();
            }
            let b = ProgressBar::new(total);
            let tpl = if bytes {
                "{msg:32} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}"
            } else {
                "{msg:32} [{bar:30}] {pos}/{len} eta {eta}"
            };
            b.set_style(
                ProgressStyle::with_template(tpl)
                    .expect("valid template")
                    .progress_chars("=> "),
            );
            b.set_message(step.to_string());
            *g = Some((step.to_string(), b));
        }
        if let Some((_, b)) = g.as_ref() {
            b.set_length(total.max(done));
            b.set_position(done);
        }
    }

    /// Finishes the current bar.
    pub fn finish(&self) {
        if let Some((_, b)) = self.bar.lock().take() {
            b.finish();
        }
    }
}

/// Writes one progress event line on stdout. A reader that went away is not an error here
/// (the result line reports it).
pub fn progress_event(op: &str, step: &str, done: u64, total: u64) {
    let line = json!({ "event": "progress", "op": op, "step": step, "done": done, "total": total });
    let _ = writeln!(std::io::stdout().lock(), "{line}");
}

impl crate::migration::Progress for Bars {
    fn update(&self, step: &str, done: u64, total: u64) {
        Bars::update(self, step, done, total);
    }

    fn finish(&self) {
        Bars::finish(self);
    }
}
