//! The consumer's span: named `event.consume`, in the producer's trace.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use micro_core::trace::TraceContext;
use micro_events::{Event, MemoryBus, PublisherExt, Received, SubscriberExt};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id};
use tracing::Subscriber;
use tracing_subscriber::layer::{Context, Layer, SubscriberExt as _};
use tracing_subscriber::registry::LookupSpan;

use crate::support::{eventually, Log};

type Spans = Arc<Mutex<Vec<(String, Vec<(String, String)>)>>>;

/// Records every new span's name and fields.
struct Capture(Spans);

struct Fields<'a>(&'a mut Vec<(String, String)>);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.push((field.name().to_owned(), format!("{value:?}")));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.push((field.name().to_owned(), value.to_owned()));
    }
}

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Capture {
    fn on_new_span(&self, attrs: &Attributes<'_>, _: &Id, _: Context<'_, S>) {
        let mut fields = Vec::new();
        attrs.record(&mut Fields(&mut fields));
        self.0
            .lock()
            .unwrap()
            .push((attrs.metadata().name().to_owned(), fields));
    }
}

#[test]
fn the_consumer_span_continues_the_producer_trace() {
    let spans = Spans::default();
    let subscriber = tracing_subscriber::registry().with(Capture(spans.clone()));
    let producer = TraceContext::new_root();
    tracing::subscriber::with_default(subscriber, || {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap()
            .block_on(async {
                let bus = MemoryBus::with_partitions(1);
                let event = Event::builder("/s", "shop.order.created", 1u32)
                    .id("e-1")
                    .build()
                    .unwrap();
                producer
                    .scope(bus.publish("orders", "o-1", &event))
                    .await
                    .unwrap();
                let seen = Log::new();
                let log = seen.clone();
                let sub = bus
                    .subscribe("orders", "g", move |_: Received<u32>| {
                        let log = log.clone();
                        async move {
                            log.push(TraceContext::current().unwrap());
                            Ok::<_, std::io::Error>(())
                        }
                    })
                    .await
                    .unwrap();
                eventually(Duration::from_secs(10), "the event", || {
                    (seen.len() == 1).then_some(())
                })
                .await;
                sub.shutdown().await.unwrap();
            });
    });
    let spans = spans.lock().unwrap();
    let (_, fields) = spans
        .iter()
        .find(|(name, _)| name == "event.consume")
        .expect("an event.consume span");
    let field = |name: &str| {
        fields
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .unwrap_or_else(|| panic!("no field {name} in {fields:?}"))
    };
    assert_eq!(field("trace_id"), producer.trace_id().to_string());
    assert_eq!(field("topic"), "orders");
    assert_eq!(field("group"), "g");
    assert_eq!(field("event.id"), "e-1");
    assert_eq!(field("event.type"), "shop.order.created");
    assert_eq!(field("attempt"), "1");
    assert_ne!(
        field("parent_span_id"),
        producer.span_id().to_string(),
        "the publish had a span of its own"
    );
}
