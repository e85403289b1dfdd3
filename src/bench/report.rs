//! The bench's report: one self-contained XHTML file (inline SVG and CSS, no scripts, no
//! external resources; well-formed XML) with a comparison table and two timelines per
//! run: bytes per second fetched (on demand and in the background), and guest read
//! latency over time.

use std::fmt::Write;

use super::stats::Summary;
use super::{Machine, RunResult};

const W: f64 = 860.0;
const H: f64 = 260.0;
const LEFT: f64 = 84.0;
const BOTTOM: f64 = 30.0;
const TOP: f64 = 16.0;
/// Colours of successive runs.
const COLOURS: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
];
/// Width of a timeline bucket, seconds.
const BUCKET: f64 = 0.1;

/// Escapes text for XML content and attribute values.
pub fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&apos;"),
            c if c.is_control() && c != '\n' && c != '\t' => o.push('?'),
            c => o.push(c),
        }
    }
    o
}

/// (x, y) points of a line.
type Points = Vec<(f64, f64)>;

/// One line of a chart: its label and (x, y) points.
struct Series {
    label: String,
    run: String,
    colour: &'static str,
    dashed: bool,
    points: Points,
}

/// Fetch rate per run from serve's counter samples: (seconds, bytes/s) for demand and
/// background.
fn rates(r: &RunResult) -> (Points, Points) {
    let mut demand = Vec::new();
    let mut background = Vec::new();
    for w in r.fetch_samples.windows(2) {
        let dt = w[1].0 - w[0].0;
        if dt <= 0.0 {
            continue;
        }
        let t = w[1].0;
        demand.push((t, w[1].1.saturating_sub(w[0].1) as f64 / dt));
        background.push((t, w[1].2.saturating_sub(w[0].2) as f64 / dt));
    }
    (demand, background)
}

/// Guest latency per run: the largest latency of each [`BUCKET`] of completions.
fn latency_buckets(r: &RunResult) -> Vec<(f64, f64)> {
    let mut out: Vec<(f64, f64)> = Vec::new();
    for &(t, l) in &r.latencies {
        let b = (t / BUCKET).floor() * BUCKET + BUCKET / 2.0;
        match out.last_mut() {
            Some(last) if (last.0 - b).abs() < 1e-9 => last.1 = last.1.max(l),
            _ => out.push((b, l)),
        }
    }
    out
}

/// Draws one chart: axes, ticks, one `<path class="timeline">` per series, a legend.
fn chart(title: &str, y_unit: &str, series: &[Series]) -> String {
    let xmax = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0))
        .fold(0.0f64, f64::max)
        .max(0.001);
    let ymax = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .fold(0.0f64, f64::max)
        .max(1e-9)
        * 1.05;
    let legend_h = 16.0 * series.len() as f64;
    let (pw, ph) = (W - LEFT - 20.0, H - TOP - BOTTOM);
    let x = |v: f64| LEFT + v / xmax * pw;
    let y = |v: f64| TOP + ph - v / ymax * ph;
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{}" viewBox="0 0 {W} {}" role="img"><title>{}</title>"#,
        H + legend_h,
        H + legend_h,
        esc(title)
    );
    let _ = write!(
        s,
        r##"<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>"##
    );
    for i in 0..=4 {
        let f = f64::from(i) / 4.0;
        let _ = write!(
            s,
            r##"<text x="{:.1}" y="{:.1}" font-size="11" text-anchor="middle">{:.2} s</text><text x="{:.1}" y="{:.1}" font-size="11" text-anchor="end">{}</text><line x1="{LEFT}" x2="{:.1}" y1="{:.1}" y2="{:.1}" stroke="#eee"/>"##,
            x(f * xmax),
            TOP + ph + 16.0,
            f * xmax,
            LEFT - 4.0,
            y(f * ymax) + 4.0,
            esc(&fmt_si(f * ymax, y_unit)),
            LEFT + pw,
            y(f * ymax),
            y(f * ymax),
        );
    }
    for (i, se) in series.iter().enumerate() {
        let mut d = String::new();
        for (j, &(px, py)) in se.points.iter().enumerate() {
            let _ = write!(
                d,
                "{}{:.1},{:.1} ",
                if j == 0 { "M" } else { "L" },
                x(px),
                y(py)
            );
        }
        if se.points.len() == 1 {
            // One point: a short tick, so it shows.
            d.push_str("h4 ");
        }
        if d.is_empty() {
            // A run with no points still gets its (empty) line, at zero.
            let _ = write!(d, "M{LEFT:.1},{:.1}", y(0.0));
        }
        let _ = write!(
            s,
            r#"<path class="timeline" data-run="{}" d="{}" fill="none" stroke="{}" stroke-width="1.5"{}/>"#,
            esc(&se.run),
            d.trim_end(),
            se.colour,
            if se.dashed {
                r#" stroke-dasharray="4 3""#
            } else {
                ""
            }
        );
        let ly = H + 16.0 * i as f64 + 4.0;
        let _ = write!(
            s,
            r#"<line x1="{LEFT}" x2="{}" y1="{ly:.1}" y2="{ly:.1}" stroke="{}" stroke-width="2"{}/><text x="{}" y="{:.1}" font-size="12">{}</text>"#,
            LEFT + 24.0,
            se.colour,
            if se.dashed {
                r#" stroke-dasharray="4 3""#
            } else {
                ""
            },
            LEFT + 30.0,
            ly + 4.0,
            esc(&se.label)
        );
    }
    s.push_str("</svg>");
    s
}

