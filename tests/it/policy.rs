//! Routing rules end to end: sensitive prompts stay on the local model, complex ones go to the
//! cloud pool, a classified request fails closed, redact-then-cloud restores the values in a
//! streamed answer, and `isthmus explain` / `POST /admin/api/explain` show why.

use std::process::Command;

use serde_json::{Value, json};
use tests::{API_KEY, Gateway, GatewayOptions, Upstream, serial};

use crate::block_on;
use crate::upstream::options;

/// A multi-step word problem of the kind the strong model is needed for.
const HARD: &str = "A train leaves city A at 9:40 travelling at 84 km/h; a second train leaves city B, \
    412 km away, at 10:15 travelling towards A at 96 km/h. First work out where they meet, then \
    prove that the meeting time does not depend on which city the 35-minute head start is \
    measured from, and finally derive a general formula for n trains. Explain each step.";
const VALID_IBAN: &str = "DE89 3704 0044 0532 0130 00";
const INVALID_IBAN: &str = "DE00 3704 0044 0532 0130 00";
/// A test Visa number (Luhn-valid), sent as a JSON number.
const CARD_NUMBER: u64 = 4_111_111_111_111_111;

pub(crate) fn policy_config(upstream: &Upstream) -> String {
    format!(
        r#"
[upstreams.aks]
models = {{ "gpt-4o" = "served-70b" }}
[[upstreams.aks.backends]]
url = "{url}"
name = "cloud"
[upstreams.aks.health]
interval_ms = 60000

[policy]
sensitive_classifications = ["confidential"]

[[policy.rules]]
name = "finance-redacts"
action = "redact_then_cloud"
target = "aks"
model = "gpt-4o"
when = {{ headers = {{ "x-team" = "finance" }} }}

[[policy.rules]]
name = "sensitive-local"
action = "local"
target = "smollm2"
when = {{ sensitive = true }}

# Pictures and files cannot be scanned: they do not leave, and the local model reads text.
[[policy.rules]]
name = "attachments-refused"
action = "reject"
status = 403
message = "attachments cannot be checked for sensitive content"
when = {{ attachments = ["*"] }}

# About 30% of the RouteLLM prompts score 0.574 or more (data/routing/README.md).
[[policy.rules]]
name = "complex-to-cloud"
action = "cloud"
target = "aks"
model = "gpt-4o"
when = {{ complexity_min = 0.57 }}
"#,
        url = upstream.base_url()
    )
}

pub(crate) fn start(upstream: &Upstream) -> Gateway {
    Gateway::start(&GatewayOptions {
        extra: policy_config(upstream),
        ..GatewayOptions::default()
    })
}

async fn send(gateway: &Gateway, body: &Value, headers: &[(&str, &str)]) -> reqwest::Response {
    let mut request = tests::client()
        .post(gateway.url("/v1/chat/completions"))
        .bearer_auth(API_KEY)
        .json(body);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.send().await.unwrap()
}

/// Posts a chat body written by hand (JSON a serializer would not write).
async fn send_text(gateway: &Gateway, body: String) -> reqwest::Response {
    tests::client()
        .post(gateway.url("/v1/chat/completions"))
        .bearer_auth(API_KEY)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap()
}

fn chat(content: &str, extra: Value) -> Value {
    crate::chat_body(content, extra)
}

fn route(response: &reqwest::Response) -> (String, String) {
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .map(|value| value.to_str().unwrap().to_owned())
            .unwrap_or_default()
    };
    (header("x-isthmus-route"), header("x-isthmus-rule"))
}

fn admin_explain(gateway: &Gateway, body: &Value) -> Value {
    use std::io::{Read as _, Write as _};
    let text = body.to_string();
    let mut stream = std::net::TcpStream::connect(gateway.admin).unwrap();
    write!(
        stream,
        "POST /admin/api/explain HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
        text.len()
    )
    .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, body)| body);
    serde_json::from_str(body).unwrap_or_else(|_| Value::String(answer.clone()))
}

