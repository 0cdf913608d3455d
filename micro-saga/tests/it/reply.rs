//! Steps that send a command event and wait for the reply event.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use micro_core::error::BoxError;
use micro_saga::reply::{Command, CommandSender, Reply, ReplyOutcome, RequestError, RequestReply};
use micro_saga::{
    BoxFuture, MemorySagaLog, Orchestrator, SagaDefinition, SagaStatus, StepOutput, StepPolicy,
};
use serde_json::json;

/// A payment service on the other side of a bus: deduplicates commands by
/// correlation id, and answers each one (duplicates included) with the
/// first answer, as many times as `copies`.
#[derive(Default)]
struct PaymentService {
    replies: OnceLock<RequestReply>,
    /// Commands received, in order.
    received: Mutex<Vec<Command>>,
    /// correlation id → the answer given.
    effects: Mutex<HashMap<String, Reply>>,
    /// How many commands to drop without answering, first.
    lose: Mutex<u32>,
    decline: bool,
    copies: usize,
    /// What each delivered copy of a reply found: a waiting step or not.
    delivered: Arc<Mutex<Vec<bool>>>,
}

impl PaymentService {
    fn new() -> Arc<Self> {
        Arc::new(PaymentService {
            copies: 1,
            ..Default::default()
        })
    }

    fn charges(&self) -> usize {
        self.effects
            .lock()
            .unwrap()
            .values()
            .filter(|r| matches!(r.outcome, ReplyOutcome::Succeeded { .. }))
            .count()
    }
}

impl CommandSender for PaymentService {
    fn send<'a>(&'a self, command: &'a Command) -> BoxFuture<'a, Result<(), BoxError>> {
        self.received.lock().unwrap().push(command.clone());
        {
            let mut lose = self.lose.lock().unwrap();
            if *lose > 0 {
                *lose -= 1;
                return Box::pin(async { Ok(()) });
            }
        }
        let reply = self
            .effects
            .lock()
            .unwrap()
            .entry(command.correlation_id.clone())
            .or_insert_with(|| {
                if self.decline {
                    Reply::failed(&command.correlation_id, "card declined", false)
                } else {
                    let n = command.payload["cents"].as_u64().unwrap();
                    Reply::succeeded(&command.correlation_id, json!({ "charged": n }))
                }
            })
            .clone();
        let replies = self.replies.get().unwrap().clone();
        let copies = self.copies;
        let delivered = self.delivered.clone();
        Box::pin(async move {
            tokio::spawn(async move {
                for _ in 0..copies {
                    let found = replies.deliver(reply.clone());
                    delivered.lock().unwrap().push(found);
                }
            });
            Ok(())
        })
    }
}

fn saga(payments: &RequestReply, refunds: Arc<Mutex<Vec<String>>>) -> SagaDefinition<u64> {
    let charge = payments.clone();
    SagaDefinition::<u64>::builder("place-order")
        .policy(
            StepPolicy::new()
                .timeout(Duration::from_secs(30))
                .max_attempts(4)
                .initial_backoff(Duration::from_millis(100))
                .randomization_factor(0.0),
        )
        .step(
            "charge-payment",
            move |cx| {
                let payments = charge.clone();
                async move {
                    let reply = payments
                        .request(&cx, "ChargePayment", json!({ "cents": *cx.data() }))
                        .await?;
                    Ok(StepOutput::value(reply))
                }
            },
            move |cx| {
                let refunds = refunds.clone();
                async move {
                    refunds
                        .lock()
                        .unwrap()
                        .push(cx.output().unwrap().to_string());
                    Ok(())
                }
            },
        )
        .step(
            "reserve-inventory",
            |cx| async move {
                if *cx.data() > 10_000 {
                    return Err(micro_saga::StepError::permanent("out of stock"));
                }
                Ok(StepOutput::empty())
            },
            |_cx| async { Ok(()) },
        )
        .build()
        .unwrap()
}

fn setup(
    service: &Arc<PaymentService>,
) -> (
    RequestReply,
    Orchestrator,
    SagaDefinition<u64>,
    Arc<Mutex<Vec<String>>>,
) {
    let payments = RequestReply::new(service.clone(), Duration::from_secs(2));
    service.replies.set(payments.clone()).unwrap();
    let refunds = Arc::new(Mutex::new(Vec::new()));
    let saga = saga(&payments, refunds.clone());
    let orch = Orchestrator::builder(Arc::new(MemorySagaLog::new()))
        .definition(&saga)
        .build()
        .unwrap();
    (payments, orch, saga, refunds)
}

