//! The orchestrator: runs sagas concurrently, recovers them after a crash, and
//! answers queries about them.

use std::any::Any;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};

use std::time::Duration;

use micro_core::backoff::{Backoff, Jitter};
use micro_core::trace::TraceContext;
use time::OffsetDateTime;
use tokio::task::JoinHandle;

use crate::definition::{SagaContext, SagaDefinition};
use crate::driver::Driver;
use crate::error::{Error, Result};
use crate::log::{Lease, LogError, SagaLog, SagaRecord, SagaSummary};
use crate::metrics;
use crate::state::{SagaInstance, SagaStatus};

/// Runs sagas: each in its own task, every transition written to the
/// [`SagaLog`] before it is acted on.
///
/// Register every definition whose sagas this orchestrator may start or
/// resume with [`OrchestratorBuilder::definition`]. Call
/// [`recover`](Self::recover) when the process starts, to resume the sagas a
/// crash left unfinished: a step whose outcome was never recorded runs again
/// with the same idempotency key (within its recorded deadline, when the
/// step has a timeout: see [`StepPolicy`](crate::StepPolicy)), and a saga
/// that was compensating carries on compensating.
///
/// Cheap to clone; clones share the log and the definitions. Sagas keep
/// running when their [`SagaHandle`] is dropped. When the runtime stops, a
/// saga stops between two writes to the log and is resumed by the next
/// [`recover`](Self::recover).
///
/// Two orchestrators may share one durable log: the log's optimistic
/// concurrency lets only one of them advance a saga, and the other stops
/// driving it with a [`LogError::Conflict`](crate::log::LogError::Conflict).
///
/// # Leases: several orchestrators on one log
///
/// Built with [`OrchestratorBuilder::lease`] (on a log that holds leases,
/// the PostgreSQL one), an orchestrator holds each saga it drives under a
/// lease in the log, with its owner id, an expiry and a fencing epoch (see
/// the [log's docs](crate::log#leases)):
///
/// - [`start`](Self::start) creates the saga leased to this orchestrator;
///   the saga's task renews the lease every third of its ttl, by the log's
///   clock;
/// - [`recover`](Self::recover) and [`keep_recovering`](Self::keep_recovering)
///   resume only the sagas whose lease has lapsed (or that have none), and
///   claim each one first, which bumps its epoch: a saga another live
///   orchestrator drives is never picked up, however long its step takes;
/// - every write carries the lease; a write of a stale owner (its lease
///   lapsed and was claimed) is refused with
///   [`LogError::Fenced`](crate::log::LogError::Fenced), and its task stops
///   driving the saga;
/// - a task that cannot renew its lease stops driving the saga (and drops
///   the step attempt in flight) when 90% of the ttl has passed since the
///   last renewal was sent, before the log lets anyone claim it, so that two
///   owners do not call a saga's participants at once;
/// - a saga whose task stops without finishing gives its lease up at once,
///   unless it was fenced off.
///
/// Every orchestrator on one log must then use leases, each with its own
/// owner id. Choose the ttl longer than a renewal's round trip with some
/// room (seconds, not milliseconds), and know that after a crash a saga
/// waits up to one ttl before it is resumed elsewhere. A process that
/// restarts with the same owner id takes its own sagas back at once in
/// [`recover`](Self::recover).
#[derive(Clone)]
pub struct Orchestrator {
    inner: Arc<Inner>,
}

struct Inner {
    log: Arc<dyn SagaLog>,
    definitions: HashMap<String, Arc<dyn ErasedDefinition>>,
    running: Mutex<HashSet<Arc<str>>>,
    lease: Option<LeaseConfig>,
}

/// Who this orchestrator is on its log, and how long its leases last.
#[derive(Debug, Clone)]
struct LeaseConfig {
    owner: String,
    ttl: Duration,
}

/// A lease a saga's task holds, and when the request that granted or last
/// renewed it was sent (by this process's clock).
struct Held {
    lease: Lease,
    ttl: Duration,
    sent: tokio::time::Instant,
}

