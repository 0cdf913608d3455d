//! The Kafka bus (feature `kafka`): rdkafka with a bundled librdkafka.
//!
//! Events follow the CloudEvents Kafka protocol binding in binary mode: the
//! attributes travel as `ce_` headers, the data as the record value, and the
//! partition key as the record key, so any CloudEvents-aware consumer (or a
//! plain Kafka tool) reads our events and we read theirs.
//!
//! - The producer is idempotent (`enable.idempotence`): a retried send does
//!   not duplicate or reorder records within a partition. Records are batched
//!   for [`KafkaConfig::linger`], and keys are placed with the Java client's
//!   partitioner (`murmur2_random`), as the [`MemoryBus`](crate::MemoryBus)
//!   places them.
//! - Each subscription is a consumer in its group. Offsets are *stored* when
//!   the subscription has finished an event (and every event before it in the
//!   partition) and committed by librdkafka in the background every
//!   [`KafkaConfig::commit_interval`]; a graceful stop commits synchronously.
//!   A new group starts at the earliest offset.
//! - Topics are not created implicitly: create them with
//!   [`KafkaBus::create_topic`] (some brokers do not auto-create), the
//!   dead-letter topics (`<topic>.dlq`) included; a dead letter that cannot be
//!   published is retried, and its event not committed, until it can.
//! - Consumer lag comes from librdkafka's statistics, every
//!   [`KafkaConfig::lag_interval`]: per assigned partition, the records
//!   between the partition's end and the offset of the first unfinished one.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use micro_core::service::BoxFuture;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::consumer::{CommitMode, Consumer, ConsumerContext, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers as _, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::statistics::Statistics;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use crate::error::{Error, Result};
use crate::metrics;
use crate::publish::Publisher;
use crate::record::{Delivery, ReceivedRecord, Record};
use crate::subscribe::{Source, Subscriber};

/// How to reach Kafka and how to talk to it.
#[derive(Debug, Clone)]
pub struct KafkaConfig {
    brokers: String,
    client_id: String,
    linger: Duration,
    session_timeout: Duration,
    max_poll_interval: Duration,
    commit_interval: Duration,
    lag_interval: Duration,
    close_timeout: Duration,
    producer: Vec<(String, String)>,
    consumer: Vec<(String, String)>,
}

impl KafkaConfig {
    /// Bootstrap `brokers`, a comma-separated `host:port` list.
    pub fn new(brokers: impl Into<String>) -> Self {
        Self {
            brokers: brokers.into(),
            client_id: "micro-events".to_owned(),
            linger: Duration::from_millis(5),
            session_timeout: Duration::from_secs(45),
            max_poll_interval: Duration::from_secs(300),
            commit_interval: Duration::from_secs(1),
            lag_interval: Duration::from_secs(5),
            close_timeout: Duration::from_secs(10),
            producer: Vec::new(),
            consumer: Vec::new(),
        }
    }

    /// The `client.id` the broker sees (default `micro-events`).
    pub fn client_id(mut self, id: impl Into<String>) -> Self {
        self.client_id = id.into();
        self
    }

    /// How long the producer waits to fill a batch (`linger.ms`, default
    /// 5 ms).
    pub fn linger(mut self, linger: Duration) -> Self {
        self.linger = linger;
        self
    }

    /// How long a silent group member keeps its partitions
    /// (`session.timeout.ms`, default 45 s).
    pub fn session_timeout(mut self, timeout: Duration) -> Self {
        self.session_timeout = timeout;
        self
    }

    /// How long a member may go between polls before it leaves its group
    /// (`max.poll.interval.ms`, default 300 s).
    pub fn max_poll_interval(mut self, interval: Duration) -> Self {
        self.max_poll_interval = interval;
        self
    }

    /// How often stored offsets are committed in the background
    /// (`auto.commit.interval.ms`, default 1 s).
    pub fn commit_interval(mut self, interval: Duration) -> Self {
        self.commit_interval = interval;
        self
    }

    /// How often consumers report their lag (`statistics.interval.ms`,
    /// default 5 s); zero turns the reports off.
    pub fn lag_interval(mut self, interval: Duration) -> Self {
        self.lag_interval = interval;
        self
    }

    /// How long closing a consumer may take before it is abandoned (default
    /// 10 s; librdkafka's close can hang when the broker is gone).
    pub fn close_timeout(mut self, timeout: Duration) -> Self {
        self.close_timeout = timeout;
        self
    }

    /// Sets any librdkafka producer property, overriding the ones above.
    pub fn producer_option(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.producer.push((key.into(), value.into()));
        self
    }

