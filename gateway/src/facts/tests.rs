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
    let texts = prompt_texts(body).unwrap();
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
    let legacy = prompt_texts(br#"{"prompt": ["a", "b"], "max_completion_tokens": 3}"#).unwrap();
    assert_eq!(legacy.texts, ["a", "b"]);
    assert_eq!((legacy.turns, legacy.max_tokens), (1, Some(3)));
    // Answers a body asks for (what a daily budget reserves): `n` for each prompt.
    assert_eq!((legacy.choices, legacy.prompts), (1, 2));
    let many = prompt_texts(br#"{"prompt": ["a", "b"], "n": 3}"#).unwrap();
    assert_eq!((many.choices, many.prompts), (3, 2));
    let chat =
        prompt_texts(br#"{"messages": [{"role": "user", "content": "x"}], "n": 16}"#).unwrap();
    assert_eq!((chat.choices, chat.prompts), (16, 1));
}

#[test]
fn every_copy_of_a_repeated_key_is_collected() {
    // Parsers disagree on which duplicate wins; the scan must see both.
    let body = br#"{
        "messages": [{"role": "user", "content": "my SSN is 078-05-1120"}],
        "messages": [
            {"role": "user", "content": "card 4111 1111 1111 1111", "content": "hello"},
            {"role": "user", "content": [{"type": "text", "text": {"note": "iban DE89"}, "text": "hi"}]}
        ],
        "prompt": "legacy one",
        "prompt": 7
    }"#;
    let texts = prompt_texts(body).unwrap();
    for expected in [
        "my SSN is 078-05-1120",
        "card 4111 1111 1111 1111",
        "hello",
        "iban DE89",
        "hi",
        "legacy one",
    ] {
        assert!(
            texts.texts.iter().any(|text| text == expected),
            "missing {expected:?} in {:?}",
            texts.texts
        );
    }
    // Counts follow the last copy, as a JSON tree keeps it.
    assert_eq!(texts.turns, 2);
}

/// A model reads consecutive text parts as one text: a value split between them is read
/// joined too; a part of another kind between them ends the run.
#[test]
fn consecutive_text_parts_are_also_read_joined() {
    let body = br#"{"messages": [
        {"role": "user", "content": [
            {"type": "text", "text": "mail jane.doe@"}, {"type": "text", "text": "contoso.com"},
            {"type": "image_url", "image_url": {"url": "data:x"}},
            {"type": "text", "text": "card 4111 1111"}, {"type": "text", "text": " 1111"},
            {"type": "text", "text": " 1111"}
        ]},
        {"role": "user", "content": [{"type": "text", "text": "alone"}]}
    ]}"#;
    let texts = prompt_texts(body).unwrap();
    // The scan and the firewall (as prompt text) read the runs and the seams; they are not
    // among the body's other fields, which the firewall reads for queries and scripts.
    assert!(!texts.elsewhere.contains("jane.doe@contoso.com"));
    assert_eq!(
        texts.joined,
        [
            "mail jane.doe@contoso.com",
            "card 4111 1111 1111 1111",
            // The seams between the two messages (their last and first text).
            " 1111alone",
            " 1111 alone",
        ]
    );
    // The texts themselves (the complexity score's input) are the parts as sent.
    assert!(texts.texts.iter().any(|text| text == "mail jane.doe@"));
}

