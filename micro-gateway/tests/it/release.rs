//! Releases: a service's traffic split between the versions its instances registered,
//! from the declarative file: weights, sticky users, forced subsets, and a blue-green
//! switch by reload under load with no failed request.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::routing::get;
use axum::Router;
use micro_discovery::memory::MemoryRegistry;
use micro_discovery::{Instance, Registration, Registry};
use micro_gateway::config::{DeclarativeConfig, Resources};
use micro_gateway::reload::Reloadable;

use crate::support::{gateway, send, serve_counting};

/// An instance of `product-service` running `version`, answering `GET /v1/whoami` with
/// its version (after `delay`, for requests in flight across a switch).
async fn instance(registry: &MemoryRegistry, id: &str, version: &'static str, delay: Duration) {
    let app = Router::new()
        .route(
            "/v1/whoami",
            get(
                |State((version, delay)): State<(&'static str, Duration)>| async move {
                    tokio::time::sleep(delay).await;
                    version
                },
            ),
        )
        .with_state((version, delay));
    serve_as(registry, id, version, app).await;
}

/// Serves `app` and registers it as the instance `id` of `product-service` at `version`.
async fn serve_as(registry: &MemoryRegistry, id: &str, version: &str, app: Router) {
    let upstream = serve_counting(app).await;
    let instance = Instance::new("product-service", id, "127.0.0.1", upstream.addr.port())
        .with_version(version);
    registry
        .register(&Registration::new(instance))
        .await
        .unwrap();
}

fn config(release: &str) -> DeclarativeConfig {
    let yaml = format!(
        r#"
_format_version: "3.0"
services:
  - name: product
    discovery: product-service
    path: /v1
    release:
{release}
    routes:
      - paths: [/api]
"#
    );
    DeclarativeConfig::from_yaml(&yaml).unwrap()
}

async fn whoami(
    addr: std::net::SocketAddr,
    headers: &[(&str, &str)],
) -> (u16, String, Option<String>) {
    let mut request = http::Request::get("/api/whoami");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let (status, headers, body) = send(addr, request.body(Body::empty()).unwrap()).await;
    let cookie = headers
        .get(http::header::SET_COOKIE)
        .map(|v| v.to_str().unwrap().to_owned());
    (
        status.as_u16(),
        String::from_utf8_lossy(&body).into_owned(),
        cookie,
    )
}

async fn two_versions() -> MemoryRegistry {
    let registry = MemoryRegistry::new();
    instance(&registry, "stable-1", "1.0", Duration::ZERO).await;
    instance(&registry, "stable-2", "1.0", Duration::ZERO).await;
    instance(&registry, "canary-1", "2.0", Duration::ZERO).await;
    registry
}

fn resources(registry: &MemoryRegistry) -> Resources {
    Resources::new().discover(Arc::new(registry.clone()))
}

#[tokio::test]
async fn weights_split_the_traffic_between_versions() {
    let registry = two_versions().await;
    let release = r#"      subsets:
        - {name: stable, version: "1.0", weight: 80}
        - {name: canary, version: "2.0", weight: 20}"#;
    let built = config(release).build_with(&resources(&registry)).unwrap();
    let (_host, addr) = gateway(built.into_router()).await;

    let mut seen = BTreeMap::<String, usize>::new();
    for _ in 0..500 {
        let (status, version, _) = whoami(addr, &[]).await;
        assert_eq!(status, 200);
        *seen.entry(version).or_default() += 1;
    }
    let canary = seen.get("2.0").copied().unwrap_or(0);
    assert_eq!(seen.values().sum::<usize>(), 500, "{seen:?}");
    // 20% of 500 is 100; a binomial spread of ±45 is over five standard deviations.
    assert!((55..=145).contains(&canary), "{seen:?}");
}

