//! `[upstreams.NAME]`: cloud pools of OpenAI-compatible backends (vLLM, KAITO, Ray Serve on
//! AKS, or APIM / Azure OpenAI in front of them), validated like the rest of the file.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::{ConfigError, Validator};
use crate::identity::{self, RawUpstreamAuth, UpstreamAuth};

/// A validated pool.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    pub name: String,
    pub backends: Vec<BackendConfig>,
    /// Client-visible model → upstream model (or Azure deployment).
    pub models: BTreeMap<String, String>,
    pub api: UpstreamApi,
    /// Serve on a local model when no backend can (header `x-isthmus-degraded`).
    pub fallback_to_local: bool,
    /// The pool runs on premises: sensitive content may go there.
    pub on_premises: bool,
    pub tls: UpstreamTls,
    pub protocol: UpstreamProtocol,
    pub connect_timeout: Duration,
    pub first_byte_timeout: Duration,
    pub idle_stream_timeout: Duration,
    /// Requests in flight to one backend at once.
    pub requests_per_backend_max: u32,
    /// Idle connections kept per backend for reuse.
    pub idle_connections_max: usize,
    /// Assign each caller to one backend by a hash of its identity.
    pub sticky: bool,
    pub health: HealthConfig,
    pub circuit: router_policies::CircuitSettings,
    /// The longest `Retry-After` the gateway waits before retrying the same backend.
    pub retry_after_max: Duration,
    pub auth: UpstreamAuth,
    /// Largest non-streamed answer read from a backend.
    pub response_bytes_max: u64,
}

