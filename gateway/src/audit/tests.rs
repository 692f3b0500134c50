//! The log end to end on temporary directories: the chain across restarts, group commit with
//! many appenders, time-based checkpoints, the size cap, crash safety (a child process killed
//! with SIGKILL) and failing closed when the disk refuses writes.

use std::collections::BTreeSet;
use std::io::{BufRead as _, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value};

use super::record::{self, Category, RECORD_BYTES_MAX, Record, ResultType};
use super::store::{AuditLog, OPERATION_START};
use super::verify::{self, Report};
use super::{AuditConfig, AuditError, Clock, SharedClock};

/// A clock the test moves by hand.
#[derive(Debug)]
pub(crate) struct ManualClock(Mutex<(SystemTime, Duration)>);

impl ManualClock {
    pub(crate) fn new() -> Arc<ManualClock> {
        // 2026-05-01T12:00:00Z.
        Arc::new(ManualClock(Mutex::new((
            UNIX_EPOCH + Duration::from_secs(1_777_636_800),
            Duration::ZERO,
        ))))
    }

    /// Time passes.
    pub(crate) fn advance(&self, by: Duration) {
        if let Ok(mut now) = self.0.lock() {
            now.0 += by;
            now.1 += by;
        }
    }

    /// Sets the clock back, as NTP does to a clock that ran ahead.
    pub(crate) fn rewind(&self, by: Duration) {
        if let Ok(mut now) = self.0.lock() {
            now.0 -= by;
        }
    }

    /// Sets the clock ahead with no time passing (a bad RTC, a misstep, a forged time).
    pub(crate) fn jump(&self, by: Duration) {
        if let Ok(mut now) = self.0.lock() {
            now.0 += by;
        }
    }
}

impl Clock for ManualClock {
    fn now(&self) -> SystemTime {
        self.0.lock().map_or(UNIX_EPOCH, |now| now.0)
    }

    fn running(&self) -> Duration {
        self.0.lock().map_or(Duration::ZERO, |now| now.1)
    }
}

pub(crate) fn config(state: &Path) -> AuditConfig {
    let mut config = AuditConfig::new(state.to_owned());
    config.checkpoint_every_records = 4;
    config.gateway_instance = "test-host".into();
    config
}

pub(crate) fn request(clock: &dyn Clock, number: u64) -> Record {
    Record::builder(
        Category::Audit,
        "Isthmus/inference/chat/completions/action",
        clock.now(),
    )
    .result(ResultType::Succeeded, "200", "answered")
    .duration_ms(12 + number)
    .caller_ip_address("127.0.0.1")
    .request_id(format!("request-{number}"))
    .identity("AuthType", "ApiKey")
    .identity("KeyId", "key-1")
    .property("Route", "local")
    .property("Model", "smollm2")
    .property("PromptTokens", 30 + number)
    .property("ComplexityScore", 0.25)
    .build()
}

fn read_all(log: &AuditLog) -> Vec<Map<String, Value>> {
    let runtime = tokio::runtime::Builder::new_current_thread().build();
    let Ok(runtime) = runtime else {
        return Vec::new();
    };
    let records = runtime
        .block_on(log.read(0, usize::MAX))
        .unwrap_or_default();
    records
        .iter()
        .filter_map(|(_, line)| serde_json::from_slice(line).ok())
        .collect()
}

fn field_u64(record: &Map<String, Value>, name: &str) -> u64 {
    record.get(name).and_then(Value::as_u64).unwrap_or(u64::MAX)
}

fn field_str<'a>(record: &'a Map<String, Value>, name: &str) -> &'a str {
    record.get(name).and_then(Value::as_str).unwrap_or_default()
}

fn assert_verifies(path: &Path) -> Report {
    let report = verify::verify_path(path, &[]);
    let Ok(report) = report else {
        panic!("{}: {report:?}", path.display());
    };
    assert_eq!(report.problem, None, "{}", path.display());
    assert!(report.summary.signatures_checked);
    assert!(report.summary.anchor_checked);
    report
}

