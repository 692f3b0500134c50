//! Carrying out `Decision::Cloud`: the forwarder to a pool of OpenAI-compatible backends.
//!
//! One forwarder on Pingora's pooled upstream connectors (rustls, HTTP/1.1 and HTTP/2), not
//! Pingora's proxy phases: the request body is already read and rewritten (model mapping,
//! `stream_options.include_usage`), so it can be re-sent whole to another backend however
//! large it is. A backend is chosen by `router_policies::choose_backend` from weights, the
//! forced variant, sticky assignment and health; a connect failure, a 5xx or a 429 before any
//! byte reached the client moves the request once to another backend (or, after a short
//! `Retry-After`, to the same one). When no backend can serve, the caller falls back to a
//! local model or answers 503. Answers stream through chunk by chunk; usage is read from the
//! upstream's JSON or its final stream chunk. When the client leaves, the upstream exchange is
//! dropped, which closes the HTTP/1.1 connection or resets the HTTP/2 stream.
//!
//! Health is per backend: active probes (`health.path` every `health.interval_ms`) and a
//! passive circuit breaker (`router_policies::Circuit`) fed by every request's outcome. Both
//! survive a configuration reload for backends with the same pool, name and URL.

use std::collections::HashMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::Path;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant, SystemTime};

use bytes::{Bytes, BytesMut};
use pingora_core::connectors::ConnectorOptions;
use pingora_core::connectors::http::Connector;
use pingora_core::protocols::ALPN;
use pingora_core::protocols::http::client::HttpSession;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_http::RequestHeader;
use pingora_proxy::Session;
use router_policies::{
    Admission, BackendView, BalanceFacts, Circuit, NoBackend, RoundRobin, Trial,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::{BackendConfig, PoolConfig, UpstreamApi, UpstreamProtocol};
use crate::data_plane::{RequestContext, response_header};
use crate::error::GatewayError;

/// How long an idle upstream connection stays in the pool.
const IDLE_CONNECTION_TIMEOUT: Duration = Duration::from_secs(60);
/// Concurrent HTTP/2 streams the gateway opens on one upstream connection.
const H2_STREAMS_MAX: usize = 128;
/// Attempts per request: the first and one retry on another backend.
const ATTEMPTS_MAX: usize = 2;
/// Informational answers (1xx) read before a backend's real answer.
const INFORMATIONAL_ANSWERS_MAX: u32 = 8;
/// Bytes of an error answer read to report it.
const ERROR_BODY_BYTES_MAX: usize = 64 * 1024;
/// Longest server-sent event accepted from a backend (a stream that never ends an event
/// would otherwise grow the buffer without bound).
const SSE_EVENT_BYTES_MAX: usize = 4 * 1024 * 1024;
/// The header that forces a canary variant.
pub const CANARY_HEADER: &str = "x-isthmus-canary";

/// Milliseconds on the process's monotonic clock, as the circuit breakers count time.
fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    u64::try_from(EPOCH.get_or_init(Instant::now).elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// Checks that TLS files load as rustls will need them (Pingora panics on a bad client key).
pub fn check_tls_files(
    ca_file: Option<&Path>,
    client_cert: Option<&(std::path::PathBuf, std::path::PathBuf)>,
) -> Result<(), String> {
    if let Some(file) = ca_file {
        let certificates: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(file)
            .map_err(|error| format!("{}: {error}", file.display()))?
            .collect::<Result<_, _>>()
            .map_err(|error| format!("{}: {error}", file.display()))?;
        if certificates.is_empty() {
            return Err(format!("{}: no PEM certificate in it", file.display()));
        }
    }
    if let Some((cert, key)) = client_cert {
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
            .map_err(|error| format!("{}: {error}", cert.display()))?
            .collect::<Result<_, _>>()
            .map_err(|error| format!("{}: {error}", cert.display()))?;
        if chain.is_empty() {
            return Err(format!("{}: no PEM certificate in it", cert.display()));
        }
        let key_der = PrivateKeyDer::from_pem_file(key)
            .map_err(|error| format!("{}: {error}", key.display()))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|error| error.to_string())?
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_client_auth_cert(chain, key_der)
            .map_err(|error| {
                format!(
                    "client certificate {} and key {} do not go together: {error}",
                    cert.display(),
                    key.display()
                )
            })?;
    }
    Ok(())
}

/// Observed health of one backend; kept across reloads.
#[derive(Debug)]
struct Health {
    circuit: Circuit,
    /// By active probes (true until a probe says otherwise).
    probed_healthy: bool,
    good_probes_in_row: u32,
    bad_probes_in_row: u32,
    /// A 429's `Retry-After`: no requests before this time.
    not_before_ms: u64,
    /// The build of the pool whose probes report here: a reload hands the record to the new
    /// pool's probes, and the old pool's, still alive while its requests finish, stop
    /// writing to it.
    prober: u64,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            circuit: Circuit::default(),
            probed_healthy: true,
            good_probes_in_row: 0,
            bad_probes_in_row: 0,
            not_before_ms: 0,
            prober: 0,
        }
    }
}

/// Numbers each pool built, for [`Health::prober`].
static POOL_BUILDS: AtomicU64 = AtomicU64::new(1);

#[derive(Debug)]
struct Backend {
    config: BackendConfig,
    /// The address its host name resolved to, which its connections go to; `None` while the
    /// name has not resolved since the backend was configured (it then takes no requests and
    /// no probes, and the pools are rebuilt once it resolves).
    address: Option<SocketAddr>,
    /// Why the name did not resolve, when it did not.
    unresolved: Option<String>,
    peer: HttpPeer,
    health: Arc<Mutex<Health>>,
    /// Counters carried across rebuilds of its pool (reloads, moved addresses) like its
    /// health: requests still running on the old build end on them, and the limit on
    /// requests in flight holds across builds.
    counters: Arc<BackendCounters>,
}

#[derive(Debug, Default)]
struct BackendCounters {
    in_flight: AtomicU32,
    requests: AtomicU64,
    /// Connections opened to it (for requests and probes); the rest were reused.
    connections: AtomicU64,
}

/// A pool ready to forward to.
pub struct Pool {
    pub config: PoolConfig,
    connector: Connector,
    backends: Vec<Backend>,
    round_robin: Mutex<RoundRobin>,
    /// This build's number ([`Health::prober`]).
    build: u64,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("name", &self.config.name)
            .field("backends", &self.backends.len())
            .finish_non_exhaustive()
    }
}

/// Every pool of a configuration.
#[derive(Debug, Default)]
pub struct Pools {
    by_name: HashMap<String, Arc<Pool>>,
}

/// A backend's state, for the admin API and tests.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BackendStatus {
    pub pool: String,
    pub backend: String,
    pub url: String,
    pub weight: u32,
    pub variant: Option<String>,
    /// Whether its host name resolved (a backend whose name never did takes no traffic).
    pub resolved: bool,
    pub probed_healthy: bool,
    pub circuit: &'static str,
    pub in_flight: u32,
    pub requests: u64,
    /// Connections opened to it, for requests and probes, since it was configured.
    pub connections: u64,
    /// How much longer it gets no requests because it answered 429 with `Retry-After`.
    pub throttled_ms: u64,
}

impl BackendStatus {
    /// Whether the backend gets traffic now: its probes pass, its circuit is not open and no
    /// `Retry-After` holds it back.
    pub fn takes_traffic(&self) -> bool {
        self.resolved && self.probed_healthy && self.circuit != "open" && self.throttled_ms == 0
    }
}