/// A model reads a conversation's messages in a row: a value split across two of them is
/// read across the seam; a message without text (an image) breaks the chain, and only the
/// ends of long messages are joined.
#[test]
fn a_value_split_across_messages_is_read_across_the_seam() {
    let long = "x".repeat(200);
    let body = format!(
        r#"{{"messages": [
            {{"role": "user", "content": "{long} my card is 4111 1111"}},
            {{"role": "user", "content": [{{"type": "text", "text": "1111 1111 thanks"}}]}},
            {{"role": "user", "content": [{{"type": "image_url", "image_url": {{"url": "data:x"}}}}]}},
            {{"role": "user", "content": "after the image"}},
            {{"role": "assistant", "content": "mail me at jane.doe@"}},
            {{"role": "user", "content": "contoso.com {long}"}}
        ]}}"#
    );
    let texts = prompt_texts(body.as_bytes()).unwrap();
    assert_eq!(texts.joined.len(), 6, "{:?}", texts.joined);
    assert!(texts.joined[1].ends_with(" my card is 4111 1111 1111 1111 thanks"));
    assert_eq!(
        texts.joined[1].len(),
        64 + 1 + 16,
        "the last 64 bytes of a long text"
    );
    assert_eq!(texts.joined[3], "after the image mail me at jane.doe@");
    assert!(texts.joined[4].starts_with("mail me at jane.doe@contoso.com "));
    assert_eq!(
        texts.joined[4].len(),
        20 + 64,
        "the first 64 bytes of a long text"
    );
    // The scan reads the seams (beside the texts); the texts stay as sent.
    assert!(!texts.elsewhere.contains("4111 1111 1111 1111"));
    assert!(
        !texts
            .texts
            .iter()
            .any(|text| text.contains("1111 1111 1111"))
    );
    let recognizers = router_policies::sensitivity::Recognizers::default();
    let entities: Vec<String> = texts
        .joined
        .iter()
        .flat_map(|seam| recognizers.scan(seam))
        .map(|finding| finding.entity.to_string())
        .collect();
    assert_eq!(entities, ["credit_card", "email"]);
}

#[test]
fn escaped_keys_and_odd_shapes_are_read_like_a_json_tree() {
    let body = br#"{"mess\u0061ges": [{"content": "escaped key"}, "not a message", [1]],
        "max_completion_tokens": null, "max_tokens": 9, "tools": {"not": "an array"}}"#;
    let texts = prompt_texts(body).unwrap();
    assert_eq!(texts.texts, ["escaped key"]);
    assert_eq!((texts.turns, texts.tools, texts.max_tokens), (3, 0, None));
}

