//! The audit log under the real gateway: killed with SIGKILL under concurrent load three
//! times, every response a client received completely has its durable record, and the chain
//! verifies — on the store after each kill and on the files at the end. Prompt and completion
//! text appear only for the routes and rules `[audit.content]` names and never reach a fake
//! Logs Ingestion endpoint for local routes; the syslog copy reaches real UDP and TCP
//! collectors in this process, well formed and without local content. When the store cannot
//! write (a full disk, made without root by lowering the gateway's `RLIMIT_FSIZE`), requests
//! get 503 until the writer reopens the store by itself, and the chain still verifies.

use std::collections::BTreeSet;
use std::io::{BufRead as _, BufReader, Read as _};
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tests::{API_KEY, Gateway, GatewayOptions, Upstream, serial};

use crate::block_on;
use crate::upstream::options;

/// Concurrent clients while the gateway is killed.
const CLIENTS: usize = 8;
/// Kills in the suite; `ISTHMUS_AUDIT_KILL_ROUNDS=20` for the benchmark's twenty.
const KILL_ROUNDS_DEFAULT: usize = 3;

fn verify(path: &Path) -> (bool, String) {
    let output = Command::new(tests::isthmus_binary())
        .args(["audit", "verify"])
        .arg(path)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

/// Fails naming the requests a client got an answer to that have no outcome record.
fn assert_every_answer_recorded(answered: &BTreeSet<String>, recorded: &BTreeSet<String>) {
    let missing: Vec<&String> = answered.difference(recorded).collect();
    assert!(
        missing.is_empty(),
        "{} answered requests have no record, e.g. {:?}",
        missing.len(),
        missing.iter().take(5).collect::<Vec<_>>()
    );
}

/// Request ids of the outcome records (not intents) in the JSONL files.
fn recorded(directory: &Path) -> BTreeSet<String> {
    outcomes(directory).into_keys().collect()
}

#[test]
fn every_answered_request_survives_kill_9_and_the_chain_verifies() {
    let _serial = serial();
    let upstream = Upstream::start(options()).unwrap();
    let options = GatewayOptions {
        extra: format!(
            "[upstreams.aks]\nmodels = {{ \"gpt-4o\" = \"m\" }}\n[[upstreams.aks.backends]]\nurl = \"{}\"\n[upstreams.aks.health]\nenabled = false\n[audit]\ncheckpoint_every_records = 50\n",
            upstream.base_url()
        ),
        ..GatewayOptions::default()
    };
    let mut gateway = Gateway::start(&options);
    let config_path = gateway.dir.path().join("isthmus.toml");
    let answered: Arc<Mutex<BTreeSet<String>>> = Arc::default();
    let rounds = std::env::var("ISTHMUS_AUDIT_KILL_ROUNDS")
        .ok()
        .and_then(|rounds| rounds.parse().ok())
        .unwrap_or(KILL_ROUNDS_DEFAULT);
    for round in 0..rounds {
        block_on(async {
            let url = gateway.url("/v1/chat/completions");
            let mut clients = Vec::new();
            for client in 0..CLIENTS {
                let url = url.clone();
                let answered = Arc::clone(&answered);
                clients.push(tokio::spawn(async move {
                    let http = tests::client();
                    for request in 0.. {
                        let id = format!("r{round}-c{client}-n{request}");
                        let sent = http
                            .post(&url)
                            .bearer_auth(API_KEY)
                            .header("x-request-id", &id)
                            .json(&json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}))
                            .send()
                            .await;
                        let Ok(response) = sent else { break };
                        // Only a complete body counts as received.
                        if response.status() == 200 && response.bytes().await.is_ok() {
                            answered.lock().unwrap().insert(id);
                        } else {
                            break;
                        }
                    }
                }));
            }
            // Let the load run until a hundred more answers are in, then kill the gateway
            // mid-flight. The deadline only bounds a stuck gateway: a slow machine (fsync
            // under load) takes longer, and the count, not the time, is what is checked.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            while answered.lock().unwrap().len() < (round + 1) * 100
                && tokio::time::Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            gateway.child.kill().unwrap();
            let _ = gateway.child.wait();
            for client in clients {
                let _ = client.await;
            }
        });
        let state = gateway.dir.path().join("state");
        let (ok, report) = verify(&state.join("audit-store"));
        assert!(
            ok,
            "round {round}: the store does not verify after kill -9:\n{report}"
        );
        // Restart on the same state: a new epoch of the same chain.
        let dir = std::mem::replace(&mut gateway.dir, tests::scratch_dir());
        drop(gateway);
        gateway = Gateway::start_with_config(dir, &config_path);
    }
    // A clean stop closes the epoch; the files then hold everything.
    gateway.signal(libc::SIGTERM);
    assert!(gateway.wait_exit(Duration::from_secs(30)).is_some());
    let audit = gateway.dir.path().join("state/audit");
    let (ok, report) = verify(&audit);
    assert!(ok, "the files do not verify:\n{report}");
    assert!(
        report.contains(&format!("{} epochs", rounds + 1)),
        "{report}"
    );
    let recorded = recorded(&audit);
    let answered = answered.lock().unwrap();
    assert!(
        answered.len() >= rounds * 100,
        "only {} answered",
        answered.len()
    );
    assert_every_answer_recorded(&answered, &recorded);
}

