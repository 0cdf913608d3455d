//! What a run measured, per journey, and its table.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use super::user::{Failure, Step};
use super::Journey;

/// How many unexpected errors a report quotes.
const SAMPLES: usize = 10;

/// What one virtual user (or, merged, a whole run) saw.
#[derive(Debug, Default)]
pub(crate) struct Recorder {
    journeys: BTreeMap<Journey, Tally>,
    expected: BTreeMap<String, u64>,
    samples: Vec<String>,
}

#[derive(Debug, Default)]
struct Tally {
    latencies: Vec<Duration>,
    ok: u64,
    expected: u64,
    unexpected: u64,
    requests: u64,
}

impl Recorder {
    pub(crate) fn record(
        &mut self,
        journey: Journey,
        took: Duration,
        requests: u64,
        outcome: &Step<()>,
    ) {
        let tally = self.journeys.entry(journey).or_default();
        tally.latencies.push(took);
        tally.requests += requests;
        match outcome {
            Ok(()) => tally.ok += 1,
            Err(Failure::Expected(what)) => {
                tally.expected += 1;
                *self.expected.entry(what.clone()).or_default() += 1;
            }
            Err(Failure::Unexpected(what)) => {
                tally.unexpected += 1;
                if self.samples.len() < SAMPLES {
                    self.samples.push(format!("{}: {what}", journey.name()));
                }
            }
        }
    }

    pub(crate) fn merge(&mut self, other: Recorder) {
        for (journey, theirs) in other.journeys {
            let ours = self.journeys.entry(journey).or_default();
            ours.latencies.extend(theirs.latencies);
            ours.ok += theirs.ok;
            ours.expected += theirs.expected;
            ours.unexpected += theirs.unexpected;
            ours.requests += theirs.requests;
        }
        for (what, count) in other.expected {
            *self.expected.entry(what).or_default() += count;
        }
        let room = SAMPLES.saturating_sub(self.samples.len());
        self.samples.extend(other.samples.into_iter().take(room));
    }

    pub(crate) fn report(self, elapsed: Duration, users: usize, auth: &str) -> Report {
        let seconds = elapsed.as_secs_f64().max(f64::EPSILON);
        let journeys = self
            .journeys
            .into_iter()
            .map(|(journey, mut tally)| {
                tally.latencies.sort_unstable();
                let count = tally.latencies.len() as u64;
                JourneyReport {
                    journey,
                    count,
                    ok: tally.ok,
                    expected_errors: tally.expected,
                    unexpected_errors: tally.unexpected,
                    requests: tally.requests,
                    throughput: count as f64 / seconds,
                    p50: percentile(&tally.latencies, 0.50),
                    p90: percentile(&tally.latencies, 0.90),
                    p99: percentile(&tally.latencies, 0.99),
                    max: tally.latencies.last().copied().unwrap_or_default(),
                }
            })
            .collect();
        Report {
            elapsed,
            users,
            auth: auth.to_owned(),
            journeys,
            expected: self.expected,
            samples: self.samples,
        }
    }
}

/// The value below which `share` of the sorted `values` fall (nearest rank).
fn percentile(sorted: &[Duration], share: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = (share * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// One journey's figures.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct JourneyReport {
    /// Which journey.
    pub journey: Journey,
    /// How many ran.
    pub count: u64,
    /// How many went as planned.
    pub ok: u64,
    /// How many met an expected error (a `429`, stock running out).
    pub expected_errors: u64,
    /// How many met an unexpected error.
    pub unexpected_errors: u64,
    /// The requests they sent.
    pub requests: u64,
    /// Journeys per second over the run.
    pub throughput: f64,
    /// Median journey latency.
    pub p50: Duration,
    /// 90th percentile.
    pub p90: Duration,
    /// 99th percentile.
    pub p99: Duration,
    /// The slowest.
    pub max: Duration,
}

/// What a load run measured.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Report {
    /// How long the run took.
    pub elapsed: Duration,
    /// The virtual users.
    pub users: usize,
    /// How the users identified themselves (`jwt` or `x-user-id`).
    pub auth: String,
    /// Per journey that ran, in [`Journey`] order.
    pub journeys: Vec<JourneyReport>,
    /// The expected errors by kind, with their counts.
    pub expected: BTreeMap<String, u64>,
    /// The first few unexpected errors, as `journey: what happened`.
    pub samples: Vec<String>,
}

