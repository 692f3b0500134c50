use serde_json::{Value, json};

use super::*;

/// The chat body's bytes of a Responses request's bytes.
fn translate_bytes(body: &[u8]) -> Result<(Vec<u8>, Transcoder), GatewayError> {
    let translated = to_chat(body, "r1", 1_700_000_000, None)?;
    Ok((translated.chat_body, translated.transcoder))
}

fn translate(request: &Value) -> Result<(Value, Transcoder), GatewayError> {
    let translated = to_chat(
        &serde_json::to_vec(request).unwrap(),
        "r1",
        1_700_000_000,
        None,
    )?;
    Ok((
        serde_json::from_slice(&translated.chat_body).unwrap(),
        translated.transcoder,
    ))
}

fn param(error: &GatewayError) -> Option<String> {
    serde_json::to_value(error.body()).unwrap()["error"]["param"]
        .as_str()
        .map(str::to_owned)
}

/// The events of a Responses stream: (type, data).
fn parse_events(bytes: &[u8]) -> Vec<(String, Value)> {
    let text = std::str::from_utf8(bytes).unwrap();
    text.split("\n\n")
        .filter(|event| !event.is_empty())
        .map(|event| {
            let mut lines = event.lines();
            let kind = lines.next().unwrap().strip_prefix("event: ").unwrap();
            let data: Value =
                serde_json::from_str(lines.next().unwrap().strip_prefix("data: ").unwrap())
                    .unwrap();
            assert_eq!(data["type"], kind, "the event line names the data's type");
            (kind.to_owned(), data)
        })
        .collect()
}

/// The event types, in order.
fn kinds(events: &[(String, Value)]) -> Vec<&str> {
    events.iter().map(|(kind, _)| kind.as_str()).collect()
}

fn sse(chunks: &[Value]) -> Vec<u8> {
    let mut out = Vec::new();
    for chunk in chunks {
        out.extend_from_slice(&crate::openai::sse_event(chunk));
    }
    out.extend_from_slice(crate::openai::SSE_DONE);
    out
}

/// The events of a streamed answer of two text deltas.
const TEXT_STREAM_EVENTS: [&str; 10] = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
    "response.output_text.delta",
    "response.output_text.delta",
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
    "response.completed",
];

fn chunk(delta: Value, finish: Option<&str>) -> Value {
    json!({"id": "chatcmpl-r1", "object": "chat.completion.chunk", "model": "smollm2",
           "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
}

#[test]
fn instructions_and_a_string_input_are_a_system_and_a_user_message() {
    let (chat, _) = translate(&json!({
        "model": "smollm2", "instructions": "Be brief.", "input": "Capital of France?",
        "max_output_tokens": 16, "temperature": 0, "stream": true,
        "metadata": {"team": "a"}, "store": true,
    }))
    .unwrap();
    assert_eq!(
        chat,
        json!({
            "model": "smollm2", "stream": true, "stream_options": {"include_usage": true},
            "messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": "Capital of France?"}],
            "max_completion_tokens": 16, "temperature": 0,
        })
    );
}

#[test]
fn input_items_become_the_conversation_with_calls_and_their_outputs() {
    let (chat, _) = translate(&json!({
        "model": "m",
        "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "Weather in Paris and Lyon?"}]},
            {"type": "function_call", "call_id": "c1", "name": "weather", "arguments": "{\"city\":\"Paris\"}"},
            {"type": "function_call", "call_id": "c2", "name": "weather", "arguments": "{\"city\":\"Lyon\"}"},
            {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
            {"type": "function_call_output", "call_id": "c2", "output": "rain"},
            {"type": "reasoning", "id": "rs_1", "summary": []},
            {"type": "message", "role": "assistant",
             "content": [{"type": "output_text", "text": "Paris is sunny.", "annotations": []}]},
            {"role": "developer", "content": "Answer in French."},
        ],
    }))
    .unwrap();
    assert_eq!(
        chat["messages"],
        json!([
            {"role": "user", "content": [{"type": "text", "text": "Weather in Paris and Lyon?"}]},
            {"role": "assistant", "content": null, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": "{\"city\":\"Paris\"}"}},
                {"id": "c2", "type": "function", "function": {"name": "weather", "arguments": "{\"city\":\"Lyon\"}"}},
            ]},
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
            {"role": "tool", "tool_call_id": "c2", "content": "rain"},
            {"role": "assistant", "content": [{"type": "text", "text": "Paris is sunny."}]},
            {"role": "developer", "content": "Answer in French."},
        ])
    );
}

