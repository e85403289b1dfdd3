//! Prometheus metrics of a [`StatusReport`], encoded by the `prometheus-client` crate in
//! the OpenMetrics text format (what Prometheus asks for first when it scrapes).
//!
//! Names follow the Prometheus conventions: the unit is the last part of a name
//! (`_bytes`, `_seconds`), counters end in `_total`, and every sample carries a `disk`
//! label (the disk `serve` serves) so one Prometheus can scrape several backends. The
//! values are a snapshot taken at each scrape; counters and histograms are the engine's
//! per-process counts (they restart at 0 when `serve` restarts, which `rate()` handles,
//! and read 0 once no engine runs: after a rollback, fallback or commit).

use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

use super::StatusReport;
use crate::engine::{HistogramSnapshot, LATENCY_BUCKETS};

/// The `Content-Type` of the exposition.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Renders every metric of `report`, each labelled `disk="<disk>"`.
pub fn render(report: &StatusReport, disk: &str) -> String {
    let mut registry = Registry::with_labels(std::iter::once((
        "disk".into(),
        escape_label_value(disk).into(),
    )));
    registry.register_collector(Box::new(Snapshot(report.clone())));
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &registry)
        .expect("writing to a String cannot fail");
    out
}

/// One scrape's values.
#[derive(Debug)]
struct Snapshot(StatusReport);

type Enc<'a, 'b> = &'a mut DescriptorEncoder<'b>;
type Res = Result<(), std::fmt::Error>;

fn gauge(e: Enc, name: &str, help: &str, unit: Option<Unit>, v: f64) -> Res {
    e.encode_descriptor(name, help, unit.as_ref(), MetricType::Gauge)?
        .encode_gauge(&v)
}

fn gauges(
    e: Enc,
    name: &str,
    help: &str,
    unit: Option<Unit>,
    samples: &[(&str, &str, f64)],
) -> Res {
    let mut m = e.encode_descriptor(name, help, unit.as_ref(), MetricType::Gauge)?;
    for (k, v, x) in samples {
        m.encode_family(&[(*k, *v)])?.encode_gauge(x)?;
    }
    Ok(())
}

fn counter(
    e: Enc,
    name: &str,
    help: &str,
    unit: Option<Unit>,
    labels: &[(&str, &str, u64)],
) -> Res {
    let mut m = e.encode_descriptor(name, help, unit.as_ref(), MetricType::Counter)?;
    if let [("", "", v)] = labels {
        return m.encode_counter::<NoLabelSet, u64, u64>(v, None);
    }
    for (k, val, v) in labels {
        m.encode_family(&[(*k, *val)])?
            .encode_counter::<NoLabelSet, u64, u64>(v, None)?;
    }
    Ok(())
}

fn histograms(
    e: Enc,
    name: &str,
    help: &str,
    label: &str,
    hs: &[(&str, &HistogramSnapshot)],
) -> Res {
    let mut m = e.encode_descriptor(name, help, Some(&Unit::Seconds), MetricType::Histogram)?;
    for (value, h) in hs {
        let buckets: Vec<(f64, u64)> = LATENCY_BUCKETS
            .iter()
            .copied()
            .chain(std::iter::once(f64::MAX))
            .enumerate()
            .map(|(i, le)| (le, h.buckets.get(i).copied().unwrap_or(0)))
            .collect();
        m.encode_family(&[(label, *value)])?
            .encode_histogram::<NoLabelSet>(h.sum_secs, h.count, &buckets, None)?;
    }
    Ok(())
}

impl prometheus_client::collector::Collector for Snapshot {
    fn encode(&self, mut enc: DescriptorEncoder) -> Res {
        self.what_and_where(&mut enc)?;
        self.transfers(&mut enc)?;
        self.hydration(&mut enc)?;
        self.latencies(&mut enc)
    }
}

