//! Tests of the exporter: the pure core directly, the configuration through `compile`, and
//! the whole exporter against a real HTTP server on 127.0.0.1 that plays the Logs Ingestion
//! API (checking gzip, batch size, bearer token and columns of every request) and an Entra
//! token endpoint that hands out that token for client credentials.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use expect_test::{Expect, expect};
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{Map, Value, json};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

use super::{
    BATCH_BYTES_MAX, BATCH_RECORDS_MAX, Backoff, Batch, Batcher, ExportConfig, ExportError,
    ExportOptions, ExportSource, ExportStatus, Exporter, MONITOR_SCOPE, MemorySource, Prepared,
    RawExport, compile, prepare, retry_after, retry_delay, strip_content,
};

const DCR: &str = "dcr-0123456789abcdef0123456789abcdef";
const STREAM: &str = "Custom-IsthmusAudit_CL";
const TENANT: &str = "contoso.onmicrosoft.com";
const CLIENT_ID: &str = "isthmus-exporter";
const CLIENT_SECRET: &str = "exporter-secret-0123456789";
const SECRET_ENV: &str = "ISTHMUS_EXPORT_SECRET";
const TOKEN: &str = "monitor-token-7f3a";
const STREAM_ID: &str = "edge-1-stream";

// ---------------------------------------------------------------------------------------------
// A small HTTP/1.1 server on 127.0.0.1
// ---------------------------------------------------------------------------------------------

/// An answer, sent after `delay`.
struct Reply {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: String,
    delay: Duration,
}

impl Reply {
    fn status(status: u16) -> Reply {
        Reply {
            status,
            headers: Vec::new(),
            body: String::new(),
            delay: Duration::ZERO,
        }
    }

    fn json(status: u16, body: Value) -> Reply {
        Reply {
            headers: vec![("content-type", "application/json".to_owned())],
            body: body.to_string(),
            ..Reply::status(status)
        }
    }
}

type Handler = Arc<dyn Fn(Request<Bytes>) -> Reply + Send + Sync>;

