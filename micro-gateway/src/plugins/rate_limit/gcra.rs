//! The generic cell rate algorithm, shared by the stores (the Redis store runs the same
//! steps in Lua).
//!
//! A quota of `limit` requests per `period` lets one request in every
//! `interval = period / limit`, with bursts up to `limit`. Each key keeps one number per
//! quota, its theoretical arrival time (TAT): when the bucket would be empty again. A
//! request is allowed when `max(tat, now) + interval - now <= period`; then the TAT
//! becomes that sum. A request is allowed only when every quota allows it, and only then
//! do the TATs move, so a refused request costs nothing.

use std::time::Duration;

/// One limit: `limit` requests per `period`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Quota {
    /// Requests allowed per period (at least 1).
    pub limit: u64,
    /// The period.
    pub period: Duration,
}

impl Quota {
    /// `limit` requests per `period`.
    pub fn new(limit: u64, period: Duration) -> Self {
        Self {
            limit: limit.max(1),
            period,
        }
    }

    /// `limit` requests per second.
    pub fn per_second(limit: u64) -> Self {
        Self::new(limit, Duration::from_secs(1))
    }

    /// `limit` requests per minute.
    pub fn per_minute(limit: u64) -> Self {
        Self::new(limit, Duration::from_secs(60))
    }

    /// `limit` requests per hour.
    pub fn per_hour(limit: u64) -> Self {
        Self::new(limit, Duration::from_secs(3600))
    }
}

/// What a store decided for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// Whether the request may go on.
    pub allowed: bool,
    /// The limit of the quota reported: the one with the fewest requests left, or the
    /// one that refused.
    pub limit: u64,
    /// Requests left in that quota after this one (0 when refused).
    pub remaining: u64,
    /// Time until that quota is whole again (when refused: until a request may pass).
    pub reset: Duration,
    /// When refused, the time until a request may pass.
    pub retry_after: Option<Duration>,
}

/// Decides for TATs `tats` (nanoseconds on the store's clock, `None` for a new key) at
/// `now`, returning the decision and, when allowed, the new TATs to store.
pub(crate) fn decide(
    now: u64,
    tats: &[Option<u64>],
    quotas: &[Quota],
) -> (Decision, Option<Vec<u64>>) {
    let mut new_tats = Vec::with_capacity(quotas.len());
    let mut tightest: Option<(u64, u64, u64)> = None; // (remaining, limit, used)
    let mut refused: Option<(u64, u64)> = None; // (wait, limit)
    for (quota, tat) in quotas.iter().zip(tats) {
        let period = u64::try_from(quota.period.as_nanos()).unwrap_or(u64::MAX);
        let interval = (period / quota.limit).max(1);
        let tat = tat.unwrap_or(now).max(now);
        let new_tat = tat.saturating_add(interval);
        let used = new_tat - now;
        if used > period {
            let wait = used - period;
            if refused.is_none_or(|(w, _)| wait > w) {
                refused = Some((wait, quota.limit));
            }
        } else {
            let remaining = (period - used) / interval;
            if tightest.is_none_or(|(r, _, _)| remaining < r) {
                tightest = Some((remaining, quota.limit, used));
            }
        }
        new_tats.push(new_tat);
    }
    match (refused, tightest) {
        (Some((wait, limit)), _) => (
            Decision {
                allowed: false,
                limit,
                remaining: 0,
                reset: Duration::from_nanos(wait),
                retry_after: Some(Duration::from_nanos(wait)),
            },
            None,
        ),
        (None, Some((remaining, limit, used))) => (
            Decision {
                allowed: true,
                limit,
                remaining,
                reset: Duration::from_nanos(used),
                retry_after: None,
            },
            Some(new_tats),
        ),
        (None, None) => (
            Decision {
                allowed: true,
                limit: 0,
                remaining: 0,
                reset: Duration::ZERO,
                retry_after: None,
            },
            Some(new_tats),
        ),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const SECOND: u64 = 1_000_000_000;

    fn run(quotas: &[Quota], times: &[u64]) -> Vec<bool> {
        let mut tats = vec![None; quotas.len()];
        times
            .iter()
            .map(|&now| {
                let (decision, new) = decide(now, &tats, quotas);
                if let Some(new) = new {
                    tats = new.into_iter().map(Some).collect();
                }
                decision.allowed
            })
            .collect()
    }

    #[test]
    fn a_burst_of_the_limit_then_one_per_interval() {
        let quotas = [Quota::per_second(5)];
        let allowed = run(&quotas, &[0; 7]);
        assert_eq!(allowed, [true, true, true, true, true, false, false]);
        // 200 ms later exactly one more fits.
        let allowed = run(&quotas, &[0, 0, 0, 0, 0, SECOND / 5, SECOND / 5]);
        assert_eq!(allowed, [true, true, true, true, true, true, false]);
    }

    #[test]
    fn remaining_reset_and_retry_after() {
        let quotas = [Quota::per_second(10), Quota::per_minute(3)];
        let (first, tats) = decide(0, &[None, None], &quotas);
        assert!(first.allowed);
        assert_eq!(
            (first.limit, first.remaining),
            (3, 2),
            "the minute quota is the tighter"
        );
        assert_eq!(first.reset, Duration::from_secs(20));
        let tats: Vec<_> = tats.unwrap().into_iter().map(Some).collect();
        let (_, tats) = decide(0, &tats, &quotas);
        let tats: Vec<_> = tats.unwrap().into_iter().map(Some).collect();
        let (_, tats) = decide(0, &tats, &quotas);
        let tats: Vec<_> = tats.unwrap().into_iter().map(Some).collect();
        let (refused, none) = decide(0, &tats, &quotas);
        assert!(!refused.allowed && none.is_none());
        assert_eq!(refused.limit, 3);
        assert_eq!(refused.retry_after, Some(Duration::from_secs(20)));
    }

    proptest! {
        /// However requests arrive, between any two allowed ones at most the burst plus
        /// one per interval elapsed got in: GCRA's conformance bound (so at most twice the
        /// limit in any window of one period, as with Kong's fixed windows).
        #[test]
        fn never_more_than_the_burst_plus_the_rate(
            limit in 1u64..20,
            gaps in proptest::collection::vec(0u64..300_000_000, 1..200),
        ) {
            let quotas = [Quota::per_second(limit)];
            let interval = SECOND / limit;
            let mut now = 0;
            let times: Vec<u64> = gaps.iter().map(|gap| { now += gap; now }).collect();
            let allowed = run(&quotas, &times);
            let passed: Vec<u64> = times.iter().zip(&allowed).filter(|(_, a)| **a).map(|(t, _)| *t).collect();
            for i in 0..passed.len() {
                for j in i..passed.len() {
                    let count = (j - i + 1) as u64;
                    prop_assert!(count <= limit + (passed[j] - passed[i]) / interval);
                }
            }
        }
    }
}