impl Inner {
    fn running(&self) -> MutexGuard<'_, HashSet<Arc<str>>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A definition whose context type is erased, so that one orchestrator can
/// resume sagas of many context types.
trait ErasedDefinition: Send + Sync {
    fn step_names(&self) -> Vec<&str>;
    fn as_any(&self) -> &dyn Any;
    fn resume(
        &self,
        orchestrator: &Orchestrator,
        record: SagaRecord,
        held: Option<Held>,
    ) -> Result<SagaHandle>;
}

impl<C: SagaContext> ErasedDefinition for SagaDefinition<C> {
    fn step_names(&self) -> Vec<&str> {
        SagaDefinition::step_names(self)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn resume(
        &self,
        orchestrator: &Orchestrator,
        record: SagaRecord,
        held: Option<Held>,
    ) -> Result<SagaHandle> {
        let lease = held.as_ref().map(|h| h.lease.clone());
        let driver = Driver::resume(self.clone(), orchestrator.inner.log.clone(), record, lease)?;
        Ok(orchestrator.spawn(driver, held.map(|h| (h.ttl, h.sent))))
    }
}

impl Orchestrator {
    /// Starts building an orchestrator that records sagas in `log`.
    pub fn builder(log: Arc<dyn SagaLog>) -> OrchestratorBuilder {
        OrchestratorBuilder {
            log,
            definitions: HashMap::new(),
            duplicate: None,
            lease: None,
        }
    }

    /// The saga log.
    pub fn log(&self) -> &Arc<dyn SagaLog> {
        &self.inner.log
    }

    /// Starts a saga of `definition` with id `saga_id`: records it in the log
    /// and drives it in a new task. The saga joins the current trace
    /// ([`TraceContext::current`]) or starts one, and records it so that its
    /// steps, recovered ones included, run in that trace.
    ///
    /// # Errors
    ///
    /// - [`Error::UnknownDefinition`] or [`Error::DefinitionMismatch`] when
    ///   `definition` is not the one registered under its name;
    /// - [`Error::InvalidDefinition`] for an empty id;
    /// - [`Error::Log`] with [`LogError::AlreadyExists`](crate::log::LogError::AlreadyExists)
    ///   when a saga with this id exists (starting is idempotent by id), or
    ///   another log failure;
    /// - [`Error::Context`] when the context does not encode.
    pub async fn start<C: SagaContext>(
        &self,
        definition: &SagaDefinition<C>,
        saga_id: impl Into<String>,
        context: C,
    ) -> Result<SagaHandle> {
        self.check_registered(definition)?;
        let trace = TraceContext::current()
            .map(|t| t.child())
            .unwrap_or_else(TraceContext::new_root);
        let sent = tokio::time::Instant::now();
        let lease = self.inner.lease.as_ref();
        let driver = Driver::create(
            definition.clone(),
            self.inner.log.clone(),
            saga_id.into(),
            context,
            trace,
            lease.map(|l| (l.owner.as_str(), l.ttl)),
        )
        .await?;
        Ok(self.spawn(driver, lease.map(|l| (l.ttl, sent))))
    }

    /// Starts a saga and waits for it to finish; see [`start`](Self::start)
    /// and [`SagaHandle::finished`].
    ///
    /// # Errors
    ///
    /// As [`start`](Self::start) and [`SagaHandle::finished`].
    pub async fn run<C: SagaContext>(
        &self,
        definition: &SagaDefinition<C>,
        saga_id: impl Into<String>,
        context: C,
    ) -> Result<SagaInstance> {
        self.start(definition, saga_id, context)
            .await?
            .finished()
            .await
    }

    fn check_registered<C: SagaContext>(&self, definition: &SagaDefinition<C>) -> Result<()> {
        let registered = self
            .inner
            .definitions
            .get(definition.name())
            .ok_or_else(|| Error::UnknownDefinition {
                name: definition.name().to_owned(),
            })?;
        let same_type = registered
            .as_any()
            .downcast_ref::<SagaDefinition<C>>()
            .is_some();
        if !same_type || registered.step_names() != definition.step_names() {
            return Err(Error::DefinitionMismatch {
                saga_id: String::new(),
                definition: definition.name().to_owned(),
                reason: "it is not the definition registered under this name".into(),
            });
        }
        Ok(())
    }

