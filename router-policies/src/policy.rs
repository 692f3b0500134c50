//! The compiled routing policy: which models are served, under which names.

use crate::DEFAULT_RULE;
use crate::rules::{Action, Rule};

/// A model served in-process, and the other names clients may use for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalModel {
    pub name: String,
    pub aliases: Vec<String>,
}

/// A cloud pool and the client-visible model names it serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloudPool {
    pub name: String,
    pub models: Vec<String>,
    /// The pool runs on the premises: sensitive content may go there unredacted.
    pub on_premises: bool,
}

/// Spillover with hysteresis: from `queue_high` waiting requests on the local model until
/// the queue is down to `queue_low`, requests that are not sensitive go to `pool`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spillover {
    pub queue_high: u64,
    pub queue_low: u64,
    pub pool: String,
    /// The model asked of the pool; the requested model when absent.
    pub model: Option<String>,
}

/// A validated policy, ready for [`crate::decide`].
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub(crate) local_models: Vec<LocalModel>,
    pub(crate) pools: Vec<CloudPool>,
    pub(crate) default_model: Option<String>,
    pub(crate) rules: Vec<Rule>,
    /// Classification labels that make a request sensitive, lower case.
    pub(crate) sensitive_classifications: Vec<String>,
    pub(crate) spillover: Option<Spillover>,
}

/// Why a policy could not be compiled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("model name `{name}` is used twice (by `{first}` and `{second}`)")]
    DuplicateName {
        name: String,
        first: String,
        second: String,
    },
    #[error("default model `{0}` is not a configured model")]
    UnknownDefault(String),
    #[error("rule `{rule}`: {problem}")]
    Rule { rule: String, problem: String },
    #[error("spillover: {0}")]
    Spillover(String),
    #[error("model name `{name}` is served by local model `{local}` and by pool `{pool}`")]
    LocalAndCloud {
        name: String,
        local: String,
        pool: String,
    },
}

impl Policy {
    /// Compiles a policy; reports every problem, not only the first.
    pub fn compile(
        local_models: Vec<LocalModel>,
        pools: Vec<CloudPool>,
        default_model: Option<String>,
    ) -> Result<Policy, Vec<PolicyError>> {
        let mut errors = Vec::new();
        let mut seen: Vec<(&str, &str)> = Vec::new();
        for model in &local_models {
            let names = std::iter::once(&model.name).chain(&model.aliases);
            for name in names {
                if let Some((_, first)) = seen.iter().find(|(seen_name, _)| *seen_name == name) {
                    errors.push(PolicyError::DuplicateName {
                        name: name.clone(),
                        first: (*first).to_owned(),
                        second: model.name.clone(),
                    });
                } else {
                    seen.push((name, &model.name));
                }
            }
        }
        for pool in &pools {
            for name in &pool.models {
                if let Some((_, local)) = seen.iter().find(|(seen_name, _)| *seen_name == name) {
                    errors.push(PolicyError::LocalAndCloud {
                        name: name.clone(),
                        local: (*local).to_owned(),
                        pool: pool.name.clone(),
                    });
                }
            }
        }
        if let Some(default) = &default_model
            && !local_models.iter().any(|model| &model.name == default)
        {
            errors.push(PolicyError::UnknownDefault(default.clone()));
        }
        if errors.is_empty() {
            Ok(Policy {
                local_models,
                pools,
                default_model,
                rules: Vec::new(),
                sensitive_classifications: Vec::new(),
                spillover: None,
            })
        } else {
            Err(errors)
        }
    }

    /// The model a client-visible name refers to.
    /// Whether spillover is on in `state` for local model `name` (its name or an alias).
    pub fn spilling_for(&self, state: crate::RouteState, name: &str) -> bool {
        self.resolve(name)
            .and_then(|model| self.local_index(&model.name))
            .is_some_and(|index| state.spilling(index))
    }

    /// The position of local model `name` (its canonical name) in the policy.
    pub(crate) fn local_index(&self, name: &str) -> Option<usize> {
        self.local_models
            .iter()
            .position(|model| model.name == name)
    }

    pub(crate) fn resolve(&self, requested: &str) -> Option<&LocalModel> {
        self.local_models.iter().find(|model| {
            model.name == requested || model.aliases.iter().any(|alias| alias == requested)
        })
    }

