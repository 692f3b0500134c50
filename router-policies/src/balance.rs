//! Choosing a backend of a cloud pool: weights, a forced variant, sticky callers, health.
//!
//! Weights follow Gateway API HTTPRoute `backendRefs`: a backend gets requests in proportion
//! to its weight and weight 0 drains it. Unsticky choices use smooth weighted round robin,
//! which is deterministic and exact: over any run of `sum(weights)` choices among the same
//! eligible backends, each gets exactly its weight. Sticky choices use weighted rendezvous
//! hashing of the caller and each backend's name: a caller keeps its backend while that
//! backend is eligible, whatever happens to the others; when one leaves (unhealthy, drained,
//! full), only its callers move, spread over the rest by weight, and they come back when it
//! returns.
//!
//! Health and circuit state come in as data (what the gateway observed); the round-robin
//! state is passed in and updated, never hidden here.

/// What the balancer knows of one backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackendView<'a> {
    /// The backend's name in its pool: what sticky assignment hashes.
    pub name: &'a str,
    pub weight: u32,
    /// The backend's `version` label, which `x-isthmus-canary` selects.
    pub variant: Option<&'a str>,
    /// Healthy by active probes and admitted by its circuit breaker.
    pub available: bool,
}

/// What the request asks of the balancer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BalanceFacts<'a> {
    /// A forced variant (`x-isthmus-canary: v2`): only backends labelled so are eligible.
    pub variant: Option<&'a str>,
    /// A stable key of the caller, when the pool assigns callers stickily.
    pub sticky_key: Option<&'a str>,
    /// Backends already tried for this request (a retry goes elsewhere).
    pub exclude: &'a [usize],
}

/// Smooth weighted round-robin state of one pool: one running score per backend.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoundRobin {
    current: Vec<i64>,
}

/// Why no backend could be chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoBackend {
    /// No backend carries the forced variant.
    UnknownVariant,
    /// Every eligible backend is unhealthy, drained or already tried.
    Unavailable,
}

