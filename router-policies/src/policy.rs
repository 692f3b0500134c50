//! The compiled routing policy: which models are served, under which names.

use crate::DEFAULT_RULE;

/// A model served in-process, and the other names clients may use for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalModel {
    pub name: String,
    pub aliases: Vec<String>,
}

/// A validated policy, ready for [`crate::decide`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub(crate) local_models: Vec<LocalModel>,
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
}

impl Policy {
    /// Compiles a policy; reports every problem, not only the first.
    pub fn compile(
        local_models: Vec<LocalModel>,
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
        if let Some(default) = &default_model
            && !local_models.iter().any(|model| &model.name == default)
        {
            errors.push(PolicyError::UnknownDefault(default.clone()));
        }
        if errors.is_empty() {
            Ok(Policy {
                local_models,
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

    /// Every name clients may use, canonical names first.
    pub fn model_names(&self) -> impl Iterator<Item = &str> {
        self.local_models.iter().map(|model| model.name.as_str())
    }

    pub(crate) fn default_rule(&self) -> String {
        DEFAULT_RULE.to_owned()
    }
}
