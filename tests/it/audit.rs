//! The audit log under the real gateway: killed with SIGKILL under concurrent load three
//! times, every response a client received completely has its durable record, and the chain
//! verifies — on the store after each kill and on the files at the end.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

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

/// Request ids of the outcome records (not intents) in the JSONL files.
fn recorded(directory: &Path) -> BTreeSet<String> {
    let mut ids = BTreeSet::new();
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
                ids.insert(id.to_owned());
            }
        }
    }
    ids
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
            // Let the load run, then kill the gateway mid-flight.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
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
    let missing: Vec<&String> = answered.difference(&recorded).collect();
    assert!(
        missing.is_empty(),
        "{} answered requests have no record, e.g. {:?}",
        missing.len(),
        missing.iter().take(5).collect::<Vec<_>>()
    );
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
