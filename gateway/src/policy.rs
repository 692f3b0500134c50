//! Translation of the configuration into `router_policies`' compiled policy.

use crate::config::Config;

/// The routing policy the configuration describes; errors carry their key paths.
pub fn compile(config: &Config) -> Result<router_policies::Policy, Vec<String>> {
    let models = config
        .models
        .iter()
        .map(|model| router_policies::LocalModel {
            name: model.name.clone(),
            aliases: model.aliases.clone(),
        })
        .collect();
    let compiled = router_policies::Policy::compile(
        models,
        config
            .upstreams
            .iter()
            .map(|pool| router_policies::CloudPool {
                name: pool.name.clone(),
                models: pool.models.keys().cloned().collect(),
                on_premises: pool.on_premises,
            })
            .collect(),
        config.routing.default_model.clone(),
    )
    .and_then(|policy| {
        policy.with_rules(
            config.policy.rules.clone(),
            config.policy.sensitive_classifications.clone(),
            config.policy.spillover.clone(),
        )
    })
    .map_err(|errors| {
        errors
            .iter()
            .map(|error| format!("routing: {error}"))
            .collect::<Vec<_>>()
    });
    let unknown = unknown_entities(config);
    match compiled {
        Ok(policy) if unknown.is_empty() => Ok(policy),
        Ok(_) => Err(unknown),
        Err(mut errors) => {
            errors.extend(unknown);
            Err(errors)
        }
    }
}

/// Rules whose `when.entities` name an entity type no recognizer reports (unknown, or
/// disabled): such a rule would never match, so a sensitive request it was written to keep
/// local would pass it by.
fn unknown_entities(config: &Config) -> Vec<String> {
    let policy = &config.policy;
    let known = |name: &str| {
        router_policies::sensitivity::EntityType::builtin(name).is_some()
            || name
                .strip_prefix("dictionary:")
                .is_some_and(|dictionary| policy.dictionaries.contains_key(dictionary))
            || name
                .strip_prefix("pattern:")
                .is_some_and(|pattern| policy.patterns.contains_key(pattern))
    };
    let mut errors = Vec::new();
    for rule in &policy.rules {
        for name in &rule.conditions.entities {
            if policy.disabled_entities.contains(name) {
                errors.push(format!(
                    "routing: rule `{}`: entities: `{name}` is in policy.disabled_entities, so \
                     the rule could never match it",
                    rule.name
                ));
            }
        }
        for name in rule.conditions.entities.iter().filter(|name| !known(name)) {
            let builtin: Vec<&str> = router_policies::sensitivity::EntityType::BUILTIN
                .iter()
                .map(router_policies::sensitivity::EntityType::as_str)
                .collect();
            errors.push(format!(
                "routing: rule `{}`: entities: `{name}` is not an entity type (built-in: {}; \
                 or dictionary:NAME, pattern:NAME of [policy])",
                rule.name,
                builtin.join(", ")
            ));
        }
    }
    errors
}
