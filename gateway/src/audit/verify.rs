//! `isthmus audit verify PATH [--pubkey FILE]`: checks a JSONL file, a directory of
//! `audit-YYYYMMDD.jsonl` files (in date order) or the sled store.
//!
//! Every `RecordHash` is recomputed (RFC 8785), every `PrevHash` must be the previous record's
//! hash, `Seq` must grow by exactly one, `Epoch` must never go back and each new epoch must open
//! with an `IsthmusLifecycle` start record, every checkpoint must cover the record before it
//! and carry a valid Ed25519 signature, and the chain must reach the newest checkpoint the
//! store (or the directory's `audit-checkpoint.json`) remembers. The first problem is reported
//! with its `Seq` and kind.
//!
//! Checkpoints cannot be dropped unseen either: each epoch's start record names how many
//! records may pass between checkpoints (`CheckpointEveryRecords`, never above
//! [`super::CHECKPOINT_EVERY_RECORDS_MAX`]), and a longer run without one is a problem. So a
//! chain rewritten from some record on, its hashes recomputed and its checkpoints left out,
//! fails unless fewer records follow the change than that. A line that is not a record passes
//! only as a crash's torn write: the start of the record after it. Duplicate keys in a record
//! are refused (readers disagree on which copy counts). Checkpoints name their key; several
//! `--pubkey` files verify a chain whose device key was made again.
//!
//! What cannot be detected: records removed from the end after the newest checkpoint anchor
//! (the tail after the last checkpoint is reported as not covered), and records removed from
//! the start (retention deletes old records, so a chain may begin after seq 1).

use std::fmt;
use std::fs::File;
use std::io::{self, BufRead as _, BufReader, Read as _};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use ed25519_dalek::VerifyingKey;
use serde_json::{Map, Value};

use super::chain::{self, GENESIS_HASH};
use super::files::{self, CHECKPOINT_HEAD_FILE};
use super::key::{self, KeyError, PUBLIC_KEY_FILE};
use super::record::{self, Category};
use super::store::{META_LAST_CHECKPOINT, OPERATION_START};

#[cfg(test)]
mod tests;

/// A line longer than this is not a record (records are capped at 32 KiB).
const LINE_BYTES_MAX: u64 = 1024 * 1024;
/// Records beyond an epoch's `CheckpointEveryRecords` that may pass before its next
/// checkpoint: lifecycle records (a stop, a recovery) are written without one.
const CHECKPOINT_SLACK_RECORDS: u64 = 4;

/// Whether a JSON text repeats a key in any of its objects. Parsers disagree on which copy
/// counts, so a record whose hash holds for one reading could show another to a reader.
fn has_duplicate_keys(bytes: &[u8]) -> bool {
    struct Unique;
    impl<'de> serde::Deserialize<'de> for Unique {
        fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Unique, D::Error> {
            deserializer.deserialize_any(UniqueVisitor)
        }
    }
    struct UniqueVisitor;
    impl<'de> serde::de::Visitor<'de> for UniqueVisitor {
        type Value = Unique;
        fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
            formatter.write_str("JSON without repeated keys")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Unique, A::Error> {
            let mut seen = std::collections::HashSet::new();
            while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                if !seen.insert(key.into_owned()) {
                    return Err(serde::de::Error::custom("repeated key"));
                }
                map.next_value::<Unique>()?;
            }
            Ok(Unique)
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Unique, A::Error> {
            while seq.next_element::<Unique>()?.is_some() {}
            Ok(Unique)
        }
        fn visit_bool<E>(self, _: bool) -> Result<Unique, E> {
            Ok(Unique)
        }
        fn visit_i64<E>(self, _: i64) -> Result<Unique, E> {
            Ok(Unique)
        }
        fn visit_u64<E>(self, _: u64) -> Result<Unique, E> {
            Ok(Unique)
        }
        fn visit_f64<E>(self, _: f64) -> Result<Unique, E> {
            Ok(Unique)
        }
        fn visit_str<E>(self, _: &str) -> Result<Unique, E> {
            Ok(Unique)
        }
        fn visit_unit<E>(self) -> Result<Unique, E> {
            Ok(Unique)
        }
    }
    serde_json::from_slice::<Unique>(bytes).is_err()
}