#[test]
fn function_tools_choices_and_text_formats_become_their_chat_forms() {
    let (chat, _) = translate(&json!({
        "model": "m", "input": "x",
        "tools": [{"type": "function", "name": "record_city", "description": "d",
                   "parameters": {"type": "object"}, "strict": true}],
        "tool_choice": {"type": "function", "name": "record_city"},
        "text": {"format": {"type": "json_schema", "name": "city", "schema": {"type": "object"}, "strict": true}},
        "reasoning": {"effort": "low"},
        "parallel_tool_calls": false,
    }))
    .unwrap();
    assert_eq!(
        chat["tools"],
        json!([{"type": "function", "function": {"name": "record_city", "description": "d",
                "parameters": {"type": "object"}, "strict": true}}])
    );
    assert_eq!(
        chat["tool_choice"],
        json!({"type": "function", "function": {"name": "record_city"}})
    );
    assert_eq!(
        chat["response_format"],
        json!({"type": "json_schema", "json_schema": {"name": "city", "schema": {"type": "object"}, "strict": true}})
    );
    assert_eq!(chat["reasoning_effort"], "low");
    assert_eq!(chat["parallel_tool_calls"], false);
    let (chat, _) =
        translate(&json!({"model": "m", "input": "x", "text": {"format": {"type": "text"}}}))
            .unwrap();
    assert!(chat.get("response_format").is_none(), "{chat}");

    // Extensions of neither API go on; chat fields that would reshape the answer do not.
    let (chat, _) = translate(&json!({
        "model": "m", "input": "x", "ignore_eos": true, "top_k": 5,
        "messages": [{"role": "user", "content": "smuggled"}], "n": 3, "max_tokens": 9,
        "response_format": {"type": "json_object"}, "logprobs": true,
    }))
    .unwrap();
    assert_eq!(
        chat,
        json!({"model": "m", "stream": false, "ignore_eos": true, "top_k": 5,
               "messages": [{"role": "user", "content": "x"}]})
    );
}

#[test]
fn what_needs_stored_state_or_built_in_tools_is_refused_by_param() {
    let cases = [
        (
            json!({"model": "m", "input": "x", "previous_response_id": "resp_1"}),
            "previous_response_id",
            true,
        ),
        (
            json!({"model": "m", "input": "x", "conversation": "conv_1"}),
            "conversation",
            true,
        ),
        (
            json!({"model": "m", "input": "x", "background": true}),
            "background",
            true,
        ),
        (
            json!({"model": "m", "input": "x", "include": ["file_search_call.results"]}),
            "include",
            true,
        ),
        (
            json!({"model": "m", "input": "x", "tools": [{"type": "web_search"}]}),
            "tools[0].type",
            true,
        ),
        (
            json!({"model": "m", "input": "x", "tool_choice": {"type": "file_search"}}),
            "tool_choice.type",
            true,
        ),
        (
            json!({"model": "m", "input": [{"type": "item_reference", "id": "msg_1"}]}),
            "input[0].type",
            true,
        ),
        (
            json!({"model": "m", "input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]}),
            "input[0].content[0].type",
            true,
        ),
        (json!({"model": "m"}), "input", false),
        (json!({"model": "m", "input": 7}), "input", false),
        (
            json!({"model": "m", "input": [{"role": "critic", "content": "x"}]}),
            "input[0].role",
            false,
        ),
        (
            json!({"model": "m", "input": [{"type": "function_call_output", "output": "x"}]}),
            "input[0].call_id",
            false,
        ),
        (
            json!({"model": "m", "input": "x", "text": {"format": {"type": "yaml"}}}),
            "text.format.type",
            false,
        ),
        (
            json!({"model": "m", "input": "x", "stream": "yes"}),
            "stream",
            false,
        ),
    ];
    for (request, expected, unsupported) in cases {
        let error = translate(&request).expect_err(&request.to_string());
        assert_eq!(
            param(&error).as_deref(),
            Some(expected),
            "{request}: {error}"
        );
        assert_eq!(
            matches!(error, GatewayError::UnsupportedParameter { .. }),
            unsupported,
            "{request}: {error:?}"
        );
    }
    assert!(matches!(
        to_chat(b"[1]", "r", 0, None).unwrap_err(),
        GatewayError::InvalidJson { .. }
    ));
}

#[test]
fn a_chat_completion_becomes_a_response_object() {
    let (_, mut transcoder) = translate(&json!({
        "model": "smollm2", "input": "x", "instructions": "Be brief.", "max_output_tokens": 16,
    }))
    .unwrap();
    let chat = json!({
        "id": "chatcmpl-r1", "object": "chat.completion", "created": 1, "model": "smollm2",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Paris."},
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 20, "completion_tokens": 3, "total_tokens": 23,
                  "prompt_tokens_details": {"cached_tokens": 16}},
    });
    let response: Value =
        serde_json::from_slice(&transcoder.json(&serde_json::to_vec(&chat).unwrap())).unwrap();
    assert_eq!(response["id"], "resp_r1");
    assert_eq!(response["object"], "response");
    assert_eq!(response["status"], "completed");
    assert_eq!(response["instructions"], "Be brief.");
    assert_eq!(response["max_output_tokens"], 16);
    assert_eq!(response["store"], false);
    assert_eq!(
        response["output"],
        json!([{"id": "msg_r1", "type": "message", "status": "completed", "role": "assistant",
                "content": [{"type": "output_text", "text": "Paris.", "annotations": [], "logprobs": []}]}])
    );
    assert_eq!(
        response["usage"],
        json!({"input_tokens": 20, "input_tokens_details": {"cached_tokens": 16},
               "output_tokens": 3, "output_tokens_details": {"reasoning_tokens": 0},
               "total_tokens": 23})
    );
}

#[test]
fn calls_and_cut_off_answers_keep_their_meaning() {
    let (_, mut transcoder) = translate(&json!({"model": "m", "input": "x"})).unwrap();
    let called = json!({"model": "m", "choices": [{"index": 0, "finish_reason": "tool_calls",
        "message": {"role": "assistant", "content": null, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{\"a\":1}"}}]}}]});
    let response: Value =
        serde_json::from_slice(&transcoder.json(&serde_json::to_vec(&called).unwrap())).unwrap();
    assert_eq!(response["status"], "completed");
    assert_eq!(
        response["output"],
        json!([{"id": "fc_r1_0", "type": "function_call", "status": "completed",
                "call_id": "call_1", "name": "f", "arguments": "{\"a\":1}"}])
    );

    let (_, mut transcoder) = translate(&json!({"model": "m", "input": "x"})).unwrap();
    let cut = json!({"model": "m", "choices": [{"index": 0, "finish_reason": "length",
        "message": {"role": "assistant", "content": "Par"}}]});
    let response: Value =
        serde_json::from_slice(&transcoder.json(&serde_json::to_vec(&cut).unwrap())).unwrap();
    assert_eq!(response["status"], "incomplete");
    assert_eq!(
        response["incomplete_details"],
        json!({"reason": "max_output_tokens"})
    );
    assert_eq!(response["output"][0]["status"], "incomplete");

    // An error body is the same in both APIs: it passes unchanged.
    let error =
        br#"{"error":{"message":"m","type":"invalid_request_error","param":null,"code":null}}"#;
    assert_eq!(transcoder.json(error), error.to_vec());
}

