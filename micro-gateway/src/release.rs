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
//!
//! # Rollouts
//!
//! With a [`RolloutPolicy`] ([`SplitBuilder::rollout`]) the split runs a canary release
//! by itself, judged by what it measures: the canary subset gets each step's share in
//! turn (say 5, 25, 50 and 100%); a step is passed once it has lasted its
//! [minimum time](RolloutPolicy::step_time) and the canary answered its
//! [minimum number of requests](RolloutPolicy::step_requests) within the limits (the
//! step to 100% completes the rollout), and the canary is rolled back to 0% the moment, past that minimum of requests, its error
//! rate (5xx answers, the gateway's own 502/503/504 included) exceeds the stable
//! subset's by more than [`max_error_rate`](RolloutPolicy::max_error_rate) or its mean
//! latency exceeds the stable one's by more than
//! [`max_latency_ratio`](RolloutPolicy::max_latency_ratio). Every decision is logged,
//! counted in `micro_gateway_rollout_decisions_total{service, decision}` (`promoted`
//! to the next step, `completed`, `rolled_back`, `aborted`) and readable with
//! [`Split::rollout`]. So a bad canary costs at most about
//! [`step_requests`](RolloutPolicy::step_requests) user requests (plus those in flight)
//! before it is rolled back.

use std::convert::Infallible;
use std::fmt;
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

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
    /// A rollout policy that can't be followed.
    #[error("rollout: {0}")]
    Rollout(String),
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
    rollout: Option<(String, String, RolloutPolicy)>,
    kept_in: Option<(Rollouts, String)>,
}

/// Rollouts that outlive the splits running them: a split built again (a configuration
/// reload) with the same store and id continues its rollout where it stood, so a reload
/// neither restarts a rollout nor brings back a canary that was rolled back.
#[derive(Debug, Clone, Default)]
pub struct Rollouts {
    by_id: Arc<Mutex<std::collections::HashMap<String, Arc<Mutex<Rollout>>>>>,
}

impl Rollouts {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }
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

    /// Runs a canary release of the subset `canary` against `stable` under `policy`
    /// (see the [module](self)): their weights start at the policy's first step, and the
    /// split moves them from then on.
    pub fn rollout(
        mut self,
        stable: impl Into<String>,
        canary: impl Into<String>,
        policy: RolloutPolicy,
    ) -> Self {
        self.rollout = Some((stable.into(), canary.into(), policy));
        self
    }

    /// Keeps the [rollout](Self::rollout) in `store` under `id` (which should change
    /// whenever the rollout does: the versions, the policy), continuing the one already
    /// there under that id.
    pub fn rollout_kept_in(mut self, store: &Rollouts, id: impl Into<String>) -> Self {
        self.kept_in = Some((store.clone(), id.into()));
        self
    }

    /// The split.
    ///
    /// # Errors
    ///
    /// A [`SplitError`]: no subset, two of one name, every weight 0, a cookie name with
    /// characters a cookie name can't have, or a rollout naming a missing subset or
    /// with steps that don't rise to 100.
    pub fn build(mut self) -> Result<Split, SplitError> {
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
        let rollout = match self.rollout.take() {
            None => None,
            Some((stable, canary, policy)) => {
                let find = |name: &str| {
                    self.subsets
                        .iter()
                        .position(|(n, ..)| &**n == name)
                        .ok_or_else(|| SplitError::Rollout(format!("there is no subset `{name}`")))
                };
                let (stable, canary) = (find(&stable)?, find(&canary)?);
                if stable == canary {
                    return Err(SplitError::Rollout(
                        "the stable and canary subsets are one".to_owned(),
                    ));
                }
                policy.check()?;
                let fresh = || Arc::new(Mutex::new(Rollout::new(stable, canary, policy)));
                let rollout = match &self.kept_in {
                    None => fresh(),
                    Some((store, id)) => {
                        let mut by_id = store.by_id.lock().unwrap_or_else(|e| e.into_inner());
                        by_id.entry(id.clone()).or_insert_with(fresh).clone()
                    }
                };
                let weight = rollout
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .canary_weight();
                self.subsets[stable].2 = 100 - weight;
                self.subsets[canary].2 = weight;
                Some(rollout)
            }
        };
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
            rollout,
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
    rollout: Option<Arc<Mutex<Rollout>>>,
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
            rollout: None,
            kept_in: None,
        }
    }

    /// Where the rollout stands, if the split runs one.
    pub fn rollout(&self) -> Option<RolloutStatus> {
        let rollout = self.rollout.as_ref()?;
        let rollout = rollout.lock().unwrap_or_else(|e| e.into_inner());
        Some(rollout.status())
    }

    /// Stops the rollout where it is and sends everything to the stable subset.
    /// Nothing happens when there is no rollout or it has ended.
    pub fn abort_rollout(&self) {
        if let Some(rollout) = &self.rollout {
            let mut rollout = rollout.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(weights) = rollout.end(RolloutState::Aborted, "aborted by hand") {
                self.apply(&rollout, weights);
            }
        }
    }

    /// Sets a rollout's two weights; called with the rollout's lock held, so decisions
    /// apply in the order they are taken.
    fn apply(&self, rollout: &Rollout, canary: u32) {
        let mut guard = self.weights.write().unwrap_or_else(|e| e.into_inner());
        let mut next = guard.to_vec();
        next[rollout.stable] = 100 - canary;
        next[rollout.canary] = canary;
        *guard = next.into();
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
        let split = self.rollout.is_some().then(|| self.clone());
        Box::pin(async move {
            let started = Instant::now();
            let mut proxy = subset.proxy.clone();
            let Ok(mut response) = proxy.call(request).await;
            subset
                .counts
                .record(&service, &subset.name, response.status());
            if let Some(split) = split {
                split.observe(index, response.status(), started.elapsed());
            }
            if let Some(cookie) = set_cookie {
                response.headers_mut().append(SET_COOKIE, cookie);
            }
            Ok(response)
        })
    }
}

