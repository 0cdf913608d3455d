use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::sync::OnceCell;
use tokio_postgres::{Client, Statement};

use super::{validate_append, Append, Lease, LogError, NewSaga, SagaLog, SagaRecord, SagaSummary};
use crate::definition::BoxFuture;
use crate::state::SagaStatus;
use crate::transition::Transition;

/// A saga log in PostgreSQL, for sagas that must survive the process and be
/// resumable by any instance of a service.
///
/// Two tables in a schema of your choice (`micro_saga` by default), created
/// by [`install`](Self::install):
///
/// - `saga`: one row per saga with its definition, status, context (`jsonb`),
///   trace and version, and an insertion order for listings;
/// - `saga_transition`: the transitions, one `jsonb` row each, keyed by
///   saga id and sequence number.
///
/// Every write is a single SQL statement, so it is atomic without an explicit
/// transaction, and many sagas can share one [`Client`], whose requests are
/// pipelined. One connection commits one write after the other, though, each
/// waiting for its WAL flush; give the log more connections with
/// [`with_client`](Self::with_client) and it spreads the writes over them, so
/// that PostgreSQL flushes the commits of concurrent sagas together. An append updates the saga row only `WHERE version =` the
/// expected one: of two orchestrators racing to advance a saga, PostgreSQL
/// lets exactly one update match, and the other gets
/// [`LogError::Conflict`]. The primary key on `(saga_id, seq)` backs this up.
/// A load reads the saga row and its transitions in one statement, so from
/// one snapshot.
///
/// # Leases
///
/// The saga row also holds the saga's lease (see the
/// [log's module docs](super#leases)): `lease_owner`, `lease_expires` and
/// `lease_epoch`. Expiry is judged by PostgreSQL's clock (`now()`), the one
/// clock every orchestrator on the log shares, so their own clocks need not
/// agree. A claim ([`SagaLog::claim_due`]) is one `UPDATE` of the due rows,
/// locked `FOR UPDATE SKIP LOCKED` and checked again after the lock, so of two
/// orchestrators claiming at once each saga goes to one; it adds one to the
/// epoch. A fenced append updates the saga row only `WHERE lease_epoch =` and
/// `lease_owner =` the writer's, in the same statement as the version check,
/// so a stale owner's write cannot land between a claim and the new owner's
/// first write. Tables installed by earlier versions gain the three columns
/// at the next [`install`](PostgresSagaLog::install) (their sagas start
/// without a lease, so they are due for the first claim).
///
/// ```no_run
/// # async fn example() -> Result<(), Box<dyn std::error::Error>> {
/// use std::sync::Arc;
///
/// use micro_saga::log::PostgresSagaLog;
///
/// let (client, connection) =
///     tokio_postgres::connect("postgres://postgres@127.0.0.1/shop", tokio_postgres::NoTls)
///         .await?;
/// tokio::spawn(connection);
/// let log = PostgresSagaLog::new(Arc::new(client));
/// log.install().await?; // idempotent: run it at every start
/// # Ok(())
/// # }
/// ```
pub struct PostgresSagaLog {
    connections: Vec<Connection>,
    next: AtomicUsize,
    schema: String,
}

/// A client, and the log's statements prepared on its connection.
struct Connection {
    client: Arc<Client>,
    statements: OnceCell<Statements>,
}

impl Connection {
    fn new(client: Arc<Client>) -> Self {
        Connection {
            client,
            statements: OnceCell::new(),
        }
    }
}

struct Statements {
    create: Statement,
    append: Statement,
    version: Statement,
    claim: Statement,
    renew: Statement,
    release: Statement,
    load: Statement,
    by_status: Statement,
}

impl PostgresSagaLog {
    /// The default schema, `micro_saga`.
    pub const DEFAULT_SCHEMA: &'static str = "micro_saga";

    /// A log in the schema [`DEFAULT_SCHEMA`](Self::DEFAULT_SCHEMA), through
    /// `client`.
    pub fn new(client: Arc<Client>) -> Self {
        PostgresSagaLog {
            connections: vec![Connection::new(client)],
            next: AtomicUsize::new(0),
            schema: Self::DEFAULT_SCHEMA.to_owned(),
        }
    }

