//! The durable log: one writer thread owns the chain and the sled store; callers hand it
//! records through a bounded channel and are acknowledged once their record's group commit has
//! flushed.
//!
//! The writer takes every command waiting (up to [`BATCH_RECORDS_MAX`]), yields the CPU once
//! and takes what arrived meanwhile, seals the records
//! (`Seq`, `PrevHash`, `RecordHash`), adds a checkpoint when one is due, inserts the batch into
//! sled and calls `flush()` once for all of them, then acknowledges each record, copies the
//! batch to stdout and the syslog queue, and applies retention. The JSONL files catch up from
//! the store at most every [`FILES_COPY_INTERVAL_MS`] (one append and fsync for many group
//! commits). The stdout
//! and syslog copies leave the appliance, so they lose content text of requests that did not
//! go to the cloud ([`super::content::line_off_appliance`]). If sled fails, the batch is
//! refused with [`AuditError::Unavailable`], the health flag drops, and the writer reopens the
//! store at most once a second until it works again (writing an `IsthmusLifecycle` record
//! `Isthmus/audit/recovered`).
//!
//! Layout: tree `records` maps `Seq` (big-endian u64) to the record's JSON line; tree `meta`
//! holds `stream_id`, `stored_bytes` (the records' total length), `exported_up_to` (the
//! exporter's mark) and `last_checkpoint` (the newest checkpoint record, the verifier's anchor
//! against a truncated tail).

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use serde_json::{Map, Value};
use tokio::sync::{mpsc, oneshot};

use super::chain::{self, ChainHead, GENESIS_HASH, Sealed};
use super::content;
use super::files::{JsonlFiles, StdoutSink};
use super::key::{self, DeviceKey};
use super::record::{self, Category, Record, ResultType};
use super::syslog::{SyslogMonitor, SyslogSink, SyslogStatus};
use super::{AuditConfig, AuditError, RETENTION_DAYS_MIN, SharedClock, SystemClock};

/// Records sealed and committed in one group commit, at most.
pub const BATCH_RECORDS_MAX: usize = 4096;
/// The writer reopens a failed store at most this often.
const RECOVERY_INTERVAL_MS: u64 = 1000;
/// Age-based retention runs at most this often.
const RETENTION_INTERVAL_MS: u64 = 60_000;
/// The ticker wakes the writer at most this long apart (time-based checkpoints, recovery).
const TICK_INTERVAL_MS_MAX: u64 = 1000;
/// The JSONL files follow the store at most this far behind: records are copied (and the
/// files fsynced) once per interval, not once per group commit, so a response waits for one
/// sync (the store's) and not two.
const FILES_COPY_INTERVAL_MS: u64 = 100;
/// Records nobody waits for that may be held back for the next commit, at most.
const DEFERRED_RECORDS_MAX: usize = 1024;
/// Records read from the store per step when the files catch up.
const CATCH_UP_RECORDS_MAX: usize = 1024;
/// Batches of [`CATCH_UP_RECORDS_MAX`] copied per pass on the commit path: a backlog the
/// files built up while they could not be written (hours of records) is copied a few
/// thousand records per commit, not all before the next commit is acknowledged.
const CATCH_UP_BATCHES_PER_PASS: usize = 8;
/// How often files that cannot be written are tried again.
const FILES_RETRY_INTERVAL_MS: u64 = 1_000;
/// Records deleted per retention step.
const RETENTION_DELETIONS_MAX: usize = 2 * BATCH_RECORDS_MAX;
/// sled's page cache, in bytes.
const STORE_CACHE_BYTES_MAX: u64 = 8 * 1024 * 1024;
/// Debug builds only: milliseconds every group commit waits before it stores, so that the
/// end-to-end tests can hold responses in their audit wait (a slow disk on demand), at most
/// [`TEST_COMMIT_DELAY_MS_MAX`]. Release builds never read it.
pub const TEST_COMMIT_DELAY_ENV: &str = "ISTHMUS_AUDIT_TEST_COMMIT_DELAY_MS";
const TEST_COMMIT_DELAY_MS_MAX: u64 = 10_000;

const RECORDS_TREE: &str = "records";
const META_TREE: &str = "meta";
const META_STREAM_ID: &str = "stream_id";
const META_STORED_BYTES: &str = "stored_bytes";
const META_EXPORTED_UP_TO: &str = "exported_up_to";
/// The day (since 1970, big-endian `u64`) retention last aged records by.
const META_RETENTION_DAY: &str = "retention_day";
/// The newest checkpoint record (its JSON line).
pub const META_LAST_CHECKPOINT: &str = "last_checkpoint";

/// `OperationName`s of the log's own records.
pub const OPERATION_START: &str = "Isthmus/audit/start";
pub const OPERATION_STOP: &str = "Isthmus/audit/stop";
pub const OPERATION_RECOVERED: &str = "Isthmus/audit/recovered";
pub const OPERATION_CHECKPOINT: &str = "Isthmus/audit/checkpoint";
/// `Properties.Phase` of an intent record.
pub const PHASE: &str = "Phase";
pub const PHASE_INTENT: &str = "intent";

/// Proof that a record is durable: where it sits in the chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    pub epoch: u64,
    pub seq: u64,
    pub record_hash: String,
}

type Reply<T> = oneshot::Sender<Result<T, AuditError>>;

/// Records read back from the store: (`Seq`, JSON line).
pub type StoredRecords = Vec<(u64, Vec<u8>)>;

enum Command {
    Append {
        record: Record,
        reply: Reply<Receipt>,
        /// Someone waits for durability: commit (flush) with this batch. Otherwise the record
        /// may wait for the next urgent commit or the next tick.
        urgent: bool,
    },
    MarkExported {
        seq: u64,
        reply: Reply<()>,
    },
    Read {
        from_seq: u64,
        count_max: usize,
        reply: Reply<StoredRecords>,
    },
    ReadLatest {
        count_max: usize,
        reply: Reply<StoredRecords>,
    },
    Tick,
    Shutdown {
        reply: Reply<()>,
    },
}

/// The audit log: a cheap handle to the writer thread. Clones share the writer.
#[derive(Debug, Clone)]
pub struct AuditLog {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    sender: mpsc::Sender<Command>,
    healthy: Arc<AtomicBool>,
    fail_closed: bool,
    queue_records_max: usize,
    stream_id: String,
    /// Mirror of the store's export marker, for the exporter.
    exported_up_to: AtomicU64,
    writer: Mutex<Option<JoinHandle<()>>>,
    syslog: Option<SyslogMonitor>,
    store_directory: PathBuf,
}

