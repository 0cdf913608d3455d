//! Health checks and the `/health/live` and `/health/ready` reports.
//!
//! Liveness answers "is the process serving HTTP at all" and never runs checks: a failing
//! database must not get a pod restarted. Readiness runs every [`HealthCheck`] of the
//! service concurrently, each bounded by its own timeout, and answers `503` when a critical
//! check fails or once shutdown has begun, so a load balancer stops sending new work.

use std::borrow::Cow;
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tower::BoxError;

use crate::service::BoxFuture;

type CheckFn = dyn Fn() -> BoxFuture<'static, Result<(), BoxError>> + Send + Sync;

/// A named probe of something a service depends on: a database, a broker, a downstream.
///
/// Checks are critical by default (a failure makes the service not ready) and time out
/// after one second. A non-critical check is reported but never fails readiness.
///
/// ```
/// use std::time::Duration;
/// use micro_core::health::HealthCheck;
///
/// let check = HealthCheck::new("cache", || async { Ok(()) })
///     .critical(false)
///     .timeout(Duration::from_millis(200));
/// assert_eq!(check.name(), "cache");
/// assert!(!check.is_critical());
/// ```
#[derive(Clone)]
pub struct HealthCheck {
    name: Cow<'static, str>,
    critical: bool,
    timeout: Duration,
    check: Arc<CheckFn>,
}

impl HealthCheck {
    /// The timeout a check gets unless [`timeout`](Self::timeout) sets another.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);

    /// Creates a critical check named `name` that runs `check`.
    pub fn new<F, Fut>(name: impl Into<Cow<'static, str>>, check: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), BoxError>> + Send + 'static,
    {
        Self {
            name: name.into(),
            critical: true,
            timeout: Self::DEFAULT_TIMEOUT,
            check: Arc::new(move || Box::pin(check())),
        }
    }

    /// Sets whether a failure of this check makes the service not ready.
    pub fn critical(mut self, critical: bool) -> Self {
        self.critical = critical;
        self
    }

    /// Sets how long the check may take before it counts as failed.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The check's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether a failure of this check makes the service not ready.
    pub fn is_critical(&self) -> bool {
        self.critical
    }

    /// Runs the check once, bounded by its timeout.
    pub async fn run(&self) -> CheckReport {
        let started = Instant::now();
        let outcome = tokio::time::timeout(self.timeout, (self.check)()).await;
        let (status, error) = match outcome {
            Ok(Ok(())) => (CheckStatus::Pass, None),
            Ok(Err(error)) => (CheckStatus::Fail, Some(error.to_string())),
            Err(_) => (
                CheckStatus::Timeout,
                Some(format!("check did not finish within {:?}", self.timeout)),
            ),
        };
        CheckReport {
            name: self.name.to_string(),
            critical: self.critical,
            status,
            duration_ms: started.elapsed().as_secs_f64() * 1000.0,
            error,
        }
    }
}

impl fmt::Debug for HealthCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HealthCheck")
            .field("name", &self.name)
            .field("critical", &self.critical)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// The outcome of one health check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckStatus {
    /// The check succeeded.
    Pass,
    /// The check returned an error.
    Fail,
    /// The check did not finish within its timeout.
    Timeout,
}

/// One check's line in the readiness report.
#[derive(Debug, Clone, Serialize)]
pub struct CheckReport {
    /// The check's name.
    pub name: String,
    /// Whether a failure makes the service not ready.
    pub critical: bool,
    /// What the check found.
    pub status: CheckStatus,
    /// How long the check took, in milliseconds.
    pub duration_ms: f64,
    /// Why the check failed, when it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Whether a service takes new work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Readiness {
    /// Every critical check passed.
    Ready,
    /// A critical check failed or timed out.
    NotReady,
    /// The service is starting and has not finished its start hook.
    Starting,
    /// Shutdown has begun: in-flight work finishes, new work should go elsewhere.
    ShuttingDown,
}

