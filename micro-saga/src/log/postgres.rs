use std::fmt;
use std::time::Duration;

use deadpool_postgres::{Object, Pool};
use micro_core::health::HealthCheck;
use serde_json::Value;
use tokio_postgres::Statement;

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
/// transaction. An append updates the saga row only `WHERE version =` the
/// expected one: of two orchestrators racing to advance a saga, PostgreSQL
/// lets exactly one update match, and the other gets
/// [`LogError::Conflict`]. The primary key on `(saga_id, seq)` backs this up.
/// A load reads the saga row and its transitions in one statement, so from
/// one snapshot.
///
/// # Connections
///
/// The log takes a connection from its [`Pool`] (deadpool-postgres) for each
/// operation, so concurrent sagas write on several connections and
/// PostgreSQL flushes their commits together; the pool's `max_size` bounds
/// how many. Its statements are prepared through the pool's per-connection
/// statement cache: a new connection prepares them again at its first use.
/// A connection PostgreSQL closed (a restart, a failover,
/// `pg_terminate_backend`) is dropped by the pool and replaced at the next
/// operation. The operation that was on it fails with a retryable
/// [`LogError::Postgres`], and one that finds no connection within the
/// pool's timeouts with [`LogError::Unavailable`]; the orchestrator retries
/// both with backoff, and the saga stays leased to its owner while it does.
/// Give the pool `wait` and `create` timeouts, or an operation waits for as
/// long as the database is unreachable. [`health_check`](Self::health_check)
/// is a readiness check that fails meanwhile.
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
/// without a lease, so they are due for the first claim). A write whose
/// connection was lost may have committed or not; the orchestrator's retry
/// of it meets either its own write (a version conflict, resolved by
/// reloading) or none, and fencing holds either way.
///
/// ```no_run
/// # async fn example() -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
///
/// use micro_saga::log::deadpool_postgres::{Manager, Pool, Runtime};
/// use micro_saga::log::PostgresSagaLog;
///
/// let mut config: tokio_postgres::Config = "postgres://postgres@127.0.0.1/shop".parse()?;
/// config.application_name("order-service");
/// let pool = Pool::builder(Manager::new(config, tokio_postgres::NoTls))
///     .runtime(Runtime::Tokio1)
///     .wait_timeout(Some(Duration::from_secs(2)))
///     .create_timeout(Some(Duration::from_secs(2)))
///     .build()?;
/// let log = PostgresSagaLog::new(pool);
/// log.install().await?; // idempotent: run it at every start
/// # Ok(())
/// # }
/// ```
pub struct PostgresSagaLog {
    pool: Pool,
    schema: String,
    sql: Sql,
}

/// The log's statements, for the schema.
struct Sql {
    create: String,
    append: String,
    version: String,
    claim: String,
    renew: String,
    release: String,
    load: String,
    by_status: String,
}

impl Sql {
    fn new(s: &str) -> Self {
        Sql {
            create: format!(
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
            ),
            append: format!(
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
            ),
            version: format!(
                "SELECT version, lease_epoch, lease_owner FROM {s}.saga WHERE saga_id = $1"
            ),
            claim: format!(
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
            ),
            renew: format!(
                "UPDATE {s}.saga
                 SET lease_expires = now() + make_interval(secs => $4::float8)
                 WHERE saga_id = $1 AND lease_epoch = $2 AND lease_owner = $3"
            ),
            release: format!(
                "UPDATE {s}.saga SET lease_owner = NULL, lease_expires = NULL
                 WHERE saga_id = $1 AND lease_epoch = $2 AND lease_owner = $3"
            ),
            load: format!(
                "SELECT definition, status, context, trace_parent,
                        (SELECT jsonb_agg(t.transition ORDER BY t.seq)
                         FROM {s}.saga_transition t WHERE t.saga_id = s.saga_id)
                 FROM {s}.saga s WHERE saga_id = $1"
            ),
            by_status: format!(
                "SELECT saga_id, definition, status, version FROM {s}.saga
                 WHERE status = ANY($1) ORDER BY created_seq"
            ),
        }
    }
}

/// A connection of the pool, with the statements prepared on it as they are
/// needed.
struct Conn<'a> {
    client: Object,
    sql: &'a Sql,
}

impl Conn<'_> {
    async fn prepared(&self, sql: fn(&Sql) -> &String) -> Result<Statement, LogError> {
        Ok(self.client.prepare_cached(sql(self.sql)).await?)
    }
}

impl PostgresSagaLog {
    /// The default schema, `micro_saga`.
    pub const DEFAULT_SCHEMA: &'static str = "micro_saga";

    /// A log in the schema [`DEFAULT_SCHEMA`](Self::DEFAULT_SCHEMA), on
    /// connections from `pool`.
    pub fn new(pool: Pool) -> Self {
        PostgresSagaLog {
            pool,
            schema: Self::DEFAULT_SCHEMA.to_owned(),
            sql: Sql::new(Self::DEFAULT_SCHEMA),
        }
    }