/// An append accepted by the writer: resolves once the record is durable.
#[derive(Debug)]
pub struct PendingReceipt {
    receiver: oneshot::Receiver<Result<Receipt, AuditError>>,
}

impl Future for PendingReceipt {
    type Output = Result<Receipt, AuditError>;

    fn poll(mut self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.receiver)
            .poll(context)
            .map(|result| result.unwrap_or(Err(AuditError::Stopped)))
    }
}

impl AuditLog {
    /// Opens the log with the system clock: loads or makes the device key, opens the store,
    /// brings the JSONL files up to date, and writes (durably) the `IsthmusLifecycle` record
    /// that opens a new epoch, and a checkpoint over it.
    pub fn open(config: AuditConfig) -> Result<AuditLog, AuditError> {
        AuditLog::open_with_clock(config, Arc::new(SystemClock))
    }

    /// [`AuditLog::open`] with the clock passed in.
    pub fn open_with_clock(
        config: AuditConfig,
        clock: SharedClock,
    ) -> Result<AuditLog, AuditError> {
        let healthy = Arc::new(AtomicBool::new(true));
        let writer = Writer::open(config.clone(), clock, Arc::clone(&healthy))?;
        let stream_id = writer.head.stream_id.clone();
        let exported_up_to = writer
            .store
            .as_ref()
            .map_or(0, |store| store.exported_up_to);
        let syslog = writer.syslog.as_ref().map(SyslogSink::monitor);
        let queue_records_max = config.queue_records_max.max(1);
        let (sender, receiver) = mpsc::channel(queue_records_max);
        let thread = std::thread::Builder::new()
            .name("isthmus-audit".into())
            .spawn(move || writer.run(receiver))
            .map_err(|error| AuditError::Open(format!("starting the writer: {error}")))?;
        let tick = Duration::from_millis(
            config
                .checkpoint_every_ms
                .clamp(10, TICK_INTERVAL_MS_MAX)
                .min(FILES_COPY_INTERVAL_MS),
        );
        let weak = sender.downgrade();
        std::thread::Builder::new()
            .name("isthmus-audit-tick".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(tick);
                    let Some(sender) = weak.upgrade() else { break };
                    if let Err(mpsc::error::TrySendError::Closed(_)) =
                        sender.try_send(Command::Tick)
                    {
                        break;
                    }
                }
            })
            .map_err(|error| AuditError::Open(format!("starting the ticker: {error}")))?;
        Ok(AuditLog {
            inner: Arc::new(Inner {
                sender,
                healthy,
                fail_closed: config.fail_closed,
                queue_records_max,
                stream_id,
                exported_up_to: AtomicU64::new(exported_up_to),
                writer: Mutex::new(Some(thread)),
                syslog,
                store_directory: config.store_directory(),
            }),
        })
    }

    /// Appends `record` and returns once it is durable (its group commit has flushed).
    pub async fn append(&self, record: Record) -> Result<Receipt, AuditError> {
        self.check_healthy()?;
        let (reply, receiver) = oneshot::channel();
        self.inner
            .sender
            .send(Command::Append {
                record,
                reply,
                urgent: true,
            })
            .await
            .map_err(|_| AuditError::Stopped)?;
        PendingReceipt { receiver }.await
    }

    /// Appends the intent record of a response (marked `Properties.Phase = "intent"`) and
    /// returns once it is durable: await it before the response's first byte.
    pub async fn append_intent(&self, mut record: Record) -> Result<Receipt, AuditError> {
        record.set_property(PHASE, Value::String(PHASE_INTENT.to_owned()));
        self.append(record).await
    }

    /// [`AuditLog::append_intent`] without waiting for durability: the intent is queued
    /// ahead of everything the request appends later, so the outcome's group commit makes it
    /// durable too; any commit somebody awaits in between, or the writer's next tick (at most
    /// [`FILES_COPY_INTERVAL_MS`] away), does so sooner. It takes no flush of its own.
    pub fn submit_intent(&self, mut record: Record) -> Result<PendingReceipt, AuditError> {
        record.set_property(PHASE, Value::String(PHASE_INTENT.to_owned()));
        self.submit(record)
    }

    /// Hands `record` to the writer without waiting for room or durability: records are
    /// committed in the order they are submitted, with the next commit somebody awaits or at
    /// the next tick. Fails at once when the queue is full.
    pub fn submit(&self, record: Record) -> Result<PendingReceipt, AuditError> {
        self.check_healthy()?;
        let (reply, receiver) = oneshot::channel();
        self.inner
            .sender
            .try_send(Command::Append {
                record,
                reply,
                urgent: false,
            })
            .map_err(|error| match error {
                mpsc::error::TrySendError::Full(_) => AuditError::QueueFull {
                    capacity: self.inner.queue_records_max,
                },
                mpsc::error::TrySendError::Closed(_) => AuditError::Stopped,
            })?;
        Ok(PendingReceipt { receiver })
    }

    /// [`AuditLog::append`] for threads outside an async runtime (it blocks).
    pub fn append_blocking(&self, record: Record) -> Result<Receipt, AuditError> {
        self.check_healthy()?;
        let (reply, receiver) = oneshot::channel();
        self.inner
            .sender
            .blocking_send(Command::Append {
                record,
                reply,
                urgent: true,
            })
            .map_err(|_| AuditError::Stopped)?;
        receiver.blocking_recv().unwrap_or(Err(AuditError::Stopped))
    }

    /// Whether records are being made durable. While false, appends fail with
    /// [`AuditError::Unavailable`]; with `fail_closed` the gateway answers 503.
    pub fn is_healthy(&self) -> bool {
        self.inner.healthy.load(Ordering::Acquire)
    }

    /// Whether the gateway should refuse requests while the log is unhealthy.
    pub fn fail_closed(&self) -> bool {
        self.inner.fail_closed
    }

    /// The stream's stable id (`StreamId`).
    pub fn stream_id(&self) -> &str {
        &self.inner.stream_id
    }

    /// Records that every record up to `seq` has been exported (retention may delete them).
    pub async fn mark_exported(&self, seq: u64) -> Result<(), AuditError> {
        let (reply, receiver) = oneshot::channel();
        self.inner
            .sender
            .send(Command::MarkExported { seq, reply })
            .await
            .map_err(|_| AuditError::Stopped)?;
        receiver.await.unwrap_or(Err(AuditError::Stopped))?;
        self.inner.exported_up_to.fetch_max(seq, Ordering::AcqRel);
        Ok(())
    }

    /// What the syslog copy has sent and dropped, when it is on.
    pub fn syslog_status(&self) -> Option<SyslogStatus> {
        self.inner.syslog.as_ref().map(SyslogMonitor::status)
    }

    /// The highest `Seq` the exporter has marked exported (persisted in the store).
    pub fn exported_up_to(&self) -> u64 {
        self.inner.exported_up_to.load(Ordering::Acquire)
    }

    /// Up to `count_max` stored records from `from_seq` on, in order (for the exporter).
    pub async fn read(&self, from_seq: u64, count_max: usize) -> Result<StoredRecords, AuditError> {
        let (reply, receiver) = oneshot::channel();
        self.inner
            .sender
            .send(Command::Read {
                from_seq,
                count_max,
                reply,
            })
            .await
            .map_err(|_| AuditError::Stopped)?;
        receiver.await.unwrap_or(Err(AuditError::Stopped))
    }

    /// Up to `count_max` of the latest stored records, newest first (for the admin console).
    /// Records still waiting for their group commit are not among them.
    pub async fn read_latest(&self, count_max: usize) -> Result<StoredRecords, AuditError> {
        let (reply, receiver) = oneshot::channel();
        self.inner
            .sender
            .send(Command::ReadLatest { count_max, reply })
            .await
            .map_err(|_| AuditError::Stopped)?;
        receiver.await.unwrap_or(Err(AuditError::Stopped))
    }

    /// Closes the epoch: writes the `Isthmus/audit/stop` lifecycle record and a checkpoint over
    /// it, durably, and stops the writer. Appends after this fail with [`AuditError::Stopped`].
    pub async fn shutdown(&self) -> Result<(), AuditError> {
        let (reply, receiver) = oneshot::channel();
        self.inner
            .sender
            .send(Command::Shutdown { reply })
            .await
            .map_err(|_| AuditError::Stopped)?;
        receiver.await.unwrap_or(Err(AuditError::Stopped))
    }

    /// [`AuditLog::shutdown`] for threads outside an async runtime; also waits for the writer
    /// thread to end (the store is closed when this returns).
    pub fn shutdown_blocking(&self) -> Result<(), AuditError> {
        let (reply, receiver) = oneshot::channel();
        self.inner
            .sender
            .blocking_send(Command::Shutdown { reply })
            .map_err(|_| AuditError::Stopped)?;
        let result = receiver.blocking_recv().unwrap_or(Err(AuditError::Stopped));
        let thread = match self.inner.writer.lock() {
            Ok(mut writer) => writer.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        if let Some(thread) = thread {
            let _ = thread.join();
        }
        let _ = wait_for_store_lock(&self.inner.store_directory, STORE_RELEASE_WAIT);
        result
    }

    fn check_healthy(&self) -> Result<(), AuditError> {
        if self.is_healthy() {
            Ok(())
        } else {
            Err(AuditError::Unavailable(
                "records cannot be made durable".into(),
            ))
        }
    }
}