#[test]
fn a_chat_stream_becomes_the_responses_events_in_order() {
    let (_, mut transcoder) =
        translate(&json!({"model": "smollm2", "input": "x", "stream": true})).unwrap();
    let bytes = sse(&[
        chunk(json!({"role": "assistant", "content": ""}), None),
        chunk(json!({"content": "Par"}), None),
        chunk(json!({"content": "is."}), None),
        chunk(json!({}), Some("stop")),
        json!({"id": "chatcmpl-r1", "model": "smollm2", "choices": [],
               "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}}),
    ]);
    // Written in pieces that cut events apart: what comes out does not depend on it.
    let mut out = Vec::new();
    for piece in bytes.chunks(7) {
        out.extend(transcoder.stream(piece));
    }
    let events = parse_events(&out);
    assert_eq!(kinds(&events), TEXT_STREAM_EVENTS);
    for (number, (_, data)) in events.iter().enumerate() {
        assert_eq!(data["sequence_number"], number as u64);
    }
    assert_eq!(events[4].1["delta"], "Par");
    assert_eq!(events[6].1["text"], "Paris.");
    let completed = &events[9].1["response"];
    assert_eq!(completed["status"], "completed");
    assert_eq!(completed["output"][0]["content"][0]["text"], "Paris.");
    assert_eq!(completed["usage"]["output_tokens"], 2);
    assert_eq!(events[0].1["response"]["status"], "in_progress");
    assert!(events[0].1["response"]["usage"].is_null());
}

#[test]
fn a_backends_crlf_events_and_multi_line_data_are_read_as_events() {
    // A cloud backend's bytes reach the transcoder as it wrote them: `\r\n` line ends
    // (sse-starlette's default) and, as the SSE format allows, one JSON value over several
    // `data:` lines.
    let lf = sse(&[
        chunk(json!({"role": "assistant", "content": ""}), None),
        chunk(json!({"content": "Par"}), None),
        chunk(json!({"content": "is."}), None),
        chunk(json!({}), Some("stop")),
    ]);
    let text = String::from_utf8(lf).unwrap();
    let crlf = text.replace('\n', "\r\n");
    let multi_line = text.replacen("\"choices\"", "\ndata: \"choices\"", 2);
    for bytes in [crlf, multi_line] {
        let (_, mut transcoder) =
            translate(&json!({"model": "smollm2", "input": "x", "stream": true})).unwrap();
        let mut out = Vec::new();
        for piece in bytes.as_bytes().chunks(5) {
            out.extend(transcoder.stream(piece));
        }
        let events = parse_events(&out);
        assert_eq!(kinds(&events), TEXT_STREAM_EVENTS, "{bytes:?}");
        assert_eq!(
            events[9].1["response"]["output"][0]["content"][0]["text"],
            "Paris."
        );
    }
}

#[test]
fn a_streamed_call_and_a_streamed_error_become_their_events() {
    let (_, mut transcoder) =
        translate(&json!({"model": "m", "input": "x", "stream": true})).unwrap();
    let out = transcoder.stream(&sse(&[
        chunk(json!({"role": "assistant", "content": ""}), None),
        chunk(
            json!({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                      "function": {"name": "f", "arguments": ""}}]}),
            None,
        ),
        chunk(
            json!({"tool_calls": [{"index": 0, "function": {"arguments": "{\"a\""}}]}),
            None,
        ),
        chunk(
            json!({"tool_calls": [{"index": 0, "function": {"arguments": ":1}"}}]}),
            None,
        ),
        chunk(json!({}), Some("tool_calls")),
    ]));
    let events = parse_events(&out);
    assert_eq!(
        kinds(&events),
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.function_call_arguments.delta",
            "response.function_call_arguments.delta",
            "response.function_call_arguments.done",
            "response.output_item.done",
            "response.completed",
        ]
    );
    assert_eq!(events[2].1["item"]["call_id"], "call_1");
    assert_eq!(events[5].1["arguments"], "{\"a\":1}");
    assert_eq!(
        events[7].1["response"]["output"][0]["arguments"],
        "{\"a\":1}"
    );

    let (_, mut transcoder) =
        translate(&json!({"model": "m", "input": "x", "stream": true})).unwrap();
    let failed = transcoder.stream(&crate::openai::sse_event(&json!({"error": {
        "message": "the queue timed out", "type": "server_error", "param": null, "code": "timeout"}})));
    let mut failed = failed.to_vec();
    failed.extend(transcoder.stream(crate::openai::SSE_DONE));
    let events = parse_events(&failed);
    // The response opens first, even when the error comes before any token; then the end.
    assert_eq!(
        kinds(&events),
        [
            "response.created",
            "response.in_progress",
            "error",
            "response.failed"
        ]
    );
    assert_eq!(events[2].1["code"], "timeout");
    assert_eq!(events[2].1["message"], "the queue timed out");
    let response = &events[3].1["response"];
    assert_eq!(response["status"], "failed");
    assert_eq!(response["error"]["code"], "timeout");
}

