//! Sensitivity recognizers: where a text holds personal data or secrets, found in one pass.
//!
//! [`Recognizers::scan`] walks the bytes of a text once. Cheap triggers (a digit, an upper-case
//! letter, `@`, `+`, `-----`, a `key=` or `key:` assignment, a long run of base64 characters)
//! hand a position to the recognizer that can start there, and every recognizer validates
//! what it found before it reports it: card numbers pass Luhn and an issuer's prefix and
//! length, IBANs mod-97 and their country's length, national numbers their check digits, a
//! JWT's header decodes to JSON with `alg`, a generic secret is high-entropy and stands next
//! to a word such as `password` or `token`. Numbers that only look alike (order ids, dates,
//! version strings, phone-like numbers in prose) are what the validation is for.
//!
//! The output is entity types, byte spans and confidences; the matched values stay with the
//! caller's text and leave this crate only as redaction placeholders ([`crate::redact`]).
//! Per-deployment dictionaries (whole words, ASCII case-insensitive) and regular expressions
//! come in through [`RecognizerConfig`] and are compiled once with every error reported.

mod custom;
mod identifiers;
mod network;
mod numbers;
mod personal;
mod scan;
mod secrets;

use std::ops::Range;
use std::sync::Arc;

use custom::{Dictionaries, Pattern};

/// The longest name of a dictionary or pattern, in bytes.
pub const CUSTOM_NAME_BYTES_MAX: usize = 64;
/// The most terms of all dictionaries together.
pub const DICTIONARY_TERMS_MAX: usize = 100_000;
/// The longest dictionary term, in bytes.
pub const DICTIONARY_TERM_BYTES_MAX: usize = 256;
/// The most custom patterns.
pub const PATTERNS_MAX: usize = 64;
/// The largest compiled program of one custom pattern, in bytes.
pub const PATTERN_PROGRAM_BYTES_MAX: usize = 1 << 20;

/// What kind of sensitive value a finding is.
///
/// [`EntityType::as_str`] gives the stable snake-case name that policies, explanations and
/// metrics use.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum EntityType {
    /// A payment card number (Luhn, issuer prefix and length).
    CreditCard,
    /// An international bank account number (mod-97, the country's length).
    Iban,
    /// A US social security number (area, group and serial ranges; known samples excluded).
    UsSsn,
    /// An e-mail address.
    Email,
    /// A phone number: E.164 (`+44 20 7946 0958`) or a common national format.
    Phone,
    /// An IPv4 or IPv6 address.
    IpAddress,
    /// A UK national insurance number.
    UkNino,
    /// A German tax identification number (Steuer-ID), next to a context word.
    DeTaxId,
    /// A Spanish DNI or NIE (check letter).
    EsDni,
    /// A French social security number (NIR, mod-97 key).
    FrNir,
    /// An Italian codice fiscale (check character).
    ItFiscalCode,
    /// A Dutch citizen service number (BSN, 11-test), next to a context word.
    NlBsn,
    /// A Polish national identification number (PESEL: birth date and check digit), next
    /// to a context word.
    PlPesel,
    /// A Swedish personal or coordination number (birth date and Luhn), next to a context
    /// word.
    SePersonalNumber,
    /// A date of birth: a date after a label that says so (`DOB`, `born on`, `date of
    /// birth`, `Geburtsdatum`...).
    DateOfBirth,
    /// A passport number after a word that names it (`passport no.`, `Reisepass`...).
    PassportNumber,
    /// A medical record number after a label that names it (`MRN`, `medical record
    /// number`, `patient ID`, `hospital number`...).
    MedicalRecordNumber,
    /// An Azure storage account key (88 base64 characters, 64 bytes).
    AzureStorageKey,
    /// A connection string with a secret: Azure storage or Service Bus (`AccountKey=`,
    /// `SharedAccessKey=`), SQL (`Password=`), or a URL with a password (`postgres://u:p@h`).
    ConnectionString,
    /// An Azure shared access signature (`sv=...&sig=...`).
    AzureSasToken,
    /// An AWS access key id (`AKIA...`, `ASIA...`).
    AwsAccessKey,
    /// An AWS secret access key (40 base64 characters next to an AWS or secret context word).
    AwsSecretKey,
    /// A PEM private key block (`-----BEGIN ... PRIVATE KEY-----`).
    PrivateKey,
    /// A JSON web token whose header decodes to JSON with `alg`.
    Jwt,
    /// A password or token: the value of a secret-named key, a token with a known issuer
    /// prefix (`ghp_`, `xoxb-`, `sk-`...), or a high-entropy token next to a context word.
    Secret,
    /// A term of a per-deployment dictionary.
    Dictionary(CustomName),
    /// A match of a per-deployment pattern.
    Pattern(CustomName),
}

