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
        }
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

    /// The log's store is unreachable for now (a backend outside this crate
    /// reports its transient failures so); worth a retry.
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
    /// database connection, yes; for a conflict or a missing saga, no (reload
    /// the saga first).
    pub fn is_retryable(&self) -> bool {
        match self {
            #[cfg(feature = "postgres")]
            LogError::Postgres(err) => err.is_closed() || err.code().is_none(),
            LogError::Unavailable(_) => true,
            _ => false,
        }
    }

    /// Whether this is a [`LogError::Conflict`].
    pub fn is_conflict(&self) -> bool {
        matches!(self, LogError::Conflict { .. })
    }
}

impl micro_core::error::Retryable for LogError {
    fn is_retryable(&self) -> bool {
        LogError::is_retryable(self)
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