#[test]
fn tampering_with_the_files_is_caught_with_the_first_bad_seq() {
    let _serial = serial();
    let gateway = Gateway::start(&GatewayOptions::default());
    block_on(async {
        for _ in 0..3 {
            let response = tests::client()
                .get(gateway.url("/v1/models"))
                .bearer_auth(API_KEY)
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200);
        }
    });
    let (_, status) = tests::plain_get(gateway.admin, "/admin/api/audit").unwrap();
    let status: Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["enabled"], true, "{status}");
    assert_eq!(status["healthy"], true, "{status}");
    assert!(
        status["stream_id"]
            .as_str()
            .is_some_and(|id| !id.is_empty())
    );
    let mut gateway = gateway;
    gateway.signal(libc::SIGTERM);
    assert!(gateway.wait_exit(Duration::from_secs(30)).is_some());
    let audit = gateway.dir.path().join("state/audit");
    assert!(verify(&audit).0);
    let file = std::fs::read_dir(&audit)
        .unwrap()
        .flatten()
        .map(|entry| entry.path())
        .find(|path| {
            path.extension()
                .is_some_and(|extension| extension == "jsonl")
        })
        .unwrap();
    let text = std::fs::read_to_string(&file).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    // Rewrite one outcome's status: the record no longer matches its hash.
    let index = lines
        .iter()
        .position(|line| line.contains("\"ResultSignature\":\"200\""))
        .unwrap();
    let record: Value = serde_json::from_str(lines[index]).unwrap();
    let seq = record["Seq"].as_u64().unwrap();
    let altered =
        lines[index].replace("\"ResultSignature\":\"200\"", "\"ResultSignature\":\"201\"");
    let mut tampered: Vec<String> = lines.iter().map(|line| (*line).to_owned()).collect();
    tampered[index] = altered;
    std::fs::write(&file, tampered.join("\n") + "\n").unwrap();
    let (ok, report) = verify(&audit);
    assert!(!ok);
    assert!(report.contains(&format!("seq {seq}")), "{report}");
}

/// The outcome records (not intents) in the JSONL files, by request id.
fn outcomes(directory: &Path) -> std::collections::BTreeMap<String, Value> {
    let mut records = std::collections::BTreeMap::new();
    for entry in std::fs::read_dir(directory).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !(name.starts_with("audit-") && name.ends_with(".jsonl")) {
            continue;
        }
        for line in std::fs::read_to_string(entry.path()).unwrap().lines() {
            let Ok(record) = serde_json::from_str::<Value>(line) else {
                continue;
            };
            if record["Category"] == "IsthmusAudit"
                && record["Properties"]["Phase"] != "intent"
                && let Some(id) = record["RequestId"].as_str()
            {
                records.insert(id.to_owned(), record);
            }
        }
    }
    records
}

/// A Logs Ingestion endpoint on 127.0.0.1 that takes every batch (gzip JSON arrays with the
/// test bearer token) and keeps the records.
struct FakeIngestion {
    address: SocketAddr,
    records: Arc<Mutex<Vec<Value>>>,
    _runtime: tokio::runtime::Runtime,
}

const INGESTION_TOKEN: &str = "ingestion-test-token";

