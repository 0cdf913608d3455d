//! The error type of this crate.

/// A `Result` whose error defaults to [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why an event could not be built, encoded, decoded, published or consumed.
///
/// The variants about a malformed event or payload are not cured by retrying:
/// a consumer sends such a message to its dead-letter topic instead. Backend
/// failures (the broker, the database) may be; see [`Error::is_retryable`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A required attribute (`id`, `source`, `specversion` or `type`) is absent.
    #[error("missing required attribute `{attribute}`")]
    #[non_exhaustive]
    MissingAttribute {
        /// The CloudEvents name of the attribute.
        attribute: &'static str,
    },

    /// An attribute is present but empty; CloudEvents requires every present
    /// string attribute to be non-empty.
    #[error("attribute `{attribute}` is empty")]
    #[non_exhaustive]
    EmptyAttribute {
        /// The CloudEvents name of the attribute.
        attribute: &'static str,
    },

    /// An attribute is present but its value is not valid for it.
    #[error("attribute `{attribute}` is invalid: {reason}")]
    #[non_exhaustive]
    InvalidAttribute {
        /// The CloudEvents name of the attribute.
        attribute: &'static str,
        /// What is wrong with the value.
        reason: String,
    },

    /// A binary-mode message carries the same attribute twice.
    #[error("attribute `{attribute}` appears more than once")]
    #[non_exhaustive]
    DuplicateAttribute {
        /// The CloudEvents name of the attribute.
        attribute: &'static str,
    },

    /// The `specversion` attribute names a version other than `1.0`.
    #[error("unsupported specversion `{found}`, expected `1.0`")]
    #[non_exhaustive]
    UnsupportedSpecVersion {
        /// The specversion that was found.
        found: String,
    },

    /// The data content type is not JSON.
    #[error("unsupported data content type `{found}`, expected json")]
    #[non_exhaustive]
    UnsupportedContentType {
        /// The content type that was found.
        found: String,
    },

    /// A structured-mode document carries `data_base64`; only JSON data is
    /// supported.
    #[error("event carries `data_base64`, only json data is supported")]
    Base64Data,

    /// The event has no data, and the payload type cannot be made from nothing.
    #[error("event has no data")]
    MissingData,

    /// The document or the data could not be decoded as JSON into the payload
    /// type.
    #[error("failed to decode event json")]
    Decode(#[source] serde_json::Error),

    /// The payload could not be encoded as JSON.
    #[error("failed to encode event data as json")]
    Encode(#[source] serde_json::Error),

    /// The bus, the subscription or the relay was shut down.
    #[error("closed")]
    Closed,

    /// The topic does not exist on the bus.
    #[error("topic `{topic}` does not exist")]
    #[non_exhaustive]
    UnknownTopic {
        /// The topic.
        topic: String,
    },

    /// A topic name or a partition count was rejected.
    #[error("invalid topic `{topic}`: {reason}")]
    #[non_exhaustive]
    InvalidTopic {
        /// The topic.
        topic: String,
        /// What is wrong with it.
        reason: &'static str,
    },

    /// A table name for the inbox or the outbox is not one or two lowercase
    /// SQL identifiers (`outbox`, `orders.outbox`).
    #[error("invalid table name `{table}`: use lowercase letters, digits and `_`, optionally `schema.table`")]
    #[non_exhaustive]
    InvalidTableName {
        /// The name given.
        table: String,
    },

    /// A consumer's task ended abnormally (it panicked or was aborted).
    #[error("consumer task failed")]
    Task(#[source] tokio::task::JoinError),

    /// An outbox row could not be turned back into a record.
    #[error("outbox row {id} is invalid: {reason}")]
    #[non_exhaustive]
    InvalidOutboxRow {
        /// The row's id.
        id: i64,
        /// What is wrong with it.
        reason: String,
    },

    /// A [`SignedPublisher`](crate::identity::SignedPublisher) could not sign a record.
    #[error("signing the publisher's identity failed")]
    Identity(#[source] micro_core::identity::Error),

    /// The Kafka client failed.
    #[cfg(feature = "kafka")]
    #[error("kafka failed")]
    Kafka(#[source] rdkafka::error::KafkaError),

    /// PostgreSQL failed. A lost connection is retryable, and the pool
    /// replaces it at the next operation.
    #[cfg(feature = "postgres")]
    #[error("postgresql failed")]
    Postgres(#[source] tokio_postgres::Error),

    /// The pool had no PostgreSQL connection to give within its timeouts
    /// (the database is unreachable, refuses connections, or every
    /// connection is busy); retryable.
    #[cfg(feature = "postgres")]
    #[error("no postgresql connection available")]
    PostgresPool(#[source] deadpool_postgres::PoolError),
}

impl Error {
    /// The CloudEvents name of the attribute this error is about, if any.
    pub fn attribute(&self) -> Option<&'static str> {
        match self {
            Error::MissingAttribute { attribute }
            | Error::EmptyAttribute { attribute }
            | Error::InvalidAttribute { attribute, .. }
            | Error::DuplicateAttribute { attribute } => Some(attribute),
            Error::UnsupportedSpecVersion { .. } => Some(crate::attr::SPECVERSION),
            Error::UnsupportedContentType { .. } => Some(crate::attr::DATACONTENTTYPE),
            _ => None,
        }
    }

    /// Whether trying the same operation again could succeed.
    ///
    /// Errors about the event itself (its attributes, its data) are not: the
    /// event does not change between attempts. Broker and database failures
    /// are, as is a failed consumer task.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Task(_) => true,
            #[cfg(feature = "kafka")]
            Error::Kafka(_) => true,
            #[cfg(feature = "postgres")]
            Error::PostgresPool(_) => true,
            #[cfg(feature = "postgres")]
            Error::Postgres(e) => e.code().is_none_or(|code| {
                use tokio_postgres::error::SqlState;
                [
                    SqlState::T_R_SERIALIZATION_FAILURE,
                    SqlState::T_R_DEADLOCK_DETECTED,
                    SqlState::ADMIN_SHUTDOWN,
                    SqlState::CANNOT_CONNECT_NOW,
                ]
                .contains(code)
            }),
            _ => false,
        }
    }

    pub(crate) fn invalid(attribute: &'static str, reason: impl Into<String>) -> Self {
        Error::InvalidAttribute {
            attribute,
            reason: reason.into(),
        }
    }
}

impl micro_core::error::Retryable for Error {
    fn is_retryable(&self) -> bool {
        Error::is_retryable(self)
    }
}

#[cfg(feature = "kafka")]
impl From<rdkafka::error::KafkaError> for Error {
    fn from(e: rdkafka::error::KafkaError) -> Self {
        Error::Kafka(e)
    }
}

#[cfg(feature = "postgres")]
impl From<deadpool_postgres::PoolError> for Error {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        Error::PostgresPool(e)
    }
}

#[cfg(feature = "postgres")]
impl From<tokio_postgres::Error> for Error {
    fn from(e: tokio_postgres::Error) -> Self {
        Error::Postgres(e)
    }
}
