//! `[telemetry]`: OTLP/HTTP export of one span per request and of the gateway's metrics to an
//! OpenTelemetry collector (the Azure Monitor OpenTelemetry distro, Grafana Alloy, ...).

use std::path::PathBuf;
use std::time::Duration;

use reqwest::Url;
use serde::Deserialize;

use super::Validator;

/// The validated `[telemetry]` section.
#[derive(Debug, Clone, Default)]
pub struct TelemetrySettings {
    /// The OTLP export, when `[telemetry.otlp]` is configured.
    pub otlp: Option<OtlpSettings>,
}

/// Where and how often OTLP data goes.
#[derive(Debug, Clone)]
pub struct OtlpSettings {
    /// Spans go to `{endpoint}/v1/traces`, metrics to `{endpoint}/v1/metrics`.
    pub endpoint: Url,
    pub traces: bool,
    pub metrics: bool,
    /// How often metrics are pushed.
    pub metrics_interval: Duration,
    /// How long one export may take before it is abandoned.
    pub timeout: Duration,
    /// `service.name` of the resource.
    pub service_name: String,
    /// Extra trust roots (PEM) for an https endpoint, beside the system bundle.
    pub ca_file: Option<PathBuf>,
    /// Header name → value, read from the environment at start (collector API keys).
    pub headers: Vec<(String, String)>,
}

impl OtlpSettings {
    /// The URL of one signal (`traces` or `metrics`).
    pub fn signal_url(&self, signal: &str) -> String {
        format!(
            "{}/v1/{signal}",
            self.endpoint.as_str().trim_end_matches('/')
        )
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTelemetry {
    #[serde(default)]
    otlp: Option<RawOtlp>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOtlp {
    endpoint: String,
    #[serde(default = "default_true")]
    traces: bool,
    #[serde(default = "default_true")]
    metrics: bool,
    #[serde(default = "default_metrics_interval_ms")]
    metrics_interval_ms: u64,
    #[serde(default = "default_timeout_ms")]
    timeout_ms: u64,
    #[serde(default = "default_service_name")]
    service_name: String,
    #[serde(default)]
    ca_file: Option<PathBuf>,
    /// Header name → the environment variable that holds its value.
    #[serde(default)]
    headers_from_env: std::collections::BTreeMap<String, String>,
}

fn default_true() -> bool {
    true
}
fn default_metrics_interval_ms() -> u64 {
    15_000
}
fn default_timeout_ms() -> u64 {
    10_000
}
fn default_service_name() -> String {
    "isthmus".to_owned()
}

impl Validator<'_> {
    pub(super) fn telemetry(&mut self, raw: RawTelemetry) -> Option<TelemetrySettings> {
        let Some(raw) = raw.otlp else {
            return Some(TelemetrySettings::default());
        };
        let errors_before = self.errors.len();
        let endpoint = match Url::parse(raw.endpoint.trim()) {
            Ok(url)
                if matches!(url.scheme(), "http" | "https")
                    && url.host().is_some()
                    && url.username().is_empty()
                    && url.password().is_none()
                    && url.query().is_none()
                    && url.fragment().is_none() =>
            {
                Some(url)
            }
            Ok(url) => {
                // Named by scheme and host only: what was refused may be credentials or a
                // query that carries a key, and this message reaches the log.
                self.error(
                    "telemetry.otlp.endpoint",
                    format!(
                        "must be an http:// or https:// base URL with a host and no credentials, query or fragment (the collector's OTLP/HTTP port, e.g. http://127.0.0.1:4318), not the URL given for {}://{}",
                        url.scheme(),
                        url.host_str().unwrap_or("no host")
                    ),
                );
                None
            }
            Err(error) => {
                self.error(
                    "telemetry.otlp.endpoint",
                    format!("not a URL ({error}); the value is not repeated here, since it may hold credentials"),
                );
                None
            }
        };
        self.positive(
            "telemetry.otlp.metrics_interval_ms",
            raw.metrics_interval_ms,
        );
        self.positive("telemetry.otlp.timeout_ms", raw.timeout_ms);
        if raw.service_name.trim().is_empty() {
            self.error("telemetry.otlp.service_name", "must not be empty");
        }
        if !raw.traces && !raw.metrics {
            self.error(
                "telemetry.otlp",
                "exports neither traces nor metrics: set one of them, or remove the section",
            );
        }
        let ca_file = raw.ca_file.map(|path| self.resolve(&path));
        if let Some(path) = &ca_file
            && let Err(error) = std::fs::metadata(path)
        {
            self.error(
                "telemetry.otlp.ca_file",
                format!("cannot read {}: {error}", path.display()),
            );
        }
        let mut headers = Vec::new();
        for (name, variable) in raw.headers_from_env {
            let key = format!("telemetry.otlp.headers_from_env.{name}");
            if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                self.error(key, "is not a valid HTTP header name");
                continue;
            }
            match self.environment.var(&variable) {
                Some(value) if http::HeaderValue::from_str(&value).is_ok() => {
                    headers.push((name, value));
                }
                Some(_) => self.error(
                    key,
                    format!("environment variable {variable} is not a valid header value"),
                ),
                None => self.error(key, format!("environment variable {variable} is not set")),
            }
        }
        if self.errors.len() > errors_before {
            return None;
        }
        Some(TelemetrySettings {
            otlp: Some(OtlpSettings {
                endpoint: endpoint?,
                traces: raw.traces,
                metrics: raw.metrics,
                metrics_interval: Duration::from_millis(raw.metrics_interval_ms),
                timeout: Duration::from_millis(raw.timeout_ms),
                service_name: raw.service_name,
                ca_file,
                headers,
            }),
        })
    }
}
