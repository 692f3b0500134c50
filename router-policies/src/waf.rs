//! The web application firewall: request inspection in the spirit of the OWASP Core Rule Set,
//! fitted to an LLM API, with anomaly scoring.
//!
//! Each rule that matches adds its severity once (critical 5, error 4, warning 3, notice 2,
//! as the CRS scores them); a request whose score reaches the inbound threshold is blocked
//! in `block` mode and only reported in `detect` mode. The default threshold, 5, blocks on one
//! critical rule and never on a warning alone.
//!
//! What is inspected, and where:
//! - the request target (path and query) and the header values: protocol anomalies (control
//!   characters, bad or overlong percent-encoding, path traversal, request smuggling),
//!   scanners' signatures, lookup expressions as in Log4Shell, Shellshock function
//!   definitions, script and SQL injection in the query;
//! - the prompt texts (message contents, legacy prompts, tool arguments and outputs):
//!   chat-template control tokens (a user who writes `<|im_start|>system` into a message tries
//!   to speak with the system's voice), invisible Unicode tag characters (instructions hidden
//!   from the person who pastes the text), bidirectional overrides (text that reads
//!   differently than it runs), and the phrasing of instruction-override and system-prompt
//!   extraction attempts (warnings: people also discuss these);
//! - the body's other strings (`user`, `metadata`, keys): lookup expressions and script or
//!   SQL injection, which backends may log or store.
//!
//! Prompts are natural language and legitimately mention SQL, scripts and attacks, so the
//! injection rules of web forms do not run on them. A match reports where it matched and what
//! kind of pattern, never the matched text: findings go into logs and audit records, and a
//! prompt may hold anything.
//!
//! Pure: no I/O, no clock; the caller passes the request's parts in.

use std::collections::BTreeSet;
use std::fmt;

use aho_corasick::{AhoCorasick, AhoCorasickBuilder, MatchKind};

/// The rule set's name and version, as Azure's firewall logs report them.
pub const RULE_SET_TYPE: &str = "Isthmus";
pub const RULE_SET_VERSION: &str = "1.0";

/// The default inbound anomaly threshold: one critical rule.
pub const INBOUND_THRESHOLD_DEFAULT: u32 = 5;

/// Bytes of a header value or request target inspected, at most (the listener caps headers
/// long before this; the bound keeps the cost of a pathological value flat).
const FIELD_BYTES_MAX: usize = 16 * 1024;
/// Bytes after `${` in which a `:` makes a lookup expression.
const LOOKUP_WINDOW_BYTES: usize = 128;
/// Words after an override verb in which the rest of the phrase must follow.
const PHRASE_WINDOW_WORDS: usize = 6;
/// The most tags of a subdivision flag: a region (two letters or three digits) and up to
/// four letters or digits, as CLDR's subdivision codes are (`gbeng`, `usca`).
const FLAG_TAGS_MAX: usize = 7;

/// How much a matched rule adds to the anomaly score.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    Notice = 2,
    Warning = 3,
    Error = 4,
    Critical = 5,
}

impl Severity {
    pub fn score(self) -> u32 {
        self as u32
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Notice => "NOTICE",
            Severity::Warning => "WARNING",
            Severity::Error => "ERROR",
            Severity::Critical => "CRITICAL",
        }
    }
}

/// One rule of the set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    pub id: u32,
    pub severity: Severity,
    pub message: &'static str,
}

pub const RULE_CONTROL_CHARACTER: u32 = 920_270;
pub const RULE_BAD_ENCODING: u32 = 920_220;
pub const RULE_PATH_TRAVERSAL: u32 = 930_100;
pub const RULE_SMUGGLING: u32 = 921_110;
pub const RULE_CONTENT_TYPE: u32 = 920_420;
pub const RULE_SCANNER: u32 = 913_100;
pub const RULE_LOOKUP: u32 = 944_150;
pub const RULE_SHELLSHOCK: u32 = 932_170;
pub const RULE_QUERY_INJECTION: u32 = 941_100;
pub const RULE_CONTROL_TOKENS: u32 = 990_100;
pub const RULE_TAG_CHARACTERS: u32 = 990_110;
pub const RULE_BIDI_OVERRIDE: u32 = 990_120;
pub const RULE_INSTRUCTION_OVERRIDE: u32 = 990_130;
pub const RULE_PROMPT_EXTRACTION: u32 = 990_140;