/// `1234567` → `1.23 M` + unit.
fn fmt_si(v: f64, unit: &str) -> String {
    let (d, p) = match v {
        v if v >= 1e9 => (1e9, "G"),
        v if v >= 1e6 => (1e6, "M"),
        v if v >= 1e3 => (1e3, "k"),
        _ => (1.0, ""),
    };
    format!("{:.1} {p}{unit}", v / d)
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.digits$}"))
}

/// The comparison table: one row per run, then the medians.
fn table(results: &[RunResult], summary: &[Summary]) -> String {
    let mut t = String::from(
        "<table id=\"comparison\"><thead><tr><th>run</th><th>round</th><th>first read (ms)</th>\
         <th>finish (ms)</th><th>p50 (ms)</th><th>p90 (ms)</th><th>p99 (ms)</th><th>max (ms)</th>\
         <th>bytes read</th><th>fetched (demand / background)</th><th>proxy count</th>\
         <th>amplification</th><th>origin requests</th></tr></thead><tbody>",
    );
    for r in results {
        let _ = write!(
            t,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{:.1}</td><td>{:.2}</td><td>{:.2}</td>\
             <td>{:.2}</td><td>{:.2}</td><td>{}</td><td>{} ({} / {})</td><td>{}{}</td><td>{}</td><td>{}</td></tr>",
            esc(&r.run),
            r.round,
            opt(r.time_to_first_read_ms, 1),
            r.time_to_finish_ms,
            r.latency_ms.p50,
            r.latency_ms.p90,
            r.latency_ms.p99,
            r.latency_ms.max,
            r.bytes_read,
            r.bytes_fetched,
            r.bytes_fetched_demand,
            r.bytes_fetched_background,
            r.proxy_bytes_fetched,
            if r.fetch_counts_agree { "" } else { " (differs!)" },
            opt(r.read_amplification, 2),
            r.origin_requests,
        );
    }
    t.push_str("</tbody></table>");
    t.push_str(
        "<table id=\"medians\"><thead><tr><th>run</th><th>rounds</th>\
         <th>first read ms: median [min, max]</th><th>finish ms: median [min, max]</th>\
         <th>p99 ms: median [min, max]</th><th>amplification: median</th></tr></thead><tbody>",
    );
    for s in summary {
        let sp = |x: &super::stats::Spread| format!("{:.1} [{:.1}, {:.1}]", x.median, x.min, x.max);
        let _ = write!(
            t,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{:.2}</td></tr>",
            esc(&s.run),
            s.rounds,
            sp(&s.time_to_first_read_ms),
            sp(&s.time_to_finish_ms),
            sp(&s.latency_p99_ms),
            s.read_amplification.median
        );
    }
    t.push_str("</tbody></table>");
    t
}

/// The whole report.
pub fn render(
    results: &[RunResult],
    summary: &[Summary],
    machine: &Machine,
    title: &str,
) -> String {
    let mut fetch = Vec::new();
    let mut lat = Vec::new();
    for (i, r) in results.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let name = format!("{} #{}", r.run, r.round);
        let (demand, background) = rates(r);
        fetch.push(Series {
            label: format!("{name} on demand"),
            run: name.clone(),
            colour,
            dashed: false,
            points: demand,
        });
        if background.iter().any(|p| p.1 > 0.0) {
            fetch.push(Series {
                label: format!("{name} background"),
                run: name.clone(),
                colour,
                dashed: true,
                points: background,
            });
        }
        lat.push(Series {
            label: name.clone(),
            run: name,
            colour,
            dashed: false,
            points: latency_buckets(r),
        });
    }
    let mut h = String::from(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n\
         <html xmlns=\"http://www.w3.org/1999/xhtml\" lang=\"en\"><head><meta charset=\"UTF-8\"/>",
    );
    let _ = write!(
        h,
        "<title>{}</title><style>body{{font-family:sans-serif;margin:1.5em}}\
         table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #bbb;padding:2px 6px;\
         font-size:13px;text-align:right}}td:first-child,th:first-child{{text-align:left}}</style>\
         </head><body><h1>{}</h1><p>{} ({} cores), Linux {}, streamboot {}</p>",
        esc(title),
        esc(title),
        esc(&machine.cpu_model),
        machine.cores,
        esc(&machine.kernel),
        machine.streamboot_version
    );
    h.push_str("<h2>Comparison</h2>");
    h.push_str(&table(results, summary));
    h.push_str(
        "<h2>Bytes per second fetched from the origin (solid: on demand, dashed: background)</h2>",
    );
    h.push_str(&chart("fetched bytes per second", "B/s", &fetch));
    h.push_str("<h2>Guest read latency over time (largest per 100 ms)</h2>");
    h.push_str(&chart("guest read latency", "ms", &lat));
    h.push_str("<p>Times are from serve start. Generated by streamboot bench.</p></body></html>\n");
    h
}