#[test]
fn each_item_is_closed_before_the_next_opens() {
    let (_, mut transcoder) =
        translate(&json!({"model": "m", "input": "x", "stream": true})).unwrap();
    let out = transcoder.stream(&sse(&[
        chunk(
            json!({"role": "assistant", "content": "Let me look."}),
            None,
        ),
        chunk(
            json!({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                      "function": {"name": "f", "arguments": "{}"}}]}),
            None,
        ),
        chunk(json!({}), Some("tool_calls")),
    ]));
    let events = parse_events(&out);
    assert_eq!(
        kinds(&events),
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added",
            "response.output_text.delta",
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.output_item.added",
            "response.function_call_arguments.delta",
            "response.function_call_arguments.done",
            "response.output_item.done",
            "response.completed",
        ]
    );
    let numbers: Vec<u64> = events
        .iter()
        .map(|(_, data)| data["sequence_number"].as_u64().unwrap())
        .collect();
    assert_eq!(numbers, (0..13).collect::<Vec<u64>>());
    assert_eq!(events[7].1["item"]["content"][0]["text"], "Let me look.");
    assert_eq!(events[8].1["output_index"], 1);
}

#[test]
fn a_refusal_is_a_refusal_part_whole_and_streamed() {
    let (_, mut transcoder) = translate(&json!({"model": "m", "input": "x"})).unwrap();
    let answer = json!({"id": "chatcmpl-r1", "object": "chat.completion", "model": "m",
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": null,
                                 "refusal": "I can't help with that."}}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 6, "total_tokens": 9}});
    let response: Value =
        serde_json::from_slice(&transcoder.json(answer.to_string().as_bytes())).unwrap();
    assert_eq!(
        response["output"][0]["content"][0],
        json!({"type": "refusal", "refusal": "I can't help with that."})
    );
    assert_eq!(response["status"], "completed");

    let (_, mut transcoder) =
        translate(&json!({"model": "m", "input": "x", "stream": true})).unwrap();
    let out = transcoder.stream(&sse(&[
        chunk(json!({"role": "assistant", "refusal": "I can't"}), None),
        chunk(json!({"refusal": " help."}), None),
        chunk(json!({}), Some("stop")),
    ]));
    let events = parse_events(&out);
    assert_eq!(
        kinds(&events),
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added",
            "response.refusal.delta",
            "response.refusal.delta",
            "response.refusal.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.completed",
        ]
    );
    assert_eq!(
        events[3].1["part"],
        json!({"type": "refusal", "refusal": ""})
    );
    assert_eq!(events[6].1["refusal"], "I can't help.");
    assert_eq!(
        events[9].1["response"]["output"][0]["content"][0]["refusal"],
        "I can't help."
    );
}