impl Pools {
    /// Builds the pools of `configs`, keeping the observed health of backends that `previous`
    /// already had (same pool, name and URL). Host names are resolved here.
    pub fn build(configs: &[PoolConfig], previous: Option<&Pools>) -> Result<Pools, Vec<String>> {
        let mut errors = Vec::new();
        let mut by_name = HashMap::new();
        for config in configs {
            match Pool::build(config, previous.and_then(|pools| pools.get(&config.name))) {
                Ok(pool) => {
                    by_name.insert(config.name.clone(), Arc::new(pool));
                }
                Err(pool_errors) => errors.extend(pool_errors),
            }
        }
        if errors.is_empty() {
            Ok(Pools { by_name })
        } else {
            Err(errors)
        }
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Pool>> {
        self.by_name.get(name)
    }

    /// Whether some backend's host name no longer resolves to the address its connections
    /// go to, or resolves now where it did not (a name that does not resolve just now keeps
    /// its address). Blocks.
    pub fn moved(&self) -> bool {
        self.by_name.values().any(|pool| {
            pool.backends.iter().any(|backend| {
                resolve_all(&backend.config.host, backend.config.port).is_ok_and(|addresses| {
                    backend
                        .address
                        .is_none_or(|address| !addresses.contains(&address))
                })
            })
        })
    }

    /// `key: problem` for every backend whose host name did not resolve: it takes no traffic
    /// until it does (checked every [`BACKEND_RESOLVE_INTERVAL`]).
    pub fn unresolved(&self) -> Vec<String> {
        let mut problems: Vec<String> = self
            .by_name
            .values()
            .flat_map(|pool| {
                pool.backends
                    .iter()
                    .enumerate()
                    .filter_map(|(index, backend)| {
                        backend.unresolved.as_ref().map(|message| {
                            format!(
                                "upstreams.{}.backends[{index}].url: {message}",
                                pool.config.name
                            )
                        })
                    })
            })
            .collect();
        problems.sort();
        problems
    }

    /// Puts these pools in charge of their backends' health records (kept across a reload)
    /// and starts their active probes; each stops when its pool is dropped. Called when the
    /// pools come into force, not when they are built (a refused reload changes nothing).
    pub fn start_probes(&self) {
        for pool in self.by_name.values() {
            for backend in &pool.backends {
                let mut health = lock(&backend.health);
                health.prober = pool.build;
                // Without probes, nothing would bring back a backend they had ejected.
                if !pool.config.health.enabled {
                    health.probed_healthy = true;
                    health.good_probes_in_row = 0;
                    health.bad_probes_in_row = 0;
                }
            }
            if pool.config.health.enabled {
                tokio::spawn(probe_loop(Arc::downgrade(pool)));
            }
        }
    }

    /// Each pool and whether any of its backends could take a request now.
    pub fn availability(&self) -> Vec<(String, bool)> {
        let now = now_ms();
        self.by_name
            .iter()
            .map(|(name, pool)| {
                let available = pool.backends.iter().any(|backend| {
                    let health = lock(&backend.health);
                    backend.config.weight > 0
                        && backend.address.is_some()
                        && health.probed_healthy
                        && health.circuit.is_available(now)
                        && health.not_before_ms <= now
                });
                (name.clone(), available)
            })
            .collect()
    }

    pub fn status(&self) -> Vec<BackendStatus> {
        let now = now_ms();
        let mut statuses: Vec<BackendStatus> = self
            .by_name
            .values()
            .flat_map(|pool| {
                pool.backends.iter().map(move |backend| {
                    let health = lock(&backend.health);
                    BackendStatus {
                        pool: pool.config.name.clone(),
                        backend: backend.config.name.clone(),
                        url: backend.config.url.clone(),
                        weight: backend.config.weight,
                        variant: backend.config.variant().map(str::to_owned),
                        resolved: backend.address.is_some(),
                        probed_healthy: health.probed_healthy,
                        circuit: match health.circuit.phase(now) {
                            router_policies::CircuitPhase::Closed => "closed",
                            router_policies::CircuitPhase::Open => "open",
                            router_policies::CircuitPhase::HalfOpen => "half_open",
                        },
                        in_flight: backend.counters.in_flight.load(Ordering::Relaxed),
                        requests: backend.counters.requests.load(Ordering::Relaxed),
                        connections: backend.counters.connections.load(Ordering::Relaxed),
                        throttled_ms: health.not_before_ms.saturating_sub(now),
                    }
                })
            })
            .collect();
        statuses.sort_by(|a, b| (&a.pool, &a.backend).cmp(&(&b.pool, &b.backend)));
        statuses
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Pool {
    /// A session to `backend`: a pooled connection when one is idle, else a new one
    /// (counted). The flag says whether the connection was reused.
    async fn session(&self, backend: &Backend) -> pingora_error::Result<(HttpSession, bool)> {
        let (session, reused) = self.connector.get_http_session(&backend.peer).await?;
        if !reused {
            backend.counters.connections.fetch_add(1, Ordering::Relaxed);
        }
        Ok((session, reused))
    }

    fn build(config: &PoolConfig, previous: Option<&Arc<Pool>>) -> Result<Pool, Vec<String>> {
        let build = POOL_BUILDS.fetch_add(1, Ordering::Relaxed);
        let key = format!("upstreams.{}", config.name);
        let mut errors = Vec::new();
        let mut options = ConnectorOptions::new(config.idle_connections_max.max(1));
        options.ca_file = config
            .tls
            .ca_file
            .as_ref()
            .map(|file| file.display().to_string());
        options.cert_key_file = config
            .tls
            .client_cert
            .as_ref()
            .map(|(cert, key)| (cert.display().to_string(), key.display().to_string()));
        let needs_tls = config.backends.iter().any(|backend| backend.tls);
        if needs_tls && options.ca_file.is_none() && !Path::new(SYSTEM_ROOTS).exists() {
            errors.push(format!(
                "{key}.tls.ca_file: no CA bundle is configured and the system has none at {SYSTEM_ROOTS}"
            ));
        }
        let mut backends = Vec::new();
        for backend in &config.backends {
            // The same backend before this build, if there was one.
            let old = previous.and_then(|pool| {
                pool.backends
                    .iter()
                    .find(|old| old.config.name == backend.name && old.config.url == backend.url)
            });
            let resolved = resolve_all(&backend.host, backend.port);
            let old_address = old.and_then(|old| old.address);
            if let (Err(message), Some(address)) = (&resolved, old_address) {
                tracing::warn!(pool = %config.name, backend = %backend.name, %message, %address, "keeping the backend's address");
            }
            // A name that does not resolve is not an error: an appliance that starts while its
            // uplink or DNS is down must still start and serve locally, and take the backend
            // in once its name resolves.
            let (address, unresolved) = match backend_address(resolved, old_address) {
                Ok(address) => (Some(address), None),
                Err(message) => {
                    tracing::warn!(pool = %config.name, backend = %backend.name, %message, "the backend's host name does not resolve: it takes no traffic until it does");
                    (None, Some(message))
                }
            };
            let sni = config
                .tls
                .sni
                .clone()
                .unwrap_or_else(|| backend.host.clone());
            // Never connected to while `address` is `None`.
            let peer_address = address.unwrap_or_else(|| {
                SocketAddr::new(std::net::Ipv4Addr::UNSPECIFIED.into(), backend.port)
            });
            let mut peer = HttpPeer::new(peer_address, backend.tls, sni);
            peer.options.connection_timeout = Some(config.connect_timeout);
            peer.options.total_connection_timeout = Some(config.connect_timeout);
            peer.options.idle_timeout = Some(IDLE_CONNECTION_TIMEOUT);
            peer.options.verify_cert = true;
            peer.options.verify_hostname = true;
            peer.options.max_h2_streams = H2_STREAMS_MAX;
            peer.options.alpn = match (config.protocol, backend.tls) {
                (UpstreamProtocol::Http1, _) | (UpstreamProtocol::Auto, false) => ALPN::H1,
                (UpstreamProtocol::Http2, _) => ALPN::H2,
                (UpstreamProtocol::Auto, true) => ALPN::H2H1,
            };
            let health = old.map(|old| Arc::clone(&old.health)).unwrap_or_default();
            let counters = old.map(|old| Arc::clone(&old.counters)).unwrap_or_default();
            backends.push(Backend {
                config: backend.clone(),
                address,
                unresolved,
                peer,
                health,
                counters,
            });
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        // The connector reads its CA and client certificate files now; `check-config`
        // already proved they load.
        let connector = Connector::new(Some(options));
        let mut config = config.clone();
        if let Some(previous) = previous {
            config.auth = config.auth.carried_over(&previous.config.auth);
        }
        Ok(Pool {
            config,
            connector,
            backends,
            round_robin: Mutex::new(RoundRobin::default()),
            build,
        })
    }

    /// What the balancer sees of each backend now.
    fn views(&self, now: u64) -> Vec<BackendView<'_>> {
        self.backends
            .iter()
            .map(|backend| {
                let health = lock(&backend.health);
                BackendView {
                    name: &backend.config.name,
                    weight: backend.config.weight,
                    variant: backend.config.variant(),
                    available: backend.address.is_some()
                        && health.probed_healthy
                        && health.circuit.is_available(now)
                        && health.not_before_ms <= now
                        && backend.counters.in_flight.load(Ordering::Relaxed)
                            < self.config.requests_per_backend_max,
                }
            })
            .collect()
    }

    /// Picks a backend for one attempt and admits it through its circuit breaker.
    fn choose(&self, facts: &BalanceFacts<'_>) -> Result<(usize, Option<Trial>), NoBackend> {
        let now = now_ms();
        let mut exclude: Vec<usize> = facts.exclude.to_vec();
        loop {
            let views = self.views(now);
            let attempt_facts = BalanceFacts {
                exclude: &exclude,
                ..*facts
            };
            let index = {
                let mut round_robin = lock(&self.round_robin);
                router_policies::choose_backend(&views, &attempt_facts, &mut round_robin)?
            };
            let admission = lock(&self.backends[index].health).circuit.admit(now);
            match admission {
                Admission::Pass => return Ok((index, None)),
                Admission::Trial(trial) => return Ok((index, Some(trial))),
                // Another request took the half-open trial in between: look elsewhere.
                Admission::Refuse => exclude.push(index),
            }
        }
    }

    /// Whether some backend could take an attempt now: a look-ahead that admits nothing and
    /// leaves the round robin where it was, so that the request that does choose next gets
    /// the turn it would have had.
    fn could_choose(&self, facts: &BalanceFacts<'_>) -> bool {
        let views = self.views(now_ms());
        let mut round_robin = lock(&self.round_robin).clone();
        router_policies::choose_backend(&views, facts, &mut round_robin).is_ok()
    }

    fn record(&self, index: usize, outcome: Outcome, trial: Option<Trial>) {
        let backend = &self.backends[index];
        let mut health = lock(&backend.health);
        let now = now_ms();
        match outcome {
            Outcome::Success => health
                .circuit
                .record(true, trial, now, &self.config.circuit),
            Outcome::Failure => health
                .circuit
                .record(false, trial, now, &self.config.circuit),
            Outcome::Throttled { retry_after } => {
                // A busy backend is not a broken one: no circuit failure, but no traffic
                // until it said to come back, or for as long as the circuit's longest
                // back-off, whichever is shorter (`Retry-After: 86400` from a quota policy
                // must not take a backend out for a day without anything to bring it back).
                let wait = u64::try_from(retry_after.as_millis())
                    .unwrap_or(u64::MAX)
                    .min(self.config.circuit.open_max_ms);
                let until = now.saturating_add(wait);
                health.not_before_ms = health.not_before_ms.max(until);
                if let Some(trial) = trial {
                    health.circuit.abandon_trial(trial);
                }
            }
            Outcome::Abandoned => {
                if let Some(trial) = trial {
                    health.circuit.abandon_trial(trial);
                }
            }
        }
    }

    /// The path and query of an API call on this pool.
    fn path(&self, backend: &BackendConfig, action: CloudAction, upstream_model: &str) -> String {
        let action = action.path();
        match &self.config.api {
            UpstreamApi::OpenAi => format!("{}/v1/{action}", backend.base_path),
            UpstreamApi::Azure { api_version } => format!(
                "{}/openai/deployments/{upstream_model}/{action}?api-version={api_version}",
                backend.base_path
            ),
        }
    }
}

/// A Pingora error as text for the log, audit records and the client: the types and
/// contexts along its chain and the cause at its end (a socket's or TLS's error), except a
/// context that carries bytes read from the peer (`buf: …`, what Pingora quotes of a
/// response it could not parse: a backend's headers, cookies among them, and the start of
/// its answer) or is longer than [`CONTEXT_BYTES_MAX`].
fn without_context(error: &pingora_error::Error) -> String {
    let mut text = String::new();
    let mut next: Option<&pingora_error::Error> = Some(error);
    let mut previous_type: Option<&str> = None;
    while let Some(current) = next {
        let kind = current.etype().as_str();
        if previous_type != Some(kind) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(kind);
        }
        previous_type = Some(kind);
        if let Some(context) = current.context.as_ref().map(|context| context.as_str())
            && !context.starts_with("buf:")
            && context.len() <= CONTEXT_BYTES_MAX
        {
            text.push_str(&format!(" ({context})"));
        }
        next = None;
        if let Some(cause) = current.cause.as_deref() {
            // Pingora keeps a wrapped error of its own boxed.
            match cause
                .downcast_ref::<Box<pingora_error::Error>>()
                .map(|boxed| &**boxed)
                .or_else(|| cause.downcast_ref::<pingora_error::Error>())
            {
                Some(inner) => next = Some(inner),
                None => text.push_str(&format!(": {cause}")),
            }
        }
    }
    text
}

/// The longest context of a Pingora error put into messages (longer ones quote data).
const CONTEXT_BYTES_MAX: usize = 200;

/// The system CA bundle the connector loads when a pool names no CA file.
const SYSTEM_ROOTS: &str = "/etc/ssl/certs/ca-certificates.crt";

/// The address a backend's connections go to, given what its name resolves to now and the
/// address it had before a rebuild: that one while the name still gives it (a name with
/// several addresses in rotating order does not move its connections each time), and while
/// the name does not resolve just now (a DNS blip neither refuses a reload nor takes a
/// backend out); else the first the name gives.
fn backend_address(
    resolved: Result<Vec<SocketAddr>, String>,
    old: Option<SocketAddr>,
) -> Result<SocketAddr, String> {
    match (resolved, old) {
        (Ok(addresses), Some(old)) if addresses.contains(&old) => Ok(old),
        (Ok(addresses), _) => addresses
            .first()
            .copied()
            .ok_or_else(|| "the name resolves to no address".to_owned()),
        (Err(_), Some(old)) => Ok(old),
        (Err(message), None) => Err(message),
    }
}

/// Tokens a request body is charged until the backend says: about four bytes a token, as
/// English text and JSON run with common tokenizers, over the body's text — not over
/// attachments (a data URL, a run of base64 such as an image's or audio's bytes), which
/// backends count in tokens of their own and would inflate a byte count many times.
fn estimated_prompt_tokens(body: &[u8]) -> u32 {
    let bytes = match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(value) => text_bytes(None, &value),
        Err(_) => body.len(),
    };
    u32::try_from(bytes.div_ceil(PROMPT_BYTES_PER_TOKEN)).unwrap_or(u32::MAX)
}

/// Bytes of a JSON value's strings and keys, attachments left out: a `data:…;base64,` URL,
/// or base64 of at least [`ATTACHMENT_BYTES_MIN`] under a key that holds an attachment's
/// bytes (`data`, `file_data`). Text elsewhere counts whatever it looks like, so a caller
/// cannot shrink its estimate by how it writes its prompt.
fn text_bytes(key: Option<&str>, value: &serde_json::Value) -> usize {
    use serde_json::Value;
    match value {
        Value::String(text) => {
            let data_url = matches!(key, Some("url" | "image_url" | "file_data"))
                && text.starts_with("data:")
                && text
                    .get(..text.find(',').unwrap_or(0))
                    .is_some_and(|head| head.ends_with(";base64"));
            let raw = matches!(key, Some("data" | "file_data"))
                && text.len() >= ATTACHMENT_BYTES_MIN
                && text
                    .bytes()
                    .all(|byte| byte.is_ascii_alphanumeric() || b"+/=\n\r".contains(&byte));
            if data_url || raw { 0 } else { text.len() }
        }
        Value::Array(items) => items.iter().map(|item| text_bytes(key, item)).sum(),
        Value::Object(members) => members
            .iter()
            .map(|(name, value)| name.len() + text_bytes(Some(name), value))
            .sum(),
        Value::Number(_) | Value::Bool(_) | Value::Null => 4,
    }
}

/// A run of base64 this long or longer under an attachment's key is taken for its bytes.
const ATTACHMENT_BYTES_MIN: usize = 1024;

/// Bytes per token of the prompt estimate.
const PROMPT_BYTES_PER_TOKEN: usize = 4;

/// Every address `host` resolves to now (at least one). Blocks.
fn resolve_all(host: &str, port: u16) -> Result<Vec<SocketAddr>, String> {
    let addresses: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .map_err(|error| format!("cannot resolve {host}: {error}"))?
        .collect();
    if addresses.is_empty() {
        return Err(format!("{host} resolves to no address"));
    }
    Ok(addresses)
}

/// How often the backends' host names are resolved again: cloud endpoints (Azure OpenAI,
/// API Management, Front Door) change addresses, and a backend pinned to one it lost would
/// fail until a reload.
pub const BACKEND_RESOLVE_INTERVAL: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy)]
enum Outcome {
    Success,
    Failure,
    Throttled { retry_after: Duration },
    Abandoned,
}

