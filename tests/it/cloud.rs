//! The cloud leg end to end: the real gateway forwarding to real fake-upstream processes over
//! TLS, mTLS, HTTP/2 and plain HTTP; model mapping and byte-exact bodies, streaming
//! pass-through, the canary split, forced and sticky variants, retries, ejection and the
//! half-open trial, fallback to the local model, cancellation and reload under a stream.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{Value, json};
use sha2::Digest as _;
use tests::{API_KEY, Gateway, GatewayOptions, TestPki, Upstream, UpstreamOptions, serial};

use crate::upstream::{chat, options};
use crate::{block_on, sse_payloads};

/// How long a test waits for something asynchronous to show (health, counters).
const DEADLINE: Duration = Duration::from_secs(10);

fn start(options: UpstreamOptions) -> Upstream {
    Upstream::start(options).unwrap()
}

/// A gateway with the test model and the given `[upstreams...]` text.
fn gateway(upstreams: &str) -> Gateway {
    Gateway::start(&GatewayOptions {
        body_bytes_max: 8 * 1024 * 1024,
        extra: upstreams.to_owned(),
        ..GatewayOptions::default()
    })
}

/// An upstream named `name`, and a gateway whose pool `aks` (model `gpt-4o`, with `extra`
/// in its section) has it as its one backend.
fn lone_backend(name: &str, extra: &str) -> (Upstream, Gateway) {
    let upstream = start(UpstreamOptions {
        name: name.to_owned(),
        ..options()
    });
    let gateway = gateway(&format!(
        "{}{}",
        pool("aks", r#""gpt-4o" = "m""#, extra),
        backend("aks", &upstream, 1, "v1"),
    ));
    (upstream, gateway)
}

/// A `[[upstreams.POOL.backends]]` entry for a running upstream.
fn backend(pool: &str, upstream: &Upstream, weight: u32, version: &str) -> String {
    format!(
        "[[upstreams.{pool}.backends]]\nurl = \"{}\"\nname = \"{}\"\nweight = {weight}\nlabels = {{ version = \"{version}\" }}\n",
        upstream.base_url(),
        upstream.name
    )
}

/// A pool section: models, health probes slow enough not to interfere, quick circuits.
fn pool(name: &str, models: &str, extra: &str) -> String {
    format!(
        "[upstreams.{name}]\nmodels = {{ {models} }}\n{extra}\n[upstreams.{name}.tls]\nca_file = {:?}\n[upstreams.{name}.health]\ninterval_ms = 60000\n[upstreams.{name}.circuit]\nfailures_to_open = 1\nopen_base_ms = 300\nopen_max_ms = 1000\n",
        TestPki::shared().ca_path
    )
}

async fn post(gateway: &Gateway, body: &Value) -> reqwest::Response {
    tests::client()
        .post(gateway.url("/v1/chat/completions"))
        .bearer_auth(API_KEY)
        .json(body)
        .send()
        .await
        .unwrap()
}

fn header(response: &reqwest::Response, name: &str) -> String {
    response
        .headers()
        .get(name)
        .map(|value| value.to_str().unwrap().to_owned())
        .unwrap_or_default()
}

/// A loopback port where nothing listens.
fn dead_address() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

#[test]
fn bodies_arrive_byte_exact_with_the_model_mapped_and_streams_pass_through_with_usage() {
    let _serial = serial();
    let upstream = start(UpstreamOptions {
        name: "tls-a".to_owned(),
        tls: true,
        tokens: 6,
        ..options()
    });
    let gateway = gateway(&format!(
        "{}{}",
        pool("aks", r#""gpt-4o" = "served-70b""#, ""),
        backend("aks", &upstream, 1, "v1")
    ));
    block_on(async {
        // A 2 MB prompt, sent as exact bytes so the expected upstream bytes are known.
        let prompt = "lorem ipsum ".repeat(2 * 1024 * 1024 / 12);
        let sent = format!(
            r#"{{"messages":[{{"role":"user","content":"{prompt}"}}], "model": "gpt-4o","temperature":0.25}}"#
        );
        let expected = sent.replace(r#""model": "gpt-4o""#, r#""model": "served-70b""#);
        let response = tests::client()
            .post(gateway.url("/v1/chat/completions"))
            .bearer_auth(API_KEY)
            .header("content-type", "application/json")
            .body(sent.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(header(&response, "x-isthmus-route"), "cloud");
        assert_eq!(header(&response, "x-isthmus-target"), "aks/tls-a");
        let answer: Value = response.json().await.unwrap();
        assert_eq!(answer["usage"]["completion_tokens"], 6);
        let received = upstream.requests().await;
        let last = received.last().unwrap();
        assert_eq!(last["body_bytes"], expected.len());
        assert_eq!(
            last["body_sha256"],
            hex::encode(sha2::Sha256::digest(expected.as_bytes()))
        );
        assert_eq!(last["model"], "served-70b");
        assert_eq!(
            last["http_version"], "HTTP/2.0",
            "TLS negotiates h2 by ALPN"
        );
        // A trace context goes upstream: a new one here, as the client sent none.
        let traceparent = last["headers"]["traceparent"].as_str().unwrap_or_default();
        assert!(
            traceparent.starts_with("00-") && traceparent.len() == 55,
            "{traceparent}"
        );
        // The gateway's API key never reaches the cloud.
        let forwarded = last["headers"].to_string();
        assert!(!forwarded.contains(API_KEY), "{forwarded}");

        // A stream whose client did not ask for usage: the gateway asks for it, records it
        // and keeps the usage-only chunk from the client.
        let response = post(&gateway, &chat("gpt-4o", json!({"stream": true}))).await;
        assert_eq!(response.status(), 200);
        let text = response.text().await.unwrap();
        let payloads = sse_payloads(&text);
        assert_eq!(payloads.last().map(String::as_str), Some("[DONE]"));
        assert!(
            !crate::sse_chunks(&text)
                .iter()
                .any(|chunk| chunk["usage"].is_object()),
            "{text}"
        );
        let content = crate::sse_content(&text);
        assert!(!content.is_empty());
        let received = upstream.requests().await;
        assert_eq!(received.last().unwrap()["include_usage"], true);
        // Asked for: passed on.
        let response = post(
            &gateway,
            &chat(
                "gpt-4o",
                json!({"stream": true, "stream_options": {"include_usage": true}}),
            ),
        )
        .await;
        let text = response.text().await.unwrap();
        assert!(text.contains("\"completion_tokens\":6"), "{text}");
    });
    let metrics = gateway.metrics();
    assert!(
        metrics.contains("route=\"cloud\""),
        "cloud requests are counted: {metrics}"
    );
}

#[test]
fn mtls_and_http2_backends_are_reached_with_their_settings() {
    let _serial = serial();
    let mtls = start(UpstreamOptions {
        name: "mtls".to_owned(),
        mtls: true,
        ..options()
    });
    let h2c = start(UpstreamOptions {
        name: "h2c".to_owned(),
        h2c: true,
        ..options()
    });
    let pki = TestPki::shared();
    let (client_cert, client_key) = pki.client_cert_files();
    let gateway = gateway(&format!(
        "{}[upstreams.secure.tls]\nca_file = {:?}\nclient_cert = {:?}\nclient_key = {:?}\n{}{}{}",
        "[upstreams.secure]\nmodels = { \"secure-model\" = \"m\" }\nprotocol = \"http1\"\n",
        pki.ca_path,
        client_cert,
        client_key,
        backend("secure", &mtls, 1, "v1"),
        "[upstreams.plain2]\nmodels = { \"h2-model\" = \"m\" }\nprotocol = \"http2\"\n",
        backend("plain2", &h2c, 1, "v1"),
    ));
    block_on(async {
        let response = post(&gateway, &chat("secure-model", json!({}))).await;
        assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
        let seen = mtls.requests().await;
        assert_eq!(seen.last().unwrap()["client_cn"], tests::TEST_CLIENT_CN);
        assert_eq!(seen.last().unwrap()["http_version"], "HTTP/1.1");
        let response = post(&gateway, &chat("h2-model", json!({"stream": true}))).await;
        assert_eq!(response.status(), 200);
        assert!(response.text().await.unwrap().ends_with("data: [DONE]\n\n"));
        assert_eq!(
            h2c.requests().await.last().unwrap()["http_version"],
            "HTTP/2.0"
        );
    });
}

#[test]
fn the_canary_split_follows_the_weights_and_variants_can_be_forced_or_sticky() {
    let _serial = serial();
    let v1 = start(UpstreamOptions {
        name: "v1".to_owned(),
        tokens: 1,
        ..options()
    });
    let v2 = start(UpstreamOptions {
        name: "v2".to_owned(),
        tokens: 1,
        ..options()
    });
    let gateway = gateway(&format!(
        "{}{}{}{}{}{}",
        pool("canary", r#""gpt-4o" = "m""#, ""),
        backend("canary", &v1, 80, "v1"),
        backend("canary", &v2, 20, "v2"),
        pool("sticky", r#""sticky-model" = "m""#, "sticky = true"),
        backend("sticky", &v1, 50, "v1"),
        backend("sticky", &v2, 50, "v2"),
    ));
    block_on(async {
        let client = tests::client();
        let body = serde_json::to_vec(&chat("gpt-4o", json!({"max_tokens": 1}))).unwrap();
        let total = 10_000usize;
        let mut tasks = tokio::task::JoinSet::new();
        for worker in 0..16 {
            let client = client.clone();
            let url = gateway.url("/v1/chat/completions");
            let body = body.clone();
            tasks.spawn(async move {
                let mut to_v2 = 0usize;
                for _ in (worker..total).step_by(16) {
                    let response = client
                        .post(&url)
                        .bearer_auth(API_KEY)
                        .header("content-type", "application/json")
                        .body(body.clone())
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(response.status(), 200);
                    if header(&response, "x-isthmus-target") == "canary/v2" {
                        to_v2 += 1;
                    }
                    let _ = response.bytes().await.unwrap();
                }
                to_v2
            });
        }
        let mut to_v2 = 0;
        while let Some(count) = tasks.join_next().await {
            to_v2 += count.unwrap();
        }
        let share = to_v2 as f64 / total as f64;
        assert!(
            (share - 0.20).abs() <= 0.02,
            "v2 got {to_v2} of {total} ({share})"
        );

        // The header forces a variant; an unknown one is a client error.
        for _ in 0..10 {
            let response = tests::client()
                .post(gateway.url("/v1/chat/completions"))
                .bearer_auth(API_KEY)
                .header("x-isthmus-canary", "v2")
                .json(&chat("gpt-4o", json!({})))
                .send()
                .await
                .unwrap();
            assert_eq!(header(&response, "x-isthmus-target"), "canary/v2");
        }
        let response = tests::client()
            .post(gateway.url("/v1/chat/completions"))
            .bearer_auth(API_KEY)
            .header("x-isthmus-canary", "v9")
            .json(&chat("gpt-4o", json!({})))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400);
        let error: Value = response.json().await.unwrap();
        assert_eq!(error["error"]["param"], "x-isthmus-canary");

        // Sticky: one caller (one API key) stays on one backend.
        let mut targets = std::collections::BTreeSet::new();
        for _ in 0..20 {
            let response = post(&gateway, &chat("sticky-model", json!({}))).await;
            assert_eq!(response.status(), 200);
            targets.insert(header(&response, "x-isthmus-target"));
        }
        assert_eq!(targets.len(), 1, "{targets:?}");
        assert!(!targets.contains(""), "{targets:?}");
    });
}

#[test]
fn failures_move_to_another_backend_and_an_ejected_backend_returns_through_a_trial() {
    let _serial = serial();
    let steady = start(UpstreamOptions {
        name: "steady".to_owned(),
        ..options()
    });
    let mut flaky = start(UpstreamOptions {
        name: "flaky".to_owned(),
        ..options()
    });
    let flaky_address = flaky.addr;
    let gateway = gateway(&format!(
        "{}{}{}",
        pool("aks", r#""gpt-4o" = "m""#, ""),
        backend("aks", &flaky, 1, "v1"),
        backend("aks", &steady, 1, "v1"),
    ));
    block_on(async {
        // A 503 before any byte: retried on the other backend, the client sees a 200.
        flaky
            .set_behaviour(json!({"status": 503, "count": 1}))
            .await;
        let response = post(&gateway, &chat("gpt-4o", json!({}))).await;
        assert_eq!(response.status(), 200);
        assert_eq!(header(&response, "x-isthmus-target"), "aks/steady");

        // Killed mid-run: connection refused is retried, the backend is ejected, and no
        // client sees an error.
        flaky.terminate();
        for _ in 0..20 {
            let response = post(&gateway, &chat("gpt-4o", json!({}))).await;
            assert_eq!(response.status(), 200);
            assert_eq!(header(&response, "x-isthmus-target"), "aks/steady");
        }
        let status = upstream_status(&gateway, "flaky");
        assert_ne!(status["circuit"], "closed", "{status}");

        // Back at its address: after the back-off one trial request goes there, and its
        // success closes the circuit.
        let revived = start(UpstreamOptions {
            name: "flaky".to_owned(),
            listen: Some(flaky_address),
            ..options()
        });
        let mut reached = false;
        for _ in 0..100 {
            let response = post(&gateway, &chat("gpt-4o", json!({}))).await;
            assert_eq!(response.status(), 200);
            if header(&response, "x-isthmus-target") == "aks/flaky" {
                reached = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(reached, "the revived backend never got a trial request");
        assert_eq!(upstream_status(&gateway, "flaky")["circuit"], "closed");
        assert!(!revived.requests().await.is_empty());
    });
}

fn upstream_status(gateway: &Gateway, backend: &str) -> Value {
    let (_, body) = tests::plain_get(gateway.admin, "/admin/api/upstreams").unwrap();
    let status: Value = serde_json::from_str(&body).unwrap();
    status["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|entry| entry["backend"] == backend)
        .cloned()
        .unwrap_or(Value::Null)
}

#[test]
fn a_pool_that_is_down_falls_back_to_the_local_model_or_answers_503() {
    let _serial = serial();
    let dead = dead_address();
    let gateway = gateway(&format!(
        "{}[[upstreams.rescued.backends]]\nurl = \"http://{dead}\"\n{}[[upstreams.strict.backends]]\nurl = \"http://{dead}\"\n",
        pool(
            "rescued",
            r#""big-model" = "m""#,
            "fallback_to_local = true"
        ),
        pool("strict", r#""other-model" = "m""#, ""),
    ));
    block_on(async {
        let response = post(
            &gateway,
            &chat("big-model", json!({"max_tokens": 4, "temperature": 0})),
        )
        .await;
        assert_eq!(response.status(), 200);
        assert_eq!(header(&response, "x-isthmus-degraded"), "cloud-unavailable");
        assert_eq!(header(&response, "x-isthmus-route"), "local");
        assert_eq!(header(&response, "x-isthmus-target"), "smollm2");
        let answer: Value = response.json().await.unwrap();
        assert!(answer["choices"][0]["message"]["content"].is_string());

        let response = post(&gateway, &chat("other-model", json!({}))).await;
        assert_eq!(response.status(), 503);
        assert_eq!(header(&response, "x-isthmus-route"), "cloud");
        let error: Value = response.json().await.unwrap();
        assert_eq!(error["error"]["code"], "unavailable");
    });
}

#[test]
fn a_half_open_trial_frees_the_backend_once_its_answer_begins() {
    let _serial = serial();
    let (upstream, gateway) = lone_backend("lone", "");
    block_on(async {
        // One failure opens the lone backend's circuit (failures_to_open = 1).
        upstream
            .set_behaviour(json!({"status": 500, "count": 1}))
            .await;
        let response = post(&gateway, &chat("gpt-4o", json!({}))).await;
        assert_eq!(response.status(), 502);
        assert_eq!(upstream_status(&gateway, "lone")["circuit"], "open");
        // Once open_base_ms (300 ms) has passed, the next request is the half-open trial: a
        // stream the backend holds after its first chunk.
        tokio::time::sleep(Duration::from_millis(350)).await;
        upstream.set_behaviour(json!({"hold": true})).await;
        let mut trial = post(&gateway, &chat("gpt-4o", json!({"stream": true}))).await;
        assert_eq!(trial.status(), 200);
        let first = tokio::time::timeout(DEADLINE, trial.chunk())
            .await
            .expect("the trial's first chunk did not arrive")
            .unwrap()
            .unwrap();
        assert!(String::from_utf8_lossy(&first).starts_with("data: "));
        // Its status said the backend works: other requests go there while it streams.
        upstream.set_behaviour(json!({"hold": false})).await;
        let response = post(&gateway, &chat("gpt-4o", json!({}))).await;
        assert_eq!(response.status(), 200);
        assert_eq!(upstream_status(&gateway, "lone")["circuit"], "closed");
        upstream.release().await;
        let rest = trial.text().await.unwrap();
        assert!(rest.ends_with("data: [DONE]\n\n"), "{rest}");
    });
}

#[test]
fn an_answer_over_the_pools_size_limit_is_refused_without_blaming_the_backend() {
    let _serial = serial();
    let (_upstream, gateway) = lone_backend("verbose", "response_bytes_max = 64");
    block_on(async {
        // Twice over the limit: each a 502, and the backend stays in (failures_to_open = 1
        // would have opened its circuit after the first had it counted as the backend's).
        for _ in 0..2 {
            let response = post(&gateway, &chat("gpt-4o", json!({}))).await;
            assert_eq!(response.status(), 502);
            let body: Value = response.json().await.unwrap();
            assert!(
                body["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains("exceeds 64 bytes"),
                "{body}"
            );
        }
        assert_eq!(upstream_status(&gateway, "verbose")["circuit"], "closed");
    });
}

#[test]
fn a_stream_the_backend_breaks_off_ends_with_an_error_event_and_a_failed_record() {
    let _serial = serial();
    let (mut upstream, gateway) = lone_backend("breaks", "");
    block_on(async {
        upstream.set_behaviour(json!({"hold": true})).await;
        let mut response = tests::client()
            .post(gateway.url("/v1/chat/completions"))
            .bearer_auth(API_KEY)
            .header("x-request-id", "broken-1")
            .json(&chat("gpt-4o", json!({"stream": true})))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let first = tokio::time::timeout(DEADLINE, response.chunk())
            .await
            .expect("the first chunk did not arrive")
            .unwrap()
            .unwrap();
        assert!(String::from_utf8_lossy(&first).starts_with("data: "));
        // The backend dies mid-answer: the client is told in the stream, as OpenAI does,
        // instead of seeing a stream that merely stops.
        upstream.kill();
        let rest = tokio::time::timeout(DEADLINE, response.text())
            .await
            .expect("the broken stream did not end")
            .unwrap();
        let payloads = sse_payloads(&rest);
        assert_eq!(
            payloads.last().map(String::as_str),
            Some("[DONE]"),
            "{rest}"
        );
        let error: Value = serde_json::from_str(&payloads[payloads.len() - 2]).unwrap();
        assert_eq!(error["error"]["code"], "upstream_error", "{rest}");
        assert!(
            !error.to_string().contains("127.0.0.1"),
            "backend details reached the client: {error}"
        );
        // Its record, durable before those last bytes, says the answer failed.
        let outcome = crate::console::outcome_record(&gateway, "broken-1").await;
        assert_eq!(outcome["ResultType"], "Failed", "{outcome}");
        assert!(
            outcome["ResultDescription"]
                .as_str()
                .unwrap()
                .contains("broke off"),
            "{outcome}"
        );
    });
}

#[test]
fn the_first_chunk_arrives_while_the_upstream_holds_the_rest_and_a_leaving_client_cancels() {
    let _serial = serial();
    let (upstream, gateway) = lone_backend("slow", "");
    block_on(async {
        upstream.set_behaviour(json!({"hold": true})).await;
        let mut response = post(&gateway, &chat("gpt-4o", json!({"stream": true}))).await;
        assert_eq!(response.status(), 200);
        // The first chunk comes through while the upstream still holds the rest.
        let first = tokio::time::timeout(DEADLINE, response.chunk())
            .await
            .expect("the first chunk did not arrive while the upstream held the rest")
            .unwrap()
            .unwrap();
        assert!(String::from_utf8_lossy(&first).starts_with("data: "));
        assert_eq!(upstream.stats().await["held"], 1);
        upstream.release().await;
        let rest = response.text().await.unwrap();
        assert!(rest.ends_with("data: [DONE]\n\n"));
        let answered = || {
            gateway
                .metrics()
                .contains("isthmus_requests_total{route=\"cloud\",status=\"200\"} 1")
        };
        assert!(tests::eventually(DEADLINE, answered));
        let charged = || {
            gateway
                .metric("isthmus_completion_tokens_total{route=\"cloud\"}")
                .unwrap_or(0.0)
        };
        let charged_before = charged();
        let prompt_charged = || {
            gateway
                .metric("isthmus_prompt_tokens_total{route=\"cloud\"}")
                .unwrap_or(0.0)
        };
        let prompt_charged_before = prompt_charged();

        // A client that leaves mid-stream: the upstream request is cancelled too.
        let cancelled_before = upstream.stats().await["cancelled"].as_u64().unwrap();
        let mut response = post(&gateway, &chat("gpt-4o", json!({"stream": true}))).await;
        let _ = response.chunk().await.unwrap();
        drop(response);
        let stats = upstream
            .wait_for_stats(DEADLINE, |stats| {
                stats["cancelled"].as_u64().unwrap() > cancelled_before
            })
            .await;
        assert!(
            stats["cancelled"].as_u64().unwrap() > cancelled_before,
            "{stats}"
        );
        // It is charged what it was sent (the backend never got to its usage chunk).
        assert!(
            tests::eventually(DEADLINE, || charged() > charged_before),
            "the stream cut short was charged no completion tokens"
        );
        // And its prompt, estimated, since the backend never said.
        assert!(
            tests::eventually(DEADLINE, || prompt_charged() > prompt_charged_before),
            "the stream cut short was charged no prompt tokens"
        );
        upstream.set_behaviour(json!({"reset": true})).await;
    });
}

#[test]
fn a_backend_connection_serves_other_requests_while_an_answer_waits_for_its_audit_record() {
    let _serial = serial();
    let upstream = start(options());
    // Debug builds of the gateway hold every audit commit this long: a slow disk on demand.
    let commit_delay = Duration::from_millis(1000);
    let dir = tests::scratch_dir();
    let config_path = dir.path().join("isthmus.toml");
    let options = GatewayOptions {
        extra: format!(
            "{}{}",
            pool("aks", r#""gpt-4o" = "m""#, ""),
            backend("aks", &upstream, 1, "v1")
        ),
        ..GatewayOptions::default()
    };
    std::fs::write(&config_path, tests::config_text(&options, dir.path())).unwrap();
    let gateway = Gateway::start_with_command(dir, &config_path, |command| {
        command.env(
            "ISTHMUS_AUDIT_TEST_COMMIT_DELAY_MS",
            commit_delay.as_millis().to_string(),
        );
    });
    block_on(async {
        let opened_before = upstream.stats().await["connections"].as_u64().unwrap();
        let counted_before = connections_counted(&gateway);
        let completed = |count: u64| {
            let upstream = &upstream;
            async move {
                upstream
                    .wait_for_stats(DEADLINE, |stats| stats["completed"] == count)
                    .await
            }
        };
        let started = std::time::Instant::now();
        // Three requests, each sent once the backend has answered the one before, while
        // that one's answer still waits for its audit commit: a whole answer, a stream,
        // and a whole answer again. One branch at a time asks the upstream for its counts,
        // so that those asks share one connection.
        let (whole, (stream, last)) = tokio::join!(
            async {
                let response = post(&gateway, &chat("gpt-4o", json!({}))).await;
                let elapsed = started.elapsed();
                (response.status(), elapsed, response.text().await.unwrap())
            },
            async {
                completed(1).await;
                tokio::join!(
                    async {
                        let body = chat("gpt-4o", json!({"stream": true}));
                        let response = post(&gateway, &body).await;
                        (response.status(), response.text().await.unwrap())
                    },
                    async {
                        completed(2).await;
                        let response = post(&gateway, &chat("gpt-4o", json!({}))).await;
                        (response.status(), response.text().await.unwrap())
                    },
                )
            },
        );
        assert_eq!(whole.0, 200, "{}", whole.2);
        assert!(
            whole.1 >= commit_delay,
            "the answer did not wait for its audit commit ({:?})",
            whole.1
        );
        assert!(whole.2.contains("chat.completion"), "{}", whole.2);
        assert_eq!(stream.0, 200, "{}", stream.1);
        assert!(stream.1.ends_with("data: [DONE]\n\n"), "{}", stream.1);
        assert_eq!(last.0, 200, "{}", last.1);
        // Each answer was read to its end before it waited, and its connection went back to
        // the pool: the next request found it there instead of opening another (at most the
        // first opened one, where no probe had left a connection behind).
        let stats = upstream.stats().await;
        let opened = stats["connections"].as_u64().unwrap() - opened_before;
        assert!(
            opened <= 1,
            "{opened} connections opened for three requests: {stats}"
        );
        // The gateway's connection counter saw the same. It counts a connection once it is
        // made, the upstream when it accepts it: a probe's connection may be between the two.
        let deadline = std::time::Instant::now() + DEADLINE;
        loop {
            let stats = upstream.stats().await;
            let opened = stats["connections"].as_u64().unwrap() - opened_before;
            let counted = connections_counted(&gateway) - counted_before;
            if counted == opened as f64 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the gateway counted {counted} connections, the upstream saw {opened}: {stats}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
}

/// A gateway whose pool `aks` serves `gpt-4o` from `upstream` alone.
fn one_backend(upstream: &Upstream) -> Gateway {
    gateway(&format!(
        "{}{}",
        pool("aks", r#""gpt-4o" = "m""#, ""),
        backend("aks", upstream, 1, "v1"),
    ))
}

/// One answered request, which leaves a connection in the pool.
async fn pool_a_connection(gateway: &Gateway) {
    let response = post(gateway, &chat("gpt-4o", json!({}))).await;
    assert_eq!(response.status(), 200);
}

/// The connections the gateway opened to pool `aks`'s backend (`/metrics`).
fn connections_counted(gateway: &Gateway) -> f64 {
    gateway
        .metric("isthmus_upstream_backend_connections_total{pool=\"aks\"")
        .expect("no connection counter in /metrics")
}

#[test]
fn a_throttled_backend_is_asked_again_on_the_same_connection() {
    let _serial = serial();
    let upstream = start(options());
    let gateway = one_backend(&upstream);
    block_on(async {
        pool_a_connection(&gateway).await;
        let opened_before = upstream.stats().await["connections"].as_u64().unwrap();
        let counted_before = connections_counted(&gateway);
        assert!(counted_before >= 1.0, "the gateway counted no connection");
        // A 429 with a short Retry-After and no other backend: the gateway waits and asks
        // the same backend again, over the connection the 429 came on.
        upstream
            .set_behaviour(json!({"status": 429, "retry_after_s": 1, "count": 1}))
            .await;
        let response = post(&gateway, &chat("gpt-4o", json!({}))).await;
        assert_eq!(response.status(), 200);
        let stats = upstream.stats().await;
        assert_eq!(stats["injected"], 1, "{stats}");
        assert_eq!(
            stats["connections"].as_u64().unwrap(),
            opened_before,
            "the retry opened a connection: {stats}"
        );
        // The gateway's own count agrees: it opened none for the throttled request.
        assert_eq!(connections_counted(&gateway), counted_before, "{stats}");

        // A 5xx with no other backend to try: the client reads the backend's words (they
        // explain the failure); the log says only who answered what, since a backend's error
        // text may quote the request (a traceback, a validation echo).
        upstream
            .set_behaviour(json!({"reset": true, "status": 500, "count": 1}))
            .await;
        let response = post(&gateway, &chat("gpt-4o", json!({}))).await;
        assert_eq!(response.status(), 502);
        let body: Value = response.json().await.unwrap();
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(
            message.contains("answered 500") && message.contains("injected status 500"),
            "{body}"
        );
        let log = gateway.log();
        assert!(log.contains("answered 500"), "{log}");
        assert!(!log.contains("injected status"), "{log}");

        // A Retry-After of a day (a quota policy's) holds the backend back only as long as
        // the circuit's longest back-off (open_max_ms = 1000 here), and the status says so.
        upstream.set_behaviour(json!({"reset": true})).await;
        let answered = || async {
            let deadline = std::time::Instant::now() + DEADLINE;
            loop {
                let response = post(&gateway, &chat("gpt-4o", json!({}))).await;
                if response.status() == 200 {
                    break;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "still refused: {}",
                    response.text().await.unwrap()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        // (The 500 above opened the circuit: first it closes again.)
        answered().await;
        // A long Retry-After keeps the backend out for at most the longest back-off, and the
        // caller hears that wait. A 503 that says when to come back is a busy backend too,
        // as a 429 is: no circuit failure.
        for busy in [429, 503] {
            upstream
                .set_behaviour(json!({"status": busy, "retry_after_s": 86400, "count": 1}))
                .await;
            let response = post(&gateway, &chat("gpt-4o", json!({}))).await;
            let refused = response.status();
            assert_eq!(header(&response, "retry-after"), "1");
            let text = response.text().await.unwrap();
            assert_eq!(refused, 503, "{text}");
            assert!(text.contains(&format!("answered {busy}")), "{text}");
            let (_, body) = tests::plain_get(gateway.admin, "/admin/api/upstreams").unwrap();
            let status: Value = serde_json::from_str(&body).unwrap();
            let throttled = status["backends"][0]["throttled_ms"].as_u64().unwrap();
            assert!((1..=1000).contains(&throttled), "{status}");
            assert_eq!(status["backends"][0]["circuit"], "closed", "{status}");
            answered().await;
        }
        upstream.set_behaviour(json!({"reset": true})).await;
    });
}

#[test]
fn a_pooled_connection_the_backend_closed_is_retried_on_a_new_one_without_blame() {
    let _serial = serial();
    let upstream = start(options());
    let gateway = one_backend(&upstream);
    block_on(async {
        pool_a_connection(&gateway).await;
        // The backend closes that connection as the next request arrives on it, unanswered
        // (its keep-alive ran out as the gateway sent): the request is sent again on a new
        // connection, and the only backend is not blamed for it.
        upstream.set_behaviour(json!({"drop_reused": 1})).await;
        let response = post(&gateway, &chat("gpt-4o", json!({}))).await;
        let status = response.status();
        let text = response.text().await.unwrap();
        assert_eq!(status, 200, "{text}");
        let stats = upstream.stats().await;
        assert_eq!(stats["dropped"], 1, "{stats}");
        assert_eq!(stats["completed"], 2, "{stats}");
        let log = gateway.log();
        assert!(!log.contains("upstream attempt failed"), "{log}");
        let (_, body) = tests::plain_get(gateway.admin, "/admin/api/upstreams").unwrap();
        let backends: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(backends["backends"][0]["circuit"], "closed", "{backends}");
    });
}

/// An upstream named after its version.
fn versioned(version: &str) -> Upstream {
    start(UpstreamOptions {
        name: version.to_owned(),
        ..options()
    })
}

/// Pool `aks` serving `gpt-4o` from `v1` and `v2` with the given weights.
fn two_backends(v1: &Upstream, v1_weight: u32, v2: &Upstream, v2_weight: u32) -> String {
    format!(
        "{}{}{}",
        pool("aks", r#""gpt-4o" = "m""#, ""),
        backend("aks", v1, v1_weight, "v1"),
        backend("aks", v2, v2_weight, "v2"),
    )
}

#[test]
fn a_weight_reload_during_a_running_stream_leaves_the_stream_whole() {
    let _serial = serial();
    let (v1, v2) = (versioned("v1"), versioned("v2"));
    let sections = |v1_weight: u32, v2_weight: u32| two_backends(&v1, v1_weight, &v2, v2_weight);
    let gateway = gateway(&sections(1, 0));
    block_on(async {
        v1.set_behaviour(json!({"hold": true})).await;
        let mut response = post(&gateway, &chat("gpt-4o", json!({"stream": true}))).await;
        let first = response.chunk().await.unwrap().unwrap();
        assert!(!first.is_empty());

        // Reload with the weights swapped, while the stream is held mid-way.
        let config_path = gateway.dir.path().join("isthmus.toml");
        let text = std::fs::read_to_string(&config_path).unwrap();
        let text = text.replace(&sections(1, 0), &sections(0, 1));
        std::fs::write(&config_path, text).unwrap();
        let reloaded = admin_post(&gateway, "/admin/api/reload");
        assert_eq!(reloaded["reloaded"], true, "{reloaded}");

        // A broken file is refused with its errors and changes nothing.
        let good = std::fs::read_to_string(&config_path).unwrap();
        std::fs::write(
            &config_path,
            good.replace("weight = 1", "weight = \"heavy\""),
        )
        .unwrap();
        let refused = admin_post(&gateway, "/admin/api/reload");
        assert_eq!(refused["reloaded"], false);
        assert!(
            refused["errors"].to_string().contains("weight"),
            "{refused}"
        );
        std::fs::write(&config_path, good).unwrap();

        v1.release().await;
        let rest = response.text().await.unwrap();
        assert!(
            rest.ends_with("data: [DONE]\n\n"),
            "the held stream survived: {rest}"
        );
        for _ in 0..5 {
            let response = post(&gateway, &chat("gpt-4o", json!({}))).await;
            assert_eq!(header(&response, "x-isthmus-target"), "aks/v2");
        }
        v1.set_behaviour(json!({"reset": true})).await;
    });
}

#[test]
fn a_changed_configuration_file_is_reloaded_without_a_signal() {
    let _serial = serial();
    let (v1, v2) = (versioned("v1"), versioned("v2"));
    let sections = |v1_weight: u32, v2_weight: u32| two_backends(&v1, v1_weight, &v2, v2_weight);
    const WATCH_MS: u64 = 100;
    let gateway = Gateway::start(&GatewayOptions {
        config_watch_interval_ms: WATCH_MS,
        extra: sections(1, 0),
        ..GatewayOptions::default()
    });
    let config_path = gateway.dir.path().join("isthmus.toml");
    let started = std::fs::read_to_string(&config_path).unwrap();
    let reloads = |outcome: &str| {
        gateway
            .metric(&format!(
                "isthmus_config_reloads_total{{outcome=\"{outcome}\"}}"
            ))
            .unwrap_or(-1.0)
    };
    let target = || {
        block_on(async {
            header(
                &post(&gateway, &chat("gpt-4o", json!({}))).await,
                "x-isthmus-target",
            )
        })
    };
    assert_eq!(target(), "aks/v1");
    assert_eq!(reloads("success"), 0.0);

    // Rewritten in place: the weights swap with no signal and no admin call.
    std::fs::write(
        &config_path,
        started.replace(&sections(1, 0), &sections(0, 1)),
    )
    .unwrap();
    assert!(
        tests::eventually(DEADLINE, || reloads("success") == 1.0),
        "{}",
        gateway.metrics()
    );
    assert_eq!(target(), "aks/v2");
    assert!(gateway.log().contains("configuration file changed"));

    // Replaced by a rename, as a ConfigMap update or an editor does, with a broken value:
    // refused once, not retried while the text stays the same, the previous one in force.
    let replace = |text: &str| {
        let sibling = gateway.dir.path().join(".isthmus.toml.new");
        std::fs::write(&sibling, text).unwrap();
        std::fs::rename(&sibling, &config_path).unwrap();
    };
    let swapped = std::fs::read_to_string(&config_path).unwrap();
    replace(&swapped.replace("weight = 1", "weight = \"heavy\""));
    assert!(
        tests::eventually(DEADLINE, || reloads("failure") == 1.0),
        "{}",
        gateway.metrics()
    );
    assert_eq!(
        gateway.metric("isthmus_config_last_reload_successful"),
        Some(0.0)
    );
    assert_eq!(target(), "aks/v2");
    // An absence can only be seen by waiting: five more reads of the same refused text.
    std::thread::sleep(Duration::from_millis(5 * WATCH_MS));
    assert_eq!(reloads("failure"), 1.0);

    // A valid file again, also changing a listener limit: the weights apply at once and the
    // limit is reported as waiting for a restart.
    replace(&started.replace("connections_max = 64", "connections_max = 65"));
    assert!(
        tests::eventually(DEADLINE, || reloads("success") == 2.0),
        "{}",
        gateway.metrics()
    );
    assert_eq!(target(), "aks/v1");
    assert_eq!(
        gateway.metric("isthmus_config_last_reload_successful"),
        Some(1.0)
    );
    assert_eq!(
        gateway.metric("isthmus_config_restart_required{section=\"server\"}"),
        Some(1.0)
    );
}

#[test]
fn a_rotated_key_file_takes_effect_without_a_signal() {
    let _serial = serial();
    let dir = tests::scratch_dir();
    let key_file = dir.path().join("rotating.key");
    std::fs::write(&key_file, "first-rotating-key\n").unwrap();
    let config_path = dir.path().join("isthmus.toml");
    let text = tests::config_text(
        &GatewayOptions {
            config_watch_interval_ms: 100,
            ..GatewayOptions::default()
        },
        dir.path(),
    )
    .replacen(
        "api_keys = [",
        &format!("api_keys = [{{ id = \"rotating\", key_file = {key_file:?} }}, "),
        1,
    );
    std::fs::write(&config_path, text).unwrap();
    let gateway = Gateway::start_with_config(dir, &config_path);
    let status = |key: &str| {
        block_on(crate::rate_limits::models(&gateway, key))
            .status()
            .as_u16()
    };
    assert_eq!(status("first-rotating-key"), 200);
    assert_eq!(status("second-rotating-key"), 401);

    // The Secret is rotated as the kubelet does it: a new file renamed over the old.
    let sibling = key_file.with_extension("new");
    std::fs::write(&sibling, "second-rotating-key\n").unwrap();
    std::fs::rename(&sibling, &key_file).unwrap();
    assert!(
        tests::eventually(DEADLINE, || status("second-rotating-key") == 200),
        "{}",
        gateway.log()
    );
    assert_eq!(status("first-rotating-key"), 401);
    assert_eq!(status(API_KEY), 200, "the other keys are unchanged");
    assert_eq!(
        gateway.metric("isthmus_config_reloads_total{outcome=\"success\"}"),
        Some(1.0)
    );
}

/// POSTs to the admin listener and returns its JSON answer.
pub fn admin_post(gateway: &Gateway, path: &str) -> Value {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect(gateway.admin).unwrap();
    write!(
        stream,
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, body)| body)
        .unwrap_or("");
    serde_json::from_str(body).unwrap_or_else(|_| Value::String(text.clone()))
}

#[test]
fn active_probes_take_a_failing_backend_out_and_bring_it_back_and_credentials_are_sent() {
    let _serial = serial();
    let probed = start(UpstreamOptions {
        name: "probed".to_owned(),
        ..options()
    });
    let other = start(UpstreamOptions {
        name: "other".to_owned(),
        ..options()
    });
    let dir = tests::scratch_dir();
    let token_file = dir.path().join("vllm-key");
    std::fs::write(&token_file, "sk-upstream-secret\n").unwrap();
    let gateway = Gateway::start(&GatewayOptions {
        body_bytes_max: 8 * 1024 * 1024,
        // The configuration watcher also follows the pools' secret files.
        config_watch_interval_ms: 100,
        extra: format!(
            "[upstreams.aks]\nmodels = {{ \"gpt-4o\" = \"m\" }}\n[upstreams.aks.health]\ninterval_ms = 50\nhealthy_threshold = 1\nunhealthy_threshold = 1\n[upstreams.aks.auth]\nkind = \"bearer\"\ntoken_file = {token_file:?}\n{}{}",
            backend("aks", &probed, 1, "v1"),
            backend("aks", &other, 1, "v1"),
        ),
        ..GatewayOptions::default()
    });
    block_on(async {
        // Probes carry the pool's credentials too, and so does every forwarded request.
        let response = post(&gateway, &chat("gpt-4o", json!({}))).await;
        assert_eq!(response.status(), 200);
        let seen = [probed.requests().await, other.requests().await].concat();
        let forwarded = seen
            .iter()
            .find(|request| request["path"] == "/v1/chat/completions")
            .unwrap();
        assert_eq!(
            forwarded["headers"]["authorization"], "Bearer sk-upstream-secret",
            "{forwarded}"
        );
        assert!(seen.iter().any(|request| request["path"] == "/health"));
        assert!(!gateway.log().contains("sk-upstream-secret"));

        probed.set_behaviour(json!({"health_status": 500})).await;
        assert!(
            tests::eventually(
                DEADLINE,
                || upstream_status(&gateway, "probed")["probed_healthy"] == false
            ),
            "the failing probes did not take the backend out"
        );
        for _ in 0..10 {
            let response = post(&gateway, &chat("gpt-4o", json!({}))).await;
            assert_eq!(header(&response, "x-isthmus-target"), "aks/other");
        }
        probed.set_behaviour(json!({"reset": true})).await;
        assert!(
            tests::eventually(
                DEADLINE,
                || upstream_status(&gateway, "probed")["probed_healthy"] == true
            ),
            "good probes did not bring the backend back"
        );

        // A secret file rotated in place (a Kubernetes Secret) is used without a reload by
        // hand: the configuration watcher follows the pools' secret files too.
        std::fs::write(&token_file, "sk-rotated-secret\n").unwrap();
        let deadline = std::time::Instant::now() + DEADLINE;
        loop {
            let response = post(&gateway, &chat("gpt-4o", json!({}))).await;
            assert_eq!(response.status(), 200);
            let seen = [probed.requests().await, other.requests().await].concat();
            let sent = seen
                .iter()
                .filter(|request| request["path"] == "/v1/chat/completions")
                .filter_map(|request| request["headers"]["authorization"].as_str())
                .any(|header| header == "Bearer sk-rotated-secret");
            if sent {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the rotated secret was never sent"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        // Backends that refuse the gateway's credentials: the caller hears that the gateway
        // could not authenticate (502), not a 401 about its own key, and nothing of theirs.
        for upstream in [&probed, &other] {
            upstream.set_behaviour(json!({"status": 401})).await;
        }
        let response = post(&gateway, &chat("gpt-4o", json!({}))).await;
        assert_eq!(response.status(), 502);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "upstream_error", "{body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert_eq!(
            message, "pool `aks` refused the gateway's credentials",
            "{body}"
        );
        for upstream in [&probed, &other] {
            upstream.set_behaviour(json!({"reset": true})).await;
        }
    });
}

#[test]
fn behind_a_trusted_proxy_the_forwarded_client_is_audited_and_keeps_its_variant() {
    let _serial = serial();
    let (v1, v2) = (versioned("v1"), versioned("v2"));
    let dir = tests::scratch_dir();
    let config_path = dir.path().join("isthmus.toml");
    let options = GatewayOptions {
        extra: format!(
            "{}{}{}",
            pool("sticky", r#""sticky-model" = "m""#, "sticky = true"),
            backend("sticky", &v1, 50, "v1"),
            backend("sticky", &v2, 50, "v2"),
        ),
        ..GatewayOptions::default()
    };
    // Anonymous callers (no key to stick by), and loopback as the proxy in front.
    let text = tests::config_text(&options, dir.path())
        .replacen(
            "[server]\n",
            "[server]\ntrusted_proxies = [\"127.0.0.1\"]\n",
            1,
        )
        .replacen("[auth]\n", "[auth]\nallow_anonymous = true\n", 1);
    std::fs::write(&config_path, text).unwrap();
    let gateway = Gateway::start_with_config(dir, &config_path);
    block_on(async {
        let mut variants = std::collections::BTreeSet::new();
        for client in 1..=16 {
            let forwarded = format!("198.51.100.77, 203.0.113.{client}");
            let mut targets = std::collections::BTreeSet::new();
            // A new connection (a new source port) each time: the variant follows the
            // client the proxy forwarded for, not the connection.
            for _ in 0..2 {
                let response = tests::client()
                    .post(gateway.url("/v1/chat/completions"))
                    .header("x-forwarded-for", &forwarded)
                    .json(&chat("sticky-model", json!({})))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status(), 200);
                targets.insert(header(&response, "x-isthmus-target"));
            }
            assert_eq!(targets.len(), 1, "client {client}: {targets:?}");
            variants.extend(targets);
        }
        assert_eq!(variants.len(), 2, "sixteen clients all on {variants:?}");
    });
    // The records name the client the proxy saw, not the proxy and not what the client
    // itself claimed before it.
    let (status, body) = tests::plain_get(
        gateway.admin,
        "/admin/api/audit/records?category=IsthmusAudit&limit=500",
    )
    .unwrap();
    assert_eq!(status, 200, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    let addresses: std::collections::BTreeSet<&str> = body["records"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|record| record["OperationName"] == "Isthmus/inference/chat/completions/action")
        .map(|record| record["CallerIpAddress"].as_str().unwrap())
        .collect();
    assert_eq!(addresses.len(), 16, "{addresses:?}");
    assert!(
        addresses
            .iter()
            .all(|address| address.starts_with("203.0.113.")),
        "{addresses:?}"
    );
}