/// How long `shutdown_blocking`, and opening a store, wait for sled to let go of its file.
const STORE_RELEASE_WAIT: Duration = Duration::from_secs(5);

/// Waits until the store's lock can be taken, at most `wait`. sled's I/O threads can hold
/// the database (and the exclusive lock on its `db` file) for a moment after the last handle
/// is dropped, so a store reopened in the same process right after the writer (or the
/// verifier) ends could be refused as locked. A lock held by another process (a second
/// gateway on the same state directory) is not waited for: its process id is returned.
fn wait_for_store_lock(directory: &Path, wait: Duration) -> Result<(), u32> {
    let Ok(file) = std::fs::File::open(directory.join("db")) else {
        return Ok(());
    };
    let until = Instant::now() + wait;
    while Instant::now() < until {
        if file.try_lock().is_ok() {
            let _ = file.unlock();
            return Ok(());
        }
        if let Some(holder) = lock_holder(&file).filter(|&pid| pid != std::process::id()) {
            return Err(holder);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(())
}

/// The process holding a lock on `file`, from `/proc/locks` (Linux; `None` elsewhere or
/// when no lock is listed). Lines read `1: FLOCK ADVISORY WRITE PID MAJ:MIN:INODE 0 EOF`;
/// a process waiting for the lock is listed after `->` and is not the holder.
fn lock_holder(file: &std::fs::File) -> Option<u32> {
    use std::os::unix::fs::MetadataExt as _;
    let inode = file.metadata().ok()?.ino();
    let suffix = format!(":{inode}");
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    locks.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.get(1) == Some(&"->") {
            return None;
        }
        let at = fields
            .iter()
            .position(|field| field.ends_with(&suffix) && field.matches(':').count() == 2)?;
        fields.get(at.checked_sub(1)?)?.parse().ok()
    })
}

/// The sled database and what the writer keeps of it.
struct Store {
    db: sled::Db,
    records: sled::Tree,
    meta: sled::Tree,
    stored_bytes: u64,
    exported_up_to: u64,
}

/// The last record of a store or of the files.
struct LastRecord {
    stream_id: String,
    epoch: u64,
    seq: u64,
    hash: String,
}

impl Store {
    fn open(directory: &Path) -> Result<Store, sled::Error> {
        // A handle dropped a moment ago in this process (the verifier's, a previous log's)
        // may still hold the lock; one held by another process is refused at once.
        if let Err(holder) = wait_for_store_lock(directory, STORE_RELEASE_WAIT) {
            return Err(sled::Error::Io(std::io::Error::new(
                std::io::ErrorKind::WouldBlock,
                format!(
                    "{} is in use by process {holder} (another gateway on the same state \
                     directory?)",
                    directory.display()
                ),
            )));
        }
        let db = sled::Config::new()
            .path(directory)
            .cache_capacity(STORE_CACHE_BYTES_MAX)
            .flush_every_ms(None)
            .open()?;
        let records = db.open_tree(RECORDS_TREE)?;
        let meta = db.open_tree(META_TREE)?;
        let stored_bytes = read_u64(&meta, META_STORED_BYTES)?;
        let exported_up_to = read_u64(&meta, META_EXPORTED_UP_TO)?;
        Ok(Store {
            db,
            records,
            meta,
            stored_bytes,
            exported_up_to,
        })
    }

    /// The newest record; `Err` names a newest line that is not a record (the chain cannot
    /// continue from it, and starting a new one would overwrite the records there).
    fn last(&self) -> Result<Option<ParsedRecord>, String> {
        let Some((key, line)) = self.records.last().map_err(|error| error.to_string())? else {
            return Ok(None);
        };
        parse_last(&line).map(Some).ok_or_else(|| {
            format!(
                "the newest stored record (seq {}) is not an audit record; the store was \
                 altered or damaged: move the store directory aside (the JSONL files and any \
                 export hold the records) and verify it with `isthmus audit verify`",
                seq_of_key(&key)
            )
        })
    }

