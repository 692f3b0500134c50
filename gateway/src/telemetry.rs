//! W3C trace context and OTLP export.
//!
//! Every request gets a trace context: the client's `traceparent` when it is well formed
//! (the gateway's span becomes its child), else a new sampled trace. The gateway's own span
//! id is what cloud backends receive as their parent and what audit records carry.
//!
//! With `[telemetry.otlp]`, each finished request becomes one OpenTelemetry span of kind
//! server (exported in batches from a background thread), and the gateway's metrics are
//! pushed periodically: the request counters and latency histograms as they are recorded,
//! and the live gauges (local queue, sequences, KV cells, cloud backends, GPUs) read when
//! the reader collects. Export runs on the SDK's own threads with its own HTTP client,
//! never on the request path; a collector that is down costs dropped telemetry, never a
//! request. Span attributes carry the same bounded facts as the access log: never prompt or
//! completion text, keys or tenant names.

use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use opentelemetry::metrics::{Counter, Histogram, Meter, MeterProvider as _};
use opentelemetry::trace::{
    Span as _, SpanContext, SpanId, SpanKind, Status, TraceContextExt as _, TraceFlags, TraceId,
    TraceState, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::{WithExportConfig as _, WithHttpConfig as _};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider, Temporality};
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};

use crate::config::OtlpSettings;
use crate::state::AppState;

/// The trace context of one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: [u8; 16],
    /// The client's span, when the client sent a `traceparent`.
    pub parent_span_id: Option<[u8; 8]>,
    /// The gateway's span for this request.
    pub span_id: [u8; 8],
    /// W3C trace flags; bit 0 is "sampled".
    pub flags: u8,
}

impl TraceContext {
    /// Adopts the client's `traceparent` when it is well formed, else starts a new sampled
    /// trace. Either way the gateway's span id is new.
    pub fn from_header(traceparent: Option<&str>) -> Self {
        use rand::RngCore as _;
        let mut random = [0u8; 24];
        rand::rng().fill_bytes(&mut random);
        let mut span_id = [0u8; 8];
        span_id.copy_from_slice(&random[16..]);
        span_id[0] |= 1;
        match traceparent.and_then(parse_traceparent) {
            Some((trace_id, parent, flags)) => TraceContext {
                trace_id,
                parent_span_id: Some(parent),
                span_id,
                flags,
            },
            None => {
                let mut trace_id = [0u8; 16];
                trace_id.copy_from_slice(&random[..16]);
                trace_id[0] |= 1;
                TraceContext {
                    trace_id,
                    parent_span_id: None,
                    span_id,
                    flags: 1,
                }
            }
        }
    }

    /// The `traceparent` naming the gateway's span: what backends get and audit records carry.
    pub fn traceparent(&self) -> String {
        format!(
            "00-{}-{}-{:02x}",
            hex::encode(self.trace_id),
            hex::encode(self.span_id),
            self.flags
        )
    }

    pub fn sampled(&self) -> bool {
        self.flags & 1 == 1
    }
}

/// Trace id, parent span id and flags of a `traceparent` as W3C Trace Context reads one:
/// lowercase hex only, non-zero ids, version `ff` invalid; version `00` exactly its four
/// fields, a later version its first four with anything after a further `-` ignored (so a
/// client on a newer version keeps its trace). Of the flags only `sampled` is kept: the
/// other bits mean nothing in version `00`, which is what the gateway passes on.
pub fn parse_traceparent(value: &str) -> Option<([u8; 16], [u8; 8], u8)> {
    let value = value.trim();
    let lower_hex = |text: &str, length: usize| {
        text.len() == length
            && text
                .bytes()
                .all(|byte| matches!(byte, b'0'..=b'9' | b'a'..=b'f'))
    };
    let (head, rest) = value.split_at_checked(55)?;
    let version = head.get(..2)?;
    if !lower_hex(version, 2) || version == "ff" {
        return None;
    }
    match (version, rest) {
        (_, "") => {}
        ("00", _) => return None,
        (_, rest) if rest.starts_with('-') => {}
        _ => return None,
    }
    let mut parts = head.split('-');
    let (_, trace, span, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if !lower_hex(trace, 32) || !lower_hex(span, 16) || !lower_hex(flags, 2) {
        return None;
    }
    let mut trace_id = [0u8; 16];
    let mut span_id = [0u8; 8];
    let mut flag = [0u8; 1];
    hex::decode_to_slice(trace, &mut trace_id).ok()?;
    hex::decode_to_slice(span, &mut span_id).ok()?;
    hex::decode_to_slice(flags, &mut flag).ok()?;
    if trace_id == [0; 16] || span_id == [0; 8] {
        return None;
    }
    Some((trace_id, span_id, flag[0] & SAMPLED))
}

/// The one flag of version `00`.
const SAMPLED: u8 = 0x01;

/// The GenAI operation name of an API path, for span names (`http` for anything else).
pub fn operation(path: &str) -> &'static str {
    let path = path.trim_end_matches('/');
    if path.ends_with("/chat/completions") {
        "chat"
    } else if path.ends_with("/completions") {
        "text_completion"
    } else if path.ends_with("/embeddings") {
        "embeddings"
    } else if path.ends_with("/models") || path.contains("/models/") {
        "models"
    } else {
        "http"
    }
}