/// Every rule, by id. The ids of rules that mirror a CRS rule are that rule's id; the LLM
/// rules are numbered in 990xxx, a range the CRS leaves to local rules.
pub const RULES: &[Rule] = &[
    Rule {
        id: RULE_SCANNER,
        severity: Severity::Critical,
        message: "security scanner detected",
    },
    Rule {
        id: RULE_BAD_ENCODING,
        severity: Severity::Warning,
        message: "invalid or overlong URL encoding",
    },
    Rule {
        id: RULE_CONTROL_CHARACTER,
        severity: Severity::Critical,
        message: "control character or encoded line break in the request target",
    },
    Rule {
        id: RULE_CONTENT_TYPE,
        severity: Severity::Warning,
        message: "request content type is not JSON",
    },
    Rule {
        id: RULE_SMUGGLING,
        severity: Severity::Critical,
        message: "both Transfer-Encoding and Content-Length: request smuggling",
    },
    Rule {
        id: RULE_PATH_TRAVERSAL,
        severity: Severity::Critical,
        message: "path traversal in the request target",
    },
    Rule {
        id: RULE_SHELLSHOCK,
        severity: Severity::Critical,
        message: "shell function definition in a header (Shellshock)",
    },
    Rule {
        id: RULE_QUERY_INJECTION,
        severity: Severity::Critical,
        message: "script or SQL injection in the query string or a field other than a prompt",
    },
    Rule {
        id: RULE_LOOKUP,
        severity: Severity::Critical,
        message: "lookup expression in a header or field (Log4Shell)",
    },
    Rule {
        id: RULE_CONTROL_TOKENS,
        severity: Severity::Critical,
        message: "chat-template control token in a prompt (role injection)",
    },
    Rule {
        id: RULE_TAG_CHARACTERS,
        severity: Severity::Critical,
        message: "invisible Unicode tag characters in a prompt (hidden instructions)",
    },
    Rule {
        id: RULE_BIDI_OVERRIDE,
        severity: Severity::Warning,
        message: "bidirectional override characters in a prompt",
    },
    Rule {
        id: RULE_INSTRUCTION_OVERRIDE,
        severity: Severity::Warning,
        message: "prompt asks to ignore previous instructions",
    },
    Rule {
        id: RULE_PROMPT_EXTRACTION,
        severity: Severity::Warning,
        message: "prompt asks for the system prompt",
    },
];

/// The rule with `id`.
pub fn rule(id: u32) -> Option<&'static Rule> {
    RULES.iter().find(|rule| rule.id == id)
}

/// What the firewall does with a request that reaches the threshold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WafMode {
    /// Nothing is inspected.
    Off,
    /// Findings are reported, requests pass.
    Detect,
    /// Requests at or over the threshold are refused.
    Block,
}

impl WafMode {
    pub fn parse(text: &str) -> Option<WafMode> {
        match text {
            "off" => Some(WafMode::Off),
            "detect" => Some(WafMode::Detect),
            "block" => Some(WafMode::Block),
            _ => None,
        }
    }
}

/// A problem with the firewall's settings.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WafError {
    #[error("rule {0} does not exist (see router_policies::waf::RULES)")]
    UnknownRule(u32),
    #[error("inbound_threshold must be at least 1")]
    Threshold,
}

/// The compiled firewall: settings and pattern automatons.
#[derive(Debug, Clone)]
pub struct Waf {
    mode: WafMode,
    inbound_threshold: u32,
    disabled: BTreeSet<u32>,
    /// Callers (API key ids) whose requests are inspected and reported but never blocked:
    /// a red team, an evaluation harness that sends attacks on purpose.
    exempt_callers: BTreeSet<String>,
    scanners: AhoCorasick,
    control_tokens: AhoCorasick,
    query_injection: AhoCorasick,
    /// The verbs that open an override or extraction phrasing (override verbs first).
    verbs: AhoCorasick,
}