impl FakeIngestion {
    fn start() -> FakeIngestion {
        use http_body_util::BodyExt as _;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let address = listener.local_addr().unwrap();
        let records: Arc<Mutex<Vec<Value>>> = Arc::default();
        let kept = Arc::clone(&records);
        runtime.spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let kept = Arc::clone(&kept);
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(
                        move |request: http::Request<hyper::body::Incoming>| {
                            let kept = Arc::clone(&kept);
                            async move {
                                let authorized = request
                                    .headers()
                                    .get("authorization")
                                    .and_then(|value| value.to_str().ok())
                                    .is_some_and(|value| {
                                        value == format!("Bearer {INGESTION_TOKEN}")
                                    });
                                let gzip = request
                                    .headers()
                                    .get("content-encoding")
                                    .is_some_and(|value| value == "gzip");
                                let body = request.into_body().collect().await?.to_bytes();
                                let mut json = Vec::new();
                                let decoded = gzip
                                    && flate2::read::GzDecoder::new(&body[..])
                                        .read_to_end(&mut json)
                                        .is_ok();
                                let batch = serde_json::from_slice::<Vec<Value>>(&json);
                                let status = match (authorized, decoded, batch) {
                                    (true, true, Ok(batch)) => {
                                        kept.lock().unwrap().extend(batch);
                                        204
                                    }
                                    (false, _, _) => 401,
                                    _ => 400,
                                };
                                Ok::<_, hyper::Error>(
                                    http::Response::builder()
                                        .status(status)
                                        .body(http_body_util::Full::new(bytes::Bytes::new()))
                                        .unwrap(),
                                )
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        FakeIngestion {
            address,
            records,
            _runtime: runtime,
        }
    }

    fn received(&self) -> Vec<Value> {
        self.records.lock().unwrap().clone()
    }
}

fn post_chat(gateway: &Gateway, id: &str, body: &Value, headers: &[(&str, &str)]) -> String {
    block_on(async {
        let mut request = tests::client()
            .post(gateway.url("/v1/chat/completions"))
            .bearer_auth(API_KEY)
            .header("x-request-id", id);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = request.json(body).send().await.unwrap();
        assert_eq!(response.status(), 200, "{id}");
        response.text().await.unwrap()
    })
}

/// The generated text of a chat answer, JSON or SSE.
fn answer_text(body: &str) -> String {
    if let Ok(answer) = serde_json::from_str::<Value>(body) {
        return answer["choices"][0]["message"]["content"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
    }
    crate::sse_content(body)
}

#[test]
fn content_is_recorded_only_where_configured_and_never_exported_for_local_routes() {
    let _serial = serial();
    let upstream = Upstream::start(options()).unwrap();
    let ingestion = FakeIngestion::start();
    let secrets = tests::scratch_dir();
    let token_file = secrets.path().join("ingestion-token");
    std::fs::write(&token_file, INGESTION_TOKEN).unwrap();
    let options = GatewayOptions {
        extra: format!(
            r#"
[upstreams.aks]
models = {{ "gpt-4o" = "m" }}
[[upstreams.aks.backends]]
url = "{upstream}"
[upstreams.aks.health]
enabled = false

# On the premises, and down: nothing listens on port 1.
[upstreams.vault]
models = {{ "vault-model" = "m" }}
on_premises = true
[[upstreams.vault.backends]]
url = "http://127.0.0.1:1"
[upstreams.vault.health]
enabled = false

[[policy.rules]]
name = "support-desk"
action = "local"
target = "smollm2"
when = {{ headers = {{ "x-team" = "support" }} }}

[audit.content]
routes = ["cloud"]
rules = ["support-desk"]
text_bytes_max = 4096

[audit.azure]
endpoint = "http://{ingestion}"
dcr_immutable_id = "dcr-0123456789abcdef0123456789abcdef"
poll_interval_ms = 50
[audit.azure.auth]
kind = "bearer"
token_file = {token_file:?}
"#,
            upstream = upstream.base_url(),
            ingestion = ingestion.address,
        ),
        ..GatewayOptions::default()
    };
    let gateway = Gateway::start(&options);
    let local = |content: &str| {
        json!({"model": "smollm2", "messages": [{"role": "user", "content": content}],
            "temperature": 0, "max_tokens": 6})
    };
    let cloud = |content: &str, stream: bool| {
        json!({"model": "gpt-4o", "messages": [{"role": "user", "content": content}],
            "fake_echo": true, "stream": stream})
    };
    // Local by the listed rule: recorded. Local by default: not. Cloud: recorded, JSON and
    // stream; a long one is cut and flagged.
    let support = post_chat(
        &gateway,
        "content-support",
        &local("support-marker-7731 say hi"),
        &[("x-team", "support")],
    );
    post_chat(
        &gateway,
        "content-plain",
        &local("plain-marker-5521 say hi"),
        &[],
    );
    let cloud_json = post_chat(
        &gateway,
        "content-cloud",
        &cloud("cloud-marker-9034", false),
        &[],
    );
    let cloud_stream = post_chat(
        &gateway,
        "content-stream",
        &cloud("stream-marker-4410 in pieces", true),
        &[],
    );
    let long = format!("long-marker {}", "x".repeat(5000));
    post_chat(&gateway, "content-long", &cloud(&long, false), &[]);
    // Bound for the on-premises pool, whose backend does not answer: the prompt never left,
    // and its record must say so, or the export would carry it off the premises.
    let mut vault = cloud("vault-marker-8812", false);
    vault["model"] = json!("vault-model");
    let unanswered = block_on(async {
        tests::client()
            .post(gateway.url("/v1/chat/completions"))
            .bearer_auth(API_KEY)
            .header("x-request-id", "content-vault")
            .json(&vault)
            .send()
            .await
            .unwrap()
            .status()
    });
    assert!(unanswered.is_server_error(), "{unanswered}");
    // A refused request's record says where the body was wrong, never what it said (the
    // client's error message quotes it).
    let refused = block_on(async {
        tests::client()
            .post(gateway.url("/v1/chat/completions"))
            .bearer_auth(API_KEY)
            .header("x-request-id", "content-refused")
            .json(&json!({"model": "smollm2", "messages": [{"role": "refusal-marker-6620", "content": "hi"}]}))
            .send()
            .await
            .unwrap()
    });
    assert_eq!(refused.status(), 400);

    // The files (the appliance's copy) hold what was configured, and nothing else. They
    // follow the store within a tenth of a second.
    let audit_dir = gateway.dir.path().join("state/audit");
    assert!(tests::eventually(Duration::from_secs(10), || {
        let written = outcomes(&audit_dir);
        written.contains_key("content-long") && written.contains_key("content-refused")
    }));
    let records = outcomes(&audit_dir);
    let properties = |id: &str| records[id]["Properties"].clone();
    let support_record = properties("content-support");
    assert_eq!(support_record["Route"], "local", "{support_record}");
    assert_eq!(support_record["Rule"], "support-desk");
    assert!(
        support_record["Prompt"]
            .as_str()
            .is_some_and(|prompt| prompt.contains("support-marker-7731")),
        "{support_record}"
    );
    assert_eq!(support_record["Completion"], answer_text(&support));
    assert_eq!(support_record["PromptTruncated"], false);
    let plain = properties("content-plain");
    assert_eq!(plain["Route"], "local");
    for member in [
        "Prompt",
        "Completion",
        "PromptTruncated",
        "CompletionTruncated",
    ] {
        assert!(plain.get(member).is_none(), "{member} in {plain}");
    }
    let vault_record = properties("content-vault");
    assert_eq!(
        (&vault_record["Route"], &vault_record["OnPremises"]),
        (&json!("cloud"), &json!(true)),
        "{vault_record}"
    );
    let cloud_record = properties("content-cloud");
    assert_eq!(cloud_record["Route"], "cloud");
    assert_eq!(cloud_record["Completion"], "cloud-marker-9034");
    assert_eq!(answer_text(&cloud_json), "cloud-marker-9034");
    let stream_record = properties("content-stream");
    assert_eq!(stream_record["Completion"], "stream-marker-4410 in pieces");
    assert_eq!(answer_text(&cloud_stream), "stream-marker-4410 in pieces");
    let long_record = properties("content-long");
    assert_eq!(long_record["PromptTruncated"], true);
    assert_eq!(long_record["CompletionTruncated"], true);
    assert_eq!(long_record["Completion"].as_str().unwrap().len(), 4096);
    assert!(long_record["Prompt"].as_str().unwrap().len() <= 4096);
    let refused_record = records["content-refused"].to_string();
    assert!(
        refused_record.contains("parameter `messages[0].role`")
            && !refused_record.contains("refusal-marker-6620"),
        "{refused_record}"
    );
    let line_bytes = serde_json::to_vec(&records["content-long"]).unwrap().len();
    assert!(line_bytes <= 32 * 1024, "{line_bytes} bytes");

    // The export: every outcome arrives; local content does not.
    let ids = [
        "content-support",
        "content-plain",
        "content-cloud",
        "content-stream",
        "content-long",
        "content-vault",
    ];
    let exported = |id: &str, received: &[Value]| {
        received
            .iter()
            .find(|record| record["RequestId"] == id && record["Properties"]["Phase"] != "intent")
            .cloned()
    };
    assert!(
        tests::eventually(Duration::from_secs(30), || {
            let received = ingestion.received();
            ids.iter().all(|id| exported(id, &received).is_some())
        }),
        "the exporter did not deliver every record: {:?}",
        ingestion.received().len()
    );
    let received = ingestion.received();
    // The client chose the request id; the correlation id that pairs the intent and outcome
    // records is the gateway's own GUID.
    let of_request = |id: &str| -> Vec<&Value> {
        received
            .iter()
            .filter(|record| record["RequestId"] == id && record["Category"] == "IsthmusAudit")
            .collect()
    };
    let pair = of_request("content-plain");
    assert_eq!(pair.len(), 2, "{pair:?}");
    let correlation = pair[0]["CorrelationId"].as_str().unwrap();
    let guid = correlation.len() == 36
        && correlation.char_indices().all(|(at, character)| {
            if [8, 13, 18, 23].contains(&at) {
                character == '-'
            } else {
                character.is_ascii_hexdigit()
            }
        });
    assert!(guid && pair[1]["CorrelationId"] == correlation, "{pair:?}");
    assert_ne!(
        correlation,
        of_request("content-cloud")[0]["CorrelationId"]
            .as_str()
            .unwrap()
    );
    let everything = serde_json::to_string(&received).unwrap();
    assert!(
        !everything.contains("support-marker-7731"),
        "local prompt exported"
    );
    assert!(!everything.contains("plain-marker-5521"));
    assert!(
        !everything.contains("vault-marker-8812"),
        "an on-premises pool's prompt exported"
    );
    let support_exported = exported("content-support", &received).unwrap();
    assert_eq!(support_exported["Properties"]["Rule"], "support-desk");
    for member in [
        "Prompt",
        "Completion",
        "PromptTruncated",
        "CompletionTruncated",
    ] {
        assert!(
            support_exported["Properties"].get(member).is_none(),
            "{member} exported: {support_exported}"
        );
    }
    let cloud_exported = exported("content-cloud", &received).unwrap();
    assert_eq!(
        cloud_exported["Properties"]["Completion"],
        "cloud-marker-9034"
    );
    // Only the store and the files carry the hashed form; the export is a copy.
    assert_eq!(
        cloud_exported["RecordHash"],
        records["content-cloud"]["RecordHash"]
    );

    // Content never reaches the gateway's own log.
    let log = gateway.log();
    for marker in [
        "support-marker-7731",
        "plain-marker-5521",
        "cloud-marker-9034",
    ] {
        assert!(!log.contains(marker), "{marker} in the log");
    }
    drop(secrets);
}

/// Parses `<PRI>1 TIMESTAMP HOST APP PROCID MSGID - MSG`; returns (PRI, APP, MSGID, MSG).
fn parse_rfc5424(message: &str) -> (u32, String, String, String) {
    let rest = message.strip_prefix('<').expect("a PRI");
    let (priority, rest) = rest.split_once(">1 ").expect("version 1");
    let fields: Vec<&str> = rest.splitn(7, ' ').collect();
    assert_eq!(fields.len(), 7, "{message}");
    let (timestamp, host, app, process, message_id, data, msg) = (
        fields[0], fields[1], fields[2], fields[3], fields[4], fields[5], fields[6],
    );
    assert!(
        timestamp.ends_with('Z') && timestamp.contains('T'),
        "{message}"
    );
    assert!(
        !host.is_empty() && process.parse::<u32>().is_ok(),
        "{message}"
    );
    assert_eq!(data, "-", "{message}");
    (
        priority.parse().unwrap(),
        app.to_owned(),
        message_id.to_owned(),
        msg.to_owned(),
    )
}

fn syslog_gateway(syslog: &str) -> Gateway {
    Gateway::start(&GatewayOptions {
        extra: format!("[audit.content]\nroutes = [\"local\"]\n\n[audit.syslog]\n{syslog}"),
        ..GatewayOptions::default()
    })
}

fn syslog_request(gateway: &Gateway, id: &str) {
    post_chat(
        gateway,
        id,
        &json!({"model": "smollm2", "messages": [{"role": "user",
            "content": "syslog-marker-6620 say hi"}], "temperature": 0, "max_tokens": 4}),
        &[],
    );
    let audit_dir = gateway.dir.path().join("state/audit");
    assert!(tests::eventually(Duration::from_secs(10), || {
        outcomes(&audit_dir).contains_key(id)
    }));
    let records = outcomes(&audit_dir);
    // The files keep the local content; syslog must not.
    assert!(
        records[id]["Properties"]["Prompt"]
            .as_str()
            .is_some_and(|prompt| prompt.contains("syslog-marker-6620"))
    );
}

#[test]
fn syslog_over_udp_gets_each_durable_record_as_rfc5424_json() {
    let _serial = serial();
    let collector = UdpSocket::bind("127.0.0.1:0").unwrap();
    collector
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let gateway = syslog_gateway(&format!(
        "address = \"{}\"\ntransport = \"udp\"\nformat = \"rfc5424\"\napp_name = \"isthmus-test\"\n",
        collector.local_addr().unwrap()
    ));
    syslog_request(&gateway, "syslog-udp");
    let mut buffer = vec![0; 65_536];
    let mut seqs = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    let outcome = loop {
        assert!(Instant::now() < deadline, "no outcome record over syslog");
        let length = collector.recv(&mut buffer).unwrap();
        let message = String::from_utf8(buffer[..length].to_vec()).unwrap();
        assert!(
            !message.contains("syslog-marker-6620"),
            "local content in syslog"
        );
        let (priority, app, message_id, msg) = parse_rfc5424(&message);
        let record: Value = serde_json::from_str(&msg).unwrap();
        assert_eq!(app, "isthmus-test");
        assert_eq!(message_id, record["Category"]);
        // local0 (16) and the record's level.
        let severity = match record["Level"].as_str().unwrap() {
            "Informational" => 6,
            "Warning" => 4,
            _ => 3,
        };
        assert_eq!(priority, 16 * 8 + severity, "{message}");
        seqs.push(record["Seq"].as_u64().unwrap());
        if record["RequestId"] == "syslog-udp" && record["Properties"]["Phase"] != "intent" {
            break record;
        }
    };
    assert_eq!(outcome["Properties"]["Route"], "local");
    assert!(outcome["Properties"].get("Prompt").is_none());
    // In order: the start record, its checkpoint, the intent, then the outcome.
    assert!(seqs.windows(2).all(|pair| pair[0] < pair[1]), "{seqs:?}");
    assert!(seqs.len() >= 4, "{seqs:?}");
    let (_, status) = tests::plain_get(gateway.admin, "/admin/api/audit").unwrap();
    let status: Value = serde_json::from_str(&status).unwrap();
    assert!(
        status["syslog"]["sent_total"].as_u64().unwrap() >= 4,
        "{status}"
    );
    assert_eq!(status["syslog"]["dropped_total"], 0, "{status}");
}

#[test]
fn syslog_over_tcp_gets_octet_counted_cef_events() {
    let _serial = serial();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let gateway = syslog_gateway(&format!(
        "address = \"{}\"\ntransport = \"tcp\"\nformat = \"cef\"\nfacility = \"audit\"\n",
        listener.local_addr().unwrap()
    ));
    let (connection, _) = listener.accept().unwrap();
    connection
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    syslog_request(&gateway, "syslog-tcp");
    let mut reader = BufReader::new(connection);
    let deadline = Instant::now() + Duration::from_secs(30);
    let outcome = loop {
        assert!(Instant::now() < deadline, "no outcome event over syslog");
        let mut length = Vec::new();
        reader.read_until(b' ', &mut length).unwrap();
        let length: usize = String::from_utf8(length).unwrap().trim().parse().unwrap();
        let mut message = vec![0; length];
        reader.read_exact(&mut message).unwrap();
        let message = String::from_utf8(message).unwrap();
        assert!(
            !message.contains("syslog-marker-6620"),
            "local content in syslog"
        );
        let (priority, app, _, msg) = parse_rfc5424(&message);
        assert_eq!(app, "isthmus");
        // The audit facility (13).
        assert_eq!(priority / 8, 13, "{message}");
        let fields: Vec<&str> = msg.splitn(8, '|').collect();
        assert_eq!(fields.len(), 8, "{msg}");
        assert_eq!(&fields[..3], ["CEF:0", "Isthmus", "Isthmus"], "{msg}");
        assert!(
            fields[6]
                .parse::<u32>()
                .is_ok_and(|severity| severity <= 10)
        );
        if msg.contains("externalId=syslog-tcp ") && !msg.contains(r#""Phase":"intent""#) {
            break msg;
        }
    };
    assert!(
        outcome.contains("|Isthmus/inference/chat/completions/action|IsthmusAudit Succeeded|3|"),
        "{outcome}"
    );
    for expected in [
        "act=local",
        "outcome=Succeeded",
        "requestMethod=POST",
        "cn1Label=Seq",
    ] {
        assert!(outcome.contains(expected), "{expected} in {outcome}");
    }
}

/// How long the writer may take to notice that the store cannot write, and to recover once it
/// can (it retries once a second).
const AUDIT_HEALTH_DEADLINE: Duration = Duration::from_secs(30);
/// How often the writer tries to reopen a failed store (`RECOVERY_INTERVAL_MS` in
/// `gateway/src/audit/store.rs`).
const STORE_RETRY_INTERVAL: Duration = Duration::from_secs(1);
/// Clients asking at once while the disk fills up.
const FILLING_CLIENTS: usize = 4;

/// A configuration without a local model (nothing to load, so the gateway starts at once)
/// whose `gpt-4o` goes to `upstream`, with `audit` appended to its `[audit]` section.
fn cloud_only_config(upstream: &Upstream, dir: &Path, audit: &str) -> String {
    let options = GatewayOptions {
        extra: format!(
            "[upstreams.aks]\nmodels = {{ \"gpt-4o\" = \"m\" }}\n[[upstreams.aks.backends]]\nurl = \"{}\"\n[upstreams.aks.health]\nenabled = false\n[audit]\n{audit}\n",
            upstream.base_url()
        ),
        ..GatewayOptions::default()
    };
    let text = tests::config_text(&options, dir);
    let (head, rest) = text.split_once("[models.smollm2]").unwrap();
    let (_, tail) = rest.split_once("[logging]").unwrap();
    format!("{head}[logging]{tail}")
}

/// Starts a cloud-only gateway whose writes past `RLIMIT_FSIZE` fail with `EFBIG` instead of
/// killing it: SIGXFSZ is ignored in the child, and an ignored disposition survives `exec`.
fn start_with_sigxfsz_ignored(upstream: &Upstream, audit: &str) -> Gateway {
    use std::os::unix::process::CommandExt as _;
    let dir = tests::scratch_dir();
    let config_path = dir.path().join("isthmus.toml");
    std::fs::write(&config_path, cloud_only_config(upstream, dir.path(), audit)).unwrap();
    let gateway = Gateway::start_with_command(dir, &config_path, |command| {
        // SAFETY: the closure runs between fork and exec and only calls signal(2), which is
        // async-signal-safe.
        #[allow(
            unsafe_code,
            reason = "pre_exec and signal(2) are the only way to start a child with SIGXFSZ ignored"
        )]
        unsafe {
            command.pre_exec(|| {
                if libc::signal(libc::SIGXFSZ, libc::SIG_IGN) == libc::SIG_ERR {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    });
    // The kernel's view: SigIgn is a hex mask with bit (signal - 1) set for each ignored one.
    let status = std::fs::read_to_string(format!("/proc/{}/status", gateway.child.id())).unwrap();
    let ignored = status
        .lines()
        .find_map(|line| line.strip_prefix("SigIgn:"))
        .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
        .unwrap();
    assert_ne!(
        ignored & (1 << (libc::SIGXFSZ - 1)),
        0,
        "SIGXFSZ is not ignored"
    );
    gateway
}

/// Sets the gateway's soft `RLIMIT_FSIZE` (`None`: unlimited), leaving the hard limit
/// unlimited so that it can be raised again without privileges.
fn set_file_size_limit(gateway: &Gateway, soft_bytes: Option<u64>) {
    let limit = libc::rlimit {
        rlim_cur: soft_bytes.unwrap_or(libc::RLIM_INFINITY),
        rlim_max: libc::RLIM_INFINITY,
    };
    let pid = i32::try_from(gateway.child.id()).unwrap();
    // SAFETY: prlimit(2) reads `limit`, which outlives the call, and writes nothing (the old
    // limit's pointer is null).
    #[allow(
        unsafe_code,
        reason = "prlimit(2) is the only way to change another process's resource limit"
    )]
    let result = unsafe { libc::prlimit(pid, libc::RLIMIT_FSIZE, &limit, std::ptr::null_mut()) };
    assert_eq!(result, 0, "prlimit: {}", std::io::Error::last_os_error());
}

/// The size of the largest file under `directory`, recursively.
fn largest_file_bytes(directory: &Path) -> u64 {
    let mut largest = 0;
    for entry in std::fs::read_dir(directory).unwrap().flatten() {
        let metadata = entry.metadata().unwrap();
        largest = largest.max(if metadata.is_dir() {
            largest_file_bytes(&entry.path())
        } else {
            metadata.len()
        });
    }
    largest
}

/// What a client got for one chat request: the status, `Retry-After`, and the body if it
/// arrived completely.
#[derive(Debug)]
struct Answer {
    status: u16,
    retry_after: Option<String>,
    body: Option<String>,
}

/// One chat request with the id `id`; `None` when the connection failed before a status
/// arrived (a response cut short because its record could not be made durable).
async fn ask(http: &reqwest::Client, url: &str, id: &str) -> Option<Answer> {
    let response = http
        .post(url)
        .bearer_auth(API_KEY)
        .header("x-request-id", id)
        .json(&json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .ok()?;
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned);
    let body = response.text().await.ok();
    Some(Answer {
        status,
        retry_after,
        body,
    })
}

/// `GET /admin/api/audit`.
fn audit_status(gateway: &Gateway) -> Value {
    let (status, body) = tests::plain_get(gateway.admin, "/admin/api/audit").unwrap();
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// The lifecycle records with `operation` in the JSONL files.
fn lifecycle_records(directory: &Path, operation: &str) -> Vec<Value> {
    let mut records = Vec::new();
    for entry in std::fs::read_dir(directory).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !(name.starts_with("audit-") && name.ends_with(".jsonl")) {
            continue;
        }
        for line in std::fs::read_to_string(entry.path()).unwrap().lines() {
            let Ok(record) = serde_json::from_str::<Value>(line) else {
                continue;
            };
            if record["Category"] == "IsthmusLifecycle" && record["OperationName"] == operation {
                records.push(record);
            }
        }
    }
    records
}

/// Asks with `id_prefix`-N until the gateway answers something other than a complete 200;
/// returns the ids answered with a complete 200 and that other answer.
async fn ask_until_refused(
    http: &reqwest::Client,
    url: &str,
    id_prefix: &str,
    deadline: Instant,
) -> (Vec<String>, Option<Answer>) {
    let mut answered = Vec::new();
    loop {
        assert!(
            Instant::now() < deadline,
            "{id_prefix}: still answered after {} requests",
            answered.len()
        );
        let id = format!("{id_prefix}-{}", answered.len());
        match ask(http, url, &id).await {
            Some(answer) if answer.status == 200 && answer.body.is_some() => answered.push(id),
            other => return (answered, other),
        }
    }
}

#[test]
fn a_full_disk_fails_closed_and_the_log_recovers_by_itself() {
    let _serial = serial();
    let upstream = Upstream::start(options()).unwrap();
    let mut gateway = start_with_sigxfsz_ignored(&upstream, "");
    let state = gateway.dir.path().join("state");
    let audit = state.join("audit");
    let store = state.join("audit-store");
    let url = gateway.url("/v1/chat/completions");
    // Every request a client received completely with 200: each must have its record.
    let mut answered = BTreeSet::new();
    block_on(async {
        let http = tests::client();
        // 1. Normal operation.
        for n in 0..20 {
            let id = format!("before-{n}");
            let answer = ask(&http, &url, &id).await.unwrap();
            assert_eq!(answer.status, 200, "{id}: {:?}", answer.body);
            assert!(answer.body.is_some(), "{id}");
            answered.insert(id);
        }
        assert_eq!(audit_status(&gateway)["healthy"], true);

        // 2. The disk is full: the kernel refuses every write at or past RLIMIT_FSIZE with
        // EFBIG (SIGXFSZ is ignored), and the limit is one byte past the largest audit file,
        // sled's log. sled does not preallocate; it appends to that log, so the next group
        // commit's flush fails: its requests are cut short, and later ones get 503.
        let limit = largest_file_bytes(&store).max(largest_file_bytes(&audit)) + 1;
        set_file_size_limit(&gateway, Some(limit));
        // Concurrent clients, so that the failing group commit holds several of their records.
        let deadline = Instant::now() + AUDIT_HEALTH_DEADLINE;
        let clients =
            (0..FILLING_CLIENTS).map(|client| {
                let (http, url) = (&http, &url);
                async move {
                    ask_until_refused(http, url, &format!("filling-c{client}"), deadline).await
                }
            });
        let mut refusals = Vec::new();
        for (ids, refusal) in futures_util::future::join_all(clients).await {
            answered.extend(ids);
            // A client whose record was refused sees its response cut short (None); the
            // next request is refused with 503.
            refusals.extend(refusal);
        }
        let refused = match refusals.into_iter().find(|answer| answer.status == 503) {
            Some(refused) => refused,
            None => ask(&http, &url, "refused").await.unwrap(),
        };
        assert_eq!(refused.status, 503, "{:?}", refused.body);
        let body: Value = serde_json::from_str(refused.body.as_deref().unwrap()).unwrap();
        assert!(
            body["error"]["message"]
                .as_str()
                .is_some_and(|message| message.contains("audit log")),
            "{body}"
        );
        assert!(body["error"]["type"].is_string(), "{body}");
        assert_eq!(refused.retry_after.as_deref(), Some("1"));
        assert_eq!(audit_status(&gateway)["healthy"], false);
        // Not ready meanwhile: a load balancer sends the traffic elsewhere.
        let (status, body) = tests::plain_get(gateway.admin, "/readyz").unwrap();
        assert_eq!(status, 503, "{body}");
        assert!(body.contains("\"audit_accepting\":false"), "{body}");
        // The writer retries once a second; while the disk stays full every retry fails and
        // every request is refused.
        let full_until = Instant::now() + STORE_RETRY_INTERVAL * 3;
        let mut n = 0;
        while Instant::now() < full_until {
            let id = format!("full-{n}");
            n += 1;
            let answer = ask(&http, &url, &id).await.unwrap();
            assert_eq!(answer.status, 503, "{id}: {:?}", answer.body);
            assert!(answer.retry_after.is_some(), "{id}");
            assert_eq!(audit_status(&gateway)["healthy"], false);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        // 3. Room again: the writer reopens the store by itself.
        set_file_size_limit(&gateway, None);
        let deadline = Instant::now() + AUDIT_HEALTH_DEADLINE;
        for n in 0.. {
            assert!(
                Instant::now() < deadline,
                "the audit log did not recover: {}",
                audit_status(&gateway)
            );
            let id = format!("recovering-{n}");
            let answer = ask(&http, &url, &id).await.unwrap();
            if answer.status == 200 {
                answered.insert(id);
                break;
            }
            assert_eq!(answer.status, 503, "{id}: {:?}", answer.body);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(audit_status(&gateway)["healthy"], true);
        assert_eq!(tests::plain_get(gateway.admin, "/readyz").unwrap().0, 200);
        for n in 0..20 {
            let id = format!("after-{n}");
            let answer = ask(&http, &url, &id).await.unwrap();
            assert_eq!(answer.status, 200, "{id}: {:?}", answer.body);
            assert!(answer.body.is_some(), "{id}");
            answered.insert(id);
        }
    });
    // A clean stop closes the epoch; then the files and the store hold the whole chain.
    gateway.signal(libc::SIGTERM);
    assert!(gateway.wait_exit(Duration::from_secs(30)).is_some());
    let recovered = lifecycle_records(&audit, "Isthmus/audit/recovered");
    assert_eq!(recovered.len(), 1, "{recovered:?}");
    for path in [&audit, &store] {
        let (ok, report) = verify(path);
        assert!(ok, "{} does not verify:\n{report}", path.display());
        assert!(report.contains("1 epoch,"), "{report}");
    }
    let recorded = recorded(&audit);
    assert_every_answer_recorded(&answered, &recorded);
}

#[test]
fn with_fail_closed_off_requests_are_answered_while_the_log_cannot_write() {
    let _serial = serial();
    let upstream = Upstream::start(options()).unwrap();
    // The limit below also stops the gateway's own log file (its redirected stderr) from
    // growing: log writes must fail quietly, not take requests down with them.
    let gateway = start_with_sigxfsz_ignored(&upstream, "fail_closed = false\n");
    let state = gateway.dir.path().join("state");
    let url = gateway.url("/v1/chat/completions");
    block_on(async {
        let http = tests::client();
        let answer = ask(&http, &url, "before").await.unwrap();
        assert_eq!(answer.status, 200, "{:?}", answer.body);
        let limit = largest_file_bytes(&state.join("audit-store"))
            .max(largest_file_bytes(&state.join("audit")))
            + 1;
        set_file_size_limit(&gateway, Some(limit));
        // The deployment chose availability: while records cannot be made durable, every
        // request is still answered in full (and the log says what it missed).
        let deadline = Instant::now() + AUDIT_HEALTH_DEADLINE;
        let mut n = 0;
        while audit_status(&gateway)["healthy"] == true {
            assert!(Instant::now() < deadline, "the store never failed");
            let id = format!("filling-{n}");
            n += 1;
            let answer = ask(&http, &url, &id).await.unwrap();
            assert_eq!(answer.status, 200, "{id}: {:?}", answer.body);
            assert!(answer.body.is_some(), "{id}: cut short");
        }
        for n in 0..10 {
            let id = format!("unhealthy-{n}");
            let answer = ask(&http, &url, &id).await.unwrap();
            assert_eq!(answer.status, 200, "{id}: {:?}", answer.body);
            assert!(answer.body.is_some(), "{id}: cut short");
        }
        assert_eq!(audit_status(&gateway)["healthy"], false);
        set_file_size_limit(&gateway, None);
    });
    let log = std::fs::read_to_string(&gateway.log_path).unwrap_or_default();
    assert!(
        log.contains("answering anyway (fail_closed = false)"),
        "{log}"
    );
}

#[test]
fn the_report_shows_where_sensitive_requests_went_from_the_verified_files() {
    let _serial = serial();
    let (v1, v2) = (
        crate::console::upstream("v1"),
        crate::console::upstream("v2"),
    );
    let mut gateway = crate::console::gateway(&v1, &v2);
    block_on(async {
        // Among them a card number answered locally and one refused for the cloud.
        crate::console::traffic(&gateway).await;
    });
    gateway.signal(libc::SIGTERM);
    assert!(gateway.wait_exit(Duration::from_secs(30)).is_some());
    let audit = gateway.dir.path().join("state/audit");
    let report = |json: bool| {
        let mut command = Command::new(tests::isthmus_binary());
        command.args(["audit", "report"]).arg(&audit);
        if json {
            command.arg("--json");
        }
        let output = command.output().unwrap();
        assert!(output.status.success(), "{output:?}");
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let text = report(false);
    for line in [
        "requests: 8 (",
        "sensitive requests: 2 (credit_card 2)",
        "  kept local 1, redacted to the cloud 0, unredacted to on-premises pools 0, refused 1",
        "  left the premises unredacted: 0",
        "firewall: 1 requests blocked",
        "  rule 990100: Blocked 1",
    ] {
        assert!(text.contains(line), "`{line}` missing from:\n{text}");
    }
    assert!(text.contains(": verified: "), "{text}");
    let json: Value = serde_json::from_str(&report(true)).unwrap();
    let routes = &json["report"]["by_route"];
    assert_eq!(routes["local"]["requests"], 4, "{json:#}");
    assert_eq!(routes["cloud"]["requests"], 2, "{json:#}");
    assert_eq!(routes["rejected"]["requests"], 2, "{json:#}");
    assert!(routes["local"]["ttft_p50_ms"].is_u64(), "{json:#}");
    assert_eq!(json["report"]["unfinished_requests"], 0);
    // A record altered after the fact: no report at all.
    let file = std::fs::read_dir(&audit)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .find(|path| {
            path.extension()
                .is_some_and(|extension| extension == "jsonl")
        })
        .unwrap();
    let altered = std::fs::read_to_string(&file).unwrap().replacen(
        "\"Route\":\"rejected\"",
        "\"Route\":\"local\"",
        1,
    );
    std::fs::write(&file, altered).unwrap();
    let output = Command::new(tests::isthmus_binary())
        .args(["audit", "report"])
        .arg(&audit)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&output.stdout).contains("no report: the trail does not verify"),
        "{output:?}"
    );
}
