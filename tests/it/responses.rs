//! `POST /v1/responses` end to end: the local model answers a Responses request with the
//! text the same chat request gets, as a Response object and as the Responses stream events;
//! what needs stored responses is refused with its parameter; the audit record names the
//! operation; and the routing policy reads every place of a Responses request — a card number
//! in a function's output keeps it local (and `explain` of the same body says so), an e-mail
//! address is redacted on its way to the cloud and restored in the streamed answer.

use std::time::Duration;

use serde_json::{Value, json};
use tests::{API_KEY, Gateway, GatewayOptions, Upstream, serial};

use crate::block_on;
use crate::upstream::options;

async fn post(
    gateway: &Gateway,
    path: &str,
    body: &Value,
    headers: &[(&str, &str)],
) -> reqwest::Response {
    let mut request = tests::client()
        .post(gateway.url(path))
        .bearer_auth(API_KEY)
        .json(body);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.send().await.unwrap()
}

/// The events of a Responses stream as (event name, data); each data's `type` is the name.
fn events(text: &str) -> Vec<(String, Value)> {
    text.split("\n\n")
        .filter(|event| !event.trim().is_empty())
        .map(|event| {
            let mut name = None;
            let mut data = None;
            for line in event.lines() {
                if let Some(value) = line.strip_prefix("event: ") {
                    name = Some(value.to_owned());
                } else if let Some(value) = line.strip_prefix("data: ") {
                    data = Some(
                        serde_json::from_str::<Value>(value)
                            .unwrap_or_else(|_| panic!("not JSON: {value}")),
                    );
                }
            }
            let (name, data) = (name.expect(event), data.expect(event));
            assert_eq!(data["type"], name.as_str(), "{event}");
            (name, data)
        })
        .collect()
}

/// The text a Response object's message items carry.
fn output_text(response: &Value) -> String {
    response["output"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|item| item["type"] == "message")
        .flat_map(|item| item["content"].as_array().unwrap().iter())
        .filter(|part| part["type"] == "output_text")
        .map(|part| part["text"].as_str().unwrap())
        .collect()
}

