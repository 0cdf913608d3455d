use std::collections::HashMap;
use std::fmt;
use std::sync::{Mutex, MutexGuard};

use super::{
    refuse_lease, validate_append, Append, LogError, NewSaga, SagaLog, SagaRecord, SagaSummary,
};
use crate::definition::BoxFuture;
use crate::state::SagaStatus;

/// A saga log in memory: the embedded default for tests and for sagas that
/// may be lost with the process. Cheap to create; share it in an `Arc`.
/// Single-process by nature, it holds no leases (a fenced write is refused
/// with [`LogError::LeasesUnsupported`]).
///
/// A `std` mutex guards the map: it is held only to copy a record in or out,
/// never across an `.await`, so an async lock would buy nothing.
#[derive(Default)]
pub struct MemorySagaLog {
    sagas: Mutex<Sagas>,
}

#[derive(Default)]
struct Sagas {
    next_order: u64,
    by_id: HashMap<String, (u64, SagaRecord)>,
}

impl MemorySagaLog {
    /// An empty log.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many sagas it holds.
    pub fn len(&self) -> usize {
        self.lock().by_id.len()
    }

    /// Whether it holds no saga.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> MutexGuard<'_, Sagas> {
        // A panic elsewhere cannot leave a record half written: each write
        // replaces whole values.
        self.sagas.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn list(&self, keep: impl Fn(SagaStatus) -> bool) -> Vec<SagaSummary> {
        let sagas = self.lock();
        let mut found: Vec<_> = sagas
            .by_id
            .values()
            .filter(|(_, r)| keep(r.status))
            .map(|(order, r)| (*order, r.summary()))
            .collect();
        found.sort_by_key(|(order, _)| *order);
        found.into_iter().map(|(_, s)| s).collect()
    }
}

impl fmt::Debug for MemorySagaLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemorySagaLog")
            .field("sagas", &self.len())
            .finish()
    }
}

impl SagaLog for MemorySagaLog {
    fn create<'a>(&'a self, saga: &'a NewSaga) -> BoxFuture<'a, Result<(), LogError>> {
        let mut sagas = self.lock();
        let result = if sagas.by_id.contains_key(&saga.saga_id) {
            Err(LogError::AlreadyExists {
                saga_id: saga.saga_id.clone(),
            })
        } else {
            let order = sagas.next_order;
            sagas.next_order += 1;
            let record = SagaRecord::new(
                saga.saga_id.clone(),
                saga.definition.clone(),
                SagaStatus::Running,
                saga.context.clone(),
                saga.trace_parent.clone(),
                vec![saga.started.clone()],
            );
            sagas.by_id.insert(saga.saga_id.clone(), (order, record));
            Ok(())
        };
        Box::pin(std::future::ready(result))
    }

    fn append<'a>(&'a self, append: &'a Append) -> BoxFuture<'a, Result<u64, LogError>> {
        let result = validate_append(append)
            .and_then(|()| refuse_lease(append))
            .and_then(|()| {
                let mut sagas = self.lock();
                let (_, record) =
                    sagas
                        .by_id
                        .get_mut(&append.saga_id)
                        .ok_or_else(|| LogError::NotFound {
                            saga_id: append.saga_id.clone(),
                        })?;
                if record.version() != append.expected_version {
                    return Err(LogError::Conflict {
                        saga_id: append.saga_id.clone(),
                        expected: append.expected_version,
                        actual: record.version(),
                    });
                }
                record
                    .transitions
                    .extend(append.transitions.iter().cloned());
                record.status = append.status;
                record.context = append.context.clone();
                Ok(record.version())
            });
        Box::pin(std::future::ready(result))
    }

    fn load<'a>(&'a self, saga_id: &'a str) -> BoxFuture<'a, Result<Option<SagaRecord>, LogError>> {
        let record = self.lock().by_id.get(saga_id).map(|(_, r)| r.clone());
        Box::pin(std::future::ready(Ok(record)))
    }

    fn unfinished(&self) -> BoxFuture<'_, Result<Vec<SagaSummary>, LogError>> {
        Box::pin(std::future::ready(Ok(self.list(|s| !s.is_terminal()))))
    }

    fn by_status(&self, status: SagaStatus) -> BoxFuture<'_, Result<Vec<SagaSummary>, LogError>> {
        Box::pin(std::future::ready(Ok(self.list(|s| s == status))))
    }
}
