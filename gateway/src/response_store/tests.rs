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
        encryption_key: None,
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

fn key(hex_digit: char) -> crate::config::StoreKey {
    match crate::config::StoreKey::parse(&hex_digit.to_string().repeat(64)) {
        Ok(key) => key,
        Err(problem) => panic!("{problem}"),
    }
}

fn sealed(
    dir: &std::path::Path,
    key: Option<crate::config::StoreKey>,
) -> Result<ResponseStore, StoreError> {
    ResponseStore::open(
        dir,
        &ResponsesConfig {
            encryption_key: key,
            ..config(1 << 20)
        },
    )
}

/// Whether any file under `dir` holds `needle`.
fn on_disk(dir: &std::path::Path, needle: &[u8]) -> bool {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .any(|entry| {
            let path = entry.path();
            if path.is_dir() {
                on_disk(&path, needle)
            } else {
                std::fs::read(&path)
                    .is_ok_and(|bytes| bytes.windows(needle.len()).any(|window| window == needle))
            }
        })
}

#[test]
fn with_a_key_responses_are_sealed_at_rest_and_read_back() -> Result<(), StoreError> {
    let dir = tempfile::tempdir().map_err(sled::Error::from)?;
    let secret = b"prompt-marker-8841";
    {
        let store = sealed(dir.path(), Some(key('a')))?;
        store.put("resp_1", &record("o", "resp_1", "prompt-marker-8841"))?;
        assert_eq!(
            store
                .get("resp_1", "o")?
                .map(|kept| kept.input_items[0]["content"].clone()),
            Some(json!("prompt-marker-8841"))
        );
        store.flush()?;
    }
    assert!(
        !on_disk(dir.path(), secret),
        "the prompt is on disk in the clear"
    );
    // The same key reads it after a restart; another key, or none, is refused at open,
    // naming the key the records were sealed with.
    assert!(
        sealed(dir.path(), Some(key('a')))?
            .get("resp_1", "o")?
            .is_some()
    );
    for (other, given) in [
        (Some(key('b')), "the key given is"),
        (None, "no key is set"),
    ] {
        match sealed(dir.path(), other) {
            Err(error @ StoreError::KeyMismatch { count: 1, .. }) => {
                let text = error.to_string();
                assert!(
                    text.contains(key('a').id()) && text.contains(given),
                    "{text}"
                );
            }
            other => panic!("expected KeyMismatch, got {other:?}"),
        }
    }
    Ok(())
}

#[test]
fn turning_a_key_on_seals_what_was_kept_in_the_clear_and_leaves_none_of_it_on_disk()
-> Result<(), StoreError> {
    let dir = tempfile::tempdir().map_err(sled::Error::from)?;
    let store_dir = dir.path().join("responses");
    {
        let store = sealed(&store_dir, None)?;
        store.put("resp_1", &record("o", "resp_1", "plain-marker-5512"))?;
        store.flush()?;
    }
    assert!(on_disk(dir.path(), b"plain-marker-5512"));
    let store = sealed(&store_dir, Some(key('c')))?;
    assert!(store.get("resp_1", "o")?.is_some());
    assert_eq!(store.usage().0, 1);
    drop(store);
    // The store was rewritten sealed: not even sled's superseded log pages keep the text,
    // and nothing is left beside it.
    assert!(
        !on_disk(dir.path(), b"plain-marker-5512"),
        "the clear text survived"
    );
    let beside: Vec<_> = std::fs::read_dir(dir.path())
        .map_err(sled::Error::from)?
        .flatten()
        .map(|entry| entry.file_name())
        .collect();
    assert_eq!(beside, ["responses"]);
    assert!(matches!(
        sealed(&store_dir, None),
        Err(StoreError::KeyMismatch { count: 1, .. })
    ));
    Ok(())
}

/// A stop between the two renames of the swap: the old store is found beside its place
/// and a half-written copy next to it. Opening puts the old store back and seals it again.
#[test]
fn a_swap_cut_short_is_undone_and_sealed_again() -> Result<(), StoreError> {
    let dir = tempfile::tempdir().map_err(sled::Error::from)?;
    let store_dir = dir.path().join("responses");
    {
        let store = sealed(&store_dir, None)?;
        store.put("resp_1", &record("o", "resp_1", "plain-marker-7720"))?;
        store.flush()?;
    }
    let io = sled::Error::from;
    std::fs::rename(&store_dir, dir.path().join("responses.replaced")).map_err(io)?;
    std::fs::create_dir(dir.path().join("responses.sealing")).map_err(io)?;
    std::fs::write(dir.path().join("responses.sealing/db"), b"half").map_err(io)?;
    let store = sealed(&store_dir, Some(key('e')))?;
    assert!(store.get("resp_1", "o")?.is_some());
    drop(store);
    assert!(!on_disk(dir.path(), b"plain-marker-7720"));
    assert!(!dir.path().join("responses.replaced").exists());
    assert!(!dir.path().join("responses.sealing").exists());
    Ok(())
}

#[test]
fn a_sealed_record_opens_only_under_its_own_id_and_unaltered() {
    let sealer = super::Sealer::new(&key('d'));
    let sealed = match sealer.seal("resp_1", b"{\"a\":1}") {
        Ok(sealed) => sealed,
        Err(error) => panic!("{error}"),
    };
    assert!(
        sealer
            .open("resp_1", &sealed)
            .is_ok_and(|plain| plain == b"{\"a\":1}")
    );
    assert!(
        sealer.open("resp_2", &sealed).is_err(),
        "moved to another id"
    );
    let mut altered = sealed.clone();
    *altered.last_mut().unwrap_or(&mut 0) ^= 1;
    assert!(sealer.open("resp_1", &altered).is_err(), "altered");
    assert!(
        super::Sealer::new(&key('e'))
            .open("resp_1", &sealed)
            .is_err(),
        "another key"
    );
    // Two seals of the same record differ (a fresh nonce each time).
    assert!(
        sealer
            .seal("resp_1", b"{\"a\":1}")
            .is_ok_and(|again| again != sealed)
    );
}

#[test]
fn keys_are_64_hex_digits_or_base64_of_32_bytes() {
    use crate::config::StoreKey;
    assert!(StoreKey::parse(&"0f".repeat(32)).is_ok());
    assert!(StoreKey::parse("  AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n").is_ok());
    for (text, problem) in [
        (
            "0f0f!",
            "must be 32 bytes written as 64 hexadecimal digits or in base64",
        ),
        ("AAAA", "must be 32 bytes (256 bits), not 3 bytes"),
    ] {
        assert!(
            StoreKey::parse(text).is_err_and(|error| error.contains(problem)),
            "{text}"
        );
    }
    let key = key('a');
    assert!(!format!("{key:?}").contains("aaaa"), "{key:?}");
}

#[test]
fn a_record_in_the_clear_in_a_sealed_store_is_refused() -> Result<(), StoreError> {
    let dir = tempfile::tempdir().map_err(sled::Error::from)?;
    let store = sealed(dir.path(), Some(key('a')))?;
    // Planted by someone who can write the state directory but has no key: it would pass
    // for anyone's response and continue their conversation.
    let planted = serde_json::to_vec(&record("victim", "resp_9", "forged history"))
        .map_err(|error| StoreError::Transaction(error.to_string()))?;
    store.records.insert("resp_9".as_bytes(), planted)?;
    match store.get("resp_9", "victim") {
        Err(StoreError::NotSealed { id }) => assert_eq!(id, "resp_9"),
        other => panic!("expected NotSealed, got {other:?}"),
    }
    Ok(())
}