/// A body the reader cannot read to its end is an error, never an empty collection: other
/// parsers may read (and a backend would be sent) what this one stops at.
#[test]
fn a_body_the_reader_cannot_read_whole_is_an_error() {
    let deep = format!(
        r#"{{"prompt": "a", "metadata": {}"4111 1111 1111 1111"{}}}"#,
        "[".repeat(200),
        "]".repeat(200)
    );
    for (body, expected) in [
        (&b"[1, 2]"[..], "the body is not a JSON object"),
        (br#"{"prompt": "a"} trailing"#, "trailing characters"),
        (br#"{"prompt": "#, "EOF while parsing"),
        (deep.as_bytes(), "recursion limit exceeded"),
        (
            br#"{"prompt": "a", "metadata": {"x": 1e400}}"#,
            "number out of range",
        ),
        (br#"{"prompt": "a", "user": "\ud800"}"#, "hex escape"),
        (br#"{"prompt": "a", "user": "\ud800\u0041"}"#, "hex escape"),
        (br#"{"prompt": "a", "user": "\udc00"}"#, "hex escape"),
    ] {
        let error = prompt_texts(body).unwrap_err();
        assert!(
            error.contains(expected),
            "{}: {error}",
            String::from_utf8_lossy(body)
        );
    }
}

/// The collection as a JSON tree gives it (one value per key, the last): the one-pass reader
/// must agree with it on every body without repeated keys.
fn tree_prompt_texts(body: &[u8]) -> PromptTexts {
    /// The content's first and last text (a string, or text parts), for the seams.
    #[derive(Default)]
    struct Ends {
        first: Option<String>,
        last: Option<String>,
    }
    impl Ends {
        fn text(&mut self, text: &str) {
            self.first.get_or_insert_with(|| text.to_owned());
            self.last = Some(text.to_owned());
        }
    }
    fn content(
        value: Option<&Value>,
        texts: &mut Vec<String>,
        joined: &mut Vec<String>,
        ends: &mut Ends,
    ) {
        match value {
            Some(Value::String(text)) => {
                ends.text(text);
                texts.push(text.clone());
            }
            Some(Value::Array(parts)) => {
                // Consecutive text parts (a string, or an object whose `text` is one) also
                // make one joined text per run of two or more.
                let mut run = Vec::new();
                for part in parts {
                    match part.get("text") {
                        Some(Value::String(text)) => texts.push(text.clone()),
                        _ => any(part, texts),
                    }
                    match part {
                        Value::String(text) => {
                            ends.text(text);
                            run.push(text.as_str());
                        }
                        _ => match part.get("text") {
                            Some(Value::String(text)) => {
                                ends.text(text);
                                run.push(text.as_str());
                            }
                            _ => {
                                if run.len() >= 2 {
                                    joined.push(run.concat());
                                }
                                run.clear();
                            }
                        },
                    }
                }
                if run.len() >= 2 {
                    joined.push(run.concat());
                }
            }
            Some(other) => any(other, texts),
            None => {}
        }
    }
    fn any(value: &Value, texts: &mut Vec<String>) {
        match value {
            Value::String(text) => texts.push(text.clone()),
            Value::Array(items) => items.iter().for_each(|item| any(item, texts)),
            Value::Object(map) => map.values().for_each(|item| any(item, texts)),
            Value::Null | Value::Bool(_) | Value::Number(_) => {}
        }
    }
    let Ok(Value::Object(fields)) = serde_json::from_slice::<Value>(body) else {
        return PromptTexts::default();
    };
    let mut out = PromptTexts::default();
    if let Some(Value::Array(messages)) = fields.get("messages") {
        out.turns = u32::try_from(messages.len()).unwrap();
        // The seams between adjacent messages' texts, as the reader keeps them.
        let mut tail: Option<String> = None;
        for message in messages {
            let mut ends = Ends::default();
            content(
                message.get("content"),
                &mut out.texts,
                &mut out.joined,
                &mut ends,
            );
            for call in message
                .get("tool_calls")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                if let Some(arguments) = call.get("function").and_then(|f| f.get("arguments")) {
                    any(arguments, &mut out.texts);
                }
            }
            if let Some(arguments) = message
                .get("function_call")
                .and_then(|c| c.get("arguments"))
            {
                any(arguments, &mut out.texts);
            }
            let previous = tail.take();
            if let (Some(first), Some(last)) = (ends.first, ends.last) {
                if let Some(previous) = previous {
                    let tail = super::prompt::message_tail(&previous);
                    let head = super::prompt::message_head(&first);
                    out.joined.push(format!("{tail}{head}"));
                    out.joined.push(format!("{tail} {head}"));
                }
                tail = Some(last);
            }
        }
    }
    out.prompts = 1;
    match fields.get("prompt") {
        Some(Value::String(prompt)) => {
            out.texts.push(prompt.clone());
            out.turns = out.turns.max(1);
        }
        Some(Value::Array(items)) => {
            out.turns = out.turns.max(1);
            let before = out.texts.len();
            items.iter().for_each(|item| any(item, &mut out.texts));
            out.prompts = u32::try_from(out.texts.len() - before).unwrap().max(1);
        }
        _ => {}
    }
    out.choices = fields
        .get("n")
        .and_then(Value::as_u64)
        .map_or(1, |n| u32::try_from(n).unwrap_or(u32::MAX));
    if let Some(Value::Array(tools)) = fields.get("tools") {
        out.tools = u32::try_from(tools.len()).unwrap();
        tools.iter().for_each(|tool| any(tool, &mut out.texts));
    }
    out.max_tokens = fields
        .get("max_completion_tokens")
        .or_else(|| fields.get("max_tokens"))
        .and_then(Value::as_u64)
        .and_then(|tokens| u32::try_from(tokens).ok());
    out
}

/// The keys the reader knows are structure; every other key is read.
const KNOWN_KEYS: &[&str] = &[
    "messages",
    "prompt",
    "tools",
    "max_tokens",
    "max_completion_tokens",
    "model",
    "role",
    "name",
    "tool_call_id",
    "content",
    "tool_calls",
    "function_call",
    "function",
    "arguments",
];

/// Top-level keys whose number is a parameter, not read.
const PARAMETER_KEYS: &[&str] = &["max_tokens", "max_completion_tokens", "model"];

/// The decimal text the reader gives a number, if it reads it.
fn number_text(number: &serde_json::Number) -> Option<String> {
    if let Some(value) = number.as_u64() {
        return Some(value.to_string());
    }
    if let Some(value) = number.as_i64() {
        return Some(value.to_string());
    }
    let value = number.as_f64()?;
    (value.fract() == 0.0 && value.abs() < 1e19).then(|| {
        if value >= 0.0 {
            (value as u64).to_string()
        } else {
            (value as i64).to_string()
        }
    })
}

/// Every string, unknown key and number of a body that the reader must read.
fn every_scalar(value: &Value, out: &mut Vec<String>, top_level: bool) {
    match value {
        Value::String(text) => out.push(text.clone()),
        Value::Number(number) => out.extend(number_text(number)),
        Value::Array(items) => items.iter().for_each(|item| every_scalar(item, out, false)),
        Value::Object(map) => map.iter().for_each(|(key, item)| {
            if !KNOWN_KEYS.contains(&key.as_str()) {
                out.push(key.clone());
            }
            if !(top_level && item.is_number() && PARAMETER_KEYS.contains(&key.as_str())) {
                every_scalar(item, out, false);
            }
        }),
        Value::Null | Value::Bool(_) => {}
    }
}

/// Any JSON value, a few levels deep, with keys a request body's reader looks for.
fn any_json() -> impl proptest::strategy::Strategy<Value = Value> {
    use proptest::prelude::*;
    const KEYS: &[&str] = &["content", "text", "function", "arguments", "type", "x"];
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        (0u32..2000).prop_map(Value::from),
        (-1e6f64..1e6).prop_map(Value::from),
        (-1e6f64..1e6).prop_map(|value| Value::from(value.round())),
        "[a-z\"\\\\\u{e9}\u{1F600} ]{0,12}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            proptest::collection::btree_map(proptest::sample::select(KEYS), inner, 0..4).prop_map(
                |map| Value::Object(map.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
            ),
        ]
    })
}

/// An object with some of `fields` (each present or not), as JSON.
fn object_of(
    fields: Vec<(&'static str, proptest::strategy::BoxedStrategy<Value>)>,
) -> proptest::strategy::BoxedStrategy<Value> {
    use proptest::prelude::*;
    let parts: Vec<_> = fields
        .into_iter()
        .map(|(name, value)| proptest::option::of(value).prop_map(move |value| (name, value)))
        .collect();
    parts
        .prop_map(|fields| {
            Value::Object(
                fields
                    .into_iter()
                    .filter_map(|(name, value)| value.map(|value| (name.to_owned(), value)))
                    .collect(),
            )
        })
        .boxed()
}

/// Bodies shaped like chat and completions requests, every field sometimes of another shape.
fn request_like() -> impl proptest::strategy::Strategy<Value = Value> {
    use proptest::prelude::*;
    let any_json = || any_json().boxed();
    let text = || "[a-z ]{0,8}".prop_map(Value::from).boxed();
    let or_any =
        |strategy: BoxedStrategy<Value>| prop_oneof![3 => strategy, 1 => any_json()].boxed();
    let part = or_any(object_of(vec![
        ("type", text()),
        ("text", or_any(text())),
        ("image_url", any_json()),
    ]));
    let content = or_any(
        prop_oneof![
            text(),
            proptest::collection::vec(part, 0..3).prop_map(Value::from)
        ]
        .boxed(),
    );
    let function = or_any(object_of(vec![("name", text()), ("arguments", any_json())]));
    let tool_call = or_any(object_of(vec![
        ("id", text()),
        ("function", function.clone()),
    ]));
    let message = or_any(object_of(vec![
        ("role", text()),
        ("name", text()),
        ("content", content),
        (
            "tool_calls",
            or_any(
                proptest::collection::vec(tool_call, 0..3)
                    .prop_map(Value::from)
                    .boxed(),
            ),
        ),
        ("function_call", function),
    ]));
    or_any(object_of(vec![
        ("model", text()),
        (
            "messages",
            or_any(
                proptest::collection::vec(message, 0..4)
                    .prop_map(Value::from)
                    .boxed(),
            ),
        ),
        (
            "prompt",
            or_any(
                prop_oneof![
                    text(),
                    proptest::collection::vec(any_json(), 0..3).prop_map(Value::from)
                ]
                .boxed(),
            ),
        ),
        (
            "tools",
            or_any(
                proptest::collection::vec(any_json(), 0..3)
                    .prop_map(Value::from)
                    .boxed(),
            ),
        ),
        ("max_tokens", any_json()),
        ("max_completion_tokens", any_json()),
        ("user", any_json()),
        ("metadata", any_json()),
        ("stop", any_json()),
    ]))
}

proptest::proptest! {
    #[test]
    fn the_one_pass_reader_agrees_with_a_json_tree(body in request_like()) {
        let bytes = serde_json::to_vec(&body).unwrap();
        let Ok(mut read) = prompt_texts(&bytes) else {
            proptest::prop_assert!(!body.is_object(), "an object the reader refused: {body}");
            return Ok(());
        };
        let mut tree = tree_prompt_texts(&bytes);
        // Every string, unknown key and number of the body is read, as prompt text or
        // elsewhere.
        let mut strings = Vec::new();
        every_scalar(&body, &mut strings, true);
        if body.is_object() {
            for string in strings {
                proptest::prop_assert!(
                    read.texts.iter().any(|text| text.contains(string.as_str()))
                        || read.elsewhere.contains(string.as_str()),
                    "{string:?} was not read"
                );
            }
        }
        // Object values come in key order from a tree and in document order from the
        // reader; the scan and the score do not depend on the order.
        read.texts.sort();
        tree.texts.sort();
        read.elsewhere.clear();
        proptest::prop_assert_eq!(read, tree);
    }
}

#[test]
fn strings_outside_the_prompt_are_read_elsewhere_and_not_scored() {
    let body = br#"{
        "model": "m", "user": "alice@example.com", "stop": ["078-05-1120"], "suffix": "tail",
        "metadata": {"customer 4111 1111 1111 1111": true},
        "messages": [{"role": "user", "name": "Bob", "content": "hello"}],
        "response_format": {"type": "json_schema", "json_schema": {"description": "secret plan"}}
    }"#;
    let read = prompt_texts(body).unwrap();
    assert_eq!(read.texts, ["hello"]);
    for expected in [
        "alice@example.com",
        "078-05-1120",
        "tail",
        "customer 4111 1111 1111 1111",
        "Bob",
        "secret plan",
    ] {
        assert!(
            read.elsewhere.lines().any(|line| line == expected),
            "missing {expected:?} in {:?}",
            read.elsewhere
        );
    }
}

#[test]
fn a_calls_arguments_are_also_read_as_the_strings_they_decode_to() {
    // Arguments as Python's `json.dumps` writes them: the card's no-break spaces escaped, so
    // the text as written reads `4111\u00a01111...`, which no recognizer takes for a card.
    let body = br#"{"messages": [{"role": "assistant", "content": null, "tool_calls": [
        {"id": "1", "type": "function", "function": {"name": "charge",
         "arguments": "{\"card\": \"4111\\u00a01111\\u00a01111\\u00a01111\", \"n\": 1}"}}]}]}"#;
    let read = prompt_texts(body).unwrap();
    assert_eq!(
        read.texts,
        [r#"{"card": "4111\u00a01111\u00a01111\u00a01111", "n": 1}"#]
    );
    for expected in ["card", "4111\u{a0}1111\u{a0}1111\u{a0}1111"] {
        assert!(
            read.elsewhere.lines().any(|line| line == expected),
            "missing {expected:?} in {:?}",
            read.elsewhere
        );
    }
}

