//! The compiled routing policy: which models are served, under which names.

use crate::DEFAULT_RULE;

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
}

/// A validated policy, ready for [`crate::decide`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub(crate) local_models: Vec<LocalModel>,
    pub(crate) pools: Vec<CloudPool>,
    pub(crate) default_model: Option<String>,
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
            })
        } else {
            Err(errors)
        }
    }

    /// The model a client-visible name refers to.
    pub(crate) fn resolve(&self, requested: &str) -> Option<&LocalModel> {
        self.local_models.iter().find(|model| {
            model.name == requested || model.aliases.iter().any(|alias| alias == requested)
        })
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

    pub(crate) fn default_rule(&self) -> String {
        DEFAULT_RULE.to_owned()
    }
}
