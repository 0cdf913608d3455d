//! The in-memory bus: the embedded default, with Kafka's semantics.
//!
//! Topics are split into partitions; a record goes to the partition of its
//! key's hash (Kafka's murmur2, so keys land where a Kafka producer would put
//! them), records without a key go round robin. A consumer group shares a
//! topic's partitions among its members and remembers, per partition, the
//! offset it committed; a member that joins or leaves reshuffles the
//! partitions, and whoever gets a partition resumes at its committed offset.
//! Records are kept for the life of the bus (no retention).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use micro_core::service::BoxFuture;
use tokio::sync::watch;

use crate::error::{Error, Result};
use crate::metrics;
use crate::publish::Publisher;
use crate::record::{partition_for_key, Delivery, ReceivedRecord, Record};
use crate::subscribe::{Source, Subscriber};

/// An in-memory bus: cheap to clone, every clone is the same bus.
///
/// Topics are created on first use with the bus's default number of
/// partitions, or beforehand with [`create_topic`](Self::create_topic).
#[derive(Clone)]
pub struct MemoryBus {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for MemoryBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryBus")
            .field("default_partitions", &self.inner.default_partitions)
            .finish_non_exhaustive()
    }
}

struct Inner {
    default_partitions: i32,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    topics: HashMap<String, Topic>,
    next_member: u64,
}

struct Topic {
    partitions: Vec<Vec<Arc<Record>>>,
    round_robin: usize,
    groups: HashMap<String, Group>,
    /// Bumped on every append and rebalance; members wait on it.
    changed: watch::Sender<u64>,
}

#[derive(Default)]
struct Group {
    committed: HashMap<i32, i64>,
    members: BTreeMap<u64, Member>,
}

#[derive(Default)]
struct Member {
    /// Assigned partitions and the next offset to read from each.
    positions: BTreeMap<i32, i64>,
    cursor: usize,
}

impl Default for MemoryBus {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryBus {
    /// A bus whose topics get 4 partitions unless created otherwise.
    pub fn new() -> Self {
        Self::with_partitions(4)
    }

    /// A bus whose topics get `partitions` partitions (at least 1) unless
    /// created otherwise.
    pub fn with_partitions(partitions: i32) -> Self {
        Self {
            inner: Arc::new(Inner {
                default_partitions: partitions.max(1),
                state: Mutex::new(State::default()),
            }),
        }
    }

    /// Creates `topic` with `partitions` partitions; does nothing if it
    /// exists with that many.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidTopic`] when `partitions` is below 1 or the topic
    /// exists with another number of partitions.
    pub fn create_topic(&self, topic: &str, partitions: i32) -> Result<()> {
        if partitions < 1 {
            return Err(invalid(topic, "a topic needs at least one partition"));
        }
        let mut state = self.state();
        match state.topics.get(topic) {
            Some(t) if t.partitions.len() == partitions as usize => Ok(()),
            Some(_) => Err(invalid(topic, "exists with another number of partitions")),
            None => {
                state
                    .topics
                    .insert(topic.to_owned(), Topic::new(partitions));
                Ok(())
            }
        }
    }

    /// Every record of `topic` in partition then offset order, as a consumer
    /// would read them; empty when the topic does not exist. For tests and
    /// tools: reading a dead-letter topic, say.
    pub fn records(&self, topic: &str) -> Vec<ReceivedRecord> {
        let state = self.state();
        let Some(t) = state.topics.get(topic) else {
            return Vec::new();
        };
        t.partitions
            .iter()
            .enumerate()
            .flat_map(|(p, records)| {
                records.iter().enumerate().map(move |(o, r)| {
                    ReceivedRecord::new(topic, p as i32, o as i64, Record::clone(r))
                        .with_high_watermark(records.len() as i64)
                })
            })
            .collect()
    }

    /// The offsets `group` committed on `topic`, by partition.
    pub fn committed(&self, topic: &str, group: &str) -> BTreeMap<i32, i64> {
        let state = self.state();
        state
            .topics
            .get(topic)
            .and_then(|t| t.groups.get(group))
            .map(|g| g.committed.iter().map(|(&p, &o)| (p, o)).collect())
            .unwrap_or_default()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.inner.state.lock().expect("memory bus lock")
    }
}

fn invalid(topic: &str, reason: &'static str) -> Error {
    Error::InvalidTopic {
        topic: topic.to_owned(),
        reason,
    }
}

impl Inner {
    fn topic<'s>(&self, state: &'s mut State, topic: &str) -> Result<&'s mut Topic> {
        if topic.is_empty() {
            return Err(invalid(topic, "the name is empty"));
        }
        Ok(state
            .topics
            .entry(topic.to_owned())
            .or_insert_with(|| Topic::new(self.default_partitions)))
    }
}

impl Topic {
    fn new(partitions: i32) -> Self {
        Self {
            partitions: (0..partitions).map(|_| Vec::new()).collect(),
            round_robin: 0,
            groups: HashMap::new(),
            changed: watch::channel(0).0,
        }
    }

    fn notify(&self) {
        self.changed.send_modify(|v| *v += 1);
    }