    fn spawn<C: SagaContext>(
        &self,
        driver: Driver<C>,
        lease: Option<(Duration, tokio::time::Instant)>,
    ) -> SagaHandle {
        let saga_id = driver.saga_id().clone();
        let definition = driver.definition().clone();
        let held = driver
            .lease()
            .cloned()
            .zip(lease)
            .map(|(lease, (ttl, sent))| Held { lease, ttl, sent });
        let log = self.inner.log.clone();
        self.inner.running().insert(saga_id.clone());
        let guard = Running {
            inner: self.inner.clone(),
            saga_id: saga_id.clone(),
            definition,
        };
        metrics::in_flight(&guard.definition, 1.0);
        let join = tokio::spawn(async move {
            let _guard = guard;
            match held {
                None => driver.run().await,
                Some(held) => {
                    let lease = held.lease.clone();
                    let result = tokio::select! {
                        result = driver.run() => result,
                        lost = hold_lease(log.clone(), held) => Err(lost),
                    };
                    if let Err(err) = &result {
                        let fenced = matches!(
                            err,
                            Error::Log(LogError::Fenced { .. } | LogError::LeaseLapsed { .. })
                        );
                        if fenced {
                            tracing::warn!(saga.id = %lease.saga_id, error = %err, "lost the saga's lease; stopped driving it");
                        } else if let Err(release) = log.release_lease(&lease).await {
                            tracing::warn!(saga.id = %lease.saga_id, error = %release, "could not give the saga's lease up; it lapses by itself");
                        }
                    }
                    result
                }
            }
        });
        SagaHandle { saga_id, join }
    }

    /// Resumes every unfinished saga in the log that this orchestrator is not
    /// already driving, each in its own task. With
    /// [leases](Self#leases-several-orchestrators-on-one-log), only the sagas
    /// whose lease has lapsed, that have none, or that this owner id holds
    /// (a restart of this instance), each claimed first.
    ///
    /// A saga that cannot be resumed (its definition is not registered, or
    /// no longer matches) is left in the log as it is and reported in
    /// [`Recovery::skipped`].
    ///
    /// # Errors
    ///
    /// [`Error::Log`] when the log cannot be listed or read.
    pub async fn recover(&self) -> Result<Recovery> {
        self.resume_due(None).await
    }

    /// Keeps recovering, not only at start-up: every `every`, resumes the
    /// unfinished sagas in the log that no task of this orchestrator drives
    /// and that have not moved for `idle_after` by the log's recorded times
    /// (sagas abandoned by a process that died, or by a driver that stopped).
    /// A failed sweep (the log is unreachable) is logged and tried again
    /// with backoff; the loop never gives up. Choose `idle_after` longer than
    /// a step's longest attempt and backoff, or a saga another live
    /// orchestrator drives is picked up too (the log's versions then let one
    /// of the two carry on; steps may run twice, with their idempotency
    /// keys).
    ///
    /// With [leases](Self#leases-several-orchestrators-on-one-log),
    /// `idle_after` is not used: a saga is due when its lease has lapsed in
    /// the log, and each sweep claims the due sagas before resuming them, so
    /// a saga another live orchestrator drives is never picked up.
    ///
    /// The loop stops when the returned [`RecoveryLoop`] is dropped. Call
    /// it after [`recover`](Self::recover), which resumes every unfinished
    /// saga at once.
    pub fn keep_recovering(&self, every: Duration, idle_after: Duration) -> RecoveryLoop {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let this = self.clone();
        let backoff = Backoff::new(every, every.max(Duration::from_secs(30)))
            .jitter(Jitter::Proportional(0.2));
        let join = tokio::spawn(async move {
            let mut failures = 0;
            loop {
                let delay = if failures == 0 {
                    every
                } else {
                    backoff.delay(failures)
                };
                tokio::time::sleep(delay).await;
                match this.resume_due(Some(idle_after)).await {
                    Ok(recovery) => {
                        failures = 0;
                        for handle in recovery.resumed {
                            // Nobody listening is fine: the saga runs on.
                            let _ = tx.send(handle);
                        }
                    }
                    Err(err) => {
                        failures += 1;
                        tracing::warn!(error = %err, failures, "saga recovery sweep failed; retrying");
                    }
                }
            }
        });
        RecoveryLoop { join, resumed: rx }
    }