#[test]
fn chain_continues_across_restarts() -> anyhow::Result<()> {
    let state = tempfile::tempdir()?;
    let clock = ManualClock::new();
    let shared: SharedClock = clock.clone();
    let log = AuditLog::open_with_clock(config(state.path()), Arc::clone(&shared))?;
    let first: Vec<u64> = (0..5)
        .map(|number| {
            log.append_blocking(request(&*clock, number))
                .map(|receipt| receipt.seq)
        })
        .collect::<Result<_, _>>()?;
    // 1: start, 2: checkpoint over it, 3..6: records, 7: checkpoint, 8: the fifth record;
    // shutdown writes 9: stop and 10: its checkpoint. Epoch 2: 11 start, 12 checkpoint, 13.
    assert_eq!(first, [3, 4, 5, 6, 8]);
    log.shutdown_blocking()?;
    assert!(matches!(
        log.append_blocking(request(&*clock, 9)),
        Err(AuditError::Stopped)
    ));

    clock.advance(Duration::from_secs(3600));
    let log = AuditLog::open_with_clock(config(state.path()), shared)?;
    let receipt = log.append_blocking(request(&*clock, 5))?;
    assert_eq!((receipt.epoch, receipt.seq), (2, 13));
    let records = read_all(&log);
    let by_seq = |seq: u64| {
        records
            .iter()
            .find(|record| field_u64(record, record::SEQ) == seq)
    };
    let (Some(stop_checkpoint), Some(start)) = (by_seq(10), by_seq(11)) else {
        panic!("records 10 and 11 missing");
    };
    // Epoch 1 closed with a stop record (9) and a checkpoint over it (10).
    assert_eq!(
        field_str(stop_checkpoint, record::CATEGORY),
        "IsthmusCheckpoint"
    );
    assert_eq!(field_str(start, record::OPERATION_NAME), OPERATION_START);
    assert_eq!(field_u64(start, record::EPOCH), 2);
    assert_eq!(
        field_str(start, record::PREV_HASH),
        field_str(stop_checkpoint, record::RECORD_HASH)
    );
    assert_eq!(
        start
            .get(record::PROPERTIES)
            .and_then(|properties| properties.get("PreviousEpochClosed")),
        Some(&Value::Bool(true))
    );
    log.shutdown_blocking()?;

    let store = assert_verifies(&state.path().join("audit-store"));
    let files = assert_verifies(&state.path().join("audit"));
    assert_eq!(store.summary, files.summary);
    assert_eq!(
        (
            store.summary.records,
            store.summary.epochs,
            store.summary.last_seq
        ),
        (15, 2, 15)
    );
    assert_eq!(store.summary.covered_up_to, 14);
    Ok(())
}

/// A crash in the middle of writing a JSONL line (power loss, a full disk) leaves a torn
/// line. At the next start the writer ends it, rewrites the record from the store, and the
/// files still verify as a whole, reporting the torn line.
#[test]
fn a_line_torn_by_a_crash_is_ended_and_its_record_written_again() -> anyhow::Result<()> {
    let state = tempfile::tempdir()?;
    let clock = ManualClock::new();
    let shared: SharedClock = clock.clone();
    let log = AuditLog::open_with_clock(config(state.path()), Arc::clone(&shared))?;
    for number in 0..3 {
        log.append_blocking(request(&*clock, number))?;
    }
    log.shutdown_blocking()?;
    // Tear the newest file's last line: keep its first 40 bytes, without the newline.
    let files = state.path().join("audit");
    let newest = std::fs::read_dir(&files)?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| {
            path.extension()
                .is_some_and(|extension| extension == "jsonl")
        })
        .max()
        .ok_or_else(|| anyhow::anyhow!("no JSONL file in {}", files.display()))?;
    let text = std::fs::read(&newest)?;
    let body = &text[..text.len() - 1];
    let last_start = body
        .iter()
        .rposition(|&byte| byte == b'\n')
        .map_or(0, |at| at + 1);
    std::fs::write(&newest, &text[..last_start + 40])?;

    let log = AuditLog::open_with_clock(config(state.path()), shared)?;
    log.append_blocking(request(&*clock, 3))?;
    log.shutdown_blocking()?;
    let rewritten = std::fs::read_to_string(&newest)?;
    assert!(rewritten.ends_with('\n'));
    let torn = String::from_utf8_lossy(&text[last_start..last_start + 40]).into_owned();
    assert!(
        rewritten.contains(&format!("{torn}\n")),
        "the torn line is not ended in place"
    );

    let store = assert_verifies(&state.path().join("audit-store"));
    let files = assert_verifies(&files);
    assert_eq!(files.summary.torn_lines, 1);
    assert_eq!(
        (files.summary.records, files.summary.last_seq),
        (store.summary.records, store.summary.last_seq)
    );
    Ok(())
}

