//! Records: what a bus stores and delivers, below the typed event.

use std::fmt;

/// The headers of a record, in order; names may repeat, values are bytes.
pub type Headers = Vec<(String, Vec<u8>)>;

/// A record on its way to a topic: partition key, headers and body.
///
/// Events become records in the CloudEvents binary mode (attributes as `ce_`
/// headers, data as the body); [`PublisherExt::publish`](crate::PublisherExt::publish)
/// does that for you. Build a record directly to forward one unchanged (a dead
/// letter, an outbox row).
#[derive(Clone, PartialEq, Eq)]
pub struct Record {
    /// The partition key: records with the same key go to the same partition,
    /// in order. `None` spreads records over partitions.
    pub key: Option<Vec<u8>>,
    /// The headers.
    pub headers: Headers,
    /// The body.
    pub payload: Vec<u8>,
}

impl Record {
    /// A record with `key`, no headers and `payload`.
    pub fn new(key: Option<Vec<u8>>, payload: Vec<u8>) -> Self {
        Self {
            key,
            headers: Vec::new(),
            payload,
        }
    }

    /// The value of the first header called `name` (compared without case).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        header(&self.headers, name)
    }
}

impl fmt::Debug for Record {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Record")
            .field("key", &self.key.as_deref().map(String::from_utf8_lossy))
            .field("headers", &DebugHeaders(&self.headers))
            .field("payload_len", &self.payload.len())
            .finish()
    }
}

/// Where a published record landed: the broker's confirmation.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct Delivery {
    /// The topic.
    pub topic: String,
    /// The partition the record went to.
    pub partition: i32,
    /// The record's offset in that partition.
    pub offset: i64,
}

impl Delivery {
    /// A delivery confirmation; for backend implementations.
    pub fn new(topic: impl Into<String>, partition: i32, offset: i64) -> Self {
        Self {
            topic: topic.into(),
            partition,
            offset,
        }
    }
}

/// A record read from a topic, with its position.
#[derive(Clone)]
#[non_exhaustive]
pub struct ReceivedRecord {
    /// The topic it was read from.
    pub topic: String,
    /// Its partition.
    pub partition: i32,
    /// Its offset in the partition.
    pub offset: i64,
    /// The partition key, if any.
    pub key: Option<Vec<u8>>,
    /// The headers.
    pub headers: Headers,
    /// The body.
    pub payload: Vec<u8>,
    /// The partition's high watermark (the offset the next record will get)
    /// when the backend knows it; consumer lag is computed from it.
    pub high_watermark: Option<i64>,
}

impl ReceivedRecord {
    /// A received record; for backend implementations.
    pub fn new(topic: impl Into<String>, partition: i32, offset: i64, record: Record) -> Self {
        Self {
            topic: topic.into(),
            partition,
            offset,
            key: record.key,
            headers: record.headers,
            payload: record.payload,
            high_watermark: None,
        }
    }

    /// Sets the partition's high watermark.
    pub fn with_high_watermark(mut self, high_watermark: i64) -> Self {
        self.high_watermark = Some(high_watermark);
        self
    }

    /// The value of the first header called `name` (compared without case).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        header(&self.headers, name)
    }
}

impl fmt::Debug for ReceivedRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReceivedRecord")
            .field("topic", &self.topic)
            .field("partition", &self.partition)
            .field("offset", &self.offset)
            .field("key", &self.key.as_deref().map(String::from_utf8_lossy))
            .field("headers", &DebugHeaders(&self.headers))
            .field("payload_len", &self.payload.len())
            .finish()
    }
}

fn header<'a>(headers: &'a Headers, name: &str) -> Option<&'a [u8]> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_slice())
}

struct DebugHeaders<'a>(&'a Headers);

impl fmt::Debug for DebugHeaders<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(
                self.0
                    .iter()
                    .map(|(n, v)| (n.as_str(), String::from_utf8_lossy(v))),
            )
            .finish()
    }
}

/// The partition of `key` among `partitions`, as Kafka's default partitioner
/// chooses it (murmur2 of the key bytes, sign bit cleared), so that the memory
/// bus spreads keys exactly as a Kafka producer would.
pub(crate) fn partition_for_key(key: &[u8], partitions: i32) -> i32 {
    debug_assert!(partitions > 0);
    ((murmur2(key) & 0x7fff_ffff) % partitions as u32) as i32
}

/// Kafka's murmur2 (the Java client's `Utils.murmur2`).
fn murmur2(data: &[u8]) -> u32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let mut h = SEED ^ data.len() as u32;
    let mut chunks = data.chunks_exact(4);
    for chunk in &mut chunks {
        let mut k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let rest = chunks.remainder();
    if rest.len() >= 3 {
        h ^= u32::from(rest[2]) << 16;
    }
    if rest.len() >= 2 {
        h ^= u32::from(rest[1]) << 8;
    }
    if !rest.is_empty() {
        h ^= u32::from(rest[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn murmur2_matches_the_java_client() {
        // Values from the Kafka Java client's UtilsTest.
        assert_eq!(murmur2(b"21") as i32, -973932308);
        assert_eq!(murmur2(b"foobar") as i32, -790332482);
        assert_eq!(murmur2(b"a-little-bit-long-string") as i32, -985981536);
        assert_eq!(murmur2(b"a-little-bit-longer-string") as i32, -1486304829);
        assert_eq!(
            murmur2(b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8") as i32,
            -58897971
        );
        assert_eq!(murmur2(b"abc") as i32, 479470107);
    }

    #[test]
    fn partitions_are_in_range_and_stable() {
        for key in ["a", "order-1", "", "🦀"] {
            let p = partition_for_key(key.as_bytes(), 7);
            assert!((0..7).contains(&p));
            assert_eq!(p, partition_for_key(key.as_bytes(), 7));
        }
    }

    #[test]
    fn headers_are_found_without_case() {
        let mut record = Record::new(None, Vec::new());
        record.headers.push(("Content-Type".into(), b"x".to_vec()));
        assert_eq!(record.header("content-type"), Some(&b"x"[..]));
        assert_eq!(record.header("other"), None);
    }
}
