//! What the services share: configuration, the reloadable routing (policy and cloud pools),
//! the inference engine once it is loaded, metrics, and the counters that readiness and
//! draining look at.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};

use crate::cloud::Pools;
use crate::config::Config;
use crate::listener::{ConnectionCount, ConnectionRefusals};
use crate::metrics::{Metrics, ModelGauges};

/// What a configuration reload replaces at once: requests take a snapshot when they start,
/// so a reload never changes the rules under a request in flight.
#[derive(Debug)]
pub struct Routing {
    /// The whole configuration it came from (API keys, routing, pools).
    pub config: Arc<Config>,
    pub policy: router_policies::Policy,
    pub pools: Pools,
    /// Shared with a snapshot that only rebuilt the pools (a backend's address moved).
    pub sensitivity: Arc<crate::sensitivity::SensitivityScanner>,
    pub complexity: Arc<crate::sensitivity::ComplexityScorer>,
}

#[derive(Debug)]
pub struct AppState {
    /// The configuration the process started with: listeners, limits, models, engine.
    pub config: Config,
    routing: RwLock<Arc<Routing>>,
    /// Carried from one routing decision to the next (spillover hysteresis).
    route_state: std::sync::Mutex<router_policies::RouteState>,
    /// Set once every model is loaded.
    pub engine: OnceLock<edge_runtime::Engine>,
    pub metrics: Metrics,
    /// The audit log, unless `[audit] enabled = false`.
    pub audit: Option<crate::audit_trail::Trail>,
    /// Callers' request and token buckets (`auth.api_keys[].requests_per_minute`, ...).
    pub rate_limiter: Arc<crate::rate_limit::RateLimiter>,
    /// The day's tokens of callers with a daily budget (set by `serve`).
    pub daily_usage: Option<Arc<crate::daily_usage::DailyUsage>>,
    /// Stored responses of the Responses API, when `[responses] store = true`.
    pub responses: Option<Arc<crate::response_store::ResponseStore>>,
    /// OTLP export, when `[telemetry.otlp]` is configured.
    pub telemetry: Option<crate::telemetry::Telemetry>,
    /// NVML, when the machine has an NVIDIA driver and GPU.
    pub gpu: Option<crate::gpu::GpuMonitor>,
    pub listeners_bound: AtomicBool,
    pub open_connections: Arc<ConnectionCount>,
    /// Connections the data-plane listeners ended before a request (`/metrics`).
    pub connection_refusals: Arc<ConnectionRefusals>,
    in_flight: AtomicU64,
    /// Held while the routing in force is rebuilt (a reload, backends that moved), so that
    /// one rebuild never puts back what another just replaced.
    pub reloading: std::sync::Mutex<()>,
}

impl AppState {
    pub fn new(config: Config, routing: Routing) -> Self {
        let metrics = Metrics::default();
        metrics.record_config_load(false, true);
        AppState {
            routing: RwLock::new(Arc::new(routing)),
            route_state: std::sync::Mutex::new(router_policies::RouteState::default()),
            config,
            engine: OnceLock::new(),
            metrics,
            audit: None,
            rate_limiter: Arc::default(),
            daily_usage: None,
            responses: None,
            telemetry: None,
            gpu: None,
            listeners_bound: AtomicBool::new(false),
            open_connections: Arc::new(ConnectionCount::default()),
            connection_refusals: Arc::default(),
            in_flight: AtomicU64::new(0),
            reloading: std::sync::Mutex::new(()),
        }
    }

    /// Models loaded (when there are any) with none of their inference threads failed, and
    /// listeners bound.
    pub fn ready(&self) -> bool {
        self.models_loaded()
            && self.failed_models().is_empty()
            && self.listeners_bound.load(Ordering::Acquire)
    }

    /// Ready, and with an audit log that takes records (what `/readyz` reports).
    pub fn ready_to_serve(&self) -> bool {
        self.ready() && self.audit_accepting()
    }

    /// Whether requests can be answered as far as the audit log goes: it makes records
    /// durable, or it is not `fail_closed` (then requests are answered without them).
    pub fn audit_accepting(&self) -> bool {
        self.audit
            .as_ref()
            .is_none_or(|trail| trail.log.is_healthy() || !trail.log.fail_closed())
    }