/// What is wrong at the first bad record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProblemKind {
    /// A line that is not a record (not JSON, or chain fields missing).
    Malformed,
    /// `RecordHash` does not match the record's content.
    Altered,
    /// `PrevHash` is not the previous record's `RecordHash`.
    BrokenLink,
    /// `Seq` skips: records are missing.
    Deleted,
    /// A `Seq` comes again: a record was inserted or repeated.
    Inserted,
    /// `Seq` goes back or skips and comes back: records are out of order.
    Reordered,
    /// `Epoch` goes back.
    EpochRegression,
    /// An epoch does not begin with an `IsthmusLifecycle` start record.
    MissingLifecycle,
    /// `StreamId` changes within the chain.
    StreamChanged,
    /// A checkpoint does not cover the record before it.
    CheckpointMismatch,
    /// A checkpoint's signature is not valid under the public key.
    BadSignature,
    /// More records pass without a checkpoint than the epoch allows: checkpoints were left out.
    MissingCheckpoint,
    /// The chain ends early: mid-line, or before the newest checkpoint the store remembers.
    Truncated,
}

impl ProblemKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ProblemKind::Malformed => "malformed",
            ProblemKind::Altered => "altered",
            ProblemKind::BrokenLink => "broken link",
            ProblemKind::Deleted => "deleted",
            ProblemKind::Inserted => "inserted",
            ProblemKind::Reordered => "reordered",
            ProblemKind::EpochRegression => "epoch regression",
            ProblemKind::MissingLifecycle => "missing lifecycle record",
            ProblemKind::StreamChanged => "stream changed",
            ProblemKind::CheckpointMismatch => "checkpoint mismatch",
            ProblemKind::BadSignature => "bad signature",
            ProblemKind::MissingCheckpoint => "missing checkpoint",
            ProblemKind::Truncated => "truncated",
        }
    }
}

/// The first problem found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The first bad `Seq`.
    pub seq: u64,
    pub kind: ProblemKind,
    pub detail: String,
    /// `file:line`, or `store`.
    pub location: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            formatter,
            "seq {}: {}: {} ({})",
            self.seq,
            self.kind.as_str(),
            self.detail,
            self.location
        )
    }
}

/// What was checked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    pub records: u64,
    pub first_seq: u64,
    pub last_seq: u64,
    pub epochs: u64,
    pub checkpoints: u64,
    /// Whether signatures were checked (a public key was found or given).
    pub signatures_checked: bool,
    /// The keys checkpoints were checked with, by id, and whether they were found beside the
    /// records (proof only of consistency: whoever can rewrite the records can replace it).
    pub keys: Vec<String>,
    pub key_beside_records: bool,
    /// `Seq` covered by the last checkpoint in the chain (0: none).
    pub covered_up_to: u64,
    /// Lines torn by a crash and rewritten after it.
    pub torn_lines: u64,
    /// Whether an anchor (the newest checkpoint remembered apart from the chain) was checked.
    pub anchor_checked: bool,
}

impl fmt::Display for Summary {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            formatter,
            "{} record{} (seq {}..{}), {} epoch{}, {} checkpoint{} {}",
            self.records,
            plural(self.records),
            self.first_seq,
            self.last_seq,
            self.epochs,
            plural(self.epochs),
            self.checkpoints,
            plural(self.checkpoints),
            if self.signatures_checked {
                "verified"
            } else {
                "NOT verified (no public key)"
            }
        )?;
        if !self.keys.is_empty() {
            write!(formatter, " with key {}", self.keys.join(", "))?;
            if self.key_beside_records {
                write!(
                    formatter,
                    " (found beside the records: pass --pubkey with a copy kept elsewhere for proof)"
                )?;
            }
        }
        if self.first_seq > 1 {
            write!(
                formatter,
                "; starts after retention at seq {}",
                self.first_seq
            )?;
        }
        if self.last_seq > self.covered_up_to {
            write!(
                formatter,
                "; seq {}..{} not yet covered by a checkpoint",
                self.covered_up_to + 1,
                self.last_seq
            )?;
        }
        if self.torn_lines > 0 {
            write!(formatter, "; {} torn line(s) from crashes", self.torn_lines)?;
        }
        if !self.anchor_checked {
            write!(formatter, "; no checkpoint anchor to check the end against")?;
        }
        Ok(())
    }
}

fn plural(count: u64) -> &'static str {
    if count == 1 { "" } else { "s" }
}

