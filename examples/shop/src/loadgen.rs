//! `shop loadgen`: virtual users running weighted shopping journeys against the gateway.
//!
//! Each virtual user signs in (register and login for a JWT when the gateway has the
//! user routes, else the `x-user-id` header), then, until the run's duration is over,
//! picks a [`Journey`] at random by its weight and runs it: browsing, searching, cart
//! edits, checkouts that poll the order until it is final, and the failures the shop
//! must handle (a declined card, an out-of-stock item, a payment that times out). The
//! [`Report`] gives, per journey, how many ran, the throughput, latency percentiles and
//! the errors, split into expected ones (a `429`, stock running out under load) and
//! unexpected ones.
//!
//! The smoke mode ([`LoadgenConfig::smoke`]) runs every journey with a weight once and
//! fails on any unexpected error.
//!
//! ```no_run
//! # async fn example() -> anyhow::Result<()> {
//! let args = ["--users", "10", "--duration", "30s", "--target", "http://127.0.0.1:8080"];
//! let config = shop::loadgen::parse_args(args.iter().map(|a| a.to_string()))
//!     .map_err(anyhow::Error::msg)?;
//! let report = shop::loadgen::run(&config).await?;
//! println!("{report}");
//! # Ok(())
//! # }
//! ```

mod journey;
mod report;
mod user;

use std::collections::VecDeque;
use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use micro_core::client::HttpClient;

pub use self::journey::Journey;
use self::report::Recorder;
pub use self::report::{JourneyReport, Report};
use self::user::{AuthMode, VirtualUser};

/// How to use `shop loadgen`.
pub const USAGE: &str = "\
usage: shop loadgen [options]

  --target URL            the gateway (default http://127.0.0.1:8080)
  --users N               concurrent virtual users (default 10)
  --duration D            how long to run, as 30s, 500ms, 2m (default 30s)
  --seed N                seed of the journeys' random choices (default 1)
  --smoke                 run each journey once; fail on any unexpected error
  --weights J=W,...       journey weights, e.g. browse=5,payment-timeout=1
  --auth MODE             auto, jwt or header (default auto)
  --request-timeout D     bound on each request (default 10s)
  --order-timeout D       how long to wait for an order to be final (default 60s)
  --poll-interval D       between polls of a pending order (default 50ms)

journeys: browse, search, add-to-cart, edit-cart, view-cart, checkout, multi-checkout,
order-history, cancel, declined-card, out-of-stock, payment-timeout";

/// How often the smoke mode runs a journey again that met an expected error.
const SMOKE_RETRIES: usize = 5;

/// How the virtual users identify themselves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Auth {
    /// JWT when the gateway answers the login route, else the `x-user-id` header.
    #[default]
    Auto,
    /// Register and log in through `/api/users`, then send `Authorization: Bearer`.
    Jwt,
    /// Send the `x-user-id` header, for a system without sign-in; the shop's services
    /// refuse it (`401`), so against the shop this probes that no service believes a
    /// bare header.
    Header,
}

impl FromStr for Auth {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "jwt" => Ok(Self::Jwt),
            "header" => Ok(Self::Header),
            other => Err(format!("unknown auth mode `{other}` (auto, jwt or header)")),
        }
    }
}

/// The weight of each journey: how often a virtual user picks it, relative to the
/// others. A journey of weight 0 never runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Weights {
    weights: Vec<(Journey, u32)>,
}

impl Default for Weights {
    /// Mostly reads and cart edits, some checkouts, few failures; no payment timeouts
    /// (each takes as long as the payment service's hang).
    fn default() -> Self {
        use Journey::*;
        Self {
            weights: vec![
                (Browse, 20),
                (Search, 15),
                (AddToCart, 15),
                (EditCart, 10),
                (ViewCart, 15),
                (Checkout, 8),
                (MultiCheckout, 5),
                (OrderHistory, 6),
                (Cancel, 3),
                (DeclinedCard, 2),
                (OutOfStock, 1),
                (PaymentTimeout, 0),
            ],
        }
    }
}

impl Weights {
    /// Sets the weight of `journey`.
    pub fn set(&mut self, journey: Journey, weight: u32) -> &mut Self {
        match self.weights.iter_mut().find(|(j, _)| *j == journey) {
            Some(entry) => entry.1 = weight,
            None => self.weights.push((journey, weight)),
        }
        self
    }

    /// The weight of `journey`.
    pub fn get(&self, journey: Journey) -> u32 {
        self.weights
            .iter()
            .find(|(j, _)| *j == journey)
            .map_or(0, |(_, w)| *w)
    }