/// User-agent fragments of security scanners and attack tools (CRS 913100's list, less the
/// generic HTTP libraries that legitimate SDKs are built on).
const SCANNER_AGENTS: &[&str] = &[
    "sqlmap",
    "nikto",
    "nmap scripting engine",
    "masscan",
    "zgrab",
    "nuclei",
    "gobuster",
    "dirbuster",
    "feroxbuster",
    "ffuf/",
    "wpscan",
    "acunetix",
    "netsparker",
    "arachni",
    "w3af",
    "openvas",
    "nessus",
    "whatweb",
    "jaeles",
    "havij",
    "commix",
    "wfuzz",
    "hydra",
    "zmeu",
    "morfeus",
];

/// Control tokens of common chat templates (ChatML, Llama 2 and 3, Gemma, Phi, Mistral).
const CONTROL_TOKENS: &[&str] = &[
    "<|im_start|>",
    "<|im_end|>",
    "<|im_sep|>",
    "<|endoftext|>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|end|>",
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<start_of_turn>",
    "<end_of_turn>",
    "[inst]",
    "[/inst]",
    "<<sys>>",
    "<</sys>>",
];

/// Script and SQL injection in a (decoded) query string.
const QUERY_INJECTION: &[&str] = &[
    "<script",
    "javascript:",
    "onerror=",
    "onload=",
    "union select",
    "union all select",
    "' or '1'='1",
    "' or 1=1",
    "\" or 1=1",
    "; drop table",
    "sleep(",
    "benchmark(",
    "xp_cmdshell",
];

/// Case-insensitive: for short fields (user agents, query strings).
fn automaton(patterns: &[&str]) -> AhoCorasick {
    AhoCorasickBuilder::new()
        .ascii_case_insensitive(true)
        .match_kind(MatchKind::LeftmostFirst)
        .build(patterns)
        .unwrap_or_else(|error| unreachable!("built-in patterns compile: {error}"))
}

/// For prompts, which may be megabytes: each pattern as written lower case, capitalised and
/// upper case, matched case-sensitively, so that the automaton can use its SIMD prefilter
/// (which does not support case-insensitive search): several gigabytes a second instead of
/// about one byte a nanosecond.
fn automaton_cased(patterns: &[&str]) -> AhoCorasick {
    let mut forms: Vec<String> = Vec::with_capacity(patterns.len() * 3);
    for pattern in patterns {
        let lower = pattern.to_ascii_lowercase();
        let mut capitalised = lower.clone();
        if let Some(first) = capitalised.get_mut(..1) {
            first.make_ascii_uppercase();
        }
        for form in [lower.clone(), capitalised, pattern.to_ascii_uppercase()] {
            if !forms.contains(&form) {
                forms.push(form);
            }
        }
    }
    AhoCorasickBuilder::new()
        .match_kind(MatchKind::LeftmostFirst)
        .build(&forms)
        .unwrap_or_else(|error| unreachable!("built-in patterns compile: {error}"))
}

impl Waf {
    /// A firewall in `mode`, blocking at `inbound_threshold`, without the rules `disabled`.
    pub fn new(
        mode: WafMode,
        inbound_threshold: u32,
        disabled: &[u32],
    ) -> Result<Waf, Vec<WafError>> {
        let mut errors: Vec<WafError> = disabled
            .iter()
            .filter(|id| rule(**id).is_none())
            .map(|id| WafError::UnknownRule(*id))
            .collect();
        if inbound_threshold == 0 {
            errors.push(WafError::Threshold);
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Waf {
            mode,
            inbound_threshold,
            disabled: disabled.iter().copied().collect(),
            exempt_callers: BTreeSet::new(),
            scanners: automaton(SCANNER_AGENTS),
            control_tokens: automaton_cased(CONTROL_TOKENS),
            query_injection: automaton(QUERY_INJECTION),
            verbs: automaton_cased(&[OVERRIDE_VERBS, REVEAL_VERBS].concat()),
        })
    }