#[test]
fn a_valid_iban_stays_local_while_an_invalid_one_is_routed_by_complexity() {
    let _serial = serial();
    let upstream = Upstream::start(options()).unwrap();
    let gateway = start(&upstream);
    block_on(async {
        let simple = admin_explain(&gateway, &chat("Hi there", json!({})));
        let hard = admin_explain(&gateway, &chat(HARD, json!({})));
        let simple_score = simple["complexity"].as_f64().unwrap();
        let hard_score = hard["complexity"].as_f64().unwrap();
        assert!(
            simple_score < 0.57 && hard_score >= 0.57,
            "complexity: simple {simple_score}, hard {hard_score}"
        );

        let response = send(&gateway, &chat("Hi there", json!({"max_tokens": 4})), &[]).await;
        assert_eq!(route(&response), ("local".to_owned(), "default".to_owned()));

        // (A small max_tokens lowers the score: no limit on requests meant for the cloud.)
        let response = send(&gateway, &chat(HARD, json!({})), &[]).await;
        assert_eq!(
            route(&response),
            ("cloud".to_owned(), "complex-to-cloud".to_owned())
        );
        // Numbers in long runs of short groups (a count, a list of steps) are read and
        // routed like any prose.
        let counted = format!("{HARD} Number the steps 1 2 3 4 5 6 7 8 9 10.");
        let response = send(&gateway, &chat(&counted, json!({})), &[]).await;
        assert_eq!(response.status(), 200);
        assert_eq!(
            route(&response),
            ("cloud".to_owned(), "complex-to-cloud".to_owned())
        );

        let with_valid = format!("{HARD} Pay the fare from {VALID_IBAN}.");
        let response = send(&gateway, &chat(&with_valid, json!({"max_tokens": 4})), &[]).await;
        assert_eq!(
            route(&response),
            ("local".to_owned(), "sensitive-local".to_owned())
        );
        // A body large enough to be scanned off the gateway's I/O thread is routed alike
        // (the local model then finds the prompt too long for its context).
        let large = format!(
            "{HARD} {} Pay the fare from {VALID_IBAN}.",
            "word ".repeat(60_000)
        );
        let response = send(&gateway, &chat(&large, json!({"max_tokens": 4})), &[]).await;
        assert_eq!(
            route(&response),
            ("local".to_owned(), "sensitive-local".to_owned())
        );
        // Nor does splitting a value between two text parts, which the model reads as one
        // text; with the finance rule's redaction, such a value cannot be replaced in place,
        // so the request fails closed onto the local model.
        let split = json!({"model": "smollm2", "max_tokens": 200, "messages": [{"role": "user", "content": [
            {"type": "text", "text": format!("{HARD} Write to jane.doe@")},
            {"type": "text", "text": "contoso.com with the answer."},
        ]}]});
        let response = send(&gateway, &split, &[]).await;
        assert_eq!(
            route(&response),
            ("local".to_owned(), "sensitive-local".to_owned())
        );
        let response = send(&gateway, &split, &[("x-team", "finance")]).await;
        assert_eq!(
            route(&response),
            ("local".to_owned(), "fail_closed".to_owned())
        );
        // A private key split between two messages: its first half is a finding alone and
        // would be replaced, its second half would leave with nothing to show what it is.
        let key = json!({"model": "smollm2", "max_tokens": 200, "messages": [
            {"role": "user", "content": format!("{HARD} Check this key:\n-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA1c7+9z5Pad7OejecsQ0bu\n")},
            {"role": "user", "content": "Wq3vXr8sT2yZ0bLk7mN4pQ6dF1gH9jKc\n-----END RSA PRIVATE KEY-----"},
        ]});
        let response = send(&gateway, &key, &[("x-team", "finance")]).await;
        assert_eq!(
            route(&response),
            ("local".to_owned(), "fail_closed".to_owned())
        );
        // Nor do no-break spaces or zero-width spaces between its groups (a copy from a web
        // page, or an attempt to slip it past the scan).
        for separator in ["\u{a0}", "\u{200b}"] {
            let disguised = format!(
                "{HARD} Pay the fare from {}.",
                VALID_IBAN.replace(' ', separator)
            );
            let response = send(&gateway, &chat(&disguised, json!({"max_tokens": 4})), &[]).await;
            assert_eq!(
                route(&response),
                ("local".to_owned(), "sensitive-local".to_owned()),
                "{separator:?}"
            );
        }
        let with_invalid = format!("{HARD} Pay the fare from {INVALID_IBAN}.");
        let response = send(&gateway, &chat(&with_invalid, json!({})), &[]).await;
        assert_eq!(
            route(&response),
            ("cloud".to_owned(), "complex-to-cloud".to_owned())
        );
        // A picture beside the hard prompt keeps it off the cloud: the scan cannot read it.
        let with_picture = json!({"model": "smollm2", "messages": [{"role": "user", "content": [
            {"type": "text", "text": HARD},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
        ]}]});
        let response = send(&gateway, &with_picture, &[]).await;
        assert_eq!(response.status(), 403);
        assert_eq!(
            route(&response),
            ("rejected".to_owned(), "attachments-refused".to_owned())
        );
        // So do token ids: what text they stand for, the scan cannot tell.
        let embed = |input: Value| {
            tests::client()
                .post(gateway.url("/v1/embeddings"))
                .bearer_auth(API_KEY)
                .json(&json!({"model": "gpt-4o", "input": input}))
                .send()
        };
        let response = embed(json!("quarterly report")).await.unwrap();
        assert_eq!(route(&response), ("cloud".to_owned(), "default".to_owned()));
        let response = embed(json!([[9906, 1917]])).await.unwrap();
        assert_eq!(response.status(), 403);
        assert_eq!(
            route(&response),
            ("rejected".to_owned(), "attachments-refused".to_owned())
        );
        // A repeated key cannot hide the IBAN: parsers disagree on which copy wins, so such a
        // body is refused outright (and the scan would read every copy).
        let messages = |content: &str| json!([{"role": "user", "content": content}]).to_string();
        let smuggled = format!(
            r#"{{"model": "smollm2", "max_tokens": 200, "messages": {}, "messages": {}}}"#,
            messages(&with_valid),
            messages(HARD)
        );
        let response = send_text(&gateway, smuggled).await;
        assert_eq!(
            route(&response),
            ("rejected".to_owned(), "request".to_owned())
        );
        let body: Value = response.json().await.unwrap();
        assert_eq!(
            body["error"]["message"],
            "the request body has the key `messages` more than once"
        );
        // Nor can JSON that other parsers read and the scan's reader cannot: nesting deeper
        // than it goes, a number beyond f64, a lone surrogate escape. Such a body is refused;
        // none of them reaches the backend (checked below with the rest).
        let hard = serde_json::to_string(HARD).unwrap();
        for (what, metadata) in [
            (
                "deep",
                format!("{}\"{VALID_IBAN}\"{}", "[".repeat(200), "]".repeat(200)),
            ),
            (
                "huge number",
                format!("{{\"x\": 1e400, \"note\": \"{VALID_IBAN}\"}}"),
            ),
            ("lone surrogate", format!("[\"\\ud800\", \"{VALID_IBAN}\"]")),
        ] {
            let smuggled = format!(
                r#"{{"model": "gpt-4o", "messages": [{{"role": "user", "content": {hard}}}], "metadata": {metadata}}}"#
            );
            let response = send_text(&gateway, smuggled).await;
            assert_eq!(response.status(), 400, "{what}");
            assert_eq!(
                route(&response),
                ("rejected".to_owned(), "request".to_owned()),
                "{what}"
            );
            let body: Value = response.json().await.unwrap();
            assert_eq!(body["error"]["code"], "invalid_json", "{what}: {body}");
        }
        // Nor can a field outside the prompt (the cloud leg forwards the whole body), as a
        // string or as a number.
        for metadata in [json!({"note": VALID_IBAN}), json!({"card": CARD_NUMBER})] {
            let body = chat(HARD, json!({"max_tokens": 200, "metadata": metadata}));
            let response = send(&gateway, &body, &[]).await;
            assert_eq!(
                route(&response),
                ("local".to_owned(), "sensitive-local".to_owned()),
                "{metadata}"
            );
        }
        // Redaction replaces values in the prompt, not in a message's `name`: the finance
        // rule's redact-then-cloud fails closed onto the local model instead.
        let mut named = chat(HARD, json!({"max_tokens": 200}));
        named["messages"][0]["name"] = json!(VALID_IBAN);
        let response = send(&gateway, &named, &[("x-team", "finance")]).await;
        assert_eq!(
            route(&response),
            ("local".to_owned(), "fail_closed".to_owned())
        );
        // Nothing with the valid IBAN, the card number or the split address ever reached
        // the cloud.
        let digits = VALID_IBAN.replace(' ', "");
        for request in upstream.requests().await {
            assert!(!request.to_string().contains("contoso.com with"));
            let seen = request.to_string().replace(' ', "");
            assert!(!seen.contains(&digits), "the IBAN left the premises");
            assert!(
                !seen.contains(&CARD_NUMBER.to_string()),
                "the card number left the premises"
            );
        }

        // A classified document cannot be redacted: the finance rule's cloud action fails
        // closed onto the local model.
        let response = send(
            &gateway,
            &chat("Summarise the board minutes.", json!({"max_tokens": 4})),
            &[
                ("x-data-classification", "Confidential"),
                ("x-team", "finance"),
            ],
        )
        .await;
        assert_eq!(response.status(), 200);
        assert_eq!(
            route(&response),
            ("local".to_owned(), "fail_closed".to_owned())
        );
    });
    let metrics = gateway.metrics();
    let refused = "isthmus_attachment_requests_total{kind=\"image\",disposition=\"rejected\"} 1";
    assert!(metrics.contains(refused), "missing {refused} in\n{metrics}");
}

