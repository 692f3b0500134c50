//! The sensitivity scan and the complexity score of a request, over its prompt texts, with
//! the recognizers and weights of the routing snapshot in force.

use crate::facts::PromptTexts;

/// What the scan found in one request: entity types (never values) and whether every
/// finding can be replaced by a placeholder.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Scan {
    pub entity_types: Vec<String>,
    pub redactable: bool,
}

/// The compiled recognizers of a routing snapshot: the built-in entity types plus the
/// deployment's dictionaries and patterns.
#[derive(Debug, Default)]
pub struct SensitivityScanner {
    recognizers: router_policies::sensitivity::Recognizers,
}

impl SensitivityScanner {
    /// Compiles `[policy.dictionaries]` and `[policy.patterns]`; errors name their keys.
    pub fn compile(policy: &crate::config::PolicyConfig) -> Result<Self, Vec<String>> {
        use router_policies::sensitivity::{DictionaryConfig, PatternConfig, RecognizerConfig};
        let config = RecognizerConfig {
            dictionaries: policy
                .dictionaries
                .iter()
                .map(|(name, terms)| DictionaryConfig {
                    name: name.clone(),
                    terms: terms.clone(),
                })
                .collect(),
            patterns: policy
                .patterns
                .iter()
                .map(|(name, regex)| PatternConfig {
                    name: name.clone(),
                    regex: regex.clone(),
                })
                .collect(),
            disabled: policy.disabled_entities.clone(),
        };
        router_policies::sensitivity::Recognizers::compile(&config)
            .map(|recognizers| SensitivityScanner { recognizers })
            .map_err(|errors| {
                errors
                    .iter()
                    .map(|error| format!("policy: {error}"))
                    .collect()
            })
    }

    /// Scans every string of a body, prompt texts and the rest; the entity types found,
    /// sorted and without repeats. Whether the findings can be redacted is for the caller to
    /// settle ([`crate::facts::evaluate`] redacts and scans again).
    pub fn scan(&self, prompt: &PromptTexts) -> Scan {
        let mut entity_types: Vec<String> = prompt
            .texts
            .iter()
            .chain(&prompt.joined)
            .map(String::as_str)
            .chain(std::iter::once(prompt.elsewhere.as_str()))
            .flat_map(|text| self.recognizers.scan(text))
            .map(|finding| finding.entity.as_str().to_owned())
            .collect();
        entity_types.sort();
        entity_types.dedup();
        Scan {
            entity_types,
            redactable: true,
        }
    }

    /// The findings in one text, for redaction.
    pub fn findings(&self, text: &str) -> Vec<router_policies::sensitivity::Finding> {
        self.recognizers.scan(text)
    }
}

/// The complexity model of a routing snapshot: the shipped weights, or the file
/// `[policy] complexity_weights` names.
#[derive(Debug)]
pub struct ComplexityScorer {
    model: router_policies::complexity::ComplexityModel,
}

impl ComplexityScorer {
    pub fn load(policy: &crate::config::PolicyConfig) -> Result<Self, Vec<String>> {
        let Some(path) = &policy.complexity_weights else {
            return Ok(ComplexityScorer {
                model: router_policies::complexity::ComplexityModel::builtin(),
            });
        };
        let text = std::fs::read_to_string(path).map_err(|error| {
            vec![format!(
                "policy.complexity_weights: cannot read {}: {error}",
                path.display()
            )]
        })?;
        router_policies::complexity::ComplexityModel::parse(&text)
            .map(|model| ComplexityScorer { model })
            .map_err(|error| {
                vec![format!(
                    "policy.complexity_weights: {}: {error}",
                    path.display()
                )]
            })
    }

    /// The score in [0, 1] of the request's prompt texts and shape.
    pub fn score(&self, prompt: &PromptTexts) -> f32 {
        let texts: Vec<&str> = prompt.texts.iter().map(String::as_str).collect();
        self.model
            .score(&router_policies::complexity::ComplexityFacts {
                texts: &texts,
                turns: prompt.turns,
                max_tokens: prompt.max_tokens,
                tools: prompt.tools,
            })
    }
}