/// Counts a request in flight on a backend until dropped.
struct InFlight<'a>(&'a Backend);

/// The backend an attempt goes to, and its claim on a half-open circuit's one trial, if it
/// holds it. The trial passes as soon as the backend's status line shows it works, not when
/// the answer ends, so that a long stream does not keep every other request off the backend
/// for its whole length; dropped unsettled (a panic, a cancelled request) it gives the trial
/// back, so the backend is not left out until a restart.
struct Chosen<'a> {
    pool: &'a Pool,
    index: usize,
    open: Option<Trial>,
}

impl Chosen<'_> {
    /// The backend's answer began well: the trial ends, the circuit closes for the other
    /// requests (the attempt's own outcome is recorded when it ends).
    fn pass(&mut self) {
        if let Some(trial) = self.open.take() {
            lock(&self.pool.backends[self.index].health)
                .circuit
                .pass_trial(trial);
        }
    }

    /// The trial claim if it is still open, ending it: the caller records the attempt's
    /// outcome as the trial's when there is one.
    fn take(&mut self) -> Option<Trial> {
        self.open.take()
    }
}

impl Drop for Chosen<'_> {
    fn drop(&mut self) {
        if let Some(trial) = self.open.take() {
            lock(&self.pool.backends[self.index].health)
                .circuit
                .abandon_trial(trial);
        }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.counters.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The API call a request makes upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloudAction {
    Chat,
    Completions,
    Embeddings,
}

impl CloudAction {
    /// Its path after `/v1/` (OpenAI) or `/openai/deployments/NAME/` (Azure).
    pub fn path(self) -> &'static str {
        match self {
            CloudAction::Chat => "chat/completions",
            CloudAction::Completions => "completions",
            CloudAction::Embeddings => "embeddings",
        }
    }
}