#[tokio::test]
async fn a_sticky_user_stays_on_one_version_and_a_forced_one_goes_where_told() {
    let registry = two_versions().await;
    let release = r#"      subsets:
        - {name: stable, version: "1.0", weight: 50}
        - {name: canary, version: "2.0", weight: 50}
      sticky: {header: x-session}
      force: {header: x-micro-subset, cookie: micro-subset-force}"#;
    let built = config(release).build_with(&resources(&registry)).unwrap();
    let (_host, addr) = gateway(built.into_router()).await;

    let mut versions = BTreeMap::<String, usize>::new();
    for session in 0..40 {
        let session = format!("session-{session}");
        let (_, first, _) = whoami(addr, &[("x-session", &session)]).await;
        for _ in 0..5 {
            let (status, again, _) = whoami(addr, &[("x-session", &session)]).await;
            assert_eq!((status, &again), (200, &first), "{session} flipped");
        }
        *versions.entry(first).or_default() += 1;
    }
    // Both versions get sessions (each has half the points).
    assert_eq!(versions.len(), 2, "{versions:?}");

    for _ in 0..10 {
        let (_, version, _) = whoami(addr, &[("x-micro-subset", "canary")]).await;
        assert_eq!(version, "2.0");
        let (_, version, _) = whoami(addr, &[("cookie", "micro-subset-force=stable")]).await;
        assert_eq!(version, "1.0");
    }
    // An unknown subset is not an error: the request is split as usual.
    let (status, _, _) = whoami(addr, &[("x-micro-subset", "nightly")]).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn a_remembered_subset_holds_until_its_weight_goes_to_zero() {
    let registry = two_versions().await;
    let release = |canary: u32| {
        format!(
            r#"      subsets:
        - {{name: stable, version: "1.0", weight: {}}}
        - {{name: canary, version: "2.0", weight: {canary}}}
      remember: {{cookie: micro-subset, lifetime: 30m}}"#,
            100 - canary
        )
    };
    let built = config(&release(50))
        .build_with(&resources(&registry))
        .unwrap();
    let reloadable = Reloadable::new(built);
    let (_host, addr) = gateway(reloadable.clone().into_router()).await;

    let (_, version, cookie) = whoami(addr, &[]).await;
    let cookie = cookie.expect("a weighted choice is remembered");
    assert!(cookie.contains("Max-Age=1800"), "{cookie}");
    let subset = if version == "2.0" { "canary" } else { "stable" };
    assert!(
        cookie.starts_with(&format!("micro-subset={subset};")),
        "{cookie}"
    );
    let sent = format!("micro-subset={subset}");
    for _ in 0..20 {
        let (_, again, set) = whoami(addr, &[("cookie", &sent)]).await;
        assert_eq!(again, version);
        assert_eq!(set, None, "a remembered choice sets no new cookie");
    }

    // Its subset's weight goes to 0: the cookie no longer holds.
    let (weight, expected) = if subset == "canary" {
        (0, "1.0")
    } else {
        (100, "2.0")
    };
    reloadable.replace(
        config(&release(weight))
            .build_with(&resources(&registry))
            .unwrap(),
    );
    for _ in 0..20 {
        let (_, now, _) = whoami(addr, &[("cookie", &sent)]).await;
        assert_eq!(now, expected);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blue_green_switch_under_load_fails_no_request() {
    let registry = MemoryRegistry::new();
    // Slow enough that requests are in flight on blue when the switch comes.
    instance(&registry, "blue-1", "blue", Duration::from_millis(20)).await;
    instance(&registry, "green-1", "green", Duration::from_millis(20)).await;
    let release = |blue: u32, green: u32| {
        format!(
            r#"      subsets:
        - {{name: blue, version: blue, weight: {blue}}}
        - {{name: green, version: green, weight: {green}}}"#
        )
    };
    let reloadable = Reloadable::new(
        config(&release(100, 0))
            .build_with(&resources(&registry))
            .unwrap(),
    );
    let (_host, addr) = gateway(reloadable.clone().into_router()).await;

    let switched = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for _ in 0..16 {
        let (switched, failures) = (switched.clone(), failures.clone());
        clients.push(tokio::spawn(async move {
            // (version answered, whether the request was sent after the switch)
            let mut answers = Vec::new();
            for _ in 0..30 {
                let after = switched.load(Ordering::SeqCst);
                let (status, version, _) = whoami(addr, &[]).await;
                if status != 200 {
                    failures.fetch_add(1, Ordering::SeqCst);
                }
                answers.push((version, after));
            }
            answers
        }));
    }
    tokio::time::sleep(Duration::from_millis(150)).await;
    reloadable.replace(
        config(&release(0, 100))
            .build_with(&resources(&registry))
            .unwrap(),
    );
    switched.store(true, Ordering::SeqCst);

    let mut before = BTreeMap::<String, usize>::new();
    let mut after = BTreeMap::<String, usize>::new();
    for client in clients {
        for (version, sent_after) in client.await.unwrap() {
            let tally = if sent_after { &mut after } else { &mut before };
            *tally.entry(version).or_default() += 1;
        }
    }
    assert_eq!(
        failures.load(Ordering::SeqCst),
        0,
        "before {before:?}, after {after:?}"
    );
    assert!(before.get("blue").copied().unwrap_or(0) > 0, "{before:?}");
    // Every request sent after the switch went to green.
    assert_eq!(after.keys().collect::<Vec<_>>(), ["green"], "{after:?}");
}

#[test]
fn a_release_the_gateway_cannot_honour_is_refused_with_its_place() {
    let registry = MemoryRegistry::new();
    let cases = [
        (
            r#"      subsets:
        - {name: a, version: "1", weight: 0}
        - {name: b, version: "2", weight: 0}"#,
            "services[0].release.subsets: every subset's weight is 0",
        ),
        (
            r#"      subsets:
        - {name: a, version: "1", weight: 1}
        - {name: a, version: "2", weight: 1}"#,
            "services[0].release.subsets: two subsets are named `a`",
        ),
        (
            r#"      subsets: []"#,
            "services[0].release.subsets: a split needs at least one subset",
        ),
        (
            r#"      subsets: [{name: a, version: "1", weight: 1}]
      sticky: {header: "bad header"}"#,
            "services[0].release.sticky.header: `bad header` is not a header name",
        ),
        (
            r#"      subsets: [{name: a, version: "1", weight: 1}]
      remember: {cookie: "a=b", lifetime: 1h}"#,
            "services[0].release: `a=b` is not a cookie name",
        ),
    ];
    for (release, expected) in cases {
        let error = config(release)
            .build_with(&resources(&registry))
            .unwrap_err()
            .to_string();
        assert!(error.contains(expected), "{expected}: {error}");
    }

    let fixed = r#"
services:
  - name: product
    url: http://127.0.0.1:1
    release:
      subsets: [{name: a, version: "1", weight: 1}]
    routes: [{paths: [/api]}]
"#;
    let error = DeclarativeConfig::from_yaml(fixed)
        .unwrap()
        .build()
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("services[0].release: `release` splits"),
        "{error}"
    );

    let unknown = r#"
services:
  - name: product
    discovery: product-service
    release:
      subsets: [{name: a, version: "1", weight: 1, canary: true}]
    routes: [{paths: [/api]}]
"#;
    let error = DeclarativeConfig::from_yaml(unknown)
        .unwrap_err()
        .to_string();
    assert!(error.contains("services[0].release.subsets[0]"), "{error}");

    for sticky in ["sticky: session", "sticky: {header: x-a, cookie: b}"] {
        let yaml = format!(
            "services:\n  - name: p\n    discovery: p\n    release:\n      subsets: \
             [{{name: a, version: \"1\", weight: 1}}]\n      {sticky}\n    routes: [{{paths: [/a]}}]\n"
        );
        let error = DeclarativeConfig::from_yaml(&yaml).unwrap_err().to_string();
        assert!(
            error.contains("services[0].release.sticky"),
            "{sticky}: {error}"
        );
    }
}

#[tokio::test]
async fn the_token_subject_keeps_a_user_on_one_subset() {
    use micro_gateway::plugins::jwt::VerifiedClaims;
    use micro_gateway::proxy::{Proxy, ProxyConfig};
    use micro_gateway::release::{Split, StickyKey};
    use tower::ServiceExt as _;

    let registry = two_versions().await;
    let discover: Arc<dyn micro_discovery::Discover> = Arc::new(registry.clone());
    let subset = |version: &str| {
        let only = micro_discovery::subset::VersionSubset::new(discover.clone(), version);
        Proxy::discovered(
            Arc::new(only),
            "product-service",
            "/v1",
            Default::default(),
            ProxyConfig::new(),
        )
    };
    let split = Split::builder("product-service")
        .subset("stable", subset("1.0"), 50)
        .subset("canary", subset("2.0"), 50)
        .sticky(StickyKey::Subject)
        .build()
        .unwrap();
    let call = |user: String| {
        let split = split.clone();
        async move {
            let mut claims = serde_json::Map::new();
            claims.insert("sub".to_owned(), user.into());
            let mut request = http::Request::get("/whoami").body(Body::empty()).unwrap();
            request.extensions_mut().insert(VerifiedClaims::new(claims));
            let response = split.oneshot(request).await.unwrap();
            let body = axum::body::to_bytes(response.into_body(), 1024)
                .await
                .unwrap();
            String::from_utf8(body.to_vec()).unwrap()
        }
    };
    let mut versions = BTreeMap::<String, usize>::new();
    for user in 0..30 {
        let first = call(format!("user-{user}")).await;
        for _ in 0..3 {
            assert_eq!(
                call(format!("user-{user}")).await,
                first,
                "user-{user} flipped"
            );
        }
        *versions.entry(first).or_default() += 1;
    }
    assert_eq!(versions.len(), 2, "{versions:?}");

    // Weights set in code apply to every clone at once; unknown names are refused.
    split
        .set_weights(&[("stable", 0), ("canary", 100)])
        .unwrap();
    assert_eq!(call("user-0".to_owned()).await, "2.0");
    assert!(split.set_weights(&[("nightly", 1)]).is_err());
    assert!(split.set_weights(&[("canary", 0)]).is_err());
    assert_eq!(
        split.weights(),
        [("stable".to_owned(), 0), ("canary".to_owned(), 100)]
    );
}

/// An instance of `product-service` at `version` that answers 500 to one request in
/// `fail_one_in` (never, for 0).
async fn flaky_instance(
    registry: &MemoryRegistry,
    id: &str,
    version: &'static str,
    fail_one_in: usize,
) {
    let count = Arc::new(AtomicUsize::new(0));
    let app = Router::new().route(
        "/v1/whoami",
        get(move || {
            let count = count.clone();
            async move {
                let n = count.fetch_add(1, Ordering::SeqCst) + 1;
                if fail_one_in > 0 && n.is_multiple_of(fail_one_in) {
                    (http::StatusCode::INTERNAL_SERVER_ERROR, version)
                } else {
                    (http::StatusCode::OK, version)
                }
            }
        }),
    );
    serve_as(registry, id, version, app).await;
}

fn rollout_release(step_time: &str) -> String {
    format!(
        r#"      subsets:
        - {{name: stable, version: "1.0", weight: 100}}
        - {{name: canary, version: "2.0", weight: 0}}
      rollout:
        stable: stable
        canary: canary
        steps: [20, 50, 100]
        step_time: {step_time}
        step_requests: 20
        max_error_rate: 0.05
        max_latency_ratio: 20"#
    )
}

#[tokio::test]
async fn a_canary_failing_one_request_in_five_is_rolled_back_and_stays_back_across_a_reload() {
    let registry = MemoryRegistry::new();
    flaky_instance(&registry, "stable-1", "1.0", 0).await;
    flaky_instance(&registry, "canary-1", "2.0", 5).await;
    let resources = resources(&registry);
    let reloadable = Reloadable::new(
        config(&rollout_release("1s"))
            .build_with(&resources)
            .unwrap(),
    );
    let (_host, addr) = gateway(reloadable.clone().into_router()).await;

    let mut failed = 0;
    let mut canary_after = None;
    for i in 0..600 {
        let (status, version, _) = whoami(addr, &[]).await;
        if status != 200 {
            failed += 1;
        }
        if i >= 500 {
            *canary_after.get_or_insert(0) += usize::from(version == "2.0");
        }
    }
    // Rolled back after the first step's 20 canary answers: at most their one in five
    // failed, 4 (and none once rolled back).
    assert!(failed <= 4, "{failed} user requests failed");
    assert_eq!(canary_after, Some(0), "the canary still gets requests");

    // A reload with the same rollout keeps it rolled back.
    reloadable.replace(
        config(&rollout_release("1s"))
            .build_with(&resources)
            .unwrap(),
    );
    for _ in 0..100 {
        let (status, version, _) = whoami(addr, &[]).await;
        assert_eq!((status, version.as_str()), (200, "1.0"));
    }
}

#[tokio::test]
async fn a_healthy_canary_reaches_all_the_traffic() {
    let registry = MemoryRegistry::new();
    flaky_instance(&registry, "stable-1", "1.0", 0).await;
    flaky_instance(&registry, "canary-1", "2.0", 0).await;
    let built = config(&rollout_release("200ms"))
        .build_with(&resources(&registry))
        .unwrap();
    let (_host, addr) = gateway(built.into_router()).await;

    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut last_canary_run = 0;
    while last_canary_run < 50 {
        assert!(
            std::time::Instant::now() < deadline,
            "the canary never reached 100%"
        );
        let (status, version, _) = whoami(addr, &[]).await;
        assert_eq!(status, 200);
        last_canary_run = if version == "2.0" {
            last_canary_run + 1
        } else {
            0
        };
    }
}