    /// Whether the epoch before ended with a stop record and a checkpoint over it.
    fn ended_cleanly(&self, last: &Map<String, Value>) -> Result<bool, sled::Error> {
        let is_checkpoint = last.get(record::CATEGORY).and_then(Value::as_str)
            == Some(Category::Checkpoint.as_str());
        let Some(seq) = last.get(record::SEQ).and_then(Value::as_u64) else {
            return Ok(false);
        };
        if !is_checkpoint || seq < 2 {
            return Ok(false);
        }
        let Some(line) = self.records.get((seq - 1).to_be_bytes())? else {
            return Ok(false);
        };
        let previous: Map<String, Value> = serde_json::from_slice(&line).unwrap_or_default();
        Ok(previous.get(record::OPERATION_NAME).and_then(Value::as_str) == Some(OPERATION_STOP))
    }

    /// Inserts `sealed` and the meta updates, then flushes: the group commit.
    fn commit(&mut self, sealed: &[Sealed], checkpoint: Option<&[u8]>) -> Result<(), sled::Error> {
        let mut batch = sled::Batch::default();
        let mut bytes = 0_u64;
        for record in sealed {
            bytes += record.line.len() as u64;
            batch.insert(&record.seq.to_be_bytes(), record.line.as_slice());
        }
        self.records.apply_batch(batch)?;
        let stored_bytes = self.stored_bytes + bytes;
        let mut meta = sled::Batch::default();
        meta.insert(META_STORED_BYTES, &stored_bytes.to_be_bytes());
        meta.insert(META_EXPORTED_UP_TO, &self.exported_up_to.to_be_bytes());
        if let Some(line) = checkpoint {
            meta.insert(META_LAST_CHECKPOINT, line);
        }
        self.meta.apply_batch(meta)?;
        self.db.flush()?;
        self.stored_bytes = stored_bytes;
        Ok(())
    }

    fn read(&self, from_seq: u64, count_max: usize) -> Result<StoredRecords, sled::Error> {
        let mut records = Vec::new();
        for entry in self.records.range(from_seq.to_be_bytes()..).take(count_max) {
            let (key, line) = entry?;
            records.push((seq_of_key(&key), line.to_vec()));
        }
        Ok(records)
    }

    fn read_latest(&self, count_max: usize) -> Result<StoredRecords, sled::Error> {
        let mut records = Vec::new();
        for entry in self.records.iter().rev().take(count_max) {
            let (key, line) = entry?;
            records.push((seq_of_key(&key), line.to_vec()));
        }
        Ok(records)
    }
}

fn read_u64(tree: &sled::Tree, key: &str) -> Result<u64, sled::Error> {
    Ok(tree
        .get(key)?
        .and_then(|bytes| <[u8; 8]>::try_from(bytes.as_ref()).ok())
        .map_or(0, u64::from_be_bytes))
}

fn seq_of_key(key: &[u8]) -> u64 {
    <[u8; 8]>::try_from(key).map_or(0, u64::from_be_bytes)
}

/// A stored record: its chain position and all its columns.
type ParsedRecord = (LastRecord, Map<String, Value>);

fn parse_last(line: &[u8]) -> Option<ParsedRecord> {
    let fields: Map<String, Value> = serde_json::from_slice(line).ok()?;
    let last = LastRecord {
        stream_id: fields.get(record::STREAM_ID)?.as_str()?.to_owned(),
        epoch: fields.get(record::EPOCH)?.as_u64()?,
        seq: fields.get(record::SEQ)?.as_u64()?,
        hash: fields.get(record::RECORD_HASH)?.as_str()?.to_owned(),
    };
    Some((last, fields))
}

fn unavailable(error: &sled::Error) -> AuditError {
    AuditError::Unavailable(error.to_string())
}

/// A record sealed in this batch and whom to tell once it is durable.
struct Entry {
    sealed: Sealed,
    reply: Option<Reply<Receipt>>,
    checkpoint: bool,
    /// A caller waits for this record's durability.
    urgent: bool,
}

/// The writer thread's state: the only owner of the chain.
struct Writer {
    config: AuditConfig,
    clock: SharedClock,
    key: DeviceKey,
    store_directory: PathBuf,
    store: Option<Store>,
    head: ChainHead,
    files: Option<JsonlFiles>,
    files_healthy: bool,
    stdout: Option<StdoutSink>,
    syslog: Option<SyslogSink>,
    healthy: Arc<AtomicBool>,
    since_checkpoint: u64,
    last_checkpoint_at: SystemTime,
    last_recovery_attempt: Option<Instant>,
    last_retention_at: Option<SystemTime>,
    /// The day (since 1970) retention last aged records by, as kept in the store (else the
    /// newest record's day, else the day of the open), and the clock's running time at
    /// open. Records age by the wall clock, but the day they age by runs at most twice as
    /// fast as the gateway runs: a clock set far ahead (a bad RTC, an NTP misstep, a forged
    /// time) cannot expire the log at once, before or after a restart, while an appliance
    /// that was off for a weekend catches up within a day or so.
    retention_origin: (u64, Duration),
    /// The day retention aged records by last (kept in the store when it changes).
    retention_day: u64,
    /// When the files last caught up with the store.
    last_files_copy: Instant,
    /// The newest checkpoint (its `Seq` and line), for the head file once the files hold it.
    checkpoint_head: Option<(u64, Vec<u8>)>,
    /// The day (`YYYYMMDD`) of the records not yet copied: the daily file they go to.
    files_day: String,
    /// Sealed records nobody waits for (intents, outcomes of responses cut short), held for
    /// the next urgent commit or tick instead of a flush of their own.
    deferred: Vec<Entry>,
    /// [`TEST_COMMIT_DELAY_ENV`]; zero in release builds.
    commit_delay: Duration,
}

