use super::*;
use crate::config::PolicyConfig;

fn scanner() -> SensitivityScanner {
    match SensitivityScanner::compile(&PolicyConfig::default()) {
        Ok(scanner) => scanner,
        Err(errors) => panic!("{errors:?}"),
    }
}

/// `body` redacted, and its map.
fn redacted(body: &[u8]) -> (Bytes, RedactionMap) {
    match redact_body(body, &scanner()) {
        Ok(result) => result,
        Err(error) => panic!("{error}"),
    }
}

/// The map of a request whose one message is Jane's e-mail address.
fn janes_map() -> RedactionMap {
    redacted(br#"{"messages":[{"role":"user","content":"jane.doe@contoso.com"}]}"#).1
}

fn chunk(index: u64, text: &str, finish: Option<&str>) -> Vec<u8> {
    format!(
        "data: {}",
        serde_json::json!({"id": "c", "choices": [{"index": index, "delta": {"content": text}, "finish_reason": finish}]})
    )
    .into_bytes()
}

/// The strings at `pointer` of a stream's chunks, joined.
fn joined_at(stream: &[u8], pointer: &str) -> String {
    String::from_utf8_lossy(stream)
        .split("\n\n")
        .filter_map(|event| event.strip_prefix("data: "))
        .filter_map(|data| serde_json::from_str::<Value>(data).ok())
        .filter_map(|chunk| chunk.pointer(pointer)?.as_str().map(str::to_owned))
        .collect()
}

fn content_of(stream: &[u8]) -> String {
    joined_at(stream, "/choices/0/delta/content")
}

#[test]
fn the_body_is_redacted_in_every_prompt_place_and_answers_are_restored() {
    let body = br#"{"model":"m","messages":[{"role":"user","content":"mail jane.doe@contoso.com"},{"role":"assistant","tool_calls":[{"id":"t","type":"function","function":{"name":"f","arguments":"{\"to\":\"jane.doe@contoso.com\"}"}}]}]}"#;
    let (redacted, map) = redacted(body);
    let text = String::from_utf8_lossy(&redacted);
    assert!(!text.contains("jane.doe"), "{text}");
    assert!(text.contains("<EMAIL_1>"), "{text}");
    let answer = br#"{"choices":[{"index":0,"message":{"role":"assistant","content":"Sent to <EMAIL_1>."}}]}"#;
    let restored: Value = serde_json::from_slice(&restore_answer(answer, &map)).unwrap_or_default();
    assert_eq!(
        restored["choices"][0]["message"]["content"],
        "Sent to jane.doe@contoso.com."
    );
}

#[test]
fn a_placeholder_split_across_chunks_is_restored_in_the_stream() {
    let map = janes_map();
    let mut restorer = StreamRestorer::new(map);
    let mut out = Vec::new();
    for (text, finish) in [
        ("Hi <EM", None),
        ("AIL", None),
        ("_1> and <EMAIL_", None),
        ("1", None),
        ("", Some("stop")),
    ] {
        out.extend_from_slice(&restorer.event(&chunk(0, text, finish)));
    }
    out.extend_from_slice(&restorer.event(b"data: [DONE]"));
    assert_eq!(content_of(&out), "Hi jane.doe@contoso.com and <EMAIL_1");
    assert!(String::from_utf8_lossy(&out).ends_with("data: [DONE]\n\n"));
}

#[test]
fn values_written_in_look_alike_characters_are_redacted_whole_and_restored_as_sent() {
    // JSON escapes for a no-break space, zero-width spaces and an en dash, as a client
    // that pastes from a web page or a word processor sends them.
    let body = br#"{"model":"m","messages":[{"role":"user","content":"card 4111\u00a01111\u00a01111\u00a01111, ssn 536\u201322\u20131234, mail jane\u200b.doe@contoso.com"}]}"#;
    let (redacted, map) = redacted(body);
    let text = String::from_utf8_lossy(&redacted);
    for leaked in ["4111", "1111", "536", "1234", "jane", "contoso"] {
        assert!(!text.contains(leaked), "{leaked} in {text}");
    }
    let placeholders = map.placeholders();
    assert_eq!(placeholders.len(), 3, "{placeholders:?}");
    assert_eq!(
        map.restore(&placeholders.join("|")),
        "4111\u{a0}1111\u{a0}1111\u{a0}1111|jane\u{200b}.doe@contoso.com|536\u{2013}22\u{2013}1234"
    );
}

#[test]
fn placeholders_in_tool_call_arguments_are_restored_whole_and_streamed() {
    let (_, map) = redacted(br#"{"messages":[{"role":"user","content":"Mail jane.doe@contoso.com the key -----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\n-----END PRIVATE KEY-----"}]}"#);
    let expected = serde_json::json!({
        "to": "jane.doe@contoso.com",
        "key": "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\n-----END PRIVATE KEY-----",
    });
    // A whole answer: the arguments are JSON text in a string, and stay valid JSON.
    let answer = serde_json::json!({"choices": [{"index": 0, "message": {"role": "assistant",
        "content": null, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "send", "arguments": r#"{"to": "<EMAIL_1>", "key": "<PRIVATE_KEY_1>"}"#}}]}}]});
    let restored: Value =
        serde_json::from_slice(&restore_answer(&serde_json::to_vec(&answer).unwrap(), &map))
            .unwrap();
    let arguments = restored["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"]
        .as_str()
        .unwrap();
    assert_eq!(
        serde_json::from_str::<Value>(arguments).unwrap(),
        expected,
        "{arguments}"
    );

    // Streamed, with the placeholders cut across chunks and the last one held until the
    // choice finishes.
    let call = |arguments: &str, finish: Option<&str>| {
        format!(
            "data: {}",
            serde_json::json!({"id": "c", "choices": [{"index": 0, "delta": {"tool_calls": [
                {"index": 0, "function": {"arguments": arguments}}]}, "finish_reason": finish}]})
        )
        .into_bytes()
    };
    let mut restorer = StreamRestorer::new(map);
    let mut out = Vec::new();
    for (arguments, finish) in [
        (r#"{"to": "<EM"#, None),
        (r#"AIL_1>", "key": "<PRIV"#, None),
        (r#"ATE_KEY_1>"}"#, None),
        ("", Some("tool_calls")),
    ] {
        out.extend_from_slice(&restorer.event(&call(arguments, finish)));
    }
    out.extend_from_slice(&restorer.event(b"data: [DONE]"));
    let streamed = joined_at(&out, "/choices/0/delta/tool_calls/0/function/arguments");
    assert_eq!(
        serde_json::from_str::<Value>(&streamed).unwrap(),
        expected,
        "{streamed}"
    );
}

#[test]
fn a_calls_arguments_are_redacted_as_the_values_they_decode_to() {
    // An earlier turn's call, its arguments as a JSON library writes them: a card with its
    // no-break spaces escaped (as Python's `json.dumps` does), a password with an escaped
    // quote, a key with escaped line feeds.
    let arguments = serde_json::json!({
        "card": "4111\u{a0}1111\u{a0}1111\u{a0}1111",
        "password": "Tr0ub4dor\"&3xK!pQz",
        "key": "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\n-----END PRIVATE KEY-----",
    });
    let written = serde_json::to_string(&arguments)
        .unwrap()
        .replace('\u{a0}', "\\u00a0");
    let body = serde_json::json!({"model": "m", "messages": [
        {"role": "assistant", "content": null, "tool_calls": [{"id": "t", "type": "function",
            "function": {"name": "charge", "arguments": written}}]},
        {"role": "user", "content": "Charge 4111\u{a0}1111\u{a0}1111\u{a0}1111 again."},
    ]});
    let (redacted, map) = redacted(&serde_json::to_vec(&body).unwrap());
    let redacted: Value = serde_json::from_slice(&redacted).unwrap();
    let sent = redacted["messages"][0]["tool_calls"][0]["function"]["arguments"]
        .as_str()
        .unwrap();
    for leaked in ["4111", "Tr0ub4dor", "pQz", "MIIE"] {
        assert!(!sent.contains(leaked), "{leaked} in {sent}");
    }
    // Still JSON: placeholders where the values were.
    let placeholders: Value = serde_json::from_str(sent).unwrap();
    // The same card in the user's message has the same placeholder.
    let content = redacted["messages"][1]["content"].as_str().unwrap();
    assert_eq!(
        content,
        format!("Charge {} again.", placeholders["card"].as_str().unwrap())
    );
    // An answer's call with those placeholders gets the values back, escaped once.
    let answer = serde_json::json!({"choices": [{"index": 0, "message": {"role": "assistant",
        "content": null, "tool_calls": [{"id": "c", "type": "function", "function": {
            "name": "charge", "arguments": sent}}]}}]});
    let restored: Value =
        serde_json::from_slice(&restore_answer(&serde_json::to_vec(&answer).unwrap(), &map))
            .unwrap();
    let back = restored["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"]
        .as_str()
        .unwrap();
    assert_eq!(
        serde_json::from_str::<Value>(back).unwrap(),
        arguments,
        "{back}"
    );
}

#[test]
fn held_text_of_a_finishing_chunk_follows_the_text_before_it() {
    let map = janes_map();
    // Servers that put the last token's text in the finish chunk: a tail that might begin a
    // placeholder is held, and must still come out after the text before it.
    let mut restorer = StreamRestorer::new(map);
    let mut out = Vec::new();
    out.extend_from_slice(&restorer.event(&chunk(0, "About ", None)));
    out.extend_from_slice(&restorer.event(&chunk(0, "the invoice. Cc <EMA", Some("length"))));
    out.extend_from_slice(&restorer.event(b"data: [DONE]"));
    assert_eq!(content_of(&out), "About the invoice. Cc <EMA");
}

#[test]
fn a_chunk_that_is_not_an_object_passes_without_breaking_the_stream() {
    let map = janes_map();
    let mut restorer = StreamRestorer::new(map);
    let mut out = Vec::new();
    out.extend_from_slice(&restorer.event(&chunk(0, "Mail <EMAIL", None)));
    out.extend_from_slice(&restorer.event(b"data: 1"));
    out.extend_from_slice(&restorer.event(b"data: [DONE]"));
    let text = String::from_utf8_lossy(&out);
    assert!(text.contains("data: 1\n\n"), "{text}");
    assert_eq!(content_of(&out), "Mail <EMAIL");
}

#[test]
fn values_restored_into_a_json_answer_keep_it_json() {
    let body = br#"{"model":"m","response_format":{"type":"json_object"},"messages":[{"role":"user","content":"Store the key -----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\n-----END PRIVATE KEY----- as JSON"}]}"#;
    let (_, map) = redacted(body);
    let key =
        "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\n-----END PRIVATE KEY-----";
    let answer = br#"{"choices":[{"index":0,"message":{"role":"assistant","content":"{\"ssh_key\": \"<PRIVATE_KEY_1>\"}"}}]}"#;
    let restored: Value = serde_json::from_slice(&restore_answer(answer, &map)).unwrap();
    let content = restored["choices"][0]["message"]["content"]
        .as_str()
        .unwrap();
    let parsed: Value = serde_json::from_str(content).unwrap();
    assert_eq!(parsed["ssh_key"], key, "{content}");

    // Streamed, the placeholder cut across chunks.
    let mut restorer = StreamRestorer::new(map);
    let mut out = Vec::new();
    for (text, finish) in [
        ("{\"ssh_key\": \"<PRIVATE_", None),
        ("KEY_1>\"}", Some("stop")),
    ] {
        out.extend_from_slice(&restorer.event(&chunk(0, text, finish)));
    }
    let streamed = content_of(&out);
    let parsed: Value = serde_json::from_str(&streamed).unwrap();
    assert_eq!(parsed["ssh_key"], key, "{streamed}");
}

#[test]
fn a_reasoning_models_thoughts_and_refusals_are_restored_too() {
    let map = janes_map();
    let answer = br#"{"choices":[{"index":0,"message":{"role":"assistant","content":"Done.","reasoning_content":"Write to <EMAIL_1>.","refusal":"Not <EMAIL_1>."}}]}"#;
    let restored: Value = serde_json::from_slice(&restore_answer(answer, &map)).unwrap();
    let message = &restored["choices"][0]["message"];
    assert_eq!(
        message["reasoning_content"],
        "Write to jane.doe@contoso.com."
    );
    assert_eq!(message["refusal"], "Not jane.doe@contoso.com.");

    let thought = |text: &str, finish: Option<&str>| {
        format!(
            "data: {}",
            serde_json::json!({"id": "c", "choices": [{"index": 0,
                "delta": {"reasoning_content": text}, "finish_reason": finish}]})
        )
        .into_bytes()
    };
    let mut restorer = StreamRestorer::new(map);
    let mut out = Vec::new();
    for (text, finish) in [
        ("Write to <EMA", None),
        ("IL_1>", None),
        (" now", Some("stop")),
    ] {
        out.extend_from_slice(&restorer.event(&thought(text, finish)));
    }
    assert_eq!(
        joined_at(&out, "/choices/0/delta/reasoning_content"),
        "Write to jane.doe@contoso.com now"
    );
}

#[test]
fn placeholders_the_client_wrote_escaped_are_reserved_too() {
    // Go's encoder writes `<` and `>` as `\u003c` and `\u003e`; a call's arguments may
    // escape them once more.
    let body = br#"{"messages":[{"role":"user","content":"Replace addresses with \u003cEMAIL_1\u003e: jane.doe@contoso.com"},{"role":"assistant","tool_calls":[{"id":"t","type":"function","function":{"name":"f","arguments":"{\"tag\":\"\\u003cEMAIL_2\\u003e\"}"}}]}]}"#;
    let (redacted, map) = redacted(body);
    let text = String::from_utf8_lossy(&redacted);
    assert!(!text.contains("jane.doe"), "{text}");
    assert!(text.contains("<EMAIL_1>: <EMAIL_3>"), "{text}");
    let answer = br#"{"choices":[{"index":0,"message":{"role":"assistant","content":"<EMAIL_1> stands for <EMAIL_3>."}}]}"#;
    let restored: Value = serde_json::from_slice(&restore_answer(answer, &map)).unwrap_or_default();
    assert_eq!(
        restored["choices"][0]["message"]["content"],
        "<EMAIL_1> stands for jane.doe@contoso.com."
    );
}