    /// Sets any librdkafka consumer property, overriding the ones above.
    pub fn consumer_option(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.consumer.push((key.into(), value.into()));
        self
    }

    fn base(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.brokers)
            .set("client.id", &self.client_id);
        config
    }

    fn producer_config(&self) -> ClientConfig {
        let mut config = self.base();
        config
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("partitioner", "murmur2_random")
            .set("linger.ms", millis(self.linger))
            .set("message.timeout.ms", "30000");
        for (k, v) in &self.producer {
            config.set(k, v);
        }
        config
    }

    fn consumer_config(&self, group: &str) -> ClientConfig {
        let mut config = self.base();
        config
            .set("group.id", group)
            .set("enable.auto.commit", "true")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("auto.commit.interval.ms", millis(self.commit_interval))
            .set("session.timeout.ms", millis(self.session_timeout))
            .set("max.poll.interval.ms", millis(self.max_poll_interval))
            .set(
                "statistics.interval.ms",
                self.lag_interval.as_millis().to_string(),
            );
        for (k, v) in &self.consumer {
            config.set(k, v);
        }
        config
    }
}

fn millis(d: Duration) -> String {
    d.as_millis().max(1).to_string()
}

/// A Kafka bus: an idempotent producer, and consumers made per subscription.
/// Cheap to clone; clones share the producer.
#[derive(Clone)]
pub struct KafkaBus {
    inner: Arc<Inner>,
}

struct Inner {
    config: KafkaConfig,
    producer: FutureProducer,
}

impl std::fmt::Debug for KafkaBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaBus")
            .field("brokers", &self.inner.config.brokers)
            .finish_non_exhaustive()
    }
}

impl KafkaBus {
    /// Makes the producer; connects lazily.
    ///
    /// # Errors
    ///
    /// [`Error::Kafka`] when the configuration is rejected.
    pub fn new(config: KafkaConfig) -> Result<Self> {
        let producer = config.producer_config().create()?;
        Ok(Self {
            inner: Arc::new(Inner { config, producer }),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &KafkaConfig {
        &self.inner.config
    }

    /// Creates `topic` with `partitions` partitions (replication factor 1
    /// unless `replication` says otherwise); a topic that exists already is
    /// not an error.
    ///
    /// # Errors
    ///
    /// [`Error::Kafka`] when the broker refuses.
    pub async fn create_topic(&self, topic: &str, partitions: i32, replication: i32) -> Result<()> {
        let admin: AdminClient<DefaultClientContext> = self.inner.config.base().create()?;
        let new = NewTopic::new(topic, partitions, TopicReplication::Fixed(replication));
        let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
        for result in admin.create_topics([&new], &options).await? {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((_, code)) => return Err(Error::Kafka(KafkaError::AdminOp(code))),
            }
        }
        Ok(())
    }

    /// Waits until every record sent so far is delivered, up to `timeout`.
    ///
    /// # Errors
    ///
    /// [`Error::Kafka`] when records are still in flight at the deadline.
    pub async fn flush(&self, timeout: Duration) -> Result<()> {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || {
            rdkafka::producer::Producer::flush(&inner.producer, timeout)
        })
        .await
        .map_err(Error::Task)??;
        Ok(())
    }
}

impl Publisher for KafkaBus {
    fn publish_records<'a>(
        &'a self,
        topic: &'a str,
        records: Vec<Record>,
    ) -> BoxFuture<'a, Result<Vec<Delivery>>> {
        Box::pin(async move {
            let n = records.len();
            let mut pending = Vec::with_capacity(n);
            for record in &records {
                let mut headers = OwnedHeaders::new_with_capacity(record.headers.len());
                for (key, value) in &record.headers {
                    headers = headers.insert(Header {
                        key,
                        value: Some(value),
                    });
                }
                let mut outgoing = FutureRecord::<[u8], [u8]>::to(topic)
                    .payload(&record.payload)
                    .headers(headers);
                if let Some(key) = &record.key {
                    outgoing = outgoing.key(key);
                }
                loop {
                    match self.inner.producer.send_result(outgoing) {
                        Ok(delivery) => {
                            pending.push(delivery);
                            break;
                        }
                        Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                            // The local queue is full: let librdkafka send.
                            outgoing = back;
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                        Err((e, _)) => return Err(Error::Kafka(e)),
                    }
                }
            }
            let mut deliveries = Vec::with_capacity(n);
            for delivery in pending {
                match delivery.await {
                    Ok(Ok(d)) => deliveries.push(Delivery::new(topic, d.partition, d.offset)),
                    Ok(Err((e, _))) => return Err(Error::Kafka(e)),
                    Err(_) => return Err(Error::Closed),
                }
            }
            metrics::published(topic, n);
            Ok(deliveries)
        })
    }
}

