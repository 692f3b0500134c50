//! Stored responses of the Responses API (`[responses] store = true`): the Response object a
//! caller received and the input items its model read, kept in the embedded store under the
//! state directory (`responses-store`) for `previous_response_id`, `GET /v1/responses/{id}`,
//! its input items and `DELETE`.
//!
//! A response belongs to the caller that made it (its API key id, or `anonymous`); any other
//! caller is told it does not exist. Responses expire after the retention period, and the
//! oldest go first when the store holds more than its byte bound. What is kept is what the
//! client got — with redact-then-cloud, the restored values — so the store holds prompt and
//! completion text at rest: it is off unless configured, and every continuation is scanned
//! and routed again as a whole.
//!
//! Writes reach the disk with the store's periodic flush (`FLUSH_EVERY_MS`), not before the
//! answer's last bytes: a crash can forget the responses of the last moments, whose clients
//! then get "not found" when they continue and can send the whole conversation instead.
//!
//! With `responses.encryption_key_file` (or `_env`) every record is sealed (AES-256-GCM, a
//! random nonce, the id as associated data: `0xE1`, the key's id, the nonce, ciphertext and
//! tag); records an earlier run kept as JSON are sealed when the store opens, and a store
//! holding records sealed with another key (or none given) refuses to open.

use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sled::Transactional as _;

use crate::config::ResponsesConfig;

/// The store's directory under the state directory.
pub const STORE_DIR: &str = "responses-store";
/// How often sled writes accepted responses to disk.
const FLUSH_EVERY_MS: u64 = 200;
/// sled's page cache: responses are read back rarely (a continuation, a GET).
const CACHE_BYTES: u64 = 4 << 20;
const RECORDS_TREE: &str = "responses";
/// `created_unix_ms` (big-endian) ‖ id → the record's size: oldest first.
const AGES_TREE: &str = "by_age";

/// A kept response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredResponse {
    /// Who may read, continue or delete it (`Caller` label: API key id or `anonymous`).
    pub owner: String,
    pub created_unix_ms: u64,
    /// The request that made it (the audit record's `RequestId`).
    pub request_id: String,
    /// What the model read before it answered, instructions aside: the conversation it
    /// continued, then its own input, as Responses input items, each with an `id`.
    pub input_items: Vec<Value>,
    /// The Response object as the client received it.
    pub response: Value,
}

impl StoredResponse {
    /// A record for `response`; input items without an `id` get one (`msg_…`, `fc_…`,
    /// `fco_…` after their type, then the response id and their position).
    pub fn new(
        owner: &str,
        request_id: &str,
        mut input_items: Vec<Value>,
        response: Value,
    ) -> StoredResponse {
        let response_id = response
            .get("id")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let suffix = response_id.strip_prefix("resp_").unwrap_or(response_id);
        for (index, item) in input_items.iter_mut().enumerate() {
            let Some(object) = item.as_object_mut() else {
                continue;
            };
            if object.get("id").and_then(Value::as_str).is_some() {
                continue;
            }
            let prefix = match object.get("type").and_then(Value::as_str) {
                Some("function_call") => "fc",
                Some("function_call_output") => "fco",
                Some("reasoning") => "rs",
                _ => "msg",
            };
            object.insert(
                "id".into(),
                Value::String(format!("{prefix}_{suffix}_in{index}")),
            );
        }
        StoredResponse {
            owner: owner.to_owned(),
            created_unix_ms: unix_ms(SystemTime::now()),
            request_id: request_id.to_owned(),
            input_items,
            response,
        }
    }

    /// The Response object's `output` items.
    pub fn output(&self) -> &[Value] {
        self.response
            .get("output")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the response store: {0}")]
    Storage(#[from] sled::Error),
    #[error("the response store: {0}")]
    Transaction(String),
    #[error("the response is {bytes} bytes, over responses.record_bytes_max ({limit})")]
    TooLarge { bytes: u64, limit: u64 },
    /// The store holds responses sealed with a key this configuration does not give.
    #[error(
        "the response store holds {count} responses sealed with key {key_id}, and {given}: \
         set responses.encryption_key_file (or _env) to that key, or remove the store to \
         start empty"
    )]
    KeyMismatch {
        count: usize,
        key_id: String,
        given: String,
    },
    #[error("the sealed record of {id} does not open with key {key_id} (altered or corrupt)")]
    Unsealable { id: String, key_id: String },
    /// A record in the clear where every record is sealed (the store was converted when it
    /// opened with a key): planted, not written by the gateway.
    #[error("the record of {id} is not sealed, though the store's records all are: refused")]
    NotSealed { id: String },
}

