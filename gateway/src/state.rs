//! What the services share: configuration, the compiled policy, the inference engine once it
//! is loaded, metrics, and the counters that readiness and draining look at.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use crate::config::Config;
use crate::listener::ConnectionCount;
use crate::metrics::{Metrics, ModelGauges};

#[derive(Debug)]
pub struct AppState {
    pub config: Config,
    pub policy: router_policies::Policy,
    /// Set once every model is loaded.
    pub engine: OnceLock<edge_runtime::Engine>,
    pub metrics: Metrics,
    pub listeners_bound: AtomicBool,
    pub open_connections: Arc<ConnectionCount>,
    in_flight: AtomicU64,
}

impl AppState {
    pub fn new(config: Config, policy: router_policies::Policy) -> Self {
        AppState {
            config,
            policy,
            engine: OnceLock::new(),
            metrics: Metrics::default(),
            listeners_bound: AtomicBool::new(false),
            open_connections: Arc::new(ConnectionCount::default()),
            in_flight: AtomicU64::new(0),
        }
    }

    /// Models loaded and listeners bound.
    pub fn ready(&self) -> bool {
        self.engine.get().is_some() && self.listeners_bound.load(Ordering::Acquire)
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
                    prompt_tokens: stats.prompt_tokens(),
                    prefill_tokens: stats.prefill_tokens(),
                    decode_tokens: stats.decode_tokens(),
                    prefix_hit_tokens: stats.prefix_hit_tokens(),
                    kv_cells_used: stats.kv_cells_used(),
                    kv_cells_total: stats.kv_cells_total(),
                    prefix_cache_entries: stats.prefix_cache_entries(),
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
