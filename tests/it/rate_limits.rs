//! Per-caller rate limits end to end: a key's requests per minute and another's tokens per
//! minute refuse with 429, `Retry-After` and OpenAI's error body, every answer to a limited
//! caller carries the `x-ratelimit-*` headers, the refusals and each key's use are counted,
//! and a reload that raises a limit applies to the running buckets.

use std::time::Duration;

use serde_json::{Value, json};
use sha2::Digest as _;
use tests::{API_KEY, Gateway, GatewayOptions, serial};

use crate::block_on;

const TOKENS_KEY: &str = "isthmus-tokens-test-key";

fn header(response: &reqwest::Response, name: &str) -> Option<String> {
    response
        .headers()
        .get(name)
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned)
}

/// `GET /v1/models` with `key` as the bearer token.
pub(crate) async fn models(gateway: &Gateway, key: &str) -> reqwest::Response {
    tests::client()
        .get(gateway.url("/v1/models"))
        .bearer_auth(key)
        .send()
        .await
        .unwrap()
}

async fn chat(gateway: &Gateway, key: &str) -> reqwest::Response {
    tests::client()
        .post(gateway.url("/v1/chat/completions"))
        .bearer_auth(key)
        .json(&json!({"model": "smollm2", "max_tokens": 4, "temperature": 0, "messages": [
            {"role": "user", "content": "Name three rivers of Europe and the seas they flow into, one line each."}]}))
        .send()
        .await
        .unwrap()
}

#[test]
fn callers_are_held_to_their_requests_and_tokens_per_minute() {
    let _serial = serial();
    let dir = tests::scratch_dir();
    let config_path = dir.path().join("isthmus.toml");
    let digest = |key: &str| hex::encode(sha2::Sha256::digest(key.as_bytes()));
    let test_key = format!("{{ id = \"test\", sha256 = \"{}\" }}", digest(API_KEY));
    let limited = |requests: u32| {
        format!(
            "{{ id = \"test\", sha256 = \"{}\", requests_per_minute = {requests} }}, {{ id = \"tokens\", sha256 = \"{}\", tokens_per_minute = 20 }}",
            digest(API_KEY),
            digest(TOKENS_KEY)
        )
    };
    let text = tests::config_text(&GatewayOptions::default(), dir.path());
    assert!(text.contains(&test_key), "{text}");
    std::fs::write(&config_path, text.replacen(&test_key, &limited(3), 1)).unwrap();
    let gateway = Gateway::start_with_config(dir, &config_path);
    block_on(async {
        // Three requests a minute: each answer says what is left.
        for remaining in ["2", "1", "0"] {
            let response = models(&gateway, API_KEY).await;
            assert_eq!(response.status(), 200);
            assert_eq!(
                header(&response, "x-ratelimit-limit-requests").as_deref(),
                Some("3")
            );
            assert_eq!(
                header(&response, "x-ratelimit-remaining-requests").as_deref(),
                Some(remaining)
            );
            let reset = header(&response, "x-ratelimit-reset-requests").unwrap();
            assert!(reset.ends_with('s'), "{reset}");
            assert!(header(&response, "x-ratelimit-limit-tokens").is_none());
        }
        let refused = models(&gateway, API_KEY).await;
        assert_eq!(refused.status(), 429);
        let retry_after: u64 = header(&refused, "retry-after").unwrap().parse().unwrap();
        assert!(
            (1..=20).contains(&retry_after),
            "one request every 20 s: {retry_after}"
        );
        assert_eq!(
            header(&refused, "x-isthmus-rule").as_deref(),
            Some("rate_limit")
        );
        assert_eq!(
            header(&refused, "x-ratelimit-remaining-requests").as_deref(),
            Some("0")
        );
        let body: Value = refused.json().await.unwrap();
        assert_eq!(body["error"]["code"], "rate_limit_exceeded", "{body}");
        assert_eq!(body["error"]["type"], "requests");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("API key `test`"),
            "{body}"
        );

        // Twenty tokens a minute: the first request is admitted with the whole minute and
        // uses more; the next waits until that debt is repaid.
        let first = chat(&gateway, TOKENS_KEY).await;
        assert_eq!(first.status(), 200);
        assert_eq!(
            header(&first, "x-ratelimit-limit-tokens").as_deref(),
            Some("20")
        );
        assert_eq!(
            header(&first, "x-ratelimit-remaining-tokens").as_deref(),
            Some("20")
        );
        let used: Value = first.json().await.unwrap();
        let total = used["usage"]["total_tokens"].as_u64().unwrap();
        assert!(total > 20, "the prompt alone is longer: {used}");
        let refused = chat(&gateway, TOKENS_KEY).await;
        assert_eq!(refused.status(), 429);
        let retry_after: u64 = header(&refused, "retry-after").unwrap().parse().unwrap();
        // A token every 3 s: the debt of total − 20 tokens, and one more.
        assert!(
            retry_after >= (total - 20) * 3,
            "{retry_after} s for a debt of {} tokens",
            total - 20
        );
        let body: Value = refused.json().await.unwrap();
        assert_eq!(body["error"]["type"], "tokens", "{body}");
    });
    // The admin API shows each key's limits and what is left of them.
    let (status, body) = tests::plain_get(gateway.admin, "/admin/api/callers").unwrap();
    assert_eq!(status, 200, "{body}");
    let callers: Value = serde_json::from_str(&body).unwrap();
    let caller = |key: &str| {
        callers["callers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|caller| caller["key"] == key)
            .cloned()
            .unwrap_or_else(|| panic!("no {key} in {callers}"))
    };
    assert_eq!(caller("test")["limits"]["requests_per_minute"], 3);
    assert_eq!(caller("test")["remaining"]["requests"], 0, "{callers}");
    assert_eq!(caller("tokens")["limits"]["tokens_per_minute"], 20);
    assert_eq!(caller("tokens")["remaining"]["tokens"], 0, "{callers}");
    assert!(caller("tokens")["remaining"]["requests"].is_null());
    assert!(!body.contains(API_KEY) && !body.contains(TOKENS_KEY));
    assert_eq!(
        gateway.metric("isthmus_rate_limited_requests_total{limit=\"requests\"}"),
        Some(1.0)
    );
    assert_eq!(
        gateway.metric("isthmus_rate_limited_requests_total{limit=\"tokens\"}"),
        Some(1.0)
    );
    // Use per key: the tokens key's one answered request, its refusal counted as a request.
    assert_eq!(
        gateway.metric("isthmus_caller_requests_total{key=\"tokens\",route=\"local\"}"),
        Some(1.0)
    );
    assert_eq!(
        gateway.metric("isthmus_caller_requests_total{key=\"tokens\",route=\"rejected\"}"),
        Some(1.0)
    );
    assert!(
        gateway
            .metric("isthmus_caller_tokens_total{key=\"tokens\",route=\"local\",kind=\"prompt\"}")
            .unwrap()
            > 20.0
    );

    // A reload that raises the limit applies to the bucket as it stands: it refills at the
    // new rate, so the caller is admitted again within a second.
    let text = std::fs::read_to_string(&config_path).unwrap();
    std::fs::write(&config_path, text.replacen(&limited(3), &limited(600), 1)).unwrap();
    let reloaded = crate::cloud::admin_post(&gateway, "/admin/api/reload");
    assert_eq!(reloaded["reloaded"], true, "{reloaded}");
    assert!(tests::eventually(Duration::from_secs(5), || block_on(
        async {
            let response = models(&gateway, API_KEY).await;
            response.status() == 200
                && header(&response, "x-ratelimit-limit-requests").as_deref() == Some("600")
        }
    )));
}