/// Responses deleted by an expiry while it holds the store's lock.
const EXPIRE_BATCH_RECORDS: usize = 64;

/// The first byte of a sealed record; a JSON record starts with `{`.
const SEALED: u8 = 0xE1;
/// What a sealed record holds before its ciphertext: the marker, the key id (4 bytes) and
/// the nonce.
const SEALED_HEADER_BYTES: usize = 1 + 4 + ring::aead::NONCE_LEN;

/// The key records are sealed with (AES-256-GCM, a random nonce per record, the record's id
/// as associated data: a sealed record moved under another id does not open).
struct Sealer {
    key: ring::aead::LessSafeKey,
    id: [u8; 4],
    id_hex: String,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealer")
            .field("key_id", &self.id_hex)
            .finish_non_exhaustive()
    }
}

impl Sealer {
    fn new(key: &crate::config::StoreKey) -> Sealer {
        let unbound = ring::aead::UnboundKey::new(&ring::aead::AES_256_GCM, key.bytes())
            .unwrap_or_else(|_| unreachable!("AES-256-GCM takes any 32-byte key"));
        let mut id = [0_u8; 4];
        hex::decode_to_slice(key.id(), &mut id).unwrap_or_default();
        Sealer {
            key: ring::aead::LessSafeKey::new(unbound),
            id,
            id_hex: key.id().to_owned(),
        }
    }

    fn seal(&self, id: &str, plain: &[u8]) -> Result<Vec<u8>, StoreError> {
        let mut nonce = [0_u8; ring::aead::NONCE_LEN];
        getrandom::fill(&mut nonce).map_err(|error| {
            StoreError::Transaction(format!("no randomness for a nonce: {error}"))
        })?;
        let mut sealed = Vec::with_capacity(SEALED_HEADER_BYTES + plain.len() + 16);
        sealed.push(SEALED);
        sealed.extend_from_slice(&self.id);
        sealed.extend_from_slice(&nonce);
        let mut body = plain.to_vec();
        self.key
            .seal_in_place_append_tag(
                ring::aead::Nonce::assume_unique_for_key(nonce),
                ring::aead::Aad::from(id.as_bytes()),
                &mut body,
            )
            .map_err(|_| StoreError::Transaction("sealing the record failed".to_owned()))?;
        sealed.extend_from_slice(&body);
        Ok(sealed)
    }

    fn open(&self, id: &str, sealed: &[u8]) -> Result<Vec<u8>, StoreError> {
        let unsealable = || StoreError::Unsealable {
            id: id.to_owned(),
            key_id: self.id_hex.clone(),
        };
        if sealed.len() < SEALED_HEADER_BYTES || sealed[1..5] != self.id {
            return Err(unsealable());
        }
        let nonce = ring::aead::Nonce::try_assume_unique_for_key(&sealed[5..SEALED_HEADER_BYTES])
            .map_err(|_| unsealable())?;
        let mut body = sealed[SEALED_HEADER_BYTES..].to_vec();
        let plain = self
            .key
            .open_in_place(nonce, ring::aead::Aad::from(id.as_bytes()), &mut body)
            .map_err(|_| unsealable())?;
        Ok(plain.to_vec())
    }
}

/// The key id of a sealed record, in hex.
fn sealed_key_id(value: &[u8]) -> Option<String> {
    (value.first() == Some(&SEALED) && value.len() >= 5).then(|| hex::encode(&value[1..5]))
}

/// The store.
#[derive(Debug)]
pub struct ResponseStore {
    db: sled::Db,
    records: sled::Tree,
    ages: sled::Tree,
    retention: Duration,
    bytes_max: u64,
    record_bytes_max: u64,
    /// Seals records at rest, when a key is configured.
    sealer: Option<Sealer>,
    /// The records held, counted as they come and go (sled counts a tree by scanning it);
    /// writers take it to insert and evict in turn.
    held: Mutex<Held>,
}

