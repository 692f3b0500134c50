use expect_test::{Expect, expect};

use super::{CalledTool, Endpoint, ResponseFormat, ResponseMeta, parse_chat, parse_completion};
use crate::error::GatewayError;

fn check_chat(body: &str, expect: Expect) {
    let rendered = match parse_chat(body.as_bytes()) {
        Ok(request) => format!("{request:#?}"),
        Err(error) => String::from_utf8(error.body_json()).unwrap_or_default(),
    };
    expect.assert_eq(&rendered);
}

fn check_completion(body: &str, expect: Expect) {
    let rendered = match parse_completion(body.as_bytes()) {
        Ok(request) => format!("{request:#?}"),
        Err(error) => String::from_utf8(error.body_json()).unwrap_or_default(),
    };
    expect.assert_eq(&rendered);
}

#[test]
fn a_full_chat_request_parses() {
    check_chat(
        r#"{"model":"smollm2","messages":[{"role":"system","content":"Be brief."},
            {"role":"user","content":[{"type":"text","text":"Translate:"},{"type":"text","text":"Good morning"}]}],
            "max_completion_tokens":8,"temperature":0,"top_p":0.9,"seed":-1,"stop":"\n",
            "n":1,"stream":true,"stream_options":{"include_usage":true},"user":"u1",
            "tool_choice":"none","logprobs":false,"unknown_future_field":{"x":1}}"#,
        expect![[r#"
            ChatRequest {
                messages: [
                    Message {
                        role: System,
                        content: "Be brief.",
                    },
                    Message {
                        role: User,
                        content: "Translate:\nGood morning",
                    },
                ],
                generation: Generation {
                    model: Some(
                        "smollm2",
                    ),
                    max_tokens: Some(
                        8,
                    ),
                    temperature: 0.0,
                    top_p: 0.9,
                    seed: Some(
                        18446744073709551615,
                    ),
                    stop: [
                        "\n",
                    ],
                    stream: true,
                    include_usage: true,
                    user: Some(
                        "u1",
                    ),
                    ignore_eos: false,
                    response_format: None,
                    logprobs: None,
                    presence_penalty: 0.0,
                    frequency_penalty: 0.0,
                    logit_bias: [],
                    n: 1,
                    tool_call: None,
                },
            }"#]],
    );
}

#[test]
fn malformed_json_is_invalid_json() {
    check_chat(
        r#"{"messages": [}"#,
        expect![[
            r#"{"error":{"message":"the request body is not valid JSON: expected value at line 1 column 15","type":"invalid_request_error","param":null,"code":"invalid_json"}}"#
        ]],
    );
    check_chat(
        "[1]",
        expect![[
            r#"{"error":{"message":"the request body must be a JSON object","type":"invalid_request_error","param":null,"code":"invalid_json"}}"#
        ]],
    );
}

#[test]
fn bad_fields_name_their_param() {
    check_chat(
        r#"{"model":"m"}"#,
        expect![[
            r#"{"error":{"message":"missing required parameter `messages`","type":"invalid_request_error","param":"messages","code":"invalid_value"}}"#
        ]],
    );
    check_chat(
        r#"{"messages":[{"role":"user","content":"x"}],"temperature":3}"#,
        expect![[
            r#"{"error":{"message":"`temperature` must be a number between 0 and 2","type":"invalid_request_error","param":"temperature","code":"invalid_value"}}"#
        ]],
    );
    check_chat(
        r#"{"messages":[{"role":"user","content":"x"},{"role":"robot","content":"y"}]}"#,
        expect![[
            r#"{"error":{"message":"`robot` is not a role (expected system, developer, user, assistant, tool or function)","type":"invalid_request_error","param":"messages[1].role","code":"invalid_value"}}"#
        ]],
    );
    check_chat(
        r#"{"messages":[{"role":"user","content":"x"}],"max_tokens":0}"#,
        expect![[
            r#"{"error":{"message":"`max_tokens` must be an integer of at least 1","type":"invalid_request_error","param":"max_tokens","code":"invalid_value"}}"#
        ]],
    );
    check_chat(
        r#"{"messages":[{"role":"user","content":"x"}],"stream_options":{"include_usage":true}}"#,
        expect![[
            r#"{"error":{"message":"stream_options is only allowed when stream is true","type":"invalid_request_error","param":"stream_options","code":"invalid_value"}}"#
        ]],
    );
}

#[test]
fn what_the_local_engine_cannot_honour_is_refused() {
    check_chat(
        r#"{"messages":[{"role":"user","content":"x"}],"audio":{"voice":"alloy","format":"wav"}}"#,
        expect![[
            r#"{"error":{"message":"`audio` is not supported by this endpoint's local models","type":"invalid_request_error","param":"audio","code":"unsupported_parameter"}}"#
        ]],
    );
    check_chat(
        r#"{"messages":[{"role":"user","content":"x"}],"n":17}"#,
        expect![[
            r#"{"error":{"message":"`n` must be an integer from 1 to 16","type":"invalid_request_error","param":"n","code":"invalid_value"}}"#
        ]],
    );
    check_chat(
        r#"{"messages":[{"role":"user","content":"x"}],"prediction":{"type":"content","content":"y"}}"#,
        expect![[
            r#"{"error":{"message":"`prediction` is not supported by this endpoint's local models","type":"invalid_request_error","param":"prediction","code":"unsupported_parameter"}}"#
        ]],
    );
    check_chat(
        r#"{"messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"x"}}]}]}"#,
        expect![[
            r#"{"error":{"message":"`image_url` content parts are not supported by local models","type":"invalid_request_error","param":"messages[0].content[0].type","code":"unsupported_parameter"}}"#
        ]],
    );
}