/// A gateway's configuration whose test key has a daily budget of `tokens`.
fn budgeted_config(tokens: u64) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tests::scratch_dir();
    let config_path = dir.path().join("isthmus.toml");
    let digest = hex::encode(sha2::Sha256::digest(API_KEY.as_bytes()));
    let test_key = format!("{{ id = \"test\", sha256 = \"{digest}\" }}");
    let text = tests::config_text(&GatewayOptions::default(), dir.path()).replacen(
        &test_key,
        &format!("{{ id = \"test\", sha256 = \"{digest}\", tokens_per_day = {tokens} }}"),
        1,
    );
    std::fs::write(&config_path, text).unwrap();
    (dir, config_path)
}

#[test]
fn a_days_token_budget_holds_across_a_restart() {
    let _serial = serial();
    let (dir, config_path) = budgeted_config(20);
    let mut gateway = Gateway::start_with_config(dir, &config_path);
    let refused = |gateway: &Gateway| {
        block_on(async {
            let response = chat(gateway, API_KEY).await;
            assert_eq!(response.status(), 429);
            let retry_after: u64 = header(&response, "retry-after").unwrap().parse().unwrap();
            assert!(
                (1..=86_400).contains(&retry_after),
                "until midnight UTC: {retry_after}"
            );
            let body: Value = response.json().await.unwrap();
            assert_eq!(body["error"]["code"], "insufficient_quota", "{body}");
            assert_eq!(body["error"]["type"], "insufficient_quota");
        });
    };
    block_on(async {
        // The request that crosses the budget is served whole.
        let first = chat(&gateway, API_KEY).await;
        assert_eq!(first.status(), 200);
        let used: Value = first.json().await.unwrap();
        assert!(
            used["usage"]["total_tokens"].as_u64().unwrap() > 20,
            "{used}"
        );
    });
    refused(&gateway);
    let (_, body) = tests::plain_get(gateway.admin, "/admin/api/callers").unwrap();
    let callers: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        callers["callers"][0]["limits"]["tokens_per_day"], 20,
        "{callers}"
    );
    assert_eq!(
        callers["callers"][0]["remaining"]["tokens_today"], 0,
        "{callers}"
    );
    assert_eq!(
        gateway.metric("isthmus_rate_limited_requests_total{limit=\"tokens_per_day\"}"),
        Some(1.0)
    );

    // A restart does not hand out a fresh budget.
    gateway.signal(libc::SIGTERM);
    assert!(gateway.wait_exit(Duration::from_secs(30)).is_some());
    let state = gateway.dir.path().join("state/daily-usage.json");
    assert!(state.is_file(), "{}", state.display());
    let dir = std::mem::replace(&mut gateway.dir, tests::scratch_dir());
    drop(gateway);
    let gateway = Gateway::start_with_config(dir, &config_path);
    refused(&gateway);
}