    /// The same firewall, with `callers` reported but never blocked.
    pub fn with_exempt_callers(mut self, callers: &[String]) -> Waf {
        self.exempt_callers = callers.iter().cloned().collect();
        self
    }

    pub fn mode(&self) -> WafMode {
        self.mode
    }

    pub fn inbound_threshold(&self) -> u32 {
        self.inbound_threshold
    }
}

impl Default for Waf {
    /// Blocking at the default threshold, every rule on.
    fn default() -> Waf {
        Waf::new(WafMode::Block, INBOUND_THRESHOLD_DEFAULT, &[])
            .unwrap_or_else(|_| unreachable!("the defaults are valid"))
    }
}

/// The parts of a request the firewall reads.
#[derive(Debug, Clone, Copy)]
pub struct WafRequest<'a> {
    pub method: &'a str,
    /// The request target as received: path and query, still percent-encoded.
    pub target: &'a str,
    /// Header names in lower case, values as text.
    pub headers: &'a [(&'a str, &'a str)],
    /// The prompt-bearing strings of the body.
    pub prompt_texts: &'a [String],
    /// The body's other strings (one per line).
    pub other_text: &'a str,
    /// The authenticated caller (API key id), if any.
    pub caller: Option<&'a str>,
}

/// Where a rule matched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    Target,
    Header(String),
    Prompt(usize),
    Body,
}

impl fmt::Display for Location {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Target => formatter.write_str("REQUEST_URI"),
            Location::Header(name) => write!(formatter, "REQUEST_HEADERS:{name}"),
            Location::Prompt(index) => write!(formatter, "PROMPT:{index}"),
            Location::Body => formatter.write_str("REQUEST_BODY"),
        }
    }
}

/// A matched rule: which, where, and the kind of pattern (never the matched text).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WafMatch {
    pub rule: &'static Rule,
    pub location: Location,
    pub detail: &'static str,
}

/// What happens to the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WafAction {
    /// No rule matched (or the firewall is off).
    Allowed,
    /// Rules matched: under the threshold, or in detect mode.
    Detected,
    /// At or over the threshold in block mode: refuse the request.
    Blocked,
}

impl WafAction {
    /// As Azure's firewall logs name actions.
    pub fn as_str(self) -> &'static str {
        match self {
            WafAction::Allowed => "Allowed",
            WafAction::Detected => "Matched",
            WafAction::Blocked => "Blocked",
        }
    }
}

/// The firewall's verdict on one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WafVerdict {
    pub action: WafAction,
    pub score: u32,
    /// One entry per matched rule (its first match), in rule order.
    pub matches: Vec<WafMatch>,
}

impl WafVerdict {
    /// The matched rules' ids.
    pub fn rule_ids(&self) -> Vec<u32> {
        self.matches.iter().map(|found| found.rule.id).collect()
    }
}

/// Inspects `request`.
pub fn inspect(waf: &Waf, request: &WafRequest<'_>) -> WafVerdict {
    if waf.mode == WafMode::Off {
        return WafVerdict {
            action: WafAction::Allowed,
            score: 0,
            matches: Vec::new(),
        };
    }
    let mut findings = Findings {
        disabled: &waf.disabled,
        matches: Vec::new(),
    };
    inspect_target(waf, request.target, &mut findings);
    inspect_headers(waf, request, &mut findings);
    for (index, text) in request.prompt_texts.iter().enumerate() {
        inspect_prompt(waf, text, index, &mut findings);
    }
    if let Some(detail) = lookup_expression(request.other_text.as_bytes()) {
        findings.add(RULE_LOOKUP, Location::Body, detail);
    }
    if waf.query_injection.is_match(request.other_text) {
        findings.add(RULE_QUERY_INJECTION, Location::Body, "injection pattern");
    }
    let mut matches = findings.matches;
    matches.sort_by_key(|found| found.rule.id);
    let score = matches
        .iter()
        .map(|found| found.rule.severity.score())
        .sum();
    let action = if matches.is_empty() {
        WafAction::Allowed
    } else if waf.mode == WafMode::Block
        && score >= waf.inbound_threshold
        && !request
            .caller
            .is_some_and(|caller| waf.exempt_callers.contains(caller))
    {
        WafAction::Blocked
    } else {
        WafAction::Detected
    };
    WafVerdict {
        action,
        score,
        matches,
    }
}

