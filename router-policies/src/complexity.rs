//! Complexity score: how much a request is likely to gain from the strong (cloud) model over
//! the small local one, as a number in [0, 1].
//!
//! The score is a logistic model over cheap features of the request text (one pass over its
//! bytes, no allocation) and of its shape (turns, `max_tokens`, tools). The weights are data:
//! `data/routing/complexity-weights.txt`, written by the deterministic trainer
//! (`tests/routing/train.rs`, which calls [`features`] so that training and serving share one
//! feature code) and shipped in the binary through [`ComplexityModel::builtin`]. A score of
//! 0.5 means "no expected gain"; see `data/routing/README.md` for the label and the metrics.

#[cfg(test)]
mod tests;

/// The first line of a weights file: the format and the feature set it was trained for.
pub const WEIGHTS_HEADER: &str = "isthmus-complexity-weights 1";

/// The number of features.
pub const FEATURE_COUNT: usize = 23;

/// The features' names, in order: the names of the weights file.
pub const FEATURE_NAMES: [&str; FEATURE_COUNT] = [
    "tokens_log",
    "turns_log",
    "max_tokens_log",
    "tools_log",
    "lines_log",
    "sentences_log",
    "questions_log",
    "digits_share",
    "numbers_log",
    "math_share",
    "code_log",
    "non_ascii_share",
    "upper_words_share",
    "long_words_share",
    "mean_word_letters",
    "pipes_log",
    "first_person_share",
    "third_person_share",
    "multi_step_share",
    "reasoning_log",
    "question_words_log",
    "parts_log",
    "negations_log",
];

/// The feature values of one request, in the order of [`FEATURE_NAMES`].
pub type Features = [f32; FEATURE_COUNT];

/// The largest weight magnitude a weights file may hold; with bounded features it keeps the
/// logit finite.
pub const WEIGHT_ABS_MAX: f32 = 1_000.0;

/// The `max_tokens` that counts as neutral: `max_tokens_log` is ln(max_tokens / this).
const MAX_TOKENS_NEUTRAL: f32 = 256.0;
/// `max_tokens_log` is clamped to ± this.
const MAX_TOKENS_LOG_ABS_MAX: f32 = 4.0;
/// Words of at least this many letters count as long.
const LONG_WORD_LETTERS: usize = 10;
/// `mean_word_letters` is capped here (a pasted blob is one very long "word").
const MEAN_WORD_LETTERS_MAX: f32 = 30.0;
/// Cue words are at most this long; longer words are not looked up.
const CUE_LETTERS_MAX: usize = 12;
/// Approximate bytes per token for English text.
const BYTES_PER_TOKEN: f32 = 4.0;

/// What the complexity score reads of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ComplexityFacts<'a> {
    /// Every user-visible prompt string of the request (message contents and parts, legacy
    /// `prompt` strings), in order.
    pub texts: &'a [&'a str],
    /// Conversation turns (messages); 0 and 1 both count as one.
    pub turns: u32,
    /// The requested `max_tokens` (or `max_completion_tokens`), if any.
    pub max_tokens: Option<u32>,
    /// Tools or functions offered to the model.
    pub tools: u32,
}

/// A weights file that cannot be used. Until its header shows it is a weights file, nothing
/// of its text is quoted: the path comes from configuration an admin API caller may send (a
/// dry run), and any file the service can read (a key, `/proc/self/environ`) must not come
/// back in an error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ComplexityError {
    #[error("line 1 is not the header `{WEIGHTS_HEADER}`: not a weights file of this version")]
    Header,
    #[error("line {line}: expected `NAME VALUE`")]
    Malformed { line: usize },
    #[error("line {line}: unknown weight `{name}`")]
    UnknownName { line: usize, name: String },
    #[error("line {line}: weight `{name}` is given twice")]
    Duplicate { line: usize, name: String },
    #[error(
        "line {line}: `{value}` is not a number between -{WEIGHT_ABS_MAX} and {WEIGHT_ABS_MAX}"
    )]
    BadValue { line: usize, value: String },
    #[error("weight `{name}` is missing")]
    Missing { name: String },
}

/// The weights of the logistic complexity model: score = σ(bias + Σ weightᵢ · featureᵢ).
#[derive(Debug, Clone, PartialEq)]
pub struct ComplexityModel {
    bias: f32,
    weights: Features,
}

