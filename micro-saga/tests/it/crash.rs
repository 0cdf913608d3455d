//! A real worker process running order sagas against PostgreSQL, killed with
//! SIGKILL at each step boundary and restarted: every saga finishes, and the
//! money and the stock add up. The saga log is in PostgreSQL, or in a redb
//! file with the `embedded` feature; the steps' effects are always in
//! PostgreSQL.

use std::os::unix::process::ExitStatusExt;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use micro_saga::log::PostgresSagaLog;
use micro_saga::{SagaLog, SagaStatus};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio_postgres::Client;

use crate::support::pg;

const WORKER: &str = env!("CARGO_BIN_EXE_saga_crash_worker");
const BALANCE: i64 = 10_000;
const STOCK: &[(&str, i32)] = &[("book", 10), ("pen", 3)];
/// The worker's orders and how each must end.
const OUTCOMES: &[(&str, SagaStatus)] = &[
    ("o-1", SagaStatus::Completed),
    ("o-2", SagaStatus::Compensated), // out of stock: refunded
    ("o-3", SagaStatus::Completed),
    ("o-4", SagaStatus::Compensated), // cancelled: released and refunded
    ("o-5", SagaStatus::Compensated), // declined
];
/// Boundaries in a run without a crash: o-1 and o-3 pass 8 each, o-2 5,
/// o-4 9, o-5 1.
const BOUNDARIES: u64 = 31;

async fn setup(client: &Client, s: &str) {
    client
        .batch_execute(&format!(
            "CREATE SCHEMA {s};
             CREATE TABLE {s}.account (id text PRIMARY KEY, balance bigint NOT NULL CHECK (balance >= 0));
             INSERT INTO {s}.account VALUES ('customer', {BALANCE});
             CREATE TABLE {s}.payment (key text PRIMARY KEY, order_id text NOT NULL,
                                        amount bigint NOT NULL, refunded_by text);
             CREATE TABLE {s}.stock (sku text PRIMARY KEY, available int NOT NULL CHECK (available >= 0));
             INSERT INTO {s}.stock VALUES ('{}', {}), ('{}', {});
             CREATE TABLE {s}.reservation (key text PRIMARY KEY, order_id text NOT NULL, sku text NOT NULL,
                                            quantity int NOT NULL, released_by text);
             CREATE TABLE {s}.orders (id text PRIMARY KEY, status text NOT NULL, confirmed_by text);
             INSERT INTO {s}.orders VALUES ('o-1', 'pending'), ('o-2', 'pending'), ('o-3', 'pending'),
                                           ('o-4', 'cancelled'), ('o-5', 'pending');
             CREATE TABLE {s}.notification (key text PRIMARY KEY, order_id text NOT NULL);",
            STOCK[0].0, STOCK[0].1, STOCK[1].0, STOCK[1].1,
        ))
        .await
        .unwrap();
}

#[derive(Debug, Clone, Copy)]
enum Mode {
    /// The sagas one after the other: each boundary number is one point.
    Sequential,
    /// The sagas all at once: the others are anywhere when one halts.
    Concurrent,
    /// One after the other, with the saga log in a redb file.
    #[cfg(feature = "embedded")]
    EmbeddedLog,
}

/// Where one scenario keeps its data.
struct Target {
    mode: Mode,
    schema: String,
    /// The embedded log's file, for [`Mode::EmbeddedLog`].
    log_file: Option<std::path::PathBuf>,
    _dir: tempfile::TempDir,
}

impl Target {
    fn new(mode: Mode) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let log_file = match mode {
            #[cfg(feature = "embedded")]
            Mode::EmbeddedLog => Some(dir.path().join("sagas.redb")),
            _ => None,
        };
        Target {
            mode,
            schema: pg::fresh_schema("saga_crash"),
            log_file,
            _dir: dir,
        }
    }

    fn log(&self) -> Arc<dyn SagaLog> {
        match &self.log_file {
            #[cfg(feature = "embedded")]
            Some(path) => Arc::new(micro_saga::log::EmbeddedSagaLog::open(path).unwrap()),
            _ => Arc::new(PostgresSagaLog::with_schema(pg::pool(), &self.schema).unwrap()),
        }
    }
}

