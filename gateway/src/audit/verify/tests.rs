//! Tamper detection, table-driven: each case edits a copy of a clean audit directory and
//! expects the first bad `Seq` and the kind of problem.
//!
//! The clean log (a checkpoint every 4 records, 10 requests, a clean shutdown):
//! 1 start, 2 checkpoint, 3..6 requests, 7 checkpoint, 8..11 requests, 12 checkpoint,
//! 13..14 requests, 15 stop, 16 checkpoint.

#![allow(
    clippy::ptr_arg,
    reason = "every tamper has one signature; some change the number of lines"
)]

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use super::{ProblemKind, verify_path};
use crate::audit::chain;
use crate::audit::files;
use crate::audit::key::{DeviceKey, PUBLIC_KEY_FILE};
use crate::audit::record::{RECORD_HASH, SEQ};
use crate::audit::store::AuditLog;
use crate::audit::tests::{ManualClock, config, request};

/// Writes the clean log; returns the state directory and the audit directory.
fn clean_log() -> anyhow::Result<(tempfile::TempDir, PathBuf)> {
    let state = tempfile::tempdir()?;
    let clock = ManualClock::new();
    let log = AuditLog::open_with_clock(config(state.path()), clock.clone())?;
    for number in 0..10 {
        log.append_blocking(request(&*clock, number))?;
    }
    log.shutdown_blocking()?;
    let directory = state.path().join("audit");
    Ok((state, directory))
}

fn only_file(directory: &Path) -> anyhow::Result<PathBuf> {
    let mut list = files::list(directory)?;
    anyhow::ensure!(list.len() == 1, "expected one audit file");
    Ok(list.remove(0).1)
}

fn parse(line: &str) -> Map<String, Value> {
    serde_json::from_str(line).unwrap_or_default()
}

fn seq_of(line: &str) -> u64 {
    parse(line).get(SEQ).and_then(Value::as_u64).unwrap_or(0)
}

fn position(lines: &[String], seq: u64) -> usize {
    lines
        .iter()
        .position(|line| seq_of(line) == seq)
        .unwrap_or(usize::MAX)
}

/// Serialises a record with its RecordHash recomputed, as a careful forger would.
fn rehash(mut record: Map<String, Value>) -> String {
    record.remove(RECORD_HASH);
    let hash = chain::expected_hash(&record).unwrap_or_default();
    record.insert(RECORD_HASH.into(), Value::String(hash));
    Value::Object(record).to_string()
}

/// `records` as a careful forger writes them: numbered on from the first, each linked to
/// the one before it and rehashed, so that every hash holds.
fn relinked(records: impl IntoIterator<Item = Map<String, Value>>) -> Vec<String> {
    let mut lines: Vec<String> = Vec::new();
    let mut previous: Option<Map<String, Value>> = None;
    for mut record in records {
        if let Some(previous) = &previous {
            let previous_seq = previous.get(SEQ).and_then(Value::as_u64).unwrap_or(0);
            record.insert(SEQ.into(), (previous_seq + 1).into());
            record.insert(
                crate::audit::record::PREV_HASH.into(),
                previous.get(RECORD_HASH).cloned().unwrap_or_default(),
            );
        }
        let line = rehash(record);
        previous = Some(parse(&line));
        lines.push(line);
    }
    lines
}

fn set_property(line: &str, name: &str, value: Value) -> Map<String, Value> {
    let mut record = parse(line);
    if let Some(Value::Object(properties)) = record.get_mut("Properties") {
        properties.insert(name.into(), value);
    }
    record
}

type Tamper = fn(&mut Vec<String>);