#[test]
fn group_commit_acknowledges_a_thousand_concurrent_appends() -> anyhow::Result<()> {
    let state = tempfile::tempdir()?;
    let mut config = config(state.path());
    config.checkpoint_every_records = 100;
    let log = AuditLog::open(config.clone())?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .build()?;
    let receipts = runtime.block_on(async {
        let clock = super::SystemClock;
        let tasks: Vec<_> = (0..1000)
            .map(|number| {
                let log = log.clone();
                let record = request(&clock, number);
                tokio::spawn(async move { log.append(record).await })
            })
            .collect();
        let mut receipts = Vec::new();
        for task in tasks {
            receipts.push(task.await);
        }
        receipts
    });
    let mut acknowledged = BTreeSet::new();
    for receipt in receipts {
        acknowledged.insert(receipt??.seq);
    }
    assert_eq!(acknowledged.len(), 1000);
    runtime.block_on(log.shutdown())?;
    drop(runtime);
    drop(log);

    let log = AuditLog::open(config)?;
    let records = read_all(&log);
    let seqs: Vec<u64> = records
        .iter()
        .map(|record| field_u64(record, record::SEQ))
        .collect();
    let expected: Vec<u64> = (1..=u64::try_from(seqs.len())?).collect();
    assert_eq!(seqs, expected, "seq is 1..N without gaps");
    let requests: BTreeSet<u64> = records
        .iter()
        .filter(|record| field_str(record, record::CATEGORY) == "IsthmusAudit")
        .map(|record| field_u64(record, record::SEQ))
        .collect();
    assert_eq!(requests, acknowledged);
    log.shutdown_blocking()?;
    assert_verifies(&state.path().join("audit-store"));
    assert_verifies(&state.path().join("audit"));
    Ok(())
}

#[test]
fn a_checkpoint_follows_when_its_interval_has_passed() -> anyhow::Result<()> {
    let state = tempfile::tempdir()?;
    let clock = ManualClock::new();
    let mut config = config(state.path());
    config.checkpoint_every_records = 1000;
    config.checkpoint_every_ms = 60_000;
    let log = AuditLog::open_with_clock(config, clock.clone())?;
    let quiet = log.append_blocking(request(&*clock, 1))?;
    clock.advance(Duration::from_secs(61));
    let due = log.append_blocking(request(&*clock, 2))?;
    let records = read_all(&log);
    let categories: Vec<(u64, &str)> = records
        .iter()
        .map(|record| {
            (
                field_u64(record, record::SEQ),
                field_str(record, record::CATEGORY),
            )
        })
        .collect();
    assert_eq!((quiet.seq, due.seq), (3, 4));
    assert_eq!(
        categories,
        [
            (1, "IsthmusLifecycle"),
            (2, "IsthmusCheckpoint"),
            (3, "IsthmusAudit"),
            (4, "IsthmusAudit"),
            (5, "IsthmusCheckpoint"),
        ]
    );
    log.shutdown_blocking()?;
    Ok(())
}

fn block_on<F: std::future::Future>(future: F) -> anyhow::Result<F::Output> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .build()?
        .block_on(future))
}

#[test]
fn retention_keeps_unexported_records_and_two_days() -> anyhow::Result<()> {
    let state = tempfile::tempdir()?;
    let clock = ManualClock::new();
    let mut config = config(state.path());
    config.retention_requires_export = true;
    config.retention_days = 2;
    config.retention_bytes_max = 1;
    let log = AuditLog::open_with_clock(config, clock.clone())?;
    for number in 0..8 {
        log.append_blocking(request(&*clock, number))?;
    }
    let first_seq = |log: &AuditLog| -> anyhow::Result<u64> {
        let records = block_on(log.read(0, 1))??;
        Ok(records.first().map_or(0, |(seq, _)| *seq))
    };
    // Over the byte bound and a day old, all exported: younger than two days, so kept.
    block_on(log.mark_exported(6))??;
    clock.advance(Duration::from_secs(86_400));
    log.append_blocking(request(&*clock, 8))?;
    assert_eq!(first_seq(&log)?, 1);
    // Five days old: only what was exported goes.
    clock.advance(Duration::from_secs(4 * 86_400));
    log.append_blocking(request(&*clock, 9))?;
    assert_eq!(first_seq(&log)?, 7);
    block_on(log.mark_exported(9))??;
    clock.advance(Duration::from_secs(61));
    log.append_blocking(request(&*clock, 10))?;
    assert_eq!(first_seq(&log)?, 10);
    log.shutdown_blocking()?;
    let report = verify::verify_path(&state.path().join("audit-store"), &[])?;
    assert_eq!(report.problem, None);
    assert_eq!(report.summary.first_seq, 10);
    // The files span three days and verify as one chain.
    assert_eq!(super::files::list(&state.path().join("audit"))?.len(), 3);
    assert_verifies(&state.path().join("audit"));
    Ok(())
}

