//! The configuration file: one TOML document, read into `Raw*` structs that mirror it, then
//! validated into [`Config`].
//!
//! Every problem is reported, not only the first, each with the key path it concerns
//! (`models.smollm2.path: file not found: ...`): each top-level section and each model is
//! deserialized on its own, so a typo in one does not hide mistakes in another, and semantic
//! checks run over everything that did parse. Relative paths are taken relative to the
//! directory of the configuration file, so a configuration means the same wherever the
//! gateway is started from.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};

mod audit;
mod cors;
pub mod edit;
mod responses;
mod rules;
mod telemetry;
mod upstreams;
mod waf;
pub use audit::AuditSettings;
pub use cors::CorsConfig;
pub use responses::{ResponsesConfig, StoreKey};
pub use rules::PolicyConfig;
pub use telemetry::{OtlpSettings, TelemetrySettings};
pub use upstreams::{
    BackendConfig, HealthConfig, PoolConfig, UpstreamApi, UpstreamProtocol, UpstreamTls,
};

/// Bytes at the start of every GGUF file.
const GGUF_MAGIC: &[u8; 4] = b"GGUF";

/// One problem in a configuration, with the key it concerns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Dotted key path (`server.limits.body_bytes_max`), or the file for whole-file problems.
    pub path: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

impl ConfigError {
    fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            path: path.into(),
            message: message.into(),
        }
    }
}

/// The largest `server.limits.header_bytes_max`: 1 MiB less one byte, the HTTP/1 parser's
/// own cap on a request header.
const HEADER_BYTES_MAX_LIMIT: u64 = 1_048_575;

/// The largest `server.limits.body_bytes_max`: a body is held in memory whole (and may be
/// held twice while it is rewritten), so a larger cap means "unlimited", which this is not.
const BODY_BYTES_MAX_LIMIT: u64 = 1 << 30;

/// The KV cells (and, with one cache per sequence, the host-memory prefix-cache tokens) a
/// model's lanes take, as llama.cpp sizes each lane's context: its cells padded to a multiple
/// of 256, and with one cache per sequence each sequence's share padded again.
fn kv_cells(raw: &RawModel, prefix_cache_tokens: u64) -> u64 {
    const PAD: u64 = 256;
    let pad = |cells: u64| cells.div_ceil(PAD).saturating_mul(PAD);
    let lanes = u64::from(raw.lanes.unwrap_or(1).max(1));
    let lane_sequences = (u64::from(raw.parallel_sequences) / lanes).max(1);
    let lane_cache = prefix_cache_tokens / lanes;
    let lane_context = u64::from(raw.context_tokens).saturating_mul(lane_sequences);
    let lane_cells = if raw.kv_unified {
        pad(lane_context.saturating_add(lane_cache))
    } else {
        pad(pad(lane_context) / lane_sequences)
            .saturating_mul(lane_sequences)
            .saturating_add(lane_cache)
    };
    lane_cells.saturating_mul(lanes)
}

/// The most sequences one llama.cpp context holds (`LLAMA_MAX_SEQ`): running sequences, and
/// with a unified KV cache the parked prefixes too.
const SEQUENCES_MAX: u32 = 256;

/// The longest `server.limits.keepalive_timeout_ms`: an idle connection holds one of
/// `connections_max`.
const KEEPALIVE_TIMEOUT_MAX_MS: u64 = 3_600_000;

/// Whether two listeners could not both be bound: the same port (not 0, which picks a free
/// one) on the same address, or where one of them is a wildcard that covers the other: the
/// IPv4 wildcard covers every IPv4 address, the IPv6 one every address (dual stack).
fn overlaps(first: SocketAddr, second: SocketAddr) -> bool {
    let covers = |wildcard: SocketAddr, other: SocketAddr| {
        wildcard.ip().is_unspecified() && (wildcard.is_ipv6() || other.is_ipv4())
    };
    first.port() != 0
        && first.port() == second.port()
        && (first.ip() == second.ip() || covers(first, second) || covers(second, first))
}

/// The fewest characters an API key or admin token read from the environment or a file may
/// have: nothing slows a caller that guesses keys but their length. (A `sha256` entry's key
/// cannot be checked.)
const KEY_CHARACTERS_MIN: usize = 16;

/// What is wrong with a key shorter than [`KEY_CHARACTERS_MIN`], without the key.
fn short_key(secret: &str) -> String {
    format!(
        "a key of {} characters; keys need at least {KEY_CHARACTERS_MIN} (e.g. `openssl rand -hex 24`)",
        secret.trim().chars().count()
    )
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it was read from.
    pub source: PathBuf,
    /// SHA-256 of the file's text: the policy hash audit records carry.
    pub digest: String,
    pub server: ServerConfig,
    pub auth: AuthConfig,
    pub models: Vec<ModelConfig>,
    pub upstreams: Vec<PoolConfig>,
    pub routing: RoutingConfig,
    pub policy: PolicyConfig,
    pub audit: AuditSettings,
    pub telemetry: TelemetrySettings,
    pub engine: EngineConfig,
    pub logging: LoggingConfig,
    /// Stored responses of the Responses API (`[responses]`).
    pub responses: ResponsesConfig,
    /// Browser origins allowed to call the data plane (`[cors]`).
    pub cors: CorsConfig,
    /// The web application firewall (`[waf]`).
    pub waf: std::sync::Arc<router_policies::waf::Waf>,
    /// Listen addresses given on the command line in place of the file's; a reload puts
    /// them in force again over the file it reads.
    pub listen_overrides: ListenOverrides,
    /// The file's `[models]` differ from the models loaded at start-up, which `models`
    /// holds instead (set by a reload: models load only at start-up).
    pub models_awaiting_restart: bool,
}

/// `isthmus serve --listen / --admin-listen`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ListenOverrides {
    pub listen: Option<SocketAddr>,
    pub admin_listen: Option<SocketAddr>,
}

impl Config {
    /// Puts `overrides` in place of the file's addresses and checks them as the file's are
    /// checked (an admin listener off loopback needs tokens).
    pub fn override_listen(&mut self, overrides: ListenOverrides) -> Result<(), ConfigError> {
        if let Some(listen) = overrides.listen {
            self.server.listen = listen;
        }
        if let Some(admin_listen) = overrides.admin_listen {
            self.server.admin_listen = admin_listen;
            if let Some(message) = admin_exposure(admin_listen, &self.server.admin_tokens) {
                return Err(ConfigError::new(
                    "server.admin_tokens",
                    format!("{message} (--admin-listen)"),
                ));
            }
        }
        self.listen_overrides = overrides;
        Ok(())
    }
}