/// The prompts of a legacy completions body, or its error.
fn completion_prompts(body: &str) -> String {
    match parse_completion(body.as_bytes()) {
        Ok(request) => format!("{:?}", request.prompts),
        Err(error) => String::from_utf8(error.body_json()).unwrap_or_default(),
    }
}

#[test]
fn legacy_completions_take_several_prompts_and_token_ids() {
    let cases = [
        (r#""Once""#, expect![[r#"[Text("Once")]"#]]),
        (
            r#"["Once", "Twice"]"#,
            expect![[r#"[Text("Once"), Text("Twice")]"#]],
        ),
        ("[15339, 1917]", expect!["[Tokens([15339, 1917])]"]),
        (
            "[[15339], [1917, 11]]",
            expect!["[Tokens([15339]), Tokens([1917, 11])]"],
        ),
        (
            "[]",
            expect![[
                r#"{"error":{"message":"`prompt` must not be an empty array","type":"invalid_request_error","param":"prompt","code":"invalid_value"}}"#
            ]],
        ),
        (
            r#"["Once", [1]]"#,
            expect![[
                r#"{"error":{"message":"`prompt` must be a string, an array of strings, an array of token ids, or an array of arrays of token ids","type":"invalid_request_error","param":"prompt","code":"invalid_value"}}"#
            ]],
        ),
        (
            "[1, -2]",
            expect![[
                r#"{"error":{"message":"`prompt` must be a string, an array of strings, an array of token ids, or an array of arrays of token ids","type":"invalid_request_error","param":"prompt","code":"invalid_value"}}"#
            ]],
        ),
        (
            "[1.5]",
            expect![[
                r#"{"error":{"message":"`prompt` must be a string, an array of strings, an array of token ids, or an array of arrays of token ids","type":"invalid_request_error","param":"prompt","code":"invalid_value"}}"#
            ]],
        ),
        (
            "7",
            expect![[
                r#"{"error":{"message":"`prompt` must be a string, an array of strings, an array of token ids, or an array of arrays of token ids","type":"invalid_request_error","param":"prompt","code":"invalid_value"}}"#
            ]],
        ),
    ];
    for (prompt, expect) in cases {
        expect.assert_eq(&completion_prompts(&format!(
            r#"{{"model":"m","prompt":{prompt}}}"#
        )));
    }
}

#[test]
fn legacy_completions_default_to_sixteen_tokens() {
    check_completion(
        r#"{"model":"m","prompt":["Once upon"]}"#,
        expect![[r#"
            CompletionRequest {
                prompts: [
                    Text(
                        "Once upon",
                    ),
                ],
                generation: Generation {
                    model: Some(
                        "m",
                    ),
                    max_tokens: Some(
                        16,
                    ),
                    temperature: 1.0,
                    top_p: 1.0,
                    seed: None,
                    stop: [],
                    stream: false,
                    include_usage: false,
                    user: None,
                    ignore_eos: false,
                    response_format: None,
                    logprobs: None,
                    presence_penalty: 0.0,
                    frequency_penalty: 0.0,
                    logit_bias: [],
                    n: 1,
                    tool_call: None,
                },
            }"#]],
    );
    check_completion(
        r#"{"model":"m","prompt":"x","echo":true}"#,
        expect![[
            r#"{"error":{"message":"`echo` is not supported by this endpoint's local models","type":"invalid_request_error","param":"echo","code":"unsupported_parameter"}}"#
        ]],
    );
}

#[test]
fn stream_chunks_have_the_openai_shape() {
    let meta = ResponseMeta::new(Endpoint::Chat, "r1", 1_700_000_000, "smollm2");
    expect![[r#"{"choices":[{"delta":{"content":"","role":"assistant"},"finish_reason":null,"index":0,"logprobs":null}],"created":1700000000,"id":"chatcmpl-r1","model":"smollm2","object":"chat.completion.chunk","system_fingerprint":null,"usage":null}"#]]
    .assert_eq(&meta.chunk(0, true, Some(""), None, true, None).to_string());
    let usage = edge_runtime::Usage {
        prompt_tokens: 5,
        completion_tokens: 2,
        cached_tokens: 0,
    };
    expect![[r#"{"choices":[],"created":1700000000,"id":"chatcmpl-r1","model":"smollm2","object":"chat.completion.chunk","system_fingerprint":null,"usage":{"completion_tokens":2,"prompt_tokens":5,"prompt_tokens_details":{"cached_tokens":0},"total_tokens":7}}"#]]
    .assert_eq(&meta.usage_chunk(usage).to_string());
}

#[test]
fn response_formats_are_read_and_bad_ones_name_their_field() {
    let format =
        |body: &str| parse_chat(body.as_bytes()).map(|chat| chat.generation.response_format);
    let chat = |format: &str| {
        format!(r#"{{"messages":[{{"role":"user","content":"x"}}],"response_format":{format}}}"#)
    };
    assert_eq!(format(&chat(r#"{"type":"text"}"#)), Ok(None));
    assert_eq!(format(&chat("null")), Ok(None));
    assert_eq!(
        format(&chat(r#"{"type":"json_object"}"#)),
        Ok(Some(ResponseFormat::JsonObject))
    );
    assert_eq!(
        format(&chat(
            r#"{"type":"json_schema","json_schema":{"name":"city-1","strict":true,"schema":{"type":"object"}}}"#
        )),
        Ok(Some(ResponseFormat::JsonSchema {
            schema: r#"{"type":"object"}"#.to_owned()
        }))
    );
    // The schema's text as written: its properties keep the client's order.
    assert_eq!(
        format(&chat(
            r#"{"type":"json_schema","json_schema":{"name":"p","schema":{"properties":{"z":{}, "a":{}}}}}"#
        )),
        Ok(Some(ResponseFormat::JsonSchema {
            schema: r#"{"properties":{"z":{}, "a":{}}}"#.to_owned()
        }))
    );
    // No schema: any JSON matches the empty one.
    assert_eq!(
        format(&chat(
            r#"{"type":"json_schema","json_schema":{"name":"any"}}"#
        )),
        Ok(Some(ResponseFormat::JsonSchema {
            schema: "{}".to_owned()
        }))
    );
    for (bad, param) in [
        (r#""json""#, "response_format"),
        (r#"{"type":"yaml"}"#, "response_format.type"),
        (r#"{"type":3}"#, "response_format.type"),
        (r#"{"type":"json_schema"}"#, "response_format.json_schema"),
        (
            r#"{"type":"json_schema","json_schema":{"schema":{}}}"#,
            "response_format.json_schema.name",
        ),
        (
            r#"{"type":"json_schema","json_schema":{"name":"has space"}}"#,
            "response_format.json_schema.name",
        ),
        (
            r#"{"type":"json_schema","json_schema":{"name":"n","strict":"yes"}}"#,
            "response_format.json_schema.strict",
        ),
        (
            r#"{"type":"json_schema","json_schema":{"name":"n","schema":[1]}}"#,
            "response_format.json_schema.schema",
        ),
    ] {
        match format(&chat(bad)) {
            Err(GatewayError::InvalidValue { param: got, .. }) => {
                assert_eq!(got, param, "for {bad}");
            }
            other => panic!("{bad}: {other:?}"),
        }
    }
    // A format ends the answer where the JSON ends; ignore_eos would run past it.
    let both = r#"{"messages":[{"role":"user","content":"x"}],"ignore_eos":true,"response_format":{"type":"json_object"}}"#;
    assert!(matches!(
        parse_chat(both.as_bytes()),
        Err(GatewayError::InvalidValue { param, .. }) if param == "ignore_eos"
    ));
}

#[test]
fn logprobs_are_read_per_endpoint_and_shaped_as_openai_does() {
    let chat = |extra: &str| {
        let body = format!(r#"{{"messages":[{{"role":"user","content":"x"}}]{extra}}}"#);
        parse_chat(body.as_bytes()).map(|chat| chat.generation.logprobs)
    };
    assert_eq!(chat(""), Ok(None));
    assert_eq!(chat(r#","logprobs":false"#), Ok(None));
    assert_eq!(chat(r#","logprobs":true"#), Ok(Some(0)));
    assert_eq!(chat(r#","logprobs":true,"top_logprobs":20"#), Ok(Some(20)));
    let completion = |extra: &str| {
        let body = format!(r#"{{"prompt":"x"{extra}}}"#);
        parse_completion(body.as_bytes()).map(|completion| completion.generation.logprobs)
    };
    assert_eq!(completion(""), Ok(None));
    assert_eq!(completion(r#","logprobs":3"#), Ok(Some(3)));
    for (bad, param) in [
        (chat(r#","top_logprobs":2"#), "top_logprobs"),
        (
            chat(r#","logprobs":true,"top_logprobs":21"#),
            "top_logprobs",
        ),
        (chat(r#","logprobs":1"#), "logprobs"),
        (completion(r#","logprobs":true"#), "logprobs"),
        (completion(r#","logprobs":300"#), "logprobs"),
    ] {
        match bad {
            Err(GatewayError::InvalidValue { param: got, .. }) => assert_eq!(got, param),
            other => panic!("{param}: {other:?}"),
        }
    }

    // A token that ends inside a UTF-8 character shows U+FFFD; its bytes are exact.
    let token = edge_runtime::TokenLogprobs {
        token: b" Hi".to_vec(),
        logprob: -0.5,
        top: vec![
            edge_runtime::TopLogprob {
                token: b" Hi".to_vec(),
                logprob: -0.5,
            },
            edge_runtime::TopLogprob {
                token: vec![0xE2, 0x82],
                logprob: -1.25,
            },
        ],
    };
    let chat = ResponseMeta::new(Endpoint::Chat, "r1", 1_700_000_000, "smollm2");
    expect![[r#"{"content":[{"bytes":[32,72,105],"logprob":-0.5,"token":" Hi","top_logprobs":[{"bytes":[32,72,105],"logprob":-0.5,"token":" Hi"},{"bytes":[226,130],"logprob":-1.25,"token":"�"}]}],"refusal":null}"#]].assert_eq(&chat.logprobs(&[&token], 0).to_string());
    let completions = ResponseMeta::new(Endpoint::Completions, "r1", 1_700_000_000, "smollm2");
    expect![[r#"{"text_offset":[4,7],"token_logprobs":[-0.5,-0.5],"tokens":[" Hi"," Hi"],"top_logprobs":[{" Hi":-0.5,"bytes:\\xe2\\x82":-1.25},{" Hi":-0.5,"bytes:\\xe2\\x82":-1.25}]}"#]].assert_eq(&completions.logprobs(&[&token, &token], 4).to_string());
}

#[test]
fn logit_bias_and_penalties_are_read_and_bad_ones_name_their_field() {
    let chat = |extra: &str| {
        let body = format!(r#"{{"messages":[{{"role":"user","content":"x"}}]{extra}}}"#);
        parse_chat(body.as_bytes()).map(|chat| chat.generation)
    };
    let generation =
        chat(r#","logit_bias":{"42":-100,"7":2.5},"presence_penalty":0.5,"frequency_penalty":-2"#)
            .unwrap();
    assert_eq!(generation.logit_bias, [(42, -100.0), (7, 2.5)]);
    assert_eq!(
        (generation.presence_penalty, generation.frequency_penalty),
        (0.5, -2.0)
    );
    let plain = chat("").unwrap();
    assert!(plain.logit_bias.is_empty());
    assert_eq!(
        (plain.presence_penalty, plain.frequency_penalty),
        (0.0, 0.0)
    );
    for (bad, param) in [
        (r#","logit_bias":[1]"#, "logit_bias"),
        (r#","logit_bias":{"x":1}"#, "logit_bias.x"),
        (r#","logit_bias":{"-1":1}"#, "logit_bias.-1"),
        (r#","logit_bias":{"5":101}"#, "logit_bias.5"),
        (r#","logit_bias":{"5":"high"}"#, "logit_bias.5"),
        (r#","presence_penalty":2.5"#, "presence_penalty"),
        (r#","frequency_penalty":"x""#, "frequency_penalty"),
    ] {
        match chat(bad) {
            Err(GatewayError::InvalidValue { param: got, .. }) => assert_eq!(got, param, "{bad}"),
            other => panic!("{bad}: {other:?}"),
        }
    }
}

#[test]
fn tools_are_read_with_what_the_answer_may_be() {
    let chat = |extra: &str| {
        let body = format!(r#"{{"messages":[{{"role":"user","content":"x"}}]{extra}}}"#);
        parse_chat(body.as_bytes())
    };
    let tools = r#","tools":[{"type":"function","function":{"name":"get_weather","description":"Weather now","parameters":{"type":"object","properties":{"city":{"type":"string"}}}}},{"type":"function","function":{"name":"get_time"}}]"#;
    let named = chat(&format!(
        r#"{tools},"tool_choice":{{"type":"function","function":{{"name":"get_time"}}}}"#
    ))
    .unwrap();
    let call = named.generation.tool_call.unwrap();
    assert_eq!(call.tools.len(), 1);
    assert_eq!(
        (
            call.tools[0].name.as_str(),
            call.tools[0].parameters.as_str()
        ),
        ("get_time", "{}")
    );
    let required = chat(&format!(r#"{tools},"tool_choice":"required""#)).unwrap();
    let required = required.generation.tool_call.unwrap();
    assert_eq!((required.tools.len(), required.text_allowed), (2, false));
    // Parameters as written: the grammar writes the arguments in the client's key order.
    let ordered = r#","tools":[{"type":"function","function":{"name":"f","parameters":{"properties":{"z":{}, "a":{}}}}}]"#;
    let ordered = chat(ordered).unwrap().generation.tool_call.unwrap();
    assert_eq!(
        ordered.tools[0].parameters,
        r#"{"properties":{"z":{}, "a":{}}}"#
    );
    let legacy = r#","functions":[{"name":"f","parameters":{"properties":{"z":{}, "a":{}}}}]"#;
    let legacy = chat(legacy).unwrap().generation.tool_call.unwrap();
    assert_eq!(
        legacy.tools[0].parameters,
        r#"{"properties":{"z":{}, "a":{}}}"#
    );
    assert_eq!(
        chat(&format!(r#"{tools},"tool_choice":"none""#))
            .unwrap()
            .generation
            .tool_call,
        None
    );
    // `auto`, also the default with tools, lets the answer be text instead of a call.
    for auto in [tools.to_owned(), format!(r#"{tools},"tool_choice":"auto""#)] {
        let call = chat(&auto).unwrap().generation.tool_call.unwrap();
        assert!(call.text_allowed && call.tools.len() == 2, "{auto}");
        assert!(!call.parallel, "one call unless asked for several");
    }
    // Several calls only when asked for.
    let parallel = chat(&format!(r#"{tools},"parallel_tool_calls":true"#)).unwrap();
    assert!(parallel.generation.tool_call.unwrap().parallel);
    let single = chat(&format!(r#"{tools},"parallel_tool_calls":false"#)).unwrap();
    assert!(!single.generation.tool_call.unwrap().parallel);
    assert!(matches!(
        chat(&format!(r#"{tools},"parallel_tool_calls":"yes""#)),
        Err(GatewayError::InvalidValue { param, .. }) if param == "parallel_tool_calls"
    ));
    // Log-probabilities would have to spell a call's JSON: refused, unless no call is possible.
    assert!(matches!(
        chat(&format!(r#"{tools},"logprobs":true"#)),
        Err(GatewayError::UnsupportedParameter { param, .. }) if param == "logprobs"
    ));
    let plain = chat(&format!(r#"{tools},"tool_choice":"none","logprobs":true"#)).unwrap();
    assert!(plain.generation.tool_call.is_none() && plain.generation.logprobs.is_some());
    for (bad, param, unsupported) in [
        (
            format!(r#"{tools},"tool_choice":{{"type":"function","function":{{"name":"nope"}}}}"#),
            "tool_choice.function.name",
            false,
        ),
        (
            r#","tools":[{"type":"function","function":{"name":"has space"}}],"tool_choice":"required""#.to_owned(),
            "tools[0].function.name",
            false,
        ),
        (r#","tool_choice":"required""#.to_owned(), "tools", false),
        (
            format!(r#"{tools},"tool_choice":"required","response_format":{{"type":"json_object"}}"#),
            "response_format",
            false,
        ),
    ] {
        match chat(&bad) {
            Err(GatewayError::UnsupportedParameter { param: got, .. }) if unsupported => {
                assert_eq!(got, param, "{bad}");
            }
            Err(GatewayError::InvalidValue { param: got, .. }) if !unsupported => {
                assert_eq!(got, param, "{bad}");
            }
            other => panic!("{bad}: {other:?}"),
        }
    }

    // Earlier calls and their results reach the model as text, a call as the model writes it.
    history_reads_as(
        br#"{"messages":[{"role":"user","content":"Weather in Oslo?"},
        {"role":"assistant","content":null,"tool_calls":[{"id":"c1","type":"function","function":{"name":"get_weather","arguments":"{\"city\": \"Oslo\"}"}}]},
        {"role":"tool","tool_call_id":"c1","content":"-3 C"}]}"#,
        r#"{"name":"get_weather","arguments":{"city":"Oslo"}}"#,
        "Result of tool call c1: -3 C",
    );
    // A call cut short comes back with arguments that are not JSON: kept as their text.
    history_reads_as(
        br#"{"messages":[{"role":"user","content":"Weather in Oslo?"},
        {"role":"assistant","content":null,"tool_calls":[{"id":"c1","type":"function","function":{"name":"get_weather","arguments":"{\"ci"}}]},
        {"role":"tool","tool_call_id":"c1","content":"cut off"}]}"#,
        r#"{"name":"get_weather","arguments":"{\"ci"}"#,
        "Result of tool call c1: cut off",
    );
}

/// A conversation of a question, a call and its result reaches the model as the call's text
/// and the result as the user's words.
fn history_reads_as(body: &[u8], call: &str, result: &str) {
    let history = parse_chat(body).unwrap();
    assert_eq!(history.messages[1].content, call);
    assert_eq!(history.messages[2].role, edge_runtime::Role::User);
    assert_eq!(history.messages[2].content, result);
}

/// The older function calling (`functions`, `function_call`, `function` messages) is read
/// as the same offer as tools, and its errors name its own fields.
#[test]
fn the_older_functions_are_read_as_tools() {
    let chat = |extra: &str| {
        let body = format!(
            r#"{{"messages":[{{"role":"user","content":"x"}}],"functions":[{{"name":"get_time","parameters":{{"type":"object"}}}},{{"name":"get_weather"}}]{extra}}}"#
        );
        parse_chat(body.as_bytes())
    };
    let call = chat("").unwrap().generation.tool_call.unwrap();
    assert!(call.legacy && call.text_allowed && !call.parallel);
    assert_eq!(call.tools.len(), 2);
    let named = chat(r#","function_call":{"name":"get_weather"},"parallel_tool_calls":true"#)
        .unwrap()
        .generation
        .tool_call
        .unwrap();
    assert_eq!(
        (
            named.tools[0].name.as_str(),
            named.text_allowed,
            named.parallel
        ),
        ("get_weather", false, false)
    );
    assert_eq!(
        chat(r#","function_call":"none""#)
            .unwrap()
            .generation
            .tool_call,
        None
    );
    let param_of = |result: Result<super::ChatRequest, GatewayError>| match result {
        Err(GatewayError::InvalidValue { param, .. }) => param,
        other => panic!("{other:?}"),
    };
    assert_eq!(
        param_of(chat(r#","function_call":{"name":"nope"}"#)),
        "function_call.name"
    );
    assert_eq!(param_of(chat(r#","tools":[]"#)), "functions");
    assert_eq!(
        param_of(parse_chat(
            br#"{"messages":[{"role":"user","content":"x"}],"functions":[{"description":"no name"}]}"#
        )),
        "functions[0].name"
    );
    assert_eq!(
        param_of(parse_chat(
            br#"{"messages":[{"role":"user","content":"x"}],"function_call":"auto"}"#
        )),
        "function_call"
    );
    // An earlier call and its result reach the model as text, as tool calls do.
    history_reads_as(
        br#"{"messages":[{"role":"user","content":"Time in Oslo?"},
        {"role":"assistant","content":null,"function_call":{"name":"get_time","arguments":"{\"zone\": \"CET\"}"}},
        {"role":"function","name":"get_time","content":"14:05"}]}"#,
        r#"{"name":"get_time","arguments":{"zone":"CET"}}"#,
        "Result of function get_time: 14:05",
    );
    assert_eq!(
        param_of(parse_chat(
            br#"{"messages":[{"role":"assistant","content":null,"function_call":{"name":"f"}}]}"#
        )),
        "messages[0].function_call"
    );
}

#[test]
fn a_call_or_a_text_answer_is_read_from_the_json_the_grammar_allowed() {
    let id = |at: usize| format!("call_{at}");
    let calls =
        CalledTool::from_answer(id, r#"{"name": "get_time", "arguments": {"zone": "UTC"}}"#)
            .unwrap();
    assert_eq!(calls.len(), 1);
    let call = &calls[0];
    assert_eq!(
        (call.name.as_str(), call.arguments.as_str()),
        ("get_time", r#"{"zone":"UTC"}"#)
    );
    assert_eq!(
        call.body(Some(0)).to_string(),
        r#"{"function":{"arguments":"{\"zone\":\"UTC\"}","name":"get_time"},"id":"call_0","index":0,"type":"function"}"#
    );
    assert_eq!(
        CalledTool::text_answer(r#"{"response": "It is noon."}"#).as_deref(),
        Some("It is noon.")
    );
    assert_eq!(CalledTool::from_answer(id, r#"{"response": "x"}"#), None);
    assert_eq!(CalledTool::from_answer(id, r#"{"name": "f", "argu"#), None);
    // Several calls (`parallel_tool_calls`), each with its own id, in the order written.
    let calls = CalledTool::from_answer(
        id,
        r#"{"tool_calls": [{"name": "get_time", "arguments": {"zone": "UTC"}},
            {"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}}]}"#,
    )
    .unwrap();
    let summary: Vec<(&str, &str, &str)> = calls
        .iter()
        .map(|call| {
            (
                call.id.as_str(),
                call.name.as_str(),
                call.arguments.as_str(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("call_0", "get_time", r#"{"zone":"UTC"}"#),
            ("call_1", "get_weather", r#"{"city":"Oslo","days":2}"#)
        ]
    );
    assert_eq!(CalledTool::from_answer(id, r#"{"tool_calls": []}"#), None);
}

#[test]
fn embeddings_inputs_come_in_four_shapes_and_anything_else_is_named() {
    use edge_runtime::EmbeddingInput;
    let parse = |body: &str| super::parse_embeddings(body.as_bytes());
    assert_eq!(
        parse(r#"{"model":"m","input":"hello","encoding_format":"base64","user":"u"}"#).unwrap(),
        super::EmbeddingsRequest {
            inputs: vec![EmbeddingInput::Text("hello".to_owned())],
            base64: true,
            dimensions: None,
        }
    );
    assert_eq!(
        parse(r#"{"input":"hello","encoding_format":null,"dimensions":null}"#).unwrap(),
        super::EmbeddingsRequest {
            inputs: vec![EmbeddingInput::Text("hello".to_owned())],
            base64: false,
            dimensions: None,
        }
    );
    assert_eq!(
        parse(r#"{"input":["a","b"],"dimensions":576}"#)
            .unwrap()
            .inputs,
        [
            EmbeddingInput::Text("a".to_owned()),
            EmbeddingInput::Text("b".to_owned())
        ]
    );
    assert_eq!(
        parse(r#"{"input":[1,2,3]}"#).unwrap().inputs,
        [EmbeddingInput::Tokens(vec![1, 2, 3])]
    );
    assert_eq!(
        parse(r#"{"input":[[1],[2,3]]}"#).unwrap().inputs,
        [
            EmbeddingInput::Tokens(vec![1]),
            EmbeddingInput::Tokens(vec![2, 3])
        ]
    );
    for (body, param) in [
        (r#"{"model":"m"}"#, "input"),
        (r#"{"input":[]}"#, "input"),
        (r#"{"input":["a",1]}"#, "input"),
        (r#"{"input":[-1]}"#, "input"),
        (r#"{"input":[[1],["a"]]}"#, "input"),
        (r#"{"input":{"text":"a"}}"#, "input"),
        (r#"{"input":"a","dimensions":0}"#, "dimensions"),
        (
            r#"{"input":"a","encoding_format":"int8"}"#,
            "encoding_format",
        ),
        (r#"{"input":"a","stream":true}"#, "stream"),
    ] {
        let error = parse(body).unwrap_err();
        assert_eq!(error.body().error.param.as_deref(), Some(param), "{body}");
    }
    let many = format!(r#"{{"input":[{}]}}"#, vec!["\"x\""; 2049].join(","));
    assert!(parse(&many).is_err());
    assert!(matches!(
        parse("[1]"),
        Err(crate::error::GatewayError::InvalidJson { .. })
    ));
}

#[test]
fn the_routing_envelope_takes_only_an_object_with_each_key_once() {
    let check = |body: &str, expected: Expect| {
        let text = match super::parse_envelope(body.as_bytes()) {
            Ok(envelope) => format!("{envelope:?}"),
            Err(error) => String::from_utf8_lossy(&error.body_json()).into_owned(),
        };
        expected.assert_eq(&text);
    };
    check(
        r#" {"model": "m", "stream": true, "user": "u"}"#,
        expect![[
            r#"Envelope { model: Some("m"), stream: true, include_usage: false, user: Some("u") }"#
        ]],
    );
    // An array would otherwise be read as the fields in order.
    check(
        r#"["m", "u"]"#,
        expect![[
            r#"{"error":{"message":"the request body must be a JSON object","type":"invalid_request_error","param":null,"code":"invalid_json"}}"#
        ]],
    );
    check(
        "null",
        expect![[
            r#"{"error":{"message":"the request body must be a JSON object","type":"invalid_request_error","param":null,"code":"invalid_json"}}"#
        ]],
    );
    check(
        "[1",
        expect![[
            r#"{"error":{"message":"the request body must be a JSON object","type":"invalid_request_error","param":null,"code":"invalid_json"}}"#
        ]],
    );
    check(
        r#"{"model": "m""#,
        expect![[
            r#"{"error":{"message":"the request body is not valid JSON: EOF while parsing an object at line 1 column 13","type":"invalid_request_error","param":null,"code":"invalid_json"}}"#
        ]],
    );
    // Which copy of a repeated key counts would differ between this gateway and a backend,
    // whatever the key (escaped names included).
    check(
        r#"{"model": "local", "messages": [], "model": "cloud"}"#,
        expect![[
            r#"{"error":{"message":"the request body has the key `model` more than once","type":"invalid_request_error","param":null,"code":"invalid_json"}}"#
        ]],
    );
    // Past the keys compared in a list, a set finds the repeat, early or late.
    let many = |repeat: &str| {
        let members: Vec<String> = (0..40)
            .map(|index| format!(r#""k{index}": {index}"#))
            .chain([format!(r#""{repeat}": 0"#)])
            .collect();
        format!("{{{}}}", members.join(", "))
    };
    check(
        &many("k3"),
        expect![[
            r#"{"error":{"message":"the request body has the key `k3` more than once","type":"invalid_request_error","param":null,"code":"invalid_json"}}"#
        ]],
    );
    check(
        &many("k39"),
        expect![[
            r#"{"error":{"message":"the request body has the key `k39` more than once","type":"invalid_request_error","param":null,"code":"invalid_json"}}"#
        ]],
    );
    check(
        &many("k40"),
        expect![[r#"Envelope { model: None, stream: false, include_usage: false, user: None }"#]],
    );
    check(
        r#"{"messages": [], "model": "m", "\u006dessages": [{"role": "user", "content": "x"}]}"#,
        expect![[
            r#"{"error":{"message":"the request body has the key `messages` more than once","type":"invalid_request_error","param":null,"code":"invalid_json"}}"#
        ]],
    );
}

#[test]
fn schemas_too_costly_to_turn_into_a_grammar_are_refused_by_name() {
    let properties = |count: usize, required: usize| {
        let names: Vec<String> = (0..count).map(|index| format!("\"p{index}\"")).collect();
        format!(
            r#"{{"type":"object","properties":{{{}}},"required":[{}]}}"#,
            names
                .iter()
                .map(|name| format!("{name}:{{}}"))
                .collect::<Vec<_>>()
                .join(","),
            names[..required].join(",")
        )
    };
    let with_format = |schema: &str| {
        format!(
            r#"{{"messages":[{{"role":"user","content":"x"}}],"response_format":{{"type":"json_schema","json_schema":{{"name":"s","schema":{schema}}}}}}}"#
        )
    };
    let refusal = |body: &str| match parse_chat(body.as_bytes()) {
        Ok(_) => None,
        Err(GatewayError::InvalidValue { param, message }) => Some((param, message)),
        Err(other) => panic!("{other:?}"),
    };
    // 256 optional properties in one object are fine, 257 are not; required ones are cheap.
    assert_eq!(refusal(&with_format(&properties(256, 0))), None);
    let (param, message) = refusal(&with_format(&properties(257, 0))).unwrap();
    assert_eq!(param, "response_format.json_schema.schema");
    assert!(message.contains("257 optional properties"), "{message}");
    assert_eq!(refusal(&with_format(&properties(2_000, 1_900))), None);
    // Nested objects count wherever they are.
    let nested = format!(r#"{{"type":"array","items":{}}}"#, properties(300, 0));
    assert!(refusal(&with_format(&nested)).is_some());
    // OpenAI's 5,000 properties in all.
    let (_, message) = refusal(&with_format(&properties(5_001, 5_001))).unwrap();
    assert!(message.contains("5001 properties in all"), "{message}");
    // Tools: every function's parameters together.
    let tools: Vec<String> = (0..5)
        .map(|index| {
            format!(
                r#"{{"type":"function","function":{{"name":"f{index}","parameters":{}}}}}"#,
                properties(250, 0)
            )
        })
        .collect();
    let body = format!(
        r#"{{"messages":[{{"role":"user","content":"x"}}],"tools":[{}]}}"#,
        tools.join(",")
    );
    let (param, message) = refusal(&body).unwrap();
    assert_eq!(param, "tools");
    assert!(
        message.contains("1250 optional properties in all"),
        "{message}"
    );
    // allOf merges its members into one object, every property of theirs optional, through
    // `$ref`s and the alternatives inside them: 50 references to 200 properties are 10,000
    // optional properties of one object, not 200.
    let definition = properties(200, 200);
    let merged = format!(
        r##"{{"allOf":[{{"anyOf":[{}]}}],"$defs":{{"A":{definition}}}}}"##,
        vec![r##"{"$ref":"#/$defs/A"}"##; 50].join(",")
    );
    let (_, message) = refusal(&with_format(&merged)).unwrap();
    assert!(message.contains("10000 optional properties"), "{message}");
    let inline = format!(r#"{{"allOf":[{}]}}"#, vec![properties(200, 0); 2].join(","));
    assert!(refusal(&with_format(&inline)).is_some());
    // A reference that leads to itself through references alone, under an allOf, would
    // send the converter round for ever (its stack overflowed and the process died): refused
    // as too deep, however the loop is made.
    for cycle in [
        r##"{"type":"object","allOf":[{"$ref":"#/$defs/A"}],"$defs":{"A":{"$ref":"#/$defs/A"}}}"##,
        r##"{"allOf":[{"$ref":"#/$defs/A"}],"$defs":{"A":{"$ref":"#/$defs/B"},"B":{"$ref":"#/$defs/A"}}}"##,
        r##"{"allOf":[{"anyOf":[{"$ref":"#/definitions/A"}]}],"definitions":{"A":{"$ref":"#/definitions/A"}}}"##,
    ] {
        let (_, message) = refusal(&with_format(cycle)).unwrap_or_else(|| panic!("{cycle}"));
        assert!(message.contains("nested more than 16 deep"), "{message}");
    }
    // A chain of references that ends in a definition is followed to it.
    let chain = format!(
        r##"{{"allOf":[{{"$ref":"#/$defs/A"}},{{"$ref":"#/$defs/A"}}],"$defs":{{"A":{{"$ref":"#/$defs/B"}},"B":{}}}}}"##,
        properties(200, 0)
    );
    let (_, message) = refusal(&with_format(&chain)).unwrap();
    assert!(message.contains("400 optional properties"), "{message}");
    // Deep alternatives beside an object's own optional properties: refused as too deep,
    // not counted past the end of the number.
    let mut deep = String::from(r#"{"type":"string"}"#);
    for _ in 0..17 {
        deep = format!(r#"{{"anyOf":[{deep}]}}"#);
    }
    let beside = format!(r#"{{"type":"object","properties":{{"a":{{}}}},"allOf":[{deep}]}}"#);
    let (_, message) = refusal(&with_format(&beside)).unwrap();
    assert!(message.contains("nested more than 16 deep"), "{message}");
    // A format beside tools goes into the same grammar: their sizes add up.
    let body = format!(
        r#"{{"messages":[{{"role":"user","content":"x"}}],"tools":[{}],"response_format":{{"type":"json_schema","json_schema":{{"name":"s","schema":{}}}}}}}"#,
        tools[..4].join(","),
        properties(250, 0)
    );
    let (param, message) = refusal(&body).unwrap();
    assert_eq!(param, "response_format");
    assert!(
        message.contains("1250 optional properties in all"),
        "{message}"
    );
}

#[test]
fn tokens_that_are_not_utf8_are_named_by_their_bytes() {
    assert_eq!(super::token_text(b" Paris"), " Paris");
    assert_eq!(super::token_text(b"\xe4"), "bytes:\\xe4");
    // Two pieces of characters among the alternatives stay two keys.
    assert_ne!(super::token_text(b"\xe4"), super::token_text(b"\xe5"));
}