#[test]
fn requests_at_once_cannot_each_cross_a_days_budget() {
    let _serial = serial();
    let (dir, config_path) = budgeted_config(900);
    let gateway = Gateway::start_with_config(dir, &config_path);
    block_on(async {
        // A long answer streams: it holds its 900 tokens and its prompt of the budget of 900
        // while it runs.
        let mut long = tests::client()
            .post(gateway.url("/v1/chat/completions"))
            .bearer_auth(API_KEY)
            .json(
                &json!({"model": "smollm2", "max_tokens": 900, "stream": true,
                "ignore_eos": true, "messages": [{"role": "user", "content": "Count."}]}),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(long.status(), 200);
        let first = tokio::time::timeout(Duration::from_secs(60), long.chunk())
            .await
            .expect("no first chunk")
            .unwrap();
        assert!(first.is_some());
        // Another request meanwhile would cross the budget with it: refused.
        let refused = chat(&gateway, API_KEY).await;
        assert_eq!(refused.status(), 429);
        let body: Value = refused.json().await.unwrap();
        assert_eq!(body["error"]["code"], "insufficient_quota", "{body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("requests in flight"),
            "{body}"
        );
        // Once the long answer ends (its caller left after a few tokens), what it did not
        // use is free again.
        drop(long);
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let response = chat(&gateway, API_KEY).await;
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
    });
}

#[test]
fn with_per_client_limits_one_anonymous_client_cannot_spend_another_s_allowance() {
    let _serial = serial();
    let dir = tests::scratch_dir();
    let config_path = dir.path().join("isthmus.toml");
    let text = tests::config_text(&GatewayOptions::default(), dir.path())
        .replacen("[server]\n", "[server]\ntrusted_proxies = [\"127.0.0.1\"]\n", 1)
        .replacen(
            "[auth]\n",
            "[auth]\nallow_anonymous = true\nanonymous_limits = { requests_per_minute = 2, per_client = true }\n",
            1,
        );
    std::fs::write(&config_path, text).unwrap();
    let gateway = Gateway::start_with_config(dir, &config_path);
    let from = |client: &str| {
        tests::client()
            .get(gateway.url("/v1/models"))
            .header("x-forwarded-for", format!("198.51.100.1, {client}"))
            .send()
    };
    block_on(async {
        for _ in 0..2 {
            assert_eq!(from("203.0.113.1").await.unwrap().status(), 200);
        }
        let refused = from("203.0.113.1").await.unwrap();
        assert_eq!(refused.status(), 429);
        assert!(header(&refused, "retry-after").is_some());
        let body: Value = refused.json().await.unwrap();
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("anonymous client 203.0.113.1"),
            "{body}"
        );
        // Another client (another address the proxy forwarded for) has its own minute;
        // what a client writes before the proxy's entry does not make it someone else.
        let other = from("203.0.113.2").await.unwrap();
        assert_eq!(other.status(), 200);
        assert_eq!(
            header(&other, "x-ratelimit-remaining-requests").as_deref(),
            Some("1")
        );
        let disguised = tests::client()
            .get(gateway.url("/v1/models"))
            .header("x-forwarded-for", "203.0.113.9, 203.0.113.1")
            .send()
            .await
            .unwrap();
        assert_eq!(disguised.status(), 429);
    });
    // The admin API gives the anonymous limits as each client's, with no one "left now".
    let (status, body) = tests::plain_get(gateway.admin, "/admin/api/callers").unwrap();
    assert_eq!(status, 200, "{body}");
    let callers: Value = serde_json::from_str(&body).unwrap();
    let anonymous = callers["callers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|caller| caller["key"] == "(anonymous)")
        .cloned()
        .unwrap_or_else(|| panic!("no anonymous callers in {callers}"));
    assert_eq!(anonymous["limits"]["requests_per_minute"], 2, "{anonymous}");
    assert_eq!(anonymous["limits"]["per_client"], true, "{anonymous}");
    assert!(anonymous["remaining"]["requests"].is_null(), "{anonymous}");
}
