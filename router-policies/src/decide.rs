//! The decision function.

use crate::{Decision, Policy, RejectReason, RequestFacts};

/// Decides where a request runs. Pure: the same facts and policy give the same decision.
pub fn decide(policy: &Policy, facts: &RequestFacts<'_>) -> Decision {
    let rule = policy.default_rule();
    let requested = match facts.requested_model {
        Some(requested) => requested,
        None => match &policy.default_model {
            Some(default) => default.as_str(),
            None => {
                return Decision::Reject {
                    reason: RejectReason::ModelRequired,
                    rule,
                };
            }
        },
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
