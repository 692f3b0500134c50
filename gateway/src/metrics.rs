//! Prometheus metrics of the gateway, rendered in the text exposition format on the admin
//! listener's `/metrics`.
//!
//! Inference latencies follow the OpenTelemetry GenAI semantic conventions, in their
//! Prometheus spelling (`gen_ai_server_time_to_first_token_seconds`, ...,
//! label `gen_ai_request_model`). Labels carry only bounded, non-sensitive values (route,
//! status, model name): never a tenant, key id or anything from a prompt.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::Duration;

/// Upper bounds of request-scale latency histograms, in seconds.
const REQUEST_BUCKETS_S: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];
/// Upper bounds of the time-per-output-token histogram, in seconds.
const TOKEN_BUCKETS_S: &[f64] = &[
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0,
];

#[derive(Debug, Clone)]
struct Histogram {
    bounds: &'static [f64],
    /// Count per bucket (not cumulative), then the overflow.
    counts: Vec<u64>,
    sum_s: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: vec![0; bounds.len() + 1],
            sum_s: 0.0,
            count: 0,
        }
    }

    fn observe(&mut self, value: Duration) {
        let seconds = value.as_secs_f64();
        let bucket = self
            .bounds
            .iter()
            .position(|bound| seconds <= *bound)
            .unwrap_or(self.bounds.len());
        self.counts[bucket] += 1;
        self.sum_s += seconds;
        self.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let mut cumulative = 0;
        for (index, bound) in self.bounds.iter().enumerate() {
            cumulative += self.counts[index];
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{bound}\"}} {cumulative}");
        }
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum{{{labels}}} {}", self.sum_s);
        let _ = writeln!(out, "{name}_count{{{labels}}} {}", self.count);
    }
}

/// Latency histograms of one local model.
#[derive(Debug, Clone)]
struct ModelLatency {
    time_to_first_token: Histogram,
    time_per_output_token: Histogram,
    request_duration: Histogram,
}

impl Default for ModelLatency {
    fn default() -> Self {
        ModelLatency {
            time_to_first_token: Histogram::new(REQUEST_BUCKETS_S),
            time_per_output_token: Histogram::new(TOKEN_BUCKETS_S),
            request_duration: Histogram::new(REQUEST_BUCKETS_S),
        }
    }
}

