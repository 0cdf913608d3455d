//! The consumer loop shared by every bus.
//!
//! One task reads the source and hands each record to the lane of its key. A
//! lane is a queue worked by one task at a time, which keeps a key's records
//! in order; a semaphore bounds how many lanes run a handler at once, another
//! how many records wait in lanes (when it is exhausted the loop stops
//! reading: backpressure). Finished records go through the [`Tracker`], which
//! says when a partition's committed offset may move.

use std::collections::{HashMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use micro_core::backoff::{Backoff, Jitter};
use micro_core::trace::TraceContext;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use super::tracker::Tracker;
use super::{Chain, Failure, RawHandler, Received, Status, SubscribeOptions, Subscription};
use crate::error::{Error, Result};
use crate::metrics;
use crate::publish::Publisher;
use crate::record::{Headers, ReceivedRecord, Record};
use crate::Source;

/// What a consumer's handler wrapper needs to know about its subscription.
#[derive(Debug)]
pub(crate) struct Context {
    pub(crate) topic: Arc<str>,
    pub(crate) group: Arc<str>,
}

/// The headers a dead letter carries besides the original record's.
pub mod dead_letter_headers {
    /// Why the event was dead-lettered: the handler's error and its causes.
    pub const ERROR: &str = "dlq_error";
    /// How many times the handler was tried, in decimal.
    pub const ATTEMPTS: &str = "dlq_attempts";
    /// The topic the event was read from.
    pub const TOPIC: &str = "dlq_original_topic";
    /// The partition it was read from, in decimal.
    pub const PARTITION: &str = "dlq_original_partition";
    /// Its offset in that partition, in decimal.
    pub const OFFSET: &str = "dlq_original_offset";
    /// The consumer group that gave up on it.
    pub const GROUP: &str = "dlq_group";
}

struct Shared {
    ctx: Context,
    source: Arc<dyn Source>,
    handler: RawHandler,
    dead_letters: Arc<dyn Publisher>,
    dead_letter_topic: String,
    options: SubscribeOptions,
    concurrency: Arc<Semaphore>,
    lanes: Mutex<HashMap<Lane, VecDeque<Job>>>,
    tracker: Mutex<Tracker>,
    stop: watch::Receiver<bool>,
    status: Arc<Status>,
}

/// Records of one lane are handled one at a time, in order. Keyed records
/// share a lane per key (a key always maps to one partition); records without
/// a key share one lane per partition.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Lane {
    Key(Vec<u8>),
    Partition(i32),
}

struct Job {
    record: ReceivedRecord,
    _buffered: OwnedSemaphorePermit,
}

pub(crate) fn start(
    source: Box<dyn Source>,
    dead_letters: Arc<dyn Publisher>,
    topic: &str,
    group: &str,
    options: SubscribeOptions,
    handler: RawHandler,
) -> Subscription {
    let (stop_tx, stop) = watch::channel(false);
    let status = Arc::new(Status::default());
    let shared = Arc::new(Shared {
        ctx: Context {
            topic: topic.into(),
            group: group.into(),
        },
        source: Arc::from(source),
        handler,
        dead_letters,
        dead_letter_topic: options
            .dead_letter_topic
            .clone()
            .unwrap_or_else(|| format!("{topic}.dlq")),
        concurrency: Arc::new(Semaphore::new(options.max_concurrency)),
        options,
        lanes: Mutex::new(HashMap::new()),
        tracker: Mutex::new(Tracker::default()),
        stop,
        status: Arc::clone(&status),
    });
    // Marks the subscription stopped however the task ends, an abort (even
    // before its first poll) or a panic in the engine included.
    let ended = EndedGuard(Arc::clone(&status));
    let task = tokio::spawn(async move {
        let _ended = ended;
        run(shared).await
    });
    Subscription {
        stop: stop_tx,
        task: Some(task),
        status,
        topic: topic.to_owned(),
        group: group.to_owned(),
    }
}