    /// A log in the schema `schema`: one service's sagas, or one test's.
    ///
    /// # Errors
    ///
    /// [`LogError::InvalidSchema`] unless the name is 1 to 63 ASCII letters,
    /// digits and underscores, not starting with a digit (it is written
    /// into SQL unquoted).
    pub fn with_schema(pool: Pool, schema: impl Into<String>) -> Result<Self, LogError> {
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
            pool,
            sql: Sql::new(&schema),
            schema,
        })
    }

    /// The schema the tables are in.
    pub fn schema(&self) -> &str {
        &self.schema
    }

    /// The pool the log takes its connections from.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// A readiness check that passes while the log's pool can reach
    /// PostgreSQL: it takes a connection (a new one if the pooled ones were
    /// lost) and runs `SELECT 1`. Named `saga log`; critical. Return it from
    /// the service's
    /// [`health_checks`](micro_core::service::Service::health_checks), so
    /// that `/health/ready` answers `503` while the log is unreachable.
    pub fn health_check(&self) -> HealthCheck {
        let pool = self.pool.clone();
        HealthCheck::new("saga log", move || {
            let pool = pool.clone();
            async move {
                let client = pool.get().await?;
                client.simple_query("SELECT 1").await?;
                Ok(())
            }
        })
    }

    /// Creates the schema and its tables and indexes if they do not exist.
    /// Idempotent, and safe to run from several processes at once: it holds
    /// a transaction-scoped advisory lock while it runs.
    ///
    /// # Errors
    ///
    /// [`LogError::Postgres`] when PostgreSQL refuses (no `CREATE`
    /// privilege, say), [`LogError::Unavailable`] when no connection can be
    /// had.
    pub async fn install(&self) -> Result<(), LogError> {
        let s = &self.schema;
        let ddl = format!(
            "SELECT pg_advisory_xact_lock(hashtext('micro_saga.install.{s}'));
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
             );"
        );
        let mut conn = self.connection().await?;
        // A transaction dropped unfinished rolls back, so a failed install
        // leaves the pooled connection usable.
        let tx = conn.client.transaction().await?;
        tx.batch_execute(&ddl).await?;
        tx.commit().await?;
        Ok(())
    }

    /// A connection from the pool.
    async fn connection(&self) -> Result<Conn<'_>, LogError> {
        let client = self
            .pool
            .get()
            .await
            .map_err(|err| LogError::Unavailable(Box::new(err)))?;
        Ok(Conn {
            client,
            sql: &self.sql,
        })
    }

    async fn list(&self, statuses: &[&str]) -> Result<Vec<SagaSummary>, LogError> {
        let conn = self.connection().await?;
        let by_status = conn.prepared(|s| &s.by_status).await?;
        let rows = conn.client.query(&by_status, &[&statuses]).await?;
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
            .field("pool", &self.pool.status())
            .finish_non_exhaustive()
    }
}

impl PostgresSagaLog {
    async fn insert(
        &self,
        saga: &NewSaga,
        lease: Option<(&str, Duration)>,
    ) -> Result<(), LogError> {
        let conn = self.connection().await?;
        let create = conn.prepared(|s| &s.create).await?;
        let started = to_json(&saga.saga_id, &saga.started)?;
        let owner = lease.map(|(owner, _)| owner);
        let ttl = lease.map_or(0.0, |(_, ttl)| ttl.as_secs_f64());
        let inserted = conn
            .client
            .execute(
                &create,
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

    /// `Ok` if `lease` is the saga's current one, read on `conn`.
    async fn fenced(&self, conn: &Conn<'_>, lease: &Lease) -> Result<(), LogError> {
        let version = conn.prepared(|s| &s.version).await?;
        let row = conn.client.query_opt(&version, &[&lease.saga_id]).await?;
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
            let conn = self.connection().await?;
            let statement = conn.prepared(|s| &s.append).await?;
            let transitions = to_json(&append.saga_id, &append.transitions)?;
            let expected = append.expected_version as i64;
            let new_version = append.new_version() as i64;
            let epoch = append.lease.as_ref().map(|l| l.epoch as i64);
            let owner = append.lease.as_ref().map(|l| l.owner.as_str());
            let inserted = conn
                .client
                .execute(
                    &statement,
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
                self.fenced(&conn, lease).await?;
            }
            let version = conn.prepared(|s| &s.version).await?;
            let actual: Option<i64> = conn
                .client
                .query_opt(&version, &[&append.saga_id])
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
            let conn = self.connection().await?;
            let load = conn.prepared(|s| &s.load).await?;
            let Some(row) = conn.client.query_opt(&load, &[&saga_id]).await? else {
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
            let conn = self.connection().await?;
            let claim = conn.prepared(|s| &s.claim).await?;
            let statuses = [
                SagaStatus::Running.as_str(),
                SagaStatus::Compensating.as_str(),
            ];
            let rows = conn
                .client
                .query(
                    &claim,
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
            let conn = self.connection().await?;
            let renew = conn.prepared(|s| &s.renew).await?;
            let renewed = conn
                .client
                .execute(
                    &renew,
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
            let conn = self.connection().await?;
            let release = conn.prepared(|s| &s.release).await?;
            conn.client
                .execute(
                    &release,
                    &[&lease.saga_id, &(lease.epoch as i64), &lease.owner],
                )
                .await?;
            Ok(())
        })
    }
}