/// The weights file shipped with this build.
const BUILTIN_WEIGHTS: &str = include_str!("../../data/routing/complexity-weights.txt");

impl ComplexityModel {
    /// Reads a weights file: the header line [`WEIGHTS_HEADER`], then one `NAME VALUE` line
    /// for `bias` and for each of [`FEATURE_NAMES`]; blank lines and lines starting with `#`
    /// are ignored. Every weight must be present exactly once.
    pub fn parse(text: &str) -> Result<ComplexityModel, ComplexityError> {
        let mut lines = text
            .lines()
            .enumerate()
            .map(|(index, line)| (index + 1, line));
        let header = lines.next().map_or("", |(_, line)| line.trim());
        if header != WEIGHTS_HEADER {
            return Err(ComplexityError::Header);
        }
        let mut bias = None;
        let mut weights: [Option<f32>; FEATURE_COUNT] = [None; FEATURE_COUNT];
        for (line_number, line) in lines {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut fields = line.split_ascii_whitespace();
            let (Some(name), Some(value), None) = (fields.next(), fields.next(), fields.next())
            else {
                return Err(ComplexityError::Malformed { line: line_number });
            };
            let slot = if name == "bias" {
                &mut bias
            } else if let Some(index) = FEATURE_NAMES.iter().position(|known| *known == name) {
                &mut weights[index]
            } else {
                return Err(ComplexityError::UnknownName {
                    line: line_number,
                    name: name.to_owned(),
                });
            };
            if slot.is_some() {
                return Err(ComplexityError::Duplicate {
                    line: line_number,
                    name: name.to_owned(),
                });
            }
            let parsed = value
                .parse::<f32>()
                .ok()
                .filter(|parsed| parsed.is_finite() && parsed.abs() <= WEIGHT_ABS_MAX);
            let Some(parsed) = parsed else {
                return Err(ComplexityError::BadValue {
                    line: line_number,
                    value: value.to_owned(),
                });
            };
            *slot = Some(parsed);
        }
        let missing = |name: &str| ComplexityError::Missing {
            name: name.to_owned(),
        };
        let bias = bias.ok_or_else(|| missing("bias"))?;
        let mut model = ComplexityModel {
            bias,
            weights: [0.0; FEATURE_COUNT],
        };
        for ((weight, given), name) in model.weights.iter_mut().zip(weights).zip(FEATURE_NAMES) {
            *weight = given.ok_or_else(|| missing(name))?;
        }
        Ok(model)
    }

    /// The model trained on RouteLLM's MMLU and GSM8K rows, shipped with this build.
    pub fn builtin() -> ComplexityModel {
        match ComplexityModel::parse(BUILTIN_WEIGHTS) {
            Ok(model) => model,
            // The shipped file is checked by this crate's tests and by the trainer's `--check`.
            Err(error) => panic!("the shipped complexity weights do not parse: {error}"),
        }
    }

    /// The complexity of a request in [0, 1]: the model's estimate of (1 + P(only the strong
    /// model answers well) − P(only the weak one does)) / 2.
    pub fn score(&self, facts: &ComplexityFacts<'_>) -> f32 {
        self.score_features(&features(facts))
    }

    /// The score of features computed by [`features`].
    pub fn score_features(&self, features: &Features) -> f32 {
        let logit = self
            .weights
            .iter()
            .zip(features)
            .fold(self.bias, |sum, (weight, value)| sum + weight * value);
        let score = 1.0 / (1.0 + (-logit).exp());
        // Bounded weights and features keep the logit finite; stay in range regardless.
        if score.is_nan() { 0.5 } else { score }
    }

    /// The bias (the logit of a request whose features are all zero).
    pub fn bias(&self) -> f32 {
        self.bias
    }

    /// The weights, in the order of [`FEATURE_NAMES`].
    pub fn weights(&self) -> &Features {
        &self.weights
    }
}

/// Cue words: small closed lists, matched on the lower-cased word.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cue {
    FirstPerson,
    ThirdPerson,
    MultiStep,
    Reasoning,
    QuestionWord,
    Parts,
    Negation,
    Code,
}