    /// The sum of the weights.
    pub fn total(&self) -> u64 {
        self.weights.iter().map(|(_, w)| u64::from(*w)).sum()
    }

    /// The journeys that run, those with a weight above 0.
    pub fn enabled(&self) -> impl Iterator<Item = Journey> + '_ {
        self.weights.iter().filter(|(_, w)| *w > 0).map(|(j, _)| *j)
    }

    /// The journey that `roll`, in `0..total()`, falls on: each journey owns a run of
    /// rolls as long as its weight. `None` when `roll` is out of range.
    pub fn choose(&self, roll: u64) -> Option<Journey> {
        let mut rest = roll;
        for (journey, weight) in &self.weights {
            let weight = u64::from(*weight);
            if rest < weight {
                return Some(*journey);
            }
            rest -= weight;
        }
        None
    }
}

/// What a load run does.
#[derive(Debug, Clone)]
pub struct LoadgenConfig {
    /// The gateway's base URL.
    pub target: String,
    /// Concurrent virtual users.
    pub users: usize,
    /// How long the users start new journeys.
    pub duration: Duration,
    /// Seed of the random choices; the same seed makes the same choices.
    pub seed: u64,
    /// Run every journey with a weight once, and fail on any unexpected error.
    pub smoke: bool,
    /// How often each journey is picked.
    pub weights: Weights,
    /// How the users identify themselves.
    pub auth: Auth,
    /// Bound on each request.
    pub request_timeout: Duration,
    /// How long a checkout waits for its order to be final.
    pub order_timeout: Duration,
    /// Between polls of a pending order.
    pub poll_interval: Duration,
}

impl Default for LoadgenConfig {
    fn default() -> Self {
        Self {
            target: "http://127.0.0.1:8080".to_owned(),
            users: 10,
            duration: Duration::from_secs(30),
            seed: 1,
            smoke: false,
            weights: Weights::default(),
            auth: Auth::Auto,
            request_timeout: Duration::from_secs(10),
            order_timeout: Duration::from_secs(60),
            poll_interval: Duration::from_millis(50),
        }
    }
}

/// Parses the arguments that follow `shop loadgen`; the error is a message for the
/// user (the [`USAGE`] for `--help`).
pub fn parse_args(args: impl Iterator<Item = String>) -> Result<LoadgenConfig, String> {
    let mut config = LoadgenConfig::default();
    let mut args = args.peekable();
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => (flag.to_owned(), Some(value)),
            _ => (arg.clone(), None),
        };
        let mut value = |name: &str| -> Result<String, String> {
            match inline {
                Some(v) => Ok(v.to_owned()),
                None => args
                    .next()
                    .ok_or_else(|| format!("{name} needs a value\n\n{USAGE}")),
            }
        };
        match flag.as_str() {
            "--target" | "--base-url" => config.target = value(&flag)?,
            "--users" => {
                config.users = parse_number(&flag, &value(&flag)?)?;
                if config.users == 0 {
                    return Err("--users must be at least 1".to_owned());
                }
            }
            "--duration" => config.duration = parse_duration(&value(&flag)?)?,
            "--seed" => config.seed = parse_number(&flag, &value(&flag)?)?,
            "--smoke" => config.smoke = true,
            "--weights" => {
                for pair in value(&flag)?.split(',').filter(|p| !p.is_empty()) {
                    let (name, weight) = pair
                        .split_once('=')
                        .ok_or_else(|| format!("a weight is `journey=n`, not `{pair}`"))?;
                    let journey: Journey = name.trim().parse()?;
                    config
                        .weights
                        .set(journey, parse_number(name, weight.trim())?);
                }
            }
            "--auth" => config.auth = value(&flag)?.parse()?,
            "--request-timeout" => config.request_timeout = parse_duration(&value(&flag)?)?,
            "--order-timeout" => config.order_timeout = parse_duration(&value(&flag)?)?,
            "--poll-interval" => config.poll_interval = parse_duration(&value(&flag)?)?,
            "-h" | "--help" => return Err(USAGE.to_owned()),
            other => return Err(format!("unknown argument `{other}`\n\n{USAGE}")),
        }
    }
    if config.weights.total() == 0 {
        return Err("every journey has weight 0: nothing would run".to_owned());
    }
    Ok(config)
}

fn parse_number<T: FromStr>(name: &str, value: &str) -> Result<T, String> {
    value
        .parse()
        .map_err(|_| format!("{name}: `{value}` is not a valid number"))
}