    async fn resume_due(&self, idle_after: Option<Duration>) -> Result<Recovery> {
        if let Some(lease) = &self.inner.lease {
            return self.claim_due(lease, idle_after.is_none()).await;
        }
        let mut recovery = Recovery {
            resumed: Vec::new(),
            skipped: Vec::new(),
        };
        for summary in self.inner.log.unfinished().await? {
            if self.inner.running().contains(summary.saga_id.as_str()) {
                continue;
            }
            let Some(record) = self.inner.log.load(&summary.saga_id).await? else {
                continue;
            };
            if record.status.is_terminal() {
                continue;
            }
            if let (Some(idle_after), Some(last)) = (idle_after, record.transitions.last()) {
                if OffsetDateTime::now_utc() - last.at() < idle_after {
                    continue;
                }
            }
            if self.inner.running().contains(summary.saga_id.as_str()) {
                continue;
            }
            let resumed = match self.inner.definitions.get(&record.definition) {
                Some(definition) => definition.resume(self, record, None),
                None => Err(Error::UnknownDefinition {
                    name: record.definition.clone(),
                }),
            };
            match resumed {
                Ok(handle) => {
                    tracing::info!(saga.id = %summary.saga_id, "resuming saga");
                    recovery.resumed.push(handle);
                }
                Err(err) => {
                    tracing::error!(saga.id = %summary.saga_id, error = %err, "cannot resume saga");
                    recovery.skipped.push((summary.saga_id, err));
                }
            }
        }
        Ok(recovery)
    }

    /// Claims the sagas whose lease is due, then resumes each one under its
    /// new lease; a claimed saga that cannot be resumed is given up again.
    async fn claim_due(&self, config: &LeaseConfig, reclaim_own: bool) -> Result<Recovery> {
        let mut recovery = Recovery {
            resumed: Vec::new(),
            skipped: Vec::new(),
        };
        let skip: Vec<String> = self.inner.running().iter().map(|s| s.to_string()).collect();
        let definitions: Vec<String> = self.inner.definitions.keys().cloned().collect();
        let sent = tokio::time::Instant::now();
        let log = &self.inner.log;
        let claimed = log
            .claim_due(&config.owner, config.ttl, &definitions, &skip, reclaim_own)
            .await?;
        for lease in claimed {
            let resumed = match log.load(&lease.saga_id).await {
                Ok(Some(record)) if !record.status.is_terminal() => {
                    match self.inner.definitions.get(&record.definition) {
                        Some(definition) => {
                            let held = Held {
                                lease: lease.clone(),
                                ttl: config.ttl,
                                sent,
                            };
                            definition.resume(self, record, Some(held))
                        }
                        None => Err(Error::UnknownDefinition {
                            name: record.definition.clone(),
                        }),
                    }
                }
                Ok(_) => Err(Error::Log(LogError::NotFound {
                    saga_id: lease.saga_id.clone(),
                })),
                Err(err) => Err(err.into()),
            };
            match resumed {
                Ok(handle) => {
                    tracing::info!(saga.id = %lease.saga_id, epoch = lease.epoch, "claimed and resuming saga");
                    recovery.resumed.push(handle);
                }
                Err(err) => {
                    if let Err(release) = log.release_lease(&lease).await {
                        tracing::warn!(saga.id = %lease.saga_id, error = %release, "could not give a claimed lease up; it lapses by itself");
                    }
                    if matches!(&err, Error::Log(LogError::NotFound { .. })) {
                        continue;
                    }
                    tracing::error!(saga.id = %lease.saga_id, error = %err, "cannot resume saga");
                    recovery.skipped.push((lease.saga_id, err));
                }
            }
        }
        Ok(recovery)
    }