/// What the forwarder needs of the request.
#[derive(Debug)]
pub struct CloudRequest<'a> {
    pub action: CloudAction,
    /// The client's JSON body.
    pub body: &'a Bytes,
    /// The client-visible model it asked for.
    pub model: &'a str,
    pub stream: bool,
    /// Whether the client asked for the usage chunk itself.
    pub client_wants_usage: bool,
    pub variant: Option<&'a str>,
    pub sticky_key: Option<&'a str>,
    pub traceparent: Option<&'a str>,
    /// Redact-then-cloud: the placeholders to put the values back for in the answer.
    pub restore: Option<&'a router_policies::redact::RedactionMap>,
}

/// How forwarding ended.
#[derive(Debug)]
pub enum Forwarded {
    /// The response was written (successful or an upstream error passed through).
    Answered,
    /// Nothing reached the client and no backend could serve: fall back or answer `error`.
    Unavailable(GatewayError),
    /// The client left; the upstream exchange was dropped.
    ClientGone(String),
}

/// Forwards one request to `pool`, with retries as the module documentation says.
pub async fn forward(
    session: &mut Session,
    ctx: &mut RequestContext,
    pool: &Arc<Pool>,
    request: &CloudRequest<'_>,
) -> Result<Forwarded, GatewayError> {
    // Set before anything can fail: a request bound for an on-premises pool that none of
    // its backends took (or that was refused here) never left either, and its record must
    // not read as if it had (the audit export strips such a record's text by this flag).
    ctx.on_premises = pool.config.on_premises;
    let upstream_model =
        pool.config
            .models
            .get(request.model)
            .ok_or_else(|| GatewayError::ModelNotFound {
                model: request.model.to_owned(),
            })?;
    let body = rewrite_body(request.body, upstream_model, request.stream)?;
    let mut tried: Vec<usize> = Vec::new();
    let mut last_error: Option<GatewayError> = None;
    let mut waited_for_retry_after = false;
    // Attempts counted apart from the backends tried: a wait on the same backend's
    // Retry-After is the request's retry too, not a free extra attempt.
    let mut attempts = 0;
    while attempts < ATTEMPTS_MAX {
        attempts += 1;
        let facts = BalanceFacts {
            variant: request.variant,
            sticky_key: request.sticky_key,
            exclude: &tried,
        };
        let (index, trial) = match pool.choose(&facts) {
            Ok(choice) => choice,
            Err(NoBackend::UnknownVariant) => {
                return Err(GatewayError::invalid_value(
                    CANARY_HEADER,
                    format!(
                        "pool `{}` has no backend labelled version = \"{}\"",
                        pool.config.name,
                        request.variant.unwrap_or_default()
                    ),
                ));
            }
            Err(NoBackend::Unavailable) => break,
        };
        let backend = &pool.backends[index];
        backend.counters.in_flight.fetch_add(1, Ordering::Relaxed);
        backend.counters.requests.fetch_add(1, Ordering::Relaxed);
        let _in_flight = InFlight(backend);
        ctx.attempts += 1;
        let path = pool.path(&backend.config, request.action, upstream_model);
        let mut claim = Chosen {
            pool,
            index,
            open: trial,
        };
        let attempt = attempt(session, ctx, &mut claim, &path, &body, request).await;
        match attempt {
            Attempt::Answered(outcome) => {
                pool.record(index, outcome, claim.take());
                return Ok(Forwarded::Answered);
            }
            Attempt::ClientGone(reason) => {
                pool.record(index, Outcome::Abandoned, claim.take());
                return Ok(Forwarded::ClientGone(reason));
            }
            Attempt::Retryable {
                outcome,
                error,
                retry_after,
            } => {
                pool.record(index, outcome, claim.take());
                tracing::warn!(
                    request_id = %ctx.request_id,
                    pool = %pool.config.name,
                    backend = %backend.config.name,
                    error = %error.record_description(),
                    "upstream attempt failed"
                );
                last_error = Some(error);
                // A short Retry-After with nowhere else to go: wait and ask the same backend
                // (the request's one retry, so only after its first attempt).
                if let Some(wait) = retry_after
                    && tried.is_empty()
                    && !waited_for_retry_after
                    && wait <= pool.config.retry_after_max
                    && !pool.could_choose(&BalanceFacts {
                        variant: request.variant,
                        sticky_key: request.sticky_key,
                        exclude: &[index],
                    })
                {
                    waited_for_retry_after = true;
                    let until = now_ms()
                        .saturating_add(u64::try_from(wait.as_millis()).unwrap_or(u64::MAX));
                    tokio::select! {
                        () = tokio::time::sleep(wait) => {}
                        idle = session.as_downstream_mut().read_body_or_idle(true) => {
                            return Ok(Forwarded::ClientGone(client_gone(idle)));
                        }
                    }
                    // Clear this wait, not a longer one another request's 429 set meanwhile.
                    let mut health = lock(&backend.health);
                    if health.not_before_ms <= until {
                        health.not_before_ms = 0;
                    }
                    continue;
                }
                tried.push(index);
            }
        }
    }
    Ok(Forwarded::Unavailable(last_error.unwrap_or_else(|| {
        GatewayError::Unavailable {
            message: format!(
                "no backend of pool `{}` is available{}",
                pool.config.name,
                request
                    .variant
                    .map(|variant| format!(" for variant `{variant}`"))
                    .unwrap_or_default()
            ),
            retry_after_s: 1,
        }
    })))
}

enum Attempt {
    /// The response went to the client (a success, or an error that is the client's).
    Answered(Outcome),
    /// Nothing reached the client; another backend may serve.
    Retryable {
        outcome: Outcome,
        error: GatewayError,
        retry_after: Option<Duration>,
    },
    ClientGone(String),
}