fn worker(target: &Target, halt_at: Option<u64>) -> Command {
    let concurrent = matches!(target.mode, Mode::Concurrent);
    let mut cmd = Command::new(WORKER);
    cmd.env("MICRO_SAGA_CRASH_PG_URL", pg::url())
        .env("MICRO_SAGA_CRASH_SCHEMA", &target.schema)
        .env(
            "MICRO_SAGA_CRASH_CONCURRENT",
            if concurrent { "1" } else { "0" },
        )
        .env_remove("MICRO_SAGA_CRASH_HALT_AT")
        .env_remove("MICRO_SAGA_CRASH_EMBEDDED_LOG")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    if let Some(n) = halt_at {
        cmd.env("MICRO_SAGA_CRASH_HALT_AT", n.to_string());
    }
    if let Some(path) = &target.log_file {
        cmd.env("MICRO_SAGA_CRASH_EMBEDDED_LOG", path);
    }
    cmd
}

/// Runs the worker to the end; returns how many boundaries it passed.
async fn run_to_the_end(target: &Target) -> u64 {
    let out = worker(target, None).output().await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the worker failed: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let done = stdout
        .lines()
        .find_map(|l| l.strip_prefix("done boundaries="))
        .unwrap_or_else(|| panic!("the worker did not finish:\n{stdout}"));
    done.parse().unwrap()
}

/// Runs the worker until it halts at boundary `n`, and kills it there.
async fn kill_at(target: &Target, n: u64) -> String {
    let mut child = worker(target, Some(n))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let halted = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.starts_with("halt ") {
                return line;
            }
        }
        panic!("the worker ended before boundary {n}");
    })
    .await
    .unwrap_or_else(|_| panic!("the worker did not reach boundary {n} within a minute"));
    child.start_kill().unwrap();
    let status = child.wait().await.unwrap();
    assert_eq!(status.signal(), Some(9), "killed with SIGKILL: {status}");
    halted
}

async fn scalar_i64(client: &Client, sql: &str) -> i64 {
    client.query_one(sql, &[]).await.unwrap().get(0)
}