#[test]
fn a_clock_set_far_ahead_does_not_expire_the_log() -> anyhow::Result<()> {
    let state = tempfile::tempdir()?;
    let clock = ManualClock::new();
    let mut config = config(state.path());
    config.retention_days = 2;
    let log = AuditLog::open_with_clock(config.clone(), clock.clone())?;
    for number in 0..4 {
        log.append_blocking(request(&*clock, number))?;
    }
    let first_seq = |log: &AuditLog| -> anyhow::Result<u64> {
        let records = block_on(log.read(0, 1))??;
        Ok(records.first().map_or(0, |(seq, _)| *seq))
    };
    // The clock jumps sixty days ahead with no time passing: every record and file looks
    // sixty days old, yet they have not aged past the days the gateway has run.
    clock.jump(Duration::from_secs(60 * 86_400));
    log.append_blocking(request(&*clock, 4))?;
    assert_eq!(first_seq(&log)?, 1);
    // The file of the day the records were written (2026-05-01) is kept too.
    let first_day = 1_777_636_800 / 86_400;
    let file_kept = |state: &Path| -> anyhow::Result<bool> {
        Ok(super::files::list(&state.join("audit"))?
            .iter()
            .any(|(day, _)| *day == first_day))
    };
    assert!(file_kept(state.path())?);
    // Nor after a restart, though the newest record now carries the jumped day: the day
    // records age by is kept in the store.
    log.shutdown_blocking()?;
    let log = AuditLog::open_with_clock(config, clock.clone())?;
    log.append_blocking(request(&*clock, 5))?;
    assert_eq!(first_seq(&log)?, 1);
    assert!(file_kept(state.path())?);
    // Time passes for real: the day records age by catches up at twice its pace, so three
    // days later the records from before the jump are six days old, past the two kept.
    clock.advance(Duration::from_secs(3 * 86_400));
    log.append_blocking(request(&*clock, 6))?;
    let first = first_seq(&log)?;
    assert!(
        first > 5,
        "records from before the jump were kept: first seq {first}"
    );
    log.shutdown_blocking()?;
    assert_verifies(&state.path().join("audit"));
    Ok(())
}

#[test]
fn a_store_whose_newest_line_is_not_a_record_is_refused_not_restarted() -> anyhow::Result<()> {
    let state = tempfile::tempdir()?;
    let clock = ManualClock::new();
    let log = AuditLog::open_with_clock(config(state.path()), clock.clone())?;
    log.append_blocking(request(&*clock, 0))?;
    log.shutdown_blocking()?;
    let store = state.path().join("audit-store");
    {
        let db = sled::open(&store)?;
        let records = db.open_tree("records")?;
        records.insert(1_000_u64.to_be_bytes(), b"not json".as_slice())?;
        db.flush()?;
    }
    // Starting the chain again at genesis would overwrite seq 1, 2, ... with new records.
    let error = AuditLog::open_with_clock(config(state.path()), clock.clone())
        .err()
        .ok_or_else(|| anyhow::anyhow!("a damaged store was opened"))?;
    let message = error.to_string();
    assert!(
        message.contains("seq 1000") && message.contains("not an audit record"),
        "{message}"
    );
    Ok(())
}

#[test]
fn an_intent_is_marked_and_durable_before_its_outcome() -> anyhow::Result<()> {
    let state = tempfile::tempdir()?;
    let clock = ManualClock::new();
    let log = AuditLog::open_with_clock(config(state.path()), clock.clone())?;
    let (intent, outcome) = block_on(async {
        let intent = log.append_intent(request(&*clock, 1)).await;
        let outcome = log.append(request(&*clock, 1)).await;
        (intent, outcome)
    })?;
    let (intent, outcome) = (intent?, outcome?);
    assert_eq!((intent.seq, outcome.seq), (3, 4));
    let records = read_all(&log);
    let phases: Vec<Option<&Value>> = records
        .iter()
        .filter(|record| field_str(record, record::CATEGORY) == "IsthmusAudit")
        .map(|record| {
            record
                .get(record::PROPERTIES)
                .and_then(|properties| properties.get("Phase"))
        })
        .collect();
    assert_eq!(phases, [Some(&Value::from("intent")), None]);
    assert!(log.is_healthy());
    log.shutdown_blocking()?;
    Ok(())
}