#[tokio::test(start_paused = true)]
async fn a_command_step_completes_on_its_reply_and_ignores_duplicates() {
    let service = Arc::new(PaymentService {
        copies: 3,
        ..Default::default()
    });
    let (payments, orch, saga, _) = setup(&service);
    let done = orch.run(&saga, "o-1", 4200).await.unwrap();
    assert_eq!(done.status(), SagaStatus::Completed);
    assert_eq!(done.steps()[0].output(), Some(&json!({"charged": 4200})));
    let received = service.received.lock().unwrap().clone();
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].correlation_id, "o-1:charge-payment:action");
    assert_eq!(received[0].kind, "ChargePayment");
    assert_eq!(received[0].saga_id, "o-1");
    assert_eq!(received[0].attempt, 1);
    assert!(received[0].trace_parent.starts_with("00-"));
    assert_eq!(payments.waiting(), 0);
    // Only the first copy of the reply found the step waiting.
    assert_eq!(*service.delivered.lock().unwrap(), [true, false, false]);
}

#[tokio::test(start_paused = true)]
async fn a_lost_reply_times_out_and_the_command_is_sent_again_with_the_same_key() {
    let service = PaymentService::new();
    *service.lose.lock().unwrap() = 2;
    let (payments, orch, saga, _) = setup(&service);
    let started = tokio::time::Instant::now();
    let done = orch.run(&saga, "o-2", 100).await.unwrap();
    assert_eq!(done.status(), SagaStatus::Completed);
    assert_eq!(done.steps()[0].attempts(), 3);
    let received = service.received.lock().unwrap().clone();
    let keys: Vec<_> = received
        .iter()
        .map(|c| (c.correlation_id.as_str(), c.attempt))
        .collect();
    assert_eq!(
        keys,
        [
            ("o-2:charge-payment:action", 1),
            ("o-2:charge-payment:action", 2),
            ("o-2:charge-payment:action", 3)
        ]
    );
    assert_eq!(service.charges(), 1, "one effect");
    // Two reply timeouts of 2 s each, and the backoffs between.
    assert!(started.elapsed() >= Duration::from_secs(4));
    assert_eq!(payments.waiting(), 0);
    let history = orch.saga("o-2").await.unwrap().unwrap();
    let text = format!("{:?}", history.transitions);
    assert!(!text.contains("step_failed"), "{text}");
}

#[tokio::test(start_paused = true)]
async fn a_failed_reply_fails_the_step_and_a_later_failure_compensates_with_the_reply() {
    let service = Arc::new(PaymentService {
        decline: true,
        copies: 1,
        ..Default::default()
    });
    let (_, orch, saga, refunds) = setup(&service);
    let done = orch.run(&saga, "o-3", 100).await.unwrap();
    assert_eq!(done.status(), SagaStatus::Compensated);
    assert_eq!(
        done.steps()[0].error(),
        Some("`ChargePayment` failed: card declined")
    );
    assert_eq!(service.received.lock().unwrap().len(), 1, "not retried");
    assert!(refunds.lock().unwrap().is_empty());

    let service = PaymentService::new();
    let (_, orch, saga, refunds) = setup(&service);
    let done = orch.run(&saga, "o-4", 20_000).await.unwrap();
    assert_eq!(done.status(), SagaStatus::Compensated);
    assert_eq!(*refunds.lock().unwrap(), [r#"{"charged":20000}"#]);
}

struct Unreachable;

impl CommandSender for Unreachable {
    fn send<'a>(&'a self, _: &'a Command) -> BoxFuture<'a, Result<(), BoxError>> {
        Box::pin(async { Err("the bus is down".into()) })
    }
}

#[tokio::test(start_paused = true)]
async fn replies_nobody_waits_for_are_dropped_and_errors_say_whether_to_retry() {
    let replies = RequestReply::new(Unreachable, Duration::from_secs(1));
    assert!(!replies.deliver(Reply::succeeded("nobody", json!(1))));
    let command: Command = serde_json::from_value(json!({
        "correlation_id": "s:step:action", "saga_id": "s", "step": "step", "attempt": 1,
        "kind": "Ping", "payload": null, "trace_parent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    }))
    .unwrap();
    let err = replies.send(&command).await.unwrap_err();
    assert!(matches!(err, RequestError::Send { .. }), "{err:?}");
    assert_eq!(err.to_string(), "sending `Ping` failed");
    assert!(
        !err.is_retryable(),
        "micro-core does not call a string error retryable"
    );
    assert_eq!(replies.waiting(), 0);
}
