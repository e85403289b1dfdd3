//! Prometheus text exposition (format 0.0.4) of a [`StatusReport`].
//!
//! Every metric family is written once, as `# HELP`, `# TYPE`, then its samples, so the
//! output is valid for any scraper. Label values and help texts are escaped as the format
//! requires. Counters carry the engine's per-process counts (they restart at 0 when
//! `serve` restarts, which Prometheus' `rate()` handles).

use std::fmt::Write as _;

use super::StatusReport;

/// The `Content-Type` of the exposition.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Kind of a metric family (`# TYPE` line).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetricType {
    /// Only goes up (until a restart); the name ends in `_total`.
    Counter,
    /// Any value.
    Gauge,
}

impl MetricType {
    fn as_str(self) -> &'static str {
        match self {
            MetricType::Counter => "counter",
            MetricType::Gauge => "gauge",
        }
    }
}

/// Writes metric families in the text format.
#[derive(Debug, Default)]
pub struct MetricsWriter {
    out: String,
    family: Option<&'static str>,
}

impl MetricsWriter {
    /// An empty exposition.
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts family `name` with its help text and type; samples that follow belong to it.
    pub fn family(&mut self, name: &'static str, help: &str, kind: MetricType) -> &mut Self {
        debug_assert!(valid_name(name), "invalid metric name {name}");
        self.family = Some(name);
        let _ = writeln!(self.out, "# HELP {name} {}", escape_help(help));
        let _ = writeln!(self.out, "# TYPE {name} {}", kind.as_str());
        self
    }

    /// Adds a sample of the current family with `labels` (name, value) pairs.
    pub fn sample(&mut self, labels: &[(&str, &str)], value: f64) -> &mut Self {
        let name = self
            .family
            .expect("MetricsWriter::sample called before family");
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                debug_assert!(valid_label_name(k), "invalid label name {k}");
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"{}\"", escape_label_value(v));
            }
            self.out.push('}');
        }
        self.out.push(' ');
        self.out.push_str(&format_value(value));
        self.out.push('\n');
        self
    }

    /// A family with one unlabelled sample.
    pub fn single(&mut self, name: &'static str, help: &str, kind: MetricType, value: f64) {
        self.family(name, help, kind).sample(&[], value);
    }

    /// The exposition text.
    pub fn finish(self) -> String {
        self.out
    }
}

/// Renders every metric of `report`.
pub fn render(report: &StatusReport) -> String {
    use MetricType::{Counter, Gauge};
    let s = &report.serve;
    let e = &s.engine;
    let b = |v: bool| if v { 1.0 } else { 0.0 };
    let mut w = MetricsWriter::new();

    w.family(
        "streamboot_info",
        "What is served; always 1 (labels carry the information).",
        Gauge,
    )
    .sample(
        &[
            ("mode", s.mode.as_str()),
            ("target_kind", &e.target_kind),
            ("target_validator", &e.target_validator),
        ],
        1.0,
    );
    w.family(
        "streamboot_state",
        "Migration state of the disk; the current state has value 1.",
        Gauge,
    )
    .sample(&[("state", &e.state)], 1.0);
    w.single(
        "streamboot_vm_connected",
        "1 while a VMM is connected to the block device socket.",
        Gauge,
        b(s.vm_connected),
    );
    w.single(
        "streamboot_start_counter",
        "Starts of the target in trial without a confirm.",
        Gauge,
        e.start_counter.into(),
    );
    w.single(
        "streamboot_max_trial_starts",
        "Trial starts allowed before an automatic fallback.",
        Gauge,
        e.max_trial_starts.into(),
    );
    w.single(
        "streamboot_chunk_size_bytes",
        "Chunk size in bytes.",
        Gauge,
        e.chunk_size as f64,
    );
    w.single(
        "streamboot_target_size_bytes",
        "Size of the target image in bytes.",
        Gauge,
        e.target_size as f64,
    );
    w.single(
        "streamboot_target_chunks",
        "Chunks of the target image (the sum of streamboot_chunks).",
        Gauge,
        e.chunks_total as f64,
    );
    w.family(
        "streamboot_chunks",
        "Target chunks by where they are: home, in a slot, known zero, or still remote.",
        Gauge,
    )
    .sample(&[("state", "home")], e.chunks_home as f64)
    .sample(&[("state", "slotted")], e.chunks_slotted as f64)
    .sample(&[("state", "zero")], e.chunks_zero as f64)
    .sample(&[("state", "missing")], e.chunks_missing as f64);
    w.single(
        "streamboot_chunks_dirty",
        "Chunks written by the guest and held in slots.",
        Gauge,
        e.chunks_dirty as f64,
    );
    w.single(
        "streamboot_chunks_saved_source",
        "Source chunks saved in slots (restored by a rollback).",
        Gauge,
        e.chunks_saved_source as f64,
    );
    w.family(
        "streamboot_slots",
        "Slots of the released area by use.",
        Gauge,
    )
    .sample(&[("state", "free")], e.slots_free as f64)
    .sample(
        &[("state", "used")],
        e.slots_total.saturating_sub(e.slots_free) as f64,
    );
    w.family(
        "streamboot_bytes_fetched_total",
        "Bytes fetched from the remote source, by reason.",
        Counter,
    )
    .sample(&[("reason", "demand")], e.bytes_fetched_demand as f64)
    .sample(
        &[("reason", "background")],
        e.bytes_fetched_background as f64,
    );
    w.single(
        "streamboot_bytes_seeded_total",
        "Bytes copied from the local disk instead of fetched.",
        Counter,
        e.bytes_seeded as f64,
    );
    w.single(
        "streamboot_bytes_saved_source",
        "Bytes of source chunks saved in slots.",
        Gauge,
        e.bytes_saved_source as f64,
    );
    w.single(
        "streamboot_fetch_requests_total",
        "Remote fetch requests issued.",
        Counter,
        e.fetch_requests as f64,
    );
    w.single(
        "streamboot_fetch_errors_total",
        "Remote fetches that failed after retries.",
        Counter,
        e.fetch_errors as f64,
    );
    w.single(
        "streamboot_evictions_total",
        "Clean fetched chunks evicted from slots.",
        Counter,
        e.evictions as f64,
    );
    w.family(
        "streamboot_fetch_rate_bytes_per_second",
        "Fetch rate over the last ~10 s, by reason.",
        Gauge,
    )
    .sample(&[("reason", "demand")], report.rates.demand_bytes_per_sec)
    .sample(
        &[("reason", "background")],
        report.rates.background_bytes_per_sec,
    );
    if let Some(eta) = report.eta_secs {
        w.single(
            "streamboot_eta_seconds",
            "Estimated seconds until every chunk is local at the current rate.",
            Gauge,
            eta,
        );
    }
    w.single(
        "streamboot_hydration_paused",
        "1 while background hydration is paused.",
        Gauge,
        b(s.hydration.paused),
    );
    w.single(
        "streamboot_hydration_rate_limit_bytes_per_second",
        "Rate limit of background hydration; 0 means unlimited.",
        Gauge,
        s.hydration.rate_bytes_per_sec as f64,
    );
    w.single(
        "streamboot_hydration_done",
        "1 once every target chunk is local.",
        Gauge,
        b(s.hydration.done),
    );
    if let Some(ms) = e.first_read_ms {
        w.single(
            "streamboot_first_read_seconds",
            "Seconds from engine start to the first guest read.",
            Gauge,
            ms / 1000.0,
        );
    }
    w.single(
        "streamboot_uptime_seconds",
        "Seconds since the engine opened.",
        Gauge,
        e.uptime_secs,
    );
    w.single(
        "streamboot_last_error_present",
        "1 when an error is reported in the status' last_error.",
        Gauge,
        b(s.last_error.is_some()),
    );
    w.finish()
}

