//! The hash chain: what links each record to the one before it, and the signed checkpoints.
//!
//! `RecordHash = hex(SHA-256(0x00 ‖ JCS(record without RecordHash)))`. `PrevHash` is the previous
//! record's `RecordHash` (64 zeros before the first record ever); `Seq` grows by one per record
//! across the whole stream and `Epoch` counts starts. A checkpoint signs
//! `StreamId|Epoch|Seq|RecordHash` of the record before it with the device key. Pure functions:
//! the writer (`store.rs`) and the verifier (`verify.rs`) share them.

use serde_json::{Map, Value};
use sha2::{Digest as _, Sha256};

use super::jcs::{self, CanonicalError};
use super::record::{EPOCH, PREV_HASH, RECORD_HASH, SEQ, STREAM_ID};

/// `PrevHash` of the first record of a stream.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";
/// Domain separation: the byte hashed before a record's canonical form.
const RECORD_HASH_PREFIX: u8 = 0x00;

/// `Properties` members of a checkpoint record.
pub const CHECKPOINT_SEQ: &str = "CheckpointSeq";
pub const CHECKPOINT_EPOCH: &str = "CheckpointEpoch";
pub const CHECKPOINT_HASH: &str = "CheckpointHash";
pub const CHECKPOINT_SIGNATURE: &str = "Signature";
pub const CHECKPOINT_ALGORITHM: &str = "Algorithm";
pub const CHECKPOINT_KEY_ID: &str = "KeyId";
/// The only signature algorithm.
pub const ED25519: &str = "Ed25519";

/// Where the chain stands: the last record written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainHead {
    pub stream_id: String,
    /// The epoch records are written in now.
    pub epoch: u64,
    /// `Seq` of the last record (0 before the first).
    pub seq: u64,
    /// `RecordHash` of the last record ([`GENESIS_HASH`] before the first).
    pub hash: String,
}

/// A record with its chain fields: what is stored and written to files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sealed {
    pub seq: u64,
    pub hash: String,
    /// The record as one JSON object (its canonical form with `RecordHash` added), no newline.
    pub line: Vec<u8>,
}

/// Adds the chain fields to `fields`, hashes the record and moves `head` past it.
pub fn seal(
    head: &mut ChainHead,
    mut fields: Map<String, Value>,
) -> Result<Sealed, CanonicalError> {
    let seq = head.seq + 1;
    fields.remove(RECORD_HASH);
    fields.insert(STREAM_ID.into(), Value::String(head.stream_id.clone()));
    fields.insert(EPOCH.into(), head.epoch.into());
    fields.insert(SEQ.into(), seq.into());
    fields.insert(PREV_HASH.into(), Value::String(head.hash.clone()));
    let mut line = jcs::canonicalize(&Value::Object(fields))?;
    let hash = record_hash(&line);
    // The canonical form of an object with members ends in `}`: add RecordHash before it.
    line.pop();
    line.extend_from_slice(b",\"RecordHash\":\"");
    line.extend_from_slice(hash.as_bytes());
    line.extend_from_slice(b"\"}");
    head.seq = seq;
    head.hash.clone_from(&hash);
    Ok(Sealed { seq, hash, line })
}

/// `hex(SHA-256(0x00 ‖ canonical))`.
pub fn record_hash(canonical: &[u8]) -> String {
    let mut hasher = Sha256::new();
    hasher.update([RECORD_HASH_PREFIX]);
    hasher.update(canonical);
    hex::encode(hasher.finalize())
}

/// The hash a stored record should carry: its canonical form without `RecordHash`, hashed.
pub fn expected_hash(record: &Map<String, Value>) -> Result<String, CanonicalError> {
    let mut output = Vec::with_capacity(1024);
    let without: Map<String, Value> = record
        .iter()
        .filter(|(name, _)| name.as_str() != RECORD_HASH)
        .map(|(name, value)| (name.clone(), value.clone()))
        .collect();
    jcs::write_value(&mut output, &Value::Object(without))?;
    Ok(record_hash(&output))
}

/// The bytes a checkpoint signs: `StreamId|Epoch|Seq|RecordHash` of the covered record.
pub fn checkpoint_message(stream_id: &str, epoch: u64, seq: u64, hash: &str) -> String {
    format!("{stream_id}|{epoch}|{seq}|{hash}")
}
