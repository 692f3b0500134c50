//! The fake OpenAI-compatible upstream (`tests/upstream`) on its own, over real sockets: the
//! answers, fingerprints and log the gateway tests rely on, TLS, ALPN, h2c, mTLS, injected
//! statuses, held streams and the count of cancelled requests. No model is loaded.

use std::time::Duration;

use serde_json::{Value, json};
use sha2::Digest as _;
use tests::{TEST_CLIENT_CN, Upstream, UpstreamOptions};

use crate::{block_on, sse_payloads};

/// How long a test waits for the upstream's counters to show an effect.
const STATS_DEADLINE: Duration = Duration::from_secs(5);

/// Options for a fake upstream built from this workspace.
pub fn options() -> UpstreamOptions {
    UpstreamOptions::new(env!("CARGO_BIN_EXE_fake-upstream"))
}

fn start(options: UpstreamOptions) -> Upstream {
    Upstream::start(options).unwrap()
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(bytes))
}

fn header<'a>(response: &'a reqwest::Response, name: &str) -> &'a str {
    response
        .headers()
        .get(name)
        .unwrap_or_else(|| panic!("no {name} header"))
        .to_str()
        .unwrap()
}

/// A chat request for `model` with one short user message, plus `extra` fields.
pub fn chat(model: &str, extra: Value) -> Value {
    let mut body = json!({"model": model, "messages": [{"role": "user", "content": "Hi"}]});
    if let (Some(body), Value::Object(extra)) = (body.as_object_mut(), extra) {
        body.extend(extra);
    }
    body
}

#[test]
fn json_answer_carries_fingerprint_headers_and_is_logged() {
    let upstream = start(UpstreamOptions {
        name: "alpha".to_owned(),
        tokens: 5,
        ..options()
    });
    block_on(async {
        let body = serde_json::to_vec(&chat("gpt-test", json!({}))).unwrap();
        let response = upstream
            .client()
            .post(upstream.url("/v1/chat/completions"))
            .bearer_auth("sk-secret")
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(header(&response, "x-upstream-name"), "alpha");
        assert_eq!(
            header(&response, "x-received-bytes"),
            body.len().to_string()
        );
        assert_eq!(header(&response, "x-received-sha256"), sha256_hex(&body));
        assert_eq!(header(&response, "x-received-model"), "gpt-test");
        let answer: Value = response.json().await.unwrap();
        assert_eq!(answer["object"], "chat.completion");
        assert_eq!(answer["model"], "gpt-test");
        let content = answer["choices"][0]["message"]["content"].as_str().unwrap();
        assert_eq!(content.split(' ').count(), 5, "{content}");
        assert_eq!(answer["choices"][0]["finish_reason"], "stop");
        let usage = &answer["usage"];
        assert_eq!(usage["completion_tokens"], 5);
        assert_eq!(
            usage["total_tokens"].as_u64().unwrap(),
            usage["prompt_tokens"].as_u64().unwrap() + 5
        );

        let requests = upstream.requests().await;
        assert_eq!(requests.len(), 1, "{requests:?}");
        let logged = &requests[0];
        assert_eq!(logged["method"], "POST");
        assert_eq!(logged["path"], "/v1/chat/completions");
        assert_eq!(logged["headers"]["authorization"], "Bearer sk-secret");
        assert_eq!(logged["body_bytes"], body.len());
        assert_eq!(logged["body_sha256"], sha256_hex(&body));
        assert_eq!(logged["model"], "gpt-test");
        assert_eq!(logged["stream"], false);
        assert_eq!(logged["http_version"], "HTTP/1.1");
        assert_eq!(logged["tls"], false);
        assert_eq!(logged["status"], 200);
        upstream.clear_requests().await;
        assert!(upstream.requests().await.is_empty());
    });
}

