use proptest::prelude::*;
use serde_json::Value;

use super::{CallReader, Piece, compact_json};

/// What a reader gave out for an answer fed in `parts`: the text, and each call's name and
/// arguments joined.
fn read_calls(parts: &[&str]) -> (String, Vec<(String, String)>) {
    let mut reader = CallReader::default();
    let mut text = String::new();
    let mut calls: Vec<(String, String)> = Vec::new();
    for part in parts {
        for piece in reader.push(part) {
            match piece {
                Piece::Text(more) => text.push_str(&more),
                Piece::Call { at, name } => {
                    assert_eq!(at, calls.len(), "calls out of order");
                    calls.push((name, String::new()));
                }
                Piece::Arguments { at, text: more } => {
                    assert_eq!(at + 1, calls.len(), "arguments of another call");
                    calls[at].1.push_str(&more);
                }
            }
        }
    }
    (text, calls)
}

/// [`read_calls`] for an answer with at most one call.
fn read(parts: &[&str]) -> (String, Option<String>, String) {
    let (text, mut calls) = read_calls(parts);
    assert!(calls.len() <= 1, "{calls:?}");
    match calls.pop() {
        Some((name, arguments)) => (text, Some(name), arguments),
        None => (text, None, String::new()),
    }
}

/// Every way of cutting `answer` in two at a character boundary, and one character at a time.
fn splits(answer: &str) -> Vec<Vec<&str>> {
    let mut all: Vec<Vec<&str>> = answer
        .char_indices()
        .map(|(at, _)| vec![&answer[..at], &answer[at..]])
        .collect();
    let mut singles = Vec::new();
    let mut rest = answer;
    while let Some(first) = rest.chars().next() {
        singles.push(&rest[..first.len_utf8()]);
        rest = &rest[first.len_utf8()..];
    }
    all.push(singles);
    all
}

#[test]
fn a_call_is_read_whole_however_its_text_arrives() {
    for answer in [
        r#"{"name": "get_weather", "arguments": {"city": "Oslo \"Nord\"", "days": [1, 2]}}"#,
        "{\n  \"name\" : \"get_weather\" ,\n  \"arguments\" : { \"city\" : \"Bergen\" }\n}",
        r#"{"arguments": {"zone": "CET"}, "name": "get_time"}"#,
        r#"{"name":"f","arguments":12}"#,
        r#"{"name":"f","arguments":"x, y}"}"#,
        r#"{"name":"f","arguments":true }"#,
        r#"{"name":"f","arguments":{"a":{"b":[{}]},"c":"é\\u00e9 "}}"#,
    ] {
        let whole: Value = serde_json::from_str(answer).unwrap();
        for parts in splits(answer) {
            let (text, name, arguments) = read(&parts);
            assert_eq!(text, "", "{answer}");
            assert_eq!(
                name.as_deref(),
                whole["name"].as_str(),
                "{answer} as {parts:?}"
            );
            let read_arguments: Value = serde_json::from_str(&arguments)
                .unwrap_or_else(|error| panic!("{arguments:?}: {error} ({answer} as {parts:?})"));
            assert_eq!(read_arguments, whole["arguments"], "{answer} as {parts:?}");
            assert!(!arguments.contains(": "), "not compact: {arguments}");
        }
    }
}

#[test]
fn an_answer_without_a_call_is_read_as_text_however_it_arrives() {
    for answer in [
        r#"{"response": "Hello!"}"#,
        "{ \"response\" :\n \"Line one\\nline \\\"two\\\" \\u00e9 \\ud83d\\ude00 \\\\ end\" }",
        r#"{"response": ""}"#,
    ] {
        let whole: Value = serde_json::from_str(answer).unwrap();
        for parts in splits(answer) {
            let mut reader = CallReader::default();
            let mut text = String::new();
            for part in &parts {
                for piece in reader.push(part) {
                    match piece {
                        Piece::Text(more) => text.push_str(&more),
                        other => panic!("{other:?} in {answer}"),
                    }
                }
            }
            assert_eq!(
                text,
                whole["response"].as_str().unwrap(),
                "{answer} as {parts:?}"
            );
            assert!(!reader.called());
            assert_eq!(reader.texted(), !text.is_empty());
        }
    }
}

#[test]
fn a_structured_response_is_read_as_its_json_text_however_it_arrives() {
    // The `response` of a request with tools and a response_format: JSON, not a string.
    for answer in [
        r#"{"response": {"city": "Oslo", "days": [1, 2], "note": "a \"b\" }"}}"#,
        "{ \"response\" : [ {\"a\": 1}, \"x, y}\" ] }",
        r#"{"response":{}}"#,
        // Whatever JSON the format's schema allows.
        r#"{"response": 5}"#,
    ] {
        let whole: Value = serde_json::from_str(answer).unwrap();
        for parts in splits(answer) {
            let (text, name, _) = read(&parts);
            assert_eq!(name, None, "{answer}");
            let read: Value = serde_json::from_str(&text)
                .unwrap_or_else(|error| panic!("{text:?}: {error} ({answer} as {parts:?})"));
            assert_eq!(read, whole["response"], "{answer} as {parts:?}");
        }
    }
}

