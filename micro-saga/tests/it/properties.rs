//! Property: whatever fails, every saga ends completed, fully compensated in
//! reverse order, or failed because a compensation kept failing.

use std::time::Duration;

use micro_saga::testkit::{Fault, SagaTest};
use micro_saga::{Phase, SagaDefinition, SagaStatus, StepOutput, StepPolicy, StepStatus};
use proptest::prelude::*;

/// What every attempt at an action or a compensation does.
#[derive(Debug, Clone, Copy)]
enum Behaviour {
    Succeed,
    FailPermanently,
    /// Fails retryably `k` times, then succeeds.
    Transient(u32),
    /// Times out `k` times, then succeeds.
    TimeOut(u32),
    AlwaysTransient,
    AlwaysTimeOut,
}

impl Behaviour {
    fn fault(self) -> Option<Fault> {
        match self {
            Behaviour::Succeed => None,
            Behaviour::FailPermanently => Some(Fault::permanent()),
            Behaviour::Transient(k) => Some(Fault::transient().times(k)),
            Behaviour::TimeOut(k) => Some(Fault::timeout().times(k)),
            Behaviour::AlwaysTransient => Some(Fault::transient()),
            Behaviour::AlwaysTimeOut => Some(Fault::timeout()),
        }
    }

    /// How many attempts a bound of `max` allows, and whether the last one
    /// succeeds.
    fn attempts(self, max: u32) -> (u32, bool) {
        let max = max.max(1);
        match self {
            Behaviour::Succeed => (1, true),
            Behaviour::FailPermanently => (1, false),
            Behaviour::Transient(k) | Behaviour::TimeOut(k) if k < max => (k + 1, true),
            _ => (max, false),
        }
    }

    /// Whether an action that never succeeded may have taken effect: its
    /// last attempt timed out, or an earlier attempt was retried.
    fn uncertain(self, max: u32) -> bool {
        match self {
            Behaviour::TimeOut(_) | Behaviour::AlwaysTimeOut => true,
            Behaviour::Transient(_) | Behaviour::AlwaysTransient => max > 1,
            Behaviour::Succeed | Behaviour::FailPermanently => false,
        }
    }
}

fn behaviour() -> impl Strategy<Value = Behaviour> {
    prop_oneof![
        6 => Just(Behaviour::Succeed),
        1 => Just(Behaviour::FailPermanently),
        2 => (1..4u32).prop_map(Behaviour::Transient),
        2 => (1..4u32).prop_map(Behaviour::TimeOut),
        1 => Just(Behaviour::AlwaysTransient),
        1 => Just(Behaviour::AlwaysTimeOut),
    ]
}

fn definition(steps: usize, policy: StepPolicy) -> SagaDefinition<u32> {
    let mut builder = SagaDefinition::<u32>::builder("random").policy(policy);
    for i in 0..steps {
        builder = builder.step(
            format!("s{i}"),
            |_| async { Ok(StepOutput::empty()) },
            |_| async { Ok(()) },
        );
    }
    builder.build().unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn every_saga_ends_completed_compensated_or_failed(
        plan in prop::collection::vec((behaviour(), behaviour()), 1..=5),
        max_attempts in 1..4u32,
        compensation_max_attempts in 1..4u32,
    ) {
        let policy = StepPolicy::new()
            .timeout(Duration::from_millis(100))
            .max_attempts(max_attempts)
            .compensation_max_attempts(compensation_max_attempts)
            .initial_backoff(Duration::from_millis(5));
        let saga = definition(plan.len(), policy);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        let test = rt.block_on(async {
            let mut test = SagaTest::start(&saga, "p-1", 0).await.unwrap();
            for (i, (action, compensation)) in plan.iter().enumerate() {
                if let Some(fault) = action.fault() {
                    test.inject(&format!("s{i}"), Phase::Action, fault);
                }
                if let Some(fault) = compensation.fault() {
                    test.inject(&format!("s{i}"), Phase::Compensation, fault);
                }
            }
            let status = test.run().await.unwrap();
            assert!(status.is_terminal());
            test
        });

        // The model: run forward until a step fails, then compensate the
        // completed steps, and the failed one if it may have taken effect,
        // latest first, until one cannot be compensated.
        let mut expected_calls = Vec::new();
        let mut completed = Vec::new();
        let mut to_undo = Vec::new();
        let mut failed_step = None;
        for (i, (action, _)) in plan.iter().enumerate() {
            let (attempts, ok) = action.attempts(max_attempts);
            expected_calls.extend((1..=attempts).map(|a| (format!("s{i}"), Phase::Action, a)));
            if !ok {
                failed_step = Some(i);
                if action.uncertain(max_attempts) {
                    to_undo.push(format!("s{i}"));
                }
                break;
            }
            completed.push(format!("s{i}"));
            to_undo.push(format!("s{i}"));
        }
        let mut compensated = Vec::new();
        let mut expected = SagaStatus::Completed;
        if failed_step.is_some() {
            expected = SagaStatus::Compensated;
            for i in (0..to_undo.len()).rev() {
                let (attempts, ok) = plan[i].1.attempts(compensation_max_attempts);
                expected_calls.extend(
                    (1..=attempts).map(|a| (format!("s{i}"), Phase::Compensation, a)),
                );
                if !ok {
                    expected = SagaStatus::Failed;
                    break;
                }
                compensated.push(format!("s{i}"));
            }
        }

        prop_assert_eq!(test.status(), expected);
        prop_assert_eq!(test.completed(), completed.clone());
        prop_assert_eq!(test.compensated(), compensated.clone());
        let calls: Vec<_> = test
            .calls()
            .into_iter()
            .map(|c| {
                let key = format!("p-1:{}:{}", c.step, c.phase);
                assert_eq!(c.idempotency_key, key);
                (c.step, c.phase, c.attempt)
            })
            .collect();
        prop_assert_eq!(calls, expected_calls);

        // Compensations are exactly the completed steps and the uncertain
        // one, latest first (all of them unless the saga failed).
        let reversed: Vec<_> = to_undo.iter().rev().cloned().collect();
        prop_assert_eq!(&reversed[..compensated.len()], &compensated[..]);
        if expected == SagaStatus::Compensated {
            prop_assert_eq!(compensated, reversed);
        }
        let states: Vec<_> = test.saga().steps().iter().map(|s| s.status()).collect();
        match expected {
            SagaStatus::Completed => prop_assert!(states.iter().all(|s| *s == StepStatus::Succeeded)),
            SagaStatus::Failed => prop_assert_eq!(
                states.iter().filter(|s| **s == StepStatus::CompensationFailed).count(),
                1
            ),
            _ => prop_assert!(
                !states.contains(&StepStatus::Succeeded) && !states.contains(&StepStatus::Uncertain),
                "an effect was left behind: {states:?}"
            ),
        }
        // The log holds exactly what the saga went through.
        let record = rt
            .block_on(micro_saga::SagaLog::load(&**test.log(), "p-1"))
            .unwrap()
            .unwrap();
        prop_assert_eq!(&record.transitions[..], test.saga().history());
        prop_assert_eq!(record.status, expected);
    }
}