/// Picks a backend index, or says why none can serve.
pub fn choose_backend(
    backends: &[BackendView<'_>],
    facts: &BalanceFacts<'_>,
    round_robin: &mut RoundRobin,
) -> Result<usize, NoBackend> {
    if let Some(variant) = facts.variant
        && !backends
            .iter()
            .any(|backend| backend.variant == Some(variant))
    {
        return Err(NoBackend::UnknownVariant);
    }
    let eligible = |index: usize, backend: &BackendView<'_>| {
        backend.available
            && backend.weight > 0
            && !facts.exclude.contains(&index)
            && facts
                .variant
                .is_none_or(|variant| backend.variant == Some(variant))
    };
    let total: u64 = backends
        .iter()
        .enumerate()
        .filter(|(index, backend)| eligible(*index, backend))
        .map(|(_, backend)| u64::from(backend.weight))
        .sum();
    if total == 0 {
        return Err(NoBackend::Unavailable);
    }
    if let Some(key) = facts.sticky_key {
        // Weighted rendezvous: each backend draws u in (0, 1) from (caller, name); the highest
        // weight / -ln(u) wins, which picks a backend with probability weight / total.
        let caller = fnv1a(FNV_OFFSET, key.as_bytes());
        return backends
            .iter()
            .enumerate()
            .filter(|(index, backend)| eligible(*index, backend))
            .map(|(index, backend)| {
                let draw = mix(fnv1a(fnv1a(caller, &[0xff]), backend.name.as_bytes()));
                let unit = ((draw >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
                (index, f64::from(backend.weight) / -unit.ln())
            })
            .max_by(|left, right| left.1.total_cmp(&right.1))
            .map(|(index, _)| index)
            .ok_or(NoBackend::Unavailable);
    }
    round_robin.current.resize(backends.len(), 0);
    let mut best: Option<usize> = None;
    for (index, backend) in backends.iter().enumerate() {
        if !eligible(index, backend) {
            continue;
        }
        round_robin.current[index] += i64::from(backend.weight);
        if best.is_none_or(|best| round_robin.current[index] > round_robin.current[best]) {
            best = Some(index);
        }
    }
    let best = best.ok_or(NoBackend::Unavailable)?;
    round_robin.current[best] -= i64::try_from(total).unwrap_or(i64::MAX);
    Ok(best)
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// FNV-1a, 64 bits, continuing from `hash`: stable across builds and platforms, which sticky
/// assignment needs.
fn fnv1a(mut hash: u64, bytes: &[u8]) -> u64 {
    for byte in bytes {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// A 64-bit finaliser (SplitMix64's): every input bit moves every output bit, so keys that
/// differ in one character draw unrelated numbers.
fn mix(mut value: u64) -> u64 {
    value ^= value >> 30;
    value = value.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    value ^= value >> 27;
    value = value.wrapping_mul(0x94d0_49bb_1331_11eb);
    value ^ (value >> 31)
}

/// Passive health of one backend: a circuit breaker with exponential back-off.
///
/// Closed: requests flow; `failures_to_open` failures in a row open it. Open: no requests
/// until the back-off (`base × 2^(openings-1)`, at most `max`) passes. Half-open: exactly one
/// trial request; its success closes the circuit and resets the back-off, its failure opens it
/// again for twice as long. Time is passed in (milliseconds on any monotonic clock).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Circuit {
    state: CircuitState,
    failures_in_row: u32,
    /// Openings since the circuit last closed after a good trial.
    openings: u32,
    /// Trials admitted so far: the next trial's number.
    trials: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CircuitState {
    Closed,
    Open {
        until_ms: u64,
    },
    /// Half-open; `trial` is the one trial request out, if one is.
    HalfOpen {
        trial: Option<Trial>,
    },
}

/// The claim of one half-open trial request. Only the claim the circuit gave last counts: a
/// trial from an earlier half-open round that ends late (its caller left, its answer broke)
/// can neither free nor settle the trial that is out now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Trial(u64);

/// Thresholds of a circuit breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CircuitSettings {
    pub failures_to_open: u32,
    pub open_base_ms: u64,
    pub open_max_ms: u64,
}

/// What a circuit says of a request that wants to go through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Go ahead.
    Pass,
    /// Go ahead as the half-open trial; its outcome decides the circuit.
    Trial(Trial),
    /// Not now.
    Refuse,
}

/// The externally visible state, for metrics and the admin API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CircuitPhase {
    Closed,
    Open,
    HalfOpen,
}

impl Default for Circuit {
    fn default() -> Self {
        Circuit {
            state: CircuitState::Closed,
            failures_in_row: 0,
            openings: 0,
            trials: 0,
        }
    }
}

impl Circuit {
    /// Whether a request could be admitted now, without taking the trial slot.
    pub fn is_available(&self, now_ms: u64) -> bool {
        match self.state {
            CircuitState::Closed => true,
            CircuitState::Open { until_ms } => now_ms >= until_ms,
            CircuitState::HalfOpen { trial } => trial.is_none(),
        }
    }

    pub fn phase(&self, now_ms: u64) -> CircuitPhase {
        match self.state {
            CircuitState::Closed => CircuitPhase::Closed,
            CircuitState::Open { until_ms } if now_ms < until_ms => CircuitPhase::Open,
            CircuitState::Open { .. } | CircuitState::HalfOpen { .. } => CircuitPhase::HalfOpen,
        }
    }

    /// Admits a request, taking the half-open trial slot when that is what lets it through.
    pub fn admit(&mut self, now_ms: u64) -> Admission {
        match self.state {
            CircuitState::Closed => Admission::Pass,
            CircuitState::Open { until_ms } if now_ms < until_ms => Admission::Refuse,
            CircuitState::Open { .. } | CircuitState::HalfOpen { trial: None } => {
                let trial = Trial(self.trials);
                self.trials = self.trials.wrapping_add(1);
                self.state = CircuitState::HalfOpen { trial: Some(trial) };
                Admission::Trial(trial)
            }
            CircuitState::HalfOpen { trial: Some(_) } => Admission::Refuse,
        }
    }

    /// Whether `trial` is the trial out now.
    fn is_current(&self, trial: Option<Trial>) -> bool {
        trial.is_some() && self.state == (CircuitState::HalfOpen { trial })
    }

    /// Gives the trial slot back when a trial request ended without an outcome (its caller
    /// left before the backend answered).
    pub fn abandon_trial(&mut self, trial: Trial) {
        if self.is_current(Some(trial)) {
            self.state = CircuitState::HalfOpen { trial: None };
        }
    }

    /// The trial's answer began well (its status line): the circuit closes so that other
    /// requests go through while it runs, but keeps its count of openings until a request
    /// ends well, so that a backend whose answers break after a good start still backs off
    /// longer each time.
    pub fn pass_trial(&mut self, trial: Trial) {
        if self.is_current(Some(trial)) {
            self.state = CircuitState::Closed;
            self.failures_in_row = 0;
        }
    }

    /// Records a request's outcome. `trial` is its trial claim if it was admitted as one
    /// and still held it.
    pub fn record(
        &mut self,
        success: bool,
        trial: Option<Trial>,
        now_ms: u64,
        settings: &CircuitSettings,
    ) {
        if success {
            // Any answer that ended well shows the backend works now.
            self.failures_in_row = 0;
            if matches!(self.state, CircuitState::HalfOpen { .. }) {
                self.state = CircuitState::Closed;
            }
            if self.state == CircuitState::Closed {
                self.openings = 0;
            }
            return;
        }
        self.failures_in_row = self.failures_in_row.saturating_add(1);
        let open_now = match self.state {
            CircuitState::Closed => self.failures_in_row >= settings.failures_to_open.max(1),
            // Only the trial out now decides a half-open circuit: failures of requests
            // admitted before the circuit opened (or of an earlier round's trial) change
            // nothing, as while it is open.
            CircuitState::HalfOpen { .. } => self.is_current(trial),
            CircuitState::Open { .. } => false,
        };
        if open_now {
            self.openings = self.openings.saturating_add(1);
            let factor = 1u64 << self.openings.saturating_sub(1).min(32);
            let back_off = settings
                .open_base_ms
                .saturating_mul(factor)
                .min(settings.open_max_ms.max(settings.open_base_ms));
            self.state = CircuitState::Open {
                until_ms: now_ms.saturating_add(back_off),
            };
        }
    }
}

#[cfg(test)]
mod tests;