async fn run(shared: Arc<Shared>) -> Result<()> {
    let buffered = Arc::new(Semaphore::new(shared.options.max_buffered));
    let mut stop = shared.stop.clone();
    let mut lanes = JoinSet::new();
    let mut read_failures = 0u32;
    let outcome = loop {
        if *stop.borrow_and_update() {
            break Ok(());
        }
        tokio::select! {
            biased;
            _ = stop.changed() => {}
            Some(joined) = lanes.join_next() => {
                if let Err(e) = joined {
                    if e.is_panic() {
                        tracing::error!(topic = %shared.ctx.topic, group = %shared.ctx.group, error = %e, "an event lane panicked outside its handler; stopping the subscription");
                        break Err(Error::Task(e));
                    }
                }
            }
            permit = buffered.clone().acquire_owned() => {
                let permit = permit.expect("the semaphore is never closed");
                let record = tokio::select! {
                    biased;
                    _ = stop.changed() => continue,
                    record = shared.source.next() => record,
                };
                match record {
                    Ok(record) => {
                        read_failures = 0;
                        dispatch(&shared, &mut lanes, record, permit);
                    }
                    Err(Error::Closed) => break Ok(()),
                    Err(e) => {
                        read_failures += 1;
                        tracing::warn!(topic = %shared.ctx.topic, group = %shared.ctx.group, error = %Chain(&e), "reading events failed; trying again");
                        let pause = backoff(&shared.options, read_failures);
                        tokio::select! {
                            _ = stop.changed() => {}
                            _ = tokio::time::sleep(pause) => {}
                        }
                    }
                }
            }
        }
    };
    // Readiness goes off as soon as the loop ends, before the drain.
    shared.status.stopped(match &outcome {
        Ok(()) if *shared.stop.borrow() => "the subscription was stopped".to_owned(),
        Ok(()) => "the event source closed".to_owned(),
        Err(e) => format!("the subscription failed: {}", Chain(e)),
    });
    // Lanes see the stop flag and pick up no further record; running handlers
    // get `stop_timeout` to finish.
    let drained = tokio::time::timeout(shared.options.stop_timeout, async {
        while lanes.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(topic = %shared.ctx.topic, group = %shared.ctx.group, "event handlers did not finish in time; their events will be delivered again");
        lanes.shutdown().await;
    }
    let closed = shared.source.close().await;
    outcome.and(closed)
}

struct EndedGuard(Arc<Status>);

impl Drop for EndedGuard {
    fn drop(&mut self) {
        self.0
            .stopped("the subscription task ended unexpectedly (aborted or panicked)".to_owned());
    }
}

fn dispatch(
    shared: &Arc<Shared>,
    lanes: &mut JoinSet<()>,
    record: ReceivedRecord,
    permit: OwnedSemaphorePermit,
) {
    if let Some(hw) = record.high_watermark {
        metrics::lag(
            &shared.ctx,
            record.partition,
            (hw - record.offset - 1).max(0),
        );
    }
    shared
        .tracker
        .lock()
        .expect("tracker lock")
        .received(record.partition, record.offset);
    let lane = match &record.key {
        Some(key) => Lane::Key(key.clone()),
        None => Lane::Partition(record.partition),
    };
    let job = Job {
        record,
        _buffered: permit,
    };
    let mut queues = shared.lanes.lock().expect("lanes lock");
    match queues.get_mut(&lane) {
        Some(queue) => queue.push_back(job),
        None => {
            queues.insert(lane.clone(), VecDeque::new());
            lanes.spawn(work_lane(Arc::clone(shared), lane, job));
        }
    }
}

async fn work_lane(shared: Arc<Shared>, lane: Lane, mut job: Job) {
    loop {
        handle(&shared, &job.record).await;
        drop(job);
        let mut queues = shared.lanes.lock().expect("lanes lock");
        let next = if *shared.stop.borrow() {
            None
        } else {
            queues.get_mut(&lane).and_then(VecDeque::pop_front)
        };
        match next {
            Some(next) => job = next,
            None => {
                queues.remove(&lane);
                return;
            }
        }
    }
}

/// Tries the handler until it succeeds, or the event is dead-lettered, or the
/// subscription stops (then the record stays uncommitted and comes again).
async fn handle(shared: &Shared, record: &ReceivedRecord) {
    let mut stop = shared.stop.clone();
    let mut attempt = 1;
    loop {
        if *stop.borrow_and_update() {
            return;
        }
        let permit = tokio::select! {
            biased;
            _ = stop.changed() => return,
            permit = shared.concurrency.acquire() => permit.expect("the semaphore is never closed"),
        };
        let started = Instant::now();
        let result = call(shared, record, attempt).await;
        drop(permit);
        let outcome = match &result {
            Ok(()) => "ok",
            Err(Failure::Panicked(_)) => "panic",
            Err(Failure::TimedOut(_)) => "timeout",
            Err(_) => "error",
        };
        metrics::handler_duration(&shared.ctx, outcome, started.elapsed());
        let failure = match result {
            Ok(()) => {
                metrics::consumed(&shared.ctx);
                finished(shared, record);
                return;
            }
            Err(failure) => failure,
        };
        if failure.is_permanent() || attempt >= shared.options.max_attempts {
            tracing::warn!(
                topic = %shared.ctx.topic, group = %shared.ctx.group,
                partition = record.partition, offset = record.offset, attempt,
                error = %failure, "event handling failed; dead-lettering the event",
            );
            if dead_letter(shared, record, &failure, attempt).await {
                finished(shared, record);
            }
            return;
        }
        tracing::debug!(
            topic = %shared.ctx.topic, group = %shared.ctx.group,
            partition = record.partition, offset = record.offset, attempt,
            error = %failure, "event handling failed; retrying",
        );
        metrics::retried(&shared.ctx);
        tokio::select! {
            biased;
            _ = stop.changed() => return,
            _ = tokio::time::sleep(backoff(&shared.options, attempt)) => {}
        }
        attempt += 1;
    }
}

/// Calls the handler once, bounded by the handler timeout (a call that
/// outlives it is dropped, and fails). A panic is caught and becomes a failure like any
/// other (retried, then dead-lettered), so that one bad event cannot end the
/// subscription of every key: the handler's future is dropped during the
/// unwind, which is what cancelling it would do, and the handler is called
/// afresh for the next attempt.
async fn call(shared: &Shared, record: &ReceivedRecord, attempt: u32) -> Result<(), Failure> {
    let call = AssertUnwindSafe(async { (shared.handler)(&shared.ctx, record, attempt).await });
    let timeout = shared.options.handler_timeout;
    match tokio::time::timeout(timeout, call.catch_unwind()).await {
        Err(_) => {
            tracing::warn!(
                topic = %shared.ctx.topic, group = %shared.ctx.group,
                partition = record.partition, offset = record.offset, attempt,
                ?timeout, "event handler timed out",
            );
            Err(Failure::TimedOut(timeout))
        }
        Ok(Ok(result)) => result,
        Ok(Err(panic)) => {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a non-string payload".to_owned());
            tracing::error!(
                topic = %shared.ctx.topic, group = %shared.ctx.group,
                partition = record.partition, offset = record.offset, attempt,
                panic = %message, "event handler panicked",
            );
            Err(Failure::Panicked(message))
        }
    }
}

/// Publishes `record` to the dead-letter topic, retrying until it is stored
/// or the subscription stops; says whether it was stored.
async fn dead_letter(
    shared: &Shared,
    record: &ReceivedRecord,
    failure: &Failure,
    attempts: u32,
) -> bool {
    use dead_letter_headers as h;
    let mut headers: Headers = record
        .headers
        .iter()
        .filter(|(name, _)| !name.starts_with("dlq_"))
        .cloned()
        .collect();
    for (name, value) in [
        (h::ERROR, failure.to_string()),
        (h::ATTEMPTS, attempts.to_string()),
        (h::TOPIC, record.topic.clone()),
        (h::PARTITION, record.partition.to_string()),
        (h::OFFSET, record.offset.to_string()),
        (h::GROUP, shared.ctx.group.to_string()),
    ] {
        headers.push((name.to_owned(), value.into_bytes()));
    }
    let letter = Record {
        key: record.key.clone(),
        headers,
        payload: record.payload.clone(),
    };
    let mut stop = shared.stop.clone();
    let mut failures = 0;
    loop {
        match shared
            .dead_letters
            .publish_records(&shared.dead_letter_topic, vec![letter.clone()])
            .await
        {
            Ok(_) => {
                metrics::dead_lettered(&shared.ctx);
                return true;
            }
            Err(e) => {
                failures += 1;
                tracing::error!(
                    topic = %shared.dead_letter_topic, error = %Chain(&e),
                    "publishing a dead letter failed; trying again",
                );
            }
        }
        if *stop.borrow_and_update() {
            return false;
        }
        tokio::select! {
            biased;
            _ = stop.changed() => return false,
            _ = tokio::time::sleep(backoff(&shared.options, failures)) => {}
        }
    }
}

fn finished(shared: &Shared, record: &ReceivedRecord) {
    // Commit under the tracker's lock, so that two lanes finishing at once
    // cannot hand the source their offsets in the wrong order.
    let mut tracker = shared.tracker.lock().expect("tracker lock");
    if let Some(next_offset) = tracker.finished(record.partition, record.offset) {
        if let Err(e) = shared.source.commit(record.partition, next_offset) {
            tracing::warn!(
                topic = %shared.ctx.topic, group = %shared.ctx.group,
                partition = record.partition, next_offset, error = %e,
                "committing an offset failed; the events will be delivered again",
            );
        }
    }
}

/// The delay before retry number `attempt` (from 1): doubling from the
/// initial backoff up to the ceiling, each drawn between half and all of it.
pub(crate) fn backoff(options: &SubscribeOptions, attempt: u32) -> Duration {
    Backoff::new(options.initial_backoff, options.max_backoff)
        .jitter(Jitter::Equal)
        .delay(attempt)
}

/// The consumer's trace context (a child of the producer's when the event
/// carries a `traceparent`, else a new trace) and its span.
pub(crate) fn consumer_span<T>(
    ctx: &Context,
    received: &Received<T>,
) -> (TraceContext, tracing::Span) {
    let parent = received
        .traceparent()
        .and_then(|tp| TraceContext::parse(tp).ok());
    let trace = parent.map_or_else(TraceContext::new_root, |p| p.child());
    let span = tracing::info_span!(
        "event.consume",
        otel.kind = "consumer",
        topic = %ctx.topic,
        group = %ctx.group,
        partition = received.partition(),
        offset = received.offset(),
        event.id = received.id(),
        event.r#type = received.event_type(),
        attempt = received.attempt(),
        trace_id = %trace.trace_id(),
        span_id = %trace.span_id(),
        parent_span_id = parent.map(|p| tracing::field::display(p.span_id())),
    );
    (trace, span)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_ceiling() {
        let options =
            SubscribeOptions::new().backoff(Duration::from_millis(100), Duration::from_secs(1));
        for _ in 0..50 {
            let first = backoff(&options, 1);
            assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
            let third = backoff(&options, 3);
            assert!(third >= Duration::from_millis(200) && third <= Duration::from_millis(400));
            let late = backoff(&options, 60);
            assert!(late >= Duration::from_millis(500) && late <= Duration::from_secs(1));
        }
    }
}
