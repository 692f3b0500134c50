//! Chat and completions from the local model over TLS.

use serde_json::{Value, json};
use tests::{API_KEY, Gateway, GatewayOptions, client, serial};

use crate::{block_on, chat, chat_body, sse_payloads};

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

        let models: Value = client()
            .get(gateway.url("/v1/models"))
            .bearer_auth(API_KEY)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(models["object"], "list");
        assert_eq!(models["data"][0]["id"], "smollm2");
        assert_eq!(models["data"][0]["object"], "model");

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