impl Writer {
    fn open(
        config: AuditConfig,
        clock: SharedClock,
        healthy: Arc<AtomicBool>,
    ) -> Result<Writer, AuditError> {
        let open_error = |what: &str, path: &Path, error: &dyn std::fmt::Display| {
            AuditError::Open(format!("{what} {}: {error}", path.display()))
        };
        std::fs::create_dir_all(&config.state_directory)
            .map_err(|error| open_error("creating", &config.state_directory, &error))?;
        let key = DeviceKey::load_or_create(&config.state_directory)
            .map_err(|error| AuditError::Open(error.to_string()))?;
        let store_directory = config.store_directory();
        let store = Store::open(&store_directory)
            .map_err(|error| open_error("opening the store", &store_directory, &error))?;
        let files = match &config.directory {
            Some(directory) => {
                let files = JsonlFiles::open(directory)
                    .map_err(|error| open_error("opening", directory, &error))?;
                key.export_public(&directory.join(key::PUBLIC_KEY_FILE))
                    .map_err(|error| AuditError::Open(error.to_string()))?;
                Some(files)
            }
            None => None,
        };
        let stored = store
            .last()
            .map_err(|error| open_error("reading the store", &store_directory, &error))?;
        let stored_day = stored.as_ref().and_then(|(_, fields)| {
            fields
                .get(record::TIME_GENERATED)
                .and_then(Value::as_str)
                .and_then(record::parse_day)
        });
        let previous_clean = match &stored {
            Some((_, fields)) => store
                .ended_cleanly(fields)
                .map_err(|error| open_error("reading the store", &store_directory, &error))?,
            None => false,
        };
        let from_files = files
            .as_ref()
            .and_then(JsonlFiles::last_line)
            .and_then(parse_last)
            .map(|(last, _)| last);
        // The files continue the store's stream, or start it: a directory whose newest record
        // belongs to another stream (another gateway's, or a restored copy) would fork or
        // interleave both chains.
        let stored_stream = match &stored {
            Some((last, _)) => Some(last.stream_id.clone()),
            None => store
                .meta
                .get(META_STREAM_ID)
                .ok()
                .flatten()
                .map(|id| String::from_utf8_lossy(&id).into_owned()),
        };
        if let (Some(stored_stream), Some(filed), Some(directory)) =
            (&stored_stream, &from_files, &config.directory)
            && filed.stream_id != *stored_stream
        {
            return Err(AuditError::Open(format!(
                "{}: the newest audit record there belongs to stream {}, not to this gateway's \
                 stream {stored_stream} (its store is in {}): give each gateway an audit \
                 directory of its own",
                directory.display(),
                filed.stream_id,
                store_directory.display()
            )));
        }
        let last = match (stored.map(|(last, _)| last), from_files) {
            (Some(stored), Some(filed)) if filed.seq > stored.seq => {
                tracing::warn!(
                    store_seq = stored.seq,
                    files_seq = filed.seq,
                    "the audit files are ahead of the store; continuing the chain from the files"
                );
                Some(filed)
            }
            (Some(stored), _) => Some(stored),
            (None, filed) => filed,
        };
        let stream_id = match (&last, store.meta.get(META_STREAM_ID)) {
            (Some(last), _) => last.stream_id.clone(),
            (None, Ok(Some(id))) => String::from_utf8_lossy(&id).into_owned(),
            (None, _) => uuid::Uuid::new_v4().to_string(),
        };
        store
            .meta
            .insert(META_STREAM_ID, stream_id.as_bytes())
            .map_err(|error| open_error("writing the store", &store_directory, &error))?;
        let head = match &last {
            Some(last) => ChainHead {
                stream_id,
                epoch: last.epoch + 1,
                seq: last.seq,
                hash: last.hash.clone(),
            },
            None => ChainHead {
                stream_id,
                epoch: 1,
                seq: 0,
                hash: GENESIS_HASH.to_owned(),
            },
        };
        let syslog = match &config.syslog {
            Some(syslog) => Some(SyslogSink::start(syslog.clone()).map_err(|error| {
                AuditError::Open(format!(
                    "starting the syslog sender to {}: {error}",
                    syslog.address
                ))
            })?),
            None => None,
        };
        let now = clock.now();
        let kept_retention_day = store
            .meta
            .get(META_RETENTION_DAY)
            .ok()
            .flatten()
            .and_then(|bytes| <[u8; 8]>::try_from(bytes.as_ref()).ok())
            .map(u64::from_be_bytes);
        let retention_day = kept_retention_day
            .or(stored_day)
            .unwrap_or_else(|| record::parse_day(&record::format_time(now)).unwrap_or(0));
        if kept_retention_day != Some(retention_day) {
            store
                .meta
                .insert(META_RETENTION_DAY, &retention_day.to_be_bytes())
                .map_err(|error| open_error("writing the store", &store_directory, &error))?;
        }
        let retention_origin = (retention_day, clock.running());
        // The later of today and the newest file's day (a clock set back keeps writing to
        // that file, so that files in date order stay in `Seq` order) — unless that day is
        // more than a day ahead: a file dated by a clock that ran far ahead would otherwise
        // take every record from then on, and retention never deletes a file from the future.
        let today = record::format_day(now);
        let tomorrow = record::format_day(now + Duration::from_secs(86_400));
        let files_day = match files.as_ref().and_then(JsonlFiles::newest_day) {
            Some(newest) if newest > tomorrow.as_str() => {
                tracing::warn!(
                    newest,
                    today,
                    "the newest audit file is dated more than a day ahead of the clock; records go to today's file"
                );
                today
            }
            Some(newest) => newest.max(today.as_str()).to_owned(),
            None => today,
        };
        let mut writer = Writer {
            stdout: config.stdout.then_some(StdoutSink),
            syslog,
            config,
            clock,
            key,
            store_directory,
            store: Some(store),
            head,
            files,
            files_healthy: true,
            healthy,
            since_checkpoint: 0,
            last_checkpoint_at: now,
            last_recovery_attempt: None,
            last_retention_at: None,
            retention_origin,
            retention_day,
            last_files_copy: Instant::now(),
            checkpoint_head: None,
            files_day,
            deferred: Vec::new(),
            commit_delay: test_commit_delay(),
        };
        writer.catch_up_files(usize::MAX);
        let previous = last.map(|last| (last.epoch, last.seq));
        let start = writer.lifecycle(
            OPERATION_START,
            previous.map_or(0, |(epoch, _)| epoch),
            previous.map_or(0, |(_, seq)| seq),
            Some(previous_clean),
        );
        let mut entries = Vec::new();
        writer.push(&mut entries, start, None);
        writer.push_checkpoint(&mut entries);
        writer
            .commit(entries)
            .map_err(|error| AuditError::Open(error.to_string()))?;
        Ok(writer)
    }

    fn run(mut self, mut receiver: mpsc::Receiver<Command>) {
        let mut commands = Vec::with_capacity(BATCH_RECORDS_MAX);
        while let Some(first) = receiver.blocking_recv() {
            commands.push(first);
            drain(&mut receiver, &mut commands);
            // Let the threads that are ready to run go first: on a busy core those are the
            // data plane finishing more responses, whose records then share this commit's
            // flush. Where nothing else is ready, as on an idle or a many-core machine, this
            // returns at once and costs nothing. Every sled flush wakes all of sled's idle
            // I/O threads, so fewer flushes per response is what a shared core lacks most.
            std::thread::yield_now();
            drain(&mut receiver, &mut commands);
            if self.handle(&mut commands) {
                return;
            }
        }
    }