#[test]
fn oversized_records_are_cut_not_dropped() -> anyhow::Result<()> {
    let huge = "x".repeat(100 * 1024);
    let record = Record::builder(Category::Audit, "op", UNIX_EPOCH)
        .request_id(huge.clone())
        .property("Prompt", huge.clone())
        .property("Small", 7)
        .property("Nested", serde_json::json!({ "a": huge }))
        .build();
    let fields = record.fields();
    let length = serde_json::to_vec(fields)?.len();
    assert!(length <= RECORD_BYTES_MAX - 400, "{length}");
    let properties = fields.get(record::PROPERTIES).and_then(Value::as_object);
    assert_eq!(
        properties.and_then(|properties| properties.get(record::TRUNCATED)),
        Some(&Value::Bool(true))
    );
    assert_eq!(
        properties.and_then(|properties| properties.get("Small")),
        Some(&7.into())
    );
    assert_eq!(
        field_str(fields, "RequestId").len(),
        record::TEXT_FIELD_BYTES_MAX
    );
    assert_eq!(
        field_str(fields, record::TIME_GENERATED),
        "1970-01-01T00:00:00.000Z"
    );

    let state = tempfile::tempdir()?;
    let log = AuditLog::open(config(state.path()))?;
    let receipt = log.append_blocking(record)?;
    log.shutdown_blocking()?;
    assert_eq!(receipt.seq, 3);
    assert_verifies(&state.path().join("audit"));
    Ok(())
}

#[test]
fn time_formats_are_rfc_3339_utc_with_milliseconds() {
    let time = UNIX_EPOCH + Duration::from_millis(1_709_251_199_999);
    assert_eq!(record::format_time(time), "2024-02-29T23:59:59.999Z");
    assert_eq!(record::format_day(time), "20240229");
    assert_eq!(
        record::parse_day("2024-02-29T23:59:59.999Z"),
        record::parse_day("20240229")
    );
    assert_eq!(record::parse_day("19700101"), Some(0));
    assert_eq!(record::parse_day("20241301"), None);
}

// --- Child processes -------------------------------------------------------------------------

const CHILD_ROLE: &str = "ISTHMUS_AUDIT_TEST_CHILD";
const CHILD_DIRECTORY: &str = "ISTHMUS_AUDIT_TEST_DIRECTORY";
const CHILD_TEST: &str = "audit::tests::child_process_entry";

/// Not a test of its own: the body of the child processes the tests below start (this test
/// binary, running only this function, with the role in the environment).
#[test]
fn child_process_entry() {
    let (Ok(role), Ok(directory)) = (std::env::var(CHILD_ROLE), std::env::var(CHILD_DIRECTORY))
    else {
        return;
    };
    let directory = PathBuf::from(directory);
    match role.as_str() {
        "crash" => child_append_until_killed(&directory),
        "unavailable" => child_append_until_refused(&directory),
        _ => {}
    }
}

/// Appends from eight threads and prints `acked SEQ` after each append returns, until killed.
fn child_append_until_killed(directory: &Path) {
    let Ok(log) = AuditLog::open(config(directory)) else {
        println!("open failed");
        return;
    };
    let stdout = Arc::new(Mutex::new(std::io::stdout()));
    let threads: Vec<_> = (0..8)
        .map(|thread| {
            let log = log.clone();
            let stdout = Arc::clone(&stdout);
            std::thread::spawn(move || {
                let clock = super::SystemClock;
                // Bounded: the parent kills us long before this ends.
                for number in 0..20_000 {
                    let Ok(receipt) =
                        log.append_blocking(request(&clock, thread * 100_000 + number))
                    else {
                        return;
                    };
                    if let Ok(mut stdout) = stdout.lock() {
                        let _ = writeln!(stdout, "acked {}", receipt.seq);
                        let _ = stdout.flush();
                    }
                }
            })
        })
        .collect();
    for thread in threads {
        let _ = thread.join();
    }
}