impl Snapshot {
    /// What is served, its state, chunks and slots.
    fn what_and_where(&self, e: Enc) -> Res {
        let r = &self.0;
        let s = &r.serve;
        let x = &s.engine;
        let b = |v: bool| if v { 1.0 } else { 0.0 };
        let mut m = e.encode_descriptor(
            "streamboot_info",
            "What is served; always 1 (labels carry the information).",
            None,
            MetricType::Gauge,
        )?;
        m.encode_family(&[
            ("mode", s.mode.as_str()),
            ("target_kind", escape_label_value(&x.target_kind).as_str()),
            (
                "target_validator",
                escape_label_value(&x.target_validator).as_str(),
            ),
        ])?
        .encode_gauge(&1.0)?;
        gauges(
            e,
            "streamboot_state",
            "Migration state of the disk; the current state has value 1.",
            None,
            &[("state", &escape_label_value(&x.state), 1.0)],
        )?;
        gauge(
            e,
            "streamboot_vm_connected",
            "1 while a VMM is connected to the block device socket.",
            None,
            b(s.vm_connected),
        )?;
        gauge(
            e,
            "streamboot_trial_starts",
            "Starts of the target in trial without a confirm.",
            None,
            x.start_counter.into(),
        )?;
        gauge(
            e,
            "streamboot_trial_starts_limit",
            "Trial starts allowed before an automatic fallback.",
            None,
            x.max_trial_starts.into(),
        )?;
        gauge(
            e,
            "streamboot_chunk_size",
            "Chunk size.",
            Some(Unit::Bytes),
            x.chunk_size as f64,
        )?;
        gauge(
            e,
            "streamboot_target_size",
            "Size of the target image.",
            Some(Unit::Bytes),
            x.target_size as f64,
        )?;
        gauge(
            e,
            "streamboot_target_chunks",
            "Chunks of the target image (the sum of streamboot_chunks).",
            None,
            x.chunks_total as f64,
        )?;
        gauges(
            e,
            "streamboot_chunks",
            "Target chunks by where they are: home, in a slot, known zero, or still remote.",
            None,
            &[
                ("state", "home", x.chunks_home as f64),
                ("state", "slotted", x.chunks_slotted as f64),
                ("state", "zero", x.chunks_zero as f64),
                ("state", "missing", x.chunks_missing as f64),
            ],
        )?;
        gauge(
            e,
            "streamboot_chunks_dirty",
            "Chunks written by the guest and held in slots.",
            None,
            x.chunks_dirty as f64,
        )?;
        gauge(
            e,
            "streamboot_chunks_saved_source",
            "Source chunks saved in slots (restored by a rollback).",
            None,
            x.chunks_saved_source as f64,
        )?;
        gauges(
            e,
            "streamboot_slots",
            "Slots of the released area by use.",
            None,
            &[
                ("state", "free", x.slots_free as f64),
                (
                    "state",
                    "used",
                    x.slots_total.saturating_sub(x.slots_free) as f64,
                ),
            ],
        )?;
        Ok(())
    }

    /// Fetched and seeded bytes, fetches, evictions.
    fn transfers(&self, e: Enc) -> Res {
        let r = &self.0;
        let s = &r.serve;
        let x = &s.engine;
        counter(
            e,
            "streamboot_fetched",
            "Bytes fetched from the remote source, by reason.",
            Some(Unit::Bytes),
            &[
                ("reason", "demand", x.bytes_fetched_demand),
                ("reason", "background", x.bytes_fetched_background),
            ],
        )?;
        counter(
            e,
            "streamboot_seeded",
            "Bytes copied from the local disk instead of fetched.",
            Some(Unit::Bytes),
            &[("", "", x.bytes_seeded)],
        )?;
        gauge(
            e,
            "streamboot_saved_source",
            "Bytes of source chunks saved in slots.",
            Some(Unit::Bytes),
            x.bytes_saved_source as f64,
        )?;
        counter(
            e,
            "streamboot_fetch_requests",
            "Remote fetch requests issued.",
            None,
            &[("", "", x.fetch_requests)],
        )?;
        counter(
            e,
            "streamboot_fetch_errors",
            "Remote fetches that failed after retries.",
            None,
            &[("", "", x.fetch_errors)],
        )?;
        counter(
            e,
            "streamboot_evictions",
            "Clean fetched chunks evicted from slots.",
            None,
            &[("", "", x.evictions)],
        )?;
        Ok(())
    }