/// Why an admin listener on `address` cannot go without tokens, if it cannot.
fn admin_exposure(address: SocketAddr, admin_tokens: &[ApiKey]) -> Option<String> {
    (!address.ip().is_loopback() && admin_tokens.is_empty()).then(|| {
        format!(
            "required when server.admin_listen ({address}) is not a loopback address: the admin API and /metrics need a token there (and are served over TLS)"
        )
    })
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// HTTPS data plane.
    pub listen: SocketAddr,
    /// Plain-HTTP admin listener (health, readiness, metrics, admin API).
    pub admin_listen: SocketAddr,
    /// Optional plain-HTTP data plane; off unless configured.
    pub plain_listen: Option<SocketAddr>,
    pub state_dir: PathBuf,
    /// Threads serving connections; `None` uses the number of CPUs.
    pub worker_threads: Option<usize>,
    /// How long in-flight requests may run after SIGTERM before the process exits anyway.
    pub drain_timeout: Duration,
    /// How often the configuration file is read to reload it when its text changed; `None`
    /// reloads only on SIGHUP and through the admin API.
    pub config_watch_interval: Option<Duration>,
    pub tls: TlsConfig,
    pub limits: Limits,
    /// Bearer tokens the admin listener requires (always when it is not on loopback, where
    /// it also serves TLS).
    pub admin_tokens: Vec<ApiKey>,
    /// Proxies whose forwarding header entries are believed (`crate::client_address`).
    pub trusted_proxies: Vec<crate::client_address::AddressBlock>,
    /// Which header they append the client to.
    pub forwarded_header: crate::client_address::ForwardedHeader,
}

#[derive(Debug, Clone)]
pub struct TlsConfig {
    /// Certificate chain and key files; `None` provisions a local CA and certificate in the
    /// state directory on first start.
    pub files: Option<TlsFiles>,
    /// How often the files are checked for changes (SIGHUP reloads at once).
    pub reload_interval: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Limits on what one client may cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub body_bytes_max: u64,
    pub header_bytes_max: u64,
    /// From connection (or end of the previous response) to a complete request header.
    pub header_read_timeout: Duration,
    /// Longest pause while reading a request body; with a second per 64 KiB of the body,
    /// the longest the whole body may take.
    pub body_read_timeout: Duration,
    /// Longest wait of an idle kept-alive connection for its next request (whole seconds:
    /// HTTP/1 keep-alive counts in them).
    pub keepalive_timeout: Duration,
    /// Longest wait for one write of a response to a client (one that stopped reading
    /// holds its connection, a stream and a backend's connection no longer than this).
    pub response_write_timeout: Duration,
    pub connections_max: u32,
    /// Longest wait for the first token of a local generation (queueing included).
    pub first_token_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct AuthConfig {
    /// Serve callers that present no key. Off unless configured.
    pub allow_anonymous: bool,
    pub api_keys: Vec<ApiKey>,
    /// What every caller without a key may use, together (`anonymous_limits`).
    pub anonymous_limits: RateLimits,
    /// `anonymous_limits.per_client`: each anonymous client (by address) has those limits
    /// to itself instead of sharing them.
    pub anonymous_limits_per_client: bool,
    /// With `per_client`: how many leading bits of an IPv6 address name one client (64 by
    /// default: a host is given a whole /64 and could send from any address of it; 128 on a
    /// network where many hosts share one /64 and do not pick their addresses).
    pub anonymous_ipv6_prefix_length: u8,
}

impl AuthConfig {
    /// The limits of the key with `id`, or the anonymous callers' for `None`.
    pub fn limits_of(&self, key_id: Option<&str>) -> RateLimits {
        match key_id {
            None => self.anonymous_limits,
            Some(id) => self
                .api_keys
                .iter()
                .find(|key| key.id == id)
                .map(|key| key.limits)
                .unwrap_or_default(),
        }
    }
}

/// What a caller may use per minute; `None` is unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RateLimits {
    pub requests_per_minute: Option<u32>,
    /// Prompt plus completion tokens of answered requests.
    pub tokens_per_minute: Option<u64>,
    /// Prompt plus completion tokens per UTC day, kept across restarts.
    pub tokens_per_day: Option<u64>,
}

impl RateLimits {
    pub fn is_limited(&self) -> bool {
        self.requests_per_minute.is_some()
            || self.tokens_per_minute.is_some()
            || self.tokens_per_day.is_some()
    }
}

/// An API key, kept only as its SHA-256 digest.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey {
    /// Names the key in logs and audit records; never the key itself.
    pub id: String,
    pub sha256: [u8; 32],
    pub limits: RateLimits,
    /// The file the key was read from (`key_file`), which the configuration watcher also
    /// reads: a rotated key takes effect without a signal.
    pub file: Option<PathBuf>,
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiKey")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelConfig {
    pub name: String,
    pub path: PathBuf,
    pub aliases: Vec<String>,
    pub context_tokens: u32,
    pub parallel_sequences: u32,
    pub batch_tokens: u32,
    pub prefill_chunk_tokens: u32,
    /// `None` takes the hardware probe's default.
    pub threads: Option<u32>,
    pub gpu_layers: u32,
    pub queue_depth_max: u32,
    pub queue_timeout: Duration,
    /// One KV cache for all sequences (prefixes stored once and shared) instead of one per
    /// sequence (prefixes copied through host memory).
    pub kv_unified: bool,
    /// How the KV cache stores keys and values.
    pub kv_cache_type: edge_runtime::KvCacheType,
    pub prefix_cache_entries: u32,
    pub prefix_cache_tokens_max: u32,
    /// One cache per sequence: park finished sequences only while the worker idles.
    pub park_prefixes_when_idle: bool,
    /// Send a step's tokens while the device computes the next step.
    pub overlap_token_delivery: bool,
    /// llama.cpp contexts the sequences are split over, each on its own worker thread.
    pub lanes: u32,
    /// KV cache memory this model may take; `None` uses the memory available at start.
    pub kv_memory_bytes_max: Option<u64>,
    /// The KV cache this configuration needs, computed from the GGUF metadata.
    pub kv_plan: KvPlan,
    /// `chat_template_file`'s Jinja text, which renders chat messages instead of the
    /// template in the GGUF.
    pub chat_template: Option<String>,
}

/// How large a model's KV cache will be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvPlan {
    pub cells: u64,
    pub bytes_per_token: u64,
    pub bytes: u64,
}