/// Matches so far: each rule once, disabled rules never.
struct Findings<'a> {
    disabled: &'a BTreeSet<u32>,
    matches: Vec<WafMatch>,
}

impl Findings<'_> {
    fn add(&mut self, id: u32, location: Location, detail: &'static str) {
        if self.disabled.contains(&id) || self.matches.iter().any(|found| found.rule.id == id) {
            return;
        }
        if let Some(rule) = rule(id) {
            self.matches.push(WafMatch {
                rule,
                location,
                detail,
            });
        }
    }

    fn has(&self, id: u32) -> bool {
        self.disabled.contains(&id) || self.matches.iter().any(|found| found.rule.id == id)
    }
}

fn capped(text: &str) -> &[u8] {
    let bytes = text.as_bytes();
    &bytes[..bytes.len().min(FIELD_BYTES_MAX)]
}

fn inspect_target(waf: &Waf, target: &str, findings: &mut Findings<'_>) {
    let raw = capped(target);
    if raw.iter().any(|byte| *byte < 0x20 || *byte == 0x7f) {
        findings.add(
            RULE_CONTROL_CHARACTER,
            Location::Target,
            "raw control character",
        );
    }
    let (decoded, malformed) = percent_decode(raw);
    if malformed {
        findings.add(
            RULE_BAD_ENCODING,
            Location::Target,
            "percent sign without two hexadecimal digits",
        );
    }
    if decoded.iter().any(|byte| *byte < 0x20 || *byte == 0x7f) {
        findings.add(
            RULE_CONTROL_CHARACTER,
            Location::Target,
            "encoded control character",
        );
    }
    if has_overlong_dot_or_slash(raw) {
        findings.add(
            RULE_BAD_ENCODING,
            Location::Target,
            "overlong UTF-8 encoding",
        );
        findings.add(
            RULE_PATH_TRAVERSAL,
            Location::Target,
            "overlong-encoded dot or slash",
        );
    }
    // Once decoded, and once more: `%252e%252e` is `..` to a server that decodes twice. A
    // stray `%` that the first pass wrote is no encoding error of the request's.
    let (twice, _) = percent_decode(&decoded);
    let path_end = |bytes: &[u8]| {
        bytes
            .iter()
            .position(|byte| *byte == b'?')
            .unwrap_or(bytes.len())
    };
    for candidate in [&decoded, &twice] {
        let path = &candidate[..path_end(candidate)];
        if has_dot_segment(path) {
            findings.add(RULE_PATH_TRAVERSAL, Location::Target, "dot segment");
            break;
        }
    }
    // The query's dot segments, once and twice decoded.
    for candidate in [&decoded, &twice] {
        let query = &candidate[path_end(candidate)..];
        if query
            .windows(3)
            .any(|part| part == b"../" || part == b"..\\")
        {
            findings.add(
                RULE_PATH_TRAVERSAL,
                Location::Target,
                "dot segment in the query",
            );
            break;
        }
    }
    let query_start = decoded.iter().position(|byte| *byte == b'?');
    if let Some(start) = query_start {
        // `+` is a space in a query.
        let query: Vec<u8> = decoded[start + 1..]
            .iter()
            .map(|byte| if *byte == b'+' { b' ' } else { *byte })
            .collect();
        if waf.query_injection.is_match(&query) {
            findings.add(RULE_QUERY_INJECTION, Location::Target, "injection pattern");
        }
        if let Some(detail) = lookup_expression(&query) {
            findings.add(RULE_LOOKUP, Location::Target, detail);
        }
    }
}