#[test]
fn redact_then_cloud_restores_the_values_in_a_streamed_answer() {
    let _serial = serial();
    let upstream = Upstream::start(options()).unwrap();
    let gateway = start(&upstream);
    block_on(async {
        let secret = "Write to jane.doe@contoso.com about card 4111 1111 1111 1111 today.";
        let body = chat(secret, json!({"stream": true, "fake_echo": true}));
        let response = send(&gateway, &body, &[("x-team", "finance")]).await;
        assert_eq!(response.status(), 200);
        assert_eq!(
            route(&response),
            ("cloud".to_owned(), "finance-redacts".to_owned())
        );
        let text = response.text().await.unwrap();
        let content = crate::sse_content(&text);
        assert_eq!(content, secret, "the echoed answer comes back restored");
        let chats: Vec<Value> = upstream
            .requests()
            .await
            .into_iter()
            .filter(|request| request["path"] == "/v1/chat/completions")
            .collect();
        assert_eq!(chats.len(), 1);
        // The cloud saw placeholders; the client got the values back.
        assert_eq!(
            chats[0]["last_message"],
            "Write to <EMAIL_1> about card <CREDIT_CARD_1> today."
        );

        // The same without streaming.
        let body = chat(secret, json!({"fake_echo": true}));
        let response = send(&gateway, &body, &[("x-team", "finance")]).await;
        let answer: Value = response.json().await.unwrap();
        assert_eq!(answer["choices"][0]["message"]["content"], secret);

        // A function call's arguments (JSON in a string) come back restored too, whole and
        // streamed, and still parse.
        let echoed = json!({ "text": secret });
        let body = chat(
            secret,
            json!({"fake_echo": true, "fake_echo_tool_call": true}),
        );
        let response = send(&gateway, &body, &[("x-team", "finance")]).await;
        let answer: Value = response.json().await.unwrap();
        let arguments = answer["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert_eq!(
            serde_json::from_str::<Value>(&arguments).ok(),
            Some(echoed.clone()),
            "{answer}"
        );
        let body = chat(
            secret,
            json!({"stream": true, "fake_echo": true, "fake_echo_tool_call": true}),
        );
        let response = send(&gateway, &body, &[("x-team", "finance")]).await;
        let text = response.text().await.unwrap();
        let streamed = crate::sse_tool_arguments(&text);
        assert_eq!(
            serde_json::from_str::<Value>(&streamed).ok(),
            Some(echoed),
            "{text}"
        );
    });
}

