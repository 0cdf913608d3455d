//! The backend of the loopback harness (`scripts/bench-gateway.sh`): answers a fixed JSON
//! document to `GET /api/...`, as cheaply as axum allows, so that what a proxy in front
//! of it adds stands out.
//!
//! `bench-backend [--listen 127.0.0.1:0] [--threads 1]` prints `listening on <addr>` once
//! it accepts connections.

use std::io::Write;
use std::net::SocketAddr;

use anyhow::Context;
use axum::http::header;
use axum::routing::get;
use axum::Router;
use micro_benches::gateway::UPSTREAM_BODY;

fn main() -> anyhow::Result<()> {
    let mut listen = SocketAddr::from(([127, 0, 0, 1], 0));
    let mut threads = 1;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let value = args
            .next()
            .with_context(|| format!("{arg} needs a value"))?;
        match arg.as_str() {
            "--listen" => listen = value.parse().context("--listen")?,
            "--threads" => threads = value.parse().context("--threads")?,
            other => anyhow::bail!("unknown argument `{other}`"),
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(listen).await?;
        let app = Router::new().route(
            "/api/{*rest}",
            get(|| async { ([(header::CONTENT_TYPE, "application/json")], UPSTREAM_BODY) }),
        );
        let mut stdout = std::io::stdout();
        writeln!(stdout, "listening on {}", listener.local_addr()?)?;
        stdout.flush()?;
        axum::serve(listener, app).await?;
        Ok(())
    })
}