/// The outcome: a summary, and the first problem if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub summary: Summary,
    pub problem: Option<Problem>,
}

/// Why verification could not run (the CLI exits 2).
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("{}: {io}", .path.display())]
    Read { path: PathBuf, io: io::Error },
    #[error("{}: no audit-YYYYMMDD.jsonl files and not an audit store", .path.display())]
    NothingToVerify { path: PathBuf },
    #[error("{}: opening the audit store: {reason}", .path.display())]
    Store { path: PathBuf, reason: String },
    #[error(transparent)]
    Key(#[from] KeyError),
}

/// One line of input: where it is, its bytes, and whether it ended with a newline.
#[derive(Debug)]
pub struct Line {
    pub location: String,
    pub bytes: Vec<u8>,
    pub complete: bool,
}

/// The chain checker: feed it lines in order, then [`Checker::finish`].
#[derive(Debug)]
pub struct Checker {
    keys: Vec<VerifyingKey>,
    anchor: Option<Anchor>,
    summary: Summary,
    problem: Option<Problem>,
    previous: Option<Previous>,
    stream_id: Option<String>,
    /// A seq jump seen at the last record, decided at the next one (deleted or reordered).
    pending_jump: Option<Problem>,
    /// Lines that were not records, since the last record: each must turn out to be the
    /// start of the record after it (a torn write the store rewrote after a crash).
    torn: Vec<(String, Vec<u8>)>,
    /// Records since the last checkpoint (or since the epoch's start), and how many the
    /// epoch allows.
    since_checkpoint: u64,
    checkpoint_every: u64,
    /// A start record just passed: the next record must be its checkpoint.
    start_awaiting_checkpoint: Option<u64>,
    /// The last line, if it was not a record (a torn end).
    ended_torn: bool,
    /// Figures over the records that pass, for `audit report`.
    tally: Option<super::report::Tally>,
}

#[derive(Debug, Clone)]
struct Previous {
    seq: u64,
    hash: String,
    epoch: u64,
}

/// The newest checkpoint remembered apart from the chain.
#[derive(Debug, Clone)]
pub struct Anchor {
    seq: u64,
    hash: String,
    location: String,
}

impl Checker {
    pub fn new(keys: Vec<VerifyingKey>, anchor: Option<Anchor>) -> Checker {
        Checker {
            summary: Summary {
                signatures_checked: !keys.is_empty(),
                keys: keys.iter().map(key::key_id).collect(),
                ..Summary::default()
            },
            keys,
            anchor,
            problem: None,
            previous: None,
            stream_id: None,
            pending_jump: None,
            torn: Vec::new(),
            since_checkpoint: 0,
            start_awaiting_checkpoint: None,
            checkpoint_every: super::CHECKPOINT_EVERY_RECORDS_MAX,
            ended_torn: false,
            tally: None,
        }
    }

    /// Also counts the records that pass, for [`report_path`].
    fn with_tally(mut self) -> Checker {
        self.tally = Some(super::report::Tally::default());
        self
    }

    /// Whether a problem was found (later lines are not looked at).
    pub fn failed(&self) -> bool {
        self.problem.is_some()
    }

    fn fail(&mut self, seq: u64, kind: ProblemKind, detail: String, location: &str) {
        if self.problem.is_none() {
            self.problem = Some(Problem {
                seq,
                kind,
                detail,
                location: location.to_owned(),
            });
        }
    }

    fn expected_seq(&self) -> u64 {
        self.previous
            .as_ref()
            .map_or(1, |previous| previous.seq + 1)
    }