/// Every cue word (lower case, at most [`CUE_LETTERS_MAX`] letters) and its cue.
const CUE_WORDS: &[(&[u8], Cue)] = &[
    (b"i", Cue::FirstPerson),
    (b"me", Cue::FirstPerson),
    (b"my", Cue::FirstPerson),
    (b"mine", Cue::FirstPerson),
    (b"myself", Cue::FirstPerson),
    (b"we", Cue::FirstPerson),
    (b"our", Cue::FirstPerson),
    (b"ours", Cue::FirstPerson),
    (b"us", Cue::FirstPerson),
    (b"ourselves", Cue::FirstPerson),
    (b"he", Cue::ThirdPerson),
    (b"she", Cue::ThirdPerson),
    (b"his", Cue::ThirdPerson),
    (b"her", Cue::ThirdPerson),
    (b"him", Cue::ThirdPerson),
    (b"hers", Cue::ThirdPerson),
    (b"himself", Cue::ThirdPerson),
    (b"herself", Cue::ThirdPerson),
    (b"they", Cue::ThirdPerson),
    (b"them", Cue::ThirdPerson),
    (b"their", Cue::ThirdPerson),
    (b"themselves", Cue::ThirdPerson),
    (b"first", Cue::MultiStep),
    (b"then", Cue::MultiStep),
    (b"next", Cue::MultiStep),
    (b"after", Cue::MultiStep),
    (b"before", Cue::MultiStep),
    (b"finally", Cue::MultiStep),
    (b"remaining", Cue::MultiStep),
    (b"remains", Cue::MultiStep),
    (b"left", Cue::MultiStep),
    (b"each", Cue::MultiStep),
    (b"per", Cue::MultiStep),
    (b"total", Cue::MultiStep),
    (b"twice", Cue::MultiStep),
    (b"half", Cue::MultiStep),
    (b"times", Cue::MultiStep),
    (b"more", Cue::MultiStep),
    (b"less", Cue::MultiStep),
    (b"than", Cue::MultiStep),
    (b"every", Cue::MultiStep),
    (b"prove", Cue::Reasoning),
    (b"derive", Cue::Reasoning),
    (b"explain", Cue::Reasoning),
    (b"justify", Cue::Reasoning),
    (b"evaluate", Cue::Reasoning),
    (b"analyze", Cue::Reasoning),
    (b"analyse", Cue::Reasoning),
    (b"compare", Cue::Reasoning),
    (b"calculate", Cue::Reasoning),
    (b"compute", Cue::Reasoning),
    (b"solve", Cue::Reasoning),
    (b"determine", Cue::Reasoning),
    (b"estimate", Cue::Reasoning),
    (b"show", Cue::Reasoning),
    (b"step", Cue::Reasoning),
    (b"steps", Cue::Reasoning),
    (b"reason", Cue::Reasoning),
    (b"reasoning", Cue::Reasoning),
    (b"what", Cue::QuestionWord),
    (b"why", Cue::QuestionWord),
    (b"how", Cue::QuestionWord),
    (b"which", Cue::QuestionWord),
    (b"who", Cue::QuestionWord),
    (b"whom", Cue::QuestionWord),
    (b"whose", Cue::QuestionWord),
    (b"when", Cue::QuestionWord),
    (b"where", Cue::QuestionWord),
    (b"scenario", Cue::Parts),
    (b"scenarios", Cue::Parts),
    (b"statement", Cue::Parts),
    (b"statements", Cue::Parts),
    (b"both", Cue::Parts),
    (b"neither", Cue::Parts),
    (b"either", Cue::Parts),
    (b"two", Cue::Parts),
    (b"respectively", Cue::Parts),
    (b"following", Cue::Parts),
    (b"not", Cue::Negation),
    (b"except", Cue::Negation),
    (b"least", Cue::Negation),
    (b"false", Cue::Negation),
    (b"incorrect", Cue::Negation),
    (b"never", Cue::Negation),
    (b"cannot", Cue::Negation),
    (b"def", Cue::Code),
    (b"elif", Cue::Code),
    (b"fn", Cue::Code),
    (b"impl", Cue::Code),
    (b"struct", Cue::Code),
    (b"printf", Cue::Code),
    (b"println", Cue::Code),
    (b"namespace", Cue::Code),
    (b"nullptr", Cue::Code),
    (b"lambda", Cue::Code),
    (b"void", Cue::Code),
    (b"const", Cue::Code),
];

/// Slots of the cue table (a power of two, well above the number of cue words).
const CUE_SLOTS: usize = 512;

