//! Progress bars for long CLI work (hidden with `--json` or when stderr is no terminal).

use indicatif::{ProgressBar, ProgressStyle};
use parking_lot::Mutex;

/// A progress bar that follows (step, done, total) updates, in bytes or chunks.
pub struct Bars {
    bar: Mutex<Option<(String, ProgressBar)>>,
    hidden: bool,
    bytes: bool,
}

impl Bars {
    /// New bars; `bytes` formats counts as bytes.
    pub fn new(hidden: bool, bytes: bool) -> Self {
        Self {
            bar: Mutex::new(None),
            hidden,
            bytes,
        }
    }

    /// Updates (or starts) the bar for `step`.
    pub fn update(&self, step: &str, done: u64, total: u64) {
        if self.hidden {
            return;
        }
        let mut g = self.bar.lock();
        if g.as_ref().is_none_or(|(s, _)| s != step) {
            if let Some((_, b)) = g.take() {
                b.finish();
            }
            let b = ProgressBar::new(total);
            let tpl = if self.bytes {
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

impl crate::migration::Progress for Bars {
    fn update(&self, step: &str, done: u64, total: u64) {
        Bars::update(self, step, done, total);
    }

    fn finish(&self) {
        Bars::finish(self);
    }
}