fn inspect_headers(waf: &Waf, request: &WafRequest<'_>, findings: &mut Findings<'_>) {
    let mut content_length = false;
    let mut transfer_encoding = false;
    for (name, value) in request.headers {
        let bytes = capped(value);
        match *name {
            "content-length" => content_length = true,
            "transfer-encoding" => transfer_encoding = true,
            "user-agent" if waf.scanners.is_match(bytes) => {
                findings.add(
                    RULE_SCANNER,
                    Location::Header((*name).to_owned()),
                    "scanner user agent",
                );
            }
            "content-type" => {
                let media_type = value.split(';').next().unwrap_or_default().trim();
                let suffix = media_type.as_bytes();
                let json = media_type.eq_ignore_ascii_case("application/json")
                    || (suffix.len() > 5
                        && suffix[suffix.len() - 5..].eq_ignore_ascii_case(b"+json"));
                if request.method == "POST" && !json {
                    findings.add(
                        RULE_CONTENT_TYPE,
                        Location::Header((*name).to_owned()),
                        "not a JSON media type",
                    );
                }
            }
            _ => {}
        }
        if let Some(detail) = lookup_expression(bytes) {
            findings.add(RULE_LOOKUP, Location::Header((*name).to_owned()), detail);
        }
        if value.trim_start().starts_with("() {") {
            findings.add(
                RULE_SHELLSHOCK,
                Location::Header((*name).to_owned()),
                "function definition",
            );
        }
    }
    if content_length && transfer_encoding {
        findings.add(
            RULE_SMUGGLING,
            Location::Header("transfer-encoding".to_owned()),
            "Transfer-Encoding with Content-Length",
        );
    }
}

fn inspect_prompt(waf: &Waf, text: &str, index: usize, findings: &mut Findings<'_>) {
    if !findings.has(RULE_CONTROL_TOKENS) && waf.control_tokens.is_match(text) {
        findings.add(
            RULE_CONTROL_TOKENS,
            Location::Prompt(index),
            "chat-template control token",
        );
    }
    let bytes = text.as_bytes();
    // Tag characters start with 0xF3 in UTF-8, the bidirectional controls with 0xE2: one
    // vectorised pass rules both out for most prompts.
    if memchr::memchr2(0xF3, 0xE2, bytes).is_none() {
        inspect_phrases(waf, text, index, findings);
        return;
    }
    if !findings.has(RULE_TAG_CHARACTERS) && has_hidden_tag_characters(text) {
        findings.add(
            RULE_TAG_CHARACTERS,
            Location::Prompt(index),
            "Unicode tag characters outside a flag",
        );
    }
    if !findings.has(RULE_BIDI_OVERRIDE) && has_bidi_override(bytes) {
        findings.add(
            RULE_BIDI_OVERRIDE,
            Location::Prompt(index),
            "bidirectional override or isolate",
        );
    }
    inspect_phrases(waf, text, index, findings);
}

fn inspect_phrases(waf: &Waf, text: &str, index: usize, findings: &mut Findings<'_>) {
    if !findings.has(RULE_INSTRUCTION_OVERRIDE) || !findings.has(RULE_PROMPT_EXTRACTION) {
        // Read as the sensitivity scan reads it, and with Cyrillic or Greek letters that
        // pass for Latin ones read as those: a zero-width space inside a word, full-width
        // letters or an `і` for an `i` do not hide a phrasing from the model, so not from
        // the rule.
        let folded = crate::fold::Folded::of_words(text);
        let phrases = phrases(
            &waf.verbs,
            folded.as_ref().map_or(text, |folded| &folded.text),
        );
        if phrases.instruction_override {
            findings.add(
                RULE_INSTRUCTION_OVERRIDE,
                Location::Prompt(index),
                "override phrasing",
            );
        }
        if phrases.prompt_extraction {
            findings.add(
                RULE_PROMPT_EXTRACTION,
                Location::Prompt(index),
                "extraction phrasing",
            );
        }
    }
}