    /// Adds ordered rules, the sensitive classification labels and spillover; reports every
    /// rule that names an unknown model or pool (as its target or in `when.models`) or has
    /// impossible thresholds.
    pub fn with_rules(
        mut self,
        rules: Vec<Rule>,
        sensitive_classifications: Vec<String>,
        spillover: Option<Spillover>,
    ) -> Result<Policy, Vec<PolicyError>> {
        let mut errors = Vec::new();
        let mut names: Vec<&str> = Vec::new();
        for rule in &rules {
            let problem = |problem: String| PolicyError::Rule {
                rule: rule.name.clone(),
                problem,
            };
            if rule.name == DEFAULT_RULE
                || rule.name == crate::FAIL_CLOSED_RULE
                || rule.name == crate::SPILLOVER_RULE
            {
                errors.push(problem("this name is reserved".to_owned()));
            }
            if names.contains(&rule.name.as_str()) {
                errors.push(problem("a rule of this name comes earlier".to_owned()));
            }
            names.push(&rule.name);
            match &rule.action {
                Action::Local { model } if self.resolve(model).is_none() => {
                    errors.push(problem(format!("local model `{model}` is not configured")));
                }
                Action::Cloud { pool, .. } | Action::RedactThenCloud { pool, .. }
                    if !self.pools.iter().any(|known| &known.name == pool) =>
                {
                    errors.push(problem(format!("pool `{pool}` is not configured")));
                }
                Action::Cloud {
                    pool,
                    model: Some(model),
                }
                | Action::RedactThenCloud {
                    pool,
                    model: Some(model),
                } if !self.serves(pool, model) => {
                    errors.push(problem(format!(
                        "pool `{pool}` does not serve model `{model}` (its models map names it)"
                    )));
                }
                Action::Reject { status, .. } if !(400..=599).contains(status) => {
                    errors.push(problem(format!("status {status} is not an error status")));
                }
                _ => {}
            }
            let conditions = &rule.conditions;
            for (name, value) in [
                ("complexity_min", conditions.complexity_min),
                ("complexity_max", conditions.complexity_max),
                ("local_kv_use_min", conditions.local_kv_use_min),
            ] {
                if value.is_some_and(|value| !(0.0..=1.0).contains(&value)) {
                    errors.push(problem(format!("{name} must be between 0 and 1")));
                }
            }
            // A name no model answers to is refused before any rule sees it, so a rule
            // on it could never match (a misspelt `gpt-4o` rule would let its requests by).
            for model in &conditions.models {
                if self.resolve(model).is_none() && self.pool_for(model).is_none() {
                    errors.push(problem(format!(
                        "models: `{model}` is neither a local model (or alias) nor a model of \
                         a pool"
                    )));
                }
            }
            for kind in &conditions.attachments {
                if kind != "*" && !crate::rules::ATTACHMENT_KINDS.contains(&kind.as_str()) {
                    errors.push(problem(format!(
                        "attachments: `{kind}` is not a kind of attachment ({}, or * for any)",
                        crate::rules::ATTACHMENT_KINDS.join(", ")
                    )));
                }
            }
            if let Some((pool, _)) = &conditions.pool_available
                && !self.pools.iter().any(|known| &known.name == pool)
            {
                errors.push(problem(format!(
                    "pool_available names pool `{pool}`, which is not configured"
                )));
            }
        }
        if let Some(spillover) = &spillover {
            if spillover.queue_low >= spillover.queue_high {
                errors.push(PolicyError::Spillover(
                    "queue_low must be below queue_high".to_owned(),
                ));
            }
            if !self.pools.iter().any(|known| known.name == spillover.pool) {
                errors.push(PolicyError::Spillover(format!(
                    "pool `{}` is not configured",
                    spillover.pool
                )));
            } else {
                // What spills goes as `model`, else under the local name it asked for: a
                // name the pool does not serve would fail every spilled request, just when
                // the local model is busiest.
                match &spillover.model {
                    Some(model) if !self.serves(&spillover.pool, model) => {
                        errors.push(PolicyError::Spillover(format!(
                            "pool `{}` does not serve model `{model}`",
                            spillover.pool
                        )));
                    }
                    None => {
                        let unserved: Vec<&str> = self
                            .local_models
                            .iter()
                            .flat_map(|local| std::iter::once(&local.name).chain(&local.aliases))
                            .map(String::as_str)
                            .filter(|name| !self.serves(&spillover.pool, name))
                            .collect();
                        if !unserved.is_empty() {
                            errors.push(PolicyError::Spillover(format!(
                                "pool `{}` does not serve {}, which would spill under that \
                                 name: set spillover's model to one the pool serves",
                                spillover.pool,
                                unserved
                                    .iter()
                                    .map(|name| format!("`{name}`"))
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            )));
                        }
                    }
                    Some(_) => {}
                }
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        self.rules = rules;
        self.sensitive_classifications = sensitive_classifications
            .into_iter()
            .map(|label| label.to_ascii_lowercase())
            .collect();
        self.spillover = spillover;
        Ok(self)
    }

    /// Whether pool `pool` serves the client-visible model `model`.
    fn serves(&self, pool: &str, model: &str) -> bool {
        self.pools
            .iter()
            .any(|known| known.name == pool && known.models.iter().any(|served| served == model))
    }

    /// The rules, in order.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    pub(crate) fn pool(&self, name: &str) -> Option<&CloudPool> {
        self.pools.iter().find(|pool| pool.name == name)
    }

    /// The first pool that serves a client-visible model name.
    pub(crate) fn pool_for(&self, requested: &str) -> Option<&CloudPool> {
        self.pools
            .iter()
            .find(|pool| pool.models.iter().any(|model| model == requested))
    }

    /// Every name clients may use, canonical names first.
    pub fn model_names(&self) -> impl Iterator<Item = &str> {
        self.local_models.iter().map(|model| model.name.as_str())
    }
}