    /// The saga with this id, as the log holds it: status, context, trace
    /// and history ([`SagaRecord::instance`] rebuilds its full state).
    ///
    /// # Errors
    ///
    /// [`Error::Log`] when the log fails.
    pub async fn saga(&self, saga_id: &str) -> Result<Option<SagaRecord>> {
        Ok(self.inner.log.load(saga_id).await?)
    }

    /// The sagas with this status, oldest first; `Failed` lists the sagas
    /// that need attention.
    ///
    /// # Errors
    ///
    /// [`Error::Log`] when the log fails.
    pub async fn sagas_by_status(&self, status: SagaStatus) -> Result<Vec<SagaSummary>> {
        Ok(self.inner.log.by_status(status).await?)
    }

    /// The sagas that have not finished, oldest first.
    ///
    /// # Errors
    ///
    /// [`Error::Log`] when the log fails.
    pub async fn unfinished(&self) -> Result<Vec<SagaSummary>> {
        Ok(self.inner.log.unfinished().await?)
    }

    /// How many sagas this orchestrator is driving now.
    pub fn in_flight(&self) -> usize {
        self.inner.running().len()
    }
}

impl fmt::Debug for Orchestrator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut names: Vec<_> = self.inner.definitions.keys().collect();
        names.sort();
        f.debug_struct("Orchestrator")
            .field("definitions", &names)
            .field("lease", &self.inner.lease)
            .field("in_flight", &self.in_flight())
            .finish()
    }
}

/// Renews `held` every third of its ttl until that fails for good; returns
/// why. A renewal that fails transiently is tried again soon; once 90% of
/// the ttl has passed since the last successful renewal was sent, the lease
/// may lapse in the log at any moment, and this returns
/// [`LogError::LeaseLapsed`] so that the saga's task stops first.
async fn hold_lease(log: Arc<dyn SagaLog>, held: Held) -> Error {
    use tokio::time::{sleep_until, timeout_at, Instant};

    let Held { lease, ttl, sent } = held;
    let safe_for = ttl.mul_f64(0.9);
    let every = ttl / 3;
    let mut valid_until = sent + safe_for;
    let mut next = sent + every;
    loop {
        sleep_until(next.min(valid_until)).await;
        if Instant::now() >= valid_until {
            break;
        }
        let sent = Instant::now();
        match timeout_at(valid_until, log.renew_lease(&lease, ttl)).await {
            Ok(Ok(())) => {
                valid_until = sent + safe_for;
                next = sent + every;
            }
            Ok(Err(err)) if err.is_retryable() => {
                tracing::warn!(saga.id = %lease.saga_id, error = %err, "could not renew the saga's lease; retrying");
                next = Instant::now() + (every / 4).max(Duration::from_millis(10));
            }
            Ok(Err(err)) => return err.into(),
            Err(_) => break,
        }
    }
    Error::Log(LogError::LeaseLapsed {
        saga_id: lease.saga_id,
    })
}

/// Marks a saga as driven by this process while its task lives, even if the
/// task panics or is cancelled.
struct Running {
    inner: Arc<Inner>,
    saga_id: Arc<str>,
    definition: Arc<str>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.inner.running().remove(&self.saga_id);
        metrics::in_flight(&self.definition, -1.0);
    }
}

/// Builds an [`Orchestrator`].
pub struct OrchestratorBuilder {
    log: Arc<dyn SagaLog>,
    definitions: HashMap<String, Arc<dyn ErasedDefinition>>,
    duplicate: Option<String>,
    lease: Option<LeaseConfig>,
}

impl OrchestratorBuilder {
    /// Registers a definition, so that its sagas can be started and resumed.
    pub fn definition<C: SagaContext>(mut self, definition: &SagaDefinition<C>) -> Self {
        let name = definition.name().to_owned();
        if self
            .definitions
            .insert(name.clone(), Arc::new(definition.clone()))
            .is_some()
        {
            self.duplicate.get_or_insert(name);
        }
        self
    }