impl Subscriber for KafkaBus {
    fn open<'a>(
        &'a self,
        topic: &'a str,
        group: &'a str,
    ) -> BoxFuture<'a, Result<Box<dyn Source>>> {
        Box::pin(async move {
            let consumer: StreamConsumer<LagReporter> = self
                .inner
                .config
                .consumer_config(group)
                .create_with_context(LagReporter {
                    group: group.to_owned(),
                })?;
            consumer.subscribe(&[topic])?;
            Ok(Box::new(KafkaSource {
                topic: topic.to_owned(),
                consumer: Mutex::new(Some(Arc::new(consumer))),
                close_timeout: self.inner.config.close_timeout,
            }) as Box<dyn Source>)
        })
    }

    fn dead_letter_publisher(&self) -> Arc<dyn Publisher> {
        Arc::new(self.clone())
    }
}

/// Turns librdkafka's statistics into the consumer lag gauge.
struct LagReporter {
    group: String,
}

impl ClientContext for LagReporter {
    fn stats(&self, statistics: Statistics) {
        for (topic, t) in &statistics.topics {
            for (&partition, p) in &t.partitions {
                // Offsets are stored as events finish, so the stored lag is the
                // current one; -1 marks a partition this member does not own.
                let lag = if p.consumer_lag_stored >= 0 {
                    p.consumer_lag_stored
                } else {
                    p.consumer_lag
                };
                if partition >= 0 && lag >= 0 {
                    metrics::group_lag(topic, &self.group, partition, lag);
                }
            }
        }
    }
}

impl ConsumerContext for LagReporter {}

/// One consumer of a group.
struct KafkaSource {
    topic: String,
    consumer: Mutex<Option<Arc<StreamConsumer<LagReporter>>>>,
    close_timeout: Duration,
}

impl KafkaSource {
    fn consumer(&self) -> Result<Arc<StreamConsumer<LagReporter>>> {
        self.consumer
            .lock()
            .expect("kafka source lock")
            .clone()
            .ok_or(Error::Closed)
    }
}

impl Source for KafkaSource {
    fn next(&self) -> BoxFuture<'_, Result<ReceivedRecord>> {
        Box::pin(async move {
            let consumer = self.consumer()?;
            let message = consumer.recv().await?;
            let headers = message
                .headers()
                .map(|h| {
                    h.iter()
                        .map(|h| (h.key.to_owned(), h.value.unwrap_or_default().to_vec()))
                        .collect()
                })
                .unwrap_or_default();
            let record = Record {
                key: message.key().map(<[u8]>::to_vec),
                headers,
                payload: message.payload().unwrap_or_default().to_vec(),
            };
            Ok(ReceivedRecord::new(
                message.topic(),
                message.partition(),
                message.offset(),
                record,
            ))
        })
    }

    fn commit(&self, partition: i32, next_offset: i64) -> Result<()> {
        let consumer = self.consumer()?;
        let mut offsets = TopicPartitionList::new();
        offsets.add_partition_offset(&self.topic, partition, Offset::Offset(next_offset))?;
        consumer.store_offsets(&offsets)?;
        Ok(())
    }

    fn close(&self) -> BoxFuture<'_, Result<()>> {
        let consumer = self.consumer.lock().expect("kafka source lock").take();
        let timeout = self.close_timeout;
        Box::pin(async move {
            let Some(consumer) = consumer else {
                return Ok(());
            };
            // Committing and leaving the group block on the network, and
            // librdkafka's close has been seen to hang: do it on a thread of
            // its own, and give up waiting after the timeout.
            let closing = tokio::task::spawn_blocking(move || {
                let committed = match consumer.commit_consumer_state(CommitMode::Sync) {
                    Ok(()) | Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => Ok(()),
                    Err(e) => Err(Error::Kafka(e)),
                };
                consumer.unsubscribe();
                drop(consumer);
                committed
            });
            match tokio::time::timeout(timeout, closing).await {
                Ok(joined) => joined.map_err(Error::Task)?,
                Err(_) => {
                    tracing::warn!("closing a kafka consumer timed out; abandoning it");
                    Ok(())
                }
            }
        })
    }
}

impl Drop for KafkaSource {
    fn drop(&mut self) {
        if let Some(consumer) = self.consumer.get_mut().ok().and_then(Option::take) {
            // Dropped without `close` (the subscription was aborted):
            // librdkafka's destructor blocks, keep it off the runtime.
            std::thread::spawn(move || drop(consumer));
        }
    }
}