/// Parses `30s`, `500ms`, `2m`, `1h`, or a number of seconds.
fn parse_duration(value: &str) -> Result<Duration, String> {
    let split = value
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(value.len());
    let (number, unit) = value.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("`{value}` is not a duration like 30s, 500ms or 2m"))?;
    let seconds = match unit {
        "ms" => number / 1000.0,
        "" | "s" => number,
        "m" => number * 60.0,
        "h" => number * 3600.0,
        _ => return Err(format!("`{value}`: the unit is ms, s, m or h")),
    };
    Duration::try_from_secs_f64(seconds).map_err(|_| format!("`{value}` is out of range"))
}

/// A small deterministic random generator (SplitMix64): the same seed, the same run of
/// choices. The load generator's, and the fault run's in the shop's tests.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// The generator for `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next number.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n`; `n` is above 0.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// A number in `low..=high`.
    pub(crate) fn between(&mut self, low: i64, high: i64) -> i64 {
        low + self.below((high - low + 1) as u64) as i64
    }

    pub(crate) fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

/// What the virtual users run: journeys picked by weight until the deadline, or, in
/// the smoke mode, each journey of a shared queue once.
enum Plan {
    Until(Instant),
    Queue(Mutex<VecDeque<Journey>>),
}

impl Plan {
    fn next(&self, rng: &mut Rng, weights: &Weights) -> Option<Journey> {
        match self {
            Plan::Until(deadline) => {
                if Instant::now() >= *deadline {
                    return None;
                }
                weights.choose(rng.below(weights.total()))
            }
            Plan::Queue(queue) => queue.lock().expect("the queue lock").pop_front(),
        }
    }
}

impl fmt::Debug for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Plan::Until(deadline) => f.debug_tuple("Until").field(deadline).finish(),
            Plan::Queue(_) => f.write_str("Queue"),
        }
    }
}

/// Runs the load and reports on it. In the smoke mode, fails when a journey met an
/// unexpected error or did not run.
pub async fn run(config: &LoadgenConfig) -> anyhow::Result<Report> {
    anyhow::ensure!(config.users > 0, "at least one virtual user is needed");
    anyhow::ensure!(
        config.weights.total() > 0,
        "every journey has weight 0: nothing would run"
    );
    let client = HttpClient::builder(&config.target)
        .timeout(config.request_timeout)
        .build()
        .with_context(|| format!("the target `{}` is not a usable URL", config.target))?;
    let auth = match config.auth {
        Auth::Header => AuthMode::Header,
        Auth::Jwt => AuthMode::Jwt,
        Auth::Auto => AuthMode::detect(&client).await?,
    };
    let enabled: Vec<Journey> = config.weights.enabled().collect();
    let (plan, users) = if config.smoke {
        let queue: VecDeque<Journey> = enabled.iter().copied().collect();
        (
            Plan::Queue(Mutex::new(queue)),
            config.users.min(enabled.len()),
        )
    } else {
        (Plan::Until(Instant::now() + config.duration), config.users)
    };
    let plan = Arc::new(plan);
    // A smoke run wants each journey to have run through, not to have met a 429.
    let retries = if config.smoke { SMOKE_RETRIES } else { 0 };
    let config = Arc::new(config.clone());
    // Names must not clash with an earlier run against the same (persistent) shop.
    let run_id = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();

    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for index in 0..users {
        let user = VirtualUser::new(
            client.clone(),
            config.clone(),
            auth,
            format!("loadgen-{run_id}-{index}"),
            Rng::new(config.seed ^ (index as u64).wrapping_mul(0x2545_f491_4f6c_dd1d)),
        );
        let plan = plan.clone();
        let weights = config.weights.clone();
        tasks.spawn(async move {
            let mut recorder = Recorder::default();
            user.run(&mut recorder, retries, |rng| plan.next(rng, &weights))
                .await;
            recorder
        });
    }
    let mut recorder = Recorder::default();
    while let Some(done) = tasks.join_next().await {
        recorder.merge(done.context("a virtual user panicked")?);
    }
    let report = recorder.report(started.elapsed(), users, auth.name());

    if config.smoke {
        let missing: Vec<&str> = enabled
            .iter()
            .filter(|j| report.journey(**j).is_none_or(|r| r.count == 0))
            .map(|j| j.name())
            .collect();
        anyhow::ensure!(
            report.unexpected_errors() == 0 && missing.is_empty(),
            "the smoke run failed: {} unexpected errors{}\n{report}",
            report.unexpected_errors(),
            if missing.is_empty() {
                String::new()
            } else {
                format!(", journeys that did not run: {}", missing.join(", "))
            }
        );
    }
    Ok(report)
}

