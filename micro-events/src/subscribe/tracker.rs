//! Which offsets may be committed: per partition, the end of the longest run
//! of finished records from the last commit on.
//!
//! Records of one partition finish out of order (different keys run
//! concurrently), but the committed offset means "everything before this is
//! done", so it only moves past a record once every earlier one has finished.

use std::collections::{BTreeMap, HashMap};

#[derive(Debug, Default)]
pub(crate) struct Tracker {
    partitions: HashMap<i32, Partition>,
}

#[derive(Debug)]
struct Partition {
    /// The offset the group resumes at: everything before it is done.
    committable: i64,
    /// Received offsets not finished yet, with how many deliveries of each
    /// are outstanding (a rebalance may deliver a record twice).
    pending: BTreeMap<i64, u32>,
    /// One past the highest offset finished so far.
    end: i64,
}

impl Tracker {
    /// Notes that `offset` was received and is being handled.
    pub(crate) fn received(&mut self, partition: i32, offset: i64) {
        *self
            .partitions
            .entry(partition)
            .or_insert_with(|| Partition {
                committable: offset,
                pending: BTreeMap::new(),
                end: offset,
            })
            .pending
            .entry(offset)
            .or_default() += 1;
    }

    /// Notes that `offset` is done; returns the new offset to commit for the
    /// partition when it moved.
    pub(crate) fn finished(&mut self, partition: i32, offset: i64) -> Option<i64> {
        let p = self.partitions.get_mut(&partition)?;
        match p.pending.get_mut(&offset) {
            Some(n) if *n > 1 => {
                *n -= 1;
                return None;
            }
            Some(_) => {
                p.pending.remove(&offset);
            }
            None => return None,
        }
        p.end = p.end.max(offset + 1);
        // Everything before the oldest unfinished record is done.
        let candidate = match p.pending.first_key_value() {
            Some((&oldest, _)) => oldest.min(p.end),
            None => p.end,
        };
        (candidate > p.committable).then(|| {
            p.committable = candidate;
            candidate
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn commits_only_contiguous_prefixes() {
        let mut t = Tracker::default();
        for o in 0..4 {
            t.received(0, o);
        }
        assert_eq!(t.finished(0, 2), None);
        assert_eq!(t.finished(0, 1), None);
        assert_eq!(t.finished(0, 0), Some(3));
        assert_eq!(t.finished(0, 3), Some(4));
    }

    #[test]
    fn partitions_are_independent() {
        let mut t = Tracker::default();
        t.received(0, 10);
        t.received(1, 5);
        assert_eq!(t.finished(1, 5), Some(6));
        assert_eq!(t.finished(0, 10), Some(11));
        assert_eq!(t.finished(0, 10), None, "unknown offsets are ignored");
    }

    #[test]
    fn redelivered_records_do_not_move_the_commit_back() {
        let mut t = Tracker::default();
        t.received(0, 0);
        t.received(0, 1);
        assert_eq!(t.finished(0, 1), None);
        t.received(0, 0);
        assert_eq!(t.finished(0, 0), None, "one delivery of 0 is outstanding");
        assert_eq!(t.finished(0, 0), Some(2));
        t.received(0, 1);
        assert_eq!(t.finished(0, 1), None);
    }

    proptest! {
        #[test]
        fn the_commit_never_passes_an_unfinished_record(
            order in Just((0..30i64).collect::<Vec<_>>()).prop_shuffle(),
        ) {
            let mut t = Tracker::default();
            for o in 0..30 {
                t.received(3, o);
            }
            let mut done = std::collections::HashSet::new();
            let mut last = 0;
            for o in order {
                done.insert(o);
                if let Some(c) = t.finished(3, o) {
                    prop_assert!(c > last);
                    prop_assert!((0..c).all(|x| done.contains(&x)));
                    last = c;
                }
            }
            prop_assert_eq!(last, 30);
        }
    }
}