    /// Holds every saga under a lease in the log, as `owner` (unique among
    /// the orchestrators on the log; stable across restarts of one instance,
    /// such as its instance id), each lease lasting `ttl` from its last
    /// renewal. See [the orchestrator's docs](Orchestrator#leases-several-orchestrators-on-one-log).
    pub fn lease(mut self, owner: impl Into<String>, ttl: Duration) -> Self {
        self.lease = Some(LeaseConfig {
            owner: owner.into(),
            ttl,
        });
        self
    }

    /// Builds the orchestrator.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidDefinition`] when two definitions have the same name;
    /// [`Error::Config`] for a [`lease`](Self::lease) with an empty owner or
    /// a ttl under 100 ms; [`Error::Log`] with
    /// [`LogError::LeasesUnsupported`] for a lease on a log that holds none.
    pub fn build(self) -> Result<Orchestrator> {
        if let Some(name) = self.duplicate {
            return Err(Error::InvalidDefinition {
                reason: format!("two definitions are named `{name}`"),
            });
        }
        if let Some(lease) = &self.lease {
            if lease.owner.is_empty() {
                return Err(Error::Config {
                    reason: "`lease`: the owner id is empty".into(),
                });
            }
            if lease.ttl < Duration::from_millis(100) {
                return Err(Error::Config {
                    reason: format!("`lease`: a ttl of {:?} is under 100 ms", lease.ttl),
                });
            }
            if !self.log.supports_leases() {
                return Err(Error::Log(LogError::LeasesUnsupported));
            }
        }
        Ok(Orchestrator {
            inner: Arc::new(Inner {
                log: self.log,
                definitions: self.definitions,
                running: Mutex::new(HashSet::new()),
                lease: self.lease,
            }),
        })
    }
}

impl fmt::Debug for OrchestratorBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OrchestratorBuilder")
            .field("definitions", &self.definitions.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// A saga being driven by an [`Orchestrator`]. Dropping it does not stop the
/// saga.
#[derive(Debug)]
pub struct SagaHandle {
    saga_id: Arc<str>,
    join: JoinHandle<Result<SagaInstance>>,
}

impl SagaHandle {
    /// The saga's id.
    pub fn saga_id(&self) -> &str {
        &self.saga_id
    }

    /// Waits for the saga to finish and returns its final state: completed,
    /// compensated, or failed and needing attention.
    ///
    /// # Errors
    ///
    /// The error that stopped the orchestrator from driving the saga (the
    /// log failed, or another orchestrator took the saga over; the saga
    /// stays in the log for [`Orchestrator::recover`]), or
    /// [`Error::Interrupted`] when its task panicked or was cancelled.
    pub async fn finished(self) -> Result<SagaInstance> {
        match self.join.await {
            Ok(result) => result,
            Err(_) => Err(Error::Interrupted {
                saga_id: self.saga_id.to_string(),
            }),
        }
    }
}

/// The recovery loop of [`Orchestrator::keep_recovering`]; dropping it stops
/// the loop (not the sagas it resumed).
#[derive(Debug)]
pub struct RecoveryLoop {
    join: JoinHandle<()>,
    resumed: tokio::sync::mpsc::UnboundedReceiver<SagaHandle>,
}

impl RecoveryLoop {
    /// The next saga the loop resumed, to wait for its end; `None` once the
    /// loop has stopped.
    pub async fn resumed(&mut self) -> Option<SagaHandle> {
        self.resumed.recv().await
    }
}

impl Drop for RecoveryLoop {
    fn drop(&mut self) {
        self.join.abort();
    }
}

/// What [`Orchestrator::recover`] did.
#[derive(Debug)]
#[non_exhaustive]
pub struct Recovery {
    /// The sagas resumed, each running in its own task.
    pub resumed: Vec<SagaHandle>,
    /// The sagas that could not be resumed, and why.
    pub skipped: Vec<(String, Error)>,
}

impl Recovery {
    /// Waits for every resumed saga to finish; returns each one's result, in
    /// the order of [`resumed`](Self::resumed).
    pub async fn finished(self) -> Vec<Result<SagaInstance>> {
        let mut results = Vec::with_capacity(self.resumed.len());
        for handle in self.resumed {
            results.push(handle.finished().await);
        }
        results
    }
}