    /// A log in the schema `schema`: one service's sagas, or one test's.
    ///
    /// # Errors
    ///
    /// [`LogError::InvalidSchema`] unless the name is 1 to 63 ASCII letters,
    /// digits and underscores, not starting with a digit (it is written
    /// into SQL unquoted).
    pub fn with_schema(client: Arc<Client>, schema: impl Into<String>) -> Result<Self, LogError> {
        let schema = schema.into();
        let valid = (1..=63).contains(&schema.len())
            && !schema.starts_with(|c: char| c.is_ascii_digit())
            && schema
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            return Err(LogError::InvalidSchema { schema });
        }
        Ok(PostgresSagaLog {
            connections: vec![Connection::new(client)],
            next: AtomicUsize::new(0),
            schema,
        })
    }

    /// Adds a client (on its own connection) for the log to spread its
    /// reads and writes over.
    pub fn with_client(mut self, client: Arc<Client>) -> Self {
        self.connections.push(Connection::new(client));
        self
    }

    /// The schema the tables are in.
    pub fn schema(&self) -> &str {
        &self.schema
    }

    /// The first client, the one [`install`](Self::install) uses.
    pub fn client(&self) -> &Arc<Client> {
        &self.connections[0].client
    }

    /// Creates the schema and its tables and indexes if they do not exist.
    /// Idempotent, and safe to run from several processes at once: it holds
    /// a transaction-scoped advisory lock while it runs.
    ///
    /// # Errors
    ///
    /// [`LogError::Postgres`] when PostgreSQL refuses (no `CREATE`
    /// privilege, say).
    pub async fn install(&self) -> Result<(), LogError> {
        let s = &self.schema;
        // One simple-query message: no other request on the shared client can
        // come between BEGIN and COMMIT.
        let ddl = format!(
            "BEGIN;
             SELECT pg_advisory_xact_lock(hashtext('micro_saga.install.{s}'));
             CREATE SCHEMA IF NOT EXISTS {s};
             CREATE TABLE IF NOT EXISTS {s}.saga (
                 saga_id      text PRIMARY KEY,
                 definition   text NOT NULL,
                 status       text NOT NULL,
                 context      jsonb NOT NULL,
                 trace_parent text,
                 version      bigint NOT NULL CHECK (version >= 1),
                 created_seq  bigserial NOT NULL,
                 created_at   timestamptz NOT NULL DEFAULT now(),
                 updated_at   timestamptz NOT NULL DEFAULT now()
             );
             CREATE INDEX IF NOT EXISTS saga_status_idx ON {s}.saga (status, created_seq);
             ALTER TABLE {s}.saga ADD COLUMN IF NOT EXISTS lease_owner text;
             ALTER TABLE {s}.saga ADD COLUMN IF NOT EXISTS lease_expires timestamptz;
             ALTER TABLE {s}.saga ADD COLUMN IF NOT EXISTS lease_epoch bigint NOT NULL DEFAULT 0;
             CREATE TABLE IF NOT EXISTS {s}.saga_transition (
                 saga_id    text NOT NULL REFERENCES {s}.saga (saga_id) ON DELETE CASCADE,
                 seq        bigint NOT NULL CHECK (seq >= 1),
                 transition jsonb NOT NULL,
                 PRIMARY KEY (saga_id, seq)
             );
             COMMIT;"
        );
        let client = self.client();
        let result = client.batch_execute(&ddl).await;
        if result.is_err() {
            // The failed statement left the transaction aborted; end it so the
            // shared connection stays usable.
            let _ = client.batch_execute("ROLLBACK").await;
        }
        Ok(result?)
    }

    /// The next connection in turn, with its statements.
    async fn connection(&self) -> Result<(&Client, &Statements), LogError> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.connections.len();
        let conn = &self.connections[i];
        let statements = conn
            .statements
            .get_or_try_init(|| async {
                let s = &self.schema;
                let c = &conn.client;
                Ok::<_, LogError>(Statements {
                    create: c
                        .prepare(&format!(
                            "WITH s AS (
                                 INSERT INTO {s}.saga (saga_id, definition, status, context, trace_parent, version,
                                                       lease_owner, lease_expires, lease_epoch)
                                 VALUES ($1, $2, $3, $4, $5, 1, $7::text,
                                         CASE WHEN $7::text IS NULL THEN NULL
                                              ELSE now() + make_interval(secs => $8::float8) END,
                                         CASE WHEN $7::text IS NULL THEN 0 ELSE 1 END)
                                 ON CONFLICT (saga_id) DO NOTHING
                                 RETURNING saga_id
                             )
                             INSERT INTO {s}.saga_transition (saga_id, seq, transition)
                             SELECT saga_id, 1, $6 FROM s"
                        ))
                        .await?,
                    append: c
                        .prepare(&format!(
                            "WITH s AS (
                                 UPDATE {s}.saga
                                 SET version = $3, status = $4, context = $5, updated_at = now()
                                 WHERE saga_id = $1 AND version = $2
                                   AND ($7::bigint IS NULL OR (lease_epoch = $7 AND lease_owner = $8::text))
                                 RETURNING saga_id
                             )
                             INSERT INTO {s}.saga_transition (saga_id, seq, transition)
                             SELECT s.saga_id, $2 + t.ord, t.value
                             FROM s, jsonb_array_elements($6::jsonb) WITH ORDINALITY AS t(value, ord)"
                        ))
                        .await?,
                    version: c
                        .prepare(&format!(
                            "SELECT version, lease_epoch, lease_owner FROM {s}.saga WHERE saga_id = $1"
                        ))
                        .await?,
                    claim: c
                        .prepare(&format!(
                            "UPDATE {s}.saga
                             SET lease_owner = $1, lease_epoch = lease_epoch + 1,
                                 lease_expires = now() + make_interval(secs => $2::float8)
                             WHERE saga_id IN (
                                 SELECT saga_id FROM {s}.saga
                                 WHERE status = ANY($3) AND definition = ANY($4)
                                   AND NOT (saga_id = ANY($5))
                                   AND (lease_owner IS NULL OR lease_expires < now()
                                        OR ($6 AND lease_owner = $1))
                                 ORDER BY created_seq
                                 FOR UPDATE SKIP LOCKED
                             )
                             AND (lease_owner IS NULL OR lease_expires < now()
                                  OR ($6 AND lease_owner = $1))
                             RETURNING saga_id, lease_epoch, created_seq"
                        ))
                        .await?,
                    renew: c
                        .prepare(&format!(
                            "UPDATE {s}.saga
                             SET lease_expires = now() + make_interval(secs => $4::float8)
                             WHERE saga_id = $1 AND lease_epoch = $2 AND lease_owner = $3"
                        ))
                        .await?,
                    release: c
                        .prepare(&format!(
                            "UPDATE {s}.saga SET lease_owner = NULL, lease_expires = NULL
                             WHERE saga_id = $1 AND lease_epoch = $2 AND lease_owner = $3"
                        ))
                        .await?,
                    load: c
                        .prepare(&format!(
                            "SELECT definition, status, context, trace_parent,
                                    (SELECT jsonb_agg(t.transition ORDER BY t.seq)
                                     FROM {s}.saga_transition t WHERE t.saga_id = s.saga_id)
                             FROM {s}.saga s WHERE saga_id = $1"
                        ))
                        .await?,
                    by_status: c
                        .prepare(&format!(
                            "SELECT saga_id, definition, status, version FROM {s}.saga
                             WHERE status = ANY($1) ORDER BY created_seq"
                        ))
                        .await?,
                })
            })
            .await?;
        Ok((&conn.client, statements))
    }

    async fn list(&self, statuses: &[&str]) -> Result<Vec<SagaSummary>, LogError> {
        let (client, st) = self.connection().await?;
        let rows = client.query(&st.by_status, &[&statuses]).await?;
        rows.iter()
            .map(|row| {
                let saga_id: String = row.try_get(0)?;
                let status = parse_status(&saga_id, row.try_get(2)?)?;
                let version: i64 = row.try_get(3)?;
                Ok(SagaSummary::new(
                    saga_id,
                    row.try_get::<_, String>(1)?,
                    status,
                    version as u64,
                ))
            })
            .collect()
    }
}

