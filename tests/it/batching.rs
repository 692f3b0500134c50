//! Several requests at once: they share decode steps, a full queue answers 429, and a freed
//! sequence lets the queue move.

use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{Value, json};
use tests::{API_KEY, Gateway, GatewayOptions, client, eventually, serial};

use crate::{block_on, chat_body};

#[test]
fn concurrent_requests_share_decode_steps() {
    let _serial = serial();
    let options = GatewayOptions {
        parallel_sequences: 4,
        ..GatewayOptions::default()
    };
    let gateway = Gateway::start(&options);
    let prompts = [
        "Name three colours.",
        "What is two plus two?",
        "Describe a cat in one sentence.",
        "Say something about rivers.",
    ];
    let answers: Vec<Value> = block_on(async {
        let requests = prompts.iter().map(|prompt| {
            client()
                .post(gateway.url("/v1/chat/completions"))
                .bearer_auth(API_KEY)
                .json(&chat_body(
                    prompt,
                    json!({"max_tokens": 32, "ignore_eos": true}),
                ))
                .send()
        });
        let responses = futures_util::future::join_all(requests).await;
        let mut answers = Vec::new();
        for response in responses {
            let response = response.unwrap();
            assert_eq!(response.status(), 200);
            answers.push(response.json().await.unwrap());
        }
        answers
    });
    for answer in &answers {
        assert_eq!(answer["usage"]["completion_tokens"], 32, "{answer}");
        assert!(
            !answer["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .is_empty()
        );
    }
    // 4 × 32 generated tokens plus the prompts went through fewer decode steps than tokens:
    // sequences were batched together.
    let steps = gateway
        .metric("isthmus_local_decode_steps_total{model=\"smollm2\"}")
        .unwrap();
    let tokens = gateway
        .metric("isthmus_local_batched_tokens_total{model=\"smollm2\"}")
        .unwrap();
    assert!(tokens >= 4.0 * 32.0, "tokens {tokens}");
    assert!(
        steps < 4.0 * 32.0,
        "no batching: {steps} steps for {tokens} tokens"
    );
}

#[test]
fn a_full_queue_answers_429_and_a_freed_sequence_lets_the_queue_move() {
    let _serial = serial();
    let options = GatewayOptions {
        context_tokens: 4096,
        parallel_sequences: 1,
        queue_depth_max: 1,
        ..GatewayOptions::default()
    };
    let gateway = Gateway::start(&options);
    let admin = gateway.admin;
    let queue_depth = move || tests::metric(admin, "isthmus_local_queue_depth{model=\"smollm2\"}");
    block_on(async {
        // Occupies the only sequence for a long time.
        let long = client()
            .post(gateway.url("/v1/chat/completions"))
            .bearer_auth(API_KEY)
            .json(&chat_body(
                "Tell a long story.",
                json!({"stream": true, "ignore_eos": true, "max_tokens": 3500}),
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(long.status(), 200);
        let mut long = long.bytes_stream();
        long.next().await.unwrap().unwrap();
        // Waits in the queue.
        let queued = tokio::spawn(
            client()
                .post(gateway.url("/v1/chat/completions"))
                .bearer_auth(API_KEY)
                .json(&chat_body("Say hi.", json!({"max_tokens": 3})))
                .send(),
        );
        assert!(
            tokio::task::spawn_blocking(move || eventually(
                Duration::from_secs(20),
                || queue_depth() == Some(1.0)
            ))
            .await
            .unwrap()
        );
        // The queue is full: refused at once, with Retry-After.
        let refused = client()
            .post(gateway.url("/v1/chat/completions"))
            .bearer_auth(API_KEY)
            .json(&chat_body("Say hi.", json!({"max_tokens": 3})))
            .send()
            .await
            .unwrap();
        assert_eq!(refused.status(), 429);
        assert_eq!(refused.headers()["retry-after"], "1");
        let body: Value = refused.json().await.unwrap();
        assert_eq!(body["error"]["type"], "rate_limit_error");
        assert_eq!(body["error"]["code"], "queue_full");
        // Leaving frees the sequence; the queued request runs.
        drop(long);
        let queued = queued.await.unwrap().unwrap();
        assert_eq!(queued.status(), 200);
        let body: Value = queued.json().await.unwrap();
        assert!(body["usage"]["completion_tokens"].as_u64().unwrap() >= 1);
    });
}
