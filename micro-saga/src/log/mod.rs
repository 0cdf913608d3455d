//! The durable saga log: where the orchestrator writes every transition
//! before acting on it.
//!
//! A [`SagaLog`] keeps, for each saga, its transitions in order (numbered from
//! 1: the saga's *version* is how many it has), the latest snapshot of its
//! context, its status, and the trace it runs in. Writes are optimistic: an
//! [`Append`] names the version it expects, and a log that has moved on
//! refuses it with [`LogError::Conflict`], so two orchestrators never both
//! advance one saga.
//!
//! | backend | feature | keeps the log |
//! |---|---|---|
//! | [`MemorySagaLog`] | | in memory, for tests and for sagas that may be lost with the process |
//! | `PostgresSagaLog` | `postgres` | in PostgreSQL tables, for services with several instances |
//! | `EmbeddedSagaLog` | `embedded` | in a redb file on local disk, for the one-process default |
//!
//! # Leases
//!
//! A log can also hold a *lease* per saga ([`SagaLog::supports_leases`]): who
//! drives it (an owner id), until when (an expiry by the log's clock), and a
//! *fencing epoch* that grows by one each time the saga changes hands. An
//! orchestrator built with [`OrchestratorBuilder::lease`](crate::OrchestratorBuilder::lease)
//! creates its sagas leased to itself, renews their leases while it drives
//! them, and carries its lease on every write ([`Append::fenced`]). A lease
//! that lapses is claimed by another orchestrator's recovery
//! ([`SagaLog::claim_due`]), which bumps the epoch; from then on a write of
//! the former owner is refused with [`LogError::Fenced`], and that owner stops
//! driving the saga. Only the PostgreSQL log holds leases: the memory and
//! embedded logs live in one process (the embedded log's file is locked by
//! the process that opened it), where the orchestrator's own bookkeeping
//! keeps one task per saga.
//!
//! Choosing: a service that runs as several processes, or that keeps its
//! business data in PostgreSQL, uses the PostgreSQL log (any instance can
//! resume a saga another one started). A single process that must not lose
//! its sagas on a crash, such as the shop's one-process mode, uses the
//! embedded log. Tests and throwaway work use memory.

#[cfg(feature = "embedded")]
mod embedded;
mod memory;
#[cfg(feature = "postgres")]
mod postgres;

#[cfg(feature = "embedded")]
pub use self::embedded::EmbeddedSagaLog;
pub use self::memory::MemorySagaLog;
#[cfg(feature = "postgres")]
pub use self::postgres::PostgresSagaLog;
/// The connection pool [`PostgresSagaLog`] takes, re-exported so that its
/// version matches.
#[cfg(feature = "postgres")]
pub use deadpool_postgres;

use std::time::Duration;

use serde_json::Value;

use crate::definition::BoxFuture;
use crate::error::Error;
use crate::state::{SagaInstance, SagaStatus};
use crate::transition::Transition;