#[test]
fn numbers_are_read_elsewhere_except_sampling_parameters() {
    // A card number can be a JSON number; a seed is a parameter (a random 16-digit seed
    // passes a card check one time in ten).
    let body = br#"{
        "model": "m", "seed": 4111111111111111, "temperature": 0, "max_tokens": 64, "n": 1,
        "metadata": {"card": 4111111111111111, "debt": -4012888888881881, "float": 5.5e15,
            "fraction": 1.5, "huge": 1e300},
        "user": 378282246310005,
        "messages": [{"role": "user", "content": "hello", "x": [6011111111111117]}],
        "tools": [{"type": "function", "function": {"parameters": {"maxLength": 12}}}],
        "prompt": [[15, 16]]
    }"#;
    let read = prompt_texts(body).unwrap();
    let lines: Vec<&str> = read.elsewhere.lines().collect();
    for expected in [
        "4111111111111111",
        "-4012888888881881",
        "5500000000000000",
        "378282246310005",
        "6011111111111117",
        "12",
        "15",
        "16",
    ] {
        assert!(
            lines.contains(&expected),
            "missing {expected:?} in {lines:?}"
        );
    }
    // The seed is a parameter; the metadata's card is read once.
    assert_eq!(
        lines
            .iter()
            .filter(|line| **line == "4111111111111111")
            .count(),
        1
    );
    for absent in ["64", "0", "1"] {
        assert!(!lines.contains(&absent), "{absent:?} read in {lines:?}");
    }
    assert!(!read.elsewhere.contains("1.5") && !read.elsewhere.contains("e300"));
    assert_eq!(read.max_tokens, Some(64));
}