impl Split {
    /// Counts one answer of subset `index` in the rollout, and takes the decision it
    /// calls for, if any.
    fn observe(&self, index: usize, status: http::StatusCode, took: Duration) {
        let Some(rollout) = &self.rollout else {
            return;
        };
        let mut rollout = rollout.lock().unwrap_or_else(|e| e.into_inner());
        let error = status.is_server_error();
        let Some(canary) = rollout.observe(index, error, took, Instant::now()) else {
            return;
        };
        self.apply(&rollout, canary);
        let decision = match rollout.state {
            RolloutState::Running => "promoted",
            RolloutState::Completed => "completed",
            RolloutState::RolledBack => "rolled_back",
            RolloutState::Aborted => "aborted",
        };
        metrics::counter!(
            "micro_gateway_rollout_decisions_total",
            "service" => self.service.clone(),
            "decision" => decision,
        )
        .increment(1);
        let reason = rollout.decisions.last().map_or("", |d| d.reason.as_str());
        if rollout.state == RolloutState::RolledBack {
            tracing::warn!(service = %self.service, canary_weight = canary, reason, "canary rolled back");
        } else {
            tracing::info!(service = %self.service, canary_weight = canary, reason, decision, "rollout step");
        }
    }
}

/// How a [`Split`] runs a canary release by itself; see the [module](self).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct RolloutPolicy {
    /// The canary's share at each step, in percent, rising to 100.
    pub steps: Vec<u32>,
    /// The shortest time a step lasts.
    pub step_time: Duration,
    /// The fewest canary answers a step needs, before passing it or judging the canary.
    pub step_requests: u64,
    /// How much higher than the stable subset's the canary's error rate may be (0.05:
    /// five points).
    pub max_error_rate: f64,
    /// How many times the stable subset's mean latency the canary's may be.
    pub max_latency_ratio: f64,
}

impl Default for RolloutPolicy {
    /// Steps of 5, 25, 50 and 100%, each at least a minute and 100 canary answers; the
    /// canary may fail 1 point more often and be 50% slower than stable.
    fn default() -> Self {
        Self {
            steps: vec![5, 25, 50, 100],
            step_time: Duration::from_secs(60),
            step_requests: 100,
            max_error_rate: 0.01,
            max_latency_ratio: 1.5,
        }
    }
}

impl RolloutPolicy {
    fn check(&self) -> Result<(), SplitError> {
        let refuse = |reason: &str| Err(SplitError::Rollout(reason.to_owned()));
        if self.steps.last() != Some(&100) {
            return refuse("the last step must be 100");
        }
        if self.steps.len() < 2 {
            return refuse("give at least one step before 100");
        }
        if self.steps.windows(2).any(|w| w[0] >= w[1]) || self.steps[0] == 0 {
            return refuse("steps must rise, from above 0");
        }
        if self.step_requests == 0 {
            return refuse("`step_requests` must be at least 1");
        }
        if !(0.0..=1.0).contains(&self.max_error_rate) {
            return refuse("`max_error_rate` is a fraction, from 0 to 1");
        }
        if self.max_latency_ratio.is_nan() || self.max_latency_ratio < 1.0 {
            return refuse("`max_latency_ratio` must be at least 1");
        }
        Ok(())
    }
}