#[test]
fn the_local_model_answers_a_responses_request_as_it_answers_chat() {
    let _serial = serial();
    let gateway = Gateway::start(&GatewayOptions::default());
    block_on(async {
        let question = "What is the capital of France?";
        let chat: Value = post(
            &gateway,
            "/v1/chat/completions",
            &json!({"model": "smollm2", "temperature": 0, "max_tokens": 8,
                    "messages": [{"role": "system", "content": "Answer briefly."},
                                 {"role": "user", "content": question}]}),
            &[],
        )
        .await
        .json()
        .await
        .unwrap();
        let chat_text = chat["choices"][0]["message"]["content"].as_str().unwrap();
        assert!(!chat_text.trim().is_empty(), "{chat}");
        let request = json!({"model": "smollm2", "temperature": 0, "max_output_tokens": 8,
                             "instructions": "Answer briefly.", "input": question,
                             "metadata": {"ticket": "T-1"}});

        let response = post(
            &gateway,
            "/v1/responses",
            &request,
            &[("x-request-id", "r-1")],
        )
        .await;
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["x-isthmus-route"], "local");
        assert_eq!(response.headers()["content-type"], "application/json");
        let answer: Value = response.json().await.unwrap();
        assert_eq!(answer["object"], "response");
        assert_eq!(answer["id"], "resp_r-1");
        assert_eq!(answer["model"], "smollm2");
        assert_eq!(answer["instructions"], "Answer briefly.");
        assert_eq!(answer["metadata"], json!({"ticket": "T-1"}));
        assert_eq!(answer["store"], false);
        // Greedy, one sequence each, the same prompt tokens: the same text.
        assert_eq!(output_text(&answer), chat_text, "{answer}");
        let finish = chat["choices"][0]["finish_reason"].as_str().unwrap();
        let status = if finish == "length" {
            "incomplete"
        } else {
            "completed"
        };
        assert_eq!(answer["status"], status, "{answer}");
        let usage = &answer["usage"];
        assert_eq!(
            usage["input_tokens"], chat["usage"]["prompt_tokens"],
            "{answer}"
        );
        assert_eq!(usage["output_tokens"], chat["usage"]["completion_tokens"]);
        assert_eq!(usage["total_tokens"], chat["usage"]["total_tokens"]);

        let mut streamed = request.clone();
        streamed["stream"] = json!(true);
        let response = post(&gateway, "/v1/responses", &streamed, &[]).await;
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["content-type"], "text/event-stream");
        let text = response.text().await.unwrap();
        assert!(
            !text.contains("[DONE]"),
            "a Responses stream ends with its last event"
        );
        let events = events(&text);
        for (number, (_, data)) in events.iter().enumerate() {
            assert_eq!(data["sequence_number"], number, "{text}");
        }
        let names: Vec<&str> = events.iter().map(|(name, _)| name.as_str()).collect();
        assert_eq!(
            names[..4],
            [
                "response.created",
                "response.in_progress",
                "response.output_item.added",
                "response.content_part.added"
            ],
            "{text}"
        );
        let last = format!("response.{status}");
        assert_eq!(
            names[names.len() - 4..],
            [
                "response.output_text.done",
                "response.content_part.done",
                "response.output_item.done",
                last.as_str()
            ],
            "{text}"
        );
        let deltas: String = events
            .iter()
            .filter(|(name, _)| name == "response.output_text.delta")
            .map(|(_, data)| data["delta"].as_str().unwrap())
            .collect();
        assert_eq!(deltas, chat_text);
        let done = &events.last().unwrap().1["response"];
        assert_eq!(output_text(done), chat_text);
        assert_eq!(
            done["usage"]["output_tokens"],
            chat["usage"]["completion_tokens"]
        );

        // `isthmus bench --api responses` drives the same endpoint: every token counted.
        for stream in ["true", "false"] {
            let output = std::process::Command::new(tests::isthmus_binary())
                .args([
                    "bench",
                    "--api",
                    "responses",
                    "--model",
                    "smollm2",
                    "--json",
                ])
                .args(["--url", &gateway.url(""), "--api-key", API_KEY, "--cacert"])
                .arg(&tests::TestPki::shared().ca_path)
                .args(["--concurrency", "2", "--requests", "2", "--max-tokens", "6"])
                .args(["--prompt-tokens", "24", "--warmup", "0", "--stream", stream])
                .output()
                .unwrap();
            assert!(output.status.success(), "{output:?}");
            let report: Value = serde_json::from_slice(&output.stdout).unwrap();
            assert_eq!(report["errors"], 0, "{report}");
            assert_eq!(report["output_tokens"], 12, "ignore_eos: 6 each; {report}");
        }

        // What needs stored responses, or is not a Responses request, is refused by name.
        for (body, param, code) in [
            (
                json!({"model": "smollm2", "input": "Hi", "previous_response_id": "resp_1"}),
                "previous_response_id",
                "unsupported_parameter",
            ),
            (
                json!({"model": "smollm2", "input": "Hi", "tools": [{"type": "web_search"}]}),
                "tools[0].type",
                "unsupported_parameter",
            ),
            (
                json!({"model": "smollm2", "instructions": "Hi"}),
                "input",
                "invalid_value",
            ),
            // What the local model's chat path refuses is named as the request wrote it,
            // not as its chat translation did (`messages[1]`, `max_tokens`).
            (
                json!({"model": "smollm2", "instructions": "Be brief.", "input": [
                    {"role": "user", "content": [{"type": "input_image", "image_url": "https://x/cat.png"}]},
                ]}),
                "input[0].content[0].type",
                "unsupported_parameter",
            ),
            (
                json!({"model": "smollm2", "input": "Hi", "max_output_tokens": 0}),
                "max_output_tokens",
                "invalid_value",
            ),
        ] {
            let response = post(&gateway, "/v1/responses", &body, &[]).await;
            assert_eq!(response.status(), 400, "{body}");
            let error: Value = response.json().await.unwrap();
            assert_eq!(error["error"]["param"], param, "{error}");
            assert_eq!(error["error"]["code"], code, "{error}");
        }

        // The audit record names the operation.
        let answered = crate::console::outcome_record(&gateway, "r-1").await;
        assert_eq!(answered["ResultType"], "Succeeded", "{answered}");
        assert_eq!(
            answered["OperationName"],
            "Isthmus/inference/responses/action"
        );
    });
}