impl EntityType {
    /// Every built-in entity type, in a fixed order.
    pub const BUILTIN: [EntityType; 25] = [
        EntityType::CreditCard,
        EntityType::Iban,
        EntityType::UsSsn,
        EntityType::Email,
        EntityType::Phone,
        EntityType::IpAddress,
        EntityType::UkNino,
        EntityType::DeTaxId,
        EntityType::EsDni,
        EntityType::FrNir,
        EntityType::ItFiscalCode,
        EntityType::NlBsn,
        EntityType::PlPesel,
        EntityType::SePersonalNumber,
        EntityType::DateOfBirth,
        EntityType::PassportNumber,
        EntityType::MedicalRecordNumber,
        EntityType::AzureStorageKey,
        EntityType::ConnectionString,
        EntityType::AzureSasToken,
        EntityType::AwsAccessKey,
        EntityType::AwsSecretKey,
        EntityType::PrivateKey,
        EntityType::Jwt,
        EntityType::Secret,
    ];

    /// The stable name: `credit_card`, `iban`, ..., `dictionary:NAME`, `pattern:NAME`.
    pub fn as_str(&self) -> &str {
        match self {
            EntityType::CreditCard => "credit_card",
            EntityType::Iban => "iban",
            EntityType::UsSsn => "us_ssn",
            EntityType::Email => "email",
            EntityType::Phone => "phone",
            EntityType::IpAddress => "ip_address",
            EntityType::UkNino => "uk_nino",
            EntityType::DeTaxId => "de_tax_id",
            EntityType::EsDni => "es_dni",
            EntityType::FrNir => "fr_nir",
            EntityType::ItFiscalCode => "it_fiscal_code",
            EntityType::NlBsn => "nl_bsn",
            EntityType::PlPesel => "pl_pesel",
            EntityType::SePersonalNumber => "se_personal_number",
            EntityType::DateOfBirth => "date_of_birth",
            EntityType::PassportNumber => "passport_number",
            EntityType::MedicalRecordNumber => "medical_record_number",
            EntityType::AzureStorageKey => "azure_storage_key",
            EntityType::ConnectionString => "connection_string",
            EntityType::AzureSasToken => "azure_sas_token",
            EntityType::AwsAccessKey => "aws_access_key",
            EntityType::AwsSecretKey => "aws_secret_key",
            EntityType::PrivateKey => "private_key",
            EntityType::Jwt => "jwt",
            EntityType::Secret => "secret",
            EntityType::Dictionary(name) | EntityType::Pattern(name) => name.label(),
        }
    }

    /// The built-in entity type with this name, if there is one.
    pub fn builtin(name: &str) -> Option<EntityType> {
        EntityType::BUILTIN
            .into_iter()
            .find(|entity| entity.as_str() == name)
    }

    /// The name for a redaction placeholder: upper case, `_` for punctuation; a custom
    /// entity's own name without its `dictionary:`/`pattern:` prefix.
    pub fn placeholder_label(&self) -> String {
        let name = match self {
            EntityType::Dictionary(name) | EntityType::Pattern(name) => name.name(),
            builtin => builtin.as_str(),
        };
        name.bytes()
            .map(|byte| match byte {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' => char::from(byte.to_ascii_uppercase()),
                _ => '_',
            })
            .collect()
    }