async fn attempt(
    session: &mut Session,
    ctx: &mut RequestContext,
    trial: &mut Chosen<'_>,
    path: &str,
    body: &Bytes,
    request: &CloudRequest<'_>,
) -> Attempt {
    let pool = trial.pool;
    let backend = &pool.backends[trial.index];
    let failure = |message: String| Attempt::Retryable {
        outcome: Outcome::Failure,
        error: GatewayError::BadGateway { message },
        retry_after: None,
    };
    let auth = match pool.config.auth.header().await {
        Ok(auth) => auth,
        Err(error) => {
            // The token endpoint's answer (tenant, client id, file paths) goes to the log
            // and the record, not to the caller.
            return Attempt::Retryable {
                outcome: Outcome::Abandoned,
                error: GatewayError::UpstreamCredentials {
                    message: format!(
                        "the gateway could not get a credential for pool `{}`",
                        pool.config.name
                    ),
                    detail: error.to_string(),
                },
                retry_after: None,
            };
        }
    };
    let header = match request_header(
        path,
        &backend.config,
        body.len(),
        request.stream,
        &ctx.request_id,
        request.traceparent,
        auth,
    ) {
        Ok(header) => header,
        // Built here, before any byte left: the gateway's own failure (a path or a header
        // value it cannot send), not the backend's, so no circuit is charged.
        Err(message) => {
            return Attempt::Retryable {
                outcome: Outcome::Abandoned,
                error: GatewayError::BadGateway { message },
                retry_after: None,
            };
        }
    };
    let connected = pool.session(backend).await;
    let (upstream, reused) = match connected {
        Ok(connected) => connected,
        Err(error) => {
            // Unreachable backends make the pool unavailable (503), not a bad gateway.
            return Attempt::Retryable {
                outcome: Outcome::Failure,
                error: GatewayError::Unavailable {
                    message: format!(
                        "cannot connect to backend `{}` of pool `{}`: {error}",
                        backend.config.name, pool.config.name
                    ),
                    retry_after_s: 1,
                },
                retry_after: None,
            };
        }
    };
    // Sends the request and reads the answer's header.
    let exchange = |mut upstream: HttpSession, header: Box<RequestHeader>| async move {
        upstream.set_read_timeout(Some(pool.config.first_byte_timeout));
        upstream.set_write_timeout(Some(pool.config.first_byte_timeout));
        let mut upstream = send_request(
            upstream,
            header,
            body.clone(),
            &backend.peer,
            pool.config.first_byte_timeout,
        )
        .await?;
        // Informational answers (`100 Continue`, `103 Early Hints`) come before the real one.
        let mut informational = 0;
        loop {
            upstream.read_response_header().await?;
            if !upstream
                .response_header()
                .is_some_and(|header| header.status.is_informational())
            {
                break;
            }
            informational += 1;
            if informational == INFORMATIONAL_ANSWERS_MAX {
                return Err(pingora_error::Error::explain(
                    pingora_error::ErrorType::InvalidHTTPHeader,
                    "the backend sent informational answers (1xx) without a final one",
                ));
            }
        }
        Ok::<_, Box<pingora_error::Error>>(upstream)
    };
    let sent = async {
        match exchange(upstream, header.clone()).await {
            // A pooled connection the backend closed as it was taken (its keep-alive ran out
            // first): the request never reached it, and a new connection is not the backend
            // failing. Once more, on another connection.
            Err(error) if reused && closed_under_us(&error) => {
                let (upstream, _) = pool.session(backend).await?;
                exchange(upstream, header).await
            }
            other => other,
        }
    };
    let sent = tokio::select! {
        sent = sent => sent,
        idle = session.as_downstream_mut().read_body_or_idle(true) => {
            // Gone while the backend works on the prompt (a whole answer's header comes
            // when it is done): charged its estimate like a caller gone mid-answer.
            if ctx.usage.prompt_tokens == 0 {
                ctx.usage.prompt_tokens = estimated_prompt_tokens(body);
            }
            return Attempt::ClientGone(client_gone(idle));
        }
    };
    let upstream = match sent {
        Ok(upstream) => upstream,
        Err(error) => {
            let timed_out = matches!(
                error.etype(),
                pingora_error::ErrorType::ReadTimedout | pingora_error::ErrorType::WriteTimedout
            );
            let message = format!(
                "backend `{}` of pool `{}` failed{}: {}",
                backend.config.name,
                pool.config.name,
                if reused {
                    " on a reused connection"
                } else {
                    ""
                },
                without_context(&error)
            );
            return Attempt::Retryable {
                outcome: Outcome::Failure,
                error: if timed_out {
                    GatewayError::Timeout { message }
                } else {
                    GatewayError::BadGateway { message }
                },
                retry_after: None,
            };
        }
    };
    let Some(response) = upstream.response_header() else {
        return failure("the backend sent no response header".to_owned());
    };
    let status = response.status.as_u16();
    let content_type = response
        .headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .unwrap_or("application/json")
        .to_owned();
    let retry_after = response
        .headers
        .get(http::header::RETRY_AFTER)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| retry_after_wait(value, SystemTime::now()));
    ctx.target = Some(format!("{}/{}", pool.config.name, backend.config.name));
    if status == 401 || status == 403 {
        // The request carries the gateway's credentials, never the caller's: the caller is
        // not told its own key was refused, another backend may be tried, and a cached token
        // is fetched anew.
        let _ = read_and_release(upstream, pool, backend).await;
        pool.config.auth.rejected();
        // The credential is the pool's, not this backend's fault: no circuit charge (every
        // backend would be ejected and callers told no backend is available).
        return Attempt::Retryable {
            outcome: Outcome::Abandoned,
            error: GatewayError::UpstreamCredentials {
                message: format!(
                    "pool `{}` refused the gateway's credentials",
                    pool.config.name
                ),
                detail: format!("backend `{}` answered {status}", backend.config.name),
            },
            retry_after: None,
        };
    }
    if status == 429 || status >= 500 {
        let body = read_and_release(upstream, pool, backend).await;
        let detail = String::from_utf8_lossy(&body)
            .chars()
            .take(200)
            .collect::<String>();
        let message = format!(
            "backend `{}` of pool `{}` answered {status}",
            backend.config.name, pool.config.name
        );
        // A 503 that says when to come back is a busy backend, as a 429 is.
        let throttled = status == 429 || (status == 503 && retry_after.is_some());
        return Attempt::Retryable {
            outcome: if throttled {
                Outcome::Throttled {
                    retry_after: retry_after.unwrap_or(Duration::from_secs(1)),
                }
            } else {
                Outcome::Failure
            },
            error: GatewayError::BackendRefused {
                message,
                detail,
                throttled,
                // The client hears the wait the gateway keeps, not a longer one.
                retry_after_s: retry_after.map_or(1, |wait| {
                    wait.min(Duration::from_millis(pool.config.circuit.open_max_ms))
                        .as_secs()
                        .max(1)
                }),
            },
            retry_after,
        };
    }
    // From here on the client hears from this backend, whatever happens: its status says
    // it works, which is what a half-open trial wanted to know.
    trial.pass();
    // The backend took the prompt: until its usage says otherwise, the prompt is charged an
    // estimate, so that a caller who leaves before the usage arrives does not go free of
    // token limits and daily budgets.
    if status == 200 && ctx.usage.prompt_tokens == 0 {
        ctx.usage.prompt_tokens = estimated_prompt_tokens(body);
    }
    let streaming = status == 200 && is_event_stream(&content_type);
    let upstream = Upstream {
        session: upstream,
        pool,
        peer: &backend.peer,
    };
    let result = if streaming {
        relay_stream(session, ctx, upstream, request).await
    } else {
        relay_whole(
            session,
            ctx,
            upstream,
            status,
            &content_type,
            request.restore,
        )
        .await
    };
    match result {
        // A 4xx is the client's mistake, not the backend's.
        Ok(()) => Attempt::Answered(Outcome::Success),
        Err(Relay::ClientGone(reason)) => Attempt::ClientGone(reason),
        Err(Relay::Upstream(message)) => {
            ctx.outcome = Some(message);
            Attempt::Answered(Outcome::Failure)
        }
        Err(Relay::TooLarge(message)) => {
            ctx.outcome = Some(message);
            Attempt::Answered(Outcome::Success)
        }
    }
}

/// Reads an error answer's body and gives the connection back: an answer read to its end
/// leaves a sound connection, which the retry after a `Retry-After`, or the next request,
/// reuses instead of a new connection (and TLS handshake) to a backend that is only busy.
async fn read_and_release(mut upstream: HttpSession, pool: &Pool, backend: &Backend) -> Vec<u8> {
    let body = read_error_body(&mut upstream).await;
    Upstream {
        session: upstream,
        pool,
        peer: &backend.peer,
    }
    .release()
    .await;
    body
}

/// Request bodies up to this size leave in the same write as their HTTP/1.1 head.
const COALESCED_BODY_BYTES_MAX: usize = 64 * 1024;

/// Sends the request head and body.
///
/// Pingora's HTTP/1 client flushes the head before the body is written, so a request would
/// take two sends, and on a short path (loopback, a sidecar's pod network) each send wakes
/// the backend once more. A body of up to [`COALESCED_BODY_BYTES_MAX`] is therefore written
/// with its head in one send on the session's own connection, which then goes back into a
/// session of the same options to read the answer. The head always carries `Content-Length`
/// (see `upstream_header`), which frames the body. Larger bodies and HTTP/2 go through
/// Pingora's session writes.
async fn send_request(
    upstream: HttpSession,
    header: Box<RequestHeader>,
    body: Bytes,
    peer: &HttpPeer,
    write_timeout: Duration,
) -> pingora_error::Result<HttpSession> {
    use pingora_core::protocols::http::v1::client::{
        HttpSession as Http1Session, http_req_header_to_wire,
    };
    use pingora_error::{Error, ErrorType};
    use tokio::io::AsyncWriteExt;

    match upstream {
        HttpSession::H1(session) if body.len() <= COALESCED_BODY_BYTES_MAX => {
            let Some(head) = http_req_header_to_wire(&header) else {
                return Error::e_explain(
                    ErrorType::InvalidHTTPHeader,
                    "the request line holds a forbidden byte",
                );
            };
            let (read_timeout, session_write_timeout) =
                (session.read_timeout, session.write_timeout);
            let mut stream = session.into_inner();
            let mut wire = BytesMut::with_capacity(head.len() + body.len());
            wire.extend_from_slice(&head);
            wire.extend_from_slice(&body);
            let written = tokio::time::timeout(write_timeout, async {
                stream.write_all(&wire).await?;
                stream.flush().await
            })
            .await;
            match written {
                Ok(Ok(())) => {}
                Ok(Err(error)) => {
                    return Err(Error::because(
                        ErrorType::WriteError,
                        "while writing the request",
                        error,
                    ));
                }
                Err(_) => {
                    return Error::e_explain(
                        ErrorType::WriteTimedout,
                        "while writing the request (timeout)",
                    );
                }
            }
            let mut session = Http1Session::new_with_options(stream, peer);
            session.read_timeout = read_timeout;
            session.write_timeout = session_write_timeout;
            Ok(HttpSession::H1(session))
        }
        mut upstream => {
            upstream.write_request_header(header).await?;
            upstream.write_request_body(body, true).await?;
            upstream.finish_request_body().await?;
            Ok(upstream)
        }
    }
}