#[derive(Debug, Default)]
struct Registry {
    requests: BTreeMap<(&'static str, u16), u64>,
    rule_requests: BTreeMap<(&'static str, String, u16), u64>,
    prompt_tokens: BTreeMap<&'static str, u64>,
    completion_tokens: BTreeMap<&'static str, u64>,
    request_duration: BTreeMap<&'static str, Histogram>,
    models: BTreeMap<String, ModelLatency>,
    /// Firewall findings by rule id and action (ids from the built-in rule set: bounded).
    waf_matches: BTreeMap<(u32, &'static str), u64>,
    /// Requests with sensitive content, by where they went (a fixed set of five).
    sensitive_requests: BTreeMap<&'static str, u64>,
    /// Requests with attachments, by kind and where they went (four by four at most).
    attachment_requests: BTreeMap<(&'static str, &'static str), u64>,
    /// Requests and tokens by API key id and route (ids from the configuration: bounded).
    callers: BTreeMap<String, BTreeMap<&'static str, CallerUse>>,
    /// Requests refused by a caller's rate limit, by the limit (`requests`, `tokens`).
    rate_limited: BTreeMap<&'static str, u64>,
    /// Configuration reloads by outcome (`success`, `failure`).
    reloads: BTreeMap<&'static str, u64>,
    /// Whether the last load or reload of the configuration succeeded.
    last_reload_failed: bool,
    /// When a configuration last came into force (start-up or reload), seconds since the epoch.
    config_loaded_unix_s: Option<f64>,
}

/// A generation's timing, for the GenAI latency histograms.
#[derive(Debug, Clone, Copy)]
pub struct GenerationRecord<'a> {
    pub model: &'a str,
    pub time_to_first_token: Duration,
    /// Time from the first token to the last, and how many tokens followed the first.
    pub decode: Duration,
    pub tokens_after_first: u32,
}

/// What the logging phase reports for one finished request.
#[derive(Debug, Clone, Copy)]
pub struct RequestRecord<'a> {
    /// `local`, `cloud` or `rejected`.
    pub route: &'static str,
    /// The routing rule or gateway check that decided (names from the configuration or
    /// the gateway's own fixed set, so the label stays bounded).
    pub rule: &'a str,
    pub status: u16,
    pub duration: Duration,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    /// Timing of the generation, when one produced a token.
    pub generation: Option<GenerationRecord<'a>>,
    /// Where a request with sensitive content went
    /// ([`crate::audit::report::sensitive_disposition`]); `None` when the scan found nothing.
    pub sensitive: Option<&'static str>,
    /// The kinds of attachments the scan could not read (`crate::facts::attachments`) and
    /// where they went ([`crate::audit::report::attachment_disposition`]).
    pub attachments: (&'a [&'static str], &'static str),
    /// The API key's id (from the configuration), `None` for anonymous callers and requests
    /// refused before authentication.
    pub caller: Option<&'a str>,
}

/// The label of anonymous callers in the per-caller series.
const ANONYMOUS_LABEL: &str = "(anonymous)";

/// One caller's use on one route.
#[derive(Debug, Clone, Copy, Default)]
struct CallerUse {
    requests: u64,
    prompt_tokens: u64,
    completion_tokens: u64,
}

/// A snapshot of one local model's worker.
#[derive(Debug, Clone, Default)]
pub struct ModelGauges {
    pub model: String,
    pub queue_depth: u64,
    pub active_sequences: u64,
    pub decode_steps: u64,
    pub batched_tokens: u64,
    pub decode_seconds: f64,
    pub busy_seconds: f64,
    pub sync_seconds: f64,
    pub sampling_seconds: f64,
    pub prompt_tokens: u64,
    pub prefill_tokens: u64,
    pub decode_tokens: u64,
    pub prefix_hit_tokens: u64,
    pub kv_cells_used: u64,
    pub kv_cells_total: u64,
    pub prefix_cache_entries: u64,
    pub prefix_cache_host_bytes: u64,
    pub workers_failed: u64,
    pub worker_panics: u64,
}

/// The gateway's metrics.
#[derive(Debug, Default)]
pub struct Metrics {
    registry: Mutex<Registry>,
}

impl Metrics {
    pub fn record(&self, record: &RequestRecord<'_>) {
        let Ok(mut registry) = self.registry.lock() else {
            return;
        };
        *registry
            .requests
            .entry((record.route, record.status))
            .or_default() += 1;
        *registry
            .rule_requests
            .entry((record.route, record.rule.to_owned(), record.status))
            .or_default() += 1;
        if let Some(disposition) = record.sensitive {
            *registry.sensitive_requests.entry(disposition).or_default() += 1;
        }
        let (kinds, disposition) = record.attachments;
        for kind in kinds {
            *registry
                .attachment_requests
                .entry((kind, disposition))
                .or_default() += 1;
        }
        // Looked up by reference: a key's name is copied once, not per request.
        let key = record.caller.unwrap_or(ANONYMOUS_LABEL);
        if !registry.callers.contains_key(key) {
            registry.callers.insert(key.to_owned(), BTreeMap::new());
        }
        let Some(routes) = registry.callers.get_mut(key) else {
            return;
        };
        let caller = routes.entry(record.route).or_default();
        caller.requests += 1;
        caller.prompt_tokens += u64::from(record.prompt_tokens);
        caller.completion_tokens += u64::from(record.completion_tokens);
        *registry.prompt_tokens.entry(record.route).or_default() += u64::from(record.prompt_tokens);
        *registry.completion_tokens.entry(record.route).or_default() +=
            u64::from(record.completion_tokens);
        registry
            .request_duration
            .entry(record.route)
            .or_insert_with(|| Histogram::new(REQUEST_BUCKETS_S))
            .observe(record.duration);
        if let Some(generation) = record.generation {
            let latency = registry
                .models
                .entry(generation.model.to_owned())
                .or_default();
            latency
                .time_to_first_token
                .observe(generation.time_to_first_token);
            latency.request_duration.observe(record.duration);
            if generation.tokens_after_first > 0 {
                latency
                    .time_per_output_token
                    .observe(generation.decode / generation.tokens_after_first);
            }
        }
    }