#[test]
fn a_stream_that_stops_without_done_still_ends_the_response() {
    // Cut off before any finish reason: failed, with an error event.
    let (_, mut transcoder) =
        translate(&json!({"model": "m", "input": "x", "stream": true})).unwrap();
    let mut out = transcoder.stream(&crate::openai::sse_event(&chunk(
        json!({"role": "assistant", "content": "Par"}),
        None,
    )));
    out.extend(transcoder.end());
    let events = parse_events(&out);
    let ended = kinds(&events);
    assert_eq!(ended[ended.len() - 2..], ["error", "response.failed"]);
    // A finish reason came but no `[DONE]`: the response completes as `[DONE]` would end it.
    let (_, mut transcoder) =
        translate(&json!({"model": "m", "input": "x", "stream": true})).unwrap();
    let mut out = transcoder.stream(&crate::openai::sse_event(&chunk(
        json!({"role": "assistant", "content": "Paris."}),
        Some("stop"),
    )));
    out.extend(transcoder.end());
    let events = parse_events(&out);
    assert_eq!(
        kinds(&events),
        TEXT_STREAM_EVENTS[..4]
            .iter()
            .chain(&TEXT_STREAM_EVENTS[5..])
            .copied()
            .collect::<Vec<_>>()
    );
    // Once ended, ending again adds nothing.
    assert!(transcoder.end().is_empty());
}

/// Every string of the values a chat body is made of.
fn strings(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::String(text) => out.push(text.clone()),
        Value::Array(items) => items.iter().for_each(|item| strings(item, out)),
        Value::Object(fields) => fields.values().for_each(|field| strings(field, out)),
        _ => {}
    }
}

mod properties {
    use proptest::prelude::*;
    use serde_json::{Value, json};

    use super::{strings, translate};

    /// A text that may hide anything, JSON's own characters and escapes among it.
    fn text() -> impl Strategy<Value = String> {
        "[ -~\u{e9}\u{4e2d}\\n\"\\\\]{0,24}"
    }

    /// An input item whose texts are the second value.
    fn item() -> impl Strategy<Value = (Value, Vec<String>)> {
        prop_oneof![
            (
                prop_oneof![Just("user"), Just("assistant"), Just("system"), Just("developer")],
                text()
            )
                .prop_map(|(role, text)| (json!({"role": role, "content": text}), vec![text])),
            (text(), text()).prop_map(|(first, second)| (
                json!({"type": "message", "role": "user", "content": [
                    {"type": "input_text", "text": first}, {"type": "output_text", "text": second}]}),
                vec![first, second]
            )),
            (text(), text(), text()).prop_map(|(id, name, arguments)| (
                json!({"type": "function_call", "call_id": id, "name": name, "arguments": arguments}),
                vec![name, arguments]
            )),
            (text(), text()).prop_map(|(id, output)| (
                json!({"type": "function_call_output", "call_id": id, "output": output}),
                vec![output]
            )),
        ]
    }