    /// The position in [`EntityType::BUILTIN`], or `None` for a custom entity.
    fn builtin_index(&self) -> Option<usize> {
        let index = match self {
            EntityType::CreditCard => 0,
            EntityType::Iban => 1,
            EntityType::UsSsn => 2,
            EntityType::Email => 3,
            EntityType::Phone => 4,
            EntityType::IpAddress => 5,
            EntityType::UkNino => 6,
            EntityType::DeTaxId => 7,
            EntityType::EsDni => 8,
            EntityType::FrNir => 9,
            EntityType::ItFiscalCode => 10,
            EntityType::NlBsn => 11,
            EntityType::PlPesel => 12,
            EntityType::SePersonalNumber => 13,
            EntityType::DateOfBirth => 14,
            EntityType::PassportNumber => 15,
            EntityType::MedicalRecordNumber => 16,
            EntityType::AzureStorageKey => 17,
            EntityType::ConnectionString => 18,
            EntityType::AzureSasToken => 19,
            EntityType::AwsAccessKey => 20,
            EntityType::AwsSecretKey => 21,
            EntityType::PrivateKey => 22,
            EntityType::Jwt => 23,
            EntityType::Secret => 24,
            EntityType::Dictionary(_) | EntityType::Pattern(_) => return None,
        };
        Some(index)
    }
}

impl std::fmt::Display for EntityType {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(self.as_str())
    }
}

/// The name of a dictionary or pattern, kept with its label (`dictionary:NAME`).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct CustomName {
    label: Arc<str>,
    prefix_bytes: usize,
}

impl CustomName {
    fn new(prefix: &str, name: &str) -> CustomName {
        CustomName {
            label: Arc::from(format!("{prefix}:{name}")),
            prefix_bytes: prefix.len() + 1,
        }
    }

    /// The configured name, e.g. `project_codes`.
    pub fn name(&self) -> &str {
        &self.label[self.prefix_bytes..]
    }

    /// The entity label, e.g. `dictionary:project_codes`.
    pub fn label(&self) -> &str {
        &self.label
    }
}

impl std::fmt::Debug for CustomName {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&*self.label, formatter)
    }
}

/// One sensitive value found in a text: its type, where it is, and how sure the recognizer is.
#[derive(Debug, Clone, PartialEq)]
pub struct Finding {
    pub entity: EntityType,
    /// Byte offsets into the scanned text, on character boundaries.
    pub span: Range<usize>,
    /// In (0, 1]: how strongly the value was validated (a check digit beats a format).
    pub confidence: f32,
}

impl Finding {
    /// Whether the value found in `text` may go on beyond what was found: a private key
    /// without its end line (`-----END …`, PuTTY's `Private-MAC:`), found to the end of its
    /// paragraph. Where the text is one of several a model reads in a row (message parts, a
    /// conversation), the rest of the key may lie in the next one, where nothing marks it as
    /// a key: replacing what was found would send the rest.
    pub fn may_continue(&self, text: &str) -> bool {
        // A key found inside a run of base64 is reported on the whole run, which redaction
        // replaces whole: only a key found as written can be cut short.
        let value = text.get(self.span.clone()).unwrap_or_default().trim_start();
        self.entity == EntityType::PrivateKey
            && ((value.starts_with("-----BEGIN") && !value.contains("-----END"))
                || (value.starts_with("PuTTY-User-Key-File-") && !value.contains("Private-MAC:")))
    }
}

/// A per-deployment dictionary: whole-word terms, ASCII case-insensitive.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DictionaryConfig {
    /// `[a-z0-9_-]`, at most [`CUSTOM_NAME_BYTES_MAX`] bytes; the entity is `dictionary:NAME`.
    pub name: String,
    pub terms: Vec<String>,
}

/// A per-deployment regular expression (the `regex` crate's syntax, linear-time matching).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PatternConfig {
    /// `[a-z0-9_-]`, at most [`CUSTOM_NAME_BYTES_MAX`] bytes; the entity is `pattern:NAME`.
    pub name: String,
    pub regex: String,
}

/// What to recognize beyond the built-in entity types, and which built-ins to leave out.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RecognizerConfig {
    pub dictionaries: Vec<DictionaryConfig>,
    pub patterns: Vec<PatternConfig>,
    /// Built-in entity names ([`EntityType::as_str`]) not to report.
    pub disabled: Vec<String>,
}