    /// Notes a configuration load or reload: start-up (`reload: false`) or a reload by any
    /// trigger (SIGHUP, the admin API, a change of the file).
    pub fn record_config_load(&self, reload: bool, success: bool) {
        let Ok(mut registry) = self.registry.lock() else {
            return;
        };
        if reload {
            *registry
                .reloads
                .entry(if success { "success" } else { "failure" })
                .or_default() += 1;
        }
        registry.last_reload_failed = !success;
        if success {
            registry.config_loaded_unix_s = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .ok()
                .map(|since| since.as_secs_f64());
        }
    }

    /// Counts a request refused by a caller's `kind` limit (`requests` or `tokens`).
    pub fn record_rate_limited(&self, kind: &'static str) {
        if let Ok(mut registry) = self.registry.lock() {
            *registry.rate_limited.entry(kind).or_default() += 1;
        }
    }

    /// Counts a firewall verdict's matched rules.
    pub fn record_waf(&self, verdict: &router_policies::waf::WafVerdict) {
        let Ok(mut registry) = self.registry.lock() else {
            return;
        };
        for found in &verdict.matches {
            *registry
                .waf_matches
                .entry((found.rule.id, verdict.action.as_str()))
                .or_default() += 1;
        }
    }

    /// The Prometheus text exposition of everything, with the live gauges.
    pub fn render(&self, live: &Live<'_>) -> String {
        let Live {
            models,
            backends,
            gpus,
            open_connections,
            connection_refusals,
            ready,
            restart_required,
            stored_responses,
        } = *live;
        let mut out = String::new();
        let Ok(registry) = self.registry.lock() else {
            return out;
        };
        render_config(&mut out, &registry, restart_required);
        header(
            &mut out,
            "isthmus_rate_limited_requests_total",
            "counter",
            "Requests refused (429) by a caller's requests or tokens per minute or tokens per day, by the limit.",
        );
        for kind in ["requests", "tokens", "tokens_per_day"] {
            let count = registry.rate_limited.get(kind).copied().unwrap_or(0);
            let _ = writeln!(
                out,
                "isthmus_rate_limited_requests_total{{limit=\"{kind}\"}} {count}"
            );
        }
        header(
            &mut out,
            "isthmus_requests_total",
            "counter",
            "Requests answered, by route and HTTP status.",
        );
        for ((route, status), count) in &registry.requests {
            let _ = writeln!(
                out,
                "isthmus_requests_total{{route=\"{route}\",status=\"{status}\"}} {count}"
            );
        }
        header(
            &mut out,
            "isthmus_waf_matches_total",
            "counter",
            "Requests a firewall rule matched, by rule id and action (Matched, Blocked).",
        );
        for ((rule, action), count) in &registry.waf_matches {
            let _ = writeln!(
                out,
                "isthmus_waf_matches_total{{rule=\"{rule}\",action=\"{action}\"}} {count}"
            );
        }
        header(
            &mut out,
            "isthmus_sensitive_requests_total",
            "counter",
            "Requests with sensitive content, by where they went: kept_local, redacted_to_cloud, on_premises_pool, rejected, left_unredacted (never expected).",
        );
        for (disposition, count) in &registry.sensitive_requests {
            let _ = writeln!(
                out,
                "isthmus_sensitive_requests_total{{disposition=\"{disposition}\"}} {count}"
            );
        }
        header(
            &mut out,
            "isthmus_attachment_requests_total",
            "counter",
            "Requests with attachments the sensitivity scan cannot read, by kind (image, audio, video, file, tokens) and where they went: kept_local, on_premises_pool, rejected, to_cloud (unscanned).",
        );
        for ((kind, disposition), count) in &registry.attachment_requests {
            let _ = writeln!(
                out,
                "isthmus_attachment_requests_total{{kind=\"{kind}\",disposition=\"{disposition}\"}} {count}"
            );
        }
        header(
            &mut out,
            "isthmus_rule_requests_total",
            "counter",
            "Requests answered, by route, the rule that decided, and HTTP status.",
        );
        for ((route, rule, status), count) in &registry.rule_requests {
            let _ = writeln!(
                out,
                "isthmus_rule_requests_total{{route=\"{route}\",rule=\"{rule}\",status=\"{status}\"}} {count}"
            );
        }
        render_callers(&mut out, &registry.callers);
        header(
            &mut out,
            "isthmus_output_input_token_ratio",
            "gauge",
            "Completion tokens per prompt token so far, by route.",
        );
        for (route, prompt) in &registry.prompt_tokens {
            let completion = registry.completion_tokens.get(route).copied().unwrap_or(0);
            if *prompt > 0 {
                let _ = writeln!(
                    out,
                    "isthmus_output_input_token_ratio{{route=\"{route}\"}} {}",
                    completion as f64 / *prompt as f64
                );
            }
        }
        for (name, help, values) in [
            (
                "isthmus_prompt_tokens_total",
                "Prompt tokens of answered requests, by route.",
                &registry.prompt_tokens,
            ),
            (
                "isthmus_completion_tokens_total",
                "Completion tokens of answered requests, by route.",
                &registry.completion_tokens,
            ),
        ] {
            header(&mut out, name, "counter", help);
            for (route, count) in values {
                let _ = writeln!(out, "{name}{{route=\"{route}\"}} {count}");
            }
        }
        header(
            &mut out,
            "isthmus_request_duration_seconds",
            "histogram",
            "Time from request header to the last response byte, by route.",
        );
        for (route, histogram) in &registry.request_duration {
            histogram.render(
                &mut out,
                "isthmus_request_duration_seconds",
                &format!("route=\"{route}\""),
            );
        }
        type Pick = fn(&ModelLatency) -> &Histogram;
        let latencies: [(&str, &str, Pick); 3] = [
            (
                "gen_ai_server_time_to_first_token_seconds",
                "Time from request header to the first generated token.",
                |latency| &latency.time_to_first_token,
            ),
            (
                "gen_ai_server_time_per_output_token_seconds",
                "Time per generated token after the first.",
                |latency| &latency.time_per_output_token,
            ),
            (
                "gen_ai_server_request_duration_seconds",
                "Time of generation requests from header to last byte.",
                |latency| &latency.request_duration,
            ),
        ];
        for (name, help, pick) in latencies {
            header(&mut out, name, "histogram", help);
            for (model, latency) in &registry.models {
                pick(latency).render(
                    &mut out,
                    name,
                    &format!("gen_ai_request_model=\"{}\"", escape_label(model)),
                );
            }
        }
        drop(registry);

        let series: [ModelSeries; 18] = [
            (
                "isthmus_local_queue_depth",
                "gauge",
                "Requests waiting for a free sequence.",
                |g| g.queue_depth as f64,
            ),
            (
                "isthmus_local_active_sequences",
                "gauge",
                "Sequences being decoded.",
                |g| g.active_sequences as f64,
            ),
            (
                "isthmus_local_decode_steps_total",
                "counter",
                "llama_decode calls.",
                |g| g.decode_steps as f64,
            ),
            (
                "isthmus_local_batched_tokens_total",
                "counter",
                "Tokens put into llama_decode calls.",
                |g| g.batched_tokens as f64,
            ),
            (
                "isthmus_local_decode_seconds_total",
                "counter",
                "Time spent in llama_decode, summed over the model's lanes.",
                |g| g.decode_seconds,
            ),
            (
                "isthmus_local_worker_busy_seconds_total",
                "counter",
                "Time the inference workers spent working, summed over lanes; beyond llama_decode, this is admission, batching, sampling and delivery.",
                |g| g.busy_seconds,
            ),
            (
                "isthmus_local_device_wait_seconds_total",
                "counter",
                "Time the inference workers waited for the device to finish decode steps, summed over lanes.",
                |g| g.sync_seconds,
            ),
            (
                "isthmus_local_sampling_seconds_total",
                "counter",
                "Time the inference workers spent choosing tokens from the logits (greedy scans and sampler chains), summed over lanes.",
                |g| g.sampling_seconds,
            ),
            (
                "isthmus_local_prompt_tokens_total",
                "counter",
                "Prompt tokens of admitted requests.",
                |g| g.prompt_tokens as f64,
            ),
            (
                "isthmus_local_prefill_tokens_total",
                "counter",
                "Prompt tokens decoded (prefill); rate() gives prefill tokens/s.",
                |g| g.prefill_tokens as f64,
            ),
            (
                "isthmus_local_decode_tokens_total",
                "counter",
                "Tokens generated; rate() gives decode tokens/s.",
                |g| g.decode_tokens as f64,
            ),
            (
                "isthmus_local_prefix_hit_tokens_total",
                "counter",
                "Prompt tokens served from the KV cache instead of decoded.",
                |g| g.prefix_hit_tokens as f64,
            ),
            (
                "isthmus_local_kv_cells_used",
                "gauge",
                "KV cache cells holding data in use.",
                |g| g.kv_cells_used as f64,
            ),
            (
                "isthmus_local_kv_cells_total",
                "gauge",
                "KV cache cells of the context.",
                |g| g.kv_cells_total as f64,
            ),
            (
                "isthmus_local_prefix_cache_entries",
                "gauge",
                "Finished sequences kept for prefix reuse.",
                |g| g.prefix_cache_entries as f64,
            ),
            (
                "isthmus_local_prefix_cache_host_bytes",
                "gauge",
                "Host memory the prefixes kept for reuse take (one KV cache per sequence).",
                |g| g.prefix_cache_host_bytes as f64,
            ),
            (
                "isthmus_local_workers_failed",
                "gauge",
                "Inference threads of the model down after a panic (restarting, or left down after repeated panics); above 0, /healthz and /readyz answer 503.",
                |g| g.workers_failed as f64,
            ),
            (
                "isthmus_local_worker_panics_total",
                "counter",
                "Panics of the model's inference threads; each failed the requests the thread was generating, and the thread restarted unless it had panicked three times in ten minutes.",
                |g| g.worker_panics as f64,
            ),
        ];
        for (name, kind, help, value) in series {
            header(&mut out, name, kind, help);
            for model in models {
                let _ = writeln!(
                    out,
                    "{name}{{model=\"{}\"}} {}",
                    escape_label(&model.model),
                    value(model)
                );
            }
        }
        render_backends(&mut out, backends);
        render_gpus(&mut out, gpus);
        header(
            &mut out,
            "isthmus_open_connections",
            "gauge",
            "Open data-plane connections.",
        );
        let _ = writeln!(out, "isthmus_open_connections {open_connections}");
        header(
            &mut out,
            "isthmus_connections_refused_total",
            "counter",
            "Data-plane connections ended before a request was served: a request header over \
             header_bytes_max (answered 431), not complete within header_read_timeout_ms, or \
             a failed or timed-out TLS handshake.",
        );
        for (reason, count) in connection_refusals {
            let _ = writeln!(
                out,
                "isthmus_connections_refused_total{{reason=\"{reason}\"}} {count}"
            );
        }
        header(
            &mut out,
            "isthmus_ready",
            "gauge",
            "1 when models are loaded and listeners bound.",
        );
        let _ = writeln!(out, "isthmus_ready {}", u8::from(ready));
        if let Some((count, bytes)) = stored_responses {
            header(
                &mut out,
                "isthmus_stored_responses",
                "gauge",
                "Responses API answers kept for previous_response_id ([responses] store).",
            );
            let _ = writeln!(out, "isthmus_stored_responses {count}");
            header(
                &mut out,
                "isthmus_stored_responses_bytes",
                "gauge",
                "Bytes of the kept responses, against responses.bytes_max.",
            );
            let _ = writeln!(out, "isthmus_stored_responses_bytes {bytes}");
        }
        out
    }
}

/// What `/metrics` reads live at each scrape, beside the recorded counters.
#[derive(Debug, Clone, Copy)]
pub struct Live<'a> {
    pub models: &'a [ModelGauges],
    pub backends: &'a [crate::cloud::BackendStatus],
    /// Empty without NVML: the GPU series are then absent, never zero.
    pub gpus: &'a [crate::gpu::GpuSample],
    pub open_connections: u64,
    /// `(reason, count)` of `isthmus_connections_refused_total`.
    pub connection_refusals: [(&'static str, u64); 3],
    pub ready: bool,
    /// Sections of the configuration file in force that differ from those the process
    /// started with and wait for a restart (`server`, `models`, ...).
    pub restart_required: &'a [&'static str],
    /// Stored responses and their bytes, when the store is on.
    pub stored_responses: Option<(usize, u64)>,
}

/// Requests and tokens per API key and route, for chargeback and quotas.
fn render_callers(out: &mut String, callers: &BTreeMap<String, BTreeMap<&'static str, CallerUse>>) {
    let uses = || {
        callers.iter().flat_map(|(key, routes)| {
            let key = escape_label(key);
            routes
                .iter()
                .map(move |(route, used)| (key.clone(), *route, *used))
        })
    };
    header(
        out,
        "isthmus_caller_requests_total",
        "counter",
        "Requests by API key id (\"(anonymous)\" without a key) and route.",
    );
    for (key, route, used) in uses() {
        let _ = writeln!(
            out,
            "isthmus_caller_requests_total{{key=\"{key}\",route=\"{route}\"}} {}",
            used.requests
        );
    }
    header(
        out,
        "isthmus_caller_tokens_total",
        "counter",
        "Prompt and completion tokens by API key id and route.",
    );
    for (key, route, used) in uses() {
        for (kind, count) in [
            ("prompt", used.prompt_tokens),
            ("completion", used.completion_tokens),
        ] {
            let _ = writeln!(
                out,
                "isthmus_caller_tokens_total{{key=\"{key}\",route=\"{route}\",kind=\"{kind}\"}} {count}"
            );
        }
    }
}

/// Whether the configuration reloads, and what waits for a restart.
fn render_config(out: &mut String, registry: &Registry, restart_required: &[&'static str]) {
    header(
        out,
        "isthmus_config_reloads_total",
        "counter",
        "Configuration reloads (SIGHUP, admin API, file changes), by outcome.",
    );
    for outcome in ["success", "failure"] {
        let count = registry.reloads.get(outcome).copied().unwrap_or(0);
        let _ = writeln!(
            out,
            "isthmus_config_reloads_total{{outcome=\"{outcome}\"}} {count}"
        );
    }
    header(
        out,
        "isthmus_config_last_reload_successful",
        "gauge",
        "0 when the last reload was refused and the configuration before it stays in force.",
    );
    let _ = writeln!(
        out,
        "isthmus_config_last_reload_successful {}",
        u8::from(!registry.last_reload_failed)
    );
    if let Some(loaded) = registry.config_loaded_unix_s {
        header(
            out,
            "isthmus_config_last_reload_success_timestamp_seconds",
            "gauge",
            "When the configuration in force was loaded (start-up or the last successful reload).",
        );
        let _ = writeln!(
            out,
            "isthmus_config_last_reload_success_timestamp_seconds {loaded:.3}"
        );
    }
    header(
        out,
        "isthmus_config_restart_required",
        "gauge",
        "1 for each section of the configuration in force that changed since start-up and takes effect only after a restart.",
    );
    for section in restart_required {
        let _ = writeln!(
            out,
            "isthmus_config_restart_required{{section=\"{section}\"}} 1"
        );
    }
}

/// Cloud backends: whether each takes traffic, its circuit, load, and request and connection
/// counts. Pool and backend names come from the configuration.
fn render_backends(out: &mut String, backends: &[crate::cloud::BackendStatus]) {
    if backends.is_empty() {
        return;
    }
    type Pick = fn(&crate::cloud::BackendStatus) -> String;
    let series: [(&str, &str, &str, Pick); 5] = [
        (
            "isthmus_upstream_backend_up",
            "gauge",
            "1 when a cloud backend takes traffic (probes pass, circuit not open).",
            |backend| u8::from(backend.takes_traffic()).to_string(),
        ),
        (
            "isthmus_upstream_backend_circuit_open",
            "gauge",
            "1 while a backend's circuit breaker is open (ejected).",
            |backend| u8::from(backend.circuit == "open").to_string(),
        ),
        (
            "isthmus_upstream_backend_in_flight",
            "gauge",
            "Requests a backend is serving now.",
            |backend| backend.in_flight.to_string(),
        ),
        (
            "isthmus_upstream_backend_requests_total",
            "counter",
            "Requests sent to a backend since it was configured.",
            |backend| backend.requests.to_string(),
        ),
        (
            "isthmus_upstream_backend_connections_total",
            "counter",
            "Connections opened to a backend since it was configured, for requests and probes; against requests_total, how often connections were reused.",
            |backend| backend.connections.to_string(),
        ),
    ];
    for (name, kind, help, value) in series {
        header(out, name, kind, help);
        for backend in backends {
            let _ = writeln!(
                out,
                "{name}{{pool=\"{}\",backend=\"{}\"}} {}",
                escape_label(&backend.pool),
                escape_label(&backend.backend),
                value(backend)
            );
        }
    }
}

/// GPUs through NVML, only when a GPU was found.
fn render_gpus(out: &mut String, gpus: &[crate::gpu::GpuSample]) {
    if gpus.is_empty() {
        return;
    }
    type Pick = fn(&crate::gpu::GpuSample) -> String;
    let series: [(&str, &str, Pick); 3] = [
        (
            "isthmus_gpu_utilization_ratio",
            "Share of the last sample period in which a kernel ran (NVML).",
            |gpu| (f64::from(gpu.utilization_percent) / 100.0).to_string(),
        ),
        (
            "isthmus_gpu_memory_used_bytes",
            "GPU memory in use (NVML).",
            |gpu| gpu.memory_used_bytes.to_string(),
        ),
        (
            "isthmus_gpu_memory_total_bytes",
            "GPU memory in all (NVML).",
            |gpu| gpu.memory_total_bytes.to_string(),
        ),
    ];
    for (name, help, value) in series {
        header(out, name, "gauge", help);
        for gpu in gpus {
            let _ = writeln!(out, "{name}{{gpu=\"{}\"}} {}", gpu.index, value(gpu));
        }
    }
}

/// A per-model series: name, Prometheus type, help text, and how to read it.
type ModelSeries = (
    &'static str,
    &'static str,
    &'static str,
    fn(&ModelGauges) -> f64,
);

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn escape_label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests;