/// Where sagas are recorded. Object safe: the orchestrator holds an
/// `Arc<dyn SagaLog>`.
///
/// Implementations keep every accepted transition, refuse a write whose
/// expected version is not the saga's current one, and make each
/// [`append`](Self::append) atomic: all of its transitions, the context and
/// the status are stored, or none. The conformance suite in this crate's
/// tests checks a backend against these rules.
pub trait SagaLog: Send + Sync + 'static {
    /// Records a new saga: its `started` transition (version 1), context and
    /// trace.
    ///
    /// # Errors
    ///
    /// [`LogError::AlreadyExists`] when a saga with this id is recorded, or a
    /// backend failure.
    fn create<'a>(&'a self, saga: &'a NewSaga) -> BoxFuture<'a, Result<(), LogError>>;

    /// Appends transitions to a saga whose version is
    /// [`expected_version`](Append::expected_version), replacing its context
    /// and status; returns the new version.
    ///
    /// # Errors
    ///
    /// [`LogError::NotFound`] for an unknown saga, [`LogError::Conflict`] when
    /// its version is another, or a backend failure.
    fn append<'a>(&'a self, append: &'a Append) -> BoxFuture<'a, Result<u64, LogError>>;

    /// Loads a saga, or `None` if there is none with this id.
    ///
    /// # Errors
    ///
    /// A backend failure, or [`LogError::Corrupt`] for a record that does not
    /// decode.
    fn load<'a>(&'a self, saga_id: &'a str) -> BoxFuture<'a, Result<Option<SagaRecord>, LogError>>;

    /// The sagas that have not finished (running or compensating), oldest
    /// first.
    ///
    /// # Errors
    ///
    /// A backend failure.
    fn unfinished(&self) -> BoxFuture<'_, Result<Vec<SagaSummary>, LogError>>;

    /// The sagas with this status, oldest first.
    ///
    /// # Errors
    ///
    /// A backend failure.
    fn by_status(&self, status: SagaStatus) -> BoxFuture<'_, Result<Vec<SagaSummary>, LogError>>;

    /// Whether this log holds leases (see the [module docs](self#leases)).
    /// `false` unless a backend overrides it, and then every lease method
    /// fails with [`LogError::LeasesUnsupported`].
    fn supports_leases(&self) -> bool {
        false
    }

    /// Records a new saga, as [`create`](Self::create), leased to `owner`
    /// for `ttl` at epoch 1.
    ///
    /// # Errors
    ///
    /// As [`create`](Self::create); [`LogError::LeasesUnsupported`].
    fn create_leased<'a>(
        &'a self,
        saga: &'a NewSaga,
        owner: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Lease, LogError>> {
        let _ = (saga, owner, ttl);
        Box::pin(std::future::ready(Err(LogError::LeasesUnsupported)))
    }

    /// Leases to `owner`, for `ttl`, every unfinished saga of one of
    /// `definitions` that is not in `skip` and whose lease has lapsed or
    /// was released (or that never had one); with `reclaim_own`, also the
    /// sagas `owner` holds. Each claimed lease has a new epoch, which fences
    /// off the former owner. Oldest sagas first.
    ///
    /// # Errors
    ///
    /// A backend failure; [`LogError::LeasesUnsupported`].
    fn claim_due<'a>(
        &'a self,
        owner: &'a str,
        ttl: Duration,
        definitions: &'a [String],
        skip: &'a [String],
        reclaim_own: bool,
    ) -> BoxFuture<'a, Result<Vec<Lease>, LogError>> {
        let _ = (owner, ttl, definitions, skip, reclaim_own);
        Box::pin(std::future::ready(Err(LogError::LeasesUnsupported)))
    }

    /// Extends `lease` to `ttl` from now. A lease that lapsed but was not
    /// claimed by anyone is extended too: its epoch is still the current one.
    ///
    /// # Errors
    ///
    /// [`LogError::Fenced`] when the saga has changed hands (or the lease
    /// was released), a backend failure; [`LogError::LeasesUnsupported`].
    fn renew_lease<'a>(
        &'a self,
        lease: &'a Lease,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<(), LogError>> {
        let _ = (lease, ttl);
        Box::pin(std::future::ready(Err(LogError::LeasesUnsupported)))
    }

    /// Gives `lease` up: the saga is due for [`claim_due`](Self::claim_due)
    /// at once, and writes under this lease are refused. Giving up a lease
    /// that is no longer held does nothing.
    ///
    /// # Errors
    ///
    /// A backend failure; [`LogError::LeasesUnsupported`].
    fn release_lease<'a>(&'a self, lease: &'a Lease) -> BoxFuture<'a, Result<(), LogError>> {
        let _ = lease;
        Box::pin(std::future::ready(Err(LogError::LeasesUnsupported)))
    }
}

/// A saga's lease: the owner that may drive it, and the fencing epoch of
/// this grant (see the [module docs](self#leases)).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Lease {
    /// The saga's id.
    pub saga_id: String,
    /// Who holds it: an orchestrator's owner id.
    pub owner: String,
    /// The grant's epoch, from 1; each change of hands adds one.
    pub epoch: u64,
}

impl Lease {
    /// Assembles a lease, as a backend does when it grants one.
    pub fn new(saga_id: impl Into<String>, owner: impl Into<String>, epoch: u64) -> Self {
        Lease {
            saga_id: saga_id.into(),
            owner: owner.into(),
            epoch,
        }
    }
}

/// A saga to record with [`SagaLog::create`].
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct NewSaga {
    /// The saga's id.
    pub saga_id: String,
    /// The name of its definition.
    pub definition: String,
    /// Its first transition, [`Transition::Started`].
    pub started: Transition,
    /// Its context, as JSON.
    pub context: Value,
    /// The W3C `traceparent` of the trace the saga runs in.
    pub trace_parent: Option<String>,
}

impl NewSaga {
    /// Describes a new saga.
    ///
    /// # Errors
    ///
    /// [`Error::MissingStart`] when `started` is not a
    /// [`Transition::Started`], or [`Error::InvalidDefinition`] when it
    /// starts an invalid saga.
    pub fn new(
        started: Transition,
        context: Value,
        trace_parent: Option<String>,
    ) -> Result<Self, Error> {
        let saga = SagaInstance::replay([started.clone()])?;
        Ok(NewSaga {
            saga_id: saga.id().to_owned(),
            definition: saga.definition().to_owned(),
            started,
            context,
            trace_parent,
        })
    }
}

