//! Routing decisions for the Isthmus gateway: facts in, decision out.
//!
//! This crate does no I/O, reads no clock and no randomness, and spawns nothing. The gateway
//! gathers the facts of a request (path, method, headers, requested model, caller,
//! sensitivity, complexity) and the signals of its targets (local load, pool health), calls
//! [`decide`] with the compiled [`Policy`] and the [`RouteState`] of the last decision, and
//! carries out the [`Decision`]. A refusal is a decision too ([`Decision::Reject`]), never an error, and every
//! decision names the rule that made it so that it can be explained and audited.
//! [`waf::inspect`] is the firewall's verdict on a request, before routing.

mod balance;
pub mod complexity;
mod decide;
mod fold;
mod policy;
pub mod redact;
mod rules;
pub mod sensitivity;
pub mod waf;

pub use balance::{
    Admission, BackendView, BalanceFacts, Circuit, CircuitPhase, CircuitSettings, NoBackend,
    RoundRobin, Trial, choose_backend,
};
pub use decide::{Outcome, decide};
pub use policy::{CloudPool, LocalModel, Policy, PolicyError, Spillover};
pub use rules::{ATTACHMENT_KINDS, Action, Conditions, Rule, Verdict};

/// The rule name reported when no configured rule matched.
pub const DEFAULT_RULE: &str = "default";
/// The rule name reported when a sensitive request was kept from a pool off the premises.
pub const FAIL_CLOSED_RULE: &str = "fail_closed";
/// The rule name reported when an overloaded local model spilled a request to the cloud.
pub const SPILLOVER_RULE: &str = "spillover";

/// What the sensitivity scan found, as types and labels (never values).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Sensitivity<'a> {
    /// Entity types found (`iban`, `credit_card`, `dictionary:projects`, ...).
    pub entities: &'a [&'a str],
    /// The request's data classification label (header or caller default), lower case.
    pub classification: Option<&'a str>,
    /// Every finding can be replaced by a placeholder (redact-then-cloud is possible).
    pub redactable: bool,
}

/// What the gateway knows about a request when it decides where it runs.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct RequestFacts<'a> {
    /// The request path, e.g. `/v1/chat/completions`.
    pub path: &'a str,
    /// The OpenAI path of the operation when the request named it another way (an Azure
    /// deployment path, `/openai/v1/...`, a trailing `/`): `paths` conditions match either.
    pub operation_path: Option<&'a str>,
    /// The method, upper case.
    pub method: &'a str,
    /// Request headers, names lower case.
    pub headers: &'a [(&'a str, &'a str)],
    /// The `model` of the body (or the Azure deployment name), if any.
    pub requested_model: Option<&'a str>,
    /// The caller's identity (API key id), if authenticated.
    pub caller: Option<&'a str>,
    pub sensitivity: Sensitivity<'a>,
    /// Kinds of content the sensitivity scan cannot read (`image`, `audio`, `video`, `file`:
    /// a picture of a card, a PDF of a contract), sorted, without repeats.
    pub attachments: &'a [&'a str],
    /// The complexity score in [0, 1].
    pub complexity: f32,
}

/// Load of one local model, as the router sees it.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct LocalLoad<'a> {
    pub model: &'a str,
    pub queue_depth: u64,
    /// KV cells in use / cells (0..=1).
    pub kv_use: f32,
}

/// What the gateway observes of its targets.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Signals<'a> {
    pub local: &'a [LocalLoad<'a>],
    /// Pools and whether any of their backends is available.
    pub pools: &'a [(&'a str, bool)],
}

/// Routing state carried from one decision to the next (passed in, returned updated).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RouteState {
    /// The local models whose spillover is on, one bit each in the policy's order (the 64th
    /// and later share the last bit): the model's queue went over the high-water mark and
    /// has not yet come down to the low-water mark.
    spilling: u64,
}

impl RouteState {
    /// Spillover on, or off, for every local model.
    pub fn all(spilling: bool) -> RouteState {
        RouteState {
            spilling: if spilling { u64::MAX } else { 0 },
        }
    }

    /// Whether spillover is on for some local model.
    pub fn any(self) -> bool {
        self.spilling != 0
    }

    fn bit(index: usize) -> u64 {
        1 << index.min(63)
    }

    /// Whether spillover is on for the policy's `index`-th local model.
    pub(crate) fn spilling(self, index: usize) -> bool {
        self.spilling & RouteState::bit(index) != 0
    }

    pub(crate) fn set(&mut self, index: usize, on: bool) {
        if on {
            self.spilling |= RouteState::bit(index);
        } else {
            self.spilling &= !RouteState::bit(index);
        }
    }
}

/// Where a request runs, or why it does not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Run in-process on the local model `model`.
    Local { model: String, rule: String },
    /// Forward to the cloud pool `pool`; `model` is the client-visible name whose mapping the
    /// pool applies. With `redact`, sensitive values are replaced before and restored after.
    Cloud {
        pool: String,
        model: String,
        rule: String,
        redact: bool,
    },
    /// Refuse the request.
    Reject { reason: RejectReason, rule: String },
}

impl Decision {
    /// The rule that decided.
    pub fn rule(&self) -> &str {
        match self {
            Decision::Local { rule, .. }
            | Decision::Cloud { rule, .. }
            | Decision::Reject { rule, .. } => rule,
        }
    }
}

/// Why a request is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RejectReason {
    /// The request names a model that no route serves.
    ModelNotFound { requested: String },
    /// The request names no model and the policy has no default.
    ModelRequired,
    /// A rule refuses it.
    Policy { status: u16, message: String },
    /// Sensitive content would leave the premises and no local model can serve it.
    SensitiveMustStayLocal { entities: Vec<String>, pool: String },
}