/// Why a [`RecognizerConfig`] does not compile. Each error names what it is about.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SensitivityError {
    #[error(
        "`{name}` is not a valid {kind} name (use a-z, 0-9, `_` and `-`, at most {max_bytes} bytes)"
    )]
    InvalidName {
        kind: &'static str,
        name: String,
        max_bytes: usize,
    },
    #[error("{kind} `{name}` is defined more than once")]
    DuplicateName { kind: &'static str, name: String },
    #[error("dictionary `{name}` has no terms")]
    EmptyDictionary { name: String },
    #[error("dictionary `{name}` term {index} is blank")]
    BlankTerm { name: String, index: usize },
    #[error("dictionary `{name}` term {index} is longer than {max_bytes} bytes")]
    TermTooLong {
        name: String,
        index: usize,
        max_bytes: usize,
    },
    #[error("dictionaries hold {count} terms, more than {max}")]
    TooManyTerms { count: usize, max: usize },
    #[error("dictionaries cannot be compiled: {message}")]
    DictionaryBuild { message: String },
    #[error("{count} patterns are configured, more than {max}")]
    TooManyPatterns { count: usize, max: usize },
    #[error("pattern `{name}` is not a valid regular expression: {message}")]
    InvalidPattern { name: String, message: String },
    #[error("pattern `{name}` matches the empty string")]
    EmptyMatch { name: String },
    #[error("`{name}` in `disabled` is not a built-in entity type")]
    UnknownEntity { name: String },
}

/// The compiled recognizers: built-ins minus the disabled ones, plus dictionaries and patterns.
#[derive(Debug, Clone, Default)]
pub struct Recognizers {
    /// Bit `i` set: `EntityType::BUILTIN[i]` is not reported.
    disabled: u32,
    dictionaries: Option<Dictionaries>,
    patterns: Vec<Pattern>,
}

impl Recognizers {
    /// Compiles a configuration, reporting every error at once.
    pub fn compile(config: &RecognizerConfig) -> Result<Recognizers, Vec<SensitivityError>> {
        let mut errors = Vec::new();
        let mut disabled = 0_u32;
        for name in &config.disabled {
            match EntityType::builtin(name).and_then(|entity| entity.builtin_index()) {
                Some(index) => disabled |= 1 << index,
                None => errors.push(SensitivityError::UnknownEntity { name: name.clone() }),
            }
        }
        let dictionaries = custom::compile_dictionaries(&config.dictionaries, &mut errors);
        let patterns = custom::compile_patterns(&config.patterns, &mut errors);
        if errors.is_empty() {
            Ok(Recognizers {
                disabled,
                dictionaries,
                patterns,
            })
        } else {
            Err(errors)
        }
    }

    /// Finds the sensitive values in `text`: sorted by start, without overlaps (where two
    /// findings overlap, the more confident one wins, then the longer, then the earlier).
    ///
    /// Look-alike characters (full-width and other scripts' digits, no-break spaces, dashes,
    /// zero-width characters...) are read as the ASCII they stand for (`crate::fold`); spans are
    /// always the original text's. Dictionaries and patterns also see the text as sent, in
    /// case a term or an expression names such characters itself.
    ///
    /// A run of base64 that decodes to text is scanned as that text too (two levels deep:
    /// base64 of base64), and what is found inside is reported on the whole run as written.
    pub fn scan(&self, text: &str) -> Vec<Finding> {
        self.scan_at_depth(text, 0)
    }