pub(crate) fn client_gone(idle: pingora_error::Result<Option<Bytes>>) -> String {
    match idle {
        Ok(_) => "the client sent data during the response".to_owned(),
        Err(error) => format!("the client closed the connection: {error}"),
    }
}

fn request_header(
    path: &str,
    backend: &BackendConfig,
    body_bytes: usize,
    stream: bool,
    request_id: &str,
    traceparent: Option<&str>,
    auth: Option<(http::HeaderName, http::HeaderValue)>,
) -> Result<Box<RequestHeader>, String> {
    let mut header = RequestHeader::build("POST", path.as_bytes(), Some(8))
        .map_err(|error| format!("building the upstream request: {error}"))?;
    let host = backend.authority();
    let insert = |header: &mut RequestHeader, name: http::HeaderName, value: http::HeaderValue| {
        header
            .insert_header(name, value)
            .map_err(|error| format!("building the upstream request: {error}"))
    };
    let value = |text: &str| {
        http::HeaderValue::from_str(text).map_err(|_| format!("invalid header value `{text}`"))
    };
    insert(&mut header, http::header::HOST, value(&host)?)?;
    insert(
        &mut header,
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    )?;
    insert(
        &mut header,
        http::header::CONTENT_LENGTH,
        http::HeaderValue::from(body_bytes),
    )?;
    insert(
        &mut header,
        http::header::ACCEPT,
        http::HeaderValue::from_static(if stream {
            "text/event-stream"
        } else {
            "application/json"
        }),
    )?;
    insert(
        &mut header,
        http::HeaderName::from_static("x-request-id"),
        value(request_id)?,
    )?;
    if let Some(traceparent) = traceparent
        && let Ok(traceparent) = http::HeaderValue::from_str(traceparent)
    {
        insert(
            &mut header,
            http::HeaderName::from_static("traceparent"),
            traceparent,
        )?;
    }
    if let Some((name, value)) = auth {
        insert(&mut header, name, value)?;
    }
    Ok(Box::new(header))
}

async fn read_error_body(upstream: &mut HttpSession) -> Vec<u8> {
    let mut body = Vec::new();
    while body.len() < ERROR_BODY_BYTES_MAX {
        match upstream.read_response_body().await {
            Ok(Some(chunk)) => body.extend_from_slice(&chunk),
            Ok(None) | Err(_) => break,
        }
    }
    body
}

/// The backend's connection while its answer is relayed, and where it goes back to.
struct Upstream<'a> {
    session: HttpSession,
    pool: &'a Pool,
    peer: &'a HttpPeer,
}

impl Upstream<'_> {
    /// Hands the connection back to the pool once the answer has been read to its end. The
    /// relays call this before the client's last bytes wait for the audit commit, so that
    /// the connection (and Pingora's body buffer with it) serves other requests meanwhile
    /// instead of idling through the flush.
    async fn release(mut self) {
        if self.session.response_done() {
            self.pool
                .connector
                .release_http_session(self.session, self.peer, Some(IDLE_CONNECTION_TIMEOUT))
                .await;
        }
    }
}

enum Relay {
    ClientGone(String),
    /// The backend failed after the response began: the client's answer is cut short.
    Upstream(String),
    /// The answer was larger than the pool's `response_bytes_max`: the client got a 502, but
    /// the backend answered well (its circuit is not charged).
    TooLarge(String),
}