impl ModelConfig {
    /// The KV plan in words, as `check-config` prints it.
    pub fn kv_summary(&self) -> String {
        let prefix_cells = self
            .kv_plan
            .cells
            .saturating_sub(u64::from(self.context_tokens) * u64::from(self.parallel_sequences));
        format!(
            "model {}: KV cache {} sequences x {} tokens + {} prefix-cache tokens = {} cells x {} \
             bytes ({}) = {}",
            self.name,
            self.parallel_sequences,
            self.context_tokens,
            prefix_cells,
            self.kv_plan.cells,
            self.kv_plan.bytes_per_token,
            self.kv_cache_type.name(),
            mebibytes(self.kv_plan.bytes),
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutingConfig {
    pub default_model: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineConfig {
    pub backends_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggingConfig {
    pub format: LogFormat,
    /// A `tracing` filter directive, e.g. `info` or `info,gateway=debug`.
    pub level: String,
}

// ---- Raw form: mirrors the TOML file ----

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    #[serde(default = "default_listen")]
    listen: String,
    #[serde(default = "default_admin_listen")]
    admin_listen: String,
    #[serde(default)]
    plain_listen: Option<String>,
    #[serde(default = "default_state_dir")]
    state_dir: PathBuf,
    #[serde(default)]
    worker_threads: Option<u32>,
    #[serde(default = "default_drain_timeout_ms")]
    drain_timeout_ms: u64,
    #[serde(default)]
    config_watch_interval_ms: u64,
    #[serde(default)]
    tls: RawTls,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    admin_tokens: Vec<RawApiKey>,
    #[serde(default)]
    trusted_proxies: Vec<String>,
    forwarded_header: Option<String>,
}

impl Default for RawServer {
    fn default() -> Self {
        RawServer {
            listen: default_listen(),
            admin_listen: default_admin_listen(),
            plain_listen: None,
            state_dir: default_state_dir(),
            worker_threads: None,
            drain_timeout_ms: default_drain_timeout_ms(),
            config_watch_interval_ms: 0,
            tls: RawTls::default(),
            limits: RawLimits::default(),
            admin_tokens: Vec::new(),
            trusted_proxies: Vec::new(),
            forwarded_header: None,
        }
    }
}

fn default_listen() -> String {
    "127.0.0.1:8443".to_owned()
}
fn default_admin_listen() -> String {
    "127.0.0.1:9090".to_owned()
}
fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/isthmus")
}
/// Reading the file more often than this buys nothing: edits and ConfigMap updates take
/// longer to land than that.
const CONFIG_WATCH_INTERVAL_MIN_MS: u64 = 100;

fn default_drain_timeout_ms() -> u64 {
    30_000
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    #[serde(default)]
    cert: Option<PathBuf>,
    #[serde(default)]
    key: Option<PathBuf>,
    #[serde(default = "default_reload_interval_ms")]
    reload_interval_ms: u64,
}

impl Default for RawTls {
    fn default() -> Self {
        RawTls {
            cert: None,
            key: None,
            reload_interval_ms: default_reload_interval_ms(),
        }
    }
}

fn default_reload_interval_ms() -> u64 {
    5_000
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawLimits {
    body_bytes_max: u64,
    header_bytes_max: u64,
    header_read_timeout_ms: u64,
    body_read_timeout_ms: u64,
    keepalive_timeout_ms: u64,
    response_write_timeout_ms: u64,
    connections_max: u32,
    first_token_timeout_ms: u64,
}

impl Default for RawLimits {
    fn default() -> Self {
        RawLimits {
            body_bytes_max: 8 * 1024 * 1024,
            header_bytes_max: 64 * 1024,
            header_read_timeout_ms: 10_000,
            body_read_timeout_ms: 30_000,
            keepalive_timeout_ms: 60_000,
            response_write_timeout_ms: 60_000,
            connections_max: 1_024,
            first_token_timeout_ms: 120_000,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAuth {
    #[serde(default)]
    allow_anonymous: bool,
    #[serde(default)]
    api_keys: Vec<RawApiKey>,
    #[serde(default)]
    anonymous_limits: RawRateLimits,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRateLimits {
    #[serde(default)]
    requests_per_minute: Option<u32>,
    #[serde(default)]
    tokens_per_minute: Option<u64>,
    #[serde(default)]
    tokens_per_day: Option<u64>,
    /// Anonymous callers only: per client address instead of together.
    #[serde(default)]
    per_client: bool,
    /// With `per_client`: the leading bits of an IPv6 address that name one client.
    #[serde(default)]
    ipv6_prefix_length: Option<u8>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApiKey {
    id: String,
    #[serde(default)]
    sha256: Option<String>,
    #[serde(default)]
    key_env: Option<String>,
    #[serde(default)]
    key_file: Option<PathBuf>,
    #[serde(default)]
    requests_per_minute: Option<u32>,
    #[serde(default)]
    tokens_per_minute: Option<u64>,
    #[serde(default)]
    tokens_per_day: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    path: PathBuf,
    #[serde(default)]
    aliases: Vec<String>,
    #[serde(default = "default_context_tokens")]
    context_tokens: u32,
    #[serde(default = "default_parallel_sequences")]
    parallel_sequences: u32,
    #[serde(default = "default_batch_tokens")]
    batch_tokens: u32,
    #[serde(default)]
    prefill_chunk_tokens: Option<u32>,
    #[serde(default)]
    threads: Option<u32>,
    #[serde(default)]
    gpu_layers: u32,
    #[serde(default = "default_queue_depth_max")]
    queue_depth_max: u32,
    #[serde(default = "default_queue_timeout_ms")]
    queue_timeout_ms: u64,
    #[serde(default = "default_kv_unified")]
    kv_unified: bool,
    #[serde(default)]
    kv_cache_type: Option<String>,
    #[serde(default)]
    prefix_cache_entries: Option<u32>,
    #[serde(default)]
    prefix_cache_tokens_max: Option<u32>,
    #[serde(default)]
    park_prefixes_when_idle: Option<bool>,
    #[serde(default)]
    overlap_token_delivery: Option<bool>,
    #[serde(default)]
    lanes: Option<u32>,
    #[serde(default)]
    kv_memory_bytes_max: Option<u64>,
    #[serde(default)]
    chat_template_file: Option<PathBuf>,
}

/// One cache per sequence: measured faster than a unified cache at 4 and 8 concurrent
/// sequences on CPU (ARCHITECTURE.md); prefixes are then reused through host memory.
fn default_kv_unified() -> bool {
    false
}

fn default_context_tokens() -> u32 {
    2_048
}
fn default_parallel_sequences() -> u32 {
    4
}
fn default_batch_tokens() -> u32 {
    512
}
/// Prompt tokens per decode step while others generate. On CPU a step of a few sequences
/// costs about as much as decoding 16 prompt tokens, so 16 keeps their token gaps within
/// about twice the usual; a GPU absorbs far larger chunks in the same time.
const PREFILL_CHUNK_TOKENS_CPU: u32 = 16;
/// Hugging Face's largest chat templates are tens of kilobytes.
const CHAT_TEMPLATE_BYTES_MAX: u64 = 1 << 20;
const PREFILL_CHUNK_TOKENS_GPU: u32 = 256;

fn default_queue_depth_max() -> u32 {
    64
}
fn default_queue_timeout_ms() -> u64 {
    30_000
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRouting {
    #[serde(default)]
    default_model: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEngine {
    #[serde(default)]
    backends_dir: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLogging {
    #[serde(default = "default_log_format")]
    format: String,
    #[serde(default = "default_log_level")]
    level: String,
}

impl Default for RawLogging {
    fn default() -> Self {
        RawLogging {
            format: default_log_format(),
            level: default_log_level(),
        }
    }
}

fn default_log_format() -> String {
    "text".to_owned()
}
fn default_log_level() -> String {
    "info".to_owned()
}

/// What validation reads from the machine: environment variables (secrets named by the
/// configuration) and free memory (the default KV budget). Tests pass their own.
pub trait Environment {
    fn var(&self, name: &str) -> Option<String>;
    fn memory_available_bytes(&self) -> Option<u64>;
}

/// The process environment and this machine.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessEnvironment;

impl Environment for ProcessEnvironment {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }

    fn memory_available_bytes(&self) -> Option<u64> {
        firmware::probe().memory_available_bytes
    }
}

/// Reads and validates the configuration file at `path`.
pub fn load(path: &Path, environment: &dyn Environment) -> Result<Config, Vec<ConfigError>> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path)
        .map_err(|error| vec![ConfigError::new(&file, format!("cannot read: {error}"))])?;
    parse(&text, path, environment)
}

/// Validates configuration text that was read from `source` (relative paths in it are
/// relative to `source`'s directory).
pub fn parse(
    text: &str,
    source: &Path,
    environment: &dyn Environment,
) -> Result<Config, Vec<ConfigError>> {
    let file = source.display().to_string();
    let mut document: toml::Table = toml::from_str(text).map_err(|error| {
        let message = error.message().to_owned();
        let location = error
            .span()
            .map(|span| {
                let line = text[..span.start].matches('\n').count() + 1;
                format!(" (line {line})")
            })
            .unwrap_or_default();
        vec![ConfigError::new(
            &file,
            format!("invalid TOML{location}: {message}"),
        )]
    })?;
    let base_dir = source
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));

    let mut errors = Vec::new();
    let server: Option<RawServer> = section(&mut document, "server", &mut errors);
    let auth: Option<RawAuth> = section(&mut document, "auth", &mut errors);
    let routing: Option<RawRouting> = section(&mut document, "routing", &mut errors);
    let policy: Option<rules::RawPolicy> = section(&mut document, "policy", &mut errors);
    let audit: Option<audit::RawAudit> = section(&mut document, "audit", &mut errors);
    let telemetry: Option<telemetry::RawTelemetry> =
        section(&mut document, "telemetry", &mut errors);
    let engine: Option<RawEngine> = section(&mut document, "engine", &mut errors);
    let logging: Option<RawLogging> = section(&mut document, "logging", &mut errors);
    let waf: Option<waf::RawWaf> = section(&mut document, "waf", &mut errors);
    let responses: Option<responses::RawResponses> =
        section(&mut document, "responses", &mut errors);
    let cors: Option<cors::RawCors> = section(&mut document, "cors", &mut errors);
    let models = models_section(&mut document, &mut errors);
    let pools = named_section::<upstreams::RawPool>(&mut document, "upstreams", &mut errors);
    for key in document.keys() {
        errors.push(ConfigError::new(
            key.as_str(),
            "unknown section (expected server, auth, models, upstreams, routing, policy, audit, telemetry, engine, logging, responses, waf, cors)",
        ));
    }

    let mut validator = Validator {
        base_dir: &base_dir,
        environment,
        memory_available_bytes: environment.memory_available_bytes(),
        errors,
    };
    let server = server.map(|raw| validator.server(raw));
    let auth = auth.map(|raw| validator.auth(raw));
    let models: Vec<ModelConfig> = models
        .into_iter()
        .filter_map(|(name, raw)| validator.model(name, raw))
        .collect();
    let upstreams: Vec<PoolConfig> = pools
        .into_iter()
        .filter_map(|(name, raw)| validator.pool(name, raw))
        .collect();
    let routing = routing.map(|raw| validator.routing(raw, &models));
    let api_key_ids: Option<Vec<&str>> = match &auth {
        Some(Some(auth)) => Some(auth.api_keys.iter().map(|key| key.id.as_str()).collect()),
        _ => None,
    };
    let policy = policy.map(|raw| validator.policy(raw, api_key_ids.as_deref()));
    let audit = audit.map(|raw| validator.audit(raw));
    let telemetry = telemetry.map(|raw| validator.telemetry(raw));
    let engine = engine.map(|raw| EngineConfig {
        backends_dir: raw.backends_dir.map(|dir| validator.resolve(&dir)),
    });
    let logging = logging.map(|raw| validator.logging(raw));
    let responses = responses.map(|raw| validator.responses(raw));
    let cors = cors.map(|raw| validator.cors(raw));
    let waf = waf.map(|raw| validator.waf(raw, api_key_ids.as_deref()));
    if models.is_empty()
        && upstreams.is_empty()
        && !validator
            .errors
            .iter()
            .any(|error| error.path.starts_with("models") || error.path.starts_with("upstreams"))
    {
        validator.errors.push(ConfigError::new(
            "models",
            "configure at least one local model ([models.NAME]) or cloud pool ([upstreams.NAME])",
        ));
    }
    if let (Some(policy), Some(Some(audit))) = (&policy, &audit) {
        check_content_rules(policy, audit, &mut validator.errors);
    }
    if let Some(Some(server)) = &server {
        let exporter = match &audit {
            Some(Some(audit)) => audit.azure.as_ref(),
            _ => None,
        };
        let secret_files = upstreams
            .iter()
            .map(|pool| (format!("upstreams.{}.auth", pool.name), &pool.auth))
            .chain(exporter.map(|export| ("audit.azure.auth".to_owned(), &export.auth)));
        for (path, auth) in secret_files {
            for (file, _) in auth.secret_files() {
                if in_directory(file, &server.state_dir) {
                    validator.errors.push(ConfigError::new(
                        path.clone(),
                        format!(
                            "{} lies in the state directory {}, which holds the gateway's own keys (audit device key, TLS key); secrets sent to a backend must come from elsewhere",
                            file.display(),
                            server.state_dir.display()
                        ),
                    ));
                }
            }
        }
    }
    for pool in upstreams.iter().filter(|pool| pool.fallback_to_local) {
        if models.is_empty() {
            validator.errors.push(ConfigError::new(
                format!("upstreams.{}.fallback_to_local", pool.name),
                "there is no local model to fall back to",
            ));
        }
    }

    match (
        (server, auth, routing, policy, audit, telemetry),
        (engine, logging, responses, waf, cors),
    ) {
        (
            (
                Some(Some(server)),
                Some(Some(auth)),
                Some(routing),
                Some(policy),
                Some(Some(audit)),
                Some(Some(telemetry)),
            ),
            (Some(engine), Some(Some(logging)), Some(responses), Some(Some(waf)), Some(cors)),
        ) if validator.errors.is_empty() => Ok(Config {
            source: source.to_path_buf(),
            digest: hex::encode(sha256(text)),
            server,
            auth,
            models,
            upstreams,
            routing,
            policy,
            audit,
            telemetry,
            engine,
            logging,
            responses,
            waf,
            cors,
            listen_overrides: ListenOverrides::default(),
            models_awaiting_restart: false,
        }),
        _ => Err(validator.errors),
    }
}

/// Whether `file` (links followed where it exists) lies inside `directory`.
fn in_directory(file: &Path, directory: &Path) -> bool {
    let file = std::fs::canonicalize(file).unwrap_or_else(|_| file.to_path_buf());
    let directory = std::fs::canonicalize(directory).unwrap_or_else(|_| directory.to_path_buf());
    file.starts_with(directory)
}

/// `[audit.content] rules` must name rules that can decide: a `[[policy.rules]]` name or one
/// the policy applies by itself. A misspelt name would silently record nothing.
fn check_content_rules(
    policy: &PolicyConfig,
    audit: &AuditSettings,
    errors: &mut Vec<ConfigError>,
) {
    let Some(content) = &audit.content else {
        return;
    };
    let builtin = [
        router_policies::DEFAULT_RULE,
        router_policies::FAIL_CLOSED_RULE,
        router_policies::SPILLOVER_RULE,
    ];
    for (index, name) in content.rules.iter().enumerate() {
        let known =
            builtin.contains(&name.as_str()) || policy.rules.iter().any(|rule| &rule.name == name);
        if !known && !name.trim().is_empty() {
            errors.push(ConfigError::new(
                format!("audit.content.rules[{index}]"),
                format!(
                    "no policy rule is named `{name}` (expected a [[policy.rules]] name or {})",
                    builtin.join(", ")
                ),
            ));
        }
    }
}

/// Deserializes the top-level table `name` (absent means all defaults).
fn section<T: DeserializeOwned + Default>(
    document: &mut toml::Table,
    name: &str,
    errors: &mut Vec<ConfigError>,
) -> Option<T> {
    match document.remove(name) {
        None => Some(T::default()),
        Some(value) => deserialize(value, name, errors),
    }
}

fn deserialize<T: DeserializeOwned>(
    value: toml::Value,
    prefix: &str,
    errors: &mut Vec<ConfigError>,
) -> Option<T> {
    match serde_path_to_error::deserialize::<_, T>(value) {
        Ok(parsed) => Some(parsed),
        Err(error) => {
            let inner = error.path().to_string();
            let path = if inner == "." || inner.is_empty() {
                prefix.to_owned()
            } else {
                format!("{prefix}.{inner}")
            };
            errors.push(ConfigError::new(
                path,
                error.into_inner().message().to_owned(),
            ));
            None
        }
    }
}

/// A table of named tables (`[upstreams.NAME]`), each deserialized on its own.
fn named_section<T: DeserializeOwned>(
    document: &mut toml::Table,
    name: &str,
    errors: &mut Vec<ConfigError>,
) -> BTreeMap<String, T> {
    let mut entries = BTreeMap::new();
    let Some(value) = document.remove(name) else {
        return entries;
    };
    let toml::Value::Table(table) = value else {
        errors.push(ConfigError::new(
            name,
            format!("expected a table of named tables ([{name}.NAME])"),
        ));
        return entries;
    };
    for (entry, value) in table {
        let path = format!("{name}.{entry}");
        if let Some(parsed) = deserialize::<T>(value, &path, errors) {
            entries.insert(entry, parsed);
        }
    }
    entries
}

fn models_section(
    document: &mut toml::Table,
    errors: &mut Vec<ConfigError>,
) -> BTreeMap<String, RawModel> {
    let mut models = BTreeMap::new();
    let Some(value) = document.remove("models") else {
        return models;
    };
    let toml::Value::Table(table) = value else {
        errors.push(ConfigError::new(
            "models",
            "expected a table of models ([models.NAME])",
        ));
        return models;
    };
    for (name, value) in table {
        let path = format!("models.{name}");
        if let Some(model) = deserialize::<RawModel>(value, &path, errors) {
            models.insert(name, model);
        }
    }
    models
}

struct Validator<'a> {
    base_dir: &'a Path,
    environment: &'a dyn Environment,
    /// Memory free for KV caches when no explicit budget is configured.
    memory_available_bytes: Option<u64>,
    errors: Vec<ConfigError>,
}

impl Validator<'_> {
    fn error(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.errors.push(ConfigError::new(path, message));
    }

    fn resolve(&self, path: &Path) -> PathBuf {
        if path.is_absolute() {
            normalize(path)
        } else {
            normalize(&self.base_dir.join(path))
        }
    }

    fn address(&mut self, path: &str, value: &str) -> Option<SocketAddr> {
        match value.parse() {
            Ok(address) => Some(address),
            Err(_) => {
                self.error(
                    path,
                    format!(
                        "`{value}` is not an address of the form IP:PORT (e.g. 127.0.0.1:8443)"
                    ),
                );
                None
            }
        }
    }

    fn positive(&mut self, path: &str, value: u64) {
        if value == 0 {
            self.error(path, "must be greater than 0");
        }
    }

    fn server(&mut self, raw: RawServer) -> Option<ServerConfig> {
        let mut admin_tokens = Vec::new();
        for (index, key) in raw.admin_tokens.into_iter().enumerate() {
            let path = format!("server.admin_tokens[{index}]");
            if key.requests_per_minute.is_some()
                || key.tokens_per_minute.is_some()
                || key.tokens_per_day.is_some()
            {
                self.error(
                    &path,
                    "rate limits are for callers of the data plane (auth.api_keys), not admin tokens",
                );
            }
            if let Some(token) = self.api_key(&path, key) {
                admin_tokens.push(token);
            }
        }
        let mut trusted_proxies = Vec::new();
        for (index, text) in raw.trusted_proxies.iter().enumerate() {
            match crate::client_address::AddressBlock::parse(text) {
                Ok(block) => trusted_proxies.push(block),
                Err(problem) => self.error(format!("server.trusted_proxies[{index}]"), problem),
            }
        }
        let forwarded_header = match raw.forwarded_header.as_deref() {
            None => crate::client_address::ForwardedHeader::default(),
            Some(text) => {
                crate::client_address::ForwardedHeader::parse(text).unwrap_or_else(|problem| {
                    self.error("server.forwarded_header", problem);
                    crate::client_address::ForwardedHeader::default()
                })
            }
        };
        let listen = self.address("server.listen", &raw.listen);
        let admin_listen = self.address("server.admin_listen", &raw.admin_listen);
        // Parsed without returning early, so the checks below still report their errors.
        let plain_listen = raw
            .plain_listen
            .as_ref()
            .map(|value| self.address("server.plain_listen", value));
        let named = [
            ("server.listen", listen),
            ("server.admin_listen", admin_listen),
            ("server.plain_listen", plain_listen.flatten()),
        ];
        for (at, (path, address)) in named.iter().enumerate() {
            let Some(address) = address else { continue };
            if let Some((other, _)) = named[..at]
                .iter()
                .find(|(_, earlier)| earlier.is_some_and(|earlier| overlaps(earlier, *address)))
            {
                self.error(
                    *path,
                    format!(
                        "`{address}` takes the port {other} listens on; give each listener its own"
                    ),
                );
            }
        }
        if raw.worker_threads == Some(0) {
            self.error("server.worker_threads", "must be greater than 0");
        }
        let files = match (&raw.tls.cert, &raw.tls.key) {
            (Some(cert), Some(key)) => {
                let cert = self.resolve(cert);
                let key = self.resolve(key);
                let files = TlsFiles { cert, key };
                if self.readable_file("server.tls.cert", &files.cert)
                    & self.readable_file("server.tls.key", &files.key)
                    && let Err(error) = crate::tls::check(&files)
                {
                    self.error("server.tls", error.to_string());
                }
                Some(files)
            }
            (None, None) => None,
            (Some(_), None) => {
                self.error("server.tls.key", "must be set when server.tls.cert is");
                None
            }
            (None, Some(_)) => {
                self.error("server.tls.cert", "must be set when server.tls.key is");
                None
            }
        };
        self.positive("server.tls.reload_interval_ms", raw.tls.reload_interval_ms);
        if (1..CONFIG_WATCH_INTERVAL_MIN_MS).contains(&raw.config_watch_interval_ms) {
            self.error(
                "server.config_watch_interval_ms",
                format!(
                    "must be 0 (off) or at least {CONFIG_WATCH_INTERVAL_MIN_MS}, not {}",
                    raw.config_watch_interval_ms
                ),
            );
        }
        let limits = &raw.limits;
        if !(1..=BODY_BYTES_MAX_LIMIT).contains(&limits.body_bytes_max) {
            self.error(
                "server.limits.body_bytes_max",
                format!("must be from 1 to {BODY_BYTES_MAX_LIMIT} (1 GiB)"),
            );
        }
        // Above 1 MiB the HTTP/1 parser's own cap would refuse a header first, with a bare
        // 400 instead of the gateway's 431 and its OpenAI error body.
        if !(1_024..=HEADER_BYTES_MAX_LIMIT).contains(&limits.header_bytes_max) {
            self.error(
                "server.limits.header_bytes_max",
                format!("must be from 1024 to {HEADER_BYTES_MAX_LIMIT}"),
            );
        }
        self.positive(
            "server.limits.header_read_timeout_ms",
            limits.header_read_timeout_ms,
        );
        self.positive(
            "server.limits.body_read_timeout_ms",
            limits.body_read_timeout_ms,
        );
        if !(1_000..=KEEPALIVE_TIMEOUT_MAX_MS).contains(&limits.keepalive_timeout_ms) {
            self.error(
                "server.limits.keepalive_timeout_ms",
                format!("must be from 1000 to {KEEPALIVE_TIMEOUT_MAX_MS} (an hour)"),
            );
        } else if limits.keepalive_timeout_ms < limits.header_read_timeout_ms {
            // Pingora applies the keep-alive timeout to each read of a reused connection's
            // next header too: a shorter one would cut a header that is still within its time.
            self.error(
                "server.limits.keepalive_timeout_ms",
                format!(
                    "must be at least header_read_timeout_ms ({})",
                    limits.header_read_timeout_ms
                ),
            );
        }
        self.positive(
            "server.limits.response_write_timeout_ms",
            limits.response_write_timeout_ms,
        );
        self.positive(
            "server.limits.connections_max",
            u64::from(limits.connections_max),
        );
        self.positive(
            "server.limits.first_token_timeout_ms",
            limits.first_token_timeout_ms,
        );
        if let Some(address) = admin_listen
            && let Some(message) = admin_exposure(address, &admin_tokens)
            && !self
                .errors
                .iter()
                .any(|error| error.path.starts_with("server.admin_tokens"))
        {
            self.error("server.admin_tokens", message);
        }
        Some(ServerConfig {
            admin_tokens,
            trusted_proxies,
            forwarded_header,
            listen: listen?,
            admin_listen: admin_listen?,
            plain_listen: match plain_listen {
                Some(address) => Some(address?),
                None => None,
            },
            state_dir: self.resolve(&raw.state_dir),
            worker_threads: raw.worker_threads.map(|threads| threads as usize),
            drain_timeout: Duration::from_millis(raw.drain_timeout_ms),
            config_watch_interval: (raw.config_watch_interval_ms > 0)
                .then(|| Duration::from_millis(raw.config_watch_interval_ms)),
            tls: TlsConfig {
                files,
                reload_interval: Duration::from_millis(raw.tls.reload_interval_ms),
            },
            limits: Limits {
                body_bytes_max: limits.body_bytes_max,
                header_bytes_max: limits.header_bytes_max,
                header_read_timeout: Duration::from_millis(limits.header_read_timeout_ms),
                body_read_timeout: Duration::from_millis(limits.body_read_timeout_ms),
                keepalive_timeout: Duration::from_secs(limits.keepalive_timeout_ms.div_ceil(1_000)),
                response_write_timeout: Duration::from_millis(limits.response_write_timeout_ms),
                connections_max: limits.connections_max,
                first_token_timeout: Duration::from_millis(limits.first_token_timeout_ms),
            },
        })
    }

    fn readable_file(&mut self, path: &str, file: &Path) -> bool {
        match std::fs::File::open(file) {
            Ok(_) if file.is_file() => true,
            Ok(_) => {
                self.error(path, format!("not a regular file: {}", file.display()));
                false
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                self.error(path, format!("file not found: {}", file.display()));
                false
            }
            Err(error) => {
                self.error(path, format!("cannot read {}: {error}", file.display()));
                false
            }
        }
    }

    /// One key from a digest, an environment variable or a file; errors name `path`.
    fn api_key(&mut self, path: &str, key: RawApiKey) -> Option<ApiKey> {
        let sources = [
            key.sha256.is_some(),
            key.key_env.is_some(),
            key.key_file.is_some(),
        ];
        if sources.iter().filter(|set| **set).count() != 1 {
            self.error(path, "set exactly one of sha256, key_env, key_file");
            return None;
        }
        let digest = if let Some(hex_digest) = &key.sha256 {
            match hex::decode(hex_digest.trim()) {
                Ok(bytes) => <[u8; 32]>::try_from(bytes.as_slice()).ok(),
                Err(_) => None,
            }
            .or_else(|| {
                self.error(
                    format!("{path}.sha256"),
                    "must be 64 hexadecimal digits (the SHA-256 of the key)",
                );
                None
            })
        } else if let Some(name) = &key.key_env {
            match self.environment.var(name) {
                Some(secret)
                    if secret.trim().chars().count() < KEY_CHARACTERS_MIN
                        && !secret.trim().is_empty() =>
                {
                    self.error(
                        format!("{path}.key_env"),
                        format!("environment variable {name} holds {}", short_key(&secret)),
                    );
                    None
                }
                Some(secret) if !secret.trim().is_empty() => Some(sha256(secret.trim())),
                _ => {
                    self.error(
                        format!("{path}.key_env"),
                        format!("environment variable {name} is not set or empty"),
                    );
                    None
                }
            }
        } else if let Some(file) = &key.key_file {
            let file = self.resolve(file);
            match std::fs::read_to_string(&file) {
                Ok(secret)
                    if secret.trim().chars().count() < KEY_CHARACTERS_MIN
                        && !secret.trim().is_empty() =>
                {
                    self.error(
                        format!("{path}.key_file"),
                        format!("{} holds {}", file.display(), short_key(&secret)),
                    );
                    None
                }
                Ok(secret) if !secret.trim().is_empty() => Some(sha256(secret.trim())),
                Ok(_) => {
                    self.error(
                        format!("{path}.key_file"),
                        format!("{} is empty", file.display()),
                    );
                    None
                }
                Err(error) => {
                    self.error(
                        format!("{path}.key_file"),
                        format!("cannot read {}: {error}", file.display()),
                    );
                    None
                }
            }
        } else {
            None
        };
        let limits = self.rate_limits(
            path,
            RawRateLimits {
                requests_per_minute: key.requests_per_minute,
                tokens_per_minute: key.tokens_per_minute,
                tokens_per_day: key.tokens_per_day,
                per_client: false,
                ipv6_prefix_length: None,
            },
        );
        let file = key.key_file.as_deref().map(|file| self.resolve(file));
        digest.map(|sha256| ApiKey {
            id: key.id,
            sha256,
            limits,
            file,
        })
    }

    fn rate_limits(&mut self, path: &str, raw: RawRateLimits) -> RateLimits {
        for (name, zero, what) in [
            (
                "requests_per_minute",
                raw.requests_per_minute == Some(0),
                "limit",
            ),
            (
                "tokens_per_minute",
                raw.tokens_per_minute == Some(0),
                "limit",
            ),
            ("tokens_per_day", raw.tokens_per_day == Some(0), "budget"),
        ] {
            if zero {
                self.error(
                    format!("{path}.{name}"),
                    format!("must be greater than 0 (leave it out for no {what})"),
                );
            }
        }
        RateLimits {
            requests_per_minute: raw.requests_per_minute,
            tokens_per_minute: raw.tokens_per_minute,
            tokens_per_day: raw.tokens_per_day,
        }
    }

    fn auth(&mut self, raw: RawAuth) -> Option<AuthConfig> {
        let mut api_keys = Vec::new();
        for (index, key) in raw.api_keys.into_iter().enumerate() {
            let path = format!("auth.api_keys[{index}]");
            if key.id.trim().is_empty() {
                self.error(format!("{path}.id"), "must not be empty");
            }
            if api_keys.iter().any(|other: &ApiKey| other.id == key.id) {
                self.error(format!("{path}.id"), format!("`{}` is used twice", key.id));
            }
            if let Some(api_key) = self.api_key(&path, key) {
                api_keys.push(api_key);
            }
        }
        if api_keys.is_empty()
            && !raw.allow_anonymous
            && !self.errors.iter().any(|e| e.path.starts_with("auth"))
        {
            self.error(
                "auth",
                "no API keys are configured; add [[auth.api_keys]] or set allow_anonymous = true",
            );
            return None;
        }
        let per_client = raw.anonymous_limits.per_client;
        let ipv6_prefix_length = raw.anonymous_limits.ipv6_prefix_length;
        if let Some(length) = ipv6_prefix_length {
            if !(32..=128).contains(&length) {
                self.error(
                    "auth.anonymous_limits.ipv6_prefix_length",
                    format!("must be from 32 to 128, not {length}"),
                );
            } else if !per_client {
                self.error(
                    "auth.anonymous_limits.ipv6_prefix_length",
                    "applies only with per_client = true",
                );
            }
        }
        let anonymous_limits = self.rate_limits("auth.anonymous_limits", raw.anonymous_limits);
        if anonymous_limits.is_limited() && !raw.allow_anonymous {
            self.error(
                "auth.anonymous_limits",
                "applies only with allow_anonymous = true",
            );
        }
        if per_client && !anonymous_limits.is_limited() {
            self.error(
                "auth.anonymous_limits.per_client",
                "applies only with a limit or budget beside it",
            );
        }
        Some(AuthConfig {
            allow_anonymous: raw.allow_anonymous,
            api_keys,
            anonymous_limits,
            anonymous_limits_per_client: per_client,
            anonymous_ipv6_prefix_length: ipv6_prefix_length.unwrap_or(64),
        })
    }

    fn model(&mut self, name: String, raw: RawModel) -> Option<ModelConfig> {
        let prefix = format!("models.{name}");
        let before = self.errors.len();
        if !is_model_name(&name) {
            self.error(
                &prefix,
                "model names are 1-64 characters of letters, digits, '.', '_', ':' and '-'",
            );
        }
        for (index, alias) in raw.aliases.iter().enumerate() {
            if !is_model_name(alias) {
                self.error(
                    format!("{prefix}.aliases[{index}]"),
                    "aliases are 1-64 characters of letters, digits, '.', '_', ':' and '-'",
                );
            }
        }
        let path = self.resolve(&raw.path);
        if self.readable_file(&format!("{prefix}.path"), &path) && !has_gguf_magic(&path) {
            self.error(
                format!("{prefix}.path"),
                format!("not a GGUF model file: {}", path.display()),
            );
        }
        let chat_template = raw
            .chat_template_file
            .as_deref()
            .and_then(|file| self.chat_template(&format!("{prefix}.chat_template_file"), file));
        if raw.context_tokens < 16 {
            self.error(format!("{prefix}.context_tokens"), "must be at least 16");
        }
        if raw.parallel_sequences == 0 || raw.parallel_sequences > SEQUENCES_MAX {
            self.error(
                format!("{prefix}.parallel_sequences"),
                "must be between 1 and 256",
            );
        }
        if raw.batch_tokens < raw.parallel_sequences.max(1) {
            self.error(
                format!("{prefix}.batch_tokens"),
                "must be at least parallel_sequences (each decode step carries one token per sequence)",
            );
        }
        if raw.prefill_chunk_tokens == Some(0) {
            self.error(
                format!("{prefix}.prefill_chunk_tokens"),
                "must be greater than 0",
            );
        }
        if raw.threads == Some(0) {
            self.error(format!("{prefix}.threads"), "must be greater than 0");
        }
        if raw.queue_depth_max == 0 {
            self.error(
                format!("{prefix}.queue_depth_max"),
                "must be greater than 0",
            );
        }
        self.positive(&format!("{prefix}.queue_timeout_ms"), raw.queue_timeout_ms);
        let lanes = raw.lanes.unwrap_or(1);
        if lanes == 0 || !raw.parallel_sequences.is_multiple_of(lanes) {
            self.error(
                format!("{prefix}.lanes"),
                format!(
                    "must divide parallel_sequences ({}): each lane decodes an equal share",
                    raw.parallel_sequences
                ),
            );
        }
        if raw.kv_unified && raw.park_prefixes_when_idle == Some(true) {
            self.error(
                format!("{prefix}.park_prefixes_when_idle"),
                "applies only with kv_unified = false (a unified cache parks prefixes on the device)",
            );
        }
        let kv_cache_type = match raw.kv_cache_type.as_deref() {
            None => edge_runtime::KvCacheType::default(),
            Some(name) => edge_runtime::KvCacheType::from_name(name).unwrap_or_else(|| {
                let names: Vec<&str> = edge_runtime::KvCacheType::ALL
                    .iter()
                    .map(|kind| kind.name())
                    .collect();
                self.error(
                    format!("{prefix}.kv_cache_type"),
                    format!(
                        "`{name}` is not a KV cache type (expected one of {})",
                        names.join(", ")
                    ),
                );
                edge_runtime::KvCacheType::default()
            }),
        };
        let prefix_cache_entries = raw.prefix_cache_entries.unwrap_or(raw.parallel_sequences);
        let prefix_cache_tokens_max = if prefix_cache_entries > 0 {
            raw.prefix_cache_tokens_max.unwrap_or(raw.context_tokens)
        } else {
            0
        };
        // llama.cpp takes at most 256 sequences in a context; with a unified cache each
        // lane's parked prefixes are sequences of its context beside the running ones.
        let lane_sequences = raw.parallel_sequences / lanes.max(1);
        if prefix_cache_entries > SEQUENCES_MAX {
            self.error(
                format!("{prefix}.prefix_cache_entries"),
                format!("must be at most {SEQUENCES_MAX}"),
            );
        } else if raw.kv_unified
            && prefix_cache_tokens_max > 0
            && lane_sequences + prefix_cache_entries > SEQUENCES_MAX
        {
            self.error(
                format!("{prefix}.prefix_cache_entries"),
                format!(
                    "{prefix_cache_entries} parked prefixes and {lane_sequences} running \
                     sequences per lane exceed the {SEQUENCES_MAX} sequences a context holds \
                     with kv_unified = true (it defaults to parallel_sequences): set it to at \
                     most {}",
                    SEQUENCES_MAX - lane_sequences.min(SEQUENCES_MAX)
                ),
            );
        }
        if self.errors.len() > before {
            return None;
        }
        // Each lane has a prefix cache of this size.
        let prefix_cache_tokens = u64::from(prefix_cache_tokens_max) * u64::from(lanes);
        let kv_plan = self.kv_plan(&prefix, &path, &raw, kv_cache_type, prefix_cache_tokens)?;
        Some(ModelConfig {
            name,
            path,
            aliases: raw.aliases,
            context_tokens: raw.context_tokens,
            parallel_sequences: raw.parallel_sequences,
            batch_tokens: raw.batch_tokens,
            prefill_chunk_tokens: raw.prefill_chunk_tokens.unwrap_or(if raw.gpu_layers > 0 {
                PREFILL_CHUNK_TOKENS_GPU
            } else {
                PREFILL_CHUNK_TOKENS_CPU
            }),
            threads: raw.threads,
            gpu_layers: raw.gpu_layers,
            queue_depth_max: raw.queue_depth_max,
            queue_timeout: Duration::from_millis(raw.queue_timeout_ms),
            kv_unified: raw.kv_unified,
            kv_cache_type,
            prefix_cache_entries,
            prefix_cache_tokens_max,
            // A state copy from the GPU is one synchronous transfer per layer: between steps
            // it cost 12-17% of closed-loop throughput at 32 streams (bench/RESULTS.md).
            park_prefixes_when_idle: raw.park_prefixes_when_idle.unwrap_or(raw.gpu_layers > 0),
            overlap_token_delivery: raw.overlap_token_delivery.unwrap_or(raw.gpu_layers > 0),
            lanes,
            kv_memory_bytes_max: raw.kv_memory_bytes_max,
            kv_plan,
            chat_template,
        })
    }

    /// A chat template file's text, once it compiles and renders a user message.
    fn chat_template(&mut self, path: &str, file: &Path) -> Option<String> {
        let file = self.resolve(file);
        if !self.readable_file(path, &file) {
            return None;
        }
        let size = std::fs::metadata(&file).map_or(0, |metadata| metadata.len());
        if size > CHAT_TEMPLATE_BYTES_MAX {
            self.error(
                path,
                format!(
                    "{} is {size} bytes; a chat template is at most {CHAT_TEMPLATE_BYTES_MAX}",
                    file.display()
                ),
            );
            return None;
        }
        let source = match std::fs::read_to_string(&file) {
            Ok(source) => source,
            Err(error) => {
                self.error(path, format!("cannot read {}: {error}", file.display()));
                return None;
            }
        };
        // The model's start and end tokens are not known before it loads; the template
        // must work without them too.
        let tokens = edge_runtime::template::SpecialTokens::default();
        match edge_runtime::template::ChatTemplate::compile(&source, tokens) {
            Ok(_) => Some(source),
            Err(reason) => {
                self.error(
                    path,
                    format!("{} is not a usable chat template: {reason}", file.display()),
                );
                None
            }
        }
    }

    /// Sizes the KV cache from the model's GGUF metadata and checks it against the model's
    /// trained context and the memory budget.
    fn kv_plan(
        &mut self,
        prefix: &str,
        path: &Path,
        raw: &RawModel,
        kv_cache_type: edge_runtime::KvCacheType,
        prefix_cache_tokens: u64,
    ) -> Option<KvPlan> {
        let shape = match edge_runtime::gguf::read_kv_shape(path) {
            Ok(shape) => shape,
            Err(error) => {
                self.error(
                    format!("{prefix}.path"),
                    format!("{}: {error}", path.display()),
                );
                return None;
            }
        };
        if let Some(trained) = shape.trained_context_tokens
            && u64::from(raw.context_tokens) > trained
        {
            self.error(
                format!("{prefix}.context_tokens"),
                format!(
                    "{} exceeds the {trained} tokens the model was trained with",
                    raw.context_tokens
                ),
            );
            return None;
        }
        let cells = kv_cells(raw, prefix_cache_tokens);
        let (Some(bytes_per_token), Some(bytes)) = (
            shape.kv_bytes(1, kv_cache_type),
            shape.kv_bytes(cells, kv_cache_type),
        ) else {
            self.error(
                format!("{prefix}.kv_cache_type"),
                format!(
                    "{} stores blocks of {} values, which do not divide this model's heads \
                     ({} key and {} value values wide)",
                    kv_cache_type.name(),
                    kv_cache_type.block().0,
                    shape.key_dim,
                    shape.value_dim,
                ),
            );
            return None;
        };
        let plan = KvPlan {
            cells,
            bytes_per_token,
            bytes,
        };
        let model_bytes = std::fs::metadata(path).map_or(0, |metadata| metadata.len());
        let (budget, source) = match raw.kv_memory_bytes_max {
            Some(budget) => (Some(budget), format!("{prefix}.kv_memory_bytes_max")),
            None => (
                self.memory_available_bytes
                    .map(|available| available.saturating_sub(model_bytes)),
                "the memory available now, less the model file".to_owned(),
            ),
        };
        if let Some(budget) = budget
            && plan.bytes > budget
        {
            self.error(
                format!("{prefix}.context_tokens"),
                format!(
                    "the KV cache for {} sequences x {} tokens (+ {} prefix-cache tokens) = {} cells \
                     (as llama.cpp pads them) x {} bytes per token needs {} but the budget is {} \
                     ({source})",
                    raw.parallel_sequences,
                    raw.context_tokens,
                    prefix_cache_tokens,
                    plan.cells,
                    plan.bytes_per_token,
                    mebibytes(plan.bytes),
                    mebibytes(budget),
                ),
            );
            return None;
        }
        Some(plan)
    }

    fn routing(&mut self, raw: RawRouting, models: &[ModelConfig]) -> RoutingConfig {
        // A model whose own section has errors is configured, just not valid: its errors
        // say so already.
        let section = |default: &str| {
            let path = format!("models.{default}");
            self.errors.iter().any(|error| {
                error.path == path
                    || error
                        .path
                        .strip_prefix(path.as_str())
                        .is_some_and(|rest| rest.starts_with('.'))
            })
        };
        if let Some(default) = &raw.default_model
            && !models.iter().any(|model| &model.name == default)
            && !section(default)
        {
            self.error(
                "routing.default_model",
                format!("`{default}` is not a configured model"),
            );
        }
        RoutingConfig {
            default_model: raw.default_model,
        }
    }

    fn logging(&mut self, raw: RawLogging) -> Option<LoggingConfig> {
        let format = match raw.format.as_str() {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                self.error(
                    "logging.format",
                    format!("`{other}` is not a log format (expected text or json)"),
                );
                return None;
            }
        };
        if tracing_subscriber::EnvFilter::try_new(&raw.level).is_err() {
            self.error(
                "logging.level",
                format!(
                    "`{}` is not a log filter (e.g. info, or info,gateway=debug)",
                    raw.level
                ),
            );
            return None;
        }
        Some(LoggingConfig {
            format,
            level: raw.level,
        })
    }
}

/// Removes `.` and resolves `..` lexically, so logs and errors show `state/tls` rather than
/// `deploy/config/../../state/tls`. Symbolic links are left alone.
fn normalize(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir => match out.components().next_back() {
                Some(Component::Normal(_)) => {
                    out.pop();
                }
                // `/..` is `/`.
                Some(Component::RootDir) => {}
                _ => out.push(".."),
            },
            other => out.push(other.as_os_str()),
        }
    }
    if out.as_os_str().is_empty() {
        out.push(".");
    }
    out
}

fn is_model_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || b"._:-".contains(&byte))
}

fn has_gguf_magic(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0_u8; 4];
    std::fs::File::open(path)
        .and_then(|mut file| file.read_exact(&mut magic))
        .is_ok()
        && &magic == GGUF_MAGIC
}

pub(crate) fn mebibytes(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// SHA-256 of an API key, the only form in which keys are kept.
pub fn sha256(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

#[cfg(test)]
mod tests;