    proptest! {
        /// Whatever a backend streams, in whatever pieces, the transcoding neither panics
        /// nor numbers two events alike.
        #[test]
        fn any_stream_transcodes_without_panic(
            pieces in proptest::collection::vec(
                prop_oneof![
                    Just(b"data: [DONE]\n\n".to_vec()),
                    Just(br#"data: {"choices":[{"delta":{"content":"x"}}]}"#.to_vec()),
                    Just(br#"data: {"choices":[{"delta":{"tool_calls":[{"index":1,"function":{"arguments":"{"}}]}}]}"#.to_vec()),
                    Just(br#"data: {"error":{"message":"m"}}"#.to_vec()),
                    Just(b"\n\n".to_vec()),
                    proptest::collection::vec(any::<u8>(), 0..16),
                ],
                0..24,
            ),
        ) {
            let (_, mut transcoder) = translate(&json!({"model": "m", "input": "x", "stream": true})).unwrap();
            let mut out = Vec::new();
            for piece in pieces {
                out.extend(transcoder.stream(&piece));
            }
            let text = String::from_utf8_lossy(&out);
            let numbers: Vec<u64> = text
                .lines()
                .filter_map(|line| line.strip_prefix("data: "))
                .filter_map(|data| serde_json::from_str::<Value>(data).ok())
                .filter_map(|event| event["sequence_number"].as_u64())
                .collect();
            prop_assert_eq!(numbers.clone(), (0..numbers.len() as u64).collect::<Vec<_>>());
        }

        /// What the policy scans is the translated body, and what runs is that body: every
        /// text a Responses request carries for the model is in it, verbatim.
        #[test]
        fn every_text_for_the_model_reaches_the_translated_body(
            instructions in proptest::option::of(text()),
            items in proptest::collection::vec(item(), 1..6),
            description in text(),
        ) {
            let mut request = json!({
                "model": "m",
                "input": items.iter().map(|(item, _)| item.clone()).collect::<Vec<_>>(),
                "tools": [{"type": "function", "name": "f", "description": description}],
            });
            let mut expected: Vec<String> = items.into_iter().flat_map(|(_, texts)| texts).collect();
            expected.push(description);
            if let Some(instructions) = instructions {
                request["instructions"] = json!(instructions);
                expected.push(instructions);
            }
            let (chat, _) = translate(&request).unwrap();
            let mut found = Vec::new();
            strings(&chat, &mut found);
            for text in expected {
                prop_assert!(found.contains(&text), "{text:?} missing from {chat}");
            }
        }
    }
}

#[test]
fn a_continuation_reads_the_stored_conversation_before_its_own_input() {
    let stored_input = [json!({"type": "message", "role": "user", "id": "msg_a_in0",
                               "content": [{"type": "input_text", "text": "My name is Ada."}]})];
    let stored_output = [
        json!({"type": "message", "role": "assistant", "id": "msg_a", "status": "completed",
               "content": [{"type": "output_text", "text": "Hello Ada.", "annotations": []}]}),
        json!({"type": "function_call", "id": "fc_a_0", "call_id": "call_1", "name": "f",
               "arguments": "{}", "status": "completed"}),
    ];
    let request = json!({"model": "m", "instructions": "Be brief.", "previous_response_id": "resp_a",
                         "input": [{"type": "function_call_output", "call_id": "call_1", "output": "42"},
                                   {"role": "user", "content": "What is my name?"}]});
    let translated = to_chat(
        &serde_json::to_vec(&request).unwrap(),
        "r2",
        1,
        Some(Previous {
            id: "resp_a",
            input_items: &stored_input,
            output: &stored_output,
        }),
    )
    .unwrap();
    let chat: Value = serde_json::from_slice(&translated.chat_body).unwrap();
    assert_eq!(
        chat["messages"],
        json!([
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "My name is Ada."}]},
            {"role": "assistant", "content": [{"type": "text", "text": "Hello Ada."}],
             "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "42"},
            {"role": "user", "content": "What is my name?"},
        ])
    );
    // What a kept continuation stores: the conversation so far, its own input normalised,
    // never the instructions.
    assert_eq!(translated.input_items.len(), 5);
    assert_eq!(
        &translated.input_items[..3],
        &[
            stored_input[0].clone(),
            stored_output[0].clone(),
            stored_output[1].clone()
        ]
    );
    assert_eq!(
        translated.input_items[4],
        json!({"type": "message", "role": "user",
               "content": [{"type": "input_text", "text": "What is my name?"}]})
    );
    assert!(translated.store, "stored unless the request says otherwise");
    let mut transcoder = translated.transcoder;
    let chat = json!({"model": "m", "choices": [{"index": 0, "finish_reason": "stop",
                      "message": {"role": "assistant", "content": "Ada."}}]});
    let response: Value =
        serde_json::from_slice(&transcoder.json(&serde_json::to_vec(&chat).unwrap())).unwrap();
    assert_eq!(response["previous_response_id"], "resp_a");
    assert_eq!(response["store"], false, "no keeper: not kept");
}

#[test]
fn the_request_says_whether_its_response_may_be_kept() {
    let store = |request: Value| {
        to_chat(&serde_json::to_vec(&request).unwrap(), "r", 0, None).map(|t| t.store)
    };
    assert!(store(json!({"model": "m", "input": "x"})).unwrap());
    assert!(store(json!({"model": "m", "input": "x", "store": true})).unwrap());
    assert!(!store(json!({"model": "m", "input": "x", "store": false})).unwrap());
    let error = store(json!({"model": "m", "input": "x", "store": "yes"})).unwrap_err();
    assert_eq!(param(&error).as_deref(), Some("store"));
    assert_eq!(
        previous_response_id(br#"{"previous_response_id": 7}"#)
            .unwrap_err()
            .status(),
        400
    );
    assert_eq!(
        previous_response_id(br#"{"previous_response_id": "resp_1", "input": "x"}"#).unwrap(),
        Some("resp_1".to_owned())
    );
    assert_eq!(previous_response_id(b"not json").unwrap(), None);
    let twice = previous_response_id(
        br#"{"previous_response_id": "resp_1", "previous_response_id": "resp_2"}"#,
    )
    .unwrap_err();
    assert_eq!(param(&twice).as_deref(), Some("previous_response_id"));
}

#[test]
fn a_kept_response_is_handed_over_finished_and_says_whether_it_was_kept() {
    use std::sync::{Arc, Mutex};
    let chat = serde_json::to_vec(&json!({"model": "m", "choices": [{"index": 0,
        "finish_reason": "stop", "message": {"role": "assistant", "content": "Paris."}}]}))
    .unwrap();
    for keeps in [true, false] {
        let (_, mut transcoder) = translate(&json!({"model": "m", "input": "x"})).unwrap();
        let handed: Arc<Mutex<Option<Value>>> = Arc::default();
        let seen = Arc::clone(&handed);
        transcoder.keep_as(
            "resp_kept".to_owned(),
            Box::new(move |response: &Value| {
                *seen.lock().unwrap() = Some(response.clone());
                keeps
            }),
        );
        let response: Value = serde_json::from_slice(&transcoder.json(&chat)).unwrap();
        assert_eq!(response["id"], "resp_kept");
        assert_eq!(response["store"], keeps);
        let handed = handed.lock().unwrap().clone().unwrap();
        assert_eq!(handed["id"], "resp_kept");
        assert_eq!(handed["status"], "completed");
        assert_eq!(handed["output"][0]["content"][0]["text"], "Paris.");
    }

    // Streamed: kept when the stream closes, and the closing event says so.
    let (_, mut transcoder) =
        translate(&json!({"model": "m", "input": "x", "stream": true})).unwrap();
    let handed: Arc<Mutex<Option<Value>>> = Arc::default();
    let seen = Arc::clone(&handed);
    transcoder.keep_as(
        "resp_streamed".to_owned(),
        Box::new(move |response: &Value| {
            *seen.lock().unwrap() = Some(response.clone());
            true
        }),
    );
    let mut out = transcoder.stream(
        b"data: {\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"}}]}\n\n",
    );
    assert!(handed.lock().unwrap().is_none(), "not before the end");
    out.extend(transcoder.stream(b"data: {\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\ndata: [DONE]\n\n"));
    let events = parse_events(&out);
    assert_eq!(events[0].1["response"]["store"], true);
    let (kind, completed) = events.last().unwrap();
    assert_eq!(kind, "response.completed");
    assert_eq!(completed["response"]["store"], true);
    assert_eq!(completed["response"]["id"], "resp_streamed");
    assert_eq!(
        handed.lock().unwrap().clone().unwrap(),
        completed["response"]
    );

    // A stream that fails is not kept.
    let (_, mut transcoder) =
        translate(&json!({"model": "m", "input": "x", "stream": true})).unwrap();
    let called = Arc::new(Mutex::new(false));
    let seen = Arc::clone(&called);
    transcoder.keep_as(
        "resp_failed".to_owned(),
        Box::new(move |_: &Value| {
            *seen.lock().unwrap() = true;
            true
        }),
    );
    let out = transcoder
        .stream(b"data: {\"error\":{\"message\":\"boom\",\"code\":\"x\"}}\n\ndata: [DONE]\n\n");
    let events = parse_events(&out);
    let (kind, failed) = events.last().unwrap();
    assert_eq!(kind, "response.failed");
    assert_eq!(failed["response"]["store"], false);
    assert!(!*called.lock().unwrap());
}