/// Appends until the store refuses (the file size limit the parent set), then reports what the
/// log said.
fn child_append_until_refused(directory: &Path) {
    let Ok(log) = AuditLog::open(config(directory)) else {
        println!("open failed");
        return;
    };
    let clock = super::SystemClock;
    let padding = "p".repeat(8 * 1024);
    for number in 0..100_000 {
        let record = Record::builder(Category::Audit, "op", clock.now())
            .request_id(format!("request-{number}"))
            .property("Padding", padding.clone())
            .build();
        match log.append_blocking(record) {
            Ok(_) => {}
            Err(AuditError::Unavailable(reason)) => {
                println!("unavailable healthy={} reason={reason}", log.is_healthy());
                let again = log.append_blocking(request(&clock, 0));
                println!("again {}", matches!(again, Err(AuditError::Unavailable(_))));
                return;
            }
            Err(other) => {
                println!("other error {other}");
                return;
            }
        }
    }
    println!("never refused");
}

fn child(role: &str, directory: &Path, shell_prefix: Option<&str>) -> anyhow::Result<Command> {
    let exe = std::env::current_exe()?;
    let mut command = match shell_prefix {
        Some(prefix) => {
            let mut command = Command::new("sh");
            command
                .arg("-c")
                .arg(format!("{prefix}; exec \"$0\" \"$@\""))
                .arg(exe);
            command
        }
        None => Command::new(exe),
    };
    command
        .args([CHILD_TEST, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ROLE, role)
        .env(CHILD_DIRECTORY, directory)
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    Ok(command)
}

/// A store another process holds (a second gateway on the same state directory) is refused
/// at once, naming that process, instead of after the wait meant for this process's own
/// lingering handles.
#[test]
fn a_store_held_by_another_process_is_refused_naming_it() -> anyhow::Result<()> {
    let state = tempfile::tempdir()?;
    let mut process = child("crash", state.path(), None)?.spawn()?;
    let Some(stdout) = process.stdout.take() else {
        anyhow::bail!("no stdout");
    };
    let mut lines = BufReader::new(stdout).lines();
    let holding = lines.any(|line| line.is_ok_and(|line| line.starts_with("acked ")));
    let opened = holding.then(|| AuditLog::open(config(state.path())));
    process.kill()?;
    process.wait()?;
    assert!(holding, "the child never appended");
    let Some(Err(error)) = opened else {
        panic!("a store held by process {} was opened", process.id());
    };
    let message = format!("{error:#}");
    assert!(
        message.contains(&format!("in use by process {}", process.id())),
        "{message}"
    );
    Ok(())
}

#[test]
fn acknowledged_records_survive_sigkill() -> anyhow::Result<()> {
    let state = tempfile::tempdir()?;
    for round in 0..2 {
        let mut process = child("crash", state.path(), None)?.spawn()?;
        let Some(stdout) = process.stdout.take() else {
            anyhow::bail!("no stdout");
        };
        let mut lines = BufReader::new(stdout).lines();
        let mut acknowledged = BTreeSet::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while acknowledged.len() < 1500 && std::time::Instant::now() < deadline {
            let Some(line) = lines.next() else { break };
            if let Some(seq) = line?.strip_prefix("acked ") {
                acknowledged.insert(seq.parse::<u64>()?);
            }
        }
        process.kill()?;
        process.wait()?;
        // What the child printed before it died was acknowledged too.
        for line in lines {
            if let Some(seq) = line?.strip_prefix("acked ") {
                acknowledged.insert(seq.parse::<u64>()?);
            }
        }
        assert!(
            acknowledged.len() >= 1500,
            "round {round}: {}",
            acknowledged.len()
        );

        let store = verify::verify_path(&state.path().join("audit-store"), &[])?;
        assert_eq!(store.problem, None, "round {round}");
        let log = AuditLog::open(config(state.path()))?;
        let present: BTreeSet<u64> = read_all(&log)
            .iter()
            .map(|record| field_u64(record, record::SEQ))
            .collect();
        let missing: Vec<&u64> = acknowledged.difference(&present).collect();
        assert!(
            missing.is_empty(),
            "round {round}: acknowledged but missing: {missing:?}"
        );
        log.shutdown_blocking()?;
        assert_verifies(&state.path().join("audit-store"));
        assert_verifies(&state.path().join("audit"));
    }
    Ok(())
}

#[test]
fn a_store_that_cannot_write_fails_closed() -> anyhow::Result<()> {
    let state = tempfile::tempdir()?;
    // A real write error: a file size limit (`ulimit -f 4096`: 2 or 4 MiB, by the shell's
    // block size) with SIGXFSZ ignored, so writes past it fail with EFBIG as on a full disk.
    let output = child(
        "unavailable",
        state.path(),
        Some("trap '' XFSZ; ulimit -f 4096"),
    )?
    .stderr(Stdio::null())
    .output()?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("unavailable healthy=false"),
        "child said: {stdout}"
    );
    assert!(stdout.contains("again true"), "child said: {stdout}");
    // What was acknowledged before the failure still verifies.
    let report = verify::verify_path(&state.path().join("audit-store"), &[])?;
    assert_eq!(report.problem, None);
    Ok(())
}