    fn scan_at_depth(&self, text: &str, depth: u8) -> Vec<Finding> {
        let mut findings = Vec::new();
        let mut encoded = Vec::new();
        let folded = crate::fold::Folded::of(text);
        let scanned = folded.as_ref().map_or(text, |folded| folded.text.as_str());
        self.scan_into(scanned, &mut findings, &mut encoded);
        if depth < ENCODED_DEPTH_MAX && !encoded.is_empty() {
            // A run already inside a finding (a JWT's segments, a storage key) is reported.
            let found = SpanIndex::new(findings.iter().map(|finding| finding.span.clone()));
            for run in encoded {
                if found.overlaps(&run) {
                    continue;
                }
                let Some(decoded) = scan::decoded_text(&scanned[run.clone()]) else {
                    continue;
                };
                findings.extend(
                    self.scan_at_depth(&decoded, depth + 1)
                        .into_iter()
                        .map(|inner| Finding {
                            span: run.clone(),
                            ..inner
                        }),
                );
            }
        }
        if let Some(folded) = folded {
            for finding in &mut findings {
                finding.span = folded.original(&finding.span);
            }
            if let Some(dictionaries) = &self.dictionaries {
                dictionaries.scan(text, &mut findings);
            }
            for pattern in &self.patterns {
                pattern.scan(text, &mut findings);
            }
        }
        resolve_overlaps(findings)
    }

    /// Every recognizer's findings in `text`, unsorted and possibly overlapping, and the runs
    /// that may be base64 of a text.
    fn scan_into(
        &self,
        text: &str,
        findings: &mut Vec<Finding>,
        encoded: &mut Vec<std::ops::Range<usize>>,
    ) {
        findings.extend(scan::scan_builtin(text, encoded));
        if self.disabled != 0 {
            findings.retain(|finding| {
                finding
                    .entity
                    .builtin_index()
                    .is_none_or(|index| self.disabled & (1 << index) == 0)
            });
        }
        if let Some(dictionaries) = &self.dictionaries {
            dictionaries.scan(text, findings);
        }
        for pattern in &self.patterns {
            pattern.scan(text, findings);
        }
    }
}

/// How many layers of base64 the scan decodes.
const ENCODED_DEPTH_MAX: u8 = 2;

/// Spans (possibly overlapping) that answer "does any overlap this range" in O(log n).
struct SpanIndex {
    /// Sorted by start.
    starts: Vec<usize>,
    /// The largest end among the spans up to and including each position.
    ends_max: Vec<usize>,
}

impl SpanIndex {
    fn new(spans: impl Iterator<Item = std::ops::Range<usize>>) -> SpanIndex {
        let mut spans: Vec<std::ops::Range<usize>> = spans.collect();
        spans.sort_unstable_by_key(|span| span.start);
        let mut end_max = 0;
        let ends_max = spans
            .iter()
            .map(|span| {
                end_max = end_max.max(span.end);
                end_max
            })
            .collect();
        SpanIndex {
            starts: spans.iter().map(|span| span.start).collect(),
            ends_max,
        }
    }

    fn overlaps(&self, range: &std::ops::Range<usize>) -> bool {
        // Spans starting before the range ends; one of them overlaps if it ends after the
        // range starts.
        let before_end = self.starts.partition_point(|&start| start < range.end);
        before_end > 0 && self.ends_max[before_end - 1] > range.start
    }
}

/// Keeps the best of overlapping findings and sorts the rest by start. O(n log n): a text of
/// many findings (a contact list of megabytes) must not cost their square.
fn resolve_overlaps(mut findings: Vec<Finding>) -> Vec<Finding> {
    if findings.len() < 2 {
        return findings;
    }
    findings.sort_by(|left, right| {
        right
            .confidence
            .total_cmp(&left.confidence)
            .then_with(|| right.span.len().cmp(&left.span.len()))
            .then_with(|| left.span.start.cmp(&right.span.start))
    });
    // Accepted spans, disjoint, by (start, order of acceptance).
    let mut kept: std::collections::BTreeMap<(usize, usize), Finding> =
        std::collections::BTreeMap::new();
    for (order, finding) in findings.into_iter().enumerate() {
        let (start, end) = (finding.span.start, finding.span.end);
        let clashes_before = kept
            .range(..(start, 0))
            .next_back()
            .is_some_and(|(_, other)| other.span.end > start);
        let clashes_after = kept
            .range((start, 0)..)
            .next()
            .is_some_and(|(_, other)| other.span.start < end);
        if !clashes_before && !clashes_after {
            kept.insert((start, order), finding);
        }
    }
    kept.into_values().collect()
}

#[cfg(test)]
mod tests;