#[test]
fn input_items_are_listed_in_pages() {
    let items: Vec<Value> = (0..5)
        .map(|index| json!({"id": format!("msg_{index}")}))
        .collect();
    let ids = |list: &Value| -> Vec<String> {
        list["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|item| item["id"].as_str().unwrap().to_owned())
            .collect()
    };
    let newest = ItemsPage::parse(None).unwrap().list(&items);
    assert_eq!(ids(&newest), ["msg_4", "msg_3", "msg_2", "msg_1", "msg_0"]);
    assert_eq!(newest["object"], "list");
    assert_eq!(newest["first_id"], "msg_4");
    assert_eq!(newest["last_id"], "msg_0");
    assert_eq!(newest["has_more"], false);
    let first = ItemsPage::parse(Some("order=asc&limit=2"))
        .unwrap()
        .list(&items);
    assert_eq!(ids(&first), ["msg_0", "msg_1"]);
    assert_eq!(first["has_more"], true);
    let next = ItemsPage::parse(Some("order=asc&limit=2&after=msg_1&include[]=x"))
        .unwrap()
        .list(&items);
    assert_eq!(ids(&next), ["msg_2", "msg_3"]);
    for (query, param_name) in [
        ("limit=0", "limit"),
        ("limit=101", "limit"),
        ("order=up", "order"),
    ] {
        let error = ItemsPage::parse(Some(query)).unwrap_err();
        assert_eq!(param(&error).as_deref(), Some(param_name), "{query}");
    }
}

#[test]
fn refusals_of_the_chat_translation_name_the_request_s_own_parts() {
    // What the local path's chat parser refuses, renamed as the client wrote it.
    let refusal = |request: Value| {
        let (chat, transcoder) = translate(&request).unwrap();
        let refused = crate::openai::parse_chat(&serde_json::to_vec(&chat).unwrap())
            .expect_err("the chat parser refuses it");
        let renamed = transcoder.error_in_request_terms(&refused);
        (param(&renamed).unwrap_or_default(), renamed.to_string())
    };
    assert_eq!(
        refusal(json!({
            "model": "m",
            "instructions": "Be brief.",
            "input": [
                {"role": "user", "content": [{"type": "input_text", "text": "What is this?"}]},
                {"type": "reasoning", "id": "rs_1", "summary": []},
                {"role": "user", "content": [{"type": "input_image", "image_url": "https://x/cat.png"}]},
            ],
        })),
        (
            "input[2].content[0].type".to_owned(),
            "`input_image` content parts are not supported by local models".to_owned()
        )
    );
    assert_eq!(
        refusal(json!({"model": "m", "input": "Hi", "max_output_tokens": 0})),
        (
            "max_output_tokens".to_owned(),
            "`max_output_tokens` must be an integer of at least 1".to_owned()
        )
    );
    assert_eq!(
        refusal(json!({"model": "m", "input": []})),
        (
            "input".to_owned(),
            "input must contain at least one item".to_owned()
        )
    );
    let (_, transcoder) = translate(&json!({"model": "m", "input": "Hi"})).unwrap();
    for (chat, responses) in [
        ("reasoning_effort", "reasoning.effort"),
        ("response_format.json_schema.schema", "text.format.schema"),
        ("response_format.type", "text.format.type"),
        ("tools[1].function.parameters", "tools[1].parameters"),
        ("tool_choice.function.name", "tool_choice.name"),
        ("messages[0].content", "input"),
        ("temperature", "temperature"),
        ("max_tokensx", "max_tokensx"),
    ] {
        assert_eq!(transcoder.param_name(chat), responses, "{chat}");
    }
}

#[test]
fn a_schema_and_function_parameters_keep_the_key_order_the_client_wrote() {
    let body = br#"{"model": "m", "input": "x",
        "text": {"format": {"type": "json_schema", "name": "r", "schema": {"type": "object", "properties": {"reasoning": {"type": "string"}, "answer": {"type": "string"}}}}},
        "tools": [{"type": "function", "name": "f", "parameters": {"properties": {"zone": {}, "area": {}}}}]}"#;
    let (chat, _) = translate_bytes(body).unwrap();
    let text = String::from_utf8(chat).unwrap();
    assert!(
        text.contains(r#""schema":{"type": "object", "properties": {"reasoning": {"type": "string"}, "answer": {"type": "string"}}}"#),
        "{text}"
    );
    assert!(
        text.contains(r#""parameters":{"properties": {"zone": {}, "area": {}}}"#),
        "{text}"
    );
    // Read back as the chat request it is (without the tools, which would force a call
    // instead of the format): the grammar's input in that order.
    let body = br#"{"model": "m", "input": "x",
        "text": {"format": {"type": "json_schema", "name": "r", "schema": {"type": "object", "properties": {"reasoning": {"type": "string"}, "answer": {"type": "string"}}}}}}"#;
    let (chat, _) = translate_bytes(body).unwrap();
    let parsed = crate::openai::parse_chat(&chat).unwrap();
    assert_eq!(
        parsed.generation.response_format,
        Some(crate::openai::ResponseFormat::JsonSchema {
            schema: r#"{"type": "object", "properties": {"reasoning": {"type": "string"}, "answer": {"type": "string"}}}"#.to_owned()
        })
    );
    // A client string that looks like a marker leaves the parsed (sorted) values in place.
    let marker = format!("{}0", super::WRITTEN_MARKER);
    let tricky = serde_json::json!({"model": "m", "input": marker,
        "text": {"format": {"type": "json_schema", "name": "r", "schema": {"b": 1, "a": 2}}}});
    let (chat, _) = translate_bytes(&serde_json::to_vec(&tricky).unwrap()).unwrap();
    let chat: Value = serde_json::from_slice(&chat).unwrap();
    assert_eq!(
        chat["response_format"]["json_schema"]["schema"],
        serde_json::json!({"a": 2, "b": 1})
    );
    assert_eq!(chat["messages"][0]["content"], marker);
}