#[test]
fn records_nobody_waits_for_commit_with_the_next_awaited_one_or_the_next_tick() -> anyhow::Result<()>
{
    let state = tempfile::tempdir()?;
    let clock = ManualClock::new();
    let log = AuditLog::open_with_clock(config(state.path()), clock.clone())?;
    let stored = |log: &AuditLog| -> anyhow::Result<Vec<u64>> {
        Ok(block_on(log.read(0, 100))??
            .into_iter()
            .map(|(seq, _)| seq)
            .collect())
    };
    let opened = stored(&log)?.len();
    // An intent alone: no flush of its own, but the ticker commits it soon.
    drop(log.submit_intent(request(&*clock, 1))?);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while stored(&log)?.len() == opened {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the intent never became durable"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // An intent and then an awaited outcome: both are durable when the outcome returns.
    drop(log.submit_intent(request(&*clock, 2))?);
    let receipt = log.append_blocking(request(&*clock, 3))?;
    let seqs = stored(&log)?;
    anyhow::ensure!(
        seqs.contains(&(receipt.seq - 1)) && seqs.contains(&receipt.seq),
        "{seqs:?} lacks the intent or the outcome before {}",
        receipt.seq
    );
    log.shutdown_blocking()?;
    assert_verifies(&state.path().join("audit"));
    Ok(())
}

mod bound {
    use proptest::prelude::*;
    use serde_json::{Map, Value};

    use super::super::jcs;
    use super::super::record::object_len_bound;

    fn values() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>()
                .prop_filter("finite", |number| number.is_finite())
                .prop_map(Value::from),
            // Control characters, quotes, backslashes and multi-byte characters.
            "[\\u{0}-\\u{1f}\"\\\\a-z\\u{e9}\\u{1f600}]{0,40}".prop_map(Value::String),
        ];
        leaf.prop_recursive(3, 48, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::btree_map("[A-Za-z\\u{0}-\\u{1f}]{0,8}", inner, 0..6)
                    .prop_map(|members| Value::Object(members.into_iter().collect())),
            ]
        })
    }

    proptest! {
        /// The size cap skips writing a record only when it is surely under the cap: the
        /// bound is never below the length `serde_json` or the canonical form writes.
        #[test]
        fn is_never_below_the_written_length(
            members in prop::collection::btree_map("[A-Za-z\\u{0}-\\u{1f}\\u{e9}]{0,12}", values(), 0..12),
        ) {
            let fields: Map<String, Value> = members.into_iter().collect();
            let bound = object_len_bound(&fields);
            let written = serde_json::to_vec(&fields).unwrap().len();
            let canonical = jcs::canonicalize(&Value::Object(fields)).unwrap().len();
            prop_assert!(bound >= written, "bound {bound} < serde_json's {written}");
            prop_assert!(bound >= canonical, "bound {bound} < canonical {canonical}");
        }
    }
}

#[test]
fn a_files_directory_holding_another_streams_records_is_refused() -> anyhow::Result<()> {
    let first_state = tempfile::tempdir()?;
    let first = AuditLog::open(config(first_state.path()))?;
    first.append_blocking(request(&super::SystemClock, 1))?;
    let first_stream = first.stream_id().to_owned();
    first.shutdown_blocking()?;
    drop(first);
    let second_state = tempfile::tempdir()?;
    let second = AuditLog::open(config(second_state.path()))?;
    second.shutdown_blocking()?;
    drop(second);
    // The second gateway pointed at the first's files: its chain would interleave with them.
    let mut pointed = config(second_state.path());
    pointed.directory = config(first_state.path()).directory;
    let Err(AuditError::Open(message)) = AuditLog::open(pointed) else {
        panic!("the second gateway opened over the first's records");
    };
    assert!(
        message.contains(&format!("belongs to stream {first_stream}"))
            && message.contains("give each gateway an audit directory of its own"),
        "{message}"
    );
    Ok(())
}

