//! Chat and completions from the local model over TLS.

use serde_json::{Value, json};
use tests::{API_KEY, Gateway, GatewayOptions, client, serial};

use crate::{
    block_on, chat, chat_body, chat_stream, sse_chunks, sse_content, sse_content_pieces,
    sse_payloads,
};

#[test]
fn chat_completion_over_tls_answers_with_usage_and_routing_headers() {
    let _serial = serial();
    let gateway = Gateway::start(&GatewayOptions::default());
    block_on(async {
        let response = client()
            .post(gateway.url("/v1/chat/completions"))
            .bearer_auth(API_KEY)
            .header("x-request-id", "req-42.a:b")
            .json(&chat_body(
                "What is the capital of France?",
                json!({"max_tokens": 24}),
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let headers = response.headers().clone();
        assert_eq!(headers["x-request-id"], "req-42.a:b");
        assert_eq!(headers["x-isthmus-route"], "local");
        assert_eq!(headers["x-isthmus-target"], "smollm2");
        assert_eq!(headers["x-isthmus-rule"], "default");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["object"], "chat.completion");
        assert_eq!(body["id"], "chatcmpl-req-42.a:b");
        let content = body["choices"][0]["message"]["content"].as_str().unwrap();
        assert!(!content.trim().is_empty(), "empty answer: {body}");
        let finish = body["choices"][0]["finish_reason"].as_str().unwrap();
        assert!(finish == "stop" || finish == "length", "{body}");
        let usage = &body["usage"];
        let completion_tokens = usage["completion_tokens"].as_u64().unwrap();
        assert!((1..=24).contains(&completion_tokens), "{usage}");
        assert!(usage["prompt_tokens"].as_u64().unwrap() > 5);
        assert_eq!(
            usage["total_tokens"].as_u64(),
            Some(usage["prompt_tokens"].as_u64().unwrap() + completion_tokens)
        );

        // A conversation sent again (a long enough prefix is worth reusing) is served from the
        // prefix cache, and says so as OpenAI does.
        let conversation = json!({
            "model": "smollm2",
            "temperature": 0,
            "max_tokens": 8,
            "messages": [
                {"role": "system", "content": "You are the concise assistant of a lighthouse keeper. \
                    You answer questions about the lamp, the lens, the log book and the weather \
                    in one short sentence, and you never invent facts you were not told."},
                {"role": "user", "content": "When is the lamp lit?"},
            ],
        });
        let mut answers = Vec::new();
        for _ in 0..2 {
            let answer: Value = chat(&gateway, &conversation).await;
            answers.push(answer);
        }
        let prompt_tokens = answers[1]["usage"]["prompt_tokens"].as_u64().unwrap();
        assert!(prompt_tokens > 40, "{}", answers[1]);
        // The first time, at most the chat template's opening is shared with the slot's
        // previous request.
        let first_cached = answers[0]["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap();
        assert!(first_cached < prompt_tokens / 4, "{}", answers[0]);
        assert_eq!(
            answers[1]["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64(),
            Some(prompt_tokens - 1),
            "{}",
            answers[1]
        );
        assert_eq!(
            answers[0]["choices"][0]["message"],
            answers[1]["choices"][0]["message"]
        );

        // A request id that is not a sane token is replaced by a generated one.
        let response = client()
            .post(gateway.url("/v1/chat/completions"))
            .header("api-key", API_KEY)
            .header("x-request-id", "bad id with spaces")
            .json(&chat_body(
                "Hi",
                json!({"max_tokens": 2, "model": "gpt-4o-mini"}),
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let id = response.headers()["x-request-id"]
            .to_str()
            .unwrap()
            .to_owned();
        assert!(id.len() == 36 && id != "bad id with spaces", "{id}");
        assert_eq!(
            response.headers()["x-isthmus-target"],
            "smollm2",
            "alias resolves"
        );
    });
    let metrics = gateway.metrics();
    assert!(
        metrics.contains("isthmus_requests_total{route=\"local\",status=\"200\"} 4"),
        "{metrics}"
    );
    let hits = gateway.metric("isthmus_local_prefix_hit_tokens_total{model=\"smollm2\"}");
    assert!(hits.unwrap() >= 10.0, "{metrics}");
    assert!(
        gateway
            .metric("isthmus_completion_tokens_total{route=\"local\"}")
            .unwrap()
            >= 2.0
    );
}

#[test]
fn streamed_chat_sends_one_chunk_per_token_then_usage_and_done() {
    let _serial = serial();
    let gateway = Gateway::start(&GatewayOptions::default());
    block_on(async {
        let body = chat_body(
            "Count from one to twenty in words.",
            json!({"max_tokens": 24, "stream": true, "stream_options": {"include_usage": true}}),
        );
        let response = client()
            .post(gateway.url("/v1/chat/completions"))
            .bearer_auth(API_KEY)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["content-type"], "text/event-stream");
        assert_eq!(response.headers()["x-isthmus-route"], "local");
        let text = response.text().await.unwrap();
        let payloads = sse_payloads(&text);
        assert_eq!(
            payloads.last().map(String::as_str),
            Some("[DONE]"),
            "{text}"
        );
        let chunks: Vec<Value> = payloads[..payloads.len() - 1]
            .iter()
            .map(|payload| serde_json::from_str(payload).unwrap())
            .collect();
        // First chunk: the role. Then one chunk per token, then the finish, then the usage.
        assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
        let usage_chunk = chunks.last().unwrap();
        assert_eq!(usage_chunk["choices"], json!([]));
        let completion_tokens = usage_chunk["usage"]["completion_tokens"].as_u64().unwrap();
        let finish_chunk = &chunks[chunks.len() - 2];
        let finish = finish_chunk["choices"][0]["finish_reason"]
            .as_str()
            .unwrap();
        assert!(finish == "stop" || finish == "length");
        let token_chunks = &chunks[1..chunks.len() - 2];
        assert_eq!(token_chunks.len() as u64, completion_tokens, "{text}");
        assert!(token_chunks.iter().all(|chunk| chunk["usage"].is_null()));
        let content: String = chunks
            .iter()
            .filter_map(|chunk| chunk["choices"][0]["delta"]["content"].as_str())
            .collect();
        assert!(!content.trim().is_empty());

        // The same prompt without streaming gives the same greedy text.
        let body = chat_body(
            "Count from one to twenty in words.",
            json!({"max_tokens": 24}),
        );
        let whole: Value = chat(&gateway, &body).await;
        assert_eq!(
            whole["choices"][0]["message"]["content"].as_str().unwrap(),
            content
        );
        assert_eq!(
            whole["usage"]["completion_tokens"].as_u64().unwrap(),
            completion_tokens
        );
    });
}

#[test]
fn stop_sequence_ends_the_answer_before_it() {
    let _serial = serial();
    let gateway = Gateway::start(&GatewayOptions::default());
    block_on(async {
        let prompt = "List the numbers 1 to 10 separated by commas.";
        let unrestricted: Value = client()
            .post(gateway.url("/v1/chat/completions"))
            .bearer_auth(API_KEY)
            .json(&chat_body(prompt, json!({"max_tokens": 40})))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let full = unrestricted["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(full.contains('5'), "the model should count: {full}");
        let stop = "5";
        let expected = &full[..full.find(stop).unwrap()];
        for stream in [false, true] {
            let body = chat_body(
                prompt,
                json!({"max_tokens": 40, "stop": [stop, "never-appears"], "stream": stream}),
            );
            let response = client()
                .post(gateway.url("/v1/chat/completions"))
                .bearer_auth(API_KEY)
                .json(&body)
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200);
            let (content, finish) = if stream {
                let text = response.text().await.unwrap();
                let chunks: Vec<Value> = sse_payloads(&text)
                    .iter()
                    .filter(|payload| *payload != "[DONE]")
                    .map(|payload| serde_json::from_str(payload).unwrap())
                    .collect();
                let content: String = chunks
                    .iter()
                    .filter_map(|chunk| chunk["choices"][0]["delta"]["content"].as_str())
                    .collect();
                let finish = chunks
                    .iter()
                    .find_map(|chunk| chunk["choices"][0]["finish_reason"].as_str())
                    .unwrap()
                    .to_owned();
                (content, finish)
            } else {
                let body: Value = response.json().await.unwrap();
                (
                    body["choices"][0]["message"]["content"]
                        .as_str()
                        .unwrap()
                        .to_owned(),
                    body["choices"][0]["finish_reason"]
                        .as_str()
                        .unwrap()
                        .to_owned(),
                )
            };
            assert_eq!(content, expected, "stream={stream}");
            assert!(!content.contains(stop));
            assert_eq!(finish, "stop");
        }
    });
}

#[test]
fn completions_models_and_the_azure_form_are_served() {
    let _serial = serial();
    let gateway = Gateway::start(&GatewayOptions::default());
    block_on(async {
        let body: Value = client()
            .post(gateway.url("/v1/completions"))
            .bearer_auth(API_KEY)
            .json(&json!({"model": "smollm2", "prompt": "The quick brown fox", "temperature": 0}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(body["object"], "text_completion");
        assert!(!body["choices"][0]["text"].as_str().unwrap().is_empty());
        assert_eq!(
            body["usage"]["completion_tokens"], 16,
            "legacy default max_tokens: {body}"
        );

        several_prompts_and_token_ids(&gateway).await;

        let get = |path: &str| client().get(gateway.url(path)).bearer_auth(API_KEY).send();
        let models: Value = get("/v1/models").await.unwrap().json().await.unwrap();
        assert_eq!(models["object"], "list");
        assert_eq!(models["data"][0]["id"], "smollm2");
        assert_eq!(models["data"][0]["object"], "model");
        // One model, by its name or an alias (escaped or not); an unknown one is a 404.
        for (path, id) in [
            ("/v1/models/smollm2", "smollm2"),
            ("/v1/models/gpt-4o-mini", "gpt-4o-mini"),
            ("/openai/v1/models/smoll%6D2", "smollm2"),
        ] {
            let model: Value = get(path).await.unwrap().json().await.unwrap();
            assert_eq!(
                (model["id"].as_str(), model["object"].as_str()),
                (Some(id), Some("model")),
                "{path}: {model}"
            );
            assert_eq!(model["created"], models["data"][0]["created"]);
        }
        let missing = get("/v1/models/org%2Fno-such-model").await.unwrap();
        assert_eq!(missing.status(), 404);
        let body: Value = missing.json().await.unwrap();
        assert_eq!(body["error"]["code"], "model_not_found");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("`org/no-such-model`"),
            "{body}"
        );

        let response = client()
            .post(
                gateway.url("/openai/deployments/smollm2/chat/completions?api-version=2024-10-21"),
            )
            .header("api-key", API_KEY)
            .json(&json!({"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["x-isthmus-target"], "smollm2");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["object"], "chat.completion");
    });
    let (status, body) = tests::plain_get(gateway.admin, "/healthz").unwrap();
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    let (status, body) = tests::plain_get(gateway.admin, "/readyz").unwrap();
    assert_eq!(status, 200);
    assert!(body.contains("\"ready\":true"), "{body}");
}

/// Legacy completions with several prompts (choices prompt-major, each prompt billed once,
/// whole or streamed) and with token ids (used as given), on a gateway of two sequences.
async fn several_prompts_and_token_ids(gateway: &Gateway) {
    let complete = |body: Value| async move {
        let response = crate::post_json(gateway, "/v1/completions", &body).await;
        (response.status().as_u16(), response.text().await.unwrap())
    };
    // Continuations the model is sure of: greedy, alone or beside another prompt, they agree.
    let prompts = ["1, 2, 3, 4, 5, 6,", "Monday, Tuesday, Wednesday,"];
    let body = |prompt: Value| json!({"model": "smollm2", "prompt": prompt, "max_tokens": 4, "temperature": 0});
    let mut solo = Vec::new();
    for prompt in prompts {
        let (status, text) = complete(body(json!(prompt))).await;
        assert_eq!(status, 200, "{text}");
        solo.push(serde_json::from_str::<Value>(&text).unwrap());
    }
    let (status, text) = complete(body(json!(prompts))).await;
    assert_eq!(status, 200, "{text}");
    let both: Value = serde_json::from_str(&text).unwrap();
    let choices = both["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 2, "{both}");
    for (index, (choice, alone)) in choices.iter().zip(&solo).enumerate() {
        assert_eq!(choice["index"], index, "{both}");
        assert_eq!(choice["text"], alone["choices"][0]["text"], "{both}");
    }
    let billed = |answer: &Value, field: &str| answer["usage"][field].as_u64().unwrap();
    assert_eq!(
        billed(&both, "prompt_tokens"),
        billed(&solo[0], "prompt_tokens") + billed(&solo[1], "prompt_tokens"),
        "{both}"
    );
    assert_eq!(billed(&both, "completion_tokens"), 8, "{both}");
    let mut streamed = body(json!(prompts));
    streamed["stream"] = json!(true);
    let (status, text) = complete(streamed).await;
    assert_eq!(status, 200, "{text}");
    let chunks = sse_chunks(&text);
    for (index, alone) in solo.iter().enumerate() {
        let own: String = chunks
            .iter()
            .filter_map(|chunk| chunk["choices"].as_array()?.first())
            .filter(|choice| choice["index"] == index)
            .filter_map(|choice| choice["text"].as_str())
            .collect();
        assert_eq!(own, alone["choices"][0]["text"].as_str().unwrap(), "{text}");
    }

    // Token ids go to the model as they are: three ids are three prompt tokens (no start
    // token added, no digits tokenized), one list or several.
    let (status, text) = complete(body(json!([504, 2365, 6354]))).await;
    assert_eq!(status, 200, "{text}");
    let answer: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(answer["usage"]["prompt_tokens"], 3, "{answer}");
    let (status, text) = complete(body(json!([[504, 2365], [6354]]))).await;
    assert_eq!(status, 200, "{text}");
    let answer: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(answer["usage"]["prompt_tokens"], 3, "{answer}");
    assert_eq!(answer["choices"].as_array().unwrap().len(), 2, "{answer}");

    // An id outside the vocabulary, and more choices than sequences, are refused by name.
    for (prompt, extra, needle) in [
        (
            json!([[504], [4_000_000]]),
            json!({}),
            "prompt 1: token 4000000 is not in the vocabulary of `smollm2` (49152 tokens)",
        ),
        (
            json!(prompts),
            json!({"n": 2}),
            "2 prompts with n = 2 ask for 4",
        ),
    ] {
        let mut request = body(prompt);
        request
            .as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let (status, text) = complete(request).await;
        assert_eq!(status, 400, "{text}");
        let error: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(error["error"]["param"], "prompt", "{error}");
        assert!(
            error["error"]["message"].as_str().unwrap().contains(needle),
            "{error}"
        );
    }
}

#[test]
fn a_json_response_format_gives_json_that_matches_the_schema() {
    let _serial = serial();
    let gateway = Gateway::start(&GatewayOptions::default());
    let schema = json!({
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 24},
            "country": {"type": "string", "enum": ["France", "Italy", "Spain"]},
            "population_millions": {"type": "integer", "minimum": 0, "maximum": 100},
        },
        "required": ["city", "country", "population_millions"],
        "additionalProperties": false,
    });
    let matches_schema = |content: &str| {
        let value: Value = serde_json::from_str(content)
            .unwrap_or_else(|error| panic!("not JSON ({error}): {content}"));
        let object = value.as_object().unwrap();
        assert_eq!(object.len(), 3, "{content}");
        assert!(object["city"].as_str().unwrap().chars().count() <= 24);
        assert!(["France", "Italy", "Spain"].contains(&object["country"].as_str().unwrap()));
        assert!(object["population_millions"].as_u64().unwrap() <= 100);
    };
    block_on(async {
        let format = json!({
            "type": "json_schema",
            "json_schema": {"name": "city", "strict": true, "schema": schema},
        });
        let body = chat_body(
            "Describe Paris.",
            json!({"max_tokens": 200, "response_format": format}),
        );
        let whole = chat(&gateway, &body).await;
        assert_eq!(whole["choices"][0]["finish_reason"], "stop", "{whole}");
        let content = whole["choices"][0]["message"]["content"].as_str().unwrap();
        matches_schema(content);

        // Streamed, the chunks join into the same JSON.
        let text = chat_stream(&gateway, &body).await;
        assert_eq!(sse_content(&text), content);

        // Sampled rather than greedy, the schema still holds.
        let sampled = chat_body(
            "Describe Rome.",
            json!({"max_tokens": 200, "response_format": format, "temperature": 1.0, "seed": 3}),
        );
        let answer = chat(&gateway, &sampled).await;
        assert_eq!(answer["choices"][0]["finish_reason"], "stop", "{answer}");
        matches_schema(answer["choices"][0]["message"]["content"].as_str().unwrap());

        // `json_object`: some JSON object.
        let object = chat_body(
            "Give the capital of France as JSON.",
            json!({"max_tokens": 200, "response_format": {"type": "json_object"}}),
        );
        let answer = chat(&gateway, &object).await;
        let content = answer["choices"][0]["message"]["content"].as_str().unwrap();
        if answer["choices"][0]["finish_reason"] == "stop" {
            let value: Value = serde_json::from_str(content).unwrap();
            assert!(value.is_object(), "{content}");
        } else {
            assert!(content.trim_start().starts_with('{'), "{content}");
        }

        // The answer's keys follow the schema's `properties` in the order the client wrote.
        let ordered = r#"{"model": "smollm2", "temperature": 0, "max_tokens": 100,
            "messages": [{"role": "user", "content": "John Smith is 42."}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "person",
                "schema": {"type": "object", "additionalProperties": false,
                    "required": ["surname", "age"],
                    "properties": {"surname": {"type": "string", "maxLength": 20},
                        "age": {"type": "integer", "minimum": 0, "maximum": 150}}}}}}"#;
        let answer: Value = client()
            .post(gateway.url("/v1/chat/completions"))
            .bearer_auth(API_KEY)
            .header("content-type", "application/json")
            .body(ordered)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let content = answer["choices"][0]["message"]["content"].as_str().unwrap();
        let surname = content.find("\"surname\"").unwrap_or(usize::MAX);
        let age = content.find("\"age\"").unwrap_or(usize::MAX);
        assert!(surname < age && age != usize::MAX, "{content}");

        // A schema the converter cannot follow is refused, naming the field.
        let unresolved = chat_body(
            "Describe Paris.",
            json!({"response_format": {"type": "json_schema", "json_schema": {
                "name": "broken", "schema": {"$ref": "#/$defs/missing"}}}}),
        );
        refused(&gateway, &unresolved, "response_format.json_schema.schema").await;
    });
}

#[test]
fn logprobs_come_with_each_token_whole_or_streamed() {
    let _serial = serial();
    let gateway = Gateway::start(&GatewayOptions::default());
    block_on(async {
        let extra = json!({"max_tokens": 16, "logprobs": true, "top_logprobs": 2});
        let whole = chat(&gateway, &chat_body("Name three colours.", extra.clone())).await;
        let content = whole["choices"][0]["message"]["content"].as_str().unwrap();
        let entries = whole["choices"][0]["logprobs"]["content"]
            .as_array()
            .unwrap_or_else(|| panic!("no logprobs: {whole}"));
        assert_eq!(
            entries.len() as u64,
            whole["usage"]["completion_tokens"].as_u64().unwrap()
        );
        // The tokens' bytes are the answer; greedy, each token is the likeliest.
        let bytes: Vec<u8> = entries
            .iter()
            .flat_map(|entry| entry["bytes"].as_array().unwrap().clone())
            .map(|byte| u8::try_from(byte.as_u64().unwrap()).unwrap())
            .collect();
        assert_eq!(String::from_utf8(bytes).unwrap(), content);
        for entry in entries {
            let top = entry["top_logprobs"].as_array().unwrap();
            assert_eq!(top.len(), 2, "{entry}");
            assert_eq!(top[0]["token"], entry["token"]);
            assert_eq!(top[0]["logprob"], entry["logprob"]);
            assert!(entry["logprob"].as_f64().unwrap() <= 0.0);
        }

        // Streamed: each token's chunk carries its entry, the same as whole.
        let text = chat_stream(&gateway, &chat_body("Name three colours.", extra)).await;
        let chunks: Vec<Value> = sse_chunks(&text);
        let streamed_entries: Vec<Value> = chunks
            .iter()
            .filter_map(|chunk| chunk["choices"][0]["logprobs"]["content"].as_array())
            .flatten()
            .cloned()
            .collect();
        assert_eq!(&streamed_entries, entries);

        // A stop string (a later token's text, found nowhere before it): the entries of the
        // tokens that made it up are left out, whole and streamed, so the entries' bytes are
        // still the answer.
        let mut offset = 0;
        let mut stop = None;
        for (index, entry) in entries.iter().enumerate() {
            let token = entry["token"].as_str().unwrap();
            if index >= entries.len() / 2
                && !token.trim().is_empty()
                && !token.contains('\u{fffd}')
                && content.find(token) == Some(offset)
            {
                stop = Some(token.to_owned());
                break;
            }
            offset += entry["bytes"].as_array().unwrap().len();
        }
        let stop = stop.expect("a token that occurs once in the second half of the answer");
        let extra = json!({"max_tokens": 16, "logprobs": true, "top_logprobs": 2, "stop": [stop]});
        let stopped = chat(&gateway, &chat_body("Name three colours.", extra.clone())).await;
        assert_eq!(
            stopped["choices"][0]["message"]["content"],
            content[..offset],
            "{stop:?}"
        );
        let kept = &stopped["choices"][0]["logprobs"]["content"];
        assert_eq!(
            kept.as_array().unwrap()[..],
            entries[..kept.as_array().unwrap().len()]
        );
        assert_eq!(
            kept.as_array().unwrap().len() + 1,
            stopped["usage"]["completion_tokens"].as_u64().unwrap() as usize
        );
        let text = chat_stream(&gateway, &chat_body("Name three colours.", extra)).await;
        let streamed: Vec<Value> = sse_chunks(&text)
            .into_iter()
            .filter_map(|chunk| {
                chunk["choices"][0]["logprobs"]["content"]
                    .as_array()
                    .cloned()
            })
            .flatten()
            .collect();
        assert_eq!(&streamed, kept.as_array().unwrap());

        // Legacy completions: parallel arrays.
        let completion: Value = client()
            .post(gateway.url("/v1/completions"))
            .bearer_auth(API_KEY)
            .json(
                &json!({"model": "smollm2", "prompt": "The sky is", "max_tokens": 8,
                "temperature": 0, "logprobs": 2}),
            )
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let logprobs = &completion["choices"][0]["logprobs"];
        let tokens: Vec<&str> = logprobs["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|token| token.as_str().unwrap())
            .collect();
        assert_eq!(
            tokens.concat(),
            completion["choices"][0]["text"].as_str().unwrap()
        );
        assert_eq!(
            logprobs["token_logprobs"].as_array().unwrap().len(),
            tokens.len()
        );
        assert_eq!(logprobs["text_offset"][0], 0);
        assert!(
            logprobs["top_logprobs"]
                .as_array()
                .unwrap()
                .iter()
                .all(|top| top.as_object().unwrap().len() == 2)
        );
    });
}

#[test]
fn logit_bias_steers_local_answers_and_unknown_tokens_are_refused() {
    let _serial = serial();
    let gateway = Gateway::start(&GatewayOptions::default());
    block_on(async {
        // +100 makes one token the only choice: the answer is that token, over and over.
        let forced = chat(
            &gateway,
            &chat_body(
                "Name three colours.",
                json!({"max_tokens": 3, "logit_bias": {"1000": 100}, "logprobs": true,
                    "frequency_penalty": 0.5, "presence_penalty": 0.5}),
            ),
        )
        .await;
        let entries = forced["choices"][0]["logprobs"]["content"]
            .as_array()
            .unwrap_or_else(|| panic!("{forced}"));
        assert_eq!(entries.len(), 3, "{forced}");
        assert!(
            entries
                .iter()
                .all(|entry| entry["bytes"] == entries[0]["bytes"]),
            "{forced}"
        );
        let content = forced["choices"][0]["message"]["content"].as_str().unwrap();
        let piece = entries[0]["token"].as_str().unwrap();
        assert_eq!(content, piece.repeat(3));

        // A request refused before it was queued costs its caller nothing: no prompt
        // tokens counted (for limits and budgets, in metrics and the audit record).
        let counted = || {
            gateway
                .metric("isthmus_prompt_tokens_total{route=\"local\"}")
                .unwrap_or(0.0)
        };
        let before = counted();
        let unknown = chat_body("Hi", json!({"logit_bias": {"99999999": -100}}));
        refused(&gateway, &unknown, "logit_bias.99999999").await;
        // An answered request after it: once its prompt is counted, the count is its alone.
        let answered = chat(&gateway, &chat_body("Hi", json!({"max_tokens": 1}))).await;
        let prompt = answered["usage"]["prompt_tokens"].as_f64().unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while counted() < before + prompt && std::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert_eq!(counted(), before + prompt);
    });
}

#[test]
fn n_choices_are_generated_side_by_side_whole_or_streamed() {
    let _serial = serial();
    let gateway = Gateway::start(&GatewayOptions {
        parallel_sequences: 4,
        ..GatewayOptions::default()
    });
    block_on(async {
        // Sampled: each choice draws with its own seed; the prompt is billed once.
        let sampled = chat(
            &gateway,
            &chat_body(
                "Name a colour.",
                json!({"max_tokens": 12, "n": 3, "temperature": 1.0, "seed": 5, "logprobs": true}),
            ),
        )
        .await;
        let choices = sampled["choices"].as_array().unwrap();
        assert_eq!(choices.len(), 3, "{sampled}");
        let mut tokens = 0;
        let mut texts = Vec::new();
        for (index, choice) in choices.iter().enumerate() {
            assert_eq!(choice["index"], index);
            assert!(choice["finish_reason"] == "stop" || choice["finish_reason"] == "length");
            tokens += choice["logprobs"]["content"].as_array().unwrap().len() as u64;
            texts.push(choice["message"]["content"].as_str().unwrap().to_owned());
        }
        assert_eq!(sampled["usage"]["completion_tokens"], tokens, "{sampled}");
        texts.sort();
        texts.dedup();
        assert!(texts.len() > 1, "three draws, one answer: {sampled}");
        let single = chat(
            &gateway,
            &chat_body("Name a colour.", json!({"max_tokens": 1})),
        )
        .await;
        assert_eq!(
            sampled["usage"]["prompt_tokens"],
            single["usage"]["prompt_tokens"]
        );

        // Greedy choices agree; streamed, each index has its role, text and finish.
        let greedy = chat_body("Name three colours.", json!({"max_tokens": 12, "n": 2}));
        let whole = chat(&gateway, &greedy).await;
        let content = whole["choices"][0]["message"]["content"].as_str().unwrap();
        assert_eq!(whole["choices"][1]["message"]["content"], content);
        let text = chat_stream(&gateway, &greedy).await;
        let chunks: Vec<Value> = sse_chunks(&text);
        for index in 0..2 {
            let own: Vec<&Value> = chunks
                .iter()
                .filter_map(|chunk| chunk["choices"].as_array()?.first())
                .filter(|choice| choice["index"] == index)
                .collect();
            assert_eq!(own[0]["delta"]["role"], "assistant", "{text}");
            assert!(own.last().unwrap()["finish_reason"].is_string(), "{text}");
            let streamed: String = own
                .iter()
                .filter_map(|choice| choice["delta"]["content"].as_str())
                .collect();
            assert_eq!(streamed, content);
        }

        // Time per output token follows one choice's tokens, not all choices' together: the
        // 15 gaps after the first token of the longest choice span the request's time after
        // its first token, both as the gateway measured them (summed over three choices it
        // would be three times that). A 3x difference, not a speed: the ratio's bounds
        // leave room for the header and the last bytes, which the request's time includes.
        let tpot = "gen_ai_server_time_per_output_token_seconds";
        let ttft = "gen_ai_server_time_to_first_token_seconds";
        let duration = "gen_ai_server_request_duration_seconds";
        let before = gateway.metrics();
        chat(
            &gateway,
            &chat_body(
                "Name three colours.",
                json!({"max_tokens": 16, "ignore_eos": true, "n": 3}),
            ),
        )
        .await;
        let after = gateway.metrics();
        let grew = |name: &str| histogram(&after, name).0 - histogram(&before, name).0;
        let (per_token, first, whole) = (grew(tpot), grew(ttft), grew(duration));
        let after_first = whole - first;
        assert!(
            (0.5..1.5).contains(&(per_token * 15.0 / after_first)),
            "time per output token {:.2} ms, 15 gaps against {:.1} ms of the request after its first token",
            per_token * 1e3,
            after_first * 1e3
        );

        // More choices than the model has sequences is refused.
        refused(&gateway, &chat_body("Hi", json!({"n": 16})), "n").await;
    });
}

/// The sum and count of a histogram of `/metrics`, over its label sets.
fn histogram(metrics: &str, name: &str) -> (f64, f64) {
    let total = |suffix: &str| -> f64 {
        let series = format!("{name}{suffix}");
        metrics
            .lines()
            .filter(|line| line.starts_with(&series))
            .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    (total("_sum"), total("_count"))
}

#[test]
fn tool_calls_come_back_as_tool_calls_whole_or_streamed() {
    let _serial = serial();
    let gateway = Gateway::start(&GatewayOptions::default());
    let tools = json!([
        {"type": "function", "function": {"name": "get_weather",
            "description": "The current weather in a city",
            "parameters": {"type": "object", "additionalProperties": false, "required": ["city"],
                "properties": {"city": {"type": "string", "maxLength": 30}}}}},
        {"type": "function", "function": {"name": "get_time",
            "description": "The current time in a time zone",
            "parameters": {"type": "object", "additionalProperties": false, "required": ["zone"],
                "properties": {"zone": {"type": "string", "enum": ["UTC", "CET", "PST"]}}}}},
    ]);
    let check_call = |call: &Value| {
        assert_eq!(call["type"], "function", "{call}");
        let name = call["function"]["name"].as_str().unwrap();
        let arguments: Value =
            serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
        match name {
            "get_weather" => assert!(arguments["city"].as_str().unwrap().chars().count() <= 30),
            "get_time" => {
                assert!(["UTC", "CET", "PST"].contains(&arguments["zone"].as_str().unwrap()))
            }
            other => panic!("called {other}"),
        }
        name.to_owned()
    };
    block_on(async {
        // A named function: that call, with arguments that match its parameters.
        let named = chat_body(
            "What is the weather like in Oslo?",
            json!({"max_tokens": 64, "tools": tools,
                "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}),
        );
        let answer = chat(&gateway, &named).await;
        let choice = &answer["choices"][0];
        assert_eq!(choice["finish_reason"], "tool_calls", "{answer}");
        assert!(choice["message"]["content"].is_null(), "{answer}");
        assert_eq!(
            check_call(&choice["message"]["tool_calls"][0]),
            "get_weather"
        );

        // Streamed as OpenAI streams a call: the first delta carries its id and name, the
        // next ones its arguments as they are written; joined, the same call, then the finish.
        let text = chat_stream(&gateway, &named).await;
        let whole = &choice["message"]["tool_calls"][0];
        let calls = streamed_call(&text, whole, "tool_calls");
        assert!(calls.len() >= 3, "the call came in {} deltas", calls.len());
        assert!(calls.iter().all(|call| call["index"] == 0));
        assert!(
            calls[0]["id"].as_str().unwrap().starts_with("call_"),
            "{text}"
        );
        assert_eq!(calls[0]["type"], "function");
        assert!(calls[1..].iter().all(|call| call.get("id").is_none()));

        // `parallel_tool_calls: true`: one or more calls (up to 8), each whole in the answer
        // and streamed under its own `index`, the deltas of each joining into that call.
        let parallel = chat_body(
            "What is the weather like in Oslo, and what time is it in Paris?",
            json!({"max_tokens": 96, "tools": tools, "tool_choice": "required",
                "parallel_tool_calls": true}),
        );
        let answer = chat(&gateway, &parallel).await;
        let choice = &answer["choices"][0];
        assert_eq!(choice["finish_reason"], "tool_calls", "{answer}");
        let whole = choice["message"]["tool_calls"].as_array().unwrap();
        assert!((1..=8).contains(&whole.len()), "{answer}");
        whole.iter().for_each(|call| {
            check_call(call);
        });
        let text = chat_stream(&gateway, &parallel).await;
        let mut streamed: Vec<(String, String)> = Vec::new();
        for chunk in sse_chunks(&text) {
            let Some(entries) = chunk["choices"][0]["delta"]["tool_calls"].as_array() else {
                continue;
            };
            for entry in entries {
                let at = entry["index"].as_u64().unwrap() as usize;
                if let Some(name) = entry["function"]["name"].as_str() {
                    assert_eq!(at, streamed.len(), "{text}");
                    streamed.push((name.to_owned(), String::new()));
                }
                streamed[at].1 += entry["function"]["arguments"].as_str().unwrap();
            }
        }
        let whole: Vec<(String, String)> = whole
            .iter()
            .map(|call| {
                let function = &call["function"];
                let text = |key: &str| function[key].as_str().unwrap().to_owned();
                (text("name"), text("arguments"))
            })
            .collect();
        assert_eq!(streamed, whole, "{text}");

        // `n` choices streamed: each choice's call is read apart from the others'.
        let mut two = named.clone();
        two["n"] = json!(2);
        two["temperature"] = json!(0.9);
        two["seed"] = json!(7);
        two["max_tokens"] = json!(128);
        let text = chat_stream(&gateway, &two).await;
        let mut arguments = [String::new(), String::new()];
        let mut named_choices = [0, 0];
        for chunk in sse_chunks(&text) {
            let Some(choice) = chunk["choices"].get(0) else {
                continue;
            };
            let index = choice["index"].as_u64().unwrap() as usize;
            if let Some(entry) = choice["delta"]["tool_calls"].get(0) {
                if entry["function"]["name"] == "get_weather" {
                    named_choices[index] += 1;
                }
                arguments[index] += entry["function"]["arguments"].as_str().unwrap();
            }
        }
        assert_eq!(named_choices, [1, 1], "{text}");
        for arguments in &arguments {
            let arguments: Value = serde_json::from_str(arguments).unwrap();
            assert!(arguments["city"].is_string(), "{text}");
        }

        // The older `functions` / `function_call`: the same call as `message.function_call`
        // with `finish_reason: "function_call"`, streamed as `delta.function_call` pieces.
        let functions: Vec<Value> = tools
            .as_array()
            .unwrap()
            .iter()
            .map(|tool| tool["function"].clone())
            .collect();
        let legacy = chat_body(
            "What is the weather like in Oslo?",
            json!({"max_tokens": 64, "functions": functions,
                "function_call": {"name": "get_weather"}}),
        );
        let answer = chat(&gateway, &legacy).await;
        let choice = &answer["choices"][0];
        assert_eq!(choice["finish_reason"], "function_call", "{answer}");
        assert!(choice["message"].get("tool_calls").is_none(), "{answer}");
        let call = &choice["message"]["function_call"];
        assert_eq!(
            check_call(&json!({"type": "function", "function": call})),
            "get_weather"
        );
        let text = chat_stream(&gateway, &legacy).await;
        let whole = json!({"function": call});
        assert!(streamed_call(&text, &whole, "function_call").len() >= 2);

        // `required`: one of the offered functions; with the call and its result in the
        // history the conversation goes on.
        let required = chat(
            &gateway,
            &chat_body(
                "What time is it in Paris?",
                json!({"max_tokens": 64, "tools": tools, "tool_choice": "required"}),
            ),
        )
        .await;
        let call = &required["choices"][0]["message"]["tool_calls"][0];
        check_call(call);
        // Stop strings would be matched against the JSON the answer is written in: refused.
        let with_stop = chat_body(
            "What time is it in Paris?",
            json!({"max_tokens": 64, "tools": tools, "stop": ["\n"]}),
        );
        refused(&gateway, &with_stop, "stop").await;
        let follow_up = json!({
            "model": "smollm2", "temperature": 0, "max_tokens": 16,
            "messages": [
                {"role": "user", "content": "What time is it in Paris?"},
                {"role": "assistant", "content": null, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": call["id"], "content": "14:05"},
            ],
        });
        let answer = chat(&gateway, &follow_up).await;
        assert!(
            answer["choices"][0]["message"]["content"].is_string(),
            "{answer}"
        );

        // `auto` (the default with tools): a call, or text when the model writes no call,
        // never the JSON that held it. With the demo model a weather question gets a call and
        // a poet thanked gets text (at least one of two such prompts, should a near tie flip).
        let mut texts = 0;
        for (system, prompt) in [
            ("You answer briefly.", "What is the weather like in Oslo?"),
            ("You are a poet.", "Thank you!"),
            ("You are a poet.", "Write one word: hello."),
        ] {
            let body = json!({"model": "smollm2", "temperature": 0, "max_tokens": 40,
                "tools": tools, "messages": [{"role": "system", "content": system},
                    {"role": "user", "content": prompt}]});
            let answer = chat(&gateway, &body).await;
            let choice = &answer["choices"][0];
            if choice["finish_reason"] == "tool_calls" {
                check_call(&choice["message"]["tool_calls"][0]);
            } else {
                assert_eq!(choice["finish_reason"], "stop", "{answer}");
                let content = choice["message"]["content"].as_str().unwrap();
                assert!(
                    !content.is_empty() && !content.contains("\"response\""),
                    "{answer}"
                );
                assert!(choice["message"].get("tool_calls").is_none(), "{answer}");
                texts += 1;
                // Streamed, the text comes piece by piece as it is written, not at the end.
                let stream = chat_stream(&gateway, &body).await;
                let pieces: Vec<String> = sse_content_pieces(&stream)
                    .into_iter()
                    .filter(|piece| !piece.is_empty())
                    .collect();
                assert_eq!(pieces.concat(), content, "{stream}");
                assert!(
                    content.chars().count() < 4 || pieces.len() > 1,
                    "one piece: {stream}"
                );
                assert!(!stream.contains("tool_calls"), "{stream}");
            }
        }
        assert!(texts >= 1, "no auto answer was text");

        // `auto` with a `response_format` (an agent's structured output beside its tools):
        // a call, or text that is JSON of the format, whole as streamed.
        let format = json!({"type": "json_schema", "json_schema": {"name": "reply", "schema":
            {"type": "object", "additionalProperties": false, "required": ["reply"],
             "properties": {"reply": {"type": "string", "maxLength": 40}}}}});
        let mut structured = 0;
        for (system, prompt) in [
            ("You are a poet.", "Thank you!"),
            ("You are a poet.", "Write one word: hello."),
        ] {
            let body = json!({"model": "smollm2", "temperature": 0, "max_tokens": 60,
                "tools": tools, "response_format": format,
                "messages": [{"role": "system", "content": system},
                    {"role": "user", "content": prompt}]});
            let answer = chat(&gateway, &body).await;
            let choice = &answer["choices"][0];
            if choice["finish_reason"] == "tool_calls" {
                check_call(&choice["message"]["tool_calls"][0]);
                continue;
            }
            assert_eq!(choice["finish_reason"], "stop", "{answer}");
            let content = choice["message"]["content"].as_str().unwrap();
            let reply: Value =
                serde_json::from_str(content).unwrap_or_else(|error| panic!("{error}: {answer}"));
            assert!(reply["reply"].is_string(), "{answer}");
            let stream = chat_stream(&gateway, &body).await;
            assert_eq!(sse_content_pieces(&stream).concat(), content, "{stream}");
            structured += 1;
        }
        assert!(structured >= 1, "no auto answer with a format was text");

        // Cut short by `max_tokens`, whole as streamed: the text so far, or the call begun
        // with the arguments written so far, never the JSON that holds them.
        for max_tokens in [3, 6, 12] {
            for (system, prompt) in [
                ("You answer briefly.", "What is the weather like in Oslo?"),
                ("You are a poet.", "Thank you!"),
            ] {
                let body = json!({"model": "smollm2", "temperature": 0,
                    "max_tokens": max_tokens, "tools": tools,
                    "messages": [{"role": "system", "content": system},
                        {"role": "user", "content": prompt}]});
                let answer = chat(&gateway, &body).await;
                let choice = &answer["choices"][0];
                assert_eq!(choice["finish_reason"], "length", "{answer}");
                let message = &choice["message"];
                let stream = chat_stream(&gateway, &body).await;
                match message["tool_calls"].as_array() {
                    Some(calls) => {
                        let name = calls[0]["function"]["name"].as_str().unwrap();
                        assert!(["get_weather", "get_time"].contains(&name), "{answer}");
                        let streamed = crate::sse_tool_arguments(&stream);
                        assert_eq!(
                            streamed,
                            calls[0]["function"]["arguments"].as_str().unwrap(),
                            "{stream}"
                        );
                    }
                    None => {
                        let content = message["content"].as_str().unwrap_or_default();
                        assert!(!content.contains('{'), "{answer}");
                        assert_eq!(sse_content_pieces(&stream).concat(), content, "{stream}");
                    }
                }
            }
        }
    });
}

/// The deltas of a streamed call (`tool_calls` entries, or the older `function_call`
/// objects), checked against the `whole` call (its `function`): the first names the function,
/// the arguments joined are the whole call's, and the stream finishes with `field`.
fn streamed_call(text: &str, whole: &Value, field: &str) -> Vec<Value> {
    let chunks = sse_chunks(text);
    let deltas: Vec<Value> = chunks
        .iter()
        .filter_map(|chunk| {
            let delta = &chunk["choices"][0]["delta"];
            match field {
                "tool_calls" => delta["tool_calls"].get(0),
                _ => delta.get(field),
            }
            .cloned()
        })
        .collect();
    let function = |delta: &Value| match field {
        "tool_calls" => delta["function"].clone(),
        _ => delta.clone(),
    };
    assert!(!deltas.is_empty(), "{text}");
    assert_eq!(
        function(&deltas[0])["name"],
        whole["function"]["name"],
        "{text}"
    );
    let arguments: String = deltas
        .iter()
        .map(|delta| function(delta)["arguments"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(arguments, whole["function"]["arguments"], "{text}");
    assert!(
        chunks
            .iter()
            .any(|chunk| chunk["choices"][0]["finish_reason"] == field),
        "{text}"
    );
    deltas
}

/// Posts a chat request that must be refused with a 400 naming `param`.
async fn refused(gateway: &Gateway, body: &Value, param: &str) {
    let response = client()
        .post(gateway.url("/v1/chat/completions"))
        .bearer_auth(API_KEY)
        .json(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["param"], param, "{error}");
}

/// An inference thread that panics (a bug; debug builds make one on demand for a prompt
/// holding the token `ISTHMUS_TEST_PANIC_TOKEN` names) fails the request it held with a
/// 500 error body, is counted, restarts, and serves the next request; `/healthz` is ok
/// again once it has.
#[test]
fn a_panicking_inference_thread_fails_its_request_then_serves_again() {
    let _serial = serial();
    let (dir, config_path) = tests::config_file(&GatewayOptions::default());
    let gateway = Gateway::start_with_command(dir, &config_path, |command| {
        command.env("ISTHMUS_TEST_PANIC_TOKEN", "31999");
    });
    let complete = |prompt: Value| {
        let gateway = &gateway;
        async move {
            let body = json!({"model": "smollm2", "prompt": prompt, "max_tokens": 4});
            let response = crate::post_json(gateway, "/v1/completions", &body).await;
            (
                response.status().as_u16(),
                response.json::<Value>().await.unwrap(),
            )
        }
    };
    let (status, body) = block_on(complete(json!([1, 31999, 2])));
    assert_eq!(status, 500, "{body}");
    assert_eq!(body["error"]["code"], "internal_error", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("restarts"),
        "{body}"
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let (status, _) = tests::plain_get(gateway.admin, "/healthz").unwrap();
        let (_, metrics) = tests::plain_get(gateway.admin, "/metrics").unwrap();
        let counted = metrics
            .lines()
            .any(|line| line == "isthmus_local_worker_panics_total{model=\"smollm2\"} 1");
        if status == 200 && counted {
            assert!(
                metrics
                    .lines()
                    .any(|line| line == "isthmus_local_workers_failed{model=\"smollm2\"} 0"),
                "{metrics}"
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the thread did not come back: /healthz {status}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let (status, body) = block_on(complete(json!("Once upon a time")));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["usage"]["completion_tokens"], 4, "{body}");
}

#[test]
fn a_streamed_answer_over_http_1_1_is_chunked_and_the_connection_serves_the_next_request() {
    use std::io::{BufRead, BufReader, Read, Write};
    let _serial = serial();
    let dir = tests::scratch_dir();
    let config_path = dir.path().join("isthmus.toml");
    let text = tests::config_text(&GatewayOptions::default(), dir.path()).replacen(
        "[server]\n",
        "[server]\nplain_listen = \"127.0.0.1:0\"\n",
        1,
    );
    std::fs::write(&config_path, text).unwrap();
    let gateway = Gateway::start_with_config(dir, &config_path);
    let plain = gateway.plain.expect("a plain listener");
    let stream = std::net::TcpStream::connect(plain).unwrap();
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(60)))
        .unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut writer = stream;
    let request = |body: &str| {
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer \
             {API_KEY}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    let body = json!({"model": "smollm2", "max_tokens": 3, "stream": true,
        "messages": [{"role": "user", "content": "Hi"}]})
    .to_string();
    writer.write_all(request(&body).as_bytes()).unwrap();
    // The head: chunked, so that the end of the answer is the final chunk, not a close.
    let mut head = String::new();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        if line == "\r\n" {
            break;
        }
        head.push_str(&line.to_ascii_lowercase());
    }
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("transfer-encoding: chunked"), "{head}");
    // The chunks, to the final one: the events end with [DONE].
    let mut events = String::new();
    loop {
        let mut size = String::new();
        reader.read_line(&mut size).unwrap();
        let size = usize::from_str_radix(size.trim(), 16).unwrap();
        let mut chunk = vec![0_u8; size + 2];
        reader.read_exact(&mut chunk).unwrap();
        if size == 0 {
            break;
        }
        events.push_str(&String::from_utf8_lossy(&chunk[..size]));
    }
    assert!(events.ends_with("data: [DONE]\n\n"), "{events}");
    // The same connection takes the next request.
    let body = json!({"model": "smollm2", "max_tokens": 1,
        "messages": [{"role": "user", "content": "Hi"}]})
    .to_string();
    writer.write_all(request(&body).as_bytes()).unwrap();
    let mut status = String::new();
    reader.read_line(&mut status).unwrap();
    assert!(status.starts_with("HTTP/1.1 200"), "{status:?}");
}
