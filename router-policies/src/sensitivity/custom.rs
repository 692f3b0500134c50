//! Per-deployment recognizers: dictionaries of terms (project code names, customer lists)
//! matched as whole words in one Aho-Corasick pass, and regular expressions.

use std::collections::HashSet;

use aho_corasick::{AhoCorasick, AhoCorasickBuilder, MatchKind};
use regex::{Regex, RegexBuilder};

use super::{
    CUSTOM_NAME_BYTES_MAX, CustomName, DICTIONARY_TERM_BYTES_MAX, DICTIONARY_TERMS_MAX,
    DictionaryConfig, EntityType, Finding, PATTERN_PROGRAM_BYTES_MAX, PATTERNS_MAX, PatternConfig,
    SensitivityError,
};

const DICTIONARY_CONFIDENCE: f32 = 0.9;
const PATTERN_CONFIDENCE: f32 = 0.8;

/// All dictionaries in one automaton; `owners[pattern]` is the dictionary of each term.
#[derive(Debug, Clone)]
pub(super) struct Dictionaries {
    automaton: AhoCorasick,
    owners: Vec<usize>,
    names: Vec<CustomName>,
}

/// One compiled pattern.
#[derive(Debug, Clone)]
pub(super) struct Pattern {
    regex: Regex,
    name: CustomName,
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= CUSTOM_NAME_BYTES_MAX
        && name.bytes().all(|byte| {
            byte.is_ascii_lowercase() || byte.is_ascii_digit() || matches!(byte, b'_' | b'-')
        })
}

/// Checks a name and that it is not taken, pushing errors.
fn check_name(
    kind: &'static str,
    name: &str,
    seen: &mut HashSet<String>,
    errors: &mut Vec<SensitivityError>,
) {
    if !valid_name(name) {
        errors.push(SensitivityError::InvalidName {
            kind,
            name: name.to_owned(),
            max_bytes: CUSTOM_NAME_BYTES_MAX,
        });
    } else if !seen.insert(name.to_owned()) {
        errors.push(SensitivityError::DuplicateName {
            kind,
            name: name.to_owned(),
        });
    }
}

pub(super) fn compile_dictionaries(
    configs: &[DictionaryConfig],
    errors: &mut Vec<SensitivityError>,
) -> Option<Dictionaries> {
    let errors_before = errors.len();
    let mut seen = HashSet::new();
    let mut terms = Vec::new();
    let mut owners = Vec::new();
    let mut names = Vec::new();
    for (owner, config) in configs.iter().enumerate() {
        check_name("dictionary", &config.name, &mut seen, errors);
        if config.terms.is_empty() {
            errors.push(SensitivityError::EmptyDictionary {
                name: config.name.clone(),
            });
        }
        for (index, term) in config.terms.iter().enumerate() {
            let term = term.trim();
            if term.is_empty() {
                errors.push(SensitivityError::BlankTerm {
                    name: config.name.clone(),
                    index,
                });
            } else if term.len() > DICTIONARY_TERM_BYTES_MAX {
                errors.push(SensitivityError::TermTooLong {
                    name: config.name.clone(),
                    index,
                    max_bytes: DICTIONARY_TERM_BYTES_MAX,
                });
            } else {
                terms.push(term);
                owners.push(owner);
            }
        }
        names.push(CustomName::new("dictionary", &config.name));
    }
    if terms.len() > DICTIONARY_TERMS_MAX {
        errors.push(SensitivityError::TooManyTerms {
            count: terms.len(),
            max: DICTIONARY_TERMS_MAX,
        });
    }
    if configs.is_empty() || errors.len() > errors_before {
        return None;
    }
    match AhoCorasickBuilder::new()
        .ascii_case_insensitive(true)
        .match_kind(MatchKind::Standard)
        .build(&terms)
    {
        Ok(automaton) => Some(Dictionaries {
            automaton,
            owners,
            names,
        }),
        Err(error) => {
            errors.push(SensitivityError::DictionaryBuild {
                message: error.to_string(),
            });
            None
        }
    }
}

pub(super) fn compile_patterns(
    configs: &[PatternConfig],
    errors: &mut Vec<SensitivityError>,
) -> Vec<Pattern> {
    if configs.len() > PATTERNS_MAX {
        errors.push(SensitivityError::TooManyPatterns {
            count: configs.len(),
            max: PATTERNS_MAX,
        });
    }
    let mut seen = HashSet::new();
    let mut patterns = Vec::new();
    for config in configs {
        check_name("pattern", &config.name, &mut seen, errors);
        match RegexBuilder::new(&config.regex)
            .size_limit(PATTERN_PROGRAM_BYTES_MAX)
            .build()
        {
            Ok(regex) if regex.is_match("") => errors.push(SensitivityError::EmptyMatch {
                name: config.name.clone(),
            }),
            Ok(regex) => patterns.push(Pattern {
                regex,
                name: CustomName::new("pattern", &config.name),
            }),
            Err(error) => errors.push(SensitivityError::InvalidPattern {
                name: config.name.clone(),
                message: error.to_string(),
            }),
        }
    }
    patterns
}

/// Whether `position` in `text` is a word boundary on the side of `neighbour`: the character
/// there is not a letter, digit or `_`.
fn word_boundary(neighbour: Option<char>) -> bool {
    neighbour.is_none_or(|character| !(character.is_alphanumeric() || character == '_'))
}

impl Dictionaries {
    pub(super) fn scan(&self, text: &str, found: &mut Vec<Finding>) {
        for matched in self.automaton.find_overlapping_iter(text) {
            let (start, end) = (matched.start(), matched.end());
            let before = text[..start].chars().next_back();
            let after = text[end..].chars().next();
            if !word_boundary(before) || !word_boundary(after) {
                continue;
            }
            let owner = self.owners[matched.pattern().as_usize()];
            found.push(Finding {
                entity: EntityType::Dictionary(self.names[owner].clone()),
                span: start..end,
                confidence: DICTIONARY_CONFIDENCE,
            });
        }
    }
}

impl Pattern {
    pub(super) fn scan(&self, text: &str, found: &mut Vec<Finding>) {
        for matched in self.regex.find_iter(text) {
            if matched.is_empty() {
                continue;
            }
            found.push(Finding {
                entity: EntityType::Pattern(self.name.clone()),
                span: matched.range(),
                confidence: PATTERN_CONFIDENCE,
            });
        }
    }
}
