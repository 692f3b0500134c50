//! The decision function.
//!
//! Order: resolve the requested model (or the default); update the spillover state from the
//! local model's queue; evaluate the rules in order, the first match deciding (else the model
//! name decides: a local model, then a pool that serves the name); apply spillover to local
//! decisions of requests that are not sensitive; and last, fail closed: unredacted sensitive
//! content never goes to a pool that is not on the premises — it runs on a local model, or
//! is refused when none can serve it.

use crate::rules::{Action, Inputs, Verdict};
use crate::{
    DEFAULT_RULE, Decision, FAIL_CLOSED_RULE, Policy, RejectReason, RequestFacts, RouteState,
    SPILLOVER_RULE, Signals,
};

/// A decision with what led to it.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub decision: Decision,
    /// The state to pass to the next decision.
    pub state: RouteState,
    /// Whether the request counted as sensitive.
    pub sensitive: bool,
    /// Each rule's verdict, in order, up to and including the one that matched.
    pub verdicts: Vec<Verdict>,
}

/// Decides where a request runs. Pure: the same policy, facts, signals and state give the
/// same outcome.
pub fn decide(
    policy: &Policy,
    facts: &RequestFacts<'_>,
    signals: &Signals<'_>,
    state: RouteState,
) -> Outcome {
    let sensitivity = &facts.sensitivity;
    let classified = sensitivity.classification.is_some_and(|label| {
        policy
            .sensitive_classifications
            .iter()
            .any(|sensitive| sensitive.eq_ignore_ascii_case(label))
    });
    let sensitive = !sensitivity.entities.is_empty() || classified;
    let requested = facts.requested_model.or(policy.default_model.as_deref());
    // The local model the request would run on, for load signals and fail-closed fallback.
    let local_model = requested
        .and_then(|name| policy.resolve(name))
        .map(|model| model.name.as_str())
        .or(policy.default_model.as_deref());
    let signal = local_model
        .and_then(|model| signals.local.iter().find(|load| load.model == model))
        .copied();
    let mut state = if policy.spillover.is_some() {
        state
    } else {
        RouteState::default()
    };
    let load = signal.unwrap_or_default();
    let inputs = Inputs {
        facts,
        sensitive,
        local_queue: load.queue_depth,
        local_kv_use: load.kv_use,
        pools: signals.pools,
    };
    let mut verdicts = Vec::new();
    let mut decision = None;
    for rule in &policy.rules {
        let failed = rule.conditions.first_failure(&inputs);
        verdicts.push(Verdict {
            rule: rule.name.clone(),
            failed,
        });
        if failed.is_none() {
            decision = Some(carry_out(policy, &rule.action, &rule.name, requested));
            break;
        }
    }
    let mut decision = decision.unwrap_or_else(|| by_name(policy, requested));
    // Spillover is each local model's own: the queue of the model the request would run
    // on moves that model's state (a request that runs elsewhere says nothing of it, and
    // leaves it as it is), and moves its requests to the cloud while on.
    let spilling = match (&decision, &policy.spillover) {
        (Decision::Local { model, .. }, Some(spillover)) => match policy.local_index(model) {
            Some(index) => {
                let load = signals
                    .local
                    .iter()
                    .find(|load| load.model == model.as_str());
                match load {
                    Some(load) if load.queue_depth >= spillover.queue_high => {
                        state.set(index, true);
                    }
                    Some(load) if load.queue_depth <= spillover.queue_low => {
                        state.set(index, false);
                    }
                    _ => {}
                }
                state.spilling(index)
            }
            None => false,
        },
        _ => false,
    };
    // Spillover moves what the policy read whole and found clean: not content the scan
    // cannot read (attachments), which a rule may keep local for that very reason.
    if let (Decision::Local { .. }, Some(spillover)) = (&decision, &policy.spillover)
        && spilling
        && !sensitive
        && facts.attachments.is_empty()
        && inputs.pool_available(&spillover.pool)
    {
        decision = Decision::Cloud {
            pool: spillover.pool.clone(),
            model: spillover
                .model
                .clone()
                .or_else(|| requested.map(str::to_owned))
                .unwrap_or_default(),
            rule: SPILLOVER_RULE.to_owned(),
            redact: false,
        };
    }
    if sensitive && let Decision::Cloud { pool, redact, .. } = &decision {
        let on_premises = policy.pool(pool).is_some_and(|pool| pool.on_premises);
        let redacted = *redact && sensitivity.redactable && !classified;
        if !on_premises && !redacted {
            decision = match local_model {
                Some(model) => Decision::Local {
                    model: model.to_owned(),
                    rule: FAIL_CLOSED_RULE.to_owned(),
                },
                None => Decision::Reject {
                    reason: RejectReason::SensitiveMustStayLocal {
                        entities: sensitivity
                            .entities
                            .iter()
                            .map(|entity| (*entity).to_owned())
                            .chain(
                                classified
                                    .then(|| sensitivity.classification.unwrap_or_default())
                                    .map(|label| format!("classification:{label}")),
                            )
                            .collect(),
                        pool: pool.clone(),
                    },
                    rule: FAIL_CLOSED_RULE.to_owned(),
                },
            };
        }
    }
    Outcome {
        decision,
        state,
        sensitive,
        verdicts,
    }
}

fn carry_out(policy: &Policy, action: &Action, rule: &str, requested: Option<&str>) -> Decision {
    let rule = rule.to_owned();
    let cloud = |pool: &str, model: &Option<String>, redact: bool| Decision::Cloud {
        pool: pool.to_owned(),
        model: model
            .clone()
            .or_else(|| requested.map(str::to_owned))
            .unwrap_or_default(),
        rule: rule.clone(),
        redact,
    };
    match action {
        // A rule may name a model by an alias: the decision names it as the engine does.
        Action::Local { model } => Decision::Local {
            model: policy
                .resolve(model)
                .map_or_else(|| model.clone(), |local| local.name.clone()),
            rule,
        },
        Action::Cloud { pool, model } => cloud(pool, model, false),
        Action::RedactThenCloud { pool, model } => cloud(pool, model, true),
        Action::Reject { status, message } => Decision::Reject {
            reason: RejectReason::Policy {
                status: *status,
                message: message.clone(),
            },
            rule,
        },
    }
}

/// No rule matched: the model name decides.
fn by_name(policy: &Policy, requested: Option<&str>) -> Decision {
    let rule = DEFAULT_RULE.to_owned();
    let Some(requested) = requested else {
        return Decision::Reject {
            reason: RejectReason::ModelRequired,
            rule,
        };
    };
    if let Some(model) = policy.resolve(requested) {
        return Decision::Local {
            model: model.name.clone(),
            rule,
        };
    }
    match policy.pool_for(requested) {
        Some(pool) => Decision::Cloud {
            pool: pool.name.clone(),
            model: requested.to_owned(),
            rule,
            redact: false,
        },
        None => Decision::Reject {
            reason: RejectReason::ModelNotFound {
                requested: requested.to_owned(),
            },
            rule,
        },
    }
}

#[cfg(test)]
mod tests;
