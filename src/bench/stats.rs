//! Percentiles of one run's latencies, and medians with spread across rounds.

use serde::Serialize;

use super::RunResult;

/// Latency percentiles in milliseconds (nearest rank; zeros when nothing was measured).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
    pub mean: f64,
}

/// The value at quantile `q` (0..=1) of sorted `v` (nearest rank).
fn rank(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let i = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
    v[i]
}

impl Percentiles {
    /// Of these values (any order).
    pub fn of(values: impl IntoIterator<Item = f64>) -> Self {
        let mut v: Vec<f64> = values.into_iter().collect();
        v.sort_by(f64::total_cmp);
        let mean = if v.is_empty() {
            0.0
        } else {
            v.iter().sum::<f64>() / v.len() as f64
        };
        Self {
            p50: rank(&v, 0.5),
            p90: rank(&v, 0.9),
            p99: rank(&v, 0.99),
            max: v.last().copied().unwrap_or(0.0),
            mean,
        }
    }
}

/// Median and range of one figure across rounds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Spread {
    /// Of these values (any order; zeros when there are none).
    pub fn of(values: impl IntoIterator<Item = f64>) -> Self {
        let mut v: Vec<f64> = values.into_iter().collect();
        v.sort_by(f64::total_cmp);
        let median = match v.len() {
            0 => 0.0,
            n if n % 2 == 1 => v[n / 2],
            n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
        };
        Self {
            median,
            min: v.first().copied().unwrap_or(0.0),
            max: v.last().copied().unwrap_or(0.0),
        }
    }
}

/// One configuration's figures over its rounds.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub kind: &'static str,
    pub run: String,
    pub rounds: usize,
    pub time_to_first_read_ms: Spread,
    pub time_to_finish_ms: Spread,
    pub latency_p50_ms: Spread,
    pub latency_p99_ms: Spread,
    pub bytes_fetched: Spread,
    pub read_amplification: Spread,
}

/// Groups results by configuration (first-seen order).
pub fn summarize(results: &[RunResult]) -> Vec<Summary> {
    let mut names: Vec<&str> = Vec::new();
    for r in results {
        if !names.contains(&r.run.as_str()) {
            names.push(&r.run);
        }
    }
    names
        .into_iter()
        .map(|name| {
            let rs: Vec<&RunResult> = results.iter().filter(|r| r.run == name).collect();
            let f =
                |g: &dyn Fn(&RunResult) -> Option<f64>| Spread::of(rs.iter().filter_map(|r| g(r)));
            Summary {
                kind: "summary",
                run: name.to_string(),
                rounds: rs.len(),
                time_to_first_read_ms: f(&|r| r.time_to_first_read_ms),
                time_to_finish_ms: f(&|r| Some(r.time_to_finish_ms)),
                latency_p50_ms: f(&|r| Some(r.latency_ms.p50)),
                latency_p99_ms: f(&|r| Some(r.latency_ms.p99)),
                bytes_fetched: f(&|r| Some(r.bytes_fetched as f64)),
                read_amplification: f(&|r| r.read_amplification),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_and_median() {
        let p = Percentiles::of((1..=100).map(f64::from));
        assert_eq!((p.p50, p.p90, p.p99, p.max), (50.0, 90.0, 99.0, 100.0));
        assert_eq!(Spread::of([3.0, 1.0, 2.0]).median, 2.0);
        assert_eq!(Spread::of([4.0, 1.0, 2.0, 3.0]).median, 2.5);
        assert_eq!(Percentiles::of([]), Percentiles::default());
    }
}
