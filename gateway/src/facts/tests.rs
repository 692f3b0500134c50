use super::*;

#[test]
fn every_place_a_prompt_can_hide_is_collected() {
    let body = br#"{
        "model": "m",
        "max_tokens": 64,
        "messages": [
            {"role": "system", "content": "sys"},
            {"role": "user", "content": [{"type": "text", "text": "part one"}, {"type": "image_url", "image_url": {"url": "data:x"}}]},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "1", "type": "function", "function": {"name": "f", "arguments": "{\"iban\": \"DE89\"}"}}]},
            {"role": "assistant", "function_call": {"name": "g", "arguments": "legacy args"}},
            {"role": "tool", "tool_call_id": "1", "content": "tool output"}
        ],
        "tools": [{"type": "function", "function": {"name": "f", "description": "looks up accounts"}}]
    }"#;
    let texts = prompt_texts(body);
    assert_eq!(texts.turns, 5);
    assert_eq!(texts.tools, 1);
    assert_eq!(texts.max_tokens, Some(64));
    for expected in [
        "sys",
        "part one",
        "{\"iban\": \"DE89\"}",
        "legacy args",
        "tool output",
        "looks up accounts",
        "data:x",
    ] {
        assert!(
            texts.texts.iter().any(|text| text == expected),
            "missing {expected:?} in {:?}",
            texts.texts
        );
    }
    let legacy = prompt_texts(br#"{"prompt": ["a", "b"], "max_completion_tokens": 3}"#);
    assert_eq!(legacy.texts, ["a", "b"]);
    assert_eq!((legacy.turns, legacy.max_tokens), (1, Some(3)));
}