    /// Checks one line.
    pub fn check(&mut self, line: &Line) {
        if self.failed() {
            return;
        }
        if line.bytes.iter().all(u8::is_ascii_whitespace) && line.complete {
            return;
        }
        let fields: Option<Map<String, Value>> = serde_json::from_slice(&line.bytes).ok();
        if fields.is_some() && has_duplicate_keys(&line.bytes) {
            let seq = fields
                .as_ref()
                .and_then(|fields| fields.get(record::SEQ))
                .and_then(Value::as_u64)
                .unwrap_or_else(|| self.expected_seq());
            return self.fail(
                seq,
                ProblemKind::Malformed,
                "a key appears twice in one object".into(),
                &line.location,
            );
        }
        let Some(fields) = fields else {
            self.torn.push((line.location.clone(), line.bytes.clone()));
            self.ended_torn = true;
            return;
        };
        self.ended_torn = false;
        // A torn write is a prefix of the record the store wrote again after the crash;
        // anything else between records is not a record.
        if let Some((location, _)) = self
            .torn
            .iter()
            .find(|(_, torn)| torn.is_empty() || !line.bytes.starts_with(torn))
        {
            let location = location.clone();
            let seq = self.expected_seq();
            return self.fail(
                seq,
                ProblemKind::Malformed,
                format!(
                    "the line at {location} is neither a record nor the start of the one after it"
                ),
                &location,
            );
        }
        let seq = fields.get(record::SEQ).and_then(Value::as_u64);
        let epoch = fields.get(record::EPOCH).and_then(Value::as_u64);
        let prev_hash = fields.get(record::PREV_HASH).and_then(Value::as_str);
        let hash = fields.get(record::RECORD_HASH).and_then(Value::as_str);
        let stream_id = fields.get(record::STREAM_ID).and_then(Value::as_str);
        let (Some(seq), Some(epoch), Some(prev_hash), Some(hash), Some(stream_id)) =
            (seq, epoch, prev_hash, hash, stream_id)
        else {
            let seq = seq.unwrap_or_else(|| self.expected_seq());
            self.fail(
                seq,
                ProblemKind::Malformed,
                "a chain field (Seq, Epoch, PrevHash, RecordHash, StreamId) is missing".into(),
                &line.location,
            );
            return;
        };
        let location = line.location.as_str();

        // A jump at the previous record: now we can tell a deletion from a reordering.
        if let Some(mut jump) = self.pending_jump.take() {
            if seq == jump.seq {
                jump.kind = ProblemKind::Reordered;
                jump.detail = format!("seq {seq} comes after a later record");
            }
            self.problem = Some(jump);
            return;
        }
        match chain::expected_hash(&fields) {
            Ok(expected) if expected == hash => {}
            Ok(_) => {
                return self.fail(
                    seq,
                    ProblemKind::Altered,
                    "RecordHash does not match the record".into(),
                    location,
                );
            }
            Err(error) => {
                return self.fail(seq, ProblemKind::Malformed, error.to_string(), location);
            }
        }
        let category = fields.get(record::CATEGORY).and_then(Value::as_str);
        let operation = fields.get(record::OPERATION_NAME).and_then(Value::as_str);
        let is_start =
            category == Some(Category::Lifecycle.as_str()) && operation == Some(OPERATION_START);
        match &self.stream_id {
            Some(stream) if stream != stream_id => {
                return self.fail(
                    seq,
                    ProblemKind::StreamChanged,
                    format!("StreamId {stream_id} after {stream}"),
                    location,
                );
            }
            Some(_) => {}
            None => self.stream_id = Some(stream_id.to_owned()),
        }
        match self.previous.clone() {
            None => {
                if seq == 1 && prev_hash != GENESIS_HASH {
                    return self.fail(
                        seq,
                        ProblemKind::BrokenLink,
                        "the first record's PrevHash is not 64 zeros".into(),
                        location,
                    );
                }
                if seq == 1 && !is_start {
                    return self.fail(
                        seq,
                        ProblemKind::MissingLifecycle,
                        "the stream does not open with a lifecycle start record".into(),
                        location,
                    );
                }
                self.summary.first_seq = seq;
                self.summary.epochs = 1;
            }
            Some(previous) => {
                let expected = previous.seq + 1;
                if seq == previous.seq {
                    return self.fail(
                        seq,
                        ProblemKind::Inserted,
                        format!("seq {seq} appears twice"),
                        location,
                    );
                }
                if seq < previous.seq {
                    return self.fail(
                        seq,
                        ProblemKind::Reordered,
                        format!("seq {seq} comes after seq {}", previous.seq),
                        location,
                    );
                }
                if seq > expected {
                    let torn = self.torn.first().map(|(location, _)| location.clone());
                    self.torn.clear();
                    let (kind, detail) = match torn {
                        Some(torn) => (
                            ProblemKind::Malformed,
                            format!("the record at {torn} is not a record"),
                        ),
                        None => (
                            ProblemKind::Deleted,
                            format!("seq {expected}..{} are missing", seq - 1),
                        ),
                    };
                    self.pending_jump = Some(Problem {
                        seq: expected,
                        kind,
                        detail,
                        location: location.to_owned(),
                    });
                    return;
                }
                if prev_hash != previous.hash {
                    return self.fail(
                        seq,
                        ProblemKind::BrokenLink,
                        "PrevHash is not the previous record's RecordHash".into(),
                        location,
                    );
                }
                if epoch < previous.epoch {
                    return self.fail(
                        seq,
                        ProblemKind::EpochRegression,
                        format!("epoch {epoch} after epoch {}", previous.epoch),
                        location,
                    );
                }
                if epoch == previous.epoch && is_start {
                    // Only a new epoch opens with a start record: one inside an epoch would
                    // restart the count of records between checkpoints.
                    return self.fail(
                        seq,
                        ProblemKind::Inserted,
                        format!("a second start record in epoch {epoch}"),
                        location,
                    );
                }
                if epoch > previous.epoch {
                    if !is_start {
                        return self.fail(
                            seq,
                            ProblemKind::MissingLifecycle,
                            format!("epoch {epoch} does not open with a lifecycle start record"),
                            location,
                        );
                    }
                    self.summary.epochs += 1;
                }
            }
        }
        self.summary.torn_lines += self.torn.len() as u64;
        self.torn.clear();
        // The writer seals each start record with its checkpoint in one commit.
        if let Some(start) = self.start_awaiting_checkpoint.take()
            && category != Some(Category::Checkpoint.as_str())
        {
            return self.fail(
                seq,
                ProblemKind::MissingCheckpoint,
                format!("the start record (seq {start}) is not followed by its checkpoint"),
                location,
            );
        }
        if category == Some(Category::Checkpoint.as_str()) {
            self.check_checkpoint(seq, &fields, stream_id, location);
            if self.failed() {
                return;
            }
            self.since_checkpoint = 0;
        } else {
            if is_start {
                // A new epoch counts afresh, under the limit its start record names.
                self.since_checkpoint = 0;
                self.start_awaiting_checkpoint = Some(seq);
                self.checkpoint_every = fields
                    .get(record::PROPERTIES)
                    .and_then(|properties| properties.get(super::CHECKPOINT_EVERY_RECORDS_PROPERTY))
                    .and_then(Value::as_u64)
                    .map_or(super::CHECKPOINT_EVERY_RECORDS_MAX, |every| {
                        every.clamp(1, super::CHECKPOINT_EVERY_RECORDS_MAX)
                    });
            }
            self.since_checkpoint += 1;
            if self.since_checkpoint > self.checkpoint_every + CHECKPOINT_SLACK_RECORDS {
                let every = self.checkpoint_every;
                return self.fail(
                    seq,
                    ProblemKind::MissingCheckpoint,
                    format!(
                        "{} records without a checkpoint, where the epoch writes one every {every}",
                        self.since_checkpoint
                    ),
                    location,
                );
            }
        }
        if let Some(anchor) = &self.anchor
            && anchor.seq == seq
            && anchor.hash != hash
        {
            let detail = format!("differs from the checkpoint anchor at {}", anchor.location);
            return self.fail(seq, ProblemKind::Altered, detail, location);
        }
        if let Some(tally) = &mut self.tally {
            tally.add(&fields);
        }
        self.summary.records += 1;
        self.summary.last_seq = seq;
        self.previous = Some(Previous {
            seq,
            hash: hash.to_owned(),
            epoch,
        });
    }

