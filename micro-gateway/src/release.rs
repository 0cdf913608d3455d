//! Releases: one upstream service's traffic split between subsets of its instances, such
//! as the `stable` and `canary` versions of a canary release or the `blue` and `green`
//! ones of a blue-green switch.
//!
//! A [`Split`] is a tower service in front of one [`Proxy`] per subset (typically each a
//! [discovered proxy](Proxy::discovered) over a
//! [`VersionSubset`](micro_discovery::subset::VersionSubset)). Per request it picks a
//! subset, in this order:
//!
//! 1. **forced**: a subset named by the [force header](SplitBuilder::force_header) or
//!    [force cookie](SplitBuilder::force_cookie) (testers, internal users), whatever its
//!    weight, even 0;
//! 2. **remembered**: the subset named by the [remember cookie](SplitBuilder::remember)
//!    the gateway set on an earlier response, while that subset's weight is above 0;
//! 3. **by weight**: a point in `0..total weight`, taken from a stable hash of the
//!    [sticky key](StickyKey) when the request has one (the same user lands on the same
//!    subset on every gateway, for as long as the weights stay), or at random otherwise.
//!    Subsets own consecutive stretches of points in their declared order, so growing the
//!    last subset's weight at the expense of the first (5% → 25% → 100% canary) only ever
//!    moves users from the first to the last, never back.
//!
//! [`set_weights`](Split::set_weights) changes the weights of every clone at once, in one
//! step: a blue-green switch is `set_weights(&[("blue", 0), ("green", 100)])`. Requests
//! already sent finish where they went; the next request sees the new weights. A
//! configuration reload that changes the weights is just as atomic (see
//! [`reload`](crate::reload)).
//!
//! Each subset's requests and answers are counted in
//! `micro_gateway_subset_responses_total{service, subset, class}` (`class` is `2xx`,
//! `5xx`, ...).

use std::convert::Infallible;
use std::fmt;
use std::sync::{Arc, OnceLock, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use http::header::{COOKIE, SET_COOKIE};
use http::{HeaderName, HeaderValue, Request, Response};
use micro_core::service::BoxFuture;
use tower::Service;

use crate::plugins::jwt::VerifiedClaims;
use crate::proxy::Proxy;

/// What keeps a user on one subset while the weights stay the same.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum StickyKey {
    /// The subject (`sub`) of the token the [JWT plugin](crate::plugins::jwt) verified.
    Subject,
    /// The value of a request header (a session or device id).
    Header(HeaderName),
    /// The value of a request cookie (a session cookie).
    Cookie(String),
}

/// A [`Split`] that can't be built, or weights that can't be set.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SplitError {
    /// No subset was given.
    #[error("a split needs at least one subset")]
    NoSubset,
    /// Two subsets share a name.
    #[error("two subsets are named `{0}`")]
    DuplicateSubset(String),
    /// A weight names a subset the split does not have.
    #[error("there is no subset `{0}`")]
    UnknownSubset(String),
    /// Every weight would be 0, so no request could be sent anywhere.
    #[error("every subset's weight is 0: at least one must be above 0")]
    NoWeight,
    /// A cookie name that is not a cookie name.
    #[error("`{0}` is not a cookie name")]
    CookieName(String),
}

/// Builds a [`Split`]; see [`Split::builder`].
#[derive(Debug)]
pub struct SplitBuilder {
    service: Arc<str>,
    subsets: Vec<(Arc<str>, Proxy, u32)>,
    sticky: Option<StickyKey>,
    remember: Option<(String, Duration)>,
    force_header: Option<HeaderName>,
    force_cookie: Option<String>,
}

impl SplitBuilder {
    /// Adds the subset `name`, reached through `proxy`, with `weight` (any scale: weights
    /// of 95 and 5 send 5% to the second).
    pub fn subset(mut self, name: impl Into<Arc<str>>, proxy: Proxy, weight: u32) -> Self {
        self.subsets.push((name.into(), proxy, weight));
        self
    }

    /// Keeps each user on one subset by `key`, hashed (see the [module](self)).
    pub fn sticky(mut self, key: StickyKey) -> Self {
        self.sticky = Some(key);
        self
    }

