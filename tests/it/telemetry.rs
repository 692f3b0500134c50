//! OTLP export to an in-test receiver: the gateway's span for a request joins the client's
//! trace as a child of the client's span, carries the request's facts (and no prompt text),
//! and the request counters, GenAI latency histograms and live engine gauges arrive as
//! OTLP metrics. The receiver decodes the protobuf bodies with the OTLP schema.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message as _;
use tests::{Gateway, GatewayOptions, serial};
use tokio::net::TcpListener;

use crate::block_on;

const CLIENT_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";
const PROMPT: &str = "Name a colour of the sky in one word.";

/// What the receiver got: (path, content type, body).
type Received = Arc<Mutex<Vec<(String, String, Bytes)>>>;

/// An OTLP/HTTP receiver on a free loopback port, answering 200 to every export.
async fn start_receiver() -> (SocketAddr, Received) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let received: Received = Arc::default();
    let store = received.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let store = store.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request: Request<Incoming>| {
                    let store = store.clone();
                    async move {
                        let path = request.uri().path().to_owned();
                        let content_type = request
                            .headers()
                            .get("content-type")
                            .and_then(|value| value.to_str().ok())
                            .unwrap_or_default()
                            .to_owned();
                        let body = request.into_body().collect().await?.to_bytes();
                        store.lock().unwrap().push((path, content_type, body));
                        Ok::<_, hyper::Error>(Response::new(Full::new(Bytes::new())))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (address, received)
}

fn string_attribute<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a str> {
    attributes
        .iter()
        .find(|attribute| attribute.key == key)
        .and_then(|attribute| match &attribute.value {
            Some(AnyValue {
                value: Some(any_value::Value::StringValue(text)),
            }) => Some(text.as_str()),
            _ => None,
        })
}

fn int_attribute(attributes: &[KeyValue], key: &str) -> Option<i64> {
    attributes
        .iter()
        .find(|attribute| attribute.key == key)
        .and_then(|attribute| match &attribute.value {
            Some(AnyValue {
                value: Some(any_value::Value::IntValue(value)),
            }) => Some(*value),
            _ => None,
        })
}

/// Every span the receiver got so far.
fn spans(received: &Received) -> Vec<Span> {
    received
        .lock()
        .unwrap()
        .iter()
        .filter(|(path, _, _)| path == "/v1/traces")
        .flat_map(|(_, _, body)| {
            ExportTraceServiceRequest::decode(body.clone())
                .expect("an OTLP trace export")
                .resource_spans
        })
        .flat_map(|resource| resource.scope_spans)
        .flat_map(|scope| scope.spans)
        .collect()
}

/// The names of every metric the receiver got so far.
fn metric_names(received: &Received) -> Vec<String> {
    received
        .lock()
        .unwrap()
        .iter()
        .filter(|(path, _, _)| path == "/v1/metrics")
        .flat_map(|(_, _, body)| {
            ExportMetricsServiceRequest::decode(body.clone())
                .expect("an OTLP metrics export")
                .resource_metrics
        })
        .flat_map(|resource| resource.scope_metrics)
        .flat_map(|scope| scope.metrics)
        .map(|metric| metric.name)
        .collect()
}

#[test]
fn requests_export_spans_and_metrics_over_otlp() {
    let _serial = serial();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (receiver, received) = runtime.block_on(start_receiver());
    let gateway = Gateway::start(&GatewayOptions {
        extra: format!(
            "[telemetry.otlp]\nendpoint = \"http://{receiver}\"\nmetrics_interval_ms = 200\ntimeout_ms = 2000\nservice_name = \"isthmus-test\"\n"
        ),
        ..GatewayOptions::default()
    });
    let (answered, unsampled) = block_on(async {
        let client = tests::client();
        let send = |traceparent: String| {
            client
                .post(gateway.url("/v1/chat/completions"))
                .bearer_auth(tests::API_KEY)
                .header("traceparent", traceparent)
                .json(&crate::chat_body(
                    PROMPT,
                    serde_json::json!({ "max_tokens": 4 }),
                ))
                .send()
        };
        let answered = send(format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"))
            .await
            .unwrap();
        let status = answered.status();
        let rule = answered
            .headers()
            .get("x-isthmus-rule")
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned);
        let _ = answered.bytes().await.unwrap();
        // A client that decided not to sample: the gateway keeps that decision.
        let unsampled = send(format!("00-{}-{CLIENT_SPAN}-00", "1".repeat(32)))
            .await
            .unwrap()
            .status();
        ((status, rule), unsampled)
    });
    assert_eq!(answered.0, 200);
    assert_eq!(unsampled, 200);
    let rule = answered.1.expect("x-isthmus-rule");

    let exported = tests::eventually(Duration::from_secs(20), || {
        spans(&received)
            .iter()
            .any(|span| hex::encode(&span.trace_id) == CLIENT_TRACE)
            && [
                "isthmus.requests",
                "gen_ai.server.time_to_first_token",
                "isthmus.local.kv_cells_total",
            ]
            .iter()
            .all(|name| metric_names(&received).iter().any(|metric| metric == name))
    });
    let log = std::fs::read_to_string(&gateway.log_path).unwrap_or_default();
    assert!(
        exported,
        "no span or metrics arrived; received {:?}\n{log}",
        received
            .lock()
            .unwrap()
            .iter()
            .map(|(path, kind, body)| format!("{path} {kind} {} bytes", body.len()))
            .collect::<Vec<_>>()
    );
    for (path, content_type, _) in received.lock().unwrap().iter() {
        assert_eq!(content_type, "application/x-protobuf", "{path}");
    }

    let spans = spans(&received);
    let span = spans
        .iter()
        .find(|span| hex::encode(&span.trace_id) == CLIENT_TRACE)
        .unwrap();
    assert_eq!(hex::encode(&span.parent_span_id), CLIENT_SPAN);
    assert_ne!(hex::encode(&span.span_id), CLIENT_SPAN);
    assert_eq!(span.kind, 2, "SPAN_KIND_SERVER");
    assert_eq!(span.name, "chat smollm2");
    assert!(span.end_time_unix_nano > span.start_time_unix_nano);
    assert_eq!(
        string_attribute(&span.attributes, "isthmus.route"),
        Some("local")
    );
    assert_eq!(
        string_attribute(&span.attributes, "isthmus.rule"),
        Some(rule.as_str())
    );
    assert_eq!(
        int_attribute(&span.attributes, "http.response.status_code"),
        Some(200)
    );
    assert!(int_attribute(&span.attributes, "gen_ai.usage.input_tokens").is_some_and(|n| n > 0));
    assert!(int_attribute(&span.attributes, "gen_ai.usage.output_tokens").is_some_and(|n| n > 0));
    assert!(
        spans
            .iter()
            .all(|span| hex::encode(&span.trace_id) != "1".repeat(32)),
        "an unsampled trace was exported"
    );
    // Nothing of the prompt leaves in telemetry.
    for (_, _, body) in received.lock().unwrap().iter() {
        let text = String::from_utf8_lossy(body);
        assert!(!text.contains("colour of the sky"), "prompt text exported");
    }
    // The access log names the gateway's span, the child of the client's.
    assert!(
        log.contains(&format!(
            "00-{CLIENT_TRACE}-{}-01",
            hex::encode(&span.span_id)
        )),
        "{log}"
    );
    drop(gateway);
    drop(runtime);
}