/// Decodes `%XX` escapes once, and says whether a `%` was not followed by two hexadecimal
/// digits. Such a `%` is kept as it is and the escapes around it are still decoded, as
/// lenient servers do: one stray `%` must not leave the rest of the target unread.
fn percent_decode(bytes: &[u8]) -> (Vec<u8>, bool) {
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut malformed = false;
    let mut index = 0;
    while index < bytes.len() {
        if bytes[index] == b'%' {
            let high = bytes.get(index + 1).and_then(|byte| hex_value(*byte));
            let low = bytes.get(index + 2).and_then(|byte| hex_value(*byte));
            if let (Some(high), Some(low)) = (high, low) {
                decoded.push(high << 4 | low);
                index += 3;
                continue;
            }
            malformed = true;
        }
        decoded.push(bytes[index]);
        index += 1;
    }
    (decoded, malformed)
}

fn hex_value(byte: u8) -> Option<u8> {
    match byte {
        b'0'..=b'9' => Some(byte - b'0'),
        b'a'..=b'f' => Some(byte - b'a' + 10),
        b'A'..=b'F' => Some(byte - b'A' + 10),
        _ => None,
    }
}

/// `%c0%ae` (`.`), `%c0%af` and `%c1%9c` (`/`, `\`), `%e0%80%ae`: overlong forms that
/// decoders which do not check UTF-8 turn into dots and slashes.
fn has_overlong_dot_or_slash(raw: &[u8]) -> bool {
    let lower: Vec<u8> = raw.iter().map(u8::to_ascii_lowercase).collect();
    [
        &b"%c0%ae"[..],
        b"%c0%af",
        b"%c1%9c",
        b"%c1%1c",
        b"%e0%80%ae",
    ]
    .iter()
    .any(|pattern| {
        lower
            .windows(pattern.len())
            .any(|window| window == *pattern)
    })
}

/// A `.` or `..` path segment, with `/` or `\` as separators.
fn has_dot_segment(path: &[u8]) -> bool {
    path.split(|byte| *byte == b'/' || *byte == b'\\')
        .any(|segment| segment == b".." || segment == b".")
}

/// `${` followed, within a short window, by `:`: a lookup (`${jndi:ldap://…}`,
/// `${${lower:j}ndi:…}`, `${env:…}`). Header values and identifiers of an API never hold one.
///
/// Reads all of `bytes`: the callers cap a header value or the target, but the body's other
/// strings come joined, and a lookup after 16 KiB of padding in one field is still one. Each
/// `${` costs at most its window, so the cost stays linear in the text.
fn lookup_expression(bytes: &[u8]) -> Option<&'static str> {
    let openings = memchr::memchr_iter(b'$', bytes).filter(|&at| bytes.get(at + 1) == Some(&b'{'));
    for opening in openings {
        let start = opening + 2;
        let window = &bytes[start..bytes.len().min(start + LOOKUP_WINDOW_BYTES)];
        let end = window
            .iter()
            .position(|byte| *byte == b'}')
            .unwrap_or(window.len());
        // Nested lookups close their inner braces first: look across them.
        let nested = window[..end].windows(2).any(|pair| pair == b"${");
        let inspected = if nested { window } else { &window[..end] };
        if inspected.contains(&b':') {
            let lower: Vec<u8> = inspected.iter().map(u8::to_ascii_lowercase).collect();
            let jndi = lower.windows(4).any(|part| part == b"jndi");
            return Some(if jndi { "jndi lookup" } else { "lookup" });
        }
    }
    None
}

/// Unicode tag characters (U+E0000–U+E007F) other than those of a subdivision flag
/// (U+1F3F4, a subdivision's code in tags, U+E007F), which is their one everyday use.
fn has_hidden_tag_characters(text: &str) -> bool {
    // Every tag character's UTF-8 starts with 0xF3.
    if memchr::memchr(0xF3, text.as_bytes()).is_none() {
        return false;
    }
    let mut characters = text.chars();
    while let Some(character) = characters.next() {
        match character {
            '\u{1F3F4}' => {
                let rest = characters.as_str();
                if let Some(length) = flag_tags_bytes(rest) {
                    characters = rest[length..].chars();
                }
            }
            '\u{E0000}'..='\u{E007F}' => return true,
            _ => {}
        }
    }
    false
}