    /// Rates, ETA, hydration, timing, errors.
    fn hydration(&self, e: Enc) -> Res {
        let r = &self.0;
        let s = &r.serve;
        let x = &s.engine;
        let b = |v: bool| if v { 1.0 } else { 0.0 };
        gauges(
            e,
            "streamboot_fetch_rate",
            "Fetch rate over the last ~10 s, by reason.",
            Some(Unit::Other("bytes_per_second".into())),
            &[
                ("reason", "demand", r.rates.demand_bytes_per_sec),
                ("reason", "background", r.rates.background_bytes_per_sec),
            ],
        )?;
        if let Some(eta) = r.eta_secs {
            gauge(
                e,
                "streamboot_eta",
                "Estimated time until every chunk is local at the current rate.",
                Some(Unit::Seconds),
                eta,
            )?;
        }
        gauge(
            e,
            "streamboot_hydration_paused",
            "1 while background hydration is paused.",
            None,
            b(s.hydration.paused),
        )?;
        gauge(
            e,
            "streamboot_hydration_rate_limit",
            "Rate limit of background hydration; 0 means unlimited.",
            Some(Unit::Other("bytes_per_second".into())),
            s.hydration.rate_bytes_per_sec as f64,
        )?;
        gauge(
            e,
            "streamboot_hydration_done",
            "1 once every target chunk is local.",
            None,
            b(s.hydration.done),
        )?;
        if let Some(ms) = x.first_read_ms {
            gauge(
                e,
                "streamboot_first_read",
                "Time from engine start to the first guest read.",
                Some(Unit::Seconds),
                ms / 1000.0,
            )?;
        }
        if x.start_time_secs > 0.0 {
            gauge(
                e,
                "streamboot_start_time",
                "When the engine opened, in seconds since the Unix epoch.",
                Some(Unit::Seconds),
                x.start_time_secs,
            )?;
        }
        gauge(
            e,
            "streamboot_last_error_present",
            "1 when an error is reported in the status' last_error.",
            None,
            b(s.last_error.is_some()),
        )?;
        Ok(())
    }

    /// Latency histograms.
    fn latencies(&self, e: Enc) -> Res {
        let r = &self.0;
        let s = &r.serve;
        let x = &s.engine;
        let l = &x.latency;
        histograms(
            e,
            "streamboot_guest_request_duration",
            "Time to serve guest requests in the engine, by operation.",
            "op",
            &[("read", &l.read), ("write", &l.write), ("flush", &l.flush)],
        )?;
        histograms(
            e,
            "streamboot_fetch_duration",
            "Time of remote fetches (after the source's retries), by reason.",
            "reason",
            &[
                ("demand", &l.fetch_demand),
                ("background", &l.fetch_background),
            ],
        )
    }
}

/// Escapes a label value as the text formats require (backslash, double quote, line
/// feed): `prometheus-client` writes label values as they are.
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::{HydrationStatus, Rates, ServeMode, ServeStatus};

    fn report() -> StatusReport {
        let mut engine = crate::engine::Status {
            state: "trial".into(),
            bytes_fetched_demand: 7,
            target_validator: "W/\"a\\b\"\n".into(),
            ..Default::default()
        };
        engine.latency.read.buckets = vec![1; LATENCY_BUCKETS.len() + 1];
        engine.latency.read.count = LATENCY_BUCKETS.len() as u64 + 1;
        StatusReport::new(
            ServeStatus {
                engine,
                mode: ServeMode::Target,
                vm_connected: true,
                hydration: HydrationStatus::default(),
                last_error: None,
            },
            Rates::default(),
        )
    }

    #[test]
    fn names_labels_and_escaping() {
        let out = render(&report(), "/dev/vd\"a");
        assert!(out.ends_with("# EOF\n"), "{out}");
        assert!(
            out.contains(
                "streamboot_fetched_bytes_total{disk=\"/dev/vd\\\"a\",reason=\"demand\"} 7\n"
            ),
            "{out}"
        );
        assert!(
            out.contains("target_validator=\"W/\\\"a\\\\b\\\"\\n\""),
            "{out}"
        );
        assert!(out.contains("streamboot_guest_request_duration_seconds_bucket{disk=\"/dev/vd\\\"a\",le=\"+Inf\",op=\"read\"} 17\n"), "{out}");
        assert!(out.contains("streamboot_fetch_duration_seconds_count{disk=\"/dev/vd\\\"a\",reason=\"background\"} 0\n"), "{out}");
        assert!(!out.contains("uptime"), "{out}");
    }
}
