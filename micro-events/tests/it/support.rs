//! Helpers shared by the test modules.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Polls `check` until it returns `Some`, or panics with `what` after
/// `deadline` (Tokio time: instant on a paused clock).
pub(crate) async fn eventually<T>(
    deadline: Duration,
    what: &str,
    mut check: impl FnMut() -> Option<T>,
) -> T {
    let give_up = tokio::time::Instant::now() + deadline;
    loop {
        if let Some(value) = check() {
            return value;
        }
        if tokio::time::Instant::now() >= give_up {
            panic!("timed out after {deadline:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Awaits `fut`, or panics with `what` after `deadline`.
pub(crate) async fn within<F: Future>(deadline: Duration, what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(deadline, fut).await {
        Ok(output) => output,
        Err(_) => panic!("timed out after {deadline:?} waiting for {what}"),
    }
}

/// A list shared between a handler and the test.
#[derive(Debug)]
pub(crate) struct Log<T>(Arc<Mutex<Vec<T>>>);

impl<T> Clone for Log<T> {
    fn clone(&self) -> Self {
        Self(Arc::clone(&self.0))
    }
}

impl<T: Clone> Log<T> {
    pub(crate) fn new() -> Self {
        Self(Arc::new(Mutex::new(Vec::new())))
    }

    pub(crate) fn push(&self, value: T) {
        self.0.lock().unwrap().push(value);
    }

    pub(crate) fn snapshot(&self) -> Vec<T> {
        self.0.lock().unwrap().clone()
    }

    pub(crate) fn len(&self) -> usize {
        self.0.lock().unwrap().len()
    }
}

/// A name no other test uses: `prefix` plus a random suffix.
pub(crate) fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid_like())
}

fn uuid_like() -> String {
    use std::time::{SystemTime, UNIX_EPOCH};
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{:x}{n:x}{:x}", t, std::process::id())
}
