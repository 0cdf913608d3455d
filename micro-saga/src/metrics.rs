//! The metrics sagas record, through the `metrics` facade. Like every micro crate's,
//! their names start `micro_<crate>_` (the host's HTTP metrics follow OpenTelemetry's
//! `http_server_*` instead); they were `saga_*` before the names were unified.
//!
//! | metric | kind | labels |
//! |---|---|---|
//! | `micro_saga_started_total` | counter | `definition` |
//! | `micro_saga_completed_total` | counter | `definition` |
//! | `micro_saga_compensated_total` | counter | `definition` |
//! | `micro_saga_failed_total` | counter | `definition` |
//! | `micro_saga_in_flight` | gauge | `definition` |
//! | `micro_saga_step_duration_seconds` | histogram | `definition`, `step`, `phase`, `outcome` (`ok`, `retry`, `error`) |
//! | `micro_saga_compensations_total` | counter | `definition`, `step`, `outcome` (`ok`, `error`) |
//! | `micro_saga_log_retries_total` | counter | `definition` |
//!
//! `micro_saga_in_flight` counts the sagas this process is driving, recovered ones
//! included. `micro_saga_compensations_total` counts finished compensations, one per
//! step compensated or given up on, whatever the attempts.

use std::time::Duration;

use crate::state::SagaStatus;
use crate::step::Phase;

/// `micro_saga_started_total`.
pub const STARTED: &str = "micro_saga_started_total";
/// `micro_saga_completed_total`.
pub const COMPLETED: &str = "micro_saga_completed_total";
/// `micro_saga_compensated_total`.
pub const COMPENSATED: &str = "micro_saga_compensated_total";
/// `micro_saga_failed_total`.
pub const FAILED: &str = "micro_saga_failed_total";
/// `micro_saga_in_flight`.
pub const IN_FLIGHT: &str = "micro_saga_in_flight";
/// `micro_saga_step_duration_seconds`.
pub const STEP_DURATION: &str = "micro_saga_step_duration_seconds";
/// `micro_saga_compensations_total`.
pub const COMPENSATIONS: &str = "micro_saga_compensations_total";
/// `micro_saga_log_retries_total`: saga log writes retried after a transient failure.
pub const LOG_RETRIES: &str = "micro_saga_log_retries_total";

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
