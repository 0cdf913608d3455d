use std::future::Future;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tower::util::BoxCloneService;
use tower::{service_fn, ServiceExt};
use tower_layer::Layer;

use super::*;
use crate::error::is_retryable;

type Started = Arc<Mutex<Vec<u32>>>;
type Request = (u32, oneshot::Receiver<()>);

/// A backend whose calls record their id when they start and finish when released.
fn backend() -> (BoxCloneService<Request, u32, io::Error>, Started) {
    let started = Started::default();
    let seen = started.clone();
    let service = service_fn(move |(id, release): Request| {
        seen.lock().unwrap().push(id);
        async move {
            let _ = release.await;
            Ok::<_, io::Error>(id)
        }
    });
    (BoxCloneService::new(service), started)
}

fn spawn<S>(
    bulkhead: &mut Bulkhead<S>,
    id: u32,
) -> (oneshot::Sender<()>, JoinHandle<Result<u32, BoxError>>)
where
    S: Service<Request, Response = u32> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send,
{
    let (release, request) = oneshot::channel();
    let future = bulkhead.call((id, request));
    (release, tokio::spawn(future))
}

/// Awaits `future`, failing the test if it is still pending after a minute of paused
/// time.
async fn within<F: Future>(future: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(60), future)
        .await
        .expect("still pending after a minute")
}

/// Lets every runnable task run: the paused clock only moves once all are idle.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(1)).await;
}

fn started(started: &Started) -> Vec<u32> {
    started.lock().unwrap().clone()
}

#[tokio::test(start_paused = true)]
async fn it_admits_the_limit_queues_the_next_and_rejects_the_rest() {
    let (backend, log) = backend();
    let mut bulkhead = Bulkhead::new(
        backend,
        BulkheadConfig::new().max_concurrent(2).max_queued(1),
    );

    let (release1, first) = spawn(&mut bulkhead, 1);
    let (release2, second) = spawn(&mut bulkhead, 2);
    let (release3, third) = spawn(&mut bulkhead, 3);
    let (_release4, fourth) = spawn(&mut bulkhead, 4);
    settle().await;

    let err = within(fourth).await.unwrap().unwrap_err();
    assert!(err.is::<BulkheadFull>());
    assert_eq!(err.to_string(), "bulkhead is full");
    assert!(is_retryable(&*err));
    assert_eq!(started(&log), [1, 2]);
    assert_eq!((bulkhead.in_flight(), bulkhead.queued()), (2, 1));

    release1.send(()).unwrap();
    assert_eq!(within(first).await.unwrap().unwrap(), 1);
    settle().await;
    assert_eq!(started(&log), [1, 2, 3]);
    assert_eq!((bulkhead.in_flight(), bulkhead.queued()), (2, 0));

    let (release5, fifth) = spawn(&mut bulkhead, 5);
    assert_eq!(bulkhead.queued(), 1, "the queue has room again");
    for release in [release2, release3, release5] {
        release.send(()).unwrap();
    }
    for (call, id) in [(second, 2), (third, 3), (fifth, 5)] {
        assert_eq!(within(call).await.unwrap().unwrap(), id);
    }
    assert_eq!((bulkhead.in_flight(), bulkhead.queued()), (0, 0));
}

#[tokio::test(start_paused = true)]
async fn queued_calls_start_in_arrival_order() {
    let (backend, log) = backend();
    let mut bulkhead =
        BulkheadLayer::new(BulkheadConfig::new().max_concurrent(1).max_queued(3)).layer(backend);

    let mut releases = Vec::new();
    let mut calls = Vec::new();
    for id in 1..=4 {
        let (release, call) = spawn(&mut bulkhead, id);
        releases.push(release);
        calls.push(call);
    }
    for release in releases {
        settle().await;
        release.send(()).unwrap();
    }
    for call in calls {
        within(call).await.unwrap().unwrap();
    }
    assert_eq!(started(&log), [1, 2, 3, 4]);
}

#[tokio::test(start_paused = true)]
async fn a_dropped_queued_call_gives_its_place_back() {
    let (backend, log) = backend();
    let mut bulkhead = Bulkhead::new(
        backend,
        BulkheadConfig::new().max_concurrent(1).max_queued(1),
    );

    let (release1, first) = spawn(&mut bulkhead, 1);
    let (_release2, request2) = oneshot::channel();
    let queued = bulkhead.call((2, request2));
    assert_eq!(bulkhead.queued(), 1);
    drop(queued);
    assert_eq!(bulkhead.queued(), 0);

    let (release3, third) = spawn(&mut bulkhead, 3);
    assert_eq!(bulkhead.queued(), 1);
    release1.send(()).unwrap();
    release3.send(()).unwrap();
    within(first).await.unwrap().unwrap();
    within(third).await.unwrap().unwrap();
    assert_eq!(started(&log), [1, 3]);
}

#[tokio::test(start_paused = true)]
async fn clones_share_the_limit() {
    let (backend, _) = backend();
    let mut bulkhead = Bulkhead::new(
        backend,
        BulkheadConfig::new().max_concurrent(1).max_queued(0),
    );
    let mut clone = bulkhead.clone();

    let (release, first) = spawn(&mut bulkhead, 1);
    let second = clone.ready().await.unwrap().call((2, oneshot::channel().1));
    let err = within(second).await.unwrap_err();
    assert!(err.is::<BulkheadFull>());
    release.send(()).unwrap();
    within(first).await.unwrap().unwrap();
}

#[test]
fn out_of_range_settings_are_clamped() {
    let bulkhead = Bulkhead::new((), BulkheadConfig::new().max_concurrent(0));
    assert_eq!(bulkhead.config().max_concurrent, 1);
    assert_eq!(bulkhead.in_flight(), 0);
}
