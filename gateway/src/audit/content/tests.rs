//! Content capture and stripping: which requests are covered, the caps (bytes, characters,
//! the record's room), what is taken from bodies, answers and stream events, and which copies
//! lose the text.

use expect_test::expect;
use serde_json::{Map, Value, json};

use super::{
    CappedText, Captured, ContentPolicy, answer_text, event_text, line_off_appliance, prompt_text,
    strip_off_appliance,
};

#[test]
fn a_route_or_a_rule_turns_content_on() {
    let policy = ContentPolicy {
        routes: vec!["cloud".to_owned()],
        rules: vec!["support-desk".to_owned()],
        text_bytes_max: 16,
    };
    assert!(policy.covers("cloud", "default"));
    assert!(policy.covers("local", "support-desk"));
    assert!(!policy.covers("local", "default"));
    assert!(!policy.covers("rejected", "auth"));
}

#[test]
fn text_is_cut_at_the_cap_on_a_character_boundary() {
    let mut text = CappedText::new(5);
    text.push("ab");
    text.push("cé");
    assert_eq!((text.as_str(), text.truncated()), ("abcé", false));
    text.push("éz");
    assert_eq!((text.as_str(), text.truncated()), ("abcé", true));
    text.push("z");
    assert_eq!(text.as_str(), "abcé");
}

#[test]
fn prompts_answers_and_events_give_their_text() {
    let chat = br#"{"model":"m","messages":[{"role":"user","content":"hi"}],"temperature":0}"#;
    expect![[r#"Some("[{\"content\":\"hi\",\"role\":\"user\"}]")"#]]
        .assert_eq(&format!("{:?}", prompt_text(chat)));
    expect![[r#"Some("once upon")"#]]
        .assert_eq(&format!("{:?}", prompt_text(br#"{"prompt":"once upon"}"#)));
    expect![[r#"Some("[\"a\",\"b\"]")"#]]
        .assert_eq(&format!("{:?}", prompt_text(br#"{"prompt":["a","b"]}"#)));
    assert_eq!(prompt_text(b"[1]"), None);
    let answer = br#"{"choices":[{"index":0,"message":{"role":"assistant","content":"Hello"}},{"index":1,"text":" there"}]}"#;
    assert_eq!(answer_text(answer), "Hello there");
    assert_eq!(answer_text(b"not json"), "");
    assert_eq!(
        event_text(br#"data: {"choices":[{"index":0,"delta":{"content":"Hel"}}]}"#),
        "Hel"
    );
    assert_eq!(event_text(b"data: [DONE]"), "");
    assert_eq!(
        event_text(br#"data: {"choices":[],"usage":{"total_tokens":3}}"#),
        ""
    );
}

#[test]
fn members_fit_the_room_the_record_leaves() {
    let body = json!({"messages": [{"role": "user", "content": "p".repeat(400)}]}).to_string();
    let mut captured = Captured::new(body.as_bytes(), true, 1000);
    captured.completion.push(&"c\n".repeat(600));
    let fits = |room: usize| {
        let members: Map<String, Value> = captured
            .members(room)
            .into_iter()
            .map(|(name, value)| (name.to_owned(), value))
            .collect();
        let length = serde_json::to_vec(&members).unwrap().len();
        (
            length,
            members["PromptTruncated"].clone(),
            members["CompletionTruncated"].clone(),
            members["ContentRedacted"].clone(),
        )
    };
    // Room for everything: nothing cut (the completion escapes to 1,200 bytes).
    let (length, prompt_cut, completion_cut, redacted) = fits(4000);
    assert!(length <= 4000, "{length}");
    assert_eq!(
        (prompt_cut, completion_cut, redacted),
        (json!(false), json!(true), json!(true))
    );
    // Completion was already cut at 1,000 bytes; a small room cuts both further.
    let (length, prompt_cut, completion_cut, _) = fits(700);
    assert!(length <= 700, "{length}");
    assert_eq!((prompt_cut, completion_cut), (json!(true), json!(true)));
}

#[test]
fn only_cloud_records_keep_content_off_the_appliance() {
    let mut local = json!({"Seq": 1, "Properties": {"Route": "local", "Prompt": "p",
        "Completion": "c", "PromptTruncated": false, "CompletionTruncated": false}});
    let Value::Object(fields) = &mut local else {
        unreachable!()
    };
    assert!(strip_off_appliance(fields));
    expect![[r#"{"Properties":{"Route":"local"},"Seq":1}"#]].assert_eq(&local.to_string());

    let cloud = br#"{"Properties":{"Completion":"c","Prompt":"p","Route":"cloud"},"Seq":2}"#;
    assert!(matches!(
        line_off_appliance(cloud),
        std::borrow::Cow::Borrowed(_)
    ));
    let plain = br#"{"Properties":{"Route":"local"},"Seq":3}"#;
    assert!(matches!(
        line_off_appliance(plain),
        std::borrow::Cow::Borrowed(_)
    ));
    // Text that mentions a member name inside a string is not a member.
    let quoted = br#"{"Properties":{"Route":"local","Rule":"say \"Prompt\""},"Seq":4}"#;
    assert_eq!(line_off_appliance(quoted).as_ref(), quoted.as_slice());
    let rejected = br#"{"Properties":{"Prompt":"p","Route":"rejected"},"Seq":5}"#;
    expect![[r#"{"Properties":{"Route":"rejected"},"Seq":5}"#]]
        .assert_eq(std::str::from_utf8(&line_off_appliance(rejected)).unwrap());
    // A pool on the premises may be sent sensitive text unredacted: it stays on the premises.
    let on_premises =
        br#"{"Properties":{"Completion":"c","OnPremises":true,"Prompt":"p","Route":"cloud"},"Seq":6}"#;
    expect![[r#"{"Properties":{"OnPremises":true,"Route":"cloud"},"Seq":6}"#]]
        .assert_eq(std::str::from_utf8(&line_off_appliance(on_premises)).unwrap());
}