/// The body of `GET /health/ready`.
#[derive(Debug, Clone, Serialize)]
pub struct ReadinessReport {
    /// The service's name.
    pub service: String,
    /// The service's version.
    pub version: String,
    /// The overall verdict.
    pub status: Readiness,
    /// Every check, in the order the service declared them.
    pub checks: Vec<CheckReport>,
}

impl ReadinessReport {
    /// Whether the report should be served with `200 OK` (otherwise `503`).
    pub fn is_ready(&self) -> bool {
        self.status == Readiness::Ready
    }
}

/// Runs every check concurrently and folds them into a verdict.
///
/// While `phase` is [`Readiness::Starting`] or [`Readiness::ShuttingDown`] the checks are
/// still run and reported, but the verdict stays that phase.
pub(crate) async fn readiness(
    service: &str,
    version: &str,
    checks: &[HealthCheck],
    phase: Option<Readiness>,
) -> ReadinessReport {
    let mut tasks = tokio::task::JoinSet::new();
    for (index, check) in checks.iter().enumerate() {
        let check = check.clone();
        tasks.spawn(async move { (index, check.run().await) });
    }
    let mut reports: Vec<Option<CheckReport>> = vec![None; checks.len()];
    while let Some(joined) = tasks.join_next().await {
        // A panicking check is reported as a failure below, by its empty slot.
        if let Ok((index, report)) = joined {
            reports[index] = Some(report);
        }
    }
    let checks: Vec<CheckReport> = reports
        .into_iter()
        .zip(checks)
        .map(|(report, check)| {
            report.unwrap_or_else(|| CheckReport {
                name: check.name().to_owned(),
                critical: check.is_critical(),
                status: CheckStatus::Fail,
                duration_ms: 0.0,
                error: Some("check panicked".to_owned()),
            })
        })
        .collect();
    let failed = checks
        .iter()
        .any(|c| c.critical && c.status != CheckStatus::Pass);
    let status = match phase {
        Some(phase) => phase,
        None if failed => Readiness::NotReady,
        None => Readiness::Ready,
    };
    ReadinessReport {
        service: service.to_owned(),
        version: version.to_owned(),
        status,
        checks,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn slow_check_times_out_by_its_own_bound() {
        let check = HealthCheck::new("slow", || async {
            tokio::time::sleep(Duration::from_secs(10)).await;
            Ok(())
        })
        .timeout(Duration::from_millis(50));
        let report = check.run().await;
        assert_eq!(report.status, CheckStatus::Timeout);
    }

    #[tokio::test]
    async fn only_critical_failures_make_the_service_not_ready() {
        let failing = || async { Err::<(), BoxError>("db down".into()) };
        let checks = [
            HealthCheck::new("cache", failing).critical(false),
            HealthCheck::new("ok", || async { Ok(()) }),
        ];
        let report = readiness("svc", "1", &checks, None).await;
        assert_eq!(report.status, Readiness::Ready);
        assert_eq!(report.checks[0].status, CheckStatus::Fail);
        assert_eq!(report.checks[0].error.as_deref(), Some("db down"));

        let checks = [HealthCheck::new("db", failing)];
        let report = readiness("svc", "1", &checks, None).await;
        assert_eq!(report.status, Readiness::NotReady);
        assert!(!report.is_ready());
    }

    #[tokio::test]
    async fn shutting_down_overrides_passing_checks() {
        let checks = [HealthCheck::new("ok", || async { Ok(()) })];
        let report = readiness("svc", "1", &checks, Some(Readiness::ShuttingDown)).await;
        assert_eq!(report.status, Readiness::ShuttingDown);
        assert_eq!(report.checks[0].status, CheckStatus::Pass);
    }

    #[tokio::test]
    async fn a_panicking_check_is_a_failure() {
        let checks = [HealthCheck::new("boom", || async {
            panic!("check bug");
        })];
        let report = readiness("svc", "1", &checks, None).await;
        assert_eq!(report.status, Readiness::NotReady);
        assert_eq!(report.checks[0].error.as_deref(), Some("check panicked"));
    }
}
