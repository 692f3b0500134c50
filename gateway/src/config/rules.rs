//! `[policy]`: ordered routing rules, sensitive classification labels, recognizer
//! dictionaries and patterns, complexity weights, and spillover.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

use super::Validator;

/// The validated `[policy]` section.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PolicyConfig {
    pub rules: Vec<router_policies::Rule>,
    /// Labels of the classification header that make a request sensitive (lower case).
    pub sensitive_classifications: Vec<String>,
    /// The header carrying a data classification label.
    pub classification_header: String,
    /// Classification per caller (API key id) when the request carries none.
    pub caller_classifications: BTreeMap<String, String>,
    pub spillover: Option<router_policies::Spillover>,
    /// Per-deployment term lists (case-insensitive, whole words), by name.
    pub dictionaries: BTreeMap<String, Vec<String>>,
    /// Per-deployment regular expressions, by name.
    pub patterns: BTreeMap<String, String>,
    /// Built-in entity types not to report (e.g. `email` where addresses are not sensitive).
    pub disabled_entities: Vec<String>,
    /// Complexity weights file; the shipped weights when absent.
    pub complexity_weights: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPolicy {
    #[serde(default)]
    rules: Vec<RawRule>,
    #[serde(default)]
    sensitive_classifications: Vec<String>,
    #[serde(default)]
    classification_header: Option<String>,
    #[serde(default)]
    caller_classifications: BTreeMap<String, String>,
    #[serde(default)]
    spillover: Option<RawSpillover>,
    #[serde(default)]
    dictionaries: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    patterns: BTreeMap<String, String>,
    #[serde(default)]
    disabled_entities: Vec<String>,
    #[serde(default)]
    complexity_weights: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    name: String,
    action: String,
    #[serde(default)]
    target: Option<String>,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    status: Option<u16>,
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    when: RawWhen,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWhen {
    #[serde(default)]
    paths: Vec<String>,
    #[serde(default)]
    methods: Vec<String>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    #[serde(default)]
    models: Vec<String>,
    #[serde(default)]
    callers: Vec<String>,
    #[serde(default)]
    sensitive: Option<bool>,
    #[serde(default)]
    entities: Vec<String>,
    #[serde(default)]
    classifications: Vec<String>,
    #[serde(default)]
    attachments: Vec<String>,
    #[serde(default)]
    complexity_min: Option<f32>,
    #[serde(default)]
    complexity_max: Option<f32>,
    #[serde(default)]
    local_queue_min: Option<u64>,
    #[serde(default)]
    local_kv_use_min: Option<f32>,
    #[serde(default)]
    pool_available: Option<String>,
    #[serde(default)]
    pool_unavailable: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSpillover {
    queue_high: u64,
    queue_low: u64,
    pool: String,
    #[serde(default)]
    model: Option<String>,
}

/// Why a rule's `when.entities` name can never match, if it cannot: no recognizer reports
/// it (a typo, a dictionary or pattern not configured), or it is disabled. Such a rule would
/// let by the sensitive requests it was written to stop.
fn entity_problem(raw: &RawPolicy, entity: &str) -> Option<String> {
    use router_policies::sensitivity::EntityType;
    if raw
        .disabled_entities
        .iter()
        .any(|disabled| disabled == entity)
    {
        return Some(format!(
            "`{entity}` is in policy.disabled_entities, so the rule could never match it"
        ));
    }
    let known = EntityType::builtin(entity).is_some()
        || entity
            .strip_prefix("dictionary:")
            .is_some_and(|name| raw.dictionaries.contains_key(name))
        || entity
            .strip_prefix("pattern:")
            .is_some_and(|name| raw.patterns.contains_key(name));
    (!known).then(|| {
        let builtin: Vec<&str> = EntityType::BUILTIN.iter().map(EntityType::as_str).collect();
        format!(
            "`{entity}` is not an entity type (built-in: {}; or dictionary:NAME, pattern:NAME \
             of [policy])",
            builtin.join(", ")
        )
    })
}

impl Validator<'_> {
    /// The policy section. `api_key_ids`: the configured keys, which the callers named by
    /// rules and by `caller_classifications` must be (`None` when `[auth]` did not validate:
    /// its own errors say why); a misspelt one would silently never apply, as would an
    /// entity no recognizer reports.
    pub(super) fn policy(
        &mut self,
        mut raw: RawPolicy,
        api_key_ids: Option<&[&str]>,
    ) -> PolicyConfig {
        let unknown_caller = |caller: &str| api_key_ids.is_some_and(|ids| !ids.contains(&caller));
        for caller in raw.caller_classifications.keys() {
            if unknown_caller(caller) {
                self.error(
                    format!("policy.caller_classifications.{caller}"),
                    format!("`{caller}` is not the id of an [auth] API key"),
                );
            }
        }
        let mut rules = Vec::new();
        for (index, rule) in std::mem::take(&mut raw.rules).into_iter().enumerate() {
            let key = format!("policy.rules[{index}]");
            for (position, caller) in rule.when.callers.iter().enumerate() {
                if unknown_caller(caller) {
                    self.error(
                        format!("{key}.when.callers[{position}]"),
                        format!("`{caller}` is not the id of an [auth] API key"),
                    );
                }
            }
            for (position, entity) in rule.when.entities.iter().enumerate() {
                if let Some(problem) = entity_problem(&raw, entity) {
                    self.error(format!("{key}.when.entities[{position}]"), problem);
                }
            }
            if let Some(rule) = self.rule(&key, rule) {
                rules.push(rule);
            }
        }
        if let Some(path) = &raw.complexity_weights {
            let resolved = self.resolve(path);
            self.readable_file("policy.complexity_weights", &resolved);
        }
        for (name, terms) in &raw.dictionaries {
            if terms.iter().any(|term| term.trim().is_empty()) {
                self.error(
                    format!("policy.dictionaries.{name}"),
                    "terms must not be empty",
                );
            }
        }
        PolicyConfig {
            rules,
            sensitive_classifications: raw
                .sensitive_classifications
                .iter()
                .map(|label| label.to_ascii_lowercase())
                .collect(),
            classification_header: raw
                .classification_header
                .unwrap_or_else(|| "x-data-classification".to_owned())
                .to_ascii_lowercase(),
            caller_classifications: raw.caller_classifications,
            spillover: raw.spillover.map(|spillover| router_policies::Spillover {
                queue_high: spillover.queue_high,
                queue_low: spillover.queue_low,
                pool: spillover.pool,
                model: spillover.model,
            }),
            dictionaries: raw.dictionaries,
            patterns: raw.patterns,
            disabled_entities: raw.disabled_entities,
            complexity_weights: raw.complexity_weights.map(|path| self.resolve(&path)),
        }
    }

    fn rule(&mut self, key: &str, raw: RawRule) -> Option<router_policies::Rule> {
        use router_policies::Action;
        let before = self.errors.len();
        if raw.name.trim().is_empty() {
            self.error(format!("{key}.name"), "must not be empty");
        } else if let Some(problem) = rule_name_problem(&raw.name) {
            self.error(format!("{key}.name"), problem);
        }
        let target = |validator: &mut Self| match &raw.target {
            Some(target) if !target.is_empty() => Some(target.clone()),
            _ => {
                validator.error(
                    format!("{key}.target"),
                    format!(
                        "action `{}` needs a target (a local model or a pool)",
                        raw.action
                    ),
                );
                None
            }
        };
        let action = match raw.action.as_str() {
            "local" => target(self).map(|model| Action::Local { model }),
            "cloud" => target(self).map(|pool| Action::Cloud {
                pool,
                model: raw.model.clone(),
            }),
            "redact_then_cloud" => target(self).map(|pool| Action::RedactThenCloud {
                pool,
                model: raw.model.clone(),
            }),
            "reject" => Some(Action::Reject {
                status: raw.status.unwrap_or(403),
                message: raw
                    .message
                    .clone()
                    .unwrap_or_else(|| format!("refused by policy rule `{}`", raw.name)),
            }),
            other => {
                self.error(
                    format!("{key}.action"),
                    format!(
                        "`{other}` is not an action (expected local, cloud, redact_then_cloud or reject)"
                    ),
                );
                None
            }
        };
        let when = raw.when;
        let pool_available = match (when.pool_available, when.pool_unavailable) {
            (Some(pool), None) => Some((pool, true)),
            (None, Some(pool)) => Some((pool, false)),
            (None, None) => None,
            (Some(_), Some(_)) => {
                self.error(
                    format!("{key}.when"),
                    "set pool_available or pool_unavailable, not both",
                );
                None
            }
        };
        let conditions = router_policies::Conditions {
            paths: when.paths,
            methods: when
                .methods
                .iter()
                .map(|method| method.to_ascii_uppercase())
                .collect(),
            headers: when
                .headers
                .into_iter()
                .map(|(name, value)| (name.to_ascii_lowercase(), value))
                .collect(),
            models: when.models,
            callers: when.callers,
            sensitive: when.sensitive,
            entities: when.entities,
            classifications: when
                .classifications
                .iter()
                .map(|label| label.to_ascii_lowercase())
                .collect(),
            attachments: when.attachments,
            complexity_min: when.complexity_min,
            complexity_max: when.complexity_max,
            local_queue_min: when.local_queue_min,
            local_kv_use_min: when.local_kv_use_min,
            pool_available,
        };
        if self.errors.len() > before {
            return None;
        }
        Some(router_policies::Rule {
            name: raw.name,
            conditions,
            action: action?,
        })
    }
}

/// Longest rule name: it travels in every answer's `x-isthmus-rule` and in metric labels.
const RULE_NAME_BYTES_MAX: usize = 64;

/// Why `name` cannot name a rule, if it cannot: it is sent as a header value, written as a
/// Prometheus label value and read in audit queries, so it is letters, digits and `-_.:`.
fn rule_name_problem(name: &str) -> Option<String> {
    if name.len() > RULE_NAME_BYTES_MAX {
        return Some(format!(
            "`{name}` is longer than {RULE_NAME_BYTES_MAX} bytes"
        ));
    }
    let allowed = |character: char| character.is_ascii_alphanumeric() || "-_.:".contains(character);
    (!name.chars().all(allowed)).then(|| {
        format!(
            "`{}` may hold only ASCII letters, digits and - _ . :",
            name.escape_debug()
        )
    })
}