/// A non-streamed answer: read whole (it is small), take its usage, pass it on unchanged.
async fn relay_whole(
    session: &mut Session,
    ctx: &mut RequestContext,
    mut upstream: Upstream<'_>,
    status: u16,
    content_type: &str,
    request_restore: Option<&router_policies::redact::RedactionMap>,
) -> Result<(), Relay> {
    let limit = usize::try_from(upstream.pool.config.response_bytes_max).unwrap_or(usize::MAX);
    let mut body = BytesMut::new();
    loop {
        let chunk = tokio::select! {
            chunk = upstream.session.read_response_body() => chunk,
            idle = session.as_downstream_mut().read_body_or_idle(true) => {
                return Err(Relay::ClientGone(client_gone(idle)));
            }
        };
        match chunk {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > limit {
                    // A limit of this gateway's, not a fault of the backend's.
                    return Err(Relay::TooLarge(
                        respond_bad_gateway(
                            session,
                            ctx,
                            format!("the backend's answer exceeds {limit} bytes"),
                        )
                        .await,
                    ));
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => break,
            Err(error) => {
                return Err(Relay::Upstream(
                    respond_bad_gateway(
                        session,
                        ctx,
                        format!("reading the backend's answer: {error}"),
                    )
                    .await,
                ));
            }
        }
    }
    upstream.release().await;
    if status == 200
        && let Ok(answer) = serde_json::from_slice::<UsageOnly>(&body)
    {
        record_usage(ctx, answer.usage.as_ref());
    }
    // The audit record keeps the answer as the backend sent it (placeholders, not values).
    if status == 200 && ctx.content.is_some() {
        crate::audit_trail::capture_completion(ctx, &crate::audit::content::answer_text(&body));
    }
    let body = match request_restore {
        Some(map) if status == 200 => {
            BytesMut::from(&crate::redaction::restore_answer(&body, map)[..])
        }
        _ => body,
    };
    // A Responses API request gets its Response object; a chat answer goes on as it is.
    let body = if status == 200 && ctx.responses.is_some() {
        BytesMut::from(&ctx.answer_body(body.to_vec())[..])
    } else {
        body
    };
    let mut header = response_header(ctx, status, content_type)
        .map_err(|error| Relay::ClientGone(error.to_string()))?;
    header
        .insert_header("content-length", body.len().to_string())
        .map_err(|error| Relay::ClientGone(error.to_string()))?;
    ctx.status = status;
    crate::data_plane::write_whole(session, ctx, header, body.freeze())
        .await
        .map_err(|error| Relay::ClientGone(error.to_string()))
}

/// The one field of an answer the forwarder reads; the rest is skipped, not built.
#[derive(serde::Deserialize)]
struct UsageOnly {
    usage: Option<serde_json::Value>,
}

/// Answers 502 when nothing was written yet; returns the reason for the access log.
async fn respond_bad_gateway(
    session: &mut Session,
    ctx: &mut RequestContext,
    message: String,
) -> String {
    let error = GatewayError::BadGateway {
        message: message.clone(),
    };
    if let Err(write_error) = crate::data_plane::respond_error(session, ctx, &error).await {
        return format!("{message}; writing the error failed: {write_error}");
    }
    message
}

/// A streamed answer: each complete server-sent event goes on as soon as it is complete.
async fn relay_stream(
    session: &mut Session,
    ctx: &mut RequestContext,
    mut upstream: Upstream<'_>,
    request: &CloudRequest<'_>,
) -> Result<(), Relay> {
    let header = crate::data_plane::stream_header(session, ctx)
        .map_err(|error| Relay::ClientGone(error.to_string()))?;
    ctx.status = 200;
    session
        .write_response_header(Box::new(header), false)
        .await
        .map_err(|error| Relay::ClientGone(error.to_string()))?;
    upstream
        .session
        .set_read_timeout(Some(upstream.pool.config.idle_stream_timeout));
    let mut events = SseSplitter::default();
    let mut restorer = request
        .restore
        .map(|map| crate::redaction::StreamRestorer::new(map.clone()));
    let mut done = false;
    loop {
        let chunk = tokio::select! {
            chunk = upstream.session.read_response_body() => chunk,
            idle = session.as_downstream_mut().read_body_or_idle(true) => {
                return Err(Relay::ClientGone(client_gone(idle)));
            }
        };
        match chunk {
            Ok(Some(chunk)) => {
                let forward = events.push(&chunk, |event, raw| {
                    let usage = event_usage(event);
                    // Until the backend reports usage, each event with choices counts as one
                    // completion token: a stream cut short (the client left, or a backend
                    // that sends no usage) is still charged for what it delivered.
                    if is_data_event(event) && !matches!(usage, Some((_, true))) {
                        ctx.usage.completion_tokens = ctx.usage.completion_tokens.saturating_add(1);
                    }
                    let keep = match &usage {
                        Some((usage, only_usage)) => {
                            record_usage(ctx, Some(usage));
                            request.client_wants_usage || !only_usage
                        }
                        None => true,
                    };
                    if keep && ctx.first_token.is_none() && is_data_event(event) {
                        ctx.first_token = Some(ctx.started.elapsed());
                    }
                    if ctx.content.is_some() {
                        let text = crate::audit::content::event_text(event);
                        crate::audit_trail::capture_completion(ctx, &text);
                    }
                    // [DONE] waits until the outcome record is durable (below).
                    if event == b"data: [DONE]" {
                        done = true;
                        return None;
                    }
                    if !keep {
                        return None;
                    }
                    Some(match restorer.as_mut() {
                        Some(restorer) => restorer.event(event),
                        None => Bytes::copy_from_slice(raw),
                    })
                });
                let forward = ctx.stream_bytes(forward);
                if !forward.is_empty() {
                    ctx.last_token = Some(ctx.started.elapsed());
                    session
                        .write_response_body(Some(forward), false)
                        .await
                        .map_err(|error| Relay::ClientGone(error.to_string()))?;
                }
                if events.pending_bytes() > SSE_EVENT_BYTES_MAX {
                    let message = format!(
                        "the backend sent an event longer than {SSE_EVENT_BYTES_MAX} bytes"
                    );
                    return Err(end_broken_stream(session, ctx, restorer.as_mut(), message).await);
                }
            }
            Ok(None) => break,
            Err(error) => {
                let message = format!("the backend's stream broke off: {error}");
                return Err(end_broken_stream(session, ctx, restorer.as_mut(), message).await);
            }
        }
    }
    upstream.release().await;
    // An event the backend did not end with a blank line goes out too: restored, in order
    // after what the restorer still holds of the events before it.
    let leftover = events.finish();
    let mut rest = BytesMut::new();
    match restorer.as_mut() {
        Some(restorer) => {
            let event = leftover.trim_ascii();
            if !event.is_empty() {
                rest.extend_from_slice(&restorer.event(event));
            }
            rest.extend_from_slice(&restorer.release());
        }
        None => rest.extend_from_slice(&leftover),
    }
    if done {
        rest.extend_from_slice(b"data: [DONE]\n\n");
    }
    // Translated first: a Responses stream keeps its response as it ends, and the outcome
    // record says whether it was kept. Written once that record is durable.
    let mut rest = BytesMut::from(ctx.stream_bytes(rest.freeze()));
    if !done {
        rest.extend_from_slice(&ctx.end_of_unclosed_stream());
    }
    let rest = rest.freeze();
    crate::audit_trail::seal(session, ctx)
        .await
        .map_err(|failure| Relay::ClientGone(format!("{failure:?}")))?;
    session
        .write_response_body(if rest.is_empty() { None } else { Some(rest) }, true)
        .await
        .map_err(|error| Relay::ClientGone(error.to_string()))
}

/// Ends a stream whose backend failed after the status went out, as OpenAI ends a failed
/// stream: what the restorer still holds, an error event and `[DONE]`, written once the
/// outcome record (which says the answer was cut short) is durable. A client must not take
/// a stream that merely stops for a complete answer. The error event names no backend
/// detail; `message`, for the record and the log, does.
async fn end_broken_stream(
    session: &mut Session,
    ctx: &mut RequestContext,
    restorer: Option<&mut crate::redaction::StreamRestorer>,
    message: String,
) -> Relay {
    ctx.outcome = Some(message.clone());
    ctx.cut_short = true;
    let mut rest = BytesMut::new();
    if let Some(restorer) = restorer {
        rest.extend_from_slice(&restorer.release());
    }
    let error = GatewayError::BadGateway {
        message: "the cloud backend's answer broke off before it was complete".to_owned(),
    };
    let body = serde_json::to_value(error.body()).unwrap_or_default();
    rest.extend_from_slice(&crate::openai::sse_event(&body));
    rest.extend_from_slice(crate::openai::SSE_DONE);
    let rest = ctx.stream_bytes(rest.freeze());
    if let Err(failure) = crate::audit_trail::seal(session, ctx).await {
        return Relay::ClientGone(format!("{failure:?}"));
    }
    let _ = session.write_response_body(Some(rest), true).await;
    Relay::Upstream(message)
}

/// Whether an error on a reused connection is Pingora's "closed before the answer began" (its
/// retry mark for reused connections), which says nothing about the backend.
fn closed_under_us(error: &pingora_error::Error) -> bool {
    matches!(
        error.retry,
        pingora_error::RetryType::ReusedOnly | pingora_error::RetryType::Decided(true)
    )
}

/// A `Retry-After` value as a wait from `now`: delay-seconds, or an HTTP date (a date already
/// past is no wait).
fn retry_after_wait(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let date = httpdate::parse_http_date(value).ok()?;
    Some(date.duration_since(now).unwrap_or(Duration::ZERO))
}

fn is_data_event(event: &[u8]) -> bool {
    event.starts_with(b"data:") && !event.starts_with(b"data: [DONE]")
}

/// The usage object of a stream chunk, and whether the chunk carries nothing else (no
/// choices), which is the chunk `include_usage` adds.
fn event_usage(event: &[u8]) -> Option<(serde_json::Value, bool)> {
    let data = event.strip_prefix(b"data:")?;
    if !contains(data, b"\"usage\"") {
        return None;
    }
    let chunk: serde_json::Value = serde_json::from_slice(data.trim_ascii()).ok()?;
    let usage = chunk
        .get("usage")
        .filter(|usage| usage.is_object())?
        .clone();
    let only_usage = chunk
        .get("choices")
        .and_then(serde_json::Value::as_array)
        .is_none_or(Vec::is_empty);
    Some((usage, only_usage))
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    memchr::memmem::find(haystack, needle).is_some()
}

fn record_usage(ctx: &mut RequestContext, usage: Option<&serde_json::Value>) {
    let Some(usage) = usage else {
        return;
    };
    let count = |key: &str| {
        usage
            .get(key)
            .and_then(serde_json::Value::as_u64)
            .and_then(|value| u32::try_from(value).ok())
    };
    if let Some(prompt) = count("prompt_tokens") {
        ctx.usage.prompt_tokens = prompt;
    }
    if let Some(completion) = count("completion_tokens") {
        ctx.usage.completion_tokens = completion;
    }
    if let Some(cached) = usage
        .get("prompt_tokens_details")
        .and_then(|details| details.get("cached_tokens"))
        .and_then(serde_json::Value::as_u64)
        .and_then(|value| u32::try_from(value).ok())
    {
        ctx.usage.cached_tokens = cached;
    }
}

/// Splits a byte stream into server-sent events (each ends with a blank line); `push` returns
/// the bytes of the complete events that `keep` kept, exactly as they arrived.
#[derive(Debug, Default)]
pub struct SseSplitter {
    pending: BytesMut,
    /// Bytes at the start of `pending` already searched for an event's end (less the two a
    /// blank line could still begin in), so that an event arriving in many small chunks is
    /// searched once, not again from its start on every chunk.
    searched: usize,
}

impl SseSplitter {
    /// `each` sees every complete event (trimmed) and the event as it arrived, and returns
    /// the bytes to send for it (`None`: drop it).
    pub fn push(
        &mut self,
        chunk: &[u8],
        mut each: impl FnMut(&[u8], &[u8]) -> Option<Bytes>,
    ) -> Bytes {
        self.pending.extend_from_slice(chunk);
        let mut out = BytesMut::new();
        while let Some(end) = event_end(&self.pending[self.searched..]) {
            let event = self.pending.split_to(self.searched + end);
            self.searched = 0;
            if let Some(bytes) = each(trim_event(&event), &event) {
                out.extend_from_slice(&bytes);
            }
        }
        self.searched = self.pending.len().saturating_sub(2);
        out.freeze()
    }

    /// Bytes held of an event not yet complete.
    pub fn pending_bytes(&self) -> usize {
        self.pending.len()
    }

    /// Whatever is left when the stream ends (an event without its blank line).
    pub fn finish(&mut self) -> Bytes {
        self.searched = 0;
        self.pending.split().freeze()
    }
}

/// The end (exclusive) of the first complete server-sent event, blank line included (`\n\n`
/// or `\r\n\r\n`).
pub(crate) fn event_end(buffer: &[u8]) -> Option<usize> {
    let mut index = 0;
    while index < buffer.len() {
        if buffer[index] == b'\n' {
            match buffer.get(index + 1) {
                Some(b'\n') => return Some(index + 2),
                Some(b'\r') if buffer.get(index + 2) == Some(&b'\n') => return Some(index + 3),
                _ => {}
            }
        }
        index += 1;
    }
    None
}

/// Whether a `Content-Type` value names server-sent events (media types are not case
/// sensitive; parameters may follow).
fn is_event_stream(content_type: &str) -> bool {
    content_type
        .split(';')
        .next()
        .is_some_and(|media| media.trim().eq_ignore_ascii_case("text/event-stream"))
}

fn trim_event(event: &[u8]) -> &[u8] {
    event.trim_ascii()
}

/// The client's body with the model replaced by the upstream's name and, for streams,
/// `stream_options.include_usage` set; every other byte stays as the client sent it.
pub fn rewrite_body(
    body: &[u8],
    upstream_model: &str,
    stream: bool,
) -> Result<Bytes, GatewayError> {
    let invalid = |message: &str| GatewayError::InvalidJson {
        message: format!("the request body is not a JSON object: {message}"),
    };
    let members = top_level_members(body).ok_or_else(|| invalid("cannot read its members"))?;
    let mut edits: Vec<(std::ops::Range<usize>, Vec<u8>)> = Vec::new();
    let model_json =
        serde_json::to_vec(upstream_model).map_err(|error| invalid(&error.to_string()))?;
    match members.iter().find(|member| member.key == "model") {
        Some(member) => edits.push((member.value.clone(), model_json)),
        None => edits.push((
            members_end(body, &members),
            insertion(&members, b"\"model\":", &model_json),
        )),
    }
    if stream {
        match members.iter().find(|member| member.key == "stream_options") {
            Some(member) => {
                let mut options: serde_json::Value =
                    serde_json::from_slice(&body[member.value.clone()])
                        .map_err(|error| invalid(&error.to_string()))?;
                // `null` is absent, as everywhere else in a request.
                if options.is_null() {
                    options = serde_json::Value::Object(serde_json::Map::new());
                }
                let Some(object) = options.as_object_mut() else {
                    return Err(GatewayError::invalid_value(
                        "stream_options",
                        "stream_options must be an object",
                    ));
                };
                if object.get("include_usage") != Some(&serde_json::Value::Bool(true)) {
                    object.insert("include_usage".to_owned(), serde_json::Value::Bool(true));
                    let json = serde_json::to_vec(&options)
                        .map_err(|error| invalid(&error.to_string()))?;
                    edits.push((member.value.clone(), json));
                }
            }
            None => edits.push((
                members_end(body, &members),
                insertion(
                    &members,
                    b"\"stream_options\":",
                    b"{\"include_usage\":true}",
                ),
            )),
        }
    }
    edits.sort_by_key(|(range, _)| range.start);
    let mut out = Vec::with_capacity(body.len() + 64);
    let mut at = 0;
    for (range, replacement) in edits {
        out.extend_from_slice(&body[at..range.start]);
        out.extend_from_slice(&replacement);
        at = range.end;
    }
    out.extend_from_slice(&body[at..]);
    Ok(Bytes::from(out))
}

/// An empty range just before the object's closing brace.
fn members_end(body: &[u8], members: &[Member]) -> std::ops::Range<usize> {
    let end = members.last().map_or_else(
        || {
            body.iter()
                .position(|&byte| byte == b'{')
                .map_or(0, |open| open + 1)
        },
        |member| member.value.end,
    );
    end..end
}

fn insertion(members: &[Member], key: &[u8], value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(key.len() + value.len() + 1);
    if !members.is_empty() {
        out.push(b',');
    }
    out.extend_from_slice(key);
    out.extend_from_slice(value);
    out
}

#[derive(Debug)]
struct Member {
    key: String,
    value: std::ops::Range<usize>,
}

/// The members of a top-level JSON object with the byte range of each value. The body was
/// already parsed as JSON, so this only needs to find boundaries.
fn top_level_members(body: &[u8]) -> Option<Vec<Member>> {
    let mut at = skip_whitespace(body, 0);
    if body.get(at) != Some(&b'{') {
        return None;
    }
    at = skip_whitespace(body, at + 1);
    let mut members = Vec::new();
    if body.get(at) == Some(&b'}') {
        return Some(members);
    }
    loop {
        let key_end = skip_string(body, at)?;
        let key: String = serde_json::from_slice(&body[at..key_end]).ok()?;
        at = skip_whitespace(body, key_end);
        if body.get(at) != Some(&b':') {
            return None;
        }
        let value_start = skip_whitespace(body, at + 1);
        let value_end = skip_value(body, value_start)?;
        members.push(Member {
            key,
            value: value_start..value_end,
        });
        at = skip_whitespace(body, value_end);
        match body.get(at) {
            Some(b',') => at = skip_whitespace(body, at + 1),
            Some(b'}') => return Some(members),
            _ => return None,
        }
    }
}

fn skip_whitespace(body: &[u8], mut at: usize) -> usize {
    while body
        .get(at)
        .is_some_and(|byte| matches!(byte, b' ' | b'\t' | b'\n' | b'\r'))
    {
        at += 1;
    }
    at
}

/// The end (exclusive) of the string starting at `at`.
fn skip_string(body: &[u8], at: usize) -> Option<usize> {
    if body.get(at) != Some(&b'"') {
        return None;
    }
    let mut index = at + 1;
    loop {
        let found = index + memchr::memchr2(b'"', b'\\', body.get(index..)?)?;
        if body[found] == b'"' {
            return Some(found + 1);
        }
        index = found + 2;
    }
}

/// The end (exclusive) of the value starting at `at`.
fn skip_value(body: &[u8], at: usize) -> Option<usize> {
    match body.get(at)? {
        b'"' => skip_string(body, at),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut index = at;
            while let Some(&byte) = body.get(index) {
                match byte {
                    b'"' => {
                        index = skip_string(body, index)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(index + 1);
                        }
                    }
                    _ => {}
                }
                index += 1;
            }
            None
        }
        _ => {
            let mut index = at;
            while body.get(index).is_some_and(|byte| {
                !matches!(byte, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r')
            }) {
                index += 1;
            }
            (index > at).then_some(index)
        }
    }
}

