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
    router_policies::Policy::compile(
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
            .collect()
    })
}
