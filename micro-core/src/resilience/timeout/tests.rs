use std::io;
use std::time::Duration;

use tokio::time::Instant;
use tower::{service_fn, ServiceExt};
use tower_layer::Layer;

use super::*;
use crate::error::is_retryable;

fn sleepy(delay: Duration) -> impl Service<(), Response = &'static str, Error = io::Error> + Clone {
    service_fn(move |()| async move {
        tokio::time::sleep(delay).await;
        Ok::<_, io::Error>("done")
    })
}

#[tokio::test(start_paused = true)]
async fn a_slow_call_fails_with_elapsed_at_the_deadline() {
    let start = Instant::now();
    let svc = Timeout::new(sleepy(Duration::from_secs(5)), Duration::from_secs(1));

    let err = svc.oneshot(()).await.unwrap_err();

    assert_eq!(start.elapsed(), Duration::from_secs(1));
    let elapsed = err.downcast_ref::<Elapsed>().expect("an Elapsed error");
    assert_eq!(elapsed.timeout(), Duration::from_secs(1));
    assert_eq!(err.to_string(), "request timed out after 1s");
    assert!(is_retryable(&*err));
}

#[tokio::test(start_paused = true)]
async fn a_fast_call_passes_through() {
    let start = Instant::now();
    let svc = TimeoutLayer::new(Duration::from_secs(1)).layer(sleepy(Duration::from_millis(300)));

    assert_eq!(svc.oneshot(()).await.unwrap(), "done");
    assert_eq!(start.elapsed(), Duration::from_millis(300));
}

#[tokio::test(start_paused = true)]
async fn inner_errors_pass_through_boxed() {
    let failing = service_fn(|()| async {
        Err::<(), _>(io::Error::new(io::ErrorKind::NotFound, "no such order"))
    });
    let svc = Timeout::new(failing, Duration::from_secs(1));

    let err = svc.oneshot(()).await.unwrap_err();

    let io = err
        .downcast_ref::<io::Error>()
        .expect("the inner io::Error");
    assert_eq!(io.kind(), io::ErrorKind::NotFound);
}

#[test]
fn accessors_reach_the_inner_service() {
    let mut svc = Timeout::new(7_u8, Duration::from_millis(10));
    assert_eq!(svc.timeout(), Duration::from_millis(10));
    *svc.get_mut() += 1;
    assert_eq!(*svc.get_ref(), 8);
    assert_eq!(svc.clone().into_inner(), 8);
}
