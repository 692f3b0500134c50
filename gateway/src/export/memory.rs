//! An [`ExportSource`] in memory: records and the export marker in a mutex. For tests, and
//! for anything that wants the exporter without a durable store; nothing survives the
//! process, but it survives the exporter, so a test can restart one over it.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::{Mutex, MutexGuard, PoisonError};

use serde_json::{Map, Value};

use super::{ExportError, ExportSource};

/// Records appended in `Seq` order (1, 2, ...) under one `StreamId`, and the marker.
#[derive(Debug)]
pub struct MemorySource {
    stream_id: String,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    records: BTreeMap<u64, Value>,
    exported_up_to: u64,
}

impl MemorySource {
    /// An empty source whose records carry `stream_id`.
    pub fn new(stream_id: impl Into<String>) -> Self {
        MemorySource {
            stream_id: stream_id.into(),
            state: Mutex::new(State::default()),
        }
    }

    /// Appends a record, setting its `StreamId` and the next `Seq`; returns that `Seq`.
    pub fn append(&self, mut record: Map<String, Value>) -> u64 {
        let mut state = self.state();
        let seq = state.records.keys().next_back().copied().unwrap_or(0) + 1;
        record.insert("StreamId".to_owned(), Value::from(self.stream_id.as_str()));
        record.insert("Seq".to_owned(), Value::from(seq));
        state.records.insert(seq, Value::Object(record));
        seq
    }

    /// Every record held, in order, as appended (content included).
    pub fn records(&self) -> Vec<Value> {
        self.state().records.values().cloned().collect()
    }

    /// The `StreamId` of the records.
    pub fn stream_id(&self) -> &str {
        &self.stream_id
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl ExportSource for MemorySource {
    fn read_after(&self, after: u64, max: usize) -> Result<Vec<Value>, ExportError> {
        let state = self.state();
        Ok(state
            .records
            .range((Bound::Excluded(after), Bound::Unbounded))
            .take(max)
            .map(|(_, record)| record.clone())
            .collect())
    }

    fn exported_up_to(&self) -> Result<u64, ExportError> {
        Ok(self.state().exported_up_to)
    }

    /// Moves the marker forward; a mark behind it is ignored, so the marker never goes back.
    fn mark_exported(&self, seq: u64) -> Result<(), ExportError> {
        let mut state = self.state();
        state.exported_up_to = state.exported_up_to.max(seq);
        Ok(())
    }
}