/// What one finished request contributes to its span.
#[derive(Debug, Clone, Copy)]
pub struct SpanRecord<'a> {
    pub trace: TraceContext,
    pub started: SystemTime,
    pub duration: Duration,
    pub method: &'a str,
    /// The operation (`chat`, `text_completion`, `embeddings`, ...) or the path's family.
    pub operation: &'a str,
    pub status: u16,
    pub route: &'static str,
    pub rule: &'a str,
    pub request_id: &'a str,
    pub target: Option<&'a str>,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub time_to_first_token: Option<Duration>,
    pub attempts: u32,
    pub degraded: Option<&'static str>,
    pub error: Option<&'a str>,
}

/// The OTLP pipelines.
pub struct Telemetry {
    tracer_provider: Option<SdkTracerProvider>,
    tracer: Option<SdkTracer>,
    meter_provider: Option<SdkMeterProvider>,
    instruments: Option<Instruments>,
    /// Keeps the live-gauge callbacks' handles for the provider's lifetime.
    observers: Mutex<Vec<Box<dyn std::any::Any + Send + Sync>>>,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Telemetry")
            .field("traces", &self.tracer.is_some())
            .field("metrics", &self.meter_provider.is_some())
            .finish_non_exhaustive()
    }
}

struct Instruments {
    requests: Counter<u64>,
    tokens: Counter<u64>,
    request_duration: Histogram<f64>,
    time_to_first_token: Histogram<f64>,
    time_per_output_token: Histogram<f64>,
    generation_duration: Histogram<f64>,
}

/// Latency histogram bounds in seconds, the same as `/metrics`.
const REQUEST_BOUNDS_S: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];
const TOKEN_BOUNDS_S: &[f64] = &[
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0,
];

impl Telemetry {
    /// Starts the exporters `settings` asks for. `instance` names this gateway
    /// (`service.instance.id`).
    pub fn start(settings: &OtlpSettings, instance: &str) -> anyhow::Result<Self> {
        let resource = Resource::builder()
            .with_service_name(settings.service_name.clone())
            .with_attributes([
                KeyValue::new("service.instance.id", instance.to_owned()),
                KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
            ])
            .build();
        let headers: std::collections::HashMap<String, String> =
            settings.headers.iter().cloned().collect();
        let (tracer_provider, tracer) = if settings.traces {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                .with_endpoint(settings.signal_url("traces"))
                .with_timeout(settings.timeout)
                .with_headers(headers.clone())
                .with_http_client(http_client(settings)?)
                .build()
                .map_err(|error| anyhow::anyhow!("telemetry.otlp: trace exporter: {error}"))?;
            let provider = SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                .with_resource(resource.clone())
                .build();
            let tracer = provider.tracer("isthmus");
            (Some(provider), Some(tracer))
        } else {
            (None, None)
        };
        let (meter_provider, instruments) = if settings.metrics {
            let exporter = opentelemetry_otlp::MetricExporter::builder()
                .with_http()
                .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                .with_endpoint(settings.signal_url("metrics"))
                .with_timeout(settings.timeout)
                .with_headers(headers)
                .with_http_client(http_client(settings)?)
                .with_temporality(Temporality::Cumulative)
                .build()
                .map_err(|error| anyhow::anyhow!("telemetry.otlp: metric exporter: {error}"))?;
            let reader = PeriodicReader::builder(exporter)
                .with_interval(settings.metrics_interval)
                .build();
            let provider = SdkMeterProvider::builder()
                .with_reader(reader)
                .with_resource(resource)
                .build();
            let instruments = Instruments::new(&provider.meter("isthmus"));
            (Some(provider), Some(instruments))
        } else {
            (None, None)
        };
        tracing::info!(
            endpoint = %settings.endpoint,
            traces = settings.traces,
            metrics = settings.metrics,
            "OTLP export on"
        );
        Ok(Telemetry {
            tracer_provider,
            tracer,
            meter_provider,
            instruments,
            observers: Mutex::new(Vec::new()),
        })
    }

