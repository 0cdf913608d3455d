//! Replacing the gateway while it serves: a [`Reloadable`] handle in front of the current
//! [`Gateway`], and a [`ConfigWatcher`] that rebuilds it when its file changes.
//!
//! A replacement takes effect for the next request; requests in flight finish on the
//! gateway they started on, and no connection is closed, because the listener and the
//! connections belong to the host, not to the gateway. A file that fails to load leaves
//! the running gateway as it is: the error is logged and counted in
//! `micro_gateway_config_reloads_total{result="error"}`.

use std::convert::Infallible;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::Router;
use http::{Request, Response};
use tower_service::Service;

use crate::config::{ConfigError, DeclarativeConfig, Resources};
use crate::gateway::Gateway;

/// A tower service that sends every request to the gateway it holds now; cloning it
/// gives another handle on the same gateway.
#[derive(Clone)]
pub struct Reloadable {
    current: Arc<RwLock<Gateway>>,
}

impl Reloadable {
    /// Serves `gateway` until it is replaced.
    pub fn new(gateway: Gateway) -> Self {
        Self {
            current: Arc::new(RwLock::new(gateway)),
        }
    }

    /// Makes `gateway` answer the next requests.
    pub fn replace(&self, gateway: Gateway) {
        // A poisoned lock still holds a whole gateway: a panic cannot tear the swap.
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = gateway;
    }

    /// The gateway serving now.
    pub fn current(&self) -> Gateway {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The handle as an axum router, to host like [`Gateway::into_router`].
    pub fn into_router(self) -> Router {
        Router::new().fallback_service(self)
    }
}

impl fmt::Debug for Reloadable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Reloadable").field(&self.current()).finish()
    }
}

impl Service<Request<Body>> for Reloadable {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = <Gateway as Service<Request<Body>>>::Future;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        // A gateway is always ready: its future is passed on as it is, not boxed again.
        self.current().call(request)
    }
}

/// Rewrites a configuration file's text before it is parsed.
type Preprocess = Box<dyn Fn(&str) -> String + Send + Sync>;

/// Watches a configuration file and replaces a [`Reloadable`]'s gateway when the file's
/// content changes and the new content builds.
pub struct ConfigWatcher {
    path: PathBuf,
    resources: Resources,
    target: Reloadable,
    applied: Option<Vec<u8>>,
    pending: Option<Vec<u8>>,
    preprocess: Option<Preprocess>,
}

impl fmt::Debug for ConfigWatcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConfigWatcher")
            .field("path", &self.path)
            .field("resources", &self.resources)
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

impl ConfigWatcher {
    /// Watches `path`, building with `resources`, for `target`. The file's current content
    /// counts as applied: the first [`check`](Self::check) reloads only if it changed.
    pub fn new(path: impl AsRef<Path>, resources: Resources, target: Reloadable) -> Self {
        let path = path.as_ref().to_owned();
        let applied = std::fs::read(&path).ok();
        Self {
            path,
            resources,
            target,
            applied,
            pending: None,
            preprocess: None,
        }
    }

    /// Rewrites the file's text before it is parsed, as the program did with the text it
    /// started from (filling in a secret, say).
    pub fn preprocess(mut self, f: impl Fn(&str) -> String + Send + Sync + 'static) -> Self {
        self.preprocess = Some(Box::new(f));
        self
    }

    /// Reads the file now; if its content changed and read the same at the previous check
    /// too (so that a file caught half-written is not applied), builds it and replaces the
    /// gateway. Returns whether the gateway was replaced.
    ///
    /// # Errors
    ///
    /// When the file cannot be read or does not build; the running gateway stays. The
    /// same bad content is reported once, not at every check.
    pub fn check(&mut self) -> Result<bool, ConfigError> {
        let content =
            std::fs::read(&self.path).map_err(|e| ConfigError::unreadable(&self.path, e))?;
        if self.applied.as_deref() == Some(content.as_slice()) {
            self.pending = None;
            return Ok(false);
        }
        // A file is often written in several steps (truncate, then write): a new content is
        // applied once two checks in a row read it the same.
        if self.pending.as_deref() != Some(content.as_slice()) {
            self.pending = Some(content);
            return Ok(false);
        }
        self.pending = None;
        self.applied = Some(content.clone());
        let built = std::str::from_utf8(&content)
            .map_err(|e| ConfigError::unreadable(&self.path, e))
            .map(|text| match &self.preprocess {
                Some(preprocess) => preprocess(text),
                None => text.to_owned(),
            })
            .and_then(|text| DeclarativeConfig::from_yaml(&text).map_err(|e| e.in_file(&self.path)))
            .and_then(|config| {
                config
                    .build_with(&self.resources)
                    .map_err(|e| e.in_file(&self.path))
            });
        match built {
            Ok(gateway) => {
                self.target.replace(gateway);
                metrics::counter!("micro_gateway_config_reloads_total", "result" => "ok")
                    .increment(1);
                tracing::info!(path = %self.path.display(), "configuration reloaded");
                Ok(true)
            }
            Err(error) => {
                metrics::counter!("micro_gateway_config_reloads_total", "result" => "error")
                    .increment(1);
                tracing::error!(%error, "configuration not reloaded; the running one stays");
                Err(error)
            }
        }
    }

    /// Checks the file every `interval`, forever; run it in a task and drop the task to
    /// stop. Errors are logged by [`check`](Self::check).
    pub async fn run(mut self, interval: Duration) {
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            let _ = self.check();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routes(reloadable: &Reloadable) -> String {
        format!("{:?}", reloadable.current())
    }

    fn config(route: &str) -> String {
        format!(
            "services:\n  - name: s\n    url: http://127.0.0.1:9\n    routes:\n      - name: {route}\n        paths: [/{route}]\n"
        )
    }

    #[test]
    fn a_new_content_is_applied_once_it_reads_the_same_twice_and_a_bad_one_never() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gateway.yaml");
        std::fs::write(&path, config("first")).unwrap();
        let initial = DeclarativeConfig::from_file(&path)
            .unwrap()
            .build()
            .unwrap();
        let reloadable = Reloadable::new(initial);
        let mut watcher = ConfigWatcher::new(&path, Resources::new(), reloadable.clone());
        assert!(!watcher.check().unwrap(), "nothing changed");

        std::fs::write(&path, config("second")).unwrap();
        assert!(!watcher.check().unwrap(), "seen once: maybe half-written");
        assert!(routes(&reloadable).contains("first"));
        assert!(watcher.check().unwrap());
        assert!(routes(&reloadable).contains("second"));

        std::fs::write(&path, "services: [{name: s}]\n").unwrap();
        assert!(!watcher.check().unwrap());
        let error = watcher.check().unwrap_err();
        assert!(error.place().ends_with("services[0]"), "{error}");
        assert!(routes(&reloadable).contains("second"));
        assert!(
            !watcher.check().unwrap(),
            "the same bad file is reported once"
        );
    }
}