#[test]
fn other_routes_answer_like_openai() {
    let upstream = start(options());
    block_on(async {
        let client = upstream.client();
        let models: Value = client
            .get(upstream.url("/v1/models"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(models["data"][0]["id"], "fake");
        let health = client.get(upstream.url("/health")).send().await.unwrap();
        assert_eq!(health.status(), 200);
        assert_eq!(health.text().await.unwrap(), "ok");

        // Azure names the deployment in the path; it stands in for the model.
        let azure = client
            .post(upstream.url("/openai/deployments/east-gpt/chat/completions?api-version=1"))
            .header("api-key", "azure-secret")
            .json(&json!({"messages": []}))
            .send()
            .await
            .unwrap();
        assert_eq!(azure.status(), 200);
        assert_eq!(header(&azure, "x-received-model"), "east-gpt");
        let text: Value = client
            .post(upstream.url("/v1/completions"))
            .json(&json!({"model": "m", "prompt": "Hi", "max_tokens": 3}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(text["object"], "text_completion");
        assert_eq!(text["usage"]["completion_tokens"], 3);
        assert_eq!(text["choices"][0]["finish_reason"], "length");

        let missing_model = client
            .post(upstream.url("/v1/chat/completions"))
            .json(&json!({"messages": []}))
            .send()
            .await
            .unwrap();
        assert_eq!(missing_model.status(), 400);
        let error: Value = missing_model.json().await.unwrap();
        assert_eq!(error["error"]["param"], "model");
        let not_json = client
            .post(upstream.url("/v1/chat/completions"))
            .body("{not json")
            .send()
            .await
            .unwrap();
        assert_eq!(not_json.status(), 400);
        let unknown = client
            .get(upstream.url("/v2/nothing"))
            .send()
            .await
            .unwrap();
        assert_eq!(unknown.status(), 404);

        let requests = upstream.requests().await;
        let azure_logged = requests
            .iter()
            .find(|request| request["path"] == "/openai/deployments/east-gpt/chat/completions")
            .unwrap();
        assert_eq!(azure_logged["query"], "api-version=1");
        assert_eq!(azure_logged["headers"]["api-key"], "azure-secret");
    });
}

#[test]
fn stream_sends_one_chunk_per_token_then_usage_and_done() {
    let upstream = start(UpstreamOptions {
        tokens: 4,
        ..options()
    });
    block_on(async {
        let body = chat(
            "gpt-test",
            json!({"stream": true, "stream_options": {"include_usage": true}}),
        );
        let response = upstream
            .client()
            .post(upstream.url("/v1/chat/completions"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(header(&response, "content-type"), "text/event-stream");
        let payloads = sse_payloads(&response.text().await.unwrap());
        // 4 tokens, the finish reason, the usage, [DONE].
        assert_eq!(payloads.len(), 7, "{payloads:?}");
        assert_eq!(payloads.last().unwrap(), "[DONE]");
        let chunks: Vec<Value> = payloads[..6]
            .iter()
            .map(|payload| serde_json::from_str(payload).unwrap())
            .collect();
        let text: String = chunks[..4]
            .iter()
            .map(|chunk| chunk["choices"][0]["delta"]["content"].as_str().unwrap())
            .collect();
        assert_eq!(text.split(' ').count(), 4, "{text}");
        assert_eq!(chunks[0]["object"], "chat.completion.chunk");
        assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(chunks[4]["choices"][0]["finish_reason"], "stop");
        assert_eq!(chunks[5]["choices"], json!([]));
        assert_eq!(chunks[5]["usage"]["completion_tokens"], 4);
        let logged = &upstream.requests().await[0];
        assert_eq!(logged["stream"], true);
        assert_eq!(logged["include_usage"], true);
    });
}

#[test]
fn https_negotiates_http2_through_alpn() {
    let upstream = start(UpstreamOptions {
        tls: true,
        ..options()
    });
    block_on(async {
        let response = upstream
            .client()
            .post(upstream.url("/v1/chat/completions"))
            .json(&chat("gpt-test", json!({})))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.version(), reqwest::Version::HTTP_2);
        let http1 = tests::client_http1();
        let response = http1.get(upstream.url("/health")).send().await.unwrap();
        assert_eq!(response.version(), reqwest::Version::HTTP_11);
        let requests = upstream.requests().await;
        assert_eq!(requests[0]["http_version"], "HTTP/2.0");
        assert_eq!(requests[0]["tls"], true);
        assert_eq!(requests[1]["http_version"], "HTTP/1.1");
    });
}

#[test]
fn h2c_accepts_prior_knowledge_and_http1() {
    let upstream = start(UpstreamOptions {
        h2c: true,
        ..options()
    });
    block_on(async {
        let h2 = reqwest::Client::builder()
            .http2_prior_knowledge()
            .build()
            .unwrap();
        let response = h2.get(upstream.url("/health")).send().await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.version(), reqwest::Version::HTTP_2);
        let response = upstream
            .client()
            .get(upstream.url("/health"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.version(), reqwest::Version::HTTP_11);
    });
}

#[test]
fn mtls_refuses_clients_without_a_certificate() {
    let upstream = start(UpstreamOptions {
        mtls: true,
        ..options()
    });
    block_on(async {
        let refused = tests::client().get(upstream.url("/health")).send().await;
        assert!(refused.is_err(), "{refused:?}");
        let accepted = tests::client_with_certificate()
            .post(upstream.url("/v1/chat/completions"))
            .json(&chat("gpt-test", json!({})))
            .send()
            .await
            .unwrap();
        assert_eq!(accepted.status(), 200);
        let requests = upstream.requests().await;
        assert_eq!(requests[0]["client_cn"], TEST_CLIENT_CN);
    });
}

#[test]
fn injected_status_lasts_count_requests() {
    let upstream = start(options());
    block_on(async {
        upstream
            .set_behaviour(json!({"status": 503, "retry_after_s": 1, "count": 2}))
            .await;
        let mut statuses = Vec::new();
        for _ in 0..3 {
            let response = upstream
                .client()
                .post(upstream.url("/v1/chat/completions"))
                .json(&chat("gpt-test", json!({})))
                .send()
                .await
                .unwrap();
            statuses.push(response.status().as_u16());
            if response.status() == 503 {
                assert_eq!(header(&response, "retry-after"), "1");
                let error: Value = response.json().await.unwrap();
                assert_eq!(error["error"]["type"], "server_error");
            }
        }
        assert_eq!(statuses, [503, 503, 200]);
        assert_eq!(upstream.stats().await["injected"], 2);

        upstream.set_behaviour(json!({"health_status": 500})).await;
        let health = upstream.client().get(upstream.url("/health")).send().await;
        assert_eq!(health.unwrap().status(), 500);
        let behaviour = upstream.set_behaviour(json!({"reset": true})).await;
        assert_eq!(behaviour["health_status"], Value::Null);
        let health = upstream.client().get(upstream.url("/health")).send().await;
        assert_eq!(health.unwrap().status(), 200);

        let typo = upstream
            .client()
            .post(upstream.url("/_control/behaviour"))
            .json(&json!({"stauts": 500}))
            .send()
            .await
            .unwrap();
        assert_eq!(typo.status(), 400);
    });
}

#[test]
fn held_stream_sends_its_first_chunk_before_release() {
    let upstream = start(options());
    block_on(async {
        upstream.set_behaviour(json!({"hold": true})).await;
        let mut response = upstream
            .client()
            .post(upstream.url("/v1/chat/completions"))
            .json(&chat("gpt-test", json!({"stream": true})))
            .send()
            .await
            .unwrap();
        let first = response.chunk().await.unwrap().unwrap();
        let first = String::from_utf8(first.to_vec()).unwrap();
        assert!(first.starts_with("data: {"), "{first}");
        assert!(!first.contains("[DONE]"), "{first}");
        upstream
            .wait_for_stats(STATS_DEADLINE, |stats| {
                stats["held"] == 1 && stats["in_flight"] == 1
            })
            .await;
        upstream.release().await;
        let mut rest = String::new();
        while let Some(chunk) = response.chunk().await.unwrap() {
            rest.push_str(std::str::from_utf8(&chunk).unwrap());
        }
        assert!(rest.ends_with("data: [DONE]\n\n"), "{rest}");
        let stats = upstream
            .wait_for_stats(STATS_DEADLINE, |stats| stats["in_flight"] == 0)
            .await;
        assert_eq!(stats["completed"], 1);
        assert_eq!(stats["cancelled"], 0);

        // A whole answer waits for the release before anything is sent.
        let client = upstream.client().clone();
        let url = upstream.url("/v1/chat/completions");
        let held = tokio::spawn(async move {
            client
                .post(url)
                .json(&chat("gpt-test", json!({})))
                .send()
                .await
                .unwrap()
                .status()
        });
        upstream
            .wait_for_stats(STATS_DEADLINE, |stats| stats["held"] == 1)
            .await;
        assert!(!held.is_finished());
        upstream.release().await;
        assert_eq!(held.await.unwrap(), 200);
    });
}

#[test]
fn two_megabyte_body_is_fingerprinted_exactly() {
    let upstream = start(options());
    block_on(async {
        let filler: String = (0..2 * 1024 * 1024 / 8)
            .map(|index: u32| format!("{:07x} ", index.wrapping_mul(2_654_435_761) >> 4))
            .collect();
        let body = serde_json::to_vec(&chat(
            &format!("gpt-{}", filler.len()),
            json!({"filler": filler}),
        ))
        .unwrap();
        assert!(body.len() > 2 * 1024 * 1024);
        let response = upstream
            .client()
            .post(upstream.url("/v1/chat/completions"))
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(
            header(&response, "x-received-bytes"),
            body.len().to_string()
        );
        assert_eq!(header(&response, "x-received-sha256"), sha256_hex(&body));
        let logged = &upstream.requests().await[0];
        assert_eq!(logged["body_sha256"], sha256_hex(&body));
    });
}

#[test]
fn client_leaving_a_held_answer_counts_as_cancelled() {
    for tls in [false, true] {
        let upstream = start(UpstreamOptions { tls, ..options() });
        block_on(async {
            upstream.set_behaviour(json!({"hold": true})).await;
            // A stream dropped after its first chunk (HTTP/1.1 plain; HTTP/2 over TLS).
            let mut response = upstream
                .client()
                .post(upstream.url("/v1/chat/completions"))
                .json(&chat("gpt-test", json!({"stream": true})))
                .send()
                .await
                .unwrap();
            response.chunk().await.unwrap().unwrap();
            drop(response);
            // The counters are read one by one, so a snapshot taken while the request ends
            // may show it cancelled and still in flight: wait for the settled state.
            let stats = upstream
                .wait_for_stats(STATS_DEADLINE, |stats| {
                    stats["cancelled"] == 1 && stats["in_flight"] == 0 && stats["held"] == 0
                })
                .await;
            assert_eq!(stats["cancelled"], 1, "{stats}");
            assert_eq!(stats["in_flight"], 0, "{stats}");
            assert_eq!(stats["held"], 0, "{stats}");

            // A whole answer abandoned while it is held.
            let client = upstream.client().clone();
            let url = upstream.url("/v1/chat/completions");
            let held = tokio::spawn(async move {
                client
                    .post(url)
                    .json(&chat("gpt-test", json!({})))
                    .send()
                    .await
            });
            upstream
                .wait_for_stats(STATS_DEADLINE, |stats| stats["held"] == 1)
                .await;
            held.abort();
            let stats = upstream
                .wait_for_stats(STATS_DEADLINE, |stats| {
                    stats["cancelled"] == 2 && stats["in_flight"] == 0
                })
                .await;
            assert_eq!(stats["cancelled"], 2, "{stats}");
            assert_eq!(stats["in_flight"], 0, "{stats}");
            assert_eq!(stats["completed"], 0, "{stats}");
        });
    }
}

#[test]
fn sigterm_stops_it_cleanly() {
    let mut upstream = start(options());
    let status = upstream.terminate().unwrap();
    assert!(status.success(), "{status:?}");
}

/// `isthmus bench` against `upstream` with `args` (not streamed unless they say so, four
/// tokens, no warm-up, a JSON report).
fn bench_command(upstream: &Upstream, args: &[&str]) -> std::process::Command {
    let mut command = std::process::Command::new(tests::isthmus_binary());
    command
        .args([
            "bench",
            "--url",
            &upstream.base_url(),
            "--model",
            "gpt-test",
        ])
        .args(if args.contains(&"--stream") {
            &[][..]
        } else {
            &["--stream", "false"][..]
        })
        .args(["--max-tokens", "4", "--warmup", "0", "--json"])
        .args(args);
    command
}

/// Runs `isthmus bench` against `upstream` with `args` (not streamed unless they say so) and
/// returns its JSON report.
fn bench_report(upstream: &Upstream, args: &[&str]) -> Value {
    let output = bench_command(upstream, args).output().unwrap();
    assert!(output.status.success(), "{output:?}");
    serde_json::from_slice(&output.stdout).unwrap()
}

#[test]
fn bench_starts_no_request_after_its_duration() {
    // Timed against a rate: not beside a gateway test's inference threads.
    let _serial = tests::serial();
    let upstream = start(options());
    // Open loop: request k is due at k/40 s, so exactly the first 20 are due within 0.5 s.
    let report = bench_report(
        &upstream,
        &["--rate", "40", "--duration-s", "0.5", "--concurrency", "4"],
    );
    assert_eq!(report["requests"], 20, "{report}");
    assert_eq!(report["succeeded"], 20, "{report}");
    // Closed loop without --requests: time is the only bound, and every request the report
    // counts reached the upstream.
    let report = bench_report(&upstream, &["--duration-s", "0.3", "--concurrency", "2"]);
    let started = report["requests"].as_u64().unwrap();
    assert!(started >= 2, "{report}");
    assert_eq!(report["succeeded"], started, "{report}");
    block_on(async {
        let stats = upstream
            .wait_for_stats(STATS_DEADLINE, |stats| stats["in_flight"] == 0)
            .await;
        assert_eq!(stats["completed"].as_u64(), Some(20 + started), "{stats}");
    });
    // A server that falls behind: the first request holds the only slot past the deadline,
    // so the other 19 due in time are reported as errors, not left out.
    block_on(async {
        upstream
            .set_behaviour(json!({"delay_first_byte_ms": 1000}))
            .await;
    });
    let report = bench_report(
        &upstream,
        &["--rate", "40", "--duration-s", "0.5", "--concurrency", "1"],
    );
    assert_eq!(report["requests"], 20, "{report}");
    assert_eq!(report["succeeded"], 1, "{report}");
    assert_eq!(report["errors"], 19, "{report}");
    assert!(
        report["first_error"]
            .as_str()
            .unwrap()
            .contains("slots were still busy"),
        "{report}"
    );
    // A duration that is not a positive number, and a rate too small to time (or below 0),
    // are refused by name.
    let refused: [(&[&str], &str); 3] = [
        (&["--duration-s", "0"], "--duration-s"),
        (&["--rate", "1e-30"], "--rate"),
        (&["--rate=-5"], "--rate"),
    ];
    for (arguments, flag) in refused {
        let output = std::process::Command::new(tests::isthmus_binary())
            .args(["bench", "--url", &upstream.base_url()])
            .args(arguments)
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(2), "{arguments:?}: {output:?}");
        assert!(
            String::from_utf8_lossy(&output.stderr).contains(flag),
            "{arguments:?}: {output:?}"
        );
    }
}

#[test]
fn bench_counts_resent_requests_and_measures_first_tokens_only_when_streamed() {
    // Timed against a rate: not beside a gateway test's inference threads.
    let _serial = tests::serial();
    let upstream = start(options());
    // The first request leaves one kept-alive connection; the next one, sent on it, is
    // dropped unanswered, as when a server's keep-alive ends just then: it is sent again,
    // succeeds, and the report says so.
    block_on(upstream.set_behaviour(json!({"drop_reused": 1})));
    let report = bench_report(&upstream, &["--requests", "3", "--concurrency", "1"]);
    assert_eq!(
        (&report["succeeded"], &report["errors"], &report["resent"]),
        (&json!(3), &json!(0), &json!(1)),
        "{report}"
    );
    // Not streamed: there is no first token to time.
    assert!(
        report["ttft_ms"].is_null() && report["tpot_ms"].is_null(),
        "{report}"
    );
    // Streamed: the first token is timed, and every token counted (the upstream's first
    // chunk carries the role and the first text together).
    let report = bench_report(&upstream, &["--requests", "2", "--stream", "true"]);
    assert_eq!(report["succeeded"], 2, "{report}");
    assert_eq!(report["output_tokens"], 8, "{report}");
    let ttft = report["ttft_ms"]["p50"].as_f64().unwrap();
    assert!(
        ttft > 0.0 && ttft <= report["end_to_end_ms"]["p50"].as_f64().unwrap(),
        "{report}"
    );
}

#[test]
fn bench_stopped_by_sigint_finishes_what_it_started_and_reports() {
    // Timed against a rate: not beside a gateway test's inference threads.
    let _serial = tests::serial();
    let upstream = start(options());
    let mut command = bench_command(
        &upstream,
        &[
            "--concurrency",
            "1",
            "--requests",
            "100000",
            "--interval-ms",
            "50",
        ],
    );
    let child = tests::kill_with_parent(&mut command)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    block_on(async {
        upstream
            .wait_for_stats(STATS_DEADLINE, |stats| {
                stats["completed"].as_u64().is_some_and(|count| count >= 3)
            })
            .await;
    });
    let sent = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success(), "{output:?}");
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    let answered = report["succeeded"].as_u64().unwrap();
    assert!((3..100_000).contains(&answered), "{report}");
    assert_eq!(report["errors"], 0, "{report}");
}