fn parse_status(saga_id: &str, status: String) -> Result<SagaStatus, LogError> {
    serde_json::from_value(Value::String(status)).map_err(|source| LogError::Corrupt {
        saga_id: saga_id.to_owned(),
        source,
    })
}

fn to_json<T: serde::Serialize>(saga_id: &str, value: &T) -> Result<Value, LogError> {
    serde_json::to_value(value).map_err(|source| LogError::Corrupt {
        saga_id: saga_id.to_owned(),
        source,
    })
}

impl fmt::Debug for PostgresSagaLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresSagaLog")
            .field("schema", &self.schema)
            .field("connections", &self.connections.len())
            .finish_non_exhaustive()
    }
}

impl PostgresSagaLog {
    async fn insert(
        &self,
        saga: &NewSaga,
        lease: Option<(&str, Duration)>,
    ) -> Result<(), LogError> {
        let (client, st) = self.connection().await?;
        let started = to_json(&saga.saga_id, &saga.started)?;
        let owner = lease.map(|(owner, _)| owner);
        let ttl = lease.map_or(0.0, |(_, ttl)| ttl.as_secs_f64());
        let inserted = client
            .execute(
                &st.create,
                &[
                    &saga.saga_id,
                    &saga.definition,
                    &SagaStatus::Running.as_str(),
                    &saga.context,
                    &saga.trace_parent,
                    &started,
                    &owner,
                    &ttl,
                ],
            )
            .await?;
        if inserted == 0 {
            return Err(LogError::AlreadyExists {
                saga_id: saga.saga_id.clone(),
            });
        }
        Ok(())
    }