#[test]
fn attachments_the_scan_cannot_read_are_named_by_kind() {
    let kinds = |body: &str| super::attachments(body.as_bytes());
    assert!(kinds(r#"{"messages": [{"role": "user", "content": "hi"}]}"#).is_empty());
    assert!(
        kinds(r#"{"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}"#)
            .is_empty()
    );
    assert_eq!(
        kinds(
            r#"{"messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "https://x/a.png"}},
                {"type": "input_audio", "input_audio": {"data": "UklG", "format": "wav"}}]},
              {"role": "user", "content": [{"type": "file", "file": {"file_data": "JVBE"}},
                {"type": "image_url", "image_url": {"url": "https://x/b.png"}},
                {"type": "video_url", "video_url": {"url": "https://x/c.mp4"}},
                {"type": "something_new"}, {"image_url": {"url": "https://x/untyped.png"}}]}]}"#
        ),
        ["audio", "file", "image", "video"]
    );
    // An escaped key is the same key.
    assert_eq!(
        kinds(
            r#"{"messages": [{"role": "user", "content": [{"\u0074ype": "image_url", "image_url": {"url": "u"}}]}]}"#
        ),
        ["image"]
    );
    // Every copy of a repeated key counts, the first as much as the last: a backend may
    // read either.
    assert_eq!(
        kinds(
            r#"{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}], "content": "hi"}]}"#
        ),
        ["image"]
    );
    assert_eq!(
        kinds(
            r#"{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}, "type": "text", "text": "hi"}]}]}"#
        ),
        ["image"]
    );
}

