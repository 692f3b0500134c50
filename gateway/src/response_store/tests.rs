use std::time::{Duration, SystemTime};

use serde_json::{Value, json};

use super::{ResponseStore, StoreError, StoredResponse};
use crate::config::ResponsesConfig;

fn config(bytes_max: u64) -> ResponsesConfig {
    ResponsesConfig {
        store: true,
        retention: Duration::from_secs(3_600),
        bytes_max,
        record_bytes_max: bytes_max,
        keep_sensitive: false,
    }
}

fn record(owner: &str, id: &str, text: &str) -> StoredResponse {
    StoredResponse::new(
        owner,
        "req-1",
        vec![json!({"role": "user", "content": text})],
        json!({"id": id, "object": "response", "output": [
            {"type": "message", "role": "assistant", "id": "msg_1",
             "content": [{"type": "output_text", "text": "answer"}]}
        ]}),
    )
}

fn open(dir: &std::path::Path, bytes_max: u64) -> ResponseStore {
    match ResponseStore::open(dir, &config(bytes_max)) {
        Ok(store) => store,
        Err(error) => panic!("opening the store: {error}"),
    }
}

#[test]
fn a_response_is_its_owners_alone_until_deleted() -> Result<(), StoreError> {
    let dir = tempfile::tempdir().map_err(sled::Error::from)?;
    let store = open(dir.path(), 1 << 20);
    let kept = record("key:a", "resp_1", "hello");
    store.put("resp_1", &kept)?;
    assert_eq!(store.get("resp_1", "key:a")?, Some(kept.clone()));
    assert_eq!(store.get("resp_1", "key:b")?, None, "another caller's");
    assert_eq!(store.get("resp_2", "key:a")?, None);
    assert_eq!(kept.output().len(), 1);
    // Another caller can neither take the id nor delete it.
    assert!(
        store
            .put("resp_1", &record("key:b", "resp_1", "mine"))
            .is_err()
    );
    assert!(!store.delete("resp_1", "key:b")?);
    assert!(store.delete("resp_1", "key:a")?);
    assert_eq!(store.get("resp_1", "key:a")?, None);
    assert!(!store.delete("resp_1", "key:a")?);
    assert_eq!(store.usage(), (0, 0));
    Ok(())
}

#[test]
fn input_items_get_ids_after_their_type() {
    let kept = StoredResponse::new(
        "anonymous",
        "req-1",
        vec![
            json!({"role": "user", "content": "hi"}),
            json!({"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"}),
            json!({"type": "function_call_output", "call_id": "c", "output": "1"}),
            json!({"type": "message", "id": "msg_kept", "role": "user", "content": "x"}),
        ],
        json!({"id": "resp_abc"}),
    );
    let ids: Vec<&str> = kept
        .input_items
        .iter()
        .map(|item| item["id"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(
        ids,
        ["msg_abc_in0", "fc_abc_in1", "fco_abc_in2", "msg_kept"]
    );
}

#[test]
fn the_oldest_go_first_over_the_bound_and_the_count_survives_a_reopen() -> Result<(), StoreError> {
    let dir = tempfile::tempdir().map_err(sled::Error::from)?;
    let size = serde_json::to_vec(&record("o", "resp_00", &"x".repeat(1_000)))
        .map_err(|error| StoreError::Transaction(error.to_string()))?
        .len() as u64;
    // Room for three records, not four.
    let bound = size * 3 + size / 2;
    {
        let store = open(dir.path(), bound);
        for index in 0..5 {
            let id = format!("resp_{index:02}");
            let mut kept = record("o", &id, &"x".repeat(1_000));
            // Distinct, increasing ages: the order eviction follows.
            kept.created_unix_ms += index;
            store.put(&id, &kept)?;
        }
        let (count, bytes) = store.usage();
        assert_eq!(count, 3);
        assert!(bytes <= bound, "{bytes} > {bound}");
        for gone in ["resp_00", "resp_01"] {
            assert_eq!(store.get(gone, "o")?, None, "{gone}");
        }
        store.flush()?;
    }
    let store = open(dir.path(), bound);
    assert_eq!(store.usage().0, 3);
    assert!(store.get("resp_04", "o")?.is_some());
    // A smaller bound on the next start applies at once.
    drop(store);
    let store = open(dir.path(), size + size / 2);
    assert_eq!(store.usage().0, 1);
    assert!(store.get("resp_04", "o")?.is_some());
    Ok(())
}

#[test]
fn responses_past_the_retention_are_neither_served_nor_kept() -> Result<(), StoreError> {
    let dir = tempfile::tempdir().map_err(sled::Error::from)?;
    let store = open(dir.path(), 1 << 20);
    let mut old = record("o", "resp_old", "then");
    old.created_unix_ms -= 2 * 3_600 * 1_000;
    store.put("resp_old", &old)?;
    store.put("resp_new", &record("o", "resp_new", "now"))?;
    assert_eq!(store.get("resp_old", "o")?, None, "expired");
    assert_eq!(store.expire(SystemTime::now())?, 1);
    assert_eq!(store.usage().0, 1);
    assert!(store.get("resp_new", "o")?.is_some());
    assert_eq!(
        store.expire(SystemTime::now() + Duration::from_secs(3_601))?,
        1
    );
    assert_eq!(store.usage(), (0, 0));
    Ok(())
}

#[test]
fn a_record_over_its_limit_is_refused() -> Result<(), StoreError> {
    let dir = tempfile::tempdir().map_err(sled::Error::from)?;
    let store = ResponseStore::open(
        dir.path(),
        &ResponsesConfig {
            record_bytes_max: 512,
            ..config(1 << 20)
        },
    )?;
    let big = record("o", "resp_big", &"y".repeat(1_000));
    match store.put("resp_big", &big) {
        Err(StoreError::TooLarge { limit: 512, .. }) => {}
        other => panic!("expected TooLarge, got {other:?}"),
    }
    assert_eq!(store.usage(), (0, 0));
    let small: Value = json!({"id": "resp_small"});
    store.put(
        "resp_small",
        &StoredResponse::new("o", "r", Vec::new(), small),
    )?;
    assert_eq!(store.usage().0, 1);
    Ok(())
}