    /// Handles one batch of commands; true once shut down.
    fn handle(&mut self, commands: &mut Vec<Command>) -> bool {
        if self.store.is_none() {
            self.try_recover();
        }
        // Records committed before midnight go to that day's file; a clock set back keeps
        // the later day's file (`YYYYMMDD` orders as the days do).
        let today = record::format_day(self.clock.now());
        if today > self.files_day {
            self.copy_files(true);
            self.files_day = today;
        }
        let mut entries: Vec<Entry> = Vec::with_capacity(commands.len() + 2);
        let mut exported_replies = Vec::new();
        let mut shutdown_replies = Vec::new();
        let mut exported_changed = false;
        let mut ticked = false;
        for command in commands.drain(..) {
            match command {
                Command::Append {
                    record,
                    reply,
                    urgent,
                } => {
                    if self.store.is_none() {
                        let _ = reply.send(Err(AuditError::Unavailable(
                            "records cannot be made durable".into(),
                        )));
                        continue;
                    }
                    self.push(&mut entries, record, Some(reply));
                    if let Some(entry) = entries.last_mut() {
                        entry.urgent = urgent;
                    }
                    if self.since_checkpoint >= self.config.checkpoint_every_records.max(1) {
                        self.push_checkpoint(&mut entries);
                    }
                }
                Command::MarkExported { seq, reply } => match &mut self.store {
                    Some(store) => {
                        store.exported_up_to = store.exported_up_to.max(seq.min(self.head.seq));
                        exported_changed = true;
                        exported_replies.push(reply);
                    }
                    None => {
                        let _ = reply.send(Err(AuditError::Unavailable(
                            "records cannot be made durable".into(),
                        )));
                    }
                },
                Command::Read {
                    from_seq,
                    count_max,
                    reply,
                } => {
                    let result = match &self.store {
                        Some(store) => store.read(from_seq, count_max).map_err(|e| unavailable(&e)),
                        None => Err(AuditError::Unavailable("the store is closed".into())),
                    };
                    let _ = reply.send(result);
                }
                Command::ReadLatest { count_max, reply } => {
                    let result = match &self.store {
                        Some(store) => store.read_latest(count_max).map_err(|e| unavailable(&e)),
                        None => Err(AuditError::Unavailable("the store is closed".into())),
                    };
                    let _ = reply.send(result);
                }
                Command::Tick => {
                    ticked = true;
                    self.copy_files(false);
                }
                Command::Shutdown { reply } => shutdown_replies.push(reply),
            }
        }
        let now = self.clock.now();
        let checkpoint_due = now
            .duration_since(self.last_checkpoint_at)
            .is_ok_and(|elapsed| {
                elapsed.as_millis() >= u128::from(self.config.checkpoint_every_ms)
            });
        if self.store.is_some() && self.since_checkpoint > 0 && checkpoint_due {
            self.push_checkpoint(&mut entries);
        }
        if !shutdown_replies.is_empty() && self.store.is_some() {
            let stop = self.lifecycle(OPERATION_STOP, self.head.epoch, self.head.seq, None);
            self.push(&mut entries, stop, None);
            self.push_checkpoint(&mut entries);
        }
        // Records nobody waits for ride along with the next commit somebody does wait for
        // (or the next tick, at most FILES_COPY_INTERVAL_MS away): one flush instead of two
        // for a request's intent and outcome.
        let urgent = entries.iter().any(|entry| entry.urgent)
            || exported_changed
            || ticked
            || !shutdown_replies.is_empty();
        if !urgent
            && self.store.is_some()
            && self.deferred.len() + entries.len() < DEFERRED_RECORDS_MAX
        {
            self.deferred.append(&mut entries);
        } else if !self.deferred.is_empty() {
            let mut all = std::mem::take(&mut self.deferred);
            all.append(&mut entries);
            entries = all;
        }
        let committed = if entries.is_empty() && !exported_changed {
            Ok(())
        } else {
            self.commit(entries)
        };
        for reply in exported_replies {
            let _ = reply.send(committed.clone());
        }
        if committed.is_ok() && self.store.is_some() {
            self.apply_retention(now);
        }
        if shutdown_replies.is_empty() {
            return false;
        }
        let result = if self.store.is_some() {
            committed
        } else {
            Err(AuditError::Unavailable(
                "records cannot be made durable".into(),
            ))
        };
        // The files hold everything before the store closes, and the store closes before
        // answering, so that it can be opened again at once.
        self.copy_files(true);
        self.store = None;
        for reply in shutdown_replies {
            let _ = reply.send(result.clone());
        }
        true
    }

    /// Seals `record` into `entries`.
    fn push(&mut self, entries: &mut Vec<Entry>, record: Record, reply: Option<Reply<Receipt>>) {
        let checkpoint = record
            .fields()
            .get(record::CATEGORY)
            .and_then(Value::as_str)
            == Some(Category::Checkpoint.as_str());
        match chain::seal(&mut self.head, record.into_fields()) {
            Ok(sealed) => {
                self.since_checkpoint += 1;
                entries.push(Entry {
                    sealed,
                    reply,
                    checkpoint,
                    urgent: true,
                });
            }
            Err(error) => {
                if let Some(reply) = reply {
                    let _ = reply.send(Err(AuditError::Invalid(error.to_string())));
                }
            }
        }
    }

    /// Seals a checkpoint over the record last sealed.
    fn push_checkpoint(&mut self, entries: &mut Vec<Entry>) {
        let head = &self.head;
        let message = chain::checkpoint_message(&head.stream_id, head.epoch, head.seq, &head.hash);
        let now = self.clock.now();
        let record = Record::builder(Category::Checkpoint, OPERATION_CHECKPOINT, now)
            .result(ResultType::Succeeded, "", "checkpoint")
            .gateway_instance(self.config.gateway_instance.clone())
            .property(chain::CHECKPOINT_EPOCH, head.epoch)
            .property(chain::CHECKPOINT_SEQ, head.seq)
            .property(chain::CHECKPOINT_HASH, head.hash.clone())
            .property(chain::CHECKPOINT_ALGORITHM, chain::ED25519)
            .property(chain::CHECKPOINT_KEY_ID, self.key.key_id())
            .property(
                chain::CHECKPOINT_SIGNATURE,
                self.key.sign(message.as_bytes()),
            )
            .build();
        self.push(entries, record, None);
        self.since_checkpoint = 0;
        self.last_checkpoint_at = now;
    }