impl Report {
    /// The figures of `journey`, when it ran.
    pub fn journey(&self, journey: Journey) -> Option<&JourneyReport> {
        self.journeys.iter().find(|r| r.journey == journey)
    }

    /// Unexpected errors over all journeys.
    pub fn unexpected_errors(&self) -> u64 {
        self.journeys.iter().map(|r| r.unexpected_errors).sum()
    }

    /// Expected errors over all journeys.
    pub fn expected_errors(&self) -> u64 {
        self.journeys.iter().map(|r| r.expected_errors).sum()
    }

    /// Requests sent over all journeys.
    pub fn requests(&self) -> u64 {
        self.journeys.iter().map(|r| r.requests).sum()
    }
}

struct Millis(Duration);

impl fmt::Display for Millis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = format!("{:.1}", self.0.as_secs_f64() * 1000.0);
        f.pad(&text)
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} users ({}) for {:.1}s: {} requests, {:.1} requests/s",
            self.users,
            self.auth,
            self.elapsed.as_secs_f64(),
            self.requests(),
            self.requests() as f64 / self.elapsed.as_secs_f64().max(f64::EPSILON),
        )?;
        writeln!(
            f,
            "{:<16} {:>7} {:>7} {:>8} {:>10} {:>8} {:>9} {:>9} {:>9} {:>9}",
            "journey",
            "count",
            "ok",
            "expected",
            "unexpected",
            "per s",
            "p50 ms",
            "p90 ms",
            "p99 ms",
            "max ms"
        )?;
        for r in &self.journeys {
            writeln!(
                f,
                "{:<16} {:>7} {:>7} {:>8} {:>10} {:>8.1} {:>9} {:>9} {:>9} {:>9}",
                r.journey.name(),
                r.count,
                r.ok,
                r.expected_errors,
                r.unexpected_errors,
                r.throughput,
                Millis(r.p50),
                Millis(r.p90),
                Millis(r.p99),
                Millis(r.max),
            )?;
        }
        if !self.expected.is_empty() {
            writeln!(f, "expected errors:")?;
            for (what, count) in &self.expected {
                writeln!(f, "  {count:>6}  {what}")?;
            }
        }
        if !self.samples.is_empty() {
            writeln!(
                f,
                "unexpected errors ({} in all; the first {}):",
                self.unexpected_errors(),
                self.samples.len()
            )?;
            for sample in &self.samples {
                writeln!(f, "  {sample}")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_ranks() {
        let values: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&values, 0.50), Duration::from_millis(50));
        assert_eq!(percentile(&values, 0.99), Duration::from_millis(99));
        assert_eq!(percentile(&values, 1.0), Duration::from_millis(100));
        assert_eq!(
            percentile(&[Duration::from_millis(7)], 0.5),
            Duration::from_millis(7)
        );
        assert_eq!(percentile(&[], 0.5), Duration::ZERO);
    }

    #[test]
    fn the_report_splits_errors_and_merges_users() {
        let mut one = Recorder::default();
        one.record(Journey::Browse, Duration::from_millis(3), 2, &Ok(()));
        one.record(
            Journey::Checkout,
            Duration::from_millis(40),
            5,
            &Err(Failure::Expected(
                "checkout cancelled: the stock ran out".into(),
            )),
        );
        let mut two = Recorder::default();
        two.record(
            Journey::Browse,
            Duration::from_millis(5),
            2,
            &Err(Failure::Unexpected(
                "GET /api/products: answered 500".into(),
            )),
        );
        one.merge(two);
        let report = one.report(Duration::from_secs(2), 2, "x-user-id");
        let browse = report.journey(Journey::Browse).unwrap();
        assert_eq!(
            (browse.count, browse.ok, browse.unexpected_errors),
            (2, 1, 1)
        );
        assert_eq!(browse.requests, 4);
        assert_eq!(browse.throughput, 1.0);
        assert_eq!(browse.max, Duration::from_millis(5));
        assert_eq!(report.unexpected_errors(), 1);
        assert_eq!(report.expected_errors(), 1);
        let table = report.to_string();
        assert!(table.contains("checkout"), "{table}");
        assert!(
            table.contains("browse: GET /api/products: answered 500"),
            "{table}"
        );
        assert!(table.contains("the stock ran out"), "{table}");
    }
}