    async fn fenced(&self, lease: &Lease) -> Result<(), LogError> {
        let (client, st) = self.connection().await?;
        let row = client.query_opt(&st.version, &[&lease.saga_id]).await?;
        let held = match row {
            Some(row) => {
                let epoch: i64 = row.try_get(1)?;
                let owner: Option<String> = row.try_get(2)?;
                epoch as u64 == lease.epoch && owner.as_deref() == Some(lease.owner.as_str())
            }
            None => {
                return Err(LogError::NotFound {
                    saga_id: lease.saga_id.clone(),
                })
            }
        };
        if held {
            Ok(())
        } else {
            Err(LogError::Fenced {
                saga_id: lease.saga_id.clone(),
                owner: lease.owner.clone(),
                epoch: lease.epoch,
            })
        }
    }
}

impl SagaLog for PostgresSagaLog {
    fn create<'a>(&'a self, saga: &'a NewSaga) -> BoxFuture<'a, Result<(), LogError>> {
        Box::pin(self.insert(saga, None))
    }

    fn append<'a>(&'a self, append: &'a Append) -> BoxFuture<'a, Result<u64, LogError>> {
        Box::pin(async move {
            validate_append(append)?;
            let (client, st) = self.connection().await?;
            let transitions = to_json(&append.saga_id, &append.transitions)?;
            let expected = append.expected_version as i64;
            let new_version = append.new_version() as i64;
            let epoch = append.lease.as_ref().map(|l| l.epoch as i64);
            let owner = append.lease.as_ref().map(|l| l.owner.as_str());
            let inserted = client
                .execute(
                    &st.append,
                    &[
                        &append.saga_id,
                        &expected,
                        &new_version,
                        &append.status.as_str(),
                        &append.context,
                        &transitions,
                        &epoch,
                        &owner,
                    ],
                )
                .await?;
            if inserted == append.transitions.len() as u64 {
                return Ok(append.new_version());
            }
            if let Some(lease) = &append.lease {
                self.fenced(lease).await?;
            }
            let actual: Option<i64> = client
                .query_opt(&st.version, &[&append.saga_id])
                .await?
                .map(|row| row.try_get(0))
                .transpose()?;
            match actual {
                None => Err(LogError::NotFound {
                    saga_id: append.saga_id.clone(),
                }),
                Some(actual) => Err(LogError::Conflict {
                    saga_id: append.saga_id.clone(),
                    expected: append.expected_version,
                    actual: actual as u64,
                }),
            }
        })
    }