/// Transitions to add to a saga with [`SagaLog::append`].
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Append {
    /// The saga's id.
    pub saga_id: String,
    /// The version the saga must have for the write to be accepted.
    pub expected_version: u64,
    /// The transitions, in order; at least one.
    pub transitions: Vec<Transition>,
    /// The saga's status after them.
    pub status: SagaStatus,
    /// The saga's context after them, as JSON.
    pub context: Value,
    /// The lease the writer holds, if it drives the saga under one: the
    /// write is refused with [`LogError::Fenced`] unless it is still the
    /// saga's current lease. A write without a lease is not fenced.
    pub lease: Option<Lease>,
}

impl Append {
    /// Describes a write.
    pub fn new(
        saga_id: impl Into<String>,
        expected_version: u64,
        transitions: Vec<Transition>,
        status: SagaStatus,
        context: Value,
    ) -> Self {
        Append {
            saga_id: saga_id.into(),
            expected_version,
            transitions,
            status,
            context,
            lease: None,
        }
    }

    /// Makes the write conditional on `lease` being the saga's current one.
    pub fn fenced(mut self, lease: Lease) -> Self {
        self.lease = Some(lease);
        self
    }

    /// The version after the write.
    pub fn new_version(&self) -> u64 {
        self.expected_version + self.transitions.len() as u64
    }
}

/// A saga as the log holds it: its transitions, latest context, status and
/// trace.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct SagaRecord {
    /// The saga's id.
    pub saga_id: String,
    /// The name of its definition.
    pub definition: String,
    /// Its status after the last transition.
    pub status: SagaStatus,
    /// Its latest context, as JSON.
    pub context: Value,
    /// The W3C `traceparent` of the trace it runs in.
    pub trace_parent: Option<String>,
    /// Its transitions, oldest first; the first is `started`.
    pub transitions: Vec<Transition>,
}

impl SagaRecord {
    /// Assembles a record, as a backend does when it loads one.
    pub fn new(
        saga_id: impl Into<String>,
        definition: impl Into<String>,
        status: SagaStatus,
        context: Value,
        trace_parent: Option<String>,
        transitions: Vec<Transition>,
    ) -> Self {
        SagaRecord {
            saga_id: saga_id.into(),
            definition: definition.into(),
            status,
            context,
            trace_parent,
            transitions,
        }
    }

    /// How many transitions the saga has.
    pub fn version(&self) -> u64 {
        self.transitions.len() as u64
    }

    /// Rebuilds the saga's state from its transitions.
    ///
    /// # Errors
    ///
    /// As [`SagaInstance::replay`].
    pub fn instance(&self) -> Result<SagaInstance, Error> {
        SagaInstance::replay(self.transitions.iter().cloned())
    }

    /// Decodes the context as `C`.
    ///
    /// # Errors
    ///
    /// [`Error::Context`] when it does not decode.
    pub fn context_as<C: serde::de::DeserializeOwned>(&self) -> Result<C, Error> {
        serde_json::from_value(self.context.clone()).map_err(Error::Context)
    }

    /// The record's summary.
    pub fn summary(&self) -> SagaSummary {
        SagaSummary {
            saga_id: self.saga_id.clone(),
            definition: self.definition.clone(),
            status: self.status,
            version: self.version(),
        }
    }
}

/// One line of a saga listing.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct SagaSummary {
    /// The saga's id.
    pub saga_id: String,
    /// The name of its definition.
    pub definition: String,
    /// Its status.
    pub status: SagaStatus,
    /// How many transitions it has.
    pub version: u64,
}

impl SagaSummary {
    /// Assembles a summary, as a backend does when it lists sagas.
    pub fn new(
        saga_id: impl Into<String>,
        definition: impl Into<String>,
        status: SagaStatus,
        version: u64,
    ) -> Self {
        SagaSummary {
            saga_id: saga_id.into(),
            definition: definition.into(),
            status,
            version,
        }
    }
}

