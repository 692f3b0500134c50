//! The tamper-evident audit log: records in the DESIGN.md schema, hash-chained and signed,
//! made durable in an embedded sled store by group commit before they are acknowledged, and
//! copied to daily JSONL files (and optionally stdout).
//!
//! - [`record`]: the columns and the size cap; [`jcs`]: RFC 8785 canonical JSON;
//!   [`chain`]: `Seq`/`PrevHash`/`RecordHash` and checkpoint messages; [`key`]: the Ed25519
//!   device key.
//! - [`store`]: the one writer thread that owns the chain; [`files`]: the JSONL copies;
//!   [`syslog`]: the optional RFC 5424 / CEF copy for a local collector.
//! - [`content`]: prompt and completion text, where `[audit.content]` turns it on, and what
//!   of it may leave the appliance.
//! - [`verify`]: `isthmus audit verify`.
//!
//! The gateway opens one [`AuditLog`] at start, queues [`AuditLog::submit_intent`] before a
//! request is handled (durable with the next commit anybody awaits, at most 100 ms later),
//! awaits [`AuditLog::append`] before a response's final bytes, answers 503 while
//! [`AuditLog::is_healthy`] is false (with `fail_closed`), and calls [`AuditLog::shutdown`]
//! after draining.

pub mod chain;
pub mod content;
pub mod files;
pub mod jcs;
pub mod key;
pub mod record;
pub mod report;
pub mod store;
pub mod syslog;
pub mod verify;

#[cfg(test)]
mod tests;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

pub use record::{Category, Level, Record, RecordBuilder, ResultType};
pub use store::{AuditLog, Receipt};

/// Sub-directory of the state directory that holds the sled store.
pub const STORE_DIRECTORY_NAME: &str = "audit-store";
/// Sub-directory of the state directory that holds the JSONL files by default.
pub const FILES_DIRECTORY_NAME: &str = "audit";
/// Records younger than this many days are never deleted, whatever the byte bound says.
pub const RETENTION_DAYS_MIN: u32 = 2;
/// The most records allowed between checkpoints (`audit.checkpoint_every_records`). Each
/// epoch's start record names its own figure (`CheckpointEveryRecords`), and `audit verify`
/// refuses a longer run without a checkpoint, never trusting a figure above this one: a
/// chain rewritten with its checkpoints left out shows once more records follow the change.
pub const CHECKPOINT_EVERY_RECORDS_MAX: u64 = 100_000;
/// The start record's property naming the epoch's checkpoint interval in records.
pub const CHECKPOINT_EVERY_RECORDS_PROPERTY: &str = "CheckpointEveryRecords";

/// The validated `[audit]` section plus where the state lives.
#[derive(Debug, Clone)]
pub struct AuditConfig {
    /// The state directory: the store (`audit-store/`) and the device key live here.
    pub state_directory: PathBuf,
    /// Where the `audit-YYYYMMDD.jsonl` files go (`None`: no files).
    pub directory: Option<PathBuf>,
    /// A checkpoint after this many records.
    pub checkpoint_every_records: u64,
    /// A checkpoint when records were written and this long has passed since the last one.
    pub checkpoint_every_ms: u64,
    /// Bound on the store and on the files (each), in bytes.
    pub retention_bytes_max: u64,
    /// Records older than this are deleted once exported (at least [`RETENTION_DAYS_MIN`]).
    pub retention_days: u32,
    /// Also write every record to standard output.
    pub stdout: bool,
    /// Whether the gateway refuses requests (503) while records cannot be made durable.
    pub fail_closed: bool,
    /// Whether deletion waits for the exporter's mark ([`AuditLog::mark_exported`]); without
    /// an exporter the files are the export.
    pub retention_requires_export: bool,
    /// Appends waiting for the writer, at most.
    pub queue_records_max: usize,
    /// `GatewayInstance` of the log's own records (lifecycle, checkpoints).
    pub gateway_instance: String,
    /// Also send every durable record to a syslog collector.
    pub syslog: Option<syslog::SyslogConfig>,
}

impl AuditConfig {
    /// Defaults for a state directory: files in `<state>/audit`, a checkpoint every 1,000
    /// records or minute, 1 GiB and 30 days kept, fail closed.
    pub fn new(state_directory: PathBuf) -> AuditConfig {
        AuditConfig {
            directory: Some(state_directory.join(FILES_DIRECTORY_NAME)),
            state_directory,
            checkpoint_every_records: 1000,
            checkpoint_every_ms: 60_000,
            retention_bytes_max: 1 << 30,
            retention_days: 30,
            stdout: false,
            fail_closed: true,
            retention_requires_export: false,
            queue_records_max: 65_536,
            gateway_instance: firmware::host_name().unwrap_or_default(),
            syslog: None,
        }
    }

    /// `<state>/audit-store`.
    pub fn store_directory(&self) -> PathBuf {
        self.state_directory.join(STORE_DIRECTORY_NAME)
    }
}

/// Why a record was not made durable, or the log could not open.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AuditError {
    #[error("audit store is unavailable: {0}")]
    Unavailable(String),
    #[error("audit queue is full ({capacity} records)")]
    QueueFull { capacity: usize },
    #[error("audit log is shut down")]
    Stopped,
    #[error("audit record cannot be canonicalised: {0}")]
    Invalid(String),
    #[error("opening the audit log: {0}")]
    Open(String),
}

/// Where time comes from: the system clock, or a test's.
pub trait Clock: Send + Sync + std::fmt::Debug + 'static {
    /// The wall clock, which the records carry (it may be set, and jump).
    fn now(&self) -> SystemTime;
    /// Time since a fixed point on a clock that only runs forward at the pace of real
    /// time (never set): how long the gateway has run, whatever the wall clock did.
    fn running(&self) -> std::time::Duration;
}

/// The system clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }

    fn running(&self) -> std::time::Duration {
        static ORIGIN: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
        ORIGIN.get_or_init(std::time::Instant::now).elapsed()
    }
}

/// A shared clock.
pub type SharedClock = Arc<dyn Clock>;