#[test]
fn a_clock_set_back_across_midnight_keeps_the_files_in_seq_order() -> anyhow::Result<()> {
    let state = tempfile::tempdir()?;
    let clock = ManualClock::new();
    // Noon on 1 May: the start record goes to that day's file; one o'clock on 2 May (a clock
    // running ahead), a request goes to the next day's.
    let log = AuditLog::open_with_clock(config(state.path()), clock.clone())?;
    clock.advance(Duration::from_secs(13 * 3600));
    log.append_blocking(request(&*clock, 0))?;
    log.shutdown_blocking()?;
    // Set back to 23:00 on 1 May, the gateway starts again: its records still go to the file
    // of 2 May, or 1 May's file would hold records newer than 2 May's.
    clock.rewind(Duration::from_secs(2 * 3600));
    let log = AuditLog::open_with_clock(config(state.path()), clock.clone())?;
    log.append_blocking(request(&*clock, 1))?;
    log.shutdown_blocking()?;
    let directory = state.path().join("audit");
    let days: Vec<String> = super::files::list(&directory)?
        .into_iter()
        .filter_map(|(_, path)| Some(path.file_name()?.to_str()?.to_owned()))
        .collect();
    assert_eq!(days, ["audit-20260501.jsonl", "audit-20260502.jsonl"]);
    let report = verify::verify_path(&directory, &[])?;
    assert_eq!(report.problem, None, "{}", report.summary);
    assert_eq!(report.summary.epochs, 2);
    Ok(())
}

#[test]
fn a_file_dated_far_ahead_by_a_clock_that_ran_ahead_does_not_take_every_later_record()
-> anyhow::Result<()> {
    let state = tempfile::tempdir()?;
    let clock = ManualClock::new();
    // A clock a year ahead writes 2027's file; once corrected, records go to today's file,
    // which retention can delete in its time (a file from the future it never would).
    clock.advance(Duration::from_secs(365 * 86_400));
    let log = AuditLog::open_with_clock(config(state.path()), clock.clone())?;
    log.append_blocking(request(&*clock, 0))?;
    log.shutdown_blocking()?;
    clock.rewind(Duration::from_secs(365 * 86_400));
    let log = AuditLog::open_with_clock(config(state.path()), clock.clone())?;
    log.append_blocking(request(&*clock, 1))?;
    log.shutdown_blocking()?;
    let days: Vec<String> = super::files::list(&state.path().join("audit"))?
        .into_iter()
        .filter_map(|(_, path)| Some(path.file_name()?.to_str()?.to_owned()))
        .collect();
    assert_eq!(days, ["audit-20260501.jsonl", "audit-20270501.jsonl"]);
    // Later starts find the last record written by its `Seq`, not in the file newest by
    // name: nothing is written twice.
    for number in 2..4 {
        let log = AuditLog::open_with_clock(config(state.path()), clock.clone())?;
        log.append_blocking(request(&*clock, number))?;
        log.shutdown_blocking()?;
    }
    let mut seqs: Vec<u64> = Vec::new();
    for (_, path) in super::files::list(&state.path().join("audit"))? {
        for line in std::fs::read_to_string(&path)?.lines() {
            let record: Value = serde_json::from_str(line)?;
            seqs.extend(record[record::SEQ].as_u64());
        }
    }
    seqs.sort_unstable();
    let store = assert_verifies(&state.path().join("audit-store"));
    let expected: Vec<u64> = (1..=store.summary.last_seq).collect();
    assert_eq!(seqs, expected, "records missing or written twice");
    Ok(())
}

#[test]
fn a_record_torn_just_before_its_line_feed_is_not_written_twice() -> anyhow::Result<()> {
    let state = tempfile::tempdir()?;
    let clock = ManualClock::new();
    let log = AuditLog::open_with_clock(config(state.path()), clock.clone())?;
    for number in 0..3 {
        log.append_blocking(request(&*clock, number))?;
    }
    log.shutdown_blocking()?;
    let directory = state.path().join("audit");
    let (_, newest) = super::files::list(&directory)?
        .pop()
        .ok_or_else(|| anyhow::anyhow!("no JSONL file in {}", directory.display()))?;
    let text = std::fs::read(&newest)?;
    std::fs::write(&newest, &text[..text.len() - 1])?;
    let log = AuditLog::open_with_clock(config(state.path()), clock.clone())?;
    log.append_blocking(request(&*clock, 3))?;
    log.shutdown_blocking()?;
    let store = assert_verifies(&state.path().join("audit-store"));
    let files = assert_verifies(&directory);
    assert_eq!(files.summary.torn_lines, 0);
    assert_eq!(
        (files.summary.records, files.summary.last_seq),
        (store.summary.records, store.summary.last_seq)
    );
    Ok(())
}