    /// Remembers each client's subset in the cookie `name` for `lifetime`: a response
    /// whose subset was chosen by weight sets it, and later requests that carry it go to
    /// that subset while its weight is above 0.
    pub fn remember(mut self, name: impl Into<String>, lifetime: Duration) -> Self {
        self.remember = Some((name.into(), lifetime));
        self
    }

    /// Sends a request whose header `name` names a subset to that subset.
    pub fn force_header(mut self, name: HeaderName) -> Self {
        self.force_header = Some(name);
        self
    }

    /// Sends a request whose cookie `name` names a subset to that subset.
    pub fn force_cookie(mut self, name: impl Into<String>) -> Self {
        self.force_cookie = Some(name.into());
        self
    }

    /// The split.
    ///
    /// # Errors
    ///
    /// A [`SplitError`]: no subset, two of one name, every weight 0, or a cookie name
    /// with characters a cookie name can't have.
    pub fn build(self) -> Result<Split, SplitError> {
        if self.subsets.is_empty() {
            return Err(SplitError::NoSubset);
        }
        for (i, (name, ..)) in self.subsets.iter().enumerate() {
            if self.subsets[..i].iter().any(|(other, ..)| other == name) {
                return Err(SplitError::DuplicateSubset(name.to_string()));
            }
        }
        let cookies = [
            self.remember.as_ref().map(|(name, _)| name),
            self.force_cookie.as_ref(),
            match &self.sticky {
                Some(StickyKey::Cookie(name)) => Some(name),
                _ => None,
            },
        ];
        for name in cookies.into_iter().flatten() {
            if !is_cookie_name(name) {
                return Err(SplitError::CookieName(name.clone()));
            }
        }
        let weights: Vec<u32> = self.subsets.iter().map(|(_, _, weight)| *weight).collect();
        if weights.iter().all(|w| *w == 0) {
            return Err(SplitError::NoWeight);
        }
        let subsets = self
            .subsets
            .into_iter()
            .map(|(name, proxy, _)| Subset {
                name,
                proxy,
                counts: Arc::default(),
            })
            .collect();
        Ok(Split {
            service: self.service,
            subsets,
            weights: Arc::new(RwLock::new(weights.into())),
            rules: Arc::new(Rules {
                sticky: self.sticky,
                remember: self.remember,
                force_header: self.force_header,
                force_cookie: self.force_cookie,
            }),
        })
    }
}

/// The traffic of one service split between subsets of its instances by weight, with
/// sticky users and forced subsets; see the [module](self).
#[derive(Clone)]
pub struct Split {
    service: Arc<str>,
    subsets: Vec<Subset>,
    weights: Arc<RwLock<Arc<[u32]>>>,
    rules: Arc<Rules>,
}

#[derive(Clone)]
struct Subset {
    name: Arc<str>,
    proxy: Proxy,
    counts: Arc<ResponseCounts>,
}

struct Rules {
    sticky: Option<StickyKey>,
    remember: Option<(String, Duration)>,
    force_header: Option<HeaderName>,
    force_cookie: Option<String>,
}

/// A subset's response counters by status class, taken from the recorder at first use.
#[derive(Default)]
struct ResponseCounts {
    by_class: [OnceLock<metrics::Counter>; 5],
}

/// How a request's subset was chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Choice {
    Forced,
    Remembered,
    Weighted,
}

impl Split {
    /// A split of `service` (its name in logs and metrics); add subsets to the builder.
    pub fn builder(service: impl Into<Arc<str>>) -> SplitBuilder {
        SplitBuilder {
            service: service.into(),
            subsets: Vec::new(),
            sticky: None,
            remember: None,
            force_header: None,
            force_cookie: None,
        }
    }

    /// The service this split belongs to.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// Each subset's name and weight, in their declared order.
    pub fn weights(&self) -> Vec<(String, u32)> {
        let weights = self.current();
        self.subsets
            .iter()
            .zip(weights.iter())
            .map(|(subset, weight)| (subset.name.to_string(), *weight))
            .collect()
    }