/// Escapes a label value: backslash, double quote and line feed.
pub fn escape_label_value(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// Escapes a help text: backslash and line feed.
pub fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

/// Formats a sample value (Go float syntax; `NaN`, `+Inf`, `-Inf` for the specials).
pub fn format_value(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        // Rust prints integral floats without exponent or fraction ("42"), others with
        // the shortest round-tripping form; both parse as Go floats.
        format!("{v}")
    }
}

/// A metric name matches `[a-zA-Z_:][a-zA-Z0-9_:]*`.
pub fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// A label name matches `[a-zA-Z_][a-zA-Z0-9_]*` and does not start with `__`.
pub fn valid_label_name(name: &str) -> bool {
    let mut chars = name.chars();
    !name.starts_with("__")
        && matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping() {
        assert_eq!(escape_label_value(r#"W/"a\b"#), r#"W/\"a\\b"#);
        assert_eq!(escape_label_value("a\nb"), "a\\nb");
        assert_eq!(escape_help("x\\y\nz \"q\""), "x\\\\y\\nz \"q\"");
    }

    #[test]
    fn values() {
        assert_eq!(format_value(42.0), "42");
        assert_eq!(format_value(0.5), "0.5");
        assert_eq!(format_value(1e300), format!("{}", 1e300));
        assert_eq!(format_value(f64::NAN), "NaN");
        assert_eq!(format_value(f64::INFINITY), "+Inf");
        assert_eq!(format_value(f64::NEG_INFINITY), "-Inf");
        assert_eq!(
            format_value(u64::MAX as f64).parse::<f64>().unwrap(),
            1.8446744073709552e19
        );
    }

    #[test]
    fn names() {
        assert!(valid_name("streamboot_chunks"));
        assert!(valid_name("a:b_1"));
        assert!(!valid_name("1a"));
        assert!(!valid_name("a-b"));
        assert!(valid_label_name("state"));
        assert!(!valid_label_name("__name"));
        assert!(!valid_label_name("a:b"));
    }

    #[test]
    fn writer_layout() {
        let mut w = MetricsWriter::new();
        w.family("m_total", "Help \\ text", MetricType::Counter)
            .sample(&[("a", "x\"y"), ("b", "z")], 3.0);
        w.single("g", "G.", MetricType::Gauge, 0.25);
        assert_eq!(
            w.finish(),
            "# HELP m_total Help \\\\ text\n# TYPE m_total counter\n\
             m_total{a=\"x\\\"y\",b=\"z\"} 3\n# HELP g G.\n# TYPE g gauge\ng 0.25\n"
        );
    }
}
