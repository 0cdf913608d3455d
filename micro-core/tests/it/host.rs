use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::Path;
use axum::routing::get;
use axum::Router;
use micro_core::health::HealthCheck;
use micro_core::host::{HostConfig, HostError, ServiceHost};
use micro_core::service::Service;
use tokio::sync::{oneshot, Notify};
use tower::BoxError;

use crate::support::{get as http_get, get_with, until_refused};

fn localhost() -> std::net::SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// A service whose routes and checks each test chooses.
struct TestService {
    name: &'static str,
    router: Router,
    checks: Vec<HealthCheck>,
    fail_start: bool,
    log: Option<Arc<Mutex<Vec<String>>>>,
}

impl TestService {
    fn new(name: &'static str, router: Router) -> Self {
        Self {
            name,
            router,
            checks: Vec::new(),
            fail_start: false,
            log: None,
        }
    }
}

impl Service for TestService {
    fn name(&self) -> &str {
        self.name
    }

    fn version(&self) -> &str {
        "1.2.3"
    }

    fn router(&self) -> Router {
        self.router.clone()
    }

    fn health_checks(&self) -> Vec<HealthCheck> {
        self.checks.clone()
    }

    async fn start(&self) -> Result<(), BoxError> {
        if self.fail_start {
            return Err("no database".into());
        }
        if let Some(log) = &self.log {
            log.lock().unwrap().push(format!("{}.start", self.name));
        }
        Ok(())
    }

    async fn stop(&self) -> Result<(), BoxError> {
        if let Some(log) = &self.log {
            log.lock().unwrap().push(format!("{}.stop", self.name));
        }
        Ok(())
    }
}

fn items() -> Router {
    Router::new().route(
        "/items/{id}",
        get(|Path(id): Path<u32>| async move { format!("item {id}") }),
    )
}