    /// A lifecycle record: start (with the previous epoch's end), stop or recovered.
    fn lifecycle(
        &self,
        operation: &str,
        previous_epoch: u64,
        previous_seq: u64,
        previous_clean: Option<bool>,
    ) -> Record {
        let mut builder = Record::builder(Category::Lifecycle, operation, self.clock.now())
            .result(
                ResultType::Succeeded,
                "",
                operation.rsplit('/').next().unwrap_or(operation),
            )
            .gateway_instance(self.config.gateway_instance.clone())
            .property("SoftwareVersion", env!("CARGO_PKG_VERSION"))
            .property(chain::CHECKPOINT_KEY_ID, self.key.key_id())
            .property("PreviousEpoch", previous_epoch)
            .property("PreviousSeq", previous_seq)
            .property(
                super::CHECKPOINT_EVERY_RECORDS_PROPERTY,
                self.config.checkpoint_every_records.max(1),
            );
        if let Some(clean) = previous_clean {
            builder = builder.property("PreviousEpochClosed", clean);
        }
        builder.build()
    }

    /// The group commit: store and flush, then acknowledge, then copy to files and stdout. On
    /// failure the batch is refused, the chain goes back to before it and the store is closed.
    fn commit(&mut self, entries: Vec<Entry>) -> Result<(), AuditError> {
        let Some(store) = &mut self.store else {
            return Err(AuditError::Unavailable(
                "records cannot be made durable".into(),
            ));
        };
        let checkpoint_index = entries.iter().rposition(|entry| entry.checkpoint);
        let (sealed, replies): (Vec<Sealed>, Vec<Option<Reply<Receipt>>>) = entries
            .into_iter()
            .map(|entry| (entry.sealed, entry.reply))
            .unzip();
        let checkpoint = checkpoint_index.and_then(|index| sealed.get(index));
        if !self.commit_delay.is_zero() {
            std::thread::sleep(self.commit_delay);
        }
        match store.commit(&sealed, checkpoint.map(|record| record.line.as_slice())) {
            Ok(()) => {
                for (record, reply) in sealed.iter().zip(replies) {
                    if let Some(reply) = reply {
                        let _ = reply.send(Ok(Receipt {
                            epoch: self.head.epoch,
                            seq: record.seq,
                            record_hash: record.hash.clone(),
                        }));
                    }
                }
                self.copy_out(&sealed, checkpoint.map(|record| record.line.as_slice()));
                Ok(())
            }
            Err(error) => {
                let failure = unavailable(&error);
                tracing::error!(error = %error, "audit store failed; refusing records until it recovers");
                self.store = None;
                self.healthy.store(false, Ordering::Release);
                for reply in replies.into_iter().flatten() {
                    let _ = reply.send(Err(failure.clone()));
                }
                self.last_recovery_attempt = Some(Instant::now());
                Err(failure)
            }
        }
    }

    /// Copies a committed batch to stdout and to the syslog queue; the JSONL files catch up
    /// from the store once per [`FILES_COPY_INTERVAL_MS`].
    fn copy_out(&mut self, sealed: &[Sealed], checkpoint: Option<&[u8]>) {
        if let Some(stdout) = &self.stdout
            && let Err(error) = stdout.write(
                sealed
                    .iter()
                    .map(|record| content::line_off_appliance(&record.line)),
            )
        {
            tracing::warn!(error = %error, "writing audit records to stdout");
        }
        if let Some(syslog) = &self.syslog {
            syslog.offer(sealed.iter().map(|record| record.line.as_slice()));
        }
        if let Some(line) = checkpoint
            && let Some(record) = sealed.iter().rev().find(|record| record.line == line)
        {
            self.checkpoint_head = Some((record.seq, line.to_vec()));
        }
        self.copy_files(false);
    }

    /// Brings the files up to the store when the interval has passed (or `now`), then
    /// writes the newest checkpoint they hold to the head file.
    fn copy_files(&mut self, now: bool) {
        let Some(files) = &self.files else { return };
        let behind = self.head.seq.saturating_sub(files.written_up_to());
        let since = self.last_files_copy.elapsed();
        let due = if self.files_healthy {
            now || since >= Duration::from_millis(FILES_COPY_INTERVAL_MS)
                || behind >= CATCH_UP_RECORDS_MAX as u64
        } else {
            // Files that failed are tried again now and then, not on every commit.
            now || since >= Duration::from_millis(FILES_RETRY_INTERVAL_MS)
        };
        if behind == 0 || !due {
            return;
        }
        self.last_files_copy = Instant::now();
        if !self.files_healthy && !self.reopen_files() {
            return;
        }
        // At shutdown (`now`) everything; otherwise a bounded share per pass.
        self.catch_up_files(if now {
            usize::MAX
        } else {
            CATCH_UP_BATCHES_PER_PASS
        });
        let held = matches!(
            (&self.files, &self.checkpoint_head),
            (Some(files), Some((seq, _))) if self.files_healthy && files.written_up_to() >= *seq
        );
        if held
            && let (Some(files), Some((_, line))) = (&self.files, self.checkpoint_head.take())
            && let Err(error) = files.write_checkpoint_head(&line)
        {
            tracing::warn!(error = %error, "writing the audit checkpoint head");
        }
    }

    /// Appends to the files what the store holds beyond them, at most `batches_max` batches.
    fn catch_up_files(&mut self, batches_max: usize) {
        let (Some(files), Some(store)) = (&mut self.files, &self.store) else {
            return;
        };
        let day = &self.files_day;
        let mut result = Ok(());
        let mut batches = 0;
        while files.written_up_to() < self.head.seq && result.is_ok() && batches < batches_max {
            batches += 1;
            let records = match store.read(files.written_up_to() + 1, CATCH_UP_RECORDS_MAX) {
                Ok(records) if !records.is_empty() => records,
                Ok(_) => break,
                Err(error) => {
                    result = Err(std::io::Error::other(error.to_string()));
                    break;
                }
            };
            result = files.append(
                day,
                records.iter().map(|(seq, line)| (*seq, line.as_slice())),
            );
        }
        self.note_files(result);
    }

    /// After a failed write the newest file may end in a torn line. Opening the files again
    /// ends that line and finds the last complete record, so catching up from the store
    /// starts on a line of its own. False while the directory still cannot be written.
    fn reopen_files(&mut self) -> bool {
        let Some(directory) = self
            .files
            .as_ref()
            .map(|files| files.directory().to_owned())
        else {
            return true;
        };
        match JsonlFiles::open(&directory) {
            Ok(files) => {
                self.files = Some(files);
                true
            }
            Err(error) => {
                tracing::debug!(error = %error, "audit files still cannot be written");
                false
            }
        }
    }