#[test]
fn the_policy_reads_every_part_of_a_responses_request() {
    let _serial = serial();
    let upstream = Upstream::start(options()).unwrap();
    // Stored responses, sensitive ones too: what is kept is what the client received.
    let gateway = Gateway::start(&GatewayOptions {
        extra: format!(
            "{}\n[responses]\nstore = true\nkeep_sensitive = true\n",
            crate::policy::policy_config(&upstream)
        ),
        ..GatewayOptions::default()
    });
    block_on(async {
        // A card number in a function's output: the sensitive rule keeps the request local.
        let body = json!({
            "model": "smollm2", "temperature": 0, "max_output_tokens": 4,
            "input": [
                {"role": "user", "content": "Look up my card."},
                {"type": "function_call", "call_id": "c1", "name": "lookup", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "c1",
                 "output": "card 4111 1111 1111 1111, expires 12/29"},
            ],
        });
        let response = post(&gateway, "/v1/responses", &body, &[]).await;
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["x-isthmus-route"], "local");
        assert_eq!(response.headers()["x-isthmus-rule"], "sensitive-local");
        // Explain reads the body as the path it names would: the same decision.
        let (status, explained) = crate::console::admin_json(
            &gateway,
            reqwest::Method::POST,
            "/admin/api/explain?path=/v1/responses",
            Some(&body.to_string()),
        )
        .await;
        assert_eq!(status, 200, "{explained}");
        assert_eq!(explained["rule"], "sensitive-local", "{explained}");
        assert_eq!(explained["entities"], json!(["credit_card"]));
        assert_eq!(explained["path"], "/v1/responses");
        let (status, refused) = crate::console::admin_json(
            &gateway,
            reqwest::Method::POST,
            "/admin/api/explain?path=/v1/responses",
            Some(r#"{"model": "smollm2", "input": "x", "previous_response_id": "resp_1"}"#),
        )
        .await;
        assert_eq!(status, 400, "{refused}");
        assert_eq!(refused["error"]["param"], "previous_response_id");
        let (status, refused) = crate::console::admin_json(
            &gateway,
            reqwest::Method::POST,
            "/admin/api/explain?path=/v1/models",
            Some(&body.to_string()),
        )
        .await;
        assert_eq!(status, 405, "{refused}");
        let lines = tests::scratch_dir();
        let input = lines.path().join("responses.jsonl");
        std::fs::write(&input, format!("{body}\n")).unwrap();
        let output = std::process::Command::new(tests::isthmus_binary())
            .args(["explain", "--path", "/v1/responses", "--config"])
            .arg(gateway.dir.path().join("isthmus.toml"))
            .arg("--jsonl")
            .arg(&input)
            .output()
            .unwrap();
        assert!(output.status.success(), "{output:?}");
        let line: Value = serde_json::from_slice(&output.stdout).unwrap();
        assert_eq!(line["rule"], "sensitive-local", "{line}");
        assert_eq!(line["entities"], json!(["credit_card"]));

        // Redact-then-cloud: the cloud sees placeholders, the client the values.
        let secret = "Write to jane.doe@contoso.com about the overdue invoice today.";
        for stream in [true, false] {
            upstream.clear_requests().await;
            let body = json!({"model": "smollm2", "instructions": "Be polite.", "input": secret,
                              "stream": stream, "fake_echo": true});
            let response = post(&gateway, "/v1/responses", &body, &[("x-team", "finance")]).await;
            assert_eq!(response.status(), 200);
            assert_eq!(response.headers()["x-isthmus-route"], "cloud");
            assert_eq!(response.headers()["x-isthmus-rule"], "finance-redacts");
            let answer = if stream {
                let text = response.text().await.unwrap();
                events(&text).last().unwrap().1["response"].clone()
            } else {
                response.json().await.unwrap()
            };
            assert_eq!(answer["status"], "completed", "{answer}");
            assert_eq!(output_text(&answer), secret, "{answer}");
            // Kept as the client got it, with the values restored, from the cloud path too.
            assert_eq!(answer["store"], true, "{answer}");
            let (status, kept) = read(
                &gateway,
                &format!("/v1/responses/{}", answer["id"].as_str().unwrap()),
            )
            .await;
            assert_eq!(status, 200, "{kept}");
            assert_eq!(output_text(&kept), secret, "{kept}");
            let requests = upstream.requests().await;
            let chats: Vec<&Value> = requests
                .iter()
                .filter(|request| request["path"] == "/v1/chat/completions")
                .collect();
            assert_eq!(chats.len(), 1, "{requests:?}");
            assert_eq!(
                chats[0]["last_message"],
                "Write to <EMAIL_1> about the overdue invoice today."
            );
        }
    });
}

