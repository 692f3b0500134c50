//! End-to-end tests: the real `isthmus` binary, a real model, real TLS, real sockets.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod admin;
mod audit;
mod azure;
mod batching;
mod chat;
mod cloud;
mod complexity;
mod config;
pub(crate) mod console;
pub(crate) mod deploy;
mod embeddings;
mod errors;
pub(crate) mod helm;
mod lifecycle;
pub(crate) mod package;
pub(crate) mod policy;
mod python;
mod rate_limits;
mod responses;
mod telemetry;
mod tidy;
mod update;
mod upstream;
mod waf;

use std::future::Future;

/// Runs an async test body on its own runtime.
pub fn block_on<F: Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(future)
}

/// A chat request body.
pub fn chat_body(content: &str, extra: serde_json::Value) -> serde_json::Value {
    let mut body = serde_json::json!({
        "model": "smollm2",
        "messages": [{"role": "user", "content": content}],
        "temperature": 0,
    });
    if let (Some(body), serde_json::Value::Object(extra)) = (body.as_object_mut(), extra) {
        body.extend(extra);
    }
    body
}

/// The `data:` payloads of an SSE body, in order.
pub fn sse_payloads(text: &str) -> Vec<String> {
    text.split("\n\n")
        .filter_map(|event| event.strip_prefix("data: "))
        .map(str::to_owned)
        .collect()
}

/// The JSON chunks of an SSE body, in order (`[DONE]` left out).
pub fn sse_chunks(text: &str) -> Vec<serde_json::Value> {
    sse_payloads(text)
        .iter()
        .filter_map(|payload| serde_json::from_str(payload).ok())
        .collect()
}

/// The first choice's `delta.content` of each chunk of a streamed chat answer that has one.
pub fn sse_content_pieces(text: &str) -> Vec<String> {
    sse_chunks(text)
        .iter()
        .filter_map(|chunk| {
            chunk["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect()
}

/// The generated text of a streamed chat answer: its chunks' `delta.content`, joined.
pub fn sse_content(text: &str) -> String {
    sse_content_pieces(text).concat()
}

/// The arguments of a streamed chat answer's first tool call: its chunks'
/// `delta.tool_calls[0].function.arguments`, joined.
pub fn sse_tool_arguments(text: &str) -> String {
    sse_chunks(text)
        .iter()
        .filter_map(|chunk| {
            chunk["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"]
                .as_str()
                .map(str::to_owned)
        })
        .collect()
}

/// Posts a chat request with the test key and `stream: true`, and returns the SSE text.
pub async fn chat_stream(gateway: &tests::Gateway, body: &serde_json::Value) -> String {
    let mut body = body.clone();
    body["stream"] = serde_json::json!(true);
    tests::client()
        .post(gateway.url("/v1/chat/completions"))
        .bearer_auth(tests::API_KEY)
        .json(&body)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// Posts `body` to `path` with the test key.
pub async fn post_json(
    gateway: &tests::Gateway,
    path: &str,
    body: &serde_json::Value,
) -> reqwest::Response {
    tests::client()
        .post(gateway.url(path))
        .bearer_auth(tests::API_KEY)
        .json(body)
        .send()
        .await
        .unwrap()
}

/// Posts a chat request with the test key and returns the response body.
pub async fn chat(gateway: &tests::Gateway, body: &serde_json::Value) -> serde_json::Value {
    tests::client()
        .post(gateway.url("/v1/chat/completions"))
        .bearer_auth(tests::API_KEY)
        .json(body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}
