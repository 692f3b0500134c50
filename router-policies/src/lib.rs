//! Routing decisions for the Isthmus gateway: facts in, decision out.
//!
//! This crate does no I/O, reads no clock and no randomness, and spawns nothing. The gateway
//! gathers the facts of a request (path, requested model, and later sensitivity, complexity
//! and load signals), calls [`decide`] with the compiled [`Policy`], and carries out the
//! [`Decision`]. A refusal is a decision too ([`Decision::Reject`]), never an error, and every
//! decision names the rule that made it so that it can be explained and audited.

mod balance;
mod decide;
mod policy;

pub use balance::{
    Admission, BackendView, BalanceFacts, Circuit, CircuitPhase, CircuitSettings, NoBackend,
    RoundRobin, choose_backend,
};
pub use decide::decide;
pub use policy::{CloudPool, LocalModel, Policy, PolicyError};

/// The rule name reported when no configured rule matched.
pub const DEFAULT_RULE: &str = "default";

/// What the gateway knows about a request when it decides where it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestFacts<'a> {
    /// The request path, e.g. `/v1/chat/completions`.
    pub path: &'a str,
    /// The `model` of the body (or the Azure deployment name), if any.
    pub requested_model: Option<&'a str>,
}

/// Where a request runs, or why it does not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Run in-process on the local model `model`.
    Local { model: String, rule: String },
    /// Forward to the cloud pool `pool`; `model` is the client-visible name it asked for.
    Cloud {
        pool: String,
        model: String,
        rule: String,
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
}