    fn check_checkpoint(
        &mut self,
        seq: u64,
        fields: &Map<String, Value>,
        stream_id: &str,
        location: &str,
    ) {
        let properties = fields.get(record::PROPERTIES).and_then(Value::as_object);
        let get = |name: &str| properties.and_then(|properties| properties.get(name));
        let covered_seq = get(chain::CHECKPOINT_SEQ).and_then(Value::as_u64);
        let covered_epoch = get(chain::CHECKPOINT_EPOCH).and_then(Value::as_u64);
        let covered_hash = get(chain::CHECKPOINT_HASH).and_then(Value::as_str);
        let signature = get(chain::CHECKPOINT_SIGNATURE).and_then(Value::as_str);
        let (Some(covered_seq), Some(covered_epoch), Some(covered_hash), Some(signature)) =
            (covered_seq, covered_epoch, covered_hash, signature)
        else {
            return self.fail(
                seq,
                ProblemKind::Malformed,
                "a checkpoint field is missing".into(),
                location,
            );
        };
        if let Some(previous) = &self.previous
            && (covered_seq != previous.seq
                || covered_hash != previous.hash
                || covered_epoch != previous.epoch)
        {
            return self.fail(
                seq,
                ProblemKind::CheckpointMismatch,
                format!("the checkpoint covers seq {covered_seq}, not the record before it"),
                location,
            );
        }
        if !self.keys.is_empty() {
            // The key the checkpoint names, else (a record from before keys were named) each.
            let named = get(chain::CHECKPOINT_KEY_ID).and_then(Value::as_str);
            let candidates: Vec<&VerifyingKey> = self
                .keys
                .iter()
                .filter(|key| named.is_none_or(|named| key::key_id(key) == named))
                .collect();
            let message =
                chain::checkpoint_message(stream_id, covered_epoch, covered_seq, covered_hash);
            if !candidates
                .iter()
                .any(|key| key::verify_signature(key, message.as_bytes(), signature))
            {
                let detail = match (named, candidates.is_empty()) {
                    (Some(named), true) => format!(
                        "the checkpoint over seq {covered_seq} is signed by key {named}, not one of \
                         the keys given ({})",
                        self.summary.keys.join(", ")
                    ),
                    _ => format!(
                        "the signature over seq {covered_seq} is not valid under key {}",
                        self.summary.keys.join(", ")
                    ),
                };
                return self.fail(seq, ProblemKind::BadSignature, detail, location);
            }
        }
        self.summary.checkpoints += 1;
        self.summary.covered_up_to = covered_seq;
    }