    /// Sets the weights of the named subsets, the others keeping theirs, all in one step
    /// that every clone of this split sees at once.
    ///
    /// # Errors
    ///
    /// [`SplitError::UnknownSubset`] for a name the split does not have, and
    /// [`SplitError::NoWeight`] when every weight would be 0; the weights are then
    /// unchanged.
    pub fn set_weights(&self, weights: &[(&str, u32)]) -> Result<(), SplitError> {
        let mut guard = self.weights.write().unwrap_or_else(|e| e.into_inner());
        let mut next = guard.to_vec();
        for (name, weight) in weights {
            let index = self
                .index(name)
                .ok_or_else(|| SplitError::UnknownSubset((*name).to_owned()))?;
            next[index] = *weight;
        }
        if next.iter().all(|w| *w == 0) {
            return Err(SplitError::NoWeight);
        }
        *guard = next.into();
        tracing::info!(service = %self.service, weights = ?self.weights_of(&guard), "subset weights set");
        Ok(())
    }

    /// This split with [`Proxy::with_preserve_host`] applied to every subset's proxy.
    pub fn with_preserve_host(mut self, preserve: bool) -> Self {
        for subset in &mut self.subsets {
            subset.proxy = subset.proxy.clone().with_preserve_host(preserve);
        }
        self
    }

    fn current(&self) -> Arc<[u32]> {
        self.weights
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn weights_of(&self, weights: &[u32]) -> Vec<(String, u32)> {
        self.subsets
            .iter()
            .zip(weights)
            .map(|(subset, weight)| (subset.name.to_string(), *weight))
            .collect()
    }

    fn index(&self, name: &str) -> Option<usize> {
        self.subsets.iter().position(|s| &*s.name == name)
    }

    /// The subset for `request`, and how it was chosen.
    fn choose(&self, request: &Request<Body>) -> (usize, Choice) {
        let weights = self.current();
        let rules = &self.rules;
        let forced = rules
            .force_header
            .as_ref()
            .and_then(|name| request.headers().get(name))
            .and_then(|value| value.to_str().ok())
            .or_else(|| {
                let name = rules.force_cookie.as_deref()?;
                cookie(request, name)
            });
        if let Some(index) = forced.and_then(|name| self.index(name.trim())) {
            return (index, Choice::Forced);
        }
        let remembered = rules
            .remember
            .as_ref()
            .and_then(|(name, _)| cookie(request, name))
            .and_then(|name| self.index(name));
        if let Some(index) = remembered.filter(|i| weights[*i] > 0) {
            return (index, Choice::Remembered);
        }
        let total: u64 = weights.iter().map(|w| u64::from(*w)).sum();
        let key = match &rules.sticky {
            Some(StickyKey::Subject) => request
                .extensions()
                .get::<VerifiedClaims>()
                .and_then(VerifiedClaims::subject),
            Some(StickyKey::Header(name)) => request
                .headers()
                .get(name)
                .and_then(|value| value.to_str().ok()),
            Some(StickyKey::Cookie(name)) => cookie(request, name),
            None => None,
        };
        let point = match key {
            Some(key) => fnv1a(key.as_bytes()) % total,
            None => rand::random_range(0..total),
        };
        (by_point(&weights, point), Choice::Weighted)
    }

    fn remember_cookie(&self, subset: &str) -> Option<HeaderValue> {
        let (name, lifetime) = self.rules.remember.as_ref()?;
        let text = format!(
            "{name}={subset}; Max-Age={}; Path=/; HttpOnly; SameSite=Lax",
            lifetime.as_secs()
        );
        HeaderValue::from_str(&text).ok()
    }
}

impl fmt::Debug for Split {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Split")
            .field("service", &self.service)
            .field("weights", &self.weights())
            .finish_non_exhaustive()
    }
}

