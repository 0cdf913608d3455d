//! The breaker's state machine, shared by clones of a `CircuitBreaker` and the futures
//! of the calls it let through.
//!
//! A std `Mutex` guards it: every critical section is a few comparisons with no await in
//! it, so an async lock would only add cost. Each state change bumps a generation, and a
//! call only reports its outcome to the generation that admitted it: a slow call started
//! while closed must not close a breaker that has since opened.

use std::collections::VecDeque;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::time::Instant;

use super::{CircuitBreakerConfig, CircuitOpen, CircuitState, STATE_METRIC, TRANSITIONS_METRIC};

pub(super) struct Breaker {
    config: CircuitBreakerConfig,
    name: Option<Arc<str>>,
    machine: Mutex<Machine>,
}

struct Machine {
    phase: Phase,
    generation: u64,
}

enum Phase {
    Closed(Window),
    Open { until: Instant },
    HalfOpen { admitted: u32, succeeded: u32 },
}

/// The outcomes of the most recent calls, `true` for a failure.
struct Window {
    outcomes: VecDeque<bool>,
    failures: u32,
}

#[derive(Clone, Copy)]
enum Outcome {
    Success,
    Failure,
    Cancelled,
}

impl Breaker {
    pub(super) fn new(config: CircuitBreakerConfig, name: Option<Arc<str>>) -> Self {
        let config = config.clamped();
        let breaker = Self {
            machine: Mutex::new(Machine {
                phase: Phase::Closed(Window::new(config.window_size)),
                generation: 0,
            }),
            config,
            name,
        };
        if let Some(name) = &breaker.name {
            metrics::describe_gauge!(
                STATE_METRIC,
                "State of a circuit breaker: 0 closed, 1 open, 2 half-open"
            );
            metrics::describe_counter!(TRANSITIONS_METRIC, "State changes of a circuit breaker");
            metrics::gauge!(STATE_METRIC, "name" => name.to_string())
                .set(CircuitState::Closed.as_gauge());
        }
        breaker
    }

    pub(super) fn config(&self) -> &CircuitBreakerConfig {
        &self.config
    }

    pub(super) fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    pub(super) fn state(&self) -> CircuitState {
        let mut machine = self.lock();
        self.refresh(&mut machine, Instant::now());
        machine.phase.state()
    }

    /// Admits a call, or says why not.
    pub(super) fn try_acquire(self: &Arc<Self>) -> Result<Permit, CircuitOpen> {
        let mut machine = self.lock();
        self.refresh(&mut machine, Instant::now());
        let admitted = match &mut machine.phase {
            Phase::Closed(_) => true,
            Phase::Open { .. } => false,
            Phase::HalfOpen { admitted, .. } => {
                let room = *admitted < self.config.half_open_calls;
                if room {
                    *admitted += 1;
                }
                room
            }
        };
        if !admitted {
            return Err(CircuitOpen::new(self.name.clone()));
        }
        Ok(Permit {
            breaker: self.clone(),
            generation: machine.generation,
            settled: false,
        })
    }

    fn record(&self, generation: u64, outcome: Outcome) {
        let mut machine = self.lock();
        if machine.generation != generation {
            return;
        }
        let config = &self.config;
        let next = match (&mut machine.phase, outcome) {
            (Phase::HalfOpen { admitted, .. }, Outcome::Cancelled) => {
                *admitted = admitted.saturating_sub(1);
                None
            }
            (_, Outcome::Cancelled) | (Phase::Open { .. }, _) => None,
            (Phase::Closed(window), outcome) => {
                window.push(matches!(outcome, Outcome::Failure), config.window_size);
                window
                    .is_failing(config)
                    .then(|| self.open_phase(Instant::now()))
            }
            (Phase::HalfOpen { .. }, Outcome::Failure) => Some(self.open_phase(Instant::now())),
            (Phase::HalfOpen { succeeded, .. }, Outcome::Success) => {
                *succeeded += 1;
                (*succeeded >= config.half_open_calls)
                    .then(|| Phase::Closed(Window::new(config.window_size)))
            }
        };
        if let Some(next) = next {
            self.transition(&mut machine, next);
        }
    }

    /// Moves an open breaker whose time is up to half-open.
    fn refresh(&self, machine: &mut Machine, now: Instant) {
        if let Phase::Open { until } = machine.phase {
            if now >= until {
                let trial = Phase::HalfOpen {
                    admitted: 0,
                    succeeded: 0,
                };
                self.transition(machine, trial);
            }
        }
    }

    fn open_phase(&self, now: Instant) -> Phase {
        Phase::Open {
            until: now + self.config.open_duration,
        }
    }

    fn transition(&self, machine: &mut Machine, next: Phase) {
        let from = machine.phase.state();
        machine.phase = next;
        machine.generation += 1;
        let to = machine.phase.state();

        let name = self.name.as_deref().unwrap_or_default();
        if to == CircuitState::Open {
            tracing::warn!(breaker = name, %from, %to, "circuit breaker opened");
        } else {
            tracing::info!(breaker = name, %from, %to, "circuit breaker changed state");
        }
        if let Some(name) = &self.name {
            metrics::gauge!(STATE_METRIC, "name" => name.to_string()).set(to.as_gauge());
            metrics::counter!(
                TRANSITIONS_METRIC,
                "name" => name.to_string(),
                "from" => from.as_str(),
                "to" => to.as_str()
            )
            .increment(1);
        }
    }

    fn lock(&self) -> MutexGuard<'_, Machine> {
        // The machine is consistent between statements, so a panic elsewhere while the
        // lock was held leaves nothing to repair.
        self.machine.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl fmt::Debug for Breaker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Breaker")
            .field("name", &self.name)
            .field("state", &self.lock().phase.state())
            .field("config", &self.config)
            .finish()
    }
}

impl Phase {
    fn state(&self) -> CircuitState {
        match self {
            Self::Closed(_) => CircuitState::Closed,
            Self::Open { .. } => CircuitState::Open,
            Self::HalfOpen { .. } => CircuitState::HalfOpen,
        }
    }
}

impl Window {
    fn new(size: u32) -> Self {
        Self {
            outcomes: VecDeque::with_capacity(size as usize),
            failures: 0,
        }
    }

    fn push(&mut self, failed: bool, size: u32) {
        if self.outcomes.len() == size as usize && self.outcomes.pop_front() == Some(true) {
            self.failures -= 1;
        }
        self.outcomes.push_back(failed);
        self.failures += u32::from(failed);
    }

    fn is_failing(&self, config: &CircuitBreakerConfig) -> bool {
        let calls = self.outcomes.len() as u32;
        calls >= config.minimum_calls
            && self.failures > 0
            && f64::from(self.failures) >= config.failure_rate_threshold * f64::from(calls)
    }
}

/// A call's admission; it reports the call's outcome once, when settled or dropped.
pub(super) struct Permit {
    breaker: Arc<Breaker>,
    generation: u64,
    settled: bool,
}

impl Permit {
    pub(super) fn settle(mut self, succeeded: bool) {
        self.settled = true;
        let outcome = if succeeded {
            Outcome::Success
        } else {
            Outcome::Failure
        };
        self.breaker.record(self.generation, outcome);
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if !self.settled {
            self.breaker.record(self.generation, Outcome::Cancelled);
        }
    }
}