    /// Ends the input: a torn last line or an anchor beyond the chain means truncation.
    pub fn finish(mut self) -> Report {
        if let Some(jump) = self.pending_jump.take()
            && self.problem.is_none()
        {
            self.problem = Some(jump);
        }
        let last = self.summary.last_seq;
        if self.ended_torn {
            let location = self
                .torn
                .last()
                .map(|(location, _)| location.clone())
                .unwrap_or_default();
            self.fail(
                last + 1,
                ProblemKind::Truncated,
                "the last line is cut off".into(),
                &location,
            );
        }
        if let Some(anchor) = self.anchor.clone() {
            self.summary.anchor_checked = true;
            if anchor.seq > last && self.problem.is_none() {
                self.fail(
                    last + 1,
                    ProblemKind::Truncated,
                    format!(
                        "the chain ends at seq {last}, before the checkpoint at seq {} ({})",
                        anchor.seq, anchor.location
                    ),
                    &anchor.location,
                );
            }
        }
        if self.summary.records == 0 && self.problem.is_none() {
            self.summary.first_seq = 0;
        }
        Report {
            summary: self.summary,
            problem: self.problem,
        }
    }
}

/// Checks a checkpoint record kept apart from the chain and makes it an anchor. Its signature
/// is checked where it sits in the chain: the chain's record at its `Seq` must be this one.
fn anchor_from(line: &[u8], location: String) -> Result<Anchor, Problem> {
    let bad = |kind: ProblemKind, seq: u64, detail: &str| Problem {
        seq,
        kind,
        detail: format!("checkpoint anchor: {detail}"),
        location: location.clone(),
    };
    let fields: Map<String, Value> =
        serde_json::from_slice(line).map_err(|_| bad(ProblemKind::Malformed, 0, "not a record"))?;
    let seq = fields
        .get(record::SEQ)
        .and_then(Value::as_u64)
        .ok_or_else(|| bad(ProblemKind::Malformed, 0, "no Seq"))?;
    let hash = fields
        .get(record::RECORD_HASH)
        .and_then(Value::as_str)
        .ok_or_else(|| bad(ProblemKind::Malformed, seq, "no RecordHash"))?;
    if chain::expected_hash(&fields).ok().as_deref() != Some(hash) {
        return Err(bad(ProblemKind::Altered, seq, "RecordHash does not match"));
    }
    Ok(Anchor {
        seq,
        hash: hash.to_owned(),
        location,
    })
}

/// What PATH turned out to be.
enum Source {
    Files {
        files: Vec<PathBuf>,
        anchor: Option<PathBuf>,
    },
    Store(PathBuf),
}