/// The wire form the pool speaks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamApi {
    /// `{base}/v1/chat/completions` with the model in the body.
    OpenAi,
    /// `{base}/openai/deployments/{deployment}/chat/completions?api-version=...`.
    Azure { api_version: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamProtocol {
    /// HTTP/2 where TLS negotiates it, else HTTP/1.1.
    Auto,
    Http1,
    /// HTTP/2 only (over TLS, or prior knowledge on plain connections).
    Http2,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UpstreamTls {
    /// CA bundle that signs the backends' certificates; the system roots when absent.
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key for mTLS.
    pub client_cert: Option<(PathBuf, PathBuf)>,
    /// Server name to send and verify instead of the URL's host.
    pub sni: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendConfig {
    pub name: String,
    pub url: String,
    pub tls: bool,
    pub host: String,
    pub port: u16,
    /// Path prefix of the URL, without a trailing slash (`""` for none).
    pub base_path: String,
    pub weight: u32,
    pub labels: BTreeMap<String, String>,
}

impl BackendConfig {
    /// The `version` label, which `x-isthmus-canary` selects.
    pub fn variant(&self) -> Option<&str> {
        self.labels.get("version").map(String::as_str)
    }

    /// The `Host` a request to it carries: the host (an IPv6 address in brackets), and the
    /// port where it is not the scheme's default.
    pub fn authority(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        let default_port = if self.tls { 443 } else { 80 };
        if self.port == default_port {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthConfig {
    /// Active probes on; passive ejection is always on.
    pub enabled: bool,
    pub path: String,
    pub interval: Duration,
    pub timeout: Duration,
    /// Good probes in a row that make an unhealthy backend healthy.
    pub healthy_threshold: u32,
    /// Failed probes in a row that make a healthy backend unhealthy.
    pub unhealthy_threshold: u32,
}

// ---- Raw form ----

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPool {
    #[serde(default)]
    backends: Vec<RawBackend>,
    #[serde(default)]
    models: BTreeMap<String, String>,
    #[serde(default = "default_api")]
    api: String,
    #[serde(default)]
    api_version: Option<String>,
    #[serde(default)]
    fallback_to_local: bool,
    #[serde(default)]
    on_premises: bool,
    #[serde(default)]
    tls: RawUpstreamTls,
    #[serde(default = "default_protocol")]
    protocol: String,
    #[serde(default = "default_connect_timeout_ms")]
    connect_timeout_ms: u64,
    #[serde(default = "default_first_byte_timeout_ms")]
    first_byte_timeout_ms: u64,
    #[serde(default = "default_idle_stream_timeout_ms")]
    idle_stream_timeout_ms: u64,
    #[serde(default = "default_requests_per_backend_max")]
    requests_per_backend_max: u32,
    #[serde(default = "default_idle_connections_max")]
    idle_connections_max: u32,
    #[serde(default)]
    sticky: bool,
    #[serde(default)]
    health: RawHealth,
    #[serde(default)]
    circuit: RawCircuit,
    #[serde(default = "default_retry_after_max_ms")]
    retry_after_max_ms: u64,
    #[serde(default = "default_response_bytes_max")]
    response_bytes_max: u64,
    #[serde(default)]
    auth: RawUpstreamAuth,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackend {
    url: String,
    #[serde(default)]
    name: Option<String>,
    #[serde(default = "default_weight")]
    weight: u32,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstreamTls {
    #[serde(default)]
    ca_file: Option<PathBuf>,
    #[serde(default)]
    client_cert: Option<PathBuf>,
    #[serde(default)]
    client_key: Option<PathBuf>,
    #[serde(default)]
    sni: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    #[serde(default = "default_true")]
    enabled: bool,
    #[serde(default = "default_health_path")]
    path: String,
    #[serde(default = "default_health_interval_ms")]
    interval_ms: u64,
    #[serde(default = "default_health_timeout_ms")]
    timeout_ms: u64,
    #[serde(default = "default_healthy_threshold")]
    healthy_threshold: u32,
    #[serde(default = "default_unhealthy_threshold")]
    unhealthy_threshold: u32,
}

impl Default for RawHealth {
    fn default() -> Self {
        RawHealth {
            enabled: true,
            path: default_health_path(),
            interval_ms: default_health_interval_ms(),
            timeout_ms: default_health_timeout_ms(),
            healthy_threshold: default_healthy_threshold(),
            unhealthy_threshold: default_unhealthy_threshold(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCircuit {
    #[serde(default = "default_failures_to_open")]
    failures_to_open: u32,
    #[serde(default = "default_open_base_ms")]
    open_base_ms: u64,
    #[serde(default = "default_open_max_ms")]
    open_max_ms: u64,
}

impl Default for RawCircuit {
    fn default() -> Self {
        RawCircuit {
            failures_to_open: default_failures_to_open(),
            open_base_ms: default_open_base_ms(),
            open_max_ms: default_open_max_ms(),
        }
    }
}

fn default_api() -> String {
    "openai".to_owned()
}
fn default_protocol() -> String {
    "auto".to_owned()
}
fn default_connect_timeout_ms() -> u64 {
    2_000
}
fn default_first_byte_timeout_ms() -> u64 {
    120_000
}
fn default_idle_stream_timeout_ms() -> u64 {
    60_000
}
fn default_requests_per_backend_max() -> u32 {
    1_024
}
fn default_idle_connections_max() -> u32 {
    128
}
fn default_weight() -> u32 {
    1
}
fn default_true() -> bool {
    true
}
/// An Azure deployment name or API version: what may stand in a request path unescaped.
fn is_azure_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'.' | b'_' | b'-'))
        && name != "."
        && name != ".."
}

fn default_health_path() -> String {
    "/health".to_owned()
}
fn default_health_interval_ms() -> u64 {
    5_000
}
fn default_health_timeout_ms() -> u64 {
    2_000
}
fn default_healthy_threshold() -> u32 {
    2
}
fn default_unhealthy_threshold() -> u32 {
    3
}
fn default_failures_to_open() -> u32 {
    3
}
fn default_open_base_ms() -> u64 {
    5_000
}
fn default_open_max_ms() -> u64 {
    300_000
}
fn default_retry_after_max_ms() -> u64 {
    2_000
}
fn default_response_bytes_max() -> u64 {
    64 * 1024 * 1024
}

/// Most backends one pool may list.
const BACKENDS_MAX: usize = 256;

impl Validator<'_> {
    pub(super) fn pool(&mut self, name: String, mut raw: RawPool) -> Option<PoolConfig> {
        let key = format!("upstreams.{name}");
        let errors_before = self.errors.len();
        if raw.backends.is_empty() {
            self.error(
                format!("{key}.backends"),
                "at least one backend is needed ([[upstreams.NAME.backends]] with a url)",
            );
        }
        if raw.backends.len() > BACKENDS_MAX {
            self.error(
                format!("{key}.backends"),
                format!("at most {BACKENDS_MAX} backends per pool"),
            );
        }
        let mut backends = Vec::new();
        for (index, backend) in raw.backends.iter().enumerate() {
            if let Some(backend) = self.backend(&format!("{key}.backends[{index}]"), backend) {
                if backends
                    .iter()
                    .any(|other: &BackendConfig| other.name == backend.name)
                {
                    self.error(
                        format!("{key}.backends[{index}].name"),
                        format!("`{}` names two backends of this pool", backend.name),
                    );
                }
                backends.push(backend);
            }
        }
        if !raw.backends.is_empty() && raw.backends.iter().all(|backend| backend.weight == 0) {
            self.error(
                format!("{key}.backends"),
                "every backend has weight 0: the pool could serve nothing",
            );
        }
        if raw.models.is_empty() {
            self.error(
                format!("{key}.models"),
                "map at least one client model to an upstream model (\"gpt-4o\" = \"served-name\")",
            );
        }
        for (client, upstream) in &raw.models {
            if client.is_empty() || upstream.is_empty() {
                self.error(format!("{key}.models"), "model names must not be empty");
            }
        }
        let api = match (raw.api.as_str(), raw.api_version.take()) {
            ("openai", None) => Some(UpstreamApi::OpenAi),
            ("openai", Some(_)) => {
                self.error(
                    format!("{key}.api_version"),
                    "only for api = \"azure\" (the OpenAI wire form has no api-version)",
                );
                None
            }
            ("azure", Some(api_version)) if !api_version.is_empty() => {
                Some(UpstreamApi::Azure { api_version })
            }
            ("azure", _) => {
                self.error(
                    format!("{key}.api_version"),
                    "required for api = \"azure\" (e.g. \"2024-10-21\")",
                );
                None
            }
            (other, _) => {
                self.error(
                    format!("{key}.api"),
                    format!("`{other}` is not an upstream API (expected openai or azure)"),
                );
                None
            }
        };
        if let Some(UpstreamApi::Azure { api_version }) = &api {
            // Deployment names and the version go into the request path as they are.
            for (client, upstream) in &raw.models {
                if !upstream.is_empty() && !is_azure_name(upstream) {
                    self.error(
                        format!("{key}.models.{client}"),
                        format!(
                            "`{upstream}` is not an Azure deployment name (letters, digits, \
                             `.`, `_` and `-`)"
                        ),
                    );
                }
            }
            if !is_azure_name(api_version) {
                self.error(
                    format!("{key}.api_version"),
                    format!("`{api_version}` is not an API version (e.g. \"2024-10-21\")"),
                );
            }
        }
        let protocol = match raw.protocol.as_str() {
            "auto" => Some(UpstreamProtocol::Auto),
            "http1" => Some(UpstreamProtocol::Http1),
            "http2" => Some(UpstreamProtocol::Http2),
            other => {
                self.error(
                    format!("{key}.protocol"),
                    format!("`{other}` is not a protocol (expected auto, http1 or http2)"),
                );
                None
            }
        };
        let tls = self.upstream_tls(&key, &raw.tls);
        for (field, value) in [
            ("connect_timeout_ms", raw.connect_timeout_ms),
            ("first_byte_timeout_ms", raw.first_byte_timeout_ms),
            ("idle_stream_timeout_ms", raw.idle_stream_timeout_ms),
            (
                "requests_per_backend_max",
                u64::from(raw.requests_per_backend_max),
            ),
            ("response_bytes_max", raw.response_bytes_max),
            ("health.interval_ms", raw.health.interval_ms),
            ("health.timeout_ms", raw.health.timeout_ms),
            (
                "health.healthy_threshold",
                u64::from(raw.health.healthy_threshold),
            ),
            (
                "health.unhealthy_threshold",
                u64::from(raw.health.unhealthy_threshold),
            ),
            (
                "circuit.failures_to_open",
                u64::from(raw.circuit.failures_to_open),
            ),
            ("circuit.open_base_ms", raw.circuit.open_base_ms),
        ] {
            self.positive(&format!("{key}.{field}"), value);
        }
        if raw.circuit.open_max_ms < raw.circuit.open_base_ms {
            self.error(
                format!("{key}.circuit.open_max_ms"),
                "must be at least circuit.open_base_ms",
            );
        }
        if !raw.health.path.starts_with('/') {
            self.error(format!("{key}.health.path"), "must start with /");
        } else if !raw
            .health
            .path
            .bytes()
            .all(|byte| byte.is_ascii_graphic() && byte != b'#')
        {
            self.error(
                format!("{key}.health.path"),
                "must be a path and query of visible ASCII characters, without spaces or `#` \
                 (percent-encode others)",
            );
        }
        raw.auth.resolve_paths(self.base_dir);
        let environment = self.environment;
        let auth = match identity::compile(raw.auth, &format!("{key}.auth"), &|name| {
            environment.var(name)
        }) {
            Ok(auth) => Some(auth),
            Err(errors) => {
                for error in errors {
                    let (path, message) = error
                        .split_once(": ")
                        .map_or((key.clone(), error.clone()), |(path, message)| {
                            (path.to_owned(), message.to_owned())
                        });
                    self.errors.push(ConfigError::new(path, message));
                }
                None
            }
        };
        if self.errors.len() > errors_before {
            return None;
        }
        Some(PoolConfig {
            name,
            backends,
            models: raw.models,
            api: api?,
            fallback_to_local: raw.fallback_to_local,
            on_premises: raw.on_premises,
            tls: tls?,
            protocol: protocol?,
            connect_timeout: Duration::from_millis(raw.connect_timeout_ms),
            first_byte_timeout: Duration::from_millis(raw.first_byte_timeout_ms),
            idle_stream_timeout: Duration::from_millis(raw.idle_stream_timeout_ms),
            requests_per_backend_max: raw.requests_per_backend_max,
            idle_connections_max: raw.idle_connections_max as usize,
            sticky: raw.sticky,
            health: HealthConfig {
                enabled: raw.health.enabled,
                path: raw.health.path,
                interval: Duration::from_millis(raw.health.interval_ms),
                timeout: Duration::from_millis(raw.health.timeout_ms),
                healthy_threshold: raw.health.healthy_threshold,
                unhealthy_threshold: raw.health.unhealthy_threshold,
            },
            circuit: router_policies::CircuitSettings {
                failures_to_open: raw.circuit.failures_to_open,
                open_base_ms: raw.circuit.open_base_ms,
                open_max_ms: raw.circuit.open_max_ms,
            },
            retry_after_max: Duration::from_millis(raw.retry_after_max_ms),
            auth: auth?,
            response_bytes_max: raw.response_bytes_max,
        })
    }

    fn backend(&mut self, key: &str, raw: &RawBackend) -> Option<BackendConfig> {
        let uri: http::Uri = match raw.url.parse() {
            Ok(uri) => uri,
            Err(error) => {
                self.error(
                    format!("{key}.url"),
                    format!("`{}` is not a URL: {error}", raw.url),
                );
                return None;
            }
        };
        let tls = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => {
                self.error(
                    format!("{key}.url"),
                    format!("`{}` must start with https:// or http://", raw.url),
                );
                return None;
            }
        };
        let Some(host) = uri.host().filter(|host| !host.is_empty()) else {
            self.error(format!("{key}.url"), format!("`{}` has no host", raw.url));
            return None;
        };
        if uri.query().is_some() {
            self.error(
                format!("{key}.url"),
                "must not carry a query (the gateway adds the API's path and query)",
            );
        }
        if uri
            .authority()
            .is_some_and(|authority| authority.as_str().contains('@'))
        {
            self.error(
                format!("{key}.url"),
                "must not carry credentials (`user:password@`): they would not be sent, and \
                 the URL is shown in the admin API; give them in the pool's `auth` settings",
            );
        }
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let base_path = uri.path().trim_end_matches('/').to_owned();
        Some(BackendConfig {
            name: raw.name.clone().unwrap_or_else(|| format!("{host}:{port}")),
            url: raw.url.clone(),
            tls,
            host,
            port,
            base_path,
            weight: raw.weight,
            labels: raw.labels.clone(),
        })
    }

    fn upstream_tls(&mut self, key: &str, raw: &RawUpstreamTls) -> Option<UpstreamTls> {
        let ca_file = raw.ca_file.as_ref().map(|file| self.resolve(file));
        let mut valid = true;
        if let Some(file) = &ca_file {
            valid &= self.readable_file(&format!("{key}.tls.ca_file"), file);
        }
        let client_cert = match (&raw.client_cert, &raw.client_key) {
            (Some(cert), Some(key_file)) => {
                let cert = self.resolve(cert);
                let key_file = self.resolve(key_file);
                valid &= self.readable_file(&format!("{key}.tls.client_cert"), &cert);
                valid &= self.readable_file(&format!("{key}.tls.client_key"), &key_file);
                Some((cert, key_file))
            }
            (None, None) => None,
            (Some(_), None) => {
                self.error(
                    format!("{key}.tls.client_key"),
                    "must be set when tls.client_cert is",
                );
                valid = false;
                None
            }
            (None, Some(_)) => {
                self.error(
                    format!("{key}.tls.client_cert"),
                    "must be set when tls.client_key is",
                );
                valid = false;
                None
            }
        };
        if valid
            && let Err(message) =
                crate::cloud::check_tls_files(ca_file.as_deref(), client_cert.as_ref())
        {
            self.error(format!("{key}.tls"), message);
            valid = false;
        }
        valid.then(|| UpstreamTls {
            ca_file,
            client_cert,
            sni: raw.sni.clone(),
        })
    }
}
