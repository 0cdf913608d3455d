//! The test kit, used as a service's own tests would use it.

use micro_saga::testkit::{Fault, FaultKind, SagaTest};
use micro_saga::{MoveOutcome, Phase, SagaLog, SagaStatus};

use crate::support::{order, order_saga, Journal};

#[tokio::test(start_paused = true)]
async fn drives_a_saga_one_move_at_a_time() {
    let journal = Journal::default();
    let saga = order_saga(&journal);
    let mut test = SagaTest::start(&saga, "o-1", order("o-1", "book"))
        .await
        .unwrap();
    test.inject(
        "reserve-inventory",
        Phase::Action,
        Fault::timeout().times(1),
    );

    let charge = test.next().await.unwrap().unwrap();
    assert_eq!(charge.step, "charge-payment");
    assert_eq!(charge.outcome, MoveOutcome::Succeeded);
    assert_eq!(test.context().payment_id.as_deref(), Some("pay-o-1"));

    let timed_out = test.next().await.unwrap().unwrap();
    assert_eq!(
        (timed_out.step.as_str(), timed_out.attempt),
        ("reserve-inventory", 1)
    );
    assert!(
        matches!(&timed_out.outcome, MoveOutcome::Retrying { error, .. } if error.contains("timed out after 1s")),
        "{timed_out:?}"
    );
    assert_eq!(test.status(), SagaStatus::Running);

    let retried = test.next().await.unwrap().unwrap();
    assert_eq!(
        (retried.attempt, retried.outcome),
        (2, MoveOutcome::Succeeded)
    );
    assert_eq!(test.run().await.unwrap(), SagaStatus::Completed);
    assert!(test.next().await.unwrap().is_none());

    let reserve = test.calls_to("reserve-inventory", Phase::Action);
    assert_eq!(reserve.len(), 2);
    assert_eq!(reserve[0].fault, Some(FaultKind::Timeout));
    assert_eq!(reserve[1].fault, None);
    assert!(reserve
        .iter()
        .all(|c| c.idempotency_key == "o-1:reserve-inventory:action"));
    assert_eq!(
        test.completed(),
        [
            "charge-payment",
            "reserve-inventory",
            "confirm-order",
            "notify"
        ]
    );
    assert!(test.compensated().is_empty());
    // The injected timeout ran no real reservation; the retry ran one.
    assert_eq!(
        journal
            .lines()
            .iter()
            .filter(|l| l.starts_with("reserve:"))
            .count(),
        1
    );
}

#[tokio::test(start_paused = true)]
async fn a_failing_confirmation_is_compensated_in_reverse_order() {
    let journal = Journal::default();
    let saga = order_saga(&journal);
    let mut test = SagaTest::start(&saga, "o-2", order("o-2", "book"))
        .await
        .unwrap();
    test.inject("confirm-order", Phase::Action, Fault::permanent());
    test.inject(
        "charge-payment",
        Phase::Compensation,
        Fault::transient().times(2),
    );
    assert_eq!(test.run().await.unwrap(), SagaStatus::Compensated);
    assert_eq!(test.compensated(), ["reserve-inventory", "charge-payment"]);

    let compensations: Vec<_> = test
        .calls()
        .into_iter()
        .filter(|c| c.phase == Phase::Compensation)
        .map(|c| (c.step, c.attempt, c.idempotency_key))
        .collect();
    assert_eq!(
        compensations,
        [
            (
                "reserve-inventory".into(),
                1,
                "o-2:reserve-inventory:compensation".into()
            ),
            (
                "charge-payment".into(),
                1,
                "o-2:charge-payment:compensation".into()
            ),
            (
                "charge-payment".into(),
                2,
                "o-2:charge-payment:compensation".into()
            ),
            (
                "charge-payment".into(),
                3,
                "o-2:charge-payment:compensation".into()
            ),
        ]
    );
    assert_eq!(
        journal.lines(),
        [
            "charge:o-2:charge-payment:action",
            "reserve:o-2:reserve-inventory:action",
            "release:o-2:reserve-inventory:compensation",
            "refund:pay-o-2:o-2:charge-payment:compensation",
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn a_refund_that_never_works_needs_attention() {
    let journal = Journal::default();
    let saga = order_saga(&journal);
    let mut test = SagaTest::start(&saga, "o-3", order("o-3", "out-of-stock"))
        .await
        .unwrap();
    test.inject("charge-payment", Phase::Compensation, Fault::timeout());
    assert_eq!(test.run().await.unwrap(), SagaStatus::Failed);
    // The compensation policy of the fixture allows 4 attempts.
    assert_eq!(
        test.calls_to("charge-payment", Phase::Compensation).len(),
        4
    );
    let step = &test.saga().steps()[0];
    assert_eq!(
        step.error(),
        Some("gave up after 4 attempts: step timed out after 1s")
    );
    let record = test.log().load("o-3").await.unwrap().unwrap();
    assert_eq!(record.status, SagaStatus::Failed);

    test.heal("charge-payment", Phase::Compensation);
    assert!(
        test.next().await.unwrap().is_none(),
        "a failed saga is finished"
    );
}