    /// Registers the live gauges, read from the gateway's state at each collection.
    pub fn observe(&self, state: Weak<AppState>) {
        let Some(provider) = &self.meter_provider else {
            return;
        };
        let meter = provider.meter("isthmus");
        let mut handles: Vec<Box<dyn std::any::Any + Send + Sync>> = Vec::new();
        type Pick = fn(&crate::metrics::ModelGauges) -> u64;
        // Each model's series, labelled with its configured name.
        let per_model = |pick: Pick, state: Weak<AppState>| {
            move |observer: &dyn opentelemetry::metrics::AsyncInstrument<u64>| {
                let Some(state) = state.upgrade() else { return };
                for gauges in state.model_gauges() {
                    observer.observe(
                        pick(&gauges),
                        &[KeyValue::new("gen_ai.request.model", gauges.model.clone())],
                    );
                }
            }
        };
        let model_gauges: [(&str, &str, Pick); 4] = [
            (
                "isthmus.local.queue_depth",
                "Requests waiting for a sequence.",
                |gauges| gauges.queue_depth,
            ),
            (
                "isthmus.local.active_sequences",
                "Sequences decoding now.",
                |gauges| gauges.active_sequences,
            ),
            (
                "isthmus.local.kv_cells_used",
                "KV cache cells in use.",
                |gauges| gauges.kv_cells_used,
            ),
            (
                "isthmus.local.kv_cells_total",
                "KV cache cells in all.",
                |gauges| gauges.kv_cells_total,
            ),
        ];
        for (name, description, pick) in model_gauges {
            handles.push(Box::new(
                meter
                    .u64_observable_gauge(name)
                    .with_description(description)
                    .with_callback(per_model(pick, state.clone()))
                    .build(),
            ));
        }
        let model_counters: [(&str, &str, Pick); 3] = [
            (
                "isthmus.local.prefix_hit_tokens",
                "Prompt tokens served from the prefix cache.",
                |gauges| gauges.prefix_hit_tokens,
            ),
            (
                "isthmus.local.prompt_tokens",
                "Prompt tokens of local requests.",
                |gauges| gauges.prompt_tokens,
            ),
            (
                "isthmus.local.decode_tokens",
                "Tokens generated locally.",
                |gauges| gauges.decode_tokens,
            ),
        ];
        for (name, description, pick) in model_counters {
            handles.push(Box::new(
                meter
                    .u64_observable_counter(name)
                    .with_description(description)
                    .with_callback(per_model(pick, state.clone()))
                    .build(),
            ));
        }
        let backends = state.clone();
        handles.push(Box::new(
            meter
                .u64_observable_gauge("isthmus.upstream.backend.up")
                .with_description(
                    "1 when a cloud backend takes traffic (probe healthy, circuit not open).",
                )
                .with_callback(move |observer| {
                    let Some(state) = backends.upgrade() else {
                        return;
                    };
                    for backend in state.routing().pools.status() {
                        observer.observe(
                            u64::from(backend.takes_traffic()),
                            &[
                                KeyValue::new("pool", backend.pool.clone()),
                                KeyValue::new("backend", backend.backend.clone()),
                            ],
                        );
                    }
                })
                .build(),
        ));
        let gpus = state.clone();
        handles.push(Box::new(
            meter
                .f64_observable_gauge("hw.gpu.utilization")
                .with_unit("1")
                .with_description("Share of time a GPU kernel ran (NVML).")
                .with_callback(move |observer| {
                    let Some(state) = gpus.upgrade() else { return };
                    for gpu in state.gpu_samples() {
                        observer.observe(
                            f64::from(gpu.utilization_percent) / 100.0,
                            &[KeyValue::new("gpu", i64::from(gpu.index))],
                        );
                    }
                })
                .build(),
        ));
        let gpu_memory = state;
        handles.push(Box::new(
            meter
                .u64_observable_gauge("hw.gpu.memory.usage")
                .with_unit("By")
                .with_description("GPU memory in use (NVML).")
                .with_callback(move |observer| {
                    let Some(state) = gpu_memory.upgrade() else {
                        return;
                    };
                    for gpu in state.gpu_samples() {
                        observer.observe(
                            gpu.memory_used_bytes,
                            &[KeyValue::new("gpu", i64::from(gpu.index))],
                        );
                    }
                })
                .build(),
        ));
        if let Ok(mut observers) = self.observers.lock() {
            observers.extend(handles);
        }
    }