/// A tampering case: its name, the edit, and the expected first problem.
type Case = (&'static str, Tamper, Option<(ProblemKind, u64)>);

fn altered_field(lines: &mut Vec<String>) {
    let at = position(lines, 4);
    lines[at] = Value::Object(set_property(&lines[at], "Model", "gpt-evil".into())).to_string();
}

fn altered_and_rehashed(lines: &mut Vec<String>) {
    let at = position(lines, 4);
    lines[at] = rehash(set_property(&lines[at], "Model", "gpt-evil".into()));
}

fn deleted_record(lines: &mut Vec<String>) {
    let at = position(lines, 5);
    lines.remove(at);
}

fn swapped_records(lines: &mut Vec<String>) {
    let at = position(lines, 5);
    lines.swap(at, at + 1);
}

fn inserted_record(lines: &mut Vec<String>) {
    // A forged seq 9 that links correctly to seq 8, hashed properly.
    let at = position(lines, 9);
    let forged = rehash(set_property(&lines[at], "Route", "cloud".into()));
    lines.insert(at, forged);
}

fn truncated_tail(lines: &mut Vec<String>) {
    lines.truncate(lines.len() - 3);
}

fn bad_signature(lines: &mut Vec<String>) {
    let at = position(lines, 7);
    let other = tempfile::tempdir().map(|directory| {
        let key = DeviceKey::load_or_create(directory.path());
        key.map(|key| key.sign(b"something else"))
    });
    let signature = other.ok().and_then(Result::ok).unwrap_or_default();
    lines[at] = rehash(set_property(&lines[at], "Signature", signature.into()));
}

fn untouched(_: &mut Vec<String>) {}

fn junk_between_records(lines: &mut Vec<String>) {
    // Not JSON, so not a record; and not the start of the record after it either.
    let at = position(lines, 6);
    lines.insert(
        at,
        "{\"Seq\": 6, \"Note\": \"a forged entry other tools may read\"".into(),
    );
}

fn torn_write_rewritten(lines: &mut Vec<String>) {
    // What a crash leaves: the start of a record, then the record written whole again.
    let at = position(lines, 6);
    let torn = lines[at][..lines[at].len() / 2].to_owned();
    lines.insert(at, torn);
}

fn repeated_key(lines: &mut Vec<String>) {
    // An earlier copy of a key: the hash holds for the last copy, a reader may take the first.
    let at = position(lines, 4);
    lines[at] = lines[at].replacen('{', "{\"ResultType\":\"Failed\",", 1);
}

#[test]
fn verify_detects_each_kind_of_tampering() -> anyhow::Result<()> {
    let (_state, clean) = clean_log()?;
    let cases: &[Case] = &[
        ("untouched", untouched, None),
        (
            "altered field",
            altered_field,
            Some((ProblemKind::Altered, 4)),
        ),
        (
            "altered and rehashed",
            altered_and_rehashed,
            Some((ProblemKind::BrokenLink, 5)),
        ),
        (
            "deleted record",
            deleted_record,
            Some((ProblemKind::Deleted, 5)),
        ),
        (
            "swapped records",
            swapped_records,
            Some((ProblemKind::Reordered, 5)),
        ),
        (
            "inserted record",
            inserted_record,
            Some((ProblemKind::Inserted, 9)),
        ),
        (
            "truncated tail",
            truncated_tail,
            Some((ProblemKind::Truncated, 14)),
        ),
        (
            "bad checkpoint signature",
            bad_signature,
            Some((ProblemKind::BadSignature, 7)),
        ),
        (
            "junk between records",
            junk_between_records,
            Some((ProblemKind::Malformed, 6)),
        ),
        ("torn write rewritten", torn_write_rewritten, None),
        (
            "repeated key",
            repeated_key,
            Some((ProblemKind::Malformed, 4)),
        ),
    ];
    let mut wrong = Vec::new();
    for (name, tamper, expected) in cases {
        let copy = tempfile::tempdir()?;
        for entry in std::fs::read_dir(&clean)? {
            let entry = entry?;
            std::fs::copy(entry.path(), copy.path().join(entry.file_name()))?;
        }
        let file = only_file(copy.path())?;
        let text = std::fs::read_to_string(&file)?;
        let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
        tamper(&mut lines);
        std::fs::write(&file, lines.join("\n") + "\n")?;
        let report = verify_path(copy.path(), &[])?;
        let got = report
            .problem
            .as_ref()
            .map(|problem| (problem.kind, problem.seq));
        if got != *expected {
            wrong.push(format!(
                "{name}: expected {expected:?}, got {:?}",
                report.problem
            ));
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
    Ok(())
}

#[test]
fn a_line_cut_mid_way_is_truncation() -> anyhow::Result<()> {
    let (_state, directory) = clean_log()?;
    let file = only_file(&directory)?;
    let mut bytes = std::fs::read(&file)?;
    // Drop the newline and half of the last record.
    bytes.pop();
    let last_start = bytes.iter().rposition(|&byte| byte == b'\n').unwrap_or(0) + 1;
    bytes.truncate(last_start + (bytes.len() - last_start) / 2);
    std::fs::write(&file, bytes)?;
    let problem = verify_path(&file, &[])?.problem;
    assert_eq!(
        problem.map(|problem| (problem.kind, problem.seq)),
        Some((ProblemKind::Truncated, 16))
    );
    Ok(())
}

#[test]
fn a_wrong_public_key_fails_every_signature() -> anyhow::Result<()> {
    let (state, directory) = clean_log()?;
    let other = state.path().join("other");
    std::fs::create_dir_all(&other)?;
    DeviceKey::load_or_create(&other)?;
    let problem = verify_path(&directory, &[other.join(PUBLIC_KEY_FILE)])?.problem;
    assert_eq!(
        problem.map(|problem| (problem.kind, problem.seq)),
        Some((ProblemKind::BadSignature, 2))
    );
    // The store with the right key beside it verifies.
    let store = verify_path(&state.path().join("audit-store"), &[])?;
    assert_eq!(store.problem, None);
    assert_eq!(store.summary.checkpoints, 4);
    Ok(())
}

#[test]
fn a_missing_path_is_an_error_naming_it() {
    let missing = Path::new("/nonexistent/audit-20260101.jsonl");
    let error = verify_path(missing, &[])
        .map(|_| ())
        .err()
        .map(|error| error.to_string());
    assert_eq!(
        error.as_deref(),
        Some("/nonexistent/audit-20260101.jsonl: No such file or directory (os error 2)")
    );
}

#[test]
fn a_chain_rewritten_without_its_checkpoints_is_caught_by_their_absence() -> anyhow::Result<()> {
    let (_state, directory) = clean_log()?;
    let file = only_file(&directory)?;
    let text = std::fs::read_to_string(&file)?;
    // A forger without the device key edits seq 3, drops every checkpoint after it,
    // renumbers, relinks and rehashes the rest, and removes the anchor: every hash holds.
    let records = text.lines().map(parse).filter_map(|mut record| {
        let seq = record.get(SEQ).and_then(Value::as_u64).unwrap_or(0);
        let category = record.get("Category").and_then(Value::as_str).unwrap_or("");
        if seq > 2 && category == crate::audit::record::Category::Checkpoint.as_str() {
            return None;
        }
        if seq == 3
            && let Some(Value::Object(properties)) = record.get_mut("Properties")
        {
            properties.insert("Route".into(), "local".into());
        }
        Some(record)
    });
    std::fs::write(&file, relinked(records).join("\n") + "\n")?;
    std::fs::remove_file(directory.join(files::CHECKPOINT_HEAD_FILE))?;
    let problem = verify_path(&directory, &[])?.problem;
    // The epoch writes a checkpoint every 4 records (a few lifecycle records may pass):
    // the ninth record after the last checkpoint (seq 2) gives the rewrite away.
    assert_eq!(
        problem.as_ref().map(|problem| (problem.kind, problem.seq)),
        Some((ProblemKind::MissingCheckpoint, 11)),
        "{problem:?}"
    );
    Ok(())
}

#[test]
fn start_records_forged_to_restart_the_count_are_caught() -> anyhow::Result<()> {
    let (_state, directory) = clean_log()?;
    let file = only_file(&directory)?;
    let text = std::fs::read_to_string(&file)?;
    let lines: Vec<String> = text.lines().map(str::to_owned).collect();
    let start = parse(&lines[position(&lines, 1)]);
    // A copy of the start record put into epoch 1 after seq 4, renumbered and relinked,
    // the rest after it relinked too: the forger's way to restart the count.
    let records = lines.iter().flat_map(|line| {
        let extra = (seq_of(line) == 5).then(|| start.clone());
        extra.into_iter().chain([parse(line)])
    });
    std::fs::write(&file, relinked(records).join("\n") + "\n")?;
    std::fs::remove_file(directory.join(files::CHECKPOINT_HEAD_FILE))?;
    let problem = verify_path(&directory, &[])?.problem;
    assert_eq!(
        problem.as_ref().map(|problem| (problem.kind, problem.seq)),
        Some((ProblemKind::Inserted, 5)),
        "{problem:?}"
    );
    Ok(())
}