#[derive(Debug, Default)]
struct Held {
    count: usize,
    bytes: u64,
}

impl Held {
    fn remove(&mut self, bytes: u64) {
        self.count = self.count.saturating_sub(1);
        self.bytes = self.bytes.saturating_sub(bytes);
    }
}

/// Beside a store: its sealed copy while one is written, and the store it replaces while
/// they are swapped.
const SEALING: &str = "sealing";
const REPLACED: &str = "replaced";

/// `directory` with `.suffix` added to its name, in the same parent.
fn sibling(directory: &Path, suffix: &str) -> std::path::PathBuf {
    let mut name = directory.file_name().unwrap_or_default().to_os_string();
    name.push(".");
    name.push(suffix);
    directory.with_file_name(name)
}

fn open_trees(directory: &Path) -> Result<(sled::Db, sled::Tree, sled::Tree), StoreError> {
    let db = sled::Config::new()
        .path(directory)
        .cache_capacity(CACHE_BYTES)
        .flush_every_ms(Some(FLUSH_EVERY_MS))
        .open()?;
    let records = db.open_tree(RECORDS_TREE)?;
    let ages = db.open_tree(AGES_TREE)?;
    Ok((db, records, ages))
}

/// Writes every record of `records`, sealed, and every entry of `ages` into a new store at
/// `target`, flushed to disk.
fn write_sealed_copy(
    records: &sled::Tree,
    ages: &sled::Tree,
    target: &Path,
    sealer: &Sealer,
) -> Result<(), StoreError> {
    if target.exists() {
        std::fs::remove_dir_all(target).map_err(sled::Error::from)?;
    }
    let (copy, copy_records, copy_ages) = open_trees(target)?;
    for entry in records.iter() {
        let (id, value) = entry?;
        if value.first() == Some(&SEALED) {
            copy_records.insert(id, value)?;
        } else {
            let sealed = sealer.seal(&String::from_utf8_lossy(&id), &value)?;
            copy_records.insert(id, sealed)?;
        }
    }
    for entry in ages.iter() {
        let (age, size) = entry?;
        copy_ages.insert(age, size)?;
    }
    copy.flush()?;
    Ok(())
}

/// Puts the sealed copy in the store's place and deletes the store it replaces. Each step
/// is a rename or a removal that [`finish_interrupted_sealing`] completes or undoes.
fn replace_with_sealed_copy(directory: &Path) -> Result<(), StoreError> {
    let replaced = sibling(directory, REPLACED);
    std::fs::rename(directory, &replaced).map_err(sled::Error::from)?;
    std::fs::rename(sibling(directory, SEALING), directory).map_err(sled::Error::from)?;
    std::fs::remove_dir_all(&replaced).map_err(sled::Error::from)?;
    if let Some(parent) = directory.parent() {
        std::fs::File::open(parent)
            .and_then(|parent| parent.sync_all())
            .map_err(sled::Error::from)?;
    }
    Ok(())
}

/// After a stop during [`replace_with_sealed_copy`]: a store that was swapped loses the copy
/// it replaced; one that was not gets its place back and is sealed again; a copy left
/// half-written is removed.
fn finish_interrupted_sealing(directory: &Path) -> Result<(), StoreError> {
    let replaced = sibling(directory, REPLACED);
    if replaced.exists() {
        if directory.exists() {
            std::fs::remove_dir_all(&replaced).map_err(sled::Error::from)?;
        } else {
            std::fs::rename(&replaced, directory).map_err(sled::Error::from)?;
        }
    }
    let sealing = sibling(directory, SEALING);
    if sealing.exists() {
        std::fs::remove_dir_all(&sealing).map_err(sled::Error::from)?;
    }
    Ok(())
}