/// The cue table's hash of an ASCII word (1 or more letters): its length and its first, middle
/// and last letters, case folded.
/// Constant time per word, so the scan does no per-letter hashing.
const fn cue_hash(word: &[u8]) -> usize {
    let length = word.len();
    let first = (word[0] | 0x20) as usize;
    let middle = (word[length / 2] | 0x20) as usize;
    let last = (word[length - 1] | 0x20) as usize;
    (first.wrapping_mul(7) ^ middle.wrapping_mul(61) ^ last.wrapping_mul(139) ^ (length * 41))
        % CUE_SLOTS
}

/// Open addressing with linear probing, built at compile time.
const fn cue_table() -> [Option<(&'static [u8], Cue)>; CUE_SLOTS] {
    let mut table = [None; CUE_SLOTS];
    let mut index = 0;
    while index < CUE_WORDS.len() {
        let (word, cue) = CUE_WORDS[index];
        let mut slot = cue_hash(word);
        while table[slot].is_some() {
            slot = (slot + 1) % CUE_SLOTS;
        }
        table[slot] = Some((word, cue));
        index += 1;
    }
    table
}

static CUE_TABLE: [Option<(&[u8], Cue)>; CUE_SLOTS] = cue_table();

/// The cue of an ASCII word of 1 to [`CUE_LETTERS_MAX`] letters, any case.
fn cue(word: &[u8]) -> Option<Cue> {
    let mut slot = cue_hash(word);
    while let Some((known, cue)) = CUE_TABLE[slot] {
        if known.len() == word.len() && known.eq_ignore_ascii_case(word) {
            return Some(cue);
        }
        slot = (slot + 1) % CUE_SLOTS;
    }
    None
}

/// What a byte starts in the scan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    /// Nothing counted (space, most punctuation).
    Plain,
    Letter,
    Digit,
    /// A byte with its own count (`\n`, `.`, `?`, `|`, code and math symbols).
    Marked,
    NonAscii,
}

const fn byte_classes() -> [Class; 256] {
    let mut classes = [Class::Plain; 256];
    let mut byte = 0;
    while byte < 256 {
        let value = byte as u8;
        classes[byte] = if value.is_ascii_alphabetic() {
            Class::Letter
        } else if value.is_ascii_digit() {
            Class::Digit
        } else if value >= 0x80 {
            Class::NonAscii
        } else if matches!(
            value,
            b'\n'
                | b'.'
                | b'!'
                | b'?'
                | b'|'
                | b'{'
                | b'}'
                | b';'
                | b'`'
                | b'-'
                | b':'
                | b'('
                | b'='
                | b'+'
                | b'*'
                | b'/'
                | b'^'
                | b'<'
                | b'>'
                | b'%'
                | b'$'
                | b'\\'
        ) {
            Class::Marked
        } else {
            Class::Plain
        };
        byte += 1;
    }
    classes
}

static BYTE_CLASSES: [Class; 256] = byte_classes();

fn class(byte: u8) -> Class {
    BYTE_CLASSES[usize::from(byte)]
}

/// Counts gathered in one pass over the texts.
#[derive(Debug, Default)]
struct Counts {
    bytes: u64,
    lines: u64,
    sentences: u64,
    questions: u64,
    digits: u64,
    numbers: u64,
    math: u64,
    code: u64,
    non_ascii: u64,
    pipes: u64,
    words: u64,
    letters: u64,
    upper_words: u64,
    long_words: u64,
    first_person: u64,
    third_person: u64,
    multi_step: u64,
    reasoning: u64,
    question_words: u64,
    parts: u64,
    negations: u64,
}

impl Counts {
    fn scan(&mut self, text: &[u8]) {
        self.bytes += text.len() as u64;
        let mut index = 0;
        while let Some(&byte) = text.get(index) {
            match class(byte) {
                Class::Plain => index += 1,
                Class::NonAscii => {
                    self.non_ascii += 1;
                    index += 1;
                }
                Class::Letter => {
                    let length = text[index..]
                        .iter()
                        .position(|byte| !byte.is_ascii_alphabetic())
                        .unwrap_or(text.len() - index);
                    self.word(&text[index..index + length]);
                    index += length;
                    // Most words end at a space: skip it without another dispatch.
                    if text.get(index) == Some(&b' ') {
                        index += 1;
                    }
                }
                Class::Digit => {
                    // A number: digits, with `.` or `,` between digits ("3.14", "1,000").
                    self.numbers += 1;
                    while let Some(&byte) = text.get(index) {
                        if byte.is_ascii_digit() {
                            self.digits += 1;
                        } else if !(matches!(byte, b'.' | b',')
                            && text.get(index + 1).is_some_and(u8::is_ascii_digit))
                        {
                            break;
                        }
                        index += 1;
                    }
                }
                Class::Marked => {
                    self.marked(byte, text.get(index + 1).copied());
                    index += 1;
                }
            }
        }
    }