/// Sends `body` to the stored-response endpoint `path` with `method` and `key`.
async fn stored(method: reqwest::Method, gateway: &Gateway, path: &str, key: &str) -> (u16, Value) {
    let response = tests::client()
        .request(method, gateway.url(path))
        .bearer_auth(key)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[test]
fn what_the_scan_cannot_read_is_not_kept_at_rest_unless_allowed() {
    let _serial = serial();
    let upstream = Upstream::start(options()).unwrap();
    // The store seals what it keeps: no prompt text in its files.
    let key_dir = tempfile::tempdir().unwrap();
    let key_file = key_dir.path().join("responses.key");
    std::fs::write(&key_file, "5a".repeat(32)).unwrap();
    let gateway = Gateway::start(&GatewayOptions {
        extra: format!(
            "[upstreams.aks]\nmodels = {{ \"gpt-4o\" = \"served-70b\" }}\n[[upstreams.aks.backends]]\nurl = \"{}\"\n[upstreams.aks.health]\nenabled = false\n[responses]\nstore = true\nencryption_key_file = \"{}\"\nrecord_bytes_max = 8192\n",
            upstream.base_url(),
            key_file.display()
        ),
        ..GatewayOptions::default()
    });
    let gateway = &gateway;
    block_on(async {
        let ask = |content: Value| {
            let body = json!({"model": "gpt-4o", "max_output_tokens": 8,
                "input": [{"role": "user", "content": content}]});
            async move {
                let response = post(gateway, "/v1/responses", &body, &[]).await;
                assert_eq!(response.status(), 200);
                assert_eq!(response.headers()["x-isthmus-route"], "cloud");
                let answer: Value = response.json().await.unwrap();
                let (status, _) = read(
                    gateway,
                    &format!("/v1/responses/{}", answer["id"].as_str().unwrap()),
                )
                .await;
                (answer["store"].clone(), status)
            }
        };
        // Text the scan read and found clean is kept, and read back; on disk it is sealed.
        assert_eq!(
            ask(json!("Describe the weather, marker-7203.")).await,
            (json!(true), 200)
        );
        let store = gateway.dir.path().join("state/responses-store");
        let in_files = |needle: &[u8]| {
            walk(&store).iter().any(|file| {
                std::fs::read(file)
                    .is_ok_and(|bytes| bytes.windows(needle.len()).any(|window| window == needle))
            })
        };
        assert!(tests::eventually(Duration::from_secs(10), || in_files(
            b"resp_"
        )));
        assert!(
            !in_files(b"marker-7203"),
            "the prompt is in the store's files"
        );
        // A picture (a scanned passport?) is answered but not kept: with
        // `keep_sensitive` off, the store holds only what the scan could read.
        let picture = json!([
            {"type": "input_text", "text": "Describe this picture."},
            {"type": "input_image", "image_url": "data:image/png;base64,iVBORw0KGgo="},
        ]);
        assert_eq!(ask(picture).await, (json!(false), 404));
        // A streamed answer too large to keep says so in its last event, and its audit
        // record says the same (the record is written once the keeping was tried).
        let body = json!({"model": "gpt-4o", "max_output_tokens": 8, "stream": true,
            "input": format!("Summarise: {}", "the tide turns. ".repeat(800))});
        let response = post(gateway, "/v1/responses", &body, &[]).await;
        assert_eq!(response.status(), 200);
        let events = events(&response.text().await.unwrap());
        let (name, completed) = events.last().unwrap();
        assert_eq!(name, "response.completed", "{events:?}");
        assert_eq!(completed["response"]["store"], false, "{completed}");
        let id = completed["response"]["id"].as_str().unwrap().to_owned();
        let (_, audit) = crate::console::admin_json(
            gateway,
            reqwest::Method::GET,
            "/admin/api/audit/records?category=IsthmusAudit&limit=50",
            None,
        )
        .await;
        let made = audit["records"].as_array().unwrap().iter().find(|record| {
            record["Properties"]["ResponseId"] == id.as_str() && record["ResultType"] == "Succeeded"
        });
        let made = made.unwrap_or_else(|| panic!("no record of making {id}: {audit}"));
        assert_eq!(made["Properties"]["ResponseStored"], false, "{made}");
    });
}

/// The files under `dir`, at any depth.
fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}