/// Serves `listener` until the task is aborted, which closes the listener and every
/// connection (the connections live in the task's `JoinSet`).
async fn serve(listener: TcpListener, handler: Handler) {
    let mut connections = JoinSet::new();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        while connections.try_join_next().is_some() {}
        let handler = handler.clone();
        connections.spawn(async move {
            let service = service_fn(move |request: Request<Incoming>| {
                let handler = handler.clone();
                async move {
                    let (parts, body) = request.into_parts();
                    let body = body.collect().await?.to_bytes();
                    let reply = handler(Request::from_parts(parts, body));
                    if !reply.delay.is_zero() {
                        tokio::time::sleep(reply.delay).await;
                    }
                    let mut response = Response::builder().status(reply.status);
                    for (name, value) in reply.headers {
                        response = response.header(name, value);
                    }
                    Ok::<_, hyper::Error>(
                        response.body(Full::new(Bytes::from(reply.body))).unwrap(),
                    )
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn decode_form(body: &[u8]) -> BTreeMap<String, String> {
    let encoded = std::str::from_utf8(body).unwrap();
    let url = reqwest::Url::parse(&format!("http://decode/?{encoded}")).unwrap();
    url.query_pairs()
        .map(|(key, value)| (key.into_owned(), value.into_owned()))
        .collect()
}

/// An Entra authority: client credentials for the exporter get [`TOKEN`] for the monitor
/// scope, anything else `invalid_client`.
struct FakeAuthority {
    address: SocketAddr,
    requests: Arc<Mutex<usize>>,
    _server: JoinHandle<()>,
}

impl FakeAuthority {
    async fn start() -> FakeAuthority {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let requests = Arc::new(Mutex::new(0));
        let count = requests.clone();
        let handler: Handler = Arc::new(move |request| {
            *count.lock().unwrap() += 1;
            let form = decode_form(request.body());
            let expected = [
                ("grant_type", "client_credentials"),
                ("client_id", CLIENT_ID),
                ("client_secret", CLIENT_SECRET),
                ("scope", MONITOR_SCOPE),
            ];
            let good = request.method() == http::Method::POST
                && request.uri().path() == format!("/{TENANT}/oauth2/v2.0/token")
                && expected
                    .iter()
                    .all(|(key, value)| form.get(*key).map(String::as_str) == Some(*value));
            if good {
                Reply::json(
                    200,
                    json!({"token_type": "Bearer", "access_token": TOKEN, "expires_in": 3600}),
                )
            } else {
                Reply::json(400, json!({"error": "invalid_client"}))
            }
        });
        FakeAuthority {
            address,
            requests,
            _server: tokio::spawn(serve(listener, handler)),
        }
    }

    fn url(&self) -> String {
        format!("http://{}/", self.address)
    }

    fn requests(&self) -> usize {
        *self.requests.lock().unwrap()
    }
}

/// What the fake Logs Ingestion endpoint does with the next valid request.
#[derive(Debug, Clone)]
enum Mode {
    /// Takes the batch: 204.
    Accept,
    /// Refuses every request with `status` and a `Retry-After` header.
    Refuse {
        status: u16,
        retry_after: &'static str,
    },
    /// Refuses the next request so, then accepts.
    RefuseOnce {
        status: u16,
        retry_after: &'static str,
    },
    /// Takes the next batch but answers after `delay` (past the client's timeout), then
    /// accepts normally.
    AcceptSlowlyOnce { delay: Duration },
}

/// One batch the fake took.
#[derive(Debug, Clone)]
struct Taken {
    seqs: Vec<u64>,
    uncompressed_bytes: usize,
    records: Vec<Value>,
}

#[derive(Debug)]
struct IngestionState {
    mode: Mode,
    /// (StreamId, Seq) of every record taken, in the order taken.
    accepted: Vec<(String, u64)>,
    batches: Vec<Taken>,
    /// Every request that reached the handler: when, and the status answered.
    requests: Vec<(Instant, u16)>,
    /// Protocol violations found; a test fails if there are any.
    problems: Vec<String>,
}

/// The Logs Ingestion API of one DCR and stream, on 127.0.0.1, that can be stopped (the port
/// refuses connections) and started again on the same port.
struct FakeIngestion {
    address: SocketAddr,
    state: Arc<Mutex<IngestionState>>,
    server: Option<JoinHandle<()>>,
}

impl FakeIngestion {
    async fn start() -> FakeIngestion {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(IngestionState {
            mode: Mode::Accept,
            accepted: Vec::new(),
            batches: Vec::new(),
            requests: Vec::new(),
            problems: Vec::new(),
        }));
        let mut fake = FakeIngestion {
            address,
            state,
            server: None,
        };
        fake.serve(listener);
        fake
    }

    fn serve(&mut self, listener: TcpListener) {
        let state = self.state.clone();
        let handler: Handler = Arc::new(move |request| ingest(&state, &request));
        self.server = Some(tokio::spawn(serve(listener, handler)));
    }

    /// Closes the port and every connection.
    async fn stop(&mut self) {
        if let Some(server) = self.server.take() {
            server.abort();
            let _ = server.await;
        }
    }

    /// Listens again on the same port.
    async fn restart(&mut self) {
        let listener = TcpListener::bind(self.address).await.unwrap();
        self.serve(listener);
    }

    fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    fn set_mode(&self, mode: Mode) {
        self.state.lock().unwrap().mode = mode;
    }

    fn accepted(&self) -> Vec<(String, u64)> {
        self.state.lock().unwrap().accepted.clone()
    }

    fn batches(&self) -> Vec<Taken> {
        self.state.lock().unwrap().batches.clone()
    }

    fn requests(&self) -> Vec<(Instant, u16)> {
        self.state.lock().unwrap().requests.clone()
    }

    fn assert_no_problems(&self) {
        let problems = self.state.lock().unwrap().problems.clone();
        assert!(problems.is_empty(), "protocol violations: {problems:#?}");
    }
}

/// Checks a request as the Logs Ingestion API would, then does what the mode says.
fn ingest(state: &Mutex<IngestionState>, request: &Request<Bytes>) -> Reply {
    let checked = check_request(request);
    let mut state = state.lock().unwrap();
    let now = Instant::now();
    let records = match checked {
        Ok(records) => records,
        Err(problem) => {
            state.problems.push(problem.clone());
            state.requests.push((now, 400));
            return Reply::json(
                400,
                json!({"error": {"code": "InvalidRequest", "message": problem}}),
            );
        }
    };
    let (accept, delay, refusal) = match state.mode.clone() {
        Mode::Accept => (true, Duration::ZERO, None),
        Mode::Refuse {
            status,
            retry_after,
        } => (false, Duration::ZERO, Some((status, retry_after))),
        Mode::RefuseOnce {
            status,
            retry_after,
        } => {
            state.mode = Mode::Accept;
            (false, Duration::ZERO, Some((status, retry_after)))
        }
        Mode::AcceptSlowlyOnce { delay } => {
            state.mode = Mode::Accept;
            (true, delay, None)
        }
    };
    if let Some((status, retry_after)) = refusal {
        state.requests.push((now, status));
        let mut reply = Reply::json(
            status,
            json!({"error": {"code": "Throttled", "message": "slow down"}}),
        );
        reply.headers.push(("retry-after", retry_after.to_owned()));
        reply
            .headers
            .push(("x-ms-error-code", "Throttled".to_owned()));
        return reply;
    }
    debug_assert!(accept);
    state.requests.push((now, 204));
    let seqs: Vec<u64> = records
        .iter()
        .map(|record| record["Seq"].as_u64().unwrap())
        .collect();
    for record in &records {
        let stream_id = record["StreamId"].as_str().unwrap().to_owned();
        state
            .accepted
            .push((stream_id, record["Seq"].as_u64().unwrap()));
    }
    let uncompressed_bytes = serde_json::to_vec(&records).unwrap().len();
    state.batches.push(Taken {
        seqs,
        uncompressed_bytes,
        records,
    });
    Reply {
        delay,
        ..Reply::status(204)
    }
}

/// The records of a valid request, or what is wrong with it.
fn check_request(request: &Request<Bytes>) -> Result<Vec<Value>, String> {
    let header = |name: &str| {
        request
            .headers()
            .get(name)
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    if request.method() != http::Method::POST {
        return Err(format!("method {}", request.method()));
    }
    let expected_path = format!("/dataCollectionRules/{DCR}/streams/{STREAM}");
    if request.uri().path() != expected_path {
        return Err(format!("path {}", request.uri().path()));
    }
    if request.uri().query() != Some("api-version=2023-01-01") {
        return Err(format!("query {:?}", request.uri().query()));
    }
    if header("authorization") != format!("Bearer {TOKEN}") {
        return Err(format!("authorization {:?}", header("authorization")));
    }
    if header("content-encoding") != "gzip" {
        return Err(format!("content-encoding {:?}", header("content-encoding")));
    }
    if header("content-type") != "application/json" {
        return Err(format!("content-type {:?}", header("content-type")));
    }
    let mut body = Vec::new();
    flate2::read::GzDecoder::new(request.body().as_ref())
        .take(BATCH_BYTES_MAX as u64 + 1)
        .read_to_end(&mut body)
        .map_err(|error| format!("body is not gzip: {error}"))?;
    if body.len() > BATCH_BYTES_MAX {
        return Err(format!("uncompressed body over {BATCH_BYTES_MAX} bytes"));
    }
    let records: Vec<Value> = serde_json::from_slice(&body)
        .map_err(|error| format!("body is not a JSON array: {error}"))?;
    if records.is_empty() {
        return Err("empty array".to_owned());
    }
    for record in &records {
        let seq = record.get("Seq").and_then(Value::as_u64);
        let Some(seq) = seq else {
            return Err(format!("record without Seq: {record}"));
        };
        for column in [
            "TimeGenerated",
            "StreamId",
            "Category",
            "OperationName",
            "RecordHash",
        ] {
            if !record.get(column).is_some_and(Value::is_string) {
                return Err(format!("record {seq} lacks {column}"));
            }
        }
        let properties = record.get("Properties").and_then(Value::as_object);
        let Some(properties) = properties else {
            return Err(format!("record {seq} lacks Properties"));
        };
        let route = properties.get("Route").and_then(Value::as_str);
        let content = properties.contains_key("Prompt") || properties.contains_key("Completion");
        if content && route != Some("cloud") {
            return Err(format!(
                "record {seq} carries content text of route {route:?}"
            ));
        }
    }
    Ok(records)
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// A record of the gateway's shape (every DESIGN.md column but the two the source sets),
/// for `route`, with prompt and completion text and `padding` extra bytes.
fn record(route: &str, padding: usize) -> Map<String, Value> {
    let value = json!({
        "TimeGenerated": "2026-05-01T12:34:56.789Z",
        "SchemaVersion": "1.0",
        "Category": "IsthmusAudit",
        "OperationName": "Isthmus/inference/chat/completions/action",
        "ResultType": "Succeeded",
        "ResultSignature": "200",
        "ResultDescription": "OK",
        "DurationMs": 42,
        "Level": "Informational",
        "CallerIpAddress": "10.0.0.7",
        "CorrelationId": "7b1e4f3c-1d2a-4c5b-9e8f-0a1b2c3d4e5f",
        "RequestId": "req-1",
        "TraceParent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "GatewayResourceId": "/subscriptions/0000/resourceGroups/edge/providers/Microsoft.HybridCompute/machines/edge-1",
        "GatewayInstance": "edge-1",
        "Location": "plant-7",
        "Identity": {"AuthType": "api_key", "KeyId": "team-a"},
        "Properties": {
            "Route": route,
            "Rule": "default",
            "Target": "smollm2",
            "Prompt": "what is the patient's diagnosis?",
            "Completion": "the diagnosis is ...",
            "Padding": "x".repeat(padding),
        },
        "OcsfClassUid": 6003,
        "OcsfActivityId": 1,
        "Epoch": 1,
        "PrevHash": "0".repeat(64),
        "RecordHash": "f".repeat(64),
    });
    let Value::Object(map) = value else {
        unreachable!()
    };
    map
}

fn environment(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> + use<> {
    let map: HashMap<String, String> = pairs
        .iter()
        .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
        .collect();
    move |name| map.get(name).cloned()
}

fn raw(text: &str) -> RawExport {
    toml::from_str(text).unwrap()
}

/// `[audit.azure]` for the fakes: client credentials, default scope and stream.
fn config_text(ingestion: &FakeIngestion, authority: &FakeAuthority, timeout_ms: u64) -> String {
    format!(
        r#"
        endpoint = "{}"
        dcr_immutable_id = "{DCR}"
        request_timeout_ms = {timeout_ms}
        # Long: a pass starts because the test wakes the exporter, not by the clock.
        poll_interval_ms = 600000

        [auth]
        kind = "client_credentials"
        tenant_id = "{TENANT}"
        client_id = "{CLIENT_ID}"
        client_secret_env = "{SECRET_ENV}"
        authority_host = "{}"
        "#,
        ingestion.url(),
        authority.url()
    )
}

fn config(ingestion: &FakeIngestion, authority: &FakeAuthority, timeout_ms: u64) -> ExportConfig {
    compile(
        raw(&config_text(ingestion, authority, timeout_ms)),
        "audit.azure",
        &environment(&[(SECRET_ENV, CLIENT_SECRET)]),
    )
    .unwrap()
}

/// Short waits after failures without `Retry-After`, and no jitter.
fn test_options() -> ExportOptions {
    ExportOptions {
        backoff: Backoff {
            initial: Duration::from_millis(20),
            max: Duration::from_millis(100),
        },
        jitter: false,
    }
}

/// A running exporter and the means to stop it.
struct Running {
    waker: super::ExportWaker,
    status: watch::Receiver<ExportStatus>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Running {
    fn start(config: ExportConfig, source: Arc<MemorySource>) -> Running {
        let exporter = Exporter::with_options(config, source, test_options()).unwrap();
        let waker = exporter.waker();
        let status = exporter.status();
        let (stop, shutdown) = watch::channel(false);
        let task = tokio::spawn(exporter.run(shutdown));
        Running {
            waker,
            status,
            stop,
            task,
        }
    }

    fn status(&self) -> ExportStatus {
        self.status.borrow().clone()
    }

    /// An orderly stop.
    async fn shut_down(self) {
        self.stop.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(5), self.task)
            .await
            .unwrap()
            .unwrap();
    }

    /// The process dies: the task is dropped wherever it was.
    async fn crash(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

/// Polls `condition` until it holds, failing the test after a deadline.
async fn wait_for(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn append(source: &MemorySource, count: usize, padding: usize) {
    for _ in 0..count {
        source.append(record("cloud", padding));
    }
}

/// (StreamId, Seq) for `seqs`.
fn pairs(seqs: std::ops::RangeInclusive<u64>) -> Vec<(String, u64)> {
    seqs.map(|seq| (STREAM_ID.to_owned(), seq)).collect()
}

// ---------------------------------------------------------------------------------------------
// The exporter against the fakes
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn many_records_go_in_full_batches_in_order_within_the_size_limit() {
    let authority = FakeAuthority::start().await;
    let ingestion = FakeIngestion::start().await;
    let source = Arc::new(MemorySource::new(STREAM_ID));
    // About 1.9 KB each: 2,500 records are about 4.7 MB, so at least four batches, and three
    // reads from the source (1,000 at a time) whose records share batches.
    append(&source, 2_500, 1_000);
    let running = Running::start(config(&ingestion, &authority, 5_000), source.clone());
    running.waker.wake();
    wait_for("every record", || source.exported_up_to().unwrap() == 2_500).await;

    ingestion.assert_no_problems();
    assert_eq!(ingestion.accepted(), pairs(1..=2_500));
    let batches = ingestion.batches();
    assert!(batches.len() >= 4, "{} batches", batches.len());
    let mut next = 1;
    for (index, batch) in batches.iter().enumerate() {
        assert!(batch.uncompressed_bytes <= BATCH_BYTES_MAX);
        assert_eq!(
            batch.seqs.first(),
            Some(&next),
            "batch {index} starts where the last ended"
        );
        assert!(batch.seqs.windows(2).all(|pair| pair[1] == pair[0] + 1));
        next = batch.seqs.last().unwrap() + 1;
        // Every batch but the last is full: the next record would not have fitted.
        if index + 1 < batches.len() {
            assert!(
                batch.uncompressed_bytes > BATCH_BYTES_MAX - 4_000,
                "batch {index} holds only {} bytes",
                batch.uncompressed_bytes
            );
        }
    }
    assert_eq!(source.exported_up_to().unwrap(), 2_500);
    wait_for("the status", || running.status().exported_up_to == 2_500).await;
    let status = running.status();
    assert_eq!(status.records_total, 2_500);
    assert_eq!(status.batches_total, batches.len() as u64);
    assert_eq!(status.consecutive_failures, 0);
    // One token, cached for every batch.
    assert_eq!(authority.requests(), 1);
    running.shut_down().await;
}

#[tokio::test]
async fn content_text_leaves_only_with_records_of_the_cloud_route() {
    let authority = FakeAuthority::start().await;
    let ingestion = FakeIngestion::start().await;
    let source = Arc::new(MemorySource::new(STREAM_ID));
    for route in ["local", "cloud", "rejected"] {
        source.append(record(route, 0));
    }
    let mut no_route = record("", 0);
    no_route["Properties"]
        .as_object_mut()
        .unwrap()
        .remove("Route");
    source.append(no_route);
    let running = Running::start(config(&ingestion, &authority, 5_000), source.clone());
    running.waker.wake();
    wait_for("every record", || source.exported_up_to().unwrap() == 4).await;

    ingestion.assert_no_problems();
    let exported: Vec<Value> = ingestion
        .batches()
        .into_iter()
        .flat_map(|batch| batch.records)
        .collect();
    let content: Vec<(Option<&str>, bool, bool)> = exported
        .iter()
        .map(|record| {
            let properties = record["Properties"].as_object().unwrap();
            // Everything else is kept.
            assert_eq!(properties["Rule"], "default");
            (
                properties.get("Route").and_then(Value::as_str),
                properties.contains_key("Prompt"),
                properties.contains_key("Completion"),
            )
        })
        .collect();
    assert_eq!(
        content,
        [
            (Some("local"), false, false),
            (Some("cloud"), true, true),
            (Some("rejected"), false, false),
            (None, false, false),
        ]
    );
    // The source keeps the text.
    assert!(
        source
            .records()
            .iter()
            .all(|record| record["Properties"].get("Prompt").is_some())
    );
    running.shut_down().await;
}

#[tokio::test]
async fn an_outage_queues_records_and_export_resumes_without_gaps_or_duplicates() {
    let authority = FakeAuthority::start().await;
    let mut ingestion = FakeIngestion::start().await;
    let source = Arc::new(MemorySource::new(STREAM_ID));
    append(&source, 40, 100);
    let running = Running::start(config(&ingestion, &authority, 5_000), source.clone());
    running.waker.wake();
    wait_for("the first records", || {
        source.exported_up_to().unwrap() == 40
    })
    .await;

    // The service is overloaded: 503 with Retry-After.
    ingestion.set_mode(Mode::Refuse {
        status: 503,
        retry_after: "1",
    });
    append(&source, 20, 100);
    running.waker.wake();
    wait_for("a 503", || {
        ingestion
            .requests()
            .iter()
            .any(|(_, status)| *status == 503)
    })
    .await;
    // Then the link goes down entirely, while more records arrive.
    ingestion.stop().await;
    append(&source, 20, 100);
    running.waker.wake();
    wait_for("a failed connection", || {
        let status = running.status();
        status.consecutive_failures >= 2
            && status
                .last_error
                .is_some_and(|error| error.contains("request to"))
    })
    .await;
    assert_eq!(source.exported_up_to().unwrap(), 40, "nothing acknowledged");
    assert_eq!(ingestion.accepted(), pairs(1..=40));

    // The link and the service come back.
    ingestion.set_mode(Mode::Accept);
    ingestion.restart().await;
    wait_for("the queued records", || {
        source.exported_up_to().unwrap() == 80
    })
    .await;
    ingestion.assert_no_problems();
    assert_eq!(ingestion.accepted(), pairs(1..=80), "no gap, no duplicate");
    assert_eq!(source.exported_up_to().unwrap(), 80);
    wait_for("the failures to clear", || {
        let status = running.status();
        status.consecutive_failures == 0 && status.last_error.is_none()
    })
    .await;
    running.shut_down().await;
}

#[tokio::test]
async fn retry_after_of_429_and_503_is_honoured() {
    for status in [429, 503] {
        let authority = FakeAuthority::start().await;
        let ingestion = FakeIngestion::start().await;
        ingestion.set_mode(Mode::RefuseOnce {
            status,
            retry_after: "1",
        });
        let source = Arc::new(MemorySource::new(STREAM_ID));
        append(&source, 10, 10);
        let running = Running::start(config(&ingestion, &authority, 5_000), source.clone());
        running.waker.wake();
        wait_for("the records", || source.exported_up_to().unwrap() == 10).await;

        ingestion.assert_no_problems();
        let requests = ingestion.requests();
        assert_eq!(
            requests
                .iter()
                .map(|(_, status)| *status)
                .collect::<Vec<_>>(),
            [status, 204]
        );
        let waited = requests[1].0 - requests[0].0;
        // The back-off alone would have been 20 ms.
        assert!(
            waited >= Duration::from_secs(1) && waited < Duration::from_secs(5),
            "{status}: retried after {waited:?}"
        );
        assert_eq!(ingestion.accepted(), pairs(1..=10));
        running.shut_down().await;
    }
}

#[tokio::test]
async fn a_token_the_endpoint_refuses_is_fetched_anew() {
    let authority = FakeAuthority::start().await;
    let ingestion = FakeIngestion::start().await;
    // The endpoint refuses the first batch's token (an identity that lost its role a
    // moment ago): the next try gets a new token rather than the cached one again.
    ingestion.set_mode(Mode::RefuseOnce {
        status: 403,
        retry_after: "0",
    });
    let source = Arc::new(MemorySource::new(STREAM_ID));
    append(&source, 3, 10);
    let running = Running::start(config(&ingestion, &authority, 5_000), source.clone());
    running.waker.wake();
    wait_for("the records", || source.exported_up_to().unwrap() == 3).await;
    assert_eq!(authority.requests(), 2, "the refused token was sent again");
    assert_eq!(ingestion.accepted(), pairs(1..=3));
    running.shut_down().await;
}

#[tokio::test]
async fn a_restart_resumes_from_the_marker_without_resending_acknowledged_records() {
    let authority = FakeAuthority::start().await;
    let mut ingestion = FakeIngestion::start().await;
    let source = Arc::new(MemorySource::new(STREAM_ID));
    append(&source, 30, 100);
    let first = Running::start(config(&ingestion, &authority, 5_000), source.clone());
    first.waker.wake();
    wait_for("the first records", || {
        source.exported_up_to().unwrap() == 30
    })
    .await;

    // Records arrive while the link is down; the gateway dies with them unexported.
    ingestion.stop().await;
    append(&source, 15, 100);
    first.waker.wake();
    wait_for("a failed attempt", || {
        first.status().consecutive_failures >= 1
    })
    .await;
    first.crash().await;
    assert_eq!(source.exported_up_to().unwrap(), 30);

    // A new exporter over the same (durable) source.
    ingestion.restart().await;
    let second = Running::start(config(&ingestion, &authority, 5_000), source.clone());
    second.waker.wake();
    wait_for("the queued records", || {
        source.exported_up_to().unwrap() == 45
    })
    .await;
    ingestion.assert_no_problems();
    assert_eq!(ingestion.accepted(), pairs(1..=45));
    assert_eq!(ingestion.batches().last().unwrap().seqs.first(), Some(&31));
    assert_eq!(source.exported_up_to().unwrap(), 45);

    second.shut_down().await;

    // Nothing new: another start's pass sends nothing.
    let requests = ingestion.requests().len();
    let third = Exporter::with_options(
        config(&ingestion, &authority, 5_000),
        source.clone(),
        test_options(),
    )
    .unwrap();
    assert_eq!(third.export_pending().await, Ok(45));
    assert_eq!(ingestion.requests().len(), requests);
}

#[tokio::test]
async fn a_timeout_after_the_service_took_a_batch_sends_it_again_identifiably() {
    let authority = FakeAuthority::start().await;
    let ingestion = FakeIngestion::start().await;
    ingestion.set_mode(Mode::AcceptSlowlyOnce {
        delay: Duration::from_millis(1_000),
    });
    let source = Arc::new(MemorySource::new(STREAM_ID));
    append(&source, 12, 10);
    let running = Running::start(config(&ingestion, &authority, 200), source.clone());
    running.waker.wake();
    wait_for("the records", || source.exported_up_to().unwrap() == 12).await;

    ingestion.assert_no_problems();
    // At least once: the ambiguous batch came twice, and (StreamId, Seq) tells the copies.
    let accepted = ingestion.accepted();
    assert_eq!(accepted.len(), 24);
    let mut unique = accepted.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique, pairs(1..=12));
    assert_eq!(&accepted[..12], &accepted[12..]);
    assert_eq!(source.exported_up_to().unwrap(), 12);
    running.shut_down().await;
}

#[tokio::test]
async fn a_refused_token_is_retried_and_nothing_is_sent_without_one() {
    let authority = FakeAuthority::start().await;
    let ingestion = FakeIngestion::start().await;
    let source = Arc::new(MemorySource::new(STREAM_ID));
    append(&source, 3, 10);
    let config = compile(
        raw(&config_text(&ingestion, &authority, 5_000)),
        "audit.azure",
        &environment(&[(SECRET_ENV, "a-wrong-secret")]),
    )
    .unwrap();
    let running = Running::start(config, source.clone());
    running.waker.wake();
    wait_for("a refused token", || {
        running.status().consecutive_failures >= 1
    })
    .await;
    let error = running.status().last_error.unwrap();
    assert!(error.contains("invalid_client"), "{error}");
    assert!(!error.contains("a-wrong-secret"), "{error}");
    assert!(ingestion.requests().is_empty());
    assert_eq!(source.exported_up_to().unwrap(), 0);
    running.shut_down().await;
}

#[tokio::test]
async fn records_before_one_that_cannot_go_still_go_and_the_pass_stops_there() {
    let authority = FakeAuthority::start().await;
    let ingestion = FakeIngestion::start().await;
    let source = Arc::new(MemorySource::new(STREAM_ID));
    append(&source, 2, 10);
    append(&source, 1, 70_000);
    append(&source, 2, 10);
    let mut config = config(&ingestion, &authority, 5_000);
    config.batch_bytes_max = 65_536;
    let exporter = Exporter::with_options(config, source.clone(), test_options()).unwrap();
    let error = exporter.export_pending().await.unwrap_err();
    assert!(
        matches!(
            error,
            ExportError::RecordTooLarge {
                seq: 3,
                bytes_max: 65_536,
                ..
            }
        ),
        "{error}"
    );
    ingestion.assert_no_problems();
    assert_eq!(ingestion.accepted(), pairs(1..=2));
    assert_eq!(source.exported_up_to().unwrap(), 2);
}

#[tokio::test]
async fn the_exporter_stops_when_its_shutdown_sender_goes() {
    let authority = FakeAuthority::start().await;
    let ingestion = FakeIngestion::start().await;
    let source = Arc::new(MemorySource::new(STREAM_ID));
    let running = Running::start(config(&ingestion, &authority, 5_000), source);
    drop(running.stop);
    tokio::time::timeout(Duration::from_secs(5), running.task)
        .await
        .unwrap()
        .unwrap();
}

// ---------------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------------

/// Compiles `text` as `audit.azure` and shows the errors, one a line.
fn check_errors(text: &str, expect: Expect) {
    let env = environment(&[(SECRET_ENV, CLIENT_SECRET)]);
    let errors = match toml::from_str::<RawExport>(text) {
        Ok(raw) => match compile(raw, "audit.azure", &env) {
            Ok(config) => vec![format!("ok: {}", config.ingestion_url())],
            Err(errors) => errors,
        },
        Err(error) => vec![format!("parse: {}", error.message())],
    };
    expect.assert_eq(&(errors.join("\n") + "\n"));
}

const BEARER_AUTH: &str = r#"
    [auth]
    kind = "bearer"
    token_env = "ISTHMUS_EXPORT_SECRET"
"#;

#[test]
fn a_minimal_configuration_gets_the_defaults() {
    let config = compile(
        raw(&format!(
            "endpoint = \"https://isthmus-dce.westeurope-1.ingest.monitor.azure.com\"\n\
             dcr_immutable_id = \"{DCR}\"\n{BEARER_AUTH}"
        )),
        "audit.azure",
        &environment(&[(SECRET_ENV, CLIENT_SECRET)]),
    )
    .unwrap();
    expect![[r#"https://isthmus-dce.westeurope-1.ingest.monitor.azure.com/dataCollectionRules/dcr-0123456789abcdef0123456789abcdef/streams/Custom-IsthmusAudit_CL?api-version=2023-01-01"#]]
    .assert_eq(config.ingestion_url().as_str());
    assert_eq!(config.batch_bytes_max, 1_000_000);
    assert_eq!(config.request_timeout, Duration::from_secs(30));
    assert_eq!(config.poll_interval, Duration::from_secs(5));
    // Secrets stay out of Debug.
    let debug = format!("{config:?}");
    assert!(!debug.contains(CLIENT_SECRET), "{debug}");
}

#[test]
fn every_configuration_error_is_reported_with_its_key() {
    check_errors(
        r#"
        endpoint = "http://ingest.example.com"
        dcr_immutable_id = "0123456789abcdef"
        stream_name = "IsthmusAudit_CL"
        batch_bytes_max = 2000000
        request_timeout_ms = 0
        poll_interval_ms = 1
        [auth]
        kind = "api_key"
        key_env = "ISTHMUS_EXPORT_SECRET"
        "#,
        expect![[r#"
            audit.azure.endpoint: must be https://... (plain http only to loopback hosts): http://ingest.example.com
            audit.azure.dcr_immutable_id: must be `dcr-` and 32 hexadecimal digits: 0123456789abcdef
            audit.azure.stream_name: must be `Custom-` or `Microsoft-` and letters, digits, '_' or '-': IsthmusAudit_CL
            audit.azure.batch_bytes_max: must be between 65536 and 1000000: 2000000
            audit.azure.request_timeout_ms: must be between 100 and 300000: 0
            audit.azure.poll_interval_ms: must be between 10 and 3600000: 1
            audit.azure.auth.kind: the Logs Ingestion API takes an Entra bearer token: use arc_managed_identity, workload_identity, client_credentials or bearer
        "#]],
    );
    check_errors(
        "",
        expect![[r#"
            audit.azure.endpoint: missing (the data collection endpoint's logs ingestion URL)
            audit.azure.dcr_immutable_id: missing
            audit.azure.auth: missing (kind = "arc_managed_identity", "workload_identity", "client_credentials" or "bearer")
        "#]],
    );
    check_errors(
        &format!(
            "endpoint = \"https://dce.example.com/path?x=1\"\ndcr_immutable_id = \"{DCR}\"\n\
             ca_file = \"/nonexistent/ca.pem\"\n[auth]\nkind = \"client_credentials\"\n\
             tenant_id = \"{TENANT}\"\nclient_id = \"{CLIENT_ID}\"\n"
        ),
        expect![[r#"
            audit.azure.endpoint: must be the endpoint alone, with no path or query: https://dce.example.com/path?x=1
            audit.azure.ca_file: cannot read /nonexistent/ca.pem: No such file or directory (os error 2)
            audit.azure.auth: set exactly one of client_secret_file or client_secret_env
        "#]],
    );
    check_errors(
        &format!(
            "endpoint = \"https://dce.example.com\"\ndcr_immutable_id = \"{DCR}\"\nbatch_bytes = 1\n"
        ),
        expect![[r#"
            parse: unknown field `batch_bytes`, expected one of `endpoint`, `dcr_immutable_id`, `stream_name`, `batch_bytes_max`, `request_timeout_ms`, `poll_interval_ms`, `ca_file`, `auth`
        "#]],
    );
    check_errors(
        &format!(
            "endpoint = \"http://[::1]:8443/\"\ndcr_immutable_id = \"{DCR}\"\n\
             stream_name = \"Custom-Other_CL\"\nbatch_bytes_max = 65536\n{BEARER_AUTH}"
        ),
        expect![[r#"
            ok: http://[::1]:8443/dataCollectionRules/dcr-0123456789abcdef0123456789abcdef/streams/Custom-Other_CL?api-version=2023-01-01
        "#]],
    );
}

/// The `[audit.azure]` example of deploy/azure/README.md parses and compiles (with the Arc
/// agent's tokens directory, which this machine lacks, moved to a temporary one).
#[test]
fn the_readme_example_compiles() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/azure/README.md");
    let readme = std::fs::read_to_string(path).unwrap();
    let block = readme
        .split("```toml\n")
        .skip(1)
        .filter_map(|rest| rest.split("```").next())
        .find(|block| block.contains("[audit.azure]"))
        .expect("a toml block with [audit.azure]");
    let document: toml::Table = toml::from_str(block).unwrap();
    let mut raw: RawExport = document["audit"]["azure"].clone().try_into().unwrap();
    let tokens = tempfile::tempdir().unwrap();
    match &mut raw.auth {
        Some(crate::identity::RawUpstreamAuth::ArcManagedIdentity(arc)) => {
            assert_eq!(arc.scope, None, "the scope is the default");
            arc.tokens_dir = Some(tokens.path().to_owned());
        }
        other => panic!("the README should use arc_managed_identity: {other:?}"),
    }
    let config = compile(raw, "audit.azure", &environment(&[])).unwrap();
    assert_eq!(config.stream_name, "Custom-IsthmusAudit_CL");
    assert_eq!(config.auth.kind(), "arc_managed_identity");
    let debug = format!("{:?}", config.auth);
    assert!(
        debug.contains("resource: \"https://monitor.azure.com\""),
        "{debug}"
    );
}

// ---------------------------------------------------------------------------------------------
// The pure core
// ---------------------------------------------------------------------------------------------

fn prepared(seq: u64, bytes: usize) -> Prepared {
    // `{"Seq":N,"P":"xxx"}` padded to exactly `bytes`.
    let skeleton = format!("{{\"Seq\":{seq},\"P\":\"\"}}").len();
    let json = format!(
        "{{\"Seq\":{seq},\"P\":\"{}\"}}",
        "x".repeat(bytes - skeleton)
    );
    assert_eq!(json.len(), bytes);
    Prepared {
        seq,
        json: json.into_bytes(),
    }
}

fn batch_sizes(bytes_max: usize, records: &[usize]) -> Vec<(u64, u64, usize)> {
    let mut batcher = Batcher::new(bytes_max);
    let mut batches: Vec<Batch> = Vec::new();
    for (index, &bytes) in records.iter().enumerate() {
        batches.extend(batcher.push(prepared(index as u64 + 1, bytes)).unwrap());
    }
    batches.extend(batcher.finish());
    batches
        .into_iter()
        .map(|batch| {
            let parsed: Vec<Value> = serde_json::from_slice(&batch.body).unwrap();
            assert_eq!(parsed.len(), batch.records);
            assert!(batch.body.len() <= bytes_max);
            (batch.first_seq, batch.last_seq, batch.body.len())
        })
        .collect()
}

#[test]
fn batches_fill_up_to_the_byte_limit_exactly() {
    // `[a]` is 2 + 100 bytes; `[a,b]` 2 + 100 + 1 + 100.
    assert_eq!(
        batch_sizes(203, &[100, 100, 100]),
        [(1, 2, 203), (3, 3, 102)]
    );
    assert_eq!(
        batch_sizes(202, &[100, 100, 100]),
        [(1, 1, 102), (2, 2, 102), (3, 3, 102)]
    );
    assert_eq!(batch_sizes(102, &[100]), [(1, 1, 102)]);
    assert_eq!(batch_sizes(1000, &[]), []);
    let mut batcher = Batcher::new(101);
    assert_eq!(
        batcher.push(prepared(7, 100)),
        Err(ExportError::RecordTooLarge {
            seq: 7,
            bytes: 100,
            bytes_max: 101
        })
    );
}

#[test]
fn batches_hold_at_most_the_record_limit() {
    let sizes = vec![20; BATCH_RECORDS_MAX + 1];
    let batches = batch_sizes(BATCH_BYTES_MAX, &sizes);
    assert_eq!(batches.len(), 2);
    assert_eq!(batches[0].1, BATCH_RECORDS_MAX as u64);
    assert_eq!(batches[1].0, BATCH_RECORDS_MAX as u64 + 1);
}

#[test]
fn records_must_be_objects_with_a_following_seq() {
    let check = |record: Value, after: u64| match prepare(record, after) {
        Ok(prepared) => format!(
            "ok {} {}",
            prepared.seq,
            String::from_utf8(prepared.json).unwrap()
        ),
        Err(error) => error.to_string(),
    };
    let local = json!({"Seq": 5, "Properties": {"Route": "local", "Prompt": "p", "Rule": "r"}});
    expect![[r#"ok 5 {"Properties":{"Route":"local","Rule":"r"},"Seq":5}"#]]
        .assert_eq(&check(local, 4));
    expect![[r#"audit record after Seq 4 is not exportable: not a JSON object"#]]
        .assert_eq(&check(json!([1]), 4));
    expect![[r#"audit record after Seq 4 is not exportable: no unsigned integer Seq"#]]
        .assert_eq(&check(json!({"Seq": "5"}), 4));
    expect![[r#"audit record after Seq 4 is not exportable: Seq 4 does not follow 4"#]]
        .assert_eq(&check(json!({"Seq": 4}), 4));
}

#[test]
fn content_is_stripped_unless_the_route_is_cloud() {
    let strip = |properties: Value| {
        let mut record = json!({"Seq": 1, "Properties": properties});
        let removed = strip_content(&mut record);
        format!("{removed} {}", record["Properties"])
    };
    expect![[r#"true {"Route":"local","Rule":"r"}"#]].assert_eq(&strip(
        json!({"Route": "local", "Prompt": "p", "Completion": "c", "Rule": "r"}),
    ));
    expect![[r#"false {"Completion":"c","Prompt":"p","Route":"cloud"}"#]].assert_eq(&strip(
        json!({"Route": "cloud", "Prompt": "p", "Completion": "c"}),
    ));
    expect![[r#"true {"Route":"rejected"}"#]]
        .assert_eq(&strip(json!({"Route": "rejected", "Completion": "c"})));
    expect![[r#"true {}"#]].assert_eq(&strip(json!({"Prompt": "p"})));
    expect![[r#"true {"Route":"Cloud"}"#]]
        .assert_eq(&strip(json!({"Route": "Cloud", "Prompt": "p"})));
    expect![[r#"false {"Route":"local"}"#]].assert_eq(&strip(json!({"Route": "local"})));
    let mut no_properties = json!({"Seq": 1});
    assert!(!strip_content(&mut no_properties));
}

fn status_error(retry_after: Option<Duration>) -> ExportError {
    ExportError::Status {
        endpoint: "http://x/".to_owned(),
        status: 429,
        code: None,
        message: None,
        retry_after,
    }
}

#[test]
fn retry_delays_follow_retry_after_else_back_off() {
    let backoff = Backoff {
        initial: Duration::from_secs(1),
        max: Duration::from_secs(60),
    };
    let timeout = ExportError::Timeout {
        endpoint: "http://x/".to_owned(),
        timeout_ms: 1,
    };
    let delays: Vec<u64> = (1..=8)
        .map(|failures| retry_delay(&timeout, failures, backoff, 0.0).as_secs())
        .collect();
    assert_eq!(delays, [1, 2, 4, 8, 16, 32, 60, 60]);
    assert_eq!(
        retry_delay(&timeout, u32::MAX, backoff, 0.0),
        Duration::from_secs(60)
    );
    // Jitter adds up to a quarter.
    assert_eq!(
        retry_delay(&timeout, 3, backoff, 0.5),
        Duration::from_millis(4_500)
    );
    assert!(retry_delay(&timeout, 7, backoff, 0.999) < Duration::from_secs(75));
    // Retry-After wins over the back-off, within bounds.
    let wait = |retry_after| retry_delay(&status_error(Some(retry_after)), 5, backoff, 0.9);
    assert_eq!(wait(Duration::from_secs(7)), Duration::from_secs(7));
    assert_eq!(wait(Duration::ZERO), Duration::from_secs(1));
    assert_eq!(wait(Duration::from_secs(86_400)), Duration::from_secs(600));
    assert_eq!(
        retry_delay(&status_error(None), 2, backoff, 0.0),
        Duration::from_secs(2)
    );
}

#[test]
fn retry_after_is_read_from_429_and_503_only() {
    let headers = |pairs: &[(&'static str, &str)]| {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, value.parse().unwrap());
        }
        map
    };
    let too_many = StatusCode::TOO_MANY_REQUESTS;
    let unavailable = StatusCode::SERVICE_UNAVAILABLE;
    assert_eq!(
        retry_after(too_many, &headers(&[("retry-after", "3")])),
        Some(Duration::from_secs(3))
    );
    assert_eq!(
        retry_after(unavailable, &headers(&[("retry-after", " 10 ")])),
        Some(Duration::from_secs(10))
    );
    assert_eq!(
        retry_after(
            too_many,
            &headers(&[("retry-after", "3"), ("retry-after-ms", "250")])
        ),
        Some(Duration::from_millis(250))
    );
    assert_eq!(
        retry_after(too_many, &headers(&[("x-ms-retry-after-ms", "40")])),
        Some(Duration::from_millis(40))
    );
    assert_eq!(
        retry_after(
            too_many,
            &headers(&[("retry-after", "Wed, 21 Oct 2015 07:28:00 GMT")])
        ),
        None
    );
    assert_eq!(
        retry_after(
            StatusCode::INTERNAL_SERVER_ERROR,
            &headers(&[("retry-after", "3")])
        ),
        None
    );
    assert_eq!(retry_after(too_many, &headers(&[])), None);
}

#[test]
fn the_memory_source_reads_after_a_seq_and_keeps_its_marker() {
    let source = MemorySource::new("s");
    for _ in 0..5 {
        source.append(Map::new());
    }
    let seqs = |after, max| -> Vec<u64> {
        source
            .read_after(after, max)
            .unwrap()
            .iter()
            .map(|record| record["Seq"].as_u64().unwrap())
            .collect()
    };
    assert_eq!(seqs(0, 10), [1, 2, 3, 4, 5]);
    assert_eq!(seqs(2, 2), [3, 4]);
    assert_eq!(seqs(5, 10), Vec::<u64>::new());
    assert_eq!(seqs(u64::MAX, 10), Vec::<u64>::new());
    source.mark_exported(3).unwrap();
    source.mark_exported(2).unwrap();
    assert_eq!(source.exported_up_to().unwrap(), 3);
    assert_eq!(source.records()[0]["StreamId"], "s");
}

#[test]
fn a_rotated_secret_or_another_ca_bundle_changes_the_identity_not_the_debug_text() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    let compiled = |secret_text: &str| {
        std::fs::write(&secret, secret_text).unwrap();
        compile(
            raw(&format!(
                "endpoint = \"https://dce.example.com\"\ndcr_immutable_id = \"{DCR}\"\n\
                 [auth]\nkind = \"client_credentials\"\ntenant_id = \"{TENANT}\"\n\
                 client_id = \"{CLIENT_ID}\"\nclient_secret_file = \"{}\"\n",
                secret.display()
            )),
            "audit.azure",
            &environment(&[]),
        )
        .unwrap()
    };
    let (before, after) = (
        compiled(CLIENT_SECRET),
        compiled("rotated-secret-9876543210"),
    );
    assert_eq!(format!("{before:?}"), format!("{after:?}"));
    assert_ne!(before.identity(), after.identity());
    assert_eq!(before.identity(), compiled(CLIENT_SECRET).identity());
    assert!(!before.identity().contains(CLIENT_SECRET));
}