/// Where a rollout stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RolloutState {
    /// Steps are being taken.
    Running,
    /// The canary reached 100%.
    Completed,
    /// The canary breached a limit and was sent back to 0%.
    RolledBack,
    /// Stopped by [`Split::abort_rollout`], the canary at 0%.
    Aborted,
}

/// One decision a rollout took.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct RolloutDecision {
    /// The canary's share after it, in percent.
    pub canary_weight: u32,
    /// Why: the step's figures, or the limit breached.
    pub reason: String,
}

/// A rollout's state, step and decisions so far; see [`Split::rollout`].
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct RolloutStatus {
    /// Running or ended, and how.
    pub state: RolloutState,
    /// The canary's share now, in percent.
    pub canary_weight: u32,
    /// Every decision, oldest first.
    pub decisions: Vec<RolloutDecision>,
}

/// A subset's answers during one step.
#[derive(Debug, Default, Clone, Copy)]
struct Tally {
    answers: u64,
    errors: u64,
    time: Duration,
}

impl Tally {
    fn error_rate(&self) -> f64 {
        if self.answers == 0 {
            return 0.0;
        }
        self.errors as f64 / self.answers as f64
    }

    fn mean(&self) -> Option<Duration> {
        let answers = u32::try_from(self.answers).ok().filter(|n| *n > 0)?;
        Some(self.time / answers)
    }
}

#[derive(Debug)]
struct Rollout {
    stable: usize,
    canary: usize,
    policy: RolloutPolicy,
    state: RolloutState,
    step: usize,
    step_started: Instant,
    /// Stable's, then the canary's.
    tallies: [Tally; 2],
    decisions: Vec<RolloutDecision>,
}

impl Rollout {
    fn new(stable: usize, canary: usize, policy: RolloutPolicy) -> Self {
        Self {
            stable,
            canary,
            policy,
            state: RolloutState::Running,
            step: 0,
            step_started: Instant::now(),
            tallies: [Tally::default(); 2],
            decisions: Vec::new(),
        }
    }

    fn canary_weight(&self) -> u32 {
        match self.state {
            RolloutState::Running => self.policy.steps[self.step],
            RolloutState::Completed => 100,
            RolloutState::RolledBack | RolloutState::Aborted => 0,
        }
    }

    fn status(&self) -> RolloutStatus {
        RolloutStatus {
            state: self.state,
            canary_weight: self.canary_weight(),
            decisions: self.decisions.clone(),
        }
    }

    /// Ends a running rollout as `state`; the canary's new weight, or `None` if it had
    /// ended already.
    fn end(&mut self, state: RolloutState, reason: impl Into<String>) -> Option<u32> {
        if self.state != RolloutState::Running {
            return None;
        }
        self.state = state;
        let canary_weight = self.canary_weight();
        self.decisions.push(RolloutDecision {
            canary_weight,
            reason: reason.into(),
        });
        Some(canary_weight)
    }