    /// Records a finished request: its metrics, and its span when the trace is sampled.
    pub fn record(&self, record: &crate::metrics::RequestRecord<'_>, span: &SpanRecord<'_>) {
        if let Some(instruments) = &self.instruments {
            instruments.record(record);
        }
        if let Some(tracer) = &self.tracer
            && span.trace.sampled()
        {
            export_span(tracer, span);
        }
    }

    /// Exports what is buffered and stops the exporters (at exit).
    pub fn shutdown(&self) {
        if let Some(provider) = &self.tracer_provider
            && let Err(error) = provider.shutdown()
        {
            tracing::warn!(%error, "flushing OTLP spans at exit");
        }
        if let Some(provider) = &self.meter_provider
            && let Err(error) = provider.shutdown()
        {
            tracing::warn!(%error, "flushing OTLP metrics at exit");
        }
    }
}

impl Instruments {
    fn new(meter: &Meter) -> Self {
        Instruments {
            requests: meter
                .u64_counter("isthmus.requests")
                .with_description("Requests answered, by route, rule and HTTP status.")
                .build(),
            tokens: meter
                .u64_counter("isthmus.tokens")
                .with_description("Prompt (input) and completion (output) tokens, by route.")
                .build(),
            request_duration: meter
                .f64_histogram("isthmus.request.duration")
                .with_unit("s")
                .with_description("Time from request header to the last response byte.")
                .with_boundaries(REQUEST_BOUNDS_S.to_vec())
                .build(),
            time_to_first_token: meter
                .f64_histogram("gen_ai.server.time_to_first_token")
                .with_unit("s")
                .with_description("Time to the first generated token (local models).")
                .with_boundaries(REQUEST_BOUNDS_S.to_vec())
                .build(),
            time_per_output_token: meter
                .f64_histogram("gen_ai.server.time_per_output_token")
                .with_unit("s")
                .with_description("Time per output token after the first (local models).")
                .with_boundaries(TOKEN_BOUNDS_S.to_vec())
                .build(),
            generation_duration: meter
                .f64_histogram("gen_ai.server.request.duration")
                .with_unit("s")
                .with_description("Duration of local generations.")
                .with_boundaries(REQUEST_BOUNDS_S.to_vec())
                .build(),
        }
    }

    fn record(&self, record: &crate::metrics::RequestRecord<'_>) {
        let route = KeyValue::new("route", record.route);
        self.requests.add(
            1,
            &[
                route.clone(),
                KeyValue::new("rule", record.rule.to_owned()),
                KeyValue::new("http.response.status_code", i64::from(record.status)),
            ],
        );
        for (kind, count) in [
            ("input", record.prompt_tokens),
            ("output", record.completion_tokens),
        ] {
            if count > 0 {
                self.tokens.add(
                    u64::from(count),
                    &[route.clone(), KeyValue::new("gen_ai.token.type", kind)],
                );
            }
        }
        self.request_duration
            .record(record.duration.as_secs_f64(), &[route]);
        if let Some(generation) = record.generation {
            let model = [KeyValue::new(
                "gen_ai.request.model",
                generation.model.to_owned(),
            )];
            self.time_to_first_token
                .record(generation.time_to_first_token.as_secs_f64(), &model);
            self.generation_duration
                .record(record.duration.as_secs_f64(), &model);
            if generation.tokens_after_first > 0 {
                self.time_per_output_token.record(
                    (generation.decode / generation.tokens_after_first).as_secs_f64(),
                    &model,
                );
            }
        }
    }
}

