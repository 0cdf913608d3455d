//! Shared fixtures of micro's benchmarks.
//!
//! `cargo bench -p micro-benches` runs them; each bench file compares setups side by side
//! in one run (no layer, the full chain), because absolute figures on a shared machine
//! mean little.

pub mod gateway;

use std::net::SocketAddr;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;

/// One keep-alive HTTP/1 connection, to measure the server side and not connection set-up.
#[derive(Debug)]
pub struct Connection {
    sender: SendRequest<Empty<Bytes>>,
    host: String,
}

impl Connection {
    /// Connects to `addr`.
    ///
    /// # Panics
    ///
    /// When the connection cannot be made: a bench has no way to go on.
    pub async fn open(addr: SocketAddr) -> Self {
        let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("handshake");
        tokio::spawn(connection);
        Self {
            sender,
            host: addr.to_string(),
        }
    }

    /// Sends `GET path` and reads the whole answer, returning its length.
    ///
    /// # Panics
    ///
    /// When the request fails or the status is not 200.
    pub async fn get(&mut self, path: &str) -> usize {
        self.sender.ready().await.expect("ready");
        let request = Request::get(path)
            .header("host", &self.host)
            .body(Empty::new())
            .expect("request");
        let response = self.sender.send_request(request).await.expect("send");
        assert_eq!(response.status(), 200);
        response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes()
            .len()
    }
}