#[test]
fn token_id_prompts_and_inputs_are_named_as_tokens() {
    let kinds = |body: &str| super::attachments(body.as_bytes());
    for body in [
        r#"{"model": "m", "input": [[9906, 1917], [1234]]}"#,
        r#"{"model": "m", "input": [9906, 1917]}"#,
        r#"{"model": "m", "prompt": [15339, 1917]}"#,
        r#"{"model": "m", "prompt": [[15339], [1917, 11]]}"#,
        // Escaped keys are the same keys.
        r#"{"model": "m", "\u0069nput": [[9906]]}"#,
    ] {
        assert_eq!(kinds(body), ["tokens"], "{body}");
    }
    for body in [
        r#"{"model": "m", "input": "text"}"#,
        r#"{"model": "m", "input": ["text", "more"]}"#,
        r#"{"model": "m", "prompt": ["text"]}"#,
        r#"{"model": "m", "input": [{"role": "user", "content": "hi"}]}"#,
        r#"{"model": "m", "metadata": {"input": [1, 2]}}"#,
    ] {
        assert!(kinds(body).is_empty(), "{body}");
    }
    // With message parts the scan cannot read either: each kind once, sorted.
    assert_eq!(
        kinds(
            r#"{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]}],
                "prompt": [1, 2]}"#
        ),
        ["image", "tokens"]
    );
}

