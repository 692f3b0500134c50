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
