//! Prometheus metrics of the gateway, rendered in the text exposition format on the admin
//! listener's `/metrics`.
//!
//! Labels carry only bounded, non-sensitive values (route, status, model name): never a
//! tenant, key id or anything from a prompt.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::Duration;

/// Upper bounds of the latency histograms, in seconds.
const LATENCY_BUCKETS_S: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

#[derive(Debug, Clone, Default)]
struct Histogram {
    /// Count per bucket of `LATENCY_BUCKETS_S` (not cumulative), then the overflow.
    counts: Vec<u64>,
    sum_s: f64,
    count: u64,
}

impl Histogram {
    fn observe(&mut self, value: Duration) {
        if self.counts.is_empty() {
            self.counts = vec![0; LATENCY_BUCKETS_S.len() + 1];
        }
        let seconds = value.as_secs_f64();
        let bucket = LATENCY_BUCKETS_S
            .iter()
            .position(|bound| seconds <= *bound)
            .unwrap_or(LATENCY_BUCKETS_S.len());
        self.counts[bucket] += 1;
        self.sum_s += seconds;
        self.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let mut cumulative = 0;
        for (index, bound) in LATENCY_BUCKETS_S.iter().enumerate() {
            cumulative += self.counts.get(index).copied().unwrap_or(0);
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{bound}\"}} {cumulative}");
        }
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum{{{labels}}} {}", self.sum_s);
        let _ = writeln!(out, "{name}_count{{{labels}}} {}", self.count);
    }
}

#[derive(Debug, Default)]
struct Registry {
    requests: BTreeMap<(&'static str, u16), u64>,
    prompt_tokens: BTreeMap<&'static str, u64>,
    completion_tokens: BTreeMap<&'static str, u64>,
    request_duration: BTreeMap<&'static str, Histogram>,
    time_to_first_token: BTreeMap<String, Histogram>,
}

/// What the logging phase reports for one finished request.
#[derive(Debug, Clone, Copy)]
pub struct RequestRecord<'a> {
    /// `local`, `cloud`, `rejected`, or `none` for requests that never reached routing
    /// (health checks of the data plane, unknown paths, authentication failures).
    pub route: &'static str,
    pub status: u16,
    pub duration: Duration,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    /// Model and time to first token, for generations that produced one.
    pub first_token: Option<(&'a str, Duration)>,
}

/// A snapshot of one local model's worker, rendered as gauges.
#[derive(Debug, Clone)]
pub struct ModelGauges {
    pub model: String,
    pub queue_depth: u64,
    pub active_sequences: u64,
    pub decode_steps: u64,
    pub batched_tokens: u64,
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
        *registry.prompt_tokens.entry(record.route).or_default() += u64::from(record.prompt_tokens);
        *registry.completion_tokens.entry(record.route).or_default() +=
            u64::from(record.completion_tokens);
        registry
            .request_duration
            .entry(record.route)
            .or_default()
            .observe(record.duration);
        if let Some((model, first_token)) = record.first_token {
            registry
                .time_to_first_token
                .entry(model.to_owned())
                .or_default()
                .observe(first_token);
        }
    }

    /// The Prometheus text exposition of everything, with the models' live gauges.
    pub fn render(&self, models: &[ModelGauges], open_connections: u64, ready: bool) -> String {
        let mut out = String::new();
        let Ok(registry) = self.registry.lock() else {
            return out;
        };
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
            "isthmus_prompt_tokens_total",
            "counter",
            "Prompt tokens of answered requests, by route.",
        );
        for (route, count) in &registry.prompt_tokens {
            let _ = writeln!(
                out,
                "isthmus_prompt_tokens_total{{route=\"{route}\"}} {count}"
            );
        }
        header(
            &mut out,
            "isthmus_completion_tokens_total",
            "counter",
            "Completion tokens of answered requests, by route.",
        );
        for (route, count) in &registry.completion_tokens {
            let _ = writeln!(
                out,
                "isthmus_completion_tokens_total{{route=\"{route}\"}} {count}"
            );
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
        header(
            &mut out,
            "isthmus_time_to_first_token_seconds",
            "histogram",
            "Time from request header to the first generated token, by local model.",
        );
        for (model, histogram) in &registry.time_to_first_token {
            histogram.render(
                &mut out,
                "isthmus_time_to_first_token_seconds",
                &format!("model=\"{}\"", escape_label(model)),
            );
        }
        drop(registry);

        let gauges: [ModelSeries; 4] = [
            (
                "isthmus_local_queue_depth",
                "gauge",
                "Requests waiting for a free sequence.",
                |g| g.queue_depth,
            ),
            (
                "isthmus_local_active_sequences",
                "gauge",
                "Sequences being decoded.",
                |g| g.active_sequences,
            ),
            (
                "isthmus_local_decode_steps_total",
                "counter",
                "llama_decode calls.",
                |g| g.decode_steps,
            ),
            (
                "isthmus_local_batched_tokens_total",
                "counter",
                "Tokens put into llama_decode calls.",
                |g| g.batched_tokens,
            ),
        ];
        for (name, kind, help, value) in gauges {
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
        header(
            &mut out,
            "isthmus_open_connections",
            "gauge",
            "Open data-plane connections.",
        );
        let _ = writeln!(out, "isthmus_open_connections {open_connections}");
        header(
            &mut out,
            "isthmus_ready",
            "gauge",
            "1 when models are loaded and listeners bound.",
        );
        let _ = writeln!(out, "isthmus_ready {}", u8::from(ready));
        out
    }
}

/// A per-model series: name, Prometheus type, help text, and how to read it.
type ModelSeries = (
    &'static str,
    &'static str,
    &'static str,
    fn(&ModelGauges) -> u64,
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