fn looks_like_store(path: &Path) -> bool {
    path.join("conf").is_file() && path.join("db").is_file()
}

fn classify(path: &Path) -> Result<Source, VerifyError> {
    let metadata = std::fs::metadata(path).map_err(|io| VerifyError::Read {
        path: path.to_owned(),
        io,
    })?;
    if metadata.is_file() {
        // The directory's anchor applies when this is its newest file.
        let directory = path.parent().unwrap_or(Path::new("."));
        let newest = files::list(directory)
            .ok()
            .and_then(|mut list| list.pop())
            .map(|(_, newest)| newest);
        let anchor = match newest {
            Some(newest) if same_file(&newest, path) => Some(directory.join(CHECKPOINT_HEAD_FILE)),
            _ => None,
        };
        return Ok(Source::Files {
            files: vec![path.to_owned()],
            anchor: anchor.filter(|anchor| anchor.is_file()),
        });
    }
    if looks_like_store(path) {
        return Ok(Source::Store(path.to_owned()));
    }
    let list = files::list(path).map_err(|io| VerifyError::Read {
        path: path.to_owned(),
        io,
    })?;
    if list.is_empty() {
        return Err(VerifyError::NothingToVerify {
            path: path.to_owned(),
        });
    }
    let anchor = path.join(CHECKPOINT_HEAD_FILE);
    Ok(Source::Files {
        files: list.into_iter().map(|(_, file)| file).collect(),
        anchor: anchor.is_file().then_some(anchor),
    })
}

fn same_file(left: &Path, right: &Path) -> bool {
    match (left.canonicalize(), right.canonicalize()) {
        (Ok(left), Ok(right)) => left == right,
        _ => false,
    }
}

/// Where the public key is looked for when none is given: beside PATH and one level up.
fn find_public_key(path: &Path) -> Option<PathBuf> {
    let directory = if path.is_dir() {
        path.to_owned()
    } else {
        path.parent()?.to_owned()
    };
    [Some(directory.as_path()), directory.parent()]
        .into_iter()
        .flatten()
        .map(|directory| directory.join(PUBLIC_KEY_FILE))
        .find(|candidate| candidate.is_file())
}

/// Verifies PATH (a JSONL file, a directory of them, or the store) with the public keys
/// given, or else the one found beside it.
pub fn verify_path(path: &Path, public_keys: &[PathBuf]) -> Result<Report, VerifyError> {
    inspect(path, public_keys, false).map(|(report, _)| report)
}

/// Verifies like [`verify_path`] and counts what the records that pass show.
pub fn report_path(
    path: &Path,
    public_keys: &[PathBuf],
) -> Result<(Report, super::report::Tally), VerifyError> {
    inspect(path, public_keys, true)
        .map(|(report, tally)| (report, tally.unwrap_or_default().finish()))
}

fn inspect(
    path: &Path,
    public_keys: &[PathBuf],
    tally: bool,
) -> Result<(Report, Option<super::report::Tally>), VerifyError> {
    let (key_paths, beside) = if public_keys.is_empty() {
        (find_public_key(path).into_iter().collect::<Vec<_>>(), true)
    } else {
        (public_keys.to_vec(), false)
    };
    let keys = key_paths
        .iter()
        .map(|path| key::read_public_key(path))
        .collect::<Result<Vec<_>, _>>()?;
    let beside = beside && !keys.is_empty();
    let outcome = match classify(path)? {
        Source::Files { files, anchor } => {
            let anchor = match anchor {
                Some(anchor_path) => {
                    let line = std::fs::read(&anchor_path).map_err(|io| VerifyError::Read {
                        path: anchor_path.clone(),
                        io,
                    })?;
                    let location = anchor_path.display().to_string();
                    Some(anchor_from(line.trim_ascii_end(), location))
                }
                None => None,
            };
            verify_files(&files, keys, anchor, tally)
        }
        Source::Store(directory) => verify_store(&directory, keys, tally),
    };
    outcome.map(|(mut report, tally)| {
        report.summary.key_beside_records = beside;
        (report, tally)
    })
}