/// GETs a stored-response endpoint as the test key's owner.
async fn read(gateway: &Gateway, path: &str) -> (u16, Value) {
    stored(reqwest::Method::GET, gateway, path, API_KEY).await
}

/// A gateway that keeps responses, with a second API key (`OTHER_KEY`), on `dir`.
fn storing_gateway(dir: tempfile::TempDir) -> Gateway {
    use sha2::Digest as _;
    let config_path = dir.path().join("isthmus.toml");
    if !config_path.exists() {
        let other = hex::encode(sha2::Sha256::digest(OTHER_KEY.as_bytes()));
        let options = GatewayOptions {
            extra: "[responses]\nstore = true\nretention_hours = 1\n".to_owned(),
            ..GatewayOptions::default()
        };
        let text = tests::config_text(&options, dir.path()).replacen(
            "api_keys = [",
            &format!("api_keys = [{{ id = \"other\", sha256 = \"{other}\" }}, "),
            1,
        );
        std::fs::write(&config_path, text).unwrap();
    }
    Gateway::start_with_config(dir, &config_path)
}

const OTHER_KEY: &str = "isthmus-other-test-key";

#[test]
fn stored_responses_continue_conversations_for_their_owner_alone() {
    let _serial = serial();
    let mut gateway = storing_gateway(tests::scratch_dir());
    let id = block_on(async {
        let first: Value = post(
            &gateway,
            "/v1/responses",
            &json!({"model": "smollm2", "temperature": 0, "max_output_tokens": 8,
                    "instructions": "Answer briefly.", "input": "My name is Ada."}),
            &[],
        )
        .await
        .json()
        .await
        .unwrap();
        let id = first["id"].as_str().unwrap().to_owned();
        assert!(
            id.len() == "resp_".len() + 32 && id.starts_with("resp_"),
            "a random id, not the request's: {id}"
        );
        assert_eq!(first["store"], true, "{first}");
        let first_text = output_text(&first);

        // Read back as it was sent, with the input items the model read.
        let (status, body) = read(&gateway, &format!("/v1/responses/{id}")).await;
        assert_eq!((status, &body), (200, &first));
        assert_eq!(gateway.metric("isthmus_stored_responses "), Some(1.0));
        assert!(gateway.metric("isthmus_stored_responses_bytes ").unwrap() > 0.0);
        let (status, items) = read(&gateway, &format!("/v1/responses/{id}/input_items")).await;
        assert_eq!(status, 200, "{items}");
        assert_eq!(items["object"], "list");
        let data = items["data"].as_array().unwrap();
        assert_eq!(data.len(), 1, "instructions are not an input item: {items}");
        assert_eq!(data[0]["content"][0]["text"], "My name is Ada.");
        assert!(
            data[0]["id"].as_str().unwrap().starts_with("msg_"),
            "{items}"
        );

        // A continuation reads what a chat request with the whole conversation reads: the
        // same prompt tokens and, greedy, the same answer.
        let question = "What is my name?";
        let continued: Value = post(
            &gateway,
            "/v1/responses",
            &json!({"model": "smollm2", "temperature": 0, "max_output_tokens": 8,
                    "instructions": "Answer briefly.", "previous_response_id": id,
                    "input": question}),
            &[],
        )
        .await
        .json()
        .await
        .unwrap();
        assert_eq!(
            continued["previous_response_id"],
            id.as_str(),
            "{continued}"
        );
        let chat: Value = post(
            &gateway,
            "/v1/chat/completions",
            &json!({"model": "smollm2", "temperature": 0, "max_tokens": 8, "messages": [
                {"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": "My name is Ada."},
                {"role": "assistant", "content": first_text},
                {"role": "user", "content": question}]}),
            &[],
        )
        .await
        .json()
        .await
        .unwrap();
        assert_eq!(
            continued["usage"]["input_tokens"], chat["usage"]["prompt_tokens"],
            "{continued}\n{chat}"
        );
        assert_eq!(
            output_text(&continued),
            chat["choices"][0]["message"]["content"].as_str().unwrap()
        );
        let continued_id = continued["id"].as_str().unwrap();
        let (_, items) = read(
            &gateway,
            &format!("/v1/responses/{continued_id}/input_items?order=asc"),
        )
        .await;
        let roles: Vec<&str> = items["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|item| item["role"].as_str().unwrap())
            .collect();
        assert_eq!(roles, ["user", "assistant", "user"], "{items}");

        // Streamed, a kept response is readable once its stream has ended.
        let streamed = post(
            &gateway,
            "/v1/responses",
            &json!({"model": "smollm2", "temperature": 0, "max_output_tokens": 4,
                    "previous_response_id": id, "input": "Thanks.", "stream": true}),
            &[],
        )
        .await
        .text()
        .await
        .unwrap();
        let events = events(&streamed);
        let done = &events.last().unwrap().1["response"];
        assert_eq!(done["store"], true, "{streamed}");
        let (status, body) = read(
            &gateway,
            &format!("/v1/responses/{}", done["id"].as_str().unwrap()),
        )
        .await;
        assert_eq!((status, &body), (200, done));

        // Another caller: not found, neither to read, to continue nor to delete.
        for method in [reqwest::Method::GET, reqwest::Method::DELETE] {
            let (status, error) =
                stored(method, &gateway, &format!("/v1/responses/{id}"), OTHER_KEY).await;
            assert_eq!(status, 404, "{error}");
            assert_eq!(error["error"]["code"], "response_not_found");
        }
        let response = tests::client()
            .post(gateway.url("/v1/responses"))
            .bearer_auth(OTHER_KEY)
            .json(&json!({"model": "smollm2", "previous_response_id": id, "input": "Hi"}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400);
        let error: Value = response.json().await.unwrap();
        assert_eq!(
            error["error"]["code"], "previous_response_not_found",
            "{error}"
        );
        assert_eq!(error["error"]["param"], "previous_response_id");

        // A conversation with sensitive content is not kept unless the store may hold it
        // (`keep_sensitive`, off here): answered, but `"store": false`.
        let sensitive: Value = post(
            &gateway,
            "/v1/responses",
            &json!({"model": "smollm2", "max_output_tokens": 2,
                    "input": "Refund card 4111 1111 1111 1111 please."}),
            &[],
        )
        .await
        .json()
        .await
        .unwrap();
        assert_eq!(sensitive["store"], false, "{sensitive}");
        let (status, _) = read(
            &gateway,
            &format!("/v1/responses/{}", sensitive["id"].as_str().unwrap()),
        )
        .await;
        assert_eq!(status, 404);

        // `store: false` keeps nothing.
        let unkept: Value = post(
            &gateway,
            "/v1/responses",
            &json!({"model": "smollm2", "max_output_tokens": 2, "input": "Hi", "store": false}),
            &[("x-request-id", "unkept")],
        )
        .await
        .json()
        .await
        .unwrap();
        assert_eq!(unkept["store"], false);
        assert_eq!(unkept["id"], "resp_unkept");
        let (status, _) = read(&gateway, "/v1/responses/resp_unkept").await;
        assert_eq!(status, 404);
        id
    });

    // Kept across a restart on the same state directory.
    gateway.signal(libc::SIGTERM);
    assert!(
        gateway
            .wait_exit(std::time::Duration::from_secs(30))
            .is_some()
    );
    let dir = std::mem::replace(&mut gateway.dir, tests::scratch_dir());
    drop(gateway);
    let gateway = storing_gateway(dir);
    block_on(async {
        let (_, audit) = crate::console::admin_json(
            &gateway,
            reqwest::Method::GET,
            "/admin/api/audit/records?category=IsthmusAudit&limit=200",
            None,
        )
        .await;
        // Reads are audited as reads, by path.
        let path = format!("/v1/responses/{id}");
        let audited = audit["records"].as_array().unwrap().iter().any(|record| {
            record["OperationName"] == "Isthmus/inference/responses/read"
                && record["Properties"]["Path"] == path.as_str()
                && record["ResultType"] == "Succeeded"
        });
        assert!(audited, "no record of reading {path}: {audit}");
        // The answer's own record names the response and says it was kept; the continuation's
        // names what it continued.
        let records = audit["records"].as_array().unwrap();
        let made = records.iter().find(|record| {
            record["Properties"]["ResponseId"] == id.as_str() && record["ResultType"] == "Succeeded"
        });
        let made = made.unwrap_or_else(|| panic!("no record of making {id}: {audit}"));
        assert_eq!(made["Properties"]["ResponseStored"], true, "{made}");
        assert!(
            records
                .iter()
                .any(|record| record["Properties"]["PreviousResponseId"] == id.as_str()),
            "{audit}"
        );
        let (status, kept) = read(&gateway, &format!("/v1/responses/{id}")).await;
        assert_eq!(status, 200, "{kept}");
        // Deleted by its owner, it is gone, also for continuing.
        let (status, deleted) = stored(
            reqwest::Method::DELETE,
            &gateway,
            &format!("/v1/responses/{id}"),
            API_KEY,
        )
        .await;
        assert_eq!(status, 200);
        assert_eq!(
            deleted,
            json!({"id": id, "object": "response.deleted", "deleted": true})
        );
        let (status, _) = read(&gateway, &format!("/v1/responses/{id}")).await;
        assert_eq!(status, 404);
        let response = post(
            &gateway,
            "/v1/responses",
            &json!({"model": "smollm2", "previous_response_id": id, "input": "Hi"}),
            &[],
        )
        .await;
        assert_eq!(response.status(), 400);
    });
}
