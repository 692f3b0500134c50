use super::{BenchApi, BenchOptions, Percentiles, request_body, words};

#[test]
fn percentiles_use_the_nearest_rank() {
    let values: Vec<f64> = (1..=100).map(f64::from).collect();
    let percentiles = Percentiles::of(values);
    assert_eq!(
        (
            percentiles.p50,
            percentiles.p95,
            percentiles.p99,
            percentiles.max
        ),
        (50.0, 95.0, 99.0, 100.0)
    );
    assert_eq!(percentiles.mean, 50.5);
    assert_eq!(Percentiles::of(vec![7.0]).p99, 7.0);
    assert_eq!(Percentiles::of(Vec::new()).p50, 0.0);
}

fn options(shared_prefix_tokens: u32) -> BenchOptions {
    BenchOptions {
        url: "http://127.0.0.1:1".to_owned(),
        model: "m".to_owned(),
        api_key: None,
        ca_file: None,
        concurrency: 1,
        requests: 1,
        duration: None,
        max_tokens: 8,
        prompt_tokens: 64,
        shared_prefix_tokens,
        stream: true,
        ignore_eos: true,
        warmup_requests: 0,
        request_timeout: std::time::Duration::from_secs(1),
        salt: 7,
        interval: std::time::Duration::ZERO,
        rate_per_s: 0.0,
        extra_body: serde_json::Map::new(),
        api: BenchApi::Chat,
    }
}

#[test]
fn a_responses_bench_sends_the_same_texts_as_instructions_and_input() {
    let chat = request_body(&options(32), 3);
    let mut responses_options = options(32);
    responses_options.api = BenchApi::Responses;
    let responses = request_body(&responses_options, 3);
    assert_eq!(responses["instructions"], chat["messages"][0]["content"]);
    assert_eq!(responses["input"], chat["messages"][1]["content"]);
    assert_eq!(responses["max_output_tokens"], 8);
    assert_eq!(responses["ignore_eos"], true);
    assert!(responses.get("messages").is_none() && responses.get("max_tokens").is_none());
}

#[test]
fn extra_body_fields_are_merged_over_the_bench_own() {
    let mut with_extra = options(0);
    with_extra.extra_body = serde_json::json!({"logprobs": true, "ignore_eos": false})
        .as_object()
        .cloned()
        .unwrap_or_default();
    let body = request_body(&with_extra, 0);
    assert_eq!(body["logprobs"], true);
    assert_eq!(body["ignore_eos"], false);
    assert_eq!(body["max_tokens"], 8);
}

#[test]
fn prompts_differ_per_request_but_share_the_prefix() {
    assert_eq!(words(5, 1).split_whitespace().count(), 5);
    assert_ne!(words(20, 1), words(20, 2));
    let first = request_body(&options(32), 0);
    let second = request_body(&options(32), 1);
    assert_eq!(
        first["messages"][0], second["messages"][0],
        "the system prefix is shared"
    );
    assert_ne!(first["messages"][1], second["messages"][1]);
    assert_eq!(first["ignore_eos"], true);
    assert_eq!(first["stream_options"]["include_usage"], true);
    let without_prefix = request_body(&options(0), 0);
    assert_eq!(without_prefix["messages"].as_array().map(Vec::len), Some(1));
}

/// Answers every connection with `response` (a whole HTTP/1.1 response) and closes it.
async fn canned_server(response: &'static str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = match tokio::net::TcpListener::bind("127.0.0.1:0").await {
        Ok(listener) => listener,
        Err(error) => panic!("binding a loopback port: {error}"),
    };
    let address = match listener.local_addr() {
        Ok(address) => address,
        Err(error) => panic!("reading the bound address: {error}"),
    };
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                // Read the request's head and its body (the bench's bodies are small and
                // arrive with the head or right after it).
                let mut request = Vec::new();
                let mut buffer = [0_u8; 8192];
                while !request.windows(4).any(|window| window == b"\r\n\r\n") {
                    match stream.read(&mut buffer).await {
                        Ok(0) | Err(_) => return,
                        Ok(read) => request.extend_from_slice(&buffer[..read]),
                    }
                }
                let _ = stream.write_all(response.as_bytes()).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    format!("http://{address}")
}

async fn sample_from(response: &'static str, api: BenchApi, stream: bool) -> Result<u32, String> {
    let mut options = options(0);
    options.url = canned_server(response).await;
    options.api = api;
    options.stream = stream;
    let client = reqwest::Client::new();
    super::one_request(&client, &options, 0, None)
        .await
        .map(|sample| sample.output_tokens)
}

#[tokio::test]
async fn a_stream_counts_only_when_it_says_it_is_complete() {
    // Text, then an error event, then the end: Isthmus's own answer when generation fails
    // half way, and vLLM's.
    const FAILED: &str = concat!(
        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n",
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"}}]}\n\n",
        "data: {\"error\":{\"message\":\"decode failed\",\"type\":\"server_error\"}}\n\n",
    );
    let error = sample_from(FAILED, BenchApi::Chat, true).await.unwrap_err();
    assert!(error.contains("decode failed"), "{error}");
    // Text and then the connection closes: no finish reason, no `[DONE]`.
    const CUT: &str = concat!(
        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n",
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"}}]}\n\n",
    );
    let error = sample_from(CUT, BenchApi::Chat, true).await.unwrap_err();
    assert!(error.contains("before it said it was complete"), "{error}");
    // CRLF line ends, `data:` with no space, reasoning before text, and the finish reason:
    // three tokens.
    const CRLF: &str = concat!(
        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n",
        "data:{\"choices\":[{\"index\":0,\"delta\":{\"reasoning_content\":\"Hm\"}}]}\r\n\r\n",
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"}}]}\r\n\r\n",
        ": a comment\r\n\r\n",
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0}]},",
        "\"finish_reason\":\"tool_calls\"}]}\r\n\r\n",
        "data: [DONE]\r\n\r\n",
    );
    assert_eq!(sample_from(CRLF, BenchApi::Chat, true).await, Ok(3));
    // A Responses stream that ends without `response.completed`.
    const RESPONSES_CUT: &str = concat!(
        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n",
        "event: response.output_text.delta\n",
        "data: {\"type\":\"response.output_text.delta\",\"delta\":\"Hi\"}\n\n",
    );
    let error = sample_from(RESPONSES_CUT, BenchApi::Responses, true)
        .await
        .unwrap_err();
    assert!(error.contains("before it said it was complete"), "{error}");
}

#[tokio::test]
async fn a_json_answer_without_choices_is_an_error() {
    const ERROR_200: &str = concat!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 45\r\n",
        "connection: close\r\n\r\n",
        "{\"error\":{\"message\":\"overloaded\",\"type\":\"x\"}}",
    );
    let error = sample_from(ERROR_200, BenchApi::Chat, false)
        .await
        .unwrap_err();
    assert!(error.contains("without an answer"), "{error}");
    const ANSWER: &str = concat!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 102\r\n",
        "connection: close\r\n\r\n",
        "{\"choices\":[{\"index\":0,\"message\":{\"content\":\"Hi\"}}],",
        "\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":2}}",
    );
    assert_eq!(sample_from(ANSWER, BenchApi::Chat, false).await, Ok(2));
}
