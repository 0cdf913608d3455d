//! [`Backoff`]: the one exponential backoff of micro, used by the client's retries, the
//! event consumer engine and sagas.
//!
//! The delay before retry `n` (counted from 1) is `initial × multiplier^(n-1)`, capped at
//! `max`, then spread by a [`Jitter`] so that clients that failed together do not retry
//! together, and capped at `max` again. It is a pure function of the attempt number and a
//! random draw, so a caller keeps no state between attempts and a test can pass a seeded
//! RNG ([`Backoff::delay_with`]) for exact delays.
//!
//! ```
//! use std::time::Duration;
//! use micro_core::backoff::{Backoff, Jitter};
//!
//! let backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1))
//!     .jitter(Jitter::None);
//! assert_eq!(backoff.delay(1), Duration::from_millis(100));
//! assert_eq!(backoff.delay(3), Duration::from_millis(400));
//! assert_eq!(backoff.delay(10), Duration::from_secs(1));
//! ```
//!
//! It replaces the `backoff` crate, which is unmaintained (RUSTSEC-2025-0012).

use std::time::Duration;

use rand::Rng;

/// How a nominal delay is spread.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub enum Jitter {
    /// Exactly the nominal delay.
    None,
    /// Uniform in `nominal × [1 - f, 1 + f]`, `f` clamped to `0..=1`.
    Proportional(f64),
    /// Uniform in `[nominal / 2, nominal]` ("equal jitter").
    Equal,
    /// Uniform in `[0, nominal]` ("full jitter").
    Full,
}

/// An exponential backoff with jitter; see the [module docs](self).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    multiplier: f64,
    jitter: Jitter,
}

impl Backoff {
    /// Doubling from `initial` up to `max`, with [`Jitter::Full`].
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max,
            multiplier: 2.0,
            jitter: Jitter::Full,
        }
    }

    /// Sets the growth factor between two retries; values below 1 (or not finite) are
    /// taken as 1.
    pub fn multiplier(mut self, multiplier: f64) -> Self {
        self.multiplier = multiplier;
        self
    }

    /// Sets the jitter.
    pub fn jitter(mut self, jitter: Jitter) -> Self {
        self.jitter = jitter;
        self
    }

    /// The delay before retry number `attempt` (from 1), drawn with the thread's RNG.
    pub fn delay(&self, attempt: u32) -> Duration {
        self.delay_with(attempt, &mut rand::rng())
    }

    /// The delay before retry number `attempt` (from 1), drawn with `rng`.
    pub fn delay_with(&self, attempt: u32, rng: &mut impl Rng) -> Duration {
        let multiplier = if self.multiplier >= 1.0 && self.multiplier.is_finite() {
            self.multiplier
        } else {
            1.0
        };
        let max = self.max.as_secs_f64();
        let exponent = attempt.saturating_sub(1).min(64) as i32;
        let nominal = (self.initial.as_secs_f64() * multiplier.powi(exponent)).min(max);
        let spread = match self.jitter {
            Jitter::None => nominal,
            Jitter::Proportional(factor) => {
                let factor = if factor.is_nan() {
                    0.0
                } else {
                    factor.clamp(0.0, 1.0)
                };
                if factor > 0.0 {
                    nominal * rng.random_range(1.0 - factor..=1.0 + factor)
                } else {
                    nominal
                }
            }
            Jitter::Equal => nominal / 2.0 + rng.random_range(0.0..=nominal / 2.0),
            Jitter::Full => rng.random_range(0.0..=nominal),
        };
        Duration::try_from_secs_f64(spread.clamp(0.0, max)).unwrap_or(self.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    fn backoff(jitter: Jitter) -> Backoff {
        Backoff::new(Duration::from_millis(100), Duration::from_secs(2)).jitter(jitter)
    }

    #[test]
    fn grows_by_the_multiplier_up_to_the_cap() {
        let b = backoff(Jitter::None).multiplier(3.0);
        assert_eq!(b.delay(1), Duration::from_millis(100));
        assert_eq!(b.delay(2), Duration::from_millis(300));
        assert_eq!(b.delay(3), Duration::from_millis(900));
        assert_eq!(b.delay(4), Duration::from_secs(2));
        assert_eq!(b.delay(u32::MAX), Duration::from_secs(2));
        assert_eq!(b.multiplier(0.5).delay(5), Duration::from_millis(100));
    }

    #[test]
    fn every_jitter_stays_in_its_range_and_under_the_cap() {
        let mut rng = StdRng::seed_from_u64(7);
        for attempt in 1..12 {
            let nominal = backoff(Jitter::None).delay(attempt);
            for _ in 0..50 {
                let p = backoff(Jitter::Proportional(0.5)).delay_with(attempt, &mut rng);
                assert!(p >= nominal / 2 && p <= (nominal * 3 / 2).min(Duration::from_secs(2)));
                let e = backoff(Jitter::Equal).delay_with(attempt, &mut rng);
                assert!(e >= nominal / 2 && e <= nominal);
                let f = backoff(Jitter::Full).delay_with(attempt, &mut rng);
                assert!(f <= nominal);
            }
        }
    }

    #[test]
    fn a_seeded_rng_gives_the_same_delays() {
        let draw = |seed| {
            let mut rng = StdRng::seed_from_u64(seed);
            (1..6)
                .map(|n| backoff(Jitter::Full).delay_with(n, &mut rng))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(1), draw(1));
        assert_ne!(draw(1), draw(2));
    }
}
