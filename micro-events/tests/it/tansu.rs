//! A tansu broker of a test's own, on PostgreSQL storage, that the test may kill and
//! start again: its topics, records and committed offsets live in a database made for
//! it, so they survive the broker's restart (the `memory://` engine of the shared broker
//! keeps nothing). Also used by the shop's fault run (`#[path]`-included there).
//!
//! The binary is `MICRO_TANSU_BIN` (default `/var/tmp/tansu/bin/tansu`, where
//! `scripts/tansu.sh` installs it, built with the `postgres` feature); the database
//! server is `MICRO_TEST_POSTGRES_URL`. The tables come from `scripts/tansu-postgres.sql`.

use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The tables of tansu's PostgreSQL engine.
const SCHEMA: &str = include_str!("../../../scripts/tansu-postgres.sql");

/// A broker on `127.0.0.1:<port>` storing in the database `database`.
pub(crate) struct Tansu {
    bin: PathBuf,
    port: u16,
    server: String,
    database: String,
    log: PathBuf,
    child: Option<Child>,
}

impl Tansu {
    /// Makes a fresh database, loads tansu's tables into it, and starts a broker on a
    /// free port.
    pub(crate) async fn start() -> Self {
        let bin = PathBuf::from(
            std::env::var("MICRO_TANSU_BIN")
                .unwrap_or_else(|_| "/var/tmp/tansu/bin/tansu".to_owned()),
        );
        assert!(
            bin.is_file(),
            "no tansu at {} (MICRO_TANSU_BIN): run scripts/tansu.sh's tansu_up",
            bin.display()
        );
        let server = std::env::var("MICRO_TEST_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let database = format!("tansu_{}_{nanos:x}", std::process::id());
        let admin = connect(&server).await;
        admin
            .batch_execute(&format!("CREATE DATABASE {database}"))
            .await
            .expect("creating the broker's database");
        connect(&with_database(&server, &database))
            .await
            .batch_execute(SCHEMA)
            .await
            .expect("loading tansu's tables");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let log = std::env::temp_dir().join(format!("{database}.log"));
        let mut tansu = Self {
            bin,
            port,
            server,
            database,
            log,
            child: None,
        };
        tansu.restart();
        tansu
    }

    /// `host:port`, for `bootstrap.servers`.
    pub(crate) fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The broker's database, to read what it stored.
    #[allow(dead_code)] // one of the two test binaries that include this file reads it
    pub(crate) fn database_url(&self) -> String {
        with_database(&self.server, &self.database)
    }

    /// The broker's `--storage-engine`: its database, without TLS unless the server's
    /// URL asks for it (tansu tries TLS by default, and a loopback server's certificate
    /// names `localhost`, not the address).
    fn storage_engine(&self) -> String {
        let url = with_database(&self.server, &self.database);
        if url.contains("sslmode=") {
            url
        } else if url.contains('?') {
            format!("{url}&sslmode=disable")
        } else {
            format!("{url}?sslmode=disable")
        }
    }

    /// Where the broker writes its log (appended to across restarts).
    pub(crate) fn log(&self) -> &std::path::Path {
        &self.log
    }

    /// Kills the broker with SIGKILL, as a crash would.
    pub(crate) fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the broker (again) on the same port and database, and waits until it
    /// listens.
    pub(crate) fn restart(&mut self) {
        self.kill();
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(&self.bin)
            .arg("broker")
            .args(["--listener-url", &url, "--advertised-listener-url", &url])
            .args(["--storage-engine", &self.storage_engine()])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("tansu starts");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().unwrap()) {
                panic!(
                    "tansu exited ({status}); see {}:\n{}",
                    self.log.display(),
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "tansu is not listening on {}; see {}",
                self.port,
                self.log.display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        self.kill();
        // The database goes with the broker; its own connections first.
        let server = self.server.clone();
        let database = self.database.clone();
        let dropped = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(async {
                    connect(&server)
                        .await
                        .batch_execute(&format!("DROP DATABASE IF EXISTS {database} WITH (FORCE)"))
                        .await
                })
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("the broker's database {} was left behind", self.database);
        }
    }
}

/// `server` (a PostgreSQL URL) with its database replaced by `database`.
pub(crate) fn with_database(server: &str, database: &str) -> String {
    let (base, query) = match server.split_once('?') {
        Some((base, query)) => (base, format!("?{query}")),
        None => (server, String::new()),
    };
    let authority_end = base.find("://").map_or(0, |i| i + 3);
    let base = match base[authority_end..].find('/') {
        Some(slash) => &base[..authority_end + slash],
        None => base,
    };
    format!("{base}/{database}{query}")
}

async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL at {url} (MICRO_TEST_POSTGRES_URL): {e}"));
    tokio::spawn(connection);
    client
}