fn verify_files(
    files: &[PathBuf],
    keys: Vec<VerifyingKey>,
    anchor: Option<Result<Anchor, Problem>>,
    tally: bool,
) -> Result<(Report, Option<super::report::Tally>), VerifyError> {
    let (anchor, anchor_problem) = match anchor {
        Some(Ok(anchor)) => (Some(anchor), None),
        Some(Err(problem)) => (None, Some(problem)),
        None => (None, None),
    };
    let mut checker = Checker::new(keys, anchor);
    if tally {
        checker = checker.with_tally();
    }
    if let Some(problem) = anchor_problem {
        checker.problem = Some(problem);
    }
    for path in files {
        let read_error = |io| VerifyError::Read {
            path: path.clone(),
            io,
        };
        let mut reader = BufReader::new(File::open(path).map_err(read_error)?);
        let name = path.file_name().map_or_else(
            || path.display().to_string(),
            |name| name.to_string_lossy().into_owned(),
        );
        let mut number = 0_u64;
        loop {
            if checker.failed() {
                break;
            }
            let mut bytes = Vec::new();
            let read = (&mut reader)
                .take(LINE_BYTES_MAX)
                .read_until(b'\n', &mut bytes)
                .map_err(|io| VerifyError::Read {
                    path: path.clone(),
                    io,
                })?;
            if read == 0 {
                break;
            }
            number += 1;
            let complete = bytes.last() == Some(&b'\n');
            if complete {
                bytes.pop();
            } else if u64::try_from(bytes.len()).is_ok_and(|length| length >= LINE_BYTES_MAX) {
                // Too long to be a record: skip the rest of it.
                let mut rest = Vec::new();
                reader
                    .read_until(b'\n', &mut rest)
                    .map_err(|io| VerifyError::Read {
                        path: path.clone(),
                        io,
                    })?;
            }
            checker.check(&Line {
                location: format!("{name}:{number}"),
                bytes,
                complete,
            });
        }
    }
    let counted = checker.tally.take();
    Ok((checker.finish(), counted))
}

fn verify_store(
    directory: &Path,
    keys: Vec<VerifyingKey>,
    tally: bool,
) -> Result<(Report, Option<super::report::Tally>), VerifyError> {
    let store_error = |reason: String| VerifyError::Store {
        path: directory.to_owned(),
        reason,
    };
    let db = sled::Config::new()
        .path(directory)
        .open()
        .map_err(|error| store_error(error.to_string()))?;
    let records = db
        .open_tree("records")
        .map_err(|error| store_error(error.to_string()))?;
    let meta = db
        .open_tree("meta")
        .map_err(|error| store_error(error.to_string()))?;
    let anchor = meta
        .get(META_LAST_CHECKPOINT)
        .map_err(|error| store_error(error.to_string()))?
        .map(|line| anchor_from(&line, format!("store {META_LAST_CHECKPOINT}")));
    let (anchor, anchor_problem) = match anchor {
        Some(Ok(anchor)) => (Some(anchor), None),
        Some(Err(problem)) => (None, Some(problem)),
        None => (None, None),
    };
    let mut checker = Checker::new(keys, anchor);
    if tally {
        checker = checker.with_tally();
    }
    if let Some(problem) = anchor_problem {
        checker.problem = Some(problem);
    }
    for entry in records.iter() {
        if checker.failed() {
            break;
        }
        let (key, line) = entry.map_err(|error| store_error(error.to_string()))?;
        let seq = <[u8; 8]>::try_from(key.as_ref()).map_or(0, u64::from_be_bytes);
        checker.check(&Line {
            location: format!("store key {seq}"),
            bytes: line.to_vec(),
            complete: true,
        });
    }
    let counted = checker.tally.take();
    Ok((checker.finish(), counted))
}

/// The CLI: prints the summary (exit 0) or the first problem (exit 1); exit 2 when PATH or the
/// key cannot be read.
pub fn run(path: &Path, public_keys: &[PathBuf]) -> ExitCode {
    match verify_path(path, public_keys) {
        Ok(Report {
            summary,
            problem: None,
        }) => {
            println!("{}: ok: {summary}", path.display());
            ExitCode::SUCCESS
        }
        Ok(Report {
            summary,
            problem: Some(problem),
        }) => {
            println!("{}: FAILED: {problem}", path.display());
            println!(
                "  checked before it: {} records, {} checkpoints",
                summary.records, summary.checkpoints
            );
            ExitCode::from(1)
        }
        Err(error) => {
            eprintln!("isthmus audit verify: {error}");
            ExitCode::from(2)
        }
    }
}