fn export_span(tracer: &SdkTracer, span: &SpanRecord<'_>) {
    let trace_id = TraceId::from_bytes(span.trace.trace_id);
    let flags = TraceFlags::new(span.trace.flags);
    let parent = match span.trace.parent_span_id {
        Some(parent) => Context::new().with_remote_span_context(SpanContext::new(
            trace_id,
            SpanId::from_bytes(parent),
            flags,
            true,
            TraceState::default(),
        )),
        None => Context::new(),
    };
    let mut attributes = vec![
        KeyValue::new("http.request.method", span.method.to_owned()),
        KeyValue::new("http.response.status_code", i64::from(span.status)),
        KeyValue::new("gen_ai.operation.name", span.operation.to_owned()),
        KeyValue::new("isthmus.route", span.route),
        KeyValue::new("isthmus.rule", span.rule.to_owned()),
        KeyValue::new("isthmus.request_id", span.request_id.to_owned()),
        KeyValue::new("gen_ai.usage.input_tokens", i64::from(span.prompt_tokens)),
        KeyValue::new(
            "gen_ai.usage.output_tokens",
            i64::from(span.completion_tokens),
        ),
    ];
    if let Some(target) = span.target {
        attributes.push(KeyValue::new("isthmus.target", target.to_owned()));
    }
    if let Some(first_token) = span.time_to_first_token {
        attributes.push(KeyValue::new(
            "isthmus.time_to_first_token_ms",
            first_token.as_secs_f64() * 1e3,
        ));
    }
    if span.attempts > 0 {
        attributes.push(KeyValue::new("isthmus.attempts", i64::from(span.attempts)));
    }
    if let Some(degraded) = span.degraded {
        attributes.push(KeyValue::new("isthmus.degraded", degraded));
    }
    let status = if span.status >= 500 || span.error.is_some() {
        Status::error(span.error.unwrap_or("server error").to_owned())
    } else {
        Status::Unset
    };
    let name = match span.target {
        Some(target) => format!("{} {target}", span.operation),
        None => span.operation.to_owned(),
    };
    let mut builder = tracer
        .span_builder(name)
        .with_kind(SpanKind::Server)
        .with_start_time(span.started)
        .with_end_time(span.started + span.duration)
        .with_attributes(attributes)
        .with_status(status);
    builder.trace_id = Some(trace_id);
    builder.span_id = Some(SpanId::from_bytes(span.trace.span_id));
    let mut exported = builder.start_with_context(tracer, &parent);
    exported.end_with_timestamp(span.started + span.duration);
}

/// The exporter's HTTP client: trust roots only for https, the system bundle plus
/// `ca_file`; no proxy for loopback collectors.
fn http_client(settings: &OtlpSettings) -> anyhow::Result<reqwest::blocking::Client> {
    let mut builder = reqwest::blocking::Client::builder()
        .timeout(settings.timeout)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("isthmus/", env!("CARGO_PKG_VERSION")));
    if settings.endpoint.scheme() == "https" {
        let mut roots = rustls::RootCertStore::empty();
        if let Ok(bundle) = std::fs::read(crate::identity::SYSTEM_CA_BUNDLE) {
            use rustls_pki_types::pem::PemObject as _;
            let certificates =
                rustls_pki_types::CertificateDer::pem_slice_iter(&bundle).filter_map(Result::ok);
            roots.add_parsable_certificates(certificates);
        }
        if let Some(path) = &settings.ca_file {
            let certificates = crate::identity::read_ca_file(path)
                .map_err(|reason| anyhow::anyhow!("telemetry.otlp.ca_file: {reason}"))?;
            for certificate in certificates {
                roots.add(certificate).map_err(|error| {
                    anyhow::anyhow!("telemetry.otlp.ca_file: {}: {error}", path.display())
                })?;
            }
        }
        if roots.is_empty() {
            anyhow::bail!(
                "telemetry.otlp: no trust roots for {}: {} is missing; set ca_file",
                settings.endpoint,
                crate::identity::SYSTEM_CA_BUNDLE
            );
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        builder = builder.use_preconfigured_tls(tls);
    }
    if settings.endpoint.host_str().is_some_and(|host| {
        host == "localhost"
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    }) {
        builder = builder.no_proxy();
    }
    builder
        .build()
        .map_err(|error| anyhow::anyhow!("telemetry.otlp: HTTP client: {error}"))
}

#[cfg(test)]
mod tests;
