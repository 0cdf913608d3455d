//! The metrics this crate records, through the `metrics` facade.
//!
//! | name | kind | labels |
//! |---|---|---|
//! | `micro_events_published_total` | counter | `topic` |
//! | `micro_events_consumed_total` | counter | `topic`, `group` |
//! | `micro_events_retried_total` | counter | `topic`, `group` |
//! | `micro_events_dead_lettered_total` | counter | `topic`, `group` |
//! | `micro_events_handler_duration_seconds` | histogram | `topic`, `group`, `outcome` (`ok`, `error`) |
//! | `micro_events_consumer_lag` | gauge | `topic`, `group`, `partition` |

use std::time::Duration;

use crate::subscribe::Context;

/// Records counted when a bus has stored them.
pub const PUBLISHED: &str = "micro_events_published_total";
/// Events a handler succeeded on.
pub const CONSUMED: &str = "micro_events_consumed_total";
/// Handler failures followed by a retry.
pub const RETRIED: &str = "micro_events_retried_total";
/// Events sent to the dead-letter topic.
pub const DEAD_LETTERED: &str = "micro_events_dead_lettered_total";
/// How long each handler call took.
pub const HANDLER_DURATION: &str = "micro_events_handler_duration_seconds";
/// Records behind the partition's end: on the memory bus when a record is
/// read, on Kafka from librdkafka's statistics (records not yet finished).
pub const CONSUMER_LAG: &str = "micro_events_consumer_lag";

pub(crate) fn published(topic: &str, n: usize) {
    metrics::counter!(PUBLISHED, "topic" => topic.to_owned()).increment(n as u64);
}

pub(crate) fn consumed(ctx: &Context) {
    metrics::counter!(CONSUMED, "topic" => ctx.topic.to_string(), "group" => ctx.group.to_string())
        .increment(1);
}

pub(crate) fn retried(ctx: &Context) {
    metrics::counter!(RETRIED, "topic" => ctx.topic.to_string(), "group" => ctx.group.to_string())
        .increment(1);
}

pub(crate) fn dead_lettered(ctx: &Context) {
    metrics::counter!(DEAD_LETTERED, "topic" => ctx.topic.to_string(), "group" => ctx.group.to_string())
        .increment(1);
}

pub(crate) fn handler_duration(ctx: &Context, outcome: &'static str, elapsed: Duration) {
    metrics::histogram!(
        HANDLER_DURATION,
        "topic" => ctx.topic.to_string(),
        "group" => ctx.group.to_string(),
        "outcome" => outcome,
    )
    .record(elapsed.as_secs_f64());
}

pub(crate) fn lag(ctx: &Context, partition: i32, lag: i64) {
    group_lag(&ctx.topic, &ctx.group, partition, lag);
}

pub(crate) fn group_lag(topic: &str, group: &str, partition: i32, lag: i64) {
    metrics::gauge!(
        CONSUMER_LAG,
        "topic" => topic.to_owned(),
        "group" => group.to_owned(),
        "partition" => partition.to_string(),
    )
    .set(lag as f64);
}