    /// Shares the partitions among the group's members, in member order;
    /// a member keeps its position in a partition it keeps, and starts at the
    /// committed offset in one it gets.
    fn rebalance(&mut self, group: &str) {
        let partitions = self.partitions.len() as i32;
        let Some(g) = self.groups.get_mut(group) else {
            return;
        };
        let count = g.members.len();
        for (index, member) in g.members.values_mut().enumerate() {
            let mut positions = BTreeMap::new();
            for p in (0..partitions).filter(|p| *p as usize % count == index) {
                let start = member
                    .positions
                    .get(&p)
                    .copied()
                    .unwrap_or_else(|| g.committed.get(&p).copied().unwrap_or(0));
                positions.insert(p, start);
            }
            member.positions = positions;
        }
        self.notify();
    }
}

impl Publisher for MemoryBus {
    fn publish_records<'a>(
        &'a self,
        topic: &'a str,
        records: Vec<Record>,
    ) -> BoxFuture<'a, Result<Vec<Delivery>>> {
        let result = (|| {
            let mut state = self.state();
            let t = self.inner.topic(&mut state, topic)?;
            let count = t.partitions.len() as i32;
            let n = records.len();
            let deliveries = records
                .into_iter()
                .map(|record| {
                    let partition = match &record.key {
                        Some(key) => partition_for_key(key, count),
                        None => {
                            t.round_robin = t.round_robin.wrapping_add(1);
                            (t.round_robin % count as usize) as i32
                        }
                    };
                    let log = &mut t.partitions[partition as usize];
                    log.push(Arc::new(record));
                    Delivery::new(topic, partition, log.len() as i64 - 1)
                })
                .collect();
            t.notify();
            metrics::published(topic, n);
            Ok(deliveries)
        })();
        Box::pin(std::future::ready(result))
    }
}

impl Subscriber for MemoryBus {
    fn open<'a>(
        &'a self,
        topic: &'a str,
        group: &'a str,
    ) -> BoxFuture<'a, Result<Box<dyn Source>>> {
        let result = (|| {
            let mut state = self.state();
            let member = state.next_member;
            state.next_member += 1;
            let t = self.inner.topic(&mut state, topic)?;
            t.groups
                .entry(group.to_owned())
                .or_default()
                .members
                .insert(member, Member::default());
            t.rebalance(group);
            let changed = t.changed.subscribe();
            Ok(Box::new(MemorySource {
                bus: self.clone(),
                topic: topic.to_owned(),
                group: group.to_owned(),
                member,
                changed: Mutex::new(changed),
                closed: AtomicBool::new(false),
            }) as Box<dyn Source>)
        })();
        Box::pin(std::future::ready(result))
    }

    fn dead_letter_publisher(&self) -> Arc<dyn Publisher> {
        Arc::new(self.clone())
    }
}

/// One member of a consumer group on a [`MemoryBus`].
struct MemorySource {
    bus: MemoryBus,
    topic: String,
    group: String,
    member: u64,
    changed: Mutex<watch::Receiver<u64>>,
    closed: AtomicBool,
}

impl MemorySource {
    /// The next record of one of this member's partitions, taking turns
    /// among them; `None` when all are read to the end.
    fn take(&self) -> Result<Option<ReceivedRecord>> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::Closed);
        }
        let mut state = self.bus.state();
        let t = state.topics.get_mut(&self.topic).ok_or(Error::Closed)?;
        let member = t
            .groups
            .get_mut(&self.group)
            .and_then(|g| g.members.get_mut(&self.member))
            .ok_or(Error::Closed)?;
        let assigned = member.positions.len();
        for i in 0..assigned {
            let index = (member.cursor + i) % assigned;
            let (&partition, position) = member
                .positions
                .iter_mut()
                .nth(index)
                .expect("index is in range");
            let log = &t.partitions[partition as usize];
            if let Some(record) = log.get(*position as usize) {
                let offset = *position;
                *position += 1;
                member.cursor = index + 1;
                return Ok(Some(
                    ReceivedRecord::new(&self.topic, partition, offset, Record::clone(record))
                        .with_high_watermark(log.len() as i64),
                ));
            }
        }
        Ok(None)
    }

    fn leave(&self) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        let mut state = self.bus.state();
        if let Some(t) = state.topics.get_mut(&self.topic) {
            if let Some(g) = t.groups.get_mut(&self.group) {
                g.members.remove(&self.member);
            }
            t.rebalance(&self.group);
        }
    }
}

impl Source for MemorySource {
    fn next(&self) -> BoxFuture<'_, Result<ReceivedRecord>> {
        Box::pin(async move {
            loop {
                let mut changed = self.changed.lock().expect("memory source lock").clone();
                changed.borrow_and_update();
                if let Some(record) = self.take()? {
                    return Ok(record);
                }
                if changed.changed().await.is_err() {
                    return Err(Error::Closed);
                }
                if self.closed.load(Ordering::Acquire) {
                    return Err(Error::Closed);
                }
            }
        })
    }

    fn commit(&self, partition: i32, next_offset: i64) -> Result<()> {
        let mut state = self.bus.state();
        let group = state
            .topics
            .get_mut(&self.topic)
            .and_then(|t| t.groups.get_mut(&self.group))
            .ok_or(Error::Closed)?;
        let committed = group.committed.entry(partition).or_insert(0);
        *committed = (*committed).max(next_offset);
        Ok(())
    }

    fn close(&self) -> BoxFuture<'_, Result<()>> {
        self.leave();
        Box::pin(std::future::ready(Ok(())))
    }
}

impl Drop for MemorySource {
    fn drop(&mut self) {
        self.leave();
    }
}