impl ResponseStore {
    /// Opens (or creates) the store in `directory`.
    pub fn open(directory: &Path, config: &ResponsesConfig) -> Result<ResponseStore, StoreError> {
        finish_interrupted_sealing(directory)?;
        let (mut db, mut records, mut ages) = open_trees(directory)?;
        let sealer = config.encryption_key.as_ref().map(Sealer::new);
        // Records sealed with a key not given here cannot be read: say so now, not as a
        // failure of every later read.
        let mut foreign: Option<(String, usize)> = None;
        for entry in records.iter() {
            let (_, value) = entry?;
            if let Some(key_id) = sealed_key_id(&value)
                && sealer.as_ref().is_none_or(|sealer| sealer.id_hex != key_id)
            {
                foreign.get_or_insert((key_id, 0)).1 += 1;
            }
        }
        if let Some((key_id, count)) = foreign {
            return Err(StoreError::KeyMismatch {
                count,
                key_id,
                given: sealer.as_ref().map_or_else(
                    || "no key is set".to_owned(),
                    |sealer| format!("the key given is {}", sealer.id_hex),
                ),
            });
        }
        // Turning a key on: the records an earlier run kept as JSON are sealed into a new
        // store that replaces this one whole. Sealing them in place would leave their clear
        // text in the superseded pages of sled's log until it compacts.
        if let Some(sealer) = &sealer
            && records
                .iter()
                .values()
                .any(|value| value.is_ok_and(|value| value.first() != Some(&SEALED)))
        {
            write_sealed_copy(&records, &ages, &sibling(directory, SEALING), sealer)?;
            drop((records, ages, db));
            replace_with_sealed_copy(directory)?;
            (db, records, ages) = open_trees(directory)?;
        }
        let mut held = Held::default();
        for entry in ages.iter() {
            let (_, size) = entry?;
            held.count += 1;
            held.bytes += read_size(&size);
        }
        let store = ResponseStore {
            db,
            records,
            ages,
            retention: config.retention,
            bytes_max: config.bytes_max,
            record_bytes_max: config.record_bytes_max,
            sealer,
            held: Mutex::new(held),
        };
        // A lower bound than the last run's applies at once.
        store.evict_over_bound()?;
        Ok(store)
    }

    /// How many responses and bytes the store holds.
    pub fn usage(&self) -> (usize, u64) {
        let held = self.lock_held();
        (held.count, held.bytes)
    }

    /// Keeps `record` under `id`, then drops the oldest responses while the store is over
    /// its bound. An id already taken is replaced only by its owner.
    pub fn put(&self, id: &str, record: &StoredResponse) -> Result<(), StoreError> {
        let value = serde_json::to_vec(record).map_err(|error| {
            StoreError::Transaction(format!("cannot write the record: {error}"))
        })?;
        let bytes = value.len() as u64;
        if bytes > self.record_bytes_max {
            return Err(StoreError::TooLarge {
                bytes,
                limit: self.record_bytes_max,
            });
        }
        let mut held = self.lock_held();
        let previous = self.record(id)?;
        if let Some(previous) = &previous
            && previous.1.owner != record.owner
        {
            return Err(StoreError::Transaction(format!(
                "the id {id} is taken by another caller's response"
            )));
        }
        let value = match &self.sealer {
            Some(sealer) => sealer.seal(id, &value)?,
            None => value,
        };
        let age = age_key(record.created_unix_ms, id);
        let old_age = previous
            .as_ref()
            .map(|(_, old)| age_key(old.created_unix_ms, id));
        (&self.records, &self.ages)
            .transaction(|(records, ages)| {
                if let Some(old_age) = &old_age {
                    ages.remove(old_age.as_slice())?;
                }
                records.insert(id.as_bytes(), value.as_slice())?;
                ages.insert(age.as_slice(), bytes.to_be_bytes().to_vec())?;
                Ok::<_, sled::transaction::ConflictableTransactionError<()>>(())
            })
            .map_err(|error| StoreError::Transaction(format!("{error:?}")))?;
        match previous {
            Some((size, _)) => held.bytes = held.bytes.saturating_sub(size) + bytes,
            None => {
                held.count += 1;
                held.bytes += bytes;
            }
        }
        drop(held);
        self.evict_over_bound()
    }

    /// The response `id` when `owner` made it and it has not expired.
    pub fn get(&self, id: &str, owner: &str) -> Result<Option<StoredResponse>, StoreError> {
        let cutoff = self.cutoff_ms(SystemTime::now());
        Ok(self
            .record(id)?
            .map(|(_, record)| record)
            .filter(|record| record.owner == owner && record.created_unix_ms >= cutoff))
    }

    /// Deletes the response `id` when `owner` made it; says whether there was one.
    pub fn delete(&self, id: &str, owner: &str) -> Result<bool, StoreError> {
        let mut held = self.lock_held();
        let Some(record) = self.get(id, owner)? else {
            return Ok(false);
        };
        let size = self.remove(id, record.created_unix_ms)?;
        held.remove(size);
        Ok(true)
    }