#[test]
fn explain_prints_one_line_per_request_with_every_rule_verdict() {
    let _serial = serial();
    let upstream = Upstream::start(options()).unwrap();
    let dir = tests::scratch_dir();
    let config = dir.path().join("isthmus.toml");
    std::fs::write(
        &config,
        tests::config_text(
            &GatewayOptions {
                extra: policy_config(&upstream),
                ..GatewayOptions::default()
            },
            dir.path(),
        ),
    )
    .unwrap();
    let input = dir.path().join("requests.jsonl");
    let lines = [
        chat(&format!("Pay from {VALID_IBAN}"), json!({})).to_string(),
        chat(HARD, json!({})).to_string(),
        "not json".to_owned(),
        json!({"model": "smollm2", "messages": [{"role": "user", "content": [
            {"type": "text", "text": HARD},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
            {"type": "file", "file": {"filename": "contract.pdf", "file_data": "data:application/pdf;base64,JVBERi0="}},
        ]}]})
        .to_string(),
    ];
    std::fs::write(&input, lines.join("\n")).unwrap();
    let output = Command::new(tests::isthmus_binary())
        .args(["explain", "--config"])
        .arg(&config)
        .arg("--jsonl")
        .arg(&input)
        .output()
        .unwrap();
    assert_eq!(
        output.status.code(),
        Some(1),
        "a bad line makes the exit status 1"
    );
    let stdout = String::from_utf8(output.stdout).unwrap();
    let records: Vec<Value> = stdout
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(records.len(), 4, "{stdout}");
    assert_eq!(records[0]["rule"], "sensitive-local");
    assert_eq!(records[0]["entities"], json!(["iban"]));
    assert_eq!(records[0]["decision"]["route"], "local");
    assert_eq!(
        records[0]["rules"],
        json!([
            {"rule": "finance-redacts", "verdict": "failed: headers"},
            {"rule": "sensitive-local", "verdict": "matched"},
            {"rule": "attachments-refused", "verdict": "not evaluated"},
            {"rule": "complex-to-cloud", "verdict": "not evaluated"},
        ])
    );
    assert_eq!(records[1]["rule"], "complex-to-cloud");
    assert_eq!(records[1]["decision"]["pool"], "aks");
    assert_eq!(records[1]["attachments"], json!([]));
    assert!(records[2]["error"].is_string());
    assert_eq!(records[2]["line"], 3);
    // The same hard prompt with a picture of a document does not go.
    assert_eq!(records[3]["rule"], "attachments-refused", "{}", records[3]);
    assert_eq!(records[3]["attachments"], json!(["file", "image"]));
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.contains("requests.jsonl:3:"), "{stderr}");

    // On an Azure deployment path the deployment names the model, as when serving: a body
    // that names the local model goes to the pool that serves the deployment.
    let simple = dir.path().join("simple.jsonl");
    std::fs::write(&simple, chat("Say hi.", json!({})).to_string()).unwrap();
    let output = Command::new(tests::isthmus_binary())
        .args(["explain", "--config"])
        .arg(&config)
        .arg("--jsonl")
        .arg(&simple)
        .args([
            "--path",
            "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8(output.stdout).unwrap();
    let record: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|_| panic!("{stdout}"));
    assert_eq!(record["decision"]["route"], "cloud", "{record}");
    assert_eq!(record["decision"]["pool"], "aks", "{record}");
}