    /// Counts an answer of subset `index`; the canary's new weight when it calls for a
    /// decision.
    fn observe(&mut self, index: usize, error: bool, took: Duration, now: Instant) -> Option<u32> {
        if self.state != RolloutState::Running {
            return None;
        }
        let which = match index {
            i if i == self.stable => 0,
            i if i == self.canary => 1,
            _ => return None,
        };
        let tally = &mut self.tallies[which];
        tally.answers += 1;
        tally.errors += u64::from(error);
        tally.time += took;

        let [stable, canary] = self.tallies;
        if canary.answers < self.policy.step_requests {
            return None;
        }
        if canary.error_rate() - stable.error_rate() > self.policy.max_error_rate {
            let reason = format!(
                "canary error rate {:.3} against stable {:.3} over {} canary answers: more \
                 than {:.3} above",
                canary.error_rate(),
                stable.error_rate(),
                canary.answers,
                self.policy.max_error_rate
            );
            return self.end(RolloutState::RolledBack, reason);
        }
        if let (Some(slow), Some(base)) = (canary.mean(), stable.mean()) {
            let ratio = slow.as_secs_f64() / base.as_secs_f64().max(1e-6);
            let judged = stable.answers >= self.policy.step_requests;
            if judged && ratio > self.policy.max_latency_ratio {
                let reason = format!(
                    "canary mean latency {slow:?} is {ratio:.2} times stable's {base:?}: more \
                     than {}",
                    self.policy.max_latency_ratio
                );
                return self.end(RolloutState::RolledBack, reason);
            }
        }
        if now.duration_since(self.step_started) < self.policy.step_time {
            return None;
        }
        let reason = format!(
            "step {}% passed: {} canary answers, error rate {:.3} (stable {:.3})",
            self.policy.steps[self.step],
            canary.answers,
            canary.error_rate(),
            stable.error_rate()
        );
        self.step += 1;
        if self.step + 1 == self.policy.steps.len() {
            // The last step is 100%: nothing is left to compare the canary with.
            return self.end(RolloutState::Completed, reason);
        }
        self.step_started = now;
        self.tallies = [Tally::default(); 2];
        let canary_weight = self.canary_weight();
        self.decisions.push(RolloutDecision {
            canary_weight,
            reason,
        });
        Some(canary_weight)
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

    fn policy() -> RolloutPolicy {
        RolloutPolicy {
            steps: vec![10, 50, 100],
            step_time: Duration::from_secs(10),
            step_requests: 20,
            max_error_rate: 0.05,
            max_latency_ratio: 2.0,
        }
    }

    const FAST: Duration = Duration::from_millis(10);

    #[test]
    fn a_healthy_canary_is_promoted_step_by_step_once_each_step_has_lasted() {
        let mut rollout = Rollout::new(0, 1, policy());
        let start = rollout.step_started;
        for _ in 0..50 {
            assert_eq!(rollout.observe(1, false, FAST, start), None, "too early");
            assert_eq!(rollout.observe(0, false, FAST, start), None);
        }
        let later = start + Duration::from_secs(11);
        assert_eq!(rollout.observe(1, false, FAST, later), Some(50));
        // The next step counts afresh: 20 more canary answers, 10 more seconds.
        let mut at = later;
        for _ in 0..19 {
            at += Duration::from_secs(1);
            assert_eq!(rollout.observe(1, false, FAST, at), None);
        }
        assert_eq!(rollout.observe(1, false, FAST, at), Some(100));
        assert_eq!(rollout.state, RolloutState::Completed);
        assert_eq!(
            rollout.observe(1, true, FAST, at),
            None,
            "ended rollouts decide nothing"
        );
        assert_eq!(rollout.status().decisions.len(), 2);
    }

    #[test]
    fn a_failing_canary_is_rolled_back_once_it_has_enough_answers() {
        let mut rollout = Rollout::new(0, 1, policy());
        let now = rollout.step_started;
        for i in 0..19 {
            assert_eq!(
                rollout.observe(1, i % 5 == 0, FAST, now),
                None,
                "judged too early"
            );
        }
        assert_eq!(rollout.observe(1, false, FAST, now), Some(0));
        assert_eq!(rollout.state, RolloutState::RolledBack);
        let reason = &rollout.status().decisions[0].reason;
        assert!(reason.contains("canary error rate 0.200"), "{reason}");

        // Failing no more than stable does is not a breach.
        let mut rollout = Rollout::new(0, 1, policy());
        for i in 0..40 {
            rollout.observe(0, i % 5 == 0, FAST, now);
            assert_eq!(rollout.observe(1, i % 5 == 0, FAST, now), None);
        }
    }

    #[test]
    fn a_slow_canary_is_rolled_back() {
        let mut rollout = Rollout::new(0, 1, policy());
        let now = rollout.step_started;
        for _ in 0..20 {
            rollout.observe(0, false, FAST, now);
        }
        for _ in 0..19 {
            assert_eq!(rollout.observe(1, false, FAST * 3, now), None);
        }
        assert_eq!(rollout.observe(1, false, FAST * 3, now), Some(0));
        let reason = &rollout.status().decisions[0].reason;
        assert!(reason.contains("3.00 times stable"), "{reason}");
    }

    #[test]
    fn a_policy_that_cannot_be_followed_is_refused() {
        for (steps, expected) in [
            (vec![5, 50], "the last step must be 100"),
            (vec![50, 25, 100], "steps must rise"),
            (vec![0, 100], "steps must rise"),
            (vec![], "the last step must be 100"),
            (vec![100], "at least one step before 100"),
        ] {
            let policy = RolloutPolicy { steps, ..policy() };
            let error = policy.check().unwrap_err().to_string();
            assert!(error.contains(expected), "{error}");
        }
        let policy = RolloutPolicy {
            max_latency_ratio: 0.5,
            ..policy()
        };
        assert!(policy.check().is_err());
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