    /// Deletes the responses older than the retention period; returns how many. The store's
    /// lock is let go every [`EXPIRE_BATCH_RECORDS`] deletions, so that storing new responses
    /// (on the serving threads) does not wait for a long expiry (the first after downtime).
    pub fn expire(&self, now: SystemTime) -> Result<usize, StoreError> {
        let cutoff = self.cutoff_ms(now);
        let mut removed = 0;
        loop {
            let mut held = self.lock_held();
            for _ in 0..EXPIRE_BATCH_RECORDS {
                let Some((key, size)) = self.ages.first()? else {
                    return Ok(removed);
                };
                let (created, id) = split_age_key(&key);
                if created >= cutoff {
                    return Ok(removed);
                }
                self.remove(&id, created)?;
                held.remove(read_size(&size));
                removed += 1;
            }
        }
    }

    /// Writes what was accepted to disk now (at shutdown).
    pub fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }

    fn evict_over_bound(&self) -> Result<(), StoreError> {
        let mut held = self.lock_held();
        while held.bytes > self.bytes_max {
            let Some((key, size)) = self.ages.first()? else {
                break;
            };
            let (created, id) = split_age_key(&key);
            self.remove(&id, created)?;
            held.remove(read_size(&size));
        }
        Ok(())
    }

    /// Removes a record and its age entry; returns the record's size.
    fn remove(&self, id: &str, created_unix_ms: u64) -> Result<u64, StoreError> {
        let age = age_key(created_unix_ms, id);
        let removed = (&self.records, &self.ages)
            .transaction(|(records, ages)| {
                records.remove(id.as_bytes())?;
                let size = ages.remove(age.as_slice())?;
                Ok::<_, sled::transaction::ConflictableTransactionError<()>>(
                    size.map_or(0, |size| read_size(&size)),
                )
            })
            .map_err(|error| StoreError::Transaction(format!("{error:?}")))?;
        Ok(removed)
    }

    /// The record under `id` and its size, whoever owns it.
    fn record(&self, id: &str) -> Result<Option<(u64, StoredResponse)>, StoreError> {
        let Some(value) = self.records.get(id.as_bytes())? else {
            return Ok(None);
        };
        let opened;
        let plain = match (&self.sealer, value.first()) {
            (Some(sealer), Some(&SEALED)) => {
                opened = sealer.open(id, &value)?;
                opened.as_slice()
            }
            (None, Some(&SEALED)) => {
                return Err(StoreError::Unsealable {
                    id: id.to_owned(),
                    key_id: sealed_key_id(&value).unwrap_or_default(),
                });
            }
            // Without the key's authentication, `owner` and the conversation could be
            // anyone's.
            (Some(_), _) => return Err(StoreError::NotSealed { id: id.to_owned() }),
            (None, _) => &value[..],
        };
        serde_json::from_slice(plain)
            .map(|record| Some((plain.len() as u64, record)))
            .map_err(|error| StoreError::Transaction(format!("the record of {id}: {error}")))
    }

    fn cutoff_ms(&self, now: SystemTime) -> u64 {
        unix_ms(now).saturating_sub(u64::try_from(self.retention.as_millis()).unwrap_or(u64::MAX))
    }

    fn lock_held(&self) -> std::sync::MutexGuard<'_, Held> {
        self.held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn unix_ms(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map(|since| u64::try_from(since.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn age_key(created_unix_ms: u64, id: &str) -> Vec<u8> {
    let mut key = created_unix_ms.to_be_bytes().to_vec();
    key.extend_from_slice(id.as_bytes());
    key
}

fn split_age_key(key: &[u8]) -> (u64, String) {
    let (created, id) = key.split_at(key.len().min(8));
    let mut bytes = [0_u8; 8];
    bytes[..created.len()].copy_from_slice(created);
    (
        u64::from_be_bytes(bytes),
        String::from_utf8_lossy(id).into_owned(),
    )
}

fn read_size(value: &[u8]) -> u64 {
    value.try_into().map(u64::from_be_bytes).unwrap_or_default()
}

#[cfg(test)]
mod tests;