#[test]
fn dictionaries_and_rules_reload_and_an_invalid_policy_is_refused_whole() {
    let _serial = serial();
    let upstream = Upstream::start(options()).unwrap();
    let gateway = start(&upstream);
    block_on(async {
        let body = chat(&format!("{HARD} Mention project Bluebird."), json!({}));
        let response = send(&gateway, &body, &[]).await;
        assert_eq!(
            route(&response),
            ("cloud".to_owned(), "complex-to-cloud".to_owned())
        );

        let config_path = gateway.dir.path().join("isthmus.toml");
        let text = std::fs::read_to_string(&config_path).unwrap();
        // An invalid pattern and an unknown target: both reported, nothing changes.
        let broken = text.replace(
            "sensitive_classifications = [\"confidential\"]",
            "sensitive_classifications = [\"confidential\"]\npatterns = { bad = \"(unclosed\" }",
        )
        .replace("target = \"smollm2\"", "target = \"missing-model\"");
        std::fs::write(&config_path, broken).unwrap();
        let refused = crate::cloud::admin_post(&gateway, "/admin/api/reload");
        assert_eq!(refused["reloaded"], false, "{refused}");
        let errors = refused["errors"].to_string();
        assert!(
            errors.contains("bad") && errors.contains("missing-model"),
            "{errors}"
        );
        let response = send(&gateway, &body, &[]).await;
        assert_eq!(
            route(&response).1,
            "complex-to-cloud",
            "the old policy still serves"
        );

        // A dictionary of project code names makes the same prompt sensitive.
        let with_dictionary = text.replace(
            "sensitive_classifications = [\"confidential\"]",
            "sensitive_classifications = [\"confidential\"]\ndictionaries = { projects = [\"Bluebird\"] }",
        );
        std::fs::write(&config_path, with_dictionary).unwrap();
        let reloaded = crate::cloud::admin_post(&gateway, "/admin/api/reload");
        assert_eq!(reloaded["reloaded"], true, "{reloaded}");
        let response = send(
            &gateway,
            &chat(
                &format!("{HARD} Mention project Bluebird."),
                json!({"max_tokens": 4}),
            ),
            &[],
        )
        .await;
        assert_eq!(
            route(&response),
            ("local".to_owned(), "sensitive-local".to_owned())
        );
    });
}