/// Why the saga log refused or failed a read or a write.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LogError {
    /// A saga with this id is already recorded.
    #[error("saga `{saga_id}` already exists")]
    #[non_exhaustive]
    AlreadyExists {
        /// The saga's id.
        saga_id: String,
    },

    /// No saga with this id is recorded.
    #[error("saga `{saga_id}` not found")]
    #[non_exhaustive]
    NotFound {
        /// The saga's id.
        saga_id: String,
    },

    /// The saga's version is not the one the write expected: someone else
    /// advanced it.
    #[error("saga `{saga_id}` is at version {actual}, not the expected {expected}")]
    #[non_exhaustive]
    Conflict {
        /// The saga's id.
        saga_id: String,
        /// The version the write expected.
        expected: u64,
        /// The saga's version.
        actual: u64,
    },

    /// The writer's lease is not the saga's current one: the saga was
    /// claimed by another owner after this lease lapsed, or the lease was
    /// released. The writer must stop driving the saga.
    #[error("saga `{saga_id}`: the lease of `{owner}` at epoch {epoch} is no longer held")]
    #[non_exhaustive]
    Fenced {
        /// The saga's id.
        saga_id: String,
        /// The stale lease's owner.
        owner: String,
        /// The stale lease's epoch.
        epoch: u64,
    },

    /// A lease could not be renewed before it lapsed (the log was
    /// unreachable): its owner stopped driving the saga, which another
    /// orchestrator (or this one) claims once the lease has lapsed in the log.
    #[error("saga `{saga_id}`: the lease could not be renewed in time and has lapsed")]
    #[non_exhaustive]
    LeaseLapsed {
        /// The saga's id.
        saga_id: String,
    },

    /// A lease was asked of a log that holds none (only the PostgreSQL log
    /// does).
    #[error("this saga log does not hold leases")]
    LeasesUnsupported,

    /// A write was malformed: no transitions, say.
    #[error("invalid write to saga `{saga_id}`: {reason}")]
    #[non_exhaustive]
    InvalidWrite {
        /// The saga's id.
        saga_id: String,
        /// What is wrong.
        reason: String,
    },

    /// A stored record does not decode.
    #[error("saga `{saga_id}` has a corrupt record")]
    #[non_exhaustive]
    Corrupt {
        /// The saga's id.
        saga_id: String,
        /// Why it does not decode.
        #[source]
        source: serde_json::Error,
    },

    /// The log's store is unreachable for now: the PostgreSQL log's pool
    /// had no connection to give within its timeouts, or a backend outside
    /// this crate reports a transient failure so; worth a retry.
    #[error("saga log unavailable")]
    Unavailable(#[source] micro_core::error::BoxError),

    /// A PostgreSQL schema name that cannot be used.
    #[cfg(feature = "postgres")]
    #[error("invalid schema name `{schema}`: use 1 to 63 ASCII letters, digits and underscores, not starting with a digit")]
    #[non_exhaustive]
    InvalidSchema {
        /// The name given.
        schema: String,
    },

    /// PostgreSQL failed.
    #[cfg(feature = "postgres")]
    #[error("postgres saga log failed")]
    Postgres(#[from] tokio_postgres::Error),

    /// The embedded database failed.
    #[cfg(feature = "embedded")]
    #[error("embedded saga log failed")]
    Embedded(#[source] Box<redb::Error>),
}

#[cfg(feature = "embedded")]
macro_rules! from_redb {
    ($($error:ty),*) => {
        $(
            impl From<$error> for LogError {
                fn from(err: $error) -> Self {
                    LogError::Embedded(Box::new(err.into()))
                }
            }
        )*
    };
}

#[cfg(feature = "embedded")]
from_redb!(
    redb::Error,
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

impl LogError {
    /// Whether the same operation may succeed if tried again: for a lost
    /// database connection, yes (also when the server said so as it closed
    /// it: SQLSTATE class `08`, `57P01` to `57P03`), and for a serialization
    /// failure or a deadlock (`40001`, `40P01`); for a conflict, a fence or a
    /// missing saga, no (reload the saga first).
    pub fn is_retryable(&self) -> bool {
        match self {
            #[cfg(feature = "postgres")]
            LogError::Postgres(err) => {
                err.is_closed()
                    || err.code().is_none_or(|code| {
                        let code = code.code();
                        code.starts_with("08")
                            || matches!(code, "57P01" | "57P02" | "57P03" | "40001" | "40P01")
                    })
            }
            LogError::Unavailable(_) => true,
            _ => false,
        }
    }

    /// Whether this is a [`LogError::Conflict`].
    pub fn is_conflict(&self) -> bool {
        matches!(self, LogError::Conflict { .. })
    }

    /// Whether this is a [`LogError::Fenced`].
    pub fn is_fenced(&self) -> bool {
        matches!(self, LogError::Fenced { .. })
    }
}

impl micro_core::error::Retryable for LogError {
    fn is_retryable(&self) -> bool {
        LogError::is_retryable(self)
    }
}

/// Refuses a fenced write, for the logs that hold no leases.
pub(crate) fn refuse_lease(append: &Append) -> Result<(), LogError> {
    match append.lease {
        Some(_) => Err(LogError::LeasesUnsupported),
        None => Ok(()),
    }
}

/// Checks the shape of a write every backend refuses.
pub(crate) fn validate_append(append: &Append) -> Result<(), LogError> {
    let invalid = |reason: &str| {
        Err(LogError::InvalidWrite {
            saga_id: append.saga_id.clone(),
            reason: reason.to_owned(),
        })
    };
    if append.transitions.is_empty() {
        return invalid("no transitions");
    }
    if append
        .transitions
        .iter()
        .any(|t| matches!(t, Transition::Started { .. }))
    {
        return invalid("`started` can only be the first transition");
    }
    Ok(())
}