async fn ids(client: &Client, sql: &str) -> Vec<String> {
    client
        .query(sql, &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Every saga finished as it must, and the money and the stock add up.
async fn check_invariants(client: &Arc<Client>, log: &dyn SagaLog, s: &str, context: &str) {
    assert!(log.unfinished().await.unwrap().is_empty(), "{context}");
    for (id, status) in OUTCOMES {
        let record = log.load(id).await.unwrap().unwrap_or_else(|| {
            panic!("{context}: saga {id} was never started");
        });
        assert_eq!(record.status, *status, "{context}: saga {id}");
    }

    let confirmed = ids(
        client,
        &format!("SELECT id FROM {s}.orders WHERE status = 'confirmed' ORDER BY id"),
    )
    .await;
    assert_eq!(confirmed, ["o-1", "o-3"], "{context}");

    // Money: nothing charged without a confirmed order or a refund, at most
    // one payment per order, and every cent accounted for.
    let charged_unconfirmed = ids(
        client,
        &format!(
            "SELECT p.order_id FROM {s}.payment p JOIN {s}.orders o ON o.id = p.order_id
             WHERE p.refunded_by IS NULL AND o.status <> 'confirmed'"
        ),
    )
    .await;
    assert!(
        charged_unconfirmed.is_empty(),
        "{context}: charged without a confirmed order: {charged_unconfirmed:?}"
    );
    let paid = ids(
        client,
        &format!("SELECT order_id FROM {s}.payment WHERE refunded_by IS NULL ORDER BY order_id"),
    )
    .await;
    assert_eq!(
        paid, confirmed,
        "{context}: one payment per confirmed order"
    );
    let twice = ids(
        client,
        &format!("SELECT order_id FROM {s}.payment GROUP BY order_id HAVING count(*) > 1"),
    )
    .await;
    assert!(twice.is_empty(), "{context}: charged twice: {twice:?}");
    let balance = scalar_i64(client, &format!("SELECT balance FROM {s}.account")).await;
    let held = scalar_i64(
        client,
        &format!(
            "SELECT coalesce(sum(amount), 0)::bigint FROM {s}.payment WHERE refunded_by IS NULL"
        ),
    )
    .await;
    assert_eq!(balance + held, BALANCE, "{context}: money");
    assert_eq!(held, 4_500, "{context}: o-1 and o-3 paid");

    // Stock: what is available plus what is reserved is what there was, and
    // only confirmed orders hold reservations.
    for (sku, initial) in STOCK {
        let total = scalar_i64(
            client,
            &format!(
                "SELECT (SELECT available FROM {s}.stock WHERE sku = '{sku}')::bigint
                      + (SELECT coalesce(sum(quantity), 0) FROM {s}.reservation
                         WHERE sku = '{sku}' AND released_by IS NULL)::bigint"
            ),
        )
        .await;
        assert_eq!(total, i64::from(*initial), "{context}: stock of {sku}");
    }
    let reserved = ids(
        client,
        &format!(
            "SELECT order_id FROM {s}.reservation WHERE released_by IS NULL ORDER BY order_id"
        ),
    )
    .await;
    assert_eq!(
        reserved, confirmed,
        "{context}: one reservation per confirmed order"
    );
    let books = scalar_i64(
        client,
        &format!("SELECT available::bigint FROM {s}.stock WHERE sku = 'book'"),
    )
    .await;
    assert_eq!(books, 7, "{context}: books left");

    let notified = ids(
        client,
        &format!("SELECT order_id FROM {s}.notification ORDER BY order_id"),
    )
    .await;
    assert_eq!(
        notified, confirmed,
        "{context}: one notification per confirmed order"
    );
}

async fn scenario(mode: Mode, halt_at: Option<u64>) -> u64 {
    let client = pg::connect().await;
    let target = Target::new(mode);
    setup(&client, &target.schema).await;
    let context = match halt_at {
        Some(n) => {
            let halted = kill_at(&target, n).await;
            run_to_the_end(&target).await;
            format!("{mode:?}: killed at `{halted}`, then restarted")
        }
        None => format!("{mode:?}: no crash"),
    };
    let boundaries = if halt_at.is_none() {
        run_to_the_end(&target).await
    } else {
        0
    };
    let pg_log: Option<String> = client
        .query_one(
            &format!("SELECT to_regclass('{}.saga')::text", target.schema),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        pg_log.is_some(),
        target.log_file.is_none(),
        "{context}: which log"
    );
    let log = target.log();
    check_invariants(&client, &*log, &target.schema, &context).await;
    client
        .batch_execute(&format!("DROP SCHEMA {} CASCADE", target.schema))
        .await
        .unwrap();
    boundaries
}

async fn kill_at_every_boundary(mode: Mode) {
    assert_eq!(scenario(mode, None).await, BOUNDARIES);

    let limit = Arc::new(tokio::sync::Semaphore::new(4));
    let mut runs = tokio::task::JoinSet::new();
    for n in 1..=BOUNDARIES {
        let limit = limit.clone();
        runs.spawn(async move {
            let _permit = limit.acquire_owned().await.unwrap();
            scenario(mode, Some(n)).await
        });
    }
    while let Some(run) = runs.join_next().await {
        run.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_at_every_step_boundary_finishes_every_saga_after_a_restart() {
    kill_at_every_boundary(Mode::Sequential).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_running_sagas_concurrently_killed_at_every_boundary_recovers_them_all() {
    kill_at_every_boundary(Mode::Concurrent).await;
}

#[cfg(feature = "embedded")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_with_an_embedded_log_killed_at_every_boundary_recovers_from_the_file() {
    kill_at_every_boundary(Mode::EmbeddedLog).await;
}