    fn load<'a>(&'a self, saga_id: &'a str) -> BoxFuture<'a, Result<Option<SagaRecord>, LogError>> {
        Box::pin(async move {
            let (client, st) = self.connection().await?;
            let Some(row) = client.query_opt(&st.load, &[&saga_id]).await? else {
                return Ok(None);
            };
            let corrupt = |source| LogError::Corrupt {
                saga_id: saga_id.to_owned(),
                source,
            };
            let status = parse_status(saga_id, row.try_get(1)?)?;
            let transitions: Option<Value> = row.try_get(4)?;
            let transitions: Vec<Transition> =
                serde_json::from_value(transitions.unwrap_or(Value::Array(Vec::new())))
                    .map_err(corrupt)?;
            Ok(Some(SagaRecord::new(
                saga_id,
                row.try_get::<_, String>(0)?,
                status,
                row.try_get(2)?,
                row.try_get(3)?,
                transitions,
            )))
        })
    }

    fn unfinished(&self) -> BoxFuture<'_, Result<Vec<SagaSummary>, LogError>> {
        Box::pin(async move {
            self.list(&[
                SagaStatus::Running.as_str(),
                SagaStatus::Compensating.as_str(),
            ])
            .await
        })
    }

    fn by_status(&self, status: SagaStatus) -> BoxFuture<'_, Result<Vec<SagaSummary>, LogError>> {
        Box::pin(async move { self.list(&[status.as_str()]).await })
    }

    fn supports_leases(&self) -> bool {
        true
    }

    fn create_leased<'a>(
        &'a self,
        saga: &'a NewSaga,
        owner: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Lease, LogError>> {
        Box::pin(async move {
            self.insert(saga, Some((owner, ttl))).await?;
            Ok(Lease::new(&saga.saga_id, owner, 1))
        })
    }

    fn claim_due<'a>(
        &'a self,
        owner: &'a str,
        ttl: Duration,
        definitions: &'a [String],
        skip: &'a [String],
        reclaim_own: bool,
    ) -> BoxFuture<'a, Result<Vec<Lease>, LogError>> {
        Box::pin(async move {
            let (client, st) = self.connection().await?;
            let statuses = [
                SagaStatus::Running.as_str(),
                SagaStatus::Compensating.as_str(),
            ];
            let rows = client
                .query(
                    &st.claim,
                    &[
                        &owner,
                        &ttl.as_secs_f64(),
                        &&statuses[..],
                        &definitions,
                        &skip,
                        &reclaim_own,
                    ],
                )
                .await?;
            let mut claimed = rows
                .iter()
                .map(|row| {
                    let saga_id: String = row.try_get(0)?;
                    let epoch: i64 = row.try_get(1)?;
                    let order: i64 = row.try_get(2)?;
                    Ok((order, Lease::new(saga_id, owner, epoch as u64)))
                })
                .collect::<Result<Vec<_>, LogError>>()?;
            claimed.sort_by_key(|(order, _)| *order);
            Ok(claimed.into_iter().map(|(_, lease)| lease).collect())
        })
    }

    fn renew_lease<'a>(
        &'a self,
        lease: &'a Lease,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<(), LogError>> {
        Box::pin(async move {
            let (client, st) = self.connection().await?;
            let renewed = client
                .execute(
                    &st.renew,
                    &[
                        &lease.saga_id,
                        &(lease.epoch as i64),
                        &lease.owner,
                        &ttl.as_secs_f64(),
                    ],
                )
                .await?;
            if renewed == 1 {
                Ok(())
            } else {
                Err(LogError::Fenced {
                    saga_id: lease.saga_id.clone(),
                    owner: lease.owner.clone(),
                    epoch: lease.epoch,
                })
            }
        })
    }

    fn release_lease<'a>(&'a self, lease: &'a Lease) -> BoxFuture<'a, Result<(), LogError>> {
        Box::pin(async move {
            let (client, st) = self.connection().await?;
            client
                .execute(
                    &st.release,
                    &[&lease.saga_id, &(lease.epoch as i64), &lease.owner],
                )
                .await?;
            Ok(())
        })
    }
}
