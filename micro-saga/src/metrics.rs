//! The metrics sagas record, through the `metrics` facade.
//!
//! | metric | kind | labels |
//! |---|---|---|
//! | `saga_started_total` | counter | `definition` |
//! | `saga_completed_total` | counter | `definition` |
//! | `saga_compensated_total` | counter | `definition` |
//! | `saga_failed_total` | counter | `definition` |
//! | `saga_in_flight` | gauge | `definition` |
//! | `saga_step_duration_seconds` | histogram | `definition`, `step`, `phase`, `outcome` (`ok`, `retry`, `error`) |
//! | `saga_compensations_total` | counter | `definition`, `step`, `outcome` (`ok`, `error`) |
//! | `saga_log_retries_total` | counter | `definition` |
//!
//! `saga_in_flight` counts the sagas this process is driving, recovered ones
//! included. `saga_compensations_total` counts finished compensations, one per
//! step compensated or given up on, whatever the attempts.

use std::time::Duration;

use crate::state::SagaStatus;
use crate::step::Phase;

/// `saga_started_total`.
pub const STARTED: &str = "saga_started_total";
/// `saga_completed_total`.
pub const COMPLETED: &str = "saga_completed_total";
/// `saga_compensated_total`.
pub const COMPENSATED: &str = "saga_compensated_total";
/// `saga_failed_total`.
pub const FAILED: &str = "saga_failed_total";
/// `saga_in_flight`.
pub const IN_FLIGHT: &str = "saga_in_flight";
/// `saga_step_duration_seconds`.
pub const STEP_DURATION: &str = "saga_step_duration_seconds";
/// `saga_compensations_total`.
pub const COMPENSATIONS: &str = "saga_compensations_total";
/// `saga_log_retries_total`: saga log writes retried after a transient failure.
pub const LOG_RETRIES: &str = "saga_log_retries_total";

pub(crate) fn log_retry(definition: &str) {
    metrics::counter!(LOG_RETRIES, "definition" => definition.to_owned()).increment(1);
}

pub(crate) fn started(definition: &str) {
    metrics::counter!(STARTED, "definition" => definition.to_owned()).increment(1);
}

pub(crate) fn finished(definition: &str, status: SagaStatus) {
    let name = match status {
        SagaStatus::Completed => COMPLETED,
        SagaStatus::Compensated => COMPENSATED,
        SagaStatus::Failed => FAILED,
        SagaStatus::Running | SagaStatus::Compensating => return,
    };
    metrics::counter!(name, "definition" => definition.to_owned()).increment(1);
}

pub(crate) fn in_flight(definition: &str, delta: f64) {
    metrics::gauge!(IN_FLIGHT, "definition" => definition.to_owned()).increment(delta);
}

pub(crate) fn step_duration(
    definition: &str,
    step: &str,
    phase: Phase,
    outcome: &'static str,
    elapsed: Duration,
) {
    metrics::histogram!(
        STEP_DURATION,
        "definition" => definition.to_owned(),
        "step" => step.to_owned(),
        "phase" => phase.as_str(),
        "outcome" => outcome,
    )
    .record(elapsed.as_secs_f64());
}

pub(crate) fn compensation(definition: &str, step: &str, outcome: &'static str) {
    metrics::counter!(
        COMPENSATIONS,
        "definition" => definition.to_owned(),
        "step" => step.to_owned(),
        "outcome" => outcome,
    )
    .increment(1);
}
