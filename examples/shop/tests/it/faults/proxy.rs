//! A TCP proxy that delays and drops the calls passing through it: the fault run puts
//! one in front of the payment and the inventory services, so the order saga's calls
//! to them meet slow answers, refused requests and answers lost after the work was
//! done (an unknown outcome).
//!
//! Faults are drawn per chunk the caller sends (about one HTTP request each): with
//! `delay` per mille it waits 0.2–3 s before passing the request on, with `refuse` per
//! mille it closes the connection without passing it on, with `lose` per mille it
//! passes the request on and closes the connection when the answer arrives.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::Rng;

/// How often each fault is drawn, per mille of the requests.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Odds {
    pub(crate) delay: u64,
    pub(crate) refuse: u64,
    pub(crate) lose: u64,
}

/// What the proxies did.
#[derive(Debug, Default)]
pub(crate) struct Counts {
    pub(crate) delayed: AtomicU64,
    pub(crate) refused: AtomicU64,
    pub(crate) lost: AtomicU64,
}

/// A running proxy to `upstream`.
pub(crate) struct Proxy {
    port: u16,
    on: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Listens on `port` (0 for any) and passes connections on to `upstream`, with
    /// faults while [`Proxy::faults`] is on.
    pub(crate) async fn start(
        port: u16,
        upstream: u16,
        odds: Odds,
        counts: Arc<Counts>,
        seed: u64,
    ) -> Self {
        let listener = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let on = Arc::new(AtomicBool::new(false));
        let rng = Arc::new(Mutex::new(Rng::new(seed)));
        let faults = on.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (faults, counts, rng) = (faults.clone(), counts.clone(), rng.clone());
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)).await else {
                        return; // the service is down: the caller sees a closed connection
                    };
                    pipe(client, server, odds, &faults, &counts, &rng).await;
                });
            }
        });
        Self { port, on, task }
    }

    /// Where callers connect.
    pub(crate) fn port(&self) -> u16 {
        self.port
    }

    /// Turns the faults on or off.
    pub(crate) fn faults(&self, on: bool) {
        self.on.store(on, Ordering::Relaxed);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn pipe(
    client: TcpStream,
    server: TcpStream,
    odds: Odds,
    faults: &AtomicBool,
    counts: &Counts,
    rng: &Mutex<Rng>,
) {
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let lose_answer = AtomicBool::new(false);
    let requests = async {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match client_read.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if faults.load(Ordering::Relaxed) {
                let (roll, pause) = {
                    let mut rng = rng.lock().unwrap();
                    (rng.below(1000), 200 + rng.below(2800))
                };
                if roll < odds.refuse {
                    counts.refused.fetch_add(1, Ordering::Relaxed);
                    return;
                } else if roll < odds.refuse + odds.lose {
                    counts.lost.fetch_add(1, Ordering::Relaxed);
                    lose_answer.store(true, Ordering::Relaxed);
                } else if roll < odds.refuse + odds.lose + odds.delay {
                    counts.delayed.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(pause)).await;
                }
            }
            if server_write.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    let answers = async {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match server_read.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if lose_answer.load(Ordering::Relaxed) {
                return;
            }
            if client_write.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    // Either side ending ends both: the connection closes as a whole.
    tokio::select! {
        () = requests => {}
        () = answers => {}
    }
}