#[test]
fn every_spelling_of_an_operation_names_its_openai_path() {
    for (path, operation) in [
        ("/v1/chat/completions", None),
        ("/v1/chat/completions/", Some("/v1/chat/completions")),
        ("/openai/v1/completions", Some("/v1/completions")),
        (
            "/openai/deployments/gpt-4o/chat/completions",
            Some("/v1/chat/completions"),
        ),
        (
            "/openai/deployments/small/embeddings",
            Some("/v1/embeddings"),
        ),
        ("/openai/responses", Some("/v1/responses")),
        ("/v1/models", None),
        ("/openai/deployments/x/images/generations", None),
        ("/healthz", None),
    ] {
        assert_eq!(super::operation_path(path), operation, "{path}");
    }
}

/// Code in a conversation is prompt text to the firewall, also where it is read joined
/// across a seam: its query-language and script rules are for the body's other fields.
#[test]
fn code_read_across_a_seam_is_not_taken_for_an_attack() {
    let body = br#"{"model": "m", "messages": [
        {"role": "system", "content": "You are a coding assistant."},
        {"role": "user", "content": "Why does time.sleep(5) block asyncio?"}
    ]}"#;
    let texts = prompt_texts(body).unwrap();
    let waf = router_policies::waf::Waf::default();
    let inspect = |prompt_texts: &[String], other_text: &str| {
        router_policies::waf::inspect(
            &waf,
            &router_policies::waf::WafRequest {
                method: "POST",
                target: "/v1/chat/completions",
                headers: &[],
                prompt_texts,
                other_text,
                caller: None,
            },
        )
        .matches
    };
    let seam = texts.joined.first().expect("a seam").clone();
    assert!(seam.contains("sleep(5)"), "{seam}");
    // Read as one of the other fields, the seam would trip a query-language rule.
    assert!(!inspect(&[], &seam).is_empty());
    let every_text: Vec<String> = texts.texts.iter().chain(&texts.joined).cloned().collect();
    let matches = inspect(&every_text, &texts.elsewhere);
    assert!(matches.is_empty(), "{matches:?}");
}

#[test]
fn a_sensitive_classification_wins_wherever_it_is_given() {
    let policy = crate::config::PolicyConfig {
        sensitive_classifications: vec!["confidential".to_owned()],
        classification_header: "x-data-classification".to_owned(),
        caller_classifications: [("hr-portal".to_owned(), "Confidential".to_owned())]
            .into_iter()
            .collect(),
        ..crate::config::PolicyConfig::default()
    };
    let label = |headers: &[(&str, &str)], caller: Option<&str>| {
        let request = RequestView {
            path: "/v1/chat/completions",
            target: "/v1/chat/completions",
            method: "POST",
            headers,
            caller,
            model: None,
            body: b"{}",
        };
        super::classification_of(&request, &policy)
    };
    let header = "x-data-classification";
    assert_eq!(
        label(&[(header, "Public")], None).as_deref(),
        Some("public")
    );
    // A later copy, or a later entry of one copy, that is sensitive is not hidden.
    assert_eq!(
        label(&[(header, "public"), (header, "confidential")], None).as_deref(),
        Some("confidential")
    );
    assert_eq!(
        label(&[(header, "public, Confidential")], None).as_deref(),
        Some("confidential")
    );
    // The operator's default for a caller is a floor the caller's header cannot lower.
    assert_eq!(
        label(&[(header, "public")], Some("hr-portal")).as_deref(),
        Some("confidential")
    );
    assert_eq!(
        label(&[(header, "")], Some("hr-portal")).as_deref(),
        Some("confidential")
    );
    assert_eq!(label(&[], Some("other")), None);
}