#[test]
fn text_goes_out_as_it_arrives_and_escapes_once_whole() {
    let mut reader = CallReader::default();
    assert_eq!(
        reader.push(r#"{"response": "Hel"#),
        [Piece::Text("Hel".into())]
    );
    assert_eq!(reader.push("lo \\"), [Piece::Text("lo ".into())]);
    assert_eq!(reader.push("u00"), []);
    assert_eq!(reader.push("e9\\ud83d"), [Piece::Text("é".into())]);
    assert_eq!(reader.push("\\ude00\"}"), [Piece::Text("😀".into())]);
    let mut reader = CallReader::default();
    assert_eq!(reader.push(r#"{"name": "get_"#), []);
    assert_eq!(
        reader.push(r#"time", "arguments": {"zo"#),
        [
            Piece::Call {
                at: 0,
                name: "get_time".into()
            },
            Piece::Arguments {
                at: 0,
                text: "{\"zo".into()
            }
        ]
    );
    assert!(reader.called());
    assert_eq!(
        reader.push("ne\": \"CET\"}}"),
        [Piece::Arguments {
            at: 0,
            text: "ne\":\"CET\"}".into()
        }]
    );
}

#[test]
fn several_calls_are_read_in_order_however_they_arrive() {
    let answer = concat!(
        "{\"tool_calls\": [\n {\"name\": \"get_time\", \"arguments\": {\"zone\": \"UTC\"}},\n ",
        "{\"arguments\": {\"city\": \"Oslo, \\\"N\\\"\"}, \"name\": \"get_weather\"} ]}"
    );
    let whole: Value = serde_json::from_str(answer).unwrap();
    for parts in splits(answer) {
        let (text, calls) = read_calls(&parts);
        assert_eq!(text, "");
        assert_eq!(calls.len(), 2, "{parts:?}");
        for (read, written) in calls.iter().zip(whole["tool_calls"].as_array().unwrap()) {
            assert_eq!(read.0, written["name"].as_str().unwrap());
            assert_eq!(
                serde_json::from_str::<Value>(&read.1).unwrap(),
                written["arguments"]
            );
        }
    }
    // A list inside a call, or text beside the list, is not the shape.
    for answer in [
        r#"{"tool_calls": [{"tool_calls": []}]}"#,
        r#"{"tool_calls": [{"response": "x"}]}"#,
    ] {
        let (text, calls) = read_calls(&[answer]);
        assert!(text.is_empty() && calls.is_empty(), "{answer}");
    }
}

#[test]
fn another_shape_stops_the_reader_without_a_piece() {
    for answer in [
        "[1, 2]",
        r#"{"other": 1}"#,
        "plain text",
        r#"{"response": "a\q"}"#,
        // A lone high surrogate, then characters of several bytes where its low half
        // would be: invalid JSON, and no byte offset in them may be sliced.
        r#"{"response": "a\ud83d中文字"}"#,
        r#"{"response": "a\ud83daé xyz"}"#,
    ] {
        for parts in splits(answer) {
            let mut reader = CallReader::default();
            let pieces: Vec<Piece> = parts.iter().flat_map(|part| reader.push(part)).collect();
            assert!(
                pieces
                    .iter()
                    .all(|piece| matches!(piece, Piece::Text(text) if text == "a")),
                "{answer}: {pieces:?}"
            );
            assert!(!reader.called());
        }
    }
}

#[test]
fn compact_json_drops_only_the_space_between_tokens() {
    assert_eq!(
        compact_json("{ \"a b\" : [ 1 , \"c \\\" d\" ] ,\n\"e\":{} }"),
        r#"{"a b":[1,"c \" d"],"e":{}}"#
    );
}

proptest! {
    /// Any text, written as the `response` string by a JSON serializer and cut anywhere, is
    /// read back exactly.
    #[test]
    fn any_response_text_is_read_back(text in "\\PC*|[\\x00-\\x1f\"\\\\/é😀]*", cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..6)) {
        let answer = format!("{{\"response\": {}}}", serde_json::to_string(&text).unwrap());
        let mut bounds: Vec<usize> = cuts
            .iter()
            .map(|cut| cut.index(answer.len() + 1))
            .filter(|&at| answer.is_char_boundary(at))
            .collect();
        bounds.push(0);
        bounds.push(answer.len());
        bounds.sort_unstable();
        bounds.dedup();
        let parts: Vec<&str> = bounds.windows(2).map(|pair| &answer[pair[0]..pair[1]]).collect();
        let (read_text, name, arguments) = read(&parts);
        prop_assert_eq!(read_text, text);
        prop_assert!(name.is_none() && arguments.is_empty());
    }

    /// Any arguments object, written with or without spaces and cut anywhere, is read back
    /// as the same JSON, compact.
    #[test]
    fn any_arguments_are_read_back(
        keys in proptest::collection::vec("[a-z \"\\\\]{0,6}", 0..4),
        values in proptest::collection::vec(any::<i32>(), 4),
        pretty in any::<bool>(),
        cut in any::<prop::sample::Index>(),
    ) {
        let arguments: serde_json::Map<String, Value> = keys
            .iter()
            .zip(&values)
            .map(|(key, value)| (key.clone(), Value::from(*value)))
            .collect();
        let arguments = Value::Object(arguments);
        let answer = serde_json::json!({"name": "f", "arguments": arguments});
        let answer = if pretty {
            serde_json::to_string_pretty(&answer).unwrap()
        } else {
            answer.to_string()
        };
        let mut at = cut.index(answer.len() + 1);
        while !answer.is_char_boundary(at) {
            at -= 1;
        }
        let (text, name, read_arguments) = read(&[&answer[..at], &answer[at..]]);
        prop_assert_eq!(text, "");
        prop_assert_eq!(name.as_deref(), Some("f"));
        prop_assert_eq!(serde_json::from_str::<Value>(&read_arguments).unwrap(), arguments);
    }
}