/// Active health checks of one pool, until the pool is dropped.
async fn probe_loop(pool: Weak<Pool>) {
    let Some(interval) = pool.upgrade().map(|pool| pool.config.health.interval) else {
        return;
    };
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let Some(pool) = pool.upgrade() else {
            return;
        };
        let mut probes = tokio::task::JoinSet::new();
        for index in 0..pool.backends.len() {
            if pool.backends[index].address.is_none() {
                continue;
            }
            let pool = Arc::clone(&pool);
            probes.spawn(async move { probe(&pool, index).await });
        }
        drop(pool);
        while probes.join_next().await.is_some() {}
    }
}

async fn probe(pool: &Pool, index: usize) {
    let backend = &pool.backends[index];
    let health_config = &pool.config.health;
    let path = format!("{}{}", backend.config.base_path, health_config.path);
    // The credential first, under the token cache's own time limit: a slow token endpoint
    // must not eat the probe's timeout (and a fetch cut off by it would never finish, each
    // probe then failing). Without a credential the backend's health is unknown: no verdict.
    let auth = match pool.config.auth.header().await {
        Ok(auth) => auth,
        Err(error) => {
            tracing::debug!(pool = %pool.config.name, backend = %backend.config.name, %error, "health probe skipped: no upstream credential");
            return;
        }
    };
    let ok = tokio::time::timeout(health_config.timeout, async {
        let (mut session, _) = pool.session(backend).await.ok()?;
        let mut header = RequestHeader::build("GET", path.as_bytes(), Some(2)).ok()?;
        header
            .insert_header(http::header::HOST, backend.config.authority())
            .ok()?;
        if let Some((name, value)) = auth {
            header.insert_header(name, value).ok()?;
        }
        session.write_request_header(Box::new(header)).await.ok()?;
        session.finish_request_body().await.ok()?;
        session.read_response_header().await.ok()?;
        let status = session.response_header()?.status;
        while let Ok(Some(_)) = session.read_response_body().await {}
        if session.response_done() {
            pool.connector
                .release_http_session(session, &backend.peer, Some(IDLE_CONNECTION_TIMEOUT))
                .await;
        }
        Some(status.is_success())
    })
    .await
    .ok()
    .flatten()
    .unwrap_or(false);
    let mut health = lock(&backend.health);
    if health.prober != pool.build {
        return;
    }
    if ok {
        health.good_probes_in_row = health.good_probes_in_row.saturating_add(1);
        health.bad_probes_in_row = 0;
        if !health.probed_healthy && health.good_probes_in_row >= health_config.healthy_threshold {
            health.probed_healthy = true;
            tracing::info!(pool = %pool.config.name, backend = %backend.config.name, "backend healthy again");
        }
    } else {
        health.bad_probes_in_row = health.bad_probes_in_row.saturating_add(1);
        health.good_probes_in_row = 0;
        if health.probed_healthy && health.bad_probes_in_row >= health_config.unhealthy_threshold {
            health.probed_healthy = false;
            tracing::warn!(pool = %pool.config.name, backend = %backend.config.name, "backend failed its health probes");
        }
    }
}

#[cfg(test)]
mod tests;