/// `shop loadgen`: parses the arguments that follow `loadgen`, runs, and prints the
/// report; an error for bad arguments or a failed smoke run.
pub async fn cli(args: impl Iterator<Item = String>) -> anyhow::Result<()> {
    let config = parse_args(args).map_err(anyhow::Error::msg)?;
    let mode = if config.smoke {
        "a smoke run".to_owned()
    } else {
        format!("{} users for {:?}", config.users, config.duration)
    };
    println!("loadgen: {mode} against {}", config.target);
    let report = run(&config).await?;
    print!("{report}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(line: &str) -> impl Iterator<Item = String> + '_ {
        line.split_whitespace().map(str::to_owned)
    }

    #[test]
    fn the_arguments_set_the_config() {
        let config = parse_args(args(
            "--users 3 --duration 1500ms --target http://127.0.0.1:9 --smoke --seed 7 \
             --weights browse=0,payment-timeout=2 --auth=header --poll-interval 10ms",
        ))
        .unwrap();
        assert_eq!(config.users, 3);
        assert_eq!(config.duration, Duration::from_millis(1500));
        assert_eq!(config.target, "http://127.0.0.1:9");
        assert!(config.smoke);
        assert_eq!(config.seed, 7);
        assert_eq!(config.weights.get(Journey::Browse), 0);
        assert_eq!(config.weights.get(Journey::PaymentTimeout), 2);
        assert_eq!(
            config.weights.get(Journey::Search),
            15,
            "others keep theirs"
        );
        assert_eq!(config.auth, Auth::Header);
        assert_eq!(config.poll_interval, Duration::from_millis(10));

        let defaults = parse_args(args("")).unwrap();
        assert_eq!(defaults.users, LoadgenConfig::default().users);
        assert!(!defaults.smoke);
        assert_eq!(defaults.weights.get(Journey::PaymentTimeout), 0);
    }

    #[test]
    fn bad_arguments_are_refused_with_a_reason() {
        for (line, needle) in [
            ("--users", "needs a value"),
            ("--users 0", "at least 1"),
            ("--users many", "not a valid number"),
            ("--duration 3 weeks", "unknown argument"),
            ("--duration 3w", "unit"),
            ("--weights browse", "journey=n"),
            ("--weights teleport=3", "unknown journey"),
            ("--auth basic", "unknown auth mode"),
            ("--frobnicate", "unknown argument"),
            ("--help", "usage: shop loadgen"),
        ] {
            let error = parse_args(args(line)).unwrap_err();
            assert!(error.contains(needle), "{line}: {error}");
        }
        let none = Journey::ALL
            .iter()
            .map(|j| format!("{}=0", j.name()))
            .collect::<Vec<_>>()
            .join(",");
        let error = parse_args(["--weights".to_owned(), none].into_iter()).unwrap_err();
        assert!(error.contains("nothing would run"), "{error}");
    }

    #[test]
    fn durations_take_units() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("s").is_err());
    }

    #[test]
    fn each_journey_is_chosen_as_often_as_its_weight_says() {
        let mut weights = Weights::default();
        weights
            .set(Journey::PaymentTimeout, 2)
            .set(Journey::Browse, 0);
        let total = weights.total();
        let mut seen = std::collections::BTreeMap::new();
        for roll in 0..total {
            *seen.entry(weights.choose(roll).unwrap()).or_insert(0u32) += 1;
        }
        for journey in Journey::ALL {
            assert_eq!(
                seen.get(journey).copied().unwrap_or(0),
                weights.get(*journey),
                "{journey:?}"
            );
        }
        assert_eq!(weights.choose(total), None);

        // Random rolls land on every enabled journey and never on a disabled one.
        let mut rng = Rng::new(42);
        let mut hit = std::collections::BTreeSet::new();
        for _ in 0..10_000 {
            hit.insert(weights.choose(rng.below(total)).unwrap());
        }
        let enabled: std::collections::BTreeSet<Journey> = weights.enabled().collect();
        assert_eq!(hit, enabled);
        assert!(!hit.contains(&Journey::Browse));
    }

    #[test]
    fn the_same_seed_makes_the_same_choices() {
        let draw = |seed| {
            let mut rng = Rng::new(seed);
            (0..32).map(|_| rng.below(1000)).collect::<Vec<_>>()
        };
        assert_eq!(draw(9), draw(9));
        assert_ne!(draw(9), draw(10));
    }
}