    fn marked(&mut self, byte: u8, next: Option<u8>) {
        match byte {
            b'\n' => self.lines += 1,
            b'.' | b'!' | b'?' => {
                if next.is_none_or(|next| next.is_ascii_whitespace()) {
                    self.sentences += 1;
                }
                if byte == b'?' {
                    self.questions += 1;
                }
            }
            b'|' => self.pipes += 1,
            b'{' | b'}' | b';' | b'`' => self.code += 1,
            b'-' if next == Some(b'>') => self.code += 1,
            b':' if next == Some(b':') => self.code += 1,
            b'(' if next == Some(b')') => self.code += 1,
            _ => {}
        }
        if matches!(
            byte,
            b'=' | b'+' | b'*' | b'/' | b'^' | b'<' | b'>' | b'%' | b'$' | b'\\'
        ) {
            self.math += 1;
        }
    }

    fn word(&mut self, word: &[u8]) {
        self.words += 1;
        self.letters += word.len() as u64;
        if word.len() >= 2 && word.iter().all(u8::is_ascii_uppercase) {
            self.upper_words += 1;
        }
        if word.len() >= LONG_WORD_LETTERS {
            self.long_words += 1;
        }
        if word.len() > CUE_LETTERS_MAX {
            return;
        }
        let counter = match cue(word) {
            None => return,
            Some(Cue::FirstPerson) => &mut self.first_person,
            Some(Cue::ThirdPerson) => &mut self.third_person,
            Some(Cue::MultiStep) => &mut self.multi_step,
            Some(Cue::Reasoning) => &mut self.reasoning,
            Some(Cue::QuestionWord) => &mut self.question_words,
            Some(Cue::Parts) => &mut self.parts,
            Some(Cue::Negation) => &mut self.negations,
            Some(Cue::Code) => &mut self.code,
        };
        *counter += 1;
    }
}

/// ln(1 + count).
fn log_count(count: u64) -> f32 {
    (count as f32).ln_1p()
}

/// part / whole, 0 when whole is 0.
fn share(part: u64, whole: u64) -> f32 {
    if whole == 0 {
        0.0
    } else {
        part as f32 / whole as f32
    }
}

/// The features of a request, in the order of [`FEATURE_NAMES`]. Every value is finite and
/// bounded (logs of counts, shares in [0, 1], capped means).
pub fn features(facts: &ComplexityFacts<'_>) -> Features {
    let mut counts = Counts::default();
    for text in facts.texts {
        counts.scan(text.as_bytes());
    }
    let max_tokens_log = facts.max_tokens.map_or(0.0, |max_tokens| {
        (max_tokens as f32 / MAX_TOKENS_NEUTRAL)
            .ln()
            .clamp(-MAX_TOKENS_LOG_ABS_MAX, MAX_TOKENS_LOG_ABS_MAX)
    });
    let mean_word_letters = if counts.words == 0 {
        0.0
    } else {
        (counts.letters as f32 / counts.words as f32).min(MEAN_WORD_LETTERS_MAX)
    };
    [
        (counts.bytes as f32 / BYTES_PER_TOKEN).ln_1p(),
        (facts.turns.max(1) as f32).ln(),
        max_tokens_log,
        log_count(facts.tools.into()),
        log_count(counts.lines),
        log_count(counts.sentences),
        log_count(counts.questions),
        share(counts.digits, counts.bytes),
        log_count(counts.numbers),
        share(counts.math, counts.bytes),
        log_count(counts.code),
        share(counts.non_ascii, counts.bytes),
        share(counts.upper_words, counts.words),
        share(counts.long_words, counts.words),
        mean_word_letters,
        log_count(counts.pipes),
        share(counts.first_person, counts.words),
        share(counts.third_person, counts.words),
        share(counts.multi_step, counts.words),
        log_count(counts.reasoning),
        log_count(counts.question_words),
        log_count(counts.parts),
        log_count(counts.negations),
    ]
}