    fn note_files(&mut self, result: std::io::Result<()>) {
        match result {
            Ok(()) if !self.files_healthy => {
                tracing::info!("audit files are being written again");
                self.files_healthy = true;
            }
            Ok(()) => {}
            Err(error) => {
                if self.files_healthy {
                    tracing::error!(error = %error, "writing audit files; the store keeps the records");
                }
                self.files_healthy = false;
            }
        }
    }

    /// Reopens a failed store (at most once per [`RECOVERY_INTERVAL_MS`]) and, if it works
    /// again, records the recovery and turns the health flag back on.
    fn try_recover(&mut self) {
        let due = self
            .last_recovery_attempt
            .is_none_or(|at| at.elapsed() >= Duration::from_millis(RECOVERY_INTERVAL_MS));
        if !due {
            return;
        }
        self.last_recovery_attempt = Some(Instant::now());
        let store = match Store::open(&self.store_directory) {
            Ok(store) => store,
            Err(error) => {
                tracing::debug!(error = %error, "audit store still unavailable");
                return;
            }
        };
        match store.last() {
            Ok(Some((last, _))) => {
                self.head.seq = last.seq;
                self.head.hash = last.hash;
            }
            Ok(None) => {}
            Err(_) => return,
        }
        self.store = Some(store);
        let recovered = self.lifecycle(OPERATION_RECOVERED, self.head.epoch, self.head.seq, None);
        let mut entries = Vec::new();
        self.push(&mut entries, recovered, None);
        self.push_checkpoint(&mut entries);
        if self.commit(entries).is_ok() {
            tracing::info!("audit store recovered");
            self.healthy.store(true, Ordering::Release);
        }
    }

    /// Deletes the oldest records (and files) while over the byte bound, or older than the
    /// retention days, never deleting records not yet exported, younger than two days, or the
    /// newest record.
    fn apply_retention(&mut self, now: SystemTime) {
        let Some(store) = &mut self.store else { return };
        let over_bytes = store.stored_bytes > self.config.retention_bytes_max;
        let age_due = self.last_retention_at.is_none_or(|at| {
            now.duration_since(at)
                .is_ok_and(|elapsed| elapsed >= Duration::from_millis(RETENTION_INTERVAL_MS))
        });
        if !over_bytes && !age_due {
            return;
        }
        self.last_retention_at = Some(now);
        // Nothing goes from the store that the files (when there are any) do not hold yet:
        // copied later, out of a store that lost them, they would leave a gap in the files.
        let filed_up_to = self
            .files
            .as_ref()
            .map_or(self.head.seq, JsonlFiles::written_up_to);
        let exported_up_to = if self.config.retention_requires_export {
            store.exported_up_to.min(filed_up_to)
        } else {
            filed_up_to
        };
        let wall_today = record::parse_day(&record::format_time(now)).unwrap_or(0);
        let (origin_day, origin_running) = self.retention_origin;
        let running_s = self
            .clock
            .running()
            .saturating_sub(origin_running)
            .as_secs();
        // The day records age by: the wall clock's, but never more than twice the running
        // time past the day kept at open.
        let today = wall_today.min(origin_day.saturating_add(running_s.saturating_mul(2) / 86_400));
        if today != self.retention_day {
            self.retention_day = today;
            if let Err(error) = store.meta.insert(META_RETENTION_DAY, &today.to_be_bytes()) {
                tracing::warn!(error = %error, "audit retention day");
            }
        }
        let days_max = u64::from(self.config.retention_days.max(RETENTION_DAYS_MIN));
        let days_min = u64::from(RETENTION_DAYS_MIN);
        let mut batch = sled::Batch::default();
        let mut freed = 0_u64;
        let mut deleted = 0;
        for entry in store.records.iter().take(RETENTION_DELETIONS_MAX) {
            let Ok((key, line)) = entry else { break };
            let seq = seq_of_key(&key);
            if seq >= self.head.seq || seq > exported_up_to {
                break;
            }
            let day = time_generated_day(&line).unwrap_or(today);
            // The retention days count by the day records age by; the two days kept even
            // over the byte bound by the wall clock (a store over its bound is trimmed even
            // while the day records age by lags far behind, as after a start with the clock
            // unset).
            if wall_today.saturating_sub(day) < days_min {
                break;
            }
            if today.saturating_sub(day) <= days_max
                && store.stored_bytes - freed <= self.config.retention_bytes_max
            {
                break;
            }
            batch.remove(key);
            freed += line.len() as u64;
            deleted += 1;
        }
        if deleted > 0 {
            // Made durable by the next group commit; deleting again after a crash is harmless.
            match store.records.apply_batch(batch) {
                Ok(()) => store.stored_bytes -= freed,
                Err(error) => tracing::warn!(error = %error, "audit retention"),
            }
        }
        if let Some(files) = &mut self.files
            && age_due
            && let Err(error) = files.remove_expired(
                (wall_today, today),
                days_max,
                days_min,
                self.config.retention_bytes_max,
                exported_up_to,
            )
        {
            tracing::warn!(error = %error, "audit file retention");
        }
    }
}

/// [`TEST_COMMIT_DELAY_ENV`] in a debug build; zero otherwise.
fn test_commit_delay() -> Duration {
    if !cfg!(debug_assertions) {
        return Duration::ZERO;
    }
    std::env::var(TEST_COMMIT_DELAY_ENV)
        .ok()
        .and_then(|value| value.parse::<u64>().ok())
        .map_or(Duration::ZERO, |ms| {
            Duration::from_millis(ms.min(TEST_COMMIT_DELAY_MS_MAX))
        })
}

/// Moves the commands waiting in `receiver` into `commands`, up to a batch.
fn drain(receiver: &mut mpsc::Receiver<Command>, commands: &mut Vec<Command>) {
    while commands.len() < BATCH_RECORDS_MAX {
        match receiver.try_recv() {
            Ok(command) => commands.push(command),
            Err(_) => break,
        }
    }
}

/// Days since 1970 of a stored line's `TimeGenerated`.
fn time_generated_day(line: &[u8]) -> Option<u64> {
    #[derive(serde::Deserialize)]
    struct Time {
        #[serde(rename = "TimeGenerated")]
        time_generated: String,
    }
    let time: Time = serde_json::from_slice(line).ok()?;
    record::parse_day(&time.time_generated)
}