/// The length in bytes of the subdivision flag's tags that `text` starts with: lower-case
/// letters and digits in tags, at most [`FLAG_TAGS_MAX`], closed by U+E007F CANCEL TAG.
/// `None` for any other run: a flag's base must not excuse the tags of a hidden message
/// that follow it.
fn flag_tags_bytes(text: &str) -> Option<usize> {
    let mut tags = 0;
    for (at, character) in text.char_indices() {
        match character {
            '\u{E007F}' if tags > 0 => return Some(at + character.len_utf8()),
            '\u{E0030}'..='\u{E0039}' | '\u{E0061}'..='\u{E007A}' if tags < FLAG_TAGS_MAX => {
                tags += 1;
            }
            _ => return None,
        }
    }
    None
}

/// U+202A–U+202E (embeddings and overrides) and U+2066–U+2069 (isolates), whose UTF-8 starts
/// with 0xE2 0x80 / 0xE2 0x81.
fn has_bidi_override(bytes: &[u8]) -> bool {
    if memchr::memchr(0xE2, bytes).is_none() {
        return false;
    }
    bytes.windows(3).any(|window| {
        matches!(
            window,
            [0xE2, 0x80, 0xAA..=0xAE] | [0xE2, 0x81, 0xA6..=0xA9]
        )
    })
}

#[derive(Debug, Default, PartialEq, Eq)]
struct Phrases {
    instruction_override: bool,
    prompt_extraction: bool,
}

const OVERRIDE_VERBS: &[&str] = &["ignore", "disregard", "forget", "override", "bypass"];
const EARLIER: &[&str] = &[
    "previous",
    "prior",
    "above",
    "earlier",
    "preceding",
    "all",
    "your",
    "any",
    "system",
];
const DIRECTIVES: &[&str] = &[
    "instructions",
    "instruction",
    "prompts",
    "prompt",
    "rules",
    "directions",
    "guidelines",
    "directives",
];
const REVEAL_VERBS: &[&str] = &[
    "reveal", "print", "show", "repeat", "output", "leak", "display", "disclose", "tell",
];
const HIDDEN: &[&str] = &["system", "initial", "hidden", "original", "secret"];
const PROMPT_WORDS: &[&str] = &["prompt", "instructions", "message"];

/// Looks for "ignore (all) previous instructions" and "reveal your system prompt" phrasings:
/// a verb, then within a few words a qualifier and, after it, the noun. The verbs are found
/// with one automaton pass (they are rare); only the words after each are read.
fn phrases(verbs: &AhoCorasick, text: &str) -> Phrases {
    let bytes = text.as_bytes();
    let is_one_of = |word: &[u8], list: &[&str]| {
        list.iter().any(|candidate| {
            candidate.len() == word.len() && candidate.as_bytes().eq_ignore_ascii_case(word)
        })
    };
    let mut found = Phrases::default();
    for verb in verbs.find_iter(bytes) {
        let before = verb.start().checked_sub(1).map(|index| bytes[index]);
        let after = bytes.get(verb.end()).copied();
        if before.is_some_and(|byte| byte.is_ascii_alphabetic())
            || after.is_some_and(|byte| byte.is_ascii_alphabetic())
        {
            continue;
        }
        let extraction = is_one_of(&bytes[verb.start()..verb.end()], REVEAL_VERBS);
        let (qualifiers, nouns) = if extraction {
            (HIDDEN, PROMPT_WORDS)
        } else {
            (EARLIER, DIRECTIVES)
        };
        // Words are runs of ASCII letters: the phrasings are English, and UTF-8
        // continuation bytes are never letters.
        let mut qualified = false;
        let following = bytes[verb.end()..]
            .split(|byte| !byte.is_ascii_alphabetic())
            .filter(|word| !word.is_empty())
            .take(PHRASE_WINDOW_WORDS);
        for word in following {
            if qualified && is_one_of(word, nouns) {
                if extraction {
                    found.prompt_extraction = true;
                } else {
                    found.instruction_override = true;
                }
                break;
            }
            qualified |= is_one_of(word, qualifiers);
        }
        if found.instruction_override && found.prompt_extraction {
            break;
        }
    }
    found
}

#[cfg(test)]
mod tests;