    /// Models one of whose inference threads is down after a panic (restarting, or left
    /// down after repeated panics): `/healthz` and `/readyz` fail meanwhile.
    pub fn failed_models(&self) -> Vec<String> {
        self.engine.get().map_or_else(Vec::new, |engine| {
            engine
                .models()
                .iter()
                .filter(|model| model.stats().workers_failed() > 0)
                .map(|model| model.info().name.clone())
                .collect()
        })
    }

    pub fn models_loaded(&self) -> bool {
        self.config.models.is_empty() || self.engine.get().is_some()
    }

    /// The routing in force now.
    pub fn routing(&self) -> Arc<Routing> {
        Arc::clone(
            &self
                .routing
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    /// Decides with the policy, carrying the routing state from the last decision.
    pub fn decide(
        &self,
        policy: &router_policies::Policy,
        facts: &router_policies::RequestFacts<'_>,
        signals: &router_policies::Signals<'_>,
    ) -> router_policies::Outcome {
        let mut state = self
            .route_state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let outcome = router_policies::decide(policy, facts, signals, *state);
        *state = outcome.state;
        outcome
    }

    /// The routing state the next decision starts from.
    pub fn route_state(&self) -> router_policies::RouteState {
        *self
            .route_state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Queue depth and KV use of each loaded model.
    pub fn local_loads(&self) -> Vec<(String, u64, f32)> {
        let Some(engine) = self.engine.get() else {
            return Vec::new();
        };
        engine
            .models()
            .iter()
            .map(|model| {
                let stats = model.stats();
                let total = stats.kv_cells_total().max(1) as f32;
                (
                    model.info().name.clone(),
                    stats.queue_depth(),
                    stats.kv_cells_used() as f32 / total,
                )
            })
            .collect()
    }

    /// Puts new routing in force for requests that start from now on.
    pub fn replace_routing(&self, routing: Routing) {
        routing.pools.start_probes();
        *self
            .routing
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(routing);
    }

    /// Data-plane requests being handled right now.
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Counts a request as in flight until the guard is dropped.
    pub fn begin_request(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(Arc::clone(self))
    }

    /// Every GPU's utilisation and memory now; empty without NVML.
    pub fn gpu_samples(&self) -> Vec<crate::gpu::GpuSample> {
        self.gpu
            .as_ref()
            .map(crate::gpu::GpuMonitor::sample)
            .unwrap_or_default()
    }

    pub fn model_gauges(&self) -> Vec<ModelGauges> {
        let Some(engine) = self.engine.get() else {
            return Vec::new();
        };
        engine
            .models()
            .iter()
            .map(|model| {
                let stats = model.stats();
                ModelGauges {
                    model: model.info().name.clone(),
                    queue_depth: stats.queue_depth(),
                    active_sequences: stats.active_sequences(),
                    decode_steps: stats.decode_steps(),
                    batched_tokens: stats.batched_tokens(),
                    decode_seconds: stats.decode_micros() as f64 / 1e6,
                    busy_seconds: stats.busy_micros() as f64 / 1e6,
                    sync_seconds: stats.sync_micros() as f64 / 1e6,
                    sampling_seconds: stats.sampling_nanos() as f64 / 1e9,
                    prompt_tokens: stats.prompt_tokens(),
                    prefill_tokens: stats.prefill_tokens(),
                    decode_tokens: stats.decode_tokens(),
                    prefix_hit_tokens: stats.prefix_hit_tokens(),
                    kv_cells_used: stats.kv_cells_used(),
                    kv_cells_total: stats.kv_cells_total(),
                    prefix_cache_entries: stats.prefix_cache_entries(),
                    prefix_cache_host_bytes: stats.prefix_cache_host_bytes(),
                    workers_failed: stats.workers_failed(),
                    worker_panics: stats.worker_panics(),
                }
            })
            .collect()
    }
}

/// Marks one request in flight; dropping it ends the request.
#[derive(Debug)]
pub struct InFlight(Arc<AppState>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}