impl Service<Request<Body>> for Split {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let (index, choice) = self.choose(&request);
        let subset = self.subsets[index].clone();
        let set_cookie = match choice {
            Choice::Weighted => self.remember_cookie(&subset.name),
            Choice::Forced | Choice::Remembered => None,
        };
        let service = self.service.clone();
        Box::pin(async move {
            let mut proxy = subset.proxy.clone();
            let Ok(mut response) = proxy.call(request).await;
            subset
                .counts
                .record(&service, &subset.name, response.status());
            if let Some(cookie) = set_cookie {
                response.headers_mut().append(SET_COOKIE, cookie);
            }
            Ok(response)
        })
    }
}

impl ResponseCounts {
    fn record(&self, service: &Arc<str>, subset: &Arc<str>, status: http::StatusCode) {
        const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];
        let class = usize::from(status.as_u16() / 100).clamp(1, 5) - 1;
        self.by_class[class]
            .get_or_init(|| {
                metrics::counter!(
                    "micro_gateway_subset_responses_total",
                    "service" => service.clone(),
                    "subset" => subset.clone(),
                    "class" => CLASSES[class],
                )
            })
            .increment(1);
    }
}

/// The subset whose stretch of `0..total` holds `point`, stretches laid out in order.
fn by_point(weights: &[u32], point: u64) -> usize {
    let mut end = 0u64;
    for (index, weight) in weights.iter().enumerate() {
        end += u64::from(*weight);
        if point < end {
            return index;
        }
    }
    // Unreachable while point < total; the last subset with weight otherwise.
    weights.iter().rposition(|w| *w > 0).unwrap_or(0)
}

/// 64-bit FNV-1a: a hash that is the same in every process and every build, so that
/// gateways side by side put a user in the same subset.
fn fnv1a(bytes: &[u8]) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    bytes.iter().fold(OFFSET, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(PRIME)
    })
}

/// The value of the cookie `name` of `request`, if it has one.
fn cookie<'r>(request: &'r Request<Body>, name: &str) -> Option<&'r str> {
    request
        .headers()
        .get_all(COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|header| header.split(';'))
        .find_map(|pair| {
            let (key, value) = pair.trim().split_once('=')?;
            (key == name).then(|| value.trim_matches('"'))
        })
}

/// Whether `name` is a cookie name (an RFC 6265 token).
fn is_cookie_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn points_fall_in_the_stretches_of_the_declared_order() {
        assert_eq!(by_point(&[95, 5], 0), 0);
        assert_eq!(by_point(&[95, 5], 94), 0);
        assert_eq!(by_point(&[95, 5], 95), 1);
        assert_eq!(by_point(&[0, 100], 0), 1);
        assert_eq!(by_point(&[100, 0], 99), 0);
    }

    #[test]
    fn growing_the_last_subset_only_moves_users_to_it() {
        let keys: Vec<String> = (0..2000).map(|i| format!("user-{i}")).collect();
        let mut previous: Vec<usize> = keys.iter().map(|_| 0).collect();
        for canary in [5u32, 25, 50, 100] {
            let weights = [100 - canary, canary];
            let total = 100;
            let now: Vec<usize> = keys
                .iter()
                .map(|key| by_point(&weights, fnv1a(key.as_bytes()) % total))
                .collect();
            for (before, after) in previous.iter().zip(&now) {
                assert!(*before <= *after, "a user went back from canary to stable");
            }
            let share = now.iter().filter(|s| **s == 1).count() as f64 / keys.len() as f64;
            let expected = f64::from(canary) / 100.0;
            assert!((share - expected).abs() < 0.05, "{canary}%: {share}");
            previous = now;
        }
    }

    #[test]
    fn the_hash_is_the_same_everywhere() {
        // FNV-1a's published test vectors.
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn cookies_are_found_by_name() {
        let request = Request::builder()
            .header(COOKIE, "a=1; micro-subset=canary")
            .header(COOKIE, "b=\"2\"")
            .body(Body::empty())
            .unwrap();
        assert_eq!(cookie(&request, "micro-subset"), Some("canary"));
        assert_eq!(cookie(&request, "b"), Some("2"));
        assert_eq!(cookie(&request, "c"), None);
        assert!(is_cookie_name("micro-subset"));
        assert!(!is_cookie_name("a=b"));
        assert!(!is_cookie_name(""));
    }
}