#[tokio::test]
async fn serves_routes_health_and_metrics() {
    let mut service = TestService::new("it-metrics", items());
    service.checks = vec![
        HealthCheck::new("database", || async { Ok(()) }),
        HealthCheck::new("cache", || async {
            Err::<(), BoxError>("cache down".into())
        })
        .critical(false),
    ];
    let running = ServiceHost::builder()
        .service(service, localhost())
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let addr = running.local_addr("it-metrics").unwrap();

    let reply = http_get(addr, "/items/7").await.unwrap();
    assert_eq!(reply.body, "item 7");
    assert_eq!(reply.headers["x-request-id"].len(), 32);
    let reply = get_with(addr, "/items/8", &[("x-request-id", "req-42")])
        .await
        .unwrap();
    assert_eq!(reply.headers["x-request-id"], "req-42");
    assert_eq!(http_get(addr, "/nowhere").await.unwrap().status, 404);

    let live = http_get(addr, "/health/live").await.unwrap();
    assert_eq!(live.status, 200);
    assert_eq!(live.json()["status"], "up");

    let ready = http_get(addr, "/health/ready").await.unwrap();
    assert_eq!(ready.status, 200, "{}", ready.body);
    let ready = ready.json();
    assert_eq!(ready["status"], "ready");
    assert_eq!(ready["version"], "1.2.3");
    assert_eq!(ready["checks"][0]["name"], "database");
    assert_eq!(ready["checks"][0]["status"], "pass");
    assert_eq!(ready["checks"][1]["status"], "fail");
    assert_eq!(ready["checks"][1]["critical"], false);
    assert_eq!(ready["checks"][1]["error"], "cache down");

    let metrics = http_get(addr, "/metrics").await.unwrap();
    assert_eq!(metrics.status, 200);
    let text = metrics.body;
    let requests = r#"http_server_requests_total{service="it-metrics",method="GET",route="/items/{id}",status="2xx"} 2"#;
    assert!(text.contains(requests), "{text}");
    let unmatched = r#"http_server_requests_total{service="it-metrics",method="GET",route="unmatched",status="4xx"} 1"#;
    assert!(text.contains(unmatched), "{text}");
    assert!(
        text.contains(r#"http_server_request_duration_seconds_bucket{service="it-metrics",method="GET",route="/items/{id}",status="2xx",le="0.005"}"#),
        "{text}"
    );
    assert!(
        text.contains(r#"http_server_requests_in_flight{service="it-metrics"} 0"#),
        "{text}"
    );
    assert!(
        text.contains(r#"micro_service_info{service="it-metrics",version="1.2.3"} 1"#),
        "{text}"
    );
    // The host's own endpoints are not counted as the service's traffic.
    assert!(!text.contains(r#"route="/health/ready""#), "{text}");

    running.shutdown_trigger().trigger();
}

#[tokio::test]
async fn an_admin_listener_takes_the_host_endpoints_off_the_public_port() {
    let config: HostConfig = figment::Figment::new()
        .merge(
            <figment::providers::Toml as figment::providers::Format>::string(
                "[listeners.it-admin]\nadmin = \"127.0.0.1:0\"\n",
            ),
        )
        .extract()
        .unwrap();
    let running = ServiceHost::builder()
        .config(config)
        .service(TestService::new("it-admin", items()), localhost())
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let public = running.local_addr("it-admin").unwrap();
    let admin = running.admin_addr("it-admin").unwrap();
    assert_ne!(public, admin);

    assert_eq!(http_get(public, "/items/1").await.unwrap().body, "item 1");
    for path in ["/health/live", "/health/ready", "/metrics"] {
        assert_eq!(http_get(public, path).await.unwrap().status, 404, "{path}");
        assert_eq!(http_get(admin, path).await.unwrap().status, 200, "{path}");
    }
    assert_eq!(http_get(admin, "/items/1").await.unwrap().status, 404);
    let metrics = http_get(admin, "/metrics").await.unwrap().body;
    assert!(
        metrics.contains(r#"http_server_requests_total{service="it-admin",method="GET",route="/items/{id}",status="2xx"} 1"#),
        "{metrics}"
    );
    assert_eq!(running.admin_addr("nobody"), None);

    // Both listeners close with the host.
    running.run_until(async {}).await;
    until_refused(public).await;
    until_refused(admin).await;
}

#[tokio::test]
async fn a_failing_critical_check_makes_the_service_unready() {
    let mut service = TestService::new("it-unready", items());
    service.checks = vec![
        HealthCheck::new("database", || async {
            Err::<(), BoxError>("refused".into())
        }),
        HealthCheck::new("slow", std::future::pending).timeout(Duration::from_millis(20)),
    ];
    let running = ServiceHost::builder()
        .service(service, localhost())
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let ready = http_get(running.local_addr("it-unready").unwrap(), "/health/ready")
        .await
        .unwrap();
    assert_eq!(ready.status, 503);
    let ready = ready.json();
    assert_eq!(ready["status"], "not_ready");
    assert_eq!(ready["checks"][0]["error"], "refused");
    assert_eq!(ready["checks"][1]["status"], "timeout");
}

#[tokio::test]
async fn runs_several_services_each_on_its_own_listener() {
    let orders = Router::new().route("/orders", get(|| async { "orders" }));
    let users = Router::new().route("/users", get(|| async { "users" }));
    let running = ServiceHost::builder()
        .service(TestService::new("it-orders", orders), localhost())
        .service(TestService::new("it-users", users), localhost())
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let orders = running.local_addr("it-orders").unwrap();
    let users = running.local_addr("it-users").unwrap();
    assert_ne!(orders, users);
    assert_eq!(http_get(orders, "/orders").await.unwrap().body, "orders");
    assert_eq!(http_get(orders, "/users").await.unwrap().status, 404);
    assert_eq!(http_get(users, "/users").await.unwrap().body, "users");
    assert_eq!(
        http_get(users, "/health/live").await.unwrap().json()["service"],
        "it-users"
    );
}

#[tokio::test]
async fn a_slow_request_in_flight_when_shutdown_begins_still_completes() {
    let entered = Arc::new(Notify::new());
    let release = Arc::new(Notify::new());
    let router = {
        let (entered, release) = (entered.clone(), release.clone());
        Router::new().route(
            "/slow",
            get(move || async move {
                entered.notify_one();
                release.notified().await;
                "finished"
            }),
        )
    };
    let (hook_running_tx, hook_running) = oneshot::channel();
    let (let_hook_finish, hook_may_finish) = oneshot::channel::<()>();
    let running = ServiceHost::builder()
        .service(TestService::new("it-drain", router), localhost())
        .before_drain("deregister", move || async move {
            hook_running_tx.send(()).unwrap();
            hook_may_finish.await?;
            Ok(())
        })
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let addr = running.local_addr("it-drain").unwrap();
    assert_eq!(http_get(addr, "/health/ready").await.unwrap().status, 200);

    let slow = tokio::spawn(http_get(addr, "/slow"));
    entered.notified().await;
    let trigger = running.shutdown_trigger();
    let host = tokio::spawn(running.run_until(std::future::pending()));
    trigger.trigger();

    // Readiness is off before the hooks run, while the listener still accepts.
    hook_running.await.unwrap();
    let ready = http_get(addr, "/health/ready").await.unwrap();
    assert_eq!(ready.status, 503);
    assert_eq!(ready.json()["status"], "shutting_down");
    let_hook_finish.send(()).unwrap();

    // Draining: no new connection is accepted, the one in flight goes on.
    until_refused(addr).await;
    assert!(!slow.is_finished());
    release.notify_one();
    let reply = slow.await.unwrap().unwrap();
    assert_eq!(reply.status, 200);
    assert_eq!(reply.body, "finished");

    let report = host.await.unwrap();
    assert_eq!(report.aborted_connections, 0);
    assert!(report.failed_hooks.is_empty(), "{:?}", report.failed_hooks);
}

#[tokio::test]
async fn requests_past_the_drain_deadline_are_cut_and_new_ones_refused() {
    let entered = Arc::new(Notify::new());
    let router = {
        let entered = entered.clone();
        Router::new().route(
            "/stuck",
            get(move || async move {
                entered.notify_one();
                std::future::pending::<()>().await;
            }),
        )
    };
    let config = HostConfig {
        drain_timeout: Duration::from_millis(200),
        ..HostConfig::default()
    };
    let running = ServiceHost::builder()
        .service(TestService::new("it-deadline", router), localhost())
        .config(config)
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let addr = running.local_addr("it-deadline").unwrap();
    let stuck = tokio::spawn(http_get(addr, "/stuck"));
    entered.notified().await;

    let trigger = running.shutdown_trigger();
    trigger.trigger();
    let report = running.run_until(std::future::pending()).await;
    assert_eq!(report.aborted_connections, 1);
    assert!(
        stuck.await.unwrap().is_err(),
        "the cut request got an answer"
    );
    assert!(
        http_get(addr, "/health/live").await.is_err(),
        "a request after the drain deadline was accepted"
    );
}

#[tokio::test]
async fn hooks_run_in_lifecycle_order() {
    let log = Arc::new(Mutex::new(Vec::new()));
    let mut first = TestService::new("it-first", items());
    first.log = Some(log.clone());
    let mut second = TestService::new("it-second", items());
    second.log = Some(log.clone());
    let entry = |name: &'static str| {
        let log = log.clone();
        move || async move {
            log.lock().unwrap().push(name.to_owned());
            Ok(())
        }
    };
    let running = ServiceHost::builder()
        .service(first, localhost())
        .service(second, localhost())
        .on_ready("register", entry("register"))
        .before_drain("deregister", entry("deregister"))
        .before_drain("stop-consumers", entry("stop-consumers"))
        .after_drain("flush-outbox", entry("flush-outbox"))
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let shutdown = running.shutdown_trigger();
    shutdown.trigger();
    running.run_until(std::future::pending()).await;
    assert_eq!(
        *log.lock().unwrap(),
        [
            "it-first.start",
            "it-second.start",
            "register",
            "deregister",
            "stop-consumers",
            "flush-outbox",
            "it-second.stop",
            "it-first.stop"
        ]
    );
}

#[tokio::test]
async fn a_stuck_shutdown_hook_is_reported_and_the_sequence_goes_on() {
    let config = HostConfig {
        hook_timeout: Duration::from_millis(50),
        ..HostConfig::default()
    };
    let running = ServiceHost::builder()
        .service(TestService::new("it-stuck-hook", items()), localhost())
        .config(config)
        .before_drain("stuck", std::future::pending)
        .after_drain("broken", || async { Err("flush failed".into()) })
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let addr = running.local_addr("it-stuck-hook").unwrap();
    running.shutdown_trigger().trigger();
    let report = running.run_until(std::future::pending()).await;
    assert_eq!(report.failed_hooks.len(), 2, "{:?}", report.failed_hooks);
    assert_eq!(report.failed_hooks[0].0, "stuck");
    assert!(report.failed_hooks[0].1.contains("timed out"));
    assert_eq!(
        report.failed_hooks[1],
        ("broken".to_owned(), "flush failed".to_owned())
    );
    until_refused(addr).await;
}

#[tokio::test]
async fn start_failures_are_typed_and_name_the_service() {
    let mut broken = TestService::new("it-broken", items());
    broken.fail_start = true;
    let error = ServiceHost::builder()
        .service(broken, localhost())
        .build()
        .unwrap()
        .start()
        .await
        .unwrap_err();
    assert!(
        matches!(&error, HostError::Start { service, .. } if service == "it-broken"),
        "{error}"
    );
    assert_eq!(
        std::error::Error::source(&error).unwrap().to_string(),
        "no database"
    );

    let error = ServiceHost::builder()
        .service(TestService::new("it-twice", items()), localhost())
        .service(TestService::new("it-twice", items()), localhost())
        .build()
        .unwrap_err();
    assert!(matches!(error, HostError::DuplicateService(ref name) if name == "it-twice"));

    let taken = tokio::net::TcpListener::bind(localhost()).await.unwrap();
    let addr = taken.local_addr().unwrap();
    let error = ServiceHost::builder()
        .service(TestService::new("it-taken", items()), addr)
        .build()
        .unwrap()
        .start()
        .await
        .unwrap_err();
    assert!(
        matches!(error, HostError::Bind { addr: a, .. } if a == addr),
        "{error}"
    );
}

#[tokio::test]
async fn a_failing_ready_hook_fails_start_and_closes_the_listeners() {
    let error = ServiceHost::builder()
        .service(TestService::new("it-register-fails", items()), localhost())
        .on_ready("register", || async { Err("registry unreachable".into()) })
        .build()
        .unwrap()
        .start()
        .await
        .unwrap_err();
    assert!(
        matches!(&error, HostError::Hook { hook, .. } if hook == "register"),
        "{error}"
    );
}

#[tokio::test]
async fn handlers_run_in_the_callers_trace() {
    let router = Router::new().route(
        "/trace",
        get(|| async {
            // What an outgoing call made from this handler would send.
            let mut outgoing = http::HeaderMap::new();
            micro_core::trace::inject_current(&mut outgoing);
            outgoing["traceparent"].to_str().unwrap().to_owned()
        }),
    );
    let running = ServiceHost::builder()
        .service(TestService::new("it-trace", router), localhost())
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let addr = running.local_addr("it-trace").unwrap();
    let incoming = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let reply = get_with(addr, "/trace", &[("traceparent", incoming)])
        .await
        .unwrap();
    let outgoing = micro_core::trace::TraceContext::parse(&reply.body).unwrap();
    assert_eq!(
        outgoing.trace_id().to_string(),
        "4bf92f3577b34da6a3ce929d0e0e4736"
    );
    assert_ne!(outgoing.span_id().to_string(), "00f067aa0ba902b7");

    let reply = http_get(addr, "/trace").await.unwrap();
    let fresh = micro_core::trace::TraceContext::parse(&reply.body).unwrap();
    assert_ne!(fresh.trace_id(), outgoing.trace_id());
}
